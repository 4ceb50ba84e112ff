"""The gateway's task-less replicated write (VolumeGateway._replicate_now), over the real
peer transport on loopback: the clean case completes from the reply callback, anything
else (a dead replica, a fenced gateway, a map change) continues as the full path would."""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager

import pytest
import trio

from blockd.service import AsyncRegistry
from control import api
from replicator.gateway import ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from tests.sim.harness import call, extents_bytes
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import BelowMinSize, Fenced, PastEnd, RegistryUnavailable
from vbp.later import Later
from vbp.layout import ChunkKey
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of

pytestmark = pytest.mark.timeout(60)
CLUSTER = "fast"
_POOLS = itertools.count()
CHUNK = 1 << 20


@asynccontextmanager
async def three_hosts(min_size: int = 2, wrap=None):
    """A gateway on h1 and replicas h1..h3, h2 and h3 served by real serve_peers; yields
    (gateway, replicas, registry, {host: cancel scope killing its server}). `wrap(host,
    replica)`: the handler h2 or h3 serves with (default: the replica's own)."""
    reg = open_registry(f"memory://fast-write-{next(_POOLS)}")
    replicas = {h: Replica(MemoryChunkStore(None, 1 << 30), h, lambda: 1) for h in ("h1", "h2", "h3")}
    async with trio.open_nursery() as nursery:
        ports, kills = {}, {}
        for h in ("h2", "h3"):
            scope = trio.CancelScope()

            handler = replicas[h].handle if wrap is None else wrap(h, replicas[h])

            async def serve(h=h, scope=scope, handler=handler,
                            task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await serve_peers(handler, "127.0.0.1", 0, cluster=CLUSTER,
                                      host_id=h, task_status=task_status)

            ports[h] = await nursery.start(serve)
            kills[h] = scope
        hosts = tuple(HostRecord(h, f"127.0.0.1:{ports.get(h, 1)}", f"127.0.0.1:{ports.get(h, 1)}",
                                 pod=f"p{h}", peer_rev=1) for h in ("h1", "h2", "h3"))
        cluster = ClusterView(ClusterMap(1, hosts))
        api.create_volume(reg, "v", "8M", replicas=3, min_size=min_size, chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                               host_id="h1", replica=replicas["h1"], cluster=cluster, pool=pool,
                               registry=AsyncRegistry(reg),
                               token=reg.acquire_lease("v", "h1", 3600).token)
            yield gw, replicas, reg, kills
        nursery.cancel_scope.cancel()


def copy_of(replica: Replica, gw: VolumeGateway, index: int, offset: int, length: int) -> bytes:
    store = replica.store
    gen = store.resolve(gw.lineage, index, gw.chain_for(index))
    return bytes(store.read(ChunkKey(gw.lineage, index, gen), offset, length))


async def test_clean_write_is_answered_by_the_reply_callback_on_every_copy():
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)  # no connection yet: the full path connects
        later = gw.write(CHUNK + 8192, memoryview(bytearray(b"\x02" * 4096)), False)
        assert type(later) is Later  # connections ready: no task
        with trio.fail_after(5):
            await later
        for h, r in replicas.items():
            assert copy_of(r, gw, 1, 8192, 4096) == b"\x02" * 4096, h
        assert {h for h, chunks in gw._unflushed.items() if 1 in chunks} == {"h1", "h2", "h3"}
        assert gw._inflight == 0
        assert not reg.list_stale()


async def test_a_dead_replica_is_recorded_stale_and_the_write_stands():
    async with three_hosts() as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)
        kills["h3"].cancel()  # takes effect at the next checkpoint: h3 still looks ready
        later = gw.write(0, b"\x03" * 4096, False)
        assert type(later) is Later
        with trio.fail_after(10):
            await later  # h3's connection fails: the callback defers to the full path
        assert [r.host_id for r in reg.list_stale(gw.lineage, 0)] == ["h3"]
        assert "h3" in gw.stale[0]
        for h in ("h1", "h2"):
            assert copy_of(replicas[h], gw, 0, 0, 4096) == b"\x03" * 4096
        assert gw._inflight == 0
        # the chunk has a stale copy now: later writes to it take the full path
        result = gw.write(0, b"\x04" * 4096, False)
        assert type(result) is not Later
        with trio.fail_after(10):
            await result


