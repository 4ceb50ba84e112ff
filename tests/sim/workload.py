"""A seeded workload with fault injection over tests/sim/harness.py, and the end checks.

Clients (one per volume, like one VM each) write, zero, read, flush, snapshot and clone
through gateways opened by VolumeProvider on a random host; a gateway that fails is left and
the client reconnects elsewhere (as a VM's NBD client would). A fault task crashes and
restarts hosts, partitions pairs of hosts, drops and delays peer messages, and moves a
volume's lease to another host while the old gateway keeps writing (a zombie).
Invariants: reads during the run return every acknowledged byte; at the end, after healing
and resync, every replica of every chunk holds exactly the acknowledged bytes, snapshots are
what they were when taken, clones what their snapshot was until overwritten, and replicas
agree byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import trio
import trio.testing

from replicator.gateway import ClusterView
from tests.sim.harness import HostDown, Sim, SimHost, call, deterministic_scheduling, extents_bytes
from tests.sim.model import Model, first_difference
from vbp.errors import VbpError
from vbp.layout import MiB
from vbp.registry.base import _unpack
from vbp.volume import VolumeRecord

ZOMBIE_BYTE = 0xEE  # only a gateway that lost its lease ever writes this byte


@dataclass
class Config:
    ops: int = 60
    volumes: tuple = (("v0", 3 * MiB + MiB // 2, 3, 2), ("v1", 2 * MiB, 2, 1))
    faults: frozenset = frozenset({"crash", "partition", "drop", "delay", "takeover"})
    snapshots: bool = True
    max_len: int = 384 * 1024


@dataclass
class Outcome:
    seed: int
    violations: list = field(default_factory=list)  # broken invariants (bugs)
    divergent_unknown: list = field(default_factory=list)  # replicas differ on unacked bytes
    log: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    def fail(self, what: str) -> None:
        self.violations.append(what)


class Client:
    """One VM's view of one volume: its model, its current gateway."""

    def __init__(self, run: "Run", name: str, model: Model):
        self.run = run
        self.name = name
        self.model = model
        self.host: SimHost | None = None
        self.gw = None
        self.snaps: dict[str, Model] = {}
        self._done = False

    async def gateway(self):
        if self.gw is not None and not self.gw.fenced and self.host.up:
            return self.gw
        self.drop()
        sim = self.run.sim
        for _ in range(40):
            ups = sim.up_hosts()
            if ups:
                host = sim.rng.choice(ups)
                try:
                    self.gw = await host.run_on(host.provider.open_export, self.name)
                    self.host = host
                    return self.gw
                except (VbpError, HostDown):
                    pass
            await trio.sleep(0.5)
        raise HostDown("no host opens the volume")

    def drop(self) -> None:
        if self.gw is not None and self.host.up and self.host.nursery is not None:
            self.gw.close()
        self.gw = None

    async def op(self, kind: str, *args):
        gw = await self.gateway()
        host = self.host

        async def go():
            return await call(getattr(gw, kind)(*args))

        return await host.run_on(go)

    async def step(self) -> None:
        run, rng, model = self.run, self.run.sim.rng, self.model
        size = model.size
        r = rng.random()
        offset = rng.randrange(size)
        if rng.random() < 0.5:
            offset &= ~4095
        length = max(1, min(size - offset, rng.choice([1, 512, 4096, 4096 * 3, 65536, run.cfg.max_len])
                            + rng.randrange(-1, 2) * rng.randrange(0, 700)))
        try:
            if r < 0.45:
                data = rng.randbytes(length).replace(bytes([ZOMBIE_BYTE]), b"\x01")
                await self._mutate("write", offset, length, (offset, data, rng.random() < 0.2),
                                   lambda: model.write(offset, data))
            elif r < 0.55:
                kind = rng.choice(["trim", "write_zeroes"])
                args = (offset, length, False) if kind == "trim" else (offset, length, False, True, False)
                await self._mutate(kind, offset, length, args, lambda: model.zero(offset, length))
            elif r < 0.85:
                extents = await self.op("read", offset, length)
                got = extents_bytes(extents, offset, length)
                bad = model.mismatch(offset, got)
                if bad is not None:
                    bad = run.unexplained(self.name, model, offset, got, bad)
                if bad is not None:
                    run.out.fail(f"t={trio.current_time():.2f} read {self.name} {offset}+{length} via "
                                 f"{self.host.id}: byte {bad} is {got[bad - offset]:#x}, acknowledged "
                                 f"{model.data[bad]:#x}")
            elif r < 0.95:
                await self.op("flush")
            elif run.cfg.snapshots:
                await self.snapshot_or_clone()
        except (VbpError, HostDown) as e:
            run.out.log.append(f"t={trio.current_time():.2f} {self.name}: {type(e).__name__}: {e}")
            self.drop()

    async def _mutate(self, kind, offset, length, args, ack) -> None:
        self.model.maybe(offset, length)  # in flight: may or may not land
        start = trio.current_time()
        await self.op(kind, *args)
        ack()
        # A write of the old gateway that still held the lease (Run.takeover) and ran at
        # the same time over the same bytes may have landed before or after this one: a
        # client reconnecting to the same host shares that gateway, and overlapping writes
        # in flight together have no order (NBD). Those bytes stay unknown.
        end = trio.current_time()
        for name, o, n, s, e in self.run.zombie_writes:
            if name == self.name and s <= end and e >= start:
                lo, hi = max(o, offset), min(o + n, offset + length)
                if lo < hi:
                    self.model.maybe(lo, hi - lo)

    async def snapshot_or_clone(self) -> None:
        """Snapshot between two requests of the client (its gateway stays open and switches
        heads), sometimes clone the snapshot into a new volume with its own client."""
        run = self.run
        snap = f"s{len(self.snaps)}"
        await run.sim.snapshot(self.name, snap)
        self.snaps[snap] = self.model.copy()
        run.out.log.append(f"t={trio.current_time():.2f} snapshot {self.name}@{snap}")
        if len(run.clients) < 4 and run.sim.rng.random() < 0.5:
            name = f"{self.name}c{snap}"
            run.sim.clone(f"{self.name}@{snap}", name)
            run.add_client(name, self.snaps[snap].copy())
            run.out.log.append(f"t={trio.current_time():.2f} clone {self.name}@{snap} -> {name}")


