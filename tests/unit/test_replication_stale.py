"""Stale copies in the write path (replicator/gateway.py) and in resync
(replicator/recovery.py), over in-memory hosts of the simulation harness (tests/sim) with
its background loops off, on a virtual clock: each step is driven by hand.

The bug these pin down (found by sim seeds 2, 11, 17, 22): a write that only a copy already
recorded stale took was acknowledged, and the current copy that missed it was recorded
stale too; with every copy of a chunk stale, resync found no source, the records stayed
forever and the copy that missed an acknowledged write could serve it."""

from __future__ import annotations

import errno
import functools
import itertools
import time
from dataclasses import replace as dc_replace

import pytest
import trio
import trio.testing

from replicator import messages as m
from replicator.gateway import WRITE_GRACE
from replicator.recovery import NEVER_CURRENT
from replicator.scrub import Scrubber, ScrubReport
from tests.sim.harness import Sim, WhileClearing, call, extents_bytes
from vbp.errors import BelowMinSize, RegistryUnavailable, VbpError
from vbp.later import Later
from vbp.layout import MiB, ChunkKey


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


async def two_replicas(nursery, hosts: int = 3):
    """A started sim of `hosts` hosts and a 1 MiB volume with replicas=2, min_size=1, its
    gateway on the first host holding no copy (every write crosses the network)."""
    sim = Sim(1, hosts=hosts, zones=hosts)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=2, min_size=1)
    a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
    gw_host = next(h for h in sim.hosts.values() if h.id not in (a, b))
    gw = await gw_host.provider.open_export("v")
    return sim, rec, gw, a, b


def stale_hosts(sim, lineage):
    return {r.host_id for r in sim.reg.list_stale(lineage)}


async def resync_until_current(sim, rec, host: str) -> None:
    """Run `host`'s resync passes, a write window apart, until no copy of the volume's
    lineage is recorded stale (three at most)."""
    resync = sim.hosts[host].resync
    for _ in range(3):
        await trio.sleep(resync.write_window)  # the writes have settled
        await resync.run_once()
        if not stale_hosts(sim, rec.lineage):
            break
    assert not stale_hosts(sim, rec.lineage)


async def a_missed_a_write(sim, rec, gw, a, first: int):
    """Write `first` bytes of 1s to chunk 0, then 4 KiB of 2s while the gateway is cut from
    `a` (acknowledged by the other copy alone, `a` recorded stale); healed again. Returns
    the gateway host's fault policy."""
    await call(gw.write(0, b"\x01" * first, False))
    gw_faults = sim.hosts[gw.host_id].faults
    gw_faults.partition([sim.hosts[a].addr])
    await call(gw.write(0, b"\x02" * 4096, False))  # acknowledged by b alone
    assert stale_hosts(sim, rec.lineage) == {a}
    gw_faults.heal()
    return gw_faults


def test_a_write_only_a_stale_copy_took_is_not_acknowledged_and_the_current_copy_stays_current():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            gw_faults = await a_missed_a_write(sim, rec, gw, a, 4096)
            gw_faults.partition([sim.hosts[b].addr])
            try:
                await call(gw.write(0, b"\x03" * 4096, False))
            except BelowMinSize:
                pass
            else:
                raise AssertionError("a write only a stale copy took was acknowledged")
            # b holds every acknowledged write: it stays the source, not recorded stale
            assert stale_hosts(sim, rec.lineage) == {a}
            gw_faults.heal()
            await trio.sleep(sim.hosts[a].resync.write_window)  # the writes have settled
            await sim.hosts[a].resync.run_once()
            assert not stale_hosts(sim, rec.lineage)
            key = ChunkKey(rec.lineage, 0, rec.head)
            assert sim.hosts[a].store.read(key, 0, 4096) == sim.hosts[b].store.read(key, 0, 4096)
            nursery.cancel_scope.cancel()

    run(main)


def test_resync_with_every_copy_stale_brings_the_chunk_to_the_copy_that_went_stale_last():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 8192, False))
            key = ChunkKey(rec.lineage, 0, rec.head)
            # b misses an acknowledged write (a took it) and is recorded stale, then a is
            # recorded stale too, as gateways of two volumes of one lineage can leave them
            sim.hosts[a].store.write(key, 0, b"\x07" * 4096, chunk_size=MiB)
            sim.reg.mark_stale(rec.lineage, 0, [b], 1)
            sim.reg.mark_stale(rec.lineage, 0, [a], 1)
            for h in (a, b):
                await sim.hosts[h].resync.refresh_stale_self()
            await trio.sleep(sim.hosts[b].resync.write_window)  # the writes have settled
            await sim.hosts[b].resync.run_once()
            await sim.hosts[a].resync.run_once()
            assert not stale_hosts(sim, rec.lineage)
            for h in (a, b):
                assert sim.hosts[h].store.read(key, 0, 8192) == b"\x07" * 4096 + b"\x01" * 4096
            nursery.cancel_scope.cancel()

    run(main)


