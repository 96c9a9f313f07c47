"""Rank statistics of a weight matrix, all from one set of singular values.

- Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
  EUSIPCO 2007): with p_i = s_i / sum_j s_j, erank = exp(-sum_i p_i ln p_i). It is 1 for a rank-1
  matrix, k for k equal singular values, and min(m, n) for an orthogonal matrix.
- Stable rank (Rudelson & Vershynin 2007): ||W||_F^2 / ||W||_2^2 = sum_i s_i^2 / s_1^2, a continuous
  lower bound on the rank that ignores small singular values.
- Energy rank r(f): the smallest r whose leading r squared singular values hold a fraction f of
  ||W||_F^2; r(0.99) is the rank of the best low-rank approximation with 1% relative squared error
  (Eckart-Young).

Singular values are computed once per matrix, in float32, with ``torch.linalg.svdvals``.
"""

import math

import torch

ENERGY_FRACTIONS = (0.9, 0.99)
# Cumulative energies are compared with this relative slack, so that a spectrum whose first r values
# hold exactly the fraction (k equal values, fraction r/k) is not pushed to r + 1 by rounding.
ENERGY_RTOL = 1e-9


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """The singular values of a 2-D tensor, in float32, in descending order."""
    if w.ndim != 2:
        raise ValueError(f"singular values need a 2-D tensor, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    # Same singular values either way; LAPACK is ~1.5x faster on the tall orientation.
    return torch.linalg.svdvals(w.T if w.shape[0] < w.shape[1] else w)


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p_i = s_i / sum(s), natural log, 0 ln 0 = 0.

    0.0 for an all-zero matrix (no direction carries anything)."""
    s = s.to(torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2 = sum(s_i^2) / max(s)^2; 0.0 for an all-zero matrix."""
    s = s.to(torch.float64)
    top = s.abs().max() if s.numel() else torch.tensor(0.0)
    if top <= 0:
        return 0.0
    return float((s * s).sum() / (top * top))


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """Smallest r such that sum_{i<=r} s_i^2 >= fraction * sum_i s_i^2 (s in any order).

    0 for an all-zero matrix; ``fraction`` must lie in (0, 1]."""
    if not 0 < fraction <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    energy = torch.sort(s.to(torch.float64) ** 2, descending=True).values
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0)
    target = fraction * total * (1 - ENERGY_RTOL)
    return min(int((cumulative < target).sum()) + 1, s.numel())


def spectrum_stats(s: torch.Tensor, full_rank: int | None = None) -> dict:
    """The rank statistics of ``rank_stats`` from singular values already at hand (any device).

    ``full_rank`` defaults to the number of singular values, which is min(shape) for svdvals."""
    s = s.detach().to("cpu", torch.float32)
    full = s.numel() if full_rank is None else full_rank
    erank = effective_rank(s)
    stats = {
        "full_rank": full,
        "effective_rank": erank,
        "effective_rank_ratio": erank / full if full else 0.0,
        "stable_rank": stable_rank(s),
    }
    for fraction in ENERGY_FRACTIONS:
        stats[f"r{round(fraction * 100)}"] = energy_rank(s, fraction)
    stats["spectral_norm"] = float(s.max()) if s.numel() else 0.0
    stats["frobenius_norm"] = float(s.to(torch.float64).square().sum().sqrt())
    return stats


def rank_stats(w: torch.Tensor) -> dict:
    """All rank statistics of a 2-D ``w`` from a single SVD.

    Keys: ``full_rank`` (min of the shape), ``effective_rank``, ``effective_rank_ratio``
    (effective rank / full rank), ``stable_rank``, ``r90`` and ``r99`` (energy ranks at 0.9 and
    0.99), ``spectral_norm`` (largest singular value) and ``frobenius_norm``.
    """
    return spectrum_stats(singular_values(w), min(w.shape))
