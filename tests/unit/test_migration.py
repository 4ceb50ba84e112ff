"""The data-set controller without processes (replicator.migration's planning, run by
replicator.mover.DataSetMover): the weight factors it wants from the hosts' stats
(reweight of nearly full hosts), and the data-set changes it records."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import trio

from replicator.gateway import ClusterView
from replicator.migration import (
    DOWN_LOOK_GAP, REWEIGHT_MARGIN, WEIGHT_MIN, WEIGHTS_REV, sole_holders, wanted_weights,
)
from replicator.mover import DataSetMover
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.layout import ChunkKey, MiB
from vbp.registry import open_registry
from vbp.registry.base import P_ALIVE
from vbp.registry.kv import Delete
from vbp.volume import new_volume

GiB = 1 << 30
_n = itertools.count()


def cmap(factors=None, n=4, prev=None) -> ClusterMap:
    hosts = tuple(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB)
                  for i in range(1, n + 1))
    ids = tuple(h.id for h in hosts)
    return ClusterMap(1, hosts, ids, prev, 1, tuple(sorted((factors or {}).items())))


def stats(used: dict[str, float], nearfull=0.85) -> dict[str, dict]:
    """Hosts of 1 GiB with `used` given as a share of it."""
    return {h: {"capacity": GiB, "used": int(u * GiB), "nearfull_ratio": nearfull} for h, u in used.items()}


def test_no_host_above_nearfull_no_factor():
    assert wanted_weights(cmap(), stats({"h1": 0.5, "h2": 0.84, "h3": 0.1, "h4": 0.85}), 3) == {}


def test_a_nearfull_host_is_lowered_by_at_least_a_step():
    got = wanted_weights(cmap(), stats({"h1": 0.5, "h2": 0.5, "h3": 0.5, "h4": 0.87}), 3)
    assert got == {"h4": 0.8}  # (0.85 - 0.1) / 0.87 = 0.86: the step of 0.8 is more
    far = wanted_weights(cmap(), stats({"h1": 0.2, "h2": 0.2, "h3": 0.2, "h4": 0.99}), 3)
    assert far == {"h4": 0.75}  # 0.75 / 0.99 = 0.757, rounded down to a multiple of 0.05
    lowered = wanted_weights(cmap({"h4": 0.8}), stats({"h1": 0.2, "h2": 0.2, "h3": 0.2, "h4": 0.9}), 3)
    assert lowered == {"h4": 0.6}  # 0.8 * 0.8 = 0.64 -> 0.6


def test_the_factor_stops_at_its_minimum():
    assert wanted_weights(cmap({"h4": 0.05}), stats({"h1": 0.1, "h2": 0.1, "h3": 0.1, "h4": 0.9}), 3) == {"h4": 0.05}
    assert wanted_weights(cmap({"h4": 0.1}), stats({"h1": 0.1, "h2": 0.1, "h3": 0.1, "h4": 0.9}), 3) == {"h4": WEIGHT_MIN}


def test_the_threshold_is_each_hosts_own():
    st = stats({"h1": 0.5, "h2": 0.5, "h3": 0.5, "h4": 0.75})
    assert wanted_weights(cmap(), st, 3) == {}
    st["h4"]["nearfull_ratio"] = 0.7
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.8}
    del st["h4"]["nearfull_ratio"]  # a host that does not publish one: the default 0.85
    assert wanted_weights(cmap(), st, 3) == {}


def test_every_host_nearly_full_nothing_moves():
    st = stats({"h1": 0.9, "h2": 0.88, "h3": 0.86, "h4": 0.97})
    assert wanted_weights(cmap(), st, 3) == {}
    assert wanted_weights(cmap({"h4": 0.5}), st, 3) == {"h4": 0.5}  # kept, not raised either


def test_not_lowered_when_the_others_lack_room_for_what_would_move():
    # Three copies on four hosts: h4 holds three chunks in four, and a factor of 0.9 (aimed
    # at the mean, 0.87) takes it out of only 4% of them, 0.036 GiB, of which about 0.01
    # lands on each other host: with 0.01 of room below nearfull on them in all, no room
    st = stats({"h1": 0.845, "h2": 0.85, "h3": 0.845, "h4": 0.95})
    assert wanted_weights(cmap(), st, 3) == {}
    # with 0.05 of room it fits (h2 ends at 0.8496). The estimate by weight, which said a
    # factor sheds its share of the usage (10%, 0.095 GiB), found no room there either.
    st = stats({"h1": 0.83, "h2": 0.84, "h3": 0.83, "h4": 0.95})
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.9}
    st = stats({"h1": 0.5, "h2": 0.84, "h3": 0.84, "h4": 0.95})  # 0.35 + 0.02 of room: enough
    # (0.8, not 0.75: the pool's mean is 0.78, and a host taken below it only pushes others
    # up; h2 and h3 end near 0.86, above nearfull but below full and below h4's 0.95)
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.8}


def test_a_lowering_never_pushes_a_host_past_its_full_ratio():
    """What a lowered host sheds lands where placement puts its copies, whatever their
    room: h3, at its own nearfull of 0.93, would take its part of what h4 sheds at 0.8
    (h4 holds three chunks in four and is taken out of 8% of them; each other host's
    count of chunks grows 2.8%) and end at 0.956. (The pool has room enough in total:
    that alone let it through before.)"""
    st = stats({"h1": 0.2, "h2": 0.2, "h3": 0.93, "h4": 0.9})
    st["h3"]["nearfull_ratio"] = 0.93
    assert wanted_weights(cmap(), st, 3) == {}
    st["h3"]["used"] = int(0.85 * GiB)  # 0.874 after: below its full_ratio (0.95)
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.8}
    # below a full_ratio of 1.0, but past its nearfull and fuller than h4 was: still not
    st["h3"].update(used=int(0.92 * GiB), full_ratio=1.0)
    assert wanted_weights(cmap(), st, 3) == {}


def test_a_host_about_as_full_as_the_pool_is_not_lowered():
    """A pool 0.87 full on average: h4 at 0.9 is above nearfull, but lowered, its chunks
    would only fill the others (Ceph reweights only what is well above the average)."""
    st = stats({"h1": 0.86, "h2": 0.86, "h3": 0.86, "h4": 0.9})
    assert wanted_weights(cmap(), st, 3) == {}
    st = stats({"h1": 0.8, "h2": 0.8, "h3": 0.8, "h4": 0.9})  # the mean 0.825: 0.075 above
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.9}  # (to the mean, 0.92 rounded down)


def test_the_hosts_above_nearfull_are_lowered_together():
    """h3 is above nearfull too. Lowering h4 and h5 alone (which the room below nearfull
    on h1 and h2, 0.55, once allowed) put part of what they shed on h3, past its full
    ratio (0.95 on the placement; about 1.0 by the estimate by weight of before); lowered
    with them it is no worse off, and what the three shed that reaches h1 and h2 fits in
    that room (h1 ends at 0.81, h3 at 0.88)."""
    st = stats({"h1": 0.75, "h2": 0.4, "h3": 0.9, "h4": 0.95, "h5": 0.95}, nearfull=0.85)
    assert wanted_weights(cmap(n=5), st, 3) == {"h3": 0.85, "h4": 0.8, "h5": 0.8}
    # With h1 fuller, the three lowered to 0.85 (aimed at the mean, 0.81) put it at 0.90:
    # past nearfull, but below full and below the 0.95 of h4 and h5. (The estimate by
    # weight said 0.955 and lowered nothing; on the placement a host holding three chunks
    # in five sheds less than its factor takes off its weight, 4% at 0.85.)
    st = stats({"h1": 0.85, "h2": 0.4, "h3": 0.9, "h4": 0.95, "h5": 0.95}, nearfull=0.85)
    assert wanted_weights(cmap(n=5), st, 3) == {"h3": 0.85, "h4": 0.85, "h5": 0.85}
    # With a full ratio of 0.87 on h1, the three would push it past (0.90): h3 is left
    # out; h4 and h5 alone still push h1 past (0.88), and h4 alone pushes h5 past (0.97):
    # nothing is lowered
    st["h1"]["full_ratio"] = 0.87
    assert wanted_weights(cmap(n=5), st, 3) == {}


def test_no_more_hosts_than_replicas_no_reweight():
    st = stats({"h1": 0.2, "h2": 0.2, "h3": 0.95})
    assert wanted_weights(cmap(n=3), st, 3) == {}
    assert wanted_weights(cmap(n=3), st, 2) == {"h3": 0.75}


def test_a_host_without_stats_keeps_its_factor():
    st = stats({"h1": 0.2, "h2": 0.2, "h3": 0.2})  # h4 down: its stats expired
    assert wanted_weights(cmap({"h4": 0.5}), st, 3) == {"h4": 0.5}
    assert wanted_weights(cmap({"h9": 0.5}), st, 3) == {}  # a host out of the set: dropped


def test_raised_one_step_only_with_room_to_spare():
    base = {"h1": 0.7, "h2": 0.7, "h3": 0.7}
    # 0.61 * (0.75 / 0.6) = 0.76 is not below 0.85 - 0.1: stays
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.61}), 3) == {"h4": 0.6}
    # 0.5 * 1.25 = 0.625 < 0.75, and below the mean (0.65): one step up
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.5}), 3) == {"h4": 0.75}
    # from 0.8 the step reaches 1: the factor goes
    assert wanted_weights(cmap({"h4": 0.8}), stats({**base, "h4": 0.3}), 3) == {}


def test_a_lowered_host_fuller_than_the_pool_is_not_raised():
    """CI run of c374d8c: a host lowered to 0.6 while a writer filled the pool shed its
    chunks to below the raise threshold, was raised to 0.75 (it had room below nearfull),
    filled again as the writer went on and was lowered again (1.0, 0.8, 0.6, 0.75, 0.6).
    A raise now also needs the host no fuller than the pool on average after it (Ceph's
    reweight-by-utilization raises only what is below the average): a host that a writer
    fills faster than the pool stays lowered while it is fuller."""
    base = {"h1": 0.3, "h2": 0.3, "h3": 0.3}
    # 0.5 * 1.25 = 0.625 < 0.75, but the pool is 0.35 full on average: stays
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.5}), 3) == {"h4": 0.6}
    # the pool fills, h4 (lowered) slower: once 0.625 is no more than the mean, one step up
    fuller = {"h1": 0.72, "h2": 0.72, "h3": 0.72}
    assert wanted_weights(cmap({"h4": 0.6}), stats({**fuller, "h4": 0.5}), 3) == {"h4": 0.75}
    # an empty pool but h4: it stays lowered, it is the fullest
    assert wanted_weights(cmap({"h4": 0.6}), stats({"h1": 0.0, "h2": 0.0, "h3": 0.0, "h4": 0.1}), 3) == {"h4": 0.6}
    # a pool empty everywhere: the factors climb back
    assert wanted_weights(cmap({"h4": 0.6}), stats(dict.fromkeys(("h1", "h2", "h3", "h4"), 0.0)), 3) == {"h4": 0.75}


def test_a_host_is_raised_on_what_it_holds_and_what_its_stale_copies_may_still_take():
    """CI run of 3b5d0e8: a full host refused writes (recorded stale), was lowered, its
    usage fell below the raise threshold, it was raised, its resyncs then took the slots
    they lacked, and it was lowered again (0.8, 0.6, 0.75, 0.6)."""
    base = {"h1": 0.7, "h2": 0.7, "h3": 0.7}
    # at 0.5: 0.5 * 1.25 = 0.625 < 0.75 (and the mean, 0.65), one step up
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.5}), 3) == {"h4": 0.75}
    # owing 0.12 of its capacity to resyncs: (0.5 + 0.12) * 1.25 = 0.775, it stays
    owed = {"h4": int(0.12 * GiB)}
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.5}), 3, owed=owed) == {"h4": 0.6}
    # what other hosts owe does not hold h4 back; lowering ignores it (usage is over already)
    assert wanted_weights(cmap({"h4": 0.6}), stats({**base, "h4": 0.5}), 3,
                          owed={"h1": GiB}) == {"h4": 0.75}


@pytest.mark.parametrize("demand", [0.9, 1.3, 2.5, 6.0])
def test_converges_without_flapping(demand):
    """A host whose usage at full weight would be `demand` of its capacity, and whose usage
    follows its weight (share proportional to weight, the model's own assumption): the
    factor only goes down, settles below nearfull, and then stays."""
    factors: dict[str, float] = {}
    seen = []
    for _ in range(30):
        f = factors.get("h4", 1.0)
        used = min(1.0, demand * f)
        seen.append(f)
        factors = wanted_weights(cmap(factors=factors), stats({"h1": 0.3, "h2": 0.3, "h3": 0.3, "h4": used}), 3)
    assert seen == sorted(seen, reverse=True), seen  # never raised again
    final = factors.get("h4", 1.0)
    assert demand * final <= 0.85 or final == WEIGHT_MIN
    assert seen[-5:] == [final] * 5


def test_copies_pending_free_do_not_count():
    """Copies the data set places elsewhere (published as `misplaced`, measured on this
    data set) are as good as freed: a host that the last step brought below nearfull is
    not lowered again while they wait for the grace."""
    st = stats({"h1": 0.3, "h2": 0.3, "h3": 0.3, "h4": 0.9})
    st["h4"].update(misplaced=int(0.2 * GiB), misplaced_gen=1)
    assert wanted_weights(cmap({"h4": 0.8}), st, 3) == {"h4": 0.8}
    st["h4"]["misplaced_gen"] = 0  # measured on an older data set: the usage counts whole
    assert wanted_weights(cmap({"h4": 0.8}), st, 3) == {"h4": 0.6}
    # and they leave room on the others: 0.95 - 0.2 on each of h1..h3 is well below nearfull
    # (0.8: the mean of what the hosts keep is 0.8, and h4 aims no lower)
    st = stats({"h1": 0.95, "h2": 0.95, "h3": 0.95, "h4": 0.95})
    for h in ("h1", "h2", "h3"):
        st[h].update(misplaced=int(0.2 * GiB), misplaced_gen=1)
    assert wanted_weights(cmap(), st, 3) == {"h4": 0.8}


@pytest.mark.parametrize("demand", [0.9, 1.3, 2.5, 6.0])
def test_back_to_back_steps_do_not_overshoot(demand):
    """Steps one right after another (no hold: the moved copies not freed yet) reach the
    factor that steps with every copy freed reach, because the stats publish the copies
    pending free; counting them as held would take the factor on down."""
    def run(freed: bool) -> list[float]:
        factors: dict[str, float] = {}
        held = 0.0  # what h4 holds: what it keeps plus, unless freed, what it gave away
        seen = []
        for _ in range(30):
            f = factors.get("h4", 1.0)
            keep = min(1.0, demand * f)
            held = keep if freed else max(held, keep)
            st = stats({"h1": 0.3, "h2": 0.3, "h3": 0.3, "h4": held})
            st["h4"].update(misplaced=int((held - keep) * GiB), misplaced_gen=1)
            seen.append(f)
            factors = wanted_weights(cmap(factors=factors), st, 3)
        return seen
    seen = run(freed=False)
    assert seen == run(freed=True)
    assert seen == sorted(seen, reverse=True) and seen[-5:] == [seen[-1]] * 5


def test_a_raise_reckons_with_the_chunks_it_would_place_when_they_grow_faster():
    """On few chunks the count a raise puts back can grow faster than the weight (it is
    the expected share that grows at most in proportion): `growth` from the placement."""
    st = stats({"h1": 0.8, "h2": 0.8, "h3": 0.8, "h4": 0.56})  # the mean 0.74
    assert wanted_weights(cmap({"h4": 0.6}), st, 3) == {"h4": 0.75}  # 0.56 * 1.25 = 0.7 < 0.74
    assert wanted_weights(cmap({"h4": 0.6}), st, 3, {"h4": 1.4}) == {"h4": 0.6}  # 0.78
    assert wanted_weights(cmap({"h4": 0.6}), st, 3, {"h4": 1.0}) == {"h4": 0.75}  # never laxer


def test_raising_when_usage_shrinks_stops_short_of_nearfull():
    """Data deleted: the factor climbs back while the projected usage stays
    REWEIGHT_MARGIN below nearfull and no fuller than the pool on average, and never
    further."""
    demand = 0.7  # usage the host would have at weight 1
    for others, end in ((0.75, 1.0), (0.3, 0.35)):
        factors = {"h4": 0.1}
        for _ in range(30):
            f = factors.get("h4", 1.0)
            factors = wanted_weights(cmap(factors=factors), stats(
                {"h1": others, "h2": others, "h3": others, "h4": demand * f}), 3)
        final = factors.get("h4", 1.0)
        assert demand * final < 0.85 - REWEIGHT_MARGIN + 1e-9
        assert demand * final <= (3 * others + demand * final) / 4
        # 0.7 at full weight is below 0.75 and the mean: all the way back; beside hosts
        # 0.3 full, up to 0.35 (0.245; the next step, 0.45, would put it at 0.315, above
        # the mean of 0.286)
        assert final == end


def placed_stats(m: ClusterMap, chunks: int, replicas: int, slots: int) -> dict[str, dict]:
    """The stats of hosts of `slots` chunks each that hold what the real placement of `m`
    puts on them (every moved copy freed), of `chunks` chunks of `replicas` copies."""
    view = ClusterView(m)
    held = dict.fromkeys(m.data_set, 0)
    for i in range(chunks):
        for h in view.replicas("l0", i, replicas):
            held[h] += 1
    return {h: {"capacity": slots * MiB, "used": n * MiB, "nearfull_ratio": 0.85, "full_ratio": 0.95}
            for h, n in held.items()}


def controller_steps(n: int, replicas: int, fill: float, slots: int, rounds: int):
    """Reweight rounds as the controller takes them, each on the usage the last one left
    (placed by the real placement): [(factors, {host: used / capacity})]."""
    chunks = int(fill * n * slots / replicas)
    factors: dict[str, float] = {}
    seen = []
    for _ in range(rounds):
        m = cmap(factors, n=n)
        st = placed_stats(m, chunks, replicas, slots)
        seen.append((factors, {h: round(s["used"] / s["capacity"], 3) for h, s in st.items()}))
        want = wanted_weights(m, st, replicas)
        if want == factors:
            break
        factors = want
    return seen


@pytest.mark.parametrize("fill", [0.7, 0.78, 0.81, 0.84, 0.88])
@pytest.mark.parametrize("hosts,replicas", [(5, 1), (5, 3), (8, 1), (8, 2), (10, 3)])
def test_a_pool_nearly_full_on_average_settles_without_pushing_a_host_past_full(hosts, replicas, fill):
    """Review: 8 hosts, the pool about 80% full, placement putting a few of them past
    nearfull (0.85). Lowering one spread what it shed over every host by weight, those
    near nearfull too, which were lowered in turn; nothing goes back up in a pool that
    full (a raise needs the host well below nearfull), so the factors ran down toward
    the floor over tens of changes of data set, all those moves for nothing, and on the
    way hosts were pushed past full_ratio (0.95). Now: a few changes, no host that was
    below full_ratio goes past it, and the fullest ends no fuller."""
    seen = controller_steps(hosts, replicas, fill, 400, 30)
    first = seen[0][1]
    for step, (factors, used) in enumerate(seen[1:], 1):
        past = {h: u for h, u in used.items() if u > 0.95 and u > first[h]}
        assert not past, f"step {step}: {past} past full_ratio, factors {factors}"
    assert len(seen) <= 4, f"still changing after {len(seen)} steps: {seen[-1][0]}"
    assert max(seen[-1][1].values()) <= max(first.values())


def zoned_steps(hosts: list[tuple[str, str, int]], replicas: int, fill: float, rounds: int):
    """controller_steps on a pool of `hosts` ((id, zone, slots): a pod each, a capacity of
    `slots` chunks), filled to `fill` on average."""
    chunks = int(fill * sum(s for *_, s in hosts) / replicas)
    factors: dict[str, float] = {}
    seen = []
    for _ in range(rounds):
        m = ClusterMap(1, tuple(HostRecord(h, f"{h}:1", f"{h}:2", zone=z, pod=f"p{h}",
                                           capacity=s * MiB) for h, z, s in hosts),
                       tuple(h for h, *_ in hosts), None, 1, tuple(sorted(factors.items())))
        view = ClusterView(m)
        held = dict.fromkeys(m.data_set, 0)
        for i in range(chunks):
            for h in view.replicas("l0", i, replicas):
                held[h] += 1
        st = {h: {"capacity": s * MiB, "used": held[h] * MiB, "nearfull_ratio": 0.85,
                  "full_ratio": 0.95} for h, _, s in hosts}
        seen.append((factors, {h: round(held[h] / s, 3) for h, _, s in hosts}))
        want = wanted_weights(m, st, replicas)
        if want == factors:
            break
        factors = want
    return seen


@pytest.mark.parametrize("fill", [0.6, 0.65])
def test_what_a_lowered_host_sheds_stays_in_its_zone_when_every_zone_holds_a_copy(fill):
    """Review: three zones, three replicas: every zone holds a copy of every chunk, so the
    zone of two smaller hosts (c1, c2) fills faster than the pool. What a host of it sheds
    can only go to the other host of its zone, where the estimate spread it over every
    host by weight: lowering c2 put c1 over nearfull, then both were lowered, round after
    round (lowered together they move nothing), down to the minimum over ten changes,
    and on the way c1 went past full (1.07 at 0.6). Weights cannot relieve that zone
    (its hosts hold their share of every chunk): nothing is lowered."""
    hosts = [("a1", "za", 400), ("a2", "za", 400), ("b1", "zb", 400), ("b2", "zb", 400),
             ("c1", "zc", 250), ("c2", "zc", 250)]
    seen = zoned_steps(hosts, 3, fill, 20)
    first = seen[0][1]
    assert max(first.values()) > 0.85  # (c2 is over nearfull)
    for step, (factors, used) in enumerate(seen[1:], 1):
        past = {h: u for h, u in used.items() if u > 0.95 and u > first[h]}
        assert not past, f"step {step}: {past} past full_ratio, factors {factors}"
    assert len(seen) <= 4, f"still changing after {len(seen)} steps: {seen[-1][0]}"
    assert max(seen[-1][1].values()) <= max(first.values())


def test_a_host_with_more_zones_than_replicas_still_sheds_over_the_pool():
    """Five zones, three replicas: a copy a host sheds goes to its zone's other host or to
    a zone with no copy of the chunk. The pool has room: e1 and e2, the zone of small
    hosts, are lowered and end below nearfull."""
    hosts = [(f"{z}{i}", f"z{z}", 400) for z in "abcd" for i in (1, 2)]
    hosts += [("e1", "ze", 150), ("e2", "ze", 150)]
    seen = zoned_steps(hosts, 3, 0.75, 20)
    first, (factors, last) = seen[0][1], seen[-1]
    assert first["e1"] > 0.85 and first["e2"] > 0.85
    assert factors.keys() == {"e1", "e2"} and max(last.values()) < 0.85
    assert len(seen) <= 4



@pytest.mark.parametrize("hosts,replicas,fill", [
    ([("h0", "z0", 400), ("h1", "z1", 100), ("h2", "z2", 150), ("h3", "z3", 150), ("h4", "z0", 100)], 3, 0.55),
    ([("h0", "z0", 200), ("h1", "z1", 250), ("h2", "z2", 400), ("h3", "z3", 250), ("h4", "z2", 150)], 2, 0.83),
])
def test_what_a_lowered_host_sheds_is_projected_from_the_placement(hosts, replicas, fill):
    """Review: the estimate spread what a lowered host sheds over the hosts of its zone, and
    over the others (more zones than replicas) by weight. With few competitors that is
    wrong. Three replicas over four zones, z0 with 500 of the 900 slots: z0 holds a copy of
    nearly every chunk, and what h1 sheds can only reach h2 and h3 (which the estimate
    gave a third of it, by weight); lowering one of z1-z3 pushed the next over, and the
    factors ran down to 0.05 over 20 changes. Two replicas over four zones at 0.83 (h0 at
    1.06): lowering h0 and h3 pushed h1 to 0.956, and six changes followed. Projected from
    the placement of sample chunks under the factors planned: h0 alone is lowered, at
    once; in the first pool z1-z3 trade what they hold over a few changes (they hold two
    copies of every chunk between them, 0.82 of their slots), and settle."""
    seen = zoned_steps(hosts, replicas, fill, 20)
    first = seen[0][1]
    assert max(first.values()) > 0.95  # (a host past full, the others near nearfull)
    for step, (factors, used) in enumerate(seen[1:], 1):
        past = {h: u for h, u in used.items() if u > 0.95 and u > first[h]}
        assert not past, f"step {step}: {past} past full_ratio, factors {factors}"
    assert len(seen) <= 5, f"still changing after {len(seen)} steps: {seen[-1][0]}"
    assert max(seen[-1][1].values()) <= max(first.values())

# --- the controller step against the in-process registry ---------------------------------


class Async:
    """The registry's calls awaited (as blockd.service.AsyncRegistry does in a thread)."""

    def __init__(self, reg):
        self.sync = reg

    def __getattr__(self, name):
        fn = getattr(self.sync, name)

        async def call(*a, **k):
            return fn(*a, **k)
        return call


def pool(used4: float, rev: int = WEIGHTS_REV):
    reg = open_registry(f"memory://migration-{next(_n)}")
    for i in range(1, 5):
        reg.register_host(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB,
                                     peer_rev=rev), 60)
    reg.set_data_set(0, ["h1", "h2", "h3", "h4"], None)
    rec = new_volume("v", 64 * MiB, replicas=3, lineage="l0", head=1, now=0.0)
    reg.create_volume("v", rec.to_dict())
    for h, u in {"h1": 0.3, "h2": 0.3, "h3": 0.3, "h4": used4}.items():
        reg.publish_stats(h, {"capacity": GiB, "used": int(u * GiB), "nearfull_ratio": 0.85}, 60)
    return reg


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def mover(reg, clock, hold=10.0) -> DataSetMover:
    m = DataSetMover("h1", None, None, Async(reg), grace=5.0, reweight_hold=hold)
    m.clock = clock
    return m


