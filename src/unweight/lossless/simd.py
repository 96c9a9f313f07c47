"""The rANS decoder's lanes stepped four at a time in 256-bit vectors (AVX2), as LLVM vector IR.

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

Needs AVX (the word permutation is ``vpermilps``); :data:`AVAILABLE` says whether this machine
has AVX2, and ``rans`` falls back to the scalar loop where it does not.
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
            rbv = builder.insert_element(ir.Constant(_V4I64, ir.Undefined), rb_v, ir.Constant(_I32, 0))
            rbv = builder.shuffle_vector(rbv, rbv, ir.Constant(_V4I32, [0, 0, 0, 0]))
            step = _Step(builder, array_data(context, builder, ty[3], dec_a),
                         array_data(context, builder, ty[0], words_a),
                         array_data(context, builder, ty[5], out_a), tb_v, rbv, prob_bits)

            # for g in range(ngroups) while p <= limit: each vector steps its four lanes in turn
            entry = builder.block
            head = builder.append_basic_block("groups.head")
            body = builder.append_basic_block("groups.body")
            done = builder.append_basic_block("groups.done")
            x0 = [builder.load(xp, align=8) for xp in xptrs]
            builder.branch(head)
            builder.position_at_end(head)
            g, p, i = builder.phi(_I64), builder.phi(_I64), builder.phi(_I64)
            xs = [builder.phi(_V4I64) for _ in range(nvec)]
            for phi, start in [(g, ir.Constant(_I64, 0)), (p, p0), (i, i0), *zip(xs, x0)]:
                phi.add_incoming(start, entry)
            more = builder.and_(builder.icmp_unsigned("<", g, ngroups_v), builder.icmp_unsigned("<=", p, limit_v))
            builder.cbranch(more, body, done)

            builder.position_at_end(body)
            pn, inn, nexts = p, i, []
            for xv in xs:
                xn, pn = step(xv, pn, inn)
                nexts.append(xn)
                inn = builder.add(inn, ir.Constant(_I64, 4))
            for phi, nxt in [(g, builder.add(g, ir.Constant(_I64, 1))), (p, pn), (i, inn), *zip(xs, nexts)]:
                phi.add_incoming(nxt, body)
            builder.branch(head)

            builder.position_at_end(done)
            for xv, xp in zip(xs, xptrs):
                builder.store(xv, xp, align=8)
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
        self.permil = cgutils.get_or_insert_function(
            mod, ir.FunctionType(_V4F, [_V4F, _V4I32]), "llvm.x86.avx.vpermilvar.ps")
        self.ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_I32]), "llvm.ctpop.i32")
        lut_ty = ir.ArrayType(_V4I32, 16)
        self.ranks = cgutils.add_global_variable(mod, lut_ty, "unweight_rans_word_ranks")
        self.ranks.initializer = ir.Constant(lut_ty, [ir.Constant(_V4I32, r) for r in word_ranks()])
        self.ranks.global_constant = True
        self.ranks.linkage = "internal"

    def __call__(self, x, p, i):
        """Write the four lanes' words at ``out[i:i + 4]``; return the next states and ``p``."""
        b = self.b
        slot = b.and_(b.lshr(x, self.rbv), self.slot_mask)
        e = ir.Constant(_V4I64, ir.Undefined)
        for j in range(4):  # table lookups: four scalar loads
            k = b.add(b.extract_element(slot, ir.Constant(_I32, j)), self.tb)
            e = b.insert_element(e, b.load(b.gep(self.dec, [k])), ir.Constant(_I32, j))
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
