"""One NBD client writing 4 KiB with FUA at random aligned offsets, one at a time, for a
given time: what a guest's journal commits cost when its disk advertises FUA (fio's nbd
engine cannot set the flag). Prints one JSON record like bench.workloads.parse_fio's:

    python -m bench.fua_client URI SIZE SECONDS
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import nbd  # libnbd's binding (Debian python3-libnbd, linked into the venv)

PAGE = 4096


def main(uri: str, size: int, seconds: float) -> dict:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        if not h.can_fua():
            raise SystemExit(f"{uri} does not advertise FUA")
        pages = min(size, h.get_size()) // PAGE
        buf = os.urandom(PAGE)
        rng = random.Random(1)
        lat = []
        t0 = time.perf_counter()
        end = t0 + seconds
        now = t0
        while now < end:
            off = rng.randrange(pages) * PAGE
            h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
            t = time.perf_counter()
            lat.append(t - now)
            now = t
        elapsed = now - t0
    finally:
        h.shutdown()
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6

    return {"iops": len(lat) / elapsed, "mib_s": len(lat) * PAGE / elapsed / (1 << 20),
            "p50_us": pct(0.50), "p99_us": pct(0.99), "ios": len(lat), "seconds": elapsed}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))))
