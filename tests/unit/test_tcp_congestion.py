"""TCP congestion control of blockd's sockets (vbp.sockets.set_congestion): the peer links
and the NBD connections get the configured one at both ends that blockd owns, as the
kernel reports it (`ss`), and a name the kernel does not have is refused with the reason.

"reno" is what the tests ask for: every Linux kernel has it and hardly any host uses it by
default, so a socket left with the system's choice does not pass for a configured one."""

from __future__ import annotations

import errno
import json
import re
import socket
import subprocess

import pytest
import trio

from replicator import messages as m
from replicator.transport import PeerPool
from tests.conftest import SandboxHandle, need, run_vbp
from tests.unit.test_peer_transport import CLUSTER, server
from nbd_frontend.server import serve_nbd
from vbp.sockets import congestion_problem, congestion_refusal, set_congestion

pytestmark = pytest.mark.timeout(60)

WANTED = "reno"


with open("/proc/sys/net/ipv4/tcp_available_congestion_control") as f:
    AVAILABLE = set(f.read().split())


def congestion(sock) -> str:
    """The congestion control `sock` uses, as the kernel says."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16)
    return raw.split(b"\0", 1)[0].decode()


def system_default() -> str:
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        return f.read().strip()


def kernel_view(port: int) -> dict[tuple[int, int], str]:
    """(local port, peer port) -> congestion control, for every established TCP socket
    with `port` at either end, as `ss` prints them."""
    out = subprocess.run([need("ss"), "-tinH", "state", "established",
                          f"( sport = :{port} or dport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    found, ends = {}, None
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            addrs = re.findall(r":(\d+)\s", line + " ")
            ends = (int(addrs[-2]), int(addrs[-1]))
        elif ends is not None:  # (the name is not always the line's first word: `ss -o`)
            found[ends] = next(w for w in line.split() if w in AVAILABLE)
            ends = None
    return found


def ends_at(view: dict, port: int) -> tuple[list[str], list[str]]:
    """The congestion controls of the sockets whose local port is `port` (the server's
    ends), and of those connected to it (the clients' ends)."""
    return ([cc for (local, _), cc in view.items() if local == port],
            [cc for (local, peer), cc in view.items() if peer == port])


# --- the helper --------------------------------------------------------------------------


def test_set_congestion_sets_a_name_and_empty_keeps_the_system_choice():
    with socket.socket() as s:
        set_congestion(s, "")
        assert congestion(s) == system_default()
        set_congestion(s, WANTED)
        assert congestion(s) == WANTED


@pytest.mark.parametrize("name, reason", [
    ("no_such_cc", r"not available on this kernel \(.+; available: .*cubic"),
    ("a b", r"not a congestion control name"),
    ("x" * 16, r"not a congestion control name"),
    ("bbr\0", r"not a congestion control name"),
    (3, r"expected a string"),
    (None, r"expected a string"),
])
def test_a_name_the_kernel_cannot_use_is_explained(name, reason):
    problem = congestion_problem(name)
    assert problem and re.search(reason, problem), problem


def test_a_name_this_process_may_not_use_is_explained_as_such():
    # (the kernel's answer to a process without CAP_NET_ADMIN asking for a name outside
    # net.ipv4.tcp_allowed_congestion_control; this suite runs as root, so it is built)
    why = congestion_refusal("bbr", PermissionError(errno.EPERM, "Operation not permitted"))
    assert "not allowed for this process" in why and "tcp_allowed_congestion_control" in why
    assert "CAP_NET_ADMIN" in why and "\n" not in why
    why = congestion_refusal("nosuch", FileNotFoundError(errno.ENOENT, "No such file"))
    assert "not available on this kernel" in why and "reno" in why


def test_the_peer_default_is_cubic_and_an_empty_setting_keeps_the_system_choice(tmp_path):
    from blockd.config import load

    need_keys = {"host_id": "h1", "data_dir": str(tmp_path), "registry": f"lmdb://{tmp_path}"}
    cfg = load(None, need_keys)
    assert cfg.peer_tcp_congestion == "cubic"  # (root may use any)
    # NBD: the system's, but cubic for clients on this host
    assert cfg.nbd_tcp_congestion == "auto" and cfg.nbd_congestion() == ("", "cubic")
    assert load(None, need_keys | {"nbd_tcp_congestion": "auto"}).nbd_congestion() == ("", "cubic")
    cfg = load(None, need_keys | {"peer_tcp_congestion": "", "nbd_tcp_congestion": ""})
    assert (cfg.peer_tcp_congestion, cfg.nbd_congestion()) == ("", ("", ""))
    cfg = load(None, need_keys | {"nbd_tcp_congestion": WANTED})  # every client alike
    assert cfg.nbd_congestion() == (WANTED, "")


@pytest.mark.parametrize("name", ["", "reno", "cubic"])
def test_names_the_kernel_has_are_accepted(name):
    assert congestion_problem(name) is None


# --- peer links and NBD connections, in process ------------------------------------------


async def test_peer_links_use_the_configured_congestion_control_at_both_ends():
    async with server(congestion=WANTED) as (address, _):
        port = int(address.rsplit(":", 1)[1])
        async with PeerPool(CLUSTER, "cli", congestion=WANTED) as pool:
            assert type(await pool.call(address, m.Ping(1))) is m.Pong
            view = await trio.to_thread.run_sync(kernel_view, port)
            servers, clients = ends_at(view, port)
            assert servers == [WANTED] and clients == [WANTED], view


async def test_peer_links_keep_the_system_choice_when_none_is_configured():
    async with server() as (address, _):
        port = int(address.rsplit(":", 1)[1])
        async with PeerPool(CLUSTER, "cli") as pool:
            await pool.call(address, m.Ping(1))
            view = await trio.to_thread.run_sync(kernel_view, port)
            assert ends_at(view, port) == ([system_default()], [system_default()]), view


async def test_a_peer_link_whose_congestion_control_fails_still_carries_calls(caplog):
    async with server() as (address, _):
        port = int(address.rsplit(":", 1)[1])
        async with PeerPool(CLUSTER, "cli", congestion="no_such_cc") as pool:
            assert type(await pool.call(address, m.Ping(1))) is m.Pong
            view = await trio.to_thread.run_sync(kernel_view, port)
            assert ends_at(view, port)[1] == [system_default()], view
    assert any("congestion control 'no_such_cc' not set" in r.getMessage()
               for r in caplog.records), caplog.text


async def test_listeners_whose_congestion_control_fails_still_serve(caplog):
    from nbd_frontend.export import MemoryProvider

    provider = MemoryProvider()
    provider.add("disk", 1 << 20)
    async with server(congestion="no_such_cc") as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            assert type(await pool.call(address, m.Ping(1))) is m.Pong
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_nbd(
            provider, "127.0.0.1", 0, congestion="no_such_cc", task_status=task_status))
        client = await trio.open_tcp_stream("127.0.0.1", port)
        assert await client.receive_some(8) == b"NBDMAGIC"
        await client.aclose()
        nursery.cancel_scope.cancel()
    said = [r.getMessage() for r in caplog.records]
    for who in ("peer listener", "nbd listener"):
        assert any(f"{who}: congestion control 'no_such_cc' not set" in x for x in said), said


