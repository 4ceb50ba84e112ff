"""Changes of data set (replicator.migration) and recovery (replicator.recovery) while the
only current copy of a chunk is out of reach, over the sim hosts (tests/sim/harness.py)
with a DataSetMover per host stepped by hand (the sim does not run blockd's _move_data).

What they pin down: a chunk whose acknowledged bytes are only on a host that is down, or
were only on a disk that was replaced, never reads as zeros, nor becomes the source of
another copy's resync; it is unreadable (EIO) until a copy that holds them returns."""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio.testing

from control import api
from replicator.gateway import ClusterView
from replicator.mover import DataSetMover
from tests.sim.harness import Sim, call, extents_bytes
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap
from vbp.errors import InvalidArgument, NoSpace, VbpError
from vbp.layout import ChunkKey, MiB
from vbp.registry.base import NEVER_CURRENT


from tests.sim.test_data_set_sim import movers, quiet, run  # noqa: F401 (quiet: a fixture)
from tests.sim.test_data_set_sim import step_all as one_step


async def step_all(sim: Sim, mv: dict[str, DataSetMover], times: int = 1) -> ClusterMap:
    """`times` rounds, a second apart, of one _move_data step on every up host (the
    controller step, then the scan)."""
    for _ in range(times):
        await one_step(sim, mv)
        await trio.sleep(1.0)
    return sim.reg.cluster_map()


async def read4k(host, gw, offset: int) -> bytes | VbpError:
    try:
        return extents_bytes(await host.run_on(lambda: call(gw.read(offset, 4096))), offset, 4096)
    except VbpError as e:
        return e


async def write_missed_by(sim: Sim, gw, q: str, x: int) -> None:
    """Write chunk `x` for the first time while `q` restarts (quickly: never declared
    down): the other copy takes it, `q` is recorded stale for it and holds nothing of it."""
    h0 = sim.hosts["h0"]
    sim.crash(q, declare_down=False)
    await h0.run_on(lambda: call(gw.write(x * MiB, b"W" * 4096, False)))
    await h0.run_on(lambda: call(gw.flush()))
    rec = sim.volume("v")
    assert {r.host_id for r in sim.reg.list_stale(rec.lineage, x)} == {q}


