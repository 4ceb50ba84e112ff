"""The gateway: one volume as an NBD export, writing every chunk to its N replicas.

Theory of operation (DESIGN.md, Data path):
- A request is cut into per-chunk pieces (vbp.layout). Each chunk's replica hosts come from
  placement over (lineage, index) and the current cluster map; the answer is cached per
  epoch, so the hot path does a dict lookup, not a hash walk.
- Data path placement treats down hosts as still owning their chunks: the replica set of a
  chunk does not move when a host fails; the failed replica is skipped and recorded stale
  until recovery brings it current.
- WRITE: every replica gets the piece in parallel: the remote ones by one PeerPool.call_all
  (one encoding, one parked task for all replies, no task per replica), the local one by
  direct call while those frames wait for the connection's next batch. The common case
  (a write inside one chunk whose copies are all current, reachable over ready
  connections, no data-set change) needs no task at all (`_replicate_now`): the local copy
  is written, the frames are queued with PeerPool.queue_all, and the NBD answer is a
  vbp.later.Later that the callback seeing the last reply completes; any failure or
  surprise there continues in a task exactly as the full path (`_settle`). While the NBD
  server dispatches a run of writes (begin_writes .. end_writes), the small ones of that
  case are put off and leave as one WriteBatch per replica set, their local copies
  written once the frames are out; each write's callback then sees the replies it would
  have had alone (`_send_batch`). The write
  is acknowledged when every reachable replica has it; replicas that failed are recorded
  stale for that chunk in the registry, and the write succeeds while at least min_size
  replicas took it. Below min_size it fails (EIO) and is not acknowledged. Which copies
  count is our map of stale records (refreshed once a second); when that map leaves a
  write short, the registry is asked before failing it (`_behind_by_registry`), with the
  marks this gateway is still recording counted as records. A Fenced answer means another
  gateway holds the lease: this one stops writing for good.
- FLUSH: made durable on every host that took writes since the previous flush.
- READ: the local replica when it holds the chunk, else a remote replica. A checksum error
  on the local copy is answered from another replica and the good bytes are written back.
- The write lease is taken on the first write, not at open (like RBD's exclusive lock):
  readers and `nbdinfo` never wait for a lease. Until it is held, writes take the slow path.
- A replica at a newer epoch refuses the write (StaleEpoch): the gateway refreshes its map
  and retries once, so a healthy replica is never marked stale for our old map.
- Self-fencing: `lease_deadline` (trio time) is when the lease the service last took or
  renewed runs out, counted from before the registry call, so never later than the
  lease's liveness key in the registry runs out (vbp.registry.base). Past it no write is
  sent (LeaseExpired): another host may take the lease from then on, and it must find no
  write of ours still arriving. Nor are this host's own copies read past it
  (_own_current): the new holder's writes may have missed them. A renewal that succeeds
  (nobody took the lease meanwhile) moves the deadline and writes and local reads resume.
- A replica failure that cannot be recorded (registry unreachable) fails the write, and
  the outcome waits in `unrecorded` as (chunk, hosts that took it, hosts that missed it).
  The service settles it once the registry answers: if our lease is still the newest, the
  hosts that missed it are stale (as if recorded at once); if another gateway took over,
  the hosts that took it hold an unacknowledged write its successor never saw, and they
  are the stale ones.
- With replicas=1 and a local replica the whole path is synchronous: no task, no await.
  A request inside one chunk (every 4K and 1M request of an aligned client) takes a fast
  path with no per-piece objects: whether a chunk is local-only is cached per cluster map,
  and a local read returns the bytes themselves (the NBD codec encodes them exactly like a
  one-extent list).
- Every peer message sent for a client request carries the request's id (vbp.reqid, set
  by the NBD frontend for the request's task), and so does every line logged about it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import time
import weakref
from contextlib import contextmanager
from dataclasses import replace as dc_replace
from functools import partial
from operator import itemgetter

import trio

from replicator import messages as m
from replicator.replica import gone_below
from replicator.view import ClusterView
from vbp.buffers import keepable
from vbp.chunkstore import flush_store
from vbp.cluster import ClusterMap
from vbp.errors import (
    BelowMinSize,
    ChecksumError,
    Fenced,
    LeaseExpired,
    LocalFault,
    NoSpace,
    PastEnd,
    PeerUnavailable,
    ReadOnly,
    RegistryUnavailable,
    StaleEpoch,
    Unpublished,
    Unsynced,
    VbpError,
    WritePastEnd,
)
from vbp.later import Later
from vbp.chunkstore_common import page_checksum
from vbp.layout import PAGE_SIZE, ChunkKey, Geometry, MiB, Piece, format_size
from vbp.loglimit import LogLimit, failure_kind
from vbp.registry.base import Lease
from vbp.reqid import current as current_rid
from vbp.reqid import get as get_rid
from vbp.volume import View, VolumeRecord, same_volume, visible_chain

log = logging.getLogger("vbp.gateway")
_replica_log = logging.getLogger("vbp.replica")  # (at DEBUG, each local write logs a line)
_WARNING, _INFO = logging.WARNING, logging.INFO
_new_key = tuple.__new__
_UNPLANNED = object()  # read_ref, _replicate_now: no plan or route made for the chunk yet
_FULL_PATH = object()  # _plan: no plan, every read of the chunk goes by _read_one
# What a gateway keeps per chunk of its volume (a read plan, _plans; a write's route and
# its local-only verdict, _by_map), at most this many chunks each, all dropped when full.
# One per chunk of the volume up to 1 TiB of 1 MiB chunks (4 TiB of 4 MiB), about 72
# bytes a chunk at most (a dict entry and its int key; the values are shared): reads and
# writes all over a volume remake none, where a bound below its chunks would have them
# remade nearly every time (a plan is 3-5 us, placement lookups included; measured at the
# old bound of 65,536, 4 KiB reads over a 2 TiB volume of holes took 8.2-8.6 us of blockd
# CPU against 4.0-4.5 over 1 GiB). The cluster view's caches keep 65,536 chunks of all
# volumes together (ClusterView), which these make a first touch's cost only.
PLANS_MAX = 1 << 20
# What the gateways of one blockd keep in these memos together: each time one of a
# gateway's memos has grown by MEMO_STEP chunks, the entries of all of them are counted
# (_bound_memos), and past HOST_MEMOS the largest memos of any gateway are emptied until
# the total is back under. About 300 MB at 72 bytes an entry: a host serving several
# volumes of more chunks than that, each read all over, keeps what it can (without this,
# 220 MB for each one of them).
HOST_MEMOS = 1 << 22
MEMO_STEP = 1 << 16
_gateways: weakref.WeakSet = weakref.WeakSet()  # every VolumeGateway of the process

NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
_HOLE_FLAGS = NBD_STATE_HOLE | NBD_STATE_ZERO

# seconds between registry reads of the map by a gateway whose map offers a chunk fewer
# copies than the volume's replica count (_replicate_piece)
SHORT_MAP_REFRESH = 1.0
# A write's failures are recorded stale within its peers' request timeout and this many
# seconds of its leaving, or it is not acknowledged (VolumeGateway.write_window); resync
# leaves pages written that recently, and scrub waits as long before it judges.
WRITE_GRACE = 1.0
_NBD_FUA = 1  # NBD_CMD_FLAG_FUA (nbd_frontend.proto), in the flags of write_run's writes
# writes smaller than this go to the replicas in WriteBatch frames (begin_writes), at most
# BATCH_ITEMS to a frame; larger ones go as a WriteChunk each, their payload sent as its own
# buffer with no copy (replicator.codec.SPLIT_THRESHOLD)
BATCH_PIECE = 32 * 1024
# A run of NBD writes longer than this goes in parts, the peers starting on a full one
# while the rest is taken (_write_run_copies). At 16, the runs of 4K random writes QD32
# (about 17 writes on average at replicas=3) went as a frame of 16 and one of a write or
# two: a frame, a reply and their bookkeeping more at each peer. At 64 a run of QD32 is
# one frame. A small gain, within the machine's noise: replicas=3, 3 hosts, fio nbd 4K
# randwrite QD32, two sandboxes alternated, ahead in 6 of 8 pairs (1.06x the IOPS, the
# median pair); `python -m bench --workloads randwrite-4k-qd32 --targets vbp-r3
# --against 8d5ea9e` (BATCH_ITEMS 16): ahead in 4 of 5 rounds but 0.98x of the medians
# (the server's CPU 0.94x), then ahead in 5 of 6 and 1.11x (0.86x).
BATCH_ITEMS = 64
assert BATCH_ITEMS <= m.BATCH_ITEMS_MAX  # (what a replica takes in one WriteBatch)
# Shorter runs go one WriteChunk each, joining the peer links' own batches: a run of one,
# put off, would be sent on its own at once (a mixed load sends many: 4K random 70/30
# read/write at QD32 averages runs of one or two writes). At replicas=3 that load ran at
# 15.8k-20.8k IOPS with 4 here and 15.8k-20.9k with 2, against 18.8k-21.1k before
# WriteBatch; 4K random writes QD32 11.1k-13.0k against 8.7k-10.6k (fio nbd, 3 hosts on 2
# cores, rounds alternated)
BATCH_MIN = 4
# BLOCK_STATUS: runs gathered for one request at most (block_status). At about 1 µs of
# the event loop per run (found, merged, encoded), 16384 runs keep a request under about
# 20 ms; a client mapping a range that fragmented asks again for the rest. (qemu-nbd stops
# at 131072 descriptors, nbdkit at 1048576, proto.md's limit.)
STATUS_RUNS = 16384
# BLOCK_STATUS over this many chunks or more asks the hosts at once which they hold
# (_block_status_scan) instead of placing each chunk (a few µs each) and asking another
# host for each one it holds. A 4 GiB request of an empty volume (1024 chunks of 4 MiB,
# 3 hosts on 2 cores): replicas=3, 14 ms chunk by chunk, 0.3 ms scanned here alone;
# replicas=1, 230 ms with a request per chunk held elsewhere, 13 ms with one per host
# (_block_status_remote), 1.8 ms scanned. qemu-nbd on a sparse file: 0.08 ms.
SCAN_CHUNKS = 16
# Record syncs a request past the adopted end waits for before it is refused: the volume
# may have grown again since a shrink (_unless_grown)
RECHECK_SYNCS = 2
# Requests past a shrunk end share their reads of the volume's record (_record_since):
# each takes the first read that starts after it came, and reads start at most one per
# this many seconds. A client sending many such requests, or many clients, cost the
# registry about 1 / PAST_END_READ_GAP reads a second for the volume, not one a request.
PAST_END_READ_GAP = 0.05
# WRITE_ZEROES with NO_HOLE writes zeros as data, in requests of at most this many bytes
# (views of one buffer of zeros: a calloc'd object, whose pages nothing ever writes)
ZEROS_STEP = 4 * MiB
_ZEROS = memoryview(bytes(ZEROS_STEP))
_OK = m.Ok(0)  # what a Written stands for, item by item
_OK_STALE = m.Ok(0, True)


class _Run:
    """The request ids of a run of writes under way (VolumeGateway.write_run,
    replicated): `ids`' next ids are its writes'."""

    __slots__ = ("ids", "first")

    def __init__(self, ids):
        self.ids = ids  # vbp.reqid.RequestIds, or None: the writes have no ids
        self.first = ids.seq + 1 if ids is not None else 0  # the first write's id

    def rids(self, places) -> str:
        """The request ids of the run's writes `places`, for a WriteBatch's `rid`."""
        if self.ids is None:
            return ""
        text, first = self.ids.text, self.first
        return " ".join([text(first + k) for k in places])


class _Flush:
    """A flush under way (VolumeGateway.flush): the next one waits for it, and fails if it
    failed, as it covers the same writes."""

    __slots__ = ("done", "error", "prev", "left")

    def __init__(self):
        self.done = trio.Event()
        self.error: BaseException | None = None
        # when cancelled (its client went away): the flush it still had to wait for, and
        # what it had not settled, (hosts, sent_at), for the flush that comes after it
        self.prev: _Flush | None = None
        self.left: tuple[dict, dict] | None = None


# what a closing gateway hands to the next one of its export (VolumeGateway.after_close)
PendingFlush = _Flush


@dataclasses.dataclass(frozen=True)
class ExportFacts:
    """An export's attributes the NBD handshake tells (nbd_frontend.server.export_info)."""

    name: str
    size: int
    read_only: bool
    description: str
    multi_conn: bool
    min_block: int
    preferred_block: int
    max_block: int



def drop_identical(entries: list, entry) -> bool:
    """Remove `entry` itself, not an equal one, from `entries`; False if it is gone.
    (list.remove takes the first equal: two reads' empty marks, or two tasks recording a
    gateway's failures at once (blockd VolumeProvider._record_missed, settle), each
    taking the first entry and awaiting its mark, would drop another's.)"""
    for i, e in enumerate(entries):
        if e is entry:
            del entries[i]
            return True
    return False


class _RecordRead:
    """One read of a volume's record that requests past its end share (_record_since):
    the `seq`th a gateway started, at `started` (trio time)."""

    __slots__ = ("seq", "started", "done", "record")

    def __init__(self, seq: int, started: float) -> None:
        self.seq = seq
        self.started = started
        self.done = trio.Event()
        self.record: dict | None = None


