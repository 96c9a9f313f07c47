"""The GPTQ and SparseGPT column sweeps of :mod:`unweight.quant.sweep` as Triton kernels, for CUDA.

The sweep is sequential along a block's columns but independent across its rows, so each program
holds ``BLOCK_ROWS`` rows of the block in registers and walks the columns, as the CPU kernels walk
one row: column ``i`` is rounded (GPTQ, arXiv 2210.17323) or pruned (SparseGPT, arXiv 2301.00774),
and its error times row ``i`` of the inverse Hessian's Cholesky factor is subtracted from columns
``i..B-1`` of the tile. The torch reference loop launches about a dozen kernels per column, which on
a GPU cost more than the arithmetic: on an H200 smollm2-135m's whole GPTQ took 26.6 s with it and
1.9 s with these kernels (llm-compressor, whose GPTQ sweep is a Triton kernel too, 3.2-3.7 s).

The arithmetic is the references', in float32: division rounded to nearest (``div_rn``), rounding
half to even, no fused multiply-adds (``enable_fp_fusion=False``), so results match the CPU kernels.
Imported only where Triton is installed (:func:`unweight.quant.sweep._on_cuda`); tests run the kernels
on the CPU under ``TRITON_INTERPRET=1`` (read when this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16  # rows per program: a 16 x 128 float32 tile is 16 registers per thread at 4 warps


@triton.jit
def rint(x):
    """Round half to even (libdevice's rint has no interpreter version)."""
    f = tl.floor(x)
    d = x - f
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, f + (f - 2.0 * tl.floor(f * 0.5))))


