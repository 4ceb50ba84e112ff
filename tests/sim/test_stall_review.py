"""A gateway that stalls (SIGSTOP, a VM pause of its host, a long GC pause) past its lease
while writes of its are in flight: sim hosts on a virtual clock.

When it resumes, the peer requests of those writes time out at once (their deadlines
passed during the stall), and it settles them as if it still held the lease. Meanwhile
another host took the lease over and wrote."""

from __future__ import annotations

import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.errors import VbpError
from vbp.layout import MiB


def test_a_gateway_deposed_during_a_stall_does_not_record_the_new_holders_copies_stale():
    """h0 holds v's lease; a write of its leaves for h1 and h2 and h0 stalls: its frames
    are not answered within the peer timeout (they are lost here), its lease runs out, and
    h1 takes it over (h0 unreachable from h1: its announcement is lost) and writes "B" to
    the same chunk on h1 and h2, recording h0 stale. h0's requests then time out and it
    recorded the copies that missed its write, h1 and h2, stale: every copy of the chunk
    was stale, and the new holder's reads and writes of it failed (EIO) until an election
    among all-stale copies could run, with h0 up again. A deposed gateway's marks are
    refused now (the lease is compared in the mark's transaction): it is fenced, and only
    the copies that took its write (h0's own) are recorded stale, as for any write of a
    gateway that lost its lease."""
    async def main():
        sim = Sim(7, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 2 * MiB, replicas=3, min_size=2)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            w0 = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(w0.write(0, b"A" * 4096, False)))  # the lease

            # h0 stalls with its write in flight: no answer comes within the peer timeout
            h0.faults.drop_probability = 1.0
            outcome: list = []

            async def stalled_write() -> None:
                try:
                    await h0.run_on(lambda: call(w0.write(0, b"W" * 4096, False)))
                    outcome.append(None)
                except VbpError as e:
                    outcome.append(e)

            nursery.start_soon(stalled_write)
            await trio.sleep(0.1)
            sim.expire_lease("v")  # h0's lease ran out during the stall
            h1.faults.partition([h0.addr])  # and h0 does not answer
            w1 = await h1.run_on(h1.provider.open_export, "v")
            await h1.run_on(lambda: call(w1.write(0, b"B" * 4096, False)))  # takes it over
            while not outcome:  # h0 resumes: its requests time out
                await trio.sleep(0.1)
            assert outcome[0] is not None  # never acknowledged
            stale = {r.host_id for r in sim.reg.list_stale(rec.lineage, 0)}
            assert stale == {"h0"}, f"copies recorded stale: {sorted(stale)}"
            w1.stale = await h1.run_on(h1.stale_map, rec.lineage)  # (the 1 s refresh)
            await h1.run_on(lambda: call(w1.write(4096, b"C" * 4096, False)))
            got = extents_bytes(await h1.run_on(lambda: call(w1.read(0, 8192))), 0, 8192)
            assert got == b"B" * 4096 + b"C" * 4096
            nursery.cancel_scope.cancel()

    run(main)
