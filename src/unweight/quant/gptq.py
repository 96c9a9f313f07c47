"""GPTQ: accurate post-training quantization with second-order error compensation (Frantar, Ashkboos,
Hoefler & Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323).

Minimises the layer-wise output error ``||W X - Q X||^2`` one input column at a time: column i is
rounded, and its error, scaled by the inverse Hessian ``H^-1 = (X^T X)^-1`` through the rows of its
upper Cholesky factor, is pushed onto the columns not yet quantized (the OBS update restricted to a
fixed column order). As in the paper and its reference code:

- dampening: ``damp * mean(diag H)`` is added to the diagonal (1% by default); inputs that never fire
  (``H_jj == 0``) get weight 0;
- lazy batch updates: the update of the columns right of the current block of ``block_size`` columns is
  applied once per block, as a matrix product;
- act-order (``act_order=True``): columns are processed by decreasing ``H_jj``.

Quantization grid and storage are RTN's (:mod:`unweight.quant.rtn`): groups of ``group_size``
consecutive input columns per row, the **last group of a row holding the remainder** (576 columns at
group 128: four groups of 128 and one of 64), schemes ``asym_int`` (integer zero point,
``w = s * (q - z)``), ``sym`` or ``asym_float``. A group's parameters are computed from the weights
*as updated so far* when its first column comes up. With act-order the groups would then no longer
be contiguous (GPTQ's ``g_idx``); to keep GPTQ's output storable exactly like RTN's, act-order uses
**static groups** (the reference code's ``--static-groups``): every group's parameters are computed
from the original weights first. ``static_groups=True`` asks for them without act-order (what
llm-compressor's observer does: scales and zeros from the original weights, before the sweep).
The result is ``(q, scale, zero)``, and ``rtn_dequantize`` rebuilds exactly the weights GPTQ
compensated for.

``mask`` (keep-mask, e.g. from SparseGPT) quantizes pruned weights to exactly zero, the level ``z``
(an integer zero point is required), and compensates their error like any other: sparsity and
quantization combine as in SparseGPT's joint mode.

``exact`` (bool, ``w.shape``) marks weights kept exactly at their original values (dense-and-sparse
outliers, as SpQR keeps them unquantized): they are left out of every group's range, their
"quantized" value is the original weight, and the difference from the weight as updated so far is
compensated like any rounding error. Their levels are meaningless; the caller writes the values back.
"""

from __future__ import annotations

import torch

from unweight.errors import UnweightError
from unweight.quant.rtn import DEFAULT_SCHEME, rtn_dequantize, rtn_qparams
from unweight.quant.sweep import quant_sweep

