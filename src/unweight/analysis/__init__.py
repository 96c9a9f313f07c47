"""Per-matrix redundancy statistics: rank, entropy, outliers, and the per-model redundancy table.

Pure functions over tensors; ``unweight analyze`` streams a checkpoint through ``matrix_stats`` and
aggregates the rows with ``redundancy_table``.
"""

from unweight.analysis.entropy import (
    distribution_stats,
    exponent_entropy,
    field_entropies,
    kurtosis,
    order0_bound,
    outlier_fraction,
    split_bound,
    value_entropy,
)
from unweight.analysis.outliers import Candidate, robust_zscore, super_weight_candidates
from unweight.analysis.rank import (
    effective_rank,
    energy_rank,
    rank_stats,
    singular_values,
    spectrum_stats,
    stable_rank,
)
from unweight.analysis.table import matrix_stats, redundancy_table

__all__ = [
    "Candidate",
    "distribution_stats",
    "effective_rank",
    "energy_rank",
    "exponent_entropy",
    "field_entropies",
    "kurtosis",
    "matrix_stats",
    "order0_bound",
    "outlier_fraction",
    "rank_stats",
    "redundancy_table",
    "robust_zscore",
    "singular_values",
    "spectrum_stats",
    "split_bound",
    "stable_rank",
    "super_weight_candidates",
    "value_entropy",
]
