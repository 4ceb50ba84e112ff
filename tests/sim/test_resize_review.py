"""Shrinking a volume (`vbp volume resize --force`) against two things that outlive its
head's old size (found by a review): a holder cut off from the registry while the
shrink completes without it (control.api.complete_unleased), and a snapshot taken
before, which still reads past the head's new end (replicator.migration: which chunks a
data-set change moves)."""
from __future__ import annotations

import pytest
import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from tests.sim.test_snap_review import Unreachable
from vbp.errors import VbpError
from vbp.layout import MiB
from replicator.gateway import ClusterView
from replicator.migration import sole_holders
from vbp.cluster import ClusterMap, HostRecord
from vbp.volume import new_volume, read_chunks, shrink, take_snapshot


@pytest.mark.parametrize("snap", [False, True], ids=["no-snapshot", "snapshot-before"])
def test_a_cut_off_holder_never_reads_what_an_unleased_shrink_cut(snap):
    """hw holds v's lease and wrote chunk 1 ("O", then, after snapshot s if any, "N").
    Cut off from the registry, its lease runs out. `vbp volume resize v 1M --force` finds
    no live lease and completes the shrink itself (complete_unleased: it takes the lease
    and gives it back, announcing its token to no replica), then GC runs on the other
    hosts: chunk 1's head generation is freed (the cut hides it from the head; s needs
    only its own). hw, never fenced, past its lease, still at the old size and chain,
    reads chunk 1 from the other copies with its old token, which they take: it gets
    zeros, or s's older "O", for the "N" it acknowledged, with no error. Now GC learns the
    registry's newest tokens before it frees anything: the read is refused (as for a
    volume deleted under a cut-off holder, test_gc_leased)."""
    async def main():
        sim = Sim(13, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=3)
            h0 = sim.hosts["h0"]
            holders = h0.cluster.replicas(rec.lineage, 1, 3)
            hw = next(h for i, h in sim.hosts.items() if i not in holders)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(MiB, b"O" * 4096, False)))
            if snap:
                await sim.snapshot("v", "s")
            await hw.run_on(lambda: call(w.write(MiB, b"N" * 4096, False)))
            await hw.run_on(hw.publish_stats)
            hw.registry = Unreachable(hw.registry)  # renewals fail: the lease runs out
            hw.replica.on_token = None
            await trio.sleep(sim.lease_ttl + 2)
            assert sim.reg.get_lease("v") is None
            shrunk = await sim.shrink("v", MiB)  # completed without a holder
            assert shrunk.size == MiB
            for h in sim.hosts.values():
                if h is not hw:
                    await h.collect_garbage()
            assert not w.fenced and trio.current_time() > w.lease_deadline
            try:
                got = extents_bytes(await hw.run_on(lambda: call(w.read(MiB, 4096))), MiB, 4096)
            except VbpError as e:
                got = type(e).__name__
            assert got not in (bytes(4096), b"O" * 4096), got
            nursery.cancel_scope.cancel()

    run(main)


GiB = 1 << 30


def test_a_join_waits_for_the_down_sole_holder_of_a_snapshots_chunk_past_a_shrunk_head():
    """v (replicas=1, 256 chunks) has snapshot s; v is then shrunk to 1 chunk (`vbp volume
    resize v 1M --force`). s still reads all 256 chunks. h5 joins h1-h4 while h2 is down
    and has not scanned: the chunks of s that move from h2 to h5 have no other copy, so
    the change must wait for h2 (as it does for v before the shrink). It did not: the
    chunks past v's head were never placed (lineage_chunks counted v["size"] only), the
    change completed, and s read holes on h5 where h2 held its data."""
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB)
                  for i in range(1, 6))
    join = ClusterMap(1, hosts, tuple(h.id for h in hosts), ("h1", "h2", "h3", "h4"), 1)
    rec = new_volume("v", 256 * MiB, replicas=1, chunk_size=MiB, lineage="a", head=1, now=0.0)
    before = take_snapshot(rec, "s", 2, now=0.0)
    assert sole_holders(join, [before.to_dict()], frozenset({"h2"})) == ["h2"]
    after = shrink(before, MiB, 3).to_dict()
    assert read_chunks(after) == 256  # (s still reads every chunk)
    view = ClusterView(join)
    moving = [i for i in range(read_chunks(after))
              if view.replicas("a", i, 1) == ("h2",) and view.joining("a", i, 1)]
    assert moving  # chunks only h2 holds that move to h5
    assert sole_holders(join, [after], frozenset({"h2"})) == ["h2"]


def test_the_controller_completes_a_join_without_the_down_sole_holder_of_a_snapshots_chunks():
    """The controller-level effect (as tests/unit/test_migration.py's
    test_the_controller_does_not_complete_a_change_a_down_sole_holder_has_not_scanned,
    with v shrunk to one chunk after snapshot s): h4 joins while h3, the sole holder of
    chunks of s that move to h4, is down and has not scanned. The change completed."""
    import trio
    from replicator.mover import DataSetMover
    from vbp.registry import open_registry
    from vbp.registry.base import P_ALIVE
    from vbp.registry.kv import Delete
    from tests.unit.test_migration import Async, Clock

    reg = open_registry("memory://resize-review-sole-holders")
    for i in range(1, 5):
        reg.register_host(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2", "h3"], None)
    rec = new_volume("v", 64 * MiB, replicas=1, chunk_size=MiB, lineage="l0", head=1, now=0.0)
    reg.create_volume("v", shrink(take_snapshot(rec, "s", 2, now=0.0), MiB, 3).to_dict())
    reg.kv.txn([], [Delete(P_ALIVE + b"h3")])  # h3 is down
    m = DataSetMover("h1", None, None, Async(reg), grace=5.0, reweight_hold=10.0)
    m.clock = Clock()
    got = trio.run(m.control_once)
    assert got.prev == ("h1", "h2", "h3") and got.data == ("h1", "h2", "h3", "h4")
    view = ClusterView(got)
    assert any(view.replicas("l0", i, 1) == ("h3",) and view.joining("l0", i, 1)
               for i in range(64))  # chunks of s only h3 holds move to h4
    for h in ("h1", "h2", "h4"):
        reg.mark_scanned(h, got.mgen)
    assert trio.run(m.control_once).migrating  # h3 alone holds chunks of s that move to h4
