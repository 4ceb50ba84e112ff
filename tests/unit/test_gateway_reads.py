"""The gateway's read path (replicator/gateway.py) over in-memory hosts of the simulation
harness (tests/sim) with its background loops off, on a virtual clock.

Two ways a read could hand out or leave behind bytes that miss an acknowledged write:
- serving this host's copy while it is recorded stale (it missed writes) because no
  current copy answered: the client must get an error, as from a DRBD node whose disk is
  Outdated and whose peer is gone, never old data;
- repairing a local page that failed its checksum with bytes read from a peer while a
  write to the same range landed here meanwhile: the repair must not undo the write."""

from __future__ import annotations

import weakref

import pytest
import trio
import trio.testing

from dataclasses import replace as dc_replace

from control import api
from replicator import gateway
from replicator import messages as m
from replicator.gateway import ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import MemoryNetwork
from tests.sim.harness import Sim, call, extents_bytes
from vbp.chunkstore import ChunkStore
from vbp.chunkstore_common import FileRange
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import NoSpace, VbpError
from vbp.layout import MiB, ChunkKey
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


async def gateway_on_a_replica(nursery):
    """A started 3-host sim, a 1 MiB volume with replicas=2, min_size=1, and its gateway
    on one of the two replica hosts (a); b holds the other copy."""
    sim = Sim(1, hosts=3, zones=3)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=2, min_size=1)
    a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
    gw = await sim.hosts[a].provider.open_export("v")
    return sim, rec, gw, a, b


async def read(gw, offset, length) -> bytes:
    return extents_bytes(await call(gw.read(offset, length)), offset, length)


def in_pool(body) -> None:
    """Run `body(sim, rec, gw, a, b)` over gateway_on_a_replica's pool, then stop it."""
    async def main():
        async with trio.open_nursery() as nursery:
            await body(*await gateway_on_a_replica(nursery))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_stale_local_copy_is_never_served_when_no_current_copy_answers():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 4096, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        # a misses an acknowledged write that b took, and is recorded stale for it
        sim.hosts[b].store.write(key, 0, b"\x02" * 4096, chunk_size=MiB)
        sim.reg.mark_stale(rec.lineage, 0, [a], 1)
        await sim.hosts[a].resync.refresh_stale_self()
        assert await read(gw, 0, 4096) == b"\x02" * 4096  # from b, the current copy
        sim.hosts[a].faults.partition([sim.hosts[b].addr])
        for offset, length in ((0, 4096), (0, 2 * 4096), (4096, 4096)):
            with pytest.raises(VbpError):
                got = await read(gw, offset, length)
                raise AssertionError(f"read {offset}+{length} served the stale copy: {got[:4]!r}")
        sim.hosts[a].faults.heal()
        assert await read(gw, 0, 4096) == b"\x02" * 4096

    in_pool(body)


def test_read_repair_never_undoes_a_write_that_landed_while_the_good_copy_was_read():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 0)
        sim.hosts[a].faults.delay = 1.0  # every call from a to b takes a second
        got = {}

        async def reader():
            got["read"] = await read(gw, 0, 4096)

        async def writer():
            await trio.sleep(0.5)  # while the read waits for b's copy
            await call(gw.write(0, b"\x03" * 4096, False))
            got["written"] = True

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(writer)
        assert got["written"]
        assert got["read"] in (b"\x01" * 4096, b"\x03" * 4096)
        # every copy holds the acknowledged write, the repaired one too
        assert store_a.read(key, 0, 4096) == b"\x03" * 4096
        assert sim.hosts[b].store.read(key, 0, 4096) == b"\x03" * 4096
        sim.hosts[a].faults.delay = 0.0
        assert await read(gw, 0, 8192) == b"\x03" * 4096 + b"\x01" * 4096

    in_pool(body)


def test_read_repair_fixes_a_page_that_failed_its_checksum():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 1)
        await trio.sleep(0.01)  # the client gets the write's reply, then reads
        assert await read(gw, 4096, 4096) == b"\x01" * 4096
        assert store_a.read(key, 0, 8192) == b"\x01" * 8192  # no ChecksumError: repaired

    in_pool(body)


