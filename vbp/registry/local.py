"""The KV semantics shared by the two local backends (LMDB and in-memory).

A stored entry is msgpack [value, create_rev, mod_rev, expires] (expires 0 = never); an
entry whose expiry has passed reads as absent, compares as absent (mod_rev 0) and is
overwritten as a new key. The store revision lives under REV_KEY, outside the registry's
`vbp/` key space.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import msgpack

from vbp.registry.kv import Cmp, Delete, Item, Op, Put

REV_KEY = b"\x00rev"

Getter = Callable[[bytes], bytes | None]
Setter = Callable[[bytes, bytes], None]
Deleter = Callable[[bytes], None]


def encode(value: bytes, create_rev: int, mod_rev: int, expires: float) -> bytes:
    return msgpack.packb([value, create_rev, mod_rev, expires], use_bin_type=True)


def decode(key: bytes, raw: bytes | None, now: float) -> Item | None:
    if raw is None:
        return None
    value, create_rev, mod_rev, expires = msgpack.unpackb(raw, raw=False)
    if expires and expires <= now:
        return None
    return Item(key, value, create_rev, mod_rev)


def read_rev(get: Getter) -> int:
    raw = get(REV_KEY)
    return int(raw) if raw else 0


def apply_txn(get: Getter, put: Setter, delete: Deleter,
              compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
    """Run a txn inside the backend's own write transaction."""
    now = time.time()
    rev = read_rev(get)
    for c in compares:
        item = decode(c.key, get(c.key), now)
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
            old = decode(op.key, get(op.key), now)
            expires = now + op.ttl if op.ttl is not None else 0
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
    to `ttl` seconds from now, its value and revisions (and the store's) unchanged."""
    raw = get(key)
    if raw is None:
        return False
    now = time.time()
    value, create_rev, mod_rev, expires = msgpack.unpackb(raw, raw=False)
    if not expires or expires <= now:
        return False
    put(key, encode(value, create_rev, mod_rev, now + ttl))
    return True
