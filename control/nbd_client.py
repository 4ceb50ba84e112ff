"""The NBD client under `vbp volume import` / `export` (control/transfer.py): one libnbd
handle, several requests in flight (`DEPTH` commands of at most `BLOCK` bytes), driven from
this thread with `aio_*` + `poll`. The copy decides what to read and write; this module
sends it, and reads the target's allocation.

- Pipeline keeps up to `DEPTH` commands in flight, each with a `done()` run in this thread
  when it completes.
- Every wait on the server is bounded: the connection, and each request once the server
  has gone `timeout` seconds (60 by default) without answering any (a blockd hung, stopped
  or cut off), fail with a TransferError naming the host; a server that answers slowly (a
  volume throttled by its QoS limits) is no error as long as replies keep coming. The
  handle is then dropped, not shut down: `nbd_shutdown` would wait for the replies that
  never come.
- Memory does not grow with the volume: block status (`base:allocation`) is asked for and
  consumed a window at a time as the copy moves on, adjacent extents of the same flags
  merged (blockd answers per 4 KiB page: a whole map held at once took ~45 MiB per GiB of
  fragmented volume), and the buffers are the `DEPTH` in flight, reused (see Slot: the
  binding never frees a buffer given to an aio call).

Errors: `NotFound` (no such volume or snapshot at connection), `TransferError` (connection
failures, a server that stops answering, block status that makes no progress); a command
the server failed raises `CommandFailed`, which names it ("write of 2097152 bytes at
offset 4194304: Input/output error"): of the thousands a large image takes, the user
learns which one (where the volume is damaged, or how far an import went).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

from vbp.errors import NotFound, VbpError
from vbp.layout import MiB

BLOCK = 2 * MiB  # bytes per READ/WRITE request, a Slot's size (the server's maximum is 32 MiB)
DEPTH = 16  # requests in flight
TIMEOUT = 60.0  # seconds without a reply from the server before a transfer fails
POLL_SLICE = 1.0  # seconds per poll: a Ctrl-C is handled between two

STATE_HOLE = 1  # NBD base:allocation flags
STATE_ZERO = 2


class TransferError(VbpError):
    """An import or export failed part way (I/O error, connection lost, server error)."""

    errno = errno.EIO


class CommandFailed(TransferError):
    """A command (`what`: its verb, length and offset) failed: the server's error, or
    the connection's loss while it was in flight (`error`: libnbd's)."""

    def __init__(self, what: tuple[str, int, int] | None, error):
        self.what, self.error = what, error
        super().__init__(f"{describe(what)}: {_cause(error)}")


def describe(what: tuple[str, int, int] | None) -> str:
    if what is None:
        return "request"
    verb, n, off = what
    return f"{verb} of {n} bytes at offset {off}" if n else verb


def _cause(e) -> str:
    """The server's error as the errno's text ("Input/output error"), else libnbd's
    message (a connection lost: "recv: Connection reset by peer")."""
    text = reason(e)
    code = getattr(e, "errnum", None)
    if code and "command failed" in text:  # ("write: command failed: ...")
        return os.strerror(code)
    return text


# --- connections --------------------------------------------------------------------------


def load_binding():
    """The libnbd Python binding (`nbd`), imported when a transfer starts."""
    try:
        import nbd
    except ImportError as e:  # pragma: no cover - make run / make test install it
        raise TransferError("the libnbd Python binding is missing (Debian: python3-libnbd)") from e
    return nbd


def connect(uri: str, timeout: float = TIMEOUT, tls_certificates=None):
    """A handle connected to `uri`, its handshake done within `timeout` seconds (a stopped
    blockd still accepts TCP connections: the kernel does, and no handshake follows).
    `tls_certificates`: the directory of the TLS client's files (ca-cert.pem, and
    client-cert.pem and client-key.pem when the hosts ask for a client certificate), for
    an `nbds://` URI."""
    nbd = load_binding()
    h = nbd.NBD()
    h.set_handle_name("vbp-transfer")
    h.add_meta_context("base:allocation")
    if tls_certificates is not None:
        h.set_tls_certificates(str(tls_certificates))
    said = _ServerMessages(h)
    try:
        h.aio_connect_uri(uri)
        deadline = time.monotonic() + timeout
        while h.aio_is_connecting():
            if not h.poll(_poll_ms(deadline - time.monotonic())) and \
                    time.monotonic() >= deadline:
                raise _silent(uri, timeout)
        if not h.aio_is_ready():
            raise TransferError(f"cannot connect to {uri}: the server closed the connection")
    except nbd.Error as e:
        if e.errno == "ENOENT":
            raise NotFound(f"{uri}: no such volume or snapshot") from None
        if e.errno == "ECONNREFUSED":
            raise TransferError(f"{uri}: connection refused (is blockd running there?)") from None
        hint = _tls_hint(e, uri)
        text = getattr(e, "string", None) or str(e)
        if said.last and not hint and "opt_go" in text.lower():
            raise TransferError(f"{uri}: the server refused the export: {said.last}") from None
        raise TransferError(f"cannot connect to {uri}: {reason(e)}{hint}") from None
    finally:
        said.stop()
    return h


class _ServerMessages:
    """The messages a server sent with its option errors (NBD_REP_ERR_*) during the
    handshake of `h`, the last in `last`. They say why an export was refused (blockd: the
    registry unreachable while it opened the volume), but libnbd (1.14) reports only
    "server policy prevents NBD_OPT_GO" and passes the server's words to its debug log
    alone: so the log is on, into this, for the handshake only (the debug messages of
    every request after it would cost), and lines go on to stderr as libnbd's would if
    the user turned its debugging on (LIBNBD_DEBUG=1)."""

    PREFIX = "handshake: server error message: "

    def __init__(self, h):
        self.h, self.last = h, ""
        self.user_debug = h.get_debug()
        h.set_debug_callback(self._debug)
        h.set_debug(True)

    def _debug(self, context, msg) -> None:
        if self.user_debug:
            print(f"libnbd: debug: vbp-transfer: {context}: {msg}", file=sys.stderr)
        if msg.startswith(self.PREFIX):  # (from the server: no control characters shown)
            text = "".join(c if c.isprintable() else " " for c in msg[len(self.PREFIX):])
            self.last = text.strip()[:500]
        elif msg.endswith("-> NEWSTYLE.OPT_GO.START"):
            self.last = ""  # (a message before is about another option: STARTTLS, say)

    def stop(self) -> None:
        if not self.user_debug:
            self.h.set_debug(False)
            self.h.clear_debug_callback()
        self.h = None  # (kept as the callback, this would hold its handle in a cycle)


def _tls_hint(e, uri: str) -> str:
    """What to do about a connection that failed over TLS, or for the want of it."""
    text = getattr(e, "string", None) or str(e)
    if "requires TLS" in text:
        return " (give --tls-certificates DIR: the hosts require TLS)"
    if "refused TLS" in text:
        return (" (the host does not offer TLS: leave out --tls-certificates and "
                "VBP_TLS_CERTIFICATES)")
    if uri.startswith("nbds") and ("gnutls" in text or "certificate" in text.lower()):
        return (" (the TLS handshake failed: check the --tls-certificates directory: "
                "ca-cert.pem for the CA that signed the host's certificate, and "
                "client-cert.pem and client-key.pem if the hosts ask for one)")
    return ""


def disconnect(h) -> None:
    """Disconnect politely from a server that answered everything, within a second; else
    just drop the connection (nbd_shutdown waits for replies a hung server never sends)."""
    try:
        if h.aio_is_ready() and h.aio_in_flight() == 0:
            h.aio_disconnect(0)
            deadline = time.monotonic() + 1.0
            while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
                h.poll(100)
    except Exception:
        pass
    close = getattr(h, "close", None)  # libnbd >= 1.16; older ones close on collection
    if close is not None:
        close()


def reason(e) -> str:
    """libnbd's message without the 'nbd_xxx: state: ' prefixes."""
    text = getattr(e, "string", None) or str(e)
    if text.startswith("nbd_") and ": " in text:
        text = text.split(": ", 1)[1]
    for state in ("connect: ", "handshake: "):
        text = text.removeprefix(state)
    return text


