"""Sans-io codec of the peer protocol: bytes in, (request_id, message) out, frames to send.

Theory of operation. A frame is a u32 big-endian length followed by that many bytes of one
msgpack array `[PROTO_VERSION, type_id, request_id, *fields]`. Fields go in the order the
dataclass in replicator/messages.py declares them, except that a message's one `bytes` field
(WriteChunk.data, Data.data) goes last: then a large payload can be sent as its own buffer
after a small header (msgpack `bin 32` header, then the raw bytes) and never be copied into
one big frame on the way out. The bytes on the wire are the same msgpack either way.

Optional trailing fields (protocol evolution without a new version). A field declared with a
default (after every required field, as dataclasses demand) is optional: on the wire it
comes after the required fields, after the bytes field too, in declaration order. The
sender leaves out every optional field at the end that equals its default, and the decoder
fills in the defaults of the fields a frame leaves out. So a frame from a peer that predates
an optional field still decodes, and a message whose optional fields hold their defaults is
byte for byte what that older peer sends and expects. The bytes field is always required.

Decoding rejects, with PeerProtocolError and nothing else: a length of 0 or over
`max_frame` (as soon as the 4 length bytes are in, before waiting for the body), anything
that is not msgpack, an unknown protocol version or type id, a field count outside
[required fields, all fields] and a field of the wrong type. After an error the codec is dead: the stream cannot be resynchronised,
the connection must be closed.

No trio, no sockets (CONVENTIONS 1).
"""

from __future__ import annotations

import dataclasses
import operator
import struct

import msgpack

from replicator import messages as m
from replicator.errors import PeerProtocolError
from vbp.buffers import unshared

DEFAULT_MAX_FRAME = 64 * 1024 * 1024 + 64 * 1024  # a whole 64 MiB chunk plus its header
SPLIT_THRESHOLD = 32 * 1024  # bytes fields at least this big are sent as their own buffer
LARGE_FRAME = 64 * 1024  # frames at least this big are received into their own buffer
# Large frame buffers a codec keeps for reuse, in all. A replica takes every frame already
# received as one batch and answers them together, so each write of the batch holds its
# frame's buffer until then: with a single spare, every frame but one of a batch had a new
# buffer, and a new bytearray is zeroed whole (memset) and faults its pages in.
POOL_BYTES = 16 * 1024 * 1024
# A large frame's buffer grows with what has come of it, never to its declared length
# before its bytes: it starts at what came or LARGE_STEP, whichever is more, and doubles
# (realloc: no copy at these sizes) while more comes. A peer that declares 64 MiB frames
# and stalls holds LARGE_STEP per connection, not 64 MiB.
LARGE_STEP = 2 * 1024 * 1024


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")  # receive_data(b"") was called and every frame was consumed

_U32 = struct.Struct(">I")
_pack_len = _U32.pack
_unpack_len = _U32.unpack_from
# msgpack.packb makes a Packer per call, which costs more than packing a WriteChunk's
# fields (0.73 against 0.33 us for an Ok reply): one Packer, reused. pack() resets it
# after every object, also when it raises, and runs without releasing the GIL (only the
# exact types the specs allow reach it: no callback into Python), so no other thread can
# see it half-way.
_packb = msgpack.Packer(autoreset=True).pack
_unpackb = msgpack.unpackb
# Frames hold one array of fields, a field being a scalar or an array of ints: never a
# map, and at most MAX_ARRAYS arrays in all. msgpack builds every object of a frame before
# the fields are checked, and a map costs some 80 bytes a byte of frame, nested arrays
# some 25: one 16 MiB frame of empty maps took a host from 54 MiB to 1.4 GiB and held its
# event loop a second. Both are refused while the frame is decoded (_no_map, _arrays).
# What is left, scalars in a field's array, costs at most some 17 bytes a byte (8 for
# small ints), and a server session's codec bounds each array to MAX_ARRAY_ITEMS.
MAX_ARRAYS = 8


def _no_map(_map):
    """msgpack's object_hook: a map, even an empty one (which max_map_len lets through)."""
    raise ValueError("a map in a frame")


_arrays_seen = [0]  # of the frame being decoded (decoding never yields: one at a time)


def _arrays(array):
    """msgpack's list_hook: every array of the frame being decoded passes here."""
    _arrays_seen[0] += 1
    if _arrays_seen[0] > MAX_ARRAYS:
        raise ValueError(f"more than {MAX_ARRAYS} arrays in one frame")
    return array


