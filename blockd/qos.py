"""Per-volume I/O limits: IOPS and bandwidth as token buckets. Pure: the clock is passed in.

Theory of operation. A bucket of `burst` tokens refills at `rate` tokens per second; a request
of n tokens passes once the bucket holds n (a request larger than the burst reserves the bucket once it is full and
passes when n tokens have come in: huge requests are slowed, never refused). The
bucket is kept in the GCRA form (ITU-T I.371 "virtual scheduling"): one number, `tat`, the
time at which the bucket will be full again; the level at time t is
`burst - rate * max(0, tat - t)`. That makes a reservation O(1) and exact in floats.

`delay_for(n)` is a reservation, not a poll: it books the request at the earliest time s at
which every bucket of the volume has room and returns `s - now`; the caller sleeps that
long and proceeds. Requests therefore pass in the order they asked, and a volume with two
buckets (IOPS and bytes) books both at the same s, so each bucket sees exactly the
admissions that happen. Guarantee (tests/unit/test_qos.py, property-tested): the requests
admitted in any window of length T total at most `rate * T + max(burst, largest request)`
tokens, and at most `rate * T + burst` over the first T seconds. A rate of 0 means
unlimited: never a delay.

A change of limits converts each bucket's debt at the new rate. In a bucket that did not
hold a request up, its booking at the later time the other bucket set reads as debt until
then (`tat` jumps to it): that is no debt of this bucket, and converted it would put
every later request as far away as the ratio of the rates (an IOPS limit lowered from
1000 to 1 behind a bandwidth wait of a minute: 17 hours). So each bucket also keeps
`own`, its `tat` with each booking counted from when it was made, and a change converts
that. The queue the two buckets make together is longer than either alone (tokens one
saves while the other holds requests up are capped at its burst), so what is left of it
is kept too, scaled by the smallest ratio of an old rate to its new one (`rescaled`):
lowering limits never brings a booking forward, raising them brings it forward by no
more than the largest speed-up. Requests waiting (`VolumeQos.waits`, VolumeGateway.
_throttled) and requests booked after the change (`floor`) follow the same rule.

The trio side is one line at the request's call site:
`d = qos.delay_for(n); if d: await trio.sleep(d)`.
"""

from __future__ import annotations

from typing import Callable

Clock = Callable[[], float]

