"""Byte-level tests of the sans-io NBD handshake (proto.md, "Fixed newstyle negotiation")."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_frontend import proto
from nbd_frontend.errors import LocalProtocolError, ProtocolError
from nbd_frontend.handshake import (MAX_OPTION_DATA, MAX_OPTIONS, MAX_PENDING_OUTPUT, NEED_DATA, PAUSED,
                                    SEND_DATA, _TRANSITIONS, Aborted, ExportInfo, ExportQuery,
                                    ListQuery, Ready, ServerHandshake, StartTLS, State,
                                    _message)

EXPORTS = {
    "disk": ExportInfo("disk", 1 << 20, proto.FLAG_HAS_FLAGS | proto.FLAG_SEND_FLUSH,
                       description="a disk"),
    "": ExportInfo("", 4096, proto.FLAG_HAS_FLAGS),
}
FLAGS = struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE)
FLAGS_NZ = struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", proto.IHAVEOPT, option, len(data)) + data


def info_req(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_req(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == proto.REPLY_MAGIC
        out.append((option, rtype, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    assert pos == len(data)
    return out


def drain(hs: ServerHandshake, events: list, sent: bytearray | None = None) -> None:
    """Take events and answer queries until the codec needs data; what it asks to have
    sent on the way (SEND_DATA) goes to `sent`."""
    while True:
        ev = hs.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return
        if ev is SEND_DATA:
            data = hs.data_to_send()
            if sent is not None:
                sent += data
            continue
        events.append(ev)
        if isinstance(ev, ExportQuery):
            hs.provide_export(EXPORTS.get(ev.name))
        elif isinstance(ev, ListQuery):
            hs.provide_list([(n, i.description) for n, i in EXPORTS.items()])
        elif isinstance(ev, StartTLS):  # (the shell's TLS handshake, taken as done)
            hs.tls_started()


def run(data, mode: str = "whole", tls: str = "off"):
    """Feed `data` to a fresh handshake whole or one byte at a time; answer queries.
    `data` may be a list of parts, fed one after the other (a client waits for the reply
    to NBD_OPT_STARTTLS before it sends more)."""
    hs = ServerHandshake(tls)
    events: list = []
    parts = data if isinstance(data, list) else [data]
    chunks = parts if mode == "whole" else [p[i:i + 1] for p in parts for i in range(len(p))]
    out = bytearray()
    for chunk in chunks:
        hs.receive_data(chunk)
        drain(hs, events, out)
        out += hs.data_to_send()
    return hs, events, bytes(out)


MODES = pytest.mark.parametrize("mode", ["whole", "bytewise"])


def test_greeting():
    assert ServerHandshake().initial_bytes() == b"NBDMAGICIHAVEOPT" + struct.pack(
        ">H", proto.FLAG_FIXED_NEWSTYLE | proto.FLAG_NO_ZEROES)


@MODES
def test_export_name_known(mode):
    hs, events, out = run(FLAGS + opt(proto.OPT_EXPORT_NAME, b"disk"), mode)
    assert events[0] == ExportQuery("disk", "export_name")
    assert isinstance(events[1], Ready) and events[1].export_name == "disk"
    assert not events[1].structured_replies and events[1].meta_contexts == {}
    size, flags = struct.unpack_from(">QH", out)
    assert size == 1 << 20 and flags & proto.FLAG_SEND_FLUSH and not flags & proto.FLAG_SEND_DF
    assert out[10:] == bytes(124)
    assert hs.state is State.READY


def test_export_name_no_zeroes_and_trailing_bytes():
    tail = b"\x25\x60\x95\x13 pipelined request"
    hs, events, out = run(FLAGS_NZ + opt(proto.OPT_EXPORT_NAME, b"disk") + tail)
    assert events[-1].no_zeroes and len(out) == 10
    assert hs.trailing_data == tail
    hs.receive_data(b"more")
    assert hs.trailing_data == tail + b"more"


@MODES
def test_export_name_unknown_closes(mode):
    hs, events, out = run(FLAGS + opt(proto.OPT_EXPORT_NAME, b"nope"), mode)
    assert isinstance(events[-1], Aborted) and hs.state is State.CLOSED and out == b""


@MODES
def test_go_with_info_requests(mode):
    data = FLAGS + opt(proto.OPT_GO, info_req("disk", proto.INFO_NAME, proto.INFO_DESCRIPTION,
                                                proto.INFO_BLOCK_SIZE, 999))
    hs, events, out = run(data, mode)
    reps = replies(out)
    assert [r[1] for r in reps] == [proto.REP_INFO] * 4 + [proto.REP_ACK]
    infos = {struct.unpack_from(">H", r[2])[0]: r[2][2:] for r in reps[:-1]}
    assert struct.unpack(">QH", infos[proto.INFO_EXPORT])[0] == 1 << 20
    assert infos[proto.INFO_NAME] == b"disk" and infos[proto.INFO_DESCRIPTION] == b"a disk"
    assert struct.unpack(">III", infos[proto.INFO_BLOCK_SIZE]) == (1, 4096, proto.MAX_PAYLOAD)
    assert events == [ExportQuery("disk", "go"), Ready("disk", False, {}, False,
                                                       EXPORTS["disk"].flags)]


@MODES
def test_info_then_unknown_then_go(mode):
    data = (FLAGS + opt(proto.OPT_INFO, info_req("disk")) + opt(proto.OPT_GO, info_req("x"))
            + opt(proto.OPT_STRUCTURED_REPLY) + opt(proto.OPT_GO, info_req("")))
    hs, events, out = run(data, mode)
    types = [r[1] for r in replies(out)]
    assert types == [proto.REP_INFO, proto.REP_INFO, proto.REP_ACK, proto.REP_ERR_UNKNOWN,
                     proto.REP_ACK, proto.REP_INFO, proto.REP_INFO, proto.REP_ACK]
    ready = events[-1]
    assert ready.export_name == "" and ready.structured_replies
    assert ready.flags & proto.FLAG_SEND_DF
    assert [e.kind for e in events if isinstance(e, ExportQuery)] == ["info", "go", "go"]


@pytest.mark.parametrize("name", ["a" * proto.MAX_STRING, "\x01" * 4000, "\x00é" * 1365])
@pytest.mark.parametrize("option", [proto.OPT_INFO, proto.OPT_GO])
def test_unknown_export_message_stays_a_protocol_string(name, option):
    """proto.md caps a string at 4096 bytes; libnbd refuses a longer error message. The
    message repeats the name cut short, escaped, and with no NUL."""
    hs, events, out = run(FLAGS + opt(option, info_req(name)) + opt(proto.OPT_GO, info_req("disk")))
    (_, rtype, message), *rest = replies(out)
    assert rtype == proto.REP_ERR_UNKNOWN and [r[1] for r in rest][-1] == proto.REP_ACK
    assert len(message) <= 256 and b"\0" not in message
    assert message.decode().startswith("unknown export ")
    assert isinstance(events[-1], Ready)


@pytest.mark.parametrize("text", ["x" * 5000, "é" * 3000])
def test_an_error_message_is_capped_on_a_character_boundary(text):
    raw = _message(text)
    assert proto.MAX_STRING - 2 <= len(raw) <= proto.MAX_STRING
    assert text.startswith(raw.decode())


def test_an_error_message_carries_no_nul():
    assert _message("a\0b") == b"a\\0b"


@pytest.mark.parametrize("payload", [
    b"", b"\x00\x00\x00\x09disk\x00\x00",  # name longer than the option
    info_req("disk") + b"\x00",  # trailing garbage
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 3) + b"\x00\x01",  # count mismatch
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
])
def test_go_malformed_is_invalid_and_connection_continues(payload):
    hs, events, out = run(FLAGS + opt(proto.OPT_GO, payload) + opt(proto.OPT_GO, info_req("disk")))
    assert replies(out)[0][1] == proto.REP_ERR_INVALID
    assert isinstance(events[-1], Ready)


@MODES
def test_list(mode):
    hs, events, out = run(FLAGS + opt(proto.OPT_LIST) + opt(proto.OPT_LIST, b"x"), mode)
    reps = replies(out)
    assert [r[1] for r in reps] == [proto.REP_SERVER, proto.REP_SERVER, proto.REP_ACK,
                                    proto.REP_ERR_INVALID]
    assert reps[0][2] == struct.pack(">I", 4) + b"disk" + b"a disk"
    assert events == [ListQuery()] and hs.state is State.AWAIT_OPTION


@pytest.mark.parametrize("option", [proto.OPT_INFO, proto.OPT_GO])
def test_a_provider_failure_errors_the_option_and_negotiation_goes_on(option):
    """The provider could not answer (a registry outage): the option gets the error and
    its message, and the client may go on (proto.md: error options, do not disconnect)."""
    hs = ServerHandshake()
    hs.receive_data(FLAGS + opt(option, info_req("disk")) + opt(proto.OPT_LIST))
    assert hs.next_event() == ExportQuery("disk", "info" if option == proto.OPT_INFO else "go")
    hs.provide_error(proto.REP_ERR_PLATFORM, "registry unreachable")
    assert hs.state is State.AWAIT_OPTION
    assert hs.next_event() == ListQuery()
    hs.provide_error(proto.REP_ERR_PLATFORM, "é" * 3000)  # (capped like every message)
    assert hs.next_event() is NEED_DATA
    events: list = []
    hs.receive_data(opt(proto.OPT_LIST) + opt(proto.OPT_GO, info_req("disk")))
    drain(hs, events)
    reps = replies(hs.data_to_send())
    assert reps[:2] == [(option, proto.REP_ERR_PLATFORM, b"registry unreachable"),
                        (proto.OPT_LIST, proto.REP_ERR_PLATFORM, "é".encode() * 2048)]
    assert [r[1] for r in reps[2:]] == [proto.REP_SERVER, proto.REP_SERVER, proto.REP_ACK,
                                        proto.REP_INFO, proto.REP_INFO, proto.REP_ACK]
    assert events[0] == ListQuery() and isinstance(events[-1], Ready)


def test_a_provider_failure_after_export_name_ends_the_handshake():
    """NBD_OPT_EXPORT_NAME has no error reply: the server can only hang up."""
    hs = ServerHandshake()
    hs.receive_data(FLAGS + opt(proto.OPT_EXPORT_NAME, b"disk"))
    assert hs.next_event() == ExportQuery("disk", "export_name")
    hs.provide_error(proto.REP_ERR_PLATFORM, "registry unreachable")
    assert hs.next_event() == Aborted("registry unreachable")
    assert hs.state is State.CLOSED and hs.data_to_send() == b""


def test_provide_error_takes_only_error_replies():
    hs = ServerHandshake()
    hs.receive_data(FLAGS + opt(proto.OPT_LIST))
    assert hs.next_event() == ListQuery()
    with pytest.raises(ValueError):
        hs.provide_error(proto.REP_ACK, "fine")
    assert hs.state is State.AWAIT_LIST


def test_pipelined_options_wait_while_replies_are_pending():
    """One packet holds 4096 NBD_OPT_LIST, and each reply may be far larger than its
    option: past MAX_PENDING_OUTPUT the codec answers nothing more (SEND_DATA) until the
    shell took what is pending, so the replies held stay bounded however many options
    wait."""
    exports = [(f"volume-{i:04d}", "vbp volume, 10737418240 bytes, 3 replicas")
               for i in range(100)]
    one = 20 + sum(20 + 4 + len(n) + len(d) for n, d in exports)  # one LIST's replies
    hs = ServerHandshake()
    hs.receive_data(FLAGS + opt(proto.OPT_LIST) * 4000)
    lists = most = 0
    sent = bytearray()
    while (ev := hs.next_event()) is not NEED_DATA:
        most = max(most, len(hs._out))
        if isinstance(ev, ListQuery):
            hs.provide_list(exports)
            lists += 1
        else:
            assert ev is SEND_DATA
            sent += hs.data_to_send()
    sent += hs.data_to_send()
    assert most <= MAX_PENDING_OUTPUT + one
    assert lists == 4000 and len(sent) == 4000 * one
    assert [r[1] for r in replies(bytes(sent[:2 * one]))] == (
        [proto.REP_SERVER] * 100 + [proto.REP_ACK]) * 2


def test_replies_the_codec_makes_itself_are_bounded_too():
    hs = ServerHandshake("require")  # (every option but STARTTLS gets TLS_REQD)
    hs.receive_data(FLAGS + opt(proto.OPT_LIST) * 4000)
    sends = 0
    while (ev := hs.next_event()) is SEND_DATA:
        assert len(hs.data_to_send()) < MAX_PENDING_OUTPUT + 100
        sends += 1
    assert ev is NEED_DATA and sends > 1


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data):
    hs, events, out = run(FLAGS + opt(proto.OPT_ABORT, data) + b"trailing")
    assert replies(out) == [(proto.OPT_ABORT, proto.REP_ACK, b"")]
    assert isinstance(events[0], Aborted) and hs.state is State.CLOSED
    assert hs.next_event() is PAUSED


def test_structured_reply_with_data_is_invalid():
    hs, events, out = run(FLAGS + opt(proto.OPT_STRUCTURED_REPLY, b"x")
                          + opt(proto.OPT_EXPORT_NAME, b"disk"))
    assert replies(out[:-134])[0][1] == proto.REP_ERR_INVALID
    assert not events[-1].structured_replies


@pytest.mark.parametrize("option,expected", [
    (proto.OPT_STARTTLS, proto.REP_ERR_POLICY),
    (proto.OPT_EXTENDED_HEADERS, proto.REP_ERR_UNSUP),
    (proto.OPT_PEEK_EXPORT, proto.REP_ERR_UNSUP),
    (999, proto.REP_ERR_UNSUP),
    (0xFFFFFFFF, proto.REP_ERR_UNSUP),
])
@MODES
def test_unsupported_options_keep_connection_usable(option, expected, mode):
    hs, events, out = run(FLAGS + opt(option, b"abc" if option > 11 else b"")
                          + opt(proto.OPT_GO, info_req("disk")), mode)
    assert replies(out)[0][:2] == (option, expected)
    assert isinstance(events[-1], Ready)


def test_meta_context_requires_structured_replies():
    hs, events, out = run(FLAGS + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))
                          + opt(proto.OPT_LIST_META_CONTEXT, meta_req("disk")))
    assert [r[1] for r in replies(out)] == [proto.REP_ERR_INVALID] * 2


@pytest.mark.parametrize("queries,expected", [
    ((), [proto.BASE_ALLOCATION]),
    (("base:",), [proto.BASE_ALLOCATION]),
    (("base:allocation",), [proto.BASE_ALLOCATION]),
    (("base:nothing", "x-foo:bar", "qemu:dirty-bitmap:a"), []),
])
def test_list_meta_context(queries, expected):
    hs, events, out = run(FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
                          + opt(proto.OPT_LIST_META_CONTEXT, meta_req("disk", *queries)))
    reps = replies(out)[1:]
    assert reps[-1][1] == proto.REP_ACK
    assert [r[2][4:].decode() for r in reps[:-1]] == expected
    assert all(r[2][:4] == bytes(4) for r in reps[:-1])


@MODES
def test_set_meta_context_then_go(mode):
    data = (FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
            + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:", "base:allocation", "x:y"))
            + opt(proto.OPT_GO, info_req("disk")))
    hs, events, out = run(data, mode)
    reps = replies(out)
    assert reps[1][1] == proto.REP_META_CONTEXT and reps[2][1] == proto.REP_ACK
    (ctx_id,) = struct.unpack_from(">I", reps[1][2])
    assert reps[1][2][4:] == b"base:allocation"
    assert events[-1].meta_contexts == {ctx_id: "base:allocation"}


def test_meta_context_for_other_export_is_dropped_at_go():
    data = (FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
            + opt(proto.OPT_SET_META_CONTEXT, meta_req("", "base:allocation"))
            + opt(proto.OPT_GO, info_req("disk")))
    assert run(data)[1][-1].meta_contexts == {}


def test_failed_set_meta_context_clears_previous():
    data = (FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
            + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))
            + opt(proto.OPT_SET_META_CONTEXT, b"\x00\x00\x00\x04disk\x00\x00\x00\x01\x00\x00\x00\x09ab")
            + opt(proto.OPT_GO, info_req("disk")))
    hs, events, out = run(data)
    assert replies(out)[3][1] == proto.REP_ERR_INVALID
    assert events[-1].meta_contexts == {}


def test_set_meta_context_too_big_to_read_clears_previous_too():
    """proto.md: NBD_OPT_SET_META_CONTEXT replaces the contexts set before "including
    when this command fails", also when it fails for being too long to be read."""
    big = meta_req("disk", *["base:allocation"] * 4000)  # (past MAX_OPTION_DATA)
    assert len(big) > MAX_OPTION_DATA
    data = (FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
            + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))
            + opt(proto.OPT_SET_META_CONTEXT, big)
            + opt(proto.OPT_GO, info_req("disk")))
    hs, events, out = run(data)
    assert replies(out)[3][1] == proto.REP_ERR_TOO_BIG
    assert events[-1].meta_contexts == {}


