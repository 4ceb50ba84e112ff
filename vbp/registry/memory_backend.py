"""An in-memory KV (`memory://NAME`): the registry for simulations and unit tests.

Same semantics as the LMDB backend (vbp.registry.local); registries opened with the same
NAME in one process share one store, like several processes sharing one LMDB directory.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

from vbp.registry import local
from vbp.registry.kv import Cmp, Item, Op

_STORES: dict[str, "_Store"] = {}
_STORES_LOCK = threading.Lock()


class _Store:
    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.cond = threading.Condition()


class MemoryKV:
    def __init__(self, url: str, name: str) -> None:
        self.url = url
        with _STORES_LOCK:
            self._store = _STORES.setdefault(name, _Store())

    def get(self, key: bytes) -> tuple[Item | None, int]:
        with self._store.cond:
            d = self._store.data
            return local.decode(key, d.get(key), local.now(d.get)), local.read_rev(d.get)

    def range(self, prefix: bytes) -> tuple[list[Item], int]:
        with self._store.cond:
            d = self._store.data
            at = local.now(d.get)
            items = [local.decode(k, v, at) for k, v in sorted(d.items()) if k.startswith(prefix)]
            return [it for it in items if it is not None], local.read_rev(d.get)

    def wall_clock_keys(self, prefix: bytes) -> list[bytes]:
        """As LmdbKV.wall_clock_keys."""
        with self._store.cond:
            d = self._store.data
            at = local.now(d.get)
            return sorted(k for k, v in d.items() if k.startswith(prefix) and local.on_wall_clock(v, at))

    def txn(self, compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
        with self._store.cond:
            d = self._store.data
            ok, rev = local.apply_txn(d.get, d.__setitem__, d.__delitem__,
                                      lambda: list(d.items()), compares, ops)
            if ok and ops:
                self._store.cond.notify_all()
            return ok, rev

    def keep_alive(self, key: bytes, ttl: float) -> bool:
        with self._store.cond:  # (no revision, no one woken: nothing changed)
            d = self._store.data
            return local.keep_alive(d.get, d.__setitem__, key, ttl)

    def wait(self, prefix: bytes, after_rev: int, timeout: float,
             refreshes: bytes | None = None) -> bool:
        with self._store.cond:
            if local.read_rev(self._store.data.get) <= after_rev:
                self._store.cond.wait(min(timeout, 0.25))
        return True  # (keys lapse with no change told: see LmdbKV.wait)

    def changes(self, prefix: bytes, after_rev: int, timeout: float) -> tuple[list[bytes] | None, int]:
        """As LmdbKV.changes: one revision for all keys."""
        deadline = time.monotonic() + timeout
        with self._store.cond:
            while True:
                rev = local.read_rev(self._store.data.get)
                if rev > after_rev:
                    return None, rev
                left = deadline - time.monotonic()
                if left <= 0:
                    return [], after_rev
                self._store.cond.wait(left)

    def compact(self, revision: int) -> None:
        """Current values only: nothing to drop."""

    def ttl_floor(self) -> float:
        return 0.0  # (a key's ttl is the one asked)

    def close(self) -> None:
        pass
