"""Format version 3's passes over BF16 words (and FP8 bytes), 16 or 32 words per vector in 16-bit lanes (LLVM IR).

numba types arithmetic on uint16 values as int64, so its own loops over a chunk's words run in 64-bit
lanes, four or eight per vector: putting a word together from its symbol and raw bits took 0.42 ns per
value that way against 0.12 here. Each function below is a vector loop over whole groups of W
and a scalar tail written in numba, which is also the loop's reference (tested word for word):

* :func:`keys`: a row's words to the encoder's keys (phase and lowered symbol, ``model.lower``);
* :func:`pack_words`: a chunk's raw bits (sign and low mantissa) to its bit planes (:mod:`planes`);
* :func:`place`: a symbol and its raw bits back to a word (the decoder's one pass over its output).
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from unweight.lossless import planes, simd

# 16-bit words per vector: 32 with AVX512-BW (the words of minilm-l6's BF16 embedding 0.222 against
# 0.249 ns per value on Zen 5, bench/lossless_parts.py), else 16
W = 32 if simd.AVX512BW else 16
_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_VW, _VB = ir.VectorType(_I16, W), ir.VectorType(_I8, W)


def _c(x):
    return ir.Constant(_VW, [x] * W)


def _splats(b, values):
    """Run-time i64 scalars in every 16-bit lane."""
    return [splat(b, v, _VW) for v in values]


def _loop(b, n_v, body):
    """``for i in range(0, n - W + 1, W): body(i)``; returns the first ``i`` not done."""
    entry = b.block
    head, blk, done = (b.append_basic_block(x) for x in ("lanes16.head", "lanes16.body", "lanes16.done"))
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(_I64)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    b.cbranch(b.icmp_signed("<=", b.add(i, ir.Constant(_I64, W)), n_v), blk, done)
    b.position_at_end(blk)
    body(i)
    i.add_incoming(b.add(i, ir.Constant(_I64, W)), b.block)
    b.branch(head)
    b.position_at_end(done)
    return i


def _load(b, ptr, i, ty):
    return b.load(b.bitcast(b.gep(ptr, [i]), ty.as_pointer()), align=1)


def _store(b, v, ptr, i):
    b.store(v, b.bitcast(b.gep(ptr, [i]), v.type.as_pointer()), align=1)


def _raw(b, w, lmask, rs):
    """A word's raw bits: the low mantissa bits, the sign above them at bit ``rs``."""
    return b.or_(b.and_(w, lmask), b.shl(b.lshr(w, _c(15)), rs))


# ---------------------------------------------------------------------------------------------
# keys


@intrinsic
def _keys_vec(typingctx, dst, src, n, rs, k, kmask, rot, tag, emax):
    i64 = types.int64
    sig = i64(dst, src, i64, i64, i64, i64, i64, i64, i64)

    byte = src.dtype.bitwidth == 8  # FP8 bytes: widened, their sign bit 7

    def codegen(context, b, signature, args):
        dp, sp = (simd.array_data(context, b, t, v) for t, v in zip(signature.args[:2], args[:2]))
        rs, k, kmask, rot, tag, emax = _splats(b, args[3:])

        def body(i):
            w = b.zext(_load(b, sp, i, _VB), _VW) if byte else _load(b, sp, i, _VW)
            sym = b.lshr(b.and_(w, _c(0x7F if byte else 0x7FFF)), rs)
            ex = b.lshr(sym, k)
            t = b.sub(ex, rot)
            t = b.select(b.icmp_signed("<", t, _c(1)), b.add(t, emax), t)
            low = b.select(b.icmp_unsigned("==", ex, _c(0)), sym, b.or_(b.shl(t, k), b.and_(sym, kmask)))
            _store(b, b.or_(low, tag), dp, i)

        return _loop(b, args[2], body)

    return sig, codegen


@njit(inline="always")
def keys(dst, src, r, k, rot, tag, emax=255):
    """``dst[i]`` = ``tag`` + the symbol of 16-bit float word ``src[i]`` (its exponent and top ``k``
    mantissa bits, above ``r`` raw bits: BF16 ``r = 8 - k``, FP16 ``11 - k``; an FP8 byte, uint8, ``r = 1``)
    with the exponent lowered by ``rot`` binades (``0 <= rot < emax``, ``emax = 2^E - 1``) as ``model.lower``
    does it for version 3: exponent 0 stays, the others rotate over 1 .. emax."""
    n = src.size
    body = (1 << (8 * src.itemsize - 1)) - 1  # all but the sign
    i = _keys_vec(dst, src, n, r - 1, k, (1 << k) - 1, rot, tag, emax)
    for i in range(i, n):
        sym = (np.int64(src[i]) & body) >> (r - 1)
        ex = sym >> k
        t = ex - rot
        t = t + emax if t < 1 else t
        dst[i] = tag | (sym if ex == 0 else (t << k) | (sym & ((1 << k) - 1)))


# ---------------------------------------------------------------------------------------------
# raw bits to planes


