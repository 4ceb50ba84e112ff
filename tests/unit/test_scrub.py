"""Scrub (replicator/scrub.py): the pure diagnosis, the peer-side repair, and whole passes
over three in-memory hosts (MemoryChunkStore, Replica, MemoryNetwork: the production objects
the simulation uses) on a virtual clock."""

from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given, settings, strategies as st

from blockd.metrics import Metrics
from control import api
from replicator import messages as m
from replicator.gateway import ClusterView
from replicator.replica import Replica, StaleCopy
from replicator.scrub import CHECKSUM, DIVERGENT, Copy, Fix, Scrubber, diagnose, repair_copy
from replicator.transport import MemoryNetwork
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.layout import PAGE_SIZE, ChunkKey
from vbp.registry import open_registry
from vbp.volume import Reader, VolumeRecord, lacking, take_snapshot

# --- diagnose: the pure core ---------------------------------------------------------------


def test_identical_copies_are_clean():
    sums = (5, 0, 7)
    assert diagnose([Copy("a", 3, sums), Copy("b", 3, sums), Copy("c", 3, sums)]).clean


def test_rotten_page_is_restored_from_a_copy_with_the_same_checksum():
    sums = (5, 6, 7)
    d = diagnose([Copy("a", 3, sums), Copy("b", 3, sums, frozenset({1})), Copy("c", 3, sums)])
    assert [(f.host, f.kind, f.pages) for f in d.findings] == [("b", CHECKSUM, (1,))]
    [fix] = d.fixes
    assert (fix.target, fix.source, fix.first, fix.want, fix.expect) == ("b", "a", 1, (6,), (6,))
    assert not fix.needs_settled  # the checksum names the bytes: right even under writes
    assert not d.unrepairable


def test_divergent_copy_is_outvoted_by_the_agreeing_majority():
    d = diagnose([Copy("a", 3, (5, 6, 7)), Copy("b", 3, (5, 6, 7)), Copy("c", 3, (5, 9, 8))])
    assert [(f.host, f.kind, f.pages) for f in d.findings] == [("c", DIVERGENT, (1, 2))]
    [fix] = d.fixes
    assert (fix.target, fix.source, fix.first, fix.want, fix.expect) == ("c", "a", 1, (6, 7), (9, 8))
    assert fix.needs_settled


def test_a_real_page_where_the_majority_has_a_hole_becomes_a_hole():
    d = diagnose([Copy("a", 1, (0, 4)), Copy("b", 1, (0, 4)), Copy("c", 1, (3, 4))])
    [fix] = d.fixes
    assert (fix.target, fix.source, fix.want) == ("c", None, (0,))


def test_no_majority_is_unrepairable_and_nothing_is_guessed():
    d = diagnose([Copy("a", 1, (1, 2)), Copy("b", 1, (1, 3))])
    assert {(f.host, f.kind, f.pages) for f in d.unrepairable} == {("a", DIVERGENT, (1,)),
                                                                   ("b", DIVERGENT, (1,))}
    assert not d.fixes


def test_a_page_rotten_everywhere_is_unrepairable():
    d = diagnose([Copy("a", 1, (1, 2), frozenset({0})), Copy("b", 1, (1, 2), frozenset({0}))])
    assert not d.fixes
    assert {f.host for f in d.unrepairable} == {"a", "b"}


def test_the_only_copy_rotten_is_unrepairable():
    d = diagnose([Copy("a", 1, (1, 2), frozenset({1}))])
    assert [(f.host, f.kind) for f in d.findings] == [("a", CHECKSUM)]
    assert [(f.host, f.pages) for f in d.unrepairable] == [("a", (1,))]


def test_runs_are_split_at_the_size_limit_and_where_the_source_changes():
    good = (1,) * 10
    d = diagnose([Copy("a", 1, good, frozenset({0, 1, 2})), Copy("b", 1, good, frozenset({3})),
                  Copy("c", 1, good)], max_pages=2)
    assert sorted((f.target, f.source, f.first, len(f.want)) for f in d.fixes) == [
        ("a", "b", 0, 2), ("a", "b", 2, 1), ("b", "a", 3, 1)]


copies_st = st.integers(1, 8).flatmap(lambda n: st.lists(
    st.tuples(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=n, max_size=n),
              st.sets(st.integers(0, n - 1))), min_size=1, max_size=4))


