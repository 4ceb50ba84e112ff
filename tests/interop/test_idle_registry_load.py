"""What an idle open volume costs the registry: a hypervisor host keeps one volume open per
VM all day, most of them idle. blockd read every open volume's record every 0.2 s and its
stale records every second, whatever changed: with etcd, 20 idle open volumes kept blockd
at 15 % of a core and etcd at 11 %. It watches the records now, and reads them all only
now and then (blockd.service RECORD_SYNC_MAX, STALE_REFRESH_MAX)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import nbd
import pytest
import trio

from blockd.config import Config
from blockd.service import GC_FULL_PERIOD, RECORD_SYNC_MAX, STALE_REFRESH_MAX, Blockd
from control import api
from tests.conftest import ROOT, stop_process
from tests.etcd import EtcdProcess
from tests.sim.harness import call
from vbp.errors import RegistryUnavailable
from vbp.registry import open_registry
from vbp.registry.kv import Put

pytestmark = pytest.mark.timeout(180)

VOLUMES = 10
WINDOW = 6.0  # seconds counted


@pytest.fixture
def etcd(tmp_path):
    server = EtcdProcess(tmp_path / "etcd").start(timeout=30)
    try:
        yield server
    finally:
        server.stop()


def _reads(etcd) -> int:
    """Range requests etcd served so far (its own counter)."""
    text = httpx.get(f"http://{etcd.endpoint}/metrics", timeout=5).text
    return int(float(re.search(r"^etcd_mvcc_range_total (\S+)$", text, re.M).group(1)))


def _reads_over(etcd, seconds: float) -> int:
    before = _reads(etcd)
    time.sleep(seconds)
    return _reads(etcd) - before


def test_idle_open_volumes_cost_the_registry_little(etcd, tmp_path):
    log = tmp_path / "blockd.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", "h1", "--data-dir",
         str(tmp_path / "data"), "--registry", etcd.url, "--listen", "127.0.0.1:0",
         "--nbd", "127.0.0.1:0", "--capacity", "1G", "--log-level", "info"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    handles = []
    try:
        deadline = time.monotonic() + 40
        while "event=ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        port = int(re.search(r"nbd listening on [\d.]+:(\d+)", log.read_text()).group(1))
        with open_registry(etcd.url) as reg:
            for i in range(VOLUMES):
                api.create_volume(reg, f"v{i}", 4 << 20, replicas=1, chunk_size="1M")
        time.sleep(2.0)  # (the start's own passes over)
        idle_host = _reads_over(etcd, WINDOW)
        for i in range(VOLUMES):  # each held by a client that wrote once (the lease taken)
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{port}/v{i}")
            h.pwrite(bytes([i + 1]) * 4096, 0)
            handles.append(h)
        time.sleep(2.0)
        with_volumes = _reads_over(etcd, WINDOW)
        per_volume = (with_volumes - idle_host) / VOLUMES / WINDOW
        # (reading every record every 0.2 s and the stale records every second cost about
        # 6 reads a second for each open volume; now about 1, mostly its lease renewals)
        assert per_volume < 2.0, (idle_host, with_volumes)
        for i, h in enumerate(handles):  # still served, and by the data written
            assert h.pread(4096, 0) == bytes([i + 1]) * 4096
        # a change still reaches the open export at once: a snapshot of an open volume
        # completes (its holder saw the request), and the volume grows under its client
        with open_registry(etcd.url) as reg:
            t0 = time.monotonic()
            api.snapshot(reg, "v0", "s1")
            api.resize(reg, "v1", 8 << 20)
            assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while True:  # (a client's size is the one it connected at: a new one sees it)
            h = nbd.NBD()
            h.connect_uri(f"nbd://127.0.0.1:{port}/v1")
            handles.append(h)
            if h.get_size() == 8 << 20:
                break
            assert time.monotonic() < deadline, "the open export never adopted the grow"
            time.sleep(0.1)
        h.pwrite(b"\xee" * 4096, 6 << 20)
        assert h.pread(4096, 6 << 20) == b"\xee" * 4096
        assert handles[1].pread(4096, 0) == b"\x02" * 4096
        assert proc.poll() is None
    finally:
        for h in handles:
            h.shutdown()
        stop_process(proc, 15)


def test_idle_watches_start_from_a_recent_revision(etcd, tmp_path):
    """An idle pool changes no volume or stale record for hours, while heartbeats, stats
    and lease renewals move etcd's revision on all the time. A watch begun after an old
    revision makes etcd read every revision of every key since (up to two compaction
    periods, 20 min), to find none under its prefix: each host begins two a second.
    Measured, 20,000 revisions behind: 24 ms of etcd CPU a watch, where one from now
    costs 7. The watches must start from a revision at most a full pass old."""
    cfg = _config(etcd, tmp_path)
    seen: dict[str, list[int]] = {"volume_changes": [], "stale_changes": []}
    out: dict = {}

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            reg = b.registry.sync
            for what in seen:  # (what each watch starts after, the real call made)
                real = getattr(reg, what)

                def record(after_rev, timeout, real=real, what=what):
                    seen[what].append(after_rev)
                    return real(after_rev, timeout)
                setattr(reg, what, record)
            await trio.sleep(2.0)  # (its first passes over)

            def move_on():  # other keys change, as heartbeats and lease renewals do
                with open_registry(etcd.url) as other:
                    for i in range(300):
                        other.kv.txn([], [Put(b"vbp/test/other", b"%d" % i)])
                    out["moved_to"] = other.revision()
            await trio.to_thread.run_sync(move_on)
            for what in seen:
                seen[what].clear()
            await trio.sleep(max(RECORD_SYNC_MAX, STALE_REFRESH_MAX) + 2.5)
            nursery.cancel_scope.cancel()

    trio.run(main)
    for what, revs in seen.items():
        assert revs and revs[-1] >= out["moved_to"], (what, revs, out)


def test_stale_marks_of_two_lineages_reach_their_gateways_at_the_same_refresh(etcd, tmp_path):
    """Open gateways of two volumes (two lineages). A copy of each is recorded stale, one
    right after the other, well before a refresh: that refresh must refresh both
    gateways' maps, not the second one's a period later. A gateway reads its own copy
    while its map does not name it stale (read_ref), and a copy recorded stale misses
    acknowledged writes (a live-migrated VM's destination reads by its map before its
    first write). (The marks name a host of no placement, which the data-set step soon
    clears as moot: another change of both lineages, refreshed later.)"""
    cfg = _config(etcd, tmp_path)
    verdicts: list[tuple[float, float | None]] = []

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            reg = b.registry.sync

            def create():
                for name in ("sa", "sb"):
                    api.create_volume(reg, name, 64 << 20, replicas=1, chunk_size="1M")
            await trio.to_thread.run_sync(create)
            ga = await b.provider.open_export("sa")
            gb = await b.provider.open_export("sb")
            assert ga.lineage != gb.lineage
            refreshed: dict = {ga: [], gb: []}
            for gw in refreshed:  # (when the service refreshes each map, the real call made)
                def refresh(read, gw=gw, real=gw.refresh_stale):
                    refreshed[gw].append(trio.current_time())
                    return real(read)
                gw.refresh_stale = refresh
            await trio.sleep(1.5)  # (the first refresh of the new gateways over)
            for index in range(5):
                await trio.to_thread.run_sync(reg.mark_stale, ga.lineage, index, ["h9"], 1)
                await trio.to_thread.run_sync(reg.mark_stale, gb.lineage, index, ["h9"], 1)
                marked = trio.current_time()
                with trio.fail_after(8):
                    while not any(t > marked for t in refreshed[ga]):
                        await trio.sleep(0.005)
                await trio.sleep(0.1)
                ta = min(t for t in refreshed[ga] if t > marked)
                tb = min((t for t in refreshed[gb] if t > marked), default=None)
                verdicts.append((ta - marked, None if tb is None else tb - ta))
                await trio.sleep(1.37 * (index + 1) % 1)  # (the marks at other phases)
            nursery.cancel_scope.cancel()

    trio.run(main)
    # (a refresh begun right after the marks may have been decided before the second
    # was told: no verdict then)
    judged = [v for v in verdicts if v[0] >= 0.3]
    assert len(judged) >= 2, verdicts
    assert all(db is not None and abs(db) < 0.1 for _, db in judged), verdicts


def _after_a_full_pass(b):
    """Record the service's record passes: [(time, volumes or None for all, readers)]."""
    calls: list = []
    real = b.provider.sync_records

    async def record(volumes=None, readers=False):
        calls.append((trio.current_time(), None if volumes is None else set(volumes), readers))
        return await real(volumes, readers)
    b.provider.sync_records = record
    return calls


