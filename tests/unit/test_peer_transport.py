"""The peer transport over real loopback sockets: handshake, multiplexing, faults."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import struct
from contextlib import asynccontextmanager

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator import messages as m
from replicator import transport
from replicator.codec import CLOSED, LARGE_FRAME, NEED_DATA, PeerCodec
from replicator.errors import ClusterMismatch, PeerError, PeerProtocolError
from replicator.transport import (REPLY_EARLY, SEND_EARLY, FaultPolicy, MemoryNetwork, PeerPool,
                                  serve_peers)
from tests.pieces import send_in_pieces
from vbp.errors import Fenced, NoSpace, PeerUnavailable
from vbp.sockets import plain_socket

pytestmark = pytest.mark.timeout(30)

CLUSTER = "c1"


def write(index: int, data: bytes = b"x" * 4096, version: int = 1) -> m.WriteChunk:
    return m.WriteChunk("vol", "lin", index, 1, (1,), 0, data, 4 << 20, version, False, 3, 1)


def ok_handler(msg, peer):
    if type(msg) is m.Ping:
        return m.Pong("srv", msg.epoch)
    if type(msg) is m.ReadChunk:
        return m.Data(bytes([msg.index % 256]) * msg.length, msg.index, 1)
    return m.Ok(getattr(msg, "version", 1))


@asynccontextmanager
async def server(handler=ok_handler, *, port=0, cluster=CLUSTER, host_id="srv",
                 peer_rev=lambda host_id: m.PEER_REV, **kw):
    """A running serve_peers; yields (address, cancel scope that kills it). The scope
    covers the server alone, not the body of the `async with`: a test goes on after
    killing it."""
    kill = trio.CancelScope()

    async def run(task_status):
        with kill:
            await serve_peers(handler, "127.0.0.1", port, cluster=cluster, host_id=host_id,
                              peer_rev=peer_rev, task_status=task_status, **kw)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(run)
        yield f"127.0.0.1:{bound}", kill
        kill.cancel()


async def raw_client(address: str, hello: bool = True):
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    codec = PeerCodec()
    if hello:
        await say_hello(stream, codec)
    return stream, codec


async def say_hello(stream, codec) -> m.HelloOk:
    """A raw client's handshake, as host "raw": the server's HelloOk, which names its boot."""
    await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION)))
    rid, ok = await next_reply(stream, codec)
    assert (rid, ok) == (0, m.HelloOk(CLUSTER, "srv", m.PROTO_VERSION, ok.boot)) and ok.boot
    return ok


async def next_reply(stream, codec):
    """The next event from the server, or CLOSED."""
    with trio.fail_after(5):
        while (event := codec.next_event()) is NEED_DATA:
            codec.receive_data(await stream.receive_some(65536))
        return event


async def test_handshake_names_both_hosts():
    seen = []

    def handler(msg, peer):
        seen.append(peer)
        return m.Pong("srv", msg.epoch)

    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(address, m.Ping(7)) == m.Pong("srv", 7)
            assert pool.peer_host_id(address) == "srv"
    assert seen == ["cli"]


async def test_every_connection_to_one_server_names_the_same_boot_but_a_restart_another():
    async with server() as (address, _):
        boots = set()
        for _ in range(3):
            stream, codec = await raw_client(address, hello=False)
            boots.add((await say_hello(stream, codec)).boot)
            await stream.aclose()
        assert len(boots) == 1 and len(boots.pop()) == 16
    port = int(address.rsplit(":", 1)[1])
    async with server(port=port) as (again, _):
        stream, codec = await raw_client(again, hello=False)
        assert (await say_hello(stream, codec)).boot not in ("", *boots)


async def test_a_client_of_an_older_revision_gets_the_hello_ok_it_can_decode():
    """A host below revision 6 (its registry record) would refuse a HelloOk with a field it
    does not know: it gets the old frame, byte for byte."""
    revs = {"old": m.BOOT_REV - 1, "new": m.BOOT_REV}
    async with server(peer_rev=lambda h: revs.get(h, 0)) as (address, _):
        for host, boot_sent in (("old", False), ("new", True), ("unknown", False)):
            stream, codec = await raw_client(address, hello=False)
            await stream.send_all(codec.encode(3, m.Hello(CLUSTER, host, m.PROTO_VERSION)))
            with trio.fail_after(5):
                raw = b""
                while len(raw) < 4 or len(raw) < 4 + int.from_bytes(raw[:4], "big"):
                    raw += await stream.receive_some(65536)
            ok = msgpack.unpackb(raw[4:])
            assert ok[:6] == [m.PROTO_VERSION, m.TYPE_IDS[m.HelloOk], 3, CLUSTER, "srv",
                              m.PROTO_VERSION]
            assert len(ok) == (7 if boot_sent else 6), (host, ok)
            await stream.aclose()


async def test_a_reconnection_to_the_same_process_is_not_a_new_incarnation():
    """The gateway's flush doubts a host whose incarnation changed since its writes: a
    network blip (here the pool drops the connection) must not look like a restart, or
    the flush would record needless stale copies, and fail while the registry is away."""
    async with server() as (address, kill):
        port = int(address.rsplit(":", 1)[1])
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
            assert pool.incarnation("srv") == 1
            for i in range(3):
                pool.disconnect(address)
                assert not pool.connected(address)
                assert await pool.call(address, m.Ping(2)) == m.Pong("srv", 2)
                assert pool.connected(address) and pool.incarnation("srv") == 1
            kill.cancel()
            with pytest.raises(PeerUnavailable):
                with trio.fail_after(2):
                    await pool.call(address, m.Ping(3))
            async with server(port=port) as (again, _):  # restarted: a new process
                assert await pool.call(again, m.Ping(4)) == m.Pong("srv", 4)
                assert pool.incarnation("srv") == 2


async def test_a_server_that_names_no_boot_is_a_new_incarnation_at_every_connection():
    """An older host (or one that does not know our revision yet) sends no boot id: then
    any reconnection may be a restart, and counts as one."""
    async with server(peer_rev=lambda h: m.BOOT_REV - 1) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            await pool.call(address, m.Ping(1))
            pool.disconnect(address)
            await pool.call(address, m.Ping(2))
            assert pool.incarnation("srv") == 2


async def test_wrong_cluster_is_refused_and_closed():
    called = []
    async with server(lambda msg, peer: called.append(msg)) as (address, _):
        async with PeerPool("other-cluster", "cli") as pool:
            with pytest.raises(ClusterMismatch, match="other-cluster"):
                await pool.call(address, m.Ping(1))
            assert isinstance(ClusterMismatch("x"), PeerUnavailable)
        # on the wire: an Error naming the cluster, then the server hangs up
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(codec.encode(0, m.Hello("nope", "raw", m.PROTO_VERSION)))
        rid, reply = await next_reply(stream, codec)
        assert reply.code == m.CLUSTER
        codec.receive_data(await stream.receive_some(100))
        assert codec.next_event() is CLOSED
        # and a newer protocol version is refused with its own code
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION + 1)))
        assert (await next_reply(stream, codec))[1].code == m.VERSION
    assert called == []


SECRET = b"s3cret-of-the-pool-32-bytes-long"


async def test_peers_with_the_pools_secret_authenticate_each_other():
    """With a peer secret, a client and a server prove to each other that they know it
    (HMAC of both challenges: peer authentication) before anything is served; calls then
    work as without one, on the same connection."""
    async with server(secret=SECRET) as (address, _):
        async with PeerPool(CLUSTER, "cli", secret=SECRET) as pool:
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
            assert await pool.call(address, write(1, b"x" * 70000)) == m.Ok(1)


async def test_without_the_secret_nothing_is_served(caplog):
    """A client without the secret, or with another, is refused with an `auth` Error and
    the connection closed, and none of its requests is handled: not one sent behind its
    Hello (a write with a forged fencing token, say), nor one in place of the Auth. A
    server without a secret refuses a client that has one, and a client with a secret
    refuses a server without one or with another: the configuration is made the same."""
    from replicator.errors import AuthFailed

    called = []

    def handler(msg, peer):
        called.append(msg)
        return m.Ok(1)

    async with server(handler, secret=SECRET) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            with pytest.raises(AuthFailed, match="requires peer authentication"):
                await pool.call(address, m.Ping(1))
        async with PeerPool(CLUSTER, "cli", secret=b"another-secret-of-32-bytes-long!") as pool:
            with pytest.raises(AuthFailed, match="does not have this host's peer secret"):
                await pool.call(address, m.Ping(1))
        # raw: a Hello with a challenge, then a write where the Auth should be
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION,
                                                      "00" * 16)))
        rid, ok = await next_reply(stream, codec)
        assert type(ok) is m.HelloOk and len(ok.nonce) == 32 and len(ok.proof) == 64
        await stream.send_all(codec.encode(1, write(1, b"y" * 4096)))
        assert (await next_reply(stream, codec))[1].code == m.AUTH
        assert await next_reply(stream, codec) is CLOSED
        # raw: no challenge, and requests pipelined behind the Hello
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION))
                              + codec.encode(1, write(1, b"z" * 4096)))
        assert (await next_reply(stream, codec))[1].code == m.AUTH
        assert await next_reply(stream, codec) is CLOSED
    assert called == []
    lines = [r.getMessage() for r in caplog.records if "refusing peer connection" in r.getMessage()]
    assert lines and all("127.0.0.1" in x for x in lines)
    async with server(handler) as (address, _):  # no secret here
        async with PeerPool(CLUSTER, "cli", secret=SECRET) as pool:
            with pytest.raises(AuthFailed, match="has no peer secret"):
                await pool.call(address, m.Ping(1))
    async with server(handler, secret=b"another-secret-of-32-bytes-long!") as (address, _):
        async with PeerPool(CLUSTER, "cli", secret=SECRET) as pool:
            with pytest.raises(AuthFailed):
                await pool.call(address, m.Ping(1))
    assert called == []


async def test_a_proof_that_is_not_ascii_is_refused_as_a_wrong_one(caplog):
    """hmac.compare_digest raises TypeError for a str with other than ASCII characters:
    an Auth whose proof was "é" escaped the refusal (no `auth` Error, a traceback logged
    at ERROR for each attempt, past the refusals' log limit)."""
    async with server(secret=SECRET) as (address, _):
        for _ in range(3):
            stream, codec = await raw_client(address, hello=False)
            await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION,
                                                          "00" * 16)))
            rid, ok = await next_reply(stream, codec)
            assert type(ok) is m.HelloOk
            await stream.send_all(codec.encode(1, m.Auth("\u00e9" * 64)))
            assert (await next_reply(stream, codec))[1].code == m.AUTH
            assert await next_reply(stream, codec) is CLOSED
    assert not [r for r in caplog.records if r.levelno >= 40], "a traceback, not a refusal"
    assert transport._proof_ok("ab", "ab") and not transport._proof_ok("\u00e9", "ab")
    assert not transport._proof_ok(b"ab", "ab")