class VolumeGateway:
    """Serves one view (a volume head or a snapshot) of a volume; shared by all NBD
    connections to it on this host. Implements nbd_frontend.export.Export."""

    min_block = 1
    preferred_block = 4096
    max_block = 32 * MiB
    multi_conn = True

    @staticmethod
    def describe(view: View) -> str:
        """The export's NBD description: NBD_INFO_DESCRIPTION's, and NBD_OPT_LIST's, which
        proto.md calls the same."""
        vol = view.volume
        what = (f"vbp snapshot of volume {vol.name}, read-only" if view.read_only
                else f"vbp volume {vol.name}")
        return f"{what}, {format_size(view.size)}, {vol.replicas} replicas"

    @classmethod
    def info_of(cls, view: View) -> ExportFacts:
        """What a gateway of `view` tells NBD_OPT_INFO and NBD_OPT_GO, without one."""
        return ExportFacts(view.export, view.size, view.read_only, cls.describe(view),
                           cls.multi_conn, cls.min_block, cls.preferred_block, cls.max_block)

    def __init__(self, view: View, *, host_id: str, replica, cluster: ClusterView, pool,
                 registry=None, token: int = 0):
        vol = view.volume
        self.name = view.export
        self.description = self.describe(view)
        self.read_only = view.read_only
        self.lineage = vol.lineage
        self.set_view(view)
        self.n = vol.replicas
        self.min_size = vol.min_size
        self.host_id = host_id
        self.replica = replica
        self.store = replica.store
        self.cluster = cluster
        self.pool = pool
        self.registry = registry
        self.token = token
        self.lease_deadline = math.inf  # trio time; set by the service with each grant/renewal
        # up hosts the last takeover's reconcile could not ask (reconcile_after_takeover)
        self.takeover_unheard: frozenset[str] = frozenset()
        self._takeover_at = -math.inf  # when the last takeover's reconcile began
        self.fenced = False
        # chunk index -> hosts whose copy is stale (registry StaleRecords, refreshed by the
        # service); reads avoid them while a current copy is reachable
        self.stale: dict[int, frozenset[str]] = {}
        # chunk index -> {host: count} of stale marks under way (_mark_stale awaiting the
        # registry): the registry may not show them yet, so reads of it count them too
        self._marking: dict[int, dict[str, int]] = {}
        # the marks begun while each read of the stale records now out is (_marks_during)
        self._reads: list[dict[int, set]] = []
        # host -> chunk indexes written there since the last flush
        self._unflushed: dict[str, set[int]] = {}
        # remote host -> PeerPool.incarnation of it when the earliest of those writes was
        # sent: a flush answered by a later one may come from a process that restarted
        # and lost them (see _flush_replicated)
        self._sent_at: dict[str, int] = {}
        self._flushing: _Flush | None = None  # the last flush, while it runs
        # the close flush of the gateway of this export before this one on this host, for
        # this one's first flush to wait for and fail with if it failed (after_close)
        self._prior: _Flush | None = None
        # the failure of a flush no client asked for (flush_unasked), for the next FLUSH
        self._untold: BaseException | None = None
        self.on_fenced = None  # callback set by the service: drop this gateway's clients
        self.on_close = None  # callback set by the service: one connection ended
        self.take_lease = None  # async () -> token, set by the service for writable views
        self.metrics = None  # blockd.metrics.Metrics, set by the service
        # the lines a failing disk, a dead peer or an unreachable registry would write per
        # request or chunk written, by event: at most a few a period (vbp.loglimit)
        self._loglimit = LogLimit()
        self._op_stats: dict = {}  # NBD command -> its counters in metrics (observe)
        self.qos = None  # blockd.qos.VolumeQos when the volume has limits
        self._limits: trio.Event | None = None  # set when they change (limits_changed)
        self.refresh_map = None  # async () -> None, set by the service
        # async () -> None, set by the service: returns once the volume's record has
        # been read again (_unless_grown)
        self.next_sync = None
        # async () -> None, set by the service: publishes this host's exports and has
        # them read their records again, at once (_renewed)
        self.renew_serving = None
        # the last read of the record started for requests past the end (_record_since)
        self._record_read: _RecordRead | None = None
        self._short_refresh_at = -math.inf  # when a short map may be refreshed again
        self._lease_lock = trio.Lock()
        self._wanting = 0  # writes waiting for the lease (_leased): a client is writing
        # set by the service while it settles a lease found orphaned (settle_takeover):
        # reads wait for it, which may record this host's copies stale
        self.settling: trio.Event | None = None
        self.dropped = trio.Event()  # set when fenced: the NBD server ends our connections
        # (index, hosts) that took writes after we were fenced; the service records them
        # stale in the registry as soon as it can reach it
        self.suspects: list[tuple[int, tuple[str, ...]]] = []
        # (index, took, missed) of replica failures the registry could not be told about
        self.unrecorded: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = []
        # chunk index -> written here only (_local_only), and -> the route of its writes
        # (ClusterView.route); both for the cluster map _local_map (_by_map)
        self._local: dict[int, bool] = {}
        self._routes: dict[int, tuple | None] = {}
        self._local_map = None
        self._hold: trio.Event | None = None  # set while the head generation switches
        self._switching = trio.Lock()  # (switch_head)
        self._inflight = 0  # replicated writes under way
        # Replicated writes not yet settled, by chunk index: the pieces, in the order their
        # writes came (_fly, at dispatch). A write that overlaps one of them is sent only
        # once that one is settled (_overlapped, _after_overlapped), so overlapping writes
        # reach every copy in one order: a write sent again to some copies (StaleEpoch), or
        # sent to each copy at its own time (the general path waiting for room on one
        # link), would otherwise land after a later write on those copies only, and the
        # copies would disagree on acknowledged bytes. DRBD waits for conflicting local
        # requests the same way.
        self._flying: dict[int, list] = {}
        self._landed: dict[int, trio.Event] = {}  # id(piece) -> set when it is settled
        # while the NBD server dispatches a batch of writes (begin_writes .. end_writes):
        # (remote addresses, chain, fua, epoch, token) -> the writes _replicate_now put
        # off, sent as one WriteBatch per group at the end; else None
        self._batch: dict | None = None
        self._drained: trio.Event | None = None
        # set when the snapshot this read-only export serves was deleted (--force): every
        # later request fails with it, since its chunks may be freed and reused
        self.gone: Exception | None = None
        # trio time past which the export serves nothing (blockd sets it; inf: never): a
        # snapshot export's publication may have lapsed in the registry (Unpublished); a
        # head export's chain may be out of date, its record unread or its publication
        # lapsed (Unsynced), which matters only while it holds no lease (_check_served)
        self.serve_until = math.inf
        # trio.current_time, less two calls: this run's clock, asked per write (a gateway
        # lives in the run it was made in: the service's)
        try:
            self._now = trio.lowlevel.current_clock().current_time
        except RuntimeError:  # made outside a run: whichever run it is used in
            self._now = trio.current_time
        _gateways.add(self)  # (its memos counted with every other's: _bound_memos)

    async def refresh_stale(self, read) -> None:
        """Our stale map from the registry's records, `await read(lineage)` now: the map
        as it is before the read, and adopt_stale."""
        before = dict(self.stale)
        with self._marks_during() as marked:
            fresh = await read(self.lineage)
        self.adopt_stale(before, fresh, marked)

    def adopt_stale(self, before: dict, fresh: dict, marked: dict | None = None) -> None:
        """Take `fresh`, the registry's stale records read while our map was `before` (a
        copy taken before the read), as our map: what this gateway added to it meanwhile
        (a failure, its mark perhaps landing after the read), the marks begun meanwhile
        (`marked`: _marks_during) and those still under way stay; the rest is the
        registry's word."""
        out = dict(fresh)
        for index in set(self.stale) | set(self._marking):
            merged = self._merged_stale(index, before.get(index, ()), fresh.get(index, ()),
                                        marked)
            if merged:
                out[index] = merged
        self.stale = out

    def _merged_stale(self, index: int, before, fresh, marked: dict | None = None) -> frozenset:
        """Chunk `index`'s stale hosts once `fresh` (what a read of the registry, begun
        when our map named `before`, says) is taken in: those, what our map gained since
        `before`, the marks begun since (`marked`) and the marks still under way. A mark
        begun and done while the read was out, of a host `before` named already (a copy
        resynced, its record cleared, that a new write then missed), is in none of the
        others: the read may predate it, and our map would lose a copy on record."""
        return (frozenset(fresh) | (self.stale.get(index, frozenset()) - frozenset(before))
                | frozenset(self._marking.get(index, ()))
                | frozenset(marked.get(index, ()) if marked else ()))

    @contextmanager
    def _marks_during(self):
        """{chunk index: hosts} of the marks (_mark_stale) begun while the body runs (a
        read of the registry's records)."""
        marked: dict[int, set] = {}
        reads = self._reads
        reads.append(marked)
        try:
            yield marked
        finally:  # (this one: list.remove takes the first equal, another read's {})
            drop_identical(reads, marked)

    def set_view(self, view: View) -> None:
        """Adopt a newer record of the volume (new head after a snapshot, resize)."""
        self.view = view
        self.size = view.size
        self.geometry = Geometry(view.size, view.volume.chunk_size)
        self._cs = view.volume.chunk_size
        self._shift = self._cs.bit_length() - 1
        self.chain = view.chain
        self.gen = view.gen
        self.cuts = view.cuts
        # chunk index -> its read plan (_plan), made under the store's `layout` and the
        # cluster map named here, and this chain
        self._plans: dict = {}
        self._plans_layout = -1
        self._plans_map = None

    def chain_for(self, index: int) -> tuple[int, ...]:
        if not self.cuts:
            return self.chain
        return visible_chain(self.chain, self.cuts, index)

    async def switch_head(self, complete, cut_to: int | None = None) -> None:
        """Hold new writes, let in-flight ones finish, then `complete()` (async, returns the
        new View) and go on writing to the new head. Used for snapshots and shrinks (the
        new size refuses the held writes past its end), and for a head another made (either,
        completed without a lease). One switch at a time (two record syncs may find the same
        new head); a view older than the one adopted meanwhile is left (heads only grow).

        `cut_to`: the size a shrink this completes leaves. Requests past it are refused
        from the start (_past_end, which waits for the switch's outcome): the completion
        may commit with its answer lost and be asked again for a while (the service's
        COMPLETE_RETRY), and `vbp volume resize` returns once the record shows it. Read by
        the old view meanwhile, the range cut would answer its old bytes, or zeros once
        GC freed them, after the command returned."""
        async with self._switching:
            hold = self._hold = trio.Event()
            if cut_to is not None and cut_to < self.size:
                self.size = cut_to
            try:
                await self.drain()
                try:
                    view = await complete()
                except Fenced as e:  # (the lease was taken over): fenced before the hold
                    self._fence(e)  # goes, so no held write leaves with our old token
                    raise
                if view.gen >= self.gen:
                    self.set_view(view)
            finally:
                self.size = self.view.size  # (the cut undone if the switch failed)
                self._hold = None
                hold.set()

    @property
    def inflight(self) -> int:
        """Replicated writes under way."""
        return self._inflight

    async def drain(self) -> None:
        """Wait until no write is in flight (each ends within the peers' request timeout
        and the registry's: settled, recorded in `unrecorded`, or failed)."""
        while self._inflight:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
    # --- helpers -----------------------------------------------------------------------

    def _by_map(self, memo: dict) -> dict:
        """`memo` (_local or _routes), emptied for a new cluster map (epoch, data set), with
        room for a chunk more (_room): what the map alone decides per chunk."""
        cmap = self.cluster.map
        if cmap is not self._local_map:
            self._local.clear()
            self._routes.clear()
            self._local_map = cmap
        else:
            _room(memo)
        return memo

    def _local_only(self, index: int) -> bool:
        if self.n != 1:
            return False
        local = self._local.get(index)
        if local is None or self.cluster.map is not self._local_map:
            local = self._by_map(self._local)[index] = (
                self.cluster.write_set(self.lineage, index, 1) == (self.host_id,))
        return local

    def _note_unflushed(self, host: str, index: int, sent: int | None = None) -> None:
        """`host` took a write to chunk `index`; `sent`: PeerPool.incarnation of a remote
        host when the write left, None for this host's own copy."""
        self._note_all_unflushed(host, (index,), sent)

    def _note_all_unflushed(self, host: str, indexes, sent: int | None) -> None:
        """_note_unflushed of each chunk of `indexes`, at once."""
        s = self._unflushed.get(host)
        if s is None:
            s = self._unflushed[host] = set()
        s.update(indexes)
        if sent is not None:
            b = self._sent_at.get(host)
            if b is None or sent < b:
                self._sent_at[host] = sent

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnly(f"{self.name} is a read-only snapshot")
        if self.fenced:
            raise Fenced(f"this host no longer holds the write lease of {self.view.volume.name!r}")
        if self.token and self._now() >= self.lease_deadline:
            raise LeaseExpired(
                f"the write lease of {self.view.volume.name!r} ran out and could not be renewed "
                f"(registry unreachable): writes wait for a renewal")

    def set_gone(self, exc: Exception) -> None:
        if self.gone is None:
            log.warning("volume=%s event=export_gone reason=%s", self.name, exc)
            self.gone = exc

    def _fence(self, exc: Exception) -> None:
        if not self.fenced:
            log.warning("volume=%s event=fenced reason=%s", self.view.volume.name, exc)
            self.fenced = True
            # another gateway holds the lease: copies that took one of our unrecorded
            # (so unacknowledged) writes hold bytes it never saw
            for index, took, _missed in self.unrecorded:
                self._suspect(index, took)
            self.unrecorded.clear()
            self.dropped.set()
            if self.on_fenced is not None:
                self.on_fenced(self)

    # --- per-request hooks (metrics, QoS) ---------------------------------------------------

    def observe(self, command: int, nbytes: int, seconds: float, ok: bool,
                count: int = 1) -> None:
        s = self._op_stats.get(command)
        if s is None:  # first of its kind: bind the counters of (volume, operation)
            if self.metrics is None:
                return
            s = self._op_stats[command] = self.metrics.stats(self.view.volume.name,
                                                             _OPS.get(command, "other"))
        # bytes of reads and writes only, and of those done (a failed one moved none)
        s.add(nbytes if command < 2 and ok else 0, seconds, count)

    def limits_changed(self) -> None:
        """The volume's QoS limits changed or went (blockd's set_qos): requests waiting
        for their turn (_throttled) wait what is left under the new limits."""
        if self._limits is not None:
            self._limits.set()
            self._limits = None

    def _throttled(self, delay: float, op, *args):
        """`op(*args)` once `delay` (its booking, VolumeQos.delay_for) has passed. A
        change of limits meanwhile rescales what is left of the wait the way the buckets
        rescale their debt (VolumeQos.rescaled; all limits lifted: at once). Else a request
        booked under a mistyped limit (a 32 MiB write at 1 KiB/s is nine hours) would
        hold its connection, and with it the volume's lease, until then, whatever the
        operator set since. The limits it was booked under and its end are taken now:
        the task that runs the coroutine starts later, maybe after a change of limits
        it must not miss."""
        qos = self.qos
        now = trio.current_time()
        ahead = now - qos.clock()  # (qos.waits are times of its clock)
        return self._wait_turn(qos, now + delay, qos.limits,
                               tuple(w + ahead for w in qos.waits), op, args)

    async def _wait_turn(self, qos, end: float, before: tuple, waits: tuple, op, args):
        """(_throttled's wait: `before`, the limits the request was booked under by
        `qos`; `waits`, when each of its buckets alone would let it pass.)"""
        while True:
            # (another VolumeQos: the limits were lifted, and maybe set again, since)
            after = qos.limits if self.qos is qos else (0, 0)
            if after != before:  # changed before this task's first step, or meanwhile
                end, waits = qos.rescaled(end, waits, before, after, trio.current_time())
                before = after
            if self._limits is None:
                self._limits = trio.Event()
            with trio.move_on_at(end):
                await self._limits.wait()
            if trio.current_time() >= end:
                break
        try:
            return await _called(op, *args)
        except Fenced as e:  # (as write() and trim() on their unthrottled path)
            self._fence(e)
            raise

    # --- READ --------------------------------------------------------------------------

    def read(self, offset: int, length: int, ref: bool = False):
        if self.settling is not None:
            return self._settled(self.read, offset, length)
        if self._lapsed():
            return self._renewed(self.read, offset, length)
        if self.qos is not None and (d := self.qos.delay_for(length)):
            # (its turn come, after a takeover begun meanwhile, as one that came during it)
            return self._throttled(d, self._settled, self._read, offset, length)
        return self._read(offset, length, ref)

    def read_ref(self, offset: int, length: int):
        """read() for the NBD server, which queues the result at once: a local read inside
        one chunk may answer a FileRange (ChunkStore.read_ref) that the server sends from
        the data file's map. Never after an await (a throttled read answers bytes).

        This runs per request. A read inside one chunk whose copy here is current goes
        by the chunk's read plan (_plan: what _read_one looks up, kept); anything else
        (not a replica here, a copy recorded stale, a resync or backfill under way on this
        host) by _read_one, which asks everything again."""
        if self.qos is None and self.gone is None and self.settling is None and (
                (now := self._now()) <= self.serve_until
                or self.token and not self.fenced and now < self.lease_deadline) and (
                offset + length <= self.size):
            inner = offset & (self._cs - 1)
            if inner + length <= self._cs and length:
                index = offset >> self._shift
                store = self.store
                if store.layout != self._plans_layout or self.cluster.map is not self._plans_map:
                    self._plans.clear()  # a chunk came or went, or placement changed
                    self._plans_layout = store.layout
                    self._plans_map = self.cluster.map
                c = self._plans.get(index, _UNPLANNED)
                if c is _UNPLANNED:
                    c = self._plan(index)
                rep = self.replica
                if (c is not _FULL_PATH and self.host_id not in self.stale.get(index, ())
                        and not rep.backfilling and not rep.stale_self):
                    if c is None:
                        return [(offset, length, None)]
                    try:
                        return store.read_at(c, inner, length, True)
                    except ChecksumError as e:
                        return self._bad_local(e, offset, index, inner, length)
                return self._read_one(offset, index, inner, length, True)
        return self.read(offset, length, True)

    async def _settled(self, op, *args):
        """op(*args) (read, block_status), once the takeover of an orphaned lease under
        way has reconciled the copies (settle_takeover): answered before, from a copy it
        then records stale, the same request would answer otherwise afterwards, with no
        write in between."""
        while self.settling is not None:
            await self.settling.wait()
        return await _called(op, *args)

    def _plan(self, index: int):
        """Chunk `index`'s read plan: the store's handle of the generation a read of it
        resolves to here (ChunkStore.lookup), None when this host has none of the chain
        (a hole), _FULL_PATH when this host holds no replica of it. Depends on placement,
        the chunks in the store and the chain only: read_ref drops every plan when the
        first two change, set_view when the chain does. Whether this host's copy is
        current (stale records, resync) can change at any time: read_ref asks per read."""
        lineage = self.lineage
        c = _FULL_PATH
        if self.host_id in self.cluster.replicas(lineage, index, self.n):
            chain = self.chain_for(index)
            gen = self.store.resolve(lineage, index, chain)
            if gone_below(self.store.collected_gens.get(lineage), chain, gen):
                c = _FULL_PATH  # (_read_one's error)
            elif gen is None:
                c = None
            else:  # (a generation the store resolves to but cannot find: _read_one's error)
                c = self.store.lookup(_new_key(ChunkKey, (lineage, index, gen))) or _FULL_PATH
        _room(self._plans)
        self._plans[index] = c
        return c

    def _lapsed(self) -> bool:
        """Reads would fail for serve_until (_check_served) while the service can renew
        it (renew_serving): see _renewed."""
        return (self.renew_serving is not None and self.gone is None
                and self._now() > self.serve_until and not (self.token and not self.fenced))

    async def _renewed(self, op, *args):
        """op(*args) (read, block_status) of an export whose serve_until passed, once the
        service published this host's exports and read the record again (renew_serving):
        the way serve_until moves on (VolumeProvider._confirm, _snapshot_gone), asked for
        at once instead of at the next heartbeat and record sync. A registry that cannot
        be reached, or a chain no longer in the record, leaves it passed: the request
        then fails as it did at once before (Unsynced, Unpublished).

        What let it pass with the registry reachable: a client keeping the event loop
        busy. serve_until is a publication plus 4 s, a heartbeat publishes every 2 s and
        a reader reads its record every second; `nbdinfo --map` of a 16 TiB volume
        (4,096 block status requests of 4 GiB, each 14 ms of the loop) delayed them
        enough, now and then, to fail one request with EIO, and the map with it."""
        lapsed = self._now() - self.serve_until
        await self.renew_serving()
        self._check_served()
        self._loglimit.log(log, logging.INFO, "serving_renewed", "volume=%s "
                           "event=serving_renewed lapsed_for=%.3f: the heartbeat or the "
                           "record reads came late (a busy host)", self.name, lapsed)
        return await _called(op, *args)

    def _check_served(self) -> None:
        """Reads may be answered: the export is not gone, and its serve_until has not
        passed: a snapshot export's publication, a head export's last record read. A head
        holding the write lease is exempt: no other host makes a new head under it (a
        takeover or a snapshot completed elsewhere takes the lease first)."""
        if self.gone is not None:
            raise self.gone
        if self._now() > self.serve_until and not (self.token and not self.fenced):
            if self.read_only:
                raise Unpublished(
                    f"{self.name}: this host could not tell the registry the export is open "
                    f"(registry unreachable): its requests fail until it can")
            raise Unsynced(
                f"{self.name}: this host could not read the volume's record or publish "
                f"that it reads it (registry unreachable), and holds no write lease: its "
                f"reads fail until it can")

    def _own_current(self) -> bool:
        """Whether this host's copies may answer reads as current as far as the lease
        goes. A holder's reads are exempt from serve_until (_check_served), but past its
        lease_deadline another gateway may have taken the lease over and written, this
        host cut off from it (a partition, a stall: the new holder's announcement and
        writes never came here) and from the registry that records our copies stale: our
        copies may hold the old bytes of acknowledged writes. Then reads go to the other
        copies (_read_piece), whose replicas refuse our token once they saw a newer one
        (and fence us); with none reachable they fail. Within serve_until (the volume's
        record read and our chain published lately) our stale map is as fresh as a
        reader's, and our copies count as a reader's do."""
        if not self.token or self.fenced:
            return True
        now = self._now()
        return now < self.lease_deadline or now <= self.serve_until

    def _read(self, offset: int, length: int, ref: bool = False):
        self._check_served()
        if offset + length > self.size:  # (read again, by bytes, after the takeover under
            # way if any, as read() would have waited for it: after an await)
            return self._past_end(offset, length, PastEnd,
                                  (self._settled, self._read, offset, length))
        index = offset >> self._shift
        inner = offset & (self._cs - 1)
        if inner + length <= self._cs and length:
            return self._read_one(offset, index, inner, length, ref)
        extents = []
        remote = []
        for p in self.geometry.pieces(offset, length):
            hosts = self.cluster.replicas(self.lineage, p.index, self.n)
            if (self.host_id in hosts and self.host_id not in self.stale.get(p.index, ())
                    and not self.replica.is_stale(self.lineage, p.index) and self._own_current()):
                try:
                    gen, data, _ = self.replica.read(self.lineage, p.index, self.chain_for(p.index), p.offset, p.length)
                    extents.append((offset + p.buf_offset, p.length, data))
                    continue
                except ChecksumError as e:
                    self._loglimit.log(log, _WARNING, "checksum_error",
                                       "volume=%s chunk=%d event=checksum_error page=%s", self.name,
                                       p.index, e.page)
                    if self.metrics is not None:
                        self.metrics.checksum_error()
                    if len(hosts) == 1:
                        raise
                    extents.append(None)
                    remote.append((len(extents) - 1, p, True))
                    continue
            extents.append(None)
            remote.append((len(extents) - 1, p, False))
        if remote:
            return self._read_remote(offset, extents, remote)
        return extents

    def _read_one(self, offset: int, index: int, inner: int, length: int, ref: bool = False):
        """A read inside one chunk: _read's loop for one piece, without its objects."""
        lineage = self.lineage
        hosts = self.cluster.replicas(lineage, index, self.n)
        if (self.host_id in hosts and self.host_id not in self.stale.get(index, ())
                and not self.replica.is_stale(lineage, index) and self._own_current()):
            store = self.store  # Replica.read, less the version it looks up for peers
            chain = self.chain_for(index) if self.cuts else self.chain
            gen = store.resolve(lineage, index, chain)
            if lineage in store.collected_gens:
                self.replica.check_not_collected(lineage, index, chain, gen)
            if gen is None:
                return [(offset, length, None)]
            try:
                key = _new_key(ChunkKey, (lineage, index, gen))  # ChunkKey(...) less its __new__
                return store.read_ref(key, inner, length) if ref else store.read(key, inner, length)
            except ChecksumError as e:
                return self._bad_local(e, offset, index, inner, length)
        return self._read_remote(offset, [None], [(0, Piece(index, inner, length, 0), False)])

    def _bad_local(self, e: ChecksumError, offset: int, index: int, inner: int, length: int):
        """This host's copy of chunk `index` failed its checksum reading `length` bytes at
        `inner`: read them from a current copy elsewhere, which repairs ours (none: `e`)."""
        self._loglimit.log(log, _WARNING, "checksum_error",
                           "volume=%s chunk=%d event=checksum_error page=%s", self.name, index,
                           e.page)
        if self.metrics is not None:
            self.metrics.checksum_error()
        if len(self.cluster.replicas(self.lineage, index, self.n)) == 1:
            raise e
        return self._read_remote(offset, [None], [(0, Piece(index, inner, length, 0), True)])

    async def _read_remote(self, offset, extents, remote):
        for slot, p, repair in remote:
            extents[slot] = (offset + p.buf_offset, p.length, await self._read_piece(p, repair))
        while self.settling is not None:
            # a lease handed over meanwhile (begun as the holder's, exempt from
            # serve_until, this read ends a reader's): served once the gateway is
            # published and has read its record again, as a read that comes now is
            await self.settling.wait()
        self._check_served()  # (a peer may have collected the chunks meanwhile)
        last = extents[-1]
        if last[0] + last[1] > self.size:  # (a shrink adopted meanwhile: the same)
            self._past_end(offset, last[0] + last[1] - offset, PastEnd)
        return extents

    async def _read_piece(self, p, repair: bool = False):
        """Piece `p` from a current copy on another host. A copy recorded stale (in our
        map or in the registry's view this host's replica holds) is never read: it may miss
        acknowledged writes, so with no current copy answering the read fails, as a DRBD
        node with an Outdated disk and no peer fails it. `repair`: the local copy failed its
        checksum; the good bytes are written back over it."""
        hosts = self.cluster.replicas(self.lineage, p.index, self.n)
        # a holder's reads carry its token: a copy that has seen a newer one (another
        # gateway took the lease over, made new heads, and GC may have freed what this
        # one's chain reads) refuses them, and this gateway is fenced
        token = self.token if not self.fenced else 0
        msg = m.ReadChunk(self.view.volume.name, self.lineage, p.index, self.chain_for(p.index),
                          p.offset, p.length, self.cluster.epoch, get_rid(), False, token)
        last: Exception | None = None
        stale = self.stale.get(p.index, ())
        started = self.replica.now()
        damaged = repair  # (the local copy holds the chunk: it failed a checksum)
        # a write of ours still on its way to the peer we read may be missing from its reply
        repair = repair and not self._inflight
        if self.takeover_unheard:  # (their copies may hold a write nobody compared yet)
            hosts = sorted(hosts, key=self.takeover_unheard.__contains__)
        for h in hosts:
            if h == self.host_id or h in stale or not self.cluster.is_up(h):
                continue
            try:
                try:
                    reply = await self._call(h, self._read_sent(h, msg))
                except Fenced:
                    if not token or self.token == token or self.fenced:
                        raise
                    # Not deposed: the lease was handed over meanwhile (VolumeProvider.
                    # lease_wanted; taken back since, perhaps), and the new holder's token
                    # reached that copy first. Asked again as this gateway is now.
                    token = self.token
                    msg = dc_replace(msg, token=token)
                    reply = await self._call(h, self._read_sent(h, msg))
            except Fenced as e:  # (deposed: no copy answers it any more; nor do we)
                self._fence(e)
                raise
            except VbpError as e:
                last = e
                continue
            if damaged:
                mine = self.store.resolve(self.lineage, p.index, msg.chain)
                if mine is not None and reply.gen < mine:
                    # the peer lacks a generation of the read's chain this copy holds (a
                    # lost copy, which scrub records stale): its bytes predate it
                    last = PeerUnavailable(
                        f"chunk {p.index} of {self.name}: {h} lacks generation {mine}, which "
                        f"this host's copy (failing its checksum) holds")
                    continue
            data = reply.data if reply.gen >= 0 else None
            if repair:
                self._repair_local(p, data, started, reply.gen)
            return data
        if last is None and any(h != self.host_id and h in stale for h in hosts):
            last = PeerUnavailable(f"chunk {p.index} of {self.name}: every current copy is down "
                                   f"and this host's copy is stale")
        if last is None and self.host_id in hosts and not self._own_current():
            last = PeerUnavailable(
                f"chunk {p.index} of {self.name}: no other copy is reachable, and this host's "
                f"is not read: the write lease ran out unrenewed (registry unreachable), and "
                f"another host may have taken it over and written")
        raise last or PeerUnavailable(f"no current replica of chunk {p.index} of {self.name} is reachable")

    def _read_sent(self, h: str, msg):
        """ReadChunk `msg` as sent to host `h`: without its token to a host that does not
        take one (ClusterView.no_read_token)."""
        return msg if not msg.token or h not in self.cluster.no_read_token else dc_replace(msg, token=0)

    def _repair_local(self, p, data, since: float, gen: int) -> None:
        """Write good bytes from a peer (of its generation `gen`) over a local copy that
        failed its checksum, unless a write reached that range here after the peer was
        asked (`since`): the peer's bytes may predate it, and the write is newer than the
        damage. This gateway's own
        writes in flight stop the repair too (the caller). Without the lease (this
        gateway only reads; every host serves every volume), another host's gateway may
        be writing: its write can land here well before it reaches the peer, so one that
        landed less than a request timeout (and a second) before the read began stops
        the repair as well. A page left unrepaired fails its checksum again on the next
        read or scrub. Only over the same generation: a copy that lost one of the chain
        (scrub records it stale) answers from another, whose bytes, written over ours,
        would pass every checksum from then on (a snapshot's under the head's, or the
        head's into a snapshot)."""
        if data is None or self.read_only:
            return
        if not self.token or self.fenced:
            since -= self.write_window
        if since <= self.replica.forgotten_until:
            # a resync pass forgot notes of writes applied since (Replica.forget_written):
            # one that landed here may be missing below, and the peer's bytes predate it
            log.info("volume=%s chunk=%d event=repair_skipped reason=notes_forgotten",
                     self.name, p.index)
            return
        for t, a, b, _gen in self.replica.written.get((self.lineage, p.index), ()):
            if t >= since and a < p.offset + p.length and p.offset < b:
                log.info("volume=%s chunk=%d event=repair_skipped reason=newer_write", self.name, p.index)
                return
        try:
            if self.store.resolve(self.lineage, p.index, self.chain_for(p.index)) != gen:
                log.info("volume=%s chunk=%d event=repair_skipped reason=other_generation "
                         "peer_gen=%d", self.name, p.index, gen)
                return
            # Only the whole pages whose peer bytes are what this copy's stored checksum
            # says: exactly the bytes it should hold, whatever the peer's state (a copy
            # gone stale that no map here shows yet answers older bytes, which would pass
            # every checksum from then on). The rest is left to the next read or scrub.
            # And of those, only the pages that fail here: a 1 MiB read with one damaged
            # page wrote all 256 again.
            key = ChunkKey(self.lineage, p.index, gen)
            version, sums = self.store.page_checksums(key)
            mv = memoryview(data)
            failing = self.store.failing_pages(key, p.offset, p.length)
            if not failing:
                log.info("volume=%s chunk=%d event=repair_skipped reason=nothing_fails",
                         self.name, p.index)
                return
            runs: list[list[int]] = []
            for page in failing:
                at = page * PAGE_SIZE - p.offset
                s = sums[page]
                if s and page_checksum(mv[at:at + PAGE_SIZE]) == s:
                    if runs and runs[-1][1] == page:
                        runs[-1][1] = page + 1
                    else:
                        runs.append([page, page + 1])
            if not runs:
                log.info("volume=%s chunk=%d event=repair_skipped reason=peer_differs",
                         self.name, p.index)
                return
            for a, b in runs:
                at = a * PAGE_SIZE - p.offset
                self.store.write(key, a * PAGE_SIZE, mv[at:at + (b - a) * PAGE_SIZE],
                                 chunk_size=self.geometry.chunk_size, version=version)
            log.info("volume=%s chunk=%d event=repaired bytes=%d", self.name, p.index,
                     sum(b - a for a, b in runs) * PAGE_SIZE)
            if self.metrics is not None:
                self.metrics.repaired()
        except VbpError as e:
            self._loglimit.log(log, _WARNING, "repair_failed",
                               "volume=%s chunk=%d event=repair_failed error=%s", self.name,
                               p.index, e)

    # --- after a takeover ------------------------------------------------------------

    async def reconcile_after_takeover(self, token: int) -> tuple[int, int]:
        """Run once this gateway took the lease over from a holder that never released it,
        after the new token was announced (so nothing of the old holder lands any more) and
        before our first write. A write the old holder had in flight may have reached only
        some replicas of its chunk; nobody recorded the others stale, so replicas would
        answer a read differently forever. Every up replica names the chunks of our
        generation it took writes in since its last flush or not known settled (their
        holder did not live a window past them: DirtyChunks, Replica.recently_written;
        however late the takeover comes); for each, the current copies are compared
        (ChunkState: page checksums) and the copies that
        differ from the largest agreeing group (ties: the first in placement order) are
        recorded stale, so resync brings them to it. Unacknowledged bytes may so be kept
        or dropped, as after any crash; acknowledged ones are on every current copy.
        (DRBD resyncs its activity log's extents after a primary crash for this.)
        Every generation of the head's chain is asked about, not only the head: snapshots
        completed since the old holder stopped (without a lease, by `vbp volume snapshot`)
        froze the generation it wrote into. A host up in the map that cannot be asked
        (after a map refresh) is left in `takeover_unheard`: the writes go on (a partial
        cut must not stop the volume), but the lease owes the reconcile when handed back
        (blockd: VolumeProvider._take_lease), so the next holder compares again. `token`:
        our lease's (not ours to write with until this returns). Returns (chunks
        compared, copies recorded stale)."""
        cv = self.cluster
        hosts = sorted((set(cv.map.data_set) | set(cv.map.prev or ())))
        self.takeover_unheard = frozenset()
        self._takeover_at = self.replica.now()
        dirty: set[tuple[int, int]] = set()  # (index, gen)
        unheard: set[str] = set()  # up hosts that did not learn our token or list their chunks
        away: set[str] = set()  # hosts down in the map: asked once back (reconcile_unheard)

        async def listed(h: str) -> None:
            rec = cv.map.host(h)
            if rec is None or (h != self.host_id and rec.peer_rev < 5):
                return
            if not cv.is_up(h):
                away.add(h)
                return
            try:
                await self._list_dirty(h, token, dirty)
            except VbpError as e:
                unheard.add(h)
                log.info("volume=%s event=reconcile_list_failed host=%s error=%s",
                         self.name, h, e)

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(listed, h)
        marked = 0
        short: dict[int, list[str]] = {}  # chunks left below min_size: copies resyncing
        for index, gen in sorted(dirty):
            stale = set(self.stale.get(index, ()))
            placed = [h for h in cv.write_set(self.lineage, index, self.n) if h not in stale]
            copies = [h for h in placed if cv.is_up(h) and h not in unheard]
            # A copy down now (cut off, its process maybe alive: no dirty marks of its own
            # for a restart to find) may hold a write of the old holder the others lack,
            # and nobody compares it once it is back: it goes with the copies behind, as
            # one that does not answer.
            down = [h for h in placed if h not in copies]
            if len(copies) < 2 and not (copies and down):
                continue
            states = await self._chunk_states(copies, index, gen)
            groups: dict[tuple, list[str]] = {}
            for h in copies:
                if h in states:
                    groups.setdefault(states[h], []).append(h)
            # A copy that did not answer may hold a write of the old holder the others
            # lack, with nobody to compare it later: it goes with the copies behind, once
            # some copy answered (else nothing is known of any, and nothing is recorded).
            unknown = [h for h in copies if h not in states] + down
            if not groups or (len(groups) < 2 and not unknown):
                continue
            keep = max(groups.values(), key=lambda g: (len(g), -copies.index(g[0])))
            behind = [h for h in copies if h not in keep] + down
            log.warning("volume=%s chunk=%d gen=%d event=takeover_divergent keep=%s behind=%s",
                        self.name, index, gen, ",".join(keep), ",".join(behind))
            # (under the lease: a reconcile that stalled past it, another gateway holding
            # it now and writing, must not record that one's current copies stale)
            await self._mark_stale(index, behind, token=token)
            marked += len(behind)
            answered = [h for h in copies if h in states and h not in keep]
            if len(keep) < self.min_size <= len(keep) + len(answered):
                short[index] = answered
        if short:
            await self._await_takeover_resync(short)
        if unheard and self.refresh_map is not None:
            try:  # a host that died since our map was read (its copies went behind above)
                await self.refresh_map()
            except RegistryUnavailable as e:
                log.info("volume=%s event=map_refresh_failed error=%s", self.name, e)
        self.takeover_unheard = frozenset(unheard | away)
        if self.takeover_unheard:
            # Cut off or silent, maybe holding the old holder's last write in a chunk no
            # other copy was written in, which nobody compared then: not reconciled,
            # though we write on; asked once back (reconcile_unheard)
            log.warning("volume=%s event=takeover_unheard hosts=%s: could not ask them which "
                        "chunks the previous holder wrote there; asked once they answer, and "
                        "until then the lease owes the reconcile to whoever holds it next",
                        self.name, ",".join(sorted(self.takeover_unheard)))
        log.info("volume=%s event=takeover_reconciled chunks=%d copies_marked_stale=%d",
                 self.name, len(dirty), marked)
        return len(dirty), marked

    async def _list_dirty(self, h: str, token: int, into: set) -> None:
        """Tell host `h` our lease's `token`, then add to `into` the (index, gen) of the
        chunks of every generation of our chain that it names as taking writes not known
        settled (DirtyChunks). The token first, even if the service announced it: an
        announcement that failed is only logged, and a copy compared while it still takes
        the old holder's token may take that holder's write still on its way afterwards."""
        await self._send_once(h, m.Flush(self.view.volume.name, self.cluster.epoch, token))
        for gen in sorted(set(self.chain)):
            got = await self._send_once(h, m.DirtyChunks(self.lineage, gen))
            into.update((index, gen) for index in got.indexes)

    async def _await_takeover_resync(self, short: dict[int, list[str]]) -> None:
        """Wait, bounded, until the copies the takeover recorded stale in `short` (chunk ->
        up copies that answered) are current again, for the chunks it left with fewer
        current copies than min_size. Those copies differ from the kept one only in bytes
        the old holder never acknowledged, and their hosts resync them at once; without the
        wait, our first writes there would fail below min_size (EIO to a client that only
        moved to another host, as after any gateway failover with writes in flight: two
        up copies that disagree leave one current). A resync that does not end within a
        write window and two passes is not waited for further: the writes there then fail
        as before, until it ends."""
        if self.registry is None:
            return
        deadline = self._now() + self.write_window + 2.0
        left = dict(short)
        while left and self._now() < deadline:
            await trio.sleep(0.1)
            try:  # (one listing of the lineage's records a poll, not one per chunk)
                named = {(r.index, r.host_id) for r in await self.registry.list_stale(self.lineage)}
            except RegistryUnavailable:
                return
            for index in sorted(left):
                if not any((index, h) in named for h in left[index]):
                    await self._behind_by_registry(index, set())
                    del left[index]
        if left:
            log.warning("volume=%s event=takeover_resync_slow chunks=%d: writes there fail "
                        "below min_size until their copies are resynced", self.name, len(left))

    async def reconcile_unheard(self, token: int) -> frozenset[str]:
        """The takeover's reconcile, late, with the hosts it could not ask then
        (`takeover_unheard`: cut off and down in the map, or silent), each once it is up:
        it learns our token and names the chunks it took writes in that are not known
        settled (DirtyChunks); where its copy of one differs from every other current copy
        that answers, it holds a write of the old holder the others lack (never
        acknowledged: min_size copies take every acknowledged write) or misses one of ours,
        and it is recorded stale, so resync brings it to the others. Until asked, its
        copies are read last (_read_piece). A host gone from the map is forgotten (its
        copies count no more). Returns the hosts still unheard; none: the takeover is
        reconciled. `token`: the lease's we took over with."""
        cv = self.cluster
        left = set(self.takeover_unheard)
        for h in sorted(left):
            if cv.map.host(h) is None:
                left.discard(h)
                continue
            if not cv.is_up(h):
                continue
            try:
                listed: set[tuple[int, int]] = set()
                await self._list_dirty(h, token, listed)
                if self.replica.now() - self._takeover_at >= self.replica.recent_window:
                    # Our token may have reached it a window ago (a Flush or writes of ours
                    # answered, its DirtyChunks not): our writes since then made it forget
                    # the old holder's marks (Replica.recent_before), so every chunk it
                    # holds is compared. (Its window is ours: blockd sets both alike.)
                    got = await self._send_once(h, m.ChunkIndexes(self.lineage))
                    listed.update((index, gen) for index in got.indexes
                                  for gen in set(self.chain))
                for index, gen in sorted(listed):
                    if not await self._late_copy_agrees(h, index, gen, left):
                        await self._mark_stale(index, [h], token=token)
            except VbpError as e:
                log.info("volume=%s event=reconcile_list_failed host=%s error=%s",
                         self.name, h, e)
                continue
            left.discard(h)
            log.info("volume=%s event=takeover_reconciled_late host=%s chunks=%d",
                     self.name, h, len(listed))
        self.takeover_unheard = frozenset(left)
        return self.takeover_unheard

    async def _late_copy_agrees(self, h: str, index: int, gen: int, unheard) -> bool:
        """Whether `h`'s copy of chunk `index` (generation `gen`) holds what another current
        copy holds (True also when it is recorded stale already, is no copy of the chunk,
        or no other copy answers: nothing to judge it by, nothing recorded)."""
        cv = self.cluster
        stale = self.stale.get(index, ())
        placed = cv.write_set(self.lineage, index, self.n)
        if h in stale or h not in placed:
            return True
        others = [o for o in placed if o != h and o not in stale and o not in unheard
                  and cv.is_up(o)]
        states = await self._chunk_states([h, *others], index, gen)
        if h not in states:
            raise PeerUnavailable(f"{h} did not say what its copy of chunk {index} holds")
        seen = [states[o] for o in others if o in states]
        if not seen or states[h] in seen:
            return True
        log.warning("volume=%s chunk=%d gen=%d event=takeover_divergent keep=%s behind=%s",
                    self.name, index, gen, ",".join(o for o in others if o in states), h)
        return False

    async def _chunk_states(self, hosts, index: int, gen: int) -> dict[str, tuple]:
        """(exists, page checksums) of each copy of chunk `index` (generation `gen`) on
        `hosts`, asked at once; a host that does not answer is left out."""
        states: dict[str, tuple] = {}

        async def state(h: str) -> None:
            try:
                r = await self._send_once(h, m.ChunkState(self.lineage, index, gen))
                states[h] = (r.exists, tuple(r.checksums))
            except VbpError:
                pass

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(state, h)
        return states

    # --- WRITE / TRIM / WRITE_ZEROES ---------------------------------------------------

    async def settle_takeover(self, take, give_back) -> None:
        """A reader (no token) found the lease orphaned: its last holder may have left
        writes on some copies only, and reads answered now from this host's copy could
        answer otherwise once a takeover reconciles them. `take()` (async -> token) takes
        the lease over, which reconciles; then, unless a write of ours waits for the lease
        (a client is writing: it keeps it), `give_back(token)` (async) hands it back, so a
        writer elsewhere (the VM restarted on another host) is not kept waiting. The token
        is never ours to write with until kept: no write carries it, and this gateway
        stays a reader (published, serving by serve_until) throughout. Reads wait while
        the service has `settling` set."""
        async with self._lease_lock:
            if self.token or self.fenced:
                return
            token = await take()
            if self._wanting and not self.fenced:
                self.token = token  # (as _leased would have: the waiting write goes on)
                return
            await give_back(token)

    def drop_idle_lease(self) -> int:
        """Give up the write lease's token if the lease is idle here (lease_busy says
        nothing): no write of ours taken in, in flight, waiting or unflushed on any copy,
        no flush under way, nothing left to record, no takeover to finish. Returns the
        token dropped (the service hands the lease back), 0 if the lease is not idle. From
        then on this gateway is a reader: its next write takes the lease again (_leased).
        A live-migrated VM's source is idle once it flushed at the switchover (blockd:
        VolumeProvider.lease_wanted)."""
        token = self.token
        if self.lease_busy():
            return 0
        self.token = 0
        return token

    def lease_busy(self) -> str:
        """What keeps the write lease here, in a few words; "" when it is idle."""
        if not self.token:
            return "no lease"
        if self.fenced:
            return "fenced"
        # (_flying: a write taken in whose task has not run yet, not counted in flight
        # until it does: sent then with the token as it is, 0 once dropped, the replicas
        # would refuse it and fence this gateway)
        if self._wanting or self._hold is not None or self._flying or self._lease_lock.locked():
            return "writes under way"
        if self.settling is not None:
            return "reads waiting for a settle"
        if self.owes_flush() or self._unflushed:
            return "writes not flushed"
        if self.unrecorded or self.suspects:
            return "failures not recorded"
        if self.takeover_unheard:
            return "takeover not reconciled"
        return ""

    async def _leased(self, op, *args):
        self._wanting += 1
        try:
            while self._hold is not None:
                await self._hold.wait()
            await self._lease_lock.acquire()
        finally:
            self._wanting -= 1
        try:
            if not self.token:
                if self.take_lease is None:
                    raise Fenced(f"{self.name}: no write lease can be taken here")
                self.token = await self.take_lease()
        finally:
            self._lease_lock.release()
        return await _called(op, *args)

    def prepare_writes(self, offsets) -> None:
        """`offsets()`: those of writes about to come in one batch. The chunks of this host's
        copies that they will write, where a flush marked them clean, are marked dirty
        now in one index commit (ChunkStore.mark_dirty), where each write would commit
        its own. A guest that writes all over a volume larger than the store's hot set
        (HOT_MAX chunks) and flushes often otherwise pays a synced commit for most of its
        writes. A hint: a write that crosses into a second chunk marks that one itself,
        and chunks not on this host are not marked (the store has no such chunk)."""
        store = self.store
        if not store.has_clean():  # every chunk here is marked: nothing to do (the cost of
            return  # this call in a benchmark that never flushes)
        shift, lineage, gen = self._shift, self.lineage, self.gen
        indexes = {o >> shift for o in offsets()}
        if len(indexes) > 1:  # (one chunk: its write marks it as cheaply)
            store.mark_dirty([_new_key(ChunkKey, (lineage, i, gen)) for i in indexes])

    def write(self, offset: int, data, fua: bool):
        if self.qos is not None and (d := self.qos.delay_for(len(data))):
            return self._throttled(d, self._write, offset, keepable(data), fua)
        try:
            return self._write(offset, data, fua)
        except Fenced as e:  # (the local copy's word, on the paths with no peer: as theirs)
            self._fence(e)
            raise

    def _write(self, offset: int, data, fua: bool):
        token = self.token
        if self.read_only or self.fenced or token and self._now() >= self.lease_deadline:
            self._check_writable()  # (its checks, with no call when they pass)
        if not len(data):
            # nothing to write (NBD allows a zero-length WRITE, at the very end too): no
            # chunk is made for it, not one past the volume's last
            return None
        if offset + len(data) > self.size:
            return self._past_end(offset, len(data), WritePastEnd,
                                  (self._write, offset, keepable(data), fua))
        if not token or self._hold is not None:
            return self._leased(self._write, offset, keepable(data), fua)
        index = offset >> self._shift
        inner = offset & (self._cs - 1)
        n = len(data)
        if inner + n <= self._cs:  # inside one chunk: its one piece, no generator
            if not self._fua_in_task(fua) and self._local_only(index):
                self.replica.write(self.view.volume.name, self.lineage, index, self.gen,
                                   self.chain_for(index) if self.cuts else self.chain, inner,
                                   data, self._cs, 0, fua, self.cluster.map.epoch, token)
                s = self._unflushed.get(self.host_id)
                if s is None:
                    self._note_unflushed(self.host_id, index)
                else:
                    s.add(index)
                return None
            pieces = [Piece(index, inner, n, 0)]
        else:
            pieces = list(self.geometry.pieces(offset, n))
            if not self._fua_in_task(fua) and all(self._local_only(p.index) for p in pieces):
                for p in pieces:
                    self.replica.write(self.view.volume.name, self.lineage, p.index, self.gen, self.chain_for(p.index),
                                       p.offset, data[p.buf_offset:p.buf_offset + p.length],
                                       self.geometry.chunk_size, 0, fua, self.cluster.epoch, self.token)
                    self._note_unflushed(self.host_id, p.index)
                return None
        payload = keepable(data)
        rid = get_rid()

        def make(p):  # (the general path calls it when its task runs: epoch and token then)
            return m.new_write_chunk(
                self.view.volume.name, self.lineage, p.index, self.gen, self.chain_for(p.index),
                p.offset, payload[p.buf_offset:p.buf_offset + p.length], self._cs, 0, fua,
                self.cluster.epoch, self.token, rid)

        if len(pieces) == 1:
            later = self._replicate_now(pieces[0], make(pieces[0]))
            if later is not None:
                return later
        return self._general(pieces, make)

    def write_run(self, writes, ids=None):
        """The writes of `writes`, a run of plain NBD writes ((cookie, flags, offset,
        length, data) each, flags holding NBD_CMD_FLAG_FUA at most) that the server is
        about to hand to write() one by one, taken here at once, from the first: each as
        write() would take it, in order. At replicas=1 (_write_run_here): how many were
        written. Replicated (_write_run_copies): (how many were taken, their parts under
        way), or 0. `ids`: the RequestIds whose next ids are the run's writes, or None."""
        if self.n == 1:
            return self._write_run_here(writes)
        return self._write_run_copies(writes, ids)

    def _write_run_here(self, writes) -> int:
        """How many of `writes` (write_run) were written here at once, from the first:
        each as write() would, in order. It takes those of a replicas=1 volume whose chunks are this
        host's own, each inside one chunk and with no FUA, while the lease is held and
        no QoS limit is set: their checks once for the run (nothing yields to the run
        until it ends; the lease's deadline is still read before each write, as write()
        reads it), their local writes as one call of the replica (Replica.write_items).
        What is left goes to write(), from the first write not taken: one past the
        lease's deadline, which write() then refuses or waits for a renewal, and one
        that failed, which write() meets again and answers under its request id (a line
        logged inside the run names none). A failure that does not come again (a
        transient I/O error) is then written the second time, and answered so.
        At 4K random writes QD32 on one host it took the server's CPU per write from
        19.8 to 14.2-17.7 us (python -m bench, like with like)."""
        token = self.token
        if (self.n != 1 or self.qos is not None or not token or self._hold is not None
                or self.cuts or self.read_only or self.fenced
                or self._now() >= self.lease_deadline):
            return 0
        shift, mask, size = self._shift, self._cs - 1, self.size
        # the memo of _local_only while it holds for this map (else it is the one to ask)
        local = self._local if self.cluster.map is self._local_map else {}
        items = []
        for _cookie, flags, offset, length, data in writes:
            index = offset >> shift
            inner = offset & mask
            if (flags & _NBD_FUA or not length or inner + length > mask + 1
                    or offset + length > size):
                break
            if local.get(index) is not True and not self._local_only(index):
                break
            items.append((index, inner, data))
        if not items:
            return 0
        try:
            done = self.replica.write_items(self.view.volume.name, self.lineage, self.gen,
                                            self.chain, self._cs, False, self.cluster.map.epoch,
                                            token, items, (self._now, self.lease_deadline))
        except Exception as e:  # (write() meets it again, from that write on)
            done = getattr(e, "batch_item", 0)
        if done:
            self._note_all_unflushed(self.host_id, [item[0] for item in items[:done]], None)
        return done

    def _write_run_copies(self, writes, ids):
        """write_run of a replicated volume: (how many of `writes` were taken, from the
        first, their parts), or 0 for none. A part is (the places in the run of its
        writes, a Later whose value is their outcomes, in order), one per WriteBatch: an
        outcome is None for a write that every copy took cleanly, else the write's own
        Later (its answer, as write() would have returned it). A part is answered when
        its own replies are in, not when the whole run's are.

        It takes the small writes that write() would put off into a WriteBatch
        (_replicate_now, _put_off): no FUA, each inside one chunk and under BATCH_PIECE,
        to chunks whose copies are all current and whose peers are ready, none
        overlapping a write in flight or one taken before it, while the lease is held and
        no QoS limit, cut, switch or DEBUG log (of each write, or of each local copy) is
        in the way; at least BATCH_MIN of them, or none (write() puts fewer off with the
        writes after them, or sends a short run one WriteChunk each to join the peer
        links' own batches). What raises while a write is taken stops the run before it:
        write() meets it again.

        The checks of the run are made once. Its writes go to their peers as one
        WriteBatch per group of peers (BATCH_ITEMS at most: a full one goes at once, and
        the peers start on it while the rest is taken), built from the run directly
        (no WriteChunk, request id string or Later made per write), and its local copies
        as one call of the replica per group (_write_here_items). A group every copy of
        which took every write cleanly is settled in one pass (_settle_clean); any other
        write of a group is settled as _batch_replied settles it, through a Later of its
        own. The rest of the run goes to write(), from the first write not taken. Per
        write, about half of the gateway's Python calls of the put-off path."""
        token = self.token
        ready = getattr(self.pool, "ready", None)
        if (len(writes) < BATCH_MIN or ready is None or not token or self.qos is not None
                or self._hold is not None or self.cuts or self.read_only or self.fenced
                or self._now() >= self.lease_deadline or log.isEnabledFor(logging.DEBUG)
                or _replica_log.isEnabledFor(logging.DEBUG)):
            return 0
        cv = self.cluster
        if cv.map is not self._local_map:
            self._by_map(self._routes)  # (a new map: the routes of the old one go)
        routes, stale, flying = self._routes, self.stale, self._flying
        shift, cs, size, lineage, n, me = (self._shift, self._cs, self.size, self.lineage,
                                           self.n, self.host_id)
        mask = cs - 1
        groups: dict = {}  # the routes' sorted addresses -> (route, items, datas)
        parts: list = []  # (places, Later) of each group sent
        run = _Run(ids)
        epoch = cv.epoch
        taken = 0
        try:
            for _cookie, flags, offset, length, data in writes:
                index = offset >> shift
                inner = offset & mask
                if (flags & _NBD_FUA or not length or inner + length > cs
                        or offset + length > size or length >= BATCH_PIECE):
                    break
                route = routes.get(index, _UNPLANNED)
                if route is _UNPLANNED:
                    route = self._by_map(routes)[index] = cv.route(lineage, index, n, me)
                if route is None or not route[5] or stale.get(index):
                    break
                p = Piece(index, inner, length, 0)
                if flying and self._overlapped(p) is not None:
                    break
                key = route[6]
                group = groups.get(key)
                if group is None:
                    if not ready(route[2]):
                        break
                    group = groups[key] = (route, [], [])
                self._fly(p)
                group[1].append((p, route, taken))
                group[2].append(data)
                taken += 1
                if len(group[1]) >= BATCH_ITEMS:  # (sent at once: the peers start on it
                    del groups[key]  # while the rest is taken)
                    self._send_part(run, parts, group, epoch, token)
                    if self._now() >= self.lease_deadline:  # (as write() reads it, after
                        break  # the local copies just written)
        except Exception:  # (write() meets it again, from that write on, and answers it)
            log.debug("volume=%s event=run_stopped", self.name, exc_info=True)
        if taken < BATCH_MIN:  # (too few to batch apart, none sent: write() puts them off
            for _route, items, _datas in groups.values():  # with the rest)
                for item in items:
                    self._land(item[0])
            return 0
        if groups and self._now() >= self.lease_deadline:
            # the lease ran out while the run was taken (read after each full part): the
            # parts not sent yet are not sent, their writes failed as write() fails them
            try:
                self._check_writable()
            except VbpError as e:
                for group in groups.values():
                    self._send_part(run, parts, group, epoch, token, refused=e)
                return taken, parts
        for group in groups.values():
            self._send_part(run, parts, group, epoch, token)
        return taken, parts

    def _send_part(self, run: _Run, parts: list, group: tuple, epoch: int, token: int,
                   refused: VbpError | None = None) -> None:
        """Send `group` ((route, items, datas): _write_run_copies) of a run as one part of
        it, added to `parts`; counted in flight first (it may settle at once). `refused`:
        not sent, its writes failed with it."""
        route, items, datas = group
        self._inflight += len(items)
        later, outcomes = Later(), [None] * len(items)
        parts.append(([item[2] for item in items], later))
        if refused is not None:
            self._fail_run_items(outcomes, items, refused, bug=False)
            later.done(outcomes)
            return
        try:
            self._send_run_group(run, later, outcomes, route, items, datas, epoch, token)
        except Exception as e:  # (a bug: these writes fail, the others go on)
            log.exception("volume=%s event=batch_send_failed", self.name)
            self._fail_run_items(outcomes, items, e)
            later.done(outcomes)

    def _send_run_group(self, run: _Run, later: Later, outcomes: list, route: tuple,
                        items: list, datas: list, epoch: int, token: int) -> None:
        """Send the writes `items` ((piece, route, place in the run) each, `datas` their
        payloads, valid during this call only) of a run taken by write_run, to the peers
        of `route` (theirs too, in some order) as one WriteBatch, then write their local
        copies; the replies settle them (_run_replied), and `later` then completes with
        their `outcomes`. A link with no room left since the run was taken: each write
        goes by the general path at once (_replicate_later), its outcome its own Later."""
        hosts, complete, remote, names, local, _batchable, _by_address = route
        pieces = [item[0] for item in items]
        batch = m.new_write_batch(  # (its payload a copy: kept after this call)
            self.view.volume.name, self.lineage, self.gen, self.chain,
            tuple([p.index for p in pieces]), tuple([p.offset for p in pieces]),
            tuple([p.length for p in pieces]), b"".join(datas), self._cs, False, epoch, token,
            run.rids([item[2] for item in items]))
        if not self.pool.ready(remote):
            for j, p in enumerate(pieces):
                own = outcomes[j] = Later()
                own.defer(self._replicate_later(p, self._batch_item_msg(batch, j)),
                          partial(self._write_done, p))
            later.done(outcomes)
            return
        incarnation = self.pool.incarnation
        sent = {h: incarnation(h) for h in names}  # (no checkpoint since ready())
        t0 = self._now()
        if local:
            def here() -> list:
                items_here = [(p.index, p.offset, data) for p, data in zip(pieces, datas)]
                return self._write_here_items(batch, items_here,
                                              lambda k: self._batch_item_msg(batch, k))
        else:
            here = None
        self._queue_then_here(remote, batch, here, partial(
            self._run_replied, later, outcomes, items, batch, sent, t0, epoch))

    @staticmethod
    def _batch_item_msg(batch, k: int):
        """Item `k` of WriteBatch `batch` as its WriteChunk (its payload a view of the
        batch's)."""
        start = sum(batch.lengths[:k])
        rids = batch.rid.split()
        return m.new_write_chunk(
            batch.volume, batch.lineage, batch.indexes[k], batch.gen, batch.chain,
            batch.offsets[k], memoryview(batch.data)[start:start + batch.lengths[k]],
            batch.chunk_size, 0, batch.fua, batch.epoch, batch.token,
            rids[k] if k < len(rids) else "")

    def _run_replied(self, later: Later, outcomes: list, items: list, batch, sent: dict,
                     t0: float, epoch: int, here: list | None, results: list) -> None:
        """Settle the writes `items` of a run (_send_run_group), given the replies of their
        peers (a Written each, or exceptions) and `here`, the local copies' replies (None:
        no local copy): in one pass when every copy took every write cleanly, else each
        with a Later of its own (_batch_replied), its outcome; then `later` completes with
        their `outcomes`."""
        try:
            if self._settle_clean([item[0] for item in items], items[0][1][3], epoch, here,
                                  sent, results):
                return
            group = []
            for j, (p, route, _place) in enumerate(items):
                own = outcomes[j] = Later()
                group.append((self._batch_item_msg(batch, j), own, p, route[0], route[1],
                              route[3], route[2], route[4], epoch))
            self._batch_replied(group, here or [None] * len(group), sent, t0, results,
                                batched=True)
        except Exception as e:  # (a bug: the writes not yet settled fail)
            log.exception("volume=%s event=batch_reply_failed", self.name)
            self._fail_run_items(outcomes, items, e)
        finally:
            later.done(outcomes)

    def _fail_run_items(self, outcomes: list, items: list, e: Exception,
                        bug: bool = True) -> None:
        """The writes `items` of a run (`outcomes` theirs) that nothing settled fail (a bug
        met while sending or settling them; `bug` False: with `e` itself): those with no
        outcome yet, or a Later not yet handed on."""
        for j, (p, _route, _place) in enumerate(items):
            own = outcomes[j]
            if own is None or own.pending:
                if own is None:
                    own = outcomes[j] = Later()
                self._write_done(p)
                own.fail(LocalFault(f"the write could not be replicated: {e!r}") if bug else e)

    def _zero(self, offset: int, length: int, fua: bool, trim: bool = False):
        self._check_writable()
        if not length:  # nothing to zero (as a zero-length write): no lease taken for it
            return None
        if offset + length > self.size:  # (a TRIM past an export's end is EINVAL)
            return self._past_end(offset, length, PastEnd if trim else WritePastEnd,
                                  (self._zero, offset, length, fua, trim))
        if not self.token or self._hold is not None:
            return self._leased(self._zero, offset, length, fua, trim)
        pieces = list(self.geometry.pieces(offset, length))
        if not self._fua_in_task(fua) and all(self._local_only(p.index) for p in pieces):
            for p in pieces:
                self.replica.zero(self.view.volume.name, self.lineage, p.index, self.gen, self.chain_for(p.index),
                                  p.offset, p.length, self.geometry.chunk_size, 0, fua,
                                  self.cluster.epoch, self.token)
                self._note_unflushed(self.host_id, p.index)
            return None
        rid = get_rid()
        return self._general(pieces, lambda p: m.ZeroChunk(
            self.view.volume.name, self.lineage, p.index, self.gen, self.chain_for(p.index), p.offset, p.length,
            self.geometry.chunk_size, 0, fua, self.cluster.epoch, self.token, rid),
            PastEnd if trim else WritePastEnd)

    def trim(self, offset: int, length: int, fua: bool):
        return self._zeroing(offset, length, fua, True)

    def _zeroing(self, offset: int, length: int, fua: bool, trim: bool):
        if self.qos is not None and (d := self.qos.delay_for(0)):
            return self._throttled(d, self._zero, offset, length, fua, trim)
        try:
            return self._zero(offset, length, fua, trim)
        except Fenced as e:  # (as write)
            self._fence(e)
            raise

    def _past_end(self, offset: int, length: int, kind: type[PastEnd] = WritePastEnd,
                  again: tuple | None = None):
        """Refuse a request past the volume's end as this gateway adopted it (`kind`),
        raised at once, or with `again` (the request's op and its arguments) the
        coroutine of _unless_grown."""
        # the NBD codec checks the size the client connected at; a shrink since (adopted
        # by the record sync, or by a write held for it) leaves past the end chunks that
        # no reader of the volume has: a write there would be acknowledged and then lost,
        # a read would answer what is left of them (or zeros) for the discarded bytes
        exc = kind(f"{self.name}: range {offset}+{length} is past the end of the volume "
                   f"(shrunk to {self.size} bytes since this client connected)")
        if again is None or self.next_sync is None:
            raise exc
        return self._unless_grown(exc, offset + length, *again)

    async def _unless_grown(self, exc: PastEnd, end: int, op, *args):
        """`op(*args)`, a request ending at `end`, past the size this gateway adopted,
        once a read of the volume's record shows it within the volume; `exc` if
        RECHECK_SYNCS record syncs did not. Grown again since a shrink (its client
        connected at a larger size), with the grow not adopted yet, the volume takes
        the request: refused, a write `vbp volume resize` had made room for before it
        was sent would fail. (Two syncs: a gateway without the lease adopts a record at
        the first one after it published it.)"""
        if not await self._grown_maybe(end):
            raise exc
        for _ in range(RECHECK_SYNCS):
            await self.next_sync()
            if end <= self.size:  # (op checks it again, with no await in between)
                return await _called(op, *args)
        raise exc

    async def _grown_maybe(self, end: int) -> bool:
        """False when one read of the volume's record shows it ending before `end` now: a
        request that came before the read is past the end, as the volume is, with no
        record sync to wait for (each request past a shrunk end waited for two, 0.2 s
        at least). True when the record may take it (grown, a shrink still pending), or
        cannot be told here (no registry, the read failing, the volume deleted or made
        again under its name, a snapshot's view): the record syncs judge, as before."""
        if self.registry is None or self.view.read_only:
            return True
        record = await self._record_since()
        if record is None:
            return True
        rec = VolumeRecord.from_dict(record)
        return not same_volume(rec, self.view.volume) or end <= rec.size

    async def _record_since(self) -> dict | None:
        """The volume's record (None: it could not be read) as a read started after this
        call read it: what a request that came before the call may be judged by. Callers
        share reads: each waits for the first one that starts after it was called, and
        one starts at most every PAST_END_READ_GAP seconds, so requests past the end cost
        the registry a few reads a second however many there are."""
        after = self._record_read.seq if self._record_read is not None else 0
        while True:
            r = self._record_read
            if r is not None and r.seq > after:
                await r.done.wait()
                return r.record
            if r is not None and not r.done.is_set():  # (started before this call: its
                await r.done.wait()  # answer may be older than the request)
                continue
            if r is not None and (wait := r.started + PAST_END_READ_GAP - trio.current_time()) > 0:
                await trio.sleep(wait)
                continue
            r = self._record_read = _RecordRead(r.seq + 1 if r is not None else 1,
                                                trio.current_time())
            try:
                r.record = await self.registry.get_volume(self.view.volume.name)
            except VbpError:
                pass
            finally:  # (cancelled: those sharing it get None, and wait for record syncs)
                r.done.set()
            return r.record

    def _pieces_end(self, pieces) -> tuple[int, int]:
        """(start, length) of the range of `pieces` (in order, from one request)."""
        first, last = pieces[0], pieces[-1]
        return (first.index << self._shift) + first.offset, last.buf_offset + last.length

    def _check_pieces_in(self, pieces, kind: type[PastEnd]) -> None:
        """_past_end (`kind`) unless the range of `pieces` ends within the volume's size
        as adopted now."""
        start, length = self._pieces_end(pieces)
        if start + length > self.size:
            self._past_end(start, length, kind)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool):
        if may_trim:
            # Zeroing is fast here: whole pages become holes, no data is written.
            return self._zeroing(offset, length, fua, False)
        # NBD_CMD_FLAG_NO_HOLE: the area must be fully provisioned, so that later writes
        # there cannot fail for want of space (proto.md, NBD_CMD_WRITE_ZEROES). A zeroed
        # page is a hole in its chunk's data file, taking no disk space: the zeros are
        # written as data instead, a write like any other, and so not fast (a client
        # asking for a fast zero is told so at once, changing nothing).
        if fast:
            if self.read_only:
                self._check_writable()
            raise OSError(errno.ENOTSUP, "zeroing without holes is no faster than writing")
        if offset + length > self.size:
            # refused whole, as a WRITE of the range: its steps would zero what is below
            # the end before the one past it is refused
            self._check_writable()
            return self._past_end(offset, length, WritePastEnd,
                                  (self.write_zeroes, offset, length, fua, False, False))
        if length <= ZEROS_STEP - offset % ZEROS_STEP:
            return self.write(offset, _ZEROS[:length], fua)
        return self._write_zeros(offset, length, fua)

    async def _write_zeros(self, offset: int, length: int, fua: bool) -> None:
        """write_zeroes with NO_HOLE over more than one ZEROS_STEP: its steps one after
        the other (a request may be as large as 4 GiB; no buffer of that many zeros).
        A step that answers at once (a copy here only) yields to the loop all the same:
        768 MiB of them held every other client of the host for half a second."""
        end = offset + length
        while offset < end:
            n = min(ZEROS_STEP - offset % ZEROS_STEP, end - offset)
            if await _called(self.write, offset, _ZEROS[:n], fua) is None:
                await trio.lowlevel.checkpoint()
            offset += n

    def _general(self, pieces, make_msg, past_end: type[PastEnd] = WritePastEnd):
        """_replicate, its pieces noted in flight now, in the order the writes came, not
        when the server's task for it runs (_flying). Whoever gets the coroutine runs it
        (the NBD server starts a task at once; a task cancelled before its first step
        still runs it into the cancellation): its end is what lets later writes go on."""
        for p in pieces:
            self._fly(p)
        return self._replicate(pieces, make_msg, past_end)

    async def _replicate(self, pieces, make_msg, past_end: type[PastEnd] = WritePastEnd):
        try:
            await self._after_overlapped(pieces)
            await self._replicate_held(pieces, make_msg, past_end)
        finally:
            self._land_all(pieces)

    async def _replicate_held(self, pieces, make_msg, past_end: type[PastEnd] = WritePastEnd):
        # (a task the NBD server starts after the write came: a snapshot may have begun
        # switching the head meanwhile, without this write in flight to wait for; it
        # goes to the new head, as any write that comes during the switch)
        syncs = 0
        while True:
            while self._hold is not None:
                await self._hold.wait()
            # The switch may have given up (a snapshot's completion past the lease:
            # fenced, the old head perhaps the snapshot's already), or the lease run out
            # meanwhile: sent now, with the old token to the old head, the replicas may
            # take it.
            self._check_writable()
            start, length = self._pieces_end(pieces)
            if start + length <= self.size or syncs == RECHECK_SYNCS or self.next_sync is None:
                break
            # past the end as adopted now: grown again since, perhaps (_unless_grown)
            await self.next_sync()
            syncs += 1
        # A shrink may have completed since the write came (it waited for the hold, or
        # behind an overlapping write): past the new end, acknowledged into the new head
        # it would be lost (no reader has the chunk). (A TRIM: EINVAL.)
        self._check_pieces_in(pieces, past_end)
        self._inflight += 1
        try:
            # Once sent, a write is settled even if its client goes away (the connection's
            # tasks cancelled): a copy that failed it is recorded stale, or the copies
            # would disagree with no record of it. Peer requests and registry calls are
            # bounded in time, so this is too.
            with trio.CancelScope(shield=True):
                if len(pieces) == 1:
                    await self._replicate_piece(pieces[0], make_msg(pieces[0]))
                    return
                errors: list[VbpError] = []

                async def piece(p) -> None:
                    try:
                        await self._replicate_piece(p, make_msg(p))
                    except VbpError as e:  # collected: the client gets one plain error
                        errors.append(e)

                async with trio.open_nursery() as nursery:
                    for p in pieces:
                        nursery.start_soon(piece, p)
                if errors:
                    raise min(errors, key=_error_rank)
        finally:
            self._write_done()

    async def _replicate_piece(self, p, msg) -> None:
        cv = self.cluster
        if self.refresh_map is not None:
            have = len(cv.replicas(self.lineage, p.index, self.n))
            if have < self.min_size:
                # this write cannot succeed on the map we hold: it may be stale (hosts that
                # joined the data set since our last refresh, e.g. just after the pool
                # started)
                await self.refresh_map()
            elif have < self.n and (now := trio.current_time()) >= self._short_refresh_at:
                # the map offers fewer copies than the volume wants: hosts that joined may
                # be missing from it, and one more failure would leave the write below
                # min_size on a map that a registry read would have completed (a gateway
                # that started just before the last hosts registered). Asked at most once
                # a second: a pool that really has too few hosts keeps its map.
                self._short_refresh_at = now + SHORT_MAP_REFRESH
                await self.refresh_map()
        hosts = cv.write_set(self.lineage, p.index, self.n)
        complete = cv.replicas(self.lineage, p.index, self.n)
        epoch = cv.epoch  # the map `hosts` came from: _settle sees if another came since
        if len(hosts) > len(complete) and (self.lineage, p.index) not in cv.joining_marked:
            # A joining target holds only what reached it directly until it resyncs: it is
            # recorded stale before its first write, so no chunk written during the change
            # of data set escapes the resync (the scan covers the chunks that existed).
            # Once per chunk and change: the record is the chunk's, whichever volume of the
            # lineage writes it.
            marked = cv.joining_marked  # (this change's: set_map replaces it on the next)
            new = cv.joining_to_mark(self.lineage, p.index, self.n)
            if new:
                await self._mark_stale(p.index, new)
            marked.add((self.lineage, p.index))
        failed: dict[str, Exception] = {}
        if log.isEnabledFor(logging.DEBUG):
            log.debug("volume=%s chunk=%d event=replicate op=%s hosts=%s", self.name, p.index,
                      type(msg).__name__, ",".join(hosts))
        behind: set[str] = set(self.stale.get(p.index, ()))  # copies that missed writes
        sent: dict[str, int] = {}
        t0 = self._now()
        replies = await self._send_all(hosts, msg, failed, sent, t0)
        await self._settle(p, hosts, complete, behind, epoch, replies, failed, sent, t0)

    def _replicate_now(self, p, msg) -> Later | None:
        """_replicate_piece for the common case, with no task: a chunk whose replicas are
        all current and reachable over ready connections, no data-set change under way.
        The frames are queued (sent at once when the link is idle), then the local copy is
        written while the peers work on theirs, and the Later is completed by the callback
        that sees the last reply; anything but a clean success on every copy continues as
        _replicate_piece would (`_settle`, in a task). None when the case does not apply:
        the caller takes _replicate."""
        if (self._hold is not None or self._fua_in_task(msg.fua)
                or self._flying and self._overlapped(p) is not None):
            return None
        cv = self.cluster
        index = p.index
        route = self._routes.get(index, _UNPLANNED)
        if route is _UNPLANNED or cv.map is not self._local_map:
            route = self._by_map(self._routes)[index] = cv.route(self.lineage, index, self.n,
                                                                self.host_id)
        if route is None or self.stale.get(index):
            return None
        hosts, complete, remote, names, local, batchable, by_address = route
        ready = getattr(self.pool, "ready", None)
        if ready is None or not ready(remote):
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("volume=%s chunk=%d event=replicate op=%s hosts=%s", self.name, index,
                      type(msg).__name__, ",".join(hosts))
        batch = self._batch
        if (batch is not None and batchable and type(msg) is m.WriteChunk
                and len(msg.data) < BATCH_PIECE and not msg.fua):
            return self._put_off(batch, p, msg, hosts, complete, remote, names, local,
                                 by_address)
        later = Later()
        epoch = cv.epoch
        incarnation = self.pool.incarnation
        sent = {h: incarnation(h) for h in names}  # (ready: connected, no checkpoint)
        t0 = self._now()
        self._inflight += 1
        self._fly(p)

        early: list | None = [] if local else None  # replies back before the local write
        mine = None  # the local copy's reply or failure

        def on_replies(results: list) -> None:
            if early is not None:
                early.append(results)
            else:
                self._replied(later, p, msg, hosts, complete, epoch, names, sent, t0, results,
                              mine)

        try:
            self.pool.queue_all(remote, msg, on_replies, checked=True)  # (ready)
        except BaseException:  # (a message the codec refused: a bug; not in flight, so a
            self._write_done(p)  # snapshot's drain does not wait for it forever)
            raise
        if local:  # after the frames: the peers start on them while this copy is written
            mine = self._write_here(msg)
            got, early = early, None
            if got:  # (a pool that called back at once: peers refused before sending)
                on_replies(got[0])
        return later

    def _fua_in_task(self, fua: bool) -> bool:
        """Whether a write goes by the general path for its FUA flag: with much to write
        back (ChunkStore.writeback_due), this host's copy answers with an awaitable, its
        writeback in a worker thread (Replica.handle, which decides the same on the same
        store with no checkpoint between), and only a task can await it beside the peers."""
        return fua and self.store.writeback_due()

    def _write_here(self, msg, later_ok: bool = False):
        """This host's copy of a replicated write: its reply, or its failure as a value
        (the other copies are under way: the write goes on without this one). A FUA
        write's reply may be an awaitable (Replica.handle: its writeback in a worker
        thread), for a caller that awaits it (`later_ok`: _send_all); the task-less paths
        take a FUA write only while the store has little to write back, and should one
        come back anyway, this copy counts as failed (recorded stale), never as synced."""
        try:
            reply = self.replica.handle(msg)
        except VbpError as e:
            return e
        except Exception as e:
            self._loglimit.log(log, logging.ERROR, ("local_write_failed", failure_kind(e)),
                               "volume=%s chunk=%d event=local_write_failed", self.name, msg.index,
                               exc_info=True)
            return LocalFault(f"the local write failed: {e!r}")
        if not later_ok and hasattr(reply, "__await__"):
            reply.close()
            return LocalFault("the local FUA write's sync could not be awaited here")
        return reply

    def _replied(self, later: Later, p, msg, hosts, complete, epoch: int, names: list,
                 sent: dict, t0: float, got: list, mine) -> None:
        """Settle a write sent without a task (_replicate_now, _send_group): `got` holds
        the replies of the remote `names` in order (or their failures), `mine` the local
        copy's (None: no local copy). A write every copy of which took it cleanly is
        answered here; any other goes on as the full path would (`_settle_later`, in a
        task; if nothing will ever run it, the connection being gone, `_abandoned`
        keeps its failures for the service and ends the write's in-flight count)."""
        # (sent with every copy current: a copy named stale now was marked meanwhile, and
        # _settle must not count it)
        clean = self.cluster.epoch == epoch and not (self.stale and self.stale.get(p.index))
        if clean:
            for r in got if mine is None else (*got, mine):
                if isinstance(r, Exception) or getattr(r, "stale", False):
                    clean = False
                    break
        if clean:
            index = p.index
            for h in names:
                self._note_unflushed(h, index, sent[h])
            if mine is not None:
                self._note_unflushed(self.host_id, index)
            self._write_done(p)
            later.done(None)
            return
        replies: dict = {}
        failed: dict[str, Exception] = {}
        pairs = zip(names, got)
        for h, r in pairs if mine is None else (*pairs, (self.host_id, mine)):
            if isinstance(r, Exception):
                failed[h] = r
            else:
                replies[h] = r
        later.defer(self._settle_later(p, msg, hosts, complete, epoch, replies, failed, sent,
                                       t0),
                    partial(self._abandoned, p, complete, replies, failed))

    def begin_writes(self, count: int) -> None:
        """The NBD server is about to dispatch a run of `count` writes: if there are at
        least BATCH_MIN, _replicate_now puts off the small ones and end_writes sends them
        as one WriteBatch per group of writes with the same replicas (and chain, FUA,
        epoch, token), then writes the local copies. Per write that saves the framing,
        the request id and the reply of one peer message per replica: the encoding, the
        decoding and the bookkeeping of each, on both sides, which cost more than the
        write itself on a 4 KiB write."""
        if count >= BATCH_MIN and self._batch is None:
            self._batch = {}

    def end_writes(self) -> None:
        """Send what begin_writes gathered (see there)."""
        batch, self._batch = self._batch, None
        if batch:
            for group in batch.values():
                self._send_batch(group)

    def _send_batch(self, group: list) -> None:
        """_send_group, and if it raises (a bug), each write of `group` it left
        unanswered fails rather than waiting forever (a snapshot waits for them all)."""
        try:
            self._send_group(group)
        except Exception as e:
            log.exception("volume=%s event=batch_send_failed", self.name)
            for w in group:
                if w[1].pending:
                    self._write_done(w[2])
                    w[1].fail(LocalFault(f"the write could not be sent: {e!r}"))

    def _put_off(self, batch: dict, p, msg, hosts, complete, remote: tuple, names: list,
                 local: bool, by_address: tuple) -> Later:
        """_replicate_now's write, put off until end_writes (or until its group is full).
        `by_address`: `remote` sorted, the same for every write to the same hosts."""
        key = (by_address, msg.chain, msg.fua, msg.epoch, msg.token)
        group = batch.get(key)
        if group is None:
            group = batch[key] = []
        later = Later()
        self._inflight += 1
        self._fly(p)
        group.append((msg, later, p, hosts, complete, names, remote, local, self.cluster.epoch))
        if len(group) >= BATCH_ITEMS:  # (a long run goes out in parts: the peers start on
            del batch[key]  # the first while this side goes on)
            self._send_batch(group)
        return later

    def _send_group(self, group: list) -> None:
        """Send `group`'s writes (_put_off's tuples: the same remote hosts, each write in
        the order of its own replica set) as one WriteBatch, a group of one as its
        WriteChunk, then write their local copies; the replies settle each write as
        _replicate_now's callback would have (_batch_replied)."""
        order = group[0][6]
        if not self.pool.ready(order):
            # room ran out on a link since the writes were put off (its limit of requests
            # in flight), or a connection was lost: each write takes the general path,
            # which waits for room, rather than fail on a healthy replica
            for msg, later, p, *_ in group:
                later.defer(self._replicate_later(p, msg), partial(self._write_done, p))
            return
        incarnation = self.pool.incarnation
        sent = {h: incarnation(h) for h in group[0][5]}  # (no checkpoint since ready())
        t0 = self._now()
        msg = group[0][0] if len(group) == 1 else self._batch_of(group)
        self._queue_then_here(order, msg, partial(self._write_here_all, group),
                              lambda here, results: self._batch_replied(group, here, sent, t0,
                                                                        results))

    def _queue_then_here(self, order: tuple, msg, here, settle) -> None:
        """Queue `msg` to the peers `order` (ready, with no checkpoint since), then write
        the local copies while the peers work on theirs (`here()`, their replies; None:
        no local copy), then `settle(here's replies or None, the peers' replies in order)`
        once the last reply is in; a pool that called back before the local copies were
        written is answered after them. Raises nothing once it queued, `here()` raising
        nothing (_write_here_items): `settle` is called exactly once (a message the codec
        refused, a bug, fails on every peer)."""
        early: list = []  # replies the pool gave before the local copies were written
        then: list = []  # what takes them after

        def on_replies(results: list) -> None:
            if then:
                then[0](results)
            else:
                early.append(results)

        try:
            self.pool.queue_all(order, msg, on_replies, checked=True, at_once=True)  # (ready)
        except Exception as e:  # (a message the codec refused: a bug; fail these writes)
            log.exception("volume=%s event=batch_send_failed", self.name)
            early[:] = [[PeerUnavailable(f"sending to {a} failed: {e!r}") for a in order]]
        mine = None if here is None else here()
        then.append(lambda results: settle(mine, results))
        if early:
            then[0](early[0])

    def _write_here_all(self, group: list) -> list:
        """The local copies' replies of `group` (_send_group): _write_here of each write
        that has one (None for one that has not). When all have one and none is FUA,
        they are one call of the replica (Replica.write_items: a group shares volume,
        lineage, generation, chain, epoch and token), each answered Ok, or Ok(stale) on
        a stale copy, as Replica.handle would; a write that fails there is redone by
        _write_here for its reply (its refusal logged as before), and those after it go
        on the same way. (Per write, one replica call instead of about ten at 4K.)"""
        first = group[0][0]
        if first.fua or not all(w[7] for w in group) or _replica_log.isEnabledFor(logging.DEBUG):
            return [self._write_here(w[0]) if w[7] else None for w in group]
        return self._write_here_items(first, [(w[0].index, w[0].offset, w[0].data) for w in group],
                                      lambda k: group[k][0])

    def _write_here_items(self, first, items: list, msg_of) -> list:
        """The local copies' replies of the writes `items` ((index, offset in the chunk,
        data) each), which share the volume, lineage, generation, chain, chunk size, epoch
        and token of message `first`, with no FUA: one call of the replica
        (Replica.write_items), each answered Ok, or Ok(stale) on a stale copy, as
        Replica.handle would; a write that fails there is redone by _write_here with its
        message (`msg_of(k)` for item k) for its reply, its refusal logged as before, and
        those after it go on the same way. Raises nothing (its callers have queued the
        writes to the peers already): should anything else fail (a bug), the copies not
        answered yet count as failed, recorded stale as any failed copy, and the writes
        stand or fall on the others."""
        replica = self.replica
        lineage = first.lineage
        here: list = []
        k = 0
        try:
            while k < len(items):
                rest = items[k:] if k else items
                try:
                    done = replica.write_items(first.volume, lineage, first.gen, first.chain,
                                               first.chunk_size, False, first.epoch,
                                               first.token, rest)
                except Exception as e:  # (_write_here redoes it, for its reply)
                    done = getattr(e, "batch_item", 0)
                for item in rest[:done]:
                    here.append(_OK_STALE if replica.is_stale(lineage, item[0]) else _OK)
                k += done
                if k < len(items):
                    here.append(self._write_here(msg_of(k)))
                    k += 1
        except Exception as e:
            log.exception("volume=%s event=local_batch_failed", self.name)
            here += [LocalFault(f"the local write failed: {e!r}")] * (len(items) - len(here))
        return here

    async def _replicate_later(self, p, msg) -> None:
        """A put-off write that could not go in its batch, by the general path."""
        current_rid.set(msg.rid)  # this task's own context: its log lines carry the id
        try:
            with trio.CancelScope(shield=True):  # (as _replicate: settled, client or not)
                await self._replicate_piece(p, msg)
        finally:
            self._write_done(p)

    @staticmethod
    def _batch_of(group: list) -> m.WriteBatch:
        """The WriteBatch of `group`'s writes (_send_batch)."""
        first = group[0][0]
        return m.new_write_batch(
            first.volume, first.lineage, first.gen, first.chain,
            tuple([w[0].index for w in group]), tuple([w[0].offset for w in group]),
            tuple([len(w[0].data) for w in group]), b"".join([w[0].data for w in group]),
            first.chunk_size, first.fua, first.epoch, first.token,
            " ".join([w[0].rid for w in group]))

    def _batch_replied(self, group: list, here: list, sent: dict, t0: float,
                       results: list, batched: bool | None = None) -> None:
        """Settle each write of a group sent by _send_group (`_replied`), given the replies
        of the group's peers (Written, Ok for a group of one, or exceptions) in the
        group's order, and `here`, the local copies' replies. `batched`: the group went
        as a WriteBatch (by default, when it has more than one write)."""
        if batched is None:
            batched = len(group) > 1
        if batched and self._all_clean(group, here, sent, results):
            return
        order = group[0][6]
        by_address = None
        for k, (msg, later, p, hosts, complete, names, remote, local, epoch) in enumerate(group):
            try:
                if remote == order:
                    got = results
                else:
                    if by_address is None:
                        by_address = dict(zip(order, results))
                    got = [by_address[a] for a in remote]
                if batched:  # a Written stands for an Ok per item
                    got = [r if isinstance(r, Exception)
                           else _OK_STALE if r.stale and k in r.stale else _OK for r in got]
            except Exception as e:  # (a bug: this write fails, the others go on)
                log.exception("volume=%s event=batch_reply_failed", self.name)
                self._write_done(p)
                later.fail(LocalFault(f"the write's replies could not be read: {e!r}"))
                continue
            self._replied(later, p, msg, hosts, complete, epoch, names, sent, t0, got, here[k])

    def _all_clean(self, group: list, here: list, sent: dict, results: list) -> bool:
        """_batch_replied's common case, settled in one pass (_settle_clean), each write
        answered as _replied would answer it. False, with nothing done, in any other
        case."""
        epoch = group[0][8]
        for w in group:
            if w[8] != epoch:
                return False
        if not self._settle_clean([w[2] for w in group], group[0][5], epoch, here, sent,
                                  results):
            return False
        for w in group:
            w[1].done(None)
        return True

    def _settle_clean(self, pieces: list, names: tuple, epoch: int, here: list | None,
                      sent: dict, results: list) -> bool:
        """The writes of `pieces`, sent as one WriteBatch to the hosts `names` while the
        epoch was `epoch`, are over if every peer wrote every one (a Written with
        nothing stale: `results`), every local copy too (`here`: None for none, else a
        reply or failure each, None for a write with no local copy), and the epoch is
        the same: their chunks' unflushed notes are taken once per host, and each write
        is done (_write_done). True then; False, with nothing done, in any other case:
        also when the map names a copy of one of their chunks stale now (sent with every
        copy current, so marked meanwhile: _settle does not count it)."""
        if self.cluster.epoch != epoch:
            return False
        stale = self.stale
        if stale:
            for p in pieces:
                if stale.get(p.index):
                    return False
        for r in results:
            if type(r) is not m.Written or r.stale:
                return False
        local = None
        if here is not None:
            for mine in here:
                if mine is not None and (type(mine) is not m.Ok or mine.stale):
                    return False
            local = [p.index for p, mine in zip(pieces, here) if mine is not None]
        indexes = {p.index for p in pieces}
        for h in names:  # (every write of a group goes to the same other hosts)
            self._note_all_unflushed(h, indexes, sent[h])
        if local:
            self._note_all_unflushed(self.host_id, local, None)
        for p in pieces:
            self._write_done(p)
        return True

    def _ready_peers(self, hosts) -> tuple[str, ...] | None:
        """The addresses of `hosts` other than this one, in order, when PeerPool.queue_all
        can send to every one of them now (each up, its connection ready, no decoder that
        predates request ids); else None, and the caller takes its general path."""
        ready = getattr(self.pool, "ready", None)
        if ready is None:
            return None
        remote = self.cluster.peer_addresses(hosts, self.host_id)
        return remote if remote is not None and ready(remote) else None

    def _write_done(self, p=None) -> None:
        """A replicated write is over (`p`: its piece, noted in flight by _fly)."""
        self._inflight -= 1
        if not self._inflight and self._drained is not None:
            self._drained.set()
            self._drained = None  # (its waiters hold it; a later drain makes its own)
        if p is not None:
            self._land(p)

    # --- overlapping writes in flight (_flying) ----------------------------------------

    def _overlapped(self, p):
        """The first replicated write in flight, noted before piece `p` (all of them if
        `p` is not noted), that has bytes in common with it; else None."""
        start, end = p.offset, p.offset + p.length
        for q in self._flying.get(p.index, ()):
            if q is p:
                return None
            if q.offset < end and start < q.offset + q.length:
                return q
        return None

    def _fly(self, p) -> None:
        flying = self._flying.get(p.index)
        if flying is None:
            self._flying[p.index] = [p]
        else:
            flying.append(p)

    def _land(self, p) -> None:
        """Piece `p`'s write is settled: the writes that wait for it go on."""
        flying = self._flying.get(p.index)
        if flying is not None:
            for i, q in enumerate(flying):
                if q is p:  # (by identity: two writes of the same bytes are equal pieces)
                    del flying[i]
                    break
            if not flying:
                del self._flying[p.index]
        if self._landed:
            event = self._landed.pop(id(p), None)
            if event is not None:
                event.set()

    def _land_all(self, pieces) -> None:
        for p in pieces:
            self._land(p)

    async def _after_overlapped(self, pieces) -> None:
        """Wait until no write noted in flight before these pieces (_fly) overlaps them."""
        for p in pieces:
            while (earlier := self._overlapped(p)) is not None:
                event = self._landed.get(id(earlier))
                if event is None:
                    event = self._landed[id(earlier)] = trio.Event()
                await event.wait()

    async def _settle_later(self, p, msg, hosts, complete, epoch, replies, failed, sent,
                            t0: float) -> None:
        """The rest of a _replicate_now write that did not succeed cleanly everywhere."""
        current_rid.set(msg.rid)  # this task's own context: its log lines carry the id
        try:
            for h, e in failed.items():
                if not isinstance(e, VbpError):
                    raise e
            with trio.CancelScope(shield=True):  # (as _replicate: settled, client or not)
                await self._retry_stale_epoch(msg, replies, failed, t0)
                await self._settle(p, hosts, complete, set(), epoch, replies, failed, sent, t0)
        finally:
            self._write_done(p)

    def _abandoned(self, p, complete, replies: dict, failed: dict) -> None:
        """The rest of a _replicate_now write that did not succeed everywhere will never
        run: its client's connection is gone. The copies that failed it are stale for
        this gateway at once and wait in `unrecorded` for the service to record them (it
        does when the volume's last connection closes), as a failure the registry could
        not be told of; else the copies would disagree with no record of it."""
        index = p.index
        try:
            missed = tuple(sorted(failed))
            if missed:
                took = tuple(h for h in complete if h in replies)
                self.stale[index] = self.stale.get(index, frozenset()) | frozenset(missed)
                self.unrecorded.append((index, took, missed))
                self._loglimit.log(log, _WARNING, "abandoned_write_failed",
                                   "volume=%s chunk=%d event=abandoned_write_failed hosts=%s",
                                   self.name, index, ",".join(missed))
        finally:
            self._write_done(p)

    async def _settle(self, p, hosts, complete, behind: set, epoch: int, replies: dict,
                      failed: dict, sent: dict[str, int], t0: float) -> None:
        """Account for one piece's replies: what took it, what is behind, whether the write
        stands (min_size), what to record stale. Raises when it is not acknowledged.
        `sent`: PeerPool.incarnation of each remote host when the write left; a host
        missing from it had no connection then (_send_all). `t0`: when it left.

        A failure's stale marks must reach the registry within `write_window` of the
        write leaving: resync and scrub count on it. A resync leaves a page that a write
        reached less than that long ago (a copy that failed the write may look current
        until its mark lands, and its older bytes must not be copied over the write),
        and scrub looks again that long after finding copies that disagree, to leave out
        those recorded stale meanwhile (else the copies that missed a write could outvote
        those that took it). A write whose marks took longer is not acknowledged: the
        client gets EIO, as when the registry cannot be told at all."""
        cv = self.cluster
        if cv.epoch != epoch:
            # A StaleEpoch answer refreshed the map while the write was sent: hosts that
            # became copies of the chunk meanwhile did not get it. They count as failed
            # (recorded stale below), never silently behind.
            now = cv.write_set(self.lineage, p.index, self.n)
            for h in now:
                if h not in hosts and h not in failed:
                    failed[h] = PeerUnavailable(
                        f"host {h} became a copy of chunk {p.index} while the write was sent")
            hosts = now
            complete = cv.replicas(self.lineage, p.index, self.n)
        # copies recorded stale while the write was out (another write's failure, a
        # refresh from the registry: _mark_stale and adopt_stale change the map at once)
        # hold no complete copy either, though they took this write cleanly
        now_stale = self.stale.get(p.index)
        if now_stale:
            behind |= now_stale
        reported = set()  # copies that say they are stale: their own word, not our map's
        for h, reply in replies.items():
            if h == self.host_id:
                self._note_unflushed(h, p.index)
            else:
                self._note_unflushed(h, p.index, self._sent_to(sent, h))
            if getattr(reply, "stale", False):
                reported.add(h)
        behind |= reported
        for e in failed.values():
            if isinstance(e, Fenced):
                # the replicas that took this write hold bytes from a gateway that lost its
                # lease: their copies of the chunk are suspect until resynced
                self._suspect(p.index, [h for h in hosts if h not in failed])
                self._fence(e)
                raise e
        if behind - set(self.stale.get(p.index, ())):
            self.stale[p.index] = self.stale.get(p.index, frozenset()) | frozenset(behind)
        # Only current copies count: a stale copy that took this write may miss an earlier
        # acknowledged one, so it holds no complete copy of the chunk. Joining targets are
        # not full copies either.
        took = [h for h in complete if h not in failed and h not in behind]
        # (min_size 1) the one copy left current by a copy's new failure, and the process
        # of it that took the write: it syncs once the failure is recorded
        took, sole, kept_by = await self._sole_left(p.index, took, complete, behind, failed,
                                                    sent)
        # with min_size 1 a write no copy took also asks: _falling_behind must know which
        # of the copies that failed it are current, and our map may still count one that
        # a resync just cleared behind
        if len(took) < self.min_size and any(
                h in behind and h not in reported and (h not in failed or self.min_size == 1)
                for h in complete):
            behind = await self._behind_by_registry(p.index, reported)
            took = [h for h in complete if h not in failed and h not in behind]
            took, sole, kept_by = await self._sole_left(p.index, took, complete, behind,
                                                        failed, sent)
        ok = len(took)
        if failed:
            if log.isEnabledFor(_WARNING):
                self._loglimit.log(log, _WARNING, "replica_failed",
                                   "volume=%s chunk=%d event=replica_failed hosts=%s", self.name,
                                   p.index,
                                   ",".join(f"{h}:{type(e).__name__}" for h, e in failed.items()))
            if self.metrics is not None:
                for h, e in failed.items():
                    self.metrics.replica_error(h, _error_kind(e))
            marks = self._falling_behind(failed, took, complete, behind, cv.is_up,
                                         self.min_size)
            # When a copy that could be a resync source (current, by our map) failed, the
            # copies that took the write without counting (behind, joining) are marked
            # again with the failed ones, in the same registry transaction: a resync of
            # theirs that used the failed copy as its source, its mark not seen yet, and
            # copied its older bytes over this write, cannot clear at the version it read
            # (or is undone at once if it cleared first). Not for a failure of a copy
            # known behind (a host down for long): re-marked at each such write, the
            # others' resyncs would never end while the guest writes the chunk.
            if any(h in complete and h not in behind for h in failed):
                marks += [h for h in hosts
                          if h in replies and h not in took and h not in marks]
            try:
                recorded = await self._mark_stale(p.index, marks, hosts)
            except Fenced:
                # the lease went to another gateway while this write was out (a stall
                # past it): as for a Fenced reply above, the copies that took it hold
                # bytes the new holder never saw
                self._suspect(p.index, [h for h in hosts if h not in failed])
                raise
            late = recorded and self._now() - t0 > self.write_window
            if recorded and ok >= self.min_size:
                ok = len(await self._current_after_failure(p.index, took))
            if recorded and ok >= self.min_size and len(hosts) > len(complete):
                ok = await self._still_counted(p.index, took, hosts, replies, failed, behind)
            if recorded and ok >= self.min_size and sole is not None:
                if not await self._synced_sole(sole, kept_by):
                    ok = 0
        else:
            recorded, late = True, False
        if ok < self.min_size:
            full = [e for e in failed.values() if isinstance(e, NoSpace)]
            if full:
                raise NoSpace(f"chunk {p.index} of {self.name}: {full[0]}")
            raise BelowMinSize(
                f"chunk {p.index} of {self.name}: {ok} of {len(complete)} replicas took the write, "
                f"min_size is {self.min_size}"
            )
        if not recorded:
            raise RegistryUnavailable(
                f"chunk {p.index} of {self.name}: replica failures on {','.join(sorted(failed))} "
                f"could not be recorded (registry unreachable): the write is not acknowledged")
        if late:
            self._loglimit.log(log, _WARNING, "stale_recorded_too_late",
                               "volume=%s chunk=%d event=stale_recorded_too_late hosts=%s "
                               "seconds=%.1f", self.name, p.index, ",".join(sorted(failed)),
                               trio.current_time() - t0)
            raise RegistryUnavailable(
                f"chunk {p.index} of {self.name}: replica failures on {','.join(sorted(failed))} "
                f"were recorded more than {self.write_window:g} s after the write was sent "
                f"(registry slow): the write is not acknowledged")

    @property
    def write_window(self) -> float:
        """How long after a write leaves its failures' stale marks must have landed
        (_settle): the peers' request timeout and WRITE_GRACE. blockd gives resync the
        same window and scrub the same settling time."""
        return self.pool.request_timeout + WRITE_GRACE

    def _sent_to(self, sent: dict[str, int], host: str) -> int:
        """The PeerPool.incarnation of remote `host` a write went to (_settle's `sent`).
        With no connection when the write left, the reply came over the one opened for it,
        still the newest: no restart can complete in between."""
        b = sent.get(host)
        return self.pool.incarnation(host) if b is None else b

    async def _sole_left(self, index: int, took: list, complete, behind, failed: dict,
                         sent: dict) -> tuple[list, str | None, int]:
        """(took, sole, its incarnation): with min_size 1, when a current copy failed the
        write and one copy alone took it (maybe long before: the failure may be a
        timeout), that copy must still answer (_still_answering), or it counts as failed
        and the write as taken by none (took empty); one that does is `sole`, to sync once
        the failure is recorded (_synced_sole). Otherwise sole is None."""
        if not (len(took) == 1 == self.min_size
                and any(h in complete and h not in behind for h in failed)):
            return took, None, 0
        h = took[0]
        incarnation = self._sent_to(sent, h)
        if h != self.host_id and not await self._still_answering(h, incarnation):
            failed[h] = PeerUnavailable(
                f"host {h} took the write to chunk {index} of {self.name} but no longer "
                f"answers: it may have lost it")
            return [], None, 0
        return took, h, incarnation

    async def _synced_sole(self, host: str, incarnation: int) -> bool:
        """Whether `host`, the one copy left current (min_size 1) by a failure just
        recorded, synced its store since, from the process that took the writes
        (`incarnation`). Asked after the record, before the write (or the flush) it
        decides is acknowledged. Every write acknowledged before the record (this
        volume's, and other volumes' of the lineage) is then durable there, so a power
        loss of it later loses only what it took alone since: it wins the election of a
        chunk whose copies are all stale over the copy just recorded, whatever it lost
        (replicator.loss.last_current; see _still_answering). A copy that does not sync
        counts as one that did not take the write. Fenced is raised."""
        msg = m.Flush(self.view.volume.name, self.cluster.epoch, self.token, get_rid())
        try:
            await self._send(host, msg)
        except Fenced:
            raise
        except VbpError as e:
            self._loglimit.log(log, _WARNING, "sole_sync_failed",
                               "volume=%s event=sole_sync_failed host=%s error=%s", self.name,
                               host, e)
            return False
        if host != self.host_id and self.pool.incarnation(host) != incarnation:
            self._loglimit.log(log, _WARNING, "sole_sync_failed",
                               "volume=%s event=sole_sync_failed host=%s error=restarted",
                               self.name, host)
            return False
        self._loglimit.log(log, _INFO, "sole_synced", "volume=%s event=sole_synced host=%s",
                           self.name, host)
        return True

    async def _still_answering(self, host: str, incarnation: int) -> bool:
        """Whether `host`, the one copy that took a write (or a flush) another current copy
        failed, still answers from the process that took it (`incarnation`), asked before
        the failure is recorded. With min_size 1 the copy that failed is recorded stale on
        that one copy's word, and the failure may be a timeout, learned a request timeout
        after the copy's answer. Had the copy lost power meanwhile (unnoticed: its host
        still up in the map), its crash recovery would record it stale, flagged and newer
        than the record made now, and the election of a chunk whose copies are all stale
        (replicator.loss.last_current) takes a flagged copy over a whole one once min_size
        records are newer than the whole one's: one, at min_size 1. The acknowledged
        writes it lost (another volume's of the lineage, say) and the other copy held
        would be lost on both (the simulation's seed 853 of the crash faults, a flush).
        Given the whole request timeout: a copy taken for gone on a short one would leave
        the chunk with no current copy, until the host that failed is back. (A write whose
        marks land past its window is not acknowledged, its marks stand.)"""
        try:
            await self.pool.call(self.cluster.address(host), m.Ping(self.cluster.epoch))
        except VbpError:
            return False
        return self.pool.incarnation(host) == incarnation

    async def _behind_by_registry(self, index: int, reported: set) -> set:
        """The copies of the chunk behind, by the registry's stale records read now rather
        than by our map of them, which lags a resync's clearing by up to a refresh period:
        a copy just resynced (a joining target of a data-set change that has settled, say)
        still counts behind there, and one more failure would leave the write below
        min_size with enough current copies holding it. Asked only when our map says the
        write falls short. Behind whatever the registry says: copies that said they are
        stale (a host that lost its store knows before the registry does), copies our own
        failures named that the registry has not been told of (`unrecorded`), and copies
        whose marks are under way (`_marking`, before the read or after it: the read may
        not show them). Our map loses only the hosts it named before the read that none of
        these name; what other writes added meanwhile stays. If the registry cannot be
        read, our map stands: the write fails rather than count a copy that may be
        behind."""
        before = set(self.stale.get(index, ()))
        pending = set(self._marking.get(index, ()))
        if self.registry is None:
            return before | reported
        try:
            with self._marks_during() as marked:
                records = await self.registry.list_stale(self.lineage, index)
        except RegistryUnavailable as e:
            self._loglimit.log(log, _WARNING, "stale_check_failed",
                               "volume=%s chunk=%d event=stale_check_failed error=%s", self.name,
                               index, e)
            return set(self.stale.get(index, ())) | before | reported
        named = {r.host_id for r in records} | reported | pending
        for i, _took, missed in self.unrecorded:  # ours, not told to the registry yet
            if i == index:
                named.update(missed)
        now = self._merged_stale(index, before, named, marked)
        if before - now:
            log.info("volume=%s chunk=%d event=stale_map_behind current=%s", self.name, index,
                     ",".join(sorted(before - now)))
        self.stale[index] = now
        return set(now)

    @staticmethod
    def _falling_behind(failed, took, complete, behind, up, min_size: int) -> list[str]:
        """The copies a failed write leaves behind, to record stale. Recorded even when the
        write fails below min_size: the current copies that took it are ahead of the others,
        which must resync from them. When no current copy took it, the copies that did are
        recorded too: they were counted behind on what this gateway believed (its stale map
        lags the registry, a resync may have cleared one since), and they now hold bytes the
        others lack, so a record must name them whatever we believed.

        When no current copy took it, one current copy that failed is kept current, the
        source of the chunk's resyncs (the first whose host is `up` in the map, else the
        first): a copy on a down host may be down for a power loss. Keeping it asserts what
        the write could not show: that it outlived the failure with every acknowledged
        write. A copy that lost power came back recorded stale by its own crash recovery,
        flagged and newer than the others' records, and that election (of a chunk whose
        copies are all stale, replicator.loss.last_current) passes over the newest
        flagged copy for a whole one only while fewer than min_size records are newer than
        the whole one's. With min_size 2 or more the kept copy's record alone is not
        enough. With min_size 1 it is: the election took the copy kept, and an
        acknowledged write the others held was lost on every copy (the simulation's seed
        5494 of the takeover faults, the kept copy's host down in the map; seed 108 of the
        crash faults, up). So with min_size 1 a copy is kept only if it is the one current
        copy (the others missed acknowledged writes it holds); of two or more, none is.
        Every copy is then stale, recorded in one transaction (a tie), and the election,
        once the copy it takes is up, takes one that did not lose power. Writes to the
        chunk fail until then (resync runs every second)."""
        out = list(failed)
        if not took:
            current = [h for h in complete if h in failed and h not in behind]
            if len(current) == 1 or current and min_size > 1:
                out.remove(next((h for h in current if up(h)), current[0]))
            out += [h for h in complete if h not in failed]
        return out

    async def _current_after_failure(self, index: int, took: list[str]) -> list[str]:
        """The copies in `took` that no stale record names, read after this write's
        failures were recorded. Our stale map and the replicas' own view lag the registry
        (another volume of the lineage may have recorded a copy stale meanwhile); a copy
        recorded stale before our failures were must not carry the write, or the copy we
        just recorded stale would be the last to go stale while missing an acknowledged
        write (resync of a chunk whose copies are all stale elects the copy that went stale
        last, replicator/recovery.py)."""
        if self.registry is None or not took:
            return took
        try:
            with self._marks_during() as marked:
                records = await self.registry.list_stale(self.lineage, index)
        except RegistryUnavailable as e:
            raise RegistryUnavailable(
                f"chunk {index} of {self.name}: which copies are current could not be checked "
                f"(registry unreachable): the write is not acknowledged: {e}") from e
        named = (frozenset(r.host_id for r in records) | frozenset(self._marking.get(index, ()))
                 | frozenset(marked.get(index, ())))
        if named & set(took):
            self.stale[index] = self.stale.get(index, frozenset()) | (named & set(took))
        return [h for h in took if h not in named]

    async def _still_counted(self, index: int, took, hosts, replies, failed, behind) -> int:
        """How many complete copies a write counts, `took` counted over the copies a
        data-set change is leaving (the map under way), once its failures are recorded:
        the change may have completed before those marks landed, its check of the stale
        records not seeing them (a review: a joining target that failed the write, just
        resynced, became the chunk's only copy, stale, elected itself as the source of its
        resync, and the copy that took the write was collected). The registry's map is
        read: still that change, `took` stands; another, the map is refreshed and the
        copies that took the write are counted over the chunk's placement now. Asked
        only for a write that failed somewhere during a change."""
        if not await self._change_completed(f"chunk {index} of {self.name}", "write"):
            return len(took)
        behind = set(behind) | set(self.stale.get(index, ()))
        complete = self.cluster.replicas(self.lineage, index, self.n)
        log.info("volume=%s chunk=%d event=change_completed_under_write", self.name, index)
        return len([h for h in complete
                    if h in hosts and h in replies and h not in failed and h not in behind])

    async def _change_completed(self, what: str, op: str) -> bool:
        """Whether the registry's data set is another than our map's (its change under
        way completed, or another began): then the map is refreshed. RegistryUnavailable
        (`what`'s `op` is not acknowledged) when the registry cannot say."""
        if self.registry is None:
            return False
        try:
            now = await self.registry.cluster_map()
        except RegistryUnavailable as e:
            raise RegistryUnavailable(
                f"{what}: whether the data-set change completed could not be checked "
                f"(registry unreachable): the {op} is not acknowledged: {e}") from e
        if now.mgen == self.cluster.map.mgen:
            return False
        if self.refresh_map is not None:
            await self.refresh_map()
        return True

    def _suspect(self, index: int, hosts) -> None:
        if hosts:
            self.suspects.append((index, tuple(hosts)))

    async def _mark_stale(self, index: int, hosts, replicas=None, token: int = 0) -> bool:
        """Record `hosts` stale for the chunk. If the registry cannot be told: with the
        chunk's `replicas` (a write's outcome), False, and the outcome waits in `unrecorded`
        for the service to settle it; without (nothing written yet), RegistryUnavailable.
        A holder's marks go under its lease (the registry compares it in the same
        transaction): lost to a takeover meanwhile (this host stalled past it), they are
        refused, the gateway is fenced and Fenced raised. The copies its write missed may
        be the new holder's current ones, which then must not go stale. `token`: the
        lease's, for a mark made before the gateway writes with it (a takeover's
        reconcile); else the gateway's own."""
        if log.isEnabledFor(_INFO):
            self._loglimit.log(log, _INFO, "marked_stale",
                               "volume=%s chunk=%d event=marked_stale hosts=%s", self.name, index,
                               ",".join(sorted(hosts)))
        self.stale[index] = self.stale.get(index, frozenset()) | frozenset(hosts)
        for marked in self._reads:  # (a read of the records out now may predate it)
            marked.setdefault(index, set()).update(hosts)
        if self.registry is None:
            return True
        marking = self._marking.setdefault(index, {})
        for h in hosts:
            marking[h] = marking.get(h, 0) + 1
        try:
            # the version orders failures: a resync clears a record only if no newer
            # failure re-marked it
            token = token or self.token
            if token:
                lease = Lease(self.view.volume.name, self.host_id, token, 0.0)
                await self.registry.mark_stale(self.lineage, index, sorted(hosts),
                                               time.time_ns(), lease=lease)
            else:
                await self.registry.mark_stale(self.lineage, index, sorted(hosts),
                                               time.time_ns())
            return True
        except Fenced as e:
            log.warning("volume=%s chunk=%d event=stale_refused hosts=%s error=%s", self.name,
                        index, ",".join(sorted(hosts)), e)
            self._fence(e)
            raise
        except RegistryUnavailable as e:
            if replicas is None:
                raise
            took = tuple(h for h in replicas if h not in hosts)
            self.unrecorded.append((index, took, tuple(sorted(hosts))))
            self._loglimit.log(log, _WARNING, "stale_not_recorded",
                               "volume=%s chunk=%d event=stale_not_recorded hosts=%s error=%s",
                               self.name, index, ",".join(sorted(hosts)), e)
            return False
        finally:  # recorded, or in `unrecorded`, or the write is abandoned (cancelled)
            for h in hosts:
                if marking[h] > 1:
                    marking[h] -= 1
                else:
                    del marking[h]
            if not marking and self._marking.get(index) is marking:
                del self._marking[index]

    async def _send_all(self, hosts, msg, failed: dict[str, Exception],
                        sent: dict[str, int] | None, t0: float) -> dict:
        """Send `msg` to every host of `hosts`: the remote ones by one PeerPool.call_all
        (one encoding, one parked task for every reply), the local one by direct call
        while those frames wait for their connections' next batch; a down host fails at
        once. The replies by host; the failures go into `failed`. A StaleEpoch answer
        refreshes the map (once) and those hosts are asked once more, within the request
        timeout of `t0`, when the write left (_retry_stale_epoch)."""
        replies: dict = {}
        remote = []
        local = False
        for h in hosts:
            if h == self.host_id:
                local = True
            elif self.cluster.is_up(h):
                remote.append(h)
            else:
                failed[h] = PeerUnavailable(f"host {h} is down")
        mine = None  # the local copy's answer when it is an awaitable (a FUA write's sync)
        if local:
            reply = self._write_here(msg, True)
            if isinstance(reply, Exception):
                failed[self.host_id] = reply
            elif hasattr(reply, "__await__"):
                mine = reply
            else:
                replies[self.host_id] = reply
        if mine is None:
            await self._send_remote(remote, msg, replies, failed, sent)
        else:
            async def here() -> None:
                try:
                    replies[self.host_id] = await mine
                except VbpError as e:
                    failed[self.host_id] = e
                except Exception as e:  # as _write_here: this copy failed, the write goes on
                    self._loglimit.log(log, logging.ERROR,
                                       ("local_write_failed", failure_kind(e)),
                                       "volume=%s event=local_write_failed", self.name,
                                       exc_info=True)
                    failed[self.host_id] = LocalFault(f"the local write failed: {e!r}")

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(here)  # (the local sync in its thread beside the peers')
                    await self._send_remote(remote, msg, replies, failed, sent)
            except BaseExceptionGroup as group:  # (here() raises nothing: the peers' one)
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise
        await self._retry_stale_epoch(msg, replies, failed, t0)
        return replies

    async def _send_remote(self, remote: list, msg, replies: dict, failed: dict,
                           sent: dict | None) -> None:
        """_send_all's remote hosts (see there)."""
        if remote:
            if sent is not None:  # (_settle: the incarnation the write went to, for the flush)
                pool = self.pool
                for h in remote:
                    if pool.connected(self.cluster.address(h)):
                        sent[h] = pool.incarnation(h)
            no_rid = self.cluster.no_rid
            if no_rid and msg.rid and not no_rid.isdisjoint(remote):
                # decoders that predate request ids get the message without one
                old = [h for h in remote if h in no_rid]
                new = [h for h in remote if h not in no_rid]
                results = await self._call_all(old, dc_replace(msg, rid=""))
                results.update(await self._call_all(new, msg))
            else:
                results = await self._call_all(remote, msg)
            for h, r in results.items():
                if isinstance(r, VbpError):
                    failed[h] = r
                elif isinstance(r, Exception):
                    raise r
                else:
                    replies[h] = r

    async def _retry_stale_epoch(self, msg, replies: dict, failed: dict, t0: float) -> None:
        """Hosts that answered StaleEpoch are asked once more on a refreshed map, all at
        once, within the request timeout of the write's first sending (`t0`): a retry that
        fails is then recorded stale within `write_window` of the write leaving, like any
        copy's failure (_settle). Given a timeout of its own, a retry that got no answer
        made the write fail though min_size copies took it."""
        stale = [h for h, e in failed.items() if isinstance(e, StaleEpoch)]
        if not stale or self.refresh_map is None:
            return
        try:
            await self.refresh_map()
        except RegistryUnavailable as e:
            # no retry: those copies failed the write, recorded as any failure (_settle);
            # raised here, the copies that took it would differ from them with no record
            self._loglimit.log(log, _WARNING, "map_refresh_failed",
                               "volume=%s chunk=%d event=map_refresh_failed hosts=%s error=%s",
                               self.name, msg.index, ",".join(stale), e)
            return
        msg = dc_replace(msg, epoch=self.cluster.epoch)
        deadline = t0 + self.pool.request_timeout

        async def again(h: str) -> None:
            try:
                left = deadline - self._now()
                if left <= 0:
                    raise PeerUnavailable(f"host {h}: no time left to send the write again "
                                          f"on a fresh map")
                # Past the lease (the map's refresh took long) it is not sent again: a
                # holder's writes leave while its lease holds, and the next holder may
                # already have written, or a snapshot frozen this generation, without a
                # token this copy knows (`vbp volume snapshot` completing one unleased).
                self._check_writable()
                replies[h] = await self._send_once(h, msg, left)
                del failed[h]
            except VbpError as e:
                failed[h] = e

        async with trio.open_nursery() as nursery:
            for h in stale:
                nursery.start_soon(again, h)

    async def _call_all(self, hosts: list[str], msg) -> dict:
        if not hosts:
            return {}
        results = await self.pool.call_all([self.cluster.address(h) for h in hosts], msg)
        return dict(zip(hosts, results))

    async def _send(self, host: str, msg):
        try:
            return await self._send_once(host, msg)
        except StaleEpoch:
            if self.refresh_map is None:
                raise
            await self.refresh_map()
            return await self._send_once(host, dc_replace(msg, epoch=self.cluster.epoch))

    async def _send_once(self, host: str, msg, timeout: float | None = None):
        if host == self.host_id:
            return await self._handle_here(msg)
        return await self._call(host, msg, timeout)

    async def _handle_here(self, msg):
        """The local replica's answer to `msg` (a Flush's may be an awaitable)."""
        reply = self.replica.handle(msg)
        if hasattr(reply, "__await__"):
            reply = await reply
        return reply

    async def _call(self, host: str, msg, timeout: float | None = None):
        """`msg` to a remote host, without the request id if its decoder predates it;
        `timeout`: instead of the pool's request timeout."""
        no_rid = self.cluster.no_rid
        if no_rid and host in no_rid and msg.rid:
            msg = dc_replace(msg, rid="")
        if timeout is None:
            return await self.pool.call(self.cluster.address(host), msg)
        return await self.pool.call(self.cluster.address(host), msg, timeout)

    # --- FLUSH / CACHE / BLOCK_STATUS ----------------------------------------------------

    def flush(self):
        """Every write answered before this call is durable when it returns (or its
        awaitable completes). A flush counts as one I/O against the volume's IOPS limit
        (each costs a sync on every copy written since the last). A flush no client asked
        for that failed (flush_unasked) fails the next one, before it takes anything: its
        retry flushes that."""
        untold, self._untold = self._untold, None
        if untold is not None:
            raise untold
        if self.qos is not None and (d := self.qos.delay_for(0)):
            return self._throttled(d, self._flush)
        return self._flush()

    def _flush(self):
        """flush(), its turn come. It takes the writes noted since the previous flush;
        when that one is still under way (a concurrent FLUSH, another connection with
        multi-conn), it also waits for it and fails if it failed: the writes it covers
        were answered before this flush was asked too. One cancelled (its client went
        away) fails nothing: this one flushes what it left (_flush_after). The first
        flush of a gateway opened after the export's last connection here closed with
        writes not yet durable everywhere waits for that close flush too (after_close)."""
        hosts, sent_at = self._unflushed, self._sent_at
        self._unflushed, self._sent_at = {}, {}
        prev = self._flushing
        if prev is not None and prev.done.is_set() and prev.left is None:
            prev = self._flushing = None  # (one cancelled still owes what it left: kept)
        prior = self._prior  # (left there until a flush waited it out: _flush_after)
        local = set(hosts) <= {self.host_id}
        ahead = self.store.sync_ahead() if local else None
        if local and prev is None and ahead is None and prior is None:
            try:
                self.store.flush()  # (little to write back: no thread, no task)
            except BaseException:
                self._unflushed_again(hosts, sent_at)
                raise
            return None
        mine = self._flushing = _Flush()
        return self._flush_after(prev, mine, hosts, sent_at, ahead, prior)

    def after_close(self, prior: _Flush) -> None:
        """`prior`: the flush a gateway of this export ran when its last connection on this
        host closed (blockd: VolumeProvider._closed), covering writes it answered. A
        FLUSH on a connection made since must cover them too (proto.md: every write
        replied to before the flush was received), and this gateway knows nothing of
        them: its first flush waits for `prior`, and fails if it failed (once, as fsync
        reports a failed writeback)."""
        self._prior = prior

    async def flush_now(self) -> None:
        """flush(), with no wait for a QoS turn: the flush of a gateway whose last
        connection on this host closed (blockd: VolumeProvider._closed). Everything
        flushed, it fails with a failure flush_unasked kept (the next gateway's client is
        told: after_close)."""
        await _called(self._flush)
        untold, self._untold = self._untold, None
        if untold is not None:
            raise untold

    async def flush_unasked(self) -> None:
        """flush_now for no client's FLUSH (blockd: VolumeProvider._flush_for_asker, for
        a host asking for the lease). Its failure is kept for the client's next FLUSH,
        which raises it, once, as fsync reports a failed writeback: what a copy that
        restarted lost, or a close flush's failure (after_close), this flush took from
        the ones after it, and no later flush would find again. (A flush asked while it
        ran waited for it and failed with it: told already.)"""
        try:
            await _called(self._flush)
        except BaseException as e:
            if not _cancelled(e):
                self._untold = e
            raise

    def owes_flush(self) -> bool:
        """Something answered here may not be durable on every copy yet beyond this host's
        own store: writes in flight, writes to other hosts since the last flush, a flush
        under way or one whose client went away (what a close must flush: after_close);
        or what this gateway owes the flushes after it: the close flush of the one before
        it not waited out yet (after_close), a failure no client was told (flush_unasked).
        A gateway opened and closed with no FLUSH between (a probe: nbdinfo, qemu-img
        info) took the one before it's close flush, and dropped it."""
        prior = self._prior
        return bool(self._inflight or self._flushing is not None or self._untold is not None
                    or prior is not None and (not prior.done.is_set() or prior.error is not None)
                    or any(h != self.host_id for h in self._unflushed))

    async def _flush_after(self, prev: _Flush | None, mine: _Flush, hosts, sent_at,
                           ahead=None, prior: _Flush | None = None) -> None:
        try:
            await self._flush_hosts(hosts, sent_at, ahead)
            hosts, sent_at = {}, {}  # (durable)
            if prior is not None:
                # Until now the next flush would still wait for it: one cancelled (its
                # client went away) or failed before here must not take it along.
                await prior.done.wait()
                if self._prior is prior:
                    self._prior = None
                if prior.error is not None:
                    raise _flush_failed(f"the flush of {self.name} when its last connection "
                                        f"here closed", prior.error)
            while prev is not None:
                await prev.done.wait()
                if prev.error is None:
                    break
                if prev.left is None:
                    if self._untold is prev.error:  # (flush_unasked's: told here)
                        self._untold = None
                    raise _flush_failed(f"a flush of {self.name} under way when this one "
                                        f"was asked", prev.error)
                # Its client went away: it told nobody anything and kept what it had not
                # settled for the flush after it. This flush covers those writes too, so it
                # makes them durable itself, and goes on to the flush that one waited for.
                # (Not through _unflushed: a flush asked later could take them there, and
                # this one would succeed before they are durable.)
                (hosts, sent_at), prev.left = prev.left, ({}, {})
                prev = prev.prev
                await self._flush_hosts(hosts, sent_at)
                hosts, sent_at = {}, {}
        except BaseException as e:
            mine.error = e
            if _cancelled(e):
                # for the flush after this one (see above), which takes it over
                mine.prev, mine.left = prev, (hosts, sent_at)
            else:
                self._unflushed_again(hosts, sent_at)
            raise
        finally:
            mine.done.set()
            if self._flushing is mine and mine.left is None:
                self._flushing = None

    async def _flush_hosts(self, hosts, sent_at, ahead=None) -> None:
        if set(hosts) <= {self.host_id}:
            await flush_store(self.store, ahead)
        else:
            await self._flush_replicated(hosts, sent_at)

    def _unflushed_again(self, hosts: dict[str, set[int]], sent_at: dict[str, int]) -> None:
        """A flush failed: what it took and did not settle goes back to the next flush (one
        cancelled keeps it for the flush after it: _flush_after), with the incarnations the writes went to.
        Otherwise a FLUSH asked again (a client retrying, another connection with
        multi-conn) would find nothing to do and succeed, though copies that took writes
        answered before it were neither synced nor recorded stale. `hosts` holds what is
        left: _flush_replicated takes out the hosts that flushed, the chunks it recorded
        stale and the hosts that restarted (their loss is told by this flush's error)."""
        for h, indexes in hosts.items():
            if indexes:
                self._note_all_unflushed(h, indexes, sent_at.get(h))

    async def _flush_replicated(self, hosts: dict[str, set[int]], sent_at: dict[str, int]):
        msg = m.Flush(self.view.volume.name, self.cluster.epoch, self.token, get_rid())
        failed: dict[str, Exception] = {}

        async def one(h: str) -> None:
            try:
                await self._send(h, msg)
            except VbpError as e:
                failed[h] = e

        todo = await self._flush_local_last(hosts, msg, failed)
        async with trio.open_nursery() as nursery:
            for h in todo:
                nursery.start_soon(one, h)
        # A flush answered by another incarnation of a host than the writes it covers
        # may come from a process that restarted meanwhile: what it took before then and
        # had not synced is gone from it (its crash recovery records those chunks stale,
        # but a resync may already have cleared that, or the other copies never had them:
        # min_size 1, a copy that failed the write). It counts as a host that could not
        # flush. A new connection to the same process (a network blip) keeps the
        # incarnation: the server's boot id says so (PeerPool.incarnation). A server that
        # sends none (below PEER_REV 6, or not yet aware of ours) makes every new
        # connection a new incarnation, which costs a needless resync only.
        incarnation = self.pool.incarnation
        restarted = []
        for h in hosts:
            if h != self.host_id and h not in failed and incarnation(h) != sent_at.get(h, -1):
                failed[h] = PeerUnavailable(
                    f"host {h} answered the flush of {self.name} from another process than "
                    f"the one that took its writes: it may have restarted and lost them")
                restarted.append(h)
        for h in [h for h in hosts if h not in failed]:
            del hosts[h]  # durable: nothing of it for a later flush, should this one fail
        if not failed:
            return
        # A host that could not flush may have lost what it took since the last flush: its
        # copies of those chunks are stale; the flush holds while min_size copies are durable.
        for e in failed.values():
            if isinstance(e, Fenced):
                self._fence(e)
                raise e
        lost: dict[int, list[str]] = {}
        for h in failed:
            for idx in hosts[h]:
                lost.setdefault(idx, []).append(h)
        unrecorded = []
        short = None  # a chunk left with fewer than min_size durable copies: the error
        changing = self.cluster.map.prev is not None
        marked = []
        # (min_size 1) a copy left current alone -> the incarnation of it that answered the
        # ping (None: it did not), and those whose chunks were recorded: they sync again
        answered: dict[str, int | None] = {}
        soles: dict[str, int] = {}
        for idx, bad in lost.items():
            replicas = self.cluster.replicas(self.lineage, idx, self.n)
            behind = self.stale.get(idx, ())
            good = [h for h in replicas if h not in bad and h not in behind]
            sole = None
            if len(good) == 1 == self.min_size and any(h not in behind for h in bad):
                # as for a write (_still_answering, _synced_sole): the one durable copy,
                # whose answer may have come a request timeout before the failure, must
                # still answer, and syncs again once the failure is recorded
                sole = good[0]
                if sole not in answered:
                    inc = sent_at.get(sole, incarnation(sole))
                    answered[sole] = inc if (sole == self.host_id or
                                             await self._still_answering(sole, inc)) else None
                if answered[sole] is None:
                    good, sole = [], None
            if len(good) < self.min_size:
                short = short or BelowMinSize(
                    f"flush of {self.name}: chunk {idx} is durable on {len(good)} replicas")
                continue  # the others' failures are still recorded before it is raised
            if await self._mark_stale(idx, bad, replicas):
                marked.append(idx)
                for h in bad:  # recorded: a resync makes the copy whole, not a flush
                    hosts[h].discard(idx)
                if sole is not None:
                    soles[sole] = answered[sole]
            else:
                unrecorded.append(idx)
        for h, inc in soles.items():
            if not await self._synced_sole(h, inc):
                short = short or BelowMinSize(
                    f"flush of {self.name}: host {h}, the one current copy of chunks whose "
                    f"other copies failed, did not sync again")
        # counted over the copies a data-set change is leaving: as for a write
        # (_still_counted), the change may have completed before the marks landed, the
        # copies that failed the flush (a joining one that restarted) now the chunk's own
        if (changing and marked and short is None
                and await self._change_completed(f"flush of {self.name}", "flush")):
            for idx in marked:
                behind = self.stale.get(idx, ())
                good = sum(1 for h in self.cluster.replicas(self.lineage, idx, self.n)
                           if h not in lost[idx] and h not in behind)
                if good < self.min_size:
                    short = short or BelowMinSize(
                        f"flush of {self.name}: chunk {idx} is durable on {good} replicas "
                        f"of the data set it now has")
        for h in restarted:
            # what a restarted host lost, no later flush brings back: this flush's outcome
            # (its error, the stale records) tells it, once, as fsync reports a lost
            # writeback; a host that did not answer is asked again by the next flush
            del hosts[h]
        if short is not None:
            raise short
        if unrecorded:
            raise RegistryUnavailable(
                f"flush of {self.name}: failures of chunks {unrecorded[:8]} could not be recorded "
                f"(registry unreachable)")

    async def _flush_local_last(self, hosts, msg, failed: dict) -> list[str]:
        """The common case of a replicated flush: the Flush frames leave first (queue_all,
        connections ready), then this host flushes its own copy while the others flush
        theirs; the syncs overlap instead of the peers waiting for ours. The hosts left to
        flush the general way (all of them when the case does not apply; those that
        answered StaleEpoch, which _send retries on a fresh map)."""
        addresses = self._ready_peers(hosts) if self.host_id in hosts else None
        if addresses is None:
            return list(hosts)
        remote = [h for h in hosts if h != self.host_id]
        answered = trio.Event()
        results: list = []

        def on_replies(replies: list) -> None:
            results.extend(replies)
            answered.set()

        self.pool.queue_all(addresses, msg, on_replies, checked=True)  # (_ready_peers)
        again = []
        try:
            await self._handle_here(msg)
        except StaleEpoch:
            again.append(self.host_id)
        except VbpError as e:
            failed[self.host_id] = e
        await answered.wait()
        for h, r in zip(remote, results):
            if isinstance(r, StaleEpoch):
                again.append(h)
            elif isinstance(r, VbpError):
                failed[h] = r
            elif isinstance(r, Exception):
                raise r
        return again

    def cache(self, offset: int, length: int):
        if offset + length > self.size:
            return self._past_end(offset, length, PastEnd, (self.cache, offset, length))
        return None

    def block_status(self, offset: int, length: int):
        """The base:allocation runs of a prefix of the range: the chunks are looked at in
        order until they gave STATUS_RUNS runs (proto.md lets a reply cover less than the
        request; clients ask again from where it ends), so one request costs the event
        loop a bounded time however fragmented the range and however long (up to 4 GiB).
        While a takeover reconciles the copies (settling), it waits for it as reads do:
        this host's copy may lack a write the reconcile keeps, and a hole reported there
        would have a client copying by block status skip what its reads return."""
        if self.settling is not None:
            return self._settled(self.block_status, offset, length)
        if self._lapsed():
            return self._renewed(self.block_status, offset, length)
        self._check_served()
        if offset + length > self.size:
            return self._past_end(offset, length, PastEnd, (self.block_status, offset, length))
        own = self._own_current()
        if own and not self.cuts:
            hosts = self._scan_hosts(offset, length)
            if hosts == (self.host_id,):  # (no peer to ask: answered without a task)
                try:
                    reply = self.replica.range_extents(self._range_msg(offset, length))
                except VbpError:  # (as chunk by chunk: it raises for the client)
                    return self._block_status_each(offset, length, own)
                return self._scanned_status(offset, length, {self.host_id: reply}, 1)
            if hosts is not None:
                return self._block_status_scan(offset, length, hosts)
        return self._block_status_each(offset, length, own)

    def _block_status_each(self, offset: int, length: int, own: bool):
        """block_status chunk by chunk: each placed, and answered by this host's copy when
        it is current, else asked of another (_block_status_remote)."""
        out: list = []
        remote = []
        pieces = []
        found = 0
        me, lineage, n, stale = self.host_id, self.lineage, self.n, self.stale
        everywhere = me in self.cluster.everywhere(n)  # (no chunk to place: a small pool)
        for p in self.geometry.pieces(offset, length):
            pieces.append(p)
            if (own and (everywhere or me in self.cluster.replicas(lineage, p.index, n))
                    and me not in stale.get(p.index, ())
                    and not self.replica.is_stale(lineage, p.index)):
                ext = self.replica.extents(self.lineage, p.index, self.chain_for(p.index),
                                           p.offset, p.length)
                out.append(ext)
                found += 1 if ext is None else len(ext)
            else:
                out.append(None)
                remote.append((len(out) - 1, p))
                found += 1
            if found >= STATUS_RUNS:
                break
        if remote:
            return self._block_status_remote(out, remote, pieces)
        return _merge_status(out, pieces)

    def _scan_hosts(self, offset: int, length: int) -> tuple[str, ...] | None:
        """The hosts a block status of the range may scan (_block_status_scan), when the
        range has SCAN_CHUNKS chunks or more, at most RANGE_CHUNKS_MAX: this one alone
        when it holds a copy of every chunk, else every host chunks are placed on, if
        they are no more than the chunks, each is up and takes RangeExtents; else None.
        (A scan waits for its slowest host, and in a pool of more hosts than the range
        has chunks, asking only the chunks' hosts is fewer requests.)"""
        chunks = self.geometry.chunks_touched(offset, length)
        if not SCAN_CHUNKS <= chunks <= m.RANGE_CHUNKS_MAX:
            return None
        if self.host_id in self.cluster.everywhere(self.n):
            return (self.host_id,)  # (a copy of every chunk here: it alone tells holes)
        hosts = self.cluster.holders()
        old = self.cluster.no_range_extents
        if (not hosts or len(hosts) > chunks  # (more hosts than chunks: ask those holding them)
                or any(not self.cluster.is_up(h) or h in old for h in hosts)):
            return None
        return hosts

    async def _block_status_scan(self, offset: int, length: int, hosts):
        """block_status over many chunks of a thin volume, without placing each: the
        `hosts` (_scan_hosts) say in one RangeExtents each which chunks of the range they
        hold. A chunk none holds and none has recorded stale is a hole: one of them holds
        each of its copies, and each said it has nothing there. The others (a fraction of
        the range: written) are placed, and answered as _block_status_each would: by this
        host's copy when it is current, else by the first current copy's reply, or asked
        of it when it was not scanned (_block_status_remote). If a host does not answer,
        the range goes chunk by chunk after all."""
        msg = self._range_msg(offset, length)
        replies: dict = {}

        async def ask(host):
            try:
                replies[host] = await self._call(host, msg)
            except VbpError:
                pass

        try:
            if self.host_id in hosts:
                replies[self.host_id] = self.replica.range_extents(msg)
            async with trio.open_nursery() as nursery:
                for h in hosts:
                    if h != self.host_id:
                        nursery.start_soon(ask, h)
        except VbpError:
            pass
        return await _called(self._scanned_status, offset, length, replies, len(hosts))

    def _range_msg(self, offset: int, length: int) -> m.RangeExtents:
        return m.RangeExtents(self.lineage, self.chain, self.geometry.chunk_size, offset,
                              offset + length, self.cluster.epoch, (), get_rid())

    def _scanned_status(self, offset: int, length: int, replies: dict, hosts: int):
        """block_status from the RangeRuns `replies` of a scan by `hosts` hosts."""
        cs = self.geometry.chunk_size
        seen = _scanned(replies, hosts, self.geometry.chunks_touched(offset, length))
        if seen is None:  # (a host did not answer, or not as a replica does)
            return self._block_status_each(offset, length, self._own_current())
        held, done = seen
        first = offset // cs
        end = min(offset + length, (first + done) * cs)
        stale = self.stale
        # the chunks some host holds, or recorded stale: placed and answered one by one
        special = [i for i in held if first <= i < first + done]
        if len(stale) <= done:
            special += (i for i in stale if first <= i < first + done and i not in held)
        else:
            special += (i for i in range(first, first + done) if i in stale and i not in held)
        special.sort()
        out: list = []
        remote = []
        pieces = []
        found = 0
        pos = offset
        me, lineage, n = self.host_id, self.lineage, self.n
        everywhere = me in replies and me in self.cluster.everywhere(n)

        def gap(upto: int) -> None:  # (the chunks between are holes: one piece for them)
            pieces.append(Piece(pos >> self._shift, pos & (cs - 1), upto - pos, pos - offset))
            out.append(None)

        for i in special:
            start = max(offset, i * cs)
            if start > pos:
                gap(start)
                found += 1
            p = Piece(i, start - i * cs, min(end, (i + 1) * cs) - start, start - offset)
            pieces.append(p)
            got = held.get(i, {})
            left = stale.get(i, ())
            ext = [(p.length, False)]  # (no current copy answered: data)
            if me not in left and got.get(me) != -1 and (
                    everywhere or me in replies and me in self.cluster.replicas(lineage, i, n)):
                ext = got.get(me)
            else:
                for h in self.cluster.replicas(lineage, i, n):
                    if h == me or h in left:
                        continue
                    if h not in replies:
                        ext = None
                        remote.append((len(out), p))
                        break
                    v = got.get(h)
                    if v != -1:
                        ext = v
                        break
            out.append(ext)
            found += 1 if ext is None else len(ext)
            pos = start + p.length
            if found >= STATUS_RUNS:
                break
        else:
            if end > pos:
                gap(end)
        if remote:
            return self._block_status_remote(out, remote, pieces)
        self._check_served()
        self._check_pieces_in(pieces, PastEnd)  # (a shrink adopted meanwhile: as block_status)
        return _merge_status(out, pieces)

    async def _block_status_remote(self, out, remote, pieces):
        """Fill out[slot] for each (slot, piece) of `remote` from another copy: every host
        asked at once, each for all its chunks in RangeExtents of up to RANGE_CHUNKS_MAX
        (one chunk per ChunkExtents for a host of an older revision). A chunk a host could
        not answer (stale there, unreachable, an error) is asked of its next copy in the
        next round; with none left it is reported as data (always correct)."""
        tried: dict[int, set[str]] = {}
        pending = remote
        while pending:
            groups: dict[tuple[str, tuple[int, ...]], list] = {}
            for slot, p in pending:
                host = self._extents_host(p.index, tried.setdefault(slot, set()))
                if host is None:
                    out[slot] = [(p.length, False)]  # (no copy answered: data)
                    continue
                tried[slot].add(host)
                groups.setdefault((host, self.chain_for(p.index)), []).append((slot, p))
            pending = []
            async with trio.open_nursery() as nursery:
                for (host, chain), items in groups.items():
                    nursery.start_soon(self._extents_from, host, chain, items, out, pending)
            pending.sort(key=itemgetter(0))
        self._check_served()
        self._check_pieces_in(pieces, PastEnd)  # (a shrink adopted meanwhile: as block_status)
        return _merge_status(out, pieces)

    def _extents_host(self, index: int, tried: set[str]) -> str | None:
        """The first copy of the chunk block status may ask that it did not ask yet: not
        this host's (block_status did not take it: not current, or not known to be; asked
        through the peer protocol it would answer all the same), not one recorded stale
        (which may not know it yet, may lack the chunk and would report a hole over
        written data: as reads), and up."""
        stale = self.stale.get(index, ())
        for h in self.cluster.replicas(self.lineage, index, self.n):
            if h != self.host_id and h not in stale and h not in tried and self.cluster.is_up(h):
                return h
        return None

    async def _extents_from(self, host: str, chain, items, out, failed) -> None:
        """The runs of the chunks of `items` ((slot, piece), ascending) from `host` into
        `out`; the items it did not answer go to `failed`."""
        if host in self.cluster.no_range_extents:
            for slot, p in items:
                msg = m.ChunkExtents(self.lineage, p.index, chain, p.offset, p.length,
                                     self.cluster.epoch, get_rid())
                try:
                    reply = await self._call(host, msg)
                except VbpError:
                    failed.append((slot, p))
                    continue
                runs = reply.runs
                if reply.found and (not runs or len(runs) % 2 or any(n <= 0 for n in runs[0::2])):
                    failed.append((slot, p))  # (no answer of a replica)
                    continue
                out[slot] = _run_pairs(runs, 0, len(runs)) if reply.found else None
            return
        cs = self.geometry.chunk_size
        while items:
            batch = items[:m.RANGE_CHUNKS_MAX]
            first, last = batch[0][1], batch[-1][1]
            msg = m.RangeExtents(self.lineage, chain, cs, first.index * cs + first.offset,
                                 last.index * cs + last.offset + last.length,
                                 self.cluster.epoch, tuple(p.index for _, p in batch), get_rid())
            try:
                reply = await self._call(host, msg)
            except VbpError:
                failed += items
                return
            seen = _scanned({host: reply}, 1, len(batch))
            if seen is None:  # (no answer of a replica)
                failed += items
                return
            held, done = seen
            for slot, p in batch[:done]:
                v = held.get(p.index, {}).get(host)
                if v == -1:  # (its copy is stale there)
                    failed.append((slot, p))
                else:
                    out[slot] = v
            items = items[done:]

    def close(self):
        if self.on_close is not None:
            return self.on_close(self)
        return None


