"""Rank-perturbation experiments on clustered weights (arXiv 2603.17917): per-layer scans of scrambled
and rank-preserving centroids, progressive layer replacement, scale drift and the affine correction."""

from unweight.study.perturb import rank_preserving, scramble
from unweight.study.rank import RankStudyConfig, run_rank_study

__all__ = ["RankStudyConfig", "rank_preserving", "run_rank_study", "scramble"]