def test_controller_reweights_a_settled_data_set_after_the_hold():
    reg = pool(0.9)
    clock = Clock()
    m = mover(reg, clock)
    before = reg.cluster_map()
    assert trio.run(m.control_once) == before  # settled just now: wait
    clock.t = 9.9
    assert trio.run(m.control_once).mgen == before.mgen
    clock.t = 10.0
    got = trio.run(m.control_once)
    assert got.mgen == before.mgen + 1 and got.migrating
    assert got.data == got.prev == before.data
    assert got.factors == {"h4": 0.8} and got.prev_factors == {}
    # while the change runs, no other factor change; it completes as any other
    for h in ("h1", "h2", "h3", "h4"):
        reg.mark_scanned(h, got.mgen)
    done = trio.run(m.control_once)
    assert not done.migrating and done.factors == {"h4": 0.8} and done.mgen == got.mgen + 1


def test_controller_does_not_reweight_during_an_upgrade():
    reg = pool(0.9, rev=WEIGHTS_REV - 1)
    clock = Clock()
    m = mover(reg, clock, hold=0.0)
    assert not trio.run(m.control_once).migrating


def test_a_host_leaving_during_a_reweight_keeps_the_factors_of_both_sets():
    reg = pool(0.9)
    m = mover(reg, Clock(), hold=0.0)
    got = trio.run(m.control_once)
    assert got.factors == {"h4": 0.8}
    reg.set_host_state("h2", "draining")  # h2 leaves the data set mid-change
    after = trio.run(m.control_once)
    assert after.data == ("h1", "h3", "h4") and after.prev == ("h1", "h2", "h3", "h4")
    assert after.factors == {"h4": 0.8} and after.prev_factors == {}


