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
