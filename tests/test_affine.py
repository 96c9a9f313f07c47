"""The affine correction w' = a w + b: a > 0 always, the moment fit restores the original mean and std,
applying it to a codebook equals applying it to the decoded matrix, and the least-squares fit is the
constrained optimum of the layer-output error."""

import pytest
import torch

from unweight import UnweightError
from unweight.cluster import cluster_tensor, codebook_decode
from unweight.cluster.affine import MIN_SCALE, Affine, apply_affine, fit_least_squares, fit_moments


def _clustered(seed: int = 0, shape=(48, 64), k: int = 8):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05 + 0.01
    codebook, assignments = cluster_tensor(w, k)
    return w, codebook, assignments, codebook_decode(codebook, assignments)


def _std(x):
    return float(x.double().std(correction=0))


@pytest.mark.parametrize("seed", range(5))
def test_moment_fit_matches_mean_and_std_with_positive_scale(seed):
    w, _, _, wq = _clustered(seed)
    fit = fit_moments(w, wq)
    assert fit.a > 0
    corrected = apply_affine(wq, fit)
    assert float(corrected.double().mean()) == pytest.approx(float(w.double().mean()), abs=1e-6)
    assert _std(corrected) == pytest.approx(_std(w), rel=1e-5)


def test_moment_fit_scales_kmeans_up():
    # K-means keeps the mean (centroids are cluster means) and drops the within-cluster variance.
    w, _, _, wq = _clustered(1)
    assert _std(wq) < _std(w)
    fit = fit_moments(w, wq)
    assert fit.a > 1
    assert fit.b == pytest.approx((1 - fit.a) * float(w.double().mean()), abs=1e-6)


def test_moment_fit_keeps_a_positive_for_anticorrelated_input():
    w, _, _, wq = _clustered(2)
    fit = fit_moments(w, -wq)  # the best *linear* map would flip the sign; a must stay > 0
    assert fit.a > 0


def test_constant_clustered_matrix_only_shifts():
    w = torch.randn(8, 8)
    fit = fit_moments(w, torch.full((8, 8), 3.0))
    assert fit.a == 1.0
    assert float(apply_affine(torch.full((8, 8), 3.0), fit).double().mean()) == pytest.approx(float(w.double().mean()))


def test_codebook_correction_equals_matrix_correction_and_keeps_assignments():
    w, codebook, assignments, wq = _clustered(3)
    fit = fit_moments(w, wq)
    via_codebook = codebook_decode(apply_affine(codebook, fit), assignments)
    torch.testing.assert_close(via_codebook, apply_affine(wq, fit), rtol=0, atol=1e-7)
    # a > 0: the order of the centroids (hence every weight's rank) is unchanged
    assert torch.equal(torch.argsort(apply_affine(codebook[0], fit)), torch.argsort(codebook[0]))


def test_least_squares_recovers_an_exact_affine_map():
    _, _, _, wq = _clustered(4)
    x = torch.randn(200, wq.shape[1])
    w = 1.7 * wq - 0.02
    fit = fit_least_squares(w, wq, x.T @ x)
    assert fit.a == pytest.approx(1.7, rel=1e-6)
    assert fit.b == pytest.approx(-0.02, abs=1e-7)


def _output_error(w, wq, x, fit: Affine) -> float:
    return float(((x @ w.T - x @ apply_affine(wq, fit).T).double() ** 2).sum())


@pytest.mark.parametrize("seed", range(3))
def test_least_squares_is_optimal_among_positive_scales(seed):
    w, _, _, wq = _clustered(seed)
    g = torch.Generator().manual_seed(seed + 10)
    x = torch.randn(300, w.shape[1], generator=g) * torch.rand(w.shape[1], generator=g)  # anisotropic inputs
    fit = fit_least_squares(w, wq, x.T @ x)
    assert fit.a > 0
    best = _output_error(w, wq, x, fit)
    for other in (fit_moments(w, wq), Affine(1.0, 0.0), Affine(fit.a * 1.01, fit.b), Affine(fit.a, fit.b + 1e-4)):
        assert best <= _output_error(w, wq, x, other) * (1 + 1e-9)


def test_least_squares_clamps_a_negative_optimum():
    _, _, _, wq = _clustered(5)
    x = torch.randn(100, wq.shape[1])
    fit = fit_least_squares(-wq, wq, x.T @ x)
    assert fit.a == MIN_SCALE


def test_bad_input_raises_one_clear_error():
    w = torch.randn(4, 6)
    with pytest.raises(UnweightError, match="shapes differ"):
        fit_moments(w, torch.randn(4, 5))
    with pytest.raises(UnweightError, match="gram"):
        fit_least_squares(w, w, torch.eye(4))
    with pytest.raises(UnweightError, match="a > 0"):
        apply_affine(w, Affine(-1.0, 0.0))
