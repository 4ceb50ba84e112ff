"""The all-stale election after a power loss (replicator.loss.last_current): a copy whose
crash recovery after a reboot recorded it stale lost the writes it took since its last
flush, so being the newest record does not make it the copy that holds every acknowledged
write. The disk model of the simulation (MemoryChunkStore.crash) keeps, per page, old or
new bytes; LoseUnsynced makes it keep the old ones everywhere."""

from __future__ import annotations

import random
from dataclasses import replace as dc_replace

import pytest
import trio

from vbp.errors import VbpError
from vbp.layout import MiB, ChunkKey
from vbp.registry.base import LACKS_EARLIER
from replicator.messages import LACKS_REV
from replicator.recovery import Resync
from tests.sim.harness import WALL_TTL, Sim, call, extents_bytes, run


class LoseUnsynced(random.Random):
    """The crash model's rng: every unflushed page goes back to its durable bytes (a power
    loss that kept nothing of the page cache)."""

    def random(self):
        return 0.99


def test_power_lost_copy_is_not_elected_over_a_copy_holding_an_acknowledged_write():
    """replicas=3, min_size=2: a is stale; W1 is acknowledged on b and c, not flushed; W2
    reaches only c and fails, b recorded stale; c loses power (W1 gone from its disk) and
    its crash recovery records it stale, the newest record. The election passes over c
    (its record says it lost unsynced writes) for b, which holds W1: only one copy that
    lost power went stale after b, below min_size, so nothing was acknowledged after b."""
    async def main():
        sim = Sim(3, hosts=4, zones=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
            lin = rec.lineage
            a, b, c = sim.hosts["h0"].cluster.replicas(lin, 0, 3)
            g = next(h for h in sim.hosts if h not in (a, b, c))
            gw = await sim.hosts[g].provider.open_export("v")
            old, acked, failed = b"\x00" * 4096, b"\x11" * 4096, b"\x22" * 4096
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())  # durable everywhere
            faults = sim.hosts[g].faults
            # W1: a unreachable, b and c take it: acknowledged (min_size 2), a recorded stale
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, acked, False))
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a}
            # W2: b unreachable too; only c takes it: fails (EIO), b recorded stale
            faults.partition([sim.hosts[b].addr])
            with pytest.raises(VbpError):
                await call(gw.write(8192, failed, False))
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a, b}
            # b holds the acknowledged W1 (and every acknowledged write: it was current
            # until W2, the first write that could not be acknowledged)
            key = ChunkKey(lin, 0, rec.head)
            assert sim.hosts[b].store.read(key, 0, 4096) == acked
            # c loses power before any flush: W1 is gone from its disk
            saved, sim.rng = sim.rng, LoseUnsynced()
            sim.crash(c)
            sim.rng = saved
            assert sim.hosts[c].store.read(key, 0, 4096) == b"\x01" * 4096
            await sim.restart(c)  # crash recovery records c stale: every copy is stale now
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a, b, c}
            flagged = {r.host_id for r in sim.reg.list_stale(lin) if r.version & LACKS_EARLIER}
            assert flagged == {c}
            faults.heal()
            sim.sync_maps()
            await trio.sleep(10)  # past the write window
            for h in (a, b, c):
                await sim.hosts[h].resync.run_once()
            for h in (a, b, c):
                await sim.hosts[h].resync.run_once()
            assert not sim.reg.list_stale(lin), sim.reg.list_stale(lin)
            # the acknowledged write W1 must have survived: b held it
            await gw.refresh_stale(sim.hosts[g].stale_map)
            got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            on = {h: sim.hosts[h].store.read(key, 0, 4) for h in (a, b, c)}
            assert got == acked, (got[:4], on, (a, b, c))
            nursery.cancel_scope.cancel()

    run(main)


