"""blockd.sandbox helpers: pid and port checks, and the state file (sandbox.json). No blockd
is started here; tests/interop drives real sandboxes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from blockd.config import SettingError, coerce_setting
from blockd.sandbox import SET, STATE_FILE, Sandbox, SandboxError, pid_alive, port_open, ports_free
from control.cli import EXIT_ERROR, EXIT_USAGE
from control.cli import main as vbp_main
from vbp.errors import BadValue, InvalidArgument


# --- pid_alive ---------------------------------------------------------------------------


def test_own_pid_is_alive_only_if_it_runs_blockd():
    with open(f"/proc/{os.getpid()}/cmdline", "rb") as f:
        runs_blockd = b"blockd" in f.read()
    assert pid_alive(os.getpid()) is runs_blockd  # pytest is not a blockd: a recycled pid is not one


@pytest.mark.parametrize("pid", [0, -1, -os.getpid(), 2**22 + 12345, 2**31, 10**30],
                         ids=["0", "-1", "minus-own-pid", "past-pid-max", "2**31", "10**30"])
def test_garbage_pids_are_not_alive(pid):
    assert pid_alive(pid) is False


def test_a_process_named_blockd_is_alive_until_it_exits_and_a_zombie_is_not():
    # argv carries "blockd" the way `python -m blockd.main` does
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "blockd.main"])
    try:
        deadline = time.monotonic() + 10
        while not pid_alive(p.pid) and time.monotonic() < deadline:  # until exec is done
            time.sleep(0.01)
        assert pid_alive(p.pid)
        os.kill(p.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(p.pid) and time.monotonic() < deadline:  # a zombie until reaped
            time.sleep(0.01)
        assert not pid_alive(p.pid)
    finally:
        p.kill()
        p.wait()
    assert not pid_alive(p.pid)


# --- ports -------------------------------------------------------------------------------


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_base(hosts: int = 1) -> int:
    """A --base-port whose 2 * `hosts` ports (NBD and peer port of each host) were all free
    at once: a free port alone may have its neighbour taken by another connection (CI63
    failed so: "ports 58373/58374 for host1 are in use")."""
    while True:
        socks = [socket.socket()]
        try:
            socks[0].bind(("127.0.0.1", 0))
            base = socks[0].getsockname()[1]
            try:
                for port in range(base + 1, base + 2 * hosts):
                    socks.append(socket.socket())
                    socks[-1].bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
        finally:
            for sock in socks:
                sock.close()


def test_ports_free(listener):
    port = free_port()
    assert ports_free([port])
    assert ports_free([])
    assert not ports_free([listener])
    assert not ports_free([port, listener])


def test_a_bound_but_not_listening_port_is_not_free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        assert not ports_free([s.getsockname()[1]])


def test_port_open(listener):
    assert port_open(listener)
    assert not port_open(free_port())


# --- the state file ----------------------------------------------------------------------


def test_down_stops_a_host_it_started_that_proc_does_not_show_as_blockd_yet(tmp_path):
    """CI run of bd2c6c1: `vbp sandbox run` interrupted while its hosts started left one
    running. Its Popen had returned (the exec under way), the interrupt came before its pid
    was saved, and /proc read its command line empty for that moment: neither the state
    file nor the scan of /proc for blockds had it. `down` also stops what this object
    started and has not seen exit. (Here a child whose command line never says blockd
    stands for that moment.)"""
    sb = Sandbox(tmp_path / "sb")
    sb.dir.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            start_new_session=True)
    sb._procs[proc.pid] = proc
    sb._ids[proc.pid] = "host3"
    try:
        assert not pid_alive(proc.pid)
        assert sb.down(timeout=5) == ["host3"]
        assert proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_no_state_means_no_hosts(tmp_path):
    sb = Sandbox(tmp_path / "sb")
    assert sb.hosts() == []
    assert sb.down() == []
    assert sb.registry_url == f"lmdb://{tmp_path / 'sb' / 'registry'}"


def test_registry_url_is_remembered_and_checked(tmp_path):
    sb = Sandbox(tmp_path / "sb")
    (tmp_path / "sb").mkdir()
    sb._save({"hosts": [], "registry": "etcd://127.0.0.1:2379"})
    assert sb.registry_url == "etcd://127.0.0.1:2379"
    with pytest.raises(InvalidArgument):
        sb.up(1, 20000, registry="etcd://no-port")  # refused before anything starts
    assert sb.hosts() == []
    r = CliRunner().invoke(vbp_main, ["sandbox", "up", "--dir", str(tmp_path / "sb"),
                                      "--registry", "nosuch://x"])
    assert r.exit_code != 0 and "nosuch" in r.output


def test_state_round_trip_and_dead_pids(tmp_path):
    sb = Sandbox(tmp_path)
    sb._save({"base_port": 20000, "hosts": [
        {"id": "host1", "nbd_port": 20000, "peer_port": 20001, "pid": 0},
        {"id": "host2", "nbd_port": 20002, "peer_port": 20003, "pid": os.getpid()},  # not a blockd
    ]})
    assert not (tmp_path / (STATE_FILE + ".tmp")).exists()
    hosts = sb.hosts()
    assert [(h.id, h.nbd_port, h.peer_port, h.alive) for h in hosts] == [
        ("host1", 20000, 20001, False), ("host2", 20002, 20003, pid_alive(os.getpid()))]
    assert hosts[0].nbd_uri == "nbd://127.0.0.1:20000"


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"\xff\xfe\x00\x01", b'{"hosts": [', b"[]", b'"text"', b'{"hosts": 5}',
    b'{"hosts": [{"id": "host1"}]}', b'{"hosts": ["host1"]}',
], ids=["garbage", "empty", "binary", "truncated", "list", "string", "hosts-int", "host-fields",
        "host-str"])
def test_unreadable_state_is_a_clear_sandbox_error(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    sb = Sandbox(tmp_path)
    for call in (sb.hosts, sb.down, lambda: sb.up(1, free_base())):
        with pytest.raises(SandboxError) as e:
            call()
        msg = str(e.value)
        assert str(tmp_path / STATE_FILE) in msg and "unreadable sandbox state" in msg, msg


def test_state_file_that_is_a_directory(tmp_path):
    (tmp_path / STATE_FILE).mkdir()
    with pytest.raises(SandboxError, match="unreadable sandbox state"):
        Sandbox(tmp_path).hosts()


def test_cli_reports_unreadable_state_in_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_text("{oops")
    r = CliRunner().invoke(vbp_main, ["sandbox", "status", "--dir", str(tmp_path)], prog_name="vbp")
    assert r.exit_code == EXIT_ERROR
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vbp: error: ") and STATE_FILE in r.stderr


# --- up/down arguments, without starting anything ----------------------------------------


@pytest.mark.parametrize("n", [0, -1, 65])
def test_up_refuses_a_bad_host_count(tmp_path, n):
    with pytest.raises(InvalidArgument, match="--hosts"):
        Sandbox(tmp_path).up(n)


def test_up_refuses_a_base_port_without_room(tmp_path):
    with pytest.raises(InvalidArgument, match="--base-port"):
        Sandbox(tmp_path).up(3, 65534)


def test_up_refuses_another_base_port_for_hosts_that_keep_theirs(tmp_path):
    """The hosts of a sandbox keep the ports they were given: another --base-port would be
    recorded and do nothing for them, so it is refused, and nothing changes."""
    sb = Sandbox(tmp_path)
    state = {"base_port": 20000, "hosts": [{"id": "host1", "nbd_port": 20000,
                                            "peer_port": 20001, "pid": 0}]}
    sb._save(state)
    with pytest.raises(InvalidArgument, match="have their ports from 20000, which they keep"):
        sb.up(1, 30000)
    assert sb._load() == state


def test_up_refuses_ports_in_use_before_starting_anything(tmp_path, listener):
    sb = Sandbox(tmp_path)
    with pytest.raises(SandboxError, match=f"{listener}.*in use"):
        sb.up(1, listener)
    assert sb.hosts() == [] and not (tmp_path / STATE_FILE).exists()


@pytest.mark.parametrize("setting, reason", [
    ("lease_ttl=-1", "key 'lease_ttl': bad value -1 (must be a positive"),
    ("lease_ttl=soon", "key 'lease_ttl'"),
    ("nearfull_ratio=0.97", "at most full_ratio"),  # (checked against the others too)
    ("nbd_tls=null", "key 'nbd_tls': bad value null (not a TOML value)"),
    ("lease_ttl=NaN", "not a TOML value"),
    ("log_level={\"a\": 1}", "not a TOML value"),
    ("zone=null", "key 'zone': the sandbox sets it for each host"),
    ("pod=p1", "key 'pod': the sandbox sets it"),
    ("listen=127.0.0.1:1", "key 'listen': the sandbox sets it"),
    ("capacity=1G", "use --capacity"),
], ids=lambda x: x if "=" in x else None)
def test_up_refuses_bad_settings_before_saving_or_starting(tmp_path, setting, reason):
    """A --set that blockd would refuse (or never read: the sandbox gives each host those
    keys as flags) is refused at once, and not saved for every later `up` to fail on:
    bad usage (exit 2), as an unknown key is (it was exit 1)."""
    r = CliRunner().invoke(vbp_main, ["sandbox", "up", "--hosts", "1", "--dir", str(tmp_path),
                                      "--base-port", str(free_base()), "--set", setting], prog_name="vbp")
    assert r.exit_code == EXIT_USAGE, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vbp: error: --set: ") and reason in r.stderr
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / "host1").exists()


def test_a_saved_setting_gone_bad_is_the_state_files_fault_not_a_new_sets(tmp_path):
    """A saved peer_secret_file removed since: an `up` with another, valid --set names the
    state file (exit 1), as an `up` without one does; it was blamed on --set (bad usage)."""
    secret = tmp_path / "peer.secret"
    secret.write_text("x" * 32)
    os.chmod(secret, 0o600)
    sb = Sandbox(tmp_path / "sb")
    h = {"id": "host1", "nbd_port": 20000, "peer_port": 20001}
    sb._check_settings({"peer_secret_file": str(secret)}, {}, h, "8G", "lmdb:///x")
    secret.unlink()
    for new in ({}, {"lease_ttl": 5}):
        with pytest.raises(InvalidArgument, match=f"{STATE_FILE} settings: key 'peer_secret_file'") as e:
            sb._check_settings({"peer_secret_file": str(secret)}, new, h, "8G", "lmdb:///x")
        assert not isinstance(e.value, BadValue)


def test_settings_saved_before_are_checked_with_the_new_ones(tmp_path):
    sb = Sandbox(tmp_path)
    h = {"id": "host1", "nbd_port": 20000, "peer_port": 20001}
    # a value an older vbp saved unchecked is named with the file it is in
    with pytest.raises(InvalidArgument, match=f"{STATE_FILE} settings: key 'lease_ttl'"):
        sb._check_settings({"lease_ttl": -1}, {"gc_interval": 1}, h, "8G", "lmdb:///x")
    # a new value judged with those saved, not alone: full_ratio 0.99 allows nearfull 0.97
    sb._check_settings({"full_ratio": 0.99}, {"nearfull_ratio": 0.97}, h, "8G", "lmdb:///x")
    with pytest.raises(InvalidArgument, match="--set: key 'nearfull_ratio'"):
        sb._check_settings({"full_ratio": 0.9}, {"nearfull_ratio": 0.97}, h, "8G", "lmdb:///x")


def test_a_set_error_is_told_by_its_source_not_by_its_message(tmp_path):
    """Which errors are --set's (bad usage) is the SettingError's source, not a prefix of
    its message: a --set value, a pair of them and a key the sandbox sets are BadValue; a
    --capacity refused with a valid --set given stays the flag's (exit 1), as before."""
    sb = Sandbox(tmp_path)
    h = {"id": "host1", "nbd_port": 20000, "peer_port": 20001}
    for new, why in (({"lease_ttl": "abc"}, "key 'lease_ttl'"),
                     ({"full_ratio": 0.5, "nearfull_ratio": 0.9}, "key 'nearfull_ratio'"),
                     ({"zone": "z1"}, "the sandbox sets it")):
        with pytest.raises(BadValue, match=why) as e:
            sb._check_settings({}, new, h, "8G", "lmdb:///x")
        assert str(e.value).startswith("--set: ") and e.value.__cause__ is None
    with pytest.raises(SettingError) as e:
        sb._check_settings({}, {"lease_ttl": 5}, h, "1K", "lmdb:///x")
    assert e.value.source == "flag --capacity" and not isinstance(e.value, BadValue)
    assert str(e.value).startswith("flag --capacity: key 'capacity': 1024 bytes")
    # the source, as given: a message of any wording keeps it
    with pytest.raises(SettingError) as e:
        coerce_setting("lease_ttl", "abc", SET)
    assert e.value.source == SET == "--set" and str(e.value).startswith("--set: key 'lease_ttl'")


