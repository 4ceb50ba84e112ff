"""The peer codec: roundtrips of every message, feeding patterns, garbage and limits."""

from __future__ import annotations

import dataclasses
import struct
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import messages as m
from replicator.codec import (CLOSED, LARGE_FRAME, LARGE_STEP, NEED_DATA, POOL_BYTES, SPLIT_THRESHOLD, PeerCodec,
                             prepare)
from replicator.codec import _SPECS, MAX_ARRAY_ITEMS, MAX_ARRAYS, _wire_values
from replicator.codec import frame as prepared_frame
from replicator.errors import (
    ClusterMismatch,
    PeerError,
    PeerProtocolError,
    VersionMismatch,
    error_to_exception,
    exception_to_error,
)
from vbp import errors as e

# --- strategies ----------------------------------------------------------------------------

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
texts = st.text(max_size=20)
_FIELD = {
    "str": texts,
    "int": ints,
    "bool": st.booleans(),
    "bytes": st.one_of(st.binary(max_size=64), st.sampled_from([b"\x01" * SPLIT_THRESHOLD,
                                                                 b"\x02" * 70000])),
    "int | None": st.one_of(st.none(), ints),
    "tuple[int, ...]": st.lists(ints, max_size=8).map(tuple),
}


def message_of(cls) -> st.SearchStrategy:
    return st.builds(cls, **{f.name: _FIELD[f.type] for f in dataclasses.fields(cls)})


messages = st.one_of(*(message_of(cls) for cls in m.MESSAGE_TYPES.values()))
request_ids = st.integers(min_value=0, max_value=2**64 - 1)

EXAMPLES = [
    m.Hello("c1", "h1", m.PROTO_VERSION),
    m.HelloOk("c1", "h2", m.PROTO_VERSION),
    m.HelloOk("c1", "h2", m.PROTO_VERSION, "9f3c0a1b2d4e5f60"),
    m.Error(m.FENCED, "token 3 < 4"),
    m.Ping(7),
    m.Pong("h2", 7),
    m.ReadChunk("vol", "lin", 3, (5, 2, 0), 4096, 8192, 7),
    m.Data(b"abc" * 100, 12, 5),
    m.Data(b"", 0, -1),
    m.WriteChunk("vol", "lin", 3, 5, (5,), 4096, b"x" * 4096, 4 << 20, 13, False, 7, 2),
    m.WriteChunk("vol", "lin", 3, 5, (1, 2, 5), 0, b"y" * (1 << 20), 4 << 20, 14, True, 7, 2),
    m.ZeroChunk("vol", "lin", 3, 5, (2, 5), 0, 65536, 4 << 20, 15, True, 7, 2),
    m.Flush("vol", 7, 2),
    m.Flush("vol", 7, 2, "h1-3fa9c2-1f"),
    m.WriteChunk("vol", "lin", 3, 5, (5,), 0, b"w" * 512, 4 << 20, 16, False, 7, 2, "h1-3fa9c2-20"),
    m.WriteBatch("vol", "lin", 5, (1, 5), (3, 9, 3), (0, 4096, 8192), (4096, 512, 0),
                 b"a" * 4096 + b"b" * 512, 4 << 20, False, 7, 2, "h1-3fa9c2-21 h1-3fa9c2-22 h1-3fa9c2-23"),
    m.WriteBatch("vol", "lin", 5, (5,), (3,) * 16, tuple(range(0, 16 * 4096, 4096)), (4096,) * 16,
                 b"c" * (16 * 4096), 4 << 20, True, 7, 2),  # (over LARGE_FRAME: its own buffer)
    m.Written(),
    m.Written((0, 3)),
    m.Ok(15),
    m.ChunkState("lin", 3, 5),
    m.ChunkStateReply(True, 15, (1, 2, 2**64 - 1)),
    m.ChunkExtents("lin", 3, (2, 5), 0, 4 << 20, 7),
    m.Extents(True, (4096, 1, 8192, 0)),
    m.Extents(False, ()),
    m.RangeExtents("lin", (2, 5), 4 << 20, (3 << 22) + 4096, 10 << 22, 7, (3, 5, 9)),
    m.RangeExtents("lin", (1,), 1 << 20, 0, 4 << 30, 7, rid="r1"),
    m.RangeRuns(3, (5, 9), (2, -1), (4096, 1, 8192, 0)),
    m.RangeRuns(1, (), (), ()),
    m.ChunkGens("lin", 3),
    m.Gens((1, 4, 9)),
    m.CollectedGens("lin"),
    m.WantLease("vol", 7),
    m.Auth("ab" * 32),
    m.Hello("cluster-a", "host-1", 1, "0f" * 16),
    m.HelloOk("cluster-a", "host-2", 1, "b00t", "1e" * 16, "ab" * 32),
    m.ChunkIndexes("lin"),
    m.Indexes((0, 2, 7)),
    m.DirtyChunks("lin", 4),
    m.ScrubChunk("lin", 3, 5, 7),
    m.ScrubState(True, False, 15, (1, 0, 2**64 - 1), (2,)),
    m.ScrubState(False, False, 0, (), ()),
    m.RepairPages("lin", 3, 5, 4 << 20, 2, (9, 0), 15, False, 7, b"z" * 8192),
    m.RepairPages("lin", 3, 5, 4 << 20, 2, (9,), 15, True, 7, b""),
    m.Repaired(True, 15),
]


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def wire(request_id: int, msg) -> bytes:
    out = PeerCodec().encode(request_id, msg)
    return out if type(out) is bytes else b"".join(bytes(b) for b in out)


