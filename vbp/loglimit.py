"""Lines about a failure that repeats per request, at most a few a period.

A disk that fails, a full disk or a dead peer fails every request that reaches it: at 100k
IOPS a line per request is 100k lines a second, which fills the journal, costs the event
loop more than the requests themselves, and buries the first lines, those that said what
happened. Such a line goes through a LogLimit under a key naming its kind (and what fails:
the volume, the peer): the first `burst` of a period are logged as they come, the rest are
counted, and the next line of that key logged says how many were left out (`suppressed=N`),
as the kernel's printk_ratelimit does. The first line of every period keeps its request id
(vbp.reqid), so one failing request can still be followed through every host's log.

A key names the failure too (failure_kind: its type and errno), not only what fails: a
second failure that comes while a first one floods is what the operator needs to read,
and under the flood's key it would only be counted, never logged, for as long as the
flood fills the first lines of every period.

The keys kept are bounded (KEYS_MAX; all dropped when full, which at worst lets a few more
lines through), so keys naming volumes or peers that come and go cost nothing lasting.
"""

from __future__ import annotations

import logging
import time

PERIOD = 10.0  # seconds
BURST = 5  # lines of one key per period
KEYS_MAX = 4096


class LogLimit:
    """At most `burst` lines per key every `period` seconds of `clock`."""

    __slots__ = ("period", "burst", "clock", "keys_max", "_keys")

    def __init__(self, period: float = PERIOD, burst: int = BURST, *,
                 clock=time.monotonic, keys_max: int = KEYS_MAX) -> None:
        self.period = period
        self.burst = burst
        self.clock = clock
        self.keys_max = keys_max
        # key -> [start of its period, lines logged in it, lines left out since the last]
        self._keys: dict = {}

    def allow(self, key) -> int | None:
        """None when a line of `key` is to be left out now (it is counted); else the
        number of lines of `key` left out since the last one logged."""
        now = self.clock()
        k = self._keys.get(key)
        if k is None:
            if len(self._keys) >= self.keys_max:
                self._keys.clear()
            k = self._keys[key] = [now, 0, 0]
        elif now - k[0] >= self.period:
            k[0], k[1] = now, 0
        if k[1] >= self.burst:
            k[2] += 1
            return None
        k[1] += 1
        left, k[2] = k[2], 0
        return left

    def log(self, logger: logging.Logger, level: int, key, msg: str, *args, **kwargs) -> bool:
        """logger.log(level, msg, *args, **kwargs), unless `key` is past its limit; the
        lines left out before it are told at its end (suppressed=N). Whether it was
        logged."""
        if not logger.isEnabledFor(level):
            return False
        left = self.allow(key)
        if left is None:
            return False
        if left:
            msg += " suppressed=%d"
            args += (left,)
        kwargs.setdefault("stacklevel", 2)
        logger.log(level, msg, *args, **kwargs)
        return True

    def __len__(self) -> int:
        return len(self._keys)


def failure_kind(exc: BaseException) -> tuple:
    """What tells one failure from another in a LogLimit key: the exception's type and
    its errno (a disk's EIO and its ENOSPC are both OSError), never its text, which
    names the request (a chunk, an offset) and would make a key per request."""
    return type(exc), getattr(exc, "errno", None)
