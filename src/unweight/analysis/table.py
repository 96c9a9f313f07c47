"""The per-matrix statistics row and the per-model redundancy table built from those rows.

``matrix_stats`` is the one row ``unweight analyze`` writes for every weight; ``redundancy_table``
aggregates rows into the per-model summary (the shape of the seed article's table: parameters, mean
effective rank and its ratio). Both are pure: tensors and dicts in, dicts of plain Python values out
(JSON-ready). Definitions of every field are in the docstrings below and in the modules they come from.
"""

import math
from collections.abc import Sequence

import torch

from unweight.analysis.entropy import (
    FLOAT_LAYOUTS,
    OUTLIER_SIGMA,
    distribution_stats,
    field_entropies,
    value_entropy,
)
from unweight.analysis.outliers import robust_scale, robust_zscore
from unweight.analysis.rank import rank_stats

RANK_KEYS = (
    "full_rank",
    "effective_rank",
    "effective_rank_ratio",
    "stable_rank",
    "r90",
    "r99",
    "spectral_norm",
    "frobenius_norm",
)


def matrix_stats(name: str, w: torch.Tensor, outlier_sigma: float = OUTLIER_SIGMA) -> dict:
    """Every single-tensor statistic of ``w``, as one JSON-ready row.

    Fields:
      - ``name``, ``dtype`` (as stored, e.g. ``bfloat16``), ``shape`` (list), ``numel``.
      - Rank (2-D only, else None; see ``analysis.rank``): ``full_rank`` = min(shape),
        ``effective_rank`` (Roy & Vetterli), ``effective_rank_ratio`` = effective rank / full rank,
        ``stable_rank``, ``r90``/``r99`` (smallest rank holding 90%/99% of ||W||_F^2) and their ratios
        ``r90_ratio``/``r99_ratio`` to the full rank, ``spectral_norm``, ``frobenius_norm``.
      - Entropy in bits per weight at the stored dtype (see ``analysis.entropy``): ``value_entropy``
        H(W); for float dtypes also ``exponent_entropy`` H(E), ``order0_bound`` H(E) + H(S,M|E),
        ``split_bound`` H(E) + 1 + mantissa bits, and ``raw_bits`` (else None).
      - Shape of the distribution: ``kurtosis`` (excess; None for a constant tensor), ``outlier_fraction`` (|w - mean| >
        ``outlier_sigma`` std).
      - Robust outliers (see ``analysis.outliers``): ``median``, ``robust_sigma`` (1.4826 MAD),
        ``max_robust_z`` and its position ``max_z_row``/``max_z_col`` (row-major; a 1-D tensor is one
        row) and stored value ``max_z_value``.
    """
    w = w.detach()
    row: dict = {
        "name": name,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
        "numel": w.numel(),
    }
    if w.ndim == 2 and w.numel() > 0:
        rank = rank_stats(w)
        row.update(rank)
        full = rank["full_rank"]
        row["r90_ratio"] = rank["r90"] / full
        row["r99_ratio"] = rank["r99"] / full
    else:
        row.update(dict.fromkeys(RANK_KEYS + ("r90_ratio", "r99_ratio")))

    if w.dtype in FLOAT_LAYOUTS:
        fields = field_entropies(w)
        row["value_entropy"] = fields["order0"]
        row["exponent_entropy"] = fields["exponent"]
        row["order0_bound"] = fields["order0"]
        row["split_bound"] = fields["split"]
        row["raw_bits"] = fields["raw"]
    else:
        row["value_entropy"] = value_entropy(w)
        row.update(dict.fromkeys(("exponent_entropy", "order0_bound", "split_bound", "raw_bits")))

    excess_kurtosis, row["outlier_fraction"] = distribution_stats(w, outlier_sigma)
    row["kurtosis"] = None if math.isnan(excess_kurtosis) else excess_kurtosis  # JSON has no NaN

    row.update(dict.fromkeys(("median", "robust_sigma", "max_robust_z", "max_z_row", "max_z_col")))
    row["max_z_value"] = None
    if w.numel():
        median, sigma = robust_scale(w)
        flat = w.reshape(-1).to(torch.float32)  # exact for every float dtype but float64
        # The largest |w - median| is at the largest or the smallest entry: no z tensor needed.
        high, low = int(flat.argmax()), int(flat.argmin())
        above, below = float(flat[high]) - median, median - float(flat[low])
        index = high if above > below else low if below > above else min(high, low)
        z = robust_zscore(flat[index : index + 1], (median, sigma))
        cols = w.shape[-1] if w.ndim >= 1 else 1
        row["median"], row["robust_sigma"] = median, sigma
        row["max_robust_z"] = float(z[0])
        row["max_z_row"], row["max_z_col"] = divmod(index, cols)
        row["max_z_value"] = float(w.reshape(-1)[index])
    return row


