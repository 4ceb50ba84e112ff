"""The write lease passes on request (WantLease, VolumeProvider.lease_wanted) from an
idle holder to a host whose client writes: what a QEMU live migration does, the source
attached through one host and the destination through another. Sim hosts with their
background loops on, on a virtual clock: a hand-over takes a fraction of a second where
waiting the lease out takes lease_ttl."""

from __future__ import annotations

import pytest
import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.errors import BelowMinSize
from vbp.layout import MiB

K4 = 4096


async def read(host, gw, offset: int, length: int) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(offset, length))), offset, length)


def test_the_lease_passes_to_and_fro_between_idle_holders():
    async def main():
        sim = Sim(3, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)
            h0, h1, h2 = (sim.hosts[f"h{i}"] for i in range(3))
            gw0 = await h0.run_on(h0.provider.open_export, "v")
            gw1 = await h1.run_on(h1.provider.open_export, "v")
            await h0.run_on(lambda: call(gw0.write(0, b"A" * K4, False)))
            await h0.run_on(lambda: call(gw0.flush()))  # (the source's switchover flush)
            with trio.fail_after(1.0):  # (not a lease period: handed over)
                await h1.run_on(lambda: call(gw1.write(K4, b"B" * K4, False)))
            assert gw0.token == 0 and not gw0.fenced and gw1.token
            assert await read(h0, gw0, 0, 2 * K4) == b"A" * K4 + b"B" * K4  # (a reader now)
            await h1.run_on(lambda: call(gw1.flush()))
            with trio.fail_after(1.0):  # and back
                await h0.run_on(lambda: call(gw0.write(2 * K4, b"C" * K4, False)))
            assert gw1.token == 0 and not gw1.fenced and gw0.token
            # a holder whose only debt is a write not flushed flushes it for the asker
            # and hands the lease over (as RBD's exclusive lock flushes before it passes):
            # a source QEMU may write after its switchover flush and never flush again
            await h0.run_on(lambda: call(gw0.write(3 * K4, b"D" * K4, False)))
            asked = trio.current_time()
            with trio.fail_after(2.5):  # (asked, flushed, asked again: not a lease period)
                await h1.run_on(lambda: call(gw1.write(4 * K4, b"E" * K4, False)))
            assert trio.current_time() - asked < 2.5
            assert gw0.token == 0 and not gw0.fenced and gw1.token
            await h1.run_on(lambda: call(gw1.flush()))
            gw2 = await h2.run_on(h2.provider.open_export, "v")
            want = b"".join(bytes([c]) * K4 for c in b"ABCDE")
            assert await read(h2, gw2, 0, 5 * K4) == want
            assert await read(h0, gw0, 0, 5 * K4) == want
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_made_for_the_asker_leaves_its_failure_to_the_clients_next_flush():
    """A holder that owes only a flush flushes for the host asking for the lease
    (VolumeProvider._flush_for_asker). Its failure must reach the client's next FLUSH, as
    fsync reports a failed writeback once: a copy that restarted before the flush lost
    the write it took, and that flush's error is the only one that tells it. Swallowed
    there (logged event=lease_flush_failed), the client's next FLUSH found nothing to
    flush and succeeded over a write kept by no copy."""
    async def main():
        sim = Sim(1, hosts=3, zones=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=2, min_size=1)
            a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
            host = next(h for h in sim.hosts.values() if h.id not in (a, b))
            gw = await host.provider.open_export("v")
            await call(gw.write(0, b"\x01" * K4, False))
            faults = host.faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x02" * K4, False))  # acknowledged by b alone
            faults.heal()
            sim.crash(b)  # before any flush: its new process lacks the write
            await sim.restart(b)
            sim.sync_maps()
            assert gw.lease_busy() == "writes not flushed"
            host.provider.lease_wanted("v", gw.token)  # (a WantLease from another host)
            while "v" in host.provider._flushing_for:
                await trio.sleep(0.01)
            with pytest.raises(BelowMinSize):
                await call(gw.flush())
            await call(gw.flush())  # (told once)
            nursery.cancel_scope.cancel()

    run(main)
