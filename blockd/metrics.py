"""blockd's Prometheus metrics and the tiny HTTP responder that serves them.

Theory of operation. Every NBD request is counted in its (volume, op) counters: a gateway
binds them once (`Metrics.stats`) and bumps them per request (`add`); `Metrics.observe`
does both, for other callers (DESIGN.md, Speed: well under 10 µs of server CPU per
request). prometheus_client's own labelled children cost ~2.6 µs for that (`labels()`
lookups aside): every `inc` takes a lock and `Histogram.observe` walks its buckets in
Python. blockd's data path runs in one trio thread, so the request families are plain
counters instead: three additions and one `bisect` (~0.3 µs, ~0.5 with observe's lookup;
`python -m bench.metrics_bench` measures both),
turned into counter and histogram families by a collector at scrape time, which runs in the
same thread. Series of a deleted volume are dropped with `forget_volume` (every
gc_interval: Blockd.prune_metrics), so label cardinality follows the pool's volumes; those
of a volume only closed here stay, as Prometheus counters should.

Each `Metrics` owns its `CollectorRegistry` (never the process-global one): a test or a
sandbox can create many, and nothing leaks between them.

`serve_metrics` is a trio task answering `GET /metrics` over HTTP/1.0 (one request per
connection, then close), the way Prometheus scrapes. It never runs a thread; a malformed or
oversized request gets 400 and the connection is closed; the listener keeps serving.
It runs in the thread that serves every NBD request of the host, and a host serving 500
volumes has 3500 (volume, op) series, 5.6 MB of text and 0.4 s of CPU to render: so a
scrape renders them in parts (`Metrics.parts`, SERIES_PER_PART series each, from a copy
of the counters taken when it begins) with a checkpoint between two, and one rendering
at a time answers every scrape asked before it began (`_Renders`), each sent the same
parts rather than a copy of its own.
"""

from __future__ import annotations

import itertools
import logging
from bisect import bisect_left

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from vbp.sockets import open_listeners

log = logging.getLogger("vbp.blockd.metrics")

# 10 µs .. 1 s: a cached read from the local replica sits at the bottom, a replicated write
# with fsync in the middle, anything near the top is a stall worth an alert.
LATENCY_BUCKETS = (
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,
)

# The NBD commands a volume sees, by the names used as the `op` label.
OPS = ("read", "write", "flush", "trim", "write_zeroes", "block_status", "cache")

# Replica error kinds, as the `kind` label (free-form, but keep to this small set).
ERROR_KINDS = ("timeout", "connection", "stale_epoch", "fenced", "io", "checksum", "no_space", "other")

# The classic text format, which every Prometheus version scrapes; our names need nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line + headers we accept before answering 400
READ_TIMEOUT = 5.0  # seconds a scraper may take to send its request
# connections served at once: each holds a file descriptor, which blockd shares with NBD
# clients, peers and the chunk store (_Slots)
MAX_CONNECTIONS = 64
LINGER_TIMEOUT, LINGER_MAX = 2.0, 1 << 20  # after the reply: drain at most this long / much
SERIES_PER_PART = 16  # (volume, op) series a scrape renders between two checkpoints (~1 ms)


class _OpStats:
    """Counters of one (volume, op): plain attributes, bumped without a lock because only
    the trio thread touches them (scrapes run in the same thread)."""

    __slots__ = ("count", "bytes", "sum", "buckets")

    def __init__(self):
        self.count = 0
        self.bytes = 0
        self.sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket, not cumulative; last is +Inf

    def add(self, nbytes: int, seconds: float, count: int = 1) -> None:
        """`count` requests done, `nbytes` in all, each in `seconds`: count them."""
        self.count += count
        self.bytes += nbytes
        self.sum += seconds * count
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += count


