"""The failures a gateway could not record (VolumeGateway.unrecorded) and the copies it
suspects (VolumeGateway.suspects) are recorded stale by the provider once the registry
answers: from a lease renewal and from a close's release, which can run at once for one
gateway. Each took the first entry, awaited its mark and then popped the first entry: two
at once marked the first twice and popped the second unrecorded, and that copy, which
missed an acknowledged write, counted as current."""

from __future__ import annotations

import trio

from tests.sim.harness import Sim, run
from vbp.layout import MiB


def test_two_recordings_at_once_record_every_missed_copy():
    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 4 * MiB, replicas=3, chunk_size=MiB)
            h = sim.hosts["h0"]
            gw = await h.provider.open_export("v")
            gw.unrecorded.extend([(0, ("h0", "h1"), ("h2",)), (1, ("h0", "h2"), ("h1",))])
            gw.suspects.extend([(2, ["h1"]), (3, ["h2"])])
            real = h.registry.mark_stale

            async def slow(*args, **kwargs):
                await trio.sleep(0.1)
                return await real(*args, **kwargs)
            h.registry.mark_stale = slow
            async with trio.open_nursery() as both:
                both.start_soon(h.provider._record_missed, gw)
                both.start_soon(h.provider._record_missed, gw)
                both.start_soon(h.provider.settle, gw, None)
                both.start_soon(h.provider.settle, gw, None)
            marked = {(r.index, r.host_id) for r in sim.reg.list_stale(rec.lineage)}
            assert marked == {(0, "h2"), (1, "h1"), (2, "h1"), (3, "h2")}, marked
            assert not gw.unrecorded and not gw.suspects
            nursery.cancel_scope.cancel()

    run(main)
