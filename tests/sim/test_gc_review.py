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
            sim.write_copies("v", good, (g1,))
            h = sim.hosts["h0"]
            registry = HeldAt(sim.registry, "leases_of_deleted")
            gc_host = SimpleNamespace(store=h.store, registry=registry, provider=h.provider,
                                      replica=h.replica, _gc_memo=None)
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


class RacingCreate:
    """The synchronous registry, with `before()` run at the start of create_from (what
    other callers do between a clone's first read of its parent and its create)."""

    def __init__(self, inner, before):
        self.inner, self.before = inner, before

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def create_from(self, *args, **kwargs):
        before, self.before = self.before, lambda: None
        before()
        return self.inner.create_from(*args, **kwargs)


def test_a_shrunk_and_grown_clone_of_a_snapshot_taken_again_reads_zeros():
    """p@s exists; `vbp volume clone p@s c` reads p and draws c's head g3. Meanwhile p@s
    is deleted, p@x taken (head g4), chunk 1 written in g4, p@s taken again (it froze
    chain g1, g2, g4). The clone is made from the record it reads in its transaction: its
    chain (g1, g2, g4, g3), head g3. Shrunk to one chunk, c's cut hides the generations
    up to its head, g3, from chunk 1: g4 stays visible. Grown again, chunk 1 reads p's
    bytes of g4, not zeros."""
    async def main():
        sim = Sim(12, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("p", 2 * MiB, replicas=3, chunk_size=MiB)
            lin = rec.lineage
            sim.snapshot_now("p", "s")

            def meanwhile():
                api.delete_volume(sim.reg, "p@s", force=True)
                g4 = sim.snapshot_now("p", "x")
                p = sim.volume("p")
                for host in sim.hosts.values():
                    host.replica.write("p", lin, 1, g4, p.chain, 0, b"P" * 4096, MiB, 0,
                                       False, host.cluster.epoch, 1)
                sim.snapshot_now("p", "s")

            c = api.clone(RacingCreate(sim.reg, meanwhile), "p@s", "c")
            assert 4 in c.chain  # (the interleaving happened)
            await sim.shrink("c", MiB)
            api.resize(sim.reg, "c", 2 * MiB)
            h = sim.hosts["h0"]
            gw = await h.run_on(h.provider.open_export, "c")
            got = extents_bytes(await h.run_on(lambda: call(gw.read(MiB, 4096))), MiB, 4096)
            gw.close()
            assert got == bytes(4096)
            nursery.cancel_scope.cancel()
    run(main)


def test_a_shrink_of_a_clone_made_before_its_head_was_checked_hides_its_whole_chain():
    """A clone made by older code may hold a generation newer than its head in its chain
    (the interleaving above): its shrink's cut must hide that one too."""
    from vbp.volume import new_volume, shrink, visible_chain
    from dataclasses import replace

    rec = replace(new_volume("c", 2 * MiB, chunk_size=MiB, head=3), chain=(1, 2, 4, 3))
    rec = shrink(rec, MiB, 6)
    assert visible_chain(rec.chain, rec.cuts, 1) == (6,)
