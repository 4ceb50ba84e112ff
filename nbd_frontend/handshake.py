"""Sans-io server side of the NBD fixed-newstyle handshake.

Theory of operation (proto.md "Newstyle negotiation", "Fixed newstyle negotiation",
"Option types", "Option reply types"): the server sends its greeting, reads 32 bits of
client flags, then answers options one at a time until the client either enters
transmission (NBD_OPT_EXPORT_NAME, or NBD_OPT_GO answered with NBD_REP_ACK) or aborts.
A client sends no new option before the final reply to the previous one; one that does
anyway has its options answered in order, one at a time.

Options that need knowledge of the exports surface as events the shell answers:
`ExportQuery` -> `provide_export(info | None)`, `ListQuery` -> `provide_list(...)`. When
the shell could not find out (the provider failed: a registry outage during a gateway
failover), it answers with `provide_error(reply type, message)` instead: the
option gets that error and the client may go on negotiating, as proto.md wants of a
server ("error inbound options" rather than disconnect). Everything else is answered here. All state changes go through `_TRANSITIONS`; a missing
entry raises `LocalProtocolError` naming the state and the event.

No allocation is driven by the peer beyond `MAX_OPTION_DATA`: larger option payloads are
read and discarded, then answered with an error (the connection stays usable). Nor do
replies pile up: a client may pipeline options (one packet holds 4096 NBD_OPT_LIST),
and each reply can be much larger than its option. Past MAX_PENDING_OUTPUT bytes not yet
taken by data_to_send(), next_event answers no further option and returns SEND_DATA:
the shell sends what is pending (waiting for the client to read it) and asks again.

Every error message goes out through `_message`: proto.md ("Conventions") allows a string
of at most 4096 bytes without NUL, and a client may refuse a longer one (libnbd aborts
with "option error string too long"). An export name is echoed through `shown`, cut
short: a name may be 4096 bytes and its repr four times that.

TLS (proto.md "TLS support"): `tls` is the server's mode. "off" is NOTLS (NBD_OPT_STARTTLS
gets NBD_REP_ERR_POLICY); "on" is SELECTIVETLS with no TLS-only export (the client may
upgrade, and need not); "require" is FORCEDTLS (before the upgrade every option but
STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME ends the session).
A STARTTLS the server takes is answered with NBD_REP_ACK and surfaces as `StartTLS`: the
shell sends that reply, runs the TLS handshake, then calls `tls_started()` and feeds the
decrypted bytes from there on. Nothing negotiated before the upgrade is kept.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from nbd_frontend import proto
from nbd_frontend.errors import LocalProtocolError, ProtocolError

MAX_OPTION_DATA = 64 * 1024
MAX_OPTIONS = 4096  # more option requests than this on one connection is a DoS: hang up
MAX_PENDING_OUTPUT = 64 * 1024  # reply bytes held before SEND_DATA (one reply may pass it)

SHOWN_NAME = 64  # characters of an export name's repr a message or log line repeats
_OPTION_HEADER = struct.Struct(">QII")
_REPLY_HEADER = struct.Struct(">QIII")


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes
PAUSED = _Sentinel("PAUSED")  # waiting for the shell to answer a query
SEND_DATA = _Sentinel("SEND_DATA")  # send data_to_send() before asking for the next event


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "AWAIT_CLIENT_FLAGS"
    AWAIT_OPTION = "AWAIT_OPTION"
    AWAIT_EXPORT = "AWAIT_EXPORT"
    AWAIT_LIST = "AWAIT_LIST"
    AWAIT_TLS = "AWAIT_TLS"
    READY = "READY"
    CLOSED = "CLOSED"
    ERROR = "ERROR"


S = State
# (state, event) -> next state. Events are the inputs of the machine: what the peer sent
# and what the shell answered.
_TRANSITIONS: dict[tuple[State, str], State] = {
    (S.AWAIT_CLIENT_FLAGS, "client_flags"): S.AWAIT_OPTION,
    (S.AWAIT_OPTION, "option_answered"): S.AWAIT_OPTION,
    (S.AWAIT_OPTION, "export_query"): S.AWAIT_EXPORT,
    (S.AWAIT_OPTION, "list_query"): S.AWAIT_LIST,
    (S.AWAIT_OPTION, "abort"): S.CLOSED,
    (S.AWAIT_OPTION, "starttls"): S.AWAIT_TLS,
    (S.AWAIT_TLS, "tls_started"): S.AWAIT_OPTION,
    (S.AWAIT_OPTION, "tls_refused"): S.CLOSED,
    (S.AWAIT_EXPORT, "export_info"): S.AWAIT_OPTION,
    (S.AWAIT_EXPORT, "export_failed"): S.AWAIT_OPTION,
    (S.AWAIT_EXPORT, "export_go"): S.READY,
    (S.AWAIT_EXPORT, "export_refused"): S.CLOSED,
    (S.AWAIT_LIST, "list_provided"): S.AWAIT_OPTION,
    (S.AWAIT_LIST, "list_failed"): S.AWAIT_OPTION,
    (S.AWAIT_CLIENT_FLAGS, "protocol_error"): S.ERROR,
    (S.AWAIT_OPTION, "protocol_error"): S.ERROR,
}


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about an export. `flags` are the transmission
    flags without NBD_FLAG_SEND_DF, which the handshake sets itself when structured
    replies were negotiated."""

    name: str
    size: int
    flags: int
    description: str = ""
    min_block: int = proto.MIN_BLOCK
    preferred_block: int = proto.PREFERRED_BLOCK
    max_block: int = proto.MAX_PAYLOAD


