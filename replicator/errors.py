"""Errors of the peer protocol, and the one mapping between vbp errors and `Error` codes.

A handler on a replica raises vbp.errors exceptions; the transport turns them into `Error`
replies with `exception_to_error`, and the caller's PeerPool raises `error_to_exception` of
the reply. Both directions live here and nowhere else, so a code added on one side is added
on the other.
"""

from __future__ import annotations

from vbp import errors as e
from replicator import messages as m


class PeerProtocolError(e.RemoteFault):
    """The bytes from a peer are not a valid frame or message. The connection is closed.

    `code` is the Error code to send back before closing ("invalid", or "version" when the
    peer speaks another protocol version)."""

    def __init__(self, message: str, *, code: str = m.INVALID):
        super().__init__(message)
        self.code = code


class ClusterMismatch(e.PeerUnavailable):
    """The peer belongs to another cluster: never usable, whatever we retry."""


class AuthFailed(e.PeerUnavailable):
    """Peer authentication was refused or failed (a missing or different peer secret):
    never usable, whatever we retry, until the configuration is made the same."""


class VersionMismatch(e.PeerUnavailable):
    """The peer speaks another protocol version."""


class PeerError(e.RemoteFault):
    """The peer failed a request for a reason of its own (a bug, an unknown error code)."""


# Most specific first: the first isinstance match wins.
_TO_CODE: tuple[tuple[type[BaseException], str], ...] = (
    (e.Fenced, m.FENCED),
    (e.LeaseHeld, m.FENCED),
    (e.StaleEpoch, m.STALE_EPOCH),
    (e.NotFound, m.NOT_FOUND),
    (e.NoSpace, m.NO_SPACE),
    (e.ChecksumError, m.CHECKSUM),
    (ClusterMismatch, m.CLUSTER),
    (AuthFailed, m.AUTH),
    (VersionMismatch, m.VERSION),
    (e.InvalidArgument, m.INVALID),
    (e.OutOfRange, m.INVALID),
    (e.ReadOnly, m.INVALID),
    (e.AlreadyExists, m.INVALID),
    (PeerProtocolError, m.INVALID),
    (e.RemoteFault, m.UNAVAILABLE),  # the replica could not reach a peer or the registry
)

_FROM_CODE: dict[str, type[Exception]] = {
    m.FENCED: e.Fenced,
    m.STALE_EPOCH: e.StaleEpoch,
    m.NOT_FOUND: e.NotFound,
    m.NO_SPACE: e.NoSpace,
    m.CHECKSUM: e.ChecksumError,
    m.INVALID: e.InvalidArgument,
    m.INTERNAL: PeerError,
    m.VERSION: VersionMismatch,
    m.CLUSTER: ClusterMismatch,
    m.AUTH: AuthFailed,
    m.UNAVAILABLE: e.PeerUnavailable,
}


def exception_to_error(exc: BaseException) -> m.Error:
    """The Error reply for an exception raised while serving a request."""
    for cls, code in _TO_CODE:
        if isinstance(exc, cls):
            return m.Error(code, str(exc))
    return m.Error(m.INTERNAL, f"{type(exc).__name__}: {exc}")


def error_to_exception(err: m.Error) -> Exception:
    """The exception a caller raises for an Error reply; unknown codes are PeerError."""
    cls = _FROM_CODE.get(err.code)
    if cls is None:
        return PeerError(f"{err.code}: {err.message}")
    return cls(err.message)
