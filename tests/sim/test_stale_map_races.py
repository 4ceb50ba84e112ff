"""A gateway's map of stale copies against the registry's records, when a mark (a write
that failed on a copy) is begun and done while a read of the records is out: the read
may predate the mark, and the copy must stay behind all the same (found by a review).

The copy is one our map named already (an earlier failure), whose record a resync has
just cleared: the read finds no record, the mark that follows it is in `_marking` no
more, and the map gained nothing new. Each of the three readers of the records lost it:
- refresh_stale (every second): the holder then reads the acknowledged write's old bytes
  from that copy until the next refresh;
- _behind_by_registry (a write that our map says falls short): the copy counts toward
  min_size while it misses an acknowledged write;
- _current_after_failure (a write that failed somewhere): the copy carries the write as
  current."""

from __future__ import annotations

import time

import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.layout import MiB


async def cleared_copy(nursery):
    """A started 4-host sim, volume v (replicas 3, min_size 2) written through a host
    holding no copy of chunk 0 (so every read goes to a copy); the first copy reads ask
    (`victim`) went stale once, and its resync cleared the record, while the gateway's map
    still names it. (sim, gateway's host, gateway, victim)."""
    sim = Sim(3, hosts=4, zones=4, lease_ttl=60.0)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=3, min_size=2, chunk_size=MiB)
    copies = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
    g = sim.hosts[next(h for h in sim.hosts if h not in copies)]
    victim = sim.hosts[copies[0]]
    gw = await g.run_on(g.provider.open_export, "v")
    await g.run_on(lambda: call(gw.write(0, b"A" * 4096, False)))
    sim.reg.mark_stale(rec.lineage, 0, [victim.id], time.time_ns())
    gw.stale = await g.stale_map(rec.lineage)
    await trio.sleep(10)  # past the resync's write window
    await victim.run_on(victim.resync.run_once)
    assert not sim.reg.list_stale(rec.lineage) and victim.id in gw.stale[0]
    return sim, g, gw, victim


def test_a_refresh_keeps_a_copy_marked_while_its_read_was_out():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, g, gw, victim = await cleared_copy(nursery)

            async def read(lineage):
                fresh = await g.stale_map(lineage)  # the records as the read saw them
                # while the answer is on its way, a write fails on the victim, its mark
                # lands, and the two others acknowledge it
                g.faults.partition([victim.addr])
                await call(gw.write(0, b"B" * 4096, False))
                g.faults.heal()
                return fresh

            await g.run_on(gw.refresh_stale, read)
            assert [r.host_id for r in sim.reg.list_stale(gw.lineage, 0)] == [victim.id]
            assert victim.id in gw.stale.get(0, ()), gw.stale
            got = extents_bytes(await g.run_on(lambda: call(gw.read(0, 4096))), 0, 4096)
            assert got == b"B" * 4096, f"acknowledged write not read back: {got[:4]!r}"
            nursery.cancel_scope.cancel()

    run(main)


def marking_during_the_read(gw, victim):
    """gw's registry, whose list_stale reads the records, then has gw mark `victim` stale
    (begun and done) before it answers what it read."""
    real = gw.registry.list_stale

    async def list_stale(*args):
        records = await real(*args)
        await gw._mark_stale(0, [victim.id])
        return records

    gw.registry.list_stale = list_stale


def test_the_check_of_a_short_write_keeps_a_copy_marked_while_its_read_was_out():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, g, gw, victim = await cleared_copy(nursery)
            marking_during_the_read(gw, victim)
            behind = await g.run_on(gw._behind_by_registry, 0, set())
            assert victim.id in behind and victim.id in gw.stale[0], (behind, gw.stale)
            nursery.cancel_scope.cancel()

    run(main)


def test_the_check_after_a_failure_does_not_count_a_copy_marked_while_its_read_was_out():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, g, gw, victim = await cleared_copy(nursery)
            marking_during_the_read(gw, victim)
            current = await g.run_on(gw._current_after_failure, 0, [victim.id])
            assert current == [], current
            nursery.cancel_scope.cancel()

    run(main)


def test_reads_of_the_records_that_overlap_end_in_any_order():
    """Two reads out at once, the second ending first, then a mark, then the first: each
    read's own marks set goes with it. Taken out by equality (list.remove), the second
    read's end took the first read's empty set, a mark then went to the second's, and
    the first read's end raised ValueError, failing a client's write (seen in CI, a
    gateway killed under an import)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, g, gw, victim = await cleared_copy(nursery)
            first = gw._marks_during()
            seen_first = first.__enter__()
            with gw._marks_during():
                pass
            await g.run_on(gw._mark_stale, 0, [victim.id])
            first.__exit__(None, None, None)
            assert seen_first == {0: {victim.id}} and gw._reads == []
            nursery.cancel_scope.cancel()

    run(main)
