"""Scrub: find and repair corrupt or divergent chunk copies (DESIGN.md, Failures; issue 8).

Theory of operation:
- Each host scrubs the chunks for which it is the first up replica in placement, so one
  pass of every host covers every chunk once. Chunks are listed from the local store.
- Presence first (first_look, second_look): a copy missing on a current replica (a lost index
  entry, a generation freed under a reader) is recorded stale, and resync brings it back;
  nothing else would notice, as recovery acts on stale records only. Every up replica asks
  the others which generations of each chunk it holds they hold (ChunkGens), and the
  first of them that holds any judges, so a chunk the first replica lost is judged too; a
  chunk no replica holds is unwritten, not missing. A copy is missing a generation when a
  reader (a volume or snapshot record) resolves on it to an older one of its chain than
  on another current copy (vbp.volume.lacking). Generations only some hosts' GC freed so
  far are no such case: GC frees only what no reader resolves to, and the judgement uses
  records read after the copies were listed. A copy-up under way reaches every copy within
  `settle` or its failures are recorded, so a copy is recorded only if it missed the same
  generation on two looks `settle` apart; the chunks that look so wait out one `settle`
  together, not one each (a replica that lost its store: every chunk of it).
- For each generation of such a chunk every up replica verifies its copy (ScrubChunk): it
  rereads every page, checks it against the stored checksum and answers its version, its
  stored checksums and the pages that failed. The local copy goes through the same handler
  by direct call, so all copies are judged alike.
- `diagnose` (pure, no I/O) decides page by page what each copy should hold:
  * a page whose bytes fail their own checksum (bit rot, kind "checksum") should hold what
    that checksum says; another copy holding a valid page with the same checksum has
    exactly those bytes, so this repair is right even while writes run;
  * copies whose valid pages disagree (kind "divergent") are outvoted by a strict majority
    of at least two agreeing copies; without one the page is "unrepairable" (reported,
    never guessed). Same for a rotten page no copy can restore.
  Copies known stale (a registry record, or the host says so) are neither judged nor used
  as a source: resync brings them current. Down hosts are skipped, and so are missing
  copies here (presence handled them).
- Writes keep arriving while we look: two copies may differ only because a write reached
  one of them and not yet the other. So nothing is judged on one look: a chunk that looks
  wrong is looked at again after `settle` seconds (longer than a peer timeout: a write still
  undelivered by then has failed and its target was recorded stale, so it is excluded; a
  gateway does not acknowledge a write whose failures it recorded later than that,
  VolumeGateway.write_window).
  Divergence is acted on only if no copy's version moved between the two looks; a checksum
  repair from a copy with the very same checksum needs no settling.
- A repair (RepairPages) is applied by its target only if the pages' stored checksums and
  the chunk's version are still the ones diagnosed (recovery.write_pages_if_unchanged: the
  check and the write run with no await between them), and the scrubber checks the bytes
  it sends against the wanted checksums first. So a repair never overwrites a newer write
  and never spreads bad bytes; a refused repair is retried on the next pass.
  Repairs are pushed by the scrubber rather than pulled by the damaged replica: the
  scrubber already holds the diagnosis and reads the good bytes, the target needs no
  placement or peer connections, and its compare-and-write stays one synchronous call.
- Rate: the pass sleeps so that the bytes verified (every copy of every chunk) stay under
  `rate` bytes per second, so scrub never starves client I/O; 0 = unlimited.
- Requests: `vbp pool scrub` writes a request into the registry (vbp.registry.base); every
  up host runs one pass for it and writes its result back, with progress while it runs.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import trio

from replicator import messages as m
from replicator.recovery import MAX_RUN, write_pages_if_unchanged
from vbp.chunkstore_common import page_checksum
from vbp.errors import InvalidArgument, NotFound, RegistryUnavailable, VbpError
from vbp.layout import PAGE_SIZE, ChunkKey
from vbp.volume import VolumeRecord, lacking, readers, replicas_by_lineage

log = logging.getLogger("vbp.scrub")

CHECKSUM, DIVERGENT = "checksum", "divergent"
KINDS = (CHECKSUM, DIVERGENT)
MAX_RUN_PAGES = MAX_RUN // PAGE_SIZE
PROGRESS_PERIOD = 1.0  # seconds between progress records of a requested pass
# A pass lists the chunks it checks on the event loop: a placement each (ClusterView.replicas,
# some microseconds when not cached) and a sort of the store's keys. With a million chunks
# held that took 15 s and more in one go, in which the host answered no client and no peer.
# It lets the other tasks run every LIST_STEP chunks, and sorts in runs of SORT_RUN keys
# merged as it goes.
LIST_STEP = 256
SORT_RUN = 16384


# --- the peer side: verify and repair one local copy ----------------------------------------


def verify_copy(replica, msg: m.ScrubChunk):
    """This host's copy as ScrubChunk asks: its state, or an awaitable of it where the
    store reads the chunk with the event loop free (ChunkStore.verify_soon)."""
    store = replica.store
    key = ChunkKey(msg.lineage, msg.index, msg.gen)
    if store.info(key) is None:
        return _absent()
    verify_soon = getattr(store, "verify_soon", None)
    if verify_soon is None:
        return _copy_state(replica, msg, key, store.verify(key))
    return _verified(replica, msg, key, verify_soon)


async def _verified(replica, msg: m.ScrubChunk, key: ChunkKey, verify_soon) -> m.ScrubState:
    try:
        bad = await verify_soon(key)
    except NotFound:  # (dropped while it was read)
        return _absent()
    return _copy_state(replica, msg, key, bad)


def _absent() -> m.ScrubState:
    return m.ScrubState(False, False, 0, (), ())


def _copy_state(replica, msg: m.ScrubChunk, key: ChunkKey, bad: list[int]) -> m.ScrubState:
    """The state of the copy `key` just verified, `bad` its failing pages (the checksums
    and version read now, with no checkpoint since the verify's last step)."""
    version, sums = replica.store.page_checksums(key)
    return m.ScrubState(True, replica.is_stale(msg.lineage, msg.index), version, tuple(sums),
                        tuple(bad))


def repair_copy(replica, msg: m.RepairPages) -> m.Repaired:
    """Apply a repair if the pages are still as diagnosed. Never creates a copy and never
    touches a copy this host knows stale (resync owns it)."""
    from replicator.replica import StaleCopy

    replica.check_epoch(msg.epoch)
    if replica.is_stale(msg.lineage, msg.index):
        raise StaleCopy(f"this host's copy of chunk {msg.index} of {msg.lineage} is being resynced")
    key = ChunkKey(msg.lineage, msg.index, msg.gen)
    store = replica.store
    if store.info(key) is None:
        return m.Repaired(False, 0)
    if not msg.hole and len(msg.data) != len(msg.expect) * PAGE_SIZE:
        raise InvalidArgument(f"repair of {len(msg.expect)} pages carries {len(msg.data)} bytes")
    ok = write_pages_if_unchanged(store, key, msg.chunk_size, msg.first, msg.expect,
                                  None if msg.hole else msg.data, expect_version=msg.version,
                                  fua=True)
    return m.Repaired(ok, store.info(key).version)


# --- the pure core: what is wrong and how to fix it ------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """One replica's copy of a chunk generation as ScrubChunk saw it."""

    host: str
    version: int
    sums: tuple[int, ...]
    bad: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Finding:
    host: str
    kind: str
    pages: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Fix:
    """Make pages [first, first+len(want)) of `target` hold checksums `want`, reading them
    from `source` (None: they become holes). `expect`/`version`: the target's state seen."""

    target: str
    source: str | None
    kind: str
    first: int
    want: tuple[int, ...]
    expect: tuple[int, ...]
    version: int
    needs_settled: bool


@dataclass
class Diagnosis:
    findings: list[Finding] = field(default_factory=list)
    fixes: list[Fix] = field(default_factory=list)
    unrepairable: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


def _winner(valid: list[Copy], p: int) -> int | None:
    """The checksum a strict majority (and at least two) of the valid copies hold."""
    votes = Counter(c.sums[p] for c in valid)
    if not votes:
        return None
    top, n = votes.most_common(1)[0]
    return top if n >= 2 and 2 * n > len(valid) else None


def diagnose(copies: list[Copy], max_pages: int = MAX_RUN_PAGES) -> Diagnosis:
    """Findings and fixes for the copies of one chunk generation (all of one size).
    Sources are picked in the order of `copies`, so the caller puts its preference first."""
    d = Diagnosis()
    if len(copies) < 1 or (all(not c.bad for c in copies)
                           and all(c.sums == copies[0].sums for c in copies)):
        return d
    npages = len(copies[0].sums)
    wants: dict[str, list[tuple[int, int, str | None, str, bool]]] = {c.host: [] for c in copies}
    found: dict[tuple[str, str], list[int]] = {}
    lost: dict[tuple[str, str], list[int]] = {}
    for p in range(npages):
        valid = [c for c in copies if p not in c.bad]
        if len(valid) == len(copies) and all(c.sums[p] == valid[0].sums[p] for c in valid):
            continue
        winner = _winner(valid, p)
        for c in copies:
            if p in c.bad:
                kind = CHECKSUM
                same = [o.host for o in valid if o.sums[p] == c.sums[p]]
                if same:
                    want, source, settled = c.sums[p], same[0], False
                elif winner is not None:
                    want, source, settled = winner, _source(valid, p, winner), True
                else:
                    want = None
            elif winner is not None and c.sums[p] != winner:
                kind, want, source, settled = DIVERGENT, winner, _source(valid, p, winner), True
            elif winner is None and len({o.sums[p] for o in valid}) > 1:
                kind, want = DIVERGENT, None  # valid copies disagree, no majority
            else:
                continue
            found.setdefault((c.host, kind), []).append(p)
            if want is None:
                lost.setdefault((c.host, kind), []).append(p)
            else:
                wants[c.host].append((p, want, source, kind, settled))
    d.findings = [Finding(h, k, tuple(ps)) for (h, k), ps in found.items()]
    d.unrepairable = [Finding(h, k, tuple(ps)) for (h, k), ps in lost.items()]
    by_host = {c.host: c for c in copies}
    for host, items in wants.items():
        d.fixes += _runs(by_host[host], items, max_pages)
    return d


def _source(valid: list[Copy], p: int, want: int) -> str | None:
    if want == 0:
        return None  # a hole: nothing to read
    return next(c.host for c in valid if c.sums[p] == want)


def _runs(target: Copy, items, max_pages: int) -> list[Fix]:
    """Consecutive pages with the same source, kind and settling need become one Fix."""
    out: list[Fix] = []
    run: list = []

    def close():
        if run:
            first = run[0][0]
            out.append(Fix(target.host, run[0][2], run[0][3], first, tuple(x[1] for x in run),
                           target.sums[first:first + len(run)], target.version, run[0][4]))
            run.clear()

    for item in items:
        p, want, source, kind, settled = item
        if run and (p != run[-1][0] + 1 or (source, kind, settled) != run[-1][2:]
                    or len(run) >= max_pages):
            close()
        run.append((p, want, source, kind, settled))
    close()
    return out


# --- results ----------------------------------------------------------------------------------


@dataclass
class ScrubReport:
    """What one pass of one host found and did. Errors, repairs and unrepairable counts are
    in pages; `busy` counts chunks skipped because writes kept changing them."""

    chunks_total: int = 0
    chunks_done: int = 0
    chunks: int = 0  # chunk generations compared
    pages: int = 0  # pages verified (all copies)
    bytes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    unrepairable: int = 0
    busy: int = 0
    unreachable: int = 0  # copies that could not be asked
    missing: int = 0  # copies missing a generation on a current replica, recorded stale

    @property
    def error_pages(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return asdict(self)


# --- the driver -------------------------------------------------------------------------------


def _current(held: dict[str, frozenset[int]], stale: set[str]) -> dict[str, frozenset[int]]:
    return {h: gens for h, gens in held.items() if h not in stale}


class Scrubber:
    def __init__(self, host_id: str, replica, cluster, pool, registry, *, metrics=None,
                 rate: int = 0, settle: float = 6.0):
        self.host_id = host_id
        self.replica = replica
        self.store = replica.store
        self.cluster = cluster
        self.pool = pool
        self.registry = registry
        self.metrics = metrics
        self.rate = rate
        self.settle = settle
        self.last: dict | None = None  # the last pass's report, published with the host's stats
        self._next = 0.0

    # --- one pass -------------------------------------------------------------------------

    async def run_pass(self, volume: str = "", progress=None) -> ScrubReport:
        """Scrub every chunk this host is the first up replica of (of one volume's lineage
        and generations, when `volume` is given). `progress(report)` is awaited now and then."""
        cmap = await self.registry.cluster_map()  # judge by the newest map: who is up
        if cmap.epoch > self.cluster.epoch:
            self.cluster.set_map(cmap)
        recs = await self.registry.list_volumes()
        n_of = replicas_by_lineage(recs)
        wanted_gens = None
        if volume:
            rec = next((d for d in recs if d["name"] == volume), None)
            if rec is None:
                raise InvalidArgument(f"volume {volume} does not exist")
            n_of = {rec["lineage"]: n_of[rec["lineage"]]}
            wanted_gens = set(rec["chain"]) | {g for s in rec.get("snapshots", ()) for g in s["chain"]}
            if rec.get("pending"):
                wanted_gens.add(rec["pending"])
        keys = await self._sorted_keys()  # (one listing for presence and verification)
        work = await self._work(keys, n_of, wanted_gens)
        report = ScrubReport(chunks_total=len(work))
        stale = await self._stale_hosts()
        by_lineage = readers(VolumeRecord.from_dict(d) for d in recs)
        suspects = []
        for lineage, index, hosts in await self._held(keys, n_of):
            try:
                first = await self.first_look(lineage, index, hosts,
                                              stale.get((lineage, index), set()),
                                              by_lineage.get(lineage, ()))
            except (RegistryUnavailable, trio.Cancelled):
                raise
            except Exception:  # as a chunk's scrub below
                log.exception("event=scrub_presence_failed lineage=%s chunk=%d", lineage, index)
                report.busy += 1
                continue
            if first is not None:
                suspects.append((lineage, index, hosts, first))
        if suspects:  # one settling time for all of them, not one each
            await self.second_look(suspects, report)
        last = trio.current_time()
        for key, hosts in work:
            try:
                await self.scrub_chunk(key, hosts, stale.get((key.lineage, key.index), set()), report)
            except (RegistryUnavailable, trio.Cancelled):
                raise
            except Exception:  # one chunk failing must not stop the pass (logged, counted)
                log.exception("event=scrub_chunk_failed lineage=%s chunk=%d gen=%d",
                              key.lineage, key.index, key.gen)
                report.busy += 1
            report.chunks_done += 1
            if progress is not None and trio.current_time() - last >= PROGRESS_PERIOD:
                last = trio.current_time()
                await progress(report)
        self.last = {**report.to_dict(), "volume": volume, "finished": time.time()}
        log.info("event=scrub_pass_done volume=%s chunks=%d pages=%d errors=%d repaired=%d "
                 "unrepairable=%d busy=%d missing=%d", volume or "-", report.chunks, report.pages,
                 report.error_pages, report.repaired, report.unrepairable, report.busy,
                 report.missing)
        return report

    async def _sorted_keys(self) -> list[ChunkKey]:
        """The store's keys, sorted: runs of SORT_RUN sorted one at a time and merged, the
        other tasks let run in between (LIST_STEP)."""
        keys = list(self.store.keys())
        runs = []
        for i in range(0, len(keys), SORT_RUN):
            runs.append(sorted(keys[i:i + SORT_RUN]))
            await trio.lowlevel.checkpoint()
        if len(runs) <= 1:
            return runs[0] if runs else []
        out = []
        for key in heapq.merge(*runs):
            out.append(key)
            if not len(out) % SORT_RUN:
                await trio.lowlevel.checkpoint()
        return out

    async def _work(self, keys: list[ChunkKey], n_of: dict[str, int],
                    gens) -> list[tuple[ChunkKey, tuple[str, ...]]]:
        out = []
        for i, key in enumerate(keys):
            if not i % LIST_STEP:
                await trio.lowlevel.checkpoint()
            n = n_of.get(key.lineage)
            if n is None or (gens is not None and key.gen not in gens):
                continue
            hosts = self.cluster.replicas(key.lineage, key.index, n)
            up = [h for h in hosts if self.cluster.is_up(h)]
            if up and up[0] == self.host_id:
                out.append((key, tuple(up)))
        return out

    async def _held(self, keys: list[ChunkKey],
                    n_of: dict[str, int]) -> list[tuple[str, int, tuple[str, ...]]]:
        """The chunks of `keys` (the store's, sorted) this host is an up replica of:
        (lineage, index, the up replicas in placement order)."""
        out = []
        chunks = list(dict.fromkeys((k.lineage, k.index) for k in keys))  # (in order)
        for i, (lineage, index) in enumerate(chunks):
            if not i % LIST_STEP:
                await trio.lowlevel.checkpoint()
            n = n_of.get(lineage)
            if n is None:
                continue
            up = tuple(h for h in self.cluster.replicas(lineage, index, n) if self.cluster.is_up(h))
            if self.host_id in up:
                out.append((lineage, index, up))
        return out

    async def _stale_hosts(self, lineage: str | None = None) -> dict[tuple[str, int], set[str]]:
        out: dict[tuple[str, int], set[str]] = {}
        for r in await self.registry.list_stale(lineage):
            out.setdefault((r.lineage, r.index), set()).add(r.host_id)
        return out

    # --- presence of a chunk's generations on every copy --------------------------------------

    async def first_look(self, lineage: str, index: int, hosts, stale: set[str],
                         rs) -> dict[str, frozenset[int]] | None:
        """The generations each of the chunk's up replicas (`hosts`) holds, when this host
        judges the chunk (the first of them holding any) and a current copy seems to miss
        one a reader resolves to on another (`rs`: the lineage's readers as the pass
        began); else None. Nothing is recorded on one look (second_look)."""
        first = await self._gens(lineage, index, hosts)
        for h in hosts:  # the first up replica that holds any generation judges
            if h not in first:
                return None  # (unanswered: it may hold some; the next pass)
            if first[h] or h == self.host_id:
                break
        if h != self.host_id or not lacking(rs, index, _current(first, stale)):
            return None
        return first

    async def second_look(self, suspects: list, report: ScrubReport) -> None:
        """Record stale each current copy of the `suspects` (first_look's chunks: (lineage,
        index, hosts, first look)) that misses, `settle` seconds later, a generation it
        missed then too and that a reader resolves to on another current copy."""
        await trio.sleep(self.settle)
        stale = await self._stale_hosts()
        seconds = []
        for lineage, index, hosts, first in suspects:
            seconds.append(await self._gens(lineage, index, hosts))
        # the records after the looks: a generation GC freed then was freed by records as
        # old or older, under which no reader resolved to it either
        by_lineage = readers(VolumeRecord.from_dict(d) for d in await self.registry.list_volumes())
        for (lineage, index, hosts, first), second in zip(suspects, seconds):
            rs = by_lineage.get(lineage, ())
            gone = stale.get((lineage, index), set())
            before = lacking(rs, index, _current(first, gone))
            now = lacking(rs, index, _current(second, gone))
            for h, gens in sorted(now.items()):
                gens &= before.get(h, set())
                if not gens:
                    continue
                await self.registry.mark_stale(lineage, index, [h], time.time_ns())
                report.missing += 1
                log.warning("event=scrub_missing lineage=%s chunk=%d host=%s gens=%s: a "
                            "current copy misses what readers resolve to; recorded stale for "
                            "resync", lineage, index, h, ",".join(map(str, sorted(gens))))
                if self.metrics is not None:
                    self.metrics.scrub_missing_copies(1)

    async def _gens(self, lineage: str, index: int, hosts) -> dict[str, frozenset[int]]:
        """The generations of the chunk each host holds, of those that answered (a host
        that says its copy is stale, backfilling, answers nothing)."""
        msg = m.ChunkGens(lineage, index)
        out: dict[str, frozenset[int]] = {}

        async def one(h: str) -> None:
            try:
                out[h] = frozenset((await self._call(h, msg)).gens)
            except VbpError as e:
                log.info("event=scrub_gens_failed lineage=%s chunk=%d host=%s error=%s",
                         lineage, index, h, e)

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(one, h)
        return out

    # --- one chunk generation -------------------------------------------------------------

    async def scrub_chunk(self, key: ChunkKey, hosts, stale: set[str], report: ScrubReport) -> None:
        first = await self._look(key, hosts, stale, report)
        if first is None:
            return
        d = diagnose(first)
        if d.clean:
            return
        await trio.sleep(self.settle)
        stale = (await self._stale_hosts(key.lineage)).get((key.lineage, key.index), set())
        second = await self._look(key, hosts, stale, report, count=False)
        if second is None:
            return
        before = {c.host: c.version for c in first}
        settled = {c.host: c.version for c in second} == before
        d = diagnose(second)
        if not settled:  # writes are landing: only the repairs that are right anyway
            d.fixes = [f for f in d.fixes if not f.needs_settled]
            d.findings = [f for f in d.findings if f.kind == CHECKSUM]
            d.unrepairable = []
            report.busy += 1
        for f in d.findings:
            self._found(key, f, report)
        for f in d.unrepairable:
            report.unrepairable += len(f.pages)
            log.warning("event=scrub_unrepairable lineage=%s chunk=%d gen=%d host=%s kind=%s "
                        "pages=%d first_page=%d", key.lineage, key.index, key.gen, f.host, f.kind,
                        len(f.pages), f.pages[0])
            if self.metrics is not None:
                self.metrics.scrub_unrepairable(len(f.pages))
        for fix in d.fixes:
            await self._apply(key, fix, report)

    async def _look(self, key: ChunkKey, hosts, stale: set[str], report: ScrubReport,
                    count: bool = True) -> list[Copy] | None:
        """Every current copy as verified now; the local one first (preferred source)."""
        msg = m.ScrubChunk(key.lineage, key.index, key.gen, self.cluster.epoch)
        states: dict[str, m.ScrubState] = {}

        async def one(h: str) -> None:
            try:
                states[h] = await self._call(h, msg)
            except VbpError as e:
                log.warning("event=scrub_peer_failed lineage=%s chunk=%d host=%s error=%s",
                            key.lineage, key.index, h, e)
                if count:
                    report.unreachable += 1

        async with trio.open_nursery() as nursery:
            for h in hosts:
                if h not in stale:
                    nursery.start_soon(one, h)
        copies = [Copy(h, s.version, s.checksums, frozenset(s.bad))
                  for h, s in sorted(states.items(), key=lambda kv: kv[0] != self.host_id)
                  if s.exists and not s.stale]
        if copies and len({len(c.sums) for c in copies}) > 1:
            log.warning("event=scrub_size_mismatch lineage=%s chunk=%d gen=%d", key.lineage,
                        key.index, key.gen)
            return None
        if count:
            nbytes = sum(len(c.sums) for c in copies) * PAGE_SIZE
            report.chunks += 1
            report.pages += nbytes // PAGE_SIZE
            report.bytes += nbytes
            if self.metrics is not None:
                self.metrics.scrubbed(1, nbytes // PAGE_SIZE, nbytes)
            await self._throttle(nbytes)
        return copies or None

    def _found(self, key: ChunkKey, f: Finding, report: ScrubReport) -> None:
        report.errors[f.kind] = report.errors.get(f.kind, 0) + len(f.pages)
        log.warning("event=scrub_error lineage=%s chunk=%d gen=%d host=%s kind=%s pages=%d "
                    "first_page=%d", key.lineage, key.index, key.gen, f.host, f.kind,
                    len(f.pages), f.pages[0])
        if self.metrics is not None:
            self.metrics.scrub_error(f.kind, len(f.pages))

    async def _apply(self, key: ChunkKey, fix: Fix, report: ScrubReport) -> None:
        count = len(fix.want)
        try:
            data = b""
            if fix.source is not None:
                data = await self._read(key, fix)
                if data is None:
                    report.busy += 1
                    return
            chunk_size = self._chunk_size(key)
            reply = await self._call(fix.target, m.RepairPages(
                key.lineage, key.index, key.gen, chunk_size, fix.first, fix.expect,
                fix.version, fix.source is None, self.cluster.epoch, data))
        except VbpError as e:
            log.warning("event=scrub_repair_failed lineage=%s chunk=%d gen=%d host=%s error=%s",
                        key.lineage, key.index, key.gen, fix.target, e)
            return
        if not reply.applied:
            report.busy += 1
            log.info("event=scrub_repair_skipped lineage=%s chunk=%d gen=%d host=%s "
                     "reason=changed_meanwhile", key.lineage, key.index, key.gen, fix.target)
            return
        report.repaired += count
        log.info("event=scrub_repaired lineage=%s chunk=%d gen=%d host=%s kind=%s source=%s "
                 "first_page=%d pages=%d", key.lineage, key.index, key.gen, fix.target, fix.kind,
                 fix.source or "hole", fix.first, count)
        if self.metrics is not None:
            self.metrics.scrub_repaired(count)

    def _chunk_size(self, key: ChunkKey) -> int:
        info = self.store.info(key)
        if info is None:
            raise InvalidArgument(f"chunk {tuple(key)!r} left this host during the scrub")
        return info.chunk_size

    async def _read(self, key: ChunkKey, fix: Fix) -> bytes | None:
        """The fix's pages from its source, checked against the wanted checksums (None: the
        source changed meanwhile)."""
        off, length = fix.first * PAGE_SIZE, len(fix.want) * PAGE_SIZE
        try:
            reply = await self._call(fix.source, m.ReadChunk(
                "", key.lineage, key.index, (key.gen,), off, length, self.cluster.epoch))
        except NotFound:  # (its GC collected the generation meanwhile: changed, as below)
            return None
        if reply.gen != key.gen or len(reply.data) != length:
            return None
        mv = memoryview(reply.data)
        for i, want in enumerate(fix.want):
            page = mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            if (page_checksum(page) if want else (0 if page == bytes(PAGE_SIZE) else -1)) != want:
                return None
        return bytes(reply.data)

    async def _call(self, host: str, msg):
        if host == self.host_id:
            reply = self.replica.handle(msg)
            if hasattr(reply, "__await__"):  # (a verify reading with the loop free)
                return await reply
            await trio.lowlevel.checkpoint()
            return reply
        return await self.pool.call(self.cluster.address(host), msg)

    async def _throttle(self, nbytes: int) -> None:
        if not self.rate:
            await trio.lowlevel.checkpoint()
            return
        now = trio.current_time()
        self._next = max(self._next, now) + nbytes / self.rate
        await trio.sleep(max(0.0, self._next - now))

    # --- requests and the background schedule -----------------------------------------------

    async def run_requested(self, req: dict) -> ScrubReport | None:
        """One pass for a `vbp pool scrub` request; progress and the result go back to the
        registry under this host's name."""
        rid, volume = req["id"], req.get("volume", "")
        started = time.time()

        async def publish(report: ScrubReport, state: str = "running", error: str = "") -> None:
            await self.registry.put_scrub_result(rid, self.host_id, {
                **report.to_dict(), "state": state, "error": error, "volume": volume,
                "started": started, "updated": time.time()})

        log.info("event=scrub_requested id=%d volume=%s", rid, volume or "-")
        await publish(ScrubReport())
        try:
            report = await self.run_pass(volume, progress=publish)
        except RegistryUnavailable:
            raise  # the request stays owed: the loop retries it
        except Exception as e:  # the request fails, is reported, and is not retried
            if not isinstance(e, VbpError):
                log.exception("event=scrub_request_failed id=%d", rid)
            await publish(ScrubReport(), "failed", str(e) or type(e).__name__)
            return None
        await publish(report, "done")
        return report

    async def run_loop(self, interval: float, poll: float = 1.0) -> None:
        """Serve scrub requests, and run a background pass every `interval` seconds (0:
        none). The first background pass starts one interval after blockd does."""
        due = trio.current_time() + interval
        while True:
            await trio.sleep(poll)
            try:
                req = await self.registry.scrub_request()
                if req is not None and await self._owes(req):
                    await self.run_requested(req)
                elif interval and trio.current_time() >= due:
                    await self.run_pass()
                    due = trio.current_time() + interval
            except RegistryUnavailable as e:
                log.warning("event=scrub_skipped error=%s", e)
            except Exception:  # one pass failing must not stop the daemon
                log.exception("event=scrub_pass_failed")
                due = trio.current_time() + interval

    async def _owes(self, req: dict) -> bool:
        """The request names this host and it has not finished it (a pass cut short by a
        restart runs again; a host that joined later is not asked)."""
        if self.host_id not in req.get("hosts", ()):
            return False
        mine = (await self.registry.scrub_results(req["id"])).get(self.host_id)
        return mine is None or mine.get("state") not in ("done", "failed")
