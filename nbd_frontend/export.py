"""What the NBD server serves: the Export and ExportProvider interfaces, and MemoryExport,
the bytearray-backed reference export (tests and manual runs use it; its behaviour is the
reference the real volume export follows).

Every Export operation may return its result directly (the server's fast path: no task, no
await) or an awaitable the server awaits in a task of the connection. A WRITE's `data` is a
memoryview. A writable one is a view into the connection's receive buffer valid only
during the call: an export that keeps it, or returns an awaitable that uses it, copies it
first (the server copies itself when `write` is an `async def`, whose body runs later). A
read-only one (a large write, received into a buffer of its own) does not change while
anything refers to it: keep it without a copy. Exceptions become NBD errors through
nbd_frontend.errors.to_nbd_errno.
"""

from __future__ import annotations

import errno
from typing import Any, Protocol

from nbd_frontend import proto
from vbp.errors import NotFound, ReadOnly


class Export(Protocol):
    name: str
    description: str
    size: int
    read_only: bool
    multi_conn: bool  # optional; the server assumes True when missing
    min_block: int
    preferred_block: int
    max_block: int

    def read(self, offset: int, length: int) -> Any:
        """bytes-like of exactly `length`, or [(offset, length, data|None), ...] covering
        the range in order (None: a hole, reads as zeros)."""

    # Optional: read_ref(offset, length), read() that may answer a
    # vbp.chunkstore_common.FileRange instead of bytes; the server then sends the bytes
    # from the file's map (FileRange.send) and releases the range (replicator.gateway
    # has it).

    def write(self, offset: int, data: memoryview, fua: bool) -> Any:
        """A writable `data` is valid during the call only (it is the connection's receive
        buffer): an export that keeps it, or returns an awaitable that uses it, copies it.
        A read-only one may be kept as it is (see the module's docstring)."""

    # Optional: prepare_writes(offsets), called after each receive with a function that
    # gives the offsets of the writes received and not yet handed to write(), so that the
    # export can do once for a batch what each write would do (replicator.gateway marks
    # their chunks dirty in one commit). What it raises is logged and ignored: each
    # write() then meets it on its own.
    # Optional, together: begin_writes(count) and end_writes(), called around each run of
    # `count` plain writes the server dispatches in one go (end_writes also when one raised), so
    # that the export can send what those writes need sent as one message
    # (replicator.gateway gathers the small writes of a run into a WriteBatch per group of
    # replicas). An answer may complete in end_writes; end_writes must not raise.
    # Optional: write_run(writes, ids), given such a run as (cookie, flags, offset, length,
    # data) before write() sees any of it (flags: proto.CMD_FLAG_FUA or none; data as
    # write()'s; ids: the vbp.reqid.RequestIds whose next ids, in order, are the run's, or
    # None): the writes it took, from the first, each as write() would have. Either their
    # count, all written at once, each as write() returning None, which the server answers
    # with success; or (count, parts), the writes under way: each part (places, Later),
    # the Later's value the outcomes of the writes at `places` (their indexes in the run)
    # in order when they are over: None for written, an exception for failed, or the
    # write's own vbp.later.Later, answered when it completes. Every write taken is in
    # one part, and each part is answered as soon as its Later completes. The
    # server hands the rest to write() one by one, from the first not taken
    # (replicator.gateway: a replicas=1 volume's writes to this host's chunks are written
    # at once, a replicated volume's small writes go to their peers as WriteBatch frames,
    # with their checks once for the run, not per write). A write whose failure it meets
    # while taking the run is one it did not take: write() meets the failure again and
    # answers it. Not used for an export whose write() is a coroutine function.

    def flush(self) -> Any: ...

    def trim(self, offset: int, length: int, fua: bool) -> Any: ...

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool,
                     fast: bool) -> Any:
        """fast=True and zeroing not faster than writing: raise an error with errno
        ENOTSUP, changing nothing."""

    def cache(self, offset: int, length: int) -> Any: ...

    def block_status(self, offset: int, length: int) -> Any:
        """[(length, flags), ...] with proto.STATE_HOLE / proto.STATE_ZERO, starting at
        `offset` and covering at least one byte."""

    def close(self) -> Any: ...


class ExportProvider(Protocol):
    def list_exports(self) -> Any:
        """[(name, description), ...], or an awaitable of it."""

    def open_export(self, name: str) -> Any:
        """An Export or an awaitable of one; raises vbp.errors.NotFound if unknown."""

    # Optional: export_info(name) -> an object with an Export's name, size, read_only
    # (and description, multi_conn, block sizes) or an awaitable of one, for
    # NBD_OPT_INFO; without it, the server opens the export and closes it again.


