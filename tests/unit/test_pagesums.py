"""vbp.pagesums: page checksums of whole ranges in one call (the C extension, and the
Python functions that stand in where it is not built), and the chunk store's reads and
writes through them: every page's checksum is page_checksum's, a damaged page anywhere in
a large range is named, holes are never checked, bad arguments are errors."""

from __future__ import annotations

import ctypes
import errno
import os
import random
from array import array

import pytest
from hypothesis import given, settings, strategies as st

from vbp import pagesums
from vbp.chunkstore import ChunkStore
from vbp.chunkstore_common import FileRange, page_checksum
from vbp.errors import ChecksumError
from vbp.layout import PAGE_SIZE, ChunkKey

IMPLS = [pytest.param((pagesums.fill, pagesums.check), id="native"),
         pytest.param((pagesums.py_fill, pagesums.py_check), id="python")]
CS = 1 << 20
K = ChunkKey("lin", 0, 1)


def test_the_extension_is_built():
    """The suite runs on the C extension (the Python functions only stand in where it is
    not built): a failed build must not pass unnoticed as slower code."""
    assert pagesums.NATIVE
    assert type(pagesums.check).__name__ == "builtin_function_or_method"


@pytest.mark.parametrize("native", [True, False])
def test_blockd_says_when_checksums_run_in_python(tmp_path, monkeypatch, caplog, native):
    """Where the extension is not built blockd still runs, on the stand-ins, and says so
    once at its start (an operator would otherwise see only slower large requests)."""
    import trio

    from blockd.config import Config
    from blockd.service import Blockd

    monkeypatch.setattr(pagesums, "NATIVE", native)
    cfg = Config(host_id="h1", data_dir=str(tmp_path / "h1"),
                 registry=f"lmdb://{tmp_path / 'registry'}", listen="127.0.0.1:0",
                 nbd="127.0.0.1:0", capacity=64 << 20)

    async def start():
        async with trio.open_nursery() as nursery:
            await nursery.start(Blockd(cfg).run)
            nursery.cancel_scope.cancel()

    with caplog.at_level("WARNING", logger="vbp.blockd"):
        trio.run(start)
    said = [r.getMessage() for r in caplog.records if "event=checksums_in_python" in r.getMessage()]
    assert len(said) == (0 if native else 1), said


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=80, deadline=None)
@given(pages=st.lists(st.sampled_from([b"", b"\0", b"\xa5", b"x" * 17]) | st.binary(max_size=64),
                      max_size=12),
       first=st.integers(0, 5), extra=st.integers(0, 3))
def test_fill_writes_each_pages_checksum(impl, pages, first, extra):
    fill, _ = impl
    data = b"".join(p.ljust(PAGE_SIZE, p[-1:] or b"\0") for p in pages)
    table = array("Q", [7]) * (first + len(pages) + extra)
    fill(data, table, first)
    want = [page_checksum(data[o:o + PAGE_SIZE]) for o in range(0, len(data), PAGE_SIZE)]
    assert table.tolist() == [7] * first + want + [7] * extra
    assert 0 not in want


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), holes=st.sets(st.integers(0, 39)),
       damaged=st.sets(st.integers(0, 39), max_size=3), first=st.integers(0, 3))
