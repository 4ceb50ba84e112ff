"""The trio shell around the NBD codecs: receive, feed, drain, dispatch, send.

Theory of operation (DESIGN.md "Speed"; proto.md "Ordering of messages and writes"):
- The reader receives straight into the transmission codec's preallocated buffer and
  drains every complete request before receiving again. Each request is dispatched at
  once: an export operation that returns a plain result is encoded and queued right
  there (no task, no await); one that returns an awaitable runs in a task of the
  connection's nursery; one that returns a vbp.later.Later (a replicated write) is
  completed by the export's callback, with no task, or continues as an awaitable in a
  task if the export defers it. Replies may therefore leave out of order, as proto.md
  allows.
- A run of reads or writes (TAKE_RUN in a row) is taken from the buffer in one call
  (TransmissionCodec.take_reads, take_writes: no Request per request) and dispatched in
  one loop (dispatch_reads, dispatch_writes); each request still gets its request id,
  its metrics and the answer dispatch would give it. Reads mixed with writes go one by
  one: there a call finding none costs more than the short runs it finds save.
- Replies of one batch leave in one vectored send, made inline by the reader once the
  batch is dispatched (no task switch) while nothing else is being sent. What the socket
  does not take at once, and replies completed later (tasks, Later callbacks), go to ONE
  writer task that sends everything queued so far in order. Only one of the two sends at
  a time (`writing`), so there is no lock per reply.
- On a real socket the reader calls recv_into/sendmsg on the socket itself, waiting with
  wait_readable/wait_writable only when it would block: no scheduler round trip per call.
  It still checkpoints every few batches when data keeps arriving, so other connections
  and cancellation are never starved.
- Backpressure: the reader stops dispatching while MAX_IN_FLIGHT awaitable operations
  are running or MAX_QUEUED reply bytes wait for the writer (each buffer counted
  QUEUED_ITEM bytes more: many small replies hold more than their bytes). A client that
  takes none of its replies for `send_timeout` (SEND_TIMEOUT; blockd: nbd_send_timeout)
  is disconnected and what was queued for it freed: the writer's wait for room in the
  socket is timed, each wait anew (only a send that blocks pays for the timer), so a
  slow client that takes some of its replies now and then is not cut off, one that
  reads none is.
- A budget for the server as a whole (HeldBytes, HELD_LIMIT): the bytes its connections
  hold (requests in flight, replies queued and being sent, a large write's payload
  arriving) are added up at each batch and
  send; while the total is past the limit, a connection takes no more requests once it
  holds FAIR_SHARE, until the total is back under (Ceph's osd_client_message_size_cap).
  A client with little in flight is never held back by others.
- Large reads leave without a copy into a buffer: an export with `read_ref`
  (replicator.gateway) may answer a read with a FileRange (bytes of its data file,
  checked), queued like any buffer and sent from the map its pages were checked through
  when its turn comes. The range pins the slots its file frees meanwhile
  (vbp.chunkstore_common.FileRange); it is released once sent, or when the connection
  ends with it unsent.
- FLUSH calls export.flush() when it is received: writes replied to before it were
  completed by the export, which owns their durability.
- Request ids (vbp.reqid): with a RequestIds, every request gets an id, named in
  `reqid.dispatching` while the export handles it (no context change per request); the
  task an awaitable answer runs in gets it as `reqid.current` (trio copies the context at
  start_soon), so every log line about the request, on this host and on the replicas its
  peer messages reach, carries it.
- Metrics: the export's `observe` hook counts the requests answered in a batch's dispatch
  once per batch and command, with one latency: from the batch's receipt to its send (per
  request it cost 0.7 µs of a 4K read's 9: two clock reads and a histogram update). A
  request answered later (task, Later) is observed on its own, from its batch's receipt
  to its answer.
- NBD_CMD_DISC or end of input: stop reading, finish in-flight requests, send their
  replies, close. A graceful stop (serve_nbd's `stopping`; proto.md "Terminating the
  transmission phase") takes no request more: those taken are answered, every other one
  (received before the stop or after, until the client's NBD_CMD_DISC or STOP_DRAIN)
  with NBD_ESHUTDOWN, then this side is shut (refuse_rest, refuse_more, _end_stopped).
  A protocol error (bad magic) is a hard disconnect. Nothing a client sends can take
  down another connection or the server: every connection's errors are caught and
  logged in handle_connection.
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import math
import socket
import ssl
from time import perf_counter
import logging
import sys
from functools import partial

import trio

from nbd_frontend import proto
from nbd_frontend.errors import ProtocolError, to_nbd_errno, to_option_error
from nbd_frontend.export import ExportProvider, MemoryProvider
from nbd_frontend.handshake import (NEED_DATA, SEND_DATA, TLS_MODES, Aborted, ExportInfo,
                                    ExportQuery, ListQuery, Ready, ServerHandshake, StartTLS,
                                    shown)
from nbd_frontend.tls import (TLSChannel, TLSChannelStream, TLSConfigError, check_tls,
                              peer_name, server_context)
from nbd_frontend.transmission import (BadRequest, Request, TransmissionCodec,
                                       transmission_flags)
from vbp.buffers import keepable
from vbp.chunkstore_common import FileRange
from vbp.errors import VbpError
from vbp.later import Later
from vbp.layout import parse_size
from vbp.loglimit import LogLimit, failure_kind
from vbp import reqid
from vbp.reqid import RequestIds, current as current_rid
from vbp.sockets import (KEEPALIVE, apply_congestion, nbytes, open_listeners, plain_socket,
                         receive_wait, remote_address, same_host, send_now, set_keepalive)

log = logging.getLogger("vbp.nbd")

MAX_IN_FLIGHT = 128
# Bytes of READ and WRITE requests in flight (answered later): past this the reader takes
# no more requests until some are answered. A WRITE's payload is held until answered, and
# requests of up to the largest block size could otherwise hold MAX_IN_FLIGHT of them
# (4 GiB) per connection.
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024
MAX_QUEUED = 64 * 1024 * 1024
# What a queued reply buffer holds beyond its bytes, counted with them against MAX_QUEUED
# and the server's budget: a memoryview object is 184 bytes, a bytes object's header 33,
# and each takes a slot of the queue. Counted by their bytes alone, the replies of a
# client pipelining 1-byte reads of a hole and taking none held some 250 bytes per 17
# counted: 64 MiB of them about 1 GiB.
QUEUED_ITEM = 192
# Seconds a connection's writer waits for its client to take any of its replies (room in
# the socket) before it disconnects it: a client that sends requests and never reads the
# replies would otherwise hold MAX_QUEUED and more of them for as long as it likes.
SEND_TIMEOUT = 60.0
# Bytes of requests in flight and of replies queued or being sent, of all the connections
# of one server together (HeldBytes). Each connection holds at most MAX_IN_FLIGHT_BYTES
# and MAX_QUEUED (and the send under way), about 160 MiB: without a bound for the whole,
# a few hundred clients that stop reading, or a slow volume under many, held it all at
# once. Past it, a connection holding FAIR_SHARE or more takes no new request until the
# total is back under, nor a read whose reply would take it past FAIR_SHARE (a 32 MiB
# read, taken by a connection that held little, held 32 MiB per connection: a review saw
# 120 clients hold 4.5 GiB): the total stays within HELD_LIMIT, the batch that crosses
# it, and FAIR_SHARE per connection.
HELD_LIMIT = 1024 * 1024 * 1024
FAIR_SHARE = 4 * 1024 * 1024
# Seconds a connection waits for a request, with none in flight, before it gives up the
# payload buffers it keeps for reuse (TransmissionCodec.release_pool): up to POOL_BYTES
# each, which idle connections held however long they stayed (not in the budget: they
# hold no request). A TLS connection too: it waits on its socket through its TLS channel.
# (Only a stream with no socket under it, trio.SSLStream over a test's memory stream,
# keeps them.)
POOL_IDLE = 1.0
# Seconds between two looks at whether the client of a connection waiting for the budget
# went away (_Connection.wait_budget): nothing else of the connection would notice until
# the budget is back under, and its read would then be made for no one.
GONE_CHECK = 1.0
# Connections of one server at once (blockd: nbd_max_connections); one more takes the slot
# of the oldest one still negotiating (_Slots), or, when every one is past its
# negotiation, is closed as soon as it is accepted, before the greeting. With HELD_LIMIT
# it bounds the memory of the whole: each connection may hold FAIR_SHARE and a request
# past the budget, and a file descriptor.
MAX_CONNECTIONS = 1024
# Connections from one client address at once (blockd: nbd_max_connections_per_address;
# 0 there: half of nbd_max_connections): a client that opens connections and leaves them
# idle (or sends a payload slowly) holds every slot otherwise, and every other client,
# whatever its address, is refused. One more takes the slot of that address's oldest
# connection still negotiating, or is closed as soon as it is accepted. Not
# those from this host itself (vbp.sockets.same_host: a hypervisor beside blockd may hold
# them all, as before the cap). An IPv6 client counts as its /64 (client_of).
REFUSED_LOG_EVERY = 10.0  # seconds between two warnings of connections refused
HANDSHAKE_TIMEOUT = 30.0  # seconds for the whole negotiation (_handshake)
TLS_CLOSE_TIMEOUT = 5.0  # seconds for a TLS session's close_notify to leave (_end_tls)
# Seconds a graceful stop goes on reading a client's requests to answer them with
# NBD_ESHUTDOWN, once those taken are answered (_Connection.refuse_more), and then, this
# side shut, reads what still comes to drop it (_end_stopped). Past it, the refusals go
# on while requests taken are still unanswered, looked at every STOP_LOOK.
STOP_DRAIN = 1.0
STOP_LOOK = 0.05
# Export opens of one negotiation during which its clock stops (_answer_export); later
# ones count against HANDSHAKE_TIMEOUT: a client asking NBD_OPT_INFO again and again of an
# export slow to open would otherwise hold its connection for thousands of opens.
UNTIMED_OPENS = 4
HANDSHAKE_RECEIVE = 64 * 1024
DEFER_MAX = 64 * 1024  # queued bytes of answers (deferrable) that may wait for a batch
SPIN_BATCHES = 8  # batches read without blocking before the reader yields anyway
# requests the reader takes from what it received before it yields anyway: a receive of
# 256 KiB holds about 9,000 small requests, and eight of them (SPIN_BATCHES), answered at
# once, held every other client of the host for most of a second (a review measured
# 0.5-0.9 s stalls beside one client pipelining 1-byte reads)
YIELD_REQUESTS = 1024
# reads (writes) in a row after which the reader takes the reads (writes) at the front of
# its buffer in one go (TransmissionCodec.take_reads, take_writes): for reads mixed with
# writes at random the calls finding none cost more than the short runs they find save
TAKE_RUN = 8
_COMMANDS = max(proto.CMD_NAMES) + 1  # a dispatched request's command is below this
_PLAIN = (type(None), bytes, bytearray, memoryview, list, FileRange)
_REFUSALS = {  # the human-readable text of an error chunk for a refused request
    proto.EINVAL: "invalid request: unknown command or flag, misaligned, or beyond the export",
    proto.EPERM: "the export is read-only",
    proto.ENOSPC: "write beyond the end of the export",
    proto.EOVERFLOW: "request larger than the maximum payload",
}


async def _resolve(value):
    """Export and provider calls may answer directly or with an awaitable."""
    if type(value) not in _PLAIN and inspect.isawaitable(value):
        return await value
    return value


def export_info(export) -> ExportInfo:
    return ExportInfo(
        name=export.name, size=export.size, description=getattr(export, "description", ""),
        flags=transmission_flags(read_only=bool(export.read_only),
                                 multi_conn=bool(getattr(export, "multi_conn", True))),
        min_block=getattr(export, "min_block", proto.MIN_BLOCK),
        preferred_block=getattr(export, "preferred_block", proto.PREFERRED_BLOCK),
        max_block=max_payload(export))


def max_payload(export) -> int:
    """The largest READ or WRITE payload taken for `export`: what it says it takes, but no
    more than proto.MAX_PAYLOAD, which the receive path is sized for. The handshake
    advertises it and the codec refuses longer requests (EINVAL): proto.md wants the two
    to agree, a client abiding by the advertised size being held to no other."""
    return min(getattr(export, "max_block", proto.MAX_PAYLOAD), proto.MAX_PAYLOAD)


def _gone(raw: socket.socket) -> bool:
    """Whether the peer of `raw` closed or reset the connection, by a peek that takes
    nothing (bytes it sent and this side has not read: not gone)."""
    try:
        return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class HeldBytes:
    """What the connections of one server hold (requests in flight, replies queued and
    being sent), added up: each connection reports its own at each batch it reads and
    each send (_Connection.recharge). Past `limit`, connections holding FAIR_SHARE or more
    take no new request (their caps drop to it) until it is back under. One in the middle
    of a large write's payload reads it to its end: connections over the limit by their
    payloads alone would otherwise wait for each other forever."""

    def __init__(self, limit: int = HELD_LIMIT) -> None:
        self.limit = limit
        self.total = 0
        self.most = 0  # the largest total seen (for tests and metrics)
        self.waiting: set = set()  # connections held back (_Connection.wait_room)

    def add(self, delta: int) -> None:
        """A connection holds `delta` bytes more (less, if negative). Back under the limit,
        the connections held back look again."""
        was = self.total
        self.total = total = was + delta
        if total > self.most:
            self.most = total
        elif was > self.limit >= total:
            for c in self.waiting:
                c.room.set()
            self.waiting.clear()


async def serve_nbd(provider: ExportProvider, host: str, port: int, *,
                    ids: RequestIds | None = None, congestion: str = "",
                    local_congestion: str = "", tls: str = "off", tls_context=None,
                    stopping: trio.Event | None = None, send_timeout: float = SEND_TIMEOUT,
                    held: HeldBytes | None = None, max_connections: int = MAX_CONNECTIONS,
                    max_per_address: int | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve NBD on host:port until cancelled; task_status.started(actual_port) once
    listening, so `port = await nursery.start(serve_nbd, provider, host, 0)` works.
    `ids`: where request ids come from (none without it). `congestion`: the TCP
    congestion control of the connections ("": the system's; vbp.sockets.set_congestion);
    `local_congestion`, if set, that of the connections from this host (a hypervisor
    attaching here: vbp.sockets.same_host) instead.
    `tls`: "off", "on" (clients may upgrade) or "require", with `tls_context` the server's
    ssl.SSLContext (nbd_frontend.tls.server_context).
    `stopping`, once set, stops the connections gracefully: no request is taken any
    more, those taken are answered, those received since with NBD_ESHUTDOWN until the
    client disconnects or STOP_DRAIN has passed, then the connection closes (a
    connection made since is closed at once); the caller cancels this once they are
    gone.
    `send_timeout`: seconds a client may take none of its replies before it is
    disconnected (SEND_TIMEOUT).
    `held`: the budget of the bytes the connections hold (a HeldBytes of HELD_LIMIT if
    not given). `max_connections`: connections served at once (MAX_CONNECTIONS); one
    more takes the slot of the oldest one still negotiating, else is closed at once.
    `max_per_address`: those from one client address, this host's own excepted (no
    limit of its own without it).
    With port 0, give an IP address: a name resolving to several addresses would get a
    different free port per address, and only the first is reported."""
    check_tls(tls, tls_context)
    listeners = await open_listeners(port, host, "NBD")
    for listener in listeners:  # (the connections it accepts inherit both)
        apply_congestion(listener.socket, congestion, "nbd listener")
        set_keepalive(listener.socket, *KEEPALIVE, send_timeout)
    actual = listeners[0].socket.getsockname()[1]
    log.info("nbd listening on %s:%d%s", host, actual, "" if tls == "off" else
             f" (TLS {tls}, client certificates "
             f"{'required' if tls_context.verify_mode == ssl.CERT_REQUIRED else 'not asked'})")
    task_status.started(actual)
    held = HeldBytes() if held is None else held
    # the warnings of failed requests, per export, command and failure: a failing disk
    # fails them all (vbp.loglimit)
    failures = LogLimit()
    handle = partial(handle_connection, provider=provider, ids=ids, tls=tls,
                     tls_context=tls_context, local_congestion=local_congestion,
                     stopping=stopping, send_timeout=send_timeout, held=held,
                     failures=failures)
    slots = _Slots(max_connections, max_per_address or max_connections)
    await trio.serve_listeners(partial(_admit, handle, slots), listeners)


