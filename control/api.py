"""Management operations on the pool, shared by the CLI and tests. Synchronous: each call
opens nothing but the registry it is given."""

from __future__ import annotations

import time
import uuid

from vbp.cluster import HOST_DOWN, HOST_DRAINING, HOST_UP, live_places
from vbp.errors import (
    BadValue, Fenced, InUse, InvalidArgument, LeaseHeld, NotFound, RegistryUnavailable, VbpError,
)
from vbp.layout import CHUNK_SIZE_DEFAULT, SIZE_MAX, VOLUME_SIZE_MAX, Geometry, parse_size
from vbp.registry.base import SNAPSHOTS_HINT, named_gens, sized
from vbp.volume import (
    VolumeRecord, cancel_pending, check_name, clone_from, complete_pending, complete_snapshot,
    delete_snapshot, new_volume, pending_abandoned, replicas_by_lineage, request_shrink,
    request_snapshot, same_volume, split_export_name,
)


def gen_counter(lineage: str) -> str:
    return f"gen/{lineage}"


def next_gen(reg, rec: VolumeRecord) -> int:
    """A new generation of `rec`'s lineage: the counter's next, and past every generation
    `rec` names (Registry.next_id's floor: a counter a delete took while the code before
    created the lineage's first volume)."""
    return reg.next_id(gen_counter(rec.lineage), floor=max(named_gens(rec.to_dict()), default=0))


def create_volume(reg, name: str, size, *, replicas: int = 3, min_size: int | None = None,
                  chunk_size=CHUNK_SIZE_DEFAULT) -> VolumeRecord:
    """A new volume, in a new lineage whose first generation is its head (1). The
    lineage's counter is created with the record, in one transaction (Registry.
    create_volume): a create that fails leaves none behind."""
    rec = new_volume(name, parse_size(size, VOLUME_SIZE_MAX), replicas=replicas, min_size=min_size,
                     chunk_size=parse_size(chunk_size))
    reg.create_volume(name, rec.to_dict(), counters={gen_counter(rec.lineage): rec.head})
    return rec


def no_such_host(host_id: str) -> VbpError:
    """The error for `host_id` when the pool has no host of that id: NotFound (exit 3),
    or BadValue (bad usage, exit 2) when no host can have it: blockd refuses a host_id
    that is no name (check_name). Looked for first, so that a host registered under such
    an id before blockd checked them can still be drained and removed."""
    try:
        check_name(host_id, "host")
    except BadValue as e:
        return e
    return NotFound(f"no host {host_id!r} in the pool")


def get_volume(reg, name: str) -> VolumeRecord:
    check_name(name)
    return VolumeRecord.from_dict(reg.get_volume(name))


def list_volumes(reg) -> list[VolumeRecord]:
    return sorted((VolumeRecord.from_dict(d) for d in reg.list_volumes()), key=lambda v: v.name)


def open_exports(reg, volume: str, snap: str | None = None, *,
                          head: bool = False) -> list[tuple[str, str]]:
    """(host, export) of every open NBD export of a snapshot of `volume` (of `snap` only
    when given), as the hosts publish them (blockd: published while open, and before the
    first read is served); with `head`, also the volume's own exports that read it
    without its write lease (a backup through another host: published alike)."""
    return _exports_in(reg.host_stats(), volume, snap, head)


def _exports_in(stats: dict[str, dict], volume: str, snap: str | None,
                head: bool) -> list[tuple[str, str]]:
    out = []
    for host, st in sorted(stats.items()):
        for e in st.get("exports", ()):
            export = e.get("export", "") if isinstance(e, dict) else ""
            vol, _, s = export.partition("@")
            if vol == volume and (s and (snap is None or s == snap) or head and not s):
                out.append((host, export))
    return out


# The longest a user on its way out is waited for before a delete or an import refuses:
# a lease runs out within its TTL (blockd's lease_ttl, 10 s by default; `vbp volume
# snapshot` takes one for 30 s).
USERS_GOING_WAIT = 30.0

# A host's stats from before blockd published the exports it has open ("open"): its
# lease holders cannot be told from leases on their way back, and the entry a writer
# published before it took the lease stayed until the next heartbeat (heartbeat_ttl / 3,
# 2 s by default): such a lease, or such a host's exports, are waited for this long.
UNTOLD_GRACE = 3.0


