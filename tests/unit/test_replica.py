"""The replica role over the real peer transport: what it answers to requests a gateway
should never send (replicator/replica.py)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from replicator import messages as m
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from vbp.chunkstore import ChunkStore, MemoryChunkStore
from vbp.errors import InvalidArgument, NoSpace, NotFound
from vbp.layout import ChunkKey

pytestmark = pytest.mark.timeout(30)

CLUSTER = "replica"
CHUNK = 1 << 20


@asynccontextmanager
async def replica_server(tmp_path):
    """A Replica on a real chunk store behind serve_peers; yields (replica, pool, address)."""
    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    replica = Replica(store, "h2", lambda: 1)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_peers(
                replica.handle, "127.0.0.1", 0, cluster=CLUSTER, host_id="h2",
                task_status=task_status))
            async with PeerPool(CLUSTER, "h1", request_timeout=5) as pool:
                yield replica, pool, f"127.0.0.1:{port}"
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def zero(index: int, offset: int, length: int, chunk_size: int = CHUNK) -> m.ZeroChunk:
    return m.ZeroChunk("v", "lin", index, 1, (1,), offset, length, chunk_size, 0, False, 1, 1)


@pytest.mark.parametrize("index, offset, length, chunk_size", [
    (1, CHUNK - 4096, 8192, CHUNK),  # past the chunk's end
    (1, -4096, 4096, CHUNK),  # before its start
    (1, 0, -1, CHUNK),  # a negative length
    (1, 0, 4096, 12345),  # no chunk size at all
    (-1, 0, 4096, CHUNK),  # no chunk index
])
async def test_a_zero_out_of_range_is_refused_whether_or_not_the_chunk_is_here(
        tmp_path, index, offset, length, chunk_size):
    """Chunk 0 is on the replica, chunk 1 is not: a zeroing no chunk could take is
    refused (InvalidArgument) either way, not acknowledged where nothing is allocated
    yet: two copies of one chunk must not answer one request differently."""
    async with replica_server(tmp_path) as (replica, pool, address):
        w = m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, 1)
        assert type(await pool.call(address, w)) is m.Ok
        for i in (0, 1) if index == 1 else (index,):  # (chunk 0 held, 1 not)
            with pytest.raises(InvalidArgument):
                await pool.call(address, zero(i, offset, length, chunk_size))
        # nothing was noted for it either: no takeover is sent after a chunk not written
        assert replica.recently_written("lin", 1) == [0]
        assert await pool.call(address, zero(1, 0, 4096)) == m.Ok(0)  # a good one still is


def _write(index: int, token: int, volume: str = "v") -> m.WriteChunk:
    return m.WriteChunk(volume, "lin", index, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, token)


def _marks_run(afn):
    trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_live_holders_marks_go_once_it_wrote_a_window_later():
    """The chunks a takeover would compare are kept until the holder showed, by a later
    write, that it lived a window past them (their writes settled by then), not for a
    time: a holder that died keeps its last marks however late the takeover comes."""
    async def main():
        replica = Replica(MemoryChunkStore(None, 1 << 30), "h2", lambda: 1)
        replica.recent_window = 10
        replica.handle(_write(0, 1))
        replica.handle(_write(1, 1))
        await trio.sleep(600)  # the holder died: nothing shows its writes settled
        replica.forget_recent()
        assert replica.recently_written("lin", 1) == [0, 1]
        replica.handle(_write(2, 1))  # it lives: what it wrote a window before is settled
        replica.forget_recent()
        assert replica.recently_written("lin", 1) == [2]
        await trio.sleep(5)
        replica.handle(_write(3, 1))  # (half a window after 2: both kept)
        assert replica.recently_written("lin", 1) == [2, 3]
        assert replica.recently_written("lin", 2) == []

    _marks_run(main)


def test_a_new_holder_keeps_its_predecessors_marks_until_it_lived_a_window():
    """Token 2 takes the volume over: token 1's marks stay (a takeover compares them)
    until token 2's holder wrote a window past its first message here."""
    async def main():
        replica = Replica(MemoryChunkStore(None, 1 << 30), "h2", lambda: 1)
        replica.recent_window = 10
        replica.handle(_write(0, 1))
        replica.handle(_write(5, 1, volume="other"))  # another volume's marks are its own
        await trio.sleep(600)
        replica.handle(m.Flush("v", 1, 2))  # the new holder's token
        replica.handle(_write(1, 2))
        await trio.sleep(5)
        replica.handle(_write(2, 2))
        assert replica.recently_written("lin", 1) == [0, 1, 2, 5]
        await trio.sleep(6)
        replica.handle(_write(3, 2))
        assert replica.recently_written("lin", 1) == [2, 3, 5]
        assert set(replica.recent_before) == set()

    _marks_run(main)


