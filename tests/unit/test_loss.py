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


def test_a_lineage_loss_record_against_a_naive_one_on_random_cases():
    """vbp.volume.note_accepted (the lineage's loss record accept-loss writes) against the
    naive record, every chunk of every call: the counts, the range and the calls are all
    kept; it lists the lowest CHUNKS_LISTED chunks of each entry and holds LOSSES_KEPT
    entries, the oldest folded, so its size is bounded whatever the loss."""
    import msgpack

    from vbp.volume import CHUNKS_LISTED, LOSSES_KEPT, accepted_losses, note_accepted

    rng = random.Random(7)
    for _ in range(40):
        d, naive = None, []  # naive: (time, [(index, host, reverts)]) per call
        for call in range(rng.randint(1, 2 * LOSSES_KEPT)):
            chunks = sorted(rng.sample(range(5000), rng.randint(1, 3 * CHUNKS_LISTED)))
            got = [(i, f"h{rng.randint(0, 9)}", rng.random() < 0.7) for i in chunks]
            naive.append((float(call), got))
            for i, h, r in got:
                d = note_accepted(d, float(call), "v", i, h, r)
        entries = accepted_losses(d)
        assert len(entries) == min(len(naive), LOSSES_KEPT)
        assert [e.time for e in entries] == [t for t, _ in naive][len(naive) - len(entries):]
        folded = naive[:len(naive) - len(entries) + 1]
        for e, group in zip(entries, [folded] + [[c] for c in naive[len(folded):]]):
            every = sorted(c for _t, cs in group for c in cs)
            assert (e.since, e.time) == (group[0][0], group[-1][0])
            assert (e.reverted, e.zeroed) == (sum(r for *_, r in every), sum(not r for *_, r in every))
            assert (e.low, e.high) == (every[0][0], every[-1][0])
            assert list(e.chunks) == every[:CHUNKS_LISTED]
        assert len(msgpack.packb(d)) < LOSSES_KEPT * CHUNKS_LISTED * 16


def test_a_host_logs_the_accepted_losses_of_its_stale_copies_once(caplog):
    """Resync logs event=loss_accepted per chunk the lineage's loss record lists, with the
    copy kept, and once per loss for chunks past those listed (counts and range only)."""
    import logging

    import trio

    from replicator.recovery import Resync
    from vbp.volume import CHUNKS_LISTED, note_accepted

    d = None
    for i in range(CHUNKS_LISTED + 8):
        d = note_accepted(d, 50.0, "v", i, "h2", i % 2 == 0)

    class Registry:
        async def list_losses(self):
            return {"lin": d}

    rs = Resync("h1", None, None, None, Registry())
    mine = [StaleRecord("lin", i, "h1", 1) for i in (0, 1, CHUNKS_LISTED + 2, CHUNKS_LISTED + 3, 999)]
    mine.append(StaleRecord("other", 0, "h1", 1))
    with caplog.at_level(logging.WARNING, logger="vbp.recovery"):
        for _ in range(2):
            trio.run(rs._read_accepted)
            rs._note_accepted(mine)
    got = [r.getMessage() for r in caplog.records if "event=loss_accepted" in r.getMessage()]
    assert len(got) == 3
    assert "chunk=0 source=h2 action=reverted" in got[0] and "chunk=1 source=h2 action=zeroed" in got[1]
    n = CHUNKS_LISTED + 8
    assert f"chunks={n} reverted={(n + 1) // 2} zeroed={n // 2}" in got[2]
    assert f"chunks 0 to {CHUNKS_LISTED + 7}" in got[2]
