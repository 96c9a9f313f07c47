"""Codebooks for a tensor: per-matrix (the default), per-row or per-group exact K-means.

A weight matrix is replaced by K shared values ("Only relative ranks matter in weight-clustered large
language models", arXiv 2603.17917); per-row and per-group codebooks trade more codebook bits for a
lower error. Each codebook is the exact optimum of (importance-weighted) K-means over its part of the
tensor, from :mod:`unweight.cluster.kmeans` run on that part's value histogram.

A BF16/FP16 matrix holds at most 65,536 distinct values (a few thousand for real weights): the
per-matrix histogram is one pass over the bit patterns, and a 65,536-entry table maps each pattern to
its index. Other dtypes and per-row/per-group codebooks sort each codebook's elements in numba
(threads across codebooks). Codebooks are float32: exact for every BF16/FP16/FP32 value, so when K is
at least the number of distinct values the reconstruction is exact (value-equal: -0.0 comes back as
+0.0; float64 input is clustered in float64 but its codebook is rounded to float32).

Outputs are laid out for storage (the on-disk format is not this module's business):
``codebook`` float32 ``[n_codebooks, K]``, ``assignments`` uint8 in the tensor's shape, to be packed
with :func:`unweight.pack.pack_bits` at :func:`unweight.pack.bits_needed` (K) bits.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch

from unweight.cluster.kmeans import _solve_segment
from unweight.errors import UnweightError

Granularity = str | tuple[str, int]

MAX_UINT8_K = 256  # codebooks up to this size give uint8 assignments; larger ones int32
PARALLEL_MIN_CODEBOOKS = 64  # per-row / per-group codebooks: numba threads across codebooks
_HALF_PATTERNS = 1 << 16  # distinct bit patterns of a 16-bit float
_NEG_ZERO_16 = 0x8000  # -0.0 in bf16 and fp16; folded into +0.0 so it is one histogram bin
_NON_FINITE = "cluster_tensor: tensor contains NaN or infinity"


def parse_granularity(granularity: Granularity) -> tuple[str, int]:
    """Normalise ``"matrix"``, ``"row"``, ``("group", N)`` or ``"group:N"`` to ``(kind, N)``."""
    g = granularity
    if isinstance(g, str) and g.startswith("group:"):
        try:
            g = ("group", int(g.split(":", 1)[1]))
        except ValueError:
            raise UnweightError(f"bad granularity {granularity!r}: expected group:N") from None
    if g in ("matrix", "row"):
        return (g, 0)
    if isinstance(g, tuple) and len(g) == 2 and g[0] in ("matrix", "row") and g[1] == 0:
        return g
    if (isinstance(g, tuple) and len(g) == 2 and g[0] == "group" and isinstance(g[1], int)
            and not isinstance(g[1], bool) and g[1] > 0):
        return ("group", g[1])
    raise UnweightError(f"bad granularity {granularity!r}: use 'matrix', 'row' or ('group', N)")


def codebook_ids(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> torch.Tensor:
    """Index of the codebook each element of a tensor of ``shape`` uses (int64, that shape).

    Rows are ``shape[0]``, columns everything after it flattened. ``("group", N)`` cuts each row into
    ``ceil(cols / N)`` groups of N consecutive columns, the last one holding the remainder (576
    columns at N=128: 4 groups of 128 and one of 64); codebook ``r * n_groups + g`` serves row r,
    group g.
    """
    kind, size = parse_granularity(granularity)
    rows, cols = _rows_cols(shape)
    if kind == "matrix":
        ids = torch.zeros(rows, cols, dtype=torch.int64)
    elif kind == "row":
        ids = torch.arange(rows).unsqueeze(1).expand(rows, cols)
    else:
        n_groups = -(-cols // size)
        ids = torch.arange(rows).unsqueeze(1) * n_groups + torch.arange(cols).unsqueeze(0) // size
    return ids.reshape(shape)


def n_codebooks(shape: torch.Size | tuple[int, ...], granularity: Granularity) -> int:
    """Codebooks a tensor of ``shape`` gets: 1, rows, or rows * ceil(cols / N)."""
    kind, size = parse_granularity(granularity)
    rows, cols = _rows_cols(shape)
    return 1 if kind == "matrix" else rows if kind == "row" else rows * -(-cols // size)


def cluster_tensor(w: torch.Tensor, k: int, importance: torch.Tensor | None = None,
                   granularity: Granularity = "matrix") -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ``w`` by K shared values per codebook, at the exact optimum of (weighted) K-means.

    Returns ``(codebook, assignments)``:

    - ``codebook``: float32 ``[n_codebooks, k]``, each row nondecreasing. ``n_codebooks`` is 1 for
      ``"matrix"``, ``rows`` for ``"row"``, ``rows * ceil(cols / N)`` for ``("group", N)`` (see
      :func:`codebook_ids` for the order and the remainder group). A codebook whose part of ``w``
      holds fewer than k distinct values lists them all and repeats the largest in the unused slots.
    - ``assignments``: ``w.shape``, uint8 for k <= 256 (int32 above): the index into the element's
      codebook row. :func:`codebook_decode` rebuilds the tensor.

    ``importance`` (same shape as ``w``, or broadcastable to it, e.g. ``[cols]`` for per-input-column
    activation energy) weighs each element's squared error; ``None`` weighs all elements equally.
    """
    kind, size = parse_granularity(granularity)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise UnweightError(f"cluster_tensor: expected a floating-point tensor, got "
                            f"{getattr(w, 'dtype', type(w))}")
    if w.numel() == 0:
        raise UnweightError("cluster_tensor: empty tensor")
    if k < 1:
        raise UnweightError(f"cluster_tensor: k must be >= 1, got {k}")
    w = w.detach().cpu()
    imp = None
    if importance is not None:
        try:
            imp = torch.broadcast_to(importance.detach().cpu(), w.shape).reshape(-1).to(torch.float64)
        except RuntimeError:
            raise UnweightError(f"cluster_tensor: importance of shape {tuple(importance.shape)} "
                                f"does not broadcast to the tensor's {tuple(w.shape)}") from None
        if not (torch.isfinite(imp).all() and (imp >= 0).all()):
            raise UnweightError("cluster_tensor: importance must be finite and >= 0")

    if kind == "matrix" and w.dtype in (torch.bfloat16, torch.float16):
        centroids, assignments = _cluster_16bit(w, imp, k)
    else:
        centroids, assignments = _cluster_generic(w, imp, k, kind, size)
    return torch.from_numpy(centroids).to(torch.float32), assignments.reshape(w.shape)


