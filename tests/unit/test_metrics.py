"""blockd.metrics: the families and their values, the cost of the per-request hook, and the
/metrics responder scraped over a real socket (and with curl when it is installed)."""

from __future__ import annotations

import functools
import shutil
import socket

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from blockd.metrics import LATENCY_BUCKETS, READ_TIMEOUT, Metrics, respond, serve_metrics


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str, **labels) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels} in {family}")


def busy_metrics() -> Metrics:
    m = Metrics()
    for _ in range(3):
        m.observe("disk1", "read", 4096, 80e-6)
    m.observe("disk1", "write", 65536, 2e-3)
    m.observe("disk1", "flush", 0, 30.0)  # beyond the last bucket: counted in +Inf
    m.observe("disk2", "read", 512, 10e-6)  # exactly on a bound: le is inclusive
    m.replica_error("host2", "timeout")
    m.replica_error("host2", "timeout")
    m.replica_error("host3", "connection")
    m.checksum_error()
    m.repaired(2)
    m.set_recovery(17, 17 * 4 << 20)
    m.set_space(100 << 30, 3 << 30)
    m.set_up(True)
    return m


def test_a_batch_of_requests_counts_like_the_same_requests_one_by_one():
    """The NBD server observes the requests of one batch with one call (count=)."""
    one, batch = Metrics(), Metrics()
    for _ in range(5):
        one.stats("v", "read").add(4096, 80e-6)
    batch.stats("v", "read").add(5 * 4096, 80e-6, 5)
    h = "vbp_nbd_request_seconds"
    for m in (one, batch):
        fams = families(m.exposition().decode())
        assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total", volume="v", op="read") == 5
        assert sample(fams, "vbp_nbd_bytes", "vbp_nbd_bytes_total", volume="v", op="read") == 5 * 4096
        assert sample(fams, h, h + "_count", volume="v", op="read") == 5
        assert sample(fams, h, h + "_sum", volume="v", op="read") == pytest.approx(400e-6)
        assert sample(fams, h, h + "_bucket", volume="v", op="read", le="5e-05") == 0
        assert sample(fams, h, h + "_bucket", volume="v", op="read", le="0.0001") == 5


def test_every_family_is_exposed_with_its_values():
    fams = families(busy_metrics().exposition().decode())
    assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total", volume="disk1", op="read") == 3
    assert sample(fams, "vbp_nbd_bytes", "vbp_nbd_bytes_total", volume="disk1", op="read") == 3 * 4096
    assert sample(fams, "vbp_nbd_bytes", "vbp_nbd_bytes_total", volume="disk1", op="write") == 65536
    assert sample(fams, "vbp_nbd_bytes", "vbp_nbd_bytes_total", volume="disk1", op="flush") == 0
    h = "vbp_nbd_request_seconds"
    assert fams[h].type == "histogram"
    assert sample(fams, h, h + "_count", volume="disk1", op="read") == 3
    assert sample(fams, h, h + "_sum", volume="disk1", op="read") == pytest.approx(240e-6)
    assert sample(fams, h, h + "_bucket", volume="disk1", op="read", le="5e-05") == 0
    assert sample(fams, h, h + "_bucket", volume="disk1", op="read", le="0.0001") == 3
    assert sample(fams, h, h + "_bucket", volume="disk1", op="flush", le="1.0") == 0
    assert sample(fams, h, h + "_bucket", volume="disk1", op="flush", le="+Inf") == 1
    assert sample(fams, h, h + "_bucket", volume="disk2", op="read", le="1e-05") == 1
    assert sample(fams, "vbp_replica_errors", "vbp_replica_errors_total", peer="host2", kind="timeout") == 2
    assert sample(fams, "vbp_replica_errors", "vbp_replica_errors_total", peer="host3",
                  kind="connection") == 1
    assert sample(fams, "vbp_checksum_errors", "vbp_checksum_errors_total") == 1
    assert sample(fams, "vbp_repairs", "vbp_repairs_total") == 2
    assert sample(fams, "vbp_recovery_chunks_remaining", "vbp_recovery_chunks_remaining") == 17
    assert sample(fams, "vbp_recovery_bytes_remaining", "vbp_recovery_bytes_remaining") == 17 * 4 << 20
    assert sample(fams, "vbp_capacity_bytes", "vbp_capacity_bytes") == 100 << 30
    assert sample(fams, "vbp_used_bytes", "vbp_used_bytes") == 3 << 30
    assert sample(fams, "vbp_up", "vbp_up") == 1
    assert sample(fams, "vbp_nbd_held_bytes", "vbp_nbd_held_bytes") == 0