@settings(max_examples=300, deadline=None)
@given(copies_st)
def test_fixes_only_copy_agreed_content_and_repeated_passes_converge(raw):
    # only real pages can rot: a hole (checksum 0) reads as zeros whatever the disk holds
    copies = [Copy(f"h{i}", 1, tuple(s), frozenset(p for p in b if s[p]))
              for i, (s, b) in enumerate(raw)]
    for _ in range(len(copies) + 1):  # a restored page may make a majority the next pass
        d = diagnose(copies)
        by = {c.host: c for c in copies}
        found = {(f.host, p) for f in d.findings for p in f.pages}
        assert {(f.host, p) for f in d.unrepairable for p in f.pages} <= found
        if not d.fixes:
            break
        for fix in d.fixes:
            for i, want in enumerate(fix.want):
                p = fix.first + i
                assert (fix.target, p) in found  # only damaged pages are touched
                if fix.source is None:
                    assert want == 0
                else:  # the source holds exactly the wanted, verified page
                    src = by[fix.source]
                    assert src.sums[p] == want and p not in src.bad
        fixed = {c.host: (list(c.sums), set(c.bad)) for c in copies}
        for fix in d.fixes:
            sums, bad = fixed[fix.target]
            for i, want in enumerate(fix.want):
                sums[fix.first + i] = want
                bad.discard(fix.first + i)
        copies = [Copy(h, 1, tuple(s), frozenset(b)) for h, (s, b) in fixed.items()]
    else:
        raise AssertionError("passes did not converge")
    # what is left is exactly what no agreeing majority can decide
    assert all(f.host for f in d.unrepairable) and not d.fixes


def test_lacking_names_only_copies_a_reader_resolves_older_on():
    head, snap = Reader((1, 2, 3), (), 4, 1), Reader((1, 2), (), 4, 1)
    # b freed 1 (hidden by 2 for every reader): GC lag, no finding; c lost 3, d everything
    held = {"a": {1, 2, 3}, "b": {2, 3}, "c": {1, 2}, "d": set()}
    assert lacking([head, snap], 0, held) == {"c": {3}, "d": {3, 2}}
    assert lacking([head, snap], 0, {"a": {1}, "b": {1}}) == {}
    assert lacking([head], 4, {"a": {3}, "b": set()}) == {}  # past the end: no reader
    cut = Reader((1, 2, 3), ((2, 0),), 4, 1)  # a shrink at chunk 0 hid 1 and 2
    assert lacking([cut], 0, {"a": {1, 2}, "b": set()}) == {}


# --- a pool of three in-memory hosts ---------------------------------------------------------


class InlineRegistry:
    """The registry called inline (blockd uses worker threads): deterministic under MockClock."""

    def __init__(self, reg):
        self.sync = reg

    def __getattr__(self, name):
        fn = getattr(self.sync, name)

        async def call(*a, **kw):
            await trio.lowlevel.checkpoint()
            return fn(*a, **kw)

        return call


_POOLS = itertools.count()


class Pool:
    def __init__(self, replicas: int = 3, size: str = "4M"):
        self.reg = open_registry(f"memory://scrub-{next(_POOLS)}")
        hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}") for i in (1, 2, 3))
        self.cluster = ClusterView(ClusterMap(1, hosts))
        self.net = MemoryNetwork()
        self.stores = {h.id: MemoryChunkStore(None, 1 << 30) for h in hosts}
        self.replicas = {h: Replica(s, h, lambda: 1) for h, s in self.stores.items()}
        for h, r in self.replicas.items():
            self.net.serve(f"{h}:1", r.handle, cluster="t", host_id=h)
        self.vol = api.create_volume(self.reg, "v", size, replicas=replicas, chunk_size="1M")
        self.registry = InlineRegistry(self.reg)

    def hosts(self, index: int) -> tuple[str, ...]:
        return self.cluster.replicas(self.vol.lineage, index, self.vol.replicas)

    def key(self, index: int) -> ChunkKey:
        return ChunkKey(self.vol.lineage, index, self.vol.head)

    def write(self, index: int, page: int, data: bytes, hosts=None) -> None:
        for h in hosts or self.hosts(index):
            self.replicas[h].write("v", self.vol.lineage, index, self.vol.head, self.vol.chain,
                                   page * PAGE_SIZE, data, self.vol.chunk_size, 0, False, 1, 1)

    def scrubber(self, host: str, metrics=None) -> Scrubber:
        return Scrubber(host, self.replicas[host], self.cluster,
                        self.net.pool("t", host), self.registry, metrics=metrics, settle=10)

    def copies(self, index: int) -> dict[str, bytes]:
        return {h: self.stores[h].read(self.key(index), 0, self.vol.chunk_size)
                for h in self.hosts(index)}


def page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


@pytest.fixture
def pool():
    return Pool()