@pytest.mark.parametrize("payload", [
    meta_req("disk", "nocolon"), meta_req("disk")[:-1], meta_req("disk", "base:") + b"x",
    b"\x00\x00\x00\x10disk",
])
def test_meta_context_malformed(payload):
    hs, events, out = run(FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
                          + opt(proto.OPT_LIST_META_CONTEXT, payload))
    assert replies(out)[1][1] == proto.REP_ERR_INVALID


@pytest.mark.parametrize("option,expected", [
    (999, proto.REP_ERR_UNSUP), (proto.OPT_GO, proto.REP_ERR_TOO_BIG),
    (proto.OPT_LIST, proto.REP_ERR_INVALID), (proto.OPT_SET_META_CONTEXT, proto.REP_ERR_TOO_BIG),
])
def test_absurd_option_length_is_skipped_without_buffering(option, expected):
    length = 10 * 1024 * 1024
    hs = ServerHandshake()
    hs.receive_data(FLAGS + struct.pack(">QII", proto.IHAVEOPT, option, length))
    events: list = []
    chunk = b"\xaa" * 65536
    for _ in range(length // len(chunk)):
        hs.receive_data(chunk)
        drain(hs, events)
        assert len(hs._in) < 32
    hs.receive_data(opt(proto.OPT_GO, info_req("disk")))
    drain(hs, events)
    assert replies(hs.data_to_send())[0][:2] == (option, expected)
    assert isinstance(events[-1], Ready)


def test_huge_abort_is_still_acknowledged():
    hs = ServerHandshake()
    hs.receive_data(FLAGS + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_ABORT, 1 << 20))
    events: list = []
    drain(hs, events)
    hs.receive_data(bytes(1 << 20))
    drain(hs, events)
    assert isinstance(events[-1], Aborted)


