"""Properties of vbp.placement, checked against the deliberately naive reference."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vbp.cluster import HOST_DOWN, HOST_DRAINING, HOST_UP, ClusterMap, HostRecord
from vbp.placement import Placement, place, place_flat, place_naive

GiB = 1 << 30


@st.composite
def cluster_maps(draw, max_zones=4, max_pods=3, max_hosts=4, states=True):
    hosts = []
    for z in range(draw(st.integers(1, max_zones))):
        for p in range(draw(st.integers(1, max_pods))):
            for h in range(draw(st.integers(1, max_hosts))):
                state = draw(st.sampled_from([HOST_UP] * 6 + [HOST_DOWN, HOST_DRAINING])) if states else HOST_UP
                hosts.append(HostRecord(
                    id=f"z{z}-p{p}-h{h}", peer="127.0.0.1:1", nbd="127.0.0.1:2",
                    zone=f"z{z}", pod=f"p{p}", capacity=draw(st.sampled_from([0, 1, 2, 4, 8])) * GiB,
                    state=state, maintenance=draw(st.booleans())))
    return ClusterMap(draw(st.integers(0, 100)), tuple(hosts))


replicas = st.integers(1, 5)
chunks = st.lists(st.tuples(st.sampled_from(["lin-a", "lin-b", "x"]), st.integers(0, 10**6)),
                  min_size=1, max_size=12)


def zone_of(cmap, hid):
    return cmap.host(hid).zone


def pod_of(cmap, hid):
    h = cmap.host(hid)
    return (h.zone, h.pod)


@settings(max_examples=150, deadline=None)
@given(cluster_maps(), replicas, chunks)
def test_agrees_with_naive(cmap, n, keys):
    p = Placement(cmap)
    for lin, idx in keys:
        assert p.place(lin, idx, n) == place_naive(lin, idx, cmap, n)


@settings(max_examples=150, deadline=None)
@given(cluster_maps(), chunks, st.data())
def test_first_in_agrees_with_the_first_replica(cmap, keys, data):
    """first_in(among) is whether place's first choice is one of `among`, whatever n and
    whatever hosts `among` names (eligible, not, or unknown)."""
    f = {h.id: data.draw(st.sampled_from([0.1, 0.5, 1.0])) for h in cmap.hosts}
    p = Placement(cmap, f)
    ids = [h.id for h in cmap.hosts]
    among = frozenset(data.draw(st.lists(st.sampled_from(ids + ["elsewhere"]), max_size=len(ids) + 1)))
    for lin, idx in [*keys, *(("lin-c", i) for i in range(200))]:
        for n in (1, 3):
            got = p.place(lin, idx, n)
            assert p.first_in(lin, idx, among) == (bool(got) and got[0] in among)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(6, 10), st.sampled_from([(1,), (1, 4), (0, 2)]),
       replicas, chunks, st.data())
def test_agrees_with_naive_on_large_pools(zones, pods, per_pod, caps, n, keys, data):
    """Pools with many hosts of few capacities take the per-capacity shortcut (one log per
    zone and capacity, not per host); it must give the same answer."""
    hosts = tuple(HostRecord(f"z{z}-p{p}-h{h}", "a:1", "a:2", f"z{z}", f"p{p}",
                             data.draw(st.sampled_from(caps)) * GiB,
                             data.draw(st.sampled_from([HOST_UP] * 8 + [HOST_DOWN, HOST_DRAINING])))
                  for z in range(zones) for p in range(pods) for h in range(per_pod))
    cmap = ClusterMap(1, hosts)
    p = Placement(cmap)
    for lin, idx in keys:
        assert p.place(lin, idx, n) == place_naive(lin, idx, cmap, n)


@settings(max_examples=100, deadline=None)
@given(cluster_maps(), replicas, chunks, st.randoms(use_true_random=False))
def test_deterministic_and_independent_of_host_order(cmap, n, keys, rnd):
    hosts = list(cmap.hosts)
    rnd.shuffle(hosts)
    other = ClusterMap(cmap.epoch + 1, tuple(hosts))
    for lin, idx in keys:
        a = place(lin, idx, cmap, n)
        assert a == place(lin, idx, cmap, n) == Placement(other).place(lin, idx, n)


@settings(max_examples=150, deadline=None)
@given(cluster_maps(), replicas, chunks)
def test_distinct_eligible_hosts_spread_over_domains(cmap, n, keys):
    up = [h for h in cmap.hosts if h.state == HOST_UP]
    zones = {h.zone for h in up}
    for lin, idx in keys:
        got = place(lin, idx, cmap, n)
        assert len(got) == len(set(got)) == min(n, len(up))
        assert all(cmap.host(h).state == HOST_UP for h in got)
        # as many zones as possible, then as many pods as possible inside each zone
        assert len({zone_of(cmap, h) for h in got}) == min(n, len(zones))
        per_zone = Counter(zone_of(cmap, h) for h in got)
        for z, m in per_zone.items():
            pods = {h.pod for h in up if h.zone == z}
            assert len({pod_of(cmap, h) for h in got if zone_of(cmap, h) == z}) == min(m, len(pods))


@settings(max_examples=150, deadline=None)
@given(cluster_maps(), replicas, chunks, st.data())
def test_host_down_or_draining_moves_only_its_replicas(cmap, n, keys, data):
    up = [h for h in cmap.hosts if h.state == HOST_UP]
    if not up:
        return
    victim = data.draw(st.sampled_from(up))
    new_state = data.draw(st.sampled_from([HOST_DOWN, HOST_DRAINING]))
    after = ClusterMap(cmap.epoch + 1, tuple(h.with_state(new_state) if h.id == victim.id else h
                                             for h in cmap.hosts))
    for lin, idx in keys:
        old, new = place(lin, idx, cmap, n), place(lin, idx, after, n)
        if victim.id not in old:
            assert new == old
        else:
            assert set(old) - set(new) == {victim.id}
            assert len(set(new) - set(old)) <= 1


@settings(max_examples=200, deadline=None)
@given(cluster_maps(), replicas, chunks, st.data())
def test_removing_a_host_moves_only_its_chunks_one_replica_each(cmap, n, keys, data):
    """Minimal movement, exactly: a chunk that did not live on the removed host keeps its
    placement (order included); a chunk that did loses that replica and gains at most one
    (none when no other eligible host is left)."""
    victim = data.draw(st.sampled_from(cmap.hosts))
    smaller = ClusterMap(cmap.epoch + 1, tuple(h for h in cmap.hosts if h.id != victim.id))
    spare = sum(h.state == HOST_UP for h in smaller.hosts)
    for lin, idx in keys:
        old, new = place(lin, idx, cmap, n), place(lin, idx, smaller, n)
        if victim.id not in old:
            assert new == old
        else:
            assert set(old) - set(new) == {victim.id}
            assert len(set(new) - set(old)) == (1 if spare >= len(old) else 0)


@settings(max_examples=200, deadline=None)
@given(cluster_maps(), replicas, chunks, st.data())
def test_adding_a_host_moves_only_chunks_it_receives_one_replica_each(cmap, n, keys, data):
    """Read backwards: only chunks placed on the new host change, each by exactly the one
    replica the new host takes, wherever in the map it is added (a new or existing zone
    and pod, any capacity)."""
    zone = data.draw(st.sampled_from(sorted({h.zone for h in cmap.hosts} | {"z-new"})))
    pod = data.draw(st.sampled_from(sorted({h.pod for h in cmap.hosts} | {"p-new"})))
    new_host = HostRecord("new", "127.0.0.1:1", "127.0.0.1:2", zone, pod,
                          data.draw(st.sampled_from([0, 1, 3, 16])) * GiB)
    grown = ClusterMap(cmap.epoch + 1, cmap.hosts + (new_host,))
    for lin, idx in keys:
        old, new = place(lin, idx, cmap, n), place(lin, idx, grown, n)
        if "new" not in new:
            assert new == old
        else:
            assert set(new) - set(old) == {"new"}
            assert len(set(old) - set(new)) == (1 if len(old) == len(new) else 0)


factors = st.sampled_from([0.05, 0.1, 0.35, 0.5, 0.8, 0.95])


@settings(max_examples=150, deadline=None)
@given(cluster_maps(), replicas, chunks, st.data())
def test_weight_factors_agree_with_naive(cmap, n, keys, data):
    f = {h.id: data.draw(factors) for h in cmap.hosts if data.draw(st.booleans())}
    p = Placement(cmap, f)
    for lin, idx in keys:
        assert p.place(lin, idx, n) == place_naive(lin, idx, cmap, n, f)


@settings(max_examples=300, deadline=None)
@given(cluster_maps(), replicas, chunks, st.data())
def test_lowering_one_hosts_weight_moves_only_chunks_off_that_host(cmap, n, keys, data):
    """A reweight (replicator.migration) changes one host's key only: a chunk not placed
    on the host keeps its placement, order included; a chunk placed on it either keeps its
    set or loses that host to exactly one other (or to none, if no other host is left).
    Raising the weight back is the same read backwards: chunks only move onto the host."""
    eligible_ids = [h.id for h in cmap.hosts if h.state == HOST_UP]
    if not eligible_ids:
        return
    victim = data.draw(st.sampled_from(eligible_ids))
    others = {h: data.draw(factors) for h in eligible_ids if h != victim and data.draw(st.booleans())}
    start = data.draw(st.sampled_from([1.0, 0.8, 0.5]))
    lower = data.draw(factors.filter(lambda f: f < start))
    before, after = Placement(cmap, {**others, victim: start}), Placement(cmap, {**others, victim: lower})
    spare = len(eligible_ids)
    for lin, idx in keys:
        old, new = before.place(lin, idx, n), after.place(lin, idx, n)
        if victim not in old:
            assert new == old
        elif set(new) != set(old):
            assert set(old) - set(new) == {victim}
            assert len(set(new) - set(old)) == (1 if spare > len(old) else 0)
        # raising it back: only chunks the host joins change
        if victim not in new:
            assert old == new or victim in old


def test_lowering_a_weight_moves_about_its_share_in_a_sandbox_sized_pool():
    """Four equal hosts, three replicas: halving one host's weight takes it out of a part
    of its chunks and puts those on the host left out before; the other chunks stay."""
    hosts = tuple(HostRecord(f"h{i}", "a:1", "a:2", "z", f"p{i}", GiB) for i in range(4))
    cmap = ClusterMap(1, hosts)
    before, after = Placement(cmap), Placement(cmap, {"h3": 0.5})
    held_before = held_after = moved = 0
    for i in range(4000):
        old, new = before.place("lin", i, 3), after.place("lin", i, 3)
        held_before += "h3" in old
        held_after += "h3" in new
        if set(old) != set(new):
            moved += 1
            assert set(old) - set(new) == {"h3"} and len(set(new) - set(old)) == 1
    assert held_before - held_after == moved
    # h3 held 3/4 of the chunks; at half weight it is last of four in about 0.46 of them
    assert 0.65 < held_after / held_before < 0.8


@settings(max_examples=100, deadline=None)
@given(cluster_maps(states=False), replicas, chunks, st.data())
def test_removing_a_pod_moves_only_its_chunks(cmap, n, keys, data):
    zone, pod = data.draw(st.sampled_from(sorted({(h.zone, h.pod) for h in cmap.hosts})))
    gone = {h.id for h in cmap.hosts if (h.zone, h.pod) == (zone, pod)}
    smaller = ClusterMap(cmap.epoch + 1, tuple(h for h in cmap.hosts if h.id not in gone))
    for lin, idx in keys:
        old, new = place(lin, idx, cmap, n), place(lin, idx, smaller, n)
        lost = set(old) & gone
        if not lost:
            assert new == old
        else:
            assert set(old) - set(new) == lost
            assert len(set(new) - set(old)) <= len(lost)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.lists(st.sampled_from([0, 1, 3, 8]), min_size=12, max_size=12),
       replicas, chunks)
def test_single_domain_equals_flat_rendezvous(nhosts, caps, n, keys):
    cmap = ClusterMap(1, tuple(HostRecord(f"h{i}", "a:1", "a:2", capacity=caps[i] * GiB)
                               for i in range(nhosts)))
    for lin, idx in keys:
        assert place(lin, idx, cmap, n) == place_flat(lin, idx, cmap, n)


def test_flat_removal_is_minimal():
    """The flat reference is the textbook scheme: removal moves only the victim's chunks."""
    cmap = ClusterMap(1, tuple(HostRecord(f"h{i}", "a:1", "a:2", capacity=(1 + i % 3) * GiB)
                               for i in range(12)))
    less = ClusterMap(2, tuple(h for h in cmap.hosts if h.id != "h5"))
    for i in range(2000):
        old, new = place_flat("l", i, cmap, 3), place_flat("l", i, less, 3)
        if "h5" not in old:
            assert old == new
        else:
            assert set(old) - set(new) == {"h5"}


