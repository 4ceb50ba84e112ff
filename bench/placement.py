"""Placement benchmark: balance, data movement and lookup speed on a large map.

    python -m bench.placement [--zones 10 --pods 10 --hosts-per-pod 10 --chunks N --replicas 3]

Builds zones x pods x hosts-per-pod hosts with mixed capacities and reports
- balance: each host's replicas relative to its share of capacity (max/mean, goal <= 1.05);
- movement: replicas that change hosts when a host or a pod is added, removed, goes down or
  drains, against the minimum that must move (what lived on the removed host, what the new
  host receives; goal <= 1.1x);
- lookups per second of the scalar Placement.place.

Placing millions of chunks in pure Python is slow, so with numpy installed the bench runs a
vectorized copy of the algorithm (xxh64 of an 8-byte key re-implemented on uint64 arrays),
valid for maps where every replica goes to its own zone, and first checks it against the
scalar Placement.place on a sample. Without numpy it falls back to the scalar code on fewer
chunks. A benchmark reports; it asserts nothing but the vectorized path's agreement.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace

from vbp.cluster import HOST_DOWN, HOST_DRAINING, ClusterMap, HostRecord
from vbp.placement import Placement, chunk_key, eligible, host_weight, node_seed, place_flat

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


def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def xxh64_8(lane, seed):
    """xxh64 of one 8-byte little-endian input with a seed, on uint64 arrays."""
    u = np.uint64
    with np.errstate(over="ignore"):
        acc = seed + u((P5 + 8) & M64)
        k1 = _rotl(lane * u(P2), 31) * u(P1)
        acc = acc ^ k1
        acc = _rotl(acc, 27) * u(P1) + u(P4)
        acc ^= acc >> u(33)
        acc *= u(P2)
        acc ^= acc >> u(29)
        acc *= u(P3)
        acc ^= acc >> u(32)
    return acc


def _keys(lane, seeds, inv_w, ok):
    """-ln(u)/w for chunks (rows) x nodes (columns); inf where a node is not eligible."""
    h = xxh64_8(lane[:, None], seeds)
    u = ((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    k = -np.log(u) * inv_w
    return np.where(ok, k, np.inf)


class VectorPlacement:
    """Placement.place on arrays, for maps where each replica takes its own zone."""

    def __init__(self, cmap: ClusterMap, universe: dict[str, int]) -> None:
        tree: dict[str, dict[str, list[HostRecord]]] = {}
        for h in cmap.hosts:
            tree.setdefault(h.zone, {}).setdefault(h.pod, []).append(h)
        zones = sorted(tree)
        pmax = max(len(p) for p in tree.values())
        hmax = max(len(hs) for p in tree.values() for hs in p.values())
        Z = len(zones)
        self.zseed = np.zeros(Z, np.uint64)
        self.zinv = np.zeros(Z)
        self.zok = np.zeros(Z, bool)
        self.pseed = np.zeros((Z, pmax), np.uint64)
        self.pinv = np.ones((Z, pmax))
        self.pok = np.zeros((Z, pmax), bool)
        self.hseed = np.zeros((Z, pmax, hmax), np.uint64)
        self.hinv = np.ones((Z, pmax, hmax))
        self.hok = np.zeros((Z, pmax, hmax), bool)
        self.hidx = np.full((Z, pmax, hmax), -1, np.int64)
        for zi, z in enumerate(zones):
            zw = 0.0
            for pi, p in enumerate(sorted(tree[z])):
                hosts = tree[z][p]
                pw = sum(host_weight(h) for h in hosts)
                zw += pw
                self.pseed[zi, pi] = node_seed("pod", z, p)
                self.pinv[zi, pi] = 1.0 / pw
                self.pok[zi, pi] = any(eligible(h) for h in hosts)
                for hi, h in enumerate(hosts):
                    self.hseed[zi, pi, hi] = node_seed("host", h.id)
                    self.hinv[zi, pi, hi] = 1.0 / host_weight(h)
                    self.hok[zi, pi, hi] = eligible(h)
                    self.hidx[zi, pi, hi] = universe[h.id]
            self.zseed[zi] = node_seed("zone", z)
            self.zinv[zi] = 1.0 / zw
            self.zok[zi] = self.pok[zi].any()

    def place(self, lanes, n: int):
        """Host indices (chunks x n), primary first."""
        if n > int(self.zok.sum()):
            raise SystemExit("the vectorized bench needs at least as many eligible zones as replicas")
        zk = _keys(lanes, self.zseed, self.zinv, self.zok)
        zsel = np.argsort(zk, axis=1, kind="stable")[:, :n]
        out = np.empty((len(lanes), n), np.int64)
        for r in range(n):
            z = zsel[:, r]
            pk = _keys(lanes, self.pseed[z], self.pinv[z], self.pok[z])
            p = np.argmin(pk, axis=1)
            hk = _keys(lanes, self.hseed[z, p], self.hinv[z, p], self.hok[z, p])
            h = np.argmin(hk, axis=1)
            out[:, r] = self.hidx[z, p, h]
        return out


def chunk_lanes(count: int):
    return np.fromiter((int.from_bytes(chunk_key(LINEAGE, i), "little") for i in range(count)),
                       np.uint64, count)


def placer(cmap: ClusterMap, universe: dict[str, int], n: int, lanes, batch: int = 200_000):
    vp = VectorPlacement(cmap, universe)
    return np.concatenate([vp.place(lanes[i:i + batch], n) for i in range(0, len(lanes), batch)])


def check_vector_against_scalar(cmap, universe, n, sample=2000) -> int:
    ids = {v: k for k, v in universe.items()}
    idx = random.Random(5).sample(range(10**9), sample)
    lanes = np.array([int.from_bytes(chunk_key(LINEAGE, i), "little") for i in idx], np.uint64)
    vec = VectorPlacement(cmap, universe).place(lanes, n)
    p = Placement(cmap)
    return sum(tuple(ids[x] for x in row) != p.place(LINEAGE, i, n) for row, i in zip(vec, idx))


# --- scalar fallback -------------------------------------------------------------------------


def scalar_placer(cmap, universe, n, count):
    p = Placement(cmap)
    return [tuple(universe[h] for h in p.place(LINEAGE, i, n)) for i in range(count)]


# --- measurements ------------------------------------------------------------------------------


def balance(cmap, universe, placed, n):
    caps = {universe[h.id]: h.capacity for h in cmap.hosts if eligible(h)}
    total_cap = sum(caps.values())
    if np is not None and not isinstance(placed, list):
        counts = np.bincount(placed.ravel(), minlength=len(universe))
        prim = np.bincount(placed[:, 0], minlength=len(universe))
        total, nchunks = int(counts.sum()), len(placed)
    else:
        counts, prim = [0] * len(universe), [0] * len(universe)
        for row in placed:
            prim[row[0]] += 1
            for x in row:
                counts[x] += 1
        total, nchunks = sum(counts), len(placed)
    rel = [counts[i] / (total * c / total_cap) for i, c in caps.items()]
    prel = [prim[i] / (nchunks * c / total_cap) for i, c in caps.items()]
    return max(rel), min(rel), max(prel)


def moved(before, after, n):
    """Replicas that changed host: per chunk, hosts in `after` not in `before`."""
    if np is not None and not isinstance(before, list):
        same = (after[:, :, None] == before[:, None, :]).any(axis=2)
        return int((~same).sum())
    return sum(len(set(a) - set(b)) for a, b in zip(after, before))


def count_on(placed, idxs):
    if np is not None and not isinstance(placed, list):
        return int(np.isin(placed, list(idxs)).sum())
    s = set(idxs)
    return sum(x in s for row in placed for x in row)


def scenarios(cmap: ClusterMap, rnd: random.Random):
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.placement", description=__doc__.split("\n\n")[0])
    ap.add_argument("--zones", type=int, default=10)
    ap.add_argument("--pods", type=int, default=10, help="pods per zone")
    ap.add_argument("--hosts-per-pod", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=None,
                    help="chunks for the balance run (default 4000000 with numpy, 100000 without)")
    ap.add_argument("--move-chunks", type=int, default=None,
                    help="chunks for each movement scenario (default 1000000 with numpy, 30000 without)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    vector = np is not None
    nchunks = a.chunks or (4_000_000 if vector else 100_000)
    nmove = a.move_chunks or min(nchunks, 1_000_000 if vector else 30_000)
    n = a.replicas
    rnd = random.Random(a.seed)
    cmap = build_map(a.zones, a.pods, a.hosts_per_pod, a.seed)
    universe = {h.id: i for i, h in enumerate(cmap.hosts)}
    for extra in ["new-host"] + [f"new-pod-{i}" for i in range(a.hosts_per_pod)]:
        universe[extra] = len(universe)
    caps = sorted({h.capacity // TB for h in cmap.hosts})
    print(f"map: {a.zones} zones x {a.pods} pods x {a.hosts_per_pod} hosts = {len(cmap.hosts)} hosts, "
          f"capacities {caps} TB, replicas {n}; path: {'numpy-vectorized' if vector else 'scalar'}")

    # lookups per second of the scalar code
    t = time.perf_counter()
    p = Placement(cmap)
    build = time.perf_counter() - t
    t = time.perf_counter()
    lookups = 20_000
    for i in range(lookups):
        p.place(LINEAGE, i, n)
    rate = lookups / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(2000):
        place_flat(LINEAGE, i, cmap, n)
    flat = 2000 / (time.perf_counter() - t)
    print(f"lookups: {rate:,.0f}/s (scalar Placement.place, n={n}, first lookup of each chunk); "
          f"flat rendezvous over all hosts {flat:,.0f}/s; Placement(map) build {build * 1000:.1f} ms")

    def run(m, count):
        if vector:
            return placer(m, universe, n, lanes[:count])
        return scalar_placer(m, universe, n, count)

    if vector:
        bad = check_vector_against_scalar(cmap, universe, n)
        print(f"vectorized vs scalar on 2000 sampled chunks: {bad} mismatches")
        if bad:
            return 1
        lanes = chunk_lanes(max(nchunks, nmove))

    t = time.perf_counter()
    base = run(cmap, nchunks)
    took = time.perf_counter() - t
    hi, lo, prim = balance(cmap, universe, base, n)
    per_host = nchunks * n / len(cmap.hosts)
    print(f"balance over {nchunks:,} chunks ({per_host:,.0f} replicas per host on average, placed in {took:.1f}s):")
    print(f"  fill relative to capacity: max/mean {hi:.3f}, min/mean {lo:.3f}; primaries max/mean {prim:.3f}")

    before = base[:nmove]
    print(f"movement over {nmove:,} chunks (moved replicas / minimum that must move):")
    for name, hosts, changed, kind in scenarios(cmap, rnd):
        after = run(ClusterMap(2, hosts), nmove)
        mv = moved(before, after, n)
        need = count_on(before if kind == "removed" else after, [universe[h] for h in changed])
        ratio = mv / need if need else float("nan")
        print(f"  {name:<24} moved {mv:>8,}  minimum {need:>8,}  ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