async def resync_to(sim, rec, stale: str, current: str, want: bytes) -> None:
    """Once the writes have settled, `stale` resyncs chunk 0: no record is left and both
    copies hold `want` in its first page."""
    await trio.sleep(sim.hosts[stale].resync.write_window)
    await sim.hosts[stale].resync.run_once()
    assert not stale_hosts(sim, rec.lineage)
    key = ChunkKey(rec.lineage, 0, rec.head)
    assert sim.hosts[stale].store.read(key, 0, 4096) == sim.hosts[current].store.read(key, 0, 4096) == want


class _OnListStale:
    """The gateway's registry with `hook()` run when list_stale is first called, before
    it answers: another write of the gateway going on meanwhile, or a failure raised."""

    def __init__(self, registry, hook):
        self.registry = registry
        self.hook = hook

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def list_stale(self, *args):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return await self.registry.list_stale(*args)


def _unreadable() -> None:
    raise RegistryUnavailable("list_stale: registry unreachable (test)")


def test_a_write_no_current_copy_took_records_the_copies_that_took_it_whatever_the_stale_map_said():
    """Sim seed 12: a resync cleared a copy's record, the gateway's stale map (refreshed
    about once a second) still named it, so a write it took counted it behind; the current
    copy failed the write and stayed current (unrecorded), and the two copies disagreed
    with no record left to reconcile them. Here the registry cannot be asked which copies
    are stale (otherwise it answers that `a` is current: the next test), so the map
    stands and the write fails."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            gw.stale[0] = frozenset({a})  # the record is gone, the map has not heard yet
            gw.registry = _OnListStale(gw.registry, _unreadable)
            sim.hosts[gw.host_id].faults.partition([sim.hosts[b].addr])
            try:
                await call(gw.write(0, b"\x02" * 4096, False))
            except BelowMinSize:
                pass
            else:
                raise AssertionError("a write no current copy took was acknowledged")
            assert stale_hosts(sim, rec.lineage) == {a}  # a holds bytes b lacks
            gw.registry = gw.registry.registry
            sim.hosts[gw.host_id].faults.heal()
            await resync_to(sim, rec, a, b, b"\x01" * 4096)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_the_stale_map_still_names_but_the_registry_cleared_counts_toward_min_size():
    """Thrash seed 549: a joining target resynced (its record cleared) as the data-set
    change settled; the gateway's stale map, refreshed once a second, still named it when
    another copy's host was killed, and the write failed below min_size although the copy
    that took it was current. A write our map counts short asks the registry."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            gw.stale[0] = frozenset({a})  # the record is gone, the map has not heard yet
            sim.hosts[gw.host_id].faults.partition([sim.hosts[b].addr])
            await call(gw.write(0, b"\x02" * 4096, False))  # a is current: it stands
            assert stale_hosts(sim, rec.lineage) == {b}
            assert gw.stale[0] == {b}
            sim.hosts[gw.host_id].faults.heal()
            await sim.hosts[b].resync.refresh_stale_self()
            await resync_to(sim, rec, b, a, b"\x02" * 4096)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("how", ["marking", "unrecorded"])
def test_a_copy_whose_stale_mark_is_not_in_the_registry_yet_stays_behind(how):
    """The registry shows no record for `a`, but one is on its way: this gateway's mark
    still awaiting the registry (another write's failure, `_marking`), or one the registry
    could not be told (`unrecorded`). `a` may miss that write: the write `a` alone took
    is not acknowledged."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            gw.stale[0] = frozenset({a})
            if how == "marking":
                gw._marking[0] = {a: 1}
            else:
                gw.unrecorded.append((0, (b,), (a,)))
            sim.hosts[gw.host_id].faults.partition([sim.hosts[b].addr])
            with pytest.raises(BelowMinSize):
                await call(gw.write(0, b"\x02" * 4096, False))
            assert a in gw.stale[0]
            nursery.cancel_scope.cancel()

    run(main)


def test_the_stale_map_keeps_what_other_writes_added_while_the_registry_was_read():
    """Only hosts our map named before the read can be cleared by it: one a concurrent
    failure added meanwhile (its mark may have landed after the read) stays."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            gw.stale[0] = frozenset({a})  # the record is gone, the map has not heard yet

            def concurrent_failure():
                gw.stale[0] = gw.stale[0] | {"h-other"}

            gw.registry = _OnListStale(gw.registry, concurrent_failure)
            sim.hosts[gw.host_id].faults.partition([sim.hosts[b].addr])
            await call(gw.write(0, b"\x02" * 4096, False))  # a is current: it stands
            assert a not in gw.stale[0] and {"h-other", b} <= gw.stale[0]
            nursery.cancel_scope.cancel()

    run(main)