DEFAULT_DAMP = 0.01  # fraction of mean(diag H) added to the diagonal
DEFAULT_BLOCK = 128  # columns per lazy batch update
MAX_DAMP_RETRIES = 6  # each retry multiplies the dampening by 10 when H is not positive definite


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = DEFAULT_DAMP
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` (float32), and
    the bool mask of dead inputs (``H_jj == 0``, whose diagonal is set to 1 first).

    Shared by GPTQ and SparseGPT. Computed in float32 as the reference code does (the dampening keeps
    it well conditioned), in float64 if that fails; if ``H`` is still not positive definite (too few
    calibration tokens for the width), the dampening grows tenfold and it retries.
    """
    dead = torch.diag(hessian) == 0
    for dtype in (torch.float32, torch.float64):
        flipped = hessian.detach().flip(0, 1).to(dtype)  # J H J, J the reversal: the one copy of H
        diagonal = flipped.diagonal()  # a view; diag(J H J) is diag(H) reversed
        diagonal[dead.flip(0)] = 1.0
        mean_diag = diagonal.flip(0).mean()  # summed in H's order
        held = diagonal.clone()
        for attempt in range(MAX_DAMP_RETRIES):
            # J H J = L L^T gives H = R R^T with R = J L J upper, so H^-1 = U^T U with U = R^-1 =
            # J L^-1 J: one Cholesky and one triangular inverse (the reference code's second
            # Cholesky of the explicit inverse, and torch.cholesky_inverse, cost 2-10x more on CPU)
            diagonal.copy_(held + damp * (10 ** attempt) * mean_diag)
            factor, info = torch.linalg.cholesky_ex(flipped)
            if info != 0:
                continue
            upper = lower_inverse(factor).flip(0, 1)
            # a NaN or inf anywhere makes the sum non-finite; the sum is 20x cheaper than isfinite().all()
            # (0.5 against 11 ms at 2,048 columns) and only overflow of finite values needs the full check
            if torch.isfinite(upper.sum()) or torch.isfinite(upper).all():
                return upper.to(torch.float32), dead
    raise UnweightError("the calibration Hessian is not positive definite even with strong "
                        "dampening: use more calibration tokens")


def lower_inverse(lower: torch.Tensor, leaf: int = 128) -> torch.Tensor:
    """``L^-1`` of a lower-triangular ``L``, by halves: ``[[A, 0], [C, D]]^-1 = [[A^-1, 0],
    [-D^-1 C A^-1, D^-1]]``, the leaves by triangular solves. A solve against the identity ignores that
    the result is triangular (n^3 flops); this takes ~2n^3/3, in matrix products: 2.4x faster at
    n = 2,048 and 2x at 640 on this machine's CPU (one thread), same accuracy."""
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype, device=lower.device),
                                             upper=False)
    h = n // 2
    a_inv, d_inv = lower_inverse(lower[:h, :h], leaf), lower_inverse(lower[h:, h:], leaf)
    out = torch.zeros_like(lower)
    out[:h, :h], out[h:, h:] = a_inv, d_inv
    out[h:, :h] = -(d_inv @ (lower[h:, :h] @ a_inv))
    return out


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  scheme: str = DEFAULT_SCHEME, act_order: bool = False, damp: float = DEFAULT_DAMP,
                  block_size: int = DEFAULT_BLOCK, mask: torch.Tensor | None = None,
                  exact: torch.Tensor | None = None,
                  static_groups: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``w`` (``[rows, cols]``) given ``hessian`` (``[cols, cols]``, mean of x x^T).

    Returns ``(q, scale, zero)`` exactly as :func:`unweight.quant.rtn.rtn_quantize` does
    (uint8 levels ``w.shape``; per-group ``[rows, n_groups]`` parameters).
    """
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise UnweightError(f"GPTQ: Hessian {tuple(hessian.shape)} does not match weight {tuple(w.shape)}")
    if mask is not None and scheme == "asym_float":
        raise UnweightError("GPTQ with a sparsity mask needs an integer zero point (asym_int or sym)")
    g = cols if group_size <= 0 or group_size >= cols else group_size
    qmax = (1 << bits) - 1
    W = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(W.device)
    W[:, torch.diag(h) == 0] = 0.0  # inputs that never fire: their weights do not matter
    pruned_mask = None if mask is None else ~mask.to(W.device, torch.bool)
    fixed = None if exact is None or not bool(exact.any()) else exact.to(W.device, torch.bool)
    original = W.clone() if fixed is not None else None
    # what a group's range is taken over: neither pruned weights (they become 0) nor exact ones
    excluded = [t for t in (pruned_mask, fixed) if t is not None]
    keep = ~(excluded[0] if len(excluded) == 1 else excluded[0] | excluded[1]) if excluded else None

    static_groups = static_groups or act_order
    static = rtn_qparams(W if fixed is None else W * ~fixed, bits, g, scheme) if static_groups else None
    static_zero = static[1].to(torch.float32) if static else None
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if perm is not None:
        W, h = W[:, perm], h[perm][:, perm]
        keep, pruned_mask, fixed, original = (None if t is None else t[:, perm]
                                              for t in (keep, pruned_mask, fixed, original))
    hinv, _ = inverse_hessian_cholesky(h, damp)

    Q = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    n_g = -(-cols // g)
    scale = torch.ones(rows, n_g, dtype=torch.float32, device=W.device)
    zero = torch.zeros(rows, n_g, dtype=static[1].dtype if static else
                       (torch.float32 if scheme == "asym_float" else torch.uint8), device=W.device)
    s_col = z_col = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)  # levels, as floats until the block is done
        Err1 = torch.zeros_like(W1)
        S1, Z1 = torch.empty_like(W1), torch.empty_like(W1)  # each weight's grid
        Hinv1 = hinv[i1:i2, i1:i2]
        pruned1, fixed1, orig1 = (None if t is None else t[:, i1:i2].contiguous()
                                  for t in (pruned_mask, fixed, original))

        def sweep(a: int, b: int) -> None:
            quant_sweep(W1, Hinv1, a, b, S1, Z1, qmax, scheme == "asym_float", pruned1, fixed1,
                        orig1, Q1, Err1)

        if static is not None:
            cols1 = torch.arange(i1, i2, device=W.device) if perm is None else perm[i1:i2]
            S1.copy_(static[0][:, cols1 // g])
            Z1.copy_(static_zero[:, cols1 // g])
            sweep(0, i2 - i1)
        else:  # the block runs in segments cut where a group starts
            cuts = sorted({0, i2 - i1} | {c - i1 for c in range(i1, i2) if c % g == 0})
            for a, b in zip(cuts[:-1], cuts[1:]):
                col = i1 + a
                if col % g == 0:  # a new group: parameters from the weights as updated so far
                    current = torch.cat([W1[:, a:], W[:, i2:]], dim=1)[:, :g]
                    if keep is not None:  # the range of what will be kept (pruned weights become 0)
                        current = current * keep[:, col:col + g]
                    s, z = rtn_qparams(current, bits, 0, scheme)
                    scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
                    s_col, z_col = s[:, 0], z[:, 0].to(torch.float32)
                S1[:, a:b] = s_col[:, None]
                Z1[:, a:b] = z_col[:, None]
                sweep(a, b)
        Q[:, i1:i2] = Q1.to(torch.uint8)
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1.0)

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    if static is not None:
        scale, zero = static
    return Q, scale, zero


def gptq_fake_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                       scheme: str = DEFAULT_SCHEME, **kwargs) -> torch.Tensor:
    """GPTQ then dequantize, in ``w``'s dtype: the dense weights the quantized layer computes with."""
    q, scale, zero = gptq_quantize(w, hessian, bits, group_size, scheme, **kwargs)
    return rtn_dequantize(q, scale, zero, group_size, scheme, dtype=w.dtype)