def drain(codec: PeerCodec) -> list:
    events = []
    while (event := codec.next_event()) is not NEED_DATA:
        if event is CLOSED:
            break
        events.append(event)
    return events


# --- examples ------------------------------------------------------------------------------


def test_examples_cover_every_message_type():
    assert {type(x) for x in EXAMPLES} == set(m.MESSAGE_TYPES.values())


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda x: type(x).__name__)
def test_roundtrip_example(msg):
    c = PeerCodec()
    c.receive_data(wire(42, msg))
    assert c.next_event() == (42, msg)
    assert c.next_event() is NEED_DATA


def test_type_ids_are_stable():
    # wire format: renumbering breaks every peer running the previous release
    assert {cls.__name__: tid for tid, cls in m.MESSAGE_TYPES.items()} == {
        "Hello": 1, "HelloOk": 2, "Error": 3, "Ping": 4, "Pong": 5, "ReadChunk": 10,
        "Data": 11, "WriteChunk": 12, "ZeroChunk": 13, "Flush": 14, "Ok": 15,
        "ChunkState": 16, "ChunkStateReply": 17, "ChunkExtents": 18, "Extents": 19,
        "ChunkGens": 20, "Gens": 21, "ChunkIndexes": 22, "Indexes": 23, "DirtyChunks": 24,
        "WriteBatch": 25, "Written": 26, "CollectedGens": 27, "WantLease": 28, "Auth": 29,
        "RangeExtents": 30, "RangeRuns": 31,
        "ScrubChunk": 40, "ScrubState": 41,
        "RepairPages": 42, "Repaired": 43,
    }


def test_frame_layout_is_msgpack_with_bytes_field_last():
    raw = wire(9, m.Data(b"zz", 3, 4))
    assert struct.unpack(">I", raw[:4])[0] == len(raw) - 4
    assert msgpack.unpackb(raw[4:]) == [m.PROTO_VERSION, 11, 9, 3, 4, b"zz"]


def test_large_payload_is_a_separate_buffer_and_same_bytes():
    data = bytes(range(256)) * 4096  # 1 MiB
    msg = m.WriteChunk("v", "l", 1, 2, (2,), 0, data, 4 << 20, 3, False, 4, 5)
    out = PeerCodec().encode(1, msg)
    assert isinstance(out, list) and out[-1] is data  # not copied
    joined = b"".join(bytes(b) for b in out)
    small = msgpack.packb([m.PROTO_VERSION, 12, 1, "v", "l", 1, 2, [2], 0, 4 << 20, 3, False,
                           4, 5, data])
    assert joined == frame(small)


def test_memoryview_and_bytearray_payloads_are_accepted_on_send():
    for data in (bytearray(b"q" * 100), memoryview(b"r" * (SPLIT_THRESHOLD + 1))):
        msg = m.Data(data, 1, 2)
        c = PeerCodec()
        c.receive_data(wire(1, msg))
        _, got = c.next_event()
        assert got.data == bytes(data) and type(got.data) is bytes


def test_feeding_whole_byte_at_a_time_and_with_trailing_bytes():
    stream = b"".join(wire(i, msg) for i, msg in enumerate(EXAMPLES))
    expected = list(enumerate(EXAMPLES))
    whole = PeerCodec()
    whole.receive_data(stream)
    assert drain(whole) == expected

    one = PeerCodec()
    got = []
    for i in range(len(stream)):
        one.receive_data(stream[i : i + 1])
        got.extend(drain(one))
    assert got == expected

    trailing = PeerCodec()
    partial = wire(99, m.Ping(1))
    trailing.receive_data(stream + partial[:5])
    assert drain(trailing) == expected
    assert trailing.buffered == 5
    trailing.receive_data(partial[5:])
    assert drain(trailing) == [(99, m.Ping(1))]


def test_end_of_stream():
    c = PeerCodec()
    c.receive_data(wire(1, m.Ping(1)))
    c.receive_data(b"")
    assert c.next_event() == (1, m.Ping(1))
    assert c.next_event() is CLOSED
    c = PeerCodec()
    c.receive_data(wire(1, m.Ping(1))[:-1])
    c.receive_data(b"")
    with pytest.raises(PeerProtocolError, match="inside a frame"):
        c.next_event()


# --- rejections ----------------------------------------------------------------------------


def rejected(raw: bytes, match: str, *, max_frame: int | None = None) -> PeerProtocolError:
    c = PeerCodec() if max_frame is None else PeerCodec(max_frame)
    c.receive_data(raw)
    with pytest.raises(PeerProtocolError, match=match) as info:
        c.next_event()
    with pytest.raises(PeerProtocolError):  # a dead codec stays dead
        c.next_event()
    return info.value


def test_oversized_frame_rejected_from_its_length_alone():
    # only the 4 length bytes: the codec must not wait for 2 GiB to arrive
    rejected(struct.pack(">I", 2**31), "outside", max_frame=1 << 20)
    rejected(struct.pack(">I", (1 << 20) + 1), "outside", max_frame=1 << 20)
    ok = PeerCodec(1 << 20)
    ok.receive_data(struct.pack(">I", 1 << 20))
    assert ok.next_event() is NEED_DATA


def test_zero_length_frame_rejected():
    rejected(b"\0\0\0\0", "outside")


