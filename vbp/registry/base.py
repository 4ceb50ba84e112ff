"""The registry: cluster metadata behind one synchronous interface (DESIGN.md, Packages).

Theory of operation. Everything is written once over the small KV contract of
vbp.registry.kv, so the embedded LMDB backend and etcd behave the same. Key layout:

    vbp/cluster/host/<id>    HostRecord (stored state is "up" or "draining", never "down")
    vbp/cluster/alive/<id>   liveness, a key with a TTL refreshed by heartbeat()
    vbp/cluster/map          {"epoch", "digest"}: the last published map
    vbp/cluster/dataset      {"hosts", "prev", "gen", "weights", "prev_weights", "places",
                             "prev_places"}: the data set and the one it leaves; weights:
                             {host: factor} below 1; places: {host: [capacity, zone, pod]}
                             as placement weighs them (vbp.cluster.ClusterMap.places)
    vbp/scanned/<host>       the data-set generation whose scan the host finished
    vbp/vol/<name>           a volume record (a msgpack-able dict owned by vbp.volume)
    vbp/ctr/<name>           an id counter: the last id handed out (next_id)
    vbp/ctr/gen/<lineage>    the lineage's generation counter: created with its first
                             volume's record (create_volume), removed with its last
                             volume (_forget_lineages)
    vbp/lease/<volume>       {"holder", "token", "expires", "live_key"}: the volume's write
                             lease (see the lease liveness rule)
    vbp/leaselive/<volume>   the token of the lease's grant: a key with the lease's TTL,
                             put by the grant and each renewal, deleted by the release
    vbp/stale/<lineage>\\0<index:016x>\\0<host>   version a replica missed
    vbp/loss/<lineage>       {"losses": [...]}: chunks of the lineage an operator gave up
                             (vbp volume accept-loss; vbp.volume.AcceptedLoss), bounded;
                             removed with the lineage's last volume (delete_volume)
    vbp/scrub/request        {"id", "volume", "hosts", "time"}: the last `vbp pool scrub`
    vbp/scrub/result/<id:016x>/<host>   that host's progress, then its result

Epoch rule: cluster_map() reads vbp/cluster/ in one snapshot, derives each host's
effective state (a host whose alive key is gone is "down" unless in maintenance) and hashes
the effective records (not the data set's recorded places: they change only with its
generation, which is hashed, and hosts of older code, which do not know them, must hash
the same map to the same digest). If the digest differs from the published one, it publishes
epoch + 1 by compare-and-set on vbp/cluster/map (retrying on a lost race), so every reader
agrees on one epoch per distinct map and the epoch strictly grows on every change of
membership, state, domain, capacity or address.

Lease token rule: a grant is a CAS on vbp/lease/<volume> and its token is
max(store revision at the read + 1, previous token + 1). Grants of one volume are
serialized by the CAS on the record's mod revision, and the record is never deleted (a
release clears its holder, keeps its token), so every grant sees the previous token and a
new token is strictly greater than every earlier one for that volume. (Deleting it would
break this: a CAS on "absent" can succeed after a grant and a release that happened between
its read and its write.) Renewal keeps the token; a takeover or a release changes the
record, and renewing then raises Fenced.

Lease liveness rule: a lease is held while its record names a holder and its liveness key
vbp/leaselive/<volume> is there naming the record's token. The key is put with the lease's
TTL in the transaction of the grant and of each renewal, and deleted in the release's, so
it runs out on the store's own clock (the machine's boot clock for the embedded registry,
etcd's leases): no step of a wall clock, nor a skew between machines, makes a live lease
look run out (another gateway taking the volume while its holder serves it) or a dead one
look live. A grant compares both keys, so it commits only on the liveness it judged. The
record still carries `expires`, the writer's wall clock + TTL, for the code before this
rule in a mixed-version pool, which judges by it; a record this code writes says
`live_key`, and one without it (written by that code) is judged by its `expires` on the
wall clock still, so that an older gateway's live lease is not taken over. Fencing tokens
keep every case safe all the same (replicas reject writes with an older token).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import msgpack
import xxhash

from vbp.cluster import (
    HOST_DOWN, HOST_DRAINING, HOST_UP, ClusterMap, HostRecord, live_places, place_tuples, weight_pairs,
)
from vbp.errors import (
    AlreadyExists,
    BadValue,
    Fenced,
    InUse,
    InvalidArgument,
    LeaseHeld,
    NotFound,
    RegistryUnavailable,
)
from vbp.registry.kv import KV, Cmp, Delete, Put

P_CLUSTER = b"vbp/cluster/"
P_HOST = b"vbp/cluster/host/"
P_ALIVE = b"vbp/cluster/alive/"
K_MAP = b"vbp/cluster/map"
K_DATASET = b"vbp/cluster/dataset"  # {"hosts", "prev", "gen", "weights", ..., "places"} (vbp.migration)
P_SCANNED = b"vbp/scanned/"  # <host> -> the data-set generation whose scan it finished
P_VOL = b"vbp/vol/"
P_CTR = b"vbp/ctr/"
P_CTR_GEN = b"vbp/ctr/gen/"  # <lineage> -> the last generation handed out (control.api.gen_counter)
SWEEP_MAX = 64  # removals of one delete's sweep (Registry._forget_lineages)
P_LEASE = b"vbp/lease/"
P_LEASE_LIVE = b"vbp/leaselive/"  # <volume> -> the token of the live grant (a TTL key)
P_STALE = b"vbp/stale/"
# put by every mark_stale that creates a record: a change of data set completes only if its
# mod revision is still the one read before the records were listed (set_data_set)
K_STALE_SEQ = b"vbp/stale_seq"
# put by every creation of a volume record: a pool that listed no volume switches its data
# set at once only if its mod revision is still the one read before the listing
K_VOL_SEQ = b"vbp/vol_seq"
P_LOSS = b"vbp/loss/"  # <lineage> -> its accepted losses (vbp.volume.note_accepted)
# <lineage>/<volume name>/<record revision> -> {"gens": the generations its record named,
# "at": when}: what a volume deleted lately read (deleted_gens); kept GONE_KEEP
P_GONE = b"vbp/gone/"
GONE_KEEP = 30 * 24 * 3600  # (as vbp.chunkstore.COLLECTED_KEEP)
P_STATS = b"vbp/stats/"
K_SCRUB = b"vbp/scrub/request"
P_SCRUB_RESULT = b"vbp/scrub/result/"  # per-host usage, published with the heartbeat (not part of the map)

CAS_ATTEMPTS = 1000
TXN_OPS_MAX = 100  # operations in one transaction at most (etcd's default limit is 128)
# The largest value written for a record that grows with use (a volume's: every snapshot
# carries the chain of generations it froze, and the chain gains one at every snapshot
# ever taken, deleted or not). etcd refuses a request over its --max-request-bytes, 1.5 MiB
# by default; 32 KiB are left for the rest of a transaction (keys, compares).
VALUE_MAX = 1_572_864 - 32_768
SNAPSHOTS_HINT = "each snapshot keeps the chain of generations it froze: delete snapshots to make room"


@dataclass(frozen=True, slots=True)
class Lease:
    volume: str
    holder: str
    token: int
    # the writer's time.time() + TTL at the grant or renewal: what the code before the
    # liveness key judges by (see base's lease liveness rule); this code does not
    expires: float
    # granted over a holder that never released it (crashed, partitioned, or an earlier
    # incarnation of the same holder): writes it had in flight may have reached only some
    # replicas (blockd reconciles them before its first write)
    taken_over: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class StaleRecord:
    lineage: str
    index: int
    host_id: str
    version: int
    # the registry revision that created the record: when this copy stopped being current
    # (later failures raise `version`, not this). Orders the copies of a chunk that are all
    # stale: the one that went stale last holds every acknowledged write, unless its
    # version's LACKS_EARLIER says otherwise (replicator.loss).
    since: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class LossVerdict:
    """What clear_stale_unless_changed's `decide` judged: the copy whose stale record goes
    (`keep`: it counts as current again), the lineage's loss record to write, what to
    return, and the chunk's copies it judged (`judged`): one without a record then must
    still have none at the commit."""

    keep: str
    losses: dict
    result: object = None
    judged: tuple[str, ...] = ()


# Flag bits of a stale record's version (see mark_stale), read by the all-stale election
# (replicator.loss.last_current):
# - NEVER_CURRENT: set by a host that came back with an empty store for the copies it
#   misses (replicator.recovery, backfill); such a copy was never current, so resync never
#   elects it as the copy that went stale last.
# - LACKS_EARLIER: set by a host's crash recovery after a reboot (a power loss): the copy
#   lost the writes it took since its last flush, so having gone stale last does not make
#   it the copy that holds every acknowledged write.
# The versions are clocks in nanoseconds (time_ns), below both bits until 2043.
NEVER_CURRENT = 1 << 62
LACKS_EARLIER = 1 << 61
STALE_FLAGS = NEVER_CURRENT | LACKS_EARLIER


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_UNREAD = object()  # (Registry._held: the liveness key not read yet)


def _live_value(token: int) -> bytes:
    """A lease's liveness key's value: the token of the grant it keeps live."""
    return _pack(token)


def _lease_keys(volume: str) -> tuple[bytes, bytes]:
    """A volume's lease record key and its liveness key."""
    name = _name("volume name", volume)
    return P_LEASE + name, P_LEASE_LIVE + name


