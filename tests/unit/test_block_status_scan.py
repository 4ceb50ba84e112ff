"""Block status over a thin volume's many chunks (replicator/gateway.py, _block_status_scan;
replicator/replica.py, range_extents): every host says in one RangeExtents which chunks
of the range it holds, instead of the gateway placing every chunk and asking another
host for each one it does not hold (a peer request per chunk: an empty 1 TiB volume of
replicas=1 over three hosts took a minute to map). The answers must be the ones the
chunk-by-chunk path gives: a hole only where a current copy has nothing.

Over in-memory hosts of the simulation harness (tests/sim), background loops off, on a
virtual clock; the replica's half also over a real chunk store."""

from __future__ import annotations

import random
from dataclasses import replace as dc_replace

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from replicator import gateway
from replicator import messages as m
from replicator.replica import Replica
from tests.sim.harness import Sim, call
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import InvalidArgument
from vbp.layout import ChunkKey, MiB
from vbp.placement import Placement

PAGE = 4096
HOLE = gateway._HOLE_FLAGS
SIZE = 64 * MiB  # 64 chunks of 1 MiB


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def expected(written: set[int], offset: int, length: int) -> list[tuple[int, int]]:
    """The merged status runs of [offset, offset+length) when the pages `written` hold
    data and every other page is a hole."""
    runs: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        page = pos // PAGE
        n = min(end, (page + 1) * PAGE) - pos
        flags = 0 if page in written else HOLE
        if runs and runs[-1][1] == flags:
            runs[-1] = (runs[-1][0] + n, flags)
        else:
            runs.append((n, flags))
        pos += n
    return runs