def _room(memo: dict) -> None:
    """Before a chunk's entry goes into `memo`, one of a gateway's per-chunk memos: emptied
    when it holds PLANS_MAX, and the memos of every gateway bounded together at each
    MEMO_STEP more (_bound_memos)."""
    n = len(memo)
    if n >= PLANS_MAX:
        memo.clear()
    elif n and not n % MEMO_STEP:
        _bound_memos()


def _bound_memos() -> None:
    """Past HOST_MEMOS entries in the memos of all the gateways of the process, empty the
    largest until the total is back under (they are caches: what is emptied is made again
    when next asked)."""
    memos = [memo for g in list(_gateways) for memo in (g._plans, g._routes, g._local)]
    total = sum(map(len, memos))
    if total <= HOST_MEMOS:
        return
    for memo in sorted(memos, key=len, reverse=True):
        total -= len(memo)
        memo.clear()
        if total <= HOST_MEMOS:
            break


async def _called(op, *args):
    """op(*args), awaited if it answered an awaitable: the gateway's request methods
    answer at once (a value, None) or with a coroutine or Later to await."""
    result = op(*args)
    if result is not None and hasattr(result, "__await__"):
        result = await result
    return result


def _flush_failed(which: str, error: BaseException) -> VbpError:
    """A flush's error for the failure of another one it covers (`which`), with its errno."""
    err = VbpError(f"{which} failed: {error}")
    err.errno = getattr(error, "errno", err.errno)
    return err


