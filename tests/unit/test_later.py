"""vbp.later.Later: an answer completed by a callback, bound before or after it settles."""

from __future__ import annotations

import pytest
import trio

from vbp.later import Later


def bound(later: Later, defer_ok: bool = True) -> list:
    seen: list = []
    later.bind(lambda value, exc: seen.append(("done", value, exc)),
               lambda awaitable: seen.append(("defer", awaitable)) or defer_ok)
    return seen


async def _value(v):
    return v


def test_done_and_fail_reach_the_binding_before_or_after_it():
    later = Later()
    seen = bound(later)
    assert seen == []
    later.done(5)
    assert seen == [("done", 5, None)]

    later = Later()
    error = OSError(5, "io")
    later.fail(error)
    assert bound(later) == [("done", None, error)]


def test_defer_hands_the_awaitable_over_and_reports_refusal():
    later = Later()
    seen = bound(later)
    coro = _value(1)
    assert later.defer(coro) is True
    assert seen == [("defer", coro)]
    coro.close()

    later = Later()
    bound(later, defer_ok=False)
    coro = _value(2)
    refused = []
    assert later.defer(coro, lambda: refused.append(1)) is False  # the coroutine is closed
    with pytest.raises(RuntimeError):
        coro.send(None)
    assert refused == [1]

    later = Later()  # deferred before it is bound, refused at bind: still told
    coro = _value(3)
    assert later.defer(coro, lambda: refused.append(2)) is True
    bound(later, defer_ok=False)
    with pytest.raises(RuntimeError):
        coro.send(None)
    assert refused == [1, 2]


def test_a_later_settles_once():
    later = Later()
    later.done()
    with pytest.raises(RuntimeError):
        later.fail(OSError())
    with pytest.raises(RuntimeError):
        later.done()


async def test_awaiting_a_later_gives_its_outcome():
    async with trio.open_nursery() as nursery:
        later = Later()
        nursery.start_soon(lambda: trio.sleep(0.01))
        trio.lowlevel.current_trio_token().run_sync_soon(later.done, 7)
        assert await later == 7

    later = Later()
    later.fail(KeyError("k"))
    with pytest.raises(KeyError):
        await later

    later = Later()
    later.defer(_value(9))  # deferred before anyone waits: the waiter runs the rest
    assert await later == 9
