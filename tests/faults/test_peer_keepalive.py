"""A peer host or an NBD client's host cut off without a word (crashed, or its network
gone) leaves its connections open on the hosts it was connected to: only TCP keepalive
ends them. Real network namespaces (tests/faults/netns.py): the link of the namespace the
connection came from is cut, nothing is answered from there any more."""

from __future__ import annotations

import logging
import socket
import struct

import pytest
import trio

from nbd_frontend import proto
from nbd_frontend import server as nbd_server
from nbd_frontend.export import MemoryProvider
from replicator import messages as m
from replicator import transport
from replicator.codec import NEED_DATA, PeerCodec
from replicator.transport import serve_peers
from tests.faults.netns import Net

pytestmark = pytest.mark.timeout(60)

CLUSTER = "c1"


def pong(msg, peer):
    return m.Pong("srv", msg.epoch)


async def hello(net: Net, port: int):
    """A peer connection from inside host 0's namespace to the server on the bridge,
    handshaken: (stream, codec, the server's answer)."""
    sock = await trio.to_thread.run_sync(lambda: net.connect(0, port, to=net.root_addr))
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    codec = PeerCodec()
    await stream.send_all(codec.encode(0, m.Hello(CLUSTER, "h1", m.PROTO_VERSION)))
    with trio.fail_after(10):
        while (event := codec.next_event()) is NEED_DATA:
            codec.receive_data(await stream.receive_some(65536))
    return stream, codec, event[1]


async def export_name(stream, name: bytes = b"disk") -> int:
    """The shortest negotiation: greeting, NBD_OPT_EXPORT_NAME; the export's
    size."""
    got = b""
    with trio.fail_after(10):
        while len(got) < 18:  # NBDMAGIC, IHAVEOPT, handshake flags
            got += await stream.receive_some(18 - len(got))
        assert struct.unpack(">QQH", got)[:2] == (proto.NBDMAGIC, proto.IHAVEOPT)
        await stream.send_all(struct.pack(
            ">IQII", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES,
            proto.IHAVEOPT, proto.OPT_EXPORT_NAME, len(name)) + name)
        got = b""
        while len(got) < 10:  # size, transmission flags (no zeroes)
            got += await stream.receive_some(10 - len(got))
    return struct.unpack(">QH", got)[0]


async def nbd_from_namespace(nursery, net: Net, provider, send_timeout: float):
    """An NBD server on the bridge (serve_nbd, `send_timeout`) and a connection to it from
    inside host 0's namespace, negotiated: the client's stream."""
    port = await nursery.start(lambda task_status: nbd_server.serve_nbd(
        provider, net.root_addr, 0, send_timeout=send_timeout, task_status=task_status))
    sock = await trio.to_thread.run_sync(lambda: net.connect(0, port, to=net.root_addr))
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await export_name(stream)
    return stream


async def test_a_peer_cut_off_without_a_word_does_not_keep_its_place(monkeypatch, caplog):
    """Host h1's connection is cut (its link down: no FIN, no RST, nothing) while idle.
    TCP keepalive ends the session on the server, so when h1 comes back its new
    connection is taken: it had the one place its address may hold
    (CONNECTIONS_PER_ADDRESS, 1 here). Without keepalive the dead session kept the
    place for good, and h1 was refused (UNAVAILABLE) by every host it had been connected
    to when it was cut off, until they restarted."""
    monkeypatch.setattr(transport, "CONNECTIONS_PER_ADDRESS", 1)
    monkeypatch.setattr(transport, "KEEPALIVE", (1, 1, 2))
    caplog.set_level(logging.INFO)
    net = Net(1).up()
    try:
        async with trio.open_nursery() as nursery:
            # (send_timeout under keepalive's 3 s, as blockd's peer_timeout is under its
            # 60 s: the user timeout, which then rules the drop too, is keepalive's)
            port = await nursery.start(lambda task_status: serve_peers(
                pong, net.root_addr, 0, cluster=CLUSTER, host_id="srv",
                peer_rev=lambda host_id: m.PEER_REV, send_timeout=2, task_status=task_status))
            old, _, ok = await hello(net, port)
            assert type(ok) is m.HelloOk
            await trio.sleep(0.5)  # (h1's ack of it out: keepalive times an idle link)
            net.cut(0)
            await trio.sleep(6)  # keepalive: 1 s idle, then 2 probes 1 s apart, unanswered
            net.heal(0)
            stream, codec, ok = await hello(net, port)
            assert type(ok) is m.HelloOk, ok
            await stream.send_all(codec.encode(1, m.Ping(7)))
            with trio.fail_after(10):
                while (event := codec.next_event()) is NEED_DATA:
                    codec.receive_data(await stream.receive_some(65536))
            assert event == (1, m.Pong("srv", 7))
            await stream.aclose()
            await old.aclose()
            nursery.cancel_scope.cancel()
    finally:
        net.close()


