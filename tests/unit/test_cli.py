"""control.cli: the `vbp` command driven through click's CliRunner against a temporary LMDB
registry, plus a few runs of the real process. Errors are one line with the documented exit
codes (control/cli.py: 1 error, 2 usage, 3 not found, 4 registry unreachable)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from control.cli import EXIT_ERROR, EXIT_NOT_FOUND, EXIT_REGISTRY, EXIT_USAGE, main
from vbp.registry import open_registry

ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3
MiB = 1024**2


@pytest.fixture
def reg_url(tmp_path) -> str:
    url = "lmdb://" + str(tmp_path / "reg")
    open_registry(url).close()
    return url


@pytest.fixture
def vbp(reg_url):
    runner = CliRunner()

    def run(*args, code: int = 0, env: dict | None = None):
        e = {"VBP_REGISTRY": reg_url, "COLUMNS": "80"}
        e.update(env or {})
        r = runner.invoke(main, [str(a) for a in args], env=e, prog_name="vbp")
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise AssertionError(f"vbp {' '.join(map(str, args))} raised {r.exception!r} "
                                 f"(an operator would see a traceback)") from r.exception
        assert r.exit_code == code, (
            f"vbp {' '.join(map(str, args))}: exit {r.exit_code}, expected {code}\n{r.stdout}{r.stderr}")
        return r

    return run


def js(result):
    return json.loads(result.stdout)


def one_error_line(result, *fragments):
    """An error is exactly one line on stderr, `vbp: error: ...`, and nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vbp: error: "), result.stderr
    assert result.stdout == ""
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# --- the volume life cycle ---------------------------------------------------------------


def test_volume_lifecycle_human(vbp):
    r = vbp("volume", "create", "disk1", "--size", "10G", "--replicas", "3")
    assert "created volume disk1: 10 GiB, 3 replicas (min 2), chunk 4 MiB" in r.stdout
    r = vbp("volume", "list")
    assert r.stdout.splitlines()[0].split() == ["NAME", "SIZE", "REPLICAS", "MIN", "CHUNK", "SNAPSHOTS", "PARENT"]
    assert r.stdout.splitlines()[1].split()[:3] == ["disk1", "10", "GiB"]
    r = vbp("volume", "show", "disk1")
    assert "10 GiB (10737418240 bytes)" in r.stdout and "replicas" in r.stdout
    assert "created snapshot disk1@gold" in vbp("volume", "snapshot", "disk1", "gold").stdout
    assert "created clone vm1 of disk1@gold" in vbp("volume", "clone", "disk1@gold", "vm1").stdout
    assert "volume vm1 is now 20 GiB" in vbp("volume", "resize", "vm1", "20G").stdout
    r = vbp("volume", "show", "vm1")
    assert "disk1@gold" in r.stdout and "20 GiB" in r.stdout
    assert "deleted volume vm1\n" == vbp("volume", "delete", "vm1").stdout
    assert "deleted volume disk1 and its snapshots gold\n" == vbp("volume", "delete",
                                                                  "disk1").stdout
    assert vbp("volume", "list").stdout.strip() == "no volumes"


@pytest.mark.parametrize("where", ["global", "command"])
def test_volume_lifecycle_json(vbp, where):
    def j(*args):
        return js(vbp("--json", *args) if where == "global" else vbp(*args, "--json"))

    v = j("volume", "create", "disk1", "--size", "1G", "--replicas", "2", "--chunk-size", "8M")
    assert (v["name"], v["size"], v["replicas"], v["min_size"], v["chunk_size"]) == ("disk1", GiB, 2, 1, 8 << 20)
    assert v["snapshots"] == [] and v["parent"] is None
    assert j("volume", "list") == [v]
    # show adds the accepted losses of the volume's lineage (its own registry key)
    assert j("volume", "show", "disk1") == {**v, "accepted_losses": []}
    s = j("volume", "snapshot", "disk1", "s1")
    assert s["snapshots"] == ["s1"] and s["lineage"] == v["lineage"] and s["head"] > v["head"]
    c = j("volume", "clone", "disk1@s1", "disk2")
    assert c["parent"] == "disk1@s1" and c["lineage"] == v["lineage"] and c["size"] == GiB
    assert [x["name"] for x in j("volume", "list")] == ["disk1", "disk2"]
    assert j("volume", "resize", "disk2", "3G")["size"] == 3 * GiB
    assert j("volume", "resize", "disk2", "2G", "--force")["size"] == 2 * GiB
    assert j("volume", "delete", "disk2") == {"deleted": "disk2", "snapshots": []}
    # (a volume goes with its snapshots: said, as the snapshots it took with it)
    assert j("volume", "delete", "disk1") == {"deleted": "disk1", "snapshots": ["s1"]}
    assert j("volume", "list") == []


def test_volume_show_gives_the_qos_limits(vbp):
    vbp("volume", "create", "noisy", "--size", "1G")
    rows = dict(line.strip().split(None, 1) for line in vbp("volume", "show", "noisy").stdout.splitlines())
    assert rows["qos_iops"] == "unlimited" and rows["qos_bps"] == "unlimited"
    assert "iops 500, bandwidth 20 MiB/s" in vbp("volume", "set", "noisy", "--iops", 500, "--bps", "20M").stdout
    rows = dict(line.strip().split(None, 1) for line in vbp("volume", "show", "noisy").stdout.splitlines())
    assert rows["qos_iops"] == "500" and rows["qos_bps"] == "20 MiB/s"
    assert js(vbp("volume", "show", "noisy", "--json"))["qos_bps"] == 20 * 1024**2


def test_volume_create_defaults_and_min_size(vbp):
    v = js(vbp("volume", "create", "a", "--size", "1G", "--json"))
    assert (v["replicas"], v["min_size"], v["chunk_size"]) == (3, 2, 4 << 20)
    v = js(vbp("volume", "create", "b", "--size", "1G", "--replicas", "1", "--json"))
    assert v["min_size"] == 1
    v = js(vbp("volume", "create", "c", "--size", "1G", "--replicas", "3", "--min-size", "3", "--json"))
    assert v["min_size"] == 3


def test_host_list_empty_pool(vbp):
    out = js(vbp("host", "list", "--json"))
    assert out["hosts"] == [] and isinstance(out["epoch"], int)
    assert vbp("host", "list").stdout.split()[:2] == ["HOST", "STATE"]


def test_registry_flag_wins_over_environment(vbp, reg_url, tmp_path):
    other = "lmdb://" + str(tmp_path / "other")
    open_registry(other).close()
    vbp("--registry", other, "volume", "create", "only-here", "--size", "1G")
    assert js(vbp("volume", "list", "--json")) == []
    assert [v["name"] for v in js(vbp("volume", "list", "--json", env={"VBP_REGISTRY": other}))] == ["only-here"]


def test_a_clones_parent_gone_or_made_again_is_shown_deleted(vbp):
    """The tables name a clone's parent as "(deleted)" once that snapshot is gone, also
    when a volume of the parent's name is made again (another lineage): the name alone
    would point at an unrelated volume. The JSON keeps the record's field."""
    vbp("volume", "create", "base", "--size", "1G")
    vbp("volume", "snapshot", "base", "s1")
    vbp("volume", "clone", "base@s1", "child")

    def shown() -> tuple[str, str]:
        row = next(line for line in vbp("volume", "list").stdout.splitlines()
                   if line.startswith("child "))
        field = next(line for line in vbp("volume", "show", "child").stdout.splitlines()
                     if line.startswith("parent"))
        return row.rstrip(), field.split(None, 1)[1].strip()

    row, field = shown()
    assert row.endswith(" base@s1") and field == "base@s1"
    vbp("volume", "delete", "base")
    row, field = shown()
    assert row.endswith(" base@s1 (deleted)") and field == "base@s1 (deleted)"
    vbp("volume", "create", "base", "--size", "1G")
    vbp("volume", "snapshot", "base", "s1")  # (the same names, an unrelated volume)
    row, field = shown()
    assert row.endswith(" base@s1 (deleted)") and field == "base@s1 (deleted)"
    assert js(vbp("volume", "show", "child", "--json"))["parent"] == "base@s1"


def test_host_list_puts_an_ipv6_address_in_brackets(vbp, reg_url):
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h6", "::1:7800", "::1:10809"), 60)
    row = next(line for line in vbp("host", "list").stdout.splitlines() if line.startswith("h6"))
    assert row.split()[-2:] == ["[::1]:10809", "[::1]:7800"]


def test_long_names_are_printed_whole(vbp):
    """A name up to 128 characters is printed in full by `list` and `show`, so it can be
    copied from the output even when it is piped (no terminal width)."""
    name = "vm-" + "x" * 100 + "-disk0"
    vbp("volume", "create", name, "--size", "1G")
    assert name in vbp("volume", "list").stdout
    assert name in vbp("volume", "show", name).stdout


# --- errors: one line, the documented exit code ------------------------------------------


