"""Garbage collection (blockd.service.Blockd.collect_garbage_once) against the other users
of a host's chunk store: a resync that drops generations while GC waits on the registry.
Sim hosts on a virtual clock, their background loops off so each step is the test's."""

from __future__ import annotations

import time
from types import SimpleNamespace

import trio

from blockd.service import Blockd
from control import api
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB


class HeldListing:
    """A host's registry whose list_volumes answers only once `gate` is set (a slow
    etcd answer); `entered` is set when GC asks."""

    def __init__(self, inner):
        self.inner, self.gate, self.entered = inner, trio.Event(), trio.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def list_volumes(self):
        self.entered.set()
        await self.gate.wait()
        return await self.inner.list_volumes()


def test_gc_keeps_the_generation_a_resync_left_as_the_only_one():
    """Chunk 0 of v holds g1 on every copy (acknowledged), and on b also g2: a copy-up
    by an unacknowledged write after a snapshot, b recorded stale. The snapshot is
    deleted (g1 stays as v's base). GC on b lists {g1, g2} and waits on the registry;
    meanwhile b's resync drops g2 (its source lacks it) and clears b's record. GC must
    judge by what is still there: g1 is now what v reads on b, and stays."""
    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, chunk_size=MiB)
            lin, g1 = rec.lineage, rec.head
            a, b, c = next(iter(sim.hosts.values())).cluster.replicas(lin, 0, 3)
            good = b"G" * 4096
            sim.write_copies("v", good, (g1,))  # (a, b and c: every host)
            g2 = sim.snapshot_now("v", "s")
            hb = sim.hosts[b]
            hb.replica.write("v", lin, 0, g2, (g1, g2), 0, b"X" * 4096, MiB, 0, False,
                             hb.cluster.epoch, 1)
            sim.reg.mark_stale(lin, 0, [b], time.time_ns())
            api.delete_volume(sim.reg, "v@s", force=True)
            assert sorted(k.gen for k in hb.store.keys(lin)) == [g1, g2]
            await trio.sleep(10)  # past the resync's write window

            registry = HeldListing(sim.registry)
            gc_host = SimpleNamespace(store=hb.store, registry=registry, provider=hb.provider,
                                      replica=hb.replica, _gc_memo=None)
            freed = []
            async with trio.open_nursery() as gc:
                gc.start_soon(lambda: _append(freed, Blockd.collect_garbage_once(gc_host)))
                await registry.entered.wait()  # GC listed {g1, g2}
                await hb.resync.run_once()
                assert not sim.reg.list_stale(lin)
                assert sorted(k.gen for k in hb.store.keys(lin)) == [g1]
                registry.gate.set()

            assert freed == [0]
            assert sorted(k.gen for k in hb.store.keys(lin)) == [g1]
            assert hb.store.collected_gens == {}  # (v still reads both: nothing marked)
            gw = await hb.run_on(hb.provider.open_export, "v")
            got = extents_bytes(await hb.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)
            gw.close()
            assert got == good
            nursery.cancel_scope.cancel()
    run(main)


async def _append(out: list, aw) -> None:
    out.append(await aw)


