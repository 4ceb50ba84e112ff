"""A scrub pass's listing of the chunks it checks ran on the event loop in one go: the
placement of every chunk held, twice (ClusterView.replicas, about 7 µs a chunk when not
cached) and a sort of every key. With a million chunks that is 15 s or more in which the
host answers no NBD request and no peer, once a day (scrub_interval). It now lets the
other tasks run every few hundred chunks."""

from __future__ import annotations

import trio

from replicator.scrub import Scrubber
from vbp.layout import MiB
from tests.sim.harness import Sim, run

CHUNKS = 3000


def test_a_scrub_pass_lets_other_tasks_run_while_it_lists_the_chunks():
    async def main():
        sim = Sim(3, hosts=1, capacity=2 * CHUNKS * MiB)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=1, chunk_size=MiB)
            h = sim.hosts["h0"]
            for i in range(CHUNKS):
                h.replica.write("v", rec.lineage, i, rec.head, rec.chain, 0, b"x" * 4096,
                                MiB, 0, False, h.cluster.epoch, 1)
            ticks = 0
            stop = trio.Event()

            async def ticker():
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await trio.lowlevel.checkpoint()
            placed = []  # the ticker's count at each placement the pass asks for
            replicas = h.cluster.replicas

            def spy(lineage, index, n):
                placed.append(ticks)
                return replicas(lineage, index, n)
            h.cluster.replicas = spy
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            s = Scrubber(h.id, h.replica, h.cluster, h.pool, h.registry, settle=0)
            report = await s.run_pass()
            stop.set()
            assert report.chunks_total == CHUNKS
            assert len(placed) >= 2 * CHUNKS
            # the longest run of placements with no other task in between
            longest = run_ = 1
            for a, b in zip(placed, placed[1:]):
                run_ = run_ + 1 if a == b else 1
                longest = max(longest, run_)
            assert longest <= 1024, longest
            nursery.cancel_scope.cancel()

    run(main)
