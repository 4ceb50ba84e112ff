"""A FUA write beside another volume's reader: `python -m bench.fua_beside`.

One host serves two volumes (a sandbox of `--replicas` hosts, so at replicas=3 every host
holds a copy of both). A reader reads 4 KiB of volume `a` at QD1 in a thread of its own
while volume `b` takes `--mib` MiB of 1 MiB writes (no flush) and then one 4 KiB write with
FUA. Reported per round: how long the FUA write took, and the longest read while it was
under way. A FUA write syncs its chunk: an fdatasync of the data file the chunks of both
volumes share, so after large writes it is that file's whole writeback. Where the sync
runs on the event loop, every request to every volume of the host waits for it: the
longest read is then about the FUA write's own time. (read-beside-flush in the main
bench is the same question for NBD FLUSH, which syncs ahead in a worker thread.)

    python -m bench.fua_beside [--replicas 1] [--mib 768] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import nbd  # libnbd's binding (Debian python3-libnbd, linked into the venv)

from bench.targets import VbpSandbox

MiB = 1 << 20


def one_round(ha, hb, mib: int) -> dict:
    hb.flush()
    buf = os.urandom(MiB)
    for i in range(mib):
        hb.pwrite(buf, i * MiB)
    stop = threading.Event()
    worst = [0.0]
    reads = [0]

    def reader():
        while not stop.is_set():
            t = time.perf_counter()
            ha.pread(4096, 0)
            worst[0] = max(worst[0], time.perf_counter() - t)
            reads[0] += 1

    th = threading.Thread(target=reader)
    th.start()
    try:
        time.sleep(0.2)  # the reader runs: its own pace, before the FUA write
        worst[0], reads[0] = 0.0, 0
        t = time.perf_counter()
        hb.pwrite(b"\x5a" * 4096, 0, nbd.CMD_FLAG_FUA)
        fua = time.perf_counter() - t
        time.sleep(0.05)
    finally:
        stop.set()
        th.join()
    return {"fua_ms": fua * 1000, "longest_read_ms": worst[0] * 1000, "reads": reads[0]}


def run(replicas: int, mib: int, rounds: int, workdir: Path) -> list[dict]:
    with VbpSandbox(workdir, replicas) as sb:
        sb.start()
        ua = sb.create_volume("a", 64 * MiB, replicas)
        ub = sb.create_volume("b", max(mib, 1) * MiB, replicas)
        ha, hb = nbd.NBD(), nbd.NBD()
        ha.connect_uri(ua)
        hb.connect_uri(ub)
        try:
            if not hb.can_fua():
                raise SystemExit(f"{ub} does not advertise FUA")
            ha.pwrite(os.urandom(MiB), 0)
            return [one_round(ha, hb, mib) for _ in range(rounds)]
        finally:
            ha.shutdown()
            hb.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--mib", type=int, default=768, help="MiB written to volume b before the FUA write")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fua-beside-") as d:
        out = run(a.replicas, a.mib, a.rounds, Path(d))
    if a.json:
        print(json.dumps(out))
        return
    for i, r in enumerate(out):
        print(f"round {i}: replicas={a.replicas} FUA write {r['fua_ms']:.1f} ms after "
              f"{a.mib} MiB; longest read of the other volume meanwhile "
              f"{r['longest_read_ms']:.1f} ms ({r['reads']} reads)")


if __name__ == "__main__":
    main()
