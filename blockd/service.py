"""blockd: one host of the pool. The root nursery wires every role together.

Roles (DESIGN.md, Packages): the chunk store (this host's disk), the replica (answers peer
requests against the store), the peer transport, the NBD frontend whose exports are volume
gateways, and the control loops: registry heartbeat, cluster-map refresh, lease renewal,
and garbage collection of deleted volumes' chunks.

The registry is synchronous (LMDB or etcd over HTTP); it is called from worker threads and
never on the per-request path.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from pathlib import Path

import trio

from blockd.config import Config, parse_hostport
from blockd.memory import freeze_startup_objects
from blockd.metrics import Metrics, serve_metrics
from blockd.qos import TokenBucket, VolumeQos
from nbd_frontend.server import HeldBytes, serve_nbd
from replicator import messages as m
from replicator.gateway import (
    WRITE_GRACE, ClusterView, PendingFlush, VolumeGateway, drop_identical,
)
from replicator.mover import DataSetMover
from replicator.recovery import Resync
from replicator.replica import Replica
from replicator.scrub import Scrubber
from replicator.transport import PeerPool, serve_peers
from vbp import pagesums
from vbp.chunkstore import ChunkStore, flush_store
from vbp.cluster import HostRecord
from vbp.errors import (
    Fenced, Gone, InUse, InvalidArgument, LeaseHeld, NotFound, RegistryUnavailable, VbpError,
)
from vbp.layout import ChunkKey
from vbp.loglimit import LogLimit
from vbp.registry import open_registry
from vbp.reqid import RequestIds
from vbp.volume import (
    Reader, View, VolumeRecord, cancel_pending, complete_pending, needed_gens, pending_abandoned,
    pending_head, readers, same_volume, split_export_name, view_of,
)

log = logging.getLogger("vbp.blockd")

# Stats follow usage between heartbeats: published once usage has moved by this share of
# capacity since the last publication, looked at this often. A small host under a fast
# writer fills in about a second, faster than a heartbeat period; the controller's
# reweight (replicator.migration) and `vbp pool status` act on the published figure.
SPACE_STEP = 1 / 32
SPACE_POLL = 0.25
GC_YIELD_EVERY = 64  # chunks garbage collection frees between task switches
# Seconds a garbage collection pass is skipped for at most while nothing it reads changed
# that this host can see: its chunks (ChunkStore.layout) and the volume records (the
# record watch counts the changes it is told of, Blockd.records_told; a registry that
# cannot tell which keys changed, LMDB, counts every change). What only the hosts' stats
# say (a snapshot export closed elsewhere) is freed that much later at most. A skipped
# pass frees nothing, so skipping is always safe; a pass reads every volume record,
# lease and host's stats, which every host did every gc_interval (5 s): 1,000 hosts and
# 10,000 volumes, two million records a second for the registry.
GC_FULL_PERIOD = 30.0
# seconds between attempts to complete a snapshot whose completion got no answer
COMPLETE_RETRY = 0.2
# seconds between two compactions of the registry's history by the controller; the
# history of one period is kept (watches that far behind read again)
COMPACT_PERIOD = 600.0
# share of heartbeat_ttl after the start of the last publication that went through, and
# was followed by a check that the snapshot is still there, past which a snapshot export
# stops serving (Unpublished): before the registry drops the publication
PUBLISH_LAPSE = 2 / 3
# the same share after the start of the last publication that went through with the
# chain a head export holding no lease reads by, and was followed by a read of the volume's
# record that still shows that chain, past which the export stops serving (Unsynced):
# another host may have made a new head, and GC freed what the old chain reads
RECORD_LAPSE = PUBLISH_LAPSE
# seconds between two takeovers by a reader of a lease its record sync finds orphaned
# (VolumeProvider._settle_if_orphaned): one that failed (the reconcile's marks found the
# registry unreachable, say) leaves the lease orphaned, and is tried again no sooner
SETTLE_RETRY = 1.0
# lease renewals under way at once (VolumeProvider.renew_all): each is a registry call in a
# worker thread, and the other registry calls (a write's stale marks among them) share
# those threads
RENEW_PARALLEL = 16
# volumes up a clone's line of parents whose orphaned leases opening it settles
# (VolumeProvider._settle_under_snapshot): the snapshot's own, its parent's, ...
SETTLE_ANCESTORS = 8
# seconds between two asks of a lease's holder for it (WantLease) by a write waiting for it
LEASE_ASK_PERIOD = 1.0
# Seconds a wait for a new cluster map lasts at most (_watch_map). It ends at once for a
# change: on etcd, the map is read again only then (Registry.wait_map_change), so a longer
# wait costs the registry nothing more; on LMDB, it is read every second anyway.
MAP_WAIT = 10.0
# Seconds between two reads of its volume's record by every open export without the
# lease, at most (_watch_volumes); by every export, RECORD_SYNC_MAX. A change of a record
# (a snapshot asked, a resize, a delete) reaches the exports of its volume at once in
# between, through a watch of the records: the periods bound how late a change a failed
# watch missed is seen, and a head export without the lease serves only while these
# reads confirm its chain (VolumeProvider._confirm: within RECORD_LAPSE of heartbeat_ttl
# of a publication, 4 s by default), so its period is well under that. Every export read
# its record every 0.2 s before: 5 registry reads a second for each open volume (with
# etcd, 20 idle open volumes kept blockd at 15 % of a core and etcd at 11 %).
RECORD_SYNC_PERIOD = 1.0
RECORD_SYNC_MAX = 5.0
# Seconds a request of an export whose serve_until passed waits for the publication and
# the record reads that renew it (VolumeProvider.renew_serving) before it fails
RENEW_WAIT = 2.0
# at most one watch of the records begun a RECORD_SYNC_GAP: a pool whose records change
# all the time costs a host what the polling every 0.2 s did, not more
RECORD_SYNC_GAP = 0.2
# The gateways of a lineage whose stale records changed refresh their stale maps within
# STALE_REFRESH_PERIOD (a watch of the records tells which); every open gateway does
# every STALE_REFRESH_MAX seconds, and a new one at the first period (_refresh_stale).
STALE_REFRESH_PERIOD = 1.0
STALE_REFRESH_MAX = 5.0
# Seconds of a graceful stop (Blockd.stop_budget): at least STOP_MIN, at most STOP_MAX,
# which leaves the store's own flush and the exit within the unit's TimeoutStopSec=60
STOP_MIN = 10.0
STOP_MAX = 45.0
# seconds between two data-set steps (Blockd._move_data) at most, and at least when a
# change of the cluster map wakes the next one early
DATA_SET_PERIOD = 1.0
DATA_SET_GAP = 0.1


class AsyncRegistry:
    """Runs each registry call in a worker thread so the event loop never blocks on it."""

    def __init__(self, registry):
        self.sync = registry

    def __getattr__(self, name):
        fn = getattr(self.sync, name)

        async def call(*args, **kwargs):
            return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))

        return call


class VolumeProvider:
    """The NBD frontend's export provider: volume names -> shared gateways."""

    def __init__(self, service: "Blockd"):
        self.service = service
        self.gateways: dict[str, VolumeGateway] = {}
        self.refs: dict[str, int] = {}
        self.leases: dict[str, object] = {}
        self.expired: set[str] = set()  # exports whose lease ran out unrenewed (logged once)
        # Head readers' publication (see "Head exports without the lease" below): the
        # number of the last list of exports made for a publication, of the last one that
        # went through, and for each reader entry published, the first list of the run of
        # lists that has had it ever since
        self.pub_seq = 0
        self.pub_through = 0
        self._pub_since: dict[tuple, int] = {}
        self._next: dict[str, View] = {}  # export -> the newer view it adopts once published
        self._retiring: dict[str, list[tuple[dict, float]]] = {}  # export -> (entry, until)
        self._follow_pub_at = -math.inf  # (_follow: no sooner than this, another publication)
        # closed gateways with failures or suspect copies the registry has not heard of yet
        self.unsettled: list[tuple[VolumeGateway, object]] = []
        self._lock = trio.Lock()  # one open/close at a time; never on the I/O path
        self._renewals = trio.CapacityLimiter(RENEW_PARALLEL)  # (renew_all)
        # tokens of leases taken over, not reconciled yet (or not with every up host)
        self.reconciling: set[int] = set()
        self.closing = 0  # closed gateways whose writes under way are awaited (_flush_and_let_go)
        # export -> (the volume's record, the flush its gateway ran when its last connection
        # closed): under way, or failed and not yet reported to a FLUSH
        # (VolumeGateway.after_close); only for a gateway of that very volume (same_volume)
        self.close_flushes: dict[str, tuple[VolumeRecord, PendingFlush]] = {}
        # A reader's takeovers of an orphaned lease (_settle_if_orphaned): export -> the
        # token of the last one it handed back (if that release is lost, the lease runs
        # out with it: not taken over again for it), no takeover before a time, and the
        # exports whose takeover failed (its lease handed back owing the reconcile)
        self._settled: dict[str, int] = {}
        self._settle_at: dict[str, float] = {}
        self._unsettled_readers: set[str] = set()
        # passes of sync_records begun and ended, and an event set at the end of each
        # (next_sync)
        self._syncs_begun = 0
        self._syncs_ended = 0
        self._sync_ended = trio.Event()
        # a full pass asked for (next_sync), and the wait of Blockd._watch_volumes to end
        # for it at once
        self.sync_wanted = False
        self.wake_sync: trio.CancelScope | None = None
        self._renewing: trio.Event | None = None  # set when the renewal under way ends
        # export -> record syncs under way with its lease (sync_record): the lease is not
        # handed over meanwhile (lease_wanted), or their update under it comes back Fenced
        self._leased_syncs: dict[str, int] = {}
        self._kept = LogLimit()  # lease_wanted's lines, per volume
        self._flushing_for: set[str] = set()  # exports flushed for a host asking (lease_wanted)

    async def list_exports(self):
        vols = await self.service.registry.list_volumes()
        out = []
        for d in vols:
            # (the description NBD_INFO_DESCRIPTION gives, which proto.md calls "the
            # same" as the list's: VolumeGateway.describe)
            rec = VolumeRecord.from_dict(d)
            for view in (view_of(rec, None), *(view_of(rec, s.name) for s in rec.snapshots)):
                out.append((view.export, VolumeGateway.describe(view)))
        return out

    async def export_info(self, export: str):
        """What NBD_OPT_INFO tells of `export`, without opening it: the gateway open here,
        else its facts read from the volume's record (VolumeGateway.info_of). Opening it
        would publish the export, and for a head whose lease its holder left behind
        (crashed, cut off) take that lease over and reconcile the volume, for a client
        that only asked; NotFound as open_export. The gateway open here only if it is still
        the export an open would join (_check_same, as open_export): a snapshot deleted
        since, or a volume deleted and made again, is told as the record has it now."""
        name, snap = split_export_name(export)
        gw = self.gateways.get(export)
        if gw is not None and not gw.fenced and gw.gone is None:
            await self._check_same(gw, name)
            if not gw.fenced and gw.gone is None:
                return gw
        rec = VolumeRecord.from_dict(await self.service.registry.get_volume(name))
        return VolumeGateway.info_of(view_of(rec, snap))

    async def open_export(self, export: str):
        name, snap = split_export_name(export)
        async with self._lock:
            gw = self.gateways.get(export)
            if gw is not None and not gw.fenced and gw.gone is None:
                await self._check_same(gw, name)
                if self.gateways.get(export) is not gw:
                    # its last connection closed during the check: given up (_closed),
                    # its lease on its way back; a gateway of our own
                    gw = None
            if gw is None or gw.fenced or gw.gone is not None:
                if gw is not None:  # no longer published: its clients are served no more
                    gw.serve_until = -math.inf
                    self._forget(export)
                gw = await self._open(export, name, snap)
                self.gateways[export] = gw
                self.refs[export] = 0
                if gw.read_only:
                    await self._hold_snapshot(export, gw)
                else:
                    await self._hold_head(export, gw)
                # taken once the open can no longer fail: a failed open would drop it
                prior = self.close_flushes.pop(export, None)
                # (not for a volume made again under the name since: a clone of the
                # same snapshot has the deleted one's lineage, and none of its writes)
                if prior is not None and same_volume(prior[0], gw.view.volume):
                    gw.after_close(prior[1])
                if not gw.read_only:
                    await self._settle_orphaned_lease(export, gw)
                await self._settle_under_snapshot(export, gw)
            self.refs[export] += 1
        return gw

    async def _check_same(self, gw: VolumeGateway, name: str) -> None:
        """Before a new client joins `gw`: a volume deleted and created again under its
        name since gw opened is another volume (another lineage, or a clone made at
        another time), and a snapshot deleted and taken again under its name another
        snapshot (another chain), which the record sync notices only within its period.
        Found first here, gw is fenced (a head) or gone (a snapshot), as that sync would
        do, and the client gets a gateway of its own; read by gw's chain, it would read
        the deleted volume's (snapshot's) bytes and write where no reader of the new one
        looks. With the registry unreachable the client joins gw as it is, as its
        connections open already go on: gw serves within its own bounds (the lease, or
        serve_until), which a record sync that cannot read the record does not move
        either; refused, a second connection (multi-conn, a client reconnecting after a
        network blip) to a volume served here would fail while the first one works."""
        try:
            if gw.read_only:
                await self._snapshot_gone(gw)  # (the record sync's own check of it)
                return
            try:
                rec = VolumeRecord.from_dict(await self.service.registry.get_volume(name))
                if same_volume(rec, gw.view.volume):
                    return
            except NotFound:
                pass
        except RegistryUnavailable as e:
            log.info("volume=%s event=join_unchecked error=%s", gw.name, e)
            return
        self._fence_deleted(gw, f"volume {name!r} was deleted (a new volume has its name)")

    async def _settle_orphaned_lease(self, export: str, gw: VolumeGateway) -> None:
        """A lease that ran out without being released (its holder crashed or was cut
        off) may have left writes on some replicas only: take it over now, which
        reconciles them (VolumeGateway.reconcile_after_takeover), rather than at our
        first write, so that reads before it answer what the pool settles on; then hand
        it back (_settle). Not possible right now (registry unreachable, someone else
        took it): the next record sync tries again (_settle_if_orphaned), or the first
        write does it. In a task of its own, as there: the reconcile may take peer
        timeouts and wait for resyncs, and under the provider's lock every other open on
        this host (VMs failing over here together) would wait for it; the export's reads
        wait for it (VolumeGateway.settling), its writes for the lease it takes."""
        try:
            orphaned = await self.service.registry.lease_orphaned(export)
        except VbpError as e:
            log.info("volume=%s event=orphaned_lease_not_taken error=%s", export, e)
            return
        if orphaned:
            self._settle_soon(export, gw)

    async def _settle_if_orphaned(self, export: str, gw: VolumeGateway) -> None:
        """A reader's step of the record sync: the lease found run out unreleased since
        (its holder died after we opened), it is taken over and handed back as at open,
        in a task of its own (the reconcile may take peer timeouts); the export's reads
        wait for it (VolumeGateway.settling). Reads before this step found it answer
        from this host's copy still, as while the holder lived: a write it had in flight
        may yet land. A lease handed back owing the reconcile (by a reader, here or
        elsewhere, or a writer, whose takeover could not ask some host) is taken over
        again only by a reader whose own takeover failed: readers on two hosts would
        otherwise take it from each other forever while a host stays down."""
        now = trio.current_time()
        if gw.settling is not None or now < self._settle_at.get(export, -math.inf):
            return
        lease = await self.service.registry.orphaned_lease(export)
        if lease is None or (lease.holder and lease.token == self._settled.get(export)):
            return
        if not lease.holder and export not in self._unsettled_readers:
            return
        if (gw.settling is not None or gw.token or gw.fenced
                or self.gateways.get(export) is not gw):
            return
        self._settle_soon(export, gw)

    def _settle_soon(self, export: str, gw: VolumeGateway) -> None:
        """_settle in a task of its own; the export's reads wait for it (settling)."""
        self._settle_at[export] = trio.current_time() + SETTLE_RETRY
        done = gw.settling = trio.Event()

        async def settle() -> None:
            try:
                await self._settle(export, gw)
            except Exception:  # (a background task's: never the daemon's end)
                log.exception("volume=%s event=orphaned_lease_settle_failed", export)
            finally:
                if gw.settling is done:  # (else another settle of its reads follows)
                    gw.settling = None
                done.set()
        self.service.nursery.start_soon(settle)

    async def _settle(self, export: str, gw: VolumeGateway) -> None:
        """Take the orphaned lease over, which reconciles the copies, and hand it back
        unless a client of ours is writing (VolumeGateway.settle_takeover): kept, a reader
        (a backup, an export) would hold it for its connection's life, and the VM
        restarted on another host would wait a lease period for it and fail its write. A
        lease held by another since (the real writer) is not waited for: its holder
        reconciles."""
        try:
            await gw.settle_takeover(functools.partial(self._take_lease, export, wait=False),
                                     functools.partial(self._hand_back, export, gw))
        except LeaseHeld as e:
            log.info("volume=%s event=orphaned_lease_not_taken error=%s", export, e)
        except VbpError as e:  # (taken, not reconciled: handed back owing it, _take_lease)
            if self.gateways.get(export) is gw:
                self._unsettled_readers.add(export)
            log.info("volume=%s event=orphaned_lease_not_taken error=%s", export, e)
        else:
            self._unsettled_readers.discard(export)

    async def _settle_under_snapshot(self, export: str, gw: VolumeGateway) -> None:
        """An export that reads a snapshot's generations (the snapshot's own, or a clone's,
        at any depth) opened while the lease of the volume they were written through is
        orphaned: the snapshot may have been completed without a holder (`vbp volume
        snapshot` after the writer died, control.api.complete_unleased), freezing a
        generation its last writes reached on some copies only. Until a takeover compares
        them, each host's copy answers the reads its own way (and a clone's copy-up copies
        it), and after it one of them changes. So each such lease is taken over now, the
        copies of every generation of its volume's chain compared
        (VolumeGateway.reconcile_after_takeover, by a gateway of that head made for it) and
        the lease handed back, in a task of its own as a head reader's settle is; the
        export's reads wait for it (VolumeGateway.settling), after the settle of its own
        lease if one runs. Not possible now (the registry unreachable, a writer took the
        lease: its takeover compares them), it is left."""
        reg = self.service.registry
        orphaned = []
        try:
            name, snap = split_export_name(export)
            parent = gw.view.volume.parent
            if snap is None:
                name = None if parent is None else parent.partition("@")[0]
            for _ in range(SETTLE_ANCESTORS):
                if name is None:
                    break
                rec = VolumeRecord.from_dict(await reg.get_volume(name))
                if rec.lineage != gw.lineage:  # (deleted, another volume has the name)
                    break
                if await reg.lease_orphaned(name):
                    orphaned.append(name)
                name = None if rec.parent is None else rec.parent.partition("@")[0]
        except VbpError as e:  # (NotFound: an ancestor deleted; its generations stay its lineage's)
            if not isinstance(e, NotFound):
                log.info("volume=%s event=orphaned_lease_not_taken error=%s", export, e)
        if not orphaned:
            return
        prior = gw.settling
        done = gw.settling = trio.Event()

        async def settle() -> None:
            try:
                if prior is not None:
                    await prior.wait()
                for name in orphaned:
                    await self._reconcile_orphaned(name, gw)
            except Exception:  # (a background task's: never the daemon's end)
                log.exception("volume=%s event=orphaned_lease_settle_failed", export)
            finally:
                if gw.settling is done:
                    gw.settling = None
                done.set()
        self.service.nursery.start_soon(settle)

    async def _reconcile_orphaned(self, name: str, reader: VolumeGateway) -> None:
        """Take volume `name`'s orphaned lease over with no writer of ours, reconcile its
        copies (a head gateway made for it, never serving a client) and hand the lease
        back, still owing the reconcile if some host could not be asked. The copies it
        records stale are `reader`'s too from then on (its stale map, until the next
        refresh, would still read them).
        A gateway of `name` open here settles it instead: a lease this host holds (a
        writer whose renewal is late, the registry out past a lease period; a gateway
        closing) is not orphaned but ours, and taken again by this host under a newer
        token it would depose our own writer (token_seen); a head reader here takes it
        over itself (_settle_soon), so that the two never take it from each other."""
        svc = self.service
        try:
            rec = VolumeRecord.from_dict(await svc.registry.get_volume(name))
            if rec.lineage != reader.lineage:  # (deleted, another volume has the name)
                return
            stale = await svc.stale_map(rec.lineage)
            if await self._settled_here(name, reader):
                return
            gw = VolumeGateway(view_of(rec, None), host_id=svc.cfg.host_id, replica=svc.replica,
                               cluster=svc.cluster, pool=svc.pool, registry=svc.registry)
            gw.refresh_map = svc.refresh_map
            gw.stale = stale
            lease, _ = await self._acquire(name, wait=False)
        except VbpError as e:  # (LeaseHeld: its holder compares them)
            log.info("volume=%s event=orphaned_lease_not_taken error=%s", name, e)
            return
        reconciled = False
        try:
            await self._announce(name, lease.token)
            if lease.taken_over:
                await gw.reconcile_after_takeover(lease.token)
            reconciled = not gw.takeover_unheard
        except VbpError as e:
            log.info("volume=%s event=orphaned_lease_not_reconciled error=%s", name, e)
        finally:
            reader.adopt_stale({}, gw.stale)
            await self._release(lease, gw, reconciled=reconciled)
        log.info("volume=%s event=orphaned_lease_handed_back token=%d reconciled=%s", name,
                 lease.token, reconciled)

    async def _settled_here(self, name: str, reader: VolumeGateway) -> bool:
        """_reconcile_orphaned's step: True if the lease of volume `name` is not for it to
        take over, as this host holds it (its renewal decides whether it stays ours) or a
        head reader of `name` open here settles it (waited for, its stale map adopted)."""
        if name in self.leases:
            return True
        head = self.gateways.get(name)
        if head is None or head.fenced or head.gone is not None:
            return False
        if head.token:
            return True
        if head.settling is None:
            self._settle_soon(name, head)
        while head.settling is not None:
            await head.settling.wait()
        reader.adopt_stale({}, head.stale)
        return True

    async def _hand_back(self, export: str, gw: VolumeGateway, token: int) -> None:
        """Give back the lease `gw` took over (token `token`) only to reconcile: no write
        carried its token. Still owing the reconcile (hosts it could not ask), it stays
        orphaned: the next writer compares again, and this export does not take it over
        again for it."""
        lease = self.leases.get(export)
        if lease is None or lease.token != token:
            return  # (its last client left meanwhile: released then, _closed)
        del self.leases[export]
        await self._release(lease, gw)
        self._settled[export] = token
        log.info("volume=%s event=orphaned_lease_handed_back token=%d", export, token)

    # Snapshot exports and garbage collection (issue 5: a deleted snapshot's chunks are
    # freed and reused; an export still open must never serve them). Every host publishes
    # its open snapshot exports with its stats, and GC on every host keeps what they read
    # as if they were snapshots (Blockd.collect_garbage_once). The order makes it safe:
    # - opening: publish first, then check the snapshot still exists; GC reads the
    #   records before the stats, so a GC pass that missed the publication read records
    #   from after the delete, and then our check after publishing sees the delete too;
    # - deleting: a host notices within one record sync, fails the export's requests from
    #   then on (Gone: EIO) and only then unpublishes it; a remote read that was under way
    #   is checked again on return.
    # `vbp volume delete NAME@SNAP` refuses a published snapshot unless --force.

    def published(self) -> list[dict]:
        """The exports open here that GC everywhere must keep as readers: the snapshot
        exports, and the chains of the head exports that hold no lease (one entry per
        chain)."""
        out = [_entry(export, gw.lineage, gw.view) for export, gw in self.gateways.items()
               if gw.read_only and gw.gone is None]
        seen = {_key(e) for e in out}
        for e in self._head_entries():
            if _key(e) not in seen:
                seen.add(_key(e))
                out.append(e)
        return out

    def to_publish(self) -> list[dict]:
        """published(), for a publication numbered pub_seq (went_through: it is in the
        registry). A head reader's entry counts as published from the first list of the
        run of lists that has had it ever since (_confirm)."""
        out = self.published()
        self.pub_seq += 1
        self._pub_since = {k: self._pub_since.get(k, self.pub_seq) for k in map(_key, out)}
        return out

    def went_through(self, seq: int) -> None:
        self.pub_through = max(self.pub_through, seq)

    # Head exports without the lease (readers: a backup, `vbp volume export` of a live
    # volume through another host than its gateway's). A reader reads by the chain of
    # the record it last adopted; once another host made a new head (a snapshot), wrote
    # past it and deleted the snapshot, that chain is in no record, and GC would free
    # what it reads. So a reader is published as a snapshot export is, and serves only
    # while it may count on it (serve_until): RECORD_LAPSE past the start of a
    # publication with its chain that went through before a read of the record that
    # showed the chain still there (the head, or a snapshot's). A GC pass that missed
    # the publication read the records before it went through, so before that read,
    # and the chain was in them then (a chain is in a record from when it is the head
    # until its snapshot is deleted). A newer view (a snapshot, a resize) is published
    # alongside before the reader adopts it, which a later read of the record then
    # shows still current, and the chain left stays published while a remote read by
    # it may be under way. A lease holder is not published: no other host makes a new
    # head under it; once it is fenced, or its lease runs out unrenewed, it is.

    def _head_entries(self):
        now = trio.current_time()
        for export, gw in self.gateways.items():
            if gw.read_only or gw.gone is not None or self._holds(gw, now):
                continue
            if gw.fenced and now > gw.serve_until:  # (never serves again: no record sync)
                continue
            yield _entry(export, gw.lineage, gw.view)
            if export in self._next:
                yield _entry(export, gw.lineage, self._next[export])
            left = [(e, t) for e, t in self._retiring.get(export, ()) if t >= now]
            self._retiring[export] = left
            yield from (e for e, _ in left)

    @staticmethod
    def _holds(gw: VolumeGateway, now: float) -> bool:
        return bool(gw.token) and not gw.fenced and now < gw.lease_deadline

    def _forget(self, export: str) -> None:
        """Drop what was kept about `export`'s gateway, now given up."""
        self.expired.discard(export)  # (its lease is no longer renewed: the next one's is)
        self._next.pop(export, None)
        self._retiring.pop(export, None)
        self._settled.pop(export, None)
        self._settle_at.pop(export, None)
        self._unsettled_readers.discard(export)

    async def _hold_head(self, export: str, gw: VolumeGateway) -> None:
        """Publish a head export's chain, then read its record (sync_record), which lets
        it serve (serve_until) if the chain is still there. Failing (the registry
        unreachable, the volume deleted), the export is not opened."""
        try:
            await self.service.publish_stats()
            await self.sync_record(gw, None)
        except BaseException:
            del self.gateways[export], self.refs[export]
            self._forget(export)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._republish()
            raise

    async def _follow(self, export: str, gw: VolumeGateway, rec: VolumeRecord,
                      through: int) -> None:
        """A reader's step of sync_record: adopt the record's view once a publication
        with it went through before this read of the record (`through`), else publish
        it now and keep the chain it has."""
        view = view_of(rec, None)
        if _view_key(gw.lineage, view) == _view_key(gw.lineage, gw.view):
            self._next.pop(export, None)
            return
        if view.gen < gw.gen or view.gen == gw.gen and view.size < gw.size:
            # a record read before the gateway adopted a newer head (its client's first
            # write took the lease, whose own read completed a snapshot or a shrink):
            # adopted, the older head would take writes, into a snapshot or past the end;
            # or before it adopted a grow (within a generation the size only grows: a
            # shrink makes a new head): adopted, the older size would refuse requests
            # between the two ends until the next record sync
            return
        nxt = self._next.get(export)
        key = _view_key(gw.lineage, view)
        new = nxt is None or _view_key(gw.lineage, nxt) != key
        if new:
            self._next[export] = view
        if self._pub_since.get(key, math.inf) > through:
            # not published yet: publish now (again, if the last try failed a while ago;
            # the heartbeat publishes too). A view new to follow goes at once, whenever
            # the last went: a request past a shrunk end waits two record syncs for the
            # grown view (VolumeGateway._unless_grown)
            now = trio.current_time()
            if new or now >= self._follow_pub_at:
                self._follow_pub_at = now + 1.0
                self.service.nursery.start_soon(self._republish)
            return
        old = _entry(export, gw.lineage, gw.view)
        if view.gen > gw.gen:
            async def adopt():
                return view
            await gw.switch_head(adopt)
        else:
            gw.set_view(view)
        # a remote read under way still reads by the old chain: each host it tries takes
        # at most a request timeout
        until = trio.current_time() + self.service.cfg.peer_timeout * max(gw.n, 1) + 1
        self._retiring.setdefault(export, []).append((old, until))
        self._next.pop(export, None)

    def _confirm(self, gw: VolumeGateway, rec: VolumeRecord, t0: float, through: int,
                 published_at: float) -> None:
        """A read of the record started at `t0`, after the publications up to `through`
        (the last at `published_at`) went through: the gateway may serve RECORD_LAPSE
        past the start of that publication (or of the read, if earlier) if its chain was
        in it and is still in the record."""
        since = self._pub_since.get(_view_key(gw.lineage, gw.view))
        if since is None or since > through or not _in_record(rec, gw.view):
            return
        bound = min(published_at, t0) + self.service.cfg.heartbeat_ttl * RECORD_LAPSE
        gw.serve_until = max(gw.serve_until, bound)

    async def _hold_snapshot(self, export: str, gw: VolumeGateway) -> None:
        try:
            await self.service.publish_stats()
            if await self._snapshot_gone(gw):
                raise NotFound(f"snapshot {export} was deleted")
        except BaseException:
            del self.gateways[export], self.refs[export]
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.service.publish_stats()
                except VbpError as e:
                    log.warning("volume=%s event=unpublish_failed error=%s", export, e)
            raise

    async def _republish(self) -> None:
        try:
            await self.service.publish_stats()
        except VbpError as e:  # the next heartbeat publishes again
            log.warning("event=stats_publish_failed error=%s", e)

    async def _snapshot_gone(self, gw: VolumeGateway) -> bool:
        """True (and the export fails from now on) if its snapshot no longer exists; else
        the export takes the volume's limits as they are now."""
        name, snap = split_export_name(gw.name)
        try:
            rec = VolumeRecord.from_dict(await self.service.registry.get_volume(name))
            if same_volume(rec, gw.view.volume) and view_of(rec, snap).chain == gw.view.chain:
                set_qos(gw, rec)  # (the volume's limits, live, as for its head)
                # Published before this check, and the snapshot still there: the export
                # serves until that publication is about to lapse in the registry (after
                # which a delete could see no user and garbage collection free its
                # chunks), unless a later check moves this on (VolumeGateway.serve_until).
                svc = self.service
                gw.serve_until = svc.published_at + svc.cfg.heartbeat_ttl * PUBLISH_LAPSE
                return False
        except NotFound:
            pass
        gw.set_gone(Gone(f"snapshot {gw.name} was deleted while exported"))
        return True

    async def _open(self, export: str, name: str, snap: str | None) -> VolumeGateway:
        svc = self.service
        rec = VolumeRecord.from_dict(await svc.registry.get_volume(name))
        view = view_of(rec, snap)
        gw = VolumeGateway(view, host_id=svc.cfg.host_id, replica=svc.replica, cluster=svc.cluster,
                           pool=svc.pool, registry=svc.registry)
        if not view.read_only:
            gw.take_lease = functools.partial(self._take_lease, export)
            gw.serve_until = -math.inf  # until published and read again (_hold_head)
        gw.refresh_map = svc.refresh_map
        gw.next_sync = self.next_sync
        gw.renew_serving = self.renew_serving
        gw.metrics = svc.metrics
        set_qos(gw, rec)
        gw.stale = await svc.stale_map(rec.lineage)
        gw.on_fenced = self._on_fenced
        gw.on_close = functools.partial(self._closed, export)
        log.info("volume=%s event=open read_only=%s", export, view.read_only)
        return gw

    async def _take_lease(self, export: str, *, wait: bool = True) -> int:
        lease, deadline = await self._acquire(export, wait=wait)
        self.leases[export] = lease
        if lease.taken_over:
            # from now until the reconcile is done (the announcement below awaits too),
            # any release of this lease (the last client leaving meanwhile, say) hands
            # it back still owing the reconcile (_release)
            self.reconciling.add(lease.token)
        gw = self.gateways.get(export)
        if gw is not None:
            gw.lease_deadline = deadline
        log.info("volume=%s event=lease_taken token=%d taken_over=%s", export, lease.token,
                 lease.taken_over)
        try:
            await self._announce(export, lease.token)
        except BaseException:
            # cancelled (the write that wanted the lease went with its connection): the
            # gateway keeps no token, and the lease kept would be renewed for as long as
            # any other client of the volume stays here. Given back (owing the reconcile
            # if taken over: not begun); the next write takes it again.
            self.reconciling.discard(lease.token)
            await self._release(self._drop_lease(export, lease),
                                reconciled=not lease.taken_over)
            raise
        if lease.taken_over and gw is not None:
            try:
                await gw.reconcile_after_takeover(lease.token)
                if not gw.takeover_unheard:  # (else handed back owing it: see there)
                    self.reconciling.discard(lease.token)
            except BaseException:
                self.reconciling.discard(lease.token)
                # Not reconciled (the registry unreachable for its marks, say): the lease
                # goes back still marked a takeover, so that whoever takes it next, this
                # gateway at its next write included, compares the copies again. Kept,
                # it would be handed back later as reconciled (the client gone, say). Not
                # released (registry unreachable), it expires: a takeover still.
                await self._release(self._drop_lease(export, lease), reconciled=False)
                raise
        # Read the record again now that we hold the lease: a snapshot requested before
        # we took it must be completed before our first write (vbp.volume, snapshots).
        # And the stale records: the last holder recorded every copy its writes missed
        # before it gave the lease up (_release settles them first), and our map, read
        # up to a second ago (a lease handed over and back: lease_wanted), may not have
        # them yet; by it, a read would answer this host's copy without the last
        # holder's acknowledged writes.
        gw = self.gateways.get(export)
        if gw is not None:
            try:
                await gw.refresh_stale(self.service.stale_map)
                await self.sync_record(gw, lease)
            except BaseException:
                # the write that wanted the lease fails and the gateway keeps no token:
                # kept, the lease would be renewed for as long as the client stays, by a
                # gateway whose record syncs (a reader's, with no token) never complete a
                # snapshot or a shrink, which then time out. Given back; the next write
                # takes it again.
                await self._release(self._drop_lease(export, lease))
                raise
        # Its entry as a head reader goes now (_head_entries: the gateway holds the
        # token by the time this runs), not at the next heartbeat: else, the client gone
        # and the lease handed back, the entry still showed a user until then.
        self.service.nursery.start_soon(self._republish)
        return lease.token

    def _drop_lease(self, export: str, lease):
        """Forget `lease` of `export` (the one kept in `leases` if it is the same grant:
        a renewal meanwhile keeps another object of the same token there, which would
        be renewed after the release and refused, fencing the gateway); the object to
        release."""
        cur = self.leases.get(export)
        if cur is not None and (cur.holder, cur.token) == (lease.holder, lease.token):
            del self.leases[export]
            return cur
        return lease

    async def _announce(self, volume: str, token: int) -> None:
        """Tell every reachable host the new fencing token before our first write, so a
        previous holder that has not noticed it lost the lease is refused at once (the
        way Ceph blocklists the old lock owner). An unreachable host is the partitioned
        old holder itself, or a replica that will be resynced."""
        svc = self.service
        msg = m.Flush(volume, svc.cluster.epoch, token)

        async def one(h) -> None:
            with trio.move_on_after(svc.cfg.peer_timeout):
                try:
                    if h.id == svc.cfg.host_id:
                        svc.replica.check_token(volume, token)
                    else:
                        await svc.pool.call(h.peer, msg)
                except VbpError as e:
                    log.info("volume=%s event=token_not_announced host=%s error=%s", volume, h.id, e)

        async with trio.open_nursery() as nursery:
            for h in svc.cluster.map.hosts:
                if h.state != "down":
                    nursery.start_soon(one, h)

    async def sync_record(self, gw: VolumeGateway, lease) -> None:
        """Adopt the volume's current record; the holder of `lease` (None: not a holder)
        completes a pending snapshot, a reader adopts it once published (_follow). The
        record read, a published chain still in it lets the gateway serve on (_confirm)."""
        if lease is None:
            await self._sync_record(gw, None)
            return
        # (counted before the first await: the caller read `lease` with no checkpoint since)
        self._leased_syncs[gw.name] = self._leased_syncs.get(gw.name, 0) + 1
        try:
            await self._sync_record(gw, lease)
        finally:
            left = self._leased_syncs[gw.name] - 1
            if left:
                self._leased_syncs[gw.name] = left
            else:
                del self._leased_syncs[gw.name]

    async def _sync_record(self, gw: VolumeGateway, lease) -> None:
        svc = self.service
        name = gw.view.volume.name
        t0 = trio.current_time()
        through, published_at = self.pub_through, svc.published_at
        mine = gw.view.volume

        def ours(d: dict) -> VolumeRecord:
            # deleted and created again under its name between two syncs (or since the
            # read below, for the updates made under the lease: the lease is the name's,
            # and the new volume's pending change may have the same head number, each
            # lineage counting its own): another volume, never changed nor adopted here
            r = VolumeRecord.from_dict(d)
            if not same_volume(r, mine):
                raise NotFound(f"volume {name!r} was deleted (a new volume has its name)")
            return r

        rec = ours(await svc.registry.get_volume(name))
        if lease is None:  # a reader: its chain must be published before it reads by it
            if self.gateways.get(gw.name) is gw:
                await self._follow(gw.name, gw, rec, through)
            set_qos(gw, rec)
            self._confirm(gw, rec, t0, through, published_at)
            return
        if pending_head(rec) and pending_abandoned(rec):
            # its requester gave up long ago: completed now, a snapshot would hold today's
            # data, a shrink discard what was written since
            pending, what = pending_head(rec), "snapshot" if rec.pending else "shrink"
            rec = VolumeRecord.from_dict(await svc.registry.update_volume(
                name, lambda d: cancel_pending(ours(d), pending).to_dict(), lease))
            log.warning("volume=%s event=abandoned_%s_cancelled head=%d", name, what, pending)
        if pending_head(rec):
            # a snapshot, or a shrink: the writes under way to the old head end first
            # (switch_head); a shrink's new size refuses writes past its end from then on,
            # so none is acknowledged into the old head, to be lost, once it completed
            pending, what = pending_head(rec), "snapshot" if rec.pending else "shrink"

            async def complete():
                def finish(d):
                    r = ours(d)
                    return complete_pending(r, pending).to_dict() \
                        if pending in (r.pending, r.shrink_head) else d
                # only while the lease is still ours (Fenced otherwise): a gateway whose
                # lease was taken over, and that has not noticed yet, must not complete a
                # snapshot while the new holder still writes to the old head
                while True:
                    try:
                        new = VolumeRecord.from_dict(
                            await svc.registry.update_volume(name, finish, lease))
                        break
                    except RegistryUnavailable as e:
                        # The update may have committed with its answer lost (etcd: an
                        # unknown outcome): the old head may be the snapshot's now (or the
                        # volume shrunk), and no held write may go on to it. Asked again,
                        # `finish` settles it (it completes only the change pending here). Writes stay held
                        # while our lease lasts; past it, the gateway is fenced.
                        if trio.current_time() >= gw.lease_deadline:
                            gw._fence(Fenced(f"completing the {what} of {name!r}: {e}"))
                            raise
                        log.warning("volume=%s event=%s_complete_retry error=%s", name, what, e)
                        await trio.sleep(COMPLETE_RETRY)
                log.info("volume=%s event=%s_completed head=%d", name, what, new.head)
                return view_of(new, None)

            await gw.switch_head(complete, None if rec.pending else rec.shrink_to)
        elif rec.head > gw.gen:
            # a new head made by another (a shrink or a snapshot completed without a lease):
            # writes under way to the old head end first, or one landing late on a copy
            # would miss the copy-up that a newer write to its chunk made there
            view = view_of(rec, None)

            async def adopt():
                return view

            await gw.switch_head(adopt)
        elif rec.head == gw.gen and rec.size > gw.size:
            # a grow (a record of an older head, or of a smaller size of this one, was read
            # before the gateway adopted a newer one: _follow's check)
            gw.set_view(view_of(rec, None))
        set_qos(gw, rec)
        self._confirm(gw, rec, t0, through, published_at)  # (a lease holder past its lease)

    async def next_sync(self) -> None:
        """Return once a pass of sync_records begun after this call has ended: every open
        head export has read its volume's record (or failed to) since the call. The
        pass is asked for now (Blockd._watch_volumes)."""
        want = self._syncs_begun + 1
        self.sync_wanted = True
        if self.wake_sync is not None:
            self.wake_sync.cancel()
        while self._syncs_ended < want:
            await self._sync_ended.wait()

    async def renew_serving(self) -> None:
        """For a request of an export whose serve_until passed (VolumeGateway._renewed):
        publish this host's exports, then have every export read its record (next_sync),
        at most RENEW_WAIT seconds. The requests that come while one is under way wait
        for it rather than start another."""
        with trio.move_on_after(RENEW_WAIT):
            if self._renewing is not None:
                await self._renewing.wait()
                return
            self._renewing = ended = trio.Event()
            try:
                await self._republish()
                await self.next_sync()
            finally:
                self._renewing = None
                ended.set()

    async def sync_records(self, volumes: set[str] | None = None,
                           readers: bool = False) -> set[str]:
        """Every open export reads its volume's record and adopts it (sync_record); with
        `volumes` (names whose records changed) or `readers` (the exports without the
        lease, and those whose lease runs out before the next pass of all: their reads
        keep them serving, _confirm), only those (no pass for next_sync). Returns the
        volumes whose read failed (Blockd._watch_volumes asks again for them)."""
        if volumes is not None or readers:
            return await self._sync_records(volumes or set(), readers)
        self.sync_wanted = False
        self._syncs_begun += 1
        n = self._syncs_begun
        try:
            return await self._sync_records()
        finally:
            self._syncs_ended = max(self._syncs_ended, n)
            ended, self._sync_ended = self._sync_ended, trio.Event()
            ended.set()

    async def _sync_records(self, volumes: set[str] | None = None,
                            readers: bool = False) -> set[str]:
        gone = False
        failed: set[str] = set()
        soon = trio.current_time() + RECORD_SYNC_MAX  # (a lease running out before it)
        for export, gw in list(self.gateways.items()):
            if volumes is not None and gw.view.volume.name not in volumes and not (
                    readers and (not gw.token or gw.lease_deadline <= soon)):
                continue
            if gw.read_only and gw.gone is None:
                try:
                    gone = await self._snapshot_gone(gw) or gone
                except VbpError as e:
                    failed.add(gw.view.volume.name)
                    log.warning("volume=%s event=record_sync_failed error=%s", export, e)
            if gw.read_only or gw.fenced:
                continue
            try:
                await self.sync_record(gw, self.leases.get(export) if gw.token else None)
                if not gw.token and gw.take_lease is not None:
                    await self._settle_if_orphaned(export, gw)
            except NotFound:
                self._fence_deleted(gw, f"volume {gw.view.volume.name!r} was deleted")
            except Fenced as e:  # (completing a snapshot: the lease is no longer ours)
                gw._fence(e)
            except VbpError as e:
                failed.add(gw.view.volume.name)
                log.warning("volume=%s event=record_sync_failed error=%s", export, e)
        if gone:
            await self._republish()
        return failed

    async def _acquire(self, name: str, *, wait: bool = True):
        """Take the volume's write lease. A lease still held elsewhere is waited for up to
        one lease period: its holder either hands it back (clean close) or stops renewing
        (crash) and it expires; this is the gateway failover path. `wait=False`: LeaseHeld
        at once."""
        svc = self.service
        deadline = trio.current_time() + svc.cfg.lease_ttl + 2
        ask_at = -math.inf
        while True:
            try:
                t0 = trio.current_time()
                lease = await svc.registry.acquire_lease(name, svc.cfg.host_id, svc.cfg.lease_ttl)
                return lease, self._deadline(t0)
            except LeaseHeld as e:
                if not wait or trio.current_time() > deadline:
                    raise LeaseHeld(f"volume {name!r} is served by another host: {e}") from None
                if trio.current_time() >= ask_at:  # (again now and then: it may be busy)
                    ask_at = trio.current_time() + LEASE_ASK_PERIOD
                    await self._want_lease(name)
                    await trio.sleep(0.05)  # (handed over in a registry call or two)
                    continue
                await trio.sleep(0.2)

    async def _want_lease(self, name: str) -> None:
        """Ask the host holding `name`'s write lease for it (WantLease): handed over if
        its gateway is idle (lease_wanted). A holder gone silent is not waited for here:
        its lease runs out."""
        svc = self.service
        try:
            held = await svc.registry.get_lease(name)
            if held is None or held.holder in ("", svc.cfg.host_id):
                return
            h = svc.cluster.map.host(held.holder)
            why = ("not in the map" if h is None else "down" if h.state == "down"
                   else "older blockd" if h.peer_rev < m.WANT_LEASE_REV else "")
            if not why:
                with trio.move_on_after(svc.cfg.peer_timeout):
                    await svc.pool.call(h.peer, m.WantLease(name, held.token))
                    return
                why = "no answer"
        except VbpError as e:
            why = f"error={e}"
        self._kept.log(log, logging.INFO, (name, "ask"), "volume=%s event=lease_not_asked "
                       "reason=%s", name, why)

    def lease_wanted(self, volume: str, token: int) -> None:
        """Another host waits for the write lease of `volume` this host holds with
        `token` (WantLease). A gateway holding it idle (VolumeGateway.drop_idle_lease)
        hands it over, as RBD's exclusive lock passes on request: a live-migrated VM's
        destination writes at once, where it failed after a lease period while the
        source VM, paused for good, stayed connected here. A gateway that is writing,
        or owes a record or a reconcile, keeps it; the asker asks again. One that owes
        only a flush is flushed for it (_flush_for_asker), and the next ask finds it idle. So does
        one whose record sync is under way with the lease: a snapshot or a shrink it
        read pending is completed under the lease, which comes back Fenced once the
        lease went, and fences the gateway for good."""
        lease = self.leases.get(volume)
        gw = self.gateways.get(volume)
        if lease is None or lease.token != token or gw is None or gw.token != token:
            return  # (not ours now: the asker reads the registry again)
        kept = ("takeover reconcile under way" if token in self.reconciling
                else "lease expired" if volume in self.expired
                else "close flush under way" if volume in self.close_flushes
                else "record sync under way" if self._leased_syncs.get(volume)
                else gw.lease_busy())
        if kept or not gw.drop_idle_lease():
            # (the asker asks every LEASE_ASK_PERIOD while it waits: a few lines a period)
            self._kept.log(log, logging.INFO, volume, "volume=%s event=lease_kept token=%d "
                           "reason=%s", volume, token, kept or "busy")
            if kept == "writes not flushed" and volume not in self._flushing_for:
                # nothing else keeps it: flushed now, so the next ask finds it idle
                self._flushing_for.add(volume)
                self.service.nursery.start_soon(self._flush_for_asker, volume, gw)
            return
        del self.leases[volume]
        # its reads wait until it serves as a reader: published, its record read again
        gw.settling = trio.Event()
        self.service.nursery.start_soon(self._hand_over, volume, lease, gw)

    async def _flush_for_asker(self, volume: str, gw: VolumeGateway) -> None:
        """Another host waits for the lease, which only writes not flushed keep here: a
        flush makes them durable (more than the client asked for, never less), as RBD's
        exclusive lock flushes before it passes. A live-migrated VM's source may have
        written after its switchover flush (a monitor's qemu-io, a device's late write)
        and never flushes again: the destination's writes would fail a lease period
        later. A flush that fails leaves the lease here; the asker waits it out. Its
        failure goes to the client's next FLUSH (VolumeGateway.flush_unasked)."""
        try:
            await gw.flush_unasked()
        except VbpError as e:
            log.info("volume=%s event=lease_flush_failed error=%s", volume, e)
        finally:
            self._flushing_for.discard(volume)

    async def _hand_over(self, export: str, lease, gw: VolumeGateway) -> None:
        done = gw.settling
        try:
            log.info("volume=%s event=lease_handed_over token=%d", export, lease.token)
            await self._release(lease, gw)
            if self.gateways.get(export) is gw and not gw.token and not gw.fenced:
                with trio.move_on_after(self.service.cfg.peer_timeout):
                    await self.service.publish_stats()
                    if not gw.token:  # (its client wrote meanwhile and took it back)
                        await self.sync_record(gw, None)
        except NotFound:
            self._fence_deleted(gw, f"volume {gw.view.volume.name!r} was deleted")
        except VbpError as e:  # (its reads fail Unsynced until a record sync succeeds)
            log.warning("volume=%s event=record_sync_failed error=%s", export, e)
        finally:
            gw.settling = None
            done.set()

    def _deadline(self, t0: float) -> float:
        """When a lease granted or renewed by a call started at `t0` must be treated as
        gone (trio time: blockd runs trio on the boot clock, blockd.clock, which no step
        of the wall clock moves and a suspend does not stop): the registry put its
        liveness key after t0, to run out `ttl` later on the store's clock, and a margin
        covers the clocks' rates."""
        ttl = self.service.cfg.lease_ttl
        return t0 + ttl - min(1.0, ttl / 10)

    def _fence_deleted(self, gw: VolumeGateway, why: str) -> None:
        """`gw`'s volume was deleted (a new one may have its name): fenced (NotFound), and
        the write lease it holds given back now, so that the first write of a volume
        created again under the name does not wait for it to run out (lease_ttl): a
        fenced gateway takes no write any more. Not given back (the registry unreachable),
        it runs out."""
        lease = self.leases.get(gw.name) if self.gateways.get(gw.name) is gw else None
        gw._fence(NotFound(why))
        if lease is not None:
            self.service.nursery.start_soon(self._release, lease)

    def token_seen(self, volume: str, token: int) -> None:
        """A newer fencing token for `volume` reached this host's replica (another
        gateway's announcement, or its writes): a gateway here holding an older one is
        deposed and fenced at once. Its reads of this host's copies, which carry no
        token, would otherwise go on by a chain the new holder moves past (its remote
        reads are refused by the copies that saw the token: ReadChunk.token)."""
        gw = self.gateways.get(volume)
        if gw is not None and gw.token and not gw.fenced and gw.token < token:
            gw._fence(Fenced(f"volume {volume!r}: another gateway holds the write lease "
                             f"(token {token}, newer than this gateway's {gw.token})"))

    def _on_fenced(self, gw: VolumeGateway) -> None:
        if self.gateways.get(gw.name) is gw:
            self.leases.pop(gw.name, None)

    def _closed(self, export: str, gw: VolumeGateway):
        """A connection to `export` ended; the last one flushes and gives the lease back."""
        if self.gateways.get(export) is not gw:
            if gw.suspects or gw.unrecorded:  # a replaced (fenced) gateway's last word
                self.unsettled.append((gw, None))
            return None
        self.refs[export] -= 1
        if self.refs[export] > 0:
            return None
        del self.gateways[export], self.refs[export]
        self._forget(export)
        self.service.nursery.start_soon(self._republish)  # unpublished now, and not open
        lease = self.leases.pop(export, None)
        store = self.service.store
        if gw.owes_flush():
            # writes of the gone connections still under way (a task-less write waits for
            # no task of theirs), or answered and not yet durable on other hosts: the
            # lease is kept until they end and every copy is flushed (a FLUSH on a
            # connection made meanwhile waits for that: after_close), and what they could
            # not record goes to the registry with it, before it is given back
            self.closing += 1  # (until its task ends: counted from now, for drain)
            flushed = PendingFlush()
            self.close_flushes[export] = (gw.view.volume, flushed)
            self.service.nursery.start_soon(self._flush_and_let_go, export, lease, gw, None,
                                            flushed)
            return None
        ahead = store.sync_ahead()
        if ahead is not None:  # much to write back: not on the event loop
            self.closing += 1
            self.service.nursery.start_soon(self._flush_and_let_go, export, lease, gw, ahead)
            return None
        try:
            store.flush()
        except Exception:  # the store flush failing is logged; the lease still goes
            log.exception("volume=%s event=close_flush_failed", export)
        self._let_go(lease, gw)
        return None

    async def _flush_and_let_go(self, export: str, lease, gw: VolumeGateway, ahead,
                                flushed: PendingFlush | None = None) -> None:
        """Give `gw`'s lease back once its writes under way ended and what it answered is
        durable: on every copy (`flushed`: the flush the export's next gateway here waits
        for, given its error), or in this host's store."""
        # shielded as _release is: a shutdown closes the connections while cancelling
        try:
            with trio.CancelScope(shield=True):
                await gw.drain()  # (bounded: each write ends within its timeouts)
                try:
                    if flushed is not None:
                        await gw.flush_now()  # (every copy)
                    else:
                        await flush_store(self.service.store, ahead)
                except VbpError as e:  # (a copy that could not sync: one line)
                    log.warning("volume=%s event=close_flush_failed error=%s", export, e)
                    if flushed is not None:
                        flushed.error = e
                except Exception as e:
                    log.exception("volume=%s event=close_flush_failed", export)
                    if flushed is not None:
                        flushed.error = e
        finally:
            self.closing -= 1
            if flushed is not None:
                flushed.done.set()
                kept = self.close_flushes.get(export)
                if flushed.error is None and kept is not None and kept[1] is flushed:
                    del self.close_flushes[export]  # (a failure stays for the next FLUSH)
        self._let_go(lease, gw)

    def _let_go(self, lease, gw: VolumeGateway) -> None:
        if lease is not None:
            self.service.nursery.start_soon(self._release, lease, gw)
        elif gw.suspects or gw.unrecorded:
            self.unsettled.append((gw, None))

    async def _release(self, lease, gw: VolumeGateway | None = None, *,
                       reconciled: bool = True) -> None:
        # shielded: on shutdown the connections close while the nursery is cancelled, and
        # a lease handed back now spares the next gateway a whole lease period
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                if gw is not None and not await self.settle(gw, lease):
                    raise RegistryUnavailable("what the gateway could not record is still pending")
                reconciled = reconciled and lease.token not in self.reconciling
                await self.service.registry.release_lease(lease, reconciled=reconciled)
                self.reconciling.discard(lease.token)
                log.info("volume=%s event=lease_released token=%d", lease.volume, lease.token)
            except VbpError as e:
                log.warning("volume=%s event=lease_release_failed error=%s", lease.volume, e)
        if gw is not None and (gw.suspects or gw.unrecorded):
            # the lease stays ours (or expires): settled later, when the registry answers
            self.unsettled.append((gw, lease))

    async def settle(self, gw: VolumeGateway, lease) -> bool:
        """Tell the registry what `gw` could not (VolumeGateway.unrecorded, .suspects);
        True when nothing is left. Unrecorded failures need to know whether our lease is
        still the newest: a renewal answers that (and Fenced converts them to suspects)."""
        reg = self.service.registry
        try:
            if gw.unrecorded and lease is not None and not gw.fenced:
                try:
                    await reg.renew_lease(lease, self.service.cfg.lease_ttl)
                except RegistryUnavailable:
                    raise
                except VbpError as e:
                    gw._fence(e)
                await self._record_missed(gw)
            while gw.suspects:
                item = gw.suspects[0]
                index, hosts = item
                await reg.mark_stale(gw.lineage, index, hosts, time.time_ns())
                if not drop_identical(gw.suspects, item):
                    continue  # (recorded by another settle at once)
                log.warning("volume=%s chunk=%d event=unacknowledged_copies_stale hosts=%s",
                            gw.name, index, ",".join(hosts))
        except RegistryUnavailable as e:
            log.warning("volume=%s event=settle_failed error=%s", gw.name, e)
            return False
        return not (gw.unrecorded or gw.suspects)

    async def _record_missed(self, gw: VolumeGateway) -> None:
        """Our lease is still the newest: failures we could not record are recorded now,
        exactly as they would have been at the time (the hosts that missed a write)."""
        while gw.unrecorded:
            item = gw.unrecorded[0]
            index, _took, missed = item
            await self.service.registry.mark_stale(gw.lineage, index, missed, time.time_ns())
            if not drop_identical(gw.unrecorded, item):
                continue  # (recorded by another call at once: a renewal's and a release's)
            log.info("volume=%s chunk=%d event=stale_recorded_late hosts=%s", gw.name, index,
                     ",".join(missed))

    async def settle_all(self) -> None:
        for gw in list(self.gateways.values()):
            if gw.suspects and gw.fenced:
                await self.settle(gw, None)
        for item in list(self.unsettled):
            if await self.settle(*item):
                self.unsettled.remove(item)
                if item[1] is not None:
                    await self._release(item[1])

    async def renew_all(self) -> None:
        """Renew every lease we hold, side by side (at most RENEW_PARALLEL registry calls
        at once): one after the other, the renewals of a host holding many leases added
        up (30 leases at 0.3 s a renewal: each renewed every 12 s, past its lease), and a
        renewal held up (a registry member that stopped answering holds it for the
        client's timeout) held every later one up as long."""
        async with trio.open_nursery() as nursery:
            for export, lease in list(self.leases.items()):
                nursery.start_soon(self._renew, export, lease)

    async def _renew(self, export: str, lease) -> None:
        """Renew one lease. A registry call takes time, and meanwhile the lease may go
        back (its last connection closed) or be replaced (a new gateway took a new one):
        an answer about a lease that is no longer ours to renew is dropped, never stored
        back nor turned against the gateway now serving the volume."""
        svc = self.service
        async with self._renewals:
            if self.leases.get(export) is not lease:
                return  # (given back or replaced while waiting for its turn)
            gw = self.gateways.get(export)
            try:
                for _ in range(2):
                    t0 = trio.current_time()
                    renewed = await svc.registry.renew_lease(lease, svc.cfg.lease_ttl)
                    if self.leases.get(export) is not lease:
                        break
                    lease = self.leases[export] = renewed
                    if self._deadline(t0) > trio.current_time():
                        break
                    # the answer came too late to count (a hung registry): once more at once
                if self.leases.get(export) is not lease:
                    return
            except RegistryUnavailable as e:
                if self.leases.get(export) is not lease:
                    return
                log.warning("volume=%s event=lease_renew_failed error=%s", export, e)
                if gw is not None and trio.current_time() >= gw.lease_deadline and export not in self.expired:
                    self.expired.add(export)
                    log.warning("volume=%s event=lease_expired token=%d: writes are refused until "
                                "the registry confirms the lease", export, lease.token)
                return
            except VbpError as e:
                if self.leases.get(export) is not lease:
                    return
                if gw is not None:
                    gw._fence(e)
                self.leases.pop(export, None)
                self.expired.discard(export)
                return
        if gw is not None:
            gw.lease_deadline = self._deadline(t0)
            if export in self.expired:
                self.expired.discard(export)
                log.info("volume=%s event=lease_renewed_after_expiry token=%d", export, lease.token)
            try:
                await self._record_missed(gw)
            except RegistryUnavailable as e:
                log.warning("volume=%s event=stale_record_failed error=%s", export, e)

    async def reconcile_late(self) -> None:
        """Ask the hosts a takeover's reconcile could not ask (cut off, silent), once they
        are up (VolumeGateway.reconcile_unheard); when none is left, the lease is
        reconciled: handed back cleanly from then on."""
        for export, lease in list(self.leases.items()):
            gw = self.gateways.get(export)
            if gw is None or not gw.takeover_unheard or lease.token not in self.reconciling:
                continue
            left = await gw.reconcile_unheard(lease.token)
            now = self.leases.get(export)  # (renewed meanwhile: another object, same token)
            if not left and now is not None and now.token == lease.token:
                self.reconciling.discard(lease.token)
                log.info("volume=%s event=takeover_reconciled_late token=%d", export, lease.token)

    async def release_all(self) -> None:
        for export, lease in list(self.leases.items()):
            await self._release(lease, self.gateways.get(export))
        self.leases.clear()


