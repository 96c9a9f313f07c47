"""AWQ: the scale search contains RTN (alpha = 0) so it is never worse than RTN; the output-error
shortcut through the Hessian equals the error on the calibration tokens; a salient channel is
protected; the stored (q, scale, zero, input_scale) rebuild the dense weights."""

import torch

from unweight.quant.awq import awq_quantize, output_error
from unweight.quant.rtn import rtn_dequantize, rtn_fake_quantize


def calibration(rows=48, cols=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    x[:, 11] *= 30  # a salient channel
    w = torch.randn(rows, cols, generator=g) * 0.02
    return w, x


def test_output_error_is_the_error_on_the_calibration_tokens():
    w, x = calibration()
    dw = rtn_fake_quantize(w, 3, 64) - w
    direct = ((x @ dw.T) ** 2).sum() / x.shape[0]
    assert torch.allclose(output_error(dw, x.T @ x / x.shape[0]), direct, rtol=1e-4)


def test_awq_is_never_worse_than_rtn_and_protects_the_salient_channel():
    w, x = calibration()
    h, abs_mean = x.T @ x / x.shape[0], x.abs().mean(0)
    for bits in (3, 4):
        rtn = rtn_fake_quantize(w, bits, 128)
        plain = awq_quantize(w, h, abs_mean, bits, 128, clip=False)
        clipped = awq_quantize(w, h, abs_mean, bits, 128)
        e_rtn, e_plain, e_clip = (output_error(v - w, h) for v in (rtn, plain.dequantize(), clipped.dequantize()))
        assert e_plain <= e_rtn and e_clip < e_rtn, (bits, e_rtn, e_plain, e_clip)
        assert plain.alpha > 0 and plain.input_scale.argmax() == 11
        # the salient channel's weights are rebuilt more precisely than by RTN
        assert (plain.dequantize()[:, 11] - w[:, 11]).abs().mean() < (rtn[:, 11] - w[:, 11]).abs().mean()


def test_awq_storage_rebuilds_the_dense_weights():
    w, x = calibration(rows=8, cols=200)
    r = awq_quantize(w, x.T @ x / x.shape[0], x.abs().mean(0), 4, 128)
    assert r.q.dtype == torch.uint8 and r.scale.shape == (8, 2) and r.input_scale.shape == (200,)
    dense = rtn_dequantize(r.q, r.scale, r.zero, 128) / r.input_scale
    assert torch.equal(r.dequantize(), dense)
    assert (r.dequantize() - w).abs().max() < 0.5 * w.abs().max()
