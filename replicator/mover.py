"""The data-set controller of a blockd host (DataSetMover): the controller step, the scan
of the chunks a change of data set moves, and the freeing of misplaced copies. Theory of
operation, and the planning it runs (what data set, which weights, what blocks a change):
replicator.migration, which has no trio in it, so that the command line (`vbp pool
status`, host drain and out) can plan without loading the data path."""

from __future__ import annotations

import logging
import math
import time

import trio

from replicator import messages as m
from replicator.migration import (
    DOWN_LOOK_GAP, DOWN_OUT_INTERVAL, LIST_STEP, RAISE_SAMPLE, WEIGHTS_REV, _Projection,
    _replaced, blocking, down_unscanned, joining_holders, owed_by_host, pending_free,
    placed_count, sole_holders, stats_current, wanted_data_set, wanted_weights)
from replicator.view import ClusterView
from vbp.cluster import HOST_DOWN, ClusterMap, live_places, weight_pairs
from vbp.errors import NotFound, VbpError
from vbp.layout import ChunkKey
from vbp.registry.base import NEVER_CURRENT
from vbp.volume import min_size_by_lineage, read_size, replicas_by_lineage

log = logging.getLogger("vbp.migration")  # (the name its messages always had)


class DataSetMover:
    """One host's part: the controller step, the scan, and freeing misplaced copies."""

    def __init__(self, host_id: str, store, cluster, registry, pool=None, *, grace: float = 10.0,
                 reweight_hold: float | None = None, down_out_interval: float = DOWN_OUT_INTERVAL):
        self.host_id = host_id
        self.store = store
        self.cluster = cluster  # replicator.view.ClusterView, kept current by the service
        self.registry = registry  # AsyncRegistry
        self.pool = pool
        self.grace = grace  # seconds a settled data set is old before misplaced copies go
        # seconds a data set stays settled before its weights change again when some host
        # does not publish its misplaced copies (an older blockd): long enough for the
        # copies the last change moved to be freed and for the hosts' stats to show it
        self.reweight_hold = grace + 5.0 if reweight_hold is None else reweight_hold
        self.scanned_gen = -1
        self._scanned_map: ClusterMap | None = None  # the map of this process's last scan
        self.marked = 0
        # published with the stats (pending_free): bytes of this host's copies that the
        # settled data set of generation misplaced_gen places elsewhere, not freed yet
        self.misplaced = 0
        self.misplaced_gen = -1
        self._settled: tuple[int, float] | None = None  # (data-set gen, when first seen settled)
        self._calm: tuple[int, float] | None = None  # the same, for the controller's reweight
        self._growths: dict = {}  # _growth's answers for one data set and set of volumes
        self._waiting: tuple | None = None  # (signature, _sole_holders' answer)
        self._held_logged: tuple | None = None  # (gen, hosts) _holders_left_out last logged
        self._measured: tuple | None = None  # (what it depends on, _measure's misplaced copies)
        # seconds a down host stays in the data set before the controller takes it out
        self.down_out_interval = down_out_interval
        self.controlling = False  # whether the last control_once found this host the controller
        self._down_since: dict[str, float] = {}  # down host -> clock() when the controller first saw it down
        self._out: set[str] = set()  # down hosts whose interval has run out (logged once)
        self._looked = -math.inf  # clock() of the controller's last look at the down hosts
        self.clock = time.monotonic

    async def n_of(self) -> dict[str, int]:
        return replicas_by_lineage(await self.registry.list_volumes())

    async def control_once(self) -> ClusterMap:
        """The controller step; does nothing on hosts other than the controller."""
        try:
            return await self._control_step()
        finally:
            if self.controlling:
                # a step's own length is no gap in looking (not_out): a long one (a large
                # pool's sole_holders) would otherwise start every down host's count again
                # at every step, and none would ever go out
                self._looked = self.clock()

    async def _control_step(self) -> ClusterMap:
        cmap = await self.registry.cluster_map()
        seen = self.clock()  # (when this map was looked at: not_out)
        if cmap.controller() != self.host_id:
            self.controlling, self._down_since, self._out = False, {}, set()
            return cmap
        self.controlling = True
        # Read before the volumes and the stale records a completion is judged by: a record
        # created after it keeps the completion from going through (set_data_set), and one
        # created before it is of a volume listed below (blocking ignores other lineages).
        seq = await self.registry.stale_seq() if cmap.prev is not None else None
        # (and for a pool that lists no volume: one created after it keeps the switch
        # below from going through, so it is found at the next step)
        vseq = await self.registry.vol_seq() if cmap.prev is None else None
        vols = await self.registry.list_volumes()
        want = wanted_data_set(cmap, vols, await self.not_out(cmap, seen))
        if not want:
            return cmap
        weights = dict(weight_pairs(cmap.factors, want))  # a host that leaves takes its factor along
        places = live_places(cmap, want)  # placement takes up the hosts' records as they are now
        set_ds = self.registry.set_data_set
        if cmap.prev is None:
            placed = cmap.placed()
            if (cmap.data is None and want == cmap.data_set) or (
                    not vols and (want != cmap.data or places != placed)):
                # the first record, or a pool without volumes: no chunk to move. (A volume
                # created since the listing, and written on the set being left, keeps the
                # switch from going through: vol_seq. The next step finds it and makes a
                # change, with its scan.)
                return await set_ds(cmap.mgen, want, None, weights, None, places,
                                    vol_seq=vseq)
            if want != cmap.data_set or places != placed:
                log.info("event=data_set_change gen=%d from=%s to=%s%s", cmap.mgen + 1,
                         ",".join(cmap.data_set), ",".join(want), _replaced(placed, places))
                return await set_ds(cmap.mgen, want, cmap.data_set, weights, cmap.factors,
                                    places, placed)
            if not cmap.places_recorded:
                # a record of older code, which placed by the live records: the same inputs
                # recorded, so nothing moves (see ClusterMap.places)
                log.info("event=data_set_places_recorded gen=%d", cmap.mgen + 1)
                return await set_ds(cmap.mgen, want, None, weights, None, places)
            await self._clear_moot(cmap, vols)
            return await self._reweight(cmap, vols)
        leaving = cmap.placed(leaving=True)
        back = want == cmap.prev and weights == cmap.prev_factors and places == leaving
        other = want != cmap.data or places != cmap.placed()
        if (back or other) and await self._holders_left_out(cmap, vols, want):
            return cmap  # (until they are back, drained, or back on a new disk)
        if back:
            # back where it started (a host returned): nothing to move
            log.info("event=data_set_change_cancelled gen=%d", cmap.mgen)
            return await set_ds(cmap.mgen, want, None, weights, None, places)
        if other:
            log.info("event=data_set_change gen=%d from=%s to=%s%s", cmap.mgen + 1,
                     ",".join(cmap.prev), ",".join(want), _replaced(leaving, places))
            return await set_ds(cmap.mgen, want, cmap.prev, weights, cmap.prev_factors,
                                places, leaving)
        scanned = await self.registry.scanned()
        left = blocking(cmap, await self.registry.list_stale(), replicas_by_lineage(vols), scanned)
        if left["unscanned"] or left["chunks"]:
            return cmap
        waiting = await self._sole_holders(cmap, vols, down_unscanned(cmap, scanned))
        if waiting:
            return cmap  # (until they return and scan, or come back on a new disk)
        log.info("event=data_set_settled gen=%d hosts=%s", cmap.mgen + 1, ",".join(cmap.data))
        return await set_ds(cmap.mgen, cmap.data, None, cmap.factors, None, cmap.placed(),
                            stale_seq=seq)

    async def _holders_left_out(self, cmap: ClusterMap, vols: list[dict], want) -> list[str]:
        """The joining targets (joining_holders) that alone hold chunks and that `want`
        leaves out, unless the operator drained them: a change away from the one under
        way (cancelled back to prev, or to another set) waits for them, as the chunks
        they hold would count as unrecoverable. One back on a new disk is recorded stale
        by its backfill and holds nothing any more; drained, it is the operator's word
        that it is gone. Logged when it first waits."""
        held = joining_holders(cmap, await self.registry.list_stale(), replicas_by_lineage(vols),
                               min_size_by_lineage(vols))
        out = sorted(set(held) - set(want))
        if out:
            out = sorted(set(out) - await self.registry.draining())
        sig = (cmap.mgen, tuple(out))
        if out and self._held_logged != sig:
            log.warning("event=data_set_waiting gen=%d hosts=%s chunks=%d: out of the wanted "
                        "data set, they alone hold chunks whose last current copy in the set "
                        "being left was lost; the change stays until they are back (or "
                        "drained, or back on a new disk: the chunks are then unrecoverable)",
                        cmap.mgen, ",".join(out), sum(held[h] for h in out))
        self._held_logged = sig
        return out

    async def not_out(self, cmap: ClusterMap, seen: float | None = None) -> frozenset[str]:
        """The down hosts of the data set that stay in it for now: this controller has seen
        them down for less than down_out_interval, and the operator has not drained them.
        The count starts at the first map that shows a host down and stops when one shows
        it up (module docstring, "Down is not out"). `seen`: when `cmap` was read."""
        now = self.clock() if seen is None else seen
        if now - self._looked > DOWN_LOOK_GAP:
            self._down_since, self._out = {}, set()
        self._looked = now
        since = {}
        for h in cmap.hosts:
            if h.state != HOST_DOWN:
                continue
            since[h.id] = self._down_since.get(h.id, now)
            if h.id not in self._down_since and h.id in cmap.data_set and self.down_out_interval > 0:
                log.info("event=host_down host=%s out_in=%g: stays in the data set, its chunks "
                         "degraded, until down that long", h.id, self.down_out_interval)
        self._down_since = since
        keep = {h for h, t in since.items() if h in cmap.data_set and now - t < self.down_out_interval}
        if keep:
            keep -= await self.registry.draining()
        for h in sorted(set(since) - keep - self._out):
            if h in cmap.data_set and self.down_out_interval > 0:
                log.info("event=down_out host=%s down_for=%.0f: out of the wanted data set "
                         "(drained, or down past down_out_interval)", h, now - since[h])
        self._out = set(since) - keep
        return frozenset(keep)

    def down_out(self) -> dict | None:
        """What the controller publishes with its stats for `vbp pool status`: its
        down_out_interval and, per down host, the wall-clock time it first saw it down
        (None on other hosts)."""
        if not self.controlling:
            return None
        now, wall = self.clock(), time.time()
        return {"interval": self.down_out_interval,
                "since": {h: wall - (now - t) for h, t in sorted(self._down_since.items())}}

    async def _sole_holders(self, cmap: ClusterMap, vols: list[dict], down: frozenset[str]) -> list[str]:
        """sole_holders, in a worker thread (it places every chunk of the volumes it looks
        at), once per map, volumes and set of down hosts; logged when it first waits."""
        if not down:
            return []
        sig = (cmap.epoch, cmap.mgen, down,
               tuple(sorted((v["lineage"], read_size(v), v["chunk_size"], v["replicas"]) for v in vols)))
        if self._waiting is None or self._waiting[0] != sig:
            got = await trio.to_thread.run_sync(sole_holders, cmap, vols, down)
            self._waiting = (sig, got)
            if got:
                log.warning("event=data_set_waiting gen=%d hosts=%s: down and not scanned, they "
                            "alone hold chunks that move; the change completes once they are "
                            "back (or back on a new disk: their data is then given up as lost)",
                            cmap.mgen, ",".join(got))
        return self._waiting[1]

    async def _reweight(self, cmap: ClusterMap, vols: list[dict]) -> ClusterMap:
        """Change the weight factors of a settled data set (wanted_weights) once every
        host's stats were measured on it (stats_current; their usage less the copies the
        last change moved off is what they keep), or, when some host does not say, once
        it has been settled for reweight_hold seconds; and only if every host places by
        weights."""
        now = self.clock()
        if self._calm is None or self._calm[0] != cmap.mgen:
            self._calm = (cmap.mgen, now)
        if not vols or any(h.peer_rev < WEIGHTS_REV for h in cmap.hosts):
            return cmap  # (an upgrade under way: older hosts would place chunks elsewhere)
        stats = await self.registry.host_stats()
        if now - self._calm[1] < self.reweight_hold and not stats_current(cmap, stats):
            return cmap
        most = max(v["replicas"] for v in vols)
        # (in a worker thread: a lowering is judged on placing thousands of chunks, _Projection)
        want = await trio.to_thread.run_sync(wanted_weights, cmap, stats, most)
        raised = {h: f for h, f in want.items() if f > cmap.factors.get(h, 1.0)}
        raised.update((h, 1.0) for h in cmap.factors if h in cmap.data_set and h not in want)
        if raised:  # judged again on the chunks the raise would place there, and owed
            growth = await self._growth(cmap, vols, raised)
            owed = owed_by_host(await self.registry.list_stale(), vols)
            want = await trio.to_thread.run_sync(wanted_weights, cmap, stats, most, growth, owed)
        if want == cmap.factors:
            return cmap
        for h in sorted(set(want) | set(cmap.factors)):
            old, new = cmap.factors.get(h, 1.0), want.get(h, 1.0)
            if old != new:
                st = stats.get(h) or {}
                log.info("event=reweight gen=%d host=%s weight=%s from=%s used=%s capacity=%s",
                         cmap.mgen + 1, h, new, old, st.get("used"), st.get("capacity"))
        placed = cmap.placed()
        return await self.registry.set_data_set(cmap.mgen, cmap.data_set, cmap.data_set, want,
                                                cmap.factors, placed, placed)

    async def _growth(self, cmap: ClusterMap, vols: list[dict], raised: dict[str, float]) -> dict[str, float]:
        """Host -> how many times its placed chunks grow at the raised factor (placed_count,
        in a worker thread: up to 2 * RAISE_SAMPLE placements; kept per data set and volumes)."""
        sig = (cmap.mgen, tuple(sorted((v["lineage"], v["size"], v["chunk_size"], v["replicas"]) for v in vols)))
        if self._growths.get("sig") != sig:
            self._growths = {"sig": sig}
        out = {}
        for h, new in raised.items():
            if (h, new) not in self._growths:
                def ratio(h=h, new=new) -> float:
                    before = placed_count(cmap, vols, h, cmap.factors)
                    return placed_count(cmap, vols, h, {**cmap.factors, h: new}) / before if before else 0.0
                self._growths[(h, new)] = await trio.to_thread.run_sync(ratio)
            out[h] = self._growths[(h, new)]
        return out

    async def _clear_moot(self, cmap: ClusterMap, vols: list[dict]) -> None:
        """Stale records of hosts a settled data set no longer places the chunk on name
        nothing to bring current (a lost host's missed writes): they go. If the host
        returns, a new change of data set records what it must resync. So do the records
        of lineages no volume is left in (deleted volumes)."""

        n_of = replicas_by_lineage(vols)
        view = ClusterView(cmap)
        records = await self.registry.list_stale()
        if (await self.registry.cluster_map()).mgen != cmap.mgen:
            # A change of data set was recorded since `cmap` was read (another controller):
            # a record its scan or a gateway made names a joining target, not a moot copy,
            # and cleared by the old placement, the target would count as complete holding
            # nothing. A record listed before the change and marked after it has moved
            # version, so clear_stale below leaves it.
            return
        for r in records:
            if r.lineage in n_of and r.host_id not in view.replicas(r.lineage, r.index, n_of[r.lineage]):
                await self.registry.clear_stale(r.lineage, r.index, r.host_id, r.version)
                log.info("event=moot_stale_cleared lineage=%s chunk=%d host=%s", r.lineage, r.index, r.host_id)
        if any(r.lineage not in n_of for r in records):
            # Records of lineages whose every volume was deleted: nothing reads them, and
            # the host they name clears them only if it returns (a host that left for good
            # never does). Judged by the volumes listed again after the records: `vols`
            # was read before them, so a volume created since (a new lineage) may have
            # records among them; a lineage no volume has once the records were read
            # never gets one again (a new volume takes a new lineage, and a clone is made
            # only while its parent's record is there).
            live = {d["lineage"] for d in await self.registry.list_volumes()}
            for r in records:
                if r.lineage not in n_of and r.lineage not in live:
                    await self.registry.clear_stale(r.lineage, r.index, r.host_id, r.version)
                    log.info("event=moot_stale_cleared lineage=%s chunk=%d host=%s reason=deleted",
                             r.lineage, r.index, r.host_id)

    async def scan_once(self) -> int:
        """Record the joining targets stale, once per change, of the chunks this host
        holds and of those it is recorded stale for: such a copy may hold nothing of a
        chunk whose current copies are all on hosts that are down (and do not scan), and
        the target must not count as current with nothing once the change completes. Its
        record says the target was never current: it waits for a real source."""
        cv = self.cluster
        cmap = cv.map
        if cmap.prev is None or self.scanned_gen == cmap.mgen:
            return 0
        scanned = await self.registry.scanned()
        if scanned.get(self.host_id) == cmap.mgen:
            # scanned by this host's process before this one (a restart in the change):
            # done. Again, it would record targets stale that resynced since, and from
            # its records (below) as never current: with the copies it was stale with
            # lost meanwhile, a target holding every acknowledged write could no longer
            # become current (a review found it).
            self.scanned_gen = cmap.mgen
            return 0
        n_of = await self.n_of()
        # The change restarted from the same prev (generation one past the one this process
        # scanned: another host lost, a new factor): the targets that joined a chunk then
        # too were recorded by that scan (or by a gateway before its first write) and have
        # been in its write set since; one that resynced holds every acknowledged write.
        # Recorded again, with the last current copy of prev lost before it resynced once
        # more, the chunk was taken for unrecoverable and accept-loss reverted it over the
        # target's bytes. Only targets new to this generation are recorded.
        before = self._scanned_map
        carried = None
        if (before is not None and before.mgen == cmap.mgen - 1 and before.prev == cmap.prev
                and before.prev_factors == cmap.prev_factors
                and before.placed(leaving=True) == cmap.placed(leaving=True)):
            carried = ClusterView(before)
        marked = 0
        seen: set[tuple[str, int]] = set()
        now = time.time_ns()
        held = [(k.lineage, k.index, now) for k in self.store.keys()]
        stale = [(r.lineage, r.index, NEVER_CURRENT | now)
                 for r in await self.registry.list_stale() if r.host_id == self.host_id]
        for i, (lineage, index, version) in enumerate(held + stale):
            if not i % LIST_STEP:
                await trio.lowlevel.checkpoint()
            if (lineage, index) in seen or lineage not in n_of:
                continue
            seen.add((lineage, index))
            n = n_of[lineage]
            replicas = cv.replicas(lineage, index, n)
            if self.host_id not in replicas:
                continue  # a misplaced copy: another host's scan covers the chunk
            if version & NEVER_CURRENT and any(
                    scanned.get(h) == cmap.mgen for h in replicas if h != self.host_id):
                # a copy stale here and not held: another of its copies scanned this change
                # and recorded the targets then; they may have resynced since and hold
                # every acknowledged write (recorded never current now, nothing could
                # make them current again)
                continue
            joining = cv.joining(lineage, index, n)
            if carried is not None:
                joining = tuple(h for h in joining if h not in carried.joining(lineage, index, n))
            if joining:
                await self.registry.mark_stale(lineage, index, joining, version)
                marked += 1
        if cv.map.mgen == cmap.mgen:
            await self.registry.mark_scanned(self.host_id, cmap.mgen)
            self.scanned_gen = cmap.mgen
            self._scanned_map = cmap
            self.marked += marked
            log.info("event=data_set_scanned gen=%d chunks_to_move=%d", cmap.mgen, marked)
        return marked

    async def _measure(self, cmap: ClusterMap):
        """This host's copies that the settled data set `cmap` places elsewhere, recorded
        as `misplaced` bytes of generation cmap.mgen: ({(lineage, index): gens}, replicas
        by lineage), or None if the map changed meanwhile."""
        layout = getattr(self.store, "layout", None)  # (before the listing: see _measured)
        n_of = await self.n_of()
        cv = self.cluster
        if cv.map.mgen != cmap.mgen or cv.map.prev is not None:
            return None
        # kept while nothing it depends on changed: the map and data set, the chunks held
        # (ChunkStore.layout moves when one comes or goes), the volumes' replica counts
        key = (cmap.epoch, cmap.mgen, layout, tuple(sorted(n_of.items())))
        if layout is not None and self._measured is not None and self._measured[0] == key:
            misplaced = self._measured[1]
        else:
            local: dict[tuple[str, int], list[int]] = {}
            for i, k in enumerate(self.store.keys()):
                if not i % (16 * LIST_STEP):
                    await trio.lowlevel.checkpoint()
                local.setdefault((k.lineage, k.index), []).append(k.gen)
            misplaced = {}
            for i, (c, g) in enumerate(local.items()):
                if not i % LIST_STEP:
                    await trio.lowlevel.checkpoint()
                    if cv.map.mgen != cmap.mgen or cv.map.prev is not None:
                        return None
                if c[0] in n_of and self.host_id not in cv.replicas(c[0], c[1], n_of[c[0]]):
                    misplaced[c] = g
            self._measured = (key, misplaced)
        size = 0
        for (lineage, index), gens in misplaced.items():
            for g in gens:
                info = self.store.info(ChunkKey(lineage, index, g))
                size += info.chunk_size if info is not None else 0
        self.misplaced, self.misplaced_gen = size, cmap.mgen
        return misplaced, n_of

    async def measure_misplaced(self) -> bool:
        """Measure once per settled data set, as soon as it settles: True when measured
        (the caller publishes the stats, which the controller waits for)."""
        cmap = self.cluster.map
        if cmap.prev is not None or self.misplaced_gen == cmap.mgen or self.store is None:
            return False
        return await self._measure(cmap) is not None

    async def collect_misplaced(self) -> int:
        """Free copies placed elsewhere by a settled data set, once others hold them."""
        cv = self.cluster
        cmap = cv.map
        if cmap.prev is not None or self.pool is None:
            self._settled = None
            return 0
        now = time.monotonic()
        if self._settled is None or self._settled[0] != cmap.mgen:
            self._settled = (cmap.mgen, now)
        measured = await self._measure(cmap)  # also corrects for copies GC freed meanwhile
        if now - self._settled[1] < self.grace or not measured or not measured[0]:
            return 0
        misplaced, n_of = measured
        stale = {(r.lineage, r.index, r.host_id) for r in await self.registry.list_stale()}
        freed = 0
        for (lineage, index), gens in misplaced.items():
            hosts = cv.replicas(lineage, index, n_of[lineage])
            if not await self._held_elsewhere(lineage, index, gens, hosts, stale):
                continue
            if cv.map.mgen != cmap.mgen or cv.map.prev is not None:
                break  # the data set changed while we asked
            for g in gens:
                key = ChunkKey(lineage, index, g)
                info = self.store.info(key)
                try:
                    self.store.delete(key)
                    freed += 1
                except NotFound:
                    continue
                if info is not None and self.misplaced_gen == cmap.mgen:
                    # at once: stats published before the next measure must not count it twice
                    self.misplaced = max(0, self.misplaced - info.chunk_size)
            log.info("event=misplaced_freed lineage=%s chunk=%d gens=%s", lineage, index,
                     ",".join(map(str, gens)))
        return freed

    async def _held_elsewhere(self, lineage, index, gens, hosts, stale) -> bool:
        if not hosts or any((lineage, index, h) in stale or not self.cluster.is_up(h) for h in hosts):
            return False
        for h in hosts:
            try:
                reply = await self.pool.call(self.cluster.address(h), m.ChunkGens(lineage, index))
            except VbpError:
                return False
            if not set(gens) <= set(reply.gens):
                return False
        return True