async def compact_registry_once(registry, cmap, host_id: str, kept: int | None) -> int | None:
    """One step of the registry's compaction, every COMPACT_PERIOD: on the controller (the
    up host with the lowest id, as for changes of data set), drop the history from before
    the revision noted at the previous step, and note the revision now. Returns the
    revision to compact to at the next step (None on other hosts)."""
    if cmap.controller() != host_id:
        return None
    now = await registry.revision()
    if kept is not None:
        await registry.compact_history(kept)
        log.info("event=registry_compacted revision=%d", kept)
    # the lease records of deleted volumes, once no holder can be serving them (a lease
    # that ran out a compaction period ago: its holder has long stopped renewing it)
    gone = await registry.forget_leases_of_deleted(COMPACT_PERIOD)
    if gone:
        log.info("event=leases_forgotten count=%d", gone)
    return now


def _entry(export: str, lineage: str, view: View) -> dict:
    """A published reader (Blockd.collect_garbage_once counts it as one)."""
    return {"export": export, "lineage": lineage, "chain": list(view.chain),
            "cuts": [list(c) for c in view.cuts], "size": view.size,
            "chunk_size": view.volume.chunk_size}


def _key(e: dict) -> tuple:
    return (e["lineage"], tuple(e["chain"]), tuple(tuple(c) for c in e["cuts"]), e["size"])


