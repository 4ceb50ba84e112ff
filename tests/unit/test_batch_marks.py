"""Dirty marks in batches (vbp/chunkstore.py, "before the first write to a chunk after a
flush: the chunk is recorded dirty, durably"): a batch of NBD writes to chunks a flush
marked clean pays one synced index commit, not one per chunk (ChunkStore.mark_dirty,
VolumeGateway.prepare_writes, the NBD server's batches), and so does a batch of peer
writes at a replica (Replica.prepare, serve_peers' batches); and a flush clears marks only
once a quarter of the hot set has built up past it, so a flush of a guest writing all
over a large volume stays one fdatasync.

Commits are counted by wrapping the store's LMDB transaction (the seam the power-loss
tests use); the writes go through the real NBD server, gateway and on-disk store."""

from __future__ import annotations

import struct

import pytest
import trio

import vbp.chunkstore as chunkstore
import vbp.chunkstore_files as files
from nbd_frontend import proto
from nbd_frontend.server import serve_nbd
from replicator import messages as m
from replicator.codec import CLOSED
from replicator.replica import Replica
from tests.unit.test_gateway_local_writes import one_host
from tests.unit.test_nbd_server import Client
from tests.unit.test_peer_transport import next_reply, raw_client, server
from vbp.chunkstore import ChunkStore
from vbp.errors import InvalidArgument
from vbp.layout import MiB, ChunkKey

pytestmark = pytest.mark.timeout(60)
CS = 1 << 20


@pytest.fixture
def commits(monkeypatch):
    """The number of LMDB write transactions the store committed (a list of one int)."""
    n = [0]
    orig = files.Txn.__exit__

    def counted(self, exc_type, exc, tb):
        if exc_type is None:
            n[0] += 1
        return orig(self, exc_type, exc, tb)

    monkeypatch.setattr(files.Txn, "__exit__", counted)
    return n


def key(i: int) -> ChunkKey:
    return ChunkKey("lin", i, 0)


def test_mark_dirty_marks_the_clean_chunks_in_one_commit(tmp_path, commits, monkeypatch):
    monkeypatch.setattr(chunkstore, "HOT_MAX", 0)  # every flush clears every mark
    with ChunkStore(tmp_path, 64 * MiB) as store:
        for i in range(6):
            store.write(key(i), 0, b"\1" * 4096, chunk_size=CS)
        store.flush()
        assert store.dirty_indexes("lin", 0) == [] and store.has_clean()
        before = commits[0]
        store.mark_dirty([key(0), key(2), key(4), key(99)])  # 99: not here, left alone
        assert commits[0] == before + 1
        assert store.dirty_indexes("lin", 0) == [0, 2, 4]
        store.mark_dirty([key(0), key(2)])  # marked already: no commit at all
        assert commits[0] == before + 1
        for i in (0, 2, 4):  # their writes commit nothing more
            store.write(key(i), 4096, b"\2" * 4096, chunk_size=CS)
        assert commits[0] == before + 1
        store.write(key(1), 4096, b"\2" * 4096, chunk_size=CS)  # not prepared: its own
        assert commits[0] == before + 2
        store.mark_dirty([key(3), key(5)])
        assert not store.has_clean()
    # the marks survive a crash's recovery as the writes' own would: reopened, the pages
    # written since the flush read back and check
    with ChunkStore(tmp_path, 64 * MiB) as store:
        for i in (0, 1, 2, 4):
            assert store.read(key(i), 4096, 4096) == b"\2" * 4096


def test_a_flush_clears_marks_once_a_quarter_of_the_hot_set_built_up(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkstore, "HOT_MAX", 8)
    with ChunkStore(tmp_path, 64 * MiB) as store:
        for i in range(9):
            store.write(key(i), 0, b"\1" * 4096, chunk_size=CS)
        store.flush()
        assert len(store.dirty_indexes("lin", 0)) == 9  # one past the hot set: kept
        store.write(key(9), 0, b"\1" * 4096, chunk_size=CS)
        store.flush()  # two past it (8 // 4): the two written first are cleared
        assert store.dirty_indexes("lin", 0) == list(range(2, 10))
        store.flush(keep_hot=False)
        assert store.dirty_indexes("lin", 0) == []


class OneVolume:
    def __init__(self, gw):
        self.gw = gw

    def list_exports(self):
        return [(self.gw.name, "")]

    def open_export(self, name):
        return self.gw


def test_a_batch_of_nbd_writes_to_clean_chunks_commits_once(tmp_path, commits, monkeypatch):
    monkeypatch.setattr(chunkstore, "HOT_MAX", 0)

    async def main():
        store, replica, gw = one_host(tmp_path)  # 8 MiB, 1 MiB chunks, replicas=1
        with store:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_nbd, OneVolume(gw), "127.0.0.1", 0)
                c = await Client.connect(port, gw.name)
                for i in range(8):  # every chunk made, then marked clean by a flush
                    assert await c.write(i * MiB, b"\1" * 4096, cookie=i) == 0
                await c.request(proto.CMD_FLUSH, cookie=99)
                assert (await c.reply())[:2] == (99, 0)
                assert store.dirty_indexes(gw.lineage, gw.gen) == []
                before = commits[0]
                batch = b"".join(
                    struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 100 + i,
                                i * MiB + 8192, 4096) + bytes([i + 1]) * 4096
                    for i in range(8))
                await c.send(batch)  # one send: the server takes the 8 as one batch
                got = sorted([(await c.reply())[:2] for _ in range(8)])
                assert got == [(100 + i, 0) for i in range(8)]
                assert commits[0] == before + 1, "one commit marks the batch's chunks"
                assert store.dirty_indexes(gw.lineage, gw.gen) == list(range(8))
                for i in range(8):
                    data = store.read(ChunkKey(gw.lineage, i, gw.gen), 8192, 4096)
                    assert data == bytes([i + 1]) * 4096
                await c.aclose()
                nursery.cancel_scope.cancel()

    trio.run(main)


