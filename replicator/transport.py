"""The trio shell around the peer codec: a server for replica requests and a client pool.

Theory of operation (DESIGN.md, Speed). Each connection has one reader and one writer task.
The reader decodes every complete frame already received before reading again; the writer
takes every frame queued since its last send and sends them with one `sendmsg`, so a burst
of requests or replies costs one syscall each way, with no lock and no task per reply.

Pipelining: a long batch is not held back until its end. Once SEND_EARLY request buffers
wait on a busy link, `queue_all` sends them at once, and a server pushes its replies every
REPLY_EARLY; the peer starts on the first part of the batch while this side goes on with
the rest. When the gateway and its replicas share cores (3 hosts on one 2-core machine),
the stages then overlap instead of taking turns: a 4K random write at QD32, replicas=3,
went from about 5,400 to 6,800-7,800 IOPS (bench/results, 2026-12-02), at the same CPU
per write.

Server: `handler(message, peer_host_id)` returns a reply message, or an awaitable of one that
runs as a task of the connection (replies may then go out of order: request ids match them
up). A message on behalf of a client request (its `rid`, vbp.reqid) is handled, and its
failure logged, with that id as the current one. An exception from the handler becomes an
`Error` reply (replicator.errors) and the connection lives on; only a protocol error or a broken socket closes it. At most
`max_in_flight` awaitable requests run per connection: past that the reader stops reading
and TCP pushes back on the sender; so it does past MAX_REPLY_BACKLOG bytes of replies
unsent, and a peer that takes none of them for `send_timeout` loses its connection. A
peer host that connects again supersedes its earlier connection, which then handles none
of the requests it still holds (_ServerSession._supersede: they would land after the new
connection's, older writes over newer). An
optional `prepare(batch)` sees the (request id, message) pairs of each batch before any
of them is handled (the replica marks the chunks the batch writes dirty in one commit:
Replica.prepare); a batch is what one receive completed.

Client (`PeerPool`): one connection per address, opened and handshaken by a task of the
pool's nursery and shared by every caller; requests are multiplexed by request id. When a
connection dies every pending call fails at once with PeerUnavailable and the next call
opens a new connection. Timeouts are per call. A `FaultPolicy` is consulted on every call:
the one place tests and the simulation inject network faults (CONVENTIONS 8).
`incarnation(host)` tells the processes of a peer apart: a reconnection to the server that
answered before (same HelloOk.boot) is the same incarnation, a restarted one a new one.
`call_all` sends one message to several peers (a replicated write): encoded once, framed
per connection, and the caller parks once for all the replies, with no task per peer.
`queue_all` is the same with a callback instead of a parked caller (the gateway's write
path: no task per write either), for peers that are `ready()`.

Sockets are used through the plain socket under trio's (vbp.sockets, see _Link): a call
that succeeds returns without a trip through the scheduler.

Peer authentication (PEER_REV 10), when the hosts are given a peer secret (blockd's
peer_secret_file: the same on every host, as DRBD's shared-secret): the client's Hello
carries a random nonce; the server's HelloOk carries one too and its proof, an HMAC-SHA256
under the secret of both nonces, the cluster and its host id; the client checks it (it
talks to a host of the pool, not to whoever took the address) and answers with an Auth,
its own proof the other way round. The server serves nothing before a good Auth, and one
side with a secret refuses the other without. Without it, any client that names the
cluster is a peer: the peer port then belongs on a private network (the operator guide).
The frames are neither signed nor encrypted: the secret keeps strangers out, not someone
who can change the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import random
import secrets
import socket
from typing import Any, Awaitable, Callable, Iterable

import outcome
import trio
from trio.lowlevel import Abort, ParkingLot, current_task, reschedule, wait_task_rescheduled

from replicator import messages as m
from replicator.codec import (CLOSED, DEFAULT_MAX_FRAME, MAX_ARRAY_ITEMS, NEED_DATA, PeerCodec,
                              frame, prepare)
from replicator.errors import (
    AuthFailed,
    ClusterMismatch,
    PeerProtocolError,
    VersionMismatch,
    error_to_exception,
    exception_to_error,
)
from vbp.buffers import HEAD_RECV
from vbp.errors import PeerUnavailable
from vbp.loglimit import LogLimit, failure_kind
from vbp.sockets import (HAVE_LOWAT, KEEPALIVE, LOWAT_MIN, apply_congestion, nbytes,
                         open_listeners, plain_socket, receive_wait, remote_address, send_all,
                         send_now, set_keepalive, set_rcvlowat, wait_for_rest)
from vbp.reqid import current as current_rid

log = logging.getLogger("vbp.replicator.transport")

RECV_SIZE = 256 * 1024
SPIN_RECEIVES = 8  # receives without waiting before the reader yields anyway
HANDSHAKE_TIMEOUT = 10.0
HELLO_MAX_FRAME = 64 * 1024  # frames a peer may send before its Hello is checked
# A server session's receive buffer until the Hello is checked: a connection that never
# says Hello (a scan, a flood of half-open ones) holds this for the handshake timeout,
# not RECV_SIZE; a Hello is a few dozen bytes, a larger frame comes in several receives
HELLO_RECV = 4 * 1024
DEFAULT_MAX_IN_FLIGHT = 256
# Pipelining (see the module docstring): buffers queued on a busy link before they are sent
# without waiting for the end of the batch, by a client (requests) and a server (replies)
SEND_EARLY = 16
REPLY_EARLY = 8
# Bytes of replies a server session may have queued and unsent (its peer not reading):
# past this its reader waits for the writer to send them before it reads more requests,
# so TCP pushes back on the peer. Requests answered at once (a ReadChunk of a chunk's
# bytes) are not counted by max_in_flight.
MAX_REPLY_BACKLOG = 64 * 1024 * 1024
# Seconds a server session's peer may take none of its replies before the session ends
# (serve_peers' send_timeout; blockd: peer_timeout): the backlog above would otherwise be
# held for as long as the peer likes.
SEND_TIMEOUT = 30.0
# Connections past their Hello a server keeps from one remote address (IP): a peer holds
# one per PeerPool (blockd has one), a few hosts may share an address (a sandbox), and
# each connection may hold its receive buffer, MAX_REPLY_BACKLOG and max_in_flight
# requests; a peer (or whatever passes the Hello) opening more is refused.
CONNECTIONS_PER_ADDRESS = 64

Handler = Callable[[Any, str], Any]

_REPLY_OK = frozenset(m.TYPE_IDS)


# --- plumbing shared by both sides ---------------------------------------------------------


class _Wakeup:
    """Wakes one parked task (the writer); cheaper than an Event per batch."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task = None

    def set(self) -> None:
        task = self._task
        if task is not None:
            self._task = None
            reschedule(task)

    async def wait(self) -> None:
        self._task = current_task()

        def abort(_):
            self._task = None
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)