def _view_key(lineage: str, view: View) -> tuple:
    return _key(_entry("", lineage, view))


def _in_record(rec: VolumeRecord, view: View) -> bool:
    """Whether a reader of the record (its head, pending head or a snapshot: GC's
    readers) reads all that `view` reads."""
    return any(r.chain == tuple(view.chain) and r.cuts == tuple(view.cuts) and r.size >= view.size
               for r in readers([rec]).get(rec.lineage, ()))


def set_qos(gw: VolumeGateway, rec: VolumeRecord) -> None:
    """Apply the record's limits (live: `vbp volume set`); no limits means no bucket at all,
    so an unlimited volume pays nothing per request."""
    if not (rec.qos_iops or rec.qos_bps):
        if gw.qos is not None:
            gw.qos = None
            gw.limits_changed()
    elif gw.qos is None:
        gw.qos = VolumeQos(rec.qos_iops, rec.qos_bps, clock=trio.current_time)
    elif gw.qos.limits != (rec.qos_iops, rec.qos_bps):
        gw.qos.set_limits(rec.qos_iops, rec.qos_bps)
        gw.limits_changed()


class Blockd:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.metrics = Metrics()
        self.nbd_held = HeldBytes()  # what the NBD connections hold together (serve_nbd)
        self.metrics.watch_nbd_held(self.nbd_held)
        self.metrics_port = 0
        self.store = None
        self._gc_memo: tuple | None = None  # collect_garbage_once's last complete pass
        self.records_told = 0  # changes of volume records the record watch was told of
        # (layout, records_told) when the last pass began, and when the next must run
        self._gc_seen: tuple | None = None
        self._gc_full_at = -math.inf
        self.registry = None
        self.cluster: ClusterView | None = None
        self.replica: Replica | None = None
        self.pool = None
        self.nursery: trio.Nursery | None = None
        self.provider = VolumeProvider(self)
        self.peer_port = 0
        self.nbd_port = 0
        self._stats_lock = trio.Lock()  # one publication at a time, each one current
        self._published_used = 0  # the usage in the last stats published
        self.published_at = -math.inf  # trio time: the last publication that went through
        # the store id published in this host's record: the previous one while a new disk
        # is backfilled, so a crash meanwhile finds it again (see _check_store)
        self.store_id = ""
        self._nbd_scope = trio.CancelScope()  # the NBD frontend's, stopped first (drain)
        self.serving = False  # the NBD frontend listens (a stop drains from then on)
        self._old_hosts: list[str] = []  # hosts on the code before the boot clock (_warn_old_hosts)
        self._nbd_stopped = trio.Event()
        self._nbd_stopping = trio.Event()  # set: its connections end gracefully (drain)
        self._map_moved = trio.Event()  # set (and replaced) when _watch_map adopts a new map

    def host_record(self) -> HostRecord:
        peer_host, _ = parse_hostport(self.cfg.listen, "listen")
        nbd_host, _ = parse_hostport(self.cfg.nbd, "nbd")
        return HostRecord(
            id=self.cfg.host_id, peer=f"{peer_host}:{self.peer_port}", nbd=f"{nbd_host}:{self.nbd_port}",
            zone=self.cfg.zone, pod=self.cfg.pod, capacity=self.cfg.capacity,
            peer_rev=m.PEER_REV, store_id=self.store_id,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        data = Path(cfg.data_dir)
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # (a setting: /proc/x, a path under a file, a read-only mount)
            raise InvalidArgument(f"data_dir {data}: cannot be made: {e.strerror or e}") from None
        self.store = ChunkStore(data / "chunks", cfg.capacity, hot_max=cfg.hot_chunks,
                                keep_recovered=True)
        try:
            self.registry = AsyncRegistry(await trio.to_thread.run_sync(open_registry, cfg.registry))
            await self._wait_host_id_free()
            self.store.claim(cfg.host_id)  # (after the registry's word: a store from before)
            cmap = await self.registry.cluster_map()
            self.cluster = ClusterView(cmap)
            self.replica = Replica(self.store, cfg.host_id, lambda: self.cluster.epoch)
            self.replica.on_token = self.provider.token_seen
            self.replica.on_lease_wanted = self.provider.lease_wanted
            # a write is settled (on every copy, or recorded stale) once its gateway lived
            # this long past it: only then does a replica forget it for takeovers
            self.replica.recent_window = 3 * cfg.lease_ttl + 2 * cfg.peer_timeout
            # fencing survives a restart: the tokens granted so far, before serving a peer
            self.replica.learn_tokens(await self.registry.lease_tokens())
            self.resync = Resync(cfg.host_id, self.store, self.cluster, None, self.registry, self.replica)
            self.resync.on_progress = self.metrics.set_recovery
            self.resync.full_ratio = cfg.full_ratio
            # a write may still be on its way to a resync source for a peer timeout, and
            # a failure to record stale for WRITE_GRACE more (VolumeGateway.write_window)
            self.resync.write_window = cfg.peer_timeout + WRITE_GRACE
            if cfg.recovery_rate:
                self.resync.limiter = TokenBucket(cfg.recovery_rate, cfg.recovery_rate / 4, trio.current_time)
            # a pass waits longer than a peer timeout before judging a divergence: as long
            # as a gateway gives a failure to be recorded stale (VolumeGateway.write_window)
            self.scrubber = Scrubber(cfg.host_id, self.replica, self.cluster, None, self.registry,
                                     metrics=self.metrics, rate=cfg.scrub_rate,
                                     settle=cfg.peer_timeout + WRITE_GRACE)
            # before serving anything: copies dirty at a crash, and copies others recorded
            # stale while we were away, must not be served as current
            await self.resync.mark_recovered(self.store.recovered, self.store.recovered_lost)
            self._check_store(cmap)
            peer_host, peer_port = parse_hostport(cfg.listen, "listen")
            nbd_host, nbd_port = parse_hostport(cfg.nbd, "nbd")
            secret = cfg.peer_secret()  # (checked at load: read once more, as it is now)
            async with PeerPool(cfg.cluster, cfg.host_id, request_timeout=cfg.peer_timeout,
                                connect_timeout=cfg.peer_timeout,
                                congestion=cfg.peer_tcp_congestion,
                                host_at=self.cluster.host_at, secret=secret) as pool, \
                    trio.open_nursery() as nursery:
                self.pool = pool
                self.resync.pool = pool
                grace = max(2 * cfg.lease_ttl, 5.0)
                # with a host that does not publish its misplaced copies, a reweight waits
                # until the copies the last change moved are freed (grace, then the
                # collector's next pass) and the stats show it (one heartbeat)
                self.mover = DataSetMover(cfg.host_id, self.store, self.cluster, self.registry, pool,
                                          grace=grace,
                                          reweight_hold=grace + cfg.gc_interval + cfg.heartbeat_ttl,
                                          down_out_interval=cfg.down_out_interval)
                self.scrubber.pool = pool
                self.nursery = nursery
                self.peer_port = await nursery.start(functools.partial(
                    serve_peers, self.replica.handle, peer_host, peer_port,
                    cluster=cfg.cluster, host_id=cfg.host_id, peer_rev=self._peer_rev,
                    congestion=cfg.peer_tcp_congestion, prepare=self.replica.prepare,
                    send_timeout=cfg.peer_timeout, secret=secret))
                nbd_cc, nbd_local_cc = cfg.nbd_congestion()
                self.nbd_port = await nursery.start(functools.partial(
                    self._serve_nbd, self.provider, nbd_host, nbd_port, ids=RequestIds(cfg.host_id),
                    congestion=nbd_cc, local_congestion=nbd_local_cc, tls=cfg.nbd_tls,
                    tls_context=cfg.tls_context(), stopping=self._nbd_stopping,
                    send_timeout=cfg.nbd_send_timeout, held=self.nbd_held,
                    max_connections=cfg.nbd_max_connections,
                    max_per_address=cfg.nbd_max_per_address()))
                self.serving = True
                if cfg.metrics:
                    self.metrics_port = await nursery.start(
                        serve_metrics, self.metrics, *parse_hostport(cfg.metrics, "metrics"))
                cmap = await self.registry.register_host(
                    self.host_record(), cfg.heartbeat_ttl, exclusive=self.store.store_id)
                self.cluster.set_map(cmap)
                await self.publish_stats()
                await self._warn_old_hosts()
                nursery.start_soon(self._heartbeat)
                nursery.start_soon(self._watch_space)
                if self.replica.backfilling:
                    nursery.start_soon(self._backfill)
                nursery.start_soon(self._watch_map)
                nursery.start_soon(self._renew_leases)
                nursery.start_soon(self._collect_garbage)
                nursery.start_soon(self._prune_metrics)
                nursery.start_soon(self._recover)
                nursery.start_soon(self._reconcile_late)
                nursery.start_soon(self._move_data)
                nursery.start_soon(self._compact_registry)
                nursery.start_soon(self._refresh_stale)
                nursery.start_soon(self._watch_volumes)
                nursery.start_soon(self.scrubber.run_loop, cfg.scrub_interval)
                if not pagesums.NATIVE:
                    log.warning("event=checksums_in_python: vbp's C extension (vbp._pagesums) "
                                "is not built, so page checksums are computed in Python, "
                                "slower for large requests: install vbp again with gcc and "
                                "libxxhash-dev present")
                log.info("event=ready peer=%s:%d nbd=%s:%d epoch=%d", peer_host, self.peer_port,
                         nbd_host, self.nbd_port, self.cluster.epoch)
                nursery.start_soon(self._watchdog)
                self.metrics.set_up(True)
                task_status.started(self)
                sd_notify("READY=1")
        finally:
            self.metrics.set_up(False)
            sd_notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await self.provider.release_all()
            self.store.close()
            if self.registry is not None:
                self.registry.sync.close()
            log.info("event=stopped")

    async def _serve_nbd(self, *args, task_status=trio.TASK_STATUS_IGNORED, **kwargs) -> None:
        """serve_nbd, until the NBD frontend alone is stopped (drain)."""
        try:
            with self._nbd_scope:
                await serve_nbd(*args, task_status=task_status, **kwargs)
        finally:
            self._nbd_stopped.set()

    def _peer_rev(self, host_id: str) -> int:
        """The peer revision host `host_id` advertises in the cluster map (0 if unknown):
        what the peer server may send it."""
        rec = self.cluster.map.host(host_id)
        return rec.peer_rev if rec is not None else 0

    def _check_store(self, cmap) -> None:
        """A host back under its id with another chunk store (a replaced disk, a lost data
        directory) holds none of the chunks placed on it, whatever its thin map says: it
        must not answer for them (as holes) until it has learned which it misses. The
        registry remembers the store id each host registered with (DRBD's generation
        ids and Ceph's OSD fsid play this part)."""
        self.store_id = self.store.store_id
        before = cmap.host(self.cfg.host_id)
        if before is not None and before.store_id and before.store_id != self.store.store_id:
            log.warning("event=new_disk previous_store=%s store=%s: none of the chunks placed "
                        "on this host are here; every copy counts as stale until the others "
                        "have said which chunks they hold, then resync copies them",
                        before.store_id, self.store.store_id)
            self.store_id = before.store_id
            self.replica.backfilling = True

    async def _backfill(self) -> None:
        marked = await self.resync.backfill()  # (retries until it knows)
        self.replica.backfilling = False
        self.store_id = self.store.store_id
        while not await self._register_again():
            await trio.sleep(1)
        log.info("event=backfill_done stale_chunks=%d", marked)

    async def _wait_host_id_free(self) -> None:
        """Before serving anything: InUse while another blockd with this host id and
        another disk is alive (its peers would be sent here, and its own disk would count
        as a replaced one at its restart). A process of that id that just died (a disk
        replaced after a crash) leaves its liveness for up to heartbeat_ttl (or the
        registry's minimum, Registry.liveness_ttl): waited for, a second more, before the
        refusal stops this one. Nothing is served meanwhile: a
        peer's write to a new disk before its backfill began would be taken for a copy."""
        cfg = self.cfg
        ttl = await self.registry.liveness_ttl(cfg.heartbeat_ttl)
        if ttl > cfg.heartbeat_ttl:
            log.warning("event=heartbeat_ttl_raised heartbeat_ttl=%g registry_minimum=%g: the "
                        "registry keeps a host's liveness at least %g s after its last "
                        "heartbeat (etcd: 1.5 election timeouts); a dead host is marked down "
                        "that much later", cfg.heartbeat_ttl, ttl, ttl)
        deadline = trio.current_time() + ttl + 1.0
        while True:
            try:
                return await self.registry.check_host_free(cfg.host_id, self.store.store_id)
            except InUse:
                if trio.current_time() >= deadline:
                    raise
                await trio.sleep(0.5)

    async def _register_again(self) -> bool:
        """Register this host's record anew; False (logged) if the registry cannot be
        told now. These run in tasks of the daemon's root nursery: an error escaping them
        would stop blockd."""
        try:
            await self.registry.register_host(self.host_record(), self.cfg.heartbeat_ttl)
            return True
        except VbpError as e:
            log.warning("event=register_failed error=%s", e)
            return False

    async def stale_map(self, lineage: str) -> dict[int, frozenset[str]]:
        out: dict[int, set[str]] = {}
        for r in await self.registry.list_stale(lineage):
            out.setdefault(r.index, set()).add(r.host_id)
        return {i: frozenset(h) for i, h in out.items()}

    async def _revision(self) -> int:
        """Registry.revision, -1 when the registry does not answer."""
        try:
            return await self.registry.revision()
        except RegistryUnavailable:
            return -1

    async def _changes(self, call, after_rev: int, until: float, wake: bool = False):
        """`call(after_rev, timeout)` (Registry.volume_changes, stale_changes) in a worker
        thread, left to itself should this task be cancelled; at `until` (and with
        `wake`, as soon as the provider wants a pass of every record: next_sync), what
        it told by then: nothing, (set(), after_rev). Without a revision to start from
        (after_rev -1) or with the registry not answering, it waits until then too and
        tells nothing known: (None, -1)."""
        provider = self.provider
        with trio.move_on_at(until) as scope:
            if wake:
                if provider.sync_wanted:
                    scope.cancel()
                provider.wake_sync = scope
            try:
                if after_rev >= 0:
                    try:
                        return await trio.to_thread.run_sync(
                            functools.partial(call, after_rev,
                                              max(until - trio.current_time(), 0.0)),
                            abandon_on_cancel=True)
                    except RegistryUnavailable:
                        after_rev = -1  # (the reads after it say so)
                await trio.sleep_forever()
            finally:
                if wake:
                    provider.wake_sync = None
        return (set(), after_rev) if after_rev >= 0 else (None, -1)

    async def _refresh_stale(self) -> None:
        """Open gateways learn which copies became current again (or went stale through
        another gateway's failure): each period, the gateways of the lineages whose stale
        records changed in it (a watch of them says which), every gateway opened since
        the last period, and every STALE_REFRESH_MAX seconds all of them."""
        rev, full_at = -1, -math.inf
        refreshed: set[VolumeGateway] = set()  # the gateways open at the last period
        while True:
            t0 = trio.current_time()
            if rev < 0:  # (read before the refreshes that follow the changes after it)
                rev = await self._revision()
            # Every lineage told until the period ends, not only those of the first
            # changes told: one whose records changed a moment after another's would
            # wait a period more, its gateways reading their own copies by a map that
            # does not name them stale. At most one watch begun a RECORD_SYNC_GAP.
            end = t0 + STALE_REFRESH_PERIOD
            changed: set[str] | None = set()
            while changed is not None and trio.current_time() < end:
                begun = trio.current_time()
                told, rev = await self._changes(self.registry.sync.stale_changes, rev, end)
                changed = None if told is None else changed | told
                await trio.sleep_until(min(begun + RECORD_SYNC_GAP, end))
            await trio.sleep_until(end)  # (a period at least)
            await self.provider.settle_all()
            gateways = list(self.provider.gateways.values())
            if changed is None or trio.current_time() >= full_at:
                full_at = trio.current_time() + STALE_REFRESH_MAX
                # (read before the refreshes, which cover every change before it: the
                # next watch starts from a recent revision, as _watch_volumes' does)
                rev = await self._revision()
                gateways = list(self.provider.gateways.values())
                due = gateways
            else:
                due = [gw for gw in gateways if gw.lineage in changed or gw not in refreshed]
            refreshed = set(gateways)
            for gw in due:
                try:
                    await gw.refresh_stale(self.stale_map)
                except RegistryUnavailable as e:
                    log.warning("event=stale_refresh_failed error=%s", e)
                    rev, full_at = -1, -math.inf  # (all again once it answers)
                    break

    async def _watch_volumes(self) -> None:
        """Snapshots, resizes and deletions reach the open exports of their volume as soon
        as the registry has them (a watch of the volume records says which changed); the
        exports without the lease read their volume's record every RECORD_SYNC_PERIOD
        regardless, all of them every RECORD_SYNC_MAX, or at once when a gateway waits
        for that (next_sync)."""
        provider = self.provider
        rev, full_at, readers_at = -1, -math.inf, -math.inf
        ahead = -1  # the revision read before the last watch that was to end at full_at
        changed: set[str] | None = None
        waited = -math.inf
        while True:
            await trio.sleep_until(waited + RECORD_SYNC_GAP)
            now = trio.current_time()
            if changed is None or now >= full_at or provider.sync_wanted:
                ran_out = now >= full_at  # (the last watch ran to its end)
                full_at, readers_at = now + RECORD_SYNC_MAX, now + RECORD_SYNC_PERIOD
                # read before the records: a change after it is told. Read again for
                # every full pass, not only when unknown: in an idle pool no record
                # changes for hours while heartbeats and renewals move the revision on,
                # and a watch from an old one makes etcd read every revision since (of
                # every key) to find nothing; from one of the last pass, 5 s at most. It
                # is read before the last watch ahead of the pass began (`ahead`), not
                # here: a change after that watch ended and before a read here would be
                # told to no watch (garbage collection passes again only for a told one).
                # (woken for a pass of all, the watch's answer is dropped: it goes on from
                # where it began)
                if changed is None or rev < 0:
                    rev = await self._revision()
                elif ran_out:
                    rev = max(rev, ahead)
                ahead = -1
                failed = await provider.sync_records()
            elif changed or now >= readers_at:
                readers = now >= readers_at
                if readers:
                    readers_at = now + RECORD_SYNC_PERIOD
                failed = await provider.sync_records(changed, readers=readers)
            else:
                failed = set()
            waited = trio.current_time()
            if full_at <= readers_at and rev >= 0:  # (the last watch before a full pass)
                ahead = await self._revision()
            changed, rev = await self._changes(self.registry.sync.volume_changes, rev,
                                               min(full_at, readers_at), wake=True)
            if changed is None or changed:
                self.records_told += 1  # (garbage collection passes again)
            if changed is not None:  # (a change told, its read failed: asked again, not
                changed |= failed  # left to the next pass of all)

    @staticmethod
    async def _every(period: float, what: str, step, *, first_wait: bool = False) -> None:
        """Run `step()` forever, `period` seconds apart. A registry outage skips a pass and
        a failing pass is logged: neither stops the daemon."""
        while True:
            if first_wait:
                await trio.sleep(period)
            await Blockd._every_once(what, step)
            if not first_wait:
                await trio.sleep(period)

    @staticmethod
    async def _every_once(what: str, step) -> None:
        """One pass of `step()` for _every: a registry outage and a failure are logged."""
        try:
            await step()
        except RegistryUnavailable as e:
            log.warning("event=%s_skipped error=%s", what, e)
        except Exception:  # one pass failing must not stop the daemon
            log.exception("event=%s_failed", what)

    async def _compact_registry(self) -> None:
        """The controller drops the registry's history older than COMPACT_PERIOD (etcd
        keeps it all otherwise, and refuses every write once its database is full)."""
        kept: list = [None]

        async def step() -> None:
            kept[0] = await compact_registry_once(self.registry, self.cluster.map,
                                                  self.cfg.host_id, kept[0])
        await self._every(COMPACT_PERIOD, "registry_compaction", step, first_wait=True)

    async def _recover(self) -> None:
        """Resync loop: bring this host's stale chunk copies current."""
        await self._every(1, "resync", self.resync.run_once)

    async def _reconcile_late(self) -> None:
        await self._every(1, "reconcile_late", self.provider.reconcile_late, first_wait=True)

    async def _move_data(self) -> None:
        """Changes of data set (replicator.migration): the controller step and this host's
        scan; misplaced copies are freed by the garbage collector. A step every
        DATA_SET_PERIOD, and one at once (DATA_SET_GAP after the last at the soonest) when
        the cluster map changes meanwhile: a host registered, went down, or the data set
        changed. A new pool's hosts were put in the data set up to a second after they
        all registered (`vbp sandbox up` waits for that), a down host taken out as late."""
        async def step() -> None:
            cmap = await self.mover.control_once()
            if cmap.epoch > self.cluster.epoch:
                self.cluster.set_map(cmap)
            await self.mover.scan_once()
            if await self.mover.measure_misplaced():
                await self.publish_stats()  # the controller's next reweight waits for it
        while True:
            moved = self._map_moved  # (set by a change from now on, even during the step)
            begun = trio.current_time()
            await self._every_once("data_set_step", step)
            with trio.move_on_after(DATA_SET_PERIOD):
                await moved.wait()
            await trio.sleep_until(begun + DATA_SET_GAP)

    def disk_free(self) -> int | None:
        """Bytes the data directory's filesystem has free (for an unprivileged user), or
        None if it cannot be asked. The store's capacity is the operator's word; the disk
        may hold less (set above it, or filled by something else)."""
        try:
            fs = os.statvfs(self.cfg.data_dir)
        except OSError:
            return None
        return fs.f_bavail * fs.f_frsize

    def stats(self) -> dict:
        st = self.store.stats()
        rs = self.resync.stats
        return {
            "capacity": st.capacity, "used": st.used, "free": st.free, "chunks": st.chunks,
            "disk_free": self.disk_free(),
            "checksum_errors": st.checksum_errors, "resynced_chunks": rs.chunks,
            "resync_bytes": rs.bytes_copied, "time": time.time(),
            "recovery_held_full": self.resync.held_full, "full_ratio": self.cfg.full_ratio,
            "nearfull_ratio": self.cfg.nearfull_ratio,
            # copies the settled data set places elsewhere, not freed yet (pending_free)
            "misplaced": self.mover.misplaced, "misplaced_gen": self.mover.misplaced_gen,
            # on the controller: when it first saw each down host down, and its interval
            "down_out": self.mover.down_out(),
            "scrub": self.scrubber.last,
            "exports": self.provider.to_publish(),
            # every export a client has open here: who a delete or an import must not go
            # under (control.api._refuse_in_use), a lease holder's volume among them
            "open": sorted(self.provider.gateways),
        }

    async def publish_stats(self) -> None:
        """Publish stats(), including the open exports that GC must respect. Under
        a lock and computed inside it: an older list never lands after a newer one."""
        async with self._stats_lock:
            st = self.stats()
            t0 = trio.current_time()
            await self.registry.publish_stats(self.cfg.host_id, st, self.cfg.heartbeat_ttl)
            self._published(t0, st)

    def _published(self, t0: float, st: dict) -> None:
        """Stats sent at `t0` went through: they last heartbeat_ttl from when the registry
        took them, so from t0 at the earliest (VolumeProvider._snapshot_gone, _confirm).
        Under _stats_lock, as stats() was: the exports in them are the provider's last
        list (pub_seq)."""
        self._published_used = st["used"]
        self.published_at = max(self.published_at, t0)
        self.provider.went_through(self.provider.pub_seq)

    def stop_budget(self) -> float:
        """Seconds a graceful stop (drain) gives the NBD clients' requests and the close
        flushes: a write to a peer that hangs ends after peer_timeout (its copy recorded
        stale), and the flush after it takes as long again; within systemd's
        TimeoutStopSec (60 s) all the same. A fixed 10 s cut a peer_timeout above about
        4 s short: the writes taken were dropped unanswered and the close flush failed."""
        return min(STOP_MAX, max(STOP_MIN, 2 * self.cfg.peer_timeout + WRITE_GRACE + 2.0))

    async def drain(self, timeout: float = STOP_MIN) -> None:
        """Graceful stop, step one: the NBD connections read no more requests, answer the
        ones they took and close (what a client sent and was not answered is not
        acknowledged; a client that does not read its answers is cut off when the time
        left is short); then the NBD frontend stops, the replicated writes still under
        way finish while the peer links are up, and everything is made durable. A write
        cut off by the stop of the peer links would have the other copies recorded stale,
        and this host, about to be down, the only current one: its chunks unreadable
        until it is back. (Synchronous local writes are never in flight.)"""
        deadline = trio.current_time() + timeout
        with trio.move_on_at(deadline - min(2.0, timeout / 4)):
            self._nbd_stopping.set()
            while self.provider.gateways:  # (each export's last connection closes it)
                await trio.sleep(0.01)
        with trio.move_on_at(deadline):
            self._nbd_scope.cancel()
            await self._nbd_stopped.wait()
            while self.provider.closing or any(
                    gw.inflight for gw in self.provider.gateways.values()):
                await trio.sleep(0.01)
        await flush_store(self.store)

    async def refresh_map(self) -> None:
        cmap = await self.registry.cluster_map()
        if cmap.epoch > self.cluster.epoch:
            self.cluster.set_map(cmap)

    async def _heartbeat(self) -> None:
        period = self.cfg.heartbeat_ttl / 3
        while True:
            await trio.sleep(period)
            try:
                async with self._stats_lock:  # stats ride on the heartbeat (one request)
                    st = self.stats()
                    t0 = trio.current_time()
                    await self.registry.heartbeat(self.cfg.host_id, self.cfg.heartbeat_ttl, st)
                    self._published(t0, st)
            except NotFound:  # our record is gone (`vbp host remove`, a restored etcd)
                await self._register_again()
            except RegistryUnavailable as e:
                log.warning("event=heartbeat_failed error=%s", e)
            except InvalidArgument as e:  # the stats only: the liveness went through
                log.error("event=stats_too_large error=%s", e)
            await self._warn_old_hosts()
            st = self.store.stats()
            self.metrics.set_space(st.capacity, st.used, self.disk_free())

    async def _warn_old_hosts(self) -> None:
        """Log, when the list changes, the hosts of an embedded registry that run the code
        before its boot clock (Registry.hosts_on_the_wall_clock): they read this host's
        liveness as run out and publish it down, until every blockd of the machine runs
        this code (operator guide, section 9)."""
        try:
            old = await self.registry.hosts_on_the_wall_clock()
        except RegistryUnavailable:
            return
        if old != self._old_hosts:
            if old:
                log.warning("event=hosts_on_the_wall_clock hosts=%s: they run vbp from before the "
                            "registry's boot clock, read the liveness of this host as run out and "
                            "publish it down; upgrade every blockd of this machine together "
                            "(operator guide, section 9)", ",".join(old))
            else:
                log.info("event=hosts_on_the_wall_clock hosts=: none left")
            self._old_hosts = old

    async def _watch_space(self) -> None:
        """Publish the stats early when usage moved by SPACE_STEP of capacity; log when it
        crosses the nearfull threshold (the controller then lowers the host's weight), and
        when the disk comes to have less room than the capacity leaves (disk_short)."""
        above = short = False
        while True:
            await trio.sleep(SPACE_POLL)
            st = self.store.stats()
            if st.capacity and (st.used > self.cfg.nearfull_ratio * st.capacity) != above:
                above = not above
                log.log(logging.WARNING if above else logging.INFO,
                        "event=%s used=%d capacity=%d nearfull_ratio=%s",
                        "nearfull" if above else "below_nearfull", st.used, st.capacity,
                        self.cfg.nearfull_ratio)
            disk = self.disk_free()
            if disk is not None and (disk < st.free) != short:
                short = not short
                if short:
                    log.warning("event=disk_short disk_free=%d free=%d capacity=%d: the disk "
                                "has less room than the capacity leaves; writes may fail with "
                                "ENOSPC before the pool counts this host full (lower capacity, "
                                "or free the disk)", disk, st.free, st.capacity)
                else:
                    log.info("event=disk_room disk_free=%d free=%d", disk, st.free)
            if not st.capacity or abs(st.used - self._published_used) < SPACE_STEP * st.capacity:
                continue
            try:
                await self.publish_stats()
            except VbpError as e:  # the next heartbeat publishes again
                log.warning("event=stats_publish_failed error=%s", e)

    async def _watchdog(self) -> None:
        """systemd's watchdog: the event loop is alive (independent of the registry)."""
        while True:
            sd_notify("WATCHDOG=1")
            await trio.sleep(5)

    async def _watch_map(self) -> None:
        while True:
            asked = self.cluster.epoch
            try:
                cmap = await trio.to_thread.run_sync(
                    functools.partial(self.registry.sync.wait_map_change, asked, MAP_WAIT),
                    abandon_on_cancel=True,
                )
            except RegistryUnavailable as e:
                log.warning("event=map_refresh_failed error=%s", e)
                await trio.sleep(1)
                continue
            if cmap.epoch != self.cluster.epoch:
                log.info("event=map_changed epoch=%d hosts=%s", cmap.epoch,
                         ",".join(f"{h.id}:{h.state}" for h in cmap.hosts))
                self.cluster.set_map(cmap)
                self._map_adopted()
            elif cmap.epoch == asked:  # (no change within MAP_WAIT)
                await trio.sleep(0.5)
            # (else a newer map, which another task adopted meanwhile: the data-set step
            # read it, or whoever refreshed it; waited for again at once. It slept 0.5 s
            # then, and missed what came meanwhile: a new pool's last host to register.)

    def _map_adopted(self) -> None:
        """_watch_map adopted a new map: the data-set step looks at once (_move_data)."""
        moved, self._map_moved = self._map_moved, trio.Event()
        moved.set()

    async def _renew_leases(self) -> None:
        while True:
            await trio.sleep(self.cfg.lease_ttl / 3)
            await self.provider.renew_all()

    async def _collect_garbage(self) -> None:
        """Free local chunk generations no reader needs (vbp.volume.needed_gens): deleted
        volumes and snapshots, overwritten snapshot data, chunks cut off by a shrink.
        Local keys are listed BEFORE the registry is read: a generation that exists here
        then belongs to a record that exists when the registry is read, or to one that was
        deleted (generation numbers are never reused), so a newer one is never freed.
        Which of them are still here is looked at again after the registry, for each chunk
        with no await until its deletes: that step is atomic against a resync dropping
        generations, so the two need no lock per chunk."""
        async def step() -> None:
            seen, now = (self.store.layout, self.records_told), trio.current_time()
            if seen != self._gc_seen or now >= self._gc_full_at:
                await self.collect_garbage_once()
                self._gc_seen, self._gc_full_at = seen, now + GC_FULL_PERIOD  # (done)
            await self.mover.collect_misplaced()
        await self._every(self.cfg.gc_interval, "gc", step, first_wait=True)

    async def _prune_metrics(self) -> None:
        async def step() -> None:
            await self.prune_metrics()
            await self.prune_tokens()
        await self._every(self.cfg.gc_interval, "metrics_prune", step, first_wait=True)

    async def prune_tokens(self) -> int:
        """Make the replica forget the fencing tokens of volumes whose lease record the
        registry forgot (compact_registry_once: deleted volumes, their leases run out long
        ago), as it kept one per volume name it ever served; returns how many went. Safe
        for the reason the registry's forgetting is: a later volume of the name gets a
        greater token at its first grant, which is all a replica checks. A token the
        replica learns while the registry is read (a first grant of a name made again)
        is kept (Replica.forget_tokens)."""
        known = self.replica.tokens()
        if not known:
            return 0
        granted = await self.registry.lease_tokens()
        return self.replica.forget_tokens({v: t for v, t in known.items() if v not in granted})

    async def prune_metrics(self) -> list[str]:
        """Drop the request series of volumes deleted since they were served here (so
        label cardinality follows the pool's volumes); returns their names. A volume
        still open here keeps its series, and so does one that was only closed: a scrape
        after a short connection still counts its requests. A volume that counted
        requests while the registry was read (deleted and made again under the same name
        meanwhile, and served) keeps them too."""
        counts = self.metrics.request_counts()
        if not counts:
            return []
        live = {d["name"] for d in await self.registry.list_volumes()}
        live.update(split_export_name(e)[0] for e in self.provider.gateways)
        now = self.metrics.request_counts()
        gone = sorted(name for name, n in counts.items()
                      if name not in live and now.get(name) == n)
        for name in gone:
            self.metrics.forget_volume(name)
            log.info("volume=%s event=metrics_dropped reason=deleted", name)
        return gone

    async def collect_garbage_once(self) -> int:
        expired = self.store.expire_collected()
        # A pass whose inputs are those of the last complete one (_gc_memo: the chunks held,
        # by ChunkStore.layout, which moves when one comes or goes or is marked collected;
        # the deleted generations; every lineage's readers) frees and marks nothing: it is
        # skipped, and the listing of the chunks is kept while they stay the same. Else a
        # pass went over every chunk held every gc_interval, to free nothing.
        layout = self.store.layout
        memo = self._gc_memo
        if memo is not None and memo[0] == layout:
            local = memo[1]
        else:
            local: dict[tuple[str, int], list[int]] = {}
            for n, k in enumerate(self.store.keys()):
                if n and n % (16 * GC_YIELD_EVERY) == 0:
                    await trio.lowlevel.checkpoint()
                local.setdefault((k.lineage, k.index), []).append(k.gen)
        if not local:
            return 0
        # what volumes deleted lately read (registry.deleted_gens): marked below too,
        # whether or not this host held a chunk of them. Read BEFORE the records: a
        # generation a delete named is then in every record of the pass that reads it
        # (a clone made since, of a snapshot of a head made since, reads generations no
        # record read here names; read after, a delete made since would have them marked)
        deleted = await self.registry.deleted_gens()
        recs = [VolumeRecord.from_dict(d) for d in await self.registry.list_volumes()]
        # After the records: a live lease of a volume they do not have is held by a
        # gateway that may still serve the deleted volume's chain (its reads need no
        # registry, and a holder is not published) until its next record sync fences it.
        # Which chain, no record says any more: nothing is freed until it ran out.
        held = await self.registry.leases_of_deleted()
        if held:
            log.info("event=gc_held reason=deleted_volume_leased volumes=%s",
                     ",".join(sorted(lease.volume for lease in held)))
            return 0
        by_lineage = readers(recs)
        # after the records: open snapshot exports and head readers keep their chunks
        # (VolumeProvider)
        exports = [e for st in (await self.registry.host_stats()).values()
                   for e in st.get("exports", ())]
        for e in exports + self.provider.published():
            by_lineage.setdefault(e["lineage"], []).append(
                Reader(tuple(e["chain"]), tuple(tuple(c) for c in e["cuts"]), e["size"],
                       e["chunk_size"]))
        inputs = (layout, frozenset((lin, frozenset(g)) for lin, g in deleted.items()),
                  frozenset((lin, frozenset(rs)) for lin, rs in by_lineage.items()))
        if not expired and memo is not None and memo[2] == inputs:
            return 0
        # The newest token of every volume, before anything goes: a chunk freed here may
        # be one a gateway deposed without being told still reads, its lease run out cut
        # off from the registry. `vbp volume resize --force` (or snapshot) completing
        # without a holder takes a newer token that reaches no copy; with it learnt here,
        # the deposed gateway's reads are refused (it is fenced), where they read a cut
        # chunk freed as zeros, or an older generation's bytes (found by a review).
        self.replica.learn_tokens(await self.registry.lease_tokens())
        # generations no reader's chain holds any more (their volume or snapshot deleted;
        # a clone keeps its snapshot's): a chain that holds one is a gateway's that reads
        # on without having heard of the delete (cut off from the registry past its
        # lease), and a chunk it resolves to nothing or to an older generation here is
        # gone: it gets an error, not zeros or older bytes (ChunkStore.mark_collected).
        # Marked before any chunk goes: a delete that fails ends the pass, and one of
        # them whose chunks it had freed would have none here left to be marked by.
        known: dict[str, set[int]] = {lineage: set(gens) for lineage, gens in deleted.items()}
        for n, ((lineage, _), gens) in enumerate(local.items()):
            if n and n % (16 * GC_YIELD_EVERY) == 0:
                await trio.lowlevel.checkpoint()
            known.setdefault(lineage, set()).update(gens)
        dead: dict[str, set[int]] = {}
        for lineage, gens in known.items():
            gone = gens - {g for r in by_lineage.get(lineage, ()) for g in r.chain}
            if gone:
                dead[lineage] = gone
        if dead:
            self.store.mark_collected(dead)
            log.info("event=gc_generations_collected %s", " ".join(
                f"{lineage}={','.join(map(str, sorted(g)))}" for lineage, g in sorted(dead.items())))
        # Presence again, for each chunk with no await until its deletes: a resync may
        # have dropped a listed generation meanwhile (_drop_divergent), and the one left
        # is then the one readers resolve to. Only generations listed before the records
        # were read and still here count (one made since may belong to a newer record).
        # Other tasks run every GC_YIELD_EVERY chunks: a delete costs an index transaction
        # and a punched hole, and a deleted volume may be tens of thousands of chunks here
        # (the watchdog, the heartbeat and the NBD clients would wait for them all).
        freed = 0
        for n, ((lineage, index), listed) in enumerate(local.items()):
            if n and n % GC_YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()
            here = self.store.gens(lineage, index)
            gens = [g for g in listed if g in here]
            keep = needed_gens(by_lineage.get(lineage, ()), index, gens)
            for g in gens:
                if g not in keep:
                    try:
                        self.store.delete(ChunkKey(lineage, index, g))
                    except NotFound:
                        continue
                    freed += 1
                    log.info("event=gc_chunk lineage=%s index=%d gen=%d", lineage, index, g)
        self._gc_memo = (layout, local, inputs)  # (complete: a failed delete raised)
        return freed


def sd_notify(state: str) -> None:
    """Tell systemd about our state (Type=notify). A no-op outside systemd. Written here
    because it is a datagram to one socket; the PyPI helpers for it are unmaintained."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    import socket

    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), addr)
    except OSError:
        pass


async def run_until_signal(cfg: Config) -> None:
    """Run blockd until SIGTERM or SIGINT: then drain and stop. One that comes while it
    starts (a start may wait: a host id still alive, a backfill waiting for a down host)
    stops the start at once, draining what the NBD frontend took if it listens already;
    it was acted on only once the start ended, and a start that then failed died of the
    signal, re-raised, without its error line. Signals are read until blockd has stopped:
    a second one, or a SIGHUP, during the stop is logged, not re-raised at the end (it
    would kill the process that stopped cleanly)."""
    svc = Blockd(cfg)
    # SIGHUP too: the signal operators send for a reload (and a closing terminal's), which
    # would otherwise kill blockd at once, undrained (and systemd does not restart a
    # service that died of it)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as watching:
            stopping = False

            async def watch(service: trio.Nursery) -> None:
                nonlocal stopping
                async for sig in signals:
                    name = signal.Signals(sig).name
                    if sig == signal.SIGHUP:
                        log.info("event=signal signal=SIGHUP: ignored, blockd reads its settings "
                                 "only when it starts (restart it to apply a change)")
                    elif stopping:
                        log.info("event=signal signal=%s: already stopping", name)
                    else:
                        stopping = True
                        log.info("event=signal signal=%s%s", name, "" if started else
                                 ": stopping the start" + ("" if svc.serving else ", nothing served yet"))
                        watching.start_soon(stop, service)

            async def stop(service: trio.Nursery) -> None:
                if svc.serving:
                    await svc.drain(svc.stop_budget())
                service.cancel_scope.cancel()

            started = False
            async with trio.open_nursery() as service:
                watching.start_soon(watch, service)
                await service.start(svc.run)
                freeze_startup_objects()
                started = True
            watching.cancel_scope.cancel()  # (stopped: the signals read no more)
