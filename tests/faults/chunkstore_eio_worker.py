"""The two halves of tests/faults/test_chunkstore_eio.py, each a process of its own (a read
through a map of a page the disk cannot read is a SIGBUS: it must not be this test's).

    chunkstore_eio_worker.py fill DIR     a store with one chunk on disk, closed, the data
                                          file's pages dropped from the page cache
    chunkstore_eio_worker.py read DIR     the store reopened, the chunk read every way:
                                          one line per way, "<way> ok|<error class>"
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from vbp.chunkstore import ChunkStore  # noqa: E402
from vbp.layout import PAGE_SIZE, ChunkKey  # noqa: E402

CS = 1 << 20
K = ChunkKey("eio", 0, 0)
DATA = bytes(range(256)) * (CS // 256)


def fill(path: str) -> None:
    with ChunkStore(path, 4 * CS) as s:
        s.write(K, 0, DATA, chunk_size=CS)
        s.flush()
    fd = os.open(os.path.join(path, "data-1M.bin"), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read(path: str) -> None:
    s = ChunkStore(path, 4 * CS)
    ways = {
        "read_page": lambda: s.read(K, 8 * PAGE_SIZE, PAGE_SIZE),
        "read_range": lambda: s.read(K, 0, 16 * PAGE_SIZE),
        "read_ref": lambda: s.read_ref(K, 0, CS),
        "verify": lambda: s.verify(K),
    }
    for way, call in ways.items():
        try:
            got = call()
            if way == "verify":
                print(f"{way} bad={len(got)}", flush=True)
            else:
                print(f"{way} ok", flush=True)
        except Exception as e:
            print(f"{way} {type(e).__name__}", flush=True)
    print(f"checksum_errors {s.stats().checksum_errors}", flush=True)
    s._close_files()


if __name__ == "__main__":
    {"fill": fill, "read": read}[sys.argv[1]](sys.argv[2])
