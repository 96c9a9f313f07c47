"""The rANS coder's lanes stepped four at a time in 256-bit vectors (AVX2), as LLVM vector IR.

The scalar decoder (:func:`rans.decode_groups_scalar`) spends about 22 instructions per value. The
interleaved lanes do the same arithmetic on independent states, so four of them fit one
``<4 x i64>`` vector: the table lookups stay four scalar loads (measured faster than an AVX2
gather here), the rest (slot, next state, renormalisation, the output words) is one vector
instruction for four lanes. The shared word stream is read the way F. Giesen's SIMD rANS decoder
reads it ("Interleaved entropy coders", arXiv:1402.3392, section 5): the lanes that need a word
take consecutive words in lane order, so one 16-byte load and a permutation chosen by the 4-bit
mask of needy lanes hands each its word, and the stream advances by the mask's popcount. One
vector is one long chain of dependent steps; ``LANES / 4`` vectors per group run side by side.
The result is exactly the scalar decoder's (tested on random streams and tables).

The encoder's lanes go the same way (:func:`make_encode_groups`), with the division by the
frequency done in float64 (exact, see there): 1.5x the scalar encoder's loop on minilm-l6 and
smollm2-135m in BF16, the same words.

Needs AVX (the word permutation is ``vpermilps``); :data:`AVAILABLE` says whether this machine
has AVX2, and ``rans`` falls back to the scalar loops where it does not.
"""

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


# numba compiles for this machine unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES name another target
AVAILABLE = (numba.config.CPU_NAME in (None, "host") and numba.config.CPU_FEATURES is None
             and bool(llvm.get_host_cpu_features().get("avx2", False)))
# 512-bit vectors of 32-bit lanes (AVX512-F): the rANS decoder (rans32) then steps sixteen lanes at a time
AVX512 = AVAILABLE and bool(llvm.get_host_cpu_features().get("avx512f", False))
# 512-bit vectors of 16-bit lanes (AVX512-BW): the word loops (lanes16) then take 32 words at a time
AVX512BW = AVAILABLE and bool(llvm.get_host_cpu_features().get("avx512bw", False))

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V4I64, _V4I32, _V4I16 = ir.VectorType(_I64, 4), ir.VectorType(_I32, 4), ir.VectorType(_I16, 4)
_V4F = ir.VectorType(ir.FloatType(), 4)


def word_ranks(width: int = 4) -> list[list[int]]:
    """For each ``width``-bit mask of lanes that need a word: lane j takes the word at
    ``p + popcount(mask & ((1 << j) - 1))`` (lanes that need none take any)."""
    return [[bin(m & ((1 << j) - 1)).count("1") for j in range(width)] for m in range(1 << width)]


def _splat(v: int, vt=_V4I64):
    return ir.Constant(vt, [ir.Constant(vt.element, v)] * vt.count)


def array_data(context, builder, ty, val):
    """The data pointer of a numba array argument."""
    return context.make_array(ty)(context, builder, val).data


def _broadcast(b, v):
    """The run-time i64 ``v`` in all four lanes of a ``<4 x i64>``."""
    vec = b.insert_element(ir.Constant(_V4I64, ir.Undefined), v, ir.Constant(_I32, 0))
    return b.shuffle_vector(vec, vec, ir.Constant(_V4I32, [0, 0, 0, 0]))


def _lookup4(b, table, idx, offset=None):
    """``table[idx[j] (+ offset)]`` for the four lanes of ``idx``: four scalar loads (measured faster
    than an AVX2 gather in the decoder, and no slower in the encoder)."""
    e = ir.Constant(_V4I64, ir.Undefined)
    for j in range(4):
        k = b.extract_element(idx, ir.Constant(_I32, j))
        e = b.insert_element(e, b.load(b.gep(table, [k if offset is None else b.add(k, offset)])),
                             ir.Constant(_I32, j))
    return e


def _word_intrinsics(mod):
    """(``vpermilps``, ``ctpop``): the permutation that hands out or packs the lanes' words, and the
    count that moves the stream position."""
    permil = cgutils.get_or_insert_function(mod, ir.FunctionType(_V4F, [_V4F, _V4I32]), "llvm.x86.avx.vpermilvar.ps")
    return permil, cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_I32]), "llvm.ctpop.i32")


