"""TLS for NBD connections: the server's SSL context, built from PEM files, and the TLS
channel a connection's fast path uses in place of its socket.

NBD upgrades a connection in place (NBD_OPT_STARTTLS; nbd_frontend.handshake has the
modes). The context: TLS 1.2 or later (proto.md, "TLS versions"), the server's certificate
chain and private key and, given a CA file, client certificates signed by that CA are
required (qemu-nbd's verify-peer, nbdkit's --tls-verify-peer).

The channel (`TLSChannel`) is the standard library's ssl.SSLObject over memory BIOs on the
connection's non-blocking socket. It has the calls of the socket that the NBD server's
fast path makes, with the socket's meaning: recv_into (BlockingIOError when nothing can be
read now, 0 at the end), sendmsg (the plaintext bytes taken; BlockingIOError when there is
no room), fileno for trio's waits. So the server parses requests from one buffer and sends
a batch's replies in one call with TLS as without, with no task switch per call (which is
what trio.SSLStream costs). Never a FileRange: a range sent from the page cache would go
out in the clear, so a TLS connection reads into memory (nbd_frontend.server).
"""

from __future__ import annotations

import socket
import ssl

import trio

from nbd_frontend.handshake import TLS_MODES
from vbp.sockets import nbytes, receive_wait, send_all


class TLSConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file, and
    `which` says which one: "cert", "key" or "ca"."""

    def __init__(self, message: str, which: str) -> None:
        super().__init__(message)
        self.which = which


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """An SSLContext for the server side of NBD connections, or TLSConfigError."""
    if not cert:
        raise TLSConfigError("a certificate is needed", "cert")
    if not key:
        raise TLSConfigError("the certificate's private key is needed", "key")
    # (OpenSSL's own errors do not say which file is wrong: look at them first)
    if _PEM_CERT not in _read(cert, "cert"):
        raise TLSConfigError(f"{cert} holds no PEM certificate", "cert")
    if _PEM_KEY not in _read(key, "key"):
        raise TLSConfigError(f"{key} holds no PEM private key", "key")
    if ca and _PEM_CERT not in _read(ca, "ca"):
        raise TLSConfigError(f"the CA file {ca} holds no PEM certificate", "ca")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # (a TLS 1.2 renegotiation would want answers while the connection has none to send)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    def no_passphrase():  # (else OpenSSL would ask on the terminal, or fail obscurely)
        raise TLSConfigError(f"the private key {key} is encrypted: blockd needs it without "
                             "a passphrase (readable by blockd's user only)", "key")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except TLSConfigError:
        raise
    except (ssl.SSLError, OSError) as e:
        if "KEY_VALUES_MISMATCH" in f"{e.reason} {e}":
            raise TLSConfigError(f"the private key {key} is not the one of the certificate "
                                 f"{cert}", "key") from None
        raise TLSConfigError(f"the certificate {cert} and private key {key} do not load "
                             f"({getattr(e, 'reason', None) or e})", "cert") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise TLSConfigError(f"the CA file {ca} does not load ({e.reason or e})",
                                 "ca") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check_tls(tls: str, context) -> None:
    """ValueError unless `tls` and `context` go together: a mode of TLS_MODES, a context
    unless off, and client certificates asked for only when TLS is required (with TLS
    optional, a client that stays in the clear would be served without one)."""
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    if tls != "off" and context is None:
        raise ValueError(f"tls={tls!r} needs a TLS context")
    if tls == "on" and context.verify_mode == ssl.CERT_REQUIRED:
        raise ValueError("client certificates are checked only when TLS is required: "
                         "with TLS optional, a client in the clear would be served without one")


_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"


def _read(path: str, which: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)  # (a PEM file is small; the markers come first)
    except OSError as e:
        raise TLSConfigError(f"cannot read {path}: {e.strerror or e}", which) from None


def peer_name(ssl_object) -> str:
    """Who the client's certificate names, for logs: its subject's common name, else its
    first subject alternative name; "" without a certificate."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    alt = cert.get("subjectAltName", ())
    return alt[0][1] if alt else "(no name)"


RECV_CHUNK = 256 * 1024  # ciphertext read from the socket per call
RECORD = 16 * 1024  # TLS's largest record: small replies are joined up to it
SEND_MAX = 256 * 1024  # plaintext encrypted per sendmsg (about a millisecond of the loop)


