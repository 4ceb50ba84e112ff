"""The embedded registry (lmdb://) shared by processes that may be killed: a process
SIGKILLed inside a read transaction leaves its reader slot holding that snapshot, and
LMDB reuses no page freed after it. The processes that stay up wrote new pages at every
commit (about 7 a heartbeat) until the 1 GiB map was full and every write failed,
heartbeats first: every host published down (found by a review). Those that write now
sweep the reader table (reader_check) at most every READER_CHECK_EVERY seconds, and once
more before they give up on a full map."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

import vbp.registry.lmdb_backend as lb
from vbp.cluster import HostRecord
from vbp.errors import RegistryUnavailable
from vbp.registry import Registry
from vbp.registry.kv import Put


def _reader(path, ready):
    kv = lb.LmdbKV("lmdb://" + path, path)
    t = kv._env.begin()
    t.get(b"vbp/cluster/map")
    ready.set()
    time.sleep(3600)


def dead_reader(path: str) -> None:
    """A process that opened the registry at `path`, began a read and was SIGKILLed."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_reader, args=(path, ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join()


def pages(reg) -> int:
    return reg.kv._env.info()["last_pgno"]


def test_a_reader_killed_mid_read_no_longer_makes_the_registry_grow(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "READER_CHECK_EVERY", 0.2, raising=False)
    path = str(tmp_path / "reg")
    reg = Registry(lb.LmdbKV("lmdb://" + path, path))  # a blockd, up before and after
    reg.register_host(HostRecord("h1", "127.0.0.1:1", "127.0.0.1:2"), 6.0)
    dead_reader(path)
    end = time.monotonic() + 0.5  # (past a sweep)
    n = 0
    while time.monotonic() < end:
        reg.heartbeat("h1", 6.0, {"used": n})
        n += 1
    grown = pages(reg)
    for m in range(3000):  # (pinned, each heartbeat took new pages: 20,000 more)
        reg.heartbeat("h1", 6.0, {"used": n + m})
    assert pages(reg) <= grown + 50, (grown, pages(reg))
    reg.close()


def test_a_full_map_is_met_again_after_a_sweep_and_named_if_still_full(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "READER_CHECK_EVERY", 3600.0, raising=False)  # (no sweep but the full map's)
    monkeypatch.setattr(lb, "MAP_SIZE", 1 << 20)
    path = str(tmp_path / "reg")
    reg = Registry(lb.LmdbKV("lmdb://" + path, path))
    reg.register_host(HostRecord("h1", "127.0.0.1:1", "127.0.0.1:2"), 6.0)
    dead_reader(path)
    for n in range(2000):  # (the 1 MiB map, full within 60 of them while pinned)
        reg.heartbeat("h1", 6.0, {"used": n})
    with pytest.raises(RegistryUnavailable, match="map at .* is full"):
        reg.kv.txn([], [Put(b"vbp/test/big", os.urandom(2 << 20))])  # (larger than the map)
    reg.close()
