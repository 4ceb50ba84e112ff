"""Resync (replicator/recovery.py) over the in-memory hosts of the simulation harness
(tests/sim) with its background loops off, on a virtual clock: each step is driven by hand.
tests/unit/test_replication_stale.py covers its interplay with the write path."""

from __future__ import annotations

import trio
import trio.testing

from blockd.qos import TokenBucket
from tests.sim.harness import Sim, call
from vbp.layout import MiB


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def notes_of(host) -> int:
    return sum(len(w) for w in host.replica.written.values())


def test_a_long_throttled_recovery_keeps_no_note_of_writes_the_window_passed():
    """A host back from a long outage resyncs much, throttled by recovery_rate: one pass
    over its records took hours. Every client write the host took meanwhile, to any chunk,
    left a note in Replica.written that only the start of the next pass forgets, so the
    notes (and each _check_quiet's scan of them) grew with the pass: with guests writing
    at thousands of IOPS, gigabytes. A pass starts no chunk past `pass_time`: the next one
    lists the records again and forgets what the window passed."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=2, zones=2)
            await sim.start(nursery, loops=False)
            sim.create_volume("v", 128 * MiB, replicas=2, min_size=1)
            gw = await sim.hosts["h0"].provider.open_export("v")
            faults = sim.hosts["h0"].faults
            faults.partition([sim.hosts["h1"].addr])
            for i in range(64):  # 64 MiB that h1 misses
                await call(gw.write(i * MiB, b"\x01" * MiB, False))
            faults.heal()
            h1 = sim.hosts["h1"]
            resync = h1.resync
            resync.limiter = TokenBucket(256 * 1024, 64 * 1024, trio.current_time)  # ~256 s

            async def recover():  # as Blockd._recover
                while True:
                    await resync.run_once()
                    await trio.sleep(1)

            async def renew():  # as Blockd._renew_leases
                while True:
                    await trio.sleep(sim.lease_ttl / 3)
                    await sim.hosts["h0"].provider.renew_all()

            nursery.start_soon(recover)
            nursery.start_soon(renew)
            most = 0
            for _ in range(240):  # a guest writing a chunk h1 is current for, once a second
                await call(gw.write(100 * MiB, b"\x02" * 4096, False))
                most = max(most, notes_of(h1))
                await trio.sleep(1)
            assert resync.stats.chunks < 64  # the recovery is still under way
            # the writes of the last pass_time, write window and a chunk's copy, at most
            bound = 30 + resync.write_window + 8 * 4 + 10  # (pass_time: 30 s)
            assert most <= bound, f"{most} notes kept, {bound} expected at most"
            nursery.cancel_scope.cancel()

    run(main)


def test_a_crash_left_unsynced_is_recorded_stale_even_after_a_start_that_failed(tmp_path):
    """blockd records the chunks its crash left unsynced stale before it serves
    (Resync.mark_recovered): they may miss writes the other copies took. The store's
    recovery at open lists them once, and a clean close forgets them. A first start after
    the crash that could not reach the registry (etcd back later than the host, after a
    power loss) failed, closed the store cleanly on its way out, and the next start found
    nothing to record: the copy counted as current while missing writes."""
    from blockd.config import Config
    from blockd.service import Blockd
    from vbp.chunkstore import ChunkStore
    from vbp.layout import ChunkKey
    from vbp.registry import open_registry
    from vbp.volume import new_volume

    reg_url = f"lmdb://{tmp_path / 'registry'}"
    reg = open_registry(reg_url)
    rec = new_volume("v", 4 * MiB, replicas=2, min_size=1, chunk_size=MiB, lineage="l0",
                     head=1, now=0.0)
    reg.create_volume("v", rec.to_dict())
    data = tmp_path / "h1"
    store = ChunkStore(data / "chunks", 64 * MiB)
    store.write(ChunkKey("l0", 0, 1), 0, b"\x01" * 4096, chunk_size=MiB)
    store._close_files()  # killed before a flush: the chunk is dirty

    def cfg(registry: str) -> Config:
        return Config(host_id="h1", data_dir=str(data), registry=registry,
                      listen="127.0.0.1:0", nbd="127.0.0.1:0", capacity=64 * MiB)

    async def start(registry: str) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(Blockd(cfg(registry)).run)
            nursery.cancel_scope.cancel()

    try:
        trio.run(start, "etcd://127.0.0.1:9")  # nothing listens there
    except Exception as e:  # (in the nursery's ExceptionGroup)
        assert "unreachable" in repr(e)
    else:
        raise AssertionError("blockd started without its registry")
    trio.run(start, reg_url)
    assert [(r.lineage, r.index, r.host_id) for r in reg.list_stale()] == [("l0", 0, "h1")]
    reg.clear_stale("l0", 0, "h1")  # resynced; recorded once, the store lists it no more
    trio.run(start, reg_url)
    assert reg.list_stale() == []


def test_a_host_with_nothing_to_resync_lists_no_stale_records_while_none_is_made():
    """Every host's resync pass listed every stale record of the pool each second, also
    with none of its own: a host down for an hour leaves a record for each chunk it holds
    that was written meanwhile, and every other host read them all again every second.
    A pass that found none of this host's lists again only once a record was made since
    (the registry's stale_seq, put by every creation), and then finds a new one of ours."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 8 * MiB, replicas=2, min_size=1)
            placed = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
            other = next(h for h in sim.hosts if h not in placed)  # holds no copy of chunk 0
            stale_host = placed[1]
            for i in range(4):
                sim.reg.mark_stale(rec.lineage, i + 4, [other], 1)  # someone else's records
            resync = sim.hosts[stale_host].resync
            lists = []
            real = sim.hosts[stale_host].registry.list_stale

            async def counting(*args):
                lists.append(args)
                return await real(*args)

            sim.hosts[stale_host].registry.list_stale = counting
            for _ in range(5):
                assert await resync.run_once() == 0
            assert len([a for a in lists if not a]) == 1  # one listing, then none
            sim.reg.mark_stale(rec.lineage, 0, [stale_host], 1)  # now one of its own
            await resync.run_once()
            assert (rec.lineage, 0) in sim.hosts[stale_host].replica.stale_self or \
                not sim.reg.list_stale(rec.lineage, 0)  # (learnt, or resynced already)
            assert len([a for a in lists if not a]) >= 2
            nursery.cancel_scope.cancel()

    run(main)


def test_the_count_of_copies_held_back_for_space_drops_once_none_is_left():
    """`vbp pool status` says "N chunk copies wait for space" from the last resync pass's
    count. A pass that found none of this host's stale records left the count as it was:
    once the held-back records went another way (accept-loss, the volume deleted), the
    host said copies waited for space that did not exist."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=2, zones=2)
            await sim.start(nursery, loops=False)
            resync = sim.hosts["h1"].resync
            resync.held_full = 7  # (a pass held 7 back, their records since gone)
            assert await resync.run_once() == 0
            assert resync.held_full == 0
            nursery.cancel_scope.cancel()

    run(main)


async def _resync_under_a_guest(sim, gw, guest, seconds: float = 120.0, drive: bool = True):
    """`guest` writes h0's export `gw` every 2 s; h1 resyncs: its resync driven once after
    each write (`drive`; h0's lease renewed meanwhile), as Blockd._recover would, or by
    the harness's own loops. When chunk 0's stale record cleared (None: not in
    `seconds`)."""
    h1 = sim.hosts["h1"]
    lineage = gw.lineage
    async with trio.open_nursery() as nursery:
        async def renew():  # as Blockd._renew_leases
            while True:
                await trio.sleep(sim.lease_ttl / 3)
                await sim.hosts["h0"].provider.renew_all()

        if drive:
            nursery.start_soon(renew)
        start = trio.current_time()
        cleared = None
        while trio.current_time() - start < seconds:
            await guest()
            if drive:
                await h1.resync.run_once()
            if not sim.reg.list_stale(lineage, 0):
                cleared = trio.current_time() - start
                break
            await trio.sleep(2)
        nursery.cancel_scope.cancel()
    return cleared


def test_a_snapshot_generation_missing_here_is_made_while_a_guest_writes_the_head():
    """h1 missed two snapshots' copy-ups of chunk 0 (generations 2 and 3 on h0 only).
    Back, it must make generation 2 while a guest writes the head (3) every 2 s, within
    the write window: a write to the chunk's head cannot be undone by making another
    generation. The chunk-wide check for recent writes deferred it at every pass, for
    good."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(7, hosts=2, zones=2)
            await sim.start(nursery)  # (its loops on: a snapshot completes through them)
            rec = sim.create_volume("v", 4 * MiB, replicas=2, min_size=1)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            gw = await h0.provider.open_export("v")
            await call(gw.write(0, b"A" * 4096, False))  # generation 1, both copies
            h0.faults.partition([h1.addr])
            h1.faults.partition([h0.addr])
            await sim.snapshot("v", "s1")
            await call(gw.write(8192, b"B" * 4096, False))  # generation 2, h0 only
            await sim.snapshot("v", "s2")
            await call(gw.write(8192, b"C" * 4096, False))  # generation 3, h0 only
            h0.faults.heal()
            h1.faults.heal()
            assert h0.store.gens(rec.lineage, 0) == [1, 2, 3]
            assert h1.store.gens(rec.lineage, 0) == [1]

            async def guest():  # a page of the head, the same bytes on both copies
                await call(gw.write(200 * 4096, b"G" * 4096, False))

            assert await _resync_under_a_guest(sim, gw, guest, drive=False) is not None
            assert h1.store.gens(rec.lineage, 0) == [1, 2, 3]
            for g in (1, 2, 3):
                key = next(k for k in h0.store.keys() if k.index == 0 and k.gen == g)
                cs = rec.chunk_size
                assert h1.store.read(key, 0, cs) == h0.store.read(key, 0, cs), g
            nursery.cancel_scope.cancel()

    run(main)


def test_a_stale_page_converges_while_a_guest_writes_a_sector_of_it():
    """h1 missed a write of page 0. Back, a guest writes 512 bytes of that page every
    2 s: each write lands on both copies, but the rest of the page stays the old bytes
    on h1. The run of pages with a recent write was deferred at every pass, for good;
    its recent bytes are now kept and the rest taken from the source."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(8, hosts=2, zones=2)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 4 * MiB, replicas=2, min_size=1)
            h0, h1 = sim.hosts["h0"], sim.hosts["h1"]
            gw = await h0.provider.open_export("v")
            await call(gw.write(0, b"A" * 4096, False))
            h0.faults.partition([h1.addr])
            h1.faults.partition([h0.addr])
            await call(gw.write(0, b"B" * 4096, False))  # h1 misses it: recorded stale
            h0.faults.heal()
            h1.faults.heal()
            assert [r.host_id for r in sim.reg.list_stale(rec.lineage, 0)] == ["h1"]
            sector = iter(range(1, 1000))

            async def guest():
                await call(gw.write(0, bytes([next(sector)]) * 512, False))

            assert await _resync_under_a_guest(sim, gw, guest) is not None
            key = next(k for k in h0.store.keys() if k.index == 0)
            assert h1.store.read(key, 0, 4096) == h0.store.read(key, 0, 4096)
            assert h1.store.read(key, 512, 3584) == b"B" * 3584
            nursery.cancel_scope.cancel()

    run(main)
