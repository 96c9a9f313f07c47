"""AWQ: activation-aware weight quantization (Lin, Tang, Tang, Yang, Dang, Gan & Han, 2023, "AWQ:
Activation-aware Weight Quantization for LLM Compression and Acceleration", arXiv 2306.00978).

A few input channels carry large activations; their weights matter most. AWQ scales input channel j
of ``W`` up by ``s_j`` before round-to-nearest (and the input down by ``s_j``), which shrinks those
weights' relative rounding error, with ``s = mean|x|^alpha`` (normalised by ``sqrt(max(s) min(s))``)
and ``alpha`` chosen on a grid of ``N_ALPHA`` points in [0, 1). Then the quantization range of each
group is clipped: a per-group shrink ratio of the range, on a grid from 1 down to ``1 - MAX_SHRINK``.

Both searches minimise the layer's output error on the calibration tokens. Where the reference code
replays the calibration inputs for each candidate, here the error is the exact quadratic form of
the calibration Hessian ``H = mean(x x^T)``: ``||(W' - W) X||^2 / n = tr(dW H dW^T)`` with
``dW = Q(W diag(s)) diag(s)^-1 - W``, so every candidate costs one matrix product and no forward
pass. The clipping search uses each group's diagonal block of ``H`` (the group's partial output, as
the reference code measures it). Clipping shrinks both ends of a group's range, ``[r*min, r*max]``
(the reference clips to ``+-r*absmax``; the two agree for symmetric ranges).

**Where the scale lives.** The reference folds ``1/s`` into the operation before the Linear (an
RMSNorm weight, the previous Linear), which forces one ``s`` per group of Linears that share an input
(q/k/v, gate/up) and a table of such pairs per model family. unweight keeps the scale with each
Linear: the stored result is ``(q, scale, zero)`` of ``W diag(s)`` plus ``input_scale = s``
(``in_features`` float32 values, under 0.03 bits per weight at smollm2's widths), and the dense
weights are ``dequant(q) / s``. The layer computes the same function as the folded form, every Linear
gets its own best ``s``, and nothing depends on the architecture (the driver stays generic). Folding
is a storage decision for runtimes that take plain INT4 weights (compressed-tensors / vLLM) and needs
a shared ``s`` per input group; that is left to the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unweight.quant.rtn import DEFAULT_SCHEME, n_groups, rtn_dequantize, rtn_qparams, rtn_quantize_with_qparams

N_ALPHA = 20  # alpha in {0, 1/20, ..., 19/20}, the reference grid
MAX_SHRINK = 0.5  # clipping ratios 1, 0.95, ..., 0.55
N_CLIP = 20
MIN_SCALE = 1e-4


@dataclass
class AWQResult:
    q: torch.Tensor  # uint8 levels of W diag(input_scale), w.shape
    scale: torch.Tensor  # [rows, n_groups] float32
    zero: torch.Tensor  # [rows, n_groups] as rtn_qparams
    input_scale: torch.Tensor  # [cols] float32: dense W = dequant(q) / input_scale
    alpha: float
    bits: int
    group_size: int
    scheme: str

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = rtn_dequantize(self.q, self.scale, self.zero, self.group_size, self.scheme)
        return (w / self.input_scale[None, :]).to(dtype)


def output_error(dw: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Mean squared output error ``tr(dW H dW^T)`` of a weight perturbation ``dW`` (summed over rows)."""
    return ((dw @ hessian) * dw).sum()