@pytest.mark.parametrize("data", [
    struct.pack(">I", 4),  # unknown client flag
    FLAGS + b"IHAVEOPX" + bytes(8),  # bad option magic
    FLAGS + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_EXPORT_NAME, proto.MAX_STRING + 1),
    FLAGS + opt(proto.OPT_EXPORT_NAME, b"\xff\xff"),
])
def test_protocol_errors(data):
    hs = ServerHandshake()
    hs.receive_data(data)
    with pytest.raises(ProtocolError):
        drain(hs, [])
    assert hs.state is State.ERROR


def test_too_many_options_is_a_protocol_error():
    hs = ServerHandshake()
    hs.receive_data(FLAGS + opt(999) * 5000)
    with pytest.raises(ProtocolError):
        drain(hs, [])


def test_client_without_fixed_newstyle_flag_is_served():
    hs, events, out = run(bytes(4) + opt(proto.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(events[-1], Ready)


# --- TLS (proto.md "TLS support") -------------------------------------------------------------

def test_tls_mode_must_be_known():
    with pytest.raises(ValueError, match="off, on, require"):
        ServerHandshake("yes")


@MODES
def test_starttls_when_tls_is_on_then_go(mode):
    hs, events, out = run([FLAGS + opt(proto.OPT_STARTTLS), opt(proto.OPT_GO, info_req("disk"))],
                          mode, tls="on")
    assert isinstance(events[0], StartTLS) and isinstance(events[-1], Ready)
    assert hs.tls_active
    assert replies(out)[0] == (proto.OPT_STARTTLS, proto.REP_ACK, b"")


@MODES
def test_tls_is_optional_when_on(mode):
    hs, events, out = run(FLAGS + opt(proto.OPT_LIST) + opt(proto.OPT_GO, info_req("disk")),
                          mode, tls="on")
    assert isinstance(events[-1], Ready) and not hs.tls_active
    assert proto.REP_ERR_TLS_REQD not in {r[1] for r in replies(out)}


def test_starttls_forgets_what_was_negotiated_before():
    hs, events, out = run([FLAGS + opt(proto.OPT_STRUCTURED_REPLY)
                           + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))
                           + opt(proto.OPT_STARTTLS), opt(proto.OPT_GO, info_req("disk"))],
                          tls="on")
    ready = events[-1]
    assert isinstance(ready, Ready)
    assert not ready.structured_replies and ready.meta_contexts == {}
    assert not ready.flags & proto.FLAG_SEND_DF