async def _full_pass_begun(calls) -> None:
    n = len(calls)
    with trio.fail_after(RECORD_SYNC_MAX + 5):
        while not any(v is None for _, v, _r in calls[n:]):
            await trio.sleep(0.01)


def test_a_change_whose_read_failed_is_read_again_before_the_next_pass_of_all(etcd, tmp_path):
    """The watch names a changed volume and its export reads the record; that read
    failing (the registry blinked), the change waited for the next pass of every export
    (RECORD_SYNC_MAX, 5 s) on a host holding the lease: a snapshot asked of it, a QoS
    change, a forced delete's fencing. It is read again at the next wake (a second)."""
    cfg = _config(etcd, tmp_path)
    seen: list = []

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            reg = b.registry.sync
            gw = await _written(b, "fv")
            calls = _after_a_full_pass(b)
            real_get = reg.get_volume
            armed = []

            def get_volume(name):
                if name == "fv" and armed:
                    armed.clear()
                    raise RegistryUnavailable("etcd blinked (test)")
                return real_get(name)
            reg.get_volume = get_volume
            await _full_pass_begun(calls)
            await trio.sleep(0.3)
            armed.append(True)
            n = len(calls)
            await trio.to_thread.run_sync(lambda: api.resize(open_registry(etcd.url), "fv", 16 << 20))
            with trio.fail_after(RECORD_SYNC_MAX + 5):
                while gw.size != 16 << 20:
                    await trio.sleep(0.01)
            assert not armed  # (the read failed once)
            seen.extend(v for _, v, _r in calls[n:])
            nursery.cancel_scope.cancel()

    trio.run(main)
    covering = [v for v in seen if v is None or "fv" in v]
    # the failed read, then a read of that volume again before any pass of all
    assert len(covering) >= 2 and covering[1] is not None, seen


