"""Socket calls of the data path (NBD server, peer transport) on the plain socket under
trio's wrapper: a call that succeeds returns at once, without the trip through the trio
scheduler that trio's socket methods make after every call; only a call that would block
waits (wait_readable / wait_writable). Callers checkpoint on their own schedule.

Receiving large peer frames with one wakeup (peer WriteChunk frames).

Once a large frame's header is in, the rest is received when the kernel holds all of it
(up to LOWAT_MAX): SO_RCVLOWAT keeps epoll quiet until then, so a 1 MiB frame costs one
wakeup and one recv instead of one per TCP window's worth (about five on loopback, each a
trip through the trio scheduler). Linux grows the socket's receive buffer to twice the mark
by itself (unless the buffer size was set by hand), so the sender is never stalled by it.
The wait is bounded all the same (LOWAT_WAIT): a kernel whose window does not open up to
the mark, or a slow sender, costs that long once, then the mark goes back to 1 and what is
there is taken.

The NBD server does not use the mark: there it cost more than it saved. Measured side by
side (`python -m bench --workloads seqwrite-1m-qd8 --targets qemu-nbd,vbp-r3,vbp-r1`,
3 rounds), 1 MiB sequential writes of a replicas=1 volume went from 1,730 to 2,331 MiB/s
without it (server CPU per MiB 579 -> 425 µs), replicas=3 stayed the same (531 / 533
MiB/s). perf showed the server carrying much more loopback softirq work with the mark:
likely the client's data waits in its own send queue while the server sleeps under the
mark, and the window update of the server's one large recv then runs the client's
transmission in the server's process.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import re
import socket

import trio

LOWAT_MIN = 64 * 1024  # below this, waiting for the whole rest is not worth a setsockopt
LOWAT_MAX = 4 * 1024 * 1024
HAVE_LOWAT = hasattr(socket, "SO_RCVLOWAT")
LOWAT_WAIT = 0.05  # seconds
IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)

log = logging.getLogger("vbp.sockets")


async def open_listeners(port: int, host: str | None, what: str) -> list:
    """trio.open_tcp_listeners, with an error that names what could not listen where:
    blockd opens three ports (peers, NBD, metrics), and "Address already in use" alone
    does not say which setting to change."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise OSError(e.errno, f"cannot listen on {host or '*'}:{port} ({what}): "
                               f"{e.strerror or e}") from None