async def test_an_nbd_client_cut_off_without_a_word_leaves_its_export(monkeypatch):
    """An NBD client's host is cut off (its link down) while the client is connected and
    idle: TCP keepalive ends the connection, and the export it held is closed (in
    blockd: the volume's gateway and its write lease let go). Without keepalive the
    connection, and the export, stayed open for good."""
    monkeypatch.setattr(nbd_server, "KEEPALIVE", (1, 1, 2))
    provider = MemoryProvider()
    export = provider.add("disk", 1 << 20)
    net = Net(1).up()
    try:
        async with trio.open_nursery() as nursery:
            # (a send timeout under keepalive's time: blockd's 60 s is keepalive's too)
            stream = await nbd_from_namespace(nursery, net, provider, 2)
            assert not getattr(export, "closed", False)
            await trio.sleep(0.5)  # (the client's ack of it out: keepalive times an idle link)
            net.cut(0)
            with trio.fail_after(15):  # keepalive: 1 s idle, 2 probes 1 s apart
                while not getattr(export, "closed", False):
                    await trio.sleep(0.2)
            net.heal(0)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        net.close()


async def test_an_nbd_client_cut_off_with_a_reply_unacknowledged_leaves_its_export(monkeypatch):
    """The client's host is cut off while a reply is on its way: the reply is never
    acknowledged, and keepalive probes only an idle connection, so TCP retransmitted it
    for about 15 minutes (net.ipv4.tcp_retries2) while the export -- in blockd the
    volume's write lease, which a failed-over VM's new host needs -- stayed open. With
    TCP_USER_TIMEOUT at keepalive's time (or the send timeout, if longer: 3 s here) the
    connection ends as soon."""
    monkeypatch.setattr(nbd_server, "KEEPALIVE", (1, 1, 2))
    provider = MemoryProvider()
    export = provider.add("disk", 1 << 20)
    plain_read = export.read

    async def slow_read(offset, length, *args):  # the reply leaves after the cut
        await trio.sleep(0.6)
        return plain_read(offset, length, *args)
    export.read = slow_read
    net = Net(1).up()
    try:
        async with trio.open_nursery() as nursery:
            stream = await nbd_from_namespace(nursery, net, provider, 3)
            await stream.send_all(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ,
                                              1, 0, 65536))
            await trio.sleep(0.2)  # (the request in, acknowledged; its reply not sent yet)
            net.cut(0)
            t0 = trio.current_time()
            with trio.fail_after(20):  # (without it: retransmissions for about 15 minutes)
                while not getattr(export, "closed", False):
                    await trio.sleep(0.2)
            assert trio.current_time() - t0 < 10
            net.heal(0)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    finally:
        net.close()


async def test_an_nbd_client_that_reads_nothing_for_a_while_is_not_cut_off(monkeypatch):
    """Linux counts a closed window against TCP_USER_TIMEOUT too (a live client that
    takes none of its replies, the server's probes of it answered): so the user timeout
    is never shorter than the send timeout, and a client that reads nothing for longer
    than keepalive's time but less than the send timeout keeps its connection, and gets
    every byte once it reads again. (With the user timeout at keepalive's 3 s alone it
    was reset.)"""
    monkeypatch.setattr(nbd_server, "KEEPALIVE", (1, 1, 2))  # (3 s; the send timeout 10 s)
    provider = MemoryProvider()
    export = provider.add("disk", 8 << 20)
    export.write(0, bytes(range(256)) * (32 << 10), False)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: nbd_server.serve_nbd(
            provider, "127.0.0.1", 0, send_timeout=10, task_status=task_status))
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", port))
        stream = trio.SocketStream(sock)
        await export_name(stream)
        await stream.send_all(struct.pack(">IHHQQI", proto.REQUEST_MAGIC, 0, proto.CMD_READ,
                                          1, 0, 8 << 20))
        await trio.sleep(5)  # reading nothing: the window closed, past the user timeout
        got = b""
        with trio.fail_after(20):
            while len(got) < 16 + (8 << 20):
                data = await stream.receive_some(1 << 20)
                assert data, "the server cut the connection off"
                got += data
        assert got[16:] == bytes(range(256)) * (32 << 10)
        assert not getattr(export, "closed", False)
        await stream.aclose()
        nursery.cancel_scope.cancel()
