"""The KV semantics shared by the two local backends (LMDB and in-memory).

A stored entry is msgpack [value, create_rev, mod_rev, expires]; `expires` is 0 for a key
without a TTL, and for a TTL key minus its expiry on this machine's boot clock
(CLOCK_BOOTTIME, `clock`). Every process of the machine reads the same boot clock, and no
step of the wall clock moves it (an NTP step, a clock set by hand), so a step neither
publishes live hosts down nor keeps a dead one up. The boot clock starts again at each
boot: the store names the boot its expiries belong to (the kernel's boot id, under
BOOT_KEY), and the first write of another boot removes every TTL entry (their writers did
not outlive the reboot); until then they read as run out.

A positive `expires` is an expiry on the wall clock, as the code before the boot clock
wrote them: such an entry is judged by the wall clock, so that a process of that code
sharing the store is still seen alive. That code reads a negative expiry as run out (and
keys of processes of this code as absent) without error. An entry whose expiry has passed
reads as absent, compares as absent (mod_rev 0) and is overwritten as a new key. The
store revision and boot live under REV_KEY and BOOT_KEY, outside the registry's `vbp/`
key space.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, NamedTuple, Sequence

import msgpack

from vbp.errors import RegistryUnavailable
from vbp.registry.kv import Cmp, Delete, Item, Op, Put

REV_KEY = b"\x00rev"
BOOT_KEY = b"\x00boot"
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

Getter = Callable[[bytes], bytes | None]
Setter = Callable[[bytes, bytes], None]
Deleter = Callable[[bytes], None]
Scanner = Callable[[], Iterable[tuple[bytes, bytes]]]


def clock() -> float:
    """Seconds on this machine's boot clock: the same in every process, counting time
    asleep (suspend), never stepped."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


_boot: str | None = None


def boot_id() -> str:
    """The kernel's id of this boot (read once): a new one at each boot."""
    global _boot
    if _boot is None:
        try:
            with open(BOOT_ID_PATH) as f:
                _boot = f.read().strip()
        except OSError as e:
            raise RegistryUnavailable(
                f"the local registry times its keys on the boot clock, and cannot read this "
                f"boot's id from {BOOT_ID_PATH}: {e.strerror or e} (is /proc mounted?)") from None
    return _boot


class Now(NamedTuple):
    """When TTL entries are judged: the boot clock's reading, the wall clock's, and
    whether the store's expiries are of this boot."""
    t: float
    wall: float
    this_boot: bool


def now(get: Getter) -> Now:
    raw = get(BOOT_KEY)
    return Now(clock(), time.time(), raw is not None and raw.decode() == boot_id())


def _live(expires: float, at: Now) -> bool:
    if not expires:
        return True
    if expires < 0:
        return at.this_boot and -expires > at.t
    return expires > at.wall  # (written by the code before the boot clock)


def encode(value: bytes, create_rev: int, mod_rev: int, expires: float) -> bytes:
    return msgpack.packb([value, create_rev, mod_rev, expires], use_bin_type=True)


def _fields(raw: bytes) -> list:
    """An entry's four fields. (An entry of five, the boot id last, was written by a
    version of this code for a few minutes: its expiry, on the boot clock, is far behind
    the wall clock it is then judged by, so it reads as run out.)"""
    return msgpack.unpackb(raw, raw=False)[:4]


def decode(key: bytes, raw: bytes | None, at: Now) -> Item | None:
    if raw is None:
        return None
    value, create_rev, mod_rev, expires = _fields(raw)
    if not _live(expires, at):
        return None
    return Item(key, value, create_rev, mod_rev)


def on_wall_clock(raw: bytes, at: Now) -> bool:
    """A live TTL entry the code before the boot clock wrote (a positive expiry)."""
    expires = _fields(raw)[3]
    return expires > 0 and _live(expires, at)


def read_rev(get: Getter) -> int:
    raw = get(REV_KEY)
    return int(raw) if raw else 0


def _this_boot(get: Getter, put: Setter, delete: Deleter, scan: Scanner, at: Now) -> Now:
    """In a write transaction: the store's expiries made this boot's, the TTL entries of
    another boot removed first (their expiries are on a boot clock that started again)."""
    if at.this_boot:
        return at
    gone = [k for k, raw in scan() if not k.startswith(b"\x00") and _fields(raw)[3] < 0]
    for k in gone:
        delete(k)
    put(BOOT_KEY, boot_id().encode())
    return at._replace(this_boot=True)


def apply_txn(get: Getter, put: Setter, delete: Deleter, scan: Scanner,
              compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
    """Run a txn inside the backend's own write transaction (`scan`: every key and entry
    of the store, read once at the first write of a boot)."""
    at = now(get)
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
    if any(isinstance(op, Put) and op.ttl is not None for op in ops):
        at = _this_boot(get, put, delete, scan, at)
    for op in ops:
        if isinstance(op, Put):
            old = decode(op.key, get(op.key), at)
            expires = -(at.t + op.ttl) if op.ttl is not None else 0
            put(op.key, encode(op.value, old.create_rev if old else rev, rev, expires))
        elif isinstance(op, Delete):
            if get(op.key) is not None:
                delete(op.key)
        else:
            raise ValueError(f"unknown op {op!r}")
    put(REV_KEY, b"%d" % rev)
    return True, rev


def keep_alive(get: Getter, put: Setter, key: bytes, ttl: float) -> bool:
    """KV.keep_alive inside the backend's own write transaction: the entry's expiry moved
    to `ttl` seconds from now, its value and revisions (and the store's) unchanged. False
    for an entry on the wall clock too (written by the code before the boot clock)."""
    raw = get(key)
    if raw is None:
        return False
    at = now(get)
    value, create_rev, mod_rev, expires = _fields(raw)
    if expires >= 0 or not _live(expires, at):
        # (no TTL, run out, or on the wall clock: the caller puts it again, on this boot's
        # clock, apply_txn)
        return False
    put(key, encode(value, create_rev, mod_rev, -(at.t + ttl)))
    return True
