"""A resync pass started one trio task per stale record of this host at once, each then
waiting on the pass's limiter (`parallel` chunks at a time) or returning when the pass
time was up. A host recorded stale for tens of thousands of chunks (a host added to the
pool, the joining target of every chunk moving to it; a host back from a long outage)
spawned that many tasks every pass (the test: a few thousand), a second apart: seconds of the event loop in which
no NBD request or peer call is answered, and the memory of every task's frame for the
whole pass. A pass now runs `parallel` workers that take the records in turn."""

from __future__ import annotations

import time

import trio
import trio.abc

from vbp.layout import MiB
from tests.sim.harness import Sim, run

RECORDS = 3000


class _Spawns(trio.abc.Instrument):
    def __init__(self):
        self.count = 0

    def task_spawned(self, task):
        self.count += 1


def test_a_resync_pass_spawns_a_bounded_number_of_tasks_for_many_stale_records():
    async def main():
        sim = Sim(5, hosts=2, capacity=64 * MiB)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", RECORDS * MiB, replicas=2, chunk_size=MiB)
            h = sim.hosts["h0"]
            now = time.time_ns()
            for i in range(RECORDS):
                sim.reg.mark_stale(rec.lineage, i, ["h0"], now)
            h.resync.pass_time = -1.0  # the pass's time is up: it starts no chunk
            spawns = _Spawns()
            trio.lowlevel.add_instrument(spawns)
            try:
                assert await h.resync.run_once() == 0
            finally:
                trio.lowlevel.remove_instrument(spawns)
            assert len(sim.reg.list_stale()) == RECORDS
            assert spawns.count <= h.resync.parallel + 2, spawns.count
            nursery.cancel_scope.cancel()

    run(main)
