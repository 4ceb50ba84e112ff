"""tests/sim/sweep.py keeps running (its seeds are the suite's business elsewhere)."""

import logging

from tests.sim import sweep


def test_the_sweep_runs_a_seed_and_reports_it(capsys):
    assert sweep.main(["100", "101", "--faults", "crash"]) == 0
    assert "0 failed of 1 runs" in capsys.readouterr().out
    # it silences logging while it runs, and gives it back: later tests read logs
    assert logging.getLogger("vbp").isEnabledFor(logging.WARNING)
