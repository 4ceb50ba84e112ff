"""Volumes of a real sandbox through real NBD clients: snapshots, clones, allocation maps,
zeroing, replicated volumes under qemu-io and fio verify."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time

import pytest

from tests.conftest import need
from tests.interop.fragment import fragment

MiB = 1024 * 1024


def sh(*cmd, timeout=180, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def connect(uri):
    import nbd

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def test_snapshot_is_frozen_and_read_only(sandbox):
    sandbox.vbp("volume", "create", "s1", "--size", "32M", "--replicas", "3")
    h = connect(sandbox.uri("s1"))
    h.pwrite(b"old!" * 1024, 5 * MiB)
    h.flush()
    h.shutdown()
    sandbox.vbp("volume", "snapshot", "s1", "snap1")
    h = connect(sandbox.uri("s1", 1))
    h.pwrite(b"new!" * 1024, 5 * MiB)
    h.pwrite(b"more" * 1024, 20 * MiB)
    h.flush()
    assert h.pread(4096, 5 * MiB) == b"new!" * 1024
    h.shutdown()

    import nbd

    s = connect(sandbox.uri("s1@snap1", 2))
    assert s.is_read_only()
    assert s.pread(4096, 5 * MiB) == b"old!" * 1024
    assert s.pread(4096, 20 * MiB) == bytes(4096)
    with pytest.raises(nbd.Error) as e:
        s.pwrite(b"x" * 512, 0)
    assert e.value.errno == "EPERM"
    s.shutdown()


def test_clone_reads_parent_and_diverges(sandbox):
    sandbox.vbp("volume", "create", "base", "--size", "16M", "--replicas", "3")
    h = connect(sandbox.uri("base"))
    h.pwrite(b"P" * (2 * MiB), 0)
    h.flush()
    h.shutdown()
    sandbox.vbp("volume", "snapshot", "base", "gold")
    sandbox.vbp("volume", "clone", "base@gold", "vm1")
    sandbox.vbp("volume", "clone", "base@gold", "vm2")
    c1 = connect(sandbox.uri("vm1", 1))
    assert c1.pread(4096, 1 * MiB) == b"P" * 4096  # unwritten clone chunk reads the parent
    c1.pwrite(b"1" * 4096, 1 * MiB)  # copy-up, then the write
    c1.flush()
    assert c1.pread(8192, 1 * MiB - 4096) == b"P" * 4096 + b"1" * 4096
    c1.shutdown()
    c2 = connect(sandbox.uri("vm2", 2))
    assert c2.pread(4096, 1 * MiB) == b"P" * 4096
    c2.shutdown()
    b = connect(sandbox.uri("base@gold"))
    assert b.pread(4096, 1 * MiB) == b"P" * 4096
    b.shutdown()
    # a snapshot of a clone and a clone of that
    sandbox.vbp("volume", "snapshot", "vm1", "s")
    sandbox.vbp("volume", "clone", "vm1@s", "vm1b")
    c3 = connect(sandbox.uri("vm1b"))
    assert c3.pread(8192, 1 * MiB - 4096) == b"P" * 4096 + b"1" * 4096
    c3.shutdown()


def test_allocation_map_shows_holes(sandbox):
    need("nbdinfo")
    sandbox.vbp("volume", "create", "thin", "--size", "64M", "--replicas", "1")
    p = sh("nbdinfo", "--map", "--json", sandbox.uri("thin"))
    extents = json.loads(p.stdout)
    assert all(e["type"] & 1 for e in extents), extents  # all hole
    assert sum(e["length"] for e in extents) == 64 * MiB
    h = connect(sandbox.uri("thin"))
    h.pwrite(os.urandom(64 * 1024), 8 * MiB)
    h.flush()
    h.shutdown()
    # ask every host: the allocation is known where the chunk's replica lives
    data_seen = False
    for host in range(3):
        ext = json.loads(sh("nbdinfo", "--map", "--json", sandbox.uri("thin", host)).stdout)
        data = [e for e in ext if not e["type"] & 1]
        assert sum(e["length"] for e in ext) == 64 * MiB
        if data:
            data_seen = True
            assert any(e["offset"] <= 8 * MiB < e["offset"] + e["length"] for e in data)
    assert data_seen


def test_allocation_map_of_a_fragmented_volume_is_whole(sandbox):
    """Every other page written over 80 MiB: 40960 runs, more than one BLOCK_STATUS
    reply carries (gateway.STATUS_RUNS). nbdinfo asks again from where each reply ends
    and gets the whole map, from the host with the copy and from one without."""
    need("nbdinfo")
    sandbox.vbp("volume", "create", "frag", "--size", "80M", "--replicas", "1")
    fragment(sandbox.uri("frag"), 80 * MiB, seed=5)
    want = [(off + k * 4096, 4096, 3 * k) for off in range(0, 80 * MiB, 8192) for k in (0, 1)]
    for host in range(3):
        ext = json.loads(sh("nbdinfo", "--map", "--json", sandbox.uri("frag", host)).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in ext] == want


def test_the_map_of_scattered_writes_over_a_large_thin_volume_is_exact(sandbox):
    """Pages written here and there over a 64 GiB volume of 16,384 chunks, replicas=1 (a
    third of them on each host): `nbdinfo --map` through every host shows each written
    page as data and the rest as holes. Each 4 GiB block status asks the other hosts
    which chunks they hold, one request each (before, one per chunk held elsewhere:
    the map took about 4 s here, and a minute for 1 TiB)."""
    import random

    need("nbdinfo")
    sandbox.vbp("volume", "create", "sparse", "--size", "64G", "--replicas", "1")
    rng = random.Random(11)
    pages = sorted(rng.sample(range((64 << 30) // 4096), 40))
    h = connect(sandbox.uri("sparse"))
    for page in pages:
        h.pwrite(b"\x5a" * 4096, page * 4096)
    h.flush()
    h.shutdown()
    want, pos = [], 0
    for page in pages:  # (no two of the 40 pages adjoin: each is a run of its own)
        if page * 4096 > pos:
            want.append((pos, page * 4096 - pos, 3))
        want.append((page * 4096, 4096, 0))
        pos = page * 4096 + 4096
    want.append((pos, (64 << 30) - pos, 3))
    for host in range(3):
        ext = json.loads(sh("nbdinfo", "--map", "--json", sandbox.uri("sparse", host)).stdout)
        assert [(e["offset"], e["length"], e["type"]) for e in ext] == want, host


def test_the_map_of_a_large_volume_a_busy_reader_serves_is_whole(tmp_path):
    """`nbdinfo --map` of a large sparse volume through a host without its lease (a
    reader): a long run of block status requests, each costing the event loop its time,
    delays the heartbeat and the record reads that keep a reader serving (serve_until,
    a publication plus two thirds of heartbeat_ttl). The requests that found it passed
    failed with EIO, and the map with them: now and then with the defaults (a 16 TiB
    map), every time with heartbeat_ttl=1.5 (a 1 TiB one). They now have it renewed
    (VolumeGateway._renewed) and are answered."""
    from tests.conftest import SandboxHandle, run_vbp

    sb = SandboxHandle(tmp_path / "sb", 3)
    try:
        sb.info = json.loads(run_vbp("sandbox", "up", "--hosts", 3, "--dir", sb.dir,
                                     "--base-port", sb.base_port, "--capacity", "4G", "--json",
                                     "--set", "heartbeat_ttl=1.5").stdout)
        sb.vbp("volume", "create", "big", "--size", "1T", "--replicas", "3")
        p = sh(need("nbdinfo"), "--map", sb.uri("big", host=1), check=False)
        assert p.returncode == 0, p.stderr + sb.log(1)[-2000:]
        assert p.stdout.split() == ["0", str(1 << 40), "3", "hole,zero"]
    finally:
        sb.down()


def test_trim_and_write_zeroes_read_back_zero(sandbox):
    sandbox.vbp("volume", "create", "z", "--size", "16M", "--replicas", "3")
    h = connect(sandbox.uri("z"))
    h.pwrite(b"\xff" * (4 * MiB), 0)
    h.trim(1 * MiB, 0)
    h.zero(8192, 2 * MiB + 100)  # libnbd: (count, offset); unaligned on both ends
    h.flush()
    assert h.pread(1 * MiB, 0) == bytes(1 * MiB)
    assert h.pread(1 * MiB, 1 * MiB) == b"\xff" * MiB
    assert h.pread(8192 + 200, 2 * MiB) == b"\xff" * 100 + bytes(8192) + b"\xff" * 100
    h.shutdown()


def test_write_zeroes_without_holes_is_provisioned_data(sandbox):
    """NBD_CMD_FLAG_NO_HOLE: the area must be fully provisioned (proto.md), so it is not
    a hole afterwards: its zeros are data, on every replica, while a zeroing without the
    flag leaves holes. A fast zero without holes is refused with ENOTSUP, changing
    nothing. Over several steps (ZEROS_STEP) and unaligned at both ends."""
    import nbd

    sandbox.vbp("volume", "create", "nh", "--size", "24M", "--replicas", "3", "--chunk-size", "1M")
    h = connect(sandbox.uri("nh"))
    h.pwrite(b"\xff" * (16 * MiB), 0)
    h.zero(MiB // 2, 0)  # holes
    h.zero(9 * MiB + 200, MiB - 100, nbd.CMD_FLAG_NO_HOLE)  # 1 MiB - 100 .. 10 MiB + 100
    h.zero(8192, 20 * MiB, nbd.CMD_FLAG_NO_HOLE)  # an unwritten chunk: provisioned too
    with pytest.raises(nbd.Error) as e:
        h.zero(8192, 12 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
    assert e.value.errnum == errno.ENOTSUP
    h.flush()
    assert h.pread(MiB // 2, 0) == bytes(MiB // 2)
    assert h.pread(200, MiB // 2 - 100) == bytes(100) + b"\xff" * 100
    assert h.pread(200, MiB - 200) == b"\xff" * 100 + bytes(100)
    assert h.pread(9 * MiB, MiB) == bytes(9 * MiB)
    assert h.pread(200, 10 * MiB) == bytes(100) + b"\xff" * 100
    assert h.pread(8192, 12 * MiB) == b"\xff" * 8192  # the fast zero changed nothing
    assert h.pread(8192, 20 * MiB) == bytes(8192)
    h.shutdown()
    for host in range(3):  # every host: each holds a copy (3 replicas on 3 hosts)
        c = connect(sandbox.uri("nh", host))
        extents = []
        c.block_status(24 * MiB, 0, lambda ctx, off, e, err: extents.append(e) or 0)
        c.shutdown()
        runs, at = [], 0
        for entries in extents:
            for n, flags in zip(entries[::2], entries[1::2]):
                runs.append((at, n, flags & 1))
                at += n
        hole = [(o, n) for o, n, is_hole in runs if is_hole]
        # the zeroing with holes, and what was never written: holes; the rest data
        assert hole == [(0, MiB // 2), (16 * MiB, 4 * MiB), (20 * MiB + 8192, 4 * MiB - 8192)], runs


def test_nbd_opt_info_tells_without_opening_the_export(sandbox):
    """NBD_OPT_INFO answers a volume's and a snapshot's size and flags as NBD_OPT_GO does,
    and an unknown export's error, without opening the export on the host asked: opening
    publishes it and, for a head whose lease was left behind, takes that lease over."""
    import nbd

    sandbox.vbp("volume", "create", "oi", "--size", "6M", "--replicas", "1")
    h = connect(sandbox.uri("oi", 2))
    h.pwrite(b"\x01" * 4096, 0)
    h.shutdown()
    sandbox.vbp("volume", "snapshot", "oi", "s1")
    sandbox.vbp("volume", "resize", "oi", "8M")

    def info(export: str):
        c = nbd.NBD()
        c.set_opt_mode(True)
        c.connect_uri(sandbox.uri("oi", 1).rsplit("/", 1)[0] + "/")
        c.set_export_name(export)
        try:
            c.opt_info()
            return c.get_size(), c.is_read_only(), c.can_multi_conn()
        except nbd.Error as e:
            return e.errnum
        finally:
            c.opt_abort()

    before = sandbox.log(1)
    assert info("oi") == (8 * MiB, False, True)
    assert info("oi@s1") == (6 * MiB, True, True)
    assert info("nope") == errno.ENOENT
    assert info("oi@nope") == errno.ENOENT
    time.sleep(0.5)
    opened = [line for line in sandbox.log(1)[len(before):].splitlines() if "event=open" in line]
    assert opened == [], opened
    # and NBD_OPT_GO on the same host agrees
    for export, want in (("oi", (8 * MiB, False)), ("oi@s1", (6 * MiB, True))):
        c = connect(sandbox.uri(export, 1))
        assert (c.get_size(), c.is_read_only()) == want
        c.shutdown()


@pytest.mark.parametrize("replicas", [1, 3])
def test_qemu_io_patterns(sandbox, replicas):
    need("qemu-io")
    name = f"qio{replicas}"
    sandbox.vbp("volume", "create", name, "--size", "64M", "--replicas", replicas)
    uri = sandbox.uri(name)
    cmds = [
        "write -P 0xa5 0 1M", "write -P 0x5a 10M 64k", "aio_write -P 0x11 20M 128k", "aio_flush",
        "discard 10M 64k", "write -z 30M 1M", "flush",
        "read -P 0xa5 0 1M", "read -P 0 10M 64k", "read -P 0x11 20M 128k", "read -P 0 30M 1M",
    ]
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    p = sh(*args, uri)
    assert "Pattern verification failed" not in p.stdout + p.stderr
    assert p.stdout.count("read ") >= 4


def test_fio_verify_replicated(sandbox, tmp_path):
    need("fio")
    sandbox.vbp("volume", "create", "fio3", "--size", "64M", "--replicas", "3")
    p = sh("fio", "--name=v", "--ioengine=nbd", f"--uri={sandbox.uri('fio3')}", "--rw=randwrite",
           "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c", "--do_verify=1",
           "--verify_fatal=1", "--output-format=json", f"--directory={tmp_path}",
           "--verify_state_save=0", timeout=300)
    res = json.loads(p.stdout[p.stdout.index("{"):])
    job = res["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB


def test_multi_conn_flush_visible_across_connections(sandbox):
    sandbox.vbp("volume", "create", "mc", "--size", "8M", "--replicas", "3")
    a = connect(sandbox.uri("mc"))
    b = connect(sandbox.uri("mc"))
    assert a.can_multi_conn()
    a.pwrite(b"M" * 4096, 4096)
    a.flush()
    assert b.pread(4096, 4096) == b"M" * 4096
    a.shutdown()
    b.shutdown()
