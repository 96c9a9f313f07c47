"""Pruning: masks are exact (sparsity and N:M pattern), Wanda and SparseGPT match hand-computed
results, and SparseGPT's OBS updates beat Wanda and magnitude on the layer's output error."""

import pytest
import torch

from unweight import UnweightError
from unweight.prune import (is_nm, magnitude_prune, nm_mask, parse_pattern, sparsegpt_prune, sparsity,
                            wanda_prune)
from unweight.quant.awq import output_error
from unweight.quant.gptq import gptq_quantize
from unweight.quant.rtn import rtn_dequantize


def layer(rows=64, cols=256, n=2048, seed=0):
    """A weight and the calibration Hessian of correlated inputs with uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    scales = torch.rand(cols, generator=g) * 3 + 0.1
    x = (torch.randn(n, cols, generator=g) @ mix) * scales
    w = torch.randn(rows, cols, generator=g) * 0.02
    return w, x.T @ x / n, x.square().sum(0)


def methods(w, h, sq):
    return {
        "magnitude": lambda s, nm: magnitude_prune(w, s, nm),
        "wanda": lambda s, nm: wanda_prune(w, sq, s, nm),
        "sparsegpt": lambda s, nm: sparsegpt_prune(w, h, s, nm),
    }


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [0.1, 0.37, 0.5, 0.9])
def test_unstructured_sparsity_is_exact(method, target):
    w, h, sq = layer(rows=30, cols=200)
    pruned, mask = methods(w, h, sq)[method](target, None)
    zeros = (~mask).sum().item()
    if method == "wanda":  # per output row: each row loses round(s * cols)
        assert ((~mask).sum(1) == round(target * 200)).all()
    else:
        assert zeros == round(target * w.numel())
    assert (pruned[~mask] == 0).all() and sparsity(pruned) == pytest.approx(zeros / w.numel())
    if method != "sparsegpt":  # no weight update: the kept weights are untouched
        assert torch.equal(pruned[mask], w[mask])


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_pattern_is_exact(method, pattern):
    n, m = parse_pattern(pattern)
    w, h, sq = layer(rows=24, cols=128)
    pruned, mask = methods(w, h, sq)[method](0.0, (n, m))
    assert is_nm(pruned, n, m) and is_nm(mask, n, m)
    assert (mask.reshape(24, -1, m).sum(2) == n).all()  # exactly n kept per group
    assert (pruned[~mask] == 0).all()


def test_nm_mask_keeps_the_largest_and_breaks_ties_exactly():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert not is_nm(torch.ones(2, 8), 2, 4) and is_nm(torch.zeros(2, 8), 2, 4)


def test_wanda_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    sq_norm = torch.tensor([16.0, 1.0])  # ||X_0|| = 4, ||X_1|| = 1: scores [[4, 2], [12, 4]]
    pruned, mask = wanda_prune(w, sq_norm, 0.5)
    assert pruned.tolist() == [[1.0, 0.0], [3.0, 0.0]]
    assert magnitude_prune(w, 0.5)[0].tolist() == [[0.0, 0.0], [3.0, -4.0]]  # global |w| differs


def test_sparsegpt_by_hand():
    # H = [[2, 1], [1, 4]]: the upper Cholesky U of H^-1 has U00^2 = 4/7, U01 = -1/sqrt(7*4), U11^2 = 1/4.
    h = torch.tensor([[2.0, 1.0], [1.0, 4.0]])
    # saliency w^2 / U_jj^2: [1 * 7/4, 9 * 4] -> prune w0 and move its contribution onto w1:
    # the least-squares optimum w1 + w0 * H01 / H11 = 3 + 1/4.
    pruned, mask = sparsegpt_prune(torch.tensor([[1.0, 3.0]]), h, 0.5, damp=0.0)
    assert mask.tolist() == [[False, True]] and torch.allclose(pruned, torch.tensor([[0.0, 3.25]]))
    # pruning the last column updates nothing (only columns to the right are compensated)
    pruned, mask = sparsegpt_prune(torch.tensor([[3.0, 0.1]]), h, 0.5, damp=0.0)
    assert pruned.tolist() == [[3.0, 0.0]]


def test_sparsegpt_at_zero_sparsity_is_the_identity():
    w, h, _ = layer(rows=8, cols=64)
    pruned, mask = sparsegpt_prune(w, h, 0.0)
    assert mask.all() and torch.equal(pruned, w)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_has_the_lowest_output_error(nm):
    w, h, sq = layer()
    err = {name: output_error(f(0.5, nm)[0] - w, h).item() for name, f in methods(w, h, sq).items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("scheme", ["asym_int", "sym"])
def test_sparse_plus_gptq_keeps_pruned_weights_at_zero(scheme):
    w, h, _ = layer(rows=16, cols=256)
    pruned, mask = sparsegpt_prune(w, h, nm=(2, 4))
    q, scale, zero = gptq_quantize(pruned, h, 4, 128, scheme, mask=mask)
    dense = rtn_dequantize(q, scale, zero, 128, scheme)
    assert (dense[~mask] == 0).all() and is_nm(dense, 2, 4)


def test_bad_patterns_and_shapes_raise():
    for bad in ("2-4", "4:4", "0:4", "x"):
        with pytest.raises(UnweightError):
            parse_pattern(bad)
    with pytest.raises(UnweightError, match="divisible"):
        magnitude_prune(torch.randn(4, 10), nm=(2, 4))
    with pytest.raises(UnweightError, match="sparsity"):
        magnitude_prune(torch.randn(4, 8), 1.0)


def test_lowest_mask_is_a_stable_sort_with_ties():
    from unweight.prune.nm import lowest_mask
    g = torch.Generator().manual_seed(0)
    for shape, dim in [((7, 12), 1), ((7, 12), None), ((3, 5, 4), 2), ((6, 8), 0)]:
        for s in (torch.rand(shape, generator=g), torch.randint(0, 3, shape, generator=g).float()):
            s = s.clone()
            s.view(-1)[5] = float("nan")  # NaN ranks highest, as in a sort
            for k in (0, 1, 3, s.numel() if dim is None else s.shape[dim]):
                for scores in (s, torch.nan_to_num(s, nan=0.5)):
                    ref = torch.ones_like(scores, dtype=torch.bool)
                    if dim is None:
                        ref.view(-1)[torch.argsort(scores.reshape(-1), stable=True)[:k]] = False
                    else:
                        ref.scatter_(dim, torch.argsort(scores, dim=dim, stable=True).narrow(dim, 0, k), False)
                    assert torch.equal(lowest_mask(scores, k, dim), ref), (shape, dim, k)


@pytest.mark.parametrize("values", ["normal", "ties", "specials", "bf16"])
def test_the_compiled_selection_prunes_what_a_stable_sort_ranks_lowest(values):
    """Rows longer than 32 take the radix select; -0.0 ties with +0.0, NaN ranks above +inf, the
    torch reference (other devices) agrees."""
    from unweight.prune.nm import lowest_mask, lowest_mask_reference
    g = torch.Generator().manual_seed(1)
    for shape, dim in [((5, 33), 1), ((3, 1000), 1), ((40, 6), 0), ((64, 130), None)]:
        s = torch.randn(shape, generator=g)
        if values == "ties":
            s = torch.randint(0, 5, shape, generator=g).float() - 2.0
        elif values == "specials":
            s[s > 1.2] = float("nan")
            s[s < -1.3] = -float("inf")
            s[(s > 0.9) & (s <= 1.2)] = float("inf")
            s[s.abs() < 0.2] = 0.0
            s[s.abs() < 0.1] = -0.0
        elif values == "bf16":
            s = s.to(torch.bfloat16)
        n = s.numel() if dim is None else s.shape[dim]
        for k in (1, n // 3, n // 2, n - 1, n):
            order = torch.argsort(torch.nan_to_num((s if dim is not None else s.reshape(-1)).float() + 0.0,
                                                   nan=float("inf"), posinf=3e38),
                                  dim=-1 if dim is None else dim, stable=True)
            ref = torch.ones(n if dim is None else shape, dtype=torch.bool)
            ref.scatter_(-1 if dim is None else dim, order.narrow(-1 if dim is None else dim, 0, k), False)
            ref = ref.view(shape)
            assert torch.equal(lowest_mask(s, k, dim), ref), (shape, dim, k)
            flat = s.reshape(1, -1) if dim is None else s
            assert torch.equal(lowest_mask_reference(flat, k, 1 if dim is None else dim).view(shape), ref)
