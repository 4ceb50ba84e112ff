"""Review findings on the NBD frontend (branch rev-nbd): behaviour proto.md asks for."""

from __future__ import annotations

import struct

import pytest
import trio

from nbd_frontend import proto
from nbd_frontend.export import MemoryProvider
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