def test_a_reweight_is_not_taken_for_a_cancelled_change():
    """Same hosts in prev and target but other factors: a change, not a return."""
    reg = pool(0.9)
    m = mover(reg, Clock(), hold=0.0)
    got = trio.run(m.control_once)
    again = trio.run(m.control_once)  # nothing scanned yet: still under way
    assert again.migrating and again.mgen == got.mgen and again.factors == {"h4": 0.8}


def publish_measured(reg, gen: int) -> None:
    """Every host's stats as measured on the data set of generation `gen`."""
    for h, st in reg.host_stats().items():
        reg.publish_stats(h, {**st, "misplaced": 0, "misplaced_gen": gen}, 60)


def test_controller_steps_without_the_hold_once_stats_are_measured_on_the_set():
    reg = pool(0.9)
    clock = Clock()
    m = mover(reg, clock)
    before = reg.cluster_map()
    publish_measured(reg, before.mgen - 1)  # measured on an older data set: the hold applies
    assert trio.run(m.control_once) == before
    publish_measured(reg, before.mgen)
    got = trio.run(m.control_once)  # no time has passed
    assert got.mgen == before.mgen + 1 and got.factors == {"h4": 0.8}


def test_controller_waits_for_every_host_with_stats():
    reg = pool(0.9)
    m = mover(reg, Clock())
    gen = reg.cluster_map().mgen
    publish_measured(reg, gen)
    reg.publish_stats("h2", {**reg.host_stats()["h2"], "misplaced_gen": gen - 1}, 60)
    assert not trio.run(m.control_once).migrating  # h2 has not measured this set yet
    publish_measured(reg, gen)
    assert trio.run(m.control_once).migrating


