"""Request ids: one short id per client request, following it across hosts in the logs.

Theory of operation. The NBD frontend of the host that receives a request (its gateway)
gives it an id from its `RequestIds` and sets `current` for the request's task; trio
copies the context into every task started from there, so the gateway's per-replica tasks
see it without passing it by hand. Peer messages sent on behalf of the request carry it
(replicator.messages, field `rid`); the peer server sets `current` from the message while
its replica handles it. The log formatter (blockd.logs) adds `rid=` to every line logged
while an id is set, so `grep rid=h1-5c0a3e-2f` over every host's log shows one request.

An id is `<host>-<boot>-<seq>`: the gateway's host id (host ids are unique in a cluster),
a random tag drawn when the process starts (a restarted host does not reuse the ids of its
previous life) and a counter, in hex. The frontend sets `current` to `(ids, counter)`, not
the string: formatting it costs more than the rest of a request's id handling (0.5 us, on a
path of 6-13 us per request), and most requests never need it (a local read or write logs
nothing and sends no message). `get()` gives the string whenever one is needed: log lines,
peer messages. The pair is immutable, so a task started from the request still reads the
request's id after the frontend moved on. No randomness, no clock, no syscall on the hot
path.

A request the frontend answers in its synchronous dispatch (a local read, a local write:
most of them) does not even set `current`: setting and resetting a context variable, with
its token, cost 0.6 µs of a 4K read's 9 (fio, replicas=1, QD32: 108k IOPS with it, 117k
without). The frontend names the RequestIds whose newest id is the request being
dispatched in `dispatching` instead, and clears it when the dispatch returns; `get()`
reads it when `current` is unset, in the thread that set it only (trio's worker threads
log too). Nothing can run between the two but the export's synchronous code, so the id is
exact; what outlives the dispatch (the task of an awaitable answer) gets `current` set
when it is started, as before.
"""

from __future__ import annotations

import random
from contextvars import ContextVar
from threading import get_ident

# the id of the client request the current task works for; "" when none (background work).
# A str, or (RequestIds, counter) as RequestIds.next_ref() makes it: read it with get().
current: ContextVar[str | tuple] = ContextVar("vbp_request_id", default="")

# the RequestIds whose newest id is the request the frontend is dispatching right now
# (synchronously, in the thread RequestIds.bind named), or None
dispatching: "RequestIds | None" = None


def get() -> str:
    """The current request's id as a string ("" when none)."""
    v = current.get()
    if v:
        return v if type(v) is str else v[0].text(v[1])
    ids = dispatching
    if ids is not None and ids.thread == get_ident():
        return ids.text(ids.seq)
    return ""


class RequestIds:
    """Hands out the ids of one host's requests."""

    __slots__ = ("prefix", "seq", "thread")

    def __init__(self, host_id: str, boot: int | None = None):
        if boot is None:
            boot = random.getrandbits(24)
        self.prefix = f"{host_id}-{boot:06x}-"
        self.seq = 0  # the newest id handed out
        self.thread = 0  # the thread `dispatching` may name us in (bind)

    def bind(self) -> None:
        """The calling thread (trio's) is the one that sets `dispatching` to us."""
        self.thread = get_ident()

    def next_ref(self) -> tuple:
        """The next id, unformatted: a value for `current` (see get())."""
        self.seq += 1
        return (self, self.seq)

    def text(self, seq: int) -> str:
        return f"{self.prefix}{seq:x}"