MAX_ARRAY_ITEMS = 1 << 20  # (a chain of generations, the longest array of a request, holds
# one per snapshot ever taken of the volume, which the registry's record bounds far below)

_KINDS = {
    "str": str,
    "int": int,
    "bool": bool,
    "bytes": bytes,
    "int | None": "opt_int",
    "tuple[int, ...]": "int_tuple",
}


class _Spec:
    """What the codec knows of one message class, computed once at import."""

    __slots__ = (
        "cls", "type_id", "names", "wire_names", "kinds", "exact", "exact_sending", "tuples",
        "get", "build", "bytes_pos", "nfields", "nrequired", "defaults",
    )

    def __init__(self, cls: type, type_id: int):
        self.cls = cls
        self.type_id = type_id
        fields = dataclasses.fields(cls)
        self.names = tuple(f.name for f in fields)
        kinds = []
        for f in fields:
            if f.type not in _KINDS:
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {f.type!r}")
            kinds.append(_KINDS[f.type])
        optional = [i for i, f in enumerate(fields) if f.default is not dataclasses.MISSING]
        if any(f.default_factory is not dataclasses.MISSING for f in fields):
            raise TypeError(f"{cls.__name__}: a field default must be a plain value")
        bytes_at = [i for i, k in enumerate(kinds) if k is bytes]
        assert len(bytes_at) <= 1, cls
        assert not set(bytes_at) & set(optional), f"{cls.__name__}: the bytes field is required"
        self.bytes_pos = bytes_at[0] if bytes_at else None  # position in declaration order
        # wire order: required fields, the bytes field last of them, then the optional ones
        order = [i for i in range(len(kinds)) if i not in optional and i not in bytes_at]
        order += bytes_at + optional
        self.wire_names = tuple(self.names[i] for i in order)
        self.kinds = tuple(kinds[i] for i in order)
        self.nfields = len(kinds)
        self.nrequired = self.nfields - len(optional)
        self.defaults = tuple(fields[i].default for i in optional)  # wire order
        for d, i in zip(self.defaults, optional):
            if self.check_one(fields[i].name, kinds[i], d, sending=True):
                raise TypeError(f"{cls.__name__}.{fields[i].name}: bad default {d!r}")
        # the fast check: the exact python types of all wire fields, one tuple per way of
        # filling the optional ints and per count of optional fields present; a tuple
        # field's items are checked once its type matched
        exacts = [()]
        allowed = set()
        for n, k in enumerate(self.kinds):
            if n >= self.nrequired:
                allowed.update(exacts)
            if k == "opt_int":
                exacts = [e + (t,) for e in exacts for t in (int, type(None))]
            elif k == "int_tuple":
                exacts = [e + (tuple,) for e in exacts]
            else:
                exacts = [e + (k,) for e in exacts]
        allowed.update(exacts)
        self.exact = frozenset(allowed)
        # sending, a bytes field may be a bytearray or a memoryview too (a WriteChunk's
        # payload, here and decoded in place at the replica): the fast check for those
        at = self.kinds.index(bytes) if bytes in self.kinds else None
        self.exact_sending = self.exact if at is None else self.exact | frozenset(
            e[:at] + (t,) + e[at + 1:] for e in allowed for t in (bytearray, memoryview))
        self.tuples = tuple(i for i, k in enumerate(self.kinds) if k == "int_tuple")
        if len(self.wire_names) == 1:
            name = self.wire_names[0]
            self.get = lambda msg: (getattr(msg, name),)
        else:
            self.get = operator.attrgetter(*self.wire_names)
        # the message from validated wire-order values, slots set directly (per frame)
        self.build = m.maker(cls, self.wire_names)

    def check(self, values: tuple, *, sending: bool) -> str | None:
        """None when `values` (wire order) fit the message, else what is wrong."""
        n = len(values)
        if not self.nrequired <= n <= self.nfields:
            expected = (f"{self.nfields}" if self.nrequired == self.nfields
                        else f"{self.nrequired} to {self.nfields}")
            return f"{self.cls.__name__}: {n} fields, expected {expected}"
        if tuple(map(type, values)) in (self.exact_sending if sending else self.exact):
            for i in self.tuples:
                if i < n:
                    for x in values[i]:
                        if type(x) is not int:
                            break
                    else:
                        continue
                    break
            else:
                return None
        for name, kind, v in zip(self.wire_names, self.kinds, values):
            why = self.check_one(name, kind, v, sending=sending)
            if why is not None:
                return why
        return None

    def check_one(self, name: str, kind, v, *, sending: bool) -> str | None:
        t = type(v)
        if kind == "opt_int":
            ok = v is None or t is int
        elif kind == "int_tuple":
            ok = (t is tuple or (sending and t is list)) and all(type(x) is int for x in v)
        elif kind is bytes and sending:
            ok = t is bytes or t is bytearray or t is memoryview
        else:
            ok = t is kind
        if ok:
            return None
        return f"{self.cls.__name__}.{name}: {t.__name__} is not {_kind_name(kind)}"

    def trim(self, values: tuple) -> tuple:
        """`values` without the optional fields at the end that hold their defaults."""
        n = self.nfields
        defaults = self.defaults
        base = self.nrequired
        while n > base:
            v, d = values[n - 1], defaults[n - 1 - base]
            if type(v) is not type(d) or v != d:
                break
            n -= 1
        return values if n == self.nfields else values[:n]

    def complete(self, values: tuple) -> tuple:
        """Decoded `values` with the defaults of the optional fields the frame left out."""
        return values + self.defaults[len(values) - self.nrequired:]


