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

import vbp.chunkstore as chunkstore
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
        self.boot = 0  # the power came back: the kernel's boot id changed

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
        self.boot += 1
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

    def sync_paths(paths):  # a flush's first half (sync_ahead), through descriptors of its own
        d.maybe_die()
        orig_sync_paths(paths)
        for p in paths:
            d.synced(os.path.basename(p))

    orig_sync, orig_sync_data, orig_sync_sums = space.sync, space.sync_data, space.sync_sums
    orig_sync_paths = files.sync_paths
    monkeypatch.setattr(chunkstore, "sync_paths", sync_paths)
    monkeypatch.setattr(chunkstore, "SYNC_AHEAD_MIN", 0)  # every flush here syncs ahead
    monkeypatch.setattr(chunkstore, "boot_id", lambda: f"boot-{d.boot}")
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
        # copy-ups not made durable since (no flush, no fua on them): a power loss drops
        # them whole, and reads fall back to their base
        self.fresh: set[ChunkKey] = set()
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
        self.fresh.discard(key)

    def delete(self, key):
        for d in (self.cur, self.cands, self.version, self.durable_version):
            d.pop(key, None)
        self.gone.add(key)
        self.fresh.discard(key)


def run_workload(store, model, rng, seq0):
    zero = bytes(PAGE_SIZE)
    for i in range(OPS):
        seq = seq0 + i
        r = rng.random()
        key = ChunkKey("p", rng.randrange(4), rng.choice((0, 0, 1)))
        if r < 0.1:
            if rng.random() < 0.5:  # as flush_store does: the writeback first, then the flush
                ahead = store.sync_ahead()
                if ahead is not None:
                    ahead()
            store.flush()
            for k in list(model.cur):
                model.durable(k)
            continue
        if r < 0.13:  # a flush's first half alone (the flush came later, or never): it
            ahead = store.sync_ahead()  # makes bytes durable, and promises nothing
            if ahead is not None:
                ahead()
            continue
        if r < 0.16:  # marks ahead of a batch of writes (some never come)
            store.mark_dirty([ChunkKey("p", rng.randrange(4), rng.choice((0, 1)))
                              for _ in range(rng.randint(1, 3))])
            continue
        if r < 0.19:
            if key in model.cur:
                model.inflight = key
                store.delete(key)
                model.delete(key)
                model.inflight = None
                if key.gen == 0 and ChunkKey("p", key.index, 1) in model.fresh:
                    model.fresh.clear()  # a copy was made from it: every copy-up synced first
            continue
        first = rng.randrange(PAGES)
        n = rng.randint(1, min(3, PAGES - first))
        fua = rng.random() < 0.2
        base = 0 if key.gen == 1 else None
        if key not in model.cur:
            if store.stats().used + CS > CAPACITY:
                continue
            src = ChunkKey("p", key.index, 0)
            copy_up = base == 0 and src in model.cur
            pages = list(model.cur[src]) if copy_up else [zero] * PAGES
            model.create(key, pages)  # creation is durable when it returns
            if copy_up:  # ... but a copy-up only with the next flush or fua
                model.fresh.add(key)
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
        later = fua and rng.random() < 0.5  # as a replica answers a FUA write (Replica.handle):
        v = call(key, first * PAGE_SIZE, arg, chunk_size=CS, base=base, fua=fua and not later)
        model.applied(key, values, v)
        model.inflight = None
        if later:  # applied without the flag, the writeback ahead (when there is much to
            if rng.random() < 0.5:  # write back), then the chunk's own sync
                ahead = store.sync_ahead()
                if ahead is not None:
                    ahead()
            store.sync_chunks([key])
        if fua:
            model.durable(key)


