"""Large reads leave from the data file's map: ChunkStore.read_ref's FileRange through the
NBD server (FileRange.send).

A real chunk store on disk behind a minimal export, the real server, a byte-level client
(tests/unit/test_nbd_server.py's). What must hold: the bytes are the chunk's, a range
queued behind a slow client keeps the slots freed meanwhile from going to another chunk,
ranges an ended connection never sent are released, and a damaged page is an error, not
data.
"""

from __future__ import annotations

import errno
import os
import random
import socket

import pytest
import trio
from hypothesis import event, example, given, settings, strategies as st

from nbd_frontend import proto
from nbd_frontend.server import serve_nbd
from tests.unit.test_nbd_server import Client
from vbp.chunkstore import REF_MIN, ChunkStore
from vbp.chunkstore_common import FileRange
from vbp.errors import NotFound
from vbp.layout import ChunkKey

pytestmark = pytest.mark.timeout(60)
CS = 1 << 20
CHUNKS = 24


class StoreExport:
    """Chunk i of the export is ChunkKey("lin", i, 1); requests stay inside one chunk."""

    name, description, read_only = "disk", "", False
    size = CHUNKS * CS

    def __init__(self, store: ChunkStore):
        self.store = store

    def _where(self, offset: int, length: int):
        assert offset // CS == (offset + length - 1) // CS, "the test keeps to one chunk"
        return ChunkKey("lin", offset // CS, 1), offset % CS

    def read(self, offset: int, length: int, how: str = "read"):
        key, inner = self._where(offset, length)
        try:
            return getattr(self.store, how)(key, inner, length)
        except NotFound:
            return bytes(length)

    def read_ref(self, offset: int, length: int):
        return self.read(offset, length, "read_ref")

    def write(self, offset: int, data, fua: bool):
        key, inner = self._where(offset, len(data))
        self.store.write(key, inner, data, chunk_size=CS)

    def flush(self):
        self.store.flush()

    def close(self):
        pass


class Provider:
    def __init__(self, export):
        self.export = export

    def list_exports(self):
        return [("disk", "")]

    def open_export(self, name):
        if name != "disk":
            raise NotFound(name)
        return self.export


@pytest.fixture
def store(tmp_path):
    s = ChunkStore(tmp_path / "store", 64 * CS)
    yield s
    s.close()


@pytest.fixture
async def served(store, nursery):
    export = StoreExport(store)
    port = await nursery.start(serve_nbd, Provider(export), "127.0.0.1", 0)
    return port, store


def fill(store, chunks) -> dict[int, bytes]:
    data = {}
    for i in chunks:
        data[i] = random.randbytes(CS)
        store.write(ChunkKey("lin", i, 1), 0, data[i], chunk_size=CS)
    return data


def taken(r: FileRange) -> bytes:
    """The bytes of a range, which is then released (what the server does once sent)."""
    data = os.pread(r.owner.fd, len(r), r.pos)
    r.release()
    return data


def counting_sends(monkeypatch) -> list[int]:
    """The lengths FileRange.send was asked to send, call by call."""
    calls: list[int] = []
    real = FileRange.send

    def send(self, sock):
        calls.append(self.length)
        return real(self, sock)
    monkeypatch.setattr(FileRange, "send", send)
    return calls


async def reads_left_unread(port, store, n: int, structured: bool = False):
    """A client that asks for chunks 0..n-1 whole and reads none of the replies: (client,
    space), once some reply waits as a FileRange."""
    c = await Client.connect(port, structured=structured)
    for i in range(n):
        await c.request(proto.CMD_READ, i * CS, CS, cookie=i)
    space = store._spaces[CS]
    with trio.fail_after(10):
        while not space.ranges:
            await trio.sleep(0.01)
    return c, space


@pytest.mark.parametrize("structured", [False, True])
async def test_large_reads_are_sent_from_the_file_and_match(served, monkeypatch, structured):
    port, store = served
    data = fill(store, range(4))
    calls = counting_sends(monkeypatch)
    c = await Client.connect(port, structured=structured)
    for off, n in ((0, CS), (CS + 4096, REF_MIN), (2 * CS + 123, 300_000), (3 * CS, 4096),
                   (3 * CS + 1000, 10)):
        assert await c.read(off, n) == data[off // CS][off % CS: off % CS + n], (off, n)
    assert len(calls) >= 3  # the three reads of REF_MIN bytes or more; small ones are copies
    await c.aclose()


async def test_ranges_queued_behind_a_slow_client_pin_freed_slots(served):
    """A client asks for 16 MiB and reads none of it: replies wait as FileRanges. The
    chunks are deleted and the limbo flushed meanwhile, and new chunks written: none may
    take a slot a queued range still points at, and none is wiped under it (the chunk's
    data may live on in another generation). The slow client then gets each chunk's own
    bytes whole, never zeros nor another chunk's. Once the ranges are gone, a flush wipes
    the slots and frees them."""
    port, store = served
    data = fill(store, range(16))
    slots = {store.info(ChunkKey("lin", i, 1)).slot for i in range(16)}
    c, space = await reads_left_unread(port, store, 16, structured=True)
    await trio.sleep(0.2)  # the socket is full: what is left waits in the queue
    queued = len(space.ranges)
    assert queued > 0
    for i in range(16):
        store.delete(ChunkKey("lin", i, 1))
    store.flush()  # would wipe and free the limbo, but ranges are out
    assert sorted(space.limbo) == sorted(slots)
    fresh = fill(store, range(16, 24))
    assert not slots & {store.info(ChunkKey("lin", i, 1)).slot for i in range(16, 24)}
    got = {}
    for _ in range(16):
        cookie, error, parts = await c.reply({i: CS for i in range(16)})
        assert error == 0
        buf = bytearray(CS)
        for off, part in parts:
            if not isinstance(part, tuple):
                buf[off - cookie * CS: off - cookie * CS + len(part)] = part
        got[cookie] = bytes(buf)
    assert got == {i: data[i] for i in range(16)}
    with trio.fail_after(5):
        while space.ranges:
            await trio.sleep(0.01)
    store.flush()
    assert not space.limbo and not space.unwiped
    for slot in slots:  # wiped: nothing of the deleted chunks is left to come back
        assert os.pread(space.fd, CS, slot * CS) == bytes(CS)
        assert not any(space.sums[slot * (CS // 4096): (slot + 1) * (CS // 4096)])
    fill(store, [30 % CHUNKS])  # a freed slot is used again
    assert store.info(ChunkKey("lin", 30 % CHUNKS, 1)).slot in slots
    await c.aclose()


async def test_a_connection_ended_with_ranges_queued_releases_them(served):
    port, store = served
    fill(store, range(12))
    c, space = await reads_left_unread(port, store, 12)
    await c.aclose()
    with trio.fail_after(10):
        while space.ranges:
            await trio.sleep(0.01)
    store.delete(ChunkKey("lin", 0, 1))
    store.flush()
    assert not space.limbo


async def test_a_damaged_page_is_an_error_not_data(served, tmp_path):
    port, store = served
    data = fill(store, range(2))
    store.flush()
    slot = store.info(ChunkKey("lin", 1, 1)).slot
    with open(tmp_path / "store" / "data-1M.bin", "r+b") as f:
        f.seek(slot * CS + 5 * 4096 + 7)
        f.write(bytes([data[1][5 * 4096 + 7] ^ 0xFF]))
    c = await Client.connect(port, structured=True)
    await c.request(proto.CMD_READ, CS, CS, cookie=9)
    cookie, error, parts = await c.reply({9: CS})
    assert (cookie, error) == (9, proto.EIO)
    assert not any(not isinstance(p, tuple) and len(p) > 8 for _, p in parts)
    assert await c.read(0, CS) == data[0]  # the connection still serves
    await c.aclose()
    assert store.stats().checksum_errors == 1
    assert not store._spaces[CS].ranges


def test_read_ref_answers_ranges_or_bytes(store):
    k = ChunkKey("lin", 0, 1)
    body = random.randbytes(CS // 2)
    store.write(k, 0, body, chunk_size=CS)  # the second half is holes
    r = store.read_ref(k, 4096, REF_MIN)
    assert isinstance(r, FileRange) and len(r) == REF_MIN
    assert taken(r) == body[4096:4096 + REF_MIN]
    assert not store._spaces[CS].ranges  # read() released it
    assert store.read_ref(k, 0, 4096) == body[:4096]  # small: a copy
    mixed = store.read_ref(k, CS // 2 - REF_MIN, 2 * REF_MIN)  # data then holes: a copy
    assert mixed == body[-REF_MIN:] + bytes(REF_MIN)
    # slots past the data file's first map: it is made again, the old one stays valid
    more = fill(store, range(1, 40))
    for i in (1, 39):
        r = store.read_ref(ChunkKey("lin", i, 1), 0, CS)
        assert isinstance(r, FileRange) and taken(r) == more[i]
    del r
    assert not store._spaces[CS].ranges  # garbage collection releases too


@settings(max_examples=100, deadline=None)
@given(holes=st.sets(st.integers(0, 31), max_size=2), zeroed=st.sets(st.integers(0, 31), max_size=2),
       offset=st.integers(0, 128 * 1024 - 1) | st.integers(0, 4096),
       length=st.integers(1, 128 * 1024) | st.integers(REF_MIN, 128 * 1024),
       seed=st.integers(0, 2**32 - 1))
@example(holes=set(), zeroed=set(), offset=0, length=128 * 1024, seed=1)
@example(holes=set(), zeroed={31}, offset=4095, length=65 * 1024, seed=2)
def test_read_ref_gives_the_bytes_read_gives(tmp_path_factory, holes, zeroed, offset, length,
                                             seed):
    """Whatever the chunk holds (data, holes never written, pages zeroed) and whatever the
    range, read_ref's answer (a FileRange or a copy) holds exactly read()'s bytes."""
    rng = random.Random(seed)
    cs = 128 * 1024
    length = min(length, cs - offset)
    with ChunkStore(tmp_path_factory.mktemp("s"), 8 * cs) as s:
        k = ChunkKey("lin", 0, 1)
        for i in range(32):
            if i not in holes:
                s.write(k, i * 4096, rng.randbytes(4096), chunk_size=cs)
            if i in zeroed:
                s.zero(k, i * 4096, 4096, chunk_size=cs)
        want = s.read(k, offset, length)
        got = s.read_ref(k, offset, length)
        if isinstance(got, FileRange):
            event("FileRange")
            assert length >= REF_MIN
            got = taken(got)
        assert got == want
        assert not s._spaces[cs].ranges


def test_a_range_of_a_closed_store_is_an_error_not_bytes(tmp_path):
    """A range still queued when its store closes (blockd stopping) fails to send with
    EBADF; it never reads through a map that is gone."""
    s = ChunkStore(tmp_path / "s", 4 * CS)
    k = ChunkKey("lin", 0, 1)
    s.write(k, 0, random.randbytes(CS), chunk_size=CS)
    r = s.read_ref(k, 0, CS)
    assert isinstance(r, FileRange)
    a, b = socket.socketpair()
    a.setblocking(False)  # as the server's
    with a, b:
        assert r.send(a) > 0  # open: it sends
        s.close()
        with pytest.raises(OSError) as err:
            r.send(a)
        assert err.value.errno == errno.EBADF