class _Link:
    """One connection's socket, codec and writer queue.

    Socket calls go to the plain socket under trio's (vbp.sockets): a recv or send that
    succeeds costs no trip through the scheduler. The reader checkpoints after every few
    receives all the same (SPIN_RECEIVES), so other tasks and cancellation get their turn.
    While the server's reader drains a batch (`held`), the replies it queues wait for its
    push() after the batch, one sendmsg made inline; otherwise (replies of awaited
    requests, the client's requests) queuing wakes the writer task, which sends all that
    is queued at its turn. Only one of the two sends at a time (`sending`)."""

    def __init__(self, stream: trio.SocketStream, max_frame: int, recv_size: int = RECV_SIZE,
                 max_array_items: int | None = None):
        self.stream = stream
        self.sock = stream.socket
        self.raw = plain_socket(self.sock)  # links are TCP streams: there always is one
        if self.raw is None:
            raise TypeError(f"a peer link needs a socket, not {self.sock!r}")
        self.codec = PeerCodec(max_frame, max_array_items)
        self.out: list = []
        self.out_bytes = 0  # of `out` (a server session's backlog: MAX_REPLY_BACKLOG)
        self.queued = 0  # bytes ever queued: a frame's end is this after its _add
        self.in_send = 0  # bytes of the writer's send under way (not all taken yet)
        self.wakeup = _Wakeup()
        self.held = False  # the server's reader is dispatching a batch: it pushes
        self.sending = False  # the writer task is in the middle of a send
        self.drained: trio.Event | None = None  # set by the writer once all is sent (drain)
        self.spins = 0  # receives in a row that did not wait
        self.set_recv_size(recv_size)
        self.after_large = False  # the last receive went into a large frame's buffer
        self.lowat = 1 if HAVE_LOWAT else 0  # SO_RCVLOWAT in force; 0: not available
        # seconds the writer waits for the peer to take any of a send before it gives up
        # (trio.TooSlowError); a server session's peer is timed (SEND_TIMEOUT), a
        # client's calls time out on their own
        self.send_timeout = math.inf

    def set_recv_size(self, n: int) -> None:
        """Receive into a buffer of `n` bytes from now on (the codec keeps no view of it)."""
        self.rbuf = bytearray(n)
        self.rhead = memoryview(self.rbuf)[:HEAD_RECV]

    def queue(self, request_id: int, message) -> None:
        self.queue_frame(self.codec.encode(request_id, message))

    def _add(self, frame) -> None:
        if type(frame) is bytes:
            self.out.append(frame)
            n = len(frame)
        else:
            self.out.extend(frame)
            n = sum(map(nbytes, frame))
        self.out_bytes += n
        self.queued += n

    def taken(self) -> int:
        """How many of the bytes ever queued the socket has surely taken (a frame ending
        at or before this has left; one in a send under way counts as not yet)."""
        return self.queued - self.out_bytes - self.in_send

    def queue_frame(self, frame) -> None:
        self._add(frame)
        if not self.held:
            self.wakeup.set()

    def send_soon(self, frame) -> None:
        """Queue `frame` and send what is queued at once (push). Never raises: a broken
        socket is left for the writer to find (it ends the connection, failing calls)."""
        self._add(frame)
        try:
            self.push()
        except OSError:
            self.wakeup.set()

    def push(self) -> None:
        """Send what is queued, inline, unless the writer is sending: then it sends it; so
        does it what the socket does not take now."""
        if not self.out:
            return
        if self.sending:
            self.wakeup.set()
            return
        rest = send_now(self.raw, self.out, -1)
        if rest is None:
            self.out = []
            self.out_bytes = 0
        else:
            self.out = rest
            self.out_bytes = sum(map(nbytes, rest))
            self.wakeup.set()

    async def writer(self) -> None:
        while True:
            if not self.out:
                if self.drained is not None:
                    self.drained.set()
                    self.drained = None
                await self.wakeup.wait()
                continue
            bufs, self.out = self.out, []
            self.in_send, self.out_bytes = self.out_bytes, 0
            self.sending = True
            try:
                await send_all(self.raw, bufs, -1, self.send_timeout)
            finally:
                self.sending = False
                self.in_send = 0

    async def flush(self) -> None:
        bufs, self.out = self.out, []
        self.out_bytes = 0
        await send_all(self.raw, bufs)

    async def drain(self) -> None:
        """Wait until the writer has sent all that is queued."""
        while self.out or self.sending:
            if self.drained is None:
                self.drained = trio.Event()
            self.wakeup.set()
            await self.drained.wait()

    async def _recv_into(self, buf) -> int:
        """recv_into `buf`, or recvmsg_into when `buf` is a tuple of buffers."""
        raw = self.raw
        try:
            n = raw.recv_into(buf) if type(buf) is not tuple else raw.recvmsg_into(buf)[0]
        except BlockingIOError:
            self.spins = 0
            return await receive_wait(raw, buf)
        self.spins += 1
        if self.spins >= SPIN_RECEIVES:
            self.spins = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        return n

    async def receive(self) -> bool:
        """Read once into the codec; False at end of stream."""
        large = self.codec.large_buffer()
        if large is not None:  # the rest of a large frame: straight into its buffer
            with large:
                if self.lowat and len(large) >= LOWAT_MIN:
                    self.lowat = await wait_for_rest(self.sock, self.lowat, len(large))
                elif self.lowat > 1:  # a short rest: a mark set for more would never be met
                    self.lowat = set_rcvlowat(self.sock, self.lowat, 1)
                rest = len(large)
                if not self.codec.large_to_end():
                    n = await self._recv_into(large)
                else:  # the rest, and the next frames' start behind it: one call (the NBD
                    n = await self._recv_into((large, self.rhead))  # reader's head_after)
            if n == 0:
                self.codec.receive_data(b"")
                return False
            self.codec.large_received(min(n, rest))
            if n > rest:
                with self.rhead[:n - rest] as after:
                    self.codec.receive_data(after)
            self.after_large = True
            return True
        if self.lowat > 1:
            self.lowat = set_rcvlowat(self.sock, self.lowat, 1)
        if self.after_large:
            self.after_large = False
            n = await self._recv_into(self.rhead)
        else:
            n = await self._recv_into(self.rbuf)
        if n == 0:
            self.codec.receive_data(b"")
            return False
        with memoryview(self.rbuf) as view, view[:n] as chunk:
            self.codec.receive_data(chunk)
        return True

    async def next_message(self):
        """The next (request_id, message), reading as needed; None at end of stream."""
        while True:
            event = self.codec.next_event()
            if event is not NEED_DATA:
                return event if type(event) is tuple else None
            await self.receive()


_LINK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, PeerProtocolError)


async def _guarded(fn, scope: trio.CancelScope):
    """Run a connection's reader or writer; when it ends, for whatever reason, end its
    sibling too. A broken link is returned, not raised, so that it never reaches the
    nursery (which would wrap it in an ExceptionGroup). It is returned without its
    traceback: its frames hold it (a local of the reader's, as it raised it) and the
    connection's objects, a cycle that would keep them until the cycle collector ran; its
    message is all that is told of it."""
    try:
        await fn()
    except _LINK_ERRORS as exc:
        return exc.with_traceback(None)
    finally:
        scope.cancel()
    return None


# --- server --------------------------------------------------------------------------------