async def test_a_server_that_is_not_the_host_the_address_belongs_to_is_refused():
    """The map says h2 listens at the address, and h3 answers there (h2 moved and h3 got
    its port, or a map not refreshed yet): a write counted as h2's copy would be on h3,
    and h2's copy, missing it, would be taken for current. The HelloOk names the host:
    the pool refuses the connection (PeerUnavailable, the copy fails as if down)."""
    async with server(host_id="h3") as (address, _):
        expected = {address: "h2"}
        async with PeerPool(CLUSTER, "cli", host_at=expected.get) as pool:
            with pytest.raises(PeerUnavailable, match="'h3', not 'h2'"):
                await pool.call(address, m.Ping(1))
            assert pool.incarnation("h3") == 0 and not pool.connected(address)
            expected[address] = "h3"  # the map caught up: the next call connects
            assert await pool.call(address, m.Ping(2)) == m.Pong("srv", 2)
            assert pool.peer_host_id(address) == "h3"
            expected.clear()  # an address the map does not know (a tool's): no check
            pool.disconnect(address)
            assert await pool.call(address, m.Ping(3)) == m.Pong("srv", 3)


def test_the_cluster_view_names_the_host_at_an_address_unless_two_share_it():
    from replicator.gateway import ClusterView
    from vbp.cluster import ClusterMap, HostRecord

    view = ClusterView(ClusterMap(1, (HostRecord("h1", "a:1", "a:9", pod="p1"),
                                      HostRecord("h2", "b:1", "b:9", pod="p2"),
                                      HostRecord("h3", "b:1", "b:9", pod="p3"))))
    assert view.host_at("a:1") == "h1"
    assert view.host_at("b:1") is None and view.host_at("c:1") is None
    view.set_map(ClusterMap(2, (HostRecord("h2", "a:1", "a:9", pod="p2"),)))
    assert view.host_at("a:1") == "h2" and view.host_at("b:1") is None


async def test_request_before_hello_is_refused():
    async with server() as (address, _):
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(codec.encode(5, m.Ping(1)))
        rid, reply = await next_reply(stream, codec)
        assert reply.code == m.INVALID and "Hello" in reply.message
        assert await next_reply(stream, codec) is CLOSED


