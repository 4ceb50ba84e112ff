"""The workloads: fio jobs with the `nbd` ioengine and nbdcopy copies, run the same way
against every target, and the parsing of their results into one flat record:

    {"iops": float, "mib_s": float, "p50_us": float|None, "p99_us": float|None,
     "seconds": float, "cpu_us_per_io": float|None,
     "machine_us_per_io": float|None, "kernel_us_per_io": float|None}

cpu_us_per_io is the server's processes' CPU; machine_us_per_io the whole machine's busy
time over the job (client, server, kernel threads), and kernel_us_per_io the kernel's part
of it. On a machine the job saturates, throughput is about the CPUs over the machine time
per IO: the ratio of two targets' machine times per IO bounds the ratio of their speeds.

Latencies are fio completion latencies (clat). For the mixed job they are the reads';
the writes' are kept as "w_p50_us"/"w_p99_us". For the fsync job each write is followed by
an NBD flush (fio `fsync=1`), so IOPS counts write+flush pairs and "sync_p99_us" is the
flush latency. A workload with a job `beside` runs it at the same time on a connection of
its own to the same export; the record is the first job's (with its "p999_us"), and
"beside_mib_s"/"beside_sync_p99_us" say what the other did: read-beside-flush measures
how a large flush elsewhere holds up a reader (a server that syncs on its only thread
stops answering it for the whole writeback).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.targets import Target, cpu_seconds, machine_cpu

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    title: str
    tool: str = "fio"  # "fio", "nbdcopy" or "fua" (bench.fua_client)
    fio: tuple[str, ...] = ()
    copy: str = ""  # nbdcopy direction: "out" (volume -> null:) or "in" (file -> volume)
    headline: str = "iops"  # the metric goals and plots use: "iops" or "mib_s"
    beside: tuple[str, ...] = ()  # a second fio job, at the same time on its own connection


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("randread-4k-qd1", "4K random read QD1", fio=("--rw=randread", "--bs=4k", "--iodepth=1")),
    Workload("randread-4k-qd32", "4K random read QD32", fio=("--rw=randread", "--bs=4k", "--iodepth=32")),
    Workload("randwrite-4k-qd1", "4K random write QD1", fio=("--rw=randwrite", "--bs=4k", "--iodepth=1")),
    Workload("randwrite-4k-qd32", "4K random write QD32", fio=("--rw=randwrite", "--bs=4k", "--iodepth=32")),
    Workload("randwrite-4k-fsync", "4K random write + flush each (QD1)",
             fio=("--rw=randwrite", "--bs=4k", "--iodepth=1", "--fsync=1")),
    Workload("fua-write-4k-qd1", "4K random write with FUA (QD1, libnbd)", tool="fua"),
    Workload("seqread-1m-qd8", "1M sequential read QD8", headline="mib_s",
             fio=("--rw=read", "--bs=1m", "--iodepth=8")),
    Workload("seqwrite-1m-qd8", "1M sequential write QD8", headline="mib_s",
             fio=("--rw=write", "--bs=1m", "--iodepth=8")),
    Workload("randrw-4k-qd32", "4K random 70/30 read/write QD32",
             fio=("--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32")),
    Workload("read-beside-flush", "4K random read QD8 beside 1M writes flushed every 64 MiB",
             fio=("--rw=randread", "--bs=4k", "--iodepth=8"),
             beside=("--rw=write", "--bs=1m", "--iodepth=1", "--fsync=64", "--rate=200m")),
    Workload("copy-out", "nbdcopy volume -> null:", tool="nbdcopy", copy="out", headline="mib_s"),
    Workload("copy-in", "nbdcopy file -> volume", tool="nbdcopy", copy="in", headline="mib_s"),
]}

QUICK_WORKLOADS = ["randread-4k-qd32", "randwrite-4k-qd32", "seqwrite-1m-qd8"]


class RunError(RuntimeError):
    pass


class Stalled(RunError):
    """A copy that did not end: later copies to the same target are skipped."""


@dataclass
class JobContext:
    workdir: Path
    size: int
    runtime: float
    data_file: Path
    stalled: list = field(default_factory=list)


def fio_command(w: Workload, uri: str, size: int, runtime: float, output: Path) -> list[str]:
    job = ["--ioengine=nbd", f"--uri={uri}", f"--size={size}", "--time_based",
           f"--runtime={runtime:g}", "--randrepeat=0", "--norandommap"]
    cmd = ["fio", "--output-format=json", f"--output={output}", f"--name={w.name}", *job, *w.fio]
    if w.beside:
        cmd += ["--name=beside", *job, *w.beside]
    return cmd


def _lat(side: dict, key: str, pct: str) -> float | None:
    v = side.get(key, {}).get("percentile", {}).get(pct)
    return v / 1000.0 if v is not None else None


def parse_fio(doc: dict) -> dict:
    """The flat record of one fio JSON document (one job)."""
    job = doc["jobs"][0]
    if job.get("error"):
        raise RunError(f"fio job {job.get('jobname')} failed with error {job['error']}")
    r, w = job["read"], job["write"]
    ios = r["total_ios"] + w["total_ios"]
    main = r if r["total_ios"] >= w["total_ios"] else w
    rec = {
        "iops": r["iops"] + w["iops"],
        "mib_s": (r["bw_bytes"] + w["bw_bytes"]) / MiB,
        "p50_us": _lat(main, "clat_ns", "50.000000"),
        "p99_us": _lat(main, "clat_ns", "99.000000"),
        "ios": ios,
        "seconds": job.get("job_runtime", 0) / 1000.0,
    }
    if r["total_ios"] and w["total_ios"]:
        rec["w_p50_us"] = _lat(w, "clat_ns", "50.000000")
        rec["w_p99_us"] = _lat(w, "clat_ns", "99.000000")
    sync = job.get("sync", {})
    if sync.get("total_ios"):
        rec["sync_p99_us"] = _lat(sync, "lat_ns", "99.000000")
    if len(doc["jobs"]) > 1:  # a job beside: its figures apart, the first job's tail
        other = doc["jobs"][1]
        if other.get("error"):
            raise RunError(f"fio job {other.get('jobname')} failed with error {other['error']}")
        rec["p999_us"] = _lat(main, "clat_ns", "99.900000")
        rec["beside_mib_s"] = (other["read"]["bw_bytes"] + other["write"]["bw_bytes"]) / MiB
        rec["beside_sync_p99_us"] = _lat(other.get("sync", {}), "lat_ns", "99.000000")
    return rec


def run_fio(w: Workload, target: Target, ctx: JobContext) -> dict:
    out = ctx.workdir / f"fio-{target.name}-{w.name}.json"
    cmd = fio_command(w, target.uri, ctx.size, ctx.runtime, out)
    cpu0, machine0 = cpu_seconds(target.pids()), machine_cpu()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=ctx.runtime * 4 + 60)
    cpu, machine = cpu_seconds(target.pids()) - cpu0, _since(machine0)
    if p.returncode != 0:
        raise RunError(f"fio {w.name} on {target.name} exited {p.returncode}: "
                       f"{(p.stderr or p.stdout).strip()[-500:]}")
    return _per_io(parse_fio(json.loads(out.read_text())), cpu, machine)


def _since(machine0: tuple[float, float]) -> tuple[float, float]:
    busy, kernel = machine_cpu()
    return busy - machine0[0], kernel - machine0[1]


def _per_io(rec: dict, cpu: float, machine: tuple[float, float]) -> dict:
    """`rec` with its CPU figures per IO (see the module's docstring)."""
    ios = rec["ios"]
    rec["cpu_us_per_io"] = cpu * 1e6 / ios if ios else None
    rec["machine_us_per_io"] = machine[0] * 1e6 / ios if ios else None
    rec["kernel_us_per_io"] = machine[1] * 1e6 / ios if ios else None
    return rec


def copy_timeout(size: int) -> float:
    """Generous (8 MiB/s is far below any target) but bounded: a stalled copy is an error."""
    return 60 + size / (8 * MiB)


def run_nbdcopy(w: Workload, target: Target, ctx: JobContext) -> dict:
    src, dst = (target.uri, "null:") if w.copy == "out" else (str(ctx.data_file), target.uri)
    cpu0 = cpu_seconds(target.pids())
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["nbdcopy", src, dst], capture_output=True, text=True,
                           timeout=copy_timeout(ctx.size))
    except subprocess.TimeoutExpired:
        raise Stalled(f"nbdcopy {src} {dst} stalled (no end after "
                      f"{copy_timeout(ctx.size):.0f} s)") from None
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(target.pids()) - cpu0
    if p.returncode != 0:
        raise RunError(f"nbdcopy {src} {dst} exited {p.returncode}: {p.stderr.strip()[-500:]}")
    return {"iops": None, "mib_s": ctx.size / MiB / seconds, "p50_us": None, "p99_us": None,
            "seconds": seconds, "cpu_us_per_mib": cpu * 1e6 / (ctx.size / MiB)}


