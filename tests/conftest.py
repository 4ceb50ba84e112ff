"""Fixtures shared by every tier: free loopback ports, the vbp CLI as a real subprocess,
and a real sandbox pool of blockd processes."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_floor() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(n: int) -> int:
    """A base port such that base..base+n-1 are free on loopback right now, below the
    kernel's ephemeral range: a test that restarts a host reuses its ports, and an
    outgoing connection meanwhile (a peer, a client) could otherwise be given one of them
    as its local port."""
    rng = random.Random()
    top = min(_ephemeral_floor(), 60000) - n
    for _ in range(200):
        base = rng.randrange(20000, max(top, 20001))
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range on loopback")


def stop_process(p: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if `p` has not ended within `timeout` seconds; reaped."""
    p.terminate()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def run_vbp(*args, check=True, env=None, input=None, timeout=120) -> subprocess.CompletedProcess:
    """Run the real `vbp` command (the venv's console script)."""
    cmd = [sys.executable, "-m", "control.cli", *map(str, args)]
    e = dict(os.environ)
    e.pop("VBP_REGISTRY", None)
    if env:
        e.update(env)
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, input=input, timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"vbp {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class SandboxHandle:
    def __init__(self, directory: Path, hosts: int):
        self.dir = directory
        self.n = hosts
        self.base_port = free_port_range(2 * hosts)
        self.info: dict = {}
        self.capacity = "4G"  # of each host, at every `up` (another one would move chunks)

    @property
    def registry(self) -> str:
        return f"lmdb://{self.dir / 'registry'}"

    def vbp(self, *args, check=True, **kw):
        return run_vbp("--registry", self.registry, *args, check=check, **kw)

    def up(self):
        p = run_vbp("sandbox", "up", "--hosts", self.n, "--dir", self.dir,
                    "--base-port", self.base_port, "--capacity", self.capacity, "--json",
                    "--set", "gc_interval=1")
        self.info = json.loads(p.stdout)
        return self.info

    def down(self):
        return run_vbp("sandbox", "down", "--dir", self.dir, check=False)

    def uri(self, volume: str, host: int = 0) -> str:
        return f"{self.info['hosts'][host]['nbd']}/{volume}"

    def pids(self) -> list[int]:
        return [h["pid"] for h in self.info["hosts"]]

    def log(self, host: int = 0) -> str:
        return (self.dir / f"host{host + 1}" / "blockd.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sb = SandboxHandle(tmp_path_factory.mktemp("sandbox"), 3)
    try:
        sb.up()
        yield sb
    finally:
        sb.down()


def need(tool: str) -> str:
    """Path of a required external tool; its absence is a failed test, never a skip:
    `make test` installs every tool the suite uses."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed (make test installs it)")
    return path


@contextmanager
def nbdkit_unix(tmp_path, *args):
    """nbdkit serving `args` (filters, plugin, parameters) on a unix socket in `tmp_path`;
    yields its URI once it accepts connections. (Its pid file, nbdkit.pid, is written
    then; the socket file exists from the bind, before the listen, and a connection
    made between the two is refused.)"""
    sock, ready = tmp_path / "nbdkit.sock", tmp_path / "nbdkit.pid"
    p = subprocess.Popen([need("nbdkit"), "-f", "-U", str(sock), "-P", str(ready), *args],
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), p.stderr.read() if p.poll() is not None else "nbdkit did not listen"
        yield f"nbd+unix:///?socket={sock}"
    finally:
        stop_process(p)  # (SIGTERM: a stats filter writes its file)