@pytest.mark.parametrize("connection", ["cancelled", "gone"])
async def test_a_failed_write_is_settled_when_its_client_goes_away(connection):
    """The rest of a write that failed on a copy (h3 dead) is handed to the connection as
    its client goes away. "cancelled": it starts as the connection's tasks are cancelled,
    and still records h3 stale. "gone": the connection's tasks are gone and nothing runs
    it; h3 is stale for the gateway at once and waits in `unrecorded` for the service.
    Either way the copies that disagree are on record."""
    async with three_hosts() as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        kills["h3"].cancel()
        later = gw.write(0, b"\x03" * 4096, False)
        assert type(later) is Later
        answers = []
        async with trio.open_nursery() as conn:  # the NBD server's, for one connection
            def start(rest) -> bool:
                if connection == "gone":
                    return False

                async def finish():
                    await rest

                conn.start_soon(finish)
                conn.cancel_scope.cancel()
                return True

            later.bind(lambda value, exc: answers.append(exc), start)
            with trio.fail_after(10):
                while gw._inflight:
                    await trio.sleep(0.01)
        assert answers == []  # never answered: the client is gone
        for h in ("h1", "h2"):
            assert copy_of(replicas[h], gw, 0, 0, 4096) == b"\x03" * 4096
        assert "h3" in gw.stale[0]
        if connection == "cancelled":
            assert [r.host_id for r in reg.list_stale(gw.lineage, 0)] == ["h3"]
            assert gw.unrecorded == []
        else:
            assert [(i, set(took), missed) for i, took, missed in gw.unrecorded] == [
                (0, {"h1", "h2"}, ("h3",))]


async def test_a_write_whose_frames_cannot_be_queued_is_not_left_in_flight():
    """A message the pool refuses to queue (the codec raising: a bug) fails the write
    and leaves no count in flight behind, which a snapshot's drain would wait on."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)  # connects

        def refuse(*args, **kwargs):
            raise TypeError("cannot encode")

        gw.pool.queue_all = refuse
        with pytest.raises(TypeError):
            gw.write(0, b"\x02" * 4096, False)
        assert gw._inflight == 0


async def test_a_newer_token_on_a_replica_fences_the_gateway():
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        replicas["h2"].learn_tokens({gw.view.volume.name: gw.token + 1})  # another gateway took over
        later = gw.write(0, b"\x05" * 4096, False)
        assert type(later) is Later
        with pytest.raises(Fenced), trio.fail_after(5):
            await later
        assert gw.fenced
        assert gw._inflight == 0
        assert gw.suspects  # h1 and h3 took a write the new gateway never saw


async def test_a_snapshot_waits_for_writes_answered_by_callback():
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        later = gw.write(0, b"\x06" * 4096, False)
        assert type(later) is Later and gw._inflight == 1
        switched = []

        async def complete():
            switched.append(gw._inflight)
            return gw.view

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.switch_head, complete)
            with trio.fail_after(5):
                await later
        assert switched == [0]


async def test_a_full_path_write_whose_task_starts_during_a_snapshot_waits_for_it():
    """A write the general path takes is a task the NBD server starts later: when a
    snapshot began switching the head in between, the snapshot had no write in flight to
    wait for, so the write waits for the new head instead of writing the old one while
    the switch completes."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        answer = gw.write(CHUNK - 4096, b"\x02" * 8192, False)  # two chunks: a task's work
        assert hasattr(answer, "__await__") and type(answer) is not Later
        release = trio.Event()

        async def complete():
            await release.wait()
            return gw.view

        def h2_has_chunk_1() -> bool:
            return replicas["h2"].store.resolve(gw.lineage, 1, gw.chain_for(1)) is not None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.switch_head, complete)
            await trio.sleep(0.01)  # the switch holds new writes and waits for complete()

            async def run():
                await answer

            nursery.start_soon(run)  # the write's task starts only now
            await trio.sleep(0.2)
            assert gw._inflight == 0 and not h2_has_chunk_1()
            release.set()
        assert h2_has_chunk_1()
        assert copy_of_h2(replicas, gw) == b"\x02" * 4096


