"""A replica that restarts learns the fencing tokens granted meanwhile before it serves."""

from __future__ import annotations

import time

import pytest

from replicator import messages as m
from replicator.replica import Replica
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.errors import Fenced
from vbp.registry import open_registry


def write(token: int) -> m.WriteChunk:
    return m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, 1 << 20, 0, False, 1, token)


def test_restarted_replica_refuses_a_gateway_fenced_while_it_was_down():
    reg = open_registry("memory://")
    old = reg.acquire_lease("v", "gw1", 0.0001)
    time.sleep(0.01)  # gw1 stops renewing: its lease runs out
    store = MemoryChunkStore(None, 64 << 20)
    r = Replica(store, "h1", lambda: 1)
    r.handle(write(old.token))  # before the takeover
    new = reg.acquire_lease("v", "gw2", 30)  # taken over while h1 is down: h1 never hears of it
    restarted = Replica(store, "h1", lambda: 1)
    restarted.learn_tokens(reg.lease_tokens())
    with pytest.raises(Fenced):
        restarted.handle(write(old.token))
    restarted.handle(write(new.token))
    assert restarted.newest_token("v") == new.token


def test_notes_of_writes_are_forgotten_once_the_window_passed_them():
    """Replica.written keeps, per chunk, the writes applied after the time given to
    forget_written (those at it or before go), and forgets chunks left with none."""
    r = Replica(MemoryChunkStore(None, 1 << 30), "h1", lambda: 1)
    r.written = {("l", 0): [(1.0, 0, 4096, 1), (2.0, 0, 512, 1), (3.0, 8192, 12288, 2)],
                 ("l", 1): [(1.5, 0, 4096, 1)]}
    r.forget_written(2.0)
    assert r.written == {("l", 0): [(3.0, 8192, 12288, 2)]}
    r.forget_written(3.0)
    assert r.written == {}