def test_a_change_waits_for_the_down_only_holder_of_a_chunk_that_moves():
    """replicas=1 on h0-h2; h3 joins. The holder of chunk X (which moves to h3) is down
    when the change starts, so its scan never records h3 stale for X and no other host
    holds X. The change does not complete (else h3 would count as current with nothing
    and X read as zeros): X is unreadable meanwhile; once the holder is back it scans,
    h3 resyncs X from it and the change completes."""
    async def main():
        sim = Sim(7, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            first = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2"], None)
            sim.sync_maps()
            rec = sim.create_volume("v", 64 * MiB, replicas=1, min_size=1)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            for i in range(64):
                await h0.run_on(lambda i=i: call(gw.write(i * MiB, bytes([65 + i]) * 4096, False)))
            await h0.run_on(lambda: call(gw.flush()))
            old = ClusterView(first)
            new = ClusterView(ClusterMap(first.epoch, first.hosts, ("h0", "h1", "h2", "h3"), None, 0))
            x = next(i for i in range(64) if old.replicas(rec.lineage, i, 1)[0] in ("h1", "h2")
                     and new.replicas(rec.lineage, i, 1) == ("h3",))
            holder = old.replicas(rec.lineage, x, 1)[0]
            sim.crash(holder)  # down (its heartbeat expired) before the change starts
            mv = movers(sim)
            cmap = await step_all(sim, mv, 6)
            assert cmap.prev is not None and "h3" in cmap.data  # started, not completed
            status = api.data_set_status(reg)
            assert status["down"] == [holder] and status["unscanned"] == [holder]
            assert isinstance(await read4k(h0, gw, x * MiB), VbpError)

            await sim.restart(holder)
            for _ in range(10):
                cmap = await step_all(sim, mv)
                if cmap.prev is None:
                    break
            assert cmap.prev is None and "h3" in cmap.data
            assert sim.hosts["h3"].store.keys(rec.lineage)  # X (and others) came over
            gw2 = await h0.run_on(h0.provider.open_export, "v")
            assert await read4k(h0, gw2, x * MiB) == bytes([65 + x]) * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_change_waits_when_the_only_current_copy_is_down_and_the_other_is_stale_and_empty():
    """replicas=2, min_size=1. X on P and Q; Q restarted while X was first written, so it
    is recorded stale and holds nothing of X. P dies before Q resynced X, and the
    controller takes P out of the data set. Q's scan records X's new target stale (as
    never current) though Q holds none of X: the change waits, X stays unreadable rather
    than read as zeros (or give Q holes to resync from), and when P returns the change
    is undone, Q resyncs X from P and X reads back."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            first = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2", "h3"], None)
            sim.sync_maps()
            rec = sim.create_volume("v", 64 * MiB, replicas=2, min_size=1)
            x = next(i for i in range(64) if "h0" not in ClusterView(first).replicas(rec.lineage, i, 2))
            p, q = ClusterView(first).replicas(rec.lineage, x, 2)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await write_missed_by(sim, gw, q, x)
            sim.crash(p)  # p dies (heartbeat expired) before q resynced X from it
            await sim.restart(q)
            await trio.sleep(2.0)
            assert isinstance(await read4k(h0, gw, x * MiB), VbpError)  # no current copy

            mv = movers(sim)
            cmap = await step_all(sim, mv, 6)
            assert cmap.prev is not None and p not in cmap.data  # started, not completed
            (target,) = ClusterView(cmap).joining(rec.lineage, x, 2)
            recs = {r.host_id: r for r in reg.list_stale(rec.lineage, x)}
            assert recs[target].version & NEVER_CURRENT
            await trio.sleep(3.0)  # resync passes: neither has a source
            assert isinstance(await read4k(h0, gw, x * MiB), VbpError)

            await sim.restart(p)
            for _ in range(10):
                cmap = await step_all(sim, mv)
                if cmap.prev is None and not reg.list_stale(rec.lineage, x):
                    break
            assert cmap.prev is None and p in cmap.data  # back where it started
            await trio.sleep(3.0)
            gw2 = await h0.run_on(h0.provider.open_export, "v")
            assert await read4k(h0, gw2, x * MiB) == b"W" * 4096
            nursery.cancel_scope.cancel()

    run(main)


async def replace_disk(sim: Sim, p: str) -> None:
    """Host `p`'s disk is replaced: same id, an empty store; blockd backfills before it
    serves."""
    P = sim.hosts[p]
    sim.crash(p, declare_down=False)
    P.store = MemoryChunkStore(None, P.capacity)
    boot = P.boot

    def boot_backfilling():
        boot()
        P.replica.backfilling = True
    P.boot = boot_backfilling
    await sim.restart(p)
    await P.run_on(P.resync.backfill)
    P.replica.backfilling = False


async def lose_last_copy(sim: Sim, older: bytes | None = None) -> tuple:
    """replicas=2, min_size=1, on a started sim. X on P and Q (`older` written to both
    first, if given); Q restarted while X was written (P took it, Q recorded stale) and
    has not resynced it (it cannot reach P) when P's disk is replaced. P's backfill
    records P stale (never current) for X too. Returns (volume record, X, P, Q, a
    gateway of h0) with Q still cut off from P."""
    reg = sim.reg
    first = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2", "h3"], None)
    sim.sync_maps()
    rec = sim.create_volume("v", 64 * MiB, replicas=2, min_size=1)
    x = next(i for i in range(64) if "h0" not in ClusterView(first).replicas(rec.lineage, i, 2))
    p, q = ClusterView(first).replicas(rec.lineage, x, 2)
    P, Q = sim.hosts[p], sim.hosts[q]
    h0 = sim.hosts["h0"]
    gw = await h0.run_on(h0.provider.open_export, "v")
    if older is not None:
        await h0.run_on(lambda: call(gw.write(x * MiB, older, False)))
        await h0.run_on(lambda: call(gw.flush()))
    await write_missed_by(sim, gw, q, x)
    Q.faults.partition([P.addr])  # q's resync of X cannot start yet
    await sim.restart(q)
    await trio.sleep(2.0)
    # p's disk is replaced: same id, empty store; blockd backfills before serving
    await replace_disk(sim, p)
    assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {p, q}
    return rec, x, p, q, gw


def test_backfill_records_a_chunk_whose_other_copy_is_stale_and_empty():
    """replicas=2, min_size=1. X on P and Q; Q restarted while X was first written (P took
    it, Q recorded stale, holding nothing) and has not resynced it (it cannot reach P)
    when P's disk is replaced. Q does not list X, but its stale record does: P's backfill
    records P stale for X too. P was X's last current copy and its bytes went with the
    disk: neither copy is elected (not Q, which would serve holes, nor P), X stays
    unreadable, and the records stay."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            rec, x, p, q, _gw = await lose_last_copy(sim)
            sim.hosts[q].faults.heal()
            await trio.sleep(4.0)  # resync passes
            assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {p, q}
            h0 = sim.hosts["h0"]
            gw2 = await h0.run_on(h0.provider.open_export, "v")
            assert isinstance(await read4k(h0, gw2, x * MiB), VbpError)
            nursery.cancel_scope.cancel()

    run(main)


def test_accept_loss_reverts_an_unrecoverable_chunk_to_the_older_copy(caplog):
    """The chunk of lose_last_copy, written with O on both copies before Q missed W: it
    reads EIO and `vbp pool status` (api.unrecoverable_chunks) lists it, to be reverted
    to Q. accept_loss refuses a chunk that is not unrecoverable and changes nothing then;
    for X it removes Q's record: X reads O (older than the acknowledged W) and takes
    writes again, P resyncs from Q, the volume records the loss, P logs it, and nothing
    is unrecoverable any more."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            rec, x, p, q, gw = await lose_last_copy(sim, older=b"O" * 4096)
            sim.hosts[q].faults.heal()
            await trio.sleep(3.0)
            h0 = sim.hosts["h0"]
            assert isinstance(await read4k(h0, gw, x * MiB), VbpError)
            [lost] = api.unrecoverable_chunks(reg)
            assert (lost["lineage"], lost["index"], lost["volumes"]) == (rec.lineage, x, ["v"])
            assert (lost["last_current"], lost["source"], lost["reverts"]) == (p, q, True)
            other = (x + 1) % 64
            with pytest.raises(InvalidArgument, match="not unrecoverable"):
                api.accept_loss(reg, "v", [x, other])
            assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {p, q}
            assert reg.get_losses(rec.lineage) is None

            with caplog.at_level(logging.WARNING, logger="vbp.recovery"):
                got = api.accept_loss(reg, "v", [x])
                assert [(c["index"], c["source"], c["last_current"]) for c in got["reverted"]] == [(x, q, p)]
                assert got["zeroed"] == [] and got["skipped"] == []
                assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {p}
                await trio.sleep(3.0)  # the gateway's stale map, P's resync from Q
            assert reg.list_stale(rec.lineage, x) == []
            assert api.unrecoverable_chunks(reg) == []
            logged = [r.getMessage() for r in caplog.records if "event=loss_accepted" in r.getMessage()]
            assert logged and f"chunk={x} " in logged[0] and f"source={q}" in logged[0]
            assert all(r.levelno == logging.WARNING for r in caplog.records
                       if "event=loss_accepted" in r.getMessage())
            assert await read4k(h0, gw, x * MiB) == b"O" * 4096
            await h0.run_on(lambda: call(gw.write(x * MiB, b"N" * 4096, False)))
            await h0.run_on(lambda: call(gw.flush()))
            assert await read4k(h0, gw, x * MiB) == b"N" * 4096
            [a] = api.accepted_losses(reg, api.get_volume(reg, "v"))
            assert (a.reverted, a.zeroed, a.chunks) == (1, 0, ((x, q, True),))
            # a second accept finds nothing left to give up
            with pytest.raises(InvalidArgument, match="not unrecoverable"):
                api.accept_loss(reg, "v", [x])
            assert api.accept_loss(reg, "v")["reverted"] == []
            nursery.cancel_scope.cancel()

    run(main)


def test_accept_loss_of_a_chunk_no_copy_of_was_ever_current_reads_zeros():
    """As lose_last_copy, then Q's disk is lost too (its record says never current, as its
    backfill would): no copy holds anything acknowledged. accept_loss declares X lost: it
    reads as zeros and takes writes again, and the volume says so."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            rec, x, p, q, gw = await lose_last_copy(sim)
            reg.mark_stale(rec.lineage, x, [q], NEVER_CURRENT | time.time_ns())
            sim.hosts[q].faults.heal()
            await trio.sleep(3.0)
            h0 = sim.hosts["h0"]
            assert isinstance(await read4k(h0, gw, x * MiB), VbpError)
            [lost] = api.unrecoverable_chunks(reg)
            assert lost["reverts"] is False
            got = api.accept_loss(reg, "v", [x])
            first = lost["copies"][0]
            assert [(c["index"], c["source"]) for c in got["zeroed"]] == [(x, first)]
            await trio.sleep(3.0)
            assert reg.list_stale(rec.lineage, x) == []
            assert await read4k(h0, gw, x * MiB) == bytes(4096)
            await h0.run_on(lambda: call(gw.write(x * MiB, b"N" * 4096, False)))
            assert await read4k(h0, gw, x * MiB) == b"N" * 4096
            [a] = api.accepted_losses(reg, api.get_volume(reg, "v"))
            assert (a.zeroed, a.reverted, a.chunks) == (1, 0, ((x, first, False),))
            nursery.cancel_scope.cancel()

    run(main)


