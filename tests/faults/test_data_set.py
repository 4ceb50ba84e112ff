"""Recovery, drain and rebalance (replicator.migration) with real blockd processes.

Each test writes self-describing blocks through one gateway while the data set changes
(a host drained, lost for good, or added), keeps writing during the change, and ends by
checking, store by store, that every chunk has exactly its N placed copies, each holding
every acknowledged write, and that nothing is left on hosts the chunk is not placed on."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tests.conftest import ROOT, SandboxHandle, run_vbp
from tests.faults.test_replication_faults import BLOCK, SETTINGS, Writer, connect, kill, payload
from vbp.layout import ChunkKey

MiB = 1024 * 1024
GRACE = ["--set", "gc_interval=1"]
# leases of 2.5 s (SETTINGS: 4): a copy a settled change left misplaced is freed a grace of
# max(2 * lease_ttl, 5 s) after the change (blockd), 5 s instead of 8, and every test here
# waits for that once or more. The gateway (host1) is never killed here: no lease expiry
# is waited for.
LEASE = ["--set", "lease_ttl=2.5"]
# a host that is down leaves the data set at once (down_out_interval: 600 s by default)
OUT_AT_ONCE = ["--set", "down_out_interval=0"]


def start(sb: SandboxHandle, n: int, *settings: str) -> None:
    """Start the missing hosts; `settings` (--set KEY=VALUE) are kept for later starts."""
    p = run_vbp("sandbox", "up", "--hosts", n, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", "2G", "--json", *SETTINGS, *GRACE, *LEASE, *settings, check=False)
    if p.returncode != 0:
        sb.down()
        raise AssertionError(f"sandbox up failed:\n{p.stderr}")
    sb.info = json.loads(p.stdout)


def cluster_map(sb: SandboxHandle):
    from vbp.registry import open_registry

    with open_registry(sb.registry) as reg:
        return reg.cluster_map()


def write_until(h, w: Writer, done, timeout: float, what: str) -> None:
    """Keep writing (and so keep the gateway busy) until done() or the deadline."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout}s")
        w.write(h, 10)
        time.sleep(0.1)


def steady(cond, seconds: float = 2.5):
    """cond, once it has held at every look for `seconds`: the hosts' stats (their chunk
    counts) ride on their heartbeats, a second apart here, so one look can add a count
    published before a change completed to one published after it, and see the sum
    right while a moved copy still waits for its grace (seen: a stray copy on a host
    that had just left the chunk, found in its store once the pool stopped)."""
    since: list[float] = []

    def done() -> bool:
        if not cond():
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= seconds
    return done


def pool_status(sb: SandboxHandle) -> dict:
    return json.loads(sb.vbp("pool", "status", "--json").stdout)


def published_after(sb: SandboxHandle, host: str, t: float, timeout: float = 30) -> None:
    """Until `host` has published stats computed after `t` (time.time()): its counters as
    they were then, or later (they ride on its heartbeat, a second apart here)."""
    from vbp.registry import open_registry

    deadline = time.monotonic() + timeout
    with open_registry(sb.registry) as reg:
        while (reg.host_stats().get(host) or {}).get("time", 0) <= t:
            assert time.monotonic() < deadline, f"{host} published no stats for {timeout}s"
            time.sleep(0.1)


def copies_held(status: dict) -> int:
    """Chunk copies on every host (one volume, no snapshot: one generation per chunk)."""
    return sum(x["chunks"] or 0 for x in status["hosts"])


