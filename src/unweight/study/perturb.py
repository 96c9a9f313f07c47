"""Perturbations of a codebook with the assignments held fixed (arXiv 2603.17917, section on ranks).

A clustered matrix is a codebook of K centroids plus each weight's assignment. Holding the
assignments fixed and changing only the centroid values separates two properties of the values:

- :func:`scramble`: a random permutation of the centroid values. The multiset of values is kept
  exactly (so are its mean and variance); which cluster gets which value, the rank order, is destroyed.
- :func:`rank_preserving`: K new values drawn from a normal distribution, standardised to the
  centroids' mean and variance, and sorted into the centroids' original order. The rank order is kept
  exactly; the values themselves (and the gaps between them) are new.
- the control is the clustered matrix itself (the centroids unchanged).

``weights`` (optional, e.g. each cluster's number of members) makes the matched mean and variance
those of the decoded matrix rather than of the K values: with cluster counts, the rank-preserving
matrix has exactly the clustered matrix's mean and standard deviation, so it changes ranks-only
structure (the values' spacing) and nothing of the scale. Pure functions; centroids are 1-D.
"""

from __future__ import annotations

import torch

from unweight.errors import UnweightError


def _check(centroids: torch.Tensor) -> None:
    if centroids.ndim != 1 or centroids.numel() == 0 or not centroids.is_floating_point():
        raise UnweightError(f"perturbations take a 1-D floating-point codebook, got "
                            f"{tuple(centroids.shape)} {centroids.dtype}")


def scramble(centroids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The centroid values in a random order that differs from the original.

    Uniform over the arrangements of the values other than the original one; when all values are
    equal (or K = 1) there is nothing to scramble and a copy is returned."""
    _check(centroids)
    if centroids.numel() < 2 or bool((centroids == centroids[0]).all()):
        return centroids.clone()
    while True:
        out = centroids[torch.randperm(centroids.numel(), generator=generator)]
        if not torch.equal(out, centroids):
            return out


def _moments(x: torch.Tensor, weights: torch.Tensor | None) -> tuple[float, float]:
    """(mean, population std) of x, weighted by ``weights`` when given."""
    x = x.to(torch.float64)
    w = torch.ones_like(x) if weights is None else weights.to(torch.float64)
    total = float(w.sum())
    if total <= 0:
        raise UnweightError("rank_preserving: weights must have a positive sum")
    mean = float((w * x).sum()) / total
    return mean, (float((w * (x - mean) ** 2).sum()) / total) ** 0.5


def rank_preserving(centroids: torch.Tensor, generator: torch.Generator,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """New values, drawn normal, with the centroids' mean and variance, in the centroids' rank order.

    The i-th smallest new value goes where the i-th smallest centroid was (ties in ``centroids`` are
    ordered by position). Mean and population variance are matched exactly (up to float rounding),
    weighted by ``weights`` when given. A constant codebook is returned unchanged."""
    _check(centroids)
    if weights is not None and weights.shape != centroids.shape:
        raise UnweightError(f"rank_preserving: weights {tuple(weights.shape)} do not match the "
                            f"codebook {tuple(centroids.shape)}")
    mean, std = _moments(centroids, weights)
    if std == 0:
        return centroids.clone()
    draws = torch.randn(centroids.numel(), generator=generator, dtype=torch.float64).sort().values
    new = torch.empty_like(draws)
    new[torch.argsort(centroids, stable=True)] = draws
    d_mean, d_std = _moments(new, weights)
    if d_std == 0:  # all weight on one cluster: only the mean can be matched
        return torch.full_like(centroids, mean)
    return _strictly_ordered(((new - d_mean) / d_std * std + mean).to(centroids.dtype), centroids)


def _strictly_ordered(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` with every tie that ``like`` does not have broken upward by one ulp, in rank order."""
    order = torch.argsort(like, stable=True).tolist()
    out = values.clone()
    for prev, cur in zip(order, order[1:]):
        if like[cur] > like[prev] and out[cur] <= out[prev]:
            out[cur] = torch.nextafter(out[prev], torch.tensor(float("inf"), dtype=out.dtype))
    return out
