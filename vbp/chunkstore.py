"""One host's local chunk store: fixed slots in data files, an LMDB index, xxh3 per page.

Theory of operation (DESIGN.md "Words", "Failures"; issue 5, local half)

Layout of the store directory:
- `data-<size>.bin`, one per chunk size in use: slot n holds its chunk at n*chunk_size. The
  file grows sparse (ftruncate) as slots are added; freed slots are punched and reused.
- `sums-<size>.bin`, mmap'd: one native u64 per 4 KiB page, slot n's at n*(chunk_size/4096)*8.
  0 means hole (never written or zeroed whole; reads as zeros whatever the disk holds); a
  real page stores `xxh3_64(page) or 1`. The sidecar is posix_fallocate'd before a slot is
  used, so a full disk is an ENOSPC at allocation, never a SIGBUS in the mmap.
- `index/` (LMDB): `chunks` ChunkKey -> [slot, chunk_size, version, state], `free` and
  `limbo` (size, slot) sets, `dirty` ChunkKey set, `meta` (slot high-water per size, clean,
  the store's id).
  Every slot below a size's high-water is owned by exactly one of chunks/free/limbo: each
  transaction that moves a slot removes it from one and adds it to another atomically, so a
  crash never leaks a slot nor gives one to two chunks.

Per request, no LMDB transaction: a 4 KiB write is one pwrite plus one u64 store into the
mmap; a partial page first reads (and verifies) that page only. An LMDB write happens only:
- at allocation (slot moves free/high-water -> chunks; the chunk is born dirty);
- at delete (chunks -> limbo; the slot is punched and its sums zeroed, at once or, while
  FileRanges are out, at the first flush with none, and it moves limbo -> free in a flush
  after that wipe is durable, so a reused slot never shows a deleted chunk's bytes);
- before the first write to a chunk after a flush: the chunk is recorded dirty, durably;
  mark_dirty records many in one commit, for a batch of writes about to come (the NBD
  server's, through VolumeGateway.prepare_writes; a replica's peer frames, through
  Replica.prepare);
- at flush: fdatasync data files, msync the checksums of the chunks whose mark it clears
  (those that stay marked are re-hashed by recovery), then one transaction persists every
  version not yet in the index (of the chunks written since, and of those an earlier flush
  left unpersisted), clears the dirty marks of all but the hot_max chunks written
  last (once hot_max // 4 or more are past them: _cold_count), keeps the replica's
  takeover marks of the chunks whose dirty mark it clears (the "marks" table:
  _marks_kept), and frees the limbo.
  Those stay marked (DRBD's activity log keeps its hot extents
  the same way), so a workload that keeps writing and flushing the same chunks (a guest's
  journal, a database, fio with fsync) costs no synced commit per first write after a flush.
  A flush that clears no mark, frees no limbo and settles no copy-up needs no transaction
  at all: it is one fdatasync (what a flush costs qemu-nbd), and the versions it
  acknowledges stay unpersisted (`Chunk.saved` is the persisted one), which the recovery
  rule below allows as long as no chunk runs VERSION_SLACK versions past its persisted
  one; a flush that would let one do so commits;
- before a flush with much to write back (SYNC_AHEAD_MIN), from a worker thread
  (sync_ahead, flush_store): fdatasync of the same files through descriptors of their own,
  so the writeback does not hold up the event loop. It promises nothing: the flush that
  follows on the loop still syncs, through the store's descriptors (which a writeback
  error reaches as well, errseq), before it claims anything durable;
- at fua: fdatasync; the chunk stays marked, so, as for a flush that clears no mark, its
  version and checksums need not be durable. A copy-up (FRESH) or a version run
  VERSION_SLACK past its persisted one also gets an msync of its checksums and one
  transaction persisting its version (and turning FRESH into an ordinary mark).
- copy-up (create with `base`): the new chunk is allocated PENDING, the base's data and
  sums are copied (not synced), then one transaction makes it READY and marks it dirty
  FRESH: its copy may not be durable yet. A copy-up holds nothing acknowledged durable
  that its base does not: every write to it came after the last flush. So it needs no
  sync of its own (an fdatasync of the whole data file, which under load stalled the host
  for tens of milliseconds): the next flush or fua syncs it and turns the mark into an
  ordinary one; deleting a chunk a FRESH copy was made from syncs the copies first.
  A crash leaves either no chunk (PENDING is dropped at open) or a complete copy in the
  page cache (the same boot: `meta.boot` is the kernel's boot id), never a half copy
  that would shadow the base's acknowledged data with zeros; after a reboot (power loss)
  a FRESH chunk is dropped like a PENDING one and reads fall back to its base.

Reads check every page against its checksum; a page the disk cannot read (EIO) is damage
like a page failing it (ChecksumError, listed by verify), for the layer above to repair.
read_ref, for the NBD server's large reads, checks the pages in place through a read-only
map of the data file and answers a FileRange that the server sends from that map (no copy
into a buffer of this process); only pages the page cache holds (mincore), since a read
error in a map is a SIGBUS that ends the process: others are read as read() does. While a
range is out, slots its space frees stay in limbo, unwiped: the bytes a slow client gets
are the chunk's, even when a delete overtook the send, never another chunk's nor zeros. The
check is made once, before the send: bytes that change in the file between the two (only
something writing it behind blockd's back could) leave unchecked.

Recovery at open (always run; after a clean close there is nothing to do; a dirty chunk is
one written since the last flush or one of the hot set kept marked through it): PENDING chunks
are dropped, and FRESH ones after a reboot; limbo slots wiped and freed. In a dirty chunk a page whose checksum does not
match its bytes holds a write that was never acknowledged durable: it is re-hashed,
accepting the bytes on disk (a hole page holding non-zero bytes becomes a real page). Its
version becomes the last persisted one + VERSION_SLACK: above every version a flush or fua
acknowledged, since neither acknowledges a version VERSION_SLACK or more past the persisted
one without committing it first. (A version given explicitly, by replication, may also be
lower than the chunk's; the rule holds the same.) So the index's versions (read_index) may
lag the chunks' own by less than VERSION_SLACK while a chunk is marked dirty.
A mismatch in a chunk that was not dirty is real corruption: it stays, and reads of that
page raise ChecksumError. `recovered` lists the dirty chunks (and dropped FRESH ones) so
replication can resync them, and `recovered_lost` those of them found after a reboot,
which may have lost writes taken since their last flush (what the page cache held);
opened `keep_recovered`, every open lists both again (they are kept in the index with
the recovery) until forget_recovered says they are recorded.

Failure rules:
- A failed fdatasync/msync poisons that chunk size's files: every later sync raises
  LocalFault (Linux may have dropped the dirty pages and would report the next fsync as
  fine). Reopening runs recovery; replication must resync the host.
- New files get their directory fsync'd, so synced data never hangs off a lost name.
- Disk full: the sidecar is allocated before a slot is taken; a pwrite hitting ENOSPC
  re-hashes the pages it may have touched (a failed write may be torn, like on any disk;
  a hole it reached becomes a real page, see _settle_failed); a chunk created by that
  request is deleted again. The index
  refuses new chunks past 40% of its map, so flush, fua and delete can always commit; and
  its file keeps INDEX_RESERVE bytes of disk (at most a sixteenth of the filesystem)
  allocated past its end (fallocate, size unchanged), taken again before a new chunk is
  (no room for them: NoSpace, no new chunk), so those commits, and the recovery's at open,
  find blocks on a disk full to the last byte.
- Partial-page writes verify the page they merge into: a ChecksumError there is raised
  rather than re-hashing (laundering) the damage. Whole-page writes overwrite it.

Test tiers: tests/conformance (both stores), tests/unit/test_chunkstore*.py (incl. a
hypothesis model and a power-loss model), tests/faults/test_chunkstore_crash.py (SIGKILL).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import heapq
import logging
import os
import time
import uuid
from array import array
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import lmdb
import msgpack
import trio
from xxhash import xxh3_64_intdigest

from vbp import pagesums

from vbp.chunkstore_common import (
    PAGE_MASK, PAGE_SHIFT, ZERO_PAGE, ChunkInfo, FileRange, StoreStats, check_chunk_size, check_key,
    VERSION_SLACK, check_range, check_version, marks_kept, page_checksum, sum_runs,
)
from vbp.chunkstore_files import (
    COPY_STEP, MAP_SIZE, NOSPACE_ERRNOS, PENDING, READY, SLOT, Chunk, boot_id, dec_key, enc_key,
    _nospace, pread_full, pread_path, punch, pwrite_all, reserve, Space, Txn, sync_dir,
    sync_paths,
    WRITE_PIECE,
)
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.errors import ChecksumError, InvalidArgument, LocalFault, NoSpace, NotFound
from vbp.layout import PAGE_SIZE, ChunkKey

_new_key = tuple.__new__  # ChunkKey(...) less its __new__, on the write_pages path

log = logging.getLogger("vbp.chunkstore")

__all__ = ["ChunkInfo", "ChunkStore", "MemoryChunkStore", "StoreStats"]

# Chunks kept marked dirty across a flush, at most, unless the store is given another
# number (`hot_max`; blockd's hot_chunks setting; see flush). With 4 MiB chunks, 1 GiB of
# hot data: what a crash re-hashes at the next open (and resyncs) beyond the unflushed chunks.
HOT_MAX = 256

# A flush makes the checksums of the chunks it marks clean durable one chunk at a time
# (an msync of the chunk's part of the sidecar) up to this many per space, else all at once.
SUMS_SYNC_EACH = 8

# A flush syncs ahead in a worker thread (sync_ahead) once this many bytes were written
# since the last one. Below it the writeback is short, and the hop to a thread and back
# would cost more than it spares: a small flush (a guest's fsync, the fio job that flushes
# after each 4 KiB write) stays one fdatasync on the loop, as fast as before.
SYNC_AHEAD_MIN = 1 << 20
# ... and again, for what was written meanwhile, at most this many times in all per flush
AHEAD_ROUNDS = 3
# Worker threads for writebacks ahead (flushes, FUA writes) at once, per store: their own,
# so that FUA writes waiting in threads for a long writeback never hold up the threads
# registry calls take (trio's default limiter, shared).
WRITEBACK_THREADS = 8

# The dirty mark of a copy-up whose copied bytes may not be durable yet (see _create).
FRESH = b"c"

# How long a generation stays marked collected (mark_collected): longer than a gateway cut
# off from the registry can be expected to go on reading a volume deleted meanwhile.
COLLECTED_KEEP = 30 * 24 * 3600

# Disk space kept allocated past the end of the index's file (_reserve_index), for the
# commits a full disk must not refuse: recovery at open, flush, fua, delete. Taken again
# once the index grew into half of it. At most a sixteenth of the filesystem (a tiny one).
INDEX_RESERVE = 4 << 20

# read_ref answers ranges of at least this many bytes with a FileRange (below it, a copy
# costs less than the extra send call).
REF_MIN = 64 * 1024


async def flush_store(store, ahead: Callable[[], None] | None = None) -> None:
    """store.flush() without holding up the event loop for the writeback: the bulk of it
    first in a worker thread (ChunkStore.sync_ahead; `ahead`, one the caller took
    already), then the flush itself on the loop, which syncs what was written meanwhile
    and keeps the store's books. While writes keep coming fast, what came during one
    sync ahead is synced ahead again, up to AHEAD_ROUNDS times in all. Measured on one
    blockd, the fdatasync of a data file after a 1 GiB prefill took 0.53 s: on the loop,
    every volume this host serves stood still for it."""
    if ahead is None:
        ahead = store.sync_ahead()
    await _ahead(store, ahead)
    store.flush()


async def _ahead(store, ahead: Callable[[], None] | None) -> None:
    """Run `ahead` (ChunkStore.sync_ahead's) in a worker thread, then what came meanwhile,
    up to AHEAD_ROUNDS in all. A bulk writeback counts in store.aheads while under way:
    syncs asked meanwhile go to threads too (writeback_due) rather than wait for it on
    the loop. The threads are the store's own (WRITEBACK_THREADS), not the ones registry
    calls (lease renewals) take."""
    rounds = 0
    while ahead is not None:
        limiter = store.writeback_limiter
        if limiter is None:
            limiter = store.writeback_limiter = trio.CapacityLimiter(WRITEBACK_THREADS)
        bulk = getattr(ahead, "bulk", True)
        store.aheads += bulk
        try:
            await trio.to_thread.run_sync(ahead, limiter=limiter)
        finally:
            store.aheads -= bulk
        rounds += 1
        ahead = store.sync_ahead() if rounds < AHEAD_ROUNDS else None


async def fua_sync(store, keys) -> None:
    """A FUA write's sync (ChunkStore.sync_chunks of its chunks, applied without the flag)
    when writeback_due(): the writeback first in a worker thread, as a flush's (or, while
    another is under way, a sync that waits for it there), then the chunks' own sync on
    the loop, which finds little left."""
    await _ahead(store, store.sync_ahead())
    store.sync_chunks(keys)


def _open_error(path: Path, e: lmdb.Error) -> LocalFault:
    """What opening the store's index failed with, for its operator: NoSpace for a full
    disk, else LocalFault naming the store (LMDB's errors are no VbpError nor OSError,
    and blockd would show their traceback)."""
    full = _nospace(e)
    if isinstance(full, NoSpace):
        return NoSpace(f"chunk store {path}: {full}")
    return LocalFault(f"chunk store {path}: cannot open its index: {e}")


class ChunkStore:
    """A host's chunks on its local disk.

    Single-threaded: call it from one thread. One open store per directory (an flock on
    `lock` refuses a second one, in this process or another).
    """

    def __init__(self, path: str | os.PathLike, capacity: int, *, verify_reads: bool = True,
                 index_map_size: int = MAP_SIZE, hot_max: int | None = None,
                 keep_recovered: bool = False):
        if not isinstance(capacity, int) or capacity < 0:
            raise InvalidArgument(f"capacity must be a non-negative byte count, not {capacity!r}")
        if hot_max is None:
            hot_max = HOT_MAX
        if type(hot_max) is not int or hot_max < 0:
            raise InvalidArgument(f"hot_max must be a non-negative chunk count, not {hot_max!r}")
        self.hot_max = hot_max  # chunks kept marked dirty through a flush (HOT_MAX)
        # `recovered` is listed again at every open until forget_recovered (blockd: once the
        # registry has it), not once: an open that fails before it is recorded loses nothing
        self.keep_recovered = keep_recovered
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LocalFault(f"chunk store {self.path} is already open (this or another "
                             "process)") from None
        self.capacity = capacity
        self.verify_reads = verify_reads  # False only for benchmarks measuring the checksum cost
        self._chunks: dict[ChunkKey, Chunk] = {}
        self._gens: dict[tuple[str, int], set[int]] = {}
        # bumped whenever a chunk comes or goes, or the store closes (lookup())
        self.layout = 0
        self._dirty: dict[ChunkKey, Chunk] = {}
        # the replica's takeover marks (replicator.replica.Replica.recent: chunk -> volume)
        # of chunks whose dirty mark a flush cleared while they were marked, as the
        # "marks" table holds them; read at open as `kept_marks` (see flush)
        self._marks: dict[ChunkKey, str] = {}
        self.recent_marks: Callable[[], dict[ChunkKey, str]] | None = None  # (the replica's)
        self._fresh: dict[ChunkKey, Chunk] = {}  # copy-ups not synced since (Chunk.fresh)
        self._unsynced = 0  # about the bytes written since the last flush or sync_ahead
        self.aheads = 0  # bulk writebacks ahead under way in worker threads (_ahead)
        self.writeback_limiter: trio.CapacityLimiter | None = None  # (_ahead's threads)
        self._spaces: dict[int, Space] = {}
        self._used = 0
        self._checksum_errors = 0
        self._closed = False
        # lineage -> the generations of it collected here (mark_collected), and when each
        # was marked
        self.collected_gens: dict[str, frozenset[int]] = {}
        self._collected_at: dict[str, dict[int, int]] = {}
        try:
            self._env = lmdb.open(str(self.path / "index"), subdir=True, max_dbs=8,
                                  map_size=index_map_size)
            try:
                self._db = {name: self._env.open_db(name.encode()) for name in
                            ("chunks", "free", "limbo", "dirty", "meta", "collected",
                             "marks")}
                self._psize = self._env.stat()["psize"]
            except BaseException:
                self._env.close()
                raise
        except BaseException as e:
            os.close(self._lock_fd)
            if isinstance(e, lmdb.Error):  # (a disk full or damaged: the operator's to see)
                raise _open_error(self.path, e) from None
            raise
        sync_dir(self.path / "index")  # LMDB's files are named durably
        sync_dir(self.path)  # ... and so are their directory and our lock
        sync_dir(self.path.parent)
        self._map_size = self._env.info()["map_size"]
        self._index_fd = -1
        self._index_reserved = 0  # bytes of the index's file with disk blocks kept
        try:
            self._index_fd = os.open(self.path / "index" / "data.mdb",
                                     os.O_RDWR | os.O_CLOEXEC)
            fs = os.fstatvfs(self._index_fd)
            self._index_keep = min(INDEX_RESERVE, fs.f_blocks * fs.f_frsize // 16)
            self._reserve_index()  # (a disk full already: the reserve kept before, if any)
            self.was_clean, self.recovered, self.recovered_lost = self._load()
            self.store_id = self._store_id()
        except BaseException as e:
            self._close_files()
            if isinstance(e, NoSpace):  # (the index's commit: name the store)
                raise NoSpace(f"chunk store {self.path}: {e}") from e
            if isinstance(e, lmdb.Error):
                raise _open_error(self.path, e) from e
            raise

    def _store_id(self) -> str:
        """This store's id: made once, when the store is created (or first opened by a
        version that has ids), kept in the index. A host whose store id is not the one its
        chunks were placed on holds none of them (blockd: the disk was replaced)."""
        with self._env.begin() as txn:
            v = txn.get(b"store_id", db=self._db["meta"])
        if v:
            return v.decode()
        new = uuid.uuid4().hex
        with self._txn() as txn:
            txn.put(b"store_id", new.encode(), db=self._db["meta"])
        return new

    def claim(self, host_id: str) -> None:
        """This store is host `host_id`'s: recorded in its index the first time, and
        InvalidArgument from then on when another host id claims it. A blockd started with
        another host's data directory (a copied configuration, a typo in host_id) would
        otherwise join as a new host holding the chunks placed on the other one, whose
        copies would then count as lost."""
        with self._env.begin() as txn:
            v = txn.get(b"host_id", db=self._db["meta"])
        if v is None:
            with self._txn() as txn:
                txn.put(b"host_id", host_id.encode(), db=self._db["meta"])
            return
        owner = v.decode()
        if owner != host_id:
            raise InvalidArgument(
                f"the chunk store {self.path} is host {owner}'s, not host {host_id}'s: set "
                f"host_id to {owner}, or give host {host_id} a data directory of its own")

    # --- open and recovery ----------------------------------------------------------------

    def _load(self) -> tuple[bool, frozenset[ChunkKey], frozenset[ChunkKey]]:
        db = self._db
        with self._env.begin() as txn:
            clean = txn.get(b"clean", db=db["meta"]) == b"1"
            boot = txn.get(b"boot", db=db["meta"])
            for k, v in txn.cursor(db=db["meta"]):
                if k.startswith(b"nslots:"):
                    cs = int(k[7:])
                    self._spaces[cs] = Space(self.path, cs, int(v))
            for name in ("free", "limbo"):
                for k, _ in txn.cursor(db=db[name]):
                    cs, slot = SLOT.unpack(k)
                    getattr(self._spaces[cs], name).append(slot)
            pending = []
            for k, v in txn.cursor(db=db["chunks"]):
                slot, cs, version, state = msgpack.unpackb(v)
                c = Chunk(dec_key(k), self._spaces[cs], slot, version, state)
                if state == PENDING:
                    pending.append(c)
                else:
                    self._remember(c)
            dirty, fresh = [], []
            for k, v in txn.cursor(db=db["dirty"]):
                c = self._chunks.get(dec_key(k))
                if c is not None:
                    (fresh if v == FRESH else dirty).append(c)
            kept = txn.get(b"recovered", db=db["meta"])
            kept_lost = txn.get(b"recovered_lost", db=db["meta"])
            collected = {bytes(k): bytes(v) for k, v in txn.cursor(db=db["collected"])}
            for k, v in txn.cursor(db=db["marks"]):
                try:
                    key = dec_key(k)
                except Exception as e:  # (damaged: it names no chunk to compare)
                    log.warning("event=takeover_mark_dropped key=%r error=%s", bytes(k), e)
                    continue
                if key in self._chunks:  # (a chunk deleted since: nothing to compare)
                    # (a damaged volume name still names the chunk, compared at every
                    # takeover of its lineage until the chunk goes: better than never)
                    self._marks[key] = bytes(v).decode("utf-8", "replace")
        self.kept_marks = dict(self._marks)
        self._load_collected(collected)
        kept, kept_lost = (frozenset(dec_key(k) for k in msgpack.unpackb(v)) if v else frozenset()
                           for v in (kept, kept_lost))
        for sp in self._spaces.values():
            heapq.heapify(sp.free)
        now = boot_id()
        same_boot = bool(now) and boot == now.encode()
        if same_boot:  # the page cache holds the copies whole: as dirty
            dirty += fresh
            fresh = []
        found = frozenset(c.key for c in dirty + fresh)
        recovered = kept | found
        # after a reboot (a power loss) the dirty chunks lost the writes they took since
        # their last flush (the records say so: replicator.recovery.mark_recovered)
        lost = kept_lost | (frozenset() if same_boot else found)
        if self.keep_recovered:
            self._recover(pending, dirty, fresh, now, recovered, lost)
        else:
            self._recover(pending, dirty, fresh, now, kept, kept_lost)
        return clean, recovered, lost

    def _recover(self, pending: list[Chunk], dirty: list[Chunk], lost: list[Chunk],
                 boot: str, keep: frozenset[ChunkKey] = frozenset(),
                 keep_lost: frozenset[ChunkKey] = frozenset()) -> None:
        for c in pending:
            c.space.limbo.append(c.slot)
        for c in lost:  # copy-ups never synced, after a reboot: dropped like PENDING ones
            self._forget(c)
            c.space.limbo.append(c.slot)
        for sp in self._spaces.values():
            sp.unwiped.extend(sp.limbo)
        self._wipe_deferred()
        for c in dirty:
            self._rehash(c)
            c.version += VERSION_SLACK
        for sp in self._spaces.values():
            sp.sync()
        db = self._db
        with self._txn() as txn:
            for c in pending + lost:  # (their slots to limbo, as in memory: freed below
                txn.delete(enc_key(c.key), db=db["chunks"])  # once wiped, else later)
                txn.delete(enc_key(c.key), db=db["dirty"])
                txn.put(SLOT.pack(c.cs, c.slot), b"", db=db["limbo"])
            for c in dirty:
                txn.put(enc_key(c.key), c.record(), db=db["chunks"])
                txn.delete(enc_key(c.key), db=db["dirty"])
            freed = self._free_limbo(txn)
            txn.put(b"clean", b"0", db=db["meta"])
            txn.put(b"boot", boot.encode(), db=db["meta"])
            if keep:  # (in the transaction that clears their dirty marks)
                txn.put(b"recovered", msgpack.packb(sorted(enc_key(k) for k in keep)),
                        db=db["meta"])
            if keep_lost:
                txn.put(b"recovered_lost", msgpack.packb(sorted(enc_key(k) for k in keep_lost)),
                        db=db["meta"])
        self._after_free_limbo(freed)  # (free in memory too, as in the index)
        for c in dirty:
            c.saved = c.version

    def _rehash(self, c: Chunk) -> None:
        """Accept the bytes on disk for every page of `c` whose checksum does not match."""
        sp, sums = c.space, c.space.sums
        for start in range(0, c.cs, COPY_STEP):
            n = min(COPY_STEP, c.cs - start)
            try:
                buf = pread_full(sp.fd, n, c.dbase + start)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                buf = None  # page by page below: the pages the disk can read
            mv = memoryview(buf) if buf is not None else None
            for off in range(0, n, PAGE_SIZE):
                i = c.sbase + ((start + off) >> PAGE_SHIFT)
                s = sums[i]
                if mv is not None:
                    page = mv[off: off + PAGE_SIZE]
                else:
                    try:
                        page = pread_full(sp.fd, PAGE_SIZE, c.dbase + start + off)
                    except OSError as e:
                        if e.errno != errno.EIO:
                            raise
                        # damage, for reads to report and the layer above to repair (a
                        # hole too: it may hold an acknowledged write, never to read as
                        # zeros; 1 is a checksum no bytes are likely to match)
                        if s == 0:
                            sums[i] = 1
                        continue
                if s == 0:
                    if page != ZERO_PAGE:
                        sums[i] = page_checksum(page)
                elif page_checksum(page) != s:
                    sums[i] = page_checksum(page)

    def _remember(self, c: Chunk) -> None:
        self.layout += 1
        self._chunks[c.key] = c
        self._gens.setdefault((c.key.lineage, c.key.index), set()).add(c.key.gen)
        self._used += c.cs

    def _forget(self, c: Chunk) -> None:
        self.layout += 1
        del self._chunks[c.key]
        gens = self._gens[(c.key.lineage, c.key.index)]
        gens.discard(c.key.gen)
        if not gens:
            del self._gens[(c.key.lineage, c.key.index)]
        self._dirty.pop(c.key, None)
        self._fresh.pop(c.key, None)
        self._used -= c.cs

    def _txn(self):
        return Txn(self._env)

    def _reserve_index(self) -> bool:
        """_index_keep bytes (INDEX_RESERVE, or less on a tiny filesystem) of disk kept
        allocated past the index's last page, taken again once the index grew into half
        of them; False if the disk has no room for them."""
        end = (self._env.info()["last_pgno"] + 1) * self._psize
        if end + self._index_keep // 2 <= self._index_reserved:
            return True
        try:
            if not reserve(self._index_fd, end + self._index_keep):
                self._index_reserved = 1 << 62  # (a filesystem without: nothing to keep)
                return True
        except OSError as e:
            if e.errno in NOSPACE_ERRNOS:
                return False
            raise
        self._index_reserved = end + self._index_keep
        return True

    def _index_pages(self) -> int:
        with self._env.begin() as txn:
            stats = [txn.stat(db) for db in self._db.values()] + [txn.stat()]
        return sum(st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"] for st in stats)

    def _load_collected(self, stored: dict[bytes, bytes]) -> None:
        """The generations marked collected (per lineage, msgpack {gen: when marked}); an
        entry that does not read so (damaged) is dropped, from the index too: it names
        nothing a read could rely on. Those marked COLLECTED_KEEP ago are then forgotten
        (expire_collected)."""
        at: dict[str, dict[int, int]] = {}
        damaged = []
        for key, value in stored.items():
            try:
                marks = msgpack.unpackb(value, strict_map_key=False)
                lineage = key.decode()
                if not (isinstance(marks, dict) and all(
                        type(g) is int and type(t) is int for g, t in marks.items())):
                    raise ValueError(f"not a map of generations: {marks!r}")
            except Exception as e:  # (anything: a map key msgpack makes unhashable, ...)
                log.warning("event=collected_mark_dropped lineage=%r error=%s", key, e)
                damaged.append(key)
                continue
            if marks:
                at[lineage] = marks
        if damaged:
            with self._txn() as txn:
                for key in damaged:
                    txn.delete(key, db=self._db["collected"])
        self._collected_at = at
        self.collected_gens = {lineage: frozenset(marks) for lineage, marks in at.items()}
        self.expire_collected()

    # --- collected generations ------------------------------------------------------------

    def expire_collected(self) -> int:
        """Forget the marks made COLLECTED_KEEP ago or earlier, in the index too (garbage
        collection calls it every pass: a host that runs for months does not keep them
        all); the number forgotten."""
        old = time.time() - COLLECTED_KEEP
        changed = {}
        for lineage, at in self._collected_at.items():
            if min(at.values()) < old:
                changed[lineage] = {g: t for g, t in at.items() if t >= old}
        if not changed:
            return 0
        with self._txn() as txn:
            for lineage, kept in changed.items():
                if kept:
                    txn.put(lineage.encode(), msgpack.packb(kept), db=self._db["collected"])
                else:
                    txn.delete(lineage.encode(), db=self._db["collected"])
        forgotten = 0
        for lineage, kept in changed.items():
            forgotten += len(self._collected_at[lineage]) - len(kept)
            if kept:
                self._collected_at[lineage] = kept
                self.collected_gens[lineage] = frozenset(kept)
            else:
                del self._collected_at[lineage], self.collected_gens[lineage]
        return forgotten

    def mark_collected(self, marks: dict[str, set[int]]) -> None:
        """Garbage collection is freeing these generations of these lineages here (`marks`:
        {lineage: generations}) because no record, export or publication reads them any
        more: a volume or snapshot deleted. A reader whose chain holds one of them is a
        gateway that reads on without having heard of the delete (cut off from the
        registry past its lease): a chunk it resolves to nothing here, or to an older
        generation than one of those, is gone, not a hole or the older bytes
        (replicator.replica.gone_below), so it is answered an error, never zeros where it
        wrote data. Kept in the index (`collected_gens` in memory) for COLLECTED_KEEP
        after each generation's mark."""
        now = int(time.time())
        new = {}
        for lineage, gens in marks.items():
            had = self._collected_at.get(lineage, {})
            fresh = [g for g in gens if g not in had]
            if fresh:
                new[lineage] = {**had, **dict.fromkeys(fresh, now)}
        if not new:
            return
        with self._txn() as txn:
            for lineage, at in new.items():
                txn.put(lineage.encode(), msgpack.packb(at), db=self._db["collected"])
        for lineage, at in new.items():
            self._collected_at[lineage] = at
            self.collected_gens[lineage] = frozenset(at)
        self.layout += 1  # (a gateway's read plans made before the marks are dropped)

    # --- queries --------------------------------------------------------------------------

    def info(self, key: ChunkKey) -> ChunkInfo | None:
        c = self._chunks.get(key)
        if c is None:
            return None
        return ChunkInfo(c.key, c.cs, c.version, c.slot)

    def resolve(self, lineage: str, index: int, chain: Sequence[int]) -> int | None:
        gens = self._gens.get((lineage, index))
        if gens:
            for gen in reversed(chain):
                if gen in gens:
                    return gen
        return None

    def held(self, lineage: str, indexes: Iterable[int]) -> list[int]:
        """The chunks of `indexes` of which some generation is here, in their order: a
        lookup each (a block status scans a thin volume's ranges with it)."""
        gens = self._gens
        return [i for i in indexes if (lineage, i) in gens]

    def gens(self, lineage: str, index: int) -> list[int]:
        """The generations of chunk (lineage, index) held here, oldest first: without a
        walk over every key (a peer asks for each chunk scrub looks at)."""
        return sorted(self._gens.get((lineage, index), ()))

    def keys(self, lineage: str | None = None) -> Iterator[ChunkKey]:
        return iter([k for k in self._chunks if lineage is None or k.lineage == lineage])

    def stats(self) -> StoreStats:
        return StoreStats(self.capacity, self._used, max(0, self.capacity - self._used),
                          len(self._chunks), self._checksum_errors)

    def page_checksums(self, key: ChunkKey) -> tuple[int, list[int]]:
        c = self._get(key)
        return c.version, c.space.sums[c.sbase: c.sbase + c.space.ppc].tolist()

    def extents(self, key: ChunkKey, offset: int, length: int) -> list[tuple[int, bool]]:
        c = self._get(key)
        check_range(offset, length, c.cs)
        if not length:
            return []
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        sums = array("Q")
        sums.frombytes(c.space.sums[c.sbase + first: c.sbase + last + 1].cast("B"))
        return sum_runs(sums, first, offset, length)

    def verify(self, key: ChunkKey) -> list[int]:
        """Pages of `key` whose bytes do not match their checksum (counted), for scrub:
        page_checksums() alone can't see local rot, replicas hold the same stored sums."""
        c = self._get(key)
        suspects = []
        for start in range(0, c.cs, COPY_STEP):
            n = min(COPY_STEP, c.cs - start)
            try:
                buf = pread_full(c.space.fd, n, c.dbase + start)
            except OSError as e:  # (pages the disk cannot read are bad pages: _page_bad)
                if e.errno != errno.EIO:
                    raise
                buf = None
            suspects += self._suspects(c, start, n, buf)
        return self._confirmed(c, suspects)

    def failing_pages(self, key: ChunkKey, offset: int, length: int) -> list[int]:
        """The pages that `length` bytes at `offset` of `key` cover whole and whose bytes
        fail their checksum now (unreadable ones too, holes never; not counted: the read
        that met them counted its own): what a read repair has to write again."""
        c = self._get(key)
        check_range(offset, length, c.cs)
        start = (offset + PAGE_MASK) & ~PAGE_MASK
        n = ((offset + length) & ~PAGE_MASK) - start
        if n <= 0:
            return []
        try:
            buf = pread_full(c.space.fd, n, c.dbase + start)
        except OSError as e:  # (the pages the disk cannot read: _suspects with None)
            if e.errno != errno.EIO:
                raise
            buf = None
        return self._suspects(c, start, n, buf)

    async def verify_soon(self, key: ChunkKey) -> list[int]:
        """verify(), with the event loop free while the disk is read. Each step's bytes are
        read in a worker thread and checked on the loop against the checksums as they are
        then; a page that fails is read and checked again on the loop before it counts
        (a write may have come between the read and the check), so the answer is
        verify()'s had it run at the end. On the loop, verify() of a chunk not in the
        page cache held every client of the host for the chunk's disk reads."""
        c = self._get(key)
        path, suspects = c.space.paths[0], []
        for start in range(0, c.cs, COPY_STEP):
            n = min(COPY_STEP, c.cs - start)
            try:
                buf = await trio.to_thread.run_sync(pread_path, path, n, c.dbase + start)
            except OSError:  # (EIO, or the store closed: the loop's own reads decide)
                buf = None
            if self._closed:
                raise LocalFault("the chunk store closed during a verify")
            if self._chunks.get(key) is not c:  # (dropped meanwhile: maybe made anew)
                return self.verify(key)
            suspects += self._suspects(c, start, n, buf)
        return self._confirmed(c, suspects)

    @staticmethod
    def _suspects(c: Chunk, start: int, n: int, buf) -> list[int]:
        """The pages of the `n` bytes at `start` of `c` (a verify's step) that `buf`, those
        bytes as read (None: unreadable), shows failing their checksum; holes never."""
        first, pages = start >> PAGE_SHIFT, n >> PAGE_SHIFT
        sums, at = c.space.sums, c.sbase + first
        if buf is None:
            return [first + i for i in range(pages) if sums[at + i]]
        found, i, mv = [], 0, memoryview(buf)
        while (bad := pagesums.check(mv[i << PAGE_SHIFT:n], sums, at + i)) >= 0:
            found.append(first + i + bad)
            i += bad + 1
        return found

    def _confirmed(self, c: Chunk, suspects: list[int]) -> list[int]:
        """The pages of `suspects` that fail their checksum read again now (counted)."""
        bad = [p for p in suspects if self._page_bad(c, p)]
        self._checksum_errors += len(bad)
        return bad

    def _page_bad(self, c: Chunk, page: int) -> bool:
        """Whether page `page` of `c` fails its checksum now (unreadable counts; a hole
        does not)."""
        s = c.space.sums[c.sbase + page]
        if not s:
            return False
        try:
            data = pread_full(c.space.fd, PAGE_SIZE, c.dbase + (page << PAGE_SHIFT))
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return True
        return page_checksum(data) != s

    def _get(self, key) -> Chunk:
        c = self._chunks.get(key)
        if c is None:
            raise NotFound(f"chunk {tuple(key)!r} is not on this host")
        return c

    # --- read -----------------------------------------------------------------------------

    def lookup(self, key: ChunkKey) -> Chunk | None:
        """The chunk `key` names, as a handle for read_at(), or None when this host has
        none. A handle stays good while `layout` is unchanged (a reader keeping handles
        compares it before each use): no chunk came or went, so the chunk it names is
        still `key`'s, in the same slot, and resolve() still answers the same."""
        return self._chunks.get(key)

    def read(self, key: ChunkKey, offset: int, length: int) -> bytes:
        c = self._chunks.get(key)
        if c is None:
            raise NotFound(f"chunk {tuple(key)!r} is not on this host")
        return self.read_at(c, offset, length)

    def read_at(self, c: Chunk, offset: int, length: int, ref: bool = False):
        """read() of the chunk behind a handle from lookup(); `ref`: read_ref() of it."""
        if length == PAGE_SIZE and not offset & PAGE_MASK and 0 <= offset < c.cs:
            s = c.space.sums[c.sbase + (offset >> PAGE_SHIFT)]
            if not s:
                return ZERO_PAGE
            buf = self._pread(c, PAGE_SIZE, offset)
            if self.verify_reads and (xxh3_64_intdigest(buf) or 1) != s:
                self._corrupt(c, offset >> PAGE_SHIFT)
            return buf
        check_range(offset, length, c.cs)
        if ref and length >= REF_MIN:
            return self._range_ref(c, offset, length)
        return self._read_range(c, offset, length) if length else b""

    def _read_range(self, c: Chunk, offset: int, length: int) -> bytes:
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        sums = c.space.sums[c.sbase + first: c.sbase + last + 1].tolist()
        if not any(sums):
            return bytes(length)
        start = first << PAGE_SHIFT
        buf = self._pread(c, (last - first + 1) << PAGE_SHIFT, start)
        holes = 0 in sums
        if self.verify_reads:
            bad = pagesums.check(buf, c.space.sums, c.sbase + first)
            if bad >= 0:
                self._corrupt(c, first + bad)
        if holes:
            buf = bytearray(buf)
            for i, s in enumerate(sums):
                if not s:
                    buf[i << PAGE_SHIFT: (i + 1) << PAGE_SHIFT] = ZERO_PAGE
        if offset == start and len(buf) == length:
            return bytes(buf) if holes else buf
        return bytes(memoryview(buf)[offset - start: offset - start + length])

    def read_ref(self, key: ChunkKey, offset: int, length: int):
        """read(), for a caller that sends the bytes before doing anything else (the NBD
        server): a range of REF_MIN bytes or more without a hole is checked in place,
        through a read-only map of the data file, and returned as a FileRange sent from
        that map, so the bytes are never copied into a buffer of this process. Otherwise
        (small, holes, a file shorter than its slots after a lost ftruncate) what read()
        returns."""
        c = self._chunks.get(key)
        if c is None:
            raise NotFound(f"chunk {tuple(key)!r} is not on this host")
        return self.read_at(c, offset, length, True)

    def _range_ref(self, c: Chunk, offset: int, length: int):
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        sp = c.space
        sums = sp.sums[c.sbase + first: c.sbase + last + 1].tolist()
        start = c.dbase + (first << PAGE_SHIFT)
        end = c.dbase + ((last + 1) << PAGE_SHIFT)
        view = sp.data_view(end) if 0 not in sums else None
        if view is None or not sp.cached(start, end):  # (read from disk: a pread's EIO)
            return self._read_range(c, offset, length)
        if self.verify_reads:
            bad = pagesums.check(view[start:end], sp.sums, c.sbase + first)
            if bad >= 0:
                self._corrupt(c, first + bad)
        return FileRange(sp, c.dbase + offset, length)

    def _page(self, c: Chunk, page: int) -> bytes:
        """One page as stored, verified (used to merge partial-page writes)."""
        s = c.space.sums[c.sbase + page]
        if not s:
            return ZERO_PAGE
        buf = self._pread(c, PAGE_SIZE, page << PAGE_SHIFT)
        if page_checksum(buf) != s:
            self._corrupt(c, page)
        return buf

    def _pread(self, c: Chunk, n: int, offset: int) -> bytes:
        """`n` bytes at `offset` (whole pages) of `c` as stored. A page the disk cannot
        read (EIO) is damage like a page failing its checksum: ChecksumError naming it,
        which the gateway repairs from a good replica, where an OSError would fail the
        client's request."""
        try:
            return pread_full(c.space.fd, n, c.dbase + offset)
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            bad = self._unreadable(c, offset, n) or [0]
            self._corrupt(c, (offset + bad[0]) >> PAGE_SHIFT)

    @staticmethod
    def _unreadable(c: Chunk, offset: int, n: int) -> list[int]:
        """The offsets (in the range) of the pages of `n` bytes at `offset` of `c` that
        the disk cannot read, page by page (slow: for when a read of them all failed)."""
        bad = []
        for off in range(0, n, PAGE_SIZE):
            try:
                os.pread(c.space.fd, PAGE_SIZE, c.dbase + offset + off)
            except OSError as e:
                if e.errno != errno.EIO:
                    raise
                bad.append(off)
        return bad

    def _corrupt(self, c: Chunk, page: int):
        self._checksum_errors += 1
        raise ChecksumError(f"checksum mismatch in chunk {tuple(c.key)!r} page {page}",
                            key=c.key, page=page)

    # --- write and zero -------------------------------------------------------------------

    def write(self, key: ChunkKey, offset: int, data, *, chunk_size: int,
              base: int | None = None, version: int | None = None, fua: bool = False) -> int:
        if type(data) is memoryview and (data.format != "B" or data.ndim != 1):
            data = data.cast("B")
        n = len(data)
        c = self._chunks.get(key)
        created = c is None
        if created:
            c = self._create(key, offset, n, chunk_size, base, version)
        elif c.cs != chunk_size or offset < 0 or offset + n > chunk_size:
            self._check_request(c, offset, n, chunk_size)
        if version is not None:
            check_version(version)
        if not c.dirty:
            self._mark_dirty(c)
        c.touched = True
        self._unsynced += n
        if n:
            try:
                self._put(c, offset, data, n)
            except NoSpace:
                if created:
                    self._drop(c)
                raise
        c.version = c.version + 1 if version is None else version
        if fua:
            self._sync_chunk(c)
        return c.version

    def write_pages(self, lineage: str, gen: int, items, start: int, chunk_size: int) -> int:
        """write() of each item of items[start:] ((index, offset, data) each, to the chunk
        (lineage, index, gen) of size `chunk_size`), in order, with no base, version or
        FUA, for as long as each is one whole page of a chunk here (bytes, or a memoryview
        of bytes): the index of the first item it did not write, len(items) when it wrote
        them all. The caller writes that one by write() (a chunk to make, a part of a
        page, ...) and may call again for the rest. A failure propagates as write()'s,
        the items before it written, and `item` set on it: the index of the item it
        failed (which may have reached the disk, as a write() that fails in its pwrite).
        The small writes of a WriteBatch, or of a gateway's run, come here one after the
        other: this is write() and _put() for one page, with no call of either."""
        chunks = self._chunks
        end = len(items)
        k = start
        try:
            while k < end:
                index, offset, data = items[k]
                c = chunks.get(_new_key(ChunkKey, (lineage, index, gen)))
                if (c is None or len(data) != PAGE_SIZE or offset & PAGE_MASK
                        or not 0 <= offset < chunk_size or c.cs != chunk_size
                        or type(data) is memoryview and data.format != "B"):
                    return k
                if not c.dirty:
                    self._mark_dirty(c)
                c.touched = True
                self._unsynced += PAGE_SIZE
                sp = c.space
                try:  # (as _put's, for one page)
                    if os.pwrite(sp.fd, data, c.dbase + offset) != PAGE_SIZE:
                        pwrite_all(sp.fd, data, c.dbase + offset)
                except OSError as e:
                    self._write_failed(c, offset, data, e)
                sp.sums[c.sbase + (offset >> PAGE_SHIFT)] = xxh3_64_intdigest(data) or 1
                c.version += 1
                k += 1
            return k
        except Exception as e:
            e.item = k
            raise

    def zero(self, key: ChunkKey, offset: int, length: int, *, chunk_size: int,
             base: int | None = None, version: int | None = None, fua: bool = False) -> int:
        c = self._chunks.get(key)
        created = c is None
        if created:
            c = self._create(key, offset, length, chunk_size, base, version)
        else:
            self._check_request(c, offset, length, chunk_size)
        check_version(version)
        if not c.dirty:
            self._mark_dirty(c)
        c.touched = True
        end = offset + length
        a = (offset + PAGE_MASK) & ~PAGE_MASK  # first whole page
        b = end & ~PAGE_MASK  # end of the last whole page
        try:
            if a >= b:
                if length:
                    self._put(c, offset, bytes(length), length)
            else:
                if offset < a:
                    self._put(c, offset, bytes(a - offset), a - offset)
                if b < end:
                    self._put(c, b, bytes(end - b), end - b)
                sp = c.space
                i, j = (c.sbase + (a >> PAGE_SHIFT)) * 8, (c.sbase + (b >> PAGE_SHIFT)) * 8
                old = sp.mm[i:j]
                sp.mm[i:j] = bytes(j - i)
                try:
                    punch(sp.fd, c.dbase + a, b - a)
                except OSError as e:  # (the punch fell back to writing zeros)
                    # the pages' own checksums back first, as before a failed write: a
                    # real page the zeros did not reach keeps its checksum (its old bytes,
                    # or damage from before, never re-hashed), one they reached takes theirs
                    sp.mm[i:j] = old
                    self._write_failed(c, a, memoryview(bytes(b - a)), e, "zeroing")
        except NoSpace:
            if created:
                self._drop(c)
            raise
        c.version = c.version + 1 if version is None else version
        if fua:
            self._sync_chunk(c)
        return c.version

    def _check_request(self, c: Chunk, offset, length, chunk_size) -> None:
        if chunk_size != c.cs:
            raise InvalidArgument(
                f"chunk {tuple(c.key)!r} has size {c.cs}, the request says {chunk_size}"
            )
        check_range(offset, length, c.cs)

    def _put(self, c: Chunk, offset: int, data, n: int) -> None:
        """Write `data` at `offset` of `c` and update the pages' checksums."""
        sp = c.space
        if not (offset | n) & PAGE_MASK:
            buf, start = data, offset
        else:
            start = offset & ~PAGE_MASK
            end = offset + n
            last = (end - 1) >> PAGE_SHIFT
            buf = bytearray(((last + 1) << PAGE_SHIFT) - start)
            if offset & PAGE_MASK:
                buf[:PAGE_SIZE] = self._page(c, start >> PAGE_SHIFT)
            if end & PAGE_MASK and (last << PAGE_SHIFT > start or not offset & PAGE_MASK):
                buf[-PAGE_SIZE:] = self._page(c, last)
            buf[offset - start: end - start] = data
        sums = sp.sums
        p = c.sbase + (start >> PAGE_SHIFT)
        try:
            if len(buf) > WRITE_PIECE:  # (the pieces and the checksums in one C call)
                pagesums.put(sp.fd, buf, c.dbase + start, WRITE_PIECE, sums, p)
                return
            if os.pwrite(sp.fd, buf, c.dbase + start) != len(buf):
                pwrite_all(sp.fd, buf, c.dbase + start)  # short: redo it whole (idempotent)
        except OSError as e:
            self._write_failed(c, start, buf, e)
        if len(buf) == PAGE_SIZE:
            sums[p] = xxh3_64_intdigest(buf) or 1
            return
        pagesums.fill(buf, sums, p)

    def _write_failed(self, c: Chunk, start: int, buf, e: OSError, doing: str = "writing"):
        """A pwrite of `buf` (whole pages) at `start` of `c` failed with `e`: each page
        settled (_settle_failed), then NoSpace raised for a full disk, else `e` again."""
        self._settle_failed(c, start, buf)
        if e.errno in NOSPACE_ERRNOS:
            raise NoSpace(f"the disk is full {doing} chunk {tuple(c.key)!r}") from e
        raise e

    def _settle_failed(self, c: Chunk, start: int, buf) -> None:
        """After a failed pwrite of `buf` (whole pages) at `start`: each page takes what
        reached the disk, as the crash recovery would (_rehash), so a later crash changes
        nothing a flush acknowledged meanwhile. A page the write reached holds its new
        bytes: its checksum follows, and a hole it reached becomes a real page (left a
        hole, its bytes would come back as data at the next crash recovery). A real page
        holding neither its old bytes nor the new ones keeps its checksum: that is damage
        from before, for reads to find and repair, never to be hidden by a new checksum.
        (The write was not acknowledged: either outcome is allowed, and the gateway
        records this copy stale for it.)"""
        sums, sp = c.space.sums, c.space
        mv = memoryview(buf)
        for off in range(0, len(mv), PAGE_SIZE):
            i = c.sbase + ((start + off) >> PAGE_SHIFT)
            try:
                disk = pread_full(sp.fd, PAGE_SIZE, c.dbase + start + off)
            except OSError:  # (unreadable: the page keeps its checksum; reads will say so)
                continue
            if sums[i]:
                reached = disk == mv[off: off + PAGE_SIZE]  # else old bytes, or damage
            else:
                reached = disk != ZERO_PAGE  # a hole the write reached
            if reached:
                sums[i] = page_checksum(disk)

    def has_clean(self) -> bool:
        """Some chunk here is not marked dirty (mark_dirty has something to do)."""
        return len(self._chunks) > len(self._dirty)

    def mark_dirty(self, keys) -> None:
        """Mark the chunks of `keys` that are here and not marked dirty, all in one synced
        index commit: a batch of writes about to come (the NBD server hands its batches
        to the volume's gateway first, the peer server its batches to the replica) pays
        one commit for the chunks a flush cleaned, where write() would pay one for each.
        Marking a chunk that is then not written costs its recovery a re-hash after a
        crash, nothing more."""
        todo = [c for c in map(self._chunks.get, keys) if c is not None and not c.dirty]
        if todo:
            self._mark_dirty(*todo)

    def _mark_dirty(self, *chunks: Chunk) -> None:
        with self._txn() as txn:
            for c in chunks:
                txn.put(enc_key(c.key), b"", db=self._db["dirty"])
        for c in chunks:
            c.dirty = True
            self._dirty[c.key] = c

    def dirty_indexes(self, lineage: str, gen: int) -> list[int]:
        """Chunks of generation `gen` of `lineage` marked dirty: written since the last flush
        or among the hot set kept marked through it."""
        return sorted(k.index for k in self._dirty if k.lineage == lineage and k.gen == gen)

    def writeback_due(self) -> bool:
        """Whether a sync now may have much to write back: much was written since the last
        flush or sync ahead (SYNC_AHEAD_MIN), or a writeback ahead is under way (a sync
        on the loop would wait for it). A FUA write then syncs by fua_sync."""
        return self._unsynced >= SYNC_AHEAD_MIN or self.aheads > 0

    def sync_chunks(self, keys) -> None:
        """Make the chunks of `keys` that are here durable as write(..., fua=True) makes
        its chunk: what a FUA write applied with fua=False needs once its writeback went
        ahead in a worker thread (sync_ahead), so the event loop pays a short fdatasync,
        not the file's whole writeback. Keys of chunks not here are skipped (a zeroing
        that allocated nothing wrote nothing)."""
        for key in keys:
            c = self._chunks.get(key)
            if c is not None:
                self._sync_chunk(c)

    def _sync_chunk(self, c: Chunk) -> None:
        c.space.sync_data()
        if len(self._spaces) == 1:  # that fdatasync covered everything written: nothing
            self._unsynced = 0  # is left for a sync ahead (a stream of FUA writes alone)
        if not c.fresh and c.version - c.saved < VERSION_SLACK:
            return  # marked dirty (every write marks it first): as a flush of a hot chunk
        c.space.sync_sums(c.slot)
        with self._txn() as txn:
            txn.put(enc_key(c.key), c.record(), db=self._db["chunks"])
            if c.fresh:
                txn.put(enc_key(c.key), b"", db=self._db["dirty"])
        c.saved = c.version
        if c.fresh:
            c.fresh = False
            del self._fresh[c.key]

    def _settle_fresh(self) -> None:
        """Make every copy-up durable now (its FRESH mark cleared): before a chunk one of
        them was copied from may go."""
        for sp in {c.space for c in self._fresh.values()}:
            sp.sync()
        with self._txn() as txn:
            for c in self._fresh.values():
                txn.put(enc_key(c.key), b"", db=self._db["dirty"])
        for c in self._fresh.values():
            c.fresh = False
        self._fresh.clear()

    # --- allocation -----------------------------------------------------------------------

    def _create(self, key, offset, length, chunk_size, base, version) -> Chunk:
        key = check_key(key)
        check_chunk_size(chunk_size)
        check_range(offset, length, chunk_size)
        check_version(version)
        src = None
        if base is not None:
            if not isinstance(base, int) or base < 0:
                raise InvalidArgument(f"not a generation: {base!r}")
            if base != key.gen:
                src = self._chunks.get(ChunkKey(key.lineage, key.index, base))
            if src is not None and src.cs != chunk_size:
                raise InvalidArgument(
                    f"base chunk {tuple(src.key)!r} has size {src.cs}, not {chunk_size}"
                )
        if src is None:
            return self._allocate(key, chunk_size, READY)
        c = self._allocate(key, chunk_size, PENDING)
        try:
            self._copy_up(src, c)
            c.state = READY
            with self._txn() as txn:
                txn.put(enc_key(c.key), c.record(), db=self._db["chunks"])
                txn.put(enc_key(c.key), FRESH, db=self._db["dirty"])
        except Exception as e:
            # The index still says PENDING: no chunk may stay behind in memory, where a
            # write would be acknowledged to it (and lost when the next open drops it),
            # nor a half copy read in place of its base.
            c.state = PENDING
            try:
                self._drop(c)
            except Exception:  # (its slot's commit too met a full disk)
                if self._chunks.get(c.key) is c:
                    self._forget(c)  # the recovery at the next open drops the PENDING record
            if isinstance(e, OSError) and e.errno in NOSPACE_ERRNOS:
                raise NoSpace(f"the disk is full copying up chunk {tuple(key)!r}") from e
            raise
        except BaseException:
            c.state = PENDING
            self._forget(c)  # interrupted: recovery at the next open drops the PENDING record
            raise
        c.dirty = c.touched = c.fresh = True
        self._dirty[c.key] = c
        self._fresh[c.key] = c
        self._unsynced += chunk_size
        return c

    def _copy_up(self, src: Chunk, dst: Chunk) -> None:
        sp, sums = src.space, src.space.sums
        flags = sums[src.sbase: src.sbase + sp.ppc].tolist()
        i = 0
        while i < sp.ppc:
            if not flags[i]:
                i += 1
                continue
            j = i
            while j < sp.ppc and flags[j]:
                j += 1
            off, n = i << PAGE_SHIFT, (j - i) << PAGE_SHIFT
            while n:
                done = os.copy_file_range(sp.fd, sp.fd, n, src.dbase + off, dst.dbase + off)
                if done == 0:  # past EOF of a file whose ftruncate was lost: zeros
                    pwrite_all(sp.fd, bytes(n), dst.dbase + off)
                    done = n
                off += done
                n -= done
            i = j
        sums[dst.sbase: dst.sbase + sp.ppc] = sums[src.sbase: src.sbase + sp.ppc]

    def _allocate(self, key: ChunkKey, cs: int, state: int) -> Chunk:
        if self._used + cs > self.capacity:
            raise NoSpace(f"no free slot of {cs} bytes: {self._used} of {self.capacity} used")
        if self._index_pages() * self._psize > 0.4 * self._map_size:
            # a flush may rewrite every page (copy-on-write): keep room for it to commit
            raise NoSpace("the chunk index is nearly full: no new chunks")
        if not self._reserve_index():
            raise NoSpace("the disk is full: no room kept for the chunk index, no new chunks")
        sp = self._spaces.get(cs)
        if sp is None:
            try:
                sp = self._spaces[cs] = Space(self.path, cs, 0)
            except OSError as e:
                raise self._oserror(e) from e
        if not sp.free and sp.limbo:
            self._settle_limbo()
        grow = not sp.free
        slot = sp.nslots if grow else sp.free[0]
        if grow:
            try:
                sp.ensure(slot + 1)
            except OSError as e:
                raise self._oserror(e) from e
        c = Chunk(key, sp, slot, 0, state)
        db = self._db
        orphan = None
        with self._txn() as txn:
            old = txn.get(enc_key(key), db=db["chunks"])
            if old is not None:  # a copy-up whose cleanup met a full disk left it PENDING
                oslot, ocs, _, ostate = msgpack.unpackb(old)  # (_create): to limbo, as the
                if ostate == PENDING:  # next open would put it, not overwritten and lost
                    orphan = (self._spaces[ocs], oslot)
                    txn.put(SLOT.pack(ocs, oslot), b"", db=db["limbo"])
            if grow:
                txn.put(b"nslots:%d" % cs, b"%d" % (slot + 1), db=db["meta"])
            else:
                txn.delete(SLOT.pack(cs, slot), db=db["free"])
            txn.put(enc_key(key), c.record(), db=db["chunks"])
            if state == READY:
                txn.put(enc_key(key), b"", db=db["dirty"])
        if grow:
            sp.nslots = slot + 1
        else:
            heapq.heappop(sp.free)
        if orphan is not None:  # (wiped before it is freed: _wipe_deferred, _free_limbo)
            orphan[0].limbo.append(orphan[1])
            orphan[0].unwiped.append(orphan[1])
        self._remember(c)
        if state == READY:
            c.dirty = c.touched = True
            self._dirty[key] = c
        return c

    @staticmethod
    def _oserror(e: OSError) -> Exception:
        if e.errno in NOSPACE_ERRNOS:
            return NoSpace(f"the disk is full: {e}")
        return e

    def delete(self, key: ChunkKey) -> None:
        self._drop(self._get(key))

    def _drop(self, c: Chunk) -> None:
        if self._fresh and any(f.key.lineage == c.key.lineage and f.key.index == c.key.index
                               for f in self._fresh.values() if f is not c):
            self._settle_fresh()  # a copy made from c must not need c after a reboot
        with self._txn() as txn:
            txn.delete(enc_key(c.key), db=self._db["chunks"])
            txn.delete(enc_key(c.key), db=self._db["dirty"])
            if c.key in self._marks:
                txn.delete(enc_key(c.key), db=self._db["marks"])
            txn.put(SLOT.pack(c.cs, c.slot), b"", db=self._db["limbo"])
        self._marks.pop(c.key, None)
        self._forget(c)
        c.space.limbo.append(c.slot)
        c.space.unwiped.append(c.slot)
        self._wipe_deferred()

    def _wipe_deferred(self) -> None:
        """Wipe the slots of limbo that wait for it (Space.unwiped): at once, unless
        FileRanges are out in their space (read_ref). A range made before its chunk went
        may still be sending the slot's bytes, which must not turn to zeros under it: the
        chunk's data may live on in another generation (a copy-up, a resync). A wipe that
        fails (the punch fell back to writing zeros, on a full disk) is tried again at
        the next flush; until wiped, a slot stays in limbo (_free_limbo)."""
        for sp in self._spaces.values():
            try:
                sp.wipe_deferred()
            except OSError:
                pass

    def _free_limbo(self, txn) -> list[Space]:
        """In `txn`, move limbo slots to free; their wipes must be durable already. The
        spaces whose limbo went, for _after_free_limbo: a space with FileRanges out
        (read_ref) keeps its limbo, since a range may still be sending a slot freed after
        it was made, and so does one with a slot not wiped yet: reused, it would give a
        new chunk's holes the old bytes, which a crash recovery turns into data."""
        freed = [sp for sp in self._spaces.values()
                 if sp.limbo and not sp.ranges and not sp.unwiped]
        for sp in freed:
            for slot in sp.limbo:
                txn.delete(SLOT.pack(sp.cs, slot), db=self._db["limbo"])
                txn.put(SLOT.pack(sp.cs, slot), b"", db=self._db["free"])
        return freed

    @staticmethod
    def _after_free_limbo(freed: list[Space]) -> None:
        for sp in freed:
            for slot in sp.limbo:
                heapq.heappush(sp.free, slot)
            sp.limbo.clear()

    def _settle_limbo(self) -> None:
        self._wipe_deferred()
        for sp in self._spaces.values():
            if sp.limbo and not sp.ranges:
                sp.sync()
        with self._txn() as txn:
            freed = self._free_limbo(txn)
        self._after_free_limbo(freed)

    # --- durability -----------------------------------------------------------------------

    def sync_ahead(self) -> Callable[[], None] | None:
        """The slow half of the next flush, for a worker thread while the event loop goes
        on serving: an fdatasync of the files that flush() would sync, through descriptors
        of its own (sync_paths). flush() must still follow, on the loop as always: it syncs
        what was written meanwhile (little: the bulk of the dirty pages went here), and
        only it claims durability, commits and clears marks, in the order the module's
        rules give. None when little was written since the last flush or sync ahead
        (SYNC_AHEAD_MIN) and no such writeback is under way; a sync ahead counts from its
        start. The callable's `bulk` says which: the writeback of what was written (run
        it counted in `aheads`, as _ahead does), or, while one is under way, a sync that
        would wait for it and is better left to wait in a thread than on the loop."""
        bulk = self._unsynced >= SYNC_AHEAD_MIN
        if not bulk and not self.aheads:
            return None
        if bulk:
            self._unsynced = 0
        spaces = {c.space for c in self._dirty.values() if c.touched}
        spaces.update(sp for sp in self._spaces.values() if sp.limbo)
        # the sidecar too where the flush will sync checksums: slots to free, or marks to
        # clear (a flush of hot chunks alone syncs no checksums: its pages would be
        # written for nothing)
        sums = self._cold_count(True) > 0
        paths = [p for sp in spaces if sp.failed is None
                 for p in (sp.paths if sums or sp.limbo else sp.paths[:1])]
        if not paths:
            return None
        ahead = functools.partial(sync_paths, paths)
        ahead.bulk = bulk
        return ahead

    def _cold_count(self, keep_hot: bool) -> int:
        """How many of the chunks marked dirty, least recently written first, a flush
        clears: none while fewer than hot_max // 4 are past the hot set. A guest writing
        all over a volume larger than the hot set marks a few new chunks between two
        flushes; clearing as few at each flush would cost each flush an msync and a
        commit more than its one fdatasync. Let a quarter of the hot set build up, then
        clear it in one go (the bound of what a crash re-hashes is hot_max * 1.25)."""
        n = len(self._dirty)
        if not keep_hot:
            return n
        excess = n - self.hot_max
        return excess if excess > 0 and excess >= self.hot_max // 4 else 0

    def flush(self, keep_hot: bool = True) -> None:
        self._unsynced = 0
        limbo = any(sp.limbo for sp in self._spaces.values())
        written = [c for c in self._dirty.values() if c.touched]
        if not written and not limbo and (keep_hot or not self._dirty):
            return
        db = self._db
        # The hot_max chunks written last keep their dirty mark through the flush: they
        # are likely written again soon, and their next write then needs no synced index
        # commit of its own. The others lose it (flushing made them clean). This is DRBD's
        # activity log: marks cover a hot set (least recently written out first), not only
        # what is unflushed; a crash costs a re-hash and a resync of the hot set (page
        # diffs), never a lost write. `_dirty` is kept in order of last write at a flush.
        dirty = self._dirty
        for c in written:
            del dirty[c.key]
            dirty[c.key] = c
        cold = list(dirty.values())[:self._cold_count(keep_hot)]
        # Durable before the commit: the data written, and the checksums of the chunks
        # whose mark it clears. A chunk that stays marked needs no durable checksums (the
        # recovery re-hashes marked chunks from their durable bytes), so a flush of hot
        # chunks alone is one fdatasync, no msync. A space with slots in limbo syncs its
        # whole sidecar: the wipes' zeroed checksums must be durable before the slots are
        # freed.
        self._wipe_deferred()
        whole = {sp for sp in self._spaces.values() if sp.limbo}
        by_space: dict = {}
        for c in cold:
            by_space.setdefault(c.space, []).append(c)
        for sp, cs in by_space.items():
            if len(cs) > SUMS_SYNC_EACH:
                whole.add(sp)
        for sp in {c.space for c in written} | whole:
            if sp in whole:
                sp.sync()
            else:
                sp.sync_data()
        for sp, cs in by_space.items():
            if sp not in whole:
                for c in cs:
                    sp.sync_sums(c.slot)
        # The data is durable. With no mark to clear, no limbo to free and no copy-up to
        # settle, the versions need not be: every chunk written stays marked, and recovery
        # gives it its persisted version + VERSION_SLACK, above any acknowledged here while
        # none ran that far (the module's durability rules).
        if not cold and not limbo and not self._fresh and all(
                c.version - c.saved < VERSION_SLACK for c in written):
            for c in written:
                c.touched = False
            return
        unsaved = [c for c in dirty.values() if c.version != c.saved]
        put, gone = self._marks_kept(cold)
        with self._txn() as txn:
            for c in unsaved:  # written since, or earlier by a flush that needed no commit
                txn.put(enc_key(c.key), c.record(), db=db["chunks"])
            for c in written:
                if c.fresh:  # synced above: an ordinary mark now (cold ones go below)
                    txn.put(enc_key(c.key), b"", db=db["dirty"])
            for c in cold:
                txn.delete(enc_key(c.key), db=db["dirty"])
            for key, volume in put.items():
                txn.put(enc_key(key), volume.encode(), db=db["marks"])
            for key in gone:
                txn.delete(enc_key(key), db=db["marks"])
            freed = self._free_limbo(txn)
        self._marks.update(put)
        for key in gone:
            del self._marks[key]
        for c in unsaved:
            c.saved = c.version
        for c in written:
            c.touched = c.fresh = False
        self._fresh.clear()
        for c in cold:
            c.dirty = False
            del dirty[c.key]
        self._after_free_limbo(freed)

    def _marks_kept(self, cold: list[Chunk]) -> tuple[dict[ChunkKey, str], list[ChunkKey]]:
        """What a flush clearing the dirty marks of `cold` changes in the "marks" table:
        (entries to put, keys to delete).

        A takeover compares the chunks a replica names in its DirtyChunks answer: those
        marked dirty here, and those its replica noted written by a lease holder not yet
        known settled (Replica.recent), which live in memory. A chunk's dirty mark covers
        those notes through a restart only until a flush clears it (every clearing flush,
        and the close of a clean stop, which clears them all). So the notes of a chunk
        whose mark is cleared are kept here instead, and the next open hands them back
        (`kept_marks`): restarted, the replica still names a dead holder's last writes,
        however late the takeover. Notes dropped since (their holder lived on: settled)
        leave the table at the next flush that clears marks."""
        if not cold or self.recent_marks is None:
            return {}, []
        return marks_kept(self._marks, (c.key for c in cold), self.recent_marks())

    def forget_recovered(self) -> None:
        """The chunks `recovered` lists are taken care of (keep_recovered): the next open
        lists only those a crash leaves then."""
        with self._txn() as txn:
            txn.delete(b"recovered", db=self._db["meta"])
            txn.delete(b"recovered_lost", db=self._db["meta"])
        self.recovered = self.recovered_lost = frozenset()

    def close(self) -> None:
        """Flush, mark the store clean, and close it. A flush that fails (a poisoned
        store: LocalFault) raises with the store closed all the same, not marked clean:
        its files and the flock are let go, so the next open (recovery) is not refused."""
        if self._closed:
            return
        try:
            self.flush(keep_hot=False)
            with self._txn() as txn:
                txn.put(b"clean", b"1", db=self._db["meta"])
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self._closed = True
        self.layout += 1  # handles name closed files now
        for sp in self._spaces.values():
            sp.close()
        self._spaces.clear()
        self._env.close()
        if self._index_fd >= 0:
            os.close(self._index_fd)
            self._index_fd = -1
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- checks ---------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Every problem a crash could leave, for tests and operators (run on a store that
        nothing else uses): fsck's slot ownership, plus each chunk's pages against their
        checksums (after the recovery at open every page must match: metadata and data
        never disagree), dirty records naming no chunk, slots past the end of the sums.
        Reading every page is slow on a big store; counted like scrub's findings."""
        problems = self.fsck()
        with self._env.begin() as txn:
            for k, _ in txn.cursor(db=self._db["dirty"]):
                if dec_key(k) not in self._chunks:
                    problems.append(f"dirty record for chunk {dec_key(k)} that does not exist")
        for key in sorted(self._chunks):
            c = self._chunks[key]
            if (c.slot + 1) * c.space.ppc * 8 > len(c.space.mm):
                problems.append(f"chunk {key}: slot {c.slot} is past the end of its checksums")
                continue
            bad = self.verify(key)
            if bad:
                problems.append(f"chunk {key}: pages {bad[:8]} do not match their checksums")
        return problems

    def fsck(self) -> list[str]:
        """Problems found comparing the durable index with itself and with memory: every
        slot below a size's high-water owned by exactly one of chunks/free/limbo; each
        chunk's persisted version the one memory says it is (`saved`), and its own version
        when it is not marked dirty (only a marked chunk may run ahead: the recovery rule);
        the dirty marks those of memory, FRESH ones those of copy-ups not yet settled."""
        problems: list[str] = []
        owners: dict[tuple[int, int], list[str]] = {}
        db = self._db
        with self._env.begin() as txn:
            nslots = {int(k[7:]): int(v) for k, v in txn.cursor(db=db["meta"])
                      if k.startswith(b"nslots:")}
            for k, v in txn.cursor(db=db["chunks"]):
                slot, cs, version, state = msgpack.unpackb(v)
                owners.setdefault((cs, slot), []).append(f"chunk {dec_key(k)}")
                c = self._chunks.get(dec_key(k))
                if c is None or c.slot != slot or c.cs != cs:
                    problems.append(f"chunk {dec_key(k)} in the index differs from memory")
                elif version != c.saved:
                    problems.append(f"chunk {dec_key(k)}: index version {version}, memory "
                                    f"says {c.saved} was persisted")
                elif not c.dirty and c.version != version:
                    problems.append(f"chunk {dec_key(k)} not marked dirty at version "
                                    f"{c.version}, {version} persisted")
            marks = {dec_key(k): v for k, v in txn.cursor(db=db["dirty"])}
            for name in ("free", "limbo"):
                for k, _ in txn.cursor(db=db[name]):
                    owners.setdefault(SLOT.unpack(k), []).append(name)
        marked = {k: FRESH if c.fresh else b"" for k, c in self._chunks.items() if c.dirty}
        if marks != marked or set(self._dirty) != set(marked):
            problems.append(f"dirty marks {sorted(marks.items())} differ from memory's "
                            f"{sorted(marked.items())} (listed: {sorted(self._dirty)})")
        for (cs, slot), who in owners.items():
            if len(who) > 1:
                problems.append(f"slot {slot} of size {cs} owned by {who}")
            if slot >= nslots.get(cs, 0):
                problems.append(f"slot {slot} of size {cs} beyond the high-water mark")
        for cs, n in nslots.items():
            for slot in range(n):
                if (cs, slot) not in owners:
                    problems.append(f"slot {slot} of size {cs} leaked (no owner)")
        if len(self._chunks) != sum(1 for w in owners.values() for x in w if x.startswith("chunk")):
            problems.append("memory holds chunks the index does not")
        return problems


def read_index(path: str | os.PathLike) -> dict[ChunkKey, ChunkInfo]:
    """Where each chunk lives in the store at `path`, read from its index without opening the
    store (it may be open in a running blockd): for inspection and for tests that damage a
    data file on purpose (`data-<size>.bin`, slot n at n * chunk_size). The versions are the
    persisted ones: a chunk marked dirty may be ahead of its by less than VERSION_SLACK."""
    env = lmdb.open(str(Path(path) / "index"), subdir=True, max_dbs=8, readonly=True)
    try:
        db = env.open_db(b"chunks", create=False)
        with env.begin() as txn:
            out = {}
            for k, v in txn.cursor(db=db):
                slot, cs, version, state = msgpack.unpackb(v)
                if state == READY:
                    key = dec_key(k)
                    out[key] = ChunkInfo(key, cs, version, slot)
            return out
    finally:
        env.close()