@triton.jit
def tile_of(rows, width, BP: tl.constexpr, BR: tl.constexpr):
    """This program's rows of the block: row indices, column indices, row mask, offsets, tile mask."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BP)
    rmask = r < rows
    return r, cols, rmask, r[:, None] * width + cols[None, :], rmask[:, None] & (cols[None, :] < width)


@triton.jit
def column(tile, cols, i):
    """Column ``i`` of the tile, one value per row (a sum with one nonzero term: exact)."""
    return tl.sum(tl.where(cols[None, :] == i, tile, 0.0), axis=1)


@triton.jit(do_not_specialize=["a", "b"])  # one compiled kernel for every segment
def quant(w_ptr, h_ptr, s_ptr, z_ptr, p_ptr, f_ptr, o_ptr, q_ptr, e_ptr, rows, width, a, b,
          stride_hr, stride_hc, qmax, ASYM_FLOAT: tl.constexpr, PRUNED: tl.constexpr, FIXED: tl.constexpr,
          BP: tl.constexpr, BR: tl.constexpr):
    r, cols, rmask, at, tmask = tile_of(rows, width, BP, BR)
    tile = tl.load(w_ptr + at, mask=tmask, other=0.0)
    for i in tl.range(a, b):
        w = column(tile, cols, i)
        s = tl.load(s_ptr + r * width + i, mask=rmask, other=1.0)
        z = tl.load(z_ptr + r * width + i, mask=rmask, other=0.0)
        if ASYM_FLOAT:
            q = tl.minimum(tl.maximum(rint(tl.div_rn(w - z, s)), 0.0), qmax)
            dq = z + s * q
        else:
            q = tl.minimum(tl.maximum(rint(tl.div_rn(w, s)) + z, 0.0), qmax)
            dq = s * (q - z)
        if PRUNED:  # pruned weights sit exactly on zero: the level z
            p = tl.load(p_ptr + r * width + i, mask=rmask, other=0) != 0
            q = tl.where(p, z, q)
            dq = tl.where(p, 0.0, dq)
        if FIXED:  # exact weights keep their original values
            f = tl.load(f_ptr + r * width + i, mask=rmask, other=0) != 0
            dq = tl.where(f, tl.load(o_ptr + r * width + i, mask=rmask, other=0.0), dq)
        tl.store(q_ptr + r * width + i, q, mask=rmask)
        err = tl.div_rn(w - dq, tl.load(h_ptr + i * (stride_hr + stride_hc)))
        h = tl.load(h_ptr + i * stride_hr + cols * stride_hc, mask=(cols >= i) & (cols < width), other=0.0)
        tile = tile - err[:, None] * h[None, :]
        tl.store(e_ptr + r * width + i, err, mask=rmask)
    tl.store(w_ptr + at, tile, mask=tmask)


@triton.jit
def prune(w_ptr, h_ptr, k_ptr, e_ptr, rows, width, stride_hr, stride_hc, N: tl.constexpr, M: tl.constexpr,
          BP: tl.constexpr, BR: tl.constexpr):
    r, cols, rmask, at, tmask = tile_of(rows, width, BP, BR)
    tile = tl.load(w_ptr + at, mask=tmask, other=0.0)
    keep = tl.load(k_ptr + at, mask=tmask, other=0).to(tl.int32)
    for i in tl.range(0, width):
        if M > 0:
            if i % M == 0:  # keep the N of highest saliency w^2 / U_jj^2 of these M
                for t in tl.static_range(M):
                    wt = column(tile, cols, i + t)
                    dt = tl.load(h_ptr + (i + t) * (stride_hr + stride_hc))
                    st = tl.div_rn(wt * wt, dt * dt)
                    rank = tl.zeros([BR], dtype=tl.int32)
                    for u in tl.static_range(M):  # rank in ascending order, ties: lower index first
                        wu = column(tile, cols, i + u)
                        du = tl.load(h_ptr + (i + u) * (stride_hr + stride_hc))
                        su = tl.div_rn(wu * wu, du * du)
                        rank += ((su < st) | ((su == st) & (u < t))).to(tl.int32)
                    kt = (rank >= M - N).to(tl.int32)
                    keep = tl.where(cols[None, :] == i + t, kt[:, None], keep)
        kept = tl.sum(tl.where(cols[None, :] == i, keep, 0), axis=1) != 0
        w = column(tile, cols, i)
        err = tl.where(kept, 0.0, tl.div_rn(w, tl.load(h_ptr + i * (stride_hr + stride_hc))))
        h = tl.load(h_ptr + i * stride_hr + cols * stride_hc, mask=(cols >= i) & (cols < width), other=0.0)
        tile = tile - err[:, None] * h[None, :]
        tile = tl.where((cols[None, :] == i) & ~kept[:, None], 0.0, tile)  # exactly zero
        tl.store(e_ptr + r * width + i, err, mask=rmask)
    tl.store(w_ptr + at, tile, mask=tmask)
    tl.store(k_ptr + at, keep.to(tl.int8), mask=tmask)


def _launch(kernel, rows: int, *args, **constants) -> None:
    kernel[(triton.cdiv(rows, BLOCK_ROWS),)](*args, BR=BLOCK_ROWS, enable_fp_fusion=False, **constants)


def quant_sweep(W1, Hinv1, a, b, S1, Z1, qmax, asym_float, pruned1, fixed1, orig1, Q1, Err1) -> None:
    """:func:`unweight.quant.sweep.quant_sweep`'s contract, on the tensors' device (CUDA, or the CPU
    under ``TRITON_INTERPRET=1``); the blocks must be at most 256 columns wide."""
    rows, width = W1.shape
    bp = _width(width)
    h1 = _row_major(Hinv1)
    s1, z1 = S1.contiguous(), Z1.contiguous()
    p1 = None if pruned1 is None else pruned1.contiguous().view(torch.int8)
    f1 = None if fixed1 is None else fixed1.contiguous().view(torch.int8)
    o1 = None if orig1 is None else orig1.contiguous()
    _launch(quant, rows, W1, h1, s1, z1, p1 if p1 is not None else s1, f1 if f1 is not None else s1,
            o1 if o1 is not None else s1, Q1, Err1, rows, width, a, b, *h1.stride(), float(qmax),
            ASYM_FLOAT=bool(asym_float), PRUNED=p1 is not None, FIXED=f1 is not None, BP=bp)


def prune_sweep(W1, Hinv1, keep1, nm, Err1) -> None:
    """:func:`unweight.quant.sweep.prune_sweep`'s contract, on the tensors' device (as above)."""
    rows, width = W1.shape
    n, m = nm if nm is not None else (0, 0)
    h1 = _row_major(Hinv1)
    _launch(prune, rows, W1, h1, keep1.view(torch.int8), Err1, rows, width, *h1.stride(),
            N=n, M=m, BP=_width(width))


def _row_major(hinv: torch.Tensor) -> torch.Tensor:
    """The factor's block with its rows contiguous (each column step reads one row)."""
    return hinv if hinv.stride(1) == 1 else hinv.contiguous()


def _width(width: int) -> int:
    if width > 256:
        raise ValueError(f"the Triton sweep holds at most 256 columns of a block in registers, not {width}")
    return max(16, 1 << (width - 1).bit_length())