async def test_a_shrink_switch_refuses_past_its_cut_from_its_start_and_undoes_it_if_it_fails():
    """switch_head(cut_to): requests past the size a shrink leaves are refused while its
    completion is under way (its answer may be lost and asked again), those within go
    on; a completion that fails leaves the size as it was."""
    async with three_hosts() as (gw, replicas, reg, _):
        size = gw.size
        await gw.write(CHUNK, b"\x03" * 4096, False)
        release = trio.Event()

        async def complete():
            await release.wait()
            raise RegistryUnavailable("kv/txn failed with an unknown outcome")

        async def switch():
            with pytest.raises(RegistryUnavailable):
                await gw.switch_head(complete, CHUNK)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(switch)
            await trio.sleep(0.01)
            assert gw.size == CHUNK
            with pytest.raises(PastEnd):
                await call(gw.read(CHUNK, 4096))
            assert extents_bytes(await call(gw.read(0, 4096)), 0, 4096) == bytes(4096)
            release.set()
        assert gw.size == size == gw.view.size
        assert extents_bytes(await call(gw.read(CHUNK, 4096)), CHUNK, 4096) == b"\x03" * 4096


async def test_a_switch_whose_completion_is_fenced_lets_no_held_write_go_on():
    """The lease was taken over while a snapshot completed (Fenced from the registry):
    the writes the switch held must not leave with the old token once it lets go."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        release = trio.Event()
        outcome = []

        async def complete():
            await release.wait()
            raise Fenced("the lease of v was taken over")

        async def switch():
            with pytest.raises(Fenced):
                await gw.switch_head(complete)

        async def held_write():
            try:
                outcome.append(await call(gw.write(0, b"\x07" * 4096, False)))
            except Fenced as e:
                outcome.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(switch)
            await trio.sleep(0.01)
            nursery.start_soon(held_write)
            await trio.sleep(0.01)
            assert outcome == []  # held
            release.set()
        assert gw.fenced and len(outcome) == 1 and isinstance(outcome[0], Fenced)
        assert copy_of_h2(replicas, gw, 0) == b"\x01" * 4096


def copy_of_h2(replicas, gw, index: int = 1) -> bytes:
    store = replicas["h2"].store
    gen = store.resolve(gw.lineage, index, gw.chain_for(index))
    return bytes(store.read(ChunkKey(gw.lineage, index, gen), 0, 4096))


async def test_a_write_whose_connection_is_gone_when_it_needs_the_full_path_is_let_go():
    async with three_hosts() as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)
        kills["h3"].cancel()
        later = gw.write(0, b"\x07" * 4096, False)
        assert type(later) is Later
        answers = []
        # bound as by an NBD connection whose tasks have ended: it can run nothing more
        later.bind(lambda value, exc: answers.append((value, exc)), lambda awaitable: False)
        with trio.fail_after(5):
            while gw._inflight:  # h3's failure needs the full path, which is refused
                await trio.sleep(0.01)
        assert answers == []  # nobody to answer: the write is not acknowledged
        assert gw._inflight == 0  # and a snapshot will not wait for it forever


async def test_frames_leave_before_the_local_copy_is_written():
    """The peers start on a write while the gateway writes its own copy: both frames are
    out (in flight, not waiting in a queue) by the time the local write begins."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        seen = []
        local = replicas["h1"]
        handle = local.handle

        def watching(msg, peer=None):
            conns = gw.pool._conns.values()
            seen.append([(len(c.pending), len(c.link.out)) for c in conns])
            return handle(msg, peer)

        local.handle = watching
        later = gw.write(0, b"\x08" * 4096, False)
        assert type(later) is Later
        assert seen == [[(1, 0), (1, 0)]]  # idle links: each frame sent at once
        with trio.fail_after(5):
            await later
        for h, r in replicas.items():
            assert copy_of(r, gw, 0, 0, 4096) == b"\x08" * 4096, h


