"""blockd's compaction of the registry's history (blockd.service.compact_registry_once):
only the controller compacts, and always to the revision it noted one period before, so
one period of history is kept for watches that lag."""

from __future__ import annotations

import trio

from blockd.service import compact_registry_once
from vbp.cluster import HOST_DOWN, HOST_UP, ClusterMap, HostRecord


class Recorder:
    def __init__(self):
        self.rev, self.compacted = 10, []

    async def revision(self) -> int:
        return self.rev

    async def compact_history(self, revision: int) -> None:
        self.compacted.append(revision)


def cmap(*hosts) -> ClusterMap:
    return ClusterMap(epoch=1, hosts=tuple(
        HostRecord(id=h, peer=f"127.0.0.1:{7000 + i}", nbd=f"127.0.0.1:{10800 + i}",
                   capacity=1, state=state) for i, (h, state) in enumerate(hosts)))


def test_the_controller_compacts_to_what_it_noted_a_period_before():
    async def main():
        reg = Recorder()
        m = cmap(("h1", HOST_UP), ("h2", HOST_UP))
        kept = await compact_registry_once(reg, m, "h1", None)
        assert kept == 10 and reg.compacted == []  # the first step only notes
        reg.rev = 25
        kept = await compact_registry_once(reg, m, "h1", kept)
        assert kept == 25 and reg.compacted == [10]
        # another host does nothing, until the lower ones are down
        assert await compact_registry_once(reg, m, "h2", 99) is None
        assert reg.compacted == [10]
        down = cmap(("h1", HOST_DOWN), ("h2", HOST_UP))
        assert await compact_registry_once(reg, down, "h2", None) == 25
        assert await compact_registry_once(reg, down, "h2", 25) == 25
        assert reg.compacted == [10, 25]

    trio.run(main)