@dataclass(frozen=True, slots=True)
class ExportQuery:
    """The client named an export. kind: "export_name", "info" or "go". Answer with
    provide_export(info | None) or provide_error(reply type, message)."""

    name: str
    kind: str


@dataclass(frozen=True, slots=True)
class ListQuery:
    """NBD_OPT_LIST: answer with provide_list([(name, description), ...]) or
    provide_error(reply type, message)."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was acknowledged: send data_to_send() in the clear, run the TLS
    handshake as the server, then call tls_started()."""


@dataclass(frozen=True, slots=True)
class Ready:
    """Transmission begins. `trailing_data` on the handshake holds bytes already read
    past the handshake (requests a client pipelined)."""

    export_name: str
    structured_replies: bool
    meta_contexts: dict[int, str]
    no_zeroes: bool
    flags: int = 0  # the transmission flags sent to the client


@dataclass(frozen=True, slots=True)
class Aborted:
    """The handshake ended without transmission; close the connection."""

    reason: str


_KINDS = {proto.OPT_EXPORT_NAME: "export_name", proto.OPT_INFO: "info", proto.OPT_GO: "go"}
_ALLOCATION_ID = 1
TLS_MODES = ("off", "on", "require")


class ServerHandshake:
    def __init__(self, tls: str = "off") -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        self.tls = tls
        self.tls_active = False  # the upgrade took place
        self.state = State.AWAIT_CLIENT_FLAGS
        self._in = bytearray()
        self._out = bytearray()
        self._discard = 0  # option payload bytes still to skip
        self._skipped: tuple[int, int] | None = None  # (option, reply) once skipped
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self._query: tuple[int, str, list[int]] | None = None
        self._options = 0
        self._final: object | None = None
        self.trailing_data = b""

    # --- io-free plumbing ------------------------------------------------------------------
    def initial_bytes(self) -> bytes:
        return struct.pack(">QQH", proto.NBDMAGIC, proto.IHAVEOPT,
                           proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.state in (State.READY, State.CLOSED, State.ERROR):
            self.trailing_data += bytes(data)
            return
        if self._discard:
            take = min(self._discard, len(data))
            self._discard -= take
            data = memoryview(data)[take:]
        self._in += data

    def _transition(self, event: str) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                f"event {event!r} not allowed in state {self.state.value}") from None

    def _fail(self, message: str) -> ProtocolError:
        self._transition("protocol_error")
        return ProtocolError(message)

    def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        self._out += _REPLY_HEADER.pack(proto.REPLY_MAGIC, option, rtype, len(data))
        self._out += data

    # --- events ----------------------------------------------------------------------------
    def next_event(self):
        """Return the next event, NEED_DATA, SEND_DATA or PAUSED; raise ProtocolError when
        the client broke the protocol badly enough that the connection must be dropped."""
        if self._final is not None:
            event, self._final = self._final, None
            return event
        if self.state is State.AWAIT_CLIENT_FLAGS:
            return self._client_flags()
        if self.state is State.AWAIT_OPTION:
            while self.state is State.AWAIT_OPTION:
                if len(self._out) >= MAX_PENDING_OUTPUT:
                    return SEND_DATA
                event = self._option()
                if event is not None:
                    return event
            return self.next_event()
        if self.state in (State.AWAIT_EXPORT, State.AWAIT_LIST, State.AWAIT_TLS, State.READY):
            return PAUSED
        if self.state is State.CLOSED:
            return PAUSED
        raise LocalProtocolError(f"next_event called in state {self.state.value}")

    def _client_flags(self):
        if len(self._in) < 4:
            return NEED_DATA
        (flags,) = struct.unpack_from(">I", self._in)
        del self._in[:4]
        if flags & ~(proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES):
            raise self._fail(f"unknown client flags {flags:#x}")
        self._no_zeroes = bool(flags & proto.FLAG_C_NO_ZEROES)
        if not flags & proto.FLAG_C_FIXED_NEWSTYLE and self.tls != "off":
            # (proto.md: NOTLS unless both sides said fixed newstyle)
            if self.tls == "require":
                raise self._fail("TLS is required, and the client does not speak fixed "
                                 "newstyle negotiation, which TLS needs")
            self.tls = "off"
        self._transition("client_flags")
        return self.next_event()

    def _option(self):
        """Handle one option; return an event, NEED_DATA, or None when it was answered."""
        if self._skipped is not None:
            if self._discard:
                return NEED_DATA
            option, rtype = self._skipped
            self._skipped = None
            if option == proto.OPT_ABORT:  # its data is to be ignored, however long
                return self._dispatch(option, b"")
            self._reply(option, rtype)
            self._transition("option_answered")
            return None
        if len(self._in) < 16:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(self._in)
        if magic != proto.IHAVEOPT:
            raise self._fail(f"bad option magic {magic:#x}")
        oversize = length > _max_length(option)
        if not oversize and len(self._in) < 16 + length:
            return NEED_DATA  # (its header is parsed again with the rest: not counted yet)
        self._options += 1  # (once an option is taken, however many receives it took)
        if self._options > MAX_OPTIONS:
            raise self._fail("too many options")
        if oversize:
            if option == proto.OPT_EXPORT_NAME:  # no error reply possible: hang up
                raise self._fail(f"export name of {length} bytes")
            del self._in[:16]
            take = min(length, len(self._in))
            del self._in[:take]
            self._discard = length - take
            rtype = _oversize_reply(option)
            if option == proto.OPT_SET_META_CONTEXT:  # (it replaces them even failing)
                self._meta, self._meta_export = {}, None
            if self._tls_needed() and option != proto.OPT_STARTTLS:
                rtype = proto.REP_ERR_TLS_REQD
            self._skipped = (option, rtype)
            return None
        data = bytes(self._in[16:16 + length])
        del self._in[:16 + length]
        return self._dispatch(option, data)

    def _tls_needed(self) -> bool:
        return self.tls == "require" and not self.tls_active

    def _dispatch(self, option: int, data: bytes):
        if option == proto.OPT_ABORT:
            self._reply(option, proto.REP_ACK)
            self._transition("abort")
            return Aborted("client sent NBD_OPT_ABORT")
        if option == proto.OPT_STARTTLS:
            return self._starttls()
        if self._tls_needed():
            if option == proto.OPT_EXPORT_NAME:  # (it cannot be refused: hang up)
                self._transition("tls_refused")
                return Aborted("NBD_OPT_EXPORT_NAME before TLS, which this server requires")
            return self._answer(option, proto.REP_ERR_TLS_REQD, "TLS is required: "
                                "send NBD_OPT_STARTTLS first")
        if option in _KINDS:
            return self._export_option(option, data)
        if option == proto.OPT_LIST:
            if data:
                return self._answer(option, proto.REP_ERR_INVALID, "LIST takes no data")
            self._query = (option, "", [])
            self._transition("list_query")
            return ListQuery()
        if option == proto.OPT_STRUCTURED_REPLY:
            if data:
                return self._answer(option, proto.REP_ERR_INVALID, "takes no data")
            self._structured = True
            return self._answer(option, proto.REP_ACK)
        if option in (proto.OPT_LIST_META_CONTEXT, proto.OPT_SET_META_CONTEXT):
            return self._meta_context(option, data)
        return self._answer(option, proto.REP_ERR_UNSUP, f"option {option} unsupported")

    def _starttls(self):
        # (no data: its payload limit of 0 sent a longer one through _skipped, ERR_INVALID)
        if self.tls == "off":
            return self._answer(proto.OPT_STARTTLS, proto.REP_ERR_POLICY,
                                "TLS is not configured")
        if self.tls_active:
            return self._answer(proto.OPT_STARTTLS, proto.REP_ERR_INVALID,
                                "TLS is already in use")
        if self._in:  # the client must wait for the reply before its TLS handshake
            raise self._fail("data after NBD_OPT_STARTTLS before its reply")
        self._reply(proto.OPT_STARTTLS, proto.REP_ACK)
        self._transition("starttls")
        return StartTLS()

    def tls_started(self) -> None:
        """The TLS handshake succeeded: negotiate again, from nothing (proto.md: the server
        MUST NOT preserve any negotiation state from before the upgrade)."""
        self._transition("tls_started")
        self.tls_active = True
        self._structured = False
        self._meta, self._meta_export = {}, None

    def _answer(self, option: int, rtype: int, message: str = ""):
        self._reply(option, rtype, _message(message))
        self._transition("option_answered")
        return None

    def _export_option(self, option: int, data: bytes):
        if option == proto.OPT_EXPORT_NAME:
            name = _decode(data)
            if name is None:
                raise self._fail("export name is not UTF-8")
            requests: list[int] = []
        else:
            parsed = _parse_info_request(data)
            if parsed is None:
                return self._answer(option, proto.REP_ERR_INVALID, "malformed request")
            name, requests = parsed
        self._query = (option, name, requests)
        self._transition("export_query")
        return ExportQuery(name, _KINDS[option])

    def _meta_context(self, option: int, data: bytes):
        if option == proto.OPT_SET_META_CONTEXT:
            self._meta, self._meta_export = {}, None
        if not self._structured:
            return self._answer(option, proto.REP_ERR_INVALID, "structured replies first")
        parsed = _parse_meta_request(data)
        if parsed is None:
            return self._answer(option, proto.REP_ERR_INVALID, "malformed request")
        export, queries = parsed
        listing = option == proto.OPT_LIST_META_CONTEXT
        found = (not queries and listing) or any(
            q == proto.BASE_ALLOCATION or (listing and q == "base:") for q in queries)
        if found:
            ctx_id = 0 if listing else _ALLOCATION_ID
            self._reply(option, proto.REP_META_CONTEXT,
                        struct.pack(">I", ctx_id) + proto.BASE_ALLOCATION.encode())
            if not listing:
                self._meta, self._meta_export = {ctx_id: proto.BASE_ALLOCATION}, export
        return self._answer(option, proto.REP_ACK)

    # --- answers from the shell ------------------------------------------------------------
    def provide_export(self, info: ExportInfo | None) -> None:
        """Answer the pending ExportQuery: the export's info, or None if it is unknown."""
        if self.state is not State.AWAIT_EXPORT or self._query is None:
            raise LocalProtocolError(f"provide_export not allowed in state {self.state.value}")
        option, name, requests = self._query
        if info is None:
            return self.provide_error(proto.REP_ERR_UNKNOWN, f"unknown export {shown(name)}")
        self._query = None
        flags = info.flags | proto.FLAG_HAS_FLAGS
        flags = flags | proto.FLAG_SEND_DF if self._structured else flags & ~proto.FLAG_SEND_DF
        if option == proto.OPT_EXPORT_NAME:
            self._out += struct.pack(">QH", info.size, flags)
            if not self._no_zeroes:
                self._out += bytes(124)
            return self._go(name, flags)
        self._send_info(option, info, flags, requests)
        self._reply(option, proto.REP_ACK)
        if option == proto.OPT_GO:
            return self._go(name, flags)
        self._transition("export_info")

    def _send_info(self, option: int, info: ExportInfo, flags: int, requests: list[int]):
        self._reply(option, proto.REP_INFO, struct.pack(">HQH", proto.INFO_EXPORT, info.size, flags))
        if proto.INFO_NAME in requests:
            self._reply(option, proto.REP_INFO,
                        struct.pack(">H", proto.INFO_NAME) + info.name.encode()[:proto.MAX_STRING])
        if proto.INFO_DESCRIPTION in requests and info.description:
            self._reply(option, proto.REP_INFO, struct.pack(">H", proto.INFO_DESCRIPTION)
                        + info.description.encode()[:proto.MAX_STRING])
        self._reply(option, proto.REP_INFO, struct.pack(
            ">HIII", proto.INFO_BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block))

    def _go(self, name: str, flags: int) -> None:
        self._transition("export_go")
        meta = self._meta if self._meta_export == name else {}
        self.trailing_data = bytes(self._in)
        self._in = bytearray()
        self._final = Ready(name, self._structured, dict(meta), self._no_zeroes, flags)

    def provide_error(self, rtype: int, message: str) -> None:
        """Answer the pending ExportQuery or ListQuery with the error reply `rtype` (an
        NBD_REP_ERR_*) carrying `message`: the client may send further options. After
        NBD_OPT_EXPORT_NAME, which has no error reply, the handshake ends (Aborted)."""
        if not rtype & proto.REP_FLAG_ERROR:
            raise ValueError(f"reply type {rtype:#x} is not an error")
        if self.state is State.AWAIT_LIST:
            self._query = None
            self._reply(proto.OPT_LIST, rtype, _message(message))
            self._transition("list_failed")
            return
        if self.state is not State.AWAIT_EXPORT or self._query is None:
            raise LocalProtocolError(f"provide_error not allowed in state {self.state.value}")
        option = self._query[0]
        self._query = None
        if option == proto.OPT_EXPORT_NAME:
            self._transition("export_refused")
            self._final = Aborted(message)
            return
        self._reply(option, rtype, _message(message))
        self._transition("export_failed")

    def provide_list(self, exports: list[tuple[str, str]]) -> None:
        """Answer the pending ListQuery with (name, description) pairs."""
        if self.state is not State.AWAIT_LIST:
            raise LocalProtocolError(f"provide_list not allowed in state {self.state.value}")
        for name, description in exports:
            raw = name.encode()[:proto.MAX_STRING]
            self._reply(proto.OPT_LIST, proto.REP_SERVER, struct.pack(">I", len(raw)) + raw
                        + description.encode()[:proto.MAX_STRING])
        self._reply(proto.OPT_LIST, proto.REP_ACK)
        self._query = None
        self._transition("list_provided")