def _kind_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else {"opt_int": "int or nil",
                                                          "int_tuple": "array of int"}[kind]


_SPECS_BY_ID: dict[int, _Spec] = {tid: _Spec(cls, tid) for tid, cls in m.MESSAGE_TYPES.items()}
assert 1 + max(len(s.tuples) for s in _SPECS_BY_ID.values()) <= MAX_ARRAYS
_SPECS: dict[type, _Spec] = {s.cls: s for s in _SPECS_BY_ID.values()}


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    return b"\xdc" + n.to_bytes(2, "big")  # a frame never has 65536 elements


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class PeerCodec:
    """One connection's codec. `receive_data` then `next_event` until NEED_DATA; `encode`
    for each message to send (stateless: any number of tasks may call it)."""

    __slots__ = ("max_frame", "_buf", "_pos", "_eof", "_error", "_large", "_want", "_filled",
                 "_pool", "_unpack")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, max_array_items: int | None = None):
        if max_frame < 16:
            raise ValueError(f"max_frame too small: {max_frame}")
        self.max_frame = max_frame
        # msgpack's options for a frame (see MAX_ARRAYS): no map, arrays counted, and
        # `max_array_items` each (a server's: requests; a reply may list a host's chunks)
        self._unpack = {"raw": False, "use_list": False, "object_hook": _no_map,
                        "list_hook": _arrays}
        if max_array_items is not None:
            self._unpack["max_array_len"] = max_array_items
        # received bytes; those before _pos are consumed. Frames are parsed in place and the
        # consumed prefix is dropped once per receive_data, not once per frame (a burst of
        # small frames would otherwise move the rest of the buffer for every one of them)
        self._buf = bytearray()
        self._pos = 0
        # a frame of at least LARGE_FRAME bytes gets its own buffer once its length is in:
        # the transport receives the rest straight into it (large_buffer / large_received),
        # and a WriteChunk's payload is then handed on as a view of it, never copied
        self._large: bytearray | None = None
        self._want = 0  # the large frame's length (_large grows to it: LARGE_STEP)
        self._filled = 0
        # large frames' buffers, each reused once nothing refers to it any more (the
        # message it carried is gone; vbp.buffers): a new one every time is zeroed and
        # costs a page fault per 4 KiB (POOL_BYTES)
        self._pool: list = []
        self._eof = False
        # what failed, (message, code), raised anew by each next_event after it: the
        # exception itself, kept, would hold the frame that raised it and so the codec
        # and its buffers (a cycle only the cycle collector frees)
        self._error: tuple[str, str] | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by next_event."""
        return len(self._buf) - self._pos + (self._filled if self._large is not None else 0)

    def large_buffer(self) -> memoryview | None:
        """Where the rest of a large frame goes, when one is being received (else None):
        receive into it and call large_received(n) instead of receive_data."""
        large = self._large
        if large is None:
            return None
        if self._filled == len(large):
            self._grow(self._filled + 1)
        return memoryview(large)[self._filled:]

    def large_to_end(self) -> bool:
        """Whether large_buffer() reaches the large frame's end (it grows in steps): bytes
        received past it are the next frames'."""
        return self._large is not None and len(self._large) == self._want

    def large_received(self, n: int) -> None:
        if not 0 < n <= len(self._large) - self._filled:
            raise ValueError(f"large_received({n}): {len(self._large) - self._filled} bytes expected")
        self._filled += n

    def _grow(self, least: int) -> None:
        """Grow the large frame's buffer to hold at least `least` bytes, doubling (up to
        the frame's length)."""
        large = self._large
        have = len(large)
        new = min(self._want, max(least, 2 * have, have + LARGE_STEP))
        if new > have:
            large.extend(bytes(new - have))

    def receive_data(self, data) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        if self._large is not None:  # fill the large frame first, then buffer the rest
            take = min(len(data), self._want - self._filled)
            if self._filled + take > len(self._large):
                self._grow(self._filled + take)
            self._large[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if not data:
                return
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self):
        """`(request_id, message)`, NEED_DATA, or CLOSED after end of stream."""
        if self._error is not None:
            raise PeerProtocolError(self._error[0], code=self._error[1])
        if self._large is not None:
            return self._next_large()
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if have < 4:
            return self._short(have)
        n = _unpack_len(buf, pos)[0]
        if n == 0 or n > self.max_frame:
            return self._fail(f"frame length {n} outside 1..{self.max_frame}")
        if have < 4 + n:
            if n >= LARGE_FRAME and not self._eof:
                # the rest of it goes straight into its own buffer
                large = self._large = self._frame_buffer(n, have - 4)
                self._want = n
                large[:have - 4] = memoryview(buf)[pos + 4:]
                self._filled = have - 4
                del buf[:]
                self._pos = 0
                return NEED_DATA
            return self._short(have)
        start = pos + 4
        end = start + n
        try:
            if n < SPLIT_THRESHOLD:  # a copy is cheaper than a memoryview for small frames
                obj = self._msgpack(buf[start:end])
            else:
                with memoryview(buf) as view, view[start:end] as payload:
                    obj = self._msgpack(payload)
        except Exception as exc:
            return self._fail(f"frame is not msgpack: {type(exc).__name__}: {exc}")
        if end == len(buf):  # everything consumed: reuse the buffer from its start
            del buf[:]
            self._pos = 0
        else:
            self._pos = end
        return self._decode(obj)

    def _frame_buffer(self, n: int, came: int) -> bytearray:
        """A buffer for a frame of `n` bytes, `came` of them here already, that nothing
        refers to: one of the pool's that no WriteChunk payload uses any more, else a new
        one (kept in the pool while it holds less than POOL_BYTES). It holds at most `n`
        bytes, and at least `came` or LARGE_STEP: it grows as the rest comes (_grow). A
        pooled buffer that would take the pool past POOL_BYTES by growing leaves it
        instead: grown in place, the pool would keep as many buffers as it ever had of the
        largest frames since (up to max_frame each)."""
        pool = self._pool
        for i in range(len(pool)):
            if unshared(pool, i):
                spare = pool[i]
                if len(spare) < n and sum(map(len, pool)) + n - len(spare) > POOL_BYTES:
                    del pool[i]
                    break
                size = min(n, max(len(spare), came, LARGE_STEP))
                if len(spare) > size:
                    del spare[size:]
                elif len(spare) < size:
                    spare.extend(bytes(size - len(spare)))
                return spare
        spare = bytearray(min(n, max(came, LARGE_STEP)))
        if sum(map(len, pool)) + n <= POOL_BYTES:
            pool.append(spare)
        return spare

    def _next_large(self):
        large = self._large
        if self._filled < self._want:
            if self._eof:
                return self._fail(f"connection closed inside a frame "
                                  f"({self._filled + 4} bytes of {self._want + 4})")
            return NEED_DATA
        self._large = None
        self._filled = 0
        try:
            event = _decode_write_in_place(large)
            if event is not None:
                return event
            with memoryview(large) as payload:
                obj = self._msgpack(payload)
        except PeerProtocolError as exc:
            self._failed(str(exc), exc.code)
            raise
        except Exception as exc:
            return self._fail(f"frame is not msgpack: {type(exc).__name__}: {exc}")
        return self._decode(obj)

    def _short(self, have: int):
        if not self._eof:
            return NEED_DATA
        if have:
            return self._fail(f"connection closed inside a frame ({have} bytes left)")
        return CLOSED

    def _fail(self, why: str, code: str = m.INVALID):
        self._failed(why, code)
        raise PeerProtocolError(why, code=code)

    def _failed(self, why: str, code: str) -> None:
        """The stream is broken for good: noted, and the buffers let go at once (a peer
        that breaks its connections as fast as it makes them, with most of a large frame
        sent each time, must not leave them behind: up to max_frame each)."""
        self._error = (why, code)
        self._buf = bytearray()
        self._pos = 0
        self._large = None
        self._filled = 0
        self._pool = []

    def _msgpack(self, payload):
        """The objects of one frame's msgpack, under the codec's limits (MAX_ARRAYS)."""
        _arrays_seen[0] = 0
        return _unpackb(payload, **self._unpack)

    def _decode(self, obj):
        # Ok, every write's reply, by hand: the same checks and result as below, cheaper
        if (type(obj) is tuple and len(obj) == 4 and obj[1] == _OK_ID and obj[0] == _VERSION
                and type(obj[0]) is int and type(obj[1]) is int and type(obj[2]) is int
                and obj[2] >= 0 and type(obj[3]) is int):
            return obj[2], _build_ok(obj[3], False)
        return self._decode_any(obj)

    def _decode_any(self, obj):
        if type(obj) is not tuple or len(obj) < 3:
            return self._fail(f"frame is not an array [version, type, request id, ...]")
        version, type_id, request_id = obj[0], obj[1], obj[2]
        if version != m.PROTO_VERSION or type(version) is not int:
            return self._fail(f"unsupported protocol version {version!r}", m.VERSION)
        spec = _SPECS_BY_ID.get(type_id) if type(type_id) is int else None
        if spec is None:
            return self._fail(f"unknown message type {type_id!r}")
        if type(request_id) is not int or request_id < 0:
            return self._fail(f"bad request id {request_id!r}")
        values = obj[3:]
        why = spec.check(values, sending=False)
        if why is not None:
            return self._fail(why)
        if len(values) != spec.nfields:
            values = spec.complete(values)
        return request_id, spec.build(*values)

    def encode(self, request_id: int, message) -> bytes | list:
        """One frame: bytes, or a list of buffers (header, payload[, optional fields]) for a
        large bytes field.

        Raises TypeError for a message or field the protocol cannot carry, so a caller's bug
        fails at the caller instead of closing the connection at the peer."""
        if type(message) is m.Ok:  # every write's reply, by hand: the bytes of the below
            version = message.version
            if (type(version) is int and message.stale is False and type(request_id) is int
                    and request_id >= 0):
                body = _packb((_VERSION, _OK_ID, request_id, version))
                return _pack_len(len(body)) + body
        spec, values = _wire_values(message)
        if type(request_id) is int and request_id >= 0 and (
                spec.bytes_pos is None or len(values[spec.nrequired - 1]) < SPLIT_THRESHOLD):
            # nothing to send as its own buffer: the whole frame is one packb (the same
            # bytes as frame(prepare()), which call_all uses to frame once per peer)
            body = _packb((m.PROTO_VERSION, spec.type_id, request_id) + values)
            return _pack_len(len(body)) + body
        return frame(request_id, _prepared(spec, values))


