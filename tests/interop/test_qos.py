"""Per-volume QoS on a real sandbox: a limited volume stays near its limit (set live)
while another volume served by the same host keeps its throughput. The bounds are the
limit itself (what QoS promises), not a speed claim."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import need

LIMIT = 200


def fio_iops(uri: str, seconds: int = 3) -> float:
    p = subprocess.run(
        [need("fio"), "--name=q", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--iodepth=8", "--size=8M", "--time_based", f"--runtime={seconds}", "--output-format=json"],
        capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout[p.stdout.index("{"):])
    return res["jobs"][0]["write"]["iops"]


def test_limited_volume_stays_near_its_limit(sandbox):
    for v in ("noisy", "quiet"):
        sandbox.vbp("volume", "create", v, "--size", "16M", "--replicas", "1")
    p = sandbox.vbp("volume", "set", "noisy", "--iops", LIMIT, "--json")
    assert json.loads(p.stdout)["qos_iops"] == LIMIT
    limited = fio_iops(sandbox.uri("noisy"))
    free = fio_iops(sandbox.uri("quiet"))
    # 1 s of burst over a 3 s run allows up to 4/3 of the limit
    assert limited <= LIMIT * 1.45, limited
    assert limited >= LIMIT * 0.6, limited
    assert free >= 3 * LIMIT, (free, limited)
    sandbox.vbp("volume", "set", "noisy", "--iops", "0")  # live: back to unlimited
    assert fio_iops(sandbox.uri("noisy")) >= 3 * LIMIT
    p = sandbox.vbp("volume", "set", "noisy", check=False)
    assert p.returncode == 2