@pytest.mark.parametrize("args, code, fragment", [
    (["volume", "show", "nope"], EXIT_NOT_FOUND, "nope"),
    (["volume", "delete", "nope"], EXIT_NOT_FOUND, "nope"),
    (["volume", "resize", "nope", "2G"], EXIT_NOT_FOUND, "nope"),
    (["volume", "snapshot", "nope", "s"], EXIT_NOT_FOUND, "nope"),
    (["volume", "clone", "nope@s", "c"], EXIT_NOT_FOUND, "nope"),
    (["volume", "clone", "a@nosnap", "c"], EXIT_NOT_FOUND, "nosnap"),
    (["volume", "create", "a", "--size", "1G"], EXIT_ERROR, "already exists"),
    (["volume", "create", "b", "--size", "lots"], EXIT_USAGE, "not a size"),
    (["volume", "create", "b", "--size", "0"], EXIT_USAGE, "greater than zero"),
    (["volume", "create", "b", "--size", "1G", "--chunk-size", "3M"], EXIT_USAGE, "power of two"),
    (["volume", "create", "b", "--size", "1G", "--replicas", "2", "--min-size", "3"], EXIT_USAGE, "min-size"),
    (["volume", "create", "bad/name", "--size", "1G"], EXIT_USAGE, "invalid volume name"),
    (["volume", "snapshot", "a", "s1"], EXIT_ERROR, "already has a snapshot"),
    (["volume", "snapshot", "a", "bad@snap"], EXIT_USAGE, "invalid snapshot name"),
    (["volume", "clone", "a", "c"], EXIT_USAGE, "NAME@SNAPSHOT"),
    (["volume", "clone", "a@s1", "a"], EXIT_ERROR, "already exists"),
    (["volume", "resize", "a", "512M"], EXIT_ERROR, "--force"),
    (["volume", "resize", "a", "0"], EXIT_USAGE, "greater than zero"),
    # a volume's limit, 1 EiB, however far past it a size is; a rate's, 8 EiB less one
    (["volume", "resize", "a", "2000P"], EXIT_USAGE, "at most 1152921504606846976 bytes, 1 EiB)"),
    (["volume", "create", "b", "--size", "\uff11G"], EXIT_USAGE, "not a size"),  # (a full-width 1)
    (["volume", "create", "b", "--size", "9E"], EXIT_USAGE, "at most 1152921504606846976 bytes, 1 EiB)"),
    (["volume", "resize", "a", "9E"], EXIT_USAGE, "at most 1152921504606846976 bytes, 1 EiB)"),
    (["volume", "set", "a", "--bps", "9E"], EXIT_USAGE, "at most 9223372036854775807 bytes, 8 EiB less one)"),
    (["volume", "delete", "a@"], EXIT_USAGE, "invalid snapshot name"),
    (["volume", "delete", "a@s1@x"], EXIT_USAGE, "invalid snapshot name"),
    (["volume", "clone", "a@s1@x", "c"], EXIT_USAGE, "invalid snapshot name"),
    (["volume", "resize", "a", "1000000P"], EXIT_USAGE, "size"),
    # (sizes and limits past 64 bits, and numbers of more digits than int() takes)
    (["volume", "set", "a", "--bps", "99999999999999999999999P"], EXIT_USAGE, "too large"),
    (["volume", "create", "b", "--size", "9" * 5000], EXIT_USAGE, "not a size"),
    (["volume", "resize", "a", "9" * 5000], EXIT_USAGE, "not a size"),
    (["volume", "create", "b", "--size", "1G", "--chunk-size", "9" * 5000], EXIT_USAGE, "not a size"),
], ids=lambda x: " ".join(x)[:60] if isinstance(x, list) else None)
def test_errors_are_one_line_with_their_exit_code(vbp, args, code, fragment):
    vbp("volume", "create", "a", "--size", "1G")
    vbp("volume", "snapshot", "a", "s1")
    r = vbp(*args, code=code)
    one_error_line(r, fragment)


def test_delete_a_snapshot_and_a_parent_keeps_the_clone(vbp):
    vbp("volume", "create", "base", "--size", "1G")
    vbp("volume", "snapshot", "base", "s1")
    vbp("volume", "snapshot", "base", "s2")
    vbp("volume", "clone", "base@s1", "child")
    vbp("volume", "delete", "base@s2")
    assert js(vbp("volume", "show", "base", "--json"))["snapshots"] == ["s1"]
    one_error_line(vbp("volume", "delete", "base@s2", code=EXIT_NOT_FOUND), "s2")
    vbp("volume", "delete", "base")
    child = js(vbp("volume", "show", "child", "--json"))
    assert child["parent"] == "base@s1" and child["size"] == GiB
    assert [v["name"] for v in js(vbp("volume", "list", "--json"))] == ["child"]


def test_pool_status_of_an_empty_pool(vbp):
    vbp("volume", "create", "a", "--size", "1G")
    st = js(vbp("pool", "status", "--json"))
    assert (st["hosts"], st["volumes"], st["degraded_chunks"], st["stale_replicas"]) == ([], 1, 0, 0)
    assert "1 volumes" in vbp("pool", "status").stdout


def test_reweighted_and_nearly_full_hosts_are_shown(vbp, reg_url):
    from vbp.cluster import HostRecord

    reg = open_registry(reg_url)
    for i in (1, 2, 3, 4):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2", "h3", "h4"], None)
    reg.set_data_set(1, ["h1", "h2", "h3", "h4"], ["h1", "h2", "h3", "h4"], {"h4": 0.8}, {})
    for h, used in (("h1", 0.3), ("h2", 0.3), ("h3", 0.3), ("h4", 0.91)):
        reg.publish_stats(h, {"capacity": GiB, "used": int(used * GiB), "free": int((1 - used) * GiB),
                              "chunks": 1, "nearfull_ratio": 0.85}, 60)
    hosts = {h["id"]: h for h in js(vbp("host", "list", "--json"))["hosts"]}
    assert hosts["h4"]["reweight"] == 0.8 and hosts["h1"]["reweight"] == 1.0
    lines = vbp("host", "list").stdout.splitlines()
    assert lines[0].split()[:4] == ["HOST", "STATE", "DATA", "REWEIGHT"]
    assert lines[4].split()[:4] == ["h4", "up", "in", "1.00->0.80"]  # the change under way
    st = js(vbp("pool", "status", "--json"))
    assert st["data_set"]["weights"] == {"h4": 0.8} and st["data_set"]["leaving_weights"] == {}
    text = vbp("pool", "status").stdout
    assert "h4 placement weight 0.80" in text
    assert "warning: h4 is above its nearfull threshold (90% used, threshold 85%)" in text
    assert "every host is nearly full" not in text
    reg.set_data_set(2, ["h1", "h2", "h3", "h4"], None, {"h4": 0.8})
    for h in ("h1", "h2", "h3"):
        reg.publish_stats(h, {"capacity": GiB, "used": int(0.9 * GiB), "nearfull_ratio": 0.85}, 60)
    assert vbp("host", "list").stdout.splitlines()[4].split()[3] == "0.80"
    assert "every host is nearly full" in vbp("pool", "status").stdout
    reg.close()


def test_pool_status_warns_of_a_disk_with_less_room_than_the_capacity_leaves(vbp, reg_url):
    """A host's capacity is the operator's word: set above its disk (or the disk filled
    by something else), the pool counted room the disk does not have, and its writes
    failed with ENOSPC while `vbp pool status` showed it mostly free. Each host publishes
    its data directory's free space; less than its capacity leaves is a warning."""
    from vbp.cluster import HostRecord

    reg = open_registry(reg_url)
    for i in (1, 2):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2"], None)
    for h, disk in (("h1", 12 * MiB), ("h2", 5 * GiB)):
        reg.publish_stats(h, {"capacity": GiB, "used": 52 * MiB, "free": GiB - 52 * MiB,
                              "disk_free": disk, "chunks": 13, "nearfull_ratio": 0.85}, 60)
    st = js(vbp("pool", "status", "--json"))
    assert {h["id"]: h["disk_free"] for h in st["hosts"]} == {"h1": 12 * MiB, "h2": 5 * GiB}
    text = vbp("pool", "status").stdout
    assert ("warning: h1's disk has 12 MiB free, less than the 972 MiB its capacity "
            "leaves") in text, text
    assert "h2's disk" not in text
    reg.close()


