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

    __slots__ = ("rate", "burst", "clock", "tat")

    def __init__(self, rate: float, burst: float | None, clock: Clock):
        self.clock = clock
        self.rate = 0.0
        self.burst = 0.0
        self.tat = clock()  # full now
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

    def take(self, n: float, at: float) -> None:
        """Book n tokens at time `at` (>= what `earliest` returned)."""
        if not self.unlimited:
            self.tat = max(self.tat, at) + min(n, self.burst) / self.rate

    def delay_for(self, n: float) -> float:
        """Book n tokens now; seconds to wait before using them (0 when within budget)."""
        if self.unlimited:
            return 0.0
        now = self.clock()
        at = self.earliest(n, now)
        self.take(n, at)
        return at - now

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """Change the limits live. The tokens saved carry over (capped at the new burst), and
        so do bookings not yet due: lowering a limit cannot be dodged by a reconfiguration."""
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError(f"rate and burst must not be negative (rate={rate}, burst={burst})")
        now = self.clock()
        level = self.level(now)
        self.rate = float(rate)
        if self.unlimited:
            self.burst = 0.0
            return
        self.burst = float(burst) if burst else max(self.rate * DEFAULT_BURST_SECONDS, 1.0)
        level = min(level, self.burst)
        self.tat = now + (self.burst - level) / self.rate


class VolumeQos:
    """A volume's IOPS and bytes-per-second limits (0 = unlimited), changeable live."""

    __slots__ = ("clock", "ops", "bytes", "_unlimited")

    def __init__(self, iops: float = 0, bps: float = 0, clock: Clock | None = None, *,
                 burst_seconds: float = DEFAULT_BURST_SECONDS):
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        self.ops = TokenBucket(0, None, clock)
        self.bytes = TokenBucket(0, None, clock)
        self._unlimited = True
        self.set_limits(iops, bps, burst_seconds=burst_seconds)

    @property
    def limits(self) -> tuple[float, float]:
        return self.ops.rate, self.bytes.rate

    def set_limits(self, iops: float, bps: float, *, burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        if burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, not {burst_seconds}")
        self.ops.set_rate(iops, max(iops * burst_seconds, 1.0) if iops else None)
        self.bytes.set_rate(bps, max(bps * burst_seconds, 1.0) if bps else None)
        self._unlimited = self.ops.unlimited and self.bytes.unlimited

    def delay_for(self, nbytes: int) -> float:
        """Book one request of nbytes now; seconds to wait before serving it (0 when within
        budget). Requests without payload (flush) pass nbytes=0: they count as an I/O only."""
        if self._unlimited:
            return 0.0
        now = self.clock()
        at = max(self.ops.earliest(1, now), self.bytes.earliest(nbytes, now))
        self.ops.take(1, at)
        self.bytes.take(nbytes, at)
        return at - now