class TLSChannel:
    """A server's TLS session over a non-blocking socket, used as the socket is used.

    Ciphertext that the socket did not take at once is kept (`pending`) and goes out
    first at the next sendmsg. So that the caller calls again, a sendmsg that leaves
    ciphertext behind reports one byte fewer than it took: that byte is `owed`, already
    encrypted, and is taken without being encrypted again when the caller offers it anew.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self._in, self._out, server_side=True)
        self._pending = memoryview(b"")  # ciphertext the socket did not take yet
        self._owed = 0
        self._rbuf = bytearray(RECV_CHUNK)
        self._rview = memoryview(self._rbuf)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> int:
        return len(self._pending) + self._out.pending

    # --- the socket's calls --------------------------------------------------------------------
    def recv_into(self, buf, nbytes_: int = 0, flags: int = 0) -> int:
        """Plaintext into `buf`: what TLS has decrypted, and what the socket holds now."""
        view = buf if type(buf) is memoryview else memoryview(buf)
        want = nbytes_ or len(view)
        got = 0
        while got < want:
            try:
                n = self.ssl.read(want - got, view[got:want])
            except ssl.SSLWantReadError:
                try:
                    k = self.sock.recv_into(self._rbuf)
                except BlockingIOError:
                    if got:
                        break
                    raise
                if not k:
                    break  # the end (0 if nothing came before it)
                self._in.write(self._rview[:k])
                continue
            except ssl.SSLZeroReturnError:  # the client's close_notify
                break
            if not n:
                break
            got += n
        if self._out.pending:  # (a TLS 1.3 key update to answer: sent now if it fits)
            self.flush()
        return got

    def recvmsg_into(self, buffers, ancbufsize: int = 0, flags: int = 0):
        """As socket.recvmsg_into (the NBD reader's call while a large write's payload is
        under way: its rest, then the head of the shared buffer): plaintext into
        `buffers` in order, the next one only once one is full."""
        got = 0
        for b in buffers:
            try:
                n = self.recv_into(b)
            except BlockingIOError:
                if got:
                    break
                raise
            got += n
            if n < nbytes(b):
                break
        return got, [], 0, None

    def sendmsg(self, buffers, ancdata=(), flags: int = 0, address=None) -> int:
        """Encrypt from `buffers` (at most SEND_MAX new bytes: the loop is not held up, and
        the caller keeps the rest queued, under its own limits) and write what the socket
        takes; returns the bytes of `buffers` taken."""
        if not self.flush():
            raise BlockingIOError("the socket is full")
        write = self.ssl.write
        taken, fresh, skip, small = 0, 0, self._owed, bytearray()
        for b in buffers:
            n = nbytes(b)
            if skip:  # (already encrypted and, now, sent)
                if skip >= n:
                    skip -= n
                    taken += n
                    continue
                b, n, taken, skip = memoryview(b).cast("B")[skip:], n - skip, taken + skip, 0
            last = fresh + n >= SEND_MAX
            if last:
                n = SEND_MAX - fresh
                b = memoryview(b).cast("B")[:n]
            if n >= RECORD:
                if small:
                    write(small)
                    small = bytearray()
                write(b)
            else:
                small += b
                if len(small) >= RECORD:
                    write(small)
                    small = bytearray()
            fresh += n
            taken += n
            if last:
                break
        if small:
            write(small)
        self._owed = 0
        if self.flush() or not taken:
            return taken
        self._owed = 1
        return taken - 1

    def flush(self) -> bool:
        """Write the ciphertext waiting; True when none is left. (What OpenSSL made is sent
        as it is, its rest kept as a view: no copy on this side.)"""
        while True:
            if not self._pending:
                if not self._out.pending:
                    return True
                self._pending = memoryview(self._out.read())
            try:
                sent = self.sock.send(self._pending)
            except BlockingIOError:
                return False
            self._pending = self._pending[sent:]

    # --- the TLS handshake -------------------------------------------------------------------
    async def handshake(self) -> None:
        """Run the server side of the TLS handshake; ssl.SSLError or trio.BrokenResourceError
        (the client left) when it fails."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.drain()
                await self._fill()
            except ssl.SSLError:
                self.flush()  # (the alert saying why, if the socket takes it now)
                raise
        await self.drain()

    async def drain(self) -> None:
        while not self.flush():
            await trio.lowlevel.wait_writable(self.sock)

    async def _fill(self) -> None:
        k = await receive_wait(self.sock, self._rbuf)
        if not k:
            raise trio.BrokenResourceError("the client left during the TLS handshake")
        self._in.write(self._rview[:k])

    def close_notify(self) -> None:
        """Queue TLS's close_notify (the session's clean end; drain() sends it). The
        client's own is not waited for: the connection closes next."""
        try:
            self.ssl.unwrap()
        except ssl.SSLWantReadError:  # (ours is queued; the client's has not come)
            pass

    # --- for the logs ------------------------------------------------------------------------
    def version(self) -> str:
        return self.ssl.version() or "TLS"

    def getpeercert(self):
        return self.ssl.getpeercert()


class TLSChannelStream:
    """The stream interface (send_all, receive_some) over a TLSChannel, for the rest of the
    option haggling; `channel` is what the connection's fast path uses."""

    def __init__(self, channel: TLSChannel) -> None:
        self.channel = channel

    async def send_all(self, data) -> None:
        await send_all(self.channel, [data], nbytes(data))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """End the TLS session cleanly (close_notify sent); the socket is the caller's."""
        self.channel.close_notify()
        await self.channel.drain()

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        buf = bytearray(max_bytes)
        try:  # (what TLS decrypted already: the socket need not be readable for it)
            n = self.channel.recv_into(buf)
        except BlockingIOError:
            n = await receive_wait(self.channel, buf)
        await trio.lowlevel.checkpoint()
        return bytes(buf[:n])
