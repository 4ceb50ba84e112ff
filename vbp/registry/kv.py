"""The small key-value contract every registry backend implements.

Theory of operation: the registry (vbp.registry.base) is written once against this contract,
which is the common ground of etcd v3 and an embedded LMDB store:

- every committed write advances one store-wide revision counter; an item remembers the
  revision that created it and the one that last modified it (`create_rev`, `mod_rev`);
- `txn` is an atomic compare-and-set: all compares hold -> all ops applied at one new
  revision, else nothing changes. Comparing `mod_rev == 0` means "the key is absent";
- `put(..., ttl=)` writes a key that disappears by itself after `ttl` seconds unless
  written again or kept alive (etcd: a lease; LMDB: a stored expiry, expired keys read as
  absent); `keep_alive` gives it `ttl` seconds more with no new revision, so no watcher
  is told of it (etcd: the lease kept alive);
- `wait` blocks until something under a prefix changes after a revision, or a timeout.

Keys and values are bytes. Backends raise vbp.errors.RegistryUnavailable for every failure
of the store itself, naming the URL and what failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True, slots=True)
class Item:
    key: bytes
    value: bytes
    create_rev: int
    mod_rev: int


@dataclass(frozen=True, slots=True)
class Cmp:
    """A txn guard: `target` is "mod" (compare mod_rev, 0 = absent), "value", or "exists"
    (the key is present; `expected` is ignored)."""

    key: bytes
    target: str
    expected: int | bytes


@dataclass(frozen=True, slots=True)
class Put:
    """`ttl`: see the module's docstring. `lease_of`: a key this client kept alive (with
    the same ttl): on etcd the put joins that key's lease rather than be granted one (a
    grant and its expiry are two raft proposals); elsewhere it changes nothing. The key
    put then lives as long as that lease is kept alive, not `ttl` after the put."""

    key: bytes
    value: bytes
    ttl: float | None = None
    lease_of: bytes | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


Op = Put | Delete


class KV(Protocol):
    url: str

    def get(self, key: bytes) -> tuple[Item | None, int]:
        """The item (None if absent or expired) and the store revision it was read at."""

    def range(self, prefix: bytes) -> tuple[list[Item], int]:
        """Items whose key starts with prefix, sorted by key, and the store revision."""

    def txn(self, compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
        """Apply ops iff every compare holds. Returns (succeeded, revision)."""

    def keep_alive(self, key: bytes, ttl: float) -> bool:
        """Let the time-to-live key `key` live `ttl` seconds more from now, its value and
        revisions unchanged (no watcher is told). False when there is nothing to keep:
        absent, expired, stored without a time-to-live, or on etcd held by a lease of
        another time-to-live; then put it again."""

    def wait(self, prefix: bytes, after_rev: int, timeout: float,
             refreshes: bytes | None = None) -> bool:
        """Return when a key under prefix may have changed after after_rev, or on timeout.
        `refreshes`: a prefix of keys holding only a liveness mark; a put of one that exists
        already need not end the wait (a hint: a store may wake for it all the same).
        False only when the store knows nothing changed but refreshes (etcd: its watch
        told no other event; a key whose time-to-live ran out is deleted, an event), True
        otherwise (LMDB and memory: keys lapse with no change told, so always)."""

    def changes(self, prefix: bytes, after_rev: int, timeout: float) -> tuple[list[bytes] | None, int]:
        """wait() that says what changed: (the keys under prefix changed after after_rev,
        the revision they are told up to) once some did, ([], after_rev) once `timeout`
        passed with none; (None, rev) when the store cannot tell which keys changed: any
        may have, read them all again (after a read of `rev`, if it is -1). A store with
        one revision for all keys (LMDB, memory) answers None for a change anywhere."""

    def ttl_floor(self) -> float:
        """The shortest time-to-live the store keeps a key for, whatever was asked (etcd
        raises a lease to a minimum derived from its election timeout); 0 for none."""

    def compact(self, revision: int) -> None:
        """Drop the history of values older than `revision` (a store that keeps none: a
        no-op). Watches from before it end at once; their callers read again."""

    def close(self) -> None: ...


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with prefix (etcd's range_end)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\x00"  # etcd: "all keys"