async def test_pass_repairs_a_rotten_page_on_every_host_and_counts_it(pool, autojump_clock):
    cs = pool.vol.chunk_size
    for i in range(3):
        pool.write(i, 0, page(i + 1) * 4)
    # rot: one page on a different host for each chunk (first replica, second, third)
    for i in range(3):
        pool.stores[pool.hosts(i)[i]].corrupt(pool.key(i), 2)
    metrics = {h: Metrics() for h in pool.stores}
    reports = {h: await pool.scrubber(h, metrics[h]).run_pass() for h in pool.stores}
    assert sum(r.chunks for r in reports.values()) == 3  # each chunk scrubbed once
    assert sum(r.errors.get(CHECKSUM, 0) for r in reports.values()) == 3
    assert sum(r.repaired for r in reports.values()) == 3
    assert sum(r.unrepairable for r in reports.values()) == 0
    for i in range(3):
        copies = pool.copies(i)
        assert set(copies.values()) == {(page(i + 1) * 4).ljust(cs, b"\0")}
        assert all(pool.stores[h].verify(pool.key(i)) == [] for h in copies)
    def counted(name: str) -> float:  # summed over the hosts (placement picks who scrubs)
        return sum(float(line.rsplit(" ", 1)[1]) for x in metrics.values()
                   for line in x.exposition().decode().splitlines() if line.startswith(name + " "))

    assert counted('vbp_scrub_errors_total{kind="checksum"}') == 3
    assert counted('vbp_scrub_errors_total{kind="divergent"}') == 0
    assert counted("vbp_scrub_repairs_total") == 3
    assert counted("vbp_scrub_chunks_total") == 3


async def test_divergent_copy_with_the_same_version_is_repaired(pool, autojump_clock):
    pool.write(0, 0, page(7) * 3)
    odd = pool.hosts(0)[2]
    key = pool.key(0)
    version = pool.stores[odd].info(key).version
    pool.stores[odd].write(key, PAGE_SIZE, page(9), chunk_size=pool.vol.chunk_size, version=version)
    report = await pool.scrubber(pool.hosts(0)[0]).run_pass()
    assert report.errors == {DIVERGENT: 1} and report.repaired == 1
    assert len(set(pool.copies(0).values())) == 1
    assert pool.stores[odd].info(key).version == version  # a repair is not a new write


async def test_stale_copy_is_left_to_resync(pool, autojump_clock):
    pool.write(0, 0, page(1))
    old = pool.hosts(0)[1]
    pool.write(0, 0, page(2), hosts=[h for h in pool.hosts(0) if h != old])
    pool.reg.mark_stale(pool.vol.lineage, 0, [old], 1)
    report = await pool.scrubber(pool.hosts(0)[0]).run_pass()
    assert report.error_pages == 0 and report.repaired == 0
    assert pool.copies(0)[old][:PAGE_SIZE] == page(1)  # untouched: resync's job


async def test_two_replicas_disagreeing_are_reported_unrepairable_and_left_alone(autojump_clock):
    pool = Pool(replicas=2)
    pool.write(0, 0, page(1))
    a, b = pool.hosts(0)
    v = pool.stores[b].info(pool.key(0)).version
    pool.stores[b].write(pool.key(0), 0, page(2), chunk_size=pool.vol.chunk_size, version=v)
    report = await pool.scrubber(a).run_pass()
    assert report.unrepairable == 2 and report.repaired == 0
    copies = pool.copies(0)
    assert copies[a][:PAGE_SIZE] == page(1) and copies[b][:PAGE_SIZE] == page(2)


async def test_a_write_in_flight_is_never_undone(pool, autojump_clock):
    """A write that reached one replica before the first look and the others during the
    settle time makes that replica the odd one out for a moment; it must not be 'repaired'
    back to the old bytes."""
    pool.write(0, 0, page(1))
    first, *others = pool.hosts(0)
    pool.write(0, 0, page(2), hosts=[others[0]])
    scrubber = pool.scrubber(first)

    async def rest_of_the_write():
        await trio.sleep(1)
        pool.write(0, 0, page(2), hosts=[first, others[1]])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest_of_the_write)
        report = await scrubber.run_pass()
    assert report.repaired == 0 and report.error_pages == 0
    assert set(pool.copies(0).values()) == {page(2).ljust(pool.vol.chunk_size, b"\0")}


async def test_a_rotten_page_with_no_good_copy_is_unrepairable(autojump_clock):
    pool = Pool(replicas=1)
    pool.write(0, 0, page(3))
    [h] = pool.hosts(0)
    pool.stores[h].corrupt(pool.key(0), 0)
    report = await pool.scrubber(h).run_pass()
    assert report.errors == {CHECKSUM: 1} and report.unrepairable == 1 and report.repaired == 0


