"""Placement: which hosts hold chunk (lineage, index), as a pure function of the cluster map.

Theory of operation (DESIGN.md, Words and Failures; CONVENTIONS.md 6).

Score. Weighted rendezvous hashing over all hosts: a chunk key c = xxh64("lineage\\0index")
and a host of seed s = xxh64("host\\0id") and weight w = capacity (times the data set's
weight factor of the host, 1 unless the host is nearly full) get u = xxh64(c, seed=s)
mapped into (0, 1) and the key -ln(u) * (1/w); lower wins. -ln(u)/w is exponentially
distributed with rate w, so the host with the lowest key is each host with probability
proportional to its capacity. A host's key depends on the chunk and that host alone: no
zone or pod weight exists, so changing one host changes no other host's key.

Choice. Replicas are chosen one at a time from the eligible hosts; each time the host taken
minimizes (replicas already in its zone, replicas already in its pod, key), with (zone, pod,
id) breaking exact key ties. So replicas go to distinct zones while there are zones left,
then to distinct pods inside a zone, then to distinct hosts; the first host (the lowest key
of all) is the primary. With at least n zones this is the n zones of lowest best key, each
giving its best host: a lookup hashes every eligible host once (O(hosts), about 1000
hashes at 1000 hosts), which is why `Placement` memoizes and the gateway caches per epoch.
Hosts of one zone and one capacity rank in the reverse order of their hashes, so a zone's
best key takes one log per capacity class, not one per host (exact key ties fall back to
computing every key).

Stability (the reason for the flat ranking; tests check it exactly). The choice reads only
the keys of eligible hosts and each step takes a minimum, so:
- removing a host, or making it ineligible (down or draining), changes nothing for a chunk
  it did not hold: every step's minimum was another host, still there with the same key.
  For a chunk it held, only that replica is replaced. The choice goes in rounds (every
  zone's first replica before any zone's second; in a zone, every pod's first before any
  pod's second; in a pod, hosts by key) and inside a round by (pod count, key); dropping
  one host moves its pod's and zone's later hosts up one round, which changes the chosen
  set by the one host that fills the gap;
- adding a host is the same read backwards: only chunks whose choice now includes it
  change, and each by exactly that one replica.
So membership changes move the minimum that must move.
- changing one host's weight (the data set's weight factor of a nearly full host,
  replicator.migration) changes that host's key and no other: lowering it only takes the
  host out of chunks (each replaced by one other host) and raising it only puts it in.
The earlier hierarchical scheme
(zone, then pod, then host, each ranked by summed capacity, like CRUSH's straw2) hashed
fewer nodes but moved 1.7-2.6x that minimum, because one host's capacity is part of its
pod's and zone's weights and so shifts other hosts' chunks between zones.

Balance. The primary is exactly proportional to capacity. Later replicas avoid the zones
already used, which gives heavy zones a little less than their share and light zones a
little more (sampling without replacement); with zones of similar capacity the effect is
small. bench/placement.py measures it on 10 zones x 10 pods x 10 hosts of 4-16 TB and 10M
chunks x 3: zones within 6-8% of the mean capacity fill to 0.991-1.008 of their share,
hosts to max/mean 1.029 (goal 1.05; bench/results/placement.md).

`place_naive` is the same definition computed the obvious way (every host hashed, counts
recomputed at every step); tests check that it agrees with `Placement.place` on random maps.
bench/placement.py holds a vectorized (numpy) form of the same function, also checked.
"""

from __future__ import annotations

import math
from itertools import repeat
from typing import Mapping

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
    """-ln(u) * (1/w) for this chunk and host: lower wins. Multiplying by the inverse (not
    dividing) is what every form of placement does, so all of them round alike."""
    u = ((_xxh64(ckey, seed) >> 11) + 0.5) * _TWO_M53
    return -math.log(u) * (1.0 / weight)


def host_weight(h: HostRecord) -> float:
    """Capacity in bytes; a host that declares none counts as one byte (all such hosts then
    share equally, and lose to any host with a real capacity)."""
    return float(h.capacity) if h.capacity > 0 else 1.0


def eligible(h: HostRecord) -> bool:
    """May receive chunks: up (in maintenance or not). Down and draining hosts may not."""
    return h.state == HOST_UP


def domain_order(cmap: ClusterMap) -> list[HostRecord]:
    """The eligible hosts by (zone, pod, id): the order that breaks exact key ties, and in
    which every zone's (and pod's) hosts are contiguous."""
    return sorted((h for h in cmap.hosts if eligible(h)), key=lambda h: (h.zone, h.pod, h.id))