def test_a_generation_gc_freed_is_marked_even_if_a_later_delete_of_the_pass_fails():
    """Review finding: GC marked the dead generations only after every delete of the pass.
    A delete that fails (LocalFault: the index full, a disk error) ended the pass with the
    generations whose chunks it had freed so far unmarked; the next pass sees none of
    their chunks here, so they were never marked, and their chunks read as holes (zeros)
    here."""
    from vbp.errors import LocalFault
    from vbp.layout import ChunkKey

    async def main():
        sim = Sim(11, hosts=1)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            (h,) = sim.hosts.values()
            recs = [sim.create_volume(n, MiB, replicas=1, chunk_size=MiB) for n in ("v1", "v2")]
            for r in recs:
                h.replica.write(r.name, r.lineage, 0, r.head, (r.head,), 0, b"D" * 4096, MiB,
                                0, False, h.cluster.epoch, 1)
                api.delete_volume(sim.reg, r.name, force=True)
            real, calls = h.store.delete, []

            def failing(key):
                calls.append(key)
                if len(calls) == 2:
                    raise LocalFault("index full")
                return real(key)

            h.store.delete = failing
            try:
                await h.collect_garbage()
            except LocalFault:
                pass
            h.store.delete = real
            await h.collect_garbage()
            assert not list(h.store.keys())
            # both freed here: both gone, not holes
            assert h.store.collected_gens == {r.lineage: {r.head} for r in recs}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_resync_racing_gc_of_a_deleted_generation_takes_it_as_gone_not_as_a_failed_source():
    """Review of b8b97e3: resync (_sync_gen) and scrub read one generation of a chunk by
    the chain (gen,). When the source's GC frees that generation between the resync's
    ChunkState and its ReadChunk (a deleted volume's head, in a lineage a clone keeps),
    the source marks it collected first, and ReadChunk by (gen,) answers NotFound, not
    gen -1: the resync of the (live) chunk failed from that source (resync_source_failed)
    where it takes the generation as gone and passes again."""
    from vbp.layout import ChunkKey
    from replicator import messages as m

    async def main():
        sim = Sim(5, hosts=2)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=2, chunk_size=MiB)
            lin, g1 = rec.lineage, rec.head
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            g2 = sim.snapshot_now("v", "s")
            sim.clone("v@s", "c")  # keeps the lineage (and g1) read
            # v's head g2 holds chunk 0 on h0 only (h1 missed it: stale there)
            h0.replica.write("v", lin, 0, g2, (g1, g2), 0, b"A" * 4096, MiB, 0, False,
                             h0.cluster.epoch, 1)
            api.delete_volume(sim.reg, "v", force=True)
            real = h1.resync.pool

            class GcBetween:  # h0's GC runs between the resync's ChunkState and ReadChunk
                def __getattr__(self, name):
                    return getattr(real, name)

                async def call(self, addr, msg, *a, **kw):
                    reply = await real.call(addr, msg, *a, **kw)
                    if isinstance(msg, m.ChunkState) and msg.gen == g2:
                        h0.store.mark_collected({lin: {g2}})
                        h0.store.delete(ChunkKey(lin, 0, g2))
                    return reply

            h1.resync.pool = GcBetween()
            # (the source lost the generation meanwhile: not an error, the next pass sees it gone)
            assert await h1.resync._sync_from(h0.addr, lin, 0)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_gc_pass_with_nothing_changed_since_the_last_one_skips_the_chunks():
    """Garbage collection runs every gc_interval (5 s) and went over every chunk held at
    each pass, in one loop to list them and one to judge each: about 0.2 s of the event
    loop per pass for 50,000 chunks, seconds for a million, to free nothing. A pass whose
    inputs (the chunks held, the deleted generations, the readers of every lineage) are
    those of the last complete pass frees nothing and is skipped; any change runs it."""
    from tests.sim.harness import Sim, run
    from control import api
    from vbp.layout import MiB

    async def main():
        sim = Sim(5, hosts=2, capacity=512 * MiB)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 100 * MiB, replicas=2, chunk_size=MiB)
            h = sim.hosts["h0"]
            for i in range(100):
                h.replica.write("v", rec.lineage, i, rec.head, rec.chain, 0, b"x" * 4096, MiB,
                                0, False, h.cluster.epoch, 1)
            assert await h.collect_garbage() == 0
            listed = []
            keys = h.store.keys

            def spy(lineage=None):
                listed.append(lineage)
                return keys(lineage)
            h.store.keys = spy
            assert await h.collect_garbage() == 0
            assert await h.collect_garbage() == 0
            assert listed == []  # nothing changed: skipped
            api.delete_volume(sim.reg, "v", force=True)
            assert await h.collect_garbage() == 100  # the delete is a change: all freed
            assert not list(keys())
            nursery.cancel_scope.cancel()

    run(main)
