"""What the real chunk store and the in-memory one share: result types, checksums, checks.

A page checksum is xxh3_64 of the 4 KiB page, with 0 reserved for "hole" (a page never
written, or zeroed whole): a real page whose hash happens to be 0 is stored as 1, so a real
page never looks like a hole (see vbp/chunkstore.py, theory of operation).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from itertools import cycle, groupby
from operator import not_

from xxhash import xxh3_64_intdigest

from vbp.errors import InvalidArgument
from vbp.layout import CHUNK_SIZE_MAX, PAGE_SIZE, ChunkKey

PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
PAGE_MASK = PAGE_SIZE - 1
ZERO_PAGE = bytes(PAGE_SIZE)
HOLE = 0


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    key: ChunkKey
    chunk_size: int
    version: int
    slot: int


@dataclass(frozen=True, slots=True)
class StoreStats:
    capacity: int
    used: int
    free: int
    chunks: int
    checksum_errors: int


class FileRange:
    """`length` bytes at `pos` of a data file, checked against their checksums, for a
    caller that sends them (send()) straight from the read-only map of the file the check
    read them through, instead of copying them into a buffer first (ChunkStore.read_ref).

    The range pins its file's freed slots (`owner.ranges`): while it lives, a slot freed
    meanwhile is neither wiped nor given to another chunk, so the bytes sent are this
    chunk's, even if it was deleted meanwhile (its data may live on in another generation:
    zeros would be neither the old bytes nor new ones). A write landing before the bytes
    leave is sent with them, as for any read that overlaps a write in flight. `release()`
    once sent or dropped (garbage collection releases it too). A closed store's ranges
    fail to send with EBADF."""

    __slots__ = ("owner", "pos", "length", "__weakref__")

    def __init__(self, owner, pos: int, length: int):
        self.owner, self.pos, self.length = owner, pos, length
        owner.ranges.add(self)

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"FileRange(pos={self.pos}, length={self.length})"

    def advance(self, n: int) -> None:
        """The first `n` bytes were sent."""
        self.pos += n
        self.length -= n

    def send(self, sock) -> int:
        """Send what is left of the range on `sock` from the read-only map of its file:
        the bytes `sock.send` took (it raises BlockingIOError when the socket is full).

        Not os.sendfile: on loopback, sending from the map (one copy, into the socket)
        cost less than sendfile's page references. 1 MiB sequential reads of a replicas=1
        volume went from 1,697 to 2,030 MiB/s, server CPU per MiB 586 -> 490 µs
        (`python -m bench --workloads seqread-1m-qd8 --targets nbdkit,vbp-r1`, 3 rounds,
        side by side)."""
        view = self.owner.dview if self.owner is not None else None
        if view is None:  # (the map covers the range for as long as its store is open)
            raise OSError(errno.EBADF, f"{self!r}: its store is closed")
        with view[self.pos:self.pos + self.length] as part:
            return sock.send(part)

    def release(self) -> None:
        if self.owner is not None:
            self.owner.ranges.discard(self)
            self.owner = None


def marks_kept(kept: dict, cleared, marks: dict) -> tuple[dict, list]:
    """What a flush clearing the dirty marks of the chunks `cleared` changes in `kept`, a
    store's takeover marks kept through restarts (chunk -> volume; ChunkStore._marks_kept
    says why), given the replica's marks now (`marks`, Replica.marks): (entries to put,
    keys to drop). A cleared chunk still marked is kept; a kept one no longer marked (its
    holder lived on: settled) goes."""
    put = {k: marks[k] for k in cleared if k in marks and kept.get(k) != marks[k]}
    gone = [k for k in kept if k not in marks]
    return put, gone


def page_checksum(page) -> int:
    """Checksum of one real (non-hole) page: never 0."""
    return xxh3_64_intdigest(page) or 1


def check_chunk_size(chunk_size) -> int:
    """A chunk size the store accepts: a power of two, a whole number of pages, at most
    CHUNK_SIZE_MAX.

    Looser than vbp.layout.check_chunk_size (1..64 MiB) below, so tests and simulations
    may use small chunks; volumes still get their sizes checked by vbp.layout. Not above:
    a peer's write makes a chunk of the size it names, and a read of it is one reply
    frame (replicator.codec's DEFAULT_MAX_FRAME holds 64 MiB); 1 GiB chunks let a few
    small requests pin gigabytes of replies.
    """
    if (not isinstance(chunk_size, int) or chunk_size < PAGE_SIZE
            or chunk_size & (chunk_size - 1) or chunk_size > CHUNK_SIZE_MAX):
        raise InvalidArgument(
            f"chunk size must be a power of two between {PAGE_SIZE} and {CHUNK_SIZE_MAX}, "
            f"not {chunk_size!r}"
        )
    return chunk_size


def check_key(key) -> ChunkKey:
    try:
        lineage, index, gen = key
    except (TypeError, ValueError):
        raise InvalidArgument(f"not a chunk key: {key!r}") from None
    if (not isinstance(lineage, str) or not lineage or not isinstance(index, int)
            or not isinstance(gen, int) or index < 0 or gen < 0
            or index >= 1 << 63 or gen >= 1 << 63):
        raise InvalidArgument(f"not a chunk key: {key!r}")
    return ChunkKey(lineage, index, gen)


def check_range(offset, length, chunk_size: int) -> None:
    if (not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0
            or offset + length > chunk_size):
        raise InvalidArgument(
            f"range {offset}+{length} is outside the chunk (chunk size {chunk_size})"
        )


# How far a chunk's version may run past the one persisted in the index while it stays
# marked dirty: recovery adds it to the persisted version of every dirty chunk, so what a
# flush acknowledged without persisting it (ChunkStore.flush) is never gone back below.
VERSION_SLACK = 1 << 20


def check_version(version) -> None:
    if version is not None and (not isinstance(version, int) or version < 0
                                or version >= 1 << 63):
        raise InvalidArgument(f"not a version: {version!r}")


def sum_runs(sums, first_page: int, offset: int, length: int) -> list[tuple[int, bool]]:
    """runs() of the holes of `sums`, the page checksums of pages first_page... (0: a
    hole), at the speed of C loops over the pages: a chunk all data or all holes (the
    common cases) costs one count, and a mixed one a Python step per run, not per page.
    The per-page loop of runs() took 86 ms of the event loop for a BLOCK_STATUS of 1 GiB
    of written data (every other client of the host waiting)."""
    holes = sums.count(0)
    if not holes or holes == len(sums):
        return [(length, bool(holes))] if length else []
    # runs alternate: their page counts and the first one's kind say it all
    sizes = [len(list(group)) << PAGE_SHIFT for _, group in groupby(map(not_, sums))]
    sizes[0] -= offset - (first_page << PAGE_SHIFT)  # (the range's first page, partly)
    sizes[-1] -= ((first_page + len(sums)) << PAGE_SHIFT) - (offset + length)  # its last
    return list(zip(sizes, cycle((True, False) if not sums[0] else (False, True))))


def runs(flags, first_page: int, offset: int, length: int) -> list[tuple[int, bool]]:
    """(length, is_hole) runs over [offset, offset+length) from per-page hole flags.

    `flags[i]` tells whether page first_page+i is a hole. Runs are clipped to the range, so
    their lengths add up to `length`.
    """
    out: list[tuple[int, bool]] = []
    end = offset + length
    pos = offset
    for i, hole in enumerate(flags):
        page_end = (first_page + i + 1) << PAGE_SHIFT
        n = min(page_end, end) - pos
        if out and out[-1][1] == hole:
            out[-1] = (out[-1][0] + n, hole)
        else:
            out.append((n, hole))
        pos += n
    return out
