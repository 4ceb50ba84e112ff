"""Scrub (replicator/scrub.py) in the seeded whole-cluster simulation: every host runs
passes back to back while clients write through faults (tests/sim/workload.py), pages of
single copies rot now and then, and the end checks hold as without it: scrub never undoes
an acknowledged write, nor records a current copy stale that resync would then revert.
`SIM_SEED=<n>` replays one seed."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from replicator.gateway import WRITE_GRACE
from replicator.scrub import Scrubber
from tests.sim.harness import HostDown, deterministic_scheduling
from tests.sim.test_replication_sim import ALL_FAULTS, NO_TAKEOVER, report
from tests.sim.workload import Config, Run, seeds
from vbp.errors import VbpError


class ScrubRun(Run):
    def __init__(self, seed: int, cfg: Config, rot: bool):
        super().__init__(seed, cfg)
        self.rot = rot
        self.out.stats.update(passes=0, repaired=0, errors=0, missing=0)

    async def faults(self) -> None:
        async with trio.open_nursery() as nursery:
            for h in self.sim.hosts.values():
                nursery.start_soon(self.scrub_loop, h)
            if self.rot:
                nursery.start_soon(self.rot_loop)
            await super().faults()
            await trio.sleep_forever()

    async def heal_and_converge(self) -> None:
        """Then one more pass on every host: rot that came late is repaired too."""
        await super().heal_and_converge()
        if self.rot:
            for _ in range(60):  # (one page at least, whatever the seed did before)
                if self.rot_one():
                    break
                await trio.sleep(1)
            else:
                raise AssertionError("no copy to rot a page of: the pool never got healthy")
            for h in self.sim.hosts.values():
                await self.scrub_once(h)

    async def scrub_loop(self, h) -> None:
        while True:
            await trio.sleep(self.sim.rng.uniform(0.2, 1.0))
            if h.up:
                await self.scrub_once(h)

    async def scrub_once(self, h) -> None:
        s = Scrubber(h.id, h.replica, h.cluster, h.pool, h.registry,
                     settle=self.sim.peer_timeout + WRITE_GRACE)
        try:
            r = await h.run_on(s.run_pass)
        except (VbpError, HostDown):
            return
        st = self.out.stats
        st["passes"] += 1
        st["repaired"] += r.repaired
        st["errors"] += r.error_pages
        st["missing"] += r.missing

    async def rot_loop(self) -> None:
        """A page of one copy rots now and then, while every copy is current."""
        while True:
            await trio.sleep(self.sim.rng.uniform(1, 4))
            self.rot_one()

    def rot_one(self) -> bool:
        """Rot one written page of one copy, if every copy is current now."""
        sim = self.sim
        if not self.healthy():
            return False
        h = sim.rng.choice(list(sim.hosts.values()))
        keys = [k for k in h.store.keys() if h.store.info(k) is not None]
        if not keys:
            return False
        k = sim.rng.choice(sorted(keys))
        sums = h.store.page_checksums(k)[1]
        written = [p for p, s in enumerate(sums) if s]
        if not written:
            return False
        page = sim.rng.choice(written)
        h.store.corrupt(k, page)
        self.out.log.append(f"t={trio.current_time():.2f} rot {h.id} {tuple(k)} page {page}")
        return True


def run_scrub_seed(seed: int, cfg: Config, rot: bool = False):
    run = ScrubRun(seed, cfg, rot)
    deterministic_scheduling(seed)
    return trio.run(run.main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("vbp").setLevel(logging.CRITICAL)
    yield
    logging.getLogger("vbp").setLevel(logging.NOTSET)


@pytest.mark.parametrize("seed", seeds([0, 1, 2, 3]))
def test_scrub_while_clients_write_through_faults(seed):
    out = run_scrub_seed(seed, Config(faults=NO_TAKEOVER))
    assert not out.violations and not out.divergent_unknown, report(out)
    assert out.stats["passes"] > 0


@pytest.mark.parametrize("seed", seeds([18, 21, 37, 49]))
def test_scrub_repairs_rot_while_clients_write_through_faults_and_takeovers(seed):
    run = ScrubRun(seed, Config(faults=ALL_FAULTS, ops=120), rot=True)
    deterministic_scheduling(seed)
    out = trio.run(run.main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert not out.violations, report(out)
    assert out.stats["repaired"] > 0  # (a page rots before the last pass, at least)
    # whatever rotted was repaired by the end (by scrub, or by a read that met it first)
    for h in run.sim.hosts.values():
        for k in sorted(h.store.keys()):
            if h.store.info(k) is not None and not h.replica.is_stale(k.lineage, k.index):
                assert not h.store.verify(k), (h.id, tuple(k), report(out))
