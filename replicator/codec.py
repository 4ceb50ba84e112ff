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
        "nfields", "nrequired", "defaults",
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
        # filling the optional ints and per count of optional fields present; messages with
        # tuple fields always take the slow path
        exacts = [()]
        allowed = set()
        for n, k in enumerate(self.kinds):
            if n >= self.nrequired:
                allowed.update(exacts)
            if k == "opt_int":
                exacts = [e + (t,) for e in exacts for t in (int, type(None))]
            else:
                exacts = [e + (k,) for e in exacts]
        allowed.update(exacts)
        has_tuple = any(k == "int_tuple" for k in self.kinds)
        self.exact = frozenset() if has_tuple else frozenset(allowed)
        if len(self.wire_names) == 1:
            name = self.wire_names[0]
            self.get = lambda msg: (getattr(msg, name),)
        else:
            self.get = operator.attrgetter(*self.wire_names)
        self.build = _make_builder(cls, self.wire_names)

    def check(self, values: tuple, *, sending: bool) -> str | None:
        """None when `values` (wire order) fit the message, else what is wrong."""
        n = len(values)
        if not self.nrequired <= n <= self.nfields:
            expected = (f"{self.nfields}" if self.nrequired == self.nfields
                        else f"{self.nrequired} to {self.nfields}")
            return f"{self.cls.__name__}: {n} fields, expected {expected}"
        if tuple(map(type, values)) in self.exact:
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
        if len(values) != spec.nfields:
            values = spec.complete(values)
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
        if spec.defaults:
            values = spec.trim(values)
        if spec.bytes_pos is not None:
            at = spec.nrequired - 1  # the bytes field: last of the required ones
            data = values[at]
            if len(data) >= SPLIT_THRESHOLD:
                if type(data) is not bytes:
                    data = memoryview(data).cast("B")
                # msgpack of an array is its header then its elements one after the other:
                # pack the elements before the payload, swap in the header of the whole
                # array, add the bin header; the payload follows as its own buffer, then
                # the optional fields, if any
                before = _packb((m.PROTO_VERSION, spec.type_id, request_id, *values[:at]))
                skip = 1 if 3 + at < 16 else 3
                head = (_array_header(3 + len(values)) + before[skip:]
                        + _bin_header(len(data)))
                tail = b"".join(map(_packb, values[at + 1:]))
                out = [_pack_len(len(head) + len(data) + len(tail)) + head, data]
                if tail:
                    out.append(tail)
                return out
        payload = _packb((m.PROTO_VERSION, spec.type_id, request_id, *values))
        return _pack_len(len(payload)) + payload
