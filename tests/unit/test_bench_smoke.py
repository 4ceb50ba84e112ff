"""The benchmark harness (bench/) must not rot: a tiny real run against qemu-nbd and a
1-host vbp sandbox produces a result JSON with ratios, and the report arithmetic is checked
on fixed numbers. Nothing here asserts on speed."""

from __future__ import annotations

import json
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import against, harness, report
from bench.profiling import top_from_collapsed
from bench.workloads import parse_fio

ROOT = Path(__file__).resolve().parents[2]


def test_interleaved_alternates_references_and_vbp():
    assert harness.interleaved(["qemu-nbd", "nbdkit", "vbp-r1", "vbp-r3"]) == \
        ["qemu-nbd", "vbp-r1", "nbdkit", "vbp-r3"]
    assert harness.interleaved(["vbp-r1"]) == ["vbp-r1"]


def test_medians_ratios_and_goals():
    rounds = {"qemu-nbd": [{"iops": 100.0, "mib_s": 1.0, "p50_us": 10.0, "p99_us": 40.0},
                           {"iops": 300.0, "mib_s": 3.0, "p50_us": 30.0, "p99_us": None},
                           {"iops": 200.0, "mib_s": 2.0, "p50_us": 20.0, "p99_us": 20.0}],
              "nbdkit": [{"iops": 400.0, "mib_s": 4.0, "p50_us": 5.0, "p99_us": 10.0}],
              "vbp-r3": [{"iops": 200.0, "mib_s": 2.0, "p50_us": 40.0, "p99_us": 60.0}]}
    med = {"randwrite-4k-qd32": {t: report.median_record(r) for t, r in rounds.items()}}
    assert med["randwrite-4k-qd32"]["qemu-nbd"] == {"iops": 200.0, "mib_s": 2.0, "p50_us": 20.0,
                                                    "p99_us": 30.0}
    rat = report.ratios(med)["randwrite-4k-qd32"]["vbp-r3"]
    assert rat["qemu-nbd"]["iops"] == 1.0 and rat["nbdkit"]["iops"] == 0.5
    assert rat["qemu-nbd"]["p99_us"] == 2.0
    goals = {g["goal"]: g for g in report.goals(med)}
    g = goals["replicas=3: 4K random write QD32 >= 1.0x qemu-nbd"]
    assert g["status"] == "PASS" and g["ratio"] == 1.0
    assert all(g["status"] == "n/a" for text, g in goals.items() if "replicas=1" in text)


def test_parse_fio_mixed_job():
    side = lambda n, iops, p50: {"total_ios": n, "iops": iops, "bw_bytes": iops * 4096,  # noqa: E731
                                 "clat_ns": {"percentile": {"50.000000": p50, "99.000000": 2 * p50}}}
    doc = {"jobs": [{"jobname": "x", "error": 0, "job_runtime": 2000,
                     "read": side(700, 350.0, 1000), "write": side(300, 150.0, 3000)}]}
    rec = parse_fio(doc)
    assert rec["iops"] == 500.0 and rec["ios"] == 1000 and rec["seconds"] == 2.0
    assert rec["p50_us"] == 1.0 and rec["w_p99_us"] == 6.0