def test_read_repair_writes_only_the_pages_that_fail():
    """A 1 MiB read that meets one damaged page repairs that page: it wrote all 256 pages
    of the read again (the same bytes, checked against their checksums, but 1 MiB of
    writing and dirty cache for 4 KiB of damage)."""
    async def body(sim, rec, gw, a, b):
        data = bytes(range(256)) * (MiB // 256)
        await call(gw.write(0, data, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 5)
        store_a.corrupt(key, 7)
        writes = []
        real = store_a.write

        def write(k, offset, buf, **kw):
            writes.append((offset, len(buf)))
            return real(k, offset, buf, **kw)

        store_a.write = write
        await trio.sleep(0.01)
        assert await read(gw, 0, MiB) == data
        assert writes == [(5 * 4096, 4096), (7 * 4096, 4096)]
        assert store_a.read(key, 0, MiB) == data  # no ChecksumError: repaired

    in_pool(body)


# --- read plans (VolumeGateway.read_ref keeps what it looked up per chunk) ----------------


async def read_ref(gw, offset, length) -> bytes:
    """What the NBD server's read gets (read_ref), as bytes."""
    return extents_bytes(await call(gw.read_ref(offset, length)), offset, length)


def test_a_read_plan_never_serves_the_local_copy_once_it_is_recorded_stale():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 4096, False))
        assert await read_ref(gw, 0, 4096) == b"\x01" * 4096  # planned: a's copy
        assert 0 in gw._plans
        key = ChunkKey(rec.lineage, 0, rec.head)
        sim.hosts[b].store.write(key, 0, b"\x02" * 4096, chunk_size=MiB)  # a missed it
        gw.stale[0] = frozenset({a})  # the gateway's own record of it
        assert await read_ref(gw, 0, 4096) == b"\x02" * 4096
        gw.stale.pop(0)
        assert await read_ref(gw, 0, 4096) == b"\x01" * 4096  # (a's copy, by its plan again)
        sim.reg.mark_stale(rec.lineage, 0, [a], 1)  # the registry's, held by a's replica
        await sim.hosts[a].resync.refresh_stale_self()
        assert await read_ref(gw, 0, 4096) == b"\x02" * 4096
        sim.hosts[a].faults.partition([sim.hosts[b].addr])
        with pytest.raises(VbpError):  # no current copy: an error, never a's
            await read_ref(gw, 0, 4096)
        sim.hosts[a].faults.heal()
        sim.hosts[a].replica.stale_self.clear()
        sim.hosts[a].replica.backfilling = True  # a new disk, not yet backfilled
        assert await read_ref(gw, 0, 4096) == b"\x02" * 4096

    in_pool(body)


def test_read_plans_follow_a_snapshot_and_the_copy_up_after_it():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        assert await read_ref(gw, 0, 8192) == b"\x01" * 8192
        assert await read_ref(gw, MiB // 2, 4096) == bytes(4096)  # planned too
        planned, planned_chain = dict(gw._plans), gw.chain
        async with trio.open_nursery() as nursery:  # the lease holder completes it
            nursery.start_soon(sim.snapshot, "v", "s1")
            while gw.chain == planned_chain:
                await sim.hosts[a].provider.sync_records()  # (switch_head, set_view)
                await trio.sleep(0.05)
        assert not gw._plans
        await call(gw.write(4096, b"\x03" * 4096, False))  # copies chunk 0 up
        assert await read_ref(gw, 0, 8192) == b"\x01" * 4096 + b"\x03" * 4096
        assert gw._plans[0] != planned[0]  # the head's own generation now
        old = await sim.hosts[a].provider.open_export("v@s1")
        assert await read_ref(old, 0, 8192) == b"\x01" * 8192
        assert await read_ref(old, MiB // 2, 4096) == bytes(4096)

    in_pool(body)


def test_a_read_plan_that_meets_a_bad_checksum_repairs_the_page_and_counts_it_once():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        assert await read_ref(gw, 4096, 4096) == b"\x01" * 4096  # planned
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 1)
        before = store_a.stats().checksum_errors
        await trio.sleep(0.01)
        assert await read_ref(gw, 4096, 4096) == b"\x01" * 4096
        assert store_a.stats().checksum_errors == before + 1
        assert store_a.read(key, 0, 8192) == b"\x01" * 8192  # repaired

    in_pool(body)


def test_read_plans_are_remade_for_a_new_cluster_map():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 4096, False))
        await read_ref(gw, 0, 4096)
        first = gw._plans_map
        cluster = sim.hosts[a].cluster
        cluster.set_map(dc_replace(cluster.map, epoch=cluster.map.epoch + 1))
        assert await read_ref(gw, 0, 4096) == b"\x01" * 4096
        assert gw._plans_map is cluster.map is not first

    in_pool(body)