def test_check_names_the_first_damaged_page_and_skips_holes(impl, seed, n, holes, damaged,
                                                            first):
    fill, check = impl
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(n * PAGE_SIZE))
    table = array("Q", [0]) * (first + n)
    fill(data, table, first)
    for h in holes & set(range(n)):
        table[first + h] = 0  # a hole: whatever the bytes, never checked
    for d in damaged & set(range(n)):
        data[d * PAGE_SIZE + rng.randrange(PAGE_SIZE)] ^= 1 << rng.randrange(8)
    bad = sorted((damaged - holes) & set(range(n)))
    assert check(bytes(data), table, first) == (bad[0] if bad else -1)
    assert check(memoryview(data), memoryview(table), first) == (bad[0] if bad else -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_are_errors(impl):
    fill, check = impl
    page, table = bytes(PAGE_SIZE), array("Q", [0, 0])
    for fn in (fill, check):
        with pytest.raises(ValueError):
            fn(page + b"x", table, 0)  # not whole pages
        for first in (-1, 2, 1 << 62):
            with pytest.raises(ValueError):
                fn(page, table, first)  # outside the table
        with pytest.raises(ValueError):
            fn(page * 3, table, 0)  # more pages than entries
        with pytest.raises(ValueError):
            fn(page, bytearray(12), 0)  # not a table of uint64s
        with pytest.raises(TypeError):
            fn(page, table)
        with pytest.raises(TypeError):
            fn("text", table, 0)
    with pytest.raises((TypeError, BufferError)):
        fill(page, bytes(16), 0)  # a read-only table
    fill(b"", table, 2)  # nothing to do, at the end of the table
    assert check(b"", table, 2) == -1 and table.tolist() == [0, 0]


PUTS = [pytest.param(pagesums.put, id="native"), pytest.param(pagesums.py_put, id="python")]


def _kernel_has_cachestat() -> bool:
    """Whether cachestat(2) (Linux 6.5) answers here, as the extension's put asks it before
    a write in pieces: on x86-64 or arm64 (number 451), not refused by the kernel or a
    system call filter, on a file of the file system the tests' files are on."""
    import platform
    import tempfile

    if platform.machine() not in ("x86_64", "aarch64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    rng, stats = (ctypes.c_uint64 * 2)(0, PAGE_SIZE), (ctypes.c_uint64 * 5)()
    with tempfile.TemporaryFile() as f:
        return libc.syscall(451, f.fileno(), rng, stats, 0) == 0


CACHESTAT = _kernel_has_cachestat()


@pytest.mark.parametrize("put", PUTS)
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), piece=st.integers(1, 12),
       first=st.integers(0, 3), at=st.integers(0, 9), cached=st.booleans())
def test_put_writes_every_byte_in_place_then_each_pages_checksum(tmp_path_factory, put, seed,
                                                                 n, piece, first, at, cached):
    """put: the data lands at its offset, the bytes around it untouched, whatever the
    pieces (whole pages or not); then the table holds fill's checksums for its pages. The
    range is either in the page cache already (the file written all over first: the
    extension writes it in one piece) or a hole never read (in pieces)."""
    rng = random.Random(seed)
    data = rng.randbytes(n * PAGE_SIZE)
    path = tmp_path_factory.mktemp("p") / "f"
    size = (at + n + 2) * PAGE_SIZE
    if cached:
        path.write_bytes(b"\x77" * size)
    else:  # (the bytes around the range only: the range is a hole, no page of it cached)
        with open(path, "wb") as f:
            f.write(b"\x77" * (at * PAGE_SIZE))
            f.truncate((at + n) * PAGE_SIZE)
            f.seek(0, os.SEEK_END)
            f.write(b"\x77" * (2 * PAGE_SIZE))
    table, want = array("Q", [7]) * (first + n + 1), array("Q", [7]) * (first + n + 1)
    pagesums.fill(data, want, first)
    fd = os.open(path, os.O_RDWR)
    try:
        took = put(fd, data, at * PAGE_SIZE, piece * 1000, table, first)
    finally:
        os.close(fd)
    whole = put is pagesums.put and cached and CACHESTAT and len(data) > piece * 1000
    if whole:
        # (or in pieces: the kernel may have dropped a page of the file since it was
        # written, under the load of another process, as one CI run saw;
        # test_put_goes_in_one_piece_only_where_every_page_is_cached checks the choice)
        assert took in (len(data), piece * 1000)
    else:
        assert took == piece * 1000
    after = path.read_bytes()
    assert after[at * PAGE_SIZE:(at + n) * PAGE_SIZE] == data
    assert after[:at * PAGE_SIZE] + after[(at + n) * PAGE_SIZE:] == b"\x77" * (2 * PAGE_SIZE + at * PAGE_SIZE)
    assert table == want