def _orphaned(d: dict) -> bool:
    """A released lease record (decoded) that still owes a takeover's reconcile
    (release_lease)."""
    return bool(d.get("orphaned"))


def sized(what: str, record, hint: str = "", old: bytes | None = None) -> bytes:
    """The record packed, unless that is over VALUE_MAX and larger than `old` (a record
    grown past it before may still shrink or change in place): InvalidArgument then,
    naming the record and the limit, before any store refuses it."""
    value = _pack(record)
    if len(value) > VALUE_MAX and (old is None or len(value) > len(old)):
        raise InvalidArgument(
            f"{what} would take {len(value)} bytes, over the registry's limit of {VALUE_MAX} "
            f"bytes for one record (etcd refuses a request over 1.5 MiB)" + (f"; {hint}" if hint else ""))
    return value


def _stats_value(host_id: str, stats: dict) -> bytes:
    # (each open export a host must keep readable is listed with its chain of generations)
    return sized(f"stats of host {host_id}", stats, "too many exports open on it")


def _unpack(b: bytes):
    return msgpack.unpackb(b, raw=False, strict_map_key=False)


def _host_in_use(old: HostRecord) -> InUse:
    return InUse(f"host id {old.id} is in use by a running blockd with another disk (peer "
                 f"{old.peer}, store {old.store_id}): give this one another --host-id, or "
                 f"stop that one")


def _name(kind: str, s: str) -> bytes:
    if not isinstance(s, str) or not s or "\x00" in s:
        raise BadValue(f"invalid {kind}: {s!r} (a non-empty string without NUL)")
    return s.encode()



def named_gens(d: dict) -> set[int]:
    """The generations a volume record (dict) names: its head chain, a pending head, a
    shrink's head and its snapshots' chains."""
    gens = set(d.get("chain", ())) | {d.get("pending", 0), d.get("shrink_head", 0)}
    for snap in d.get("snapshots", ()):
        gens.update(snap.get("chain", ()))
    gens.discard(0)
    return gens