def test_not_msgpack_rejected():
    rejected(frame(b"\xc1"), "not msgpack")  # 0xc1 is never used
    rejected(frame(msgpack.packb([1, 15, 1, 5]) + b"\x00"), "not msgpack")  # extra data


def test_maps_and_nested_arrays_are_refused_while_the_frame_is_decoded():
    """msgpack builds a frame's objects before its fields are checked: a Ping followed by
    16 MiB of empty maps took a host from 54 MiB to 1.4 GiB (a review's reproduction).
    No frame holds a map, nor more than MAX_ARRAYS arrays (a field is an array of ints at
    most): either is refused as it is met, the frame's memory bounded by its own size."""
    import tracemalloc

    ping = [m.PROTO_VERSION, 4, 7, 5]  # (a Ping: its one field, 5)
    n = 1 << 20
    for filler in (b"\x80", b"\x90", b"\x91\x00"):  # {}, [], [0]
        body = b"\xdd" + struct.pack(">I", 4 + n) + msgpack.packb(ping)[1:] + filler * n
        tracemalloc.start()
        try:
            rejected(frame(body), "not msgpack")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * len(body), (filler, peak)
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 4, 7, {}])), "a map")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 4, 7, [[]] * 8])), f"more than {MAX_ARRAYS}")
    # the most arrays a message has: decoded as before
    most = max(_SPECS.values(), key=lambda s: len(s.tuples))
    assert 1 + len(most.tuples) <= MAX_ARRAYS


def test_a_server_codec_bounds_each_array():
    """A server's codec (requests) takes arrays of up to MAX_ARRAY_ITEMS items; a
    client's (replies, which may list every chunk a host holds) any the frame holds."""
    read = m.ReadChunk("vol", "lin", 0, tuple(range(11)), 0, 4096, 3)
    raw = wire(1, read)
    small = PeerCodec(max_array_items=10)
    small.receive_data(raw)
    with pytest.raises(PeerProtocolError, match="max_array_len"):
        small.next_event()
    ok = PeerCodec(max_array_items=11)
    ok.receive_data(raw)
    assert drain(ok) == [(1, read)]
    assert MAX_ARRAY_ITEMS >= 1 << 20


def test_unknown_type_rejected():
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 99, 1, 5])), "unknown message type")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, "Ok", 1, 5])), "unknown message type")


def test_other_version_rejected_with_version_code():
    exc = rejected(frame(msgpack.packb([2, 15, 1, 5])), "version")
    assert exc.code == m.VERSION
    rejected(frame(msgpack.packb([True, 15, 1, 5])), "version")


def test_wrong_field_count_rejected():
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 15, 1])), "0 fields")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 15, 1, 5, False, 6])), "3 fields")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 15])), "not an array")
    rejected(frame(msgpack.packb({"a": 1})), "a map in a frame")  # (refused as it is decoded)


@pytest.mark.parametrize("fields, match", [
    ([5, 7, "x"], r"Data.data: str is not bytes"),
    ([5, True, b""], r"Data.gen: bool is not int"),
    ([5.0, 7, b""], r"Data.version: float is not int"),
])
def test_wrong_field_type_rejected(fields, match):
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 11, 1, *fields])), match)


def test_optional_and_tuple_fields_checked():
    read = [m.PROTO_VERSION, 10, 1, "v", "l", 1, [3, "x"], 0, 1, 1, False]
    rejected(frame(msgpack.packb(read)), "chain")
    write = [m.PROTO_VERSION, 12, 1, "v", "l", 1, 2, None, 0, 1, 1, False, 1, 1, b""]
    rejected(frame(msgpack.packb(write)), "chain")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 15, -1, 5, False])), "request id")


def test_encode_refuses_what_the_protocol_cannot_carry():
    c = PeerCodec()
    with pytest.raises(TypeError, match="not a peer message"):
        c.encode(1, ("Ok", 5))
    with pytest.raises(TypeError, match="Ok.version"):
        c.encode(1, m.Ok("5"))
    with pytest.raises(TypeError, match="fua"):
        c.encode(1, m.WriteChunk("v", "l", 1, 2, (2,), 0, b"", 1, 1, 0, 1, 1))
    with pytest.raises(TypeError, match="chain"):  # a tuple's items, on the fast path too
        c.encode(1, m.WriteChunk("v", "l", 1, 2, (1, "2"), 0, b"", 1, 1, False, 1, 1))
    with pytest.raises(TypeError, match="chain"):
        c.encode(1, m.WriteChunk("v", "l", 1, 2, (1, True), 0, b"", 1, 1, False, 1, 1))


@pytest.mark.parametrize("size", [0, 100, SPLIT_THRESHOLD, SPLIT_THRESHOLD * 3])
def test_a_prepared_message_frames_as_encode_would_for_any_request_id(size):
    msg = m.WriteChunk("v", "l", 1, 2, (1, 2), 0, b"\x07" * size, 1 << 22, 3, True, 4, 5)
    p = prepare(msg)
    out = PeerCodec()
    for request_id in (0, 1, 127, 128, 255, 65536, 2**32 + 1, 2**64 - 1):
        f = prepared_frame(request_id, p)
        assert f == PeerCodec().encode(request_id, msg)
        out.receive_data(f if type(f) is bytes else b"".join(f))
        assert out.next_event() == (request_id, msg)
    assert out.next_event() is NEED_DATA and out.buffered == 0