class _RequestCollector:
    """Turns the per-(volume, op) stats into the three request families at scrape time."""

    def __init__(self, namespace: str, stats: dict):
        self.ns = namespace
        self.stats = stats

    def _families(self):
        ns, labels = self.ns, ["volume", "op"]
        return (
            CounterMetricFamily(f"{ns}_nbd_requests", "NBD requests served, by volume and op.", labels=labels),
            CounterMetricFamily(f"{ns}_nbd_bytes", "Bytes read or written over NBD, by volume and op.",
                                labels=labels),
            HistogramMetricFamily(f"{ns}_nbd_request_seconds", "NBD request latency, receive to reply.",
                                  labels=labels),
        )

    def describe(self):
        return list(self._families())

    def collect(self):
        series = self.snapshot()
        return [self._family(i, series) for i in range(3)]

    def snapshot(self) -> list:
        """The counters as they are now, in label order: (labels, count, bytes, sum, buckets)."""
        return [([volume, op], s.count, s.bytes, s.sum, list(s.buckets))
                for (volume, op), s in sorted(self.stats.items())]

    def _family(self, which: int, series: list):
        """Family `which` (requests, bytes, latency) of `series` (part of a snapshot)."""
        family = self._families()[which]
        if which == 0:
            for labels, count, _, _, _ in series:
                family.add_metric(labels, count)
        elif which == 1:
            for labels, _, nbytes, _, _ in series:
                family.add_metric(labels, nbytes)
        else:
            bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
            for labels, _, _, total, buckets in series:
                family.add_metric(labels, list(zip(bounds, itertools.accumulate(buckets))), total)
        return family

    def parts(self):
        """The text of the three families, in parts of SERIES_PER_PART series, from a
        snapshot taken at the first part: what generate_latest makes of collect()."""
        series = self.snapshot()
        for which in range(3):
            for start in range(0, max(len(series), 1), SERIES_PER_PART):
                text = generate_latest(_Families(
                    [self._family(which, series[start:start + SERIES_PER_PART])]))
                yield text.split(b"\n", 2)[2] if start else text  # (HELP and TYPE once)


class _Families:
    """A collector of the families given (for generate_latest)."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families


class Metrics:
    """All of one blockd's metrics, in a registry of their own."""

    def __init__(self, namespace: str = "vbp"):
        self.registry = CollectorRegistry(auto_describe=True)
        ns = namespace
        self._stats: dict[tuple[str, str], _OpStats] = {}
        self._requests = _RequestCollector(ns, self._stats)
        self.registry.register(self._requests)
        # the rest, few and small, in a registry of their own: a scrape renders it whole
        # after the request families (parts); the registry shows it as well
        self._rest = r = CollectorRegistry(auto_describe=True)
        self.registry.register(_Rest(r))
        self.replica_errors = Counter("replica_errors", "Failed requests to replica hosts.",
                                      ("peer", "kind"), namespace=ns, registry=r)
        self.checksum_errors = Counter("checksum_errors", "Pages whose checksum did not match on read.",
                                       namespace=ns, registry=r)
        self.repairs = Counter("repairs", "Pages or chunks repaired from a good replica.",
                               namespace=ns, registry=r)
        self.recovery_chunks = Gauge("recovery_chunks_remaining", "Chunks still to recover on this host.",
                                     namespace=ns, registry=r)
        self.recovery_bytes = Gauge("recovery_bytes_remaining", "Bytes still to recover on this host.",
                                    namespace=ns, registry=r)
        self.scrub_chunks = Counter("scrub_chunks", "Chunk generations scrubbed by this host.",
                                    namespace=ns, registry=r)
        self.scrub_pages = Counter("scrub_pages", "Pages verified by scrub (every copy).",
                                   namespace=ns, registry=r)
        self.scrub_bytes = Counter("scrub_bytes", "Bytes verified by scrub (every copy).",
                                   namespace=ns, registry=r)
        self.scrub_errors = Counter("scrub_errors", "Damaged pages scrub found, by kind: checksum "
                                    "(bytes fail their checksum) or divergent (outvoted copy).",
                                    ("kind",), namespace=ns, registry=r)
        self.scrub_repairs = Counter("scrub_repairs", "Pages scrub repaired from a good copy.",
                                     namespace=ns, registry=r)
        self.scrub_unrepairable = Counter("scrub_unrepairable", "Damaged pages scrub found no "
                                          "good copy for.", namespace=ns, registry=r)
        self.scrub_missing = Counter("scrub_missing", "Chunk copies scrub found missing a "
                                     "generation on a current replica, recorded stale for "
                                     "resync.", namespace=ns, registry=r)
        for kind in ("checksum", "divergent"):
            self.scrub_errors.labels(kind)
        self.capacity = Gauge("capacity_bytes", "Chunk space this host offers.", namespace=ns, registry=r)
        self.used = Gauge("used_bytes", "Chunk space in use on this host.", namespace=ns, registry=r)
        self.disk_free = Gauge("disk_free_bytes", "Bytes free on the filesystem of this host's "
                               "data directory (the capacity may promise more).",
                               namespace=ns, registry=r)
        self.up = Gauge("up", "1 while blockd serves, 0 while it starts or stops.", namespace=ns, registry=r)
        self.nbd_held = Gauge("nbd_held_bytes", "Bytes the NBD connections hold together: requests "
                              "in flight, replies queued or being sent, write payloads arriving "
                              "(bounded by nbd_frontend.server.HELD_LIMIT).", namespace=ns, registry=r)

    # --- the per-request hook --------------------------------------------------------

    def observe(self, volume: str, op: str, nbytes: int, seconds: float) -> None:
        """One NBD request done: count it, its bytes and its latency."""
        self.stats(volume, op).add(nbytes, seconds)

    def stats(self, volume: str, op: str) -> _OpStats:
        """The counters of (volume, op), for a caller that bumps them itself (`add`) per
        request: a gateway binds its own once, which saves the key and the lookup. They
        are dropped with forget_volume, once the volume is deleted and closed here."""
        s = self._stats.get((volume, op))
        if s is None:
            s = self._stats[(volume, op)] = _OpStats()
        return s

    def request_counts(self) -> dict[str, int]:
        """Requests counted so far per volume that has series."""
        out: dict[str, int] = {}
        for (volume, _), s in self._stats.items():
            out[volume] = out.get(volume, 0) + s.count
        return out

    def forget_volume(self, volume: str) -> None:
        """Drop a volume's series (it was deleted)."""
        for key in [k for k in self._stats if k[0] == volume]:
            del self._stats[key]

    # --- everything else (rare events, set from background loops) -----------------

    def replica_error(self, peer: str, kind: str) -> None:
        self.replica_errors.labels(peer, kind).inc()

    def checksum_error(self, n: int = 1) -> None:
        self.checksum_errors.inc(n)

    def repaired(self, n: int = 1) -> None:
        self.repairs.inc(n)

    def scrubbed(self, chunks: int, pages: int, nbytes: int) -> None:
        self.scrub_chunks.inc(chunks)
        self.scrub_pages.inc(pages)
        self.scrub_bytes.inc(nbytes)

    def scrub_error(self, kind: str, pages: int) -> None:
        self.scrub_errors.labels(kind).inc(pages)

    def scrub_repaired(self, pages: int) -> None:
        self.scrub_repairs.inc(pages)

    def scrub_unrepairable(self, pages: int) -> None:
        self.scrub_unrepairable.inc(pages)

    def scrub_missing_copies(self, copies: int) -> None:
        self.scrub_missing.inc(copies)

    def set_recovery(self, chunks: int, nbytes: int) -> None:
        self.recovery_chunks.set(chunks)
        self.recovery_bytes.set(nbytes)

    def watch_nbd_held(self, held) -> None:
        """nbd_held_bytes reads `held` (a nbd_frontend.server.HeldBytes) at each scrape."""
        self.nbd_held.set_function(lambda: held.total)

    def set_space(self, capacity: int, used: int, disk_free: int | None = None) -> None:
        self.capacity.set(capacity)
        self.used.set(used)
        if disk_free is not None:
            self.disk_free.set(disk_free)

    def set_up(self, up: bool) -> None:
        self.up.set(1 if up else 0)

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def parts(self):
        """exposition() in parts (bytes), to render with a checkpoint between two: the
        request families SERIES_PER_PART series at a time, from a copy of their counters
        taken at the first part, then the rest."""
        yield from self._requests.parts()
        yield generate_latest(self._rest)


