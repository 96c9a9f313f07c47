"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M; pure functions ``(w, stats) -> (w, mask)``.

Masks are bool keep-masks (True = kept); see :mod:`unweight.prune.nm` for the N:M convention. The
calibration statistics come from the layer-by-layer driver (:mod:`unweight.calibrate`);
:func:`unweight.layerwise.compress_layerwise` applies these to a whole model.
"""

from unweight.prune.magnitude import magnitude_prune
from unweight.prune.nm import is_nm, lowest_mask, n_pruned, nm_mask, parse_pattern, sparsity
from unweight.prune.sparsegpt import sparsegpt_prune
from unweight.prune.wanda import wanda_prune, wanda_scores

__all__ = [
    "is_nm",
    "lowest_mask",
    "magnitude_prune",
    "n_pruned",
    "nm_mask",
    "parse_pattern",
    "sparsegpt_prune",
    "sparsity",
    "wanda_prune",
    "wanda_scores",
]
