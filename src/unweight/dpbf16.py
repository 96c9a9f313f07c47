"""``X^T X`` (upper) of a bf16 ``X``, summed in float32 by AVX512-BF16's ``vdpbf16ps``.

A layer's calibration inputs arrive in bf16 when the model runs in bf16. Their products are exact in
float32 (8-bit significands), so the Gram matrix only needs float32 sums; torch has no bf16-in,
float32-out product on the CPU, and BLAS's ``ssyrk`` needs a float32 copy and runs at float32 speed.
``vdpbf16ps`` adds two bf16 products to each of sixteen float32 sums per instruction, twice float32's
rate. Two tokens' values of a column are paired into one 32-bit word (``Y = X`` viewed as
``[tokens/2, 2, d]``, transposed to ``[tokens/2, d, 2]``), so one instruction multiplies a broadcast
pair ``(x[2p, i], x[2p+1, i])`` by sixteen columns' pairs. A tile of ``R`` rows by 64 columns keeps its
``4 R`` sums in registers over a block of :data:`PAIRS_PER_BLOCK` pairs, then adds them to the
accumulator: short chains of sums keep the rounding error at or below ``ssyrk``'s.

Measured (``bench/gram_speed.py``, one thread, 4,096 tokens, AMD EPYC Zen 4, against ``ssyrk`` with the
float32 copy it needs; ``docs/results/gram-speed.json``): 1.51-1.71x at 576-2,048 columns (12.0 against
18.2 ms at 576, 66.3 against 108.8 at 1,536); largest error against float64, relative to the largest
entry, 3.4-3.7e-7 (``ssyrk`` 9.1e-7-1.0e-6). ``vdpbf16ps`` treats bf16 subnormals (below 1.2e-38) as
zero.

The instruction is emitted as inline assembly in the loop's LLVM IR; :func:`available` says whether
this CPU has AVX512-BF16 and numba compiles for it, and :func:`rows_for` whether a tile fits the width.
"""

from __future__ import annotations

import functools
import sys

import llvmlite.binding as llvm
import numba
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from unweight.jit_cache import source_stamp

PAIRS_PER_BLOCK = 128  # token pairs per block of sums in registers (2,048: 1.2x ssyrk, error 6.9e-6)
COLS = 64  # columns per tile: four 16-lane vectors

_I32, _I64 = ir.IntType(32), ir.IntType(64)
_V16I, _V16F = ir.VectorType(_I32, 16), ir.VectorType(ir.FloatType(), 16)


def _array_data(context, builder, ty, val):
    """The data pointer of a numba array argument (as ``unweight.lossless.simd.array_data``, not imported
    from there: that would load the lossless package, 35-55 ms, into every calibration)."""
    return context.make_array(ty)(context, builder, val).data


@functools.cache
def available() -> bool:
    """Whether this machine has AVX512-BF16 and numba compiles for it."""
    return (numba.config.CPU_NAME in (None, "host") and numba.config.CPU_FEATURES is None
            and bool(llvm.get_host_cpu_features().get("avx512bf16", False)))