DEFAULT_BURST_SECONDS = 1.0
EPSILON = 1e-9  # seconds; bookings closer than this to now pass now


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved; rate 0 = unlimited."""

    __slots__ = ("rate", "burst", "clock", "tat", "own")

    def __init__(self, rate: float, burst: float | None, clock: Clock):
        self.clock = clock
        self.rate = 0.0
        self.burst = 0.0
        self.tat = self.own = clock()  # full now (own: see the theory of operation)
        self.set_rate(rate, burst)

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def level(self, now: float | None = None) -> float:
        """Tokens in the bucket at `now`, net of bookings (negative while requests are queued)."""
        if self.unlimited:
            return float("inf")
        now = self.clock() if now is None else now
        return self.burst - self.rate * max(0.0, self.tat - now)

    def earliest(self, n: float, now: float) -> float:
        """The earliest time >= now at which n tokens can pass (no change to the bucket)."""
        if self.unlimited:
            return now
        # n <= burst passes once the level is n. A larger request reserves the bucket from the
        # moment it is full and passes once n tokens have come in, leaving it empty.
        at = max(self.tat, now) + (n - self.burst) / self.rate
        return at if at - now > EPSILON else now  # float noise is not a delay

    def earliest_alone(self, n: float, now: float) -> float:
        """earliest(), were no booking held up by another bucket (`own`)."""
        if self.unlimited:
            return now
        at = max(self.own, now) + (n - self.burst) / self.rate
        return at if at - now > EPSILON else now

    def take(self, n: float, at: float, now: float) -> None:
        """Book n tokens at time `at` (>= what `earliest` returned), asked at `now`."""
        if not self.unlimited:
            self.tat = max(self.tat, at) + min(n, self.burst) / self.rate
            # (the same as tat while no other bucket holds a booking up)
            self.own = max(self.own, now) + n / self.rate

    def delay_for(self, n: float) -> float:
        """Book n tokens now; seconds to wait before using them (0 when within budget)."""
        if self.unlimited:
            return 0.0
        now = self.clock()
        at = self.earliest(n, now)
        self.take(n, at, now)
        return at - now

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """Change the limits live. The tokens saved carry over (capped at the new burst), and
        so do bookings not yet due: lowering a limit cannot be dodged by a reconfiguration.
        (Bookings counted from when they were made, `own`: see the theory of operation.)"""
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError(f"rate and burst must not be negative (rate={rate}, burst={burst})")
        now = self.clock()
        level = (float("inf") if self.unlimited
                 else self.burst - self.rate * max(0.0, self.own - now))
        self.rate = float(rate)
        if self.unlimited:
            self.burst = 0.0
            return
        self.burst = float(burst) if burst else max(self.rate * DEFAULT_BURST_SECONDS, 1.0)
        level = min(level, self.burst)
        self.tat = self.own = now + (self.burst - level) / self.rate


class VolumeQos:
    """A volume's IOPS and bytes-per-second limits (0 = unlimited), changeable live."""

    __slots__ = ("clock", "ops", "bytes", "_unlimited", "waits", "last", "floor")

    def __init__(self, iops: float = 0, bps: float = 0, clock: Clock | None = None, *,
                 burst_seconds: float = DEFAULT_BURST_SECONDS):
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        self.ops = TokenBucket(0, None, clock)
        self.bytes = TokenBucket(0, None, clock)
        self._unlimited = True
        # for the request delay_for delayed last: when each bucket alone would let it pass
        # (IOPS, bytes; clock times), for VolumeGateway._throttled
        self.waits = (0.0, 0.0)
        self.last = self.floor = clock()  # the latest booking; none before floor (set_limits)
        self.set_limits(iops, bps, burst_seconds=burst_seconds)

    @property
    def limits(self) -> tuple[float, float]:
        return self.ops.rate, self.bytes.rate

    def set_limits(self, iops: float, bps: float, *, burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        if burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, not {burst_seconds}")
        before = self.limits
        self.ops.set_rate(iops, max(iops * burst_seconds, 1.0) if iops else None)
        self.bytes.set_rate(bps, max(bps * burst_seconds, 1.0) if bps else None)
        self._unlimited = self.ops.unlimited and self.bytes.unlimited
        now = self.clock()
        if self.last > now:  # bookings not yet due: the next comes after the last's new time
            self.last = self.floor = now + (self.last - now) * _least_share(before, self.limits)

    def rescaled(self, end: float, waits: tuple, before: tuple, after: tuple,
                 now: float) -> tuple[float, tuple]:
        """A request booked to pass at `end` (each bucket alone: `waits`) under the limits
        `before`, once they are `after`: (its new end, its new waits). Each wait becomes
        what is left of it scaled by its bucket's ratio of old rate to new (`now` for a
        bucket lifted, or unlimited when it was booked: it did not count it); the end, the
        latest of them, and no sooner than what is left of it at the smallest ratio. Any
        clock will do, as long as it is one for all the times."""
        waits = tuple(now + max(0.0, w - now) * old / new if old and new else now
                      for w, old, new in zip(waits, before, after))
        return max(now + max(0.0, end - now) * _least_share(before, after), *waits), waits

    def delay_for(self, nbytes: int) -> float:
        """Book one request of nbytes now; seconds to wait before serving it (0 when within
        budget). Requests without payload (flush) pass nbytes=0: they count as an I/O only."""
        if self._unlimited:
            return 0.0
        now = self.clock()
        ops, nb = self.ops, self.bytes
        at = max(ops.earliest(1, now), nb.earliest(nbytes, now), self.floor)
        self.last = at
        if at != now:  # delayed: what each bucket alone asks (before its booking)
            self.waits = (ops.earliest_alone(1, now), nb.earliest_alone(nbytes, now))
        ops.take(1, at, now)
        nb.take(nbytes, at, now)
        return at - now


def _least_share(before: tuple, after: tuple) -> float:
    """The smallest ratio of an old rate to its new one (0 for a limit lifted), over the
    limits set `before`; 0 when there were none."""
    shares = [old / new if new else 0.0 for old, new in zip(before, after) if old]
    return min(shares, default=0.0)
