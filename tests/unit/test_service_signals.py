"""blockd.service.run_until_signal with a stand-in for Blockd, in this process: the signals
that come while blockd stops are read, not left pending for trio to raise again once its
receiver closes (to the default handlers, in blockd: a SIGHUP or a second SIGTERM killed
the process that had just stopped cleanly). Handlers of this test stand in for the
default ones, so a signal raised again is seen, not fatal. And a stop that comes while a
real Blockd starts, its NBD frontend listening already, drains what that frontend took."""

from __future__ import annotations

import logging
import os
import signal

import trio

import blockd.service as service
from blockd.config import Config
from control import api
from nbd_frontend import proto
from tests.unit.test_nbd_server import Client
from vbp.registry import open_registry

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StandIn:
    """What run_until_signal uses of Blockd: a start, a drain, the stop budget."""

    serving = True
    drained = 0

    def __init__(self, cfg) -> None:
        pass

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        await trio.sleep_forever()

    def stop_budget(self) -> float:
        return 5.0

    async def drain(self, timeout: float) -> None:
        type(self).drained += 1
        # an operator's second SIGTERM, a closing terminal's SIGHUP, while it drains
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        await trio.sleep(0.3)


def test_signals_during_the_stop_are_read_and_not_raised_again(monkeypatch, caplog):
    raised: list[int] = []
    before = {s: signal.signal(s, lambda n, _f: raised.append(n)) for s in STOP_SIGNALS}
    try:
        monkeypatch.setattr(service, "Blockd", StandIn)
        monkeypatch.setattr(service, "freeze_startup_objects", lambda: None)

        async def main() -> None:
            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(service.run_until_signal, None)
                    await trio.sleep(0.2)  # (started)
                    os.kill(os.getpid(), signal.SIGTERM)

        with caplog.at_level(logging.INFO, logger="vbp.blockd"):
            trio.run(main)
        assert StandIn.drained == 1
        assert raised == [], [signal.Signals(n).name for n in raised]
        assert "signal=SIGTERM: already stopping" in caplog.text
        assert "signal=SIGHUP: ignored" in caplog.text
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


class HeldStart(service.Blockd):
    """Blockd whose start waits, its NBD frontend listening already and its host
    registered, at its first publication of its stats (a slow registry round trip) until
    the stop cancels it: `listening` is set then."""

    listening: trio.Event

    async def publish_stats(self, *args, **kwargs):
        if not self.listening.is_set():
            self.listening.set()
            await trio.sleep_forever()
        return await super().publish_stats(*args, **kwargs)


def test_a_stop_during_the_start_drains_what_the_listening_nbd_frontend_took(
        tmp_path, monkeypatch, caplog):
    """SIGTERM while blockd's start is past opening the NBD listener: a client connected
    meanwhile, opened its export and has a write in flight (held back by the volume's
    IOPS limit). The stop drains: the write is answered and the connection then ends,
    blockd stops cleanly. Cancelling the start instead dropped the connection with the
    write unanswered."""
    cfg = Config(host_id="h1", data_dir=str(tmp_path / "h1"),
                 registry=f"lmdb://{tmp_path / 'registry'}", listen="127.0.0.1:0",
                 nbd="127.0.0.1:0", heartbeat_ttl=1.0, peer_timeout=1.0).validate()
    with open_registry(cfg.registry) as reg:
        api.create_volume(reg, "v", 8 << 20, replicas=1, chunk_size="1M")
        api.set_limits(reg, "v", iops=1)  # (one write a second)
    made: list[HeldStart] = []

    def held_start(cfg):
        made.append(HeldStart(cfg))
        return made[-1]

    monkeypatch.setattr(service, "Blockd", held_start)
    got: dict = {}

    async def main() -> None:
        HeldStart.listening = trio.Event()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.run_until_signal, cfg)
                await HeldStart.listening.wait()
                c = await Client.connect(made[0].nbd_port, "v")
                assert await c.write(0, b"\x01" * 4096, cookie=1) == 0
                await c.request(proto.CMD_WRITE, 4096, 4096, b"\x02" * 4096, cookie=2)
                os.kill(os.getpid(), signal.SIGTERM)
                try:
                    got["reply"] = (await c.reply())[:2]
                    got["after"] = await c.stream.receive_some(1)  # (b"": the server closed)
                except (EOFError, trio.BrokenResourceError) as e:
                    got["reply"] = e
                await c.aclose()

    with caplog.at_level(logging.INFO, logger="vbp.blockd"):
        trio.run(main)
    assert got["reply"] == (2, 0), got
    assert got["after"] == b""
    assert "event=signal signal=SIGTERM: stopping the start" in caplog.text
    assert "nothing served yet" not in caplog.text
    assert "event=stopped" in caplog.text
