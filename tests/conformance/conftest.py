"""Fixtures for the conformance suites: a real etcd on loopback.

`etcd_server` is one etcd for the whole session (free loopback ports, a temp data dir,
short heartbeat/election so etcd's minimum lease TTL is 1 s). `EtcdProcess` is also usable
directly by tests that need their own etcd to stop.
"""

from __future__ import annotations

import base64
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    def start(self, timeout: float = 15.0) -> "EtcdProcess":
        client = f"http://{self.endpoint}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.data_dir.parent / f"etcd-{self.client_port}.log", "wb")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "vbp-test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"vbp-test={peer}", "--initial-cluster-state", "new",
             "--heartbeat-interval", "10", "--election-timeout", "100",
             "--log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}, see {self.log.name}")
            try:
                if httpx.get(f"{client}/health", timeout=0.5).json().get("health") == "true":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s, see {self.log.name}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def wipe(self, prefix: bytes = b"vbp/") -> None:
        """Delete every key under prefix (between tests sharing the session etcd)."""
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        httpx.post(f"http://{self.endpoint}/v3/kv/deleterange",
                   json={"key": base64.b64encode(prefix).decode(),
                         "range_end": base64.b64encode(end).decode()}, timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed (Debian package etcd-server; make test installs it)")
    e = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield e
    e.stop()


@pytest.fixture
def etcd_factory(tmp_path):
    """Start private etcd instances that a test may stop; all stopped at teardown."""
    started: list[EtcdProcess] = []

    def make() -> EtcdProcess:
        e = EtcdProcess(tmp_path / f"etcd{len(started)}").start()
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()
