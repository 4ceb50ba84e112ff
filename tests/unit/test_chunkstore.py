"""vbp.chunkstore.ChunkStore on disk: layout, the no-transaction-per-request rule, recovery.

What both stores share is in tests/conformance/test_chunkstore_conformance.py.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
from array import array

import lmdb
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from vbp import pagesums
from vbp.chunkstore import ChunkStore, MemoryChunkStore
from vbp import chunkstore_files as cf
from vbp.chunkstore_files import WRITE_PIECE
from vbp.chunkstore_common import VERSION_SLACK, page_checksum, runs, sum_runs
from vbp.errors import ChecksumError, LocalFault, NoSpace
from vbp.layout import PAGE_SIZE, ChunkKey

CS = 64 * 1024
PAGES = CS // PAGE_SIZE
K = ChunkKey("lin", 0, 1)


def abandon(store: ChunkStore) -> None:
    """Drop the store as a killed process would: no flush, no clean marker."""
    store._close_files()


def txnid(store: ChunkStore) -> int:
    return store._env.info()["last_txnid"]


def flip(path, pos):
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def write_raw(path, pos, data):
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(data)


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(tmp_path, 32 * CS)
    yield s
    if not s._closed:
        s.close()


def test_files_and_sidecar_layout(store, tmp_path):
    store.write(ChunkKey("lin", 9, 0), 0, b"first", chunk_size=CS)
    data = os.urandom(PAGE_SIZE)
    store.write(K, 3 * PAGE_SIZE, data, chunk_size=CS)
    slot = store.info(K).slot
    assert slot == 1
    store.flush()
    with open(tmp_path / "data-64K.bin", "rb") as f:
        f.seek(slot * CS + 3 * PAGE_SIZE)
        assert f.read(PAGE_SIZE) == data
    with open(tmp_path / "sums-64K.bin", "rb") as f:
        f.seek((slot * PAGES + 3) * 8)
        (s,) = struct.unpack("=Q", f.read(8))
    assert s == (xxh3_64_intdigest(data) or 1)
    big = ChunkKey("lin", 1, 1)
    store.write(big, 0, b"x", chunk_size=1 << 20)
    assert (tmp_path / "data-1M.bin").exists() and (tmp_path / "sums-1M.bin").exists()


def test_no_index_transaction_per_request(store, monkeypatch):
    from vbp import chunkstore

    monkeypatch.setattr(chunkstore, "HOT_MAX", 1)  # one chunk stays marked through a flush
    store.hot_max = 1  # (the fixture made it before)
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)  # allocation: transactions
    t = txnid(store)
    for i in range(50):
        store.write(K, (i % PAGES) * PAGE_SIZE, os.urandom(PAGE_SIZE), chunk_size=CS)
        store.read(K, (i % PAGES) * PAGE_SIZE, PAGE_SIZE)
        store.write(K, 7, b"partial", chunk_size=CS)
        store.zero(K, PAGE_SIZE, 2 * PAGE_SIZE, chunk_size=CS)
    assert txnid(store) == t
    store.flush()  # K stays marked: a data sync, no transaction (its version can wait)
    assert txnid(store) == t
    store.write(K, 0, b"b", chunk_size=CS)  # written since the flush before: still marked
    store.write(K, 0, b"c", chunk_size=CS)
    assert txnid(store) == t
    store.flush()
    store.flush()  # nothing written since: nothing to do
    assert txnid(store) == t
    store.write(ChunkKey("lin", 3, 1), 0, b"o", chunk_size=CS)  # allocation
    store.flush()  # another chunk was written since K: K is clean now, its version persisted
    assert txnid(store) == t + 2 and dirty_marks(store) == {ChunkKey("lin", 3, 1)}
    store.write(K, 0, b"d", chunk_size=CS)  # first write to a clean chunk: the dirty record
    assert txnid(store) == t + 3 and dirty_marks(store) == {K, ChunkKey("lin", 3, 1)}


def test_a_flush_makes_durable_only_what_it_must(store, monkeypatch):
    """The data written, always; the checksums of a chunk only when the flush marks it
    clean (a chunk that stays marked is re-hashed by recovery): a flush of hot chunks is
    one fdatasync. (test_chunkstore_powerloss checks that this loses nothing.)"""
    from vbp import chunkstore
    from vbp import chunkstore_files as files

    calls = []
    for name in ("sync", "sync_data", "sync_sums"):
        def wrapped(sp, *args, _orig=getattr(files.Space, name), _name=name):
            calls.append((_name, *args))
            return _orig(sp, *args)
        monkeypatch.setattr(files.Space, name, wrapped)
    monkeypatch.setattr(chunkstore, "HOT_MAX", 1)
    store.hot_max = 1  # (the fixture made it before)
    other = ChunkKey("lin", 3, 1)
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    store.flush()
    assert calls == [("sync_data",)]  # K stays marked
    calls.clear()
    store.write(other, 0, b"b" * PAGE_SIZE, chunk_size=CS)
    store.flush()  # K goes clean: its checksums now
    assert calls == [("sync_data",), ("sync_sums", store.info(K).slot)]
    assert dirty_marks(store) == {other}
    calls.clear()
    store.delete(other)
    store.write(K, 0, b"c" * PAGE_SIZE, chunk_size=CS)
    store.flush()  # a slot in limbo: the whole sidecar (the wipe's zeroed checksums)
    assert calls == [("sync",)]


def dirty_marks(store: ChunkStore) -> set:
    from vbp.chunkstore_files import dec_key

    with store._env.begin() as txn:
        return {dec_key(k) for k, _ in txn.cursor(db=store._db["dirty"])}


def test_hot_chunks_keep_their_mark_and_a_crash_recovers_them(store, tmp_path, monkeypatch):
    """The HOT_MAX chunks written last stay marked dirty through a flush: after a crash
    they are re-hashed and reported like unflushed ones, with every flushed byte intact;
    a clean close leaves no mark."""
    from vbp import chunkstore

    monkeypatch.setattr(chunkstore, "HOT_MAX", 2)
    store.hot_max = 2  # (the fixture made it before)
    keys = [ChunkKey("lin", i, 1) for i in range(3)]
    for i, k in enumerate(keys):
        store.write(k, 0, bytes([65 + i]) * PAGE_SIZE, chunk_size=CS)
    store.flush()
    assert dirty_marks(store) == set(keys[1:])  # the latest two written
    t = txnid(store)
    store.write(keys[1], 0, b"B", chunk_size=CS)  # hot: no index commit
    assert txnid(store) == t
    store.flush()
    store.write(keys[0], 0, b"A", chunk_size=CS)  # cold: marked again first
    assert txnid(store) == t + 1  # (the flush of hot keys[1] alone committed nothing)
    store.flush()  # keys[2] is the least recently written: out of the hot set
    assert dirty_marks(store) == {keys[0], keys[1]}
    v = store.info(keys[0]).version
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.recovered == {keys[0], keys[1]}
        for i, k in enumerate(keys):
            assert s.read(k, 0, PAGE_SIZE) == bytes([65 + i]) * PAGE_SIZE
        assert s.info(keys[0]).version == v + VERSION_SLACK  # above the flushed version
        assert s.fsck() == [] and s.stats().checksum_errors == 0
        s.write(keys[0], 0, b"z", chunk_size=CS)
        s.flush()
        assert dirty_marks(s) == {keys[0]}
    finally:
        s.close()
    s = ChunkStore(tmp_path, 32 * CS)
    assert s.was_clean and s.recovered == frozenset()
    s.close()


def test_a_flush_of_hot_chunks_is_one_data_sync_and_a_crash_stays_above_it(store, tmp_path,
                                                                          monkeypatch):
    """A flush that clears no mark (every chunk written stays in the hot set) syncs the data
    and commits nothing: the versions it acknowledged are not in the index. A crash then
    recovers each such chunk at its persisted version + VERSION_SLACK, above them; its
    bytes are the flushed ones. The next flush that commits persists them all, and a clean
    close leaves every version as it was."""
    from vbp import chunkstore_files as files

    calls = []
    real = files.Space.sync_data
    monkeypatch.setattr(files.Space, "sync_data", lambda sp: (calls.append(1), real(sp)))
    keys = [ChunkKey("lin", i, 1) for i in range(3)]
    for k in keys:
        store.write(k, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    store.flush()  # the first flush of new chunks: their marks stay, nothing to commit
    t = txnid(store)
    before = {k: store.info(k).version for k in keys}  # the index holds 0 (allocation)
    for n in range(5):
        for k in keys[:2]:
            store.write(k, n * PAGE_SIZE, bytes([66 + n]) * PAGE_SIZE, chunk_size=CS)
        calls.clear()
        store.flush()
        assert calls == [1] and txnid(store) == t  # one fdatasync, no index transaction
    acked = {k: store.info(k).version for k in keys}
    assert all(acked[k] == before[k] + 5 for k in keys[:2])
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.recovered == set(keys)
        for k in keys:
            assert s.info(k).version >= acked[k]
            assert s.info(k).version == VERSION_SLACK  # 0, as persisted, + the slack
        for n in range(5):
            assert s.read(keys[0], n * PAGE_SIZE, PAGE_SIZE) == bytes([66 + n]) * PAGE_SIZE
        assert s.fsck() == [] and s.stats().checksum_errors == 0
        s.write(keys[0], 0, b"z", chunk_size=CS)
        s.flush()
        v = {k: s.info(k).version for k in keys}
    finally:
        s.close()
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.was_clean and {k: s.info(k).version for k in keys} == v
    finally:
        s.close()


def test_a_fua_write_to_a_marked_chunk_is_one_data_sync(store, tmp_path, monkeypatch):
    """FUA on a chunk marked dirty (every write marks it first, and no copy-up is pending):
    the data's fdatasync and nothing else; a crash keeps the bytes and recovers a version
    above the one acknowledged."""
    from vbp import chunkstore_files as files

    calls = []
    for name in ("sync", "sync_data", "sync_sums"):
        def wrapped(sp, *args, _orig=getattr(files.Space, name), _name=name):
            calls.append(_name)
            return _orig(sp, *args)
        monkeypatch.setattr(files.Space, name, wrapped)
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    t = txnid(store)
    calls.clear()
    v = store.write(K, PAGE_SIZE, b"b" * PAGE_SIZE, chunk_size=CS, fua=True)
    assert calls == ["sync_data"] and txnid(store) == t
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.read(K, PAGE_SIZE, PAGE_SIZE) == b"b" * PAGE_SIZE
        assert v == 2 and s.info(K).version == VERSION_SLACK  # 0 persisted, + the slack
    finally:
        s.close()


@pytest.mark.parametrize("how", ["flush", "fua"])
@pytest.mark.parametrize("ahead", [VERSION_SLACK - 1, VERSION_SLACK])
def test_the_slack_boundary(store, tmp_path, how, ahead):
    """A chunk marked dirty whose version is `ahead` past its persisted one: below
    VERSION_SLACK a flush or fua acknowledges it without a commit, and a crash recovers a
    version strictly above it; at VERSION_SLACK it is committed first (recovery gives the
    slack on top of that)."""
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    store.flush()  # its mark stays (hot): the version it acknowledged is not persisted
    persisted = store._chunks[K].saved  # the index's (fsck checks they agree)
    assert store.fsck() == [] and persisted < store.info(K).version
    t = txnid(store)
    v = persisted + ahead
    if how == "flush":
        store.write(K, 0, b"b" * PAGE_SIZE, chunk_size=CS, version=v)
        store.flush()
    else:
        assert store.write(K, 0, b"b" * PAGE_SIZE, chunk_size=CS, version=v, fua=True) == v
    committed = ahead >= VERSION_SLACK
    assert txnid(store) == t + committed
    assert store.fsck() == []
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.read(K, 0, PAGE_SIZE) == b"b" * PAGE_SIZE
        got = s.info(K).version
        assert got > v
        assert got == (v if committed else persisted) + VERSION_SLACK
        assert s.fsck() == []
    finally:
        s.close()


def test_a_flush_commits_when_a_version_would_run_past_the_slack(store, tmp_path):
    """No chunk's version runs VERSION_SLACK past its persisted one without a commit."""
    store.write(K, 0, b"a", chunk_size=CS)
    store.flush()
    t = txnid(store)
    store.write(K, 0, b"b", chunk_size=CS, version=store.info(K).version + VERSION_SLACK)
    store.flush()
    assert txnid(store) == t + 1
    v = store.info(K).version
    store.write(K, 0, b"c", chunk_size=CS)
    store.flush()  # within the slack again: no commit
    assert txnid(store) == t + 1
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.info(K).version == v + VERSION_SLACK  # the persisted v, + the slack
    finally:
        s.close()


