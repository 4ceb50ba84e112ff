"""The replica role: applies chunk requests from gateways to this host's chunk store.

Theory of operation (DESIGN.md, Data path; Words: lease / fencing token, epoch):
- Every write carries the volume's fencing token. A replica remembers the newest token it
  has seen per volume and refuses anything older with Fenced, so a gateway that lost its
  lease (partition, pause, migration) can never overwrite what its successor wrote.
- Every request carries the sender's epoch. A replica refuses a write from an epoch older
  than its own map with StaleEpoch; the gateway refreshes its map and retries.
- Copy-on-write: a write to generation `gen` of a chunk that does not exist yet copies up
  the newest older generation of the volume's chain that this host holds, locally.
  Except while resync brings this copy current (`resyncing`): its older generations may
  still miss acknowledged writes, so a generation made from them would hold stale bytes
  outside the write's range, and once the resync has made its last comparison nothing
  would look at it again before the record is cleared. Such a write is refused
  (StaleCopy: the gateway records the copy stale again) and noted in `refused`; resync
  does not count a copy current after a refusal (replicator/recovery.py).
- The local gateway calls these methods directly (no transport), remote gateways reach
  them through the peer protocol; both go through the same checks.
- Every client write or zero applied notes when and where (`written`: per lineage and
  chunk, (time, start, end) on the trio clock, virtual under the simulation). A copy of
  the same write may still be on its way to another replica; resync must not overwrite
  those bytes here from that one until the write has landed there or failed
  (replicator/recovery.py, which also forgets entries older than its window).
- A Flush with much to write back answers with an awaitable (the peer server runs it in
  a task): the bulk of the writeback happens in a worker thread first (flush_store), so one
  volume's flush does not stall this host's event loop, and with it every request of every
  volume it serves. A small one is answered at once, one fdatasync on the loop.
- Logs: a refused or failed client request is one line (warning; info for the transient
  refusals a gateway retries or routes around), at most a few a period per volume and
  error (vbp.loglimit: a full disk refuses every write), an applied one a debug line; both
  carry the request's id (vbp.reqid) when set, so the gateway's line and the replica's line
  about one write share it.
"""

from __future__ import annotations

import bisect
import logging
import math
import time
from dataclasses import replace as dc_replace
from operator import itemgetter
from typing import Callable

import trio

from replicator import messages as m
from replicator.scrub import repair_copy, verify_copy
from vbp.chunkstore import flush_store, fua_sync
from vbp.chunkstore_common import check_chunk_size, check_key, check_range
from vbp.errors import Fenced, InvalidArgument, NotFound, PeerUnavailable, StaleEpoch, VbpError
from vbp.layout import ChunkKey
from vbp.loglimit import LogLimit
from vbp.reqid import current as current_rid

log = logging.getLogger("vbp.replica")


class StaleCopy(PeerUnavailable):
    """This replica's copy is stale: ask another one (travels as 'unavailable')."""


_new_key = tuple.__new__
_MARKED = (m.WriteChunk, m.ZeroChunk)  # the messages whose chunk Replica.prepare marks
_FUA = (m.WriteChunk, m.ZeroChunk, m.WriteBatch)  # the messages a FUA flag may come with
_WRITTEN = m.Written()  # a batch every item of which took its write on a current copy
_when = itemgetter(0)  # of a `written` note: (time, start, end, generation)


def gone_below(collected, chain, gen: int | None) -> bool:
    """Whether a read by `chain` that resolves a chunk to generation `gen` here (None:
    none) misses what it wrote: a generation of its chain newer than `gen` is among the
    `collected` ones (ChunkStore.collected_gens of the lineage, or None), freed by garbage
    collection because no record, export or publication reads it any more. A live reader
    never has one in its chain (garbage collection keeps every generation a reader's
    chain holds from being marked), so only a reader of a deleted volume or snapshot can."""
    if collected:
        for g in chain:
            if g in collected and (gen is None or g > gen):
                return True
    return False


