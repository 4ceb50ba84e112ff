"""Sans-io NBD transmission phase: requests parsed in place, replies encoded.

Theory of operation (proto.md "Transmission", "Request message", "Request types",
"Error values", "Size constraints"):

- The shell receives straight into this codec's one preallocated buffer:
  `buf = codec.get_buffer(); n = recv_into(buf); codec.commit(n)`, then drains
  `next_event()` until NEED_DATA. `Request.data` (WRITE payloads) is a memoryview into that
  buffer, valid until the next `get_buffer()`/`receive_data()` call: a consumer that keeps
  it longer copies it. A WRITE larger than the buffer is received straight into a payload
  buffer of its own, and its `Request.data` is a *read-only* view of it: the codec never
  writes into that buffer again while anything refers to it, so a consumer may keep the
  view instead of copying the payload (a replicated write keeps it until every replica
  has answered). Payload buffers are pooled (up to POOL_BYTES of them, each at most
  SPARE_MAX; others among the thread's spares, up to SPARES_BYTES): one no longer
  referred to is reused, so a stream of 1 MiB writes costs no allocation, zeroing or page
  faults per write.
- A bad request magic is a protocol error (hard disconnect). A request the server refuses
  yields `BadRequest` carrying the NBD errno to reply with; a refused WRITE's payload is
  skipped without allocating it, so the connection stays in sync:
  unknown command or flag not allowed for the command -> EINVAL; write, trim or
  write-zeroes on a read-only export -> EPERM; READ/WRITE longer than the maximum
  payload -> EINVAL (EOVERFLOW for a structured READ, which proto.md allows to be
  rejected up front); beyond the export size -> ENOSPC for WRITE and WRITE_ZEROES, EINVAL
  otherwise; unaligned to the minimum block -> EINVAL; BLOCK_STATUS without a negotiated
  metadata context -> EINVAL. Commands without payload may exceed the maximum payload.
- NBD_CMD_DISC yields `Disconnect`; nothing after it is parsed.
- Replies: simple replies unless structured replies were negotiated; then READ is
  always structured, and errors are ERROR chunks. Encoders return lists of buffers to be
  sent together (the shell batches them).
"""

from __future__ import annotations

import functools
import mmap
import struct
import threading
from dataclasses import dataclass
from itertools import islice

from nbd_frontend import proto
from nbd_frontend.errors import ProtocolError
from nbd_frontend.handshake import NEED_DATA, _message
from vbp.buffers import HEAD_RECV, unshared

DEFAULT_BUFFER = 256 * 1024
SPARE_MAX = 4 * 1024 * 1024  # largest WRITE payload buffer kept for reuse
POOL_BYTES = 16 * 1024 * 1024  # payload buffers kept for reuse per connection, in all
# Payload buffers beyond a connection's pool (more writes in flight than it holds, or
# above SPARE_MAX), kept for any connection of the thread to take once released, up to
# SPARES_BYTES in all: a fresh anonymous mapping faults each page in as the payload fills
# it, several times the cost of the write (the bytearray before gave back warm memory)
SPARES_BYTES = 128 * 1024 * 1024  # (QD32 of 4 MiB writes)
_here = threading.local()


def _spares() -> list:
    """This thread's spare payload buffers (SPARES_BYTES)."""
    spares = getattr(_here, "spares", None)
    if spares is None:
        spares = _here.spares = []
    return spares


MAX_EXTENTS = 1 << 20  # proto.md: no more than 2^20 block status descriptors per chunk

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_DATA_CHUNK = struct.Struct(">IHHQIQ")
_HOLE_CHUNK = struct.Struct(">IHHQIQI")
_ERROR_CHUNK = struct.Struct(">IHHQIIH")
_ZEROS = bytes(1 << 20)

_WRITES = (proto.CMD_WRITE, proto.CMD_TRIM, proto.CMD_WRITE_ZEROES)