def chunks_written(w: Writer) -> int:
    return len({o // MiB for o in w.acked})


def host_empty(sb: SandboxHandle, host: str):
    return lambda: {x["id"]: x["chunks"] for x in pool_status(sb)["hosts"]}[host] == 0


def settled_without(sb: SandboxHandle, host: str):
    def done() -> bool:
        m = cluster_map(sb)
        return m.prev is None and m.data is not None and host not in m.data
    return done


def settled_with(sb: SandboxHandle, host: str):
    def done() -> bool:
        m = cluster_map(sb)
        return m.prev is None and m.data is not None and host in m.data
    return done


def copies_by_host(sb: SandboxHandle, hosts: list[str], volume: str):
    """Stop the pool and read every chunk of the volume from each host's own store."""
    from replicator.gateway import ClusterView
    from vbp.chunkstore import ChunkStore
    from vbp.registry import open_registry
    from vbp.volume import VolumeRecord

    with open_registry(sb.registry) as reg:
        rec = VolumeRecord.from_dict(reg.get_volume(volume))
        view = ClusterView(reg.cluster_map())
    sb.down()
    out: dict[int, dict[str, bytes]] = {}
    for hid in hosts:
        st = ChunkStore(sb.dir / hid / "data" / "chunks", 2 << 30)
        try:
            for k in st.keys(rec.lineage):
                gen = st.resolve(rec.lineage, k.index, rec.chain)
                if gen is not None:
                    out.setdefault(k.index, {})[hid] = st.read(ChunkKey(rec.lineage, k.index, gen), 0, rec.chunk_size)
        finally:
            st.close()
    return rec, view, out


def check_placed_copies(sb: SandboxHandle, hosts: list[str], volume: str, w: Writer) -> dict:
    """Every written chunk is on exactly its placed hosts, every copy holds every
    acknowledged write; returns chunk index -> hosts."""
    rec, view, copies = copies_by_host(sb, hosts, volume)
    written = {off // rec.chunk_size for off in w.acked}
    placed = {}
    for index in sorted(written):
        want = set(view.replicas(rec.lineage, index, rec.replicas))
        have = copies.get(index, {})
        assert set(have) == want, f"chunk {index}: copies on {sorted(have)}, placed on {sorted(want)}"
        for hid, data in have.items():
            for off in (o for o in w.acked if o // rec.chunk_size == index):
                inner = off % rec.chunk_size
                assert data[inner:inner + BLOCK] == payload(w.acked[off], off), (
                    f"{hid} chunk {index} offset {off}: acknowledged write missing")
        placed[index] = sorted(want)
    return placed


def new_volume(sb: SandboxHandle) -> None:
    sb.vbp("volume", "create", "r3", "--size", "64M", "--replicas", "3", "--min-size", "2",
           "--chunk-size", "1M")


def test_drain_moves_every_chunk_off_then_remove(tmp_path):
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 4)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=11)
        h = connect(sb.uri("r3", 0))
        w.write(h, 400)
        assert sb.vbp("host", "remove", "host4", check=False).returncode != 0  # still holds chunks
        drain = subprocess.Popen([sys.executable, "-m", "control.cli", "--registry", sb.registry,
                                  "host", "drain", "host4", "--wait", "--timeout", "150", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            write_until(h, w, lambda: drain.poll() is not None, 170, "drain")
        finally:
            if drain.poll() is None:
                drain.kill()
        out, err = drain.communicate()
        assert drain.returncode == 0, err
        assert "host4" not in json.loads(out)["data_set"]["hosts"]
        w.write(h, 100)
        w.verify(h)
        hosts = json.loads(sb.vbp("host", "list", "--json").stdout)["hosts"]
        assert {x["id"]: x["data"] for x in hosts}["host4"] == "out"

        write_until(h, w, host_empty(sb, "host4"), 90, "host4 empty")
        h.shutdown()
        # refused while host4's blockd runs: it would register again, undrained
        p = sb.vbp("host", "remove", "host4", check=False)
        assert p.returncode == 6 and "stop its blockd first" in p.stderr, (p.returncode, p.stderr)
        kill(sb, 3)
        deadline = time.monotonic() + 60  # (its liveness lapses within heartbeat_ttl)
        while sb.vbp("host", "remove", "host4", check=False).returncode != 0:
            assert time.monotonic() < deadline, "host4 still counted up a minute after its kill"
            time.sleep(0.5)
        assert "host4" not in {x["id"] for x in json.loads(sb.vbp("host", "list", "--json").stdout)["hosts"]}
        placed = check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
        assert placed and all("host4" not in hs for hs in placed.values())
    finally:
        sb.down()


def test_lost_host_is_replaced_by_recovery(tmp_path):
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 4, *OUT_AT_ONCE)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=12)
        h = connect(sb.uri("r3", 0))
        w.write(h, 400)
        before = cluster_map(sb)
        assert "host3" in before.data_set
        kill(sb, 2)  # host3, for good
        w.write(h, 100)  # never an error: 2 of 3 complete copies >= min_size
        write_until(h, w, settled_without(sb, "host3"), 150, "recovery without host3")

        def healthy() -> bool:  # host3's missed writes no longer count once nothing is placed there
            st = pool_status(sb)
            return st["data_set"]["leaving"] is None and st["degraded_chunks"] == 0
        write_until(h, w, healthy, 60, "no degraded chunk")
        w.write(h, 100)
        w.verify(h)
        h.shutdown()
        sb.vbp("host", "remove", "host3")  # allowed: nothing is placed on it any more
        placed = check_placed_copies(sb, ["host1", "host2", "host4"], "r3", w)
        assert all(len(hs) == 3 and "host3" not in hs for hs in placed.values())
    finally:
        sb.down()


def test_new_host_gets_only_its_chunks(tmp_path):
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 3)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=13)
        h = connect(sb.uri("r3", 0))
        w.write(h, 400)
        start(sb, 4)  # host4 joins
        write_until(h, w, settled_with(sb, "host4"), 150, "rebalance onto host4")

        def no_misplaced() -> bool:  # copies that moved are freed on the hosts they left
            st = pool_status(sb)
            return copies_held(st) == 3 * chunks_written(w)
        write_until(h, w, steady(no_misplaced), 90, "misplaced copies freed")
        w.verify(h)
        st = pool_status(sb)
        copied = {x["id"]: x["resync_bytes"] for x in st["hosts"]}["host4"]
        h.shutdown()
        placed = check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
        on4 = [i for i, hs in placed.items() if "host4" in hs]
        assert on4, "placement put nothing on the new host"
        # incremental: the new host received its chunks (at most one full copy each), not the pool
        assert 0 < copied <= len(on4) * MiB, (copied, len(on4))
    finally:
        sb.down()