async def test_200_concurrent_calls_out_of_order_each_get_their_reply():
    arrivals, completions = [], []

    async def slow_read(msg, peer):
        arrivals.append(msg.index)
        await trio.sleep(random.random() * 0.05)
        completions.append(msg.index)
        return m.Data(msg.index.to_bytes(4, "big") * (msg.length // 4), msg.index, 1)

    results = {}
    async with server(slow_read) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:

            async def one(i):
                read = m.ReadChunk("vol", "lin", i, (1,), 0, 4 * (i % 7 + 1), 3)
                results[i] = await pool.call(address, read)

            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon(one, i)
            assert len(pool._conns) == 1  # all multiplexed on one connection
    assert sorted(arrivals) == list(range(200))
    assert completions != arrivals  # replies really went out of order
    for i, reply in results.items():
        assert reply == m.Data(i.to_bytes(4, "big") * (i % 7 + 1), i, 1)


async def test_handler_exceptions_become_mapped_exceptions_and_connection_survives():
    async def async_fenced(msg, peer):
        await trio.sleep(0)
        raise Fenced(f"token {msg.token} is older than 9")

    def handler(msg, peer):
        if type(msg) is m.WriteChunk:
            return async_fenced(msg, peer)
        if type(msg) is m.Flush:
            raise NoSpace("disk full on srv")
        if type(msg) is m.ZeroChunk:
            return 1 / 0
        return m.Pong("srv", msg.epoch)

    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            with pytest.raises(Fenced, match="token 1 is older than 9"):
                await pool.call(address, write(1))
            with pytest.raises(NoSpace, match="disk full"):
                await pool.call(address, m.Flush("vol", 3, 1))
            with pytest.raises(PeerError, match="ZeroDivisionError"):
                await pool.call(address, m.ZeroChunk("v", "l", 1, 1, (1,), 0, 1, 1 << 22, 1,
                                                     False, 1, 1))
            conn = pool._conns[address]
            assert await pool.call(address, m.Ping(2)) == m.Pong("srv", 2)
            assert pool._conns[address] is conn  # same connection all along


async def test_bad_reply_from_handler_is_an_internal_error():
    async with server(lambda msg, peer: m.Ok("not an int")) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            with pytest.raises(PeerError, match="bad reply"):
                await pool.call(address, m.Flush("v", 1, 1))
            with pytest.raises(PeerError):
                await pool.call(address, m.Flush("v", 1, 1))


async def test_server_killed_mid_flight_fails_callers_promptly_then_reconnects():
    started = []

    async def hang(msg, peer):
        started.append(msg)
        await trio.sleep_forever()

    failures = []
    async with server(hang) as (address, kill):
        port = int(address.rsplit(":", 1)[1])
        async with PeerPool(CLUSTER, "cli", request_timeout=20) as pool:

            async def one(i):
                with pytest.raises(PeerUnavailable) as info:
                    await pool.call(address, write(i))
                failures.append((trio.current_time(), info.value))

            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(one, i)
                while len(started) < 10:
                    await trio.sleep(0.01)
                killed_at = trio.current_time()
                kill.cancel()
            assert len(failures) == 10
            assert max(t for t, _ in failures) - killed_at < 1.0

            assert pool.incarnation("srv") == 1  # the killed server's connection
            assert not pool.connected(address)
            with pytest.raises(PeerUnavailable):  # nothing listens now: refused at once
                with trio.fail_after(2):
                    await pool.call(address, m.Ping(1))
            assert pool.incarnation("srv") == 1  # no handshake: not a new one
            async with server(port=port) as (again, _):
                assert again == address
                assert await pool.call(address, m.Ping(4)) == m.Pong("srv", 4)
                assert await pool.call(address, m.Ping(5)) == m.Pong("srv", 5)
                assert pool.incarnation("srv") == 2 and pool.connected(address)
                assert pool.incarnation("other") == 0


async def test_connection_refused_is_peer_unavailable():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # a port nobody listens on
    async with PeerPool(CLUSTER, "cli") as pool:
        with trio.fail_after(2):
            with pytest.raises(PeerUnavailable):
                await pool.call(f"127.0.0.1:{port}", m.Ping(1))


async def test_oversized_frame_closes_that_connection_only():
    async with server(max_frame=1 << 20) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
            stream, codec = await raw_client(address)
            await stream.send_all(struct.pack(">I", 2**31))  # a 2 GiB frame, never sent
            rid, reply = await next_reply(stream, codec)
            assert reply.code == m.INVALID and "outside" in reply.message
            assert await next_reply(stream, codec) is CLOSED
            # garbage that is not msgpack at all: same fate
            stream, codec = await raw_client(address)
            await stream.send_all(b"\x00\x00\x00\x02\xc1\xc1")
            assert (await next_reply(stream, codec))[1].code == m.INVALID
            assert await next_reply(stream, codec) is CLOSED
            # the pooled connection and new ones are unaffected
            assert await pool.call(address, m.Ping(2)) == m.Pong("srv", 2)
            stream, codec = await raw_client(address)
            await stream.send_all(codec.encode(8, m.Ping(3)))
            assert await next_reply(stream, codec) == (8, m.Pong("srv", 3))


async def test_a_large_frame_before_the_hello_is_refused_without_a_buffer_for_it():
    """Before its Hello is checked, a peer may send frames of HELLO_MAX_FRAME at most: a
    stranger declaring a 32 MiB frame gets no 32 MiB buffer held for the handshake
    timeout, but the refusal at once. After the Hello the full size applies."""
    async with server() as (address, _):
        stream, codec = await raw_client(address, hello=False)
        await stream.send_all(struct.pack(">I", 32 << 20) + b"\x00")
        rid, reply = await next_reply(stream, codec)
        assert reply.code == m.INVALID and "outside" in reply.message
        assert await next_reply(stream, codec) is CLOSED
        stream, codec = await raw_client(address)
        encoded = codec.encode(5, write(1, b"y" * (8 << 20)))
        await stream.send_all(encoded if type(encoded) is bytes else b"".join(encoded))
        assert await next_reply(stream, codec) == (5, m.Ok(1))


async def test_connections_that_never_say_hello_hold_no_receive_buffer():
    """A connection that has sent nothing (a port scan, a half-open flood) is kept for the
    handshake timeout; its memory until its Hello is checked must stay small, or a few
    thousand of them take gigabytes (a 256 KiB receive buffer each)."""
    import gc
    import tracemalloc

    n = 100
    async with server() as (address, _):
        host, port = address.rsplit(":", 1)
        await (await raw_client(address))[0].aclose()  # the server warmed up
        await trio.sleep(0.1)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            socks = [socket.create_connection((host, int(port))) for _ in range(n)]
            await trio.sleep(0.5)  # every one accepted, its session waiting for a Hello
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        for s in socks:
            s.close()
        assert grown / n < 64 * 1024, f"{grown / n:.0f} bytes per silent connection"
        stream, codec = await raw_client(address)  # a real peer still gets served
        await stream.send_all(codec.encode(3, m.Ping(4)))
        assert await next_reply(stream, codec) == (3, m.Pong("srv", 4))


async def test_connections_that_fail_let_go_of_their_buffers_at_once():
    """A peer that breaks its connections, with most of a large frame sent each time or
    garbage before its Hello, must not leave their buffers behind until the cycle
    collector happens to run (rarely: blockd.memory): the failure kept by the codec and
    the session held the frame that raised it, and so the session, its receive buffer and
    the frame's buffer. Measured with the cycle collector off."""
    import gc
    import tracemalloc

    from replicator.transport import _ServerSession

    def sessions() -> int:
        return sum(type(o) is _ServerSession for o in gc.get_objects())

    n = 20
    async with server() as (address, _):
        await (await raw_client(address))[0].aclose()  # the server warmed up
        await trio.sleep(0.1)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(n):
                stream, codec = await raw_client(address, hello=i % 2 == 0)
                if i % 2 == 0:  # an 8 MiB frame, 1 MiB of it, then the end
                    await stream.send_all(struct.pack(">I", 8 << 20) + b"\x9f" + bytes(1 << 20))
                else:  # garbage before any Hello
                    await stream.send_all(b"\x00\x00\x00\x02\xc1\xc1")
                await stream.aclose()
            with trio.move_on_after(5):
                while sessions():
                    await trio.sleep(0.05)
            left = sessions()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
        assert left == 0, f"{left} of {n} failed sessions still held"
        assert grown / n < 64 * 1024, f"{grown / n:.0f} bytes left per failed connection"


async def test_lines_about_failed_connections_are_limited_per_address(caplog):
    """Whoever reaches the peer port can make connections that fail as fast as it likes:
    a few lines a period tell of them (vbp.loglimit), not one each."""
    from vbp.loglimit import BURST

    async with server() as (address, _):
        for _ in range(3 * BURST):
            stream, codec = await raw_client(address, hello=False)
            await stream.send_all(b"\x00\x00\x00\x00")  # a frame of length 0
            assert (await next_reply(stream, codec))[1].code == m.INVALID
            await stream.aclose()
        lines = [r.getMessage() for r in caplog.records if "closing connection" in r.getMessage()]
        assert len(lines) == BURST, lines
        assert lines[0].startswith("closing connection from 127.0.0.1 (host ? says): frame length 0")
        stream, codec = await raw_client(address)  # a real peer still gets served
        await stream.send_all(codec.encode(3, m.Ping(4)))
        assert await next_reply(stream, codec) == (3, m.Pong("srv", 4))


async def test_a_failed_connection_leaves_its_reader_no_waiter_to_answer():
    """fail() answers every pending call with PeerUnavailable and empties the dict the
    reader looks replies up in: a reply the reader decodes before its cancellation
    reaches it (woken in the same batch) finds no waiter, instead of answering a call
    a second time."""
    gate = trio.Event()

    async def held(msg, peer):
        await gate.wait()
        return m.Ok(1)

    async with server(held) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            results = []

            async def gathered():
                results.append(await pool.call_all([address], write(1)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(gathered)
                with trio.fail_after(5):
                    while not (conn := pool._conns.get(address)) or not conn.pending:
                        await trio.sleep(0.01)
                seen_by_reader = conn.pending
                conn.fail("test")
                assert seen_by_reader == {}
            assert isinstance(results[0][0], PeerUnavailable)
            gate.set()


@asynccontextmanager
async def reads_unread(calls: list, n: int, length: int):
    """A server noting in `calls` the chunk index of each ReadChunk it handles, and a raw
    client that sent it `n` of `length` bytes each at once and reads no reply yet:
    yields (its stream, its codec, n)."""
    def handler(msg, peer):
        calls.append(msg.index)
        return ok_handler(msg, peer)

    async with server(handler) as (address, _):
        stream, codec = await raw_client(address)
        read = m.ReadChunk("vol", "lin", 0, (1,), 0, length, 3)
        await stream.send_all(b"".join(codec.encode(i + 1, dataclasses.replace(read, index=i))
                                       for i in range(n)))
        yield stream, codec, n


async def test_a_peer_that_does_not_read_its_replies_is_pushed_back(monkeypatch):
    """Replies given at once (ReadChunk) are not requests in flight: a peer that sends
    many and reads none made the server queue every reply. Past MAX_REPLY_BACKLOG bytes
    unsent the server reads no more requests until they are sent; once the peer reads,
    every request is answered."""
    monkeypatch.setattr(transport, "MAX_REPLY_BACKLOG", 4 << 20)
    calls = []
    async with reads_unread(calls, 400, 1 << 20) as (stream, codec, n):
        with trio.fail_after(5):
            while len(calls) < 4:
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        assert len(calls) < 100  # (the bound, plus what the sockets' buffers hold)
        got = set()
        with trio.fail_after(20):
            while len(got) < n:
                rid, reply = await next_reply(stream, codec)
                assert reply.data == bytes([(rid - 1) % 256]) * (1 << 20)
                got.add(rid)
        assert len(calls) == n


async def test_large_replies_are_pushed_back_from_the_first_past_the_backlog(monkeypatch):
    """The backlog was looked at only every REPLY_EARLY replies (a large one is two
    buffers): 16 MiB reads asked by a peer that reads nothing queued four of them, 64 MiB,
    past a backlog of 4 MiB, before the server stopped reading. Now the first reply past
    it stops the reading."""
    monkeypatch.setattr(transport, "MAX_REPLY_BACKLOG", 4 << 20)
    calls = []
    async with reads_unread(calls, 8, 16 << 20) as (stream, codec, n):
        with trio.fail_after(5):
            while not calls:
                await trio.sleep(0.01)
        await trio.sleep(0.3)
        assert len(calls) == 1, calls
        got = set()
        with trio.fail_after(30):
            while len(got) < n:
                rid, reply = await next_reply(stream, codec)
                assert len(reply.data) == 16 << 20
                got.add(rid)
        assert len(calls) == n


async def test_a_peer_that_never_reads_its_replies_is_disconnected(monkeypatch):
    """Pushed back (above), a peer that reads none of its replies still held the server's
    backlog (MAX_REPLY_BACKLOG, and the send under way) for as long as it liked. Past
    send_timeout without taking a byte its connection is closed, the backlog with it,
    and the server reads none of its requests any more; another peer is served
    throughout."""
    monkeypatch.setattr(transport, "MAX_REPLY_BACKLOG", 4 << 20)
    calls = []

    def handler(msg, peer):
        if type(msg) is m.ReadChunk:
            calls.append(msg.index)
        return ok_handler(msg, peer)

    async with server(handler, send_timeout=0.5) as (address, _):
        stream, codec = await raw_client(address)
        n = 400
        read = m.ReadChunk("vol", "lin", 0, (1,), 0, 1 << 20, 3)
        await stream.send_all(b"".join(codec.encode(i + 1, dataclasses.replace(read, index=i))
                                       for i in range(n)))
        other, other_codec = await raw_client(address)
        for i in range(3):
            await trio.sleep(0.4)
            await other.send_all(other_codec.encode(7, m.Ping(i)))
            assert await next_reply(other, other_codec) == (7, m.Pong("srv", i))
        taken = len(calls)
        assert taken < 100
        got = 0
        with trio.fail_after(5):  # what was sent before the close, then the end
            with contextlib.suppress(trio.BrokenResourceError, PeerProtocolError):
                while await next_reply(stream, codec) is not CLOSED:
                    got += 1
        assert got < 100 and len(calls) == taken
        await stream.aclose()
        await other.aclose()


async def test_connections_past_the_hello_from_one_address_are_capped(monkeypatch, caplog):
    """Whatever passes the Hello (a peer of the cluster, or anything knowing its name)
    could open connections without bound, each with its receive buffer and its backlog.
    Past CONNECTIONS_PER_ADDRESS from one address the Hello is refused (UNAVAILABLE, one
    warning) and the connection closed; once one of them closes, a new one is taken."""
    monkeypatch.setattr(transport, "CONNECTIONS_PER_ADDRESS", 4)
    async with server() as (address, _):
        held = [await raw_client(address) for _ in range(4)]
        refusals = []
        for _ in range(3):
            stream, codec = await raw_client(address, hello=False)
            await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION)))
            refusals.append(await next_reply(stream, codec))
            assert await next_reply(stream, codec) is CLOSED
            await stream.aclose()
        assert [(rid, type(r), r.code) for rid, r in refusals] == [(0, m.Error, m.UNAVAILABLE)] * 3
        assert len([r for r in caplog.records if "refusing peer connections" in r.message]) == 1
        stream, codec = held.pop()  # the others are still served
        await stream.send_all(codec.encode(3, m.Ping(4)))
        assert await next_reply(stream, codec) == (3, m.Pong("srv", 4))
        await stream.aclose()
        with trio.fail_after(5):  # (once the server saw that one end)
            while True:
                stream, codec = await raw_client(address, hello=False)
                await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION)))
                if type((await next_reply(stream, codec))[1]) is m.HelloOk:
                    break
                await stream.aclose()
        await stream.send_all(codec.encode(5, m.Ping(6)))
        assert await next_reply(stream, codec) == (5, m.Pong("srv", 6))
        for s, _ in [*held, (stream, codec)]:
            await s.aclose()