class Replica:
    def __init__(self, store, host_id: str, epoch: Callable[[], int]):
        self.store = store
        self.host_id = host_id
        self._epoch = epoch
        self._tokens: dict[str, int] = {}
        # refusals' lines, per volume and error: a full disk refuses write after write
        # (vbp.loglimit)
        self._refusals = LogLimit()
        # called (volume, token) when a newer token for a volume arrives (blockd: a gateway
        # here holding an older one is deposed, VolumeProvider.token_seen)
        self.on_token: Callable[[str, int], None] | None = None
        # called (volume, token) when another host waits for the write lease this host
        # holds with `token` (WantLease; blockd: VolumeProvider.lease_wanted)
        self.on_lease_wanted: Callable[[str, int], None] | None = None
        # (lineage, index) of this host's copies known stale (registry records naming this
        # host, and chunks dirty at a crash): never served as current data
        self.stale_self: set[tuple[str, int]] = set()
        # this host came back with a new, empty store (blockd: a replaced disk) and has not
        # yet learned which of its copies are missing: every copy counts as stale
        self.backfilling = False
        # (lineage, index) whose resync is under way here (replicator/recovery.py), and
        # those of them that refused to make a generation meanwhile
        self.resyncing: set[tuple[str, int]] = set()
        self.refused: set[tuple[str, int]] = set()
        # (lineage, index) -> [(time, start, end, generation)] of client writes and zeroes
        # applied here
        self.written: dict[tuple[str, int], list[tuple[float, int, int, int]]] = {}
        self.forgotten_until = -math.inf  # notes applied up to then are gone (forget_written)
        # volume -> {(lineage, gen, chunk index): when last written} under the volume's newest
        # token here: the chunks a gateway that took the lease over reconciles (see
        # recently_written). A mark is dropped once the holder showed it lived on a window
        # past it (a later write here): its write was settled by then, on every copy or
        # recorded stale. A holder that died (or was cut off) never shows it: its marks
        # stay, however late the takeover. blockd sets the window to outlast a write's
        # time in flight (peer timeouts) and a lease.
        self.recent: dict[str, dict[tuple[str, int, int], float]] = {}
        # volume -> (when its newest token first came here, the marks of the tokens before
        # it): kept until the newest token's holder lived a window past its first message
        # (its takeover, when it was one, had compared them by then)
        self.recent_before: dict[str, tuple[float, dict[tuple[str, int, int], float]]] = {}
        self.recent_window = 60.0
        self._marks_layout = None  # the store's layout when forget_recent last looked
        # the marks of the chunks a flush cleared while they were marked come back from the
        # store after a restart (ChunkStore._marks_kept), as its dirty marks do
        self._restore_marks(store.kept_marks)
        store.recent_marks = self.marks

    def now(self) -> float:
        """The run's clock (trio.current_time), bound to the instance at the first call
        inside a run: every client write asks for it (_note), and trio.current_time costs
        three Python calls more. Outside a run (direct use in tests, tools): monotonic."""
        try:
            clock = trio.lowlevel.current_clock()
        except RuntimeError:
            return time.monotonic()
        self.now = clock.current_time  # a replica lives in the run it first wrote in
        return self.now()

    def _note(self, volume: str, lineage: str, index: int, offset: int, length: int,
              gen: int, now: float | None = None) -> None:
        """A client write or zero applied here, at `now` (None: read the clock)."""
        if now is None:
            now = self.now()
        w = self.written.get((lineage, index))
        if w is None:
            w = self.written[(lineage, index)] = []
        w.append((now, offset, offset + length, gen))
        r = self.recent.get(volume)
        if r is None:
            r = self.recent[volume] = {}
        k = (lineage, gen, index)
        r.pop(k, None)  # (moved to the end: the marks stay in time order, forget_recent)
        r[k] = now

    def recently_written(self, lineage: str, gen: int) -> list[int]:
        """Chunks of generation `gen` of `lineage` whose last writes here are not known
        settled (see `recent`): what a gateway that took a lease over asks for, to find the
        chunks its predecessor's last writes may have left divergent."""
        self.forget_recent()
        found = set()
        for marks in (*self.recent.values(), *(b for _, b in self.recent_before.values())):
            found.update(i for (lin, g, i) in marks if g == gen and lin == lineage)
        return sorted(found)

    def forget_written(self, since: float) -> None:
        """Drop the notes of writes applied at `since` or earlier (resync's window passed
        them). Each chunk's notes are in time order (appended as applied): cut, not scan.
        `forgotten_until` keeps the newest such `since`: a user of the notes that wants
        those from some time on (a read repair, from the start of its read) finds them
        all only if that time is past it."""
        if since > self.forgotten_until:
            self.forgotten_until = since
        for k, w in list(self.written.items()):
            del w[:bisect.bisect_right(w, since, key=_when)]
            if not w:
                del self.written[k]

    def marks(self) -> dict[ChunkKey, str]:
        """Every chunk a mark names (`recent`, `recent_before`), with its volume: what the
        store keeps through a flush that clears the chunk's dirty mark."""
        out = {}
        for volume, marks in (*self.recent.items(),
                              *((v, before) for v, (_, before) in self.recent_before.items())):
            for lineage, gen, index in marks:
                out[_new_key(ChunkKey, (lineage, index, gen))] = volume
        return out

    def _restore_marks(self, kept: dict[ChunkKey, str]) -> None:
        """The marks the store kept through a restart (its `kept_marks`), as marks of
        earlier holders (`recent_before`), from now: whichever holder wrote them, its
        successor's takeover compares them, and the volume's holder now forgets them once
        it lived a window past the restart (forget_recent)."""
        if not kept:
            return
        now = self.now()
        by_volume: dict[str, dict[tuple[str, int, int], float]] = {}
        for key, volume in kept.items():
            by_volume.setdefault(volume, {})[(key.lineage, key.gen, key.index)] = now
        for volume, marks in by_volume.items():
            self.recent_before[volume] = (now, marks)

    def forget_recent(self) -> None:
        """Drop the marks of writes known settled (see `recent`; called now and then), and
        those of chunks no longer here (a volume deleted, its chunks collected; a copy
        moved away): no copy here to compare."""
        window = self.recent_window
        gone = self._gone
        # Each call used to look every mark up in the store and scan them all for the
        # window: once a second (resync), with a mark per chunk written in the last
        # minute, most of the event loop's time for a volume written over many chunks.
        # A mark's chunk can only have gone if a chunk went, which moves the store's
        # layout; and `recent` is in time order (_note), so the window cuts a prefix.
        layout = getattr(self.store, "layout", None)
        check = layout is None or layout != self._marks_layout
        for volume in set(self.recent) | set(self.recent_before):
            r = self.recent.get(volume)
            alive = r[next(reversed(r))] if r else -math.inf  # the holder's last write here
            if r:
                settled = []
                for k, t in r.items():
                    if t + window > alive:
                        break
                    settled.append(k)
                for k in settled:
                    del r[k]
                if check:
                    for k in [k for k in r if gone(k)]:
                        del r[k]
                if not r:
                    del self.recent[volume]
            before = self.recent_before.get(volume)
            if before is not None:
                if check:
                    for k in [k for k in before[1] if gone(k)]:
                        del before[1][k]
                if alive >= before[0] + window or not before[1]:
                    del self.recent_before[volume]
        self._marks_layout = layout

    def _gone(self, mark: tuple[str, int, int]) -> bool:
        """The chunk of a mark (lineage, gen, index) is no longer in the store."""
        lineage, gen, index = mark
        return self.store.lookup(ChunkKey(lineage, index, gen)) is None

    def _new_holder(self, volume: str) -> None:
        """A newer token for `volume` came: the marks so far are its predecessors'."""
        marks = self.recent.pop(volume, None)
        before = self.recent_before.get(volume)
        if before is not None:
            if marks:
                before[1].update(marks)
            self.recent_before[volume] = (self.now(), before[1])
        elif marks:
            self.recent_before[volume] = (self.now(), marks)

    def is_stale(self, lineage: str, index: int) -> bool:
        return self.backfilling or (bool(self.stale_self) and (lineage, index) in self.stale_self)

    def _refuse_stale(self, lineage: str, index: int) -> None:
        """A stale copy is no source: not for reads, allocation maps, or another host's
        resync (its holes would read as zeros, its missing generations as gone)."""
        if self.is_stale(lineage, index):
            raise StaleCopy(f"this host's copy of chunk {index} of {lineage} is being resynced")

    def _check_backfilled(self) -> None:
        """A host backfilling a new disk cannot say what it holds: its chunks, versions and
        generations are not known yet (StaleCopy: ask another copy)."""
        if self.backfilling:
            raise StaleCopy("this host is learning which chunks it misses (a new disk)")

    # --- checks ------------------------------------------------------------------------

    def check_token(self, volume: str, token: int) -> None:
        if self._newer_token(volume, token):
            self._adopt_token(volume, token)

    def _newer_token(self, volume: str, token: int) -> bool:
        """Fenced if `token` is older than the newest seen for `volume`; whether it is
        newer (for the caller to adopt once its request is known good: a request refused
        changes nothing here, its token included)."""
        newest = self._tokens.get(volume, 0)
        if token < newest:
            raise Fenced(
                f"write to {volume!r} with fencing token {token} refused: token {newest} is newer"
            )
        return token > newest

    def check_epoch(self, epoch: int) -> None:
        mine = self._epoch()
        if epoch < mine:
            raise StaleEpoch(f"request from epoch {epoch} refused: this host is at epoch {mine}")

    def learn_tokens(self, tokens: dict[str, int]) -> None:
        """Tokens granted while this replica was not running (vbp.registry lease_tokens):
        writes with an older one are refused from the first request on."""
        for volume, token in tokens.items():
            if token > self._tokens.get(volume, 0):
                self._adopt_token(volume, token)

    def _adopt_token(self, volume: str, token: int) -> None:
        """`token`, newer than any seen for `volume`, is the newest now: a new holder (its
        predecessor's recent writes are kept for its reconcile), and on_token told."""
        self._tokens[volume] = token
        if volume in self.recent or volume in self.recent_before:
            self._new_holder(volume)
        if self.on_token is not None:
            self.on_token(volume, token)

    def newest_token(self, volume: str) -> int:
        return self._tokens.get(volume, 0)

    def tokens(self) -> dict[str, int]:
        """The newest token of each volume seen (a copy)."""
        return dict(self._tokens)

    def forget_tokens(self, gone: dict[str, int]) -> int:
        """Forget the tokens of the volumes of `gone` (volume -> the token it had when the
        caller looked: blockd.service.Blockd.prune_tokens), unless a newer one came since;
        returns how many went. A volume with takeover marks still here keeps its token
        until they go (forget_recent)."""
        n = 0
        for volume, token in gone.items():
            if (self._tokens.get(volume) == token and volume not in self.recent
                    and volume not in self.recent_before):
                del self._tokens[volume]
                n += 1
        return n

    # --- operations (synchronous: the store is local) -----------------------------------

    def read(self, lineage: str, index: int, chain, offset: int, length: int, *,
             allow_stale: bool = False) -> tuple[int, bytes | None, int]:
        """(gen, data or None for a hole, version) of the newest generation in `chain`.
        A copy known stale is refused (the gateway asks another replica) unless the caller
        has no current copy left and accepts it."""
        if not allow_stale and self.is_stale(lineage, index):
            raise StaleCopy(f"this host's copy of chunk {index} of {lineage} is being resynced")
        store = self.store
        gen = store.resolve(lineage, index, chain)
        if lineage in store.collected_gens:
            self.check_not_collected(lineage, index, chain, gen)
        if gen is None:
            return -1, None, 0
        key = ChunkKey(lineage, index, gen)
        data = self.store.read(key, offset, length)
        info = self.store.info(key)
        return gen, data, info.version if info else 0

    def check_not_collected(self, lineage: str, index: int, chain, gen: int | None) -> None:
        """`gen`: the generation a read by `chain` resolves chunk `index` to here (None:
        none, a hole). Unless garbage collection freed a generation of `chain` newer than
        that here (gone_below), when the reader is one whose volume or snapshot was
        deleted (a gateway cut off from the registry): NotFound, never zeros or older
        bytes where it wrote data."""
        if gone_below(self.store.collected_gens.get(lineage), chain, gen):
            raise NotFound(f"chunk {index} of lineage {lineage} is gone: the volume or "
                           f"snapshot reading it was deleted and garbage collection freed "
                           f"its chunks here")

    def _base(self, lineage: str, index: int, gen: int, chain) -> int | None:
        if self.store.resolve(lineage, index, (gen,)) is not None:
            return None
        return self.store.resolve(lineage, index, chain)

    def _check_creates(self, lineage: str, index: int, gen: int) -> None:
        """No generation is made from a copy being resynced (theory of operation)."""
        if (self.resyncing and (lineage, index) in self.resyncing
                and self.store.resolve(lineage, index, (gen,)) is None):
            self.refused.add((lineage, index))
            raise StaleCopy(f"this host's copy of chunk {index} of {lineage} is being resynced: "
                            f"generation {gen} is left to the resync")

    def write(self, volume: str, lineage: str, index: int, gen: int, chain, offset: int,
              data, chunk_size: int, version: int, fua: bool, epoch: int, token: int) -> int:
        newer = False
        if token != self._tokens.get(volume):  # (the checks, with no call when they pass)
            newer = self._newer_token(volume, token)
        if epoch < self._epoch():
            self.check_epoch(epoch)
        if self.resyncing:
            self._check_creates(lineage, index, gen)
        if newer:  # a new holder: known once its write is known good (the store's checks)
            check_key((lineage, index, gen))
            check_range(offset, len(data), check_chunk_size(chunk_size))
        key = _new_key(ChunkKey, (lineage, index, gen))  # ChunkKey(...) less its __new__
        store = self.store
        # noted once the store took it (no checkpoint between), or failed part-way (a full
        # disk, an I/O error: some of it may be there); not when refused before writing
        applied = True
        try:
            return store.write(  # (_base's answer is None when the chunk is here already)
                key, offset, data, chunk_size=chunk_size,
                base=None if store.lookup(key) is not None else self._base(lineage, index, gen, chain),
                version=version or None, fua=fua,
            )
        except (InvalidArgument, NotFound):
            applied = False
            raise
        finally:
            if applied:
                if newer:  # (not before: the store may refuse it, an existing chunk's size
                    self._adopt_token(volume, token)  # or a bad version, and a request
                self._note(volume, lineage, index, offset, len(data), gen)  # refused
                # changes nothing here, its token included)

    def write_items(self, volume: str, lineage: str, gen: int, chain, chunk_size: int,
                    fua: bool, epoch: int, token: int, items, until=None) -> int:
        """write() of each (index, offset, data) of `items` in order, all with the same
        volume, lineage, generation, chain, chunk size, FUA flag, epoch and token: a
        WriteBatch's items, a gateway's run of local writes. When the token is the
        volume's newest here, the epoch current and no resync under way, those checks
        are made once for all, and the items' notes (_note) share one reading of the clock
        (nothing in between yields to the run); else each item goes through write(). The
        first refusal or failure propagates, its `batch_item` the index in `items` of
        the item it ended: the items before it are applied (and noted), as write() of
        each one after the other would leave them. `until`: None, or (clock, deadline):
        no item is written once clock() reached the deadline (a gateway's lease, read
        before each item as its write() would); the count of the items written, all of
        them when nothing stopped it."""
        k = 0
        try:
            if token != self._tokens.get(volume) or epoch < self._epoch() or self.resyncing:
                write = self.write
                for index, offset, data in items:
                    if until is not None and until[0]() >= until[1]:
                        return k
                    write(volume, lineage, index, gen, chain, offset, data, chunk_size, 0, fua,
                          epoch, token)
                    k += 1
                return k
            store = self.store
            lookup, store_write, note = store.lookup, store.write, self._note
            # whole pages of chunks here, many in one call (ChunkStore.write_pages)
            pages = None if fua or until is not None else getattr(store, "write_pages", None)
            now = self.now()
            n = len(items)
            while k < n:
                if pages is not None:
                    try:
                        j = pages(lineage, gen, items, k, chunk_size)
                    except Exception as e:  # (the item it failed is noted, as below)
                        j = getattr(e, "item", k)
                        for index, offset, data in items[k:j + 1]:
                            note(volume, lineage, index, offset, len(data), gen, now)
                        k = j
                        raise
                    for index, offset, data in items[k:j] if k or j < n else items:
                        note(volume, lineage, index, offset, len(data), gen, now)
                    k = j
                    if k == n:
                        break
                index, offset, data = items[k]
                if until is not None and until[0]() >= until[1]:
                    return k
                key = _new_key(ChunkKey, (lineage, index, gen))  # (as write's)
                applied = True
                try:
                    store_write(key, offset, data, chunk_size=chunk_size,
                                base=None if lookup(key) is not None
                                else self._base(lineage, index, gen, chain),
                                version=None, fua=fua)
                except (InvalidArgument, NotFound):
                    applied = False
                    raise
                finally:
                    if applied:
                        note(volume, lineage, index, offset, len(data), gen, now)
                k += 1
            return k
        except Exception as e:
            e.batch_item = k  # (its refusal is logged as that item's: _refused)
            raise

    def zero(self, volume: str, lineage: str, index: int, gen: int, chain, offset: int,
             length: int, chunk_size: int, version: int, fua: bool, epoch: int, token: int) -> int:
        newer = self._newer_token(volume, token)
        self.check_epoch(epoch)
        # the store checks these too, but only where it has the chunk: a zeroing of one not
        # here yet is answered below without it, and must be refused as the copies that
        # hold it refuse it (nor noted: a takeover would compare a chunk nobody wrote)
        check_key((lineage, index, gen))
        check_range(offset, length, check_chunk_size(chunk_size))
        self._check_creates(lineage, index, gen)
        base = self._base(lineage, index, gen, chain)
        applied = True
        try:
            if base is None and self.store.resolve(lineage, index, (gen,)) is None:
                return 0  # nothing in the chain: already reads as zeros, allocate nothing
            key = ChunkKey(lineage, index, gen)
            return self.store.zero(key, offset, length, chunk_size=chunk_size, base=base,
                                   version=version or None, fua=fua)
        except (InvalidArgument, NotFound):  # (refused by the store: as write's)
            applied = False
            raise
        finally:
            if applied:
                if newer:
                    self._adopt_token(volume, token)
                self._note(volume, lineage, index, offset, length, gen)

    async def _synced(self, msg, peer: str | None, reply, sync, *args):
        """`reply` to `msg` once `await sync(*args)` made it durable: a Flush's flush_store,
        or a FUA write's fua_sync (the write applied already), each with its writeback in
        a worker thread while the event loop serves every other request. Synced inline, a
        sync after large writes to any volume of a data file made every volume of the host
        wait for that file's writeback."""
        try:
            await sync(*args)
        except VbpError as e:
            self._refused(msg, e, peer)
            raise
        if log.isEnabledFor(logging.DEBUG):
            self._applied(msg, peer)
        return reply

    def extents(self, lineage: str, index: int, chain, offset: int, length: int):
        gen = self.store.resolve(lineage, index, chain)
        if lineage in self.store.collected_gens:
            self.check_not_collected(lineage, index, chain, gen)
        if gen is None:
            return None
        return self.store.extents(ChunkKey(lineage, index, gen), offset, length)

    def range_extents(self, msg: m.RangeExtents) -> m.RangeRuns:
        """ChunkExtents of each chunk of a RangeExtents, in order, until their runs pass
        RANGE_RUNS_MAX. A copy this host has stale is answered -1 (ChunkExtents refuses
        it), so the gateway asks another copy for that chunk alone. The chunks with no
        generation here cost a lookup each (ChunkStore.held), not a pass each: a range of
        a thin volume is mostly holes."""
        cs, start, end = msg.chunk_size, msg.start, msg.end
        if cs <= 0 or start < 0 or end <= start:
            raise InvalidArgument(f"a RangeExtents of [{start}, {end}) in chunks of {cs} bytes")
        count = len(msg.indexes) or (end - 1) // cs - start // cs + 1  # (no len() of a
        if count > m.RANGE_CHUNKS_MAX:  # range past 2**63: OverflowError)
            raise InvalidArgument(f"a RangeExtents of {count} chunks: "
                                  f"{m.RANGE_CHUNKS_MAX} at most")
        indexes = msg.indexes or range(start // cs, (end - 1) // cs + 1)
        if msg.indexes:
            last = -1
            for i in indexes:
                if i <= last or i * cs >= end or (i + 1) * cs <= start:
                    raise InvalidArgument(f"chunk {i} of a RangeExtents: not ascending, or "
                                          f"outside [{start}, {end})")
                last = i
        lineage, chain, store = msg.lineage, msg.chain, self.store
        stale_any = self.backfilling or bool(self.stale_self)
        # (a chunk of a chain with collected generations is no hole unless extents says so)
        look = indexes if stale_any or lineage in store.collected_gens else store.held(lineage, indexes)
        held: list[int] = []
        states: list[int] = []
        runs: list[int] = []
        for i in look:
            if stale_any and self.is_stale(lineage, i):
                held.append(i)
                states.append(-1)
                continue
            base = i * cs
            lo, hi = max(start - base, 0), min(end - base, cs)
            ext = self.extents(lineage, i, chain, lo, hi - lo)
            if ext is None:
                continue
            held.append(i)
            states.append(len(ext))
            runs += _flat_runs(ext)
            if len(runs) >= 2 * m.RANGE_RUNS_MAX:
                return m.RangeRuns(bisect.bisect_left(indexes, i) + 1, tuple(held),
                                   tuple(states), tuple(runs))
        return m.RangeRuns(len(indexes), tuple(held), tuple(states), tuple(runs))

    # --- the peer protocol entry point --------------------------------------------------

    def prepare(self, batch) -> None:
        """`batch`: the (request id, message) pairs of frames received together, before
        any is handled (serve_peers' `prepare`). The chunks its writes and zeroes go to,
        where a flush marked them clean, are marked dirty now in one index commit
        (ChunkStore.mark_dirty), where each write would commit its own: the replica's
        half of what VolumeGateway.prepare_writes does for the gateway's own copy. A
        hint, made before any check: a write refused after all (fenced, stale) leaves a
        mark that costs its chunk a re-hash after a crash, nothing more; chunks not here
        yet are left to the write that makes them."""
        store = self.store
        if not store.has_clean():  # every chunk here is marked already
            return
        keys = set()
        for _, msg in batch:
            t = type(msg)
            if t in _MARKED:
                keys.add((msg.lineage, msg.index, msg.gen))
            elif t is m.WriteBatch and len(msg.indexes) <= m.BATCH_ITEMS_MAX:  # (else refused)
                keys.update((msg.lineage, i, msg.gen) for i in msg.indexes)
        if len(keys) > 1:  # (one chunk: its write marks it as cheaply)
            store.mark_dirty([_new_key(ChunkKey, k) for k in keys])

    def handle(self, msg, peer: str | None = None):
        """Answer one peer message: the reply, or for a Flush or a FUA write with much to
        write back an awaitable of it (the token checked and a write applied here, the
        sync under way when awaited). Errors propagate and become Error replies."""
        fua = None
        try:
            t = type(msg)
            if t is m.Flush:
                self.check_token(msg.volume, msg.token)
                ahead = self.store.sync_ahead()
                if ahead is not None:
                    return self._synced(msg, peer, m.Ok(0), flush_store, self.store, ahead)
            elif t in _FUA and msg.fua and self.store.writeback_due():
                fua, msg = msg, dc_replace(msg, fua=False)  # (synced by fua_sync)
            reply = self._handle(msg)
            if fua is not None:
                msg = fua
                keys = [_new_key(ChunkKey, (msg.lineage, i, msg.gen))
                        for i in (msg.indexes if t is m.WriteBatch else (msg.index,))]
                return self._synced(msg, peer, reply, fua_sync, self.store, keys)
        except VbpError as e:
            self._refused(fua or msg, e, peer)
            raise
        if t in _OPS and log.isEnabledFor(logging.DEBUG):
            self._applied(msg, peer)
        return reply

    def _applied(self, msg, peer: str | None) -> None:
        if type(msg) is m.WriteBatch:
            for k, index in enumerate(msg.indexes):
                self._as_item(msg, k, log.debug, "volume=%s chunk=%s op=write event=applied "
                              "gateway=%s", msg.volume, index, peer or self.host_id)
        else:
            log.debug("volume=%s chunk=%s op=%s event=applied gateway=%s",
                      getattr(msg, "volume", "-"), getattr(msg, "index", "-"), _OPS[type(msg)],
                      peer or self.host_id)

    @staticmethod
    def _as_item(msg: m.WriteBatch, k: int, emit, *args) -> None:
        """Log a line about item `k` of a WriteBatch under that item's own request id, like
        the line about its WriteChunk would be (one grep per request still finds it)."""
        rids = msg.rid.split()
        token = current_rid.set(rids[k]) if k < len(rids) else None
        try:
            emit(*args)
        finally:
            if token is not None:
                current_rid.reset(token)

    def _refused(self, msg, e: VbpError, peer: str | None) -> None:
        if type(msg) is m.WriteBatch and isinstance(getattr(e, "batch_item", None), int):
            k = e.batch_item
            level = logging.INFO if isinstance(e, _TRANSIENT) else logging.WARNING
            self._as_item(msg, k, self._refusals.log, log, level, (msg.volume, type(e)),
                          "volume=%s chunk=%s op=write event=refused gateway=%s error=%s: %s",
                          msg.volume, msg.indexes[k], peer or self.host_id, type(e).__name__, e)
            return
        op = _OPS.get(type(msg))
        if op is not None:
            volume = getattr(msg, "volume", "-")
            self._refusals.log(log, logging.INFO if isinstance(e, _TRANSIENT) else logging.WARNING,
                         (volume, type(e)),
                         "volume=%s chunk=%s op=%s event=refused gateway=%s error=%s: %s",
                         volume, getattr(msg, "index", "-"), op, peer or self.host_id,
                         type(e).__name__, e)

    def write_batch(self, msg: m.WriteBatch) -> m.Written:
        """Apply the items of a WriteBatch in order, each as its WriteChunk would be. The
        first refusal ends the batch and propagates (one Error reply for all of it): the
        items before it stay applied, and the gateway counts the whole batch as failed on
        this host, which records the copies stale like any failed write would."""
        volume, lineage, gen, chain = msg.volume, msg.lineage, msg.gen, msg.chain
        indexes, offsets, lengths = msg.indexes, msg.offsets, msg.lengths
        n = len(indexes)
        if n > m.BATCH_ITEMS_MAX:
            raise InvalidArgument(f"a WriteBatch of {n} items: {m.BATCH_ITEMS_MAX} at most")
        if len(offsets) != n or len(lengths) != n or sum(lengths) != len(msg.data) \
                or any(x < 0 for x in lengths):
            raise InvalidArgument(f"a WriteBatch of {n} items with {len(offsets)} offsets, "
                                  f"{len(lengths)} lengths and {len(msg.data)} bytes of data")
        store = self.store
        if n > 1 and store.has_clean():  # (a batch alone in its receive: no prepare call)
            keys = {(lineage, i, gen) for i in indexes}
            if len(keys) > 1:
                store.mark_dirty([_new_key(ChunkKey, k) for k in keys])
        items = []
        at = 0
        data = memoryview(msg.data)  # (not released here: the store may keep a piece)
        for k in range(n):
            length = lengths[k]
            items.append((indexes[k], offsets[k], data[at:at + length]))
            at += length
        self.write_items(volume, lineage, gen, chain, msg.chunk_size, msg.fua, msg.epoch,
                         msg.token, items)
        if not (self.backfilling or self.stale_self):  # (is_stale of every item: False)
            return _WRITTEN
        stale = tuple(k for k in range(n) if self.is_stale(lineage, indexes[k]))
        return m.Written(stale) if stale else _WRITTEN

    def _handle(self, msg):
        if type(msg) is m.WriteBatch:
            return self.write_batch(msg)
        if isinstance(msg, m.WriteChunk):
            v = self.write(msg.volume, msg.lineage, msg.index, msg.gen, msg.chain, msg.offset,
                           msg.data, msg.chunk_size, msg.version, msg.fua, msg.epoch, msg.token)
            return m.new_ok(v, self.is_stale(msg.lineage, msg.index))
        if isinstance(msg, m.ReadChunk):
            if msg.token and msg.token < self._tokens.get(msg.volume, 0):
                self.check_token(msg.volume, msg.token)  # (Fenced: a holder deposed since)
            gen, data, version = self.read(msg.lineage, msg.index, msg.chain, msg.offset, msg.length,
                                           allow_stale=msg.allow_stale)
            return m.Data(data if data is not None else b"", version, gen)
        if isinstance(msg, m.ZeroChunk):
            v = self.zero(msg.volume, msg.lineage, msg.index, msg.gen, msg.chain, msg.offset,
                          msg.length, msg.chunk_size, msg.version, msg.fua, msg.epoch, msg.token)
            return m.new_ok(v, self.is_stale(msg.lineage, msg.index))
        if isinstance(msg, m.Flush):  # (little to write back: handle checked the token)
            self.store.flush()
            return m.Ok(0)
        if isinstance(msg, m.ChunkState):
            self._check_backfilled()
            key = ChunkKey(msg.lineage, msg.index, msg.gen)
            if self.store.info(key) is None:
                return m.ChunkStateReply(False, 0, ())
            version, sums = self.store.page_checksums(key)
            return m.ChunkStateReply(True, version, tuple(sums))
        if isinstance(msg, m.ChunkExtents):
            self._refuse_stale(msg.lineage, msg.index)
            ext = self.extents(msg.lineage, msg.index, msg.chain, msg.offset, msg.length)
            if ext is None:
                return m.Extents(False, ())
            return m.Extents(True, tuple(_flat_runs(ext)))
        if type(msg) is m.RangeExtents:
            return self.range_extents(msg)
        if isinstance(msg, m.ChunkGens):
            self._check_backfilled()
            return m.Gens(tuple(self.store.gens(msg.lineage, msg.index)))
        if type(msg) is m.WantLease:
            if self.on_lease_wanted is not None:
                self.on_lease_wanted(msg.volume, msg.token)
            return m.Ok(0)
        if type(msg) is m.CollectedGens:
            return m.Gens(tuple(sorted(self.store.collected_gens.get(msg.lineage, ()))))
        if isinstance(msg, m.ChunkIndexes):
            self._check_backfilled()
            return m.Indexes(tuple(sorted({k.index for k in self.store.keys(msg.lineage)})))
        if isinstance(msg, m.DirtyChunks):
            return m.Indexes(tuple(sorted(set(self.store.dirty_indexes(msg.lineage, msg.gen))
                                          | set(self.recently_written(msg.lineage, msg.gen)))))
        if isinstance(msg, m.ScrubChunk):
            return verify_copy(self, msg)
        if isinstance(msg, m.RepairPages):
            return repair_copy(self, msg)
        if isinstance(msg, m.Ping):
            return m.Pong(self.host_id, self._epoch())
        raise InvalidArgument(f"unexpected peer message {type(msg).__name__}")


def _flat_runs(ext):
    """A chunk's (length, is_hole) runs as the peer messages carry them: flattened, the
    flag an int (Extents, RangeRuns)."""
    return (x for n, hole in ext for x in (n, int(hole)))


# the client-facing requests the replica logs (background work logs in its own modules)
_OPS = {m.WriteChunk: "write", m.WriteBatch: "write_batch", m.ZeroChunk: "zero", m.Flush: "flush",
        m.ReadChunk: "read", m.ChunkExtents: "block_status", m.RangeExtents: "block_status"}
# refusals the gateway handles by retrying (StaleEpoch) or asking another copy (StaleCopy)
_TRANSIENT = (StaleEpoch, StaleCopy)
