"""Defects found by a review of the replication core (fencing, takeover reconcile,
resync), each reproduced here; xfail(strict) until fixed."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from tests.sim.harness import call
from tests.unit.test_takeover_reconcile import agree_or_recorded, lone_first_write


def run(afn):
    return trio.run(afn, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.xfail(strict=True, reason="Replica.recent (the marks a takeover reconciles by) "
                   "lives in memory only: a replica restarted after its dirty mark of the "
                   "chunk was cleared by a flush forgets the dead holder's last write there")
def test_a_replica_restarted_before_the_takeover_still_names_the_dead_holders_last_write():
    """The old holder dies with its first write to chunk 1 on one replica only (never
    acknowledged). Before the client comes back through another host, that replica's
    blockd restarts: a clean stop (an upgrade: ChunkStore.close flushes with
    keep_hot=False, clearing every dirty mark), or a crash after another volume's flush
    pushed the chunk out of the hot set. Nothing is dirty, crash recovery records
    nothing, and Replica.recent (in memory only) is empty: DirtyChunks names nothing.
    The takeover that follows must still compare chunk 1, or the copies disagree with no
    record (reads answer 0xee or zeros depending on the copy asked)."""
    async def main():
        async with trio.open_nursery() as nursery:
            sim, rec, lone, new_host = await lone_first_write(nursery)
            # a clean restart: the store's close flushes every dirty mark away, then the
            # process goes (the sim's crash of a flushed store keeps every byte)
            sim.hosts[lone].store.flush()
            sim.crash(lone, declare_down=False)
            await sim.restart(lone)
            sim.sync_maps()
            sim.expire_lease("v")
            gw = await sim.hosts[new_host].provider.open_export("v")
            await call(gw.write(0, b"\x06" * 4096, False))  # takes the lease over
            agree_or_recorded(sim, rec, 1)
            nursery.cancel_scope.cancel()

    run(main)
