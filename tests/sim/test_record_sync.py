"""A gateway follows its volume's record (blockd.service.VolumeProvider.sync_records): a
volume deleted and created again under its name, a head that changes under writes in
flight. Sim hosts with their background loops on, on a virtual clock."""

from __future__ import annotations

import errno
import sys
import time
from dataclasses import replace as dc_replace

import pytest
import trio

from control import api
from replicator import messages as m
from replicator.gateway import PAST_END_READ_GAP
from blockd.service import RECORD_LAPSE
from tests.sim.harness import Sim, call, extents_bytes, reconcile_failing_once, run, settled
from vbp.errors import Gone, RegistryUnavailable, Unpublished, Unsynced, VbpError
from vbp.layout import MiB
from vbp.volume import VolumeRecord, request_shrink, request_snapshot, view_of


async def served(nursery, sim, first: bytes = b"A" * 4096, size: int = 2 * MiB, **volume):
    """`sim` started, volume v (replicas=3) created and opened on h0, `first` written at
    its start: (h0, h0's gateway of v)."""
    await sim.start(nursery)
    sim.create_volume("v", size, replicas=3, **volume)
    h0 = sim.hosts["h0"]
    gw = await h0.run_on(h0.provider.open_export, "v")
    await h0.run_on(lambda: call(gw.write(0, first, False)))
    return h0, gw


def test_a_volume_deleted_and_created_again_under_its_name_fences_the_old_gateway():
    """Between two record syncs, `v` is deleted and a new `v` created (head 1 again, a
    new lineage). The old gateway must not go on serving the deleted volume's bytes as
    the new `v`, nor take writes into a lineage no record names (garbage collection
    frees them): it is fenced, and a gateway on another host serves the new volume."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim)
            h1 = sim.hosts["h1"]
            old = sim.volume("v")
            api.delete_volume(sim.reg, "v", force=True)
            sim.create_volume("v", 2 * MiB, replicas=3)
            assert sim.volume("v").head == old.head and sim.volume("v").lineage != old.lineage
            await trio.sleep(1.0)  # record syncs
            assert gw.fenced
            gw2 = await h1.run_on(h1.provider.open_export, "v")
            with trio.fail_after(sim.lease_ttl + 5):
                await h1.run_on(lambda: call(gw2.write(4096, b"C" * 4096, False)))
            got = extents_bytes(await h1.run_on(lambda: call(gw2.read(0, 8192))), 0, 8192)
            assert got == bytes(4096) + b"C" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_snapshot_export_of_a_volume_deleted_and_created_again_is_gone():
    """`v@s` stays open while `v` is deleted (forced) and created again with a snapshot
    `s` of the same chain: the export serves the deleted volume, so it is gone."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            sim.create_volume("v", 2 * MiB, replicas=3)
            h0, h2 = sim.hosts["h0"], sim.hosts["h2"]
            await sim.snapshot("v", "s")
            snap = await h2.run_on(h2.provider.open_export, "v@s")
            api.delete_volume(sim.reg, "v", force=True)
            sim.create_volume("v", 2 * MiB, replicas=3)
            await sim.snapshot("v", "s")
            assert sim.volume("v").snapshot("s").chain == snap.view.chain
            await trio.sleep(1.0)  # record syncs
            assert snap.gone is not None
            nursery.cancel_scope.cancel()

    run(main)


def delay_writes_of_a(sim, h0, late_host: str, seconds: float = 0.5) -> None:
    """h0's WriteChunks of b"A..." reach `late_host` `seconds` late; the rest as before."""
    late = sim.hosts[late_host].addr
    on_call = h0.faults.on_call

    def delay(address, message):
        if address == late and type(message) is m.WriteChunk and message.data[:1] == b"A":
            return seconds
        return on_call(address, message)

    h0.faults.on_call = delay


def test_a_new_head_made_by_a_shrink_waits_for_the_writes_to_the_old_one():
    """A write to chunk 0 is on its way to one copy (half a second late) when a shrink
    gives the volume a new head. A write to the same chunk after the gateway adopts the
    new head copies the chunk up on every copy: on the late one, before the first write
    lands in the old head. Adopted without waiting, that copy's head missed an
    acknowledged write with no record; the gateway now lets the writes under way end
    first."""
    async def main():
        sim = Sim(2, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"0" * 8192, 4 * MiB, min_size=2)
            delay_writes_of_a(sim, h0, "h2")
            acked: list = []

            async def first():
                await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
                acked.append("A")

            nursery.start_soon(first)
            await trio.sleep(0.01)
            old_head = gw.gen
            nursery.start_soon(sim.shrink, "v", 2 * MiB)  # the shrink: a new head
            await trio.sleep(0.3)  # a record sync
            await h0.run_on(lambda: call(gw.write(4096, b"B" * 4096, False)))
            assert gw.gen != old_head
            await trio.sleep(1.0)
            assert acked == ["A"]
            rec = sim.volume("v")
            assert not sim.reg.list_stale()
            for h in sim.hosts.values():
                got = sim.replica_bytes(h, rec, rec.chain, 0)
                assert got[:8192] == b"A" * 4096 + b"B" * 4096, h.id
            nursery.cancel_scope.cancel()

    run(main)