async def serve_peers(
    handler: Handler,
    host: str,
    port: int,
    *,
    cluster: str,
    host_id: str,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_frame: int = DEFAULT_MAX_FRAME,
    peer_rev: Callable[[str], int] = lambda host_id: 0,
    congestion: str = "",
    prepare: Callable[[list], None] | None = None,
    send_timeout: float = SEND_TIMEOUT,
    secret: bytes = b"",
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve peer connections until cancelled; `task_status.started(bound_port)`.
    `congestion`: the TCP congestion control of the accepted connections ("": the
    system's; vbp.sockets.set_congestion). `prepare`: see the module docstring.
    `send_timeout`: seconds a peer may take none of its replies (its socket full) before
    its connection is closed and the replies queued for it are dropped.

    Every connection's HelloOk carries one boot id, drawn here: this call is one
    incarnation of the host. `peer_rev(host_id)` is the revision a client host advertises
    (its registry record); a client below BOOT_REV, or one the callback does not know
    (the default: none), gets a HelloOk without the boot id, which an older host could
    not decode."""
    listeners = await open_listeners(port, host or None, "peer protocol")
    if port == 0 and len(listeners) > 1:
        # a wildcard host binds IPv4 and IPv6 to different free ports: keep one
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    for listener in listeners:  # (the connections it accepts inherit both)
        apply_congestion(listener.socket, congestion, "peer listener")
        set_keepalive(listener.socket, *KEEPALIVE, send_timeout)
    bound_port = listeners[0].socket.getsockname()[1]
    boot = secrets.token_hex(8)
    admission = _Admission()
    newest: dict[str, _ServerSession] = {}  # peer host id -> its last connection (superseded)
    # the lines of requests failed unexpectedly, per peer and failure: a failing disk
    # fails every one (vbp.loglimit)
    failures = LogLimit()

    async def serve_one(stream: trio.SocketStream) -> None:
        session = _ServerSession(stream, handler, cluster, host_id, max_in_flight, max_frame,
                                 boot=boot, peer_rev=peer_rev, prepare=prepare,
                                 admission=admission, failures=failures, secret=secret,
                                 newest=newest)
        session.link.send_timeout = send_timeout
        try:
            await session.run()
        except Exception:  # one connection's fault never takes the server down
            log.exception("peer connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(trio.serve_listeners, serve_one, [listener])
        task_status.started(bound_port)


class _Admission:
    """The connections past their Hello of one server, per remote address: at most
    CONNECTIONS_PER_ADDRESS each."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.refusing: set[str] = set()  # addresses told about in the log since at the cap

    def take(self, address: str, peer: str) -> bool:
        n = self.count.get(address, 0)
        if n >= CONNECTIONS_PER_ADDRESS:
            if address not in self.refusing:  # (once per spell at the cap, not per refusal)
                self.refusing.add(address)
                log.warning("refusing peer connections from %s (host %s says): %d open, "
                            "the most one address may have", address, peer, n)
            return False
        self.count[address] = n + 1
        return True

    def give(self, address: str) -> None:
        n = self.count[address] - 1
        if n:
            self.count[address] = n
        else:
            del self.count[address]
        self.refusing.discard(address)


NONCE_BYTES = 16  # a Hello's and a HelloOk's challenge (peer authentication)


def _proof(secret: bytes, role: bytes, cluster: str, host_id: str, theirs: str,
           mine: str) -> str:
    """Peer authentication: `role` ("server", "client") `host_id` of `cluster` knows
    `secret`, answering challenge `theirs` with its own `mine` (both nonces, so neither
    side's proof can be replayed to the other, nor an old one to either)."""
    msg = b"\0".join((b"vbp-peer", role, cluster.encode(), host_id.encode(), theirs.encode(),
                      mine.encode()))
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def _proof_ok(got, want: str) -> bool:
    """Whether a peer's proof is `want`, in constant time. compare_digest raises
    TypeError for a str with other than ASCII characters (a hostile peer's): such a proof
    is wrong, refused as any other."""
    return type(got) is str and got.isascii() and hmac.compare_digest(got, want)


class _ServerSession:
    def __init__(self, stream, handler, cluster, host_id, max_in_flight, max_frame, *,
                 boot: str, peer_rev: Callable[[str], int],
                 prepare: Callable[[list], None] | None = None,
                 admission: _Admission | None = None, failures: LogLimit | None = None,
                 secret: bytes = b"", newest: dict | None = None):
        self.link = _Link(stream, max_frame, HELLO_RECV, MAX_ARRAY_ITEMS)  # (requests)
        self.newest = newest if newest is not None else {}
        self.superseded = False  # the peer connected again since: _supersede
        self.secret = secret
        self.admission = admission if admission is not None else _Admission()
        self.failures = failures if failures is not None else LogLimit()
        self.address = ""  # the peer's IP, once admitted (CONNECTIONS_PER_ADDRESS)
        self.handler = handler
        self.prepare = prepare
        self.cluster = cluster
        self.host_id = host_id
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.room = ParkingLot()
        self.peer = "?"
        self.nursery: trio.Nursery | None = None
        self.boot = boot  # HelloOk.boot (serve_peers)
        self.peer_rev = peer_rev

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self.address:  # (admitted by the handshake)
                self.admission.give(self.address)
            if self.newest.get(self.peer) is self:
                del self.newest[self.peer]

    def _supersede(self) -> None:
        """This session is its peer's connection from now on: an earlier one of the same
        host (self.peer) handles no more of its requests. The peer opened this one because
        it gave that one up (dead, or silent for a whole request timeout: PeerPool), and
        failed every call still pending there; it recorded this host stale where those
        were writes, and goes on writing here. Were the earlier session to handle the
        requests it holds, received and not handled yet (its reader waiting for room past
        max_in_flight, behind stalled syncs), it would apply older writes over the newer
        ones of this connection: a copy differing from the others once its stale record
        is cleared. Their outcome was unknown to the peer; now they are not applied."""
        old = self.newest.get(self.peer)
        self.newest[self.peer] = self
        if old is not None and old is not self:
            old.superseded = True
            old.room.unpark_all()
            log.info("peer %s connected again: its earlier connection handles no more of "
                     "its requests", self.peer)

    async def _run(self) -> None:
        link = self.link
        failure = None
        max_frame, link.codec.max_frame = link.codec.max_frame, HELLO_MAX_FRAME
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if not await self.handshake():
                    return
            self._supersede()
            link.codec.max_frame = max_frame  # (frames behind the Hello are not parsed yet)
            link.set_recv_size(RECV_SIZE)
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(_guarded, self.write_loop, nursery.cancel_scope)
                failure = await _guarded(self.read_loop, nursery.cancel_scope)
        except (trio.TooSlowError, *_LINK_ERRORS) as exc:
            failure = exc.with_traceback(None)  # (as _guarded's: kept, it would hold this frame)
        if isinstance(failure, PeerProtocolError):
            # (a few lines a period per address: whoever reaches the port can make
            # connections that fail as fast as it likes)
            address = self.address or remote_address(link.sock)
            self.failures.log(log, logging.WARNING, ("protocol_error", address),
                              "closing connection from %s (host %s says): %s", address,
                              self.peer, failure)
            await self.refuse(0, m.Error(failure.code, str(failure)))

    async def write_loop(self) -> None:
        try:
            await self.link.writer()
        except trio.TooSlowError:  # (the reader is cancelled with it: _guarded)
            log.warning("closing connection from %s: it took none of its replies for %g s",
                        self.peer, self.link.send_timeout)

    async def refuse(self, request_id: int, error: m.Error) -> None:
        """Best effort: tell the peer why before closing. Then shut our side and discard
        what the peer still sends for a moment: closing with unread input sends a reset,
        which can destroy the Error before the peer reads it."""
        with trio.move_on_after(1):
            try:
                self.link.out.clear()
                self.link.out_bytes = 0
                self.link.queue(request_id, error)
                await self.link.flush()
                self.link.sock.shutdown(socket.SHUT_WR)
                while await self.link.sock.recv_into(self.link.rbuf):
                    pass
            except _LINK_ERRORS:
                pass

    async def handshake(self) -> bool:
        event = await self.link.next_message()
        if event is None:
            return False
        request_id, hello = event
        if type(hello) is not m.Hello:
            raise PeerProtocolError(f"expected Hello, got {type(hello).__name__}")
        self.peer = hello.host_id
        if hello.version != m.PROTO_VERSION:
            await self.refuse(request_id, m.Error(
                m.VERSION, f"protocol version {hello.version} not supported "
                           f"(this host speaks {m.PROTO_VERSION})"))
            return False
        if hello.cluster != self.cluster:
            await self.refuse(request_id, m.Error(
                m.CLUSTER, f"host {self.host_id} belongs to cluster {self.cluster!r}, "
                           f"not {hello.cluster!r}"))
            return False
        new = self.peer_rev(hello.host_id) >= m.BOOT_REV
        address = remote_address(self.link.sock)
        if self.secret or hello.nonce:
            if not await self.authenticate(request_id, hello, self.boot if new else "", address):
                return False
        if not self.admission.take(address, hello.host_id):
            await self.refuse(request_id, m.Error(
                m.UNAVAILABLE, f"host {self.host_id} has too many connections from {address}"))
            return False
        self.address = address
        if not self.secret:  # (else the HelloOk went with the challenge)
            self.link.queue(request_id, m.HelloOk(self.cluster, self.host_id, m.PROTO_VERSION,
                                                  self.boot if new else ""))
            await self.link.flush()
        return True

    async def authenticate(self, request_id: int, hello: m.Hello, boot: str,
                           address: str) -> bool:
        """Peer authentication, the server's side (module docstring): the HelloOk with this
        host's challenge and proof, then the client's Auth. False, refused and logged
        (a few lines a period per `address`), unless both know the secret."""
        why = None
        if not self.secret:
            why = (f"host {self.host_id} has no peer secret: give every host of the pool the "
                   f"same peer_secret_file, or none")
        elif len(hello.nonce) != 2 * NONCE_BYTES:
            why = (f"host {self.host_id} requires peer authentication: give host "
                   f"{hello.host_id} the pool's peer_secret_file")
        if why is None:
            nonce = os.urandom(NONCE_BYTES).hex()
            proof = _proof(self.secret, b"server", self.cluster, self.host_id, hello.nonce, nonce)
            self.link.queue(request_id, m.HelloOk(self.cluster, self.host_id, m.PROTO_VERSION,
                                                  boot, nonce, proof))
            await self.link.flush()
            event = await self.link.next_message()
            if event is None:
                return False
            request_id, auth = event
            want = _proof(self.secret, b"client", self.cluster, hello.host_id, nonce, hello.nonce)
            if type(auth) is not m.Auth:
                why = f"expected Auth, got {type(auth).__name__}"
            elif not _proof_ok(auth.proof, want):
                why = (f"peer authentication failed: host {hello.host_id} does not have this "
                       f"host's peer secret")
            else:
                return True
        self.failures.log(log, logging.WARNING, ("auth", address),
                          "refusing peer connection from %s (host %s says): %s", address,
                          hello.host_id, why)
        await self.refuse(request_id, m.Error(m.AUTH, why))
        return False

    async def read_loop(self) -> None:
        link = self.link
        codec = link.codec
        dispatch = self.dispatch
        while True:
            # frames pipelined behind the Hello are already in the codec: drain, then read
            batch, end = self.take_batch(codec)
            link.held = True  # replies wait for the push after the batch
            try:
                for event in batch:
                    if self.in_flight >= self.max_in_flight:  # the rest waits its turn
                        link.held = False
                        link.push()
                        while self.in_flight >= self.max_in_flight and not self.superseded:
                            await self.room.park()
                        if self.superseded:  # (after each wait: _supersede)
                            return
                        link.held = True
                    dispatch(*event)
                    # (pushed every REPLY_EARLY replies: the gateway can start on these;
                    # and at once past the backlog: a few large replies are that already)
                    if len(link.out) >= REPLY_EARLY or link.out_bytes > MAX_REPLY_BACKLOG:
                        link.push()
                        if link.out_bytes > MAX_REPLY_BACKLOG:  # (the socket is full)
                            link.held = False
                            await link.drain()
                            if self.superseded:
                                return
                            link.held = True
            finally:
                link.held = False
            link.push()
            if link.out_bytes > MAX_REPLY_BACKLOG:
                await link.drain()
            if end is CLOSED:
                return
            if end is not NEED_DATA:
                raise end  # a bad frame, after the good ones before it were answered
            await link.receive()
            if self.superseded:
                return

    def take_batch(self, codec: PeerCodec) -> tuple[list, Any]:
        """Every complete frame received, decoded: ([(request id, message)], what ended
        the batch: NEED_DATA, CLOSED or the PeerProtocolError of a bad frame). `prepare`
        sees the batch first; it is a hint (of many frames, not of one), so its failure
        is logged and nothing else."""
        batch: list = []
        try:
            while True:
                event = codec.next_event()
                if type(event) is not tuple:
                    break
                batch.append(event)
        except PeerProtocolError as exc:
            event = exc.with_traceback(None)  # (kept here, its traceback holds this frame)
        if self.prepare is not None and len(batch) > 1:
            try:
                self.prepare(batch)
            except Exception:
                log.debug("prepare failed for a batch from %s", self.peer, exc_info=True)
        return batch, event

    def dispatch(self, request_id: int, message) -> None:
        rid = getattr(message, "rid", "")
        if not rid:
            self._dispatch(request_id, message)
            return
        token = current_rid.set(rid)
        try:
            self._dispatch(request_id, message)
        finally:
            current_rid.reset(token)

    def _dispatch(self, request_id: int, message) -> None:
        if type(message) is m.Hello:
            self.reply(request_id, m.Error(m.INVALID, "Hello after the handshake"))
            return
        try:
            result = self.handler(message, self.peer)
        except Exception as exc:
            self.reply(request_id, self.error_for(exc))
            return
        if type(result) in _REPLY_OK:
            self.reply(request_id, result)
        elif hasattr(result, "__await__"):
            self.in_flight += 1
            self.nursery.start_soon(self.finish, request_id, result)
        else:
            self.reply(request_id, m.Error(m.INTERNAL, f"handler returned {result!r}"))

    async def finish(self, request_id: int, awaitable: Awaitable) -> None:
        try:
            reply = await awaitable
            if type(reply) not in _REPLY_OK:
                reply = m.Error(m.INTERNAL, f"handler returned {reply!r}")
        except Exception as exc:
            reply = self.error_for(exc)
        finally:
            self.in_flight -= 1
            if self.room:
                self.room.unpark()
        self.reply(request_id, reply)

    def reply(self, request_id: int, reply) -> None:
        try:
            self.link.queue(request_id, reply)
        except TypeError as exc:  # the handler built a reply the protocol cannot carry
            log.error("bad reply to %s: %s", self.peer, exc)
            self.link.queue(request_id, m.Error(m.INTERNAL, f"bad reply: {exc}"))

    def error_for(self, exc: Exception) -> m.Error:
        error = exception_to_error(exc)
        if error.code == m.INTERNAL:
            self.failures.log(log, logging.ERROR, (self.peer, failure_kind(exc)),
                              "request from %s failed", self.peer, exc_info=exc)
        return error


# --- faults --------------------------------------------------------------------------------


class FaultPolicy:
    """Network faults for a PeerPool, decided once per call (CONVENTIONS 8).

    `partition(addresses)`: calls to them fail at once with PeerUnavailable, as a refused
    connection would. `drop_probability`: the request is lost; the caller waits out its
    timeout and gets PeerUnavailable. `delay`: seconds added before the request is sent.
    Subclass and override `on_call` for anything fancier (per-message faults, schedules)."""

    DROP = None

    def __init__(self, *, drop_probability: float = 0.0, delay: float = 0.0,
                 seed: int | None = None):
        self.partitioned: set[str] = set()
        self.drop_probability = drop_probability
        self.delay = delay
        self.random = random.Random(seed)

    def partition(self, addresses: Iterable[str]) -> None:
        self.partitioned.update(addresses)

    def heal(self, addresses: Iterable[str] | None = None) -> None:
        if addresses is None:
            self.partitioned.clear()
        else:
            self.partitioned.difference_update(addresses)

    def on_call(self, address: str, message) -> str | float:
        """"partition", "drop", or a delay in seconds (0: deliver normally)."""
        if address in self.partitioned:
            return "partition"
        if self.drop_probability and self.random.random() < self.drop_probability:
            return "drop"
        return self.delay


async def _apply_fault(faults: FaultPolicy | None, address: str, message) -> bool:
    """Apply the policy's decision for one call; True when the request is to be dropped."""
    if faults is None:
        return False
    fault = faults.on_call(address, message)
    if fault == "partition":
        await trio.lowlevel.checkpoint()
        raise PeerUnavailable(f"peer {address}: partitioned (fault injection)")
    if fault == "drop":
        return True
    if fault:
        await trio.sleep(fault)
    return False


# --- client --------------------------------------------------------------------------------


class _Gather:
    """The replies to one message sent to several peers (PeerPool.call_all), gathered for
    the one task that waits for all of them: no task per peer."""

    __slots__ = ("task", "results", "left", "callback")

    def __init__(self, n: int, callback=None):
        self.task = None  # set when the caller parks
        self.results: list = [None] * n
        self.left = n
        self.callback = callback  # instead of a task (PeerPool.queue_all): called once

    def deliver(self, slot: int, result) -> None:
        """`result`: the reply itself, or an outcome.Error for a call that failed (a reply
        is never one: no Outcome is made per reply, 0.6 us each)."""
        self.results[slot] = result
        self.left -= 1
        if not self.left:
            if self.task is not None:
                task, self.task = self.task, None
                reschedule(task)
            elif self.callback is not None:
                callback, self.callback = self.callback, None
                try:
                    callback(self.results)
                except Exception:  # it runs in a connection's reader: never end that
                    log.exception("a queue_all callback failed")


def _resolve(waiter: tuple, result: outcome.Outcome) -> None:
    """Hand a reply (or the call's failure) to whoever waits for it."""
    target = waiter[0]
    if type(target) is _Gather:
        target.deliver(waiter[3], result.value if type(result) is outcome.Value else result)
    else:
        reschedule(target, result)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {address!r}")
    return host.strip("[]"), int(port)


class _ClientConnection:
    """One pooled connection: opened by `run` in the pool's nursery, shared by callers."""

    def __init__(self, pool: "PeerPool", address: str):
        self.pool = pool
        self.address = address
        self.link: _Link | None = None
        self.ready = trio.Event()
        self.error: PeerUnavailable | None = None  # set once the connection is dead
        # request id -> (task or _Gather, deadline, since, slot in the _Gather, end);
        # `since`: when the call began waiting for room to send it; `end`: link.queued
        # once its frame was queued (the sweep's tests of a silent or not reading peer)
        self.pending: dict[int, tuple] = {}
        self.last_receive = -math.inf
        # (end, when): a timed-out call's frame, unsent when it timed out (the sweep)
        self.abandoned: tuple[int, float] | None = None
        self.goodbye: m.Error | None = None  # why the peer closed the connection, if it said
        self.next_id = 1
        self.room = ParkingLot()
        self.peer_host_id: str | None = None
        self.cancel_scope = trio.CancelScope()

    @property
    def dead(self) -> bool:
        return self.error is not None

    async def run(self) -> None:
        reason: BaseException | str = "connection closed"
        stream = None
        try:
            with self.cancel_scope:
                with trio.fail_after(self.pool.connect_timeout):
                    host, port = _split_address(self.address)
                    stream = await trio.open_tcp_stream(host, port)
                    apply_congestion(stream.socket, self.pool.congestion, f"peer {self.address}")
                    self.link = _Link(stream, self.pool.max_frame)
                    await self.handshake()
                self.ready.set()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_guarded, self.link.writer, nursery.cancel_scope)
                    failure = await _guarded(self.read_loop, nursery.cancel_scope)
                if failure is not None:
                    reason = f"{type(failure).__name__}: {failure}"
                if self.goodbye is not None:
                    reason = f"closed by the peer: {self.goodbye.code}: {self.goodbye.message}"
        except trio.TooSlowError:
            reason = "connect timed out"
        except PeerUnavailable as exc:  # refused at handshake
            reason = exc
        except (*_LINK_ERRORS, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug here must not take the pool down
            log.exception("peer connection to %s failed", self.address)
            reason = f"{type(exc).__name__}: {exc}"
        finally:
            self.fail(reason)
            if stream is not None:
                await trio.aclose_forcefully(stream)

    async def handshake(self) -> None:
        pool = self.pool
        nonce = os.urandom(NONCE_BYTES).hex() if pool.secret else ""
        self.link.queue(0, m.Hello(pool.cluster, pool.host_id, m.PROTO_VERSION, nonce))
        await self.link.flush()
        event = await self.link.next_message()
        if event is None:
            raise PeerUnavailable(f"{self.address} closed the connection during the handshake")
        reply = event[1]
        if type(reply) is m.Error:
            exc = error_to_exception(reply)
            if not isinstance(exc, PeerUnavailable):
                exc = PeerUnavailable(f"{self.address} refused the handshake: {reply.message}")
            raise exc
        if type(reply) is not m.HelloOk:
            raise PeerProtocolError(f"expected HelloOk, got {type(reply).__name__}")
        if reply.cluster != pool.cluster:
            raise ClusterMismatch(
                f"{self.address} is in cluster {reply.cluster!r}, not {pool.cluster!r}")
        if reply.version != m.PROTO_VERSION:
            raise VersionMismatch(f"{self.address} speaks protocol version {reply.version}")
        # another host at the address the map gives (it moved and another took the port, or
        # the map is behind): what we send there for the host we mean must not count as it
        want = pool.host_at(self.address) if pool.host_at is not None else None
        if want is not None and reply.host_id != want:
            raise PeerUnavailable(f"{self.address} is host {reply.host_id!r}, not {want!r} "
                                  f"as the cluster map says")
        if pool.secret or reply.proof:
            if not pool.secret:  # (a server with a secret refuses a Hello without: not here)
                raise AuthFailed(f"{self.address} authenticates peers: give this host the "
                                 f"pool's peer_secret_file")
            want = _proof(pool.secret, b"server", pool.cluster, reply.host_id, nonce, reply.nonce)
            if len(reply.nonce) != 2 * NONCE_BYTES or not _proof_ok(reply.proof, want):
                raise AuthFailed(f"{self.address} (host {reply.host_id!r}) failed peer "
                                 f"authentication: it does not have this host's peer secret")
            self.link.queue(0, m.Auth(_proof(pool.secret, b"client", pool.cluster, pool.host_id,
                                             reply.nonce, nonce)))
            await self.link.flush()
        self.peer_host_id = reply.host_id
        # a host that sent no boot id (older, or not told we know the field) may have
        # restarted at any reconnection: each one counts as a new incarnation
        if not reply.boot or pool._boots.get(reply.host_id) != reply.boot:
            pool._hellos[reply.host_id] = pool._hellos.get(reply.host_id, 0) + 1
            pool._boots[reply.host_id] = reply.boot

    async def read_loop(self) -> None:
        link = self.link
        codec = link.codec
        pending = self.pending
        while True:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    return
                waiter = pending.pop(event[0], None)
                if waiter is None:  # a late reply to a call that gave up, or:
                    if event[0] == 0 and type(event[1]) is m.Error:
                        self.goodbye = event[1]  # request id 0: about the connection itself
                elif type(waiter[0]) is _Gather:  # (_resolve, less an Outcome per reply)
                    waiter[0].deliver(waiter[3], event[1])
                else:
                    reschedule(waiter[0], outcome.Value(event[1]))
            if self.room:
                self.room.unpark_all()
            await link.receive()
            self.last_receive = trio.current_time()

    def fail(self, reason: BaseException | str) -> None:
        """Mark the connection dead and fail every pending call at once."""
        if self.error is None:
            if isinstance(reason, PeerUnavailable):
                self.error = reason
            else:
                self.error = PeerUnavailable(f"peer {self.address}: {reason}")
        self.cancel_scope.cancel()
        self.ready.set()
        pending, self.pending = self.pending, {}
        waiters = list(pending.values())
        # emptied, not only replaced: the reader holds this dict, and it may still decode
        # replies before its cancellation reaches it (woken in the same batch as this
        # call, it has no checkpoint before it looks up their waiters). A reply it finds
        # no waiter for is a late one, ignored; else a waiter failed here would be
        # answered again (a gathered write counting a copy twice, a task rescheduled twice).
        pending.clear()
        for waiter in waiters:
            _resolve(waiter, outcome.Error(self.new_error()))
        self.room.unpark_all()
        if self.pool._conns.get(self.address) is self:
            del self.pool._conns[self.address]

    def new_error(self) -> PeerUnavailable:
        exc = self.error
        return type(exc)(*exc.args)

    async def request(self, message, deadline: float, drop: bool):
        """Send and wait for the reply, until `deadline` (see PeerPool._sweep_timeouts)."""
        since = trio.current_time()
        while len(self.pending) >= self.pool.max_in_flight and not self.dead:
            await self.room.park()
        if self.dead:
            raise self.new_error()
        request_id = self.next_id
        self.next_id += 1
        if not drop:
            self.link.queue(request_id, message)
        self.pending[request_id] = waiter = (current_task(), deadline, since, 0,
                                             self.link.queued)
        self.pool._timeout_at(deadline)

        def abort(_):
            if self.pending.get(request_id) is waiter:
                del self.pending[request_id]
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)


class PeerPool:
    """Pooled, multiplexed connections to peers. Use `async with PeerPool(...) as pool` or
    `await nursery.start(pool.run)`; then `await pool.call("host:port", message)`."""

    def __init__(
        self,
        cluster: str,
        host_id: str,
        *,
        connect_timeout: float = 5.0,
        request_timeout: float = 30.0,
        max_in_flight: int = 1024,
        max_frame: int = DEFAULT_MAX_FRAME,
        faults: FaultPolicy | None = None,
        congestion: str = "",
        host_at: Callable[[str], str | None] | None = None,
        secret: bytes = b"",
    ):
        self.cluster = cluster
        # the host id the cluster map names at an address (None: unknown, no check): a
        # server whose HelloOk names another host is refused (_ClientConnection.handshake)
        self.host_at = host_at
        self.secret = secret  # the pool's peer secret (peer authentication), or none
        self.host_id = host_id
        self.congestion = congestion  # TCP congestion control of its connections; "": the system's
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.max_in_flight = max_in_flight
        self.max_frame = max_frame
        self.faults = faults
        self._conns: dict[str, _ClientConnection] = {}
        self._hellos: dict[str, int] = {}  # peer host id -> its processes met (incarnation)
        self._boots: dict[str, str] = {}  # peer host id -> HelloOk.boot of the last one met
        self._nursery: trio.Nursery | None = None
        self._nursery_cm = None
        self._next_sweep = math.inf
        self._sweep_scope: trio.CancelScope | None = None

    async def __aenter__(self) -> "PeerPool":
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._sweep_timeouts)
        return self

    # Request timeouts. A cancel scope per call costs as much as the rest of the call, so
    # pending calls carry their deadline and one task per pool wakes at the earliest one and
    # fails whatever is overdue. With one timeout for every call, deadlines only grow and a
    # new call never has to wake the sweeper. A peer that sent nothing at all during a whole
    # timeout of a call is hung (stopped, wedged, half-open TCP): its connection is dropped,
    # or new calls would queue behind a send that never ends. A call's wait for room
    # (max_in_flight) counts in that: sent late, it may time out soon after, and a live
    # peer that answered while it waited has not been silent. A peer that answers, late,
    # but takes our frames slower than they come is not keeping up either: a timed-out
    # call frees its room for another, and its frame, unsent, stays queued, so the queue
    # grows without bound. A frame of a call given up on that is still unsent a whole
    # request timeout later drops the connection.

    def _timeout_at(self, deadline: float) -> None:
        if deadline < self._next_sweep:
            self._next_sweep = deadline
            if self._sweep_scope is not None:
                self._sweep_scope.deadline = deadline

    async def _sweep_timeouts(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._next_sweep) as scope:
                self._sweep_scope = scope
                await trio.sleep_forever()
            self._sweep_scope = None
            # a call queued meanwhile (a failed call's callback may retry) lowers this
            self._next_sweep = earliest = math.inf
            now = trio.current_time()
            for conn in list(self._conns.values()):
                silent = False
                unsent = 0  # the furthest end of a timed-out call's frame
                for request_id, waiter in list(conn.pending.items()):
                    _, deadline, since, _, end = waiter
                    if deadline <= now:
                        del conn.pending[request_id]
                        _resolve(waiter, outcome.Error(PeerUnavailable(
                            f"peer {conn.address}: no reply in time")))
                        silent = silent or conn.last_receive < since
                        unsent = max(unsent, end)
                    elif deadline < earliest:
                        earliest = deadline
                if silent:
                    conn.fail("silent for a whole request timeout")
                    continue
                if conn.abandoned is not None and conn.link.taken() >= conn.abandoned[0]:
                    conn.abandoned = None
                if conn.abandoned is not None:
                    if now - conn.abandoned[1] >= self.request_timeout:
                        conn.fail("not reading: the frame of a timed-out request still "
                                  "unsent a request timeout later")
                        continue
                    earliest = min(earliest, conn.abandoned[1] + self.request_timeout)
                elif unsent and unsent > conn.link.taken():
                    conn.abandoned = (unsent, now)
                    earliest = min(earliest, now + self.request_timeout)
                if conn.room:
                    conn.room.unpark_all()
            self._next_sweep = min(self._next_sweep, earliest)

    async def __aexit__(self, *exc_info) -> bool:
        # The body's exception is not handed to the nursery: it would come out wrapped in an
        # ExceptionGroup. Connection tasks never raise, so the nursery has nothing to add.
        self._nursery.cancel_scope.cancel()
        self._nursery = None
        await self._nursery_cm.__aexit__(None, None, None)
        return False

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

    async def aclose(self) -> None:
        """Close every connection (pending calls fail with PeerUnavailable)."""
        for conn in list(self._conns.values()):
            conn.fail("pool closed")

    def disconnect(self, address: str) -> None:
        """Drop the connection to `address`, if any; the next call reconnects."""
        conn = self._conns.get(address)
        if conn is not None:
            conn.fail("disconnected")

    def peer_host_id(self, address: str) -> str | None:
        conn = self._conns.get(address)
        return conn.peer_host_id if conn is not None and conn.ready.is_set() else None

    def incarnation(self, host_id: str) -> int:
        """How many processes of host `host_id` this pool has met, at any address: a
        handshake counts when its HelloOk names another boot than the last one, or none. A
        peer process that restarted is reached only through a new connection with a new
        boot id, so an unchanged count between two replies means one process gave both:
        what it took in between, it still holds (or synced). The gateway's flush relies on
        it; a reconnection to the same process (a network blip) keeps the count."""
        return self._hellos.get(host_id, 0)

    def connected(self, address: str) -> bool:
        """Whether a call to `address` made now goes over an open, handshaken connection
        (to the process incarnation() counted last), rather than a new one."""
        conn = self._conns.get(address)
        return conn is not None and conn.error is None and conn.ready.is_set()

    async def call(self, address: str, message, timeout: float | None = None):
        """Send `message` to the peer at `address` ("host:port") and return its reply.

        An Error reply is raised as its vbp exception (replicator.errors); an unreachable,
        dead or silent peer (past `timeout`, default `request_timeout`) is PeerUnavailable."""
        if self._nursery is None:
            raise RuntimeError("PeerPool used outside its `async with` or run()")
        drop = await _apply_fault(self.faults, address, message)
        deadline = trio.current_time() + (self.request_timeout if timeout is None else timeout)
        conn = self._conns.get(address)
        if conn is None or not conn.ready.is_set():
            conn = await self._connected(address, deadline)
        reply = await conn.request(message, deadline, drop)
        if type(reply) is m.Error:
            raise error_to_exception(reply)
        expected = m.REPLY_TYPES.get(type(message))
        if expected is not None and type(reply) is not expected:
            raise PeerUnavailable(
                f"peer {address} answered {type(message).__name__} with {type(reply).__name__}")
        return reply

    async def call_all(self, addresses, message, timeout: float | None = None) -> list:
        """Send one `message` to every peer of `addresses` at once and wait for all of them;
        a list, in order, of each reply or the exception `call` would have raised.

        The message is encoded once and framed per connection; the frames join each
        connection's next batch and the caller parks once for every reply: no task per peer
        (the gateway's write to N replicas)."""
        if self._nursery is None:
            raise RuntimeError("PeerPool used outside its `async with` or run()")
        prepared = prepare(message)  # TypeError: the caller's bug, raised here
        gather = _Gather(len(addresses))
        deadline = trio.current_time() + (self.request_timeout if timeout is None else timeout)
        queued: list[tuple[_ClientConnection, int]] = []
        for slot, address in enumerate(addresses):
            since = trio.current_time()
            try:
                drop = await _apply_fault(self.faults, address, message)
                conn = self._conns.get(address)
                if conn is None or not conn.ready.is_set():
                    conn = await self._connected(address, deadline)
                while len(conn.pending) >= self.max_in_flight and not conn.dead:
                    await conn.room.park()
                if conn.dead:
                    raise conn.new_error()
            except PeerUnavailable as exc:
                gather.deliver(slot, outcome.Error(exc))
                continue
            request_id = conn.next_id
            conn.next_id += 1
            if not drop:
                conn.link.queue_frame(frame(request_id, prepared))
            conn.pending[request_id] = (gather, deadline, since, slot, conn.link.queued)
            queued.append((conn, request_id))
        if queued:
            self._timeout_at(deadline)
        if gather.left:
            gather.task = current_task()

            def abort(_):
                for conn, request_id in queued:
                    waiter = conn.pending.get(request_id)
                    if waiter is not None and waiter[0] is gather:
                        del conn.pending[request_id]
                return Abort.SUCCEEDED

            await wait_task_rescheduled(abort)
        else:
            await trio.lowlevel.checkpoint()
        expected = m.REPLY_TYPES.get(type(message))
        return [_reply_or_error(r, address, message, expected)
                for r, address in zip(gather.results, addresses)]

    def ready(self, addresses) -> bool:
        """Whether queue_all can send to every peer of `addresses` now: each connection is
        up with room to spare, and no fault policy applies (its decisions may wait)."""
        if self._nursery is None or self.faults is not None:
            return False
        conns = self._conns
        limit = self.max_in_flight
        for address in addresses:
            conn = conns.get(address)
            if (conn is None or conn.error is not None or not conn.ready.is_set()
                    or len(conn.pending) >= limit):
                return False
        return True

    def queue_all(self, addresses, message, on_replies, *, checked: bool = False,
                  at_once: bool = False) -> None:
        """call_all without a task: queue `message` to every peer of `addresses` now;
        `on_replies(list)` is called once, from the task that sees the last reply (or the
        timeout), with the list call_all would return. It must not raise or block. Check
        ready() first: a peer that is not gets PeerUnavailable at once, through
        `on_replies` (before this returns). `checked`: the caller has just seen ready()
        say so, with no checkpoint since (the check is then not made twice). `at_once`:
        send the frame now, not with the writer's next batch (a batch of writes already)."""
        if not checked and not self.ready(addresses):
            on_replies([PeerUnavailable(f"peer {a}: no connection ready") for a in addresses])
            return
        conns = [self._conns[address] for address in addresses]
        prepared = prepare(message)
        expected = m.REPLY_TYPES.get(type(message))

        def done(results: list) -> None:
            on_replies([_reply_or_error(r, address, message, expected)
                        for r, address in zip(results, addresses)])

        gather = _Gather(len(conns), done)
        now = trio.current_time()
        deadline = now + self.request_timeout
        for slot, conn in enumerate(conns):
            request_id = conn.next_id
            conn.next_id += 1
            link = conn.link
            if not at_once and (conn.pending or link.out) and len(link.out) < SEND_EARLY:
                link.queue_frame(frame(request_id, prepared))  # joins the writer's batch
            else:  # idle (QD1), or enough queued for the peer to start on: sent now
                link.send_soon(frame(request_id, prepared))
            conn.pending[request_id] = (gather, deadline, now, slot, link.queued)
        if conns:
            self._timeout_at(deadline)
        else:
            done([])

    async def _connected(self, address: str, deadline: float) -> _ClientConnection:
        """The connection to `address` once handshaken, opening it if needed."""
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = _ClientConnection(self, address)
            self._nursery.start_soon(conn.run)
        with trio.move_on_at(deadline):
            await conn.ready.wait()
            return conn
        raise PeerUnavailable(f"peer {address}: not connected in time")

    async def call_many(self, calls: Iterable[tuple[str, Any]], timeout: float | None = None
                        ) -> list:
        """Run calls concurrently; a list, in order, of each reply or the exception raised."""
        calls = list(calls)
        results: list = [None] * len(calls)

        async def one(i: int, address: str, message) -> None:
            try:
                results[i] = await self.call(address, message, timeout)
            except Exception as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i, (address, message) in enumerate(calls):
                nursery.start_soon(one, i, address, message)
        return results


