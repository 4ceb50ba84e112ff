"""Review findings on the NBD frontend (branch rev-nbd): behaviour proto.md asks for."""

from __future__ import annotations

import struct
import time
from functools import partial

import pytest
import trio

from nbd_frontend import proto, server
from nbd_frontend.export import MemoryExport, MemoryProvider
from nbd_frontend.server import serve_nbd
from tests.unit.test_nbd_server import Client

pytestmark = pytest.mark.timeout(30)


class _CountingProvider(MemoryProvider):
    def __init__(self) -> None:
        super().__init__()
        self.opens = 0

    def open_export(self, name):
        self.opens += 1
        return super().open_export(name)


async def test_options_during_a_graceful_stop_get_err_shutdown(nursery):
    """proto.md, "Termination of the session during option haggling": a server being
    shut down SHOULD error further options (other than NBD_OPT_ABORT) with
    NBD_REP_ERR_SHUTDOWN. The negotiation ignored `stopping`: NBD_OPT_GO opened the
    export (blockd: publishes it, or takes a head's lease, during the drain), ACKed it,
    and the connection was closed after its first batch of requests."""
    provider = _CountingProvider()
    provider.add("disk", 1 << 20)
    stopping = trio.Event()
    port = await nursery.start(
        lambda task_status: serve_nbd(provider, "127.0.0.1", 0, stopping=stopping,
                                      task_status=task_status))
    c = Client(await trio.open_tcp_stream("127.0.0.1", port))
    await c.recv(18)
    await c.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
    assert (await c.option(proto.OPT_STRUCTURED_REPLY))[-1][0] == proto.REP_ACK
    stopping.set()  # the server begins its graceful stop with this client negotiating
    await trio.sleep(0.05)
    reps = await c.option(proto.OPT_GO, struct.pack(">I", 4) + b"disk" + b"\0\0")
    try:
        assert reps[-1][0] == proto.REP_ERR_SHUTDOWN
        assert [r[0] for r in await c.option(proto.OPT_LIST)] == [proto.REP_ERR_SHUTDOWN]
        assert provider.opens == 0
    finally:
        await c.aclose()


class _GatedExport(MemoryExport):
    """Writes answered once `gate` is set (each its own task in the server)."""

    gate: trio.Event

    def write(self, offset, data, fua):
        data = bytes(data)

        async def later():
            await self.gate.wait()
            MemoryExport.write(self, offset, data, fua)
        return later()


async def test_a_graceful_stop_answers_the_requests_it_will_not_take_with_eshutdown(nursery):
    """proto.md, "Terminating the transmission phase": on a shutdown the server SHOULD
    let the requests in flight be serviced, and the error for the others SHOULD be
    NBD_ESHUTDOWN. A review's client had 600 writes under way at a SIGTERM: the stop
    answered those taken, dropped the rest unanswered and closed with a reset (unread
    input), which can destroy answers not read yet. Now the requests received and not
    taken get ESHUTDOWN, and the connection ends with its end of stream."""
    export, stopping, port = await _stopping_server(nursery)
    c = await Client.connect(port, "disk")
    n = 300  # (more than MAX_IN_FLIGHT: the reader waits for room with the rest received)
    await c.send(b"".join(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_WRITE, i,
                                      i * 512, 512) + bytes([i % 256]) * 512 for i in range(n)))
    await trio.sleep(0.3)
    stopping.set()
    await trio.sleep(0.1)
    export.gate.set()  # the writes taken complete
    answers = {}
    with trio.fail_after(10):
        while True:
            try:
                cookie, error, _ = await c.reply()
            except EOFError:
                break  # (the end of stream, not a reset)
            answers[cookie] = error
    await c.aclose()
    done = [i for i, e in answers.items() if e == 0]
    refused = [i for i, e in answers.items() if e == proto.ESHUTDOWN]
    assert len(done) + len(refused) == len(answers)  # (no other error)
    assert done and refused and len(answers) >= 128 + 1
    assert max(done) < min(refused)  # (in order: those taken first)
    for i in done:  # every write answered done is there
        assert export.read(i * 512, 512) == bytes([i % 256]) * 512


