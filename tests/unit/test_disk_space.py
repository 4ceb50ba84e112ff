"""blockd against its disk: the free space of the data directory's filesystem is
published beside the store's capacity, and a disk with less room than the capacity
leaves is logged (event=disk_short), so an operator sees it before writes fail."""

from __future__ import annotations

import logging
import os

import trio

from blockd.config import Config
from blockd.service import SPACE_POLL, Blockd


def test_blockd_publishes_its_disks_free_space_and_says_when_it_is_short(tmp_path, caplog):
    fs = os.statvfs(tmp_path)
    free = fs.f_bavail * fs.f_frsize
    cfg = Config(host_id="h1", data_dir=str(tmp_path / "h1"),
                 registry=f"lmdb://{tmp_path / 'registry'}", listen="127.0.0.1:0",
                 nbd="127.0.0.1:0", heartbeat_ttl=1.0,
                 capacity=free + (64 << 30)).validate()  # (more than the disk holds)
    seen = {}

    async def main():
        async with trio.open_nursery() as nursery:
            b = await nursery.start(Blockd(cfg).run)
            await trio.sleep(max(4 * SPACE_POLL, 1.5))  # (a heartbeat sets the metric)
            seen.update(b.stats())
            seen["metric"] = b.metrics.disk_free._value.get()
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="vbp.blockd"):
        trio.run(main)
    now = os.statvfs(tmp_path).f_bavail * fs.f_frsize
    for got in (seen["disk_free"], seen["metric"]):
        assert abs(got - now) < (256 << 20), (got, now)  # (other work shares the disk)
    assert seen["free"] > seen["disk_free"]
    said = [r.getMessage() for r in caplog.records if "event=disk_short" in r.getMessage()]
    assert len(said) == 1 and "writes may fail with ENOSPC" in said[0], said