def run_fua(w: Workload, target: Target, ctx: JobContext) -> dict:
    cpu0, machine0 = cpu_seconds(target.pids()), machine_cpu()
    p = subprocess.run([sys.executable, "-m", "bench.fua_client", target.uri, str(ctx.size),
                        f"{ctx.runtime:g}"], capture_output=True, text=True,
                       timeout=ctx.runtime * 4 + 60)
    cpu, machine = cpu_seconds(target.pids()) - cpu0, _since(machine0)
    if p.returncode != 0:
        raise RunError(f"{w.name} on {target.name} exited {p.returncode}: "
                       f"{(p.stderr or p.stdout).strip()[-500:]}")
    return _per_io(json.loads(p.stdout), cpu, machine)


def run(w: Workload, target: Target, ctx: JobContext) -> dict:
    if w.tool == "nbdcopy":
        return run_nbdcopy(w, target, ctx)
    return run_fua(w, target, ctx) if w.tool == "fua" else run_fio(w, target, ctx)


def make_data_file(path: Path, size: int) -> Path:
    """`size` bytes of incompressible, non-zero data (so no server or client can skip it):
    one random MiB, each copy stamped with its offset."""
    import os

    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            block[:8] = off.to_bytes(8, "little")
            f.write(block[: min(MiB, size - off)])
    return path


def prefill(target: Target, data_file: Path, tool: str = "nbdcopy") -> float:
    """Copy the data file onto the target (nbdcopy), or write it whole with one fio job
    (one connection); seconds taken (the first, allocating write)."""
    size = data_file.stat().st_size
    if tool == "nbdcopy":
        cmd = ["nbdcopy", str(data_file), target.uri]
    else:
        cmd = ["fio", "--name=prefill", "--ioengine=nbd", f"--uri={target.uri}", "--rw=write",
               "--bs=1m", "--iodepth=8", f"--size={size}", "--output-format=json"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=copy_timeout(size))
    except subprocess.TimeoutExpired:
        raise Stalled(f"prefill of {target.name} with {tool} stalled "
                       f"(no end after {copy_timeout(size):.0f} s)") from None
    if p.returncode != 0:
        raise RunError(f"prefill of {target.name} failed: {(p.stderr or p.stdout).strip()[-500:]}")
    return time.perf_counter() - t0