class _Slots:
    """The connections a server serves at once, at most `limit`, and at most
    `per_address` of them from one client address (_admit). When they are all taken, a
    new connection takes the slot of the oldest one still negotiating (`negotiating`: no
    export chosen, none being opened), else it is closed at once."""

    def __init__(self, limit: int, per_address: int | None = None) -> None:
        self.limit = limit
        self.per_address = limit if per_address is None else per_address
        self.taken = 0
        self.by_address: dict[str, int] = {}
        # the slots that may be evicted, oldest first (dicts keep their order)
        self.negotiating: dict[_Slot, None] = {}
        self.refused = 0  # since the last warning
        self.warned_at = -math.inf
        self.evicted = 0  # (the same, for the connections evicted)
        self.evict_warned_at = -math.inf

    def take(self, address: str | None) -> "_Slot":
        self.taken += 1
        if address is not None:
            self.by_address[address] = self.by_address.get(address, 0) + 1
        slot = _Slot(self, address)
        self.negotiating[slot] = None
        return slot

    def give_back(self, slot: "_Slot") -> None:
        """`slot` is free (its connection ended, or is ending: evicted); once only."""
        if slot.owner is None:
            return
        slot.owner = None
        self.negotiating.pop(slot, None)
        self.taken -= 1
        address = slot.address
        if address is not None:
            left = self.by_address[address] - 1
            if left:
                self.by_address[address] = left
            else:
                del self.by_address[address]

    def victim(self, address: str | None) -> "_Slot | None":
        """The oldest slot still negotiating (of `address`, if given), or None."""
        for slot in self.negotiating:
            if address is None or slot.address == address:
                return slot
        return None

    def evict(self, slot: "_Slot", why: str) -> None:
        """End the connection of `slot` (still negotiating) and free its slot now; a
        warning says so, at most every REFUSED_LOG_EVERY seconds."""
        slot.scope.cancel()  # (its task closes the connection as soon as it runs)
        self.give_back(slot)
        self.evicted += 1
        now = trio.current_time()
        if now - self.evict_warned_at >= REFUSED_LOG_EVERY:
            log.warning("nbd connections evicted: %s; the oldest connection still "
                        "negotiating (no export chosen) was closed for a new one, %d "
                        "since the last warning", why, self.evicted)
            self.evict_warned_at, self.evicted = now, 0


