"""replicator.gateway.ClusterView: the per-map placement caches of a host."""

from __future__ import annotations

from replicator import gateway
from replicator.gateway import ClusterView
from vbp.cluster import ClusterMap, HostRecord

GiB = 1 << 30


def _changing_map() -> ClusterMap:
    """Five hosts in three zones, the data set changing from four of them to all five."""
    hosts = tuple(HostRecord(f"h{i}", f"10.0.0.{i}:1", f"10.0.0.{i}:2", f"z{i % 3}", f"p{i}",
                             GiB, peer_rev=9) for i in range(5))
    return ClusterMap(3, hosts, data=tuple(h.id for h in hosts), prev=("h0", "h1", "h2", "h3"), mgen=2)


def test_caches_stay_bounded_and_give_the_same_answers(monkeypatch):
    """A host's view lives for a whole epoch (days, without a change of membership), and
    the gateways, scrub and recovery ask it about every chunk they touch: its caches are
    bounded like the placement's memo (about 420 MiB per million chunks otherwise), and an
    answer after a cache is cleared is the one from before."""
    monkeypatch.setattr(gateway, "VIEW_CACHE_SIZE", 500)
    cmap = _changing_map()
    view, fresh = ClusterView(cmap), ClusterView(cmap)
    for i in range(3000):
        view.replicas("lin", i, 3)
        view.targets("lin", i, 3)
        view.write_set("lin", i, 3)
        view.route("lin", i, 3, "h0")
    caches = (view._cache, view._tcache, view._wcache, view._rcache, view._routes)
    assert max(map(len, caches)) <= 500
    for i in (0, 1, 1500, 2999):
        assert view.replicas("lin", i, 3) == fresh.replicas("lin", i, 3)
        assert view.write_set("lin", i, 3) == fresh.write_set("lin", i, 3)
        assert view.joining("lin", i, 3) == fresh.joining("lin", i, 3)
        assert view.route("lin", i, 3, "h0") == fresh.route("lin", i, 3, "h0")
