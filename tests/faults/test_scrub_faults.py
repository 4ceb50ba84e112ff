"""Scrub against real damage: real blockd processes, bytes flipped inside a replica's data
file on disk, a copy rewritten behind the pool's back, a client reading all along.

Checks: `vbp pool scrub` reports each damaged page and its repair, the metrics endpoints
count them, afterwards every replica holds the written bytes (compared directly, store by
store), and the client never read a wrong byte."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request

from tests.conftest import SandboxHandle, run_vbp
from vbp.layout import ChunkKey

MiB = 1024 * 1024
PAGE = 4096
CS = MiB
REGION = 8 * MiB  # eight chunks written
SETTINGS = ["--set", "heartbeat_ttl=3", "--set", "lease_ttl=4", "--set", "peer_timeout=2",
            "--set", "metrics=127.0.0.1:0", "--set", "scrub_rate=0"]


def expected(offset: int, length: int) -> bytes:
    """The volume's written content: every 16 bytes name their own offset."""
    first = offset // 16
    return b"".join((first + i).to_bytes(8, "little") * 2 for i in range(length // 16))


def start(tmp_path) -> SandboxHandle:
    sb = SandboxHandle(tmp_path / "sb", 3)
    up(sb)
    return sb


def up(sb: SandboxHandle) -> None:
    p = run_vbp("sandbox", "up", "--hosts", 3, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", "2G", "--json", *SETTINGS, check=False)
    if p.returncode != 0:
        sb.down()
        raise AssertionError(f"sandbox up failed:\n{p.stderr}")
    sb.info = json.loads(p.stdout)


def connect(uri):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


class Reader(threading.Thread):
    """Reads the whole written region over and over through one gateway; every byte must be
    the written one."""

    def __init__(self, uri: str):
        super().__init__(daemon=True)
        self.uri = uri
        self.stop = threading.Event()
        self.lock = threading.Lock()  # held around each read: held by another, no read runs
        self.passes = 0
        self.bad: list[str] = []

    def run(self) -> None:
        try:
            h = connect(self.uri)
            want = expected(0, REGION)
            while not self.stop.is_set():
                for off in range(0, REGION, 256 * 1024):
                    with self.lock:
                        got = h.pread(256 * 1024, off)
                    if got != want[off:off + len(got)]:
                        self.bad.append(f"offset {off}: wrong bytes")
                self.passes += 1
            h.shutdown()
        except Exception as e:  # reported by the test, never swallowed
            self.bad.append(f"read failed: {e!r}")


def store_dir(sb: SandboxHandle, host: str):
    return sb.dir / host / "data" / "chunks"


def flip(sb: SandboxHandle, host: str, key: ChunkKey, page: int) -> None:
    """Flip bytes in the middle of one page of `key` in `host`'s data file, behind blockd's
    back (its checksum stays): bit rot."""
    from vbp.chunkstore import read_index

    info = read_index(store_dir(sb, host))[key]
    pos = info.slot * info.chunk_size + page * PAGE + 1000
    fd = os.open(store_dir(sb, host) / "data-1M.bin", os.O_RDWR)
    try:
        old = os.pread(fd, 8, pos)
        os.pwrite(fd, bytes(b ^ 0x5A for b in old), pos)
    finally:
        os.close(fd)


def warnings(sb: SandboxHandle) -> list[str]:
    """The hosts' warnings and errors, for a failure's message."""
    out = []
    for i in (1, 2, 3):
        log = (sb.dir / f"host{i}" / "blockd.log").read_text(errors="replace")
        out += [line for line in log.splitlines() if "level=warning" in line or "level=error" in line]
    return out[-40:]


def metrics_port(sb: SandboxHandle, host: str) -> int:
    log = (sb.dir / host / "blockd.log").read_text()
    return int(re.findall(r"event=metrics_listening address=[\d.]+:(\d+)", log)[-1])


def scrape(sb: SandboxHandle) -> dict[str, float]:
    """Scrub counters summed over the hosts."""
    total: dict[str, float] = {}
    for i in range(3):
        port = metrics_port(sb, f"host{i + 1}")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        for name, value in re.findall(r"^(vbp_scrub_\w+(?:\{[^}]*\})?) ([\d.e+]+)$", text, re.M):
            total[name] = total.get(name, 0.0) + float(value)
    return total


def scrub(sb: SandboxHandle, *args) -> dict:
    p = sb.vbp("--json", "pool", "scrub", "--timeout", "300", *args, check=False, timeout=400)
    assert p.returncode in (0, 5), p.stderr
    out = json.loads(p.stdout)
    assert (p.returncode == 0) == out["total"]["ok"]
    return out


def wait_all_up(sb: SandboxHandle, timeout: float = 60) -> None:
    from vbp.registry import open_registry

    reg = open_registry(sb.registry)
    deadline = time.monotonic() + timeout
    while any(h.state != "up" for h in reg.cluster_map().hosts):
        assert time.monotonic() < deadline, "hosts not up again"
        time.sleep(0.2)


def stop_host(sb: SandboxHandle, i: int) -> None:
    pid = sb.info["hosts"][i]["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, "blockd did not stop"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def compare_replicas(sb: SandboxHandle, volume: str) -> None:
    """With the pool stopped: every replica of every written chunk verifies and holds
    exactly the written bytes."""
    from vbp.chunkstore import ChunkStore
    from vbp.registry import open_registry
    from vbp.volume import VolumeRecord

    rec = VolumeRecord.from_dict(open_registry(sb.registry).get_volume(volume))
    sb.down()
    stores = [ChunkStore(store_dir(sb, f"host{i + 1}"), 2 << 30) for i in range(3)]
    try:
        for index in range(REGION // CS):
            for st in stores:
                gen = st.resolve(rec.lineage, index, rec.chain)
                key = ChunkKey(rec.lineage, index, gen)
                assert st.verify(key) == [], f"{st.path}: chunk {index} still damaged"
                assert st.read(key, 0, CS) == expected(index * CS, CS), f"{st.path}: chunk {index}"
    finally:
        for st in stores:
            st.close()


def test_scrub_repairs_flipped_bytes_and_a_divergent_copy_while_a_client_reads(tmp_path):
    sb = start(tmp_path)
    reader = None
    try:
        sb.vbp("volume", "create", "r3", "--size", "16M", "--replicas", "3", "--chunk-size", "1M")
        h = connect(sb.uri("r3", 0))
        for off in range(0, REGION, MiB):
            h.pwrite(expected(off, MiB), off)
        h.flush()
        h.shutdown()
        rec = json.loads(sb.vbp("--json", "volume", "show", "r3").stdout)
        key = lambda i: ChunkKey(rec["lineage"], i, rec["head"])  # noqa: E731

        reader = Reader(sb.uri("r3", 0))  # through host1, which reads its own copy first
        reader.start()
        assert scrub(sb)["total"]["error_pages"] == 0  # a clean pool scrubs clean

        # bit rot on each host: host1's copy is the one the reader reads. Not during a read:
        # a large read is checked in place, then sent from the file's map, and bytes that
        # change on disk in between leave unchecked (blockd cannot take them back)
        with reader.lock:
            flip(sb, "host1", key(2), 7)
            flip(sb, "host2", key(0), 3)
            flip(sb, "host2", key(0), 4)
            flip(sb, "host3", key(5), 200)
        passes = reader.passes
        while reader.passes < passes + 2 and reader.is_alive():
            time.sleep(0.1)  # the reader went over every damaged page meanwhile
        out = scrub(sb)
        total = out["total"]
        # host1's page may have been repaired by the read path already, the others only by scrub
        assert 3 <= total["errors"].get("checksum", 0) <= 4, out
        assert total["repaired"] == total["error_pages"] and total["unrepairable"] == 0, out
        assert total["ok"] and all(r["state"] == "done" for r in out["hosts"].values())
        assert sum(r["chunks"] for r in out["hosts"].values()) == REGION // CS  # each once
        assert scrub(sb)["total"]["error_pages"] == 0  # nothing left
        counted = scrape(sb)
        assert counted['vbp_scrub_errors_total{kind="checksum"}'] == total["errors"]["checksum"]
        assert counted["vbp_scrub_repairs_total"] == total["repaired"]
        assert counted["vbp_scrub_unrepairable_total"] == 0
        assert counted["vbp_scrub_chunks_total"] >= 3 * REGION // CS

        # a divergent copy: same version, other bytes, written into host3's store while it is
        # stopped (its checksum matches: only the other replicas can tell)
        from vbp.chunkstore import ChunkStore

        stop_host(sb, 2)
        st = ChunkStore(store_dir(sb, "host3"), 2 << 30)
        try:
            info = st.info(key(6))
            st.write(key(6), 9 * PAGE, b"\xee" * PAGE, chunk_size=CS, version=info.version)
        finally:
            st.close()
        up(sb)
        wait_all_up(sb)
        out = scrub(sb, "--volume", "r3")
        # (seen once in a full CI run: no divergence found, every copy scrubbed and equal;
        # what the hosts logged of that chunk says who changed host3's copy)
        assert out["total"]["errors"] == {"divergent": 1} and out["total"]["repaired"] == 1, (
            out, [line for i in range(3) for line in sb.log(i).splitlines()
                  if " chunk=6 " in line or "event=resync" in line or "stale" in line][-40:])

        reader.stop.set()
        reader.join(120)
        assert not reader.bad, (reader.bad[:5], warnings(sb))
        assert reader.passes > 2

        assert scrape(sb)['vbp_scrub_errors_total{kind="divergent"}'] == 1
        logs = "".join((sb.dir / f"host{i}" / "blockd.log").read_text() for i in (1, 2, 3))
        assert logs.count("event=scrub_repaired") >= 3 and "kind=divergent" in logs
        compare_replicas(sb, "r3")
    finally:
        if reader is not None:
            reader.stop.set()
        sb.down()
