"""NBD over TLS against the clear, side by side: `python -m bench.tls_bench`.

One blockd serving a replicas=1 volume with `nbd_tls = "on"`, and nbdkit's file plugin with
`--tls=on` on a raw file of the same size, both filled as `python -m bench` fills its
targets (nbdcopy of the same data). fio's nbd engine (libnbd) runs each workload
against each server in the clear (nbd://) and over TLS (nbds://), interleaved, for
`--rounds` rounds; the report gives the medians, each server's TLS / clear ratio, and
vbp's TLS figure against nbdkit's. The certificates are made for the run (trustme, a test
dependency); libnbd finds the client's CA in $HOME/.pki/libnbd, so fio runs with HOME set
to a directory of the run.

    python -m bench.tls_bench [--size 1G] [--runtime 5] [--rounds 3] [--workloads a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench.targets import NbdkitFileTLS, VbpSandbox, VbpTarget, cpu_seconds
from bench.workloads import WORKLOADS, fio_command, make_data_file, parse_fio, prefill
from vbp.layout import parse_size

DEFAULT_WORKLOADS = ["randread-4k-qd32", "randwrite-4k-qd32", "seqread-1m-qd8",
                     "seqwrite-1m-qd8"]
MODES = ("clear", "tls")


def certificates(d: Path) -> tuple[Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed: (the servers' directory, in
    nbdkit's layout, HOME for libnbd)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server, home = d / "server", d / "home"
    client = home / ".pki" / "libnbd"
    for p in (server, client):
        p.mkdir(parents=True)
    ca.cert_pem.write_to_path(str(server / "ca-cert.pem"))
    ca.cert_pem.write_to_path(str(client / "ca-cert.pem"))
    cert.cert_chain_pems[0].write_to_path(str(server / "server-cert.pem"))
    cert.private_key_pem.write_to_path(str(server / "server-key.pem"))
    (server / "server-key.pem").chmod(0o600)
    return server, home


def fio(cmd: list[str], home: Path, timeout: float) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, HOME=str(home)))
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed: {(p.stderr or p.stdout)[-500:]}")


def run(size: int, runtime: float, rounds: int, workloads: list[str]) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vbp-tls-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        server, home = certificates(tmp)
        nbdkit = stack.enter_context(NbdkitFileTLS(tmp, size, server).start())
        sandbox = stack.enter_context(VbpSandbox(tmp, 1, settings={
            "nbd_tls": "on", "nbd_tls_cert": server / "server-cert.pem",
            "nbd_tls_key": server / "server-key.pem"}).start())
        vbp = VbpTarget("vbp-r1", sandbox, "tls", size, 1)
        targets = [nbdkit, vbp]
        data = make_data_file(tmp / "data.raw", size)
        for t in targets:  # as `python -m bench` does, in the clear, before anything is timed
            prefill(t, data)
        for r in range(rounds):
            for name in workloads:
                w = WORKLOADS[name]
                for t in targets:
                    for mode in MODES:
                        uri = t.uri if mode == "clear" else t.uri.replace("nbd://", "nbds://", 1)
                        out = tmp / f"{name}-{t.name}-{mode}-{r}.json"
                        cpu0 = cpu_seconds(t.pids())
                        fio(fio_command(w, uri, size, runtime, out), home, runtime * 4 + 60)
                        rec = parse_fio(json.loads(out.read_text()))
                        rec["cpu_us_per_io"] = ((cpu_seconds(t.pids()) - cpu0) * 1e6 / rec["ios"]
                                                if rec["ios"] else None)
                        results.setdefault((name, t.name, mode), []).append(rec)
    return results


def median(recs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in recs)


def report(results: dict, workloads: list[str]) -> str:
    lines = ["| workload | metric | nbdkit clear | nbdkit TLS | TLS/clear | vbp clear | vbp TLS "
             "| TLS/clear | vbp TLS / nbdkit TLS |", "|---|---|---|---|---|---|---|---|---|"]
    for name in workloads:
        key = WORKLOADS[name].headline
        m = {(t, mode): median(results[(name, t, mode)], key)
             for t in ("nbdkit", "vbp-r1") for mode in MODES}
        lines.append(
            f"| {name} | {'IOPS' if key == 'iops' else 'MiB/s'} "
            f"| {m['nbdkit', 'clear']:,.0f} | {m['nbdkit', 'tls']:,.0f} "
            f"| {m['nbdkit', 'tls'] / m['nbdkit', 'clear']:.2f}x "
            f"| {m['vbp-r1', 'clear']:,.0f} | {m['vbp-r1', 'tls']:,.0f} "
            f"| {m['vbp-r1', 'tls'] / m['vbp-r1', 'clear']:.2f}x "
            f"| {m['vbp-r1', 'tls'] / m['nbdkit', 'tls']:.2f}x |")
    cpu = ["", "Server CPU µs per I/O (medians), clear / TLS:"]
    for name in workloads:
        parts = []
        for t in ("nbdkit", "vbp-r1"):
            c, s = (median(results[(name, t, mode)], "cpu_us_per_io") for mode in MODES)
            parts.append(f"{t} {c:.1f} / {s:.1f}")
        cpu.append(f"- {name}: " + ", ".join(parts))
    return "\n".join(lines + cpu)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G")
    p.add_argument("--runtime", type=float, default=5.0, help="seconds per fio job")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    a = p.parse_args(argv)
    workloads = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in workloads if w not in WORKLOADS or WORKLOADS[w].tool != "fio"]
    if unknown:
        p.error(f"not fio workloads: {', '.join(unknown)}")
    results = run(parse_size(a.size), a.runtime, a.rounds, workloads)
    print(f"{a.rounds} round(s) of {a.runtime:g} s per fio job, {a.size} per export; "
          "clear and TLS interleaved per server and workload.\n")
    print(report(results, workloads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
