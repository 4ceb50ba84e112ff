"""The gateway's read path (replicator/gateway.py) over in-memory hosts of the simulation
harness (tests/sim) with its background loops off, on a virtual clock.

Two ways a read could hand out or leave behind bytes that miss an acknowledged write:
- serving this host's copy while it is recorded stale (it missed writes) because no
  current copy answered: the client must get an error, as from a DRBD node whose disk is
  Outdated and whose peer is gone, never old data;
- repairing a local page that failed its checksum with bytes read from a peer while a
  write to the same range landed here meanwhile: the repair must not undo the write."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.sim.harness import Sim, call, extents_bytes
from vbp.errors import VbpError
from vbp.layout import MiB, ChunkKey


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


async def gateway_on_a_replica(nursery):
    """A started 3-host sim, a 1 MiB volume with replicas=2, min_size=1, and its gateway
    on one of the two replica hosts (a); b holds the other copy."""
    sim = Sim(1, hosts=3, zones=3)
    await sim.start(nursery, loops=False)
    rec = sim.create_volume("v", MiB, replicas=2, min_size=1)
    a, b = sim.hosts["h0"].cluster.replicas(rec.lineage, 0, 2)
    gw = await sim.hosts[a].provider.open_export("v")
    return sim, rec, gw, a, b


async def read(gw, offset, length) -> bytes:
    return extents_bytes(await call(gw.read(offset, length)), offset, length)


def in_pool(body) -> None:
    """Run `body(sim, rec, gw, a, b)` over gateway_on_a_replica's pool, then stop it."""
    async def main():
        async with trio.open_nursery() as nursery:
            await body(*await gateway_on_a_replica(nursery))
            nursery.cancel_scope.cancel()

    run(main)


def test_a_stale_local_copy_is_never_served_when_no_current_copy_answers():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 4096, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        # a misses an acknowledged write that b took, and is recorded stale for it
        sim.hosts[b].store.write(key, 0, b"\x02" * 4096, chunk_size=MiB)
        sim.reg.mark_stale(rec.lineage, 0, [a], 1)
        await sim.hosts[a].resync.refresh_stale_self()
        assert await read(gw, 0, 4096) == b"\x02" * 4096  # from b, the current copy
        sim.hosts[a].faults.partition([sim.hosts[b].addr])
        for offset, length in ((0, 4096), (0, 2 * 4096), (4096, 4096)):
            with pytest.raises(VbpError):
                got = await read(gw, offset, length)
                raise AssertionError(f"read {offset}+{length} served the stale copy: {got[:4]!r}")
        sim.hosts[a].faults.heal()
        assert await read(gw, 0, 4096) == b"\x02" * 4096

    in_pool(body)


def test_read_repair_never_undoes_a_write_that_landed_while_the_good_copy_was_read():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 0)
        sim.hosts[a].faults.delay = 1.0  # every call from a to b takes a second
        got = {}

        async def reader():
            got["read"] = await read(gw, 0, 4096)

        async def writer():
            await trio.sleep(0.5)  # while the read waits for b's copy
            await call(gw.write(0, b"\x03" * 4096, False))
            got["written"] = True

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            n.start_soon(writer)
        assert got["written"]
        assert got["read"] in (b"\x01" * 4096, b"\x03" * 4096)
        # every copy holds the acknowledged write, the repaired one too
        assert store_a.read(key, 0, 4096) == b"\x03" * 4096
        assert sim.hosts[b].store.read(key, 0, 4096) == b"\x03" * 4096
        sim.hosts[a].faults.delay = 0.0
        assert await read(gw, 0, 8192) == b"\x03" * 4096 + b"\x01" * 4096

    in_pool(body)


def test_read_repair_fixes_a_page_that_failed_its_checksum():
    async def body(sim, rec, gw, a, b):
        await call(gw.write(0, b"\x01" * 8192, False))
        key = ChunkKey(rec.lineage, 0, rec.head)
        store_a = sim.hosts[a].store
        store_a.corrupt(key, 1)
        await trio.sleep(0.01)  # the client gets the write's reply, then reads
        assert await read(gw, 4096, 4096) == b"\x01" * 4096
        assert store_a.read(key, 0, 8192) == b"\x01" * 8192  # no ChecksumError: repaired

    in_pool(body)
