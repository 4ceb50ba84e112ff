"""WriteBatch: the small writes of one run the NBD server dispatches go to each replica as
one frame (VolumeGateway.begin_writes / end_writes), over the real peer transport on
loopback, and each write still settles as it would have on its own: a refused batch
fails every item on that replica, a stale copy is reported item by item, an old peer or
a large write goes one WriteChunk per write."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace as dc_replace
import logging
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockd.service import AsyncRegistry
from control import api
from replicator import messages as m
from replicator.gateway import BATCH_ITEMS, BATCH_MIN, BATCH_PIECE, ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from vbp.chunkstore import SYNC_AHEAD_MIN, ChunkStore
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import BelowMinSize, Fenced, InvalidArgument, LeaseExpired, NoSpace
from vbp.later import Later
from vbp import reqid
from vbp.layout import ChunkKey
from tests.sim.harness import extents_bytes
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of

pytestmark = pytest.mark.timeout(60)
CLUSTER = "batch"
_POOLS = itertools.count()
CHUNK = 1 << 20


@asynccontextmanager
async def three_hosts(revs=(m.PEER_REV, m.PEER_REV, m.PEER_REV), h1_store=None,
                      copies: int = 3, size: int = 8 * CHUNK):
    """A gateway on h1 and replicas h1..h3, h2 and h3 served by real serve_peers; yields
    (gateway, replicas, registry, {host: [types of the messages it handled]},
    {host: cancel scope killing its server}). `copies`: the volume's replicas (min_size
    2, or 1 for fewer than 3)."""
    reg = open_registry(f"memory://write-batch-{next(_POOLS)}")
    replicas = {h: Replica(h1_store if h == "h1" and h1_store is not None
                           else MemoryChunkStore(None, 1 << 30), h, lambda: 1)
                for h in ("h1", "h2", "h3")}
    seen: dict[str, list] = {"h2": [], "h3": []}
    async with trio.open_nursery() as nursery:
        ports, kills = {}, {}
        for h in ("h2", "h3"):
            scope = trio.CancelScope()

            def handler(msg, peer=None, h=h):
                seen[h].append(msg)
                return replicas[h].handle(msg, peer)

            async def serve(h=h, scope=scope, handler=handler, task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await serve_peers(handler, "127.0.0.1", 0, cluster=CLUSTER, host_id=h,
                                      task_status=task_status)

            ports[h] = await nursery.start(serve)
            kills[h] = scope
        hosts = tuple(HostRecord(h, f"127.0.0.1:{ports.get(h, 1)}", f"127.0.0.1:{ports.get(h, 1)}",
                                 pod=f"p{h}", peer_rev=rev) for h, rev in zip(("h1", "h2", "h3"), revs))
        cluster = ClusterView(ClusterMap(1, hosts))
        api.create_volume(reg, "v", size, replicas=copies, min_size=min(2, copies - 1),
                          chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                               host_id="h1", replica=replicas["h1"], cluster=cluster, pool=pool,
                               registry=AsyncRegistry(reg),
                               token=reg.acquire_lease("v", "h1", 3600).token)
            for i in range(size // CHUNK):  # connections up, every chunk made: the runs
                # below are clean
                await gw.write(i * CHUNK, b"\x01" * 4096, False)
            for s in seen.values():
                s.clear()
            yield gw, replicas, reg, seen, kills
        nursery.cancel_scope.cancel()


def copy_of(replica: Replica, gw: VolumeGateway, index: int, offset: int, length: int) -> bytes:
    store = replica.store
    gen = store.resolve(gw.lineage, index, gw.chain_for(index))
    return bytes(store.read(ChunkKey(gw.lineage, index, gen), offset, length))


# the NBD server's request ids, as write_run sees them (the ids after seq are the run's)
IDS = reqid.RequestIds("h1", 0xAB)
# run() hands its writes to write_run first (the mode fixture); "taken": how many it took
MODE = {"run": False, "taken": 0}


def took(mode: str, count: int) -> int:
    """How many of a run's writes write_run takes in `mode`: `count`, or none at all."""
    return count if mode == "write_run" else 0


@pytest.fixture(params=["write", "write_run"])
def mode(request):
    """The tests that take it run twice: their writes go to write() one by one, as the
    NBD server hands them over when the export has no write_run, then to write_run
    first and write() for the rest, as it does with one."""
    MODE["run"] = request.param == "write_run"
    yield request.param
    MODE["run"] = False


class Taken:
    """The writes write_run took, under way: `parts` ((places, Later) each) say how."""

    def __init__(self, parts: list, count: int):
        self.parts, self.count = parts, count

    async def outcomes(self) -> list:
        """Each write's outcome, in the run's order, once its part's Later completes:
        every write taken is in exactly one part."""
        got: list = [Ellipsis] * self.count
        for places, later in self.parts:
            outcomes = await later
            assert len(outcomes) == len(places)
            for k, o in zip(places, outcomes):
                assert got[k] is Ellipsis, k
                got[k] = o
        assert Ellipsis not in got
        return got


def run(gw: VolumeGateway, writes) -> list:
    """What the NBD server does with a run of writes: their answers (a Taken for those
    write_run took). Their buffers are overwritten once the run is dispatched, as the
    server's receive buffer is: nothing may keep them."""
    bufs = [memoryview(bytearray(data)) for _, data in writes]
    answers: list = []
    taken = 0
    gw.begin_writes(len(writes))
    try:
        if MODE["run"]:
            got = gw.write_run([(k, 0, offset, len(data), buf) for k, ((offset, data), buf)
                                in enumerate(zip(writes, bufs))], IDS)
            if got:
                taken, parts = got
                IDS.seq += taken
                answers.append(Taken(parts, taken))
        MODE["taken"] = taken
        for (offset, _), buf in zip(writes[taken:], bufs[taken:]):
            try:
                answers.append(gw.write(offset, buf, False))
            except Exception as e:  # (the server answers it with its errno)
                answers.append(e)
    finally:
        gw.end_writes()
    for buf in bufs:
        buf[:] = b"\xee" * len(buf)
    return answers


