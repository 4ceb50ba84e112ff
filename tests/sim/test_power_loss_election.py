"""The all-stale election after a power loss (replicator.loss.last_current): a copy whose
crash recovery after a reboot recorded it stale lost the writes it took since its last
flush, so being the newest record does not make it the copy that holds every acknowledged
write. The disk model of the simulation (MemoryChunkStore.crash) keeps, per page, old or
new bytes; LoseUnsynced makes it keep the old ones everywhere. The record's flag that says
so (LACKS_EARLIER) is also set by a resync that cleared a copy's record and then found a
generation it had not compared (the last test).

Every test: replicas=3, min_size=2, one chunk with copies a, b, c, written through a
gateway on a fourth host g."""

from __future__ import annotations

import random
import time
from dataclasses import replace as dc_replace
from types import SimpleNamespace

import pytest
import trio

from vbp.errors import BelowMinSize, VbpError
from vbp.layout import MiB, ChunkKey
from vbp.registry.base import LACKS_EARLIER
from replicator.loss import last_current, stale_by_chunk
from replicator.messages import LACKS_REV
from replicator.recovery import Resync
from replicator.replica import StaleCopy
from tests.sim.harness import WALL_TTL, Sim, WhileClearing, call, extents_bytes, run

OLD, ACKED, FAILED, NEW = b"\x01" * 4096, b"\x11" * 4096, b"\x22" * 4096, b"\x33" * 4096


class LoseUnsynced(random.Random):
    """The crash model's rng: every unflushed page goes back to its durable bytes (a power
    loss that kept nothing of the page cache)."""

    def random(self):
        return 0.99


async def three_copies(nursery, *, c_first: bool = False) -> SimpleNamespace:
    """The pool, the volume, its chunk's copies (c first in placement with `c_first`) and
    the gateway, OLD written and flushed everywhere."""
    return await copies(nursery, 3, 2, reverse=c_first)


async def copies(nursery, n: int, min_size: int, reverse: bool = False) -> SimpleNamespace:
    """A pool of four hosts, volume v (`n` replicas, `min_size`) and its chunk 0's copies
    (a, b, c in placement order, the other way with `reverse`; with two, b and c, and a
    names b), the gateway on a host with no copy; OLD written and flushed everywhere."""
    sim = Sim(3, hosts=4, zones=4)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=n, min_size=min_size, chunk_size=MiB)
    placed = list(sim.hosts["h0"].cluster.replicas(rec.lineage, 0, n))
    if reverse:
        placed.reverse()
    a, b, c = placed if n == 3 else (placed[1], placed[1], placed[0])
    g = next(h for h in sim.hosts if h not in (a, b, c))
    t = SimpleNamespace(sim=sim, rec=rec, lin=rec.lineage, a=a, b=b, c=c, g=g,
                        gw=await sim.hosts[g].provider.open_export("v"),
                        faults=sim.hosts[g].faults, key=ChunkKey(rec.lineage, 0, rec.head))
    await call(t.gw.write(0, OLD, False))
    await call(t.gw.flush())
    return t


def stale(t, flag: int = 0) -> set[str]:
    return {r.host_id for r in t.sim.reg.list_stale(t.lin) if r.version & flag == flag}


async def acked_on_b_and_c(t) -> None:
    """W1 (ACKED): a cut off, b and c take it: acknowledged (min_size 2), not flushed; a
    recorded stale."""
    t.faults.partition([t.sim.hosts[t.a].addr])
    await call(t.gw.write(0, ACKED, False))
    assert stale(t) == {t.a}


async def failed_on_c_alone(t) -> None:
    """W2 (FAILED): b cut off too, only c (if up) takes it: EIO, b recorded stale."""
    t.faults.partition([t.sim.hosts[t.b].addr])
    with pytest.raises(VbpError):
        await call(t.gw.write(8192, FAILED, False))
    assert stale(t) == {t.a, t.b}


def lose_power(t, host: str, **kw) -> None:
    saved, t.sim.rng = t.sim.rng, LoseUnsynced()
    t.sim.crash(host, **kw)
    t.sim.rng = saved


async def heal_and_resync(t) -> None:
    t.faults.heal()
    t.sim.sync_maps()
    await trio.sleep(10)  # past the write window
    for _ in range(2):
        for h in (t.a, t.b, t.c):
            await t.sim.hosts[h].resync.run_once()
    assert not t.sim.reg.list_stale(t.lin), t.sim.reg.list_stale(t.lin)


