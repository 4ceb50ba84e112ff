"""An etcd cluster of three members, each in its own network namespace, and the member a
client talks to first cut off from the other two (not from the client): it has no leader,
the other two go on. The client's writes must land on them."""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.etcd import ETCD
from tests.faults.netns import Net, ip
from vbp.errors import RegistryUnavailable
from vbp.registry import open_registry
from vbp.registry.etcd_backend import NO_LEADER, REQUIRE_LEADER
from vbp.registry.kv import Put

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def etcd_in_namespaces(tmp_path):
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed (Debian package etcd-server; make test installs it)")
    net = Net(3).up()
    procs = []
    try:
        initial = ",".join(f"m{i}=http://{net.addr(i)}:2380" for i in range(3))
        for i in range(3):
            a = net.addr(i)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", net.ns(i), ETCD, "--name", f"m{i}",
                 "--data-dir", str(tmp_path / f"m{i}"),
                 "--listen-client-urls", f"http://{a}:2379", "--advertise-client-urls", f"http://{a}:2379",
                 "--listen-peer-urls", f"http://{a}:2380", "--initial-advertise-peer-urls", f"http://{a}:2380",
                 "--initial-cluster", initial, "--initial-cluster-state", "new",
                 "--heartbeat-interval", "10", "--election-timeout", "100", "--log-level", "error"],
                stdout=open(tmp_path / f"etcd-m{i}.log", "wb"), stderr=subprocess.STDOUT))
        wait_until("the cluster is up", lambda: all(healthy(net, i) for i in range(3)))
        yield net
    finally:
        # SIGKILL: a member stopped by SIGTERM hands its leadership over first, and with the
        # other members stopping too, or cut off, that waited 5 s for each test (nothing of
        # the throwaway data directories is looked at again)
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        net.close()


def healthy(net: Net, i: int) -> bool:
    """Member i answers /health true (false while it has no leader)."""
    try:
        return httpx.get(f"http://{net.addr(i)}:2379/health", timeout=0.5).json().get("health") == "true"
    except (httpx.HTTPError, ValueError):
        return False


def says_no_leader(net: Net, i: int) -> bool:
    """Member i refuses a require-leader request with "no leader" (what the client goes on
    from). /health turning false is not enough: on a loaded machine it times out while the
    member still follows its old leader, and a txn sent then waits for its proposal."""
    try:
        r = httpx.post(f"http://{net.addr(i)}:2379/v3/kv/range", json={"key": "eA=="},
                       headers=REQUIRE_LEADER, timeout=0.5)
        return NO_LEADER in r.text
    except httpx.HTTPError:
        return False


def wait_until(what: str, cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)


def test_writes_land_on_the_members_with_a_leader_when_the_first_is_cut_off(etcd_in_namespaces):
    """The first member of the URL, cut off from its cluster, held every request until the
    client's timeout, and a txn then counted as of unknown outcome: a volume create failed
    (and was not applied), though two members of three served. It now answers "no leader"
    at once, and the txn goes to the next endpoint."""
    net = etcd_in_namespaces
    reg = open_registry("etcd://" + ",".join(f"{net.addr(i)}:2379" for i in range(3)))
    try:
        reg.create_volume("before", {"n": 0})
        for j in (1, 2):  # member 0 reaches neither other member (nor they it); the client, yes
            ip("-n", net.ns(0), "route", "add", "blackhole", f"{net.addr(j)}/32")
        wait_until("member 0 knows it has no leader", lambda: says_no_leader(net, 0))
        assert healthy(net, 1)
        reg.create_volume("v", {"n": 1})
        reg.update_volume("v", lambda d: {**d, "n": 2})
        assert reg.get_volume("v") == {"n": 2} and reg.get_volume("before") == {"n": 0}
    finally:
        reg.close()


def test_a_keep_alive_to_a_member_cut_off_goes_to_the_next(etcd_in_namespaces):
    """A heartbeat keeps its liveness key's lease alive through the gateway's streaming
    /v3/lease/keepalive, whose errors come wrapped ({"error": {"grpc_code", "message",
    ...}}), not as a unary call's ({"code", "message"}). A member that lost its leader
    between the heartbeat's read of the key and its keep-alive answered "no leader" so,
    and the client took it for a refusal: no other endpoint tried, the heartbeat failed
    ("refused lease/keepalive: {'grpc_code': 14, ...}") though two members of three
    served. It is "unavailable" like any other: the next endpoint keeps the lease alive."""
    net = etcd_in_namespaces
    reg = open_registry("etcd://" + ",".join(f"{net.addr(i)}:2379" for i in range(3)))
    alone = open_registry(f"etcd://{net.addr(0)}:2379")
    try:
        reg.kv.txn([], [Put(b"vbp/t/alive", b"1", 30)])
        lease = reg.kv._call("kv/range", {"key": base64.b64encode(b"vbp/t/alive").decode()})["kvs"][0]["lease"]
        assert reg.kv._cur == 0
        for j in (1, 2):  # member 0 reaches neither other member (nor they it); the client, yes
            ip("-n", net.ns(0), "route", "add", "blackhole", f"{net.addr(j)}/32")
        wait_until("member 0 knows it has no leader", lambda: says_no_leader(net, 0))
        # (the keep-alive right after a read that member 0 still answered)
        d = reg.kv._call("lease/keepalive", {"ID": lease})
        assert int(d["result"]["TTL"]) == 30 and reg.kv._cur != 0
        with pytest.raises(RegistryUnavailable) as e:  # (no other endpoint: said as such)
            alone.kv._call("lease/keepalive", {"ID": lease})
        assert f"unavailable: {NO_LEADER}" in str(e.value) and "refused" not in str(e.value)
    finally:
        alone.close()
        reg.close()