def test_starttls_renegotiated_after_the_upgrade():
    _, events, _ = run([FLAGS + opt(proto.OPT_STARTTLS), opt(proto.OPT_STRUCTURED_REPLY)
                        + opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))
                        + opt(proto.OPT_GO, info_req("disk"))], tls="require")
    assert events[-1].structured_replies and events[-1].meta_contexts == {1: "base:allocation"}


@pytest.mark.parametrize("tls", ["on", "require"])
def test_second_starttls_is_invalid_and_the_connection_goes_on(tls):
    hs, events, out = run([FLAGS + opt(proto.OPT_STARTTLS), opt(proto.OPT_STARTTLS)
                           + opt(proto.OPT_GO, info_req("disk"))], tls=tls)
    got = replies(out)
    assert got[0][:2] == (proto.OPT_STARTTLS, proto.REP_ACK)
    assert got[1][:2] == (proto.OPT_STARTTLS, proto.REP_ERR_INVALID)
    assert [type(e) for e in events] == [StartTLS, ExportQuery, Ready]


@pytest.mark.parametrize("tls", ["on", "require"])
def test_starttls_with_data_is_invalid(tls):
    hs, events, out = run(FLAGS + opt(proto.OPT_STARTTLS, b"x") + opt(proto.OPT_ABORT), tls=tls)
    assert replies(out)[0][:2] == (proto.OPT_STARTTLS, proto.REP_ERR_INVALID)
    assert not hs.tls_active and not any(isinstance(e, StartTLS) for e in events)