def peer_write(index: int, offset: int, fill: int) -> m.WriteChunk:
    return m.WriteChunk("vol", "lin", index, 0, (0,), offset, bytes([fill]) * 4096, CS, 0, False,
                        1, 1)


@pytest.mark.parametrize("prepared", [True, False])
def test_a_batch_of_peer_writes_to_clean_chunks_commits_once(tmp_path, commits, monkeypatch,
                                                             prepared):
    """The replica's side: WriteChunk frames that arrive together (one receive) are marked
    in one commit (Replica.prepare, serve_peers' `prepare`); without the hint, each write
    commits its own mark."""
    monkeypatch.setattr(chunkstore, "HOT_MAX", 0)

    async def main():
        with ChunkStore(tmp_path, 64 * MiB) as store:
            replica = Replica(store, "srv", lambda: 1)
            kw = {"prepare": replica.prepare} if prepared else {}
            async with server(replica.handle, **kw) as (address, _kill):
                stream, codec = await raw_client(address)
                for i in range(8):  # every chunk made, then marked clean by a flush
                    await stream.send_all(codec.encode(i + 1, peer_write(i, 0, 1)))
                    assert type((await next_reply(stream, codec))[1]) is m.Ok
                await stream.send_all(codec.encode(50, m.Flush("vol", 1, 1)))
                assert type((await next_reply(stream, codec))[1]) is m.Ok
                assert store.dirty_indexes("lin", 0) == []
                before = commits[0]
                batch = b"".join(codec.encode(100 + i, peer_write(i, 8192, i + 2))
                                 for i in range(8))
                await stream.send_all(batch)  # one send: the server takes them as one batch
                got = sorted([(await next_reply(stream, codec))[0] for _ in range(8)])
                assert got == [100 + i for i in range(8)]
                assert commits[0] == before + (1 if prepared else 8)
                assert store.dirty_indexes("lin", 0) == list(range(8))
                for i in range(8):
                    assert store.read(key(i), 8192, 4096) == bytes([i + 2]) * 4096
                await stream.aclose()

    trio.run(main)


def test_a_failing_prepare_leaves_the_writes_to_mark_themselves(tmp_path, commits):
    async def main():
        with ChunkStore(tmp_path, 64 * MiB) as store:
            replica = Replica(store, "srv", lambda: 1)

            def broken(batch):
                raise RuntimeError("a bug in the hint")

            async with server(replica.handle, prepare=broken) as (address, _kill):
                stream, codec = await raw_client(address)
                await stream.send_all(b"".join(codec.encode(1 + i, peer_write(i, 0, 7))
                                               for i in range(4)))
                got = sorted([(await next_reply(stream, codec))[0] for _ in range(4)])
                assert got == [1, 2, 3, 4]
                for i in range(4):
                    assert store.read(key(i), 0, 4096) == b"\7" * 4096
                await stream.aclose()

    trio.run(main)


def test_frames_before_a_bad_one_in_a_batch_are_answered(tmp_path):
    """A batch is decoded before it is handled: a malformed frame behind good ones in one
    receive still lets the good ones be written and answered before the connection is
    closed with an Error."""
    async def main():
        with ChunkStore(tmp_path, 64 * MiB) as store:
            replica = Replica(store, "srv", lambda: 1)
            async with server(replica.handle, prepare=replica.prepare) as (address, _kill):
                stream, codec = await raw_client(address)
                good = b"".join(codec.encode(1 + i, peer_write(i, 0, 9)) for i in range(3))
                await stream.send_all(good + struct.pack(">I", 3) + b"\xc1\xc1\xc1")
                replies = [await next_reply(stream, codec) for _ in range(4)]
                assert [r[0] for r in replies[:3]] == [1, 2, 3]
                assert all(type(r[1]) is m.Ok for r in replies[:3])
                assert type(replies[3][1]) is m.Error and replies[3][1].code == m.INVALID
                assert await next_reply(stream, codec) is CLOSED
                for i in range(3):
                    assert store.read(key(i), 0, 4096) == b"\x09" * 4096

    trio.run(main)


def test_the_hot_set_is_the_stores_own(tmp_path):
    """hot_max (blockd's hot_chunks) sets the hot set of one store: the module default
    stays as it was."""
    with ChunkStore(tmp_path, 64 * MiB, hot_max=4) as store:
        assert store.hot_max == 4 and chunkstore.HOT_MAX == 256
        for i in range(6):
            store.write(key(i), 0, b"\1" * 4096, chunk_size=CS)
        store.flush()  # two past it, at least 4 // 4: both cleared, the 4 written last kept
        assert store.dirty_indexes("lin", 0) == [2, 3, 4, 5]
    with ChunkStore(tmp_path / "big", 64 * MiB, hot_max=16) as store:
        for i in range(6):
            store.write(key(i), 0, b"\1" * 4096, chunk_size=CS)
        store.flush()
        assert store.dirty_indexes("lin", 0) == list(range(6))
    for bad in (-1, 2.0, "8", True):
        with pytest.raises(InvalidArgument):
            ChunkStore(tmp_path / "other", 64 * MiB, hot_max=bad)
