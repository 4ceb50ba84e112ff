"""What moving a MiB between two processes of one machine costs, over loopback TCP (the
congestion control blockd uses, cubic) and over a Unix stream socket: a sender thread
keeps 8 frames of 1 MiB in flight, and a receiver on trio (non-blocking reads, epoll
waits, as blockd's peer sessions and NBD connections read; with SO_RCVLOWAT at the
frame's size over TCP, as they set it) answers each with 11 bytes. Prints MiB/s and the
CPU per MiB of each side, and the receiver's wakeups per frame.

    .venv/bin/python -m bench.transport_bench [--seconds 3] [--rounds 2]

Replicas=3 on one machine moves every written MiB three times (the client's to the
gateway, and the gateway's to each other copy), so this cost, mostly the kernel's, is
most of the machine's CPU per MiB written (bench results, "machine CPU").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import trio

from bench.peer_bench import cpu_seconds

FRAME = 1 << 20
IN_FLIGHT = 8
ANSWER = b"x" * 11
UNIX_NAME = "vbp-transport-bench-%d"  # (abstract, "\0" first: nothing left in the file system)


def _socket(family: str) -> socket.socket:
    return socket.socket(socket.AF_UNIX if family == "unix" else socket.AF_INET)


def serve(family: str, address) -> None:
    listener = _socket(family)
    if family == "tcp":
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen()
    print("ready", flush=True)
    conn, _ = listener.accept()
    if family == "tcp":
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, FRAME)
    conn.setblocking(False)

    async def receive() -> None:
        view = memoryview(bytearray(FRAME))
        frames = waits = 0
        while True:
            have = 0
            while have < FRAME:
                try:
                    n = conn.recv_into(view[have:])
                except BlockingIOError:
                    waits += 1
                    await trio.lowlevel.wait_readable(conn)
                    continue
                if not n:
                    print(f"{waits / max(1, frames):.2f}", flush=True)
                    return
                have += n
            frames += 1
            try:
                conn.send(ANSWER)
            except OSError:  # (the sender is done and gone)
                print(f"{waits / max(1, frames):.2f}", flush=True)
                return

    trio.run(receive)


def measure(family: str, seconds: float) -> tuple[float, float, float, float]:
    address = "\0" + UNIX_NAME % os.getpid() if family == "unix" else ("127.0.0.1", _free_port())
    server = subprocess.Popen([sys.executable, "-m", "bench.transport_bench", "--serve", family,
                               address[1:] if family == "unix" else str(address[1])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        s = _socket(family)
        s.connect(address)
        if family == "tcp":
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
        frame = os.urandom(FRAME)
        answered, room, done = [0], threading.Semaphore(IN_FLIGHT), threading.Event()

        def answers() -> None:
            while not done.is_set():
                got = s.recv(4096)
                if not got:
                    return
                k = len(got) // len(ANSWER)
                answered[0] += k
                for _ in range(k):
                    room.release()

        threading.Thread(target=answers, daemon=True).start()
        theirs, ours, start = cpu_seconds(server.pid), cpu_seconds(None), time.perf_counter()
        while time.perf_counter() - start < seconds:
            room.acquire()
            s.sendall(frame)
        elapsed = time.perf_counter() - start
        theirs, ours = cpu_seconds(server.pid) - theirs, cpu_seconds(None) - ours
        n = answered[0]
        done.set()
        s.close()
        waits = float(server.stdout.readline() or "nan")
    finally:
        server.wait(timeout=10) if server.poll() is None else None
    return n / elapsed, ours / n * 1e6, theirs / n * 1e6, waits


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=2, metavar=("FAMILY", "ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        family, address = args.serve
        serve(family, "\0" + address if family == "unix" else ("127.0.0.1", int(address)))
        return
    print(f"frames of 1 MiB, {IN_FLIGHT} in flight, one machine; CPU per MiB moved")
    for _ in range(args.rounds):
        for family in ("tcp", "unix"):
            rate, sender, receiver, waits = measure(family, args.seconds)
            print(f"{family:4s} {rate:7.0f} MiB/s, sender {sender:5.0f} µs/MiB, receiver "
                  f"{receiver:5.0f} µs/MiB, together {sender + receiver:5.0f}; receiver waits "
                  f"{waits:.2f} a frame")


if __name__ == "__main__":
    main()