def shown(name: str) -> str:
    """`name` as a message or a log line repeats it: its repr (quoted, control characters
    escaped), cut to SHOWN_NAME characters and then followed by the name's length, so that
    what a client sent can neither make our message too long for the protocol nor flood
    a log."""
    text = repr(name[:SHOWN_NAME])
    if len(text) <= SHOWN_NAME + 2 and len(name) <= SHOWN_NAME:  # (+2: the quotes)
        return text
    return f"{text[:SHOWN_NAME]}... ({len(name.encode())} bytes)"


def _message(text: str) -> bytes:
    """An error message as proto.md wants a string: UTF-8 without NUL, at most
    MAX_STRING bytes, cut on a character boundary so that what is left still decodes."""
    raw = text.replace("\0", "\\0").encode("utf-8", "backslashreplace")
    if len(raw) > proto.MAX_STRING:
        raw = raw[:proto.MAX_STRING].decode("utf-8", "ignore").encode()
    return raw


def _max_length(option: int) -> int:
    """The largest option payload we read; beyond it the payload is skipped."""
    if option == proto.OPT_EXPORT_NAME:
        return proto.MAX_STRING
    if option in (proto.OPT_INFO, proto.OPT_GO, proto.OPT_LIST_META_CONTEXT,
                  proto.OPT_SET_META_CONTEXT):
        return MAX_OPTION_DATA
    return 0 if option in (proto.OPT_LIST, proto.OPT_STRUCTURED_REPLY, proto.OPT_STARTTLS) \
        else MAX_OPTION_DATA


