"""Magnitude pruning: drop the weights of smallest |w| (Han et al., 2015, "Learning both Weights and
Connections for Efficient Neural Networks", arXiv 1506.02626), the data-free baseline of the Wanda and
SparseGPT papers.

Unstructured sparsity is chosen per matrix (the classic layer-wise form, the Wanda paper's baseline):
exactly ``round(sparsity * numel)`` weights are zeroed. N:M keeps the N largest |w| of every M.
"""

from __future__ import annotations

import torch

from unweight.prune.nm import lowest_mask, n_pruned, nm_mask


def magnitude_prune(w: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned w, keep-mask)``; ``nm=(n, m)`` for N:M, else unstructured at ``sparsity``."""
    score = w.detach().abs().float()
    mask = nm_mask(score, *nm) if nm else lowest_mask(score, n_pruned(w.numel(), sparsity))
    return w.masked_fill(~mask, 0.0), mask  # +0.0, not w * 0 (-0.0 for w < 0)
