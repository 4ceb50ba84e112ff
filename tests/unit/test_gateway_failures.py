"""Failures in the replicated write path (replicator/gateway.py): a copy that fails a write,
on any path (a retry after StaleEpoch, one chunk of several, a FUA write, a flush), is
recorded stale and the write stands while min_size copies took it; below that, or when the
record cannot be made, the client gets an error and nothing is acknowledged. Over the
in-memory hosts of the simulation harness (tests/sim) with its background loops off, on a
virtual clock."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from replicator import messages as m
from replicator.transport import FaultPolicy
from tests.sim.harness import Sim, call
from vbp.errors import RegistryUnavailable
from vbp.layout import MiB


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


async def two_replicas(nursery, hosts: int = 4, min_size: int = 1):
    """A started sim of `hosts` hosts and a 2 MiB volume (two 1 MiB chunks) with replicas=2,
    its gateway on a host holding no copy of chunk 0: (sim, rec, gw, a, b), a and b the
    copies of chunk 0."""
    sim = Sim(1, hosts=hosts, zones=hosts)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", 2 * MiB, replicas=2, min_size=min_size)
    a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
    gw_host = next(h for h in sim.hosts.values() if h.id not in (a, b))
    gw = await gw_host.provider.open_export("v")
    return sim, rec, gw, a, b


async def b_on_a_newer_map(sim, gw, a, b) -> None:
    """After a first write: a host of neither copy crashes (the epoch moves on) and b
    learns the new map, the gateway not (b refuses its next write: StaleEpoch)."""
    await call(gw.write(0, b"\x01" * 4096, False))
    other = next(h for h in sim.hosts if h not in (a, b, gw.host_id))
    sim.crash(other)
    sim.hosts[b].cluster.set_map(sim.reg.cluster_map())


def slow_flushes(gw, seconds: float) -> list[float]:
    """The gateway's Flush frames leave `seconds` late; returns the one-item list holding
    that delay, for the test to change as it goes."""
    delay = [seconds]
    gw.pool.faults = Per(lambda address, message: delay[0] if type(message) is m.Flush else None)
    return delay


def stale_hosts(sim, lineage, index=None):
    return {r.host_id for r in sim.reg.list_stale(lineage) if index is None or r.index == index}


class Per(FaultPolicy):
    """A fault policy deciding per call: `decide(address, message)` -> what on_call answers
    (None: deliver normally)."""

    def __init__(self, decide):
        super().__init__()
        self.decide = decide

    def on_call(self, address, message):
        got = self.decide(address, message)
        return 0 if got is None else got


def test_a_write_whose_retry_after_stale_epoch_times_out_stands_on_the_other_copy():
    """Copy b is on a newer map: it refuses the write (StaleEpoch) after a while (a busy
    host), the gateway reads the map again and sends it once more, and that retry gets no
    answer. b failed the write like any copy that times out: it is recorded stale, and the
    write stands on a (min_size 1)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await b_on_a_newer_map(sim, gw, a, b)
            old = gw.cluster.epoch
            b_addr = sim.hosts[b].addr

            def decide(address, message):
                if address == b_addr and type(message) is m.WriteChunk:
                    return 1.5 if message.epoch == old else "drop"
                return None

            gw.pool.faults = Per(decide)
            await call(gw.write(0, b"\x02" * 4096, False))
            assert gw.cluster.epoch > old  # the map was read again
            assert stale_hosts(sim, rec.lineage) == {b}
            nursery.cancel_scope.cancel()

    run(main)


