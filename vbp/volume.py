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
- A snapshot of a volume that a gateway is writing is taken in two steps, like RBD's notify
  to the exclusive-lock owner: the command records a pending head generation; the gateway
  holding the write lease holds new writes, lets in-flight ones finish, switches to the
  new head and completes the snapshot in the record. With no lease holder the command
  completes it itself. Writes acknowledged before the snapshot completes are in it; later
  ones are not; nothing changes in it afterwards.
- Shrinking (chunk-aligned) starts a fresh head and records a cut: for chunk indexes past
  the new end, generations up to the old head are invisible (`visible_chain`), so growing
  again reads zeros there, never old bytes. It is taken in two steps as a snapshot is
  (`request_shrink`, `complete_pending`): the gateway holding the lease lets the writes
  under way end (a write past the new end acknowledged after the record changed would be
  lost) and refuses those past the new end from then on, before the shrink completes.
- Garbage collection is one rule (`needed_gens`): a local generation of chunk i is kept
  while it is the newest generation holding chunk i in the visible chain of some reader
  (a volume head or a snapshot of the lineage). Deleted volumes, deleted snapshots,
  overwritten snapshot data and chunks cut off by a shrink all follow from it.
The record is a plain dict in the registry (msgpack-able); VolumeRecord is its typed view.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field, replace

from vbp.errors import AlreadyExists, BadValue, InvalidArgument, NotFound
from vbp.layout import CHUNK_SIZE_DEFAULT, Geometry, check_chunk_size

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # (fullmatch: `$` lets a final newline in)
MAX_REPLICAS = 7


def check_name(name: str, what: str = "volume") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadValue(
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


Cuts = tuple[tuple[int, int], ...]  # (newest hidden generation, first hidden chunk index)


@dataclass(frozen=True, slots=True)
class Snapshot:
    name: str
    gen: int
    chain: tuple[int, ...]
    created: float
    size: int = 0
    cuts: Cuts = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "gen": self.gen, "chain": list(self.chain), "created": self.created,
                "size": self.size, "cuts": [list(c) for c in self.cuts]}

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        return cls(d["name"], int(d["gen"]), tuple(d["chain"]), float(d["created"]),
                   int(d.get("size", 0)), tuple(tuple(c) for c in d.get("cuts", ())))


# chunks an accepted loss lists by index and copy kept (the lowest; the others are only
# counted), and the accepted losses a lineage's record keeps (older ones fold into one):
# the record stays a few KiB however many chunks are given up, and so does each
# transaction of `vbp volume accept-loss` that rewrites it
CHUNKS_LISTED = 32
LOSSES_KEPT = 16


@dataclass(frozen=True, slots=True)
class AcceptedLoss:
    """Chunks of a lineage whose last current copy was lost (every copy stale, the newest
    never current: replicator.loss.unrecoverable), given up by one `vbp volume
    accept-loss` of `volume` at `time` (or by several, folded, from `since` on).
    `reverted` chunks were brought to the newest copy that was current once: older than
    the acknowledged bytes; `zeroed` ones had no copy ever current: lost, they read as
    holes. `low`..`high`: the indexes given up lie there; `chunks`: (index, copy kept,
    reverted) of the CHUNKS_LISTED lowest. Kept in the lineage's own registry key
    (Registry.get_losses), not in the volume records: those of a template with many
    clones would each grow by it, and older code rewriting one drops a key it does not
    know."""

    time: float
    volume: str = ""
    reverted: int = 0
    zeroed: int = 0
    low: int = 0
    high: int = -1
    chunks: tuple[tuple[int, str, bool], ...] = ()
    since: float | None = None  # the first call's time (folded ones); None: `time`

    def __post_init__(self) -> None:
        if self.since is None:
            object.__setattr__(self, "since", self.time)

    @property
    def count(self) -> int:
        return self.reverted + self.zeroed

    def reaches(self, chunk_count: int) -> bool:
        """Some chunk given up may lie within a volume of `chunk_count` chunks."""
        return self.count > 0 and self.low < chunk_count

    def with_chunk(self, index: int, host: str, reverts: bool) -> "AcceptedLoss":
        listed = tuple(sorted(self.chunks + ((index, host, reverts),)))[:CHUNKS_LISTED]
        first = self.count == 0
        return replace(self, reverted=self.reverted + reverts, zeroed=self.zeroed + (not reverts),
                       low=index if first else min(self.low, index),
                       high=index if first else max(self.high, index), chunks=listed)

    def folded(self, newer: "AcceptedLoss") -> "AcceptedLoss":
        """This loss and a newer one as one entry: counts summed, the lowest chunks listed."""
        return AcceptedLoss(newer.time, newer.volume, self.reverted + newer.reverted,
                            self.zeroed + newer.zeroed, min(self.low, newer.low),
                            max(self.high, newer.high),
                            tuple(sorted(self.chunks + newer.chunks))[:CHUNKS_LISTED],
                            min(self.since, newer.since))

    def to_dict(self) -> dict:
        return {"time": self.time, "volume": self.volume, "reverted": self.reverted,
                "zeroed": self.zeroed, "low": self.low, "high": self.high,
                "chunks": [list(c) for c in self.chunks], "since": self.since}

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptedLoss":
        return cls(float(d["time"]), str(d.get("volume", "")), int(d.get("reverted", 0)),
                   int(d.get("zeroed", 0)), int(d.get("low", 0)), int(d.get("high", -1)),
                   tuple((int(i), str(h), bool(r)) for i, h, r in d.get("chunks", ())),
                   float(d.get("since", d["time"])))


