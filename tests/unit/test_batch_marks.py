"""Dirty marks in batches (vbp/chunkstore.py, "before the first write to a chunk after a
flush: the chunk is recorded dirty, durably"): a batch of NBD writes to chunks a flush
marked clean pays one synced index commit, not one per chunk (ChunkStore.mark_dirty,
VolumeGateway.prepare_writes, the NBD server's batches); and a flush clears marks only
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
from tests.unit.test_gateway_local_writes import one_host
from tests.unit.test_nbd_server import Client
from vbp.chunkstore import ChunkStore
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