def test_a_holder_whose_lease_runs_out_soon_reads_its_record_every_second(etcd, tmp_path):
    """A lease holder reads by its own copies past its lease deadline only while record
    reads keep its serve_until ahead (VolumeProvider._confirm: 4 s past a publication).
    Holders read their record at the passes of all (5 s) only: one whose renewals lag
    would let serve_until lapse in between, and answer from the other copies or fail
    (replicas=1). A holder whose lease runs out before the next pass of all is read with
    the exports without the lease, each second."""
    cfg = _config(etcd, tmp_path)
    got: list = []

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            gw = await _written(b, "lv")
            reads = []
            real = b.provider.sync_record

            async def sync_record(g, lease):
                if g is gw:
                    reads.append(trio.current_time())
                return await real(g, lease)
            b.provider.sync_record = sync_record
            calls = _after_a_full_pass(b)
            await _full_pass_begun(calls)
            await trio.sleep(0.2)
            b.provider.renew_all = _no_renewals  # (renewals lagging)
            gw.lease_deadline = trio.current_time() + 3.0
            t0 = trio.current_time()
            await trio.sleep(2.5)
            got.extend(t - t0 for t in reads if t > t0)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got and got[0] < 1.5, got


async def _no_renewals() -> None:
    return None


def _config(etcd, tmp_path, **settings) -> Config:
    """An in-process blockd's settings: host h1 on the test's etcd, ports of its own."""
    return Config(host_id="h1", data_dir=str(tmp_path / "h1"), registry=etcd.url,
                  listen="127.0.0.1:0", nbd="127.0.0.1:0", capacity=1 << 30,
                  **settings).validate()