def test_clearing_a_mark_persists_the_version_a_flush_left_out(store, tmp_path, monkeypatch):
    """A chunk flushed with no commit, then pushed out of the hot set by another one: the
    flush that clears its mark writes its version to the index (nothing would raise it
    at recovery any more). Every flush committed every version before flushes could skip
    the commit; this pins that a committing flush persists the versions a skipped one
    left out, not only those of the chunks written since."""
    from vbp import chunkstore

    monkeypatch.setattr(chunkstore, "HOT_MAX", 1)
    store.hot_max = 1  # (the fixture made it before)
    k2 = ChunkKey("lin", 1, 1)
    store.write(K, 0, b"a", chunk_size=CS)
    store.write(k2, 0, b"x", chunk_size=CS)
    store.flush()  # K is cold (k2 written last): committed, k2's mark stays
    store.write(k2, 0, b"y", chunk_size=CS)
    store.flush()  # k2 hot again, no mark to clear: no commit
    t = txnid(store)
    store.write(K, 0, b"b", chunk_size=CS)  # marked again (a commit of its own)
    store.write(K, 0, b"c", chunk_size=CS)
    store.flush()  # K hot, k2 cold: k2's unpersisted version goes in with its mark cleared
    assert txnid(store) == t + 2
    v2 = store.info(k2).version
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.recovered == {K}
        assert s.info(k2).version == v2
        assert s.read(k2, 0, 1) == b"y" and s.read(K, 0, 1) == b"c"
    finally:
        s.close()


