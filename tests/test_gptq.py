"""GPTQ: below RTN's layer-output error at every bit width, equal to RTN when inputs are uncorrelated,
stored exactly like RTN (remainder groups included), never worse with more bits."""

import pytest
import torch

from unweight import UnweightError
from unweight.quant.awq import output_error
from unweight.quant.gptq import gptq_fake_quantize, gptq_quantize, inverse_hessian_cholesky, lower_inverse
from unweight.quant.rtn import SCHEMES, n_groups, rtn_dequantize, rtn_fake_quantize, rtn_quantize


def layer(rows=64, cols=576, n=4096, seed=0):
    """A weight and the Hessian of correlated calibration inputs with uneven channel scales and one
    massive channel (as in LLM residual streams). 576 columns: groups of 128 leave a remainder of 64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = (torch.randn(n, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)
    x[:, 7] *= 20
    return torch.randn(rows, cols, generator=g) * 0.02, x.T @ x / n


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_output_error_is_below_rtn(bits, scheme):
    w, h = layer()
    rtn = output_error(rtn_fake_quantize(w, bits, 128, scheme) - w, h)
    for kw in ({}, {"act_order": True}, {"static_groups": True}):
        gptq = output_error(gptq_fake_quantize(w, h, bits, 128, scheme, **kw) - w, h)
        assert gptq < rtn, (bits, scheme, kw, gptq.item(), rtn.item())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_static_groups_take_every_groups_grid_from_the_original_weights(scheme):
    """With ``static_groups`` the scales and zeros are RTN's of ``w`` itself (the sweep moves the
    weights, not the grid); without, later groups' grids follow the compensated weights."""
    w, h = layer(rows=16)
    rtn = rtn_quantize(w, 3, 128, scheme)
    _, scale, zero = gptq_quantize(w, h, 3, 128, scheme, static_groups=True)
    assert torch.equal(scale, rtn[1]) and torch.equal(zero, rtn[2])
    _, scale, _ = gptq_quantize(w, h, 3, 128, scheme)
    assert torch.equal(scale[:, 0], rtn[1][:, 0]) and not torch.equal(scale[:, 1:], rtn[1][:, 1:])


def test_gptq_output_shapes_and_remainder_group():
    w, h = layer(rows=8)
    for act_order in (False, True):
        q, scale, zero = gptq_quantize(w, h, 3, 128, act_order=act_order)
        assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 7
        assert scale.shape == zero.shape == (8, n_groups(576, 128)) == (8, 5)
        assert zero.dtype == torch.uint8
    # the last group (64 columns) has parameters of its own: rebuild it alone
    last = rtn_dequantize(q[:, 512:], scale[:, 4:], zero[:, 4:], 128)
    assert torch.equal(last, rtn_dequantize(q, scale, zero, 128)[:, 512:])


def test_gptq_with_uncorrelated_inputs_is_rtn():
    # H = c * I: the inverse Hessian has no off-diagonal terms, so no error is propagated
    w, _ = layer(rows=16)
    for scheme in SCHEMES:
        q, scale, zero = gptq_quantize(w, 2.5 * torch.eye(576), 4, 128, scheme)
        ref = rtn_quantize(w, 4, 128, scheme)
        assert torch.equal(q, ref[0]) and torch.equal(scale, ref[1]) and torch.equal(zero, ref[2])


def test_more_bits_never_worse():
    w, h = layer(rows=32)
    errors = [output_error(gptq_fake_quantize(w, h, b, 128) - w, h).item() for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_dead_inputs_and_indefinite_hessians():
    w, h = layer(rows=8, cols=64)
    h[3, :] = h[:, 3] = 0  # an input that never fires: its weight is irrelevant and set to 0
    q, scale, zero = gptq_quantize(w, h, 4, 32)
    assert rtn_dequantize(q, scale, zero, 32)[:, 3].abs().max() < scale.max()
    rank1 = torch.ones(64, 64)  # one token's worth of calibration: dampening makes it invertible
    upper, dead = inverse_hessian_cholesky(rank1, 0.01)
    assert torch.isfinite(upper).all() and not dead.any()
    with pytest.raises(UnweightError, match="does not match"):
        gptq_quantize(w, torch.eye(32), 4, 32)


@pytest.mark.parametrize("n,leaf", [(1, 128), (7, 2), (129, 128), (300, 16), (513, 64)])
def test_lower_inverse_by_halves_is_the_triangular_inverse(n, leaf):
    x = torch.randn(2 * n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    lower = torch.linalg.cholesky(x.T @ x / (2 * n) + 0.1 * torch.eye(n, dtype=torch.float64))
    inv = lower_inverse(lower, leaf)
    assert torch.equal(inv, torch.tril(inv))
    torch.testing.assert_close(lower @ inv, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("cols", [96, 300])  # 300: the inverse is taken by halves
def test_inverse_hessian_cholesky_is_the_upper_factor_of_the_dampened_inverse(cols):
    _, h = layer(rows=4, cols=cols, n=512)
    u, dead = inverse_hessian_cholesky(h, 0.01)
    assert not dead.any() and torch.equal(u, torch.triu(u)) and (torch.diag(u) > 0).all()
    h64 = h.double() + 0.01 * torch.diag(h.double()).mean() * torch.eye(cols, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(h64), upper=True)  # the reference code's route
    torch.testing.assert_close(u.double(), ref, rtol=1e-3, atol=1e-6 * ref.abs().max().item())
