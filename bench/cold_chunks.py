"""Random 4K writes with a flush every N, on a volume larger than the chunk store's hot set
(HOT_MAX chunks stay marked dirty through a flush): most writes then go to chunks a flush
marked clean, and each such chunk's first write needs a synced index commit (its dirty
mark). qemu-nbd on a raw file of the same size runs beside, in the same rounds, for the
ratio. The main run (`python -m bench`) uses 1 GiB volumes of 4 MiB chunks, all of them in
the hot set, so it never shows this.

    python -m bench.cold_chunks [--size-gib 4] [--fsync 32] [--runtime 8] [--rounds 3]
                                [--replicas 1,3] [--set hot_chunks=1024]

`--replicas 1,3` adds a replicas=3 volume on a 3-host sandbox (vbp-r3): there the
replicas' marks count too, each of them on its own host. `--set KEY=VALUE` gives every
blockd a setting (repeatable): `hot_chunks=1024` makes the whole 4 GiB volume hot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.targets import QemuNbd, VbpSandbox


def fio(uri: str, size: int, args: list[str], out: Path | None = None) -> dict | None:
    cmd = ["fio", "--name=j", "--ioengine=nbd", f"--uri={uri}", f"--size={size}", *args]
    cmd += ["--output-format=json", f"--output={out}"] if out else ["--output=/dev/null"]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())["jobs"][0] if out else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=int, default=4)
    p.add_argument("--fsync", type=int, default=32, help="a flush every this many writes")
    p.add_argument("--runtime", type=float, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--replicas", default="1", help="comma-separated: 1, 3 or 1,3")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a blockd setting of every host (repeatable)")
    a = p.parse_args()
    if not all("=" in kv for kv in a.settings):
        p.error("--set takes KEY=VALUE")
    settings = dict(kv.split("=", 1) for kv in a.settings)
    replicas = sorted({int(r) for r in a.replicas.split(",")})
    if not set(replicas) <= {1, 3}:
        p.error("--replicas takes 1, 3 or 1,3")
    size = a.size_gib << 30
    tmp = Path(tempfile.mkdtemp(prefix="vbp-cold-"))
    q = None
    sandboxes = []
    try:
        q = QemuNbd(tmp, size).start()
        uris = {"qemu-nbd": q.uri}
        for r in replicas:
            sb = VbpSandbox(tmp, r, settings=settings).start()
            sandboxes.append(sb)
            uris[f"vbp-r{r}"] = sb.create_volume("v", size, r)
        for uri in uris.values():  # every chunk written: the writes below overwrite
            fio(uri, size, ["--rw=write", "--bs=1m", "--iodepth=8"])
        job = ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--time_based",
               f"--runtime={a.runtime:g}", "--randrepeat=0", "--norandommap", f"--fsync={a.fsync}"]
        for rnd in range(a.rounds):
            iops = {}
            for name, uri in uris.items():
                j = fio(uri, size, job, tmp / "out.json")
                w, sync = j["write"], j["sync"]["lat_ns"]["percentile"]
                iops[name] = w["iops"]
                print(f"round {rnd} {name:8s} {w['iops']:7.0f} IOPS  write p99 "
                      f"{w['clat_ns']['percentile']['99.000000'] / 1000:6.0f} µs  flush p50 "
                      f"{sync['50.000000'] / 1000:6.0f} µs p99 {sync['99.000000'] / 1000:6.0f} µs",
                      flush=True)
            for r in replicas:
                print(f"round {rnd} vbp-r{r} / qemu-nbd: "
                      f"{iops[f'vbp-r{r}'] / iops['qemu-nbd']:.2f}x", flush=True)
    finally:
        for sb in sandboxes:
            sb.down()
        if q is not None:
            q.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
