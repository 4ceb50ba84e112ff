"""Keep glibc's heap from shrinking and growing again around every large request, and
keep Python's cycle collector from walking the same objects over and over.

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
import gc
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


# The cycle collector runs a young-generation pass once GC_YOUNG more container objects
# were allocated than freed (Python's default is 700). A replicated write keeps a dozen
# alive across its round trip (its Request, a Later, the gather of the replies, closures,
# outcome wrappers), so at 700 passes came all the time under load, each walking the
# requests in flight: with perf, 2.8% of a replicas=3 gateway's CPU went to gc_collect_main
# and its visitors, 0.1% with this threshold. What does end up in a cycle (trio's
# exceptions and tracebacks) is small and still collected.
GC_YOUNG = 20_000


def tune_gc() -> None:
    """Make young collections rarer (before serving)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, older, oldest)


def freeze_startup_objects() -> None:
    """Once the service is up: move everything allocated so far (modules, classes, the
    chunk index's objects) out of the collector's sight. Full collections no longer walk
    them; they stay alive as before (gc.freeze, made for this)."""
    gc.collect()
    gc.freeze()