def test_a_write_past_the_new_end_waiting_behind_another_is_refused_once_the_shrink_completes():
    """Two writes to one block past the end a shrink is about to make: the first on its
    way to one copy (half a second late), the second waiting for it (overlapping writes
    reach every copy in one order). The shrink, in progress, holds new writes and waits
    for the first; once it completed, the second must not go on to the new head past
    its end, acknowledged and then lost (no reader has that chunk: GC frees it). It is
    refused as past the end (ENOSPC)."""
    async def main():
        sim = Sim(2, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"0" * 8192, 4 * MiB, min_size=2)
            delay_writes_of_a(sim, h0, "h2")
            results: dict = {}

            async def write(byte: bytes):
                try:
                    await h0.run_on(lambda: call(gw.write(3 * MiB, byte * 4096, False)))
                    results[byte] = "acknowledged"
                except VbpError as e:
                    results[byte] = type(e).__name__

            nursery.start_soon(write, b"A")
            await trio.sleep(0.01)
            nursery.start_soon(write, b"B")
            await trio.sleep(0.01)
            rec = await sim.shrink("v", 2 * MiB)
            assert rec.size == 2 * MiB and gw.size == 2 * MiB
            await trio.sleep(1.0)
            assert results == {b"A": "acknowledged", b"B": "WritePastEnd"}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_trim_past_the_new_end_waiting_behind_a_write_is_refused_as_past_the_end():
    """As above, the second request a TRIM: once the shrink completed it is refused as
    any TRIM past an export's end is, EINVAL (PastEnd), not ENOSPC (WritePastEnd, a
    write's answer)."""
    async def main():
        sim = Sim(2, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"0" * 8192, 4 * MiB, min_size=2)
            late = sim.hosts["h2"].addr
            on_call = h0.faults.on_call

            def delay_first(address, message):
                if address == late and type(message) is m.WriteChunk:
                    return 0.5
                return on_call(address, message)

            h0.faults.on_call = delay_first
            results: dict = {}

            async def request(what: str, op):
                try:
                    await h0.run_on(lambda: call(op()))
                    results[what] = "acknowledged"
                except VbpError as e:
                    results[what] = type(e).__name__

            nursery.start_soon(request, "write", lambda: gw.write(3 * MiB, b"A" * 4096, False))
            await trio.sleep(0.01)
            nursery.start_soon(request, "trim", lambda: gw.trim(3 * MiB, 4096, False))
            await trio.sleep(0.01)
            rec = await sim.shrink("v", 2 * MiB)
            assert rec.size == 2 * MiB and gw.size == 2 * MiB
            await trio.sleep(1.0)
            assert results == {"write": "acknowledged", "trim": "PastEnd"}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_snapshot_completion_whose_answer_is_lost_holds_the_writes_until_it_is_known():
    """The gateway completes a snapshot; the registry commits it and the answer is lost
    (etcd: an unknown outcome). Released then, the held writes went on to the old head,
    which was the snapshot's generation: writes acknowledged after the snapshot landed
    in it. Now the gateway asks again until it knows, and no write acknowledged after
    the snapshot returned is in it."""
    async def main():
        sim = Sim(4, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim)
            update = sim.reg.update_volume
            lost: list = []

            def answer_lost(name, fn, lease=None):
                out = update(name, fn, lease)
                if lease is not None and not lost:
                    lost.append(True)
                    raise RegistryUnavailable("kv/txn failed with an unknown outcome")
                return out

            sim.reg.update_volume = answer_lost
            returned: list = []

            async def take():
                await sim.snapshot("v", "s")
                returned.append(trio.current_time())

            nursery.start_soon(take)
            before: set = {b"A"}  # what was acknowledged before the snapshot returned
            for i in range(10):
                await trio.sleep(0.05)
                value = bytes([0x30 + i])
                await h0.run_on(lambda: call(gw.write(0, value * 4096, False)))
                if not returned:
                    before.add(value)
            while not returned:
                await trio.sleep(0.05)
            assert lost
            rec = sim.volume("v")
            s = rec.snapshot("s")
            held = {sim.replica_bytes(h, rec, s.chain, 0)[:1] for h in sim.hosts.values()}
            assert len(held) == 1 and held <= before, (held, before)
            nursery.cancel_scope.cancel()

    run(main)


class LostThenCutOff:
    """A host's registry that commits its first leased update of a volume record and
    loses the answer, then is cut off from this host: that update's retries and the
    lease renewals fail (the other hosts and the control plane go on)."""

    def __init__(self, registry):
        self.registry = registry
        self.cut = False

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def update_volume(self, name, fn, lease=None):
        if lease is not None and not self.cut:
            await self.registry.update_volume(name, fn, lease)
            self.cut = True
        await trio.lowlevel.checkpoint()
        raise RegistryUnavailable("kv/txn failed with an unknown outcome")

    async def renew_lease(self, lease, ttl):
        if not self.cut:
            return await self.registry.renew_lease(lease, ttl)
        await trio.lowlevel.checkpoint()
        raise RegistryUnavailable("registry unreachable from this host")