def test_the_periodic_refresh_keeps_what_this_gateway_added_during_its_read():
    """The service's refresh replaces our map with the registry's records read a moment
    ago: a host this gateway marked meanwhile (or is marking) stays in it, a host the
    registry cleared goes."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            gw.stale = {0: frozenset({a}), 1: frozenset({b})}
            before = dict(gw.stale)
            gw.stale = {**gw.stale, 2: frozenset({a})}  # a failure during the read
            gw._marking[3] = {b: 1}  # a mark under way
            gw.adopt_stale(before, {1: frozenset({b})})  # the registry cleared a's record of 0
            assert gw.stale == {1: frozenset({b}), 2: frozenset({a}), 3: frozenset({b})}
            gw._marking.clear()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_that_says_it_is_stale_stays_behind_whatever_the_registry_says():
    """A replica's own word that its copy is stale (a host that lost its store knows before
    the registry does) is not overruled by the registry: the write falls short."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            sim.hosts[a].replica.backfilling = True  # every copy of a counts as stale
            gw.stale[0] = frozenset({a})
            sim.hosts[gw.host_id].faults.partition([sim.hosts[b].addr])
            with pytest.raises(BelowMinSize):
                await call(gw.write(0, b"\x02" * 4096, False))
            nursery.cancel_scope.cancel()

    run(main)


class _AfterGens:
    """A peer pool that runs `hook` once, right after the first ChunkGens reply: the
    moment a resync has learned which generations its source holds."""

    def __init__(self, pool, hook):
        self.pool = pool
        self.hook = hook

    async def call(self, address, msg):
        reply = await self.pool.call(address, msg)
        if isinstance(msg, m.ChunkGens) and self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()
        return reply


async def snapshot_v(sim, gw) -> None:
    """Snapshot volume v (s0), completed by `gw`'s host, the lease holder (its record sync
    is a background loop, off here: driven by hand)."""
    provider = sim.hosts[gw.host_id].provider
    async with trio.open_nursery() as n:
        n.start_soon(sim.snapshot, "v", "s0")
        while not sim.volume("v").snapshots:
            await provider.sync_records()
            await trio.sleep(0.05)


async def snapshot_then_write(sim, gw) -> None:
    """Snapshot volume v (s0), then write 4 KiB of 3s at 4096 through `gw`: the new head's
    first write, which copies the chunk up on its copies."""
    await snapshot_v(sim, gw)
    await call(gw.write(4096, b"\x03" * 4096, False))


