"""A deterministic multi-host simulation of vbp in one process (CONVENTIONS.md 8, 9).

Theory of operation:
- Every host is the production objects, unchanged: a MemoryChunkStore (the non-durable
  disk model: `crash(rng)` keeps, page by page, old or new bytes of unflushed chunks), a
  Replica served on a MemoryNetwork, a MemoryPeerPool with its own FaultPolicy, a
  ClusterView, a Resync, and blockd.service.VolumeProvider (the code that opens gateways,
  takes leases, renews them and loads the stale map). Only Blockd's background loops are
  re-stated here (map watch, lease renewal, resync, stale refresh, GC), because Blockd.run
  hardwires ChunkStore, PeerPool, worker threads and the lmdb/etcd registry.
- One trio run with MockClock(autojump_threshold=0): time is virtual, so timeouts, lease
  periods and resync intervals cost nothing; the same seed gives the same schedule.
- The registry is the in-process `memory://` one, called inline (no worker thread). Its
  leases and liveness keys expire on the machine's boot clock (vbp.registry.local), which
  a simulation does not drive: leases are granted for a long time and expired in VIRTUAL
  time by `Sim.lease_clock` (their liveness key deleted and their record's `expires` set
  to 0, exactly what an expired lease looks like); a crashed host is declared down by
  deleting its alive key.
- One `random.Random(seed)` drives everything: workload choices, fault schedule, each
  host's FaultPolicy seed and the crash model of the disks.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import msgpack
import trio
import trio.testing

from blockd.service import Blockd, VolumeProvider
from control import api
from replicator import messages as m
from replicator.gateway import WRITE_GRACE, ClusterView
from replicator.recovery import Resync
from replicator.replica import Replica
from replicator.transport import FaultPolicy, MemoryNetwork
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import HostRecord
from vbp.errors import RegistryUnavailable, VbpError
from vbp.layout import MiB, ChunkKey
from vbp.registry import open_registry
from vbp.registry.base import P_ALIVE, P_LEASE, P_LEASE_LIVE
from vbp.registry.kv import Delete, Put
from vbp.volume import (
    VolumeRecord, cancel_pending, new_volume, request_shrink, request_snapshot, take_snapshot,
)

CLUSTER = "sim"
WALL_TTL = 1e7  # TTL of liveness keys and leases: never reached in a test


def deterministic_scheduling(seed: int) -> None:
    """Trio picks the order of runnable tasks with its own module-level Random (the hook
    hypothesis seeds through trio's plugin); seed it so one seed is one schedule."""
    trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING = True  # as under pytest + hypothesis
    trio._core._run._r.seed(seed)


class HostDown(Exception):
    """The host running an operation crashed while it ran (or was down)."""


# --- side effects ---------------------------------------------------------------------------


class SimRegistry:
    """blockd.service.AsyncRegistry without the worker thread: each call is a checkpoint,
    the synchronous in-memory call, and a checkpoint again (the real call runs in a thread
    while other tasks go on, and its answer comes back later), so scheduling stays
    deterministic. Leases are given a virtual expiry that `Sim.lease_clock` enforces."""

    def __init__(self, sim: "Sim", registry):
        self.sim = sim
        self.sync = registry

    def __getattr__(self, name):
        fn = getattr(self.sync, name)

        async def call(*args, **kwargs):
            await trio.lowlevel.checkpoint()
            out = fn(*args, **kwargs)
            await trio.lowlevel.checkpoint()
            return out

        return call

    async def acquire_lease(self, volume, holder, ttl):
        await trio.lowlevel.checkpoint()
        lease = self.sync.acquire_lease(volume, holder, WALL_TTL)
        self.sim.lease_deadline[volume] = (lease.token, trio.current_time() + ttl)
        await trio.lowlevel.checkpoint()
        return lease

    async def renew_lease(self, lease, ttl):
        await trio.lowlevel.checkpoint()
        new = self.sync.renew_lease(lease, WALL_TTL)
        self.sim.lease_deadline[lease.volume] = (lease.token, trio.current_time() + ttl)
        await trio.lowlevel.checkpoint()
        return new


class SimFaults(FaultPolicy):
    """FaultPolicy with per-destination partitions plus random drops and delays."""

    def __init__(self, seed: int):
        super().__init__(seed=seed)
        self.delay_probability = 0.0
        self.max_delay = 0.0

    def on_call(self, address, message):
        fault = super().on_call(address, message)
        if fault == 0 and self.delay_probability and self.random.random() < self.delay_probability:
            return self.random.uniform(0.001, self.max_delay)
        return fault


# --- hosts ----------------------------------------------------------------------------------


class _Dead:
    """A crashed host's nursery. Its shielded tasks (a closing gateway's drain and flush)
    outlive the cancel of its scope; what they start afterwards (the lease's release,
    Blockd.nursery.start_soon) never runs, as every task of the host died. (With None
    there, they raised AttributeError and ended the whole run: sweep seeds 494, 5424.)"""

    @staticmethod
    def start_soon(*args, **kwargs) -> None:
        pass


_DEAD = _Dead()


class _Cut(FaultPolicy):
    """A crashed host's peer pool: its calls fail, as nothing leaves a dead host."""

    def on_call(self, address, message):
        return "partition"


class _HostRegistry:
    """One incarnation of a host's registry client (SimRegistry's calls). After its host
    crashed, every call fails: the shielded tasks of a dead host (a gateway's write
    settling, a close's flush) go on in the simulation, but a dead host sends nothing,
    and marks they made after the crash changed the registry under the living hosts
    (sweep seed 782: a dead host recorded a copy stale and elected itself later)."""

    def __init__(self, inner: SimRegistry):
        self.inner = inner
        self.alive = True

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        async def call(*args, **kwargs):
            if not self.alive:
                await trio.lowlevel.checkpoint()
                raise RegistryUnavailable("the host crashed (simulation)")
            return await fn(*args, **kwargs)

        return call


class SimHost:
    """One blockd host. Exposes the attributes VolumeProvider reads from its service."""

    def __init__(self, sim: "Sim", host_id: str, zone: str, capacity: int):
        self.sim = sim
        self.id = host_id
        self.zone = zone
        self.capacity = capacity
        self.addr = f"{host_id}:7000"
        self.cfg = SimpleNamespace(host_id=host_id, lease_ttl=sim.lease_ttl, gc_interval=5.0,
                                   peer_timeout=sim.peer_timeout, heartbeat_ttl=6.0)
        # the sim's stats never expire (WALL_TTL): its exports never lapse, unless a
        # test moves this back (Blockd.published_at)
        self.published_at = math.inf
        self.metrics = None
        self.registry = sim.registry
        self.store = MemoryChunkStore(None, capacity)
        self._gc_memo = None  # (Blockd.collect_garbage_once's)
        self.faults = SimFaults(sim.rng.randrange(2**32))
        self.up = False
        self.nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self.recovered: list[ChunkKey] = []
        self.recovered_lost: frozenset[ChunkKey] = frozenset()
        self.incarnation = 0

    def boot(self) -> None:
        """The synchronous part of Blockd.run: open the store's objects, serve, register."""
        reg = self.sim.reg
        self.cluster = ClusterView(reg.cluster_map())
        self.replica = Replica(self.store, self.id, lambda: self.cluster.epoch)
        self.replica.learn_tokens(reg.lease_tokens())  # as Blockd.run
        self.pool = self.sim.net.pool(CLUSTER, self.id, request_timeout=self.sim.peer_timeout,
                                      faults=self.faults)
        self.registry = _HostRegistry(self.sim.registry)
        self.resync = Resync(self.id, self.store, self.cluster, self.pool, self.registry, self.replica)
        self.resync.write_window = self.sim.peer_timeout + WRITE_GRACE  # as Blockd.run sets it
        self.provider = VolumeProvider(self)
        self.replica.on_token = self.provider.token_seen  # as Blockd.run
        self.replica.on_lease_wanted = self.provider.lease_wanted
        rec = HostRecord(id=self.id, peer=self.addr, nbd=f"{self.id}:10809", zone=self.zone,
                         capacity=self.capacity, peer_rev=m.PEER_REV)
        self.cluster.set_map(reg.register_host(rec, WALL_TTL))
        self.recovered = sorted(self.store.recovered)  # a frozenset: its order varies per process
        self.recovered_lost = self.store.recovered_lost
        self.up = True
        self.incarnation += 1

    # what VolumeProvider calls on its service
    async def publish_stats(self) -> None:
        """Blockd.publish_stats: the open snapshot exports and head readers, which GC on
        every host keeps."""
        exports, seq = self.provider.to_publish(), self.provider.pub_seq
        await self.registry.publish_stats(self.id, {"exports": exports}, WALL_TTL)
        self.provider.went_through(seq)

    async def stale_map(self, lineage: str) -> dict[int, frozenset[str]]:
        out: dict[int, set[str]] = {}
        for r in await self.registry.list_stale(lineage):
            out.setdefault(r.index, set()).add(r.host_id)
        return {i: frozenset(h) for i, h in out.items()}

    async def refresh_map(self) -> None:
        cmap = await self.registry.cluster_map()
        if cmap.epoch > self.cluster.epoch:
            self.cluster.set_map(cmap)

    # --- life cycle ---------------------------------------------------------------------

    async def serve(self, loops: bool, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            # as Blockd.run: the chunks a crash left dirty are recorded stale, and the
            # host learns its stale copies, before it answers a peer (a resync elsewhere
            # must never take one of them for a current source)
            await self.resync.mark_recovered(self.recovered, self.recovered_lost)
            self.recovered, self.recovered_lost = [], frozenset()
            self.sim.net.serve(self.addr, self.replica.handle, cluster=CLUSTER, host_id=self.id)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                if loops:
                    nursery.start_soon(self._watch_map)
                    nursery.start_soon(self._renew_leases)
                    nursery.start_soon(self._recover)
                    nursery.start_soon(self._reconcile_late)
                    nursery.start_soon(self._refresh_stale)
                    nursery.start_soon(self._watch_volumes)
                task_status.started()
                await trio.sleep_forever()

    def crash(self, *, power: bool = True) -> None:
        """Power loss: the peer address vanishes, every task of the host dies, the disk
        keeps what its crash model keeps (`power=False`: a process crash, the page cache
        kept). Leases stay held until they expire."""
        self.sim.net.stop(self.addr)
        if self._scope is not None:
            self._scope.cancel()
        if isinstance(self.registry, _HostRegistry):
            self.registry.alive = False
        if getattr(self, "pool", None) is not None:
            self.pool.faults = _Cut()
        self.store = self.store.crash(self.sim.rng, power=power)
        self._gc_memo = None  # (of the store before: its layout count starts again)
        self.up = False
        self.nursery = _DEAD

    async def run_on(self, afn, *args):
        """Run an operation as one of this host's tasks: a crash cancels it (HostDown)."""
        if not self.up or self.nursery is None or self.nursery is _DEAD:
            raise HostDown(self.id)
        box: dict = {}
        done = trio.Event()

        async def task():
            try:
                box["v"] = await afn(*args)
            except trio.Cancelled:
                box["e"] = HostDown(self.id)
                raise
            except BaseException as e:  # handed to the caller
                box["e"] = e
            finally:
                done.set()

        self.nursery.start_soon(task)
        await done.wait()
        if "e" in box:
            raise box["e"]
        return box.get("v")

    # --- Blockd's loops, re-stated over virtual time ------------------------------------

    async def _watch_map(self) -> None:
        while True:
            await trio.sleep(0.5)
            await self.refresh_map()

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self.cfg.lease_ttl / 3)
            await self.provider.renew_all()

    async def _recover(self) -> None:
        while True:
            try:
                await self.resync.run_once()
            except VbpError:
                pass
            await trio.sleep(1)

    async def _reconcile_late(self) -> None:
        while True:
            await trio.sleep(1)
            try:
                await self.provider.reconcile_late()
            except VbpError:
                pass

    async def _refresh_stale(self) -> None:
        while True:
            await trio.sleep(1)
            for gw in list(self.provider.gateways.values()):
                await gw.refresh_stale(self.stale_map)

    async def _watch_volumes(self) -> None:
        while True:
            await trio.sleep(0.2)
            await self.provider.sync_records()

    async def collect_garbage(self) -> int:
        """Blockd.collect_garbage_once, unchanged, over this host's store and registry."""
        return await Blockd.collect_garbage_once(self)


# --- the cluster ----------------------------------------------------------------------------


_names = itertools.count()


class Sim:
    def __init__(self, seed: int, *, hosts: int = 4, zones: int = 4, capacity: int = 256 * MiB,
                 lease_ttl: float = 9.0, peer_timeout: float = 2.0):
        self.seed = seed
        self.rng = random.Random(seed)
        self.lease_ttl = lease_ttl
        self.peer_timeout = peer_timeout
        self.reg = open_registry(f"memory://sim-{seed}-{next(_names)}")
        self.registry = SimRegistry(self, self.reg)
        self.net = MemoryNetwork()
        self.lease_deadline: dict[str, tuple[int, float]] = {}
        self.hosts = {f"h{i}": SimHost(self, f"h{i}", f"z{i % zones}", capacity) for i in range(hosts)}
        self.nursery: trio.Nursery | None = None
        self.loops = True
        self._lineages = (f"{seed & 0xFFFFFFFF:08x}{i:08x}" for i in itertools.count())

    # --- start, crash, restart ----------------------------------------------------------

    async def start(self, nursery: trio.Nursery, loops: bool = True) -> None:
        self.nursery = nursery
        self.loops = loops
        for h in self.hosts.values():
            h.boot()
        for h in self.hosts.values():
            h.cluster.set_map(self.reg.cluster_map())
            await nursery.start(h.serve, loops)
        if loops:
            nursery.start_soon(self.lease_clock)

    def crash(self, host_id: str, *, declare_down: bool = True, power: bool = True) -> None:
        self.hosts[host_id].crash(power=power)
        if declare_down:  # the heartbeat deadline passed
            self.reg.kv.txn([], [Delete(P_ALIVE + host_id.encode())])
            self.reg.cluster_map()

    async def restart(self, host_id: str) -> None:
        h = self.hosts[host_id]
        h.boot()
        await self.nursery.start(h.serve, self.loops)

    async def lease_clock(self) -> None:
        """Leases expire in virtual time (see the module docstring)."""
        while True:
            await trio.sleep(0.25)
            now = trio.current_time()
            for vol, (token, deadline) in list(self.lease_deadline.items()):
                if deadline <= now:
                    self.expire_lease(vol, token)

    def expire_lease(self, volume: str, token: int | None = None) -> None:
        key = P_LEASE + volume.encode()
        item, _ = self.reg.kv.get(key)
        if item is None:
            return
        d = msgpack.unpackb(item.value, raw=False)
        if token is not None and d["token"] != token:
            return
        d["expires"] = 0.0
        self.reg.kv.txn([], [Put(key, msgpack.packb(d, use_bin_type=True)),
                             Delete(P_LEASE_LIVE + volume.encode())])
        self.lease_deadline.pop(volume, None)

    def up_hosts(self) -> list[SimHost]:
        return [h for h in self.hosts.values() if h.up]

    def sync_maps(self) -> None:
        cmap = self.reg.cluster_map()
        for h in self.up_hosts():
            h.cluster.set_map(cmap)

    # --- control plane (control/api.py) -------------------------------------------------

    def create_volume(self, name: str, size: int, *, replicas: int = 3, min_size: int | None = None,
                      chunk_size: int = MiB) -> VolumeRecord:
        """control.api.create_volume with a seeded lineage: the API draws it from uuid4,
        which would make placement (keyed by lineage) differ on every replay."""
        lineage = next(self._lineages)
        rec = new_volume(name, size, replicas=replicas, min_size=min_size, chunk_size=chunk_size,
                         lineage=lineage, now=0.0)
        self.reg.create_volume(name, rec.to_dict(), counters={api.gen_counter(lineage): rec.head})
        return rec

    async def snapshot(self, name: str, snap: str, timeout: float = 30.0) -> VolumeRecord:
        """control.api.snapshot in virtual time (the API polls with time.sleep and a
        wall-clock deadline): request, then wait for the lease holder to complete it, or
        complete it here, under a lease of its own, when no lease is live."""
        return await self._two_steps(name, lambda r, head: request_snapshot(r, snap, head),
                                     f"snapshot {name}@{snap}", timeout)

    async def shrink(self, name: str, size: int, timeout: float = 30.0) -> VolumeRecord:
        """control.api.resize of a shrink (--force) in virtual time, as snapshot()."""
        return await self._two_steps(name, lambda r, head: request_shrink(r, size, head),
                                     f"shrink of {name}", timeout)

    async def _two_steps(self, name: str, request, what: str, timeout: float) -> VolumeRecord:
        reg = self.reg
        rec = api.get_volume(reg, name)
        head = reg.next_id(api.gen_counter(rec.lineage))
        reg.update_volume(name, lambda d: request(VolumeRecord.from_dict(d), head).to_dict())
        deadline = trio.current_time() + timeout
        try:
            while True:
                cur = api.get_volume(reg, name)
                if head not in (cur.pending, cur.shrink_head):
                    if head in cur.chain:
                        return cur
                    raise VbpError(f"{what} was cancelled")
                if not api._lease_live(reg, name):
                    done = api.complete_unleased(reg, name, head)
                    if done is not None:
                        return done
                if trio.current_time() > deadline:
                    raise VbpError(f"{what}: not completed in {timeout:.0f}s")
                await trio.sleep(0.05)
        except BaseException:
            reg.update_volume(name, lambda d: cancel_pending(VolumeRecord.from_dict(d), head).to_dict())
            raise

    def snapshot_now(self, name: str, snap: str) -> int:
        """`name@snap` taken at once, in the record alone (no gateway completes it, as
        `vbp volume snapshot` would have one do): the new head generation."""
        rec = self.volume(name)
        g = self.reg.next_id(api.gen_counter(rec.lineage))
        self.reg.update_volume(
            name, lambda d: take_snapshot(VolumeRecord.from_dict(d), snap, g).to_dict())
        return g

    def write_copies(self, name: str, data: bytes, chain: tuple[int, ...]) -> None:
        """`data` at offset 0 of chunk 0 of volume `name`, in generation chain[-1] of its
        lineage, written straight into every host's copy (token 1), as a write every copy
        took would leave them."""
        rec = self.volume(name)
        for h in self.hosts.values():
            h.replica.write(name, rec.lineage, 0, chain[-1], chain, 0, data, rec.chunk_size,
                            0, False, h.cluster.epoch, 1)

    def clone(self, source: str, new_name: str) -> VolumeRecord:
        return api.clone(self.reg, source, new_name)

    def delete(self, name: str) -> None:
        # a volume forced: the hosts' gateways may still serve it (a live lease, a published
        # reader), which `vbp volume delete` refuses without --force; the model checks that
        api.delete_volume(self.reg, name, force="@" not in name)

    def volume(self, name: str) -> VolumeRecord:
        return api.get_volume(self.reg, name)

    # --- direct looks at the disks --------------------------------------------------------

    def replica_bytes(self, host: SimHost, rec: VolumeRecord, chain, index: int) -> bytes:
        """What `host`'s store holds for chunk `index` of a view (zeros for a hole)."""
        geo = rec.geometry
        n = geo.chunk_length(index)
        gen = host.store.resolve(rec.lineage, index, chain)
        if gen is None:
            return bytes(n)
        return host.store.read(ChunkKey(rec.lineage, index, gen), 0, n)


def run(afn):
    """trio.run of `afn` on a virtual clock (the sim's tests: see the module's docstring)."""
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


def reconcile_failing_once(monkeypatch) -> list:
    """Make the first takeover reconcile of any gateway fail (its marks find the registry
    unreachable), the next ones run; returns the list of the tokens each was called with."""
    from replicator.gateway import VolumeGateway

    reconcile = VolumeGateway.reconcile_after_takeover
    calls: list = []

    async def failing_once(self, token):
        calls.append(token)
        if len(calls) == 1:
            raise RegistryUnavailable("etcd request timed out")
        return await reconcile(self, token)

    monkeypatch.setattr(VolumeGateway, "reconcile_after_takeover", failing_once)
    return calls


async def settled(gw) -> None:
    """Once the takeover of an orphaned lease that `gw`'s open or record sync started in
    the background (VolumeProvider._settle_soon) has ended."""
    while gw.settling is not None:
        await gw.settling.wait()


async def call(gw_op):
    """A gateway method's result: None, a value, or an awaitable of either. An
    ExceptionGroup of vbp errors (the gateway's nurseries wrap them) becomes its first
    error, as the NBD server would map it to one errno."""
    if gw_op is not None and hasattr(gw_op, "__await__"):
        try:
            return await gw_op
        except BaseExceptionGroup as eg:
            leaf = _first_leaf(eg)
            if isinstance(leaf, VbpError):
                GROUPED.append(type(leaf).__name__)
                raise leaf from eg
            raise
    return gw_op


GROUPED: list[str] = []  # vbp errors that reached a gateway caller inside an ExceptionGroup


def _first_leaf(eg: BaseException) -> BaseException:
    while isinstance(eg, BaseExceptionGroup):
        eg = eg.exceptions[0]
    return eg


def extents_bytes(extents, offset: int, length: int) -> bytes:
    """What a client reads from an Export.read result: bytes-like, or extents."""
    if not isinstance(extents, list):
        return bytes(extents)
    out = bytearray(length)
    for off, n, data in extents:
        if data is not None:
            out[off - offset: off - offset + n] = data
    return bytes(out)


class WhileClearing:
    """A resync's registry that runs `hook` once while the resync clears a record: after
    its last comparison, before the record is gone."""

    def __init__(self, registry, hook):
        self.registry = registry
        self.hook = hook

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def clear_stale(self, *args):
        if self.hook is not None:
            hook, self.hook = self.hook, None
            await hook()
        return await self.registry.clear_stale(*args)