def test_the_marks_of_chunks_no_longer_here_are_forgotten():
    """A dead holder's marks stay for a takeover however late, but not once their chunks
    left the store (the volume deleted and its chunks collected, a copy moved away):
    nothing here to compare, and a host serving many volumes in turn would keep them all."""
    async def main():
        replica = Replica(MemoryChunkStore(None, 1 << 30), "h2", lambda: 1)
        replica.recent_window = 10
        replica.handle(_write(0, 1))
        replica.handle(_write(1, 1))
        replica.handle(_write(2, 1, volume="gone"))
        replica.handle(m.Flush("v", 1, 2))  # (a newer holder: marks of the one before)
        await trio.sleep(600)
        replica.store.delete(ChunkKey("lin", 1, 1))
        replica.store.delete(ChunkKey("lin", 2, 1))
        replica.forget_recent()
        assert replica.recently_written("lin", 1) == [0]
        assert "gone" not in replica.recent and "gone" not in replica.recent_before
        replica.store.delete(ChunkKey("lin", 0, 1))
        replica.forget_recent()
        assert not replica.recent and not replica.recent_before

    _marks_run(main)


async def test_a_chunk_read_by_a_chain_with_a_collected_generation_is_gone(tmp_path):
    """After garbage collection freed generation 2 of lineage "lin" here (mark_collected:
    the volume reading it was deleted), a read or an allocation query by a chain holding
    generation 2 that resolves a chunk to nothing, or to the older generation 1, is
    refused with NotFound, never answered as a hole (zeros, "unallocated") or with the
    older bytes, which a gateway still reading the deleted volume would serve over data
    it wrote. A chain without generation 2 (a clone of a snapshot at generation 1) reads
    as before; so does a chunk that resolves to a generation newer than 2, and other
    lineages' holes."""
    async with replica_server(tmp_path) as (replica, pool, address):
        def read(index, chain, lineage="lin"):
            return m.ReadChunk("v", lineage, index, chain, 0, 4096, 1)

        def extents(index, chain):
            return m.ChunkExtents("lin", index, chain, 0, 4096, 1)

        def write(index, gen, chain, data):
            return m.WriteChunk("v", "lin", index, gen, chain, 0, data, CHUNK, 0, False, 1, 1)

        assert (await pool.call(address, read(3, (1, 2)))).gen == -1
        assert (await pool.call(address, extents(3, (1, 2)))).found is False
        assert type(await pool.call(address, write(0, 1, (1,), b"o" * 4096))) is m.Ok
        assert type(await pool.call(address, write(1, 3, (1, 2, 3), b"n" * 4096))) is m.Ok
        replica.store.mark_collected({"lin": {2}})
        for msg in (read(3, (1, 2)), extents(3, (1, 2)), read(0, (1, 2)), extents(0, (1, 2))):
            with pytest.raises(NotFound, match="gone"):
                await pool.call(address, msg)
        with pytest.raises(NotFound):
            replica.read("lin", 3, (1, 2), 0, 4096)
        assert (await pool.call(address, read(0, (1, 4)))).data == b"o" * 4096  # (a clone)
        assert (await pool.call(address, read(3, (1, 4)))).gen == -1
        assert (await pool.call(address, read(1, (1, 2, 3)))).data == b"n" * 4096
        assert (await pool.call(address, read(3, (1, 2), "other"))).gen == -1
        # the marks, for a resync about to drop a generation (CollectedGens)
        assert await pool.call(address, m.CollectedGens("lin")) == m.Gens((2,))
        assert await pool.call(address, m.CollectedGens("other")) == m.Gens(())