def _make_tile(rows: int):
    """The kernel for one tile of sums of pair products, ``c[ic + r, jc + j] += sum over pairs p in
    [p0, p1) of a[p, ia + r] . b[p, jb + j]`` for ``r < rows``, ``j < 64``: ``a`` and ``b`` are flat
    int32 views of paired bf16 values (row ``p`` of ``a`` at ``p * lda``, of ``b`` at ``p * ldb``), ``c``
    flat float32 with rows of ``ldc``; ``.`` is the two-product dot of ``vdpbf16ps``. The Gram matrix
    passes one matrix as both operands; ``unweight.cpu_attention`` passes two."""
    nvec = COLS // 16

    @intrinsic
    def tile(typingctx, a, b, c, ia, jb, ic, jc, p0, p1, lda, ldb, ldc):
        i64 = types.int64
        sig = types.void(a, b, c, i64, i64, i64, i64, i64, i64, i64, i64, i64)

        def codegen(context, builder, signature, args):
            a_a, b_a, c_a, iav, jbv, icv, jcv, p0v, p1v, ldav, ldbv, ldcv = args
            bld = builder
            abase = _array_data(context, bld, signature.args[0], a_a)
            bbase = _array_data(context, bld, signature.args[1], b_a)
            cbase = _array_data(context, bld, signature.args[2], c_a)
            ptrs = []
            for r in range(rows):
                row = bld.mul(bld.add(icv, ir.Constant(_I64, r)), ldcv)
                for v in range(nvec):
                    off = bld.add(row, bld.add(jcv, ir.Constant(_I64, 16 * v)))
                    ptrs.append(bld.bitcast(bld.gep(cbase, [off]), _V16F.as_pointer()))
            dot = ir.InlineAsm(ir.FunctionType(_V16F, [_V16F, _V16I, _V16I]), "vdpbf16ps $3, $2, $0", "=v,0,v,v")
            entry = bld.block
            head, body, done = (bld.append_basic_block(n) for n in ("pairs.head", "pairs.body", "pairs.done"))
            bld.branch(head)
            bld.position_at_end(head)
            p = bld.phi(_I64)
            p.add_incoming(p0v, entry)
            sums = []
            for _ in ptrs:
                s = bld.phi(_V16F)
                s.add_incoming(ir.Constant(_V16F, [0.0] * 16), entry)
                sums.append(s)
            bld.cbranch(bld.icmp_signed("<", p, p1v), body, done)
            bld.position_at_end(body)
            brow, arow = bld.mul(p, ldbv), bld.mul(p, ldav)
            cols = [bld.load(bld.bitcast(bld.gep(bbase, [bld.add(brow, bld.add(jbv, ir.Constant(_I64, 16 * v)))]),
                                         _V16I.as_pointer()), align=4) for v in range(nvec)]
            nxt = []
            for r in range(rows):
                pair = bld.load(bld.gep(abase, [bld.add(arow, bld.add(iav, ir.Constant(_I64, r)))]))
                splat = bld.shuffle_vector(
                    bld.insert_element(ir.Constant(_V16I, ir.Undefined), pair, ir.Constant(_I32, 0)),
                    ir.Constant(_V16I, ir.Undefined), ir.Constant(_V16I, [0] * 16))
                nxt += [bld.call(dot, [sums[r * nvec + v], splat, cols[v]]) for v in range(nvec)]
            p.add_incoming(bld.add(p, ir.Constant(_I64, 1)), bld.block)
            for s, n in zip(sums, nxt):
                s.add_incoming(n, bld.block)
            bld.branch(head)
            bld.position_at_end(done)
            for s, ptr in zip(sums, ptrs):
                bld.store(bld.fadd(bld.load(ptr, align=4), s), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@functools.cache
def tile_kernel(rows: int):
    """:func:`_make_tile`'s kernel for ``rows``, callable from numba code (one per height)."""
    llvm.initialize_native_asmparser()  # numba's JIT registers no assembly parser for the inline asm
    return _make_tile(rows)


_tile6, _tile4 = tile_kernel(6), tile_kernel(4)  # globals, not closure variables: numba's disk cache key is then stable


@functools.cache
def _tiles(rows: int):
    stamp = source_stamp(sys.modules[__name__])  # closed over: see unweight.jit_cache

    @njit(cache=True, nogil=True)  # compiling both heights took ~0.55 s per process
    def tiles(y, acc, npairs, d, block):
        assert stamp != 0
        for p0 in range(0, npairs, block):
            p1 = min(p0 + block, npairs)
            for j0 in range(0, d, COLS):
                for i0 in range(0, min(j0 + COLS, d), rows):
                    if rows == 6:
                        _tile6(y, y, acc, i0, j0, i0, j0, p0, p1, d, d, d)
                    else:
                        _tile4(y, y, acc, i0, j0, i0, j0, p0, p1, d, d, d)

    return tiles


def rows_for(d: int) -> int | None:
    """The tile height for ``d`` columns: 6 rows where 6 divides ``d``, else 4; None unless ``d`` is a
    positive multiple of 64 (the other column counts go to ``ssyrk``)."""
    if d <= 0 or d % COLS:
        return None
    return 6 if d % 6 == 0 else 4


def add_gram_upper_bf16(acc: torch.Tensor, x: torch.Tensor) -> None:
    """Add the upper triangle of ``x^T x`` to ``acc`` (``[d, d]`` float32, contiguous, on the CPU;
    ``x``: ``[n, d]`` bf16, ``d`` a multiple of 64). The strictly lower triangle of ``acc`` is
    left holding partial sums and must be ignored. Callers check :func:`available` and
    :func:`rows_for`."""
    n, d = x.shape
    rows = rows_for(d)
    if rows is None or not available():
        raise ValueError(f"no bf16 Gram kernel for {d} columns on this machine")
    if n % 2:
        x = torch.cat([x, x.new_zeros(1, d)])
    y = x.reshape(-1, 2, d).transpose(1, 2).contiguous().view(torch.int32).view(-1, d).numpy()
    _tiles(rows)(y, acc.numpy(), y.shape[0], d, PAIRS_PER_BLOCK)
