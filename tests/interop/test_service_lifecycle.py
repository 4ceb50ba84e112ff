"""blockd as a service: disk full, thin volumes, graceful shutdown and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, SandboxHandle, free_port_range, run_vbp

MiB = 1024 * 1024


def connect(uri):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def small_pool(tmp_path, n=1, capacity="8M", settings=()) -> SandboxHandle:
    sb = SandboxHandle(tmp_path / "sb", n)
    sb.capacity = capacity  # (sb.up restarts hosts with the same)
    sets = [a for kv in settings for a in ("--set", kv)]
    p = run_vbp("sandbox", "up", "--hosts", n, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", capacity, "--json", "--set", "gc_interval=0.5", *sets,
                check=False)
    if p.returncode:
        sb.down()
        raise AssertionError(p.stderr)
    sb.info = json.loads(p.stdout)
    return sb


def test_disk_full_is_enospc_data_stays_and_freed_space_is_reused(tmp_path):
    import nbd

    sb = small_pool(tmp_path)
    try:
        sb.vbp("volume", "create", "keep", "--size", "4M", "--replicas", "1", "--chunk-size", "1M")
        sb.vbp("volume", "create", "big", "--size", "64M", "--replicas", "1", "--chunk-size", "1M")
        k = connect(sb.uri("keep"))
        k.pwrite(b"K" * (4 * MiB), 0)
        k.flush()
        h = connect(sb.uri("big"))
        written = 0
        with pytest.raises(nbd.Error) as e:
            for i in range(64):
                h.pwrite(b"B" * 4096, i * MiB)  # one new chunk each
                written += 1
        assert e.value.errno == "ENOSPC"
        assert written == 4  # 8M of capacity: 4 chunks of keep + 4 of big
        assert k.pread(4 * MiB, 0) == b"K" * (4 * MiB)  # existing data readable
        assert h.pread(4096, 3 * MiB) == b"B" * 4096
        h.pwrite(b"b" * 4096, 2 * MiB + 4096)  # writes inside allocated chunks still work
        k.shutdown()
        sb.vbp("volume", "delete", "keep")
        deadline = time.monotonic() + 20
        while True:  # the space is freed in the background, then reused
            try:
                h.pwrite(b"B" * 4096, 10 * MiB)
                break
            except nbd.Error as e2:
                assert e2.errno == "ENOSPC"
                assert time.monotonic() < deadline, "freed space was not reused"
                time.sleep(0.5)
        h.flush()
        assert h.pread(4096, 10 * MiB) == b"B" * 4096
        h.shutdown()
        assert "Traceback" not in sb.log(0)
    finally:
        sb.down()


def test_thin_terabyte_volume_costs_nothing(tmp_path):
    sb = small_pool(tmp_path, capacity="64M")
    try:
        sb.vbp("volume", "create", "huge", "--size", "1T", "--replicas", "1")
        h = connect(sb.uri("huge"))
        assert h.get_size() == 1 << 40
        h.pwrite(b"x" * 4096, (1 << 40) - 4096)
        h.flush()
        assert h.pread(4096, 512 << 30) == bytes(4096)
        h.shutdown()
        # stats ride on the heartbeat: once the host published stats stamped after the
        # write, they count its chunk (a fixed 2.5 s before: a heartbeat period is 2 s)
        t, deadline = time.time(), time.monotonic() + 30
        from vbp.registry import open_registry

        with open_registry(sb.registry) as reg:
            while (reg.host_stats().get("host1") or {}).get("time", 0) <= t:
                assert time.monotonic() < deadline, "host1 published no stats for 30 s"
                time.sleep(0.1)
        st = json.loads(sb.vbp("pool", "status", "--json").stdout)
        assert st["used"] <= 4 * MiB  # one chunk
        data = sb.dir / "host1" / "data"
        on_disk = sum(f.stat().st_blocks * 512 for f in data.rglob("*") if f.is_file())
        assert on_disk < 64 * MiB
    finally:
        sb.down()


def test_sigterm_drains_releases_lease_and_restart_serves_again(tmp_path):
    sb = small_pool(tmp_path, n=3, capacity="1G")
    try:
        sb.vbp("volume", "create", "svc", "--size", "16M", "--replicas", "3")
        h = connect(sb.uri("svc", 0))
        for i in range(64):
            h.pwrite(bytes([i]) * 4096, i * 4096)  # acknowledged, never flushed by the client
        pid = sb.info["hosts"][0]["pid"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "blockd did not stop on SIGTERM"
            time.sleep(0.1)
        log = sb.log(0)
        assert "event=stopped" in log and "Traceback" not in log
        # the lease was handed back: another host takes over at once, not after expiry
        from vbp.registry import open_registry

        lease = open_registry(sb.registry).get_lease("svc")
        assert lease is None or not lease.holder
        h2 = connect(sb.uri("svc", 1))
        t0 = time.monotonic()
        h2.pwrite(b"n" * 4096, 0)
        assert time.monotonic() - t0 < 5
        for i in range(1, 64):
            assert h2.pread(4096, i * 4096) == bytes([i]) * 4096
        h2.shutdown()
        sb.up()  # restart host1: clients that reconnect there are served again
        h3 = connect(sb.uri("svc", 0))
        assert h3.pread(4096, 0) == b"n" * 4096
        h3.shutdown()
    finally:
        sb.down()


def _wait_stopped(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "blockd did not stop on SIGTERM"
        time.sleep(0.05)


def test_sigterm_under_writes_leaves_the_other_copies_current(tmp_path):
    """A gateway stopped by SIGTERM while its client keeps 32 writes in flight: the
    writes under way end on every copy before the peer links close. The stop used to
    cut them off there (the NBD server kept taking requests until the nursery was
    cancelled), which recorded the other copies of their chunk stale and left the
    stopping host the only current one: the chunk's reads failed (EIO) through every
    other host until it came back."""
    import nbd

    sb = small_pool(tmp_path, n=3, capacity="1G")
    try:
        sb.vbp("volume", "create", "busy", "--size", "16M", "--replicas", "3")
        h = connect(sb.uri("busy", 0))
        pid = sb.info["hosts"][0]["pid"]
        acked: dict[int, int] = {}  # block -> its last acknowledged write (numbered)
        issued, keep = 0, []

        def done(block, i, err):
            if not err.value:
                acked[block] = max(acked.get(block, -1), i)
            return 1

        t0, stopped = time.monotonic(), None
        try:
            while stopped is None or time.monotonic() - stopped < 20:
                while h.aio_in_flight() < 32:
                    block = issued % 256
                    buf = nbd.Buffer.from_bytearray(bytearray([issued % 250 + 1]) * 65536)
                    keep.append(buf)
                    h.aio_pwrite(buf, block * 65536,
                                 completion=lambda err, b=block, i=issued: done(b, i, err))
                    issued += 1
                h.poll(1)
                if stopped is None and time.monotonic() - t0 > 1.0:
                    os.kill(pid, signal.SIGTERM)
                    stopped = time.monotonic()
        except nbd.Error:
            pass  # the connection ends: what was not answered was not acknowledged
        assert stopped is not None and issued > 64
        _wait_stopped(pid, 15)
        assert "event=stopped" in sb.log(0) and "Traceback" not in sb.log(0)
        st = json.loads(sb.vbp("pool", "status", "--json").stdout)
        assert st["degraded_chunks"] == 0, st
        h2 = connect(sb.uri("busy", 1))  # host1 is down: every chunk reads elsewhere
        for block in range(256):
            got = h2.pread(65536, block * 65536)
            if block in acked:  # its last acknowledged write, or a later one sent
                later = {i % 250 + 1 for i in range(acked[block], issued, 256)}
                assert got[0] in later and got == bytes([got[0]]) * 65536, block
        h2.shutdown()
    finally:
        sb.down()


def test_sigterm_answers_the_requests_the_gateway_took(tmp_path):
    """A graceful stop answers what its NBD clients sent before it: 32 writes wait on a
    peer that stopped answering (SIGSTOP: they complete after the peer timeout, that copy
    recorded stale) when the gateway's host gets SIGTERM. Every one is answered, and
    succeeds; the stop used to close the connection with them unanswered. With a
    peer_timeout of 9 s: the writes, then the close flush the stopped peer never answers,
    take 18 s, past the stop's fixed 10 s of before (which cut the writes off unanswered
    at 8 s): the stop's time follows peer_timeout (Blockd.stop_budget)."""
    import nbd

    sb = small_pool(tmp_path, n=3, capacity="1G", settings=["peer_timeout=9"])
    peer = sb.info["hosts"][1]["pid"]
    try:
        sb.vbp("volume", "create", "slow", "--size", "16M", "--replicas", "3")
        h = connect(sb.uri("slow", 0))
        h.pwrite(b"\0" * 4096, 0)  # the lease taken, the connections to the peers made
        os.kill(peer, signal.SIGSTOP)
        results: dict[int, int] = {}

        def done(i, err):
            results[i] = err.value
            return 1

        bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536) for i in range(32)]
        for i, buf in enumerate(bufs):
            h.aio_pwrite(buf, i * 65536, completion=lambda err, i=i: done(i, err))
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # every request sent, all waiting on the peer
            h.poll(100)
        assert h.aio_in_flight() == 32 and not results
        pid = sb.info["hosts"][0]["pid"]
        os.kill(pid, signal.SIGTERM)
        try:
            while h.aio_in_flight():
                h.poll(1000)
        except nbd.Error:
            pass  # the connection ends after the answers
        _wait_stopped(pid, 30)
        assert results == {i: 0 for i in range(32)}, results
        assert "event=stopped" in sb.log(0) and "Traceback" not in sb.log(0)
        assert "close_flush_failed" not in sb.log(0)  # (h1 and h3 durable: h2 stale)
    finally:
        os.kill(peer, signal.SIGCONT)
        sb.down()