PAGE = 4096
_HOLE = proto.STATE_HOLE | proto.STATE_ZERO


class MemoryExport:
    """A bytearray export tracking allocation per 4 KiB page: written pages are data,
    trimmed (or zeroed with may_trim) whole pages become holes again."""

    def __init__(self, name: str, size: int, *, read_only: bool = False,
                 description: str = "", multi_conn: bool = True, fast_zero: bool = True,
                 min_block: int = 1, preferred_block: int = 4096,
                 max_block: int = proto.MAX_PAYLOAD) -> None:
        self.name = name
        self.description = description
        self.size = size
        self.read_only = read_only
        self.multi_conn = multi_conn
        self.fast_zero = fast_zero
        self.min_block = min_block
        self.preferred_block = preferred_block
        self.max_block = max_block
        self.data = bytearray(size)
        self.allocated = bytearray((size + PAGE - 1) // PAGE)  # 1 = data, 0 = hole
        self.flushes = 0
        self.closed = False

    def _pages(self, offset: int, length: int) -> tuple[int, int]:
        return offset // PAGE, (offset + length + PAGE - 1) // PAGE

    def _runs(self, pos: int, stop: int):
        """(start, end, allocated) runs of equal page state covering pos..stop."""
        while pos < stop:
            page = pos // PAGE
            state = self.allocated[page]
            nxt = page + 1
            while nxt * PAGE < stop and self.allocated[nxt] == state:
                nxt += 1
            end = min(nxt * PAGE, stop)
            yield pos, end, state
            pos = end

    def read(self, offset: int, length: int):
        first, end = self._pages(offset, length)
        if 0 not in self.allocated[first:end]:
            return bytes(self.data[offset:offset + length])
        return [(start, stop - start, bytes(self.data[start:stop]) if state else None)
                for start, stop, state in self._runs(offset, offset + length)]

    def write(self, offset: int, data, fua: bool):
        if self.read_only:
            raise ReadOnly(f"{self.name} is read-only")
        self.data[offset:offset + len(data)] = data
        first, end = self._pages(offset, len(data))
        self.allocated[first:end] = b"\x01" * (end - first)

    def flush(self):
        self.flushes += 1

    def trim(self, offset: int, length: int, fua: bool):
        if self.read_only:
            raise ReadOnly(f"{self.name} is read-only")
        first = (offset + PAGE - 1) // PAGE
        end = min(offset + length, self.size) // PAGE
        if offset + length == self.size:
            end = len(self.allocated)  # the partial last page belongs to the range
        if end > first:
            self.data[first * PAGE:min(end * PAGE, self.size)] = bytes(
                min(end * PAGE, self.size) - first * PAGE)
            self.allocated[first:end] = bytes(end - first)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool):
        if self.read_only:
            raise ReadOnly(f"{self.name} is read-only")
        if fast and not self.fast_zero:
            raise OSError(errno.ENOTSUP, "zeroing is not fast on this export")
        self.data[offset:offset + length] = bytes(length)
        if may_trim:
            self.trim(offset, length, fua)
        first, end = self._pages(offset, length)
        if not may_trim:
            self.allocated[first:end] = b"\x01" * (end - first)

    def cache(self, offset: int, length: int):
        return None

    def block_status(self, offset: int, length: int):
        return [(stop - start, 0 if state else _HOLE)
                for start, stop, state in self._runs(offset, min(offset + length, self.size))]

    def close(self):
        self.closed = True


class MemoryProvider:
    """Exports by name; `NAME@SNAP` names a read-only snapshot made by `snapshot()`."""

    def __init__(self, exports: dict[str, MemoryExport] | None = None) -> None:
        self.exports: dict[str, MemoryExport] = dict(exports or {})

    def add(self, name: str, size: int, **kwargs) -> MemoryExport:
        export = MemoryExport(name, size, **kwargs)
        self.exports[name] = export
        return export

    def snapshot(self, name: str, snap: str) -> MemoryExport:
        src = self.exports[name]
        copy = MemoryExport(f"{name}@{snap}", src.size, read_only=True,
                            description=f"snapshot {snap} of {name}")
        copy.data[:] = src.data
        copy.allocated[:] = src.allocated
        self.exports[copy.name] = copy
        return copy

    def list_exports(self) -> list[tuple[str, str]]:
        return [(name, e.description) for name, e in self.exports.items()]

    def open_export(self, name: str) -> MemoryExport:
        try:
            return self.exports[name]
        except KeyError:
            raise NotFound(f"no export {name!r}") from None