def test_read_plans_never_read_a_slot_that_another_chunk_took_over(tmp_path):
    """Replicas=1 over a real ChunkStore: chunk 0 is deleted and chunk 1 takes its slot.
    A read of chunk 0 by the plan made before must not return chunk 1's bytes."""
    async def main():
        reg = open_registry("memory://plans-slot")
        cluster = ClusterView(ClusterMap(1, (HostRecord("h1", "h1:1", "h1:2", pod="p1", peer_rev=6),)))
        with ChunkStore(tmp_path / "store", 64 * MiB) as store:
            api.create_volume(reg, "v", 8 * MiB, replicas=1, chunk_size="1M")
            gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                               host_id="h1", replica=Replica(store, "h1", lambda: 1),
                               cluster=cluster, pool=MemoryNetwork().pool("t", "h1"), token=1)
            await call(gw.write(0, b"\x01" * MiB, False))
            assert await read_ref(gw, 4096, 4096) == b"\x01" * 4096
            key0 = ChunkKey(gw.lineage, 0, gw.gen)
            slot = store.info(key0).slot
            store.delete(key0)
            store.flush()  # the freed slot leaves limbo
            await call(gw.write(MiB, b"\x02" * MiB, False))
            assert store.info(ChunkKey(gw.lineage, 1, gw.gen)).slot == slot
            assert await read_ref(gw, 4096, 4096) == bytes(4096)
            got = await call(gw.read_ref(MiB, 256 * 1024))  # a FileRange, by chunk 1's plan
            assert type(got) is FileRange and got.pos == slot * MiB
            got.release()

    trio.run(main)


def test_read_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(gateway, "PLANS_MAX", 3)

    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 4096, False))
        for i in range(8):  # (1 MiB volume: one chunk, so plans of chunks past its end too)
            gw._plan(i + 1)
            assert len(gw._plans) <= 3
        assert await read_ref(gw, 0, 4096) == b"\x01" * 4096

    in_pool(body)


def test_reads_all_over_a_volume_of_many_chunks_plan_each_chunk_once():
    """A volume of more chunks than the 65,536 plans a gateway used to keep (all dropped
    when full): read all over, nearly every read remade its chunk's plan, placement
    lookups with it, about 4 us more a 4 KiB read (2 TiB of 4 MiB chunks: 115-120k
    IOPS against 219-248k over 1 GiB, 1 host). A plan is made once per chunk now."""
    chunks = 70_000

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=1, zones=1)
            await sim.start(nursery, loops=False)
            cs = MiB
            sim.create_volume("big", chunks * cs, replicas=1, chunk_size=cs)
            gw = await sim.hosts["h0"].provider.open_export("big")
            made, real = [], gw._plan
            gw._plan = lambda index: made.append(index) or real(index)
            for _ in range(2):
                for i in range(chunks):
                    assert gw.read_ref(i * cs, 4096) == [(i * cs, 4096, None)]  # a hole
            assert sorted(made) == list(range(chunks))
            assert len(gw._plans) == chunks
            nursery.cancel_scope.cancel()

    run(main)


def test_the_memos_of_all_the_gateways_of_a_host_are_bounded_together(monkeypatch):
    """Each gateway may keep PLANS_MAX chunks in each memo (220 MB for a volume read all
    over); the gateways of a host together keep about HOST_MEMOS: counted at each
    MEMO_STEP more in one memo, past it the largest memos, whichever gateway's, are
    emptied, and what they held is made again when next asked."""
    monkeypatch.setattr(gateway, "HOST_MEMOS", 10)
    monkeypatch.setattr(gateway, "MEMO_STEP", 4)
    monkeypatch.setattr(gateway, "_gateways", weakref.WeakSet())  # (not the suite's others)

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=1, zones=1)
            await sim.start(nursery, loops=False)
            for name in ("a", "b"):
                sim.create_volume(name, 16 * MiB, replicas=1, chunk_size=MiB)
            ga = await sim.hosts["h0"].provider.open_export("a")
            gb = await sim.hosts["h0"].provider.open_export("b")
            await call(ga.write(0, b"\x01" * 4096, False))  # (its local-only verdict: 1)
            for i in range(9):
                await read_ref(ga, i * MiB, 4096)
            assert len(ga._plans) == 9 and len(ga._local) == 1  # 10 in all: not past
            for i in range(4):
                await read_ref(gb, i * MiB, 4096)
            assert len(ga._plans) == 9 and len(gb._plans) == 4  # (counted at 4 more)
            await read_ref(gb, 4 * MiB, 4096)  # 14 in all: a's plans, the largest, go
            assert len(ga._plans) == 0 and len(ga._local) == 1 and len(gb._plans) == 5
            assert await read_ref(ga, 0, 4096) == b"\x01" * 4096  # (planned again)
            assert len(ga._plans) == 1
            nursery.cancel_scope.cancel()

    run(main)