def test_a_close_whose_flush_fails_lets_the_store_go_unmarked(tmp_path):
    """A store whose sync failed (poisoned) refuses the flush of its close: the close
    raises, yet closes the files and lets the flock go, without the clean mark, so the
    next open in this process is not refused and runs recovery."""
    s = ChunkStore(tmp_path, 32 * CS)
    s.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    (sp,) = s._spaces.values()
    sp.failed = OSError(errno.EIO, "Input/output error")  # (an earlier sync failed)
    with pytest.raises(LocalFault):
        s.close()
    assert s._closed
    again = ChunkStore(tmp_path, 32 * CS)
    try:
        assert K in again.recovered
    finally:
        again.close()


def test_unacknowledged_write_is_accepted_after_crash(store, tmp_path):
    """A page written to disk whose checksum never made it is re-hashed, not an error."""
    store.write(K, 0, b"a" * (4 * PAGE_SIZE), chunk_size=CS, version=4)
    store.flush()
    store.write(K, 0, b"b", chunk_size=CS)  # K is dirty now
    slot = store.info(K).slot
    abandon(store)
    write_raw(tmp_path / "data-64K.bin", slot * CS + PAGE_SIZE, b"c" * PAGE_SIZE)  # sum stale
    write_raw(tmp_path / "data-64K.bin", slot * CS + 6 * PAGE_SIZE, b"d" * 10)  # into a hole
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert not s.was_clean and s.recovered == {K}
        assert s.read(K, PAGE_SIZE, PAGE_SIZE) == b"c" * PAGE_SIZE
        assert s.read(K, 6 * PAGE_SIZE, 11) == b"d" * 10 + b"\0"
        assert s.read(K, 2 * PAGE_SIZE, PAGE_SIZE) == b"a" * PAGE_SIZE
        # above the flushed 4: the index holds 0 (the allocation's), + VERSION_SLACK
        assert s.info(K).version == VERSION_SLACK
        assert s.stats().checksum_errors == 0
        assert s.fsck() == []
    finally:
        s.close()
    s = ChunkStore(tmp_path, 32 * CS)
    assert s.was_clean and s.recovered == frozenset() and s.info(K).version == VERSION_SLACK
    s.close()


def test_corruption_outside_dirty_chunks_survives_recovery(store, tmp_path, monkeypatch):
    from vbp import chunkstore

    monkeypatch.setattr(chunkstore, "HOT_MAX", 1)
    store.hot_max = 1  # (the fixture made it before)
    other = ChunkKey("lin", 1, 1)
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    store.write(other, 0, b"o" * PAGE_SIZE, chunk_size=CS)
    store.flush()
    store.write(other, 2 * PAGE_SIZE, b"y", chunk_size=CS)
    store.flush()  # `other` written last: the one chunk kept marked; K is clean
    store.write(other, PAGE_SIZE, b"x", chunk_size=CS)  # only `other` is dirty
    slot = store.info(K).slot
    abandon(store)
    flip(tmp_path / "data-64K.bin", slot * CS + 5)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.recovered == {other}
        with pytest.raises(ChecksumError):
            s.read(K, 0, PAGE_SIZE)
        assert s.stats().checksum_errors == 1
        assert s.read(other, 0, PAGE_SIZE) == b"o" * PAGE_SIZE
    finally:
        s.close()


def test_fua_version_survives_crash(store, tmp_path):
    store.write(K, 0, b"a", chunk_size=CS, version=3)
    store.flush()
    store.write(K, 0, b"b", chunk_size=CS, version=9, fua=True)
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.info(K).version >= 9
        assert s.read(K, 0, 1) == b"b"
    finally:
        s.close()


class _CrashInCopyUp(ChunkStore):
    def _copy_up(self, src, dst):
        raise KeyboardInterrupt  # the process dies in the middle of the copy


def _died_in_copy_up(tmp_path) -> None:
    """A store at `tmp_path` whose process died in the middle of copying K's generation 1
    up to generation 2 (left PENDING in the index)."""
    s = _CrashInCopyUp(tmp_path, 32 * CS)
    s.write(K, 0, b"parent" * 1000, chunk_size=CS)
    s.flush()
    with pytest.raises(KeyboardInterrupt):
        s.write(ChunkKey("lin", 0, 2), 0, b"child", chunk_size=CS, base=1)
    abandon(s)


def test_interrupted_copy_up_leaves_no_chunk(tmp_path):
    _died_in_copy_up(tmp_path)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.info(ChunkKey("lin", 0, 2)) is None
        assert s.resolve("lin", 0, [1, 2]) == 1
        assert s.fsck() == []
        s.write(ChunkKey("lin", 0, 2), 0, b"child", chunk_size=CS, base=1)
        assert s.read(ChunkKey("lin", 0, 2), 0, 12) == b"childtparent"
        assert s.stats().used == 2 * CS
    finally:
        s.close()


def test_delete_then_crash_frees_the_slot(store, tmp_path, monkeypatch):
    """The slot in limbo at the crash is free after the recovery, in the index and in
    memory alike: an empty flush then has no limbo to settle (no sync of the files)."""
    store.write(K, 0, b"a" * CS, chunk_size=CS)
    store.write(ChunkKey("lin", 1, 1), 0, b"keep", chunk_size=CS)
    store.flush()
    slot = store.info(K).slot
    store.delete(K)
    abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.info(K) is None and s.fsck() == []
        sp = s._spaces[CS]
        assert sp.limbo == [] and slot in sp.free
        syncs = []
        with monkeypatch.context() as patch:
            patch.setattr(type(sp), "sync", lambda self: syncs.append(self))
            s.flush()
        assert syncs == []
        s.write(ChunkKey("new", 0, 0), PAGE_SIZE, b"n", chunk_size=CS)
        assert s.info(ChunkKey("new", 0, 0)).slot == slot
        assert s.read(ChunkKey("new", 0, 0), 0, CS) == bytes(PAGE_SIZE) + b"n" + bytes(
            CS - PAGE_SIZE - 1)
    finally:
        s.close()


def test_deleted_slot_is_punched_on_disk(store, tmp_path):
    store.write(K, 0, b"s" * CS, chunk_size=CS)
    slot = store.info(K).slot
    store.delete(K)
    store.flush()
    with open(tmp_path / "data-64K.bin", "rb") as f:
        f.seek(slot * CS)
        assert f.read(CS) == bytes(CS)


def test_zero_punches_holes(store, tmp_path):
    store.write(K, 0, os.urandom(CS), chunk_size=CS)
    store.flush()
    blocks = os.stat(tmp_path / "data-64K.bin").st_blocks
    store.zero(K, 0, CS, chunk_size=CS)
    store.flush()
    assert os.stat(tmp_path / "data-64K.bin").st_blocks < blocks


def test_lost_file_growth_reads_zeros(store, tmp_path):
    """A data file shorter than its slots (its growth was lost) reads as holes, no error."""
    store.write(K, 0, b"", chunk_size=CS)  # allocates, writes nothing
    store.write(ChunkKey("lin", 1, 1), 0, b"", chunk_size=CS)
    abandon(store)
    os.truncate(tmp_path / "data-64K.bin", 0)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert os.stat(tmp_path / "data-64K.bin").st_size >= 2 * CS
        assert s.read(ChunkKey("lin", 1, 1), 0, CS) == bytes(CS)
        s.write(ChunkKey("lin", 1, 1), 1, b"x", chunk_size=CS)
        assert s.read(ChunkKey("lin", 1, 1), 0, 3) == b"\0x\0"
    finally:
        s.close()


