"""blockd names the hosts of an embedded registry that run the code before its boot clock
(Blockd._warn_old_hosts): they read the newer hosts' liveness as run out and publish them
down, so the operator must upgrade every blockd of the machine together."""

from __future__ import annotations

import logging
import os
import signal
import time

import msgpack
import trio

import blockd.service as service
from blockd.config import Config
from vbp.registry import open_registry
from vbp.registry.base import P_ALIVE


def put_alive_the_old_way(reg, host_id: str, expires: float) -> None:
    """A liveness key as the code before the boot clock kept it: its expiry on the wall
    clock (vbp.registry.local)."""
    with reg.kv._env.begin(write=True) as t:
        t.put(P_ALIVE + host_id.encode(), msgpack.packb([b"1", 1, 1, expires], use_bin_type=True))


def test_blockd_names_the_hosts_on_the_code_before_while_they_run(tmp_path, caplog):
    cfg = Config(host_id="h1", data_dir=str(tmp_path / "h1"),
                 registry=f"lmdb://{tmp_path / 'registry'}", listen="127.0.0.1:0",
                 nbd="127.0.0.1:0", heartbeat_ttl=1.0, peer_timeout=1.0).validate()
    reg = open_registry(cfg.registry)
    put_alive_the_old_way(reg, "h8", time.time() + 3600)

    async def logged(text: str) -> None:
        with trio.fail_after(20):
            while text not in caplog.text:
                await trio.sleep(0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run_until_signal, cfg)
            await logged("event=hosts_on_the_wall_clock hosts=h8:")
            put_alive_the_old_way(reg, "h8", time.time() - 1)  # it stopped, or was upgraded
            await logged("event=hosts_on_the_wall_clock hosts=: none left")
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with caplog.at_level(logging.INFO, logger="vbp.blockd"):
            trio.run(main)
    finally:
        reg.close()
    assert caplog.text.count("event=hosts_on_the_wall_clock hosts=h8") == 1  # (once, not a beat)
    assert "event=stopped" in caplog.text