@pytest.mark.parametrize("configured, local, expected", [
    (WANTED, "", WANTED), ("", "", None), ("", WANTED, WANTED), ("cubic", WANTED, WANTED)])
async def test_nbd_connections_use_the_configured_congestion_control(configured, local, expected):
    """`local` (local_congestion), when set, wins for this loopback client over `configured`
    (congestion, the listener's); None: the system's."""
    from nbd_frontend.export import MemoryProvider

    provider = MemoryProvider()
    provider.add("disk", 1 << 20)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_nbd(
            provider, "127.0.0.1", 0, congestion=configured, local_congestion=local,
            task_status=task_status))
        client = await trio.open_tcp_stream("127.0.0.1", port)
        assert await client.receive_some(8) == b"NBDMAGIC"  # accepted and served
        view = await trio.to_thread.run_sync(kernel_view, port)
        servers, clients = ends_at(view, port)
        # the client's end is the client's business: only the server's end is blockd's
        assert servers == [expected or system_default()], view
        assert clients == [system_default()], view
        await client.aclose()
        nursery.cancel_scope.cancel()


def test_same_host_tells_a_local_client_from_a_remote_one():
    """Over a real link (a network namespace joined by a veth pair, as in the partition
    tests): a client in the other namespace is not on this host; one on loopback, or on
    this host connecting to its own bridge address, is."""
    from tests.faults.netns import Net

    net = Net(1).up()
    try:
        with socket.socket() as listener:
            listener.bind(("0.0.0.0", 0))
            listener.listen()
            port = listener.getsockname()[1]
            remote = net.connect(0, port, to=net.root_addr)
            local = socket.create_connection(("127.0.0.1", port))
            own = socket.create_connection((net.root_addr, port))
            with remote, local, own:
                ends = [listener.accept()[0] for _ in range(3)]
                try:
                    from vbp.sockets import same_host

                    by_peer = {e.getpeername()[0]: same_host(e) for e in ends}
                    assert by_peer == {net.addr(0): False, "127.0.0.1": True,
                                       net.root_addr: True}, by_peer
                finally:
                    for e in ends:
                        e.close()
    finally:
        net.close()
    a, b = socket.socketpair()
    with a, b:
        from vbp.sockets import same_host

        assert not same_host(a)  # (not an IP socket)


