"""`vbp volume import` / `export` (control.transfer) told why a server refused or failed:
the reason a server gives with an option error reaches the user, and a request the server
fails names what it was and where. Against real servers: vbp's own NBD server
(nbd_frontend.server, what blockd runs) refusing an export the way blockd does, and nbdkit
failing one range of the disk."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from control.transfer import TransferError, export_volume, import_file
from tests.conftest import ROOT, need, stop_process

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20

# vbp's NBD server refusing export "v" as blockd does when the registry cannot be
# reached while it opens a volume (an etcd failover): NBD_REP_ERR_PLATFORM with the reason
_REFUSING_SERVER = """
import sys, trio
from nbd_frontend.export import MemoryProvider
from nbd_frontend.server import serve_nbd
from vbp.errors import RegistryUnavailable

class Refusing(MemoryProvider):
    def open_export(self, name):
        if name == "v":
            raise RegistryUnavailable("registry etcd://10.9.8.7:2379 unreachable: timed out")
        return super().open_export(name)

async def main():
    provider = Refusing()
    provider.add("ok", 1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
        print(port, flush=True)

trio.run(main)
"""


@contextmanager
def refusing_server():
    p = subprocess.Popen([sys.executable, "-c", _REFUSING_SERVER], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield f"nbd://127.0.0.1:{int(p.stdout.readline())}"
    finally:
        stop_process(p)


def test_a_refused_export_says_the_servers_reason(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 4096)
    with refusing_server() as server:
        with pytest.raises(TransferError, match="registry etcd://10.9.8.7:2379 unreachable"):
            import_file(src, f"{server}/v", timeout=10)
        with pytest.raises(TransferError, match="registry etcd://10.9.8.7:2379 unreachable"):
            export_volume(f"{server}/v", tmp_path / "out.img", timeout=10)
        # and an export it serves still copies (the message capture leaves no trace)
        export_volume(f"{server}/ok", tmp_path / "ok.img", timeout=10)
        assert (tmp_path / "ok.img").stat().st_size == MiB
