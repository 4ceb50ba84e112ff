"""A gateway follows its volume's record (blockd.service.VolumeProvider.sync_records): a
volume deleted and created again under its name, a head that changes under writes in
flight. Sim hosts with their background loops on, on a virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from control import api
from tests.sim.harness import Sim, call, extents_bytes
from vbp.layout import MiB


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_volume_deleted_and_created_again_under_its_name_fences_the_old_gateway():
    """Between two record syncs, `v` is deleted and a new `v` created (head 1 again, a
    new lineage). The old gateway must not go on serving the deleted volume's bytes as
    the new `v`, nor take writes into a lineage no record names (garbage collection
    frees them): it is fenced, and a gateway on another host serves the new volume."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
            old = sim.volume("v")
            api.delete_volume(sim.reg, "v", force=True)
            sim.create_volume("v", 2 * MiB, replicas=3)
            assert sim.volume("v").head == old.head and sim.volume("v").lineage != old.lineage
            await trio.sleep(1.0)  # record syncs
            assert gw.fenced
            gw2 = await h1.run_on(h1.provider.open_export, "v")
            with trio.fail_after(sim.lease_ttl + 5):
                await h1.run_on(lambda: call(gw2.write(4096, b"C" * 4096, False)))
            got = extents_bytes(await h1.run_on(lambda: call(gw2.read(0, 8192))), 0, 8192)
            assert got == bytes(4096) + b"C" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_snapshot_export_of_a_volume_deleted_and_created_again_is_gone():
    """`v@s` stays open while `v` is deleted (forced) and created again with a snapshot
    `s` of the same chain: the export serves the deleted volume, so it is gone."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)
            h0, h2 = sim.hosts["h0"], sim.hosts["h2"]
            await sim.snapshot("v", "s")
            snap = await h2.run_on(h2.provider.open_export, "v@s")
            api.delete_volume(sim.reg, "v", force=True)
            sim.create_volume("v", 2 * MiB, replicas=3)
            await sim.snapshot("v", "s")
            assert sim.volume("v").snapshot("s").chain == snap.view.chain
            await trio.sleep(1.0)  # record syncs
            assert snap.gone is not None
            nursery.cancel_scope.cancel()

    run(main)