async def _written(b, name: str):
    """The gateway of a new 8 MiB replicas=1 volume `name`, opened on blockd `b`, which
    holds its lease and a chunk of it (4 KiB of 0x01 written at 0)."""
    reg = b.registry.sync
    await trio.to_thread.run_sync(
        lambda: api.create_volume(reg, name, 8 << 20, replicas=1, chunk_size="1M"))
    gw = await b.provider.open_export(name)
    assert await call(gw.write(0, b"\x01" * 4096, False)) is None and gw.token
    return gw


def test_garbage_collection_reads_the_pool_only_when_something_changed(etcd, tmp_path):
    """Each garbage collection pass (gc_interval, 5 s) read every volume record, every
    lease and every host's stats from the registry, on every host, changed or not: 1,000
    hosts and 10,000 volumes, two million records a second for etcd. A pass with the same
    chunks here and no volume record changed since the last (the record watch tells)
    frees nothing the last did not: the registry is read again only every GC_FULL_PERIOD
    (what only the host stats tell, a snapshot export closed, waits that long)."""
    cfg = _config(etcd, tmp_path, gc_interval=0.25)
    counts: dict = {}

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            reg = b.registry.sync
            gw = await _written(b, "gv")
            real = reg.deleted_gens  # (read by garbage collection only, first of its reads)
            calls = []

            def deleted_gens():  # (in a worker thread)
                calls.append(time.monotonic())
                return real()
            reg.deleted_gens = deleted_gens
            await trio.sleep(1.0)
            calls.clear()
            await trio.sleep(4.0)  # idle: 16 passes
            counts["idle"] = len(calls)
            t0 = time.monotonic()  # a snapshot: the next pass reads the records again
            await trio.to_thread.run_sync(lambda: api.snapshot(open_registry(etcd.url), "gv", "s"))
            with trio.fail_after(5):
                while not any(t > t0 for t in calls):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert counts["idle"] <= 2, counts


def test_a_snapshot_deleted_just_before_a_full_record_pass_is_collected_soon(etcd, tmp_path):
    """A full pass of the record watch (every RECORD_SYNC_MAX) reads the registry's
    revision again and watches from it: a record changed after the last watch ended and
    before that read is told to no watch, so garbage collection, which passes again only
    for a told change (or every GC_FULL_PERIOD), kept a deleted snapshot's chunks for up
    to 30 s instead of a few."""
    cfg = _config(etcd, tmp_path, gc_interval=0.25)
    got: dict = {}

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            gw = await _written(b, "gv")
            await trio.to_thread.run_sync(lambda: api.snapshot(open_registry(etcd.url), "gv", "s"))
            assert await call(gw.write(0, b"\x02" * 4096, False)) is None  # (a new generation)
            lineage = gw.lineage
            assert len(b.store.gens(lineage, 0)) == 2
            await trio.sleep(2.0)  # (the passes for the writes over)
            real = b._revision
            armed = [True]

            async def revision():
                # the full pass of the record watch: the snapshot deleted just before it
                if armed and sys._getframe(1).f_code.co_name == "_watch_volumes":
                    armed.clear()
                    await trio.to_thread.run_sync(
                        lambda: api.delete_volume(open_registry(etcd.url), "gv@s"))
                    got["deleted"] = trio.current_time()
                return await real()
            b._revision = revision
            with trio.fail_after(RECORD_SYNC_MAX + 5):
                while "deleted" not in got:
                    await trio.sleep(0.05)
            with trio.move_on_after(GC_FULL_PERIOD / 3):
                while len(b.store.gens(lineage, 0)) != 1:
                    await trio.sleep(0.05)
            got["freed_after"] = trio.current_time() - got["deleted"]
            got["gens"] = len(b.store.gens(lineage, 0))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert got["gens"] == 1, got
