"""From per-round records to the report: medians, ratios to the references, the issue's
goals (reported as PASS/SHORT, never asserted), Markdown, JSON and a PNG of the ratios.

Ratios are vbp / reference. For IOPS and MiB/s above 1.0 is better; for latencies
("p50"/"p99") below 1.0 is better.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.against import SEP, first_rounds, twin
from bench.workloads import WORKLOADS

REFERENCES = ("qemu-nbd", "nbdkit")
METRICS = ("iops", "mib_s", "p50_us", "p99_us")

# (goal text, vbp target, workload, metric, reference: a name or "best" = the faster one, need)
GOALS = [
    ("replicas=1: 4K random read QD32 >= 1.0x nbdkit-file", "vbp-r1", "randread-4k-qd32", "iops", "nbdkit", 1.0),
    ("replicas=1: 4K random write QD32 >= 1.0x nbdkit-file", "vbp-r1", "randwrite-4k-qd32", "iops", "nbdkit", 1.0),
    ("replicas=1: 1M sequential read >= 1.0x the faster reference", "vbp-r1", "seqread-1m-qd8", "mib_s", "best", 1.0),
    ("replicas=1: 1M sequential write >= 1.0x the faster reference", "vbp-r1", "seqwrite-1m-qd8", "mib_s", "best", 1.0),
    ("replicas=3: 4K random write QD32 >= 1.0x qemu-nbd", "vbp-r3", "randwrite-4k-qd32", "iops", "qemu-nbd", 1.0),
    ("replicas=3: 1M sequential write >= 0.5x qemu-nbd", "vbp-r3", "seqwrite-1m-qd8", "mib_s", "qemu-nbd", 0.5),
]


def median_record(records: list[dict]) -> dict:
    """Each field's median over the rounds (fields missing or None in a round are skipped)."""
    keys = {k for r in records for k in r}
    out = {}
    for k in sorted(keys):
        vals = [r[k] for r in records if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(vals) if vals else None
    return out


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def ratios(medians: dict) -> dict:
    """{workload: {vbp target: {reference: {metric: ratio}}}}"""
    out = {}
    for wl, per_target in medians.items():
        refs = {r: per_target[r] for r in REFERENCES if r in per_target}
        for t, rec in per_target.items():
            if t in REFERENCES:
                continue
            for ref, rrec in refs.items():
                out.setdefault(wl, {}).setdefault(t, {})[ref] = {
                    m: _ratio(rec.get(m), rrec.get(m)) for m in METRICS}
    return out


def goals(medians: dict) -> list[dict]:
    out = []
    for text, target, wl, metric, ref, need in GOALS:
        per = medians.get(wl, {})
        refs = [r for r in REFERENCES if r in per] if ref == "best" else [ref]
        ref_vals = [(per[r].get(metric), r) for r in refs if r in per and per[r].get(metric)]
        mine = per.get(target, {}).get(metric)
        if not ref_vals or mine is None:
            out.append({"goal": text, "status": "n/a", "ratio": None, "need": need, "vs": None})
            continue
        ref_val, ref_name = max(ref_vals)
        r = mine / ref_val
        out.append({"goal": text, "status": "PASS" if r >= need else "SHORT", "ratio": r,
                    "need": need, "vs": ref_name})
    return out


def against_ratios(medians: dict, label: str) -> dict:
    """--against (bench/against.py): {workload: {vbp target: {metric: this code's median /
    that of the code of `label`}}} for the headline metric, the latencies and the server's
    CPU per IO (or per MiB), each target beside its twin TARGET@label."""
    out = {}
    for wl, per in medians.items():
        for t, rec in per.items():
            old = per.get(twin(t, label))
            if SEP in t or old is None:
                continue
            out.setdefault(wl, {})[t] = {
                m: _ratio(rec.get(m), old.get(m))
                for m in (*METRICS, "cpu_us_per_io", "cpu_us_per_mib", "machine_us_per_io")}
    return out


def _f(v, digits=0):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _x(v):
    return "–" if v is None else f"{v:.2f}x"


def _machine(rec: dict) -> str:
    busy = rec.get("machine_us_per_io")
    if busy is None:
        return "–"
    kernel = rec.get("kernel_us_per_io")
    return _f(busy, 1) + ("" if kernel is None else f" ({_f(kernel, 1)})")


def headline(wl: str) -> str:
    w = WORKLOADS.get(wl)
    return w.headline if w else "iops"


def _congestion_note(meta: dict) -> str:
    """The host's TCP congestion control, which the references' NBD connections use (runs
    before it was recorded say nothing). It moves large transfers a lot: nbdkit read 1 MiB
    requests at 2,922 MiB/s under bbr and 4,463 under cubic on the same machine. vbp's
    connections from fio (on this host) get cubic, blockd's default for local clients: with
    another host default, the ratios of large transfers compare unlike settings, and the
    note says so."""
    cc = meta.get("tcp_congestion")
    if not cc:
        return ""
    note = (f" TCP congestion control of the host: {cc}, used by the references' NBD "
            "connections; vbp's NBD connections from this host use cubic (blockd's default "
            "for local clients) and its peer links peer_tcp_congestion (cubic by default).")
    if cc != "cubic":
        note += (f" So vbp's large transfers run under cubic and the references' under {cc}: "
                 "run with --congestion cubic (or set net.ipv4.tcp_congestion_control to "
                 "cubic) to compare like with like.")
    return note


def markdown(result: dict) -> str:
    meta, med, rat = result["meta"], result["medians"], result["ratios"]
    targets = meta["targets"]
    vbps = [t for t in targets if t not in REFERENCES]
    refs = [r for r in REFERENCES if r in targets]
    lines = [f"# vbp benchmark {meta['date']} ({meta['commit']})", "",
             f"{meta['rounds']} round(s) of {meta['runtime']:g} s per fio job, volumes of "
             f"{meta['size'] >> 20} MiB prefilled with the same data, targets interleaved per "
             f"workload; medians. Machine: {meta['nproc']} CPUs, load average "
             f"{meta['loadavg_before']} before, {meta['loadavg_after']} after (shared: noisy). "
             f"vbp-r1 runs on a {meta['r1_hosts']}-host sandbox, vbp-r3 on a 3-host sandbox, "
             "all over loopback. Ratios are vbp / reference: above 1 is better for IOPS and "
             "MiB/s, below 1 is better for latency." + _congestion_note(meta), ""]
    if meta.get("uncommitted_changes"):
        lines += [f"Measured on the work tree of {meta['commit']} with uncommitted changes to: "
                  + ", ".join(meta["uncommitted_changes"]) + ".", ""]
    if refs and vbps:
        lines += ["## Ratios (headline metric, p99 latency)", ""]
        head = ["workload", "metric"] + [f"{t} ×{r}" for t in vbps for r in refs] + \
               [f"{t} p99 ×{r}" for t in vbps for r in refs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for wl in med:
            m = headline(wl)
            row = [wl, "IOPS" if m == "iops" else "MiB/s"]
            row += [_x(rat.get(wl, {}).get(t, {}).get(r, {}).get(m)) for t in vbps for r in refs]
            row += [_x(rat.get(wl, {}).get(t, {}).get(r, {}).get("p99_us")) for t in vbps for r in refs]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["## Absolute figures (medians)", "",
              "Server CPU: the target's processes. Machine CPU: the whole machine's busy time "
              "over the job (fio, the server, the kernel's loopback TCP, page cache and "
              "writeback), and in brackets the kernel's part; on a machine a job saturates, "
              "it bounds the speed (CPUs / machine CPU per IO).", "",
              "| workload | target | IOPS | MiB/s | p50 µs | p99 µs | server CPU µs/IO | "
              "machine CPU µs/IO (kernel) |",
              "|---|---|---|---|---|---|---|---|"]
    for wl, per in med.items():
        for t in targets:
            rec = per.get(t)
            if rec is None:
                continue
            cpu = rec.get("cpu_us_per_io")
            if cpu is None and rec.get("cpu_us_per_mib") is not None:
                cpu_s = f"{rec['cpu_us_per_mib']:,.0f}/MiB"
            else:
                cpu_s = _f(cpu, 1)
            lines.append(f"| {wl} | {t} | {_f(rec.get('iops'))} | {_f(rec.get('mib_s'), 1)} | "
                         f"{_f(rec.get('p50_us'), 1)} | {_f(rec.get('p99_us'), 1)} | {cpu_s} | "
                         f"{_machine(rec)} |")
    lines.append("")
    beside = [(wl, t, rec) for wl, per in med.items() for t in targets
              if (rec := per.get(t)) and rec.get("p999_us") is not None]
    if beside:
        lines += ["## A reader beside another connection's writes and flushes (medians)", "",
                  "| workload | target | reader p99 µs | reader p99.9 µs | writer MiB/s | "
                  "writer's flush p99 µs |", "|---|---|---|---|---|---|"]
        for wl, t, rec in beside:
            lines.append(f"| {wl} | {t} | {_f(rec.get('p99_us'), 1)} | {_f(rec.get('p999_us'), 1)} | "
                         f"{_f(rec.get('beside_mib_s'), 1)} | {_f(rec.get('beside_sync_p99_us'), 1)} |")
        lines.append("")
    if result.get("against"):
        label = meta["against"]["label"]
        lines += [f"## This code ({meta['commit']}) against {label} "
                  f"(`--against {meta['against']['rev']}`)", "",
                  f"The vbp targets ran twice in each round, from this code and from the code "
                  f"of {label} (TARGET@{label}), one right after the other, each first every "
                  f"other round (this code first in {first_rounds(meta['rounds'])} of "
                  f"{meta['rounds']}). Ratios are this code / that code, of the medians: above "
                  "1 is better for IOPS and MiB/s, below 1 for latency and CPU.", "",
                  "| workload | target | metric | this | " + label + " | ratio | p99 ratio | "
                  "server CPU ratio |", "|---|---|---|---|---|---|---|---|"]
        for wl, per in result["against"].items():
            m = headline(wl)
            for t, r in per.items():
                mine, old = med[wl][t], med[wl][twin(t, label)]
                cpu = r.get("cpu_us_per_io") or r.get("cpu_us_per_mib")
                lines.append(f"| {wl} | {t} | {'IOPS' if m == 'iops' else 'MiB/s'} | "
                             f"{_f(mine.get(m), 0 if m == 'iops' else 1)} | "
                             f"{_f(old.get(m), 0 if m == 'iops' else 1)} | {_x(r.get(m))} | "
                             f"{_x(r.get('p99_us'))} | {_x(cpu)} |")
        lines.append("")
    if result.get("goals"):
        cc = meta.get("tcp_congestion")
        unlike = (f" The references ran under {cc}, vbp under cubic: not like with like "
                  "(see above)." if cc and cc != "cubic" else "")
        lines += ["## Goals (issues 4 and 7; reported, not asserted)", ""]
        if unlike:
            lines += [unlike.strip(), ""]
        lines += ["| goal | measured | status |", "|---|---|---|"]
        for g in result["goals"]:
            vs = f" (vs {g['vs']})" if g.get("vs") else ""
            lines.append(f"| {g['goal']} | {_x(g['ratio'])}{vs} | **{g['status']}** |")
        lines.append("")
    ops = result.get("vbp_ops") or {}
    if ops:
        lines += ["## vbp only: snapshots and copy-up", ""]
        for t, o in ops.items():
            s, c = o.get("snapshot"), o.get("copyup")
            if s:
                lines.append(f"- {t}: snapshot of a volume with {s['chunks_written']:,} written "
                             f"{s['chunk_size'] >> 20} MiB chunks (one 4 KiB write per chunk, "
                             f"filled in {s['fill_seconds']:.1f} s, "
                             f"{s['fill_seconds'] * 1e3 / s['chunks_written']:.1f} ms per "
                             f"newly allocated chunk): {s['api_ms']:.1f} ms "
                             f"in-process (control.api.snapshot), {s['cli_ms']:.0f} ms as "
                             f"`vbp volume snapshot` (a `vbp volume show` takes "
                             f"{s['cli_show_ms']:.0f} ms: interpreter start).")
            if c:
                lines.append(f"- {t}: clone of a snapshot in {c['clone_ms']:.1f} ms; connect + "
                             f"first 4 KiB write {c['connect_and_first_write_ms']:.1f} ms; first "
                             f"write to each of {c['chunks'] - 1} other {c['chunk_size'] >> 20} MiB "
                             f"chunks (copy-up) p50 {_f(c['copyup_write_p50_us'])} µs / p99 "
                             f"{_f(c['copyup_write_p99_us'])} µs; the same writes again p50 "
                             f"{_f(c['overwrite_p50_us'])} µs / p99 {_f(c['overwrite_p99_us'])} µs.")
            if o.get("error"):
                lines.append(f"- {t}: {o['error']}")
        lines.append("")
    if meta.get("prefill_seconds"):
        lines += [f"Prefill ({meta.get('prefill', 'nbdcopy')} of the data file, the first, "
                  "allocating write): " + ", ".join(
            f"{t} {s:.1f} s" for t, s in meta["prefill_seconds"].items()) + ".", ""]
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    lines += [f"Tools: {', '.join(f'{k}: {v}' for k, v in meta['tools'].items())}.",
              f"Command: `{meta['command']}`", ""]
    if meta.get("plot"):
        lines += [f"![ratios per workload]({meta['plot']})", ""]
    elif meta.get("plot_note"):
        lines += [meta["plot_note"], ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> str | None:
    """A bar chart of the headline ratio per workload; None on success, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("no plot: matplotlib is not installed (add it to the venv, e.g. "
                "`.venv/bin/pip install matplotlib`)")
    rat = result["ratios"]
    wls = list(rat)
    series = sorted({(t, r) for wl in rat for t in rat[wl] for r in rat[wl][t]})
    if not wls or not series:
        return "no plot: no ratios (needs a reference and a vbp target)"
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(wls)), 5))
    width = 0.8 / len(series)
    for i, (t, r) in enumerate(series):
        vals = [rat[wl].get(t, {}).get(r, {}).get(headline(wl)) or 0 for wl in wls]
        ax.bar([x + i * width for x in range(len(wls))], vals, width, label=f"{t} / {r}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(wls))])
    ax.set_xticklabels(wls, rotation=30, ha="right")
    ax.set_ylabel("ratio (IOPS or MiB/s; >1 is faster than the reference)")
    ax.set_title(f"vbp vs references, {result['meta']['date']} {result['meta']['commit']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write(result: dict, out_dir: Path, stem: str, latest: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md",
             "png": out_dir / f"{stem}.png"}
    note = plot(result, paths["png"])
    if note:
        paths.pop("png")
    result["meta"]["plot_note"] = note
    result["meta"]["plot"] = None if note else paths["png"].name
    paths["json"].write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    md = markdown(result)
    paths["md"].write_text(md)
    if latest:
        (out_dir / "latest.md").write_text(md)
        paths["latest"] = out_dir / "latest.md"
    return paths