def _server(uri: str) -> str:
    """The server of an NBD URI as errors name it: HOST:PORT, or the socket's path."""
    parts = urlsplit(uri)
    if parts.netloc:
        return parts.netloc
    return parse_qs(parts.query).get("socket", [uri])[0]


def _silent(uri: str, timeout: float) -> TransferError:
    return TransferError(f"no reply from {_server(uri)} in {timeout:g} s "
                         f"(is blockd there hung or stopped?)")


def _poll_ms(left: float) -> int:
    return max(1, int(min(left, POLL_SLICE) * 1000))


# --- requests -----------------------------------------------------------------------------


class Pipeline:
    """Up to `depth` aio commands in flight on one handle, each with an optional `done()`
    run in this thread when it completes, and what it is (verb, length, offset) for its
    error. A failed command raises CommandFailed from submit/wait/drain, and the others
    are forgotten: the transfer is over, and their callbacks (holding the handle) would
    keep its connection open for as long as the error is referenced.

    A server that answers none of them for `timeout` seconds fails the transfer
    (TransferError). The clock runs from the later of the last reply and the oldest
    command's submission, so a command queued behind others at a server that answers
    slowly but steadily (a volume under QoS limits) is not late; and a timeout is declared
    only after a poll that found nothing, so time this thread spent elsewhere (reading a
    slow source file) is not blamed on the server."""

    def __init__(self, h, uri: str, timeout: float = TIMEOUT, depth: int = DEPTH):
        self.h, self.uri, self.timeout, self.depth = h, uri, timeout, depth
        self.inflight: dict[int, tuple[float, Callable[[], None] | None,
                                       tuple[str, int, int] | None]] = {}
        self.last_reply = time.monotonic()
        self.error = load_binding().Error

    def submit(self, issue: Callable[[], int], done: Callable[[], None] | None = None,
               what: tuple[str, int, int] | None = None) -> int:
        """Send the command `issue()` sends, `what` it is: (verb, length, offset)."""
        while len(self.inflight) >= self.depth:
            self._reap(block=True)
        cookie = issue()
        self.inflight[cookie] = (time.monotonic(), done, what)
        return cookie

    def wait(self, cookie: int) -> None:
        while cookie in self.inflight:
            self._reap(block=True)

    def drain(self) -> None:
        while self.inflight:
            self._reap(block=True)

    def _reap(self, block: bool) -> None:
        """Retire completed commands; with `block`, wait until at least one completes."""
        while True:
            finished = []
            for cookie in list(self.inflight):
                try:
                    if self.h.aio_command_completed(cookie):
                        finished.append(self.inflight.pop(cookie)[1])
                except self.error as e:
                    what = self.inflight[cookie][2]
                    self.inflight.clear()
                    raise CommandFailed(what, e) from None
                except BaseException:
                    self.inflight.clear()
                    raise
            if finished:
                self.last_reply = time.monotonic()
                for done in finished:
                    if done is not None:
                        done()
                return
            if not block or not self.inflight:
                return
            oldest = next(iter(self.inflight.values()))[0]
            deadline = max(self.last_reply, oldest) + self.timeout
            if not self.h.poll(_poll_ms(deadline - time.monotonic())) and \
                    time.monotonic() >= deadline:
                self.inflight.clear()
                raise _silent(self.uri, self.timeout)


