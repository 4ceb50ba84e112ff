"""etcd raises every lease to a minimum TTL, 1.5 election timeouts rounded up to a second:
a host's liveness key put for heartbeat_ttl may last longer. What waits for one to lapse
must wait that long."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, stop_process
from tests.etcd import EtcdProcess
from vbp.registry import open_registry
from vbp.registry.kv import Put

pytestmark = pytest.mark.timeout(120)

ELECTION_MS = 3000  # etcd's minimum lease TTL: ceil(1.5 * 3 s) = 5 s


@pytest.fixture
def slow_etcd(tmp_path):
    etcd = EtcdProcess(tmp_path / "etcd", election_ms=ELECTION_MS).start(timeout=30)
    try:
        yield etcd
    finally:
        etcd.stop()


def test_the_registry_knows_etcds_minimum_ttl(slow_etcd, tmp_path):
    with open_registry(slow_etcd.url) as reg:
        assert reg.kv.ttl_floor() == 5
        assert reg.liveness_ttl(1.0) == 5 and reg.liveness_ttl(6.0) == 6
        reg.kv.txn([], [Put(b"probe", b"1", 1.0)])
        time.sleep(2.5)  # past the TTL asked: etcd keeps it to its minimum
        assert reg.kv.get(b"probe")[0] is not None
    with open_registry(f"lmdb://{tmp_path}/reg") as reg:
        assert reg.kv.ttl_floor() == 0 and reg.liveness_ttl(1.0) == 1.0


def _blockd(tmp_path, url: str, data: str, log: str) -> subprocess.Popen:
    config = tmp_path / "blockd.toml"
    config.write_text("heartbeat_ttl = 1.0\n")
    return subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--config", str(config), "--host-id", "h1",
         "--data-dir", str(tmp_path / data), "--registry", url, "--listen", "127.0.0.1:0",
         "--nbd", "127.0.0.1:0", "--log-level", "info"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / log, "wb"))


def _wait_ready(p: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 40
    while "event=ready" not in log.read_text():
        assert p.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_a_host_restarted_on_a_new_disk_waits_out_etcds_minimum_ttl(slow_etcd, tmp_path):
    """A blockd killed, then started again under its host id on a replaced disk, waits for
    the dead one's liveness to lapse before it serves. It waited heartbeat_ttl and a
    second (2 s here), and stopped with "host id in use" while etcd kept the key 5 s."""
    a = _blockd(tmp_path, slow_etcd.url, "data-a", "a.log")
    b = None
    try:
        _wait_ready(a, tmp_path / "a.log")
        time.sleep(0.5)  # (a heartbeat or two)
        a.send_signal(signal.SIGKILL)
        a.wait()
        b = _blockd(tmp_path, slow_etcd.url, "data-b", "b.log")
        _wait_ready(b, tmp_path / "b.log")
        assert "event=heartbeat_ttl_raised" in (tmp_path / "b.log").read_text()
    finally:
        if b is not None:
            stop_process(b, 15)
        stop_process(a, 15)
