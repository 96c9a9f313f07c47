"""Information content and shape of a tensor's values, at the dtype it is stored in.

Entropies are empirical (plug-in) Shannon entropies, in bits per weight, of the exact bit patterns:
two weights count as the same symbol only if their stored bits are equal (+0.0 and -0.0 differ).

- ``value_entropy``: H(W) over whole bit patterns, the order-0 bound of any coder that codes each
  weight as one symbol with a fixed, free model. For FP32 (and any tensor whose values are mostly
  distinct) the plug-in estimate is capped by log2(numel) and says more about the sample size than
  about the source; a real coder would also have to store its table.
- ``exponent_entropy``: H(E) of the exponent field, the main term of the lossless bound; it is the
  part DFloat11 / ZipNN / Cloudflare's Unweight entropy-code while sign and mantissa are stored raw.
- ``order0_bound``: H(E) + H(S, M | E). By the chain rule it equals H(W): splitting the fields loses
  nothing when the mantissa is coded conditionally on the exponent. ``split_bound`` is the bound of
  the exponent-only coder, H(E) + 1 + mantissa bits; the difference between the two is what
  conditional mantissa coding could still gain.
- ``kurtosis``: excess kurtosis m4 / m2^2 - 3 (population moments), 0 for a normal distribution.
- ``outlier_fraction``: fraction of weights with |w - mean| > sigma * std (population std).
"""

import math
from dataclasses import dataclass

import torch

OUTLIER_SIGMA = 6.0


@dataclass(frozen=True)
class FloatLayout:
    """Bit fields of an IEEE-like float: 1 sign bit, then exponent, then mantissa."""

    exponent_bits: int
    mantissa_bits: int
    int_dtype: torch.dtype  # the same-width integer dtype used to view the bits

    @property
    def total_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits


FLOAT_LAYOUTS: dict[torch.dtype, FloatLayout] = {
    torch.float32: FloatLayout(8, 23, torch.int32),
    torch.bfloat16: FloatLayout(8, 7, torch.int16),
    torch.float16: FloatLayout(5, 10, torch.int16),
    torch.float8_e4m3fn: FloatLayout(4, 3, torch.uint8),
    torch.float8_e5m2: FloatLayout(5, 2, torch.uint8),
}


def float_layout(dtype: torch.dtype) -> FloatLayout:
    """The bit layout of a float dtype; ValueError for dtypes without one (ints, float64...)."""
    try:
        return FLOAT_LAYOUTS[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_LAYOUTS)
        raise ValueError(f"no float bit layout for {dtype}; supported: {supported}") from None


def _bit_patterns(w: torch.Tensor) -> torch.Tensor:
    """The stored bits of ``w``, one integer per weight: the same-width integer view of a float
    (int32 for fp32, unsigned-masked int32 for 16 and 8 bits), the values themselves for ints."""
    w = w.detach().reshape(-1)
    if not w.dtype.is_floating_point:
        return w
    if w.dtype == torch.float64:
        return w.view(torch.int64)
    layout = float_layout(w.dtype)
    if layout.total_bits == 32:
        return w.view(torch.int32)
    return w.view(layout.int_dtype).to(torch.int32) & ((1 << layout.total_bits) - 1)