def test_pool_status_shows_a_down_host_waiting_out_the_controllers_interval(vbp, reg_url):
    import time

    from vbp.cluster import HostRecord
    from vbp.registry.base import P_ALIVE
    from vbp.registry.kv import Delete

    reg = open_registry(reg_url)
    for i in (1, 2, 3, 4):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2", "h3", "h4"], None)
    vbp("volume", "create", "a", "--size", "1G", "--replicas", "3")
    reg.kv.txn([], [Delete(P_ALIVE + b"h3")])
    # a controller of older code (or one that has not published since): no timer to show
    st = js(vbp("pool", "status", "--json"))["data_set"]
    assert st["down_in"] == [{"host": "h3", "kept": False, "drained": False, "interval": None,
                              "down_since": None, "out_in": None}]
    assert "h3 is down, still in the data set" in vbp("pool", "status").stdout
    # h1, the controller, saw it down 90 s ago; h2's stale idea of it does not count
    reg.publish_stats("h1", {"down_out": {"interval": 600.0, "since": {"h3": time.time() - 90}}}, 60)
    reg.publish_stats("h2", {"down_out": {"interval": 5.0, "since": {"h3": 0.0}}}, 60)
    st = js(vbp("pool", "status", "--json"))["data_set"]
    [x] = st["down_in"]
    assert x["interval"] == 600.0 and 505 < x["out_in"] <= 510
    text = vbp("pool", "status").stdout
    assert "h3 is down, still in the data set" in text and "in 8m" in text and "vbp host drain h3" in text
    reg.set_host_state("h3", "draining")
    assert js(vbp("pool", "status", "--json"))["data_set"]["down_in"][0]["drained"]
    assert "h3 is down and drained" in vbp("pool", "status").stdout
    reg.set_host_state("h3", "up")
    reg.kv.txn([], [Delete(P_ALIVE + b"h4")])  # two down of four, replicas 3: both kept
    assert [x["kept"] for x in js(vbp("pool", "status", "--json"))["data_set"]["down_in"]] == [True, True]
    assert "h4 is down and stays in the data set" in vbp("pool", "status").stdout
    reg.close()


@pytest.mark.parametrize("args", [["host", "drain", "h9"], ["host", "undrain", "h9"], ["host", "remove", "h9"],
                                  ["host", "maintenance", "h9", "on"]])
def test_host_commands_on_an_unknown_host_are_not_found(vbp, args):
    one_error_line(vbp(*args, code=EXIT_NOT_FOUND), "h9")


@pytest.mark.parametrize("host_id", ["bad/id", ".h1", "h" * 129, "h1\nlevel=error"])
def test_a_host_id_that_is_no_name_is_bad_usage_not_not_found(vbp, reg_url, host_id):
    """No host can have such an id (blockd refuses it at start): bad usage, exit 2, as a
    bad volume name is; it exited 3 (not found), as a well-formed id of no host does."""
    vbp("volume", "create", "v", "--size", "1G")
    with open_registry(reg_url) as reg:
        from vbp.cluster import HostRecord

        reg.register_host(HostRecord("h1", "127.0.0.1:7800", "127.0.0.1:10809"), 60)
    for args in (["host", "drain", host_id], ["host", "drain", host_id, "--wait"],
                 ["host", "undrain", host_id], ["host", "remove", host_id],
                 ["host", "maintenance", host_id, "on"],
                 ["volume", "import", "/dev/null", "v", "--host", host_id],
                 ["volume", "export", "v", "out.raw", "--host", host_id]):
        one_error_line(vbp(*args, code=EXIT_USAGE), "invalid host name")
    one_error_line(vbp("volume", "export", "v", "out.raw", "--host", "h9", code=EXIT_NOT_FOUND),
                   "no host 'h9' in the pool")