def placed_store(view: ClusterView, host: str, chunks: int, cs: int = MiB,
                 capacity: int = GiB) -> MemoryChunkStore:
    """A store holding the chunks that `view` places on `host` (lineage l0, 3 replicas)."""
    store = MemoryChunkStore(capacity=capacity)
    for i in range(chunks):
        if host in view.replicas("l0", i, 3):
            store.write(ChunkKey("l0", i, 1), 0, b"x", chunk_size=cs)
    return store


def test_mover_measures_its_misplaced_copies_once_per_settled_set():
    reg = pool(0.9)
    old = reg.cluster_map()
    store = placed_store(ClusterView(old), "h4", 200)
    lowered = ClusterMap(old.epoch + 1, old.hosts, old.data, None, old.mgen + 2, (("h4", 0.5),))
    view = ClusterView(lowered)
    m = DataSetMover("h4", store, view, Async(reg))
    assert trio.run(m.measure_misplaced)
    gone = sum("h4" not in view.replicas("l0", i, 3) for i in range(200) if store.info(ChunkKey("l0", i, 1)))
    assert gone > 0 and m.misplaced == gone * MiB and m.misplaced_gen == lowered.mgen
    assert not trio.run(m.measure_misplaced)  # once per data set
    view.set_map(ClusterMap(lowered.epoch + 1, old.hosts, old.data, old.data, lowered.mgen + 1,
                            (("h4", 0.25),), (("h4", 0.5),)))
    assert not trio.run(m.measure_misplaced)  # a change under way: nothing settled to measure
    assert m.misplaced_gen == lowered.mgen