async def test_a_local_write_that_breaks_after_the_frames_left_is_a_failed_copy():
    """An unexpected error of the local write, with the peers' copies already under way:
    that copy is recorded stale like any failed replica and the write stands on the other
    two (min_size 2); it is never acknowledged with a copy silently behind."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)
        local = replicas["h1"]
        handle = local.handle

        def broken(msg, peer=None):
            raise OSError(5, "Input/output error")

        local.handle = broken
        later = gw.write(0, b"\x09" * 4096, False)
        assert type(later) is Later
        with trio.fail_after(10):
            await later
        local.handle = handle
        assert [r.host_id for r in reg.list_stale(gw.lineage, 0)] == ["h1"]
        assert "h1" in gw.stale[0]
        for h in ("h2", "h3"):
            assert copy_of(replicas[h], gw, 0, 0, 4096) == b"\x09" * 4096, h
        assert gw._inflight == 0


async def test_a_flush_sends_the_peers_theirs_before_flushing_its_own():
    """The Flush frames are in flight when the gateway syncs its own copy: the syncs of
    the three hosts overlap instead of the peers waiting for the gateway's."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        await gw.write(0, b"\x02" * 4096, False)
        flushed, seen = [], []
        for h, r in replicas.items():
            def counting(h=h, orig=r.store.flush):
                flushed.append(h)
                return orig()
            r.store.flush = counting
        local = replicas["h1"]
        handle = local.handle

        def watching(msg, peer=None):
            if type(msg).__name__ == "Flush":
                seen.append(sorted(len(c.pending) for c in gw.pool._conns.values()))
            return handle(msg, peer)

        local.handle = watching
        with trio.fail_after(5):
            await gw.flush()
        assert seen == [[1, 1]]  # both peers' Flush frames were out first
        assert sorted(flushed) == ["h1", "h2", "h3"]
        assert not reg.list_stale()


async def test_a_replica_lost_before_a_flush_is_recorded_stale_and_the_flush_holds():
    async with three_hosts() as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)
        await gw.write(0, b"\x02" * 4096, False)  # on every copy, not yet durable
        kills["h3"].cancel()  # takes effect at the next checkpoint: h3 still looks ready
        with trio.fail_after(10):
            await gw.flush()  # h3 cannot say it flushed: it may have lost that write
        assert [r.host_id for r in reg.list_stale(gw.lineage, 0)] == ["h3"]
        assert "h3" in gw.stale[0]


async def test_a_flush_asked_again_after_one_below_min_size_fails_again():
    """A flush that failed keeps what it covered for the next one: asked again (a client
    retrying its FLUSH), it does not find nothing to do and succeed while the copies that
    took the writes can neither flush nor be recorded stale."""
    async with three_hosts(min_size=2) as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        await gw.write(0, b"\x02" * 4096, False)  # on every copy, not yet durable
        kills["h2"].cancel()
        kills["h3"].cancel()
        for attempt in range(2):
            with trio.fail_after(10), pytest.raises(BelowMinSize):
                await gw.flush()
            assert not reg.list_stale(), attempt  # one durable copy: nothing recorded
            assert gw._unflushed == {"h2": {0}, "h3": {0}}, attempt  # h1 flushed
        assert gw._inflight == 0


