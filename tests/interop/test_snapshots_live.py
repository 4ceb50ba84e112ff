"""Snapshots, deletes and resizes of volumes that clients are using, on a real sandbox."""

from __future__ import annotations

import errno
import json
import re
import struct
import threading
import time

import pytest

from tests.conftest import run_vbp

MiB = 1024 * 1024
BLOCK = 4096


def connect(uri):
    import nbd

    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def read_all(h, size: int) -> bytes:
    return b"".join(h.pread(min(16 * MiB, size - o), o) for o in range(0, size, 16 * MiB))


def block(i: int) -> bytes:
    return struct.pack("<Q", i + 1) * (BLOCK // 8)


def test_snapshot_under_live_writes_is_consistent(sandbox):
    """Writes acknowledged before the snapshot command started are in the snapshot; writes
    started after it returned are not; the snapshot never changes afterwards."""
    sandbox.vbp("volume", "create", "live", "--size", "64M", "--replicas", "3", "--chunk-size", "1M")
    h = connect(sandbox.uri("live"))
    n = 64 * MiB // BLOCK
    times: dict[int, tuple[float, float]] = {}
    stop = threading.Event()

    def writer():
        for i in range(n):
            if stop.is_set():
                break
            t0 = time.monotonic()
            h.pwrite(block(i), i * BLOCK)
            times[i] = (t0, time.monotonic())

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.5)
    s0 = time.monotonic()
    sandbox.vbp("volume", "snapshot", "live", "mid")
    s1 = time.monotonic()
    time.sleep(0.5)
    stop.set()
    t.join(timeout=60)
    h.flush()
    before = [i for i, (a, b) in times.items() if b < s0]
    after = [i for i, (a, b) in times.items() if a > s1]
    assert before and after, "the writer must straddle the snapshot"
    snap = connect(sandbox.uri("live@mid", 1))
    image = read_all(snap, 64 * MiB)
    for i in before:
        assert image[i * BLOCK:(i + 1) * BLOCK] == block(i), f"block {i} acknowledged before the snapshot is missing"
    for i in after:
        assert image[i * BLOCK:(i + 1) * BLOCK] == bytes(BLOCK), f"block {i} written after the snapshot is in it"
    # more writes to the head: the snapshot does not change
    for i in range(0, n, 97):
        h.pwrite(b"\xee" * BLOCK, i * BLOCK)
    h.flush()
    assert read_all(snap, 64 * MiB) == image
    assert h.pread(BLOCK, 0) == b"\xee" * BLOCK
    snap.shutdown()
    h.shutdown()


def used(sandbox) -> int:
    st = json.loads(sandbox.vbp("pool", "status", "--json").stdout)
    return sum(x["used"] or 0 for x in st["hosts"])


def settled_used(sandbox, timeout=30) -> int:
    """Usage once earlier tests' writes and frees are all published (two equal readings
    a heartbeat period apart)."""
    deadline = time.monotonic() + timeout
    last = used(sandbox)
    while time.monotonic() < deadline:
        time.sleep(2.5)
        now = used(sandbox)
        if now == last:
            return now
        last = now
    return last


