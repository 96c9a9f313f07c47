"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective
Pruning Approach for Large Language Models", arXiv 2306.11695).

The score of weight W_ij is ``|W_ij| * ||X_j||_2``, the weight's magnitude times the L2 norm of its
input feature over the calibration tokens; weights are compared **per output row** (each row loses
exactly ``round(sparsity * in_features)`` weights, the paper's best comparison group), or within every
M consecutive columns for N:M. No weight update: the kept weights are unchanged.
"""

from __future__ import annotations

import torch

from unweight.prune.nm import lowest_mask, n_pruned, nm_mask


def wanda_scores(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` from the per-column sums of squares ``||X_j||^2`` (``[in_features]``)."""
    return w.detach().abs().float() * sq_norm.float().sqrt().reshape(1, -1)


def wanda_prune(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float = 0.5,
                nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned w, keep-mask)``: per-row unstructured at ``sparsity``, or N:M with ``nm=(n, m)``."""
    score = wanda_scores(w, sq_norm)
    mask = nm_mask(score, *nm) if nm else lowest_mask(score, n_pruned(w.shape[1], sparsity), dim=1)
    return w.masked_fill(~mask, 0.0), mask  # +0.0, not w * 0 (-0.0 for w < 0)