def _users(reg, vol: str, snap: str | None, head: bool, snapshots: bool,
           untold: bool) -> tuple[list[str], bool]:
    """Who uses `vol` now (_refuse_in_use), and whether one of them stays: a client
    connected, as its host says. On its way out instead: a write lease whose holder does
    not have the volume open (a host handing it back after its last client left, one
    that is down and lets it run out, `vbp volume snapshot` completing a snapshot), and
    (`untold`) the users of a host that does not say what it has open."""
    stats = reg.host_stats()
    found = [(h, e) for h, e in _exports_in(stats, vol, snap, head) if snapshots or "@" not in e]
    users = [f"{e} on {h}" for h, e in found]
    stays = any(not (untold and "open" not in stats[h]) for h, _ in found)
    if head:
        lease = reg.get_lease(vol)  # (a live one only)
        if lease is not None:
            # (no time left is told: the lease runs out on the registry's clock, and the
            # wall clocks that could tell it may be stepped or skewed)
            users.insert(0, f"{vol} on {lease.holder}, its write lease held until its host "
                            f"hands it back or stops renewing it")
            st = stats.get(lease.holder)
            if st is not None and "open" in st:
                stays = stays or vol in st["open"]
            else:  # (a host down or untold, or no host)
                stays = stays or st is not None and not untold
    return users, stays


def _refuse_in_use(reg, name: str, vol: str, snap: str | None, wait: float, *,
                   head: bool = False, snapshots: bool = True,
                   forced: str = "their requests then fail with EIO") -> None:
    """Like `rbd rm` with watchers: no deleting what a client reads (the snapshot exports
    of `vol`, of `snap` only when given), nor (`head`) a volume a client has open: its
    exports without the write lease, and the lease (its host holds it from the first
    writing client's open to the last one's close). Without `snapshots`, only the
    volume's own users count. `forced`: what --force does to them, for the message.

    Refused at once when every user is a client connected now, as far as the registry
    can tell (a host publishes the exports it has open as they open and close: a client
    that disconnected just before is gone from it within the registry write that
    follows). Users on their way out are waited for, up to `wait` seconds: a lease being
    handed back, or running out on a host that is down (_users)."""
    start = time.monotonic()
    while True:
        untold = time.monotonic() - start < min(wait, UNTOLD_GRACE)
        users, stays = _users(reg, vol, snap, head, snapshots, untold)
        if not users:
            return
        if stays or time.monotonic() - start > wait:
            what = f"snapshot {name}" if snap else f"volume {name}"
            raise InUse(f"{what} is open by NBD clients ({'; '.join(users)}); disconnect them, or "
                        f"use --force ({forced})")
        time.sleep(0.05)


def delete_volume(reg, name: str, *, force: bool = False,
                  wait: float = USERS_GOING_WAIT) -> VolumeRecord | None:
    """Delete a volume with its snapshots (the record deleted), or a snapshot when `name`
    is NAME@SNAP (None). Hosts free the chunks no
    reader needs any more in the background (vbp.volume.needed_gens). A snapshot that is
    exported over NBD somewhere, or a volume that is (its write lease live, or exported
    by a host without it) or whose snapshots are, is refused with InUse unless `force`; forced, the open exports
    fail every request with EIO (blockd keeps the chunks until they noticed)."""
    vol, snap = split_export_name(name)  # (InvalidArgument for "v@" and "v@s@x")
    if snap is not None:
        of = get_volume(reg, vol)
        of.snapshot(snap)
        if not force:
            _refuse_in_use(reg, name, vol, snap, wait)
        # (of the volume checked: not of one made again under its name meanwhile, with a
        # snapshot of that name, whose users nobody asked about)
        reg.update_volume(vol, lambda d: delete_snapshot(_still(vol, d, of), snap).to_dict())
        return None
    rec = get_volume(reg, name)
    if not force:
        _refuse_in_use(reg, name, vol, None, wait, head=True)
    # (the lease judged again in the delete's transaction: one taken since refuses it too)
    reg.delete_volume(rec.name, unless_leased=not force)
    return rec


def refuse_import_in_use(reg, name: str, *, wait: float = USERS_GOING_WAIT) -> None:
    """InUse while NBD clients have volume `name` itself open (its write lease held for
    one, or it is read through a host without the lease): an import over it would change
    the disk under them, a running VM's (its snapshots' readers do not count: an import
    leaves them alone). A NAME@SNAP is left to the import, which refuses it as read-only."""
    if "@" in name:
        return
    get_volume(reg, name)
    _refuse_in_use(reg, name, name, None, wait, head=True, snapshots=False,
                   forced="the import then writes under them")


def begin_import(reg, name: str, source: str, *, now: float | None = None) -> float:
    """Record on volume `name` that an import of `source` begins to write it; returns the
    time recorded, which end_import takes. Until then `vbp volume show` says the volume
    holds part of `source`: an import that failed, was interrupted or killed left the
    volume neither its old contents nor the file, and nothing else says so."""
    began = time.time() if now is None else now
    reg.update_volume(name, lambda d: {**d, "import_from": source, "import_began": began})
    return began


