"""Review (rev-snappit): snapshot point-in-time correctness while a volume is written.
Sim hosts with their background loops on, on a virtual clock."""

from __future__ import annotations

import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB


async def read_4k(host, gw, offset: int = 0) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(offset, 4096))), offset, 4096)


async def snapshot_reads(sim, hosts, export: str) -> dict[str, bytes]:
    """The first 4 KiB of `export` as a client of each of `hosts` reads it (opened and
    closed there)."""
    out = {}
    for hid in hosts:
        h = sim.hosts[hid]
        gw = await h.run_on(h.provider.open_export, export)
        try:
            out[hid] = await read_4k(h, gw)
        finally:
            gw.close()
    return out


def test_a_snapshot_taken_after_its_writer_crashed_reads_alike_everywhere_and_for_good():
    """hw holds v's lease; its write "A" was acknowledged; its last write "B" reached one
    copy of chunk 0 only (x) when hw crashed: never acknowledged. `vbp volume snapshot
    v s` then completes without a holder (control.api.complete_unleased), which hands
    the lease back owing the takeover's reconcile. v@s, read through x, answered "B";
    through the other copies, "A"; and once anyone opened v (its takeover compares the
    copies and resyncs x to the others) x answered "A" too: the snapshot's bytes
    depended on the host and changed after it was taken."""
    async def main():
        sim = Sim(7, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            holders = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            hw = next(h for i, h in sim.hosts.items() if i not in holders)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(0, b"A" * 4096, False)))
            x = sim.hosts[holders[0]]  # (the holder's last write, as it reached x only)
            x.replica.write("v", rec.lineage, 0, w.gen, w.chain, 0, b"B" * 4096,
                            rec.chunk_size, 0, False, x.cluster.epoch, w.token)
            sim.crash(hw.id)
            sim.expire_lease("v")
            await sim.snapshot("v", "s")  # (no holder: completed by the command)
            first = await snapshot_reads(sim, holders, "v@s")
            assert len(set(first.values())) == 1, first
            # the volume opened again (its VM restarted elsewhere): its takeover compares
            # the copies, and resync brings those that differ to the others
            h = sim.hosts[holders[1]]
            head = await h.run_on(h.provider.open_export, "v")
            await trio.sleep(20)
            assert not sim.reg.list_stale()
            head.close()
            assert await snapshot_reads(sim, holders, "v@s") == first
            nursery.cancel_scope.cancel()

    run(main)


def test_a_clone_of_a_snapshot_taken_after_its_writer_crashed_reads_alike_everywhere():
    """As above, with a clone of v@s (and a clone of that clone) read instead of the
    snapshot: it opens as a head of its own, whose lease was never orphaned, so nothing
    settled the parent's: it answered each host's copy of the generation it shares."""
    async def main():
        sim = Sim(7, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            holders = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            hw = next(h for i, h in sim.hosts.items() if i not in holders)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(0, b"A" * 4096, False)))
            x = sim.hosts[holders[0]]
            x.replica.write("v", rec.lineage, 0, w.gen, w.chain, 0, b"B" * 4096,
                            rec.chunk_size, 0, False, x.cluster.epoch, w.token)
            sim.crash(hw.id)
            sim.expire_lease("v")
            await sim.snapshot("v", "s")
            sim.clone("v@s", "c")
            sim.snapshot_now("c", "t")
            sim.clone("c@t", "d")
            for name in ("c", "d"):
                reads = await snapshot_reads(sim, holders, name)
                assert len(set(reads.values())) == 1, (name, reads)
            nursery.cancel_scope.cancel()

    run(main)