# --- properties ----------------------------------------------------------------------------

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(request_ids, messages)
def test_roundtrip_every_message(request_id, msg):
    c = PeerCodec()
    c.receive_data(wire(request_id, msg))
    assert c.next_event() == (request_id, msg)
    assert c.next_event() is NEED_DATA


@FAST
@given(st.lists(st.tuples(request_ids, messages), max_size=6), st.data())
def test_any_split_of_a_stream_decodes_the_same(pairs, data):
    stream = b"".join(wire(rid, msg) for rid, msg in pairs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    c = PeerCodec()
    got = []
    last = 0
    for cut in cuts + [len(stream)]:
        if cut > last:  # b"" would mean end of stream
            c.receive_data(stream[last:cut])
        last = cut
        got.extend(drain(c))
    assert got == pairs


def _garbage_only_yields_messages_or_protocol_errors(raw: bytes, max_frame: int) -> None:
    c = PeerCodec(max_frame)
    if raw:
        c.receive_data(raw)
    c.receive_data(b"")  # then end of stream: the codec must not wait for more
    try:
        while (event := c.next_event()) is not CLOSED:
            request_id, msg = event
            assert type(msg) in m.TYPE_IDS
            assert wire(request_id, msg)  # whatever decoded can be encoded again
    except PeerProtocolError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(16, 1 << 16))
def test_fuzz_random_bytes(raw, max_frame):
    _garbage_only_yields_messages_or_protocol_errors(raw, max_frame)


msgpack_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | texts | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.just(m.PROTO_VERSION), msgpack_values),
       st.one_of(st.sampled_from(sorted(m.MESSAGE_TYPES)), msgpack_values),
       st.one_of(request_ids, msgpack_values),
       st.lists(msgpack_values, max_size=14))
def test_fuzz_framed_msgpack(version, type_id, request_id, fields):
    # well-framed msgpack with plausible headers reaches the field checks
    raw = frame(msgpack.packb([version, type_id, request_id, *fields]))
    _garbage_only_yields_messages_or_protocol_errors(raw, 1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES[:-4]), st.data())
