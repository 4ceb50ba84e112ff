"""Real NBD clients against the vbp NBD frontend: libnbd (python), nbdinfo, nbdcopy,
qemu-img, qemu-io, fio."""

from __future__ import annotations

import errno
import json
import random
import socket
import struct
import subprocess

import nbd  # python3-libnbd: make test installs it; missing is a failure, not a skip
import pytest

from nbd_frontend import proto as nbd_const
from tests.conftest import need

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def run(*args: str, timeout: float = 60) -> str:
    need(args[0])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
    return proc.stdout


def code(exc: Exception) -> str | None:
    """libnbd's Error carries the errno as a name ('EPERM') or a number."""
    value = getattr(exc, "errno", None)
    return errno.errorcode.get(value) if isinstance(value, int) else value


def handle(uri: str, *, meta: bool = True) -> "nbd.NBD":
    h = nbd.NBD()
    if meta:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def test_libnbd_sync_operations(nbd_server):
    h = handle(nbd_server.uri("libnbd"))
    try:
        assert h.get_size() == 16 * MiB
        assert h.get_structured_replies_negotiated()
        assert h.can_meta_context("base:allocation")
        assert not h.is_read_only()
        for can in (h.can_flush, h.can_fua, h.can_trim, h.can_zero, h.can_fast_zero,
                    h.can_cache, h.can_multi_conn, h.can_df):
            assert can()
        data = random.randbytes(3 * 4096 + 17)
        h.pwrite(data, 5000, nbd.CMD_FLAG_FUA)
        assert h.pread(len(data), 5000) == data
        h.flush()
        h.trim(MiB, 4 * MiB)
        h.zero(8192, 2 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.cache(MiB, 0)
        assert h.pread(8192, 2 * MiB) == bytes(8192)
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(4096, 0) == bytes(4096)
        chunks = []
        h.pread_structured(100, 0, lambda buf, off, status, err: chunks.append((off, status)),
                           nbd.CMD_FLAG_DF)
        assert chunks == [(0, nbd.READ_HOLE)] or chunks == [(0, nbd.READ_DATA)]

        extents = []

        def on_status(context, offset, entries, err):
            assert context == "base:allocation"
            extents.append((offset, entries))
            return 0

        h.block_status(16 * MiB, 0, on_status)
        (offset, entries), = extents
        pairs = list(zip(entries[::2], entries[1::2]))
        assert offset == 0 and sum(n for n, _ in pairs) == 16 * MiB
        # written data at 4096..~20K, zeroed-without-hole at 2 MiB, the rest holes
        assert pairs[0] == (4096, 3) and pairs[1][1] == 0
        assert (8192, 0) in pairs and pairs[-1][1] == 3

        with pytest.raises(nbd.Error) as info:
            h.pread(10, 16 * MiB)
        assert code(info.value) == "EINVAL"
        h.set_strict_mode(0)  # let the server, not libnbd, judge the next requests
        with pytest.raises(nbd.Error) as info:
            h.pread(10, 16 * MiB - 5)
        assert code(info.value) == "EINVAL"
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"x" * 10, 16 * MiB - 5)
        assert code(info.value) == "ENOSPC"
    finally:
        h.shutdown()


def test_libnbd_aio_64_in_flight(nbd_server):
    h = handle(nbd_server.uri("aio"))
    try:
        blocks = [random.randbytes(64 * 1024) for _ in range(64)]
        pending = {h.aio_pwrite(b, i * len(b)) for i, b in enumerate(blocks)}
        assert h.aio_in_flight() == 64
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}
        bufs = [nbd.Buffer(64 * 1024) for _ in range(64)]
        pending = {h.aio_pread(b, i * 64 * 1024) for i, b in enumerate(bufs)}
        assert h.aio_in_flight() == 64
        while pending:
            h.poll(-1)
            pending = {c for c in pending if not h.aio_command_completed(c)}
        assert [bytes(b.to_bytearray()) for b in bufs] == blocks
    finally:
        h.shutdown()


def test_read_only_export_refuses_writes(nbd_server):
    h = handle(nbd_server.uri("ro"))
    try:
        assert h.is_read_only() and not h.can_trim() and not h.can_zero()
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"nope", 0)
        assert code(info.value) == "EPERM"
        h.set_strict_mode(0)
        for call in (lambda: h.pwrite(b"nope", 0), lambda: h.trim(4096, 0)):
            with pytest.raises(nbd.Error) as info:
                call()
            assert code(info.value) == "EPERM"
        assert h.pread(4, 0) == bytes(4)
    finally:
        h.shutdown()


