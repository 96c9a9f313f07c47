"""Round-to-nearest group quantization: more bits is never worse, exact grids come back, remainder
groups behave like groups of their own."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight import UnweightError
from unweight.quant import (
    SCHEMES,
    n_groups,
    rtn_dequantize,
    rtn_fake_quantize,
    rtn_qparams,
    rtn_quantize,
)


def _mse(a, b):
    return float(((a.double() - b.double()) ** 2).mean())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("group_size", [128, 64, 0])
def test_error_decreases_with_more_bits(scheme, group_size):
    w = torch.randn(48, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    errors = [_mse(rtn_fake_quantize(w, bits, group_size, scheme), w) for bits in range(1, 9)]
    first = 2 if scheme == "sym" else 1  # sym at 1 bit has the levels {-2m, 0}: only zero fits
    assert all(a > b for a, b in zip(errors[first:], errors[first + 1:])), errors


@st.composite
def equally_spaced_groups(draw):
    bits = draw(st.integers(1, 8))
    qmax = (1 << bits) - 1
    group_size = draw(st.sampled_from([4, 8, 32, 128]))
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 3 * group_size))
    lo = draw(st.floats(-10, 10, allow_nan=False, allow_subnormal=False))
    step = draw(st.floats(1e-3, 1.0))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    levels = torch.randint(0, qmax + 1, (rows, cols), generator=g)
    # every group holds both extreme levels, so its min and max are lo and lo + qmax * step
    for start in range(0, cols, group_size):
        levels[:, start] = 0
        if start + 1 < min(cols, start + group_size):
            levels[:, start + 1] = qmax
        else:
            levels[:, start] = torch.randint(0, qmax + 1, (rows,), generator=g)  # 1-column group
    return bits, group_size, (lo + step * levels.double()).float()


@given(equally_spaced_groups())
@settings(max_examples=150, deadline=None)
def test_float_min_form_rebuilds_equally_spaced_values(case):
    bits, group_size, w = case
    q, scale, zero = rtn_quantize(w, bits, group_size, "asym_float")
    back = rtn_dequantize(q, scale, zero, group_size, "asym_float")
    tol = 1e-5 * (1 + w.abs().max())
    assert float((back - w).abs().max()) <= tol


@pytest.mark.parametrize("scheme", SCHEMES)
def test_remainder_group_is_quantized_on_its_own(scheme):
    w = torch.randn(6, 576, generator=torch.Generator().manual_seed(1))
    w[:, 512:] *= 10  # a remainder group with a different range must not borrow its neighbour's
    q, scale, zero = rtn_quantize(w, 3, 128, scheme)
    assert q.shape == w.shape and q.dtype == torch.uint8
    assert scale.shape == zero.shape == (6, n_groups(576, 128)) == (6, 5)
    q_tail, s_tail, z_tail = rtn_quantize(w[:, 512:].contiguous(), 3, 128, scheme)
    assert torch.equal(q[:, 512:], q_tail)
    assert torch.equal(scale[:, 4:], s_tail) and torch.equal(zero[:, 4:], z_tail)
    q_head, s_head, _ = rtn_quantize(w[:, :128].contiguous(), 3, 128, scheme)
    assert torch.equal(q[:, :128], q_head) and torch.equal(scale[:, :1], s_head)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_levels_in_range_and_dtypes(scheme, bits):
    w = torch.randn(5, 200, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    q, scale, zero = rtn_quantize(w, bits, 64, scheme)
    assert int(q.max()) <= (1 << bits) - 1
    assert scale.dtype == torch.float32 and (scale > 0).all()
    assert zero.dtype == (torch.float32 if scheme == "asym_float" else torch.uint8)
    assert rtn_fake_quantize(w, bits, 64, scheme).dtype == torch.bfloat16


def test_integer_zero_point_keeps_zero_exact():
    w = torch.randn(4, 300, generator=torch.Generator().manual_seed(2))
    w[:, ::7] = 0.0
    back = rtn_fake_quantize(w, 3, 128, "asym_int")
    assert (back[:, ::7] == 0).all()


def test_asym_forms_differ_and_sym_is_symmetric():
    w = torch.rand(4, 256, generator=torch.Generator().manual_seed(3)) + 0.5  # all positive
    # the integer zero point widens the range to contain 0; the float minimum does not
    assert _mse(rtn_fake_quantize(w, 3, 128, "asym_float"), w) < _mse(
        rtn_fake_quantize(w, 3, 128, "asym_int"), w)
    v = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    s1, _ = rtn_qparams(v, 4, 128, "sym")
    s2, _ = rtn_qparams(-v, 4, 128, "sym")
    assert torch.equal(s1, s2)


def test_per_channel_and_constant_groups():
    w = torch.randn(3, 100)
    s, _ = rtn_qparams(w, 4, 0)
    assert s.shape == (3, 1)
    assert rtn_qparams(w, 4, 1000)[0].shape == (3, 1)
    c = torch.full((2, 64), 0.37)
    for scheme in SCHEMES:
        back = rtn_fake_quantize(c, 4, 32, scheme)
        if scheme != "sym":
            assert torch.allclose(back, c, rtol=1e-6, atol=0)
    assert torch.equal(rtn_fake_quantize(torch.zeros(2, 8), 4, 4), torch.zeros(2, 8))


def test_bad_input_raises():
    w = torch.randn(4, 8)
    with pytest.raises(UnweightError):
        rtn_quantize(w, 4, 4, "asym")
    with pytest.raises(UnweightError):
        rtn_quantize(w, 0, 4)
    with pytest.raises(UnweightError):
        rtn_quantize(w, 9, 4)
    with pytest.raises(UnweightError):
        rtn_quantize(torch.randn(8), 4, 4)
    q, scale, zero = rtn_quantize(w, 4, 4)
    with pytest.raises(UnweightError):
        rtn_dequantize(q, scale, zero, 8)  # parameters made for another group size
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(UnweightError):
        rtn_quantize(bad, 4, 4)
