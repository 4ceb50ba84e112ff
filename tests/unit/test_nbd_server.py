"""The trio NBD server over real loopback sockets, driven by a small raw client."""

from __future__ import annotations

import errno
import functools
import logging
import random
import socket
import struct
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd_frontend import proto, server
from nbd_frontend.export import MemoryExport, MemoryProvider
from nbd_frontend.server import serve_nbd
from nbd_frontend.tls import check_tls
from vbp.later import Later
from tests.pieces import send_in_pieces
from vbp.errors import LeaseHeld, NoSpace, PeerUnavailable, RegistryUnavailable

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


class Client:
    """Just enough NBD client to poke at the server byte by byte."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.structured = False
        self.size = 0
        self.flags = 0

    @classmethod
    async def connect(cls, port: int, name: str = "disk", *, structured: bool = False,
                      meta: bool = False, rcvbuf: int = 0, source: str | None = None) -> "Client":
        if rcvbuf:  # (small: what the client does not read stays with the server soon)
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            await sock.connect(("127.0.0.1", port))
            c = cls(trio.SocketStream(sock))
        else:
            c = cls(await trio.open_tcp_stream("127.0.0.1", port, local_address=source))
        greeting = await c.recv(18)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        await c.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
        if structured:
            assert (await c.option(proto.OPT_STRUCTURED_REPLY))[-1][0] == proto.REP_ACK
            c.structured = True
        if meta:
            raw, q = name.encode(), proto.BASE_ALLOCATION.encode()
            data = struct.pack(">I", len(raw)) + raw + struct.pack(">II", 1, len(q)) + q
            reps = await c.option(proto.OPT_SET_META_CONTEXT, data)
            assert [r[0] for r in reps] == [proto.REP_META_CONTEXT, proto.REP_ACK]
        raw = name.encode()
        reps = await c.option(proto.OPT_GO, struct.pack(">I", len(raw)) + raw + b"\0\0")
        if reps[-1][0] != proto.REP_ACK:
            raise LookupError(reps[-1][0])
        for rtype, data in reps:
            if rtype == proto.REP_INFO and data[:2] == b"\0\0":
                c.size, c.flags = struct.unpack(">QH", data[2:])
        return c

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError(f"wanted {n}, have {len(self.buf)}")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        await self.send(struct.pack(">QII", proto.IHAVEOPT, option, len(data)) + data)
        out = []
        while True:
            magic, opt, rtype, length = struct.unpack(">QIII", await self.recv(20))
            assert magic == proto.REPLY_MAGIC and opt == option
            out.append((rtype, await self.recv(length)))
            if rtype != proto.REP_INFO and rtype != proto.REP_META_CONTEXT \
                    and rtype != proto.REP_SERVER:
                return out

    async def request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"",
                      flags: int = 0, cookie: int = 1) -> None:
        await self.send(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                    length) + data)

    async def reply(self, read_length: dict[int, int] | None = None):
        """One whole reply: (cookie, error, payload). Structured chunks are reassembled:
        payload is read data (holes as zeros) or the block status payloads joined."""
        magic = struct.unpack(">I", await self.recv(4))[0]
        if magic == proto.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.recv(12))
            n = (read_length or {}).get(cookie, 0) if error == 0 else 0
            return cookie, error, await self.recv(n)
        assert magic == proto.STRUCTURED_REPLY_MAGIC, hex(magic)
        parts, error = [], 0
        while True:
            flags, rtype, cookie, length = struct.unpack(">HHQI", await self.recv(16))
            payload = await self.recv(length)
            if rtype == proto.REPLY_TYPE_OFFSET_DATA:
                parts.append((struct.unpack_from(">Q", payload)[0], payload[8:]))
            elif rtype == proto.REPLY_TYPE_OFFSET_HOLE:
                off, n = struct.unpack(">QI", payload)
                parts.append((off, ("hole", n)))
            elif rtype == proto.REPLY_TYPE_ERROR:
                error = struct.unpack_from(">I", payload)[0]
            elif rtype == proto.REPLY_TYPE_BLOCK_STATUS:
                parts.append((0, payload))
            if flags & proto.REPLY_FLAG_DONE:
                return cookie, error, parts
            if magic := struct.unpack(">I", await self.recv(4))[0]:
                assert magic == proto.STRUCTURED_REPLY_MAGIC

    async def read(self, offset: int, length: int, cookie: int = 1) -> bytes:
        await self.request(proto.CMD_READ, offset, length, cookie=cookie)
        got_cookie, error, payload = await self.reply({cookie: length})
        assert (got_cookie, error) == (cookie, 0)
        if not self.structured:
            return payload
        out = bytearray(length)
        for off, part in payload:
            if isinstance(part, tuple):
                continue
            out[off - offset:off - offset + len(part)] = part
        return bytes(out)

    async def write(self, offset: int, data: bytes, cookie: int = 1) -> int:
        await self.request(proto.CMD_WRITE, offset, len(data), data, cookie=cookie)
        got_cookie, error, _ = await self.reply()
        assert got_cookie == cookie
        return error

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@pytest.fixture
def provider():
    p = MemoryProvider()
    p.add("disk", 4 * MiB, description="test disk")
    p.add("ro", MiB, read_only=True)
    return p


@pytest.fixture
async def port(provider, nursery):
    return await nursery.start(serve_nbd, provider, "127.0.0.1", 0)


async def test_write_read_roundtrip_simple(port, provider):
    c = await Client.connect(port)
    assert c.size == 4 * MiB and c.flags & proto.FLAG_CAN_MULTI_CONN
    assert not c.flags & proto.FLAG_SEND_DF
    payload = random.randbytes(70000)
    assert await c.write(12345, payload) == 0
    assert await c.read(12345, len(payload)) == payload
    assert bytes(provider.exports["disk"].data[12345:12345 + 70000]) == payload
    await c.request(proto.CMD_FLUSH, cookie=9)
    assert await c.reply() == (9, 0, b"")
    assert provider.exports["disk"].flushes == 1
    await c.request(proto.CMD_DISC)
    with pytest.raises(EOFError):
        await c.recv(1)


async def test_structured_read_holes_and_block_status(port):
    c = await Client.connect(port, structured=True, meta=True)
    assert c.flags & proto.FLAG_SEND_DF
    await c.write(8192, b"\x77" * 4096)
    await c.request(proto.CMD_READ, 0, 16384, cookie=3)
    cookie, error, parts = await c.reply()
    assert (cookie, error) == (3, 0)
    assert parts == [(0, ("hole", 8192)), (8192, b"\x77" * 4096), (12288, ("hole", 4096))]
    await c.request(proto.CMD_BLOCK_STATUS, 0, 3 * MiB, cookie=4)
    cookie, error, [(_, payload)] = await c.reply()
    ctx, *ext = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)
    assert ext == [8192, 3, 4096, 0, 3 * MiB - 12288, 3]
    await c.request(proto.CMD_READ, 0, 16384, flags=proto.CMD_FLAG_DF, cookie=5)
    cookie, error, parts = await c.reply()
    assert len(parts) == 1 and parts[0][1] == bytes(8192) + b"\x77" * 4096 + bytes(4096)


async def test_trim_write_zeroes_cache(port, provider):
    c = await Client.connect(port, structured=True)
    disk = provider.exports["disk"]
    await c.write(0, b"\x01" * 65536)
    for cmd, flags in [(proto.CMD_TRIM, 0), (proto.CMD_WRITE_ZEROES, proto.CMD_FLAG_NO_HOLE),
                       (proto.CMD_CACHE, 0), (proto.CMD_WRITE_ZEROES, proto.CMD_FLAG_FAST_ZERO)]:
        await c.request(cmd, 0, 8192, flags=flags, cookie=cmd)
        assert await c.reply() == (cmd, 0, b"")
    assert await c.read(0, 8192) == bytes(8192)
    assert disk.allocated[0:2] == b"\0\0" and disk.allocated[2] == 1
    disk.fast_zero = False
    await c.request(proto.CMD_WRITE_ZEROES, 8192, 4096, flags=proto.CMD_FLAG_FAST_ZERO, cookie=8)
    assert (await c.reply())[1] == proto.ENOTSUP
    assert await c.read(8192, 4096) == b"\x01" * 4096


def counting_dispatches(monkeypatch) -> list[int]:
    """[n]: the requests the server's connections dispatch from now on, counted."""
    taken = [0]
    single, reads = server._Connection.dispatch, server._Connection.dispatch_reads

    def dispatch(self, req):
        taken[0] += 1
        return single(self, req)

    def dispatch_reads(self, batch):
        taken[0] += len(batch)
        return reads(self, batch)

    monkeypatch.setattr(server._Connection, "dispatch", dispatch)
    monkeypatch.setattr(server._Connection, "dispatch_reads", dispatch_reads)
    return taken


async def test_a_client_pipelining_small_reads_lets_the_others_run(port, monkeypatch):
    """9,000 one-byte READs sent at once, answered at once: the reader took every one
    received before it let another task run, eight receives of up to 256 KiB apiece,
    and every other client of the host waited (a review measured 0.5-0.9 s stalls).
    It now yields after YIELD_REQUESTS; counted here by the requests it dispatched
    between two turns of another task."""
    taken = counting_dispatches(monkeypatch)
    c = await Client.connect(port)
    n = 30000
    between = []
    done = trio.Event()

    async def other_task():
        last = taken[0]
        while not done.is_set():
            between.append(taken[0] - last)
            last = taken[0]
            await trio.lowlevel.checkpoint()

    lengths = {i: 1 for i in range(n)}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await c.send(b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ,
                                          i, i, 1) for i in range(n)))
        for _ in range(n):
            cookie, error, data = await c.reply(lengths)
            assert error == 0 and data == bytes(1)
        done.set()
    assert taken[0] == n
    print("MAXBETWEEN", max(between))
    assert max(between) <= 2 * (server.YIELD_REQUESTS + server.MAX_IN_FLIGHT), max(between)
    await c.aclose()


async def test_bad_magic_disconnects_only_that_client(port):
    good = await Client.connect(port)
    bad = await Client.connect(port)
    await bad.send(b"\xde\xad\xbe\xef" + bytes(24))
    with pytest.raises(EOFError):
        await bad.recv(1)
    assert await good.write(0, b"still fine") == 0


@pytest.mark.parametrize("structured", [False, True])
async def test_refused_requests_keep_connection(port, structured):
    c = await Client.connect(port, structured=structured)
    cases = [
        (dict(cmd=42), proto.EINVAL),
        (dict(cmd=proto.CMD_READ, offset=4 * MiB, length=1), proto.EINVAL),
        (dict(cmd=proto.CMD_TRIM, offset=4 * MiB - 1, length=2), proto.EINVAL),
        (dict(cmd=proto.CMD_WRITE_ZEROES, offset=4 * MiB, length=1), proto.ENOSPC),
        (dict(cmd=proto.CMD_READ, length=proto.MAX_PAYLOAD + 1),
         proto.EOVERFLOW if structured else proto.EINVAL),
        (dict(cmd=proto.CMD_READ, length=1, flags=proto.CMD_FLAG_REQ_ONE), proto.EINVAL),
        (dict(cmd=proto.CMD_BLOCK_STATUS, length=1), proto.EINVAL),
        (dict(cmd=proto.CMD_WRITE, offset=4 * MiB - 2, length=4, data=b"abcd"), proto.ENOSPC),
    ]
    for i, (kw, errno) in enumerate(cases):
        await c.request(cookie=i, **kw)
        assert (await c.reply())[:2] == (i, errno), kw
    assert await c.write(0, b"ok") == 0


