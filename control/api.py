"""Management operations on the pool, shared by the CLI and tests. Synchronous: each call
opens nothing but the registry it is given."""

from __future__ import annotations

from vbp.errors import InvalidArgument
from vbp.layout import CHUNK_SIZE_DEFAULT, parse_size
from vbp.volume import VolumeRecord, check_name, clone_from, new_volume, take_snapshot


def gen_counter(lineage: str) -> str:
    return f"gen/{lineage}"


def create_volume(reg, name: str, size, *, replicas: int = 3, min_size: int | None = None,
                  chunk_size=CHUNK_SIZE_DEFAULT) -> VolumeRecord:
    rec = new_volume(name, parse_size(size), replicas=replicas, min_size=min_size,
                     chunk_size=parse_size(chunk_size))
    head = reg.next_id(gen_counter(rec.lineage))
    rec = new_volume(name, rec.size, replicas=replicas, min_size=min_size, chunk_size=rec.chunk_size,
                     lineage=rec.lineage, head=head, now=rec.created)
    reg.create_volume(name, rec.to_dict())
    return rec


def get_volume(reg, name: str) -> VolumeRecord:
    check_name(name)
    return VolumeRecord.from_dict(reg.get_volume(name))


def list_volumes(reg) -> list[VolumeRecord]:
    return sorted((VolumeRecord.from_dict(d) for d in reg.list_volumes()), key=lambda v: v.name)


def delete_volume(reg, name: str) -> None:
    rec = get_volume(reg, name)
    children = [v.name for v in list_volumes(reg) if v.parent and v.parent.split("@")[0] == name]
    if children:
        raise InvalidArgument(
            f"volume {name!r} has clones ({', '.join(children)}); delete them first"
        )
    reg.delete_volume(rec.name)


def snapshot(reg, name: str, snap: str) -> VolumeRecord:
    rec = get_volume(reg, name)
    head = reg.next_id(gen_counter(rec.lineage))
    return VolumeRecord.from_dict(
        reg.update_volume(name, lambda d: take_snapshot(VolumeRecord.from_dict(d), snap, head).to_dict())
    )


def clone(reg, source: str, new_name: str) -> VolumeRecord:
    name, sep, snap = source.partition("@")
    if not sep or not snap:
        raise InvalidArgument(f"clone source must be NAME@SNAPSHOT, not {source!r}")
    parent = get_volume(reg, name)
    parent.snapshot(snap)
    head = reg.next_id(gen_counter(parent.lineage))
    rec = clone_from(parent, snap, new_name, head)
    reg.create_volume(new_name, rec.to_dict())
    return rec


def resize(reg, name: str, size, *, force: bool = False) -> VolumeRecord:
    new_size = parse_size(size)
    if new_size <= 0:
        raise InvalidArgument("volume size must be greater than zero")

    def apply(d: dict) -> dict:
        if new_size < d["size"] and not force:
            raise InvalidArgument(
                f"shrinking {name!r} from {d['size']} to {new_size} bytes discards data; use --force"
            )
        d = dict(d)
        d["size"] = new_size
        return d

    get_volume(reg, name)
    return VolumeRecord.from_dict(reg.update_volume(name, apply))