def accepted_losses(d: dict | None) -> tuple[AcceptedLoss, ...]:
    """The accepted losses of a lineage's loss record (Registry.get_losses), oldest first."""
    return tuple(AcceptedLoss.from_dict(e) for e in (d or {}).get("losses", ()))


def note_accepted(d: dict | None, when: float, volume: str, index: int, host: str,
                  reverts: bool) -> dict:
    """The lineage's loss record `d` (None: it has none yet) with chunk `index` added to
    the accepted loss made at `when` (one per `vbp volume accept-loss`, grown a chunk at
    a time); past LOSSES_KEPT the two oldest fold into one. Other keys kept as they are."""
    entries = list(accepted_losses(d))
    at = next((i for i, e in enumerate(entries) if e.time == when and e.volume == volume), None)
    if at is None:
        entries.append(AcceptedLoss(when, volume).with_chunk(index, host, reverts))
    else:
        entries[at] = entries[at].with_chunk(index, host, reverts)
    while len(entries) > LOSSES_KEPT:
        entries[:2] = [entries[0].folded(entries[1])]
    return {**(d or {}), "losses": [e.to_dict() for e in entries]}


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
    cuts: Cuts = ()
    pending: int = 0  # head generation of a snapshot in progress (0: none)
    pending_snap: str = ""
    # unix time past which the snapshot in progress is abandoned: its requester gave up
    # (killed, or cut off from the registry) without cancelling it (pending_abandoned)
    pending_until: float = 0.0
    # a shrink in progress (request_shrink): the size, the head generation it makes, and
    # the unix time past which it is abandoned, as a snapshot's (pending_abandoned)
    shrink_to: int = 0
    shrink_head: int = 0
    shrink_until: float = 0.0
    # (host, chunk count, unix time) per host whose disk was replaced while it held the only
    # copy (replicas=1) of chunks placed on it: those chunks are gone and read as zeros
    lost: tuple[tuple[str, int, float], ...] = ()
    # an import begun and not completed (control.api.begin_import): the file it copies and
    # the unix time it began ("", 0: none). Failed, interrupted or killed, the volume holds
    # part of that file over its old contents, and must not look like a finished copy.
    import_from: str = ""
    import_began: float = 0.0

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.chunk_size)

    def snapshot(self, name: str) -> Snapshot:
        for s in self.snapshots:
            if s.name == name:
                return s
        raise NotFound(f"volume {self.name!r} has no snapshot {name!r}")

    def to_dict(self) -> dict:
        # (field by field: dataclasses.asdict deep-copies every snapshot first, which took
        # seconds for a record of thousands of snapshots, at every update of it)
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["chain"] = list(self.chain)
        d["snapshots"] = [s.to_dict() for s in self.snapshots]
        d["cuts"] = [list(c) for c in self.cuts]
        d["lost"] = [list(x) for x in self.lost]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VolumeRecord":
        known = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in known}
        kw["chain"] = tuple(kw["chain"])
        kw["snapshots"] = tuple(Snapshot.from_dict(s) for s in kw.get("snapshots", ()))
        kw["cuts"] = tuple(tuple(c) for c in kw.get("cuts", ()))
        kw["lost"] = tuple(tuple(x) for x in kw.get("lost", ()))
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
        raise BadValue("volume size must be greater than zero")
    if not 1 <= replicas <= MAX_REPLICAS:
        raise BadValue(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
    if min_size is None:
        min_size = min(replicas, max(1, replicas - 1))
    if not 1 <= min_size <= replicas:
        raise BadValue(f"min-size must be between 1 and replicas ({replicas}), not {min_size}")
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


# Snapshots a volume may have at once. Each keeps its chain in the volume's record, so the
# record grows with the square of their count (256 KB at 500; at about 1,100 etcd refuses
# it as too large, and every gateway serving the volume reads it five times a second).
# The chain also gains a generation at every snapshot taken, deleted or not: kept under
# this count, the record still grows, until the registry refuses it (base.VALUE_MAX).
MAX_SNAPSHOTS = 256


def request_snapshot(rec: VolumeRecord, snap: str, new_head: int, until: float = 0.0,
                     now: float | None = None) -> VolumeRecord:
    """Step one of a snapshot: record the pending head generation, abandoned if it is not
    completed by `until` (unix time; 0: never). One abandoned before is replaced."""
    check_name(snap, "snapshot")
    if any(s.name == snap for s in rec.snapshots):
        raise AlreadyExists(f"volume {rec.name!r} already has a snapshot {snap!r}")
    if len(rec.snapshots) >= MAX_SNAPSHOTS:
        raise InvalidArgument(
            f"volume {rec.name!r} has {len(rec.snapshots)} snapshots, the most a volume may "
            f"have: delete some first")
    rec = _none_pending(rec, new_head, now)
    return replace(rec, pending=new_head, pending_snap=snap, pending_until=until)


def request_shrink(rec: VolumeRecord, new_size: int, new_head: int, until: float = 0.0,
                   now: float | None = None) -> VolumeRecord:
    """Step one of a shrink: record the size and the head generation it makes, abandoned
    if it is not completed by `until` (unix time; 0: never). The gateway holding the lease
    completes it (complete_pending) once the writes under way to the old head have ended;
    with no lease holder, whoever asked for it does."""
    if new_size % rec.chunk_size:
        raise InvalidArgument(
            f"shrink to a multiple of the chunk size ({rec.chunk_size} bytes), not {new_size}"
        )
    rec = _none_pending(rec, new_head, now)
    return replace(rec, shrink_to=new_size, shrink_head=new_head, shrink_until=until)


def _none_pending(rec: VolumeRecord, new_head: int, now: float | None) -> VolumeRecord:
    """`rec` with no change in progress (one abandoned is cancelled), for a new one to
    `new_head`; InvalidArgument if one is still in progress."""
    if pending_head(rec):
        if not pending_abandoned(rec, now):
            what = f"a snapshot ({rec.pending_snap})" if rec.pending else "a shrink"
            raise InvalidArgument(f"{what} of {rec.name!r} is in progress")
        rec = cancel_pending(rec, pending_head(rec))
    if new_head <= rec.head:
        raise InvalidArgument("a new head generation must be newer than the current one")
    return rec


def pending_head(rec: VolumeRecord) -> int:
    """The head generation of the snapshot or shrink in progress (0: none)."""
    return rec.pending or rec.shrink_head


def pending_abandoned(rec: VolumeRecord, now: float | None = None) -> bool:
    """The snapshot or shrink in progress is past its time: whoever asked for it gave up
    without cancelling it (a killed `vbp volume snapshot` or `resize`), or will have by
    now. It must not be completed (a snapshot would hold what the volume holds whenever a
    gateway next comes, not what it held when asked for; a shrink would discard what was
    written since), nor keep other snapshots and shrinks out."""
    until = rec.pending_until if rec.pending else rec.shrink_until if rec.shrink_head else 0
    return bool(until and (time.time() if now is None else now) > until)


def complete_pending(rec: VolumeRecord, head: int, now: float | None = None) -> VolumeRecord:
    """Step two of the snapshot or shrink in progress that makes head `head`; `rec` as
    it is if none does (completed or cancelled meanwhile)."""
    if rec.pending == head:
        return complete_snapshot(rec, now)
    if rec.shrink_head == head:
        return shrink(cancel_pending(rec, head), rec.shrink_to, head)
    return rec


def cancel_pending(rec: VolumeRecord, head: int) -> VolumeRecord:
    """`rec` without the snapshot or shrink in progress that makes head `head`."""
    if rec.shrink_head == head:
        return replace(rec, shrink_to=0, shrink_head=0, shrink_until=0.0)
    return cancel_snapshot(rec, head)


def complete_snapshot(rec: VolumeRecord, now: float | None = None) -> VolumeRecord:
    """Step two: the head's chain is frozen under the pending name; writes go to the
    pending generation from now on."""
    if not rec.pending:
        return rec
    frozen = Snapshot(rec.pending_snap, rec.head, rec.chain, time.time() if now is None else now,
                      rec.size, rec.cuts)
    return replace(rec, head=rec.pending, chain=rec.chain + (rec.pending,),
                   snapshots=rec.snapshots + (frozen,), pending=0, pending_snap="",
                   pending_until=0.0)


def cancel_snapshot(rec: VolumeRecord, new_head: int) -> VolumeRecord:
    if rec.pending == new_head:
        return replace(rec, pending=0, pending_snap="", pending_until=0.0)
    return rec


def take_snapshot(rec: VolumeRecord, snap: str, new_head: int, now: float | None = None) -> VolumeRecord:
    """Both steps at once (no gateway to coordinate with)."""
    return complete_snapshot(request_snapshot(rec, snap, new_head), now)


def delete_snapshot(rec: VolumeRecord, snap: str) -> VolumeRecord:
    rec.snapshot(snap)
    return replace(rec, snapshots=tuple(s for s in rec.snapshots if s.name != snap))


def shrink(rec: VolumeRecord, new_size: int, new_head: int) -> VolumeRecord:
    """Shrink to a chunk-aligned size: a fresh head, and a cut hiding the old generations
    of every chunk past the new end."""
    if new_size % rec.chunk_size:
        raise InvalidArgument(
            f"shrink to a multiple of the chunk size ({rec.chunk_size} bytes), not {new_size}"
        )
    # (the newest of the chain: its head, but for a clone older code made of a snapshot
    # taken again during its creation, whose chain holds a newer generation)
    cut = (max(rec.chain), new_size // rec.chunk_size)
    return replace(rec, size=new_size, head=new_head, chain=rec.chain + (new_head,),
                   cuts=rec.cuts + (cut,))


def visible_chain(chain: tuple[int, ...], cuts: Cuts, index: int) -> tuple[int, ...]:
    """The generations a reader may see for chunk `index` (shrinks hide older ones)."""
    if not cuts:
        return chain
    return tuple(g for g in chain if not any(g <= bound and index >= first for bound, first in cuts))


@dataclass(frozen=True, slots=True)
class Reader:
    """Something that reads a lineage: a volume head or a snapshot."""

    chain: tuple[int, ...]
    cuts: Cuts
    size: int
    chunk_size: int


def readers(records) -> dict[str, list[Reader]]:
    """lineage -> every reader of it, from all volume records."""
    out: dict[str, list[Reader]] = {}
    for rec in records:
        rs = out.setdefault(rec.lineage, [])
        rs.append(Reader(rec.chain, rec.cuts, rec.size, rec.chunk_size))
        if rec.pending:  # the pending head may already hold writes
            rs.append(Reader(rec.chain + (rec.pending,), rec.cuts, rec.size, rec.chunk_size))
        for s in rec.snapshots:
            rs.append(Reader(s.chain, s.cuts, s.size or rec.size, rec.chunk_size))
    return out


def needed_gens(readers_of_lineage, index: int, present) -> set[int]:
    """Generations of chunk `index` (of those `present` locally) some reader needs."""
    present = set(present)
    needed: set[int] = set()
    for r in readers_of_lineage:
        if index * r.chunk_size >= r.size:
            continue
        for g in reversed(visible_chain(r.chain, r.cuts, index)):
            if g in present:
                needed.add(g)
                break
    return needed


def lacking(readers_of_lineage, index: int, held) -> dict[str, set[int]]:
    """Copies of chunk `index` that miss a generation some reader resolves to on another
    copy: host -> those generations. `held`: host -> the generations it holds. A copy
    misses one when a reader resolves there to an older generation of its chain (or to
    none) than on another copy. Generations freed by only some hosts' GC so far make no
    difference here: GC frees only what no reader resolves to (needed_gens)."""
    out: dict[str, set[int]] = {}
    for r in readers_of_lineage:
        if index * r.chunk_size >= r.size:
            continue
        chain = visible_chain(r.chain, r.cuts, index)
        at = {g: i for i, g in enumerate(chain)}
        resolved = {h: max((at[g] for g in gens if g in at), default=-1) for h, gens in held.items()}
        top = max(resolved.values(), default=-1)
        for h, i in resolved.items():
            if i < top:
                out.setdefault(h, set()).add(chain[top])
    return out


def clone_from(parent: VolumeRecord, snap: str, name: str, new_head: int, now: float | None = None) -> VolumeRecord:
    s = parent.snapshot(snap)
    check_name(name)
    if new_head <= max(s.chain):
        # (chains go oldest first: a shrink's cut hides generations by number)
        raise InvalidArgument("a clone's head generation must be newer than its snapshot's")
    return VolumeRecord(
        name=name,
        size=s.size or parent.size,
        replicas=parent.replicas,
        min_size=parent.min_size,
        chunk_size=parent.chunk_size,
        lineage=parent.lineage,
        head=new_head,
        chain=s.chain + (new_head,),
        cuts=s.cuts,
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
    size: int
    cuts: Cuts

    @property
    def gen(self) -> int:
        return self.chain[-1]


def same_volume(a: VolumeRecord, b: VolumeRecord) -> bool:
    """Whether two records of a name are of one volume, not of a volume deleted and another
    created under its name since: a new volume has a new lineage, and a clone (which keeps
    its parent's lineage) the time it was made."""
    return (a.lineage, a.created) == (b.lineage, b.created)


def view_of(rec: VolumeRecord, snap: str | None) -> View:
    if snap is None:
        return View(rec.name, rec, rec.chain, False, rec.size, rec.cuts)
    s = rec.snapshot(snap)
    return View(f"{rec.name}@{snap}", rec, s.chain, True, s.size or rec.size, s.cuts)


def read_size(d: dict) -> int:
    """The bytes of its lineage some reader of a volume record (dict) reaches: its head,
    or a snapshot taken before a shrink, which still reads past the head's end."""
    size = d["size"]
    return max([size] + [s.get("size") or size for s in d.get("snapshots", ())])


def read_chunks(d: dict) -> int:
    """The chunks of its lineage some reader of a volume record (dict) reaches: those
    below read_size."""
    return -(-read_size(d) // d["chunk_size"])


def replicas_by_lineage(records) -> dict[str, int]:
    """Lineage -> copies its chunks keep: the most any volume of the lineage (a volume and
    its clones share one) asks for. `records` are volume record dicts (registry)."""
    out: dict[str, int] = {}
    for d in records:
        out[d["lineage"]] = max(out.get(d["lineage"], 0), d["replicas"])
    return out


def min_size_by_lineage(records) -> dict[str, int]:
    """Lineage -> the fewest copies a write of any of its volumes is acknowledged with
    (the all-stale election's threshold, replicator.loss.last_current)."""
    out: dict[str, int] = {}
    for d in records:
        out[d["lineage"]] = min(out.get(d["lineage"], d["min_size"]), d["min_size"])
    return out
