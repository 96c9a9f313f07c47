"""Super-weight candidates: where they are, whether they sit on a massive activation, what they do.

"The Super Weight in Large Language Models" (Yu et al., 2024, arXiv 2411.07191) finds single weights,
in MLP down-projections, whose removal destroys a model; they multiply a "super activation" (a huge
value in one intermediate channel) and write into the residual-stream channel that carries the
"massive activations" of Sun et al. ("Massive Activations in Large Language Models", 2024,
arXiv 2402.17762). This module ranks candidates by magnitude and gathers three kinds of evidence:

1. **Scale**: the robust z-score of :mod:`unweight.analysis.outliers` (|w - median| / 1.4826 MAD) and
   the weight's position: block, matrix, row (output channel), column (input channel).
2. **Activations** (calibration text): the candidate's input column's max |x| over all tokens, and its
   ratio to the median of that Linear's per-column maxima; and the residual-stream channel it reads
   (column, for Linears fed by the residual stream: q/k/v/gate/up) or writes (row, for o/down
   projections), with that channel's max |h| in ``output_hidden_states`` (the states entering the
   block for a reader, leaving it for a writer) and its ratio to the median channel. A channel is
   **massive** when its ratio is at least :data:`MASSIVE_RATIO`.
3. **Measured effect**: the calibration-slice loss increase when the candidate alone is zeroed, and
   when it alone is clipped to its matrix's robust 6-sigma bound (median +- 6 * 1.4826 MAD, the z of
   :data:`CLIP_SIGMA`), everything else intact (:class:`unweight.analysis.sensitivity.TailLoss`; for
   a sentence encoder, the cosine distance of :class:`~unweight.analysis.sensitivity.EmbeddingLoss`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from unweight.analysis.outliers import robust_scale, super_weight_candidates
from unweight.analysis.sensitivity import CalibrationStats, TailLoss

CANDIDATES_PER_MATRIX = 4
MEASURED_TOP = 6  # candidates whose effect is measured: this many overall and this many down-projections
MASSIVE_RATIO = 20.0  # channel max / median channel max from which a channel counts as massive
CLIP_SIGMA = 6.0
_BLOCK = re.compile(r"\.(\d+)\.")
_DOWN = ("down_proj", "fc2", "w2", "dense_4h_to_h", "output.dense")
_WRITERS = ("o_proj", "down_proj", "out_proj", "dense", "fc2", "w2", "c_proj")


def matrix_kind(name: str) -> str:
    """The matrix's name inside its block: ``model.layers.3.mlp.down_proj.weight`` -> ``mlp.down_proj``."""
    m = _BLOCK.search(name)
    tail = name[m.end():] if m else name
    return tail.removesuffix(".weight")


def block_index(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def is_down_projection(name: str) -> bool:
    kind = matrix_kind(name)
    return any(kind.endswith(d) for d in _DOWN) and "attention" not in kind


def find_candidates(weights: Iterable[tuple[str, torch.Tensor]],
                    per_matrix: int = CANDIDATES_PER_MATRIX) -> list[dict]:
    """The ``per_matrix`` largest robust z-scores of every 2-D weight, as rows sorted by z (largest
    first): name, block, matrix kind, row, col, value, z, the matrix's median and robust sigma."""
    rows = []
    for name, w in weights:
        if w.ndim != 2 or w.numel() == 0:
            continue
        median, sigma = robust_scale(w)
        for c in super_weight_candidates(w, per_matrix):
            rows.append({"name": name, "block": block_index(name), "matrix": matrix_kind(name),
                         "row": c.row, "col": c.col, "value": c.value, "z": c.z,
                         "median": median, "robust_sigma": sigma,
                         "down_proj": is_down_projection(name)})
    rows.sort(key=lambda r: (-r["z"], r["name"], r["row"], r["col"]))
    return rows


def select_for_measurement(candidates: list[dict], top: int = MEASURED_TOP) -> list[dict]:
    """The ``top`` candidates by z overall plus the ``top`` best down-projection ones, by z."""
    chosen = candidates[:top] + [c for c in candidates if c["down_proj"]][:top]
    seen, out = set(), []
    for c in sorted(chosen, key=lambda r: -r["z"]):
        key = (c["name"], c["row"], c["col"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _ratio(values: torch.Tensor, index: int) -> tuple[float, float]:
    median = float(values.median())
    peak = float(values[index])
    return peak, (peak / median if median > 0 else float("inf"))


def activation_evidence(c: dict, stats: CalibrationStats, shape: tuple[int, int]) -> dict:
    """Input-column and residual-channel evidence for one candidate (see the module docstring)."""
    out: dict = {}
    if c["name"] in stats.max_abs:
        out["input_max"], out["input_ratio"] = _ratio(stats.max_abs[c["name"]], c["col"])
    hidden = stats.hidden_max
    block = c["block"]
    if hidden is None or block is None:
        return out
    width = hidden.shape[1]
    writer = shape[0] == width and any(c["matrix"].endswith(w) for w in _WRITERS)
    if writer and block + 1 < hidden.shape[0] - 1:  # the last entry is after the final norm
        out["residual_channel"], out["residual_side"] = c["row"], "writes"
        out["residual_max"], out["residual_ratio"] = _ratio(hidden[block + 1], c["row"])
    elif not writer and shape[1] == width:
        out["residual_channel"], out["residual_side"] = c["col"], "reads"
        out["residual_max"], out["residual_ratio"] = _ratio(hidden[block], c["col"])
    ratios = [out.get("input_ratio"), out.get("residual_ratio")]
    out["massive"] = any(r is not None and r >= MASSIVE_RATIO for r in ratios)
    return out


def clip_bound(c: dict, sigma: float = CLIP_SIGMA) -> float:
    """The candidate's value clipped to median +- ``sigma`` robust sigmas of its matrix."""
    lo, hi = c["median"] - sigma * c["robust_sigma"], c["median"] + sigma * c["robust_sigma"]
    return min(max(c["value"], lo), hi)


def measure_effects(c: dict, tail: TailLoss) -> dict:
    """Measured loss increase (nats/token, and relative to ``tail.reference``) of zeroing, then
    clipping, the candidate (``tail``: a TailLoss, or an EmbeddingLoss for an encoder)."""
    w = tail.linears[c["name"]][1].weight.data
    out = {}
    for what, value in (("zero", 0.0), ("clip", clip_bound(c))):
        changed = w.clone()
        changed[c["row"], c["col"]] = value
        delta, se = tail.measure(c["name"], changed)
        out[f"{what}_increase"], out[f"{what}_se"] = delta, se
        out[f"{what}_relative"] = delta / tail.reference
    out["clipped_to"] = clip_bound(c)
    return out
