"""One benchmark run: start the references and the vbp sandboxes side by side, prefill each
with the same data, run every workload against every target interleaved (qemu-nbd, vbp-r1,
nbdkit, vbp-r3, rotated each round so no target always runs first), take medians, add the
vbp-only snapshot and copy-up figures, and write the report (bench/report.py). With
--against REV, each vbp target runs again from REV's code right beside it (bench/against.py).

Everything started here lives in one ExitStack and one temporary directory, both undone on
success, error, Ctrl-C and SIGTERM (bench/__main__.py turns SIGTERM into SystemExit).
A workload that fails on one target is recorded as an error and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import against, report, vbp_ops
from bench import workloads as wl_mod
from bench.targets import (BarePython, BarePythonChecksums, BarePythonSplice, BarePythonThreads,
                           NbdkitFile, QemuNbd, Target, VbpSandbox, VbpTarget, tool_versions)

ALL_TARGETS = ("qemu-nbd", "nbdkit", "vbp-r1", "vbp-r3")
# on request only: the bare Python server (bench/bare_server.py), without and with checksums,
# with checksums on three threads per connection, and with writes spliced to the file
EXTRA_TARGETS = ("py-bare", "py-bare-xxh", "py-threads-xxh", "py-splice-xxh")
# the targets that are one server process on a raw file, by name
PROCESS_TARGETS = {t.name: t for t in (QemuNbd, NbdkitFile, BarePython, BarePythonChecksums,
                                       BarePythonThreads, BarePythonSplice)}
# the vbp targets: (volume, replicas); vbp-r1's sandbox has --r1-hosts hosts, vbp-r3's 3
VBP_VOLUMES = {"vbp-r1": ("bench-r1", 1), "vbp-r3": ("bench-r3", 3)}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MiB, GiB = 1 << 20, 1 << 30


@dataclass
class Config:
    rounds: int = 3
    runtime: float = 5.0
    size: int = 1 * GiB
    workloads: list[str] = field(default_factory=lambda: list(wl_mod.WORKLOADS))
    targets: list[str] = field(default_factory=lambda: list(ALL_TARGETS))
    out_dir: Path = RESULTS_DIR
    r1_hosts: int = 1
    vbp_ops: bool = True
    snap_chunks: int = 10_000
    snap_targets: list[str] = field(default_factory=lambda: ["vbp-r1"])
    snap_chunk_size: int = 1 * MiB
    cow_chunks: int = 64
    sandbox_capacity: str = "64G"
    latest: bool = True
    prefill: str = "nbdcopy"  # or "fio": one connection, sequential 1 MiB writes
    congestion: str | None = None  # the host's TCP congestion control for the run (host_congestion)
    against: str | None = None  # a commit whose code runs every vbp target again (bench/against.py)
    command: str = ""

    @classmethod
    def quick(cls, **kw) -> "Config":
        base = dict(rounds=1, runtime=1.5, size=64 * MiB, workloads=list(wl_mod.QUICK_WORKLOADS),
                    vbp_ops=False, snap_chunks=200, cow_chunks=8)
        base.update(kw)
        return cls(**base)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or "nogit"
    except OSError:
        return "nogit"


def dirty_files() -> list[str]:
    """Files outside bench/ that differ from the commit: the code measured is the work tree."""
    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    except OSError:
        return []
    return [ln[3:] for ln in r.stdout.splitlines() if ln[3:] and not ln[3:].startswith("bench/")]


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


CONGESTION = Path("/proc/sys/net/ipv4/tcp_congestion_control")


def tcp_congestion() -> str:
    """The host's TCP congestion control: every reference's connections use it, and it
    moves large transfers a lot (vbp's NBD connections from this host use cubic)."""
    try:
        return CONGESTION.read_text().strip()
    except OSError:
        return "?"


@contextlib.contextmanager
def host_congestion(name: str | None, path: Path = CONGESTION):
    """The host's TCP congestion control set to `name` for the run, and set back after,
    however the run ends (None: left as it is). The references' connections (and fio's)
    take the host's; vbp's from this host take cubic (blockd's default for local
    clients): `--congestion cubic` compares the references with vbp under the same
    algorithm. Root only; an algorithm the kernel lacks is refused before anything runs."""
    if name is None:
        yield
        return
    try:
        before = path.read_text().strip()
    except OSError as e:
        raise RuntimeError(f"cannot read the host's TCP congestion control ({path}): "
                           f"{e.strerror}") from None
    if name != before:
        try:
            path.write_text(name + "\n")
        except OSError as e:
            try:
                offered = (path.parent / "tcp_available_congestion_control").read_text().strip()
            except OSError:
                offered = "?"
            raise RuntimeError(f"cannot set the host's TCP congestion control to {name!r} "
                               f"({path}: {e.strerror}; available: {offered})") from None
    try:
        yield
    finally:
        if name != before:
            path.write_text(before + "\n")


def interleaved(names: list[str]) -> list[str]:
    """References and vbp targets alternating: ref, vbp, ref, vbp... (a vbp target's twin
    from --against right after it)."""
    return [n for unit in interleaved_units(names) for n in unit]


def interleaved_units(names: list[str]) -> list[list[str]]:
    refs = [[n] for n in names if n in report.REFERENCES]
    vbps = against.units([n for n in names if n not in report.REFERENCES])
    out = []
    for i in range(max(len(refs), len(vbps))):
        out += refs[i:i + 1] + vbps[i:i + 1]
    return out


def round_order(units: list[list[str]], rnd: int) -> list[str]:
    """The targets of round `rnd` (from 0): the units rotated by the round, so no target
    always runs first, and each unit of a target and its twin in the order of the round
    (reversed every other round)."""
    k = rnd % len(units) if units else 0
    return [n for u in units[k:] + units[:k] for n in (u[::-1] if rnd % 2 else u)]


def start_targets(cfg: Config, tmp: Path, stack: contextlib.ExitStack,
                  code: tuple[Path, str] | None = None) -> dict[str, Target]:
    """The targets of `cfg`, started; with `code` ((tree, label): another commit's code,
    bench/against.py), each vbp target again from that code, named TARGET@label."""
    for name in cfg.targets:
        if name not in PROCESS_TARGETS and name not in VBP_VOLUMES:
            raise ValueError(f"unknown target {name!r} "
                             f"(known: {', '.join(ALL_TARGETS + EXTRA_TARGETS)})")
    targets: dict[str, Target] = {}
    sandboxes: dict[tuple, VbpSandbox] = {}

    def sandbox(hosts: int, tree: Path | None) -> VbpSandbox:
        if (hosts, tree) not in sandboxes:
            say(f"starting a {hosts}-host vbp sandbox"
                + ("" if tree is None else f" from the code of {code[1]}"))
            sb = VbpSandbox(tmp, hosts, capacity=cfg.sandbox_capacity, code=tree)
            stack.enter_context(sb)
            sandboxes[hosts, tree] = sb.start()
        return sandboxes[hosts, tree]

    def vbp_target(name: str, tree: Path | None, label: str) -> VbpTarget:
        volume, replicas = VBP_VOLUMES[name]
        hosts = cfg.r1_hosts if replicas == 1 else 3
        return VbpTarget(label, sandbox(hosts, tree), volume, cfg.size, replicas)

    for name in cfg.targets:
        if name in PROCESS_TARGETS:
            targets[name] = stack.enter_context(PROCESS_TARGETS[name](tmp, cfg.size)).start()
        else:
            targets[name] = vbp_target(name, None, name)
        say(f"  {name}: {targets[name].uri}")
    if code is not None:
        for name in [n for n in cfg.targets if n in VBP_VOLUMES]:
            label = against.twin(name, code[1])
            targets[label] = vbp_target(name, code[0], label)
            say(f"  {label}: {targets[label].uri}")
    return targets


def summary(rec: dict) -> str:
    parts = []
    if rec.get("iops") is not None:
        parts.append(f"{rec['iops']:,.0f} IOPS")
    parts.append(f"{rec['mib_s']:,.1f} MiB/s")
    if rec.get("p99_us") is not None:
        parts.append(f"p50 {rec['p50_us']:,.0f} µs p99 {rec['p99_us']:,.0f} µs")
    return ", ".join(parts)


def run_rounds(cfg: Config, targets: dict[str, Target], ctx: wl_mod.JobContext,
               errors: list[str]) -> dict:
    """{workload: {target: [record per round]}}"""
    units = interleaved_units(list(targets))
    raw: dict = {w: {t: [] for u in units for t in u} for w in cfg.workloads}
    stalled = set(ctx.stalled)  # targets where an nbdcopy never ended: skip their copies
    for rnd in range(cfg.rounds):
        rot = round_order(units, rnd)
        for wname in cfg.workloads:
            w = wl_mod.WORKLOADS[wname]
            for t in rot:
                if w.tool == "nbdcopy" and t in stalled:
                    continue
                try:
                    rec = wl_mod.run(w, targets[t], ctx)
                except (wl_mod.RunError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                    if isinstance(e, wl_mod.Stalled):
                        stalled.add(t)
                    errors.append(f"round {rnd + 1} {wname} {t}: {e}")
                    say(f"[{rnd + 1}/{cfg.rounds}] {wname:<20} {t:<9} ERROR {e}")
                    continue
                raw[wname][t].append(rec)
                say(f"[{rnd + 1}/{cfg.rounds}] {wname:<20} {t:<9} {summary(rec)}")
    return raw


def run_vbp_ops(cfg: Config, targets: dict[str, Target]) -> dict:
    out = {}
    for name, t in targets.items():
        if not isinstance(t, VbpTarget) or against.SEP in name:
            continue  # (not a twin from --against: this code's CLI and API on its cluster)
        o = out.setdefault(name, {})
        try:
            if name in cfg.snap_targets:
                say(f"{name}: snapshot of a volume with {cfg.snap_chunks} written chunks")
                o["snapshot"] = vbp_ops.snapshot_bench(t, cfg.snap_chunks, cfg.snap_chunk_size,
                                                       max(cfg.rounds, 3))
            say(f"{name}: clone and copy-up writes to {cfg.cow_chunks} chunks")
            o["copyup"] = vbp_ops.copyup_bench(t, cfg.cow_chunks, max(cfg.rounds, 3))
        except Exception as e:  # one target's extra figures; the run goes on
            o["error"] = f"{type(e).__name__}: {e}"
            say(f"{name}: ERROR {o['error']}")
    return out


def run(cfg: Config) -> dict:
    """Runs the benchmark; returns {"result": ..., "paths": {...}}."""
    for name in cfg.workloads:
        if name not in wl_mod.WORKLOADS:
            raise ValueError(f"unknown workload {name!r} (known: {', '.join(wl_mod.WORKLOADS)})")
    for tool in ("fio", "nbdcopy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (make deps-test installs it)")
    meta = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rounds": cfg.rounds, "runtime": cfg.runtime, "size": cfg.size,
            "workloads": cfg.workloads, "targets": interleaved(cfg.targets),
            "r1_hosts": cfg.r1_hosts, "nproc": os.cpu_count(), "loadavg_before": loadavg(),
            "tcp_congestion": tcp_congestion(), "tools": tool_versions(),
            "uncommitted_changes": dirty_files(), "command": cfg.command or "python -m bench"}
    errors: list[str] = []
    if cfg.against:  # (before anything starts: a bad revision is a usage error)
        if not any(t in VBP_VOLUMES for t in cfg.targets):
            raise ValueError(f"--against needs a vbp target ({', '.join(VBP_VOLUMES)})")
        commit = against.resolve(cfg.against)
        meta["against"] = {"rev": cfg.against, "commit": commit, "label": against.short(commit)}
    tmp = Path(tempfile.mkdtemp(prefix="vbp-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            code = None
            if cfg.against:
                label = meta["against"]["label"]
                say(f"the code of {label} (git archive, its C extension built)")
                code = (against.checkout(meta["against"]["commit"], tmp), label)
            stack.enter_context(host_congestion(cfg.congestion))
            meta["tcp_congestion"] = tcp_congestion()
            say(f"work directory {tmp}; writing {cfg.size >> 20} MiB of test data")
            data = wl_mod.make_data_file(tmp / "data.raw", cfg.size)
            targets = start_targets(cfg, tmp, stack, code)
            meta["targets"] = interleaved(list(targets))
            meta["prefill_seconds"], meta["prefill"] = {}, cfg.prefill
            stalled: list[str] = []
            for name, t in targets.items():
                try:
                    meta["prefill_seconds"][name] = wl_mod.prefill(t, data, cfg.prefill)
                except wl_mod.RunError as e:  # measured anyway; reads may then hit holes
                    if isinstance(e, wl_mod.Stalled):
                        stalled.append(name)
                    errors.append(str(e))
                    say(f"ERROR {e}")
                    continue
                say(f"prefilled {name} in {meta['prefill_seconds'][name]:.1f} s")
            ctx = wl_mod.JobContext(tmp, cfg.size, cfg.runtime, data, stalled=stalled)
            raw = run_rounds(cfg, targets, ctx, errors)
            ops = run_vbp_ops(cfg, targets) if cfg.vbp_ops else {}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta["loadavg_after"] = loadavg()
    medians = {w: {t: report.median_record(recs) for t, recs in per.items() if recs}
               for w, per in raw.items()}
    result = {"meta": meta, "medians": medians, "ratios": report.ratios(medians),
              "goals": report.goals(medians), "vbp_ops": ops, "rounds": raw, "errors": errors}
    if cfg.against:
        result["against"] = report.against_ratios(medians, meta["against"]["label"])
    paths = report.write(result, cfg.out_dir, f"{meta['date']}-{meta['commit']}", cfg.latest)
    return {"result": result, "paths": paths}


def command_line(argv: list[str]) -> str:
    return " ".join(["python -m bench", *(shlex.quote(a) for a in argv)])