def wait_used(sandbox, pred, timeout=30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        u = used(sandbox)
        if pred(u) or time.monotonic() > deadline:
            return u
        time.sleep(0.5)


def test_deletes_free_space_and_snapshot_delete_keeps_clones(sandbox):
    sandbox.vbp("volume", "create", "gc", "--size", "16M", "--replicas", "3", "--chunk-size", "1M")
    base = settled_used(sandbox)
    h = connect(sandbox.uri("gc"))
    h.pwrite(b"A" * (8 * MiB), 0)
    h.flush()
    h.shutdown()
    # stats are published with the heartbeat
    written = wait_used(sandbox, lambda u: u >= base + 3 * 8 * MiB)
    assert written >= base + 3 * 8 * MiB
    sandbox.vbp("volume", "snapshot", "gc", "s1")
    sandbox.vbp("volume", "clone", "gc@s1", "gc-clone")
    h = connect(sandbox.uri("gc"))
    h.pwrite(b"B" * (8 * MiB), 0)  # overwrite: the snapshot keeps the old chunks
    h.flush()
    h.shutdown()
    with_snap = wait_used(sandbox, lambda u: u >= base + 3 * 16 * MiB)
    assert with_snap >= base + 3 * 16 * MiB
    sandbox.vbp("volume", "delete", "gc@s1")  # the clone still needs the snapshot's chunks
    c = connect(sandbox.uri("gc-clone", 2))
    assert c.pread(4096, 5 * MiB) == b"A" * 4096
    c.shutdown()
    time.sleep(3)
    c = connect(sandbox.uri("gc-clone", 1))
    assert c.pread(4096, 7 * MiB) == b"A" * 4096
    c.shutdown()
    sandbox.vbp("volume", "delete", "gc-clone")  # now the old chunks are garbage
    after = wait_used(sandbox, lambda u: u <= base + 3 * 8 * MiB)
    assert after <= base + 3 * 8 * MiB
    sandbox.vbp("volume", "delete", "gc")
    final = wait_used(sandbox, lambda u: u <= base)
    assert final <= base


def test_shrink_then_grow_reads_zeros(sandbox):
    sandbox.vbp("volume", "create", "rs", "--size", "32M", "--replicas", "3", "--chunk-size", "1M")
    h = connect(sandbox.uri("rs"))
    h.pwrite(b"Z" * (32 * MiB), 0)
    h.flush()
    h.shutdown()
    p = sandbox.vbp("volume", "resize", "rs", "16M", check=False)
    assert p.returncode == 1 and "--force" in p.stderr
    p = sandbox.vbp("volume", "resize", "rs", "16100K", "--force", "--json", check=False)
    assert p.returncode == 1 and "multiple of the chunk size" in p.stderr
    sandbox.vbp("volume", "resize", "rs", "16M", "--force")
    sandbox.vbp("volume", "resize", "rs", "32M")
    h = connect(sandbox.uri("rs", 1))
    assert h.get_size() == 32 * MiB
    assert h.pread(MiB, 15 * MiB) == b"Z" * MiB
    assert h.pread(MiB, 16 * MiB) == bytes(MiB)
    assert h.pread(MiB, 31 * MiB) == bytes(MiB)
    h.pwrite(b"n" * 4096, 20 * MiB)
    h.flush()
    assert h.pread(8192, 20 * MiB) == b"n" * 4096 + bytes(4096)
    h.shutdown()


def test_shrink_under_an_open_client_refuses_its_writes_past_the_new_end(sandbox):
    """A client connected before a shrink still knows the old size (NBD tells no resize):
    once its gateway has the new record, a write (ENOSPC) or trim (EINVAL) past the new
    end is refused, as past any export's end, never acknowledged into chunks the volume no
    longer has (garbage collection frees them; growing again reads zeros)."""
    import nbd

    sandbox.vbp("volume", "create", "rsl", "--size", "8M", "--replicas", "3", "--chunk-size", "1M")
    h = connect(sandbox.uri("rsl"))
    h.pwrite(b"A" * (8 * MiB), 0)
    h.flush()
    sandbox.vbp("volume", "resize", "rsl", "4M", "--force")
    deadline = time.monotonic() + 10
    refused = None
    while refused is None and time.monotonic() < deadline:
        try:  # (acknowledged before the gateway's record sync: into the old head, hidden)
            h.pwrite(b"X" * BLOCK, 6 * MiB)
            h.flush()
        except nbd.Error as e:
            refused = e
        time.sleep(0.1)
    assert refused is not None, "a write past the new end was still acknowledged 10 s after the shrink"
    assert refused.errno in (errno.ENOSPC, "ENOSPC"), refused
    with pytest.raises(nbd.Error):
        h.trim(BLOCK, 7 * MiB)
    h.pwrite(b"Y" * BLOCK, 4 * MiB - BLOCK)  # up to the new end: served as ever
    h.flush()
    assert h.pread(BLOCK, 4 * MiB - BLOCK) == b"Y" * BLOCK
    sandbox.vbp("volume", "resize", "rsl", "8M")
    c = connect(sandbox.uri("rsl", 1))
    assert c.pread(BLOCK, 6 * MiB) == bytes(BLOCK)
    assert c.pread(BLOCK, 3 * MiB) == b"A" * BLOCK
    c.shutdown()
    h.shutdown()


def test_pool_status_and_host_commands(sandbox):
    st = json.loads(sandbox.vbp("pool", "status", "--json").stdout)
    assert {h["id"] for h in st["hosts"]} == {"host1", "host2", "host3"}
    assert all(h["capacity"] == 4 << 30 for h in st["hosts"])
    p = sandbox.vbp("pool", "status")
    assert "host1" in p.stdout and "degraded" in p.stdout
    p = sandbox.vbp("host", "maintenance", "host2", "on", "--json")
    assert json.loads(p.stdout)["host"]["maintenance"] is True
    sandbox.vbp("host", "maintenance", "host2", "off")
    p = sandbox.vbp("host", "drain", "nohost", check=False)
    assert p.returncode == 3 and "nohost" in p.stderr


def _errno_of(op) -> object:
    import nbd

    try:
        op()
    except nbd.Error as e:
        return e.errno
    return None


def connect_with_status(uri):
    """A libnbd handle asking for base:allocation (block status)."""
    import nbd

    c = nbd.NBD()
    c.add_meta_context("base:allocation")
    c.connect_uri(uri)
    return c


def _freed(log: str, lineage: str, indexes) -> bool:
    """Whether a host's log shows garbage collection freeing a generation of each chunk
    `indexes` of `lineage` (written once: one generation each)."""
    got = {int(i) for i in re.findall(rf"event=gc_chunk lineage={lineage} index=(\d+) ", log)}
    return set(indexes) <= got


def test_shrink_under_open_clients_refuses_requests_past_the_new_end(sandbox):
    """Clients connected before a shrink (the gateway holding the lease, and a reader on
    another host) still know the old size. Once their hosts have the new record, every
    request past the new end is refused as past any export's end (proto.md, "Error
    values"): READ, TRIM, BLOCK_STATUS and CACHE with EINVAL, WRITE and WRITE_ZEROES with
    ENOSPC. A read there never answers the bytes the shrink discarded, nor zeros (a
    client could take them for the volume's content), however long the chunks have been
    freed; inside the new end everything is served as before."""
    sandbox.vbp("volume", "create", "rsr", "--size", "8M", "--replicas", "3", "--chunk-size", "1M")
    h = connect_with_status(sandbox.uri("rsr"))
    h.pwrite(b"A" * (8 * MiB), 0)
    h.flush()
    reader = connect_with_status(sandbox.uri("rsr", 1))  # (no lease: a reader on another host)
    assert reader.pread(BLOCK, 6 * MiB) == b"A" * BLOCK
    sandbox.vbp("volume", "resize", "rsr", "4M", "--force")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # (both hosts adopt the record within a sync)
        if _errno_of(lambda: h.pwrite(b"X" * BLOCK, 6 * MiB)) \
                and _errno_of(lambda: reader.pread(BLOCK, 6 * MiB)):
            break
        time.sleep(0.1)
    # garbage collection (every second here) has freed the chunks cut off, on every host
    lineage = json.loads(sandbox.vbp("volume", "show", "rsr", "--json").stdout)["lineage"]
    deadline = time.monotonic() + 30
    while not all(_freed(sandbox.log(i), lineage, range(4, 8)) for i in range(3)):
        assert time.monotonic() < deadline, "the chunks past the new end were not freed"
        time.sleep(0.2)
    EINVAL, ENOSPC = (errno.EINVAL, "EINVAL"), (errno.ENOSPC, "ENOSPC")
    for c in (h, reader):
        for length, offset in ((BLOCK, 6 * MiB), (MiB, 5 * MiB), (2 * BLOCK, 4 * MiB - BLOCK),
                               (3 * MiB, 2 * MiB), (BLOCK, 8 * MiB - BLOCK)):
            assert _errno_of(lambda: c.pread(length, offset)) in EINVAL, (c, length, offset)
            assert _errno_of(lambda: c.block_status(length, offset, lambda *a: 0)) in EINVAL
            assert _errno_of(lambda: c.cache(length, offset)) in EINVAL
        assert c.pread(BLOCK, 4 * MiB - BLOCK) == b"A" * BLOCK  # up to the new end: served
        assert c.pread(2 * MiB, 2 * MiB) == b"A" * (2 * MiB)
        c.cache(BLOCK, 4 * MiB - BLOCK)
        seen = []
        c.block_status(BLOCK, 4 * MiB - BLOCK, lambda ctx, off, entries, err: seen.extend(entries))
        assert seen and seen[0] >= BLOCK
    assert _errno_of(lambda: h.trim(BLOCK, 7 * MiB)) in EINVAL
    assert _errno_of(lambda: h.zero(BLOCK, 7 * MiB)) in ENOSPC
    assert _errno_of(lambda: h.pwrite(b"X" * BLOCK, 7 * MiB)) in ENOSPC
    assert _errno_of(lambda: h.zero(2 * BLOCK, 4 * MiB - BLOCK)) in ENOSPC
    assert h.pread(BLOCK, 4 * MiB - BLOCK) == b"A" * BLOCK  # (nothing of it done)
    reader.shutdown()
    h.shutdown()


def test_a_volume_grown_again_after_a_shrink_takes_its_open_clients_requests_at_once(sandbox):
    """Clients connected before a shrink (the gateway holding the lease, and a reader on
    another host) still know the old size; refused past the shrunk end, they are served
    there again as soon as `vbp volume resize` has grown the volume back, with no wait
    for their gateways' next read of the record: the write `resize` made room for is
    taken (not ENOSPC), and reads, block status and cache there answer the new zeros
    (not EINVAL)."""
    sandbox.vbp("volume", "create", "rsg", "--size", "8M", "--replicas", "3", "--chunk-size", "1M")
    h = connect_with_status(sandbox.uri("rsg"))
    h.pwrite(b"A" * (8 * MiB), 0)
    h.flush()
    reader = connect_with_status(sandbox.uri("rsg", 1))
    assert reader.pread(BLOCK, 6 * MiB) == b"A" * BLOCK
    for _ in range(3):
        sandbox.vbp("volume", "resize", "rsg", "4M", "--force")
        deadline = time.monotonic() + 10
        while not (_errno_of(lambda: h.pwrite(b"X" * BLOCK, 6 * MiB))
                   and _errno_of(lambda: reader.pread(BLOCK, 6 * MiB))):
            assert time.monotonic() < deadline, "requests past the new end still served"
            time.sleep(0.1)
        sandbox.vbp("volume", "resize", "rsg", "8M")
        h.pwrite(b"G" * BLOCK, 6 * MiB)  # at once: no ENOSPC
        h.zero(BLOCK, 7 * MiB)
        h.flush()
        assert h.pread(2 * BLOCK, 6 * MiB) == b"G" * BLOCK + bytes(BLOCK)
        # the reader's host adopts the grow at a record sync: as at once
        assert reader.pread(BLOCK, 5 * MiB) == bytes(BLOCK)
        assert reader.pread(BLOCK, 6 * MiB) == b"G" * BLOCK
        reader.cache(BLOCK, 5 * MiB)
        seen = []
        reader.block_status(BLOCK, 5 * MiB, lambda ctx, off, entries, err: seen.extend(entries))
        assert seen and seen[0] >= BLOCK
    assert _errno_of(lambda: h.trim(BLOCK, 7 * MiB)) is None
    reader.shutdown()
    h.shutdown()


def test_no_write_past_the_new_end_succeeds_once_a_shrink_has_returned(sandbox):
    """A writer hammers the tail of a volume through its gateway while another process
    shrinks it. Writes past the new end that the shrink overtakes may be acknowledged
    (they come before it, and it discards them), but none that starts after `vbp volume
    resize` returned: the volume no longer has those blocks, and a write acknowledged
    there would be lost, the client told success."""
    import nbd

    sandbox.vbp("volume", "create", "rsw", "--size", "8M", "--replicas", "3", "--chunk-size", "1M")
    h = connect(sandbox.uri("rsw"))
    h.pwrite(b"A" * (8 * MiB), 0)
    h.flush()
    log: list[tuple[float, int, bool]] = []  # (start, offset, acknowledged)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            offset = 4 * MiB + (i * 7919 % 1024) * BLOCK  # past the new end (4M)
            t0 = time.monotonic()
            try:
                h.pwrite(b"W" * BLOCK, offset)
                log.append((t0, offset, True))
            except nbd.Error:
                log.append((t0, offset, False))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        sandbox.vbp("volume", "resize", "rsw", "4M", "--force")
        returned = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        t.join(timeout=60)
    after = [(s, o) for s, o, ok in log if s > returned]
    assert after, "the writer must go on past the shrink"
    late = [(round(s - returned, 3), o) for s, o, ok in log if s > returned and ok]
    assert not late, f"writes past the new end acknowledged after the shrink returned: {late[:5]}"
    assert any(ok for s, o, ok in log if s < returned)  # (before it: served as ever)
    h.shutdown()
