"""replicator.view.ClusterView: the per-map placement caches of a host."""

from __future__ import annotations

from replicator import view as view_module
from replicator.view import ClusterView
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
    monkeypatch.setattr(view_module, "VIEW_CACHE_SIZE", 500)
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


def _hosts(ids, zones=3):
    return tuple(HostRecord(h, "a:1", "a:2", f"z{i % zones}", f"p{i}", GiB) for i, h in enumerate(ids))


def test_a_data_set_host_gone_from_the_map_is_placed_nowhere():
    """A host removed from the map while the data set still names it (a remove racing
    the controller), with or without a recorded place: placement is over the others, as
    if the data set left it out, and never names it."""
    hosts = _hosts(["a", "b", "c", "d"])
    placed = tuple((h.id, h.capacity, h.zone, h.pod) for h in hosts)
    full = ClusterMap(1, hosts, data=("a", "b", "c", "d"), places=placed)
    without_d = ClusterView(ClusterMap(1, hosts[:3], data=("a", "b", "c")))
    for places in (placed, placed[:3]):
        view = ClusterView(ClusterMap(2, hosts[:3], data=("a", "b", "c", "d"), places=places))
        for i in range(300):
            assert view.replicas("l", i, 3) == without_d.replicas("l", i, 3)
            assert "d" not in view.write_set("l", i, 3)
    assert any("d" in ClusterView(full).replicas("l", i, 3) for i in range(300))


def test_an_empty_data_set_places_nothing():
    view = ClusterView(ClusterMap(1, _hosts(["a", "b"]), data=()))
    assert view.replicas("l", 0, 3) == view.write_set("l", 0, 3) == ()
    assert view.route("l", 0, 3, "a") is None


def test_fewer_zones_than_replicas():
    """Two zones, three replicas: each chunk has a copy in both zones and its third in
    another pod of one of them; a zone of one host holds every chunk, whatever its
    capacity (the zone rule comes first, as in Ceph with a zone failure domain)."""
    hosts = (HostRecord("solo", "a:1", "a:2", "z0", "p0", GiB),
             *(HostRecord(f"b{i}", "a:1", "a:2", "z1", f"p{i % 2}", 16 * GiB) for i in range(6)))
    view = ClusterView(ClusterMap(1, hosts))
    for i in range(500):
        got = view.replicas("l", i, 3)
        assert len(set(got)) == 3 and "solo" in got
        pods = {(h.zone, h.pod) for h in hosts if h.id in got}
        assert len(pods) == 3


def test_same_answer_in_every_process():
    """Placement depends on no hash seed, dict or set order: processes with different
    PYTHONHASHSEED place unicode host ids and lineages alike."""
    import os
    import subprocess
    import sys

    prog = ("from vbp.cluster import ClusterMap, HostRecord\n"
            "from vbp.placement import Placement\n"
            "ids = ['é', 'e\\u0301', '主机-1', '😀', 'a b', 'Ω', 'h' * 200]\n"
            "hs = tuple(HostRecord(h, 'a:1', 'a:2', f'z{i % 3}', f'p{i % 2}', (i + 1) << 30)"
            " for i, h in enumerate(ids))\n"
            "p = Placement(ClusterMap(1, hs), {'Ω': 0.35})\n"
            "print(repr([p.place(lin, i, n) for lin in ('l', 'λ-ü') for i in range(200) for n in (1, 2, 3, 5)]))\n")
    outs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outs.add(subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                                check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__))))).stdout)
    assert len(outs) == 1 and "主机-1" in outs.pop()
