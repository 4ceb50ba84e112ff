"""Unrecoverable chunks and accepted losses: the rule that says which copy of a chunk
whose copies are all stale holds every acknowledged write, or that none does, shared by
resync (replicator.recovery), `vbp pool status` and `vbp volume accept-loss`
(control.api), so that it is written once.

Theory of operation (DESIGN.md, Failures; Ceph's `mark_unfound_lost revert`):
- A chunk whose copies are all recorded stale is brought to the copy that went stale last
  (its record was made last: while it was current it took every acknowledged write;
  Resync._resync_all_stale). Since then no write was acknowledged: that needs min_size
  copies current when its failures are recorded, and every such copy went stale later.
- Unless that copy's record says it may lack writes acknowledged before it was made
  (LACKS_EARLIER): its crash recovery after a reboot (a power loss took what it took
  since its last flush), or a resync that cleared it and then found a generation it had
  not compared. A copy recorded before it may then hold more: the newest copy that lacks
  nothing (a "whole" one) holds every write acknowledged before its record; one
  acknowledged after it was taken by min_size copies recorded later. So the election
  takes the newest whole copy, unless min_size records are newer than it: then writes
  may have been acknowledged (and flushed) on those alone, and it takes the newest,
  which lost only unflushed writes (what a power loss of every copy that held them may
  lose). With min_size 1 a single record decides, and the gateway keeps it so: the copy
  a new failure leaves the one current copy of a chunk answers a ping before the
  failure is recorded and syncs after, before the write counts
  (replicator.gateway._still_answering, _synced_sole); a write no copy took leaves none
  current (_falling_behind). Ties (copies recorded by one failure, in one transaction)
  are not "newer".
  Hosts of an older peer revision elect the newest record whatever its flags, and every
  host must elect the same copy: the flag is read only once every host of the pool is
  at LACKS_REV (stale_by_chunk).
- A record a backfill made (NEVER_CURRENT: a new, empty disk under an old host id) is of
  a copy that was never current. If the election takes it (its record is the newest),
  the copy on the old disk held writes no copy left holds: the chunk is
  *unrecoverable*, and no copy is elected (it reads EIO, never older bytes or zeros,
  unless an operator says otherwise).
- The operator's way out (control.api.accept_loss) keeps one copy: the newest that was
  current once (the chunk goes back to older bytes, or to what a power loss left), else
  the first in placement order (it holds nothing acknowledged: the chunk is lost, it
  reads as holes). Its record is removed, the others resync from it. The lineage's loss record
  keeps what was given up (vbp.volume.AcceptedLoss); hosts whose copies resync from it
  log it.
- Everything here is a pure function of registry contents (stale records, the cluster
  map, volume record dicts): `stale` maps are {host: Miss}, `min_size` the lineage's
  (min_size_by_lineage).
"""

from __future__ import annotations

from typing import NamedTuple

from replicator.messages import LACKS_REV
from replicator.view import ClusterView
from vbp.registry.base import LACKS_EARLIER, NEVER_CURRENT
from vbp.volume import accepted_losses, min_size_by_lineage, read_chunks, replicas_by_lineage


class Miss(NamedTuple):
    """A stale record as the election reads it."""

    since: int  # the registry revision that made the record: when the copy went stale
    never: bool = False  # NEVER_CURRENT: a backfill's, the copy was never current
    lacks: bool = False  # LACKS_EARLIER: the copy may lack writes from before `since`


def miss_of(r, lacks: bool = True) -> Miss:
    """A stale record's entry in a chunk's `stale` map (Resync.resync_chunk); its
    LACKS_EARLIER flag read only if `lacks`."""
    return Miss(r.since, bool(r.version & NEVER_CURRENT), lacks and bool(r.version & LACKS_EARLIER))


