"""A flush with much to write back does its writeback in a worker thread (ChunkStore.sync_ahead,
vbp.chunkstore.flush_store), and the event loop serves every other request meanwhile: on
the gateway of a replicas=1 volume, and on a replica answering a Flush over the peer
transport (real loopback sockets). A small flush stays one fdatasync on the loop.

The worker thread is held at the start of its sync (a threading.Event around the real
sync_paths), so "meanwhile" is a state the test holds, not a race it hopes to win."""

from __future__ import annotations

import threading

import pytest
import trio

import vbp.chunkstore as chunkstore
from replicator import messages as m
from replicator.replica import Replica
from replicator.transport import PeerPool
from tests.sim.harness import call
from tests.unit.test_gateway_local_writes import one_host
from tests.unit.test_peer_transport import CLUSTER, server
from vbp.chunkstore import SYNC_AHEAD_MIN, ChunkStore
from vbp.errors import Fenced
from vbp.layout import MiB, ChunkKey

pytestmark = pytest.mark.timeout(60)

BIG = SYNC_AHEAD_MIN + MiB  # a write past the threshold: the next flush syncs ahead


class HeldSync:
    """sync_paths, held in its worker thread until released; remembers what it synced."""

    def __init__(self, monkeypatch):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.synced: list[str] = []
        self.rounds = 0
        real = chunkstore.sync_paths

        def held(paths):
            self.rounds += 1
            self.entered.set()
            assert self.release.wait(30), "the test never released the sync"
            real(paths)
            self.synced.extend(paths)

        monkeypatch.setattr(chunkstore, "sync_paths", held)

    async def wait_entered(self) -> None:
        with trio.fail_after(10):
            while not self.entered.is_set():
                await trio.sleep(0.005)


def test_a_large_flush_leaves_the_gateway_serving_while_it_syncs(tmp_path, monkeypatch):
    held = HeldSync(monkeypatch)

    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            data = bytes(range(256)) * (BIG // 256)
            assert gw.write(0, data, False) is None
            done = trio.Event()

            async def flush():
                result = gw.flush()
                assert result is not None, "a large flush must not run on the loop"
                await result
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flush)
                await held.wait_entered()
                # the writeback is under way in its thread; the loop answers meanwhile
                got = await call(gw.read(0, 4096))
                assert bytes(got) == data[:4096]
                assert gw.write(BIG, b"\x05" * 4096, False) is None
                await trio.sleep(0.05)
                assert not done.is_set(), "the flush answered before its sync ended"
                held.release.set()
            assert done.is_set()
            assert held.rounds == 1  # 4 KiB came meanwhile: not worth a second round
            assert any(p.endswith("data-1M.bin") for p in held.synced)
            # the flush itself followed on the loop: the store has nothing left to sync
            assert store.sync_ahead() is None
            assert not [c for c in store._dirty.values() if c.touched]

    trio.run(main)


def test_a_small_flush_stays_on_the_loop(tmp_path, monkeypatch):
    held = HeldSync(monkeypatch)
    held.release.set()

    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            assert gw.write(0, b"\x01" * 4096, False) is None
            assert store.sync_ahead() is None
            assert gw.flush() is None  # answered at once: no thread, no task
            assert not held.entered.is_set()
            assert not [c for c in store._dirty.values() if c.touched]

    trio.run(main)


def write_msg(index: int, data: bytes, token: int = 1) -> m.WriteChunk:
    return m.WriteChunk("vol", "lin", index, 1, (1,), 0, data, 4 * MiB, 0, False, 1, token)


@pytest.mark.parametrize("syncing", ["flush", "fua-write"])
def test_a_replica_answers_other_requests_while_a_flush_syncs(tmp_path, monkeypatch, syncing):
    """Over the peer transport: a Flush, or a FUA WriteChunk, after a large write is
    answered only after its sync; a read sent behind it on the same connection is
    answered before that."""
    held = HeldSync(monkeypatch)
    msg = m.Flush("vol", 1, 1) if syncing == "flush" else fua_msg(1, b"\x0a" * 4096)

    async def main():
        with ChunkStore(tmp_path / "store", 64 * MiB) as store:
            replica = Replica(store, "srv", lambda: 1)
            async with server(replica.handle) as (address, _kill):
                async with PeerPool(CLUSTER, "cli", request_timeout=20) as pool:
                    data = b"\x09" * (2 * MiB)
                    assert type(await pool.call(address, write_msg(0, data))) is m.Ok
                    synced = trio.Event()

                    async def sync():
                        assert type(await pool.call(address, msg)) is m.Ok
                        synced.set()

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sync)
                        await held.wait_entered()
                        got = await pool.call(address, m.ReadChunk("vol", "lin", 0, (1,), 4096, 4096, 1))
                        assert got.data == data[:4096]
                        assert not synced.is_set()
                        held.release.set()
                    assert synced.is_set()
                    assert store.sync_ahead() is None

    trio.run(main)