def test_weighted_by_capacity():
    caps = [1, 2, 4, 1, 2, 4]
    cmap = ClusterMap(1, tuple(HostRecord(f"h{i}", "a:1", "a:2", zone=f"z{i % 2}", pod=f"p{i % 3}",
                                          capacity=c * GiB) for i, c in enumerate(caps)))
    counts = Counter(place("l", i, cmap, 1)[0] for i in range(30000))
    total = sum(caps)
    for i, c in enumerate(caps):
        assert counts[f"h{i}"] / 30000 == pytest.approx(c / total, rel=0.06)


def test_balance_and_movement_on_a_realistic_map():
    rnd = random.Random(7)
    hosts = [HostRecord(f"z{z}p{p}h{h}", "a:1", "a:2", f"z{z}", f"p{p}",
                        rnd.choice([1, 2, 4]) * 1000 * GiB)
             for z in range(5) for p in range(4) for h in range(5)]
    cmap = ClusterMap(1, tuple(hosts))
    N = 6000
    before = [place("l", i, cmap, 3) for i in range(N)]
    fill = Counter(h for s in before for h in s)
    total_cap = sum(h.capacity for h in hosts)
    rel = [fill[h.id] / (3 * N * h.capacity / total_cap) for h in hosts]
    assert max(rel) < 1.35 and min(rel) > 0.65  # sampling noise at 6000 chunks
    # adding a host moves exactly the minimum: what the new host receives
    new = HostRecord("z2p1hX", "a:1", "a:2", "z2", "p1", 2000 * GiB)
    grown = ClusterMap(2, tuple(hosts) + (new,))
    after = [place("l", i, grown, 3) for i in range(N)]
    moved = sum(len(set(a) - set(b)) for a, b in zip(after, before))
    minimum = sum(new.id in a for a in after)
    assert minimum > 0 and moved == minimum


def test_edge_cases():
    empty = ClusterMap(0, ())
    assert place("l", 0, empty, 3) == ()
    one = ClusterMap(1, (HostRecord("a", "x:1", "x:2"),))
    assert place("l", 0, one, 3) == ("a",)
    assert place("l", 0, one, 0) == ()
    down = ClusterMap(2, (HostRecord("a", "x:1", "x:2", state=HOST_DOWN),))
    assert place("l", 0, down, 3) == ()


def test_a_map_with_two_records_of_one_host_id_is_refused():
    """Replicas are distinct hosts: a map that names one host id twice (in two zones, or
    twice the same record) would have placement give that host two of a chunk's copies,
    so it is refused when built."""
    a0, a1 = HostRecord("a", "x:1", "x:2", "z0"), HostRecord("a", "x:1", "x:2", "z1")
    b = HostRecord("b", "x:1", "x:2", "z2")
    for hosts in ((a0, a1, b), (a0, a0)):
        with pytest.raises(ValueError, match="host id .a."):
            ClusterMap(1, hosts)