async def read_through_gateway(t) -> bytes:
    await t.gw.refresh_stale(t.sim.hosts[t.g].stale_map)
    return extents_bytes(await call(t.gw.read(0, 4096)), 0, 4096)


def on_copies(t, length: int = 4) -> dict[str, bytes]:
    return {h: t.sim.hosts[h].store.read(t.key, 0, length) for h in (t.a, t.b, t.c)}


def test_power_lost_copy_is_not_elected_over_a_copy_holding_an_acknowledged_write():
    """a is stale; W1 is acknowledged on b and c, not flushed; W2 reaches only c and
    fails, b recorded stale; c loses power (W1 gone from its disk) and its crash recovery
    records it stale, the newest record. The election passes over c (its record says it
    may lack earlier writes) for b, which holds W1: only one record is newer than b's,
    below min_size, so nothing was acknowledged after b went stale."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery)
            await acked_on_b_and_c(t)
            await failed_on_c_alone(t)
            # b holds the acknowledged W1 (and every acknowledged write: it was current
            # until W2, the first write that could not be acknowledged)
            assert t.sim.hosts[t.b].store.read(t.key, 0, 4096) == ACKED
            lose_power(t, t.c)  # before any flush: W1 is gone from its disk
            assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == OLD
            await t.sim.restart(t.c)  # crash recovery records c stale: every copy is stale now
            assert stale(t) == {t.a, t.b, t.c} and stale(t, LACKS_EARLIER) == {t.c}
            await heal_and_resync(t)
            assert await read_through_gateway(t) == ACKED, on_copies(t)
            nursery.cancel_scope.cancel()

    run(main)


def test_power_lost_copy_still_up_in_the_map_is_not_elected_either():
    """The same with a fast reboot (the host still up in the map): the next write fails on
    every copy; b is recorded stale, c (unreachable, power lost) is not; c's restart then
    records it stale, newest and flagged, and b, which holds the acknowledged write, is
    elected over it (c first in placement: a tie would take it)."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery, c_first=True)
            await acked_on_b_and_c(t)
            lose_power(t, t.c, declare_down=False)
            await failed_on_c_alone(t)  # (c and b failing it, both recorded in one transaction)
            await t.sim.restart(t.c)  # its crash recovery records it stale: every copy is
            assert stale(t) == {t.a, t.b, t.c}
            await heal_and_resync(t)
            assert await read_through_gateway(t) == ACKED, on_copies(t)
            nursery.cancel_scope.cancel()

    run(main)


async def two_copies(nursery) -> SimpleNamespace:
    """replicas=2, min_size=1: copies c (first in placement) and b (copies())."""
    return await copies(nursery, 2, 1)


async def no_copy_takes_w2_then_c_restarts(t) -> None:
    """c has lost power; b is cut off from the gateway: W2 fails on both, and with min_size 1
    neither is kept current (VolumeGateway._falling_behind). c's restart flags its record,
    which stays as old as b's; the election takes b."""
    t.faults.partition([t.sim.hosts[t.b].addr])
    with pytest.raises(VbpError):  # W2: no copy takes it
        await call(t.gw.write(8192, FAILED, False))
    assert stale(t) == {t.b, t.c}
    await t.sim.restart(t.c)
    assert stale(t, LACKS_EARLIER) == {t.c}
    recs = {r.host_id: r.since for r in t.sim.reg.list_stale(t.lin)}
    assert recs[t.b] == recs[t.c]  # (c's recovery flagged its record, left its age)
    t.faults.heal()
    await elect(t)
    await both_hold(t, ACKED)