def end_import(reg, name: str, began: float) -> None:
    """The import begun at `began` (begin_import) completed: the volume reads as its file.
    The mark of a later import, still under way, is left to that one."""
    def apply(d: dict) -> dict:
        if d.get("import_began") != began:
            return d
        return {**d, "import_from": "", "import_began": 0.0}
    reg.update_volume(name, apply)


def _lease_live(reg, name: str) -> bool:
    return reg.get_lease(name) is not None  # (get_lease answers only a lease held and not run out)


def snapshot(reg, name: str, snap: str, *, timeout: float = 30.0, poll: float = 0.05) -> VolumeRecord:
    """Take a consistent snapshot. With a gateway writing the volume, it completes the
    snapshot itself after holding new writes and draining in-flight ones; with none (or
    one that stopped renewing its lease) this call completes it."""
    return _two_steps(reg, name, lambda d, head, until: _request_snapshot(name, d, snap, head, until),
                      f"snapshot {name}@{snap}", timeout, poll)


def _two_steps(reg, name: str, request, what: str, timeout: float, poll: float) -> VolumeRecord:
    """A snapshot or a shrink: `request(record dict, head, until)` records it in progress
    with the new head generation; the gateway holding the lease completes it once the
    writes under way have ended (blockd's record sync), or, with none, this call does."""
    rec = get_volume(reg, name)
    head = next_gen(reg, rec)
    # abandoned if this call is gone well past its timeout without cancelling (killed):
    # a later snapshot or shrink replaces it, and no gateway completes it then
    until = time.time() + timeout + PENDING_GRACE
    deadline = time.monotonic() + timeout

    def same(d: dict) -> VolumeRecord:
        # deleted and made again meanwhile, another volume has the name, whose lineage
        # `head` was not drawn from (its own counter would hand the number out again) and
        # whose pending change is another caller's
        return _still(name, d, rec)

    try:
        # (inside the try: a request whose answer was lost may have gone in, and is
        # cancelled then like one that timed out; cancelling only ever cancels `head`)
        reg.update_volume(name, lambda d: request(same(d).to_dict(), head, until))
        while True:
            cur = same(reg.get_volume(name))
            if head not in (cur.pending, cur.shrink_head):
                if head in cur.chain:
                    return cur
                raise VbpError(f"{what} was cancelled")
            if not _lease_live(reg, name):
                done = complete_unleased(reg, name, head, rec)
                if done is not None:
                    return done
            if time.monotonic() > deadline:
                raise VbpError(f"{what}: the gateway did not complete it in {timeout:.0f}s")
            time.sleep(poll)
    except BaseException as exc:
        unknown = None
        try:
            after = reg.update_volume(
                name, lambda d: cancel_pending(same(d), head).to_dict())
        except NotFound:
            after = None
        except VbpError as e:  # the registry unreachable: the change stays pending
            after, unknown = None, e
        if isinstance(exc, Exception) and after is not None and head in after["chain"]:
            # completed meanwhile (the gateway's record sync; the request's answer lost):
            # the cancel changed nothing, and a shrink has discarded what lay past its end
            return VolumeRecord.from_dict(after)
        if unknown is not None and isinstance(exc, VbpError) and exc.args:
            # the gateway may still complete it until it counts as abandoned
            # (pending_abandoned): the caller must not take the error for "not done"
            left = max(0, round(until - time.time()))
            exc.args = (f"{exc}; cancelling it failed too ({unknown}), so it may still "
                        f"complete within {left}s: `vbp volume show {name}` tells whether "
                        f"it did",) + exc.args[1:]
        raise


def _request_snapshot(name: str, d: dict, snap: str, head: int, until: float) -> dict:
    """The record with the snapshot pending, refused (InvalidArgument) if the record it
    completes into would be too large for the registry: refused only at its completion,
    the gateway holding the volume's writes for it would retry it until this call's
    timeout."""
    r = request_snapshot(VolumeRecord.from_dict(d), snap, head, until)
    sized(f"volume {name} record", complete_snapshot(r).to_dict(), SNAPSHOTS_HINT)
    return r.to_dict()


CONTROL_HOLDER = "control"
# seconds past a snapshot call's timeout after which its pending snapshot counts as
# abandoned (vbp.volume.pending_abandoned): a margin for clocks between hosts
PENDING_GRACE = 30.0


def _still(name: str, d: dict, of: VolumeRecord) -> VolumeRecord:
    """The record `d` of `name`, if it is still the volume `of` (vbp.volume.same_volume);
    NotFound if another volume has the name now (`of` deleted, one made again)."""
    r = VolumeRecord.from_dict(d)
    if not same_volume(r, of):
        raise NotFound(f"volume {name!r} was deleted (a new volume has its name)")
    return r


