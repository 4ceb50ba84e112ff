"""A host comes back under its old id with an empty disk (the disk was replaced, or its data
directory lost): it must not serve its missing chunks as holes (zeros), and it must be
brought back to full copies by resync, with real blockd processes.

What DRBD does with its generation identifiers and Ceph with the OSD's fsid: the store has
an id; the registry remembers the id each host's chunks were placed on; a different id
means none of those chunks are here, whatever the (thin) map says."""

from __future__ import annotations

import shutil
import time

from tests.faults.test_replication_faults import (
    Writer, compare_replicas, connect, kill, restart, start, wait_no_stale,
)

MiB = 1024 * 1024


def test_a_host_back_with_an_empty_disk_serves_no_zeros_and_is_refilled(tmp_path):
    sb = start(tmp_path, 3)
    try:
        sb.vbp("volume", "create", "r3", "--size", "32M", "--replicas", "3", "--min-size", "2",
               "--chunk-size", "1M")
        w = Writer(24 * MiB, seed=21)
        h = connect(sb.uri("r3", 0))
        w.write(h, 300)
        h.shutdown()
        kill(sb, 1)  # host2
        time.sleep(1)
        shutil.rmtree(sb.dir / "host2" / "data")  # the disk is replaced
        restart(sb)
        # every read through the host with the new disk returns the acknowledged bytes
        h2 = connect(sb.uri("r3", 1))
        w.verify(h2)
        w.write(h2, 100)  # and it takes writes meanwhile
        w.verify(h2)
        h2.shutdown()
        log = (sb.dir / "host2" / "blockd.log").read_text()
        wait_no_stale(sb, timeout=90)
        # the new disk holds full copies again: every replica, read from the stores directly
        compare_replicas(sb, "r3", w)
        assert "event=new_disk" in log and "event=backfill_done" in log, log[-2000:]
    finally:
        sb.down()
