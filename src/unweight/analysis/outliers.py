"""Outlier and super-weight candidates: weights far outside their matrix's scale.

"The Super Weight in Large Language Models" (Yu et al., 2024) shows that single weights, in MLP
down-projections on the massive-activation channel, can carry a model; zeroing one destroys it.
Magnitude alone finds candidates; whether a candidate matters is measured elsewhere (calibration).

The scale of a matrix is robust, so that the outliers themselves do not inflate it:

    z_ij = |w_ij - median(W)| / (1.4826 * MAD(W)),   MAD(W) = median(|W - median(W)|)

1.4826 = 1 / Phi^-1(3/4) makes 1.4826 * MAD equal to sigma for a normal sample, so z reads like a
z-score. When more than half of the weights are equal (a pruned matrix), MAD is 0; the scale then falls
back to sqrt(pi/2) * mean(|W - median|) (also sigma for a normal sample), and z is 0 everywhere for a
constant matrix. The median is the lower median (``torch.median``).
"""

import math
from typing import NamedTuple

import torch

MAD_TO_SIGMA = 1.4826
MEAN_ABS_TO_SIGMA = math.sqrt(math.pi / 2)
SUPER_WEIGHT_TOP = 8


class Candidate(NamedTuple):
    """One super-weight candidate: position in the 2-D matrix, stored value, robust z-score."""

    row: int
    col: int
    value: float
    z: float


def robust_scale(w: torch.Tensor) -> tuple[float, float]:
    """(median, robust sigma) of all entries of ``w``, as defined in the module docstring."""
    x = w.detach().reshape(-1).to(torch.float32)
    median = x.median()
    deviation = (x - median).abs()
    scale = MAD_TO_SIGMA * float(deviation.median())
    if scale <= 0:
        scale = MEAN_ABS_TO_SIGMA * float(deviation.to(torch.float64).mean())
    return float(median), scale


def robust_zscore(w: torch.Tensor, scale: tuple[float, float] | None = None) -> torch.Tensor:
    """|w - median| / (1.4826 * MAD) for every entry, float32, same shape as ``w``.

    ``scale`` is a precomputed ``robust_scale(w)``."""
    median, sigma = robust_scale(w) if scale is None else scale
    deviation = (w.detach().to(torch.float32) - median).abs()
    if sigma <= 0:
        return torch.zeros_like(deviation)
    return deviation / sigma


def super_weight_candidates(w: torch.Tensor, top: int = SUPER_WEIGHT_TOP) -> list[Candidate]:
    """The ``top`` entries of a 1-D or 2-D ``w`` with the largest robust z-score, largest first.

    A 1-D tensor is read as one row. Ties are broken by position (row-major)."""
    if w.ndim not in (1, 2):
        raise ValueError(f"super-weight candidates need a 1-D or 2-D tensor, got {tuple(w.shape)}")
    matrix = w.detach().reshape(1, -1) if w.ndim == 1 else w.detach()
    z = robust_zscore(matrix).reshape(-1)
    k = min(top, z.numel())
    if k <= 0:
        return []
    values, flat = torch.topk(z, k)
    order = sorted(range(k), key=lambda i: (-float(values[i]), int(flat[i])))
    cols = matrix.shape[1]
    flat_matrix = matrix.reshape(-1)
    return [
        Candidate(
            row=int(flat[i]) // cols,
            col=int(flat[i]) % cols,
            value=float(flat_matrix[flat[i]]),
            z=float(values[i]),
        )
        for i in order
    ]