def test_put_goes_in_one_piece_only_where_every_page_is_cached(tmp_path):
    """The pieces set only the size of the page cache's new folios (vbp/chunkstore_files.py
    says why): a range whose every page is cached already goes in one pwrite, one with a
    page not cached yet in pieces, and the data and checksums are the same either way.
    Without cachestat(2) in the kernel, always in pieces."""
    piece = 4 * PAGE_SIZE
    data = random.randbytes(16 * PAGE_SIZE)
    table, want = array("Q", [0]) * 64, array("Q", [0]) * 64
    image = bytearray(64 * PAGE_SIZE)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 64 * PAGE_SIZE)  # (a hole: no page of it cached)
        took = []
        for page in (8, 8, 9, 8, 40, 40):  # (9: one page past the cached ones)
            took.append(pagesums.put(fd, data, page * PAGE_SIZE, piece, table, page))
            pagesums.fill(data, want, page)
            image[page * PAGE_SIZE:(page + 16) * PAGE_SIZE] = data
        # not at a page's start: the range touches one page more than it holds (23 to 25,
        # 25 not cached; 40 to 42, all cached)
        two = data[:2 * PAGE_SIZE]
        for at in (23 * PAGE_SIZE + 100, 40 * PAGE_SIZE + 100):
            took.append(pagesums.put(fd, two, at, PAGE_SIZE, array("Q", [0, 0]), 0))
            image[at:at + len(two)] = two
        assert os.pread(fd, len(image), 0) == image  # (read last: reading caches pages)
        assert table == want
    finally:
        os.close(fd)
    whole, whole2 = (len(data), len(two)) if CACHESTAT else (piece, PAGE_SIZE)
    assert took == [piece, whole, piece, whole, piece, whole, PAGE_SIZE, whole2]
    assert pagesums.py_put is not pagesums.put


