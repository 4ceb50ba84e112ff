"""blockd's malloc thresholds: large request buffers are reused from the heap, not given
back to the kernel and faulted in again for every request."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import ctypes, sys
from blockd.memory import tune_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
tuned = tune_malloc() if sys.argv[1] == "tuned" else None
buf = bytearray(8 << 20)
del buf
info = libc.mallinfo2()
print(tuned, info.fordblks)
"""


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_request_buffers_stay_in_the_heap():
    tuned, free = probe("tuned")
    assert tuned == "True"
    assert free >= 8 << 20  # the 8 MiB buffer came from the heap and stayed there, free
    untuned, free = probe("default")
    assert untuned == "None" and free < 8 << 20  # glibc's default: mapped, then unmapped


GC_PROBE = r"""
import gc, weakref
from blockd.memory import GC_YOUNG, freeze_startup_objects, tune_gc

tune_gc()
assert gc.get_threshold()[0] == GC_YOUNG
freeze_startup_objects()
frozen = gc.get_freeze_count()

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

ref = cycle()
# (kept alive: the collector counts allocations less deallocations)
early = [[] for _ in range(5_000)]  # ~7 young passes at the default threshold
young_pass_early = ref() is None
later = [[] for _ in range(GC_YOUNG + 1_000)]
print(frozen, young_pass_early, ref() is None)
"""


def test_young_collections_are_rarer_and_cycles_still_go():
    out = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True,
                         check=True).stdout.split()
    assert int(out[0]) > 1000  # the startup objects left the collector's generations
    assert out[1] == "False"  # at Python's default (700) a pass would have run by then
    assert out[2] == "True"  # a garbage cycle is collected by a later young pass
