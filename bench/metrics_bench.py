"""The cost of blockd's per-request metrics hook, beside the cost of calling a function
that does nothing with the same arguments, in one run: the counters a gateway binds once
and bumps per request (Metrics.stats(...).add), and Metrics.observe, which looks them up.

    .venv/bin/python -m bench.metrics_bench [--calls 20000]

Prints the best of 7 repeats per call for each, and the hook's cost above the bare call.
DESIGN.md (Speed) asks for well under 10 µs of server CPU per request in all; the hook's
part is meant to stay near half a microsecond.
"""

from __future__ import annotations

import argparse
import timeit

from blockd.metrics import Metrics


def _nothing(volume: str, op: str, nbytes: int, seconds: float) -> None:
    pass


def measure(calls: int) -> tuple[float, float, float]:
    """(seconds per add() of bound counters, per observe(), per call of a function that
    does nothing)."""
    m = Metrics()
    for v in range(50):  # a host serving 50 volumes: the series dict is not tiny
        for op in ("read", "write", "flush"):
            m.observe(f"vol{v}", op, 4096, 1e-4)
    add = m.stats("vol7", "write").add

    def best(call) -> float:
        return min(timeit.repeat(call, number=calls, repeat=7)) / calls

    return (best(lambda: add(4096, 0.00042)),
            best(lambda: m.observe("vol7", "write", 4096, 0.00042)),
            best(lambda: _nothing("vol7", "write", 4096, 0.00042)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    bound, observe, bare = measure(args.calls)
    print(f"bound counters (a gateway's hook): {bound * 1e6:.2f} µs per request; "
          f"Metrics.observe: {observe * 1e6:.2f} µs; a call doing nothing: {bare * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
