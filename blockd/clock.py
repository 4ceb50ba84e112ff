"""blockd's trio clock: the boot clock (CLOCK_BOOTTIME), which counts the time the machine
was suspended, where trio's own clock (CLOCK_MONOTONIC) stops.

Every deadline of blockd is on trio's clock, its write leases' first (a gateway serves a
volume until `lease_deadline`, reads from its own copy included). The registry times the
same lease on the boot clock (the embedded registry: vbp.registry.local) or on etcd's
(another machine's, running on): after a suspend to RAM longer than the lease, the
registry has let the lease run out and another host may have taken the volume over and
written, while on CLOCK_MONOTONIC the gateway would still see time left and serve reads
of data overwritten since. On the boot clock the deadline has passed on resume.

Like trio's SystemClock, the clock reads a random offset past the boot clock, so that code
comparing its times with another clock's (time.monotonic) fails at once in tests.
"""

from __future__ import annotations

import random
import time

import trio

_BOOTTIME = time.CLOCK_BOOTTIME


def boot_clock() -> float:
    """Seconds on the boot clock."""
    return time.clock_gettime(_BOOTTIME)


class BootClock(trio.abc.Clock):
    __slots__ = ("offset",)

    def __init__(self, offset: float | None = None):
        self.offset = random.uniform(10000, 200000) if offset is None else offset

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self.offset + boot_clock()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - self.offset - boot_clock()
