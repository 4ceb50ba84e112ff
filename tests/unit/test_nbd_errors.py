"""The one mapping of exceptions to NBD error values."""

from __future__ import annotations

import errno

import pytest

from nbd_frontend import proto
from nbd_frontend.errors import to_nbd_errno
from vbp import errors as vbp_errors


@pytest.mark.parametrize("exc,expected", [
    (vbp_errors.InvalidArgument("x"), proto.EINVAL),
    (vbp_errors.OutOfRange("x"), proto.EINVAL),
    (vbp_errors.ReadOnly("x"), proto.EPERM),
    (vbp_errors.NoSpace("x"), proto.ENOSPC),
    (vbp_errors.ChecksumError("x"), proto.EIO),
    (vbp_errors.Fenced("x"), proto.EIO),
    (vbp_errors.BelowMinSize("x"), proto.EIO),
    (vbp_errors.LeaseHeld("x"), proto.EIO),
    (vbp_errors.NotFound("x"), proto.EIO),
    (vbp_errors.PeerUnavailable("x"), proto.EIO),
    (OSError(errno.ENOTSUP, "slow"), proto.ENOTSUP),
    (OSError(errno.EOPNOTSUPP, "slow"), proto.ENOTSUP),
    (OSError(errno.EDQUOT, "quota"), proto.ENOSPC),
    (OSError(errno.EFBIG, "big"), proto.ENOSPC),
    (OSError(errno.EROFS, "ro"), proto.EPERM),
    (OSError(errno.EOVERFLOW, "o"), proto.EOVERFLOW),
    (OSError(errno.ESHUTDOWN, "s"), proto.ESHUTDOWN),
    (OSError(errno.ECONNRESET, "r"), proto.EIO),
    (MemoryError(), proto.ENOMEM),
    (ValueError("no errno"), proto.EIO),
    (RuntimeError(), proto.EIO),
    (OSError("no errno at all"), proto.EIO),
])
def test_to_nbd_errno(exc, expected):
    assert to_nbd_errno(exc) == expected
    assert to_nbd_errno(exc) in proto.ERRNOS
