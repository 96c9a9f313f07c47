"""The column sweep inside one lazy block, shared by GPTQ and SparseGPT, compiled.

GPTQ (arXiv 2210.17323) and SparseGPT (arXiv 2301.00774) both visit the ``B`` columns of a block
left to right: column ``i`` is rounded or pruned to ``dq``, and its error ``(w - dq) / U_ii`` times
row ``i`` of the upper Cholesky factor ``U`` of the inverse Hessian is subtracted from the block's
columns ``i..B-1``; the columns right of the block get the whole block's errors at once afterwards
(the lazy batch update, a matrix product the callers do). Every step of the sweep acts on one row
of ``W`` at a time (the error, the update and SparseGPT's N:M choice are all per row), so the
compiled kernels here run row by row over a contiguous block, which removes the per-column
tensor-call overhead that dominated both methods on CPU (about 0.2 ms per column, 34 s of a
SparseGPT 2:4 run on smollm2-135m with 8 x 512 calibration tokens).

Each kernel has a readable torch reference (``*_reference``, the reference code's column loop), used
by the tests, which check that both agree, and for tensors that are neither on the CPU nor on a CUDA
device with Triton (whose kernels, :mod:`unweight.quant.sweep_triton`, run CUDA's sweeps).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch
from numba import njit

_HAS_TRITON = importlib.util.find_spec("triton") is not None
COMPILED = True  # False: every sweep runs its torch reference loop (bench/numerics_sensitivity.py)


@njit(inline="always")
def _axpy_tail(w, h, i, err):
    """``w[i:] -= err * h[i:]``. Unsigned indices: numba's wraparound check on signed ones kept
    LLVM from vectorising this loop (3x slower)."""
    ui = np.uint64(i)
    for j in range(w.size - i):
        k = ui + np.uint64(j)
        w[k] -= err * h[k]


# ---------------------------------------------------------------------------------------------
# pruning (SparseGPT)


@njit(cache=True, nogil=True)
def _prune_sweep(W1, Hinv1, keep1, n, m, Err1):
    rows, B = W1.shape
    sal = np.empty(max(m, 1), np.float32)
    for r in range(rows):
        w = W1[r]
        kp = keep1[r]
        for i in range(B):
            if m > 0 and i % m == 0:  # keep the n of highest saliency w^2 / U_jj^2 of these m
                for t in range(m):
                    d = Hinv1[i + t, i + t]
                    sal[t] = (w[i + t] * w[i + t]) / (d * d)
                for t in range(m):  # rank in ascending order, ties: the lower index first
                    rank = 0
                    for u in range(m):
                        if sal[u] < sal[t] or (sal[u] == sal[t] and u < t):
                            rank += 1
                    kp[i + t] = rank >= m - n
            if kp[i]:
                Err1[r, i] = 0.0
                continue
            err = w[i] / Hinv1[i, i]
            _axpy_tail(w, Hinv1[i], i, err)
            w[i] = 0.0  # exactly zero (the update leaves ~1e-9)
            Err1[r, i] = err


def prune_sweep_reference(W1, Hinv1, keep1, nm, Err1) -> None:
    """The torch column loop of the SparseGPT reference code (same contract as :func:`prune_sweep`)."""
    from unweight.prune.nm import lowest_mask
    d = torch.diag(Hinv1)
    for i in range(W1.shape[1]):
        if nm is not None and i % nm[1] == 0:
            n, m = nm
            saliency = W1[:, i:i + m].square() / d[i:i + m].square()[None, :]
            keep1[:, i:i + m] = lowest_mask(saliency, m - n, dim=1)
        err = W1[:, i].masked_fill(keep1[:, i], 0.0).div_(Hinv1[i, i])
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
        W1[:, i].masked_fill_(~keep1[:, i], 0.0)
        Err1[:, i] = err


def prune_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, keep1: torch.Tensor,
                nm: tuple[int, int] | None, Err1: torch.Tensor) -> None:
    """SparseGPT's sweep over one block, in place: ``W1`` (float32 ``[rows, B]``) is pruned and
    compensated, ``Err1`` receives the scaled errors; ``keep1`` (bool) is the block's keep-mask, read
    (unstructured) or written (``nm=(n, m)``: at every m-th column the n of highest saliency
    ``w^2 / U_jj^2`` are kept in each row, ties pruning the lower index first)."""
    if _on_cuda(W1, Hinv1, keep1, Err1):
        from unweight.quant import sweep_triton

        return sweep_triton.prune_sweep(W1, Hinv1, keep1, nm, Err1)
    if not _on_cpu(Hinv1, W1, keep1, Err1):
        return prune_sweep_reference(W1, Hinv1, keep1, nm, Err1)
    n, m = nm if nm is not None else (0, 0)
    _prune_sweep(W1.numpy(), Hinv1.contiguous().numpy(), keep1.numpy(), n, m, Err1.numpy())


# ---------------------------------------------------------------------------------------------
# quantization (GPTQ)


@njit(cache=True, nogil=True)
def _quant_sweep(W1, Hinv1, a, b, S1, Z1, qmax, asym_float, pruned1, fixed1, orig1, Q1, Err1):
    rows = W1.shape[0]
    top = np.float32(qmax)
    zero32 = np.float32(0.0)
    for r in range(rows):
        w = W1[r]
        for i in range(a, b):
            s, z, wv = S1[r, i], Z1[r, i], w[i]
            if asym_float:
                q = min(max(np.rint((wv - z) / s), zero32), top)
                dq = z + s * q
            else:
                q = min(max(np.rint(wv / s) + z, zero32), top)
                dq = s * (q - z)
            if pruned1.size and pruned1[r, i]:  # pruned weights sit exactly on zero: the level z
                q = z
                dq = zero32
            if fixed1.size and fixed1[r, i]:  # exact weights keep their original values
                dq = orig1[r, i]
            Q1[r, i] = q
            err = (wv - dq) / Hinv1[i, i]
            _axpy_tail(w, Hinv1[i], i, err)
            Err1[r, i] = err


def quant_sweep_reference(W1, Hinv1, a, b, S1, Z1, qmax, asym_float, pruned1, fixed1, orig1,
                          Q1, Err1) -> None:
    """The torch column loop of the GPTQ reference code (same contract as :func:`quant_sweep`)."""
    for i in range(a, b):
        wcol, s, z = W1[:, i], S1[:, i], Z1[:, i]
        if asym_float:
            q = torch.round((wcol - z) / s).clamp(0, qmax)
            dq = z + s * q
        else:
            q = (torch.round(wcol / s) + z).clamp(0, qmax)
            dq = s * (q - z)
        if pruned1 is not None:
            q = torch.where(pruned1[:, i], z, q)
            dq = dq.masked_fill(pruned1[:, i], 0.0)
        if fixed1 is not None:
            dq = torch.where(fixed1[:, i], orig1[:, i], dq)
        Q1[:, i] = q
        err = (wcol - dq).div_(Hinv1[i, i])
        W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
        Err1[:, i] = err


def quant_sweep(W1: torch.Tensor, Hinv1: torch.Tensor, a: int, b: int, S1: torch.Tensor,
                Z1: torch.Tensor, qmax: int, asym_float: bool, pruned1: torch.Tensor | None,
                fixed1: torch.Tensor | None, orig1: torch.Tensor | None, Q1: torch.Tensor,
                Err1: torch.Tensor) -> None:
    """GPTQ's sweep over columns ``a..b-1`` of one block, in place: each weight is rounded on its
    grid (``S1``/``Z1``: float32 ``[rows, B]`` scale and zero of its group; ``w = s * (q - z)``, or
    ``z + s * q`` with ``asym_float``), pruned ones (``pruned1``) go to the level ``z`` and 0, exact
    ones (``fixed1``) keep ``orig1``; ``Q1`` gets the levels (as floats), ``Err1`` the scaled errors,
    and ``W1``'s columns ``i..B-1`` the compensation. The arithmetic is RTN's, in float32."""
    if _on_cuda(W1, Hinv1, S1, Z1, Q1, Err1):
        from unweight.quant import sweep_triton

        return sweep_triton.quant_sweep(W1, Hinv1, a, b, S1, Z1, qmax, asym_float, pruned1, fixed1, orig1, Q1, Err1)
    if not _on_cpu(Hinv1, W1, S1, Z1, Q1, Err1):
        return quant_sweep_reference(W1, Hinv1, a, b, S1, Z1, qmax, asym_float, pruned1, fixed1,
                                     orig1, Q1, Err1)
    none_b, none_f = np.zeros((0, 0), np.bool_), np.zeros((0, 0), np.float32)
    _quant_sweep(W1.numpy(), Hinv1.contiguous().numpy(), a, b, S1.numpy(), Z1.numpy(), qmax,
                 asym_float, none_b if pruned1 is None else pruned1.contiguous().numpy(),
                 none_b if fixed1 is None else fixed1.contiguous().numpy(),
                 none_f if orig1 is None else orig1.contiguous().numpy(), Q1.numpy(), Err1.numpy())


def _on_cuda(W1: torch.Tensor, Hinv1: torch.Tensor, *written: torch.Tensor) -> bool:
    """True when the Triton kernels can run this block: compiled kernels on, CUDA tensors, Triton
    importable, float32 at most 256 columns wide, the written tensors contiguous."""
    return COMPILED and W1.is_cuda and W1.dtype == torch.float32 and W1.shape[1] <= 256 \
        and all(t.is_contiguous() for t in (W1, *written)) and _HAS_TRITON


def _on_cpu(*tensors: torch.Tensor) -> bool:
    """True when the compiled kernels are on (:data:`COMPILED`) and can work on these tensors (the
    first one of which, the inverse Hessian's block, may be a strided view; the others are written
    in place)."""
    return COMPILED and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bool) for t in tensors) \
        and all(t.is_contiguous() for t in tensors[1:])
