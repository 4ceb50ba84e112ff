"""TLS for NBD connections: the server's SSL context, built from PEM files.

NBD upgrades a connection in place (NBD_OPT_STARTTLS; nbd_frontend.handshake has the
modes). This module only builds the context: TLS 1.2 or later (proto.md, "TLS versions"),
the server's certificate chain and private key and, given a CA file, client certificates
signed by that CA are required (qemu-nbd's verify-peer, nbdkit's --tls-verify-peer).
"""

from __future__ import annotations

import ssl


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
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in f"{e.reason} {e}":
            raise TLSConfigError(f"the private key {key} is not the one of the certificate "
                                 f"{cert}", "key") from None
        raise TLSConfigError(f"the certificate {cert} and private key {key} do not load "
                             f"({e.reason or e})", "cert") from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as e:
            raise TLSConfigError(f"the CA file {ca} does not load ({e.reason or e})",
                                 "ca") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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
