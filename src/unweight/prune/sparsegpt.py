"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh, 2023, "SparseGPT: Massive
Language Models Can Be Accurately Pruned in One-Shot", arXiv 2301.00774).

The columns of ``W`` are visited left to right; a pruned weight's error, scaled by the row of the upper
Cholesky factor ``U`` of the dampened inverse Hessian ``(X^T X)^-1``, is pushed onto the weights to its
right (the optimal brain surgeon update for the sequence of shrinking column sets), exactly as GPTQ
does for rounding errors (the Cholesky and dampening are GPTQ's: :func:`inverse_hessian_cholesky`).
Which weights to prune is decided lazily, as in the paper's adaptive mask selection:

- unstructured: at the start of each block of ``block_size`` columns, by the OBS saliency
  ``w^2 / U_jj^2`` over the whole block (all rows); the count per block is allocated so that the
  matrix ends with exactly ``round(sparsity * numel)`` zeros;
- N:M: at the start of every M columns, the ``M - N`` of least saliency in each row.

The kept weights of later columns change (the point of the method); pruned ones are exactly zero.
"""

from __future__ import annotations

import torch

from unweight.prune.nm import lowest_mask, n_pruned
from unweight.quant.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, inverse_hessian_cholesky
from unweight.quant.sweep import prune_sweep
from unweight.errors import UnweightError


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, sparsity: float = 0.5,
                    nm: tuple[int, int] | None = None, damp: float = DEFAULT_DAMP,
                    block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pruned and updated w, keep-mask)``; ``nm=(n, m)`` keeps n of every m, else unstructured."""
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise UnweightError(f"SparseGPT: Hessian {tuple(hessian.shape)} does not match weight {tuple(w.shape)}")
    if nm is not None:
        n, m = nm
        if cols % m or block_size % m:
            raise UnweightError(f"N:M {n}:{m} needs in_features ({cols}) and the block size "
                                f"({block_size}) divisible by {m}")
    W = w.detach().to(torch.float32).clone()
    hinv, dead = inverse_hessian_cholesky(hessian.detach().to(W.device), damp)
    W[:, dead] = 0.0  # inputs that never fire
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    pruned_so_far = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        if nm is None:
            k = n_pruned(rows * i2, sparsity) - pruned_so_far  # cumulative: exact in total
            keep1 = lowest_mask(W1.square() / torch.diag(Hinv1).square()[None, :], k)
            pruned_so_far += k
        else:  # chosen by the sweep, every m columns
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        prune_sweep(W1, Hinv1, keep1, nm, Err1)
        keep[:, i1:i2] = keep1
        W[:, i1:i2] = W1
        W[:, i2:].addmm_(Err1, hinv[i1:i2, i2:], alpha=-1.0)
    return W.to(w.dtype), keep
