"""Exact 1-D K-means and codebooks: the global optimum (brute force), losslessness at K >= distinct,
monotone in K, importance is honoured, never worse than Lloyd, per-row / per-group codebooks."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight import UnweightError
from unweight.cluster import (
    cluster_tensor,
    codebook_decode,
    codebook_ids,
    kmeans_1d,
    kmeans_objective,
    n_codebooks,
    parse_granularity,
)


def brute_force(x, w, k):
    """Best objective over every split of sorted x into exactly k contiguous non-empty runs."""
    order = np.argsort(x, kind="stable")
    x, w = np.asarray(x, float)[order], np.asarray(w, float)[order]
    n = len(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        total = 0.0
        for lo, hi in zip((0, *cuts), (*cuts, n)):
            xs, ws = x[lo:hi], w[lo:hi]
            c = (ws * xs).sum() / ws.sum() if ws.sum() > 0 else xs.mean()
            total += (ws * (xs - c) ** 2).sum()
        best = min(best, total)
    return best


def lloyd(x, w, k, rng, iters=100):
    """Plain weighted Lloyd from k distinct random starting points (for comparison only)."""
    c = np.sort(rng.choice(x, size=k, replace=False))
    for _ in range(iters):
        labels = np.abs(x[:, None] - c[None, :]).argmin(1)
        new = np.array([np.average(x[labels == j], weights=w[labels == j]) if (labels == j).any()
                        else c[j] for j in range(k)])
        if np.array_equal(new, c):
            break
        c = new
    labels = np.abs(x[:, None] - c[None, :]).argmin(1)
    return float((w * (x - c[labels]) ** 2).sum())


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 10))
    x = draw(st.lists(st.floats(-100, 100, allow_nan=False, allow_subnormal=False),
                      min_size=n, max_size=n))
    w = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.01, 100)), min_size=n, max_size=n))
    k = draw(st.integers(1, 4))
    return np.array(x), np.array(w), k


@given(small_problems())
@settings(max_examples=400, deadline=None)
def test_global_optimum_matches_brute_force(case):
    x, w, k = case
    res = kmeans_1d(x, w, k)
    kk = min(k, len(x))
    assert len(res.centroids) == kk and np.all(np.diff(res.centroids) >= 0)
    assert res.labels.shape == x.shape and set(res.labels.tolist()) <= set(range(kk))
    # the reported objective is the one of the returned centroids and labels
    direct = float((w * (x - res.centroids[res.labels]) ** 2).sum())
    scale = 1e-9 * (1 + float((w * x * x).sum()))
    assert abs(direct - res.objective) <= scale
    assert res.objective <= brute_force(x, w, kk) + scale


def test_brute_force_exhaustively_on_integer_grids():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 11))
        x = rng.integers(-5, 6, size=n).astype(float)
        w = rng.integers(1, 5, size=n).astype(float)
        for k in range(1, 5):
            kk = min(k, n)
            assert kmeans_1d(x, w, k).objective == pytest.approx(brute_force(x, w, kk), abs=1e-9)


def quadratic_dp(x, w, k):
    """Reference O(k n^2) dynamic programme over sorted x (no divide and conquer, no pruning)."""
    n = len(x)
    pw, p1, p2 = (np.concatenate([[0.0], np.cumsum(a)]) for a in (w, w * x, w * x * x))

    def cost(j, i):  # points j..i inclusive
        ws = pw[i + 1] - pw[j]
        return 0.0 if ws <= 0 else max(p2[i + 1] - p2[j] - (p1[i + 1] - p1[j]) ** 2 / ws, 0.0)

    prev = np.array([cost(0, i) for i in range(n)])
    for q in range(1, min(k, n)):
        cur = np.full(n, np.inf)
        for i in range(q, n):
            cur[i] = min(prev[j - 1] + cost(j, i) for j in range(q, i + 1))
        prev = cur
    return prev[n - 1]


@pytest.mark.parametrize("seed", range(12))
def test_matches_the_quadratic_dp_on_larger_inputs(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 250))
    kind = seed % 4
    if kind == 0:
        x = rng.standard_normal(n)
    elif kind == 1:
        x = rng.standard_t(2, n)  # heavy tails: a few far outliers
    elif kind == 2:
        x = np.concatenate([rng.normal(c, 0.01, n // 5) for c in range(5)])  # tight clumps
    else:
        x = np.round(rng.standard_normal(n), 1)  # many repeats
    x = np.sort(x)
    w = rng.integers(0, 4, x.size).astype(float) if seed % 2 else rng.random(x.size)
    for k in (2, 3, 7, 16):
        exact = kmeans_1d(x, w, k).objective
        assert exact == pytest.approx(quadratic_dp(x, w, k), rel=1e-9, abs=1e-12)


def test_unsorted_input_keeps_its_order():
    res = kmeans_1d([10.0, 1.0, 11.0, 2.0], [1, 1, 1, 1], 2)
    assert res.labels.tolist() == [1, 0, 1, 0]
    assert res.centroids.tolist() == [1.5, 10.5]


def test_simple_example():
    res = kmeans_1d([1.0, 2, 3, 10, 11, 12, 50], None, 3)
    assert res.centroids.tolist() == [2.0, 11.0, 50.0]
    assert res.labels.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert res.objective == 4.0


@pytest.mark.parametrize("k", [1, 2, 3, 8, 16, 33])
def test_never_worse_than_best_of_ten_lloyd(k):
    rng = np.random.default_rng(k)
    x = np.unique(np.concatenate([rng.normal(0, 1, 300), rng.standard_t(3, 200)]))
    w = rng.integers(1, 20, size=x.size).astype(float)
    exact = kmeans_1d(x, w, k).objective
    best_lloyd = min(lloyd(x, w, k, rng) for _ in range(10))
    assert exact <= best_lloyd * (1 + 1e-12)


def test_more_clusters_never_raise_the_objective():
    w = (torch.randn(96, 130, generator=torch.Generator().manual_seed(5)) * 0.05).to(torch.bfloat16)
    for granularity in ("matrix", "row", ("group", 64)):
        previous = np.inf
        for k in range(1, 40):
            codebook, assignments = cluster_tensor(w, k, granularity=granularity)
            obj = kmeans_objective(w, codebook.double(), assignments, granularity=granularity)
            assert obj <= previous * (1 + 1e-9) + 1e-12, (granularity, k)
            previous = obj


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["matrix", "row", ("group", 48)])
def test_k_at_least_distinct_is_lossless(dtype, granularity):
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(20, 100, generator=g) * 0.1).to(dtype)
    if dtype == torch.float32:
        w = torch.round(w * 20) / 20  # few distinct float32 values
    w[0, :3] = torch.tensor([0.0, -0.0, 1e-30]).to(dtype)
    k = int(torch.unique(w).numel())
    codebook, assignments = cluster_tensor(w, k, granularity=granularity)
    assert codebook.dtype == torch.float32
    assert torch.equal(codebook_decode(codebook, assignments, granularity, dtype), w)


def test_bf16_fast_path_equals_the_generic_path():
    w = (torch.randn(300, 200, generator=torch.Generator().manual_seed(7)) * 0.02).to(torch.bfloat16)
    w[3, 4] = -0.0
    imp = torch.rand(300, 200, generator=torch.Generator().manual_seed(8))
    for importance in (None, imp):
        cb16, a16 = cluster_tensor(w, 16, importance)  # 16-bit histogram
        cb32, a32 = cluster_tensor(w.float(), 16, importance)  # torch.unique on float32
        assert torch.equal(cb16, cb32) and torch.equal(a16, a32)


def test_a_weight_with_huge_importance_is_kept():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 64, generator=g)
    importance = torch.ones_like(w)
    importance[10, 20] = 1e9
    w[10, 20] = 0.777  # inside the bulk: unweighted K=4 would pull it to a shared centroid
    plain_cb, plain_a = cluster_tensor(w, 4)
    assert abs(float(codebook_decode(plain_cb, plain_a)[10, 20]) - 0.777) > 1e-3
    codebook, assignments = cluster_tensor(w, 4, importance)
    assert abs(float(codebook_decode(codebook, assignments)[10, 20]) - 0.777) < 1e-6
    # and the weighted run is optimal for the weighted objective, the plain one for the plain
    assert kmeans_objective(w, codebook, assignments, importance) <= kmeans_objective(
        w, plain_cb, plain_a, importance)
    assert kmeans_objective(w, plain_cb, plain_a) <= kmeans_objective(w, codebook, assignments)


def test_per_column_importance_broadcasts():
    w = torch.randn(32, 16)
    col = torch.rand(16)
    a = cluster_tensor(w, 5, col)
    b = cluster_tensor(w, 5, col.expand(32, 16).contiguous())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(UnweightError):
        cluster_tensor(w, 5, torch.rand(32))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("cols,group", [(576, 128), (130, 64), (64, 64), (50, 128)])
def test_group_codebooks_are_independent_optima(cols, group, weighted):
    rows, k = 7, 6
    w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)) * 0.05)
    w = w.to(torch.bfloat16)
    imp = torch.rand(rows, cols, generator=torch.Generator().manual_seed(1)) if weighted else None
    codebook, assignments = cluster_tensor(w, k, imp, granularity=("group", group))
    assert codebook.shape[0] == n_codebooks(w.shape, ("group", group))
    n_groups = -(-cols // group)
    assert codebook.shape == (rows * n_groups, k) and assignments.shape == w.shape
    assert assignments.dtype == torch.uint8 and int(assignments.max()) < k
    ids = codebook_ids(w.shape, ("group", group))
    decoded = codebook_decode(codebook, assignments, ("group", group))
    for r in range(rows):
        for g in range(n_groups):
            cut = slice(g * group, (g + 1) * group)  # the last group is the remainder
            part = w[r, cut]
            assert (ids[r, cut] == r * n_groups + g).all()
            weight = imp[r, cut].double() if weighted else torch.ones(part.shape, dtype=torch.float64)
            best = kmeans_1d(part.float(), weight, k).objective  # repeats allowed in kmeans_1d
            err = float((weight * (decoded[r, cut].double() - part.double()) ** 2).sum())
            assert err == pytest.approx(best, rel=1e-5, abs=1e-12)


def test_row_codebooks_shape_and_objective():
    w = torch.randn(9, 40, generator=torch.Generator().manual_seed(10))
    codebook, assignments = cluster_tensor(w, 4, granularity="row")
    assert codebook.shape == (9, 4) and assignments.shape == (9, 40)
    for r in range(9):
        best = kmeans_1d(w[r], None, 4).objective
        row_err = kmeans_objective(w[r:r + 1], codebook[r:r + 1].double(), assignments[r:r + 1])
        assert row_err == pytest.approx(best, rel=1e-9)
        assert torch.all(codebook[r, 1:] >= codebook[r, :-1])


def test_padding_and_wide_codebooks():
    w = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    codebook, assignments = cluster_tensor(w, 8)
    assert codebook.tolist() == [[1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]]
    assert assignments.tolist() == [[0, 1, 1, 2]]
    big = torch.randn(30, 30)
    codebook, assignments = cluster_tensor(big, 300)
    assert assignments.dtype == torch.int32 and codebook.shape == (1, 300)
    assert torch.allclose(codebook_decode(codebook, assignments), big, atol=0.05)


def test_other_shapes_and_granularity_spelling():
    v = torch.randn(100)
    cb, a = cluster_tensor(v, 3, granularity="group:30")
    assert cb.shape == (4, 3) and a.shape == (100,)
    t = torch.randn(4, 3, 5)  # rows = 4, cols = 15
    cb, a = cluster_tensor(t, 2, granularity="row")
    assert cb.shape == (4, 2) and a.shape == t.shape
    assert parse_granularity("group:128") == parse_granularity(("group", 128)) == ("group", 128)
    for bad in ("rows", ("group", 0), "group:x", ("group", 1.5)):
        with pytest.raises(UnweightError):
            parse_granularity(bad)


def test_bad_input_raises():
    with pytest.raises(UnweightError):
        cluster_tensor(torch.tensor([[1.0, float("nan")]]), 2)
    with pytest.raises(UnweightError):
        cluster_tensor(torch.tensor([[1, 2]]), 2)
    with pytest.raises(UnweightError):
        cluster_tensor(torch.randn(3, 3), 0)
    with pytest.raises(UnweightError):
        cluster_tensor(torch.randn(3, 3), 2, -torch.ones(3, 3))
    with pytest.raises(UnweightError):
        kmeans_1d([1.0, 2.0], [1.0], 2)


def test_zero_importance_excludes_a_weight_from_the_codebook():
    """Dense-and-sparse: an outlier kept exactly elsewhere gets importance 0 and does not move the
    centroids; the codebook equals the one of the matrix without it."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(64, 64, generator=g) * 0.02).to(torch.bfloat16)
    w[5, 7] = 2.0  # a super weight, 100x the scale
    importance = torch.ones(64, 64)
    importance[5, 7] = 0.0
    codebook, assignments = cluster_tensor(w, 8, importance)
    rest = torch.cat([w.reshape(-1)[:5 * 64 + 7], w.reshape(-1)[5 * 64 + 8:]])
    expected = kmeans_1d(rest.float(), None, 8)
    assert np.allclose(codebook[0].numpy(), expected.centroids, rtol=1e-6, atol=0)
    mask = importance.bool()
    assert kmeans_objective(w[mask], codebook, assignments[mask]) == pytest.approx(
        expected.objective, rel=1e-6)
