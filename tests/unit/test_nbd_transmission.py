"""Byte-level tests of the sans-io NBD transmission codec (proto.md, "Transmission")."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nbd_frontend import proto
from nbd_frontend.errors import ProtocolError
from nbd_frontend.handshake import NEED_DATA
from nbd_frontend.transmission import (BadRequest, Disconnect, Request, TransmissionCodec,
                                       transmission_flags)

SIZE = 1 << 20
R, W = proto.CMD_READ, proto.CMD_WRITE


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7,
        data: bytes | None = None, magic: int = proto.REQUEST_MAGIC) -> bytes:
    if cmd == W and data is None:
        data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + (data or b"")


def codec(**kw) -> TransmissionCodec:
    kw.setdefault("size", SIZE)
    return TransmissionCodec(**kw)


def events(c: TransmissionCodec, data: bytes, mode: str = "whole") -> list:
    """Feed data; return events with WRITE payloads copied (views die with the buffer)."""
    out: list = []
    chunks = [data] if mode == "whole" else [data[i:i + 1] for i in range(len(data))]
    for chunk in chunks:
        c.receive_data(chunk)
        while (ev := c.next_event()) is not NEED_DATA:
            if isinstance(ev, Request) and ev.data is not None:
                ev = Request(ev.cookie, ev.command, ev.flags, ev.offset, ev.length, bytes(ev.data))
            out.append(ev)
    return out


MODES = pytest.mark.parametrize("mode", ["whole", "bytewise"])


@MODES
def test_every_valid_command(mode):
    c = codec(structured=True, meta_contexts={1: proto.BASE_ALLOCATION})
    data = (req(R, 512, 4096, cookie=1) + req(W, 4096, 1000, proto.CMD_FLAG_FUA, cookie=2)
            + req(proto.CMD_FLUSH, cookie=3) + req(proto.CMD_TRIM, 0, 8192, cookie=4)
            + req(proto.CMD_CACHE, 0, SIZE, cookie=5)
            + req(proto.CMD_WRITE_ZEROES, 0, SIZE, proto.CMD_FLAG_NO_HOLE | proto.CMD_FLAG_FAST_ZERO, 6)
            + req(proto.CMD_BLOCK_STATUS, 0, SIZE, proto.CMD_FLAG_REQ_ONE, cookie=8)
            + req(R, 0, 100, proto.CMD_FLAG_DF | proto.CMD_FLAG_FUA, cookie=9))
    evs = events(c, data, mode)
    assert [(e.cookie, e.command) for e in evs] == [(1, R), (2, W), (3, 3), (4, 4), (5, 5),
                                                     (6, 6), (8, 7), (9, R)]
    assert all(type(e) is Request for e in evs)
    assert evs[1].data == req(W, 4096, 1000)[28:] and evs[1].flags == proto.CMD_FLAG_FUA
    assert evs[0].data is None and (evs[0].offset, evs[0].length) == (512, 4096)


def test_trailing_partial_request_waits_for_more():
    c = codec()
    full = req(W, 0, 300, cookie=1)
    evs = events(c, req(R, 0, 1, cookie=9) + full[:100])
    assert [e.cookie for e in evs] == [9]
    evs = events(c, full[100:] + req(R, 0, 1)[:27])
    assert evs[0].data == full[28:]
    assert c.next_event() is NEED_DATA


def test_recv_into_path_zero_copy():
    c = codec(buffer_size=8192)
    data = req(W, 10, 100, cookie=3) + req(R, 0, 10)
    buf = c.get_buffer()
    buf[:len(data)] = data
    c.commit(len(data))
    ev = c.next_event()
    assert ev.data.obj is c._buf  # a view into the preallocated buffer
    assert bytes(ev.data) == data[28:128]
    assert c.next_event().command == R


@MODES
def test_write_larger_than_buffer_gets_own_payload(mode):
    c = codec(buffer_size=8192)
    payload = bytes(range(256)) * 100  # 25600 > buffer
    evs = events(c, req(R, 0, 1, cookie=1) + req(W, 100, len(payload), data=payload, cookie=2)
                 + req(R, 0, 2, cookie=3), mode)
    assert [e.cookie for e in evs] == [1, 2, 3] and evs[1].data == payload
    assert len(c._buf) == 8192


def test_write_larger_than_buffer_via_recv_into():
    c = codec(buffer_size=8192)
    payload = b"\x5a" * 30000
    data = req(W, 0, len(payload), data=payload) + req(proto.CMD_FLUSH)
    pos, got = 0, []
    while pos < len(data):
        buf = c.get_buffer()
        n = min(len(buf), 5000, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        c.commit(n)
        pos += n
        while (ev := c.next_event()) is not NEED_DATA:
            got.append((ev.command, bytes(ev.data) if ev.data is not None else None))
    assert got == [(W, payload), (proto.CMD_FLUSH, None)]


def large_write(c: TransmissionCodec, fill: int, length: int = 30000) -> Request:
    c.receive_data(req(W, 0, length, data=bytes([fill]) * length))
    ev = c.next_event()
    assert type(ev) is Request and c.next_event() is NEED_DATA
    return ev


def test_large_write_payload_is_read_only_and_kept_while_referred_to():
    """A consumer may keep a large write's view (a replicated write does, until every
    replica answered): the codec receives the next writes elsewhere, and reuses the buffer
    only once nothing refers to it."""
    c = codec(buffer_size=8192)
    first = large_write(c, 1)
    assert first.data.readonly
    with pytest.raises(TypeError):
        first.data[0] = 9
    held = first.data[100:200]  # a slice of the view holds the buffer too
    second = large_write(c, 2)
    assert second.data.obj is not first.data.obj
    del first
    third = large_write(c, 3)  # `held` still refers to the first buffer
    assert third.data.obj is not held.obj and third.data.obj is not second.data.obj
    assert bytes(held) == b"\x01" * 100 and bytes(second.data) == b"\x02" * 30000
    buffer = id(held.obj)  # (not the object: a reference to it would keep it busy)
    del held
    fourth = large_write(c, 4)
    assert id(fourth.data.obj) == buffer  # free again: reused, no new allocation
    assert bytes(fourth.data) == b"\x04" * 30000 and bytes(third.data) == b"\x03" * 30000


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([1, 4096, 20_000, 70_000, 150_000]), min_size=1, max_size=8),
       st.integers(1, 100_000))
def test_after_a_large_write_only_the_next_head_goes_through_the_receive_buffer(sizes, step):
    """The next request after a large write is likely one too: get_buffer then offers at
    most HEAD_RECV, so at most that much of its payload is copied (the rest is received
    straight into its own buffer); then the whole buffer again. Whatever the mix, every
    payload arrives intact, in order."""
    from nbd_frontend.transmission import HEAD_RECV
    c = codec(buffer_size=65536)  # HEAD_RECV below it; writes above it are large
    payloads = [bytes([i]) * n for i, n in enumerate(sizes)]
    data = b"".join(req(W, 0, len(p), data=p, cookie=i) for i, p in enumerate(payloads))
    pos, got, last_large = 0, [], False
    while pos < len(data):
        buf = c.get_buffer()
        if last_large:  # the first receive after it
            assert len(buf) <= HEAD_RECV
            last_large = False
        n = min(len(buf), step, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        c.commit(n)
        pos += n
        while (ev := c.next_event()) is not NEED_DATA:
            got.append(bytes(ev.data))
            last_large = ev.data.readonly  # a large write: received into its own buffer
    assert got == payloads


def scatter(bufs, data: bytes, n: int) -> None:
    """What recvmsg_into does with `n` bytes of `data`: fill `bufs` in order."""
    for b in bufs:
        take = min(len(b), n)
        b[:take] = data[:take]
        data, n = data[take:], n - take


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 4096, 20_000, 70_000, 150_000]), min_size=1, max_size=8),
       st.integers(1, 200_000))
def test_a_large_writes_rest_and_the_requests_behind_it_in_one_receive(sizes, step):
    """As the server reads while a large write's payload is under way: one recvmsg_into
    into get_buffer() (the payload's rest) and head_after(). What lands past the payload
    is the next requests' (reads, small and large writes): every request comes out
    whole, in order, and the next large payload is received straight into its own."""
    from nbd_frontend.transmission import HEAD_RECV
    # (a step of a few bytes over a megabyte is a million receives: tens of seconds of
    # the suite for what a few thousand show as well)
    assume(sum(sizes) // step <= 4000)
    c = codec(buffer_size=65536)
    payloads = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    data = memoryview(b"".join(req(W, 0, len(p), data=p, cookie=i) if p else req(R, 0, 512, cookie=i)
                               for i, p in enumerate(payloads)))
    pos, got = 0, []
    while pos < len(data):
        bufs = [c.get_buffer()]
        head = c.head_after()
        if head is not None:
            assert len(head) == HEAD_RECV
            bufs.append(head)
        n = min(sum(map(len, bufs)), step, len(data) - pos)
        scatter(bufs, data[pos:], n)
        c.commit(n)
        pos += n
        while (ev := c.next_event()) is not NEED_DATA:
            got.append(bytes(ev.data) if ev.command == W else b"")
    assert got == payloads


def test_the_request_behind_a_large_payload_comes_from_the_same_receive():
    c = codec(buffer_size=8192)
    payload = random.randbytes(30000)
    data = req(W, 0, len(payload), data=payload, cookie=1) + req(R, 0, 512, cookie=2)
    c.receive_data(data[:5000])
    assert c.next_event() is NEED_DATA and c.head_after() is not None
    rest, head = c.get_buffer(), c.head_after()
    scatter([rest, head], data[5000:], len(data) - 5000)  # (all of it: one recvmsg_into)
    c.commit(len(data) - 5000)
    first, second = c.next_event(), c.next_event()
    assert (first.cookie, bytes(first.data)) == (1, payload)
    assert (second.cookie, second.command, second.length) == (2, R, 512)
    assert c.next_event() is NEED_DATA and c.head_after() is None


def test_small_write_payload_is_a_writable_view_of_the_receive_buffer():
    """Writable: the export must copy it to keep it (nbd_frontend.export)."""
    c = codec(buffer_size=8192)
    c.receive_data(req(W, 0, 100))
    ev = c.next_event()
    assert not ev.data.readonly and ev.data.obj is c._buf


def test_payload_pool_is_bounded():
    """Payloads held by consumers beyond the pool's bytes are allocated and not kept in
    the pool (but among the spares); buffers above SPARE_MAX are never pooled."""
    from nbd_frontend import transmission
    c = codec(size=1 << 30, buffer_size=8192)
    held = [large_write(c, i, 1 << 20) for i in range(transmission.POOL_BYTES // (1 << 20) + 4)]
    assert sum(map(len, c._pool)) <= transmission.POOL_BYTES
    assert len({id(ev.data.obj) for ev in held}) == len(held)
    del held
    big = large_write(c, 7, transmission.SPARE_MAX + 4096)
    assert all(buf is not big.data.obj for buf in c._pool)
    assert sum(map(len, c._pool)) <= transmission.POOL_BYTES


def test_payload_buffers_beyond_the_pool_are_used_again_once_released(monkeypatch):
    """More large writes in flight than the pool holds (QD32 of 1 MiB: 16 pooled): each
    of the others got a fresh anonymous mapping, used once, whose every page faulted as
    its payload arrived (4x the time per 1 MiB write, 6x per 4 MiB, of the bytearray it
    replaced, which the allocator gave back warm). Released, they are taken again."""
    import threading
    import weakref

    from nbd_frontend import transmission
    # the thread's spares as a new thread has them (other tests of this process left some)
    monkeypatch.setattr(transmission, "_here", threading.local())
    c = codec(size=1 << 30, buffer_size=8192)
    n = transmission.POOL_BYTES // (1 << 20) + 8
    held = [large_write(c, i, 1 << 20) for i in range(n)]
    refs = [weakref.ref(ev.data.obj) for ev in held]
    del held  # (answered)
    again = [large_write(c, i, 1 << 20) for i in range(n)]
    old = [r() for r in refs]
    assert all(any(ev.data.obj is o for o in old) for ev in again)
    assert len({id(ev.data.obj) for ev in again}) == n


@MODES
def test_bad_magic_is_protocol_error(mode):
    c = codec()
    with pytest.raises(ProtocolError):
        events(c, req(R, 0, 1) + req(R, 0, 1, magic=0x12345678), mode)
    assert c.closed


def test_extended_header_magic_is_protocol_error():
    with pytest.raises(ProtocolError):
        events(codec(), req(R, magic=proto.EXTENDED_REQUEST_MAGIC))


def test_disconnect_ends_parsing():
    c = codec()
    evs = events(c, req(R, 0, 1) + req(proto.CMD_DISC) + req(R, 0, 1) + b"garbage" * 10)
    assert isinstance(evs[0], Request) and evs[1] == Disconnect() and len(evs) == 2


def bad(c, data):
    evs = events(c, data)
    return [(e.cookie, e.errno) if isinstance(e, BadRequest) else (e.cookie, 0) for e in evs]


@pytest.mark.parametrize("data,errno", [
    (req(9), proto.EINVAL),  # unknown command
    (req(proto.CMD_RESIZE), proto.EINVAL),
    (req(0xFFFF, 0, 10), proto.EINVAL),
    (req(R, 0, 1, proto.CMD_FLAG_NO_HOLE), proto.EINVAL),  # flag not for READ
    (req(R, 0, 1, proto.CMD_FLAG_DF), proto.EINVAL),  # DF without structured replies
    (req(R, 0, 1, 1 << 15), proto.EINVAL),  # unknown flag
    (req(proto.CMD_FLUSH, 0, 1), proto.EINVAL),
    (req(proto.CMD_FLUSH, 0, 0, proto.CMD_FLAG_REQ_ONE), proto.EINVAL),
    (req(proto.CMD_TRIM, 0, 1, proto.CMD_FLAG_FAST_ZERO), proto.EINVAL),
    (req(proto.CMD_BLOCK_STATUS, 0, 1), proto.EINVAL),  # no meta context negotiated
    (req(R, SIZE, 1), proto.EINVAL),  # out of range
    (req(R, 2**64 - 1, 2), proto.EINVAL),
    (req(proto.CMD_TRIM, SIZE - 1, 2), proto.EINVAL),
    (req(proto.CMD_CACHE, SIZE + 1, 0), proto.EINVAL),
    (req(W, SIZE - 10, 11), proto.ENOSPC),
    (req(proto.CMD_WRITE_ZEROES, SIZE, 4096), proto.ENOSPC),
    (req(R, 0, proto.MAX_PAYLOAD + 1), proto.EINVAL),  # oversized read, simple replies
])
def test_refused_requests(data, errno):
    c = codec()
    assert bad(c, data + req(R, 0, 1, cookie=99)) == [(7, errno), (99, 0)]


def test_oversized_payloadless_commands_are_allowed():
    c = codec(size=1 << 40)
    evs = events(c, req(proto.CMD_TRIM, 0, 2**32 - 1) + req(proto.CMD_WRITE_ZEROES, 0, 2**32 - 1)
                 + req(proto.CMD_CACHE, 0, 2**32 - 1))
    assert [type(e) for e in evs] == [Request] * 3


def test_oversized_structured_read_is_eoverflow():
    c = codec(structured=True)
    assert bad(c, req(R, 0, proto.MAX_PAYLOAD + 1)) == [(7, proto.EOVERFLOW)]


def test_read_only_refuses_writes_and_skips_payload():
    c = codec(read_only=True)
    data = (req(W, 0, 5000, cookie=1) + req(proto.CMD_TRIM, 0, 10, cookie=2)
            + req(proto.CMD_WRITE_ZEROES, 0, 10, cookie=3) + req(R, 0, 10, cookie=4)
            + req(proto.CMD_FLUSH, cookie=5))
    assert bad(c, data) == [(1, proto.EPERM), (2, proto.EPERM), (3, proto.EPERM), (4, 0), (5, 0)]


def test_refused_write_payload_is_skipped_bytewise():
    c = codec(read_only=True)
    data = req(W, 0, 300, cookie=1) + req(R, 0, 10, cookie=2)
    assert [getattr(e, "errno", 0) for e in events(c, data, "bytewise")] == [proto.EPERM, 0]


def test_oversized_write_is_discarded_without_allocation():
    c = codec(max_payload=64 * 1024, buffer_size=16 * 1024)
    length = 8 * 1024 * 1024
    c.receive_data(req(W, 0, length, data=b""))
    ev = c.next_event()
    assert isinstance(ev, BadRequest) and ev.errno == proto.EINVAL
    chunk = b"\x11" * 65536
    for _ in range(length // len(chunk)):
        c.receive_data(chunk)
        assert c.next_event() is NEED_DATA
        assert c._large is None and len(c._buf) == 16 * 1024 and len(c._backlog) == 0
    c.receive_data(req(R, 0, 1, cookie=5))
    assert c.next_event().cookie == 5


def test_out_of_range_write_of_large_payload_is_skipped():
    c = codec(buffer_size=8192)
    assert bad(c, req(W, SIZE - 100, 20000, cookie=1) + req(R, 0, 1, cookie=2)) == [
        (1, proto.ENOSPC), (2, 0)]


def test_min_block_alignment():
    c = codec(min_block=512)
    assert bad(c, req(R, 1, 512, cookie=1) + req(R, 0, 100, cookie=2) + req(R, 512, 512, cookie=3)
               + req(W, 3, 512, cookie=4)) == [(1, proto.EINVAL), (2, proto.EINVAL), (3, 0),
                                               (4, proto.EINVAL)]


def test_zero_length_requests_are_not_refused_except_block_status():
    c = codec(structured=True, meta_contexts={1: proto.BASE_ALLOCATION})
    assert bad(c, req(R, 0, 0, cookie=1) + req(W, SIZE, 0, cookie=2)
               + req(proto.CMD_BLOCK_STATUS, 0, 0, cookie=3)) == [(1, 0), (2, 0),
                                                                   (3, proto.EINVAL)]


def test_transmission_flags():
    rw = transmission_flags(read_only=False, multi_conn=True)
    for f in (proto.FLAG_HAS_FLAGS, proto.FLAG_SEND_FLUSH, proto.FLAG_SEND_FUA,
              proto.FLAG_SEND_TRIM, proto.FLAG_SEND_WRITE_ZEROES, proto.FLAG_CAN_MULTI_CONN,
              proto.FLAG_SEND_CACHE, proto.FLAG_SEND_FAST_ZERO):
        assert rw & f
    assert not rw & proto.FLAG_READ_ONLY and not rw & proto.FLAG_SEND_DF
    ro = transmission_flags(read_only=True, multi_conn=False)
    assert ro & proto.FLAG_READ_ONLY and not ro & proto.FLAG_CAN_MULTI_CONN
    assert not ro & (proto.FLAG_SEND_TRIM | proto.FLAG_SEND_WRITE_ZEROES)


# --- replies --------------------------------------------------------------------------------

def join(parts) -> bytes:
    return b"".join(bytes(p) for p in parts)


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        magic, flags, rtype, cookie, length = struct.unpack_from(">IHHQI", data, pos)
        assert magic == proto.STRUCTURED_REPLY_MAGIC
        out.append((flags, rtype, cookie, data[pos + 20:pos + 20 + length]))
        pos += 20 + length
    assert pos == len(data)
    return out


def test_simple_replies():
    c = codec()
    assert join(c.reply_ok(5)) == struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 5)
    assert join(c.reply_error(5, R, proto.ENOSPC, "full")) == struct.pack(
        ">IIQ", proto.SIMPLE_REPLY_MAGIC, proto.ENOSPC, 5)
    assert join(c.reply_error(5, R, 4242)) == struct.pack(">IIQ", proto.SIMPLE_REPLY_MAGIC, 5, 5)
    assert join(c.reply_read(5, 0, 3, b"abc")) == struct.pack(
        ">IIQ", proto.SIMPLE_REPLY_MAGIC, 0, 5) + b"abc"
    flat = join(c.reply_read(5, 10, 6, [(10, 2, b"ab"), (12, 3, None), (15, 1, b"z")]))
    assert flat[16:] == b"ab\0\0\0z"
    assert struct.unpack_from(">I", join(c.reply_read(5, 0, 4, b"abc")), 4)[0] == proto.EIO


def test_structured_replies():
    c = codec(structured=True)
    assert chunks(join(c.reply_read(1, 100, 3, b"xyz"))) == [
        (proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_OFFSET_DATA, 1, struct.pack(">Q", 100) + b"xyz")]
    assert chunks(join(c.reply_read(1, 0, 0, b""))) == [
        (proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_NONE, 1, b"")]
    err = chunks(join(c.reply_error(2, W, proto.EPERM, "read-only")))
    assert err == [(proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_ERROR, 2,
                    struct.pack(">IH", proto.EPERM, 9) + b"read-only")]
    assert join(c.reply_ok(3, proto.CMD_FLUSH))[:4] == struct.pack(">I", proto.SIMPLE_REPLY_MAGIC)


def test_structured_read_with_holes():
    c = codec(structured=True)
    got = chunks(join(c.reply_read(4, 0, 10, [(0, 4, b"abcd"), (4, 0, None), (4, 6, None)])))
    assert got == [(0, proto.REPLY_TYPE_OFFSET_DATA, 4, struct.pack(">Q", 0) + b"abcd"),
                   (proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_OFFSET_HOLE, 4,
                    struct.pack(">QI", 4, 6))]
    df = chunks(join(c.reply_read(4, 0, 10, [(0, 4, b"abcd"), (4, 6, None)], proto.CMD_FLAG_DF)))
    assert df == [(proto.REPLY_FLAG_DONE, proto.REPLY_TYPE_OFFSET_DATA, 4,
                   struct.pack(">Q", 0) + b"abcd" + bytes(6))]


@pytest.mark.parametrize("extents", [
    [(0, 4, b"abcd")],  # short
    [(0, 4, b"abc"), (4, 6, None)],  # data of wrong length
    [(1, 10, None)],  # wrong start
])
def test_read_extents_that_do_not_cover_the_request_are_eio(extents):
    c = codec(structured=True)
    (flags, rtype, _, payload), = chunks(join(c.reply_read(4, 0, 10, extents)))
    assert rtype == proto.REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == proto.EIO


def test_block_status_is_clipped_to_the_request():
    c = codec(structured=True, meta_contexts={1: proto.BASE_ALLOCATION})
    ext = [(4096, 0), (8192, 3), (SIZE, 0)]
    (flags, rtype, cookie, payload), = chunks(join(c.reply_block_status(6, 0, 10000, ext)))
    assert flags == proto.REPLY_FLAG_DONE and rtype == proto.REPLY_TYPE_BLOCK_STATUS
    assert struct.unpack(">IIIII", payload) == (1, 4096, 0, 10000 - 4096, 3)
    (_, _, _, one), = chunks(join(c.reply_block_status(6, 0, 100, ext, proto.CMD_FLAG_REQ_ONE)))
    assert struct.unpack(">III", one) == (1, 100, 0)
    (_, _, _, end), = chunks(join(c.reply_block_status(6, SIZE - 10, 10, [(SIZE, 3)])))
    assert struct.unpack(">III", end) == (1, 10, 3)
    (_, rtype, _, _), = chunks(join(c.reply_block_status(6, 0, 10, [])))
    assert rtype == proto.REPLY_TYPE_ERROR


# --- fuzz -----------------------------------------------------------------------------------

REQ = st.builds(lambda cmd, flags, off, n: req(cmd, off, n, flags, data=bytes(n) if cmd == W else None),
                st.integers(0, 9), st.integers(0, 0xFFFF), st.integers(0, SIZE + 10),
                st.integers(0, 3000))
PIECE = st.one_of(REQ, st.binary(max_size=40), st.just(req(proto.CMD_DISC)),
                  st.builds(lambda n: req(W, 0, n, data=b""), st.integers(0, 2**32 - 1)))


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECE, max_size=10), st.integers(1, 4000), st.booleans())
def test_fuzz_yields_events_or_protocol_error(pieces, step, structured):
    c = TransmissionCodec(size=SIZE, structured=structured, buffer_size=8192, max_payload=4096,
                          meta_contexts={1: proto.BASE_ALLOCATION} if structured else None)
    data = b"".join(pieces)
    try:
        for i in range(0, len(data), step):
            c.receive_data(data[i:i + step])
            while (ev := c.next_event()) is not NEED_DATA:
                assert type(ev) in (Request, BadRequest, Disconnect)
                if type(ev) is Request and ev.command == W:
                    assert len(ev.data) == ev.length <= 4096
                assert c._large is None or len(c._large) <= 4096
                assert len(c._backlog) <= step
    except ProtocolError:
        assert c.closed


@pytest.mark.parametrize("min_block", [1, 512])
@pytest.mark.parametrize("structured", [False, True])
def test_the_plain_read_shortcut_refuses_what_the_full_check_refuses(structured, min_block):
    """_parse skips _check for a flagless read in range (the common request): every read
    near the limits gets the verdict _check gives it."""
    c = codec(structured=structured, min_block=min_block)
    cases = [(off, n, flags)
             for off in (0, 1, 512, SIZE - 512, SIZE - 1, SIZE, 2**64 - 1)
             for n in (0, 1, 512, proto.MAX_PAYLOAD, proto.MAX_PAYLOAD + 1)
             for flags in (0, proto.CMD_FLAG_FUA, proto.CMD_FLAG_DF, 1 << 15)]
    data = b"".join(req(R, off, n, cookie=i, flags=flags)
                    for i, (off, n, flags) in enumerate(cases))
    want = [(i, c._check(R, flags, off, n)) for i, (off, n, flags) in enumerate(cases)]
    assert bad(c, data) == want
    assert any(e for _, e in want) and any(not e for _, e in want)


# --- take_reads: the plain reads at the front, in one call ---------------------------------


def test_take_reads_takes_the_plain_reads_at_the_front_and_leaves_the_rest():
    c = codec(max_payload=8192)
    reads = [req(R, i * 4096, 4096, cookie=i) for i in range(5)]
    rest = [req(W, 0, 512, cookie=50), req(R, 0, 10, cookie=51)]
    c.receive_data(b"".join(reads + rest))
    assert c.take_reads(100, 1 << 30) == [(i, i * 4096, 4096) for i in range(5)]
    assert c.take_reads(100, 1 << 30) == []  # a write first: next_event's
    ev = c.next_event()
    assert (type(ev), ev.command, ev.cookie) == (Request, W, 50)
    assert c.take_reads(100, 1 << 30) == [(51, 0, 10)]
    assert c.take_reads(100, 1 << 30) == [] and c.next_event() is NEED_DATA


def test_take_reads_stops_at_what_needs_a_check_and_at_its_limits():
    c = codec(max_payload=8192)
    for stop in (req(R, 0, 10, flags=proto.CMD_FLAG_DF), req(R, SIZE - 1, 2),
                 req(R, 0, 8193), req(proto.CMD_FLUSH), req(R, 0, 10, magic=0x1234)):
        c = codec(max_payload=8192)
        c.receive_data(req(R, 0, 10, cookie=1) + stop + req(R, 0, 10, cookie=3))
        assert c.take_reads(100, 1 << 30) == [(1, 0, 10)]
        assert c.take_reads(100, 1 << 30) == []
    c = codec(max_payload=8192)
    c.receive_data(b"".join(req(R, 0, 100, cookie=i) for i in range(10)))
    assert [r[0] for r in c.take_reads(3, 1 << 30)] == [0, 1, 2]  # `count`
    assert [r[0] for r in c.take_reads(100, 150)] == [3, 4]  # the one reaching `nbytes` too
    assert [r[0] for r in c.take_reads(100, 0)] == [5]
    c.receive_data(req(R, 0, 100, cookie=10)[:20])  # an incomplete one stays
    assert [r[0] for r in c.take_reads(100, 1 << 30)] == [6, 7, 8, 9]
    assert c.take_reads(100, 1 << 30) == []
    c.receive_data(req(R, 0, 100, cookie=10)[20:])
    assert c.take_reads(100, 1 << 30) == [(10, 0, 100)]


def test_take_reads_takes_nothing_while_next_event_has_work_of_its_own():
    c = codec(min_block=512)  # reads then need _check's alignment verdict
    c.receive_data(req(R, 0, 512))
    assert c.take_reads(100, 1 << 30) == []
    c = codec(read_only=True, max_payload=4096)  # a refused write's payload being skipped
    c.receive_data(req(W, 0, 100, data=req(R, 0, 10) * 3 + bytes(16)) + req(R, 0, 10, cookie=9))
    assert type(c.next_event()) is BadRequest
    assert c.take_reads(100, 1 << 30) == []
    assert c.next_event().cookie == 9
    c = codec(buffer_size=8192, max_payload=1 << 20)  # a large write still coming in
    c.receive_data(req(W, 0, 100_000, data=(req(R, 0, 10) * 300)[:5000]))
    assert c.next_event() is NEED_DATA and c.take_reads(100, 1 << 30) == []
    c = codec()
    c.receive_data(req(proto.CMD_DISC) + req(R, 0, 10))
    assert type(c.next_event()) is Disconnect and c.take_reads(100, 1 << 30) == []


PLAIN_READ = st.builds(lambda off, n, cookie: req(R, off, n, cookie=cookie),
                       st.integers(0, SIZE), st.integers(0, 5000), st.integers(0, 2**64 - 1))
PLAIN_WRITE = st.builds(lambda off, data, fua, cookie: req(W, off, len(data), fua, cookie, data),
                        st.integers(0, SIZE), st.binary(max_size=5000),
                        st.sampled_from([0, proto.CMD_FLAG_FUA]), st.integers(0, 2**64 - 1))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(PIECE, PLAIN_READ, PLAIN_WRITE), max_size=20),
       st.integers(1, 4000), st.lists(st.tuples(st.integers(1, 40), st.integers(0, 20_000)),
                                      min_size=1, max_size=8),
       st.sampled_from([{}, {"read_only": True}, {"min_block": 512}]))
def test_taking_runs_then_next_event_sees_what_next_event_alone_sees(pieces, step, limits, kw):
    """Any byte stream, any limits: taking reads and writes whenever asked changes
    nothing but how the plain ones come out."""
    def run(take: bool) -> list:
        c = TransmissionCodec(size=SIZE, buffer_size=8192, max_payload=4096, **kw)
        data, out, turn = b"".join(pieces), [], 0
        try:
            for i in range(0, len(data), step):
                c.receive_data(data[i:i + step])
                while True:
                    if take:
                        count, nbytes = limits[turn % len(limits)]
                        turn += 1
                        got = c.take_reads(count, nbytes)
                        assert len(got) <= count
                        assert sum(n for _, _, n in got[:-1]) < max(nbytes, 1) or not got
                        out += [("R", cookie, 0, off, n, None) for cookie, off, n in got]
                        wrote = c.take_writes(count)
                        assert len(wrote) <= count
                        out += [("W", cookie, flags, off, n, bytes(d))
                                for cookie, flags, off, n, d in wrote]
                        if got or wrote:
                            continue
                    ev = c.next_event()
                    if ev is NEED_DATA:
                        break
                    if type(ev) is Request and ev.command in (R, W):
                        out.append(("R" if ev.command == R else "W", ev.cookie, ev.flags,
                                    ev.offset, ev.length, None if ev.data is None else bytes(ev.data)))
                    else:
                        out.append((type(ev).__name__, getattr(ev, "cookie", None),
                                    getattr(ev, "command", None), getattr(ev, "errno", None)))
        except ProtocolError:
            out.append("protocol error")
        return out

    assert run(True) == run(False)


def test_take_writes_takes_the_plain_writes_whole_at_the_front_and_leaves_the_rest():
    c = codec(max_payload=3000, buffer_size=8192)
    fua = proto.CMD_FLAG_FUA
    writes = [req(W, 0, 100, cookie=1, data=b"a" * 100), req(W, 200, 50, fua, 2, b"b" * 50)]
    for stop in (req(R, 0, 10), req(W, 0, 10, magic=0x1234, data=bytes(10)),
                 req(W, 0, 10, proto.CMD_FLAG_DF, data=bytes(10)),  # a flag not for writes
                 req(W, 0, 3001, data=bytes(3001)),  # over max_payload
                 req(W, SIZE - 5, 10, data=bytes(10))):  # past the end
        c = codec(max_payload=3000, buffer_size=8192)
        c.receive_data(b"".join(writes) + stop + req(W, 0, 1, cookie=3, data=b"z"))
        got = c.take_writes(100)
        assert [(ck, f, off, n, bytes(d)) for ck, f, off, n, d in got] == [
            (1, 0, 0, 100, b"a" * 100), (2, fua, 200, 50, b"b" * 50)]
        assert c.take_writes(100) == []
    c = codec(max_payload=1 << 20, buffer_size=8192)
    c.receive_data(req(W, 0, 10, cookie=1, data=bytes(10)) + req(W, 0, 9000, cookie=2)[:5000])
    assert [w[0] for w in c.take_writes(100)] == [1]
    assert c.take_writes(100) == []  # larger than the buffer: a payload buffer of its own
    c = codec(buffer_size=8192)
    c.receive_data(b"".join(req(W, i, 10, cookie=i, data=bytes(10)) for i in range(5)))
    assert [w[0] for w in c.take_writes(2)] == [0, 1]  # `count`
    c.receive_data(req(W, 0, 100, cookie=9, data=bytes(100))[:60])  # one still coming in
    assert [w[0] for w in c.take_writes(100)] == [2, 3, 4]
    assert c.take_writes(100) == []
    c.receive_data(bytes(68))
    assert [w[0] for w in c.take_writes(100)] == [9]


def test_take_writes_takes_nothing_where_next_event_has_work_of_its_own():
    inner = req(W, 0, 10, cookie=2, data=bytes(10))  # what a skipped payload may look like
    c = codec()
    c.receive_data(req(W, 0, len(inner), proto.CMD_FLAG_DF, cookie=1, data=inner))
    assert type(c.next_event()) is BadRequest  # refused: its payload is skipped
    assert c.take_writes(100) == []
    assert c.next_event() is NEED_DATA
    for kw in ({"read_only": True}, {"min_block": 512}):
        c = codec(**kw)  # _check would refuse, or ask for alignment
        c.receive_data(req(W, 0, 512, data=bytes(512)))
        assert c.take_writes(100) == []
    c = codec()
    c.receive_data(req(proto.CMD_DISC) + req(W, 0, 1, data=b"x"))
    assert type(c.next_event()) is Disconnect and c.take_writes(100) == []


def test_write_offsets_lists_the_writes_received_without_taking_them():
    c = codec()
    c.receive_data(req(W, 4096, 4, data=b"abcd") + req(proto.CMD_READ, 0, 512)
                   + req(W, 1 << 20, 4, data=b"ef"))  # its payload still coming
    assert c.write_offsets() == [4096, 1 << 20]
    assert c.write_offsets() == [4096, 1 << 20]  # nothing consumed
    ev = c.next_event()
    assert isinstance(ev, Request) and ev.offset == 4096 and bytes(ev.data) == b"abcd"
    assert c.write_offsets() == [1 << 20]
    c.receive_data(b"gh" + b"\xff" * 28)  # bad magic next: the scan stops there
    assert c.write_offsets() == [1 << 20]
    assert codec(read_only=True).write_offsets() == []