def test_the_tokens_of_deleted_volumes_are_forgotten():
    """A replica keeps the newest fencing token of each volume written through it, so a
    deposed gateway's writes are refused. Nothing dropped the tokens of deleted volumes:
    a long-running blockd kept one per volume name it ever served, however many were
    created and deleted since. Once the registry forgot a deleted volume's lease record
    (forget_leases_of_deleted: no holder can still serve it; a later volume of the name
    gets a greater token), each host forgets its token too (Blockd.prune_tokens, run
    with the metrics' pruning every gc_interval), once garbage collection freed the
    volume's chunks here; the live volumes' stay."""
    import trio

    from blockd.service import Blockd
    from control import api
    from tests.sim.harness import Sim, call, run
    from vbp.layout import MiB

    async def main():
        sim = Sim(3, hosts=3, zones=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            provider = sim.hosts["h0"].provider
            for i in range(40):
                sim.create_volume(f"v{i}", MiB, replicas=3, min_size=2)
                gw = await provider.open_export(f"v{i}")
                await call(gw.write(0, b"\x01" * 4096, False))  # a lease, its token
                gw.close()
                while api._lease_live(sim.reg, f"v{i}"):  # (handed back)
                    await trio.sleep(0.01)
                if i:  # (v0 stays)
                    api.delete_volume(sim.reg, f"v{i}", force=True)
            assert sim.reg.forget_leases_of_deleted(0) == 39
            await trio.sleep(30)  # (h0 publishes that it no longer reads v39)
            await sim.hosts["h0"].publish_stats()
            for h in sim.hosts.values():  # (every copy saw each volume's token)
                assert all(h.replica.newest_token(f"v{i}") for i in range(40))
            for h in sim.hosts.values():
                await h.collect_garbage()  # (the deleted volumes' chunks go,
                h.replica.forget_recent()  # and with them their takeover marks: resync)
                await Blockd.prune_tokens(h)
                assert h.replica.newest_token("v0") > 0
                assert [f"v{i}" for i in range(40) if h.replica.newest_token(f"v{i}")] == ["v0"]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_request_refused_leaves_the_newest_token_as_it_was():
    """A write or a zeroing refused (an old epoch, a bad range or chunk size) changes
    nothing on the replica, its fencing token included: adopted, a token from a request
    nothing would apply fenced every later write of the volume's holder. A good one with
    the newer token is a new holder."""
    from vbp.errors import InvalidArgument, StaleEpoch

    seen = []
    r = Replica(MemoryChunkStore(None, 64 << 20), "h1", lambda: 5)
    r.on_token = lambda volume, token: seen.append((volume, token))
    r.handle(m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, 1 << 20, 0, False, 5, 7))
    big = 2**63 - 1
    refused = [
        (StaleEpoch, m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"y" * 4096, 1 << 20, 0, False, 0, big)),
        (InvalidArgument, m.WriteChunk("v", "lin", 0, 1, (1,), (1 << 20) - 100, b"y" * 4096,
                                       1 << 20, 0, False, 5, big)),
        (InvalidArgument, m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"y" * 4096, 3 << 20, 0, False,
                                       5, big)),
        (StaleEpoch, m.ZeroChunk("v", "lin", 0, 1, (1,), 0, 4096, 1 << 20, 0, False, 0, big)),
        (InvalidArgument, m.ZeroChunk("v", "lin", 0, 1, (1,), 1 << 20, 4096, 1 << 20, 0, False, 5,
                                      big)),
        (StaleEpoch, m.WriteBatch("v", "lin", 1, (1,), (0,), (0,), (4096,), b"y" * 4096, 1 << 20,
                                  False, 0, big)),
        # refused by the store itself: the chunk here is of 1 MiB, and -1 is no version
        (InvalidArgument, m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"y" * 4096, 2 << 20, 0, False,
                                       5, big)),
        (InvalidArgument, m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"y" * 4096, 1 << 20, -1, False,
                                       5, big)),
        (InvalidArgument, m.ZeroChunk("v", "lin", 0, 1, (1,), 0, 4096, 2 << 20, 0, False, 5, big)),
        (InvalidArgument, m.ZeroChunk("v", "lin", 0, 1, (1,), 0, 4096, 1 << 20, -1, False, 5, big)),
        (InvalidArgument, m.WriteBatch("v", "lin", 1, (1,), (0,), (0,), (4096,), b"y" * 4096,
                                       2 << 20, False, 5, big)),
    ]
    for error, msg in refused:
        with pytest.raises(error):
            r.handle(msg)
        assert r.newest_token("v") == 7 and seen == [("v", 7)], msg
    r.handle(m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"z" * 4096, 1 << 20, 0, False, 5, 9))
    assert r.newest_token("v") == 9 and seen == [("v", 7), ("v", 9)]
    with pytest.raises(Fenced):
        r.handle(write(7))


def test_a_chunk_larger_than_a_reply_frame_is_never_made():
    """A peer's write names the size of the chunk it makes, and the store took up to
    1 GiB: a chunk that large read back whole was a reply no peer could take (frames hold
    64 MiB), and a few 24-byte ReadChunks pinned gigabytes. Sizes past CHUNK_SIZE_MAX (the
    largest a volume may have) are refused; 64 MiB is made."""
    from vbp.errors import InvalidArgument
    from vbp.layout import CHUNK_SIZE_MAX

    r = Replica(MemoryChunkStore(None, 1 << 30), "h1", lambda: 5)
    for size in (CHUNK_SIZE_MAX * 2, 1 << 30):
        with pytest.raises(InvalidArgument, match="power of two between"):
            r.handle(m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, size, 0, False, 5, 7))
        with pytest.raises(InvalidArgument):
            r.handle(m.ZeroChunk("v", "lin", 1, 1, (1,), 0, 4096, size, 0, False, 5, 7))
    assert not list(r.store.keys())
    r.handle(m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK_SIZE_MAX, 0, False, 5, 7))
    assert len(list(r.store.keys())) == 1
