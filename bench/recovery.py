"""Client I/O while the pool heals: `python -m bench.recovery`.

A 4-host sandbox holds a replicas=3 volume filled with data. fio (nbd engine, 4K random
70/30 read/write, QD8) measures the client's IOPS with nothing else going on, then again
while a host is drained (every chunk it holds is copied to another host: recovery,
drain and rebalance are the same copy), once with blockd's `recovery_rate` limit and once
unlimited. The figure is the ratio of the IOPS during the copy to the unloaded IOPS, in
the same run (issue goal: at least 0.70 with the limit). Also reported: how long the
drain took and how many bytes were copied.

    python -m bench.recovery [--size 512M] [--rate 16M] [--runtime 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.targets import VENV_BIN, free_port_range
from bench.workloads import make_data_file, parse_fio


def vbp(registry: str, *args: str, timeout: float = 600.0) -> dict | str:
    p = subprocess.run([str(VENV_BIN / "vbp"), "--registry", registry, *args], capture_output=True,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"vbp {' '.join(args)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout) if "--json" in args else p.stdout


def fio(uri: str, size: int, runtime: float, out: Path) -> dict:
    cmd = ["fio", "--name=client", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
           "--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=8", "--time_based",
           f"--runtime={runtime}", "--output-format=json", f"--output={out}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=runtime + 120)
    return parse_fio(json.loads(out.read_text()))


def iops(rec: dict) -> float:
    return rec["iops"]


def one_run(tmp: Path, size: int, rate: str, runtime: float, data: Path) -> dict:
    sdir = tmp / f"sb-{rate}"
    registry = f"lmdb://{sdir / 'registry'}"
    base = free_port_range(8)
    up = [str(VENV_BIN / "vbp"), "sandbox", "up", "--hosts", "4", "--dir", str(sdir), "--base-port",
          str(base), "--capacity", "8G", "--json", "--set", f"recovery_rate={rate}",
          "--set", "gc_interval=2"]
    info = json.loads(subprocess.run(up, check=True, capture_output=True, text=True, timeout=120).stdout)
    try:
        vbp(registry, "volume", "create", "v", "--size", str(size), "--replicas", "3", "--min-size", "2")
        uri = f"{info['hosts'][0]['nbd']}/v"
        subprocess.run(["nbdcopy", str(data), uri], check=True, timeout=900)
        idle = fio(uri, size, runtime, tmp / f"idle-{rate}.json")
        before = {h["id"]: h["resync_bytes"] or 0 for h in vbp(registry, "pool", "status", "--json")["hosts"]}
        t0 = time.monotonic()
        drain = subprocess.Popen([str(VENV_BIN / "vbp"), "--registry", registry, "host", "drain", "host4",
                                  "--wait", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)  # the controller starts the change within a second
        busy = fio(uri, size, runtime, tmp / f"busy-{rate}.json")
        busy_done = drain.poll() is None  # the copy was still running when fio ended
        drain.communicate(timeout=900)
        took = time.monotonic() - t0
        time.sleep(2.5)  # one heartbeat publishes the final resync counters
        after = {h["id"]: h["resync_bytes"] or 0 for h in vbp(registry, "pool", "status", "--json")["hosts"]}
        return {"rate": rate, "idle_iops": iops(idle), "busy_iops": iops(busy),
                "ratio": iops(busy) / iops(idle) if iops(idle) else None,
                "copy_outlasted_fio": busy_done, "drain_seconds": round(took, 1),
                "copied_bytes": sum(after.values()) - sum(before.values()),
                "idle_p99_us": idle.get("p99_us"), "busy_p99_us": busy.get("p99_us")}
    finally:
        subprocess.run([str(VENV_BIN / "vbp"), "sandbox", "down", "--dir", str(sdir)], capture_output=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="512M")
    p.add_argument("--rate", default="16M", help="recovery_rate of the limited run")
    p.add_argument("--runtime", type=float, default=8.0)
    a = p.parse_args(argv)
    from vbp.layout import parse_size

    size = parse_size(a.size)
    with tempfile.TemporaryDirectory(prefix="vbp-bench-recovery-") as t:
        tmp = Path(t)
        data = make_data_file(tmp / "data.bin", size)
        rows = [one_run(tmp, size, rate, a.runtime, data) for rate in (a.rate, "0")]
    print("| recovery_rate | idle IOPS | IOPS while draining | ratio | copy outlasted fio | drain s | copied MiB | read p99 idle/busy µs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate'] if r['rate'] != '0' else 'unlimited'} | {r['idle_iops']:.0f} | {r['busy_iops']:.0f} "
              f"| {r['ratio']:.2f} | {r['copy_outlasted_fio']} | {r['drain_seconds']} "
              f"| {r['copied_bytes'] / 2**20:.0f} | {r['idle_p99_us']}/{r['busy_p99_us']} |")
    json.dump(rows, sys.stderr, indent=1)


if __name__ == "__main__":
    main()
