"""The chunk store in memory: same API and semantics as vbp.chunkstore.ChunkStore.

For deterministic simulation (CONVENTIONS.md 7, 8): a dict of chunks, each a dict of pages
with their checksums. It also models the non-durable disk: `crash(rng)` returns the store a
restart would find, where every chunk written since its last flush/fua keeps, page by page,
either its durable or its newest bytes (chosen by `rng`: a power loss; a process crash
keeps the newest, `power=False`), and its version goes past the
durable one (the last a flush or fua acknowledged) by 1 or by VERSION_SLACK (chosen by
`rng`): ChunkStore's recovery gives such a chunk its persisted version + VERSION_SLACK, and
the persisted one lags the acknowledged one by anything below VERSION_SLACK, so both ends
happen. (ChunkStore also recovers the chunks it kept marked through a flush, written or
not; the model recovers only those written since.) `corrupt(key, page)` flips a byte
behind the checksum's back, as a failing disk would.
"""

from __future__ import annotations

import random
import uuid
from typing import Iterable, Iterator, Sequence

from vbp.chunkstore_common import (
    PAGE_MASK, PAGE_SHIFT, ZERO_PAGE, ChunkInfo, StoreStats, check_chunk_size, check_key,
    VERSION_SLACK, check_range, check_version, marks_kept, page_checksum, runs,
)
from vbp.errors import ChecksumError, InvalidArgument, NoSpace, NotFound
from vbp.layout import PAGE_SIZE, ChunkKey


class _MemChunk:
    __slots__ = ("cs", "version", "pages", "slot")

    def __init__(self, cs: int, version: int, pages: dict[int, tuple[bytes, int]], slot: int):
        self.cs = cs
        self.version = version
        self.pages = pages  # page index -> (bytes, checksum); absent = hole
        self.slot = slot

    def copy(self) -> _MemChunk:
        return _MemChunk(self.cs, self.version, dict(self.pages), self.slot)


