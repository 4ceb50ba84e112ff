"""A gateway that takes a volume's lease over from a holder that never released it
reconciles the chunks that holder may have left divergent (VolumeGateway.
reconcile_after_takeover), over the in-memory hosts of the simulation harness."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from blockd.service import SETTLE_RETRY
from control import api
from replicator import messages as m
from replicator.gateway import VolumeGateway
from tests.sim.harness import Sim, SimFaults, call, extents_bytes, reconcile_failing_once, settled
from vbp.errors import Fenced
from vbp.layout import MiB, ChunkKey
from vbp.registry.base import P_ALIVE
from vbp.registry.kv import Delete


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def stale_hosts(sim, lineage, index):
    return {r.host_id for r in sim.reg.list_stale(lineage, index)}


async def written_by_h0(nursery, nbytes: int = 4096):
    """A started sim of 3 hosts and volume v (replicas=3, min_size=2) whose gateway on h0
    (returned: its holder) wrote `nbytes` of 1s at offset 0. Returns (sim, rec, gateway)."""
    sim = Sim(1, hosts=3, zones=3)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", 2 * MiB, replicas=3, min_size=2)
    old = await sim.hosts["h0"].provider.open_export("v")
    await call(old.write(0, b"\x01" * nbytes, False))
    return sim, rec, old


async def lone_write_left(nursery):
    """A started sim of 3 hosts, volume v (replicas=3, min_size=2) written through h0's
    gateway (8 KiB of 1s at 0), then a write of that holder in flight that reached one
    replica of chunk 0 only (the third in placement order: 4 KiB of 0xee at 0). Returns
    (sim, rec, the old gateway, chunk 0's key, that lone replica); the caller ends the old
    holder (sim.expire_lease)."""
    sim, rec, old = await written_by_h0(nursery, 8192)
    key = ChunkKey(rec.lineage, 0, rec.head)
    lone = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)[2]
    sim.hosts[lone].store.write(key, 0, b"\xee" * 4096, chunk_size=MiB)
    return sim, rec, old, key, lone


def test_a_write_the_old_holder_left_on_one_replica_is_reconciled_before_the_first_write():
    async def main():
        async with trio.open_nursery() as nursery:
            # the old holder dies with a write in flight that reached one replica only
            sim, rec, old, key, lone = await lone_write_left(nursery)
            await call(old.write(MiB, b"\x05" * 4096, False))  # (chunk 1: all agree)
            sim.expire_lease("v")  # never released: its holder stopped renewing
            new_host = next(h for h in ("h1", "h2") if h != "h0")
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(MiB + 4096, b"\x06" * 4096, False))  # takes the lease over
            # the lone copy is outvoted and recorded stale; the others stay current
            assert stale_hosts(sim, rec.lineage, 0) == {lone}
            assert not stale_hosts(sim, rec.lineage, 1)  # the copies of chunk 1 agree
            for h in sim.hosts.values():  # every gateway read now answers the same
                g = gw if h.id == new_host else None
                if g is not None:
                    got = extents_bytes(await call(g.read(0, 4096)), 0, 4096)
                    assert got == b"\x01" * 4096
            await sim.hosts[lone].resync.refresh_stale_self()
            await trio.sleep(sim.hosts[lone].resync.write_window)
            await sim.hosts[lone].resync.run_once()
            assert not stale_hosts(sim, rec.lineage, 0)
            for h in sim.hosts.values():
                assert h.store.read(key, 0, 4096) == b"\x01" * 4096, h.id
            nursery.cancel_scope.cancel()

    run(main)


def test_a_lease_released_cleanly_needs_no_reconcile():
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery, loops=False)
            sim.create_volume("v", MiB, replicas=3, min_size=2)
            lease = sim.reg.acquire_lease("v", "h0", 30)
            assert not lease.taken_over
            sim.reg.release_lease(lease)
            again = sim.reg.acquire_lease("v", "h1", 30)
            assert not again.taken_over  # released: nothing was in flight
            sim.expire_lease("v")
            assert sim.reg.acquire_lease("v", "h2", 30).taken_over  # expired, never released
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_that_does_not_answer_the_takeover_is_recorded_stale():
    """The lone copy holding the old holder's last write is up but does not answer the
    new holder while it reconciles (a stall, a one-way cut): the copies that answer
    agree, and the silent one, which nobody can compare later, is recorded stale."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, _, _, lone = await lone_write_left(nursery)
            new_host = next(h for h in ("h1", "h2") if h != lone)
            sim.expire_lease("v")
            faults = sim.hosts[new_host].faults
            faults.partition([sim.hosts[lone].addr])
            gw = await sim.hosts[new_host].provider.open_export("v")  # takes it over
            faults.heal()
            await call(gw.write(MiB + 4096, b"\x06" * 4096, False))
            assert stale_hosts(sim, rec.lineage, 0) == {lone}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_down_at_the_takeover_is_recorded_stale_for_the_chunks_found_dirty():
    """The lone copy holding the old holder's last write is cut off (its heartbeat lapsed,
    its process alive: a partition, not a crash, so it keeps no dirty marks of its own
    for a restart to find) when the new holder reconciles. The up copies agree, but the
    cut-off one, which nobody compares later, may hold what they lack: for the chunks
    found dirty it is recorded stale, or once back it would answer reads of them with
    bytes the other copies never had."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, _, key, lone = await lone_write_left(nursery)
            new_host = next(h for h in ("h1", "h2") if h != lone)
            lapse(sim, lone)
            sim.hosts[new_host].faults.partition([sim.hosts[lone].addr])
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(MiB + 4096, b"\x06" * 4096, False))  # takes the lease over
            assert stale_hosts(sim, rec.lineage, 0) == {lone}
            sim.hosts[new_host].faults.heal()
            sim.reg.heartbeat(lone, 30)  # back
            sim.sync_maps()
            assert sim.hosts[lone].store.read(key, 0, 4096) == b"\xee" * 4096
            assert stale_hosts(sim, rec.lineage, 0) == {lone}  # not current: resync repairs it
            nursery.cancel_scope.cancel()

    run(main)


class _LoseFirstFlushTo(SimFaults):
    """The first call to `address` carrying a Flush (the new holder's announcement of its
    token) fails, all else passes: a link that lost that one request."""

    def __init__(self, address: str):
        super().__init__(0)
        self.address = address

    def on_call(self, address, message):
        if address == self.address and isinstance(message, m.Flush) and self.address:
            self.address = ""
            return "partition"
        return super().on_call(address, message)


def test_a_copy_the_takeover_compares_refuses_the_old_holders_late_write():
    """The new holder's announcement of its token did not reach a replica (lost once: it is
    logged and passed over), and the reconcile then listed and compared that replica's copies: a write
    of the old holder still on its way lands there after the comparison, and the copies
    disagree with no record. Every copy the reconcile counts current must have learned the
    new token before it was compared (or be recorded stale)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery, 8192)
            sim.expire_lease("v")
            late, new_host = "h2", "h1"
            sim.hosts[new_host].faults = _LoseFirstFlushTo(sim.hosts[late].addr)
            sim.hosts[new_host].pool.faults = sim.hosts[new_host].faults
            await settled(await sim.hosts[new_host].provider.open_export("v"))  # takes it over
            assert sim.reg.lease_tokens()["v"] > old.token  # (and hands it back)
            # the old holder's write that was on the network all along reaches `late` now
            msg = m.WriteChunk("v", rec.lineage, 0, rec.head, (rec.head,), 0, b"\xee" * 4096,
                               MiB, 0, False, sim.hosts[late].cluster.epoch, old.token)
            try:
                sim.hosts[late].replica.handle(msg)
            except Fenced:
                pass
            else:  # taken: then the reconcile must not have counted that copy current
                assert late in stale_hosts(sim, rec.lineage, 0)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_the_takeover_cannot_list_leaves_the_lease_not_reconciled():
    """A replica up in the map does not answer the new holder's question of which chunks
    it wrote lately (a one-way cut). It may hold the old holder's last write in a chunk no
    other copy was written in: nobody compares that chunk, so the takeover is not
    reconciled, and the lease must not be handed back as if it were. The writes go on
    meanwhile: a partial cut must not stop the volume."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            sim.expire_lease("v")
            sim.hosts[new_host].faults.partition([sim.hosts[lone].addr])
            gw = await sim.hosts[new_host].provider.open_export("v")
            sim.hosts[new_host].faults.heal()
            await call(gw.write(0, b"\x06" * 4096, False))  # the volume stays writable
            # either the chunk was compared (the lone copy recorded stale), or the lease is
            # still owed a reconcile once handed back: whoever takes it next compares them
            if lone not in stale_hosts(sim, rec.lineage, 1):
                if sim.reg.get_lease("v") is not None:
                    gw.on_close(gw)  # the client goes: the lease is handed back
                    await trio.sleep(1)
                assert sim.reg.get_lease("v") is None
                assert sim.reg.lease_orphaned("v")
            nursery.cancel_scope.cancel()

    run(main)


async def lone_first_write(nursery):
    """A started sim (3 hosts, volume v: replicas=3, min_size=2) whose holder on h0 wrote
    chunk 0 on every copy, then a first write to chunk 1 (4 KiB of 0xee) that reached one
    replica only and was never acknowledged. Returns (sim, rec, lone, the new host)."""
    sim, rec, old = await written_by_h0(nursery)
    lone = sim.hosts["h0"].cluster.replicas(rec.lineage, 1, 3)[2]
    sim.hosts[lone].replica.handle(m.WriteChunk(
        "v", rec.lineage, 1, rec.head, (rec.head,), 0, b"\xee" * 4096, MiB, 0, False,
        sim.hosts[lone].cluster.epoch, old.token))
    return sim, rec, lone, next(h for h in ("h1", "h2") if h != lone)


def lapse(sim, lone: str) -> None:
    """The old holder's lease runs out (never released), and `lone`'s heartbeat lapses: it
    is cut off (down in the map), its process alive."""
    sim.expire_lease("v")
    sim.reg.kv.txn([], [Delete(P_ALIVE + lone.encode())])
    sim.sync_maps()


def agree_or_recorded(sim, rec, index):
    """Every copy of chunk `index` holds the same bytes, or those that differ from the
    new holder's view are recorded stale."""
    copies = {h.id: sim.replica_bytes(h, rec, (rec.head,), index) for h in sim.hosts.values()}
    stale = stale_hosts(sim, rec.lineage, index)
    current = {h: b for h, b in copies.items() if h not in stale}
    assert len(set(current.values())) == 1, (sorted(stale), {h: b[:1] for h, b in copies.items()})


