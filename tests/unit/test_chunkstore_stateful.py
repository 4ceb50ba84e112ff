"""The chunk stores against a deliberately naive model, driven by hypothesis.

The model is a dict of chunks: bytes, a hole flag per page, a version. Every step the store
must agree with it on content, holes, checksums, versions, keys and space; close/reopen
(the disk store really reopens its files) must change nothing.
"""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from xxhash import xxh3_64_intdigest

from vbp.chunkstore import ChunkStore, MemoryChunkStore
from vbp.errors import NoSpace, NotFound
from vbp.layout import PAGE_SIZE, ChunkKey

SIZES = {"a": 4 * PAGE_SIZE, "b": 8 * PAGE_SIZE}
CAPACITY = 5 * 4 * PAGE_SIZE

keys = st.builds(ChunkKey, st.sampled_from(sorted(SIZES)), st.integers(0, 2), st.integers(0, 2))


class ModelChunk:
    def __init__(self, cs):
        self.cs = cs
        self.data = bytearray(cs)
        self.holes = [True] * (cs // PAGE_SIZE)
        self.version = 0

    def copy(self):
        c = ModelChunk(self.cs)
        c.data[:] = self.data
        c.holes = list(self.holes)
        return c

    def write(self, off, data):
        if not data:
            return
        self.data[off: off + len(data)] = data
        for p in range(off // PAGE_SIZE, (off + len(data) + PAGE_SIZE - 1) // PAGE_SIZE):
            self.holes[p] = False

    def zero(self, off, n):
        self.write(off, bytes(n))
        for p in range(-(-off // PAGE_SIZE), (off + n) // PAGE_SIZE):
            self.holes[p] = True

    def sums(self):
        return [0 if h else (xxh3_64_intdigest(bytes(self.data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]))
                             or 1) for p, h in enumerate(self.holes)]


class StoreMachine(RuleBasedStateMachine):
    make_store = None

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="chunkstore-")
        self.store = self.open()
        self.model: dict[ChunkKey, ModelChunk] = {}

    def open(self):
        raise NotImplementedError

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def used(self):
        return sum(c.cs for c in self.model.values())

    def _target(self, key, base):
        """The model chunk a write to `key` lands in, creating (and copying up) like the store."""
        c = self.model.get(key)
        if c is not None:
            return c, False
        cs = SIZES[key.lineage]
        if self.used() + cs > CAPACITY:
            return None, True
        src = self.model.get(ChunkKey(key.lineage, key.index, base)) if base is not None else None
        c = src.copy() if src is not None and base != key.gen else ModelChunk(cs)
        c.version = 0
        return c, True

    @rule(key=keys, data=st.data(), base=st.none() | st.integers(0, 2),
          version=st.none() | st.integers(1, 1000), fua=st.booleans())
    def write(self, key, data, base, version, fua):
        cs = SIZES[key.lineage]
        off = data.draw(st.integers(0, cs), label="offset")
        n = data.draw(st.integers(0, min(cs - off, 3 * PAGE_SIZE)), label="length")
        payload = data.draw(st.binary(min_size=n, max_size=n), label="data") if n < 64 else \
            bytes((i * 7 + off) & 0xFF for i in range(n))
        c, created = self._target(key, base)
        if c is None:
            try:
                self.store.write(key, off, payload, chunk_size=cs, base=base)
            except NoSpace:
                return
            raise AssertionError("write beyond capacity accepted")
        v = self.store.write(key, off, payload, chunk_size=cs, base=base, version=version,
                             fua=fua)
        c.write(off, payload)
        c.version = c.version + 1 if version is None else version
        assert v == c.version
        self.model[key] = c

    @rule(key=keys, data=st.data(), base=st.none() | st.integers(0, 2))
    def zero(self, key, data, base):
        cs = SIZES[key.lineage]
        off = data.draw(st.integers(0, cs), label="offset")
        n = data.draw(st.integers(0, cs - off), label="length")
        c, created = self._target(key, base)
        if c is None:
            try:
                self.store.zero(key, off, n, chunk_size=cs, base=base)
            except NoSpace:
                return
            raise AssertionError("zero beyond capacity accepted")
        v = self.store.zero(key, off, n, chunk_size=cs, base=base)
        c.zero(off, n)
        c.version += 1
        assert v == c.version
        self.model[key] = c

    @rule(key=keys)
    def delete(self, key):
        if key in self.model:
            self.store.delete(key)
            del self.model[key]
        else:
            try:
                self.store.delete(key)
            except NotFound:
                return
            raise AssertionError("deleting a missing chunk succeeded")

    @rule()
    def flush(self):
        self.store.flush()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = self.open()

    @rule(key=keys, data=st.data())
    def read_range(self, key, data):
        cs = SIZES[key.lineage]
        off = data.draw(st.integers(0, cs), label="offset")
        n = data.draw(st.integers(0, cs - off), label="length")
        c = self.model.get(key)
        if c is None:
            try:
                self.store.read(key, off, n)
            except NotFound:
                return
            raise AssertionError("read of a missing chunk succeeded")
        assert self.store.read(key, off, n) == bytes(c.data[off: off + n])
        ext = self.store.extents(key, off, n)
        assert sum(length for length, _ in ext) == n
        pos = off
        for length, hole in ext:
            for p in range(pos // PAGE_SIZE, (pos + length - 1) // PAGE_SIZE + 1):
                assert c.holes[p] == hole, (key, off, n, ext)
            pos += length

    @invariant()
    def agrees_with_model(self):
        assert sorted(self.store.keys()) == sorted(self.model)
        for key, c in self.model.items():
            assert self.store.page_checksums(key) == (c.version, c.sums())
            assert self.store.info(key).version == c.version
            assert self.store.resolve(key.lineage, key.index, [key.gen]) == key.gen
        st_ = self.store.stats()
        assert st_.used == self.used() and st_.chunks == len(self.model)
        assert st_.checksum_errors == 0
        assert self.store.fsck() == []


class DiskMachine(StoreMachine):
    def open(self):
        return ChunkStore(self.dir, CAPACITY)

    @invariant()
    def full_content(self):
        for key, c in self.model.items():
            assert self.store.read(key, 0, c.cs) == bytes(c.data)


class MemoryMachine(StoreMachine):
    def open(self):
        if getattr(self, "_mem", None) is None:
            self._mem = MemoryChunkStore(None, CAPACITY)
        return self._mem


_settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestDiskStore = DiskMachine.TestCase
TestDiskStore.settings = _settings
TestMemoryStore = MemoryMachine.TestCase
TestMemoryStore.settings = _settings
