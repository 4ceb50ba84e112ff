"""Replica.forget_recent, which every resync pass calls (once a second), looked every mark
of `recent` and `recent_before` up in the store, to drop those of chunks no longer here,
and scanned every volume's marks for those past the window. A mark is one chunk written in
the last minute (recent_window), and those of a holder that died stay until a takeover:
a volume written at random over a few hundred thousand chunks keeps that many, and the
host spent most of each second on the event loop going through them. The store's
`layout` moves whenever a chunk comes or goes: with it unchanged, no mark's chunk went,
and the marks are kept in time order, so the pass only looks at the ones the window
passed."""

from __future__ import annotations

import trio

from vbp.layout import MiB
from tests.sim.harness import Sim, run

CHUNKS = 3000
PASSES = 10


def test_forgetting_settled_marks_does_not_look_up_every_mark_every_pass():
    async def main():
        sim = Sim(7, hosts=1, capacity=2 * CHUNKS * MiB)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=1, chunk_size=MiB)
            h = sim.hosts["h0"]

            def write(i):
                h.replica.write("v", rec.lineage, i, rec.head, rec.chain, 0, b"x" * 4096,
                                MiB, 0, False, h.cluster.epoch, 1)
            for i in range(CHUNKS):
                write(i)
            lookups = 0
            lookup = h.store.lookup

            def counted(key):
                nonlocal lookups
                lookups += 1
                return lookup(key)
            h.store.lookup = counted
            for p in range(PASSES):
                await trio.sleep(1)
                for i in range(p, CHUNKS, 97):  # overwrites: no chunk comes or goes
                    write(i)
                h.replica.forget_recent()
            # nothing was past the window yet: every mark is still there
            assert h.replica.recently_written(rec.lineage, rec.head) == list(range(CHUNKS))
            assert lookups <= 2 * CHUNKS, lookups
            # a minute later the marks the holder's last write shows settled go
            await trio.sleep(h.replica.recent_window)
            write(0)
            h.replica.forget_recent()
            assert h.replica.recently_written(rec.lineage, rec.head) == [0]
            nursery.cancel_scope.cancel()

    run(main)