def allocation(pipe: Pipeline, start: int, end: int,
               window: int) -> Iterator[tuple[int, int, int]]:
    """The target's base:allocation map over [start, end) as (start, end, flags) in order,
    adjacent extents of the same flags merged, asked for `window` bytes at a time: blockd
    answers per 4 KiB page, so memory must not grow with the volume (a whole fragmented
    4 GiB map took 179 MiB of Python objects, a 1 TiB one would take 45 GiB)."""
    h = pipe.h
    if not h.can_meta_context("base:allocation"):
        yield start, end, 0
        return
    run: tuple[int, int, int] | None = None
    off = start
    while off < end:
        got: list[tuple[int, int, int]] = []

        def cb(context, offset, entries, err, got=got):
            if context == "base:allocation":
                pos = offset
                for i in range(0, len(entries) - 1, 2):
                    got.append((pos, pos + entries[i], entries[i + 1]))
                    pos += entries[i]
            return 0

        n = min(end - off, window)
        pipe.wait(pipe.submit(lambda n=n, off=off, cb=cb: h.aio_block_status(n, off, cb),
                              what=("block status", n, off)))
        pos = off
        for s, e, f in got:
            s, e = max(s, pos), min(e, end)
            if e <= s or s != pos:
                continue
            if run is not None and run[2] == f and run[1] == s:
                run = (run[0], e, f)
            else:
                if run is not None:
                    yield run
                run = (s, e, f)
            pos = e
        if pos == off:
            raise TransferError(f"block status made no progress at offset {off}")
        off = pos
    if run is not None:
        yield run


# --- buffers ------------------------------------------------------------------------------


class Slot:
    """BLOCK bytes for aio requests, reused for the whole transfer. libnbd 1.14's Python
    binding (Debian 12's) keeps a reference to every buffer given to aio_pread or
    aio_pwrite: a buffer per request is never freed, and a transfer held every byte it
    moved (1 GiB read, 1 GiB kept). So a slot makes one nbd.Buffer per request length it
    serves, a view of its first bytes; a request takes a free slot and gives it back when
    done, and the next transfer of the process reuses the slots of the last."""

    def __init__(self, nbd):
        self.nbd = nbd
        self.mem = memoryview(bytearray(BLOCK))
        self.buf = nbd.Buffer.from_buffer(self.mem)  # the whole slot, for is_zero
        self.sized: dict[int, object] = {}

    def first(self, n: int):
        """An nbd.Buffer of the slot's first `n` bytes."""
        b = self.sized.get(n)
        if b is None:
            b = self.sized[n] = self.nbd.Buffer.from_buffer(self.mem[:n])
        return b


_free_slots: list[Slot] = []  # shared by the transfers of this process: never freed anyway


def take_slot(nbd) -> Slot:
    return _free_slots.pop() if _free_slots else Slot(nbd)


def give_slot(slot: Slot) -> None:
    _free_slots.append(slot)