def test_nospace_leaves_store_usable(tmp_path):
    s = ChunkStore(tmp_path, 2 * CS)
    try:
        s.write(ChunkKey("a", 0, 0), 0, b"a", chunk_size=CS)
        with pytest.raises(NoSpace):
            s.write(ChunkKey("b", 0, 0), 0, b"b", chunk_size=2 * CS)
        s.write(ChunkKey("c", 0, 0), 0, b"c", chunk_size=CS)
        with pytest.raises(NoSpace):
            s.write(ChunkKey("d", 0, 0), 0, b"d", chunk_size=CS)
        assert s.stats().free == 0 and s.fsck() == []
    finally:
        s.close()


def _failing_pwrite(monkeypatch, from_pos):
    """os.pwrite failing with ENOSPC for writes at `from_pos` or beyond (None: none); large
    writes go through pagesums.put's Python stand-in, which calls it."""
    real = os.pwrite
    monkeypatch.setattr(pagesums, "put", pagesums.py_put)
    at = {"pos": from_pos}

    def pwrite(fd, buf, pos):
        if at["pos"] is not None and pos >= at["pos"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buf, pos)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return at


def _same_after_a_flush_and_a_crash(s, tmp_path, capacity: int, k, before: bytes) -> None:
    """`s` flushed, chunk `k` dirtied again by a write to its first page, then the process
    dies: reopened (its recovery re-hashes `k`), the rest of `k` reads as `before` did and
    every page verifies."""
    cs = len(before)
    s.flush()
    s.write(k, 0, b"C" * PAGE_SIZE, chunk_size=cs)
    abandon(s)
    s = ChunkStore(tmp_path, capacity, hot_max=0)
    try:
        assert s.read(k, PAGE_SIZE, cs - PAGE_SIZE) == before[PAGE_SIZE:]
        assert s.verify(k) == []
    finally:
        s.close()


def test_a_failed_write_reads_the_same_after_a_crash(tmp_path, monkeypatch):
    """A write that runs out of space half-way (its first 32 KiB piece on disk, holes
    and real pages among what it reached) answers NoSpace; what the chunk reads then is
    what it reads after a flush and a crash: a hole the write reached does not turn
    into data at the crash recovery, after a flush acknowledged it as zeros."""
    cs = 256 * 1024
    s = ChunkStore(tmp_path, 16 * cs, hot_max=0)
    k = ChunkKey("v", 0, 0)
    s.write(k, 0, b"A" * 68 * 1024, chunk_size=cs)  # pages 0..16 real, 17.. holes
    s.flush()
    at = _failing_pwrite(monkeypatch, s.info(k).slot * cs + 64 * 1024 + WRITE_PIECE)
    with pytest.raises(NoSpace):
        s.write(k, 64 * 1024, b"B" * 64 * 1024, chunk_size=cs)
    at["pos"] = None
    before = s.read(k, 0, cs)
    assert before[64 * 1024: 96 * 1024] == b"B" * 32 * 1024  # the piece that went
    assert before[96 * 1024:] == bytes(cs - 96 * 1024)
    _same_after_a_flush_and_a_crash(s, tmp_path, 16 * cs, k, before)


def test_a_zero_that_runs_out_of_space_reads_the_same_after_a_crash(tmp_path, monkeypatch):
    """Where the file system cannot punch holes, zeroing writes zeros: run out of space
    half-way, it answers NoSpace (not a raw OSError), and each page reads what it reads
    after a flush and a crash: the pages the zeros did not reach keep their old bytes as
    real pages, not holes over old bytes that the recovery would turn back into data."""
    cs = 4 << 20
    monkeypatch.setattr(cf, "_fallocate", None)
    s = ChunkStore(tmp_path, 4 * cs, hot_max=0)
    k = ChunkKey("v", 0, 0)
    s.write(k, 0, b"A" * cs, chunk_size=cs)
    s.flush()
    at = _failing_pwrite(monkeypatch, s.info(k).slot * cs + 2 * cf.COPY_STEP)
    with pytest.raises(NoSpace):
        s.zero(k, 0, cs, chunk_size=cs)
    at["pos"] = None
    before = s.read(k, 0, cs)
    assert before == bytes(2 * cf.COPY_STEP) + b"A" * (cs - 2 * cf.COPY_STEP)
    assert s.verify(k) == []
    _same_after_a_flush_and_a_crash(s, tmp_path, 4 * cs, k, before)


def test_a_wipe_that_fails_keeps_the_slot_in_limbo(tmp_path, monkeypatch):
    """A delete whose wipe fails (no punch, and the zeros meet a full disk) still
    deletes: the slot stays in limbo, unwiped, given to no new chunk (whose holes would
    show the old bytes, and a crash recovery make them data), until a flush wipes it."""
    monkeypatch.setattr(cf, "_fallocate", None)
    s = ChunkStore(tmp_path, 4 * CS)
    try:
        s.write(K, 0, b"s" * CS, chunk_size=CS)
        s.flush()
        slot = s.info(K).slot
        real, failing = os.pwrite, [True]

        def pwrite(fd, buf, pos):  # the zeros of the slot's wipe meet a full disk
            if failing and slot * CS <= pos < (slot + 1) * CS:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, buf, pos)

        monkeypatch.setattr(os, "pwrite", pwrite)
        s.delete(K)
        s.flush()
        sp = s._spaces[CS]
        assert sp.limbo == [slot] == sp.unwiped
        k2 = ChunkKey("lin", 2, 1)
        s.write(k2, PAGE_SIZE, b"n", chunk_size=CS)  # tries the wipe again, in vain
        assert s.info(k2).slot != slot
        failing.clear()
        s.flush()  # wipes, then frees
        assert sp.limbo == [] == sp.unwiped and slot in sp.free
        assert os.pread(sp.fd, CS, slot * CS) == bytes(CS)
        k3 = ChunkKey("lin", 3, 1)
        s.write(k3, PAGE_SIZE, b"m", chunk_size=CS)
        assert s.info(k3).slot == slot
        assert s.read(k3, 0, CS) == bytes(PAGE_SIZE) + b"m" + bytes(CS - PAGE_SIZE - 1)
        assert s.fsck() == []
    finally:
        s.close()


def test_a_chunk_size_whose_files_cannot_grow_leaks_no_descriptor(tmp_path, monkeypatch):
    s = ChunkStore(tmp_path, 64 * CS)
    try:
        s.write(K, 0, b"a", chunk_size=CS)
        fds = len(os.listdir("/proc/self/fd"))

        def full(fd, offset, length):  # (as Linux: a length of 0 is refused first)
            if length <= 0:
                raise OSError(errno.EINVAL, "Invalid argument")
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patch:
            patch.setattr(os, "posix_fallocate", full)
            for _ in range(3):
                with pytest.raises(NoSpace):
                    s.write(ChunkKey("big", 0, 0), 0, b"b", chunk_size=4 * CS)
        assert len(os.listdir("/proc/self/fd")) == fds
        s.write(ChunkKey("big", 0, 0), 0, b"b", chunk_size=4 * CS)
        assert s.read(ChunkKey("big", 0, 0), 0, 1) == b"b"
    finally:
        s.close()