class _Slot:
    """One connection _admit let in: its client address (None: counted toward the whole
    only), the cancel scope it runs in, and the _Slots that holds it (None once given
    back). It may be evicted while in `owner.negotiating`: from its admission until its
    client chooses an export, except while an export is being opened for it."""

    __slots__ = ("owner", "address", "scope")

    def __init__(self, owner: _Slots, address: str | None) -> None:
        self.owner: _Slots | None = owner
        self.address = address
        self.scope = trio.CancelScope()

    async def hold(self) -> None:
        """An export is about to be opened for this connection: it is no longer evicted
        (an open must not be cut short: _answer_export). Cancelled here if it was evicted
        meanwhile (its task had not run since)."""
        if self.owner is not None:
            self.owner.negotiating.pop(self, None)
        await trio.lowlevel.checkpoint_if_cancelled()

    def release(self) -> None:
        """The open is over and the client chose no export (it asked for information, or
        was refused): it may be evicted again, as the youngest of those negotiating."""
        if self.owner is not None:
            self.owner.negotiating[self] = None


def _peer_address(stream) -> str | None:
    """The client address the cap of one address counts (client_of), or None for a
    client on this host (same_host) or one whose address cannot be read: they count
    toward the whole only."""
    try:
        if same_host(stream.socket):
            return None
        return client_of(stream.socket.getpeername()[0])
    except (AttributeError, OSError, IndexError, TypeError, ValueError):  # (gone already; not a socket)
        return None


NAT64 = ipaddress.ip_network("64:ff9b::/96")  # (RFC 6052: an IPv4 client translated)


def client_of(ip: str) -> str:
    """The client an address stands for, under the cap of one address: an IPv4 address
    itself (also as an IPv4-mapped IPv6 address, as a dual-stack listener sees it, or
    translated by NAT64's well-known prefix); a global or unique-local IPv6 address's
    /64: a host is given a whole /64 and may take any address of it (temporary
    addresses, RFC 8981), so one address each would let it past the cap. A link-local
    address is itself, with its zone: every link shares fe80::/64."""
    a = ipaddress.ip_address(ip.partition("%")[0])
    if a.version == 4:
        return str(a)
    if a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    if a in NAT64:
        return str(ipaddress.IPv4Address(int(a) & 0xFFFFFFFF))
    if a.is_link_local:
        return ip
    return str(ipaddress.ip_network((a, 64), strict=False))


async def _admit(handle, slots: _Slots, stream) -> None:
    """handle(stream), unless `slots` are all taken, or all those one address may take,
    by connections past the negotiation (or opening an export): then the connection is
    closed at once (the client sees it end before the greeting), and a warning says so,
    at most every REFUSED_LOG_EVERY seconds. While some are still negotiating, the
    oldest of them (of the address, past its cap) is closed instead: connections that
    never negotiate (anyone can open a thousand and send nothing, and those of this host
    are held to no cap of an address) otherwise locked every client out for up to
    HANDSHAKE_TIMEOUT; an established connection is never evicted."""
    address = _peer_address(stream) if slots.per_address < slots.limit else None
    mine = slots.by_address.get(address, 0) if address is not None else 0
    if mine >= slots.per_address or slots.taken >= slots.limit:
        mine_full = mine >= slots.per_address
        victim = slots.victim(address if mine_full else None)
        if victim is not None:
            slots.evict(victim, f"{mine} connections open from {address}, the most one "
                        "address may hold (nbd_max_connections_per_address)" if mine_full
                        else f"{slots.taken} connections open, the most allowed "
                        "(nbd_max_connections)")
        else:
            _refuse(slots, address, mine)
            await trio.aclose_forcefully(stream)
            return
    slot = slots.take(address)
    try:
        with slot.scope:
            await handle(stream, slot=slot)
    finally:
        slots.give_back(slot)


def _refuse(slots: _Slots, address: str | None, mine: int) -> None:
    """Count a connection refused, and warn of it at most every REFUSED_LOG_EVERY s."""
    slots.refused += 1
    now = trio.current_time()
    if now - slots.warned_at >= REFUSED_LOG_EVERY:
        if slots.taken >= slots.limit:
            log.warning("nbd connections refused: %d connections open, the most allowed "
                        "(nbd_max_connections); %d refused since the last warning",
                        slots.taken, slots.refused)
        else:
            log.warning("nbd connections refused: %d connections open from %s, the most "
                        "one address may hold (nbd_max_connections_per_address); %d "
                        "refused since the last warning", mine, address, slots.refused)
        slots.warned_at, slots.refused = now, 0