def test_what_a_gateway_keeps_per_chunk_for_writes_is_bounded(monkeypatch):
    """The routes of replicated writes and the local-only verdicts of replicas=1 writes,
    kept per chunk like the read plans, stay under PLANS_MAX too, and are made again for
    a new cluster map."""
    monkeypatch.setattr(gateway, "PLANS_MAX", 3)

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery, loops=False)
            for name, n in (("r1", 1), ("r3", 3)):
                sim.create_volume(name, 16 * MiB, replicas=n)
                gw = await sim.hosts["h0"].provider.open_export(name)
                for i in range(16):
                    await call(gw.write(i * MiB, bytes([i + 1]) * 4096, False))
                    assert len(gw._local) <= 3 and len(gw._routes) <= 3
                assert (n == 1) == bool(gw._local) and (n == 1 or gw._routes)
                for i in range(16):
                    assert await read(gw, i * MiB, 4096) == bytes([i + 1]) * 4096
                cluster = sim.hosts["h0"].cluster
                cluster.set_map(dc_replace(cluster.map, epoch=cluster.map.epoch + 1))
                await call(gw.write(0, b"\xff" * 4096, False))
                assert gw._local_map is cluster.map
                assert len(gw._local) <= 1 and len(gw._routes) <= 1
                assert await read(gw, 0, 4096) == b"\xff" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_block_status_never_asks_this_hosts_copy_when_reads_do_not_trust_it():
    """A holder past its lease and its serving time (another gateway may have taken the
    volume over and written) reads from the other copies, never its own. Block status
    took the remote path too, and asked its own copy there first, over the peer
    protocol: it reported a hole where reads return the other copy's data, and a client
    copying by block status (nbdcopy, qemu-img convert) skips those bytes. (Found by a
    review.)"""
    async def main():
        sim = Sim(5, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 2 * MiB, replicas=2, min_size=1)
            first, other = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
            here, there = sim.hosts[first], sim.hosts[other]  # (this host asked first)
            gw = await here.provider.open_export("v")
            await call(gw.write(0, b"A" * 4096, False))  # takes the lease; chunk 0 here
            # a write this host's copy missed (another holder's, after this one's lease)
            there.replica.write("v", rec.lineage, 0, gw.gen, gw.chain, 4096, b"B" * 4096,
                                rec.chunk_size, 0, False, there.cluster.epoch, gw.token)
            gw.lease_deadline = gw.serve_until = trio.current_time() - 1
            assert not gw._own_current()
            assert await read(gw, 4096, 4096) == b"B" * 4096  # the other copy's bytes
            assert await call(gw.block_status(4096, 4096)) == [(4096, 0)]  # data, no hole
            gw.close()
            nursery.cancel_scope.cancel()

    run(main)


def test_block_status_never_asks_a_copy_recorded_stale():
    """This host's copy failed the write that made chunk 0 (b took it, min_size=1) and is
    recorded stale, before its replica has heard so. Block status goes to the current
    copy, as the read does: the stale one, lacking the chunk, would report a hole over
    written data (and a client such as qemu-img convert would skip it)."""
    async def body(sim, rec, gw, a, b):
        replica = sim.hosts[a].replica
        write = replica.write

        def disk_full(*args, **kwargs):
            raise NoSpace("the disk is full (test)")

        replica.write = disk_full
        await call(gw.write(0, b"\x07" * 4096, False))
        replica.write = write
        assert a in gw.stale[0] and not replica.stale_self
        assert await read(gw, 0, 4096) == b"\x07" * 4096  # from b
        assert await call(gw.block_status(0, 4096)) == [(4096, 0)]  # data, not a hole

    in_pool(body)

async def written_elsewhere(nursery, min_size: int):
    """A 3-host sim, volume v (replicas 2, `min_size`) with copies on a and b; a gateway
    on c (the lease holder) wrote pages 0-1 of chunk 0, and a gateway on a only reads
    (no lease). Returns (sim, record, (a, b, c), writer, reader)."""
    sim = Sim(1, hosts=3, zones=3)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=2, min_size=min_size)
    a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
    c = next(h for h in sim.hosts if h not in (a, b))
    writer = await sim.hosts[c].provider.open_export("v")
    await call(writer.write(0, b"\x01" * 8192, False))
    reader = await sim.hosts[a].provider.open_export("v")  # no lease: it reads
    return sim, rec, (a, b, c), writer, reader



