"""Placement benchmark: balance, data movement and lookup speed on a large map.

    python -m bench.placement [--zones 10 --pods 10 --hosts-per-pod 10 --chunks N --replicas 3]

Builds zones x pods x hosts-per-pod hosts with mixed capacities and reports
- balance: each host's replicas relative to its share of capacity (max/mean, goal <= 1.05);
- movement: replicas that change hosts when a host or a pod is added, removed, goes down or
  drains, against the minimum that must move (what lived on the removed hosts, what the new
  hosts receive; goal <= 1.1x);
- lookups per second of the scalar Placement.place at 1000 hosts and on small maps.

Placing millions of chunks in pure Python is slow (a lookup hashes every host), so with
numpy installed the bench runs a vectorized form of the same function: every host's key for
a block of chunks at once (xxh64 of an 8-byte key re-implemented on uint64 arrays), then the
same choice on arrays. A host's key depends only on the chunk and that host, so one key
matrix over all hosts of all scenarios serves every scenario's map. The vectorized form is
checked against the scalar Placement.place on sampled chunks of every map here, and on
random maps by tests/unit/test_bench_placement.py. Without numpy the bench falls back to
the scalar code on fewer chunks. A benchmark reports; it asserts nothing but that agreement.

The default 10M chunks hash 10^10 (chunk, host) pairs: minutes on a 2-core machine (about
7 with other work running); `--chunks 1000000 --move-chunks 200000` takes well under one.
The last full run is in bench/results/placement.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

from vbp.cluster import HOST_DOWN, HOST_DRAINING, ClusterMap, HostRecord
from vbp.placement import Placement, chunk_key, domain_order, host_weight, node_seed

try:
    import numpy as np
except ImportError:  # the bench still runs, on fewer chunks
    np = None

TB = 10**12
LINEAGE = "bench"


def build_map(zones: int, pods: int, per_pod: int, seed: int) -> ClusterMap:
    rnd = random.Random(seed)
    hosts = [HostRecord(f"z{z:02d}-p{p:02d}-h{h:02d}", f"10.{z}.{p}.{h}:7000", f"10.{z}.{p}.{h}:10809",
                        f"z{z:02d}", f"p{p:02d}", rnd.choice([4, 8, 12, 16]) * TB)
             for z in range(zones) for p in range(pods) for h in range(per_pod)]
    return ClusterMap(1, tuple(hosts))


# --- the vectorized path -------------------------------------------------------------------

M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                      0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
ROWS = 64  # chunks hashed at once: a (ROWS, hosts) uint64 block stays in cache


def chunk_lanes(items):
    """The chunk keys of (lineage, index) pairs as uint64 lanes."""
    return np.fromiter((int.from_bytes(chunk_key(lin, i), "little") for lin, i in items), np.uint64)


class HostKeys:
    """Keys -ln(u) * (1/w) of a fixed list of hosts for blocks of chunks: score_key on arrays.
    The matrix has one more column, +inf, that padded slots point at."""

    def __init__(self, hosts: list[HostRecord]) -> None:
        self.column = {h.id: i for i, h in enumerate(hosts)}
        self.weight = {h.id: host_weight(h) for h in hosts}
        seeds = np.array([node_seed("host", h.id) for h in hosts], np.uint64)
        with np.errstate(over="ignore"):
            self.acc0 = seeds + np.uint64((P5 + 8) & M64)  # xxh64's state after the seed
        self.neg_inv_w = -np.array([1.0 / host_weight(h) for h in hosts])

    def __call__(self, lanes):
        u = np.uint64
        k = np.empty((len(lanes), len(self.acc0) + 1))
        k[:, -1] = np.inf
        with np.errstate(over="ignore"):
            k1 = lanes * u(P2)
            k1 = ((k1 << u(31)) | (k1 >> u(33))) * u(P1)  # xxh64's round of the 8-byte lane
        rows = min(ROWS, len(lanes))
        acc = np.empty((rows, len(self.acc0)), np.uint64)
        tmp = np.empty_like(acc)
        key = np.empty(acc.shape)
        for r in range(0, len(lanes), rows):
            m = min(rows, len(lanes) - r)
            a, t, f = acc[:m], tmp[:m], key[:m]
            np.bitwise_xor(k1[r:r + m, None], self.acc0[None, :], out=a)
            np.left_shift(a, u(27), out=t)
            a >>= u(37)
            a |= t
            a *= u(P1)
            a += u(P4)
            for shift, mul in ((33, P2), (29, P3), (32, None)):  # the avalanche
                np.right_shift(a, u(shift), out=t)
                a ^= t
                if mul:
                    a *= u(mul)
            a >>= u(11)
            f[:] = a.view(np.int64)  # < 2**53: exact, and a faster cast than from uint64
            f += 0.5
            f *= 2.0**-53
            np.log(f, out=f)
            f *= self.neg_inv_w  # log(u) * -(1/w) == -log(u) * (1/w), bit for bit
            k[r:r + m, :-1] = f
        return k


class VectorPlacement:
    """Placement.place on a key matrix from HostKeys: the same choice, on arrays."""

    def __init__(self, cmap: ClusterMap, keys: HostKeys) -> None:
        hosts = domain_order(cmap)
        for h in hosts:
            if keys.weight[h.id] != host_weight(h):
                raise ValueError(f"host {h.id} has another capacity in the key matrix")
        self.cols = np.array([keys.column[h.id] for h in hosts], np.int64)  # domain order
        zones: dict[str, int] = {}
        pods: dict[tuple[str, str], int] = {}
        self.zone_of = np.array([zones.setdefault(h.zone, len(zones)) for h in hosts], np.int64)
        self.pod_of = np.array([pods.setdefault((h.zone, h.pod), len(pods)) for h in hosts], np.int64)
        self.npods = len(pods)
        # each zone's columns as a padded row (pointing at the +inf column), in domain order
        members = [self.cols[self.zone_of == z].tolist() for z in range(len(zones))]
        width = max(map(len, members), default=0)
        self.slots = np.array([m + [len(keys.column)] * (width - len(m)) for m in members], np.int64)
        # runs of consecutive columns inside one zone: a zone's best key is a min of run mins
        runs = [i for i in range(len(hosts)) if i == 0 or self.cols[i] != self.cols[i - 1] + 1
                or self.zone_of[i] != self.zone_of[i - 1]]
        ends = runs[1:] + [len(hosts)]
        self.bounds = np.array([x for i, j in zip(runs, ends) for x in (self.cols[i], self.cols[j - 1] + 1)],
                               np.int64)
        self.zone_runs = np.array([r for r, i in enumerate(runs) if r == 0 or self.zone_of[i] != self.zone_of[runs[r - 1]]],
                                  np.int64)

    def place(self, k, n: int):
        """Columns of the chosen hosts (chunks x n), primary first; -1 past the eligible hosts."""
        nzones = len(self.slots)
        if n == 0 or nzones == 0:
            return np.full((len(k), n), -1, np.int64)
        if nzones < n:
            return self._greedy(k[:, self.cols], n)
        # one replica per zone: the n zones of lowest best key, each its first host of that key
        run_min = np.minimum.reduceat(k, self.bounds, axis=1)[:, ::2]
        zone_min = np.minimum.reduceat(run_min, self.zone_runs, axis=1)
        order = np.argsort(zone_min, axis=1, kind="stable")[:, :n]  # equal keys: zone order
        low = np.take_along_axis(zone_min, order, 1)
        slots = self.slots[order]  # chunks x n x zone width
        first = (np.take_along_axis(k, slots.reshape(len(k), -1), 1).reshape(slots.shape)
                 == low[..., None]).argmax(axis=2)
        return np.take_along_axis(slots, first[..., None], 2)[..., 0]

    def _greedy(self, g, n: int):
        rows = np.arange(len(g))
        in_zone = np.zeros((len(g), self.zone_of.max() + 1), np.int64)
        in_pod = np.zeros((len(g), self.npods), np.int64)
        free = np.ones(g.shape, bool)
        out = np.full((len(g), n), -1, np.int64)
        big = np.int64(1 << 40)
        for r in range(n):
            cand = free.copy()
            for count in (in_zone[:, self.zone_of], in_pod[:, self.pod_of]):
                low = np.where(cand, count, big).min(axis=1, keepdims=True)
                cand &= count == low
            pick = np.where(cand, g, np.inf).argmin(axis=1)
            ok = cand.any(axis=1)
            pick, sel = pick[ok], rows[ok]
            out[sel, r] = self.cols[pick]
            free[sel, pick] = False
            in_zone[sel, self.zone_of[pick]] += 1
            in_pod[sel, self.pod_of[pick]] += 1
        return out


def check_vector_against_scalar(cmap: ClusterMap, keys: HostKeys, n: int, sample=1000, seed=5) -> int:
    """Chunks on which the vectorized and the scalar placement differ."""
    names = list(keys.column)
    idx = random.Random(seed).sample(range(10**9), sample)
    vec = VectorPlacement(cmap, keys).place(keys(chunk_lanes((LINEAGE, i) for i in idx)), n)
    p = Placement(cmap)
    return sum(tuple(names[x] for x in row if x >= 0) != p.place(LINEAGE, i, n) for row, i in zip(vec, idx))


# --- measurements ------------------------------------------------------------------------------


def scenarios(cmap: ClusterMap, rnd: random.Random):
    """(name, hosts, ids that must move, 'removed' or 'added')"""
    hosts = list(cmap.hosts)
    victim = rnd.choice(hosts)
    pods = sorted({(h.zone, h.pod) for h in hosts})
    zone, pod = rnd.choice(pods)
    new_host = replace(victim, id="new-host", capacity=8 * TB)
    in_pod = [h for h in hosts if (h.zone, h.pod) == (zone, pod)]
    new_pod = [replace(h, id=f"new-pod-{i}", pod="p-new") for i, h in enumerate(in_pod)]
    in_pod = [h.id for h in in_pod]
    yield ("remove host", tuple(h for h in hosts if h.id != victim.id), [victim.id], "removed")
    yield ("add host", tuple(hosts) + (new_host,), [new_host.id], "added")
    yield ("host down", tuple(h.with_state(HOST_DOWN) if h.id == victim.id else h for h in hosts), [victim.id], "removed")
    yield ("host draining", tuple(h.with_state(HOST_DRAINING) if h.id == victim.id else h for h in hosts), [victim.id], "removed")
    yield (f"remove pod {zone}/{pod}", tuple(h for h in hosts if (h.zone, h.pod) != (zone, pod)), in_pod, "removed")
    yield (f"add pod {zone}/p-new", tuple(hosts) + tuple(new_pod), [h.id for h in new_pod], "added")


def lookup_rate(cmap: ClusterMap, n: int, seconds: float = 1.0) -> float:
    """Scalar lookups per second, each of a chunk not looked up before (no memo hit)."""
    p = Placement(cmap)
    i, t0 = 0, time.perf_counter()
    while (took := time.perf_counter() - t0) < seconds:
        for _ in range(100):
            p.place(LINEAGE, i, n)
            i += 1
    return i / took


def report_lookups(cmap: ClusterMap, n: int) -> None:
    t = time.perf_counter()
    Placement(cmap)
    build = time.perf_counter() - t
    small = [build_map(1, 1, 3, 0), build_map(1, 1, 10, 0), build_map(3, 1, 1, 0), build_map(10, 1, 1, 0)]
    rates = [f"{len(m.hosts)} hosts/{len({h.zone for h in m.hosts})} zones {lookup_rate(m, n):,.0f}/s"
             for m in small]
    print(f"lookups (scalar Placement.place, n={n}, each chunk's first lookup): "
          f"{len(cmap.hosts)} hosts {lookup_rate(cmap, n):,.0f}/s; " + "; ".join(rates)
          + f"; Placement(map) build {build * 1000:.1f} ms")


class Tally:
    """Balance of the base map and movement per scenario, accumulated over chunk blocks."""

    def __init__(self, cmap, keys, scen, n):
        self.keys, self.n = keys, n
        self.base = VectorPlacement(cmap, keys)
        self.scen = [(name, VectorPlacement(ClusterMap(2, hosts), keys), [keys.column[h] for h in ids], kind)
                     for name, hosts, ids, kind in scen]
        self.count = np.zeros(len(keys.column) + 1, np.int64)
        self.prim = np.zeros_like(self.count)
        self.moved = [0] * len(scen)
        self.need = [0] * len(scen)

    def add(self, lanes, move: bool) -> None:
        k = self.keys(lanes)
        before = self.base.place(k, self.n)
        self.count += np.bincount(before.ravel(), minlength=len(self.count))
        self.prim += np.bincount(before[:, 0], minlength=len(self.count))
        if not move:
            return
        for s, (_, vp, cols, kind) in enumerate(self.scen):
            after = vp.place(k, self.n)
            self.moved[s] += int((~(after[:, :, None] == before[:, None, :]).any(axis=2)).sum())
            self.need[s] += int(np.isin(before if kind == "removed" else after, cols).sum())


def balance(cmap: ClusterMap, column: dict[str, int], count, prim) -> tuple[float, float, float]:
    caps = {column[h.id]: h.capacity for h in cmap.hosts}
    count, prim = {i: int(count[i]) for i in caps}, {i: int(prim[i]) for i in caps}  # no int64 overflow
    total_cap, total, chunks = sum(caps.values()), sum(count.values()), sum(prim.values())
    rel = [count[i] / (total * c / total_cap) for i, c in caps.items()]
    prel = [prim[i] / (chunks * c / total_cap) for i, c in caps.items()]
    return max(rel), min(rel), max(prel)


def zone_skew(cmap: ClusterMap, column: dict[str, int], count) -> str:
    """Fill relative to capacity per zone: the pull of the distinct-zone rule."""
    caps: dict[str, float] = {}
    got: dict[str, float] = {}
    for h in cmap.hosts:
        caps[h.zone] = caps.get(h.zone, 0) + h.capacity
        got[h.zone] = got.get(h.zone, 0) + int(count[column[h.id]])
    rel = {z: got[z] / sum(got.values()) / (caps[z] / sum(caps.values())) for z in caps}
    heavy, light = max(caps, key=caps.get), min(caps, key=caps.get)
    share = sum(caps.values()) / len(caps)
    return (f"zones: fill/capacity {min(rel.values()):.3f}..{max(rel.values()):.3f}; heaviest zone "
            f"({caps[heavy] / share:.3f}x mean capacity) {rel[heavy]:.3f}, lightest "
            f"({caps[light] / share:.3f}x) {rel[light]:.3f}")


def run_vector(cmap, scen, n, nchunks, nmove, block=8192) -> int:
    extra = [h for _, hosts, _, _ in scen for h in hosts if h.id.startswith("new-")]
    hosts = list(cmap.hosts) + list({h.id: h for h in extra}.values())
    keys = HostKeys(hosts)
    maps = [cmap] + [ClusterMap(2, hs) for _, hs, _, _ in scen]
    bad = sum(check_vector_against_scalar(m, keys, n) for m in maps)
    print(f"vectorized vs scalar on 1000 sampled chunks of each of the {len(maps)} maps: {bad} mismatches")
    if bad:
        return 1
    tally = Tally(cmap, keys, scen, n)
    t = time.perf_counter()
    for b in range(0, nchunks, block):
        tally.add(chunk_lanes((LINEAGE, i) for i in range(b, min(b + block, nchunks))), b < nmove)
    took = time.perf_counter() - t
    hi, lo, prim = balance(cmap, keys.column, tally.count, tally.prim)
    print(f"balance over {nchunks:,} chunks ({nchunks * n / len(cmap.hosts):,.0f} replicas per host on "
          f"average; all maps placed in {took:.0f}s):")
    print(f"  fill relative to capacity: max/mean {hi:.3f}, min/mean {lo:.3f}; primaries max/mean {prim:.3f}")
    print("  " + zone_skew(cmap, keys.column, tally.count))
    moved_over = -(-min(nmove, nchunks) // block) * block
    print(f"movement over {min(moved_over, nchunks):,} chunks (moved replicas / minimum that must move):")
    for (name, *_), mv, need in zip(scen, tally.moved, tally.need):
        ratio = mv / need if need else float("nan")
        print(f"  {name:<24} moved {mv:>9,}  minimum {need:>9,}  ratio {ratio:.3f}")
    return 0


def run_scalar(cmap, scen, n, nchunks, nmove) -> int:
    def placed(m, count):
        p = Placement(m)
        return [p.place(LINEAGE, i, n) for i in range(count)]

    base = placed(cmap, nchunks)
    caps = {h.id: h.capacity for h in cmap.hosts}
    count: dict[str, int] = {}
    prim: dict[str, int] = {}
    for row in base:
        prim[row[0]] = prim.get(row[0], 0) + 1
        for h in row:
            count[h] = count.get(h, 0) + 1
    column = {h: h for h in caps}
    hi, lo, pr = balance(cmap, column, {h: count.get(h, 0) for h in caps}, {h: prim.get(h, 0) for h in caps})
    print(f"balance over {nchunks:,} chunks: fill relative to capacity max/mean {hi:.3f}, "
          f"min/mean {lo:.3f}; primaries max/mean {pr:.3f}")
    print(f"movement over {nmove:,} chunks (moved replicas / minimum that must move):")
    for name, hosts, ids, kind in scen:
        after = placed(ClusterMap(2, hosts), nmove)
        mv = sum(len(set(a) - set(b)) for a, b in zip(after, base))
        need = sum(x in ids for row in (base[:nmove] if kind == "removed" else after) for x in row)
        print(f"  {name:<24} moved {mv:>9,}  minimum {need:>9,}  ratio {mv / need if need else float('nan'):.3f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zones", type=int, default=10)
    ap.add_argument("--pods", type=int, default=10, help="pods per zone")
    ap.add_argument("--hosts-per-pod", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=None,
                    help="chunks for the balance run (default 10000000 with numpy, 20000 without)")
    ap.add_argument("--move-chunks", type=int, default=None,
                    help="chunks for the movement scenarios (default 1000000 with numpy, 5000 without)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    vector = np is not None
    nchunks = a.chunks or (10_000_000 if vector else 20_000)
    nmove = min(nchunks, a.move_chunks or (1_000_000 if vector else 5_000))
    n = a.replicas
    cmap = build_map(a.zones, a.pods, a.hosts_per_pod, a.seed)
    scen = list(scenarios(cmap, random.Random(a.seed)))
    caps = sorted({h.capacity // TB for h in cmap.hosts})
    print(f"map: {a.zones} zones x {a.pods} pods x {a.hosts_per_pod} hosts = {len(cmap.hosts)} hosts, "
          f"capacities {caps} TB, replicas {n}; path: {'numpy-vectorized' if vector else 'scalar'}")
    report_lookups(cmap, n)
    return (run_vector if vector else run_scalar)(cmap, scen, n, nchunks, nmove)


if __name__ == "__main__":
    sys.exit(main())
