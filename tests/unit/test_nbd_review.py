"""Review findings on the NBD frontend (branch rev-nbd): behaviour proto.md asks for."""

from __future__ import annotations

import struct

import pytest
import trio

from nbd_frontend import proto
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
    provider = MemoryProvider()
    export = _GatedExport("disk", 1 << 20)
    export.gate = trio.Event()
    provider.exports["disk"] = export
    stopping = trio.Event()
    port = await nursery.start(
        lambda task_status: serve_nbd(provider, "127.0.0.1", 0, stopping=stopping,
                                      task_status=task_status))
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