@pytest.mark.parametrize("declared_down", [True, False], ids=["down", "up_in_map"])
def test_with_min_size_one_a_write_no_copy_took_keeps_none_current(declared_down):
    """W1 is acknowledged on both copies, unflushed; c loses power (declared down, or a
    fast reboot still up in the map); W2 then fails on both. One copy that failed used
    to stay current, c (first in placement), and b was recorded stale. c came back
    recorded stale by its crash recovery, flagged (it lost W1) and newer than b's record:
    with min_size 1 that one newer record made the election take c, and W1 was lost on
    both copies (the simulation's seed 5494 of the takeover faults, c down; keeping a copy
    whose host is up covered that one, not seed 108 of the crash faults, c up)."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await call(t.gw.write(0, ACKED, False))  # W1: acknowledged by both, unflushed
            lose_power(t, t.c, declare_down=declared_down)
            assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == OLD
            t.sim.sync_maps()
            await no_copy_takes_w2_then_c_restarts(t)
            nursery.cancel_scope.cancel()

    run(main)


def test_with_min_size_one_the_copies_kept_are_told_by_the_registry_not_a_lagging_map():
    """Seed 108 of the crash faults: W1 is acknowledged on c alone (b cut off, recorded
    stale); b resyncs from c and holds W1, but the gateway's stale map, refreshed about
    once a second, still counts b behind. c loses power (up in the map) and W2 fails on
    both: by that map c was the one current copy, kept current, and b recorded stale
    again; c's restart then made the election take c, which lost W1. The gateway now
    asks the registry which copies are current: both, so neither is kept."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            t.faults.partition([t.sim.hosts[t.b].addr])
            await call(t.gw.write(4096, NEW, False))  # b recorded stale (c synced then)
            assert stale(t) == {t.b}
            await call(t.gw.write(0, ACKED, False))  # W1: acknowledged by c alone, unflushed
            t.faults.heal()
            for _ in range(5):  # past the write window, the gateway's lease kept
                await trio.sleep(2)
                await t.sim.hosts[t.g].provider.renew_all()
            await t.sim.hosts[t.b].resync.run_once()
            assert not stale(t) and t.sim.hosts[t.b].store.read(t.key, 0, 4096) == ACKED
            assert t.b in t.gw.stale.get(0, ())  # (not refreshed yet)
            lose_power(t, t.c, declare_down=False)
            assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == OLD
            await no_copy_takes_w2_then_c_restarts(t)
            nursery.cancel_scope.cancel()

    run(main)


def drop_to(t, host: str, *kinds: str) -> None:
    """The gateway's messages of `kinds` to `host` are lost: their answers never come, and
    the gateway learns it a request timeout later."""
    addr = t.sim.hosts[host].addr
    t.faults.on_call = lambda a, msg: "drop" if a == addr and type(msg).__name__ in kinds else 0


async def elect(t) -> None:
    """c restarted, the faults healed, both copies resynced: the chunk is whole again."""
    t.faults.on_call = lambda a, msg: 0
    t.sim.sync_maps()
    await trio.sleep(10)  # past the write window
    for _ in range(2):
        for h in (t.b, t.c):
            await t.sim.hosts[h].resync.run_once()
    assert not t.sim.reg.list_stale(t.lin), t.sim.reg.list_stale(t.lin)


def in_background(nursery, op) -> dict:
    """Start `op()` (a gateway call) as a task: the dict returned gets its outcome,
    "acked", or "error" (the VbpError)."""
    outcome: dict = {}

    async def go():
        try:
            await call(op())
            outcome["acked"] = True
        except VbpError as e:
            outcome["error"] = e

    nursery.start_soon(go)
    return outcome


async def ended(outcome: dict) -> dict:
    while not outcome:
        await trio.sleep(0.1)
    return outcome


async def both_hold(t, data: bytes) -> None:
    """Both copies' stores, and a read through the gateway, give `data` at offset 0."""
    assert {h: t.sim.hosts[h].store.read(t.key, 0, 4096) for h in (t.b, t.c)} == {
        t.b: data, t.c: data}
    assert await read_through_gateway(t) == data


