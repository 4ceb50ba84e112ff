"""Later: an answer that another task's callback completes, instead of a task of its own.

A replicated write is answered when the replicas' replies arrive, and those are decoded by
the peer connections' reader tasks. Waiting for them in a task per request (an awaitable
answer to the NBD server) costs a task start, a park and a reschedule per write; a Later
costs none of that: the export returns it at once, the server binds its completion, and
the callback that sees the last reply completes it (`done` / `fail`). When the rest of the
work has to wait for something (a replica failed: record it stale, refresh the map), the
export hands it back as an awaitable with `defer`, and the server runs it in a task of
the connection as it would any awaitable answer.

Exactly one of done, fail or defer is called, once. A Later completed before it is bound
delivers at bind. Awaiting a Later also works (tests, callers outside the NBD server).
"""

from __future__ import annotations

import trio

_PENDING = object()


class Later:
    __slots__ = ("_on_done", "_on_defer", "_kind", "_value", "_event", "_on_refused")

    def __init__(self) -> None:
        self._on_done = None  # (value, exc) -> None
        self._on_defer = None  # (awaitable) -> bool, False if it cannot run it
        self._kind = _PENDING  # then "done", "fail" or "defer"
        self._value = None
        self._event: trio.Event | None = None
        self._on_refused = None  # called if a deferred awaitable is never run

    # --- the export's side ------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """Neither done, failed nor deferred yet."""
        return self._kind is _PENDING

    def done(self, value=None) -> None:
        self._settle("done", value)

    def fail(self, exc: BaseException) -> None:
        self._settle("fail", exc)

    def defer(self, awaitable, on_refused=None) -> bool:
        """Hand the rest to the server (it awaits `awaitable` for the answer). When the
        bound connection is gone and will never run it, now or at bind, `awaitable` is
        closed unrun and `on_refused()` is called, so the caller can clean up what it
        would have done; the return value says so too when it is known now (False)."""
        if self._kind is not _PENDING:
            raise RuntimeError(f"Later already {self._kind}")
        self._on_refused = on_refused
        if self._on_defer is None:
            self._settle("defer", awaitable)
            return True
        self._kind = "defer"
        if self._on_defer(awaitable):
            return True
        self._refused(awaitable)
        return False

    def _refused(self, awaitable) -> None:
        _close(awaitable)
        on_refused, self._on_refused = self._on_refused, None
        if on_refused is not None:
            on_refused()

    def _settle(self, kind: str, value) -> None:
        if self._kind is not _PENDING:
            raise RuntimeError(f"Later already {self._kind}")
        self._kind, self._value = kind, value
        if self._on_done is not None:
            self._deliver()
        elif self._event is not None:
            self._event.set()

    # --- the server's side ------------------------------------------------------------

    def bind(self, on_done, on_defer) -> None:
        """on_done(value, exc) for done/fail; on_defer(awaitable) -> bool for defer."""
        self._on_done, self._on_defer = on_done, on_defer
        if self._kind is not _PENDING:
            self._deliver()

    def _deliver(self) -> None:
        kind, value = self._kind, self._value
        self._value = None
        if kind == "done":
            self._on_done(value, None)
        elif kind == "fail":
            self._on_done(None, value)
        elif not self._on_defer(value):
            self._refused(value)

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        if self._kind is _PENDING:
            self._event = trio.Event()
            try:
                await self._event.wait()
            except BaseException:
                if self._kind is _PENDING:  # nobody will run what comes: refuse it
                    self.bind(lambda value, exc: None, lambda awaitable: False)
                elif self._kind == "defer":
                    self._refused(self._value)
                raise
        else:
            await trio.lowlevel.checkpoint()
        kind, value = self._kind, self._value
        if kind == "done":
            return value
        if kind == "fail":
            raise value
        return await value


def _close(awaitable) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never started: no warning
    if close is not None:
        close()