async def test_large_payloads_roundtrip():
    stored = {}

    def handler(msg, peer):
        if type(msg) is m.WriteChunk:
            stored[msg.index] = msg.data
            return m.Ok(msg.version)
        return m.Data(stored[msg.index], 1, 1)

    payloads = [random.randbytes(n) for n in (1 << 20, 3 << 20, 100, 70000)]
    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            async with trio.open_nursery() as nursery:
                for i, data in enumerate(payloads):
                    nursery.start_soon(pool.call, address, write(i, data))
            for i, data in enumerate(payloads):
                read = m.ReadChunk("vol", "lin", i, (1,), 0, len(data), 3)
                assert (await pool.call(address, read)).data == data


async def test_server_bounds_requests_in_flight_per_connection():
    running = 0
    most = 0
    release = trio.Event()

    async def handler(msg, peer):
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return m.Ok(msg.version)

    async with server(handler, max_in_flight=4) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(pool.call, address, write(i))
                with trio.fail_after(10):  # (a loaded machine takes its time to get there)
                    while most < 4:
                        await trio.sleep(0.01)
                await trio.sleep(0.3)  # time for a fifth to start, were the bound not kept
                assert most == 4
                release.set()
    assert most == 4 and running == 0


async def test_timeout_is_per_call_and_keeps_a_live_connection():
    async def handler(msg, peer):
        if type(msg) is m.Flush:
            await trio.sleep(10)
        return m.Pong("srv", msg.epoch)

    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
            conn = pool._conns[address]
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                async def pings():  # the peer answers other requests meanwhile
                    while True:
                        await pool.call(address, m.Ping(2))
                        await trio.sleep(0.02)

                nursery.start_soon(pings)
                with pytest.raises(PeerUnavailable, match="in time"):
                    await pool.call(address, m.Flush("v", 1, 1), timeout=0.3)
                nursery.cancel_scope.cancel()
            assert trio.current_time() - start < 1
            assert pool._conns[address] is conn
            assert await pool.call(address, m.Ping(5)) == m.Pong("srv", 5)


async def test_a_silent_peer_loses_its_connection():
    async def handler(msg, peer):
        if type(msg) is m.Flush:
            await trio.sleep(10)
        return m.Pong("srv", msg.epoch)

    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
            conn = pool._conns[address]
            with pytest.raises(PeerUnavailable, match="in time"):
                await pool.call(address, m.Flush("v", 1, 1), timeout=0.2)
            assert conn.dead and address not in pool._conns
            assert await pool.call(address, m.Ping(5)) == m.Pong("srv", 5)  # reconnects