RESTART_WEIGHTS = {"h0": 0.5}  # (a restart of the change: another factor for h0)


async def joined_then_lost(sim, restart: bool = False):
    """h0-h2, replicas 2 / min_size 1; X on P, Q (h1, h2). O written to both; W (offset 0)
    missed by Q (restarted, then cut off from P: no resync). h3 joins: the scans record it
    stale for X, it resyncs X from P and its record goes. N (offset 4096) reaches P, Q and
    h3. With `restart`, the change then restarts from the same prev under a new
    generation (another factor for h0; h3 still joins X) and every holder scans it.
    Then P's disk is replaced (backfill: P stale, never current). Acknowledged: W, N;
    h3 holds both."""
    reg = sim.reg
    first = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2"], None)
    sim.sync_maps()
    rec = sim.create_volume("v", 64 * MiB, replicas=2, min_size=1)
    hosts4 = ("h0", "h1", "h2", "h3")
    chg = ClusterView(ClusterMap(first.epoch, first.hosts, hosts4, ("h0", "h1", "h2"), first.mgen + 1))
    again = ClusterView(ClusterMap(first.epoch, first.hosts, hosts4, ("h0", "h1", "h2"),
                                   first.mgen + 2, tuple(RESTART_WEIGHTS.items())))
    x = next(i for i in range(64) if "h0" not in chg.replicas(rec.lineage, i, 2)
             and chg.joining(rec.lineage, i, 2) == ("h3",)
             and again.joining(rec.lineage, i, 2) == ("h3",))
    p, q = chg.replicas(rec.lineage, x, 2)
    P, Q, T, h0 = sim.hosts[p], sim.hosts[q], sim.hosts["h3"], sim.hosts["h0"]
    gw = await h0.run_on(h0.provider.open_export, "v")
    await h0.run_on(lambda: call(gw.write(x * MiB, b"O" * 8192, False)))
    await h0.run_on(lambda: call(gw.flush()))
    await write_missed_by(sim, gw, q, x)  # W at offset 0, Q stale
    Q.faults.partition([P.addr])
    await sim.restart(q)
    await trio.sleep(2.0)

    cmap = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2", "h3"], ["h0", "h1", "h2"])
    sim.sync_maps()
    assert ClusterView(cmap).joining(rec.lineage, x, 2) == ("h3",)
    mv = movers(sim)
    for hid, h in sim.hosts.items():
        mv[hid].store, mv[hid].cluster = h.store, h.cluster
        await mv[hid].scan_once()
    # (the gateway records h3 stale again before its first write of X in the change)
    await h0.run_on(lambda: call(gw.write(x * MiB + 4096, b"N" * 4096, False)))
    await h0.run_on(lambda: call(gw.flush()))
    for _ in range(10):
        await trio.sleep(1.0)
        if {r.host_id for r in reg.list_stale(rec.lineage, x)} == {q}:
            break
    assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {q}  # h3 resynced from P
    await h0.run_on(lambda: call(gw.write(x * MiB + 4096, b"N" * 4096, False)))
    await h0.run_on(lambda: call(gw.flush()))
    assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {q}
    got = sim.replica_bytes(T, rec, rec.chain, x)[:8192]
    assert got == b"W" * 4096 + b"N" * 4096

    if restart:
        cmap = reg.set_data_set(cmap.mgen, hosts4, ["h0", "h1", "h2"], RESTART_WEIGHTS)
        sim.sync_maps()
        assert ClusterView(cmap).joining(rec.lineage, x, 2) == ("h3",)
        for hid, h in sim.hosts.items():
            mv[hid].store, mv[hid].cluster = h.store, h.cluster
            await mv[hid].scan_once()
        assert all(m.scanned_gen == cmap.mgen for m in mv.values())
        # a write of X under the restarted change (the gateway records new targets first)
        await h0.run_on(lambda: call(gw.write(x * MiB + 4096, b"N" * 4096, False)))
        await h0.run_on(lambda: call(gw.flush()))

    # P's disk is replaced
    await replace_disk(sim, p)
    if not restart:
        assert {r.host_id for r in reg.list_stale(rec.lineage, x)} == {p, q}
    Q.faults.heal()
    return rec, x, p, q, gw


