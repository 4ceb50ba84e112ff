"""A pool of real blockd processes on a real etcd registry, end to end, and the registry
failing under it: etcd frozen (SIGSTOP, the way a hung registry looks) and killed.

What must hold while etcd is away: the daemons stay up and say why in their logs; reads of
existing data keep working; a write is acknowledged only while the gateway's lease is
provably its own (after the lease runs out unrenewed, writes fail with EIO); when etcd is
back everything resumes on the same NBD connection, and every replica holds every
acknowledged write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import SandboxHandle, need, run_vbp
from tests.etcd import EtcdProcess
from tests.faults.test_replication_faults import (
    BLOCK, MiB, SETTINGS, Writer, compare_replicas, connect, payload, wait_no_stale,
)


class EtcdSandbox(SandboxHandle):
    def __init__(self, directory, hosts, etcd: EtcdProcess):
        super().__init__(directory, hosts)
        self.etcd = etcd

    @property
    def registry(self) -> str:
        return self.etcd.url

    def up(self):
        p = run_vbp("sandbox", "up", "--hosts", self.n, "--dir", self.dir, "--base-port", self.base_port,
                    "--capacity", "2G", "--registry", self.registry, "--json", *SETTINGS, check=False)
        if p.returncode != 0:
            raise AssertionError(f"sandbox up failed:\n{p.stderr}")
        self.info = json.loads(p.stdout)
        return self.info


def wait_for(what: str, cond, timeout: float = 60, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(every)


def host_states(sb) -> dict[str, str]:
    p = sb.vbp("--json", "host", "list", check=False)
    if p.returncode != 0:
        return {}
    return {h["id"]: h["state"] for h in json.loads(p.stdout)["hosts"]}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def try_write(w: Writer, h, off: int) -> bool:
    """One write; True if acknowledged (then remembered), False on EIO."""
    import nbd

    w.seq += 1
    try:
        h.pwrite(payload(w.seq, off), off)
    except nbd.Error as e:
        assert e.errno == "EIO", f"a write failed with {e.errno}, not EIO: {e}"
        return False
    w.acked[off] = w.seq
    return True


def cut_connections(pid: int, port: int) -> int:
    """A network blip: destroy every established TCP connection that process `pid` has
    to 127.0.0.1:`port` (both ends see it reset, neither process stops). How many it cut."""
    ss = need("ss")
    target = ["dst", "127.0.0.1", "dport", "=", f":{port}"]
    listed = subprocess.run([ss, "-t", "-n", "-p", "-H", "state", "established", *target],
                            capture_output=True, text=True, timeout=10, check=True).stdout
    sports = [line.split()[2].rsplit(":", 1)[1] for line in listed.splitlines()
              if f"pid={pid}," in line]
    cut = 0
    for sport in sports:
        p = subprocess.run([ss, "-K", "-t", "-n", "-H", "state", "established", *target,
                            "sport", "=", f":{sport}"],
                           capture_output=True, text=True, timeout=10, check=True)
        cut += sum(1 for line in p.stdout.splitlines() if line.strip())
    return cut


def write_through(w: Writer, h, n: int, timeout: float = 60) -> None:
    """n acknowledged writes; right after a registry outage a write may still fail (EIO):
    when etcd resumes it expires the liveness keys whose TTL passed while it was frozen, so
    hosts look down until their next heartbeat. Such a write is not acknowledged (and its
    failure is recorded); the writer writes that offset again until it is. (A write that
    failed leaves its blocks undefined, old bytes or new: the copies that took it may be
    the ones the others resync from. Moving on to another offset left that one expected
    to hold the older acknowledged block, and a run where the failed write had landed
    failed the check.)"""
    deadline = time.monotonic() + timeout
    for _ in range(n):
        off = w.rng.randrange(w.region // BLOCK) * BLOCK
        while not try_write(w, h, off):
            assert time.monotonic() < deadline, f"writes still fail {timeout}s after the outage"
            time.sleep(0.2)
    h.flush()


@pytest.fixture
def etcd_sandbox(tmp_path):
    etcd = EtcdProcess(tmp_path / "etcd").start()
    sb = EtcdSandbox(tmp_path / "sb", 3, etcd)
    try:
        try:
            sb.up()
        except AssertionError:
            sb.down()
            raise
        yield sb
    finally:
        sb.down()
        etcd.stop()


def test_pool_on_etcd_survives_host_loss_and_registry_outages(etcd_sandbox):
    import nbd

    sb = etcd_sandbox
    assert sb.info["registry"] == sb.etcd.url
    sb.vbp("volume", "create", "e3", "--size", "64M", "--replicas", "3", "--min-size", "2",
           "--chunk-size", "1M")
    assert json.loads(sb.vbp("--json", "volume", "show", "e3").stdout)["replicas"] == 3
    w = Writer(16 * MiB, seed=11)
    h = connect(sb.uri("e3", 0))
    w.write(h, 100)
    w.verify(h)

    # --- a host dies: the registry's TTL says so --------------------------------------------
    wait_for("every host up", lambda: set(host_states(sb).values()) == {"up"})
    os.kill(sb.pids()[2], signal.SIGKILL)
    wait_for("host3 reported down", lambda: host_states(sb).get("host3") == "down", timeout=30)
    w.write(h, 50)  # 2 of 3 replicas: still acknowledged
    sb.up()
    wait_for("host3 back up", lambda: host_states(sb).get("host3") == "up", timeout=30)
    wait_no_stale(sb)

    # --- etcd hangs ---------------------------------------------------------------------------
    sb.etcd.pause()
    try:
        t_paused = time.monotonic()
        w.verify(h)  # reads of existing data need no registry
        # writes go on while the lease is provably ours, then fail: never acknowledged late
        off = 0
        failed_at = None
        while failed_at is None and time.monotonic() - t_paused < 60:
            off = (off + BLOCK) % w.region
            if not try_write(w, h, off):
                failed_at = off
        assert failed_at is not None, "writes were still acknowledged 60 s after the registry froze"
        # a blip cuts the gateway's connections to both replicas since its last writes: the
        # same processes answer the flush over new ones (their boot ids say so), so they
        # are not doubted as restarted, which would need the registry to record stale copies
        gateway = sb.pids()[0]
        for peer in sb.info["hosts"][1:]:
            cut = cut_connections(gateway, peer["peer_port"])
            assert cut >= 1, f"the gateway had no connection to {peer['id']} to cut (ss -K)"
        time.sleep(0.5)
        h.flush()  # what was acknowledged is made durable: flushing needs no lease
        w.verify(h)
        for i in range(3):
            wait_for(f"host{i + 1} logs the registry outage",
                     lambda: "registry etcd://" in sb.log(i) and "unreachable" in sb.log(i), timeout=30)
        wait_for("the gateway logs that its lease ran out", lambda: "event=lease_expired" in sb.log(0),
                 timeout=30)
        for pid in sb.pids():
            assert alive(pid)
        # a new client while the registry is away: refused with an error, never a hang
        with pytest.raises(nbd.Error):
            connect(sb.uri("e3", 1))
    finally:
        sb.etcd.resume()

    # --- etcd is back: the same connection writes again ----------------------------------------
    wait_for("a write is acknowledged again", lambda: try_write(w, h, failed_at), timeout=60, every=0.5)
    assert "event=lease_renewed_after_expiry" in sb.log(0)
    write_through(w, h, 50)
    w.verify(h)

    # --- etcd is killed and restarted -----------------------------------------------------------
    sb.etcd.kill()
    w.verify(h)
    for pid in sb.pids():
        assert alive(pid)
    time.sleep(2)
    sb.etcd.start()
    wait_for("a write is acknowledged after the restart", lambda: try_write(w, h, BLOCK), timeout=60, every=0.5)
    write_through(w, h, 50)
    w.verify(h)
    h.shutdown()
    wait_for("every host up after the outages", lambda: set(host_states(sb).values()) == {"up"}, timeout=30)
    for pid in sb.pids():
        assert alive(pid)
    wait_no_stale(sb)
    compare_replicas(sb, "e3", w)


def test_a_second_connection_joins_a_served_volume_while_etcd_is_down(etcd_sandbox):
    """A volume is served by host1, which holds its lease; etcd goes away. The gateway
    goes on serving the connection it has (reads need no registry; writes while the
    lease is provably its own). A second connection to the same export on the same
    host (a multi-conn client such as nbdcopy, or a client reconnecting after a network
    blip) must join that gateway the same way: it was refused, because the join first
    read the volume's record (to notice a volume deleted and created again under its
    name) and the registry could not be reached."""
    import nbd

    sb = etcd_sandbox
    sb.vbp("volume", "create", "e1", "--size", "8M", "--replicas", "3", "--min-size", "2",
           "--chunk-size", "1M")
    first = connect(sb.uri("e1", 0))
    first.pwrite(payload(1, 0), 0)  # host1 takes the lease
    first.flush()
    sb.etcd.kill()
    assert first.pread(BLOCK, 0) == payload(1, 0)  # the connection it has: served
    try:
        second = connect(sb.uri("e1", 0))
    except nbd.Error as e:
        raise AssertionError(f"a second connection to e1 was refused: {e}") from None
    assert second.pread(BLOCK, 0) == payload(1, 0)
    second.shutdown()
    first.shutdown()