async def test_a_read_with_a_token_older_than_the_newest_seen_is_fenced(tmp_path):
    """ReadChunk.token (PEER_REV 8): a lease holder's reads carry its fencing token, and a
    replica that has seen a newer token for the volume (another gateway took the lease
    over and announced it) refuses them with Fenced, as it refuses that holder's writes.
    A read without a token (a reader, resync, scrub) or with the newest one is served."""
    from vbp.errors import Fenced

    async with replica_server(tmp_path) as (replica, pool, address):
        w = m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, 5)
        assert type(await pool.call(address, w)) is m.Ok

        def read(token):
            return m.ReadChunk("v", "lin", 0, (1,), 0, 4096, 1, "", False, token)

        assert (await pool.call(address, read(5))).data == b"x" * 4096
        replica.learn_tokens({"v": 7})  # (a takeover's announcement)
        with pytest.raises(Fenced):
            await pool.call(address, read(5))
        for token in (0, 7):
            assert (await pool.call(address, read(token))).data == b"x" * 4096
        # (the token names the volume: another volume's reads are not fenced by v's)
        other = m.ReadChunk("w", "lin", 0, (1,), 0, 4096, 1, "", False, 5)
        assert (await pool.call(address, other)).data == b"x" * 4096


# --- takeover marks kept through a restart (ChunkStore._marks_kept) ------------------------

def _marked_write(replica: Replica, volume: str, index: int, token: int = 7) -> None:
    replica.write(volume, "lin-" + volume, index, 1, (1,), 0, b"\x5a" * 4096, CHUNK, 0, False,
                  1, token)


def test_a_restarted_replica_still_names_the_chunks_a_flush_cleared_while_marked(tmp_path):
    """A clean stop clears every dirty mark (close flushes with keep_hot=False); the marks
    of the chunks still awaiting a takeover's compare come back from the store, for the
    volume they were written to, and a chunk deleted meanwhile comes back with none."""
    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    replica = Replica(store, "h2", lambda: 1)
    for index in (0, 3):
        _marked_write(replica, "v", index)
    _marked_write(replica, "w", 5)
    store.close()  # (a clean stop: no dirty mark left)

    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    assert not store.dirty_indexes("lin-v", 1)
    assert store.kept_marks == {ChunkKey("lin-v", 0, 1): "v", ChunkKey("lin-v", 3, 1): "v",
                                ChunkKey("lin-w", 5, 1): "w"}
    replica = Replica(store, "h2", lambda: 1)
    assert replica.recently_written("lin-v", 1) == [0, 3]
    assert replica.recently_written("lin-w", 1) == [5]
    store.delete(ChunkKey("lin-v", 3, 1))
    store.close()

    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    assert store.kept_marks == {ChunkKey("lin-v", 0, 1): "v", ChunkKey("lin-w", 5, 1): "w"}
    store.close()


def test_marks_forgotten_leave_the_store_at_the_next_flush_that_clears_marks(tmp_path):
    """A holder that lived a window past its writes settled them: their marks go from
    memory (forget_recent), and from the store at its next flush that clears dirty
    marks, so a later restart does not bring them back."""
    store = ChunkStore(tmp_path / "chunks", 64 << 20, hot_max=0)
    replica = Replica(store, "h2", lambda: 1)
    replica.recent_window = 10.0
    clock = [100.0]
    replica.now = lambda: clock[0]
    _marked_write(replica, "v", 0)
    store.flush()  # (hot_max 0: every flush clears every mark; the mark is kept)
    assert store.kept_marks == {}  # (what the open found: nothing yet)
    clock[0] = 200.0
    _marked_write(replica, "v", 1)  # the holder lives on, a window past its first write
    replica.forget_recent()
    assert replica.recently_written("lin-v", 1) == [1]
    store.flush()
    store.close()

    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    assert store.kept_marks == {ChunkKey("lin-v", 1, 1): "v"}
    store.close()


