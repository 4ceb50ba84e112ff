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
