"""Review of replicator/recovery.py (branch rev-rec): resync against garbage collection's
collected-generation marks and the `written` notes. Sim hosts on a virtual clock, their
background loops off: each step is the test's."""

from __future__ import annotations

import time

import pytest
import trio

from control import api
from vbp.errors import NotFound
from vbp.layout import MiB
from tests.sim.harness import Sim, run


def test_a_generation_resync_drops_as_collected_on_its_source_is_marked_here_too():
    """Review (rev-rec): _drop_divergent deleted a generation its source's GC collected
    without marking it (ChunkStore.mark_collected), so a current copy answered a reader
    whose chain holds that generation with the older generation's bytes where the source
    answers NotFound. The resync now takes the source's marks (CollectedGens) first."""
    async def main():
        sim = Sim(7, hosts=2)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=2, chunk_size=MiB)
            lin, g1 = rec.lineage, rec.head
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            old, new = b"A" * 4096, b"B" * 4096
            sim.write_copies("v", old, (g1,))
            g2 = sim.snapshot_now("v", "s")
            sim.write_copies("v", new, (g1, g2))
            sim.clone("v@s", "c")  # keeps the lineage and g1 read
            # h1 misses some later write of the clone's chunk: recorded stale (any reason)
            sim.reg.mark_stale(lin, 0, ["h1"], time.time_ns())
            api.delete_volume(sim.reg, "v", force=True)  # g2: v's head, read by nobody now
            assert await h0.collect_garbage() == 1  # h0 marks g2 collected and frees it
            assert g2 in h0.store.collected_gens[lin]
            await trio.sleep(10)  # past the resync's write window
            await h1.resync.run_once()  # drops g2 (its source lacks it) and clears
            assert not sim.reg.list_stale(lin)
            assert sorted(k.gen for k in h1.store.keys(lin)) == [g1]
            # a gateway that reads v on, not having heard of the delete: h0 says gone
            with pytest.raises(NotFound):
                h0.replica.read(lin, 0, (g1, g2), 0, 4096)
            # h1, as current as h0, must answer the same, not v's snapshot-time bytes
            with pytest.raises(NotFound):
                h1.replica.read(lin, 0, (g1, g2), 0, 4096)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_repair_never_undoes_a_write_whose_note_a_resync_pass_forgot():
    """Review (rev-rec): Resync.run_once forgets Replica.written notes older than its pass
    start less write_window, but VolumeGateway._repair_local counts on the notes back to
    the read's start less write_window: a pass that started while the repairing read was
    under way dropped the note of a write that landed here, and the repair wrote the
    peer's older bytes over it (an acknowledged write lost on a copy counted current).
    A repair whose notes may be partly forgotten (Replica.forgotten_until) is skipped."""
    from replicator import messages as m
    from tests.sim.harness import call, extents_bytes
    from vbp.layout import ChunkKey

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=4, zones=4)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2)
            a, d, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            c = next(h for h in sim.hosts if h not in (a, b, d))
            writer = await sim.hosts[c].provider.open_export("v")
            await call(writer.write(0, b"\x01" * 8192, False))
            reader = await sim.hosts[a].provider.open_export("v")  # no lease: it reads
            key = ChunkKey(rec.lineage, 0, rec.head)
            sim.hosts[a].store.corrupt(key, 0)  # a's page 0 fails its checksum
            window = sim.hosts[a].resync.write_window
            to_d = sim.hosts[d].addr
            # the write of page 1 reaches a and b at once, d late; the reader's ask of d
            # (its first remote copy) is answered late too, before the write is there. In
            # production: the first copy asked times out (a request timeout), the next
            # answers ~1 s later.
            for h, kind, delay in ((c, m.WriteChunk, window + 1.0), (a, m.ReadChunk, window + 0.05)):
                faults = sim.hosts[h].faults
                faults.on_call = (lambda on_call, kind, delay: lambda address, message: (
                    delay if address == to_d and isinstance(message, kind)
                    else on_call(address, message)))(faults.on_call, kind, delay)
            got = {}

            async def reads():
                await trio.sleep(0.1)
                got["read"] = extents_bytes(await call(reader.read(0, 8192)), 0, 8192)

            async def resync_pass():  # a's resync loop: a pass a second, nothing stale
                await trio.sleep(window + 0.1)
                await sim.hosts[a].resync.run_once()

            async with trio.open_nursery() as all_:
                all_.start_soon(call, writer.write(4096, b"\x03" * 4096, False))  # acknowledged
                all_.start_soon(reads)
                all_.start_soon(resync_pass)
            assert not sim.reg.list_stale(rec.lineage)  # every copy current
            for h in (b, d, a):
                assert sim.hosts[h].store.read(key, 4096, 4096) == b"\x03" * 4096, (
                    h, (a, b, d), sim.hosts[h].store.read(key, 4096, 4), got["read"][4096:4100])
            nursery.cancel_scope.cancel()

    run(main)


def test_a_source_below_the_collected_revision_is_not_asked_for_its_marks():
    """CollectedGens goes only to hosts of PEER_REV 8 or later (COLLECTED_REV): an older
    host would refuse the frame, failing the resync; from it no marks come."""
    from types import SimpleNamespace

    from replicator import messages as m
    from replicator.gateway import ClusterView
    from replicator.recovery import Resync
    from vbp.cluster import ClusterMap, HostRecord

    asked = []

    class Pool:
        async def call(self, addr, msg):
            asked.append((addr, msg))
            return m.Gens((4,))

    def resync(rev):
        hosts = (HostRecord("h0", "h0:1", "h0:2", peer_rev=rev),)
        return SimpleNamespace(cluster=ClusterView(ClusterMap(1, hosts)), pool=Pool())

    async def main():
        assert await Resync._collected_on(resync(m.COLLECTED_REV - 1), "h0:1", "lin") == ()
        assert asked == []
        assert await Resync._collected_on(resync(m.COLLECTED_REV), "h0:1", "lin") == (4,)
        assert asked == [("h0:1", m.CollectedGens("lin"))]

    trio.run(main)


def test_a_resync_looks_up_the_chunks_own_generations_not_every_key_of_the_store():
    """_drop_divergent listed every chunk of the store (ChunkStore.keys) for each chunk it
    resynced, to find that chunk's generations: with a million chunks held, about 25 ms
    of the event loop per chunk, so a pass over many stale chunks stalled every client of
    the host. It asks the store for the chunk's generations (ChunkStore.gens)."""
    async def main():
        sim = Sim(7, hosts=2)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 4 * MiB, replicas=2, chunk_size=MiB)
            lin = rec.lineage
            h1 = sim.hosts["h1"]
            sim.write_copies("v", b"A" * 4096, (rec.head,))
            sim.reg.mark_stale(lin, 0, ["h1"], time.time_ns())
            listed = []
            keys = h1.store.keys

            def spy(lineage=None):
                listed.append(lineage)
                return keys(lineage)
            h1.store.keys = spy
            await trio.sleep(10)  # past the resync's write window
            await h1.resync.run_once()
            assert not sim.reg.list_stale(lin)
            assert listed.count(lin) == 0, listed
            nursery.cancel_scope.cancel()

    run(main)