def constant_table(mod, name: str, rows: list[list[int]]):
    """A constant global of ``<n x i32>`` rows (lane permutations), indexed by a lane mask."""
    vty = ir.VectorType(_I32, len(rows[0]))
    lut_ty = ir.ArrayType(vty, len(rows))
    lut = cgutils.add_global_variable(mod, lut_ty, name)
    lut.initializer = ir.Constant(lut_ty, [ir.Constant(vty, r) for r in rows])
    lut.global_constant = True
    lut.linkage = "internal"
    return lut


def begin_loop(b, xptrs, starts):
    """Open a loop over state vectors kept in memory at ``xptrs``: returns (head, body, done, phis,
    xs) with the builder left in ``head``: ``phis`` carry the scalars from ``starts``, ``xs`` the
    states loaded from ``xptrs``. The caller branches from ``head`` to ``body`` or ``done``, emits the
    body, and closes with :func:`end_loop`."""
    entry = b.block
    head, body, done = (b.append_basic_block(name) for name in ("loop.head", "loop.body", "loop.done"))
    x0 = [b.load(xp, align=4) for xp in xptrs]
    b.branch(head)
    b.position_at_end(head)
    phis = [b.phi(v.type) for v in starts]
    xs = [b.phi(x.type) for x in x0]
    for phi, start in [*zip(phis, starts), *zip(xs, x0)]:
        phi.add_incoming(start, entry)
    return head, body, done, phis, xs


def end_loop(b, head, done, updates, xs, xptrs):
    """Close a loop of :func:`begin_loop`: each phi of ``updates`` (pairs) gets its next value from
    the body, and after the loop the states go back to memory."""
    for phi, nxt in updates:
        phi.add_incoming(nxt, b.block)
    b.branch(head)
    b.position_at_end(done)
    for xv, xp in zip(xs, xptrs):
        b.store(xv, xp, align=4)


def make_decode_groups(lanes: int, prob_bits: int):
    """The vector form of :func:`rans.decode_groups_scalar` for ``lanes`` states (a multiple of
    four) and ``prob_bits`` of probability precision: the same arguments and results."""
    nvec = lanes // 4

    @intrinsic
    def decode_groups(typingctx, words, p, limit, dec, tb, out, i, ngroups, x, rb):
        u64 = types.uint64
        sig = types.UniTuple(u64, 2)(words, u64, u64, dec, u64, out, u64, u64, x, u64)

        def codegen(context, builder, signature, args):
            words_a, p0, limit_v, dec_a, tb_v, out_a, i0, ngroups_v, x_a, rb_v = args
            ty = signature.args
            xbase = array_data(context, builder, ty[8], x_a)
            xptrs = [builder.bitcast(builder.gep(xbase, [ir.Constant(_I64, 4 * v)]), _V4I64.as_pointer())
                     for v in range(nvec)]
            rbv = _broadcast(builder, rb_v)
            step = _Step(builder, array_data(context, builder, ty[3], dec_a),
                         array_data(context, builder, ty[0], words_a),
                         array_data(context, builder, ty[5], out_a), tb_v, rbv, prob_bits)

            # for g in range(ngroups) while p <= limit: each vector steps its four lanes in turn
            head, body, done, (g, p, i), xs = begin_loop(builder, xptrs, [ir.Constant(_I64, 0), p0, i0])
            more = builder.and_(builder.icmp_unsigned("<", g, ngroups_v), builder.icmp_unsigned("<=", p, limit_v))
            builder.cbranch(more, body, done)
            builder.position_at_end(body)
            pn, inn, nexts = p, i, []
            for xv in xs:
                xn, pn = step(xv, pn, inn)
                nexts.append(xn)
                inn = builder.add(inn, ir.Constant(_I64, 4))
            end_loop(builder, head, done, [(g, builder.add(g, ir.Constant(_I64, 1))), (p, pn), (i, inn),
                                           *zip(xs, nexts)], xs, xptrs)
            return context.make_tuple(builder, signature.return_type, [p, i])

        return sig, codegen

    return decode_groups


