"""One suite, two stores: vbp.chunkstore.ChunkStore (disk) and MemoryChunkStore (simulation).

Both must behave identically, down to the per-page checksums scrub compares across hosts.
"""

from __future__ import annotations


import pytest
from xxhash import xxh3_64_intdigest

from vbp.chunkstore import ChunkInfo, ChunkStore, MemoryChunkStore, StoreStats
from vbp.errors import ChecksumError, InvalidArgument, NoSpace, NotFound
from vbp.layout import PAGE_SIZE, ChunkKey

CS = 64 * 1024  # small chunks keep the suite fast; the store accepts any power of two >= 4K
PAGES = CS // PAGE_SIZE
K = ChunkKey("lin", 3, 1)


class DiskFactory:
    name = "disk"

    def __init__(self, tmp_path):
        self.dir = tmp_path / "store"
        self.open_stores = []

    def make(self, capacity=16 * CS):
        s = ChunkStore(self.dir, capacity)
        self.open_stores.append(s)
        return s

    def reopen(self, store):
        store.close()
        return self.make(store.capacity)

    def corrupt(self, store, key, page):
        info = store.info(key)
        name = f"data-{CS // 1024}K.bin"
        with open(self.dir / name, "r+b") as f:
            pos = info.slot * info.chunk_size + page * PAGE_SIZE + 17
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ 0x5A]))

    def cleanup(self):
        for s in self.open_stores:
            s.close()


class MemoryFactory:
    name = "memory"

    def __init__(self, tmp_path):
        pass

    def make(self, capacity=16 * CS):
        return MemoryChunkStore(None, capacity)

    def reopen(self, store):
        store.close()
        return store

    def corrupt(self, store, key, page):
        store.corrupt(key, page)

    def cleanup(self):
        pass


@pytest.fixture(params=[DiskFactory, MemoryFactory], ids=["disk", "memory"])
def factory(request, tmp_path):
    f = request.param(tmp_path)
    yield f
    f.cleanup()


@pytest.fixture
def store(factory):
    return factory.make()


def pattern(seed: int, n: int) -> bytes:
    return bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(n))


def expected_sum(page: bytes) -> int:
    return xxh3_64_intdigest(page) or 1


# --- basics ---------------------------------------------------------------------------------


def test_missing_chunk(store):
    assert store.info(K) is None
    with pytest.raises(NotFound):
        store.read(K, 0, 10)
    with pytest.raises(NotFound):
        store.extents(K, 0, 10)
    with pytest.raises(NotFound):
        store.page_checksums(K)
    with pytest.raises(NotFound):
        store.delete(K)
    assert store.resolve("lin", 3, [0, 1, 2]) is None
    assert list(store.keys()) == []