# --- idle negotiations holding every connection slot ------------------------------------------


async def _idle(port: int, source: str | None = None) -> Client:
    """A connection that reads the greeting and sends nothing (never negotiates)."""
    c = Client(await trio.open_tcp_stream("127.0.0.1", port, local_address=source))
    assert (await c.recv(18))[:8] == b"NBDMAGIC"
    return c


async def _ended(c: Client, seconds: float = 5.0) -> bool:
    """Whether the server closed `c` within `seconds`."""
    with trio.move_on_after(seconds):
        try:
            await c.recv(1)
        except (EOFError, trio.BrokenResourceError):
            return True
        raise AssertionError("the server sent something unasked")
    return False


def _libnbd_read(port: int) -> tuple[float, bytes]:
    """libnbd connects, reads 4 bytes and disconnects: (seconds it took, the bytes)."""
    import nbd
    t0 = time.monotonic()
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_tcp("127.0.0.1", str(port))
    data = h.pread(4, 0)
    h.shutdown()
    return time.monotonic() - t0, data


async def test_idle_negotiations_holding_every_slot_give_way_to_a_real_client(nursery, caplog):
    """A review opened 1,030 connections that read the greeting and sent nothing: every
    slot (nbd_max_connections) was held for HANDSHAKE_TIMEOUT, and a real client was
    refused for 29 s. Those of this host are held to no cap of an address
    (nbd_max_connections_per_address), so they alone could fill the slots. Now a new
    connection finding every slot taken closes the oldest one still negotiating, and
    it is served at once; a warning or so says so, not a line per eviction."""
    pytest.importorskip("nbd")
    provider = MemoryProvider()
    provider.add("disk", 1 << 20)
    port = await nursery.start(partial(serve_nbd, provider, "127.0.0.1", 0,
                                       max_connections=16, max_per_address=4))
    idle = [await _idle(port) for _ in range(16)]  # (loopback: past the cap of an address)
    with trio.fail_after(5):  # (HANDSHAKE_TIMEOUT: 30 s)
        c = await Client.connect(port)
    assert await c.write(0, b"ok") == 0 and await c.read(0, 2) == b"ok"
    seconds, data = await trio.to_thread.run_sync(_libnbd_read, port)
    assert data == b"ok\0\0" and seconds < 5
    assert all([await _ended(x) for x in idle[:2]])  # the oldest two made room
    assert not await _ended(idle[2], 0.2)  # the others are left alone
    lines = [r for r in caplog.records if "nbd connections evicted" in r.getMessage()]
    assert len(lines) == 1 and "16 connections open" in lines[0].getMessage()
    more = [await _idle(port) for _ in range(30)]  # 30 evictions more: no line more
    assert len([r for r in caplog.records if "evicted" in r.getMessage()]) == 1
    assert await c.read(0, 2) == b"ok"
    for x in idle + more + [c]:
        await x.aclose()


async def test_connections_past_their_negotiation_are_never_evicted(nursery, caplog):
    """An established connection (in transmission) never loses its slot: with every slot
    held by those, a new connection is closed at once, as before, and they go on."""
    provider = MemoryProvider()
    provider.add("disk", 1 << 20)
    port = await nursery.start(partial(serve_nbd, provider, "127.0.0.1", 0,
                                       max_connections=4))
    ready = [await Client.connect(port) for _ in range(3)]
    idle = await _idle(port)
    ready.append(await Client.connect(port))  # (takes the idle one's slot)
    assert await _ended(idle)
    extra = Client(await trio.open_tcp_stream("127.0.0.1", port))
    with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
        await extra.recv(18)
    assert "nbd connections refused: 4 connections open" in caplog.text
    for i, c in enumerate(ready):
        assert await c.write(i, b"x") == 0 and await c.read(i, 1) == b"x"
    for x in ready + [idle, extra]:
        await x.aclose()


