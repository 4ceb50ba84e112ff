"""A volume fragmented page by page, for the tests of clients that follow its map."""

from __future__ import annotations

import random

import nbd  # python3-libnbd: make test installs it

PAGE = 4096


def fragment(uri: str, size: int, seed: int) -> None:
    """Write random bytes to every other 4 KiB page of the volume at `uri` (holes between:
    blockd's map is then one extent per page, a guest image after fstrim)."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    for off in range(0, size, 2 * PAGE):
        h.aio_pwrite(rng.randbytes(PAGE), off)
        while h.aio_in_flight() >= 32:
            h.poll(-1)
    while h.aio_in_flight():
        h.poll(-1)
    h.flush()
    h.shutdown()
