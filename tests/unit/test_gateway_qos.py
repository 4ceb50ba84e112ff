"""The gateway's side of per-volume QoS (VolumeGateway._throttled, blockd.service.set_qos):
a request waiting for its turn under the volume's limits waits what is left of its turn
under the limits set meanwhile. Virtual time (MockClock), a replicas=1 volume on a real
ChunkStore."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from blockd.qos import VolumeQos
from blockd.service import set_qos
from tests.unit.test_gateway_local_writes import one_host
from vbp.layout import KiB

pytestmark = pytest.mark.timeout(60)


def run(main):
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def done_at(result) -> float:
    """Await a throttled request's coroutine; the trio time it completed at."""
    assert hasattr(result, "__await__")
    await result
    return trio.current_time()


def ends_of(nursery, result) -> list:
    """A list that gets the trio time `result` (a gateway answer) is done at, awaited in
    a task of `nursery`."""
    ends: list = []

    async def wait():
        ends.append(await done_at(result))

    nursery.start_soon(wait)
    return ends


def test_a_limit_lifted_before_the_waiting_task_starts_releases_it(tmp_path):
    """The NBD server runs a throttled request's coroutine in a task of its own, which
    takes its first step some time after the request was booked. A limit lifted in
    between (the record sync runs in another task) releases it as one lifted later
    does, rather than leaving it to wait out the 1023 s booked for a 1 MiB write at
    1 KiB/s."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        rec = dataclasses.replace(gw.view.volume, qos_iops=0, qos_bps=KiB)
        with store:
            set_qos(gw, rec)
            t0 = trio.current_time()
            result = gw.write(0, b"\x01" * (1024 * KiB), False)
            set_qos(gw, dataclasses.replace(rec, qos_bps=0))  # lifted
            assert gw.qos is None
            assert await done_at(result) - t0 < 1

    run(main)


def test_a_limit_lifted_while_waiting_releases_the_request(tmp_path):
    """(As the case above, lifted once the request waits: it passes at once.)"""
    async def main():
        store, replica, gw = one_host(tmp_path)
        rec = dataclasses.replace(gw.view.volume, qos_iops=0, qos_bps=KiB)
        with store:
            set_qos(gw, rec)
            t0 = trio.current_time()
            result = gw.write(0, b"\x01" * (1024 * KiB), False)
            async with trio.open_nursery() as nursery:
                ends = ends_of(nursery, result)
                await trio.sleep(5)
                set_qos(gw, dataclasses.replace(rec, qos_bps=0))
            assert ends[0] - t0 == pytest.approx(5, abs=0.01)

    run(main)


def test_lowering_the_iops_limit_does_not_stretch_a_bandwidth_wait(tmp_path):
    """A 64 KiB write at 1 KiB/s waits 63 s for its bytes; the volume's IOPS limit, far
    from binding, is lowered from 1000 to 1 meanwhile. The write still passes about when
    its bytes have come in (the IOPS bucket has room for it at once): not 1000 times
    later, after writes booked behind it."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        rec = dataclasses.replace(gw.view.volume, qos_iops=1000, qos_bps=KiB)
        with store:
            set_qos(gw, rec)
            t0 = trio.current_time()
            first = gw.write(0, b"\x01" * (64 * KiB), False)
            async with trio.open_nursery() as nursery:
                ends = ends_of(nursery, first)
                await trio.sleep(1)
                set_qos(gw, dataclasses.replace(rec, qos_iops=1))
                await trio.sleep(1)
                second = gw.write(64 * KiB, b"\x02" * (4 * KiB), False)
                second_at = await done_at(second)
            assert second_at - t0 == pytest.approx(63 + 4, abs=0.1)
            assert ends[0] - t0 == pytest.approx(63, abs=0.1)

    run(main)


def test_raising_the_binding_limit_shortens_the_wait(tmp_path):
    """A 64 KiB write at 1 KiB/s (63 s); at 1 s the limit becomes 2 KiB/s: what is left of
    its wait (62 s) halves."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        rec = dataclasses.replace(gw.view.volume, qos_iops=1000, qos_bps=KiB)
        with store:
            set_qos(gw, rec)
            t0 = trio.current_time()
            result = gw.write(0, b"\x01" * (64 * KiB), False)
            async with trio.open_nursery() as nursery:
                ends = ends_of(nursery, result)
                await trio.sleep(1)
                set_qos(gw, dataclasses.replace(rec, qos_bps=2 * KiB))
            assert ends[0] - t0 == pytest.approx(1 + 31, abs=0.01)
            assert isinstance(gw.qos, VolumeQos)

    run(main)
