"""nbd_frontend.tls.TLSChannel: the server's TLS session used as a socket. Over a real
socket pair, against a real TLS client (trio.SSLStream, the standard library's ssl), the
bytes the server sends with send_now (the NBD server's call) arrive whole and in order
however little room the socket has, and recv_into returns exactly what the client sent."""

from __future__ import annotations

import random
import socket
import ssl

import pytest
import trio
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_frontend.tls import TLSChannel, TLSChannelStream, server_context
from vbp.sockets import nbytes, receive_wait, send_now

CA = trustme.CA()
CERT = CA.issue_cert("localhost")
RNG = random.Random(20261203)  # (a failure can be replayed)


def contexts(tmp_path_factory=None):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CERT.configure_cert(server)
    client = ssl.create_default_context()
    CA.configure_trust(client)
    return server, client


async def pair(sndbuf: int = 0):
    """A TLSChannel (server) and a trio.SSLStream (client) joined by a socket pair, after
    the TLS handshake."""
    a, b = socket.socketpair()
    if sndbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    a.setblocking(False)
    server_ctx, client_ctx = contexts()
    channel = TLSChannel(a, server_ctx)
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), client_ctx,
                            server_hostname="localhost")
    async with trio.open_nursery() as n:
        n.start_soon(channel.handshake)
        n.start_soon(client.do_handshake)
    return channel, client


END = b"--end--"


async def send_everything(channel: TLSChannel, buffers: list) -> None:
    """As the NBD server's writer sends: send_now, then wait for room and go on; then END,
    so that a byte sent twice shows (the receiver reads the batch and END, exactly)."""
    for batch in (buffers, [END]):
        rest = send_now(channel, batch, sum(map(nbytes, batch)))
        while rest is not None:
            await trio.lowlevel.wait_writable(channel)
            rest = send_now(channel, rest, -1)


async def receive_exactly(stream, n: int, pause: float = 0.0) -> bytes:
    out = bytearray()
    while len(out) < n:
        with trio.fail_after(10):  # (bytes left behind in the server never come)
            data = await stream.receive_some(min(65536, n - len(out)))
        assert data, "the stream ended early"
        out += data
        if pause:
            await trio.sleep(pause)
    return bytes(out)


async def through(channel, client, buffers: list, n: int, pause: float = 0.0) -> bytes:
    """send_everything(buffers) while the client reads `n` bytes and END: what it got."""
    got = b""

    async def read():
        nonlocal got
        got = await receive_exactly(client, n + len(END), pause)

    with trio.fail_after(60):  # (a sender left with bytes nobody reads waits forever)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await send_everything(channel, buffers)
    return got


async def test_replies_arrive_whole_through_a_small_socket_buffer():
    channel, client = await pair(sndbuf=4096)
    # what the NBD server queues: headers, small and large payloads, memoryviews
    buffers = []
    for i in range(300):
        buffers.append(i.to_bytes(16, "big"))
        size = RNG.choice([0, 1, 512, 4096, 20000, 1 << 20])
        if size:
            data = RNG.randbytes(size)
            buffers.append(memoryview(data) if i % 2 else data)
    want = b"".join(bytes(b) for b in buffers)
    assert await through(channel, client, list(buffers), len(want), pause=0.0005) == want + END
    assert channel.pending == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 70000), min_size=1, max_size=40),
       st.sampled_from([2048, 8192, 65536, 0]))
def test_any_batch_arrives_whole(sizes, sndbuf):
    async def main():
        channel, client = await pair(sndbuf=sndbuf)
        buffers = [RNG.randbytes(n) for n in sizes]
        want = b"".join(buffers)
        assert await through(channel, client, buffers, len(want)) == want + END
    trio.run(main)


async def stream_through(channel: TLSChannel, client, receive) -> None:
    """The client sends 3 MiB in pieces while `receive()` returns the next plaintext the
    channel gives, as the NBD reader reads (the wait only when the channel has nothing):
    the stream comes out whole and in order."""
    data = RNG.randbytes(3 << 20)
    got = bytearray()
    async with trio.open_nursery() as n:
        async def write():
            for i in range(0, len(data), 100_000):
                await client.send_all(data[i:i + 100_000])
        n.start_soon(write)
        while len(got) < len(data):
            got += await receive()
    assert bytes(got) == data