class _Rest:
    """Forwards collection to another registry (Metrics._rest)."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()


# --- the HTTP responder ------------------------------------------------------------------


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head: bool = False, length: int | None = None) -> bytes:
    """The response (head only: `head`), of a body of `length` bytes if given."""
    header = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body) if length is None else length}\r\n"
              f"Connection: close\r\n\r\n").encode()
    return header if head else header + body


def respond(metrics: Metrics, request: bytes) -> bytes:
    """The whole response to one raw request (request line and headers). Pure: no I/O."""
    reply = _route(request)
    if isinstance(reply, bytes):
        return reply
    return _response("200 OK", metrics.exposition(), CONTENT_TYPE, head=reply == "HEAD")


def _route(request: bytes) -> bytes | str:
    """The whole response to one raw request, or for the metrics its method (GET, HEAD)."""
    try:
        line = request.split(b"\n", 1)[0].rstrip(b"\r").decode("ascii")
        method, target, version = line.split(" ")
    except (UnicodeDecodeError, ValueError):
        return _response("400 Bad Request", b"bad request\n")
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        return _response("400 Bad Request", b"bad request\n")
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"only GET /metrics\n")
    path = target.split("?", 1)[0]
    if path == "/metrics":
        return method
    if path == "/":
        return _response("200 OK", b"blockd: metrics at /metrics\n", head=method == "HEAD")
    return _response("404 Not Found", b"not found; metrics at /metrics\n", head=method == "HEAD")


class _Renders:
    """Renderings of the exposition for the scrapes of one listener: one at a time, in
    parts with a checkpoint between two (Metrics.parts), each answering every scrape
    that asked before it began (the one under way when a scrape asks may lack what
    was counted before it asked: that scrape waits for the next)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.lock = trio.Lock()
        self.begun = 0  # renderings begun so far
        # the last one done: its number, its parts (kept until the next is done)
        self.last: tuple[int, list[bytes]] = (0, [])

    async def parts(self) -> list[bytes]:
        asked = self.begun
        async with self.lock:
            done, parts = self.last
            if done > asked:  # begun after this scrape asked
                return parts
            self.begun = number = self.begun + 1
            parts = []
            # (shielded: the scrapes waiting for it get it though the one that began it
            # is cut off, its slot taken by a newer connection (_Slots) or timed out)
            with trio.CancelScope(shield=True):
                for part in self.metrics.parts():
                    parts.append(part)
                    await trio.sleep(0)
            self.last = (number, parts)
            return parts


