"""A host comes back under its old id with an empty disk (the disk was replaced, or its data
directory lost): it must not serve its missing chunks as holes (zeros), and it must be
brought back to full copies by resync, with real blockd processes.

What DRBD does with its generation identifiers and Ceph with the OSD's fsid: the store has
an id; the registry remembers the id each host's chunks were placed on; a different id
means none of those chunks are here, whatever the (thin) map says."""

from __future__ import annotations

import json
import shutil
import time

from replicator.gateway import ClusterView
from vbp.registry import open_registry

from tests.faults.test_replication_faults import (
    Writer, compare_replicas, connect, kill, restart, start, wait_no_stale,
)

MiB = 1024 * 1024


def test_a_host_back_with_an_empty_disk_serves_no_zeros_and_is_refilled(tmp_path):
    sb = start(tmp_path, 3)
    try:
        sb.vbp("volume", "create", "r3", "--size", "32M", "--replicas", "3", "--min-size", "2",
               "--chunk-size", "1M")
        # replicas=1: the chunks placed on host2 have no other copy; losing them is reported
        sb.vbp("volume", "create", "one", "--size", "32M", "--replicas", "1", "--chunk-size", "1M")
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
        one = json.loads(sb.vbp("volume", "show", "one", "--json").stdout)
        with open_registry(sb.registry) as reg:
            view = ClusterView(reg.cluster_map())
        placed = sum("host2" in view.replicas(one["lineage"], i, 1) for i in range(32))
        assert placed and [x[:2] for x in one["lost"]] == [["host2", placed]], one["lost"]
        assert "event=data_lost" in log
        assert f"volume one lost up to {placed} chunks with host host2's replaced disk" in \
            sb.vbp("pool", "status").stdout
        assert json.loads(sb.vbp("volume", "show", "r3", "--json").stdout)["lost"] == []
    finally:
        sb.down()