def _run_pairs(flat, start: int, stop: int) -> list[tuple[int, bool]]:
    """The (length, is_hole) runs of flat[start:stop], a peer's (length, is_hole) pairs
    flattened (Extents, RangeRuns)."""
    return [(flat[j], bool(flat[j + 1])) for j in range(start, stop, 2)]


def _scanned(replies: dict, hosts: int, chunks: int):
    """The RangeRuns `replies` ({host: reply}) of a scan of `chunks` chunks by `hosts` hosts
    -> ({index: {host: -1 (stale there) or its runs [(length, is_hole)]}} of the chunks
    some host holds, the chunks every reply answered), or None unless every host replied,
    each as a replica does."""
    if len(replies) != hosts:
        return None
    held: dict[int, dict] = {}
    done = chunks
    for h, r in replies.items():
        indexes, states, runs = r.indexes, r.states, r.runs
        if (not 0 < r.done <= chunks or len(indexes) != len(states) or 0 in states
                or 2 * sum(k for k in states if k > 0) != len(runs)
                or any(n <= 0 for n in runs[0::2])):
            return None  # (a chunk listed has runs, or -1; a run has a length)
        done = min(done, r.done)
        at = 0
        for i, k in zip(indexes, states):
            if k < 0:
                v = -1
            else:
                v = _run_pairs(runs, at, at + 2 * k)
                at += 2 * k
            held.setdefault(i, {})[h] = v
    return held, done