async def _read_request(stream: trio.abc.Stream) -> bytes | None:
    """Bytes up to the blank line ending the headers; None if the peer sent too much."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST:
            return None
        data = await stream.receive_some(4096)
        if not data:
            break  # the peer half-closed: answer what we have (a bare request line is fine)
        buf += data
    return bytes(buf)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close, then read what the client still sends until it closes too. Closing with
    unread input makes the kernel send a reset, which can destroy the reply in flight (a
    400 to an oversized request would never arrive)."""
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_TIMEOUT):
        while drained < LINGER_MAX and (data := await stream.receive_some(65536)):
            drained += len(data)


class _Slots:
    """The connections served, at most `limit`. When all are taken, a new connection
    takes the slot of the oldest one still waiting for its request, else of the oldest
    one answered (sending its reply or lingering after it), else it is closed at once. A
    scraper sends its request as it connects and reads its reply, so what fills the
    slots is clients that send theirs slowly or never, or never read the reply nor
    close; without a bound, each held a descriptor for up to READ_TIMEOUT, and thousands
    of them could starve blockd of descriptors; with one that only the silent gave up,
    a few that never read locked every scrape out."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        self.reading: dict[trio.CancelScope, None] = {}  # (ordered: oldest first)
        self.replying: dict[trio.CancelScope, None] = {}  # (the same)

    def take(self) -> bool:
        if self.taken >= self.limit:
            waiting = self.reading or self.replying
            if not waiting:
                return False
            oldest = next(iter(waiting))
            del waiting[oldest]
            oldest.cancel()  # (its slot is free once its task has closed the connection)
        self.taken += 1
        return True


async def _handle(renders: _Renders, stream: trio.abc.Stream, slots: _Slots) -> None:
    if not slots.take():
        await trio.aclose_forcefully(stream)
        return
    try:
        with trio.move_on_after(READ_TIMEOUT) as scope:
            slots.reading[scope] = None
            try:
                request = await _read_request(stream)
            finally:
                slots.reading.pop(scope, None)
        if scope.cancelled_caught:
            return
        reply = (_response("400 Bad Request", b"request too large\n") if request is None
                 else _route(request))
        with trio.move_on_after(READ_TIMEOUT) as scope:
            slots.replying[scope] = None
            try:
                if isinstance(reply, bytes):
                    await stream.send_all(reply)
                else:  # the metrics: the parts of a rendering, sent as they are (no copy)
                    parts = await renders.parts()
                    await stream.send_all(_response(
                        "200 OK", b"", CONTENT_TYPE, head=True,
                        length=sum(map(len, parts))))
                    if reply == "GET":
                        for part in parts:
                            await stream.send_all(part)
                await _linger(stream)
            finally:
                slots.replying.pop(scope, None)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the scraper went away; nothing to tell it
    except Exception:  # one bad connection must never stop the listener
        log.exception("event=metrics_request_failed")
    finally:
        slots.taken -= 1
        await trio.aclose_forcefully(stream)


async def serve_metrics(metrics: Metrics, host: str, port: int, *,
                        max_connections: int = MAX_CONNECTIONS,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve GET /metrics on host:port until cancelled; `task_status.started(bound_port)`.
    At most `max_connections` connections are held at once (_Slots)."""
    listeners = await open_listeners(port, host, "metrics")
    bound = listeners[0].socket.getsockname()[1]
    slots = _Slots(max_connections)
    renders = _Renders(metrics)

    async def handler(stream):
        await _handle(renders, stream, slots)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        log.info("event=metrics_listening address=%s:%d", host, bound)
        task_status.started(bound)