class Registry:
    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.url = kv.url

    def close(self) -> None:
        self.kv.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({self.url!r})"

    def _contended(self, what: str) -> RegistryUnavailable:
        return RegistryUnavailable(f"registry {self.url}: {what}: too many concurrent updates")

    # --- hosts and the cluster map -----------------------------------------------------

    def register_host(self, rec: HostRecord, ttl: float, exclusive: str = "") -> ClusterMap:
        """Record this host (its addresses, store id) and mark it alive for `ttl` seconds.
        `exclusive` (a blockd starting: the id of the store it opened, which the record
        it registers may not name yet while it backfills a new disk): InUse while the
        record names another store and its liveness key is still there, that is, another
        blockd of the same host id with another disk runs (or ran less than its ttl ago):
        taking its place would send its peers to this one, and make that one's disk count
        as a replaced one at its restart."""
        key = P_HOST + _name("host id", rec.id)
        for _ in range(CAS_ATTEMPTS):
            item, _rev = self.kv.get(key)
            new = rec
            if item is not None:
                old = HostRecord.from_dict(_unpack(item.value))
                if exclusive and self._alive_elsewhere(old, exclusive):
                    raise _host_in_use(old)
                new = HostRecord.from_dict({**rec.to_dict(), "state": old.state,
                                            "maintenance": old.maintenance})
            elif new.state not in (HOST_UP, HOST_DRAINING):
                new = new.with_state(HOST_UP)
            ok, _ = self.kv.txn(
                [Cmp(key, "mod", item.mod_rev if item else 0)],
                [Put(key, _pack(new.to_dict())), Put(P_ALIVE + rec.id.encode(), b"1", ttl)],
            )
            if ok:
                return self.cluster_map()
        raise self._contended(f"register host {rec.id}")

    def check_host_free(self, host_id: str, store_id: str) -> None:
        """InUse (naming it) while another blockd of `host_id` runs (_alive_elsewhere).
        InvalidArgument when store `store_id` is another host's (its record names it): a
        blockd given another host's data directory (ChunkStore.claim, for a store that
        predates its record of its host)."""
        key = P_HOST + _name("host id", host_id)
        items, _ = self.kv.range(P_HOST)
        for item in items:
            rec = HostRecord.from_dict(_unpack(item.value))
            if item.key == key:
                if self._alive_elsewhere(rec, store_id):
                    raise _host_in_use(rec)
            elif store_id and rec.store_id == store_id:
                raise InvalidArgument(
                    f"the chunk store {store_id} is host {rec.id}'s (its record in the "
                    f"registry names it), not host {host_id}'s: set host_id to {rec.id}, "
                    f"or give host {host_id} a data directory of its own")

    def _alive_elsewhere(self, old: HostRecord, store_id: str) -> bool:
        """Host record `old` names another store than `store_id` and its liveness key is
        still there: another blockd of this id, with another disk, runs (or ran less than
        its ttl ago)."""
        return bool(old.store_id) and old.store_id != store_id and self.host_alive(old.id)

    def heartbeat(self, host_id: str, ttl: float, stats: dict | None = None) -> None:
        """Refresh the host's liveness key and publish its stats, guarded by the host
        record's existence. With stats to publish, the liveness key is kept alive
        (KV.keep_alive) rather than written, and the stats join its lease (etcd): a write
        of it was an event to every host's map watcher, N hosts sending N² a period for
        nothing that changes a map, and a lease granted and expired, two raft proposals
        more. Put again only when it is not there to keep (expired: the host was down),
        or when there are no stats to publish (none given, or too large): the liveness
        key then takes a lease of its own, so the last stats, on the lease kept alive
        until now, lapse `ttl` after they were published. Stats too large for the
        registry (InvalidArgument) are raised after the liveness is refreshed."""
        key = P_HOST + _name("host id", host_id)
        alive, stats_key = P_ALIVE + host_id.encode(), P_STATS + host_id.encode()
        value = too_large = None
        if stats is not None:
            try:
                value = _stats_value(host_id, stats)
            except InvalidArgument as e:
                too_large = e
        guard = [Cmp(key, "exists", 0)]
        ok = False
        if value is not None and self.kv.keep_alive(alive, ttl):
            # (gone since? The host removed, or its key lapsed right after: as below)
            ok, _ = self.kv.txn(guard + [Cmp(alive, "exists", 0)],
                                [Put(stats_key, value, ttl, lease_of=alive)])
        if not ok:
            ops = [Put(alive, b"1", ttl)]
            if value is not None:
                ops.append(Put(stats_key, value, ttl))
            ok, _ = self.kv.txn(guard, ops)
        if not ok:
            raise NotFound(f"host {host_id} is not registered")
        if too_large is not None:
            raise too_large

    def host_ids(self) -> list[str]:
        """The ids of the hosts of the pool, read only (cluster_map may write: it publishes
        a map that changed)."""
        items, _ = self.kv.range(P_HOST)
        return sorted(it.key[len(P_HOST):].decode() for it in items)

    def cluster_map(self) -> ClusterMap:
        for _ in range(CAS_ATTEMPTS):
            items, _rev = self.kv.range(P_CLUSTER)
            hosts, alive, published, dataset = [], set(), None, None
            for it in items:
                if it.key == K_DATASET:
                    dataset = _unpack(it.value)
                elif it.key.startswith(P_HOST):
                    hosts.append(HostRecord.from_dict(_unpack(it.value)))
                elif it.key.startswith(P_ALIVE):
                    alive.add(it.key[len(P_ALIVE):].decode())
                elif it.key == K_MAP:
                    published = it
            eff = [h if (h.id in alive or h.maintenance) else h.with_state(HOST_DOWN) for h in hosts]
            ds = dataset or {}
            data = tuple(ds["hosts"]) if dataset else None
            prev = tuple(ds["prev"]) if ds.get("prev") is not None else None
            mgen = ds.get("gen", 0)
            weights = weight_pairs(ds.get("weights"), data or ())
            prev_weights = weight_pairs(ds.get("prev_weights"), prev or ())
            places = place_tuples(ds.get("places"), data or ())
            prev_places = place_tuples(ds.get("prev_places"), prev or ())
            digest = xxhash.xxh3_128_digest(_pack([[h.to_dict() for h in eff], data, prev, mgen]
                                                  + ([weights, prev_weights] if weights or prev_weights else [])))
            if published is None:
                epoch, old_digest = 0, xxhash.xxh3_128_digest(_pack([]))
            else:
                m = _unpack(published.value)
                epoch, old_digest = m["epoch"], m["digest"]
            if digest == old_digest:
                return ClusterMap(epoch, tuple(eff), data, prev, mgen, weights, prev_weights,
                                  places, prev_places)
            ok, _ = self.kv.txn(
                [Cmp(K_MAP, "mod", published.mod_rev if published else 0)],
                [Put(K_MAP, _pack({"epoch": epoch + 1, "digest": digest}))],
            )
            if ok:
                return ClusterMap(epoch + 1, tuple(eff), data, prev, mgen, weights, prev_weights,
                                  places, prev_places)
        raise self._contended("publish cluster map")

    def _update_host(self, host_id: str, change: Callable[[HostRecord], HostRecord]) -> ClusterMap:
        key = P_HOST + _name("host id", host_id)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            if item is None:
                raise NotFound(f"host {host_id} is not registered")
            new = change(HostRecord.from_dict(_unpack(item.value)))
            ok, _ = self.kv.txn([Cmp(key, "mod", item.mod_rev)], [Put(key, _pack(new.to_dict()))])
            if ok:
                return self.cluster_map()
        raise self._contended(f"update host {host_id}")

    def set_host_state(self, host_id: str, state: str) -> ClusterMap:
        if state not in (HOST_UP, HOST_DRAINING):
            raise InvalidArgument(f"host state must be 'up' or 'draining', not {state!r}")
        return self._update_host(host_id, lambda h: h.with_state(state))

    def draining(self) -> frozenset[str]:
        """Ids of the hosts stored as draining, up or down: the map shows a host whose
        alive key is gone as down whatever its stored state, and a drain of a down host
        is the operator's word that it is out now (replicator.migration)."""
        items, _rev = self.kv.range(P_HOST)
        return frozenset(r.id for it in items
                         if (r := HostRecord.from_dict(_unpack(it.value))).state == HOST_DRAINING)

    def set_maintenance(self, host_id: str, on: bool) -> ClusterMap:
        return self._update_host(host_id, lambda h: HostRecord.from_dict({**h.to_dict(), "maintenance": bool(on)}))

    def liveness_ttl(self, ttl: float) -> float:
        """How long a liveness key put with `ttl` may outlast its last refresh: `ttl`, or
        the store's floor when it keeps keys longer (KV.ttl_floor: etcd's minimum)."""
        return max(ttl, self.kv.ttl_floor())

    def host_alive(self, host_id: str) -> bool:
        """The host's liveness key is there: its blockd runs, or stopped less than its
        heartbeat ttl ago."""
        return self.kv.get(P_ALIVE + _name("host id", host_id))[0] is not None

    def hosts_on_the_wall_clock(self) -> list[str]:
        """Live hosts whose liveness key the code before the boot clock keeps, in an
        embedded registry (vbp.registry.local): they read the liveness of newer hosts as
        run out, and publish them down. [] for etcd, whose leases time every host."""
        keys = getattr(self.kv, "wall_clock_keys", None)
        return sorted(k[len(P_ALIVE):].decode() for k in keys(P_ALIVE)) if keys else []

    def remove_host(self, host_id: str, *, unless_alive: bool = False) -> ClusterMap:
        """Forget a host. Refused while chunks are placed on it (it is in the data set, or in
        the set a change of data set leaves): its copies would vanish from placement before
        others hold them. Draining it (or its being down) takes it out first. With
        `unless_alive`, refused (InUse) while its blockd runs (host_alive, judged again in
        the removal's transaction): a running blockd registers again at its next
        heartbeat, as a new host, up and not draining, and takes chunks again."""
        key = P_HOST + _name("host id", host_id)
        alive = P_ALIVE + host_id.encode()
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            if item is None:
                raise NotFound(f"host {host_id} is not registered")
            guard = []
            if unless_alive:
                if self.host_alive(host_id):
                    raise InUse(f"host {host_id} is up: stop its blockd first (a running one "
                                f"registers again at its next heartbeat and takes chunks "
                                f"again), then remove it")
                guard = [Cmp(alive, "mod", 0)]
            ds, _ = self.kv.get(K_DATASET)
            if ds is None:
                holds = True
            else:
                d = _unpack(ds.value)
                holds = host_id in d["hosts"] or host_id in (d.get("prev") or ())
            if holds:
                raise InvalidArgument(
                    f"host {host_id} is in the data set (chunks are placed on it, whether "
                    f"its disk holds them yet or not): drain it (vbp host drain {host_id} "
                    f"--wait) and remove it when the drain is complete")
            ok, _ = self.kv.txn([Cmp(K_DATASET, "mod", ds.mod_rev), *guard],
                                [Delete(key), Delete(alive)])
            if ok:
                return self.cluster_map()
        raise self._contended(f"remove host {host_id}")

    def set_data_set(self, gen: int, hosts, prev, weights=None, prev_weights=None,
                     places=None, prev_places=None, stale_seq: int | None = None,
                     vol_seq: int | None = None) -> ClusterMap:
        """Replace the data set if its generation is still `gen` (compare-and-set; the new
        one has generation gen + 1). `weights` and `prev_weights` ({host: factor}) are the
        placement weight factors of `hosts` and `prev`; factors of 1 and of hosts outside
        the set are left out. `places` and `prev_places` ({host: (capacity, zone, pod)})
        are what placement weighs for the hosts of each set; None (or a host left out):
        the host's record as it is now. Returns the map either way: a caller that lost
        the race sees the winner's data set in it. `stale_seq` (stale_seq(), read before
        the stale records a completion was judged by were listed): only if no stale record
        was created since (a joining target recorded stale after the listing must keep the
        change from completing: it would count as a complete copy missing a write).
        `vol_seq` (vol_seq(), read before the volumes were listed): only if no volume was
        created since (a pool that listed none switches with nothing to move only while
        that holds: a volume created meanwhile may have chunks on the set being left)."""
        item, _ = self.kv.get(K_DATASET)
        cur = _unpack(item.value)["gen"] if item else 0
        if cur == gen:
            record = {"hosts": sorted(hosts), "prev": None if prev is None else sorted(prev),
                      "gen": gen + 1}
            w = weight_pairs(weights, hosts)
            pw = weight_pairs(prev_weights, prev or ())
            if w:  # a record without weights stays as before weights existed
                record["weights"] = dict(w)
            if pw:
                record["prev_weights"] = dict(pw)
            live = {}
            if not (set(hosts) <= set(places or {}) and set(prev or ()) <= set(prev_places or {})):
                live = live_places(self.cluster_map(), set(hosts) | set(prev or ()))
            record["places"] = {h: list(p) for h, *p in place_tuples({**live, **(places or {})}, hosts)}
            if prev is not None:
                record["prev_places"] = {h: list(p) for h, *p in
                                         place_tuples({**live, **(prev_places or {})}, prev)}
            value = _pack(record)
            cmps = [Cmp(K_DATASET, "mod", item.mod_rev if item else 0)]
            if stale_seq is not None:
                cmps.append(Cmp(K_STALE_SEQ, "mod", stale_seq))
            if vol_seq is not None:
                cmps.append(Cmp(K_VOL_SEQ, "mod", vol_seq))
            self.kv.txn(cmps, [Put(K_DATASET, value)])
        return self.cluster_map()

    def stale_seq(self) -> int:
        """The mod revision of the key every creation of a stale record puts (0: none yet),
        for set_data_set's `stale_seq`."""
        item, _ = self.kv.get(K_STALE_SEQ)
        return item.mod_rev if item else 0

    def vol_seq(self) -> int:
        """The mod revision of the key every creation of a volume record puts (0: none
        yet), for set_data_set's `vol_seq`."""
        item, _ = self.kv.get(K_VOL_SEQ)
        return item.mod_rev if item else 0

    def mark_scanned(self, host_id: str, gen: int) -> None:
        self.kv.txn([], [Put(P_SCANNED + _name("host id", host_id), _pack(gen))])

    def scanned(self) -> dict[str, int]:
        items, _ = self.kv.range(P_SCANNED)
        return {it.key[len(P_SCANNED):].decode(): _unpack(it.value) for it in items}

    def wait_map_change(self, epoch: int, timeout: float) -> ClusterMap:
        """The first map with an epoch above `epoch`, or the current map after `timeout`."""
        deadline = time.monotonic() + timeout
        changed = True
        while True:
            if changed:  # (etcd: only for an event; every host reading every second cost
                # the registry N² records a second)
                _, rev = self.kv.get(K_MAP)
                m = self.cluster_map()
            left = deadline - time.monotonic()
            if m.epoch > epoch or left <= 0:
                return m
            # Liveness expiry needs no write on LMDB, so never wait long without a re-check.
            # (a heartbeat's refresh of a live host's mark changes no map: not waited for)
            changed = self.kv.wait(P_CLUSTER, rev, min(left, 1.0), refreshes=P_ALIVE)

    def volume_changes(self, after_rev: int, timeout: float) -> tuple[set[str] | None, int]:
        """The names of the volumes whose records changed (made, changed, deleted) after
        `after_rev`, and the revision they are told up to (the next call's `after_rev`),
        as soon as one did; (empty set, after_rev) once `timeout` passed with none.
        (None, rev) when the registry cannot tell which (LMDB, memory: something changed
        somewhere; etcd: the watch failed): read every record again, at `rev` or later
        (-1: read revision() first)."""
        return self._changed(P_VOL, after_rev, timeout)

    def stale_changes(self, after_rev: int, timeout: float) -> tuple[set[str] | None, int]:
        """volume_changes for the stale records: the lineages whose records changed."""
        return self._changed(P_STALE, after_rev, timeout)

    def _changed(self, prefix: bytes, after_rev: int, timeout: float) -> tuple[set[str] | None, int]:
        """KV.changes under `prefix`, each key told as the name it begins with (up to its
        first NUL: a volume's name, a stale record's lineage)."""
        keys, rev = self.kv.changes(prefix, after_rev, timeout)
        if keys is None:
            return None, rev
        return {k[len(prefix):].split(b"\x00", 1)[0].decode(errors="replace")
                for k in keys if k.startswith(prefix)}, rev

    # --- volumes -------------------------------------------------------------------------

    def create_volume(self, name: str, record: dict, counters: dict[str, int] | None = None) -> None:
        """Create volume `name` with `record`. `counters` ({counter name: value}, as
        next_id names and counts them) are created in the same transaction, each only if
        absent: a new lineage's generation counter at the head its record names. Drawn
        before the create (next_id), a counter stayed when the create failed; and made
        apart from the record, a delete's sweep (_forget_lineages) could take it between
        the two, leaving the volume's lineage to count from 1 again. AlreadyExists, with
        nothing written, when the name is taken or a counter exists."""
        key = P_VOL + _name("volume name", name)
        value = sized(f"volume {name} record", record, SNAPSHOTS_HINT)
        ckeys = {P_CTR + _name("counter name", c): n for c, n in (counters or {}).items()}
        cmps = [Cmp(key, "mod", 0)] + [Cmp(k, "mod", 0) for k in ckeys]
        ops = [Put(key, value), Put(K_VOL_SEQ, b"")] + [Put(k, _pack(n)) for k, n in ckeys.items()]
        try:
            ok, _ = self.kv.txn(cmps, ops)
        except RegistryUnavailable as e:
            # (the record and its counters are written together or not at all: the record
            # found there is this create's, counters included)
            ok = self._made_by_us(key, value, e)
        if ok:
            return
        taken = [k for k in ckeys if self.kv.get(k)[0] is not None]
        if taken and self.kv.get(key)[0] is None:
            raise AlreadyExists(f"volume {name}: counter {taken[0][len(P_CTR):].decode()} "
                                f"already exists (its lineage is another volume's)")
        raise AlreadyExists(f"volume {name} already exists")

    def _made_by_us(self, key: bytes, value: bytes, failure: RegistryUnavailable) -> bool:
        """After a create's txn failed, maybe with an unknown outcome (etcd: committed,
        its answer lost): True if `key` holds the very record `value` (a volume record is
        made once: a new lineage, or a clone's new head), False if another record;
        `failure` raised again if none is there or it cannot be read (still unknown)."""
        try:
            item, _ = self.kv.get(key)
        except RegistryUnavailable:
            item = None
        if item is None:
            raise failure
        return item.value == value

    def create_from(self, name: str, parent: str, make: Callable[[dict], dict]) -> dict:
        """Create volume `name` with the record `make(parent's record)`, in a transaction
        that also checks the parent's record is unchanged (a clone): a snapshot deleted,
        or the parent deleted, between the read and the create would leave the new record
        naming generations that garbage collection frees. `make` raises if the parent's
        record no longer offers what it needs; the record made is returned."""
        key = P_VOL + _name("volume name", name)
        pkey = P_VOL + _name("volume name", parent)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(pkey)
            if item is None:
                raise NotFound(f"volume {parent} does not exist")
            record = make(_unpack(item.value))
            value = sized(f"volume {name} record", record, SNAPSHOTS_HINT)
            try:
                ok, _ = self.kv.txn([Cmp(key, "mod", 0), Cmp(pkey, "mod", item.mod_rev)],
                                    [Put(key, value), Put(K_VOL_SEQ, b"")])
            except RegistryUnavailable as e:
                if self._made_by_us(key, value, e):
                    return record
                raise AlreadyExists(f"volume {name} already exists") from None
            if ok:
                return record
            if self.kv.get(key)[0] is not None:
                raise AlreadyExists(f"volume {name} already exists")
        raise self._contended(f"create volume {name} from {parent}")

    def get_volume(self, name: str) -> dict:
        item, _ = self.kv.get(P_VOL + _name("volume name", name))
        if item is None:
            raise NotFound(f"volume {name} does not exist")
        return _unpack(item.value)

    def list_volumes(self) -> list[dict]:
        items, _ = self.kv.range(P_VOL)
        return [_unpack(it.value) for it in items]

    def _still_held(self, volume: str, lkey: bytes, lease: Lease, what: str = "") -> Cmp:
        """The compare that keeps a transaction to while `volume`'s lease record (at
        `lkey`) is still `lease` (same holder and token, expired or not); Fenced, `what`
        ending its message, if it is not now (update_volume, mark_stale)."""
        litem, _ = self.kv.get(lkey)
        cur = self._lease_of(volume, _unpack(litem.value)) if litem else None
        if cur is None or (cur.holder, cur.token) != (lease.holder, lease.token) or not cur.holder:
            raise Fenced(f"lease of volume {volume} (token {lease.token}) is no longer "
                         f"held by {lease.holder}{what}")
        return Cmp(lkey, "mod", litem.mod_rev)

    def update_volume(self, name: str, fn: Callable[[dict], dict], lease: Lease | None = None) -> dict:
        """Replace the volume's record by fn(record), atomically (compare and swap). With
        `lease`, only while the volume's lease record is still that lease (same holder and
        token, expired or not): the lease key is compared in the same transaction, so a
        gateway that lost the lease to a takeover cannot change the record after it
        (raises Fenced). A snapshot is completed this way by the gateway that drains the
        writes to the old head: only the one that holds the lease writes."""
        key = P_VOL + _name("volume name", name)
        lkey = P_LEASE + _name("volume name", name) if lease is not None else None
        for _ in range(CAS_ATTEMPTS):
            cmps = []
            if lkey is not None:
                cmps.append(self._still_held(name, lkey, lease))
            item, _ = self.kv.get(key)
            if item is None:
                raise NotFound(f"volume {name} does not exist")
            rec = _unpack(item.value)
            new = fn(rec)
            if new is None:  # fn changed the record in place
                new = rec
            cmps.append(Cmp(key, "mod", item.mod_rev))
            value = sized(f"volume {name} record", new, SNAPSHOTS_HINT, old=item.value)
            try:
                ok, _ = self.kv.txn(cmps, [Put(key, value)])
            except RegistryUnavailable as e:
                # its outcome maybe unknown (etcd: committed, its answer lost): the record
                # found holding this very value is this update's, or one that made the
                # same change (a snapshot's new generation is new; a resize or a setting
                # to what is there already changes nothing)
                if self._made_by_us(key, value, e):
                    return new
                raise
            if ok:
                return new
        raise self._contended(f"update volume {name}")

    def delete_volume(self, name: str, unless_leased: bool = False) -> None:
        """Delete the volume's record; the loss record and the generation counter of a
        lineage left with no volume go too (_forget_lineages), or, the registry failing
        for that step, at a later delete. `unless_leased`: InUse while its write lease is
        live, judged in the same transaction (the lease record compared), so a lease taken
        after a caller's own check cannot be deleted under."""
        key = P_VOL + _name("volume name", name)
        lkey = P_LEASE + _name("volume name", name)
        for _ in range(CAS_ATTEMPTS):
            cmps = []
            if unless_leased:
                litem, _ = self.kv.get(lkey)
                lease = self._live_lease(name, litem)
                if lease is not None:
                    raise InUse(f"volume {name} is open by NBD clients ({name} on {lease.holder}, "
                                f"its write lease held); disconnect them, or use --force "
                                f"(their requests then fail with EIO)")
                cmps.append(Cmp(lkey, "mod", litem.mod_rev if litem else 0))
            item, _ = self.kv.get(key)
            if item is None:
                raise NotFound(f"volume {name} does not exist")
            gone = self._gone(key, _unpack(item.value), item.mod_rev)
            try:
                ok, _ = self.kv.txn([*cmps, Cmp(key, "mod", item.mod_rev)], [Delete(key), *gone])
            except RegistryUnavailable:
                # maybe an unknown outcome (etcd: committed, its answer lost): the entry
                # the delete writes names the record's revision, so it is there only if
                # this record was deleted (none to look for, or no read: still unknown)
                try:
                    ok = bool(gone) and self.kv.get(gone[0].key)[0] is not None
                except RegistryUnavailable:
                    ok = False
                if not ok:
                    raise
            if ok:
                try:
                    self._forget_lineages()
                except RegistryUnavailable:
                    pass  # the volume is deleted all the same; the next delete sweeps
                return
        raise self._contended(f"delete volume {name}")

    @staticmethod
    def _gone(key: bytes, d, rev: int) -> list:
        """The Put of deleted_gens' entry for the record `d` deleted at `key` (its
        revision `rev` in the key: a name deleted again in the same lineage, a clone
        made under it meanwhile, keeps the first delete's entry); none for a record with
        no lineage (tests store bare dicts)."""
        lineage = d.get("lineage") if isinstance(d, dict) else None
        if not isinstance(lineage, str) or not lineage or "/" in lineage or "\0" in lineage:
            return []
        gens = named_gens(d)
        gone = P_GONE + lineage.encode() + b"/" + key[len(P_VOL):] + b"/%d" % rev
        return [Put(gone, _pack({"gens": sorted(gens), "at": time.time()}))]

    def deleted_gens(self) -> dict[str, set[int]]:
        """lineage -> the generations the records of its volumes deleted in the last
        GONE_KEEP named (delete_volume). Garbage collection marks those no reader's chain
        holds on every host (ChunkStore.mark_collected), whether or not it held a chunk
        of them: a gateway still reading a deleted volume (cut off from the registry)
        gets an error there too, not zeros. Older entries are removed (best effort)."""
        items, _ = self.kv.range(P_GONE)
        old = time.time() - GONE_KEEP
        out: dict[str, set[int]] = {}
        for it in items:
            d = _unpack(it.value)
            if d.get("at", 0) < old:
                try:
                    self.kv.txn([Cmp(it.key, "mod", it.mod_rev)], [Delete(it.key)])
                except RegistryUnavailable:
                    pass
                continue
            lineage = it.key[len(P_GONE):].split(b"/", 1)[0].decode()
            out.setdefault(lineage, set()).update(d.get("gens", ()))
        return out

    def _forget_lineages(self) -> None:
        """Remove the loss records and the generation counters (vbp/ctr/gen/<lineage>) of
        lineages no volume is left in. Read after the delete, that is final: nothing can
        join such a lineage again (a clone is made only while its parent's record is
        there, create_from; a new volume makes a new lineage, its counter created with its
        record, create_volume), and accept-loss writes a lineage's record only while the
        volume it names is unchanged. Every lineage without volumes, not only the one just
        left: one whose last delete stopped before this step goes at the next delete.

        Order: the records to remove are read before the volumes. A volume created between
        the two reads has its record in the second (kept), and one created after both had
        no counter in the first (a new lineage's counter is made with its record, in one
        transaction): read the other way round, its counter would be found with no volume
        and removed, and its lineage would hand out generation 1 again. Each removal
        compares the key's revision as read: a counter drawn from meanwhile, or made again
        after (by a clone or a snapshot that read a volume of the lineage before its
        delete, and is refused at its commit, the volume gone), stays until a later
        delete. Only `gen/` counters: the others (scrub) belong to no lineage. At most
        SWEEP_MAX removals a delete (the counters the code before left behind, one
        transaction each, go over the next deletes).

        A counter goes only once a volume of its lineage was deleted (deleted_gens' entry,
        written with the delete, is there): the code before drew a new lineage's first
        generation before it created the record, and a counter found then, with no
        volume yet, is one about to have one (its next draw by that code, without
        next_gen's floor, would hand out 1 again). Counters that code left behind with no
        delete since (a failed create) stay."""
        losses, _ = self.kv.range(P_LOSS)
        gens, _ = self.kv.range(P_CTR_GEN)
        if gens:
            left_by = {it.key[len(P_GONE):].split(b"/", 1)[0] for it in self.kv.range(P_GONE)[0]}
            gens = [it for it in gens if it.key[len(P_CTR_GEN):] in left_by]
        if not losses and not gens:
            return
        live = {_unpack(it.value).get("lineage") for it in self.kv.range(P_VOL)[0]}
        left = SWEEP_MAX
        for prefix, items in ((P_LOSS, losses), (P_CTR_GEN, gens)):
            for it in items:
                if it.key[len(prefix):].decode() not in live:
                    if not left:
                        return
                    self.kv.txn([Cmp(it.key, "mod", it.mod_rev)], [Delete(it.key)])
                    left -= 1

    def next_id(self, counter: str, floor: int = 0) -> int:
        """The counter's next id, past `floor` too (1 for a counter not there yet and no
        floor), stored as its last. A lineage's generation counter is drawn from only for
        a volume of the lineage read before (a snapshot, a shrink, a clone, each refused
        if that volume is gone when it commits), with the generations its record names
        as the floor (control.api.next_gen): a new lineage's counter is created with its
        first record (create_volume), since a delete removes the counters of lineages
        with no volume (_forget_lineages); the code before drew it first and created the
        record after, and a delete between the two took the counter of a lineage about
        to have a volume. The floor keeps such a lineage's next generation new."""
        key = P_CTR + _name("counter name", counter)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            n = max(_unpack(item.value) if item else 0, floor) + 1
            ok, _ = self.kv.txn([Cmp(key, "mod", item.mod_rev if item else 0)], [Put(key, _pack(n))])
            if ok:
                return n
        raise self._contended(f"next id of {counter}")

    # --- volume write leases -------------------------------------------------------------

    # (the lease helpers below take a lease record decoded once by their caller, which
    # most often needs it for more than one of them)

    @staticmethod
    def _lease_of(volume: str, d: dict) -> Lease:
        return Lease(volume, d["holder"], d["token"], d["expires"])

    def _held(self, volume: str, d: dict, live=_UNREAD) -> bool:
        """Whether the lease record `d` (decoded) of `volume` is held (the lease liveness
        rule): a holder named, and its liveness key there naming its token (`live`: that
        key's item as read, None if absent; read here if not given). A record of the code
        before the key (no `live_key`) is judged by its `expires` on the wall clock."""
        if not d["holder"]:
            return False
        if not d.get("live_key"):
            return d["expires"] > time.time()
        if live is _UNREAD:
            live, _ = self.kv.get(P_LEASE_LIVE + _name("volume name", volume))
        return live is not None and live.value == _live_value(d["token"])

    def _granted(self, key: bytes, lkey: bytes, lease: Lease, ttl: float, cmps: list[Cmp],
                 kept: bool = False) -> bool:
        """Write `lease` (a grant or a renewal) with its liveness key, for `ttl`, if `cmps`
        hold; `kept`: the key was kept alive just now (the put joins its lease: Put)."""
        record = {"holder": lease.holder, "token": lease.token, "expires": lease.expires,
                  "live_key": True}
        ok, _ = self.kv.txn(cmps, [Put(key, _pack(record)), Put(
            lkey, _live_value(lease.token), ttl, lease_of=lkey if kept else None)])
        return ok

    def acquire_lease(self, volume: str, holder: str, ttl: float) -> Lease:
        """Grant `holder` the write lease. Re-acquiring one's own lease is a fresh grant
        with a new, greater token (it fences the holder's earlier incarnation). The grant
        compares the record and the liveness key as read: a renewal (or a grant) between
        the read and the write refuses it, and it judges again."""
        key, lkey = _lease_keys(volume)
        _name("lease holder", holder)
        for _ in range(CAS_ATTEMPTS):
            item, rev = self.kv.get(key)
            live, _ = self.kv.get(lkey)
            token = rev + 1
            d = _unpack(item.value) if item is not None else None
            if d is not None:
                cur = self._lease_of(volume, d)
                if cur.holder not in ("", holder) and self._held(volume, d, live):
                    # (no time left is told: the wall clocks that could tell it are not
                    # what the lease runs out by)
                    raise LeaseHeld(f"volume {volume} is leased to {cur.holder} (token "
                                    f"{cur.token}) until it hands it back or stops renewing it")
                token = max(token, cur.token + 1)
            lease = Lease(volume, holder, token, time.time() + ttl,
                          taken_over=d is not None and (cur.holder != "" or _orphaned(d)))
            if self._granted(key, lkey, lease, ttl, [Cmp(key, "mod", item.mod_rev if item else 0),
                                                     Cmp(lkey, "mod", live.mod_rev if live else 0)]):
                return lease
        raise self._contended(f"acquire lease of {volume}")

    def renew_lease(self, lease: Lease, ttl: float) -> Lease:
        """Extend a lease. Renewing after expiry succeeds if nobody took it over meanwhile
        (its token is still the newest); after a takeover or release it raises Fenced."""
        key, lkey = _lease_keys(lease.volume)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            cur = self._lease_of(lease.volume, _unpack(item.value)) if item else None
            if cur is None or (cur.token == lease.token and cur.holder == ""):
                raise Fenced(f"lease of volume {lease.volume} (token {lease.token}) was released")
            if (cur.holder, cur.token) != (lease.holder, lease.token):
                raise Fenced(
                    f"lease of volume {lease.volume} (token {lease.token}) was taken over "
                    f"by {cur.holder} (token {cur.token})"
                )
            new = Lease(lease.volume, lease.holder, lease.token, time.time() + ttl)
            # The liveness key is kept alive and put again on the lease kept (etcd: no
            # lease granted a renewal, nor one left behind to expire, two raft proposals
            # each), as the heartbeat keeps a host's; put on a lease of its own when there
            # is none to keep (run out). (The record's compare covers the key: only a
            # grant, a renewal or a release writes it, each with the record; a key kept
            # alive here that a grant replaced meanwhile is that grant's, just granted.)
            kept = self.kv.keep_alive(lkey, ttl)
            if self._granted(key, lkey, new, ttl, [Cmp(key, "mod", item.mod_rev)], kept):
                return new
        raise self._contended(f"renew lease of {lease.volume}")

    def release_lease(self, lease: Lease, reconciled: bool = True) -> None:
        """Give the lease up; a no-op if it is no longer ours. The record stays, with no
        holder and the last token: deleting it would let a grant that read the key before
        this release still see "absent" and reuse an old token. `reconciled=False`: the
        lease was taken over (Lease.taken_over) and handed back without the reconcile a
        gateway runs after a takeover (`vbp volume snapshot` completing a snapshot): the
        next grant is a takeover still, and lease_orphaned says so. Its liveness key goes
        in the same transaction."""
        key, lkey = _lease_keys(lease.volume)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            if item is None:
                return
            cur = self._lease_of(lease.volume, _unpack(item.value))
            if (cur.holder, cur.token) != (lease.holder, lease.token):
                return
            released = {"holder": "", "token": cur.token, "expires": 0.0, "live_key": True}
            if not reconciled:
                released["orphaned"] = True
            ok, _ = self.kv.txn([Cmp(key, "mod", item.mod_rev)],
                                [Put(key, _pack(released)), Delete(lkey)])
            if ok:
                return
        raise self._contended(f"release lease of {lease.volume}")

    def lease_tokens(self) -> dict[str, int]:
        """The newest fencing token granted for each volume, held or not: a replica that
        starts learns them before it serves, so a gateway fenced while it was down is still
        refused."""
        items, _ = self.kv.range(P_LEASE)
        return {it.key[len(P_LEASE):].decode(): _unpack(it.value)["token"] for it in items}

    def leases_of_deleted(self) -> list[Lease]:
        """Live leases of volumes whose record is gone: deleted, or deleted and made again
        under the name since the grant (a token is the store's revision at its grant, so
        it is not above the revision that created a later record). Their holders may
        serve the deleted chains until they notice (Blockd.collect_garbage_once)."""
        vols, _ = self.kv.range(P_VOL)
        created = {it.key[len(P_VOL):].decode(): it.create_rev for it in vols}
        items, _ = self.kv.range(P_LEASE)
        lives, _ = self.kv.range(P_LEASE_LIVE)
        live = {it.key[len(P_LEASE_LIVE):].decode(): it for it in lives}
        out = []
        for it in items:
            d = _unpack(it.value)
            lease = self._lease_of(it.key[len(P_LEASE):].decode(), d)
            rev = created.get(lease.volume)
            if (rev is None or lease.token <= rev) and self._held(
                    lease.volume, d, live.get(lease.volume)):
                out.append(lease)
        return out

    def forget_leases_of_deleted(self, older_than: float) -> int:
        """Remove the lease records of volumes that no longer exist, handed back or run out
        more than `older_than` seconds ago: each name ever leased kept one, read by every
        GC pass (leases_of_deleted) and every starting replica (lease_tokens). Safe to
        drop: a later volume of the name gets a greater token at its first grant (a token
        is the store's revision), which is all a replica checks. Each removal compares the
        lease record, the volume's absence and the lease's liveness key's. Returns how
        many went."""
        vols, _ = self.kv.range(P_VOL)
        names = {it.key[len(P_VOL):].decode() for it in vols}
        items, _ = self.kv.range(P_LEASE)
        # (how long ago is told by the recorded `expires`, the wall clock of the lease's
        # last writer: a coarse collection, of records run out blockd's COMPACT_PERIOD ago;
        # that a lease has run out at all is told by its liveness key, compared absent in
        # the removal, so that a step or skew of the wall clock never drops a live lease
        # of a deleted volume, which GC holds off for: leases_of_deleted)
        cutoff = time.time() - older_than
        gone = 0
        for it in items:
            name = it.key[len(P_LEASE):]
            if name.decode() in names or _unpack(it.value).get("expires", 0.0) > cutoff:
                continue  # (a handed back lease says 0.0)
            ok, _ = self.kv.txn([Cmp(it.key, "mod", it.mod_rev), Cmp(P_VOL + name, "mod", 0),
                                 Cmp(P_LEASE_LIVE + name, "mod", 0)],
                                [Delete(it.key)])
            gone += ok
        return gone

    def get_lease(self, volume: str) -> Lease | None:
        """The volume's lease if held and not run out (the lease liveness rule), else None."""
        item, _ = self.kv.get(P_LEASE + _name("volume name", volume))
        return self._live_lease(volume, item)

    def _live_lease(self, volume: str, item) -> Lease | None:
        """The lease a lease record (`item`, None: none) holds, if held and not run out
        (the lease liveness rule: its liveness key read here)."""
        if item is None:
            return None
        d = _unpack(item.value)
        return self._lease_of(volume, d) if self._held(volume, d) else None

    def revision(self) -> int:
        """The store's revision now (what compact_history takes, and what volume_changes
        and stale_changes tell the changes after: read before the reads they follow up)."""
        return self.kv.get(K_SCRUB)[1]

    def compact_history(self, revision: int) -> None:
        """Drop the store's history from before `revision` (etcd; the others keep none)."""
        self.kv.compact(revision)

    def lease_orphaned(self, volume: str) -> bool:
        """The volume's lease ran out without being released: its holder crashed or was
        cut off, maybe with writes in flight (see Lease.taken_over)."""
        return self.orphaned_lease(volume) is not None

    def orphaned_lease(self, volume: str) -> Lease | None:
        """The volume's lease record if it is orphaned (lease_orphaned), else None: one
        that ran out while held (its holder named), or one handed back still owing a
        takeover's reconcile (release_lease with reconciled=False: no holder)."""
        item, _ = self.kv.get(P_LEASE + _name("volume name", volume))
        if item is None:
            return None
        d = _unpack(item.value)
        lease = self._lease_of(volume, d)
        if (bool(lease.holder) and not self._held(volume, d)) or (
                not lease.holder and _orphaned(d)):
            return lease
        return None

    # --- stale-replica (dirty) records -----------------------------------------------------

    def publish_stats(self, host_id: str, stats: dict, ttl: float) -> None:
        """A host's usage figures (capacity, used, chunks, ...), kept while it heartbeats."""
        self.kv.txn([], [Put(P_STATS + _name("host id", host_id), _stats_value(host_id, stats), ttl)])

    def host_stats(self) -> dict[str, dict]:
        items, _ = self.kv.range(P_STATS)
        return {it.key[len(P_STATS):].decode(): _unpack(it.value) for it in items}

    @staticmethod
    def _stale_key(lineage: str, index: int, host_id: str = "") -> bytes:
        if not isinstance(index, int) or index < 0:
            raise InvalidArgument(f"chunk index must be a non-negative int, not {index!r}")
        head = P_STALE + _name("lineage", lineage) + b"\x00" + b"%016x" % index + b"\x00"
        return head + (_name("host id", host_id) if host_id else b"")

    def mark_stale(self, lineage: str, index: int, host_ids: Iterable[str], version: int,
                   lease: Lease | None = None) -> None:
        """Record that these replicas miss `version` of the chunk. Every mark of a record
        moves it higher: to `version`, or one past what it held if that is not lower.
        So a resync that read the record before this mark cannot clear it (clear_stale
        compares the version): it is asked again. The versions are hosts' clocks
        (time_ns), which differ and may step back; a mark that left a record as it was,
        because its clock was behind the one of an earlier mark, would be lost to a
        resync clearing meanwhile. The STALE_FLAGS bits of a version are flags, not part
        of the order: once set they stay until the record goes (the copy was never
        current; the copy lost unsynced writes).

        The records of all `host_ids` move in one transaction. A resync picks its source
        among the copies no record names and clears its own record at the version it read
        with them: marked one after another, a copy's record could move while a source
        marked by the same failure still looked current, and a resync that read the two
        in between would copy the source's older bytes and clear.

        With `lease` (a gateway's marks of its writes' failures), only while the volume's
        lease record is still that lease (same holder and token, expired or not), compared
        in the same transaction as update_volume does; else Fenced. A gateway that stalled
        past its lease and lost it to a takeover would otherwise, resuming, record the
        copies that missed its last writes stale: the copies the new holder writes, every
        copy of a chunk stale at once, and the new holder's I/O to it failing."""
        hosts = list(dict.fromkeys(host_ids))
        keys = [self._stale_key(lineage, index, h) for h in hosts]
        if not keys:
            return
        lkey = P_LEASE + _name("volume name", lease.volume) if lease is not None else None
        for _ in range(CAS_ATTEMPTS):
            cmps, puts = [], []
            if lkey is not None:
                cmps.append(self._still_held(lease.volume, lkey, lease, f": copies of "
                                             f"{lineage}/{index} not recorded stale"))
            items, _ = self.kv.range(self._stale_key(lineage, index))  # (the chunk's records)
            held = {it.key: it for it in items}
            for key in keys:
                item = held.get(key)
                new = version
                if item is not None:
                    old = _unpack(item.value)
                    new = (max((old & ~STALE_FLAGS) + 1, version & ~STALE_FLAGS)
                           | ((old | version) & STALE_FLAGS))
                cmps.append(Cmp(key, "mod", item.mod_rev if item else 0))
                puts.append(Put(key, _pack(new)))
            if any(held.get(key) is None for key in keys):
                puts.append(Put(K_STALE_SEQ, b""))  # (a record created: set_data_set)
            ok, _ = self.kv.txn(cmps, puts)
            if ok:
                return
        raise self._contended(f"mark {lineage}/{index} stale on {','.join(hosts)}")

    def list_stale(self, lineage: str | None = None, index: int | None = None) -> list[StaleRecord]:
        """Stale records: all, one lineage's, or one chunk's (lineage and index)."""
        if lineage is None:
            prefix = P_STALE
        elif index is None:
            prefix = P_STALE + _name("lineage", lineage) + b"\x00"
        else:
            prefix = self._stale_key(lineage, index)
        items, _ = self.kv.range(prefix)
        out = []
        for it in items:
            lin, idx, host = it.key[len(P_STALE):].split(b"\x00")
            out.append(StaleRecord(lin.decode(), int(idx, 16), host.decode(), _unpack(it.value),
                                   it.create_rev))
        return out

    def clear_stale(self, lineage: str, index: int, host_id: str, version: int | None = None) -> bool:
        """Remove the record (only if it is still at `version`, when given); True if this
        call removed it, False if it was absent or names a newer miss."""
        key = self._stale_key(lineage, index, host_id)
        for _ in range(CAS_ATTEMPTS):
            item, _ = self.kv.get(key)
            if item is None or (version is not None and _unpack(item.value) != version):
                return False
            ok, _ = self.kv.txn([Cmp(key, "mod", item.mod_rev)], [Delete(key)])
            if ok:
                return True
        raise self._contended(f"clear stale {lineage}/{index} on {host_id}")

    def clear_stale_unless_changed(
            self, lineage: str, index: int, volume: str,
            decide: Callable[[list[StaleRecord], ClusterMap, dict | None, dict | None], LossVerdict | None]):
        """Remove one stale record of the chunk and rewrite the lineage's loss record
        (vbp/loss/<lineage>) in one transaction, only while nothing `decide` judged by has
        changed since it was read: the chunk's stale records (and the absence of one for
        each copy it judged), the data set (placement), the record of `volume` (deleted,
        resized, made again in another lineage) and the loss record.
        `decide(records, cluster map, volume record dict or None, loss record dict or
        None)` returns None (nothing to do) or a LossVerdict; a change meanwhile makes it
        read and decide again. Returns the verdict's result, or None. The transaction
        compares a bounded number of keys, whatever the number of volumes in the lineage:
        one volume stands for it (its volumes share one replica count).
        (vbp volume accept-loss: the copy kept becomes current, the lineage says so.)"""
        prefix = self._stale_key(lineage, index)
        vkey = P_VOL + _name("volume name", volume)
        lkey = P_LOSS + _name("lineage", lineage)
        for _ in range(CAS_ATTEMPTS):
            ds, _ = self.kv.get(K_DATASET)
            cmap = self.cluster_map()
            items, _ = self.kv.range(prefix)
            vol, _ = self.kv.get(vkey)
            loss, _ = self.kv.get(lkey)
            records = [StaleRecord(lineage, index, it.key[len(prefix):].decode(), _unpack(it.value),
                                   it.create_rev) for it in items]
            verdict = decide(records, cmap, _unpack(vol.value) if vol else None,
                             _unpack(loss.value) if loss else None)
            if verdict is None:
                return None
            key = self._stale_key(lineage, index, verdict.keep)
            if not any(it.key == key for it in items):
                raise InvalidArgument(f"{lineage}/{index} has no stale record on {verdict.keep}")
            held = {r.host_id for r in records}
            cmps = [Cmp(K_DATASET, "mod", ds.mod_rev if ds else 0),
                    Cmp(vkey, "mod", vol.mod_rev if vol else 0),
                    Cmp(lkey, "mod", loss.mod_rev if loss else 0)]
            cmps += [Cmp(it.key, "mod", it.mod_rev) for it in items]
            cmps += [Cmp(self._stale_key(lineage, index, h), "mod", 0)
                     for h in dict.fromkeys(verdict.judged) if h not in held]
            ops = [Delete(key), Put(lkey, _pack(verdict.losses))]
            if len(cmps) + len(ops) > TXN_OPS_MAX:
                raise InvalidArgument(f"{lineage}/{index}: too many copies for one transaction "
                                      f"({len(cmps) + len(ops)} operations)")
            ok, _ = self.kv.txn(cmps, ops)
            if ok:
                return verdict.result
        raise self._contended(f"clear stale {lineage}/{index}")

    def get_losses(self, lineage: str) -> dict | None:
        """The lineage's loss record (vbp.volume.accepted_losses reads it), or None."""
        item, _ = self.kv.get(P_LOSS + _name("lineage", lineage))
        return _unpack(item.value) if item else None

    def list_losses(self) -> dict[str, dict]:
        """Lineage -> its loss record, for every lineage that has one (one whose last
        volume was deleted has none: delete_volume)."""
        items, _ = self.kv.range(P_LOSS)
        return {it.key[len(P_LOSS):].decode(): _unpack(it.value) for it in items}

    # --- scrub requests (replicator/scrub.py) ---------------------------------------------

    def request_scrub(self, hosts: Iterable[str], volume: str = "") -> int:
        """Ask `hosts` to scrub now (one volume, or everything); returns the request id.
        Results of earlier requests are dropped: only the last request is kept."""
        rid = self.next_id("scrub")
        # Results are kept under their request's id, so the old ones need not go in the
        # request's transaction: in pieces, as etcd takes at most 128 operations in one
        # (--max-txn-ops) and a pool of as many hosts has as many results.
        items, _ = self.kv.range(P_SCRUB_RESULT)
        for i in range(0, len(items), TXN_OPS_MAX):
            self.kv.txn([], [Delete(it.key) for it in items[i:i + TXN_OPS_MAX]])
        self.kv.txn([], [Put(K_SCRUB, _pack({"id": rid, "volume": volume,
                                             "hosts": sorted(hosts), "time": time.time()}))])
        return rid

    def scrub_request(self) -> dict | None:
        item, _ = self.kv.get(K_SCRUB)
        return None if item is None else _unpack(item.value)

    def put_scrub_result(self, rid: int, host_id: str, result: dict) -> None:
        key = P_SCRUB_RESULT + b"%016x/" % rid + _name("host id", host_id)
        self.kv.txn([], [Put(key, _pack(result))])

    def scrub_results(self, rid: int) -> dict[str, dict]:
        prefix = P_SCRUB_RESULT + b"%016x/" % rid
        items, _ = self.kv.range(prefix)
        return {it.key[len(prefix):].decode(): _unpack(it.value) for it in items}
