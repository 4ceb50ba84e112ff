"""Review of the write lease's hand-over on request (WantLease: VolumeProvider.lease_wanted,
VolumeGateway.drop_idle_lease) against what may be under way on the holder when a
WantLease comes: a write of its own client, a record sync completing a snapshot under the
lease. Sim hosts, virtual clock; the WantLease is sent over the sim network as the asking
host's _want_lease sends it."""

from __future__ import annotations

import pytest
import trio

from replicator import messages as m
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB
from vbp.volume import VolumeRecord, request_snapshot
from control import api

K4 = 4096


async def read(host, gw, offset: int, length: int) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(offset, length))), offset, length)


async def want_lease(asker, holder, volume: str, token: int) -> None:
    """The WantLease `asker`'s _want_lease sends to `holder` (the registry's lease token)."""
    await asker.run_on(lambda: asker.pool.call(holder.addr, m.WantLease(volume, token)))


async def idle_holder(sim, nursery):
    """Hosts h0, h1 with gateways of "v"; h0's holds the lease, idle (flushed)."""
    await sim.start(nursery)
    sim.create_volume("v", 4 * MiB, replicas=3)
    h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
    gw0 = await h0.run_on(h0.provider.open_export, "v")
    gw1 = await h1.run_on(h1.provider.open_export, "v")
    await h0.run_on(lambda: call(gw0.write(0, b"A" * K4, False)))
    await h0.run_on(lambda: call(gw0.flush()))
    assert gw0.token
    return h0, h1, gw0, gw1


def test_a_write_of_the_holder_taken_in_before_a_wantlease_keeps_the_lease():
    """A write the holder's NBD server took in (its pieces noted in flight: _general,
    whose task has not run yet) when a WantLease comes is a write under way: the lease
    is not idle. Handed over anyway, the write's task sent it with token 0 (the dropped
    token): the replicas refused it (Fenced), the gateway was fenced for good and its
    client got EIO, a write the guest had every right to make."""
    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, h1, gw0, gw1 = await idle_holder(sim, nursery)
            token = gw0.token
            # a write across chunks 0 and 1 (the general path: a task the server starts)
            pending = gw0.write(MiB - 2048, b"W" * K4, False)
            await want_lease(h1, h0, "v", token)
            await h0.run_on(lambda: call(pending))
            assert not gw0.fenced
            await h0.run_on(lambda: call(gw0.flush()))
            assert await read(h0, gw0, MiB - 2048, K4) == b"W" * K4
            # the asker gets it once the holder is idle again
            with trio.fail_after(3.0):
                await h1.run_on(lambda: call(gw1.write(2 * MiB, b"B" * K4, False)))
            await h1.run_on(lambda: call(gw1.flush()))
            assert await read(h1, gw1, MiB - 2048, K4) == b"W" * K4
            assert not gw0.fenced and not gw1.fenced
            nursery.cancel_scope.cancel()

    run(main)
