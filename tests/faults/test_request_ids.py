"""Request ids across hosts: real blockd processes, a replica killed, one write followed
through the logs of the gateway and of a surviving replica (vbp.reqid)."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.conftest import SandboxHandle, run_vbp

pytestmark = pytest.mark.timeout(120)

SETTINGS = ["--set", "heartbeat_ttl=3", "--set", "lease_ttl=4", "--set", "peer_timeout=3",
            "--set", "log_level=debug"]
BLOCK = 4096


def start(tmp_path, n=3) -> SandboxHandle:
    sb = SandboxHandle(tmp_path / "sb", n)
    p = run_vbp("sandbox", "up", "--hosts", n, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", "1G", "--json", *SETTINGS, check=False)
    if p.returncode != 0:
        sb.down()  # stop whatever did start
        raise AssertionError(f"sandbox up failed:\n{p.stderr}")
    sb.info = json.loads(p.stdout)
    return sb


def lines_with(log: str, rid: str) -> list[str]:
    return [line for line in log.splitlines() if f" rid={rid} " in line]


def wait_for_lines(sb: SandboxHandle, host: int, rid: str, timeout: float = 10) -> list[str]:
    """The lines of a host's log with `rid` (a log line may trail the reply by a moment)."""
    deadline = time.monotonic() + timeout
    while not (found := lines_with(sb.log(host), rid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def test_one_write_is_followed_by_its_id_from_the_gateway_to_the_replicas(tmp_path):
    import nbd

    sb = start(tmp_path)
    try:
        sb.vbp("volume", "create", "r3", "--size", "8M", "--replicas", "3", "--min-size", "2",
               "--chunk-size", "1M")
        h = nbd.NBD()
        h.connect_uri(sb.uri("r3", 0))  # gateway: host1
        h.pwrite(b"a" * BLOCK, 0)  # takes the lease, all three replicas up
        h.flush()
        os.kill(sb.info["hosts"][2]["pid"], signal.SIGKILL)  # host3 holds every chunk
        h.pwrite(b"b" * BLOCK, 0)  # 2 of 3 replicas >= min_size: acknowledged
        assert h.pread(BLOCK, 0) == b"b" * BLOCK
        h.shutdown()

        gateway = sb.log(0)
        failed = [line for line in gateway.splitlines()
                  if "event=replica_failed" in line and "host3:" in line]
        assert failed, f"no replica_failed line in the gateway's log:\n{gateway[-3000:]}"
        rid = re.search(r" rid=(\S+) ", failed[0]).group(1)
        assert rid.startswith("host1-"), rid  # the gateway that took the request named it

        # the gateway: the failure, the stale mark and the replication of that one write
        mine = lines_with(gateway, rid)
        assert any("event=marked_stale" in x and "hosts=host3" in x for x in mine), mine
        assert any("event=replicate" in x and "hosts=" in x for x in mine), mine
        # the surviving replica applied the same write under the same id
        theirs = wait_for_lines(sb, 1, rid)
        assert any("op=write event=applied gateway=host1" in x for x in theirs), theirs
        assert all(" host=host2 " in x for x in theirs)
        # and the id is this request's only: the first write had another one
        first = [x for x in gateway.splitlines() if "event=replicate" in x][0]
        assert f" rid={rid} " not in first
    finally:
        sb.down()