def test_fuzz_mutated_frames(msg, data):
    raw = bytearray(wire(1, msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _garbage_only_yields_messages_or_protocol_errors(bytes(raw), 1 << 22)


# --- error mapping -------------------------------------------------------------------------


@pytest.mark.parametrize("exc, code, back", [
    (e.Fenced("old token"), m.FENCED, e.Fenced),
    (e.StaleEpoch("epoch 3 < 5"), m.STALE_EPOCH, e.StaleEpoch),
    (e.NotFound("no chunk"), m.NOT_FOUND, e.NotFound),
    (e.NoSpace("disk full"), m.NO_SPACE, e.NoSpace),
    (e.ChecksumError("page 3"), m.CHECKSUM, e.ChecksumError),
    (e.InvalidArgument("offset"), m.INVALID, e.InvalidArgument),
    (e.OutOfRange("beyond"), m.INVALID, e.InvalidArgument),
    (e.PeerUnavailable("h3 down"), m.UNAVAILABLE, e.PeerUnavailable),
    (ClusterMismatch("other"), m.CLUSTER, ClusterMismatch),
    (VersionMismatch("v9"), m.VERSION, VersionMismatch),
    (ZeroDivisionError("bug"), m.INTERNAL, PeerError),
])
def test_error_mapping_both_ways(exc, code, back):
    err = exception_to_error(exc)
    assert err.code == code
    again = error_to_exception(err)
    assert type(again) is back
    assert str(exc) in str(again)


def test_unknown_error_code_is_a_peer_error():
    exc = error_to_exception(m.Error("from_the_future", "hm"))
    assert isinstance(exc, PeerError) and "from_the_future" in str(exc)


def test_every_code_maps_to_an_exception():
    for code in m.ERROR_CODES:
        assert isinstance(error_to_exception(m.Error(code, "x")), e.VbpError)


# --- optional trailing fields (protocol evolution) -----------------------------------------


def _wire_order(cls) -> list[dataclasses.Field]:
    """The documented wire order, computed naively: required fields in declaration order
    with the bytes field moved last, then the fields with defaults."""
    fields = dataclasses.fields(cls)
    optional = [f for f in fields if f.default is not dataclasses.MISSING]
    required = [f for f in fields if f.default is dataclasses.MISSING]
    required.sort(key=lambda f: f.type == "bytes")  # stable: only the bytes field moves
    return required + optional


def _as_wire(v):
    return list(v) if type(v) is tuple else bytes(v) if type(v) in (bytearray, memoryview) else v


def _raw_frame(request_id: int, msg, nfields: int) -> bytes:
    """A frame with the first `nfields` wire fields, as a peer built for another revision
    of the message (fewer optional fields) would send it."""
    order = _wire_order(type(msg))[:nfields]
    values = [_as_wire(getattr(msg, f.name)) for f in order]
    return frame(msgpack.packb([m.PROTO_VERSION, m.TYPE_IDS[type(msg)], request_id, *values]))


EVOLVED = [cls for cls in m.MESSAGE_TYPES.values()
           if any(f.default is not dataclasses.MISSING for f in dataclasses.fields(cls))]


def test_client_data_messages_carry_a_request_id():
    assert {cls.__name__ for cls in EVOLVED} == {
        "ReadChunk", "WriteChunk", "ZeroChunk", "Flush", "ChunkExtents", "Ok", "HelloOk",
        "WriteBatch", "Written", "Hello", "RangeExtents"}
    for cls in EVOLVED:
        if cls not in (m.Ok, m.HelloOk, m.Written, m.Hello):
            assert "rid" in [f.name for f in _wire_order(cls)]
    # revision 2 appended after revision 1's field, revision 8 after revision 2's
    assert [f.name for f in _wire_order(m.ReadChunk)][-3:] == ["rid", "allow_stale", "token"]
    assert [f.name for f in _wire_order(m.Ok)] == ["version", "stale"]


def test_a_hello_ok_without_a_boot_id_is_the_frame_older_hosts_send_and_expect():
    """Revision 6 added HelloOk.boot: sent empty (to a host of an older revision), the
    frame is byte for byte the old one; an old server's frame decodes with boot ""."""
    old = frame(msgpack.packb([m.PROTO_VERSION, 2, 0, "c1", "h2", m.PROTO_VERSION]))
    assert wire(0, m.HelloOk("c1", "h2", m.PROTO_VERSION)) == old
    c = PeerCodec()
    c.receive_data(old)
    assert c.next_event() == (0, m.HelloOk("c1", "h2", m.PROTO_VERSION, boot=""))
    assert wire(0, m.HelloOk("c1", "h2", m.PROTO_VERSION, "0a1b")) == frame(
        msgpack.packb([m.PROTO_VERSION, 2, 0, "c1", "h2", m.PROTO_VERSION, "0a1b"]))


def test_frame_without_the_optional_field_decodes_with_its_default():
    # exactly what a peer that predates request ids sends
    old = frame(msgpack.packb([m.PROTO_VERSION, 12, 5, "v", "l", 1, 2, [2], 0, 4 << 20, 3,
                               False, 4, 5, b"abc"]))
    c = PeerCodec()
    c.receive_data(old)
    assert c.next_event() == (5, m.WriteChunk("v", "l", 1, 2, (2,), 0, b"abc", 4 << 20, 3,
                                              False, 4, 5, rid=""))


def test_default_optional_fields_are_left_out_on_the_wire():
    # background traffic (rid "") is byte for byte the frame of a peer without request ids
    assert wire(5, m.Flush("v", 7, 2)) == frame(msgpack.packb([m.PROTO_VERSION, 14, 5, "v", 7, 2]))
    assert wire(5, m.Flush("v", 7, 2, "h1-0a-1")) == frame(
        msgpack.packb([m.PROTO_VERSION, 14, 5, "v", 7, 2, "h1-0a-1"]))


@pytest.mark.parametrize("size", [100, SPLIT_THRESHOLD, 1 << 20])
def test_optional_field_follows_the_payload(size):
    # WriteChunk with a rid has 16 array elements: past a msgpack fixarray
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    msg = m.WriteChunk("v", "l", 1, 2, (2,), 0, data, 4 << 20, 3, False, 4, 5, "h1-0a-2f")
    out = PeerCodec().encode(1, msg)
    if size >= SPLIT_THRESHOLD:
        assert isinstance(out, list) and out[1] is data  # still not copied
    joined = out if type(out) is bytes else b"".join(bytes(b) for b in out)
    assert joined == frame(msgpack.packb([m.PROTO_VERSION, 12, 1, "v", "l", 1, 2, [2], 0,
                                          4 << 20, 3, False, 4, 5, data, "h1-0a-2f"]))
    c = PeerCodec()
    c.receive_data(joined)
    assert c.next_event() == (1, msg)


def test_field_count_outside_required_to_all_rejected():
    short = [m.PROTO_VERSION, 14, 1, "v", 7]
    rejected(frame(msgpack.packb(short)), "Flush: 2 fields, expected 3 to 4")
    rejected(frame(msgpack.packb(short + [2, "rid", "extra"])), "5 fields, expected 3 to 4")
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 15, 1, 5, True, 6])), "Ok: 3 fields, expected 1 to 2$")


def test_optional_field_type_checked_both_ways():
    rejected(frame(msgpack.packb([m.PROTO_VERSION, 14, 1, "v", 7, 2, 99])),
             "Flush.rid: int is not str")
    with pytest.raises(TypeError, match="Flush.rid"):
        PeerCodec().encode(1, m.Flush("v", 7, 2, None))


@FAST
@given(st.sampled_from(EVOLVED).flatmap(message_of), request_ids, st.data())
def test_any_revision_of_a_message_decodes(msg, request_id, data):
    """A frame carrying any number of the optional fields, from none (an older peer) to
    all, decodes to the message with the defaults of the fields it leaves out."""
    order = _wire_order(type(msg))
    required = sum(1 for f in order if f.default is dataclasses.MISSING)
    n = data.draw(st.integers(required, len(order)))
    c = PeerCodec()
    c.receive_data(_raw_frame(request_id, msg, n))
    expected = dataclasses.replace(msg, **{f.name: f.default for f in order[n:]})
    assert c.next_event() == (request_id, expected)


@FAST
@given(messages, request_ids)
def test_encoding_is_the_shortest_revision(msg, request_id):
    """The sender leaves out exactly the trailing optional fields that hold their defaults."""
    order = _wire_order(type(msg))
    n = len(order)
    while n and order[n - 1].default is not dataclasses.MISSING \
            and getattr(msg, order[n - 1].name) == order[n - 1].default:
        n -= 1
    assert wire(request_id, msg) == _raw_frame(request_id, msg, n)

# --- large frames: received into their own buffer ---------------------------------------------