class _GatedOpen(MemoryProvider):
    """open_export waits for `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = trio.Event()
        self.opening = trio.Event()

    async def open_export(self, name):
        self.opening.set()
        await self.gate.wait()
        return super().open_export(name)


async def test_a_connection_whose_export_is_being_opened_is_not_evicted(nursery):
    """The client chose an export and the provider is opening it (blockd: takes a lease,
    publishes): an open is never cut short, so that connection keeps its slot, and one
    more is closed at once."""
    provider = _GatedOpen()
    provider.add("disk", 1 << 20)
    port = await nursery.start(partial(serve_nbd, provider, "127.0.0.1", 0,
                                       max_connections=1))
    async with trio.open_nursery() as inner:
        got: list = []

        async def go() -> None:
            got.append(await Client.connect(port))
        inner.start_soon(go)
        with trio.fail_after(5):
            await provider.opening.wait()
        extra = Client(await trio.open_tcp_stream("127.0.0.1", port))
        with trio.fail_after(5), pytest.raises((EOFError, trio.BrokenResourceError)):
            await extra.recv(18)
        provider.gate.set()
    c = got[0]
    assert await c.write(0, b"ok") == 0 and await c.read(0, 2) == b"ok"
    await c.aclose()
    await extra.aclose()


async def test_past_the_cap_of_an_address_its_own_oldest_negotiation_makes_room(
        nursery, monkeypatch):
    """Past nbd_max_connections_per_address, a new connection from that address takes
    the slot of the oldest negotiation of that same address, never another's."""
    monkeypatch.setattr(server, "same_host", lambda sock: False)
    provider = MemoryProvider()
    provider.add("disk", 1 << 20)
    port = await nursery.start(partial(serve_nbd, provider, "127.0.0.1", 0,
                                       max_connections=8, max_per_address=2))
    other = await _idle(port, "127.0.0.2")  # the oldest of all, of another address
    mine = [await _idle(port), await _idle(port)]
    c = await Client.connect(port)
    assert await c.read(0, 2) == b"\0\0"
    assert await _ended(mine[0])
    assert not await _ended(other, 0.2) and not await _ended(mine[1], 0.1)
    for x in mine + [other, c]:
        await x.aclose()


# --- requests a client sends while a graceful stop is under way ---------------------------------


def _request(cmd: int, cookie: int, offset: int = 0, length: int = 0) -> bytes:
    return struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, cmd, cookie, offset, length)


async def _stopping_server(nursery, **kwargs):
    provider = MemoryProvider()
    export = _GatedExport("disk", 1 << 20)
    export.gate = trio.Event()
    provider.exports["disk"] = export
    stopping = trio.Event()
    port = await nursery.start(
        lambda task_status: serve_nbd(provider, "127.0.0.1", 0, stopping=stopping,
                                      task_status=task_status, **kwargs))
    return export, stopping, port


