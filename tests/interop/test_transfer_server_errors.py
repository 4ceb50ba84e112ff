"""`vbp volume import` / `export` (control.transfer) told why a server refused or failed:
the reason a server gives with an option error reaches the user, and a request the server
fails names what it was and where. Against real servers: vbp's own NBD server
(nbd_frontend.server, what blockd runs) refusing an export the way blockd does, and nbdkit
failing one range of the disk."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from control.transfer import TransferError, export_volume, import_file
from tests.conftest import ROOT, nbdkit_unix, stop_process

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


nbdkit = nbdkit_unix  # (tests.conftest)


# a disk of 8 MiB whose range [4 MiB, 6 MiB) fails every read and write with EIO (a
# chunk of a blockd volume below min_size replicas), the rest reading zeroes
_BAD = "[ $4 -ge 4194304 ] && [ $4 -lt 6291456 ] && { echo 'EIO bad range' >&2; exit 1; }"
BAD_RANGE_DISK = ("eval", "get_size=echo 8M", f"pread={_BAD}; head -c $3 /dev/zero",
                  f"pwrite={_BAD}; cat >/dev/null", "can_write=exit 0")


def failure(transfer) -> str:
    """The message of the TransferError `transfer()` raises, the libnbd handle collected:
    libnbd 1.14 closes a connection only then (its transfer's requests may hold it in a
    cycle), and nbdkit stopping waits for its connections. (The CLI exits.)"""
    try:
        transfer()
    except TransferError as e:
        message = str(e)
    else:
        raise AssertionError("the transfer succeeded")
    gc.collect()
    return message


def test_a_failed_write_names_its_offset(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(8 * MiB))
    with nbdkit(tmp_path, *BAD_RANGE_DISK) as uri:
        message = failure(lambda: import_file(src, uri, timeout=10))
    assert "write of 2097152 bytes at offset 4194304" in message
    assert "Input/output error" in message


def test_a_failed_read_names_its_offset_and_leaves_no_file(tmp_path):
    out = tmp_path / "out.img"
    with nbdkit(tmp_path, *BAD_RANGE_DISK) as uri:
        message = failure(lambda: export_volume(uri, out, timeout=10))
    assert "read of 2097152 bytes at offset 4194304" in message
    assert "Input/output error" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nbdkit.pid", "nbdkit.sock"]