@dataclass(slots=True)
class Request:
    """One request to hand to the export. Not frozen, unlike the other events: one is
    made per request, and a frozen dataclass's __init__ (object.__setattr__ per field)
    costs four times a plain one's, over a microsecond on this hot path. Nothing
    changes it after the codec made it."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request to answer with error `errno` without calling the export."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int
    errno: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish what is in flight, then close."""


def transmission_flags(*, read_only: bool, multi_conn: bool) -> int:
    """The transmission flags we advertise (NBD_FLAG_SEND_DF is added by the handshake
    once structured replies are negotiated)."""
    flags = (proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH | proto.FLAG_SEND_FUA
             | proto.FLAG_SEND_CACHE)
    if read_only:  # writes are still refused with EPERM if a client sends them
        flags |= proto.FLAG_READ_ONLY
    else:
        flags |= proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES | proto.FLAG_SEND_FAST_ZERO
    if multi_conn:
        flags |= proto.FLAG_CAN_MULTI_CONN
    return flags


class TransmissionCodec:
    def __init__(self, *, size: int, read_only: bool = False, structured: bool = False,
                 meta_contexts: dict[int, str] | None = None, min_block: int = 1,
                 max_payload: int = proto.MAX_PAYLOAD, buffer_size: int = DEFAULT_BUFFER,
                 initial_data: bytes = b"") -> None:
        self.size = size
        self.read_only = read_only
        self.structured = structured
        self.meta_contexts = dict(meta_contexts or {})
        self.min_block = max(1, min_block)
        self.max_payload = max_payload
        self._buf = bytearray(max(buffer_size, proto.REQUEST_SIZE + 4096))
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._discard = 0
        self._large: memoryview | None = None
        self._pool: list = []  # payload buffers of large writes, for reuse
        self._large_filled = 0
        self._large_header: tuple[int, int, int, int] | None = None
        self._after_large = False  # the last request was a large write
        self._backlog = bytearray()
        self.closed = False
        dflag = proto.CMD_FLAG_DF if structured else 0
        fua = proto.CMD_FLAG_FUA
        self._allowed = {
            proto.CMD_READ: fua | dflag,
            proto.CMD_WRITE: fua,
            proto.CMD_FLUSH: fua,
            proto.CMD_TRIM: fua,
            proto.CMD_CACHE: fua,
            proto.CMD_WRITE_ZEROES: fua | proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FAST_ZERO,
            proto.CMD_BLOCK_STATUS: fua | proto.CMD_FLAG_REQ_ONE,
        }
        if initial_data:
            self.receive_data(initial_data)

    # --- input -----------------------------------------------------------------------------
    @property
    def receiving(self) -> int:
        """Bytes received of a large write's payload not complete yet (its own buffer)."""
        return self._large_filled if self._large is not None else 0

    def get_buffer(self) -> memoryview:
        """Where the next bytes go (for recv_into). Invalidates earlier Request.data."""
        if self._large is not None:
            return self._large[self._large_filled:]
        if self._start:
            if self._start == self._end:
                self._start = self._end = 0
            else:
                n = self._end - self._start
                self._buf[:n] = self._mv[self._start:self._end]
                self._start, self._end = 0, n
        if self._after_large:
            self._after_large = False
            return self._mv[self._end:self._end + HEAD_RECV]
        return self._mv[self._end:]

    def head_after(self) -> memoryview | None:
        """With a large write's payload under way (get_buffer then its rest), where the
        bytes after it go: the start of the shared buffer, HEAD_RECV of it. One
        recvmsg_into both takes the payload's rest and the next request's header, where
        a recv for each took two calls, and each call's window update had the client's
        queued bytes sent through the loop's thread (loopback). commit() after such a
        call puts what went past the payload there."""
        if self._large is None:
            return None
        return self._mv[self._end:self._end + HEAD_RECV]

    def commit(self, n: int) -> None:
        if self._large is not None:
            rest = len(self._large) - self._large_filled
            if n <= rest:
                self._large_filled += n
            else:  # (a recvmsg_into of get_buffer() and head_after(): past the payload)
                self._large_filled += rest
                self._end += n - rest
        else:
            self._end += n

    def receive_data(self, data) -> None:
        """Convenience for tests and non-recv_into shells: copies `data` in; what does not
        fit waits in a backlog that next_event moves in as the buffer drains."""
        self._backlog += data
        self._pull_backlog()

    def _pull_backlog(self) -> bool:
        if not self._backlog:
            return False
        buf = self.get_buffer()
        n = min(len(buf), len(self._backlog))
        if n == 0:
            return False
        buf[:n] = self._backlog[:n]
        del self._backlog[:n]
        self.commit(n)
        return True

    # --- events ----------------------------------------------------------------------------
    def take_reads(self, count: int, nbytes: int) -> list[tuple[int, int, int]]:
        """The plain reads at the front of what was received, consumed, as (cookie,
        offset, length): flagless NBD_CMD_READs in range and within max_payload, the
        requests next_event would return as a Request without asking _check. At most
        `count`, and none after the one whose lengths reach `nbytes` in all. Stops at the
        first request of any other kind and at an incomplete one, which stay for
        next_event (a bad magic too: next_event raises it).

        One call per batch and one C loop parsing it: the server's path for pipelined
        reads (a Request and a next_event call per read cost about a fifth of a 4K
        read's CPU). When the first request is no read, [] at the cost of a glance."""
        start = self._start
        k = min((self._end - start) // 28, count)
        if (k <= 0 or self._buf[start + 7]  # (a glance at the first's command: a read?)
                or self.closed or self._large is not None or self._discard
                or self.min_block > 1):
            return []
        out = []
        size, limit = self.size, self.max_payload
        for magic, flags, cmd, cookie, offset, length in _REQUEST.iter_unpack(
                self._mv[start:start + 28 * k]):
            if (magic != proto.REQUEST_MAGIC or flags or cmd != proto.CMD_READ
                    or length > limit or offset + length > size):
                break
            out.append((cookie, offset, length))
            nbytes -= length
            if nbytes <= 0:
                break
        self._start = start + 28 * len(out)
        return out

    def write_offsets(self) -> list[int]:
        """The offsets of the writes among the requests received and not yet taken, in
        order, none consumed (the NBD server's prepare_writes hint): the scan stops at the
        first header it cannot read whole, at a write whose payload is still coming (its
        offset included), and at bad magic (left for next_event to refuse)."""
        if self._large is not None or self._discard or self.read_only:
            return []
        out = []
        buf, unpack = self._buf, _REQUEST.unpack_from
        start, end = self._start, self._end
        while end - start >= 28:
            magic, _flags, cmd, _cookie, offset, length = unpack(buf, start)
            if magic != proto.REQUEST_MAGIC:
                break
            start += 28
            if cmd == proto.CMD_WRITE:
                out.append(offset)
                start += length
        return out

    def take_writes(self, count: int) -> list[tuple[int, int, int, int, memoryview]]:
        """take_reads for writes: the plain writes at the front, consumed, as (cookie,
        flags, offset, length, data): NBD_CMD_WRITEs whose _check verdict is 0 (no flag
        but FUA, in range, within max_payload, a writable export, no alignment asked)
        with their payload in the receive buffer whole; `data` is the view of it a
        Request carries (valid until get_buffer). At most `count`. Stops at anything
        else (a write whose payload is still coming or needs a buffer of its own too),
        which stays for next_event."""
        start, end = self._start, self._end
        if (end - start < 28 or self._buf[start + 7] != proto.CMD_WRITE
                or self.read_only or self.min_block > 1 or self.closed
                or self._large is not None or self._discard):
            return []
        out = []
        buf, mv, unpack = self._buf, self._mv, _REQUEST.unpack_from
        size, limit = self.size, self.max_payload
        refused = ~self._allowed[proto.CMD_WRITE]
        while count > 0 and end - start >= 28:
            magic, flags, cmd, cookie, offset, length = unpack(buf, start)
            if (magic != proto.REQUEST_MAGIC or cmd != proto.CMD_WRITE or flags & refused
                    or length > limit or offset + length > size
                    or end - start - 28 < length):  # (so no larger than the buffer either)
                break
            start += 28
            out.append((cookie, flags, offset, length, mv[start:start + length]))
            start += length
            count -= 1
        self._start = start
        return out

    def next_event(self):
        """Next Request, BadRequest or Disconnect; NEED_DATA; ProtocolError on bad magic."""
        while True:
            event = self._parse()
            if event is not NEED_DATA or not self._pull_backlog():
                return event

    def _parse(self):
        if self.closed:
            return NEED_DATA
        if self._large is not None:
            return self._finish_large()
        if self._discard:
            take = min(self._discard, self._end - self._start)
            self._start += take
            self._discard -= take
            if self._discard:
                return NEED_DATA
        start = self._start
        if self._end - start < 28:
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != proto.REQUEST_MAGIC:
            self.closed = True
            raise ProtocolError(f"bad request magic {magic:#x}")
        if cmd == proto.CMD_WRITE:
            return self._write(flags, cookie, offset, length)
        self._start = start + 28
        if cmd == proto.CMD_DISC:
            self.closed = True
            return Disconnect()
        if (cmd or flags or length > self.max_payload or offset + length > self.size
                or self.min_block > 1):  # all but a plain read in range: _check decides
            err = self._check(cmd, flags, offset, length)
            if err:
                return BadRequest(cookie, cmd, flags, offset, length, err)
        return Request(cookie, cmd, flags, offset, length)

    def _write(self, flags: int, cookie: int, offset: int, length: int):
        err = self._check(proto.CMD_WRITE, flags, offset, length)
        start = self._start + 28
        if err:
            self._start = start
            self._discard = length
            return BadRequest(cookie, proto.CMD_WRITE, flags, offset, length, err)
        if length <= len(self._buf) - 28:
            if self._end - start < length:
                return NEED_DATA
            self._start = start + length
            return Request(cookie, proto.CMD_WRITE, flags, offset, length,
                           self._mv[start:start + length])
        have = self._end - start
        self._large = memoryview(self._payload_buffer(length))[:length]
        self._large[:have] = self._mv[start:self._end]
        self._large_filled = have
        self._large_header = (cookie, flags, offset, length)
        self._start = self._end = 0
        return self._finish_large()

    def _finish_large(self):
        assert self._large is not None and self._large_header is not None
        if self._large_filled < len(self._large):
            return NEED_DATA
        cookie, flags, offset, length = self._large_header
        data = self._large.toreadonly()  # the consumer's, for as long as it keeps it
        self._large = self._large_header = None
        self._after_large = True
        return Request(cookie, proto.CMD_WRITE, flags, offset, length, data)

    def pool_to_release(self) -> bool:
        """Whether this connection keeps payload buffers for reuse (release_pool), with no
        large write's payload under way."""
        return bool(self._pool) and self._large is None

    def release_pool(self) -> None:
        """Give up the payload buffers kept for reuse, for a connection gone idle: each
        may hold up to POOL_BYTES of touched memory, and a thousand idle connections
        held as many times that (a review saw 40 hold 540 MiB). Those no write in flight
        holds go to the thread's spares (SPARES_BYTES in all, for any connection to
        take), or are dropped; one still held stays, to be given up at the next call."""
        pool = self._pool
        spares = _spares()
        room = SPARES_BYTES - sum(map(len, spares))
        i = 0
        while i < len(pool):
            if unshared(pool, i):
                buf = pool.pop(i)
                if len(buf) <= room:
                    spares.append(buf)
                    room -= len(buf)
                else:
                    buf.close()
            else:
                i += 1

    def _payload_buffer(self, length: int):
        """A buffer of at least `length` bytes that nothing else refers to."""
        pool = self._pool
        for i in range(len(pool)):
            if unshared(pool, i):  # no view of it alive: no write in flight holds it
                if len(pool[i]) >= length:
                    return pool[i]
                del pool[i]  # free but too small: make room for a bigger one
                break
        # (an anonymous mapping, not a bytearray, which zeroes all of itself at once: its
        # pages become memory only as the payload arrives, so a client that sends the
        # header of a 32 MiB write and stalls costs what it sent, not 32 MiB)
        spares = _spares()
        for i in range(len(spares)):
            if len(spares[i]) >= length and unshared(spares, i):
                return spares[i]
        buf = mmap.mmap(-1, max(length, 1 << 20))
        if len(buf) <= SPARE_MAX and sum(map(len, pool)) + len(buf) <= POOL_BYTES:
            pool.append(buf)
        elif sum(map(len, spares)) + len(buf) <= SPARES_BYTES:
            spares.append(buf)
        return buf

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        allowed = self._allowed.get(cmd)
        if allowed is None or flags & ~allowed:
            return proto.EINVAL
        if cmd == proto.CMD_FLUSH:
            return proto.EINVAL if offset or length else 0
        if self.read_only and cmd in _WRITES:
            return proto.EPERM
        if cmd == proto.CMD_BLOCK_STATUS and not (
                self.structured and self.meta_contexts and length):
            return proto.EINVAL
        if length > self.max_payload and cmd <= proto.CMD_WRITE:
            return proto.EOVERFLOW if cmd == proto.CMD_READ and self.structured else proto.EINVAL
        if offset + length > self.size:
            return proto.ENOSPC if cmd in (proto.CMD_WRITE, proto.CMD_WRITE_ZEROES) \
                else proto.EINVAL
        if self.min_block > 1 and (offset % self.min_block or length % self.min_block):
            return proto.EINVAL
        return 0

    # --- replies ---------------------------------------------------------------------------
    def reply_ok(self, cookie: int, command: int = proto.CMD_FLUSH) -> list:
        """Success without payload (any command but a structured READ)."""
        if command == proto.CMD_READ and self.structured:
            return [_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                proto.REPLY_TYPE_NONE, cookie, 0)]
        return [_SIMPLE.pack(proto.SIMPLE_REPLY_MAGIC, 0, cookie)]

    # reply_ok of a write, as bytes: reply_ok_simple(cookie) (a C call: no Python frame)
    reply_ok_simple = staticmethod(functools.partial(_SIMPLE.pack, proto.SIMPLE_REPLY_MAGIC, 0))

    def reply_error(self, cookie: int, command: int, errno: int, message: str = "") -> list:
        if errno not in proto.ERRNOS:
            errno = proto.EINVAL if errno == 0 else proto.EIO
        if not self.structured:
            return [_SIMPLE.pack(proto.SIMPLE_REPLY_MAGIC, errno, cookie)]
        raw = _message(message)  # (a protocol string: UTF-8, no NUL, capped whole)
        return [_ERROR_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                  proto.REPLY_TYPE_ERROR, cookie, 6 + len(raw), errno,
                                  len(raw)) + raw]

    def read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a successful read reply whose data (`length` bytes, not 0)
        follows it as one piece: reply_read's common case, for the server's fast path."""
        if not self.structured:
            return _SIMPLE.pack(proto.SIMPLE_REPLY_MAGIC, 0, cookie)
        return _DATA_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                proto.REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset)

    def reply_read(self, cookie: int, offset: int, length: int, result, flags: int = 0) -> list:
        """Encode an export's read result: bytes-like of `length`, or a list of
        (offset, length, data|None) extents covering the range in order."""
        if isinstance(result, list):
            if not self.structured or flags & proto.CMD_FLAG_DF:
                return self._read_flat(cookie, offset, length, result)
            return self._read_extents(cookie, offset, length, result)
        if len(result) != length:
            return self.reply_error(cookie, proto.CMD_READ, proto.EIO, "short read")
        if length == 0 and self.structured:
            return self.reply_ok(cookie, proto.CMD_READ)
        return [self.read_header(cookie, offset, length), result]

    def _read_flat(self, cookie: int, offset: int, length: int, extents: list) -> list:
        parts: list = []
        if not _covers(extents, offset, length):
            return self.reply_error(cookie, proto.CMD_READ, proto.EIO, "bad read extents")
        for _, n, data in extents:
            parts.extend(_zeros(n) if data is None else (data,))
        if not self.structured:
            return [_SIMPLE.pack(proto.SIMPLE_REPLY_MAGIC, 0, cookie), *parts]
        if length == 0:
            return self.reply_ok(cookie, proto.CMD_READ)
        return [_DATA_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_FLAG_DONE,
                                 proto.REPLY_TYPE_OFFSET_DATA, cookie, length + 8, offset),
                *parts]

    def _read_extents(self, cookie: int, offset: int, length: int, extents: list) -> list:
        extents = [e for e in extents if e[1]]
        if not _covers(extents, offset, length):
            return self.reply_error(cookie, proto.CMD_READ, proto.EIO, "bad read extents")
        if not extents:
            return self.reply_ok(cookie, proto.CMD_READ)
        parts: list = []
        last = len(extents) - 1
        for i, (off, n, data) in enumerate(extents):
            done = proto.REPLY_FLAG_DONE if i == last else 0
            if data is None:
                parts.append(_HOLE_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, done,
                                              proto.REPLY_TYPE_OFFSET_HOLE, cookie, 12, off, n))
            else:
                parts.append(_DATA_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, done,
                                              proto.REPLY_TYPE_OFFSET_DATA, cookie, n + 8, off))
                parts.append(data)
        return parts

    def reply_block_status(self, cookie: int, offset: int, length: int, extents, flags: int = 0):
        """Encode base:allocation extents [(length, flags), ...] starting at `offset`:
        clipped to the request (and to one extent with REQ_ONE), one chunk per context."""
        flat: list[int] = []  # length, flags, length, ...: packed in one call
        covered = 0
        limit = min(length, self.size - offset)
        max_n = 1 if flags & proto.CMD_FLAG_REQ_ONE else MAX_EXTENTS
        for ext_len, ext_flags in islice(extents, max_n):
            if covered + ext_len >= limit:
                if limit > covered:
                    flat += (limit - covered, ext_flags & 0xFFFFFFFF)
                break
            if ext_len <= 0:
                break
            flat += (ext_len, ext_flags & 0xFFFFFFFF)
            covered += ext_len
        n = len(flat) >> 1
        out = struct.pack(f">{len(flat)}I", *flat)
        if n == 0:
            return self.reply_error(cookie, proto.CMD_BLOCK_STATUS, proto.EIO, "no extents")
        ids = sorted(self.meta_contexts)
        parts = []
        for i, ctx in enumerate(ids):
            done = proto.REPLY_FLAG_DONE if i == len(ids) - 1 else 0
            parts.append(_CHUNK.pack(proto.STRUCTURED_REPLY_MAGIC, done,
                                     proto.REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(out))
                         + struct.pack(">I", ctx) + out)
        return parts


def _zeros(n: int) -> list:
    whole, rest = divmod(n, len(_ZEROS))
    return [_ZEROS] * whole + ([memoryview(_ZEROS)[:rest]] if rest else [])


def _covers(extents: list, offset: int, length: int) -> bool:
    pos = offset
    for off, n, data in extents:
        if off != pos or (data is not None and len(data) != n):
            return False
        pos += n
    return pos == offset + length