def test_a_copy_cut_off_at_the_takeover_holding_the_only_trace_of_a_write_is_reconciled():
    """The lone copy of the old holder's first write to chunk 1 is cut off (heartbeat
    lapsed, process alive) when the new holder takes over; no other copy was written in
    chunk 1, so nothing names it. Once the partition heals, the copies must agree or the
    lone one be recorded stale; until then the lease owes the reconcile (handed back
    owing it)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            lapse(sim, lone)
            sim.hosts[new_host].faults.partition([sim.hosts[lone].addr])
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            sim.hosts[new_host].faults.heal()
            sim.reg.heartbeat(lone, 30)  # back
            sim.sync_maps()
            provider = sim.hosts[new_host].provider
            lease = provider.leases["v"]
            assert lease.token in provider.reconciling  # owed until the lone copy is asked
            assert gw.takeover_unheard == {lone}
            got = extents_bytes(await call(gw.read(MiB, 4096)), MiB, 4096)
            assert got == bytes(4096)
            await provider.reconcile_late()
            assert not gw.takeover_unheard and lease.token not in provider.reconciling
            agree_or_recorded(sim, rec, 1)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_takeover_long_after_the_holder_died_still_finds_its_last_writes():
    """The old holder dies with its first write to chunk 1 on one replica only; that
    replica's store is flushed since (another volume's flush cleans every chunk), and the
    client comes back through another host only after the replica's window of recent
    writes passed (a VM restarted minutes later). The takeover must still compare it."""
    async def later(sim, lone):
        sim.hosts[lone].store.flush()
        await trio.sleep(sim.hosts[lone].replica.recent_window + 1)

    taken_over_after(later)


def taken_over_after(between) -> None:
    """lone_first_write, then `await between(sim, lone)`, then a write through another
    host takes the lease over: the copies of chunk 1 agree or are recorded stale."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            await between(sim, lone)
            sim.expire_lease("v")
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            agree_or_recorded(sim, rec, 1)
            nursery.cancel_scope.cancel()

    run(main)