@pytest.mark.parametrize("op", ["write", "zero"])
def test_a_failed_write_does_not_hide_damage_it_did_not_reach(tmp_path, monkeypatch, op):
    """A real page that rotted on disk before a write that failed at once (nothing of it
    reached the disk) keeps its checksum: the damage is still found, not given a new
    checksum that matches the bad bytes. The same for a zeroing whose punch fell back to
    writing zeros (no fallocate) and failed so (its checksums were set to holes first)."""
    if op == "zero":
        monkeypatch.setattr(cf, "_fallocate", None)
    s = ChunkStore(tmp_path, 16 * CS)
    try:
        s.write(K, 0, b"A" * CS, chunk_size=CS)
        s.flush()
        os.pwrite(s._spaces[CS].fd, b"ROT", s.info(K).slot * CS + 10 * PAGE_SIZE + 7)
        assert s.verify(K) == [10]
        _failing_pwrite(monkeypatch, 0)
        with pytest.raises(NoSpace):
            if op == "write":
                s.write(K, 8 * PAGE_SIZE, b"B" * 4 * PAGE_SIZE, chunk_size=CS)
            else:
                s.zero(K, 8 * PAGE_SIZE, 4 * PAGE_SIZE, chunk_size=CS)
        monkeypatch.undo()
        assert s.verify(K) == [10]
        with pytest.raises(ChecksumError):
            s.read(K, 10 * PAGE_SIZE, PAGE_SIZE)
    finally:
        s.close()


def test_index_agrees_with_memory_after_churn(tmp_path):
    rng = random.Random(5)
    s = ChunkStore(tmp_path, 6 * CS)
    try:
        for i in range(300):
            k = ChunkKey("l", rng.randrange(8), rng.randrange(2))
            op = rng.random()
            if op < 0.3 and s.info(k):
                s.delete(k)
            elif op < 0.35:
                s.flush()
            else:
                try:
                    s.write(k, rng.randrange(CS - 10), b"z" * 10, chunk_size=CS,
                            base=1 - k.gen)
                except NoSpace:
                    assert s.stats().used + CS > s.capacity
        assert s.fsck() == []
    finally:
        s.close()


def test_check_finds_index_damage(store, tmp_path):
    """check(): a slot owned twice, a slot nobody owns, a dirty record of no chunk."""
    store.write(K, 0, b"a" * PAGE_SIZE, chunk_size=CS)
    store.write(ChunkKey("lin", 1, 1), 0, b"b", chunk_size=CS)
    store.write(ChunkKey("lin", 2, 1), 0, b"c", chunk_size=CS)
    store.flush()
    assert store.check() == []
    slot = store.info(K).slot
    leaked = store.info(ChunkKey("lin", 2, 1)).slot
    from vbp.chunkstore_files import SLOT, enc_key

    with store._env.begin(write=True) as txn:
        txn.put(SLOT.pack(CS, slot), b"", db=store._db["free"])  # owned twice
        txn.delete(enc_key(ChunkKey("lin", 2, 1)), db=store._db["chunks"])  # leaked
        txn.put(enc_key(ChunkKey("gone", 0, 1)), b"", db=store._db["dirty"])
    problems = "\n".join(store.check())
    assert f"slot {slot} of size {CS} owned by" in problems
    assert f"slot {leaked} of size {CS} leaked" in problems
    assert "dirty record for chunk" in problems and "gone" in problems


def test_check_is_clean_after_a_crash_in_every_state(tmp_path):
    """Recovery at open leaves nothing for check() to report: dirty pages re-hashed,
    an interrupted copy-up dropped, a deleted chunk's slot freed."""
    s = _CrashInCopyUp(tmp_path, 32 * CS)
    s.write(K, 0, b"p" * CS, chunk_size=CS)
    s.write(ChunkKey("lin", 1, 1), 0, b"d" * CS, chunk_size=CS)
    s.flush()
    s.write(K, 5, b"unflushed", chunk_size=CS)
    s.delete(ChunkKey("lin", 1, 1))
    with pytest.raises(KeyboardInterrupt):
        s.write(ChunkKey("lin", 0, 2), 0, b"child", chunk_size=CS, base=1)
    abandon(s)
    flip(tmp_path / "data-64K.bin", s.info(K).slot * CS + 3 * PAGE_SIZE)  # an unsynced tear
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.recovered == {K}
        assert s.check() == []
    finally:
        s.close()


def test_memory_crash_model():
    rng = random.Random(1)
    m = MemoryChunkStore(None, 8 * CS)
    m.write(K, 0, b"a" * CS, chunk_size=CS, version=3)
    m.flush()
    m.write(K, 0, b"b" * CS, chunk_size=CS)
    m.write(ChunkKey("lin", 1, 1), 0, b"f", chunk_size=CS, version=8, fua=True)
    seen = set()
    for _ in range(40):
        after = m.crash(rng)
        assert after.recovered == {K, ChunkKey("lin", 1, 1)}
        got = (after.info(K).version - 3, after.info(ChunkKey("lin", 1, 1)).version - 8)
        assert set(got) <= {1, VERSION_SLACK}  # past the acknowledged 3 and 8, by 1 or the slack
        seen.update(got)
        assert after.read(ChunkKey("lin", 1, 1), 0, 1) == b"f"
        page_values = {after.read(K, p * PAGE_SIZE, 1) for p in range(PAGES)}
        assert page_values <= {b"a", b"b"}
    assert seen == {1, VERSION_SLACK}  # both ends of what ChunkStore's recovery may give


def test_memory_crash_model_lists_the_recovered_until_forgotten():
    """As ChunkStore opened keep_recovered (blockd's store, the one the simulation
    stands for): a crash before the list is recorded (forget_recovered) lists it again
    at the next start, however many crashes come between; once forgotten, it does not."""
    rng = random.Random(1)
    m = MemoryChunkStore(None, 8 * CS)
    m.write(K, 0, b"a" * CS, chunk_size=CS)
    after = m.crash(rng)
    assert after.recovered == {K}
    again = after.crash(rng)  # crashed again before mark_recovered got through
    assert again.recovered == {K}
    again.forget_recovered()
    assert again.crash(rng).recovered == frozenset()


def test_memory_crash_model_says_which_recovered_chunks_lost_power():
    """A power loss (the default) lists the dirty chunks under recovered_lost too, and
    keeps per page old or new bytes; a process crash (power=False) keeps the newest bytes
    and lists none there. Both lists last until forgotten."""
    k2 = ChunkKey("lin", 1, 1)
    m = MemoryChunkStore(None, 8 * CS)
    m.write(K, 0, b"a" * CS, chunk_size=CS)
    m.flush()
    m.write(K, 0, b"b" * PAGE_SIZE, chunk_size=CS)
    kept = m.crash(random.Random(1), power=False)
    assert kept.recovered == {K} and kept.recovered_lost == frozenset()
    assert kept.read(K, 0, PAGE_SIZE) == b"b" * PAGE_SIZE
    kept.write(k2, 0, b"c" * PAGE_SIZE, chunk_size=CS)
    lost = kept.crash(random.Random(1))
    assert lost.recovered == {K, k2} and lost.recovered_lost == {k2}
    assert lost.crash(random.Random(1), power=False).recovered_lost == {k2}
    lost.forget_recovered()
    assert lost.recovered_lost == frozenset() == lost.crash(random.Random(1)).recovered_lost