def _reply_or_error(result, address: str, message, expected):
    """What `call` returns or raises for one result of `call_all` (a _Gather's: the reply,
    or an outcome.Error), as a value."""
    if type(result) is outcome.Error:
        return result.error
    reply = result
    if type(reply) is m.Error:
        return error_to_exception(reply)
    if expected is not None and type(reply) is not expected:
        return PeerUnavailable(
            f"peer {address} answered {type(message).__name__} with {type(reply).__name__}")
    return reply


# --- in memory -----------------------------------------------------------------------------


class MemoryNetwork:
    """Peers in one process, no sockets: for the simulation and for tests of the layers
    above. Handlers, error mapping, FaultPolicy and the pool API are the ones of the real
    transport, and every message goes through the codec, so what passes here can be sent.

        net = MemoryNetwork()
        net.serve("h1:1", replica.handle, cluster="c", host_id="h1")
        async with net.pool("c", "h2") as pool:
            await pool.call("h1:1", msg)
        net.stop("h1:1")  # a crash: calls in flight fail with PeerUnavailable
    """

    def __init__(self) -> None:
        self._hosts: dict[str, _MemoryHost] = {}
        self._serves: dict[str, int] = {}  # host id -> times it was served (incarnation)

    def serve(self, address: str, handler: Handler, *, cluster: str, host_id: str) -> None:
        self._hosts[address] = _MemoryHost(handler, cluster, host_id)
        self._serves[host_id] = self._serves.get(host_id, 0) + 1

    def stop(self, address: str) -> None:
        host = self._hosts.pop(address, None)
        if host is not None:
            for scope in host.calls:
                scope.cancel()

    def pool(self, cluster: str, host_id: str, *, request_timeout: float = 30.0,
             faults: FaultPolicy | None = None) -> "MemoryPeerPool":
        return MemoryPeerPool(self, cluster, host_id, request_timeout=request_timeout,
                              faults=faults)


