"""Dense-and-sparse decomposition: keep a few weights exactly, compress the rest (SqueezeLLM, Kim et al.
2023; "The Super Weight in Large Language Models", Yu et al. 2024).

A squared-error objective cannot see that two values out of a million carry a model: per-matrix K-means
at small K pulls super weights to the nearest centroid and the model collapses. The selected weights are
stored exactly (flat int32 indices + values in the matrix's dtype), excluded from clustering (importance
0) and from rounding ranges (set to 0 before the group's range is taken), and written back on decode.

Selection (``--outliers``): an integer N takes the N weights of largest robust z-score; a fraction
(0 < f < 1) takes that share of the matrix; ``zT`` takes every weight whose robust z-score
(|w - median| / (1.4826 MAD)) is at least T, at most ``AUTO_MAX_FRACTION`` of the matrix (the cap keeps
a pathological matrix from turning dense-and-sparse into dense); ``auto`` is ``z4``.

Why 4 (measured, ``bench/outliers.py``, smollm2-135m, 4,092 evaluation tokens, base perplexity 22.0):
beyond 4 robust sigmas a Gaussian bulk holds 6e-5 of its weights, trained LLM matrices 0.2% (smollm2)
to 0.7% (gemma3): the heavy tail a few-value codebook clips. Each kept weight costs 48 bits (int32
index, bf16 value). Per-matrix K=16, perplexity by threshold (bits per weight): none 67,895 (4.002),
z20 69.9 (4.003, 86 weights: super weights only), z8 55.3 (4.005), z6 39.3 (4.014), z4 29.5 (4.093),
0.5% 27.2 (4.243); K=32: none 28.3 (5.004), z6 25.2, z4 23.6 (5.094). Returns drop after z4: its 0.09
bits take K=16 from collapse to 29.5, the next 0.15 bits (0.5%) buy 2.3 points. Super weights alone
are not enough: the tail around them matters as much.
"""

from __future__ import annotations

import torch

from unweight.analysis.outliers import robust_zscore
from unweight.errors import UnweightError

AUTO_Z = 4.0
AUTO_MAX_FRACTION = 0.01


def parse_outliers(spec: str | int | float | None) -> int | float | str | None:
    """'none'/None -> None, 'auto' -> 'auto', 'z6' -> 'z6' (robust z-score >= 6), '16' -> 16 (count),
    '0.0005' or '0.05%' -> fraction."""
    if spec is None or spec in ("none", "0", 0):
        return None
    if isinstance(spec, (int, float)):
        return spec
    s = str(spec).strip().lower()
    if s == "auto":
        return "auto"
    if s.startswith("z"):
        try:
            if float(s[1:]) > 0:
                return s
        except ValueError:
            pass
        raise UnweightError(f"--outliers z<N> takes a positive robust z-score threshold (z6); got {spec!r}")
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100
        return int(s) if s.isdigit() else float(s)
    except ValueError:
        raise UnweightError("--outliers takes none, auto, a z-score threshold (z6), a count (16) or a "
                            f"fraction (0.0005 or 0.05%); got {spec!r}")


def select_outliers(w: torch.Tensor, spec: int | float | str | None) -> torch.Tensor:
    """Flat indices (int64, sorted) of the weights to keep exactly."""
    if spec is None or w.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    z = robust_zscore(w).reshape(-1)
    if isinstance(spec, str):  # "auto" or "z<N>": every weight at or above a robust z-score, capped
        threshold = AUTO_Z if spec == "auto" else float(spec[1:])
        cap = max(1, int(AUTO_MAX_FRACTION * w.numel()))
        idx = torch.nonzero(z >= threshold).reshape(-1)
        if idx.numel() > cap:
            idx = idx[torch.topk(z[idx], cap).indices]
    else:
        n = int(spec) if isinstance(spec, int) else int(round(float(spec) * w.numel()))
        if not (0 <= n <= w.numel()) or (isinstance(spec, float) and not 0 < spec < 1):
            raise UnweightError(f"outlier selection {spec!r} is out of range for a tensor of {w.numel()} weights")
        idx = torch.topk(z, n).indices if n else torch.empty(0, dtype=torch.int64)
    return torch.sort(idx).values


def split(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w with the outliers set to 0, their values, importance mask with 0 at the outliers)."""
    flat = w.reshape(-1)
    values = flat[idx].clone()
    dense = flat.clone()
    dense[idx] = 0
    keep = torch.ones(w.numel(), dtype=torch.float32)
    keep[idx] = 0
    return dense.view(w.shape), values, keep.view(w.shape)


def restore(w: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write the kept values back (bit-exact: values are stored in the matrix's dtype)."""
    if idx.numel() == 0:
        return w
    out = w.reshape(-1).clone()
    out[idx.long()] = values.to(out.dtype)
    return out.view(w.shape)