def complete_unleased(reg, name: str, head: int,
                      of: VolumeRecord | None = None) -> VolumeRecord | None:
    """Complete the pending snapshot or shrink `head` while no gateway holds the volume's
    lease, or None if one took it meanwhile. The lease is taken for it (a new, greater token) and
    handed back: a holder whose lease only expired (cut off from the registry) could
    otherwise renew it afterwards, nobody having taken it over, and write the generation
    that just became the snapshot before it adopts the new head; with the newer token its
    renewal is refused (Fenced) and it stops for good."""
    if of is not None:
        # (before the lease: taken, its newer token would depose the new volume's holder)
        _still(name, reg.get_volume(name), of)
    # a name of its own: a grant whose answer is lost is found by it and given back
    holder = f"{CONTROL_HOLDER}-{uuid.uuid4().hex[:12]}"
    try:
        lease = reg.acquire_lease(name, holder, 30.0)
    except LeaseHeld:
        return None
    except RegistryUnavailable:
        _give_back_lost_grant(reg, name, holder)
        raise

    def finish(d):
        r = VolumeRecord.from_dict(d) if of is None else _still(name, d, of)
        return complete_pending(r, head).to_dict() if head in (r.pending, r.shrink_head) else d
    try:
        # under the lease: should this call stall past its TTL and a gateway take the
        # lease over meanwhile, the snapshot is not completed behind its writes (Fenced)
        return VolumeRecord.from_dict(reg.update_volume(name, finish, lease))
    except Fenced:
        return None
    finally:
        # taken over from a holder that stopped (crashed, cut off): the next gateway
        # must still compare the copies its last writes reached (the snapshot froze them)
        _release(reg, lease, reconciled=not lease.taken_over)


# A lease the control plane took and could not give back holds the volume's writers for
# its whole TTL (30 s: they wait, then fail with EIO): giving it back is tried this often.
GIVE_BACK_ATTEMPTS = 3


def _release(reg, lease, reconciled: bool) -> None:
    """release_lease, again after an unknown outcome (etcd: the answer lost), up to
    GIVE_BACK_ATTEMPTS times: a release reads the record and changes it only while the
    lease is still ours, so one that went through makes the next a no-op."""
    for attempt in range(GIVE_BACK_ATTEMPTS):
        try:
            reg.release_lease(lease, reconciled=reconciled)
            return
        except RegistryUnavailable:
            if attempt == GIVE_BACK_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _give_back_lost_grant(reg, name: str, holder: str) -> None:
    """A grant of the lease to `holder` whose answer was lost may have gone through: if
    the record names `holder`, give it back, as not reconciled (whether the grant took
    the lease over from a holder that stopped is unknown: the next gateway compares the
    copies, which costs it only that). Best effort: the caller raises the first error."""
    for attempt in range(GIVE_BACK_ATTEMPTS):
        try:
            lease = reg.get_lease(name)
            if lease is not None and lease.holder == holder:
                reg.release_lease(lease, reconciled=False)
            return
        except RegistryUnavailable:
            time.sleep(0.2 * (attempt + 1))
        except VbpError:
            return


def clone(reg, source: str, new_name: str) -> VolumeRecord:
    name, sep, snap = source.partition("@")
    if not sep or not snap:
        raise BadValue(f"clone source must be NAME@SNAPSHOT, not {source!r}")
    split_export_name(source)  # (names as they must be: "v@s@x" is none)
    parent = get_volume(reg, name)
    parent.snapshot(snap)
    head = next_gen(reg, parent)

    def make(d: dict) -> dict:
        nonlocal head
        now = VolumeRecord.from_dict(d)
        if now.lineage != parent.lineage:  # deleted and created again meanwhile
            raise NotFound(f"volume {name} was deleted")
        if max(now.snapshot(snap).chain) >= head:
            # the snapshot was deleted and taken again under its name since the head was
            # drawn: its chain holds newer generations, which the clone's head must come
            # after (a shrink's cut hides the generations up to the head by number)
            head = next_gen(reg, now)
        return clone_from(now, snap, new_name, head).to_dict()

    # in one transaction with a check that the parent's record is unchanged: a snapshot
    # deleted meanwhile (and its chunks collected) would leave the clone reading zeros
    return VolumeRecord.from_dict(reg.create_from(new_name, name, make))


