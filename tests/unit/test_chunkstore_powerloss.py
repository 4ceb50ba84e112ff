"""Power loss on a non-durable disk (CONVENTIONS.md 8), for the real on-disk store.

SIGKILL (tests/faults) keeps the page cache; power loss does not. Here every write to the
data files and checksum sidecars that no fdatasync/msync covered is, page by page, either
lost or kept, and the machine may die right before any sync or any index commit. LMDB is
taken as correct (each commit durable, atomic). The store's sync points are wrapped to take
the durable images, since the store has no seam for this: it is a fault injector, not a mock.

Checked after every crash: the index partitions the slots (fsck), every page reads without
a checksum error, and holds either its last acknowledged-durable value or a value written
since; versions never fall below an acknowledged one; deleted chunks stay deleted.
"""

from __future__ import annotations

import os
import random

import pytest

import vbp.chunkstore_files as files
from vbp.chunkstore import ChunkStore
from vbp.errors import ChecksumError
from vbp.layout import PAGE_SIZE, ChunkKey

CS = 64 * 1024
PAGES = CS // PAGE_SIZE
CAPACITY = 6 * CS
SEEDS = 60
OPS = 60
STATS = {"crashes": 0}


class PowerLoss(BaseException):
    """The machine died (not an Exception: nothing in the store may catch it)."""


