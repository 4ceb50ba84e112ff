"""Review rev-mv: changes of data set while writes go on (tests/sim/harness.py, the
DataSetMover stepped by hand as in test_data_set_sim.py)."""

from __future__ import annotations

import pytest
import trio

from replicator.gateway import ClusterView
from tests.sim.harness import Sim, call, extents_bytes
from tests.sim.test_data_set_sim import CHUNKS, movers, quiet, run, step_all, write_all  # noqa: F401
from vbp.errors import VbpError
from vbp.layout import MiB


class ListHook:
    """The controller's registry, with `hook` run once right after a list_stale call
    returned (what it listed is already read): the window between the completion check's
    listing and its set_data_set."""

    def __init__(self, inner):
        self.inner = inner
        self.hook = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def list_stale(self, *args, **kwargs):
        out = await self.inner.list_stale(*args, **kwargs)
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return out


async def h3_out(nursery) -> Sim:
    """A 4-host sim whose data set is h0-h2: stepping the controllers brings h3 in."""
    sim = Sim(11, hosts=4)
    await sim.start(nursery, loops=False)
    sim.reg.set_data_set(sim.reg.cluster_map().mgen, ["h0", "h1", "h2"], None)
    sim.sync_maps()
    return sim


async def finish_and_read(sim, mv, done, T, x: int):
    """Step the change to its end, T resyncing, then collect the misplaced copies: what
    chunk x of v reads through h2 (bytes, or the VbpError it raised)."""
    for _ in range(10):
        if done.prev is None:
            break
        await T.run_on(T.resync.run_once)
        done = await step_all(sim, mv)
    assert done.prev is None
    for _ in range(3):
        await T.run_on(T.resync.run_once)
    for hid, h in sim.hosts.items():
        await h.run_on(mv[hid].collect_misplaced)
    h2 = sim.hosts["h2"]
    reader = await h2.run_on(h2.provider.open_export, "v")
    try:
        return extents_bytes(await h2.run_on(lambda: call(reader.read(x * MiB, 4096))),
                             x * MiB, 4096)
    except VbpError as e:
        return e


def test_a_target_recorded_stale_after_the_completion_check_keeps_the_write_it_missed():
    """replicas=1: chunk X moves from P to h3 (h3 joins the data set). h3 resyncs X, its
    record goes. The controller's completion step lists the stale records (none for a
    joining target); before its set_data_set, a client write W of X is sent to P and h3,
    h3 fails it (unreachable) and is recorded stale, P takes it: acknowledged (min_size 1
    over the set being left). The controller then completes the change on its listing:
    h3, stale and without W, is X's only copy; its resync elects it (every copy stale, it
    went stale last) and clears; P's copy is misplaced and collected. W is gone."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = await h3_out(nursery)
            reg = sim.reg
            rec = sim.create_volume("v", CHUNKS * MiB, replicas=1, min_size=1)
            await write_all(sim, "v")
            mv = movers(sim)
            hooked = ListHook(mv["h0"].registry)
            mv["h0"].registry = hooked
            cmap = await step_all(sim, mv)  # the change is recorded, every holder scans
            assert cmap.prev is not None
            cv = ClusterView(cmap)
            x = next(i for i in range(CHUNKS) if cv.joining(rec.lineage, i, 1) == ("h3",))
            T = sim.hosts["h3"]
            for _ in range(3):
                await T.run_on(T.resync.run_once)
            assert not reg.list_stale(rec.lineage, x)
            h0 = sim.hosts["h0"]
            gw = await h0.run_on(h0.provider.open_export, "v")
            acked = []

            async def write_meanwhile():
                h0.faults.partition([T.addr])
                await h0.run_on(lambda: call(gw.write(x * MiB, b"W" * 4096, False)))
                await h0.run_on(lambda: call(gw.flush()))
                acked.append(True)
                h0.faults.heal()

            hooked.hook = write_meanwhile
            done = await step_all(sim, mv)
            assert acked  # W acknowledged
            got = await finish_and_read(sim, mv, done, T, x)  # then on to the end
            nursery.cancel_scope.cancel()
        assert got == b"W" * 4096

    run(main)


class VolumesHook(ListHook):
    """The controller's registry, with `hook` run once right after list_volumes returned."""

    async def list_volumes(self, *args, **kwargs):
        out = await self.inner.list_volumes(*args, **kwargs)
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return out