def resize(reg, name: str, size, *, force: bool = False, timeout: float = 30.0,
           poll: float = 0.05) -> VolumeRecord:
    """Grow a volume, or (`force`) shrink it. A shrink is taken in two steps as a
    snapshot is: the gateway writing the volume lets the writes under way end and
    refuses those past the new end before it completes the shrink, so that no write
    past the new end succeeds once this call returns (one acknowledged into the old
    head after a one-step shrink was lost)."""
    new_size = parse_size(size, VOLUME_SIZE_MAX)
    rec = get_volume(reg, name)
    Geometry(new_size, rec.chunk_size)  # refuses sizes out of range
    if new_size <= 0:
        raise BadValue("volume size must be greater than zero")
    if new_size < rec.size:
        if not force:
            raise InvalidArgument(
                f"shrinking {name!r} from {rec.size} to {new_size} bytes discards data; use --force"
            )
        return _two_steps(reg, name, lambda d, head, until: request_shrink(
            VolumeRecord.from_dict(d), new_size, head, until).to_dict(),
            f"shrink of {name} to {new_size} bytes", timeout, poll)

    def apply(d: dict) -> dict:
        if d.get("shrink_head"):
            # a shrink in progress would set the size back to its own when it completes
            now = VolumeRecord.from_dict(d)
            if not pending_abandoned(now):
                raise InvalidArgument(f"a shrink of {name!r} is in progress: not grown to "
                                      f"{new_size} bytes; retry once it is done")
            d = cancel_pending(now, now.shrink_head).to_dict()  # (never to complete)
        if d["size"] > new_size:  # grown by another call since it was read
            # (written over, it would shrink the volume in one step, with no cut and
            # not through its lease holder: writes acknowledged past the end lost)
            raise InvalidArgument(
                f"{name!r} was resized to {d['size']} bytes meanwhile: not shrunk to "
                f"{new_size} without --force; retry")
        d = dict(d)
        d["size"] = new_size
        return d
    return VolumeRecord.from_dict(reg.update_volume(name, apply))


def set_limits(reg, name: str, *, iops: int | None = None, bps=None) -> VolumeRecord:
    """Per-volume QoS limits (0 = unlimited); gateways apply them live."""
    if iops is not None and not 0 <= iops <= SIZE_MAX:  # (bps: parse_size bounds it)
        raise BadValue(f"--iops must be from 0 (unlimited) to {SIZE_MAX}, not {iops}")
    nbps = None if bps is None else parse_size(bps)

    def apply(d: dict) -> dict:
        d = dict(d)
        if iops is not None:
            d["qos_iops"] = int(iops)
        if nbps is not None:
            d["qos_bps"] = nbps
        return d

    get_volume(reg, name)
    return VolumeRecord.from_dict(reg.update_volume(name, apply))


# --- the data set (replicator.migration) ----------------------------------------------


def data_set_status(reg) -> dict:
    """Where chunks are placed and what a change of data set still has to move."""
    from replicator.migration import blocking, down_unscanned, sole_holders

    cmap = reg.cluster_map()
    out = {"generation": cmap.mgen, "hosts": list(cmap.data_set),
           "leaving": None if cmap.prev is None else list(cmap.prev),
           # placement weight factors below 1 (reweighted nearly full hosts) and those of
           # the set being left
           "weights": cmap.factors, "leaving_weights": None if cmap.prev is None else cmap.prev_factors,
           "moving_chunks": 0, "moving_bytes": 0, "unscanned": [], "down": [], "short_of_space": [],
           "placement": placement_changes(cmap), "down_in": [], "drains_held": []}
    vols = None
    if any(h.state == HOST_DOWN for h in cmap.hosts if h.id in cmap.data_set):
        vols = reg.list_volumes()
        out["down_in"] = down_in_data_set(reg, cmap, vols)
    if any(h.state == HOST_DRAINING for h in cmap.hosts if h.id in cmap.data_set):
        vols = reg.list_volumes() if vols is None else vols
        out["drains_held"] = drains_held(cmap, vols)
    if cmap.prev is not None:
        vols = reg.list_volumes() if vols is None else vols
        n_of = replicas_by_lineage(vols)
        sizes = {d["lineage"]: d["chunk_size"] for d in vols}
        scanned = reg.scanned()
        # down hosts the change waits for: they alone may hold chunks that move
        waiting = sole_holders(cmap, vols, down_unscanned(cmap, scanned))
        left = blocking(cmap, reg.list_stale(), n_of, scanned, sizes, waiting)
        out["moving_chunks"], out["unscanned"] = left["chunks"], left["unscanned"]
        out["down"] = left["down"]
        out["moving_bytes"] = left["bytes"]
        # a target that cannot take what it must receive keeps the change from completing
        stats = reg.host_stats()
        out["short_of_space"] = [
            {"host": h, "needs": need, "free": stats[h]["free"]}
            for h, need in sorted(left["by_host"].items())
            if h in stats and stats[h].get("free") is not None and stats[h]["free"] < need]
    return out