async def test_oversized_write_is_refused_and_skipped(port):
    c = await Client.connect(port)
    length = proto.MAX_PAYLOAD + 4096
    await c.request(proto.CMD_WRITE, 0, length, cookie=5)
    assert (await c.reply())[:2] == (5, proto.EINVAL)
    chunk = b"\xee" * MiB
    for _ in range(length // MiB):
        await c.send(chunk)
    await c.send(chunk[:4096])
    assert await c.read(0, 16) == bytes(16)


async def test_read_only_export(port):
    c = await Client.connect(port, "ro")
    assert c.flags & proto.FLAG_READ_ONLY
    assert await c.write(0, b"x") == proto.EPERM
    await c.request(proto.CMD_TRIM, 0, 10, cookie=2)
    assert (await c.reply())[1] == proto.EPERM
    assert await c.read(0, 4) == bytes(4)


async def test_unknown_export(port):
    with pytest.raises(LookupError) as info:
        await Client.connect(port, "missing")
    assert info.value.args[0] == proto.REP_ERR_UNKNOWN
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1) + struct.pack(">QII", proto.IHAVEOPT,
                                                       proto.OPT_EXPORT_NAME, 7) + b"missing")
    with pytest.raises(EOFError):
        await c.recv(1)


async def test_list_and_truncated_frames(port):
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    reps = await c.option(proto.OPT_LIST)
    assert [r[0] for r in reps] == [proto.REP_SERVER] * 2 + [proto.REP_ACK]
    await c.send(struct.pack(">QI", proto.IHAVEOPT, proto.OPT_GO))  # half an option
    await c.aclose()
    t = await Client.connect(port)
    await t.request(proto.CMD_WRITE, 0, 100, b"half")  # half a write, then gone
    await t.aclose()
    good = await Client.connect(port)
    assert await good.read(0, 4) == bytes(4)


async def test_garbage_connections_do_not_disturb_a_good_client(port, provider):
    rng = random.Random(4)
    good = await Client.connect(port, structured=True)
    expected = bytearray(4 * MiB)

    async def garbage(i: int) -> None:
        try:
            s = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return
        try:
            with trio.move_on_after(5):
                kind = i % 4
                if kind == 0:
                    await s.send_all(rng.randbytes(rng.randrange(1, 3000)))
                elif kind == 1:
                    await s.send_all(struct.pack(">IQII", 1, proto.IHAVEOPT, 999, 2**32 - 1))
                    await s.send_all(rng.randbytes(5000))
                elif kind == 2:
                    await s.send_all(struct.pack(">IQII", 1, proto.IHAVEOPT, proto.OPT_EXPORT_NAME,
                                                 4) + b"disk" + rng.randbytes(500))
                else:
                    await s.send_all(struct.pack(">IQII", 1, proto.IHAVEOPT, proto.OPT_EXPORT_NAME,
                                                 4) + b"disk" + struct.pack(
                        ">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 1, 0, 2**32 - 1))
                await s.receive_some(100)
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(s)

    limiter = trio.CapacityLimiter(200)

    async def limited(i: int) -> None:
        async with limiter:
            await garbage(i)

    async with trio.open_nursery() as nursery:
        for i in range(2000):
            nursery.start_soon(limited, i)
        for i in range(200):
            off = rng.randrange(0, 4 * MiB - 8192)
            data = rng.randbytes(rng.randrange(1, 8192))
            assert await good.write(off, data, cookie=i) == 0
            expected[off:off + len(data)] = data
            await trio.sleep(0)
    assert await good.read(0, 4 * MiB) == bytes(expected)
    assert provider.exports["disk"].data == expected


async def test_many_requests_in_flight(port):
    c = await Client.connect(port)
    n = 600
    blocks = {i: random.randbytes(512) for i in range(n)}
    batch = b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i, i * 512,
                                 512) + blocks[i] for i in range(n))
    batch += b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, n + i,
                                  i * 512, 512) for i in range(n))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(c.send, batch)
        replies = [await c.reply({n + i: 512 for i in range(n)}) for _ in range(2 * n)]
    assert sorted(r[0] for r in replies) == list(range(2 * n))
    assert all(r[1] == 0 for r in replies)
    assert {r[0] - n: r[2] for r in replies if r[0] >= n} == blocks


class SlowExport(MemoryExport):
    """Reads and writes return awaitables that finish when the test says so."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gates: dict[int, trio.Event] = {}
        self.active = 0
        self.max_active = 0
        self.auto = False

    def read(self, offset, length):
        result = super().read(offset, length)

        async def later():
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                if not self.auto:
                    await self.gates.setdefault(offset, trio.Event()).wait()
                else:
                    await trio.sleep(0.001)
                return result
            finally:
                self.active -= 1
        return later()

    async def write(self, offset, data, fua):  # an async def: the server must copy data
        await trio.sleep(random.random() / 100)
        super().write(offset, data, fua)

    def flush(self):
        async def fail():
            raise NoSpace("disk full")
        return fail()

    def trim(self, offset, length, fua):
        raise RuntimeError("boom")


@pytest.fixture
def slow(provider):
    export = SlowExport("slow", MiB)
    MemoryExport.write(export, 0, bytes(range(256)) * (MiB // 256), False)
    provider.exports["slow"] = export
    return export


async def test_out_of_order_replies(port, slow):
    c = await Client.connect(port, "slow", structured=True)
    n = 20
    for i in range(n):
        await c.request(proto.CMD_READ, i * 100, 100, cookie=i)
    with trio.fail_after(10):  # every read under way at once (on a loaded machine: later)
        while slow.active < n:
            await trio.sleep(0.01)
    assert slow.active == n
    order = []
    for i in reversed(range(n)):
        slow.gates.setdefault(i * 100, trio.Event()).set()
        cookie, error, [(off, data)] = await c.reply()
        order.append(cookie)
        assert error == 0 and off == cookie * 100
        assert data == bytes(slow.data[off:off + 100])
    assert order == list(reversed(range(n)))


async def test_async_writes_are_copied_and_errors_mapped(port, slow):
    c = await Client.connect(port, "slow")
    blocks = [random.randbytes(1000) for _ in range(64)]
    await c.send(b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i,
                                      i * 1000, 1000) + b for i, b in enumerate(blocks)))
    got = sorted([await c.reply() for _ in blocks])
    assert got == [(i, 0, b"") for i in range(64)]
    assert bytes(slow.data[:64000]) == b"".join(blocks)
    await c.request(proto.CMD_FLUSH, cookie=100)
    assert await c.reply() == (100, proto.ENOSPC, b"")
    await c.request(proto.CMD_TRIM, 0, 10, cookie=101)
    assert await c.reply() == (101, proto.EIO, b"")
    assert await c.write(0, b"after") == 0


async def test_in_flight_is_bounded(port, slow, monkeypatch):
    monkeypatch.setattr(server, "MAX_IN_FLIGHT", 16)
    slow.auto = True
    c = await Client.connect(port, "slow")
    n = 200
    await c.send(b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, i, i, 10)
                          for i in range(n)))
    replies = [await c.reply({i: 10 for i in range(n)}) for _ in range(n)]
    assert sorted(r[0] for r in replies) == list(range(n))
    assert 1 < slow.max_active <= 16


class GatedWrites(MemoryExport):
    """Writes answered only once `gate` is set; how many waited at once."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = trio.Event()
        self.active = self.max_active = 0

    def write(self, offset, data, fua):
        data = bytes(data)

        async def later():
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await self.gate.wait()
                MemoryExport.write(self, offset, data, fua)
            finally:
                self.active -= 1
        return later()


async def test_bytes_in_flight_are_bounded(port, provider, monkeypatch):
    """Large writes held unanswered stop the reader at MAX_IN_FLIGHT_BYTES of them, long
    before MAX_IN_FLIGHT requests: a client cannot make the server hold a payload of
    up to the largest block size per request slot. Once answered, the rest follow."""
    monkeypatch.setattr(server, "MAX_IN_FLIGHT_BYTES", 4 * MiB)
    export = provider.exports["gated"] = GatedWrites("gated", 32 * MiB)
    c = await Client.connect(port, "gated")
    blocks = [bytes([i]) * MiB for i in range(16)]

    async def send_all() -> None:
        for i, b in enumerate(blocks):
            await c.send(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i,
                                     i * MiB, MiB) + b)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        with trio.fail_after(10):
            while export.active < 4:
                await trio.sleep(0.01)
        await trio.sleep(0.2)  # the client has sent more: the server takes none of it
        assert export.max_active == 4
        export.gate.set()
        with trio.fail_after(10):
            got = sorted([await c.reply() for _ in blocks])
    assert got == [(i, 0, b"") for i in range(16)]
    assert bytes(export.data[:16 * MiB]) == b"".join(blocks)


async def test_disc_finishes_in_flight_requests(port, slow):
    c = await Client.connect(port, "slow", structured=True)
    for i in range(5):
        await c.request(proto.CMD_READ, i * 10, 10, cookie=i)
    await c.request(proto.CMD_DISC)
    await trio.sleep(0.05)
    for i in range(5):
        slow.gates.setdefault(i * 10, trio.Event()).set()
    cookies = sorted([(await c.reply())[0] for _ in range(5)])
    assert cookies == list(range(5))
    with pytest.raises(EOFError):
        await c.recv(1)


async def test_async_provider(nursery):
    class AsyncProvider:
        def __init__(self):
            self.inner = MemoryProvider()
            self.inner.add("a", 8192)

        async def list_exports(self):
            await trio.sleep(0)
            return self.inner.list_exports()

        async def open_export(self, name):
            await trio.sleep(0)
            return self.inner.open_export(name)

    p = await nursery.start(serve_nbd, AsyncProvider(), "127.0.0.1", 0)
    c = await Client.connect(p, "a")
    assert c.size == 8192 and await c.write(0, b"hi") == 0
    with pytest.raises(LookupError):
        await Client.connect(p, "b")


async def _use_m(c) -> None:
    """Enter transmission on export "m" (4096 bytes), write, read back, disconnect."""
    await c.send(struct.pack(">QII", proto.IHAVEOPT, proto.OPT_EXPORT_NAME, 1) + b"m")
    size, flags = struct.unpack(">QH", await c.recv(10))
    assert size == 4096
    assert await c.write(0, b"abc") == 0
    assert await c.read(0, 3) == b"abc"
    await c.request(proto.CMD_DISC)


async def test_memory_stream_transport():
    """handle_connection also runs over streams without a socket (trio.testing)."""
    provider = MemoryProvider()
    provider.add("m", 4096)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_connection, server_stream, provider)
        c = Client(client_stream)
        await c.recv(18)
        await c.send(struct.pack(">I", 3))
        await _use_m(c)
    assert bytes(provider.exports["m"].data[:3]) == b"abc"


async def test_tls_over_a_stream_without_a_socket():
    """STARTTLS where there is no socket under the stream (trio.testing): the server falls
    back to trio.SSLStream, and the connection is served through it."""
    server_ctx = _tls_contexts()[0]
    provider = MemoryProvider()
    provider.add("m", 4096)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(server.handle_connection, server_stream, provider,
                                             tls="require", tls_context=server_ctx))
        await _use_m(Client(await _starttls(client_stream)))
    assert bytes(provider.exports["m"].data[:3]) == b"abc"