def test_a_host_registered_under_an_id_that_is_no_name_can_still_be_drained(vbp, reg_url):
    """A host registered before blockd checked host ids (or by hand) is found as it is:
    only an id the pool has no host of is judged by its form."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("old host", "a:1", "a:2"), 60)
    assert vbp("host", "drain", "old host").stdout.startswith("host old host is draining")
    vbp("host", "undrain", "old host")


@pytest.mark.parametrize("capacity", ["2000P", "9E"])
def test_a_sandbox_capacity_past_the_limit_is_bad_usage_naming_the_limit(vbp, tmp_path, capacity):
    """2000P passed vbp's parse_size and was refused as the hosts' setting (exit 1, "at
    most 1024 PiB"); 9E was bad usage quoting another limit, 8 EiB."""
    r = vbp("sandbox", "up", "--hosts", "1", "--dir", tmp_path / "sb", "--capacity", capacity,
            code=EXIT_USAGE)
    one_error_line(r, f"Invalid value for '--capacity': size too large: {capacity} (at most "
                      f"1152921504606846976 bytes, 1 EiB)")
    assert not (tmp_path / "sb").exists()


@pytest.mark.parametrize("capacity", ["0", "4K"])
def test_a_sandbox_capacity_below_a_chunk_is_bad_usage_too(vbp, tmp_path, capacity):
    """Below the smallest chunk the hosts' settings check refused it (exit 1, "flag
    --capacity"), where one past the limit was bad usage (exit 2): both are, naming
    --capacity, before anything starts. (Found by a review.)"""
    r = vbp("sandbox", "up", "--hosts", "1", "--dir", tmp_path / "sb", "--capacity", capacity,
            code=EXIT_USAGE)
    one_error_line(r, f"Invalid value for '--capacity': {capacity} is less than the smallest "
                      f"chunk, 1 MiB")
    assert not (tmp_path / "sb").exists()


def test_resize_refused_leaves_the_volume_alone(vbp):
    vbp("volume", "create", "a", "--size", "1G")
    vbp("volume", "resize", "a", "512M", code=EXIT_ERROR)
    vbp("volume", "resize", "a", "2000P", code=EXIT_USAGE)
    assert js(vbp("volume", "show", "a", "--json"))["size"] == GiB


def test_registry_unreachable_is_exit_4(vbp, tmp_path):
    r = vbp("volume", "list", code=EXIT_REGISTRY, env={"VBP_REGISTRY": f"lmdb://{tmp_path}/absent"})
    one_error_line(r, "absent")
    # a directory with no registry in it (a sandbox's own, where its registry is
    # DIR/registry): refused, and left as it was, not made an empty pool
    (tmp_path / "sb").mkdir()
    for args in (("volume", "list"), ("volume", "create", "v", "--size", "1G")):
        r = vbp(*args, code=EXIT_REGISTRY, env={"VBP_REGISTRY": f"lmdb://{tmp_path}/sb"})
        one_error_line(r, "no registry in")
    assert list((tmp_path / "sb").iterdir()) == []
    port = _closed_port()
    r = vbp("volume", "list", code=EXIT_REGISTRY, env={"VBP_REGISTRY": f"etcd://127.0.0.1:{port}"})
    one_error_line(r, f"127.0.0.1:{port}")


def test_no_registry_is_a_usage_error(vbp):
    r = vbp("volume", "list", code=EXIT_USAGE, env={"VBP_REGISTRY": ""})
    assert "VBP_REGISTRY" in r.stderr and "Traceback" not in r.stderr


def test_malformed_registry_url_is_one_line(vbp):
    r = vbp("volume", "list", code=EXIT_USAGE, env={"VBP_REGISTRY": "nonsense"})
    one_error_line(r, "not a registry URL")
    r = vbp("volume", "list", code=EXIT_USAGE, env={"VBP_REGISTRY": "etcd://127.0.0.1:99999"})
    one_error_line(r, "is not HOST:PORT")


@pytest.mark.parametrize("args", [
    ["volume", "bogus"], ["volume", "create", "x"], ["volume", "create", "x", "--size", "1G", "--replicas", "0"],
    ["volume", "show"], ["--no-such-flag"], ["volume", "resize", "a"],
    ["volume", "set", "a", "--iops", "99999999999999999999999"],
    # (a --timeout without --wait was ignored)
    ["pool", "status", "--timeout", "5"], ["host", "drain", "h1", "--timeout", "5"],
])
def test_usage_errors_are_exit_2(vbp, args):
    """click's own usage errors too are one `vbp: error:` line (they were click's usage,
    hint and error, four lines), naming the help to read."""
    r = vbp(*args, code=EXIT_USAGE)
    assert r.stderr.startswith("vbp: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "--help')" in r.stderr and "Traceback" not in r.stderr


def test_version_of_vbp_and_blockd_is_the_installed_package(vbp):
    from importlib.metadata import version

    from blockd.main import main as blockd_main

    want = version("vbp")
    assert vbp("--version").stdout == f"vbp {want}\n"
    r = CliRunner().invoke(blockd_main, ["--version"], prog_name="blockd")
    assert (r.exit_code, r.stdout) == (0, f"blockd {want}\n")


# --- help --------------------------------------------------------------------------------


def all_commands(group: click.Group, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield (*prefix, name), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, (*prefix, name))


COMMANDS = [()] + [path for path, _ in all_commands(main)]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "vbp")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_of_every_command(vbp, path, flag):
    r = vbp(*path, flag)
    assert r.stdout.startswith(f"Usage: vbp {' '.join(path)}".rstrip()), r.stdout[:80]
    cmd = main
    for p in path:
        cmd = cmd.commands[p]
    assert (cmd.help or "").strip(), f"vbp {' '.join(path)} has no help text"
    if cmd.help and "Example" in cmd.help:
        example = cmd.help.split("Example", 1)[1]
        assert example.splitlines()[1].strip() in r.stdout  # the first example line is shown verbatim


def test_top_level_help_shows_examples_and_groups(vbp):
    out = vbp("--help").stdout
    assert "Examples:" in out and "vbp volume create disk1 --size 10G" in out
    for group in ("sandbox", "volume", "host"):
        assert group in out
    out = vbp("volume", "--help").stdout
    for cmd in ("create", "list", "show", "snapshot", "clone", "resize", "delete"):
        assert cmd in out


# --- the real process --------------------------------------------------------------------


def real_vbp(*args, env=None):
    # `-m` from the checkout, not the venv's console script: that one imports the tree the
    # venv was installed from, which need not be this one (a second git worktree)
    cmd = [sys.executable, "-m", "control.cli"]
    e = {k: v for k, v in os.environ.items() if k != "VBP_REGISTRY"}
    e.update(env or {})
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, env=e, timeout=60,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


def test_real_process_json_round_trip(reg_url):
    env = {"VBP_REGISTRY": reg_url}
    p = real_vbp("volume", "create", "d1", "--size", "2G", "--json", env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["size"] == 2 * GiB
    p = real_vbp("--registry", reg_url, "--json", "volume", "list")
    assert p.returncode == 0 and [v["name"] for v in json.loads(p.stdout)] == ["d1"]
    p = real_vbp("volume", "list", env=env)  # human output, piped: no colour codes
    assert p.returncode == 0 and "d1" in p.stdout and "\x1b[" not in p.stdout


@pytest.mark.parametrize("args, code", [
    (["volume", "show", "ghost"], EXIT_NOT_FOUND),
    (["volume", "create", "x", "--size", "huge"], EXIT_USAGE),
    (["volume", "resize", "x", "1000000P"], EXIT_USAGE),
    (["volume", "set", "x", "--bps", "99999999999999999999999P"], EXIT_USAGE),
])
def test_real_process_errors_are_one_line_without_traceback(reg_url, args, code):
    env = {"VBP_REGISTRY": reg_url}
    assert real_vbp("volume", "create", "x", "--size", "1G", env=env).returncode == 0
    p = real_vbp(*args, env=env)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == code, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("vbp: error: ")


def test_real_process_registry_unreachable(tmp_path):
    p = real_vbp("volume", "list", env={"VBP_REGISTRY": f"lmdb://{tmp_path}/absent"})
    assert p.returncode == EXIT_REGISTRY and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def vbp_on_a_terminal(*args, env=None, timeout=30) -> tuple[int, str]:
    """Run the real vbp with stderr on a pseudo-terminal, as an operator at a shell does,
    so that the progress bars (drawn only on a terminal) run; (exit code, all of stderr)."""
    import pty
    import select

    master, slave = pty.openpty()
    e = {k: v for k, v in os.environ.items() if k != "VBP_REGISTRY"}
    e.update({"TERM": "xterm", **(env or {})})
    p = subprocess.Popen([sys.executable, "-m", "control.cli", *map(str, args)], cwd=ROOT, env=e,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:  # read as it comes: a full terminal buffer would block the child
            ready, _, _ = select.select([master], [], [], timeout)
            assert ready, f"vbp {' '.join(map(str, args))}: no end after {timeout}s"
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        return p.wait(timeout), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("args, code, desc", [
    (["pool", "status", "--wait"], 0, "healing"),
    # (no blockd runs to move the data set: the drain times out)
    (["host", "drain", "h1", "--wait", "--timeout", "1"], EXIT_ERROR, "drain h1"),
    (["pool", "scrub", "--timeout", "0.5"], 5, "scrub pool"),
])
def test_wait_progress_bars_on_a_terminal(reg_url, args, code, desc):
    """`host drain --wait` and `pool status --wait` draw a bar of chunks left, `pool scrub`
    one of chunks done out of a total; each must get the callable of its own shape (a
    second helper of the same name once replaced the first: a TypeError on every terminal)."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "127.0.0.1:1", "127.0.0.1:2"), 60)
    rc, err = vbp_on_a_terminal(*args, env={"VBP_REGISTRY": reg_url})
    assert "Traceback" not in err, err[-3000:]
    assert rc == code, err
    assert desc in err  # the bar was drawn


def test_cli_module_defines_each_name_once():
    """A second top-level def of a name silently replaces the first (see above)."""
    import ast
    from collections import Counter

    import control.cli

    tree = ast.parse(Path(control.cli.__file__).read_text())
    names = Counter(n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    assert [n for n, c in names.items() if c > 1] == []


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vbp_commands_in(text: str):
    """(start, end, group, command) of each `vbp GROUP COMMAND` in inline code or at the
    start of a line in a fenced code block; prose mentioning vbp is not a command."""
    import re

    out, offset = [], 0
    for i, part in enumerate(text.split("```")):  # odd parts are fenced code blocks
        pattern = r"(?m)^\s*vbp (\w+) (\w[\w-]*)" if i % 2 else r"`vbp (\w+) (\w[\w-]*)"
        out += [(offset + m.start(), offset + m.end(), *m.groups()) for m in re.finditer(pattern, part)]
        offset += len(part) + 3
    return out


def test_docs_describe_only_commands_that_exist_or_say_planned():
    """docs/ may name a `vbp GROUP COMMAND` that is not built only next to the word planned."""
    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    assert len(vbp_commands_in(guide)) > 10
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        for start, end, group, cmd in vbp_commands_in(text):
            g = main.commands.get(group)
            if isinstance(g, click.Group) and cmd in g.commands:
                continue
            window = text[max(0, start - 300): end + 300]
            assert "planned" in window, f"{doc.name}: `vbp {group} {cmd}` does not exist and is not marked planned"


def test_operator_guide_names_every_command():
    """Every `vbp GROUP COMMAND` that exists is named in docs/operator-guide.md."""
    import re

    guide = (ROOT / "docs" / "operator-guide.md").read_text()
    missing = [f"vbp {name} {cmd}" for name, g in main.commands.items() if isinstance(g, click.Group)
               for cmd in g.commands if not re.search(rf"\bvbp {name} {cmd}\b", guide)]
    assert not missing, f"docs/operator-guide.md does not name {missing}"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_and_completion(shell):
    from tests.conftest import run_vbp

    script = run_vbp("completion", shell).stdout
    assert "_VBP_COMPLETE" in script
    # what the script asks the program when the user presses TAB after `vbp vol`; fish
    # passes the partial word itself as COMP_CWORD, bash and zsh its position
    def ask(words: str) -> str:
        cword = words.split()[-1] if shell == "fish" else str(len(words.split()) - 1)
        env = {"_VBP_COMPLETE": f"{shell}_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
        return run_vbp(env=env).stdout

    got = ask("vbp vol")
    assert "volume" in got and "sandbox" not in got
    got = ask("vbp host d")
    assert "drain" in got and "remove" not in got


def test_completion_completes_volume_snapshot_and_host_names(reg_url, vbp):
    """TAB after a command that takes a volume, NAME@SNAP or a host id lists those of the
    registry (--registry or $VBP_REGISTRY); a registry that is not there completes
    nothing, without an error."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        for i in (1, 2):
            reg.register_host(HostRecord(f"h{i}", "a:1", "a:2"), 600)
        reg.register_host(HostRecord("other", "a:1", "a:2"), 600)
    for name in ("disk1", "disk2", "web"):
        vbp("volume", "create", name, "--size", "1G", "--replicas", "1")
    vbp("volume", "snapshot", "disk1", "monday")
    vbp("volume", "snapshot", "disk1", "tuesday")

    def ask(words: str, registry: str = reg_url) -> list[str]:
        env = {"_VBP_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
               "VBP_REGISTRY": registry}
        r = CliRunner().invoke(main, [], env=env, prog_name="vbp")
        assert r.exit_code == 0 and not r.stderr, (r.stdout, r.stderr)
        return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]

    assert ask("vbp volume show d") == ["disk1", "disk2"]
    assert ask("vbp volume resize ") == ["disk1", "disk2", "web"]
    assert ask("vbp volume delete disk1@") == ["disk1@monday", "disk1@tuesday"]
    assert ask("vbp volume clone disk1@t") == ["disk1@tuesday"]
    assert ask("vbp volume export w") == ["web"]
    assert ask("vbp host drain h") == ["h1", "h2"]
    assert ask("vbp --registry " + reg_url + " host maintenance o", registry="") == ["other"]
    assert ask("vbp volume show d", registry="lmdb:///nonexistent/registry") == []


def test_the_import_summary_says_what_it_zeroed_past_the_files_end():
    """The summary line named the file's data and holes only; zeroing the rest of a
    larger volume (its old contents past the file) was in --json alone."""
    from control.cli import _transfer_summary
    from control.transfer import TransferStats

    stats = TransferStats(bytes_total=3 << 20, bytes_data=2 << 20, bytes_holes=1 << 20,
                          bytes_tail_zeroed=5 << 20, seconds=1.25)
    assert _transfer_summary("imported", stats) == (
        "imported 3 MiB in 1.2s: 2 MiB data, 1 MiB holes or zeroes; the volume zeroed "
        "past the file's end: 5 MiB")
    stats.bytes_tail_zeroed = 0
    assert _transfer_summary("exported", stats).endswith("1 MiB holes or zeroes")


def test_the_everyday_commands_do_not_load_the_data_path(reg_url, vbp):
    """`vbp volume list` and its kin read the registry and print: importing trio (through
    vbp.sockets, for one address formatting function) and the replicator took 0.1 to
    0.2 s of every such command, a TAB's completion included; `vbp pool status` plans
    with the data-set controller's functions and a ClusterView, which came with trio and
    the gateway. A real process each, with the modules it loaded looked at as it exits."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "::1:10809", "::1:10810"), 600)
    vbp("volume", "create", "disk1", "--size", "1G", "--replicas", "1")
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('LOADED', sorted(m for m in sys.modules if m in "
             "('trio', 'replicator.gateway', 'replicator.transport', 'nbd_frontend.server')),"
             " file=sys.stderr))\n"
             "from control.cli import main\n"
             "sys.argv = ['vbp'] + sys.argv[1:]\n"
             "main()\n")
    for args in (["volume", "list"], ["volume", "show", "disk1"], ["host", "list"],
                 ["volume", "create", "disk2", "--size", "1G", "--replicas", "1"],
                 ["volume", "snapshot", "disk1", "s1"], ["volume", "delete", "disk2"],
                 ["pool", "status"], ["--json", "host", "list"]):
        r = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True,
                           env={**os.environ, "VBP_REGISTRY": reg_url}, timeout=60)
        assert r.returncode == 0, (args, r.stderr)
        assert "LOADED []" in r.stderr, (args, r.stderr)
    assert "[::1]:10809" in r.stdout  # (the address, formatted as before)


def test_a_ctrl_c_while_the_command_line_loads_is_one_line_and_exit_130(reg_url):
    """A Ctrl-C in the first tenth of a second of `vbp` (Python importing the command line,
    before VbpGroup.main handles interrupts) printed a KeyboardInterrupt traceback. The
    entry point pyproject.toml declares for `vbp`, in a real process that sends itself
    SIGINT as control.cli starts importing click (a finder that looks on)."""
    import tomllib

    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vbp"]
    module, _, function = entry.partition(":")
    probe = ("import os, signal, sys\n"
             "class Interrupt:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'click' and 'control.cli' in sys.modules:\n"
             "            sys.meta_path.remove(self)\n"
             "            os.kill(os.getpid(), signal.SIGINT)\n"
             "        return None\n"
             "sys.meta_path.insert(0, Interrupt())\n"
             f"from {module} import {function}\n"
             "sys.argv = ['vbp', 'volume', 'list']\n"
             f"{function}()\n"
             "print('not interrupted')\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       env={**os.environ, "VBP_REGISTRY": reg_url}, timeout=60)
    assert (r.returncode, r.stderr, r.stdout) == (130, "vbp: error: interrupted\n", "")


def test_completion_gives_up_on_a_registry_that_does_not_answer():
    """A TAB with an etcd registry whose members take connections and never answer (a
    member partitioned behind a proxy, a machine gone quiet) completes nothing within
    COMPLETION_WAIT; it held the shell for the request timeout of each member, one after
    the other (5 s each, 10 s here). A real `vbp` process, as the shell runs it."""
    from tests.conftest import run_vbp
    from control.cli import COMPLETION_WAIT

    quiet = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # (never accepted)
    try:
        url = "etcd://" + ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in quiet)
        env = {"_VBP_COMPLETE": "bash_complete", "COMP_WORDS": "vbp volume show d",
               "COMP_CWORD": "3", "VBP_REGISTRY": url}
        t0 = time.monotonic()
        r = run_vbp(env=env)
        took = time.monotonic() - t0
    finally:
        for s in quiet:
            s.close()
    assert r.returncode == 0 and r.stdout.strip() == "" and not r.stderr, r
    assert took < COMPLETION_WAIT + 3, took  # (the CLI's own start, on a loaded machine)


def test_bash_completes_name_at_snap_although_at_breaks_its_words(reg_url, vbp):
    """bash splits COMP_WORDS at COMP_WORDBREAKS, '@' among them: `vbp volume delete
    disk1@mo<TAB>` gave vbp the words disk1, @ and mo, and completed nothing; and bash
    replaces only the word from the '@' on. The script's function, run as bash runs it
    (COMP_LINE and COMP_POINT; COMP_WORDS as bash splits them), answers '@monday' there,
    so that the line reads disk1@monday (checked by hand in an interactive bash)."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "a:1", "a:2"), 600)
    vbp("volume", "create", "disk1", "--size", "1G", "--replicas", "1")
    vbp("volume", "snapshot", "disk1", "monday")
    script = vbp("completion", "bash").stdout

    def tab(line: str, words: str) -> list[str]:
        prog = (f'{script}\nCOMP_WORDBREAKS=$\' \\t\\n"\\\'><=;|&(:@\'\nCOMP_LINE={shlex.quote(line)}\n'
                f'COMP_POINT=${{#COMP_LINE}}\nCOMP_WORDS=({words})\n'
                f'COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1))\n_vbp_completion vbp\n'
                f'printf "%s\\n" "${{COMPREPLY[@]}}"\n')
        p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "VBP_REGISTRY": reg_url,
                                "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"})
        assert p.returncode == 0 and not p.stderr, p.stderr
        return [x for x in p.stdout.splitlines() if x]

    assert tab("vbp volume show di", "vbp volume show di") == ["disk1"]
    assert tab("vbp volume delete disk1@mo", "vbp volume delete disk1 @mo") == ["@monday"]
    assert tab("vbp volume delete disk1@", "vbp volume delete disk1 @") == ["@monday"]
    assert tab("vbp volume delete ", "vbp volume delete ''") == ["disk1"]