def value_histogram(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(symbols, counts) of the distinct stored bit patterns of ``w``, as int64.

    For floats of 16 bits or fewer ``symbols`` is every pattern 0 .. 2^bits - 1 (counts may be 0);
    otherwise only the patterns that occur."""
    bits = _bit_patterns(w)
    layout = FLOAT_LAYOUTS.get(w.dtype)
    if layout is not None and layout.total_bits <= 16:
        alphabet = 1 << layout.total_bits
        return torch.arange(alphabet), torch.bincount(bits, minlength=alphabet)
    symbols, counts = torch.unique(bits, return_counts=True)
    return symbols.to(torch.int64), counts


def entropy_from_counts(counts: torch.Tensor) -> float:
    """Shannon entropy in bits of the distribution given by non-negative counts (zeros ignored).

    Computed as log2(N) - sum(c log2 c) / N over the counts above 1, which is exact and skips the
    singletons that make up most of an FP32 histogram."""
    counts = counts.reshape(-1).to(torch.float64)
    total = float(counts.sum())
    if total <= 0:
        return 0.0
    repeated = counts[counts > 1]
    h = math.log2(total) - float((repeated * repeated.log2()).sum()) / total
    return max(0.0, h)


def value_entropy(w: torch.Tensor) -> float:
    """H(W) in bits per weight over the exact stored bit patterns (see the module docstring)."""
    if w.numel() == 0:
        return 0.0
    return entropy_from_counts(value_histogram(w)[1])


def _exponent_counts(
    w: torch.Tensor, histogram: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Counts of each exponent value, from the value histogram when one is at hand."""
    layout = float_layout(w.dtype)
    exponent_mask = (1 << layout.exponent_bits) - 1
    if histogram is None and layout.total_bits > 16:
        bits = _bit_patterns(w)
        return torch.bincount((bits >> layout.mantissa_bits) & exponent_mask)
    symbols, counts = histogram if histogram is not None else value_histogram(w)
    exponent = (symbols >> layout.mantissa_bits) & exponent_mask
    return torch.bincount(exponent, weights=counts.to(torch.float64), minlength=exponent_mask + 1)


def exponent_entropy(w: torch.Tensor) -> float:
    """H(E) in bits per weight: entropy of the exponent field (bf16, fp16, fp32, fp8)."""
    float_layout(w.dtype)
    if w.numel() == 0:
        return 0.0
    return entropy_from_counts(_exponent_counts(w))


def field_entropies(w: torch.Tensor) -> dict:
    """The terms of the lossless bounds, in bits per weight, from one value histogram.

    Keys: ``exponent`` H(E); ``sign_mantissa_given_exponent`` H(S, M | E) = H(W) - H(E);
    ``order0`` H(E) + H(S, M | E) = H(W); ``split`` H(E) + 1 + mantissa bits (exponent coded, sign and
    mantissa raw); ``raw`` the stored width.
    """
    layout = float_layout(w.dtype)
    h_exponent = h_value = 0.0
    if w.numel():
        histogram = value_histogram(w)
        h_value = entropy_from_counts(histogram[1])
        h_exponent = entropy_from_counts(_exponent_counts(w, histogram))
    return {
        "exponent": h_exponent,
        "sign_mantissa_given_exponent": max(0.0, h_value - h_exponent),
        "order0": max(h_value, h_exponent),
        "split": h_exponent + 1 + layout.mantissa_bits,
        "raw": float(layout.total_bits),
    }


def order0_bound(w: torch.Tensor) -> float:
    """H(E) + H(S, M | E) in bits per weight; equal to ``value_entropy`` by the chain rule."""
    return field_entropies(w)["order0"]


def split_bound(w: torch.Tensor) -> float:
    """H(E) + 1 + mantissa bits: the order-0 bound of a coder that codes only the exponent."""
    return field_entropies(w)["split"]


def distribution_stats(w: torch.Tensor, sigma: float = OUTLIER_SIGMA) -> tuple[float, float]:
    """(excess kurtosis, outlier fraction) in one pass over float64 copies; see the two below."""
    if w.numel() == 0:
        return math.nan, 0.0
    x = w.detach().reshape(-1).to(torch.float64)
    centered = x - x.mean()
    squared = centered.square()
    m2 = float(squared.mean())
    if m2 <= 0:
        return math.nan, 0.0
    m4 = float(squared.square().mean())
    outliers = int((squared > sigma * sigma * m2).sum())
    return m4 / (m2 * m2) - 3.0, outliers / x.numel()


def kurtosis(w: torch.Tensor) -> float:
    """Excess kurtosis m4 / m2^2 - 3 of all entries (population moments); 0 for a normal sample.

    NaN for a constant or empty tensor."""
    return distribution_stats(w)[0]


def outlier_fraction(w: torch.Tensor, sigma: float = OUTLIER_SIGMA) -> float:
    """Fraction of entries with |w - mean| > sigma * std (population std); 0 for a constant tensor.

    A normal sample has 2e-9 of its mass beyond 6 sigma, so any measurable fraction is heavy tails."""
    return distribution_stats(w, sigma)[1]
