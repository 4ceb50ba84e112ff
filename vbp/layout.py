"""Geometry: sizes, chunk math and chunk identity.

A volume of `size` bytes is cut into chunks of `chunk_size` bytes (a power of two between
CHUNK_SIZE_MIN and CHUNK_SIZE_MAX, fixed at creation). A byte range maps to a list of
per-chunk pieces; the last chunk may be partial. Chunks are addressed by
`ChunkKey(lineage, index, gen)`: placement uses only `(lineage, index)`, so every generation
(snapshot, clone) of chunk i lives on the same hosts and copy-up is local (DESIGN.md, Words).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from vbp.errors import BadValue, InvalidArgument

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

PAGE_SIZE = 4 * KiB
CHUNK_SIZE_MIN = 1 * MiB
CHUNK_SIZE_MAX = 64 * MiB
CHUNK_SIZE_DEFAULT = 4 * MiB
VOLUME_SIZE_MAX = 1 << 60  # far above anything real; keeps offsets inside u64 arithmetic
# the largest size parse_size returns: a signed 64-bit integer, so that any size, rate or
# limit fits every encoding it meets (msgpack, struct "q", LMDB values)
SIZE_MAX = (1 << 63) - 1

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": KiB, "kib": KiB,
    "m": MiB, "mb": MiB, "mib": MiB,
    "g": GiB, "gb": GiB, "gib": GiB,
    "t": TiB, "tb": TiB, "tib": TiB,
    "p": 1024 * TiB, "pb": 1024 * TiB, "pib": 1024 * TiB,
    "e": 1 << 60, "eb": 1 << 60, "eib": 1 << 60,  # (what the limits below are told in)
}
# (digits bounded: int() of thousands of digits is slow, and refused past 4300 of them;
# a number of up to 40 digits is read, to be refused as too large by its value)
_SIZE_TEXT_MAX = 64
# (ASCII digits only: \d takes any script's, "１G" among them)
_SIZE_RE = re.compile(r"^\s*([0-9]{1,40})(?:\.([0-9]{1,20}))?\s*([a-zA-Z]{0,3})\s*$")


def parse_size(text: str | int, most: int = SIZE_MAX) -> int:
    """'4M' -> 4194304. Units are binary (K, M, G, T, P, E, with optional 'iB'/'B').
    BadValue past `most`, naming it (a volume's size: VOLUME_SIZE_MAX)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise BadValue(f"not a size: {text!r} (examples: 512K, 4M, 1G, 2T)")
    if isinstance(text, int):
        if text < 0:
            raise BadValue(f"size must not be negative: {text}")
        value = text
    else:
        m = _SIZE_RE.match(text) if len(text) <= _SIZE_TEXT_MAX else None
        if not m or m.group(3).lower() not in _UNITS:
            shown = repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"
            raise BadValue(f"not a size: {shown} (examples: 512K, 4M, 1G, 2T)")
        whole, frac, unit = m.groups()
        mult = _UNITS[unit.lower()]
        value = int(whole) * mult
        if frac:
            part, rest = divmod(int(frac) * mult, 10 ** len(frac))
            if rest:  # ("1.5" bytes, "1.3K": 1331.2 bytes): never cut silently
                raise BadValue(f"not a whole number of bytes: {' '.join(text.split())} "
                                      f"(examples: 1.5G, 4M, 512K)")
            value += part
    if value > most:
        # (str() of a huge int raises ValueError itself)
        # (white space, line breaks included, may surround the number and the unit: one line)
        shown = (" ".join(text.split()) if isinstance(text, str) else
                 text if text.bit_length() < 128 else f"{text.bit_length()} bits")
        raise BadValue(f"size too large: {shown} (at most {limit_text(most)})")
    return value


def limit_text(n: int) -> str:
    """A size limit as errors quote it: its bytes and, in units, what it is
    ('9223372036854775807 bytes, 8 EiB less one'), so that no message says another."""
    if n > 0 and n & (n + 1) == 0 and n + 1 >= KiB:  # (2**k - 1: a power of two less one)
        return f"{n} bytes, {format_size(n + 1)} less one"
    return f"{n} bytes, {format_size(n)}"


def format_size(n: int) -> str:
    """4194304 -> '4.0 MiB'; exact powers print without decimals noise."""
    for unit, mult in (("EiB", 1 << 60), ("PiB", 1024 * TiB), ("TiB", TiB), ("GiB", GiB),
                       ("MiB", MiB), ("KiB", KiB)):
        if n >= mult:
            v = n / mult
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def check_chunk_size(chunk_size: int) -> int:
    if chunk_size < CHUNK_SIZE_MIN or chunk_size > CHUNK_SIZE_MAX or chunk_size & (chunk_size - 1):
        raise BadValue(
            f"chunk size must be a power of two between 1 MiB and 64 MiB, not {chunk_size}"
        )
    return chunk_size


class ChunkKey(NamedTuple):
    """One generation of one chunk of a lineage, as stored on a host."""

    lineage: str
    index: int
    gen: int


class Piece(NamedTuple):
    """The part of a request that falls in one chunk."""

    index: int  # chunk index
    offset: int  # offset inside the chunk
    length: int
    buf_offset: int  # offset inside the request's buffer


@dataclass(frozen=True, slots=True)
class Geometry:
    size: int
    chunk_size: int

    def __post_init__(self) -> None:
        check_chunk_size(self.chunk_size)
        if self.size < 0 or self.size > VOLUME_SIZE_MAX:
            raise BadValue(f"volume size out of range: {self.size} bytes (at most "
                           f"{limit_text(VOLUME_SIZE_MAX)})")

    @property
    def chunk_count(self) -> int:
        return -(-self.size // self.chunk_size)

    def chunk_length(self, index: int) -> int:
        """Bytes of the volume inside chunk `index` (the last chunk may be partial)."""
        start = index * self.chunk_size
        return max(0, min(self.chunk_size, self.size - start))

    def chunks_touched(self, offset: int, length: int) -> int:
        """How many chunks [offset, offset+length) touches (length > 0)."""
        return (offset + length - 1) // self.chunk_size - offset // self.chunk_size + 1

    def pieces(self, offset: int, length: int) -> Iterator[Piece]:
        """Split [offset, offset+length) into per-chunk pieces. The caller checks bounds."""
        cs = self.chunk_size
        shift = cs.bit_length() - 1
        end = offset + length
        buf = 0
        while offset < end:
            index = offset >> shift
            inner = offset & (cs - 1)
            n = min(cs - inner, end - offset)
            yield Piece(index, inner, n, buf)
            offset += n
            buf += n

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            from vbp.errors import OutOfRange

            raise OutOfRange(
                f"range {offset}+{length} is outside the volume (size {self.size})"
            )
