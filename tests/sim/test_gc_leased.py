"""Garbage collection against a gateway still serving a volume deleted under it
(blockd.service.Blockd.collect_garbage_once): sim hosts on a virtual clock."""

from __future__ import annotations

import pytest
import trio

from control import api
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.errors import NotFound, VbpError
from vbp.layout import ChunkKey
from vbp.layout import MiB
from vbp.registry.base import P_STATS
from vbp.registry.kv import Delete


async def cut_off_and_collected(sim, h0, gw) -> None:
    """h0, cut off from the registry from now on, renews nothing: its lease of v runs
    out and its last publication lapses, it does not hear of v's delete (gw is not
    fenced), and GC runs on every host."""
    await trio.sleep(h0.cfg.lease_ttl + 1)
    sim.expire_lease("v")
    sim.reg.kv.txn([], [Delete(P_STATS + b"h0")])
    assert not gw.fenced
    for h in sim.hosts.values():
        await h.collect_garbage()


async def read_4k(host, gw, offset: int = 0) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(offset, 4096))), offset, 4096)


def test_gc_keeps_a_deleted_volume_while_its_lease_holder_may_still_serve_it():
    """v is open on h0, which holds its write lease (a lease holder is not published:
    its chain is the record's head) and wrote "A". `vbp volume delete v` (no snapshot:
    nothing refuses it) lands, and a GC pass runs on every host before h0's next record
    sync (0.2 s apart; GC every 5 s, so one in 25 deletes, and every one while h0's
    registry reads are slow). GC freed every copy, and h0's client read zeros where it
    had written "A", with no error. GC now frees nothing while a live lease names a
    volume without a record; once h0 noticed the delete (fenced, its lease no longer
    renewed) and the lease ran out, the chunks go."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            sim.create_volume("w", 2 * MiB, replicas=3)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
            await h0.run_on(h0.publish_stats)  # (the heartbeat: a holder is not in it)
            assert sim.reg.host_stats()["h0"]["exports"] == []
            api.delete_volume(sim.reg, "v", force=True)  # (refused without: h0 holds the lease)
            for h in sim.hosts.values():
                await h.collect_garbage()
            try:
                got = await read_4k(h0, gw)
            except VbpError:
                got = None  # an error is fine: the volume is gone
            assert got in (b"A" * 4096, None)
            # h0 notices at its next record sync, and its lease runs out unrenewed
            await h0.run_on(h0.provider.sync_records)
            assert gw.fenced
            sim.expire_lease("v")
            await trio.sleep(10)  # (h0 publishes a fenced reader until its last lapse)
            freed = 0
            for h in sim.hosts.values():
                freed += await h.collect_garbage()
            assert freed == 3 and not any(list(h.store.keys()) for h in sim.hosts.values())
            # v's head is marked collected where its chunks were, nothing of w (never
            # written yet: no chunk anywhere)
            for h in sim.hosts.values():
                assert h.store.collected_gens == {rec.lineage: {rec.head}}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_lease_holder_cut_off_from_the_registry_stops_reading_when_its_lease_runs_out():
    """As above, h0 cut off from the registry from the delete on (its record syncs and
    renewals fail: it never learns of the delete). GC holds off while the lease is live;
    once it ran out unrenewed GC frees the chunks. h0, past its lease, reads on (a lease
    holder's reads are exempt from serve_until for as long as it is not fenced, so that
    a registry outage does not stop them), but the host that freed the chunk marked its
    lineage collected: h0's read fails, where it used to answer zeros for the "A" it
    acknowledged, with no error."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=1)
            h0 = sim.hosts["h0"]
            # a chunk h0 reads from another host (h0's own copies, its GC keeps: it
            # publishes the gateway once past its lease)
            x = next(i for i in range(8) if "h0" not in h0.cluster.replicas(rec.lineage, i, 1))
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(x * MiB, b"A" * 4096, False)))
            api.delete_volume(sim.reg, "v", force=True)
            await cut_off_and_collected(sim, h0, gw)  # (h0 did not hear of the delete)
            with pytest.raises(NotFound):  # (the chunk is gone: an error, never "A" or zeros)
                await h0.run_on(lambda: call(gw.read(x * MiB, 4096)))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_gateway_reads_a_chunk_its_own_host_collected_as_gone():
    """The same on the gateway's own host: a chunk of v not in h0's store reads as a hole
    (zeros) until h0 marks v's head generation collected; from then on every read path
    of the gateway (the NBD server's read_ref with its read plans, read) fails with
    NotFound, and a hole it had planned before is planned again (a mark changes the
    store's layout)."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=1)
            h0 = sim.hosts["h0"]
            mine = [i for i in range(8) if "h0" in h0.cluster.replicas(rec.lineage, i, 1)]
            assert len(mine) >= 2
            gw = await h0.run_on(h0.provider.open_export, "v")
            planned, fresh = mine[0] * MiB, mine[1] * MiB
            assert extents_bytes(gw.read_ref(planned, 4096), planned, 4096) == bytes(4096)
            # (no other change of the store: the mark alone must drop the hole planned)
            h0.store.mark_collected({rec.lineage: {rec.head}})
            for op in (lambda: gw.read_ref(planned, 4096), lambda: gw.read_ref(fresh, 4096),
                       lambda: call(gw.read(fresh, 4096))):
                with pytest.raises(NotFound):
                    await h0.run_on(lambda: call(op()))
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("before", [None, b"O" * 4096])
def test_a_cut_off_lease_holder_of_a_volume_deleted_under_a_clone_does_not_read_zeros(before):
    """Review finding: the variant of the test above where a clone of v@s keeps v's lineage
    alive. v is deleted while h0, cut off, holds its lease and had written "A" to chunk x
    after the snapshot (generation g2). GC frees g2 (the clone reads only g1), but the
    lineage has a reader (the clone): marked per lineage, it was never marked, and h0's
    read resolved on the other host to g1 (the snapshot's bytes) or to nothing (zeros),
    with no error, where it acknowledged "A". Marked per generation, g2 is (no reader's
    chain holds it), and the read by v's chain, which holds it, fails."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=1)
            lin, g1 = rec.lineage, rec.head
            h0 = sim.hosts["h0"]
            x = next(i for i in range(8) if "h0" not in h0.cluster.replicas(lin, i, 1))
            if before is not None:
                (b,) = h0.cluster.replicas(lin, x, 1)
                hb = sim.hosts[b]
                hb.replica.write("v", lin, x, g1, (g1,), 0, before, MiB, 0, False,
                                 hb.cluster.epoch, 1)
            g2 = sim.snapshot_now("v", "s")
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(x * MiB, b"A" * 4096, False)))
            sim.clone("v@s", "c")  # same lineage: v's chunks up to s stay read
            api.delete_volume(sim.reg, "v", force=True)
            await cut_off_and_collected(sim, h0, gw)
            (b,) = h0.cluster.replicas(lin, x, 1)
            assert sim.hosts[b].store.collected_gens == {lin: {g2}}
            with pytest.raises(NotFound):
                await h0.run_on(lambda: call(gw.read(x * MiB, 4096)))
            # the clone reads the snapshot's bytes as before (g1 is not marked)
            cgw = await h0.run_on(h0.provider.open_export, "c")
            assert await read_4k(h0, cgw, x * MiB) == (before or bytes(4096))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_cut_off_holder_whose_pre_snapshot_data_a_clone_overwrote_does_not_read_zeros():
    """Review (rev-final): v wrote "A" at g1 before its snapshot; the clone c (chain g1,
    g3) overwrote chunk x, so GC on x's host b frees g1 of x (no reader needs it) while
    g1 stays in c's chain, and v's head g2 never had a chunk on b: marking only what a
    host held, b marked nothing, and the cut-off holder of the deleted v read zeros at x
    with no error. A volume's delete now leaves its generations in the registry for a
    while (deleted_gens), and every host's GC marks those no reader holds: b marks g2,
    and the read fails."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=1)
            lin, g1 = rec.lineage, rec.head
            h0 = sim.hosts["h0"]
            x = next(i for i in range(8) if "h0" not in h0.cluster.replicas(lin, i, 1))
            y = next(i for i in range(8) if "h0" in h0.cluster.replicas(lin, i, 1))
            (b,) = h0.cluster.replicas(lin, x, 1)
            hb = sim.hosts[b]
            hb.replica.write("v", lin, x, g1, (g1,), 0, b"A" * 4096, MiB, 0, False,
                             hb.cluster.epoch, 1)  # v's data, before its snapshot
            g2 = sim.snapshot_now("v", "s")
            gw = await h0.run_on(h0.provider.open_export, "v")
            # the lease, by a write to a chunk of h0's own (no g2 chunk on b)
            await h0.run_on(lambda: call(gw.write(y * MiB, b"Y" * 4096, False)))
            sim.clone("v@s", "c")  # same lineage, chain (g1, g3)
            cgw = await h0.run_on(h0.provider.open_export, "c")
            await h0.run_on(lambda: call(cgw.write(x * MiB, b"C" * 4096, False)))
            api.delete_volume(sim.reg, "v", force=True)
            await cut_off_and_collected(sim, h0, gw)
            assert sorted(k.gen for k in hb.store.keys(lin) if k.index == x) != [g1]
            assert g2 in hb.store.collected_gens[lin] and g1 not in hb.store.collected_gens[lin]
            with pytest.raises(NotFound):
                await h0.run_on(lambda: call(gw.read(x * MiB, 4096)))
            # the clone reads what it wrote, as before
            assert await read_4k(h0, cgw, x * MiB) == b"C" * 4096
            nursery.cancel_scope.cancel()

    run(main)
