"""Review of the NBD server's read/write/flush paths (rev-srv): reproductions."""

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
from vbp.registry import open_registry

pytestmark = pytest.mark.timeout(60)
CLUSTER = "srvrev"
_REGS = itertools.count()


@pytest.mark.xfail(strict=True, reason="a volume's last close flushes only this host's store and "
                   "the next gateway forgets the remote copies' unflushed writes: a FLUSH on a "
                   "new connection is acknowledged while acknowledged writes sit unsynced on them")
async def test_a_flush_after_a_reconnect_covers_writes_answered_before_it():
    """A client writes (answered), its connection drops, it reconnects (qemu's
    reconnect-delay, nbdcopy reopening) and sends NBD_CMD_FLUSH. proto.md: "All write
    commands ... that the server completes (i.e. replies to) prior to processing a
    NBD_CMD_FLUSH MUST be written to non-volatile storage prior to replying to that
    NBD_CMD_FLUSH". The other copies of the write must be synced by then."""
    reg = open_registry(f"memory://srvrev-{next(_REGS)}")
    replicas = {h: Replica(MemoryChunkStore(None, 1 << 30), h, lambda: 1) for h in ("h1", "h2", "h3")}
    async with trio.open_nursery() as nursery:
        ports = {}
        for h in ("h2", "h3"):
            ports[h] = await nursery.start(lambda task_status, h=h: serve_peers(
                replicas[h].handle, "127.0.0.1", 0, cluster=CLUSTER, host_id=h,
                task_status=task_status))
        hosts = tuple(HostRecord(h, f"127.0.0.1:{ports.get(h, 1)}", f"127.0.0.1:{ports.get(h, 1)}",
                                 pod=f"p{h}", peer_rev=m.PEER_REV) for h in ("h1", "h2", "h3"))
        cluster = ClusterView(ClusterMap(1, hosts))
        api.create_volume(reg, "v", "8M", replicas=3, min_size=2, chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            registry = AsyncRegistry(reg)

            async def stale_map(lineage):
                return {}

            async def nothing():
                pass

            service = SimpleNamespace(
                registry=registry, replica=replicas["h1"], cluster=cluster, pool=pool,
                cfg=SimpleNamespace(host_id="h1", lease_ttl=10.0, peer_timeout=2.0,
                                   heartbeat_ttl=6.0),
                refresh_map=nothing, metrics=None, stale_map=stale_map,
                store=replicas["h1"].store, nursery=nursery, publish_stats=nothing,
                published_at=math.inf)
            provider = VolumeProvider(service)
            gw = await provider.open_export("v")
            await gw.write(0, b"\x01" * 4096, False)  # answered: on every copy
            assert all(r.store._dirty for r in replicas.values())  # (not synced yet)
            gw.close()  # the connection drops: the volume's last
            with trio.fail_after(10):
                while (lease := reg.get_lease("v")) is not None and lease.holder:
                    await trio.sleep(0.05)
            again = await provider.open_export("v")  # the client reconnects
            with trio.fail_after(10):
                res = again.flush()
                if res is not None:
                    await res
            # the FLUSH is answered: the write answered before it is durable everywhere
            assert {h: bool(r.store._dirty) for h, r in replicas.items()} == \
                {"h1": False, "h2": False, "h3": False}
        nursery.cancel_scope.cancel()
