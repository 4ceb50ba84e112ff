"""`python -m bench --profile WORKLOAD`: one workload against one vbp volume with every
blockd of its sandbox sampled by py-spy at the same time (the gateway, host 0, and with
replicas=3 the two replica hosts): a flame graph SVG per host and the top functions (by own
samples and by samples including callees) written into the results directory.

py-spy attaches to the running blockd (ptrace). If it is missing or cannot attach, the
gateway host is stopped and restarted with the same command line under cProfile
(`python -m cProfile -o FILE -m blockd.main ...`); blockd exits cleanly on SIGTERM, so the
profile is written then. No change to blockd is needed for either.
"""

from __future__ import annotations

import contextlib
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import workloads as wl_mod
from bench.harness import Config, git_commit, say
from bench.targets import VbpSandbox, VbpTarget, stop_process, wait_port

TOP = 30


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start_fio(w: wl_mod.Workload, uri: str, size: int, seconds: float, out: Path):
    cmd = wl_mod.fio_command(w, uri, size, seconds, out)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def top_from_collapsed(text: str, n: int = TOP) -> tuple[list, list, int]:
    """(top by own samples, top by inclusive samples, total samples) of py-spy raw output:
    one `frame;frame;...;leaf count` line per distinct stack."""
    own, incl, total = Counter(), Counter(), 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return own.most_common(n), incl.most_common(n), total


def format_top(own, incl, total, title: str) -> str:
    lines = [title, "", f"{total} samples", "", "own samples (the function itself):"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in own]
    lines += ["", "inclusive samples (with callees):"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in incl]
    return "\n".join(lines) + "\n"


def _spy_stem(stem: Path, i: int) -> Path:
    """Host 0 (the gateway) keeps the plain name; replica host i gets `-hostI`."""
    return stem if i == 0 else stem.with_name(f"{stem.name}-host{i}")


def profile_py_spy(spy: str, pids: list[int], w, uri: str, cfg: Config, stem: Path) -> str | None:
    """Text of the top functions of every host (the gateway first, then the replicas, all
    sampled at the same time), or None if py-spy could not sample the gateway."""
    fio = start_fio(w, uri, cfg.size, 2 * cfg.runtime + 3, stem.parent / "fio-profile.json")
    try:
        time.sleep(1.0)  # past connect and ramp-up
        for fmt, suffix in (("raw", ".collapsed.txt"), ("flamegraph", ".svg")):
            procs = [subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--duration", str(int(cfg.runtime)), "--rate",
                 "200", "--nonblocking", "--function", "--format", fmt, "--output",
                 str(_spy_stem(stem, i).with_suffix(suffix))],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for i, pid in enumerate(pids)]
            for i, p in enumerate(procs):
                err = p.communicate()[1]
                if p.returncode != 0 and i == 0:
                    say(f"py-spy failed ({p.returncode}): {err.strip()[-300:]}")
                    return None
    finally:
        stop_process(fio)
    texts = []
    for i, pid in enumerate(pids):
        raw = _spy_stem(stem, i).with_suffix(".collapsed.txt")
        if not raw.exists():
            continue
        own, incl, total = top_from_collapsed(raw.read_text())
        role = "gateway" if i == 0 else f"replica host{i}"
        texts.append(format_top(own, incl, total, f"py-spy, {w.name} on {role} pid {pid}"))
    return "\n".join(texts)


def profile_cprofile(sb: VbpSandbox, w, uri: str, cfg: Config, stem: Path) -> str:
    host = sb.info["hosts"][0]
    with open(f"/proc/{host['pid']}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    args = argv[argv.index("blockd.main") + 1:]
    os.kill(host["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{host['pid']}") and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(host["pid"], os.WNOHANG)
        time.sleep(0.1)
    prof = stem.with_suffix(".prof")
    log = open(stem.parent / "blockd-cprofile.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cProfile", "-o", str(prof), "-m",
                             "blockd.main", *args], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(host["nbd_port"], proc, timeout=30)
        fio = start_fio(w, uri, cfg.size, cfg.runtime, stem.parent / "fio-profile.json")
        fio.wait(cfg.runtime * 4 + 60)
    finally:
        stop_process(proc, timeout=20)
        log.close()
    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.sort_stats("tottime").print_stats(TOP)
    st.sort_stats("cumulative").print_stats(TOP)
    return f"cProfile, {w.name} on the gateway blockd\n\n" + buf.getvalue()


def run_profile(cfg: Config, workload: str, target: str = "vbp-r1", profiler: str = "auto") -> dict:
    if workload not in wl_mod.WORKLOADS or wl_mod.WORKLOADS[workload].tool != "fio":
        fio_names = [n for n, w in wl_mod.WORKLOADS.items() if w.tool == "fio"]
        raise ValueError(f"--profile takes a fio workload: {', '.join(fio_names)}")
    if target not in ("vbp-r1", "vbp-r3"):
        raise ValueError("--profile-target must be vbp-r1 or vbp-r3")
    w = wl_mod.WORKLOADS[workload]
    replicas = 1 if target == "vbp-r1" else 3
    hosts = cfg.r1_hosts if replicas == 1 else 3
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    stem_name = f"profile-{time.strftime('%Y-%m-%d', time.gmtime())}-{git_commit()}-{workload}-{target}"
    tmp = Path(tempfile.mkdtemp(prefix="vbp-profile-"))
    out: dict = {}
    try:
        with VbpSandbox(tmp, hosts, capacity=cfg.sandbox_capacity) as sb:
            sb.start()
            t = VbpTarget(target, sb, "profile", cfg.size, replicas)
            say(f"prefilling {t.uri} ({cfg.size >> 20} MiB)")
            wl_mod.prefill(t, wl_mod.make_data_file(tmp / "data.raw", cfg.size), tool="fio")
            work_stem = tmp / stem_name
            spy = py_spy() if profiler in ("auto", "py-spy") else None
            text = None
            if spy:
                say(f"profiling {workload} with py-spy for {cfg.runtime:g} s (x2: raw + svg)")
                text = profile_py_spy(spy, sb.pids(), w, t.uri, cfg, work_stem)
            elif profiler != "cprofile":
                say("py-spy not found (pip install py-spy into the venv); using cProfile")
            if text is None:
                text = profile_cprofile(sb, w, t.uri, cfg, work_stem)
            for i in range(hosts):
                for suffix in (".svg", ".collapsed.txt", ".prof"):
                    src = _spy_stem(work_stem, i).with_suffix(suffix)
                    if src.exists():
                        dst = cfg.out_dir / src.name
                        shutil.copy(src, dst)
                        out[suffix.lstrip(".") + ("" if i == 0 else f"-host{i}")] = dst
            top = cfg.out_dir / f"{stem_name}.top.txt"
            top.write_text(text)
            out["top"] = top
            out["text"] = text
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