async def test_recv_into_returns_the_client_stream_in_any_buffer_size():
    channel, client = await pair()

    async def receive() -> bytes:
        buf = bytearray(RNG.choice([28, 4096, 50_000, 1 << 20]))
        try:
            k = channel.recv_into(buf)
        except BlockingIOError:
            k = await receive_wait(channel, buf)
        assert k > 0
        return buf[:k]

    await stream_through(channel, client, receive)


async def test_recvmsg_into_fills_its_buffers_in_order_with_the_client_stream():
    """As the NBD reader reads while a large write's payload is under way (a payload's
    rest and the head of its shared buffer, then the whole of that buffer)."""
    channel, client = await pair()

    async def receive() -> bytes:
        bufs = (bytearray(RNG.choice([28, 4096, 50_000, 1 << 20])),
                memoryview(bytearray(RNG.choice([1, 16384]))))
        try:
            k = channel.recvmsg_into(bufs)[0]
        except BlockingIOError:
            k = await receive_wait(channel, bufs)
        assert k > 0
        return bytes(bufs[0][:k]) + bytes(bufs[1][:max(0, k - len(bufs[0]))])

    await stream_through(channel, client, receive)
    with pytest.raises(BlockingIOError):
        channel.recvmsg_into((bytearray(10), bytearray(10)))


async def test_recv_into_is_zero_at_the_clients_close_notify_and_at_a_plain_close():
    channel, client = await pair()
    await client.send_all(b"last words")
    await client.aclose()  # (close_notify, then the socket closes)
    buf = bytearray(100)
    assert await receive_wait(channel, buf) == 10 and bytes(buf[:10]) == b"last words"
    assert await receive_wait(channel, buf) == 0


async def test_nothing_to_read_is_blocking_io_error():
    channel, _client = await pair()
    with pytest.raises(BlockingIOError):
        channel.recv_into(bytearray(10))


async def test_the_handshake_fails_against_a_client_that_does_not_trust_the_server():
    a, b = socket.socketpair()
    a.setblocking(False)
    server_ctx, _ = contexts()
    channel = TLSChannel(a, server_ctx)
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)  # another CA
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(b)), stranger,
                            server_hostname="localhost")
    failed = None

    async def server():
        nonlocal failed
        try:
            await channel.handshake()
        except (ssl.SSLError, trio.BrokenResourceError) as e:
            failed = e

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(server)
            with pytest.raises(trio.BrokenResourceError):  # (the client's verdict)
                await client.do_handshake()
            await client.transport_stream.aclose()
    assert failed is not None  # and the server's: the alert, or the client gone


async def test_a_sendmsg_encrypts_a_bounded_amount_and_the_rest_follows():
    """A 4 MiB batch is taken in steps of at most SEND_MAX (the loop is not held up by one
    call), and arrives whole."""
    from nbd_frontend.tls import SEND_MAX

    channel, client = await pair()
    data = RNG.randbytes(4 << 20)
    first = channel.sendmsg([data])
    assert 0 < first <= SEND_MAX
    # (the client reads the first part too: it is on its way already)
    assert await through(channel, client, [memoryview(data)[first:]], len(data)) == data + END


async def test_the_stream_wrapper_carries_the_option_haggling():
    channel, client = await pair()
    stream = TLSChannelStream(channel)
    await client.send_all(b"IHAVEOPT" * 3)
    assert await stream.receive_some(100) == b"IHAVEOPT" * 3
    await stream.send_all(b"\x00" * 100_000)
    assert await receive_exactly(client, 100_000) == b"\x00" * 100_000


def test_server_context_loads_the_pair_and_asks_for_client_certificates_with_a_ca(tmp_path):
    CERT.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    CERT.private_key_pem.write_to_path(str(tmp_path / "k.pem"))
    CA.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    assert server_context(str(tmp_path / "c.pem"), str(tmp_path / "k.pem")).verify_mode \
        == ssl.CERT_NONE
    ctx = server_context(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"), str(tmp_path / "ca.pem"))
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