def test_a_chunk_a_joining_target_holds_is_not_given_up_and_reads_it_once_the_change_completes():
    """X's complete copies are stale, the newest never current (P's disk replaced), but
    the joining target h3 resynced X from P before and took the writes since: it holds
    every acknowledged byte. X is not unrecoverable (accept-loss reverted it to Q's older
    bytes, h3 and Q then disagreeing with no record): it is refused, and once the change
    completes every copy comes to h3's bytes."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec, x, p, q, gw = await joined_then_lost(sim)
            assert api.unrecoverable_chunks(sim.reg) == []
            with pytest.raises(InvalidArgument, match="not unrecoverable"):
                api.accept_loss(sim.reg, "v", [x])
            mv = movers(sim)
            await step_all(sim, mv, times=3)
            assert not sim.reg.cluster_map().migrating
            for _ in range(20):
                await trio.sleep(1.0)
                if not sim.reg.list_stale(rec.lineage, x):
                    break
            assert not sim.reg.list_stale(rec.lineage, x)
            want = b"W" * 4096 + b"N" * 4096
            for h in ClusterView(sim.reg.cluster_map()).replicas(rec.lineage, x, 2):
                assert sim.replica_bytes(sim.hosts[h], rec, rec.chain, x)[:8192] == want, h
            nursery.cancel_scope.cancel()

    run(main)


def test_a_change_restarted_from_the_same_prev_does_not_record_a_resynced_target_again():
    """As joined_then_lost, with the change restarted under a new generation (same prev)
    after h3 resynced X: the holders' scans of it recorded h3 stale for X again (P and Q
    hold X; a copy stale and holding none of it would record h3 never current), though
    h3 had been written with every write since its resync. Once P's disk was replaced X
    was taken for unrecoverable, and accept-loss reverted it to Q's older bytes: W was
    gone from every copy."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec, x, p, q, gw = await joined_then_lost(sim, restart=True)
            assert {r.host_id for r in sim.reg.list_stale(rec.lineage, x)} == {p, q}
            assert api.unrecoverable_chunks(sim.reg) == []
            with pytest.raises(InvalidArgument, match="not unrecoverable"):
                api.accept_loss(sim.reg, "v", [x])
            nursery.cancel_scope.cancel()

    run(main)