def test_a_generation_created_during_a_resync_is_brought_current_too():
    """Sim seed 2 with eight chunks resynced at once: a snapshot and a write made a new
    generation of a chunk while the stale copy's resync of that chunk was under way. The
    stale copy copied it up from its own stale base; the resync compared only the
    generations the source held when it began, cleared the record, and the new head
    served the stale base's bytes under the acknowledged write."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await a_missed_a_write(sim, rec, gw, a, 8192)
            await trio.sleep(sim.hosts[a].resync.write_window)  # the writes have settled
            resync = sim.hosts[a].resync
            resync.pool = _AfterGens(resync.pool, functools.partial(snapshot_then_write, sim, gw))
            for _ in range(3):
                await resync.run_once()
                if not stale_hosts(sim, rec.lineage):
                    break
                await trio.sleep(resync.write_window)
            assert not stale_hosts(sim, rec.lineage)
            head = sim.volume("v")
            assert head.head != rec.head
            for h in (a, b):
                got = sim.replica_bytes(sim.hosts[h], head, head.chain, 0)[:8192]
                assert got == b"\x02" * 4096 + b"\x03" * 4096, h
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("version", [1, NEVER_CURRENT])
def test_a_generation_made_while_a_resync_clears_its_record_leaves_the_copy_stale(version):
    """The last pass of a resync found nothing to copy; while the record was being cleared,
    a snapshot's first write reached the stale copy. Made there from the copy's stale
    base, that generation would hold its bytes under the acknowledged write with no
    record left to bring it current. The copy refuses to make it; the copy stays recorded
    stale (also under a backfill's NEVER_CURRENT record, which no failure moves) and the
    next resync brings the new generation."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 8192, False))
            gw_faults = sim.hosts[gw.host_id].faults
            gw_faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x02" * 4096, False))  # acknowledged by b alone
            gw_faults.heal()
            sim.reg.mark_stale(rec.lineage, 0, [a], version)
            await trio.sleep(sim.hosts[a].resync.write_window)  # the writes have settled
            resync = sim.hosts[a].resync
            resync.registry = WhileClearing(resync.registry,
                                             functools.partial(snapshot_then_write, sim, gw))
            await resync.run_once()
            assert stale_hosts(sim, rec.lineage) == {a}
            assert not sim.hosts[a].replica.resyncing and not sim.hosts[a].replica.refused
            await trio.sleep(resync.write_window)
            await resync.run_once()
            assert not stale_hosts(sim, rec.lineage)
            head = sim.volume("v")
            for h in (a, b):
                got = sim.replica_bytes(sim.hosts[h], head, head.chain, 0)[:8192]
                assert got == b"\x02" * 4096 + b"\x03" * 4096, h
            nursery.cancel_scope.cancel()

    run(main)


def test_a_generation_of_holes_only_is_made_on_the_stale_copy_too():
    """Sim seed 0 (once the simulated registry answered after a checkpoint, as a worker
    thread does): after a snapshot, the new head's first request zeroed every written page
    of a chunk while one copy was cut off. The current copy's new generation held holes
    only, so the resync found no page to copy and never made that generation on the stale
    copy, whose reads then fell through to the snapshot's generation: the acknowledged
    zeros read back as the old bytes."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 8192, False))
            await snapshot_v(sim, gw)
            gw_faults = sim.hosts[gw.host_id].faults
            gw_faults.partition([sim.hosts[a].addr])
            await call(gw.write_zeroes(0, 8192, False, True, False))  # acknowledged by b alone
            assert stale_hosts(sim, rec.lineage) == {a}
            gw_faults.heal()
            head = sim.volume("v")
            new = ChunkKey(rec.lineage, 0, head.head)
            assert not any(sim.hosts[b].store.page_checksums(new)[1])  # holes only
            assert sim.hosts[a].store.info(new) is None
            await resync_until_current(sim, rec, a)
            snap = head.snapshots[0]
            for h in (a, b):
                assert sim.replica_bytes(sim.hosts[h], head, head.chain, 0)[:8192] == bytes(8192), h
                assert sim.replica_bytes(sim.hosts[h], head, snap.chain, 0)[:8192] == b"\x01" * 8192, h
            got = extents_bytes(await call(gw.read(0, 8192)), 0, 8192)
            assert got == bytes(8192)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("new_address", [False, True])
def test_a_flush_answered_by_a_restarted_copy_counts_it_as_failed(new_address):
    """Sim seed 167 (with takeovers): a write that only copy b took (a failed it and was
    recorded stale; min_size 1) was acknowledged, then b crashed before any flush and came
    back. The next flush went to b, whose new process answered it: the flush succeeded over
    a write b no longer had. A flush answered over a connection that broke after the write
    now counts as failed; with no other current copy that is below min_size, an error."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await a_missed_a_write(sim, rec, gw, a, 4096)  # b alone took the 2s
            sim.crash(b)
            if new_address:  # (a port picked at start, a new IP): any address counts
                sim.hosts[b].addr = f"{b}:7001"
            await sim.restart(b)
            sim.sync_maps()
            with pytest.raises(BelowMinSize):
                await call(gw.flush())
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_holds_on_the_copy_that_did_not_restart():
    """Both copies took the write; b restarted before the flush. The flush holds on a
    (min_size 1), b stays stale for the chunk until resync brings it the write; flushes
    with no restart in between record nothing."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            await call(gw.write(0, b"\x02" * 4096, False))
            await call(gw.flush())
            assert not stale_hosts(sim, rec.lineage)
            await call(gw.write(0, b"\x03" * 4096, False))
            sim.crash(b)
            await sim.restart(b)
            sim.sync_maps()
            await call(gw.flush())
            assert stale_hosts(sim, rec.lineage) == {b}
            await resync_until_current(sim, rec, b)
            key = ChunkKey(rec.lineage, 0, rec.head)
            assert sim.hosts[b].store.read(key, 0, 4096) == b"\x03" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_write_answered_after_a_flush_began_is_flushed_by_the_next_one_cleanly():
    """Writes and flushes overlap (QD > 1): a write sent before a flush began and answered
    after it belongs to the next flush, which must not take it for one taken before a
    connection broke (nothing broke: no copy is recorded stale)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            faults = sim.hosts[gw.host_id].faults
            faults.delay_probability, faults.max_delay = 1.0, 0.2
            done = trio.Event()

            async def write():
                await call(gw.write(4096, b"\x02" * 4096, False))
                done.set()

            nursery.start_soon(write)
            await trio.sleep(0.001)  # sent, its answer delayed
            assert not done.is_set()
            await call(gw.flush())  # began before the write was answered
            await done.wait()
            faults.delay_probability = 0.0
            await call(gw.flush())
            assert not stale_hosts(sim, rec.lineage)
            nursery.cancel_scope.cancel()

    run(main)


def test_writes_taken_after_a_restart_are_not_doubted_by_the_next_flush():
    """b restarted with nothing unflushed; the writes after that went to its new process.
    The next flush must not count b as failed: it would need the registry to record a
    needless stale copy (tests/faults/test_etcd_pool.py flushes while etcd is paused)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.flush())
            sim.crash(b, declare_down=False)
            await sim.restart(b)
            await call(gw.write(0, b"\x02" * 4096, False))  # over a new connection
            await call(gw.flush())
            assert not stale_hosts(sim, rec.lineage)
            nursery.cancel_scope.cancel()

    run(main)


def test_what_a_resync_copied_survives_a_power_loss_once_the_copy_is_current():
    """Sim seed 632: a resync copied a chunk's pages and cleared the record without a sync;
    the host lost power, came back with the pages unwritten, and, every copy of the chunk
    being stale by then, was elected the copy the others resync from: acknowledged bytes
    gone everywhere. The resync flushes the store before it clears the record."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 65536, False))
            await call(gw.flush())
            gw_faults = sim.hosts[gw.host_id].faults
            gw_faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x02" * 65536, False))  # b alone: a recorded stale
            await call(gw.flush())
            gw_faults.heal()
            await resync_until_current(sim, rec, a)
            sim.crash(a, declare_down=False)  # power loss: unsynced pages may go, one by one
            await sim.restart(a)
            key = ChunkKey(rec.lineage, 0, rec.head)
            assert sim.hosts[a].store.read(key, 0, 65536) == b"\x02" * 65536
            assert not stale_hosts(sim, rec.lineage)  # nothing was left to lose
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_asked_while_another_runs_waits_for_it_and_shares_its_failure():
    """A second FLUSH (another connection, multi-conn) asked while the first still runs
    covers the writes the first took: it was answered at once, before they were durable,
    and even when the first failed. It now waits for the first and fails with it."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            # both succeed; the second ends after the first
            await call(gw.write(0, b"\x01" * 4096, False))
            faults = sim.hosts[gw.host_id].faults
            faults.delay_probability, faults.max_delay = 1.0, 0.2
            ended = []

            async def flush(name, op):
                await call(op)
                ended.append(name)

            async with trio.open_nursery() as n:
                n.start_soon(flush, "first", gw.flush())
                second = gw.flush()
                assert second is not None  # not answered at once
                n.start_soon(flush, "second", second)
            assert ended == ["first", "second"]
            faults.delay_probability = 0.0
            # the first fails (b, the only current copy, restarted): so does the second
            await a_missed_a_write(sim, rec, gw, a, 4096)
            sim.crash(b)
            await sim.restart(b)
            sim.sync_maps()
            first, second = gw.flush(), gw.flush()
            with pytest.raises(BelowMinSize):
                await call(first)
            with pytest.raises(VbpError) as info:
                await call(second)
            assert info.value.errno == errno.EIO
            assert gw.flush() is None  # asked after both ended, with nothing to flush
            nursery.cancel_scope.cancel()

    run(main)



def test_a_write_whose_client_goes_away_is_still_settled():
    """A write's failures are recorded stale even when its client's connection ends while
    the write waits for its copies (the connection's tasks cancelled): else the copy that
    failed it would hold other bytes than the one that took it, with no record, and the
    two would answer reads differently. The gateway's requests to `a` are lost (`a`
    fails the write once they time out); the client goes away before that."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            lost = sim.hosts[a].addr
            faults = sim.hosts[gw.host_id].faults
            faults.on_call = lambda address, message: "drop" if address == lost else 0
            async with trio.open_nursery() as conn:  # the NBD server's, for one connection
                result = gw.write(0, b"\x02" * 4096, False)
                assert not isinstance(result, Later)  # (a task: the general path)

                async def finish():
                    await result

                conn.start_soon(finish)
                await trio.sleep(0.5)  # the write waits for `a`
                assert not stale_hosts(sim, rec.lineage)
                conn.cancel_scope.cancel()
            assert stale_hosts(sim, rec.lineage) == {a}
            assert a in gw.stale[0]
            key = ChunkKey(rec.lineage, 0, rec.head)
            assert sim.hosts[b].store.read(key, 0, 4096) == b"\x02" * 4096
            assert gw._inflight == 0
            nursery.cancel_scope.cancel()

    run(main)


def test_a_map_change_while_joining_targets_are_marked_is_seen_by_the_write():
    """A write to a chunk with a joining target first records that target stale (a
    registry call). A new map that names another joining target may come meanwhile: the
    write compares the epoch of the map it sent by, read before that call, so the target
    it did not send to counts as failed and is recorded stale too. (Read after the call,
    the epoch was the new one: that target got neither the write nor a record.)"""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery, hosts=4)
            gw_id = gw.host_id
            c = next(h for h in sim.hosts if h not in (a, b, gw_id))
            await call(gw.write(0, b"\x01" * 4096, False))
            cv = gw.cluster
            joining = {cv.epoch: (c,), cv.epoch + 1: (gw_id,)}
            cv.joining = lambda lineage, index, n: joining.get(cv.epoch, ())
            cv.set_map(cv.map)  # (its write sets cached: made again with the targets)
            mark_stale = gw._mark_stale

            async def new_map_meanwhile(index, hosts, replicas=None):
                result = await mark_stale(index, hosts, replicas)
                if hosts == (c,):
                    cv.set_map(dc_replace(cv.map, epoch=cv.epoch + 1))
                return result

            gw._mark_stale = new_map_meanwhile
            await call(gw.write(0, b"\x02" * 4096, False))
            assert stale_hosts(sim, rec.lineage) == {c, gw_id}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_failure_marked_by_a_clock_behind_still_stops_the_resync_clearing():
    """Stale records are versioned by the marking host's clock (time_ns). A record last
    marked by a host whose clock runs ahead, then a new failure marked by the gateway's
    clock, behind it, between the resync's last comparison and its clear: the mark
    still moves the record, so the clear by the version the resync read fails and the
    copy that missed the new write stays stale (it was cleared, current without it)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 8192, False))
            faults = sim.hosts[gw.host_id].faults
            faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x02" * 4096, False))  # a misses it: a stale
            faults.heal()
            sim.reg.mark_stale(rec.lineage, 0, [a], time.time_ns() + 5 * 10**9)  # clock ahead
            resync = sim.hosts[a].resync
            registry = resync.registry

            class WriteBeforeClear:
                def __getattr__(self, name):
                    return getattr(registry, name)

                async def clear_stale(self, lineage, index, host, version):
                    faults.partition([sim.hosts[a].addr])
                    await call(gw.write(0, b"\x03" * 4096, False))  # a misses this one too
                    faults.heal()
                    return await registry.clear_stale(lineage, index, host, version)

            resync.registry = WriteBeforeClear()
            await trio.sleep(resync.write_window)
            await resync.run_once()
            assert stale_hosts(sim, rec.lineage) == {a}
            resync.registry = registry
            await resync_to(sim, rec, a, b, b"\x03" * 4096)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_joining_target_with_no_record_yet_is_no_resync_source():
    """A data-set change names a joining target for the chunk before its scan has marked
    that target stale: it holds nothing and looks current. Resync takes only complete
    copies as sources, so the stale copy, with its only complete source unreachable,
    keeps what it holds and its record (as a source the target would have made it drop
    its generations and count as current, holding nothing)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery, hosts=4)
            gw_host = sim.hosts[gw.host_id]
            await call(gw.write(0, b"\x01" * 8192, False))
            gw_host.faults.partition([sim.hosts[a].addr])
            await call(gw.write(0, b"\x02" * 4096, False))  # b alone: a stale
            gw_host.faults.heal()
            host = sim.hosts[a]
            cm = host.cluster.map
            ids = tuple(h.id for h in cm.hosts)
            host.cluster.set_map(dc_replace(cm, data=tuple(i for i in ids if i != b), prev=ids,
                                            mgen=cm.mgen + 1))  # b leaves the data set
            assert host.cluster.joining(rec.lineage, 0, 2)  # a target, with no record yet
            host.faults.partition([sim.hosts[b].addr])
            await trio.sleep(host.resync.write_window)
            await host.resync.run_once()
            assert stale_hosts(sim, rec.lineage) == {a}
            key = ChunkKey(rec.lineage, 0, rec.head)
            assert host.store.read(key, 0, 8192) == b"\x01" * 8192
            nursery.cancel_scope.cancel()

    run(main)


