"""Interop fixtures: the NBD runner (`python -m nbd_frontend.server`) as a subprocess on a
free loopback port, serving in-memory exports to real clients."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import stop_process

ROOT = Path(__file__).resolve().parents[2]

# name -> size; every test uses its own export so tests stay independent.
NBD_EXPORTS = {
    "disk": "64M", "aio": "16M", "map": "8M", "copy": "16M", "qemu": "16M", "qemuio": "16M",
    "fio": "32M", "ro": "1M:ro", "libnbd": "16M",
}


class NbdRunner:
    def __init__(self, proc: subprocess.Popen, host: str, port: int) -> None:
        self.proc, self.host, self.port = proc, host, port

    def uri(self, name: str) -> str:
        return f"nbd://{self.host}:{self.port}/{name}"


@pytest.fixture(scope="module")
def nbd_server():
    args = [sys.executable, "-m", "nbd_frontend.server", "--listen", "127.0.0.1:0"]
    for name, size in NBD_EXPORTS.items():
        args += ["--memory", f"{name}={size}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stdout.readline()
    match = re.search(r"listening on ([\d.]+):(\d+)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"runner did not start: {line!r} {proc.stderr.read()!r}")
    runner = NbdRunner(proc, match.group(1), int(match.group(2)))
    try:
        yield runner
    finally:
        alive = proc.poll() is None
        stop_process(proc)
        assert alive, f"the NBD runner died: {proc.stderr.read()[-2000:]}"