def test_repair_is_refused_when_the_pages_changed_meanwhile(pool):
    pool.write(0, 0, page(1))
    h = pool.hosts(0)[0]
    store, key = pool.stores[h], pool.key(0)
    version, sums = store.page_checksums(key)
    msg = m.RepairPages(key.lineage, 0, key.gen, pool.vol.chunk_size, 0, (sums[0],), version,
                        False, 1, page(5))
    pool.write(0, 0, page(2), hosts=[h])  # a client write lands first
    assert repair_copy(pool.replicas[h], msg).applied is False
    assert store.read(key, 0, PAGE_SIZE) == page(2)
    version, sums = store.page_checksums(key)
    ok = repair_copy(pool.replicas[h], m.RepairPages(key.lineage, 0, key.gen, pool.vol.chunk_size,
                                                     0, (sums[0],), version, False, 1, page(5)))
    assert ok.applied and store.read(key, 0, PAGE_SIZE) == page(5)
    pool.replicas[h].stale_self = {(key.lineage, 0)}
    with pytest.raises(StaleCopy):
        repair_copy(pool.replicas[h], msg)


async def test_requested_scrub_writes_progress_and_result_back(pool, autojump_clock):
    pool.write(0, 0, page(1))
    first = pool.hosts(0)[0]
    pool.stores[pool.hosts(0)[1]].corrupt(pool.key(0), 0)
    rid = pool.reg.request_scrub(["h1", "h2", "h3"], volume="v")
    async with trio.open_nursery() as nursery:
        for h in pool.stores:
            nursery.start_soon(pool.scrubber(h).run_loop, 0)
        while len([r for r in pool.reg.scrub_results(rid).values() if r["state"] == "done"]) < 3:
            await trio.sleep(1)
        nursery.cancel_scope.cancel()
    results = pool.reg.scrub_results(rid)
    assert results[first]["errors"] == {CHECKSUM: 1} and results[first]["repaired"] == 1
    assert sum(r["chunks"] for r in results.values()) == 1
    # a newer request drops the old results; a host not named in it is not asked
    rid2 = pool.reg.request_scrub(["h1"])
    assert pool.reg.scrub_results(rid) == {} and pool.reg.scrub_request()["id"] == rid2
    assert not await pool.scrubber("h2")._owes(pool.reg.scrub_request())


async def test_scrub_of_an_unknown_volume_fails_the_request(pool, autojump_clock):
    rid = pool.reg.request_scrub(["h1"], volume="nope")
    await pool.scrubber("h1").run_requested(pool.reg.scrub_request())
    r = pool.reg.scrub_results(rid)["h1"]
    assert r["state"] == "failed" and "nope" in r["error"]


# --- presence: a copy missing on a current replica --------------------------------------------


def snapshot(pool: Pool, name: str) -> int:
    """Snapshot `name` of v, completed at once; v's new head generation."""
    head = pool.reg.next_id(api.gen_counter(pool.vol.lineage))
    pool.reg.update_volume("v", lambda d: take_snapshot(VolumeRecord.from_dict(d), name, head).to_dict())
    pool.vol = api.get_volume(pool.reg, "v")
    return head


async def scrub_all(pool: Pool) -> int:
    """A pass of every host; the copies they found missing."""
    return sum([(await pool.scrubber(h).run_pass()).missing for h in pool.stores])


def stale_hosts(pool: Pool, index: int = 0) -> set[str]:
    return {r.host_id for r in pool.reg.list_stale(pool.vol.lineage) if r.index == index}


@pytest.mark.parametrize("which", [0, 1, 2], ids=["first", "second", "third"])
async def test_a_chunk_lost_by_a_current_replica_is_recorded_stale(pool, autojump_clock, which):
    """Whichever up replica lost its copy, the first up replica that holds one judges
    the chunk, and only the copy that lost it is recorded stale (resync brings it back)."""
    pool.write(0, 0, page(1))
    victim = pool.hosts(0)[which]
    pool.stores[victim].delete(pool.key(0))
    assert await scrub_all(pool) == 1
    assert stale_hosts(pool) == {victim}