class _MemoryHost:
    def __init__(self, handler: Handler, cluster: str, host_id: str):
        self.handler = handler
        self.cluster = cluster
        self.host_id = host_id
        self.calls: set[trio.CancelScope] = set()


class MemoryPeerPool:
    """PeerPool's API over a MemoryNetwork."""

    def __init__(self, network: MemoryNetwork, cluster: str, host_id: str, *,
                 request_timeout: float = 30.0, faults: FaultPolicy | None = None):
        self.network = network
        self.cluster = cluster
        self.host_id = host_id
        self.request_timeout = request_timeout
        self.faults = faults
        self._codec = PeerCodec()

    async def __aenter__(self) -> "MemoryPeerPool":
        return self

    def incarnation(self, host_id: str) -> int:
        """PeerPool.incarnation: here every serve() of the host is a new one."""
        return self.network._serves.get(host_id, 0)

    def connected(self, address: str) -> bool:
        return address in self.network._hosts

    async def __aexit__(self, *exc_info) -> bool:
        return False

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        await trio.sleep_forever()

    def _wire(self, message):
        """The message as the peer decodes it."""
        frame = self._codec.encode(0, message)
        codec = PeerCodec()
        codec.receive_data(frame if type(frame) is bytes else b"".join(frame))
        return codec.next_event()[1]

    async def call(self, address: str, message, timeout: float | None = None):
        drop = await _apply_fault(self.faults, address, message)
        host = self.network._hosts.get(address)
        if host is None:
            await trio.lowlevel.checkpoint()
            raise PeerUnavailable(f"peer {address}: connection refused")
        if host.cluster != self.cluster:
            raise ClusterMismatch(f"{address} is in cluster {host.cluster!r}")
        timeout = self.request_timeout if timeout is None else timeout
        with trio.move_on_after(timeout) as scope:
            host.calls.add(scope)
            try:
                if drop:
                    await trio.sleep_forever()
                reply = await self._serve(host, self._wire(message))
            finally:
                host.calls.discard(scope)
        if scope.cancelled_caught:
            if address not in self.network._hosts:
                raise PeerUnavailable(f"peer {address}: connection reset")
            raise PeerUnavailable(f"peer {address}: no reply in time")
        try:
            reply = self._wire(reply)
        except TypeError as exc:  # as serve_peers does with a reply it cannot send
            reply = m.Error(m.INTERNAL, f"bad reply: {exc}")
        if type(reply) is m.Error:
            raise error_to_exception(reply)
        return reply

    async def _serve(self, host: _MemoryHost, message):
        try:
            reply = host.handler(message, self.host_id)
            if hasattr(reply, "__await__"):
                reply = await reply
            else:
                await trio.lowlevel.checkpoint()
        except Exception as exc:
            return exception_to_error(exc)
        if type(reply) not in _REPLY_OK:
            return m.Error(m.INTERNAL, f"handler returned {reply!r}")
        return reply

    async def call_many(self, calls, timeout: float | None = None) -> list:
        return await PeerPool.call_many(self, calls, timeout)

    async def call_all(self, addresses, message, timeout: float | None = None) -> list:
        prepare(message)  # TypeError raised here, as PeerPool.call_all does
        return await PeerPool.call_many(self, [(a, message) for a in addresses], timeout)
