"""Review of the data-loss path (replicator.loss, `vbp volume accept-loss`): situations
built over the sim hosts (tests/sim/harness.py) on a virtual clock."""

from __future__ import annotations

import pytest
import trio

from control import api
from tests.sim.harness import Sim
from tests.sim.test_data_set_recovery import lose_last_copy, read4k
from tests.sim.test_data_set_sim import quiet, run  # noqa: F401 (quiet: a fixture)
from vbp.errors import VbpError
from vbp.layout import MiB


def test_accept_loss_reaches_a_chunk_only_a_snapshot_still_reads():
    """The unrecoverable chunk X of lose_last_copy (O on both copies, W missed by Q) is
    snapshotted (v@s), then v is shrunk below X: only v@s reads X, and it reads EIO.
    `vbp pool status` names v for it and `vbp volume accept-loss v --chunk X` gives it
    up: v@s then reads O, the copy kept."""
    async def main():
        sim = Sim(12, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            rec, x, p, q, gw = await lose_last_copy(sim, older=b"O" * 4096)
            assert x > 0
            sim.hosts[q].faults.heal()
            await sim.snapshot("v", "s")
            await sim.shrink("v", x * MiB)
            await trio.sleep(3.0)
            h0 = sim.hosts["h0"]
            snap = await h0.run_on(h0.provider.open_export, "v@s")
            assert isinstance(await read4k(h0, snap, x * MiB), VbpError)
            [lost] = api.unrecoverable_chunks(reg)
            assert (lost["index"], lost["volumes"]) == (x, ["v"])
            got = api.accept_loss(reg, "v", [x])
            assert [(c["index"], c["source"]) for c in got["reverted"]] == [(x, q)]
            [a] = api.accepted_losses(reg, api.get_volume(reg, "v"))
            assert a.chunks == ((x, q, True),)
            await trio.sleep(3.0)
            assert reg.list_stale(rec.lineage, x) == []
            snap2 = await h0.run_on(h0.provider.open_export, "v@s")
            assert await read4k(h0, snap2, x * MiB) == b"O" * 4096
            nursery.cancel_scope.cancel()

    run(main)


def test_a_backfill_retried_midway_records_each_volume_loss_once():
    """h1's disk is replaced and two replicas=1 volumes, a and b, had chunks placed on it.
    Recording b's loss finds the registry unreachable once, after a's was recorded: the
    backfill is retried. Each volume says once that it lost chunks with h1's disk, and
    `vbp pool status` (its `lost` list) counts the loss once per volume."""
    from tests.sim.test_data_set_recovery import replace_disk
    from vbp.errors import RegistryUnavailable

    async def main():
        sim = Sim(11, hosts=3)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            sim.create_volume("a", 64 * MiB, replicas=1)
            sim.create_volume("b", 64 * MiB, replicas=1)
            update, failed = reg.update_volume, []

            def flaky(name, fn, *args, **kwargs):
                if name == "b" and not failed:
                    failed.append(name)
                    raise RegistryUnavailable("etcd: no leader")
                return update(name, fn, *args, **kwargs)
            reg.update_volume = flaky
            with trio.move_on_after(60):
                await replace_disk(sim, "h1")
            assert failed and not sim.hosts["h1"].replica.backfilling
            assert [e[0] for e in reg.get_volume("b")["lost"]] == ["h1"]
            assert [e[0] for e in reg.get_volume("a")["lost"]] == ["h1"]
            nursery.cancel_scope.cancel()

    run(main)


def test_a_chunk_a_down_joining_target_alone_holds_is_not_given_up_when_the_change_is_cancelled():
    """joined_then_lost: X's complete copies are stale, the newest never current (P's disk
    replaced), and the joining target h3 alone holds every acknowledged byte (W, N). Then
    h3 goes down, long enough to be out of the wanted data set, which is the set being
    left again. Cancelling the change then would take h3 out of X's placement: X would
    count as unrecoverable and accept-loss would revert it to Q's older bytes while h3,
    merely down, holds W. X is not given up; once h3 is back it reads W and N."""
    from tests.sim.test_data_set_recovery import joined_then_lost, step_all
    from tests.sim.test_data_set_sim import movers
    from vbp.errors import InvalidArgument

    async def main():
        sim = Sim(11, hosts=4)
        async with trio.open_nursery() as nursery:
            await sim.start(nursery)
            reg = sim.reg
            rec, x, p, q, gw = await joined_then_lost(sim)
            assert api.unrecoverable_chunks(reg) == []
            sim.crash("h3")
            mv = movers(sim)
            await step_all(sim, mv, times=3)
            assert api.unrecoverable_chunks(reg) == []
            with pytest.raises(InvalidArgument, match="not unrecoverable"):
                api.accept_loss(reg, "v", [x])
            await sim.restart("h3")
            for _ in range(20):
                await step_all(sim, mv)
                if not reg.cluster_map().migrating and not reg.list_stale(rec.lineage, x):
                    break
            assert not reg.list_stale(rec.lineage, x)
            h0 = sim.hosts["h0"]
            gw2 = await h0.run_on(h0.provider.open_export, "v")
            assert await read4k(h0, gw2, x * MiB) == b"W" * 4096
            assert await read4k(h0, gw2, x * MiB + 4096) == b"N" * 4096
            nursery.cancel_scope.cancel()

    run(main)