def test_recovered_after_a_reboot_are_listed_as_lost_until_forgotten(tmp_path, monkeypatch):
    """ChunkStore opened keep_recovered (blockd's): the chunks dirty at a crash are listed
    in `recovered`; after a reboot (another boot id: a power loss) also in
    `recovered_lost`, at every open until forget_recovered, so a crash before the
    registry has them keeps the flag (replicator.recovery.mark_recovered)."""
    from vbp import chunkstore

    boot = ["one"]
    monkeypatch.setattr(chunkstore, "boot_id", lambda: boot[0])
    k2 = ChunkKey("lin", 1, 1)

    def reopen():
        return ChunkStore(tmp_path, 32 * CS, keep_recovered=True)

    s = reopen()
    s.write(K, 0, b"a", chunk_size=CS)
    abandon(s)
    s = reopen()  # the same boot: a process crash
    assert s.recovered == {K} and s.recovered_lost == frozenset()
    s.write(k2, 0, b"c", chunk_size=CS)
    abandon(s)
    boot[0] = "two"  # the power failed
    s = reopen()
    assert s.recovered == {K, k2} and s.recovered_lost == {k2}
    abandon(s)  # a crash again before the registry had them
    s = reopen()
    assert s.recovered == {K, k2} and s.recovered_lost == {k2}
    s.forget_recovered()
    assert s.recovered == frozenset() == s.recovered_lost
    abandon(s)
    s = reopen()
    try:
        assert s.recovered == frozenset() == s.recovered_lost
    finally:
        s.close()


def test_lmdb_records_are_readable_by_tools(store, tmp_path):
    """The index is plain LMDB: an operator can inspect it with the lmdb package."""
    store.write(K, 0, b"x", chunk_size=CS)
    store.close()
    env = lmdb.open(str(tmp_path / "index"), max_dbs=8, readonly=True, lock=False)
    with env.begin() as txn:
        chunks = env.open_db(b"chunks", txn=txn, create=False)
        assert txn.stat(chunks)["entries"] == 1
    env.close()


def test_one_open_store_per_directory(store, tmp_path):
    from vbp.errors import LocalFault

    with pytest.raises(LocalFault):
        ChunkStore(tmp_path, CS)
    store.close()
    ChunkStore(tmp_path, CS).close()


def test_full_index_is_nospace(tmp_path):
    """An index running out of room refuses new chunks with NoSpace and keeps enough to
    flush, delete and close."""
    s = ChunkStore(tmp_path, 1 << 40, index_map_size=256 * 1024)
    try:
        with pytest.raises(NoSpace):
            for i in range(100_000):
                s.write(ChunkKey("x" * 300, i, 0), 0, b"", chunk_size=CS)
        for k in list(s.keys())[:5]:
            s.write(k, 0, b"y", chunk_size=CS, fua=True)
        s.delete(next(s.keys()))
        s.flush()
        assert s.fsck() == []
        n = s.stats().chunks
    finally:
        s.close()
    s = ChunkStore(tmp_path, 1 << 40, index_map_size=256 * 1024)
    assert s.stats().chunks == n and s.fsck() == []
    s.close()


def test_failed_sync_is_never_forgotten(store, tmp_path):
    """After one failed fdatasync the store never again claims durability (fsyncgate)."""
    from vbp.errors import LocalFault

    store.write(K, 0, b"a", chunk_size=CS)
    sp = store._spaces[CS]
    saved = os.dup(sp.fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, sp.fd)  # fdatasync on a character device fails (EINVAL)
    try:
        with pytest.raises(LocalFault):
            store.flush()
        os.dup2(saved, sp.fd)  # the disk is "back": syncs would succeed now
        with pytest.raises(LocalFault):
            store.flush()
        with pytest.raises(LocalFault):
            store.write(K, 0, b"b", chunk_size=CS, fua=True)
    finally:
        os.close(devnull)
        os.close(saved)
        abandon(store)
    s = ChunkStore(tmp_path, 32 * CS)  # reopening recovers (and resync fixes the rest)
    assert s.recovered == {K}
    s.close()


def test_large_writes_go_to_the_file_in_pieces(tmp_path, monkeypatch):
    """A write larger than WRITE_PIECE goes to the data file in pieces of at most that
    (vbp/chunkstore_files.py says why), every byte once, each page's checksum after."""
    calls = []
    real = pagesums.put

    def put(fd, data, pos, piece, sums, first):
        calls.append((len(data), piece))
        return real(fd, data, pos, piece, sums, first)

    monkeypatch.setattr(pagesums, "put", put)
    cs = 1 << 20
    with ChunkStore(tmp_path, 4 * cs) as s:
        k = ChunkKey("v", 0, 0)
        for n in (PAGE_SIZE, WRITE_PIECE, WRITE_PIECE + PAGE_SIZE, 3 * WRITE_PIECE + 4096 + 7):
            data = os.urandom(n)
            s.write(k, 8192 + 5, data, chunk_size=cs)
            assert s.read(k, 8192 + 5, n) == data
        assert s.verify(k) == []
    spanned = [((8197 + n - 1) // PAGE_SIZE - 1) * PAGE_SIZE  # (pages 2 to the last)
               for n in (PAGE_SIZE, WRITE_PIECE, WRITE_PIECE + PAGE_SIZE, 3 * WRITE_PIECE + 4103)]
    assert calls == [(n, WRITE_PIECE) for n in spanned if n > WRITE_PIECE]
    assert len(calls) == 3


class _IndexFullAfterCopy(ChunkStore):
    """The copy of the next copy-up ends (`copy_fails`: on a full disk), and then the
    next `index_fails` index commits meet a full disk as well."""

    copy_fails = False
    index_fails = 0
    fails_after_copy = 0

    def _copy_up(self, src, dst):
        self.index_fails, self.fails_after_copy = self.fails_after_copy, 0
        if self.copy_fails:
            os.pwrite(dst.space.fd, b"h" * PAGE_SIZE, dst.dbase)  # the half that got copied
            dst.space.sums[dst.sbase] = page_checksum(b"h" * PAGE_SIZE)
            self.copy_fails = False
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._copy_up(src, dst)

    def _txn(self):
        if self.index_fails:
            self.index_fails -= 1
            return _FullTxn(self._env)
        return super()._txn()


class _FullTxn(cf.Txn):
    def __exit__(self, exc_type, exc, tb):
        self.txn.abort()
        if exc_type is not None:
            return False
        raise NoSpace("the disk is full writing the chunk index: injected")


def test_a_copy_up_whose_commit_fails_leaves_no_chunk_behind(tmp_path):
    """The copy is made, but the commit making it READY meets a full disk: the write
    fails, and no chunk is left that the index still holds PENDING (the recovery at the
    next open would drop it, and every write acknowledged to it since with it)."""
    k2 = ChunkKey("lin", 0, 2)
    s = _IndexFullAfterCopy(tmp_path, 32 * CS)
    s.write(K, 0, b"p" * CS, chunk_size=CS)
    s.flush()
    s.fails_after_copy = 1
    with pytest.raises(NoSpace):
        s.write(k2, 0, b"child", chunk_size=CS, base=1)
    s.write(k2, 0, b"child", chunk_size=CS, base=1, fua=True)  # the disk has room again
    abandon(s)  # acknowledged durable: the process dies
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.resolve("lin", 0, [1, 2]) == 2
        assert s.read(k2, 0, 8) == b"childppp"
        assert s.fsck() == [] and s.check() == []
    finally:
        s.close()


def test_a_copy_up_that_fails_on_a_full_disk_never_shows_its_half_copy(tmp_path):
    """The copy meets a full disk half-way, and so does the commit that would put its
    slot in limbo: the half copy (its other pages zeros) must not become the chunk that
    reads of the new generation find, in place of its base's bytes. Nor may the same
    copy-up made again once there is room overwrite the PENDING record the index keeps
    of the first (for the next open to drop): that slot would belong to neither chunks,
    free nor limbo, never to be used again (fsck, now and after a reopen)."""
    k2 = ChunkKey("lin", 0, 2)
    s = _IndexFullAfterCopy(tmp_path, 32 * CS)
    try:
        s.write(K, 0, b"p" * CS, chunk_size=CS)
        s.flush()
        s.copy_fails, s.fails_after_copy = True, 1
        with pytest.raises(NoSpace):
            s.write(k2, 0, b"child", chunk_size=CS, base=1)
        assert s.info(k2) is None and s.resolve("lin", 0, [1, 2]) == 1
        s.write(k2, 0, b"child", chunk_size=CS, base=1)
        assert s.read(k2, 0, CS) == b"child" + b"p" * (CS - 5)
        assert s.fsck() == []
    finally:
        s.close()
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.fsck() == []
    finally:
        s.close()


def _eio_at(monkeypatch, bad: int) -> None:
    """os.pread fails with EIO for any read reaching data-file offset `bad`."""
    real = os.pread

    def pread(fd, n, pos):
        if pos <= bad < pos + n:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, pos)

    monkeypatch.setattr(os, "pread", pread)



