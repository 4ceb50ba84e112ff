"""`python -m bench --congestion NAME` runs with the host's TCP congestion control set to
NAME and sets it back after. It changes a setting of the whole host, so it runs with the
tests of real processes, one at a time (Makefile), never beside tests that read it
(tests/unit/test_tcp_congestion.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

CC = Path("/proc/sys/net/ipv4/tcp_congestion_control")


def test_a_run_under_another_congestion_control_sets_the_hosts_back_after(tmp_path):
    host_cc = CC.read_text().strip()
    offered = CC.with_name("tcp_available_congestion_control").read_text().split()
    other = next(a for a in offered if a != host_cc)
    cmd = [sys.executable, "-m", "bench", "--quick", "--targets", "qemu-nbd,vbp-r1",
           "--workloads", "randread-4k-qd32", "--runtime", "1", "--out", str(tmp_path),
           "--no-latest", "--prefill", "fio", "--congestion", other]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert CC.read_text().strip() == host_cc  # (set back, however the run went)
    assert p.returncode == 0, p.stderr[-2000:]
    [path] = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    assert result["errors"] == [] and result["meta"]["tcp_congestion"] == other
    md = path.with_suffix(".md").read_text()
    assert f"TCP congestion control of the host: {other}," in md
    if other != "cubic":  # (the goals table says the references ran under another)
        assert f"The references ran under {other}, vbp under cubic" in md
