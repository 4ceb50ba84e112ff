"""The volume provider (blockd.service.VolumeProvider) when a volume's last connection
closes with a task-less write still under way: the lease is kept until that write ends,
and what it could not record reaches the registry before the lease is given back."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import trio

from blockd.service import AsyncRegistry, VolumeProvider
from control import api
from replicator import messages as m
from replicator.gateway import ClusterView
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.later import Later
from vbp.layout import ChunkKey
from vbp.registry import open_registry

pytestmark = pytest.mark.timeout(60)
CLUSTER = "close"
_REGS = itertools.count()


async def test_the_lease_waits_for_writes_under_way_and_takes_their_failures_along():
    """h3 does not answer a write within the request timeout; the client's connection is
    gone (its tasks cancelled, the write's rest refused) and the volume's last connection
    closes meanwhile. The lease is given back only after the write ended, with h3
    recorded stale: the copies that disagree are on record for the next holder."""
    reg = open_registry(f"memory://close-{next(_REGS)}")
    replicas = {h: Replica(MemoryChunkStore(None, 1 << 30), h, lambda: 1) for h in ("h1", "h2", "h3")}
    slow = False

    def h3_handle(msg, peer=None):
        if slow and type(msg) is m.WriteChunk:
            async def late():
                await trio.sleep(10)  # past the request timeout (2 s)
                return m.Ok(0)
            return late()
        return replicas["h3"].handle(msg, peer)

    async with trio.open_nursery() as nursery:
        ports = {}
        for h, handler in (("h2", replicas["h2"].handle), ("h3", h3_handle)):
            ports[h] = await nursery.start(lambda task_status, h=h, handler=handler: serve_peers(
                handler, "127.0.0.1", 0, cluster=CLUSTER, host_id=h, task_status=task_status))
        hosts = tuple(HostRecord(h, f"127.0.0.1:{ports.get(h, 1)}", f"127.0.0.1:{ports.get(h, 1)}",
                                 pod=f"p{h}", peer_rev=m.PEER_REV) for h in ("h1", "h2", "h3"))
        cluster = ClusterView(ClusterMap(1, hosts))
        api.create_volume(reg, "v", "8M", replicas=3, min_size=2, chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            registry = AsyncRegistry(reg)

            async def stale_map(lineage):
                return {}

            async def refresh_map():
                pass

            async def publish_stats():
                pass

            service = SimpleNamespace(
                registry=registry, replica=replicas["h1"], cluster=cluster, pool=pool,
                cfg=SimpleNamespace(host_id="h1", lease_ttl=10.0, peer_timeout=2.0,
                                   heartbeat_ttl=6.0),
                refresh_map=refresh_map, metrics=None, stale_map=stale_map,
                store=replicas["h1"].store, nursery=nursery, publish_stats=publish_stats,
                published_at=math.inf)
            provider = VolumeProvider(service)
            gw = await provider.open_export("v")
            await gw.write(0, b"\x01" * 4096, False)  # takes the lease, connects
            assert reg.get_lease("v").holder == "h1"
            slow = True
            later = gw.write(0, b"\x03" * 4096, False)
            assert type(later) is Later
            later.bind(lambda value, exc: None, lambda rest: False)  # the connection is gone
            gw.close()  # its last connection closes
            await trio.sleep(0.5)
            assert gw.inflight == 1
            assert reg.get_lease("v").holder == "h1"  # kept while the write is under way
            with trio.fail_after(10):
                while (lease := reg.get_lease("v")) is not None and lease.holder:
                    await trio.sleep(0.1)
            assert [(r.index, r.host_id) for r in reg.list_stale(gw.lineage)] == [(0, "h3")]
            assert gw.unrecorded == []
            store = replicas["h3"].store
            key = ChunkKey(gw.lineage, 0, store.resolve(gw.lineage, 0, gw.chain_for(0)))
            assert bytes(store.read(key, 0, 4)) == b"\x01" * 4  # the copy that missed it
        nursery.cancel_scope.cancel()
