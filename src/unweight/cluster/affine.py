"""Affine correction of a clustered matrix: W' = a * Wq + b with a > 0, one (a, b) per matrix.

"Only relative ranks matter in weight-clustered large language models" (arXiv 2603.17917) finds that
when many layers are replaced by their clustered versions the model collapses through *scale drift*
rather than through rank distortion, and that an affine map with a > 0 delays the collapse. Because
a > 0 the map is strictly increasing: it keeps the rank order of the values exactly, and applied to a
codebook (``a * centroids + b``) it leaves the assignments untouched.

Two fits:

- :func:`fit_moments` (the default): match the original matrix's mean and standard deviation,

      a = std(W) / std(Wq),   b = mean(W) - a * mean(Wq).

  It costs one pass over the matrix, needs no data, preserves ranks, and aims straight at the drift
  the paper blames: K-means replaces each value by its cluster mean, which keeps the mean exactly but
  removes the within-cluster variance, so std(Wq) < std(W) in every matrix and the shrinkage compounds
  over layers. The fit restores the matrix's second moment (a >= 1 for a K-means codebook).
- :func:`fit_least_squares`: the (a, b) that best reproduce the layer's outputs on calibration
  activations X, minimising ||X W^T - X (a Wq + b)^T||_F^2 with a >= ``MIN_SCALE``. Only the Gram
  matrix G = X^T X enters, so it is accumulated by the calibration hooks and never the activations.
  It targets what the layer computes rather than the weight statistics, at the cost of calibration.

Pure functions on tensors; statistics are computed in float64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from unweight.errors import UnweightError

MIN_SCALE = 1e-8  # a is kept strictly positive (the correction must preserve rank order)


class Affine(NamedTuple):
    """w' = a * w + b, a > 0."""

    a: float
    b: float


IDENTITY = Affine(1.0, 0.0)


def _check(w: torch.Tensor, wq: torch.Tensor) -> None:
    if w.shape != wq.shape:
        raise UnweightError(f"affine fit: original {tuple(w.shape)} and clustered {tuple(wq.shape)} "
                            f"shapes differ")
    if w.numel() == 0:
        raise UnweightError("affine fit: empty tensor")


def fit_moments(w: torch.Tensor, wq: torch.Tensor) -> Affine:
    """(a, b) giving ``a * wq + b`` the mean and (population) std of ``w``.

    A constant ``wq`` (std 0) cannot be rescaled: a = 1 and only the mean is matched."""
    _check(w, wq)
    w64, q64 = w.detach().to(torch.float64), wq.detach().to(torch.float64)
    std_w, std_q = float(w64.std(correction=0)), float(q64.std(correction=0))
    a = std_w / std_q if std_q > 0 and std_w > 0 else 1.0
    return Affine(a, float(w64.mean()) - a * float(q64.mean()))


def fit_least_squares(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> Affine:
    """(a, b) minimising ||X W^T - X (a Wq + b)^T||_F^2 over a >= MIN_SCALE, from G = X^T X.

    ``w`` and ``wq`` are ``[out, in]``; ``gram`` is ``[in, in]``. With <A, B> = tr(A G B^T) and E the
    all-ones matrix, the optimum solves the 2x2 normal equations
    [<Q,Q> <Q,E>; <Q,E> <E,E>] [a; b] = [<W,Q>; <W,E>]. If that a is below MIN_SCALE, a is clamped and
    b refit; a singular system (G = 0, or Wq proportional to E) falls back to :func:`fit_moments`."""
    _check(w, wq)
    if w.ndim != 2 or gram.shape != (w.shape[1], w.shape[1]):
        raise UnweightError(f"affine fit: gram {tuple(gram.shape)} does not match a matrix "
                            f"{tuple(w.shape)} (expected [in, in])")
    g = gram.detach().to(torch.float64)
    w64, q64 = w.detach().to(torch.float64), wq.detach().to(torch.float64)
    wg, qg = w64 @ g, q64 @ g
    qq, wq_ = float((qg * q64).sum()), float((wg * q64).sum())
    qe, we = float(qg.sum()), float(wg.sum())  # tr(A G E^T) = sum of A G
    ee = w.shape[0] * float(g.sum())
    det = qq * ee - qe * qe
    if ee <= 0 or abs(det) <= 1e-12 * max(abs(qq * ee), 1e-300):
        return fit_moments(w, wq)
    a = (wq_ * ee - qe * we) / det
    if a < MIN_SCALE:
        a = MIN_SCALE
    return Affine(a, (we - a * qe) / ee)


def apply_affine(x: torch.Tensor, affine: Affine) -> torch.Tensor:
    """``a * x + b`` in ``x``'s dtype: a codebook (centroids) or a dense matrix."""
    if not affine.a > 0:
        raise UnweightError(f"affine correction needs a > 0, got a = {affine.a}")
    return (x.to(torch.float64) * affine.a + affine.b).to(x.dtype)
