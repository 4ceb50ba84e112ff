"""The gateway's peer messages carry the request id, except to hosts that predate it."""

from __future__ import annotations

import itertools

from control import api
from replicator.gateway import ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import MemoryNetwork
from vbp import reqid
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of

_POOLS = itertools.count()


async def test_request_id_reaches_current_replicas_and_is_left_out_for_older_ones():
    reg = open_registry(f"memory://gateway-rid-{next(_POOLS)}")
    # h3 runs a release from before request ids (an upgrade half done): its decoder would
    # refuse a frame with the extra field, so it must get the old frame
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", peer_rev=rev)
                  for i, rev in ((1, 1), (2, 1), (3, 0)))
    cluster = ClusterView(ClusterMap(1, hosts))
    assert cluster.no_rid == {"h3"}
    net = MemoryNetwork()
    replicas = {h.id: Replica(MemoryChunkStore(None, 1 << 30), h.id, lambda: 1) for h in hosts}
    got: list[tuple[str, str, str]] = []

    def serve(host):
        def handle(msg, peer):
            got.append((host, type(msg).__name__, msg.rid))
            return replicas[host].handle(msg, peer)
        return handle

    for h in ("h2", "h3"):
        net.serve(f"{h}:1", serve(h), cluster="t", host_id=h)
    rec = api.create_volume(reg, "v", "4M", replicas=3, chunk_size="1M")
    gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                       host_id="h1", replica=replicas["h1"], cluster=cluster,
                       pool=net.pool("t", "h1"), token=1)
    assert rec.replicas == 3
    token = reqid.current.set("h1-00abcd-1")
    try:
        await gw.write(0, b"x" * 4096, False)
        await gw.flush()
    finally:
        reqid.current.reset(token)
    assert sorted(got) == [("h2", "Flush", "h1-00abcd-1"), ("h2", "WriteChunk", "h1-00abcd-1"),
                           ("h3", "Flush", ""), ("h3", "WriteChunk", "")]


async def test_a_map_short_of_copies_is_refreshed_before_a_failure_fails_the_write():
    """A gateway whose map predates the last hosts' registration (it started just before
    them) offers a replicas=3 chunk only two copies. When one of the two fails, the write
    would be below min_size on that map; the gateway reads the map again first, and the
    write stands on the host it was missing."""
    reg = open_registry(f"memory://gateway-short-{next(_POOLS)}")
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", peer_rev=1)
                  for i in (1, 2, 3))
    old = ClusterMap(1, hosts[:2])  # h3 registered after this map
    new = ClusterMap(2, hosts)
    cluster = ClusterView(old)
    net = MemoryNetwork()
    replicas = {h.id: Replica(MemoryChunkStore(None, 1 << 30), h.id, lambda: cluster.epoch)
                for h in hosts}
    got = []

    def serve(host):
        def handle(msg, peer):
            got.append((host, type(msg).__name__))
            return replicas[host].handle(msg, peer)
        return handle

    net.serve("h3:1", serve("h3"), cluster="t", host_id="h3")  # h2 is down
    api.create_volume(reg, "v", "4M", replicas=3, chunk_size="1M")
    gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                       host_id="h1", replica=replicas["h1"], cluster=cluster,
                       pool=net.pool("t", "h1"), token=1)
    refreshes = []

    async def refresh_map():
        refreshes.append(cluster.epoch)
        cluster.set_map(new)

    gw.refresh_map = refresh_map
    assert sorted(cluster.replicas(gw.lineage, 0, 3)) == ["h1", "h2"]
    await gw.write(0, b"x" * 4096, False)
    # read before sending (then once more: h3, of the new map, answers the frame made on
    # the old one with StaleEpoch, and the gateway retries it on a fresh map)
    assert refreshes[0] == 1 and ("h3", "WriteChunk") in got
    assert "h2" in gw.stale[0]
    assert replicas["h3"].read(gw.lineage, 0, (gw.gen,), 0, 4096)[1] == b"x" * 4096
    # with the map complete, nothing more is read
    seen = len(refreshes)
    await gw.write(4096, b"y" * 4096, False)
    assert len(refreshes) == seen


async def test_a_map_short_of_copies_never_takes_the_fast_path():
    """CI flake of tests/interop/test_service_lifecycle.py: a gateway whose map still
    predated the third host's registration wrote a replicas=3 chunk through the fast path
    (every copy of its map ready) to two hosts, and the third host's copy stayed behind
    with no stale record, later served as current. The fast path leaves a chunk with fewer
    copies than the volume wants to the general one, which reads the map again first."""
    reg = open_registry(f"memory://gateway-short-{next(_POOLS)}")
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", peer_rev=1)
                  for i in (1, 2, 3))
    cluster = ClusterView(ClusterMap(1, hosts[:2]))  # h3 registered after this map
    net = MemoryNetwork()
    replicas = {h.id: Replica(MemoryChunkStore(None, 1 << 30), h.id, lambda: cluster.epoch)
                for h in hosts}
    for h in hosts[1:]:
        net.serve(h.peer, replicas[h.id].handle, cluster="t", host_id=h.id)
    api.create_volume(reg, "v", "4M", replicas=3, chunk_size="1M")
    pool = net.pool("t", "h1")
    pool.ready = lambda addresses: True  # as a real pool with its connections open
    gw = VolumeGateway(view_of(VolumeRecord.from_dict(reg.get_volume("v")), None),
                       host_id="h1", replica=replicas["h1"], cluster=cluster, pool=pool, token=1)

    async def refresh_map():
        cluster.set_map(ClusterMap(2, hosts))

    gw.refresh_map = refresh_map
    await gw.write(0, b"x" * 4096, False)
    for h in ("h1", "h2", "h3"):
        assert replicas[h].read(gw.lineage, 0, (gw.gen,), 0, 4096)[1] == b"x" * 4096, h
