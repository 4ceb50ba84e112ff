"""vbp.loglimit: lines about a failure that repeats per request, a few a period."""

from __future__ import annotations

import logging

from vbp.loglimit import LogLimit


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_key_logs_its_burst_then_counts_and_tells_the_count_next_period():
    clock = Clock()
    limit = LogLimit(10.0, 3, clock=clock)
    assert [limit.allow("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert limit.allow("b") == 0  # (keys apart)
    clock.now = 9.9
    assert limit.allow("a") is None
    clock.now = 10.0
    assert limit.allow("a") == 3  # the three left out
    assert limit.allow("a") == 0


def test_the_line_let_through_says_how_many_were_left_out(caplog):
    clock = Clock()
    limit = LogLimit(1.0, 1, clock=clock)
    logger = logging.getLogger("vbp.test.loglimit")
    caplog.set_level(logging.INFO, logger=logger.name)
    for i in range(100):
        limit.log(logger, logging.WARNING, "k", "event=x n=%d", i)
    clock.now = 1.0
    assert limit.log(logger, logging.WARNING, "k", "event=x n=%d", 100)
    assert [r.getMessage() for r in caplog.records] == ["event=x n=0", "event=x n=100 suppressed=99"]
    assert caplog.records[0].funcName == "test_the_line_let_through_says_how_many_were_left_out"
    # a level not enabled costs no count
    assert not limit.log(logger, logging.DEBUG, "k", "event=y")


def test_the_keys_kept_are_bounded():
    limit = LogLimit(10.0, 1, clock=Clock(), keys_max=100)
    for i in range(10_000):
        limit.allow(("volume", i))
    assert len(limit) <= 100
