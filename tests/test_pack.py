"""Bit packing: round trips at every width, the documented little-endian layout, bad input."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight import UnweightError, pack
from unweight.pack import bits_needed, pack_bits, packed_nbytes, unpack_bits


@st.composite
def width_and_values(draw):
    bits = draw(st.integers(1, 8))
    values = draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    return bits, values


@given(width_and_values())
@settings(max_examples=300, deadline=None)
def test_round_trip_every_width(case):
    bits, values = case
    x = torch.tensor(values, dtype=torch.uint8)
    packed = pack_bits(x, bits)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == packed_nbytes(len(values), bits) == -(-len(values) * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, len(values)), x)


@pytest.mark.parametrize("bits", range(1, 9))
def test_round_trip_across_chunks(bits, monkeypatch):
    monkeypatch.setattr(pack, "CHUNK_ELEMENTS", 16)  # many chunks, each ending on a byte boundary
    rng = np.random.default_rng(bits)
    x = torch.from_numpy(rng.integers(0, 1 << bits, size=1001).astype(np.int64))
    packed = pack_bits(x, bits)
    monkeypatch.setattr(pack, "CHUNK_ELEMENTS", 1 << 20)  # a different chunking reads the same stream
    assert torch.equal(packed, pack_bits(x, bits))
    monkeypatch.setattr(pack, "CHUNK_ELEMENTS", 24)
    assert torch.equal(unpack_bits(packed, bits, 1001), x.to(torch.uint8))


def test_layout_is_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b1101, 1]
    # 3 bits: 5 = 101, 6 = 110, 7 = 111 -> stream 101 011 111 (LSB first) -> bytes 0b11_110_101, 0b1
    assert pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]
    assert pack_bits(torch.tensor([200, 7]), 8).tolist() == [200, 7]


def test_unused_high_bits_are_zero():
    assert pack_bits(torch.tensor([7]), 3).tolist() == [7]
    assert pack_bits(torch.tensor([1, 1, 1]), 2).tolist() == [0b010101]


def test_multidimensional_input_is_flattened_in_row_major_order():
    x = torch.arange(12).reshape(3, 4) % 4
    assert torch.equal(unpack_bits(pack_bits(x, 2), 2, 12), x.reshape(-1).to(torch.uint8))


def test_bad_input_raises():
    with pytest.raises(UnweightError):
        pack_bits(torch.tensor([8]), 3)
    with pytest.raises(UnweightError):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(UnweightError):
        pack_bits(torch.tensor([0.5]), 3)
    for bits in (0, 9, 2.0):
        with pytest.raises(UnweightError):
            pack_bits(torch.tensor([0]), bits)
    with pytest.raises(UnweightError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 3, 6)  # needs 3 bytes
    with pytest.raises(UnweightError):
        unpack_bits(torch.zeros(3, dtype=torch.int32), 3, 6)


def test_bits_needed():
    assert [bits_needed(n) for n in (1, 2, 3, 4, 5, 16, 17, 64, 256)] == [1, 1, 2, 2, 3, 4, 5, 6, 8]
    for bad in (0, 257):
        with pytest.raises(UnweightError):
            bits_needed(bad)