def test_a_damaged_takeover_mark_does_not_stop_the_store_opening(tmp_path):
    """Entries of the "marks" table that do not read (disk damage): the store opens; a
    key that names no chunk is dropped, a chunk whose volume name does not decode is
    still named for its lineage's takeovers."""
    import lmdb

    from vbp.chunkstore_files import enc_key

    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    replica = Replica(store, "h2", lambda: 1)
    _marked_write(replica, "v", 2)
    store.close()
    with lmdb.open(str(tmp_path / "chunks" / "index"), subdir=True, max_dbs=8) as env:
        marks = env.open_db(b"marks")
        with env.begin(write=True) as txn:
            txn.put(enc_key(ChunkKey("lin-v", 2, 1)), b"\xff\xfe", db=marks)
            txn.put(b"\x01", b"v", db=marks)
    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    try:
        assert list(store.kept_marks) == [ChunkKey("lin-v", 2, 1)]
        assert Replica(store, "h2", lambda: 1).recently_written("lin-v", 1) == [2]
    finally:
        store.close()


# --- review of the peer protocol (rev-peer) --------------------------------------------------


async def test_a_write_batch_of_absurdly_many_items_is_refused(tmp_path):
    """A gateway sends at most gateway.BATCH_ITEMS (64) writes in a WriteBatch; each item
    costs the replica's event loop about 2 µs and a note, and costs the sender 3 bytes.
    A batch of far more items than any gateway sends is bad input: refused whole
    (InvalidArgument), before any item is applied or noted."""
    async with replica_server(tmp_path) as (replica, pool, address):
        w = m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, 1)
        assert type(await pool.call(address, w)) is m.Ok
        n = 300_000
        batch = m.WriteBatch("v", "lin", 1, (1,), (0,) * n, (0,) * n, (0,) * n, b"", CHUNK,
                             False, 1, 1)
        with pytest.raises(InvalidArgument):
            await pool.call(address, batch)
        assert len(replica.written[("lin", 0)]) == 1  # nothing of the batch noted
        assert await pool.call(address, m.Ping(1)) == m.Pong("h2", 1)


async def test_a_write_out_of_range_is_not_noted(tmp_path):
    """As for a zeroing (above): a write no chunk could take is refused, and nothing is
    noted for it, whether or not the chunk is here."""
    async with replica_server(tmp_path) as (replica, pool, address):
        w = m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, 1)
        assert type(await pool.call(address, w)) is m.Ok
        notes = {k: list(v) for k, v in replica.written.items()}
        for i in (0, 1):  # (chunk 0 held, 1 not)
            bad = m.WriteChunk("v", "lin", i, 1, (1,), CHUNK - 4096, b"y" * 8192, CHUNK, 0,
                               False, 1, 1)
            with pytest.raises(InvalidArgument):
                await pool.call(address, bad)
        assert replica.written == notes


def test_a_write_that_failed_part_way_is_noted(monkeypatch):
    """A write the store took and failed part-way (a full disk): some of it may be on the
    copy, so it is noted as any write is, for resync's window and a takeover's compare."""
    replica = Replica(MemoryChunkStore(None, 1 << 30), "h2", lambda: 1)
    _marked_write(replica, "v", 0)
    replica.written.clear()
    replica.recent.clear()

    def full(*args, **kwargs):
        raise NoSpace("the disk is full")

    monkeypatch.setattr(replica.store, "write", full)
    with pytest.raises(NoSpace):
        _marked_write(replica, "v", 0)
    assert list(replica.written) == [("lin-v", 0)]
    assert replica.recently_written("lin-v", 1) == [0]


async def test_a_full_disk_does_not_log_a_line_per_refused_write(tmp_path, caplog):
    """A replica whose disk is full refuses every write that needs a new chunk (NoSpace):
    a warning per refusal was a line per client write, thousands a second. The first
    few are logged, then the rest of a period are counted."""
    caplog.set_level(logging.INFO, logger="vbp.replica")
    async with replica_server(tmp_path) as (replica, pool, address):
        index = 0
        while True:  # fill the store (64 MiB, 1 MiB chunks)
            try:
                await pool.call(address, _write(index, 1))
            except NoSpace:
                break
            index += 1
        caplog.clear()
        for i in range(300):
            with pytest.raises(NoSpace):
                await pool.call(address, _write(index + i, 1))
    lines = [r.getMessage() for r in caplog.records if r.name == "vbp.replica"
             and r.levelno >= logging.WARNING]
    assert lines and "error=NoSpace" in lines[0]
    assert len(lines) <= 20, len(lines)