def test_write_then_read_and_holes(store):
    data = pattern(1, PAGE_SIZE)
    assert store.write(K, PAGE_SIZE, data, chunk_size=CS) == 1
    assert store.read(K, PAGE_SIZE, PAGE_SIZE) == data
    assert store.read(K, 0, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert store.read(K, 0, CS) == bytes(PAGE_SIZE) + data + bytes(CS - 2 * PAGE_SIZE)
    assert store.read(K, 100, 0) == b""
    info = store.info(K)
    assert isinstance(info, ChunkInfo)
    assert (info.key, info.chunk_size, info.version) == (K, CS, 1)


def test_unaligned_writes_keep_neighbours(store):
    base = pattern(2, CS)
    store.write(K, 0, base, chunk_size=CS)
    model = bytearray(base)
    for off, n in [(1, 10), (4090, 20), (8191, 1), (PAGE_SIZE * 3 + 5, PAGE_SIZE * 2),
                   (CS - 3, 3), (0, CS)]:
        d = pattern(off + n, n)
        store.write(K, off, d, chunk_size=CS)
        model[off: off + n] = d
        assert store.read(K, 0, CS) == bytes(model)
        assert store.read(K, max(0, off - 7), min(CS, off + n + 7) - max(0, off - 7)) == \
            bytes(model[max(0, off - 7): off + n + 7])


def test_unaligned_write_into_holes(store):
    store.write(K, 5000, b"hello", chunk_size=CS)
    assert store.read(K, 4096, 4096) == bytes(904) + b"hello" + bytes(4096 - 909)
    assert store.extents(K, 0, CS) == [(4096, True), (4096, False), (CS - 8192, True)]


def test_memoryview_and_bytearray_input(store):
    buf = bytearray(pattern(3, 3 * PAGE_SIZE))
    store.write(K, 0, memoryview(buf)[PAGE_SIZE:], chunk_size=CS)
    store.write(K, 2 * PAGE_SIZE, buf[:10], chunk_size=CS)
    assert store.read(K, 0, 2 * PAGE_SIZE) == bytes(buf[PAGE_SIZE:])
    assert store.read(K, 2 * PAGE_SIZE, 10) == bytes(buf[:10])


def test_versions(store):
    assert store.write(K, 0, b"a", chunk_size=CS) == 1
    assert store.write(K, 0, b"b", chunk_size=CS) == 2
    assert store.write(K, 0, b"c", chunk_size=CS, version=10) == 10
    assert store.zero(K, 0, 1, chunk_size=CS) == 11
    assert store.write(K, 0, b"d", chunk_size=CS, version=42, fua=True) == 42
    assert store.info(K).version == 42
    assert store.page_checksums(K)[0] == 42


def test_invalid_requests(store):
    with pytest.raises(InvalidArgument):
        store.write(K, CS - 1, b"ab", chunk_size=CS)
    with pytest.raises(InvalidArgument):
        store.write(K, -1, b"a", chunk_size=CS)
    with pytest.raises(InvalidArgument):
        store.write(K, 0, b"a", chunk_size=3000)
    with pytest.raises(InvalidArgument):
        store.write(("", 0, 0), 0, b"a", chunk_size=CS)
    assert store.info(K) is None  # nothing allocated by refused requests
    store.write(K, 0, b"a", chunk_size=CS)
    with pytest.raises(InvalidArgument):
        store.write(K, 0, b"a", chunk_size=2 * CS)
    with pytest.raises(InvalidArgument):
        store.read(K, CS - 10, 11)
    with pytest.raises(InvalidArgument):
        store.zero(K, CS - 10, 11, chunk_size=CS)
    with pytest.raises(InvalidArgument):
        store.extents(K, 0, CS + 1)
    assert store.stats().chunks == 1


# --- zero and extents -----------------------------------------------------------------------


def test_zero_makes_holes_and_partial_zeros(store):
    store.write(K, 0, pattern(4, CS), chunk_size=CS)
    store.zero(K, 100, 3 * PAGE_SIZE, chunk_size=CS)  # pages 1, 2 whole; 0 and 3 partial
    got = store.read(K, 0, CS)
    want = bytearray(pattern(4, CS))
    want[100: 100 + 3 * PAGE_SIZE] = bytes(3 * PAGE_SIZE)
    assert got == bytes(want)
    assert store.extents(K, 0, CS) == [(PAGE_SIZE, False), (2 * PAGE_SIZE, True),
                                       (CS - 3 * PAGE_SIZE, False)]
    _, sums = store.page_checksums(K)
    assert sums[1] == sums[2] == 0 and sums[0] != 0 and sums[3] != 0
    store.zero(K, 10, 20, chunk_size=CS)  # inside one page: written, not a hole
    assert store.read(K, 0, 40) == want[:10] + bytes(20) + want[30:40]
    assert store.extents(K, 0, PAGE_SIZE) == [(PAGE_SIZE, False)]


def test_zero_whole_chunk_and_creation(store):
    v = store.zero(K, 0, CS, chunk_size=CS)
    assert v == 1
    assert store.read(K, 0, CS) == bytes(CS)
    assert store.extents(K, 0, CS) == [(CS, True)]
    store.write(K, 0, pattern(5, CS), chunk_size=CS)
    store.zero(K, 0, CS, chunk_size=CS)
    assert store.read(K, 0, CS) == bytes(CS)
    assert store.page_checksums(K)[1] == [0] * PAGES


def test_extents_clip_to_range(store):
    store.write(K, PAGE_SIZE, bytes(PAGE_SIZE), chunk_size=CS)  # written zeros are data
    assert store.extents(K, 10, 100) == [(100, True)]
    assert store.extents(K, 4000, 200) == [(96, True), (104, False)]
    assert store.extents(K, 4000, 8300) == [(96, True), (4096, False), (4108, True)]
    assert store.extents(K, 0, 0) == []
    total = store.extents(K, 123, CS - 200)
    assert sum(n for n, _ in total) == CS - 200


# --- copy-up --------------------------------------------------------------------------------


def test_copy_up_from_base(store):
    parent = ChunkKey("lin", 3, 1)
    child = ChunkKey("lin", 3, 5)
    store.write(parent, 0, pattern(6, 2 * PAGE_SIZE), chunk_size=CS)
    store.write(parent, 5 * PAGE_SIZE, pattern(7, PAGE_SIZE), chunk_size=CS)
    v = store.write(child, PAGE_SIZE + 10, b"child", chunk_size=CS, base=1)
    assert v == 1
    want = bytearray(CS)
    want[: 2 * PAGE_SIZE] = pattern(6, 2 * PAGE_SIZE)
    want[5 * PAGE_SIZE: 6 * PAGE_SIZE] = pattern(7, PAGE_SIZE)
    parent_bytes = bytes(want)
    want[PAGE_SIZE + 10: PAGE_SIZE + 15] = b"child"
    assert store.read(child, 0, CS) == bytes(want)
    assert store.read(parent, 0, CS) == parent_bytes  # the base never changes
    assert store.extents(child, 0, CS) == [(2 * PAGE_SIZE, False), (3 * PAGE_SIZE, True),
                                           (PAGE_SIZE, False), (CS - 6 * PAGE_SIZE, True)]
    pv, psums = store.page_checksums(parent)
    cv, csums = store.page_checksums(child)
    assert csums[0] == psums[0] and csums[5] == psums[5] and csums[1] != psums[1]
    assert store.resolve("lin", 3, [1, 2, 5]) == 5
    assert store.resolve("lin", 3, [1, 2]) == 1
    # the copy is independent of its base
    store.delete(parent)
    assert store.read(child, 0, CS) == bytes(want)


def test_copy_up_only_on_creation_and_missing_base(store):
    child = ChunkKey("lin", 3, 5)
    store.write(child, 0, b"x", chunk_size=CS, base=1)  # base absent: a plain new chunk
    assert store.read(child, 0, 2) == b"x\0"
    store.write(ChunkKey("lin", 3, 1), 0, b"parent", chunk_size=CS)
    store.write(child, 10, b"y", chunk_size=CS, base=1)  # exists: no copy-up
    assert store.read(child, 0, 11) == b"x" + bytes(9) + b"y"


def test_zero_with_copy_up(store):
    store.write(ChunkKey("lin", 3, 1), 0, pattern(8, CS), chunk_size=CS)
    child = ChunkKey("lin", 3, 2)
    store.zero(child, PAGE_SIZE, PAGE_SIZE, chunk_size=CS, base=1)
    want = bytearray(pattern(8, CS))
    want[PAGE_SIZE: 2 * PAGE_SIZE] = bytes(PAGE_SIZE)
    assert store.read(child, 0, CS) == bytes(want)


# --- allocation, capacity, delete -----------------------------------------------------------


def test_capacity_nospace_and_reuse(factory):
    store = factory.make(capacity=3 * CS)
    keys = [ChunkKey("lin", i, 0) for i in range(3)]
    for i, k in enumerate(keys):
        store.write(k, 0, pattern(i, 100), chunk_size=CS)
    st = store.stats()
    assert st == StoreStats(3 * CS, 3 * CS, 0, 3, 0)
    with pytest.raises(NoSpace):
        store.write(ChunkKey("lin", 9, 0), 0, b"x", chunk_size=CS)
    with pytest.raises(NoSpace):
        store.zero(ChunkKey("lin", 9, 0), 0, 1, chunk_size=CS)
    with pytest.raises(NoSpace):
        store.write(ChunkKey("lin", 0, 7), 0, b"x", chunk_size=CS, base=0)
    assert store.info(ChunkKey("lin", 9, 0)) is None
    # writes inside existing chunks still work at capacity
    store.write(keys[1], 200, b"more", chunk_size=CS)
    slot = store.info(keys[1]).slot
    store.delete(keys[1])
    assert store.info(keys[1]) is None
    assert store.stats().used == 2 * CS
    new = ChunkKey("other", 0, 0)
    store.write(new, 0, b"new", chunk_size=CS)
    assert store.info(new).slot == slot  # the freed slot is reused
    assert store.read(new, 0, CS) == b"new" + bytes(CS - 3)  # nothing of the deleted chunk
    for i in (0, 2):
        assert store.read(keys[i], 0, 100) == pattern(i, 100)
    assert store.fsck() == []


def test_delete_and_recreate_same_key(store):
    store.write(K, 0, pattern(9, CS), chunk_size=CS)
    store.delete(K)
    assert store.resolve("lin", 3, [1]) is None
    assert store.write(K, 10, b"z", chunk_size=CS) == 1
    assert store.read(K, 0, CS) == bytes(10) + b"z" + bytes(CS - 11)


def test_keys_and_resolve(factory, store):
    for lin, idx, gen in [("a", 0, 1), ("a", 0, 3), ("a", 1, 1), ("b", 0, 2)]:
        store.write(ChunkKey(lin, idx, gen), 0, b"x", chunk_size=CS)
    assert sorted(store.keys()) == sorted([ChunkKey("a", 0, 1), ChunkKey("a", 0, 3),
                                           ChunkKey("a", 1, 1), ChunkKey("b", 0, 2)])
    assert sorted(store.keys("a")) == [ChunkKey("a", 0, 1), ChunkKey("a", 0, 3),
                                       ChunkKey("a", 1, 1)]
    assert store.resolve("a", 0, [1, 2, 3, 4]) == 3
    assert store.resolve("a", 0, (1, 2)) == 1
    assert store.resolve("a", 0, []) is None
    assert store.resolve("a", 1, [2]) is None
    assert store.resolve("c", 0, [1]) is None
    assert (store.gens("a", 0), store.gens("a", 1), store.gens("a", 2)) == ([1, 3], [1], [])
    assert store.held("a", range(0, 4)) == [0, 1]
    assert store.held("a", [1, 0, 7]) == [1, 0]  # (in the order asked)
    assert (store.held("b", range(5)), store.held("c", range(5))) == ([0], [])
    for k in list(store.keys("a")):
        store.delete(k)
    assert list(store.keys()) == [ChunkKey("b", 0, 2)]
    assert store.held("a", range(0, 4)) == []
    store = factory.reopen(store)  # (the index, read back)
    assert store.held("b", range(5)) == [0]


def test_mixed_chunk_sizes(store):
    a, b = ChunkKey("a", 0, 0), ChunkKey("b", 0, 0)
    store.write(a, 0, pattern(1, 100), chunk_size=CS)
    store.write(b, 2 * CS - 100, pattern(2, 100), chunk_size=2 * CS)
    assert store.read(a, 0, 100) == pattern(1, 100)
    assert store.read(b, 2 * CS - 100, 100) == pattern(2, 100)
    assert store.stats().used == 3 * CS


# --- checksums ------------------------------------------------------------------------------


def test_page_checksums_are_xxh3(store):
    data = pattern(10, 2 * PAGE_SIZE)
    store.write(K, 2 * PAGE_SIZE, data, chunk_size=CS, version=7)
    version, sums = store.page_checksums(K)
    assert version == 7 and len(sums) == PAGES
    assert sums[2] == expected_sum(data[:PAGE_SIZE])
    assert sums[3] == expected_sum(data[PAGE_SIZE:])
    assert sums[0] == 0 and sums[4] == 0


def test_corruption_is_detected_and_counted(factory, store):
    store.write(K, 0, pattern(11, 4 * PAGE_SIZE), chunk_size=CS)
    store.flush()
    factory.corrupt(store, K, 2)
    with pytest.raises(ChecksumError) as ei:
        store.read(K, 2 * PAGE_SIZE, PAGE_SIZE)
    assert ei.value.key == K and ei.value.page == 2
    with pytest.raises(ChecksumError):
        store.read(K, 0, CS)
    with pytest.raises(ChecksumError):  # merging a partial write would launder the damage
        store.write(K, 2 * PAGE_SIZE + 1, b"x", chunk_size=CS)
    assert store.stats().checksum_errors == 3
    assert store.read(K, 0, 2 * PAGE_SIZE) == pattern(11, 2 * PAGE_SIZE)  # others are fine
    store.write(K, 2 * PAGE_SIZE, bytes(PAGE_SIZE), chunk_size=CS)  # a whole-page rewrite heals
    assert store.read(K, 2 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_verify_finds_rotten_pages(factory, store):
    store.write(K, 0, pattern(14, CS), chunk_size=CS)
    store.zero(K, 0, PAGE_SIZE, chunk_size=CS)
    assert store.verify(K) == []
    factory.corrupt(store, K, 3)
    factory.corrupt(store, K, 9)
    assert store.verify(K) == [3, 9]
    assert store.stats().checksum_errors == 2
    with pytest.raises(NotFound):
        store.verify(ChunkKey("nope", 0, 0))


def test_failing_pages_names_the_whole_pages_of_a_range_that_fail_uncounted(factory, store):
    store.write(K, 0, pattern(16, 12 * PAGE_SIZE), chunk_size=CS)
    factory.corrupt(store, K, 3)
    factory.corrupt(store, K, 9)
    assert store.failing_pages(K, 0, CS) == [3, 9]
    assert store.failing_pages(K, 3 * PAGE_SIZE, PAGE_SIZE) == [3]
    assert store.failing_pages(K, 4 * PAGE_SIZE, 5 * PAGE_SIZE) == []  # (4..8)
    # whole pages only: a range ending inside page 9, or starting inside page 3
    assert store.failing_pages(K, 3 * PAGE_SIZE + 1, 6 * PAGE_SIZE + 99) == []  # (4..8)
    assert store.failing_pages(K, 3 * PAGE_SIZE + 1, 7 * PAGE_SIZE - 1) == [9]  # (4..9)
    assert store.failing_pages(K, 100, 10) == []
    assert store.failing_pages(K, 14 * PAGE_SIZE, PAGE_SIZE) == []  # (a hole)
    assert store.stats().checksum_errors == 0
    with pytest.raises(InvalidArgument):
        store.failing_pages(K, CS - PAGE_SIZE, 2 * PAGE_SIZE)
    with pytest.raises(NotFound):
        store.failing_pages(ChunkKey("nope", 0, 0), 0, PAGE_SIZE)


def test_check_reports_pages_that_disagree_with_their_checksums(factory, store):
    store.write(K, 0, pattern(15, 3 * PAGE_SIZE), chunk_size=CS)
    store.write(ChunkKey("lin", 1, 1), PAGE_SIZE, b"x", chunk_size=CS)
    store.flush()
    assert store.check() == []
    factory.corrupt(store, K, 1)
    problems = store.check()
    assert len(problems) == 1 and "pages [1]" in problems[0] and str(K) in problems[0]


def test_same_operations_same_checksums(tmp_path):
    """Scrub compares checksums across hosts: both stores must produce identical ones."""
    disk = ChunkStore(tmp_path / "d", 8 * CS)
    mem = MemoryChunkStore(None, 8 * CS)
    try:
        for s in (disk, mem):
            s.write(K, 0, pattern(12, CS), chunk_size=CS)
            s.zero(K, 3000, 3 * PAGE_SIZE, chunk_size=CS)
            s.write(K, 9 * PAGE_SIZE + 3, b"abc", chunk_size=CS, version=99)
            s.write(ChunkKey("lin", 3, 2), 77, b"q", chunk_size=CS, base=1)
        for k in (K, ChunkKey("lin", 3, 2)):
            assert disk.page_checksums(k) == mem.page_checksums(k)
            assert disk.read(k, 0, CS) == mem.read(k, 0, CS)
            assert disk.extents(k, 0, CS) == mem.extents(k, 0, CS)
    finally:
        disk.close()


# --- persistence ----------------------------------------------------------------------------


def test_reopen_keeps_everything(factory):
    store = factory.make()
    store.write(K, 0, pattern(13, CS), chunk_size=CS, version=5)
    store.zero(K, 0, PAGE_SIZE, chunk_size=CS)
    k2 = ChunkKey("lin", 4, 1)
    store.write(k2, 1, b"two", chunk_size=CS)
    store.write(ChunkKey("lin", 5, 1), 1, b"gone", chunk_size=CS)
    store.delete(ChunkKey("lin", 5, 1))
    before = {k: (store.info(k), store.read(k, 0, CS), store.page_checksums(k))
              for k in store.keys()}
    store = factory.reopen(store)
    after = {k: (store.info(k), store.read(k, 0, CS), store.page_checksums(k))
             for k in store.keys()}
    assert after == before
    assert store.info(K).version == 6
    assert store.resolve("lin", 4, [1]) == 1 and store.resolve("lin", 5, [1]) is None
    assert store.stats().used == 2 * CS
    assert store.write(K, 0, b"again", chunk_size=CS) == 7
    assert store.fsck() == []


def test_flush_and_fua_are_callable_any_time(store):
    store.flush()
    store.write(K, 0, b"x", chunk_size=CS, fua=True)
    store.flush()
    store.flush()
    store.zero(K, 0, CS, chunk_size=CS, fua=True)
    assert store.read(K, 0, 1) == b"\0"


def test_collected_generations_are_merged_and_kept_across_a_reopen(factory):
    """mark_collected: garbage collection freed these generations here (their volume or
    snapshot was deleted). The marks add up per lineage; the chunks still here and other
    lineages are untouched; the disk store keeps them through a reopen (the memory store
    has none)."""
    store = factory.make()
    store.write(ChunkKey("live", 0, 1), 0, b"kept", chunk_size=CS)
    assert store.collected_gens == {}
    before = store.layout
    store.mark_collected({"dead": {3, 4}, "dead2": {1}})
    assert store.layout != before  # (a gateway's read plans are made again)
    store.mark_collected({"dead": {5}})
    assert store.collected_gens == {"dead": {3, 4, 5}, "dead2": {1}}
    assert store.read(ChunkKey("live", 0, 1), 0, 4) == b"kept"
    if factory.name == "disk":
        store = factory.reopen(store)
        assert store.collected_gens == {"dead": {3, 4, 5}, "dead2": {1}}