def _merge_status(per_piece, pieces) -> list[tuple[int, int]]:
    """Per-chunk extents (None: nothing in the chain, a hole) -> merged NBD status runs,
    at most STATUS_RUNS of them (a prefix of the range: see block_status)."""
    merged: list[tuple[int, int]] = []
    for ext, p in zip(per_piece, pieces):
        if ext is None:
            runs = [(p.length, _HOLE_FLAGS)]
        else:  # (a chunk's runs alternate: only its first may join the last one before)
            runs = [(n, _HOLE_FLAGS if hole else 0) for n, hole in ext]
        if not runs:
            continue
        if merged and merged[-1][1] == runs[0][1]:
            runs[0] = (merged.pop()[0] + runs[0][0], runs[0][1])
        merged += runs
    if len(merged) > STATUS_RUNS:  # (remote chunks' runs are counted once they came)
        del merged[STATUS_RUNS:]
    return merged


_OPS = {0: "read", 1: "write", 3: "flush", 4: "trim", 5: "cache", 6: "write_zeroes", 7: "block_status"}


def _error_kind(e: Exception) -> str:
    if isinstance(e, StaleEpoch):
        return "stale_epoch"
    if isinstance(e, Fenced):
        return "fenced"
    if isinstance(e, ChecksumError):
        return "checksum"
    if isinstance(e, PeerUnavailable):
        return "timeout" if "timed out" in str(e) else "connection"
    if getattr(e, "errno", None) == 28:
        return "no_space"
    return "io" if isinstance(e, VbpError) else "other"


def _cancelled(e: BaseException) -> bool:
    """Whether `e` is a cancellation only (a nursery's group of them too)."""
    if isinstance(e, BaseExceptionGroup):
        return all(_cancelled(x) for x in e.exceptions)
    return isinstance(e, trio.Cancelled)


def _error_rank(e: Exception) -> int:
    """Which error of a multi-chunk request the client sees: the most specific."""
    for rank, kind in enumerate((Fenced, NoSpace, ReadOnly, BelowMinSize)):
        if isinstance(e, kind):
            return rank
    return 9
