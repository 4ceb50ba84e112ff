"""MemoryExport, the reference export, against a naive bytearray model."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_frontend import proto
from nbd_frontend.export import PAGE, MemoryExport, MemoryProvider
from vbp.errors import NotFound, ReadOnly

SIZE = 10 * PAGE + 100  # an unaligned tail on purpose


def flat(result) -> bytes:
    if isinstance(result, bytes):
        return result
    return b"".join(bytes(n) if data is None else data for _, n, data in result)


OP = st.tuples(st.sampled_from(["write", "trim", "zero", "zero_trim"]),
               st.integers(0, SIZE - 1), st.integers(1, 3 * PAGE), st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(st.lists(OP, max_size=12), st.integers(0, SIZE - 1), st.integers(1, SIZE))
def test_matches_naive_model(ops, offset, length):
    export, model = MemoryExport("m", SIZE), bytearray(SIZE)
    for op, off, n, byte in ops:
        n = min(n, SIZE - off)
        if op == "write":
            export.write(off, memoryview(bytes([byte]) * n), False)
            model[off:off + n] = bytes([byte]) * n
        elif op == "trim":
            export.trim(off, n, False)  # trim may discard: the model learns what it did
            model[:] = export.data
        else:
            export.write_zeroes(off, n, False, op == "zero_trim", False)
            model[off:off + n] = bytes(n)
    length = min(length, SIZE - offset)
    result = export.read(offset, length)
    assert flat(result) == bytes(model[offset:offset + length])
    if isinstance(result, list):
        assert result[0][0] == offset and sum(n for _, n, _ in result) == length
    pos = offset
    for n, flags in export.block_status(offset, length):
        assert n > 0
        if flags & proto.STATE_ZERO:
            assert model[pos:pos + n] == bytes(min(n, SIZE - pos))
        pos += n
    assert pos >= offset + length


def test_allocation_tracking():
    e = MemoryExport("m", SIZE)
    assert e.block_status(0, SIZE) == [(SIZE, proto.STATE_HOLE | proto.STATE_ZERO)]
    e.write(PAGE + 10, b"x" * 10, False)
    assert e.block_status(0, SIZE) == [(PAGE, 3), (PAGE, 0), (SIZE - 2 * PAGE, 3)]
    assert e.read(PAGE, 20) == bytes(10) + b"x" * 10
    assert e.read(PAGE - 5, 10) == [(PAGE - 5, 5, None), (PAGE, 5, bytes(5))]
    e.trim(PAGE + 1, PAGE, False)  # covers no whole page: nothing discarded
    assert e.read(PAGE + 10, 10) == b"x" * 10
    e.write(SIZE - 50, b"y" * 50, False)
    e.trim(10 * PAGE, 100, False)  # the partial last page is trimmed up to the end
    assert e.block_status(10 * PAGE, 100) == [(100, 3)] and e.read(SIZE - 50, 50) == [
        (SIZE - 50, 50, None)]


def test_fast_zero_and_read_only():
    e = MemoryExport("m", SIZE, fast_zero=False)
    e.write(0, b"a" * 10, False)
    with pytest.raises(OSError) as info:
        e.write_zeroes(0, 10, False, True, True)
    assert info.value.errno == errno.ENOTSUP and e.read(0, 10) == b"a" * 10
    r = MemoryExport("r", SIZE, read_only=True)
    for call in (lambda: r.write(0, b"x", False), lambda: r.trim(0, 1, False),
                 lambda: r.write_zeroes(0, 1, False, False, False)):
        with pytest.raises(ReadOnly):
            call()


def test_provider_and_snapshots():
    p = MemoryProvider()
    disk = p.add("disk", SIZE, description="d")
    disk.write(0, b"before", False)
    snap = p.snapshot("disk", "s1")
    disk.write(0, b"after!", False)
    assert p.open_export("disk@s1") is snap and snap.read_only
    assert snap.read(0, 6) == b"before"
    assert ("disk", "d") in p.list_exports()
    with pytest.raises(NotFound):
        p.open_export("nope")
