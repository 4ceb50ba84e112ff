"""Seeded whole-cluster simulations (tests/sim/workload.py). A failure prints its seed;
`SIM_SEED=<n> .venv/bin/python -m pytest tests/sim/test_replication_sim.py` replays it."""

from __future__ import annotations

import logging

import pytest

from tests.sim.workload import Config, Outcome, run_seed, seeds

NO_TAKEOVER = frozenset({"crash", "partition", "drop", "delay"})
ALL_FAULTS = NO_TAKEOVER | {"takeover"}


def report(out: Outcome) -> str:
    lines = [f"seed {out.seed} (replay: SIM_SEED={out.seed}) stats={out.stats}"]
    lines += [f"VIOLATION {v}" for v in out.violations[:10]]
    lines += [f"DIVERGENT {d}" for d in out.divergent_unknown[:5]]
    lines += ["--- last events ---"] + out.log[-25:]
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("vbp").setLevel(logging.ERROR)
    yield
    logging.getLogger("vbp").setLevel(logging.NOTSET)


@pytest.mark.parametrize("seed", seeds([0, 1, 2, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 33, 40, 44, 55]))
def test_crashes_partitions_drops_delays(seed):
    out = run_seed(seed, Config(faults=NO_TAKEOVER))
    assert not out.violations and not out.divergent_unknown, report(out)


def test_no_faults_all_operations():
    out = run_seed(100, Config(faults=frozenset(), ops=80))
    assert not out.violations and not out.divergent_unknown, report(out)


@pytest.mark.parametrize("seed", seeds([3, 4, 10, 27, 32]))
def test_takeover(seed):
    out = run_seed(seed, Config(faults=ALL_FAULTS))
    assert not out.violations, report(out)