class HeldEverywhere:
    """A peer pool whose every host holds every generation asked about."""

    async def call(self, address, msg):
        return type("Gens", (), {"gens": (1,)})()


def test_freeing_a_misplaced_copy_takes_it_off_the_published_bytes_at_once():
    reg = pool(0.9)
    old = reg.cluster_map()
    store = placed_store(ClusterView(old), "h4", 200)
    lowered = ClusterMap(old.epoch + 1, old.hosts, old.data, None, old.mgen + 2, (("h4", 0.5),))
    m = DataSetMover("h4", store, ClusterView(lowered), Async(reg), HeldEverywhere(), grace=0.0)
    used = store.stats().used
    trio.run(m.measure_misplaced)
    pending = m.misplaced
    freed = trio.run(m.collect_misplaced)
    assert freed * MiB == pending > 0 and m.misplaced == 0
    assert store.stats().used == used - pending and m.misplaced_gen == lowered.mgen


def test_controller_does_not_raise_a_host_whose_placed_chunks_would_grow_too_much():
    """64 chunks of lineage g89: h4 at factor 0.6 is placed on 26 of them, at 0.75 on 36
    (x1.38, not x1.25). At 0.56 of its capacity it stays at 0.6: at 0.75 it would be
    past nearfull - margin. The weight-proportional model would raise it, and the next
    step lower it again."""
    reg = open_registry(f"memory://migration-{next(_n)}")
    for i in range(1, 5):
        reg.register_host(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB,
                                     peer_rev=WEIGHTS_REV), 60)
    gen = reg.set_data_set(0, ["h1", "h2", "h3", "h4"], None, {"h4": 0.6}).mgen
    rec = new_volume("v", 64 * MiB, replicas=3, lineage="g89", head=1, now=0.0, chunk_size=MiB)
    reg.create_volume("v", rec.to_dict())
    for h, u in {"h1": 0.84, "h2": 0.84, "h3": 0.84, "h4": 0.56}.items():  # the mean 0.77
        reg.publish_stats(h, {"capacity": GiB, "used": int(u * GiB), "nearfull_ratio": 0.85,
                              "misplaced": 0, "misplaced_gen": gen}, 60)
    m = mover(reg, Clock(), hold=0.0)
    assert trio.run(m.control_once).factors == {"h4": 0.6}
    reg.publish_stats("h4", {"capacity": GiB, "used": int(0.53 * GiB), "nearfull_ratio": 0.85,
                             "misplaced": 0, "misplaced_gen": gen}, 60)
    # its 26 chunks recorded stale on it (refused writes, say): it may still take 26 MiB,
    # and (0.53 GiB + 26 MiB) * 1.38 > 0.75 GiB: not raised while they are owed
    from replicator.gateway import ClusterView
    mine = [i for i in range(64) if "h4" in ClusterView(reg.cluster_map()).replicas("g89", i, 3)]
    assert len(mine) == 26
    for i in mine:
        reg.mark_stale("g89", i, ["h4"], 1)
    assert trio.run(m.control_once).factors == {"h4": 0.6}
    for i in mine:
        reg.clear_stale("g89", i, "h4")
    assert trio.run(m.control_once).factors == {"h4": 0.75}  # 0.53 * 1.38 = 0.73: raised


# --- placement inputs recorded with the data set (ClusterMap.places) -----------------------


def registered_again(reg, host_id: str, **change):
    """The host restarted with another --capacity, --zone or --pod."""
    h = reg.cluster_map().host(host_id)
    return reg.register_host(dataclasses.replace(h, **change), 60)


