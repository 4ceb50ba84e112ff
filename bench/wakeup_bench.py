"""What one wakeup costs a server: the CPU a server process spends per round trip of a
4 KiB request with one in flight over loopback (each request wakes it from its wait),
for three servers in a child process each:

- `blocking`: a Python thread in recv_into / send on a blocking socket (the kernel's
  part and the least Python can do);
- `trio`: the same loop on trio (wait_readable through epoll, the scheduler's pass);
- `peer`: vbp's peer session (replicator.transport.serve_peers) answering a 4 KiB
  WriteChunk with Ok at once, as bench.peer_bench does (codec, batching, dispatch).

    .venv/bin/python -m bench.wakeup_bench [--seconds 2]

The differences are what trio's loop, and then the peer session's Python, add to each
wakeup: a request that comes alone (QD1, or a 1 MiB frame, which is one request a
receive) pays all of it; requests that come together share it.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

import trio

from bench.peer_bench import CLUSTER, cpu_seconds, handler, write

SIZE = 4096
ANSWER = b"x" * 16


async def _serve_trio(listener: socket.socket) -> None:
    conn, _ = await trio.to_thread.run_sync(listener.accept)
    conn.setblocking(False)
    buf = bytearray(2 * SIZE)
    while True:
        await trio.lowlevel.wait_readable(conn)
        try:
            n = conn.recv_into(buf)
        except BlockingIOError:
            continue
        if not n:
            return
        if n >= SIZE:
            conn.send(ANSWER)


def _serve_blocking(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    buf = bytearray(2 * SIZE)
    have = 0
    while True:
        n = conn.recv_into(memoryview(buf)[have:])
        if not n:
            return
        have += n
        if have >= SIZE:
            have -= SIZE
            conn.sendall(ANSWER)


def serve(kind: str) -> None:
    if kind == "peer":
        async def run() -> None:
            from replicator.transport import serve_peers
            async with trio.open_nursery() as nursery:
                port = await nursery.start(lambda task_status: serve_peers(
                    handler, "127.0.0.1", 0, cluster=CLUSTER, host_id="server",
                    task_status=task_status))
                print(port, flush=True)
        trio.run(run)
        return
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    if kind == "trio":
        trio.run(_serve_trio, listener)
    else:
        _serve_blocking(listener)


def raw_client(port: int, seconds: float, pid: int) -> tuple[float, float]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"y" * SIZE
    n, cpu, start = 0, cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() - start < seconds:
        s.sendall(msg)
        got = 0
        while got < len(ANSWER):
            got += len(s.recv(64))
        n += 1
    rate, used = n / (time.perf_counter() - start), cpu_seconds(pid) - cpu
    s.close()
    return rate, used / n * 1e6


def peer_client(port: int, seconds: float, pid: int) -> tuple[float, float]:
    from replicator.transport import PeerPool

    out = []

    async def run() -> None:
        async with PeerPool(CLUSTER, "client") as pool:
            msg, address = write(SIZE), f"127.0.0.1:{port}"
            for _ in range(50):
                await pool.call(address, msg)
            n, cpu, start = 0, cpu_seconds(pid), time.perf_counter()
            while time.perf_counter() - start < seconds:
                await pool.call(address, msg)
                n += 1
            out.append((n / (time.perf_counter() - start), (cpu_seconds(pid) - cpu) / n * 1e6))

    trio.run(run)
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--serve", choices=("blocking", "trio", "peer"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    print(f"one {SIZE} B request in flight over loopback; server CPU per round trip")
    for kind in ("blocking", "trio", "peer"):
        server = subprocess.Popen([sys.executable, "-m", "bench.wakeup_bench", "--serve", kind],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            client = peer_client if kind == "peer" else raw_client
            rate, cpu = client(port, args.seconds, server.pid)
        finally:
            server.kill()
            server.wait()
        print(f"{kind:9s} {rate:8.0f} round trips/s, server CPU {cpu:6.1f} µs per round trip")


if __name__ == "__main__":
    main()