def _blockd_pids_of(directory) -> list[int]:
    """The blockd processes whose command line names `directory` (a sandbox's hosts)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"blockd.main" in cmd and str(directory).encode() in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def _kill_all(p: subprocess.Popen, directory) -> None:
    """SIGKILL to `p` and to the blockd processes of the sandbox in `directory`."""
    if p.poll() is None:
        p.kill()
    for pid in _blockd_pids_of(directory):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("started", [1, 3])
def test_sandbox_run_interrupted_while_starting_leaves_no_host_running(tmp_path, sig, started):
    """`make run` (vbp sandbox run) stopped by Ctrl-C or SIGTERM while its hosts start:
    the hosts already started stop too (they run in their own sessions, so the signal
    does not reach them by itself)."""
    d = tmp_path / "sb"
    env = {k: v for k, v in os.environ.items() if k != "VBP_REGISTRY"}
    p = subprocess.Popen([sys.executable, "-m", "control.cli", "sandbox", "run", "--hosts", "3",
                          "--dir", str(d), "--base-port", str(free_port_range(6))],
                         cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(_blockd_pids_of(d)) < started:  # hosts on their way up: startup under way
            assert p.poll() is None and time.monotonic() < deadline, p.stdout.read()
            time.sleep(0.01)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=60)
        assert "Serving" not in out, "the signal came too late to test a start"
        assert "Traceback" not in out, out
        deadline = time.monotonic() + 5
        while _blockd_pids_of(d) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _blockd_pids_of(d) == [], out
    finally:
        _kill_all(p, d)


# A sandbox `up` whose hosts take a while between fork and exec (here 1 s, in the child
# before it execs blockd), then a stop: the race a loaded machine gives a signal that lands
# while subprocess.Popen waits for the exec.
_SLOW_EXEC = """
import subprocess, sys, time
from blockd.sandbox import Sandbox

