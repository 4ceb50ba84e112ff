"""Placement: which hosts hold chunk (lineage, index), as a pure function of the cluster map.

Theory of operation (DESIGN.md, Words and Failures; CONVENTIONS.md 6).

Score. Weighted rendezvous hashing: a chunk key c = xxh64("lineage\\0index") and a node of
seed s and weight w get u = xxh64(c, seed=s) mapped into (0, 1) and the key -ln(u) / w;
the lowest key wins (the same as the highest score w / -ln(u)). -ln(u)/w is exponentially
distributed with rate w and the minimum of such draws is won by a node with probability
proportional to its weight, so a node that wins is chosen in proportion to its capacity.

Hierarchy. Replicas go to distinct failure domains as far as the map allows: zones are
ranked by key with the zone's weight = the sum of its hosts' capacities; replicas are dealt
to zones round-robin in rank order (one each while there are zones with eligible hosts,
then a second round...). In a zone, pods are ranked and dealt to the same way, and in a pod
the hosts are ranked. Only the chosen branches are hashed: a lookup on 10 zones x 10 pods x
10 hosts with 3 replicas costs 10 + 3*10 + 3*10 = 70 hashes, not 1000. The output order is
the dealing order, so the first host (top zone, top pod, top host) is the primary.

Eligibility and stability. Hosts that are down or draining receive nothing but keep their
weight in their pod and zone, and an ineligible node is simply skipped in a ranking: the
relative order of the others does not change. So a host going down or draining moves only
the replicas that lived on it (exactly), and they go to the next host of the same ranking.
Adding or removing a host changes its pod's and zone's weights: like CRUSH's straw2, every
replica that moves then moves into (addition) or out of (removal) that zone, but more than
the minimum moves (bench/placement.py measures how much). Exact minimal movement under
membership change and capacity weighting would need a flat ranking of all hosts, which is
`place_flat` (the naive reference for single-domain maps) at O(hosts) hashes per lookup.

`place_naive` is the same definition computed the obvious way (every node hashed, a greedy
choice over all hosts); tests check that it agrees with `Placement.place` on random maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import xxhash

from vbp.cluster import HOST_UP, ClusterMap, HostRecord

_xxh64 = xxhash.xxh64_intdigest
_log = math.log
_TWO_M53 = 2.0**-53
MEMO_SIZE = 1 << 16  # lookups remembered per map


def chunk_key(lineage: str, index: int) -> bytes:
    """The 8-byte key of a chunk that every score hashes (little-endian xxh64)."""
    return _xxh64(f"{lineage}\x00{index}".encode()).to_bytes(8, "little")


def node_seed(kind: str, *path: str) -> int:
    return _xxh64("\x00".join((kind, *path)).encode())


def score_key(ckey: bytes, seed: int, weight: float) -> float:
    """-ln(u)/w for this chunk and node: lower wins."""
    u = ((_xxh64(ckey, seed) >> 11) + 0.5) * _TWO_M53
    return -math.log(u) / weight


def host_weight(h: HostRecord) -> float:
    """Capacity in bytes; a host that declares none counts as one byte (all such hosts then
    share equally, and lose to any host with a real capacity)."""
    return float(h.capacity) if h.capacity > 0 else 1.0


def eligible(h: HostRecord) -> bool:
    """May receive chunks: up (in maintenance or not). Down and draining hosts may not."""
    return h.state == HOST_UP


@dataclass(slots=True)
class _Node:
    name: str
    seed: int
    weight: float
    eligible: int  # eligible hosts below
    children: list["_Node"]
    host: HostRecord | None = None
    # (seed, 1/weight, name, node) of the children with eligible hosts: what a lookup hashes
    kids: list[tuple[int, float, str, "_Node"]] | None = None

    def freeze(self) -> "_Node":
        for c in self.children:
            c.freeze()
        self.kids = [(c.seed, 1.0 / c.weight, c.name, c) for c in self.children if c.eligible]
        return self


def _deal(ranked: list[_Node], k: int) -> list[int]:
    """Replicas per child: round-robin in rank order, a child taking at most `eligible`."""
    counts = [0] * len(ranked)
    while k:
        progress = False
        for i, child in enumerate(ranked):
            if k and counts[i] < child.eligible:
                counts[i] += 1
                k -= 1
                progress = True
        if not progress:
            break
    return counts


class Placement:
    """Per-map precomputation (the domain tree, seeds, weights); `place` is pure."""

    def __init__(self, cmap: ClusterMap) -> None:
        self.epoch = cmap.epoch
        zones: dict[str, dict[str, list[HostRecord]]] = {}
        for h in cmap.hosts:
            zones.setdefault(h.zone, {}).setdefault(h.pod, []).append(h)
        top = []
        for zname in sorted(zones):
            pods = []
            for pname in sorted(zones[zname]):
                hosts = [_Node(h.id, node_seed("host", h.id), host_weight(h), int(eligible(h)), [], h)
                         for h in zones[zname][pname]]
                pods.append(_Node(pname, node_seed("pod", zname, pname), sum(x.weight for x in hosts),
                                  sum(x.eligible for x in hosts), hosts))
            top.append(_Node(zname, node_seed("zone", zname), sum(p.weight for p in pods),
                             sum(p.eligible for p in pods), pods))
        self._root = _Node("", 0, sum(z.weight for z in top), sum(z.eligible for z in top), top).freeze()
        self._memo: dict[tuple[str, int, int], tuple[str, ...]] = {}

    @property
    def eligible_hosts(self) -> int:
        return self._root.eligible

    def place(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """Up to n distinct host ids, primary first (fewer if fewer hosts are eligible)."""
        if n <= 0:
            return ()
        key = (lineage, index, n)
        got = self._memo.get(key)
        if got is None:
            got = tuple(self._pick(chunk_key(lineage, index), self._root, n))
            if len(self._memo) >= MEMO_SIZE:  # a gateway looks up the same chunks again and again
                self._memo.clear()
            self._memo[key] = got
        return got

    def _pick(self, ckey: bytes, node: _Node, k: int) -> list[str]:
        # score_key inlined: this loop is the whole cost of a lookup
        ranked = sorted((-_log(((_xxh64(ckey, seed) >> 11) + 0.5) * _TWO_M53) * inv_w, name, c)
                        for seed, inv_w, name, c in node.kids)
        if not ranked:
            return []
        if ranked[0][2].host is not None:  # a pod: its hosts, best first
            return [name for _, name, _ in ranked[:k]]
        nodes = [c for _, _, c in ranked]
        if k == 1:
            return self._pick(ckey, nodes[0], 1)
        picks = [self._pick(ckey, c, m) for c, m in zip(nodes, _deal(nodes, k)) if m]
        if all(len(p) == 1 for p in picks):
            return [p[0] for p in picks]
        out = []
        for r in range(max(len(p) for p in picks)):
            out.extend(p[r] for p in picks if r < len(p))
        return out


_CACHE: list[tuple[ClusterMap, Placement]] = []  # by identity: hashing a big map costs more than a lookup
_CACHE_SIZE = 4


def _placement(cmap: ClusterMap) -> Placement:
    for m, p in _CACHE:
        if m is cmap:
            return p
    p = Placement(cmap)
    _CACHE.insert(0, (cmap, p))
    del _CACHE[_CACHE_SIZE:]
    return p


def place(lineage: str, index: int, cmap: ClusterMap, n: int) -> tuple[str, ...]:
    """Host ids for chunk (lineage, index) under `cmap`, primary first (cached per map)."""
    return _placement(cmap).place(lineage, index, n)


# --- references for tests and the bench: deliberately naive ----------------------------------


def place_naive(lineage: str, index: int, cmap: ClusterMap, n: int) -> tuple[str, ...]:
    """The same definition as Placement.place, computed the obvious way: hash every zone,
    pod and host, then pick n times the eligible host that minimizes (replicas already in
    its zone, zone key, replicas already in its pod, pod key, host key)."""
    ckey = chunk_key(lineage, index)
    zone_w: dict[str, float] = {}
    pod_w: dict[tuple[str, str], float] = {}
    for h in cmap.hosts:
        zone_w[h.zone] = zone_w.get(h.zone, 0.0) + host_weight(h)
        pod_w[(h.zone, h.pod)] = pod_w.get((h.zone, h.pod), 0.0) + host_weight(h)
    zkey = {z: (score_key(ckey, node_seed("zone", z), w), z) for z, w in zone_w.items()}
    pkey = {zp: (score_key(ckey, node_seed("pod", *zp), w), zp[1]) for zp, w in pod_w.items()}
    hkey = {h.id: (score_key(ckey, node_seed("host", h.id), host_weight(h)), h.id) for h in cmap.hosts}
    chosen: list[HostRecord] = []
    while len(chosen) < n:
        cands = [h for h in cmap.hosts if eligible(h) and h not in chosen]
        if not cands:
            break

        def rank(h: HostRecord):
            in_zone = sum(1 for c in chosen if c.zone == h.zone)
            in_pod = sum(1 for c in chosen if (c.zone, c.pod) == (h.zone, h.pod))
            return (in_zone, zkey[h.zone], in_pod, pkey[(h.zone, h.pod)], hkey[h.id])

        chosen.append(min(cands, key=rank))
    return tuple(h.id for h in chosen)


def place_flat(lineage: str, index: int, cmap: ClusterMap, n: int) -> tuple[str, ...]:
    """Flat weighted rendezvous over all eligible hosts, ignoring failure domains: the
    textbook scheme. Placement.place equals it on a map with one zone and one pod."""
    ckey = chunk_key(lineage, index)
    ranked = sorted((score_key(ckey, node_seed("host", h.id), host_weight(h)), h.id)
                    for h in cmap.hosts if eligible(h))
    return tuple(hid for _, hid in ranked[:n])
