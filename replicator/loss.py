"""Unrecoverable chunks and accepted losses: the rule that says a chunk's last current copy
is gone, shared by resync (replicator.recovery), `vbp pool status` and `vbp volume
accept-loss` (control.api), so that it is written once.

Theory of operation (DESIGN.md, Failures; Ceph's `mark_unfound_lost revert`):
- A chunk whose copies are all recorded stale is brought to the copy that went stale last
  (its record was made last: while it was current it took every acknowledged write;
  Resync._resync_all_stale). A record a backfill made (NEVER_CURRENT: a new, empty disk
  under an old host id) is of a copy that was never current. If it is the newest, the
  copy on the old disk was the last current one, and with it went writes no other copy
  holds: the chunk is *unrecoverable*, and no copy is elected (it reads EIO, never older
  bytes or zeros, unless an operator says otherwise).
- The operator's way out (control.api.accept_loss) keeps one copy: the newest that was
  current once (the chunk goes back to older bytes), else the first in placement order
  (it holds nothing acknowledged: the chunk is lost, it reads as holes). Its record is
  removed, the others resync from it. The lineage's loss record keeps what was given up
  (vbp.volume.AcceptedLoss); hosts whose copies resync from it log it.
- Everything here is a pure function of registry contents (stale records, the cluster
  map, volume record dicts): `stale` maps are {host: since_of(record)}.
"""

from __future__ import annotations

from vbp.registry.base import NEVER_CURRENT
from vbp.volume import accepted_losses, read_chunks, replicas_by_lineage


def since_of(r) -> int:
    """A stale record's place in a chunk's `stale` map (Resync.resync_chunk): when it was
    made (`since`), or ~since (below 0) for a copy recorded never current (a backfill's)."""
    return ~r.since if r.version & NEVER_CURRENT else r.since


def stale_by_chunk(records) -> dict[tuple[str, int], dict[str, int]]:
    """(lineage, index) -> {host: since_of(record)} over stale records."""
    out: dict[tuple[str, int], dict[str, int]] = {}
    for r in records:
        out.setdefault((r.lineage, r.index), {})[r.host_id] = since_of(r)
    return out


def last_current(complete, stale: dict[str, int]) -> str:
    """The copy of `complete` whose record is the newest (ties: the first in placement
    order): when every copy is stale, the one that went stale last (_resync_all_stale)."""
    def since(h: str) -> int:
        s = stale.get(h, 0)
        return ~s if s < 0 else s

    return max(complete, key=lambda h: (since(h), -complete.index(h)))


def newest_lost(complete, stale: dict[str, int]) -> bool:
    """Every complete copy of the chunk is recorded stale and the newest record is of a
    copy that was never current (a replaced disk's backfill): resync elects none of them
    (the newest of the others misses acknowledged writes)."""
    return (bool(complete) and all(h in stale for h in complete)
            and stale[last_current(complete, stale)] < 0)


def unrecoverable(complete, stale: dict[str, int], joining=()) -> bool:
    """newest_lost, and no joining target (a change of data set under way) is without a
    record: such a target resynced from a current copy (its record cleared) and took
    every write since, so it holds every acknowledged write; the chunk reads EIO only
    until the change completes and reads go to it. Otherwise the last current copy went
    with its disk, no copy left holds every acknowledged write, and the chunk reads EIO
    until an operator accepts the loss (control.api.accept_loss). The one rule of it,
    for resync, `vbp pool status` and `vbp volume accept-loss`."""
    return newest_lost(complete, stale) and all(h in stale for h in joining)


def revert_source(complete, stale: dict[str, int]) -> tuple[str, bool]:
    """The copy an accepted loss brings the others to, and whether it was ever current:
    the newest of those that were (what the all-stale election would take with the lost
    copy left out: older than the acknowledged bytes, but the newest left); with none,
    the first in placement order (it holds nothing acknowledged: the chunk is lost and
    reads as holes, but for what writes that failed since left on it)."""
    once = [h for h in complete if stale.get(h, 0) >= 0]
    if once:
        return last_current(once, stale), True
    return complete[0], False


def accepted_by_chunk(losses: dict[str, dict]) -> dict[tuple[str, int], tuple[float, str, str, bool]]:
    """(lineage, index) -> (time, volume, host kept, reverted) of the newest accepted loss
    that lists the chunk, over the lineages' loss records (Registry.list_losses; a record
    lists the lowest chunks of each loss, and counts the others)."""
    out: dict[tuple[str, int], tuple[float, str, str, bool]] = {}
    for lineage, d in losses.items():
        for a in accepted_losses(d):
            for index, host, reverts in a.chunks:
                key = (lineage, index)
                if key not in out or out[key][0] < a.time:
                    out[key] = (a.time, a.volume, host, reverts)
    return out


def unrecoverable_chunks(cmap, records, volumes: list[dict]) -> list[dict]:
    """The chunks `unrecoverable` names, from the registry alone: the cluster map, the
    stale records and the volume records (dicts). Each: lineage, index, the volumes of
    the lineage it lies in, the copy lost last (`last_current`), the copy accept-loss
    would keep (`source`) and whether that one was ever current (`reverts`: else the
    chunk is declared lost)."""
    from replicator.gateway import ClusterView  # a view of this map, not a host's

    n_of = replicas_by_lineage(volumes)
    view = ClusterView(cmap)
    out = []
    for (lineage, index), stale in sorted(stale_by_chunk(records).items()):
        n = n_of.get(lineage)
        if not n:
            continue
        complete = view.replicas(lineage, index, n)
        if not unrecoverable(complete, stale, view.joining(lineage, index, n)):
            continue
        source, reverts = revert_source(complete, stale)
        out.append({"lineage": lineage, "index": index,
                    "volumes": sorted(d["name"] for d in volumes if d["lineage"] == lineage
                                      and index < read_chunks(d)),
                    "copies": list(complete), "last_current": last_current(complete, stale),
                    "source": source, "reverts": reverts})
    return out
