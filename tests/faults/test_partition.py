"""A network partition isolates the gateway (issue 7, fault test 3), with real namespaces.

Three blockd hosts, each in its own network namespace on one bridge; etcd (the registry)
listens on the bridge in the root namespace, so a cut host loses its peers and the registry
alike. A client next to host1 (a socket made inside host1's namespace) writes
self-describing blocks through host1, the gateway. Then host1's link goes down:
- host1 cannot reach min_size=2 of replicas=3: every write fails with EIO, none is
  acknowledged; its lease runs out unrenewed and it stops writing at all;
- a client next to host2 writes: host2 takes the lease once host1's has expired;
- the link comes back: host1 learns it was fenced and has the copies that took its failed
  writes resynced.
End invariant, read from every host's chunk store directly: every replica equals what
host2's client saw when it took over plus what it wrote since, which includes every write
acknowledged to host1's client and none of host1's failed ones."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from tests.conftest import run_vbp
from tests.etcd import EtcdProcess
from tests.faults.netns import Net
from tests.faults.test_etcd_pool import host_states, wait_for
from tests.faults.test_replication_faults import BLOCK, MiB, Writer, payload

HOSTS = 3
PEER_PORT, NBD_PORT = 7800, 10809
SETTINGS = {"heartbeat_ttl": 3, "lease_ttl": 4, "peer_timeout": 3}
CHUNK = 1 * MiB
A_ONLY = (16 * MiB, 24 * MiB)  # written by host1's client only, before and during the cut
SHARED = (0, 8 * MiB)  # written by both clients
SPAN = 24 * MiB


class Pool:
    """blockd processes started with `ip netns exec`, one per namespace."""

    def __init__(self, net: Net, etcd: EtcdProcess, directory, settings=None):
        self.net, self.etcd, self.dir = net, etcd, directory
        self.settings = SETTINGS if settings is None else settings
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for i in range(self.net.hosts):
            hdir = self.dir / f"host{i + 1}"
            hdir.mkdir(parents=True, exist_ok=True)
            conf = hdir / "blockd.toml"
            conf.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.settings.items()))
            log = open(hdir / "blockd.log", "ab")
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", self.net.ns(i), sys.executable, "-m", "blockd.main",
                 "--host-id", f"host{i + 1}", "--data-dir", str(hdir / "data"),
                 "--registry", self.etcd.url, "--listen", f"{self.net.addr(i)}:{PEER_PORT}",
                 "--nbd", f"{self.net.addr(i)}:{NBD_PORT}", "--capacity", "2G",
                 "--zone", "zone0", "--pod", f"pod{i + 1}", "--config", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True))
            log.close()
        wait_for("every host up", lambda: host_states(self) == {f"host{i + 1}": "up" for i in range(HOSTS)},
                 timeout=60)
        from vbp.registry import open_registry

        with open_registry(self.registry) as reg:  # chunks are placed on data-set members only
            wait_for("every host in the data set",
                     lambda: (m := reg.cluster_map()).data is not None and len(m.data) == HOSTS
                     and not m.migrating, timeout=60)

    @property
    def registry(self) -> str:
        return self.etcd.url

    def vbp(self, *args, check=True):
        return run_vbp("--registry", self.registry, *args, check=check)

    def log(self, i: int) -> str:
        return (self.dir / f"host{i + 1}" / "blockd.log").read_text(errors="replace")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextmanager
def pool_in_namespaces(tmp_path, settings=None):
    net = Net(HOSTS).up()
    etcd = pool = None
    try:
        etcd = EtcdProcess(tmp_path / "etcd", host=net.root_addr).start()
        pool = Pool(net, etcd, tmp_path, settings)
        pool.start()
        yield pool
    finally:
        if pool is not None:
            pool.stop()
        if etcd is not None:
            etcd.stop()
        net.close()


@pytest.fixture
def partition_pool(tmp_path):
    with pool_in_namespaces(tmp_path) as pool:
        yield pool


def client(pool: Pool, i: int, volume: str):
    import nbd

    h = nbd.NBD()
    h.set_export_name(volume)
    h.connect_socket(pool.net.connect(i, NBD_PORT).detach())
    return h


def block_seq(data: bytes) -> tuple[int, int]:
    return struct.unpack("<QQ", data[:16])


def test_partitioned_gateway_is_fenced_and_its_failed_writes_vanish(partition_pool):
    import nbd

    pool, net = partition_pool, partition_pool.net
    pool.vbp("volume", "create", "p3", "--size", "32M", "--replicas", "3", "--min-size", "2",
             "--chunk-size", "1M")

    # --- host1 is the gateway ------------------------------------------------------------------
    wa = Writer(SHARED[1], seed=21)
    ha = client(pool, 0, "p3")
    wa.write(ha, 150)
    for k in range(40):  # the A-only region: chunks host2's client never writes
        wa.seq += 1
        off = A_ONLY[0] + k * 200 * 1024 // BLOCK * BLOCK
        ha.pwrite(payload(wa.seq, off), off)
        wa.acked[off] = wa.seq
    ha.flush()

    # --- host1 is cut off: nothing it writes is acknowledged ----------------------------------
    net.cut(0)
    t_cut = time.monotonic()
    failed: dict[int, int] = {}  # offset -> seq of host1's failed writes
    attempts = 0
    while attempts < 3 or time.monotonic() - t_cut < SETTINGS["lease_ttl"] + 3:
        attempts += 1
        wa.seq += 1
        step = (attempts * 7 * 64 * 1024) % (8 * MiB)
        off = A_ONLY[0] + step if attempts % 2 else step
        with pytest.raises(nbd.Error) as e:
            ha.pwrite(payload(wa.seq, off), off)
        assert e.value.errno == "EIO"
        failed[off] = wa.seq
        time.sleep(0.2)
    wait_for("host1 stops writing once its lease ran out",
             lambda: "LeaseExpired" in pool.log(0) or "event=lease_expired" in pool.log(0), timeout=30)

    # --- host2 takes over ------------------------------------------------------------------------
    hb = client(pool, 1, "p3")
    wb = Writer(SHARED[1], seed=22)
    wb.seq = 10**6
    wb.write(hb, 1)  # takes the lease (after host1's expired)
    wait_for("host1 reported down", lambda: host_states(pool).get("host1") == "down", timeout=30)
    seen = hb.pread(SPAN, 0)  # what the new gateway sees when it takes over
    for off, seq in wa.acked.items():  # every write acknowledged to host1's client is there
        if off not in wb.acked:
            assert block_seq(seen[off:off + BLOCK]) == (seq, off), f"acknowledged write at {off} lost"
    for off, seq in failed.items():  # no failed write of host1 is
        assert block_seq(seen[off:off + BLOCK]) != (seq, off), f"host2 sees host1's failed write at {off}"
    wb.write(hb, 150)
    expected = bytearray(seen)
    for off, seq in wb.acked.items():
        expected[off:off + BLOCK] = payload(seq, off)
    wb.verify(hb)

    # --- the partition heals -----------------------------------------------------------------------
    net.heal(0)
    wait_for("host1 back up", lambda: host_states(pool).get("host1") == "up", timeout=60)
    wait_for("host1 learns it lost the lease", lambda: "event=fenced" in pool.log(0), timeout=60)
    wait_for("host1 records the copies its failed writes touched",
             lambda: "event=unacknowledged_copies_stale hosts=host1" in pool.log(0), timeout=60)
    from vbp.registry import open_registry

    reg = open_registry(pool.registry)
    wait_for("every stale copy resynced", lambda: not reg.list_stale(), timeout=120, every=0.5)
    lease = reg.get_lease("p3")
    assert lease is not None and lease.holder == "host2", f"lease of p3: {lease}"
    wb.verify(hb)
    now = hb.pread(SPAN, 0)
    diff = [o for o in range(0, SPAN, BLOCK) if now[o:o + BLOCK] != expected[o:o + BLOCK]]
    assert not diff, (f"{len(diff)} blocks read through host2 differ from what it expects; first at "
                      f"{diff[0]}: {block_seq(now[diff[0]:diff[0] + BLOCK])}")
    hb.shutdown()
    try:
        ha.shutdown()
    except nbd.Error:
        pass  # host1 dropped its clients when it learnt it was fenced

    # --- every replica, read from its own store -----------------------------------------------------
    from vbp.volume import VolumeRecord

    rec = VolumeRecord.from_dict(reg.get_volume("p3"))
    reg.close()
    pool.stop()
    compare_stores(pool, rec, bytes(expected), failed)


def compare_stores(pool: Pool, rec, expected: bytes, failed: dict[int, int]) -> None:
    from vbp.chunkstore import ChunkStore
    from vbp.layout import ChunkKey

    stores = {f"host{i + 1}": ChunkStore(pool.dir / f"host{i + 1}" / "data" / "chunks", 2 << 30)
              for i in range(HOSTS)}
    try:
        for index in range(SPAN // rec.chunk_size):
            want = expected[index * rec.chunk_size:(index + 1) * rec.chunk_size]
            for hid, st in stores.items():
                gen = st.resolve(rec.lineage, index, rec.chain)
                got = (st.read(ChunkKey(rec.lineage, index, gen), 0, rec.chunk_size)
                       if gen is not None else bytes(rec.chunk_size))
                if got != want:
                    bad = [o for o in range(0, rec.chunk_size, BLOCK) if got[o:o + BLOCK] != want[o:o + BLOCK]]
                    o = bad[0]
                    off = index * rec.chunk_size + o
                    raise AssertionError(
                        f"{hid} chunk {index}: {len(bad)} blocks differ from what host2's client "
                        f"expects; first at {off}: {block_seq(got[o:o + BLOCK])} instead of "
                        f"{block_seq(want[o:o + BLOCK])}"
                        + (" (a failed write of host1)" if off in failed else ""))
    finally:
        for st in stores.values():
            st.close()


def test_a_gateway_cut_from_its_peers_alone_acknowledges_no_write(partition_pool):
    """Fault test 4 with the registry in reach: host1, the gateway, loses its peers but
    not etcd, so its lease stays and it records the copies it cannot reach stale. Its own
    copy alone is below min_size=2: every write fails with EIO, none acknowledged (a cut
    of everything fails them for the registry's sake too, and would not tell), while
    reads of what was written go on from its copy, current. Healed, the copies resync and
    every acknowledged write reads back from every replica's store."""
    import nbd

    pool, net = partition_pool, partition_pool.net
    pool.vbp("volume", "create", "p3", "--size", "16M", "--replicas", "3", "--min-size", "2",
             "--chunk-size", "1M")
    w = Writer(8 * MiB, seed=31)
    ha = client(pool, 0, "p3")
    w.write(ha, 60)

    net.cut_peers(0)
    failed = 0
    for k in range(8):  # (offsets past the writer's region: never acknowledged there)
        off = 8 * MiB + k * 1024 * 1024 // 2
        with pytest.raises(nbd.Error) as e:
            ha.pwrite(payload(10**6 + k, off), off)
        assert e.value.errno == "EIO", e.value
        failed += 1
    assert "BelowMinSize" in pool.log(0) or "below min_size" in pool.log(0).lower()
    w.verify(ha)  # reads from host1's own copy, current
    from vbp.registry import open_registry

    reg = open_registry(pool.registry)
    assert host_states(pool) == {f"host{i + 1}": "up" for i in range(HOSTS)}
    assert {r.host_id for r in reg.list_stale()} == {"host2", "host3"}

    net.cut_peers(0, on=False)
    w.write(ha, 30)  # acknowledged again once the peers are back
    wait_for("every stale copy resynced", lambda: not reg.list_stale(), timeout=120, every=0.5)
    w.verify(ha)
    ha.shutdown()
    from vbp.volume import VolumeRecord

    rec = VolumeRecord.from_dict(reg.get_volume("p3"))
    reg.close()
    pool.stop()
    from vbp.chunkstore import ChunkStore
    from vbp.layout import ChunkKey

    for i in range(HOSTS):
        st = ChunkStore(pool.dir / f"host{i + 1}" / "data" / "chunks", 2 << 30)
        try:
            for off, seq in sorted(w.acked.items()):
                index = off // rec.chunk_size
                gen = st.resolve(rec.lineage, index, rec.chain)
                got = st.read(ChunkKey(rec.lineage, index, gen), off % rec.chunk_size, BLOCK)
                assert got == payload(seq, off), f"host{i + 1} at {off}: {block_seq(got)}, not ({seq}, {off})"
        finally:
            st.close()


def test_a_cut_off_gateway_past_its_lease_serves_no_reads(partition_pool):
    """host1 holds the lease of p3 and is cut off from everything (peers and registry)
    while its client stays connected (a hypervisor next to it whose storage network
    failed). Its lease runs out unrenewed and host2 takes it over, overwriting a block.
    host1 must not go on answering reads of that block from its own copy: the old bytes
    of an acknowledged overwrite. Before, a gateway with a token and no fence was exempt
    from the read bound (serve_until) however long ago its lease ran out; a reader on the
    same host, holding no lease, fails within RECORD_LAPSE."""
    import nbd

    pool, net = partition_pool, partition_pool.net
    pool.vbp("volume", "create", "p3", "--size", "8M", "--replicas", "3", "--min-size", "2",
             "--chunk-size", "1M")
    ha = client(pool, 0, "p3")
    ha.pwrite(payload(1, 0), 0)  # takes the lease on host1
    ha.flush()
    assert ha.pread(BLOCK, 0) == payload(1, 0)

    net.cut(0)
    wait_for("host1's lease ran out unrenewed",
             lambda: "event=lease_expired" in pool.log(0), timeout=30)
    hb = client(pool, 1, "p3")
    hb.pwrite(payload(2, 0), 0)  # takes the lease over once host1's expired
    hb.flush()
    assert hb.pread(BLOCK, 0) == payload(2, 0)
    try:
        got = ha.pread(BLOCK, 0)
    except nbd.Error as e:
        assert e.errno == "EIO"
    else:
        assert got != payload(1, 0), (
            "host1 answered the bytes host2's acknowledged write replaced, past its lease")
    hb.shutdown()
