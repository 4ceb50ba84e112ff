"""replicator.loss: the rule of an unrecoverable chunk, and of the copy an accepted loss
keeps (Resync._resync_all_stale, `vbp pool status`, `vbp volume accept-loss` share it),
against a naive reading of it on many random cases."""

from __future__ import annotations

import random

from replicator.loss import (
    Miss, last_current, miss_of, reads_lacks, revert_source, stale_by_chunk, unrecoverable,
)
from replicator.messages import LACKS_REV
from vbp.cluster import ClusterMap, HostRecord
from vbp.registry.base import LACKS_EARLIER, NEVER_CURRENT, StaleRecord


def pool(*revs: int) -> ClusterMap:
    return ClusterMap(1, tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", peer_rev=r)
                               for i, r in enumerate(revs, 1)))


def test_miss_of_reads_when_the_record_was_made_and_its_flags():
    assert miss_of(StaleRecord("l", 0, "h1", 5, since=7)) == Miss(7)
    assert miss_of(StaleRecord("l", 0, "h1", NEVER_CURRENT | 5, since=7)) == Miss(7, never=True)
    assert miss_of(StaleRecord("l", 0, "h1", LACKS_EARLIER | 5, since=7)) == Miss(7, lacks=True)
    recs = [StaleRecord("l", 0, "h1", 5, since=7), StaleRecord("l", 1, "h2", 5, since=3),
            StaleRecord("l", 0, "h2", NEVER_CURRENT | LACKS_EARLIER, since=9)]
    assert stale_by_chunk(recs, pool(LACKS_REV, LACKS_REV + 1)) == {
        ("l", 0): {"h1": Miss(7), "h2": Miss(9, never=True, lacks=True)}, ("l", 1): {"h2": Miss(3)}}


def test_the_flag_is_read_only_once_every_host_of_the_pool_reads_it():
    """A host below LACKS_REV elects the newest record whatever its flags: until every
    host is at LACKS_REV, all elect so (a down one too: it may come back as it was)."""
    recs = [StaleRecord("l", 0, "h1", 5, since=3), StaleRecord("l", 0, "h2", LACKS_EARLIER | 5, since=9)]
    assert not reads_lacks(pool(LACKS_REV, LACKS_REV - 1, LACKS_REV))
    stale = stale_by_chunk(recs, pool(LACKS_REV, LACKS_REV - 1, LACKS_REV))[("l", 0)]
    assert stale == {"h1": Miss(3), "h2": Miss(9)} and last_current(("h1", "h2"), stale, 2) == "h2"
    stale = stale_by_chunk(recs, pool(LACKS_REV, LACKS_REV, LACKS_REV))[("l", 0)]
    assert stale["h2"].lacks and last_current(("h1", "h2"), stale, 2) == "h1"


def test_the_examples():
    c = ("a", "b")
    N, L = (lambda s: Miss(s, never=True)), (lambda s: Miss(s, lacks=True))
    assert not unrecoverable(c, {"a": N(9)}, 1)  # b holds no record: current
    assert unrecoverable(c, {"a": N(9), "b": Miss(5)}, 1)  # a, lost last, was never current
    assert revert_source(c, {"a": N(9), "b": Miss(5)}) == ("b", True)
    assert not unrecoverable(c, {"a": N(3), "b": Miss(5)}, 1)  # b went stale last: resync elects it
    assert unrecoverable(c, {"a": N(3), "b": N(5)}, 1)
    assert revert_source(c, {"a": N(3), "b": N(5)}) == ("a", False)  # nothing current: the first
    assert last_current(c, {"a": Miss(4), "b": Miss(4)}, 1) == "a"  # a tie: placement order
    assert not unrecoverable((), {}, 1)
    # power losses (LACKS_EARLIER): passed over for the newest whole copy, unless
    # min_size records are newer than it
    c = ("a", "b", "c")
    assert last_current(c, {"a": Miss(3), "b": Miss(5), "c": L(9)}, 2) == "b"
    assert last_current(c, {"a": Miss(3), "b": L(5), "c": L(9)}, 2) == "c"  # flushed writes on b, c
    assert last_current(c, {"a": Miss(3), "b": L(5), "c": L(9)}, 3) == "a"
    assert last_current(c, {"a": Miss(3), "b": Miss(5), "c": L(9)}, 1) == "c"
    assert last_current(c, {"a": Miss(5), "b": L(5), "c": L(9)}, 2) == "a"  # a tie is not newer
    assert last_current(c, {"a": L(3), "b": L(5), "c": L(9)}, 2) == "c"  # all lost power
    assert last_current(c, {"a": Miss(2), "b": N(5), "c": L(9)}, 2) == "c"  # b's old disk counts
    assert last_current(c, {"a": Miss(2), "b": N(5), "c": L(9)}, 3) == "a"
    # the newest never current: unrecoverable as before, accept-loss keeps the newest left
    s = {"a": N(9), "b": Miss(2), "c": L(5)}
    assert unrecoverable(c, s, 2) and revert_source(c, s) == ("c", True)


def naive_election(complete, stale, min_size):
    """The rule as the theory of operation words it: walk the copies from the newest
    record; the first is taken unless it lost power; then the first that lost nothing,
    if fewer than min_size copies were recorded strictly after it; else the first."""
    newest_first = sorted(complete, key=lambda h: (-stale[h].since, complete.index(h)))
    if not stale[newest_first[0]].lacks:
        return newest_first[0]
    for h in newest_first:
        if not stale[h].lacks and not stale[h].never:
            after = [x for x in complete if stale[x].since > stale[h].since]
            return h if len(after) < min_size else newest_first[0]
    return newest_first[0]


def test_against_a_naive_reading_on_random_cases():
    rng = random.Random(5)
    for _ in range(4000):
        hosts = [f"h{i}" for i in range(rng.randint(1, 5))]
        complete = tuple(rng.sample(hosts, rng.randint(1, len(hosts))))
        k = rng.randint(1, len(complete))
        stale = {}
        for h in hosts:
            if rng.random() < 0.8:
                kind = rng.random()
                stale[h] = Miss(rng.randint(1, 12), never=kind < 0.3, lacks=0.3 <= kind < 0.6)
        all_stale = all(h in stale for h in complete)
        if all_stale:
            elected = naive_election(complete, stale, k)
            assert last_current(complete, stale, k) == elected
        assert unrecoverable(complete, stale, k) == (all_stale and stale[elected].never)
        if unrecoverable(complete, stale, k):
            once = [h for h in complete if not stale[h].never]
            newest = max(once, key=lambda h: (stale[h].since, -complete.index(h))) if once else None
            assert revert_source(complete, stale) == ((newest, True) if once else (complete[0], False))


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
