"""Sans-io codec of the peer protocol: bytes in, (request_id, message) out, frames to send.

Theory of operation. A frame is a u32 big-endian length followed by that many bytes of one
msgpack array `[PROTO_VERSION, type_id, request_id, *fields]`. Fields go in the order the
dataclass in replicator/messages.py declares them, except that a message's one `bytes` field
(WriteChunk.data, Data.data) goes last: then a large payload can be sent as its own buffer
after a small header (msgpack `bin 32` header, then the raw bytes) and never be copied into
one big frame on the way out. The bytes on the wire are the same msgpack either way.

Decoding rejects, with PeerProtocolError and nothing else: a length of 0 or over
`max_frame` (as soon as the 4 length bytes are in, before waiting for the body), anything
that is not msgpack, an unknown protocol version or type id, a wrong field count and a field
of the wrong type. After an error the codec is dead: the stream cannot be resynchronised,
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

DEFAULT_MAX_FRAME = 64 * 1024 * 1024 + 64 * 1024  # a whole 64 MiB chunk plus its header
SPLIT_THRESHOLD = 32 * 1024  # bytes fields at least this big are sent as their own buffer


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
_packb = msgpack.packb
_unpackb = msgpack.unpackb

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
        "cls", "type_id", "names", "wire_names", "kinds", "exact", "get", "build", "bytes_pos",
        "nfields",
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
        bytes_at = [i for i, k in enumerate(kinds) if k is bytes]
        assert len(bytes_at) <= 1, cls
        self.bytes_pos = bytes_at[0] if bytes_at else None  # position in declaration order
        order = list(range(len(kinds)))
        if self.bytes_pos is not None:
            order.remove(self.bytes_pos)
            order.append(self.bytes_pos)
        self.wire_names = tuple(self.names[i] for i in order)
        self.kinds = tuple(kinds[i] for i in order)  # wire order
        # the fast check: the exact python types of all wire fields, one tuple per way of
        # filling the optional ints; messages with tuple fields always take the slow path
        exacts = [()]
        for k in self.kinds:
            if k == "opt_int":
                exacts = [e + (t,) for e in exacts for t in (int, type(None))]
            else:
                exacts = [e + (k,) for e in exacts]
        has_tuple = any(k == "int_tuple" for k in self.kinds)
        self.exact = frozenset() if has_tuple else frozenset(exacts)
        self.nfields = len(kinds)
        assert 3 + self.nfields < 16, cls  # the frame header is a msgpack fixarray
        if len(self.wire_names) == 1:
            name = self.wire_names[0]
            self.get = lambda msg: (getattr(msg, name),)
        else:
            self.get = operator.attrgetter(*self.wire_names)
        self.build = _make_builder(cls, self.wire_names)

    def check(self, values: tuple, *, sending: bool) -> str | None:
        """None when `values` (wire order) fit the message, else what is wrong."""
        if len(values) != self.nfields:
            return f"{self.cls.__name__}: {len(values)} fields, expected {self.nfields}"
        if tuple(map(type, values)) in self.exact:
            return None
        for name, kind, v in zip(self.wire_names, self.kinds, values):
            t = type(v)
            if kind == "opt_int":
                ok = v is None or t is int
            elif kind == "int_tuple":
                ok = (t is tuple or (sending and t is list)) and all(type(x) is int for x in v)
            elif kind is bytes and sending:
                ok = t is bytes or t is bytearray or t is memoryview
            else:
                ok = t is kind
            if not ok:
                return f"{self.cls.__name__}.{name}: {t.__name__} is not {_kind_name(kind)}"
        return None


def _make_builder(cls: type, wire_names: tuple[str, ...]):
    """A function making a message from validated wire-order values, setting the slots
    directly: a frozen dataclass's __init__ costs twice as much and this runs per frame."""
    env = {"new": object.__new__, "cls": cls}
    lines = ["def build(v):", "    o = new(cls)"]
    for i, name in enumerate(wire_names):
        env[f"set_{name}"] = cls.__dict__[name].__set__
        lines.append(f"    set_{name}(o, v[{i}])")
    lines.append("    return o")
    exec("\n".join(lines), env)
    return env["build"]


def _kind_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else {"opt_int": "int or nil",
                                                          "int_tuple": "array of int"}[kind]


_SPECS_BY_ID: dict[int, _Spec] = {tid: _Spec(cls, tid) for tid, cls in m.MESSAGE_TYPES.items()}
_SPECS: dict[type, _Spec] = {s.cls: s for s in _SPECS_BY_ID.values()}


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class PeerCodec:
    """One connection's codec. `receive_data` then `next_event` until NEED_DATA; `encode`
    for each message to send (stateless: any number of tasks may call it)."""

    __slots__ = ("max_frame", "_buf", "_eof", "_error")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        if max_frame < 16:
            raise ValueError(f"max_frame too small: {max_frame}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._eof = False
        self._error: PeerProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by next_event."""
        return len(self._buf)

    def receive_data(self, data) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("receive_data after end of stream")
        self._buf += data

    def next_event(self):
        """`(request_id, message)`, NEED_DATA, or CLOSED after end of stream."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        have = len(buf)
        if have < 4:
            return self._short(have)
        n = _unpack_len(buf)[0]
        if n == 0 or n > self.max_frame:
            return self._fail(f"frame length {n} outside 1..{self.max_frame}")
        end = 4 + n
        if have < end:
            return self._short(have)
        try:
            if n < SPLIT_THRESHOLD:  # a copy is cheaper than a memoryview for small frames
                obj = _unpackb(buf[4:end], raw=False, use_list=False)
            else:
                with memoryview(buf) as view, view[4:end] as payload:
                    obj = _unpackb(payload, raw=False, use_list=False)
        except Exception as exc:
            return self._fail(f"frame is not msgpack: {type(exc).__name__}: {exc}")
        del buf[:end]
        return self._decode(obj)

    def _short(self, have: int):
        if not self._eof:
            return NEED_DATA
        if have:
            return self._fail(f"connection closed inside a frame ({have} bytes left)")
        return CLOSED

    def _fail(self, why: str, code: str = m.INVALID):
        self._error = PeerProtocolError(why, code=code)
        raise self._error

    def _decode(self, obj):
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
        return request_id, spec.build(values)

    def encode(self, request_id: int, message) -> bytes | list:
        """One frame: bytes, or a list of buffers (header, payload) for a large bytes field.

        Raises TypeError for a message or field the protocol cannot carry, so a caller's bug
        fails at the caller instead of closing the connection at the peer."""
        spec = _SPECS.get(type(message))
        if spec is None:
            raise TypeError(f"not a peer message: {message!r}")
        values = spec.get(message)
        why = spec.check(values, sending=True)
        if why is not None:
            raise TypeError(why)
        if spec.bytes_pos is not None:
            data = values[-1]
            if len(data) >= SPLIT_THRESHOLD:
                if type(data) is not bytes:
                    data = memoryview(data).cast("B")
                head = _packb((m.PROTO_VERSION, spec.type_id, request_id, *values[:-1]))
                # head is a fixarray one element short: fix the count, append the bin header
                head = bytes((0x90 | (3 + spec.nfields),)) + head[1:] + _bin_header(len(data))
                return [_pack_len(len(head) + len(data)) + head, data]
        payload = _packb((m.PROTO_VERSION, spec.type_id, request_id, *values))
        return _pack_len(len(payload)) + payload
