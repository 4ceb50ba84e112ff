"""vbp.buffers.unshared: a buffer is reused only once no view of it is alive."""

from __future__ import annotations

from vbp.buffers import unshared


def test_a_view_or_a_slice_of_one_keeps_a_buffer_shared():
    holder = [bytearray(64)]
    assert unshared(holder, 0)
    view = memoryview(holder[0])
    assert not unshared(holder, 0)
    part = view[8:16].toreadonly()  # what a payload consumer keeps
    del view
    assert not unshared(holder, 0)
    del part
    assert unshared(holder, 0)


def test_another_reference_keeps_a_buffer_shared():
    holder = [bytearray(64)]
    other = holder[0]
    assert not unshared(holder, 0)
    del other
    assert unshared(holder, 0)
