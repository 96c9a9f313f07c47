"""Zigzag LEB128 varints (unweight.lossless.varint): exact round trips, and malformed input refused."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unweight.lossless import varint

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)


@given(st.lists(INT64, max_size=50))
def test_values_round_trip_and_small_ones_take_one_byte(values):
    data = varint.encode(values)
    assert varint.decode(data, len(values)).tolist() == values
    assert len(data) == sum(1 if -64 <= v < 64 else 2 if -8192 <= v < 8192 else 3 if -(1 << 20) <= v < 1 << 20
                            else len(varint.encode([v])) for v in values)
    pos, read = 0, []
    for _ in values:
        v, pos = varint.read(data, pos)
        read.append(v)
    assert read == values and pos == len(data)


@pytest.mark.parametrize("data, count", [
    (b"\x80", 1),  # runs past the end
    (b"\x01\x02", 1),  # a value too many
    (b"\x01", 2),  # a value too few
    (b"\x01", 0),
    (b"\xff" * 9 + b"\x02", 1),  # 65 bits
    (b"\xff" * 11, 1),
])
def test_malformed_varints_are_refused(data, count):
    with pytest.raises(ValueError):
        varint.decode(data, count)
    if count == 1 and data[-1] < 0x80 and len(data) > 2:
        with pytest.raises(ValueError):
            varint.read(data, 0)


def test_extremes():
    v = np.array([0, -1, 1, -(1 << 63), (1 << 63) - 1], np.int64)
    assert (varint.decode(varint.encode(v), 5) == v).all() and len(varint.encode([-(1 << 63)])) == 10
    with pytest.raises(ValueError):
        varint.read(b"\x80\x80", 0)