def test_a_retry_after_stale_epoch_that_gets_no_answer_holds_back_no_other_copys_retry():
    """replicas=3, min_size=2: copies b and c are on a newer map and refuse the write
    (StaleEpoch) after a while; b's retry gets no answer, c's is answered. The retries go together: c
    takes the write in time, and it stands on a and c with b recorded stale (one after the
    other, c's waited out b's timeout, its write late or never sent, and the write failed)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=5, zones=5)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 2 * MiB, replicas=3, min_size=2)
            a, b, c = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 3)
            gw_host, other = [h for h in sim.hosts.values() if h.id not in (a, b, c)]
            gw = await gw_host.provider.open_export("v")
            await call(gw.write(0, b"\x01" * 4096, False))
            sim.crash(other.id)  # the epoch moves on
            for h in (b, c):
                sim.hosts[h].cluster.set_map(sim.reg.cluster_map())
            old = gw.cluster.epoch
            b_addr, c_addr = sim.hosts[b].addr, sim.hosts[c].addr

            def decide(address, message):
                if address in (b_addr, c_addr) and type(message) is m.WriteChunk:
                    if message.epoch == old:
                        return 1.5  # refused after a while (busy hosts)
                    if address == b_addr:
                        return "drop"
                return None

            gw.pool.faults = Per(decide)
            await call(gw.write(0, b"\x02" * 4096, False))
            assert stale_hosts(sim, rec.lineage) == {b}
            nursery.cancel_scope.cancel()

    run(main)


class Unreachable:
    """A registry whose calls named in `down` fail as an unreachable one's do."""

    def __init__(self, registry, down):
        self.registry, self.down = registry, down

    def __getattr__(self, name):
        fn = getattr(self.registry, name)
        if name not in self.down:
            return fn

        async def fail(*args, **kwargs):
            await trio.lowlevel.checkpoint()
            raise RegistryUnavailable(f"registry: {name} failed (unreachable)")

        return fail


