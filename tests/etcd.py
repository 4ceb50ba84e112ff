"""A real etcd for tests: on free loopback ports with a temp data dir, or on an address
inside a network namespace (the partition tests). Stopped by its owner; `pause`/`resume`
freeze it with SIGSTOP/SIGCONT, the way a hung registry looks to its clients."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports: all bound at once, so the kernel cannot give the
    same one twice (one at a time, two picks coincided about once in 9,000)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdProcess:
    def __init__(self, data_dir: Path, host: str = "127.0.0.1", netns: str | None = None,
                 election_ms: int = 100) -> None:
        self.data_dir = data_dir
        self.election_ms = election_ms  # (heartbeats every tenth of it)
        self.host = host
        self.netns = netns  # run inside this network namespace (`ip netns exec`)
        self.client_port, self.peer_port = free_ports(2) if netns is None else (2379, 2380)
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    def start(self, timeout: float = 15.0) -> "EtcdProcess":
        client = f"http://{self.endpoint}"
        peer = f"http://{self.host}:{self.peer_port}"
        self.log = open(self.data_dir.parent / f"etcd-{self.data_dir.name}.log", "ab")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*prefix, ETCD, "--name", "vbp-test", "--data-dir", str(self.data_dir),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"vbp-test={peer}", "--initial-cluster-state", "new",
             "--heartbeat-interval", str(self.election_ms // 10),
             "--election-timeout", str(self.election_ms),
             "--log-level", "error"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}, see {self.log.name}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not become healthy in {timeout}s, see {self.log.name}")

    def healthy(self) -> bool:
        """etcd answers /health (from this process's network namespace)."""
        try:
            return httpx.get(f"http://{self.endpoint}/health", timeout=0.5).json().get("health") == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def kill(self) -> None:
        """SIGKILL: etcd vanishes at once (start() brings it back on the same ports)."""
        if self.proc and self.proc.poll() is None:
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