def plain_socket(trio_socket) -> socket.socket | None:
    """The socket.socket under a trio socket, or None (a test double, another transport)."""
    raw = getattr(trio_socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


def nbytes(b) -> int:
    return b.nbytes if type(b) is memoryview else len(b)


async def receive_wait(raw: socket.socket, buf) -> int:
    """recv_into `buf` once the socket is readable (the first try said it would block);
    recvmsg_into when `buf` is a tuple of buffers (filled in order)."""
    while True:
        await trio.lowlevel.wait_readable(raw)
        try:
            return raw.recv_into(buf) if type(buf) is not tuple else raw.recvmsg_into(buf)[0]
        except BlockingIOError:
            pass


def send_now(raw: socket.socket, buffers: list, total: int, flags: int = 0):
    """Send `buffers` (`total` bytes, or -1: unknown) with as few sendmsg calls as the
    socket allows without waiting. None when all went, else what is left (views)."""
    while True:
        batch = buffers if len(buffers) <= IOV_MAX else buffers[:IOV_MAX]
        try:
            sent = raw.sendmsg(batch, (), flags)
        except BlockingIOError:
            return buffers
        if batch is buffers and sent == total:
            return None
        i = 0
        while i < len(batch):
            n = nbytes(batch[i])
            if sent < n:
                break
            sent -= n
            i += 1
        rest = buffers[i:]
        if not rest:
            return None
        if sent:
            rest[0] = memoryview(rest[0]).cast("B")[sent:]
        if i < len(batch):  # the socket took less than offered: it is full for now
            return rest
        buffers, total = rest, -1


async def send_all(raw: socket.socket, buffers: list, total: int = -1,
                   stall: float = math.inf) -> None:
    """send_now, waiting for room as long as needed; trio.TooSlowError when the socket
    takes none of it for `stall` seconds (each wait is timed anew: a slow reader is not
    one that stopped)."""
    rest = send_now(raw, buffers, total)
    while rest is not None:
        if stall == math.inf:
            await trio.lowlevel.wait_writable(raw)
        else:
            with trio.fail_after(stall):
                await trio.lowlevel.wait_writable(raw)
        rest = send_now(raw, rest, -1)


# TCP congestion control of our own sockets (blockd config: peer_tcp_congestion,
# nbd_tcp_congestion). BBR, a common system default, paces every connection with timers
# when the interface's qdisc is not fq, and on low-latency links that pacing costs more than
# it saves: a 3-host replicas=3 sandbox on loopback took 1 MiB sequential writes (fio nbd
# engine, QD8) at 431-434 MiB/s with BBR on the peer links and 528-560 MiB/s with cubic,
# the gateway's CPU per MiB 1,670 -> 1,160-1,250 µs; 4 KiB writes did not change.
CONGESTION_NAME = re.compile(r"[A-Za-z0-9_]{1,15}")  # TCP_CA_NAME_MAX is 16, with the NUL
AVAILABLE_CONGESTION = "/proc/sys/net/ipv4/tcp_available_congestion_control"
ALLOWED_CONGESTION = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"


# TCP keepalive of the connections blockd accepts (peers, NBD clients): seconds idle before
# the first probe, seconds between probes, probes unanswered before the connection is
# dropped. A peer or client host that crashed or was cut off leaves its connections open
# here, idle, for good otherwise: each holding its buffers, an NBD export, and a place
# among a peer address's connections (transport.CONNECTIONS_PER_ADDRESS). The kernel
# answers probes for a process that is merely slow or stopped: only dead ends go.
# Keepalive probes only an idle connection: one with data sent and not acknowledged (a
# reply under way when the client's host died) waits for TCP's retransmissions to give
# up, about 15 minutes (net.ipv4.tcp_retries2), holding the export, and in blockd the
# volume's write lease, from the host a failed-over VM reconnects to. So the connection
# is also dropped once data has gone unacknowledged for as long as the probes take, or
# the server's own send timeout if longer (TCP_USER_TIMEOUT). Linux counts a closed
# window too (a live client that reads nothing, its probes answered): that is what the
# send timeout cuts off anyway, so the user timeout is never shorter than it. With
# keepalive on, it also rules when an idle connection whose probes go unanswered is
# dropped: about the same time.
KEEPALIVE = (30, 10, 3)


def set_keepalive(sock, idle: int, interval: int, count: int, send_timeout: float = 0) -> None:
    """Turn TCP keepalive on for `sock` (a socket or a trio socket; a listening socket
    passes it on to the connections it accepts) with these timings (see KEEPALIVE), and
    TCP_USER_TIMEOUT to the time they take, or `send_timeout` (seconds a peer may take
    none of the data sent to it) if longer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    ms = max(idle + interval * count, send_timeout) * 1000  # (an infinite send timeout:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,  # the most the kernel takes)
                    int(ms) if ms < 2**31 else 2**31 - 1)


def set_congestion(sock, name: str) -> None:
    """Give TCP socket `sock` (a socket or a trio socket) the congestion control `name`;
    "" keeps the system's (net.ipv4.tcp_congestion_control). A listening socket passes
    its choice on to the connections it accepts."""
    if name:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, name.encode())


def apply_congestion(sock, name: str, what: str) -> None:
    """set_congestion of a name checked at start (congestion_problem): if the kernel
    refuses it now (a module unloaded since), `what` (the socket, for the log) keeps the
    system's choice and works all the same."""
    try:
        set_congestion(sock, name)
    except OSError as exc:
        log.warning("%s: congestion control %r not set: %s", what, name, exc)


def same_host(sock) -> bool:
    """Whether the other end of connected TCP socket `sock` is on this host: a loopback
    address, or the very address the connection came in on (Linux carries both over lo)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        peer = sock.getpeername()[0]
        local = sock.getsockname()[0]
    except OSError:  # (no longer connected)
        return False
    if peer == local:
        return True
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def congestion_problem(name) -> str | None:
    """None when this process can give a socket congestion control `name` ("": the
    system's, always), else why it cannot."""
    if not isinstance(name, str):
        return "expected a string"
    if not name:
        return None
    if not CONGESTION_NAME.fullmatch(name):
        return f"{name!r} is not a congestion control name (letters, digits, _; at most 15)"
    if not hasattr(socket, "TCP_CONGESTION"):
        return "this platform cannot choose a socket's congestion control"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            set_congestion(s, name)
        except OSError as e:
            return congestion_refusal(name, e)
    return None


def congestion_refusal(name: str, e: OSError) -> str:
    """Why the kernel refused congestion control `name` with error `e`, in one line."""
    if e.errno == errno.EPERM:  # a process without CAP_NET_ADMIN: the allowed ones only
        return (f"TCP congestion control {name!r} is not allowed for this process (only "
                f"net.ipv4.tcp_allowed_congestion_control: {_sysctl_words(ALLOWED_CONGESTION)}; "
                "others need CAP_NET_ADMIN)")
    return (f"TCP congestion control {name!r} is not available on this kernel ({e.strerror}; "
            f"available: {_sysctl_words(AVAILABLE_CONGESTION)})")


def _sysctl_words(path: str) -> str:
    try:
        with open(path) as f:
            return ", ".join(f.read().split()) or "none"
    except OSError:
        return "unknown"


def set_rcvlowat(sock, current: int, n: int) -> int:
    """Set SO_RCVLOWAT of `sock` (a socket or trio socket) to `n` unless it is `current`
    already; returns the value now in force, 0 if the socket refused it (then leave it)."""
    if n == current:
        return n
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
        return n
    except OSError:
        return 0


async def wait_for_rest(sock, current: int, due: int) -> int:
    """Raise the mark of `sock` to `due` bytes (at most LOWAT_MAX) and wait until the kernel
    holds that much, or LOWAT_WAIT passed (then the mark goes back to 1). Returns the mark
    now in force; `current` is the one before (0: marks are not available on this socket)."""
    lowat = set_rcvlowat(sock, current, min(due, LOWAT_MAX))
    if lowat:
        with trio.move_on_after(LOWAT_WAIT) as waited:
            await trio.lowlevel.wait_readable(sock)
        if waited.cancelled_caught:
            lowat = set_rcvlowat(sock, lowat, 1)
    return lowat


def remote_address(sock) -> str:
    """The IP a connection comes from ("?" if the socket no longer knows)."""
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError, AttributeError):
        return "?"