def test_put_takes_up_short_pwrites_until_each_piece_is_whole(tmp_path, monkeypatch):
    """The kernel may take less than a pwrite asks: the stand-in writes the rest (the
    extension's loop is the same, on the system call itself)."""
    calls = []
    real = os.pwrite

    def short_pwrite(fd, buf, pos):
        calls.append(len(buf))
        return real(fd, bytes(buf)[: max(1, len(buf) // 3)], pos)

    monkeypatch.setattr(os, "pwrite", short_pwrite)
    data = random.randbytes(5 * PAGE_SIZE)
    table = array("Q", [0]) * 5
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        pagesums.py_put(fd, data, 12288, 2 * PAGE_SIZE, table, 0)
        assert os.pread(fd, len(data), 12288) == data
    finally:
        os.close(fd)
    assert max(calls) <= 2 * PAGE_SIZE and len(calls) > 3
    assert 0 not in table


@pytest.mark.parametrize("put", PUTS)
def test_a_put_that_fails_raises_the_system_error_and_leaves_the_checksums(tmp_path, put):
    """A full disk (/dev/full: every write is ENOSPC) and a descriptor not open for writing
    (EBADF) are the OSError of the pwrite, and no checksum is changed: the chunk store
    then settles the pages from what reached the disk."""
    data = random.randbytes(3 * PAGE_SIZE)
    table = array("Q", [5, 5, 5, 5])
    (tmp_path / "ro").write_bytes(b"")
    for path, flags, first, err in (("/dev/full", os.O_WRONLY, 1, errno.ENOSPC),
                                    (tmp_path / "ro", os.O_RDONLY, 0, errno.EBADF)):
        fd = os.open(path, flags)
        try:
            with pytest.raises(OSError) as e:
                put(fd, data, 0, PAGE_SIZE, table, first)
        finally:
            os.close(fd)
        assert e.value.errno == err
    assert table.tolist() == [5, 5, 5, 5]


@pytest.mark.parametrize("put", PUTS)
def test_put_refuses_bad_arguments_before_writing(tmp_path, put):
    page, table = b"\x01" * PAGE_SIZE, array("Q", [0, 0])
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        for args in ((fd, page + b"x", 0, 4096, table, 0),  # not whole pages
                     (fd, page, 0, 4096, table, 2),  # outside the table
                     (fd, page * 3, 0, 4096, table, 0),  # more pages than entries
                     (fd, page, 0, 0, table, 0),  # no piece
                     (fd, page, -4096, 4096, table, 0),  # before the file
                     (-1, page, 0, 4096, table, 0)):  # no descriptor
            with pytest.raises((ValueError, OSError)):
                put(*args)
        with pytest.raises(TypeError):
            put(fd, page, 0, 4096, table)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"" and table.tolist() == [0, 0]


@settings(max_examples=30, deadline=None)
@given(damaged=st.integers(0, CS // PAGE_SIZE - 1), hole=st.integers(0, CS // PAGE_SIZE - 1),
       ref=st.booleans())
def test_a_damaged_page_in_a_large_read_is_named(tmp_path_factory, damaged, hole, ref):
    """A 1 MiB read (a FileRange checked through the map, or a copy when the range has a
    hole) names the damaged page, wherever it is; the hole reads as zeros and is never
    taken for damage."""
    with ChunkStore(tmp_path_factory.mktemp("s"), 4 * CS) as s:
        body = bytearray(random.randbytes(CS))
        s.write(K, 0, body, chunk_size=CS)
        if hole != damaged:
            s.zero(K, hole * PAGE_SIZE, PAGE_SIZE, chunk_size=CS)
            body[hole * PAGE_SIZE:(hole + 1) * PAGE_SIZE] = bytes(PAGE_SIZE)
        s.flush()
        got = s.read_ref(K, 0, CS) if ref else s.read(K, 0, CS)
        if isinstance(got, FileRange):
            got.release()
        else:
            assert got == body
        where = s.info(K).slot * CS + damaged * PAGE_SIZE + 99
        os.pwrite(s._spaces[CS].fd, bytes([body[damaged * PAGE_SIZE + 99] ^ 0x40]), where)
        with pytest.raises(ChecksumError) as e:
            s.read_ref(K, 0, CS) if ref else s.read(K, 0, CS)
        assert e.value.page == damaged and e.value.key == K
        assert s.stats().checksum_errors == 1
        assert not s._spaces[CS].ranges


@pytest.mark.parametrize("impl", IMPLS[1:])
def test_a_hash_of_zero_is_stored_as_one(impl, monkeypatch):
    """0 marks a page never written: a page whose hash is 0 is stored and checked as 1,
    as page_checksum does (no page with an xxh3 of 0 is known: the hash is replaced; the
    C loop does the same, `h ? h : 1`)."""
    fill, check = impl
    monkeypatch.setattr(pagesums, "xxh3_64_intdigest",
                        lambda page: 0 if bytes(page[:1]) == b"\0" else 5)
    data = b"\1" * PAGE_SIZE + b"\0" * PAGE_SIZE + b"\2" * PAGE_SIZE
    table = array("Q", [0, 0, 0])
    fill(data, table, 0)
    assert table.tolist() == [5, 1, 5]
    assert check(data, table, 0) == -1
    table[1] = 0  # a hole: not checked
    assert check(data, table, 0) == -1


@settings(max_examples=25, deadline=None)
@given(damaged=st.sets(st.integers(0, 2 * CS // PAGE_SIZE - 1), max_size=6),
       holes=st.sets(st.integers(0, 2 * CS // PAGE_SIZE - 1), max_size=4))
def test_verify_finds_every_damaged_page(tmp_path_factory, damaged, holes):
    """A verify (in steps of COPY_STEP) names every damaged page of a 2 MiB chunk, in
    order, and never a hole, whatever bytes lie under it."""
    cs = 2 * CS
    with ChunkStore(tmp_path_factory.mktemp("s"), 4 * cs) as s:
        s.write(K, 0, random.randbytes(cs), chunk_size=cs)
        for h in holes:
            s.zero(K, h * PAGE_SIZE, PAGE_SIZE, chunk_size=cs)
        s.flush()
        base = s.info(K).slot * cs
        for p in damaged:
            os.pwrite(s._spaces[cs].fd, random.randbytes(16), base + p * PAGE_SIZE + 100)
        assert s.verify(K) == sorted(damaged - holes)
