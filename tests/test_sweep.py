"""The compiled column sweeps of GPTQ and SparseGPT agree with the reference code's torch loops."""

import pytest
import torch

from unweight.quant.gptq import inverse_hessian_cholesky
from unweight.quant.rtn import rtn_qparams
from unweight.quant.sweep import (prune_sweep, prune_sweep_reference, quant_sweep,
                                  quant_sweep_reference)


def block(rows=48, cols=64, seed=0):
    """A block of weights and its inverse-Hessian Cholesky factor from correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    hinv, _ = inverse_hessian_cholesky((x.T @ x / 1024).double())
    return torch.randn(rows, cols, generator=g) * 0.02, hinv


def run_prune(sweep, w, hinv, keep, nm):
    W1, keep1, err = w.clone(), keep.clone(), torch.zeros_like(w)
    sweep(W1, hinv, keep1, nm, err)
    return W1, keep1, err


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_prune_sweep_matches_the_reference(nm):
    w, hinv = block()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    fast = run_prune(prune_sweep, w, hinv, keep, nm)
    ref = run_prune(prune_sweep_reference, w, hinv, keep, nm)
    assert torch.equal(fast[1], ref[1])  # the same weights pruned
    if nm is not None:
        n, m = nm
        assert (fast[1].reshape(w.shape[0], -1, m).sum(2) == n).all()
    assert (fast[0][~fast[1]] == 0).all()
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-7)


def run_quant(sweeps, scheme, extras, rows=48):
    """Each sweep's ``(W1, Q1, Err1)`` on the same 3-bit, group-16 block, swept in two segments;
    and the pruned mask and zero points."""
    w, hinv = block(rows=rows, seed=2)
    s, z = rtn_qparams(w, 3, 16, scheme)
    S1 = s.repeat_interleave(16, dim=1).contiguous()
    Z1 = z.to(torch.float32).repeat_interleave(16, dim=1).contiguous()
    g = torch.Generator().manual_seed(3)
    pruned = torch.rand(w.shape, generator=g) < 0.3 if extras and scheme != "asym_float" else None
    fixed = torch.rand(w.shape, generator=g) < 0.02 if extras else None
    orig = w.clone() if extras else None
    outs = []
    for sweep in sweeps:
        W1, Q1, err = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        sweep(W1, hinv, 0, 40, S1, Z1, 7, scheme == "asym_float", pruned, fixed, orig, Q1, err)
        sweep(W1, hinv, 40, 64, S1, Z1, 7, scheme == "asym_float", pruned, fixed, orig, Q1, err)
        outs.append((W1, Q1, err))
    return outs, pruned, Z1


@pytest.mark.parametrize("scheme", ["asym_int", "sym", "asym_float"])
@pytest.mark.parametrize("extras", [False, True])
def test_quant_sweep_matches_the_reference(scheme, extras):
    outs, pruned, Z1 = run_quant((quant_sweep, quant_sweep_reference), scheme, extras)
    (fw, fq, fe), (rw, rq, re) = outs
    assert (fq == rq).float().mean() > 0.995  # a level may flip where float rounding differs
    assert fq.min() >= 0 and fq.max() <= 7 and torch.equal(fq, fq.round())
    if pruned is not None:
        assert torch.equal(fq[pruned], Z1[pruned])
    agree = (fq == rq).all(dim=1)  # rows whose levels all agree have the same compensated weights
    assert agree.sum() > 0
    torch.testing.assert_close(fw[agree], rw[agree], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fe[agree], re[agree], rtol=1e-5, atol=1e-6)


def test_compiled_switch_off_runs_the_reference_loops(monkeypatch):
    """``sweep.COMPILED = False`` (bench/numerics_sensitivity.py) never calls a compiled kernel and
    gives exactly the reference loops' results."""
    import unweight.quant.sweep as sweep

    def refuse(*args):
        raise AssertionError("a compiled kernel ran with COMPILED off")
    monkeypatch.setattr(sweep, "COMPILED", False)
    monkeypatch.setattr(sweep, "_prune_sweep", refuse)
    monkeypatch.setattr(sweep, "_quant_sweep", refuse)
    w, hinv = block()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    pruned = [run_prune(f, w, hinv, keep, (2, 4)) for f in (prune_sweep, prune_sweep_reference)]
    assert all(torch.equal(a, b) for a, b in zip(*pruned))
    s, z = rtn_qparams(w, 3, 16, "sym")
    S1 = s.repeat_interleave(16, dim=1).contiguous()
    Z1 = z.to(torch.float32).repeat_interleave(16, dim=1).contiguous()
    quantized = []
    for f in (quant_sweep, quant_sweep_reference):
        W1, Q1, err = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        f(W1, hinv, 0, 64, S1, Z1, 7, False, None, None, None, Q1, err)
        quantized.append((W1, Q1, err))
    assert all(torch.equal(a, b) for a, b in zip(*quantized))


@pytest.fixture
def interpreted():
    """The Triton sweeps, run on the CPU by Triton's interpreter (conftest sets TRITON_INTERPRET;
    CUDA runs them compiled)."""
    sweep_triton = pytest.importorskip("unweight.quant.sweep_triton")
    if not sweep_triton.triton.knobs.runtime.interpret:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: its kernels would need a GPU")
    return sweep_triton


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_triton_prune_sweep_matches_the_compiled_one(interpreted, nm):
    w, hinv = block(rows=37, cols=96)  # rows not a multiple of the programs' 16; a block narrower than its tile
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    big = torch.zeros(128, 128, dtype=hinv.dtype).T  # column-major, as inverse_hessian_cholesky's
    big[16:112, 16:112] = hinv
    view = big[16:112, 16:112]  # a strided view, as the callers pass a block's
    tri = run_prune(interpreted.prune_sweep, w, view, keep, nm)
    fast = run_prune(prune_sweep, w, hinv, keep, nm)
    assert torch.equal(tri[1], fast[1])  # the same weights pruned
    assert (tri[0][~tri[1]] == 0).all()
    for a, b in zip(tri, fast):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scheme", ["asym_int", "sym", "asym_float"])
@pytest.mark.parametrize("extras", [False, True])
def test_triton_quant_sweep_matches_the_compiled_one(interpreted, scheme, extras):
    outs, pruned, Z1 = run_quant((interpreted.quant_sweep, quant_sweep), scheme, extras, rows=37)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    if pruned is not None:
        assert torch.equal(outs[0][1][pruned], Z1[pruned])