def test_unknown_export_is_an_error(nbd_server):
    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(nbd_server.uri("does-not-exist"))
    proc = subprocess.run([need("nbdinfo"), nbd_server.uri("does-not-exist")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0


def test_nbdinfo_size_list_and_map(nbd_server):
    assert run("nbdinfo", "--size", nbd_server.uri("disk")).strip() == str(64 * MiB)
    listing = json.loads(run("nbdinfo", "--list", "--json", nbd_server.uri("")))
    assert {"disk", "ro", "fio"} <= {e["export-name"] for e in listing["exports"]}
    h = handle(nbd_server.uri("map"))
    try:
        h.pwrite(b"\x42" * MiB, 2 * MiB)
    finally:
        h.shutdown()
    mapping = json.loads(run("nbdinfo", "--map", "--json", nbd_server.uri("map")))
    assert [(m["offset"], m["length"], m["type"]) for m in mapping] == [
        (0, 2 * MiB, 3), (2 * MiB, MiB, 0), (3 * MiB, 5 * MiB, 3)]


def test_nbdcopy_both_ways(nbd_server, tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    data = bytearray(random.randbytes(16 * MiB))
    data[4 * MiB:6 * MiB] = bytes(2 * MiB)  # a zero run for nbdcopy's sparse path
    src.write_bytes(data)
    run("nbdcopy", str(src), nbd_server.uri("copy"))
    run("nbdcopy", nbd_server.uri("copy"), str(dst))
    assert dst.read_bytes() == data
    run("nbdcopy", "--request-size=1048576", "--requests=32", nbd_server.uri("copy"), str(dst))
    assert dst.read_bytes() == data


def test_qemu_img_convert_and_compare(nbd_server, tmp_path):
    src = tmp_path / "src.raw"
    data = bytearray(16 * MiB)
    for off in range(0, 16 * MiB, 3 * MiB):
        data[off:off + 100_000] = random.randbytes(100_000)
    src.write_bytes(data)
    uri = nbd_server.uri("qemu")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))
    assert out.read_bytes() == data
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    data[7] ^= 1
    src.write_bytes(data)
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr


def test_qemu_io_patterns(nbd_server):
    uri = nbd_server.uri("qemuio")
    out = run("qemu-io", "-f", "raw", uri,
              "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M",
              "-c", "aio_write -P 0xcd 2M 64k", "-c", "aio_write -P 0xce 3M 64k", "-c", "aio_flush",
              "-c", "read -P 0xcd 2M 64k", "-c", "read -P 0xce 3M 64k",
              "-c", "discard 0 64k", "-c", "read -P 0 0 64k",
              "-c", "write -z 4M 1M", "-c", "read -P 0 4M 1M",
              "-c", "write -z -u 2M 64k", "-c", "read -P 0 2M 64k",
              "-c", "read -P 0xab 64k 960k")
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out


def test_fio_nbd_engine_verify(nbd_server, tmp_path):
    fio = need("fio")
    job = tmp_path / "job.fio"
    job.write_text(f"""[global]
ioengine=nbd
uri={nbd_server.uri("fio")}
size=8M
bs=4k
iodepth=32
verify=crc32c
verify_fatal=1
do_verify=1

[randwrite]
rw=randwrite
""")
    proc = subprocess.run([fio, "--output-format=json", str(job)], capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    job_result, = result["jobs"]
    assert job_result["error"] == 0
    assert job_result["write"]["io_bytes"] == 8 * MiB
    assert job_result["read"]["io_bytes"] == 8 * MiB  # the verify pass


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_garbage_connections_stay_cheap(nbd_server):
    """A thousand hostile connections neither kill the runner nor grow it much."""
    rng = random.Random(7)
    hello = struct.pack(">I", 1) + struct.pack(">QII", nbd_const.IHAVEOPT, 1, 4) + b"disk"
    huge_write = struct.pack(">IHHQQI", nbd_const.REQUEST_MAGIC, 0, 1, 1, 0, 2**32 - 1)
    before = rss_kib(nbd_server.proc.pid)
    for batch in range(10):
        socks = []
        for i in range(100):
            s = socket.create_connection((nbd_server.host, nbd_server.port), timeout=10)
            kind = i % 3
            payload = (rng.randbytes(rng.randrange(1, 4000)) if kind == 0
                       else hello + (huge_write + rng.randbytes(20000) if kind == 1
                                     else rng.randbytes(3000)))
            try:
                s.sendall(payload)
            except OSError:
                pass
            socks.append(s)
        for s in socks:
            s.close()
    h = handle(nbd_server.uri("disk"))
    try:
        h.pwrite(b"alive", 0)
        assert h.pread(5, 0) == b"alive"
    finally:
        h.shutdown()
    grown = rss_kib(nbd_server.proc.pid) - before
    assert grown < 100 * 1024, f"runner grew by {grown} KiB"


def test_runner_survives_clients(nbd_server):
    """After every client above, the runner still answers."""
    assert nbd_server.proc.poll() is None
    assert run("nbdinfo", "--size", nbd_server.uri("disk")).strip() == str(64 * MiB)
