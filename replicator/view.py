"""ClusterView: the cluster map as a host sees it, with each chunk's placement cached.

The gateways, scrub, recovery and the data-set controller ask it where each chunk lives;
the command line's planning too (`vbp pool status`, accept-loss), which is why it is a
module of its own, with nothing of the data path (trio, the store) in it.
"""

from __future__ import annotations

from replicator import messages as m
from vbp.cluster import ClusterMap
from vbp.errors import PeerUnavailable
from vbp.placement import MEMO_SIZE, Placement

_NO_ROUTE = object()  # (ClusterView.route: not computed yet; None is a route's answer)
# chunks each of a ClusterView's caches keeps (all dropped when full): a view lives until
# the next map, and scrub, recovery and the gateways ask it about every chunk they touch
VIEW_CACHE_SIZE = MEMO_SIZE


class ClusterView:
    """The cluster map as this host sees it, with per-epoch cached chunk placement.

    Placement runs over the data set (vbp.cluster.ClusterMap.data_set, with its weight
    factors and the capacity, zone and pod recorded with it), in which a down host keeps
    its chunks until the data set leaves it (replicator.migration). While the data set
    changes, a chunk has two placements: `replicas`, over the set being left, whose
    copies are complete (reads, min_size), and `targets`, over the new set; writes go to
    both (`write_set`). Without a change the two are the same."""

    def __init__(self, cmap: ClusterMap):
        self._cache: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._tcache: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._wcache: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._rcache: dict[tuple[str, int, int, str], tuple | None] = {}
        self._routes: dict[tuple, tuple | None] = {}  # (route's sharing)
        # chunks (lineage, index) whose joining targets a gateway of this host recorded
        # stale in the current change of data set (VolumeGateway._replicate_piece); set_map
        # forgets them when the data-set generation moves, so they never outlive it
        self.joining_marked: set[tuple[str, int]] = set()
        # (a view of the generation before, the chunks marked in it) when this one restarts
        # its change from the same prev (joining_to_mark)
        self._carried: tuple[ClusterView, frozenset] | None = None
        self.map = None
        self.set_map(cmap)

    def set_map(self, cmap: ClusterMap) -> None:
        old = self.map
        if old is None or old.mgen != cmap.mgen:
            self._carried = None
            if (self.joining_marked and cmap.mgen == old.mgen + 1 and old.prev is not None
                    and cmap.prev == old.prev and cmap.prev_factors == old.prev_factors
                    and cmap.placed(leaving=True) == old.placed(leaving=True)):
                self._carried = (ClusterView(old), frozenset(self.joining_marked))
            self.joining_marked = set()
        self.map = cmap
        # the hosts with the capacity, zone and pod recorded with the data set, not those of
        # their live records: a host registered again with others moves nothing until the
        # controller records a change of data set (vbp.cluster.ClusterMap.placed)
        self._target = Placement(ClusterMap(cmap.epoch, cmap.placed_hosts()), cmap.factors)
        self._placement = (Placement(ClusterMap(cmap.epoch, cmap.placed_hosts(leaving=True)),
                                     cmap.prev_factors)
                           if cmap.prev is not None else self._target)
        self._cache.clear()
        self._tcache.clear()
        self._wcache.clear()
        self._rcache.clear()
        self._routes.clear()
        self._up = {h.id for h in cmap.hosts if h.state != "down"}
        self._addr = {h.id: h.peer for h in cmap.hosts}
        at: dict[str, str | None] = {}
        for h in cmap.hosts:  # (an address two records share names neither)
            at[h.peer] = h.id if h.peer not in at else None
        self._host_at = at
        # hosts whose decoder predates request ids (an upgrade under way): sent none
        self.no_rid = frozenset(h.id for h in cmap.hosts if h.peer_rev < 1)
        # hosts that do not take WriteBatch: their writes go one WriteChunk each
        self.no_batch = frozenset(h.id for h in cmap.hosts if h.peer_rev < m.BATCH_REV)
        # hosts that do not take RangeExtents: block status asks them one chunk at a time
        self.no_range_extents = frozenset(h.id for h in cmap.hosts
                                          if h.peer_rev < m.RANGE_EXTENTS_REV)
        # hosts that do not take ReadChunk.token: a holder's reads go to them without it
        self.no_read_token = frozenset(h.id for h in cmap.hosts
                                       if h.peer_rev < m.READ_TOKEN_REV)

    @property
    def epoch(self) -> int:
        return self.map.epoch

    @property
    def migrating(self) -> bool:
        return self.map.prev is not None

    def replicas(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """The hosts whose copies of the chunk are complete (less any recorded stale)."""
        k = (lineage, index, n)
        hosts = self._cache.get(k)
        if hosts is None:
            if len(self._cache) >= VIEW_CACHE_SIZE:
                self._cache.clear()
            hosts = self._cache[k] = tuple(self._placement.place(lineage, index, n))
        return hosts

    def holders(self) -> tuple[str, ...]:
        """The hosts every chunk's `replicas` are among."""
        return self._placement.hosts

    def everywhere(self, n: int) -> frozenset[str]:
        """The hosts in `replicas(lineage, index, n)` of every chunk (a pool of n hosts or
        fewer: all of them), known without placing any chunk."""
        return self._placement.everywhere(n)

    def first_in(self, lineage: str, index: int, among: frozenset[str]) -> bool:
        """Whether the chunk's first replica is one of `among` (vbp.placement.Placement.first_in):
        a necessary condition for all of `replicas` to be, at a few hashes a chunk."""
        return self._placement.first_in(lineage, index, among)

    def targets(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """The hosts the chunk is placed on by the new data set."""
        if self._placement is self._target:
            return self.replicas(lineage, index, n)
        k = (lineage, index, n)
        hosts = self._tcache.get(k)
        if hosts is None:
            if len(self._tcache) >= VIEW_CACHE_SIZE:
                self._tcache.clear()
            hosts = self._tcache[k] = tuple(self._target.place(lineage, index, n))
        return hosts

    def joining(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """Targets that are not yet replicas: they get the chunk by resync."""
        old = self.replicas(lineage, index, n)
        return tuple(h for h in self.targets(lineage, index, n) if h not in old)

    def joining_to_mark(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """The joining targets a gateway records stale before its first write of the chunk
        in this change: all, less those it recorded in the generation right before when
        the change restarted from the same prev. Those have been in the chunk's write set
        since (a resync brought them current, or their record is still there): recorded
        again, a target holding every acknowledged write would count as missing them, and
        with prev's last current copy lost the chunk would be given up (replicator.loss)."""
        joining = self.joining(lineage, index, n)
        carried = self._carried
        if carried is not None and (lineage, index) in carried[1]:
            before = carried[0].joining(lineage, index, n)
            joining = tuple(h for h in joining if h not in before)
        return joining

    def write_set(self, lineage: str, index: int, n: int) -> tuple[str, ...]:
        """The replicas, then the joining targets."""
        k = (lineage, index, n)
        hosts = self._wcache.get(k)
        if hosts is None:
            if len(self._wcache) >= VIEW_CACHE_SIZE:
                self._wcache.clear()
            hosts = self._wcache[k] = self.replicas(lineage, index, n) + self.joining(lineage, index, n)
        return hosts

    def route(self, lineage: str, index: int, n: int, me: str) -> tuple | None:
        """What the map says of a write to the chunk from host `me`, for the gateway's
        fast path (VolumeGateway._replicate_now): (write set, complete replicas, the other
        hosts' peer addresses in order, their ids, whether `me` holds a copy, whether they
        all take WriteBatch, the addresses sorted). None when the map alone rules the fast
        path out: a data-set change under way (hosts joining), fewer than `n` copies, no
        other host, another host down, a host of the pool without request ids. Cached with
        the placement (the map decides it all, so set_map clears it); the chunks placed on
        the same hosts share one route, so the cache costs a key per chunk written."""
        k = (lineage, index, n, me)
        try:
            return self._rcache[k]
        except KeyError:
            pass
        if len(self._rcache) >= VIEW_CACHE_SIZE:
            self._rcache.clear()
            self._routes.clear()  # (a route a chunk's entry there shares: no more of them)
        hosts = self.write_set(lineage, index, n)
        complete = self.replicas(lineage, index, n)
        shared = (hosts, complete, n, me)
        r = self._routes.get(shared, _NO_ROUTE)
        if r is _NO_ROUTE:
            r = self._routes[shared] = self._route(hosts, complete, n, me)
        self._rcache[k] = r
        return r

    def _route(self, hosts: tuple, complete: tuple, n: int, me: str) -> tuple | None:
        if len(hosts) != len(complete) or len(complete) < n:
            # (fewer copies than the volume wants: our map may lag hosts that joined, and
            # the general path reads it again first; a write here would leave their
            # copies behind with no stale record)
            return None
        remote = self.peer_addresses(hosts, me)
        if remote is None:
            return None
        names = tuple(h for h in hosts if h != me)
        return (hosts, complete, remote, names, len(names) < len(hosts),
                self.no_batch.isdisjoint(names), tuple(sorted(remote)))

    def peer_addresses(self, hosts, me: str) -> tuple[str, ...] | None:
        """The peer addresses of `hosts` other than `me`, in order, when a message can go
        to each of them without a task (each up, no decoder in the pool that predates
        request ids); else None, as when there is no other host."""
        if self.no_rid:
            return None
        remote = []
        for h in hosts:
            if h != me:
                if h not in self._up:
                    return None
                remote.append(self._addr[h])
        return tuple(remote) if remote else None

    def is_up(self, host_id: str) -> bool:
        return host_id in self._up

    def address(self, host_id: str) -> str:
        """The peer address of `host_id`; PeerUnavailable for a host the map no longer has
        (removed while a request to it was under way: a retry on a fresh map, say), which
        every caller takes as that peer failing."""
        try:
            return self._addr[host_id]
        except KeyError:
            raise PeerUnavailable(f"host {host_id} is not in the cluster map") from None

    def host_at(self, address: str) -> str | None:
        """The host the map has listening at peer `address`, None when none or several
        (PeerPool's check of the host a connection reaches)."""
        return self._host_at.get(address)