def check(store, model):
    assert store.fsck() == []
    k = model.inflight
    # an interrupted delete of a copy's base: it syncs every copy-up first, not only that one
    settling = (k is not None and k.gen == 0 and k in model.cur
                and ChunkKey("p", k.index, 1) in model.fresh)
    if k is not None:  # an interrupted create or delete may or may not have happened
        if store.info(k) is None:
            model.delete(k)
    for f in list(model.fresh):  # a copy-up never made durable is dropped by a power loss
        if settling and store.info(f) is not None:
            continue  # ... unless the interrupted delete of a base synced it first
        assert store.info(f) is None, f"{f}: a copy-up never synced outlived a power loss"
        model.delete(f)
        model.gone.discard(f)  # not deleted: it may be made again from its base
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
def test_power_loss(disk, tmp_path, seed, monkeypatch):
    if seed % 2:  # a hot set of one chunk: most flushes mark chunks clean, whose checksums
        monkeypatch.setattr(chunkstore, "HOT_MAX", 1)  # must then be durable
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



def copy_up_then(disk, tmp_path, then):
    """A chunk written and flushed (gen 0), a copy-up of it (gen 1) written without a
    flush, `then(store)`, then the power fails: what the reopened store holds."""
    store = ChunkStore(tmp_path, CAPACITY)
    base, copy = ChunkKey("p", 0, 0), ChunkKey("p", 0, 1)
    store.write(base, 0, page_value(1, 0) * 2, chunk_size=CS)
    store.flush()
    syncs = []
    disk.maybe_die = lambda: syncs.append(1)
    store.write(copy, PAGE_SIZE, page_value(2, 1), chunk_size=CS, base=0)
    assert not syncs, "a copy-up synced the data file"
    then(store)
    store._close_files()
    disk.power_off()
    return ChunkStore(tmp_path, CAPACITY), base, copy


def test_a_copy_up_never_synced_is_dropped_by_a_power_loss(disk, tmp_path):
    disk.rng = random.Random(1)
    store, base, copy = copy_up_then(disk, tmp_path, lambda s: None)
    try:
        assert store.info(copy) is None and copy in store.recovered
        assert copy in store.recovered_lost  # (another boot id: its record says so)
        assert store.read(base, 0, PAGE_SIZE) == page_value(1, 0)
        assert store.fsck() == []
    finally:
        store.close()


def test_a_copy_up_survives_a_process_crash(tmp_path):
    """SIGKILL keeps the page cache (same boot): the copy and its write are kept."""
    store = ChunkStore(tmp_path, CAPACITY)
    base, copy = ChunkKey("p", 0, 0), ChunkKey("p", 0, 1)
    store.write(base, 0, page_value(1, 0), chunk_size=CS)
    store.flush()
    store.write(copy, PAGE_SIZE, page_value(2, 1), chunk_size=CS, base=0)
    store._close_files()
    store = ChunkStore(tmp_path, CAPACITY)
    try:
        assert store.read(copy, 0, 2 * PAGE_SIZE) == page_value(1, 0) + page_value(2, 1)
        assert copy in store.recovered and store.fsck() == []
        assert store.recovered_lost == frozenset()  # (the same boot: nothing lost)
    finally:
        store.close()


@pytest.mark.parametrize("then", ["fua", "flush", "delete base"])
def test_a_copy_up_made_durable_outlives_a_power_loss(disk, tmp_path, then):
    """A fua on the copy, a flush, or deleting the base it was made from (which syncs the
    copies first) make it durable: after the power loss it holds the base's bytes."""
    disk.rng = random.Random(2)
    base = ChunkKey("p", 0, 0)

    def act(store):
        if then == "fua":
            store.write(ChunkKey("p", 0, 1), 0, page_value(3, 0), chunk_size=CS, fua=True)
        elif then == "flush":
            store.flush()
        else:
            store.delete(base)
    store, base, copy = copy_up_then(disk, tmp_path, act)
    try:
        first = page_value(3, 0) if then == "fua" else page_value(1, 0)
        got = store.read(copy, 0, 2 * PAGE_SIZE)
        assert got[:PAGE_SIZE] == first, then
        if then != "delete base":  # the write after the copy was not made durable then
            assert got[PAGE_SIZE:] == page_value(2, 1), then
        assert store.fsck() == []
    finally:
        store.close()