async def test_a_connection_given_up_on_handles_nothing_after_the_peer_connected_again():
    """The server's reader waits for room (max_in_flight) behind a sync that stalls, a
    write received and not handled behind it. The gateway hears nothing for a whole
    request timeout, drops the connection, reconnects and writes the same page again,
    which is applied at once. The first connection, once its sync ended, applied the
    older write over the newer: a copy differing from the others, once its stale record
    (the timed-out write's) is cleared. (Found by a review.)"""
    release = trio.Event()
    applied = []

    def handler(msg, peer):
        if type(msg) is m.Flush:
            async def stalled():
                await release.wait()
                return m.Ok(0)
            return stalled()
        if type(msg) is m.Ping:
            return m.Pong("srv", msg.epoch)
        applied.append(msg.data)
        return m.Ok(1)

    async with server(handler, max_in_flight=1) as (address, _):
        async with PeerPool(CLUSTER, "gw", request_timeout=0.3) as pool:
            async with trio.open_nursery() as nursery:
                async def given_up(msg):
                    with pytest.raises(PeerUnavailable):
                        await pool.call(address, msg)

                nursery.start_soon(given_up, m.Flush("vol", 3, 1))
                await trio.sleep(0.05)
                nursery.start_soon(given_up, write(0, b"old!" * 1024))
            assert applied == []  # (held behind the stalled sync, then given up on)
            assert await pool.call(address, write(0, b"new!" * 1024)) == m.Ok(1)
            release.set()
            await trio.sleep(0.3)
            assert await pool.call(address, m.Ping(1)) == m.Pong("srv", 1)
    assert applied == [b"new!" * 1024]


async def test_a_call_that_waited_for_room_does_not_make_a_live_peer_silent():
    """Past max_in_flight a call waits for room before it is sent. A peer that answers
    steadily but slower than the calls come can leave a call too little of its timeout
    once it is sent: it times out, but the peer was not silent for a whole timeout (it
    answered during it), so its connection stays, and the other calls on it go on."""
    async def slow(msg, peer):
        await trio.sleep(0.15)
        return m.Pong("srv", msg.epoch)

    async with server(slow) as (address, _):
        async with PeerPool(CLUSTER, "cli", request_timeout=0.5, max_in_flight=2) as pool:
            assert await pool.call(address, m.Ping(0)) == m.Pong("srv", 0)
            conn = pool._conns[address]
            failures = []

            async def one(i):
                try:
                    assert await pool.call(address, m.Ping(i)) == m.Pong("srv", i)
                except PeerUnavailable as exc:
                    failures.append(str(exc))

            async with trio.open_nursery() as nursery:
                for i in range(1, 11):
                    nursery.start_soon(one, i)
            assert failures and all("in time" in f for f in failures), failures
            assert pool._conns.get(address) is conn and not conn.dead


@asynccontextmanager
async def slow_reader(nbytes: int, every: float):
    """A peer that takes at most `nbytes` of requests every `every` seconds (a small
    receive buffer, so TCP pushes back at once) and answers each one it reads: replies
    keep coming, late, while its socket stays full. Yields its address."""
    listener = trio.socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()

    async def one(sock):
        codec = PeerCodec()
        with sock:
            try:
                while data := await sock.recv(nbytes):
                    codec.receive_data(data)
                    while (event := codec.next_event()) is not NEED_DATA:
                        rid, msg = event
                        reply = (m.HelloOk(CLUSTER, "srv", m.PROTO_VERSION, "b")
                                 if type(msg) is m.Hello else m.Ok(1))
                        await sock.send(codec.encode(rid, reply))
                    await trio.sleep(every)
            except OSError:
                pass

    async with trio.open_nursery() as nursery:
        async def accept():
            while True:
                nursery.start_soon(one, (await listener.accept())[0])

        nursery.start_soon(accept)
        yield "127.0.0.1:%d" % listener.getsockname()[1]
        nursery.cancel_scope.cancel()
    listener.close()


async def test_frames_of_timed_out_calls_do_not_pile_up_behind_a_peer_that_reads_slowly():
    """A peer that answers (late) but takes our frames slower than they come: calls time
    out and free their room for more, and their frames, still unsent, stayed queued
    on the link: its backlog grew without bound (and the peer got writes long after
    their callers gave up). A call whose frame did not even leave within its timeout
    shows a peer that is not reading: the connection is dropped, its queue with it."""
    size = 64 * 1024
    async with slow_reader(size, 0.05) as address:
        async with PeerPool(CLUSTER, "cli", request_timeout=0.2, max_in_flight=16) as pool:
            async def caller():
                while True:
                    with contextlib.suppress(PeerUnavailable):
                        await pool.call(address, write(1, b"y" * size))

            most = 0
            async with trio.open_nursery() as nursery:
                for _ in range(32):
                    nursery.start_soon(caller)
                for _ in range(60):
                    await trio.sleep(0.05)
                    conn = pool._conns.get(address)
                    if conn is not None and conn.link is not None:
                        most = max(most, conn.link.out_bytes)
                nursery.cancel_scope.cancel()
    assert most <= 4 * 16 * size, f"{most >> 20} MiB queued on one link"


async def test_fault_policy_partition_drop_delay():
    faults = FaultPolicy(seed=1)
    async with server(host_id="srv") as (a, _), server(host_id="srv") as (b, _):
        async with PeerPool(CLUSTER, "cli", faults=faults) as pool:
            assert await pool.call(a, m.Ping(1)) == m.Pong("srv", 1)
            faults.partition([a])
            with trio.fail_after(0.5):
                with pytest.raises(PeerUnavailable, match="partitioned"):
                    await pool.call(a, m.Ping(1))
            assert await pool.call(b, m.Ping(2)) == m.Pong("srv", 2)
            faults.heal()
            assert await pool.call(a, m.Ping(3)) == m.Pong("srv", 3)

            faults.drop_probability = 1.0
            start = trio.current_time()
            with pytest.raises(PeerUnavailable):
                await pool.call(a, m.Ping(4), timeout=0.2)
            assert 0.15 < trio.current_time() - start < 1
            faults.drop_probability = 0.0

            faults.delay = 0.2
            start = trio.current_time()
            assert await pool.call(b, m.Ping(5)) == m.Pong("srv", 5)
            assert trio.current_time() - start >= 0.2


async def test_pool_close_fails_pending_calls():
    async def hang(msg, peer):
        await trio.sleep_forever()

    async with server(hang) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            async def one():
                with pytest.raises(PeerUnavailable):
                    await pool.call(address, m.Ping(1))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
                await trio.sleep(0.2)
                pool.disconnect(address)


async def test_pool_exceptions_are_not_wrapped_in_groups():
    with pytest.raises(Fenced):
        async with PeerPool(CLUSTER, "cli"):
            raise Fenced("plain")


async def test_call_many_and_run_under_a_nursery():
    async with server() as (address, _), trio.open_nursery() as nursery:
        pool = await nursery.start(PeerPool(CLUSTER, "cli").run)
        dead = "127.0.0.1:1"  # nothing listens on port 1
        results = await pool.call_many([(address, m.Ping(1)), (dead, m.Ping(2)),
                                        (address, m.Flush("v", 1, 1))])
        assert results[0] == m.Pong("srv", 1)
        assert isinstance(results[1], PeerUnavailable)
        assert results[2] == m.Ok(1)
        nursery.cancel_scope.cancel()


async def test_wildcard_host_with_port_zero_serves_on_the_started_port():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_peers(
            ok_handler, "", 0, cluster=CLUSTER, host_id="srv", task_status=task_status))
        async with PeerPool(CLUSTER, "cli") as pool:
            assert await pool.call(f"127.0.0.1:{port}", m.Ping(1)) == m.Pong("srv", 1)
        nursery.cancel_scope.cancel()


# --- the same behaviour from the in-memory network (CONVENTIONS 7) --------------------------


class RealNet:
    def __init__(self, nursery):
        self.nursery = nursery
        self.scopes = {}

    async def start(self, handler, *, cluster=CLUSTER, host_id="srv"):
        scope = trio.CancelScope()

        async def run(task_status):
            with scope:
                await serve_peers(handler, "127.0.0.1", 0, cluster=cluster, host_id=host_id,
                                  task_status=task_status)

        port = await self.nursery.start(run)
        address = f"127.0.0.1:{port}"
        self.scopes[address] = scope
        return address

    def kill(self, address):
        self.scopes.pop(address).cancel()

    def pool(self, cluster=CLUSTER, **kw):
        return PeerPool(cluster, "cli", **kw)