class MemoryChunkStore:
    def __init__(self, path=None, capacity: int = 0):
        if not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgument(f"capacity must be a non-negative byte count, not {capacity!r}")
        self.capacity = capacity
        self.verify_reads = True
        self._chunks: dict[ChunkKey, _MemChunk] = {}
        self._durable: dict[ChunkKey, _MemChunk] = {}
        self._dirty: set[ChunkKey] = set()
        # ChunkStore's takeover marks kept through a flush: chunk -> volume (_marks_kept)
        self._marks: dict[ChunkKey, str] = {}
        self.kept_marks: dict[ChunkKey, str] = {}
        self.recent_marks = None  # (the replica's, as ChunkStore.recent_marks)
        self._gens: dict[tuple[str, int], set[int]] = {}
        self.layout = 0  # bumped whenever a chunk comes or goes (ChunkStore.lookup)
        self._free: dict[int, list[int]] = {}
        self._nslots: dict[int, int] = {}
        self._used = 0
        self._checksum_errors = 0
        self.was_clean = True
        self.recovered: frozenset[ChunkKey] = frozenset()
        self.recovered_lost: frozenset[ChunkKey] = frozenset()
        self.store_id = uuid.uuid4().hex
        self.collected_gens: dict[str, frozenset[int]] = {}  # (ChunkStore.mark_collected)

    # --- collected generations (ChunkStore.mark_collected) --------------------------------

    def expire_collected(self) -> int:
        return 0  # (kept for the run: a simulation is shorter than COLLECTED_KEEP)

    def mark_collected(self, marks: dict[str, set[int]]) -> None:
        new = False
        for lineage, gens in marks.items():
            had = self.collected_gens.get(lineage, frozenset())
            if not had.issuperset(gens):
                self.collected_gens[lineage] = had | set(gens)
                new = True
        if new:
            self.layout += 1  # (ChunkStore.mark_collected)

    # --- queries --------------------------------------------------------------------------

    def info(self, key: ChunkKey) -> ChunkInfo | None:
        c = self._chunks.get(key)
        return None if c is None else ChunkInfo(ChunkKey(*key), c.cs, c.version, c.slot)

    def resolve(self, lineage: str, index: int, chain: Sequence[int]) -> int | None:
        gens = self._gens.get((lineage, index))
        if gens:
            for gen in reversed(chain):
                if gen in gens:
                    return gen
        return None

    def held(self, lineage: str, indexes: Iterable[int]) -> list[int]:
        """The chunks of `indexes` of which some generation is here, in their order: a
        lookup each (a block status scans a thin volume's ranges with it)."""
        gens = self._gens
        return [i for i in indexes if (lineage, i) in gens]

    def gens(self, lineage: str, index: int) -> list[int]:
        """The generations of chunk (lineage, index) held here, oldest first: without a
        walk over every key (a peer asks for each chunk scrub looks at)."""
        return sorted(self._gens.get((lineage, index), ()))

    def keys(self, lineage: str | None = None) -> Iterator[ChunkKey]:
        return iter([k for k in self._chunks if lineage is None or k.lineage == lineage])

    def stats(self) -> StoreStats:
        return StoreStats(self.capacity, self._used, max(0, self.capacity - self._used),
                          len(self._chunks), self._checksum_errors)

    def page_checksums(self, key: ChunkKey) -> tuple[int, list[int]]:
        c = self._get(key)
        sums = [0] * (c.cs >> PAGE_SHIFT)
        for p, (_, s) in c.pages.items():
            sums[p] = s
        return c.version, sums

    def extents(self, key: ChunkKey, offset: int, length: int) -> list[tuple[int, bool]]:
        c = self._get(key)
        check_range(offset, length, c.cs)
        if not length:
            return []
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        return runs([p not in c.pages for p in range(first, last + 1)], first, offset, length)

    def verify(self, key: ChunkKey) -> list[int]:
        c = self._get(key)
        bad = sorted(p for p, (data, s) in c.pages.items() if page_checksum(data) != s)
        self._checksum_errors += len(bad)
        return bad

    def failing_pages(self, key: ChunkKey, offset: int, length: int) -> list[int]:
        c = self._get(key)
        check_range(offset, length, c.cs)
        first, end = (offset + PAGE_SIZE - 1) >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        return sorted(p for p, (data, s) in c.pages.items()
                      if first <= p < end and page_checksum(data) != s)

    def _get(self, key) -> _MemChunk:
        c = self._chunks.get(key)
        if c is None:
            raise NotFound(f"chunk {tuple(key)!r} is not on this host")
        return c

    # --- read -----------------------------------------------------------------------------

    def lookup(self, key: ChunkKey):
        """ChunkStore.lookup: here the handle is the key."""
        return ChunkKey(*key) if key in self._chunks else None

    def read_at(self, key: ChunkKey, offset: int, length: int, ref: bool = False) -> bytes:
        return self.read(key, offset, length)

    def read(self, key: ChunkKey, offset: int, length: int) -> bytes:
        c = self._get(key)
        check_range(offset, length, c.cs)
        if not length:
            return b""
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        out = bytearray()
        for p in range(first, last + 1):
            out += self._page(key, c, p)
        start = first << PAGE_SHIFT
        return bytes(out[offset - start: offset - start + length])

    def read_ref(self, key: ChunkKey, offset: int, length: int) -> bytes:
        """ChunkStore.read_ref: there is no file to send from here, so the bytes."""
        return self.read(key, offset, length)

    def _page(self, key, c: _MemChunk, p: int) -> bytes:
        entry = c.pages.get(p)
        if entry is None:
            return ZERO_PAGE
        data, s = entry
        if self.verify_reads and page_checksum(data) != s:
            self._checksum_errors += 1
            raise ChecksumError(f"checksum mismatch in chunk {tuple(key)!r} page {p}",
                                key=ChunkKey(*key), page=p)
        return data

    # --- write and zero -------------------------------------------------------------------

    def write(self, key: ChunkKey, offset: int, data, *, chunk_size: int,
              base: int | None = None, version: int | None = None, fua: bool = False) -> int:
        data = bytes(data)
        c = self._prepare(key, offset, len(data), chunk_size, base, version)
        self._put(key, c, offset, data)
        return self._finish(key, c, version, fua)

    def zero(self, key: ChunkKey, offset: int, length: int, *, chunk_size: int,
             base: int | None = None, version: int | None = None, fua: bool = False) -> int:
        c = self._prepare(key, offset, length, chunk_size, base, version)
        end = offset + length
        a = (offset + PAGE_MASK) & ~PAGE_MASK
        b = end & ~PAGE_MASK
        if a >= b:
            self._put(key, c, offset, bytes(length))
        else:
            self._put(key, c, offset, bytes(a - offset))
            self._put(key, c, b, bytes(end - b))
            for p in range(a >> PAGE_SHIFT, b >> PAGE_SHIFT):
                c.pages.pop(p, None)
        return self._finish(key, c, version, fua)

    def _prepare(self, key, offset, length, chunk_size, base, version) -> _MemChunk:
        c = self._chunks.get(key)
        if c is None:
            key = check_key(key)
            check_chunk_size(chunk_size)
            check_range(offset, length, chunk_size)
            check_version(version)
            c = self._create(key, chunk_size, base)
        else:
            if chunk_size != c.cs:
                raise InvalidArgument(
                    f"chunk {tuple(key)!r} has size {c.cs}, the request says {chunk_size}"
                )
            check_range(offset, length, c.cs)
            check_version(version)
        self._dirty.add(ChunkKey(*key))
        return c

    def _create(self, key: ChunkKey, cs: int, base) -> _MemChunk:
        src = None
        if base is not None:
            if not isinstance(base, int) or base < 0:
                raise InvalidArgument(f"not a generation: {base!r}")
            if base != key.gen:
                src = self._chunks.get(ChunkKey(key.lineage, key.index, base))
            if src is not None and src.cs != cs:
                raise InvalidArgument(f"base chunk has size {src.cs}, not {cs}")
        if self._used + cs > self.capacity:
            raise NoSpace(f"no free slot of {cs} bytes: {self._used} of {self.capacity} used")
        free = self._free.setdefault(cs, [])
        if free:
            free.sort()
            slot = free.pop(0)
        else:
            slot = self._nslots.get(cs, 0)
            self._nslots[cs] = slot + 1
        c = _MemChunk(cs, 0, dict(src.pages) if src is not None else {}, slot)
        self.layout += 1
        self._chunks[key] = c
        self._durable[key] = c.copy()
        self._gens.setdefault((key.lineage, key.index), set()).add(key.gen)
        self._used += cs
        return c

    def _put(self, key, c: _MemChunk, offset: int, data: bytes) -> None:
        if not data:
            return
        first, last = offset >> PAGE_SHIFT, (offset + len(data) - 1) >> PAGE_SHIFT
        start = first << PAGE_SHIFT
        end = offset + len(data)
        buf = bytearray((last - first + 1) << PAGE_SHIFT)
        if offset & PAGE_MASK:
            buf[:PAGE_SIZE] = self._page(key, c, first)
        if end & PAGE_MASK and (last > first or not offset & PAGE_MASK):
            buf[-PAGE_SIZE:] = self._page(key, c, last)
        buf[offset - start: end - start] = data
        for i, p in enumerate(range(first, last + 1)):
            page = bytes(buf[i << PAGE_SHIFT: (i + 1) << PAGE_SHIFT])
            c.pages[p] = (page, page_checksum(page))

    def sync_chunks(self, keys) -> None:
        for key in keys:
            c = self._chunks.get(ChunkKey(*key))
            if c is not None:
                self._durable[ChunkKey(*key)] = c.copy()

    def _finish(self, key, c: _MemChunk, version, fua: bool) -> int:
        c.version = c.version + 1 if version is None else version
        if fua:
            self._durable[ChunkKey(*key)] = c.copy()
        return c.version

    def delete(self, key: ChunkKey) -> None:
        c = self._get(key)
        key = ChunkKey(*key)
        self.layout += 1
        del self._chunks[key]
        self._durable.pop(key, None)
        self._dirty.discard(key)
        self._marks.pop(key, None)
        gens = self._gens[(key.lineage, key.index)]
        gens.discard(key.gen)
        if not gens:
            del self._gens[(key.lineage, key.index)]
        self._free.setdefault(c.cs, []).append(c.slot)
        self._used -= c.cs

    def dirty_indexes(self, lineage: str, gen: int) -> list[int]:
        """Chunks of generation `gen` of `lineage` written since the last flush."""
        return sorted(k.index for k in self._dirty if k.lineage == lineage and k.gen == gen)

    # --- durability and faults --------------------------------------------------------------

    def has_clean(self) -> bool:
        return False

    def mark_dirty(self, keys) -> None:
        """Nothing to mark ahead here (ChunkStore.mark_dirty): no index to commit."""

    aheads = 0  # (ChunkStore.aheads, writeback_limiter)
    writeback_limiter = None

    def sync_ahead(self) -> None:
        """Nothing to sync ahead of a flush here (ChunkStore.sync_ahead)."""
        return None

    def writeback_due(self) -> bool:
        return False

    def flush(self) -> None:
        for key in self._dirty:
            self._durable[key] = self._chunks[key].copy()
        if self._dirty and self.recent_marks is not None:  # (ChunkStore._marks_kept)
            put, gone = marks_kept(self._marks, self._dirty, self.recent_marks())
            for k in gone:
                del self._marks[k]
            self._marks.update(put)
        self._dirty.clear()

    def forget_recovered(self) -> None:
        """ChunkStore.forget_recovered."""
        self.recovered = self.recovered_lost = frozenset()

    def close(self) -> None:
        self.flush()

    def crash(self, rng: random.Random, *, power: bool = True) -> MemoryChunkStore:
        """The store as found after a crash: see the module docstring. `power=False`: a
        process crash, the page cache kept (every page its newest bytes)."""
        new = MemoryChunkStore(None, self.capacity)
        new.was_clean = False
        new.store_id = self.store_id  # the same disk
        # listed until forgotten (ChunkStore keep_recovered): a crash before then keeps them
        new.recovered = self.recovered | frozenset(self._dirty)
        new.recovered_lost = self.recovered_lost | (frozenset(self._dirty) if power else frozenset())
        new._marks = dict(self._marks)
        new.kept_marks = dict(self._marks)
        new._free = {cs: list(v) for cs, v in self._free.items()}
        new._nslots = dict(self._nslots)
        for key, c in self._chunks.items():
            d = self._durable[key].copy()
            if key in self._dirty:
                for p in set(c.pages) | set(d.pages):
                    pick = c.pages.get(p) if not power or rng.random() < 0.5 else d.pages.get(p)
                    if pick is None:
                        d.pages.pop(p, None)
                    else:
                        d.pages[p] = pick
                d.version += rng.choice((1, VERSION_SLACK))
            new._chunks[key] = d
            new._durable[key] = d.copy()
            new._gens.setdefault((key.lineage, key.index), set()).add(key.gen)
            new._used += c.cs
        return new

    def corrupt(self, key: ChunkKey, page: int) -> None:
        """Flip one byte of a real page without updating its checksum."""
        c = self._get(key)
        data, s = c.pages[page]
        c.pages[page] = (bytes([data[0] ^ 0xFF]) + data[1:], s)

    def fsck(self) -> list[str]:
        """Nothing can disagree in memory; here for API parity with ChunkStore."""
        return []

    def check(self) -> list[str]:
        """Pages that do not match their checksums (only `corrupt` makes any); API parity."""
        return [f"chunk {k}: pages {bad[:8]} do not match their checksums"
                for k in sorted(self._chunks) if (bad := self.verify(k))]

    def __enter__(self) -> MemoryChunkStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
