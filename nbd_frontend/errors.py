"""Errors of the NBD frontend, and the one place exceptions become NBD errnos (and, in
negotiation, option error replies)."""

from __future__ import annotations

import errno as _errno

from nbd_frontend import proto


class ProtocolError(Exception):
    """The peer broke a mandatory rule of the NBD protocol: the connection is hard
    disconnected (proto.md, "Termination of the session")."""


class LocalProtocolError(Exception):
    """Our own code drove a codec into a transition its table does not allow."""


# Linux errno -> NBD error value ("Error values" in proto.md). EDQUOT and EFBIG map to
# ENOSPC as the spec asks; anything not listed is EIO.
_LINUX_TO_NBD = {
    _errno.EPERM: proto.EPERM,
    _errno.EACCES: proto.EPERM,
    _errno.EROFS: proto.EPERM,
    _errno.EIO: proto.EIO,
    _errno.ENOMEM: proto.ENOMEM,
    _errno.EINVAL: proto.EINVAL,
    _errno.ENOSPC: proto.ENOSPC,
    _errno.EDQUOT: proto.ENOSPC,
    _errno.EFBIG: proto.ENOSPC,
    _errno.EOVERFLOW: proto.EOVERFLOW,
    _errno.ENOTSUP: proto.ENOTSUP,
    _errno.EOPNOTSUPP: proto.ENOTSUP,
    _errno.ESHUTDOWN: proto.ESHUTDOWN,
}


def to_nbd_errno(exc: BaseException) -> int:
    """The NBD error value a client is told for `exc`.

    vbp errors and OSError carry a Linux `errno`; MemoryError is ENOMEM; anything else
    (including errors without an errno) is EIO."""
    if isinstance(exc, MemoryError):
        return proto.ENOMEM
    code = getattr(exc, "errno", None)
    if isinstance(code, int):
        return _LINUX_TO_NBD.get(code, proto.EIO)
    return proto.EIO


def to_option_error(exc: BaseException) -> int:
    """The option error reply (NBD_REP_ERR_*) a client is told when the export provider
    could not answer its option (open an export, list them) because of `exc`.

    An export that does not exist, or a name that cannot be one (ENOENT, EINVAL), is
    NBD_REP_ERR_UNKNOWN. Anything else (the registry unreachable during a gateway
    failover, the volume's lease held elsewhere, a bug) is NBD_REP_ERR_PLATFORM, with the
    reason in the message: proto.md has no error for "not now", and NBD_REP_ERR_SHUTDOWN,
    the other candidate, says the server is going away and obliges the client to
    disconnect, where it may as well try again on the same connection."""
    code = getattr(exc, "errno", None)
    if code in (_errno.ENOENT, _errno.EINVAL):
        return proto.REP_ERR_UNKNOWN
    return proto.REP_ERR_PLATFORM