async def test_a_cancelled_flush_leaves_its_writes_to_the_next_one():
    """The client that asked a FLUSH went away while it ran (its task cancelled): the
    next FLUSH, from another connection with multi-conn or from the client reconnected,
    still flushes every copy that took the writes answered before it."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        await gw.write(0, b"\x02" * 4096, False)
        with trio.CancelScope() as scope:
            scope.cancel()
            await gw.flush()  # (its frames may have left before the cancel: no matter)
        pool, sent = gw.pool, []
        queue_all, call = pool.queue_all, pool.call

        def queue_spy(addresses, message, *args, **kwargs):
            sent.extend((a, type(message).__name__) for a in addresses)
            return queue_all(addresses, message, *args, **kwargs)

        async def call_spy(address, message, *args, **kwargs):
            sent.append((address, type(message).__name__))
            return await call(address, message, *args, **kwargs)

        pool.queue_all, pool.call = queue_spy, call_spy
        with trio.fail_after(5):
            await gw.flush()
        peers = {gw.cluster.address(h) for h in ("h2", "h3")}
        assert {a for a, kind in sent if kind == "Flush"} == peers
        assert gw._unflushed == {}
        sent.clear()
        assert gw.flush() is None  # all settled: nothing left for a third
        assert sent == []


async def test_a_failed_flush_gives_back_only_what_it_did_not_settle():
    """Of a flush that fails, the hosts that flushed and the chunks recorded stale are
    settled; only the rest waits for the next flush. Chunk 1 has a copy known behind
    (h2), so h3's failure leaves it one durable copy (the error); chunk 0 keeps two, and
    h3's copy of it is recorded stale."""
    async with three_hosts(min_size=2) as (gw, replicas, reg, kills):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        await gw.write(0, b"\x02" * 4096, False)
        await gw.write(CHUNK, b"\x03" * 4096, False)
        gw.stale[1] = frozenset({"h2"})
        kills["h3"].cancel()
        with trio.fail_after(10), pytest.raises(BelowMinSize, match="chunk 1 "):
            await gw.flush()
        assert [r.host_id for r in reg.list_stale(gw.lineage, 0)] == ["h3"]
        assert gw._unflushed == {"h3": {1}}


async def test_a_writable_payload_is_copied_and_a_read_only_one_kept():
    """The NBD server hands a small write as a view of its receive buffer, which its next
    request overwrites: writable, the gateway copies it. A large write comes as a read-only
    view of a buffer of its own that stays as it is while referred to (nbd_frontend.export):
    the gateway keeps it and copies nothing. A write across two chunks sends its pieces
    when it is awaited, after the buffer changed here."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x01" * 4096, False)  # connects
        for readonly in (False, True):
            buf = bytearray(b"\x02" * 8192)
            view = memoryview(buf).toreadonly() if readonly else memoryview(buf)
            pending = gw.write(CHUNK - 4096, view, False)
            buf[:] = b"\x03" * 8192
            with trio.fail_after(5):
                await pending
            expected = (b"\x03" if readonly else b"\x02") * 4096
            for h, r in replicas.items():
                assert copy_of(r, gw, 0, CHUNK - 4096, 4096) == expected, (h, readonly)
                assert copy_of(r, gw, 1, 0, 4096) == expected, (h, readonly)


async def test_a_write_overlapping_one_in_flight_waits_for_it_so_every_copy_ends_alike():
    """W1 leaves on the fast path; h2, on a newer map already, refuses it (StaleEpoch),
    and W1 will be sent to h2 again on a fresh map. Meanwhile the gateway learns that map
    and the client writes W2 over the same bytes. Sent at once, W2 would reach h2 before
    W1's second sending: h2 would end with W1 and the other copies with W2, both writes
    acknowledged. W2 waits for W1 to be settled instead (the general path)."""
    async with three_hosts() as (gw, replicas, reg, _):
        await gw.write(0, b"\x00" * 4096, False)  # connects
        cluster = gw.cluster
        hosts = cluster.map.hosts
        replicas["h2"]._epoch = lambda: 2  # h2 has seen the next map

        async def refresh_map():
            cluster.set_map(ClusterMap(2, hosts))

        gw.refresh_map = refresh_map
        first = gw.write(0, b"\x01" * 4096, False)
        assert type(first) is Later
        cluster.set_map(ClusterMap(2, hosts))  # (the service's map watcher)
        second = gw.write(2048, b"\x02" * 4096, False)
        assert type(second) is not Later  # it overlaps a write in flight: it waits

        async def settle(answer):
            await answer

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(settle, first)
                nursery.start_soon(settle, second)
        want = b"\x01" * 2048 + b"\x02" * 4096
        for h, r in replicas.items():
            assert copy_of(r, gw, 0, 0, 6144) == want, h
        assert gw._inflight == 0 and not gw._flying and not gw._landed
        # a write beside it, with no bytes in common, never waited
        later = gw.write(8192, b"\x03" * 4096, False)
        assert type(later) is Later
        with trio.fail_after(5):
            await later