def test_bytes_after_starttls_before_its_reply_are_a_protocol_error():
    hs = ServerHandshake("on")
    hs.receive_data(FLAGS + opt(proto.OPT_STARTTLS) + b"\x16\x03\x01")  # a pipelined hello
    with pytest.raises(ProtocolError, match="STARTTLS"):
        drain(hs, [])


@pytest.mark.parametrize("option,data", [
    (proto.OPT_LIST, b""), (proto.OPT_INFO, info_req("disk")), (proto.OPT_GO, info_req("disk")),
    (proto.OPT_STRUCTURED_REPLY, b""), (proto.OPT_LIST_META_CONTEXT, meta_req("disk")),
    (proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation")), (999, b"x"),
])
def test_require_refuses_every_option_before_the_upgrade(option, data):
    hs, events, out = run([FLAGS + opt(option, data) + opt(proto.OPT_STARTTLS),
                           opt(option, data) + opt(proto.OPT_ABORT)], tls="require")
    got = replies(out)
    assert got[0] == (option, proto.REP_ERR_TLS_REQD, got[0][2]) and b"TLS" in got[0][2]
    assert got[1][:2] == (proto.OPT_STARTTLS, proto.REP_ACK)
    assert proto.REP_ERR_TLS_REQD not in {r[1] for r in got[2:]}  # (never after it)
    assert [type(e) for e in events][0] is StartTLS


def test_require_refuses_an_oversize_option_with_tls_reqd():
    hs = ServerHandshake("require")
    hs.receive_data(FLAGS + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_GO, MAX_OPTION_DATA + 1)
                    + bytes(MAX_OPTION_DATA + 1))
    drain(hs, [])
    assert replies(hs.data_to_send()) == [(proto.OPT_GO, proto.REP_ERR_TLS_REQD, b"")]