@intrinsic
def _pack_vec(typingctx, out, src, n, e, r, lmask):
    i64 = types.int64
    sig = i64(out, src, i64, i64, i64, i64)

    def codegen(context, b, signature, args):
        op, sp = (simd.array_data(context, b, t, v) for t, v in zip(signature.args[:2], args[:2]))
        n_v, e_v, r_v = args[2:5]
        rs, lm = _splats(b, [b.sub(r_v, ir.Constant(_I64, 1)), args[5]])
        fn = b.function

        def body(i):
            raw = [_raw(b, _load(b, sp, b.add(i, b.mul(e_v, ir.Constant(_I64, j))), _VW), lm, rs) for j in range(8)]
            for j in range(4):  # values i + j e and i + (j + 4) e share the nibble plane's bytes at i + j e
                v = b.or_(b.and_(raw[j], _c(15)), b.shl(b.and_(raw[j + 4], _c(15)), _c(4)))
                _store(b, b.trunc(v, _VB), op, b.add(i, b.mul(e_v, ir.Constant(_I64, j))))
            for bit in (4, 5, 6, 7):  # plane of raw bit `bit` at 4 e + (bit - 4) e, if r has it
                acc = _c(0)
                for j in range(8):
                    acc = b.or_(acc, b.shl(b.and_(b.lshr(raw[j], _c(bit)), _c(1)), _c(j)))
                has, after = fn.append_basic_block(f"plane{bit}"), fn.append_basic_block(f"plane{bit}.done")
                b.cbranch(b.icmp_signed(">", r_v, ir.Constant(_I64, bit)), has, after)
                b.position_at_end(has)
                _store(b, b.trunc(acc, _VB), op, b.add(i, b.mul(e_v, ir.Constant(_I64, bit))))
                b.branch(after)
                b.position_at_end(after)

        return _loop(b, n_v, body)

    return sig, codegen


@njit(inline="always")
def pack_words(src, r, out):
    """The bit planes (:mod:`planes`, ``m = src.size`` rounded up to 8, zeros after ``src``) of the
    ``r`` raw bits of the 16-bit float words ``src`` (4 <= r <= 8) into ``out[:m * r // 8]``."""
    n = src.size
    e = planes.padded(n) // 8
    lmask = (1 << (r - 1)) - 1
    # whole vectors while every value of the group of eight lies inside src
    i = _pack_vec(out, src, min(e, max(n - 7 * e, 0)), e, r, lmask) if n >= 8 else 0
    for i in range(i, e):
        nib = np.zeros(8, np.int64)
        for j in range(8):
            at = i + j * e
            w = np.int64(src[at]) if at < n else 0
            v = (w & lmask) | ((w >> 15) << (r - 1))
            nib[j] = v
        for j in range(4):
            out[i + j * e] = np.uint8((nib[j] & 15) | ((nib[j + 4] & 15) << 4))
        for bit in range(4, r):
            acc = 0
            for j in range(8):
                acc |= ((nib[j] >> bit) & 1) << j
            out[i + bit * e] = np.uint8(acc)


# ---------------------------------------------------------------------------------------------
# symbols and planes to words


def splat(b, v, vt):
    """The run-time i64 scalar ``v`` in every lane of the integer vector type ``vt``."""
    vec = b.insert_element(ir.Constant(vt, ir.Undefined), b.trunc(v, vt.element), ir.Constant(_I32, 0))
    return b.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, vt.count), [0] * vt.count))


def words_ir(b, s, nib, bits, nsh, sj, k, kmask, rot, rs, keep, sb, emax):
    """The words of the symbols ``s`` (a vector of i16, any width; the rest as :func:`place` names them,
    ``nsh`` .. ``emax`` splat to that width): their raw bits from the nibble bytes ``nib`` and the bit-plane
    bytes ``bits`` (vectors of i8, raw bits 4, 5, ...). The body of :func:`place`'s loop, and of the rANS
    decoder's loop that places its words itself (``rans32``)."""
    vt = s.type

    def c(x):
        return ir.Constant(vt, [x] * vt.count)

    v = b.and_(b.lshr(b.zext(nib, vt), nsh), c(15))
    for j, q in enumerate(bits):
        v = b.or_(v, b.shl(b.and_(b.lshr(b.zext(q, vt), sj), c(1)), c(4 + j)))
    sym = raised_ir(b, s, k, kmask, rot, emax)
    return b.or_(b.or_(b.shl(sym, rs), b.and_(v, keep)), b.shl(b.and_(b.lshr(v, sb), c(1)), c(15)))


def raised_ir(b, s, k, kmask, rot, emax):
    """The symbols ``s`` (a vector of i16) with their exponents raised back by ``rot`` binades, the inverse of
    ``model.lower`` (version 3): exponent 0 stays, the others rotate over 1 .. ``emax``; :func:`_raised`
    is the scalar form."""
    zero = ir.Constant(s.type, [0] * s.type.count)
    ex = b.lshr(s, k)
    t = b.add(ex, rot)
    t = b.select(b.icmp_unsigned(">", t, emax), b.sub(t, emax), t)
    return b.select(b.icmp_unsigned("==", ex, zero), s, b.or_(b.shl(t, k), b.and_(s, kmask)))