def test_lost_host_returns_after_recovery(tmp_path):
    """Recovery moved host3's chunks away; when host3 comes back it joins the data set
    again and takes its chunks back by resync from the current copies (its old copies
    make that incremental), and the copies made meanwhile are freed."""
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 4, *OUT_AT_ONCE)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=14)
        h = connect(sb.uri("r3", 0))
        w.write(h, 400)
        kill(sb, 2)
        write_until(h, w, settled_without(sb, "host3"), 150, "recovery without host3")
        w.write(h, 50)
        start(sb, 4)  # host3 returns with its old disk
        write_until(h, w, settled_with(sb, "host3"), 150, "host3 back in the data set")

        def no_misplaced() -> bool:
            st = pool_status(sb)
            return (st["degraded_chunks"] == 0 and
                    copies_held(st) == 3 * chunks_written(w))
        write_until(h, w, steady(no_misplaced), 90, "misplaced copies freed")
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
    finally:
        sb.down()


def test_thrash(tmp_path):
    """In the style of Ceph's thrashosds: a writer keeps writing through host1 while a
    seeded loop kills and restarts hosts, adds one and drains one; then the pool heals and
    every chunk must be on exactly its placed hosts with every acknowledged write, and no
    copy left anywhere else."""
    import os
    import random

    seed = int(os.environ.get("THRASH_SEED", random.randrange(1000)))
    print(f"thrash seed {seed} (replay: THRASH_SEED={seed})")
    rng = random.Random(seed)
    sb = SandboxHandle(tmp_path / "sb", 5)
    # a host killed is out 3 s after it is declared down: some kills are restarted before
    # (they resync what they missed), others after (their chunks move)
    start(sb, 4, "--set", "down_out_interval=3")
    hosts = 4
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=seed)
        h = connect(sb.uri("r3", 0))
        w.write(h, 200)
        down: str | None = None
        drained: str | None = None
        for step in range(5):  # (a new seed each run: the runs add up)
            others = [f"host{i}" for i in range(2, hosts + 1) if f"host{i}" not in (down, drained)]
            moves = ["kill"] if down is None and len(others) > 2 else []
            moves += ["restart"] if down else []
            moves += ["add"] if hosts < 5 else []
            moves += ["drain"] if drained is None and down is None and len(others) > 3 else []
            moves += ["undrain"] if drained else []
            move = rng.choice(moves)
            if move == "kill":
                target = down = rng.choice(others)
                kill(sb, int(down[4:]) - 1)
            elif move == "restart":
                target, down = down, None
                start(sb, hosts)
            elif move == "add":
                hosts += 1
                target = f"host{hosts}"
                start(sb, hosts)
            elif move == "drain":
                target = drained = rng.choice(others)
                sb.vbp("host", "drain", drained)
            else:
                target, drained = drained, None
                sb.vbp("host", "undrain", target)
            print(f"step {step}: {move} {target}")
            w.write(h, 60)  # writes never fail: at most one host is down
            time.sleep(rng.uniform(0, 4))
            w.write(h, 20)
        if down:
            start(sb, hosts)
        if drained:
            sb.vbp("host", "undrain", drained)
        write_until(h, w, lambda: sb.vbp("pool", "status", "--wait", "--timeout", "1", check=False).returncode == 0,
                    240, "healthy pool")

        def no_strays() -> bool:
            st = pool_status(sb)
            return (st["data_set"]["leaving"] is None and st["degraded_chunks"] == 0 and
                    copies_held(st) == 3 * chunks_written(w))
        write_until(h, w, steady(no_strays), 120, "no stray copies")
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, [f"host{i}" for i in range(1, hosts + 1)], "r3", w)
    finally:
        sb.down()