def test_a_volume_written_while_the_controller_found_none_keeps_its_bytes():
    """The pool has no volume when the controller's step lists them; h3 has just joined.
    Before its set_data_set, `v` is created and written through h0 (placement over
    h0-h2). The controller then records the new data set with no change under way (no
    prev: "a pool without volumes: no chunk to move"): the chunks placement now puts on
    h3 have no copy there and no stale record, and read as zeros."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = await h3_out(nursery)
            reg = sim.reg
            mv = movers(sim)
            hooked = VolumesHook(mv["h0"].registry)
            mv["h0"].registry = hooked

            async def create_and_write():
                sim.create_volume("v", CHUNKS * MiB, replicas=2, min_size=1)
                await write_all(sim, "v")

            hooked.hook = create_and_write
            for _ in range(5):
                await step_all(sim, mv)
                for h in sim.hosts.values():
                    await h.run_on(h.resync.run_once)
            assert reg.cluster_map().data == ("h0", "h1", "h2", "h3")
            h2 = sim.hosts["h2"]
            reader = await h2.run_on(h2.provider.open_export, "v")
            bad = []
            for i in range(CHUNKS):
                try:
                    got = extents_bytes(await h2.run_on(lambda i=i: call(reader.read(i * MiB, 4096))),
                                        i * MiB, 4096)
                except VbpError as e:
                    got = e
                if got != bytes([65 + i % 26]) * 4096:
                    bad.append((i, got if isinstance(got, VbpError) else got[:1]))
            nursery.cancel_scope.cancel()
        assert bad == []

    run(main)


def test_a_target_a_volume_made_during_the_completion_step_recorded_stale_keeps_the_write():
    """As the first test, for a volume created after the completion step listed the
    volumes: its records are of a lineage the step does not know (blocking leaves them
    out), so the stale records' sequence is read before the volumes are."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim = await h3_out(nursery)
            reg = sim.reg
            sim.create_volume("old", CHUNKS * MiB, replicas=1, min_size=1)
            await write_all(sim, "old")
            mv = movers(sim)
            hooked = VolumesHook(mv["h0"].registry)
            mv["h0"].registry = hooked
            cmap = await step_all(sim, mv)
            assert cmap.prev is not None
            for _ in range(3):
                for h in sim.hosts.values():
                    await h.run_on(h.resync.run_once)
            h0, T = sim.hosts["h0"], sim.hosts["h3"]
            box = {}

            async def create_and_write():
                rec = box["rec"] = sim.create_volume("v", CHUNKS * MiB, replicas=1, min_size=1)
                cv = ClusterView(sim.reg.cluster_map())
                x = box["x"] = next(i for i in range(CHUNKS)
                                    if cv.joining(rec.lineage, i, 1) == ("h3",))
                gw = await h0.run_on(h0.provider.open_export, "v")
                h0.faults.partition([T.addr])
                await h0.run_on(lambda: call(gw.write(x * MiB, b"W" * 4096, False)))
                await h0.run_on(lambda: call(gw.flush()))
                h0.faults.heal()
                box["acked"] = True

            hooked.hook = create_and_write
            done = await step_all(sim, mv)
            assert box.get("acked")
            got = await finish_and_read(sim, mv, done, T, box["x"])
            nursery.cancel_scope.cancel()
        assert got == b"W" * 4096

    run(main)


class _MarkHook:
    """A gateway's registry that runs `hook` once, right before a mark_stale is sent."""

    def __init__(self, inner):
        self.inner = inner
        self.hook = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def mark_stale(self, *args, **kwargs):
        hook, self.hook = self.hook, None
        if hook is not None:
            await hook()
        return await self.inner.mark_stale(*args, **kwargs)


async def resynced(sim, target, lineage: str, index: int) -> None:
    for _ in range(3):
        await target.run_on(target.resync.run_once)
    assert not sim.reg.list_stale(lineage, index)