def test_a_repair_waits_out_a_write_of_another_gateway_still_on_its_way():
    """A gateway that only reads the volume (another host's holds the lease) finds its
    local page 0 damaged and repairs pages 0-1 from the other copy, which another
    gateway's write to page 1 reaches a second after it reached here. The repair is
    left for later: the other copy's page 1 may predate the write, which this copy
    already holds and which is acknowledged once the other copy has it."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, (a, b, c), writer, reader = await written_elsewhere(nursery, 2)
            key = ChunkKey(rec.lineage, 0, rec.head)
            sim.hosts[a].store.corrupt(key, 0)
            faults = sim.hosts[c].faults
            on_call, to_b = faults.on_call, sim.hosts[b].addr
            faults.on_call = lambda address, message: (
                1.0 if address == to_b and isinstance(message, m.WriteChunk)
                else on_call(address, message))  # the write reaches b a second after a
            got = {}

            async def reads():
                await trio.sleep(0.1)
                got["read"] = extents_bytes(await call(reader.read(0, 8192)), 0, 8192)

            async with trio.open_nursery() as both:
                both.start_soon(call, writer.write(4096, b"\x03" * 4096, False))
                both.start_soon(reads)
            for h in (a, b):
                assert sim.hosts[h].store.read(key, 4096, 4096) == b"\x03" * 4096, h
            assert got["read"][:4096] == b"\x01" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_read_repair_never_writes_a_peer_generation_over_another_local_one():
    """Chunk 0 of the head was copied up (after snapshot s1) on both copies; b lost the
    head's generation (a lost index entry, which scrub records stale), and a's copy of it
    fails its checksum on page 1. The read goes to b, which answers from the snapshot's
    generation: those bytes predate the write to the head and must not be written over
    a's head generation as a repair, where they would pass every checksum from then on
    and the other copies could no longer outvote them."""
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        chain = gw.chain
        async with trio.open_nursery() as nursery:  # the lease holder completes it
            nursery.start_soon(sim.snapshot, "v", "s1")
            while gw.chain == chain:
                await sim.hosts[a].provider.sync_records()
                await trio.sleep(0.05)
        head = gw.gen
        assert head != rec.head
        await call(gw.write(4096, b"\x03" * 4096, False))  # copies chunk 0 up on a and b
        key = ChunkKey(rec.lineage, 0, head)
        sim.hosts[b].store.delete(key)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 1)
        await trio.sleep(0.01)
        try:
            await read(gw, 4096, 4096)
        except VbpError:
            pass  # (b's older bytes are no answer either: the next test)
        try:
            kept = store_a.read(key, 4096, 4096)
        except VbpError:
            return  # left for scrub: still damaged, not laundered
        assert kept == b"\x03" * 4096, "the snapshot's page was written over the head's"

    in_pool(body)


@pytest.mark.parametrize("where", ["local", "remote"])
def test_block_status_of_a_fragmented_range_answers_a_prefix(monkeypatch, where):
    """A range with more runs than STATUS_RUNS (every other page written, over 3
    chunks) gets the runs of a prefix of it, STATUS_RUNS of them, from the chunks of this
    host or of another: one request costs the event loop a bounded time however
    fragmented the range (before, 65536 runs took 59 ms of the loop; a 1 GiB request of
    written data 86 ms). The rest is asked from where the answer ends, as clients do, and
    comes out the same as if it came whole."""
    monkeypatch.setattr(gateway, "STATUS_RUNS", 100)

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 3 * MiB, replicas=2, min_size=1)
            copies = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
            host = copies[0] if where == "local" else next(h for h in sim.hosts if h not in copies)
            gw = await sim.hosts[host].provider.open_export("v")
            for off in range(0, 3 * MiB, 8192):
                await call(gw.write(off, b"\x05" * 4096, False))
            got = await call(gw.block_status(0, 3 * MiB))
            assert len(got) == 100
            assert got[:2] == [(4096, 0), (4096, gateway._HOLE_FLAGS)]
            assert all(n == 4096 for n, _ in got)
            runs, pos = [], 0
            while pos < 3 * MiB:  # a client asking again from where each answer ends
                part = await call(gw.block_status(pos, 3 * MiB - pos))
                assert 0 < len(part) <= 100
                runs += part
                pos += sum(n for n, _ in part)
            assert pos == 3 * MiB
            assert runs == [(4096, f) for _ in range(3 * MiB // 8192)
                            for f in (0, gateway._HOLE_FLAGS)]
            nursery.cancel_scope.cancel()

    run(main)


def test_read_repair_never_answers_from_a_peer_missing_the_local_generation():
    """As above: b lost the head's generation of chunk 0, a's copy of it fails its checksum
    on page 1. a knows the read resolves to the head here; b answers from the snapshot's
    generation, which predates the acknowledged write of page 1. The client must get the
    write or an error, never the snapshot's bytes."""
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        chain = gw.chain
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sim.snapshot, "v", "s1")
            while gw.chain == chain:
                await sim.hosts[a].provider.sync_records()
                await trio.sleep(0.05)
        head = gw.gen
        await call(gw.write(4096, b"\x03" * 4096, False))
        key = ChunkKey(rec.lineage, 0, head)
        sim.hosts[b].store.delete(key)
        sim.hosts[a].store.corrupt(key, 1)
        await trio.sleep(0.01)
        try:
            got = await read(gw, 4096, 4096)
        except VbpError:
            return
        assert got == b"\x03" * 4096, "the snapshot's bytes answered a read of the head"

    in_pool(body)


