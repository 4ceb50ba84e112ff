"""Review (rev-snap): volume lifecycle operations against live gateways. Sim hosts with
their background loops on, on a virtual clock."""

from __future__ import annotations

import pytest
import trio

from control import api
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.errors import Fenced, RegistryUnavailable, VbpError
from vbp.layout import MiB


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
            # (the new holder's announcement, should it reach hw's replica, fences hw at
            # once: test_a_holder_deposed_while_cut_off_is_fenced_by_the_new_holders_
            # announcement. Here it is as good as lost: only the copies hw reads know)
            hw.replica.on_token = None
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


async def first_write_whose_record_read_fails(nursery, sim, meanwhile=None):
    """`sim` started, v (replicas=3) created and opened on h0; the client's first write
    takes the lease, announces its token, then (after `meanwhile(h0)`, awaited) the
    record read that follows fails once: the write fails. (h0, its gateway of v)."""
    await sim.start(nursery)
    sim.create_volume("v", 2 * MiB, replicas=3)
    h0 = sim.hosts["h0"]
    gw = await h0.run_on(h0.provider.open_export, "v")
    h0.registry = reg = FailNextRead(h0.registry)
    announce = h0.provider._announce

    async def announce_then_fail(volume, token):
        await announce(volume, token)
        if meanwhile is not None:
            await meanwhile(h0)
        reg.armed = True  # the record read right after the announcement fails

    h0.provider._announce = announce_then_fail
    with pytest.raises(VbpError):
        await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
    h0.provider._announce = announce
    return h0, gw


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
            await first_write_whose_record_read_fails(nursery, sim)
            await trio.sleep(sim.lease_ttl * 2)  # renewals, record syncs
            rec = await sim.snapshot("v", "s", timeout=10.0)
            assert [s.name for s in rec.snapshots] == ["s"]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_lease_renewed_during_the_failed_record_read_is_forgotten_with_its_release():
    """Review (rev-last) of the fix above: the renewal loop ran while the lease's record
    read was under way and kept another object of the same grant in provider.leases; the
    release compared objects, left it there, and the next renewal of the released lease
    was refused: the gateway was fenced (its client dropped, every later write refused)
    where the next write was to take the lease again."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await first_write_whose_record_read_fails(
                nursery, sim, meanwhile=lambda h: h.provider.renew_all())  # (the loop fires)
            assert "v" not in h0.provider.leases
            await trio.sleep(sim.lease_ttl * 2)  # renewals, record syncs
            assert not gw.fenced
            await h0.run_on(lambda: call(gw.write(0, b"B" * 4096, False)))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_holder_deposed_while_cut_off_is_fenced_by_the_new_holders_announcement():
    """Review (rev-last): a deposed holder's reads of its own host's copies carry no
    token, so only its remote reads were refused: it went on answering its local copy's
    bytes, from before the new holder's writes. The new holder announces its token to
    every host; the replica there now tells the provider (Replica.on_token), which
    fences the local gateway holding an older token at once."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)  # a copy on every host
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
            h0.registry = Unreachable(h0.registry)  # renewals fail: the lease runs out
            await trio.sleep(sim.lease_ttl + 2)
            assert gw.token and not gw.fenced
            w2 = await h1.run_on(h1.provider.open_export, "v")
            with trio.fail_after(sim.lease_ttl + 5):
                await h1.run_on(lambda: call(w2.write(0, b"B" * 4096, False)))
            assert gw.fenced  # (h1's announcement reached h0's replica)
            try:
                got = await read_4k(h0, gw)
            except VbpError as e:
                got = e
            assert isinstance(got, VbpError) or got == b"B" * 4096, got
            nursery.cancel_scope.cancel()

    run(main)
