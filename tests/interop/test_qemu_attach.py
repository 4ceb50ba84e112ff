"""QEMU itself attaches a vbp volume (accel=tcg, no guest is booted): I/O issued by QEMU's
block layer through HMP `qemu-io` reaches the pool, and what QEMU wrote reads back through
another host."""

from __future__ import annotations

import json
import socket
import subprocess
import time

from tests.conftest import need

MiB = 1024 * 1024


class QMP:
    def __init__(self, path: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.file = self.sock.makefile("rwb")
        greeting = self._read()
        assert "QMP" in greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise AssertionError(f"QMP {name}: {reply['error']}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        return self.cmd("human-monitor-command", **{"command-line": line})


def qemu_io(drive_args: list[str], qmp_path: str, lines, node: str = "d0", before=None) -> str:
    """Start qemu-system-x86_64 (accel=tcg, stopped, no guest) with `drive_args`, call
    `before(qmp)`, run each of `lines` through HMP `qemu-io` on `node` (QEMU's block layer;
    a reply means an error), quit, and return what QEMU printed: qemu-io's output."""
    proc = subprocess.Popen(
        [need("qemu-system-x86_64"), "-machine", "accel=tcg", "-nodefaults", "-display", "none",
         "-S", "-m", "64", *drive_args, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        q = QMP(qmp_path)
        if before is not None:
            before(q)
        for line in lines:
            said = q.hmp(f'qemu-io {node} "{line}"')
            assert not said.strip(), f"{line}: {said}"
        q.cmd("quit")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = out.decode(errors="replace")
    assert "verification failed" not in out, out + err.decode(errors="replace")
    return out


def test_qemu_system_attaches_volume(sandbox, tmp_path):
    sandbox.vbp("volume", "create", "vmdisk", "--size", "64M", "--replicas", "3")

    def sized(q):
        d0 = [b for b in q.cmd("query-block") if b["device"] == "d0"][0]
        assert d0["inserted"]["image"]["virtual-size"] == 64 * MiB

    out = qemu_io(["-drive", f"file={sandbox.uri('vmdisk')},format=raw,if=none,id=d0,cache=none",
                   "-device", "virtio-blk-pci,drive=d0"], str(tmp_path / "qmp.sock"),
                  ("write -P 0x42 1M 256k", "write -z 2M 64k", "flush", "read -P 0x42 1M 256k",
                   "read -P 0 2M 64k"), before=sized)
    assert "wrote 262144/262144 bytes at offset 1048576" in out, out
    assert "wrote 65536/65536 bytes at offset 2097152" in out, out
    assert "read 262144/262144 bytes at offset 1048576" in out, out
    assert "read 65536/65536 bytes at offset 2097152" in out, out
    import nbd

    h = nbd.NBD()
    h.connect_uri(sandbox.uri("vmdisk", 2))
    assert h.pread(256 * 1024, 1 * MiB) == b"\x42" * (256 * 1024)
    assert h.pread(64 * 1024, 2 * MiB) == bytes(64 * 1024)
    h.shutdown()
