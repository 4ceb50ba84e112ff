"""Figures only vbp has, so no reference to compare with: snapshot creation on a volume with
many written chunks, and clone-then-first-write (copy-up) latency.

Snapshot: a thin volume with a small chunk size (`--snap-chunk-size`, default 1M) where fio
writes ONE 4 KiB block per chunk (`rw=write:<chunk-4k>`: a 4 KiB write then a skip to the next
chunk), so 10k allocated chunks cost 40 MiB of writes instead of 40 GiB. The snapshot call is
then timed in-process (control.api.snapshot on the registry, what `vbp volume snapshot` does
minus interpreter start) and as the CLI's wall time.

Copy-up: a volume of `cow_chunks` chunks (default chunk size), fully written, snapshotted
once. Each round clones the snapshot (timed), then over libnbd writes 4 KiB: first to chunk 0
(opening the export and taking the write lease are in this one), then once to each other
chunk (each a copy-up on every replica host) and again to the same chunks (no copy-up).
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import time

from bench.targets import VbpTarget

KiB, MiB = 1 << 10, 1 << 20


def pct(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def _open_registry(target: VbpTarget):
    from vbp.registry import open_registry

    return open_registry(target.sandbox.registry)


def snapshot_bench(target: VbpTarget, chunks: int, chunk_size: int, rounds: int) -> dict:
    from control import api

    sb = target.sandbox
    name = f"snapsrc-{target.name}"
    uri = sb.create_volume(name, chunks * chunk_size, target.replicas, chunk_size=str(chunk_size))
    t0 = time.perf_counter()
    p = subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--bs=4k",
                        f"--rw=write:{chunk_size - 4 * KiB}", "--iodepth=32",
                        f"--size={chunks * chunk_size}", "--output-format=json"],
                       capture_output=True, text=True, timeout=3600)
    fill_s = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"fill of {name} failed: {p.stderr.strip()[-400:]}")
    api_ms, cli_ms, base_ms = [], [], []
    reg = _open_registry(target)
    try:
        for r in range(rounds):
            t0 = time.perf_counter()
            api.snapshot(reg, name, f"s{r}")
            api_ms.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            res = sb.vbp("volume", "snapshot", name, f"c{r}")
            cli_ms.append((time.perf_counter() - t0) * 1e3)
            if res.returncode != 0:
                raise RuntimeError(f"vbp volume snapshot: {res.stderr.strip()}")
            t0 = time.perf_counter()
            sb.vbp("volume", "show", name)
            base_ms.append((time.perf_counter() - t0) * 1e3)
    finally:
        reg.close()
    return {"chunks_written": chunks, "chunk_size": chunk_size, "fill_seconds": fill_s,
            "api_ms": statistics.median(api_ms), "cli_ms": statistics.median(cli_ms),
            "cli_show_ms": statistics.median(base_ms), "rounds": rounds}


def copyup_bench(target: VbpTarget, chunks: int, rounds: int, chunk_size: int = 4 * MiB) -> dict:
    import nbd  # libnbd's binding (Debian python3-libnbd, linked into the venv)

    from control import api

    sb = target.sandbox
    src = f"cowsrc-{target.name}"
    uri = sb.create_volume(src, chunks * chunk_size, target.replicas, chunk_size=str(chunk_size))
    p = subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={uri}", "--bs=1m",
                        "--rw=write", "--iodepth=8", f"--size={chunks * chunk_size}",
                        "--output-format=json"], capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"fill of {src} failed: {p.stderr.strip()[-400:]}")
    reg = _open_registry(target)
    clone_ms, first_ms, copyup_us, overwrite_us = [], [], [], []
    buf = os.urandom(4 * KiB)
    try:
        api.snapshot(reg, src, "base")
        for r in range(rounds):
            name = f"{src}-clone{r}"
            t0 = time.perf_counter()
            api.clone(reg, f"{src}@base", name)
            clone_ms.append((time.perf_counter() - t0) * 1e3)
            offsets = [i * chunk_size + random.randrange(chunk_size // (4 * KiB)) * 4 * KiB
                       for i in range(chunks)]
            h = nbd.NBD()
            try:
                t0 = time.perf_counter()
                h.connect_uri(f"nbd://127.0.0.1:{sb.nbd_port()}/{name}")
                h.pwrite(buf, offsets[0])
                first_ms.append((time.perf_counter() - t0) * 1e3)
                for off in offsets[1:]:
                    t0 = time.perf_counter()
                    h.pwrite(buf, off)
                    copyup_us.append((time.perf_counter() - t0) * 1e6)
                for off in offsets[1:]:
                    t0 = time.perf_counter()
                    h.pwrite(buf, off)
                    overwrite_us.append((time.perf_counter() - t0) * 1e6)
                h.flush()
            finally:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
                del h
    finally:
        reg.close()
    return {"chunks": chunks, "chunk_size": chunk_size, "rounds": rounds,
            "clone_ms": statistics.median(clone_ms),
            "connect_and_first_write_ms": statistics.median(first_ms),
            "copyup_write_p50_us": pct(copyup_us, 50), "copyup_write_p99_us": pct(copyup_us, 99),
            "overwrite_p50_us": pct(overwrite_us, 50), "overwrite_p99_us": pct(overwrite_us, 99)}