# --- pool scrub (the whole path with real hosts: tests/faults/test_scrub_faults.py) --------


def test_pool_scrub_with_no_host_up_is_one_error_line(vbp):
    one_error_line(vbp("pool", "scrub", code=EXIT_ERROR), "no host is up")


def test_pool_scrub_of_an_unknown_volume_is_not_found(vbp):
    one_error_line(vbp("pool", "scrub", "--volume", "nope", code=EXIT_NOT_FOUND), "nope")


def test_pool_scrub_reports_hosts_that_never_answer_and_exits_5(vbp, reg_url):
    from vbp.cluster import HostRecord

    reg = open_registry(reg_url)
    reg.register_host(HostRecord("h1", "127.0.0.1:1", "127.0.0.1:2"), 60)
    r = vbp("--json", "pool", "scrub", "--timeout", "0.5", code=5)
    out = js(r)
    assert out["hosts"]["h1"]["state"] == "unfinished" and out["total"]["ok"] is False
    assert reg.scrub_request()["hosts"] == ["h1"]
    # a host's result is shown as it wrote it
    reg.put_scrub_result(out["id"] + 1, "h1", {})  # an unrelated id changes nothing
    r = vbp("pool", "scrub", "--timeout", "0.5", code=5)
    assert "h1" in r.stdout and "NOT CLEAN" in r.stdout


def _leaf_commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _leaf_commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


def test_every_command_help_has_an_example():
    from click.testing import CliRunner

    from control.cli import main

    missing = []
    for path in _leaf_commands(main):
        res = CliRunner().invoke(main, [*path, "--help"])
        assert res.exit_code == 0, (path, res.output)
        if "Example" not in res.output or "vbp " + " ".join(path) not in res.output:
            missing.append(" ".join(path))
    assert not missing, f"--help without an example of the command itself: {missing}"


def test_a_host_registered_with_a_new_capacity_is_shown_until_the_data_set_takes_it_up(vbp, reg_url):
    from vbp.cluster import HostRecord

    reg = open_registry(reg_url)
    for i in (1, 2, 3):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2", "h3"], None)
    assert js(vbp("pool", "status", "--json"))["data_set"]["placement"] == []
    reg.register_host(HostRecord("h3", "a:1", "a:2", pod="p3", capacity=4 * GiB), 60)
    change = js(vbp("pool", "status", "--json"))["data_set"]["placement"]
    assert change == [{"host": "h3", "from": {"capacity": GiB, "zone": "zone0", "pod": "p3"},
                       "to": {"capacity": 4 * GiB, "zone": "zone0", "pod": "p3"}, "pending": True}]
    assert "h3 placed by capacity 1 GiB -> 4 GiB: a change of data set starts" in vbp("pool", "status").stdout
    cmap = reg.cluster_map()
    reg.set_data_set(1, ["h1", "h2", "h3"], ["h1", "h2", "h3"], None, None, None, cmap.placed())
    change = js(vbp("pool", "status", "--json"))["data_set"]["placement"]
    assert [(c["host"], c["to"]["capacity"], c["pending"]) for c in change] == [("h3", 4 * GiB, False)]
    assert "h3 placed by capacity 1 GiB -> 4 GiB: chunks move" in vbp("pool", "status").stdout
    reg.close()


# --- unrecoverable chunks and accept-loss ---------------------------------------------------


