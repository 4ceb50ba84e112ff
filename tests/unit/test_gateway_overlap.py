"""Overlapping writes in flight together reach every copy of a chunk in the same order."""

from __future__ import annotations

import itertools

import trio
import trio.testing

from control import api
from replicator.gateway import ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import MemoryNetwork
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of

_POOLS = itertools.count()


async def _settled(result):
    if result is not None:
        await result


async def test_a_write_retried_after_stale_epoch_does_not_land_after_a_later_overlapping_one():
    """W1 reaches h1 and h3; h2, on a newer map already, refuses it (StaleEpoch). While the
    gateway reads the map again, the client sends W2 to the same block: it goes to every
    copy on the new map. W1's retry to h2 must not then land on top of W2 there only (h2
    holding W1, the others W2: the copies disagree on an acknowledged block)."""
    reg = open_registry(f"memory://gateway-overlap-{next(_POOLS)}")
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", peer_rev=1)
                  for i in (1, 2, 3))
    cluster = ClusterView(ClusterMap(1, hosts))
    epochs = {"h1": lambda: cluster.epoch, "h2": lambda: 2, "h3": lambda: cluster.epoch}
    replicas = {h.id: Replica(MemoryChunkStore(None, 1 << 30), h.id, epochs[h.id])
                for h in hosts}
    net = MemoryNetwork()
    for h in hosts[1:]:
        net.serve(h.peer, replicas[h.id].handle, cluster="t", host_id=h.id)
    api.create_volume(reg, "v", "4M", replicas=3, chunk_size="1M")
    gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                       host_id="h1", replica=replicas["h1"], cluster=cluster,
                       pool=net.pool("t", "h1"), token=1)
    refreshing = trio.Event()

    async def refresh_map():
        cluster.set_map(ClusterMap(2, hosts))
        refreshing.set()
        await trio.sleep(0.05)  # the registry's answer takes a while

    gw.refresh_map = refresh_map

    async def second():
        await refreshing.wait()
        await _settled(gw.write(0, b"2" * 4096, False))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await _settled(gw.write(0, b"1" * 4096, False))
    got = {h: replicas[h].read(gw.lineage, 0, (gw.gen,), 0, 4096)[1][:1] for h in replicas}
    assert len(set(got.values())) == 1, got


async def test_a_waiting_write_whose_client_goes_away_holds_back_no_later_write():
    """W2 waits for W1, in flight over the same bytes; W2's task is cancelled (its client
    went away) before W1 is settled. Nothing of W2 stays noted in flight: a third write
    over the same bytes goes once W1 is settled, and the copies end alike."""
    reg = open_registry(f"memory://gateway-overlap-{next(_POOLS)}")
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", peer_rev=1)
                  for i in (1, 2))
    cluster = ClusterView(ClusterMap(1, hosts))
    replicas = {h.id: Replica(MemoryChunkStore(None, 1 << 30), h.id, lambda: 1) for h in hosts}
    release = trio.Event()

    async def slow(msg, peer):
        await release.wait()
        return replicas["h2"].handle(msg, peer)

    net = MemoryNetwork()
    net.serve("h2:1", lambda msg, peer: slow(msg, peer), cluster="t", host_id="h2")
    api.create_volume(reg, "v", "4M", replicas=2, chunk_size="1M")
    gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                       host_id="h1", replica=replicas["h1"], cluster=cluster,
                       pool=net.pool("t", "h1"), token=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_settled, gw.write(0, b"1" * 4096, False))  # W1: h2 holds it
        await trio.testing.wait_all_tasks_blocked()
        second = gw.write(1024, b"2" * 4096, False)
        scope = trio.CancelScope()

        async def gone():
            with scope:
                await second
        nursery.start_soon(gone)
        await trio.testing.wait_all_tasks_blocked()  # W2 waits for W1
        assert [len(v) for v in gw._flying.values()] == [2]
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert [len(v) for v in gw._flying.values()] == [1]  # W1 only
        nursery.start_soon(_settled, gw.write(0, b"3" * 4096, False))  # waits for W1
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert not gw._flying and not gw._landed
    got = {h: replicas[h].read(gw.lineage, 0, (gw.gen,), 0, 4096)[1] for h in replicas}
    assert got["h1"] == got["h2"] == b"3" * 4096
