"""SIGKILL a process writing to a ChunkStore at random moments; every acknowledged write
must survive, nothing may fail its checksum, no slot may leak or have two owners.

One store directory lives through all iterations, so recovery runs on top of recovery. The
worker (tests/faults/chunkstore_worker.py) prints what it issued and what became durable.
Also: a really full filesystem (a small tmpfs in a private mount namespace) gives NoSpace and
damages nothing.
"""

from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from vbp.chunkstore import ChunkStore
from vbp.errors import ChecksumError
from vbp.layout import PAGE_SIZE, ChunkKey

sys.path.insert(0, str(Path(__file__).parent))
import chunkstore_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "chunkstore_worker.py"
ITERATIONS = 15
SEED = int(os.environ.get("VBP_CRASH_SEED", "20261125"))


def run_until_killed(path: Path, seed: int, first_seq: int, rng: random.Random) -> list[list[str]]:
    proc = subprocess.Popen([sys.executable, str(WORKER), "crash", str(path), str(seed),
                             str(first_seq)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[str] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    early = rng.random() < 0.2  # sometimes kill it while it opens (recovery runs there)
    budget = rng.random() * (0.3 if early else rng.choice([0.05, 0.3, 0.6, 1.0]))
    start = time.monotonic()
    deadline = start + budget if early else None
    while True:
        if deadline is None and lines:
            deadline = time.monotonic() + budget  # counted from the store being open
        if deadline is not None and time.monotonic() >= deadline:
            break
        if time.monotonic() - start > 20:
            break
        for _ in sel.select(timeout=0.005):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                proc.wait()
                raise AssertionError(f"worker died: {proc.stderr.read().decode()[-3000:]}")
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(d.decode() for d in done)
    proc.send_signal(signal.SIGKILL)
    rest, err = proc.communicate()
    buf += rest
    lines.extend(d.decode() for d in buf.split(b"\n")[:-1])  # a torn last line is dropped
    if not lines:
        return []
    assert lines[0] == "OPEN", err.decode()[-3000:]
    return [ln.split() for ln in lines[1:]]


def check_index_partition(path: Path) -> None:
    """Straight from LMDB, before any recovery: chunks, free and limbo own every slot below
    each size's high-water mark exactly once."""
    env = lmdb.open(str(path / "index"), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            dbs = {n: env.open_db(n.encode(), txn=txn, create=False)
                   for n in ("chunks", "free", "limbo", "meta")}
            nslots = {int(k[7:]): int(v) for k, v in txn.cursor(db=dbs["meta"])
                      if k.startswith(b"nslots:")}
            owners: dict = {}
            import msgpack
            for _, v in txn.cursor(db=dbs["chunks"]):
                slot, cs, _, _ = msgpack.unpackb(v)
                owners.setdefault((cs, slot), []).append("chunk")
            for n in ("free", "limbo"):
                for k, _ in txn.cursor(db=dbs[n]):
                    owners.setdefault(struct.unpack(">IQ", k), []).append(n)
    finally:
        env.close()
    for cs, n in nslots.items():
        for slot in range(n):
            assert len(owners.get((cs, slot), [])) == 1, (cs, slot, owners.get((cs, slot)))
    assert all(slot < nslots[cs] for cs, slot in owners)


class Op:
    def __init__(self, kind, seq, key, pages, fua):
        self.kind, self.seq, self.key, self.pages, self.fua = kind, seq, key, pages, fua
        self.returned = None  # version, once the call returned
        self.durable = False


def parse(log):
    ops: list[Op] = []
    by_seq: dict[int, Op] = {}
    returned: list[Op] = []
    for words in log:
        tag = words[0]
        if tag in ("W", "Z"):
            seq, index, gen, first, n, fua = map(int, words[1:])
            op = Op(tag, seq, ChunkKey(worker.LINEAGE, index, gen), range(first, first + n), fua)
            ops.append(op)
            by_seq[seq] = op
        elif tag == "R":
            op = by_seq[int(words[1])]
            op.returned = int(words[2])
            op.durable = op.durable or bool(op.fua)
            returned.append(op)
        elif tag == "X":
            seq, index, gen = map(int, words[1:])
            op = Op("X", seq, ChunkKey(worker.LINEAGE, index, gen), range(0), 0)
            ops.append(op)
            by_seq[seq] = op
        elif tag == "XD":
            by_seq[int(words[1])].returned = 0
            by_seq[int(words[1])].durable = True
        elif tag == "FD":
            for op in returned:
                op.durable = True
        elif tag == "NOSPACE":
            ops.remove(by_seq.pop(int(words[1])))
    return ops


def verify(store: ChunkStore, ops: list[Op], baseline: dict) -> None:
    keys = set(baseline) | {op.key for op in ops}
    for key in keys:
        mine = [op for op in ops if op.key == key]
        deleted = any(op.kind == "X" for op in mine)
        info = store.info(key)
        pages = {}
        if info is not None:
            for p in range(worker.PAGES):
                try:
                    pages[p] = store.read(key, p * PAGE_SIZE, PAGE_SIZE)
                except ChecksumError as e:  # pragma: no cover - the failure we look for
                    raise AssertionError(f"checksum error after recovery: {key} page {p}") from e
                d = worker.decode_page(pages[p])
                assert d is not None, f"page {p} of {key} holds bytes nobody wrote"
                if d:
                    seq, index, gen, page = d
                    assert (index, page) == (key.index, p) and gen in (key.gen, 0), (key, p, d)
        if not mine:
            if key in baseline:
                assert info is not None, f"{key} vanished though nothing touched it"
                assert (info.version, pages) == baseline[key], f"{key} changed untouched"
            else:
                assert info is None
            continue
        last = mine[-1]
        if last.kind == "X" and last.durable:
            assert info is None, f"{key} deleted (acknowledged) but still there"
        for i, op in enumerate(mine):
            if not op.durable or op.kind == "X":
                continue
            later = mine[i + 1:]
            if any(o.kind == "X" for o in later):
                continue
            assert info is not None, f"{key} lost: acknowledged seq {op.seq}"
            if not later:
                assert info.version >= op.returned, (key, info.version, op.returned)
            for p in op.pages:
                if any(p in o.pages for o in later):
                    continue
                want = bytes(PAGE_SIZE) if op.kind == "Z" else worker.page_bytes(
                    op.seq, key.index, key.gen, p)
                assert pages[p] == want, f"acknowledged seq {op.seq} lost on {key} page {p}"
        if key in baseline and not deleted and info is not None:
            touched = {p for op in mine for p in op.pages}
            base_pages = baseline[key][1]
            for p in range(worker.PAGES):
                if p not in touched:
                    assert pages[p] == base_pages[p], f"untouched page {p} of {key} changed"


def snapshot(store: ChunkStore) -> dict:
    out = {}
    for key in store.keys():
        pages = {p: store.read(key, p * PAGE_SIZE, PAGE_SIZE) for p in range(worker.PAGES)}
        out[key] = (store.info(key).version, pages)
    return out


@pytest.mark.timeout(120)
def test_sigkill_loses_no_acknowledged_write(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "store"
    baseline: dict = {}
    durable_ops = early_kills = 0
    for it in range(ITERATIONS):
        log = run_until_killed(path, rng.randrange(1 << 30), (it + 1) * 1_000_000, rng)
        check_index_partition(path)
        ops = parse(log)
        durable_ops += sum(op.durable for op in ops)
        early_kills += not log
        store = ChunkStore(path, worker.CAPACITY)
        try:
            assert store.fsck() == [], f"seed {SEED} iteration {it}: {store.fsck()}"
            verify(store, ops, baseline)
            assert store.stats().checksum_errors == 0
            assert store.stats().used <= worker.CAPACITY
            baseline = snapshot(store)
        except AssertionError as e:
            raise AssertionError(f"seed {SEED} iteration {it}: {e}") from e
        finally:
            store.close()
    assert durable_ops > 20, "the workload acknowledged too little to prove anything"
    print(f"seed {SEED}: {durable_ops} durable operations checked, {early_kills} kills "
          f"before the store was open")


def test_full_filesystem_gives_nospace_and_damages_nothing(tmp_path):
    """A 1.5 MiB tmpfs in a private mount namespace: the disk really fills up."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed for this test"
    mnt = tmp_path / "small"
    mnt.mkdir()
    script = (f"mount -t tmpfs -o size=1536k vbp-test {mnt} && "
              f"exec {sys.executable} {WORKER} enospc {mnt}/store")
    out = subprocess.run([unshare, "-rm", "sh", "-c", script], capture_output=True,
                         timeout=100)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    assert out.stdout.decode().startswith("OK "), out.stdout.decode()