def test_maintenance_restart_moves_nothing(tmp_path):
    """A host restarted on purpose under `vbp host maintenance ID on` is never declared
    down, so no recovery starts (no copies are made elsewhere), writes meanwhile are
    recorded stale for it, and its resync afterwards brings it current."""
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 4)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=15)
        h = connect(sb.uri("r3", 0))
        w.write(h, 300)
        before = cluster_map(sb)
        sb.vbp("host", "maintenance", "host3", "on")
        kill(sb, 2)
        # Until host3's liveness has run out (heartbeat_ttl after its last heartbeat: any
        # other host is down from then on) and 3 s more (three passes of the controller),
        # host3 is up and the data set unchanged. (A fixed 12 s before: four times
        # heartbeat_ttl.) The liveness is read before the map: a map read after a lapse
        # was seen is one that would say down.
        from vbp.registry import open_registry

        lapsed, deadline = None, time.monotonic() + 30
        with open_registry(sb.registry) as reg:
            while lapsed is None or time.monotonic() < lapsed + 3:
                assert time.monotonic() < deadline, "host3's liveness never ran out"
                w.write(h, 10)
                gone = not reg.host_alive("host3")
                m = cluster_map(sb)
                assert m.host("host3").state == "up" and m.data == before.data and m.prev is None, m
                if gone and lapsed is None:
                    lapsed = time.monotonic()
        assert pool_status(sb)["degraded_chunks"] > 0
        start(sb, 4)
        sb.vbp("host", "maintenance", "host3", "off")
        sb.vbp("pool", "status", "--wait", "--timeout", "120")
        assert cluster_map(sb).mgen == before.mgen  # the data set never changed
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
    finally:
        sb.down()