@njit(inline="always")
def _raised(sym, k, rot, emax):
    """:func:`raised_ir` for one symbol (int64)."""
    ex = sym >> k
    if ex == 0:
        return sym
    t = ex + rot
    return ((t - emax if t > emax else t) << k) | (sym & ((1 << k) - 1))


def _place_intrinsic(nbits):
    """The vector loop of :func:`place` that reads ``nbits`` bit planes (raw bits 4 .. 3 + nbits)."""
    @intrinsic
    def place_vec(typingctx, dst, src, nib, p4, p5, p6, p7, n, k, kmask, rot, rs, nsh, sj, keep, sb, emax):
        i64 = types.int64
        sig = i64(dst, src, nib, p4, p5, p6, p7, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64)

        def codegen(context, b, signature, args):
            dp, sp, np_, *bp = (simd.array_data(context, b, t, v) for t, v in zip(signature.args[:7], args[:7]))
            k, kmask, rot, rs, nsh, sj, keep, sb, emax = _splats(b, args[8:])

            def body(i):
                bits = [_load(b, p, i, _VB) for p in bp[:nbits]]
                _store(b, words_ir(b, _load(b, sp, i, _VW), _load(b, np_, i, _VB), bits, nsh, sj, k, kmask, rot, rs,
                                   keep, sb, emax), dp, i)

            return _loop(b, args[7], body)

        return sig, codegen
    return place_vec


_place_vec2, _place_vec4 = _place_intrinsic(2), _place_intrinsic(4)


@njit(inline="always")
def place(dst, src, nib, p4, p5, p6, p7, nsh, sj, r, k, rot, emax, wide):
    """``dst[i]`` = the 16-bit float word of symbol ``src[i]`` (exponent above ``k`` mantissa bits, its
    exponent raised by ``rot`` binades as ``model.lower`` lowered it: 0 stays, the others rotate over
    1 .. ``emax = 2^E - 1``) with its ``r`` raw bits: the nibble ``nib[i] >> nsh``, then bit ``sj`` of
    ``p4[i]``, ``p5[i]`` (and with ``wide``, ``r <= 8``, of ``p6[i]`` and ``p7[i]``; else ``r <= 6`` and
    those two are not read) as raw bits 4, 5 (6, 7); the top raw bit ``r - 1``, the sign, goes to bit 15.
    ``wide`` should be a constant of the caller (FP16 against BF16): the loop that reads four planes in a
    kernel that never runs it slowed BF16's decoder by 3-6%."""
    keep = (1 << (r - 1)) - 1
    n = dst.size
    if wide:
        i = _place_vec4(dst, src, nib, p4, p5, p6, p7, n, k, (1 << k) - 1, rot, r - 1, nsh, sj, keep, r - 1, emax)
    else:
        i = _place_vec2(dst, src, nib, p4, p5, p6, p7, n, k, (1 << k) - 1, rot, r - 1, nsh, sj, keep, r - 1, emax)
    for i in range(i, n):
        v = (((np.int64(nib[i]) >> nsh) & 15) | (((np.int64(p4[i]) >> sj) & 1) << 4)
             | (((np.int64(p5[i]) >> sj) & 1) << 5))
        if wide:
            v |= (((np.int64(p6[i]) >> sj) & 1) << 6) | (((np.int64(p7[i]) >> sj) & 1) << 7)
        dst[i] = (_raised(np.int64(src[i]), k, rot, emax) << (r - 1)) | (v & keep) | (((v >> (r - 1)) & 1) << 15)


# ---------------------------------------------------------------------------------------------
# FP8: symbols and the sign plane to bytes


@intrinsic
def _fp8_bytes_vec(typingctx, dst, src, signs, n, sj, k, kmask, rot, emax):
    i64 = types.int64
    sig = i64(dst, src, signs, i64, i64, i64, i64, i64, i64)

    def codegen(context, b, signature, args):
        dp, sp, gp = (simd.array_data(context, b, t, v) for t, v in zip(signature.args[:3], args[:3]))
        sj, k, kmask, rot, emax = _splats(b, args[4:])

        def body(i):
            sym = raised_ir(b, _load(b, sp, i, _VW), k, kmask, rot, emax)
            sign = b.shl(b.and_(b.lshr(b.zext(_load(b, gp, i, _VB), _VW), sj), _c(1)), _c(7))
            _store(b, b.trunc(b.or_(sym, sign), _VB), dp, i)

        return _loop(b, args[3], body)

    return sig, codegen


@njit(inline="always")
def fp8_bytes(dst, src, signs, sj, k, rot, emax):
    """``dst[i]`` = the FP8 byte of symbol ``src[i]`` (its exponent raised by ``rot`` binades, as
    :func:`place` raises it) with bit ``sj`` of ``signs[i]`` as its sign: the inverse of :func:`keys` for
    bytes, less the tag."""
    n = dst.size
    kmask = (1 << k) - 1
    i = _fp8_bytes_vec(dst, src, signs, n, sj, k, kmask, rot, emax)
    for i in range(i, n):
        dst[i] = np.uint8(_raised(np.int64(src[i]), k, rot, emax) | (((np.int64(signs[i]) >> sj) & 1) << 7))