def test_a_holder_restarted_during_a_change_records_no_current_target_never_current():
    """blockd makes a new DataSetMover at start: P, back on its new disk, scanned the
    change again and recorded h3 (which holds W and N) stale, never current, for X.
    Nothing could bring h3 current again but accept_loss, which then copied Q's older
    bytes over h3's: W was gone from every copy. A scan the registry says this host made
    is not made again, and a copy stale and not held records no target another copy's
    scan recorded."""
    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec, x, p, q, gw = await joined_then_lost(sim)
            P = sim.hosts[p]
            fresh = DataSetMover(p, P.store, P.cluster, sim.registry, P.pool, grace=0.0,
                                 down_out_interval=0.0)
            await fresh.scan_once()
            assert {r.host_id for r in sim.reg.list_stale(rec.lineage, x)} == {p, q}
            T = sim.hosts["h3"]
            assert sim.replica_bytes(T, rec, rec.chain, x)[:4096] == b"W" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_replaced_disk_backfills_past_a_volume_record_too_large_to_grow(caplog):
    """P's disk is replaced and two replicas=1 volumes had chunks placed on it: each
    record gets a `lost` entry. One record is past the registry's limit for a record
    (base.VALUE_MAX: a long snapshot history, stored before the limit was checked, as
    LMDB took any size): growing it is refused (InvalidArgument). That refusal failed the
    whole backfill, retried for ever: P never served again. It is logged, the backfill
    ends, and the other volume's loss is recorded."""
    import msgpack

    from vbp.registry.base import P_VOL, VALUE_MAX
    from vbp.registry.kv import Put

    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            sim.create_volume("big", 64 * MiB, replicas=1)
            sim.create_volume("small", 64 * MiB, replicas=1)
            d = {**reg.get_volume("big"), "note": b"x" * VALUE_MAX}  # grown so far
            reg.kv.txn([], [Put(P_VOL + b"big", msgpack.packb(d, use_bin_type=True))])
            with trio.move_on_after(60):
                await replace_disk(sim, "h1")
            assert not sim.hosts["h1"].replica.backfilling, "the backfill never ended"
            assert [e[0] for e in reg.get_volume("small")["lost"]] == ["h1"]
            assert not reg.get_volume("big")["lost"]
            assert "volume=big event=data_lost_not_recorded" in caplog.text
            nursery.cancel_scope.cancel()

    run(main)


