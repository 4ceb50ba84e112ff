"""Run the simulation over a range of seeds, both fault sets, and print every seed that
breaks an invariant (a replay line for each). The suite runs a fixed handful of seeds; a
change to the replication path deserves a sweep of many more (about a second a seed and
fault set on one core):

    .venv/bin/python -m tests.sim.sweep 0 1000
    SIM_SEED=167 .venv/bin/python -m pytest -q tests/sim/test_replication_sim.py   # replay one

Exit status 1 when any seed failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tests.sim.test_replication_sim import ALL_FAULTS, NO_TAKEOVER
from tests.sim.workload import Config, run_seed

FAULT_SETS = {"crash": NO_TAKEOVER, "takeover": ALL_FAULTS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=int, help="first seed")
    parser.add_argument("end", type=int, help="seed after the last")
    parser.add_argument("--faults", choices=sorted(FAULT_SETS), action="append",
                        help="fault set (repeatable; default: both)")
    args = parser.parse_args(argv)
    sets = args.faults or sorted(FAULT_SETS)
    logging.disable(logging.CRITICAL)  # the hosts log every failure they inject
    try:
        return _sweep(args.first, args.end, sets)
    finally:
        logging.disable(logging.NOTSET)  # (called from a test: the process goes on)


def _sweep(first: int, end: int, sets: list[str]) -> int:
    failed = 0
    t0 = time.monotonic()
    for seed in range(first, end):
        for name in sets:
            try:
                out = run_seed(seed, Config(faults=FAULT_SETS[name]))
                # divergent unacknowledged bytes are only checked without takeovers, as
                # tests/sim/test_replication_sim.py does
                bad = out.violations + (out.divergent_unknown if name == "crash" else [])
            except Exception as e:  # a crash of the run itself is a finding too
                bad = [f"run failed: {e!r}"]
            if bad:
                failed += 1
                print(f"{name} seed {seed}: {bad[0]}", flush=True)
        if (seed - first) % 50 == 49:
            print(f"... seed {seed} ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"{failed} failed of {(end - first) * len(sets)} runs", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
