"""Sending a byte stream to a server cut into pieces, the way a slow or odd client does
(the receive paths must put any cut back together)."""

from __future__ import annotations

import trio


async def send_in_pieces(send, wire: bytes, cuts: list[int]) -> None:
    """`await send(piece)` for consecutive pieces of `wire`, their sizes taken in turn from
    `cuts` (but at least 1/100 of the stream: at most ~100 pieces), pausing 1 ms after
    every third piece so the server sees the stream arrive in bursts."""
    pos, k = 0, 0
    while pos < len(wire):
        n = max(cuts[k % len(cuts)], len(wire) // 100)
        await send(wire[pos:pos + n])
        pos += n
        k += 1
        await trio.sleep(0.001 if k % 3 == 0 else 0)