def test_a_resync_onto_a_full_disk_tries_no_other_source(caplog):
    """h2's copy of chunk 0 is stale and h2's disk is full: every write of its resync
    fails with NoSpace. That is this host's disk, not the source's: the resync gives the
    chunk up for this pass at the first such failure, rather than blaming and trying
    every other source (resync_source_failed, once per source per pass)."""
    async def main():
        sim = Sim(5, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            h0, h2 = sim.hosts["h0"], sim.hosts["h2"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            await h0.run_on(lambda: call(gw.write(0, b"W" * 4096, False)))
            await h0.run_on(lambda: call(gw.flush()))

            # h2 missed a write (its copy differs: the resync has pages to copy)
            h2.store.write(ChunkKey(rec.lineage, 0, rec.head), 4096, b"X" * 4096,
                           chunk_size=rec.chunk_size)

            def full(*args, **kwargs):
                raise NoSpace("the disk is full writing chunk (test)")

            for op in ("write", "zero"):
                setattr(h2.store, op, full)
            sim.reg.mark_stale(rec.lineage, 0, ["h2"], time.time_ns())
            with caplog.at_level(logging.WARNING, logger="vbp.recovery"):
                await trio.sleep(6.0)  # resync passes
            said = [r.getMessage() for r in caplog.records]
            assert any("event=resync_no_space" in m for m in said), said[-20:]
            assert not any("event=resync_source_failed" in m for m in said), said[-20:]
            assert {r.host_id for r in sim.reg.list_stale(rec.lineage, 0)} == {"h2"}
            nursery.cancel_scope.cancel()

    run(main)