@pytest.mark.parametrize("down", [("cluster_map",), ("cluster_map", "mark_stale")])
def test_a_write_whose_map_cannot_be_read_again_after_stale_epoch_is_settled(down):
    """Copy b is on a newer map and refuses the write (StaleEpoch); a took it. The gateway
    cannot read the map again (registry unreachable) to retry. b failed the write like any
    copy: recorded stale and the write stands on a (min_size 1), or, with the registry
    unreachable for the mark too, the write fails and b waits in `unrecorded` (before, the
    write failed with no record anywhere, a and b differing on its bytes)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await b_on_a_newer_map(sim, gw, a, b)
            gw_host = sim.hosts[gw.host_id]
            gw_host.registry = gw.registry = Unreachable(gw.registry, down)
            if "mark_stale" in down:
                with pytest.raises(RegistryUnavailable):
                    await call(gw.write(0, b"\x02" * 4096, False))
                assert [(i, missed) for i, _took, missed in gw.unrecorded] == [(0, (b,))]
                assert not stale_hosts(sim, rec.lineage)
            else:
                await call(gw.write(0, b"\x02" * 4096, False))
                assert stale_hosts(sim, rec.lineage) == {b}
            assert b in gw.stale[0]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_whose_client_goes_away_fails_no_flush_asked_meanwhile():
    """FLUSH F1 (one connection) is under way when F2 (another, multi-conn) is asked; F1's
    client goes away and its task is cancelled. F2 covers the writes F1 took: it makes them
    durable itself and succeeds, every copy healthy (before, it failed with EIO, "a flush
    under way failed: Cancelled"). Then nothing is left for a later flush."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            await call(gw.write(MiB, b"\x01" * 4096, False))

            def decide(address, message):
                return 0.5 if type(message) is m.Flush else None  # flushes take a while

            gw.pool.faults = Per(decide)
            with trio.CancelScope() as conn1:
                first = gw.flush()
                nursery.start_soon(call, gw.flush())  # (F2 started: waits for F1)
                second = gw._flushing
                conn1.deadline = trio.current_time() + 0.1  # F1's client goes away
                await call(first)
            assert conn1.cancelled_caught
            await second.done.wait()
            assert second.error is None, second.error
            assert not gw._unflushed
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_waiting_for_a_cancelled_one_waits_for_the_flush_that_took_its_writes():
    """F1 (its writes to chunk 0) is under way, F2 asked after it (a write to chunk 1
    since, its frames slow). F1's client goes away, and F3 is asked before F2 is done with
    its own hosts, its frames slower still. F2 must not succeed before F1's writes are
    durable: they were answered before F2 was asked (before, F1 put them back in
    _unflushed, F3 took them there, and F2, finding nothing left, succeeded with them
    still on their way to a and b)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            delay = slow_flushes(gw, 0.5)
            with trio.CancelScope() as conn1:
                first = gw.flush()  # F1: chunk 0's copies, 0.5 s
                await call(gw.write(MiB, b"\x01" * 4096, False))
                delay[0] = 1.0
                nursery.start_soon(call, gw.flush())  # F2: chunk 1's copies, 1 s
                second = gw._flushing
                conn1.deadline = trio.current_time() + 0.1  # F1's client goes away
                await call(first)
            assert conn1.cancelled_caught
            delay[0] = 10.0
            nursery.start_soon(call, gw.flush())  # F3 (may take F1's writes), 10 s
            await second.done.wait()
            assert second.error is None, second.error
            for h in (a, b):  # F1's writes, answered before F2 was asked, are durable
                assert not sim.hosts[h].store._dirty, f"{h}: F2 succeeded before F1's writes were durable"
            nursery.cancel_scope.cancel()

    run(main)


def test_a_flush_cancelled_while_waiting_keeps_the_next_one_waiting_too():
    """F0 (chunk 0) is under way, slow; F1 (chunk 1 written since) waits for it, and its
    client goes away. A flush asked next covers F0's writes too: it must not succeed
    before they are durable (before, F1 cleared the gateway's last flush on its way out,
    and the next one waited for nothing)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            delay = slow_flushes(gw, 5.0)
            nursery.start_soon(call, gw.flush())  # F0: chunk 0's copies, 5 s
            await trio.sleep(0.01)
            await call(gw.write(MiB, b"\x01" * 4096, False))
            delay[0] = 0.5
            with trio.CancelScope() as conn1:
                first = gw.flush()  # F1: chunk 1's copies, then F0
                conn1.deadline = trio.current_time() + 1  # its client goes away
                await call(first)
            assert conn1.cancelled_caught
            await call(gw.flush())
            for h in (a, b):  # F0's writes, answered before this flush was asked
                assert not sim.hosts[h].store._dirty, f"{h}: the flush succeeded before F0's writes were durable"
            nursery.cancel_scope.cancel()

    run(main)


def test_a_retry_after_stale_epoch_to_a_host_the_fresh_map_no_longer_has_fails_that_copy_only():
    """Copy b refuses the write (StaleEpoch); the map read again no longer has b at all (a
    host drained and removed meanwhile). Its retry fails like any copy that cannot be
    reached, and the write stands on a (min_size 1); before, the lookup of b's address
    raised KeyError out of the write."""
    import dataclasses

    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await b_on_a_newer_map(sim, gw, a, b)

            async def refresh_without_b():
                m = sim.reg.cluster_map()
                gw.cluster.set_map(dataclasses.replace(
                    m, epoch=m.epoch + 1, hosts=tuple(h for h in m.hosts if h.id != b)))
            gw.refresh_map = refresh_without_b
            await call(gw.write(0, b"\x02" * 4096, False))
            nursery.cancel_scope.cancel()

    run(main)


def test_writes_to_chunks_with_a_dead_copy_do_not_log_lines_per_write(caplog):
    """A dead peer fails every write to the chunks it holds a copy of, for as long as it
    stays in the data set: a replica_failed warning and a marked_stale line per write
    were thousands of lines a second under load. The first few are logged, then the
    rest of a period are counted (suppressed=N on the next line logged)."""
    dead = []

    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, gw, a, b = await two_replicas(nursery)
            await call(gw.write(0, b"\x01" * 4096, False))
            sim.crash(b)
            dead.append(b)
            caplog.set_level(logging.INFO, logger="vbp.gateway")
            for i in range(300):
                await call(gw.write(4096 * (i % 256), b"\x02" * 4096, False))
            assert b in stale_hosts(sim, rec.lineage, 0)
            nursery.cancel_scope.cancel()

    run(main)
    lines = [r.getMessage() for r in caplog.records if r.name == "vbp.gateway"
             and r.levelno >= logging.INFO]
    failed = [x for x in lines if "event=replica_failed" in x]
    marked = [x for x in lines if "event=marked_stale" in x]
    assert failed and f"hosts={dead[0]}:" in failed[0] and marked
    assert len(failed) <= 20 and len(marked) <= 20, (len(failed), len(marked))
