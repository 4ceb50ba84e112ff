"""Review (rev-today): the changes merged on one day, read together. Sim hosts on a
virtual clock (tests/sim/harness.py)."""

from __future__ import annotations

import pytest
import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB


def test_a_snapshot_export_opened_beside_its_volumes_writer_leaves_the_writer_alone():
    """h0 serves v's writer (a VM's disk): it holds v's lease. The registry was out for
    longer than a lease period, so v's lease record shows it run out, and h0's writes wait
    for its next renewal (which succeeds: nobody took the lease). Meanwhile a backup opens
    v@s on h0 too. The open settles the orphaned leases of the volumes the snapshot reads
    (_settle_under_snapshot): it took v's lease over from h0 itself, under a new token
    that deposed h0's own live writer, and handed it back: the VM's next writes failed
    (Fenced: EIO) though its holder never stopped. A lease this host holds for a live
    gateway is not orphaned: its renewal decides, and nothing needs reconciling."""
    async def main():
        sim = Sim(3, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 2 * MiB, replicas=3, min_size=2)
            sim.snapshot_now("v", "s")
            h0 = sim.hosts["h0"]
            w = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(w.write(0, b"A" * 4096, False)))  # the lease
            token = w.token
            # the registry was out past the lease period: the record shows it run out,
            # and the holder's own deadline passed with it
            sim.expire_lease("v")
            w.lease_deadline = trio.current_time() - 1
            snap = await h0.run_on(h0.provider.open_export, "v@s")
            got = extents_bytes(await h0.run_on(lambda: call(snap.read(0, 4096))), 0, 4096)
            assert got == bytes(4096)  # (the snapshot was taken before the write)
            await h0.run_on(h0.provider.renew_all)  # the registry is back
            assert not w.fenced and w.token == token
            await h0.run_on(lambda: call(w.write(4096, b"B" * 4096, False)))
            got = extents_bytes(await h0.run_on(lambda: call(w.read(0, 8192))), 0, 8192)
            assert got == b"A" * 4096 + b"B" * 4096
            snap.close()
            w.close()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_snapshot_export_opened_beside_a_head_reader_settles_through_it():
    """As test_snappit_review's first test (v's writer crashed with its last write on
    one copy only, then `vbp volume snapshot` completed v@s without a holder), with a
    reader of v's head (a backup) open on every copy's host since before the crash: the
    snapshot's open there lets that reader take the orphaned lease over (one takeover of
    it per host, never two taking it from each other), and every host reads v@s alike."""
    async def main():
        sim = Sim(7, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            holders = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            hw = next(h for i, h in sim.hosts.items() if i not in holders)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(0, b"A" * 4096, False)))
            readers = {}
            for hid in holders:
                h = sim.hosts[hid]
                readers[hid] = await h.run_on(h.provider.open_export, "v")
            x = sim.hosts[holders[0]]
            x.replica.write("v", rec.lineage, 0, w.gen, w.chain, 0, b"B" * 4096,
                            rec.chunk_size, 0, False, x.cluster.epoch, w.token)
            sim.crash(hw.id)
            sim.expire_lease("v")
            await sim.snapshot("v", "s")
            reads = {}
            for hid in holders:
                h = sim.hosts[hid]
                gw = await h.run_on(h.provider.open_export, "v@s")
                reads[hid] = extents_bytes(
                    await h.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)
                gw.close()
            assert len(set(reads.values())) == 1, reads
            assert not any(r.fenced for r in readers.values())
            for r in readers.values():
                r.close()
            nursery.cancel_scope.cancel()

    run(main)
