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
    r.written = {("l", 0): [(1.0, 0, 4096), (2.0, 0, 512), (3.0, 8192, 12288)],
                 ("l", 1): [(1.5, 0, 4096)]}
    r.forget_written(2.0)
    assert r.written == {("l", 0): [(3.0, 8192, 12288)]}
    r.forget_written(3.0)
    assert r.written == {}