def drains_held(cmap, vols: list[dict]) -> list[dict]:
    """Draining hosts the data set keeps, and why: the controller keeps every copy where
    it is while fewer hosts count than some volume's replicas (replicator.migration.
    wanted_data_set: those up, and the down ones of the data set when a volume has one
    replica). Each: the host, how many others count, the volumes that ask for more
    copies than that (the first few, each with its replicas) and how many they are."""
    from replicator.migration import wanted_data_set

    kept = set(wanted_data_set(cmap, vols))
    held = [h.id for h in cmap.hosts
            if h.state == HOST_DRAINING and h.id in cmap.data_set and h.id in kept]
    if not held:
        return []
    counted = {h.id for h in cmap.hosts if h.state == HOST_UP}
    if any(v["replicas"] == 1 for v in vols):
        counted |= {h.id for h in cmap.hosts if h.state == HOST_DOWN} & set(cmap.data_set)
    short = sorted((v for v in vols if v["replicas"] > len(counted)),
                   key=lambda v: (-v["replicas"], v["name"]))
    if not short:
        return []
    return [{"host": h, "hosts_counted": len(counted),
             "volumes": [{"name": v["name"], "replicas": v["replicas"]} for v in short[:3]],
             "volume_count": len(short)} for h in held]


def drain_held_reason(x: dict) -> str:
    """Why a draining host keeps its chunks (an entry of drains_held), for one line."""
    vols = ", ".join(f"{v['name']} ({v['replicas']} replicas)" for v in x["volumes"])
    more = x["volume_count"] - len(x["volumes"])
    n = x["hosts_counted"]
    return (f"volume{'s' if x['volume_count'] > 1 else ''} {vols}{f' and {more} more' if more else ''} "
            f"keep{'' if x['volume_count'] > 1 else 's'} more copies than the {n} other "
            f"host{'' if n == 1 else 's'} in service (add a host, or lower the replicas)")


def down_in_data_set(reg, cmap, vols: list[dict]) -> list[dict]:
    """The down hosts still in the data set (their chunks degraded), and when they go out:
    `out_in`, the seconds left of the controller's down_out_interval (from what it
    publishes with its stats: None when it has not yet, or runs older code), `kept` when
    the pool keeps the host whatever the interval (too few other hosts for a volume's
    replicas, or a volume of one replica), `drained` when the operator drained it (out at
    the controller's next step)."""
    from replicator.migration import wanted_data_set

    controller = cmap.controller()
    timer = (reg.host_stats().get(controller) or {}).get("down_out") if controller else None
    kept = set(wanted_data_set(cmap, vols))  # (with no host spared by the interval)
    drained = reg.draining()
    now = time.time()
    out = []
    for h in cmap.hosts:
        if h.state != HOST_DOWN or h.id not in cmap.data_set:
            continue
        since = (timer or {}).get("since", {}).get(h.id)
        left = None if since is None else max(0.0, since + timer["interval"] - now)
        out.append({"host": h.id, "kept": h.id in kept, "drained": h.id in drained,
                    "interval": None if timer is None else timer["interval"],
                    "down_since": since, "out_in": left})
    return out


# --- chunks whose last current copy was lost (replicator.loss.unrecoverable) -------


def unrecoverable_chunks(reg) -> list[dict]:
    """The chunks that read EIO because their last current copy was lost (every copy is
    recorded stale and the one the election takes never current): replicator.loss.unrecoverable_chunks
    over the registry's records."""
    from replicator.loss import unrecoverable_chunks as find

    return find(reg.cluster_map(), reg.list_stale(), reg.list_volumes())


def loss_plan(reg, name: str, chunks=None) -> tuple[VolumeRecord, list[dict]]:
    """The unrecoverable chunks of volume `name` (its lineage's, within its size or a
    snapshot's: vbp.volume.read_chunks) that accept_loss would give up: those of `chunks`
    (indexes), or all of them (None). A named chunk that is not unrecoverable (or past
    the end) is refused: nothing is given up then, not even the others."""
    from vbp.volume import read_chunks

    rec = get_volume(reg, name)
    count = read_chunks(rec.to_dict())  # (a snapshot may read past the head)
    found = {c["index"]: c for c in unrecoverable_chunks(reg)
             if c["lineage"] == rec.lineage and c["index"] < count}
    if chunks is None:
        return rec, [found[i] for i in sorted(found)]
    wanted = sorted(set(chunks))
    past = [i for i in wanted if not 0 <= i < count]
    if past:
        raise InvalidArgument(f"volume {name} has chunks 0 to {count - 1}, not "
                              f"{', '.join(map(str, past))}")
    fine = [i for i in wanted if i not in found]
    if fine:
        raise InvalidArgument(
            f"chunk{'s' if len(fine) > 1 else ''} {', '.join(map(str, fine))} of volume {name} "
            f"{'are' if len(fine) > 1 else 'is'} not unrecoverable (a copy that holds every "
            f"acknowledged write is left, or may come back): nothing to accept"
            + (f"; unrecoverable: {', '.join(map(str, sorted(found)))}" if found else ""))
    return rec, [found[i] for i in wanted]


