"""Leases in blockd.service.VolumeProvider, over the in-memory hosts of the simulation
harness: renewal racing the end of a connection (renew_all), and a snapshot completed only
by the holder of the lease.

A renewal is a registry call that takes time (a worker thread, a network round trip to
etcd). Meanwhile the volume's last connection may close, which hands the lease back, and a
new connection may open a new gateway. The answer to the old renewal must then be dropped:
stored back, it would make the next renewal find the lease released and fence the new
gateway, which drops its clients (a reader saw its connection reset this way)."""

from __future__ import annotations

import logging

import trio
import trio.testing

from control import api
from tests.sim.harness import Sim, call, extents_bytes
from vbp.errors import LeaseExpired
from vbp.layout import MiB
from vbp.volume import VolumeRecord, request_snapshot


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


class SlowRenewal:
    """The registry renews at once; its answer comes back only when `answer` is set. With
    `late`, the request itself reaches the registry only then."""

    def __init__(self, sim: Sim, late: bool = False):
        self.sim = sim
        self.late = late
        self.real = sim.registry.renew_lease
        self.asked = trio.Event()
        self.answer = trio.Event()

    async def __call__(self, lease, ttl):
        if self.late:
            self.asked.set()
            await self.answer.wait()
            return await self.real(lease, ttl)
        new = await self.real(lease, ttl)
        self.asked.set()
        await self.answer.wait()
        return new

    def __enter__(self):
        self.sim.registry.renew_lease = self
        return self

    def __exit__(self, *exc):
        del self.sim.registry.renew_lease  # the class's own method again


async def released(sim: Sim, name: str) -> None:
    while api._lease_live(sim.reg, name):
        await trio.sleep(0.01)


async def new_lease_while_renewing(nursery, sim, p, writer, slow):
    """A renewal of the writer's lease under way (its answer held back by `slow`), the
    writer's connection closes, the lease goes back, a new gateway takes a new one:
    (that gateway, its lease)."""
    nursery.start_soon(p.renew_all)
    await slow.asked.wait()
    writer.close()
    await released(sim, "v")
    second = await p.open_export("v")
    await call(second.write(4096, b"\x02" * 4096, False))  # a new lease
    return second, p.leases["v"]


async def setup(nursery):
    sim = Sim(1, hosts=3, zones=3)
    await sim.start(nursery, loops=False)
    sim.create_volume("v", MiB, replicas=3, min_size=2)
    p = sim.hosts["h0"].provider
    writer = await p.open_export("v")
    await call(writer.write(0, b"\x01" * 4096, False))  # takes the lease
    return sim, p, writer


def test_a_renewal_answered_after_the_lease_went_back_leaves_the_next_gateway_alone():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, p, writer = await setup(nursery)
            with SlowRenewal(sim) as slow:
                nursery.start_soon(p.renew_all)
                await slow.asked.wait()
                writer.close()  # the last connection: the lease goes back
                await released(sim, "v")
                reader = await p.open_export("v")  # a new connection, reading only
                slow.answer.set()
                await trio.sleep(0.1)
            assert "v" not in p.leases  # the late answer was not stored back
            await p.renew_all()
            assert not reader.fenced and not reader.dropped.is_set()
            got = extents_bytes(await call(reader.read(0, 4096)), 0, 4096)
            assert got == b"\x01" * 4096
            await call(reader.write(4096, b"\x02" * 4096, False))  # a lease of its own
            assert p.leases["v"].holder == "h0" and not reader.fenced
            reader.close()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_renewal_answered_after_a_new_lease_was_taken_keeps_the_new_one():
    async def main():
        async with trio.open_nursery() as nursery:
            sim, p, writer = await setup(nursery)
            old = p.leases["v"]
            with SlowRenewal(sim) as slow:
                second, new = await new_lease_while_renewing(nursery, sim, p, writer, slow)
                assert new.token > old.token
                slow.answer.set()
                await trio.sleep(0.1)
            assert p.leases["v"] is new  # not overwritten by the old lease's renewal
            for _ in range(3):
                await p.renew_all()
            assert not second.fenced and p.leases["v"].token == new.token
            await call(second.write(8192, b"\x03" * 4096, False))
            second.close()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_gateway_whose_lease_was_taken_over_does_not_complete_a_snapshot():
    """Sim seed 335 (with takeovers): a gateway cut off from the registry lost its lease
    to a takeover and, before a renewal told it so, completed a pending snapshot. The new
    holder, which had not read the record yet, went on writing to the old head, which had
    just become the snapshot: an acknowledged write landed in it after it was taken. A
    snapshot is completed only under a lease the registry still holds (update_volume with
    the lease, compared in the same transaction)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery, loops=False)
            rec = sim.create_volume("v", MiB, replicas=3, min_size=2)
            old_p, new_p = sim.hosts["h0"].provider, sim.hosts["h1"].provider
            old = await old_p.open_export("v")
            await call(old.write(0, b"\x01" * 4096, False))  # its lease
            sim.expire_lease("v")  # cut off, and it has not noticed yet
            new = await new_p.open_export("v")
            await call(new.write(4096, b"\x02" * 4096, False))  # takes the lease over
            head = sim.reg.next_id(api.gen_counter(rec.lineage))
            sim.reg.update_volume("v", lambda d: request_snapshot(
                VolumeRecord.from_dict(d), "s0", head).to_dict())
            await old_p.sync_records()
            assert old.fenced  # refused: the lease is no longer its own
            assert not sim.volume("v").snapshots  # still pending: for the holder
            await call(new.write(0, b"\x03" * 4096, False))  # before the snapshot
            await new_p.sync_records()  # the holder drains its writes and completes it
            cur = sim.volume("v")
            snap = cur.snapshots[0]
            await call(new.write(0, b"\x04" * 4096, False))  # after it
            for h in sim.hosts.values():
                assert sim.replica_bytes(h, cur, snap.chain, 0)[:8192] == b"\x03" * 4096 + b"\x02" * 4096
                assert sim.replica_bytes(h, cur, cur.chain, 0)[:4096] == b"\x04" * 4096
            new.close()
            nursery.cancel_scope.cancel()

    run(main)


def test_a_renewal_refused_after_the_lease_went_back_leaves_the_new_lease_alone():
    """The renewal reaches the registry only after the lease was released and a new one
    taken: it is refused (Fenced). That refusal is about the old lease: the new one stays
    held and its gateway unfenced."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, p, writer = await setup(nursery)
            with SlowRenewal(sim, late=True) as slow:
                second, new = await new_lease_while_renewing(nursery, sim, p, writer, slow)
                slow.answer.set()
                await trio.sleep(0.1)
            assert p.leases.get("v") is new and not second.fenced
            await p.renew_all()
            assert p.leases["v"].token == new.token and not second.fenced
            second.close()
            nursery.cancel_scope.cancel()

    run(main)