def test_parse_fio_job_beside():
    """read-beside-flush: the record is the reader's, with its p99.9 and the writer's
    throughput and flush latency apart (nothing of the writer mixed into the IOPS)."""
    pct = lambda p50: {"50.000000": p50, "99.000000": 2 * p50, "99.900000": 9 * p50}  # noqa: E731
    none = {"total_ios": 0, "iops": 0.0, "bw_bytes": 0}
    reader = {"jobname": "read-beside-flush", "error": 0, "job_runtime": 5000,
              "read": {"total_ios": 5000, "iops": 1000.0, "bw_bytes": 4096000,
                       "clat_ns": {"percentile": pct(100_000)}}, "write": none}
    writer = {"jobname": "beside", "error": 0, "job_runtime": 5000, "read": none,
              "write": {"total_ios": 10, "iops": 2.0, "bw_bytes": 2 << 20,
                        "clat_ns": {"percentile": pct(1_000_000)}},
              "sync": {"total_ios": 1, "lat_ns": {"percentile": pct(30_000_000)}}}
    rec = parse_fio({"jobs": [reader, writer]})
    assert rec["iops"] == 1000.0 and rec["ios"] == 5000
    assert rec["p99_us"] == 200.0 and rec["p999_us"] == 900.0
    assert rec["beside_mib_s"] == 2.0 and rec["beside_sync_p99_us"] == 60_000.0
    assert "sync_p99_us" not in rec
    md = report.markdown({"meta": {"date": "d", "commit": "c", "rounds": 1, "runtime": 5,
                                   "size": 1 << 30, "nproc": 2, "loadavg_before": "0",
                                   "loadavg_after": "0", "r1_hosts": 1,
                                   "targets": ["qemu-nbd", "vbp-r1"], "tools": {}, "command": "x"},
                          "medians": {"read-beside-flush": {"qemu-nbd": rec, "vbp-r1": rec}},
                          "ratios": {}})
    assert "| read-beside-flush | vbp-r1 | 200.0 | 900.0 | 2.0 | 60000.0 |" in md


def test_top_from_collapsed():
    own, incl, total = top_from_collapsed("main;a;b 3\nmain;a 1\nmain;c;b 2\n")
    assert total == 6
    assert own[0] == ("b", 5)
    assert dict(incl)["a"] == 4 and dict(incl)["main"] == 6


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("fio", "nbdcopy", "qemu-nbd")),
                    reason="needs fio, nbdcopy and qemu-nbd (make deps-test)")
