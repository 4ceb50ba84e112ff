"""Hypothesis stateful test of the volume / snapshot / clone / delete model (issue 5) on the
simulated cluster: control.api + vbp.volume + VolumeProvider gateways + replicas + GC,
against a bytearray per volume and per snapshot. No faults here: it checks the model, the
copy-up and the garbage collector (vbp.volume.needed_gens) rather than the replication."""

from __future__ import annotations

import logging

import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.sim.harness import Sim, call, deterministic_scheduling, extents_bytes
from tests.sim.model import Model
from vbp.errors import AlreadyExists, NotFound
from vbp.layout import MiB

SIZE = 2 * MiB + 12288
NAMES = ["a", "b", "c", "d"]


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        logging.getLogger("vbp").setLevel(logging.ERROR)
        self.sim = Sim(0, hosts=3, zones=3)
        for h in self.sim.hosts.values():
            h.boot()
        self.sim.sync_maps()
        self.vols: dict[str, Model] = {}
        self.snaps: dict[str, Model] = {}  # "vol@snap" -> model
        self.gws: dict[str, tuple] = {}  # vol -> (host, gateway)

    def teardown(self):
        logging.getLogger("vbp").setLevel(logging.NOTSET)  # later tests log at their own level

    # --- driving the simulation: one short trio run per step ---------------------------

    def drive(self, afn, *args):
        sim = self.sim

        async def main():
            async with trio.open_nursery() as nursery:
                sim.nursery = nursery
                for h in sim.up_hosts():
                    await nursery.start(h.serve, False)
                result = await afn(*args)
                nursery.cancel_scope.cancel()
            return result

        deterministic_scheduling(0)
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    async def gateway(self, vol: str, host_index: int):
        if vol not in self.gws:
            hosts = list(self.sim.hosts.values())
            h = hosts[host_index % len(hosts)]
            self.gws[vol] = (h, await h.provider.open_export(vol))
        return self.gws[vol][1]

    def close(self, vol: str) -> None:
        if vol in self.gws:
            h, gw = self.gws.pop(vol)

            async def go():
                gw.close()
            self.drive(go)

    # --- rules ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.vols) < len(NAMES))
    @rule(name=st.sampled_from(NAMES), replicas=st.integers(1, 3))
    def create(self, name, replicas):
        if name in self.vols:
            return
        self.sim.create_volume(name, SIZE, replicas=replicas, min_size=1)
        self.vols[name] = Model(SIZE)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), length=st.integers(1, 300_000), byte=st.integers(1, 255),
          host=st.integers(0, 2))
    def write(self, data, length, byte, host):
        vol = data.draw(st.sampled_from(sorted(self.vols)))
        offset = data.draw(st.integers(0, SIZE - 1))
        length = min(length, SIZE - offset)
        payload = bytes([byte]) * length

        async def go():
            gw = await self.gateway(vol, host)
            await call(gw.write(offset, payload, False))
        self.drive(go)
        self.vols[vol].write(offset, payload)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), length=st.integers(1, 600_000), host=st.integers(0, 2))
    def zero(self, data, length, host):
        vol = data.draw(st.sampled_from(sorted(self.vols)))
        offset = data.draw(st.integers(0, SIZE - 1))
        length = min(length, SIZE - offset)

        async def go():
            gw = await self.gateway(vol, host)
            await call(gw.trim(offset, length, False))
        self.drive(go)
        self.vols[vol].zero(offset, length)

    @precondition(lambda self: self.vols)
    @rule(data=st.data(), snap=st.sampled_from(["s1", "s2", "s3"]))
    def snapshot(self, data, snap):
        vol = data.draw(st.sampled_from(sorted(self.vols)))
        if f"{vol}@{snap}" in self.snaps:
            return

        async def go():
            async def holder_sync():  # Blockd._watch_volumes on the gateway's host
                while True:
                    await trio.sleep(0.2)
                    for h in self.sim.up_hosts():
                        await h.provider.sync_records()

            async with trio.open_nursery() as n:
                n.start_soon(holder_sync)
                await self.sim.snapshot(vol, snap)
                n.cancel_scope.cancel()
        self.drive(go)
        self.snaps[f"{vol}@{snap}"] = self.vols[vol].copy()

    @precondition(lambda self: self.snaps and len(self.vols) < len(NAMES))
    @rule(data=st.data(), name=st.sampled_from(NAMES))
    def clone(self, data, name):
        src = data.draw(st.sampled_from(sorted(self.snaps)))
        if name in self.vols:
            return
        self.sim.clone(src, name)
        self.vols[name] = self.snaps[src].copy()

    @precondition(lambda self: self.vols)
    @rule(data=st.data())
    def delete_volume(self, data):
        vol = data.draw(st.sampled_from(sorted(self.vols)))
        self.close(vol)
        self.sim.delete(vol)
        del self.vols[vol]
        for s in [s for s in self.snaps if s.startswith(vol + "@")]:
            del self.snaps[s]
        self.gc()

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def delete_snapshot(self, data):
        snap = data.draw(st.sampled_from(sorted(self.snaps)))
        try:
            self.sim.delete(snap)
        except NotFound:
            raise AssertionError(f"{snap} vanished")
        del self.snaps[snap]
        self.gc()

    def gc(self):
        async def go():
            for h in self.sim.hosts.values():
                await h.collect_garbage()
        self.drive(go)

    @precondition(lambda self: self.vols or self.snaps)
    @rule(data=st.data(), host=st.integers(0, 2))
    def read_through_gateway(self, data, host):
        label = data.draw(st.sampled_from(sorted(self.vols) + sorted(self.snaps)))
        model = self.vols.get(label) or self.snaps[label]
        h = list(self.sim.hosts.values())[host]

        async def go():
            gw = await h.provider.open_export(label)
            try:
                return extents_bytes(await call(gw.read(0, SIZE)), 0, SIZE)
            finally:
                gw.close()
                await trio.sleep(1)  # the host unpublishes a closed snapshot export meanwhile
        got = self.drive(go)
        bad = model.mismatch(0, got)
        assert bad is None, f"{label} via {h.id}: byte {bad} is {got[bad]:#x}, expected {model.data[bad]:#x}"

    # --- invariants: every replica's store, read directly --------------------------------

    @invariant()
    def replicas_hold_the_model(self):
        sim = self.sim
        for label, model in list(self.vols.items()) + list(self.snaps.items()):
            vol, _, snap = label.partition("@")
            rec = sim.volume(vol)
            chain = rec.snapshot(snap).chain if snap else rec.chain
            cluster = next(iter(sim.hosts.values())).cluster
            for index in range(rec.geometry.chunk_count):
                start = index * rec.chunk_size
                for hid in cluster.replicas(rec.lineage, index, rec.replicas):
                    got = sim.replica_bytes(sim.hosts[hid], rec, chain, index)
                    bad = model.mismatch(start, got)
                    assert bad is None, (f"{label} chunk {index} on {hid}: byte {bad} is "
                                         f"{got[bad - start]:#x}, expected {model.data[bad]:#x}")


TestVolumeModel = VolumeMachine.TestCase
TestVolumeModel.settings = settings(max_examples=12, stateful_step_count=20, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