def test_require_hangs_up_on_export_name_before_the_upgrade():
    hs, events, out = run(FLAGS + opt(proto.OPT_EXPORT_NAME, b"disk"), tls="require")
    assert [type(e) for e in events] == [Aborted] and "TLS" in events[0].reason
    assert out == b"" and hs.state is State.CLOSED


def test_no_tls_without_fixed_newstyle():
    """proto.md: NOTLS unless both sides said fixed newstyle. Optional TLS is then off;
    required TLS cannot be had, and the connection ends."""
    hs, events, out = run(bytes(4) + opt(proto.OPT_STARTTLS) + opt(proto.OPT_ABORT), tls="on")
    assert replies(out)[0][:2] == (proto.OPT_STARTTLS, proto.REP_ERR_POLICY)
    assert not any(isinstance(e, StartTLS) for e in events)
    hs = ServerHandshake("require")
    hs.receive_data(bytes(4) + opt(proto.OPT_EXPORT_NAME, b"disk"))
    with pytest.raises(ProtocolError, match="fixed newstyle"):
        drain(hs, [])


def test_require_still_takes_abort_before_the_upgrade():
    _, events, out = run(FLAGS + opt(proto.OPT_ABORT), tls="require")
    assert isinstance(events[-1], Aborted)
    assert replies(out) == [(proto.OPT_ABORT, proto.REP_ACK, b"")]


