"""The bare Python NBD file server of DESIGN.md's Speed section: the ceiling of any Python
server on this machine, run beside the references (`python -m bench --targets ...,py-bare`).

What it does, and nothing more: the fixed newstyle handshake (NBD_OPT_GO, NBD_OPT_INFO and
NBD_OPT_EXPORT_NAME; every other option gets NBD_REP_ERR_UNSUP), then per connection one
thread that receives into one preallocated buffer, parses every request already received,
does each pread / pwrite inline and sends all replies of the batch with one sendmsg.
Simple replies only; READ, WRITE, FLUSH and DISC. No volume map, no checksums (unless
--checksums: one xxh3_64 per 4 KiB page written or read, as vbp keeps), no replication, no
scheduler. It is not part of vbp and must not be used as a server: it trusts its client
(lengths are bounded by the buffer, not checked against the export's size).

With --threads, three threads share each connection instead, so that the system calls of
one request overlap those of the next on the other core (each releases the GIL): this one
receives each request, a write's payload straight into a buffer from a pool; an io thread
does the pread / pwrite and the checksums and sends a write's reply; a sender thread sends
the read replies, all that are waiting in one sendmsg. One hand-off per request through a
queue.SimpleQueue: the shape for large requests, not for 4 KiB ones.

With --splice, one request at a time, a write's payload goes from the socket into a pipe and
from the pipe into the file by splice(2), never into the process, and its checksums are
taken from the page cache through a map of the file: what a zero-copy receive path saves.

    python bench/bare_server.py --port 10809 FILE [--checksums] [--threads | --splice]
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import struct
import sys
import threading

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_INFO, OPT_GO, OPT_ABORT = 1, 6, 7, 2
REP_ACK, REP_INFO, REP_ERR_UNSUP = 1, 3, (1 << 31) + 1
INFO_EXPORT = 0
TX_FLAGS = 1 | 4 | 8 | 256  # HAS_FLAGS, SEND_FLUSH, SEND_FUA, CAN_MULTI_CONN
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
CMD_FLAG_FUA = 1
PAGE = 4096

REQ = struct.Struct(">IHHQQI")
REPLY = struct.Struct(">IIQ")
OPT = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
BUF = 64 << 20


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise ConnectionError("client went away")
        out += b
    return bytes(out)


def handshake(sock: socket.socket, size: int) -> bool:
    sock.sendall(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
    (cflags,) = struct.unpack(">I", recv_exact(sock, 4))
    while True:
        _, opt, length = OPT.unpack(recv_exact(sock, OPT.size))
        recv_exact(sock, length)
        if opt == OPT_EXPORT_NAME:
            sock.sendall(struct.pack(">QH", size, TX_FLAGS)
                         + (b"" if cflags & FLAG_NO_ZEROES else bytes(124)))
            return True
        if opt in (OPT_GO, OPT_INFO):
            info = struct.pack(">HQH", INFO_EXPORT, size, TX_FLAGS)
            sock.sendall(OPT_REPLY.pack(REPLY_MAGIC, opt, REP_INFO, len(info)) + info
                         + OPT_REPLY.pack(REPLY_MAGIC, opt, REP_ACK, 0))
            if opt == OPT_GO:
                return True
        elif opt == OPT_ABORT:
            sock.sendall(OPT_REPLY.pack(REPLY_MAGIC, opt, REP_ACK, 0))
            return False
        else:
            sock.sendall(OPT_REPLY.pack(REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))


def serve(sock: socket.socket, fd: int, h) -> None:
    """Transmission, after the handshake; `h`: the page checksum, None without."""
    buf = bytearray(BUF)
    view = memoryview(buf)
    have = 0
    pread, pwrite, unpack_from, pack = os.pread, os.pwrite, REQ.unpack_from, REPLY.pack
    while True:
        n = sock.recv_into(view[have:])
        if not n:
            return
        have += n
        pos, out = 0, []
        while have - pos >= REQ.size:
            magic, flags, cmd, handle, offset, length = unpack_from(buf, pos)
            if magic != REQUEST_MAGIC:
                return
            if cmd == CMD_WRITE:
                if have - pos < REQ.size + length:
                    break
                data = view[pos + REQ.size:pos + REQ.size + length]
                pwrite(fd, data, offset)
                if h is not None:
                    sums = [h(data[i:i + PAGE]) for i in range(0, length, PAGE)]
                if flags & CMD_FLAG_FUA:
                    os.fdatasync(fd)
                out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                pos += REQ.size + length
                continue
            pos += REQ.size
            if cmd == CMD_READ:
                data = pread(fd, length, offset)
                if h is not None:
                    sums = [h(data[i:i + PAGE]) for i in range(0, length, PAGE)]
                out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
                out.append(data)
            elif cmd == CMD_FLUSH:
                os.fdatasync(fd)
                out.append(pack(SIMPLE_REPLY_MAGIC, 0, handle))
            elif cmd == CMD_DISC:
                return
            else:
                out.append(pack(SIMPLE_REPLY_MAGIC, 22, handle))  # EINVAL
        if out:
            _send_all(sock, out)
        if pos:
            rest = have - pos
            if rest:
                view[:rest] = view[pos:have]
            have = rest
        if have == BUF:
            return  # a request larger than the buffer: not for this server


POOL_BUF, POOL_SIZE = 1 << 20, 32  # --threads: write payloads up to 1 MiB, 32 in flight
STOP = None


def serve_threads(sock: socket.socket, fd: int, h) -> None:
    """Transmission, after the handshake; `h`: the page checksum, None without."""
    work, replies, pool = queue.SimpleQueue(), queue.SimpleQueue(), queue.SimpleQueue()
    for _ in range(POOL_SIZE):
        pool.put(bytearray(POOL_BUF))
    send_lock = threading.Lock()  # (write replies from the io thread, read replies here)

    def io() -> None:
        pread, pwrite, pack = os.pread, os.pwrite, REPLY.pack
        failed = False
        while (item := work.get()) is not STOP:
            cmd, flags, handle, offset, arg, buf = item
            if failed:  # the connection broke: hand back the buffers until the reader stops
                if buf is not None:
                    pool.put(buf)
                continue
            try:
                if cmd == CMD_WRITE:
                    pwrite(fd, arg, offset)
                    if h is not None:
                        sums = [h(arg[i:i + PAGE]) for i in range(0, len(arg), PAGE)]
                    if flags & CMD_FLAG_FUA:
                        os.fdatasync(fd)
                    if buf is not None:
                        pool.put(buf)
                    with send_lock:
                        _send_all(sock, [pack(SIMPLE_REPLY_MAGIC, 0, handle)])
                elif cmd == CMD_READ:
                    data = pread(fd, arg, offset)
                    if h is not None:
                        view = memoryview(data)
                        sums = [h(view[i:i + PAGE]) for i in range(0, arg, PAGE)]
                    replies.put([pack(SIMPLE_REPLY_MAGIC, 0, handle), data])
                else:
                    if cmd == CMD_FLUSH:
                        os.fdatasync(fd)
                    replies.put([pack(SIMPLE_REPLY_MAGIC, 0 if cmd == CMD_FLUSH else 22,
                                      handle)])
            except OSError:
                failed = True
                sock.shutdown(socket.SHUT_RDWR)  # (the reader sees the end)
        replies.put(STOP)

    def sender() -> None:
        while (out := replies.get()) is not STOP:
            while True:  # and every reply waiting behind it
                try:
                    more = replies.get_nowait()
                except queue.Empty:
                    break
                if more is STOP:
                    replies.put(STOP)
                    break
                out += more
            try:
                with send_lock:
                    _send_all(sock, out)
            except OSError:
                sock.shutdown(socket.SHUT_RDWR)

    threads = [threading.Thread(target=io, daemon=True),
               threading.Thread(target=sender, daemon=True)]
    for t in threads:
        t.start()
    head = bytearray(REQ.size)
    try:
        while sock.recv_into(head, REQ.size, socket.MSG_WAITALL) == REQ.size:
            magic, flags, cmd, handle, offset, length = REQ.unpack(head)
            if magic != REQUEST_MAGIC or cmd == CMD_DISC:
                return
            buf = None
            if cmd == CMD_WRITE:
                if length <= POOL_BUF:
                    buf = pool.get()
                    payload = memoryview(buf)[:length]
                else:
                    payload = memoryview(bytearray(length))
                if sock.recv_into(payload, length, socket.MSG_WAITALL) != length:
                    return
                work.put((cmd, flags, handle, offset, payload, buf))
            else:
                work.put((cmd, flags, handle, offset, length, None))
    finally:
        work.put(STOP)
        for t in threads:
            t.join()


PIPE_SIZE = 1 << 20  # --splice: the pipe a write's payload goes through (pipe-max-size)


def serve_splice(sock: socket.socket, fd: int, h) -> None:
    """Transmission, after the handshake, one request at a time: a write's payload never
    enters this process. It is spliced from the socket into a pipe (the kernel moves the
    socket buffer's pages) and from the pipe into the file (one copy, into the page
    cache); its checksums, with `h`, are taken from the page cache through a map of the
    file. What a zero-copy receive path costs against pwrite from a buffer."""
    import fcntl
    import mmap
    rd, wr = os.pipe()
    fcntl.fcntl(wr, 1031, PIPE_SIZE)  # F_SETPIPE_SZ
    size = os.fstat(fd).st_size
    mm = mmap.mmap(fd, size, prot=mmap.PROT_READ) if h is not None else None
    view = memoryview(mm) if mm is not None else None
    head = bytearray(REQ.size)
    pack, pread, splice, sfd = REPLY.pack, os.pread, os.splice, sock.fileno()
    try:
        while sock.recv_into(head, REQ.size, socket.MSG_WAITALL) == REQ.size:
            magic, flags, cmd, handle, offset, length = REQ.unpack(head)
            if magic != REQUEST_MAGIC or cmd == CMD_DISC:
                return
            if cmd == CMD_WRITE:
                left, pos = length, offset
                while left:
                    n = splice(sfd, wr, min(left, PIPE_SIZE))
                    if not n:
                        return
                    left -= n
                    while n:
                        m = splice(rd, fd, n, offset_dst=pos)
                        n -= m
                        pos += m
                if view is not None:
                    data = view[offset:offset + length]
                    sums = [h(data[i:i + PAGE]) for i in range(0, length, PAGE)]
                    data.release()
                if flags & CMD_FLAG_FUA:
                    os.fdatasync(fd)
                sock.sendall(pack(SIMPLE_REPLY_MAGIC, 0, handle))
            elif cmd == CMD_READ:
                data = pread(fd, length, offset)
                if h is not None:
                    sums = [h(data[i:i + PAGE]) for i in range(0, length, PAGE)]
                _send_all(sock, [pack(SIMPLE_REPLY_MAGIC, 0, handle), data])
            elif cmd == CMD_FLUSH:
                os.fdatasync(fd)
                sock.sendall(pack(SIMPLE_REPLY_MAGIC, 0, handle))
            else:
                sock.sendall(pack(SIMPLE_REPLY_MAGIC, 22, handle))
    finally:
        if view is not None:
            view.release()
            mm.close()
        os.close(rd)
        os.close(wr)


def _send_all(sock: socket.socket, out: list) -> None:
    """All of `out` with as few sendmsg calls as IOV_MAX allows (a blocking socket takes
    all it is given, unless a signal cuts a call short)."""
    while out:
        batch = out[:1024]
        sent = sock.sendmsg(batch)
        i = 0
        while i < len(batch) and sent >= len(batch[i]):
            sent -= len(batch[i])
            i += 1
        out = out[i:]
        if sent:
            out[0] = memoryview(out[0])[sent:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--checksums", action="store_true")
    p.add_argument("--threads", action="store_true")
    p.add_argument("--splice", action="store_true")
    p.add_argument("file")
    a = p.parse_args(argv)
    fd = os.open(a.file, os.O_RDWR)
    size = os.fstat(fd).st_size
    h = None
    if a.checksums:
        import xxhash
        h = xxhash.xxh3_64_intdigest
    lsock = socket.create_server(("127.0.0.1", a.port), reuse_port=False)
    while True:
        conn, _ = lsock.accept()

        def run(conn=conn):
            with conn:
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    if handshake(conn, size):
                        (serve_threads if a.threads else serve_splice if a.splice
                         else serve)(conn, fd, h)
                except (ConnectionError, OSError):
                    pass

        threading.Thread(target=run, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