def codebook_decode(codebook: torch.Tensor, assignments: torch.Tensor,
                    granularity: Granularity = "matrix",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the dense tensor: each element takes its codebook's entry at its assignment."""
    kind, _ = parse_granularity(granularity)
    idx = assignments.to(torch.int64)
    if kind == "matrix":
        return codebook[0][idx].to(dtype)
    ids = codebook_ids(assignments.shape, granularity)
    return codebook.reshape(-1)[ids * codebook.shape[1] + idx].to(dtype)


def kmeans_objective(w: torch.Tensor, codebook: torch.Tensor, assignments: torch.Tensor,
                     importance: torch.Tensor | None = None,
                     granularity: Granularity = "matrix") -> float:
    """sum importance * (w - decoded)^2 in float64 (importance None: plain squared error)."""
    err = (w.to(torch.float64) - codebook_decode(codebook.to(torch.float64), assignments,
                                                 granularity, torch.float64)) ** 2
    if importance is not None:
        err = err * torch.broadcast_to(importance.to(torch.float64), w.shape)
    return float(err.sum())


# --------------------------------------------------------------------------------------------------
# Histograms, the DP, and each element's index


@numba.njit(cache=True)
def _bincount_16bit(bits, importance, counts, weights):
    """counts[p] (and weights[p], if importance is non-empty) over 16-bit patterns; -0 joins +0."""
    weighted = importance.shape[0] > 0
    for i in range(bits.shape[0]):
        b = bits[i]
        if b == _NEG_ZERO_16:
            b = 0
        counts[b] += 1
        if weighted:
            weights[b] += importance[i]


@numba.njit(cache=True)
def _lookup_16bit(bits, table, out):
    """out[i] = table[bits[i]] (-0 read as +0)."""
    for i in range(bits.shape[0]):
        b = bits[i]
        if b == _NEG_ZERO_16:
            b = 0
        out[i] = table[b]


@functools.cache
def _pattern_values(dtype: torch.dtype) -> np.ndarray:
    """float64 value of each of the 65,536 bit patterns of a 16-bit float dtype."""
    patterns = torch.arange(_HALF_PATTERNS, dtype=torch.int32).to(torch.int16)
    return patterns.view(dtype).to(torch.float64).numpy()


def _cluster_16bit(w: torch.Tensor, imp: torch.Tensor | None, k: int):
    """Matrix granularity on BF16/FP16: a bincount over the bit patterns is the histogram, and a
    65,536-entry table maps each pattern straight to its label."""
    bits = w.contiguous().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    counts = np.zeros(_HALF_PATTERNS, dtype=np.int64)
    weights = np.zeros(_HALF_PATTERNS)
    _bincount_16bit(bits, np.empty(0) if imp is None else imp.numpy(), counts, weights)
    present = np.flatnonzero(counts)
    values_all = _pattern_values(w.dtype)
    if not np.isfinite(values_all[present]).all():
        raise UnweightError(_NON_FINITE)
    present = present[np.argsort(values_all[present], kind="stable")]
    values = np.ascontiguousarray(values_all[present])
    bin_weights = counts[present].astype(np.float64) if imp is None else weights[present]
    labels = np.empty(present.shape[0], dtype=np.int32)
    centroids = np.empty((1, k))
    _solve_segment(values, np.ascontiguousarray(bin_weights), k, labels, centroids[0])
    index_dtype = np.uint8 if k <= MAX_UINT8_K else np.int32
    table = np.zeros(_HALF_PATTERNS, dtype=index_dtype)
    table[present] = labels
    out = np.empty(bits.shape[0], dtype=index_dtype)
    _lookup_16bit(bits, table, out)
    return centroids, torch.from_numpy(out)


@numba.njit(cache=True)
def _cluster_values(vals, imp, k, centroids, out):
    """Histogram of one codebook's elements (sort, merge repeats), DP, and each element's label."""
    m = vals.shape[0]
    for i in range(m):
        vals[i] += 0.0  # folds -0.0 into +0.0
    order = np.argsort(vals)
    uid = np.empty(m, dtype=np.int64)
    xs = np.empty(m)
    ws = np.zeros(m)
    weighted = imp.shape[0] > 0
    u = -1
    for t in range(m):
        i = order[t]
        if u < 0 or vals[i] != xs[u]:
            u += 1
            xs[u] = vals[i]
        uid[i] = u
        ws[u] += imp[i] if weighted else 1.0
    n = u + 1
    labels = np.empty(n, dtype=np.int32)
    objective = _solve_segment(xs[:n], ws[:n], k, labels, centroids)
    for i in range(m):
        out[i] = labels[uid[i]]
    return objective


@numba.njit(cache=True)
def _cluster_block(w, imp, group, k, s, centroids, out):
    n_groups = (w.shape[1] + group - 1) // group
    r = s // n_groups
    c0 = (s % n_groups) * group
    c1 = min(c0 + group, w.shape[1])
    vals = w[r, c0:c1].astype(np.float64)
    weights = imp[r, c0:c1].copy() if imp.shape[0] > 0 else np.empty(0)
    seg_out = out[r, c0:c1]
    return _cluster_values(vals, weights, k, centroids[s], seg_out)


@numba.njit(cache=True, parallel=True)
def _cluster_blocks_parallel(w, imp, group, k, centroids, out, objectives):
    for s in numba.prange(objectives.shape[0]):
        objectives[s] = _cluster_block(w, imp, group, k, s, centroids, out)


@numba.njit(cache=True)
def _cluster_blocks_serial(w, imp, group, k, centroids, out, objectives):
    for s in range(objectives.shape[0]):
        objectives[s] = _cluster_block(w, imp, group, k, s, centroids, out)


def _cluster_generic(w: torch.Tensor, imp: torch.Tensor | None, k: int, kind: str, size: int):
    """Any dtype and granularity: each codebook's elements are sorted and clustered in numba,
    threads across codebooks when there are many."""
    rows, cols = _rows_cols(w.shape)
    if kind == "matrix":
        rows, cols = 1, w.numel()
    group = cols if kind != "group" else min(size, cols)
    exact = torch.float64 if w.dtype == torch.float64 else torch.float32  # holds every value exactly
    w2 = w.reshape(rows, cols).to(exact).numpy()
    if not np.isfinite(w2).all():
        raise UnweightError(_NON_FINITE)
    imp2 = np.empty((0, 0)) if imp is None else imp.reshape(rows, cols).numpy()
    count = rows * (-(-cols // group))
    centroids = np.empty((count, k))
    objectives = np.empty(count)
    out = np.empty((rows, cols), dtype=np.uint8 if k <= MAX_UINT8_K else np.int32)
    run = _cluster_blocks_parallel if count >= PARALLEL_MIN_CODEBOOKS else _cluster_blocks_serial
    run(w2, imp2, group, k, centroids, out, objectives)
    return centroids, torch.from_numpy(out)


def _rows_cols(shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) < 2:  # a scalar or a vector is one row
        return 1, (shape[0] if shape else 1)
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


