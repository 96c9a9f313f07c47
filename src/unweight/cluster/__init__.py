"""Weight clustering: exact 1-D K-means codebooks per matrix, row or group (arXiv 2603.17917)."""

from unweight.cluster.tensor import (
    Granularity,
    cluster_tensor,
    codebook_decode,
    codebook_ids,
    kmeans_objective,
    n_codebooks,
    parse_granularity,
)
from unweight.cluster.kmeans import KMeans1D, kmeans_1d

__all__ = [
    "Granularity",
    "KMeans1D",
    "cluster_tensor",
    "codebook_decode",
    "codebook_ids",
    "kmeans_1d",
    "kmeans_objective",
    "n_codebooks",
    "parse_granularity",
]