def test_a_flush_from_a_fenced_gateway_is_refused_at_once(tmp_path):
    """The token is checked when the Flush arrives, before any sync: the old gateway
    learns it is fenced without waiting for a writeback it has no business asking for."""
    with ChunkStore(tmp_path / "store", 64 * MiB) as store:
        replica = Replica(store, "srv", lambda: 1)
        replica.write("vol", "lin", 0, 1, (1,), 0, b"\x01" * BIG, 4 * MiB, 0, False, 1, 2)
        with pytest.raises(Fenced):
            replica.handle(m.Flush("vol", 1, 1))
        reply = replica.handle(m.Flush("vol", 1, 2))
        assert hasattr(reply, "__await__")
        assert type(trio.run(lambda: reply)) is m.Ok
        assert store.info(ChunkKey("lin", 0, 1)) is not None
        assert store.sync_ahead() is None
        # a small flush is answered at once, as before
        replica.write("vol", "lin", 0, 1, (1,), 0, b"\x02" * 4096, 4 * MiB, 0, False, 1, 2)
        assert type(replica.handle(m.Flush("vol", 1, 2))) is m.Ok
        assert not [c for c in store._dirty.values() if c.touched]


def test_what_came_during_a_sync_ahead_is_synced_ahead_again(tmp_path, monkeypatch):
    """Writes that keep coming fast during the writeback get rounds of their own (up to
    AHEAD_ROUNDS), so the flush left on the loop finds little to write."""
    held = HeldSync(monkeypatch)

    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            assert gw.write(0, b"\x03" * BIG, False) is None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(gw.flush)
                await held.wait_entered()
                for i in range(chunkstore.AHEAD_ROUNDS + 1):  # more than the rounds allow
                    assert gw.write(BIG, bytes([i]) * BIG, False) is None
                    if i == 0:
                        held.release.set()
                    await trio.sleep(0)
            assert held.rounds >= 2
            assert held.rounds <= chunkstore.AHEAD_ROUNDS
            assert not [c for c in store._dirty.values() if c.touched]

    trio.run(main)


def fua_msg(index: int, data: bytes, token: int = 1) -> m.WriteChunk:
    return m.WriteChunk("vol", "lin", index, 1, (1,), 0, data, 4 * MiB, 0, True, 1, token)


def test_a_fua_write_after_large_writes_leaves_the_gateway_serving(tmp_path, monkeypatch):
    """A FUA write is a write and a sync of its chunk. After large writes, that sync meant
    the data file's whole writeback on the loop: every volume of the host stood still.
    The writeback now goes ahead in a worker thread, the write's own sync follows on the
    loop, and only then is the write answered; other requests are served meanwhile."""
    held = HeldSync(monkeypatch)

    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            data = bytes(range(256)) * (BIG // 256)
            assert gw.write(0, data, False) is None
            done = trio.Event()

            async def fua():
                result = gw.write(BIG, b"\x07" * 4096, True)
                assert hasattr(result, "__await__"), "a FUA write's sync must not run on the loop"
                await result
                done.set()

            second = trio.Event()
            synced = []  # ChunkStore.sync_chunks calls: whether the writeback had ended
            real = store.sync_chunks
            store.sync_chunks = lambda keys: (synced.append(held.release.is_set()), real(keys))

            async def fua_again(answer):
                await answer
                second.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fua)
                await held.wait_entered()
                # a second FUA write while that writeback runs: not synced on the loop
                # either (its fdatasync would wait for the writeback under way)
                answer = gw.write(3 * BIG, b"\x08" * 4096, True)
                assert hasattr(answer, "__await__")
                nursery.start_soon(fua_again, answer)
                # and a flush: to a thread as well, not a sync waiting on the loop
                flushing = gw.flush()
                assert flushing is not None
                nursery.start_soon(lambda: flushing)
                got = await call(gw.read(0, 4096))
                assert bytes(got) == data[:4096]
                assert gw.write(2 * BIG, b"\x05" * 4096, False) is None
                # the FUA write's bytes are in place already: a read sees them
                got = await call(gw.read(BIG, 4096))
                assert bytes(got) == b"\x07" * 4096
                await trio.sleep(0.05)
                assert not done.is_set(), "the FUA write answered before its sync ended"
                assert not second.is_set()
                assert synced == []  # the chunks' own sync follows the writeback
                held.release.set()
            assert done.is_set() and second.is_set()
            assert synced == [True, True]
            assert any(p.endswith("data-1M.bin") for p in held.synced)
            # with nothing left to write back, a FUA write is synced on the loop again
            assert not store.writeback_due()
            assert gw.write(0, b"\x09" * 4096, True) is None

    trio.run(main)


def test_a_small_fua_write_is_answered_at_once_by_a_replica(tmp_path, monkeypatch):
    """Little to write back: the FUA write's sync stays one fdatasync on the loop, no
    thread; a fenced FUA write is refused before anything is written or synced."""
    held = HeldSync(monkeypatch)
    with ChunkStore(tmp_path / "store", 64 * MiB) as store:
        replica = Replica(store, "srv", lambda: 1)
        assert type(replica.handle(fua_msg(0, b"\x01" * 4096, token=2))) is m.Ok
        assert not held.entered.is_set()
        with pytest.raises(Fenced):
            replica.handle(fua_msg(1, b"\x02" * BIG, token=1))
        assert store.info(ChunkKey("lin", 1, 1)) is None
        assert not held.entered.is_set()
        # after a large write, a FUA write's writeback goes ahead in a thread: its reply
        held.release.set()  # is an awaitable
        replica.write("vol", "lin", 2, 1, (1,), 0, b"\x04" * BIG, 4 * MiB, 0, False, 1, 2)
        reply = replica.handle(fua_msg(1, b"\x03" * 4096, token=2))
        assert hasattr(reply, "__await__")
        assert type(trio.run(lambda: reply)) is m.Ok
        assert held.entered.is_set()
        assert store.sync_ahead() is None
