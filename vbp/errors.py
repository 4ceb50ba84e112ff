"""Errors of the vbp model.

Every error a client can meet carries an `errno` so the NBD frontend maps it in exactly one
place (nbd_frontend.errors.to_nbd_errno). Local faults (this host's disk, this host's
metadata) and remote faults (a peer, the registry) are separate branches so callers can
decide what to retry and what to report.
"""

from __future__ import annotations

import errno as _errno


class VbpError(Exception):
    """Base of every vbp error. `errno` is what an NBD client is told."""

    errno = _errno.EIO


# --- requests a caller got wrong -------------------------------------------------------


class InvalidArgument(VbpError, ValueError):
    errno = _errno.EINVAL


class BadValue(InvalidArgument):
    """A value, as the caller wrote it, that nothing in the pool's state could make valid:
    a size, a name, a count, a URL. The command line's bad usage (exit 2), like click's
    own errors of range; an InvalidArgument that depends on the pool (a shrink asked
    without --force, a change already in progress) stays an error (exit 1)."""


class NotFound(VbpError, KeyError):
    errno = _errno.ENOENT

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExists(VbpError):
    errno = _errno.EEXIST


class ReadOnly(VbpError):
    errno = _errno.EPERM


class InUse(VbpError):
    """Refused: something is using it (a snapshot exported over NBD). --force overrides."""

    errno = _errno.EBUSY


class Gone(VbpError):
    """What an open export served was deleted under it (snapshot delete --force): every
    later request fails, never serving chunks that may be freed or reused."""

    errno = _errno.EIO


class Unpublished(Gone):
    """A snapshot export whose host has not told the registry it is open for longer than
    the publication lasts (the registry unreachable): garbage collection elsewhere may be
    freeing its chunks (`vbp volume delete NAME@SNAP` sees no user), so its requests fail
    until the host publishes again and finds the snapshot still there."""


class Unsynced(Gone):
    """A volume export holding no write lease (a reader) whose host has not both published
    its chain and read the volume's record since for longer than the bound (the registry
    unreachable from it): another host may have made a new head meanwhile and garbage
    collection freed what the export's old chain reads, so its requests fail until a
    publication and a record read go through again."""


class OutOfRange(VbpError):
    errno = _errno.EINVAL


class PastEnd(OutOfRange):
    """A request past the end of a volume shrunk while its client had it open: the client
    still knows the size it connected at (NBD tells no resize). EINVAL, as for a read,
    trim, block status or cache request past any export's end (proto.md, "Error values"):
    never the bytes the shrink discarded, nor zeros a client could take for content."""


class WritePastEnd(PastEnd):
    """A write or write-zeroes past the end of a shrunk volume (PastEnd). ENOSPC, as for
    any write past an export's end (proto.md, "Error values" and NBD_CMD_WRITE_ZEROES)."""

    errno = _errno.ENOSPC


# --- local faults ----------------------------------------------------------------------


class LocalFault(VbpError):
    """Something is wrong on this host (its disk, its metadata)."""


class NoSpace(LocalFault):
    errno = _errno.ENOSPC


class ChecksumError(LocalFault):
    """A page read back does not match its checksum: the replication layer repairs it."""

    errno = _errno.EIO

    def __init__(self, message: str, *, key=None, page: int | None = None):
        super().__init__(message)
        self.key = key
        self.page = page


# --- remote faults ---------------------------------------------------------------------


class RemoteFault(VbpError):
    """A peer or the registry failed or could not be reached."""


class RegistryUnavailable(RemoteFault):
    pass


class PeerUnavailable(RemoteFault):
    pass


class Fenced(RemoteFault):
    """A replica refused a write: the caller's fencing token or epoch is older than the
    newest it has seen. The caller is no longer the volume's gateway."""

    errno = _errno.EIO


class LeaseExpired(RemoteFault):
    """This gateway's write lease ran out without a renewal (the registry could not be
    reached): it writes nothing until a renewal proves no other gateway took the lease."""

    errno = _errno.EIO


class StaleEpoch(RemoteFault):
    errno = _errno.EIO


class LeaseHeld(RemoteFault):
    """Another gateway holds the volume's write lease."""

    errno = _errno.EBUSY


class BelowMinSize(RemoteFault):
    """Fewer than min_size replicas took a write: it is not acknowledged."""

    errno = _errno.EIO