class Run:
    def __init__(self, seed: int, cfg: Config):
        self.sim = Sim(seed)
        self.cfg = cfg
        self.out = Outcome(seed)
        self.clients: dict[str, Client] = {}
        self.nursery: trio.Nursery | None = None
        self.stop = trio.Event()
        # (volume, offset, length, start, end) of the old gateway's writes that may have
        # landed (Run.takeover): a client write at the same time over them has no order
        self.zombie_writes: list[tuple[str, int, int, float, float]] = []
        # (volume, offset, length, gateway) of the old gateway's writes under way
        # (Run.takeover, Run.unexplained)
        self.zombies_flying: list[tuple[str, int, int, object]] = []

    def add_client(self, name: str, model: Model) -> Client:
        c = self.clients[name] = Client(self, name, model)
        self.nursery.start_soon(self.client_loop, c)
        return c

    async def client_loop(self, c: Client) -> None:
        rng = self.sim.rng
        for _ in range(self.cfg.ops):
            if self.stop.is_set():
                break
            await c.step()
            await trio.sleep(rng.uniform(0, 0.2))
        c.drop()
        c._done = True

    # --- faults -----------------------------------------------------------------------------

    def healthy(self) -> bool:
        """Every host up, every copy current, no write under way: a crash now loses no
        acknowledged byte's last copy. (A write under way may have a failure it has not
        recorded stale yet: a copy that missed it looks current, and the write may still
        be acknowledged by the copies that took it, whose unflushed bytes this crash
        could take with it. Such a loss is the next flush's error, not a read's surprise.)"""
        sim = self.sim
        return (all(h.up and not h.recovered for h in sim.hosts.values())
                and not sim.reg.list_stale()
                and not any(gw._inflight for h in sim.hosts.values()
                            for gw in h.provider.gateways.values()))

    async def faults(self) -> None:
        sim, rng, kinds = self.sim, self.sim.rng, sorted(self.cfg.faults)
        while not self.stop.is_set() and kinds:
            await trio.sleep(rng.uniform(0.3, 2.5))
            kind = rng.choice(kinds)
            hosts = list(sim.hosts.values())
            if kind == "crash" and self.healthy():
                h = rng.choice(hosts)
                self.out.log.append(f"t={trio.current_time():.2f} crash {h.id}")
                sim.crash(h.id, declare_down=rng.random() < 0.7)
                self.nursery.start_soon(self._restart_later, h, rng.uniform(0.5, 6))
            elif kind == "partition":
                a, b = rng.sample(hosts, 2)
                self.out.log.append(f"t={trio.current_time():.2f} partition {a.id}|{b.id}")
                a.faults.partition([b.addr])
                b.faults.partition([a.addr])
                self.nursery.start_soon(self._heal_later, a, b, rng.uniform(0.5, 5))
            elif kind == "drop":
                h = rng.choice(hosts)
                h.faults.drop_probability = 0.1
                self.nursery.start_soon(self._calm_later, h, rng.uniform(1, 5))
            elif kind == "delay":
                h = rng.choice(hosts)
                h.faults.delay_probability, h.faults.max_delay = 0.3, 0.5
                self.nursery.start_soon(self._calm_later, h, rng.uniform(1, 5))
            elif kind == "takeover":
                c = rng.choice(list(self.clients.values()))
                if c.gw is not None:
                    self.nursery.start_soon(self.takeover, c)

    async def _restart_later(self, h: SimHost, delay: float) -> None:
        await trio.sleep(delay)
        self.out.log.append(f"t={trio.current_time():.2f} restart {h.id}")
        await self.sim.restart(h.id)

    async def _heal_later(self, a: SimHost, b: SimHost, delay: float) -> None:
        await trio.sleep(delay)
        a.faults.heal([b.addr])
        b.faults.heal([a.addr])

    async def _calm_later(self, h: SimHost, delay: float) -> None:
        await trio.sleep(delay)
        h.faults.drop_probability = 0.0
        h.faults.delay_probability = 0.0

    async def takeover(self, c: Client) -> None:
        """The client's host is cut off (a paused VM, a partition from the registry): its
        lease expires and the client reconnects elsewhere, while the old gateway keeps
        writing a byte nobody else writes. None of those writes may be acknowledged after the
        new gateway took the lease, nor land where the new gateway wrote."""
        sim, rng = self.sim, self.sim.rng
        old, old_host = c.gw, c.host
        c.gw = None  # abandoned, not closed: its lease is not handed back
        # Its lease expires now (time compressed: the registry lets a lease go only a TTL
        # after its last renewal), so the holder's own deadline, which runs out before the
        # registry's expiry (VolumeProvider._deadline), has passed too: it writes again
        # only if a renewal succeeds, as a host that was paused or cut off does.
        sim.expire_lease(c.name)
        old.lease_deadline = min(old.lease_deadline, trio.current_time())
        self.out.log.append(f"t={trio.current_time():.2f} takeover {c.name} from {old_host.id}")
        model = c.model
        for _ in range(rng.randrange(1, 6)):
            await trio.sleep(rng.uniform(0, 0.6))
            if self.stop.is_set() or not old_host.up:
                break
            offset = rng.randrange(model.size - 8192)
            length = rng.randrange(1, 8192)
            start = trio.current_time()
            flying = (c.name, offset, length, old)
            self.zombies_flying.append(flying)
            try:
                await old_host.run_on(lambda: call(old.write(offset, bytes([ZOMBIE_BYTE]) * length, False)))
            except (VbpError, HostDown):
                if self._holds_lease(c.name, old):
                    # Nobody took the lease over (the old gateway renewed it, or took it on
                    # this write as nobody held it): this gateway is the volume's writer,
                    # and a write of its that fails may have landed on the copies that took
                    # it (below min_size they keep it), as a client write that fails may.
                    # Checked after the failure: had a new gateway taken the lease, the
                    # check stays strict (none of its acknowledged bytes is masked).
                    self.out.log.append(f"t={trio.current_time():.2f} zombie write failed, lease "
                                        f"still held {c.name} {offset}+{length}")
                    model.maybe(offset, length)
                    self.zombie_writes.append((c.name, offset, length, start, trio.current_time()))
                continue
            finally:
                self.zombies_flying.remove(flying)
            lease = sim.reg.kv.get(b"vbp/lease/" + c.name.encode())[0]
            self.out.log.append(f"t={trio.current_time():.2f} zombie write acked {c.name} {offset}+{length}")
            if old.token and lease is not None and sim.reg._lease_of(c.name, _unpack(lease.value)).token != old.token:
                self.out.fail(f"t={trio.current_time():.2f} {c.name}: a gateway whose lease was taken "
                              f"over (token {old.token}) had a write acknowledged")
            model.maybe(offset, length)
            self.zombie_writes.append((c.name, offset, length, start, trio.current_time()))

    def unexplained(self, volume: str, model: Model, offset: int, got: bytes,
                    bad: int) -> int | None:
        """`bad` (model.mismatch of a read of `volume` at `offset` that got `got`), unless
        the bytes that differ are ZOMBIE_BYTE under a write of the old gateway still under
        way whose gateway holds the lease now (nobody took it over: the client's writer
        again, on the same host), which a read may see or not, as any write in flight
        (NBD). The next known byte that differs, or None. A gateway whose lease was taken
        over is never excused: its bytes must never be read."""
        ranges = [(o, n) for name, o, n, gw in self.zombies_flying
                  if name == volume and self._holds_lease(name, gw)]
        if not ranges:
            return bad
        excused = model.copy()
        for o, n in ranges:
            for i in range(max(o, offset), min(o + n, offset + len(got))):
                if got[i - offset] == ZOMBIE_BYTE:
                    excused.unknown[i] = 0xFF
        return excused.mismatch(offset, got)

    def _holds_lease(self, name: str, gw) -> bool:
        """Whether `gw` holds the volume's lease: its token is the newest one granted."""
        item = self.sim.reg.kv.get(b"vbp/lease/" + name.encode())[0]
        return bool(gw.token) and item is not None and self.sim.reg._lease_of(name, _unpack(item.value)).token == gw.token

    # --- the end ----------------------------------------------------------------------------

    async def heal_and_converge(self) -> None:
        sim = self.sim
        for h in sim.hosts.values():
            h.faults.heal()
            h.faults.drop_probability = h.faults.delay_probability = 0.0
        for h in sim.hosts.values():
            if not h.up:
                await sim.restart(h.id)
        for _ in range(60):
            await trio.sleep(1)
            if all(not h.recovered for h in sim.hosts.values()) and not sim.reg.list_stale():
                break
        else:
            self.out.fail(f"stale records never cleared: {sim.reg.list_stale()}")
        await trio.sleep(2)  # stale maps refresh
        self.out.stats["virtual_seconds"] = round(trio.current_time(), 1)

    def views(self):
        """(label, record, chain, model) of every volume head and snapshot."""
        for name, c in self.clients.items():
            rec = self.sim.volume(name)
            yield name, rec, rec.chain, c.model
            for s in rec.snapshots:
                yield f"{name}@{s.name}", rec, s.chain, c.snaps[s.name]

    def check_replicas(self) -> None:
        sim = self.sim
        cluster = ClusterView(sim.reg.cluster_map())
        for label, rec, chain, model in self.views():
            geo = rec.geometry
            for index in range(geo.chunk_count):
                start = index * geo.chunk_size
                copies = {}
                for hid in cluster.replicas(rec.lineage, index, rec.replicas):
                    got = sim.replica_bytes(sim.hosts[hid], rec, chain, index)
                    copies[hid] = got
                    bad = model.mismatch(start, got)
                    if bad is not None:
                        self.out.fail(f"{label} chunk {index} on {hid}: byte {bad} is "
                                      f"{got[bad - start]:#x}, acknowledged {model.data[bad]:#x}")
                hosts = list(copies)
                for hid in hosts[1:]:
                    d = first_difference(copies[hosts[0]], copies[hid])
                    if d is not None:
                        self.out.divergent_unknown.append(
                            f"{label} chunk {index}: {hosts[0]} and {hid} differ at byte {start + d} "
                            f"({copies[hosts[0]][d]:#x} vs {copies[hid][d]:#x})")

    async def check_gateways(self) -> None:
        sim = self.sim
        for label, rec, chain, model in self.views():
            for h in sim.up_hosts():
                gw = await h.provider.open_export(label)
                try:
                    step = 1 * MiB
                    for off in range(0, rec.size, step):
                        n = min(step, rec.size - off)
                        got = extents_bytes(await call(gw.read(off, n)), off, n)
                        bad = model.mismatch(off, got)
                        if bad is not None:
                            self.out.fail(f"gateway read {label} on {h.id}: byte {bad} is "
                                          f"{got[bad - off]:#x}, acknowledged {model.data[bad]:#x}")
                            break
                finally:
                    gw.close()

    async def main(self) -> Outcome:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await self.sim.start(nursery)
            for name, size, n, min_size in self.cfg.volumes:
                self.sim.create_volume(name, size, replicas=n, min_size=min_size)
                self.add_client(name, Model(size))
            async with trio.open_nursery() as faults:
                faults.start_soon(self.faults)
                while not self._clients_done():
                    await trio.sleep(1)
                self.stop.set()
                faults.cancel_scope.cancel()
            await self.heal_and_converge()
            self.check_replicas()
            await self.check_gateways()
            self.out.stats["unknown_bytes"] = sum(c.model.unknown_bytes() for c in self.clients.values())
            self.out.stats["volumes"] = len(self.clients)
            nursery.cancel_scope.cancel()
        return self.out

    def _clients_done(self) -> bool:
        return all(c._done for c in self.clients.values())


def run_seed(seed: int, cfg: Config | None = None) -> Outcome:
    run = Run(seed, cfg or Config())
    deterministic_scheduling(seed)
    return trio.run(run.main, clock=trio.testing.MockClock(autojump_threshold=0))


def seeds(default: list[int]) -> list[int]:
    """SIM_SEED=<n> replays one seed instead of the default list."""
    env = os.environ.get("SIM_SEED")
    return [int(env)] if env else default
