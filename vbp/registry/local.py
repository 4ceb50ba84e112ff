"""The KV semantics shared by the two local backends (LMDB and in-memory).

A stored entry is msgpack [value, create_rev, mod_rev, expires] (expires 0 = never), and
a TTL entry [value, create_rev, mod_rev, expires, boot]: its expiry on this machine's boot
clock (CLOCK_BOOTTIME, `clock`) in the boot `boot` names (the kernel's boot id). Every
process of the machine reads the same boot clock, and no step of the wall clock moves it
(an NTP step, a clock set by hand), so a step neither publishes live hosts down nor keeps
a dead one up. A TTL entry of another boot, or of the format before (an expiry on the wall
clock, no boot), has run out: its writer did not outlive the reboot. An entry whose
expiry has passed reads as absent, compares as absent (mod_rev 0) and is overwritten as a
new key. The store revision lives under REV_KEY, outside the registry's `vbp/` key space.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import msgpack

from vbp.registry.kv import Cmp, Delete, Item, Op, Put

REV_KEY = b"\x00rev"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

Getter = Callable[[bytes], bytes | None]
Setter = Callable[[bytes, bytes], None]
Deleter = Callable[[bytes], None]


def clock() -> float:
    """Seconds on this machine's boot clock: the same in every process, counting time
    asleep (suspend), never stepped."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_boot: str | None = None


def boot_id() -> str:
    """The kernel's id of this boot (read once): a new one at each boot."""
    global _boot
    if _boot is None:
        with open(BOOT_ID_PATH) as f:
            _boot = f.read().strip()
    return _boot


class Now(NamedTuple):
    """When TTL entries are judged: the boot clock's reading in boot `boot`."""
    t: float
    boot: str


def now() -> Now:
    return Now(clock(), boot_id())


def encode(value: bytes, create_rev: int, mod_rev: int, expires: float, boot: str = "") -> bytes:
    entry = [value, create_rev, mod_rev, expires]
    if expires:
        entry.append(boot)
    return msgpack.packb(entry, use_bin_type=True)


def _live(entry: list, at: Now) -> bool:
    expires = entry[3]
    return not expires or (len(entry) > 4 and entry[4] == at.boot and expires > at.t)


def decode(key: bytes, raw: bytes | None, at: Now) -> Item | None:
    if raw is None:
        return None
    entry = msgpack.unpackb(raw, raw=False)
    if not _live(entry, at):
        return None
    return Item(key, entry[0], entry[1], entry[2])


def read_rev(get: Getter) -> int:
    raw = get(REV_KEY)
    return int(raw) if raw else 0


def apply_txn(get: Getter, put: Setter, delete: Deleter,
              compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
    """Run a txn inside the backend's own write transaction."""
    at = now()
    rev = read_rev(get)
    for c in compares:
        item = decode(c.key, get(c.key), at)
        if c.target == "mod":
            held = (item.mod_rev if item else 0) == c.expected
        elif c.target == "value":
            held = item is not None and item.value == c.expected
        elif c.target == "exists":
            held = item is not None
        else:
            raise ValueError(f"unknown compare target {c.target!r}")
        if not held:
            return False, rev
    if not ops:
        return True, rev
    rev += 1
    for op in ops:
        if isinstance(op, Put):
            old = decode(op.key, get(op.key), at)
            expires = at.t + op.ttl if op.ttl is not None else 0
            put(op.key, encode(op.value, old.create_rev if old else rev, rev, expires, at.boot))
        elif isinstance(op, Delete):
            if get(op.key) is not None:
                delete(op.key)
        else:
            raise ValueError(f"unknown op {op!r}")
    put(REV_KEY, b"%d" % rev)
    return True, rev


def keep_alive(get: Getter, put: Setter, key: bytes, ttl: float) -> bool:
    """KV.keep_alive inside the backend's own write transaction: the entry's expiry moved
    to `ttl` seconds from now, its value and revisions (and the store's) unchanged."""
    raw = get(key)
    if raw is None:
        return False
    at = now()
    entry = msgpack.unpackb(raw, raw=False)
    if not entry[3] or not _live(entry, at):
        return False
    put(key, encode(entry[0], entry[1], entry[2], at.t + ttl, at.boot))
    return True