_WRITE = _SPECS[m.WriteChunk]
_VERSION = m.PROTO_VERSION
_OK_ID = _SPECS[m.Ok].type_id
_build_ok = _SPECS[m.Ok].build
assert _SPECS[m.Ok].wire_names == ("version", "stale") and _SPECS[m.Ok].defaults == (False,)
_HEAD_PEEK = 4096  # WriteChunk's fields before its payload: names, a chain of generations


def _decode_write_in_place(frame: bytearray):
    """(request_id, WriteChunk) whose `data` is a memoryview of `frame` (no copy), or None
    when the frame is not a WriteChunk with a split payload (then it is decoded as usual)."""
    h = 1 if frame[0] & 0xF0 == 0x90 else 3 if frame[0] == 0xDC else 0
    if not h or len(frame) < h + 2 or frame[h] != m.PROTO_VERSION \
            or frame[h + 1] != _WRITE.type_id:
        return None
    nreq = _WRITE.nrequired
    # (each Unpacker mallocs its max_buffer_size, up to 1 MiB, at once: sized to what it
    # is fed, a 1 MiB frame decodes in about 8.5 µs instead of 17)
    head_view = memoryview(frame)[:_HEAD_PEEK]
    unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=len(head_view))
    unpacker.feed(head_view)
    try:
        count = unpacker.read_array_header()
        if not 3 + nreq <= count <= 3 + _WRITE.nfields:
            return None
        # version, type id, request id and the required fields before the payload
        head = tuple(unpacker.unpack() for _ in range(2 + nreq))
    except (msgpack.OutOfData, ValueError):
        # a long head: the ordinary decoder handles it. (ValueError: an array or string
        # longer than the peek, which the Unpacker's limits, derived from what it is fed,
        # refuse from its header before it runs out of data: a chain of over 4096
        # generations. A malformed head is refused there too.)
        return None
    at = unpacker.tell()
    size = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(frame[at]) if at < len(frame) else None
    if size is None:
        return None
    length = int.from_bytes(frame[at + 1:at + 1 + size], "big")
    start = at + 1 + size
    end = start + length
    if end > len(frame):
        raise PeerProtocolError(f"WriteChunk payload of {length} bytes runs past its frame")
    tail: tuple = ()
    if count > 3 + nreq:  # optional fields after the payload
        tail_view = memoryview(frame)[end:]
        rest = msgpack.Unpacker(raw=False, use_list=False,
                                max_buffer_size=max(1, len(tail_view)))  # (0: no limit)
        rest.feed(tail_view)
        tail = tuple(rest.unpack() for _ in range(count - 3 - nreq))
        end += rest.tell()
    if end != len(frame):
        raise PeerProtocolError(f"WriteChunk frame has {len(frame) - end} bytes past its end")
    request_id = head[2]
    if type(request_id) is not int or request_id < 0:
        raise PeerProtocolError(f"bad request id {request_id!r}")
    values = head[3:] + (memoryview(frame)[start:start + length],) + tail
    why = _WRITE.check(values, sending=True)  # sending: the payload is a memoryview
    if why is not None:
        raise PeerProtocolError(why)
    if len(values) != _WRITE.nfields:
        values = _WRITE.complete(values)
    return request_id, _WRITE.build(*values)


