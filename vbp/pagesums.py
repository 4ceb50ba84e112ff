"""Page checksums of a whole range in one call, straight to or from a checksum table.

    fill(data, sums, first)          sums[first + i] = page_checksum(page i of data)
    check(data, sums, first) -> int  the first page i of data whose checksum is not
                                     sums[first + i] (a hole there, 0, is not checked),
                                     or -1
    put(fd, data, pos, piece, sums, first) -> int
                                     a large write: data pwritten at pos of fd in pieces
                                     of at most `piece` bytes, or in one when every page
                                     of the range is in the page cache already, then
                                     fill(data, sums, first); returns the piece taken; a
                                     failed pwrite raises its OSError before any
                                     checksum changes

`data` is whole pages (any buffer); `sums` a table of uint64, one per page (the chunk
store's sidecar map, an array("Q")). All three are the C extension vbp._pagesums, built when
vbp is installed (it links Debian's libxxhash): a hash call per page from Python costs
about a third as much again as hashing the page, and for 1 MiB reads and writes of a
replicas=1 volume the C loop gave 10 % more MiB/s. Where the extension is not built,
the same functions in Python stand in (NATIVE tells which; the test suite requires the
extension, so CI cannot run on the stand-ins by accident).
"""

from __future__ import annotations

import errno
import os
from itertools import compress

from xxhash import xxh3_64_intdigest

from vbp.layout import PAGE_SIZE

__all__ = ["NATIVE", "check", "fill", "put", "py_check", "py_fill", "py_put"]


def _pages(data) -> tuple[memoryview, int]:
    mv = memoryview(data).cast("B")
    if len(mv) % PAGE_SIZE:
        raise ValueError(f"{len(mv)} bytes are not whole pages")
    return mv, len(mv) // PAGE_SIZE


def _entries(sums, first: int, n: int) -> memoryview:
    table = memoryview(sums).cast("B")
    if len(table) % 8:
        raise ValueError(f"a table of {len(table)} bytes is not of uint64s")
    table = table.cast("Q")
    if first < 0 or first > len(table) - n:
        raise ValueError(f"entries {first}..{first + n} are outside the table of {len(table)}")
    return table[first:first + n]


def _hashes(mv: memoryview, pages):
    """page_checksum of each page of `mv` numbered in `pages` (a hash of 0 stored as 1)."""
    return ((xxh3_64_intdigest(mv[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) or 1) for i in pages)


def py_fill(data, sums, first: int) -> None:
    """fill() in Python."""
    mv, n = _pages(data)
    want = _entries(sums, first, n)
    for i, h in enumerate(_hashes(mv, range(n))):
        want[i] = h


def py_check(data, sums, first: int) -> int:
    """check() in Python."""
    mv, n = _pages(data)
    want = _entries(sums, first, n).tolist()
    real = list(compress(range(n), want))  # (holes, 0, are not checked)
    for i, h in zip(real, _hashes(mv, real)):
        if h != want[i]:
            return i
    return -1


def py_put(fd: int, data, pos: int, piece: int, sums, first: int) -> int:
    """put() in Python, always in pieces: it does not ask the page cache (cachestat(2)
    has no Python call)."""
    mv, n = _pages(data)
    _entries(sums, first, n)  # (its checks, before anything is written, as put's)
    if piece <= 0 or pos < 0:
        raise ValueError(f"put: pos {pos} and piece {piece}")
    at = 0
    while at < len(mv):
        end = min(at + piece, len(mv))
        while at < end:  # (a short pwrite: the rest of the piece again)
            done = os.pwrite(fd, mv[at:end], pos + at)
            if not done:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            at += done
    py_fill(mv, sums, first)
    return piece


try:
    from vbp._pagesums import check, fill, put
except ImportError:  # (not built: see the module's docstring)
    NATIVE = False
    check, fill, put = py_check, py_fill, py_put
else:
    NATIVE = True
