"""Properties of the per-matrix statistics on tensors whose answers are known in closed form."""

import json
import math

import pytest
import torch

from unweight.analysis import (
    effective_rank,
    energy_rank,
    exponent_entropy,
    field_entropies,
    kurtosis,
    matrix_stats,
    order0_bound,
    outlier_fraction,
    rank_stats,
    redundancy_table,
    robust_zscore,
    singular_values,
    spectrum_stats,
    split_bound,
    stable_rank,
    super_weight_candidates,
    value_entropy,
)
from unweight.analysis.entropy import FLOAT_LAYOUTS
from unweight.report.table import Column, format_number, format_table

# float32 SVD of an exactly rank-k matrix leaves the other singular values at ~1e-7 of the largest;
# each adds about -p ln p ~ 2e-6 to the entropy, so a few hundred of them move exp(H) by < 1e-3.
SVD_RTOL = 1e-3


def with_spectrum(s: torch.Tensor, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (rows x r) and V (cols x r)."""
    g = torch.Generator().manual_seed(seed)
    r = s.numel()
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    return ((u * s.to(torch.float64)) @ v.T).to(torch.float32)


def geometric_erank(q: float, n: int) -> float:
    """Closed form of exp(H(p)) for p_i proportional to q^i, i = 0..n-1."""
    c = (1 - q) / (1 - q**n)
    mean_i = q / (1 - q) - n * q**n / (1 - q**n)
    return math.exp(-math.log(c) - math.log(q) * mean_i)


# --- rank -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_identity_has_full_effective_and_stable_rank(n):
    stats = rank_stats(torch.eye(n))
    assert stats["effective_rank"] == pytest.approx(n, rel=1e-9)
    assert stats["effective_rank_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert stats["stable_rank"] == pytest.approx(n, rel=1e-6)
    # n equal energies: the first r hold r/n of it, exactly on the boundary for r = 0.9 n.
    assert stats["r90"] == math.ceil(0.9 * n - 1e-9)
    assert stats["r99"] == math.ceil(0.99 * n - 1e-9)


@pytest.mark.parametrize("k", [1, 2, 5, 17, 40])
def test_rank_k_with_equal_singular_values_has_effective_rank_k(k):
    w = with_spectrum(torch.full((k,), 3.5), rows=96, cols=160, seed=k)
    stats = rank_stats(w)
    assert stats["effective_rank"] == pytest.approx(k, rel=SVD_RTOL)
    assert stats["stable_rank"] == pytest.approx(k, rel=SVD_RTOL)
    assert stats["r99"] == k
    assert stats["full_rank"] == 96


@pytest.mark.parametrize("q", [0.5, 0.9, 0.97])
def test_geometric_decay_matches_closed_form(q):
    n = 120
    s = q ** torch.arange(n, dtype=torch.float64)
    assert effective_rank(s) == pytest.approx(geometric_erank(q, n), rel=1e-12)
    w = with_spectrum(s, rows=n, cols=200)
    assert rank_stats(w)["effective_rank"] == pytest.approx(geometric_erank(q, n), rel=SVD_RTOL)
    # Stable rank of a geometric spectrum: sum q^(2i) = (1 - q^(2n)) / (1 - q^2).
    assert stable_rank(s) == pytest.approx((1 - q ** (2 * n)) / (1 - q * q), rel=1e-12)


def test_stable_rank_of_rank_one_is_one():
    g = torch.Generator().manual_seed(1)
    w = torch.outer(torch.randn(300, generator=g), torch.randn(77, generator=g))
    stats = rank_stats(w)
    assert stats["stable_rank"] == pytest.approx(1.0, rel=1e-6)
    assert stats["effective_rank"] == pytest.approx(1.0, rel=SVD_RTOL)
    assert stats["r90"] == stats["r99"] == 1


def test_energy_rank_on_known_spectra():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.6) == 1  # 9/14 = 0.643
    assert energy_rank(s, 0.9) == 2  # 13/14 = 0.929
    assert energy_rank(s, 0.93) == 3
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.tensor([1.0, 3.0, 2.0]), 0.9) == 2  # order does not matter
    assert energy_rank(torch.zeros(5), 0.9) == 0
    # four equal values: 0.75 is reached exactly at r = 3, not pushed to 4 by rounding.
    assert energy_rank(torch.full((4,), 0.1), 0.75) == 3
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_wide_and_tall_give_the_same_singular_values():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(40, 90, generator=g)
    torch.testing.assert_close(singular_values(w), singular_values(w.T))
    assert effective_rank(torch.zeros(4)) == 0.0 and stable_rank(torch.zeros(4)) == 0.0


# --- entropy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int16])
@pytest.mark.parametrize("b", [0, 1, 3, 8])
def test_value_entropy_of_equally_frequent_values_is_b_bits(dtype, b):
    values = torch.arange(1 << b, dtype=torch.float32) - (1 << (b - 1) if b else 0)
    w = values.repeat(5)[torch.randperm(5 << b, generator=torch.Generator().manual_seed(b))]
    assert value_entropy(w.to(dtype)) == pytest.approx(b, abs=1e-12)


def test_value_entropy_counts_bit_patterns_not_numbers():
    # +0.0 and -0.0 are equal numbers but different stored symbols.
    assert value_entropy(torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=torch.bfloat16)) == 1.0
    # 1/4, 1/4, 1/2: 1.5 bits.
    assert value_entropy(torch.tensor([1.0, 2.0, 3.0, 3.0])) == pytest.approx(1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_exponent_entropy_of_powers_of_two(dtype):
    g = torch.Generator().manual_seed(3)
    k = torch.arange(-4, 4).repeat(64)  # 8 exponents, equally frequent
    mantissa = 1 + torch.rand(k.numel(), generator=g) * 0.9  # in [1, 2): same exponent as 2^k
    sign = torch.where(torch.rand(k.numel(), generator=g) < 0.5, -1.0, 1.0)
    w = (sign * mantissa * torch.pow(2.0, k.float())).to(dtype)
    assert exponent_entropy(w) == pytest.approx(3.0, abs=1e-12)
    assert exponent_entropy(torch.pow(2.0, torch.arange(-4, 4).float()).to(dtype)) == pytest.approx(3.0)
    layout = FLOAT_LAYOUTS[dtype]
    assert split_bound(w) == pytest.approx(3.0 + 1 + layout.mantissa_bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_order0_bound_is_exponent_plus_conditional_sign_mantissa(dtype):
    """H(E) + H(S,M | E), with the conditional term computed directly per exponent."""
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(4000, generator=g) * 0.02).to(dtype)
    layout = FLOAT_LAYOUTS[dtype]
    bits = w.view(torch.int16).to(torch.int64) & 0xFFFF
    exponent = (bits >> layout.mantissa_bits) & ((1 << layout.exponent_bits) - 1)
    conditional = 0.0
    for e in exponent.unique():
        part = bits[exponent == e]
        conditional += part.numel() / bits.numel() * value_entropy(part)
    expected = exponent_entropy(w) + conditional
    assert order0_bound(w) == pytest.approx(expected, rel=1e-9)
    assert order0_bound(w) == pytest.approx(value_entropy(w), rel=1e-9)
    fields = field_entropies(w)
    assert fields["sign_mantissa_given_exponent"] == pytest.approx(conditional, rel=1e-9)
    assert fields["exponent"] <= fields["order0"] <= fields["split"] <= fields["raw"]


def test_exponent_entropy_rejects_integer_tensors():
    with pytest.raises(ValueError):
        exponent_entropy(torch.arange(10))


def test_kurtosis_of_known_distributions():
    # Sample excess kurtosis has standard error sqrt(24 / n) for a normal sample (0.0049 at n = 1e6);
    # five standard errors keep this seed-independent test from failing by chance (p < 1e-6).
    n = 1_000_000
    g = torch.Generator().manual_seed(5)
    tolerance = 5 * math.sqrt(24 / n)
    assert kurtosis(torch.randn(n, generator=g)) == pytest.approx(0.0, abs=tolerance)
    assert kurtosis(torch.rand(n, generator=g)) == pytest.approx(-1.2, abs=tolerance)  # uniform
    u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
    laplace = -torch.sign(u) * torch.log1p(-2 * u.abs())  # inverse CDF of Laplace(0, 1)
    assert kurtosis(laplace) == pytest.approx(3.0, abs=0.1)  # SE of a Laplace sample ~0.02 here
    assert math.isnan(kurtosis(torch.ones(10)))


def test_outlier_fraction_counts_planted_outliers():
    n = 100_000
    g = torch.Generator().manual_seed(6)
    w = torch.randn(n, generator=g)
    assert outlier_fraction(w) == 0.0  # a normal sample has 2e-9 of its mass beyond 6 sigma
    w[:10] = 20.0
    assert outlier_fraction(w) == 10 / n
    assert outlier_fraction(torch.full((8,), 3.0)) == 0.0


# --- outliers ---------------------------------------------------------------------------------


def test_robust_zscore_finds_a_planted_super_weight():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(256, 512, generator=g) * 0.02
    w[17, 301] = -0.02 * 40  # a 40-sigma weight
    w[200, 3] = 0.02 * 25
    candidates = super_weight_candidates(w, top=3)
    assert [(c.row, c.col) for c in candidates[:2]] == [(17, 301), (200, 3)]
    assert candidates[0].value == w[17, 301].item()
    # The robust scale ignores the outliers, so z is about 40 (the MAD of 131k normals is within ~1%).
    assert candidates[0].z == pytest.approx(40, rel=0.03)
    assert candidates[2].z < 6
    z = robust_zscore(w)
    assert z.shape == w.shape and int(z.argmax()) == 17 * 512 + 301


def test_robust_zscore_survives_a_mostly_zero_matrix():
    w = torch.zeros(100, 100)
    w[0, :10] = torch.linspace(-1, 1, 10)
    w[5, 5] = 50.0  # MAD is 0 here: the mean-absolute-deviation fallback takes over
    z = robust_zscore(w)
    assert torch.isfinite(z).all() and int(z.argmax()) == 5 * 100 + 5
    assert robust_zscore(torch.full((3, 3), 2.0)).eq(0).all()
    assert super_weight_candidates(torch.tensor([0.1, -5.0, 0.2, 0.0]), top=1)[0][:2] == (0, 1)


# --- rows and the table -----------------------------------------------------------------------


def test_matrix_stats_row_is_consistent():
    g = torch.Generator().manual_seed(8)
    w = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    w[3, 4] = 30.0
    row = matrix_stats("layers.0.mlp.down_proj.weight", w)
    assert row["shape"] == [64, 96] and row["numel"] == 64 * 96 and row["dtype"] == "bfloat16"
    assert row["effective_rank_ratio"] == pytest.approx(row["effective_rank"] / 64)
    assert row["r90"] <= row["r99"] <= 64 and row["r99_ratio"] == row["r99"] / 64
    assert row["value_entropy"] == row["order0_bound"]
    assert row["exponent_entropy"] <= row["value_entropy"] <= row["split_bound"] <= row["raw_bits"]
    assert (row["max_z_row"], row["max_z_col"], row["max_z_value"]) == (3, 4, 30.0)
    assert row["max_robust_z"] == pytest.approx(super_weight_candidates(w, 1)[0].z)

    vector = matrix_stats("norm.weight", torch.ones(10))
    assert vector["effective_rank"] is None and vector["value_entropy"] == 0.0
    assert vector["kurtosis"] is None  # undefined for a constant tensor; rows stay JSON-valid
    json.dumps(row, allow_nan=False)

    fp8 = matrix_stats("fp8", torch.tensor([[1.0, -2.0], [0.5, 448.0]]).to(torch.float8_e4m3fn))
    assert fp8["raw_bits"] == 8 and fp8["value_entropy"] == 2.0 and fp8["max_z_value"] == 448.0


def test_redundancy_table_weights_by_parameters():
    rows = [
        {"name": "a", "numel": 100, "effective_rank": 10.0, "effective_rank_ratio": 1.0,
         "full_rank": 10, "stable_rank": 5.0, "r90_ratio": 0.5, "r99_ratio": 1.0,
         "value_entropy": 10.0, "outlier_fraction": 0.01, "kurtosis": 1.0, "max_robust_z": 7.0},
        {"name": "b", "numel": 300, "effective_rank": 2.0, "effective_rank_ratio": 0.2,
         "full_rank": 10, "stable_rank": 1.0, "r90_ratio": 0.1, "r99_ratio": 0.2,
         "value_entropy": 6.0, "outlier_fraction": 0.0, "kurtosis": 3.0, "max_robust_z": 90.0},
        {"name": "norm", "numel": 10, "effective_rank": None, "value_entropy": 2.0,
         "outlier_fraction": 0.0, "max_robust_z": 1.0},
    ]
    table = redundancy_table(rows)
    assert table["parameters"] == 410 and table["matrix_parameters"] == 400
    assert table["tensors"] == 3 and table["matrices"] == 2
    assert table["mean_effective_rank"] == pytest.approx(6.0)
    assert table["weighted_mean_effective_rank"] == pytest.approx((1000 + 600) / 400)
    assert table["mean_effective_rank_ratio"] == pytest.approx(0.6)
    assert table["weighted_mean_effective_rank_ratio"] == pytest.approx((100 + 60) / 400)
    assert table["spectral_redundancy_99"] == pytest.approx(1 - (100 + 60) / 400)
    assert table["value_entropy"] == pytest.approx((1000 + 1800 + 20) / 410)
    assert table["outlier_fraction"] == pytest.approx(1 / 410)
    assert table["max_robust_z_name"] == "b"


def test_format_table_aligns_columns():
    rows = [
        {"name": "q_proj", "shape": [576, 576], "erank": 512.25, "z": None},
        {"name": "down_proj", "shape": [576, 1536], "erank": 3.0, "z": 1234.5},
    ]
    text = format_table(rows, ["name", "shape", Column("erank", "eff. rank", ".1f"), "z"])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "eff.", "rank", "z"]
    assert lines[2].split() == ["q_proj", "576x576", "512.2", "-"]
    assert lines[3].split() == ["down_proj", "576x1536", "3.0", "1234"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule have the same width
    assert lines[2].index("512.2") + len("512.2") == lines[3].index("3.0") + len("3.0")  # right
    assert format_number(0.000123) == "1.230e-04" and format_number(0.5) == "0.5000"


def test_spectrum_stats_matches_rank_stats():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(50, 30, generator=g)
    assert spectrum_stats(singular_values(w), 30) == rank_stats(w)