# fio prefill: this checks the harness, not vbp's handling of nbdcopy (tests/interop/ does)
def test_quick_run_writes_result_with_ratios(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--targets", "qemu-nbd,vbp-r1",
           "--workloads", "randread-4k-qd32", "--runtime", "1", "--out", str(tmp_path),
           "--no-latest", "--prefill", "fio"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["errors"] == []
    ratio = result["ratios"]["randread-4k-qd32"]["vbp-r1"]["qemu-nbd"]["iops"]
    assert isinstance(ratio, float) and ratio > 0
    for t in ("qemu-nbd", "vbp-r1"):  # the whole machine's CPU per IO, and the kernel's part
        rec = result["medians"]["randread-4k-qd32"][t]
        assert 0 < rec["kernel_us_per_io"] < rec["machine_us_per_io"]
    assert "machine CPU µs/IO (kernel)" in path.with_suffix(".md").read_text()
    assert {g["status"] for g in result["goals"]} <= {"PASS", "SHORT", "n/a"}
    assert path.with_suffix(".md").exists()
    assert not (tmp_path / "latest.md").exists()
    with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
        host_cc = f.read().strip()
    assert result["meta"]["tcp_congestion"] == host_cc
    assert f"TCP congestion control of the host: {host_cc}," in path.with_suffix(".md").read_text()


def test_host_congestion_is_set_for_the_run_and_back_after(tmp_path):
    path = tmp_path / "tcp_congestion_control"
    path.write_text("bbr\n")
    (tmp_path / "tcp_available_congestion_control").write_text("reno bbr cubic\n")
    with harness.host_congestion("cubic", path):
        assert path.read_text() == "cubic\n"
    assert path.read_text() == "bbr\n"
    with pytest.raises(KeyError), harness.host_congestion("cubic", path):
        assert path.read_text() == "cubic\n"
        raise KeyError("the run failed")
    assert path.read_text() == "bbr\n"  # set back however the run ends
    with harness.host_congestion(None, path):  # (no --congestion: left alone)
        assert path.read_text() == "bbr\n"
    with pytest.raises(RuntimeError, match="cannot read"):
        with harness.host_congestion("cubic", tmp_path / "missing"):
            pass
    # the kernel refuses an algorithm it does not have: a clear error, nothing changed
    real = harness.CONGESTION
    before = real.read_text()
    with pytest.raises(RuntimeError, match=r"to 'no-such-cc' .*available: .*cubic"):
        with harness.host_congestion("no-such-cc"):
            pass
    assert real.read_text() == before


def test_recovery_bench_tiny_run():
    """bench.recovery end to end on a tiny volume: both rows, every figure present."""
    p = subprocess.run([sys.executable, "-m", "bench.recovery", "--size", "24M", "--rate", "4M",
                        "--runtime", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(p.stderr[p.stderr.index("["):])
    assert [r["rate"] for r in rows] == ["4M", "0"]
    for r in rows:
        assert r["idle_iops"] > 0 and r["busy_iops"] > 0 and r["ratio"] is not None
        assert r["copied_bytes"] > 0  # the drain copied the drained host's chunks


def test_tls_bench_runs():
    """bench.tls_bench end to end, tiny: both servers, in the clear and over TLS, give a
    number for each cell of the table."""
    p = subprocess.run([sys.executable, "-m", "bench.tls_bench", "--size", "32M", "--runtime",
                        "1", "--rounds", "1", "--workloads", "randread-4k-qd32"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    row = [line for line in p.stdout.splitlines() if line.startswith("| randread-4k-qd32")]
    assert row, p.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert len(cells) == 9 and all(re.fullmatch(r"[\d,.]+x?", c) for c in cells[2:]), cells
    assert "vbp-r1" in p.stdout and "nbdkit" in p.stdout


def test_registry_load_bench_runs():
    """bench.registry_load end to end on a private etcd, two hosts for a second: the
    figures printed, and a heartbeat's requests counted (no speed asserted)."""
    p = subprocess.run([sys.executable, "-m", "bench.registry_load", "--hosts", "2",
                        "--period", "0.2", "--seconds", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"2 hosts, .* events/s on a watch .* raft proposals/s; requests a "
                     r"heartbeat: .*kv/txn 1\.00", p.stdout), p.stdout


def test_metrics_bench_runs():
    """bench.metrics_bench end to end with few calls: both figures printed."""
    p = subprocess.run([sys.executable, "-m", "bench.metrics_bench", "--calls", "200"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert ("bound counters" in p.stdout and "Metrics.observe:" in p.stdout
            and "a call doing nothing:" in p.stdout), p.stdout


@pytest.mark.parametrize("flags", [[], ["--checksums"], ["--checksums", "--threads"],
                                   ["--checksums", "--splice"]])
def test_the_bare_server_serves_what_it_was_given(tmp_path, flags):
    """bench/bare_server.py (the py-bare targets): libnbd writes and reads back, with
    many requests in flight, and the file holds what was written."""
    import random
    import socket

    import nbd

    from bench.targets import free_port_range, wait_port

    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(8 << 20))
    port = free_port_range(1)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_server.py"), "--port",
                             str(port), str(image), *flags])
    try:
        wait_port(port, proc)
        h = nbd.NBD()
        h.connect_uri(f"nbd://127.0.0.1:{port}/any")
        assert h.get_size() == 8 << 20
        # 200 4K blocks below the large write, all in flight at once
        blocks = {i * 4096: random.randbytes(4096) for i in random.sample(range(1024), 200)}
        for off, data in blocks.items():
            h.aio_pwrite(data, off)
        while h.aio_in_flight():
            h.poll(-1)
        big = random.randbytes(1 << 20)
        h.pwrite(big, 4 << 20)  # a large write too
        bigger = random.randbytes(2 << 20)  # (more than a --threads pool buffer holds)
        h.pwrite(bigger, 6 << 20, nbd.CMD_FLAG_FUA)
        h.flush()
        reads = {off: nbd.Buffer(4096) for off in blocks}  # reads in flight too
        for off, buf in reads.items():
            h.aio_pread(buf, off)
        while h.aio_in_flight():
            h.poll(-1)
        assert all(buf.to_bytearray() == blocks[off] for off, buf in reads.items())
        assert h.pread(1 << 20, 4 << 20) == big
        assert h.pread(2 << 20, 6 << 20) == bigger
        h.shutdown()
        raw = image.read_bytes()
        assert all(raw[off:off + 4096] == data for off, data in blocks.items())
        assert raw[4 << 20:5 << 20] == big and raw[6 << 20:] == bigger
    finally:
        proc.kill()
        proc.wait()
    with socket.socket() as s:  # no listener left on the port (a closed connection of
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # it may be in TIME_WAIT)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_fua_beside_bench_runs():
    """bench.fua_beside end to end, tiny: a FUA write and the reads beside it measured."""
    p = subprocess.run([sys.executable, "-m", "bench.fua_beside", "--mib", "4", "--rounds", "1",
                        "--json"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    [r] = json.loads(p.stdout)
    assert r["fua_ms"] > 0 and r["reads"] > 0 and r["longest_read_ms"] > 0


def test_round_order_keeps_each_target_beside_its_twin_and_alternates_them():
    """--against: a vbp target and its twin from the other code run one right after the
    other, each first every other round; the rotation moves whole units, and without twins
    the order is the plain rotation it always was."""
    names = ["qemu-nbd", "nbdkit", "vbp-r1", "vbp-r3", "vbp-r1@abc", "vbp-r3@abc"]
    units = harness.interleaved_units(names)
    assert units == [["qemu-nbd"], ["vbp-r1", "vbp-r1@abc"], ["nbdkit"], ["vbp-r3", "vbp-r3@abc"]]
    assert harness.interleaved(names) == [n for u in units for n in u]
    assert harness.round_order(units, 0) == ["qemu-nbd", "vbp-r1", "vbp-r1@abc", "nbdkit",
                                             "vbp-r3", "vbp-r3@abc"]
    assert harness.round_order(units, 1) == ["vbp-r1@abc", "vbp-r1", "nbdkit", "vbp-r3@abc",
                                             "vbp-r3", "qemu-nbd"]
    plain = harness.interleaved_units(["qemu-nbd", "nbdkit", "vbp-r1", "vbp-r3"])
    order = [u[0] for u in plain]
    for rnd in range(5):
        k = rnd % len(order)
        assert harness.round_order(plain, rnd) == order[k:] + order[:k]
    assert harness.interleaved_units(["vbp-r3@abc"]) == [["vbp-r3@abc"]]


def test_against_ratios_and_their_report_section():
    med = {"randwrite-4k-qd32": {
        "qemu-nbd": {"iops": 100.0, "mib_s": 0.4, "p50_us": 10.0, "p99_us": 40.0},
        "vbp-r3": {"iops": 110.0, "mib_s": 0.44, "p50_us": 9.0, "p99_us": 30.0,
                   "cpu_us_per_io": 90.0},
        "vbp-r3@abc": {"iops": 100.0, "mib_s": 0.4, "p50_us": 10.0, "p99_us": 40.0,
                       "cpu_us_per_io": 100.0}}}
    rat = report.against_ratios(med, "abc")
    assert list(rat["randwrite-4k-qd32"]) == ["vbp-r3"]
    r = rat["randwrite-4k-qd32"]["vbp-r3"]
    assert r["iops"] == pytest.approx(1.1) and r["p99_us"] == 0.75
    assert r["cpu_us_per_io"] == 0.9 and r["cpu_us_per_mib"] is None
    result = {"meta": {"date": "d", "commit": "new", "rounds": 1, "runtime": 1, "size": 1 << 20,
                       "nproc": 2, "loadavg_before": "", "loadavg_after": "", "r1_hosts": 1,
                       "targets": ["qemu-nbd", "vbp-r3", "vbp-r3@abc"], "tools": {},
                       "command": "c", "against": {"rev": "HEAD~1", "commit": "abc0",
                                                   "label": "abc"}},
              "medians": med, "ratios": report.ratios(med), "goals": [], "against": rat}
    md = report.markdown(result)
    assert "## This code (new) against abc (`--against HEAD~1`)" in md
    assert "(this code first in 1 of 1)" in md
    assert [against.first_rounds(n) for n in (1, 2, 3, 4, 5)] == [1, 1, 2, 2, 3]
    assert "| randwrite-4k-qd32 | vbp-r3 | IOPS | 110 | 100 | 1.10x | 0.75x | 0.90x |" in md


def test_against_refuses_runs_it_cannot_compare_and_leaves_twins_out_of_vbp_ops(monkeypatch):
    """--against with no vbp target, or with --profile, is a usage error before anything
    starts; the snapshot and copy-up figures are this code's only (a twin's cluster runs
    the other code, and this code's CLI and API would drive it)."""
    with pytest.raises(ValueError, match="needs a vbp target"):
        harness.run(harness.Config(targets=["qemu-nbd"], workloads=["randread-4k-qd32"],
                                   against="HEAD"))
    p = subprocess.run([sys.executable, "-m", "bench", "--profile", "randwrite-4k-qd32",
                        "--against", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "--against does not apply to --profile" in p.stderr
    seen = []
    monkeypatch.setattr(harness.vbp_ops, "copyup_bench",
                        lambda t, chunks, rounds: seen.append(t.name) or {})
    targets = {}
    for name in ("vbp-r1", "vbp-r1@abc"):
        t = object.__new__(harness.VbpTarget)
        t.name = name
        targets[name] = t
    out = harness.run_vbp_ops(harness.Config(snap_targets=[]), targets)
    assert seen == ["vbp-r1"] and list(out) == ["vbp-r1"]


def test_against_runs_the_sandbox_from_the_other_commits_code(tmp_path):
    """The twin's sandbox runs the code of the commit named, not this work tree's: its
    blockd runs in that tree and has that tree's C extension loaded (built there)."""
    from bench import against
    from bench.targets import VbpSandbox

    with pytest.raises(ValueError, match="no such commit"):
        against.resolve("no-such-revision-here")
    commit = against.resolve("HEAD")
    src = against.checkout(commit, tmp_path)
    [ext] = (src / "vbp").glob("_pagesums*.so")
    assert (src / "blockd" / "main.py").exists() and not (src / ".git").exists()
    with VbpSandbox(tmp_path, 1, capacity="1G", code=src) as sb:
        sb.start()
        [pid] = sb.pids()
        assert Path(f"/proc/{pid}/cwd").resolve() == src.resolve()
        assert str(ext.resolve()) in Path(f"/proc/{pid}/maps").read_text()
        uri = sb.create_volume("v", 1 << 20, 1)
    assert uri.endswith("/v")


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("fio", "nbdcopy")),
                    reason="needs fio and nbdcopy (make deps-test)")
def test_quick_run_against_a_commit_reports_both_codes(tmp_path):
    cmd = [sys.executable, "-m", "bench", "--quick", "--targets", "vbp-r1", "--workloads",
           "randwrite-4k-qd32", "--runtime", "1", "--rounds", "2", "--out", str(tmp_path),
           "--no-latest", "--prefill", "fio", "--against", "HEAD"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    label = result["meta"]["against"]["label"]
    assert result["errors"] == [] and result["meta"]["targets"] == ["vbp-r1", f"vbp-r1@{label}"]
    assert [len(result["rounds"]["randwrite-4k-qd32"][t]) for t in result["meta"]["targets"]] == [2, 2]
    ratio = result["against"]["randwrite-4k-qd32"]["vbp-r1"]["iops"]
    assert isinstance(ratio, float) and ratio > 0
    assert f"against {label} (`--against HEAD`)" in path.with_suffix(".md").read_text()
    bad = subprocess.run([*cmd[:-1], "no-such-revision-here"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "no such commit" in bad.stderr


def test_block_status_bench_runs_and_every_target_maps_the_same_pages():
    """bench.block_status end to end, small: each target maps the whole device, and
    vbp's maps (replicas 1 and 3 on three hosts) show as many data extents as qemu-nbd's
    and nbdkit's of a raw file with the same pages written, one each."""
    p = subprocess.run([sys.executable, "-m", "bench.block_status", "--size-gib", "8",
                        "--pages", "12", "--request-mib", "512", "--rounds", "1"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    for name in ("qemu-nbd", "nbdkit", "vbp-r1", "vbp-r3"):
        assert re.search(rf"round 0 {name} +\d+ requests .* 12 data extents", p.stdout), p.stdout
    assert re.search(r"median vbp-r3 / qemu-nbd: [\d.]+x", p.stdout), p.stdout

