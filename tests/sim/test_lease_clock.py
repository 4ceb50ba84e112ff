"""A holder's writes against its lease's deadline, with the registry's clocks driven by
the sim's virtual clock (vbp.registry.base's `time`, and the boot clock its TTL keys run
out by, vbp.registry.local.clock), so that the real lease arithmetic runs: a grant or
renewal at t expires at t + lease_ttl in the registry, and the holder's own deadline is
t + lease_ttl - min(1, lease_ttl / 10) (VolumeProvider._deadline).
Background loops are off: nothing renews the lease, as for a holder cut off from the
registry. (Found by a review.)"""

from __future__ import annotations

import time as _time

import pytest
import trio

from tests.sim import harness
from tests.sim.harness import Sim, call, run
from vbp.errors import VbpError
from vbp.layout import MiB
from vbp.registry import base, local

K4 = 4096
EPOCH = 1.7e9
BOOT = 1e5


class _Clock:
    """vbp.registry.base's `time`, whose wall clock is the virtual clock."""

    def time(self):
        return EPOCH + trio.current_time()

    def __getattr__(self, name):
        return getattr(_time, name)


def _boot_clock() -> float:
    """vbp.registry.local's boot clock, the virtual clock inside the sim's trio run."""
    try:
        return BOOT + trio.current_time()
    except RuntimeError:  # (outside the run: the sim being built)
        return BOOT


@pytest.fixture(autouse=True)
def virtual_wall_clock(monkeypatch):
    monkeypatch.setattr(base, "time", _Clock())
    monkeypatch.setattr(local, "clock", _boot_clock)

    async def acquire_lease(self, volume, holder, ttl):  # (the real ttl, not WALL_TTL)
        await trio.lowlevel.checkpoint()
        lease = self.sync.acquire_lease(volume, holder, ttl)
        await trio.lowlevel.checkpoint()
        return lease

    async def renew_lease(self, lease, ttl):
        await trio.lowlevel.checkpoint()
        new = self.sync.renew_lease(lease, ttl)
        await trio.lowlevel.checkpoint()
        return new

    monkeypatch.setattr(harness.SimRegistry, "acquire_lease", acquire_lease)
    monkeypatch.setattr(harness.SimRegistry, "renew_lease", renew_lease)


def copies_of_chunk0(sim, rec, chain) -> set[bytes]:
    hosts = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, rec.replicas)
    return {sim.replica_bytes(sim.hosts[h], rec, chain, 0)[:K4] for h in hosts}


async def write_sent_again_past_the_lease(sim, nursery):
    """The holder (lease taken at t=0: its deadline 9, the registry's expiry 10) writes
    "B" at t=8.9, inside its deadline; the copies are at a newer epoch (a host holding no
    copy went down) and answer StaleEpoch, and the map's refresh takes 1.5 s (a slow
    registry): the write is sent again at t=10.4, past the lease. Returns (rec, the
    holder's host, its gateway, {"acked": t} or {"error": e} once the write ended)."""
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", 2 * MiB, replicas=3)
    h0 = sim.hosts["h0"]
    copies = h0.cluster.replicas(rec.lineage, 0, 3)
    spare = next(i for i in sim.hosts if i not in copies)
    writer = sim.hosts[copies[0]]
    gw = await writer.provider.open_export("v")
    await call(gw.write(0, b"A" * K4, False))
    await call(gw.flush())
    assert gw.lease_deadline == pytest.approx(9.0)
    sim.crash(spare)
    cmap = sim.reg.cluster_map()
    for h in sim.up_hosts():
        if h is not writer:
            h.cluster.set_map(cmap)
    refresh = writer.refresh_map

    async def slow_refresh():
        await trio.sleep(1.5)
        await refresh()

    gw.refresh_map = slow_refresh
    await trio.sleep(8.9)
    box = {}

    async def write():
        try:
            await call(gw.write(0, b"B" * K4, False))
            box["acked"] = trio.current_time()
        except VbpError as e:
            box["error"] = e

    nursery.start_soon(write)
    await trio.sleep(10.05 - trio.current_time())
    assert sim.reg.get_lease("v") is None  # expired, by every clock
    return rec, writer, gw, box


def test_a_write_refused_for_its_epoch_is_not_sent_again_past_the_lease():
    """`vbp volume snapshot` completes the snapshot at t=10.05, the lease expired by every
    clock; it takes a token of its own, which no copy learns. The write sent again at
    t=10.4 was taken into the generation now the snapshot, and acknowledged: a snapshot
    that changed after the command returned."""
    async def main():
        sim = Sim(5, hosts=4, lease_ttl=10.0, peer_timeout=5.0)
        async with trio.open_nursery() as nursery:
            rec, writer, gw, box = await write_sent_again_past_the_lease(sim, nursery)
            done = await sim.snapshot("v", "s")
            chain = done.snapshot("s").chain
            while not box:
                await trio.sleep(0.05)
            assert "error" in box, f"the write was acknowledged after the snapshot: {box}"
            others = [h for h in sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
                      if h != writer.id]
            assert {sim.replica_bytes(sim.hosts[h], rec, chain, 0)[:K4] for h in others} == {
                b"A" * K4}, "the write sent again landed in the snapshot"
            # (the holder's own copy took it at t=8.9, inside the lease: not acknowledged,
            # it is on the list the service records stale once the gateway is fenced)
            assert (0, (writer.id,)) in gw.suspects, gw.suspects
            nursery.cancel_scope.cancel()

    run(main)


def test_the_same_write_meets_the_token_of_a_blockd_taking_the_lease_over():
    """The same with another host taking the lease over at t=10.05 and writing: its token,
    announced before its first write, refuses the write sent again."""
    async def main():
        sim = Sim(5, hosts=4, lease_ttl=10.0, peer_timeout=5.0)
        async with trio.open_nursery() as nursery:
            rec, writer, gw, box = await write_sent_again_past_the_lease(sim, nursery)
            copies = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            other = sim.hosts[next(h for h in copies if h != writer.id)]
            gw2 = await other.provider.open_export("v")
            await call(gw2.write(0, b"X" * K4, False))
            while not box:
                await trio.sleep(0.05)
            assert "error" in box
            assert copies_of_chunk0(sim, rec, gw2.chain) == {b"X" * K4}
            nursery.cancel_scope.cancel()

    run(main)
