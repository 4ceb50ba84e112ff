"""Replicated writes whose client goes away (the connection's tasks cancelled) are still
settled: a copy that failed them is recorded stale, their in-flight count ends (a snapshot's
drain waits for it) and so does their note in flight (later overlapping writes wait for it)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tests.unit.test_gateway_fast_write import three_hosts
from vbp.later import Later

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def gated_three_hosts():
    """three_hosts, h2 answering each request only once gates["h2"] (an Event, when one is
    set there) lets it, by whatever handle its replica has then."""
    gates = {"h2": None}

    def wrap(h, replica):
        if h != "h2":
            return replica.handle

        async def gated(msg, peer=None):
            if gates["h2"] is not None:
                await gates["h2"].wait()
            r = replica.handle(msg, peer)
            if hasattr(r, "__await__"):
                r = await r
            return r
        return gated

    async with three_hosts(wrap=wrap) as (gw, replicas, reg, _):
        yield gw, replicas, reg, gates


async def test_a_fast_write_awaited_by_leased_whose_client_goes_away_is_still_settled():
    """A write that waited for a head switch (_leased) leaves on the fast path, and the
    task awaiting its Later is cancelled; h2 then refuses it (not clean). The Later was
    never bound, so the rest (_settle_later) was kept and run by nobody: h2 never recorded
    stale, the write counted in flight for ever, an overlapping write hung behind it."""
    async with gated_three_hosts() as (gw, replicas, reg, gates):
        await gw.write(0, b"\x00" * 4096, False)  # connects
        gates["h2"] = trio.Event()
        hold = gw._hold = trio.Event()  # a snapshot switching the head
        first = gw.write(0, b"\x01" * 4096, False)
        assert type(first) is not Later  # _leased: waits for the switch
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            async def client():
                with scope:
                    await first
            nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            gw._hold = None
            hold.set()
            await trio.testing.wait_all_tasks_blocked()
            assert gw._inflight == 1 and gw._flying  # W1 left on the fast path, h2 holds it
            scope.cancel()  # the client goes away
            await trio.testing.wait_all_tasks_blocked()
            replicas["h2"]._epoch = lambda: 2  # h2 refuses it (StaleEpoch): not clean
            gates["h2"].set()
            with trio.move_on_after(5):
                await gw.drain()
        # W2 over the same bytes, from another connection
        with trio.move_on_after(5) as w2:
            r = gw.write(0, b"\x02" * 4096, False)
            if r is not None:
                await r
        assert not w2.cancelled_caught, "a later overlapping write hung behind W1"
        assert gw._inflight == 0, "snapshot drain / lease give-back would wait forever"
        assert reg.list_stale(), "h2 missed W1 and nothing records it"


async def test_a_batched_write_sent_by_the_general_path_is_settled_even_if_its_client_goes_away():
    """A put-off (batched) write finds no room on a link at end_writes: it goes by
    _replicate_later. Its client goes away while h2 has not answered; h2 then fails the
    write. h1 and h3 took it, h2 did not: h2 must be recorded stale (the general path's
    settling was not shielded from the cancellation there, as it is elsewhere)."""
    from vbp.errors import LocalFault
    async with gated_three_hosts() as (gw, replicas, reg, gates):
        await gw.write(0, b"\x00" * 4096, False)  # connects
        await gw.write(16384, b"\x00" * 4096, False)
        pool = gw.pool
        real_ready = pool.ready
        gate = gates["h2"] = trio.Event()
        orig = replicas["h2"].handle

        def failing(msg, peer=None):
            raise LocalFault("h2's disk failed the write")
        replicas["h2"].handle = failing  # (h2_handle looks it up per call)
        gw.begin_writes(4)
        laters = [gw.write(i * 8192, bytes([i + 1]) * 4096, False) for i in range(4)]
        assert all(type(x) is Later for x in laters)
        pool.ready = lambda addresses: False  # room ran out meanwhile
        gw.end_writes()
        pool.ready = real_ready
        scopes = []
        async with trio.open_nursery() as nursery:
            for later in laters:
                scope = trio.CancelScope()
                scopes.append(scope)

                async def client(later=later, scope=scope):
                    with scope:
                        await later
                nursery.start_soon(client)
            await trio.testing.wait_all_tasks_blocked()
            for s in scopes:
                s.cancel()  # the client goes away
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            with trio.move_on_after(5):
                await gw.drain()
        replicas["h2"].handle = orig
        from vbp.layout import ChunkKey
        store = replicas["h1"].store
        gen = store.resolve(gw.lineage, 0, gw.chain_for(0))
        h1 = bytes(store.read(ChunkKey(gw.lineage, 0, gen), 0, 1))
        store2 = replicas["h2"].store
        h2 = bytes(store2.read(ChunkKey(gw.lineage, 0, store2.resolve(gw.lineage, 0, gw.chain_for(0))), 0, 1))
        assert h1 == h2 or reg.list_stale() or gw.unrecorded, "copies disagree with no record"