real = subprocess.Popen


class SlowExec(real):
    def __init__(self, *args, **kwargs):
        kwargs["preexec_fn"] = lambda: time.sleep(1.0)
        super().__init__(*args, **kwargs)


subprocess.Popen = SlowExec
sb = Sandbox(sys.argv[1])
try:
    print("starting", flush=True)
    sb.up(1, int(sys.argv[2]))
except KeyboardInterrupt:
    print("interrupted", flush=True)
finally:
    print("stopped", sb.down(), flush=True)
"""


def test_a_stop_while_a_host_is_between_fork_and_exec_leaves_it_not_running(tmp_path):
    """Ctrl-C landing while `up` waits for a new host's exec (inside subprocess.Popen,
    which then forgets the child; the child is not blockd yet, so no scan of /proc finds
    it): the sandbox held the signal back until the host was blockd, and `down` stops it.
    (CI's run of the whole suite left a host of `vbp sandbox run` running so.)"""
    d = tmp_path / "sb"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_EXEC, str(d), str(free_port_range(2))],
                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        assert p.stdout.readline() == "starting\n"
        deadline = time.monotonic() + 20
        children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
        while not children.read_text().split():  # forked, in the child's 1 s before exec
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        assert _blockd_pids_of(d) == []
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        assert "interrupted" in out and "Traceback" not in out, out
        time.sleep(1.5)  # past the child's exec, had it been left behind
        assert _blockd_pids_of(d) == [], out
    finally:
        _kill_all(p, d)


def test_sandbox_up_again_keeps_each_hosts_capacity(tmp_path):
    """Placement weighs the capacity recorded with the data set: a host back with another
    capacity starts a change of data set that moves chunks. `vbp sandbox up` without
    --capacity started every host with the default again, so restarting a sandbox made
    with --capacity 2G moved chunks; each host now keeps the capacity it had."""
    d = tmp_path / "sb"
    base = free_port_range(2)
    env = {"VBP_REGISTRY": f"lmdb://{d / 'registry'}"}
    try:
        run_vbp("sandbox", "up", "--hosts", 1, "--dir", d, "--base-port", base, "--capacity", "2G")
        gen = json.loads(run_vbp("pool", "status", "--json", env=env).stdout)["data_set"]["generation"]
        run_vbp("sandbox", "down", "--dir", d)
        run_vbp("sandbox", "up", "--hosts", 1, "--dir", d)
        st = json.loads(run_vbp("pool", "status", "--json", env=env).stdout)
        assert [h["capacity"] for h in st["hosts"]] == [2 * 1024**3]
        assert st["data_set"]["generation"] == gen and not st["data_set"]["placement"]
    finally:
        run_vbp("sandbox", "down", "--dir", d, check=False)
