"""Review of garbage collection against control-plane calls made while a GC pass waits on
the registry (blockd.service.Blockd.collect_garbage_once). Sim hosts on a virtual clock,
their background loops off so each step is the test's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from blockd.service import Blockd
from control import api
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB


class HeldAt:
    """A host's registry whose call `method` answers only once `gate` is set (a slow etcd
    answer); `entered` is set when GC makes that call."""

    def __init__(self, inner, method: str):
        self.inner, self.method = inner, method
        self.gate, self.entered = trio.Event(), trio.Event()

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name != self.method:
            return fn

        async def held(*args, **kwargs):
            self.entered.set()
            await self.gate.wait()
            return await fn(*args, **kwargs)
        return held


async def _append(out: list, aw) -> None:
    out.append(await aw)


def test_gc_does_not_mark_what_a_clone_made_during_the_pass_reads():
    """v has chunk 0 written in g1 on every copy. A GC pass on a host reads the records
    (v: chain (g1,)) and waits on the registry. Meanwhile: v@s1 (head g2), v@s2 (head g3),
    clone c of v@s2 (chain g1, g2, g4), v deleted (its deleted_gens entry: g1, g2, g3).
    The pass then reads deleted_gens and marks what no reader of the records it read
    holds: g2 and g3. g2 is in c's chain: c's read of chunk 0 resolves to g1 there, older
    than the marked g2, and is answered an error (gone_below) for 30 days."""
    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, chunk_size=MiB)
            lin, g1 = rec.lineage, rec.head
            good = b"G" * 4096
            for host in sim.hosts.values():
                host.replica.write("v", lin, 0, g1, (g1,), 0, good, MiB, 0, False,
                                   host.cluster.epoch, 1)
            h = sim.hosts["h0"]
            registry = HeldAt(sim.registry, "leases_of_deleted")
            gc_host = SimpleNamespace(store=h.store, registry=registry, provider=h.provider)
            freed = []
            async with trio.open_nursery() as gc:
                gc.start_soon(lambda: _append(freed, Blockd.collect_garbage_once(gc_host)))
                await registry.entered.wait()  # GC read the records: v at (g1,)
                sim.snapshot_now("v", "s1")
                sim.snapshot_now("v", "s2")
                sim.clone("v@s2", "c")
                api.delete_volume(sim.reg, "v", force=True)
                registry.gate.set()
            c = sim.volume("c")
            assert not set(c.chain) & set(h.store.collected_gens.get(lin, ())), (
                c.chain, h.store.collected_gens)
            gw = await h.run_on(h.provider.open_export, "c")
            got = extents_bytes(await h.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)
            gw.close()
            assert got == good
            nursery.cancel_scope.cancel()
    run(main)