@pytest.mark.parametrize("which", [0, 1], ids=["first", "second"])
async def test_a_generation_lost_under_a_snapshot_is_recorded_stale(pool, autojump_clock, which):
    """A copy that kept the snapshot's generation but lost the head's copy-up reads the
    snapshot's bytes through the head: missing too, wherever it is."""
    pool.write(0, 0, page(1))
    g1 = pool.vol.head
    g2 = snapshot(pool, "s")
    pool.write(0, 0, page(2))  # the copy-up, on every replica
    victim = pool.hosts(0)[which]
    pool.stores[victim].delete(ChunkKey(pool.vol.lineage, 0, g2))
    assert pool.stores[victim].gens(pool.vol.lineage, 0) == [g1]
    assert await scrub_all(pool) == 1
    assert stale_hosts(pool) == {victim}


async def test_generations_only_some_hosts_freed_are_not_missing(pool, autojump_clock):
    """GC frees on each host in its own time: a snapshot deleted, one host freed its
    generation (hidden by the head's copy-up), the others not yet; and another host freed
    it after the pass read the records (which still named the snapshot). Neither is a
    copy missing anything. Nor is a chunk nobody wrote."""
    pool.write(0, 0, page(1))
    g1 = pool.vol.head
    snapshot(pool, "s")
    pool.write(0, 0, page(2))
    api.delete_volume(pool.reg, "v@s")
    a, b, c = pool.hosts(0)
    pool.stores[b].delete(ChunkKey(pool.vol.lineage, 0, g1))
    assert await scrub_all(pool) == 0

    snapshot(pool, "t")  # again, the records read at the pass's start naming t
    pool.write(0, 0, page(3))
    g2 = pool.vol.chain[-2]
    pool.stores[c].delete(ChunkKey(pool.vol.lineage, 0, g2))  # t gone, freed on c only
    old = pool.reg.list_volumes()
    api.delete_volume(pool.reg, "v@t")
    registry = pool.registry
    answers = iter([old])

    async def list_volumes():  # the pass's start: before the delete
        await trio.lowlevel.checkpoint()
        return next(answers, None) or pool.reg.list_volumes()

    pool.registry = type("Later", (), {"__getattr__": lambda s, n: getattr(registry, n),
                                       "list_volumes": staticmethod(list_volumes)})()
    t0 = trio.current_time()
    report = await pool.scrubber(a).run_pass()
    assert trio.current_time() - t0 >= 10  # (c looked like missing t's generation: a second look)
    assert report.missing == 0 and not stale_hosts(pool)


async def test_a_copy_up_under_way_is_not_missing(pool, autojump_clock):
    """The first write after a snapshot reached two copies before the first look and
    reaches the third during the settle time: nothing is recorded."""
    pool.write(0, 0, page(1))
    snapshot(pool, "s")
    first, second, third = pool.hosts(0)
    pool.write(0, 0, page(2), hosts=[first, second])

    async def rest_of_the_write():
        await trio.sleep(1)
        pool.write(0, 0, page(2), hosts=[third])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rest_of_the_write)
        report = await pool.scrubber(first).run_pass()
    assert report.missing == 0 and not stale_hosts(pool)


async def test_copies_missing_in_many_chunks_wait_one_settling_time_together(autojump_clock):
    """Each chunk that looks like a copy misses something is looked at again `settle`
    seconds later: for many such chunks (a replica that lost its store) once for all of
    them, not once each (ten chunks at 10 s each were 100 s of a pass)."""
    pool = Pool(size="16M")
    for i in range(10):
        pool.write(i, 0, page(i + 1))
    victims = {}
    for i in range(10):
        victims[i] = pool.hosts(i)[1]
        pool.stores[victims[i]].delete(pool.key(i))
    t0 = trio.current_time()
    assert await scrub_all(pool) == 10
    assert trio.current_time() - t0 < 4 * 10  # (a settling time per pass, of 3 passes)
    for i in range(10):
        assert stale_hosts(pool, i) == {victims[i]}


async def test_a_repair_source_whose_gc_collected_the_generation_meanwhile_is_changed(pool):
    """Review of b8b97e3: a repair reads its pages from the source by the chain (gen,).
    The source's GC collected that generation meanwhile (its volume deleted, the lineage
    kept by a clone): its ReadChunk answers NotFound, not gen -1, which failed the repair
    (scrub_repair_failed) where it is "the source changed meanwhile" (None, looked at
    again by the next pass)."""
    pool.write(0, 0, page(7))
    target, source = pool.hosts(0)[:2]
    key = pool.key(0)
    want = pool.stores[source].page_checksums(key)[1][:1]
    fix = Fix(target, source, "divergent", 0, tuple(want), tuple(want), 1, False)
    scrubber = pool.scrubber(target)
    assert await scrubber._read(key, fix) == page(7)
    pool.stores[source].mark_collected({key.lineage: {key.gen}})
    pool.stores[source].delete(key)
    assert await scrubber._read(key, fix) is None