class Disk:
    """Durable images of the store's files, taken at each sync."""

    def __init__(self, root, rng):
        self.root = root
        self.rng = rng
        self.images: dict[str, bytearray] = {}
        self.crash_chance = 0.0

    def maybe_die(self):
        if self.rng.random() < self.crash_chance:
            raise PowerLoss

    def read(self, name):
        with open(os.path.join(self.root, name), "rb") as f:
            return bytearray(f.read())

    def synced(self, name, start=0, end=None):
        cur = self.read(name)
        img = self.images.setdefault(name, bytearray())
        end = len(cur) if end is None else min(end, len(cur))
        if len(img) < end:
            img.extend(bytes(end - len(img)))
        img[start:end] = cur[start:end]
        if end == len(cur):
            del img[len(cur):]

    def power_off(self):
        """Rewrite every data/sums file as the disk would hold it after the power came back."""
        for name in os.listdir(self.root):
            if not name.endswith(".bin"):
                continue
            cur = self.read(name)
            img = self.images.get(name, bytearray())
            size = self.rng.choice([len(cur), len(img)])
            out = bytearray(size)
            for off in range(0, size, PAGE_SIZE):
                a, b = cur[off: off + PAGE_SIZE], img[off: off + PAGE_SIZE]
                page = a if self.rng.random() < 0.5 else b
                out[off: off + len(page)] = page
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(out)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(str(tmp_path), None)
    space = files.Space

    def name(sp, kind):
        return f"{kind}-{files.size_name(sp.cs)}.bin"

    def sync(sp):
        d.maybe_die()
        orig_sync(sp)
        d.synced(name(sp, "data"))
        d.synced(name(sp, "sums"))

    def sync_data(sp):
        d.maybe_die()
        orig_sync_data(sp)
        d.synced(name(sp, "data"))

    def sync_sums(sp, slot):
        d.maybe_die()
        orig_sync_sums(sp, slot)
        start = slot * sp.ppc * 8
        a = start - start % 4096
        d.synced(name(sp, "sums"), a, -(-(start + sp.ppc * 8) // 4096) * 4096)

    def txn_exit(self, exc_type, exc, tb):
        if exc_type is None and d.rng.random() < d.crash_chance:
            self.txn.abort()
            raise PowerLoss
        return orig_exit(self, exc_type, exc, tb)

    orig_sync, orig_sync_data, orig_sync_sums = space.sync, space.sync_data, space.sync_sums
    orig_exit = files.Txn.__exit__
    monkeypatch.setattr(space, "sync", sync)
    monkeypatch.setattr(space, "sync_data", sync_data)
    monkeypatch.setattr(space, "sync_sums", sync_sums)
    monkeypatch.setattr(files.Txn, "__exit__", txn_exit)
    return d


def page_value(seq, p):
    return (b"%08d:%02d|" % (seq, p)) * (PAGE_SIZE // 12) + b"#" * (PAGE_SIZE % 12)


class Model:
    """Per chunk and page: the acknowledged-durable value and every value written since."""

    def __init__(self):
        self.cur: dict[ChunkKey, list[bytes]] = {}
        self.cands: dict[ChunkKey, list[set[bytes]]] = {}
        self.version: dict[ChunkKey, int] = {}
        self.durable_version: dict[ChunkKey, int] = {}
        self.gone: set[ChunkKey] = set()
        self.inflight: ChunkKey | None = None  # created or deleted by the interrupted call

    def create(self, key, pages):
        self.cur[key] = list(pages)
        self.cands[key] = [{v} for v in pages]
        self.version[key] = self.durable_version[key] = 0
        self.gone.discard(key)

    def propose(self, key, page, value):
        self.cands[key][page].add(value)

    def applied(self, key, pages_values, version):
        for p, v in pages_values:
            self.cur[key][p] = v
        self.version[key] = version

    def durable(self, key):
        self.cands[key] = [{v} for v in self.cur[key]]
        self.durable_version[key] = self.version[key]

    def delete(self, key):
        for d in (self.cur, self.cands, self.version, self.durable_version):
            d.pop(key, None)
        self.gone.add(key)


def run_workload(store, model, rng, seq0):
    zero = bytes(PAGE_SIZE)
    for i in range(OPS):
        seq = seq0 + i
        r = rng.random()
        key = ChunkKey("p", rng.randrange(4), rng.choice((0, 0, 1)))
        if r < 0.1:
            store.flush()
            for k in list(model.cur):
                model.durable(k)
            continue
        if r < 0.16:
            if key in model.cur:
                model.inflight = key
                store.delete(key)
                model.delete(key)
                model.inflight = None
            continue
        first = rng.randrange(PAGES)
        n = rng.randint(1, min(3, PAGES - first))
        fua = rng.random() < 0.2
        base = 0 if key.gen == 1 else None
        if key not in model.cur:
            if store.stats().used + CS > CAPACITY:
                continue
            src = ChunkKey("p", key.index, 0)
            pages = list(model.cur[src]) if base == 0 and src in model.cur else [zero] * PAGES
            model.create(key, pages)  # creation (and copy-up) is durable when it returns
            model.inflight = key
        if r < 0.3:
            values = [(p, zero) for p in range(first, first + n)]
            call = store.zero
            arg = n * PAGE_SIZE
        elif r < 0.45:  # inside one page: read-modify-write of that page
            o = rng.randrange(PAGE_SIZE - 1)
            piece = b"%d/" % seq * rng.randint(1, 20)
            piece = piece[: PAGE_SIZE - o]
            old = model.cur[key][first]
            values = [(first, old[:o] + piece + old[o + len(piece):])]
            for p, v in values:
                model.propose(key, p, v)
            v = store.write(key, first * PAGE_SIZE + o, piece, chunk_size=CS, base=base, fua=fua)
            model.applied(key, values, v)
            model.inflight = None
            if fua:
                model.durable(key)
            continue
        else:
            values = [(p, page_value(seq, p)) for p in range(first, first + n)]
            call = store.write
            arg = b"".join(v for _, v in values)
        for p, v in values:
            model.propose(key, p, v)
        v = call(key, first * PAGE_SIZE, arg, chunk_size=CS, base=base, fua=fua)
        model.applied(key, values, v)
        model.inflight = None
        if fua:
            model.durable(key)


def check(store, model):
    assert store.fsck() == []
    k = model.inflight
    if k is not None:  # an interrupted create or delete may or may not have happened
        if store.info(k) is None:
            model.delete(k)
    for key in model.gone:
        assert store.info(key) is None, f"{key} was deleted, came back"
    for key, cands in model.cands.items():
        info = store.info(key)
        assert info is not None, f"{key} lost"
        assert info.version >= model.durable_version[key]
        for p in range(PAGES):
            try:
                got = store.read(key, p * PAGE_SIZE, PAGE_SIZE)
            except ChecksumError as e:
                raise AssertionError(f"checksum error on {key} page {p}") from e
            assert got in cands[p], f"{key} page {p}: {got[:12]!r} not among {len(cands[p])}"
    assert set(store.keys()) == set(model.cands)
    assert store.stats().checksum_errors == 0


@pytest.mark.parametrize("seed", range(SEEDS))
def test_power_loss(disk, tmp_path, seed):
    rng = random.Random(seed)
    disk.rng = rng
    model = Model()
    for round_ in range(3):
        store = ChunkStore(tmp_path, CAPACITY)
        # what the reopen found is durable now (recovery synced it)
        for k in model.cur:
            model.cur[k] = [store.read(k, p * PAGE_SIZE, PAGE_SIZE) for p in range(PAGES)]
            model.version[k] = store.info(k).version
            model.durable(k)
        disk.crash_chance = rng.choice([0.0, 0.05, 0.2])
        try:
            run_workload(store, model, rng, round_ * 1000)
        except PowerLoss:
            STATS["crashes"] += 1
        disk.crash_chance = 0.0
        store._close_files()  # the process is gone with the power
        disk.power_off()
        store = ChunkStore(tmp_path, CAPACITY)
        try:
            check(store, model)
        except AssertionError as e:
            raise AssertionError(f"seed {seed} round {round_}: {e}") from e
        finally:
            store.close()
        # the clean close is durable: take it as the disk's image
        for name in os.listdir(tmp_path):
            if name.endswith(".bin"):
                disk.synced(name)
