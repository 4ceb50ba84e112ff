"""4 KiB random write/read ops/s of the local chunk store, and what the checksums cost.

    python -m bench.chunkstore_bench [--dir DIR] [--seconds 2] [--chunks 64]

Rows: the raw syscall (os.pwrite/os.pread on a plain file written and synced like the
store's data file: the floor), ChunkStore with
checksums verified on read (production), ChunkStore with read verification off, and the
bare xxh3_64 of one page. Data stays in the page cache (no flush): this measures the CPU
the store adds per request, not the disk. No asserts: a driver and a report.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time

from xxhash import xxh3_64_intdigest

from vbp.chunkstore import ChunkStore
from vbp.layout import MiB, PAGE_SIZE, ChunkKey

CS = 4 * MiB


def timed(fn, seconds: float) -> float:
    n = 0
    batch = 2000
    end = time.perf_counter() + seconds
    start = time.perf_counter()
    while time.perf_counter() < end:
        fn(batch)
        n += batch
    return n / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--chunks", type=int, default=64)
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="vbp-bench-")
    rng = random.Random(1)
    pages_per_chunk = CS // PAGE_SIZE
    offs = [rng.randrange(pages_per_chunk) * PAGE_SIZE for _ in range(4096)]
    which = [rng.randrange(args.chunks) for _ in range(4096)]
    data = os.urandom(PAGE_SIZE)
    try:
        store = ChunkStore(os.path.join(root, "store"), args.chunks * CS)
        keys = [ChunkKey("bench", i, 0) for i in range(args.chunks)]
        for k in keys:  # allocate and fill every page once: reads then hit real data
            store.write(k, 0, os.urandom(CS), chunk_size=CS)
        store.flush()

        raw_fd = os.open(os.path.join(root, "raw.bin"), os.O_RDWR | os.O_CREAT, 0o600)
        for i in range(args.chunks):  # same state as the store's file: written, synced
            os.pwrite(raw_fd, os.urandom(CS), i * CS)
        os.fdatasync(raw_fd)
        pos = [w * CS + o for w, o in zip(which, offs)]

        def raw_write(n):
            for i in range(n):
                os.pwrite(raw_fd, data, pos[i & 4095])

        def raw_read(n):
            for i in range(n):
                os.pread(raw_fd, PAGE_SIZE, pos[i & 4095])

        def st_write(n, w=store.write, keys=keys):
            for i in range(n):
                j = i & 4095
                w(keys[which[j]], offs[j], data, chunk_size=CS)

        def st_read(n, r=store.read, keys=keys):
            for i in range(n):
                j = i & 4095
                r(keys[which[j]], offs[j], PAGE_SIZE)

        def hash_only(n):
            for _ in range(n):
                xxh3_64_intdigest(data)

        rows = []
        rows.append(("raw os.pwrite 4K", timed(raw_write, args.seconds)))
        rows.append(("raw os.pread 4K", timed(raw_read, args.seconds)))
        rows.append(("ChunkStore.write 4K (checksum computed)", timed(st_write, args.seconds)))
        store.verify_reads = True
        rows.append(("ChunkStore.read 4K, checksum verified", timed(st_read, args.seconds)))
        store.verify_reads = False
        rows.append(("ChunkStore.read 4K, not verified", timed(st_read, args.seconds)))
        rows.append(("xxh3_64 of one 4K page", timed(hash_only, args.seconds)))
        store.verify_reads = True
        t0 = time.perf_counter()
        store.flush()
        flush_ms = (time.perf_counter() - t0) * 1000
        store.close()
        os.close(raw_fd)
        width = max(len(name) for name, _ in rows)
        for name, ops in rows:
            print(f"{name:<{width}}  {ops:>12,.0f} ops/s  {1e6 / ops:7.2f} us/op")
        print(f"{'flush after the write run':<{width}}  {flush_ms:>12.1f} ms")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