BIG = bytes(range(256)) * 400  # 100 KiB: over LARGE_FRAME


def feed_large(c: PeerCodec, raw: bytes, step: int, direct: bool) -> list:
    """Feed `raw` in `step`-byte pieces; with `direct`, a large frame's rest goes through
    large_buffer/large_received as the transport does."""
    events, at = [], 0
    while at < len(raw):
        target = c.large_buffer() if direct else None
        if target is not None:
            n = min(step, len(target), len(raw) - at)
            target[:n] = raw[at:at + n]
            c.large_received(n)
        else:
            n = min(step, len(raw) - at)
            c.receive_data(raw[at:at + n])
        at += n
        events += drain(c)
    return events


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("step", [1000, 65536, 300000])
def test_large_frames_between_small_ones_any_feeding(step, direct):
    w = m.WriteChunk("v", "l", 1, 2, (1, 2), 8192, BIG, 1 << 22, 3, True, 4, 5)
    d = m.Data(BIG, 7, 2)
    wr = dataclasses.replace(w, rid="req-1")  # an optional field after the payload
    msgs = [(1, m.Ping(1)), (2, w), (3, m.Ok(1)), (4, d), (5, wr), (6, m.Pong("h", 1))]
    raw = b"".join(wire(rid, msg) for rid, msg in msgs)
    c = PeerCodec()
    events = feed_large(c, raw, step, direct)
    assert events == msgs and c.buffered == 0
    assert type(events[3][1].data) is bytes  # only a WriteChunk's payload is a view
    c.receive_data(b"")
    assert c.next_event() is CLOSED


def test_a_large_write_payload_is_a_view_of_the_frame_not_a_copy():
    w = m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG, 1 << 22, 3, False, 4, 5)
    raw = wire(9, w)
    c = PeerCodec()
    c.receive_data(raw[:100])
    assert c.next_event() is NEED_DATA
    target = c.large_buffer()
    assert len(target) == len(raw) - 100
    target[:] = raw[100:]
    c.large_received(len(target))
    rid, got = c.next_event()
    assert rid == 9 and got == w and type(got.data) is memoryview and bytes(got.data) == BIG
    assert c.large_buffer() is None


def test_large_frame_cut_by_end_of_stream_or_malformed_is_an_error():
    raw = wire(1, m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG, 1 << 22, 3, False, 4, 5))
    c = PeerCodec()
    c.receive_data(raw[:-10])
    assert c.next_event() is NEED_DATA
    c.receive_data(b"")
    with pytest.raises(PeerProtocolError, match="closed inside a frame"):
        c.next_event()
    # dead: it says so again, and lets go of its buffers at once (not kept with the
    # failure, until the cycle collector happened to run)
    assert c.buffered == 0 and c.large_buffer() is None and not c._buf and not c._pool
    with pytest.raises(PeerProtocolError, match="closed inside a frame") as again:
        c.next_event()
    assert again.value.code == m.INVALID
    del again
    assert sys.getrefcount(c) == 2  # nothing holds a failed codec but its owner (and the call)
    # a WriteChunk whose fields are of the wrong type, its payload split as usual
    head = msgpack.packb([m.PROTO_VERSION, 12, 1, "v", "l", "one", 2, (1,), 0, 1 << 22, 3,
                          False, 4, 5])
    bad = struct.pack(">I", len(head) + 5 + len(BIG)) + bytes((0x90 | 15,)) + head[1:] \
        + b"\xc6" + struct.pack(">I", len(BIG)) + BIG
    # a payload that does not end the frame
    short = bytearray(raw)
    short[-len(BIG) - 4:-len(BIG)] = struct.pack(">I", len(BIG) - 1)
    for frame_, match in ((bad, "index"), (bytes(short), "past its end")):
        c = PeerCodec()
        c.receive_data(frame_[:100])
        assert c.next_event() is NEED_DATA and c.large_buffer() is not None
        c.receive_data(frame_[100:])
        with pytest.raises(PeerProtocolError, match=match):
            c.next_event()
        with pytest.raises(PeerProtocolError):  # a dead codec stays dead
            c.next_event()


def test_a_large_frame_buffer_is_reused_only_once_its_payload_is_gone():
    a = m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG, 1 << 22, 3, False, 4, 5)
    b = dataclasses.replace(a, data=bytes(reversed(BIG)))
    c = PeerCodec()
    held = feed_large(c, wire(1, a), 4096, True)[0][1]
    got = feed_large(c, wire(2, b), 4096, True)[0][1]
    assert held == a and got == b  # the held payload was not overwritten
    assert got.data.obj is not held.data.obj
    # (ids, not the objects: a reference to one would keep it busy)
    buffers = {id(got.data.obj), id(held.data.obj)}
    del held, got
    again = feed_large(c, wire(3, a), 4096, True)
    assert again == [(3, a)] and id(again[0][1].data.obj) in buffers  # free again: reused


def test_a_batch_of_large_frames_takes_buffers_from_the_pool_once_its_payloads_are_gone():
    """A replica holds every write of a batch until it answers them all: the next batch's
    frames reuse those buffers, none is allocated anew (a new bytearray is zeroed whole)."""
    a = m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG, 1 << 22, 3, False, 4, 5)
    c = PeerCodec()
    first = [feed_large(c, wire(i, a), 4096, True)[0][1] for i in range(4)]
    buffers = {id(w.data.obj) for w in first}
    assert len(buffers) == 4  # all held at once: four buffers
    del first
    again = [feed_large(c, wire(i, a), 4096, True)[0][1] for i in range(4)]
    assert all(w == a for w in again)
    assert {id(w.data.obj) for w in again} == buffers