def test_a_page_the_disk_cannot_read_is_a_checksum_error(store, monkeypatch):
    """EIO reading a page is damage, as a page failing its checksum is: ChecksumError
    naming the page (the gateway repairs it from a good replica; an OSError failed the
    client's read), and verify() lists it for scrub. (tests/faults/test_chunkstore_eio.py:
    the same on a disk that really fails, where a read through the map is a SIGBUS.)"""
    store.write(K, 0, b"a" * CS, chunk_size=CS)
    bad = store.info(K).slot * CS + 5 * PAGE_SIZE
    _eio_at(monkeypatch, bad)
    for offset, length in ((5 * PAGE_SIZE, PAGE_SIZE), (0, 8 * PAGE_SIZE), (100, 6 * PAGE_SIZE)):
        with pytest.raises(ChecksumError) as e:
            store.read(K, offset, length)
        assert e.value.page == 5 and e.value.key == K
    with pytest.raises(ChecksumError):  # a partial-page write merging into it
        store.write(K, 5 * PAGE_SIZE + 1, b"b", chunk_size=CS)
    assert store.read(K, 6 * PAGE_SIZE, PAGE_SIZE) == b"a" * PAGE_SIZE
    assert store.verify(K) == [5]
    store.write(K, 5 * PAGE_SIZE, b"r" * PAGE_SIZE, chunk_size=CS)  # a repair rewrites it
    monkeypatch.undo()
    assert store.read(K, 5 * PAGE_SIZE, 2) == b"rr" and store.verify(K) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 7, 2**64 - 1]), min_size=1, max_size=40),
       st.integers(0, 1000), st.integers(0, PAGE_SIZE - 1), st.integers(0, PAGE_SIZE - 1))
def test_sum_runs_are_the_runs_of_the_holes_page_by_page(sums, first, head, tail):
    """sum_runs (the chunk store's extents: C loops over the pages) says what the plain
    per-page runs() says of the same sums, for any range of whole or partial pages."""
    base = first * PAGE_SIZE
    offset = base + head
    end = base + len(sums) * PAGE_SIZE - tail
    if end <= offset:
        return
    want = runs([s == 0 for s in sums], first, offset, end - offset)
    assert sum_runs(array("Q", sums), first, offset, end - offset) == want
    assert sum(n for n, _ in want) == end - offset


def test_verify_soon_finds_what_verify_finds(tmp_path):
    """verify_soon (the disk read in a worker thread) lists the same rotted pages as
    verify, over a chunk of several read steps; holes are never bad."""
    cs = 4 * 1024 * 1024
    s = ChunkStore(tmp_path, 4 * cs)
    try:
        key = ChunkKey("lin", 3, 1)
        s.write(key, 0, b"A" * (cs - 8 * PAGE_SIZE), chunk_size=cs)  # (the last 8 pages holes)
        s.flush()
        base = s.info(key).slot * cs
        for page in (0, 300, 700, 1023):  # (1023: a hole; rot there is no checksum failure)
            os.pwrite(s._spaces[cs].fd, b"ROT", base + page * PAGE_SIZE + 5)
        assert s.verify(key) == [0, 300, 700]
        assert trio.run(s.verify_soon, key) == [0, 300, 700]
    finally:
        s.close()


def test_verify_soon_does_not_blame_a_write_that_came_during_its_read(tmp_path, monkeypatch):
    """The worker thread read page 1's old bytes; a write of the page on the event loop
    (which verify_soon leaves free for it) changed its checksum before the bytes were
    checked. The mismatch is the write's, not damage: the page is read and checked again
    before it counts."""
    from vbp import chunkstore as chunkstore_mod

    s = ChunkStore(tmp_path, 16 * CS)
    s.write(K, 0, b"A" * CS, chunk_size=CS)
    read_done, go_on = threading.Event(), threading.Event()
    real = chunkstore_mod.pread_path

    def slow_read(path, n, pos):
        data = real(path, n, pos)
        read_done.set()
        go_on.wait(10)
        return data

    monkeypatch.setattr(chunkstore_mod, "pread_path", slow_read)

    async def main():
        got = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _collect(got, s.verify_soon(K)))
            await trio.to_thread.run_sync(read_done.wait, 10)
            s.write(K, PAGE_SIZE, b"B" * PAGE_SIZE, chunk_size=CS)  # (the loop is free)
            go_on.set()
        return got[0]

    try:
        assert trio.run(main) == []
        assert s.read(K, PAGE_SIZE, PAGE_SIZE) == b"B" * PAGE_SIZE
    finally:
        s.close()


async def _collect(out: list, awaitable) -> None:
    out.append(await awaitable)


