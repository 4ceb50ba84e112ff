"""replicator.loss: the rule of an unrecoverable chunk, and of the copy an accepted loss
keeps (Resync._resync_all_stale, `vbp pool status`, `vbp volume accept-loss` share it),
against a naive reading of it on many random cases."""

from __future__ import annotations

import random

from replicator.loss import (
    last_current, revert_source, since_of, stale_by_chunk, unrecoverable,
)
from vbp.registry.base import NEVER_CURRENT, StaleRecord


def test_since_of_orders_never_current_records_by_when_they_were_made():
    assert since_of(StaleRecord("l", 0, "h1", 5, since=7)) == 7
    assert since_of(StaleRecord("l", 0, "h1", NEVER_CURRENT | 5, since=7)) == ~7 < 0
    got = stale_by_chunk([StaleRecord("l", 0, "h1", 5, since=7), StaleRecord("l", 1, "h2", 5, since=3),
                          StaleRecord("l", 0, "h2", NEVER_CURRENT, since=9)])
    assert got == {("l", 0): {"h1": 7, "h2": ~9}, ("l", 1): {"h2": 3}}


def test_the_examples():
    c = ("a", "b")
    assert not unrecoverable(c, {"a": ~9})  # b holds no record: current
    assert unrecoverable(c, {"a": ~9, "b": 5})  # a, lost last, was never current
    assert revert_source(c, {"a": ~9, "b": 5}) == ("b", True)
    assert not unrecoverable(c, {"a": ~3, "b": 5})  # b went stale last: resync elects it
    assert unrecoverable(c, {"a": ~3, "b": ~5})
    assert revert_source(c, {"a": ~3, "b": ~5}) == ("a", False)  # nothing current: the first
    assert last_current(c, {"a": 4, "b": 4}) == "a"  # a tie: placement order
    assert not unrecoverable((), {})


def test_against_a_naive_reading_on_random_cases():
    rng = random.Random(5)
    for _ in range(2000):
        hosts = [f"h{i}" for i in range(rng.randint(1, 5))]
        complete = tuple(rng.sample(hosts, rng.randint(1, len(hosts))))
        stale = {}
        sinces = rng.sample(range(1, 100), len(hosts))
        for h, s in zip(hosts, sinces):
            if rng.random() < 0.8:
                stale[h] = ~s if rng.random() < 0.4 else s
        made = {h: (~s if s < 0 else s) for h, s in stale.items()}
        all_stale = all(h in stale for h in complete)
        newest = max(complete, key=lambda h: made.get(h, 0))
        assert unrecoverable(complete, stale) == (all_stale and stale[newest] < 0)
        if unrecoverable(complete, stale):
            once = [h for h in complete if stale[h] >= 0]
            host, reverts = revert_source(complete, stale)
            assert reverts == bool(once)
            assert host == (max(once, key=lambda h: made[h]) if once else complete[0])
