"""Review (rev-snap): volume lifecycle operations against live gateways. Sim hosts with
their background loops on, on a virtual clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from control import api
from tests.sim.harness import Sim, call, extents_bytes
from vbp.errors import Fenced, RegistryUnavailable, VbpError
from vbp.layout import MiB


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


class Unreachable:
    """A host's registry that answers nothing about volumes and leases (etcd cut off
    from this host only)."""

    def __init__(self, registry):
        self.registry = registry

    def __getattr__(self, name):
        if name in ("cluster_map", "list_stale"):  # (the sim's own loops do not catch)
            return getattr(self.registry, name)

        async def fail(*args, **kwargs):
            await trio.lowlevel.checkpoint()
            raise RegistryUnavailable("registry unreachable from this host")
        return fail


async def read_4k(host, gw) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)


def test_a_holder_whose_lease_ran_out_never_reads_what_gc_freed():
    """hw (no copy of chunk 0) holds v's lease and wrote "A"; cut off from the registry,
    its lease runs out. `vbp volume snapshot` completes without a holder (new head), a
    gateway elsewhere takes the lease and writes "B", the snapshot is deleted (--force:
    hw publishes nothing, it cannot reach the registry) and GC runs. hw, past its lease
    and never fenced, still reads by the old chain: the replicas' chunk 0 of that
    generation is gone, and it answered zeros (review rev-snap). Its reads carry its
    token now (ReadChunk.token): the replicas, told the newer token by the gateway that
    took the lease over, refuse them (Fenced), and hw is fenced."""
    async def main():
        sim = Sim(13, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            h0 = sim.hosts["h0"]
            holders = h0.cluster.replicas(rec.lineage, 0, 3)
            hw = next(h for i, h in sim.hosts.items() if i not in holders)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(0, b"A" * 4096, False)))
            assert await read_4k(hw, w) == b"A" * 4096
            await hw.run_on(hw.publish_stats)  # (a heartbeat: a lease holder is not published)
            assert not hw.provider.published()
            hw.registry = Unreachable(hw.registry)  # renewals fail: the lease runs out
            await trio.sleep(sim.lease_ttl + 2)
            assert api.get_volume(sim.reg, "v") and sim.reg.get_lease("v") is None
            await sim.snapshot("v", "s")  # completed without a lease holder
            other = sim.hosts[holders[0]]
            w2 = await other.run_on(other.provider.open_export, "v")
            with trio.fail_after(sim.lease_ttl + 5):
                await other.run_on(lambda: call(w2.write(0, b"B" * 4096, False)))
            api.delete_volume(sim.reg, "v@s", force=True)
            for h in sim.hosts.values():
                if h is not hw:
                    await h.collect_garbage()
            assert not w.fenced and w.token and trio.current_time() > w.lease_deadline
            with pytest.raises(Fenced):
                await read_4k(hw, w)
            assert w.fenced
            nursery.cancel_scope.cancel()

    run(main)


class FailNextRead:
    """A host's registry whose next volume read, once armed, fails (an etcd hiccup)."""

    def __init__(self, registry):
        self.registry = registry
        self.armed = False

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def get_volume(self, name):
        if self.armed:
            self.armed = False
            await trio.lowlevel.checkpoint()
            raise RegistryUnavailable("etcd request timed out")
        return await self.registry.get_volume(name)


def test_a_lease_taken_whose_record_read_failed_does_not_keep_snapshots_out():
    """h0 serves v to a client that has not written yet. Its first write takes the lease;
    the record read that follows (VolumeProvider._take_lease: sync_record) fails once, so
    the write fails and the gateway keeps no token. The lease stays in provider.leases,
    renewed by renew_all, while the record syncs treat the gateway as a reader (no token)
    and never complete a snapshot: `vbp volume snapshot` waits for a holder that never
    completes it and times out (a guest that remounted read-only after the failed write
    never writes again). The lease is given back now (review rev-snap)."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            h0.registry = reg = FailNextRead(h0.registry)
            announce = h0.provider._announce

            async def announce_then_fail(volume, token):
                await announce(volume, token)
                reg.armed = True  # the record read right after the announcement fails

            h0.provider._announce = announce_then_fail
            with pytest.raises(VbpError):
                await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
            h0.provider._announce = announce
            await trio.sleep(sim.lease_ttl * 2)  # renewals, record syncs
            rec = await sim.snapshot("v", "s", timeout=10.0)
            assert [s.name for s in rec.snapshots] == ["s"]
            nursery.cancel_scope.cancel()

    run(main)
