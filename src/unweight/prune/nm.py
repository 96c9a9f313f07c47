"""Sparsity masks: the N:M pattern (N kept in every M consecutive weights of a row) and exact top-k.

Convention, everywhere in :mod:`unweight.prune`: a mask is a bool tensor of the weight's shape, True
where the weight is **kept**. "N:M" counts kept weights, as NVIDIA's sparse tensor cores do (Mishra
et al., 2021, "Accelerating Sparse Deep Neural Networks", arXiv 2104.08378): in 2:4 each group of 4
consecutive input columns of a row keeps 2. Groups run along the input dimension (a Linear's columns),
which is what the hardware compresses, so ``in_features`` must be a multiple of M.

Masks are exact: ties are broken by position (the lower index is pruned first), never by a threshold
that can prune a few more or fewer weights than asked.
"""

from __future__ import annotations

import re

import torch

from unweight.errors import UnweightError

PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: N kept of every M, with 0 < N < M."""
    match = PATTERN.match(str(pattern))
    if not match:
        raise UnweightError(f"sparsity pattern {pattern!r}: expected N:M, e.g. 2:4 or 4:8")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise UnweightError(f"sparsity pattern {pattern!r}: need 0 < N < M")
    return n, m


def n_pruned(count: int, sparsity: float) -> int:
    """How many of ``count`` weights a ``sparsity`` prunes: ``round(sparsity * count)``."""
    if not 0.0 <= sparsity < 1.0:
        raise UnweightError(f"sparsity must lie in [0, 1), got {sparsity}")
    return int(round(sparsity * count))


def lowest_mask(scores: torch.Tensor, k: int, dim: int | None = None) -> torch.Tensor:
    """Keep-mask pruning exactly the ``k`` lowest ``scores`` (over everything, or along ``dim``)."""
    if dim is None:
        flat = scores.reshape(-1)
        mask = torch.ones_like(flat, dtype=torch.bool)
        if k > 0:
            mask[torch.argsort(flat, stable=True)[:k]] = False
        return mask.view(scores.shape)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        lowest = torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k)
        mask.scatter_(dim, lowest, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` highest ``scores`` of every ``m`` consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise UnweightError(f"N:M sparsity {n}:{m} needs in_features divisible by {m}, got {cols}")
    grouped = scores.reshape(rows, cols // m, m)
    return lowest_mask(grouped, m - n, dim=2).reshape(rows, cols)


def is_nm(mask_or_weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns holds at most ``n`` non-zeros (kept)."""
    rows, cols = mask_or_weight.shape
    if cols % m:
        return False
    nonzero = (mask_or_weight != 0).reshape(rows, cols // m, m).sum(2)
    return bool((nonzero <= n).all())


def sparsity(mask_or_weight: torch.Tensor) -> float:
    """The fraction of zeros (pruned entries)."""
    return 1.0 - (mask_or_weight != 0).sum().item() / mask_or_weight.numel()