def accept_loss(reg, name: str, chunks=None, *, now: float | None = None) -> dict:
    """Give up the lost last copy of unrecoverable chunks of volume `name` (loss_plan),
    as Ceph's `mark_unfound_lost revert`. For each, in one registry transaction that
    re-checks the chunk's stale records, the data set, the volume's record and the
    lineage's loss record (Registry.clear_stale_unless_changed): the newest copy that was
    current once (revert_source) has its record removed, so it counts as current and the
    others resync from it: the chunk goes back to bytes older than those acknowledged.
    With no such copy the first one is kept, which holds nothing acknowledged: the chunk
    is lost and reads as holes. The lineage's loss record keeps it (one entry per call,
    vbp.volume.note_accepted), whatever the number of its clones. A chunk that stopped
    being unrecoverable meanwhile (a copy came back, a change of data set moved it), or
    that the volume no longer reaches (deleted, shrunk), is left alone and listed under
    `skipped`."""
    from replicator.view import ClusterView
    from replicator.loss import last_current, revert_source, stale_by_chunk, unrecoverable
    from vbp.registry.base import LossVerdict
    from vbp.volume import min_size_by_lineage, note_accepted, read_chunks

    rec, plan = loss_plan(reg, name, chunks)
    # the election's threshold: the lineage's, as resync and pool status read it (clones
    # share the lineage)
    k = min_size_by_lineage(reg.list_volumes()).get(rec.lineage, rec.min_size)
    when = time.time() if now is None else now
    out = {"volume": name, "lineage": rec.lineage, "time": when, "reverted": [], "zeroed": [],
           "skipped": []}
    for c in plan:
        index = c["index"]

        def decide(records, cmap, vol, losses, index=index):
            if (vol is None or vol["lineage"] != rec.lineage
                    or index >= read_chunks(vol)):
                return None  # deleted, made again in another lineage, or shrunk past the chunk
            n = vol["replicas"]  # the lineage's (replicas_by_lineage): a clone takes its parent's
            view = ClusterView(cmap)
            complete = view.replicas(rec.lineage, index, n)
            stale = stale_by_chunk(records, cmap).get((rec.lineage, index), {})
            if not unrecoverable(complete, stale, k, view.joining(rec.lineage, index, n)):
                return None
            host, reverts = revert_source(complete, stale)
            return LossVerdict(host, note_accepted(losses, when, name, index, host, reverts),
                               {"index": index, "source": host, "reverts": reverts,
                                "last_current": last_current(complete, stale, k)},
                               view.write_set(rec.lineage, index, n))

        done = reg.clear_stale_unless_changed(rec.lineage, index, name, decide)
        if done is None:
            out["skipped"].append(index)
        else:
            out["reverted" if done["reverts"] else "zeroed"].append(done)
    return out


def accepted_losses(reg, rec: VolumeRecord, losses: dict | None = None) -> list:
    """The accepted losses (vbp.volume.AcceptedLoss) of the volume's lineage that may
    reach the volume (a chunk given up lies within its size or a snapshot's), oldest first.
    `losses`: every lineage's loss record (Registry.list_losses), read once for many
    volumes; else the lineage's is read."""
    from vbp.volume import accepted_losses as of, read_chunks

    count = read_chunks(rec.to_dict())
    record = reg.get_losses(rec.lineage) if losses is None else losses.get(rec.lineage)
    return [a for a in of(record) if a.reaches(count)]


def accepted_losses_by_lineage(reg, vols: list[dict]) -> list[dict]:
    """Every accepted loss of a lineage that still has volumes (`vbp pool status`): the
    loss (AcceptedLoss.to_dict) with its lineage and the volumes of it it may reach."""
    from vbp.volume import accepted_losses as of, read_chunks

    out = []
    for lineage, d in sorted(reg.list_losses().items()):
        mine = [v for v in vols if v["lineage"] == lineage]
        if not mine:
            continue  # every volume of it deleted
        for a in of(d):
            out.append({**a.to_dict(), "lineage": lineage, "volumes": sorted(
                v["name"] for v in mine if a.reaches(read_chunks(v)))})
    return out


def placement_hosts(reg) -> int:
    """How many hosts chunks are placed on now (the data set): a chunk's copies go to as
    many distinct hosts at most."""
    return len(reg.cluster_map().data_set)