# --- the transition table -------------------------------------------------------------------

def test_every_missing_transition_raises_naming_state_and_event():
    events = {e for _, e in _TRANSITIONS}
    for state in State:
        for event in events:
            hs = ServerHandshake()
            hs.state = state
            if (state, event) in _TRANSITIONS:
                hs._transition(event)
                assert hs.state is _TRANSITIONS[(state, event)]
            else:
                with pytest.raises(LocalProtocolError) as info:
                    hs._transition(event)
                assert state.value in str(info.value) and event in str(info.value)


def test_every_transition_is_reachable_from_bytes():
    seen: set = set()
    original = ServerHandshake._transition

    def spy(self, event):
        seen.add((self.state, event))
        original(self, event)

    ServerHandshake._transition = spy
    try:
        for data, tls in [
            (FLAGS + opt(proto.OPT_LIST) + opt(proto.OPT_STRUCTURED_REPLY)
             + opt(proto.OPT_INFO, info_req("disk"))
             + opt(proto.OPT_INFO, info_req("x")) + opt(proto.OPT_GO, info_req("disk")), "off"),
            (FLAGS + opt(proto.OPT_ABORT), "off"), (FLAGS + opt(proto.OPT_EXPORT_NAME, b"x"), "off"),
            ([FLAGS + opt(proto.OPT_STARTTLS), opt(proto.OPT_GO, info_req("disk"))], "on"),
            (FLAGS + opt(proto.OPT_EXPORT_NAME, b"disk"), "require"),
        ]:
            run(data, tls=tls)
        for bad in [b"\xff" * 4, FLAGS + b"x" * 16]:
            with pytest.raises(ProtocolError):
                run(bad)
        hs = ServerHandshake()  # (the shell's answer when the provider fails)
        hs.receive_data(FLAGS + opt(proto.OPT_LIST))
        assert hs.next_event() == ListQuery()
        hs.provide_error(proto.REP_ERR_PLATFORM, "registry unreachable")
    finally:
        ServerHandshake._transition = original
    assert seen == set(_TRANSITIONS)


@pytest.mark.parametrize("state", [s for s in State if s is not State.AWAIT_EXPORT])
def test_provide_export_outside_await_export(state):
    hs = ServerHandshake()
    hs.state = state
    with pytest.raises(LocalProtocolError, match=state.value):
        hs.provide_export(EXPORTS["disk"])


@pytest.mark.parametrize("state", [s for s in State if s is not State.AWAIT_LIST])
def test_provide_list_outside_await_list(state):
    hs = ServerHandshake()
    hs.state = state
    with pytest.raises(LocalProtocolError, match=state.value):
        hs.provide_list([])


@pytest.mark.parametrize("state", [s for s in State
                                   if s not in (State.AWAIT_EXPORT, State.AWAIT_LIST)])
def test_provide_error_outside_a_query(state):
    hs = ServerHandshake()
    hs.state = state
    with pytest.raises(LocalProtocolError, match=state.value):
        hs.provide_error(proto.REP_ERR_PLATFORM, "no")