class _Slow(SimFaults):
    """Requests of type `kind` take `delay` seconds to leave: a takeover whose token
    announcement (Flush) or reconcile (DirtyChunks) takes a while."""

    def __init__(self, kind: type, delay: float):
        super().__init__(0)
        self.kind, self.slow = kind, delay

    def on_call(self, address, message):
        if isinstance(message, self.kind):
            return self.slow
        return super().on_call(address, message)


@pytest.mark.parametrize("step", [m.Flush, m.DirtyChunks], ids=["announcing", "reconciling"])
def test_a_client_gone_while_its_write_takes_the_lease_over_leaves_it_owing_the_reconcile(step):
    """The takeover happens at a client's first write (the old lease had not run out when
    it connected); the client goes while the new holder tells the hosts its token, or
    while the reconcile runs, its write cancelled. The lease is already ours (the last
    client's close hands it back); nothing was compared: it must go back owing the
    reconcile."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old, key, lone = await lone_write_left(nursery)
            new_host = next(h for h in ("h1", "h2") if h != lone)
            host = sim.hosts[new_host]
            gw = await host.provider.open_export("v")  # the old lease still runs: no takeover
            assert sim.reg.get_lease("v") is not None
            sim.expire_lease("v")  # never released: its holder stopped renewing
            host.faults = host.pool.faults = _Slow(step, 1.0)
            write = trio.CancelScope()

            async def client():
                with write:
                    await call(gw.write(MiB, b"\x06" * 4096, False))  # takes the lease over
            nursery.start_soon(client)
            await trio.sleep(0.5)  # in the step that is slow
            assert sim.reg.get_lease("v").holder == new_host
            gw.on_close(gw)  # the client leaves: its connection ends, its write is cancelled
            write.cancel()
            await trio.sleep(5)
            assert lone not in stale_hosts(sim, rec.lineage, 0)  # nothing was compared
            assert sim.reg.get_lease("v") is None
            assert sim.reg.lease_orphaned("v")  # the next holder compares the copies
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_before_the_takeover_answers_what_the_pool_settles_on():
    """A client connected while the old holder's lease still ran (no takeover at open),
    and the holder is gone for good: its last write reached two copies, not this host's.
    Reads went on after the lease ran out, unreleased, from this host's copy; the first
    write then took the lease over and the reconcile kept the two copies' bytes: the
    same read, with no write to it, answered otherwise. The record sync that finds the
    lease orphaned (blockd's, every 0.2 s) takes it over first, and reads wait for it."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            order = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            new_host = order[0]
            for h in order[1:]:
                sim.hosts[h].replica.handle(m.WriteChunk(
                    "v", rec.lineage, 0, rec.head, (rec.head,), 0, b"\xee" * 4096, MiB, 0,
                    False, sim.hosts[h].cluster.epoch, old.token))
            gw = await sim.hosts[new_host].provider.open_export("v")  # the old lease runs
            sim.expire_lease("v")  # never released
            await trio.sleep(2)
            await sim.hosts[new_host].provider.sync_records()  # (blockd's loop: every 0.2 s)
            first = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            await call(gw.write(MiB, b"\x06" * 4096, False))  # takes the lease over
            second = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            assert first == second, (first[:1], second[:1])
            nursery.cancel_scope.cancel()

    run(main)


def test_block_status_during_the_takeover_answers_what_the_pool_settles_on():
    """As reads: the holder is gone, its last write (chunk 1, which this host's copy
    never got) reached the two other copies, and the record sync is taking the orphaned
    lease over. NBD_CMD_BLOCK_STATUS asked meanwhile waits for it too: answered from this
    host's copy it reported a hole (zeros) where the read after it returns the write's
    bytes, and a client copying the volume by its block status (qemu-img convert,
    nbdcopy) skipped them."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            order = sim.hosts["h0"].cluster.replicas(rec.lineage, 1, 3)
            reader = next(h for h in order if h != "h0")
            for h in order:
                if h != reader:
                    sim.hosts[h].replica.handle(m.WriteChunk(
                        "v", rec.lineage, 1, rec.head, (rec.head,), 0, b"\xee" * 4096, MiB,
                        0, False, sim.hosts[h].cluster.epoch, old.token))
            gw = await sim.hosts[reader].provider.open_export("v")  # the old lease runs
            sim.expire_lease("v")  # never released
            await trio.sleep(2)
            await sim.hosts[reader].provider.sync_records()
            assert gw.settling is not None
            status = await call(gw.block_status(MiB, 4096))
            got = extents_bytes(await call(gw.read(MiB, 4096)), MiB, 4096)
            assert got == b"\xee" * 4096
            assert status == [(4096, 0)]  # data, not a hole
            nursery.cancel_scope.cancel()

    run(main)




async def reader_of_a_dead_holder(nursery, *, crash: bool):
    """A started sim (3 hosts, volume v: replicas=3, min_size=2) whose holder on h0 wrote
    4 KiB of 1s at 0; a reader opened v on h1 while that lease ran, then the lease ran out
    unreleased (`crash`: h0 died for good, down in the map). Returns (sim, reader)."""
    sim, rec, old = await written_by_h0(nursery)
    reader = await sim.hosts["h1"].provider.open_export("v")  # the old lease runs
    assert not reader.token
    if crash:
        sim.crash("h0")
        sim.sync_maps()
    sim.expire_lease("v")  # never released
    return sim, reader


@pytest.mark.parametrize("crash", [False, True], ids=["holder_up", "holder_down"])
def test_a_reader_hands_the_orphaned_lease_back_and_another_host_writes_at_once(crash):
    """The reader's record sync takes the orphaned lease over (reconciling the copies)
    and hands it back, its client writing nothing: a VM restarted on another host writes
    at once, where a kept lease made its write wait a lease period and fail. The reader
    reads on meanwhile (published, serve_until valid), and sees that host's write. With
    the dead holder down in the map (not asked: the reconcile is owed), the lease goes
    back still orphaned, and the reader does not take it over again for it."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, reader = await reader_of_a_dead_holder(nursery, crash=crash)
            provider = sim.hosts["h1"].provider
            await provider.sync_records()
            assert reader.settling is not None  # reads wait for it
            got = extents_bytes(await call(reader.read(0, 4096)), 0, 4096)
            assert got == b"\x01" * 4096 and reader.settling is None
            assert not reader.token and "v" not in provider.leases
            assert sim.reg.get_lease("v") is None  # handed back
            token = sim.reg.lease_tokens()["v"]
            orphaned = sim.reg.orphaned_lease("v")  # (owing the reconcile: h0 not asked)
            assert (orphaned.holder, orphaned.token) == ("", token) if crash else orphaned is None
            await trio.sleep(SETTLE_RETRY + 0.5)
            await provider.sync_records()
            assert reader.settling is None and sim.reg.lease_tokens()["v"] == token
            writer = await sim.hosts["h2"].provider.open_export("v")
            t0 = trio.current_time()
            await call(writer.write(0, b"\x06" * 4096, False))
            assert trio.current_time() - t0 < 1.0  # no lease to wait for
            assert sim.reg.get_lease("v").holder == "h2"
            await provider.sync_records()
            got = extents_bytes(await call(reader.read(0, 4096)), 0, 4096)
            assert got == b"\x06" * 4096 and not reader.token
            nursery.cancel_scope.cancel()

    run(main)


def test_readers_on_two_hosts_do_not_take_a_lease_owing_the_reconcile_from_each_other():
    """The dead holder is down in the map: every takeover's reconcile leaves it unheard,
    and the lease goes back owing the reconcile, orphaned. Readers of the volume on two
    hosts each take it over once at most; taking it over again from each other, each
    hand-back a new orphaned lease to the other, they would reconcile (and hold their
    reads) every second for as long as the host stays down."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            readers = {h: await sim.hosts[h].provider.open_export("v") for h in ("h1", "h2")}
            sim.crash("h0")
            sim.sync_maps()
            sim.expire_lease("v")  # never released

            async def rounds(n: int) -> None:
                for _ in range(n):
                    await trio.sleep(SETTLE_RETRY + 0.1)
                    for h, gw in readers.items():
                        await sim.hosts[h].provider.sync_records()
                        got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
                        assert got == b"\x01" * 4096
            await rounds(3)
            token = sim.reg.lease_tokens()["v"]
            assert token > old.token and sim.reg.lease_orphaned("v")  # still owed
            await rounds(5)
            assert sim.reg.lease_tokens()["v"] == token
            assert not any(gw.token for gw in readers.values())
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_whose_takeover_failed_takes_the_lease_over_again(monkeypatch):
    """The reader's takeover of the orphaned lease fails to reconcile (the registry did
    not take its marks): the lease goes back owing the reconcile, no holder named, and
    the reader's next record sync past SETTLE_RETRY takes it over again."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, reader = await reader_of_a_dead_holder(nursery, crash=False)
            calls = reconcile_failing_once(monkeypatch)
            provider = sim.hosts["h1"].provider
            await provider.sync_records()
            await call(reader.read(0, 4096))  # (waits for the takeover)
            assert len(calls) == 1 and sim.reg.orphaned_lease("v").holder == ""
            await provider.sync_records()  # too soon: not again yet
            assert reader.settling is None and len(calls) == 1
            await trio.sleep(SETTLE_RETRY)
            await provider.sync_records()
            await call(reader.read(0, 4096))
            assert len(calls) == 2 and not sim.reg.lease_orphaned("v")
            assert sim.reg.get_lease("v") is None and not reader.token
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_whose_client_writes_while_it_settles_keeps_the_lease():
    """A write comes while the reader's takeover of the orphaned lease reconciles: the
    lease is kept for it (handed back, the write would take it again at once), and the
    write goes on under it."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, reader = await reader_of_a_dead_holder(nursery, crash=False)
            host = sim.hosts["h1"]
            host.faults = host.pool.faults = _Slow(m.DirtyChunks, 1.0)
            await host.provider.sync_records()
            assert reader.settling is not None
            await call(reader.write(MiB, b"\x06" * 4096, False))  # waits for the settle
            assert reader.settling is None and reader.token
            assert host.provider.leases["v"].token == reader.token
            assert sim.reg.get_lease("v").holder == "h1"
            got = extents_bytes(await call(reader.read(MiB, 4096)), MiB, 4096)
            assert got == b"\x06" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_reader_opening_on_an_orphaned_lease_hands_it_back():
    """As at a record sync: a reader that opens the volume while its lease is orphaned
    takes it over (the reconcile) and hands it back; it did not keep it for its
    connection's life."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            sim.expire_lease("v")
            gw = await sim.hosts["h1"].provider.open_export("v")
            await settled(gw)  # (in the background)
            assert sim.reg.lease_tokens()["v"] > old.token  # taken over
            assert not gw.token and sim.reg.get_lease("v") is None
            assert not sim.reg.lease_orphaned("v")  # every host asked: reconciled
            got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)
            assert got == b"\x01" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_copy_not_asked_at_the_takeover_is_read_last_until_it_is():
    """As above, on four hosts: the new holder holds no copy of chunk 1, and the cut-off
    lone copy comes first in its placement. Back up, but not asked yet, it is read after
    the copies the takeover compared (which never took the unacknowledged write)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=4, zones=4)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 64 * MiB, replicas=3, min_size=2)
            cv = sim.hosts["h0"].cluster
            index = next(i for i in range(1, 64) if "h0" in cv.replicas(rec.lineage, i, 3)
                         and cv.replicas(rec.lineage, i, 3)[0] != "h0")
            placed = cv.replicas(rec.lineage, index, 3)
            lone, new_host = placed[0], next(h for h in sim.hosts if h not in placed)
            old = await sim.hosts["h0"].provider.open_export("v")
            await call(old.write(0, b"\x01" * 4096, False))
            sim.hosts[lone].replica.handle(m.WriteChunk(
                "v", rec.lineage, index, rec.head, (rec.head,), 0, b"\xee" * 4096, MiB, 0,
                False, sim.hosts[lone].cluster.epoch, old.token))
            lapse(sim, lone)
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            assert lone in gw.takeover_unheard
            sim.reg.heartbeat(lone, 30)  # back, not asked yet
            sim.sync_maps()
            got = extents_bytes(await call(gw.read(index * MiB, 4096)), index * MiB, 4096)
            assert got == bytes(4096)
            await sim.hosts[new_host].provider.reconcile_late()
            assert lone in stale_hosts(sim, rec.lineage, index)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_late_reconcile_during_a_lease_renewal_still_settles_the_lease():
    """The renewal loop replaces the lease object of an export (same token, a later
    expiry) while the late reconcile asks the host the takeover could not ask. That host
    answered, so the takeover is reconciled: the lease must no longer owe the reconcile,
    and go back clean (not orphaned) when its last client leaves."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            lapse(sim, lone)
            host = sim.hosts[new_host]
            gw = await host.provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            assert gw.takeover_unheard == {lone}
            sim.reg.heartbeat(lone, 30)  # back
            sim.sync_maps()
            provider = host.provider
            token = provider.leases["v"].token
            host.faults = host.pool.faults = _Slow(m.DirtyChunks, 1.0)
            nursery.start_soon(provider.reconcile_late)
            await trio.sleep(0.5)  # the late reconcile waits on the lone host's answer
            await provider.renew_all()
            assert provider.leases["v"].token == token
            await trio.sleep(2)
            assert not gw.takeover_unheard
            assert token not in provider.reconciling
            gw.on_close(gw)  # the client goes: the lease is handed back
            await trio.sleep(1)
            assert sim.reg.get_lease("v") is None
            assert not sim.reg.lease_orphaned("v")
            nursery.cancel_scope.cancel()

    run(main)