@pytest.mark.parametrize("socketless", [False, True], ids=["socket", "stream"])
async def test_disc_over_tls_shuts_the_tls_session_down(provider, nursery, socketless):
    """proto.md, NBD_CMD_DISC: the server answers what is outstanding, "shut[s] down the
    TLS session (if one is running), and close[s] the TCP session". The client then reads
    TLS's close_notify, not a TCP close it must take for a truncation attack (the
    standard library raises, libnbd reports the session "non-properly terminated")."""
    server_ctx = _tls_contexts()[0]
    provider.add("m", 4096)
    if socketless:
        stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(functools.partial(server.handle_connection, server_stream,
                                             provider, tls="require", tls_context=server_ctx))
    else:
        port = await nursery.start(functools.partial(serve_nbd, tls="require",
                                                     tls_context=server_ctx),
                                   provider, "127.0.0.1", 0)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = await _starttls(stream)
    await _use_m(Client(tls))
    with trio.fail_after(5):
        assert await tls.receive_some(100) == b""  # close_notify: the clean end
    assert bytes(provider.exports["m"].data[:3]) == b"abc"


def test_tls_settings_that_do_not_go_together_are_refused():
    import ssl

    optional = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    checked = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    checked.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(ValueError, match="off, on, require"):
        check_tls("yes", optional)
    with pytest.raises(ValueError, match="needs a TLS context"):
        check_tls("require", None)
    with pytest.raises(ValueError, match="only when TLS is required"):
        check_tls("on", checked)
    check_tls("require", checked)
    check_tls("on", optional)
    check_tls("off", None)


async def test_idle_handshake_times_out(port, monkeypatch):
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.2)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    with trio.fail_after(5):
        with pytest.raises(EOFError):
            await c.recv(1)


async def test_idle_handshakes_log_a_few_lines_a_period_per_address(port, monkeypatch,
                                                                   caplog):
    """A thousand connections that never negotiate, from one address, each timed out: a
    line each filled the log (a review); now a few a period (vbp.loglimit), at INFO."""
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.2)
    idle = []
    for _ in range(20):
        c = Client(await trio.open_tcp_stream("127.0.0.1", port))
        await c.recv(18)
        idle.append(c)
    with trio.fail_after(5):
        for c in idle:
            with pytest.raises(EOFError):
                await c.recv(1)
    lines = [r for r in caplog.records if "handshake not done" in r.getMessage()]
    assert 1 <= len(lines) <= 5, [r.getMessage() for r in lines]
    assert all(r.levelno == logging.INFO and "within 0.2 s" in r.getMessage() and
               "127.0.0.1" in r.getMessage() for r in lines)


async def test_export_is_closed_when_the_connection_ends(nursery):
    class Provider(MemoryProvider):
        opened = closed = 0

        def open_export(self, name):
            if name == "busy":
                raise LeaseHeld("served elsewhere")
            export = super().open_export(name)
            Provider.opened += 1
            original = export.close

            def close():
                Provider.closed += 1
                original()
            export.close = close
            return export

    p = Provider()
    p.add("x", 8192)
    port = await nursery.start(serve_nbd, p, "127.0.0.1", 0)
    with pytest.raises(LookupError) as info:
        await Client.connect(port, "busy")
    assert info.value.args[0] == proto.REP_ERR_PLATFORM
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    reps = await c.option(proto.OPT_INFO, struct.pack(">I", 1) + b"x" + b"\0\0")
    assert reps[-1][0] == proto.REP_ACK and (Provider.opened, Provider.closed) == (1, 1)
    await c.aclose()
    c = await Client.connect(port, "x")
    assert (Provider.opened, Provider.closed) == (2, 1)
    await c.aclose()
    with trio.fail_after(5):
        while Provider.closed < 2:
            await trio.sleep(0.01)


async def test_protocol_error_is_logged_plainly(port, caplog):
    # earlier tests may have changed the root level (blockd's logs.setup) or quieted "vbp"
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    c = await Client.connect(port)
    await c.send(b"\x00" * 28)
    with pytest.raises(EOFError):
        await c.recv(1)
    await trio.sleep(0.05)
    records = [r for r in caplog.records if r.name == "vbp.nbd" and r.levelname != "DEBUG"]
    assert any("protocol error" in r.getMessage() for r in records)
    assert not any(r.exc_info for r in records)
    # anyone who reaches the port can make connections that fail as fast as it likes: a
    # few lines a period per address tell of them (vbp.loglimit), not one each
    from vbp.loglimit import BURST
    for _ in range(3 * BURST):
        c = await Client.connect(port)
        await c.send(b"\x00" * 28)
        with pytest.raises(EOFError):
            await c.recv(1)
    await trio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(lines) == BURST, lines
    assert lines[0].endswith("(client 127.0.0.1)"), lines[0]


class DroppableExport(MemoryExport):
    """An export that can end its connections (what a fenced volume gateway does)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.dropped = trio.Event()
        self.closed = 0

    def close(self):
        self.closed += 1


async def test_export_can_drop_its_clients_and_closed_clients_end_cleanly():
    exp = DroppableExport("d", 1 * MiB)
    prov = MemoryProvider({"d": exp})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_nbd, prov, "127.0.0.1", 0)
        # a client that closes: the connection ends although `dropped` is never set
        c = await Client.connect(port, "d")
        await c.stream.aclose()
        with trio.fail_after(5):
            while exp.closed < 1:
                await trio.sleep(0.01)
        # a client whose export drops it: the server closes the socket
        c = await Client.connect(port, "d")
        exp.dropped.set()
        with trio.fail_after(5):
            assert await c.stream.receive_some(100) == b""
            while exp.closed < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


async def test_every_request_runs_with_its_own_request_id(provider, nursery):
    """With a RequestIds, the export sees the request's id in the synchronous call and in
    the task an awaitable request runs in (vbp.reqid). A request answered in the dispatch
    has it without a context change: named in reqid.dispatching, which another thread
    (trio's workers log too) does not see, and nothing is left named afterwards."""
    import threading

    from vbp import reqid

    seen = []

    class Traced(MemoryExport):
        def write(self, offset, data, fua):
            seen.append(("write", reqid.get()))
            return super().write(offset, data, fua)

        def read(self, offset, length):
            other = []
            t = threading.Thread(target=lambda: other.append(reqid.get()))
            t.start()
            t.join()
            seen.append(("read", reqid.get(), reqid.current.get(), other[0]))
            return super().read(offset, length)

        def flush(self):
            async def later():
                await trio.sleep(0)
                seen.append(("flush", reqid.get()))
            return later()

    provider.exports["traced"] = Traced("traced", MiB)
    p = await nursery.start(functools.partial(
        serve_nbd, provider, "127.0.0.1", 0, ids=reqid.RequestIds("h9", boot=0xAB)))
    c = await Client.connect(p, "traced")
    assert await c.write(0, b"one") == 0
    assert await c.write(10, b"two", cookie=2) == 0
    assert await c.read(0, 3, cookie=3) == b"one"
    await c.request(proto.CMD_FLUSH, cookie=4)
    assert await c.reply() == (4, 0, b"")
    assert seen == [("write", "h9-0000ab-1"), ("write", "h9-0000ab-2"),
                    ("read", "h9-0000ab-3", "", ""), ("flush", "h9-0000ab-4")]
    assert reqid.current.get() == ""  # nothing leaks into the caller
    assert reqid.dispatching is None and reqid.get() == ""


@pytest.mark.parametrize("structured", [False, True])
async def test_a_read_answered_with_too_few_bytes_is_an_error_not_short_data(
        provider, nursery, structured):
    """The server's inline path for a read answered with bytes takes only bytes of the
    asked length: fewer is EIO, and the connection goes on."""
    class Short(MemoryExport):
        def read(self, offset, length):
            data = super().read(offset, length)
            return data[:-1] if offset == 4096 else data

    provider.exports["short"] = Short("short", MiB)
    p = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
    c = await Client.connect(p, "short", structured=structured)
    assert await c.write(0, b"x" * 8192) == 0
    await c.request(proto.CMD_READ, 4096, 4096, cookie=5)
    cookie, error, _ = await c.reply({5: 4096})
    assert (cookie, error) == (5, proto.EIO)
    assert await c.read(0, 4096, cookie=6) == b"x" * 4096


async def test_requests_answered_in_one_batch_are_observed_together(provider, nursery):
    """The observe hook gets every request: those answered in a batch's dispatch once per
    batch and command, with their count and bytes; one answered later (an awaitable) on
    its own."""
    calls = []

    class Observed(MemoryExport):
        def observe(self, command, nbytes, seconds, ok, count=1):
            calls.append((command, nbytes, seconds, ok, count))

        def flush(self):
            async def later():
                await trio.sleep(0.01)
            return later()

    provider.exports["obs"] = Observed("obs", MiB)
    p = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
    c = await Client.connect(p, "obs")
    frames = [struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, i, i * 4096, 4096)
              for i in range(20)]
    frames += [struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 100 + i, 0, 512)
               + bytes(512) for i in range(3)]
    await c.send(b"".join(frames))  # one send: the server finds several requests at once
    for _ in range(23):
        await c.reply({i: 4096 for i in range(20)})
    await c.request(proto.CMD_FLUSH, cookie=200)
    assert await c.reply() == (200, 0, b"")
    with trio.fail_after(5):
        while not any(cmd == proto.CMD_FLUSH for cmd, *_ in calls):
            await trio.sleep(0.01)
    by_cmd = {}
    for cmd, nbytes, seconds, ok, count in calls:
        assert ok and 0 <= seconds < 5
        n, b = by_cmd.get(cmd, (0, 0))
        by_cmd[cmd] = (n + count, b + nbytes)
    assert by_cmd == {proto.CMD_READ: (20, 20 * 4096), proto.CMD_WRITE: (3, 3 * 512),
                      proto.CMD_FLUSH: (1, 0)}
    reads = [call for call in calls if call[0] == proto.CMD_READ]
    assert len(reads) < 20  # batched, not one call per read
    flush = [call for call in calls if call[0] == proto.CMD_FLUSH]
    assert flush[0][2] >= 0.01 and flush[0][4] == 1  # from its receipt to its answer


