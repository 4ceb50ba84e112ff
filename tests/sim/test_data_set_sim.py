"""Changes of data set (replicator.migration) on the sim hosts (tests/sim/harness.py), with a
DataSetMover per host driven step by step, as blockd's _move_data runs them: the
controller step, the scan, then (once settled) freeing misplaced copies."""

from __future__ import annotations

import logging

import msgpack
import pytest
import trio

from replicator.gateway import ClusterView
from replicator.mover import DataSetMover
from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.cluster import ClusterMap
from vbp.layout import ChunkKey, MiB
from vbp.registry.base import K_DATASET
from vbp.registry.kv import Put

CHUNKS = 64


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("vbp").setLevel(logging.ERROR)
    yield
    logging.getLogger("vbp").setLevel(logging.NOTSET)


def movers(sim: Sim) -> dict[str, DataSetMover]:
    return {hid: DataSetMover(hid, h.store, h.cluster, sim.registry, h.pool, grace=0.0,
                              down_out_interval=0.0)
            for hid, h in sim.hosts.items()}


async def step_all(sim: Sim, mv: dict[str, DataSetMover]) -> ClusterMap:
    """One _move_data step on every up host (controller step, then scan)."""
    for hid, h in sim.hosts.items():
        if not h.up:
            continue
        m = mv[hid]
        m.store, m.cluster = h.store, h.cluster  # (a restart makes new objects)
        got = await m.control_once()
        if got.epoch > h.cluster.epoch:
            h.cluster.set_map(got)
        await m.scan_once()
    sim.sync_maps()
    return sim.reg.cluster_map()


async def settle(sim: Sim, mv: dict[str, DataSetMover], steps: int = 30) -> ClusterMap:
    """Steps (resync running between them) until no change of data set is under way."""
    for _ in range(steps):
        cmap = await step_all(sim, mv)
        if cmap.prev is None:
            return cmap
        await trio.sleep(1.0)
    raise AssertionError(f"the change of data set did not complete: {cmap}")


def fill(i: int) -> bytes:
    return bytes([65 + i % 26]) * 4096


async def write_all(sim: Sim, name: str):
    h0 = sim.hosts["h0"]
    gw = await h0.run_on(h0.provider.open_export, name)
    for i in range(CHUNKS):
        await h0.run_on(lambda i=i: call(gw.write(i * MiB, fill(i), False)))
    await h0.run_on(lambda: call(gw.flush()))


async def wrong_reads(sim: Sim, host: str, name: str) -> list[int]:
    """Chunks whose first page the host's gateway does not read back as written."""
    h = sim.hosts[host]
    gw = await h.run_on(h.provider.open_export, name)
    bad = []
    for i in range(CHUNKS):
        got = extents_bytes(await h.run_on(lambda i=i: call(gw.read(i * MiB, 4096))), i * MiB, 4096)
        if got != fill(i):
            bad.append(i)
    return bad


def test_a_host_registered_with_a_new_capacity_moves_chunks_only_through_a_change():
    """h3 restarts with four times its capacity. Its chunks must not move with its record
    (they would name a host that holds nothing and has no stale record: it reads zeros,
    and the collector frees the old holders' copies): placement keeps the capacity the
    data set recorded; the controller then changes the data set to the new one, whose
    scan and resync bring h3 its new chunks before the old copies are freed."""
    async def main():
        sim = Sim(5, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            before = reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2", "h3"], None)
            sim.sync_maps()
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=2, min_size=1)
            await write_all(sim, "v")
            sim.crash("h3", declare_down=False)
            sim.hosts["h3"].capacity *= 4  # restarted with --capacity 4x
            await sim.restart("h3")
            sim.sync_maps()
            after = reg.cluster_map()
            assert after.host("h3").capacity == 4 * before.host("h3").capacity
            assert after.mgen == before.mgen and after.drifted() == ("h3",)
            old, now = ClusterView(before), ClusterView(after)
            assert all(now.replicas(rec.lineage, i, 2) == old.replicas(rec.lineage, i, 2)
                       for i in range(CHUNKS))
            assert await wrong_reads(sim, "h3", "v") == []
            mv = movers(sim)
            changing = await step_all(sim, mv)
            assert changing.prev == changing.data == before.data
            assert changing.placed(leaving=True)["h3"][0] == before.host("h3").capacity
            assert changing.placed()["h3"][0] == after.host("h3").capacity
            done = await settle(sim, mv)
            assert not done.drifted()
            new = ClusterView(done)
            gained = [i for i in range(CHUNKS) if "h3" in new.replicas(rec.lineage, i, 2)
                      and "h3" not in old.replicas(rec.lineage, i, 2)]
            assert gained  # the new capacity is taken into account
            for hid, h in sim.hosts.items():
                await h.run_on(mv[hid].collect_misplaced)
            bad = {hid: await wrong_reads(sim, hid, "v") for hid in ("h0", "h3")}
            held = [i for i in gained if sim.hosts["h3"].store.info(ChunkKey(rec.lineage, i, rec.head))]
            nursery.cancel_scope.cancel()
        assert bad == {"h0": [], "h3": []}
        assert held == gained

    run(main)


