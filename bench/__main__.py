"""`python -m bench` (`make bench`): vbp against qemu-nbd and nbdkit's file plugin, side by
side in one run, with fio's nbd engine and nbdcopy. See bench/harness.py for the method and
bench/results/latest.md for the last committed run.

    python -m bench                          # the full run: 4 targets, 11 workloads, 3 rounds
    python -m bench --quick                  # a few seconds per target, 64 MiB volumes
    python -m bench --workloads randwrite-4k-qd32 --targets qemu-nbd,vbp-r1 --rounds 5
    python -m bench --profile randwrite-4k-qd32   # py-spy flame graph of the gateway blockd
    python -m bench --workloads randwrite-4k-qd32 --targets vbp-r3 --against HEAD~1
                                             # this code and HEAD~1's, alternated in each round

Other benchmarks here run on their own: bench.placement, bench.peer_bench,
bench.chunkstore_bench, bench.metrics_bench, bench.tls_bench (NBD over TLS against the clear,
beside nbdkit's), bench.fua_beside (a FUA write after large writes, and another volume's
reads meanwhile), bench.wakeup_bench (a server's CPU per wakeup: a blocking thread, trio,
the peer session) and bench.transport_bench (the CPU of a MiB moved between two processes,
over loopback TCP and over a Unix socket).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from bench import harness, workloads
from vbp.layout import parse_size


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round, 1.5 s jobs, 64 MiB volumes, 3 workloads, no snapshot/clone")
    p.add_argument("--rounds", type=int, help="interleaved rounds; medians are reported (3)")
    p.add_argument("--runtime", type=float, help="seconds per fio job (5)")
    p.add_argument("--size", help="volume and reference file size (1G)")
    p.add_argument("--workloads", type=_list,
                   help=f"comma-separated, of: {', '.join(workloads.WORKLOADS)}")
    p.add_argument("--targets", type=_list, help=f"comma-separated, of: {', '.join(harness.ALL_TARGETS)} "
                   f"(the default) and {', '.join(harness.EXTRA_TARGETS)}")
    p.add_argument("--r1-hosts", type=int, choices=(1, 3),
                   help="hosts of the sandbox holding the replicas=1 volume (1: all local)")
    p.add_argument("--prefill", choices=("nbdcopy", "fio"),
                   help="how the same data is written to every target first (nbdcopy)")
    p.add_argument("--no-vbp-ops", action="store_true", help="skip the snapshot and copy-up figures")
    p.add_argument("--vbp-ops", action="store_true", help="run them even with --quick")
    p.add_argument("--snap-chunks", type=int, help="written chunks of the snapshot volume (10000)")
    p.add_argument("--snap-targets", type=_list,
                   help="vbp targets to time snapshots on (vbp-r1; filling 10k chunks at "
                        "replicas=3 takes many minutes)")
    p.add_argument("--snap-chunk-size", help="chunk size of the snapshot volume (1M)")
    p.add_argument("--cow-chunks", type=int, help="chunks written once each after a clone (64)")
    p.add_argument("--congestion", metavar="NAME",
                   help="set the host's TCP congestion control (net.ipv4.tcp_congestion_control) "
                        "to NAME for the run, and back after (root); the references' "
                        "connections take the host's, vbp's local ones cubic: with cubic, "
                        "all compare under the same algorithm")
    p.add_argument("--against", metavar="REV",
                   help="run every vbp target also from the code of commit REV, alternated "
                        "with this code in each round, and report the ratios of the two "
                        "(bench/against.py): a change smaller than the machine's noise "
                        "between two runs shows there; an even --rounds puts each code "
                        "first equally often")
    p.add_argument("--out", type=Path, help="results directory (bench/results)")
    p.add_argument("--no-latest", action="store_true", help="do not overwrite latest.md")
    p.add_argument("--profile", metavar="WORKLOAD", help="profile one workload on vbp instead")
    p.add_argument("--profiler", default="auto", choices=("auto", "py-spy", "cprofile"),
                   help="auto: py-spy, falling back to cProfile if it is missing or cannot attach")
    p.add_argument("--profile-target", default="vbp-r1", choices=("vbp-r1", "vbp-r3"))
    return p


def config(args, argv) -> harness.Config:
    cfg = harness.Config.quick() if args.quick else harness.Config()
    if args.quick and args.out is None:
        cfg.latest = False
    for name in ("rounds", "runtime", "workloads", "targets", "r1_hosts", "snap_chunks", "snap_targets",
                 "cow_chunks", "prefill", "congestion", "against"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.size:
        cfg.size = parse_size(args.size)
    if args.snap_chunk_size:
        cfg.snap_chunk_size = parse_size(args.snap_chunk_size)
    if args.out:
        cfg.out_dir = args.out
    if args.no_latest:
        cfg.latest = False
    if args.no_vbp_ops:
        cfg.vbp_ops = False
    if args.vbp_ops:
        cfg.vbp_ops = True
    if args.profile and args.runtime is None:
        cfg.runtime = 10.0
    cfg.command = harness.command_line(argv)
    return cfg


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every cleanup


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    cfg = config(args, argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        if args.profile:
            if args.against:
                raise ValueError("--against does not apply to --profile")
            from bench.profiling import run_profile

            out = run_profile(cfg, args.profile, args.profile_target, args.profiler)
            print(out.pop("text"))
            for kind, path in out.items():
                print(f"{kind}: {path}")
            return 0
        done = harness.run(cfg)
    except (ValueError, RuntimeError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    result, paths = done["result"], done["paths"]
    print(Path(paths["md"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if result["meta"].get("plot_note"):
        print(result["meta"]["plot_note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