async def handle_connection(stream, provider: ExportProvider,
                            ids: RequestIds | None = None, tls: str = "off",
                            tls_context=None, local_congestion: str = "",
                            stopping: trio.Event | None = None,
                            send_timeout: float = SEND_TIMEOUT,
                            held: HeldBytes | None = None,
                            failures: LogLimit | None = None,
                            slot: _Slot | None = None) -> None:
    """Run one NBD connection to its end; never raises (except cancellation). The export
    the client chose is closed when the connection ends, however it ends.
    `local_congestion`, `stopping`, `send_timeout`, `held`: serve_nbd's (no budget for
    the whole without `held`). `failures`: the limit of the warnings of failed requests
    that the connections of a server share (one of its own without it). `slot`: the
    connection's _Slot (_admit), told when an export is being opened for it."""
    opened: list = []  # the export opened for this connection, once there is one
    try:
        if stopping is not None and stopping.is_set():
            return
        if local_congestion:
            sock = getattr(stream, "socket", None)
            if sock is not None and same_host(sock):
                apply_congestion(sock, local_congestion, "nbd connection from this host")
        result = await _handshake(stream, provider, opened, tls, tls_context, stopping, slot)
        if result is not None:
            channel, ready, trailing = result  # (channel: the TLS stream after an upgrade)
            clean = await _Connection(channel, opened[0], ready, trailing, ids=ids,
                                      stopping=stopping, send_timeout=send_timeout,
                                      held=held, failures=failures).run()
            if clean and channel is not stream:
                await _end_tls(channel)
            elif clean and stopping is not None and stopping.is_set():
                await _end_stopped(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as exc:
        log.debug("nbd connection lost: %r", exc)
    except ssl.SSLError as exc:  # (a record that does not decrypt: anyone can send one)
        _bad_client(failures, stream, "nbd TLS error, disconnecting", exc)
    except trio.TooSlowError:  # (idle connections: anyone can open a thousand)
        _bad_client(failures, stream, "nbd handshake not done, disconnecting",
                    f"no export chosen within {HANDSHAKE_TIMEOUT:g} s", logging.INFO)
    except ProtocolError as exc:
        _bad_client(failures, stream, "nbd protocol error, disconnecting", exc)
    except Exception:
        log.exception("nbd connection failed")
    finally:
        with trio.CancelScope(shield=True):
            for export in opened:
                await _close(export)
            await trio.aclose_forcefully(stream)


def _bad_client(failures: LogLimit | None, stream, what: str, exc: BaseException | str,
                level: int = logging.WARNING) -> None:
    """Warn of a client that broke the protocol (or took too long): a few lines a period
    per address (`failures`, the server's LogLimit), as anyone who reaches the port can
    make connections that fail as fast as it likes."""
    # (the socket of a plain stream, or under the TLS channel of an upgraded one)
    address = remote_address(getattr(stream, "socket", None)
                             or getattr(getattr(stream, "channel", None), "sock", None))
    if failures is None:
        log.log(level, "%s: %s (client %s)", what, exc, address)
    else:
        failures.log(log, level, ("bad_client", address), "%s: %s (client %s)",
                     what, exc, address)


async def _end_stopped(stream) -> None:
    """The end of a connection a graceful stop closes: its answers sent (those of the
    requests received meanwhile too: _Connection.refuse_more), this side shut (the
    client reads them all, then the end), and what the client still sends read and
    dropped for up to STOP_DRAIN: closed with unread input, the socket would send a
    reset, which can destroy answers the client has not read yet."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return
    sock.shutdown(socket.SHUT_WR)
    with trio.move_on_after(STOP_DRAIN):
        while await stream.receive_some(64 * 1024):
            pass


async def _end_tls(channel) -> None:
    """The clean end of a TLS session (proto.md, NBD_CMD_DISC: the server "shut[s] down
    the TLS session ... and close[s] the TCP session"): close_notify sent, the client's
    not awaited. Without it a client cannot tell the end from a truncation (Python's ssl
    raises, libnbd reports a session "non-properly terminated")."""
    with trio.move_on_after(TLS_CLOSE_TIMEOUT):
        await channel.aclose()


async def _close(export) -> None:
    try:
        await _resolve(export.close())
    except Exception:
        log.exception("closing export %r failed", getattr(export, "name", "?"))


async def _answer_export(hs: ServerHandshake, provider, query: ExportQuery, held: list,
                         limit: trio.CancelScope | None):
    """Answer `query` with the export's info, or with the error opening it raised. An
    export opened for NBD_OPT_INFO only is closed again at once. The handshake's `limit`
    stops meanwhile (it moves on by the time taken): the provider may legitimately take
    long, and an export must not be left half opened or half closed by it. None: the
    clock runs (past UNTIMED_OPENS opens), and the open is shielded from it instead; the
    limit then ends the negotiation as soon as the open is over."""
    if limit is None:
        with trio.CancelScope(shield=True):
            await _open_for(hs, provider, query, held)
        return
    deadline, limit.deadline = limit.deadline, math.inf
    started = trio.current_time()
    try:
        await _open_for(hs, provider, query, held)
    finally:
        limit.deadline = deadline + (trio.current_time() - started)


async def _open_for(hs: ServerHandshake, provider, query: ExportQuery, held: list) -> None:
    if query.kind == "info" and hasattr(provider, "export_info"):
        # a provider that can tell an export's facts without opening it (opening may
        # take a lease, publish, reconcile: not for a client that only asks)
        try:
            facts = await _resolve(provider.export_info(query.name))
        except Exception as exc:
            hs.provide_error(*_refusal(exc, f"export {shown(query.name)}"))
            return
        hs.provide_export(export_info(facts))
        return
    try:
        export = await _resolve(provider.open_export(query.name))
    except Exception as exc:
        hs.provide_error(*_refusal(exc, f"export {shown(query.name)}"))
        return
    held.append(export)
    hs.provide_export(export_info(export))
    if query.kind == "info":
        held.remove(export)
        await _close(export)


async def _answer_list(hs: ServerHandshake, provider) -> None:
    try:
        exports = list(await _resolve(provider.list_exports()))
    except Exception as exc:
        hs.provide_error(*_refusal(exc, "the list of exports"))
        return
    hs.provide_list(exports)


def _refusal(exc: Exception, what: str) -> tuple[int, str]:
    """The option error (reply type, message) the provider's failure about `what`
    becomes, logged: a bug with its traceback (and no detail for the client), a vbp error
    (a registry outage, a lease held elsewhere) in one line with its message."""
    rtype = to_option_error(exc)
    if not isinstance(exc, VbpError):
        log.exception("nbd: %s failed", what)
        return rtype, f"{what}: internal error"
    if rtype == proto.REP_ERR_UNKNOWN:  # (not its message: it may repeat a long name whole)
        log.info("nbd client asked for %s, which does not exist", what)
        return rtype, f"{what} does not exist"
    log.warning("nbd: %s not available: %s", what, exc)
    return rtype, f"{what}: {exc}"


async def _send_pending(stream, hs: ServerHandshake) -> None:
    out = hs.data_to_send()
    if out:
        await stream.send_all(out)


async def _handshake(stream, provider, held: list, tls: str = "off", tls_context=None,
                     stopping: trio.Event | None = None, slot: _Slot | None = None):
    """Negotiate; return (stream, Ready, trailing bytes) with the export in held[0], or
    None when the client left. The stream is the TLS one if the client upgraded.

    The whole negotiation, from the greeting to the hand-over to transmission, sends and
    the TLS handshake included, gets HANDSHAKE_TIMEOUT (then trio.TooSlowError): a client
    trickling its options in, or sending them and never reading the replies, would
    otherwise hold the connection (and an unauthenticated one its memory) forever; qemu
    fixed the same in CVE-2024-7409. Only the provider opening an export stops the clock
    (_answer_export): that may legitimately wait, for a write lease to change hands up to
    a lease period, and the client cannot make it slower.

    Once `stopping` (serve_nbd's) is set, an export or list asked for is refused with
    NBD_REP_ERR_SHUTDOWN (proto.md: a server being shut down SHOULD error further
    options so), never opened: in blockd an open publishes the export or takes a
    head's lease while the stop waits for the gateways to close.

    `slot` (_admit's) is held while an export is opened, and for good once one is: until
    then a new connection finding every slot taken may close this one (_Slots)."""
    with trio.fail_after(HANDSHAKE_TIMEOUT) as limit:
        return await _negotiate(stream, provider, held, tls, tls_context, limit, stopping,
                                slot)


async def _negotiate(stream, provider, held: list, tls: str, tls_context,
                     limit: trio.CancelScope, stopping: trio.Event | None = None,
                     slot: _Slot | None = None):
    hs = ServerHandshake(tls)
    await stream.send_all(hs.initial_bytes())
    opens = 0
    while True:
        event = hs.next_event()
        if event is NEED_DATA:
            await _send_pending(stream, hs)
            data = await stream.receive_some(HANDSHAKE_RECEIVE)
            if not data:
                return None
            hs.receive_data(data)
        elif event is SEND_DATA:
            await _send_pending(stream, hs)
        elif (isinstance(event, (ExportQuery, ListQuery)) and stopping is not None
              and stopping.is_set()):
            hs.provide_error(proto.REP_ERR_SHUTDOWN, "the server is shutting down")
        elif isinstance(event, ExportQuery):
            await _send_pending(stream, hs)  # (see ListQuery)
            opens += 1
            if slot is not None:
                await slot.hold()
            await _answer_export(hs, provider, event, held,
                                 limit if opens <= UNTIMED_OPENS else None)
            if slot is not None and not held:  # (information only, or refused)
                slot.release()
        elif isinstance(event, ListQuery):
            # The replies so far go first: a client pipelining options and reading
            # nothing makes us ask the provider (blockd: the registry) no more than its
            # socket takes replies.
            await _send_pending(stream, hs)
            await _answer_list(hs, provider)
        elif isinstance(event, StartTLS):
            await _send_pending(stream, hs)  # (the ACK, in the clear)
            stream = await _start_tls(stream, tls_context)
            if stream is None:
                return None
            hs.tls_started()
        elif isinstance(event, Ready):
            await _send_pending(stream, hs)
            return stream, event, hs.trailing_data
        elif isinstance(event, Aborted):
            await _send_pending(stream, hs)
            log.debug("nbd handshake ended: %s", event.reason)
            return None
        else:  # PAUSED cannot happen: every query is answered above
            raise RuntimeError(f"unexpected handshake event {event!r}")


async def _start_tls(stream, context):
    """The server side of the TLS handshake over `stream`: the TLS stream, or None (logged)
    when the handshake failed, e.g. a client certificate the CA did not sign. On a socket
    that is a TLSChannelStream, whose channel the connection's fast path uses; on another
    transport (tests) a trio.SSLStream."""
    sock = plain_socket(getattr(stream, "socket", None))
    if sock is not None:
        session = TLSChannel(sock, context)
        tls, shake = TLSChannelStream(session), session.handshake
    else:
        tls = session = trio.SSLStream(stream, context, server_side=True)
        shake = tls.do_handshake
    try:  # (timed by the handshake's limit)
        await shake()
    except (ssl.SSLError, trio.BrokenResourceError, OSError) as exc:
        log.warning("nbd TLS handshake failed, disconnecting: %s", exc.__cause__ or exc)
        return None
    log.debug("nbd connection upgraded to %s (client certificate: %s)", session.version(),
              peer_name(session) or "none")
    return tls


class _Connection:
    def __init__(self, stream, export, ready: Ready, trailing: bytes,
                 ids: RequestIds | None = None, stopping: trio.Event | None = None,
                 send_timeout: float = SEND_TIMEOUT, held: HeldBytes | None = None,
                 failures: LogLimit | None = None) -> None:
        self.stream = stream
        self.failures = LogLimit() if failures is None else failures
        self.send_timeout = send_timeout
        self.stopping = stopping  # serve_nbd's: set, the reader stops (stop_reading)
        self.ids = ids
        self.export = export
        self.codec = TransmissionCodec(
            size=export.size, read_only=bool(export.read_only),
            structured=ready.structured_replies, meta_contexts=ready.meta_contexts,
            min_block=getattr(export, "min_block", 1), max_payload=max_payload(export),
            initial_data=trailing)
        self.sock = getattr(stream, "socket", None)
        # the plain socket under trio's wrapper, for calls that do not yield when they
        # succeed; after STARTTLS, the TLS channel that makes the same calls
        tls = getattr(stream, "channel", None)
        self.raw = tls if tls is not None else plain_socket(self.sock)
        self.copy_writes = inspect.iscoroutinefunction(export.write)
        self.prepare_writes = getattr(export, "prepare_writes", None)  # (optional)
        self.begin_writes = getattr(export, "begin_writes", None)  # (optional, together)
        self.end_writes = getattr(export, "end_writes", None) if self.begin_writes else None
        # (optional; not for an export that copies what it keeps: write() is async there)
        self.write_run = None if self.copy_writes else getattr(export, "write_run", None)
        # (never with TLS: a FileRange goes from the page cache to the socket in the clear)
        read_ref = getattr(export, "read_ref", None) if self.raw is not None and tls is None \
            else None
        self.read = read_ref or export.read
        # optional hook of the export: observe(command, nbytes, seconds, ok, count), for
        # `count` requests of `command` that took `seconds` each, `nbytes` in all
        self.observe = getattr(export, "observe", None)
        self.received_at = perf_counter()  # when the batch being dispatched came in
        # requests answered in this batch's dispatch, per command, for observe_sent
        self.sent_count = [0] * _COMMANDS
        self.sent_bytes = [0] * _COMMANDS
        self.to_observe = False
        self.out: list = []
        self.out_bytes = 0
        self.inflight = 0
        self.inflight_bytes = 0  # of the READs and WRITEs among them (MAX_IN_FLIGHT_BYTES)
        self.sending = 0  # bytes of the writer's send under way
        # the server's budget (HeldBytes), what this connection last reported to it, and
        # its caps now: MAX_IN_FLIGHT_BYTES and MAX_QUEUED, FAIR_SHARE while over budget
        self.held = held
        self.charged = 0
        self.waiting_request: Request | None = None  # taken, waiting for the budget (wait_budget)
        self.max_bytes = MAX_IN_FLIGHT_BYTES
        self.max_queued = MAX_QUEUED
        self.closing = False
        self.writing = False  # the writer task is in the middle of a send
        self.files = False  # a FileRange may be queued: sends go through _send_mixed
        self.wake = trio.Event()
        self.room = trio.Event()
        self.nursery: trio.Nursery | None = None

    async def run(self) -> bool:
        """Serve the connection to its end: True when it ended cleanly (NBD_CMD_DISC, the
        client's end of input, a graceful stop) with every answer sent."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self.writer)
                dropped = getattr(self.export, "dropped", None)
                watch = trio.CancelScope()
                if dropped is not None:  # the export can end its connections (e.g. fenced)
                    nursery.start_soon(self._drop_when, dropped, nursery.cancel_scope, watch)
                reading, watch_stop = trio.CancelScope(), trio.CancelScope()
                if self.stopping is not None:
                    nursery.start_soon(self._stop_reading, reading, watch_stop)
                try:
                    with reading:  # (a graceful stop: the requests taken are answered)
                        await self.reader()
                except ProtocolError as exc:  # handled here: the nursery would wrap it in a group
                    _bad_client(self.failures, self.stream, "nbd protocol error, disconnecting",
                                exc)
                    nursery.cancel_scope.cancel()
                    return
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log.debug("nbd connection lost: %r", exc)
                    nursery.cancel_scope.cancel()
                    return
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                watch.cancel()  # the client is gone: stop watching the export
                watch_stop.cancel()
                if reading.cancelled_caught and not self.refuse_rest():
                    try:
                        await self.refuse_more()
                    except (trio.BrokenResourceError, trio.ClosedResourceError,
                            OSError) as exc:
                        log.debug("nbd connection lost: %r", exc)
                        nursery.cancel_scope.cancel()
                        return
                self.closing = True
                self.wake.set()
            return not nursery.cancel_scope.cancel_called
        finally:
            _release(self.out)  # what an ended connection never sent
            held = self.held
            if held is not None:  # what it held, given back (waking those held back)
                held.waiting.discard(self)
                held.add(-self.charged)
                self.charged = 0
                self.held = None  # (a Later completing after the end charges nothing)

    def refuse_rest(self) -> bool:
        """A graceful stop: answer the requests received and not taken (the one waiting
        for the budget, those whole in the receive buffer) with NBD_ESHUTDOWN, as
        proto.md asks ("Terminating the transmission phase"), rather than leave them
        unanswered. True when the client is done: it disconnected (NBD_CMD_DISC), or
        sent what is not a request; False when it may send more (NEED_DATA: a request
        not whole is answered once it is, by refuse_more)."""
        codec = self.codec
        event, self.waiting_request = self.waiting_request, None
        while True:
            if event is not None:
                self.queue(codec.reply_error(event.cookie, event.command, proto.ESHUTDOWN,
                                             "the server is stopping"))
            try:
                event = codec.next_event()
            except ProtocolError:
                return True
            if type(event) is not Request and type(event) is not BadRequest:
                return event is not NEED_DATA

    async def refuse_more(self) -> None:
        """A graceful stop, after refuse_rest: go on reading, and answer every request
        with NBD_ESHUTDOWN, until the client disconnects (NBD_CMD_DISC, which proto.md
        has it send once it receives ESHUTDOWN, or its end of input), or STOP_DRAIN has
        passed and the requests taken are all answered. proto.md ("Terminating the
        transmission phase"): the error for the requests in flight at a shutdown "and
        any subsequently received requests SHOULD be ESHUTDOWN". A client learns of the
        stop only from an answer, so requests it sends meanwhile (crossing them, or
        while a write taken is still under way) were read and dropped after this side
        was shut, never answered. Answered here, before the shutdown of the write side
        (after it nothing can be sent). A client that takes none of its answers is
        waited for up to the same deadline (the writer cuts it off at send_timeout)."""
        codec, raw = self.codec, self.raw
        self.push()
        if self.to_observe:
            self.observe_sent()
        end = trio.current_time() + STOP_DRAIN
        while True:
            await trio.lowlevel.checkpoint()
            if trio.current_time() >= end:
                if not self.inflight:
                    return
                end = trio.current_time() + STOP_LOOK  # (answers still to come: go on)
            with trio.move_on_at(end):
                if self.queued() > self.max_queued:
                    self.room = trio.Event()  # (set by the writer as it sends)
                    await self.room.wait()
                    continue
                buf = codec.get_buffer()
                if raw is None:
                    n = await self._receive_some(buf)
                else:
                    head = codec.head_after()
                    into = buf if head is None else (buf, head)
                    try:  # (first: a TLS channel may hold bytes the socket does not show)
                        n = raw.recv_into(into) if head is None else raw.recvmsg_into(into)[0]
                    except BlockingIOError:
                        n = await receive_wait(raw, into)
                if not n:
                    return
                codec.commit(n)
                if self.refuse_rest():
                    return
                self.push()

    async def _receive_some(self, buf) -> int:
        """Receive into `buf` through the stream: a TLS channel, or a stream with no plain
        socket under it (the reader's and refuse_more's way when `raw` is None)."""
        data = await self.stream.receive_some(len(buf))
        n = len(data)
        buf[:n] = data
        return n

    async def _stop_reading(self, reading: trio.CancelScope, watch: trio.CancelScope) -> None:
        """Once serve_nbd is stopping, read no more requests: the reader ends as when the
        client disconnects, and the writer sends the answers of those taken, then ends."""
        with watch:
            await self.stopping.wait()
            reading.cancel()

    async def _drop_when(self, event, scope, watch) -> None:
        with watch:
            await event.wait()
            log.warning("nbd export %s ended the connection", getattr(self.export, "name", "?"))
            scope.cancel()

    # --- reading and dispatch ----------------------------------------------------------------
    async def reader(self) -> None:
        codec = self.codec
        raw = self.raw
        spins = 0
        if self.ids is not None:
            self.ids.bind()
        deferred = False
        run, last = 0, -1  # requests in a row of command `last`: only a run pays for taking
        since = 0  # requests taken since the reader last let the other tasks run
        while True:
            while True:
                if run < TAKE_RUN or not (n := self.take_run(last)):
                    n = 1
                    event = codec.next_event()
                    kind = type(event)
                    if kind is Request:
                        cmd = event.command
                        if cmd == last:
                            run += 1
                        elif cmd <= proto.CMD_WRITE:  # (a read or a write starts a run)
                            run, last = 1, cmd
                        else:
                            run = 0
                        if (cmd == proto.CMD_READ and self.max_bytes == FAIR_SHARE
                                and not self.fits(event.length)):
                            self.push()  # (over the budget: HELD_LIMIT)
                            if self.to_observe:
                                self.observe_sent()
                            self.waiting_request = event  # (a stop answers it: refuse_rest)
                            if not await self.wait_budget(event.length):
                                return  # (the client went away meanwhile)
                            self.waiting_request = None
                            since = 0
                        self.dispatch(event)
                    elif kind is BadRequest:
                        self.queue(codec.reply_error(event.cookie, event.command, event.errno,
                                                     _REFUSALS.get(event.errno, "refused")))
                    elif event is NEED_DATA:
                        break
                    else:  # Disconnect: what was answered goes with the writer
                        if self.to_observe:
                            self.observe_sent()
                        return
                since += n
                if (self.inflight >= MAX_IN_FLIGHT or self.out_bytes > self.max_queued
                        or self.inflight_bytes >= self.max_bytes):
                    self.push()
                    if self.to_observe:
                        self.observe_sent()
                    await self.wait_room()
                    since = 0
                elif since >= YIELD_REQUESTS:  # (a client pipelining small requests that
                    since = 0  # are answered at once: one receive holds thousands)
                    self.push()
                    if self.to_observe:
                        self.observe_sent()
                    await trio.lowlevel.checkpoint()
            if deferred or not self.deferrable():
                self.push()
                deferred = False
                if self.to_observe:
                    self.observe_sent()
            else:
                deferred = True
            if self.held is not None:
                self.recharge()
                if (self.max_bytes == FAIR_SHARE and self.charged >= FAIR_SHARE
                        and not codec.receiving):
                    await self.wait_room()
            if self.queued() > self.max_queued:
                await self.wait_room()  # (many small replies: checked once a batch)
            buf = codec.get_buffer()
            if raw is None:
                n = await self._receive_some(buf)
            else:
                head = codec.head_after()
                try:
                    n = raw.recv_into(buf) if head is None else raw.recvmsg_into((buf, head))[0]
                except BlockingIOError:
                    spins = 0
                    if deferred:  # (the client sends no more for now: they go)
                        self.push()
                        deferred = False
                        if self.to_observe:
                            self.observe_sent()
                    into = buf if head is None else (buf, head)
                    if self.inflight or not codec.pool_to_release():
                        n = await receive_wait(raw, into)
                    else:  # (idle: after POOL_IDLE, its payload buffers go)
                        n = -1
                        with trio.move_on_after(POOL_IDLE):
                            n = await receive_wait(raw, into)
                        if n < 0:
                            codec.release_pool()
                            n = await receive_wait(raw, into)
                else:
                    spins += 1
                    if spins >= SPIN_BATCHES or self.inflight:
                        spins = 0
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.lowlevel.checkpoint_if_cancelled()
            if not n:
                return
            codec.commit(n)
            if not deferred:  # (else the answers held back count from their batch)
                self.received_at = perf_counter()
            held = self.held
            if held is not None:  # (the caps for this batch, by the budget as it is now)
                if held.total > held.limit:
                    self.max_bytes = self.max_queued = FAIR_SHARE
                elif self.max_bytes == FAIR_SHARE:
                    self.max_bytes, self.max_queued = MAX_IN_FLIGHT_BYTES, MAX_QUEUED
            if self.prepare_writes is not None:
                try:  # (the export asks for the offsets only when it has a use for them)
                    self.prepare_writes(codec.write_offsets)
                except Exception:  # a hint: each write meets the same failure and answers it
                    log.debug("preparing the writes received failed", exc_info=True)

    def deferrable(self) -> bool:
        """Whether the answers of the batch just read may wait for the next one: the next
        request is a large write whose payload is arriving (the client has sent it; no
        client waits for an answer to send the rest of a request), and they are few
        (DEFER_MAX: the reader's waits for room, which would wait for them to leave,
        are for more than that; the one for the budget's fair share is not for a reader
        receiving a payload). Sent with the next batch's, in one sendmsg, or as soon as
        a receive finds nothing more. On loopback the sendmsg of an answer delivers it,
        and the client's queued bytes its ACK lets go, in this thread: sending half as
        many took a 1 MiB sequential write QD8 from about 2,300 to 2,440 MiB/s on one
        blockd (fio nbd engine). At most one batch: a write's answer waits for the next
        write's payload, about 0.4 ms at 1 MiB, never longer."""
        return self.raw is not None and self.codec.receiving > 0 and self.queued() <= DEFER_MAX

    async def wait_room(self) -> None:
        held = self.held
        if held is not None:
            self.recharge()
        while (self.inflight >= MAX_IN_FLIGHT
               or self.queued() > self.max_queued
               or self.inflight_bytes >= self.max_bytes
               or self.max_bytes == FAIR_SHARE and self.charged >= FAIR_SHARE
               and not self.codec.receiving):
            self.room = trio.Event()
            if held is not None:  # (woken too when the budget is back under: recharge)
                held.waiting.add(self)
            try:
                await self.room.wait()
            finally:
                if held is not None:
                    held.waiting.discard(self)
                    self.recharge()
            # (the writer wakes us as it gives back what it was sending, its client gone,
            # and then ends the connection: no request more, a 32 MiB read's copy each)
            await trio.lowlevel.checkpoint_if_cancelled()

    def fits(self, need: int) -> bool:
        """Whether a read of `need` bytes may be taken now as far as the server's budget
        goes: it is not over, or the read fits this connection's FAIR_SHARE with what the
        connection holds now (recharged)."""
        self.recharge()
        return self.max_bytes != FAIR_SHARE or self.charged + need <= FAIR_SHARE

    async def wait_budget(self, need: int) -> bool:
        """Wait, while the server's budget is over (HELD_LIMIT), until a read of `need`
        bytes fits this connection's FAIR_SHARE, or the budget is back under. False if the
        client went away meanwhile (looked at every GONE_CHECK: a peek at the socket; a
        TLS connection is not looked at, its bytes being the session's)."""
        held = self.held
        while not self.fits(need):
            self.room = trio.Event()
            held.waiting.add(self)
            try:
                with trio.move_on_after(GONE_CHECK):
                    await self.room.wait()
            finally:
                held.waiting.discard(self)
            if self.raw is not None and _gone(self.raw):
                return False
        return True

    def queued(self) -> int:
        """What the replies queued for the writer hold: their bytes, and QUEUED_ITEM more
        for each buffer."""
        return self.out_bytes + len(self.out) * QUEUED_ITEM

    def recharge(self) -> None:
        """Report what this connection holds to the server's budget, and set its caps:
        FAIR_SHARE while the budget is over (a connection holding less may still take
        requests up to it), else MAX_IN_FLIGHT_BYTES and MAX_QUEUED."""
        held = self.held
        mine = self.inflight_bytes + self.queued() + self.sending + self.codec.receiving
        if mine != self.charged:
            held.add(mine - self.charged)
            self.charged = mine
        if held.total > held.limit:
            self.max_bytes = self.max_queued = FAIR_SHARE
        else:
            self.max_bytes, self.max_queued = MAX_IN_FLIGHT_BYTES, MAX_QUEUED

    def take_run(self, cmd: int) -> int:
        """Take the reads (`cmd` CMD_READ) or the writes at the front of the buffer and
        dispatch them: how many (0 when there are none there)."""
        codec = self.codec
        if cmd == proto.CMD_READ:
            taken = codec.take_reads(MAX_IN_FLIGHT - self.inflight, self.max_queued - self.out_bytes)
            if taken:
                self.dispatch_reads(taken)
        else:
            taken = codec.take_writes(MAX_IN_FLIGHT - self.inflight)
            if taken:
                self.dispatch_writes(taken)
        return len(taken)

    def dispatch(self, req: Request) -> None:
        """Hand `req` to the export, its request id named while the export handles it, and
        queue the answer, or arrange for it (a task, a Later): _answer."""
        ids = self.ids
        if ids is not None:  # vbp.reqid: no context change for the synchronous part
            ids.seq += 1
            reqid.dispatching = ids
        try:
            export, cmd = self.export, req.command
            try:
                if cmd == proto.CMD_READ:
                    result = self.read(req.offset, req.length)
                elif cmd == proto.CMD_WRITE:
                    data = keepable(req.data) if self.copy_writes else req.data
                    result = export.write(req.offset, data, bool(req.flags & proto.CMD_FLAG_FUA))
                elif cmd == proto.CMD_FLUSH:
                    result = export.flush()
                elif cmd == proto.CMD_TRIM:
                    result = export.trim(req.offset, req.length, bool(req.flags & proto.CMD_FLAG_FUA))
                elif cmd == proto.CMD_WRITE_ZEROES:
                    f = req.flags
                    result = export.write_zeroes(
                        req.offset, req.length, bool(f & proto.CMD_FLAG_FUA),
                        not f & proto.CMD_FLAG_NO_HOLE, bool(f & proto.CMD_FLAG_FAST_ZERO))
                elif cmd == proto.CMD_CACHE:
                    result = export.cache(req.offset, req.length)
                else:
                    result = export.block_status(req.offset, req.length)
            except Exception as exc:
                self._failed(req, exc)
                return
            self._answer(req, result)
        finally:
            if ids is not None:
                reqid.dispatching = None

    def dispatch_reads(self, reads: list) -> None:
        """dispatch() of each (cookie, offset, length) plain read TransmissionCodec.
        take_reads gave, in order, with no Request made for one answered with its bytes
        at once. One function on purpose: this runs per read."""
        ids, read, header = self.ids, self.read, self.codec.read_header
        answered = nbytes = 0
        try:
            for cookie, offset, length in reads:
                if ids is not None:
                    ids.seq += 1
                    reqid.dispatching = ids
                try:
                    try:
                        result = read(offset, length)
                    except Exception as exc:
                        self._failed(Request(cookie, proto.CMD_READ, 0, offset, length), exc)
                        continue
                    if type(result) is bytes and len(result) == length and result:
                        h = header(cookie, offset, length)
                        self.out += (h, result)  # (not aliased: a Later's callback may push)
                        self.out_bytes += len(h) + length
                        answered += 1
                        nbytes += length
                    else:
                        self._answer(Request(cookie, proto.CMD_READ, 0, offset, length), result)
                finally:
                    if ids is not None:
                        reqid.dispatching = None
        finally:
            self._count_sent(proto.CMD_READ, answered, nbytes)

    def dispatch_writes(self, writes: list) -> None:
        """dispatch_reads for the (cookie, flags, offset, length, data) plain writes
        TransmissionCodec.take_writes gave: no Request made for one the export completes
        at once (returns None)."""
        ids, write = self.ids, self.export.write
        answered = nbytes = 0
        end = self.end_writes
        if end is not None:
            self.begin_writes(len(writes))
        try:
            if self.write_run is not None:
                try:
                    answered = self.write_run(writes, ids)
                except Exception:  # (each write meets it in write(), one by one, and answers)
                    log.debug("a run of writes failed: they go one by one", exc_info=True)
                    answered = 0
                if type(answered) is tuple:  # taken, under way: answered by run_done
                    taken, parts = answered
                    answered = 0
                    self._run_taken(writes, taken, parts)
                    if ids is not None:
                        ids.seq += taken  # (their ids, in the run's WriteBatch frames)
                    writes = writes[taken:] if taken < len(writes) else ()
                elif answered:  # (written: answered as write() returning None would be)
                    pack, out = self.codec.reply_ok_simple, self.out
                    for k in range(answered):
                        out.append(pack(writes[k][0]))
                        nbytes += writes[k][3]
                    self.out_bytes += answered * len(out[-1])
                    if ids is not None:
                        ids.seq += answered  # (their ids, unused: nothing was logged)
                    writes = writes[answered:] if answered < len(writes) else ()
            for cookie, flags, offset, length, data in writes:
                if ids is not None:
                    ids.seq += 1
                    reqid.dispatching = ids
                try:
                    if self.copy_writes:
                        data = keepable(data)
                    try:
                        result = write(offset, data, bool(flags & proto.CMD_FLAG_FUA))
                    except Exception as exc:
                        self._failed(Request(cookie, proto.CMD_WRITE, flags, offset, length, data), exc)
                        continue
                    if result is None:
                        reply = self.codec.reply_ok(cookie, proto.CMD_WRITE)
                        self.out += reply  # (not aliased: a Later's callback may push)
                        self.out_bytes += len(reply[0])
                        answered += 1
                        nbytes += length
                    else:
                        self._answer(Request(cookie, proto.CMD_WRITE, flags, offset, length, data), result)
                finally:
                    if ids is not None:
                        reqid.dispatching = None
        finally:
            if end is not None:
                end()
            self._count_sent(proto.CMD_WRITE, answered, nbytes)

    def _run_taken(self, writes: list, taken: int, parts) -> None:
        """The first `taken` of `writes` are under way in `parts` ((places, Later) each:
        write_run): in flight until run_done answers each part's."""
        self.inflight += taken
        self.inflight_bytes += sum([w[3] for w in writes[:taken]])
        t0 = self.received_at
        for places, later in parts:
            run = [writes[k][:4] for k in places]  # (cookie, flags, offset, length: no data)
            later.bind(partial(self.run_done, run, t0), self._run_deferred)

    def _run_deferred(self, awaitable) -> bool:
        """A run's Later never continues as an awaitable (each write's own does): a bug."""
        log.error("a run of writes was deferred: its writes are never answered")
        return False

    def run_done(self, run: list, t0: float, outcomes, exc) -> None:
        """The writes `run` ((cookie, flags, offset, length) each) of a part of a run that
        write_run took are over (from another task's callback: never raises): `outcomes`
        holds each write's, None for written (answered here, as later_done would answer
        it), an exception for failed, or the write's own Later, answered when it
        completes (and in flight until then)."""
        try:
            if exc is not None:  # (the run itself failed: each of its writes with it)
                outcomes = [exc] * len(run)
            pack, out = self.codec.reply_ok_simple, self.out
            ok = nbytes = 0
            rest = []
            for w, outcome in zip(run, outcomes):
                if outcome is None:
                    out.append(pack(w[0]))
                    ok += 1
                    nbytes += w[3]
                else:
                    rest.append((w, outcome))
            if ok:
                self.out_bytes += ok * len(out[-1])
                self.inflight -= ok
                self.inflight_bytes -= nbytes
                if self.observe is not None:
                    self.observe(proto.CMD_WRITE, nbytes, perf_counter() - t0, True, ok)
            for (cookie, flags, offset, length), outcome in rest:
                req = Request(cookie, proto.CMD_WRITE, flags, offset, length)
                if type(outcome) is Later:
                    outcome.bind(partial(self.later_done, req, t0),
                                 partial(self.later_defer, req, t0))
                else:
                    self._answered(req)
                    self.fail(req, outcome)
                    if self.observe is not None:
                        self.observe(proto.CMD_WRITE, length, perf_counter() - t0, False)
        except Exception:
            log.exception("completing a run of nbd writes failed")
        finally:
            self._after_answers()

    def _count_sent(self, cmd: int, count: int, nbytes: int) -> None:
        """`count` requests of `cmd`, `nbytes` in all, answered in this batch's dispatch:
        observed with the batch's send (observe_sent)."""
        if count and self.observe is not None:
            self.sent_count[cmd] += count
            self.sent_bytes[cmd] += nbytes
            self.to_observe = True

    def _failed(self, req: Request, exc: Exception) -> None:
        """The export raised `exc` handling `req`."""
        self.fail(req, exc)
        if self.observe is not None:
            self.observe(req.command, req.length, perf_counter() - self.received_at, False)

    def _answer(self, req: Request, result) -> None:
        """Queue the export's answer to `req` (dispatched), or arrange for it."""
        cmd, t0 = req.command, self.received_at
        if type(result) is Later:
            self.inflight += 1
            if cmd <= proto.CMD_WRITE:
                self.inflight_bytes += req.length
            result.bind(partial(self.later_done, req, t0), partial(self.later_defer, req, t0))
        elif type(result) not in _PLAIN and inspect.isawaitable(result):
            self.inflight += 1
            if cmd <= proto.CMD_WRITE:
                self.inflight_bytes += req.length
            ids = self.ids
            token = current_rid.set((ids, ids.seq)) if ids is not None else None
            try:  # the task copies the context now: it keeps the request's id
                self.nursery.start_soon(self.finish, req, result, t0)
            finally:
                if token is not None:
                    current_rid.reset(token)
        else:
            if (type(result) is bytes and cmd == proto.CMD_READ and result
                    and len(result) == req.length):  # complete()'s common case, inline
                header = self.codec.read_header(req.cookie, req.offset, req.length)
                self.out += (header, result)
                self.out_bytes += len(header) + req.length
            else:
                self.complete(req, result)
            if self.observe is not None:  # _count_sent(cmd, 1, ...), less a call per request
                self.sent_count[cmd] += 1
                self.sent_bytes[cmd] += req.length
                self.to_observe = True

    def observe_sent(self) -> None:
        """The requests answered in the dispatch of the batch just sent, with one latency:
        from the batch's receipt to its send."""
        seconds = perf_counter() - self.received_at
        count, nbytes = self.sent_count, self.sent_bytes
        for cmd in range(len(count)):
            if count[cmd]:
                self.observe(cmd, nbytes[cmd], seconds, True, count[cmd])
                count[cmd] = nbytes[cmd] = 0
        self.to_observe = False

    async def finish(self, req: Request, awaitable, t0: float) -> None:
        ok = False
        try:
            result = await awaitable
        except Exception as exc:
            self.fail(req, exc)
        else:
            self.complete(req, result)
            ok = True
        finally:
            if self.observe is not None:
                self.observe(req.command, req.length, perf_counter() - t0, ok)
            self._answered(req)
            self.room.set()
            self.wake.set()  # the reader may be waiting for input: the writer sends this

    def later_done(self, req: Request, t0: float, result, exc) -> None:
        """A Later answer completed (from another task's callback: never raises)."""
        try:
            if exc is None:
                self.complete(req, result)
            else:
                self.fail(req, exc)
            if self.observe is not None:
                self.observe(req.command, req.length, perf_counter() - t0, exc is None)
        except Exception:
            log.exception("completing nbd %s failed", proto.CMD_NAMES.get(req.command))
        finally:
            self._answered(req)
            self._after_answers()

    def _after_answers(self) -> None:
        """Answers were queued from a callback (later_done, run_done): the reader may read
        again, and the writer sends them, or they are sent now when nothing else is in
        flight (QD1: no writer task switch)."""
        self.room.set()
        if self.inflight or self.closing or self.raw is None:
            self.wake.set()
        else:
            try:
                self.push()
            except OSError:  # the client is gone: the writer finds out and ends it
                self.wake.set()
            if self.held is not None:  # (sent without the writer: given back here)
                self.recharge()

    def later_defer(self, req: Request, t0: float, awaitable) -> bool:
        """A Later answer continues as an awaitable: run it like one. False when the
        connection's tasks are gone (it was cancelled): nothing will run it."""
        try:
            self.nursery.start_soon(self.finish, req, awaitable, t0)
        except RuntimeError:  # the nursery is closed: the connection ended
            self._answered(req)
            return False
        return True

    def _answered(self, req: Request) -> None:
        """`req`, counted in flight by _answer, is no longer."""
        self.inflight -= 1
        if req.command <= proto.CMD_WRITE:
            self.inflight_bytes -= req.length

    def complete(self, req: Request, result) -> None:
        codec, cmd = self.codec, req.command
        try:
            if cmd == proto.CMD_READ:
                reply = codec.reply_read(req.cookie, req.offset, req.length, result, req.flags)
                if type(result) is FileRange:
                    self.files = True
            elif cmd == proto.CMD_BLOCK_STATUS:
                reply = codec.reply_block_status(req.cookie, req.offset, req.length, result,
                                                 req.flags)
            else:
                reply = codec.reply_ok(req.cookie, cmd)
        except Exception as exc:
            log.exception("encoding the reply to %s failed", proto.CMD_NAMES.get(cmd, cmd))
            self.fail(req, exc)
            return
        self.queue(reply)

    def fail(self, req: Request, exc: Exception) -> None:
        errno = to_nbd_errno(exc)
        if errno == proto.EIO or errno == proto.ENOSPC:  # (a failing disk, a full one)
            name = getattr(self.export, "name", "?")
            self.failures.log(log, logging.WARNING, (name, req.command, failure_kind(exc)),
                              "nbd %s of %s failed: %r", proto.CMD_NAMES.get(req.command),
                              name, exc)
        self.queue(self.codec.reply_error(req.cookie, req.command, errno, str(exc)))

    def queue(self, buffers: list) -> None:
        """Queue a reply. Replies made while the reader dispatches a batch are sent by
        push() after the batch; a task finishing a request wakes the writer itself."""
        self.out.extend(buffers)
        for b in buffers:  # bytes, not items: the send accounting relies on it
            self.out_bytes += b.nbytes if type(b) is memoryview else len(b)

    def push(self) -> None:
        """Send what is queued, inline, unless the writer is sending: then it sends it."""
        if not self.out:
            return
        if self.raw is None or self.writing:
            self.wake.set()
            return
        buffers, total = self.out, self.out_bytes
        rest = (_send_mixed if self.files else send_now)(self.raw, buffers, total)
        if rest is None:
            self.out = []
            self.out_bytes = 0
            self.files = False
        else:
            self.out = rest
            self.out_bytes = sum(nbytes(b) for b in rest)
            self.wake.set()

    # --- writing -----------------------------------------------------------------------------
    async def writer(self) -> None:
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                while self.out:
                    buffers, self.out = self.out, []
                    total, self.out_bytes = self.out_bytes, 0
                    self.sending = total + len(buffers) * QUEUED_ITEM
                    self.room.set()
                    self.writing = True
                    try:
                        await self.send(buffers, total)
                    finally:
                        self.writing = False
                        self.sending = 0
                        if self.held is not None:  # (a reader held back by the budget
                            self.recharge()  # looks again)
                            self.room.set()
                self.files = False  # all sent, nothing queued
                if self.closing and self.inflight == 0:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("nbd client went away: %r", exc)
            self.nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            log.warning("nbd client took none of its replies for %g s, disconnecting",
                        self.send_timeout)
            self.nursery.cancel_scope.cancel()

    async def send(self, buffers: list, total: int) -> None:
        """Send `buffers` (`total` bytes); trio.TooSlowError when the client takes none of
        them for send_timeout."""
        if self.raw is None:  # (a stream without a socket: the whole send is timed)
            with trio.fail_after(self.send_timeout):
                await self.stream.send_all(b"".join(buffers))
            return
        sender = _send_mixed if self.files else send_now
        rest = sender(self.raw, buffers, total)
        try:
            while rest is not None:
                with trio.fail_after(self.send_timeout):
                    await trio.lowlevel.wait_writable(self.raw)
                rest = sender(self.raw, rest, -1)
        except BaseException:
            _release(rest)
            raise


def _release(buffers) -> None:
    for b in buffers or ():
        if type(b) is FileRange:
            b.release()


def _send_mixed(raw: socket.socket, buffers: list, total: int = -1):
    """send_now for a queue that may hold FileRanges: the buffers between them go with
    sendmsg (MSG_MORE when a range follows, so a reply header shares its data's first
    segment), each range with FileRange.send, released once all of it went."""
    i, end = 0, len(buffers)
    while i < end:
        j = i
        while j < end and type(buffers[j]) is not FileRange:
            j += 1
        if j > i:
            part = buffers[i:j]
            rest = send_now(raw, part, sum(map(nbytes, part)), socket.MSG_MORE if j < end else 0)
            if rest is not None:
                return rest + buffers[j:]
        if j == end:
            return None
        rng = buffers[j]
        while rng.length:
            try:
                n = rng.send(raw)
            except BlockingIOError:
                return buffers[j:]
            rng.advance(n)
        rng.release()
        i = j + 1
    return None


# --- a tiny runner for manual tests -------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nbd_frontend.server",
                                     description="Serve in-memory NBD exports.")
    parser.add_argument("--memory", action="append", default=[], metavar="NAME=SIZE[:ro]",
                        help="an in-memory export, e.g. disk=64M (repeatable)")
    parser.add_argument("--listen", default="127.0.0.1:10809", metavar="HOST:PORT")
    parser.add_argument("--tls", choices=TLS_MODES, default="off")
    parser.add_argument("--tls-cert", default="", metavar="PEM")
    parser.add_argument("--tls-key", default="", metavar="PEM")
    parser.add_argument("--tls-ca", default="", metavar="PEM",
                        help="require client certificates signed by this CA")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    context = None
    if args.tls != "off":
        try:
            context = server_context(args.tls_cert, args.tls_key, args.tls_ca)
            check_tls(args.tls, context)
        except (TLSConfigError, ValueError) as e:
            parser.error(f"--tls {args.tls}: {e}")
    elif args.tls_cert or args.tls_key or args.tls_ca:
        parser.error("--tls-cert, --tls-key and --tls-ca need --tls on or require")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    provider = MemoryProvider()
    for spec in args.memory or ["disk=64M"]:
        name, _, size = spec.partition("=")
        size, _, mode = size.partition(":")
        provider.add(name, parse_size(size), read_only=(mode == "ro"))
    host, _, port = args.listen.rpartition(":")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            actual = await nursery.start(partial(serve_nbd, tls=args.tls, tls_context=context),
                                         provider, host or "127.0.0.1", int(port))
            print(f"nbd listening on {host}:{actual}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