def test_host_restarted_within_the_down_out_interval_moves_nothing(tmp_path):
    """4 hosts, replicas 3, the default down_out_interval (600 s): host3 killed and started
    again a while after it was declared down stays in the data set throughout (no change
    of data set: the generation never moves), `vbp pool status` says how long it has
    before its chunks move, and once back it resyncs only the writes it missed."""
    sb = SandboxHandle(tmp_path / "sb", 4)
    start(sb, 4)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=18)
        h = connect(sb.uri("r3", 0))
        w.write(h, 300)
        before = cluster_map(sb)
        assert before.prev is None and "host3" in before.data
        kill(sb, 2)
        first_missed = w.seq + 1
        write_until(h, w, lambda: cluster_map(sb).host("host3").state == "down", 30, "host3 down")

        # long enough for a change to start, were the interval not kept: the controller
        # looks every second, and takes a host out at its first look past the interval
        # (8 s before)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            w.write(h, 10)
            m = cluster_map(sb)
            assert m.mgen == before.mgen and m.prev is None and m.data == before.data, m

        def timer_shown() -> bool:  # the controller publishes its count with its stats
            [x] = pool_status(sb)["data_set"]["down_in"]
            return x["host"] == "host3" and x["out_in"] is not None
        write_until(h, w, timer_shown, 30, "host3's time left shown")
        [x] = pool_status(sb)["data_set"]["down_in"]
        assert x["interval"] == 600 and 550 < x["out_in"] < 595 and not x["kept"], x
        assert "host3 is down, still in the data set" in sb.vbp("pool", "status").stdout
        missed = w.seq - first_missed + 1
        start(sb, 4)
        deadline = time.monotonic() + 120
        while pool_status(sb)["degraded_chunks"]:  # (no write meanwhile: what it copies is what it missed)
            assert time.monotonic() < deadline, "host3 not resynced after 120s"
            time.sleep(0.5)
        # the final counters: a resync counts its bytes before it clears the stale record
        # (a fixed 2.5 s before)
        published_after(sb, "host3", time.time())
        st = pool_status(sb)
        assert st["data_set"]["generation"] == before.mgen and st["data_set"]["down_in"] == []
        copied = {x["id"]: x["resync_bytes"] for x in st["hosts"]}["host3"]
        assert 0 < copied <= missed * BLOCK, (copied, missed)  # the pages it missed, not whole chunks
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
    finally:
        sb.down()


