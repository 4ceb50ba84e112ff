"""Receive buffers: reusing one once nothing refers to it any more, keeping a payload
past the call that received it, and how much to receive after a large frame.

The NBD and peer codecs receive large payloads into buffers of their own and hand them
on as memoryviews, which a consumer may keep (a replicated write keeps its payload until
every replica has answered). A memoryview, and every slice of it, holds a reference to
the bytearray it views, so a buffer that nothing but its holder refers to has no view
alive anywhere, and its bytes can be overwritten.

What sys.getrefcount counts besides the holder's reference (the argument, a borrowed
local) differs between interpreter versions, so the count of a buffer referred to by its
holder alone is not a constant: it is measured once, at import, with the same code that
checks it later.
"""

from __future__ import annotations

import sys

# After a large frame (a large NBD write, a large peer frame), the next receive into the
# shared receive buffer takes at most this much: the next frame is likely large too, and
# what of it lands there is copied again into the frame's own buffer, while the rest is
# received straight into that.
HEAD_RECV = 16 * 1024


def _count(holder: list, i: int) -> int:
    return sys.getrefcount(holder[i])


_ALONE = _count([bytearray(1)], 0)


def unshared(holder: list, i: int) -> bool:
    """Whether `holder[i]` is referred to by `holder` alone: no view of it is alive.
    The caller must hold no other reference to it (no local) while it asks."""
    return _count(holder, i) <= _ALONE


def keepable(data):
    """`data` as a buffer its consumer may keep after the call that handed it over: bytes
    and read-only views (large payloads, received into a buffer of their own that is not
    reused while referred to: nbd_frontend.export) as they are; anything else (a view of
    a receive buffer that the next request overwrites) copied."""
    if type(data) is bytes or (type(data) is memoryview and data.readonly):
        return data
    return bytes(data)