def test_nbd_held_bytes_reads_the_servers_budget_at_each_scrape():
    from nbd_frontend.server import HeldBytes

    m, held = Metrics(), HeldBytes()
    m.watch_nbd_held(held)
    held.total = 5 << 20
    assert sample(families(m.exposition().decode()), "vbp_nbd_held_bytes", "vbp_nbd_held_bytes") == 5 << 20
    held.total = 0
    assert sample(families(m.exposition().decode()), "vbp_nbd_held_bytes", "vbp_nbd_held_bytes") == 0


def test_histogram_buckets_span_10us_to_1s_and_are_cumulative():
    assert LATENCY_BUCKETS[0] == 10e-6 and LATENCY_BUCKETS[-1] == 1.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    m = Metrics()
    for i in range(1000):
        m.observe("v", "read", 0, 10 ** (-5.5 + 6 * i / 1000))  # 3 µs .. 3 s
    h = "vbp_nbd_request_seconds"
    fams = families(m.exposition().decode())
    buckets = [(s.labels["le"], s.value) for s in fams[h].samples if s.name == h + "_bucket"]
    values = [v for _, v in buckets]
    assert values == sorted(values) and values[-1] == 1000
    assert buckets[-1][0] == "+Inf" and len(buckets) == len(LATENCY_BUCKETS) + 1


def test_forget_volume_drops_its_series_only():
    m = busy_metrics()
    assert m.request_counts() == {"disk1": 5, "disk2": 1}
    m.forget_volume("disk1")
    assert m.request_counts() == {"disk2": 1}
    text = m.exposition().decode()
    assert 'volume="disk1"' not in text and 'volume="disk2"' in text
    m.observe("disk1", "read", 1, 1e-4)  # and it can come back
    assert sample(families(m.exposition().decode()), "vbp_nbd_requests", "vbp_nbd_requests_total",
                  volume="disk1", op="read") == 1


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.observe("v", "read", 1, 1e-4)
    assert 'volume="v"' not in b.exposition().decode()
    assert a.registry is not b.registry