async def test_large_write_trickled_in_then_small_requests_are_served_at_once(port, provider):
    """A large write's payload arriving in slow pieces is written whole, a small read
    behind it is answered at once, and a client that hangs up inside a large payload is
    dropped without disturbing the next one."""
    c = await Client.connect(port)
    payload = random.randbytes(MiB + 4096)
    frame = struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 7, 8192,
                        len(payload)) + payload
    step = len(frame) // 8 + 1
    for i in range(0, len(frame), step):
        await c.send(frame[i:i + step])
        await trio.sleep(0.1 if i == 3 * step else 0.02)  # once a longer pause
    with trio.fail_after(5):
        assert await c.reply() == (7, 0, b"")
        for cookie in range(8, 11):
            assert await c.read(8192 + cookie, 100, cookie=cookie) == payload[cookie:cookie + 100]
    assert bytes(provider.exports["disk"].data[8192:8192 + len(payload)]) == payload
    await c.send(frame[: len(frame) // 2])
    await c.stream.send_eof()
    with trio.fail_after(5), pytest.raises(EOFError):
        await c.recv(1)
    c2 = await Client.connect(port)
    with trio.fail_after(5):
        assert await c2.read(8192, 4096) == payload[:4096]


class SlowWrites(MemoryExport):
    """Writes that take 5 ms each (blocking, as a local copy's pwrite): the bytes of the
    requests behind one are all in the socket by the time it is done. Each batch's
    answers are observed as they leave (observe_sent): with their count."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.observed: list[tuple[int, int]] = []

    def write(self, offset, data, fua):
        time.sleep(0.005)
        return super().write(offset, data, fua)

    def observe(self, command, nbytes, seconds, ok, count=1):
        self.observed.append((command, count))


async def test_answers_of_pipelined_large_writes_leave_two_at_a_time(provider, nursery):
    """A large write's answer waits for the next batch when the next large write's payload
    is arriving (the client is sending: deferrable): the two answers leave in one send,
    observed together, never more than two. A real client (libnbd, in a thread: it sends
    while the server writes) with 8 writes in flight gets every answer, and every write
    lands."""
    import nbd
    p = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
    paired = []
    for _ in range(5):  # (whether a payload is still arriving when an answer is ready
        # depends on the machine's load: on a busy one every payload may be in whole
        # first, and nothing is deferred; a pair in one of five runs shows the deferral,
        # and no run may hold more than two)
        export = provider.exports["slow"] = SlowWrites("slow", 16 * MiB)
        payloads = [random.randbytes(MiB) for _ in range(8)]

        def client() -> None:
            h = nbd.NBD()
            h.set_export_name("slow")
            h.connect_tcp("127.0.0.1", str(p))
            for i, d in enumerate(payloads):
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), i * MiB)
            while h.aio_in_flight():
                h.poll(-1)
            h.shutdown()

        with trio.fail_after(20):
            await trio.to_thread.run_sync(client)
        assert bytes(export.data[:8 * MiB]) == b"".join(payloads)
        writes = [count for cmd, count in export.observed if cmd == proto.CMD_WRITE]
        assert sum(writes) == 8 and max(writes) <= 2, writes
        paired.append(max(writes) == 2)
        if paired[-1]:
            break
    assert any(paired), "no answer was deferred to leave with the next in five runs"


async def test_a_held_answer_leaves_when_the_client_sends_no_more(provider, nursery):
    """A client that sends a large write and part of the next, then waits for the first
    answer before it sends the rest (a client may), gets it: an answer held for the
    next batch goes as soon as a receive finds nothing more."""
    export = provider.exports["slow"] = SlowWrites("slow", 4 * MiB)
    p = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
    c = await Client.connect(p, "slow")
    first, second = random.randbytes(MiB), random.randbytes(MiB)
    await c.request(proto.CMD_WRITE, 0, MiB, first, cookie=1)
    await c.request(proto.CMD_WRITE, MiB, MiB, second[:300_000], cookie=2)
    with trio.fail_after(5):
        assert await c.reply() == (1, 0, b"")
    await c.send(second[300_000:])
    with trio.fail_after(5):
        assert await c.reply() == (2, 0, b"")
    assert bytes(export.data[:2 * MiB]) == first + second


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from([1, 4096, 70_000, 300_000, MiB]), min_size=1, max_size=5),
       cuts=st.lists(st.integers(1, 400_000), min_size=1, max_size=30),
       seed=st.integers(0, 2**32 - 1))
async def test_writes_in_any_pieces_arrive_whole(sizes, cuts, seed):
    """Small and large writes (a large payload received straight into a buffer of its
    own) sent as one stream cut anywhere, the sender pausing between pieces, then a
    read: every write is answered and lands intact, and the connection keeps serving."""
    rng = random.Random(seed)
    provider = MemoryProvider()
    provider.add("disk", 4 * MiB)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
        c = await Client.connect(port)
        writes, wire, at = [], b"", 0
        for i, n in enumerate(sizes):
            data = rng.randbytes(n)
            off = at % (3 * MiB)
            writes.append((off, data))
            at += n
            wire += struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i + 1, off, n) + data
        await send_in_pieces(c.send, wire, cuts)
        with trio.fail_after(5):
            done = sorted([(await c.reply())[:2] for _ in writes])
        assert done == [(i + 1, 0) for i in range(len(writes))]
        expect = bytearray(4 * MiB)
        for off, data in writes:  # applied in the order sent
            expect[off:off + len(data)] = data
        assert bytes(provider.exports["disk"].data) == bytes(expect)
        with trio.fail_after(5):
            off, data = writes[-1]
            assert await c.read(off, min(len(data), 4096), cookie=99) == data[:4096]
        await c.aclose()
        nursery.cancel_scope.cancel()


class LaterExport(MemoryExport):
    """Writes answer a vbp.later.Later that the test completes, fails or defers."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[int, Later] = {}

    def write(self, offset, data, fua):
        super().write(offset, data, fua)
        later = self.pending[offset] = Later()
        return later


@pytest.fixture
def later_export(provider):
    export = LaterExport("later", MiB)
    provider.exports["later"] = export
    return export


async def test_later_answers_complete_from_callbacks_out_of_order(port, later_export):
    c = await Client.connect(port, "later", structured=True)
    for i in range(4):
        await c.request(proto.CMD_WRITE, i * 512, 512, b"\x05" * 512, cookie=i)
    with trio.fail_after(5):
        while len(later_export.pending) < 4:
            await trio.sleep(0.01)
    assert len(later_export.pending) == 4
    later_export.pending[3 * 512].done()
    assert await c.reply() == (3, 0, b"")
    later_export.pending[0].fail(NoSpace("full"))
    assert (await c.reply())[:2] == (0, proto.ENOSPC)

    async def rest(error):
        await trio.sleep(0.01)
        if error:
            raise error

    later_export.pending[512].defer(rest(None))  # the rest runs in a task of the connection
    assert await c.reply() == (1, 0, b"")
    later_export.pending[1024].defer(rest(LeaseHeld("taken")))
    assert (await c.reply())[1] != 0
    assert await c.read(0, 512) == b"\x05" * 512  # the connection lives on


async def test_later_pending_when_the_connection_dies_is_refused_cleanly(port, later_export):
    c = await Client.connect(port, "later")
    await c.request(proto.CMD_WRITE, 0, 512, b"\x01" * 512, cookie=1)
    with trio.fail_after(5):
        while not later_export.pending:
            await trio.sleep(0.01)
    await c.send(b"\0" * 28)  # bad magic: a hard disconnect, the connection's tasks end
    with pytest.raises(EOFError):
        await c.recv(1)
    await trio.sleep(0.05)

    async def rest():
        raise AssertionError("never runs: nothing is left to answer")

    assert later_export.pending[0].defer(rest()) is False  # closed, not leaked
    c2 = await Client.connect(port, "later")
    await c2.request(proto.CMD_WRITE, 512, 512, b"\x02" * 512, cookie=2)
    with trio.fail_after(5):
        while 512 not in later_export.pending:
            await trio.sleep(0.01)
    later_export.pending[512].done()
    assert await c2.reply() == (2, 0, b"")


async def test_a_later_answer_after_disc_is_sent_and_the_connection_then_ends(port, later_export):
    c = await Client.connect(port, "later")
    await c.request(proto.CMD_WRITE, 0, 512, b"\x03" * 512, cookie=7)
    await c.request(proto.CMD_DISC)
    with trio.fail_after(5):
        while not later_export.pending:
            await trio.sleep(0.01)
    await trio.sleep(0.05)  # the reader has seen DISC: the connection is closing
    later_export.pending[0].done()  # the last answer outstanding
    with trio.fail_after(5):
        assert await c.reply() == (7, 0, b"")
        with pytest.raises(EOFError):  # and the server closes once it is sent
            await c.recv(1)


class Observed(MemoryExport):
    """A MemoryExport keeping what the server's metrics hook tells it: (command, ok,
    count, nbytes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.observed = []

    def observe(self, command, nbytes, seconds, ok, count=1):
        self.observed.append((command, ok, count, nbytes))


async def serve_with_ids(provider, nursery, export, boot: int) -> Client:
    """A client of `export`, served with request ids h9-<boot>-N."""
    from vbp import reqid

    provider.exports[export.name] = export
    p = await nursery.start(functools.partial(
        serve_nbd, provider, "127.0.0.1", 0, ids=reqid.RequestIds("h9", boot=boot)))
    return await Client.connect(p, export.name)


def count_taken(monkeypatch, name: str) -> list:
    """The requests _Connection.<name> (dispatch_reads, dispatch_writes) is given."""
    taken = []
    real = getattr(server._Connection, name)

    def counting(self, batch):
        taken.extend(batch)
        return real(self, batch)

    monkeypatch.setattr(server._Connection, name, counting)
    return taken


async def test_a_long_run_of_reads_is_answered_like_reads_one_by_one(provider, nursery,
                                                                      monkeypatch):
    """Past TAKE_RUN reads in a row the reader takes the reads at the front of its
    buffer in one call (TransmissionCodec.take_reads, _Connection.dispatch_reads). Each
    still gets its own request id, its answer (bytes, an error raised, too few bytes, an
    awaitable) and its count in the metrics; a refused read and a write in the middle of
    the run are answered in their turn."""
    from vbp import reqid

    ids = []

    class Mixed(Observed):
        def read(self, offset, length):
            ids.append((offset // 4096, reqid.get()))
            if offset == 30 * 4096:
                raise OSError(5, "a bad sector")
            if offset == 31 * 4096:
                return super().read(offset, length)[:-1]
            if offset == 32 * 4096:
                async def later():
                    await trio.sleep(0.01)
                    return super(Mixed, self).read(offset, length)
                return later()
            return super().read(offset, length)  # bytes: every page was written

    taken = count_taken(monkeypatch, "dispatch_reads")
    export = Mixed("mixed", MiB)
    c = await serve_with_ids(provider, nursery, export, boot=1)
    pages = {i: bytes([i]) * 4096 for i in range(40)}
    assert await c.write(0, b"".join(pages.values()), cookie=999) == 0
    ids.clear()
    order = ([*range(12), 30, *range(12, 16), 31, *range(16, 20), 32, *range(20, 30),
              "too far", *range(33, 36), "write", *range(36, 40)])
    frames = []
    for i in order:
        if i == "too far":
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, 500, MiB, 4096))
        elif i == "write":
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 501,
                                      39 * 4096, 4096) + b"w" * 4096)
        else:
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, i,
                                      i * 4096, 4096))
    assert server.TAKE_RUN < 12
    await c.send(b"".join(frames))
    got = {}
    for _ in order:
        cookie, error, data = await c.reply({i: 4096 for i in range(40)})
        got[cookie] = (error, data)
    assert got.pop(500) == (proto.EINVAL, b"")
    assert got.pop(501) == (0, b"")
    assert got.pop(30)[0] == got.pop(31)[0] == proto.EIO
    assert got == {i: (0, b"w" * 4096 if i == 39 else pages[i])
                   for i in range(40) if i not in (30, 31)}
    reads = [i for i in order if type(i) is int]
    assert [i for i, _ in ids] == reads  # in order, each once
    assert len(taken) > 10  # (most of the run went the taken way)
    n = iter(range(2, 100))  # the first write took id 1
    want = [f"h9-000001-{next(n):x}" for i in order if i != "too far"]  # a refused read: none
    assert [rid for _, rid in ids] == [w for w, i in zip(want, [i for i in order if i != "too far"])
                                       if i != "write"]
    with trio.fail_after(5):
        while sum(count for cmd, ok, count, _ in export.observed if cmd == proto.CMD_READ) < 40:
            await trio.sleep(0.01)
    counts = {}
    for cmd, ok, count, nbytes in export.observed:
        n, b = counts.get((cmd, ok), (0, 0))
        counts[cmd, ok] = (n + count, b + nbytes)
    assert counts == {(proto.CMD_WRITE, True): (2, 41 * 4096),
                      (proto.CMD_READ, True): (39, 39 * 4096), (proto.CMD_READ, False): (1, 4096)}


async def test_a_long_run_of_writes_is_answered_like_writes_one_by_one(provider, nursery,
                                                                        monkeypatch):
    """take_reads' counterpart for writes (TransmissionCodec.take_writes,
    _Connection.dispatch_writes): past TAKE_RUN writes in a row each still gets its
    request id, its FUA flag, its answer (done at once, an error raised, an awaitable,
    a Later) and its count in the metrics; a refused write and a read in the middle of
    the run are answered in their turn."""
    from vbp import reqid

    seen = []

    class Mixed(Observed):
        def write(self, offset, data, fua):
            i = offset // 512
            seen.append((i, reqid.get(), fua))
            if i == 20:
                raise NoSpace("the pool is full")
            if i == 21:
                later = Later()
                later.done(super().write(offset, data, fua))
                return later
            if i == 22:
                data = bytes(data)  # (a task outlives the receive buffer)

                async def later():
                    await trio.sleep(0.01)
                    return super(Mixed, self).write(offset, data, fua)
                return later()
            return super().write(offset, data, fua)

    taken = count_taken(monkeypatch, "dispatch_writes")
    export = Mixed("mixedw", MiB)
    c = await serve_with_ids(provider, nursery, export, boot=2)
    order = [*range(12), 20, *range(12, 16), 21, 16, 17, 22, *range(18, 20), "too far",
             23, 24, "read", *range(25, 30)]
    frames = []
    for i in order:
        if i == "too far":
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 500,
                                      MiB, 512) + bytes(512))
        elif i == "read":
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, 501, 0, 512))
        else:
            flags = proto.CMD_FLAG_FUA if i % 3 == 0 else 0
            frames.append(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, flags, proto.CMD_WRITE, i,
                                      i * 512, 512) + bytes([i]) * 512)
    assert server.TAKE_RUN < 12
    await c.send(b"".join(frames))
    got = {}
    for _ in order:
        cookie, error, data = await c.reply({501: 512})
        got[cookie] = (error, data)
    assert got.pop(500) == (proto.ENOSPC, b"")
    assert got.pop(501) == (0, bytes([0]) * 512)
    assert got.pop(20) == (proto.ENOSPC, b"")
    assert got == {i: (0, b"") for i in range(30) if i != 20}
    for i in range(30):
        assert await c.read(i * 512, 512, cookie=1000 + i) == (bytes(512) if i == 20 else bytes([i]) * 512)
    writes = [i for i in order if type(i) is int]
    assert [(i, fua) for i, _, fua in seen] == [(i, i % 3 == 0) for i in writes]
    assert len(taken) > 10  # (most of the run went the taken way)
    n = iter(range(1, 100))
    want = {i: f"h9-000002-{next(n):x}" for i in order if i != "too far"}  # refused: no id
    assert [rid for _, rid, _ in seen] == [want[i] for i in writes]
    with trio.fail_after(5):
        while sum(count for cmd, ok, count, _ in export.observed if cmd == proto.CMD_WRITE) < 30:
            await trio.sleep(0.01)
    counts = {}
    for cmd, ok, count, nbytes in export.observed:
        if cmd == proto.CMD_WRITE:
            k, b = counts.get(ok, (0, 0))
            counts[ok] = (k + count, b + nbytes)
    assert counts == {True: (29, 29 * 512), False: (1, 512)}


class FailingProvider(MemoryProvider):
    """The registry is unreachable (no list), volume "busy" is served by another host,
    and opening "bug" hits a bug."""

    def list_exports(self):
        raise RegistryUnavailable("registry etcd://10.0.0.1:2379: connection refused")

    def open_export(self, name):
        if name == "busy":
            raise LeaseHeld("volume 'busy' is served by another host")
        if name == "bug":
            raise RuntimeError("a bug")
        return super().open_export(name)


def _info_request(name: str) -> bytes:
    return struct.pack(">I", len(name)) + name.encode() + b"\0\0"


async def test_provider_failures_error_the_option_and_the_connection_goes_on(nursery, caplog):
    """proto.md: a server errors the options it cannot serve rather than disconnect. A
    registry outage during a gateway failover is not "unknown export"."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    p = FailingProvider()
    p.add("disk", 8192)
    port = await nursery.start(serve_nbd, p, "127.0.0.1", 0)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    assert await c.option(proto.OPT_LIST) == [
        (proto.REP_ERR_PLATFORM,
         b"the list of exports: registry etcd://10.0.0.1:2379: connection refused")]
    assert await c.option(proto.OPT_INFO, _info_request("busy")) == [
        (proto.REP_ERR_PLATFORM, b"export 'busy': volume 'busy' is served by another host")]
    assert await c.option(proto.OPT_GO, _info_request("bug")) == [
        (proto.REP_ERR_PLATFORM, b"export 'bug': internal error")]
    assert await c.option(proto.OPT_GO, _info_request("nosuch")) == [
        (proto.REP_ERR_UNKNOWN, b"export 'nosuch' does not exist")]
    reps = await c.option(proto.OPT_GO, _info_request("disk"))
    assert reps[-1][0] == proto.REP_ACK
    assert await c.read(0, 4) == bytes(4)
    records = [r for r in caplog.records if r.name == "vbp.nbd"]
    warnings = [r for r in records if r.levelname == "WARNING"]  # (the outage, the lease)
    assert len(warnings) == 2 and not any(r.exc_info for r in warnings)
    assert [r.exc_info[0] for r in records if r.exc_info] == [RuntimeError]  # (the bug)


async def test_provider_failures_as_libnbd_sees_them(nursery):
    nbd = pytest.importorskip("nbd")
    p = FailingProvider()
    p.add("disk", 8192)
    port = await nursery.start(serve_nbd, p, "127.0.0.1", 0)

    def client() -> list:
        h = nbd.NBD()
        h.set_opt_mode(True)
        h.connect_tcp("127.0.0.1", str(port))
        errors = []
        for name, call in [("list", lambda: h.opt_list(lambda name, description: 0)),
                           ("busy", lambda: (h.set_export_name("busy"), h.opt_info())),
                           ("nosuch", lambda: (h.set_export_name("nosuch"), h.opt_go()))]:
            try:
                call()
            except nbd.Error as exc:  # (errno: a name such as "ENOENT", or a number)
                code = exc.errno
                errors.append((name, errno.errorcode.get(code) if isinstance(code, int) else code))
        h.set_export_name("disk")
        h.opt_go()
        try:
            return errors + [h.get_size(), h.pread(4, 0)]
        finally:
            h.shutdown()

    got = await trio.to_thread.run_sync(client)
    assert got == [("list", "ENOTSUP"), ("busy", "ENOTSUP"), ("nosuch", "ENOENT"), 8192,
                   bytes(4)]


# --- the handshake's deadline and its output -------------------------------------------------


async def observed_server(nursery, provider, *, sndbuf: int = 0, **kwargs):
    """(port, ended): a server like serve_nbd's whose connections the test sees end, each
    adding its end time to `ended`. `sndbuf`: the server side's send buffer; small, a
    client that never reads blocks the server's sends soon."""
    ended: list = []

    async def connection(stream) -> None:
        if sndbuf:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        try:
            await server.handle_connection(stream, provider, **kwargs)
        finally:
            ended.append(trio.current_time())

    listeners = await nursery.start(functools.partial(trio.serve_tcp, connection, 0,
                                                      host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], ended


async def small_window_client(port: int) -> Client:
    """A client whose receive buffer is small: what it does not read stays with the
    server soon."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return Client(trio.SocketStream(sock))


def tls_server_context():
    import ssl

    import trustme

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("localhost").configure_cert(context)
    return context


async def ended_within(ended: list, seconds: float) -> float:
    """Wait for the server to end the connection; how long it took from now."""
    t0 = trio.current_time()
    with trio.fail_after(seconds):
        while not ended:
            await trio.sleep(0.02)
    return ended[0] - t0


async def test_a_trickling_client_is_cut_off_at_the_handshake_deadline(provider, nursery,
                                                                       monkeypatch):
    """One byte in less than the limit each time, never done: the limit is on the whole
    negotiation, not on each receive (CVE-2024-7409 in qemu)."""
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)
    port, ended = await observed_server(nursery, provider)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    go = struct.pack(">QII", proto.IHAVEOPT, proto.OPT_GO, 100) + bytes(100)

    async def trickle() -> None:
        for i in range(len(go)):
            await c.send(go[i:i + 1])
            await trio.sleep(0.1)

    async with trio.open_nursery() as inner:
        inner.start_soon(trickle)
        assert await ended_within(ended, 3) < 1.0
        inner.cancel_scope.cancel()
    await c.aclose()


@pytest.mark.parametrize("tls", ["off", "require"])
async def test_a_client_that_never_reads_is_cut_off_at_the_handshake_deadline(nursery,
                                                                              monkeypatch, tls):
    """Options pipelined and the replies never read: the server's sends block, and the
    deadline covers them (before STARTTLS too, where every option gets TLS_REQD)."""
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)
    provider = MemoryProvider()
    for i in range(50):
        provider.add(f"volume-{i:03d}", 4096, description="x" * 100)
    port, ended = await observed_server(
        nursery, provider, sndbuf=4096, tls=tls,
        tls_context=tls_server_context() if tls == "require" else None)
    c = await small_window_client(port)
    await c.recv(18)
    await c.send(struct.pack(">I", 1) + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_LIST, 0)
                 * 3000)
    assert await ended_within(ended, 3) < 1.0
    await c.aclose()


async def test_a_client_that_never_reads_its_replies_is_disconnected_and_freed(provider,
                                                                            nursery):
    """Reads sent and their replies never read: the server's sends block, and it held
    what it had queued (up to MAX_QUEUED, and as much again in the send under way) with
    no limit in time, so a thousand such clients held 64 GB. Past send_timeout without
    taking a byte the client is disconnected; another client is served throughout, and a
    slow one that takes its replies in a trickle is not cut off."""
    provider.add("big", 64 * MiB)
    port, ended = await observed_server(nursery, provider, sndbuf=4096, send_timeout=0.5)
    stuck = await Client.connect(port, "big", rcvbuf=4096)
    for i in range(16):
        await stuck.request(proto.CMD_READ, i * MiB, MiB, cookie=i)
    slow = await Client.connect(port, "big", rcvbuf=4096)
    for i in range(4):
        await slow.request(proto.CMD_READ, 0, 256 * 1024, cookie=i)
    other = await Client.connect(port)
    t0 = trio.current_time()
    with trio.fail_after(5):
        for i in range(4):  # 256 KiB a second at most: the replies leave in 4 s or so
            assert await slow.reply({i: 256 * 1024}) == (i, 0, bytes(256 * 1024))
            await trio.sleep(0.25)
            if i == 1:  # (it took some, and had more than 0.5 s to take it)
                assert await other.write(0, b"ok") == 0 and await other.read(0, 2) == b"ok"
    assert len(ended) == 1 and ended[0] - t0 < 2, "the client that never read is still served"
    with pytest.raises((EOFError, trio.BrokenResourceError)):
        with trio.fail_after(5):
            while True:
                await stuck.recv(MiB)
    for c in (stuck, slow, other):
        await c.aclose()


async def test_the_deadline_spares_an_export_opening_and_ends_with_the_handshake(nursery,
                                                                                monkeypatch):
    """Opening an export may take longer than the limit (a lease changing hands), and
    transmission, idle or not, is not timed."""
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)

    class SlowProvider(MemoryProvider):
        async def open_export(self, name):
            await trio.sleep(0.8)
            return super().open_export(name)

    p = SlowProvider()
    p.add("disk", 8192)
    port, ended = await observed_server(nursery, p)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    reps = await c.option(proto.OPT_INFO, _info_request("disk"))  # (0.8 s)
    assert reps[-1][0] == proto.REP_ACK
    await trio.sleep(0.3)  # (of the 0.5 s, if the opening did not count)
    reps = await c.option(proto.OPT_GO, _info_request("disk"))  # (another 0.8 s)
    assert reps[-1][0] == proto.REP_ACK
    await trio.sleep(1.0)
    assert await c.write(0, b"late") == 0 and await c.read(0, 4) == b"late"
    assert len(ended) == 0
    await c.aclose()


async def test_a_client_asking_info_again_and_again_of_a_slow_export_is_cut_off(nursery,
                                                                               monkeypatch):
    """The clock stops for the first few export opens only: a client asking NBD_OPT_INFO
    over and over of an export slow to open (each open bounded, in blockd a lease change
    or a registry outage) would hold its connection for up to 4096 opens."""
    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)
    opens = []

    class SlowProvider(MemoryProvider):
        async def open_export(self, name):
            opens.append(name)
            await trio.sleep(0.2)
            return super().open_export(name)

    p = SlowProvider()
    p.add("disk", 8192)
    port, ended = await observed_server(nursery, p)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", 1))
    ask = (struct.pack(">QII", proto.IHAVEOPT, proto.OPT_INFO, len(_info_request("disk")))
           + _info_request("disk"))
    await c.send(ask * 100)  # 20 s of opens if none counted
    await ended_within(ended, 5)
    assert server.UNTIMED_OPENS < len(opens) <= server.UNTIMED_OPENS + 4, len(opens)
    await c.aclose()


async def test_pipelined_lists_ask_the_provider_only_as_fast_as_the_client_reads(nursery):
    """300 NBD_OPT_LIST in one packet, replies unread: the provider (in blockd the
    registry) is asked again only once the replies so far went out, so a client that does
    not read costs a few calls, not 300 and their replies held in memory. Once it reads,
    every option is answered, in order."""
    class CountingProvider(MemoryProvider):
        calls = 0

        def list_exports(self):
            CountingProvider.calls += 1
            return super().list_exports()

    p = CountingProvider()
    for i in range(50):
        p.add(f"volume-{i:03d}", 4096, description="x" * 100)
    port, _ = await observed_server(nursery, p, sndbuf=4096)
    c = await small_window_client(port)
    await c.recv(18)
    await c.send(struct.pack(">I", 1) + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_LIST, 0)
                 * 300)
    await trio.sleep(0.5)
    assert CountingProvider.calls < 30
    for _ in range(300):
        magic, option, rtype, length = struct.unpack(">QIII", await c.recv(20))
        while rtype == proto.REP_SERVER:
            await c.recv(length)
            magic, option, rtype, length = struct.unpack(">QIII", await c.recv(20))
        assert (option, rtype, length) == (proto.OPT_LIST, proto.REP_ACK, 0)
    assert CountingProvider.calls == 300
    await c.aclose()


def _resident() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def test_stalled_large_write_headers_hold_no_memory_they_did_not_send(port, provider):
    """Clients that each send the header of a 32 MiB write and a few bytes of its payload,
    then stall, make the server hold about what they sent, not 32 MiB each: a handful of
    28-byte headers must not cost the host gigabytes. Once a payload completes, the write
    lands whole."""
    provider.add("big", 64 * MiB)
    clients = []
    before = _resident()
    for i in range(8):
        c = await Client.connect(port, "big")
        await c.request(proto.CMD_WRITE, 0, 32 * MiB, b"\xab" * 4096, cookie=i)
        clients.append(c)
    await trio.sleep(0.3)  # (the server reads the headers and the first bytes)
    grown = _resident() - before
    assert grown < 64 * MiB, f"{grown / MiB:.0f} MiB resident for 8 stalled headers"
    c = clients[0]
    await c.send(b"\xab" * (32 * MiB - 4096))
    with trio.fail_after(10):
        assert await c.reply() == (0, 0, b"")
    assert provider.exports["big"].data[:32 * MiB] == b"\xab" * (32 * MiB)
    for c in clients:
        await c.aclose()


@pytest.mark.parametrize("max_block", [64 * 1024, 64 * MiB])
async def test_the_maximum_payload_a_client_is_told_is_the_one_its_requests_are_held_to(
        port, provider, max_block):
    """proto.md "Size constraints": a client that asked for NBD_INFO_BLOCK_SIZE MUST abide
    by it, and a server enforcing its constraints errors what falls outside them. A write
    of the advertised maximum payload is served (an export's 64 MiB is more than the
    server takes: it advertises what it takes), and one byte more is refused with EINVAL
    without reaching the export (which said it takes no more)."""
    provider.add("e", 80 * MiB, max_block=max_block)
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
    reps = await c.option(proto.OPT_GO, struct.pack(">I", 1) + b"e"
                          + struct.pack(">HH", 1, proto.INFO_BLOCK_SIZE))
    assert reps[-1][0] == proto.REP_ACK
    sizes = [struct.unpack(">HIII", d) for t, d in reps
             if t == proto.REP_INFO and d[:2] == struct.pack(">H", proto.INFO_BLOCK_SIZE)]
    assert len(sizes) == 1
    advertised = sizes[0][3]
    assert advertised <= max_block
    with trio.fail_after(20):
        assert await c.write(0, b"\x5a" * advertised, cookie=1) == 0
        assert await c.write(0, b"\x00" * (advertised + 1), cookie=2) == proto.EINVAL
        assert await c.write(0, b"ok", cookie=3) == 0
    assert provider.exports["e"].data[2:advertised] == b"\x5a" * (advertised - 2)
    await c.aclose()


class FailingReads(MemoryExport):
    """Reads fail with an error whose text is `message`."""

    message = ""

    def read(self, offset, length):
        raise OSError(errno.EIO, self.message)


@pytest.mark.parametrize("message", ["a" + "é" * 3000, "nul\0 and a lone surrogate \udcff"])
async def test_an_error_chunk_carries_a_protocol_string_whatever_the_error_says(
        port, provider, message):
    """proto.md "Conventions": an error message is UTF-8 without NUL, at most 4096 bytes.
    An export's error text that is longer (cut inside a character), holds a NUL or a
    lone surrogate (a path decoded with surrogateescape) still becomes one, and the
    connection goes on."""
    export = provider.exports["bad"] = FailingReads("bad", MiB)
    export.message = message
    c = await Client.connect(port, "bad", structured=True)
    await c.request(proto.CMD_READ, 0, 4096, cookie=5)
    with trio.fail_after(5):
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", await c.recv(20))
        payload = await c.recv(length)
    assert (magic, rtype, cookie) == (proto.STRUCTURED_REPLY_MAGIC, proto.REPLY_TYPE_ERROR, 5)
    assert flags & proto.REPLY_FLAG_DONE
    error, n = struct.unpack_from(">IH", payload)
    text = payload[6:]
    assert error == proto.EIO and n == len(text) == length - 6
    assert len(text) <= proto.MAX_STRING and b"\0" not in text
    text.decode("utf-8")  # (raises if cut inside a character)
    with trio.fail_after(5):
        await c.request(proto.CMD_FLUSH, cookie=6)
        assert await c.reply() == (6, 0, b"")
    await c.aclose()


@pytest.mark.parametrize("limit", [4 * MiB, 1 << 40], ids=["budget", "no-budget"])
@pytest.mark.parametrize("reads,size", [(16, MiB), (3, 8 * MiB)], ids=["share", "past-share"])
async def test_the_bytes_all_connections_hold_stay_within_the_servers_budget(
        provider, nursery, monkeypatch, limit, reads, size):
    """Clients that send reads and take none of the replies: each connection may hold
    MAX_QUEUED of replies and more (about 160 MiB), so a few hundred of them held tens of
    GiB at once. With the server's budget (HeldBytes) past its limit, a connection takes
    no more requests once it holds FAIR_SHARE, nor a read that would take it past its
    share: eight such clients hold about what the first took before the limit was
    crossed, and FAIR_SHARE and a read of at most the share each (the control without a
    budget shows what they would hold), while a client with little in flight is served
    throughout. (Reads larger than the share, up to 32 MiB: a connection that held less
    than its share took one all the same, and a review's 120 clients of 32 MiB reads
    held 4.5 GiB against a budget of 1.)"""
    monkeypatch.setattr(server, "FAIR_SHARE", MiB)
    provider.add("big", 64 * MiB)
    held = server.HeldBytes(limit)
    port, ended = await observed_server(nursery, provider, sndbuf=4096, held=held)
    stuck = []
    for _ in range(8):
        c = await Client.connect(port, "big", rcvbuf=4096)
        for i in range(reads):
            await c.request(proto.CMD_READ, i * size, size, cookie=i)
        stuck.append(c)
        await trio.sleep(0.05)
    other = await Client.connect(port)
    with trio.fail_after(5):
        for i in range(20):
            assert await other.write(i * 4096, b"ok") == 0 and await other.read(i * 4096, 2) == b"ok"
    await trio.sleep(0.3)
    print(f"held at most {held.most / MiB:.1f} MiB")
    if limit == 4 * MiB:
        # the first connection's reads, then at most FAIR_SHARE and one read of the share
        # more each (and the small client's few bytes)
        one_more = size if size <= MiB else 0
        assert held.most <= 4 * MiB + reads * size + 8 * (MiB + one_more) + MiB, held.most / MiB
    else:
        assert held.most >= 8 * (reads - 1) * size, held.most / MiB  # (nearly) all at once
    for c in stuck + [other]:
        await c.aclose()
    with trio.fail_after(5):
        while len(ended) < 9:
            await trio.sleep(0.02)
    assert held.total == 0  # every connection gave back what it held


async def test_a_connection_whose_client_went_away_takes_no_request_more(provider, nursery,
                                                                        monkeypatch):
    """The reader waits for room (its fair share, held by the reply being sent); the
    client resets the connection. The writer's failed send gives back what it was sending
    and wakes the reader, then ends the connection: the reader took one more request
    first, a copy of up to 32 MiB for each of many such clients at once (a review saw
    80 of them hold the event loop for 3-7 s, and a lease lapse)."""
    monkeypatch.setattr(server, "FAIR_SHARE", MiB)
    taken = counting_dispatches(monkeypatch)
    provider.add("big", 64 * MiB)
    held = server.HeldBytes(MiB)
    held.add(2 * MiB)  # (other connections' replies: the budget is over)
    port, ended = await observed_server(nursery, provider, sndbuf=4096, held=held)
    c = await Client.connect(port, "big", rcvbuf=4096)
    # (reads of the fair share each: a larger one waits for the budget before it is
    # taken, test_a_read_past_its_share_waits_for_the_budget_and_not_for_a_client_gone)
    await c.send(b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, i,
                                      i * MiB, MiB) for i in range(4)))  # (one receive)
    await trio.sleep(0.3)
    before = taken[0]
    assert before == 1  # (the first being sent, the connection at its fair share)
    c.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await c.aclose()  # (a reset)
    with trio.fail_after(5):
        while not ended:
            await trio.sleep(0.02)
    assert taken[0] == before


async def test_a_read_past_its_share_waits_for_the_budget_and_not_for_a_client_gone(
        provider, nursery, monkeypatch):
    """A read larger than the connection's share, past the budget, waits before it is
    taken; its client resets the connection meanwhile. Nothing else of the connection
    would notice (nothing is being sent): it looks at the socket every GONE_CHECK, and
    ends without taking the read, which would otherwise be made, up to 32 MiB, for no
    one once the budget is back under. Once under, a waiting read is taken."""
    monkeypatch.setattr(server, "FAIR_SHARE", MiB)
    monkeypatch.setattr(server, "GONE_CHECK", 0.1)
    taken = counting_dispatches(monkeypatch)
    provider.add("big", 64 * MiB)
    held = server.HeldBytes(MiB)
    held.add(2 * MiB)  # (other connections' replies: the budget is over)
    port, ended = await observed_server(nursery, provider, held=held)
    c = await Client.connect(port, "big")
    await c.request(proto.CMD_READ, 0, 2 * MiB, cookie=1)
    await trio.sleep(0.3)
    assert taken[0] == 0  # (waiting for the budget)
    c.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await c.aclose()  # (a reset)
    with trio.fail_after(5):
        while not ended:
            await trio.sleep(0.02)
    assert taken[0] == 0
    d = await Client.connect(port, "big")
    await d.request(proto.CMD_READ, 0, 2 * MiB, cookie=2)
    await trio.sleep(0.3)
    assert taken[0] == 0
    held.add(-2 * MiB)  # (back under: the waiting read goes)
    with trio.fail_after(5):
        cookie, error, data = await d.reply({2: 2 * MiB})
    assert (cookie, error, len(data)) == (2, 0, 2 * MiB) and taken[0] == 1
    await d.aclose()


async def _tls_client(port: int, name: str) -> Client:
    """A client of export `name` through STARTTLS (the server's context: _tls_contexts)."""
    c = Client(await _starttls(await trio.open_tcp_stream("127.0.0.1", port)))
    await c.send(struct.pack(">QII", proto.IHAVEOPT, proto.OPT_EXPORT_NAME, len(name))
                 + name.encode())
    await c.recv(10)
    return c


async def _starttls(stream) -> trio.SSLStream:
    """`stream` (a new connection) through the greeting and NBD_OPT_STARTTLS, wrapped in
    TLS with _tls_contexts' client context (the handshake comes with the first use)."""
    plain = Client(stream)
    await plain.recv(18)
    await plain.send(struct.pack(">I", 3) + struct.pack(">QII", proto.IHAVEOPT,
                                                         proto.OPT_STARTTLS, 0))
    assert struct.unpack(">QIII", await plain.recv(20))[2] == proto.REP_ACK
    return trio.SSLStream(stream, _tls_contexts()[1], server_hostname="localhost")


@functools.lru_cache(maxsize=None)
def _tls_contexts():
    """(server context, client context) of a test CA."""
    import ssl

    import trustme

    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_an_idle_connection_gives_up_its_payload_buffers(provider, nursery, monkeypatch,
                                                               tls):
    """Each connection keeps the buffers of its large writes' payloads for reuse, up to
    POOL_BYTES; a review's 40 connections that wrote a few MiB each and stayed idle held
    540 MiB, not counted anywhere. With no request for POOL_IDLE and none in flight, a
    connection gives them up (to the thread's spares, bounded for all); writes coming
    closer together keep them, and a write after the release is served as before. Over
    TLS too: the connection receives through its TLS channel as through its socket."""
    from nbd_frontend import transmission

    monkeypatch.setattr(server, "POOL_IDLE", 0.5)
    monkeypatch.setattr(transmission._here, "spares", [], raising=False)  # (none yet: the
    codecs = []  # first buffer is the pool's, not one an earlier test released)
    init = transmission.TransmissionCodec.__init__

    def spied(self, *args, **kwargs):
        init(self, *args, **kwargs)
        codecs.append(self)

    monkeypatch.setattr(transmission.TransmissionCodec, "__init__", spied)
    provider.add("big", 16 * MiB)
    if tls:
        port = await nursery.start(functools.partial(serve_nbd, tls="require",
                                                     tls_context=_tls_contexts()[0]),
                                   provider, "127.0.0.1", 0)
        c = await _tls_client(port, "big")
    else:
        port = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
        c = await Client.connect(port, "big")
    payload = bytes(range(256)) * (4 * MiB // 256)
    for i in range(3):  # (closer together than POOL_IDLE: the buffer is kept and reused)
        assert await c.write(i * 4 * MiB, payload) == 0
        (codec,) = codecs  # (made once the negotiation is over, on the server's side)
        assert len(codec._pool) == 1
    await trio.sleep(1.2)
    assert codec._pool == []
    assert await c.write(12 * MiB, payload) == 0
    assert await c.read(12 * MiB, 4 * MiB) == payload
    await c.aclose()


async def test_a_large_writes_payload_counts_in_the_budget_and_is_read_to_its_end(provider,
                                                                                nursery,
                                                                                monkeypatch):
    """A client that sent the header of a 2 MiB write and 1.5 MiB of its payload, then
    stalls, holds that much: it counts in the server's budget (past its limit here,
    others are capped). The rest of the payload is still read, over the limit or not,
    and the write completes: connections over the limit by their payloads alone, each
    held back until the total is under, would wait for each other forever."""
    monkeypatch.setattr(server, "FAIR_SHARE", MiB)
    provider.add("big", 64 * MiB)
    held = server.HeldBytes(MiB)
    port, ended = await observed_server(nursery, provider, held=held)
    writer = await Client.connect(port, "big")
    data = bytes(range(256)) * (8 * 1024)  # 2 MiB
    await writer.request(proto.CMD_WRITE, 0, len(data), data[:3 * MiB // 2], cookie=7)
    with trio.fail_after(5):
        while held.total < 3 * MiB // 2:
            await trio.sleep(0.02)
    assert held.total > held.limit
    await writer.send(data[3 * MiB // 2:])
    with trio.fail_after(5):
        assert await writer.reply() == (7, 0, b"")
    assert await writer.read(MiB, 4096, cookie=8) == data[MiB:MiB + 4096]
    await writer.aclose()
    with trio.fail_after(5):
        while ended == []:
            await trio.sleep(0.02)
    assert held.total == 0 and not held.waiting


async def connect_once_a_slot_frees(port: int) -> "Client":
    """A connection taken, once the server saw another one end (a moment after it did)."""
    with trio.fail_after(5):
        while True:
            try:
                return await Client.connect(port)
            except (EOFError, trio.BrokenResourceError):
                await trio.sleep(0.05)


async def test_connections_past_max_connections_are_closed_at_once(provider, nursery, caplog):
    """Past `max_connections` (blockd: nbd_max_connections) a new connection is closed as
    soon as it is accepted, before the greeting, and a warning says so; those open are
    served as ever, and once one ends a new one is taken. Without a cap, each connection
    may hold FAIR_SHARE and a request past the budget: the count bounds the whole."""
    port = await nursery.start(functools.partial(server.serve_nbd, provider, "127.0.0.1", 0,
                                                 max_connections=2))
    a, b = await Client.connect(port), await Client.connect(port)
    extra = Client(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
        await extra.recv(18)
    assert "nbd connections refused" in caplog.text
    assert await a.write(0, b"ok") == 0 and await b.read(0, 2) == b"ok"
    await a.aclose()
    c = await connect_once_a_slot_frees(port)
    assert await c.read(0, 2) == b"ok"
    for x in (b, c, extra):
        await x.aclose()


async def test_connections_of_this_host_are_not_held_to_the_cap_of_an_address(provider, nursery):
    """A hypervisor beside blockd (loopback, vbp.sockets.same_host) may take every
    connection, as before the cap of one address."""
    port = await nursery.start(functools.partial(server.serve_nbd, provider, "127.0.0.1", 0,
                                                 max_connections=4, max_per_address=2))
    clients = [await Client.connect(port) for _ in range(4)]
    assert [await c.read(0, 2) for c in clients] == [b"\0\0"] * 4
    for c in clients:
        await c.aclose()


async def test_connections_past_those_one_address_may_hold_are_closed_at_once(
        provider, nursery, caplog, monkeypatch):
    """Past `max_per_address` connections from one client address (blockd:
    nbd_max_connections_per_address) a new one from it is closed at once, with a warning
    naming the address; a client of another address is still served, and once one of the
    first address's ends, it gets a new one. Without it, a client that opens every slot
    and leaves them idle locks every other client out. (Loopback clients taken for
    clients of other hosts: those of this host are not capped, test above.)"""
    monkeypatch.setattr(server, "same_host", lambda sock: False)
    port = await nursery.start(functools.partial(server.serve_nbd, provider, "127.0.0.1", 0,
                                                 max_connections=4, max_per_address=2))
    a, b = await Client.connect(port), await Client.connect(port)
    extra = Client(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
        await extra.recv(18)
    assert "nbd connections refused: 2 connections open from 127.0.0.1" in caplog.text
    other = await Client.connect(port, source="127.0.0.2")
    assert await other.write(0, b"hi") == 0 and await a.read(0, 2) == b"hi"
    await b.aclose()
    c = await connect_once_a_slot_frees(port)
    assert await c.read(0, 2) == b"hi"
    for x in (a, c, extra, other):
        await x.aclose()


def test_the_cap_of_one_address_counts_an_ipv6_clients_64_as_one():
    """An IPv6 host is given a /64 and may take any address of it (temporary addresses):
    counted per address, it would pass the cap with one connection each. An IPv4 client
    seen by a dual-stack listener (an IPv4-mapped address) or through NAT64 is counted as
    itself; a link-local address as itself (every link shares fe80::/64)."""
    c = server.client_of
    assert c("10.0.0.5") == c("::ffff:10.0.0.5") == "10.0.0.5"
    assert c("2001:db8:1:2:aaaa::1") == c("2001:db8:1:2:bbbb:cccc:dddd:7") == "2001:db8:1:2::/64"
    assert c("2001:db8:1:3::1") != c("2001:db8:1:2::1")
    # every link shares fe80::/64: a link-local address is itself, with its zone
    assert c("fe80::1%eth0") == "fe80::1%eth0" != c("fe80::2%eth1")
    assert c("64:ff9b::a00:5") == "10.0.0.5" != c("64:ff9b::b00:5")  # NAT64
    assert c("10.0.0.5") != c("10.0.0.6")


async def test_connections_from_addresses_of_one_ipv6_64_share_its_cap(
        provider, nursery, caplog, monkeypatch):
    """Connections from two addresses of one /64 share the cap of one address; one from
    another /64 is served. (Loopback clients 127.0.0.N taken for 2001:db8:0:N//2::N: .1
    and .2 in one /64, .3 in another.)"""
    monkeypatch.setattr(server, "same_host", lambda sock: False)
    real = server.client_of

    def as_ipv6(ip):
        n = int(ip.rsplit(".", 1)[1])
        return real(f"2001:db8:0:{n // 3:x}::{n:x}")

    monkeypatch.setattr(server, "client_of", as_ipv6)
    port = await nursery.start(functools.partial(server.serve_nbd, provider, "127.0.0.1", 0,
                                                 max_connections=4, max_per_address=2))
    a = await Client.connect(port, source="127.0.0.1")
    b = await Client.connect(port, source="127.0.0.2")
    extra = Client(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
        await extra.recv(18)
    assert "2 connections open from 2001:db8::/64" in caplog.text
    other = await Client.connect(port, source="127.0.0.3")
    assert await other.write(0, b"v6") == 0 and await b.read(0, 2) == b"v6"
    for x in (a, b, extra, other):
        await x.aclose()


async def test_a_later_answer_sent_at_once_gives_back_what_its_write_held(provider, nursery):
    """A write answered by a Later, the only request in flight (QD1), is answered from the
    Later's callback with an inline send, not the writer: what it held in the server's
    budget is given back then too, not left charged while the client is idle (with a few
    idle connections so charged, the budget stays over its limit and every connection is
    capped at FAIR_SHARE for good)."""
    export = LaterExport("later", 4 * MiB)
    provider.exports["later"] = export
    held = server.HeldBytes(MiB)
    port, ended = await observed_server(nursery, provider, held=held)
    c = await Client.connect(port, "later")
    data = b"\x07" * (2 * MiB)
    await c.request(proto.CMD_WRITE, 0, len(data), data, cookie=5)
    with trio.fail_after(5):
        while 0 not in export.pending:
            await trio.sleep(0.01)
    assert held.total == 2 * MiB
    export.pending[0].done()
    with trio.fail_after(5):
        assert await c.reply() == (5, 0, b"")
    await trio.sleep(0.2)  # the client idle: the connection reads nothing more
    assert held.total == 0, held.total / MiB
    await c.aclose()
    with trio.fail_after(5):
        while ended == []:
            await trio.sleep(0.02)
    assert held.total == 0


async def test_a_later_answer_completed_after_its_connection_ended_charges_nothing(provider,
                                                                                  nursery):
    """A Later completed after its connection ended (here: a protocol error) sends
    nothing and charges nothing: the budget is back to 0 and stays there."""
    export = LaterExport("later", 4 * MiB)
    provider.exports["later"] = export
    held = server.HeldBytes(MiB)
    port, ended = await observed_server(nursery, provider, held=held)
    c = await Client.connect(port, "later")
    await c.request(proto.CMD_WRITE, 0, MiB, b"\x01" * MiB, cookie=1)
    with trio.fail_after(5):
        while 0 not in export.pending:
            await trio.sleep(0.01)
    await c.send(b"\0" * 28)  # bad magic: the connection ends, its write still pending
    with trio.fail_after(5):
        while ended == []:
            await trio.sleep(0.02)
    assert held.total == 0
    export.pending[0].done()
    await trio.sleep(0.05)
    assert held.total == 0, held.total
    await c.aclose()


async def test_replies_queued_for_a_client_that_reads_none_hold_about_max_queued(provider,
                                                                              monkeypatch):
    """A client that pipelines 1-byte reads of a hole and takes none of the replies: each
    reply is a 16-byte header and a view of 1 byte, counted as 17 bytes against MAX_QUEUED
    while the objects cost some 250 bytes, so a connection held fifteen times MAX_QUEUED
    (about 1 GiB at 64 MiB), and the server's budget (HeldBytes) was as far off. What a
    queued buffer costs beyond its bytes counts too: the replies held stay within a few
    times MAX_QUEUED (one batch's and the send under way's)."""
    import tracemalloc

    monkeypatch.setattr(server, "MAX_QUEUED", 4 * MiB)
    held = server.HeldBytes()
    async with trio.open_nursery() as nursery:
        port, _ = await observed_server(nursery, provider, sndbuf=4096, held=held,
                                        send_timeout=600)
        c = await Client.connect(port, rcvbuf=4096)
        batch = b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ, i,
                                     i * 8, 1) for i in range(10_000))
        tracemalloc.start()
        try:
            for _ in range(60):  # 600,000 reads, until the server takes no more
                with trio.move_on_after(1) as waited:
                    await c.send(batch)
                if waited.cancelled_caught:
                    break
            await trio.sleep(0.5)
            used = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        print(f"{used / MiB:.1f} MiB held, {held.total / MiB:.1f} MiB counted")
        assert used < 4 * 4 * MiB, f"{used / MiB:.0f} MiB held for replies"
        assert held.total >= used / 4, "the budget counts what the replies hold"
        await c.aclose()
        nursery.cancel_scope.cancel()


async def test_a_failing_export_does_not_log_a_line_per_failed_request(port, provider, caplog):
    """A disk that fails fails every request that reaches it: at 100k IOPS a warning per
    request is 100k lines a second, which fills the journal and buries the first lines
    that said what happened. The first few are logged, then the rest of a period are
    counted, and the next line logged says how many were left out."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    provider.exports["bad"] = FailingReads("bad", MiB)
    c = await Client.connect(port, "bad")
    n = 2000
    with trio.fail_after(30):
        for start in range(0, n, 100):  # (pipelined, 100 at a time)
            for cookie in range(start, start + 100):
                await c.request(proto.CMD_READ, 0, 4096, cookie=cookie)
            for _ in range(100):
                assert (await c.reply())[1] == proto.EIO
    await c.aclose()
    lines = [r for r in caplog.records if r.name == "vbp.nbd" and r.levelno >= logging.WARNING
             and "failed" in r.getMessage()]
    assert 1 <= len(lines) <= 20, len(lines)
    assert "bad" in lines[0].getMessage()  # (which export fails)


class TwoFailures(MemoryExport):
    """Reads fail with EIO (a failing disk); the one at offset 1 MiB - 4 KiB with another
    failure (no copy of its chunk reachable)."""

    def read(self, offset, length):
        if offset == MiB - 4096:
            raise PeerUnavailable("no current replica of chunk 0 of bad is reachable")
        raise OSError(errno.EIO, "Input/output error")


async def test_another_failure_of_the_same_export_is_logged_while_one_repeats(
        port, provider, caplog):
    """Reads of an export fail request after request for one reason (a line per request,
    limited), and one read fails for another. Its line was counted among the first
    failure's left-out lines and never logged: what the operator needed to read was
    hidden as long as the first failure kept every period's first lines."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    provider.exports["bad"] = TwoFailures("bad", MiB)
    c = await Client.connect(port, "bad")
    with trio.fail_after(30):
        for cookie in range(300):
            offset = MiB - 4096 if cookie == 150 else 0
            await c.request(proto.CMD_READ, offset, 4096, cookie=cookie)
            assert (await c.reply())[1] == proto.EIO
    await c.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "vbp.nbd"
             and r.levelno >= logging.WARNING and "failed" in r.getMessage()]
    assert len(lines) <= 20, len(lines)
    assert any("no current replica" in x for x in lines), lines


class FullDisk(MemoryExport):
    def write(self, offset, data, fua):
        raise NoSpace("no space left for a new chunk of full (test)")


async def test_a_write_failing_for_a_full_disk_is_logged(port, provider, caplog):
    """A full disk fails writes with ENOSPC: logged as a failing disk's EIO is (limited),
    as the operator guide says. Only EIO was, and a host whose disk filled up said
    nothing but its start's disk_short warning (found by a review)."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="vbp.nbd")
    provider.exports["full"] = FullDisk("full", MiB)
    c = await Client.connect(port, "full")
    with trio.fail_after(30):
        assert await c.write(0, b"x" * 4096) == proto.ENOSPC
    await c.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "vbp.nbd"
             and r.levelno >= logging.WARNING]
    assert any("WRITE of full failed" in x and "no space left" in x for x in lines), lines


async def test_a_run_of_writes_the_export_takes_at_once_is_answered_in_order(provider, nursery):
    """An export with write_run takes the writes of a run it can, from the first, and
    write() gets the rest, in order: every write is answered, with its own cookie, and
    the request ids of those write() sees follow the ones the run took."""
    from vbp import reqid

    calls = []

    class Runs(MemoryExport):
        def write_run(self, writes, ids=None):
            taken = 0
            for cookie, flags, offset, length, data in writes:
                if flags & proto.CMD_FLAG_FUA:
                    break
                super().write(offset, data, False)
                taken += 1
            calls.append(("run", [w[0] for w in writes], taken))
            return taken

        def write(self, offset, data, fua):
            calls.append(("write", offset, fua, reqid.get()))
            return super().write(offset, data, fua)

    provider.exports["runs"] = Runs("runs", MiB)
    p = await nursery.start(functools.partial(
        serve_nbd, provider, "127.0.0.1", 0, ids=reqid.RequestIds("h9", boot=0xAB)))
    c = await Client.connect(p, "runs")
    # one send: TAKE_RUN writes dispatched one by one, then the rest taken as one run
    flags = [0] * server.TAKE_RUN + [0, 0, 0, proto.CMD_FLAG_FUA, 0]
    await c.send(b"".join(
        struct.pack(">IHHQQI", proto.REQUEST_MAGIC, f, proto.CMD_WRITE, 10 + i, i * 4096, 4096)
        + bytes([i + 1]) * 4096 for i, f in enumerate(flags)))
    n = len(flags)
    assert sorted([await c.reply() for _ in flags]) == [(10 + i, 0, b"") for i in range(n)]
    first = server.TAKE_RUN
    assert calls[first:] == [
        ("run", [10 + i for i in range(first, n)], 3),
        ("write", (n - 2) * 4096, True, f"h9-0000ab-{n - 1:x}"),
        ("write", (n - 1) * 4096, False, f"h9-0000ab-{n:x}")]
    assert [call[0] for call in calls[:first]] == ["write"] * first
    assert await c.read(0, n * 4096, cookie=99) == b"".join(bytes([i + 1]) * 4096
                                                            for i in range(n))


async def test_a_run_that_raises_leaves_every_write_to_write(provider, nursery):
    """write_run raising (a bug) costs the run its speed, not its answers: each write goes
    to write() and is answered, and the connection goes on."""
    class Broken(MemoryExport):
        def write_run(self, writes, ids=None):
            raise RuntimeError("a bug")

    provider.exports["broken"] = Broken("broken", MiB)
    p = await nursery.start(serve_nbd, provider, "127.0.0.1", 0)
    c = await Client.connect(p, "broken")
    n = server.TAKE_RUN + 4
    await c.send(b"".join(
        struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i, i * 4096, 4096)
        + bytes([i + 1]) * 4096 for i in range(n)))
    assert sorted([await c.reply() for _ in range(n)]) == [(i, 0, b"") for i in range(n)]
    assert await c.read(0, n * 4096, cookie=99) == b"".join(bytes([i + 1]) * 4096
                                                            for i in range(n))


async def test_a_run_of_writes_under_way_is_answered_when_its_outcomes_come(provider, nursery):
    """write_run may take a run's writes as under way: (count, parts), a part (places,
    Later) each. The writes of a part are answered when its Later gives their outcomes,
    each as its outcome says (written, failed, or its own Later, answered when that
    completes), while the writes after the run go to write() with the ids that follow
    the run's, and are answered at once."""
    from vbp import reqid

    runs, ids_seen, calls = [], [], []

    class Pending(MemoryExport):
        def write_run(self, writes, ids=None):
            ids_seen.append(ids.seq)
            for _cookie, _flags, offset, _length, data in writes[:5]:
                super().write(offset, data, False)  # (data is valid during the call only)
            runs.append((Later(), Later()))
            return 5, [([0, 1, 2], runs[-1][0]), ([3, 4], runs[-1][1])]

        def write(self, offset, data, fua):
            calls.append((offset, reqid.get()))
            return super().write(offset, data, fua)

    provider.exports["pending"] = Pending("pending", MiB)
    p = await nursery.start(functools.partial(
        serve_nbd, provider, "127.0.0.1", 0, ids=reqid.RequestIds("h9", boot=0xAB)))
    c = await Client.connect(p, "pending")
    first = server.TAKE_RUN
    n = first + 6  # TAKE_RUN one by one, then a run of 6: 5 taken, 1 left to write()
    await c.send(b"".join(
        struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, 10 + i, i * 4096, 4096)
        + bytes([i + 1]) * 4096 for i in range(n)))
    early = [await c.reply() for _ in range(first + 1)]
    assert sorted(early) == [(10 + i, 0, b"") for i in [*range(first), n - 1]]
    assert ids_seen == [first]  # the run's ids are first + 1 .. first + 5
    assert calls[-1] == ((n - 1) * 4096, f"h9-0000ab-{n:x}")
    with trio.move_on_after(0.2):  # nothing of the run is answered before its outcomes
        await c.reply()
        raise AssertionError("a write of the run was answered before its outcome came")
    own, failing = Later(), Later()
    runs[0][1].done([OSError(errno.EIO, "Input/output error"), None])  # (parts in any order)
    got = sorted([await c.reply() for _ in range(2)])
    assert got == [(10 + first + 3, proto.EIO, b""), (10 + first + 4, 0, b"")]
    runs[0][0].done([None, own, failing])
    assert await c.reply() == (10 + first, 0, b"")
    failing.fail(OSError(errno.EIO, "Input/output error"))
    own.done(None)
    got = sorted([await c.reply() for _ in range(2)])
    assert got == [(10 + first + 1, 0, b""), (10 + first + 2, proto.EIO, b"")]
    assert await c.read(0, n * 4096, cookie=99) == b"".join(bytes([i + 1]) * 4096
                                                            for i in range(n))
    await c.request(proto.CMD_DISC)  # (it waits for nothing: none is left counted in flight)
    with trio.fail_after(5), pytest.raises(EOFError):
        await c.recv(1)
