"""The cost of blockd's per-request metrics hook (blockd.metrics.Metrics.observe), beside
the cost of calling a function that does nothing with the same arguments, in one run.

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


def measure(calls: int) -> tuple[float, float]:
    """(seconds per observe(), seconds per call of a function that does nothing)."""
    m = Metrics()
    for v in range(50):  # a host serving 50 volumes: the series dict is not tiny
        for op in ("read", "write", "flush"):
            m.observe(f"vol{v}", op, 4096, 1e-4)
    hook, bare = m.observe, _nothing

    def best(fn) -> float:
        return min(timeit.repeat(lambda: fn("vol7", "write", 4096, 0.00042),
                                 number=calls, repeat=7)) / calls

    return best(hook), best(bare)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args()
    hook, bare = measure(args.calls)
    print(f"Metrics.observe: {hook * 1e6:.2f} µs per request; a call doing nothing: "
          f"{bare * 1e6:.2f} µs; the hook's own cost: {(hook - bare) * 1e6:.2f} µs")


if __name__ == "__main__":
    main()
