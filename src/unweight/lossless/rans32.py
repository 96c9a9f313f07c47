"""Format version 3's coder: 32 interleaved rANS lanes of 32-bit states, eight per AVX2 vector (sixteen per
AVX-512 vector in the decoder).

rANS: J. Duda (arXiv:1311.2540); interleaved and word-renormalised after F. Giesen, "Interleaved
entropy coders" (arXiv:1402.3392), section 5, here widened to eight 32-bit lanes per ``<8 x i32>``.

Version 2 (:mod:`rans`) folds a value's raw bits into the slot, which needs 64-bit states: four per
AVX2 register, sixteen lanes, a chain of dependent steps that its decoder cannot shorten
(``docs/format.md``, "How version 3 came about"). Here only a value's symbol (exponent and top mantissa
bits, row-lowered by ``model.lower``) is coded, keyed by ``phase * space + symbol`` for the encoder:

* states in ``[2^16, 2^32)``, renormalised by 16-bit words, ``LANES = 32`` of them on one word stream,
  value ``i`` of a chunk (in coding order) on lane ``i % 32``; every lane starts and ends at ``2^16``;
* frequencies of ``PROB_BITS = 12`` bits; the decode entry is 4 bytes,
  ``f - 1 | (t - cum) << 12 | code << 24`` (``code``: the symbol's byte, ``model.codes``), one
  ``vpgatherdd`` per eight values, and the symbol is ``code`` below ``2^k`` (exponent 0), else
  ``code + off``; the encode entry ``f - 1 | cum << 12``, gathered the same way, with
  the division by ``f`` one exact float64 ``vdivpd`` (a state below 2^32 divided by ``f <= 2^12``: the
  quotient's rounding error, below 2^-20, is smaller than a non-integer quotient's distance from the
  next integer, at least 2^-12);
* the words a group of lanes needs are consecutive, in lane order: the decoder hands them out by one
  ``vpermd`` chosen by the 8-bit mask of needy lanes, the encoder packs them the same way.

The raw bits travel apart, in bit planes (:mod:`planes`). The scalar loops are the reference; the
vector loops (:data:`simd.AVAILABLE`) give the same words and keys (tested). One chunk's loop is one chain of
dependent steps, paced by the table lookup's latency: :func:`decode_keys_pair` steps two chunks' lanes in one
loop (``docs/format.md``, "Two chunks side by side": on minilm-l6's BF16 embedding 0.315 against 0.498 ns per
value for the loop). :func:`decode_keys_placed` is the
vector decoder that also puts whole groups' words together from their symbols and raw bits, off the loop's
chain of dependent steps (``chunks._plan_groups`` says which; :class:`_Placer`). Measured before it was
built (``bench/rans32_prototype.py``): 1.4-2.0x version 2's decode loop, 1.9-2.3x its encode loop. As
built, on minilm-l6's BF16 embedding (Zen 4, one thread): the decode loop 0.57 ns per value (64 lanes:
0.54; eight scalar table loads instead of the gather: 0.58), the encode loop 0.77.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from unweight.lossless import lanes16, simd
from unweight.lossless.rans import ERR_OVERRUN, ERR_STATE, OK, PROB_BITS, PROB_SCALE

LANES = 32  # PROB_BITS: version 2's 12 bits, which the header records once for both
STATE_LOW = 1 << 16
STATE_WORDS = 2 * LANES  # the flushed states (two 16-bit words each) that open every coded segment

_M = np.uint64(PROB_SCALE)
_L = np.uint64(STATE_LOW)
_F = np.uint64(PROB_SCALE - 1)
_SH12, _SH16, _SH24 = np.uint64(12), np.uint64(16), np.uint64(24)


@njit(cache=True, nogil=True)
def build_tables(alphabet, freq, space, code, ent, dec):
    """Tables for ``freq[phase, index]`` over the ascending ``alphabet`` (symbol values below ``space``):
    ``ent[phase * space + symbol] = f - 1 | cum << 12`` (the encoder's, by key) and
    ``dec[phase, t] = f - 1 | (t - cum) << 12 | code << 24`` (the decoder's, by slot; ``code[index]``,
    a byte, ``model.codes``). Either may be empty (size 0) to build only the other. Returns the first
    phase whose frequencies are not a valid table (a sum other than ``PROB_SCALE``, more than 256
    symbols), or -1."""
    nph, nsym = freq.shape
    if nsym > 256:
        return 0
    for ph in range(nph):
        acc = 0
        for d in range(nsym):
            f = np.int64(freq[ph, d])
            if acc + f > PROB_SCALE:
                return ph
            if f > 0:
                if ent.size > 0:
                    ent[ph * space + alphabet[d]] = np.uint32((f - 1) | (acc << 12))
                if dec.size > 0:
                    for t in range(f):
                        dec[ph, acc + t] = np.uint32((f - 1) | (t << 12) | (np.int64(code[d]) << 24))
            acc += f
        if acc != PROB_SCALE:
            return ph
    return -1


# ---------------------------------------------------------------------------------------------
# the scalar steps (the reference, and the ragged ends of the vector loops)


@njit(inline="always")
def _estep(x, e, out, pos):
    """Encode one value with entry ``e`` into state ``x``; the low word is always written below
    ``pos`` and ``pos`` moves only when it is needed (no branch). Returns (state, pos)."""
    f = (np.uint64(e) & _F) + np.uint64(1)
    need = x >= (f << np.uint64(32 - PROB_BITS))
    out[pos - 1] = np.uint16(x & np.uint64(0xFFFF))
    pos -= np.int64(need)
    x = (x >> _SH16) if need else x
    return (x // f) * _M + x % f + (np.uint64(e) >> _SH12), pos


@njit(inline="always")
def _dstep(x, words, p, dec, tb, kz, off):
    """Decode one value from state ``x``: returns (state, p, symbol): the entry's code ``c`` is the
    symbol itself below ``kz`` (exponent 0), else ``c + off``."""
    e = np.uint64(dec[tb + (x & _F)])
    x = ((e & _F) + np.uint64(1)) * (x >> np.uint64(PROB_BITS)) + ((e >> _SH12) & _F)
    need = x < _L
    x = ((x << _SH16) | np.uint64(words[p])) if need else x
    c = np.int64(e >> _SH24)
    return x, p + np.int64(need), np.uint16(c if c < kz else c + off)


@njit(inline="always")
def encode_groups_scalar(keys, x, ngroups, ent, out, pos):
    """Whole groups ``ngroups - 1`` down to 0 of ``keys``, states ``x`` (uint32[LANES], updated in
    place), words written backwards below ``out[pos]``. Returns ``pos``."""
    for g in range(ngroups - 1, -1, -1):
        for j in range(LANES - 1, -1, -1):
            v, pos = _estep(np.uint64(x[j]), ent[keys[g * LANES + j]], out, pos)
            x[j] = np.uint32(v)
    return pos


@njit(inline="always")
def decode_groups_scalar(streams, ngroups, dec, kz, off):
    """Whole groups of the one stream ``(words, x, tb, out, i, p, limit, extra)``: from ``words`` at ``p``
    (states ``x``, uint32[LANES], updated in place) into ``out[i:]`` with the decode table at ``dec[tb:]``;
    stops before a group once ``p > limit``. Returns (the groups decoded, ``p``)."""
    words, x, tb, out, i, p, limit, _ = streams[0]
    g = 0
    while g < ngroups and p <= limit:
        for j in range(LANES):
            v, p, out[i + g * LANES + j] = _dstep(np.uint64(x[j]), words, p, dec, tb, kz, off)
            x[j] = np.uint32(v)
        g += 1
    return g, p


# ---------------------------------------------------------------------------------------------
# the vector loops: eight lanes per <8 x i32>, LANES / 8 vectors side by side

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_V8I32, _V8I16 = ir.VectorType(_I32, 8), ir.VectorType(ir.IntType(16), 8)
_V8D = ir.VectorType(ir.DoubleType(), 8)
_NVEC = LANES // 8


def _avx2(mod):
    """``vpgatherdd``, ``vpermd`` and popcount."""
    gather = cgutils.get_or_insert_function(
        mod, ir.FunctionType(_V8I32, [_V8I32, _I8.as_pointer(), _V8I32, _V8I32, _I8]), "llvm.x86.avx2.gather.d.d.256")
    permd = cgutils.get_or_insert_function(mod, ir.FunctionType(_V8I32, [_V8I32, _V8I32]), "llvm.x86.avx2.permd")
    ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_I32]), "llvm.ctpop.i32")
    return gather, permd, ctpop


def _splat(v, n=8):
    return ir.Constant(ir.VectorType(_I32, n), [v] * n)


def _state_ptrs(b, xbase, n=8):
    vt = ir.VectorType(_I32, n).as_pointer()
    return [b.bitcast(b.gep(xbase, [ir.Constant(_I64, n * v)]), vt) for v in range(LANES // n)]


class _Words8:
    """AVX2's hand-out of a stream's words to eight lanes: ``vpgatherdd`` for the table entries, and one
    ``vpermd`` by the 8-bit mask of needy lanes (a table of ranks, :func:`simd.word_ranks`) for the words."""

    n = 8

    def __init__(self, b):
        self.b = b
        self.gather, self.permd, self.ctpop = _avx2(b.module)
        self.lut = simd.constant_table(b.module, "unweight_rans32_word_ranks", simd.word_ranks(8))

    def entries(self, dptr, slots):
        return self.b.call(self.gather, [ir.Constant(_V8I32, ir.Undefined), dptr, slots, _splat(-1),
                                         ir.Constant(_I8, 4)])

    def take(self, w, need):
        """(the words ``w`` (the stream's next eight) handed to the lanes ``need`` in lane order, how many)."""
        b = self.b
        mask = b.zext(b.bitcast(need, _I8), _I32)
        ranks = b.load(b.gep(self.lut, [ir.Constant(_I32, 0), mask]), align=32)
        return b.call(self.permd, [w, ranks]), b.zext(b.call(self.ctpop, [mask]), _I64)


class _Words16:
    """AVX-512's hand-out to sixteen lanes: ``vpgatherdd zmm``, and ``vpexpandd`` by the mask of needy lanes,
    no table of ranks."""

    n = 16

    def __init__(self, b):
        self.b = b
        v16, m16 = ir.VectorType(_I32, 16), ir.VectorType(ir.IntType(1), 16)
        mod = b.module
        self.gather = cgutils.get_or_insert_function(
            mod, ir.FunctionType(v16, [v16, _I8.as_pointer(), v16, m16, _I32]), "llvm.x86.avx512.mask.gather.dpi.512")
        self.expand = cgutils.get_or_insert_function(mod, ir.FunctionType(v16, [v16, v16, m16]),
                                                     "llvm.x86.avx512.mask.expand.v16i32")
        self.ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(ir.IntType(16), [ir.IntType(16)]),
                                                    "llvm.ctpop.i16")
        self.all = ir.Constant(m16, [1] * 16)

    def entries(self, dptr, slots):
        return self.b.call(self.gather, [ir.Constant(slots.type, ir.Undefined), dptr, slots, self.all,
                                         ir.Constant(_I32, 4)])

    def take(self, w, need):
        b = self.b
        return (b.call(self.expand, [w, ir.Constant(w.type, ir.Undefined), need]),
                b.zext(b.call(self.ctpop, [b.bitcast(need, ir.IntType(16))]), _I64))


def _decode_intrinsic(place: bool, wide: bool):
    """The decoder's vector loop over whole groups of one or more chunks' streams side by side (each its own
    chain of dependent steps: two chunks keep twice as many table lookups in flight); with ``place``, one
    that also puts each group's words together where its chunk's plan says (:func:`decode_keys_placed`);
    ``wide``: sixteen lanes per vector (AVX-512, :class:`_Words16`), else eight (:class:`_Words8`).

    ``decode_groups(streams, ngroups, dec, kz, off)``: each stream ``(words, x, tb, out, i, p, limit,
    extra)`` as :func:`decode_groups_scalar` takes them; stops before a group once any ``p > limit``.
    Returns (the groups decoded, each stream's ``p``)."""

    @intrinsic
    def decode_groups(typingctx, streams, ngroups, dec, kz, off):
        i64 = types.int64
        sig = types.UniTuple(i64, len(streams) + 1)(streams, i64, dec, i64, i64)

        def codegen(context, b, signature, args):
            streams_v, ng, dec_a, kz_v, off_v = args
            sty, dty = signature.args[0], signature.args[2]
            data = lambda t, v: simd.array_data(context, b, t, v)  # noqa: E731
            hand = (_Words16 if wide else _Words8)(b)
            n = hand.n
            vi32, vi16 = ir.VectorType(_I32, n), ir.VectorType(ir.IntType(16), n)
            kz, off = (lanes16.splat(b, v, vi32) for v in (kz_v, off_v))
            dbase = data(dty, dec_a)
            ss = []  # per stream: (words, dec, out, i0, limit, placer, its states' pointers)
            for j, st in enumerate(sty.types):
                words_a, x_a, tb_v, out_a, i0_v, _, limit_v, extra_v = (b.extract_value(b.extract_value(
                    streams_v, j), m) for m in range(8))
                placer = _Placer(context, b, st.types[7], extra_v, ss[0][5] if ss else None) if place else None
                ss.append((data(st.types[0], words_a), b.bitcast(b.gep(dbase, [tb_v]), _I8.as_pointer()),
                           data(st.types[3], out_a), i0_v, limit_v, placer, _state_ptrs(b, data(st.types[1], x_a), n)))
            p0s = [b.extract_value(b.extract_value(streams_v, j), 5) for j in range(len(ss))]
            xptrs = [xp for s in ss for xp in s[6]]
            head, body, done, (g, *ps), xs = simd.begin_loop(b, xptrs, [ir.Constant(_I64, 0), *p0s])
            more = b.icmp_signed("<", g, ng)
            for p, s in zip(ps, ss):
                more = b.and_(more, b.icmp_signed("<=", p, s[4]))
            b.cbranch(more, body, done)
            b.position_at_end(body)
            nexts, pns, nvec = [], [], LANES // n
            for j, (wbase, dptr, obase, i0_v, _, placer, _) in enumerate(ss):
                base = b.add(i0_v, b.mul(g, ir.Constant(_I64, LANES)))
                syms, pn = [], ps[j]
                for v, xv in enumerate(xs[j * nvec:(j + 1) * nvec]):
                    e = hand.entries(dptr, b.and_(xv, _splat(PROB_SCALE - 1, n)))
                    i = b.add(base, ir.Constant(_I64, n * v))
                    c = b.lshr(e, _splat(24, n))
                    sv = b.trunc(b.select(b.icmp_unsigned("<", c, kz), c, b.add(c, off)), vi16)
                    if placer is None:
                        b.store(sv, b.bitcast(b.gep(obase, [i]), vi16.as_pointer()), align=2)
                    syms.append(sv)
                    f = b.add(b.and_(e, _splat(PROB_SCALE - 1, n)), _splat(1, n))
                    bias = b.and_(b.lshr(e, _splat(12, n)), _splat(PROB_SCALE - 1, n))
                    xn = b.add(b.mul(f, b.lshr(xv, _splat(PROB_BITS, n))), bias)
                    need = b.icmp_unsigned("<", xn, _splat(STATE_LOW, n))
                    w16 = b.load(b.bitcast(b.gep(wbase, [pn]), vi16.as_pointer()), align=2)
                    w, taken = hand.take(b.zext(w16, vi32), need)
                    nexts.append(b.select(need, b.or_(b.shl(xn, _splat(16, n)), w), xn))
                    pn = b.add(pn, taken)
                pns.append(pn)
                if placer is not None:  # the symbols of a group it does not place go to out, for the pass after
                    placer.place(base, syms, b.bitcast(b.gep(obase, [base]), ir.VectorType(ir.IntType(16),
                                                                                              LANES).as_pointer()))
            simd.end_loop(b, head, done, [(g, b.add(g, ir.Constant(_I64, 1))), *zip(ps, pns), *zip(xs, nexts)],
                          xs, xptrs)
            return context.make_tuple(b, signature.return_type, [g, *ps])

        return sig, codegen

    return decode_groups


class _Placer:
    """The words of a group of ``LANES`` decoded symbols (BF16, FP16, FP32's hi halves), put together in the
    decoder's loop where the chunk's plan says so (:func:`decode_keys_placed`; on Zen 5 this costs the BF16
    loop 0.13 ns per value against 0.22 for the separate pass). ``extra`` = (plan, dst, nib, bits, k, h, e, r,
    emax): the plan (int32 per group: its first value's place ``a`` in ``dst`` | its row's rotation << 24, or
    -1), the words' array, the nibble plane, a tuple of the bit planes of raw bits 4, 5, ... (two for BF16,
    four for FP16; zeros where ``r`` lacks them), the symbol's mantissa bits, the planes' geometry
    (:mod:`planes`: value ``a``'s nibble in byte ``a % h``, its bits in byte ``a % e`` at bit ``a // e``,
    ``h = 4 e``), the raw bits ``r`` and the top exponent ``emax``. ``k``, ``r`` and ``emax`` are the tensor's:
    two chunks side by side share ``like``'s vectors of them (fewer registers live in the loop)."""

    def __init__(self, context, b, ety, extra, like=None):
        self.b = b
        self.plan, self.dst, self.nib = (simd.array_data(context, b, t, b.extract_value(extra, j))
                                         for j, t in enumerate(ety.types[:3]))
        bits = b.extract_value(extra, 3)
        self.bits = [simd.array_data(context, b, t, b.extract_value(bits, j)) for j, t in enumerate(ety.types[3])]
        k, self.h, self.e, r, emax = (b.extract_value(extra, j) for j in range(4, 9))
        self.vt = ir.VectorType(ir.IntType(16), LANES)
        if like is not None:
            self.k, self.kmask, self.rs, self.keep, self.emax = like.k, like.kmask, like.rs, like.keep, like.emax
            return
        one = ir.Constant(_I64, 1)
        rs = b.sub(r, one)  # the sign, the top raw bit
        self.k, self.kmask, self.rs, self.keep, self.emax = (
            lanes16.splat(b, v, self.vt) for v in (k, b.sub(b.shl(one, k), one), rs, b.sub(b.shl(one, rs), one), emax))

    def place(self, base, syms, rest):
        """Group ``base`` (its first value in coding order) of the symbols ``syms`` (vectors of i16): its words
        where the plan says, else the symbols themselves to ``rest`` (a pointer to ``LANES`` of i16)."""
        b, vt = self.b, self.vt
        while len(syms) > 1:  # the group's symbols in one vector
            m = 2 * syms[0].type.count
            syms = [b.shuffle_vector(syms[j], syms[j + 1], ir.Constant(ir.VectorType(_I32, m), list(range(m))))
                    for j in range(0, len(syms), 2)]
        s = syms[0]
        entry = b.load(b.gep(self.plan, [b.lshr(base, ir.Constant(_I64, LANES.bit_length() - 1))]))  # base / LANES
        yes, no, after = (b.function.append_basic_block(x) for x in ("place", "place.not", "place.done"))
        b.cbranch(b.icmp_signed("!=", entry, ir.Constant(_I32, -1)), yes, no)
        b.position_at_end(no)
        b.store(s, rest, align=2)
        b.branch(after)
        b.position_at_end(yes)
        a = b.zext(b.and_(entry, ir.Constant(_I32, (1 << 24) - 1)), _I64)
        zero, i64 = ir.Constant(_I64, 0), lambda x: ir.Constant(_I64, x)  # noqa: E731
        upper = b.icmp_unsigned(">=", a, self.h)  # the nibble's half
        ah = b.sub(a, b.select(upper, self.h, zero))
        q = zero
        for j in (1, 2, 3):
            q = b.add(q, b.zext(b.icmp_unsigned(">=", ah, b.mul(self.e, i64(j))), _I64))
        ae = b.sub(ah, b.mul(q, self.e))
        sj = b.add(q, b.select(upper, i64(4), zero))
        nsh, sj, rot = (lanes16.splat(b, v, vt) for v in (b.select(upper, i64(4), zero), sj,
                                                          b.zext(b.lshr(entry, ir.Constant(_I32, 24)), _I64)))
        bt = ir.VectorType(_I8, LANES)

        def load(ptr, i):
            return b.load(b.bitcast(b.gep(ptr, [i]), bt.as_pointer()), align=1)

        word = lanes16.words_ir(b, s, load(self.nib, ah), [load(p, ae) for p in self.bits], nsh, sj, self.k,
                                self.kmask, rot, self.rs, self.keep, self.rs, self.emax)
        b.store(word, b.bitcast(b.gep(self.dst, [a]), vt.as_pointer()), align=2)
        b.branch(after)
        b.position_at_end(after)


_decode_groups_vec, _decode_place_groups_vec = (_decode_intrinsic(place, simd.AVX512) for place in (False, True))


@intrinsic
def _encode_groups_vec(typingctx, keys, x, ngroups, ent, out, pos0):
    sig = types.int64(keys, x, types.int64, ent, out, types.int64)

    def codegen(context, b, signature, args):
        keys_a, x_a, ng, ent_a, out_a, pos_v = args
        ty = signature.args
        data = lambda t, v: simd.array_data(context, b, t, v)  # noqa: E731
        kbase, obase = data(ty[0], keys_a), data(ty[4], out_a)
        eptr = b.bitcast(data(ty[3], ent_a), _I8.as_pointer())
        gather, permd, ctpop = _avx2(b.module)
        lut = simd.constant_table(b.module, "unweight_rans32_high_ranks", simd.high_ranks(8))
        xptrs = _state_ptrs(b, data(ty[1], x_a))
        head, body, done, (g, p), xs = simd.begin_loop(b, xptrs, [ng, pos_v])
        b.cbranch(b.icmp_signed(">", g, ir.Constant(_I64, 0)), body, done)
        b.position_at_end(body)
        gm = b.sub(g, ir.Constant(_I64, 1))
        nexts, pn = [None] * _NVEC, p
        for v in range(_NVEC - 1, -1, -1):  # backwards: the last vector's words come last
            xv = xs[v]
            i = b.add(b.mul(gm, ir.Constant(_I64, LANES)), ir.Constant(_I64, 8 * v))
            k = b.zext(b.load(b.bitcast(b.gep(kbase, [i]), _V8I16.as_pointer()), align=2), _V8I32)
            e = b.call(gather, [ir.Constant(_V8I32, ir.Undefined), eptr, k, _splat(-1), ir.Constant(_I8, 4)])
            f = b.add(b.and_(e, _splat(PROB_SCALE - 1)), _splat(1))
            # x >= f << 20, as x > (f << 20) - 1: f = 4096 (one symbol) wraps to 2^32 - 1, never exceeded
            need = b.icmp_unsigned(">", xv, b.sub(b.shl(f, _splat(32 - PROB_BITS)), _splat(1)))
            xr = b.select(need, b.lshr(xv, _splat(16)), xv)
            q = b.fptoui(b.fdiv(b.uitofp(xr, _V8D), b.uitofp(f, _V8D)), _V8I32)
            # (x div f) * M + x mod f + cum = x + cum + (x div f) * (M - f)
            nexts[v] = b.add(b.add(xr, b.lshr(e, _splat(12))), b.mul(q, b.sub(_splat(PROB_SCALE), f)))
            mask = b.zext(b.bitcast(need, _I8), _I32)
            ranks = b.load(b.gep(lut, [ir.Constant(_I32, 0), mask]), align=32)
            words = b.trunc(b.call(permd, [xv, ranks]), _V8I16)
            b.store(words, b.bitcast(b.gep(obase, [b.sub(pn, ir.Constant(_I64, 8))]), _V8I16.as_pointer()), align=2)
            pn = b.sub(pn, b.zext(b.call(ctpop, [mask]), _I64))
        simd.end_loop(b, head, done, [(g, gm), (p, pn), *zip(xs, nexts)], xs, xptrs)
        return p

    return sig, codegen


@njit(inline="always")
def _encode_groups_vector(keys, x, ngroups, ent, out, pos):
    return _encode_groups_vec(keys, x, ngroups, ent, out, pos)


# ---------------------------------------------------------------------------------------------
# a chunk


def _encoder(vector: bool):
    groups = _encode_groups_vector if vector else encode_groups_scalar

    @njit(inline="always")
    def encode_keys(keys, n, ent, out):
        """rANS-encode ``keys[:n]`` (uint16: ``phase * space + symbol``) into the tail of ``out``
        (uint16, at least ``n + STATE_WORDS + 8`` words); returns the index of the segment's first word.
        The segment: the final states (low word first, lane 0 first), then the renormalisation words
        in the order the decoder reads them."""
        x = np.full(LANES, STATE_LOW, np.uint32)
        pos = np.int64(out.size)
        i = n
        while i % LANES:  # the last n % LANES values, one at a time
            i -= 1
            v, pos = _estep(np.uint64(x[i % LANES]), ent[keys[i]], out, pos)
            x[i % LANES] = np.uint32(v)
        pos = groups(keys, x, np.int64(i // LANES), ent, out, pos)
        for j in range(LANES - 1, -1, -1):
            out[pos - 1] = np.uint16(x[j] >> np.uint32(16))
            out[pos - 2] = np.uint16(x[j] & np.uint32(0xFFFF))
            pos -= 2
        return pos

    return encode_keys


@njit(inline="always")
def _start(words, limit, counts):
    """A segment's flushed states, and its cursor ``(p, i, ph, end)``: the next word, the next value, its
    phase and the end of that phase's run; ``p`` is past ``limit`` if the segment cannot hold the states."""
    x = np.empty(LANES, np.uint32)
    if limit < STATE_WORDS:
        return x, (limit + 1, 0, 0, 0)
    for j in range(LANES):
        x[j] = np.uint32(words[2 * j]) | (np.uint32(words[2 * j + 1]) << np.uint32(16))
    return x, (np.int64(STATE_WORDS), 0, 0, np.int64(counts[0]))


@njit(inline="always")
def _walk(words, x, cur, limit, counts, dec, kz, off, out):
    """A stream's values one at a time, moving to the next phase at each run's end, until its next whole
    group (value ``i`` with ``i % LANES == 0`` and ``LANES`` values left in its run), its last value, or
    ``p > limit``. Returns the cursor."""
    p, i, ph, end = cur
    while p <= limit:
        if i == end:
            if ph + 1 >= counts.size:
                break
            ph += 1
            end += counts[ph]
        elif i % LANES == 0 and i + LANES <= end:
            break
        else:
            v, p, out[i] = _dstep(np.uint64(x[i % LANES]), words, p, dec, ph * PROB_SCALE, kz, off)
            x[i % LANES] = np.uint32(v)
            i += 1
    return p, i, ph, end


@njit(inline="always")
def _ready(cur, limit):
    """Whether a walked stream stands at a whole group (else it is done or has overrun)."""
    return cur[0] <= limit and cur[1] < cur[3]


@njit(inline="always")
def _status(x, cur, limit):
    """A finished stream's status: OK, ERR_OVERRUN or ERR_STATE."""
    if cur[0] > limit:
        return ERR_OVERRUN
    if cur[0] != limit:
        return ERR_STATE
    for j in range(LANES):
        if x[j] != STATE_LOW:
            return ERR_STATE
    return OK


def _decoder(groups):
    @njit(inline="always")
    def decode_keys(words, limit, n, counts, dec, kz, off, out, extra=()):
        """Decode one segment's ``limit`` words (uint16; ``words`` readable ``LANES`` words further)
        into ``out[:n]`` (uint16: each value's symbol, in coding order: a code ``c`` below ``kz`` is its
        own symbol, any other stands for ``c + off``), ``counts[ph]`` values with phase ``ph``'s table
        ``dec[ph]`` (``n`` is their sum). Returns OK, ERR_OVERRUN or ERR_STATE."""
        decf = dec.reshape(-1)
        x, cur = _start(words, limit, counts)
        while True:
            cur = _walk(words, x, cur, limit, counts, decf, kz, off, out)
            if not _ready(cur, limit):
                return _status(x, cur, limit)
            p, i, ph, end = cur
            g, p = groups(((words, x, ph * PROB_SCALE, out, i, p, limit, extra),), (end - i) // LANES, decf, kz,
                          off)
            cur = (p, i + g * LANES, ph, end)

    return decode_keys


def _pair_decoder(groups):
    @njit(inline="always")
    def decode_keys_pair(a, b, dec, kz, off):
        """Two segments decoded side by side, each ``a`` or ``b`` = (words, limit, counts, out, extra) as
        :func:`decode_keys` takes them: the whole groups both have left in their runs in one loop (twice
        the independent steps), the rest of either alone. Returns both
        statuses: the same as decoding each alone."""
        decf = dec.reshape(-1)
        wa, la, ca, oa, ea = a
        wb, lb, cb, ob, eb = b
        xa, cua = _start(wa, la, ca)
        xb, cub = _start(wb, lb, cb)
        while True:
            cua = _walk(wa, xa, cua, la, ca, decf, kz, off, oa)
            cub = _walk(wb, xb, cub, lb, cb, decf, kz, off, ob)
            ra, rb = _ready(cua, la), _ready(cub, lb)
            pa, ia, pha, ena = cua
            pb, ib, phb, enb = cub
            sa = (wa, xa, pha * PROB_SCALE, oa, ia, pa, la, ea)
            sb = (wb, xb, phb * PROB_SCALE, ob, ib, pb, lb, eb)
            if ra and rb:
                g, pa, pb = groups((sa, sb), min(ena - ia, enb - ib) // LANES, decf, kz, off)
                cua, cub = (pa, ia + g * LANES, pha, ena), (pb, ib + g * LANES, phb, enb)
            elif ra:
                g, pa = groups((sa,), (ena - ia) // LANES, decf, kz, off)
                cua = (pa, ia + g * LANES, pha, ena)
            elif rb:
                g, pb = groups((sb,), (enb - ib) // LANES, decf, kz, off)
                cub = (pb, ib + g * LANES, phb, enb)
            else:
                return _status(xa, cua, la), _status(xb, cub, lb)

    return decode_keys_pair


@njit(inline="always")
def _decode_groups_vector(streams, ngroups, dec, kz, off):
    return _decode_groups_vec(streams, ngroups, dec, kz, off)


@njit(inline="always")
def _decode_place_groups_vector(streams, ngroups, dec, kz, off):
    return _decode_place_groups_vec(streams, ngroups, dec, kz, off)


encode_keys_scalar, decode_keys_scalar = _encoder(False), _decoder(decode_groups_scalar)
encode_keys = _encoder(True) if simd.AVAILABLE else encode_keys_scalar
decode_keys = _decoder(_decode_groups_vector) if simd.AVAILABLE else decode_keys_scalar
# the words put together in the loop where the plan says so (extra: see _Placer); without AVX2, nowhere
decode_keys_placed = _decoder(_decode_place_groups_vector) if simd.AVAILABLE else decode_keys_scalar


@njit(inline="always")
def _one_by_one(a, b, dec, kz, off):
    """:func:`decode_keys_pair` without AVX2: each segment alone (its words not put together)."""
    wa, la, ca, oa, _ = a
    wb, lb, cb, ob, _ = b
    return (decode_keys_scalar(wa, la, oa.size, ca, dec, kz, off, oa),
            decode_keys_scalar(wb, lb, ob.size, cb, dec, kz, off, ob))


# two chunks' segments side by side, their words put together as decode_keys_placed's; and without that (the
# tests hold it to decode_keys)
decode_keys_pair = (_pair_decoder(_decode_place_groups_vector) if simd.AVAILABLE
                    else _one_by_one)
decode_keys_pair_plain = _pair_decoder(_decode_groups_vector) if simd.AVAILABLE else _one_by_one