def reads_lacks(cmap) -> bool:
    """Whether the election reads LACKS_EARLIER under `cmap`: every host of the pool is
    at LACKS_REV (a host of an older revision elects the newest record, and a copy each
    of two hosts elected would count as current on both)."""
    return all(h.peer_rev >= LACKS_REV for h in cmap.hosts)


def stale_by_chunk(records, cmap) -> dict[tuple[str, int], dict[str, Miss]]:
    """(lineage, index) -> {host: miss_of(record)} over stale records, as every host of
    `cmap` elects (reads_lacks)."""
    lacks = reads_lacks(cmap)
    out: dict[tuple[str, int], dict[str, Miss]] = {}
    for r in records:
        out.setdefault((r.lineage, r.index), {})[r.host_id] = miss_of(r, lacks)
    return out


def _newest(hosts, complete, stale: dict[str, Miss]) -> str:
    """The copy of `hosts` whose record is the newest (ties: the first in placement order)."""
    return max(hosts, key=lambda h: (stale[h].since if h in stale else 0, -complete.index(h)))


def last_current(complete, stale: dict[str, Miss], min_size: int) -> str:
    """The copy of `complete` (all recorded stale) that the election takes: the newest
    record, unless it may lack earlier writes; then the newest whole copy (lacking
    nothing, current once), unless min_size records are newer than that one; then the
    newest. See the theory of operation."""
    newest = _newest(complete, complete, stale)
    if not stale[newest].lacks:
        return newest
    whole = [h for h in complete if not (stale[h].lacks or stale[h].never)]
    if whole:
        best = _newest(whole, complete, stale)
        if sum(1 for h in complete if stale[h].since > stale[best].since) < min_size:
            return best
    return newest


def newest_lost(complete, stale: dict[str, Miss], min_size: int) -> bool:
    """Every complete copy of the chunk is recorded stale and the election takes a copy
    that was never current (a replaced disk's backfill): resync elects none of them (the
    others miss acknowledged writes)."""
    return (bool(complete) and all(h in stale for h in complete)
            and stale[last_current(complete, stale, min_size)].never)


def unrecoverable(complete, stale: dict[str, Miss], min_size: int, joining=()) -> bool:
    """newest_lost, and no joining target (a change of data set under way) is without a
    record: such a target resynced from a current copy (its record cleared) and took
    every write since, so it holds every acknowledged write; the chunk reads EIO only
    until the change completes and reads go to it. Otherwise the last current copy went
    with its disk, no copy left holds every acknowledged write, and the chunk reads EIO
    until an operator accepts the loss (control.api.accept_loss). The one rule of it,
    for resync, `vbp pool status` and `vbp volume accept-loss`."""
    return newest_lost(complete, stale, min_size) and all(h in stale for h in joining)


def revert_source(complete, stale: dict[str, Miss]) -> tuple[str, bool]:
    """The copy an accepted loss brings the others to, and whether it was ever current:
    the newest of those that were (older than the acknowledged bytes, or short of what
    a power loss took, but the newest left); with none, the first in placement order (it
    holds nothing acknowledged: the chunk is lost and reads as holes, but for what writes
    that failed since left on it)."""
    once = [h for h in complete if not stale[h].never]
    if once:
        return _newest(once, complete, stale), True
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

    n_of, min_of = replicas_by_lineage(volumes), min_size_by_lineage(volumes)
    view = ClusterView(cmap)
    out = []
    for (lineage, index), stale in sorted(stale_by_chunk(records, cmap).items()):
        n = n_of.get(lineage)
        if not n:
            continue
        complete, k = view.replicas(lineage, index, n), min_of[lineage]
        if not unrecoverable(complete, stale, k, view.joining(lineage, index, n)):
            continue
        source, reverts = revert_source(complete, stale)
        out.append({"lineage": lineage, "index": index,
                    "volumes": sorted(d["name"] for d in volumes if d["lineage"] == lineage
                                      and index < read_chunks(d)),
                    "copies": list(complete), "last_current": last_current(complete, stale, k),
                    "source": source, "reverts": reverts})
    return out