# --- the responder, pure -----------------------------------------------------------------


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /metrics HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /metrics?name[]=vbp_up HTTP/1.1\r\nHost: x\r\n\r\n", b"200"),
    (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"200"),
    (b"GET / HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /nope HTTP/1.0\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.0\r\n\r\n", b"405"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"GET /metrics SPDY/3\r\n\r\n", b"400"),
    (b"GET metrics HTTP/1.0\r\n\r\n", b"400"),
    (b"\xff\xfe\x00garbage\r\n\r\n", b"400"),
    (b"", b"400"),
])
def test_respond_status(request_bytes, status):
    reply = respond(busy_metrics(), request_bytes)
    assert reply.split(b" ", 2)[1] == status
    head, _, body = reply.partition(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
    if request_bytes.startswith(b"HEAD"):
        assert body == b"" and length > 0
    else:
        assert len(body) == length


# --- the responder, over a real socket ---------------------------------------------------


async def http(port: int, raw: bytes, *, half_close: bool = True) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        if half_close:
            await stream.send_eof()
        out = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                out += chunk
    return bytes(out)


async def test_scrape_over_a_socket_and_garbage_gets_400(nursery):
    m = busy_metrics()
    port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    assert port > 0
    reply = await http(port, b"GET /metrics HTTP/1.0\r\nUser-Agent: test\r\n\r\n", half_close=False)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"text/plain; version=0.0.4" in head
    fams = families(body.decode())
    assert sample(fams, "vbp_up", "vbp_up") == 1

    for garbage in (b"\x00\x01\x02\x03\r\n\r\n", b"HELLO\r\n\r\n", b"x" * 20000, b"GET /metrics\n\n"):
        reply = await http(port, garbage)
        assert reply.startswith(b"HTTP/1.0 400 "), reply[:80]
    # a client that connects and says nothing, one that disconnects at once
    idle = await trio.open_tcp_stream("127.0.0.1", port)
    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()

    m.observe("disk3", "write", 4096, 1e-3)  # still up, and it serves current values
    body = (await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")).partition(b"\r\n\r\n")[2]
    assert sample(families(body.decode()), "vbp_nbd_requests", "vbp_nbd_requests_total",
                  volume="disk3", op="write") == 1
    await idle.aclose()


async def test_many_scrapes_at_once(nursery):
    m = busy_metrics()
    port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    replies = []

    async def one():
        replies.append(await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(one)
    assert len(replies) == 20 and all(r.startswith(b"HTTP/1.0 200") for r in replies)


def _closed_by_server(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # open, nothing sent
    except ConnectionResetError:
        return True


async def test_connections_that_send_no_request_are_bounded_and_scrapes_still_work(nursery):
    """Clients that connect and send nothing (or half a request) hold at most
    max_connections descriptors, not one each for READ_TIMEOUT: the oldest of them gives
    its slot to a new connection, and a scrape is answered at once."""
    port = await nursery.start(functools.partial(serve_metrics, busy_metrics(), "127.0.0.1", 0,
                                                 max_connections=8))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        idle[-1].sendall(b"GET /metr")
        with trio.fail_after(READ_TIMEOUT / 2):  # (not by their timing out)
            reply = await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
            assert reply.startswith(b"HTTP/1.0 200 OK")
            while sum(map(_closed_by_server, idle)) < len(idle) - 8:
                await trio.sleep(0.02)
        assert not all(map(_closed_by_server, idle))  # (up to the bound, they are served)
    finally:
        for s in idle:
            s.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_scrape_with_curl(nursery):
    port = await nursery.start(serve_metrics, busy_metrics(), "127.0.0.1", 0)
    p = await trio.run_process(["curl", "-sS", "--fail", "--max-time", "10", f"http://127.0.0.1:{port}/metrics"],
                               capture_stdout=True, capture_stderr=True, check=False)
    assert p.returncode == 0, p.stderr
    fams = families(p.stdout.decode())
    assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total", volume="disk1", op="read") == 3
    p = await trio.run_process(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{port}/other"], capture_stdout=True, check=False)
    assert p.stdout == b"404"


async def test_clients_that_never_read_their_reply_do_not_lock_scrapes_out(nursery):
    """Clients that send a request and then neither read the reply nor close hold their
    connection for the linger after the reply (LINGER_TIMEOUT): once max_connections of
    them did, every scrape was closed unanswered, and a client could keep it so by
    renewing them. Their slots go to new connections as those of silent clients do."""
    from blockd.metrics import LINGER_TIMEOUT

    port = await nursery.start(functools.partial(serve_metrics, busy_metrics(), "127.0.0.1", 0,
                                                 max_connections=8))
    mute = []
    try:
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            mute.append(s)
        await trio.sleep(0.2)  # (answered: each lingers now)
        with trio.fail_after(LINGER_TIMEOUT / 2):
            reply = await http(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 200 OK"), reply[:80]
    finally:
        for s in mute:
            s.close()


# --- a scrape of many series, and many scrapes at once -------------------------------------


class Ticks:
    """Stands for the NBD server's HeldBytes (watch_nbd_held): counts the times its total
    is read, once per rendering of the exposition, and reads the ticks of a task that
    takes one step per turn of the event loop (other work: the NBD connections)."""

    def __init__(self):
        self.ticks = 0
        self.reads: list[int] = []

    @property
    def total(self) -> int:
        self.reads.append(self.ticks)
        return 0

    async def tick(self):
        while True:
            self.ticks += 1
            await trio.sleep(0)


def many_series(volumes: int = 200) -> tuple[Metrics, Ticks]:
    from blockd.metrics import OPS

    m = busy_metrics()
    for v in range(volumes):
        for op in OPS:
            m.observe(f"vm-{v:04d}.disk0", op, 4096, 3e-4)
    ticks = Ticks()
    m.watch_nbd_held(ticks)
    return m, ticks


async def test_a_scrape_of_many_series_lets_other_work_run_while_it_renders(nursery):
    """1400 (volume, op) series (200 volumes served here) take a while to render (about
    0.1 s here; 5.6 MB and 0.4 s for 500 volumes): the event loop, which serves every
    NBD request of the host, must get to other tasks while a scrape renders them, not
    only once it is done. The held-bytes gauge is read after them (so its read sees how
    often the ticker ran since the request went out)."""
    m, ticks = many_series()
    port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    nursery.start_soon(ticks.tick)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        sent = ticks.ticks
        body = bytearray()
        with trio.fail_after(30):
            while chunk := await stream.receive_some(65536):
                body += chunk
    assert len(ticks.reads) == 1
    assert ticks.reads[0] - sent >= 10
    fams = families(bytes(body).partition(b"\r\n\r\n")[2].decode())
    assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total", volume="vm-0199.disk0",
                  op="cache") == 1


async def test_scrapes_asked_together_share_a_rendering(nursery):
    """20 scrapes at once of a host with many series: each used to render the whole
    exposition for itself, and hold its own copy of it (megabytes each, 64 connections
    at once) until sent. Those asked before a rendering began are answered by it: one
    for the first, one for those that came while it ran (a few more at most, if some
    came late). Every one gets the whole, current exposition."""
    m, ticks = many_series()
    port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
    replies = []

    async def one():
        replies.append(await http(port, b"GET /metrics HTTP/1.0\r\n\r\n"))

    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(one)
    assert len(replies) == 20 and len(set(replies)) <= len(ticks.reads) <= 4
    for reply in set(replies):
        fams = families(reply.partition(b"\r\n\r\n")[2].decode())
        assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total",
                      volume="vm-0199.disk0", op="cache") == 1


def test_a_failed_request_counts_no_bytes(tmp_path):
    """The NBD server reports a failed request to its export's hook with ok=False (an EIO
    read, a write refused by a read-only export): it counts as a request, with its
    latency, but moved no bytes, so nbd_bytes does not count them."""
    from tests.unit.test_gateway_local_writes import one_host

    store, _, gw = one_host(tmp_path)
    with store:
        gw.metrics = m = Metrics()
        gw.observe(0, 4096, 1e-4, True)
        gw.observe(0, 65536, 1e-4, False)
        gw.observe(1, 4096, 2e-4, False)
        fams = families(m.exposition().decode())
    for op, requests, nbytes in (("read", 2, 4096), ("write", 1, 0)):
        assert sample(fams, "vbp_nbd_requests", "vbp_nbd_requests_total", volume="v", op=op) == requests
        assert sample(fams, "vbp_nbd_bytes", "vbp_nbd_bytes_total", volume="v", op=op) == nbytes


async def test_a_rendering_whose_scrape_is_cut_off_still_answers_those_waiting_for_it():
    """A scrape cut off while it renders (its slot given to a newer connection, or timed
    out) leaves the rendering to finish for the scrapes waiting for it: under a stream of
    connections taking each other's slots, renderings begun again and again would answer
    nobody."""
    from blockd.metrics import _Renders

    m, ticks = many_series(20)
    renders = _Renders(m)
    got = {}

    async def scrape(name, task_status=trio.TASK_STATUS_IGNORED):
        with trio.CancelScope() as scope:
            task_status.started(scope)
            got[name] = await renders.parts()

    async with trio.open_nursery() as n:
        await n.start(scrape, "a")
        while renders.begun < 1:
            await trio.sleep(0)
        assert not renders.last[0]  # a renders; b and c ask meanwhile, for the next one
        cut = await n.start(scrape, "b")
        await n.start(scrape, "c")
        while renders.begun < 2:
            await trio.sleep(0)
        cut.cancel()  # b, rendering the second
    assert renders.begun == len(ticks.reads) == 2  # (the gauge: read once per rendering done)
    assert b"".join(got["c"]) == m.exposition()