def test_accept_loss_arguments_plan_output_and_report(vbp, reg_url):
    from tests.unit.test_api import lost_last_copy

    reg = open_registry(reg_url)
    rec, p, q = lost_last_copy(reg)
    reg.mark_stale(rec.lineage, 5, [q], 1)  # only degraded
    st = js(vbp("pool", "status", "--json"))
    assert [(c["volumes"], c["index"], c["source"], c["reverts"]) for c in st["unrecoverable"]] == [
        (["v"], 3, q, True)]
    text = vbp("pool", "status").stdout
    assert "warning: 1 chunks are unrecoverable" in text
    assert f"v chunk 3: lost with {p}; would revert to {q}'s older copy" in text

    assert "--chunk N (repeatable) or --all" in vbp("volume", "accept-loss", "v", "--yes",
                                                    code=EXIT_USAGE).stderr
    vbp("volume", "accept-loss", "v", "--chunk", "3", "--all", "--yes", code=EXIT_USAGE)
    vbp("volume", "accept-loss", "v", "--chunk", "-1", "--yes", code=EXIT_USAGE)
    one_error_line(vbp("volume", "accept-loss", "nope", "--all", "--yes", code=EXIT_NOT_FOUND), "nope")
    one_error_line(vbp("volume", "accept-loss", "v", "--chunk", "5", "--yes", code=EXIT_ERROR),
                   "chunk 5 of volume v is not unrecoverable", "unrecoverable: 3")
    one_error_line(vbp("volume", "accept-loss", "v", "--chunk", "8", "--yes", code=EXIT_ERROR),
                   "chunks 0 to 7, not 8")
    # without --yes: what it would do, and nothing done
    one_error_line(vbp("volume", "accept-loss", "v", "--chunk", "3", code=EXIT_ERROR),
                   f"3: revert to {q}'s older copy", "--yes")
    assert {r.host_id for r in reg.list_stale(rec.lineage, 3)} == {p, q}

    r = vbp("volume", "accept-loss", "v", "--chunk", "3", "--yes")
    assert f"chunk 3: reverted to the copy on {q} (older than the writes acknowledged last, lost with {p})" in r.stdout
    assert "accepted the loss of 1 chunks of volume v" in r.stdout
    assert {r.host_id for r in reg.list_stale(rec.lineage, 3)} == {p}
    assert "warning: volume v: the loss of 1 chunks was accepted" in vbp("volume", "show", "v").stdout
    assert "1 reverted to an older copy (chunks 3)" in vbp("volume", "show", "v").stdout
    [a] = js(vbp("volume", "show", "v", "--json"))["accepted_losses"]
    assert (a["volume"], a["reverted"], a["zeroed"], a["chunks"]) == ("v", 1, 0, [[3, q, True]])
    st = js(vbp("pool", "status", "--json"))
    assert st["unrecoverable"] == []
    assert [(x["lineage"], x["volumes"], x["reverted"]) for x in st["accepted_losses"]] == [
        (rec.lineage, ["v"], 1)]
    text = vbp("pool", "status").stdout
    assert "unrecoverable" not in text
    assert "warning: volumes v: the loss of 1 chunks was accepted" in text
    assert "nothing to accept" in vbp("volume", "accept-loss", "v", "--all", "--yes").stdout
    reg.close()


def test_accept_loss_json_of_a_chunk_lost_on_every_copy(vbp, reg_url):
    from tests.unit.test_api import lost_last_copy
    from vbp.registry.base import NEVER_CURRENT

    reg = open_registry(reg_url)
    rec, p, q = lost_last_copy(reg)
    reg.mark_stale(rec.lineage, 3, [q], NEVER_CURRENT | 1)
    one_error_line(vbp("volume", "accept-loss", "v", "--all", code=EXIT_ERROR), "3: lost, reads as zeros")
    got = js(vbp("volume", "accept-loss", "v", "--all", "--yes", "--json"))
    assert got["volume"] == "v" and got["reverted"] == [] and got["skipped"] == []
    assert [c["index"] for c in got["zeroed"]] == [3]
    assert "1 lost, reading as zeros (chunks 3)" in vbp("volume", "show", "v").stdout
    reg.close()


def test_a_loss_past_the_listed_chunks_is_counted_and_shown_on_every_clone(vbp, reg_url):
    """The lineage's loss record lists the lowest chunks and counts the others: `vbp
    volume show` of the volume and of a clone says how many, with the listed ones and
    an ellipsis."""
    from replicator.gateway import ClusterView
    from tests.unit.test_api import lost_last_copy
    from vbp.layout import MiB
    from vbp.registry.base import NEVER_CURRENT
    from vbp.volume import CHUNKS_LISTED

    reg = open_registry(reg_url)
    rec, p, q = lost_last_copy(reg)
    reg.update_volume("v", lambda d: {**d, "size": 40 * MiB})
    reg.create_volume("w", {**reg.get_volume("v"), "name": "w", "created": 1.0})
    view = ClusterView(reg.cluster_map())
    for i in range(40):
        a, b = view.replicas(rec.lineage, i, 2)
        reg.mark_stale(rec.lineage, i, [b], 1)
        reg.mark_stale(rec.lineage, i, [a], NEVER_CURRENT | 2)
    assert "accepted the loss of 40 chunks" in vbp("volume", "accept-loss", "v", "--all", "--yes").stdout
    for name in ("v", "w"):
        text = vbp("volume", "show", name).stdout
        assert "the loss of 40 chunks was accepted" in text and "(vbp volume accept-loss v)" in text
        listed = ", ".join(map(str, range(CHUNKS_LISTED)))
        assert f"40 reverted to an older copy (chunks {listed}, ...)" in text
    [a] = js(vbp("volume", "show", "w", "--json"))["accepted_losses"]
    assert (a["reverted"], a["low"], a["high"], len(a["chunks"])) == (40, 0, 39, CHUNKS_LISTED)
    reg.close()


# --- names: exactly the documented characters ----------------------------------------------

NAME_CHARS = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


@pytest.mark.parametrize("args, what", [
    (["volume", "create", "disk1\n", "--size", "1G"], "volume"),
    (["volume", "snapshot", "a", "s2\n"], "snapshot"),
    (["volume", "clone", "a@s1", "c1\n"], "volume"),
], ids=["create", "snapshot", "clone"])
def test_a_name_ending_in_a_newline_is_refused_and_nothing_is_created(vbp, args, what):
    """A regex `$` matches before a final newline: `disk1\\n` was stored as a volume (a
    snapshot, a clone) that no export name, table or script can name."""
    vbp("volume", "create", "a", "--size", "1G")
    vbp("volume", "snapshot", "a", "s1")
    one_error_line(vbp(*args, code=EXIT_USAGE), f"invalid {what} name")
    vols = js(vbp("volume", "list", "--json"))
    assert [v["name"] for v in vols] == ["a"] and vols[0]["snapshots"] == ["s1"]


def test_any_name_is_refused_in_one_line_or_stored_as_given(reg_url):
    """Hypothesis: whatever text a name is, `volume create` stores it as given and only if
    it is made of the documented characters; else one error line, exit 2 (bad usage),
    nothing made."""
    import re

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    runner = CliRunner()
    env = {"VBP_REGISTRY": reg_url}
    names = st.one_of(st.text(min_size=1, max_size=140).filter(lambda s: "\x00" not in s),
                      st.from_regex(NAME_CHARS, fullmatch=True).map(lambda s: s + "\n"),
                      st.from_regex(NAME_CHARS, fullmatch=True))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(names)
    def check(name):
        if name.startswith("-"):
            return  # (an option to click)
        r = runner.invoke(main, ["volume", "create", name, "--size", "1M"], env=env)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        made = [v["name"] for v in json.loads(runner.invoke(main, ["volume", "list", "--json"],
                                                            env=env).stdout)]
        if re.fullmatch(NAME_CHARS, name):
            assert r.exit_code == 0 and name in made, r.stderr
            runner.invoke(main, ["volume", "delete", name], env=env)
        else:
            assert r.exit_code == EXIT_USAGE and name not in made, (name, r.stdout)
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("vbp: error: "), r.stderr

    check()


@pytest.mark.parametrize("args", [
    ["pool", "status", "--wait", "--timeout", "nan"],
    ["pool", "status", "--wait", "--timeout", "-5"],
    ["host", "drain", "h1", "--wait", "--timeout", "nan"],
    ["host", "drain", "h1", "--wait", "--timeout", "-1"],
    ["pool", "scrub", "--timeout", "nan"],
    ["volume", "import", "/etc/hostname", "a", "--timeout", "nan"],
    ["volume", "export", "a", "/tmp/never-written.raw", "--timeout", "nan"],
    ["pool", "scrub", "--timeout", "abc"],
    ["volume", "import", "/etc/hostname", "a", "--timeout", "1O"],
], ids=lambda a: " ".join(a))
def test_a_timeout_that_is_not_a_number_of_seconds_is_a_usage_error(vbp, args):
    """`--timeout nan` passed every check: a deadline of now + nan is never passed, so
    `--wait` and scrub waited for good, and a transfer's poll took int(nan) (ValueError,
    a traceback); a negative --timeout gave up after the first look. Not a number at all,
    the message said "'abc' is not a valid seconds"."""
    vbp("volume", "create", "a", "--size", "1G")
    r = vbp(*args, code=EXIT_USAGE)
    assert "--timeout" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if not args[-1].lstrip("-").isdigit():
        assert f"{args[-1]!r} is not a number of seconds" in r.stderr, r.stderr


