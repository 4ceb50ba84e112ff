"""The write lease passes on request (WantLease, VolumeProvider.lease_wanted) from an
idle holder to a host whose client writes: what a QEMU live migration does, the source
attached through one host and the destination through another. Sim hosts with their
background loops on, on a virtual clock: a hand-over takes a fraction of a second where
waiting the lease out takes lease_ttl."""

from __future__ import annotations

import trio

from tests.sim.harness import Sim, call, extents_bytes, run
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