class RegistryDown:
    """The registry's lease calls fail as an unreachable registry's do, while entered."""

    CALLS = ("renew_lease", "release_lease")

    def __init__(self, sim: Sim):
        self.sim = sim

    def __enter__(self):
        from vbp.errors import RegistryUnavailable

        async def fail(*args, **kwargs):
            await trio.lowlevel.checkpoint()
            raise RegistryUnavailable("registry unreachable (test)")

        for name in self.CALLS:
            setattr(self.sim.registry, name, fail)
        return self

    def __exit__(self, *exc):
        for name in self.CALLS:
            delattr(self.sim.registry, name)  # the class's own method again


def test_a_lease_that_runs_out_again_after_its_export_closed_and_opened_is_logged_again(caplog):
    """A gateway's lease runs out during a registry outage (event=lease_expired: writes
    are refused), and its client disconnects before the registry is back. The export was
    kept in the set of expired leases for good: one more name per export so closed, and
    when the volume, opened again, lost its lease in the next outage, nothing said that
    its writes were refused."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, p, writer = await setup(nursery)
            for _ in range(2):
                with RegistryDown(sim):
                    await trio.sleep(sim.lease_ttl + 1)
                    await p.renew_all()
                    assert writer.lease_deadline < trio.current_time()
                    writer.close()  # (the lease cannot be handed back: it runs out)
                    await trio.sleep(sim.lease_ttl + 1)
                assert p.expired == set()
                writer = await p.open_export("v")
                await call(writer.write(0, b"\x02" * 4096, False))  # a lease again
            writer.close()
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.INFO, logger="vbp.blockd")
    run(main)
    expired = [r for r in caplog.records if "event=lease_expired" in r.getMessage()]
    assert len(expired) == 2, [r.getMessage() for r in expired]


def test_renewals_of_many_leases_do_not_add_up_past_a_lease():
    """A host holds the leases of many volumes (the VMs it runs) and every renewal takes a
    while (etcd under disk pressure answers a txn in hundreds of milliseconds; a member
    that stopped answering holds a request for the client's timeout before the next is
    tried). renew_all renewed them one after the other, each round lease_ttl/3 after the
    last one ended: with 30 leases at 0.3 s a renewal, each lease was renewed every 12 s,
    past its 9 s lease, and the writes of every volume failed (LeaseExpired: EIO) for
    seconds of every round though each renewal succeeded. They are renewed side by side
    now: a round takes about one renewal."""
    volumes, delay = 30, 0.3

    async def main():
        async with trio.open_nursery() as nursery:
            sim = Sim(1, hosts=3, zones=3)
            await sim.start(nursery)
            h0 = sim.hosts["h0"]
            gws = []
            for i in range(volumes):
                sim.create_volume(f"v{i}", MiB, replicas=3, min_size=2)
                gw = await h0.run_on(h0.provider.open_export, f"v{i}")
                await h0.run_on(lambda gw=gw: call(gw.write(0, b"\x01" * 4096, False)))
                gws.append(gw)
            real = sim.registry.renew_lease

            async def slow_renewal(lease, ttl):
                await trio.sleep(delay)
                return await real(lease, ttl)

            sim.registry.renew_lease = slow_renewal
            refused = set()
            end = trio.current_time() + 4 * sim.lease_ttl
            while trio.current_time() < end:
                for i, gw in enumerate(gws):
                    try:
                        await h0.run_on(lambda gw=gw: call(gw.write(4096, b"\x02" * 4096, False)))
                    except LeaseExpired:
                        refused.add(f"v{i}")
                await trio.sleep(0.25)
            assert not refused, f"writes refused for want of a renewal: {sorted(refused)}"
            assert not any(gw.fenced for gw in gws)
            nursery.cancel_scope.cancel()

    run(main)