def test_short_outage_resync_copies_only_what_changed(tmp_path):
    """A replica that misses a few writes while it is down copies back those pages only:
    the bytes its resync transfers are proportional to the writes, not to the volume."""
    sb = SandboxHandle(tmp_path / "sb", 3)
    start(sb, 3)
    try:
        new_volume(sb)
        h = connect(sb.uri("r3", 0))
        w = Writer(64 * MiB, seed=16)
        for off in range(0, 64 * MiB, MiB):  # every chunk fully written
            h.pwrite(bytes([off // MiB % 251 + 1]) * MiB, off)
        h.flush()
        kill(sb, 2)
        w.write(h, 40)  # 40 blocks of 4 KiB while host3 is down
        missed = len(w.acked) * BLOCK
        start(sb, 3)
        write_until(h, w, lambda: pool_status(sb)["degraded_chunks"] == 0,
                    120, "host3 resynced")
        # the final counters: a resync counts its bytes before it clears the stale record
        # (a fixed 2.5 s before)
        published_after(sb, "host3", time.time())
        st = pool_status(sb)
        copied = {x["id"]: x["resync_bytes"] for x in st["hosts"]}["host3"]
        assert 0 < copied <= 2 * missed, (copied, missed)  # not 64 MiB
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, ["host1", "host2", "host3"], "r3", w)
    finally:
        sb.down()


def test_full_hosts_hold_recovery_and_status_says_so(tmp_path):
    """Hosts above full_ratio take no copy of a chunk they hold nothing of: a drain waits,
    `vbp pool status` names the hosts and the chunks waiting, and once the hosts run with
    room again (here: a higher full_ratio after a restart) the drain completes."""
    sb = SandboxHandle(tmp_path / "sb", 4)
    p = run_vbp("sandbox", "up", "--hosts", 4, "--dir", sb.dir, "--base-port", sb.base_port,
                "--capacity", "2G", "--json", *SETTINGS, *GRACE, *LEASE, "--set", "full_ratio=0.005",
                check=False)
    assert p.returncode == 0, p.stderr
    sb.info = json.loads(p.stdout)
    try:
        new_volume(sb)
        w = Writer(48 * MiB, seed=17)
        h = connect(sb.uri("r3", 0))
        for off in range(0, 48 * MiB, MiB):  # about 36 MiB per host: above 0.5% of 2 GiB
            h.pwrite(bytes([off // MiB + 1]) * 4096, off)
            w.acked[off] = -1
        h.flush()
        w.acked.clear()
        w.write(h, 100)
        sb.vbp("host", "drain", "host4")

        def held() -> bool:
            st = pool_status(sb)
            return st["data_set"]["leaving"] is not None and any(x["recovery_held_full"] for x in st["hosts"])
        write_until(h, w, held, 60, "recovery held for space")
        assert "wait for space" in sb.vbp("pool", "status").stdout
        h.shutdown()
        sb.down()
        p = run_vbp("sandbox", "up", "--hosts", 4, "--dir", sb.dir, "--base-port", sb.base_port,
                    "--capacity", "2G", "--json", "--set", "full_ratio=0.95", check=False)
        assert p.returncode == 0, p.stderr
        sb.info = json.loads(p.stdout)
        sb.vbp("host", "drain", "host4", "--wait", "--timeout", "120")
        h = connect(sb.uri("r3", 0))

        write_until(h, w, host_empty(sb, "host4"), 90, "host4 empty")
        w.verify(h)
        h.shutdown()
        check_placed_copies(sb, ["host1", "host2", "host3", "host4"], "r3", w)
    finally:
        sb.down()


def test_nearly_full_host_is_reweighted_and_writes_avoid_it(tmp_path):
    """host4 has a quarter of the others' capacity but, with 3 replicas on 4 hosts, holds
    about a third of the chunks: it fills 1.5 times faster than the pool. The writer writes
    as many chunks as put 69 copies on its 64 slots by placement before any reweighting
    (about 200; counted from the volume's lineage, which is random: a fixed count put as
    few as 51 there, below the threshold; a lineage needing more than 210 is passed over,
    see below). Once it is above its
    nearfull threshold (0.85, the default) the controller lowers its weight: some of its
    chunks move off, fewer new ones land there, the pool ends healthy with host4 below
    nearfull, and every acknowledged write is on every replica. (On a loaded machine the
    controller's steps can lag the writer and host4 can fill between two: its refused
    writes are recorded stale and resynced, counted and printed, not asserted away.)"""
    sb = SandboxHandle(tmp_path / "sb", 4)
    for n, cap in ((3, "256M"), (4, "64M")):
        p = run_vbp("sandbox", "up", "--hosts", n, "--dir", sb.dir, "--base-port", sb.base_port,
                    "--capacity", cap, "--json", *SETTINGS, *GRACE, *LEASE, check=False)
        if p.returncode != 0:
            sb.down()
            raise AssertionError(f"sandbox up failed:\n{p.stderr}")
        sb.info = json.loads(p.stdout)
    from replicator.gateway import ClusterView
    from vbp.cluster import ClusterMap
    from vbp.registry import open_registry

    cap4 = 64 * MiB
    try:
        # host4 just joined: the pool in steady state (no volume yet, so nothing moves)
        # once the data set holds the four hosts, no change is under way and every host
        # published its stats for it (a fixed 13 s sleep before)
        with open_registry(sb.registry) as reg:
            deadline = time.monotonic() + 60
            while True:
                m, st = reg.cluster_map(), reg.host_stats()
                if (m.prev is None and m.data is not None and len(m.data) == 4
                        and all(st.get(f"host{i}", {}).get("used") is not None for i in (1, 2, 3, 4))):
                    break
                assert time.monotonic() < deadline, (m, st)
                time.sleep(0.5)
        # A lineage that puts 69 copies on host4 within 210 chunks (200 on average): more,
        # and the pool itself ends nearly full on average (243 chunks: 0.88 of all the
        # hosts' capacity), where host4, no fuller than the others, is rightly not lowered
        # (weights move chunks from host to host; they cannot make room) and stays above
        # its threshold, which this test is not about. Each try is a new volume (a new
        # random lineage); the volumes not taken stay empty.
        for vol in ("r3", "r3b", "r3c", "r3d", "r3e", "r3f", "r3g", "r3h"):
            sb.vbp("volume", "create", vol, "--size", "320M", "--replicas", "3", "--min-size",
                   "2", "--chunk-size", "1M")
            with open_registry(sb.registry) as reg:
                view, lineage = ClusterView(reg.cluster_map()), reg.get_volume(vol)["lineage"]
            chunks, on4 = 0, 0
            while on4 < 69 and chunks <= 320:  # 320 in the volume
                on4 += "host4" in view.replicas(lineage, chunks, 3)
                chunks += 1
            if chunks <= 210:
                break
        assert chunks <= 210, chunks
        w = Writer(MiB, seed=21)
        h = connect(sb.uri(vol, 0))
        stale_on_4: set = set()  # chunks with a write refused by host4
        factors: list[float] = []
        with open_registry(sb.registry) as reg:
            def look():
                stale_on_4.update((r.lineage, r.index) for r in reg.list_stale() if r.host_id == "host4")
                m = reg.cluster_map()
                f = m.factors.get("host4", 1.0)
                if not factors or factors[-1] != f:
                    factors.append(f)
                return m, reg.host_stats().get("host4", {}).get("used", 0)

            for i in range(chunks):  # one new chunk at a time, and overwrites of older ones
                off = i * MiB + (i % (MiB // BLOCK)) * BLOCK
                w.seq += 1
                h.pwrite(payload(w.seq, off), off)
                w.acked[off] = w.seq
                w.region = (i + 1) * MiB
                w.write(h, 2)
                _, used = look()
                if used > 0.6 * cap4:  # nearer the threshold: the pace of a steady writer
                    time.sleep(0.25)  # (past nearfull it waits for the controller, below)
                # Past nearfull, the controller reacts within a second or two of host4
                # publishing it, one step at a time (the next once the change completed and
                # every host published for the new data set); on a loaded machine (CI runs
                # the suite on two cores) that can take longer than this writer needs to
                # fill the host, which the test is not about: past nearfull, new chunks
                # wait for the next step down or for the moves to bring the host below the
                # threshold.
                steps, deadline = len(factors), time.monotonic() + 30
                while used > 0.85 * cap4 and len(factors) == steps and time.monotonic() < deadline:
                    time.sleep(0.5)
                    _, used = look()
            # on a loaded machine the stats and the controller lag behind the writer
            deadline = time.monotonic() + 60
            while min(factors) >= 1.0 and time.monotonic() < deadline:
                look()
                time.sleep(0.5)
            assert min(factors) < 1.0, f"host4 never reweighted: {factors}, used {look()[1]}"
            h.flush()
            # The weights seen while writing. Once the writer stops and the moves bring host4
            # well below the threshold, the controller may raise it again (the hysteresis'
            # climb back, by design), which a loaded run reaches before the pool has settled.
            writing = list(factors)

            def settled() -> bool:
                m, _ = look()
                st = pool_status(sb)
                x = {x["id"]: x for x in st["hosts"]}["host4"]
                return (m.prev is None and st["degraded_chunks"] == 0
                        and copies_held(st) == 3 * chunks and x["used"] <= 0.85 * x["capacity"])
            deadline = time.monotonic() + 150
            while not settled():
                assert time.monotonic() < deadline, f"not settled: factors {factors}, {pool_status(sb)}"
                time.sleep(0.5)
            final = reg.cluster_map()
            lineage = reg.get_volume(vol)["lineage"]
        # Not asserted: no write to host4 ever fails. Under load (the CI run of the whole suite)
        # the controller's steps can lag a fast writer and host4 fills between two of them
        # (ENOSPC there: recorded stale, resynced, never lost; issue 8's note). Reported:
        print(f"{chunks} chunks written; with writes to host4 that failed (recorded stale): "
              f"{len(stale_on_4)}")
        assert writing == sorted(writing, reverse=True), f"weight flapped: {factors}"
        status = sb.vbp("pool", "status").stdout
        assert f"host4 placement weight {factors[-1]:.2f}" in status, status
        assert "REWEIGHT" in sb.vbp("host", "list").stdout
        # the weight steered chunks: fewer on host4 than its capacity alone would place there
        unweighted = ClusterView(ClusterMap(final.epoch, final.hosts, final.data))
        weighted = ClusterView(final)
        on4 = sum("host4" in weighted.replicas(lineage, i, 3) for i in range(chunks))
        on4_unweighted = sum("host4" in unweighted.replicas(lineage, i, 3) for i in range(chunks))
        assert on4 < on4_unweighted and on4 <= 0.85 * 64, (on4, on4_unweighted)
        w.verify(h)
        h.shutdown()
        placed = check_placed_copies(sb, ["host1", "host2", "host3", "host4"], vol, w)
        assert sum("host4" in hs for hs in placed.values()) == on4
        # host4 may have refused writes for want of a slot (counted above); the big hosts never
        for i in range(3):
            log = sb.log(i)
            assert "no free slot" not in log and "disk is full" not in log, f"host{i + 1} ran out of space"
    finally:
        sb.down()