def test_a_write_held_through_a_snapshot_whose_gateway_is_fenced_never_reaches_the_snapshot():
    """A write to chunk 0 waits behind another (half a second late to one copy) when the
    gateway starts completing a snapshot: it is held. The registry commits the snapshot
    and the answer is lost; the host is then cut off, and at its lease deadline the
    gateway gives up and is fenced. The held write then went on with the old token into
    the old head, the snapshot's generation (no newer token on the replicas: nobody took
    the lease yet), and was acknowledged: the snapshot changed after it was taken. Now a
    held write fails once its gateway was fenced during the hold."""
    async def main():
        sim = Sim(2, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"0" * 8192, min_size=2)
            delay_writes_of_a(sim, h0, "h2")
            h0.registry = LostThenCutOff(h0.registry)
            results: dict = {}

            async def write(byte: bytes):
                try:
                    await h0.run_on(lambda: call(gw.write(0, byte * 4096, False)))
                    results[byte] = "acknowledged"
                except VbpError as e:
                    results[byte] = type(e).__name__

            nursery.start_soon(write, b"A")
            await trio.sleep(0.01)
            nursery.start_soon(write, b"B")  # behind A
            await trio.sleep(0.01)
            rec = await sim.snapshot("v", "s")  # committed (the gateway does not know)
            taken = {h.id: sim.replica_bytes(h, rec, rec.snapshot("s").chain, 0)[:4096]
                     for h in sim.hosts.values()}
            assert set(taken.values()) == {b"A" * 4096} and b"B" not in results
            with trio.fail_after(sim.lease_ttl + 5):
                while b"B" not in results:
                    await trio.sleep(0.1)
            assert gw.fenced
            now = {h.id: sim.replica_bytes(h, rec, rec.snapshot("s").chain, 0)[:4096]
                   for h in sim.hosts.values()}
            assert now == taken, "the snapshot changed after it was taken"
            assert results == {b"A": "acknowledged", b"B": "Fenced"}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_request_waiting_for_its_turn_follows_a_change_of_limits():
    """A 4 MiB write booked under 64 KiB/s waits about a minute. The limit lifted, or
    raised to plenty, it goes within a record sync, not a minute later (a request booked
    under a mistyped limit would hold its connection and the volume's lease for hours)."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, size=8 * MiB)
            for new in (0, 1 << 30):
                api.set_limits(sim.reg, "v", bps=64 * 1024)
                await trio.sleep(0.5)  # a record sync
                assert gw.qos is not None and gw.qos.limits == (0, 64 * 1024)
                await h0.run_on(lambda: call(gw.write(0, b"x" * 65536, False)))  # the burst
                done: list = []

                async def big():
                    await h0.run_on(lambda: call(gw.write(0, b"y" * (4 * MiB), False)))
                    done.append(trio.current_time())

                nursery.start_soon(big)
                await trio.sleep(2)
                assert not done
                t0 = trio.current_time()
                api.set_limits(sim.reg, "v", bps=new)
                with trio.fail_after(2):
                    while not done:
                        await trio.sleep(0.05)
                assert done[0] - t0 < 1.0
            nursery.cancel_scope.cancel()

    run(main)


def test_snapshot_exports_take_limits_live_and_flushes_count_against_iops():
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim)
            await sim.snapshot("v", "s")
            snap = await h0.run_on(h0.provider.open_export, "v@s")
            assert snap.qos is None
            api.set_limits(sim.reg, "v", iops=5)
            await trio.sleep(0.5)  # record syncs
            assert snap.qos is not None and snap.qos.limits == (5, 0)
            await h0.run_on(lambda: call(gw.write(0, b"x" * 4096, False)))
            t0 = trio.current_time()
            for _ in range(20):  # 5 a second, a second's burst
                await h0.run_on(lambda: call(gw.flush()))
            assert trio.current_time() - t0 >= 2.5
            nursery.cancel_scope.cancel()

    run(main)


def test_a_gateway_cancels_a_snapshot_whose_requester_gave_up_rather_than_complete_it():
    """A pending snapshot past its time (its `vbp volume snapshot` killed) is cancelled
    by the gateway that holds the lease: completed, it would hold what the volume holds
    now, not what it held when it was asked for."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            head = sim.reg.next_id(api.gen_counter(rec.lineage))
            sim.reg.update_volume("v", lambda d: request_snapshot(
                VolumeRecord.from_dict(d), "old", head, time.time() - 1).to_dict())
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
            await trio.sleep(1.0)  # record syncs
            now = sim.volume("v")
            assert not now.pending and not now.snapshots and gw.gen == now.head == rec.head
            nursery.cancel_scope.cancel()

    run(main)


def test_a_snapshot_taken_after_a_gateway_crash_leaves_the_reconcile_to_the_next_one():
    """A gateway crashes with a write on two of three copies (its own and h1's). A
    snapshot is then taken with no gateway (`vbp volume snapshot` takes the orphaned
    lease and hands it back): the next gateway must still reconcile, in the generation
    the snapshot froze, else h2's copy disagrees with h1's in the snapshot and the head
    with no record. (Before, the lease came back released and nothing compared them.)"""
    async def main():
        sim = Sim(3, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"0" * 4096, min_size=2)
            h1, h2 = sim.hosts["h1"], sim.hosts["h2"]
            await h0.run_on(lambda: call(gw.flush()))
            h0.pool.request_timeout = 10000  # the crashed gateway never settles its write
            on_call = h0.faults.on_call
            h0.faults.on_call = lambda a, msg: (
                "drop" if a == h2.addr and type(msg) is m.WriteChunk else on_call(a, msg))

            async def write():
                try:
                    await h0.run_on(lambda: call(gw.write(0, b"X" * 4096, False)))
                except Exception:
                    pass

            nursery.start_soon(write)
            await trio.sleep(0.5)  # X is on h0 and h1; h2's never came
            sim.crash("h0")
            sim.expire_lease("v")
            sim.sync_maps()
            await sim.snapshot("v", "s")
            gw1 = await h1.run_on(h1.provider.open_export, "v")
            await h1.run_on(lambda: call(gw1.write(MiB, b"Y" * 4096, False)))
            with trio.fail_after(30):  # the copy recorded behind is resynced
                while any(r.index == 0 and r.host_id != "h0" for r in sim.reg.list_stale()):
                    await trio.sleep(0.5)
            # h0, down (crashed) during the reconcile, held X too: it stays recorded stale
            # until it is back and resynced, never current with a write the others lack
            assert any(r.index == 0 and r.host_id == "h0" for r in sim.reg.list_stale())
            rec = sim.volume("v")
            for chain in (rec.chain, rec.snapshot("s").chain):
                pages = {h.id: sim.replica_bytes(h, rec, chain, 0)[:4096] for h in (h1, h2)}
                assert pages["h1"] == pages["h2"], chain
            nursery.cancel_scope.cancel()

    run(main)