def test_pool_status_wait_with_a_nan_timeout_does_not_wait_for_ever(reg_url):
    """The wait the test above refuses: a pool that is not healthy and `--timeout nan`."""
    reg = open_registry(reg_url)
    reg.mark_stale("l1", 0, ["h1"], 1)
    reg.close()
    p = subprocess.run([sys.executable, "-m", "control.cli", "pool", "status", "--wait",
                        "--timeout", "nan"], capture_output=True, text=True, timeout=30,
                       cwd=ROOT, stdin=subprocess.DEVNULL, env={**os.environ, "VBP_REGISTRY": reg_url})
    assert p.returncode == EXIT_USAGE and "Traceback" not in p.stderr, p.stderr


@pytest.mark.parametrize("setting", [f"gc_interval=1{'0' * 400}", "lease_ttl=abc", "hot_chunks=-1",
                                     "foo=1"])
def test_sandbox_up_refuses_a_bad_setting_as_bad_usage_in_one_line(vbp, tmp_path, setting):
    """A --set value no blockd would take is bad usage (exit 2), like an unknown key,
    found before any host starts (it was exit 1, from the first host's start)."""
    r = vbp("sandbox", "up", "--dir", tmp_path / "sb", "--hosts", "1", "--set", setting,
            code=EXIT_USAGE)
    one_error_line(r, setting.partition("=")[0])
    assert not (tmp_path / "sb" / "host1").exists()


@pytest.mark.parametrize("args", [["--size", "1.5.G"], ["--volume", "bad name"], ["--size", "2E"]])
def test_sandbox_run_checks_its_volume_before_any_host_starts(vbp, tmp_path, args):
    """`sandbox run` started its hosts and then refused the volume's size (exit 1, hosts
    left to stop): the volume is bad usage now, found first."""
    r = vbp("sandbox", "run", "--dir", tmp_path / "sb", "--hosts", "1", *args, code=EXIT_USAGE)
    assert r.stderr.startswith("vbp: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "sb").exists()


def test_an_in_process_memory_registry_is_refused(vbp):
    """memory:// (the tests' in-process registry) lives as long as one vbp command: a
    volume created there "succeeded" and was gone at once."""
    r = vbp("volume", "create", "a", "--size", "1G", code=EXIT_USAGE, env={"VBP_REGISTRY": "memory://x"})
    one_error_line(r, "memory://x")


@pytest.mark.parametrize("args", [
    ["volume", "create", "b", "--size", "99999999999999999999\nP"],
    ["volume", "resize", "a", "\n99999999999999999999P\n"],
    ["volume", "set", "a", "--bps", "99999999999999999999 \r\nP"],
], ids=["create", "resize", "set"])
def test_a_size_too_large_with_line_breaks_around_its_unit_is_one_error_line(vbp, args):
    """A size may have white space around its number and unit, line breaks included; the
    "too large" error printed it as given: an error of several lines."""
    vbp("volume", "create", "a", "--size", "1G")
    one_error_line(vbp(*args, code=EXIT_USAGE), "too large")
    assert js(vbp("volume", "show", "a", "--json"))["size"] == GiB


@pytest.mark.parametrize("size", ["1.5", "1.3K", "0.1M"])
def test_a_size_that_is_no_whole_number_of_bytes_is_refused_not_cut(vbp, size):
    """`--size 1.5` made a volume of 1 byte, and `resize a 1.3K` offered 1331 bytes: the
    fraction of a byte was dropped without a word. Refused; 1.5G and 0.5K stay sizes."""
    one_error_line(vbp("volume", "create", "b", "--size", size, code=EXIT_USAGE),
                   "not a whole number of bytes")
    vbp("volume", "create", "a", "--size", "1.5G")
    one_error_line(vbp("volume", "resize", "a", size, code=EXIT_USAGE), "not a whole number of bytes")
    assert js(vbp("volume", "show", "a", "--json"))["size"] == GiB + GiB // 2
    vbp("volume", "create", "c", "--size", "0.5K")
    assert js(vbp("volume", "show", "c", "--json"))["size"] == 512


def test_a_volume_with_more_copies_than_the_pool_has_hosts_is_made_with_a_warning(vbp, reg_url):
    """`vbp volume create` (replicas 3, min 2 by default) in a pool of one host said
    "created" and nothing else: every write to it then failed with EIO (below min size).
    It still creates the volume (hosts may join later, as a Ceph pool may be undersized),
    and says what will happen: writes fail below min size, or chunks get fewer copies."""
    from vbp.cluster import HostRecord

    # (no host yet: a pool being set up)
    assert vbp("volume", "create", "early", "--size", "1G").stderr == ""
    reg = open_registry(reg_url)
    reg.register_host(HostRecord("h1", "127.0.0.1:1", "127.0.0.1:2"), 60)
    r = vbp("volume", "create", "v", "--size", "1G")
    assert "created volume v" in r.stdout
    assert "v needs 2 copies on distinct hosts to take a write" in r.stderr
    assert "writes fail (EIO) until 2 hosts hold chunks" in r.stderr
    reg.register_host(HostRecord("h2", "127.0.0.1:3", "127.0.0.1:4"), 60)
    r = vbp("volume", "create", "w", "--size", "1G", "--json")
    assert js(r)["name"] == "w"
    assert "w's chunks get 2 copies, not 3, until more hosts join" in r.stderr
    vbp("volume", "snapshot", "w", "s")
    assert "c's chunks get 2 copies, not 3" in vbp("volume", "clone", "w@s", "c").stderr
    reg.register_host(HostRecord("h3", "127.0.0.1:5", "127.0.0.1:6"), 60)
    assert vbp("volume", "create", "z", "--size", "1G").stderr == ""
    reg.close()


def test_a_drain_that_cannot_move_anything_says_why(reg_url, vbp):
    """Three hosts and a volume of three replicas: draining one leaves two up, too few for
    its replicas, so the data set keeps it and nothing moves. `host drain` says so, `pool
    status` warns (and lists it in JSON), and a `--wait` that times out names the volume;
    with a fourth host up the note goes."""
    from vbp.cluster import HostRecord

    reg = open_registry(reg_url)
    for i in (1, 2, 3):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 600)
    reg.set_data_set(0, ["h1", "h2", "h3"], None)
    vbp("volume", "create", "big", "--size", "1G", "--replicas", "3")
    vbp("volume", "create", "small", "--size", "1G", "--replicas", "2")
    why = ("volume big (3 replicas) keeps more copies than the 2 other hosts in service (add a "
           "host, or lower the replicas)")
    r = vbp("host", "drain", "h3")
    assert r.stderr == f"note: host h3's chunks stay on it: {why}\n" and "host h3 is draining" in r.stdout
    assert js(vbp("pool", "status", "--json"))["data_set"]["drains_held"] == [
        {"host": "h3", "hosts_counted": 2, "volumes": [{"name": "big", "replicas": 3}],
         "volume_count": 1}]
    assert f"warning: h3 is draining but its chunks stay on it: {why}" in vbp("pool", "status").stdout
    r = vbp("host", "drain", "h3", "--wait", "--timeout", "0.5", code=EXIT_ERROR)
    assert f"note: host h3's chunks stay on it: {why}" in r.stderr
    assert f"still holds placed chunks after 0s: its chunks stay: {why}" in r.stderr
    reg.register_host(HostRecord("h4", "a:1", "a:2", pod="p4", capacity=GiB), 600)
    assert vbp("host", "drain", "h3").stderr == ""
    assert js(vbp("pool", "status", "--json"))["data_set"]["drains_held"] == []
    reg.close()


def test_a_drain_is_held_as_the_controller_holds_it(reg_url, vbp):
    """drains_held follows the controller's rule (wanted_data_set), not a count of its
    own: a down host still in the data set counts when a volume has one replica (its
    only copy may be there), so the drain goes on; without that volume it is held, and
    each volume named says its own replicas."""
    from control import api
    from vbp.cluster import HostRecord
    from vbp.registry.base import P_ALIVE
    from vbp.registry.kv import Delete

    reg = open_registry(reg_url)
    for i in (1, 2, 3, 4):
        reg.register_host(HostRecord(f"h{i}", "a:1", "a:2", pod=f"p{i}", capacity=GiB), 600)
    reg.set_data_set(0, ["h1", "h2", "h3", "h4"], None)
    for name, n in (("big", 3), ("pair", 3), ("one", 1)):
        vbp("volume", "create", name, "--size", "1G", "--replicas", n)
    reg.kv.txn([], [Delete(P_ALIVE + b"h3")])  # h3 down, still in the data set
    reg.set_host_state("h4", "draining")
    assert api.drains_held(reg.cluster_map(), reg.list_volumes()) == []  # h1, h2, h3: three
    vbp("volume", "delete", "one")
    [x] = api.drains_held(reg.cluster_map(), reg.list_volumes())
    assert x["host"] == "h4" and x["hosts_counted"] == 2 and x["volume_count"] == 2
    assert api.drain_held_reason(x).startswith(
        "volumes big (3 replicas), pair (3 replicas) keep more copies than the 2 other hosts")
    reg.close()


