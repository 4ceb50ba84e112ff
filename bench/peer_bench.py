"""Peer protocol throughput over loopback: a PeerPool against serve_peers whose handler
answers Ok at once (so this measures codec + transport, no disk).

    .venv/bin/python -m bench.peer_bench [--seconds 3] [--inproc] [--no-split]

Prints round trips per second of 4 KiB WriteChunk with 1 and 32 in flight, and MiB/s of
1 MiB WriteChunk with 1 and 4 in flight. The server runs in a child process (its own core)
unless --inproc. --no-split sends large payloads copied into one frame instead of as their
own buffer, to compare the two encodings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import trio

from replicator import codec
from replicator import messages as m
from replicator.transport import PeerPool, serve_peers

CLUSTER = "bench"
SERVER_PID: int | None = None  # the child server, when there is one


def handler(msg, peer):
    return m.Ok(msg.version)


async def serve(port: int) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(lambda task_status: serve_peers(
            handler, "127.0.0.1", port, cluster=CLUSTER, host_id="server",
            task_status=task_status))
        print(bound, flush=True)


def write(size: int) -> m.WriteChunk:
    return m.WriteChunk("vol", "lineage", 7, 1, (1,), 0, b"\xab" * size, 4 << 20, 1, False, 1, 1)


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) used so far by process `pid` (Linux), or by this one."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(pool: PeerPool, address: str, msg, in_flight: int, seconds: float
                  ) -> tuple[float, float]:
    """(calls per second, server CPU µs per call, client CPU µs per call) with `in_flight`
    concurrent callers."""
    done = 0
    stop = trio.current_time() + seconds

    async def caller():
        nonlocal done
        while trio.current_time() < stop:
            await pool.call(address, msg)
            done += 1

    for _ in range(50):  # warm up the connection
        await pool.call(address, msg)
    start = time.perf_counter()
    cpu, own = cpu_seconds(SERVER_PID), cpu_seconds(None)
    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(caller)
    cpu, own = cpu_seconds(SERVER_PID) - cpu, cpu_seconds(None) - own
    return done / (time.perf_counter() - start), cpu / done * 1e6, own / done * 1e6


async def client(address: str, seconds: float) -> None:
    async with PeerPool(CLUSTER, "client") as pool:
        small, big = write(4096), write(1 << 20)
        cpu_note = "server" if SERVER_PID else "process (client + server)"
        for depth in (1, 32):
            rate, cpu, own = await measure(pool, address, small, depth, seconds)
            print(f"4 KiB WriteChunk, {depth:2d} in flight: {rate:9.0f} round trips/s "
                  f"({rate * 4096 / (1 << 20):6.1f} MiB/s), {cpu_note} CPU {cpu:6.1f} µs/req"
                  + (f", client {own:6.1f}" if SERVER_PID else ""))
        for depth in (1, 4):
            rate, cpu, own = await measure(pool, address, big, depth, seconds)
            print(f"1 MiB WriteChunk, {depth:2d} in flight: {rate:9.1f} round trips/s "
                  f"({rate:6.1f} MiB/s), {cpu_note} CPU {cpu:6.1f} µs/req"
                  + (f", client {own:6.1f}" if SERVER_PID else ""))


async def inproc(seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_peers(
            handler, "127.0.0.1", 0, cluster=CLUSTER, host_id="server",
            task_status=task_status))
        await client(f"127.0.0.1:{port}", seconds)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--inproc", action="store_true", help="server in this process")
    parser.add_argument("--no-split", action="store_true",
                        help="copy large payloads into one frame")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.no_split:
        codec.SPLIT_THRESHOLD = 1 << 62
    if args.serve is not None:
        trio.run(serve, args.serve)
        return
    print(f"peer protocol v{m.PROTO_VERSION}, loopback, server "
          f"{'in process' if args.inproc else 'in a child process'}"
          f"{', no split' if args.no_split else ''}")
    if args.inproc:
        trio.run(inproc, args.seconds)
        return
    cmd = [sys.executable, "-m", "bench.peer_bench", "--serve", "0"]
    if args.no_split:
        cmd.append("--no-split")
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    global SERVER_PID
    SERVER_PID = server.pid
    try:
        port = int(server.stdout.readline())
        trio.run(client, f"127.0.0.1:{port}", args.seconds)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
