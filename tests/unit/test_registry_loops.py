"""blockd's loops over the registry: compaction of its history (compact_registry_once):
only the controller compacts, and always to the revision it noted one period before, so
one period of history is kept for watches that lag; the heartbeat, which registers the
host again when its record is gone."""

from __future__ import annotations

import trio

from blockd.service import compact_registry_once
from vbp.cluster import HOST_DOWN, HOST_UP, ClusterMap, HostRecord


class Recorder:
    def __init__(self):
        self.rev, self.compacted, self.forgot = 10, [], []

    async def revision(self) -> int:
        return self.rev

    async def compact_history(self, revision: int) -> None:
        self.compacted.append(revision)

    async def forget_leases_of_deleted(self, older_than: float) -> int:
        self.forgot.append(older_than)
        return 0


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
        # the controller's every step forgets the lease records of deleted volumes
        assert reg.forgot == [600.0] * 4

    trio.run(main)


def test_a_heartbeat_whose_record_is_gone_and_cannot_register_again_keeps_beating():
    """The host's record is gone (`vbp host remove`, a restored etcd) and registering
    again meets an unreachable registry: the heartbeat loop logs it and tries again at
    the next beat. (The error escaped into the daemon's root nursery and stopped blockd.)"""
    from vbp.errors import NotFound, RegistryUnavailable

    tries: list = []

    class Gone:
        async def heartbeat(self, *args):
            raise NotFound("host h1 is not registered")

        async def register_host(self, *args):
            tries.append(trio.current_time())
            raise RegistryUnavailable("etcd request timed out")

    b = _beating(Gone())
    b.host_record = lambda: None
    _beat_for(b, 10)
    assert tries == [2.0, 4.0, 6.0, 8.0]  # a beat every 2 s, each one trying again


def test_a_heartbeat_whose_stats_are_too_large_keeps_beating():
    """The registry refuses stats too large for it (InvalidArgument) after refreshing the
    host's liveness: the heartbeat loop logs it and beats on; the stats do not count as
    published (the exports in them stop serving before the last published ones lapse)."""
    from vbp.errors import InvalidArgument

    beats: list = []

    class TooLarge:
        async def heartbeat(self, *args):
            beats.append(trio.current_time())
            raise InvalidArgument("stats of host h1 would take 1603000 bytes, over the limit")

    b = _beating(TooLarge())
    b._published = lambda t0, st: beats.append("published")
    _beat_for(b, 7)
    assert beats == [2.0, 4.0, 6.0]


def _beating(registry):
    """A Blockd with just what its heartbeat loop uses (host h1, heartbeat_ttl 6 s: a beat
    every 2 s) over `registry`."""
    from types import SimpleNamespace

    from blockd.service import Blockd

    b = Blockd.__new__(Blockd)
    b.cfg = SimpleNamespace(heartbeat_ttl=6.0, host_id="h1", data_dir="/")
    b.registry = registry
    b._stats_lock = trio.Lock()
    b.stats = lambda: {"used": 0}
    b.store = SimpleNamespace(stats=lambda: SimpleNamespace(capacity=1, used=0))
    b.metrics = SimpleNamespace(set_space=lambda capacity, used, disk_free=None: None)

    async def no_old_hosts():  # (the registry's hosts on the code before: none to name)
        pass

    b._warn_old_hosts = no_old_hosts
    return b


def _beat_for(b, seconds: float) -> None:
    """Run b's heartbeat loop for `seconds` of a virtual clock."""
    import trio.testing

    async def main():
        with trio.move_on_after(seconds):
            await b._heartbeat()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _stepping(steps: list):
    """A Blockd with just what its data-set loop uses: a mover whose controller step
    records when it ran, on a map that never changes by itself."""
    from types import SimpleNamespace

    from blockd.service import Blockd

    b = Blockd.__new__(Blockd)
    b._map_moved = trio.Event()
    b.cluster = SimpleNamespace(epoch=1)

    async def control_once():
        steps.append(round(trio.current_time(), 3))
        return SimpleNamespace(epoch=1)

    async def nothing():
        return False

    b.mover = SimpleNamespace(control_once=control_once, scan_once=nothing,
                              measure_misplaced=nothing)
    return b


def test_the_data_set_step_looks_at_once_when_the_map_changes():
    """A step a second, and one at once when _watch_map adopts a new map (a host
    registered or went down): a new pool's hosts joined the data set up to a second
    after the last one registered. A change during a step, or right after one, gets a
    step DATA_SET_GAP after the last began."""
    import trio.testing

    from blockd.service import DATA_SET_GAP, DATA_SET_PERIOD

    steps: list = []
    b = _stepping(steps)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b._move_data)
            await trio.sleep(0.35)
            b._map_adopted()
            await trio.sleep(0.65)  # (t = 1.0)
            b._map_adopted()
            b._map_adopted()  # (two changes, one step)
            await trio.sleep(1.05)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert DATA_SET_PERIOD == 1.0 and DATA_SET_GAP == 0.1
    assert steps == [0.0, 0.35, 1.0, 2.0], steps


def test_the_data_set_step_waits_its_gap_after_a_change_during_a_step():
    import trio.testing

    steps: list = []
    b = _stepping(steps)
    real = b.mover.control_once

    async def slow_step():
        await real()
        if len(steps) == 1:
            b._map_adopted()  # (a change while the step ran)

    b.mover.control_once = slow_step

    async def main():
        with trio.move_on_after(1.05):
            await b._move_data()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert steps == [0.0, 0.1], steps  # (the next: a period after the second)


def test_the_map_watch_waits_again_at_once_for_a_map_another_task_adopted():
    """_watch_map asks for a map newer than the one it has; when the one it gets was
    adopted meanwhile by another task (the data-set step reads the map too), it asks
    again at once. It slept 0.5 s then, and a change meanwhile (a new pool's last host
    registering) reached it, and the data-set step, that much later."""
    import threading
    import time
    from types import SimpleNamespace

    from blockd.service import Blockd

    asks: list = []
    b = Blockd.__new__(Blockd)
    b._map_moved = trio.Event()
    b.cluster = SimpleNamespace(epoch=1, set_map=lambda m: setattr(b.cluster, "epoch", m.epoch))
    got = threading.Event()

    def wait_map_change(epoch, timeout):
        asks.append((epoch, time.monotonic()))
        if len(asks) == 1:
            b.cluster.epoch = 2  # (the step adopted it while this call ran)
            return SimpleNamespace(epoch=2, hosts=())
        got.set()
        time.sleep(0.05)
        return SimpleNamespace(epoch=epoch, hosts=())

    b.registry = SimpleNamespace(sync=SimpleNamespace(wait_map_change=wait_map_change))

    async def main():
        with trio.move_on_after(0.4):
            await b._watch_map()

    trio.run(main)
    assert got.is_set() and [e for e, _ in asks[:2]] == [1, 2], asks
    assert asks[1][1] - asks[0][1] < 0.2, asks