async def mapped(gw, offset: int, length: int) -> list[tuple[int, int]]:
    """The runs of the range as a client gathers them: asking again from where each
    answer ends, merged."""
    runs: list[tuple[int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        part = await call(gw.block_status(pos, end - pos))
        assert part and sum(n for n, _ in part) <= end - pos
        for n, flags in part:
            if runs and runs[-1][1] == flags:
                runs[-1] = (runs[-1][0] + n, flags)
            else:
                runs.append((n, flags))
        pos += sum(n for n, _ in part)
    return runs


async def thin_volume(nursery, replicas: int, seed: int = 3, pages: int = 24):
    """A started 4-host sim, a 64 MiB volume of 1 MiB chunks with `replicas`, a gateway on
    h0 that wrote `pages` random pages (some runs of two) over a few chunks; returns
    (sim, record, gateway, pages written, the messages h0 sent: [(address, message)])."""
    sim = Sim(seed, hosts=4, zones=4)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", SIZE, replicas=replicas, min_size=1)
    gw = await sim.hosts["h0"].provider.open_export("v")
    rng = random.Random(seed)
    written: set[int] = set()
    chunks = rng.sample(range(SIZE // MiB), 6)
    for _ in range(pages):
        page = rng.choice(chunks) * (MiB // PAGE) + rng.randrange(MiB // PAGE)
        run_of = rng.choice((1, 1, 2)) if (page + 1) % (MiB // PAGE) else 1
        await call(gw.write(page * PAGE, b"\x05" * (run_of * PAGE), False))
        written.update(range(page, page + run_of))
    sent: list = []
    faults = sim.hosts["h0"].faults
    on_call = faults.on_call

    def seen(address, message):
        sent.append((address, message))
        return on_call(address, message)

    faults.on_call = seen
    return sim, rec, gw, written, sent


RANGES = [(0, SIZE), (3 * PAGE, SIZE - 5 * PAGE), (5 * MiB + 100, 40 * MiB), (MiB, 16 * MiB)]


@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
def test_a_thin_range_is_mapped_with_one_request_per_host(replicas):
    """Every page written reads as data and every other as a hole, over ranges of 16
    chunks or more, aligned or not; and each block status sent one RangeExtents to
    each other host, nothing else (before: a ChunkExtents for each chunk placed
    elsewhere, 48 of 64 chunks at replicas=1). With a copy of every chunk here
    (replicas=4 of 4 hosts), none: this host's copies tell the holes."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, replicas)
            for offset, length in RANGES:
                sent.clear()
                assert await mapped(gw, offset, length) == expected(written, offset, length)
                assert all(type(msg) is m.RangeExtents for _, msg in sent), sent
                others = 0 if replicas == 4 else 3  # (h1, h2, h3 once)
                assert len(sent) == len({a for a, _ in sent}) == others
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_scan_answers_a_prefix_when_the_runs_pass_the_limits(monkeypatch, replicas):
    """A host stops its RangeRuns once the runs pass RANGE_RUNS_MAX and the gateway its
    reply at STATUS_RUNS: each answer covers a prefix, and the client asking again
    from where it ended gets every run, as from one answer."""
    monkeypatch.setattr(m, "RANGE_RUNS_MAX", 3)
    monkeypatch.setattr(gateway, "STATUS_RUNS", 5)

    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, replicas, pages=40)
            for offset, length in RANGES:
                assert await mapped(gw, offset, length) == expected(written, offset, length)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_host_that_does_not_answer_leaves_the_range_to_each_chunk():
    """With h3 cut off from the gateway, no scan can say which chunks are holes (h3 may
    hold the only current copy of some): the range goes chunk by chunk, each asked of
    a copy that answers, and the map is still exact (replicas=2: every chunk has one)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, 2)
            sim.hosts["h0"].faults.partition([sim.hosts["h3"].addr])
            for offset, length in RANGES:
                assert await mapped(gw, offset, length) == expected(written, offset, length)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_chunk_whose_copies_are_all_recorded_stale_is_data_not_a_hole():
    """Chunk 7 is held by no host and both its copies are recorded stale (its writes
    lost everywhere, say, before an election): no copy can say it is a hole, so it is
    reported as data, as chunk by chunk (zeros read as data are correct; a hole over
    data that a resync brings back is not). One copy current again: a hole."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, 2)
            copies = gw.cluster.replicas(rec.lineage, 7, 2)
            assert not any(p // (MiB // PAGE) == 7 for p in written)
            gw.adopt_stale(dict(gw.stale), {**gw.stale, 7: frozenset(copies)})
            data = set(written) | set(range(7 * MiB // PAGE, 8 * MiB // PAGE))
            assert await mapped(gw, 0, SIZE) == expected(data, 0, SIZE)
            gw.adopt_stale(dict(gw.stale), {**gw.stale, 7: frozenset(copies[:1])})
            assert await mapped(gw, 0, SIZE) == expected(written, 0, SIZE)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("how", ["recorded", "known here"])
@pytest.mark.parametrize("replicas", [2, 4])
def test_a_stale_copy_that_lacks_a_chunk_is_never_the_one_that_answers(how, replicas):
    """h0's copy of a written chunk is stale and lacks it (its write failed): recorded
    so in the gateway's map, or known so by h0's replica alone (which answers -1). The
    scan finds the current copy's runs, not h0's nothing; with a copy of every chunk on
    h0 (replicas=4), where h0's copies alone were scanned, it asks another copy."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, replicas)
            index = next(i for i in range(SIZE // MiB)  # (h0 the first copy asked)
                         if gw.cluster.replicas(rec.lineage, i, replicas)[0] == "h0"
                         and not any(p // (MiB // PAGE) == i for p in written))
            other = gw.cluster.replicas(rec.lineage, index, replicas)[1]
            sim.hosts[other].replica.write("v", rec.lineage, index, gw.gen, gw.chain, 0,
                                           b"\x09" * PAGE, rec.chunk_size, 0, False,
                                           gw.cluster.epoch, gw.token)
            if how == "recorded":
                gw.adopt_stale(dict(gw.stale), {**gw.stale, index: frozenset({"h0"})})
            else:
                sim.hosts["h0"].replica.stale_self = {(rec.lineage, index)}
            data = written | {index * MiB // PAGE}
            assert await mapped(gw, 0, SIZE) == expected(data, 0, SIZE)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_host_of_an_older_revision_is_asked_one_chunk_at_a_time():
    """h2 advertises PEER_REV 11, which knows no RangeExtents: no scan (it could not
    answer one), and h2 gets a ChunkExtents for each chunk asked of it, the other hosts
    one RangeExtents each for all of theirs. The map is the same."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, 1)
            cmap = gw.cluster.map
            old = dc_replace(cmap, hosts=tuple(
                dc_replace(h, peer_rev=m.RANGE_EXTENTS_REV - 1) if h.id == "h2" else h
                for h in cmap.hosts))
            gw.cluster.set_map(old)
            assert await mapped(gw, 0, SIZE) == expected(written, 0, SIZE)
            to_h2 = [msg for a, msg in sent if a == sim.hosts["h2"].addr]
            on_h2 = [i for i in range(SIZE // MiB)
                     if gw.cluster.replicas(rec.lineage, i, 1) == ("h2",)]
            assert sorted(msg.index for msg in to_h2) == on_h2
            assert all(type(msg) is m.ChunkExtents for msg in to_h2)
            others = [msg for a, msg in sent if a != sim.hosts["h2"].addr]
            assert all(type(msg) is m.RangeExtents and msg.indexes for msg in others)
            assert len(others) == 2
            nursery.cancel_scope.cancel()

    run(main)


# --- the replica's half -------------------------------------------------------------------


def replica_with(pages: dict[int, set[int]], chunk_size: int = MiB) -> Replica:
    """A Replica over a memory store holding generation 1 of lineage "lin": chunk i with
    the pages of pages[i] written."""
    store = MemoryChunkStore(capacity=256 * MiB)
    for index, written in pages.items():
        for page in written:
            store.write(ChunkKey("lin", index, 1), page * PAGE, b"\x01" * PAGE,
                        chunk_size=chunk_size)
    return Replica(store, "h1", lambda: 1)


def chunk_by_chunk(replica: Replica, start: int, end: int, cs: int, indexes) -> dict:
    """What ChunkExtents answers for each chunk: {index: runs or None (a hole)}."""
    out = {}
    for i in indexes:
        lo, hi = max(start - i * cs, 0), min(end - i * cs, cs)
        reply = replica.handle(m.ChunkExtents("lin", i, (1,), lo, hi - lo, 1))
        out[i] = reply.runs if reply.found else None
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.dictionaries(st.integers(0, 40), st.sets(st.integers(0, 255), max_size=12),
                             max_size=10),
       start=st.integers(0, 41 * MiB - 1), span=st.integers(1, 41 * MiB),
       explicit=st.booleans(), limit=st.integers(1, 64))
def test_range_extents_answers_each_chunk_as_chunk_extents_does(pages, start, span, explicit,
                                                                 limit):
    """RangeExtents, of a range or of a list of chunks in it, answers a prefix of them
    (all unless the runs passed RANGE_RUNS_MAX, at least one) exactly as a ChunkExtents
    of each would: the chunks held listed with their runs, the others holes."""
    cs = MiB
    end = min(start + span, 41 * MiB)
    replica = replica_with(pages, cs)
    every = list(range(start // cs, (end - 1) // cs + 1))
    asked = [i for i in every if i % 3 != 1] or every[:1] if explicit else every
    original = m.RANGE_RUNS_MAX
    m.RANGE_RUNS_MAX = limit
    try:
        reply = replica.handle(m.RangeExtents("lin", (1,), cs, start, end, 1,
                                              tuple(asked) if explicit else ()))
    finally:
        m.RANGE_RUNS_MAX = original
    assert type(reply) is m.RangeRuns and 1 <= reply.done <= len(asked)
    if reply.done < len(asked):
        assert len(reply.runs) >= 2 * limit
    truth = chunk_by_chunk(replica, start, end, cs, asked[:reply.done])
    got, at = {}, 0
    for i, k in zip(reply.indexes, reply.states):
        got[i] = reply.runs[at:at + 2 * k]
        at += 2 * k
    assert at == len(reply.runs)
    assert got == {i: runs for i, runs in truth.items() if runs is not None}


def test_range_extents_answers_minus_one_for_each_stale_copy():
    replica = replica_with({2: {0}, 3: {1}})
    replica.stale_self = {("lin", 3)}
    reply = replica.handle(m.RangeExtents("lin", (1,), MiB, 0, 8 * MiB, 1))
    assert (reply.done, reply.indexes, reply.states) == (8, (2, 3), (2, -1))
    with pytest.raises(Exception):  # (ChunkExtents refuses it alike)
        replica.handle(m.ChunkExtents("lin", 3, (1,), 0, MiB, 1))


@pytest.mark.parametrize("msg, why", [
    (m.RangeExtents("lin", (1,), MiB, 0, (m.RANGE_CHUNKS_MAX + 1) * MiB, 1), "at most"),
    (m.RangeExtents("lin", (1,), MiB, 0, MiB, 1, tuple(range(m.RANGE_CHUNKS_MAX + 1))),
     "at most"),
    (m.RangeExtents("lin", (1,), MiB, 0, 8 * MiB, 1, (3, 2)), "ascending"),
    (m.RangeExtents("lin", (1,), MiB, 0, 8 * MiB, 1, (2, 2)), "ascending"),
    (m.RangeExtents("lin", (1,), MiB, MiB, 8 * MiB, 1, (0, 2)), "outside"),
    (m.RangeExtents("lin", (1,), MiB, 0, 8 * MiB, 1, (8,)), "outside"),
    (m.RangeExtents("lin", (1,), 0, 0, 8 * MiB, 1), "chunks of 0"),
    (m.RangeExtents("lin", (1,), MiB, 4096, 4096, 1), "chunks of"),
    (m.RangeExtents("lin", (1,), MiB, -1, 4096, 1), "chunks of"),
])
def test_a_range_extents_out_of_bounds_is_refused_whole(msg, why):
    replica = replica_with({2: {0}})
    with pytest.raises(InvalidArgument, match=why):
        replica.handle(msg)


# --- placement ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hosts=st.integers(1, 6), n=st.integers(1, 6), zones=st.integers(1, 3),
       down=st.integers(0, 2))
def test_everywhere_names_the_hosts_in_every_chunks_placement(hosts, n, zones, down):
    records = tuple(HostRecord(f"h{i}", f"a{i}:1", f"a{i}:2", zone=f"z{i % zones}",
                               capacity=(1 + i % 2) << 30,
                               state="down" if i < down else "up") for i in range(hosts))
    p = Placement(ClusterMap(1, records))
    every = p.everywhere(n)
    placed = [set(p.place("lin", i, n)) for i in range(200)]
    assert every == frozenset.intersection(*map(frozenset, placed)) or not every
    eligible = {h.id for h in records if h.state == "up"}
    assert every == (frozenset(eligible) if len(eligible) <= n else frozenset())


@pytest.mark.parametrize("replicas", [1, 3])
def test_a_clone_maps_its_parents_pages_and_its_own(replicas):
    """A clone of a snapshot reads its parent's chunks until it writes them (the chunks
    of the snapshot's generation, in the clone's chain): its map shows the parent's
    pages as data, and its own writes, whether scanned (the whole volume) or chunk by
    chunk (ranges of fewer than SCAN_CHUNKS chunks); the parent's head, written after
    the snapshot, does not show through."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, written, sent = await thin_volume(nursery, replicas)
            async with trio.open_nursery() as snap:
                snap.start_soon(sim.snapshot, "v", "s1")
                chain = gw.chain
                while gw.chain == chain:
                    await sim.hosts["h0"].provider.sync_records()
                    await trio.sleep(0.05)
            later = max(written) + 3
            await call(gw.write(later * PAGE, b"\x07" * PAGE, False))  # (the head's alone)
            sim.clone("v@s1", "c")
            clone = await sim.hosts["h1"].provider.open_export("c")
            mine = min(written) + 5
            await call(clone.write(mine * PAGE, b"\x08" * PAGE, False))
            want = written | {mine}
            assert await mapped(clone, 0, SIZE) == expected(want, 0, SIZE)
            for i in range(0, SIZE // MiB, 4):
                assert await mapped(clone, i * MiB, 4 * MiB) == expected(want, i * MiB, 4 * MiB)
            assert await mapped(gw, 0, SIZE) == expected(written | {later}, 0, SIZE)
            nursery.cancel_scope.cancel()

    run(main)


_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(msg=st.builds(m.RangeExtents, lineage=st.sampled_from(["lin", "", "other"]),
                     chain=st.lists(_ints, max_size=4).map(tuple),
                     chunk_size=st.one_of(_ints, st.sampled_from([MiB, 4 * MiB, 1])),
                     start=st.one_of(_ints, st.integers(0, 64 * MiB)),
                     end=st.one_of(_ints, st.integers(0, 64 * MiB)), epoch=_ints,
                     indexes=st.one_of(st.just(()), st.lists(st.one_of(_ints, st.integers(0, 70)),
                                                             max_size=8).map(tuple)),
                     rid=st.text(max_size=8)))
@example(msg=m.RangeExtents("lin", (1,), 1, 0, 2**64 - 1, 1))  # (OverflowError, found by
@example(msg=m.RangeExtents("lin", (1,), 2**63, 0, 2**64 - 1, 1))  # hand: len() of the range)
def test_any_range_extents_is_answered_or_refused_as_bad_input(msg):
    """Whatever a peer puts in a RangeExtents that the codec lets through (any 64-bit
    integers), the replica answers it or refuses it with InvalidArgument (an Error reply
    to that request), never another exception, and never loops over a range of more
    than RANGE_CHUNKS_MAX chunks."""
    replica = replica_with({2: {0, 5}, 3: {1}})
    try:
        reply = replica.handle(msg)
    except InvalidArgument:
        return
    assert type(reply) is m.RangeRuns and 1 <= reply.done <= m.RANGE_CHUNKS_MAX


@pytest.mark.parametrize("reply", [
    m.RangeRuns(4, (2,), (0,), ()),  # a chunk listed with no run: its piece would vanish
    m.RangeRuns(4, (2,), (1,), (0, 1)),  # a run of no length
    m.RangeRuns(4, (2,), (1,), (-4096, 0)),
    m.RangeRuns(4, (2,), (2,), (4096, 0)),  # runs missing
    m.RangeRuns(0, (), (), ()),  # nothing answered
    m.RangeRuns(5, (), (), ()),  # more than asked
])
def test_a_reply_no_replica_sends_fails_the_scan(reply):
    """A RangeRuns a replica never sends (a peer's bug) makes the scan give up (None: the
    range goes chunk by chunk), never shifts the runs of the chunks after it: a chunk
    listed with no run dropped its piece from the merged map, and the next chunk's runs
    took its place."""
    good = m.RangeRuns(4, (1,), (1,), (MiB, 0))
    assert gateway._scanned({"h1": good}, 1, 4) == ({1: {"h1": [(MiB, False)]}}, 4)
    assert gateway._scanned({"h1": good, "h2": reply}, 2, 4) is None


def test_a_small_range_of_a_pool_of_more_hosts_than_chunks_asks_only_their_hosts():
    """20 hosts, replicas=1, a range of 16 chunks: the scan would ask all 19 other hosts
    (and wait for the slowest); chunk by chunk asks only the hosts of those chunks, one
    RangeExtents each. The map is the same."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(5, hosts=20, zones=4)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", SIZE, replicas=1, min_size=1)
            gw = await sim.hosts["h0"].provider.open_export("v")
            for i in (0, 5, 9, 15, 40):
                await call(gw.write(i * MiB + 8192, b"\x05" * PAGE, False))
            sent: list = []
            faults = sim.hosts["h0"].faults
            on_call = faults.on_call
            faults.on_call = lambda a, msg: sent.append((a, msg)) or on_call(a, msg)
            written = {(i * MiB + 8192) // PAGE for i in (0, 5, 9, 15)}
            assert await mapped(gw, 0, 16 * MiB) == expected(written, 0, 16 * MiB)
            placed = {gw.cluster.replicas(rec.lineage, i, 1)[0] for i in range(16)} - {"h0"}
            assert {a for a, _ in sent} == {sim.hosts[h].addr for h in placed}
            assert len(sent) == len(placed) and all(type(msg) is m.RangeExtents for _, msg in sent)
            sent.clear()  # (the whole volume, 64 chunks: scanned)
            assert await mapped(gw, 0, SIZE) == expected(written | {40 * MiB // PAGE + 2}, 0, SIZE)
            assert len(sent) == 19
            nursery.cancel_scope.cancel()

    run(main)
