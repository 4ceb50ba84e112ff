"""A second blockd started with the host id of one that runs (another data directory: a
copied config, a typo) must not take that host's place in the pool."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, stop_process


def _blockd(tmp_path, data: str, log: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", "h1", "--data-dir", str(tmp_path / data),
         "--registry", f"lmdb://{tmp_path}/reg", "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0",
         "--log-level", "info"],
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
