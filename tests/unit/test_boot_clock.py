"""blockd runs trio on the boot clock (blockd.clock): a suspend of the machine runs its
deadlines out, write leases first, as it runs the registry's TTL keys out."""

from __future__ import annotations

import time

import trio
from click.testing import CliRunner

import blockd.service
from blockd import clock as clock_mod
from blockd.clock import BootClock
from blockd.main import main


def test_it_reads_the_boot_clock_past_an_offset():
    c = BootClock()
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = c.current_time()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= now - c.offset <= after
    assert 10000 <= c.offset <= 200000  # (as trio's: mixing it with another clock shows)
    assert abs(c.deadline_to_sleep_time(c.current_time() + 5.0) - 5.0) < 0.01


def test_trio_sleeps_and_times_out_on_it():
    seen = {}

    async def run():
        t0, b0 = trio.current_time(), time.clock_gettime(time.CLOCK_BOOTTIME)
        await trio.sleep(0.05)
        with trio.move_on_after(0.05) as scope:
            await trio.sleep_forever()
        seen["trio"] = trio.current_time() - t0
        seen["boot"] = time.clock_gettime(time.CLOCK_BOOTTIME) - b0
        seen["cancelled"] = scope.cancelled_caught

    trio.run(run, clock=BootClock())
    assert seen["cancelled"]
    assert 0.1 <= seen["trio"] and abs(seen["trio"] - seen["boot"]) < 0.01


def test_a_suspend_runs_a_lease_deadline_out(monkeypatch):
    """A suspend to RAM stops CLOCK_MONOTONIC, not the boot clock: a gateway's lease
    deadline (trio time, set at a renewal) has passed on resume if the suspend outlasted
    it, as the registry's key of the lease has run out. (Suspended by hand: the boot
    clock moves on 60 s while the monotonic one stands still.)"""
    suspended = 0.0
    real = clock_mod.boot_clock
    monkeypatch.setattr(clock_mod, "boot_clock", lambda: real() + suspended)
    c = BootClock()
    deadline = c.current_time() + 30.0  # a renewal with a 30 s lease
    mono_deadline = time.monotonic() + 30.0
    suspended = 60.0
    assert c.current_time() >= deadline
    assert time.monotonic() < mono_deadline  # (what the monotonic clock would have said)
    assert c.deadline_to_sleep_time(deadline) < 0


def test_blockd_runs_its_service_on_the_boot_clock(tmp_path, monkeypatch):
    seen = []

    async def service(cfg):
        seen.append(trio.lowlevel.current_clock())

    monkeypatch.setattr(blockd.service, "run_until_signal", service)
    r = CliRunner().invoke(main, ["--host-id", "h1", "--data-dir", str(tmp_path / "data"),
                                  "--registry", f"lmdb://{tmp_path / 'registry'}",
                                  "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0"])
    assert r.exit_code == 0, r.output
    assert len(seen) == 1 and isinstance(seen[0], BootClock)