class MemNet:
    def __init__(self):
        self.net = MemoryNetwork()
        self.n = 0

    async def start(self, handler, *, cluster=CLUSTER, host_id="srv"):
        self.n += 1
        address = f"mem{self.n}:1"
        self.net.serve(address, handler, cluster=cluster, host_id=host_id)
        return address

    def kill(self, address):
        self.net.stop(address)

    def pool(self, cluster=CLUSTER, **kw):
        return self.net.pool(cluster, "cli", **kw)


@pytest.fixture(params=["real", "memory"])
async def net(request, nursery):
    yield RealNet(nursery) if request.param == "real" else MemNet()
    nursery.cancel_scope.cancel()


async def test_both_nets_map_errors_and_refuse_other_clusters(net):
    async def handler(msg, peer):
        await trio.sleep(0)
        if type(msg) is m.Flush:
            raise Fenced(f"{peer} holds token {msg.token}, not the newest")
        if type(msg) is m.ZeroChunk:
            return m.Ok("bad")
        return m.Pong("srv", msg.epoch)

    address = await net.start(handler)
    async with net.pool() as pool:
        assert await pool.call(address, m.Ping(3)) == m.Pong("srv", 3)
        with pytest.raises(Fenced, match="cli holds token 4"):
            await pool.call(address, m.Flush("v", 1, 4))
        with pytest.raises(PeerError, match="bad reply"):
            await pool.call(address, m.ZeroChunk("v", "l", 1, 1, (1,), 0, 1, 1 << 22, 1,
                                                 False, 1, 1))
        with pytest.raises(TypeError):  # never leaves the caller
            await pool.call(address, m.Ping("3"))
    async with net.pool(cluster="elsewhere") as pool:
        with pytest.raises(ClusterMismatch):
            await pool.call(address, m.Ping(1))


async def test_both_nets_fail_in_flight_calls_when_a_host_dies(net):
    entered = trio.Event()

    async def hang(msg, peer):
        entered.set()
        await trio.sleep_forever()

    address = await net.start(hang)
    async with net.pool(request_timeout=10) as pool:
        async with trio.open_nursery() as nursery:
            async def doomed():
                with pytest.raises(PeerUnavailable):
                    await pool.call(address, m.Ping(1))

            nursery.start_soon(doomed)
            await entered.wait()
            assert pool.incarnation("srv") == 1 and pool.connected(address)  # (the gateway's flush)
            with trio.fail_after(2):
                net.kill(address)
                with pytest.raises(PeerUnavailable):
                    await pool.call(address, m.Ping(2))
        assert not pool.connected(address)  # the host that answered is gone


async def test_both_nets_obey_the_fault_policy(net):
    faults = FaultPolicy()
    address = await net.start(ok_handler)
    async with net.pool(faults=faults) as pool:
        faults.partition([address])
        with pytest.raises(PeerUnavailable, match="partitioned"):
            await pool.call(address, m.Ping(1))
        faults.heal([address])
        faults.drop_probability = 1.0
        with pytest.raises(PeerUnavailable, match="in time"):
            await pool.call(address, m.Ping(1), timeout=0.1)
        faults.drop_probability = 0.0
        assert await pool.call(address, m.Ping(2)) == m.Pong("srv", 2)


async def test_requests_pipelined_behind_the_hello_are_served():
    async with server() as (address, _):
        host, port = address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        codec = PeerCodec()
        await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "raw", m.PROTO_VERSION))
                              + codec.encode(1, m.Ping(1)) + codec.encode(2, m.Ping(2)))
        replies = [await next_reply(stream, codec) for _ in range(3)]
        assert [rid for rid, _ in replies] == [0, 1, 2]
        assert replies[2][1] == m.Pong("srv", 2)


async def test_frame_over_the_servers_limit_fails_the_call_with_the_reason():
    async with server(max_frame=1 << 20) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            with pytest.raises(PeerUnavailable, match="closed by the peer: invalid.*outside"):
                await pool.call(address, write(1, b"z" * (2 << 20)))
            assert await pool.call(address, write(2)) == m.Ok(1)  # a new connection


async def test_handler_runs_with_the_request_id_of_the_message():
    """The server handles a message, and logs its failure, as its request (vbp.reqid)."""
    import logging

    from blockd.logs import KVFormatter
    from vbp import reqid

    seen = []
    lines = []

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    async def later(msg):
        await trio.sleep(0)
        seen.append(("async", reqid.current.get()))
        return m.Ok(1)

    def handler(msg, peer):
        seen.append((type(msg).__name__, reqid.current.get()))
        if type(msg) is m.ZeroChunk:
            return later(msg)
        if msg.volume == "boom":
            raise ZeroDivisionError("bug")
        return m.Ok(1)

    capture = Lines()
    capture.setFormatter(KVFormatter("srv"))
    logger = logging.getLogger("vbp.replicator.transport")
    logger.addHandler(capture)
    try:
        async with server(handler) as (address, _):
            async with PeerPool(CLUSTER, "cli") as pool:
                await pool.call(address, write(1))
                await pool.call(address, m.Flush("vol", 3, 1, "h2-00000a-5"))
                await pool.call(address, m.ZeroChunk("v", "l", 1, 1, (1,), 0, 1, 1 << 22, 1,
                                                     False, 1, 1, "h2-00000a-6"))
                with pytest.raises(PeerError):
                    await pool.call(address, m.Flush("boom", 3, 1, "h2-00000a-7"))
                await pool.call(address, m.Flush("vol", 3, 1))
    finally:
        logger.removeHandler(capture)
    assert seen == [("WriteChunk", ""), ("Flush", "h2-00000a-5"), ("ZeroChunk", "h2-00000a-6"),
                    ("async", "h2-00000a-6"), ("Flush", "h2-00000a-7"), ("Flush", "")]
    failed = [line for line in lines if "request from cli failed" in line]
    assert len(failed) == 1 and " rid=h2-00000a-7 " in failed[0]

async def test_both_nets_call_all_gathers_every_reply_and_failure_in_order(net):
    seen = []

    async def handler(msg, peer):
        seen.append(msg)
        if type(msg) is m.WriteChunk and msg.token < 1:
            raise Fenced("token 1 is newer")
        return m.Ok(msg.version)

    faults = FaultPolicy()
    a = await net.start(handler)
    b = await net.start(handler)
    c = await net.start(handler)
    dead = await net.start(handler)
    net.kill(dead)
    big = write(3, bytes(range(256)) * 256, version=9)  # 64 KiB: a split frame
    async with net.pool(faults=faults) as pool:
        results = await pool.call_all([a, dead, b, c], big)
        assert results[0] == results[2] == results[3] == m.Ok(9)
        assert isinstance(results[1], PeerUnavailable)
        assert seen == [big] * 3  # the one encoding decodes to the same message everywhere
        results = await pool.call_all([a, b], dataclasses.replace(big, token=0))
        assert all(isinstance(r, Fenced) for r in results)
        faults.partition([b])
        faults.drop_probability = 0.0
        results = await pool.call_all([a, b], write(4), timeout=0.5)
        assert results[0] == m.Ok(1) and isinstance(results[1], PeerUnavailable)
        faults.heal()
        faults.drop_probability = 1.0
        with trio.fail_after(2):
            results = await pool.call_all([a, c], write(5), timeout=0.2)
        assert all(isinstance(r, PeerUnavailable) for r in results)
        faults.drop_probability = 0.0
        assert await pool.call_all([], write(6)) == []
        with pytest.raises(TypeError):  # never leaves the caller
            await pool.call_all([a], m.Ping("3"))