# --- fuzz -----------------------------------------------------------------------------------

OPTION_IDS = st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 0xFFFFFFFF])
OPTION = st.builds(lambda o, d: opt(o, d), OPTION_IDS, st.binary(max_size=64))
HEADER = st.builds(lambda o, n: struct.pack(">QII", proto.IHAVEOPT, o, n), OPTION_IDS,
                   st.integers(0, 2**32 - 1))
PIECE = st.one_of(OPTION, HEADER, st.binary(max_size=40),
                  st.sampled_from([opt(proto.OPT_STRUCTURED_REPLY),
                                   opt(proto.OPT_GO, info_req("disk")),
                                   opt(proto.OPT_SET_META_CONTEXT, meta_req("disk", "base:allocation"))]))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([FLAGS, FLAGS_NZ, b""]), st.lists(PIECE, max_size=12),
       st.integers(1, 50), st.sampled_from(["off", "on", "require"]))
def test_fuzz_garbage_yields_events_or_protocol_error(prefix, pieces, step, tls):
    data = prefix + b"".join(pieces)
    hs = ServerHandshake(tls)
    events: list = []
    sent = bytearray()
    try:
        for i in range(0, len(data), step):
            hs.receive_data(data[i:i + step])
            drain(hs, events, sent)
            assert len(hs._in) <= 16 + MAX_OPTION_DATA + step
            sent += hs.data_to_send()
    except ProtocolError:
        assert hs.state is State.ERROR
        return
    for ev in events:
        assert isinstance(ev, (ExportQuery, ListQuery, Ready, Aborted, StartTLS))
    if tls == "off":
        assert not any(isinstance(ev, StartTLS) for ev in events)
    if tls == "require" and not hs.tls_active:  # nothing got past the demand for TLS
        assert not any(isinstance(ev, (ExportQuery, ListQuery, Ready)) for ev in events)
    types = _reply_types(bytes(sent))
    if tls != "require":
        assert proto.REP_ERR_TLS_REQD not in {t for _, t in types}
    else:  # before the upgrade: TLS_REQD, ABORT's ACK, or STARTTLS's own answers
        for option, rtype in types:
            if option == proto.OPT_STARTTLS and rtype == proto.REP_ACK:
                break
            assert (rtype == proto.REP_ERR_TLS_REQD or option == proto.OPT_ABORT
                    or option == proto.OPT_STARTTLS and rtype == proto.REP_ERR_INVALID)


def _reply_types(data: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of the option replies in `data`, up to the end of negotiation
    (after NBD_OPT_EXPORT_NAME the server sends no option reply)."""
    out, pos = [], 0
    while pos + 20 <= len(data):
        magic, option, rtype, length = struct.unpack_from(">QIII", data, pos)
        if magic != proto.REPLY_MAGIC:
            break
        out.append((option, rtype))
        pos += 20 + length
    return out


def test_an_option_arriving_in_many_pieces_counts_once():
    """The option limit (MAX_OPTIONS, a denial of service past it) counted an option at
    each receive that brought part of it: one NBD_OPT_INFO of 4112 bytes, fed a byte at
    a time, ended the connection ("too many options") instead of being answered."""
    name = "n" * 4090
    hs, events, out = run(FLAGS + opt(proto.OPT_INFO, info_req(name)), "bytewise")
    assert [type(e) for e in events] == [ExportQuery] and events[0].name == name
    assert [r[:2] for r in replies(out)] == [(proto.OPT_INFO, proto.REP_ERR_UNKNOWN)]
    assert hs._options == 1


def test_the_option_limit_counts_options():
    """MAX_OPTIONS options are answered, each sent in two pieces; the next one ends the
    connection."""
    unknown = opt(0x7777, b"x" * 64)
    parts = [FLAGS] + [p for _ in range(MAX_OPTIONS) for p in (unknown[:20], unknown[20:])]
    hs, _events, out = run(parts)
    assert [r[1] for r in replies(out)] == [proto.REP_ERR_UNSUP] * MAX_OPTIONS
    hs.receive_data(unknown)
    with pytest.raises(ProtocolError, match="too many options"):
        hs.next_event()
