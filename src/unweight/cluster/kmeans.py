"""Exact 1-D weighted K-means by dynamic programming over sorted distinct values.

In one dimension K-means has an exact solution: the optimal clusters are contiguous runs of the
sorted values, so a dynamic programme over the n sorted distinct values reaches the global optimum of

    sum_i w_i (x_i - c(x_i))^2

rather than a Lloyd local optimum (Ckmeans.1d.dp: Wang & Song, "Ckmeans.1d.dp: Optimal k-means
clustering in one dimension by dynamic programming", The R Journal 3(2), 2011). Each DP layer is a
row-minimum problem over a totally monotone matrix, solved here by divide and conquer in
O(n log n), O(K n log n) in all (Grønlund, Larsen, Mathiasen, Nielsen, Schneider & Song, "Fast exact
k-means, k-medians and Bregman divergence clustering in 1D", 2017), with Ckmeans.1d.dp's bound from
the previous layer and an early exit on the scan. Memory: K * n int32 for the backtrack table.
The weights w_i are counts of each distinct value or summed importances (the weighted K-means of
SqueezeLLM, Kim et al., 2023). :mod:`unweight.cluster.tensor` builds the histograms from tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import torch

from unweight.errors import UnweightError

_STACK_DEPTH = 128  # divide-and-conquer stack; depth grows as 2 log2(n), n < 2**63


class KMeans1D(NamedTuple):
    """Result of :func:`kmeans_1d` (in the order of the input values)."""

    centroids: np.ndarray  # float64 [min(k, n)], nondecreasing
    labels: np.ndarray  # int32 [n]: cluster of each input value
    objective: float  # sum_i w_i (x_i - centroids[labels_i])^2


@numba.njit(cache=True)
def _cost(p1, p2, pw, j, i):
    """Weighted sum of squares of points j..i (inclusive) around their weighted mean."""
    wsum = pw[i + 1] - pw[j]
    if wsum <= 0.0:
        return 0.0
    s1 = p1[i + 1] - p1[j]
    c = p2[i + 1] - p2[j] - s1 * s1 / wsum
    return c if c > 0.0 else 0.0


@numba.njit(cache=True)
def _layer_divide_conquer(q, first, n, prev, cur, back, p1, p2, pw, stack):
    """cur[i] = min_{q <= j <= i} prev[j-1] + cost(j, i) for i in first..n-1; back[q, i] = argmin.
    The argmin is monotone in i: solve the middle row, recurse on both halves with the column range
    cut at its argmin. O(n log n) entries. (An iterative SMAWK, O(n) entries, measured 1.3-2x slower
    here at every n from 500 to 590k, so it is not used.)"""
    stack[0, 0] = first
    stack[0, 1] = n - 1
    stack[0, 2] = q
    stack[0, 3] = n - 1
    top = 1
    while top > 0:
        top -= 1
        ilo = stack[top, 0]
        ihi = stack[top, 1]
        jlo = stack[top, 2]
        jhi = stack[top, 3]
        mid = (ilo + ihi) // 2
        jh = min(mid, jhi)
        # back[q-1, mid] <= back[q, mid]: with one cluster more the last one starts no earlier
        jl = min(max(jlo, back[q - 1, mid]), jh)
        best = np.inf
        bestj = jh
        floor = prev[jl - 1]  # prev is nondecreasing: no j >= jl has a smaller prev[j-1]
        for j in range(jh, jl - 1, -1):
            c = _cost(p1, p2, pw, j, mid)
            if c + floor >= best:
                break  # cost(j, mid) only grows as j falls
            v = prev[j - 1] + c
            if v < best:
                best = v
                bestj = j
        cur[mid] = best
        back[q, mid] = bestj
        if ilo <= mid - 1:
            stack[top, 0] = ilo
            stack[top, 1] = mid - 1
            stack[top, 2] = jlo
            stack[top, 3] = bestj
            top += 1
        if mid + 1 <= ihi:
            stack[top, 0] = mid + 1
            stack[top, 1] = ihi
            stack[top, 2] = bestj
            stack[top, 3] = jhi
            top += 1


@numba.njit(cache=True)
def _solve_segment(x, w, k, labels, centroids):
    """Optimal k-clustering of sorted x (weights w); writes labels [n] and centroids [k]; returns the
    objective. k is capped at n; unused centroid slots repeat the largest centroid."""
    n = x.shape[0]
    kk = min(k, n)
    # Prefix sums of values shifted by the median: keeps S2 - S1^2/W away from cancellation.
    shift = x[n // 2]
    p1 = np.zeros(n + 1)
    p2 = np.zeros(n + 1)
    pw = np.zeros(n + 1)
    for i in range(n):
        d = x[i] - shift
        pw[i + 1] = pw[i] + w[i]
        p1[i + 1] = p1[i] + w[i] * d
        p2[i + 1] = p2[i] + w[i] * d * d

    back = np.zeros((kk, n), dtype=np.int32)  # back[q, i]: first point of the last cluster
    prev = np.empty(n)
    cur = np.empty(n)
    for i in range(n):
        prev[i] = _cost(p1, p2, pw, 0, i)
    stack = np.empty((_STACK_DEPTH, 4), dtype=np.int64)
    for q in range(1, kk):
        # the last layer is only read at its last point
        first = n - 1 if q == kk - 1 else q
        _layer_divide_conquer(q, first, n, prev, cur, back, p1, p2, pw, stack)
        prev, cur = cur, prev

    # Backtrack; centroids and the objective are recomputed directly (no prefix-sum rounding).
    objective = 0.0
    hi = n - 1
    for q in range(kk - 1, -1, -1):
        lo = back[q, hi]
        if x[lo] == x[hi]:
            c = x[lo]
        else:
            ws = 0.0
            wx = 0.0
            for i in range(lo, hi + 1):
                ws += w[i]
                wx += w[i] * x[i]
            if ws > 0.0:
                c = wx / ws
                c = min(max(c, x[lo]), x[hi])
            else:  # only zero-weight points: any value in the run is optimal
                c = 0.5 * (x[lo] + x[hi])
        centroids[q] = c
        for i in range(lo, hi + 1):
            labels[i] = q
            d = x[i] - c
            objective += w[i] * d * d
        hi = lo - 1
    for q in range(kk, k):
        centroids[q] = centroids[kk - 1]
    return objective


def kmeans_1d(values: np.ndarray | torch.Tensor, weights: np.ndarray | torch.Tensor | None,
              k: int) -> KMeans1D:
    """Globally optimal weighted K-means of 1-D ``values`` into ``k`` clusters.

    ``values`` are typically the sorted distinct values of a tensor and ``weights`` their counts (or
    summed importances); unsorted values and repeats are accepted. ``weights=None`` means all ones.
    Weights must be finite and >= 0. If ``k`` >= the number of values, every value is its own
    centroid (objective 0) and only ``len(values)`` centroids are returned.
    """
    x = np.ascontiguousarray(_as_numpy(values), dtype=np.float64).ravel()
    n = x.shape[0]
    wt = np.ones(n) if weights is None else np.ascontiguousarray(_as_numpy(weights),
                                                                 dtype=np.float64).ravel()
    if n == 0:
        raise UnweightError("kmeans_1d: no values to cluster")
    if wt.shape[0] != n:
        raise UnweightError(f"kmeans_1d: {n} values but {wt.shape[0]} weights")
    if k < 1:
        raise UnweightError(f"kmeans_1d: k must be >= 1, got {k}")
    if not np.isfinite(x).all():
        raise UnweightError("kmeans_1d: values contain NaN or infinity")
    if not (np.isfinite(wt).all() and (wt >= 0).all()):
        raise UnweightError("kmeans_1d: weights must be finite and >= 0")
    order = None
    if n > 1 and (np.diff(x) < 0).any():
        order = np.argsort(x, kind="stable")
        x, wt = x[order], wt[order]
    kk = min(k, n)
    labels = np.empty(n, dtype=np.int32)
    centroids = np.empty(kk)
    objective = _solve_segment(x, wt, kk, labels, centroids)
    if order is not None:
        unsorted = np.empty_like(labels)
        unsorted[order] = labels
        labels = unsorted
    return KMeans1D(centroids, labels, float(objective))


def _as_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().to(torch.float64).numpy()
    return np.asarray(a)
