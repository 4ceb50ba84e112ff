"""Crash safety of a real blockd: SIGKILL at random moments of writes, copy-ups, snapshots,
snapshot deletes, resizes and volume deletes, in a seeded, bounded loop (issue 5).

Each iteration runs a phase: one writer thread per writable volume writes self-describing
4 KiB blocks over NBD (FUA, or a small batch then FLUSH) while the main thread drives
`vbp volume snapshot|clone|delete|resize|create` through the real CLI; a timer SIGKILLs a
blockd at a seeded random moment. Then, with the host down, a copy of its data directory is
opened as a chunk store and checked (ChunkStore.check: slots partitioned by the index,
every page agrees with its checksum); the host restarts and every volume and snapshot is
read back whole over NBD and compared with the model:
- a block holds its latest acknowledged write, or one of the writes in flight at the kill
  (not acknowledged, so either outcome is fine); a block never written reads zeros;
- a snapshot reads exactly what the volume held when it was taken (the writer is held
  while the snapshot command runs, so "what it held" is exact), forever;
- a clone reads its snapshot until its own writes (copy-up) replace blocks;
- a shrink discards the blocks past the end; growing again reads zeros there.
What a read shows after the restart is pinned in the model (it must never change again).
At the end the pool stops cleanly, GC has freed everything no reader needs, and the real
data directories pass the same check.

Every block carries (volume uid, sequence number, offset), so a wrong read says which
write it is. VBP_KILL_SEED replays a run; VBP_KILL_ITERATIONS changes its length.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from control.cli import EXIT_IN_USE
from tests.conftest import SandboxHandle, run_vbp

MiB = 1024 * 1024
BLOCK = 4096
CHUNK = MiB
CAPACITY = 2 << 30
HEADER = struct.Struct("<QQQ")  # uid, seq, offset
SETTINGS = ["--set", "heartbeat_ttl=3", "--set", "lease_ttl=3", "--set", "peer_timeout=3",
            "--set", "gc_interval=0.5"]


def payload(uid: int, seq: int, off: int) -> bytes:
    return HEADER.pack(uid, seq, off) * (BLOCK // HEADER.size) + bytes(BLOCK % HEADER.size)


ZERO = bytes(BLOCK)


def describe(block: bytes) -> str:
    if block == ZERO:
        return "zeros"
    uid, seq, off = HEADER.unpack_from(block)
    whole = block == payload(uid, seq, off)
    return f"uid={uid} seq={seq} off={off}{'' if whole else ' (torn or foreign)'}"


@dataclass
class Vol:
    """The model of one writable volume: offset -> sequence number of what it must hold
    (0: zeros), and the writes in flight when a host died (either outcome is allowed)."""

    name: str
    uid: int
    size: int
    state: dict[int, int] = field(default_factory=dict)
    inflight: dict[int, set[int]] = field(default_factory=dict)
    snaps: dict[str, "Snap"] = field(default_factory=dict)
    uids: dict[int, int] = field(default_factory=dict)  # offset -> uid of the block held
    seq: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None
    writes: int = 0


@dataclass
class Snap:
    size: int
    state: dict[int, int]
    uids: dict[int, int]


class KillLoop:
    def __init__(self, tmp_path: Path, seed: int, hosts: int, replicas: int):
        self.rng = random.Random(seed)
        self.seed = seed
        self.sb = SandboxHandle(tmp_path / "sb", hosts)
        self.tmp = tmp_path
        self.replicas = replicas
        self.vols: dict[str, Vol] = {}
        self.killed = threading.Event()
        self.next_uid = 1
        self.counter = 0
        self.log: list[str] = []
        self.stats = {"kills": 0, "writes": 0, "inflight": 0, "ops": {}}

    # --- the pool -------------------------------------------------------------------

    def up(self) -> None:
        p = run_vbp("sandbox", "up", "--hosts", self.sb.n, "--dir", self.sb.dir, "--base-port",
                    self.sb.base_port, "--capacity", "2G", "--json", *SETTINGS, check=False)
        if p.returncode != 0:
            raise AssertionError(f"seed {self.seed}: sandbox up failed:\n{p.stderr}")
        self.sb.info = json.loads(p.stdout)

    def vbp(self, *args):
        return self.sb.vbp(*args)

    def host_uri(self, export: str, host: int) -> str:
        return f"{self.sb.info['hosts'][host]['nbd']}/{export}"

    def connect(self, export: str, host: int | None = None):
        import nbd

        h = nbd.NBD()
        h.connect_uri(self.host_uri(export, 0 if host is None else host))
        return h

    # --- writers --------------------------------------------------------------------

    def start_writer(self, v: Vol) -> None:
        v.stop.clear()
        v.error = None
        host = self.rng.randrange(self.sb.n)
        wseed = self.rng.randrange(1 << 30)
        v.thread = threading.Thread(target=self._writer, args=(v, host, wseed), daemon=True)
        v.thread.start()

    def _writer(self, v: Vol, host: int, wseed: int) -> None:
        import nbd

        rng = random.Random(wseed)
        try:
            h = self.connect(v.name, host)
        except nbd.Error as e:
            if not self.killed.is_set():
                v.error = e
            return
        try:
            while not v.stop.is_set():
                with v.lock:
                    if v.stop.is_set():
                        break
                    batch = [] if rng.random() < 0.6 else [None] * rng.randint(2, 4)
                    if not batch:
                        self._write(h, v, rng, fua=True)
                    else:
                        pend = [self._write(h, v, rng, fua=False) for _ in batch]
                        h.flush()
                        for off, seq in pend:
                            self._acked(v, off, seq)
        except nbd.Error as e:
            if not self.killed.is_set():
                v.error = e
        except BaseException as e:  # surfaced by the main thread
            v.error = e
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def _write(self, h, v: Vol, rng: random.Random, fua: bool) -> tuple[int, int]:
        import nbd

        # an NBD connection keeps the size it was opened with; a grow shows on the next one
        off = rng.randrange(min(v.size, h.get_size()) // BLOCK) * BLOCK
        v.seq += 1
        seq = v.seq
        v.inflight.setdefault(off, set()).add(seq)  # until acknowledged
        h.pwrite(payload(v.uid, seq, off), off, nbd.CMD_FLAG_FUA if fua else 0)
        if fua:
            self._acked(v, off, seq)
        return off, seq

    def _acked(self, v: Vol, off: int, seq: int) -> None:
        v.state[off] = seq
        v.uids[off] = v.uid
        v.writes += 1
        s = v.inflight.get(off)
        if s is not None:
            for x in [x for x in s if x <= seq]:
                s.discard(x)
            if not s:
                del v.inflight[off]

    def stop_writers(self, vols=None) -> None:
        for v in vols or list(self.vols.values()):
            v.stop.set()
        for v in vols or list(self.vols.values()):
            if v.thread is not None:
                v.thread.join(timeout=120)
                assert not v.thread.is_alive(), f"seed {self.seed}: writer of {v.name} hangs"
                v.thread = None
            if v.error is not None:
                raise AssertionError(f"seed {self.seed}: writer of {v.name} failed with no "
                                     f"host killed: {v.error!r}\nhistory: {self.log[-12:]}") from v.error

    # --- operations through the CLI -------------------------------------------------

    def new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def op_create(self) -> None:
        name = self.new_name("v")
        self.vbp("volume", "create", name, "--size", f"{self.rng.choice([4, 6, 8])}M",
                 "--replicas", self.replicas, "--chunk-size", "1M")
        size = json.loads(self.vbp("volume", "show", name, "--json").stdout)["size"]
        v = Vol(name, self.next_uid, size)
        self.next_uid += 1
        self.vols[name] = v
        self.start_writer(v)

    def op_snapshot(self, v: Vol) -> None:
        with v.lock:  # the writer holds its next write: the snapshot's content is exact
            if self.killed.is_set():
                return
            snap = self.new_name("s")
            self.vbp("volume", "snapshot", v.name, snap)
            v.snaps[snap] = Snap(v.size, dict(v.state), dict(v.uids))
            assert not any(o < v.size for o in v.inflight), "a snapshot with writes in flight"

    def op_clone(self, v: Vol) -> None:
        if not v.snaps:
            return self.op_snapshot(v)
        snap = self.rng.choice(sorted(v.snaps))
        s = v.snaps[snap]
        name = self.new_name("c")
        self.vbp("volume", "clone", f"{v.name}@{snap}", name)
        c = Vol(name, self.next_uid, s.size, dict(s.state), uids=dict(s.uids))
        self.next_uid += 1
        self.vols[name] = c
        self.start_writer(c)  # its first writes copy chunks up

    def op_delete_snapshot(self, v: Vol) -> None:
        if not v.snaps:
            return
        snap = self.rng.choice(sorted(v.snaps))
        self.vbp("volume", "delete", f"{v.name}@{snap}")
        del v.snaps[snap]

    def op_resize(self, v: Vol) -> None:
        with v.lock:
            if self.killed.is_set():
                return
            chunks = v.size // CHUNK
            if chunks > 2 and self.rng.random() < 0.5:
                new = self.rng.randrange(2, chunks) * CHUNK
                self.vbp("volume", "resize", v.name, str(new), "--force")
                self.log.append(f"  shrunk {v.name} {v.size} -> {new}")
                for off in [o for o in v.state if o >= new]:
                    v.state[off] = 0
                    v.uids.pop(off, None)
                for off in [o for o in v.inflight if o >= new]:
                    del v.inflight[off]
            else:
                new = min(12, chunks + self.rng.randint(1, 3)) * CHUNK
                self.vbp("volume", "resize", v.name, str(new))
                self.log.append(f"  grew {v.name} {v.size} -> {new}")
            v.size = new

    def op_delete_volume(self, v: Vol) -> None:
        if len(self.vols) < 3:
            return self.op_create()
        self.stop_writers([v])  # a clean close: the gateway flushes and hands its lease back
        # ... unless the kill took its gateway: the lease then stays until it runs out
        # (lease_ttl), and a delete meanwhile is refused as for a volume still open
        deadline = time.monotonic() + 15
        while (p := self.sb.vbp("volume", "delete", v.name, check=False)).returncode:
            assert (p.returncode == EXIT_IN_USE and "write lease" in p.stderr
                    and self.killed.is_set() and time.monotonic() < deadline), p.stderr
            time.sleep(0.5)
        del self.vols[v.name]

    def random_op(self) -> None:
        kind = self.rng.choices(
            ["snapshot", "clone", "delete_snapshot", "resize", "delete_volume", "create"],
            weights=[4, 3, 2, 3, 1, 1])[0]
        v = self.vols[self.rng.choice(sorted(self.vols))]
        self.stats["ops"][kind] = self.stats["ops"].get(kind, 0) + 1
        self.log.append(f"{kind} {v.name}")
        getattr(self, f"op_{kind}")(*([] if kind == "create" else [v]))

    # --- one phase: work, kill --------------------------------------------------------

    def phase(self, it: int) -> int:
        self.killed.clear()
        for v in self.vols.values():
            self.start_writer(v)
        victim = self.rng.randrange(self.sb.n)
        delay = self.rng.uniform(0.2, 2.5)
        pid = self.sb.info["hosts"][victim]["pid"]
        done = threading.Event()

        def kill() -> None:
            self.killed.set()
            os.kill(pid, signal.SIGKILL)
            done.set()

        timer = threading.Timer(delay, kill)  # it may hit in the middle of any operation
        timer.start()
        try:
            for _ in range(self.rng.randint(1, 4)):
                if self.killed.is_set():
                    break
                self.random_op()
        finally:
            assert done.wait(timeout=120)
        self.stats["kills"] += 1
        self.log.append(f"iteration {it}: killed host{victim + 1} after {delay:.2f}s")
        self.stop_writers()
        return victim

    # --- checks -------------------------------------------------------------------------

    def wait_dead(self, host: int) -> None:
        pid = self.sb.info["hosts"][host]["pid"]
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            assert time.monotonic() < deadline, f"host{host + 1} does not die"
            time.sleep(0.02)

    def check_store(self, host: int, copy: bool) -> None:
        """Open the host's chunk store (a copy of it while the host may restart) and check it."""
        from vbp.chunkstore import ChunkStore

        src = self.sb.dir / f"host{host + 1}" / "data" / "chunks"
        path = src
        if copy:
            path = self.tmp / "copy"
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["cp", "-r", "--sparse=always", str(src), str(path)], check=True)
            (path / "lock").unlink(missing_ok=True)
        store = ChunkStore(path, CAPACITY)
        try:
            problems = store.check()
            assert problems == [], f"seed {self.seed}: host{host + 1} chunk store: {problems}"
        finally:
            store.close()

    def expected(self, off: int, state, inflight, uids, uid) -> list[bytes]:
        seq = state.get(off, 0)
        out = [payload(uids.get(off, uid), seq, off) if seq else ZERO]
        out += [payload(uid, s, off) for s in sorted(inflight.get(off, ()))]
        return out

    def read_all(self, export: str, size: int, host: int) -> bytes:
        h = self.connect(export, host)
        try:
            assert h.get_size() == size, f"seed {self.seed}: {export} has size {h.get_size()}, not {size}"
            return b"".join(h.pread(min(CHUNK, size - o), o) for o in range(0, size, CHUNK))
        finally:
            h.shutdown()

    def verify(self) -> None:
        self.stats["inflight"] += sum(len(s) for v in self.vols.values() for s in v.inflight.values())
        for v in self.vols.values():
            host = self.rng.randrange(self.sb.n)
            data = self.read_all(v.name, v.size, host)
            for off in range(0, v.size, BLOCK):
                got = data[off: off + BLOCK]
                ok = self.expected(off, v.state, v.inflight, v.uids, v.uid)
                if got not in ok:
                    raise AssertionError(
                        f"seed {self.seed}: {v.name} offset {off}: read {describe(got)}, expected "
                        f"{' or '.join(describe(x) for x in ok)}\nhistory: {self.log[-12:]}")
                if got != ZERO:  # pin what the restart settled on
                    uid, seq, _ = HEADER.unpack_from(got)
                    v.state[off], v.uids[off] = seq, uid
                elif off in v.state:
                    v.state[off] = 0
            v.inflight.clear()
            for name, s in v.snaps.items():
                data = self.read_all(f"{v.name}@{name}", s.size, host)
                for off in range(0, s.size, BLOCK):
                    got = data[off: off + BLOCK]
                    ok = self.expected(off, s.state, {}, s.uids, v.uid)
                    if got != ok[0]:
                        raise AssertionError(
                            f"seed {self.seed}: snapshot {v.name}@{name} offset {off}: read "
                            f"{describe(got)}, expected {describe(ok[0])}\nhistory: {self.log[-12:]}")

    def final_check(self) -> None:
        """After the last restart: stale copies resynced, then a clean stop once GC has freed
        everything no reader needs; every host's real store passes the check."""
        from vbp.registry import open_registry
        from vbp.volume import VolumeRecord, readers

        reg = open_registry(self.sb.registry)
        try:
            deadline = time.monotonic() + 90
            while reg.list_stale() and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not reg.list_stale(), f"seed {self.seed}: stale copies left: {reg.list_stale()[:5]}"
            by_lineage = readers([VolumeRecord.from_dict(d) for d in reg.list_volumes()])
        finally:
            reg.close()
        for attempt in range(6):
            time.sleep(1.0)  # a few GC periods (gc_interval=0.5) before looking
            self.sb.down()
            garbage = [g for i in range(self.sb.n) for g in self.garbage(i, by_lineage)]
            if not garbage:
                break
            self.up()
        assert garbage == [], f"seed {self.seed}: chunks no reader needs: {garbage[:5]}"
        for i in range(self.sb.n):
            self.check_store(i, copy=False)

    def wait_leases_out(self) -> None:
        """Until the killed gateway's leases run out: the verify's gateway then takes them
        over, which reconciles writes the dead one left on some replicas only, before it
        reads (blockd: VolumeProvider._settle_orphaned_lease). Until then those unacked
        bytes may read differently through different hosts."""
        from vbp.registry import open_registry

        reg = open_registry(self.sb.registry)
        try:
            deadline = time.monotonic() + 15
            while any(reg.get_lease(v.name) is not None for v in self.vols.values()):
                assert time.monotonic() < deadline, f"seed {self.seed}: a lease is still held"
                time.sleep(0.2)
        finally:
            reg.close()

    def garbage(self, host: int, by_lineage) -> list:
        from vbp.chunkstore import ChunkStore
        from vbp.volume import needed_gens

        store = ChunkStore(self.sb.dir / f"host{host + 1}" / "data" / "chunks", CAPACITY)
        try:
            keys = list(store.keys())
        finally:
            store.close()
        gens: dict[tuple[str, int], list[int]] = {}
        for k in keys:
            gens.setdefault((k.lineage, k.index), []).append(k.gen)
        return [(f"host{host + 1}", k) for k in keys
                if k.gen not in needed_gens(by_lineage.get(k.lineage, ()), k.index,
                                            gens[(k.lineage, k.index)])]

    # --- the loop -----------------------------------------------------------------------

    def run(self, iterations: int) -> None:
        self.up()
        for _ in range(2):
            self.op_create()
        self.stop_writers()
        for it in range(iterations):
            victim = self.phase(it)
            self.wait_dead(victim)
            self.check_store(victim, copy=True)
            self.up()
            if self.replicas > 1:
                self.wait_leases_out()
            self.verify()
            self.stats["writes"] = sum(v.writes for v in self.vols.values())
        self.final_check()


def seed_from_env() -> int:
    env = os.environ.get("VBP_KILL_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


# (iterations per run: each CI run draws a new seed, so runs add up; the suite's time
# budget, 20 minutes on two cores, sets how many one run takes)
@pytest.mark.parametrize("hosts,replicas,default_iterations", [(1, 1, 5), (3, 3, 5)],
                         ids=["replicas1", "replicas3"])
def test_blockd_killed_at_random_moments(tmp_path, hosts, replicas, default_iterations):
    seed = seed_from_env()
    iterations = int(os.environ.get("VBP_KILL_ITERATIONS", default_iterations))
    print(f"kill loop: seed {seed} (replay with VBP_KILL_SEED={seed}), {iterations} iterations")
    loop = KillLoop(tmp_path, seed, hosts, replicas)
    try:
        loop.run(iterations)
    finally:
        for v in loop.vols.values():
            v.stop.set()
        loop.sb.down()
    print(f"kill loop: seed {seed}: {loop.stats}")