class _SilentTo(SimFaults):
    """Requests of type `kind` to `address` are lost (they time out)."""

    def __init__(self, address: str, kind: type):
        super().__init__(0)
        self.address, self.kind = address, kind

    def on_call(self, address, message):
        if address == self.address and isinstance(message, self.kind):
            return "drop"
        return super().on_call(address, message)


def test_a_host_that_took_the_token_but_not_the_reconcile_keeps_the_old_holders_marks():
    """The lone copy of the old holder's first write to chunk 1 learns the new holder's
    token (its Flush) but does not answer the takeover's DirtyChunks (slow, silent): it is
    left to the late reconcile. The new holder's writes reach it meanwhile, for longer
    than the replica's window. When it answers at last, it must still name chunk 1: the
    old holder's marks are what the late reconcile compares."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            sim.expire_lease("v")
            host = sim.hosts[new_host]
            host.faults = host.pool.faults = _SilentTo(sim.hosts[lone].addr, m.DirtyChunks)
            gw = await host.provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            assert gw.takeover_unheard == {lone}
            await trio.sleep(sim.hosts[lone].replica.recent_window + 1)
            await host.provider.renew_all()
            await call(gw.write(0, b"\x07" * 4096, False))  # reaches the lone copy too
            host.faults = host.pool.faults = SimFaults(0)  # it answers again
            await host.provider.reconcile_late()
            assert not gw.takeover_unheard
            agree_or_recorded(sim, rec, 1)
            nursery.cancel_scope.cancel()

    run(main)


def test_a_slow_takeover_at_open_holds_up_no_other_open(monkeypatch):
    """Opening a volume whose lease is orphaned takes it over (reconcile, maybe a wait for
    resyncs) in the background: VMs failing over to one host together must not open one
    after another behind each takeover (the provider's lock is held across an open)."""
    reconcile = VolumeGateway.reconcile_after_takeover

    async def slow(self, token):
        await trio.sleep(5)
        return await reconcile(self, token)

    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            sim.create_volume("w", MiB, replicas=3, min_size=2)
            sim.expire_lease("v")  # never released
            monkeypatch.setattr(VolumeGateway, "reconcile_after_takeover", slow)
            provider = sim.hosts["h1"].provider
            opened = {}

            async def open_(name):
                opened[name] = await provider.open_export(name)

            nursery.start_soon(open_, "v")
            await trio.sleep(0.1)
            t0 = trio.current_time()
            await open_("w")
            assert trio.current_time() - t0 < 1
            gw = opened["v"]
            got = extents_bytes(await call(gw.read(0, 4096)), 0, 4096)  # waits for it
            assert trio.current_time() - t0 >= 4 and got == b"\x01" * 4096
            assert sim.reg.lease_tokens()["v"] > old.token
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_past_a_shrunk_end_served_once_grown_back_waits_for_the_takeover():
    """Review: a reader (h1) adopted a shrink of v to 1 MiB; v is grown back to 2 MiB,
    its holder (h0) wrote chunk 1 on the two other copies only and its lease ran out
    unreleased. A read at 1 MiB, past the reader's end, waits for record syncs
    (VolumeGateway._unless_grown): the first finds the lease orphaned and starts its
    takeover (reads wait for it: VolumeGateway.settling), the second adopts the grow.
    The read then ran at once, from this host's copy (a hole: zeros), the takeover
    still under way; once it had reconciled the copies, the same read answered the
    holder's write. It waits for the takeover now, as any read does."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            reader = await h1.provider.open_export("v")  # the old lease runs
            shrunk: list = []

            async def shrink():
                shrunk.append(await sim.shrink("v", MiB))

            nursery.start_soon(shrink)
            while not shrunk:  # (the holder completes it at its record sync)
                await h0.provider.sync_records()
                await trio.sleep(0.05)
            for _ in range(2):  # the reader publishes the shrunk view, then adopts it
                await h1.provider.sync_records()
                await trio.sleep(0.01)
            assert reader.size == MiB
            grown = api.resize(sim.reg, "v", 2 * MiB)
            # the holder's last write, on chunk 1's copies other than the reader's host
            head = grown.head
            for h in sim.hosts["h0"].cluster.replicas(rec.lineage, 1, 3):
                if h != "h1":
                    sim.hosts[h].replica.handle(m.WriteChunk(
                        "v", rec.lineage, 1, head, (head,), 0, b"\xee" * 4096, MiB, 0,
                        False, sim.hosts[h].cluster.epoch, old.token))
            sim.expire_lease("v")  # never released
            await trio.sleep(2)
            # the takeover's announcement of its token to h2 is slow
            slow = sim.hosts["h2"].addr

            def on_call(address, message):
                return 1.0 if address == slow and type(message) is m.Flush else 0
            h1.faults.on_call = on_call
            got: list = []

            async def read():
                got.append(extents_bytes(await call(reader.read(MiB, 4096)), MiB, 4096))

            nursery.start_soon(read)
            await trio.sleep(0.01)
            await h1.provider.sync_records()  # publishes the grown view; takes the lease over
            assert reader.settling is not None
            await trio.sleep(0.01)
            await h1.provider.sync_records()  # adopts the grown view
            await settled(reader)
            await trio.sleep(0.01)
            assert reader.size == 2 * MiB
            again = extents_bytes(await call(reader.read(MiB, 4096)), MiB, 4096)
            assert again == b"\xee" * 4096
            assert got == [again]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_read_waiting_for_its_turn_waits_for_the_takeover_begun_meanwhile():
    """Review: a reader (h1) of v, limited to 1 IOPS; the holder (h0) wrote chunk 1 on
    the two other copies only and its lease ran out unreleased. A read at 1 MiB waits
    for its turn (a second, VolumeGateway._throttled); meanwhile the record sync finds
    the lease orphaned and starts its takeover (reads wait for it: settling). Its turn
    come, the read ran at once, from this host's copy (a hole: zeros), the takeover
    still under way; once it had reconciled the copies, the same read answered the
    holder's write. It waits for the takeover now, as a read that came during it does."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old = await written_by_h0(nursery)
            h1 = sim.hosts["h1"]
            reader = await h1.provider.open_export("v")  # the old lease runs
            api.set_limits(sim.reg, "v", iops=1)
            await h1.provider.sync_records()  # (the limits taken live)
            assert reader.qos is not None
            for h in sim.hosts["h0"].cluster.replicas(rec.lineage, 1, 3):
                if h != "h1":
                    sim.hosts[h].replica.handle(m.WriteChunk(
                        "v", rec.lineage, 1, rec.head, (rec.head,), 0, b"\xee" * 4096, MiB,
                        0, False, sim.hosts[h].cluster.epoch, old.token))
            sim.expire_lease("v")  # never released
            await trio.sleep(2)
            await call(reader.read(0, 4096))  # the one request of this second
            # the takeover's announcement of its token to h2 is slow
            slow = sim.hosts["h2"].addr
            h1.faults.on_call = lambda address, message: (
                3.0 if address == slow and type(message) is m.Flush else 0)
            got: list = []

            async def read():
                got.append(extents_bytes(await call(reader.read(MiB, 4096)), MiB, 4096))

            nursery.start_soon(read)
            await trio.sleep(0.01)
            assert not got  # waiting for its turn
            await h1.provider.sync_records()  # finds the lease orphaned: the takeover
            assert reader.settling is not None
            await settled(reader)
            await trio.sleep(1.0)
            again = extents_bytes(await call(reader.read(MiB, 4096)), MiB, 4096)
            assert again == b"\xee" * 4096
            assert got == [again]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_replica_restarted_before_the_takeover_still_names_the_dead_holders_last_write():
    """The old holder dies with its first write to chunk 1 on one replica only (never
    acknowledged). Before the client comes back through another host, that replica's
    blockd restarts: a clean stop (an upgrade: ChunkStore.close flushes with
    keep_hot=False, clearing every dirty mark), or a crash after another volume's flush
    pushed the chunk out of the hot set. Nothing is dirty, so crash recovery records
    nothing, and Replica.recent, in memory, starts empty: the store must hand back the
    marks its flush kept (ChunkStore._marks_kept, kept_marks), or the takeover that
    follows never compares chunk 1 and the copies disagree with no record (reads answer
    0xee or zeros depending on the copy asked)."""
    async def restarted(sim, lone):
        # a clean restart: the store's close flushes every dirty mark away, then the
        # process goes (the sim's crash of a flushed store keeps every byte)
        sim.hosts[lone].store.flush()
        sim.crash(lone, declare_down=False)
        await sim.restart(lone)
        sim.sync_maps()

    taken_over_after(restarted)


def test_a_reconcile_that_lost_its_lease_records_nothing(monkeypatch):
    """h1 takes h0's orphaned lease over and reconciles; its mark of the copy behind
    stalls past its lease. h2 takes the lease over, reconciles (the same verdict), the copy
    is resynced and h2's writes are acknowledged on all three. Then h1's mark goes
    through: it was made with no lease (the gateway's token is 0 until the reconcile
    ends) and recorded a copy current for h2 stale again, so h2's next write with one
    other copy unreachable failed below min_size (EIO). Under the lease it is refused
    (Fenced): nothing is recorded, and that write stands."""
    gate, stalled = trio.Event(), trio.Event()
    real = VolumeGateway._mark_stale

    async def slow_mark(self, index, hosts, replicas=None, token=0):
        if self.host_id == "h1" and not stalled.is_set():
            stalled.set()
            await gate.wait()  # h1's registry call stalls past its lease
        return await real(self, index, hosts, replicas, token)

    monkeypatch.setattr(VolumeGateway, "_mark_stale", slow_mark)

    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, old, key, lone = await lone_write_left(nursery)
            sim.expire_lease("v")  # h0 died with its write on `lone` only

            async def reader():  # h1 opens v: it takes the orphaned lease over
                try:
                    await sim.hosts["h1"].provider.open_export("v")
                except Fenced:  # (its reconcile's mark, refused)
                    pass

            nursery.start_soon(reader)
            await stalled.wait()
            t1 = sim.reg.get_lease("v").token
            sim.expire_lease("v")  # h1 stalls past its lease; h2 takes it over
            w = await sim.hosts["h2"].provider.open_export("v")
            await call(w.write(4096, b"\x07" * 4096, False))
            lease = sim.reg.get_lease("v")
            assert lease.holder == "h2" and lease.token > t1
            assert stale_hosts(sim, rec.lineage, 0) == {lone}  # h2's own verdict
            await sim.hosts[lone].resync.refresh_stale_self()
            await trio.sleep(sim.hosts[lone].resync.write_window)
            await sim.hosts[lone].resync.run_once()
            assert not stale_hosts(sim, rec.lineage, 0)
            await call(w.write(8192, b"\x08" * 4096, False))
            gate.set()  # h1's mark goes through now
            await trio.sleep(1)
            assert not stale_hosts(sim, rec.lineage, 0)
            other = next(h for h in ("h0", "h1", "h2") if h not in (lone, "h2"))
            sim.hosts["h2"].faults.partition([sim.hosts[other].addr])
            await call(w.write(12288, b"\x09" * 4096, False))  # on h2 and `lone`: min_size
            nursery.cancel_scope.cancel()

    run(main)
