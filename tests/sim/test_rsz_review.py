"""Review (rev-rsz): resizes against live gateways. Sim hosts with their background loops
on, on a virtual clock."""

from __future__ import annotations

import pytest
import trio

from tests.sim.harness import Sim, call, extents_bytes, run
from vbp.errors import PastEnd, RegistryUnavailable
from vbp.layout import MiB


class AnswersLost:
    """A host's registry whose leased volume updates commit and lose their answer
    (etcd: an unknown outcome) until `until` (virtual time); then they answer again."""

    def __init__(self, registry, until: float):
        self.registry = registry
        self.until = until
        self.lost = 0

    def __getattr__(self, name):
        return getattr(self.registry, name)

    async def update_volume(self, name, fn, lease=None):
        out = await self.registry.update_volume(name, fn, lease)
        if lease is not None and trio.current_time() < self.until:
            self.lost += 1
            raise RegistryUnavailable("kv/txn failed with an unknown outcome")
        return out


@pytest.mark.parametrize("local", [True, False], ids=["local-copy", "remote-copies"])
def test_a_shrink_returned_while_its_completion_answer_is_lost_never_reads_the_cut_range(local):
    """hw holds v's lease and wrote "A" into chunk 1. `vbp volume resize --force v 1M`:
    hw completes the shrink; the registry commits it and the answer is lost (asked again
    every COMPLETE_RETRY while the registry stays flaky, here for 3 s). The command sees
    the new record and returns; GC on the other hosts frees chunk 1's old generation
    (past the end for every reader of the record; the holder is not published). hw's
    client then reads chunk 1: hw served it by the old view (its size, its chain) until
    the completion's answer came: its own copy's old bytes, or zeros from its peers.
    Requests past the new size are now refused from the start of the completion
    (switch_head's cut_to); reads within it go on meanwhile."""
    async def main():
        sim = Sim(19, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            rec = sim.create_volume("v", 2 * MiB, replicas=2)
            h0 = sim.hosts["h0"]
            holders = h0.cluster.replicas(rec.lineage, 1, 2)
            hw = next(h for i, h in sim.hosts.items() if (i in holders) == local)
            w = await hw.run_on(hw.provider.open_export, "v")
            await hw.run_on(lambda: call(w.write(MiB, b"A" * 4096, False)))
            reg = hw.registry = AnswersLost(hw.registry, trio.current_time() + 3.0)
            shrunk = await sim.shrink("v", MiB)  # returns once the record shows it
            assert shrunk.size == MiB and reg.lost
            for h in sim.hosts.values():
                if h is not hw:
                    await h.collect_garbage()
            assert not w.fenced and trio.current_time() < reg.until
            assert extents_bytes(await hw.run_on(lambda: call(w.read(0, 4096))), 0, 4096) == bytes(4096)
            with pytest.raises(PastEnd):
                await hw.run_on(lambda: call(w.read(MiB, 4096)))
            # (refused at once: the record read shows the shrink, committed; it waited
            # for the completion's answer, by record syncs, before: _unless_grown)
            assert trio.current_time() < reg.until
            assert w.size == MiB and not w.fenced
            await trio.sleep_until(reg.until + 1.0)  # the completion's answer came
            with pytest.raises(PastEnd):
                await hw.run_on(lambda: call(w.read(MiB, 4096)))
            assert w.size == MiB and not w.fenced
            nursery.cancel_scope.cancel()

    run(main)