class _SlowMarks:
    """A registry whose stale marks take `delay` seconds to land (a slow registry)."""

    def __init__(self, reg, delay: float):
        self.reg, self.delay = reg, delay

    def __getattr__(self, name):
        return getattr(self.reg, name)

    async def mark_stale(self, *args, **kwargs):
        await trio.sleep(self.delay)
        return await self.reg.mark_stale(*args, **kwargs)


def test_read_repair_never_writes_a_stale_peers_bytes_over_an_acknowledged_write():
    """c's gateway writes page 0; b misses it and the record of b's staleness lands late
    (within write_window: the write is acknowledged). a's copy, the only current one
    holding the write, then fails its checksum on page 0 in a read by a's gateway (no
    lease) more than write_window after the write, before that gateway's 1 s stale
    refresh and b's resync pass listed the record. b answers its older bytes; written
    over a's page they pass every checksum and the acknowledged write is gone from
    every copy. A repair must only restore what a's stored checksum says."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, (a, b, c), writer, reader = await written_elsewhere(nursery, 1)
            window = sim.peer_timeout + gateway.WRITE_GRACE
            key = ChunkKey(rec.lineage, 0, rec.head)
            writer.registry = _SlowMarks(writer.registry, window - 0.5)
            sim.hosts[c].faults.partition([sim.hosts[b].addr])
            t0 = trio.current_time()
            await call(writer.write(0, b"\x03" * 4096, False))  # acknowledged: a has it
            assert [r.host_id for r in sim.reg.list_stale(rec.lineage)] == [b]
            await trio.sleep_until(t0 + window + 0.1)
            sim.hosts[a].store.corrupt(key, 0)
            try:
                await read(reader, 0, 4096)
            except VbpError:
                pass
            try:
                kept = sim.hosts[a].store.read(key, 0, 4096)
            except VbpError:
                kept = None  # left damaged, for scrub: not laundered
            assert kept in (None, b"\x03" * 4096), "b's older page was written over a's"
            nursery.cancel_scope.cancel()

    run(main)


def test_zeroing_without_holes_yields_to_the_other_clients_between_its_steps():
    """WRITE_ZEROES with NO_HOLE is written 4 MiB at a time; at replicas=1 each step
    answers at once, and 768 MiB of them held every other client of the host for half a
    second (found by a review). Each step now yields: another task runs in between."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=1, zones=1)
            await sim.start(nursery, loops=False)
            sim.create_volume("z", 64 * MiB, replicas=1)
            gw = await sim.hosts["h0"].provider.open_export("z")
            await call(gw.write(0, b"\x01" * 4096, False))  # (the lease, taken)
            turns = []
            done = trio.Event()

            async def other_client():
                while not done.is_set():
                    turns.append(None)
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(other_client)
            await trio.lowlevel.checkpoint()
            before = len(turns)
            await call(gw.write_zeroes(0, 64 * MiB, False, False, False))
            done.set()
            assert len(turns) - before >= 15, len(turns) - before  # (16 steps)
            assert await read(gw, 0, 4096) == bytes(4096)
            nursery.cancel_scope.cancel()

    run(main)
