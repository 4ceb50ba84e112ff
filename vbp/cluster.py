"""The cluster map: hosts, their failure domains and states, numbered by epoch.

The map is immutable; the registry produces a new one (with a higher epoch) whenever
membership or a host's state changes. Placement is a pure function of it (vbp.placement).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

HOST_UP = "up"
HOST_DOWN = "down"
HOST_DRAINING = "draining"
HOST_STATES = (HOST_UP, HOST_DOWN, HOST_DRAINING)

Place = tuple[str, int, str, str]  # (host id, capacity, zone, pod): what placement weighs


def authority(hostport: str) -> str:
    """A host record's HOST:PORT as a URI and a reader take it: an IPv6 address in
    brackets (blockd's record holds `::1:10809`, the brackets of its --nbd address
    stripped; `nbd://::1:10809/v` is no URI). Here, not in vbp.sockets, so that the
    `vbp` commands that print addresses do not import trio (a tenth of a second)."""
    host, _, port = hostport.rpartition(":")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class HostRecord:
    id: str
    peer: str  # "host:port" of the peer protocol
    nbd: str  # "host:port" of the NBD frontend
    zone: str = "zone0"
    pod: str = "pod0"
    capacity: int = 0  # bytes of chunk space offered to the pool
    state: str = HOST_UP
    maintenance: bool = False
    # revision of the peer messages this host decodes (replicator.messages.PEER_REV); 0 for
    # a host from before revisions were advertised: peers send it no optional fields
    peer_rev: int = 0
    # id of the chunk store this host's chunks are placed on (vbp.chunkstore): a host back
    # under its id with another store (a replaced disk) holds none of them
    store_id: str = ""

    @property
    def domain(self) -> tuple[str, str, str]:
        """Failure domain path zone/pod/host."""
        return (self.zone, self.pod, self.id)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HostRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_state(self, state: str) -> "HostRecord":
        return replace(self, state=state)


@dataclass(frozen=True, slots=True)
class ClusterMap:
    """`data` is the data set: the hosts chunks are placed on (None: every host in the map,
    a pool that never recorded one). While the data set changes, `prev` is the set it
    changes from (the one whose copies are complete) and `data` the target; `mgen` numbers
    the data sets (vbp.migration).

    `weights` are the data set's placement weight factors: (host, factor) pairs, sorted,
    factor in (0, 1), for the hosts whose placement weight (capacity) the controller lowered
    because they are nearly full (replicator.migration); a host not listed has factor 1.
    `prev_weights` are those of `prev`. A change of weights is a change of data set like a
    change of hosts: same generation, prev, scan and resync.

    `places` are the placement inputs of the data set's hosts as recorded with it: (host,
    capacity, zone, pod), sorted; `prev_places` those of `prev`. Placement weighs a host by
    these, never by its live record, so a host registered again with another capacity,
    zone or pod (an operator's restart with a new --capacity) moves no chunk by itself: the
    controller sees the difference (`drifted`) and changes the data set to the new inputs
    through the same prev, scan and resync. A host without a recorded entry (a record
    written by older code, which placed by the live records) is placed by its live record."""

    epoch: int
    hosts: tuple[HostRecord, ...] = field(default_factory=tuple)
    data: tuple[str, ...] | None = None
    prev: tuple[str, ...] | None = None
    mgen: int = 0
    weights: tuple[tuple[str, float], ...] = ()
    prev_weights: tuple[tuple[str, float], ...] = ()
    places: tuple[Place, ...] = ()
    prev_places: tuple[Place, ...] = ()

    def __post_init__(self) -> None:
        hosts = tuple(sorted(self.hosts, key=lambda h: h.id))
        for a, b in zip(hosts, hosts[1:]):
            if a.id == b.id:  # (placement would count it twice: two copies on one host)
                raise ValueError(f"cluster map: host id {a.id!r} has two records")
        object.__setattr__(self, "hosts", hosts)

    @property
    def data_set(self) -> tuple[str, ...]:
        return tuple(h.id for h in self.hosts) if self.data is None else self.data

    @property
    def factors(self) -> dict[str, float]:
        """Host id -> placement weight factor of the data set (hosts at 1 left out)."""
        return dict(self.weights)

    @property
    def prev_factors(self) -> dict[str, float]:
        return dict(self.prev_weights)

    def placed(self, leaving: bool = False) -> dict[str, tuple[int, str, str]]:
        """Host id -> (capacity, zone, pod) that placement weighs for each host of the data
        set (`leaving`: of the set being left, which must exist): as recorded with the set,
        else (older records) as the host's live record says."""
        ids, rec = (self.prev, self.prev_places) if leaving else (self.data_set, self.places)
        got = {p[0]: tuple(p[1:]) for p in rec}
        live = live_places(self, ids)
        # (a host of the set may be gone from the map: a remove racing the controller)
        return {h: got[h] if h in got else live[h] for h in ids if h in got or h in live}

    def placed_hosts(self, leaving: bool = False) -> tuple[HostRecord, ...]:
        """The hosts of the data set (`leaving`: of prev) as placement sees them: their
        records with the recorded capacity, zone and pod (`placed`), all up (a down host
        keeps its chunks until the data set leaves it). Hosts without a record are left
        out (placement has no address for them)."""
        by_id = {h.id: h for h in self.hosts}
        return tuple(replace(by_id[h], state=HOST_UP, capacity=cap, zone=zone, pod=pod)
                     for h, (cap, zone, pod) in self.placed(leaving).items() if h in by_id)

    @property
    def places_recorded(self) -> bool:
        """Whether the record of the data set (and of prev) holds every host's placement
        inputs (False for a record written by older code)."""
        have = {p[0] for p in self.places}
        prev = {p[0] for p in self.prev_places}
        return set(self.data_set) <= have and set(self.prev or ()) <= prev

    def drifted(self) -> tuple[str, ...]:
        """Hosts of the data set whose live record no longer has the capacity, zone or pod
        their chunks are placed by: the data set should change to the live inputs."""
        live = live_places(self, self.data_set)
        return tuple(h for h, p in self.placed().items() if live.get(h, p) != p)

    @property
    def migrating(self) -> bool:
        return self.prev is not None

    def host(self, host_id: str) -> HostRecord | None:
        for h in self.hosts:
            if h.id == host_id:
                return h
        return None

    def up_hosts(self) -> tuple[HostRecord, ...]:
        return tuple(h for h in self.hosts if h.state != HOST_DOWN)

    def controller(self) -> str | None:
        """The controller: the up host with the lowest id (replicator.migration; every
        step of it is a compare-and-set, so two controllers are harmless). None: no host up."""
        return min((h.id for h in self.up_hosts()), default=None)

    @classmethod
    def build(cls, epoch: int, hosts: Iterable[HostRecord]) -> "ClusterMap":
        return cls(epoch, tuple(hosts))


def live_places(cmap: ClusterMap, ids: Iterable[str]) -> dict[str, tuple[int, str, str]]:
    """Host id -> (capacity, zone, pod) of the hosts' live records (those in the map)."""
    by_id = {h.id: h for h in cmap.hosts}
    return {i: (h.capacity, h.zone, h.pod) for i in ids if (h := by_id.get(i)) is not None}


def place_tuples(places, hosts: Iterable[str]) -> tuple[Place, ...]:
    """The canonical form of placement inputs for a set of `hosts`: sorted (host,
    capacity, zone, pod) of those hosts, from {host: (capacity, zone, pod)}."""
    keep = set(hosts)
    return tuple(sorted((h, int(p[0]), str(p[1]), str(p[2]))
                        for h, p in dict(places or {}).items() if h in keep))


def weight_pairs(factors, hosts: Iterable[str]) -> tuple[tuple[str, float], ...]:
    """The canonical form of weight factors for a data set of `hosts`: sorted (host,
    factor) pairs of those hosts whose factor is below 1 (others are at 1)."""
    keep = set(hosts)
    return tuple(sorted((h, float(f)) for h, f in dict(factors or {}).items()
                        if h in keep and 0 < f < 1))