def test_the_large_frame_pool_is_bounded_and_a_reused_buffer_fits_its_frame():
    small = m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG[:LARGE_FRAME], 1 << 22, 3, False, 4, 5)
    a = m.WriteChunk("v", "l", 1, 2, (1,), 0, BIG, 1 << 22, 3, False, 4, 5)
    c = PeerCodec()
    held = [feed_large(c, wire(i, a), 4096, True)[0][1] for i in range(POOL_BYTES // len(BIG) + 3)]
    assert sum(len(b) for b in c._pool) <= POOL_BYTES < sum(len(w.data.obj) for w in held)
    del held
    # a smaller frame in a larger pooled buffer, then a larger one again
    for msg in (small, a, small):
        got = feed_large(c, wire(7, msg), 4096, True)
        assert got == [(7, msg)] and len(got[0][1].data.obj) == len(wire(7, msg)) - 4
        del got


def test_the_large_frame_pool_stays_bounded_when_its_buffers_grow_for_larger_frames():
    """Buffers pooled for frames just over LARGE_FRAME, reused for far larger ones: the
    pool gives up what would take it past POOL_BYTES, not keep every buffer at its largest
    (up to POOL_BYTES // LARGE_FRAME frames of max_frame each, for as long as the
    connection lives)."""
    small = m.WriteChunk("v", "l", 1, 2, (1,), 0, bytes(LARGE_FRAME), 1 << 22, 3, False, 4, 5)
    big = m.WriteChunk("v", "l", 1, 2, (1,), 0, bytes(1 << 20), 1 << 22, 3, False, 4, 5)
    c = PeerCodec()
    held = [feed_large(c, wire(i, small), 4096, True)[0][1] for i in range(POOL_BYTES // LARGE_FRAME)]
    assert len(c._pool) > 32
    del held
    held = [feed_large(c, wire(i, big), 4096, True)[0][1] for i in range(32)]
    assert all(w == big for w in held)
    del held
    assert sum(len(b) for b in c._pool) <= POOL_BYTES


@pytest.mark.parametrize("direct", [False, True])
def test_a_large_frame_buffer_grows_with_what_came_not_with_its_declared_length(direct):
    """A frame of several LARGE_STEPs, fed in uneven pieces: its buffer never holds much
    more than came (twice what came, or LARGE_STEP), and it decodes as it does whole."""
    payload = bytes(range(251)) * ((5 * LARGE_STEP) // 251)
    w = m.WriteChunk("v", "l", 1, 2, (1,), 0, payload, 1 << 26, 3, False, 4, 5)
    raw = wire(9, w) + wire(10, m.Ping(2))
    c = PeerCodec()
    events, at, step = [], 0, 1
    while at < len(raw):
        target = c.large_buffer() if direct else None
        if target is not None:
            n = min(step, len(target), len(raw) - at)
            target[:n] = raw[at:at + n]
            target.release()
            c.large_received(n)
        else:
            n = min(step, len(raw) - at)
            c.receive_data(raw[at:at + n])
        at += n
        if c._large is not None:
            assert len(c._large) <= max(2 * c._filled, c._filled + LARGE_STEP), (at, len(c._large))
        events += drain(c)
        step = step * 3 + 7
    assert events == [(9, w), (10, m.Ping(2))] and c.buffered == 0


def test_a_stalled_large_frame_holds_one_step_whatever_it_declared():
    c = PeerCodec()
    c.receive_data(struct.pack(">I", 60 << 20) + b"\x9f\x01\x0c")
    assert c.next_event() is NEED_DATA
    assert len(c._large) == LARGE_STEP and len(c.large_buffer()) == LARGE_STEP - 3
    c.receive_data(b"")
    with pytest.raises(PeerProtocolError, match="inside a frame"):
        c.next_event()


@given(request_ids, messages)
def test_encode_gives_the_frame_prepare_gives(request_id, message):
    """encode() packs small messages in one go; call_all frames prepare()'s encoding per
    peer: both must put the same bytes on the wire."""
    frame = PeerCodec().encode(request_id, message)
    joined = frame if type(frame) is bytes else b"".join(frame)
    expected = prepared_frame(request_id, prepare(message))
    assert joined == (expected if type(expected) is bytes else b"".join(expected))


@given(st.integers(0, 2**64 - 1), st.integers(-2**63, 2**64 - 1), st.booleans())
def test_ok_replies_encode_to_the_frame_prepare_gives(request_id, version, stale):
    reply = m.Ok(version, stale)
    frame = PeerCodec().encode(request_id, reply)
    assert frame == prepared_frame(request_id, prepare(reply))
    codec = PeerCodec()
    codec.receive_data(frame)
    assert codec.next_event() == (request_id, reply)


@pytest.mark.parametrize("reply", [m.Ok("1"), m.Ok(1, 1), m.Ok(True), m.Ok(1.0)])
def test_ok_replies_the_protocol_cannot_carry_are_refused_at_the_sender(reply):
    with pytest.raises(TypeError):
        PeerCodec().encode(1, reply)


# Ok, every write's reply, has its own encoder and decoder (the fast path): they must agree
# with the general ones on every input, good or bad.
_ok_like = st.tuples(
    st.one_of(st.just(m.PROTO_VERSION), st.just(True), st.just(1.0), ints),
    st.one_of(st.just(15), st.just(15.0), st.integers(0, 40)),
    st.one_of(request_ids, st.just(-1), st.just(True), st.just("1")),
    st.one_of(ints, st.booleans(), st.none(), st.just(1.5), texts),
).map(lambda t: t + ()) | st.tuples(st.just(m.PROTO_VERSION), st.just(15), request_ids, ints,
                                    st.booleans())


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except (PeerProtocolError, TypeError, OverflowError) as exc:
        return (type(exc).__name__, str(exc), getattr(exc, "code", None))


def test_ok_is_type_15():
    assert {cls: tid for tid, cls in m.MESSAGE_TYPES.items()}[m.Ok] == 15


@settings(max_examples=500)
@given(_ok_like)
def test_the_fast_ok_decoder_agrees_with_the_general_one(obj):
    assert _outcome(PeerCodec()._decode, obj) == _outcome(PeerCodec()._decode_any, obj)


@settings(max_examples=300)
@given(st.one_of(request_ids, st.just(-1)),
       st.one_of(ints, st.booleans(), st.just(2**64), st.just(-(2**63) - 1)), st.booleans())
def test_the_fast_ok_encoder_writes_the_general_ones_bytes(request_id, version, stale):
    msg = m.Ok(version, stale)
    general = _outcome(lambda: prepared_frame(request_id, prepare(msg)))
    assert _outcome(PeerCodec().encode, request_id, msg)[:1 if general[0] != "ok" else 2] \
        == general[:1 if general[0] != "ok" else 2]


def test_a_message_that_fails_half_packed_leaves_nothing_for_the_next_frame():
    """The codec packs with one reused msgpack Packer: an int too large for msgpack fails
    after the fields before it were packed, and those bytes must not lead the next frame."""
    bad = m.WriteChunk("vol", "lin", 3, 1, (1,), 2**64, b"x" * 10, 4 << 20, 0, False, 1, 1)
    with pytest.raises(OverflowError):
        PeerCodec().encode(7, bad)
    with pytest.raises(OverflowError):
        prepare(bad)
    good = m.WriteChunk("vol", "lin", 3, 1, (1,), 4096, b"x" * 10, 4 << 20, 0, False, 1, 1)
    frame = PeerCodec().encode(7, good)
    spec, values = _wire_values(good)  # the fields in wire order, none packed yet
    body = msgpack.packb((m.PROTO_VERSION, spec.type_id, 7) + values)
    assert frame == len(body).to_bytes(4, "big") + body
    codec = PeerCodec()
    codec.receive_data(frame)
    assert codec.next_event() == (7, good)


@given(messages)
def test_a_messages_fast_maker_builds_what_its_constructor_builds(message):
    cls = type(message)
    values = [getattr(message, f.name) for f in dataclasses.fields(cls)]
    made = m.maker(cls)(*values)
    assert type(made) is cls and made == message and hash(made) == hash(message)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.__setattr__(dataclasses.fields(cls)[0].name, None)


def test_the_fast_maker_fills_defaults_like_the_constructor():
    args = ("vol", "lin", 3, 1, (1,), 4096, b"x", 4 << 20, 0, False, 1, 1)
    assert m.new_write_chunk(*args) == m.WriteChunk(*args)
    assert m.new_write_chunk(*args).rid == ""


# --- review of the peer protocol (rev-peer) --------------------------------------------------


def test_a_large_write_with_a_long_chain_decodes_as_it_does_whole():
    """A volume's chain gains a generation at every snapshot taken, deleted or not
    (vbp.volume, MAX_SNAPSHOTS counts live ones only): a volume snapshotted and pruned
    on a schedule passes 4096 generations. Its large writes must decode whichever way
    their frame arrives, as its small ones do."""
    chain = tuple(range(1, 4200))
    w = m.WriteChunk("v", "l", 1, chain[-1], chain, 0, BIG, 1 << 22, 3, False, 4, 5)
    raw = wire(9, w)
    whole = PeerCodec()
    whole.receive_data(raw)
    assert whole.next_event() == (9, w)  # all of it in one receive: the ordinary decoder
    c = PeerCodec()
    c.receive_data(raw[:100])  # the frame's start, then the rest: its own buffer
    assert c.next_event() is NEED_DATA and c.large_buffer() is not None
    c.receive_data(raw[100:])
    assert c.next_event() == (9, w)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_fast_check_takes_a_payload_of_any_buffer_type_only_when_sending(kind):
    """A WriteChunk's payload is a memoryview sending from the NBD buffer and decoded in
    place at the replica: the fast check (exact types) takes it as the field-by-field
    check does, and only when sending (received, a payload is bytes)."""
    spec = _SPECS[m.WriteChunk]
    msg = m.WriteChunk("v", "L", 1, 2, (1, 2), 0, kind(b"x" * 4096), 1 << 20, 0, False, 1, 1)
    values = spec.get(msg)
    assert tuple(map(type, values)) in spec.exact_sending
    assert spec.check(values, sending=True) is None
    refused = spec.check(values, sending=False)
    assert (refused is None) == (kind is bytes)
    for n in range(len(values)):  # (a payload type elsewhere is no exact match)
        if n != spec.wire_names.index("data"):
            wrong = values[:n] + (memoryview(b"x"),) + values[n + 1:]
            assert tuple(map(type, wrong)) not in spec.exact_sending
            assert spec.check(wrong, sending=True) is not None