def weights_of(cmap: ClusterMap, factors: Mapping[str, float] | None = None) -> dict[str, float]:
    """Every host's placement weight: its capacity times its weight factor (default 1)."""
    f = factors or {}
    return {h.id: host_weight(h) * f.get(h.id, 1.0) for h in cmap.hosts}


class Placement:
    """Per-map precomputation (eligible hosts in domain order, seeds, weights); `place` is
    pure. `factors` (host id -> weight factor in (0, 1]) scale hosts' weights."""

    def __init__(self, cmap: ClusterMap, factors: Mapping[str, float] | None = None) -> None:
        self.epoch = cmap.epoch
        hosts = domain_order(cmap)
        w = weights_of(cmap, factors)
        self._ids = tuple(h.id for h in hosts)
        self._kids = tuple((node_seed("host", h.id), 1.0 / w[h.id]) for h in hosts)
        zones: dict[str, int] = {}
        pods: dict[tuple[str, str], int] = {}
        self._zone = tuple(zones.setdefault(h.zone, len(zones)) for h in hosts)
        self._pod = tuple(pods.setdefault((h.zone, h.pod), len(pods)) for h in hosts)
        starts = [i for i, z in enumerate(self._zone) if i == 0 or z != self._zone[i - 1]]
        self._zone_spans = tuple(zip(starts, starts[1:] + [len(hosts)]))
        self._npods = len(pods)
        # hosts of one zone and one capacity: their keys are in the reverse order of their
        # hashes, so a zone's best key needs one log per capacity, not one per host
        classes: dict[tuple[int, float], list[int]] = {}
        for i, (_, inv_w) in enumerate(self._kids):
            classes.setdefault((self._zone[i], inv_w), []).append(i)
        self._classes = tuple(
            tuple((tuple(self._kids[i][0] for i in idx), idx, inv_w)
                  for (z2, inv_w), idx in classes.items() if z2 == z)
            for z in range(len(self._zone_spans)))
        self._by_class = len(classes) * 3 <= len(hosts)  # worth it with 3+ hosts per class
        self._memo: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._split: dict[frozenset[str], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    @property
    def eligible_hosts(self) -> int:
        return len(self._ids)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The eligible hosts, in domain order: every chunk is placed on some of them."""
        return self._ids

    def everywhere(self, n: int) -> frozenset[str]:
        """The hosts in `place(lineage, index, n)` of every chunk, without hashing any:
        with no more eligible hosts than n, each chunk is on all of them (place takes
        min(n, eligible) hosts); with more, none is sure to be."""
        return frozenset(self._ids) if 0 < len(self._ids) <= n else frozenset()

    def place(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """Up to n distinct host ids, primary first (fewer if fewer hosts are eligible)."""
        if n <= 0 or not self._ids:
            return ()
        key = (lineage, index, n)
        got = self._memo.get(key)
        if got is None:
            ckey = chunk_key(lineage, index)
            got = None
            if self._by_class and len(self._zone_spans) >= n:
                got = self._by_zone_best(ckey, n)
            if got is None:
                got = self._choose(self.keys(ckey), n)
            if len(self._memo) >= MEMO_SIZE:  # a gateway looks up the same chunks again and again
                self._memo.clear()
            self._memo[key] = got
        return got

    def first_in(self, lineage: str, index: int, among: frozenset[str]) -> bool:
        """Whether the chunk's first replica is one of the hosts `among`: the lowest key of
        all eligible hosts, exact ties to the first in domain order (as `place` chooses at
        every n). The hosts of `among` are hashed, then the others only until one beats
        the best of those: for a few hosts of a large pool a handful of hashes, not one per
        host (a chunk of the few is beaten early unless it is theirs). No zone or pod rule
        comes into a first choice, so none comes in here."""
        split = self._split.get(among)
        if split is None:
            inside = tuple(i for i, h in enumerate(self._ids) if h in among)
            split = (inside, tuple(i for i in range(len(self._ids)) if i not in set(inside)))
            if len(self._split) >= 64:
                self._split.clear()
            self._split[among] = split
        inside, outside = split
        if not inside:
            return False
        ckey = chunk_key(lineage, index)
        kids = self._kids
        best, first = min((-_log(((_xxh64(ckey, kids[i][0]) >> 11) + 0.5) * _TWO_M53) * kids[i][1], i)
                          for i in inside)
        for i in outside:
            seed, inv_w = kids[i]
            k = -_log(((_xxh64(ckey, seed) >> 11) + 0.5) * _TWO_M53) * inv_w
            if k < best or (k == best and i < first):
                return False
        return True

    def keys(self, ckey: bytes) -> list[float]:
        """Every eligible host's key for this chunk, in domain order."""
        # score_key inlined: this loop is the whole cost of a lookup
        return [-_log(((_xxh64(ckey, seed) >> 11) + 0.5) * _TWO_M53) * inv_w
                for seed, inv_w in self._kids]

    def _by_zone_best(self, ckey: bytes, n: int) -> tuple[str, ...] | None:
        """The n zones of lowest best key (at least n zones), from each zone's capacity
        classes: the highest hash of a class is its lowest key. None when a class's two
        best hosts have equal keys: then the (zone, pod, id) tie-break needs every key."""
        best = []
        for classes in self._classes:
            for seeds, idx, inv_w in classes:
                hs = list(map(_xxh64, repeat(ckey, len(seeds)), seeds))
                top = max(hs)
                j = hs.index(top)
                k = -_log(((top >> 11) + 0.5) * _TWO_M53) * inv_w
                if len(hs) > 1:
                    hs[j] = -1
                    if -_log(((max(hs) >> 11) + 0.5) * _TWO_M53) * inv_w <= k:
                        return None
                best.append((k, idx[j]))
        # a zone's classes are among all zones' in zone order: keep each zone's best
        zone_best: dict[int, tuple[float, int]] = {}
        for k, i in best:
            z = self._zone[i]
            if z not in zone_best or (k, i) < zone_best[z]:
                zone_best[z] = (k, i)
        return tuple(self._ids[i] for _, i in sorted(zone_best.values())[:n])

    def _choose(self, keys: list[float], n: int) -> tuple[str, ...]:
        ids = self._ids
        if n == 1:
            return (ids[keys.index(min(keys))],)
        spans = self._zone_spans
        if len(spans) >= n:
            # one replica per zone: the n zones of lowest best key, in that order; index()
            # finds the first of equal keys, which is the (zone, pod, id) tie-break
            best = sorted((min(keys[a:b]), a, b) for a, b in spans)[:n]
            return tuple(ids[keys.index(m, a, b)] for m, a, b in best)
        return self._greedy(keys, n)

    def _greedy(self, keys: list[float], n: int) -> tuple[str, ...]:
        """Fewer zones than replicas: the definition step by step over hosts in key order."""
        order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: ties in domain order
        if self._npods == 1:  # one pod (a sandbox): the n lowest keys
            return tuple(self._ids[i] for i in order[:n])
        in_zone = [0] * len(self._zone_spans)
        in_pod = [0] * self._npods
        taken: list[int] = []
        for _ in range(min(n, len(order))):
            best, best_cost = -1, None
            for i in order:
                cost = (in_zone[self._zone[i]], in_pod[self._pod[i]])
                if (best_cost is None or cost < best_cost) and i not in taken:
                    best, best_cost = i, cost
                    if cost == (0, 0):
                        break
            taken.append(best)
            in_zone[self._zone[best]] += 1
            in_pod[self._pod[best]] += 1
        return tuple(self._ids[i] for i in taken)


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


def place_naive(lineage: str, index: int, cmap: ClusterMap, n: int,
                factors: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """The same definition as Placement.place, computed the obvious way: hash every host,
    then pick n times the eligible host that minimizes (replicas already in its zone,
    replicas already in its pod, host key, zone, pod, id)."""
    ckey = chunk_key(lineage, index)
    f = factors or {}
    hkey = {h.id: score_key(ckey, node_seed("host", h.id), host_weight(h) * f.get(h.id, 1.0))
            for h in cmap.hosts}
    chosen: list[HostRecord] = []
    while len(chosen) < n:
        cands = [h for h in cmap.hosts if eligible(h) and h not in chosen]
        if not cands:
            break

        def rank(h: HostRecord):
            in_zone = sum(1 for c in chosen if c.zone == h.zone)
            in_pod = sum(1 for c in chosen if (c.zone, c.pod) == (h.zone, h.pod))
            return (in_zone, in_pod, hkey[h.id], h.zone, h.pod, h.id)

        chosen.append(min(cands, key=rank))
    return tuple(h.id for h in chosen)


def place_flat(lineage: str, index: int, cmap: ClusterMap, n: int,
               factors: Mapping[str, float] | None = None) -> tuple[str, ...]:
    """Flat weighted rendezvous over all eligible hosts, ignoring failure domains: the
    textbook scheme. Placement.place equals it on a map with one zone and one pod."""
    ckey = chunk_key(lineage, index)
    f = factors or {}
    ranked = sorted((score_key(ckey, node_seed("host", h.id), host_weight(h) * f.get(h.id, 1.0)), h.id)
                    for h in cmap.hosts if eligible(h))
    return tuple(hid for _, hid in ranked[:n])