def _oversize_reply(option: int) -> int:
    if option in (proto.OPT_LIST, proto.OPT_STRUCTURED_REPLY, proto.OPT_STARTTLS):
        return proto.REP_ERR_INVALID
    if option in (proto.OPT_INFO, proto.OPT_GO, proto.OPT_LIST_META_CONTEXT,
                  proto.OPT_SET_META_CONTEXT):
        return proto.REP_ERR_TOO_BIG
    return proto.REP_ERR_UNSUP


def _decode(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_info_request(data: bytes) -> tuple[str, list[int]] | None:
    if len(data) < 6:
        return None
    (n,) = struct.unpack_from(">I", data)
    if n > len(data) - 6 or n > proto.MAX_STRING:
        return None
    name = _decode(data[4:4 + n])
    (count,) = struct.unpack_from(">H", data, 4 + n)
    if name is None or len(data) != 6 + n + 2 * count:
        return None
    return name, list(struct.unpack_from(f">{count}H", data, 6 + n))


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    if len(data) < 8:
        return None
    (n,) = struct.unpack_from(">I", data)
    if n > len(data) - 8 or n > proto.MAX_STRING:
        return None
    export = _decode(data[4:4 + n])
    (count,) = struct.unpack_from(">I", data, 4 + n)
    pos, queries = 8 + n, []
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (q,) = struct.unpack_from(">I", data, pos)
        if q > len(data) - pos - 4 or q > proto.MAX_STRING:
            return None
        query = _decode(data[pos + 4:pos + 4 + q])
        if query is None or ":" not in query:
            return None
        queries.append(query)
        pos += 4 + q
    if export is None or pos != len(data):
        return None
    return export, queries


__all__ = ["ServerHandshake", "ExportInfo", "ExportQuery", "ListQuery", "Ready", "Aborted",
           "StartTLS", "NEED_DATA", "SEND_DATA", "PAUSED", "State", "MAX_OPTION_DATA",
           "MAX_PENDING_OUTPUT", "TLS_MODES", "shown"]