async def two_snapshot_exports(nursery, sim):
    """v served by h0 (4 KiB of S written), snapshots s and t, both open on h0:
    (h0, [v@s, v@t])."""
    h0, _ = await served(nursery, sim, b"S" * 4096)
    await sim.snapshot("v", "s")
    await sim.snapshot("v", "t")
    return h0, [await h0.run_on(h0.provider.open_export, e) for e in ("v@s", "v@t")]


def test_a_snapshot_export_stops_serving_while_its_host_cannot_publish_it():
    """A host that could not publish its open exports for most of their lifetime in the
    registry (cut off from it) serves nothing from its snapshot exports: a delete could
    find no user and garbage collection free the chunks, which a read would then return
    as zeros. Published again, the export serves on if its snapshot is still there, and
    is gone if it was deleted meanwhile."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, (s, t) = await two_snapshot_exports(nursery, sim)

            async def read(export):
                return extents_bytes(await h0.run_on(lambda: call(export.read(0, 4096))), 0, 4096)

            assert await read(s) == b"S" * 4096
            h0.published_at = trio.current_time() - h0.cfg.heartbeat_ttl  # cut off
            await trio.sleep(0.5)  # a record sync
            for export in (s, t):
                with pytest.raises(Unpublished):
                    await read(export)
                assert export.name in {e["export"] for e in h0.provider.published()}
            again = await h0.run_on(h0.provider.open_export, "v@s")  # a new client
            assert again is s  # (the same export: published again, every client is served)
            sim.reg.update_volume("v", lambda d: {
                **d, "snapshots": [x for x in d["snapshots"] if x["name"] != "t"]})
            h0.published_at = trio.current_time()  # published again
            await trio.sleep(0.5)
            assert await read(s) == b"S" * 4096
            with pytest.raises(Gone) as e:
                await read(t)
            assert not isinstance(e.value, Unpublished)
            nursery.cancel_scope.cancel()

    run(main)


class HungRegistry:
    """A host's registry whose volume reads hang for an etcd request timeout, then fail."""

    def __init__(self, registry):
        self.registry = registry

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def get_volume(self, name):
        await trio.sleep(5.0)
        raise RegistryUnavailable("etcd request timed out")


def test_snapshot_exports_stop_serving_in_time_while_the_registry_hangs():
    """The registry hangs right after a publication: each record sync is stuck in a
    read of five seconds per export. The exports still stop serving before the registry
    drops the publication (heartbeat_ttl after it), each read checking its own deadline,
    not waiting for a sync to notice."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, exports = await two_snapshot_exports(nursery, sim)
            h0.published_at = trio.current_time()  # the last publication that went through
            await trio.sleep(0.5)  # a record sync after it
            h0.registry = HungRegistry(h0.registry)
            await trio.sleep(h0.cfg.heartbeat_ttl - 0.1)  # before the registry drops it
            for export in exports:
                with pytest.raises(Unpublished):
                    await h0.run_on(lambda: call(export.read(0, 4096)))
            nursery.cancel_scope.cancel()

    run(main)


class CutOff:
    """A host's registry whose volume reads fail at once (etcd cut off from this host
    only: the other hosts go on)."""

    def __init__(self, registry):
        self.registry = registry

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def get_volume(self, name):
        await trio.lowlevel.checkpoint()
        raise RegistryUnavailable("registry unreachable from this host")


def test_a_reader_stops_serving_while_it_cannot_read_the_volume_record():
    """A head export holding no lease (a reader: a backup, `vbp volume export` of a live
    volume) reads by its own copy of the chain, which nothing but its record syncs keeps
    current, and GC counts no reader that is in no record. Cut off from the registry,
    it must not serve the old chain for ever: a snapshot, a write past it and the
    snapshot's delete later, GC has freed what that chain reads, and a read would
    answer zeros for acknowledged bytes. So past the lapse its reads and block status
    fail (Unsynced: EIO), and once a record read goes through they answer the current
    bytes. The writer, cut off the same way, serves on under its lease."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            assert await read_4k(h1, r) == b"A" * 4096
            for h in (h0, h1):
                h.registry = CutOff(h.registry)
            await trio.sleep(h1.cfg.heartbeat_ttl * RECORD_LAPSE - 0.5)
            assert await read_4k(h1, r) == b"A" * 4096  # (within the bound)
            await trio.sleep(1.0)
            for op in (r.read, r.block_status):
                with pytest.raises(Unsynced):
                    await h1.run_on(lambda: call(op(0, 4096)))
            assert await read_4k(h0, w) == b"A" * 4096  # the lease holder
            h0.registry = h0.registry.registry
            await sim.snapshot("v", "s")
            await h0.run_on(lambda: call(w.write(0, b"B" * 4096, False)))
            api.delete_volume(sim.reg, "v@s", force=True)
            for h in sim.hosts.values():
                await h.collect_garbage()
            with pytest.raises(Unsynced):  # not the zeros GC left under the old chain
                await read_4k(h1, r)
            h1.registry = h1.registry.registry
            await trio.sleep(0.5)  # a record sync goes through
            assert r.chain == sim.volume("v").chain
            assert await read_4k(h1, r) == b"B" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_two_head_switches_at_once_end_on_the_newer_head():
    """Two record syncs may switch the head at once (the periodic one, and the one after
    taking the lease). One waits for the other, and a view older than the head adopted
    meanwhile is left: the gateway never goes back to an older head."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim)
            rec = sim.volume("v")

            def head(g):
                return view_of(dc_replace(rec, head=g, chain=rec.chain + (g,)), None)

            go = trio.Event()

            async def older():
                await go.wait()
                return head(rec.head + 1)

            async def newer():
                return head(rec.head + 2)

            nursery.start_soon(gw.switch_head, older)
            await trio.sleep(0.01)
            nursery.start_soon(gw.switch_head, newer)
            await trio.sleep(0.01)
            go.set()
            await trio.sleep(0.1)
            assert gw.gen == rec.head + 2 and gw._hold is None
            nursery.cancel_scope.cancel()

    run(main)


def test_a_takeover_whose_reconcile_failed_leaves_the_lease_a_takeover(monkeypatch):
    """The gateway that takes an orphaned lease over (at its open) fails to reconcile
    (its marks find the registry unreachable): the lease goes back still marked a
    takeover, so its first write (or the next gateway) reconciles, even if its client
    leaves in between. (Kept, it was handed back as reconciled when the client left.)"""
    async def main():
        sim = Sim(3, hosts=3, peer_timeout=2.0)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, min_size=2)
            sim.crash("h0")
            sim.expire_lease("v")
            sim.sync_maps()
            calls = reconcile_failing_once(monkeypatch)
            h1 = sim.hosts["h1"]
            gw1 = await h1.run_on(h1.provider.open_export, "v")  # takes the lease over
            await settled(gw1)  # (in the background)
            assert calls and sim.reg.lease_orphaned("v") and "v" not in h1.provider.leases
            await h1.run_on(lambda: call(gw1.write(0, b"B" * 4096, False)))
            assert len(calls) == 2 and not sim.reg.lease_orphaned("v")
            nursery.cancel_scope.cancel()

    run(main)


class NoPublish:
    """A host's registry that takes none of its publications (its volume reads go on)."""

    def __init__(self, registry):
        self.registry = registry

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def publish_stats(self, *args):
        await trio.lowlevel.checkpoint()
        raise RegistryUnavailable("registry unreachable from this host")