def run_with_write_run(gw: VolumeGateway, writes) -> list:
    """run() as with the write_run mode."""
    before, MODE["run"] = MODE["run"], True
    try:
        return run(gw, writes)
    finally:
        MODE["run"] = before


async def settled(answers) -> list:
    """Each write's outcome, in order: None, or the exception it failed with."""
    out = []

    async def outcome(a):
        try:
            out.append(await a if a is not None else None)
        except Exception as e:
            out.append(e)

    with trio.fail_after(10):
        for a in answers:
            if type(a) is Taken:
                for o in await a.outcomes():
                    assert o is None or type(o) is Later, o
                    await outcome(o)
            elif isinstance(a, Exception):  # (one that write() raised)
                out.append(a)
            else:
                await outcome(a)
    return out


def kinds(msgs) -> list[str]:
    return [type(x).__name__ for x in msgs]


def pattern(i: int) -> bytes:
    return bytes([i + 1]) * 2048 + bytes([0xF0 | i % 16]) * 2048


async def test_a_run_of_small_writes_is_one_write_batch_per_replica(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [((i % 8) * CHUNK + (i // 8) * 4096, pattern(i)) for i in range(12)]
        answers = run(gw, writes)
        assert MODE["taken"] == took(mode, 12)
        assert all(type(a) in (Later, Taken) for a in answers)
        assert await settled(answers) == [None] * 12
        for h in ("h2", "h3"):
            assert kinds(seen[h]) == ["WriteBatch"], h
            assert seen[h][0].indexes == tuple(i % 8 for i in range(12))
        for h, r in replicas.items():
            for offset, data in writes:
                assert copy_of(r, gw, offset // CHUNK, offset % CHUNK, 4096) == data, (h, offset)
        assert all({i for i in range(8)} <= gw._unflushed[h] for h in ("h1", "h2", "h3"))
        assert gw._inflight == 0
        assert not reg.list_stale() and not gw.stale


async def test_a_long_run_goes_in_batches_of_batch_items(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        n = BATCH_ITEMS * 2 + 3
        writes = [(i * 4096, pattern(i)) for i in range(n)]
        assert await settled(run(gw, writes)) == [None] * n
        assert MODE["taken"] == took(mode, n)
        assert [len(x.indexes) for x in seen["h2"]] == [BATCH_ITEMS, BATCH_ITEMS, 3]
        for h, r in replicas.items():
            assert copy_of(r, gw, 0, 0, n * 4096) == b"".join(d for _, d in writes), h


async def test_writes_to_one_block_in_a_run_land_in_order_on_every_copy(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(8192, pattern(i)) for i in range(5)]
        assert await settled(run(gw, writes)) == [None] * 5
        for h, r in replicas.items():
            assert copy_of(r, gw, 0, 8192, 4096) == pattern(4), h


async def test_large_writes_and_lone_writes_go_as_write_chunks(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        big = b"\x07" * (64 * 1024)
        answers = run(gw, [(0, pattern(0)), (CHUNK, big), (4096, pattern(1)), (8192, pattern(3))])
        assert await settled(answers) == [None] * 4
        assert sorted(kinds(seen["h2"])) == ["WriteBatch", "WriteChunk"]
        assert await settled(run(gw, [(2 * CHUNK, pattern(2))])) == [None]
        assert kinds(seen["h2"])[-1] == "WriteChunk"  # a run of one is a plain write
        for h, r in replicas.items():
            assert copy_of(r, gw, 1, 0, len(big)) == big, h
            assert copy_of(r, gw, 2, 0, 4096) == pattern(2), h


async def test_a_short_run_goes_one_write_chunk_each(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(i * 4096, pattern(i)) for i in range(BATCH_MIN - 1)]
        assert await settled(run(gw, writes)) == [None] * len(writes)
        assert kinds(seen["h2"]) == ["WriteChunk"] * len(writes)
        writes = [(i * 4096, pattern(i + 8)) for i in range(BATCH_MIN)]
        assert await settled(run(gw, writes)) == [None] * len(writes)
        assert kinds(seen["h2"])[len(writes) - 1:] == ["WriteBatch"]


async def test_hosts_of_an_older_revision_get_write_chunks(mode):
    async with three_hosts(revs=(m.PEER_REV, m.PEER_REV, m.BATCH_REV - 1)) as (gw, replicas, reg, seen, _):
        writes = [(i * 4096, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4
        assert MODE["taken"] == 0  # (not batchable: write_run takes none)
        assert kinds(seen["h3"]) == ["WriteChunk"] * 4
        assert kinds(seen["h2"]) == ["WriteChunk"] * 4  # (one replica set, one way)
        for h, r in replicas.items():
            assert copy_of(r, gw, 0, 0, 4 * 4096) == b"".join(d for _, d in writes), h


async def test_a_batch_refused_by_a_newer_token_fences_every_write_of_it(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        replicas["h3"].learn_tokens({gw.view.volume.name: gw.token + 1})  # another gateway took over
        results = await settled(run(gw, [(i * CHUNK, pattern(i)) for i in range(4)]))
        assert MODE["taken"] == took(mode, 4)
        assert all(isinstance(r, Fenced) for r in results), results
        assert gw.fenced and gw._inflight == 0
        assert kinds(seen["h3"]) == ["WriteBatch"]
        assert copy_of(replicas["h3"], gw, 0, 0, 4096) == b"\x01" * 4096  # refused: unchanged


async def test_a_dead_replica_fails_its_batch_and_the_writes_stand_on_the_others(mode):
    async with three_hosts() as (gw, replicas, reg, seen, kills):
        kills["h3"].cancel()  # takes effect at the next checkpoint: h3 still looks ready
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4
        assert MODE["taken"] == took(mode, 4)
        for i in range(4):
            assert [r.host_id for r in reg.list_stale(gw.lineage, i)] == ["h3"], i
            assert "h3" in gw.stale[i]
        for h in ("h1", "h2"):
            for offset, data in writes:
                assert copy_of(replicas[h], gw, offset // CHUNK, 0, 4096) == data, h
        assert gw._inflight == 0


async def test_a_run_that_meets_its_lease_deadline_sends_none_of_its_parts_after_it():
    """The run reads the lease's deadline after each full part (BATCH_ITEMS) it sends.
    Past it, it stopped taking writes, and then sent the parts it had gathered anyway (a
    review): with replicas=2 of 3 hosts, 5 writes to a chunk of {h1, h3}, then
    BATCH_ITEMS to chunks of {h1, h2} (a full part, sent, and the lease gone right after
    it): the 5 went to h3 after the gateway saw its lease run out, and were acknowledged,
    while the write after the run was refused (LeaseExpired). They fail as it does."""
    async with three_hosts(copies=2, size=32 * CHUNK) as (gw, replicas, reg, seen, _):
        cv = gw.cluster
        on = {hosts: [i for i in range(gw.size // CHUNK)
                      if set(cv.write_set(gw.lineage, i, 2)) == set(hosts)]
              for hosts in (("h1", "h2"), ("h1", "h3"))}
        a, b = on[("h1", "h2")], on[("h1", "h3")]
        assert a and b
        writes = [(b[0] * CHUNK + (j + 1) * 4096, pattern(j)) for j in range(5)]
        writes += [(a[j % len(a)] * CHUNK + (j // len(a) + 1) * 4096, pattern(j))
                   for j in range(BATCH_ITEMS)]
        writes += [(b[0] * CHUNK + 100 * 4096, pattern(7))]  # (after the run: write())
        now, send_part = gw._now, gw._send_part
        gone = []

        def sent_then_gone(run_, parts, group, epoch, token, **kw):
            send_part(run_, parts, group, epoch, token, **kw)
            if len(group[1]) >= BATCH_ITEMS and not kw:
                gone.append(True)  # (the lease runs out right after this full part)

        gw._send_part = sent_then_gone
        gw._now = lambda: now() + (1000.0 if gone else 0.0)
        gw.lease_deadline = now() + 500.0
        out = await settled(run_with_write_run(gw, writes))
        assert gone
        assert isinstance(out[-1], LeaseExpired), out[-1]
        assert all(isinstance(o, LeaseExpired) for o in out[:5]), out[:5]
        assert kinds(seen["h3"]) == [], "h3 got writes sent past the lease"


def _marked_stale_on_arrival(gw, reg, replica, hosts) -> None:
    """When `replica` receives a write to chunk 0, `hosts`' copies of the chunk are
    recorded stale and the gateway's map learns it (adopt_stale, as from its record
    sync: a scrub's verdict, another volume of the lineage), before the replies."""
    real = replica.handle

    def handle(msg, peer=None):
        if type(msg) in (m.WriteBatch, m.WriteChunk) and 0 in (
                msg.indexes if type(msg) is m.WriteBatch else (msg.index,)):
            reg.mark_stale(gw.lineage, 0, sorted(hosts), time.time_ns())
            gw.adopt_stale(dict(gw.stale), {0: frozenset(hosts)})
        return real(msg, peer)

    replica.handle = handle


async def test_copies_recorded_stale_while_a_run_is_out_do_not_count_for_it(mode):
    """A run leaves with every copy of its chunk current. While it is out, h2's and h3's
    copies are recorded stale; both still take it cleanly (neither knows), but only h1
    holds a complete copy, below min_size (2): its writes fail, as they would sent after
    the marks. They were acknowledged, counted on three copies (_settle_clean)."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        _marked_stale_on_arrival(gw, reg, replicas["h3"], {"h2", "h3"})
        writes = [(i * 4096, pattern(i)) for i in range(BATCH_MIN + 2)]  # (all in chunk 0)
        out = await settled(run(gw, writes))
        assert MODE["taken"] == took(mode, len(writes))
        assert kinds(seen["h3"]) == ["WriteBatch"]
        assert all(isinstance(o, BelowMinSize) for o in out), out
        assert gw._inflight == 0


@pytest.mark.parametrize("path", ["task-less", "general"])
async def test_copies_recorded_stale_while_a_write_is_out_do_not_count_for_it(path):
    """As above, for one write: by _replicate_now (settled in _replied, without a task)
    and by the general path (_replicate_piece, which read the stale copies before the
    write left)."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        _marked_stale_on_arrival(gw, reg, replicas["h3"], {"h2", "h3"})
        if path == "general":
            gw.pool.ready = lambda addresses: False
        with pytest.raises(BelowMinSize):
            await gw.write(4096, pattern(1), False)
        assert gw._inflight == 0


@pytest.mark.parametrize("path", ["task-less", "general"])
async def test_a_copy_a_concurrent_write_left_behind_does_not_count(path):
    """W0 and W1 (chunk 0, apart) out at once. W0 fails on h2 (NoSpace): it stands on h1
    and h3, and h2 is recorded stale. W1 reaches h3 once W0 is answered, and h3's copy
    has meanwhile been recorded stale by someone else: h3 says so. h2 took W1 cleanly but
    misses the acknowledged W0, so W1 is on one complete copy (h1), below min_size. It
    was acknowledged: _settle counted the copies stale when W1 left, not those now."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        h2, h3 = replicas["h2"], replicas["h3"]
        real2, real3 = h2.handle, h3.handle
        done0 = trio.Event()

        def handle2(msg, peer=None):
            if type(msg) is m.WriteChunk and msg.index == 0 and msg.offset == 4096:
                raise NoSpace("h2: no room for W0")
            return real2(msg, peer)

        def handle3(msg, peer=None):
            if type(msg) is m.WriteChunk and msg.index == 0 and msg.offset == 8192:
                async def later():
                    await done0.wait()
                    reg.mark_stale(gw.lineage, 0, ["h3"], time.time_ns())
                    h3.stale_self.add((gw.lineage, 0))
                    return real3(msg, peer)
                return later()
            return real3(msg, peer)

        h2.handle, h3.handle = handle2, handle3
        if path == "general":
            gw.pool.ready = lambda addresses: False
        out = [None, None]

        async def wait(k, w):
            try:
                out[k] = await w
            except Exception as e:
                out[k] = e
            if k == 0:
                done0.set()

        w0 = gw.write(4096, pattern(0), False)
        w1 = gw.write(8192, pattern(1), False)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait, 0, w0)
                nursery.start_soon(wait, 1, w1)
        assert out[0] is None
        assert sorted(r.host_id for r in reg.list_stale(gw.lineage, 0)) == ["h2", "h3"]
        assert isinstance(out[1], BelowMinSize), out[1]


async def test_a_stale_copy_is_reported_for_its_own_items_only(mode):
    async with three_hosts() as (gw, replicas, reg, seen, _):
        replicas["h2"].stale_self = {(gw.lineage, 1)}  # h2's copy of chunk 1 is being resynced
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4  # h1 and h3 make min_size
        assert MODE["taken"] == took(mode, 4)
        reply = replicas["h2"].write_batch(seen["h2"][0])
        assert reply == m.Written((1,))
        assert gw.stale.get(1) == frozenset({"h2"})
        assert not gw.stale.get(0) and not gw.stale.get(2) and not gw.stale.get(3)


async def test_a_stale_local_copy_is_reported_for_its_own_items_only(mode):
    """The gateway's own copies of a batch are written in one call of its replica: a stale
    one is still reported item by item, as a peer's."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        replicas["h1"].stale_self = {(gw.lineage, 2)}
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4
        assert MODE["taken"] == took(mode, 4)
        assert gw.stale.get(2) == frozenset({"h1"})
        assert not gw.stale.get(0) and not gw.stale.get(1) and not gw.stale.get(3)
        for offset, data in writes:  # (a stale copy still takes the write)
            assert copy_of(replicas["h1"], gw, offset // CHUNK, 0, 4096) == data


async def test_a_local_copy_refused_in_the_middle_of_a_batch_fails_alone(mode):
    """One local copy of a batch refused (a resync under way here keeps its chunk from
    a new generation): that write stands on the peers with the local copy recorded
    stale, and the local copies after it are written all the same."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        h1 = replicas["h1"]
        h1.resyncing.add((gw.lineage, 1))
        gen_before = h1.store.resolve(gw.lineage, 1, gw.chain)
        gw.gen += 1  # a new generation (as after a snapshot): each write copies up
        gw.chain = (*gw.chain, gw.gen)
        for r in replicas.values():
            r.learn_tokens({gw.view.volume.name: gw.token})
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4  # h2 and h3 make min_size
        assert MODE["taken"] == took(mode, 4)
        assert gw.stale.get(1) == frozenset({"h1"})
        assert not gw.stale.get(0) and not gw.stale.get(2) and not gw.stale.get(3)
        assert h1.store.resolve(gw.lineage, 1, (gw.gen,)) is None  # refused: not made
        assert h1.store.resolve(gw.lineage, 1, gw.chain) == gen_before
        for i in (0, 2, 3):
            assert copy_of(h1, gw, i, 0, 4096) == pattern(i)[:4096]


def test_a_replica_refuses_a_batch_whose_items_do_not_add_up():
    r = Replica(MemoryChunkStore(None, 1 << 30), "h1", lambda: 1)
    r.learn_tokens({"v": 1})
    bad = m.WriteBatch("v", "lin", 1, (1,), (0, 1), (0, 0), (4096, 4096), b"x" * 4096,
                       CHUNK, False, 1, 1)
    with pytest.raises(InvalidArgument):
        r.handle(bad)
    assert r.store.lookup(ChunkKey("lin", 0, 1)) is None  # nothing of it was written
    ok = m.WriteBatch("v", "lin", 1, (1,), (0, 1), (0, 0), (4096, 512), b"x" * 4096 + b"y" * 512,
                      CHUNK, False, 1, 1)
    assert r.handle(ok) == m.Written()
    assert bytes(r.store.read(ChunkKey("lin", 1, 1), 0, 512)) == b"y" * 512


class _Rids(logging.Handler):
    """The request id in force (vbp.reqid) and the text of each line logged."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record):
        self.lines.append((reqid.get(), record.getMessage()))


@pytest.fixture
def replica_log():
    logger = logging.getLogger("vbp.replica")
    handler, level = _Rids(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_item_is_logged_under_its_own_request_id(replica_log):
    r = Replica(MemoryChunkStore(None, 1 << 30), "h2", lambda: 1)
    r.learn_tokens({"v": 1})
    batch = m.WriteBatch("v", "lin", 1, (1,), (0, 3), (0, 0), (512, 512), b"x" * 1024, CHUNK,
                         False, 1, 1, "h1-ab-7 h1-ab-9")
    r.handle(batch, "h1")
    assert [(rid, line.split(" op=")[0]) for rid, line in replica_log] == [
        ("h1-ab-7", "volume=v chunk=0"), ("h1-ab-9", "volume=v chunk=3")]
    assert all("op=write event=applied gateway=h1" in line for _, line in replica_log)
    replica_log.clear()
    # the second item falls outside its chunk: the refusal is that item's, the first applied
    bad = m.WriteBatch("v", "lin", 1, (1,), (0, 5), (512, CHUNK - 100), (512, 512), b"y" * 1024,
                       CHUNK, False, 1, 1, "h1-ab-a h1-ab-b")
    with pytest.raises(InvalidArgument):
        r.handle(bad, "h1")
    assert [(rid, line.split(" error=")[0]) for rid, line in replica_log] == [
        ("h1-ab-b", "volume=v chunk=5 op=write event=refused gateway=h1")]
    assert bytes(r.store.read(ChunkKey("lin", 0, 1), 512, 512)) == b"y" * 512


async def test_writes_put_off_when_a_link_has_no_room_left_wait_for_it():
    """A link that reached its limit of requests in flight between the writes and the end
    of their run: the writes take the general path, which waits for room, and no healthy
    replica is recorded stale."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        gw.begin_writes(len(writes))
        answers = [gw.write(offset, memoryview(bytearray(data)), False) for offset, data in writes]
        limit, gw.pool.max_in_flight = gw.pool.max_in_flight, 0  # every link full now
        gw.end_writes()
        gw.pool.max_in_flight = limit
        assert await settled(answers) == [None] * 4
        assert kinds(seen["h2"]) == ["WriteChunk"] * 4
        assert not reg.list_stale() and not gw.stale
        for h, r in replicas.items():
            for offset, data in writes:
                assert copy_of(r, gw, offset // CHUNK, 0, 4096) == data, h
        assert gw._inflight == 0


async def test_a_frame_joins_a_busy_link_s_batch_unless_sent_at_once():
    async with three_hosts() as (gw, replicas, reg, seen, _):
        pool = gw.pool
        address = next(iter(pool._conns))
        link = pool._conns[address].link
        msg = m.Ping(1)
        got = []
        pool.queue_all([address], msg, got.append)  # an idle link: sent now
        assert link.out == []
        pool.queue_all([address], msg, got.append)  # a request in flight: queued
        assert len(link.out) == 1
        pool.queue_all([address], msg, got.append, at_once=True)  # sent, with the queued one
        assert link.out == []
        with trio.fail_after(5):
            while len(got) < 3:
                await trio.sleep(0.01)
        assert all(type(r[0]) is m.Pong for r in got)


async def test_a_clean_batch_leaves_each_copy_to_the_next_flush(mode):
    """A run every copy took cleanly is settled in one pass (_all_clean): each write is
    answered, none is left counted in flight, and every host's copy of every chunk of the
    run is noted unflushed, so the next flush goes to every replica."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        f = gw.flush()
        if f is not None:
            await f
        assert gw._unflushed == {}
        for s in seen.values():
            s.clear()
        writes = [((i % 5) * CHUNK + (i // 5) * 4096, pattern(i)) for i in range(10)]
        assert await settled(run(gw, writes)) == [None] * 10
        assert MODE["taken"] == took(mode, 10)
        assert gw._inflight == 0
        for s in seen.values():
            assert kinds(s) == ["WriteBatch"]
            s.clear()
        assert gw._unflushed == {h: set(range(5)) for h in ("h1", "h2", "h3")}
        assert set(gw._sent_at) == {"h2", "h3"}
        await gw.flush()
        for h in ("h2", "h3"):
            assert kinds(seen[h]) == ["Flush"], h


def test_the_write_route_follows_the_map():
    """ClusterView.route (the fast path's view of a chunk) is cached per map: a map with a
    host down, or with a host of an older revision, gives the route that map implies."""
    hosts = tuple(HostRecord(h, f"127.0.0.1:{p}", f"127.0.0.1:{p}", pod=f"p{h}", peer_rev=m.PEER_REV)
                  for h, p in (("h1", 1), ("h2", 2), ("h3", 3)))
    cv = ClusterView(ClusterMap(1, hosts))
    r = cv.route("L", 0, 3, "h1")
    assert r is cv.route("L", 0, 3, "h1")  # cached
    all_hosts, complete, remote, names, local, batchable, by_address = r
    assert set(all_hosts) == {"h1", "h2", "h3"} and complete == all_hosts and local
    assert sorted(names) == ["h2", "h3"] and type(names) is tuple and by_address == ("127.0.0.1:2", "127.0.0.1:3")
    assert remote == tuple(f"127.0.0.1:{n[1]}" for n in names) and batchable
    assert cv.route("L", 0, 4, "h1") is None  # fewer copies than wanted
    down = tuple(dc_replace(h, state="down") if h.id == "h3" else h for h in hosts)
    cv.set_map(ClusterMap(2, down))
    assert cv.route("L", 0, 3, "h1") is None
    old = tuple(dc_replace(h, peer_rev=m.BATCH_REV - 1) if h.id == "h2" else h for h in hosts)
    cv.set_map(ClusterMap(3, old))
    assert cv.route("L", 0, 3, "h1")[5] is False  # not batchable: h2 takes no WriteBatch
    cv.set_map(ClusterMap(4, hosts))
    same = [cv.route("L", i, 3, "h1") for i in range(64)]  # 64 chunks on the same 3 hosts
    # one route per order of the 3 hosts (at most 6), shared by the chunks placed so
    assert len({id(r) for r in same}) == len({r[0] for r in same}) <= 6


async def test_fua_writes_go_one_by_one_and_durable_on_every_copy():
    """A FUA write takes the general path (its local copy's sync may go to a worker
    thread): never put off into a batch, answered once every copy is durable."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [((i % 4) * CHUNK + 8192, pattern(i)) for i in range(6)]
        gw.begin_writes(len(writes))
        try:
            answers = [gw.write(o, memoryview(bytearray(d)), True) for o, d in writes]
        finally:
            gw.end_writes()
        assert await settled(answers) == [None] * 6
        for h in ("h2", "h3"):
            assert kinds(seen[h]) == ["WriteChunk"] * 6 and all(x.fua for x in seen[h]), h
        for r in replicas.values():
            for i in range(4):
                key = ChunkKey(gw.lineage, i, r.store.resolve(gw.lineage, i, gw.chain_for(i)))
                durable, now = r.store._durable[key], r.store._chunks[key]
                assert (durable.version, durable.pages) == (now.version, now.pages)
        assert copy_of(replicas["h3"], gw, 1, 8192, 4096) == pattern(5)[:4096]


async def test_a_fua_write_with_much_to_write_back_waits_for_every_copy(tmp_path):
    """On a gateway whose own store has much to write back, a FUA write goes by the
    general path: its local copy's writeback runs in a worker thread beside the peers'
    writes, and the write is answered once every copy is synced."""
    with ChunkStore(tmp_path / "h1", 64 * CHUNK) as store:
        async with three_hosts(h1_store=store) as (gw, replicas, reg, seen, _):
            big = bytes(range(256)) * (SYNC_AHEAD_MIN // 256 + 4096)
            assert await settled([gw.write(0, big, False)]) == [None]
            assert store.writeback_due()
            for s in seen.values():
                s.clear()
            answer = gw.write(3 * CHUNK + 4096, memoryview(bytearray(pattern(7))), True)
            assert hasattr(answer, "__await__")  # the general path, a task of its own
            assert store.writeback_limiter is None
            assert await settled([answer]) == [None]
            assert store.writeback_limiter is not None  # a worker thread wrote back
            assert not store.writeback_due()  # ... and that writeback ended
            for h in ("h2", "h3"):
                assert kinds(seen[h]) == ["WriteChunk"] and seen[h][0].fua, h
                r = replicas[h]
                key = ChunkKey(gw.lineage, 3, r.store.resolve(gw.lineage, 3, gw.chain_for(3)))
                durable, now = r.store._durable[key], r.store._chunks[key]
                assert (durable.version, durable.pages) == (now.version, now.pages)
            for r in replicas.values():
                assert copy_of(r, gw, 3, 4096, 4096) == pattern(7)[:4096]


@pytest.mark.parametrize("rev", [m.PEER_REV, m.READ_TOKEN_REV - 1])
async def test_a_holders_remote_read_carries_its_token_only_to_hosts_that_take_it(rev):
    """ReadChunk.token goes to hosts of READ_TOKEN_REV or later (an older decoder would
    refuse the frame: one field too many); the copies that took it refuse the reads of
    a holder deposed since (Fenced), and the gateway is fenced."""
    async with three_hosts(revs=(m.PEER_REV, rev, rev)) as (gw, replicas, reg, seen, _):
        gw.stale[0] = {"h1"}  # (this host's copy is not read: the read goes to h2 or h3)
        got = await gw.read(0, 4096)
        assert extents_bytes(got, 0, 4096) == b"\x01" * 4096
        (msg,) = [x for s in seen.values() for x in s if type(x) is m.ReadChunk]
        assert msg.token == (gw.token if rev >= m.READ_TOKEN_REV else 0)
        if rev >= m.READ_TOKEN_REV:
            for r in replicas.values():
                r.learn_tokens({gw.view.volume.name: gw.token + 1})  # (a takeover)
            with pytest.raises(Fenced):
                await gw.read(0, 4096)
            assert gw.fenced


# --- write_run: the run's writes taken at once (replicated) ----------------------------

_FUA = 1  # NBD_CMD_FLAG_FUA


def nbd_writes(writes, fua=()) -> list:
    """`writes` ((offset, data) each) as the NBD server hands them to write_run; `fua`:
    the positions of the FUA ones."""
    return [(k, _FUA if k in fua else 0, offset, len(data), memoryview(bytearray(data)))
            for k, (offset, data) in enumerate(writes)]


async def outcomes_of(got) -> list:
    """The outcomes of what write_run took (`got`: its (count, Later)), each settled:
    None for written, else the exception the write failed with."""
    taken, parts = got
    return (await settled([Taken(parts, taken)]))


async def test_write_run_takes_the_writes_a_batch_would_take_and_stops_at_the_first_other():
    """The run stops at the first write that write() would not put off into a batch, or
    that overlaps one taken before it; the writes before it are under way, the rest are
    write()'s. Nothing is left counted in flight once they are over."""
    big = b"\x07" * BATCH_PIECE
    async with three_hosts() as (gw, replicas, reg, seen, _):
        base = [(i * CHUNK + 4096, pattern(i)) for i in range(4)]
        gw.stale[6] = frozenset({"h3"})  # (a copy of chunk 6 missed a write)
        stops = {
            "fua": (base + [(5 * CHUNK, pattern(5))], (4,)),
            "large": (base + [(5 * CHUNK, big)], ()),
            "crossing a chunk": (base + [(CHUNK - 2048, pattern(5))], ()),
            "overlapping one taken": (base + [(4096 + 2048, pattern(5))], ()),
            "to a chunk with a stale copy": (base + [(6 * CHUNK, pattern(5))], ()),
            "empty": (base + [(5 * CHUNK, b"")], ()),
            "past the end": (base + [(8 * CHUNK, pattern(5))], ()),
        }
        for why, (writes, fua) in stops.items():
            got = gw.write_run(nbd_writes(writes, fua), None)
            assert type(got) is tuple and got[0] == 4, why
            assert await outcomes_of(got) == [None] * 4, why
            assert gw._inflight == 0 and not gw._flying, why
            for h, r in replicas.items():
                for offset, data in writes[:4]:
                    assert copy_of(r, gw, offset // CHUNK, offset % CHUNK, 4096) == data, (why, h)
        assert not reg.list_stale()


async def test_write_run_takes_none_where_write_would_go_another_way():
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(i * CHUNK, pattern(i)) for i in range(6)]

        def takes_none(why, run=writes, fua=()):
            assert gw.write_run(nbd_writes(run, fua), None) == 0, why
            assert gw._inflight == 0 and not gw._flying, why

        takes_none("fewer than BATCH_MIN", writes[:BATCH_MIN - 1])
        takes_none("fewer than BATCH_MIN before a stop", writes, (BATCH_MIN - 1,))
        takes_none("the first is FUA", writes, (0,))
        for attr, value in (("token", 0), ("fenced", True), ("read_only", True),
                            ("qos", object()), ("cuts", {3: 1}), ("_hold", trio.Event())):
            before = getattr(gw, attr)
            setattr(gw, attr, value)
            try:
                takes_none(attr)
            finally:
                setattr(gw, attr, before)
        limit, gw.pool.max_in_flight = gw.pool.max_in_flight, 0  # no room on the links
        try:
            takes_none("no room")
        finally:
            gw.pool.max_in_flight = limit
        for name in ("vbp.gateway", "vbp.replica"):  # (each write, or each local copy, logs
            logger = logging.getLogger(name)  # a line at DEBUG: write() makes them)
            level = logger.level
            logger.setLevel(logging.DEBUG)
            try:
                takes_none(f"DEBUG of {name}")
            finally:
                logger.setLevel(level)
        got = gw.write_run(nbd_writes(writes), None)  # and with nothing in the way, all
        assert got[0] == 6 and await outcomes_of(got) == [None] * 6
        assert all(kinds(seen[h]) == ["WriteBatch"] for h in ("h2", "h3"))


async def test_write_run_carries_each_write_s_request_id():
    """The run's WriteBatch names each write by the id the server gave it: the ids after
    `ids.seq`, in the run's order; with no ids, none."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        ids = reqid.RequestIds("h1", 0xCD)
        ids.seq = 0x41
        writes = [(i * CHUNK, pattern(i)) for i in range(5)]
        got = gw.write_run(nbd_writes(writes), ids)
        assert await outcomes_of(got) == [None] * 5
        assert seen["h2"][-1].rid == " ".join(f"h1-0000cd-{s:x}" for s in range(0x42, 0x47))
        got = gw.write_run(nbd_writes(writes), None)
        assert await outcomes_of(got) == [None] * 5
        assert seen["h2"][-1].rid == ""


async def test_a_run_stops_where_a_link_has_no_room_left():
    """A run's first WriteBatch fills a link (its limit of requests in flight): the run
    stops there, and write() takes the rest, which waits for room; every write stands
    on every copy, no copy recorded stale."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        n = BATCH_ITEMS + 5
        writes = [((i % 8) * CHUNK + (i // 8) * 4096, pattern(i)) for i in range(n)]
        limit, gw.pool.max_in_flight = gw.pool.max_in_flight, 1
        try:
            answers = run_with_write_run(gw, writes)
            assert MODE["taken"] == BATCH_ITEMS
            assert await settled(answers) == [None] * n
        finally:
            gw.pool.max_in_flight = limit
        assert kinds(seen["h2"])[0] == "WriteBatch" and len(seen["h2"][0].indexes) == BATCH_ITEMS
        assert not reg.list_stale() and not gw.stale and gw._inflight == 0
        for h, r in replicas.items():
            for offset, data in writes:
                assert copy_of(r, gw, offset // CHUNK, offset % CHUNK, 4096) == data, h


async def test_a_run_group_that_finds_no_room_left_goes_by_the_general_path():
    """A group taken while its link had room, and sent once it has none (another group's
    frame filled it): its writes go one by one by the general path at once, which waits
    for room, and every write stands on every copy with no copy recorded stale."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(i * CHUNK, pattern(i)) for i in range(6)]
        ready, calls = gw.pool.ready, []

        def room_while_taking(addresses):  # (the run's checks see room, its send none)
            calls.append(addresses)
            return len(calls) == 1 and ready(addresses)

        gw.pool.ready = room_while_taking
        try:
            got = gw.write_run(nbd_writes(writes), None)
        finally:
            gw.pool.ready = ready
        assert got[0] == 6 and len(calls) == 2
        assert await outcomes_of(got) == [None] * 6
        for h in ("h2", "h3"):
            assert kinds(seen[h]) == ["WriteChunk"] * 6, h
        assert not reg.list_stale() and not gw.stale and gw._inflight == 0
        for h, r in replicas.items():
            for offset, data in writes:
                assert copy_of(r, gw, offset // CHUNK, 0, 4096) == data, h


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.lists(st.tuples(st.integers(0, 8 * CHUNK // 512 - 1),
                                   st.sampled_from([512, 4096, 4096, 4096, 8192, 40960]),
                                   st.integers(0, 15).map(lambda x: x == 0)),  # FUA
                          min_size=1, max_size=40),
                min_size=1, max_size=3))
def test_runs_leave_every_copy_as_the_writes_in_order_would(runs):
    """Random runs (unaligned, overlapping, crossing chunks, large, FUA, past the end),
    each through write_run and then write() for the rest as the NBD server does: every
    write is answered as write() alone would answer it, and every copy holds what the
    writes applied in order hold."""
    async def main():
        async with three_hosts() as (gw, replicas, reg, seen, _):
            model = bytearray(8 * CHUNK)
            for i in range(8):
                model[i * CHUNK:i * CHUNK + 4096] = b"\x01" * 4096  # (three_hosts' writes)
            stamp = 0
            for run_ in runs:
                writes, fua, expect = [], set(), []
                for k, (sector, length, f) in enumerate(run_):
                    stamp += 1
                    offset = sector * 512
                    writes.append((offset, bytes([stamp % 251 + 1]) * length))
                    if f:
                        fua.add(k)
                    past = offset + length > len(model)
                    expect.append(past)
                    if not past:
                        model[offset:offset + length] = writes[-1][1]
                items = nbd_writes(writes, fua)
                answers: list = []
                taken = 0
                gw.begin_writes(len(items))
                try:
                    got = gw.write_run(items, None)
                    if got:
                        taken = got[0]
                        answers.append(Taken(got[1], taken))
                    for _cookie, f, o, _n, d in items[taken:]:
                        try:
                            answers.append(gw.write(o, d, f & _FUA != 0))
                        except Exception as e:  # (a write past the end: refused at once)
                            answers.append(e)
                finally:
                    gw.end_writes()
                for w in items:
                    w[4][:] = b"\xee" * w[3]  # (the server's buffer, reused)
                results = await settled(answers)
                assert [r is not None for r in results] == expect, results
            assert gw._inflight == 0 and not gw._flying
            assert not reg.list_stale()
            for h, r in replicas.items():
                for i in range(8):
                    assert copy_of(r, gw, i, 0, CHUNK) == model[i * CHUNK:(i + 1) * CHUNK], (h, i)

    trio.run(main)


@pytest.mark.parametrize("at", [3, 5])
async def test_write_run_that_meets_a_failure_stops_before_that_write(at):
    """Something raising while write_run takes a write (here the route of its chunk):
    the run stops before it, and write() takes it and the rest, and answers them. With
    fewer than BATCH_MIN before it, none is taken, and no piece is left noted in flight
    (one left behind would keep the writes that overlap it waiting for ever)."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        writes = [(i * CHUNK, pattern(i)) for i in range(7)]
        gw._routes.pop(at, None)
        route, calls = gw.cluster.route, []

        def flaky(lineage, index, n, me):
            if index == at and not calls:
                calls.append(index)
                raise RuntimeError(f"a bug planning chunk {at}")
            return route(lineage, index, n, me)

        gw.cluster.route = flaky
        items = nbd_writes(writes)
        answers: list = []
        gw.begin_writes(len(items))
        try:
            got = gw.write_run(items, None)
            taken = got[0] if got else 0
            assert taken == (at if at >= BATCH_MIN else 0) and calls == [at]
            if got:
                answers.append(Taken(got[1], taken))
            else:
                assert not gw._flying and gw._inflight == 0
            answers += [gw.write(o, d, False) for _c, _f, o, _n, d in items[taken:]]
        finally:
            gw.end_writes()
        assert await settled(answers) == [None] * 7
        assert gw._inflight == 0 and not gw._flying
        for h, r in replicas.items():
            for offset, data in writes:
                assert copy_of(r, gw, offset // CHUNK, 0, 4096) == data, h


async def test_a_write_is_answered_without_waiting_for_another_batch_s_replies(mode):
    """A run long enough for two WriteBatch frames, the second slow on one replica: the
    writes of the first are answered once their own replies are in."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        n = BATCH_ITEMS + 4
        writes = [((i % 8) * CHUNK + (i // 8 + 1) * 4096, pattern(i)) for i in range(n)]
        handle, batches = replicas["h3"].handle, []

        def slow_second_batch(msg, peer=None):
            if type(msg) is m.WriteBatch:
                batches.append(msg)
                if len(batches) == 2:
                    async def later():
                        await trio.sleep(1.0)
                        return handle(msg, peer)
                    return later()
            return handle(msg, peer)

        replicas["h3"].handle = slow_second_batch
        answers = run(gw, writes)
        assert MODE["taken"] == took(mode, n)
        with trio.fail_after(0.6):  # (the second batch's replies take a second)
            a = answers[0]
            if type(a) is Taken:
                places, later = a.parts[0]
                assert 0 in places
                assert await later == [None] * len(places)
            else:
                assert await a is None
        assert await settled(answers) == [None] * n


async def test_a_local_batch_that_meets_a_bug_fails_its_copies_not_its_writes(mode):
    """Something failing in the local copies of a batch after its frames left (a bug:
    here the replica's stale check): the copies not answered count as failed, recorded
    stale as any failed copy, and the writes stand on the peers (min_size 2)."""
    async with three_hosts() as (gw, replicas, reg, seen, _):
        h1 = replicas["h1"]
        real, calls = h1.is_stale, []

        def is_stale(lineage, index):
            calls.append(index)
            if len(calls) == 2:
                raise RuntimeError("a bug")
            return real(lineage, index)

        h1.is_stale = is_stale
        writes = [(i * CHUNK, pattern(i)) for i in range(4)]
        assert await settled(run(gw, writes)) == [None] * 4
        assert MODE["taken"] == took(mode, 4)
        h1.is_stale = real
        assert not gw.stale.get(0)
        for i in (1, 2, 3):
            assert gw.stale.get(i) == frozenset({"h1"}), i
            assert [r.host_id for r in reg.list_stale(gw.lineage, i)] == ["h1"], i
        assert gw._inflight == 0 and not gw._flying
        for h in ("h2", "h3"):
            for offset, data in writes:
                assert copy_of(replicas[h], gw, offset // CHUNK, 0, 4096) == data, h