def test_log_tail_and_kill_of_unknown_host(tmp_path):
    sb = Sandbox(tmp_path)
    assert sb.log_tail("host1") == "(no log)"
    (tmp_path / "host1").mkdir()
    (tmp_path / "host1" / "blockd.log").write_text("\n".join(f"line {i}" for i in range(40)) + "\n")
    assert sb.log_tail("host1", 3) == "line 37\nline 38\nline 39"
    with pytest.raises(SandboxError, match="host9"):
        sb.kill("host9")


def test_down_stops_a_host_whose_pid_was_never_saved(tmp_path):
    """An interrupted `up` may have started a host without saving its pid: `down` finds it
    by its data directory, and leaves alone a blockd of another sandbox."""
    def fake_blockd(directory, host_id):
        # (argv as _spawn gives it; pid_alive wants "blockd" in it)
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "blockd.main",
                                 "--host-id", host_id, "--data-dir", str(directory / host_id / "data")])

    sb = Sandbox(tmp_path / "sb")
    sb.dir.mkdir()
    ours, other = fake_blockd(sb.dir, "host2"), fake_blockd(tmp_path / "other", "host2")
    try:
        deadline = time.monotonic() + 10
        while not (pid_alive(ours.pid) and pid_alive(other.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sb.down(timeout=5) == ["host2"]
        assert ours.wait(5) == -signal.SIGTERM
        assert other.poll() is None
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_a_metrics_address_for_every_host_does_not_leave_a_host_that_cannot_start(tmp_path):
    """One --set is every host's setting: a fixed metrics port cannot be every host's. It
    must be refused before anything is saved or started (as other settings blockd would
    refuse are), or every host must serve."""
    port = free_port()
    sb = Sandbox(tmp_path)
    try:
        r = CliRunner().invoke(vbp_main, ["sandbox", "up", "--hosts", "2", "--dir", str(tmp_path),
                                          "--base-port", str(free_base(2)), "--set",
                                          f"metrics=127.0.0.1:{port}"], prog_name="vbp")
        if r.exit_code == 0:
            assert all(h.alive for h in sb.hosts()), sb.hosts()
        else:
            assert "--set: key 'metrics'" in r.stderr, r.stderr
            assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / "host1").exists()
    finally:
        sb.down()


# --- JSON: a sandbox host is the host `vbp host list` prints -------------------------------


def _json(args, env=None):
    r = CliRunner().invoke(vbp_main, [*map(str, args), "--json"], env=env, prog_name="vbp")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _as_listed(sandbox_json: dict, registry: str) -> None:
    """Each sandbox host has every key of its `host list` object with the same value, but
    `nbd`, kept a URI as the sandbox printed it (host list's is the record's HOST:PORT,
    also kept): the addresses as nbd_uri, nbd_address, nbd_port, peer_address, peer_port
    in both. (The sandbox printed nbd, nbd_port, peer_port, pid and alive only.)"""
    listed = {h["id"]: h for h in _json(["--registry", registry, "host", "list"])["hosts"]}
    assert sandbox_json["hosts"] and sandbox_json["registry"] == registry
    for h in sandbox_json["hosts"]:
        want = listed[h["id"]]
        assert {k: v for k, v in h.items() if k in want and k != "nbd"} == {
            k: v for k, v in want.items() if k != "nbd"}
        assert h["nbd"] == h["nbd_uri"] == f"nbd://{want['nbd']}"
        assert sorted(set(h) - set(want)) == ["alive", "pid"]


def test_sandbox_status_prints_each_host_as_host_list_does(tmp_path):
    from vbp.cluster import HostRecord
    from vbp.registry import open_registry

    sb = Sandbox(tmp_path)
    sb._save({"base_port": 20000, "hosts": [
        {"id": "host1", "nbd_port": 20000, "peer_port": 20001, "pid": 0},
        {"id": "host2", "nbd_port": 20002, "peer_port": 20003, "pid": 0}]})
    with open_registry(sb.registry_url) as reg:
        for i, port in ((1, 20000), (2, 20002)):
            reg.register_host(HostRecord(f"host{i}", f"127.0.0.1:{port + 1}", f"127.0.0.1:{port}",
                                         pod=f"pod{i}", capacity=1 << 30), 600)
        reg.set_data_set(0, ["host1"], None)
    got = _json(["sandbox", "status", "--dir", tmp_path])
    _as_listed(got, sb.registry_url)
    assert [(h["data"], h["alive"]) for h in got["hosts"]] == [("in", False), ("out", False)]


def test_sandbox_status_without_a_registry_still_gives_the_addresses(tmp_path):
    """A sandbox whose registry was never made (or does not answer): the processes and
    the addresses from the sandbox's state, as host list gives them."""
    Sandbox(tmp_path)._save({"hosts": [{"id": "host1", "nbd_port": 20000, "peer_port": 20001}]})
    [h] = _json(["sandbox", "status", "--dir", tmp_path])["hosts"]
    assert h == {"id": "host1", "pid": 0, "alive": False, "nbd": "nbd://127.0.0.1:20000",
                 "nbd_uri": "nbd://127.0.0.1:20000", "nbd_address": "127.0.0.1:20000",
                 "nbd_port": 20000, "peer_address": "127.0.0.1:20001", "peer_port": 20001}
    assert not (tmp_path / "registry").exists()  # (not made by asking)


def test_sandbox_status_reads_the_registry_for_json_only_and_keeps_its_own_ports(
        tmp_path, monkeypatch):
    """The table needs nothing of the registry: `sandbox status` without --json opens
    none (a registry that does not answer held it, and cluster_map may write). With
    --json, a host's ports are the sandbox's, whatever its record says. (Found by a
    review.)"""
    from vbp import registry
    from vbp.cluster import HostRecord
    from vbp.registry import open_registry

    sb = Sandbox(tmp_path)
    sb._save({"base_port": 20000, "hosts": [{"id": "host1", "nbd_port": 20000,
                                             "peer_port": 20001, "pid": 0}]})
    with open_registry(sb.registry_url) as reg:  # a record naming other ports
        reg.register_host(HostRecord("host1", "127.0.0.1:30001", "127.0.0.1:30000"), 600)
    opened = []
    real = registry.open_registry
    monkeypatch.setattr(registry, "open_registry", lambda *a, **k: opened.append(a) or real(*a, **k))
    r = CliRunner().invoke(vbp_main, ["sandbox", "status", "--dir", str(tmp_path)], prog_name="vbp")
    assert r.exit_code == 0 and "host1" in r.output and opened == [], (r.output, opened)
    [h] = _json(["sandbox", "status", "--dir", tmp_path])["hosts"]
    assert opened and (h["nbd_port"], h["peer_port"]) == (20000, 20001)
    assert h["nbd_address"] == "127.0.0.1:30000"  # (the record's, as host list gives it)


def test_sandbox_up_prints_each_host_as_host_list_does(tmp_path):
    sb = Sandbox(tmp_path)
    try:
        got = _json(["sandbox", "up", "--hosts", "1", "--dir", tmp_path, "--base-port", free_base(),
                     "--capacity", "1G"])
        _as_listed(got, sb.registry_url)
        assert [(h["state"], h["alive"]) for h in got["hosts"]] == [("up", True)]
    finally:
        sb.down()