async def moving_to_h3(nursery):
    """A volume v (replicas=1, min_size=1) whose chunk x moves from its copy P to h3,
    which joins and has resynced it; h1's gateway of v (its map: the change under way),
    whose next mark_stale first completes the change (the controller's step).
    (sim, rec, x, h3, h1, gateway, movers, the hook)."""
    sim = await h3_out(nursery)
    rec = sim.create_volume("v", CHUNKS * MiB, replicas=1, min_size=1)
    await write_all(sim, "v")
    mv = movers(sim)
    cmap = await step_all(sim, mv)
    assert cmap.prev is not None
    cv = ClusterView(cmap)
    x = next(i for i in range(CHUNKS) if cv.joining(rec.lineage, i, 1) == ("h3",))
    target = sim.hosts["h3"]
    await resynced(sim, target, rec.lineage, x)
    g = sim.hosts["h1"]
    gw = await g.run_on(g.provider.open_export, "v")
    hooked = _MarkHook(gw.registry)
    gw.registry = hooked

    async def complete_change():
        done = await mv["h0"].control_once()
        assert done.prev is None, done

    return sim, rec, x, target, g, gw, mv, hooked, complete_change


def test_a_change_completed_while_a_writes_marks_were_on_their_way_is_counted_anew():
    """replicas=1, min_size=1. Chunk X moves from P to h3 (h3 joins); h3 resyncs X and its
    record goes. h1's gateway (its map: the change under way) writes W to X: P takes it,
    h3 fails at once. Before its mark of h3 reaches the registry, the controller completes
    the change (it listed no record). The mark lands; by the gateway's map W counted on P
    and was acknowledged. Under the settled map X's only copy is h3, stale: its resync
    elects itself (every copy stale, it went stale last), P's copy is collected, and W is
    gone. The write must fail, or read back (found by a review)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, x, target, g, gw, mv, hooked, complete = await moving_to_h3(nursery)
            hooked.hook = complete
            g.faults.partition([target.addr])
            try:
                await g.run_on(lambda: call(gw.write(x * MiB, b"W" * 4096, False)))
                await g.run_on(lambda: call(gw.flush()))
                acked = True
            except VbpError:
                acked = False
            g.faults.heal()
            assert hooked.hook is None  # (the change completed before the mark landed)
            sim.sync_maps()
            for _ in range(3):
                await target.run_on(target.resync.run_once)
            for hid, h in sim.hosts.items():
                await h.run_on(mv[hid].collect_misplaced)
            h2 = sim.hosts["h2"]
            reader = await h2.run_on(h2.provider.open_export, "v")
            try:
                got = extents_bytes(await h2.run_on(lambda: call(reader.read(x * MiB, 4096))),
                                    x * MiB, 4096)
            except VbpError as e:
                got = e
            nursery.cancel_scope.cancel()
        if acked:
            assert got == b"W" * 4096, got if isinstance(got, VbpError) else got[:8]

    run(main)


def test_a_flush_that_failed_on_a_joining_copy_as_the_change_completed_fails():
    """The same race on the flush path: W taken by both the copy being left (P) and the
    joining one (h3), then h3 fails the FLUSH (cut off). The controller completes the
    change just before the gateway's mark of h3 lands; by the gateway's map W is durable
    on P, so the flush succeeded, though under the settled map h3 is the chunk's only copy
    and never made W durable (a restart there loses it, and its resync elects itself).
    The flush must fail."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, x, target, g, gw, mv, hooked, complete = await moving_to_h3(nursery)
            await g.run_on(lambda: call(gw.write(x * MiB, b"W" * 4096, False)))  # both took it
            await trio.sleep(10)  # (past the write window: the resync clears h3 again)
            await resynced(sim, target, rec.lineage, x)
            hooked.hook = complete
            g.faults.partition([target.addr])
            with pytest.raises(VbpError, match="durable on 0 replicas"):
                await g.run_on(lambda: call(gw.flush()))
            g.faults.heal()
            assert hooked.hook is None  # (the change completed before the mark landed)
            assert {r.host_id for r in sim.reg.list_stale(rec.lineage, x)} == {"h3"}
            nursery.cancel_scope.cancel()

    run(main)