def _expand(per_group: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """``[rows, n_groups]`` -> ``[rows, cols]``, each group's value over its columns."""
    g = cols if group_size <= 0 or group_size >= cols else group_size
    return per_group.repeat_interleave(g, dim=1)[:, :cols]


def _fake_quant(w: torch.Tensor, bits: int, group_size: int, scheme: str, ratio: torch.Tensor | None = None):
    """RTN of ``w`` with each group's range shrunk by ``ratio`` ([rows, n_groups], None = 1)."""
    if ratio is None:
        clipped = w
    else:
        g = w.shape[1] if group_size <= 0 or group_size >= w.shape[1] else group_size
        grouped_hi = torch.stack([c.amax(1) for c in w.split(g, dim=1)], 1)
        grouped_lo = torch.stack([c.amin(1) for c in w.split(g, dim=1)], 1)
        hi = _expand(grouped_hi * ratio, w.shape[1], group_size)
        lo = _expand(grouped_lo * ratio, w.shape[1], group_size)
        clipped = torch.maximum(torch.minimum(w, hi), lo)
    scale, zero = rtn_qparams(clipped, bits, group_size, scheme)
    q = rtn_quantize_with_qparams(w, scale, zero, bits, group_size, scheme)
    return q, scale, zero


@torch.no_grad()
def awq_quantize(w: torch.Tensor, hessian: torch.Tensor, abs_mean: torch.Tensor, bits: int = 4,
                 group_size: int = 128, scheme: str = DEFAULT_SCHEME, n_alpha: int = N_ALPHA,
                 clip: bool = True) -> AWQResult:
    """AWQ of ``w`` (``[rows, cols]``) from the calibration ``hessian`` (mean x x^T) and ``abs_mean``
    (mean |x| per input channel): scale search, then (``clip``) clipping search."""
    W = w.detach().to(torch.float32)
    H = hessian.detach().to(W.device, torch.float32)
    x_mean = abs_mean.detach().to(W.device, torch.float32)
    rows, cols = W.shape

    best = (float("inf"), 0.0, torch.ones(cols, device=W.device))
    for step in range(n_alpha):
        alpha = step / n_alpha
        s = x_mean.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        q, sc, z = _fake_quant(W * s[None, :], bits, group_size, scheme)
        dw = rtn_dequantize(q, sc, z, group_size, scheme) / s[None, :] - W
        err = output_error(dw, H).item()
        if err < best[0]:
            best = (err, alpha, s)
    _, alpha, s = best
    Ws = W * s[None, :]
    ratio = None
    if clip:
        ratio = _clip_search(Ws, H / s[:, None] / s[None, :], bits, group_size, scheme)
    q, sc, z = _fake_quant(Ws, bits, group_size, scheme, ratio)
    return AWQResult(q, sc, z, s, alpha, bits, group_size, scheme)


def _clip_search(ws: torch.Tensor, h_scaled: torch.Tensor, bits: int, group_size: int,
                 scheme: str) -> torch.Tensor:
    """Per (row, group) shrink ratio minimising the group's partial output error
    ``dW_g H_gg dW_g^T`` in the scaled space (inputs ``x / s``, Hessian ``H / s s^T``)."""
    rows, cols = ws.shape
    g = cols if group_size <= 0 or group_size >= cols else group_size
    G = n_groups(cols, group_size)
    blocks = [h_scaled[j:j + g, j:j + g] for j in range(0, cols, g)]
    best_err = torch.full((rows, G), float("inf"), device=ws.device)
    best_ratio = torch.ones(rows, G, device=ws.device)
    for step in range(int(MAX_SHRINK * N_CLIP)):
        r = 1.0 - step / N_CLIP
        ratio = torch.full((rows, G), r, device=ws.device)
        q, sc, z = _fake_quant(ws, bits, group_size, scheme, ratio)
        dw = rtn_dequantize(q, sc, z, group_size, scheme) - ws
        err = torch.stack([((d @ b) * d).sum(1) for d, b in zip(dw.split(g, dim=1), blocks)], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio


def awq_fake_quantize(w: torch.Tensor, hessian: torch.Tensor, abs_mean: torch.Tensor, bits: int = 4,
                      group_size: int = 128, scheme: str = DEFAULT_SCHEME, **kwargs) -> torch.Tensor:
    """AWQ then dequantize, in ``w``'s dtype."""
    return awq_quantize(w, hessian, abs_mean, bits, group_size, scheme, **kwargs).dequantize(w.dtype)
