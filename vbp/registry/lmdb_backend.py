"""The embedded registry backend: `lmdb://DIR`, the default for one machine.

Several blockd processes and the CLI open the same LMDB environment at once. LMDB's own
multi-process locking makes that safe: one writer at a time (a robust mutex in the lock
file), readers never blocked, every write transaction durable at commit. We keep write
transactions short (one registry operation each) so no process holds the writer long.

LMDB forbids opening one environment twice in a process (closing either handle drops the
other's POSIX locks), so environments are shared per process and path, and reopened in a
forked child. TTL keys store an expiry on the machine's boot clock, shared by every
process using the directory, and read as absent once it has passed (vbp.registry.local).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Sequence

import lmdb

from vbp.errors import RegistryUnavailable
from vbp.registry import local
from vbp.registry.kv import Cmp, Item, Op

MAP_SIZE = 1 << 30  # sparse; the registry holds metadata only
MAX_READERS = 1024
# Seconds between two sweeps of the reader table by a process that writes (reader_check).
# A process killed inside a read transaction leaves its slot holding that snapshot, and
# LMDB reuses no page freed after it: every commit of the processes that stay up takes
# new pages (about 7 a heartbeat) until the map is full and every write of the registry
# fails, heartbeats first, so that every host is published down. A sweep at open alone
# never reaches a blockd that runs for months.
READER_CHECK_EVERY = 1.0

_ENVS: dict[str, tuple[int, lmdb.Environment, int]] = {}  # path -> (pid, env, refs)
_ENVS_LOCK = threading.Lock()


def _open_env(path: str) -> lmdb.Environment:
    with _ENVS_LOCK:
        entry = _ENVS.get(path)
        if entry and entry[0] == os.getpid():
            _ENVS[path] = (entry[0], entry[1], entry[2] + 1)
            return entry[1]
        if not os.path.isdir(path):
            # Only the last component is created: a mistyped path is reported, not built.
            if not os.path.isdir(os.path.dirname(path)):
                raise FileNotFoundError(f"parent directory {os.path.dirname(path)} does not exist")
            os.makedirs(path, exist_ok=True)
        env = lmdb.open(path, map_size=MAP_SIZE, max_readers=MAX_READERS, subdir=True,
                        lock=True, max_dbs=0)
        env.reader_check()  # free reader slots left by crashed processes
        _ENVS[path] = (os.getpid(), env, 1)
        return env


def _close_env(path: str) -> None:
    with _ENVS_LOCK:
        entry = _ENVS.get(path)
        if not entry or entry[0] != os.getpid():
            return
        if entry[2] > 1:
            _ENVS[path] = (entry[0], entry[1], entry[2] - 1)
        else:
            del _ENVS[path]
            entry[1].close()



def _under(t, prefix: bytes):
    """The (key, entry) pairs of transaction `t` whose key starts with `prefix`, in order."""
    cur = t.cursor()
    if cur.set_range(prefix):
        for k, v in cur:
            if not k.startswith(prefix):
                return
            yield k, v

class LmdbKV:
    def __init__(self, url: str, path: str) -> None:
        self.url = url
        self.path = os.path.abspath(path)
        try:
            self._env = _open_env(self.path)
        except (lmdb.Error, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e  # (not the path again)
            raise RegistryUnavailable(f"registry {url}: cannot open LMDB at {self.path}: {why}") from None
        self._closed = False
        self._swept = time.monotonic()  # (at the open: _open_env)

    def _sweep(self, force: bool = False) -> None:
        """Free the reader slots of dead processes, at most every READER_CHECK_EVERY
        (`force`: now)."""
        now = time.monotonic()
        if force or now - self._swept >= READER_CHECK_EVERY:
            self._swept = now
            self._env.reader_check()

    def _write(self, fn):
        """fn(txn) in a write transaction; a full map is met once more after a sweep of
        the reader table (what a dead reader pinned is free again then)."""
        self._check()
        try:
            self._sweep()
            try:
                with self._env.begin(write=True) as t:
                    return fn(t)
            except lmdb.MapFullError:
                self._sweep(force=True)
                with self._env.begin(write=True) as t:
                    return fn(t)
        except lmdb.MapFullError as e:
            raise RegistryUnavailable(
                f"registry {self.url}: the LMDB map at {self.path} is full "
                f"({MAP_SIZE >> 20} MiB): {e}") from None
        except lmdb.Error as e:
            raise self._fail("write", e) from None

    def _fail(self, what: str, e: Exception) -> RegistryUnavailable:
        return RegistryUnavailable(f"registry {self.url}: LMDB {what} failed: {type(e).__name__}: {e}")

    def _check(self) -> None:
        if self._closed:
            raise RegistryUnavailable(f"registry {self.url} is closed")

    def get(self, key: bytes) -> tuple[Item | None, int]:
        self._check()
        try:
            with self._env.begin() as t:
                return local.decode(key, t.get(key), local.now(t.get)), local.read_rev(t.get)
        except lmdb.Error as e:
            raise self._fail("read", e) from None

    def range(self, prefix: bytes) -> tuple[list[Item], int]:
        self._check()
        out = []
        try:
            with self._env.begin() as t:
                at = local.now(t.get)
                for k, v in _under(t, prefix):
                    it = local.decode(k, v, at)
                    if it is not None:
                        out.append(it)
                return out, local.read_rev(t.get)
        except lmdb.Error as e:
            raise self._fail("read", e) from None

    def wall_clock_keys(self, prefix: bytes) -> list[bytes]:
        """Keys under `prefix` whose live TTL entry the code before the boot clock wrote
        (vbp.registry.local.on_wall_clock)."""
        self._check()
        try:
            with self._env.begin() as t:
                at = local.now(t.get)
                return [k for k, v in _under(t, prefix) if local.on_wall_clock(v, at)]
        except lmdb.Error as e:
            raise self._fail("read", e) from None

    def txn(self, compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
        return self._write(lambda t: local.apply_txn(t.get, t.put, t.delete,
                                                     lambda: list(t.cursor()), compares, ops))

    def keep_alive(self, key: bytes, ttl: float) -> bool:
        # (no revision: watchers see nothing)
        return self._write(lambda t: local.keep_alive(t.get, t.put, key, ttl))

    def wait(self, prefix: bytes, after_rev: int, timeout: float,
             refreshes: bytes | None = None) -> bool:
        # LMDB has no change notification: poll the revision briefly. (True: keys lapse
        # with no write, so a change cannot be ruled out.)
        deadline = time.monotonic() + min(timeout, 0.25)
        while time.monotonic() < deadline:
            if self._rev() > after_rev:
                return True
            time.sleep(0.05)
        return True

    def changes(self, prefix: bytes, after_rev: int, timeout: float) -> tuple[list[bytes] | None, int]:
        """Polled as wait() is; one revision for all keys: a change anywhere is None."""
        deadline = time.monotonic() + timeout
        while True:
            rev = self._rev()
            if rev > after_rev:
                return None, rev
            if time.monotonic() >= deadline:
                return [], after_rev
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))

    def compact(self, revision: int) -> None:
        """LMDB keeps the current values only: nothing to drop."""

    def _rev(self) -> int:
        self._check()
        try:
            with self._env.begin() as t:
                return local.read_rev(t.get)
        except lmdb.Error as e:
            raise self._fail("read", e) from None

    def ttl_floor(self) -> float:
        return 0.0  # (a key's ttl is the one asked)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _close_env(self.path)
