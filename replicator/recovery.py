"""Resync: bring this host's stale copies of chunks current from a current replica.

Theory of operation (DESIGN.md, Failures: "a host that returns resyncs incrementally, never
by full copy"):
- A gateway that could not write a replica records it stale for that chunk in the registry
  (StaleRecord(lineage, index, host, version)). A host that crashed with unflushed writes
  records its own dirty chunks stale when it comes back (ChunkStore.recovered).
- The stale host runs this loop. For each of its records it picks a current source among
  the chunk's replicas (up, not stale), lists the generations the source holds, and for
  each generation compares per-page checksums: only pages that differ cross the network.
- While a chunk is resynced here, a write that would make a new generation of it here
  (the first write after a snapshot) is refused (replicator/replica.py): made from this
  copy's stale base, it would hold stale bytes no pass compares once the last one is done.
  The gateway records the copy stale again, which undoes the clear or makes it fail. As
  well, a clear after a refusal records the copy stale again here and it is not served as
  current: nothing then depends on the gateway's mark reaching the registry (no path
  without it is known; tests/sim/test_power_loss_election.py builds one by hand).
- Writes keep arriving while a chunk is resynced. A page is overwritten with the source's
  bytes only if its local checksum is still the one the diff was made against (the check
  and the write run without an await between them, so nothing interleaves); a page that
  changed meanwhile is left for the next pass. The record is cleared only after a pass that
  found nothing to copy, and only if no newer failure re-marked it (version check); the
  store is flushed first, so what the resync copied survives a power loss once the copy
  counts as current (no client flush covers it).
- A write reaches the replicas of a chunk in parallel, so it may have landed here and
  still be on its way to the source (delayed, or about to time out and get the source
  recorded stale). Copying the source's older pages over it would undo a write the
  gateway counts as taken here. So the bytes a client write reached less than
  `write_window` (longer than a peer timeout) before the pass began keep this copy's
  bytes when their pages are copied (the rest of those pages comes from the source),
  and no generation so written is made or dropped: the chunk waits for a later pass.
  Writes to the chunk's other generations do not count (only the head is written, and a
  generation is made by its first write, refused during a resync). Once such a write
  reached the source too, the pages are equal, so a busy chunk still converges, even
  under a guest writing part of a page again and again. Past the window,
  the write has landed on the source, or the source failed it and is recorded stale in
  the records the pass reads (it is then no source), or it was never acknowledged (a
  gateway does not acknowledge a write whose failures it recorded later than the window:
  VolumeGateway.write_window). A failed write's copies that took it without counting,
  this one among them, are recorded again in the transaction that records the failed
  ones, so a pass that read the records before cannot clear.
- A pass resyncs up to `parallel` chunks at once: a chunk's resync waits on round trips to
  its source, not on the disk. They share only what the pass read at its start (the
  records, the window's start); each works on its own (lineage, index), every generation
  of it, and its own record. A cleared record makes the copy current here at once
  (`_current_again`); the stale map is listed again once, at the end of the pass. A pass
  starts no chunk past `pass_time`: the `written` notes it leans on are forgotten only
  between passes, and a throttled pass over much data would keep every write's for hours.
- Reads never use a stale copy while a current one is reachable (replicator.gateway).
- A chunk every copy of which is stale, the one the election takes never current, has
  lost its last current copy (replicator.loss.unrecoverable): no copy is elected, it reads EIO, until
  an operator's `vbp volume accept-loss` removes the record of the copy to keep; the
  copies still stale resync from it as from any source, and log it (event=loss_accepted).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import trio

from replicator import messages as m
from vbp.chunkstore import flush_store
from vbp.errors import InvalidArgument, NoSpace, NotFound, VbpError
from vbp.layout import PAGE_SIZE, ChunkKey
from replicator.loss import (
    Miss, accepted_by_chunk, last_current, newest_lost, stale_by_chunk, unrecoverable,
)
# flags of a stale record: a backfill's (never current), a power loss's (lost unsynced writes)
from vbp.registry.base import LACKS_EARLIER, NEVER_CURRENT
from vbp.volume import accepted_losses, min_size_by_lineage, replicas_by_lineage

log = logging.getLogger("vbp.recovery")

MAX_RUN = 1024 * 1024  # bytes per read request during resync
MAX_PASSES = 4


@dataclass
class ResyncStats:
    chunks: int = 0
    bytes_copied: int = 0
    pages_compared: int = 0


def diff_runs(local: list[int], remote: list[int], max_pages: int) -> list[tuple[int, int, bool]]:
    """Runs (first page, page count, remote is hole) of pages whose checksums differ,
    split where the remote hole-ness changes and at max_pages."""
    out: list[tuple[int, int, bool]] = []
    start = -1
    hole = False
    for i, (a, b) in enumerate(zip(local, remote)):
        if a != b and start >= 0 and (b == 0) == hole and i - start < max_pages:
            continue
        if start >= 0:
            out.append((start, i - start, hole))
            start = -1
        if a != b:
            start, hole = i, b == 0
    if start >= 0:
        out.append((start, len(remote) - start, hole))
    return out


class ChunkBusy(Exception):
    """A client write reached this copy of the chunk within the write window."""


class Resync:
    def __init__(self, host_id: str, store, cluster, pool, registry, replica=None):
        self.host_id = host_id
        self.replica = replica  # its stale_self is kept in step with the registry
        self.store = store
        self.cluster = cluster
        self.pool = pool
        self.registry = registry
        self.stats = ResyncStats()
        # copies share disk and network with client I/O: at most `rate` bytes/s
        # (blockd.qos.TokenBucket; None: unlimited)
        self.limiter = None
        self.on_progress = None  # (chunks, bytes) still to bring current here; for metrics
        # Above this share of its capacity in use, the host takes no copy of a chunk it holds
        # nothing of (recovery, drain, rebalance wait; vbp pool status says so); resync of
        # chunks it already holds goes on (it needs no new slot).
        self.full_ratio = 1.0
        self.held_full = 0  # chunks held back by the last pass
        self.chunk_sizes: dict[str, int] = {}
        self.min_sizes: dict[str, int] = {}  # lineage -> min_size (the all-stale election's)
        self.write_window = 6.0  # seconds; blockd sets its peer timeout + 1
        # chunks resynced at once: each waits on round trips to its source, not on the
        # disk, so one at a time makes the recovery of many stale chunks latency bound
        self.parallel = 8
        # seconds after a pass began past which it starts no chunk (run_once), and the
        # chunk it started last (the next pass begins after it)
        self.pass_time = 30.0
        self._after: tuple[str, int] | None = None
        # the registry's stale_seq when a pass last found no record of this host's (None:
        # it found some): no record made since, no pass need list them again
        self._quiet_seq: int | None = None
        self._quiet_since = -math.inf  # writes after this are within the window
        self._unrecoverable: set[tuple[str, int]] = set()  # logged by _resync_all_stale
        # (lineage, index) -> (time, volume, host kept, reverted) of its newest accepted
        # loss (the lineages' loss records list the lowest chunks of each), the losses
        # with chunks past those listed, per lineage, and those logged here already
        self._accepted: dict[tuple[str, int], tuple[float, str, str, bool]] = {}
        self._unlisted: dict[str, list] = {}
        self._accepted_logged: set = set()
        # volume name -> the `lost` entry this process's backfill writes into its record
        # (_record_lost): the same one when a retried backfill writes it again, so that
        # the record holds it once
        self._lost_entries: dict[str, list] = {}

    async def replicas_by_lineage(self) -> dict[str, int]:
        vols = await self.registry.list_volumes()
        self.chunk_sizes = {d["lineage"]: d["chunk_size"] for d in vols}
        self.min_sizes = min_size_by_lineage(vols)
        return replicas_by_lineage(vols)

    async def _read_accepted(self) -> None:
        losses = await self.registry.list_losses()
        self._accepted = accepted_by_chunk(losses)
        self._unlisted = {}
        for lineage, d in losses.items():
            for a in accepted_losses(d):
                if a.count > len(a.chunks):
                    self._unlisted.setdefault(lineage, []).append(a)

    def _note_accepted(self, mine) -> None:
        """Log, once per chunk and process, an accepted loss (vbp volume accept-loss) of a
        chunk this copy is still stale for: it is brought to the copy the operator's
        command kept, older than what was acknowledged, or to holes. A loss of more chunks
        than its record lists is logged once, by the hosts stale for a chunk in its range."""
        for r in mine:
            key = (r.lineage, r.index)
            got = self._accepted.get(key)
            if got is None:
                self._note_unlisted(r)
                continue
            if (key, got[0]) in self._accepted_logged:
                continue
            self._accepted_logged.add((key, got[0]))
            when, volume, host, reverts = got
            log.warning("volume=%s event=loss_accepted lineage=%s chunk=%d source=%s action=%s "
                        "accepted_at=%s: the operator gave up the chunk's lost last copy; it %s",
                        volume, r.lineage, r.index, host, "reverted" if reverts else "zeroed",
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                        "goes back to the newest copy left, older than the acknowledged writes"
                        if reverts else "reads as holes: no copy of it was ever current")

    def _note_unlisted(self, r) -> None:
        for a in self._unlisted.get(r.lineage, ()):
            if a.low <= r.index <= a.high and (r.lineage, a.time) not in self._accepted_logged:
                self._accepted_logged.add((r.lineage, a.time))
                log.warning("volume=%s event=loss_accepted lineage=%s chunks=%d reverted=%d "
                            "zeroed=%d accepted_at=%s: the operator gave up the lost last copy of "
                            "chunks %d to %d (some); this host's stale copies of them resync from "
                            "the copies kept", a.volume, r.lineage, a.count, a.reverted, a.zeroed,
                            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.time)), a.low, a.high)

    async def mark_recovered(self, keys, lost=frozenset()) -> None:
        """After a crash, chunks that were dirty may miss writes the others have. Done
        before this host serves anything. Those of `lost` (ChunkStore.recovered_lost: a
        reboot, a power loss) may also have lost writes they took, and are recorded so
        (LACKS_EARLIER: replicator.loss.last_current)."""
        n_of = await self.replicas_by_lineage()
        done, flagged = set(), 0
        lost_chunks = {(k.lineage, k.index) for k in lost}
        for k in sorted(keys):
            chunk = (k.lineage, k.index)
            if n_of.get(k.lineage, 1) > 1 and chunk not in done:
                done.add(chunk)
                flag = LACKS_EARLIER if chunk in lost_chunks else 0
                flagged += bool(flag)
                await self.registry.mark_stale(k.lineage, k.index, [self.host_id],
                                               flag | time.time_ns())
        if done:
            log.info("event=crash_recovery stale_chunks=%d lost_unsynced=%d", len(done), flagged)
        # the store lists them at every open until now (blockd opens it keep_recovered): a
        # start that failed before this point, or a crash, must not lose them
        self.store.forget_recovered()
        await self.refresh_stale_self()

    async def refresh_stale_self(self, records=None) -> list:
        """Learn which of this host's copies are stale, so it never serves them as current."""
        if records is None:
            records = await self.registry.list_stale()
        mine = [r for r in records if r.host_id == self.host_id]
        if self.replica is not None:
            self.replica.stale_self = {(r.lineage, r.index) for r in mine}
        return mine

    async def backfill(self, retry: float = 2.0) -> int:
        """This host came back under its id with a new, empty store (blockd: a replaced
        disk): learn from every other host of the data set which chunks it holds, and
        from the registry which chunks have another copy recorded stale (that copy may
        hold nothing of a chunk whose current copy was here), record this host stale for
        each of them placed here, then serve as usual: resync brings them over. Until
        then Replica.backfilling makes every copy here count as stale. Waits (retrying)
        while a host that may hold chunks is down or too old to answer: its chunks cannot
        be known, and a copy missing here must never read as a hole. Returns the number
        of copies recorded stale."""
        while True:
            try:
                marked = await self._backfill_once()
            except VbpError as e:
                log.warning("event=backfill_retry error=%s", e)
                marked = None
            if marked is not None:
                return marked
            await trio.sleep(retry)

    async def _backfill_once(self) -> int | None:
        cmap = self.cluster.map
        n_of = await self.replicas_by_lineage()
        holders = (set(cmap.data_set) | set(cmap.prev or ())) - {self.host_id}
        found: set[tuple[str, int]] = set()
        for h in sorted(holders):
            rec = cmap.host(h)
            if rec is None:
                continue
            if not self.cluster.is_up(h) or rec.peer_rev < 3:
                log.info("event=backfill_waiting host=%s reason=%s", h,
                         "down" if not self.cluster.is_up(h) else "peer revision below 3")
                return None
            for lineage in sorted(n_of):
                reply = await self.pool.call(self.cluster.address(h), m.ChunkIndexes(lineage))
                found.update((lineage, i) for i in reply.indexes)
        # A chunk another copy of is recorded stale may have data that copy does not hold
        # (it missed the chunk's first writes): this one may have been its current copy.
        for r in await self.registry.list_stale():
            n = n_of.get(r.lineage)
            if n and r.host_id != self.host_id and r.host_id in self.cluster.replicas(r.lineage, r.index, n):
                found.add((r.lineage, r.index))
        marked = 0
        for lineage, index in sorted(found):
            if self.host_id in self.cluster.write_set(lineage, index, n_of[lineage]):
                await self.registry.mark_stale(lineage, index, [self.host_id],
                                               NEVER_CURRENT | time.time_ns())
                marked += 1
        await self.refresh_stale_self()
        await self._record_lost()
        return marked

    async def _record_lost(self) -> None:
        """A replicas=1 volume had the only copy of every chunk placed here on the old disk:
        no other host can say which existed, nor give them back, and they now read as
        zeros. Nothing else would tell, so each such volume's record says so (`lost`: this
        host, how many chunks were placed here, when; shown by `vbp volume show` and `vbp
        pool status`) and it is logged as an error: an upper bound, as a thin volume may
        not have written them all."""
        for d in await self.registry.list_volumes():
            if d["replicas"] != 1:
                continue
            placed = 0
            for i in range(-(-d["size"] // d["chunk_size"])):
                if self.host_id in self.cluster.write_set(d["lineage"], i, 1):
                    placed += 1
                if i % 4096 == 4095:
                    await trio.sleep(0)  # a large volume: let the daemon serve meanwhile
            if not placed:
                continue
            entry = self._lost_entries.get(d["name"])
            if entry is None:
                log.error("volume=%s event=data_lost chunks_placed_here=%d: replicas=1, their "
                          "only copies were on the replaced disk; they read as zeros now",
                          d["name"], placed)
                entry = self._lost_entries[d["name"]] = [self.host_id, placed, time.time()]

            def note(v, entry=entry):
                # (a backfill retried after this was written, or whose write's answer was
                # lost, writes it again: once is enough)
                had = [list(x) for x in v.get("lost", ())]
                return v if entry in had else {**v, "lost": [*had, entry]}
            try:
                await self.registry.update_volume(d["name"], note)
            except NotFound:  # deleted meanwhile: nothing left to warn about
                pass
            except InvalidArgument as e:
                # the record too large to grow (vbp.registry.base.VALUE_MAX): the log
                # says it; retrying would hold the whole backfill back for good
                log.error("volume=%s event=data_lost_not_recorded error=%s", d["name"], e)

    async def run_once(self) -> int:
        """One pass over this host's stale records; returns how many were cleared."""
        if self.replica is not None:
            now = self.replica.now()
            self._quiet_since = now - self.write_window
            self.replica.forget_written(self._quiet_since)  # what the window passed
            self.replica.forget_recent()
        # Every creation of a stale record puts stale_seq: read before the listing, so a
        # record made after it moves it again. With none of ours listed at that seq and
        # no record made since, none of ours exists (the pool's may be many: a host down
        # for long leaves one for each chunk of its written meanwhile).
        seq = await self.registry.stale_seq()
        if seq == self._quiet_seq and self.replica is not None and not self.replica.stale_self:
            return 0
        records = await self.registry.list_stale()
        mine = await self.refresh_stale_self(records)
        self._progress(mine)
        self._quiet_seq = None if mine else seq
        if not mine:
            self.held_full = 0  # (none left to hold back: `vbp pool status` says so)
            return 0
        # a copy recorded stale by a backfill was never current (see _resync_all_stale)
        stale_hosts = stale_by_chunk(records, self.cluster.map)
        n_of = await self.replicas_by_lineage()
        await self._read_accepted()
        self._note_accepted(mine)
        cleared = 0
        st = self.store.stats()
        held: set[tuple[str, int]] = set()
        if st.capacity and st.used >= self.full_ratio * st.capacity:
            have = {(k.lineage, k.index) for k in self.store.keys()}
            held = {(r.lineage, r.index) for r in mine if (r.lineage, r.index) not in have}
            if held:
                log.warning("event=recovery_held reason=full used=%d capacity=%d chunks=%d",
                            st.used, st.capacity, len(held))
        self.held_full = len(held)
        # No chunk starts past pass_time: the notes of every write this host takes, to any
        # chunk, are kept from the window's start until the next pass (a throttled pass
        # over much data would keep them for hours). That pass begins after the last
        # chunk started here, so no record waits behind ones that keep failing.
        until = trio.current_time() + self.pass_time
        after = self._after

        todo = [r for r in mine if (r.lineage, r.index) not in held]
        if after is not None:
            todo.sort(key=lambda r: ((r.lineage, r.index) <= after, r.lineage, r.index))
        # `parallel` workers take the records in turn: a task per record, spawned at
        # once, cost a host stale for tens of thousands of chunks (one joining the pool)
        # that many tasks every pass, on the event loop
        queue = iter(todo)

        async def worker() -> None:
            nonlocal cleared
            for r in queue:
                if trio.current_time() > until:
                    return
                self._after = (r.lineage, r.index)
                cleared += await self._resync_record(r, n_of.get(r.lineage), stale_hosts[(r.lineage, r.index)])

        async with trio.open_nursery() as nursery:
            for _ in range(min(max(1, self.parallel), len(todo))):
                nursery.start_soon(worker)
        self._progress(await self.refresh_stale_self())
        return cleared

    async def _resync_record(self, r, n: int | None, stale: dict[str, Miss]) -> bool:
        """Bring the copy one record names current and remove the record; True if done."""
        if n is None:  # the lineage is gone: nothing to bring current
            await self.registry.clear_stale(r.lineage, r.index, self.host_id, r.version)
            return False
        key = (r.lineage, r.index)
        rep = self.replica
        if rep is not None:
            rep.resyncing.add(key)
        try:
            if not await self.resync_chunk(r.lineage, r.index, n, stale):
                return False
            # What the resync copied is durable before the copy counts as current again: a
            # power loss after the clear would otherwise take bytes no flush of a client
            # covers (the gateway flushes the writes it sent), and this copy, recorded stale
            # again by its crash recovery, might be the one an all-stale election picks.
            await flush_store(self.store)
            if await self.registry.clear_stale(r.lineage, r.index, self.host_id, r.version):
                if rep is not None and key in rep.refused:
                    # a generation this resync never compared is missing here (the gateway's
                    # mark cannot undo the clear when it came first; a mark that came before
                    # it moved the record's version, and the clear failed): stale again, and
                    # never served as current
                    # (LACKS_EARLIER: the record is newer than the write it misses, and the
                    # all-stale election must not take it for whole: replicator.loss)
                    log.info("event=resync_missed_generation lineage=%s chunk=%d", r.lineage, r.index)
                    await self.registry.mark_stale(r.lineage, r.index, [self.host_id],
                                                   LACKS_EARLIER | time.time_ns())
                    return False
                self._current_again(r.lineage, r.index)
            return True
        except VbpError as e:  # one chunk failing must not stop the others
            log.warning("event=resync_failed lineage=%s chunk=%d error=%s", r.lineage, r.index, e)
            return False
        finally:
            if rep is not None:
                rep.resyncing.discard(key)
                rep.refused.discard(key)

    def _current_again(self, lineage: str, index: int) -> None:
        """This pass removed the copy's record: serve it as current now, not at the next
        listing. (A listing per cleared chunk would cost a pass over n records n listings
        of n, and with chunks resynced at once two listings could land out of order, the
        older one forgetting a record made in between.)"""
        if self.replica is not None and not self.replica.backfilling:
            self.replica.stale_self.discard((lineage, index))

    def _progress(self, mine) -> None:
        if self.on_progress is not None:
            self.on_progress(len(mine), sum(self.chunk_sizes.get(r.lineage, 0) for r in mine))

    async def resync_chunk(self, lineage: str, index: int, n: int, stale: dict[str, Miss]) -> bool:
        """`stale`: the hosts recorded stale for the chunk -> their record (replicator.loss.Miss:
        when it was made, and its flags)."""
        try:
            return await self._resync_chunk(lineage, index, n, stale)
        except ChunkBusy:
            log.info("event=resync_deferred lineage=%s chunk=%d reason=recent_write", lineage, index)
            return False

    def _check_quiet(self, lineage: str, index: int, gen: int, start: int = 0,
                     end: int | None = None) -> None:
        """Raise ChunkBusy if a client write to generation `gen` of the chunk may still be
        on its way to the source (see the theory of operation). Called right before a
        local change to that generation, with no await between, so no write slips in
        after the check. Writes to the chunk's other generations cannot be undone by it:
        a generation is written only while it is the head, and made only by its first
        write (which a resync refuses meanwhile). Counting them, a guest writing the
        head kept a snapshot's generation missing here from being made for good."""
        if self._recent_writes(lineage, index, gen, start, end):
            raise ChunkBusy()

    def _recent_writes(self, lineage: str, index: int, gen: int, start: int = 0,
                       end: int | None = None) -> list[tuple[int, int]]:
        """(start, end) of each client write to generation `gen` of the chunk that
        reached this copy since the pass's window began (`_quiet_since`), of those
        overlapping [start, end) (`end` None: anywhere in the chunk)."""
        if self.replica is None:
            return []
        quiet = self._quiet_since
        return [(a, b) for t, a, b, g in self.replica.written.get((lineage, index), ())
                if t > quiet and g == gen and (end is None or (a < end and start < b))]

    def _keep_recent(self, lineage: str, index: int, gen: int, key: ChunkKey, off: int,
                     length: int, data):
        """The bytes to write over [off, off+length) of generation `gen` here, `data`
        the source's (None: holes): those, but where a client write to the generation
        reached this copy within the write window (it may still be on its way to the
        source), this copy's own bytes, which hold it (see the theory of operation).
        Called right before the write, with no await between. Deferring the whole run
        instead, a stale page that a guest kept writing a part of (a 512-byte sector) at
        least once a window never converged: its other bytes stayed the stale ones.
        ChunkBusy if this copy's bytes there cannot be read."""
        end = off + length
        keep = [(max(a, off), min(b, end))
                for a, b in self._recent_writes(lineage, index, gen, off, end)]
        if not keep:
            return data
        buf = bytearray(length) if data is None else bytearray(data)
        try:
            for a, b in keep:
                buf[a - off:b - off] = self.store.read(key, a, b - a)
        except (NotFound, VbpError):  # (a page here that fails its checksum: not now)
            raise ChunkBusy() from None
        return bytes(buf)

    async def _resync_chunk(self, lineage: str, index: int, n: int, stale: dict[str, Miss]) -> bool:
        # Complete copies only. A target that joined in a data-set change has no record
        # until the change's scan (or a gateway's first write) marks it, and until then it
        # looks current while it holds nothing: as a source it would make this copy drop
        # what it holds (_drop_divergent) and count as current.
        complete = self.cluster.replicas(lineage, index, n)
        sources = [h for h in complete
                   if h != self.host_id and h not in stale and self.cluster.is_up(h)]
        if not sources:
            if self.host_id in complete and all(h in stale for h in complete):
                return await self._resync_all_stale(lineage, index, complete, stale,
                                                    self.cluster.joining(lineage, index, n))
        for src in sources:
            try:
                if (await self._sync_from(self.cluster.address(src), lineage, index)
                        and await self._still_current(lineage, index, src)):
                    self.stats.chunks += 1
                    log.info("event=resynced lineage=%s chunk=%d source=%s", lineage, index, src)
                    return True
            except NoSpace as e:  # this host's disk: no other source would do better
                log.warning("event=resync_no_space lineage=%s chunk=%d source=%s error=%s",
                            lineage, index, src, e)
                return False
            except VbpError as e:
                log.warning("event=resync_source_failed lineage=%s chunk=%d source=%s error=%s",
                            lineage, index, src, e)
        return False

    async def _still_current(self, lineage: str, index: int, src: str) -> bool:
        """Whether `src`, which this copy was just brought level with, still has no stale
        record. Its holes and generations were taken on its word, and it may have become
        stale since this pass listed the records: a restart that lost unsynced writes (its
        crash recovery marks it before it serves again) or a failed write. Then this copy
        stays stale too, and a later pass takes it from a copy that is current."""
        if any(r.host_id == src for r in await self.registry.list_stale(lineage, index)):
            log.warning("event=resync_source_stale lineage=%s chunk=%d source=%s", lineage,
                        index, src)
            return False
        return True

    async def _resync_all_stale(self, lineage: str, index: int, complete, stale,
                                joining=()) -> bool:
        """Every copy of the chunk is recorded stale (failures through gateways of
        different volumes of the lineage, a crash, a write no current copy took), so no
        copy is a plain source. The chunk is brought to the copy that went stale last
        (its record is the newest: `stale[host]` is the registry revision that created
        it): while it was current, every acknowledged write reached it (a write counts a
        copy toward min_size only if no record names it once the write's failures are
        recorded, replicator.gateway), and since it went stale no write could be
        acknowledged, as no current copy was left. Versions cannot choose: a stale copy
        keeps taking writes that then fail below min_size, so the copy that missed an
        acknowledged write may be the one with the most writes. Generations that copy
        lacks hold only unacknowledged writes here and go.
        Every stale host elects the same copy: the election reads the registry's records
        alone. It goes on while copies other than the one it takes are down: a record's
        age is fixed when it is made (later failures move its version, not its age), and
        what may still come to a down copy's record, its crash recovery's LACKS_EARLIER or
        a backfill's NEVER_CURRENT, only passes over that copy more, so never changes a
        choice that was not that copy. The copy taken is waited for while its host is
        down: it may hold writes that no other copy holds.
        A copy that lost its unflushed writes in a power loss is passed over for the
        newest that did not, unless min_size such copies went stale after that one
        (replicator.loss.last_current).
        A copy a backfill recorded (a new, empty disk) is never elected. If the election
        takes it, that copy was current when its disk was lost, and with it the only
        copy of writes the others missed: no copy left holds them, and the chunk stays
        unreadable (EIO) rather than be brought to an older one, or to holes."""
        k = self.min_sizes.get(lineage, 1)
        best = last_current(complete, stale, k)
        if newest_lost(complete, stale, k):
            if not unrecoverable(complete, stale, k, joining):
                return False  # a joining target holds it: reads go there once the change completes
            if (lineage, index) in self._unrecoverable:
                return False
            self._unrecoverable.add((lineage, index))
            log.error("event=chunk_unrecoverable lineage=%s chunk=%d last_current=%s: every copy "
                      "is stale and the newest was on a replaced disk (`vbp volume accept-loss` "
                      "gives it up)", lineage, index, best)
            return False
        self._unrecoverable.discard((lineage, index))
        if best != self.host_id and not self.cluster.is_up(best):
            return False
        if best == self.host_id:
            self.stats.chunks += 1
            log.info("event=resynced_all_stale lineage=%s chunk=%d source=self", lineage, index)
            return True
        if await self._sync_from(self.cluster.address(best), lineage, index, allow_stale=True):
            self.stats.chunks += 1
            log.info("event=resynced_all_stale lineage=%s chunk=%d source=%s", lineage, index, best)
            return True
        return False

    async def _sync_from(self, addr: str, lineage: str, index: int, *, allow_stale: bool = False) -> bool:
        """Passes over the source's generations of the chunk until one changes nothing here.
        Each pass asks the source for its generations anew: a snapshot taken during the
        resync makes a new head, and the first write to it copies the chunk up here from
        this copy's own (stale) base. Had the list been taken once, that generation would
        be compared by no pass and the record cleared over it."""
        for _ in range(MAX_PASSES):
            gens = (await self.pool.call(addr, m.ChunkGens(lineage, index))).gens
            changed = 0
            for g in gens:
                changed += await self._sync_gen(addr, lineage, index, g, allow_stale=allow_stale)
            changed += await self._drop_divergent(addr, lineage, index, gens)
            if not changed:
                return True
        return False

    async def _drop_divergent(self, addr: str, lineage: str, index: int, gens) -> int:
        """Generations held here but not by the current source hold writes that were never
        acknowledged (e.g. taken by a gateway that was partitioned away and then fenced):
        they go. A generation is dropped only if the source still lacks it on a second look
        and no write touched it in between, so a chunk a current gateway is creating right
        now is never removed. Returns the generations dropped, plus those the source gained
        since `gens` was listed or a write changed meanwhile: this pass compared none of
        them, so it is not the last."""
        local = [ChunkKey(lineage, index, g) for g in self.store.gens(lineage, index)
                 if g not in gens]  # (the chunk's own: no walk over every key held)
        if not local:
            return 0
        before = {k: self._local_sums(k, 0) for k in local}
        again = set((await self.pool.call(addr, m.ChunkGens(lineage, index))).gens)
        # a generation the source's GC collected (read by no volume, snapshot or clone any
        # more) is marked here too before it goes: a reader still at its deleted volume
        # gets the same error from this copy as from the source, not older bytes
        collected = await self._collected_on(addr, lineage)
        if collected:
            self.store.mark_collected({lineage: set(collected)})
        changed = 0
        for k in local:
            if self.store.info(k) is None:
                continue
            if k.gen in again or self._local_sums(k, 0) != before[k]:
                changed += 1  # new on the source too, or written meanwhile: look again
                continue
            self._check_quiet(lineage, index, k.gen)
            self.store.delete(k)
            changed += 1
            log.info("event=divergent_dropped lineage=%s chunk=%d gen=%d", lineage, index, k.gen)
        return changed

    async def _collected_on(self, addr: str, lineage: str) -> tuple[int, ...]:
        """The generations of `lineage` the host at `addr` marked collected (CollectedGens);
        none from a host below COLLECTED_REV."""
        h = self.cluster.host_at(addr)
        rec = self.cluster.map.host(h) if h is not None else None
        if rec is None or rec.peer_rev < m.COLLECTED_REV:
            return ()
        return (await self.pool.call(addr, m.CollectedGens(lineage))).gens

    def _local_sums(self, key: ChunkKey, pages: int) -> tuple[int, list[int]]:
        try:
            return self.store.page_checksums(key)
        except NotFound:
            return 0, [0] * pages

    async def _sync_gen(self, addr: str, lineage: str, index: int, gen: int, *,
                        allow_stale: bool = False) -> int:
        """Copy the pages of one generation that differ; returns the pages copied or left
        for the next pass (0: this generation is in step with the source)."""
        st = await self.pool.call(addr, m.ChunkState(lineage, index, gen))
        if not st.exists:
            return 0
        key = ChunkKey(lineage, index, gen)
        remote = list(st.checksums)
        chunk_size = len(remote) * PAGE_SIZE
        _, local = self._local_sums(key, len(remote))
        self.stats.pages_compared += len(remote)
        copied = 0
        if self.store.info(key) is None:
            # The source holds this generation: absent here, reads would fall through to
            # an older one. One of holes only (a copy-up whose written pages were all
            # zeroed or trimmed since) has no run to copy below: it is made here, empty,
            # and the next pass compares it again.
            self._check_quiet(lineage, index, gen)
            self.store.zero(key, 0, chunk_size, chunk_size=chunk_size, version=st.version or None)
            copied += 1
        for first, count, hole in diff_runs(local, remote, MAX_RUN // PAGE_SIZE):
            off, length = first * PAGE_SIZE, count * PAGE_SIZE
            data = None
            if not hole:
                if self.limiter is not None and (d := self.limiter.delay_for(length)):
                    await trio.sleep(d)
                try:
                    reply = await self.pool.call(addr, m.ReadChunk(
                        "", lineage, index, (gen,), off, length, self.cluster.epoch,
                        allow_stale=allow_stale))
                except NotFound:  # (its GC collected the generation: gone, as below)
                    reply = None
                if reply is None or reply.gen != gen:
                    copied += count  # the source lost this generation meanwhile: not clean
                    continue
                data = reply.data
            data = self._keep_recent(lineage, index, gen, key, off, length, data)
            if not write_pages_if_unchanged(self.store, key, chunk_size, first,
                                            local[first:first + count], data,
                                            min_version=st.version):
                # a newer write landed meanwhile: the next pass looks again (counted, so
                # that this pass is not taken for one that found nothing to copy)
                copied += count
                continue
            if not hole:
                self.stats.bytes_copied += length
            copied += count
        return copied


def write_pages_if_unchanged(store, key: ChunkKey, chunk_size: int, first: int, expect,
                             data, *, min_version: int = 0, expect_version: int | None = None,
                             fua: bool = False) -> bool:
    """Overwrite pages [first, first+len(expect)) of `key` with `data` (None: make them
    holes) only if their stored checksums are still `expect` (and the chunk's version still
    `expect_version`, when given). Synchronous, no await between the check and the write,
    so no other write interleaves: a page changed since the caller looked is left alone
    (returns False) and the caller looks again. Used by resync and by scrub repairs. The
    version becomes max(current, min_version): a copy never goes back in version."""
    count = len(expect)
    try:
        version, now = store.page_checksums(key)
    except NotFound:
        version, now = 0, [0] * (chunk_size // PAGE_SIZE)
    if list(now[first:first + count]) != list(expect):
        return False
    if expect_version is not None and version != expect_version:
        return False
    version = max(version, min_version) or None
    off, length = first * PAGE_SIZE, count * PAGE_SIZE
    if data is None:
        if store.info(key) is not None:
            store.zero(key, off, length, chunk_size=chunk_size, version=version, fua=fua)
    else:
        store.write(key, off, data, chunk_size=chunk_size, version=version, fua=fua)
    return True