class _Step:
    """Emits one decode step of four lanes (:func:`rans._dstep` on a vector)."""

    def __init__(self, builder, dec, words, out, tb, rbv, prob_bits):
        self.b, self.dec, self.words, self.out, self.tb, self.rbv = builder, dec, words, out, tb, rbv
        self.hiv = builder.add(rbv, _splat(prob_bits))
        self.slot_mask = _splat((1 << prob_bits) - 1)
        mod = builder.module
        self.permil, self.ctpop = _word_intrinsics(mod)
        self.ranks = constant_table(mod, "unweight_rans_word_ranks", word_ranks())

    def __call__(self, x, p, i):
        """Write the four lanes' words at ``out[i:i + 4]``; return the next states and ``p``."""
        b = self.b
        slot = b.and_(b.lshr(x, self.rbv), self.slot_mask)
        e = _lookup4(b, self.dec, slot, self.tb)
        u = b.trunc(b.add(x, b.lshr(e, _splat(16))), _V4I16)
        b.store(u, b.bitcast(b.gep(self.out, [i]), _V4I16.as_pointer()), align=2)
        x = b.add(b.mul(b.lshr(e, _splat(32)), b.lshr(x, self.hiv)), b.and_(e, _splat(0xFFFF)))
        need = b.icmp_unsigned("<", x, _splat(1 << 32))
        mask = b.zext(b.bitcast(need, ir.IntType(4)), _I32)
        w4 = b.load(b.bitcast(b.gep(self.words, [p]), _V4F.as_pointer()), align=4)
        ranks = b.load(b.gep(self.ranks, [ir.Constant(_I32, 0), mask]), align=16)
        w = b.zext(b.bitcast(b.call(self.permil, [w4, ranks]), _V4I32), _V4I64)
        x = b.select(need, b.or_(b.shl(x, _splat(32)), w), x)
        return x, b.add(p, b.zext(b.call(self.ctpop, [mask]), _I64))


def high_ranks(width: int = 4) -> list[list[int]]:
    """For each ``width``-bit mask of lanes that emit a word: the permutation that puts those lanes'
    words, in lane order, at the top of a ``width``-word vector (the encoder stores the vector ending
    at its write position and steps back by the mask's popcount; the words below are overwritten
    later)."""
    out = []
    for m in range(1 << width):
        lanes = [j for j in range(width) if m >> j & 1]
        out.append([0] * (width - len(lanes)) + lanes)
    return out


_V4D = ir.VectorType(ir.DoubleType(), 4)
_TWO52 = 0x4330000000000000  # the bits of 2.0^52: (2^52 + n) has n in its low mantissa bits, n < 2^52


