"""QEMU live-migrates a VM between two hosts serving one volume: the source QEMU attached
through host A's NBD port, the destination (`-incoming`) through host B's, as a
hypervisor pair would. No guest is booted (accel=tcg, `-S`); I/O is issued by QEMU's block
layer through HMP `qemu-io`, before, during and after the migration, and every pattern
acknowledged anywhere is read back through the destination, then through the way back."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import nbd

from tests.conftest import need
from tests.interop.test_qemu_attach import QMP

MiB = 1024 * 1024
KiB = 1024
RAM = 32 * MiB


class Vm:
    """A qemu-system-x86_64 (stopped, no guest) with drive d0 on `uri`; `incoming`: the
    migration address it waits on. What qemu-io prints goes to `out`."""

    def __init__(self, uri: str, tmp: Path, tag: str, incoming: str | None = None):
        self.out = tmp / f"{tag}.out"
        qmp = str(tmp / f"{tag}.qmp")
        ram = tmp / "ram"  # RAM that is not zero, so that the migration has bytes to send
        if not ram.exists():
            ram.write_bytes(os.urandom(RAM))
        args = [need("qemu-system-x86_64"), "-machine", "accel=tcg", "-nodefaults",
                "-display", "none", "-S", "-m", str(RAM // MiB),
                "-object", f"memory-backend-file,id=ram0,size={RAM},mem-path={ram},share=off",
                "-machine", "memory-backend=ram0",
                "-drive", f"file={uri},format=raw,if=none,id=d0,cache=none",
                "-device", "virtio-blk-pci,drive=d0",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming:
            args += ["-incoming", incoming]
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        self.qmp = QMP(qmp)

    def io(self, line: str) -> str:
        """Run one qemu-io command on d0; '' if it succeeded, else what it said."""
        before = self.printed()
        said = self.qmp.hmp(f'qemu-io d0 "{line}"').strip()
        printed = self.printed()[len(before):]
        if "verification failed" in printed or "error" in printed.lower():
            return said + printed
        return said

    def printed(self) -> str:
        return self.out.read_text(errors="replace")

    def status(self) -> dict:
        return self.qmp.cmd("query-migrate")

    def quit(self) -> None:
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except (OSError, EOFError):
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def migrate(src: Vm, dst: Vm, addr: str, during=None, bandwidth: int | None = None):
    """Migrate `src` to `dst` (listening on `addr`), calling `during()` while RAM is
    copied; the seconds it took. The source pauses before the switchover, where it
    flushes and inactivates its drive (a qemu-io write after that would abort QEMU):
    `during` runs only before it."""
    src.qmp.cmd("migrate-set-capabilities", capabilities=[
        {"capability": "pause-before-switchover", "state": True}])
    if bandwidth:
        src.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
    t0 = time.monotonic()
    src.qmp.cmd("migrate", uri=addr)
    continued = False
    while True:
        st = src.status()
        if st.get("status") == "completed":
            return time.monotonic() - t0
        if st.get("status") == "pre-switchover":
            # once: the status may still say so a moment after, when a second continue
            # fails ("Migration not in expected state: device")
            if not continued:
                src.qmp.cmd("migrate-continue", state="pre-switchover")
                continued = True
            time.sleep(0.02)
        else:
            assert st.get("status") in ("setup", "active", "device"), st
            if during is not None and st.get("status") == "active":
                during()
            else:
                time.sleep(0.02)
        assert time.monotonic() - t0 < 40, f"migration did not complete: {st}"


def test_live_migration_between_hosts_and_back(sandbox, tmp_path):
    sandbox.vbp("volume", "create", "livemig", "--size", "64M", "--replicas", "3")
    written: dict[int, int] = {}  # offset -> pattern byte of a 64 KiB write acknowledged

    def check_through(h: nbd.NBD) -> None:
        for off, pat in written.items():
            assert h.pread(64 * KiB, off) == bytes([pat]) * (64 * KiB), (hex(off), hex(pat))

    timings = {}
    src = Vm(sandbox.uri("livemig", 0), tmp_path, "a1")
    dst = back = None
    reader = nbd.NBD()
    try:
        for i, off in enumerate((0, 4 * MiB + 12 * KiB, 9 * MiB)):  # three chunks
            assert src.io(f"write -P {0x11 + i} {off} 64k") == ""
            written[off] = 0x11 + i
        assert src.io("flush") == ""

        # the destination opens the volume through host B while the source still writes
        mig = f"unix:{tmp_path / 'mig-ab.sock'}"
        dst = Vm(sandbox.uri("livemig", 1), tmp_path, "b1", incoming=mig)
        assert src.io(f"write -P 0x21 {12 * MiB} 64k") == "", "the destination's open fenced the source"
        written[12 * MiB] = 0x21
        reader.connect_uri(sandbox.uri("livemig", 1))  # host B, as the destination reads
        check_through(reader)

        # writes while RAM is copied (slowly): each acknowledged one must reach host B
        n = iter(range(1000))

        def during():
            k = next(n)
            off = 16 * MiB + k * 64 * KiB
            pat = 0x30 + k % 0x40
            said = src.io(f"write -P {pat} {off} 64k")
            if said == "":
                written[off] = pat
                assert reader.pread(64 * KiB, off) == bytes([pat]) * (64 * KiB)
            time.sleep(0.05)

        timings["a_to_b"] = migrate(src, dst, mig, during, bandwidth=12 * MiB)
        timings["writes_during"] = next(n)
        assert timings["writes_during"] > 3, "the migration was too fast to write during it"
        assert "error" not in src.printed().lower(), src.printed()
        check_through(reader)

        # the destination reads every acknowledged pattern, then writes, while the source
        # QEMU is still there (post-migrate, as a hypervisor keeps it until confirmed)
        for off, pat in written.items():
            assert dst.io(f"read -P {pat} {off} 64k") == "", (hex(off), dst.printed())
        t0 = time.monotonic()
        assert dst.io(f"write -P 0x77 {20 * MiB} 64k") == "", dst.printed()
        timings["b_first_write"] = time.monotonic() - t0
        written[20 * MiB] = 0x77
        assert dst.io("flush") == ""
        src.quit()
        assert dst.io(f"write -P 0x78 {20 * MiB + 64 * KiB} 64k") == "", dst.printed()
        written[20 * MiB + 64 * KiB] = 0x78
        check_through(reader)
        reader.shutdown()
        reader = None

        # and back: B -> A, into a new QEMU on host A
        mig = f"unix:{tmp_path / 'mig-ba.sock'}"
        back = Vm(sandbox.uri("livemig", 0), tmp_path, "a2", incoming=mig)
        assert dst.io(f"write -P 0x79 {24 * MiB} 64k") == ""
        written[24 * MiB] = 0x79
        timings["b_to_a"] = migrate(dst, back, mig)
        for off, pat in written.items():
            assert back.io(f"read -P {pat} {off} 64k") == "", (hex(off), back.printed())
        t0 = time.monotonic()
        assert back.io(f"write -P 0x7a {28 * MiB} 64k") == "", back.printed()
        timings["a_first_write"] = time.monotonic() - t0
        written[28 * MiB] = 0x7a
        dst.quit()
        back.quit()
        print("timings", {k: round(v, 2) for k, v in timings.items()})
    finally:
        if reader is not None:
            reader.shutdown()
        for vm in (src, dst, back):
            if vm is not None:
                vm.quit()

    h = nbd.NBD()
    h.connect_uri(sandbox.uri("livemig", 2))
    check_through(h)
    h.shutdown()
    # every gateway let its lease go: a write through host C takes it at once
    log = "\n".join(sandbox.log(i) for i in range(3))
    assert "lease_expired" not in log and "event=fenced" not in log, log[-3000:]


def test_the_lease_passes_from_a_holder_that_owes_only_a_flush(sandbox):
    """A holder whose client wrote and did not flush hands the lease over after a flush
    of its own (as RBD's exclusive lock flushes before it passes): host B's write goes
    through within a second or two, not a lease period later, and A's write is durable
    and read back through B. Its client then writes again: the lease comes back."""
    sandbox.vbp("volume", "create", "handover", "--size", "16M", "--replicas", "3")
    a, b = nbd.NBD(), nbd.NBD()
    a.connect_uri(sandbox.uri("handover", 0))
    b.connect_uri(sandbox.uri("handover", 1))
    try:
        a.pwrite(b"\xaa" * 4096, 0)  # (not flushed)
        t0 = time.monotonic()
        b.pwrite(b"\xbb" * 4096, 4096)
        assert time.monotonic() - t0 < 5  # (lease_ttl + 2 when waited out)
        log = sandbox.log(0)
        assert "event=lease_kept" in log and "reason=writes not flushed" in log
        assert "event=lease_handed_over" in log
        b.flush()
        assert b.pread(8192, 0) == b"\xaa" * 4096 + b"\xbb" * 4096
        a.pwrite(b"\xcc" * 4096, 8192)  # and back to A
        a.flush()
        assert b.pread(12288, 0) == b"\xaa" * 4096 + b"\xbb" * 4096 + b"\xcc" * 4096
    finally:
        a.shutdown()
        b.shutdown()
