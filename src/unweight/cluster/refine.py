"""Refining the codebooks of a clustered model after K-means (arXiv 2603.17917, "Only relative ranks
matter in weight-clustered large language models"): centroid-only fine-tuning and the affine
correction w' = a * w_q + b, applied to the ``unweight-codebook`` parts of the encoded matrices, so
that what is refined is exactly what is stored.

Both rewrite the ``codebook`` part only: the assignments, the outliers and the header stay, so the
format and its loaders need no change. The affine map (a > 0, strictly increasing) is applied to the
centroids, ``a * c + b``, which is the same as applying it to every clustered weight and keeps their
rank order; dense-and-sparse outliers stay exact.

- :func:`finetune_parts`: the decoded matrices go into a causal LM and the centroids of those that an
  ``nn.Linear`` holds are trained (:func:`unweight.cluster.finetune.finetune_centroids`). Others (an
  embedding table) keep their K-means codebook but are decoded in the model, so the loss that is
  optimised is the stored model's.
- :func:`fit_affine`: one (a, b) per matrix against the original matrix, over the clustered
  positions (:mod:`unweight.cluster.affine`): ``moments`` matches mean and std; ``lsq`` fits the
  layer's outputs on calibration inputs through the Gram matrix X^T X, which :func:`lsq_affines`
  accumulates block by block with the calibration driver (:mod:`unweight.calibrate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from unweight.cluster.affine import Affine, apply_affine, fit_least_squares, fit_moments
from unweight.cluster.codebook import decode
from unweight.cluster.finetune import DEFAULT_LR, finetune_centroids
from unweight.cluster.runtime import clustered_from_parts
from unweight.errors import UnweightError
from unweight.formats import Parts

AFFINE_FITS = ("moments", "lsq")


def _check_kmeans(parts: Parts, name: str) -> None:
    if "codebook" not in parts:
        raise UnweightError(f"tensor {name!r}: only K-means codebooks can be refined (no codebook part)")


@torch.no_grad()
def load_decoded(model: nn.Module, parts_by_name: dict[str, Parts]) -> None:
    """Set each named parameter of ``model`` to the decode of its parts (cast to the parameter's dtype)."""
    for name, parts in parts_by_name.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            raise UnweightError(f"tensor {name!r}: the model has no parameter of that name") from None
        param.copy_(decode(parts, name).to(param.dtype))


def finetune_parts(model: nn.Module, parts_by_name: dict[str, Parts], windows: torch.Tensor, steps: int,
                   lr: float = DEFAULT_LR,
                   on_step: Callable[[int, float], None] | None = None) -> dict[str, Parts]:
    """The parts with the codebooks of the Linear-held matrices fine-tuned for ``steps`` Adam steps on
    ``windows`` (every other part, and every other matrix, as given). ``model`` is left holding the
    fine-tuned decode."""
    for name, parts in parts_by_name.items():
        _check_kmeans(parts, name)
    load_decoded(model, parts_by_name)
    held = {name: clustered_from_parts(parts, name) for name, parts in parts_by_name.items()
            if isinstance(model.get_submodule(name.removesuffix(".weight")), nn.Linear)}
    codebooks = finetune_centroids(model, held, windows, steps, lr=lr, on_step=on_step)
    return {name: {**parts, "codebook": codebooks[name].to(torch.float32).contiguous()} if name in codebooks
            else parts for name, parts in parts_by_name.items()}


def _outlier_mask(parts: Parts, numel: int) -> torch.Tensor | None:
    """Flat bool mask of the clustered positions (False at the exact outliers), or None if none."""
    idx = parts.get("outlier_idx")
    if idx is None or idx.numel() == 0:
        return None
    keep = torch.ones(numel, dtype=torch.bool)
    keep[idx.long()] = False
    return keep


def fit_affine(w: torch.Tensor, parts: Parts, name: str, fit: str = "moments",
               gram: torch.Tensor | None = None) -> Affine:
    """(a, b) for the clustered matrix ``parts`` against its original ``w``.

    ``moments`` is fitted on the clustered positions only (the outliers are exact either way). ``lsq``
    needs the whole matrix: the outliers are set to 0 in both, which leaves the fit one error it does
    not make (it charges them -b, a tiny shift on a share of at most ``AUTO_MAX_FRACTION``)."""
    _check_kmeans(parts, name)
    if fit not in AFFINE_FITS:
        raise UnweightError(f"unknown affine fit {fit!r}; choose from {', '.join(AFFINE_FITS)}")
    wq = decode(parts, name)
    keep = _outlier_mask(parts, w.numel())
    if fit == "moments":
        if keep is None:
            return fit_moments(w, wq)
        return fit_moments(w.reshape(-1)[keep], wq.reshape(-1)[keep])
    if gram is None:
        raise UnweightError(f"tensor {name!r}: the least-squares affine fit needs the inputs' Gram matrix")
    if keep is not None:
        keep = keep.view(w.shape)
        w, wq = torch.where(keep, w, 0), torch.where(keep, wq, 0)
    return fit_least_squares(w, wq, gram)


def apply_to_codebook(parts: Parts, affine: Affine, name: str = "<tensor>") -> Parts:
    """The parts with the codebook replaced by ``a * codebook + b`` (outliers untouched)."""
    _check_kmeans(parts, name)
    return {**parts, "codebook": apply_affine(parts["codebook"], affine)}


def lsq_affines(model: nn.Module, windows: torch.Tensor, parts_by_name: dict[str, Parts],
                original: Callable[[str], torch.Tensor], progress: bool = True) -> dict[str, Affine]:
    """The least-squares (a, b) of every decoder-block Linear among ``parts_by_name``, each from the
    Gram matrix of its inputs in ``model`` (the original, uncompressed model: X is what the layer saw
    before compression). ``original(name)`` gives the original matrix. Matrices outside the blocks
    (an embedding, the head) are not in the result."""
    from unweight.calibrate import decoder_layers, run_layerwise

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    affines: dict[str, Affine] = {}

    def process(index, name, linear, stats):
        full = f"{prefix}.{index}.{name}.weight"
        if full in parts_by_name:
            affines[full] = fit_affine(original(full), parts_by_name[full], full, "lsq", gram=stats.hessian.cpu())

    run_layerwise(model, windows, process, stats=("hessian",), progress=progress)
    return affines