def test_a_source_that_went_stale_during_the_pass_does_not_make_the_copy_current():
    """The pass lists the records, then its source restarts having lost unsynced bytes
    (page 4 back to a hole) and its crash recovery records it stale before it serves.
    The copy brought level with it (page 4 zeroed on its word) does not count as current
    on that: the source's record is read again before the clear, and another complete
    copy is taken, which has page 4."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=4, zones=4)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2)
            x, s, t = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            gw_host = next(h for h in sim.hosts.values() if h.id not in (x, s, t))
            gw = await gw_host.provider.open_export("v")
            await call(gw.write(0, b"\x01" * 8192, False))
            await call(gw.write(16384, b"\x05" * 4096, False))  # page 4, on every copy
            gw_host.faults.partition([sim.hosts[x].addr])
            await call(gw.trim(0, 4096, False))  # x misses it: x stale
            gw_host.faults.heal()
            key = ChunkKey(rec.lineage, 0, rec.head)
            resync = sim.hosts[x].resync
            registry = resync.registry

            class SourceRestartsMeanwhile:
                def __getattr__(self, name):
                    return getattr(registry, name)

                async def list_volumes(self):  # (right after the pass read the records)
                    sim.hosts[s].store.zero(key, 16384, 4096, chunk_size=MiB)
                    await sim.hosts[s].resync.mark_recovered([key])
                    return await registry.list_volumes()

            resync.registry = SourceRestartsMeanwhile()
            await trio.sleep(resync.write_window)
            await resync.run_once()
            store = sim.hosts[x].store
            assert store.read(key, 16384, 4096) == b"\x05" * 4096
            assert store.read(key, 0, 4096) == bytes(4096)
            assert stale_hosts(sim, rec.lineage) == {s}
            nursery.cancel_scope.cancel()

    run(main)


async def three_replicas_min_one(nursery):
    """A started sim of 4 hosts and a 1 MiB volume with replicas=3, min_size=1, its gateway
    on the host holding no copy, 8 KiB of 1s written: (sim, rec, gw, replicas in order)."""
    sim = Sim(1, hosts=4, zones=4)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=3, min_size=1)
    reps = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
    gw_host = next(h for h in sim.hosts.values() if h.id not in reps)
    gw = await gw_host.provider.open_export("v")
    await call(gw.write(0, b"\x01" * 8192, False))
    return sim, rec, gw, reps


class SlowMarks:
    """A gateway's registry whose stale marks land `delay` seconds late (a slow etcd)."""

    def __init__(self, registry, delay: float):
        self.registry, self.delay = registry, delay

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def mark_stale(self, *args, **kwargs):
        await trio.sleep(self.delay)
        return await self.registry.mark_stale(*args, **kwargs)