def placement_changes(cmap) -> list[dict]:
    """Hosts whose capacity, zone or pod as placement weighs them changes: the change of
    data set under way takes up their new ones, or (`pending`) their live record differs
    from what the settled data set recorded and the controller is about to change it."""
    if cmap.prev is not None:
        old, new, pending = cmap.placed(leaving=True), cmap.placed(), False
    else:
        old, new, pending = cmap.placed(), live_places(cmap, cmap.drifted()), True
    keys = ("capacity", "zone", "pod")
    return [{"host": h, "from": dict(zip(keys, old[h])), "to": dict(zip(keys, p)), "pending": pending}
            for h, p in sorted(new.items()) if h in old and old[h] != p]


def placed_on(reg, host_id: str) -> bool:
    """Whether chunks are (or may still be) placed on the host."""
    cmap = reg.cluster_map()
    return host_id in cmap.data_set or host_id in (cmap.prev or ())


def wait_drained(reg, host_id: str, *, timeout: float, poll: float = 0.5, progress=None) -> dict:
    """Wait until no chunk is placed on a draining host any more (it may then be removed);
    `progress(moving_chunks)` is called on every poll. Raises VbpError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        st = data_set_status(reg)
        if progress is not None:
            progress(st["moving_chunks"])
        if not placed_on(reg, host_id):
            return st
        if time.monotonic() > deadline:
            held = [x for x in st["drains_held"] if x["host"] == host_id]
            why = (f"{st['moving_chunks']} chunks still moving" if st["leaving"] is not None else
                   f"its chunks stay: {drain_held_reason(held[0])}" if held else
                   "no change of data set started")
            raise VbpError(f"host {host_id} still holds placed chunks after {timeout:.0f}s: {why}")
        time.sleep(poll)


def wait_healthy(reg, *, timeout: float, poll: float = 0.5, progress=None) -> None:
    """Wait until no change of data set is under way and no copy is stale; `progress(n)`
    gets the number of stale copies (chunks still to copy) on every poll."""
    deadline = time.monotonic() + timeout
    while True:
        st = data_set_status(reg)
        stale = len(reg.list_stale())
        if progress is not None:
            progress(stale)
        if st["leaving"] is None and not stale:
            return
        if time.monotonic() > deadline:
            raise VbpError(f"pool not healthy after {timeout:.0f}s: {stale} stale copies"
                           + (f", {st['moving_chunks']} chunks moving" if st["leaving"] is not None else ""))
        time.sleep(poll)


# --- scrub (replicator/scrub.py) ---------------------------------------------------------------

SCRUB_FINISHED = ("done", "failed")


def request_scrub(reg, volume: str = "") -> tuple[int, list[str]]:
    """Ask every host that is not down to scrub now: the chunks it is the first up replica
    of (of `volume` only, when given). Returns the request id and the hosts asked."""
    if volume:
        get_volume(reg, volume)
    hosts = [h.id for h in reg.cluster_map().hosts if h.state != "down"]
    if not hosts:
        raise VbpError("no host is up to scrub")
    return reg.request_scrub(hosts, volume), hosts


def wait_scrub(reg, rid: int, hosts, *, timeout: float = 0, poll: float = 0.5,
               progress=None) -> dict[str, dict]:
    """Wait until every asked host has finished request `rid` (or went down, or `timeout`
    seconds passed; 0: no limit). `progress(done, total)` gets chunk counts as they move.
    A host that did not finish is in the result with state "down" or "unfinished"."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        results = reg.scrub_results(rid)
        if progress is not None:
            progress(sum(r.get("chunks_done", 0) for r in results.values()),
                     sum(r.get("chunks_total", 0) for r in results.values()))
        pending = [h for h in hosts if results.get(h, {}).get("state") not in SCRUB_FINISHED]
        if not pending:
            return results
        down = {h.id for h in reg.cluster_map().hosts if h.state == "down"}
        expired = deadline is not None and time.monotonic() > deadline
        if expired or all(h in down for h in pending):
            for h in pending:
                results[h] = {**results.get(h, {}), "state": "down" if h in down else "unfinished"}
            return results
        time.sleep(poll)


def scrub_summary(results: dict[str, dict]) -> dict:
    """Totals over the hosts' results; `ok` when every host finished and every damaged
    page was repaired."""
    keys = ("chunks", "pages", "bytes", "repaired", "unrepairable", "busy", "unreachable",
            "missing")
    total = {k: sum(r.get(k, 0) for r in results.values()) for k in keys}
    errors: dict[str, int] = {}
    for r in results.values():
        for kind, n in r.get("errors", {}).items():
            errors[kind] = errors.get(kind, 0) + n
    total["errors"] = errors
    total["error_pages"] = sum(errors.values())
    total["unrepaired"] = total["error_pages"] - total["repaired"]
    total["ok"] = (total["unrepaired"] == 0
                   and all(r.get("state") == "done" for r in results.values()))
    return total