def _mean(values: Sequence[float], weights: Sequence[float] | None = None) -> float | None:
    pairs = [(v, 1.0 if weights is None else wt) for v, wt in zip(values, weights or values)]
    pairs = [(v, wt) for v, wt in pairs if v is not None and not math.isnan(v)]
    total = sum(wt for _, wt in pairs)
    if not pairs or total <= 0:
        return None
    return math.fsum(v * wt for v, wt in pairs) / total


def redundancy_table(rows: Sequence[dict]) -> dict:
    """The per-model summary of ``matrix_stats`` rows.

    Only rows with rank statistics (2-D matrices) enter the rank means; every row enters the
    parameter counts and the entropy / outlier totals. "Weighted" means weighted by ``numel``, which
    for bits per weight or a fraction of weights is the model-wide value.

    Fields:
      - ``tensors``, ``parameters`` (all rows); ``matrices``, ``matrix_parameters`` (2-D rows).
      - ``mean_effective_rank`` (plain mean over matrices) and ``weighted_mean_effective_rank``
        (numel-weighted): the seed article's "average effective rank".
      - ``mean_effective_rank_ratio`` / ``weighted_mean_effective_rank_ratio``: effective rank / full
        rank, averaged the same two ways.
      - ``mean_stable_rank``, ``mean_stable_rank_ratio`` (stable rank / full rank).
      - ``weighted_r90_ratio``, ``weighted_r99_ratio``: numel-weighted r90 / r99 over full rank.
      - ``spectral_redundancy_99`` = 1 - ``weighted_r99_ratio``: the fraction of rank (weighted by
        parameters) that a truncated SVD can drop at 1% relative squared error per matrix. A spectral
        proxy only: the measured redundancy (weights that can be zeroed at < 1% loss increase) needs
        calibration and is reported separately.
      - ``value_entropy``, ``exponent_entropy``, ``order0_bound``, ``split_bound``, ``raw_bits``:
        numel-weighted means in bits per weight over the rows that have them.
      - ``outlier_fraction``: outliers / parameters; ``mean_kurtosis`` (plain, over matrices).
      - ``max_robust_z`` and ``max_robust_z_name``: the most extreme single weight in the model.
    """
    matrices = [r for r in rows if r.get("effective_rank") is not None]
    numel = [r["numel"] for r in matrices]
    table: dict = {
        "tensors": len(rows),
        "parameters": sum(r["numel"] for r in rows),
        "matrices": len(matrices),
        "matrix_parameters": sum(numel),
    }
    erank = [r["effective_rank"] for r in matrices]
    ratio = [r["effective_rank_ratio"] for r in matrices]
    stable_ratio = [r["stable_rank"] / r["full_rank"] for r in matrices]
    table["mean_effective_rank"] = _mean(erank)
    table["weighted_mean_effective_rank"] = _mean(erank, numel)
    table["mean_effective_rank_ratio"] = _mean(ratio)
    table["weighted_mean_effective_rank_ratio"] = _mean(ratio, numel)
    table["mean_stable_rank"] = _mean([r["stable_rank"] for r in matrices])
    table["mean_stable_rank_ratio"] = _mean(stable_ratio)
    table["weighted_r90_ratio"] = _mean([r["r90_ratio"] for r in matrices], numel)
    table["weighted_r99_ratio"] = _mean([r["r99_ratio"] for r in matrices], numel)
    r99 = table["weighted_r99_ratio"]
    table["spectral_redundancy_99"] = None if r99 is None else 1.0 - r99

    for key in ("value_entropy", "exponent_entropy", "order0_bound", "split_bound", "raw_bits"):
        having = [r for r in rows if r.get(key) is not None]
        table[key] = _mean([r[key] for r in having], [r["numel"] for r in having])
    having = [r for r in rows if r.get("outlier_fraction") is not None]
    table["outlier_fraction"] = _mean(
        [r["outlier_fraction"] for r in having], [r["numel"] for r in having]
    )
    table["mean_kurtosis"] = _mean([r.get("kurtosis") for r in matrices])
    extreme = max(rows, key=lambda r: r.get("max_robust_z") or 0.0, default=None)
    table["max_robust_z"] = extreme.get("max_robust_z") if extreme else None
    table["max_robust_z_name"] = extreme.get("name") if extreme else None
    return table