def test_with_min_size_one_a_write_taken_by_a_copy_that_lost_power_since_is_not_acknowledged():
    """W1 is acknowledged on both copies, unflushed. W2 reaches c, which answers, and b,
    whose answer never comes; before the gateway gives up on b, c loses power (its host
    still up in the map). On c's word alone b was recorded stale and W2 acknowledged; c's
    crash recovery then recorded it stale, flagged, newer than b's record, and with
    min_size 1 the election took c, which had lost W1 (VolumeGateway._still_answering).
    Now c is asked again before b is recorded: it does not answer, W2 is taken by no copy
    and fails, both copies are recorded, and the election takes b."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await call(t.gw.write(0, ACKED, False))  # W1: acknowledged by both, unflushed
            drop_to(t, t.b, "WriteChunk", "WriteBatch")
            outcome = in_background(nursery, lambda: t.gw.write(0, FAILED, False))  # W2
            await trio.sleep(0.2)  # c answered W2; b's answer is not coming
            assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == FAILED
            lose_power(t, t.c, declare_down=False)
            assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == OLD
            assert "error" in await ended(outcome)  # (W2 may be lost: c took it and lost it)
            assert stale(t) == {t.b, t.c}
            await t.sim.restart(t.c)
            await elect(t)
            await both_hold(t, ACKED)  # (b never got W2: the copies hold W1 again)
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("power_lost", ["before_b_times_out", "after_the_flush"])
def test_with_min_size_one_a_flush_that_records_a_copy_stale_needs_the_other_synced(power_lost):
    """W1 is acknowledged on both copies. A FLUSH reaches c, which syncs and answers, and
    b, whose answer never comes. Meanwhile W3 is acknowledged on both, unflushed. c loses
    power (its host still up in the map), before the gateway gives up on b or after the
    flush. Either way, on c's answer the flush recorded b stale and succeeded; c's crash
    recovery then recorded it stale, newer than b, and with min_size 1 the election took
    c, which had lost W3: W3 was lost on both copies (the first case is the simulation's
    seed 853 of the crash faults, W3 another volume's write). Now c is asked again before
    b is recorded (VolumeGateway._still_answering): gone, the flush fails and records
    nothing; there, it syncs again once b is recorded, before the flush is acknowledged
    (_synced_sole)."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await call(t.gw.write(0, ACKED, False))  # W1
            drop_to(t, t.b, "Flush")
            outcome = in_background(nursery, t.gw.flush)
            await trio.sleep(0.1)  # c synced and answered; b's answer is not coming
            await call(t.gw.write(0, NEW, False))  # W3: acknowledged by both, unflushed
            if power_lost == "before_b_times_out":
                lose_power(t, t.c, declare_down=False)
                assert t.sim.hosts[t.c].store.read(t.key, 0, 4096) == ACKED
                assert "error" in await ended(outcome)
                assert not stale(t)
            else:
                assert "acked" in await ended(outcome)
                assert stale(t) == {t.b}
                lose_power(t, t.c, declare_down=False)
            await t.sim.restart(t.c)
            await elect(t)
            await both_hold(t, NEW)
            nursery.cancel_scope.cancel()

    run(main)


def test_with_min_size_one_the_copy_left_current_syncs_before_the_write_counts():
    """W1 is acknowledged on both copies, unflushed. b is cut off: W2 is acknowledged on
    c alone, b recorded stale. c then loses power (up in the map) before any flush. Its
    crash recovery records it stale, flagged and newer than b's record, and with
    min_size 1 the election takes c: it must hold W1, which b holds too. It did not (its
    page cache was lost), and W1 was lost on both copies. Now c syncs once b's failure is
    recorded, before W2 is acknowledged (VolumeGateway._synced_sole): c holds W1 and W2."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await call(t.gw.write(0, ACKED, False))  # W1: acknowledged by both, unflushed
            t.faults.partition([t.sim.hosts[t.b].addr])
            await call(t.gw.write(8192, NEW, False))  # W2: c alone
            assert stale(t) == {t.b}
            lose_power(t, t.c, declare_down=False)
            await t.sim.restart(t.c)  # (synced, it may come back clean: not recorded)
            t.faults.heal()
            await elect(t)
            for h in (t.b, t.c):
                store = t.sim.hosts[h].store
                assert (store.read(t.key, 0, 4096), store.read(t.key, 8192, 4096)) == (ACKED, NEW), h
            assert await read_through_gateway(t) == ACKED
            nursery.cancel_scope.cancel()

    run(main)


def test_a_process_crash_keeping_the_page_cache_loses_nothing():
    """The steps of the first test with a process crash (SIGKILL, the page cache kept):
    c keeps what it took, its record is not flagged, and the chunk holds W1 again
    whichever copy the election takes."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery)
            await acked_on_b_and_c(t)
            await failed_on_c_alone(t)
            t.sim.crash(t.c, power=False)
            await t.sim.restart(t.c)
            assert stale(t) == {t.a, t.b, t.c} and not stale(t, LACKS_EARLIER)
            await heal_and_resync(t)
            assert await read_through_gateway(t) == ACKED
            nursery.cancel_scope.cancel()

    run(main)


def test_flushed_writes_on_copies_that_all_lost_power_win_over_an_older_copy():
    """The other side of the rule: a is stale (cut off); W1 is acknowledged and flushed
    on b and c, W3 acknowledged on them, unflushed; both lose power and come back, their
    records flagged and newer than a's. min_size (2) records are newer than a's: writes
    may have been acknowledged on b and c alone, so the election takes the newest of
    them, which kept the flushed W1 (W3 may go: a power loss of every copy that held it,
    as a disk's cache). Electing a, the copy that lost nothing, would lose the flushed
    write."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery)
            await acked_on_b_and_c(t)
            await call(t.gw.flush())  # W1 durable on b and c
            await call(t.gw.write(8192, b"\x44" * 4096, False))  # W3: acknowledged, unflushed
            lose_power(t, t.b)
            lose_power(t, t.c)
            await t.sim.restart(t.b)
            await t.sim.restart(t.c)
            assert stale(t) == {t.a, t.b, t.c} and stale(t, LACKS_EARLIER) == {t.b, t.c}
            await heal_and_resync(t)
            assert on_copies(t, 4096) == {h: ACKED for h in (t.a, t.b, t.c)}
            assert await read_through_gateway(t) == ACKED
            nursery.cancel_scope.cancel()

    run(main)


def test_a_pool_with_a_host_of_an_older_revision_elects_as_that_host_does():
    """During an upgrade host by host, a host below LACKS_REV elects the newest record
    whatever its flags. The others must elect the same copy, or two stale copies of one
    chunk each elect themselves, clear their records, and the chunk has two "current"
    copies with different bytes: so the flag is read only once every host is at
    LACKS_REV (the first test's steps, c not upgraded, b and c resyncing at once)."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery)
            await acked_on_b_and_c(t)
            await failed_on_c_alone(t)
            lose_power(t, t.c)
            await t.sim.restart(t.c)
            assert stale(t, LACKS_EARLIER) == {t.c}
            # c runs the code of revision LACKS_REV - 1: so it says, and so it elects
            old = t.sim.reg.cluster_map().host(t.c)
            t.sim.reg.register_host(dc_replace(old, peer_rev=LACKS_REV - 1), WALL_TTL)
            own = Resync._resync_all_stale
            r_c = t.sim.hosts[t.c].resync

            async def elects_the_newest(lineage, index, complete, stale, joining=()):
                return await own(r_c, lineage, index, complete,
                                 {h: x._replace(lacks=False) for h, x in stale.items()}, joining)

            r_c._resync_all_stale = elects_the_newest
            t.faults.heal()
            t.sim.sync_maps()
            await trio.sleep(10)
            async with trio.open_nursery() as both:
                both.start_soon(t.sim.hosts[t.b].resync.run_once)
                both.start_soon(r_c.run_once)
            left = stale(t)
            current = {h: data for h, data in on_copies(t, 4096).items() if h not in left}
            assert current and len(set(current.values())) == 1, (left, current)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_a_resync_records_stale_again_for_a_missed_generation_is_not_elected():
    """a is stale and resyncs from b. While it clears its record, a snapshot's first
    write NEW reaches the copies: a refuses to make the generation from its stale base,
    b and c take it; b and c are then recorded stale (a later failure). The clear wins
    the race with the gateway's mark of a, so the resync records a stale again itself:
    the newest record of the chunk, made after the write it misses. It carries
    LACKS_EARLIER, and the election passes over a for b or c (one record newer than
    theirs, below min_size), which hold NEW: every copy ends with it. Unflagged, a was
    elected and b and c dropped NEW's generation as divergent."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await three_copies(nursery)
            await acked_on_b_and_c(t)
            t.faults.heal()
            t.sim.sync_maps()
            await trio.sleep(10)  # past the write window
            head = t.sim.snapshot_now("v", "s0")
            chain = t.sim.volume("v").chain
            new = b"\x33" * 4096

            async def new_generation_then_b_and_c_stale():
                refused = []
                for h in (t.a, t.b, t.c):  # (a gateway whose mark of a lands later)
                    host = t.sim.hosts[h]
                    try:
                        host.replica.write("v", t.lin, 0, head, chain, 4096, new, t.rec.chunk_size,
                                           0, False, host.cluster.epoch, t.gw.token)
                    except StaleCopy:
                        refused.append(h)
                assert refused == [t.a]
                t.sim.reg.mark_stale(t.lin, 0, [t.b, t.c], time.time_ns())

            r_a = t.sim.hosts[t.a].resync
            r_a.registry = WhileClearing(r_a.registry, new_generation_then_b_and_c_stale)
            await r_a.run_once()
            assert stale(t) == {t.a, t.b, t.c} and stale(t, LACKS_EARLIER) == {t.a}
            records = t.sim.reg.list_stale(t.lin)
            assert max(records, key=lambda r: r.since).host_id == t.a  # the newest record
            misses = stale_by_chunk(records, t.sim.reg.cluster_map())[(t.lin, 0)]
            assert last_current((t.a, t.b, t.c), misses, 2) != t.a
            await heal_and_resync(t)
            view = t.sim.volume("v")
            got = {h: t.sim.replica_bytes(t.sim.hosts[h], view, chain, 0)[4096:8192]
                   for h in (t.a, t.b, t.c)}
            assert got == {h: new for h in (t.a, t.b, t.c)}, got
            nursery.cancel_scope.cancel()

    run(main)


async def no_copy_takes_w2(t, down: str) -> None:
    """W1 (ACKED) acknowledged and flushed on both copies; W2 fails on both (the gateway cut
    off from them): with min_size 1 neither stays current, both are recorded in one
    transaction, a tie the election breaks by placement order (c first). Then `down`'s
    host dies for good (declared down); the gateway's links heal."""
    await call(t.gw.write(0, ACKED, False))
    await call(t.gw.flush())
    t.faults.partition([t.sim.hosts[t.b].addr, t.sim.hosts[t.c].addr])
    with pytest.raises(VbpError):
        await call(t.gw.write(8192, FAILED, False))
    assert stale(t) == {t.b, t.c}
    t.sim.crash(down, declare_down=True)
    t.faults.heal()
    t.sim.sync_maps()
    await past_the_write_window(t)


async def past_the_write_window(t) -> None:
    for _ in range(5):  # (the gateway's lease kept)
        await trio.sleep(2)
        await t.sim.hosts[t.g].provider.renew_all()


def test_a_chunk_with_no_current_copy_elects_one_while_another_copy_is_down_for_good():
    """The copy the election takes (c: the records tie, c is first in placement) is up,
    b's host is down for good. The election used to wait for every copy's host, so the
    chunk's writes failed until b came back or an operator accepted a loss. b's record
    cannot come to change the outcome (a record's age is fixed at its creation; b's
    crash recovery or a backfill could only flag it, which passes over it more): c is
    elected now, and the chunk takes writes again, b's copy left stale to resync."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await no_copy_takes_w2(t, t.b)
            await t.sim.hosts[t.c].resync.run_once()
            assert stale(t) == {t.b}
            await call(t.gw.write(4096, NEW, False))  # (min_size 1: c alone takes it)
            await t.gw.refresh_stale(t.sim.hosts[t.g].stale_map)
            got = extents_bytes(await call(t.gw.read(0, 8192)), 0, 8192)
            assert got == ACKED + NEW
            nursery.cancel_scope.cancel()

    run(main)


def test_the_copy_the_election_takes_is_waited_for_while_its_host_is_down():
    """c, the copy the election takes, is on the host that went down: b, up, is not
    elected in its place while c's host is down, since c may hold writes b lacks (here
    it does not: it holds W1, flushed, as b does). c's host comes back, the election
    takes c, and both copies hold W1."""
    async def main():
        async with trio.open_nursery() as nursery:
            t = await two_copies(nursery)
            await no_copy_takes_w2(t, t.c)
            for _ in range(3):
                await t.sim.hosts[t.b].resync.run_once()
                await past_the_write_window(t)
            assert stale(t) == {t.b, t.c}
            with pytest.raises(BelowMinSize):
                await call(t.gw.write(4096, NEW, False))
            await t.sim.restart(t.c)
            await elect(t)
            await both_hold(t, ACKED)
            nursery.cancel_scope.cancel()

    run(main)