def test_a_write_whose_failure_is_recorded_too_late_for_resync_is_not_acknowledged():
    """replicas=3, min_size=1. Copy x is stale; a write goes to x, t (current) and s
    (current), and s fails it, its mark landing late. x's resync pass, past the write
    window, still takes s as its source: it copies s's older bytes over the write and
    clears. The write is not acknowledged (its mark came after the window), and x, which
    took it without counting, is marked again with s in one transaction: the copies end
    up agreeing (before, x was left current without the write t holds, no record)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, reps = await three_replicas_min_one(nursery)
            x, s, t = reps[-1], reps[0], reps[1]
            gw_host = sim.hosts[gw.host_id]
            gw_host.faults.partition([sim.hosts[x].addr])
            await call(gw.write(8192, b"\x09" * 4096, False))  # x misses it: x stale
            gw_host.faults.heal()
            await sim.hosts[x].resync.refresh_stale_self()
            gw.registry = SlowMarks(gw.registry, 4.5)
            gw_host.faults.partition([sim.hosts[s].addr])
            outcome: list = []

            async def write():
                try:
                    await call(gw.write(0, b"\x02" * 4096, False))  # x and t take it
                    outcome.append("acknowledged")
                except RegistryUnavailable:
                    outcome.append("EIO")

            nursery.start_soon(write)
            resync = sim.hosts[x].resync
            await trio.sleep(resync.write_window + 0.1)
            assert s not in stale_hosts(sim, rec.lineage)  # its mark is on its way
            await resync.run_once()
            while not outcome:
                await trio.sleep(0.1)
            assert outcome == ["EIO"]
            gw_host.faults.heal()
            assert stale_hosts(sim, rec.lineage) == {s, x}
            gw.registry = gw.registry.registry
            for _ in range(4):
                await trio.sleep(resync.write_window)
                for h in (x, s):
                    await sim.hosts[h].resync.run_once()
            assert not stale_hosts(sim, rec.lineage)
            key = ChunkKey(rec.lineage, 0, rec.head)
            pages = {h: sim.hosts[h].store.read(key, 0, 4096) for h in reps}
            assert len(set(pages.values())) == 1, pages
            nursery.cancel_scope.cancel()

    run(main)


def test_a_write_whose_failures_are_recorded_too_late_for_scrub_is_not_acknowledged():
    """replicas=3, min_size=1: one copy takes a write, two fail it, their marks landing
    late. A scrub finds the copies disagreeing and, on its second look (a settling time
    later), the two that missed the write still look current: they outvote the one that
    took it, which is repaired back to the old bytes. So the write must not be
    acknowledged (before, it was, and the only copy of it was undone)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, reps = await three_replicas_min_one(nursery)
            gw_host = sim.hosts[gw.host_id]
            took, missed = reps[-1], reps[:-1]
            gw.registry = SlowMarks(gw.registry, 4.5)
            gw_host.faults.partition([sim.hosts[h].addr for h in missed])
            outcome: list = []

            async def write():
                try:
                    await call(gw.write(0, b"\x02" * 4096, False))
                    outcome.append("acknowledged")
                except RegistryUnavailable:
                    outcome.append("EIO")

            nursery.start_soon(write)
            await trio.sleep(0.01)
            first = sim.hosts[reps[0]]
            scrubber = Scrubber(first.id, first.replica, first.cluster, first.pool, sim.registry,
                                settle=sim.peer_timeout + WRITE_GRACE)
            key = ChunkKey(rec.lineage, 0, rec.head)
            await scrubber.scrub_chunk(key, reps, set(), ScrubReport())
            while not outcome:
                await trio.sleep(0.1)
            assert outcome == ["EIO"]
            assert sim.hosts[took].store.read(key, 0, 4096) == b"\x01" * 4096  # outvoted
            nursery.cancel_scope.cancel()

    run(main)