async def _connect_tls(port: int, client_ctx) -> Client:
    """A client that upgrades to TLS (NBD_OPT_STARTTLS), then chooses export "disk"."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    plain = Client(stream)
    await plain.recv(18)
    await plain.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES)
                     + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_STARTTLS, 0))
    assert struct.unpack(">QIII", await plain.recv(20))[2] == proto.REP_ACK
    c = Client(trio.SSLStream(stream, client_ctx, server_hostname="localhost"))
    reps = await c.option(proto.OPT_GO, struct.pack(">I", 4) + b"disk" + b"\0\0")
    assert reps[-1][0] == proto.REP_ACK
    return c


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_requests_sent_during_a_graceful_stop_get_eshutdown_and_disc_ends_it(nursery,
                                                                                   tls):
    """proto.md, "Terminating the transmission phase": on a shutdown the error for the
    requests in flight "and any subsequently received requests SHOULD be ESHUTDOWN",
    and a client receiving ESHUTDOWN MUST soft disconnect (NBD_CMD_DISC). The stop
    answered the requests received before it, then, once those taken were answered,
    shut its side and read and dropped what came for STOP_DRAIN: requests the client
    sent while a write taken was still under way (it knows of the stop only from an
    answer) were never answered. Now each is answered with ESHUTDOWN before this side
    is shut, and the client's NBD_CMD_DISC ends the connection at once (over TLS with
    the session's close_notify)."""
    if tls:
        import ssl

        import trustme

        ca = trustme.CA()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("localhost").configure_cert(server_ctx)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        export, stopping, port = await _stopping_server(nursery, tls="require",
                                                        tls_context=server_ctx)
        c = await _connect_tls(port, client_ctx)
    else:
        export, stopping, port = await _stopping_server(nursery)
        c = await Client.connect(port, "disk")
    await c.send(_request(proto.CMD_WRITE, 1, 0, 4) + b"abcd")  # taken, under way
    await trio.sleep(0.1)
    stopping.set()
    await trio.sleep(0.1)
    await c.send(b"".join(_request(proto.CMD_READ, cookie, 0, 512) for cookie in (2, 3, 4)))
    await trio.sleep(0.1)
    export.gate.set()  # the write taken completes
    await c.send(_request(proto.CMD_FLUSH, 5))  # (after the stop's answers left, too)
    answers = {}
    with trio.fail_after(5):
        while len(answers) < 5:
            cookie, error, _ = await c.reply()
            answers[cookie] = error
    assert answers == {1: 0, 2: proto.ESHUTDOWN, 3: proto.ESHUTDOWN, 4: proto.ESHUTDOWN,
                       5: proto.ESHUTDOWN}
    assert export.read(0, 4) == b"abcd"
    await c.send(_request(proto.CMD_DISC, 6))  # the soft disconnect ESHUTDOWN calls for
    t0 = trio.current_time()
    with trio.fail_after(5), pytest.raises(EOFError):
        await c.recv(1)
    assert trio.current_time() - t0 < server.STOP_DRAIN / 2  # (not the drain's deadline)
    await c.aclose()


async def test_a_client_that_goes_on_sending_during_a_graceful_stop_is_answered_until_the_end(
        nursery):
    """A client that never disconnects: every request it sends during the stop, one
    whose payload was arriving at the stop included, is answered with ESHUTDOWN, and
    the connection ends (its end of stream, not a reset) within about STOP_DRAIN."""
    export, stopping, port = await _stopping_server(nursery)
    c = await Client.connect(port, "disk")
    payload = bytes(range(256)) * 256  # 64 KiB
    await c.send(_request(proto.CMD_WRITE, 1, 0, len(payload)) + payload[:1000])
    await trio.sleep(0.1)
    stopping.set()
    t0 = trio.current_time()
    await trio.sleep(0.1)
    await c.send(payload[1000:])  # the rest of the write under way at the stop
    cookie = 2
    answers = {}
    with trio.fail_after(server.STOP_DRAIN + 5):
        while True:
            if trio.current_time() - t0 < server.STOP_DRAIN + 1:
                try:
                    await c.send(_request(proto.CMD_READ, cookie, 0, 512))
                    cookie += 1
                except trio.BrokenResourceError:
                    pass
            try:
                got, error, _ = await c.reply()
            except EOFError:
                break
            answers[got] = error
    ended = trio.current_time() - t0
    await c.aclose()
    assert answers[1] == proto.ESHUTDOWN and export.read(0, 4) != payload[:4]  # (not taken)
    # (the write's answer came first: the client has two requests out, which the end of
    # the drain may leave unanswered)
    assert set(range(1, cookie - 2)) <= set(answers) <= set(range(1, cookie))
    assert set(answers.values()) == {proto.ESHUTDOWN} and len(answers) > 5
    assert server.STOP_DRAIN - 0.2 < ended < server.STOP_DRAIN + 1
