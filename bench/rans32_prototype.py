"""Prototype for a lossless format version 3: 32-bit rANS states, eight lanes per AVX2 register.

Issue 3 asks for BF16 decode at >= 1.5x ZipNN's speed on one thread. Format version 2's coder keeps
64-bit states (four per 256-bit register, ``unweight.lossless.simd``) and folds the raw bits into the
slot, which needs a slot space of 12 + 6 bits and so 64-bit states. This script measures, on the same
real symbols, what the other design would decode at: the symbol (exponent and two mantissa bits) coded
alone with 32-bit states in [2^16, 2^32), 16-bit renormalisation and a 4-byte table entry
(``freq - 1 | bias << 12 | symbol index << 24``), eight lanes per ``<8 x i32>`` (F. Giesen's SIMD rANS,
arXiv:1402.3392, section 5, widened to AVX2: the table lookups one ``vpgatherdd``, the word
hand-out a ``vpermd`` by the 8-bit mask of needy lanes), and the raw bits (sign and low mantissa)
as a separate stream packed 4 values in 3 bytes, merged back in a second pass.

The encoder side (added 2026-11-27): the same 32 lanes stepped eight per vector in generated IR
(:func:`make_encode32`: one gather of a 4-byte entry ``freq - 1 | cum << 12`` per eight values, the
division by the frequency as an exact float64 ``vdivpd``, the renormalisation words of the needy lanes
packed by ``vpermd`` and written backwards), against version 2's scalar 16-lane encode loop.

Both coders run on the same chunks of 2^18 values of every minilm-l6 matrix in BF16 (no row context,
one table per tensor, for both), in one process; decode times cover the rANS loop and, for the
prototype, the raw-bit merge (version 2's loop writes whole permuted words, so that is like for
like), encode times the rANS loop and, for the prototype, packing the raw-bit planes; every output is
checked against the input (and the vector encoder's against the scalar one's) outside the clock.

    .venv/bin/python bench/rans32_prototype.py [--lanes 32] [--reps 7]

This is the experiment that format version 3 grew out of (2026-11-28: ``unweight.lossless.rans32``,
with the symbol's one-byte code in the entry as ``--zero-codes`` has it); it is kept as the record of
the variants measured, and nothing in ``src/`` imports it. Measured here (2026-11-27, one
thread, four runs; the machine's speed drifted by a third between runs, the ratios less): version 2's
loop 1.45-1.90 ns per value; the prototype's rANS loop 0.77-1.25 (1.4-2.0x faster), with the raw-bit
merge 0.89-1.36 (1.3-1.6x); coded sizes equal to four decimals (same table, same flushed-state bytes).
Version 2's whole chunk decode adds to its loop the scatter into tensor order (0.29 ns per value) and
XXH64 (0.23), so a version 3 decoder would also have to fold the scatter into the vector loop's stores
and use a vectorised checksum to get near 1.5x ZipNN's 1.9 ns per value. Measured and not kept: 16
lanes (latency-bound, 1.37 ns), 64 lanes (0.97), a second gather for the symbol's word from a 256-entry
table (+0.4 ns per value: the entry's top byte holds the symbol's offset from the alphabet's first
instead, which needs an alphabet span under 256 values: one minilm chunk of 68 is wider).
Encode, five runs (2026-11-27): version 2's loop 2.36-3.44 ns per value, the vector encoder 1.20-1.50
(1.9-2.3x); with the raw-bit planes packed on slices (vectorised, as the merge) 1.32-1.58 (1.9-2.0x,
two runs; 1.7-2.0x while the packing was a scalar loop); decode in the same runs 1.35-1.7x with the
merge. A lane-group loop left to numba's auto-vectoriser stays scalar (6.6-7.5
ns per value), and gathering three tables plus a float64 reciprocal per value instead of one entry and
a division ran at 3.2 ns per value (AVX2 gathers are slow on this Zen 3).

Alphabets (measured 2026-11-27 with the format's per-tensor tables, ``model.plan``): the entry's offset
byte needs the alphabet to span at most 256 symbol values, which holds for 48% of minilm-l6's values and
none of smollm2-135m's or gemma3-270m's (exact zeros and tiny weights stretch a tensor's alphabet of
~130 symbols over 500-2,000 values; per 2^18-value chunk, as above, only 1 of 68 minilm chunks is
wider). The variants with no limit on the span cost on this Zen 3, where an AVX2 gather costs about as
much as the rest of a step: the slot's word from a second, 2-byte-stride gather 1.29 ns per value with
the merge (against 0.93-0.98 with the offset byte; 1.1-1.2x version 2), 8-byte entries gathered four
per ``vpgatherdq`` 1.46 (1.09x), the alphabet index looked up in a pass of its own +0.28, inside the
merge loop +1.0 (it stops the loop vectorising). What makes every alphabet narrow is setting exponent
0 apart (``--zero-codes``: the 2^K symbols of exponent 0, zeros and subnormals, keep codes of their own
and the byte holds the rest as an offset; a compare and a select more per vector): no chunk is then
skipped on any of the three models (minilm 68, smollm2-135m 438, gemma3-270m 982 chunks at K = 2), and
loop + merge run 1.74x, 1.50x and 1.49x version 2's loop, the vector encoder with its planes 1.67x,
2.05x and 1.92x (``--reps 7``, one run each, docs/results/rans32-prototype-zero-codes.json).

    .venv/bin/python bench/rans32_prototype.py --model smollm2-135m --zero-codes
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time
from pathlib import Path

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from unweight.lossless import rans, simd
from unweight.lossless.fields import as_words

PROB_BITS = 12
M = 1 << PROB_BITS
L32 = 1 << 16  # states live in [2^16, 2^32)
CHUNK = 1 << 18
RB = 6  # BF16 with k = 2: sign and five low mantissa bits
K = 2

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V8I32, _V8I16 = ir.VectorType(_I32, 8), ir.VectorType(_I16, 8)
_V4I32, _V4I64 = ir.VectorType(_I32, 4), ir.VectorType(_I64, 4)


# ---------------------------------------------------------------------------------------------
# tables and the scalar encoder (test data only: not timed)


def tables(counts: np.ndarray, offsets: np.ndarray):
    """Frequencies (rans.normalize_freqs), cumulative frequencies and the decode table (``offsets``:
    each symbol's value minus the first's, < 256, kept in the entry's top byte)."""
    freq = np.zeros(counts.size, np.uint32)
    rans.normalize_freqs(counts.astype(np.int64), freq)
    cum = np.zeros(counts.size + 1, np.int64)
    np.cumsum(freq, out=cum[1:])
    dec = np.zeros(M, np.uint32)
    for s in np.flatnonzero(freq):
        f, c = int(freq[s]), int(cum[s])
        t = np.arange(c, c + f)
        dec[c:c + f] = (f - 1) | ((t - c) << 12) | (int(offsets[s]) << 24)
    return freq, cum, dec


@njit(cache=True)
def encode32(sym, freq, cum, lanes, out):
    """Interleaved rANS32 of ``sym`` (value i on lane i % lanes), words written backwards into the
    tail of ``out`` (uint16); returns the index of the first word. Segment: the final states (two
    words each, low first, lane 0 first), then the renormalisation words in decoding order."""
    x = np.full(lanes, L32, np.uint64)
    pos = out.size
    for i in range(sym.size - 1, -1, -1):
        j = i % lanes
        s = sym[i]
        f = np.uint64(freq[s])
        v = x[j]
        if v >= (f << np.uint64(32 - PROB_BITS)):
            pos -= 1
            out[pos] = np.uint16(v & np.uint64(0xFFFF))
            v >>= np.uint64(16)
        x[j] = (v // f) * np.uint64(M) + v % f + np.uint64(cum[s])
    for j in range(lanes - 1, -1, -1):
        pos -= 2
        out[pos] = np.uint16(x[j] & np.uint64(0xFFFF))
        out[pos + 1] = np.uint16(x[j] >> np.uint64(16))
    return pos


@njit(cache=True)
def pack_raw6(raw, out):
    """Six raw bits per value as two planes laid out for vector unpacking (``n = raw.size``, a
    multiple of 4): ``n/2`` bytes of low nibbles (byte i: value i, and value i + n/2 in its high
    half), then ``n/4`` bytes of the top two bits (byte i: values i + k n/4 at bits 2k)."""
    n = raw.size
    h, q = n // 2, n // 4
    lo, hi, nib, top = raw[:h], raw[h:n], out[:h], out[h:h + q]
    for i in range(h):  # on slices, uint8 arithmetic: vectorised (as merge_raw6)
        nib[i] = (lo[i] & np.uint8(15)) | ((hi[i] & np.uint8(15)) << np.uint8(4))
    r0, r1, r2, r3 = raw[:q], raw[q:2 * q], raw[2 * q:3 * q], raw[3 * q:n]
    for i in range(q):
        top[i] = ((r0[i] >> np.uint8(4)) | ((r1[i] >> np.uint8(4)) << np.uint8(2))
                  | ((r2[i] >> np.uint8(4)) << np.uint8(4)) | ((r3[i] >> np.uint8(4)) << np.uint8(6)))


# ---------------------------------------------------------------------------------------------
# the decoders


@njit(cache=True)
def decode32_scalar(words, n, dec, base, lanes, out, zero_codes=False):
    x = np.empty(lanes, np.uint32)
    for j in range(lanes):
        x[j] = np.uint32(words[2 * j]) | (np.uint32(words[2 * j + 1]) << np.uint32(16))
    p = 2 * lanes
    for i in range(n):
        j = i % lanes
        v = x[j]
        e = dec[v & np.uint32(M - 1)]
        c = np.int64(e >> np.uint32(24))
        sym = c if zero_codes and c < 1 << K else c - (1 << K if zero_codes else 0) + base
        out[i] = np.uint16(sym << RB)
        f, bias = (e & np.uint32(0xFFF)) + np.uint32(1), (e >> np.uint32(12)) & np.uint32(0xFFF)
        v = f * (v >> np.uint32(PROB_BITS)) + bias
        if v < np.uint32(L32):
            v = (v << np.uint32(16)) | np.uint32(words[p])
            p += 1
        x[j] = v
    return p


def _avx2(mod):
    """The intrinsics both vector loops call: ``vpgatherdd``, ``vpermd`` and popcount."""
    gather = cgutils.get_or_insert_function(
        mod, ir.FunctionType(_V8I32, [_V8I32, ir.IntType(8).as_pointer(), _V8I32, _V8I32, _I8]),
        "llvm.x86.avx2.gather.d.d.256")
    permd = cgutils.get_or_insert_function(mod, ir.FunctionType(_V8I32, [_V8I32, _V8I32]), "llvm.x86.avx2.permd")
    ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(_I32, [_I32]), "llvm.ctpop.i32")
    return gather, permd, ctpop


def make_decode32(lanes: int, slot_words: bool = False, wide: bool = False, zero_codes: bool = False):
    """``decode(words, n, dec, base, out) -> p``: ``n`` (a multiple of ``lanes``) values into ``out``
    (uint16): each value's symbol ``base`` + the entry's top byte, shifted above the raw bits. (A
    second gather of the word from a 256-entry table, indexed by that byte, cost 0.4 ns per value
    more.) With ``slot_words``, ``base`` is instead a uint16 table of the word of every slot (4096 + 2
    entries), gathered by the slot alongside the entry: no limit on the alphabet's span. With ``wide``,
    ``dec`` holds 8-byte entries (the 4-byte entry, then the slot's word in the high half), gathered
    four per ``vpgatherdq``: also no limit on the span, one wider gather instead of a second one. With
    ``zero_codes``, codes below 2^K are the symbols of exponent 0 themselves (zeros, subnormals) and code
    c >= 2^K is symbol ``base + c - 2^K``: the span limit then applies to the other symbols only."""
    nvec = lanes // 8

    @intrinsic
    def groups(typingctx, words, x, ngroups, dec, base, out):
        sig = types.int64(words, x, types.int64, dec, base if slot_words else types.int64, out)

        def codegen(context, builder, signature, args):
            words_a, x_a, ng, dec_a, base_v, out_a = args
            ty = signature.args
            data = lambda t, v: simd.array_data(context, builder, t, v)  # noqa: E731
            wbase, xbase, dbase = data(ty[0], words_a), data(ty[1], x_a), data(ty[3], dec_a)
            obase = data(ty[5], out_a)
            b = builder
            gather, permd, ctpop = _avx2(b.module)
            gatherq = cgutils.get_or_insert_function(
                b.module, ir.FunctionType(_V4I64, [_V4I64, ir.IntType(8).as_pointer(), _V4I32, _V4I64, _I8]),
                "llvm.x86.avx2.gather.d.q.256")
            _ones4q = ir.Constant(_V4I64, [-1] * 4)
            lut = simd.constant_table(b.module, "proto_rans32_ranks", simd.word_ranks(8))
            splat = lambda v: ir.Constant(_V8I32, [v] * 8)  # noqa: E731
            xptrs = [b.bitcast(b.gep(xbase, [ir.Constant(_I64, 8 * v)]), _V8I32.as_pointer()) for v in range(nvec)]
            dptr = b.bitcast(dbase, ir.IntType(8).as_pointer())
            allones = splat(-1)
            if slot_words:
                wtab = b.bitcast(data(ty[4], base_v), ir.IntType(8).as_pointer())
            else:
                base = b.shuffle_vector(b.insert_element(ir.Constant(_V8I32, ir.Undefined), b.trunc(base_v, _I32),
                                                         ir.Constant(_I32, 0)),
                                        ir.Constant(_V8I32, ir.Undefined), ir.Constant(_V8I32, [0] * 8))

            starts = [ir.Constant(_I64, 0), ir.Constant(_I64, 2 * lanes)]
            head, body, done, (g, p), xs = simd.begin_loop(b, xptrs, starts)
            b.cbranch(b.icmp_signed("<", g, ng), body, done)
            b.position_at_end(body)
            nexts, pn = [], p
            for v, xv in enumerate(xs):
                slot = b.and_(xv, splat(M - 1))
                if wide:
                    halves = []
                    for h in range(2):
                        idx = b.shuffle_vector(slot, slot, ir.Constant(_V4I32, [4 * h + j for j in range(4)]))
                        halves.append(b.bitcast(b.call(gatherq, [ir.Constant(_V4I64, ir.Undefined), dptr, idx,
                                                                 _ones4q, ir.Constant(_I8, 8)]), _V8I32))
                    # even 32-bit elements: the entries; odd: the words
                    e = b.shuffle_vector(halves[0], halves[1], ir.Constant(_V8I32, [0, 2, 4, 6, 8, 10, 12, 14]))
                    ws = b.shuffle_vector(halves[0], halves[1], ir.Constant(_V8I32, [1, 3, 5, 7, 9, 11, 13, 15]))
                else:
                    e = b.call(gather, [ir.Constant(_V8I32, ir.Undefined), dptr, slot, allones, ir.Constant(_I8, 4)])
                    if slot_words:  # 4-byte reads at a 2-byte stride: the slot's word in the low half
                        ws = b.call(gather, [ir.Constant(_V8I32, ir.Undefined), wtab, slot, allones,
                                             ir.Constant(_I8, 2)])
                    elif zero_codes:  # a compare and a select more
                        c = b.lshr(e, splat(24))
                        off = b.select(b.icmp_unsigned("<", c, splat(1 << K)), splat(0),
                                       b.sub(base, splat(1 << K)))
                        ws = b.shl(b.add(c, off), splat(RB))
                    else:  # the entry's top byte is the symbol's offset from the alphabet's first symbol
                        ws = b.shl(b.add(b.lshr(e, splat(24)), base), splat(RB))
                i = b.add(b.mul(g, ir.Constant(_I64, lanes)), ir.Constant(_I64, 8 * v))
                b.store(b.trunc(ws, _V8I16), b.bitcast(b.gep(obase, [i]), _V8I16.as_pointer()), align=2)
                f = b.add(b.and_(e, splat(0xFFF)), splat(1))
                bias = b.and_(b.lshr(e, splat(12)), splat(0xFFF))
                xn = b.add(b.mul(f, b.lshr(xv, splat(PROB_BITS))), bias)
                need = b.icmp_unsigned("<", xn, splat(L32))
                mask = b.zext(b.bitcast(need, ir.IntType(8)), _I32)
                w8 = b.load(b.bitcast(b.gep(wbase, [pn]), _V8I16.as_pointer()), align=2)
                ranks = b.load(b.gep(lut, [ir.Constant(_I32, 0), mask]), align=32)
                w = b.call(permd, [b.zext(w8, _V8I32), ranks])
                xn = b.select(need, b.or_(b.shl(xn, splat(16)), w), xn)
                nexts.append(xn)
                pn = b.add(pn, b.zext(b.call(ctpop, [mask]), _I64))
            simd.end_loop(b, head, done, [(g, b.add(g, ir.Constant(_I64, 1))), (p, pn), *zip(xs, nexts)], xs, xptrs)
            return p

        return sig, codegen

    @njit(cache=False)
    def decode(words, n, dec, base, out):
        x = np.empty(lanes, np.uint32)
        for j in range(lanes):
            x[j] = np.uint32(words[2 * j]) | (np.uint32(words[2 * j + 1]) << np.uint32(16))
        return groups(words, x, n // lanes, dec, base, out)

    return decode


def make_encode32(lanes: int):
    """``encode(sym, entries, out) -> p``: :func:`encode32` with ``lanes`` (a multiple of 8) states
    stepped eight per ``<8 x i32>``, ``sym.size`` a multiple of ``lanes``; ``entries[s] = freq - 1 |
    cum << 12``, one ``vpgatherdd`` per eight values. The division by the frequency is a float64
    division (``vdivpd``), exact for states below 2^32 (the quotient's rounding error is below 2^-20,
    the distance from a non-integer quotient to the next integer at least 2^-12); the renormalisation
    words of the needy lanes are packed by ``vpermd`` (:func:`simd.high_ranks`) and written backwards."""
    nvec = lanes // 8
    v8d = ir.VectorType(ir.DoubleType(), 8)

    @intrinsic
    def groups(typingctx, sym, x, ngroups, ent, out, pos0):
        sig = types.int64(sym, x, types.int64, ent, out, types.int64)

        def codegen(context, builder, signature, args):
            sym_a, x_a, ng, ent_a, out_a, pos_v = args
            ty = signature.args
            data = lambda t, v: simd.array_data(context, builder, t, v)  # noqa: E731
            sbase, xbase, obase = data(ty[0], sym_a), data(ty[1], x_a), data(ty[4], out_a)
            b = builder
            eptr = b.bitcast(data(ty[3], ent_a), ir.IntType(8).as_pointer())
            gather, permd, ctpop = _avx2(b.module)
            lut = simd.constant_table(b.module, "proto_rans32_high_ranks", simd.high_ranks(8))
            splat = lambda v: ir.Constant(_V8I32, [v] * 8)  # noqa: E731
            xptrs = [b.bitcast(b.gep(xbase, [ir.Constant(_I64, 8 * v)]), _V8I32.as_pointer()) for v in range(nvec)]
            head, body, done, (g, p), xs = simd.begin_loop(b, xptrs, [ng, pos_v])
            b.cbranch(b.icmp_signed(">", g, ir.Constant(_I64, 0)), body, done)
            b.position_at_end(body)
            gm = b.sub(g, ir.Constant(_I64, 1))
            nexts = [None] * nvec
            pn = p
            for v in range(nvec - 1, -1, -1):  # backwards: the last vector's words come last
                xv = xs[v]
                i = b.add(b.mul(gm, ir.Constant(_I64, lanes)), ir.Constant(_I64, 8 * v))
                s = b.zext(b.load(b.bitcast(b.gep(sbase, [i]), _V8I16.as_pointer()), align=2), _V8I32)
                e = b.call(gather, [ir.Constant(_V8I32, ir.Undefined), eptr, s, splat(-1), ir.Constant(_I8, 4)])
                f = b.add(b.and_(e, splat(0xFFF)), splat(1))
                need = b.icmp_unsigned(">=", xv, b.shl(f, splat(32 - PROB_BITS)))
                xr = b.select(need, b.lshr(xv, splat(16)), xv)
                q = b.fptosi(b.fdiv(b.uitofp(xr, v8d), b.uitofp(f, v8d)), _V8I32)
                # x' = (x div f) * M + x mod f + cum = x + cum + q * (M - f)
                nexts[v] = b.add(b.add(xr, b.lshr(e, splat(12))), b.mul(q, b.sub(splat(M), f)))
                mask = b.zext(b.bitcast(need, ir.IntType(8)), _I32)
                ranks = b.load(b.gep(lut, [ir.Constant(_I32, 0), mask]), align=32)
                words = b.trunc(b.call(permd, [xv, ranks]), _V8I16)
                b.store(words, b.bitcast(b.gep(obase, [b.sub(pn, ir.Constant(_I64, 8))]), _V8I16.as_pointer()),
                        align=2)
                pn = b.sub(pn, b.zext(b.call(ctpop, [mask]), _I64))
            simd.end_loop(b, head, done, [(g, gm), (p, pn), *zip(xs, nexts)], xs, xptrs)
            return p

        return sig, codegen

    @njit(cache=False)
    def encode(sym, ent, out):
        x = np.full(lanes, L32, np.uint32)
        pos = groups(sym, x, sym.size // lanes, ent, out, out.size)
        for j in range(lanes - 1, -1, -1):  # the final states open the segment, lane 0 first
            pos -= 2
            out[pos] = np.uint16(x[j] & np.uint32(0xFFFF))
            out[pos + 1] = np.uint16(x[j] >> np.uint32(16))
        return pos

    return encode


@njit(cache=True)
def merge_raw6(packed, n, out):
    """``out[i] |= raw[i]`` from :func:`pack_raw6`'s planes. Written on slices with uint8
    arithmetic, which the compiler vectorises (indexing ``out[i + h]`` with int64 did not: 0.84
    against 0.12 ns per value)."""
    h, q = n // 2, n // 4
    nib, top = packed[:h], packed[h:h + q]
    lo, hi = out[:h], out[h:n]
    for i in range(h):
        v = nib[i]
        lo[i] = lo[i] | (v & np.uint8(15))
        hi[i] = hi[i] | (v >> np.uint8(4))
    for k in range(4):
        part = out[k * q:(k + 1) * q]
        s = np.uint8(2 * k)
        for i in range(q):
            part[i] = part[i] | (np.uint16((top[i] >> s) & np.uint8(3)) << np.uint16(4))


# ---------------------------------------------------------------------------------------------
# version 2's loop on the same values


@njit(cache=True)
def v2_decode(code, seglen, n, counts, dec, out):
    return rans.decode_words(code, 0, seglen, n, counts, dec, out, RB)


@njit(cache=True)
def encode_v2(words, enc, scratch):
    return rans.encode_words(words, words.size, enc, scratch, RB)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=32, help="32-bit lanes (a multiple of 8)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench/results/rans32_prototype.json")
    ap.add_argument("--model", default="minilm-l6", help="minilm-l6, smollm2-135m or gemma3-270m (BF16)")
    ap.add_argument("--zero-codes", action="store_true",
                    help="symbols of exponent 0 get codes of their own; the byte limit holds for the rest")
    args = ap.parse_args()
    if not simd.AVAILABLE:
        raise SystemExit("needs AVX2 (and numba compiling for this machine)")
    torch.set_num_threads(1)
    from lossless import load_model  # bench/lossless.py: the bundled models, offline
    weights = load_model(args.model)
    decode32 = make_decode32(args.lanes, zero_codes=args.zero_codes)
    decode32w = make_decode32(args.lanes, slot_words=True)
    decode32q = make_decode32(args.lanes, wide=True)
    encode32_vec = make_encode32(args.lanes)

    cases = []  # per chunk: inputs of both decoders
    skipped = 0
    for t in weights.values():
        if t.dim() != 2 or t.numel() < CHUNK:
            continue
        v = as_words(t.to(torch.bfloat16)).astype(np.int64)
        for c0 in range(0, v.size - CHUNK + 1, CHUNK):  # whole chunks only: multiples of both lane counts
            vals = v[c0:c0 + CHUNK]
            body = vals & 0x7FFF
            u = ((body >> 5) << 6) | ((vals >> 15) << 5) | (body & 31)  # rans.permute: sign below the symbol
            sym_val = u >> RB
            alphabet, sym = np.unique(sym_val, return_inverse=True)
            if args.zero_codes:  # exponent 0 (symbols below 2^K) keeps its own codes
                rest = alphabet[alphabet >= 1 << K]
                base0 = int(rest[0]) if rest.size else 0
                offsets = np.where(alphabet < 1 << K, alphabet, alphabet - base0 + (1 << K))
            else:
                base0, offsets = int(alphabet[0]), alphabet - alphabet[0]
            if offsets.max() > 255 or alphabet.size > 256:
                skipped += 1  # the prototype's entry holds the symbol in one byte
                continue
            freq, cum, dec32 = tables(np.bincount(sym, minlength=alphabet.size), offsets)
            words32 = np.empty(2 * CHUNK + 4 * args.lanes, np.uint16)
            p = encode32(sym.astype(np.int64), freq, cum, args.lanes, words32)
            seg32 = np.ascontiguousarray(np.concatenate([words32[p:], np.zeros(32, np.uint16)]))
            raw = (u & 63).astype(np.uint8)
            packed = np.zeros(CHUNK * 3 // 4, np.uint8)
            pack_raw6(raw, packed)
            # version 2: the same table (one phase), 64-bit states, raw bits in the slot
            enc = np.zeros((rans.ENC_ROWS, 1, 1 << (8 + K)), np.uint64)
            dec64 = np.zeros((1, rans.PROB_SCALE), np.uint64)
            f2 = freq[None, :].astype(np.uint32)
            assert rans.build_tables(alphabet.astype(np.int64), f2, RB, enc, dec64) == -1
            scratch = np.empty(CHUNK + 2 * rans.LANES + 2, np.uint32)
            wv2 = u.astype(np.uint32)
            q = rans.encode_words(wv2, CHUNK, enc, scratch, RB)
            code2 = np.concatenate([scratch[q:].view(np.uint8), np.zeros(rans.STREAM_PAD, np.uint8)])
            seglen2 = (scratch.size - q) * 4
            entries = ((freq.astype(np.int64) - 1) | (cum[:-1] << 12)).astype(np.uint32)
            # every slot's word in a table of its own, gathered by the slot (no limit on the span)
            slot_tab = np.zeros(M + 2, np.uint16)
            slot_tab[:M] = (alphabet[np.searchsorted(cum[1:], np.arange(M), side="right")] << RB)
            dec64w = dec32.astype(np.uint64) | (slot_tab[:M].astype(np.uint64) << np.uint64(32))
            cases.append(dict(u=u.astype(np.uint16), seg32=seg32, dec32=dec32, packed=packed,
                              base=base0, code2=code2, seglen2=seglen2,
                              dec64=dec64, bytes32=seg32.size * 2 - 64 + packed.size,
                              bytes2=seglen2, sym16=sym.astype(np.uint16), entries=entries, raw=raw,
                              wv2=wv2, enc2=enc, words32=words32[p:].copy(), slot_tab=slot_tab,
                              dec64w=dec64w))
    n = CHUNK * len(cases)
    print(f"{len(cases)} chunks of {CHUNK} values ({skipped} skipped: alphabet wider than 256 values)")
    out16 = np.empty(CHUNK, np.uint16)
    counts = np.array([CHUNK], np.int64)

    def run_v2():
        for c in cases:
            assert v2_decode(c["code2"], c["seglen2"], CHUNK, counts, c["dec64"], out16) == rans.OK

    scratch2 = np.empty(CHUNK + 2 * rans.LANES + 2, np.uint32)
    out32 = np.empty(2 * CHUNK + 4 * args.lanes, np.uint16)
    planes = np.zeros(CHUNK * 3 // 4, np.uint8)

    def run_v2_encode():
        for c in cases:
            encode_v2(c["wv2"], c["enc2"], scratch2)

    def run_v3_encode(pack: bool):
        def f():
            for c in cases:
                encode32_vec(c["sym16"], c["entries"], out32)
                if pack:
                    pack_raw6(c["raw"], planes)
        return f

    def run_v3_wide():
        for c in cases:
            decode32q(c["seg32"], CHUNK, c["dec64w"], 0, out16)
            merge_raw6(c["packed"], CHUNK, out16)

    def run_v3_slot_words():
        for c in cases:
            decode32w(c["seg32"], CHUNK, c["dec32"], c["slot_tab"], out16)
            merge_raw6(c["packed"], CHUNK, out16)

    def run_v3(merge: bool):
        def f():
            for c in cases:
                decode32(c["seg32"], CHUNK, c["dec32"], c["base"], out16)
                if merge:
                    merge_raw6(c["packed"], CHUNK, out16)
        return f

    # correctness, outside the clocks
    for c in cases[:3]:
        v2_decode(c["code2"], c["seglen2"], CHUNK, counts, c["dec64"], out16)
        assert np.array_equal(out16, c["u"]), "version 2 loop"
        ref = np.empty(CHUNK, np.uint16)
        decode32_scalar(c["seg32"], CHUNK, c["dec32"], c["base"], args.lanes, ref, args.zero_codes)
        decode32(c["seg32"], CHUNK, c["dec32"], c["base"], out16)
        assert np.array_equal(out16, ref), "vector decoder differs from the scalar one"
        merge_raw6(c["packed"], CHUNK, out16)
        assert np.array_equal(out16, c["u"]), "prototype does not round-trip"
        decode32w(c["seg32"], CHUNK, c["dec32"], c["slot_tab"], out16)
        merge_raw6(c["packed"], CHUNK, out16)
        assert np.array_equal(out16, c["u"]), "the slot-word decoder does not round-trip"
        decode32q(c["seg32"], CHUNK, c["dec64w"], 0, out16)
        merge_raw6(c["packed"], CHUNK, out16)
        assert np.array_equal(out16, c["u"]), "the 8-byte-entry decoder does not round-trip"
        p = encode32_vec(c["sym16"], c["entries"], out32)
        assert np.array_equal(out32[p:], c["words32"]), "vector encoder differs from the scalar one"

    groups = {"decode": {"v2 (64-bit, 16 lanes, raw bits in the slot)": run_v2,
                         f"v3 prototype rANS loop ({args.lanes} x 32-bit lanes, words out)": run_v3(False),
                         "v3 prototype + raw-bit merge": run_v3(True),
                         "v3 prototype, word gathered by slot + merge": run_v3_slot_words,
                         "v3 prototype, 8-byte entries (vpgatherdq) + merge": run_v3_wide},
              "encode": {"v2 encode loop (64-bit, 16 lanes, four per vector)": run_v2_encode,
                         f"v3 prototype vector encode ({args.lanes} x 32-bit lanes)": run_v3_encode(False),
                         "v3 prototype vector encode + raw-bit planes": run_v3_encode(True)}}
    best = {k: float("inf") for g in groups.values() for k in g}
    for _ in range(args.reps):  # interleaved, best of reps
        for g in groups.values():
            for k, f in g.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
    rows = {}
    for g in groups.values():
        base = best[next(iter(g))]
        rows.update({k: {"ns_per_value": best[k] / n * 1e9, "speedup_vs_v2": base / best[k]} for k in g})
    b2 = sum(c["bytes2"] for c in cases)
    b3 = sum(c["bytes32"] for c in cases)
    result = {"values": n, "chunks": len(cases), "skipped": skipped, "lanes": args.lanes, "timings": rows,
              "bits_per_value_v2_stream": b2 * 8 / n, "bits_per_value_v3_streams": b3 * 8 / n}
    for k, r in rows.items():
        print(f"{k:60s} {r['ns_per_value']:.3f} ns/value  {r['speedup_vs_v2']:.2f}x")
    print(f"coded size, bits per value: v2 {b2 * 8 / n:.4f}, prototype {b3 * 8 / n:.4f} (tables excluded)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
