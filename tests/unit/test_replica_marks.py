"""Writes queued behind their chunk's dirty mark (replicator/replica.py): a real ChunkStore,
the marks recorded by one commit in a worker thread, the queued writes applied in order."""

from __future__ import annotations

import trio

from replicator.replica import Replica
from vbp.chunkstore import ChunkStore
from vbp.layout import MiB, ChunkKey

CS = MiB


def write(rep: Replica, index: int, offset: int, data: bytes):
    return rep.write_in_order("v", "L", index, 0, (0,), offset, data, CS, 0, False, 1, 1)


def zero(rep: Replica, index: int, offset: int, length: int):
    return rep.zero_in_order("v", "L", index, 0, (0,), offset, length, CS, 0, False, 1, 1)


async def settle(results):
    return [r if type(r) is int else await r for r in results]


def test_writes_to_a_clean_chunk_wait_for_one_mark_and_apply_in_their_order(tmp_path):
    async def main():
        with ChunkStore(tmp_path / "s", 64 * MiB) as store:
            rep = Replica(store, "h1", lambda: 1)
            assert type(write(rep, 0, 0, b"\x01" * 8192)) is int  # a new chunk is born dirty
            store.flush()
            assert store.needs_mark(ChunkKey("L", 0, 0))
            results = []
            for i in range(40):  # overlapping writes and zeroes, all queued behind one mark
                if i % 7 == 3:
                    results.append(zero(rep, 0, 0, 4096 * (1 + i % 3)))
                else:
                    results.append(write(rep, 0, 4096 * (i % 3), bytes([i + 2]) * 8192))
            assert all(type(r) is not int for r in results)
            versions = await settle(results)
            assert versions == sorted(versions) and len(set(versions)) == 40
            # the last of each page's writes wins, as if applied inline in order
            want = bytearray(b"\x01" * 8192 + bytes(CS - 8192))
            for i in range(40):
                if i % 7 == 3:
                    want[0:4096 * (1 + i % 3)] = bytes(4096 * (1 + i % 3))
                else:
                    o = 4096 * (i % 3)
                    want[o:o + 8192] = bytes([i + 2]) * 8192
            assert store.read(ChunkKey("L", 0, 0), 0, 4 * 4096) == bytes(want[:4 * 4096])
            assert rep.marks == 1
            assert type(write(rep, 0, 0, b"x" * 4096)) is int  # dirty now: inline again

    trio.run(main)


def test_many_clean_chunks_are_marked_by_few_commits_and_durably(tmp_path):
    async def main():
        with ChunkStore(tmp_path / "s", 64 * MiB) as store:
            rep = Replica(store, "h1", lambda: 1)
            for i in range(20):
                write(rep, i, 0, b"\x01" * 4096)
            store.flush()
            pending = [write(rep, i, 4096, bytes([i]) * 4096) for i in range(20)]
            assert all(type(r) is not int for r in pending)
            await settle(pending)
            assert rep.marks == 1
            for i in range(20):
                assert not store.needs_mark(ChunkKey("L", i, 0))
                assert store.read(ChunkKey("L", i, 0), 4096, 4096) == bytes([i]) * 4096
            # the records are committed in the index (what a restart after a crash reads)
            with store._env.begin() as txn:
                assert sum(1 for _ in txn.cursor(db=store._db["dirty"])) == 20
            assert store.check() == []

    trio.run(main)


def test_writes_outside_trio_and_to_dirty_chunks_are_inline(tmp_path):
    with ChunkStore(tmp_path / "s", 64 * MiB) as store:
        rep = Replica(store, "h1", lambda: 1)
        write(rep, 0, 0, b"\x01" * 4096)
        store.flush()
        assert type(write(rep, 0, 0, b"\x02" * 4096)) is int  # no trio run: marked inline
        assert store.read(ChunkKey("L", 0, 0), 0, 4096) == b"\x02" * 4096


def test_a_refused_queued_write_gets_its_own_error_and_the_others_apply(tmp_path):
    async def main():
        with ChunkStore(tmp_path / "s", 64 * MiB) as store:
            rep = Replica(store, "h1", lambda: 1)
            write(rep, 0, 0, b"\x01" * 4096)
            store.flush()
            first = write(rep, 0, 0, b"\x02" * 4096)
            rep.check_token("v", 5)  # a newer gateway's token arrives first
            fenced = write(rep, 0, 0, b"\x03" * 4096)  # token 1 < 5: refused when applied
            out = []
            for r in (first, fenced):
                try:
                    out.append(await r)
                except Exception as e:  # noqa: BLE001 - the test looks at the type
                    out.append(type(e).__name__)
            assert out[1] == "Fenced" and out[0] == "Fenced"  # both applied after the token moved
            assert store.read(ChunkKey("L", 0, 0), 0, 4096) == b"\x01" * 4096

    trio.run(main)


def test_a_queued_local_write_is_covered_by_the_next_flush_after_it_completes():
    """replicas=1, the chunk on the gateway's host: a flush that runs while the write
    waits for the chunk's dirty mark does not cover it; the next one must (the gateway's
    unflushed set names this host again once the write completes)."""
    import trio.testing

    from tests.sim.harness import Sim, call

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=2, zones=2)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", 4 * MiB, replicas=1, min_size=1)
            gw = await sim.hosts["h0"].provider.open_export("v")
            local = next(i for i in range(4) if sim.hosts["h0"].cluster.write_set(rec.lineage, i, 1) == ("h0",))
            await call(gw.write(local * MiB, b"\x01" * 4096, False))
            await call(gw.flush())  # the chunk is clean: its next write waits for the mark
            pending = gw.write(local * MiB, b"\x02" * 4096, False)
            assert pending is not None and hasattr(pending, "__await__")
            gw._unflushed = {}  # a flush ran meanwhile (it cannot have covered the write)
            await pending
            assert local in gw._unflushed.get("h0", ())
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