def test_a_write_whose_failure_is_recorded_in_time_is_acknowledged():
    """The bound is the write window: a mark that lands a little late, but within it,
    leaves the write acknowledged (min_size met), the failed copy recorded stale."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            gw.registry = SlowMarks(gw.registry, WRITE_GRACE / 2)
            sim.hosts[gw.host_id].faults.partition([sim.hosts[a].addr])  # a times out
            await call(gw.write(0, b"\x02" * 4096, False))
            assert stale_hosts(sim, rec.lineage) == {a}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_stale_copys_resync_ends_while_a_copy_known_down_fails_every_write():
    """replicas=3, min_size=1: copy x is stale, copy c is down (recorded stale by every
    write to the chunk, which it fails), and the guest keeps writing the chunk. The
    writes x takes without counting are not marked on it again for c's failures (c was
    no resync source): x's resync ends and its record stays cleared. (Marked again at
    each write, x stayed stale for the whole outage, the chunk on one current copy.)"""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, reps = await three_replicas_min_one(nursery)
            x, c = reps[-1], reps[0]
            gw_host = sim.hosts[gw.host_id]
            gw_host.faults.partition([sim.hosts[x].addr])
            await call(gw.write(8192, b"\x09" * 4096, False))  # x misses it
            gw_host.faults.heal()
            sim.crash(c)
            sim.sync_maps()

            async def writer():
                for i in itertools.count():
                    await call(gw.write(32768, bytes([i % 250 + 1]) * 4096, False))
                    await trio.sleep(0.25 + 0.5 * sim.rng.random())

            async def refresh():  # as Blockd's lease renewal and _refresh_stale
                while True:
                    await trio.sleep(1)
                    await gw_host.provider.renew_all()
                    gw.adopt_stale(dict(gw.stale), await gw_host.stale_map(gw.lineage))

            async def resync():
                while True:
                    await trio.sleep(1)
                    await sim.hosts[x].resync.run_once()

            for task in (writer, refresh, resync):
                nursery.start_soon(task)
            await trio.sleep(20)
            samples = []
            for _ in range(20):
                await trio.sleep(0.5)
                samples.append(x in stale_hosts(sim, rec.lineage))
            assert sum(samples) <= 2, samples
            nursery.cancel_scope.cancel()

    run(main)