def test_a_host_registered_with_another_zone_changes_the_data_set_not_the_placement():
    reg = pool(0.3)
    before = reg.cluster_map()
    after = registered_again(reg, "h4", zone="z9", pod="p9")
    assert after.epoch > before.epoch and after.drifted() == ("h4",)
    old, now = ClusterView(before), ClusterView(after)
    assert all(now.replicas("l0", i, 3) == old.replicas("l0", i, 3) for i in range(200))
    m = mover(reg, Clock(), hold=0.0)
    got = trio.run(m.control_once)
    assert got.migrating and got.data == got.prev == before.data and got.mgen == before.mgen + 1
    assert got.placed(leaving=True) == before.placed()
    assert got.placed()["h4"] == (GiB, "z9", "p9") and not got.drifted()
    assert ClusterView(got).replicas("l0", 0, 3) == old.replicas("l0", 0, 3)  # reads: prev
    for h in ("h1", "h2", "h3", "h4"):
        reg.mark_scanned(h, got.mgen)
    done = trio.run(m.control_once)
    assert not done.migrating and done.placed()["h4"] == (GiB, "z9", "p9")


def test_a_new_capacity_during_a_change_restarts_it_from_the_same_prev():
    reg = pool(0.3)
    before = reg.cluster_map()
    m = mover(reg, Clock(), hold=0.0)
    reg.set_host_state("h2", "draining")
    drain = trio.run(m.control_once)
    assert drain.data == ("h1", "h3", "h4") and drain.prev == before.data
    registered_again(reg, "h4", capacity=2 * GiB)
    again = trio.run(m.control_once)
    assert again.mgen == drain.mgen + 1 and again.prev == before.data and again.data == drain.data
    assert again.placed(leaving=True) == before.placed()  # the complete copies: where they were
    assert again.placed()["h4"][0] == 2 * GiB


def test_a_capacity_put_back_cancels_its_change():
    reg = pool(0.3)
    before = reg.cluster_map()
    m = mover(reg, Clock(), hold=0.0)
    registered_again(reg, "h3", capacity=3 * GiB)
    assert trio.run(m.control_once).migrating
    registered_again(reg, "h3", capacity=GiB)
    back = trio.run(m.control_once)
    assert not back.migrating and back.placed() == before.placed()


# --- down hosts a change waits for (sole_holders) -----------------------------------------


def vol(replicas: int, lineage: str) -> dict:
    return {"lineage": lineage, "replicas": replicas, "size": 256 * MiB, "chunk_size": MiB}


def test_a_change_waits_for_a_down_host_only_when_it_alone_holds_a_chunk_that_moves():
    """h5 joins h1-h4 while h2 is down and has not scanned. Its replicas=1 chunks that move
    to h5 have no other copy, so no up host's scan records h5 stale for them: the change
    waits for h2. A replicas=2 chunk has its other copy on an up host, whose scan does;
    only with both its copies down does it wait. A drain of h4 moves none of h2's
    chunks: it does not wait."""
    join = cmap(n=5, prev=("h1", "h2", "h3", "h4"))
    assert sole_holders(join, [vol(1, "a")], frozenset({"h2"})) == ["h2"]
    assert sole_holders(join, [vol(2, "b")], frozenset({"h2"})) == []
    assert sole_holders(join, [vol(2, "b")], frozenset({"h2", "h3"})) == ["h2", "h3"]
    assert sole_holders(join, [vol(3, "c")], frozenset({"h2", "h3"})) == []
    assert sole_holders(join, [vol(1, "a")], frozenset()) == []
    drain = ClusterMap(1, join.hosts, ("h1", "h2", "h3"), ("h1", "h2", "h3", "h4"), 1)
    assert sole_holders(drain, [vol(1, "a")], frozenset({"h2"})) == []


