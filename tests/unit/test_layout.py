"""vbp.layout: sizes, and the limits their errors quote."""

from __future__ import annotations

import pytest

from vbp.errors import BadValue
from vbp.layout import GiB, SIZE_MAX, VOLUME_SIZE_MAX, Geometry, format_size, limit_text, parse_size


def test_the_limits_quoted_are_the_limits_applied():
    """Each message says the limit its check applies, derived from the constant: a
    volume's size was refused past 1024 PiB and past 8 EiB with two different limits
    quoted, whichever check came first."""
    assert limit_text(SIZE_MAX) == "9223372036854775807 bytes, 8 EiB less one"
    assert limit_text(VOLUME_SIZE_MAX) == "1152921504606846976 bytes, 1 EiB"
    assert limit_text(2 * GiB) == "2147483648 bytes, 2 GiB"
    assert limit_text(2 * GiB - 1) == "2147483647 bytes, 2 GiB less one"
    for text, most in (("9E", SIZE_MAX), ("9E", VOLUME_SIZE_MAX), ("2000P", VOLUME_SIZE_MAX),
                       ("3G", 2 * GiB)):
        with pytest.raises(BadValue, match=rf"^size too large: {text} \(at most "
                                           rf"{limit_text(most)}\)$"):
            parse_size(text, most)
    assert parse_size("1E", VOLUME_SIZE_MAX) == VOLUME_SIZE_MAX
    assert parse_size("7E") == 7 << 60 and parse_size(str(SIZE_MAX)) == SIZE_MAX
    with pytest.raises(BadValue, match=rf"\(at most {limit_text(VOLUME_SIZE_MAX)}\)$"):
        Geometry(VOLUME_SIZE_MAX + 1, 4 << 20)


def test_format_size_units():
    assert format_size(4 << 20) == "4 MiB" and format_size(1536) == "1.5 KiB"
    assert format_size(1 << 60) == "1 EiB" and format_size(1 << 50) == "1 PiB"
    assert format_size(100) == "100 B"