def test_collected_generations_are_forgotten_after_collected_keep(tmp_path, monkeypatch):
    """A collected generation stays marked for COLLECTED_KEEP after its mark, then is
    forgotten at the next open, in the index too (the marks do not pile up forever, not
    even those of a lineage marked again and again)."""
    from vbp import chunkstore as cs_mod
    s = ChunkStore(tmp_path, 32 * CS)
    now = 1_800_000_000.0
    monkeypatch.setattr(cs_mod.time, "time", lambda: now)
    s.mark_collected({"old": {1}, "renewed": {1}})
    now += cs_mod.COLLECTED_KEEP / 2
    s.mark_collected({"young": {2}, "renewed": {1, 2}})  # (1 again: still its first mark)
    s.close()
    now += cs_mod.COLLECTED_KEEP / 2 + 1  # the first marks are older than COLLECTED_KEEP
    s = ChunkStore(tmp_path, 32 * CS)
    assert s.collected_gens == {"young": {2}, "renewed": {2}}
    s.close()
    s = ChunkStore(tmp_path, 32 * CS)  # (what the open forgot is gone from the index)
    assert s.collected_gens == {"young": {2}, "renewed": {2}}
    # an open store forgets them too, when garbage collection asks (expire_collected)
    assert s.expire_collected() == 0
    now += cs_mod.COLLECTED_KEEP / 2  # "young" and "renewed" 2: marked KEEP + 1 s ago
    s.mark_collected({"renewed": {3}})
    assert s.expire_collected() == 2
    assert s.collected_gens == {"renewed": {3}}
    s.close()
    s = ChunkStore(tmp_path, 32 * CS)
    assert s.collected_gens == {"renewed": {3}}
    s.close()
    with lmdb.open(str(tmp_path / "index"), subdir=True, max_dbs=8, readonly=True) as env:
        with env.begin() as txn:
            names = [k for k, _ in txn.cursor(db=env.open_db(b"collected", txn=txn))]
    assert names == [b"renewed"]


@pytest.mark.parametrize("value", [b"%d" % 1_765_000_000, b"\x92\x01\x90", b"\xc1",
                                   b"\x81\x91\x01\x01", b"\x81\x80\x01"])
def test_a_store_with_a_damaged_collected_mark_still_opens(tmp_path, value):
    """Review of b8b97e3: 3f9a1e4 kept a lineage's mark as b"<unix time>" in the same
    "collected" table, and msgpack.unpackb(b"1765000000") raises ExtraData: a host whose
    store was marked so could not open its store (blockd did not start). Any entry that
    does not read as {gen: when} (that one, a list, bytes msgpack refuses, a map whose
    key msgpack makes a list or a map: TypeError, found by a later review) names no
    generation: the store opens, drops it, and takes the next mark of that lineage."""
    s = ChunkStore(tmp_path, 32 * CS)
    s.write(ChunkKey("live", 0, 1), 0, b"kept", chunk_size=CS)
    s.close()
    with lmdb.open(str(tmp_path / "index"), subdir=True, max_dbs=8) as env:
        with env.begin(write=True) as txn:
            txn.put(b"dead", value, db=env.open_db(b"collected", txn=txn))
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.read(ChunkKey("live", 0, 1), 0, 4) == b"kept"
        s.mark_collected({"dead": {3}})
        assert s.collected_gens.get("dead") == {3}
    finally:
        s.close()


def test_a_page_the_disk_cannot_read_does_not_stop_the_recovery(tmp_path, monkeypatch):
    """A dirty chunk with a page the disk cannot read (EIO): the recovery at open re-hashes
    the pages it can read and leaves that one damaged (a ChecksumError for the gateway to
    repair), instead of failing the open, and every open after it, for good."""
    s = ChunkStore(tmp_path, 16 * CS)
    s.write(K, 0, b"a" * CS, chunk_size=CS)
    s.flush()
    s.write(K, 0, b"b" * PAGE_SIZE, chunk_size=CS)  # K is dirty
    bad = s.info(K).slot * CS + 5 * PAGE_SIZE
    abandon(s)
    _eio_at(monkeypatch, bad)
    s = ChunkStore(tmp_path, 16 * CS)
    try:
        assert s.recovered == {K}
        assert s.read(K, 0, PAGE_SIZE) == b"b" * PAGE_SIZE
        assert s.read(K, 6 * PAGE_SIZE, PAGE_SIZE) == b"a" * PAGE_SIZE
        with pytest.raises(ChecksumError):
            s.read(K, 5 * PAGE_SIZE, PAGE_SIZE)
        assert s.verify(K) == [5]
    finally:
        monkeypatch.undo()
        s.close()


def test_the_index_files_are_named_durably(tmp_path, monkeypatch):
    """New files get their directory fsync'd (the module's failure rules): LMDB's
    data.mdb, made in index/ at the first open, too, or a power loss can lose the name of
    an index every commit was fdatasync'd into."""
    from vbp import chunkstore

    synced = []
    real = chunkstore.sync_dir
    monkeypatch.setattr(chunkstore, "sync_dir", lambda p: (synced.append(str(p)), real(p)))
    s = ChunkStore(tmp_path / "store", 16 * CS)
    try:
        assert (tmp_path / "store" / "index" / "data.mdb").exists()
        assert str(tmp_path / "store" / "index") in synced
    finally:
        s.close()


def test_a_pending_slot_whose_wipe_fails_at_open_stays_in_limbo(tmp_path, monkeypatch):
    """The recovery drops a PENDING chunk (a copy-up the process died in) and wipes its
    slot; when that wipe fails (no punch, and the zeros meet a full disk) the slot must
    stay in limbo in the index, to be wiped later, not belong to nothing."""
    _died_in_copy_up(tmp_path)
    monkeypatch.setattr(cf, "_fallocate", None)
    _failing_pwrite(monkeypatch, 0)
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.info(ChunkKey("lin", 0, 2)) is None
        assert s.fsck() == []
    finally:
        abandon(s)  # and the process dies again, before any flush could wipe it
    monkeypatch.undo()
    s = ChunkStore(tmp_path, 32 * CS)
    try:
        assert s.fsck() == []
    finally:
        s.close()


def test_pwrite_all_takes_up_short_writes_and_fails_one_that_writes_nothing(tmp_path, monkeypatch):
    """A short pwrite is followed by one for the rest; one that writes nothing is EIO (it
    looped forever before)."""
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    real, calls = os.pwrite, []

    def short(f, data, pos):  # at most 1000 bytes a call
        calls.append(pos)
        return real(f, memoryview(data)[:1000], pos)

    data = random.randbytes(4096)
    monkeypatch.setattr(cf.os, "pwrite", short)
    cf.pwrite_all(fd, data, 100)
    assert os.pread(fd, 4096, 100) == data and calls == [100, 1100, 2100, 3100, 4100]

    def stuck(f, d, pos):  # some bytes, then none
        return real(f, memoryview(d)[:1000], pos) if pos == 0 else 0

    monkeypatch.setattr(cf.os, "pwrite", stuck)
    with pytest.raises(OSError) as e:
        cf.pwrite_all(fd, data, 0)
    assert e.value.errno == errno.EIO
    os.close(fd)


def test_a_store_is_claimed_by_one_host(tmp_path):
    """The first host to claim a store is recorded in its index, across reopenings; any
    other is refused, naming the owner (blockd exits 2 on it: a setting)."""
    from vbp.errors import InvalidArgument

    s = ChunkStore(tmp_path / "s", 1 << 30)
    s.claim("h1")
    s.claim("h1")
    s.close()
    s = ChunkStore(tmp_path / "s", 1 << 30)
    try:
        with pytest.raises(InvalidArgument, match="is host h1's, not host h2's: set host_id to h1"):
            s.claim("h2")
        s.claim("h1")
    finally:
        s.close()