async def test_call_all_timeout_and_cancel_leave_nothing_pending():
    async def slow(msg, peer):
        if msg.index == 1:
            await trio.sleep(10)
        return m.Ok(msg.version)

    async with server(slow) as (a, _), server() as (b, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            await pool.call_all([a, b], write(0))  # connected
            with trio.fail_after(2):
                results = await pool.call_all([a, b], write(1), timeout=0.3)
            assert isinstance(results[0], PeerUnavailable) and results[1] == m.Ok(1)
            with trio.move_on_after(0.1):
                await pool.call_all([a, b], write(1))
            assert not any(conn.pending for conn in pool._conns.values())
            assert await pool.call_all([a, b], write(2)) == [m.Ok(1), m.Ok(1)]


async def test_large_frame_trickled_in_then_small_frames_are_served_at_once():
    """The rest of a large frame is received once the kernel holds all of it (SO_RCVLOWAT):
    a frame arriving in slow pieces still arrives whole, the mark goes back down for the
    small frames after it (a Ping behind it is answered, not left waiting for more bytes),
    and a connection closed inside a large frame ends without a hang."""
    got = []

    def handler(msg, peer):
        if type(msg) is m.WriteChunk:
            got.append(bytes(msg.data))
            return m.Ok(msg.version)
        return ok_handler(msg, peer)

    data = random.randbytes(2 << 20)
    async with server(handler) as (address, _):
        stream, codec = await raw_client(address)
        frame = b"".join(codec.encode(1, write(0, data)))
        step = len(frame) // 8 + 1
        for i in range(0, len(frame), step):
            await stream.send_all(frame[i:i + step])
            await trio.sleep(0.1 if i == 3 * step else 0.02)  # once longer than LOWAT_WAIT
        assert await next_reply(stream, codec) == (1, m.Ok(1))
        assert got == [data]
        for rid in range(2, 5):
            await stream.send_all(codec.encode(rid, m.Ping(rid)))
            assert await next_reply(stream, codec) == (rid, m.Pong("srv", rid))
        await stream.send_all(frame[: len(frame) // 2])
        await stream.send_eof()
        rid, error = await next_reply(stream, codec)
        assert rid == 0 and "closed inside a frame" in error.message
        assert await next_reply(stream, codec) is CLOSED


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.sampled_from([0, 1, 4096, 70_000, 300_000, 1 << 20]), min_size=1, max_size=6),
       cuts=st.lists(st.integers(1, 400_000), min_size=1, max_size=30),
       seed=st.integers(0, 2**32 - 1))
async def test_frames_in_any_pieces_arrive_whole_over_a_real_socket(sizes, cuts, seed):
    """Small and large frames (the large ones received straight into their own buffer,
    with SO_RCVLOWAT raised for their rest) sent as one byte stream cut anywhere, with the
    sender pausing between pieces: every payload arrives intact and in order, and every
    request gets its reply. The `prepare` hook sees each batch of several frames whole,
    before any frame of it is handled."""
    rng = random.Random(seed)
    payloads = [rng.randbytes(n) for n in sizes]
    got = []
    batches = []

    def handler(msg, peer):
        got.append(bytes(msg.data))
        return m.Ok(msg.version)

    def prepare(batch):
        assert len(batch) > 1
        indexes = [msg.index for _, msg in batch]
        assert indexes == list(range(indexes[0], indexes[0] + len(batch)))
        assert len(got) == indexes[0], "a frame of the batch was handled before prepare"
        assert [rid for rid, _ in batch] == [i + 1 for i in indexes]
        assert [bytes(msg.data) for _, msg in batch] == payloads[indexes[0]:indexes[-1] + 1]
        batches.append(indexes)

    async with server(handler, prepare=prepare) as (address, _):
        stream, codec = await raw_client(address)
        frames = [codec.encode(i + 1, write(i, p)) for i, p in enumerate(payloads)]
        wire = b"".join(f if isinstance(f, bytes) else b"".join(f) for f in frames)
        await send_in_pieces(stream.send_all, wire, cuts)
        replies = [await next_reply(stream, codec) for _ in payloads]
        await stream.aclose()
    assert replies == [(i + 1, m.Ok(1)) for i in range(len(payloads))]
    assert got == payloads


async def test_waiting_for_the_rest_of_a_payload_is_bounded():
    """wait_for_rest returns once the kernel holds the bytes due, or after LOWAT_WAIT with
    the mark back at 1 (a sender that stalls, a window that never opens that far)."""
    from vbp.sockets import LOWAT_WAIT, wait_for_rest

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = trio.socket.socket()
    await client.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    with listener, client, server_sock:
        await client.send(b"x" * 10_000)
        t0 = trio.current_time()
        assert await wait_for_rest(server_sock, 1, 100_000) == 1  # only 10 kB came: mark reset
        assert trio.current_time() - t0 >= LOWAT_WAIT
        await client.send(b"y" * 100_000)
        with trio.fail_after(5):
            assert await wait_for_rest(server_sock, 1, 100_000) == 100_000  # all there


async def _replies_of(pool, addresses, message) -> list:
    """pool.queue_all, waited for by the test (the callback sets an event)."""
    got: list = []
    done = trio.Event()

    def on_replies(results):
        got.append(results)
        done.set()

    pool.queue_all(addresses, message, on_replies)
    with trio.fail_after(5):
        await done.wait()
    assert len(got) == 1
    return got[0]


async def test_queue_all_calls_back_with_every_reply_or_failure_in_order():
    async def handler(msg, peer):
        if msg.index == 1:
            await trio.sleep(10)
        if msg.token < 1:
            raise Fenced("token 1 is newer")
        return m.Ok(msg.version)

    async with server(handler) as (a, _), server(handler) as (b, kill_b):
        async with PeerPool(CLUSTER, "cli", request_timeout=0.3) as pool:
            assert not pool.ready([a, b])  # nothing connected yet: call_all connects
            await pool.call_all([a, b], write(0))
            assert pool.ready([a, b])
            big = write(3, bytes(range(256)) * 256, version=9)  # a split frame
            assert await _replies_of(pool, [a, b], big) == [m.Ok(9), m.Ok(9)]
            # an idle connection sends at once; one with a call in flight queues for its
            # writer: both arrive
            first, second = [], []
            pool.queue_all([a, b], write(4, version=4), first.append)
            assert pool._conns[a].pending  # in flight: the next frame takes the queue
            pool.queue_all([a, b], write(5, version=5), second.append)
            with trio.fail_after(5):
                while not (first and second):
                    await trio.sleep(0.01)
            assert first == [[m.Ok(4), m.Ok(4)]] and second == [[m.Ok(5), m.Ok(5)]]
            results = await _replies_of(pool, [a, b], dataclasses.replace(big, token=0))
            assert all(isinstance(r, Fenced) for r in results)
            # a peer that does not answer in time: PeerUnavailable from the sweeper
            results = await _replies_of(pool, [a, b], write(1))
            assert all(isinstance(r, PeerUnavailable) for r in results)
            assert not any(conn.pending for conn in pool._conns.values())
            # a peer that dies with the request in flight fails it at once
            got: list = []
            pool.queue_all([a, b], write(1), got.append)
            await trio.sleep(0.05)
            kill_b.cancel()
            with trio.fail_after(2):
                while not got:
                    await trio.sleep(0.01)
            assert isinstance(got[0][1], PeerUnavailable)
            # a peer whose connection is not ready is refused through the callback, at once
            assert not pool.ready([a, b])
            got = []
            pool.queue_all([a, b], write(2), got.append)
            assert len(got) == 1 and all(isinstance(r, PeerUnavailable) for r in got[0])


async def test_a_call_queued_by_a_timed_out_calls_callback_times_out_too():
    """The sweeper fails an overdue call; that call's callback queues another (a retry):
    the new call's deadline is kept, and it times out in its turn rather than never."""
    async def handler(msg, peer):
        if msg.index == 1:
            await trio.sleep(30)
        return m.Ok(msg.version)

    async with server(handler) as (a, _):
        async with PeerPool(CLUSTER, "cli", request_timeout=0.3) as pool:
            await pool.call_all([a], write(0))
            retried: list = []

            def first(results):
                assert isinstance(results[0], PeerUnavailable)
                pool.queue_all([a], write(1), retried.append)

            pool.queue_all([a], write(1), first)
            await trio.sleep(0.1)
            await pool.call_all([a], write(0))  # the peer answers others: not a hung one
            with trio.fail_after(3):
                while not retried:
                    await trio.sleep(0.01)
            assert isinstance(retried[0][0], PeerUnavailable)


async def test_queue_all_is_not_ready_under_a_fault_policy_or_without_room():
    async with server() as (a, _):
        async with PeerPool(CLUSTER, "cli", faults=FaultPolicy()) as pool:
            await pool.call(a, m.Ping(1))
            assert not pool.ready([a])  # every call must see the policy: call_all does
        async with PeerPool(CLUSTER, "cli", max_in_flight=2) as pool:
            await pool.call(a, m.Ping(1))
            assert pool.ready([a])
            conn = pool._conns[a]
            conn.pending[1000] = conn.pending[1001] = (None, 0, 0, 0, 0)  # two parked calls
            assert not pool.ready([a])
            conn.pending.clear()


async def test_a_batch_of_pipelined_frames_is_answered_in_full():
    """Replies to frames that arrive together wait for the reader's push after the batch
    (not the writer task): every one of them must still leave."""
    frames = 50
    async with server() as (address, _):
        stream, codec = await raw_client(address)
        batch = b"".join(codec.encode(i + 1, m.Ping(i)) for i in range(frames))
        await stream.send_all(batch)
        seen = []
        with trio.fail_after(5):
            while len(seen) < frames:
                event = await next_reply(stream, codec)
                seen.append(event)
        assert sorted(rid for rid, _ in seen) == list(range(1, frames + 1))
        assert all(reply == m.Pong("srv", rid - 1) for rid, reply in seen)
        await stream.aclose()


def _frames_waiting(sock: socket.socket) -> int:
    """How many whole frames the kernel holds for `sock`, unread (without reading them)."""
    try:
        data = sock.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return 0
    codec = PeerCodec()
    codec.receive_data(data)
    n = 0
    while type(codec.next_event()) is tuple:
        n += 1
    return n


async def test_a_long_batch_of_replies_starts_leaving_before_its_end():
    """A server pushes replies every REPLY_EARLY requests of a batch, so the client starts
    on them while the server goes on (pipelining): seen from inside the handler, while the
    server is still dispatching the batch, the first replies are already at the client."""
    frames = 4 * REPLY_EARLY
    seen_at: dict[int, int] = {}
    client: list = []

    def handler(msg, peer):
        if type(msg) is m.Ping and msg.epoch >= 0:
            seen_at[msg.epoch] = _frames_waiting(client[0])
        return ok_handler(msg, peer)

    async with server(handler) as (address, _):
        stream, codec = await raw_client(address)
        client.append(plain_socket(stream.socket))
        await stream.send_all(b"".join(codec.encode(i + 1, m.Ping(i)) for i in range(frames)))
        got = [await next_reply(stream, codec) for _ in range(frames)]
        assert sorted(rid for rid, _ in got) == list(range(1, frames + 1))
        assert len(seen_at) == frames  # one batch: every request was handled in this test
        assert seen_at[0] == 0
        assert seen_at[frames - 1] >= frames - 1 - REPLY_EARLY  # sent before the batch ended
        await stream.aclose()


async def test_a_long_batch_of_requests_starts_leaving_before_its_end():
    """queue_all on a busy link sends what waits once SEND_EARLY buffers are queued, rather
    than at the writer's next turn after the whole batch: the peer starts on it."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    with listener:
        async with PeerPool(CLUSTER, "cli", request_timeout=5) as pool, \
                trio.open_nursery() as nursery:
            nursery.start_soon(pool.call, address, m.Ping(1))  # connects; left unanswered
            peer, _ = await listener.accept()
            with peer:
                codec = PeerCodec()
                with trio.fail_after(5):
                    while (hello := codec.next_event()) is NEED_DATA:
                        codec.receive_data(await peer.recv(65536))
                    await peer.send(codec.encode(hello[0], m.HelloOk(CLUSTER, "srv",
                                                                     m.PROTO_VERSION)))
                    while not pool.ready([address]) or not pool._conns[address].pending:
                        await trio.sleep(0.01)
                    await trio.sleep(0.05)  # the Ping is out
                raw = plain_socket(peer)
                assert _frames_waiting(raw) == 1
                batch = 3 * SEND_EARLY
                for i in range(batch):  # one batch: no checkpoint in between
                    pool.queue_all([address], write(i, b"x" * 64), lambda results: None)
                waiting = _frames_waiting(raw) - 1
                assert waiting >= batch - SEND_EARLY, waiting
                nursery.cancel_scope.cancel()


# --- review of the peer protocol (rev-peer) --------------------------------------------------


async def test_a_declared_frame_length_gets_no_buffer_before_its_bytes_come():
    """Past its Hello, a peer declares a 48 MiB frame, sends 10 bytes of it, and stalls.
    The server's memory for that connection must follow what arrived, not the claim."""
    import gc
    import tracemalloc

    async with server() as (address, _):
        stream, codec = await raw_client(address)
        await stream.send_all(codec.encode(1, m.Ping(1)))  # the session past its Hello,
        assert await next_reply(stream, codec) == (1, m.Pong("srv", 1))  # warmed up
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            await stream.send_all(struct.pack(">I", 48 << 20) + b"\x9f\x01\x0c" + b"\x00" * 7)
            await trio.sleep(0.3)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        await stream.aclose()
    assert grown < 4 << 20, f"{grown >> 20} MiB held for 10 bytes received"


async def test_a_handler_failing_every_request_does_not_log_a_traceback_per_request(caplog):
    """A replica's disk that fails (EIO on every write) fails each request with an
    unexpected error: an error line with a traceback per request was thousands of lines
    a second from a busy gateway. The first few are logged, then the rest of a period
    are counted."""
    import errno
    import logging

    def handler(msg, peer):
        raise OSError(errno.EIO, "Input/output error")

    caplog.set_level(logging.INFO, logger="vbp.replicator.transport")
    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            for i in range(300):
                with pytest.raises(PeerError, match="Input/output error"):
                    await pool.call(address, write(i))
    lines = [r for r in caplog.records if "request from cli failed" in r.getMessage()]
    assert lines and lines[0].exc_info
    assert len(lines) <= 20, len(lines)


async def test_a_second_failure_is_logged_while_a_first_one_repeats(caplog):
    """A replica's disk fails every write (EIO, a line per request, limited), and then one
    request meets another unexpected failure (here the disk full): its line is the only
    one that names it. Limited under the same key as the flood (the peer), it was counted
    among the flood's left-out lines (suppressed=N) and never logged: as long as the
    flood fills every period's first lines, the second failure never shows."""
    import errno
    import logging

    def handler(msg, peer):
        if type(msg) is m.WriteChunk and msg.index == 150:
            raise OSError(errno.ENOSPC, "No space left on device")
        raise OSError(errno.EIO, "Input/output error")

    caplog.set_level(logging.INFO, logger="vbp.replicator.transport")
    async with server(handler) as (address, _):
        async with PeerPool(CLUSTER, "cli") as pool:
            for i in range(300):
                with pytest.raises(PeerError):
                    await pool.call(address, write(i))
    lines = [r for r in caplog.records if "request from cli failed" in r.getMessage()]
    assert len(lines) <= 20, len(lines)
    assert any(r.exc_info and isinstance(r.exc_info[1], OSError)
               and r.exc_info[1].errno == errno.ENOSPC for r in lines), \
        "the disk-full failure was never logged"


async def test_the_frames_behind_a_large_one_come_with_its_rest_in_one_receive():
    """A large frame's rest is received together with the start of what follows it (one
    recvmsg_into into the frame's buffer and the head of the receive buffer): the frame
    behind it is decoded with no receive more, and both are whole."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    link = transport._Link(await listeners[0].accept(), 1 << 22, recv_size=4096)
    codec = PeerCodec()
    data = random.randbytes(LARGE_FRAME + 5000)  # (a large frame; all of it fits the socket)
    frame = codec.encode(1, write(0, data))
    wire = (frame if isinstance(frame, bytes) else b"".join(frame)) + codec.encode(2, m.Ping(2))
    await client.send_all(wire)
    with trio.fail_after(5):
        while plain_socket(link.sock).recv(len(wire), socket.MSG_PEEK | socket.MSG_DONTWAIT) \
                != wire:  # (all of it in the server's socket)
            await trio.sleep(0.01)
        receives = 0
        while (ev := link.codec.next_event()) is NEED_DATA:
            assert await link.receive()
            receives += 1
    assert ev[0] == 1 and bytes(ev[1].data) == data
    assert link.codec.next_event() == (2, m.Ping(2))
    assert receives == 2  # the first 4 KiB, then the rest with the Ping behind it
    await client.aclose()
    await link.stream.aclose()
    await listeners[0].aclose()
