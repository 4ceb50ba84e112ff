"""Volumes: thin maps over chunks, with generations for snapshots and clones.

Theory of operation (DESIGN.md, Words):
- A volume belongs to a lineage. Every chunk of the lineage is placed by (lineage, index),
  so all generations of chunk i live on the same replica hosts.
- A volume's head is a generation number `head`; `chain` lists the generations whose chunks
  the head can see, oldest first, ending with `head`. Reading chunk i reads the newest
  generation in the chain that holds chunk i; none means a hole.
- A snapshot freezes the head: it records the current chain under its name and the head
  moves to a fresh generation appended to the chain. The frozen generation is never written
  again, so a snapshot never changes.
- A clone of NAME@SNAP is a new volume in the same lineage whose chain is the snapshot's
  chain plus a fresh head. Its first write to chunk i copies the chunk up locally on every
  replica host (no bytes cross the network) and then applies the write.
- Generation numbers come from one registry counter per lineage, so they are unique in the
  lineage and increase with time.
The record is a plain dict in the registry (msgpack-able); VolumeRecord is its typed view.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field, replace

from vbp.errors import AlreadyExists, InvalidArgument, NotFound
from vbp.layout import CHUNK_SIZE_DEFAULT, Geometry, check_chunk_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_REPLICAS = 7


def check_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def split_export_name(export: str) -> tuple[str, str | None]:
    """'vol' -> ('vol', None); 'vol@snap' -> ('vol', 'snap')."""
    name, sep, snap = export.partition("@")
    check_name(name)
    if sep:
        check_name(snap, "snapshot")
        return name, snap
    return name, None


@dataclass(frozen=True, slots=True)
class Snapshot:
    name: str
    gen: int
    chain: tuple[int, ...]
    created: float

    def to_dict(self) -> dict:
        return {"name": self.name, "gen": self.gen, "chain": list(self.chain), "created": self.created}

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        return cls(d["name"], int(d["gen"]), tuple(d["chain"]), float(d["created"]))


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    name: str
    size: int
    replicas: int
    min_size: int
    chunk_size: int
    lineage: str
    head: int
    chain: tuple[int, ...]
    snapshots: tuple[Snapshot, ...] = ()
    parent: str | None = None  # "volume@snapshot" this volume was cloned from
    created: float = 0.0
    qos_iops: int = 0
    qos_bps: int = 0

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size)

    def snapshot(self, name: str) -> Snapshot:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise NotFound(f"volume {self.name!r} has no snapshot {name!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chain"] = list(self.chain)
        d["snapshots"] = [s.to_dict() for s in self.snapshots]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VolumeRecord":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["chain"] = tuple(kw["chain"])
        kw["snapshots"] = tuple(Snapshot.from_dict(s) for s in kw.get("snapshots", ()))
        return cls(**kw)


def new_volume(
    name: str,
    size: int,
    *,
    replicas: int = 3,
    min_size: int | None = None,
    chunk_size: int = CHUNK_SIZE_DEFAULT,
    lineage: str | None = None,
    head: int = 1,
    now: float | None = None,
) -> VolumeRecord:
    """Validate the parameters of a new volume and build its record."""
    check_name(name)
    check_chunk_size(chunk_size)
    Geometry(size, chunk_size)
    if size <= 0:
        raise InvalidArgument("volume size must be greater than zero")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
    if min_size is None:
        min_size = min(replicas, max(1, replicas - 1))
    if not 1 <= min_size <= replicas:
        raise InvalidArgument(f"min-size must be between 1 and replicas ({replicas}), not {min_size}")
    return VolumeRecord(
        name=name,
        size=size,
        replicas=replicas,
        min_size=min_size,
        chunk_size=chunk_size,
        lineage=lineage or uuid.uuid4().hex[:16],
        head=head,
        chain=(head,),
        created=time.time() if now is None else now,
    )


def take_snapshot(rec: VolumeRecord, snap: str, new_head: int, now: float | None = None) -> VolumeRecord:
    """The head's chain is frozen under `snap`; writes go to the fresh generation `new_head`."""
    check_name(snap, "snapshot")
    if any(s.name == snap for s in rec.snapshots):
        raise AlreadyExists(f"volume {rec.name!r} already has a snapshot {snap!r}")
    if new_head <= rec.head:
        raise InvalidArgument("a new head generation must be newer than the current one")
    frozen = Snapshot(snap, rec.head, rec.chain, time.time() if now is None else now)
    return replace(
        rec, head=new_head, chain=rec.chain + (new_head,), snapshots=rec.snapshots + (frozen,)
    )


def clone_from(parent: VolumeRecord, snap: str, name: str, new_head: int, now: float | None = None) -> VolumeRecord:
    s = parent.snapshot(snap)
    check_name(name)
    return VolumeRecord(
        name=name,
        size=parent.size,
        replicas=parent.replicas,
        min_size=parent.min_size,
        chunk_size=parent.chunk_size,
        lineage=parent.lineage,
        head=new_head,
        chain=s.chain + (new_head,),
        parent=f"{parent.name}@{snap}",
        created=time.time() if now is None else now,
    )


@dataclass(frozen=True, slots=True)
class View:
    """What one NBD export sees: a volume head (writable) or a snapshot (read-only)."""

    export: str
    volume: VolumeRecord
    chain: tuple[int, ...]
    read_only: bool

    @property
    def gen(self) -> int:
        return self.chain[-1]


def view_of(rec: VolumeRecord, snap: str | None) -> View:
    if snap is None:
        return View(rec.name, rec, rec.chain, False)
    s = rec.snapshot(snap)
    return View(f"{rec.name}@{snap}", rec, s.chain, True)
