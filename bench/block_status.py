"""The allocation map of a large thin volume (NBD_CMD_BLOCK_STATUS, what `nbdinfo --map`,
`qemu-img convert` and `nbdcopy` ask), beside qemu-nbd and nbdkit on a sparse raw file of
the same size with the same pages written. A libnbd client maps the whole device with
requests of --request-mib, each asked from where the last answer ended, as clients do.
vbp-r1 is a replicas=1 volume and vbp-r3 a replicas=3 one, both on one 3-host sandbox
(the gateway its first host): at replicas=1 two thirds of the chunks are on other hosts.

    python -m bench.block_status [--size-gib 1024] [--pages 256] [--request-mib 4095]
                                 [--rounds 3]

Reports the time of each target's map (and per request: a server may answer past the
length asked, as nbdkit does, and so be asked fewer times) and vbp's over qemu-nbd's and
nbdkit's (below 1 is faster), per round and as the median.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.targets import NbdkitFile, QemuNbd, VbpSandbox


def connect(uri: str):
    import nbd

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def write_pages(uri: str, pages: list[int]) -> None:
    h = connect(uri)
    for page in pages:
        h.pwrite(b"\x5a" * 4096, page * 4096)
    h.flush()
    h.shutdown()


def map_device(uri: str, step: int) -> tuple[int, float, int]:
    """(requests, seconds, data extents) of one map of the whole device."""
    h = connect(uri)
    size = h.get_size()
    pos = requests = data = 0
    got = []

    def extents(meta, offset, entries, err):
        got.append(entries)
        return 0

    t = time.perf_counter()
    while pos < size:
        got.clear()
        h.block_status(min(step, size - pos), pos, extents)
        entries = got[0]
        pos += sum(entries[0::2])
        data += sum(1 for flags in entries[1::2] if not flags & 1)
        requests += 1
    dt = time.perf_counter() - t
    h.shutdown()
    return requests, dt, data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=int, default=1024)
    p.add_argument("--pages", type=int, default=256, help="4 KiB pages written, at random")
    p.add_argument("--request-mib", type=int, default=4095, help="length of each request")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    size = a.size_gib << 30
    step = a.request_mib << 20
    pages = sorted(random.Random(7).sample(range(size // 4096), a.pages))
    tmp = Path(tempfile.mkdtemp(prefix="vbp-bs-"))
    refs = []
    sb = None
    try:
        refs = [QemuNbd(tmp, size).start(), NbdkitFile(tmp, size).start()]
        uris = {r.name: r.uri for r in refs}
        sb = VbpSandbox(tmp, 3).start()
        for r in (1, 3):
            uris[f"vbp-r{r}"] = sb.create_volume(f"v{r}", size, r)
        for uri in uris.values():  # (qemu-nbd and nbdkit each serve a file of their own)
            write_pages(uri, pages)
        per: dict[str, list[float]] = {name: [] for name in uris}
        for rnd in range(a.rounds):
            for name, uri in uris.items():
                n, dt, data = map_device(uri, step)
                per[name].append(dt)
                print(f"round {rnd} {name:8s} {n:6d} requests {dt:8.3f} s "
                      f"{dt / n * 1e3:8.3f} ms/request  {data} data extents", flush=True)
            for r in (1, 3):
                print(f"round {rnd} vbp-r{r} / qemu-nbd: "
                      f"{per[f'vbp-r{r}'][-1] / per['qemu-nbd'][-1]:.2f}x", flush=True)
        med = {name: statistics.median(v) for name, v in per.items()}
        print("median s/map: " + ", ".join(f"{k} {v:.4f}" for k, v in med.items()))
        for r in (1, 3):
            print(f"median vbp-r{r} / qemu-nbd: {med[f'vbp-r{r}'] / med['qemu-nbd']:.2f}x, "
                  f"/ nbdkit: {med[f'vbp-r{r}'] / med['nbdkit']:.2f}x")
    finally:
        if sb is not None:
            sb.down()
        for r in refs:
            r.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