def test_power_lost_copy_still_up_in_the_map_is_not_elected_either():
    """The same with a fast reboot (the host still up in the map): the next write fails on
    every copy; b is recorded stale, c (unreachable, power lost) is not; c's restart then
    records it stale, newest and flagged, and b, which holds the acknowledged write, is
    elected over it."""
    async def main():
        sim = Sim(3, hosts=4, zones=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
            lin = rec.lineage
            c, b, a = sim.hosts["h0"].cluster.replicas(lin, 0, 3)  # c first in placement
            g = next(h for h in sim.hosts if h not in (a, b, c))
            gw = await sim.hosts[g].provider.open_export("v")
            acked = b"\x11" * 4096
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            faults = sim.hosts[g].faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, acked, False))  # acknowledged by b and c, not flushed
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a}
            # c loses power (still up in the map: a fast reboot); the next write fails on
            # c and on b (cut off): both recorded stale in one transaction
            saved, sim.rng = sim.rng, LoseUnsynced()
            sim.crash(c, declare_down=False)
            sim.rng = saved
            faults.partition([sim.hosts[b].addr])
            with pytest.raises(VbpError):
                await call(gw.write(8192, b"\x22" * 4096, False))
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a, b}
            await sim.restart(c)  # its crash recovery records it stale: every copy is
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a, b, c}
            faults.heal()
            sim.sync_maps()
            await trio.sleep(10)
            for _ in range(2):
                for h in (a, b, c):
                    await sim.hosts[h].resync.run_once()
            assert not sim.reg.list_stale(lin), sim.reg.list_stale(lin)
            await gw.refresh_stale(sim.hosts[g].stale_map)
            got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            key = ChunkKey(lin, 0, rec.head)
            on = {h: sim.hosts[h].store.read(key, 0, 4) for h in (a, b, c)}
            assert got == acked, (got[:4], on, (a, b, c))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_process_crash_keeping_the_page_cache_loses_nothing():
    """The same steps as the first test with a process crash (SIGKILL, the page cache
    kept): c keeps what it took, its record is not flagged, and the chunk holds W1 again
    whichever copy the election takes."""
    async def main():
        sim = Sim(3, hosts=4, zones=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
            lin = rec.lineage
            a, b, c = sim.hosts["h0"].cluster.replicas(lin, 0, 3)
            g = next(h for h in sim.hosts if h not in (a, b, c))
            gw = await sim.hosts[g].provider.open_export("v")
            acked = b"\x11" * 4096
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            faults = sim.hosts[g].faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, acked, False))
            faults.partition([sim.hosts[b].addr])
            with pytest.raises(VbpError):
                await call(gw.write(8192, b"\x22" * 4096, False))
            sim.crash(c, power=False)
            await sim.restart(c)
            assert not any(r.version & LACKS_EARLIER for r in sim.reg.list_stale(lin))
            faults.heal()
            sim.sync_maps()
            await trio.sleep(10)
            for _ in range(2):
                for h in (a, b, c):
                    await sim.hosts[h].resync.run_once()
            assert not sim.reg.list_stale(lin)
            await gw.refresh_stale(sim.hosts[g].stale_map)
            assert extents_bytes(await call(gw.read(0, 4096)), 0, 4096) == acked
            nursery.cancel_scope.cancel()

    run(main)


