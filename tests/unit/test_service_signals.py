"""blockd.service.run_until_signal with a stand-in for Blockd, in this process: the signals
that come while blockd stops are read, not left pending for trio to raise again once its
receiver closes (to the default handlers, in blockd: a SIGHUP or a second SIGTERM killed
the process that had just stopped cleanly). Handlers of this test stand in for the
default ones, so a signal raised again is seen, not fatal."""

from __future__ import annotations

import logging
import os
import signal

import trio

import blockd.service as service

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
