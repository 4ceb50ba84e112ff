"""The reference: what a volume must read as, given what was acknowledged.

A bytearray per volume or snapshot plus an "unknown" mask: a write that failed or whose
client died may or may not have landed (partly, even), so those bytes may read either way
until an acknowledged write covers them again. Comparisons use big ints so a 4 MiB check is
a few C-level operations.
"""

from __future__ import annotations


class Model:
    def __init__(self, size: int, data: bytes | None = None, unknown: bytes | None = None):
        self.size = size
        self.data = bytearray(data if data is not None else bytes(size))
        self.unknown = bytearray(unknown if unknown is not None else bytes(size))

    def copy(self) -> "Model":
        return Model(self.size, bytes(self.data), bytes(self.unknown))

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset:offset + len(data)] = data
        self.unknown[offset:offset + len(data)] = bytes(len(data))

    def zero(self, offset: int, length: int) -> None:
        self.write(offset, bytes(length))

    def maybe(self, offset: int, length: int) -> None:
        self.unknown[offset:offset + length] = b"\xff" * length

    def unknown_bytes(self) -> int:
        return self.size - self.unknown.count(0)

    def mismatch(self, offset: int, got: bytes) -> int | None:
        """Offset of the first known byte of [offset, offset+len(got)) that `got` gets
        wrong, or None."""
        n = len(got)
        diff = int.from_bytes(got, "big") ^ int.from_bytes(self.data[offset:offset + n], "big")
        if not diff:
            return None
        bad = diff & ~int.from_bytes(self.unknown[offset:offset + n], "big")
        if not bad:
            return None
        return offset + n - 1 - (bad.bit_length() - 1) // 8


def first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return len(a) - 1 - (x.bit_length() - 1) // 8
