"""A process that hammers a ChunkStore and says on stdout what it issued and what is durable.

Run by tests/faults/test_chunkstore_crash.py, which SIGKILLs it at random moments.

    chunkstore_worker.py crash DIR SEED FIRST_SEQ
    chunkstore_worker.py enospc DIR

Lines (crash mode), each printed and flushed before (issue) or after (completion) the call:
    W seq index gen first npages fua    write issued (pages filled with page_bytes(...))
    Z seq index gen first npages fua    zero issued (whole pages: they become holes)
    R seq version                       that write/zero returned
    X seq index gen / XD seq            delete issued / returned
    F seq / FD seq                      flush issued / returned: every R printed before F
                                        is durable
A write with fua is durable once its R line is out.
"""

from __future__ import annotations

import os
import random
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vbp.chunkstore import ChunkStore  # noqa: E402
from vbp.errors import NoSpace  # noqa: E402
from vbp.layout import PAGE_SIZE, ChunkKey  # noqa: E402

CS = 64 * 1024
PAGES = CS // PAGE_SIZE
INDEXES = 4
CAPACITY = 8 * CS
LINEAGE = "w"


def page_bytes(seq: int, index: int, gen: int, page: int) -> bytes:
    return struct.pack("<QQQQ", seq, index, gen, page) * (PAGE_SIZE // 32)


def decode_page(data: bytes):
    """(seq, index, gen, page) of a page written by this worker, 0 for zeros, None if neither."""
    if data == bytes(PAGE_SIZE):
        return 0
    unit = data[:32]
    if unit * (PAGE_SIZE // 32) != data:
        return None
    return struct.unpack("<QQQQ", unit)


def say(*words) -> None:
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def crash_mode(path: str, seed: int, seq: int) -> None:
    rng = random.Random(seed)
    store = ChunkStore(path, CAPACITY)
    say("OPEN")
    while True:
        seq += 1
        r = rng.random()
        index, gen = rng.randrange(INDEXES), rng.choice((0, 0, 1))
        key = ChunkKey(LINEAGE, index, gen)
        if r < 0.06:
            say("F", seq)
            store.flush()
            say("FD", seq)
        elif r < 0.1:
            if store.info(key) is None:
                continue
            say("X", seq, index, gen)
            store.delete(key)
            say("XD", seq)
        else:
            first = rng.randrange(PAGES)
            npages = rng.randint(1, min(4, PAGES - first))
            fua = int(rng.random() < 0.15)
            base = 0 if gen == 1 else None
            if r < 0.2:
                say("Z", seq, index, gen, first, npages, fua)
                call = store.zero
                args = (key, first * PAGE_SIZE, npages * PAGE_SIZE)
            else:
                say("W", seq, index, gen, first, npages, fua)
                data = b"".join(page_bytes(seq, index, gen, p) for p in range(first, first + npages))
                call = store.write
                args = (key, first * PAGE_SIZE, data)
            try:
                v = call(*args, chunk_size=CS, base=base, fua=bool(fua))
            except NoSpace:
                say("NOSPACE", seq)
                continue
            say("R", seq, v)


def enospc_mode(path: str) -> None:
    """On a tiny filesystem: fill it until NoSpace, check nothing stored was damaged, free
    space, and check it is usable again."""
    store = ChunkStore(path, 1 << 40)
    written = {}
    nospace = 0
    i = 0
    while nospace < 20 and i < 10_000:
        key = ChunkKey(LINEAGE, i % 64, 0)
        first = (i // 64) % PAGES
        data = page_bytes(i + 1, key.index, 0, first)
        try:
            store.write(key, first * PAGE_SIZE, data, chunk_size=CS)
            store.flush()
        except NoSpace:
            nospace += 1
        else:
            written[(key, first)] = data
        i += 1
    assert nospace, "the filesystem never filled up"
    for (key, first), data in written.items():
        assert store.read(key, first * PAGE_SIZE, PAGE_SIZE) == data, (key, first)
    assert store.fsck() == [], store.fsck()
    victims = list(store.keys())[: len(list(store.keys())) // 2]
    for key in victims:
        store.delete(key)
    store.flush()
    store.write(ChunkKey("after", 0, 0), 0, b"x" * CS, chunk_size=CS)
    store.flush()
    store.close()
    store = ChunkStore(path, 1 << 40)
    assert store.read(ChunkKey("after", 0, 0), 0, CS) == b"x" * CS
    for (key, first), data in written.items():
        if key not in victims:
            assert store.read(key, first * PAGE_SIZE, PAGE_SIZE) == data, (key, first)
    assert store.fsck() == []
    store.close()
    say("OK", len(written), nospace)


if __name__ == "__main__":
    if sys.argv[1] == "crash":
        crash_mode(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        enospc_mode(sys.argv[2])