def test_drain_notes_when_no_other_host_is_up_and_ctrl_c_says_it_goes_on(reg_url, vbp):
    """Draining the only host up is taken, with a note that its chunks stay until another
    host is up; Ctrl-C on `drain --wait` says the drain goes on (not click's "Aborted!")."""
    import signal

    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "a:1", "a:2"), 600)
    r = vbp("host", "drain", "h1")
    assert "no other host is up" in r.stderr and "host h1 is draining" in r.stdout
    vbp("host", "undrain", "h1")
    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h2", "b:1", "b:2"), 600)
    assert "no other host" not in vbp("host", "drain", "h1").stderr
    # (no blockd runs: nothing moves, the wait goes on until interrupted)
    cmd = [sys.executable, "-m", "control.cli", "host", "drain", "h2", "--wait", "--timeout", "60"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "VBP_REGISTRY": reg_url},
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        time.sleep(2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "vbp: error: interrupted: host h2 stays draining, its chunks moving off as before "
        "(`vbp host undrain h2` stops that)"), err


def test_undrain_of_a_host_that_is_down_says_so(reg_url, vbp):
    """`host undrain` of a host that is down said "host h1 is up" (a review): it is no
    longer draining, and still down."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "a:1", "a:2"), 0.3)
    vbp("host", "drain", "h1")
    time.sleep(0.6)  # (its heartbeat key gone: down)
    r = vbp("host", "undrain", "h1")
    assert r.stdout.startswith("host h1 is no longer draining (it is down)"), r.stdout


def test_a_scrub_names_a_host_of_the_data_set_that_is_down_and_is_not_clean(reg_url, vbp):
    """A host holding copies that is down when the scrub is asked was left out of it: the
    scrub said nothing of it and, the others done, exited 0 with its copies unchecked
    (a review). It is a row of its own, down, and the scrub is not clean."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "a:1", "a:2"), 600)
        reg.register_host(HostRecord("h2", "b:1", "b:2"), 0.3)
        reg.set_data_set(reg.cluster_map().mgen, ["h1", "h2"], None)
    time.sleep(0.6)  # (h2's heartbeat key gone: down)
    r = vbp("--json", "pool", "scrub", "--timeout", "0.5", code=5)
    assert js(r)["hosts"]["h2"] == {"state": "down"}
    r = vbp("pool", "scrub", "--timeout", "0.5", code=5)
    assert "h2 down: its copies were not checked" in r.stdout, r.stdout


# --- one JSON object per host and per volume (control.objects) ------------------------------


def listed_host(vbp, host_id: str) -> dict:
    return next(h for h in js(vbp("host", "list", "--json"))["hosts"] if h["id"] == host_id)


@pytest.fixture
def three_hosts(reg_url):
    """h1 and h6 (an IPv6 address) in the data set; h9 out of it, its heartbeat soon gone."""
    from vbp.cluster import HostRecord

    with open_registry(reg_url) as reg:
        reg.register_host(HostRecord("h1", "10.0.0.1:7800", "10.0.0.1:10809", pod="p1"), 600)
        reg.register_host(HostRecord("h6", "::1:7801", "::1:10810", pod="p6"), 600)
        reg.set_data_set(0, ["h1", "h6"], None)
        reg.register_host(HostRecord("h9", "10.0.0.9:7800", "10.0.0.9:10809", pod="p9"), 0.3)


@pytest.mark.parametrize("args", [
    ["host", "drain", "h6"], ["host", "undrain", "h6"], ["host", "maintenance", "h6", "on"],
    ["host", "drain", "h9", "--wait", "--timeout", "5"], ["host", "remove", "h9"],
], ids=["drain", "undrain", "maintenance", "drain-wait", "remove"])
def test_host_commands_print_the_host_as_host_list_does(vbp, three_hosts, args):
    """Each prints the host's object of `host list` after it (they printed the bare record:
    no `data`, no `reweight`, no addresses); `remove` the one listed just before (it
    printed `host: null`)."""
    if args[1] == "undrain":
        vbp("host", "drain", "h6")
    if args[1] == "remove":
        time.sleep(0.6)  # (h9's heartbeat gone: it counts as stopped, and may be removed)
        before = listed_host(vbp, "h9")
        assert before["state"] == "down" and before["data"] == "out"
    got = js(vbp(*args, "--json"))
    if args[1] == "remove":
        assert got["host"] == before
        assert "h9" not in [h["id"] for h in js(vbp("host", "list", "--json"))["hosts"]]
    else:
        assert got["host"] == listed_host(vbp, args[2])
    assert got["epoch"] == js(vbp("host", "list", "--json"))["epoch"]


def test_host_list_gives_the_addresses_as_a_uri_takes_them(vbp, three_hosts):
    """`nbd` and `peer` as the record holds them (kept), and the addresses every host
    object has: an IPv6 address in brackets, the ports, the NBD URI."""
    h6 = listed_host(vbp, "h6")
    assert (h6["nbd"], h6["nbd_address"], h6["nbd_port"], h6["nbd_uri"]) == (
        "::1:10810", "[::1]:10810", 10810, "nbd://[::1]:10810")
    assert (h6["peer"], h6["peer_address"], h6["peer_port"]) == ("::1:7801", "[::1]:7801", 7801)


def shown_volume(vbp, name: str) -> dict:
    return js(vbp("volume", "show", name, "--json"))


@pytest.fixture
def volume_with_a_loss(vbp, reg_url):
    """Volume v (lineage lin-v) whose chunk 3 was lost on every copy and given up, with a
    snapshot s1."""
    from control.api import gen_counter
    from tests.unit.test_api import lost_last_copy

    with open_registry(reg_url) as reg:
        rec, _p, _q = lost_last_copy(reg)
        reg.next_id(gen_counter(rec.lineage))  # (its head, 1, drawn as create_volume does)
    vbp("volume", "accept-loss", "v", "--chunk", "3", "--yes")
    vbp("volume", "snapshot", "v", "s1")
    assert len(shown_volume(vbp, "v")["accepted_losses"]) == 1


@pytest.mark.parametrize("name, args", [
    ("new", ["volume", "create", "new", "--size", "1G"]),
    ("v", ["volume", "snapshot", "v", "s2"]),
    ("c", ["volume", "clone", "v@s1", "c"]),
    ("v", ["volume", "resize", "v", "16M"]),
    ("v", ["volume", "set", "v", "--iops", "100"]),
], ids=["create", "snapshot", "clone", "resize", "set"])
def test_volume_commands_print_the_volume_as_volume_show_does(vbp, volume_with_a_loss, name, args):
    """Each prints the object `volume show` prints for the volume after it, the accepted
    losses of its lineage that reach it included (they left them out)."""
    got = js(vbp(*args, "--json"))
    assert got == shown_volume(vbp, name)
    assert got["accepted_losses"] == ([] if name == "new" else shown_volume(vbp, "v")["accepted_losses"])


def test_volume_list_prints_each_volume_as_volume_show_does(vbp, volume_with_a_loss):
    vbp("volume", "clone", "v@s1", "c")
    vbp("volume", "create", "new", "--size", "1G")
    listed = js(vbp("volume", "list", "--json"))
    assert [v["name"] for v in listed] == ["c", "new", "v"]
    assert listed == [shown_volume(vbp, v["name"]) for v in listed]


def test_accept_loss_names_the_volumes_lineage_whether_or_not_it_accepts_anything(vbp, reg_url):
    """The answer with nothing to accept had no `lineage` (nor `time`): the same keys as
    one that accepted a loss, the lineage `volume show` gives."""
    from tests.unit.test_api import lost_last_copy

    with open_registry(reg_url) as reg:
        lost_last_copy(reg)
    shown = shown_volume(vbp, "v")
    done = js(vbp("volume", "accept-loss", "v", "--all", "--yes", "--json"))
    nothing = js(vbp("volume", "accept-loss", "v", "--all", "--yes", "--json"))
    assert sorted(nothing) == sorted(done)
    for got in (done, nothing):
        assert (got["volume"], got["lineage"]) == (shown["name"], shown["lineage"])
    assert nothing["time"] is None and done["time"] == shown_volume(vbp, "v")["accepted_losses"][0]["time"]


_CELL = st.text(alphabet=st.sampled_from("abcXYZ019 .-_:/@%()[]日本é"), max_size=14)
_HEADER = st.text(alphabet=st.sampled_from("ABCXYZ "), min_size=1, max_size=10).filter(str.strip)


@given(st.lists(_HEADER, min_size=1, max_size=6).flatmap(lambda header: st.tuples(
    st.just(header), st.lists(st.lists(_CELL, min_size=len(header), max_size=len(header)),
                              max_size=8))))
@settings(max_examples=300, deadline=None)
def test_a_table_is_laid_out_as_rich_lays_it_out(case):
    """`vbp volume list` of 5,000 volumes took 9 s, rich rendering every cell; table() now
    writes the same layout directly. Piped (as here), the lines must be the ones rich
    printed, byte for byte: scripts and the tests read them. Wide characters included.
    (Headers are words, as every table of the CLI has.)"""
    import contextlib
    import io

    from control.cli import _rich_table, table

    header, rows = case
    mine, theirs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(mine):
        table(header, rows)
    with contextlib.redirect_stdout(theirs):
        _rich_table(header, rows, False)
    assert mine.getvalue() == theirs.getvalue()
