"""Keep glibc's heap from shrinking and growing again around every large request.

Every large NBD write or peer frame allocates a buffer of up to a few MiB and frees it a
moment later. With glibc's defaults the heap's top is given back to the kernel once more
than a couple of MiB are free (the trim threshold follows the largest freed buffer), so the
next request grows it again with brk and takes a page fault for every 4 KiB page it
touches: measured on a replicas=3 1 MiB sequential write (3 hosts on one machine), about 5
brk calls per request on each replica and 45% more system time per MiB than with the
thresholds below. The heap keeps up to TRIM_THRESHOLD of free memory instead; buffers below
MMAP_THRESHOLD come from it (larger ones still get their own mapping).

mallopt is glibc's own interface for this (the same knobs as the MALLOC_TRIM_THRESHOLD_
and MALLOC_MMAP_THRESHOLD_ environment variables); on another libc the call is skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("vbp.blockd")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 128 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit hosts


def tune_malloc() -> bool:
    """Apply the thresholds; False when this libc has no mallopt or refuses them."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.info("event=malloc_untuned reason=mallopt refused the thresholds")
    return ok