def test_only_nbd_clients_on_this_host_get_the_local_congestion_control():
    """serve_nbd with local_congestion, a client in another network namespace (another
    machine, as far as the kernel can tell) and one on loopback: only the second's server
    end gets it; the first keeps the system's."""
    from nbd_frontend.export import MemoryProvider
    from tests.faults.netns import Net

    assert system_default() != WANTED  # (else a kept default would pass for a set one)
    net = Net(1).up()
    try:
        async def main() -> None:
            provider = MemoryProvider()
            provider.add("disk", 1 << 20)
            async with trio.open_nursery() as nursery:
                port = await nursery.start(lambda task_status: serve_nbd(
                    provider, "0.0.0.0", 0, local_congestion=WANTED, task_status=task_status))
                remote = await trio.to_thread.run_sync(
                    lambda: net.connect(0, port, to=net.root_addr))
                local = socket.create_connection(("127.0.0.1", port))
                with remote, local:
                    for s in (remote, local):  # both served: the greeting arrived
                        assert await trio.to_thread.run_sync(s.recv, 8) == b"NBDMAGIC"
                    view = await trio.to_thread.run_sync(kernel_view, port)
                    mine = {peer: cc for (lport, peer), cc in view.items() if lport == port}
                    assert mine == {remote.getsockname()[1]: system_default(),
                                    local.getsockname()[1]: WANTED}, view
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        net.close()


# --- blockd ------------------------------------------------------------------------------


def test_blockd_links_and_nbd_connections_follow_its_config(tmp_path):
    import nbd

    sb = SandboxHandle(tmp_path / "sb", 2)
    p = run_vbp("sandbox", "up", "--hosts", 2, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", "1G", "--json", "--set", f"peer_tcp_congestion={WANTED}",
                "--set", f"nbd_tcp_congestion={WANTED}", check=False)
    try:
        assert p.returncode == 0, p.stderr
        sb.info = json.loads(p.stdout)
        sb.vbp("volume", "create", "r2", "--size", "4M", "--replicas", "2", "--chunk-size", "1M")
        h = nbd.NBD()
        h.connect_uri(sb.uri("r2", 0))
        h.pwrite(b"c" * 4096, 0)  # replicated: host1 -> host2 over a peer link
        hosts = sb.info["hosts"]
        peer = kernel_view(hosts[1]["peer_port"])
        servers, clients = ends_at(peer, hosts[1]["peer_port"])
        assert servers and set(servers) == {WANTED} and set(clients) == {WANTED}, peer
        nbd_view = kernel_view(hosts[0]["nbd_port"])
        servers, clients = ends_at(nbd_view, hosts[0]["nbd_port"])
        assert servers == [WANTED] and clients == [system_default()], nbd_view
        h.shutdown()
    finally:
        sb.down()


def test_blockd_peer_links_and_local_nbd_clients_use_cubic_by_default(sandbox):
    import nbd

    sandbox.vbp("volume", "create", "cc3", "--size", "4M", "--replicas", "3", "--chunk-size", "1M")
    h = nbd.NBD()
    h.connect_uri(sandbox.uri("cc3", 0))
    h.pwrite(b"d" * 4096, 0)
    for host in sandbox.info["hosts"][1:]:
        view = kernel_view(host["peer_port"])
        servers, clients = ends_at(view, host["peer_port"])
        assert servers and set(servers) == {"cubic"} and set(clients) == {"cubic"}, view
    # libnbd connects over loopback: a client on this host, whose connection gets cubic
    view = kernel_view(sandbox.info["hosts"][0]["nbd_port"])
    assert ends_at(view, sandbox.info["hosts"][0]["nbd_port"])[0] == ["cubic"], view
    h.shutdown()


def test_blockd_refuses_a_congestion_control_the_kernel_lacks(tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text(f'host_id = "h1"\ndata_dir = "{tmp_path}/d"\n'
                    f'registry = "lmdb://{tmp_path}/r"\npeer_tcp_congestion = "no_such_cc"\n')
    from tests.unit.test_config import run_blockd

    p = run_blockd("--config", str(conf))
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "peer_tcp_congestion" in line and "not available" in line, line
