"""A second blockd started with the host id of one that runs (another data directory: a
copied config, a typo) must not take that host's place in the pool; nor may a blockd take
another host's data directory under its own host id."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, stop_process


def _blockd(tmp_path, data: str, log: str, host_id: str = "h1", reg: str = "reg") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a heartbeat_ttl of 2 s (6 by default): a second blockd of a running host's id waits
    # that long, and a second more, for the liveness of a process of its id that just died
    conf = tmp_path / "blockd.toml"
    conf.write_text("heartbeat_ttl = 2\n")
    return subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", host_id, "--data-dir", str(tmp_path / data),
         "--registry", f"lmdb://{tmp_path}/{reg}", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0",
         "--log-level", "info", "--config", str(conf)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / log, "wb"))


def test_a_second_blockd_with_a_running_hosts_id_is_refused(tmp_path):
    from vbp.registry import open_registry

    a = _blockd(tmp_path, "data-a", "a.log")
    b = None
    try:
        deadline = time.monotonic() + 30
        while "event=ready" not in (tmp_path / "a.log").read_text():
            assert a.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.1)
        with open_registry(f"lmdb://{tmp_path}/reg") as reg:
            before = reg.cluster_map().host("h1")
        b = _blockd(tmp_path, "data-b", "b.log")
        try:
            b.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with open_registry(f"lmdb://{tmp_path}/reg") as reg:
            after = reg.cluster_map().host("h1")
        # the running h1 is still the pool's h1: its peers reach it, its disk is its own
        assert (after.peer, after.nbd, after.store_id) == (before.peer, before.nbd, before.store_id)
        # and the second is told, in one line, with a non-zero exit
        assert b.returncode not in (None, 0)
        err = (tmp_path / "b.log").read_text()
        assert "Traceback" not in err and "h1" in err
    finally:
        if b is not None:
            stop_process(b, 15)
        stop_process(a, 15)


def _ready(p: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 30
    while "event=ready" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_a_blockd_given_another_hosts_data_directory_is_refused(tmp_path):
    """h1's data directory under host id h2 (a copied configuration, a typo in host_id):
    h2 would join as a new host holding the chunks placed on h1, and h1's copies would
    count as lost. Refused, exit 2 (a setting), naming the owner; h1 starts on it again.
    A store from before stores recorded their host is known by the registry's record of
    h1, which names its store."""
    import lmdb

    from vbp.registry import open_registry

    a = _blockd(tmp_path, "data-a", "a.log")
    try:
        _ready(a, tmp_path / "a.log")
    finally:
        stop_process(a, 15)
    # another pool's registry knows nothing of h1: the store's own record of its host
    b = _blockd(tmp_path, "data-a", "b2.log", host_id="h2", reg="reg2")
    try:
        assert b.wait(30) == 2
    finally:
        stop_process(b, 15)
    assert "the chunk store" in (tmp_path / "b2.log").read_text()
    for older in (False, True):
        if older:  # the store's record of its host gone, as in a store from before it
            env = lmdb.open(str(tmp_path / "data-a" / "chunks" / "index"), max_dbs=8)
            with env.begin(write=True) as txn:
                assert txn.delete(b"host_id", db=env.open_db(b"meta", txn=txn))
            env.close()
        b = _blockd(tmp_path, "data-a", f"b{older:d}.log", host_id="h2")
        try:
            assert b.wait(30) == 2
        finally:
            stop_process(b, 15)
        err = (tmp_path / f"b{older:d}.log").read_text()
        assert "Traceback" not in err, err
        assert "is host h1's" in err and "set host_id to h1" in err, err
        with open_registry(f"lmdb://{tmp_path}/reg") as reg:
            assert [h.id for h in reg.cluster_map().hosts] == ["h1"]
    a = _blockd(tmp_path, "data-a", "a2.log")  # its own host takes it back
    try:
        _ready(a, tmp_path / "a2.log")
    finally:
        stop_process(a, 15)