class Prepared:
    """A message validated and encoded once, to be framed for any number of request ids
    (the same write to every replica): only the request id differs between its frames."""

    __slots__ = ("head", "body", "data", "tail")

    def __init__(self, head: bytes, body: bytes, data, tail: bytes):
        self.head = head  # the frame's array header, version and type id
        self.body = body  # the fields, msgpack (up to the bin header of a split payload)
        self.data = data  # a large payload sent as its own buffer, or None
        self.tail = tail  # the optional fields after a split payload


def _elements(values: tuple) -> bytes:
    """msgpack of the elements of `values`, one after the other (no array header)."""
    if not values:
        return b""
    return _packb(values)[1 if len(values) < 16 else 3:]


def _wire_values(message) -> tuple[_Spec, tuple]:
    """`message`'s spec and its fields in wire order, validated, without the optional ones
    at the end that hold their defaults (TypeError if the protocol cannot carry it)."""
    spec = _SPECS.get(type(message))
    if spec is None:
        raise TypeError(f"not a peer message: {message!r}")
    values = spec.get(message)
    why = spec.check(values, sending=True)
    if why is not None:
        raise TypeError(why)
    if spec.defaults:
        values = spec.trim(values)
    return spec, values


def prepare(message) -> Prepared:
    """Validate and encode `message` once (TypeError if the protocol cannot carry it)."""
    return _prepared(*_wire_values(message))


