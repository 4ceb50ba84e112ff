"""The walking skeleton end to end: a real 3-host sandbox driven by real NBD clients."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.conftest import need, run_vbp

MiB = 1024 * 1024


def sh(*cmd, timeout=120, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def test_libnbd_binding_importable_from_venv():
    import nbd

    h = nbd.NBD()
    assert h.get_version()  # the libnbd binding, not an unrelated package named nbd
    assert hasattr(h, "aio_pread")


def test_sandbox_status_lists_running_hosts(sandbox):
    p = run_vbp("sandbox", "status", "--dir", sandbox.dir, "--json")
    hosts = json.loads(p.stdout)["hosts"]
    assert [h["id"] for h in hosts] == ["host1", "host2", "host3"]
    assert all(h["alive"] for h in hosts)


def test_sandbox_up_is_idempotent(sandbox):
    before = sandbox.pids()
    info = sandbox.up()
    assert [h["pid"] for h in info["hosts"]] == before


def test_hosts_registered_up(sandbox):
    p = sandbox.vbp("host", "list", "--json")
    hosts = json.loads(p.stdout)["hosts"]
    assert sorted(h["id"] for h in hosts) == ["host1", "host2", "host3"]
    assert {h["state"] for h in hosts} == {"up"}


def test_volume_create_list_show_delete(sandbox):
    sandbox.vbp("volume", "create", "v-crud", "--size", "64M", "--replicas", "1")
    listed = json.loads(sandbox.vbp("volume", "list", "--json").stdout)
    assert "v-crud" in [v["name"] for v in listed]
    shown = json.loads(sandbox.vbp("--json", "volume", "show", "v-crud").stdout)
    assert shown["size"] == 64 * MiB and shown["replicas"] == 1 and shown["chunk_size"] == 4 * MiB
    sandbox.vbp("volume", "delete", "v-crud")
    p = sandbox.vbp("volume", "show", "v-crud", check=False)
    assert p.returncode == 3 and "v-crud" in p.stderr and "Traceback" not in p.stderr


def test_nbdinfo_reports_size(sandbox):
    need("nbdinfo")
    sandbox.vbp("volume", "create", "v-info", "--size", "1G", "--replicas", "1")
    p = sh("nbdinfo", "--json", sandbox.uri("v-info"))
    info = json.loads(p.stdout)
    assert info["exports"][0]["export-size"] == 1024 * MiB


@pytest.mark.parametrize("replicas", [1, 3])
def test_nbdcopy_roundtrip_64m(sandbox, tmp_path, replicas):
    need("nbdcopy")
    name = f"v-copy{replicas}"
    sandbox.vbp("volume", "create", name, "--size", "64M", "--replicas", replicas)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(64 * MiB))
    sh("nbdcopy", src, sandbox.uri(name, 0))
    back = tmp_path / "back.bin"
    sh("nbdcopy", sandbox.uri(name, 1), back)  # read through another host
    assert back.read_bytes() == src.read_bytes()


def test_qemu_img_convert_same_bytes(sandbox, tmp_path):
    need("qemu-img")
    sandbox.vbp("volume", "create", "v-qemu", "--size", "16M", "--replicas", "1")
    src = tmp_path / "src.raw"
    data = os.urandom(16 * MiB)
    src.write_bytes(data)
    sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, sandbox.uri("v-qemu"))
    out = tmp_path / "out.raw"
    sh("qemu-img", "convert", "-f", "raw", "-O", "raw", sandbox.uri("v-qemu", 2), out)
    assert out.read_bytes() == data


def test_two_volumes_keep_data_apart(sandbox):
    import nbd

    for v in ("v-a", "v-b"):
        sandbox.vbp("volume", "create", v, "--size", "8M", "--replicas", "1")
    pattern = {"v-a": b"A" * 4096, "v-b": b"B" * 4096}
    for v, data in pattern.items():
        h = nbd.NBD()
        h.connect_uri(sandbox.uri(v))
        for off in range(0, 8 * MiB, 1 * MiB):
            h.pwrite(data, off)
        h.flush()
        h.shutdown()
    for v, data in pattern.items():
        h = nbd.NBD()
        h.connect_uri(sandbox.uri(v))
        for off in range(0, 8 * MiB, 1 * MiB):
            assert h.pread(4096, off) == data
        h.shutdown()


def test_unknown_volume_gets_nbd_error(sandbox):
    import nbd

    h = nbd.NBD()
    with pytest.raises(nbd.Error):
        h.connect_uri(sandbox.uri("no-such-volume"))
    # the server is still fine
    p = sh("nbdinfo", "--size", sandbox.uri("v-info"))
    assert int(p.stdout) == 1024 * MiB


@pytest.mark.parametrize("args", [
    ["volume", "create", "x"],  # missing --size
    ["volume", "create", "x", "--size", "lots"],
    ["volume", "create", "bad/name", "--size", "1G"],
    ["volume", "create", "x", "--size", "1G", "--chunk-size", "3M"],
    ["volume", "create", "x", "--size", "1G", "--replicas", "9"],
    ["volume", "frobnicate"],
])
def test_bad_cli_arguments_one_clear_line(sandbox, args):
    p = sandbox.vbp(*args, check=False)
    assert p.returncode == 2, p.stderr  # bad usage: click's own refusals and bad values alike
    assert "Traceback" not in p.stderr
    assert p.stderr.strip(), "an error must be said"


@pytest.mark.parametrize("url", ["etcd://127.0.0.1:1", "lmdb:///nonexistent/registry", "nope://x"])
def test_unreachable_registry_one_clear_line(url):
    p = run_vbp("--registry", url, "volume", "list", check=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("vbp: error:"), p.stderr


def test_no_registry_given_is_usage_error():
    p = run_vbp("volume", "list", check=False)
    assert p.returncode == 2 and "VBP_REGISTRY" in p.stderr


def test_sandbox_down_leaves_no_process(tmp_path):
    from tests.conftest import SandboxHandle

    sb = SandboxHandle(tmp_path / "sb", 2)
    sb.up()
    pids = sb.pids()
    assert all(os.path.exists(f"/proc/{p}") for p in pids)
    sb.down()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if _running(p)]
        if not alive:
            break
        time.sleep(0.1)
    assert not [p for p in pids if _running(p)]
    st = json.loads(run_vbp("sandbox", "status", "--dir", sb.dir, "--json").stdout)
    assert not any(h["alive"] for h in st["hosts"])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_metrics_endpoint_counts_requests(tmp_path):
    """blockd serves Prometheus metrics; a scrape shows the NBD requests of a volume, after
    its client is gone too; once the volume is deleted its series go (within gc_interval),
    another volume's stay."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import SandboxHandle, free_port_range

    sb = SandboxHandle(tmp_path / "sb", 1)
    # the metrics port with the host's two, from one free range: picked apart, it could be
    # one of them
    sb.base_port = free_port_range(3)
    mport = sb.base_port + 2
    run_vbp("sandbox", "up", "--hosts", 1, "--dir", sb.dir, "--base-port", sb.base_port,
            "--set", f"metrics=127.0.0.1:{mport}", "--set", "gc_interval=0.5")
    try:
        sb.info = json.loads(run_vbp("sandbox", "status", "--dir", sb.dir, "--json").stdout)
        import nbd

        for name in ("m", "keep"):
            sb.vbp("volume", "create", name, "--size", "8M", "--replicas", "1")
            h = nbd.NBD()
            h.connect_uri(sb.uri(name))
            for i in range(10):
                h.pwrite(b"x" * 4096, i * 4096)
            h.pread(8192, 0)
            h.shutdown()

        def scrape() -> dict:
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for fam in text_string_to_metric_families(text) for s in fam.samples}

        samples = scrape()
        writes = samples.get(("vbp_nbd_requests_total", (("op", "write"), ("volume", "m"))))
        assert writes == 10, [k for k in samples if k[0].startswith("vbp_nbd")]
        assert samples[("vbp_nbd_bytes_total", (("op", "write"), ("volume", "m")))] == 40960
        assert samples[("vbp_up", ())] == 1
        deadline = time.monotonic() + 10  # (the clients gone: their connections hold nothing)
        while samples[("vbp_nbd_held_bytes", ())] != 0:
            assert time.monotonic() < deadline, samples[("vbp_nbd_held_bytes", ())]
            time.sleep(0.2)
            samples = scrape()
        sb.vbp("volume", "delete", "m")
        deadline = time.monotonic() + 30
        while any(dict(labels).get("volume") == "m" for _, labels in samples):
            assert time.monotonic() < deadline, "the deleted volume's series stayed"
            time.sleep(0.2)
            samples = scrape()
        # the pass that dropped "m" ran after "keep" was closed: a closed volume keeps its
        # series
        assert samples[("vbp_nbd_requests_total", (("op", "write"), ("volume", "keep")))] == 10
    finally:
        sb.down()