def published_chains(sim, host: str) -> list[tuple]:
    return [tuple(e["chain"]) for e in sim.reg.host_stats()[host].get("exports", ())]


async def read_4k(host, gw) -> bytes:
    return extents_bytes(await host.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)


async def moved_on_under(sim, h0, w, hr, r, gc_there: bool = True) -> None:
    """Host `hr`, reading through `r` (no lease), is cut off from the record; meanwhile a
    snapshot of v is taken, h0's writer writes past it, the snapshot is deleted and GC
    runs (on `hr` too, `gc_there`). All within `r`'s lapse."""
    hr.registry = CutOff(hr.registry)
    await trio.sleep(0.5)
    await sim.snapshot("v", "s")
    await h0.run_on(lambda: call(w.write(0, b"B" * 4096, False)))
    api.delete_volume(sim.reg, "v@s", force=True)
    for h in sim.hosts.values():
        if gc_there or h is not hr:
            await h.collect_garbage()
    assert trio.current_time() < r.serve_until  # within the lapse


def test_a_reader_cut_off_within_its_lapse_never_reads_what_gc_freed():
    """A reader's host cut off from the volume's record: a snapshot, a write past it
    and the snapshot's delete later, GC has run on every host, the reader still within
    its lapse. GC counted no reader that is in no record and freed what its chain reads:
    it answered zeros. Now the reader's chain is published with its host's stats, as a
    snapshot export's is, and GC everywhere keeps it. The writer, holding the lease, is
    not published: its chain is the record's head."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            assert await read_4k(h1, r) == b"A" * 4096
            await moved_on_under(sim, h0, w, h1, r)
            assert await read_4k(h1, r) == b"A" * 4096
            assert published_chains(sim, "h1") == [r.chain]
            assert not h0.provider.published()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_on_a_host_with_no_copy_within_its_lapse_never_reads_zeros():
    """As above, four hosts and replicas=3: the reader's host holds no copy of chunk 0
    and reads it from a replica, whose GC must keep what the reader's chain reads."""
    async def main():
        sim = Sim(13, hosts=4)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            holders = h0.cluster.replicas(w.lineage, 0, 3)
            hr = next(h for i, h in sim.hosts.items() if i not in holders)
            r = await hr.run_on(hr.provider.open_export, "v")
            assert await read_4k(hr, r) == b"A" * 4096
            await moved_on_under(sim, h0, w, hr, r, gc_there=False)
            assert await read_4k(hr, r) == b"A" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_adopts_a_new_head_only_once_it_is_published():
    """A reader whose host cannot publish follows a snapshot of the volume. Adopted at
    once, the new head was in no publication: a second snapshot, a write and the delete
    of both snapshots later, GC freed what both chains read, and the reader answered
    zeros. Now the reader keeps the chain it has published (still the first snapshot's,
    then kept by its publication) until the new one is published, then adopts it; the
    chain it leaves stays published while a remote read by it may be under way, and no
    more: one entry per chain, the current one."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            first = r.chain
            h1.registry = NoPublish(h1.registry)
            await sim.snapshot("v", "s")
            await h0.run_on(lambda: call(w.write(0, b"B" * 4096, False)))
            await trio.sleep(0.5)  # record syncs
            await sim.snapshot("v", "t")
            await h0.run_on(lambda: call(w.write(0, b"C" * 4096, False)))
            api.delete_volume(sim.reg, "v@s", force=True)
            api.delete_volume(sim.reg, "v@t", force=True)
            for h in sim.hosts.values():
                await h.collect_garbage()
            assert trio.current_time() < r.serve_until
            assert await read_4k(h1, r) == b"A" * 4096
            assert r.chain == first
            assert len(h1.provider.published()) == 2  # the chain served, the one to adopt
            h1.registry = h1.registry.registry
            await trio.sleep(1.0)  # published, then adopted
            assert r.chain == sim.volume("v").chain and await read_4k(h1, r) == b"C" * 4096
            assert r.chain in published_chains(sim, "h1")
            await trio.sleep(sim.peer_timeout * 3 + 1.5)  # no remote read by the old chain left
            await h1.run_on(h1.publish_stats)
            assert published_chains(sim, "h1") == [r.chain]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_stops_serving_while_its_host_cannot_publish_it():
    """A reader whose record reads go through but whose host's publications do not
    (its stats lapse in the registry): GC elsewhere may no longer see its chain, so past
    the lapse after the last publication it fails (Unsynced), and serves again once a
    publication and a record read after it went through."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            h1.published_at = trio.current_time() - h1.cfg.heartbeat_ttl  # cut off
            await trio.sleep(h1.cfg.heartbeat_ttl * RECORD_LAPSE + 0.5)  # record syncs
            with pytest.raises(Unsynced):
                await read_4k(h1, r)
            h1.published_at = trio.current_time()  # published again
            await trio.sleep(0.5)
            assert await read_4k(h1, r) == b"A" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_an_export_whose_serving_lapsed_with_the_registry_there_renews_it_for_its_request():
    """serve_until is a publication plus 4 s, moved on by the heartbeat (every 2 s) and
    a record read after it (readers every second). A client that keeps the event loop
    busy delays both: `nbdinfo --map` of a 16 TiB volume, 4,096 block status requests of
    14 ms each, failed now and then with EIO (Unsynced) with the registry answering all
    along. Such a request now has the host publish and read the records at once, and is
    answered; requests that come meanwhile share that one renewal. Reads and block
    status, of a reader (the head without the lease) and of a snapshot export."""
    async def main():
        sim = Sim(13, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096)
            await sim.snapshot("v", "s")
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            s = await h1.run_on(h1.provider.open_export, "v@s")
            publish, published = h1.publish_stats, []

            async def counted():
                published.append(trio.current_time())
                await publish()

            h1.publish_stats = counted
            for export in (r, s):
                assert await read_4k(h1, export) == b"A" * 4096
                export.serve_until = trio.current_time() - 0.01  # (the loop held up)
                published.clear()
                got = []

                async def read_one():
                    got.append(await read_4k(h1, export))

                async with trio.open_nursery() as readers:  # (five at once: one renewal)
                    for _ in range(5):
                        readers.start_soon(read_one)
                assert got == [b"A" * 4096] * 5 and len(published) == 1
                assert export.serve_until > trio.current_time()
                assert await read_4k(h1, export) == b"A" * 4096
                export.serve_until = trio.current_time() - 0.01
                got = await h1.run_on(lambda: call(export.block_status(0, 4096)))
                assert got == [(4096, 0)]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_serves_a_read_past_a_shrunk_end_once_the_volume_is_grown_back():
    """Review: a reader (h1, no lease) adopted a shrink of v, a view it published first;
    the volume is grown back right after. A read past the shrunk end waits for up to two
    record syncs (VolumeGateway._unless_grown), the reader publishing the grown view at
    the first and adopting it at the second. But its publications of a view to follow
    were spaced a second apart, a new view's as a retry's: the grown view, published
    a second after the shrunk one, was adopted too late and the read was refused
    (EINVAL) with the volume grown. A new view is published at once now."""
    async def main():
        sim = Sim(3, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, w = await served(nursery, sim, b"A" * 4096, 4 * MiB)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            await sim.shrink("v", 2 * MiB)
            while r.size != 2 * MiB:  # record syncs: published, then adopted
                await trio.sleep(0.01)
            api.resize(sim.reg, "v", 4 * MiB)
            got = await h1.run_on(lambda: call(r.read(3 * MiB, 4096)))
            assert extents_bytes(got, 3 * MiB, 4096) == bytes(4096)
            assert r.size == 4 * MiB
            nursery.cancel_scope.cancel()

    run(main)


def test_requests_past_a_shrunk_end_the_record_confirms_are_refused_at_once():
    """A client connected before a shrink of v (8 to 4 MiB): every request past the new
    end, on the holder (h0) and on a reader (h1) that adopted the shrink, is refused as
    soon as one read of the record shows the volume still shrunk. Each waited for two
    passes of record syncs first (at least 2 x RECORD_SYNC_GAP: 0.2 s and more), in case
    the volume had grown back since: that case still waits, and is served (above)."""
    async def main():
        sim = Sim(5, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"A" * 4096, 8 * MiB)
            h1 = sim.hosts["h1"]
            r = await h1.run_on(h1.provider.open_export, "v")
            await sim.shrink("v", 4 * MiB)
            while r.size != 4 * MiB or gw.size != 4 * MiB:  # (record syncs)
                await trio.sleep(0.01)
            requests = [lambda g: g.read(5 * MiB, 4096), lambda g: g.cache(6 * MiB, 4096),
                        lambda g: g.block_status(4 * MiB - 4096, 8192)]
            for h, g in ((h0, gw), (h1, r)):
                for request in requests + [lambda g: g.write(7 * MiB, b"X" * 4096, False),
                                           lambda g: g.trim(5 * MiB, 4096, False)]:
                    t0 = trio.current_time()
                    with pytest.raises(VbpError) as e:
                        await h.run_on(lambda: call(request(g)))
                    assert e.value.errno in (errno.EINVAL, errno.ENOSPC), e.value
                    # (one read, which may wait for the previous one's gap)
                    assert trio.current_time() - t0 < PAST_END_READ_GAP + 0.05
            assert extents_bytes(await h0.run_on(lambda: call(gw.read(0, 4096))), 0, 4096) == \
                b"A" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_requests_past_a_shrunk_end_share_their_reads_of_the_record():
    """Review: each request past a shrunk end read the volume's record of its own, so a
    client sending them (a guest whose disk shrank under it, or one doing so on purpose)
    cost the registry (etcd: a round trip) a read each. They share reads now: 200 at once,
    then 100 one after the other, cost a read per PAST_END_READ_GAP at most, and every
    one is refused."""
    async def main():
        sim = Sim(5, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"A" * 4096, 8 * MiB)
            await sim.shrink("v", 4 * MiB)
            while gw.size != 4 * MiB:  # (record syncs)
                await trio.sleep(0.01)
            reads = []  # those for requests past the end (record syncs read it too)
            get_volume = gw.registry.get_volume

            async def counted(name):
                if sys._getframe(1).f_code.co_name in ("_record_since", "_grown_maybe"):
                    reads.append(trio.current_time())
                return await get_volume(name)
            gw.registry.get_volume = counted
            refused = []

            async def past_end(k):
                with pytest.raises(VbpError) as e:
                    await h0.run_on(lambda: call(gw.read(4 * MiB + k * 4096, 4096)))
                refused.append(e.value.errno)
            t0 = trio.current_time()
            async with trio.open_nursery() as clients:
                for k in range(200):
                    clients.start_soon(past_end, k)
            assert len(refused) == 200 and set(refused) == {errno.EINVAL}
            assert len(reads) <= 2, reads  # (one under way when most came, one after)
            for k in range(100):
                await past_end(k)
            spent = trio.current_time() - t0
            assert len(refused) == 300 and set(refused) == {errno.EINVAL}
            assert 1 <= len(reads) <= spent / PAST_END_READ_GAP + 2, (len(reads), spent)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_no_hole_zeroing_across_a_shrunk_end_is_refused_whole():
    """Review: a client connected before a shrink zeroes, with NO_HOLE, a range across
    the new end (3 MiB to 5 MiB of v shrunk from 8 to 4 MiB), in two steps (one per
    4 MiB of zeros written as data). It was refused (ENOSPC) only at the step past the
    end, the step before it done: the zeros were written below the end by a request
    that failed, where a WRITE or a zeroing with holes of the same range is refused
    whole, changing nothing, as any request past an export's end is. Once v is grown
    back the same request zeroes the whole range."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim, b"A" * (8 * MiB), 8 * MiB)
            await sim.shrink("v", 4 * MiB)
            assert gw.size == 4 * MiB

            async def zero():
                return await h0.run_on(
                    lambda: call(gw.write_zeroes(3 * MiB, 2 * MiB, False, False, False)))

            async def read(offset, length):
                got = await h0.run_on(lambda: call(gw.read(offset, length)))
                return extents_bytes(got, offset, length)

            with pytest.raises(VbpError) as e:
                await zero()
            assert e.value.errno == errno.ENOSPC
            assert await read(3 * MiB, MiB) == b"A" * MiB  # nothing zeroed
            assert "3145728+2097152" in str(e.value)  # the request's range
            api.resize(sim.reg, "v", 8 * MiB)
            await zero()
            assert await read(3 * MiB - 4096, 2 * MiB + 8192) == (
                b"A" * 4096 + bytes(2 * MiB) + bytes(4096))
            nursery.cancel_scope.cancel()

    run(main)


class LateRecordAnswer:
    """A host's registry whose next volume read is answered `delay` seconds late: the
    record as it was when read (an etcd answer slow on its way back)."""

    def __init__(self, registry, delay: float):
        self.registry = registry
        self.delay = delay

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def get_volume(self, name):
        d = await self.registry.get_volume(name)
        delay, self.delay = self.delay, 0.0
        await trio.sleep(delay)
        return d


def test_a_record_read_before_the_lease_was_taken_never_takes_the_gateway_back_to_the_old_head():
    """Review: h1 serves v to a client that has not written yet (a reader); a shrink of
    v to 2 MiB is in progress, not completed (its requester about to complete it, no
    lease being live). A record sync on h1 reads the record (the shrink in progress),
    its answer late. Meanwhile the client's first write takes the lease, whose record
    read completes the shrink: the gateway adopts the new head and size. Then the late
    answer came back to the record sync, which had begun as a reader's and adopted the
    view of that older record as a resize (same size check, `set_view`): the old head
    and the old size again. A write at 3 MiB, past the new end, was then acknowledged
    into the old head, and read back as zeros once the volume was grown back: lost. A
    record older than the view adopted is left now."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=3)
            h1 = sim.hosts["h1"]
            gw = await h1.provider.open_export("v")
            assert not gw.token and gw.size == 8 * MiB
            head = sim.reg.next_id(api.gen_counter(rec.lineage))
            sim.reg.update_volume("v", lambda d: request_shrink(
                VolumeRecord.from_dict(d), 2 * MiB, head, time.time() + 60).to_dict())
            h1.registry = LateRecordAnswer(h1.registry, 1.0)
            nursery.start_soon(h1.provider.sync_records)  # its read answered late
            await trio.sleep(0.1)
            await call(gw.write(0, b"F" * 4096, False))  # the first: takes the lease
            assert gw.token and gw.gen == head and gw.size == 2 * MiB
            await trio.sleep(1.0)  # the late answer in
            assert sim.volume("v").head == head
            acked: list = []

            async def write_past_the_end():
                try:
                    await call(gw.write(3 * MiB, b"B" * 4096, False))
                    acked.append(True)
                except VbpError:
                    acked.append(False)

            nursery.start_soon(write_past_the_end)
            for _ in range(2):  # record syncs (blockd's loop), which it may wait for
                await trio.sleep(0.01)
                await h1.provider.sync_records()
            await trio.sleep(0.01)
            api.resize(sim.reg, "v", 8 * MiB)
            await h1.provider.sync_records()
            got = extents_bytes(await call(gw.read(3 * MiB, 4096)), 3 * MiB, 4096)
            assert (acked, got) == ([False], bytes(4096))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_record_read_before_the_lease_was_taken_never_has_the_gateway_write_a_snapshot():
    """As above, with a snapshot in progress instead of a shrink: the first write's lease
    completes it, and the late record would have taken the gateway back to the old
    head, now the snapshot's generation. The next write went into the snapshot."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=3)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            first = await h0.provider.open_export("v")
            await call(first.write(0, b"A" * 4096, False))
            first.close()  # (its lease handed back in the background)
            await trio.sleep(1.0)
            gw = await h1.provider.open_export("v")
            head = sim.reg.next_id(api.gen_counter(rec.lineage))
            sim.reg.update_volume("v", lambda d: request_snapshot(
                VolumeRecord.from_dict(d), "s", head, time.time() + 60).to_dict())
            h1.registry = LateRecordAnswer(h1.registry, 1.0)
            nursery.start_soon(h1.provider.sync_records)  # its read answered late
            await trio.sleep(0.1)
            await call(gw.write(MiB, b"F" * 4096, False))  # the first: takes the lease
            assert gw.gen == head and sim.volume("v").snapshot("s") is not None
            await trio.sleep(1.0)  # the late answer in
            await call(gw.write(0, b"B" * 4096, False))
            snap = await h0.provider.open_export("v@s")
            got = extents_bytes(await call(snap.read(0, 4096)), 0, 4096)
            assert got == b"A" * 4096
            nursery.cancel_scope.cancel()

    run(main)


async def late_reader_of_v(nursery, sim):
    """`sim` started with no loops, v (8 MiB, replicas=3) created and opened on h1 by a
    client that has not written yet (a reader), h1's next record read answered 1 s
    late: (h1, its gateway of v)."""
    await sim.start(nursery, loops=False)
    sim.create_volume("v", 8 * MiB, replicas=3)
    h1 = sim.hosts["h1"]
    gw = await h1.provider.open_export("v")
    assert not gw.token and gw.size == 8 * MiB
    h1.registry = LateRecordAnswer(h1.registry, 1.0)
    return h1, gw


def test_a_record_read_before_a_grow_was_adopted_never_shrinks_the_gateway_back():
    """Review: h1 serves v (8 MiB) to a client that has not written yet (a reader). A
    record sync on h1 reads v's record, its answer late; v is grown to 16 MiB meanwhile,
    and the client's first write takes the lease, whose record read adopts the grow.
    The late answer then came back to the record sync, begun as a reader's, which took
    the 8 MiB record for a resize: the gateway was back at 8 MiB until the next sync,
    refusing requests between the two ends. Within a generation the size only grows (a
    shrink makes a new head): a smaller record of the same head is older, and left."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h1, gw = await late_reader_of_v(nursery, sim)
            nursery.start_soon(h1.provider.sync_records)  # reads 8 MiB, answered late
            await trio.sleep(0.1)
            api.resize(sim.reg, "v", 16 * MiB)
            await call(gw.write(0, b"F" * 4096, False))  # the first: takes the lease
            assert gw.token and gw.size == 16 * MiB
            await trio.sleep(1.0)  # the late answer in
            assert gw.size == 16 * MiB
            await call(gw.write(12 * MiB, b"G" * 4096, False))  # between the two ends
            got = extents_bytes(await call(gw.read(12 * MiB, 4096)), 12 * MiB, 4096)
            assert got == b"G" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_record_the_lease_read_before_a_grow_was_adopted_never_shrinks_the_gateway_back():
    """The same with the late answer the lease's own record read (the client's first
    write): meanwhile the reader's record syncs adopted the grow to 16 MiB, and the
    holder's sync took the older 8 MiB record for a resize."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h1, gw = await late_reader_of_v(nursery, sim)
            written = trio.Event()

            async def first_write():  # takes the lease; its record read answered late
                await call(gw.write(0, b"F" * 4096, False))
                written.set()

            nursery.start_soon(first_write)
            await trio.sleep(0.1)
            api.resize(sim.reg, "v", 16 * MiB)
            for _ in range(2):  # the reader's syncs: publish the grown view, then adopt it
                await h1.provider.sync_records()
                await trio.sleep(0.1)
            assert not gw.token and gw.size == 16 * MiB
            await written.wait()  # the late answer in
            assert gw.token and gw.size == 16 * MiB
            await call(gw.write(12 * MiB, b"G" * 4096, False))
            got = extents_bytes(await call(gw.read(12 * MiB, 4096)), 12 * MiB, 4096)
            assert got == b"G" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_the_lease_of_a_volume_deleted_under_its_gateway_is_given_back_for_the_new_one():
    """`v` is deleted (forced) under its gateway on h0, which holds the write lease, and
    created again. Once h0's record sync finds out, its gateway is fenced and gives the
    lease back: the new `v`'s first write, on h1, takes it at once, where it waited for
    the old lease to run out (lease_ttl, 9 s here)."""
    async def main():
        sim = Sim(1, hosts=3)
        async with trio.open_nursery() as nursery:
            h0, gw = await served(nursery, sim)
            assert gw.token
            h1 = sim.hosts["h1"]
            api.delete_volume(sim.reg, "v", force=True)
            sim.create_volume("v", 2 * MiB, replicas=3)
            await trio.sleep(1.0)  # record syncs
            assert gw.fenced
            gw2 = await h1.run_on(h1.provider.open_export, "v")
            t0 = trio.current_time()
            await h1.run_on(lambda: call(gw2.write(4096, b"C" * 4096, False)))
            assert trio.current_time() - t0 < 1.0 < sim.lease_ttl
            assert sim.reg.get_lease("v").holder == "h1"
            nursery.cancel_scope.cancel()

    run(main)