def test_a_data_set_record_of_older_code_is_placed_by_the_live_records_then_recorded():
    """A record without placement inputs (written before they were recorded) places hosts
    by their live records, as the code that wrote it did; the controller records those
    inputs as they are, which moves no chunk and starts no change."""
    async def main():
        sim = Sim(6, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            cur = reg.cluster_map()
            reg.kv.txn([], [Put(K_DATASET, msgpack.packb({"hosts": ["h0", "h1", "h2", "h3"], "prev": None,
                                                   "gen": cur.mgen + 1}, use_bin_type=True))])
            sim.sync_maps()
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=2, min_size=1)
            await write_all(sim, "v")
            legacy = reg.cluster_map()
            assert legacy.places == () and not legacy.places_recorded and not legacy.drifted()
            mv = movers(sim)
            recorded = await step_all(sim, mv)
            assert recorded.prev is None and recorded.mgen == legacy.mgen + 1
            assert recorded.places_recorded and recorded.placed() == legacy.placed()
            assert all(ClusterView(recorded).replicas(rec.lineage, i, 2)
                       == ClusterView(legacy).replicas(rec.lineage, i, 2) for i in range(CHUNKS))
            assert (await step_all(sim, mv)).mgen == recorded.mgen  # nothing more to do
            bad = await wrong_reads(sim, "h3", "v")
            nursery.cancel_scope.cancel()
        assert bad == []

    run(main)


def test_joining_marks_are_kept_for_the_current_change_only():
    """Before its first write to a chunk during a change of data set, a gateway records
    the chunk's joining targets stale, once per chunk and change. What it remembers of
    that goes when the data-set generation moves: nothing is left of finished changes
    (a long-lived gateway of a large volume kept an entry per chunk written per change),
    and a later change that places a chunk on the same host again records it again."""
    async def main():
        sim = Sim(7, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery, loops=False)
            reg = sim.reg
            reg.set_data_set(reg.cluster_map().mgen, ["h0", "h1", "h2"], None)
            sim.sync_maps()
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=2)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            mv = movers(sim)
            sizes, missed = [], []
            for state in ("up", "draining", "up"):  # h3 joins, is drained, returns
                reg.set_host_state("h3", state)
                cmap = await mv["h0"].control_once()  # the controller records the change
                assert cmap.prev is not None
                sim.sync_maps()
                cv = h0.cluster
                for i in range(CHUNKS):
                    await h0.run_on(lambda i=i: call(gw.write(i * MiB, b"x" * 4096, False)))
                joining = {i: set(cv.joining(rec.lineage, i, 2)) for i in range(CHUNKS)}
                stale: dict[int, set[str]] = {}
                for r in reg.list_stale(rec.lineage):
                    stale.setdefault(r.index, set()).add(r.host_id)
                missed += [i for i, js in joining.items() if not js <= stale.get(i, set())]
                sizes.append((len(cv.joining_marked), sum(1 for js in joining.values() if js)))
                for _ in range(10):
                    cmap = await step_all(sim, mv)
                    if cmap.prev is None:
                        break
                    for h in sim.hosts.values():
                        await h.run_on(h.resync.run_once)
                assert cmap.prev is None
            left = set(h0.cluster.joining_marked)
            nursery.cancel_scope.cancel()
        assert missed == []  # every chunk written reached its joining targets' resync
        assert all(n == moving > 0 for n, moving in sizes)  # this change's chunks only
        assert left == set()

    run(main)
