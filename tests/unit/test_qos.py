"""blockd.qos: token buckets with a fake clock; deterministic, no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.qos import TokenBucket, VolumeQos


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        assert dt >= 0
        self.t += dt


def closed_loop(qos, clock, nbytes: int, seconds: float) -> tuple[int, int]:
    """One client, one request in flight: wait what qos says, then send the next.
    Returns (requests, bytes) admitted in `seconds`."""
    end = clock() + seconds
    ops = 0
    while True:
        d = qos.delay_for(nbytes)
        if clock() + d > end:
            return ops, ops * nbytes
        clock.advance(d)
        ops += 1
        clock.advance(1e-6)  # the request itself takes a moment


# --- TokenBucket -------------------------------------------------------------------------


def test_within_burst_no_delay_then_paced():
    clock = FakeClock()
    b = TokenBucket(10, 5, clock)
    assert [b.delay_for(1) for _ in range(5)] == [0, 0, 0, 0, 0]
    assert b.delay_for(1) == pytest.approx(0.1)
    assert b.delay_for(1) == pytest.approx(0.2)  # booked behind the previous one
    clock.advance(0.2)
    assert b.delay_for(1) == pytest.approx(0.1)


def test_refill_is_capped_at_burst():
    clock = FakeClock()
    b = TokenBucket(100, 10, clock)
    for _ in range(10):
        b.delay_for(1)
    clock.advance(3600)
    assert b.level() == 10
    assert sum(b.delay_for(1) == 0 for _ in range(20)) == 10


def test_request_larger_than_burst_waits_for_its_tokens():
    clock = FakeClock()
    b = TokenBucket(100, 10, clock)
    assert b.delay_for(110) == pytest.approx(1.0)  # 10 saved + 100 more
    assert b.delay_for(1) == pytest.approx(1.01)   # queued behind it, bucket left empty


def test_unlimited_bucket_never_delays():
    clock = FakeClock()
    b = TokenBucket(0, None, clock)
    assert all(b.delay_for(10**9) == 0 for _ in range(1000))


def test_negative_rate_refused():
    with pytest.raises(ValueError):
        TokenBucket(-1, None, FakeClock())


def test_default_burst_is_one_second():
    b = TokenBucket(50, None, FakeClock())
    assert b.burst == 50


# --- VolumeQos ---------------------------------------------------------------------------


@pytest.mark.parametrize("iops", [10, 500, 20_000])
def test_iops_limited_volume_converges_to_its_limit(iops):
    clock = FakeClock()
    qos = VolumeQos(iops=iops, bps=0, clock=clock)
    seconds = 20
    ops, _ = closed_loop(qos, clock, 4096, seconds)
    # burst (1 s worth) + rate * T, minus rounding
    assert iops * seconds <= ops <= iops * (seconds + 1) + 1
    # long run rate, burst excluded: measure a second window after the first
    ops2, _ = closed_loop(qos, clock, 4096, seconds)
    assert ops2 / seconds == pytest.approx(iops, rel=0.01)


def test_bandwidth_limited_volume_converges_to_its_limit():
    clock = FakeClock()
    bps = 50 * 2**20
    qos = VolumeQos(iops=0, bps=bps, clock=clock)
    closed_loop(qos, clock, 1 << 20, 5)  # spend the burst
    _, nbytes = closed_loop(qos, clock, 1 << 20, 30)
    assert nbytes / 30 == pytest.approx(bps, rel=0.01)


def test_both_limits_the_tighter_one_wins():
    clock = FakeClock()
    qos = VolumeQos(iops=1000, bps=10 * 2**20, clock=clock)
    closed_loop(qos, clock, 4096, 5)
    ops, _ = closed_loop(qos, clock, 4096, 10)      # 4 KiB: iops-bound (1000/s = 4 MiB/s)
    assert ops / 10 == pytest.approx(1000, rel=0.01)
    closed_loop(qos, clock, 1 << 20, 5)
    _, nbytes = closed_loop(qos, clock, 1 << 20, 10)  # 1 MiB: bandwidth-bound (10/s)
    assert nbytes / 10 == pytest.approx(10 * 2**20, rel=0.02)


def test_unlimited_volume_is_never_delayed():
    clock = FakeClock()
    qos = VolumeQos(0, 0, clock)
    for i in range(10_000):
        assert qos.delay_for(i % 7 * 65536) == 0
    assert qos.limits == (0, 0)


def test_limits_change_live():
    clock = FakeClock()
    qos = VolumeQos(iops=100, bps=0, clock=clock)
    closed_loop(qos, clock, 4096, 2)
    qos.set_limits(1000, 0)
    closed_loop(qos, clock, 4096, 1)
    ops, _ = closed_loop(qos, clock, 4096, 10)
    assert ops / 10 == pytest.approx(1000, rel=0.01)
    qos.set_limits(0, 0)  # lift the limit: no more delays at all
    assert all(qos.delay_for(4096) == 0 for _ in range(10_000))
    qos.set_limits(10, 0)  # and back: the bucket starts full, then paces
    delays = [qos.delay_for(4096) for _ in range(20)]
    assert delays[:10] == [0] * 10 and delays[10] > 0


def test_lowering_a_limit_keeps_queued_bookings():
    clock = FakeClock()
    qos = VolumeQos(iops=100, bps=0, clock=clock)
    for _ in range(300):
        qos.delay_for(0)  # 100 in the burst, 200 queued: 2 s ahead
    qos.set_limits(50, 0)
    assert qos.delay_for(0) >= 2.0


# --- the bound, property-tested ----------------------------------------------------------

requests = st.lists(
    st.tuples(st.floats(0, 2.0, allow_nan=False), st.integers(0, 256 * 1024)),
    min_size=1, max_size=60,
)


def admissions(qos, clock, reqs):
    """Submit each request after its gap; each is admitted at booking time + its delay."""
    out = []
    for gap, n in reqs:
        clock.advance(gap)
        out.append((clock() + qos.delay_for(n), n))
    return out


def check_windows(adm, start, rate_of, burst, largest):
    """Every window [a, b] between two admission times admits <= rate*(b-a) + max(burst, largest);
    the window from the start admits <= rate*(b-start) + burst."""
    adm = sorted(adm)
    eps = 1e-6 * (1 + burst)
    for i, (a, _) in enumerate(adm):
        total = 0
        for b, n in adm[i:]:
            total += rate_of(n)
            assert total <= rate_of.rate * (b - a) + max(burst, largest) + eps
    total = 0
    for b, n in adm:
        total += rate_of(n)
        assert total <= rate_of.rate * (b - start) + max(burst, largest) + eps


class Tokens:
    def __init__(self, rate, per_request):
        self.rate = rate
        self.per_request = per_request

    def __call__(self, n):
        return self.per_request(n)


@settings(max_examples=200, deadline=None)
@given(reqs=requests, iops=st.integers(1, 5000), bps=st.integers(1, 10 * 2**20),
       burst_seconds=st.floats(0.01, 2.0))
def test_admitted_never_exceeds_rate_times_t_plus_burst(reqs, iops, bps, burst_seconds):
    clock = FakeClock()
    start = clock()
    qos = VolumeQos(iops, bps, clock, burst_seconds=burst_seconds)
    adm = admissions(qos, clock, reqs)
    largest = max(n for _, n in reqs)
    check_windows(adm, start, Tokens(iops, lambda n: 1), qos.ops.burst, 1)
    check_windows(adm, start, Tokens(bps, lambda n: n), qos.bytes.burst, largest)


@settings(max_examples=200, deadline=None)
@given(reqs=requests, rate=st.integers(1, 10 * 2**20), burst=st.integers(1, 2**20))
def test_single_bucket_from_start_bound_holds_for_any_request_size(reqs, rate, burst):
    clock = FakeClock()
    start = clock()
    b = TokenBucket(rate, burst, clock)
    adm = sorted((clock() + b.delay_for(n), n) for gap, n in reqs if clock.advance(gap) is None)
    total = 0
    for t, n in adm:
        total += n
        assert total <= rate * (t - start) + burst + 1e-6 * (1 + burst)


@settings(max_examples=100, deadline=None)
@given(reqs=requests)
def test_unlimited_never_delays_any_sequence(reqs):
    clock = FakeClock()
    qos = VolumeQos(0, 0, clock)
    for gap, n in reqs:
        clock.advance(gap)
        assert qos.delay_for(n) == 0


def test_changing_a_limit_that_binds_nothing_leaves_the_queue_as_it_was():
    """A 64 KiB write at 1 KiB/s is booked 63 s ahead by the bytes bucket; the IOPS bucket
    (1000/s) has room for it all along. Lowering the IOPS limit to 1 meanwhile leaves a
    request booked after it where it was (behind the write's bytes, 67 s from the
    start): the one I/O queued is one I/O of debt, not 61 000."""
    clock = FakeClock()
    t0 = clock()
    qos = VolumeQos(iops=1000, bps=1024, clock=clock)
    assert qos.delay_for(64 * 1024) == pytest.approx(63)
    clock.advance(1)
    qos.set_limits(1, 1024)
    clock.advance(1)
    assert clock() + qos.delay_for(4096) - t0 == pytest.approx(67)


def test_raising_a_limit_brings_the_queue_forward():
    """(The other way round: the bytes limit that binds the queue doubled, what is
    queued behind it passes twice as fast.)"""
    clock = FakeClock()
    t0 = clock()
    qos = VolumeQos(iops=1000, bps=1024, clock=clock)
    assert qos.delay_for(64 * 1024) == pytest.approx(63)
    clock.advance(1)
    qos.set_limits(1000, 2048)
    # 62 KiB still owed, now at 2 KiB/s (31 s), then the request's own 4 KiB (2 s)
    assert clock() + qos.delay_for(4096) - t0 == pytest.approx(1 + 31 + 2)


@settings(max_examples=300, deadline=None)
@given(reqs=requests, iops=st.integers(1, 5000), bps=st.integers(1, 10 * 2**20),
       new_iops=st.integers(0, 5000), new_bps=st.integers(0, 10 * 2**20),
       after=st.floats(0, 5.0))
def test_a_change_of_limits_moves_the_queue_by_no_more_than_its_ratios(
        reqs, iops, bps, new_iops, new_bps, after):
    """Whatever is queued when the limits change, the next request (a flush: one I/O, no
    bytes) passes no sooner than what was left of the queue scaled by the smallest ratio
    of an old rate to its new one (lowering limits never brings it forward), and no
    later than that or what each bucket alone asked of it scaled by its own ratio (no
    bucket's debt stretched by the other's ratio)."""
    clock = FakeClock()
    qos = VolumeQos(iops, bps, clock)
    admissions(qos, clock, reqs)
    clock.advance(after)
    now = clock()
    left = max(0.0, qos.last - now)
    alone = (qos.ops.earliest_alone(1, now) - now, qos.bytes.earliest_alone(0, now) - now)
    qos.set_limits(new_iops, new_bps)
    ratios = [old / new if new else 0.0 for old, new in ((iops, new_iops), (bps, new_bps))]
    at = now + qos.delay_for(0)
    eps = 1e-6 * (1 + left + max(alone) * max(ratios))
    assert at >= now + left * min(ratios) - eps
    assert at <= now + max(left * min(ratios), *(a * r for a, r in zip(alone, ratios))) + eps