def test_sole_holders_agrees_with_placing_every_chunk():
    """sole_holders skips chunks whose first replica is outside `down` (Placement.first_in);
    its answer is that of placing every chunk whole, for joins, drains and reweights with
    one or more hosts down, zones or not."""
    rnd = random.Random(7)
    for case in range(400):  # (small volumes: one chunk more or less changes the answer)
        n_hosts = rnd.randint(3, 9)
        hosts = tuple(HostRecord(f"h{i}", "127.0.0.1:1", "127.0.0.1:2", zone=f"z{i % rnd.choice((1, 3))}",
                                 capacity=rnd.choice((1, 2, 4)) << 30) for i in range(n_hosts))
        ids = [h.id for h in hosts]
        prev = tuple(sorted(rnd.sample(ids, rnd.randint(2, n_hosts))))
        data = tuple(sorted(rnd.sample(ids, rnd.randint(2, n_hosts))))
        m = ClusterMap(1, hosts, data, prev, 1)
        down = frozenset(rnd.sample(prev, rnd.randint(1, min(3, len(prev)))))
        vols = [{"lineage": f"lin{case}-{j}", "replicas": rnd.randint(1, 3),
                 "size": rnd.randint(1, 6) * MiB, "chunk_size": MiB} for j in range(2)]
        view = ClusterView(m)
        want: set[str] = set()
        for v in vols:
            for i in range(v["size"] // MiB):
                old = view.replicas(v["lineage"], i, v["replicas"])
                if down.issuperset(old) and view.joining(v["lineage"], i, v["replicas"]):
                    want.update(old)
        assert sole_holders(m, vols, down) == sorted(want), (case, m, down)


def test_the_controller_does_not_complete_a_change_a_down_sole_holder_has_not_scanned():
    reg = open_registry(f"memory://migration-{next(_n)}")
    for i in range(1, 5):
        reg.register_host(HostRecord(f"h{i}", f"h{i}:1", f"h{i}:2", pod=f"p{i}", capacity=GiB), 60)
    reg.set_data_set(0, ["h1", "h2", "h3"], None)
    reg.create_volume("v", new_volume("v", 64 * MiB, replicas=1, lineage="l0", head=1, now=0.0).to_dict())
    reg.kv.txn([], [Delete(P_ALIVE + b"h3")])  # h3 is down
    m = mover(reg, Clock())
    got = trio.run(m.control_once)
    assert got.prev == ("h1", "h2", "h3") and got.data == ("h1", "h2", "h3", "h4")
    for h in ("h1", "h2", "h4"):
        reg.mark_scanned(h, got.mgen)
    assert trio.run(m.control_once).migrating  # h3 alone holds chunks that move to h4
    reg.register_host(HostRecord("h3", "h3:1", "h3:2", pod="p3", capacity=GiB), 60)
    assert trio.run(m.control_once).migrating  # back, not scanned yet
    reg.mark_scanned("h3", got.mgen)
    assert not trio.run(m.control_once).migrating


# --- down is not out (down_out_interval) --------------------------------------------------


def down(reg, host: str) -> None:
    reg.kv.txn([], [Delete(P_ALIVE + host.encode())])  # its alive key expired


def back(reg, host: str) -> None:
    reg.register_host(HostRecord(host, f"{host}:1", f"{host}:2", pod=f"p{host[1:]}", capacity=GiB,
                                 peer_rev=WEIGHTS_REV), 60)


def five_hosts():
    reg = open_registry(f"memory://migration-{next(_n)}")
    for i in range(1, 6):
        back(reg, f"h{i}")
    reg.set_data_set(0, [f"h{i}" for i in range(1, 6)], None)
    reg.create_volume("v", new_volume("v", 64 * MiB, replicas=3, lineage="l0", head=1, now=0.0).to_dict())
    return reg


def controller(reg, clock, interval: float, host: str = "h1") -> DataSetMover:
    m = DataSetMover(host, None, None, Async(reg), grace=5.0, reweight_hold=10.0,
                     down_out_interval=interval)
    m.clock = clock
    return m


def step(m: DataSetMover, clock: Clock, t: float) -> ClusterMap:
    """The controller's steps until time `t`, 10 s apart at most (blockd takes one a second;
    a controller that has not looked for longer than DOWN_LOOK_GAP counts again)."""
    while clock.t + 10.0 < t:
        clock.t += 10.0
        trio.run(m.control_once)
    clock.t = t
    return trio.run(m.control_once)


def test_a_down_host_stays_in_the_data_set_until_down_for_the_interval():
    """4 hosts, replicas 3: before, h3 went out of the data set as soon as it was down."""
    reg = pool(0.3)
    before = reg.cluster_map()
    clock = Clock()
    m = controller(reg, clock, 60.0)
    down(reg, "h3")
    for t in (0.0, 1.0, 30.0, 59.9):
        got = step(m, clock, t)
        assert got.mgen == before.mgen and not got.migrating and "h3" in got.data, t
    assert m.down_out()["interval"] == 60.0 and set(m.down_out()["since"]) == {"h3"}
    out = step(m, clock, 60.0)
    assert out.migrating and out.data == ("h1", "h2", "h4") and out.prev == before.data


def test_a_host_back_within_the_interval_moves_nothing_and_starts_its_count_again():
    reg = pool(0.3)
    before = reg.cluster_map()
    clock = Clock()
    m = controller(reg, clock, 60.0)
    down(reg, "h3")
    step(m, clock, 0.0)
    back(reg, "h3")
    assert step(m, clock, 50.0).mgen == before.mgen
    assert m.down_out()["since"] == {}
    down(reg, "h3")  # down again: counted from now, not from t=0
    assert step(m, clock, 55.0).mgen == before.mgen
    assert not step(m, clock, 114.9).migrating
    assert step(m, clock, 115.0).data == ("h1", "h2", "h4")


def test_a_drained_down_host_leaves_at_once():
    """The map shows a drained host that is down as down: the drain still counts."""
    reg = pool(0.3)
    clock = Clock()
    m = controller(reg, clock, 600.0)
    down(reg, "h3")
    assert not step(m, clock, 0.0).migrating
    reg.set_host_state("h3", "draining")
    assert reg.cluster_map().host("h3").state == "down" and reg.draining() == {"h3"}
    got = step(m, clock, 1.0)
    assert got.migrating and got.data == ("h1", "h2", "h4")


def test_interval_zero_takes_a_down_host_out_at_once():
    reg = pool(0.3)
    clock = Clock()
    m = controller(reg, clock, 0.0)
    down(reg, "h3")
    assert step(m, clock, 0.0).data == ("h1", "h2", "h4")


def test_the_replica_rules_keep_a_down_host_whatever_the_interval():
    """replicas=1: its only copy may be there; 3 hosts for replicas 3: nowhere else."""
    reg = pool(0.3)
    reg.create_volume("one", new_volume("one", 64 * MiB, replicas=1, lineage="l1", head=1, now=0.0).to_dict())
    clock = Clock()
    m = controller(reg, clock, 10.0)
    down(reg, "h3")
    assert not step(m, clock, 0.0).migrating
    assert not step(m, clock, 100.0).migrating
    reg.delete_volume("one")
    down(reg, "h4")  # now two down of four, replicas 3
    assert not step(m, clock, 200.0).migrating


def test_a_new_controller_counts_again():
    """h1 counts h4 down from t=0, then goes down itself; h2, the new controller, counts
    both from when it first saw them down."""
    reg = five_hosts()
    before = reg.cluster_map()
    clock = Clock()
    m1, m2 = controller(reg, clock, 60.0), controller(reg, clock, 60.0, "h2")
    down(reg, "h4")
    step(m1, clock, 0.0)
    assert step(m2, clock, 0.0).mgen == before.mgen and m2.down_out() is None  # not the controller
    down(reg, "h1")
    clock.t = 30.0  # h2's first look at a map without h1
    assert trio.run(m2.control_once).mgen == before.mgen
    assert step(m2, clock, 89.9).mgen == before.mgen  # h1's count of h4 would have ended at 60
    got = step(m2, clock, 90.0)
    assert got.migrating and got.data == ("h2", "h3", "h5")


def test_a_controller_that_did_not_look_for_a_while_counts_again():
    reg = pool(0.3)
    clock = Clock()
    m = controller(reg, clock, 60.0)
    down(reg, "h3")
    step(m, clock, 0.0)
    # cut off from the registry from t=1 to t=55: h3 may have come back and gone again
    clock.t = 40.0
    assert DOWN_LOOK_GAP < 40.0 and not trio.run(m.control_once).migrating
    assert not step(m, clock, 99.9).migrating
    assert step(m, clock, 100.0).migrating


def test_a_controller_whose_steps_are_long_still_takes_a_down_host_out():
    """A step of a large pool takes long (sole_holders places every chunk of the volumes
    it looks at): the time between one step's look at the map and the next step's was
    taken for a gap in looking (DOWN_LOOK_GAP), every down host's count started again at
    every step, and none ever went out."""
    reg = pool(0.3)
    clock = Clock()
    m = controller(reg, clock, 60.0)
    slow = m.registry

    class SlowStep:
        def __getattr__(self, name):
            return getattr(slow, name)

        async def list_volumes(self):  # (after the map is read: the rest of the step)
            clock.t += DOWN_LOOK_GAP + 5.0
            return await slow.list_volumes()

    m.registry = SlowStep()
    down(reg, "h3")
    outs = []
    for _ in range(4):
        clock.t += 1.0
        outs.append(trio.run(m.control_once).migrating)
    assert outs[-1], outs  # down for 4 steps of 36 s: past the 60 s interval


# --- stale records a settled data set finds moot (_clear_moot) -----------------------------


def test_moot_records_are_not_cleared_with_a_map_a_new_change_replaced():
    """h2 controls a settled data set h2-h4 and lists the stale records to clear those the
    placement no longer names. Meanwhile h1 returns, takes the controller role over and
    records a change h2-h4 -> h1-h4, and a holder's scan records h1 stale for a chunk it
    joins. h2 judged that record by its old map (h1 places nothing there) and cleared it:
    with no record left, the change completed and h1 counted as a complete copy holding
    nothing of the chunk."""
    reg = open_registry(f"memory://migration-{next(_n)}")
    for h in ("h2", "h3", "h4"):
        back(reg, h)
    reg.set_data_set(0, ["h2", "h3", "h4"], None)
    reg.create_volume("v", new_volume("v", 64 * MiB, replicas=2, lineage="l0", head=1, now=0.0).to_dict())
    m2 = controller(reg, Clock(), 600.0, "h2")
    m1 = controller(reg, Clock(), 600.0, "h1")
    plain = m2.registry
    marked = []

    class Meanwhile:
        def __getattr__(self, name):
            return getattr(plain, name)

        async def list_stale(self, *a, **k):
            if not marked:  # (h2's _clear_moot, its map read already)
                back(reg, "h1")
                change = await m1.control_once()
                assert change.migrating and change.data == ("h1", "h2", "h3", "h4")
                view = ClusterView(change)
                i = next(i for i in range(64) if "h1" in view.joining("l0", i, 2))
                reg.mark_stale("l0", i, ["h1"], 12345)  # a holder's scan of the new change
                marked.append(i)
            return await plain.list_stale(*a, **k)

    m2.registry = Meanwhile()
    trio.run(m2.control_once)
    assert marked
    assert [(r.index, r.host_id) for r in reg.list_stale()] == [(marked[0], "h1")]
    change = reg.cluster_map()
    for h in change.prev:
        reg.mark_scanned(h, change.mgen)
    assert trio.run(m1.control_once).migrating  # h1 still owes the chunk its copy


def test_a_host_removed_while_the_controller_adds_it_leaves_every_map_readable():
    """`vbp host remove` of a host that just registered (not in the data set yet: the
    remove is allowed) between the controller's read of the map and its recording of the
    data set that takes the host in: the record then names, with its placement inputs, a
    host no longer in the map. Every host builds its view of that map (placement over the
    recorded inputs of the hosts it has an address for); a KeyError there stopped every
    blockd's map refresh and `vbp pool status`. The next step takes the host out again."""
    reg = pool(0.3)
    reg.register_host(HostRecord("h5", "h5:1", "h5:2", pod="p5", capacity=GiB, peer_rev=WEIGHTS_REV), 60)

    class RemovedAfterRead(Async):
        async def cluster_map_then_remove(self):
            got = self.sync.cluster_map()
            if got.host("h5") is not None and "h5" not in got.data_set:
                self.sync.remove_host("h5")  # the operator's remove, racing the step
            return got

        def __getattr__(self, name):
            if name == "cluster_map":
                return self.cluster_map_then_remove
            return super().__getattr__(name)

    m = DataSetMover("h1", None, None, RemovedAfterRead(reg), grace=5.0, reweight_hold=10.0)
    m.clock = Clock()
    got = trio.run(m.control_once)
    assert "h5" in got.data and got.host("h5") is None  # the race as it happens
    assert got.placed(leaving=True) == reg.cluster_map().placed(leaving=True)
    assert [h.id for h in got.placed_hosts()] == ["h1", "h2", "h3", "h4"]  # h5: no address
    view = ClusterView(got)
    assert all("h5" not in view.write_set("l0", i, 3) for i in range(64))
    again = trio.run(mover(reg, Clock(), hold=0.0).control_once)
    assert again.data == ("h1", "h2", "h3", "h4") and not again.migrating  # cancelled


def test_the_stale_records_of_a_deleted_volume_go_with_a_host_that_left_for_good():
    """h4 dies; writes to v and w meanwhile leave h4's copies of some of their chunks
    recorded stale; the operator deletes w (made again later under its name, in a new
    lineage), and h4 goes out of the data set for good (`vbp host remove`). v's records
    naming h4 are moot once the data set without h4 is settled, and go; w's stayed
    forever: only h4 clears the records of a lineage without volumes (resync, at its
    return), so `vbp pool status` counted degraded chunks of a volume that no longer
    exists and `vbp pool status --wait` never returned."""
    from control import api

    reg = pool(0.3)
    reg.create_volume("w", new_volume("w", 64 * MiB, replicas=3, lineage="l1", head=1, now=0.0).to_dict())
    view = ClusterView(reg.cluster_map())
    for lineage in ("l0", "l1"):
        i = next(i for i in range(64) if "h4" in view.replicas(lineage, i, 3))
        reg.mark_stale(lineage, i, ["h4"], 1000)
    clock = Clock()
    m = controller(reg, clock, 0.0)
    down(reg, "h4")
    reg.delete_volume("w")
    reg.create_volume("w", new_volume("w", 64 * MiB, replicas=3, lineage="l2", head=1, now=0.0).to_dict())
    change = step(m, clock, 0.0)
    assert change.migrating and change.data == ("h1", "h2", "h3")
    for h in change.prev:
        reg.mark_scanned(h, change.mgen)
    assert not step(m, clock, 1.0).migrating
    reg.remove_host("h4")
    step(m, clock, 2.0)  # (the settled data set's step: moot records go)
    assert reg.list_stale() == []
    api.wait_healthy(reg, timeout=0.0)


def test_the_records_of_a_volume_created_during_the_sweep_are_kept():
    """The settled data set's step read the volumes before the stale records; a volume
    created in between (a new lineage, not in that listing) whose first write already
    left a copy recorded stale is no deleted volume: its record stays."""
    reg = pool(0.3)
    clock = Clock()
    m = controller(reg, clock, 600.0)
    step(m, clock, 0.0)
    plain = m.registry
    made = []

    class Meanwhile:
        def __getattr__(self, name):
            return getattr(plain, name)

        async def list_stale(self, *a, **k):
            if not made:  # (after the step listed the volumes)
                reg.create_volume("x", new_volume("x", 64 * MiB, replicas=3, lineage="l3",
                                                  head=1, now=0.0).to_dict())
                reg.mark_stale("l3", 0, [ClusterView(reg.cluster_map()).replicas("l3", 0, 3)[0]], 1000)
                made.append(1)
            return await plain.list_stale(*a, **k)

    m.registry = Meanwhile()
    step(m, clock, 1.0)
    assert made and [(r.lineage, r.index) for r in reg.list_stale()] == [("l3", 0)]


def test_a_settled_host_places_its_chunks_once_and_lets_other_tasks_run_meanwhile():
    """collect_misplaced runs with every GC pass (gc_interval, 5 s) and measured the
    misplaced copies each time: a placement of every chunk held (some microseconds each,
    the view's cache holding 65,536), in one go on the event loop. A host of a million
    chunks spent more than the interval on it, its clients and peers unanswered meanwhile.
    The measure is kept while the data set, the chunks held and the volumes stay the same,
    and a new one lets the other tasks run every few hundred chunks."""
    reg = pool(0.9)
    old = reg.cluster_map()
    store = placed_store(ClusterView(old), "h4", 3000, capacity=4 * GiB)
    view = ClusterView(old)
    m = DataSetMover("h4", store, view, Async(reg), HeldEverywhere(), grace=0.0)
    ticks = 0
    placed = []  # the ticker's count at each placement
    real = view.replicas

    def spy(*args):
        placed.append(ticks)
        return real(*args)
    view.replicas = spy

    async def main():
        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            await m.collect_misplaced()
            first = len(placed)
            await m.collect_misplaced()
            assert first >= store.stats().chunks and len(placed) == first  # kept
            store.write(ChunkKey("l0", 5000, 1), 0, b"x", chunk_size=MiB)  # a chunk came
            await m.collect_misplaced()
            assert len(placed) > first  # measured again
            nursery.cancel_scope.cancel()
    trio.run(main)
    longest = run_ = 1
    for a, b in zip(placed, placed[1:]):
        run_ = run_ + 1 if a == b else 1
        longest = max(longest, run_)
    assert longest <= 1024, longest