def _prepared(spec: _Spec, values: tuple) -> Prepared:
    # version and type id are positive fixints: one byte each
    head = _array_header(3 + len(values)) + bytes((m.PROTO_VERSION, spec.type_id))
    if spec.bytes_pos is not None:
        at = spec.nrequired - 1  # the bytes field: last of the required ones
        data = values[at]
        if len(data) >= SPLIT_THRESHOLD:
            if type(data) is not bytes:
                data = memoryview(data).cast("B")
            # the payload follows the bin header as its own buffer, then the optional
            # fields, if any
            return Prepared(head, _elements(values[:at]) + _bin_header(len(data)), data,
                            _elements(values[at + 1:]))
    return Prepared(head, _elements(values), None, b"")


def frame(request_id: int, p: Prepared) -> bytes | list:
    """The frame of a prepared message for `request_id`: bytes, or a list of buffers."""
    rid = _FIXINT[request_id] if 0 <= request_id < 128 else _packb(request_id)
    n = len(p.head) + len(rid) + len(p.body)
    if p.data is None:
        return _pack_len(n) + p.head + rid + p.body
    out = [_pack_len(n + len(p.data) + len(p.tail)) + p.head + rid + p.body, p.data]
    if p.tail:
        out.append(p.tail)
    return out


_FIXINT = [bytes((i,)) for i in range(128)]
assert 0 <= m.PROTO_VERSION < 128 and all(0 <= t < 128 for t in m.MESSAGE_TYPES)