def test_flushed_writes_on_copies_that_all_lost_power_win_over_an_older_copy():
    """The other side of the rule: a is stale (cut off); W1 is acknowledged and flushed
    on b and c, W3 acknowledged on them, unflushed; both lose power and come back, their
    records flagged and newer than a's. min_size (2) copies that lost power went stale
    after a: writes may have been acknowledged on them alone, so the election takes the
    newest of them, which kept the flushed W1 (W3 may go: a power loss of every copy that
    held it, as a disk's cache). Electing a, the copy that did not lose power, would lose
    the flushed write."""
    async def main():
        sim = Sim(3, hosts=4, zones=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
            lin = rec.lineage
            a, b, c = sim.hosts["h0"].cluster.replicas(lin, 0, 3)
            g = next(h for h in sim.hosts if h not in (a, b, c))
            gw = await sim.hosts[g].provider.open_export("v")
            flushed = b"\x33" * 4096
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            faults = sim.hosts[g].faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, flushed, False))
            await call(gw.flush())  # durable on b and c
            assert {r.host_id for r in sim.reg.list_stale(lin)} == {a}
            await call(gw.write(8192, b"\x44" * 4096, False))  # acknowledged, unflushed
            saved, sim.rng = sim.rng, LoseUnsynced()
            sim.crash(b)
            sim.crash(c)
            sim.rng = saved
            await sim.restart(b)
            await sim.restart(c)
            recs = sim.reg.list_stale(lin)
            assert {r.host_id for r in recs} == {a, b, c}
            assert {r.host_id for r in recs if r.version & LACKS_EARLIER} == {b, c}
            faults.heal()
            sim.sync_maps()
            await trio.sleep(10)
            for _ in range(2):
                for h in (a, b, c):
                    await sim.hosts[h].resync.run_once()
            assert not sim.reg.list_stale(lin), sim.reg.list_stale(lin)
            await gw.refresh_stale(sim.hosts[g].stale_map)
            got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            key = ChunkKey(lin, 0, rec.head)
            assert all(sim.hosts[h].store.read(key, 0, 4096) == flushed for h in (a, b, c))
            assert got == flushed
            nursery.cancel_scope.cancel()

    run(main)


def test_a_pool_with_a_host_of_an_older_revision_elects_as_that_host_does():
    """During an upgrade host by host, a host below LACKS_REV elects the newest record
    whatever its flags. The others must elect the same copy, or two stale copies of one
    chunk each elect themselves, clear their records, and the chunk has two "current"
    copies with different bytes: so the flag is read only once every host is at
    LACKS_REV (the first test's steps, c not upgraded, b and c resyncing at once)."""
    async def main():
        sim = Sim(3, hosts=4, zones=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
            lin = rec.lineage
            a, b, c = sim.hosts["h0"].cluster.replicas(lin, 0, 3)
            g = next(h for h in sim.hosts if h not in (a, b, c))
            gw = await sim.hosts[g].provider.open_export("v")
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            faults = sim.hosts[g].faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x11" * 4096, False))
            faults.partition([sim.hosts[b].addr])
            with pytest.raises(VbpError):
                await call(gw.write(8192, b"\x22" * 4096, False))
            saved, sim.rng = sim.rng, LoseUnsynced()
            sim.crash(c)
            sim.rng = saved
            await sim.restart(c)
            assert {r.host_id for r in sim.reg.list_stale(lin) if r.version & LACKS_EARLIER} == {c}
            # c runs the code of revision LACKS_REV - 1: so it says, and so it elects
            old = sim.reg.cluster_map().host(c)
            sim.reg.register_host(dc_replace(old, peer_rev=LACKS_REV - 1), WALL_TTL)
            own = Resync._resync_all_stale
            r_c = sim.hosts[c].resync

            async def elects_the_newest(lineage, index, complete, stale, joining=()):
                return await own(r_c, lineage, index, complete,
                                 {h: x._replace(lacks=False) for h, x in stale.items()}, joining)

            r_c._resync_all_stale = elects_the_newest
            faults.heal()
            sim.sync_maps()
            await trio.sleep(10)
            async with trio.open_nursery() as both:
                both.start_soon(sim.hosts[b].resync.run_once)
                both.start_soon(r_c.run_once)
            left = {r.host_id for r in sim.reg.list_stale(lin)}
            key = ChunkKey(lin, 0, rec.head)
            current = {h: sim.hosts[h].store.read(key, 0, 4096) for h in (a, b, c) if h not in left}
            assert current and len(set(current.values())) == 1, (left, current)
            nursery.cancel_scope.cancel()

    run(main)