def make_encode_groups(lanes: int, prob_bits: int):
    """The vector form of the encoder's group loop (:func:`rans.encode_words`' ``lanes`` unrolled
    steps): ``encode_groups(words, x, ngroups, ent, scratch, pos, rb) -> pos`` steps the states
    ``x`` (uint64[lanes], updated in place) over groups ``ngroups - 1`` down to 0 of ``words``,
    writing the renormalisation words backwards below ``scratch[pos]`` exactly as the scalar loop
    does. ``ent[t] = a | f << 32 | cum << 45`` with ``a = (2^32 - 1) // f`` (``build_tables``' last
    row, flat), loaded per lane.

    The division ``x // f`` of a 64-bit state has no AVX2 instruction and no exact float64 form. With
    ``2^32 = a * f + b`` (``1 <= b <= f``), ``x = xh * 2^32 + xl = (xh * a) * f + z`` where
    ``z = xh * b + xl < 2^44`` (``xh < 2^31`` once renormalised, with ``rb >= 1``), so
    ``x // f = xh * a + z // f`` and ``x % f = z % f``: one float64 division of an exact ``z``,
    whose rounding error (the quotient is below 2^44 / f, so the error is below 2^-9 / f) is smaller
    than the distance of a non-integer quotient from the next integer (at least 1 / f), so
    truncation gives the integer quotient, and the remainder comes exactly from one fused
    multiply-add. Integers move in and out of float64 through the ``2^52`` bias (AVX2 has no 64-bit
    conversions). The steps of one vector form a dependent chain; the ``lanes / 4`` vectors of a
    group run side by side."""
    nvec = lanes // 4

    @intrinsic
    def encode_groups(typingctx, words, x, ngroups, ent, scratch, pos, rb):
        sig = types.int64(words, x, types.int64, ent, scratch, types.int64, types.int64)

        def codegen(context, b, signature, args):
            words_a, x_a, ng, ent_a, scr_a, pos0, rb_v = args
            ty = signature.args
            wbase, xbase = array_data(context, b, ty[0], words_a), array_data(context, b, ty[1], x_a)
            ebase, sbase = array_data(context, b, ty[3], ent_a), array_data(context, b, ty[4], scr_a)
            mod = b.module
            permil, ctpop = _word_intrinsics(mod)
            trunc = cgutils.get_or_insert_function(mod, ir.FunctionType(_V4D, [_V4D]), "llvm.trunc.v4f64")
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_V4D, [_V4D] * 3), "llvm.fma.v4f64")
            lut = constant_table(mod, "unweight_rans_high_ranks", high_ranks())
            rbv = _broadcast(b, rb_v)
            thr_shift = b.sub(_splat(64 - prob_bits), rbv)
            raw_mask = b.sub(b.shl(_splat(1), rbv), _splat(1))
            two52 = ir.Constant(_V4D, [2.0 ** 52] * 4)
            lo32 = _splat(0xFFFFFFFF)
            xptrs = [b.bitcast(b.gep(xbase, [ir.Constant(_I64, 4 * v)]), _V4I64.as_pointer()) for v in range(nvec)]

            def to_double(v):  # 0 <= v < 2^52 (v4i64) -> v4f64, exactly
                return b.fsub(b.bitcast(b.or_(v, _splat(_TWO52)), _V4D), two52)

            def from_double(d):  # an integer 0 <= d < 2^52 (v4f64) -> v4i64
                return b.and_(b.bitcast(b.fadd(d, two52), _V4I64), _splat((1 << 52) - 1))

            def step(xv, wd, pn):
                t = b.lshr(wd, rbv)
                e = _lookup4(b, ebase, t)
                a = b.and_(e, lo32)
                f = b.and_(b.lshr(e, _splat(32)), _splat(0x1FFF))
                cum = b.lshr(e, _splat(45))
                bf = b.and_(b.sub(_splat(1 << 32), b.mul(a, f)), _splat(0x1FFF))  # 2^32 - a * f, in [1, f]
                fd = to_double(f)
                need = b.icmp_unsigned(">=", xv, b.shl(f, thr_shift))
                word = b.trunc(xv, _V4I32)
                xr = b.select(need, b.lshr(xv, _splat(32)), xv)
                xh = b.lshr(xr, _splat(32))
                z = b.add(b.mul(xh, bf), b.and_(xr, lo32))
                zd = to_double(z)
                qd = b.call(trunc, [b.fdiv(zd, fd)])
                rd = b.call(fma, [b.fneg(qd), fd, zd])  # exact: z - q * f, an integer below f
                q = b.add(b.mul(xh, a), from_double(qd))
                slot = b.add(b.add(b.shl(q, _splat(prob_bits)), cum), from_double(rd))
                xn = b.or_(b.shl(slot, rbv), b.and_(wd, raw_mask))
                mask = b.zext(b.bitcast(need, ir.IntType(4)), _I32)
                perm = b.load(b.gep(lut, [ir.Constant(_I32, 0), mask]), align=16)
                packed = b.call(permil, [b.bitcast(word, _V4F), perm])
                dst = b.gep(sbase, [b.sub(pn, ir.Constant(_I64, 4))])
                b.store(packed, b.bitcast(dst, _V4F.as_pointer()), align=4)
                return xn, b.sub(pn, b.zext(b.call(ctpop, [mask]), _I64))

            # for g in range(ngroups - 1, -1, -1): vectors from the last lanes down, as the scalar steps
            head, body, done, (g, p), xs = begin_loop(b, xptrs, [ng, pos0])
            b.cbranch(b.icmp_signed(">", g, ir.Constant(_I64, 0)), body, done)
            b.position_at_end(body)
            gm = b.sub(g, ir.Constant(_I64, 1))
            pn, nexts = p, [None] * nvec
            for v in range(nvec - 1, -1, -1):
                i = b.add(b.mul(gm, ir.Constant(_I64, lanes)), ir.Constant(_I64, 4 * v))
                wv = b.load(b.bitcast(b.gep(wbase, [i]), _V4I32.as_pointer()), align=4)
                nexts[v], pn = step(xs[v], b.zext(wv, _V4I64), pn)
            end_loop(b, head, done, [(g, gm), (p, pn), *zip(xs, nexts)], xs, xptrs)
            return p

        return sig, codegen

    return encode_groups
