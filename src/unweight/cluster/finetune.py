"""Centroid-only fine-tuning of a weight-clustered model (arXiv 2603.17917, "Only relative ranks matter
in weight-clustered large language models").

Each clustered matrix is ``W = codebook[assignments]`` with the assignments frozen; only the codebook
(K values per matrix, a few thousand parameters for a whole 135M model) is trained, by Adam on the
language-modelling loss of fixed calibration windows. The paper reports that this recovers 30-40% of
the gap that clustering leaves. The parametrisation does the bookkeeping: the gradient of centroid c is
the sum of dL/dW_ij over the weights assigned to c (the backward of the gather is a scatter-add into
the codebook's bins). Dense-and-sparse outliers overwrite their positions after the gather, so they
receive no gradient and stay exact; every other parameter of the model is frozen.

The forward decodes each codebook to the matrix's original dtype (as loading does), so the loss that
is optimised is the loss of the model that will be stored; Adam's state and the codebooks stay float32.
Centroids may cross during training: the codebook rows are then no longer sorted, which the format
does not require (ranks inside a cluster never change: its members share one value).

Deterministic: windows are visited in order (step s uses window s mod n), dropout is off, and the
CPU kernels involved are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unweight.cluster.runtime import ClusteredMatrix, CodebookLinear, swap_codebook_linears
from unweight.errors import UnweightError

DEFAULT_LR = 1e-4  # Adam on centroids whose spread is ~1e-2: a few steps move them by a few percent
DEFAULT_BATCH = 1


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (``[batch, seq_len]`` token ids)."""
    device = model.get_input_embeddings().weight.device
    batch = batch.to(device)
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = DEFAULT_BATCH) -> float:
    """Mean of :func:`lm_loss` over ``windows`` in batches (each batch weighs equally)."""
    losses = [float(lm_loss(model, b)) for b in windows.split(batch_size)]
    return sum(losses) / len(losses)


def finetune_centroids(model: nn.Module, matrices: dict[str, ClusteredMatrix], windows: torch.Tensor,
                       steps: int, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH,
                       on_step: Callable[[int, float], None] | None = None) -> dict[str, torch.Tensor]:
    """Train the centroids of ``matrices`` (weight name -> :class:`ClusteredMatrix`) for ``steps``
    Adam steps on ``windows`` and return the fine-tuned codebooks (float32 ``[n_codebooks, K]``), by
    name, to be written in place of the originals (same assignments, same outliers).

    ``model`` is any causal LM whose named Linears hold the matrices (dense weights, decoded or not):
    they are swapped for :class:`CodebookLinear` during training and, on return, put back with their
    weights set to the fine-tuned decode, so ``model`` is the fine-tuned model. ``on_step(step, loss)``
    sees the loss of each step before its update.
    """
    if steps < 0:
        raise UnweightError(f"finetune_centroids: steps must be >= 0, got {steps}")
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise UnweightError(f"finetune_centroids: windows must be [n, seq_len] token ids, got {tuple(windows.shape)}")
    originals = {name: model.get_submodule(name.removesuffix(".weight")) for name in matrices}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    swap_codebook_linears(model, matrices)
    try:
        modules = {name: model.get_submodule(name.removesuffix(".weight")) for name in matrices}
        codebooks = {}
        for name, m in modules.items():
            codebook = nn.Parameter(m.codebook.detach().clone())
            del m.codebook  # the buffer becomes the trained parameter
            m.codebook = codebook
            codebooks[name] = codebook
        for p in model.parameters():
            p.requires_grad_(False)
        for p in codebooks.values():
            p.requires_grad_(True)
        model.eval()  # no dropout: the same windows give the same gradients
        optimizer = torch.optim.Adam(codebooks.values(), lr=lr)
        batches = windows.split(batch_size)
        with torch.enable_grad():
            for step in range(steps):
                optimizer.zero_grad(set_to_none=True)
                loss = lm_loss(model, batches[step % len(batches)])
                loss.backward()
                optimizer.step()
                loss = loss.detach()
                if on_step is not None:
                    on_step(step, loss.item())
        result = {name: p.detach().clone() for name, p in codebooks.items()}
        with torch.no_grad():
            decoded = {name: modules[name].weight_from_codebook() for name in matrices}
    finally:
        for name, linear in originals.items():
            module_name = name.removesuffix(".weight")
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    with torch.no_grad():
        for name, linear in originals.items():
            if isinstance(linear, nn.Linear):
                linear.weight.copy_(decoded[name].to(linear.weight.dtype))
            elif isinstance(linear, CodebookLinear):
                linear.codebook.copy_(result[name])
    return result
