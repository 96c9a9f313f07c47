"""Interleaved rANS with the raw bits folded into the slot, compiled with numba.

rANS: J. Duda, "Asymmetric numeral systems" (arXiv:1311.2540); the interleaved, word-renormalised
form follows F. Giesen, "Interleaved entropy coders" (arXiv:1402.3392) and his rans64 coder.

Every value is one coding step on its *permuted word* ``u = sym << rb | raw`` (:func:`permute`):
``sym`` (exponent and top mantissa bits) is coded with a static frequency table of precision
``PROB_BITS``; the ``rb`` raw bits (sign, low mantissa) ride along uniformly as the low bits of the
slot ``(cum + rank) << rb | raw``. One table lookup then yields the whole word and the next state:
``u = x + delta[t]`` (mod 2^16), ``x' = f[t] * (x >> (PROB_BITS + rb)) + rank[t]``.
States are 64 bits in ``[2^32, 2^64)``, renormalised by whole 32-bit words (at most one per step,
branchless), ``LANES`` of them interleaved round-robin over one word stream; every lane starts and
ends at ``2^32``, which the decoder checks. The chunk kernels are inlined into per-word-width
drivers (``chunks.range_kernels``) that pass ``hbits`` as a constant and ``rb`` at run time.

Speed (one thread, measured on minilm-l6 in BF16): the encoder divides by ``f`` with a
precomputed reciprocal and one 64x64->128-bit multiply (:func:`mulhi`, as rans64.h does), exact
and branch-free; a float estimate with corrections compiled to a branch that mispredicted on about
half of the values and cost 2.5x. Both directions first (un)gather a chunk's words into coding
order in a pass the compiler vectorises, so the rANS loop itself is a flat run over an array.
The decoder steps whole groups of 16 values four lanes per AVX2 vector (``simd.py``): 1.57 ns per
value against 2.12 for version 1's scalar 4-lane loop (which ran about 22 instructions a value).
It needs 16 lanes: four lanes in one vector are one chain of dependent steps (4.8 ns per value,
slower than scalar), eight 2.4, sixteen 1.34, thirty-two 1.20 (on synthetic streams).
Tried and not kept: a fused decode that writes unpermuted words from the rANS loop (slower: the
separate pass is vectorised), a 4-byte decode entry with a second lookup for the word, 8 scalar
lanes (no gain: the scalar loop is bound by instructions, not latency), and AVX2 gathers for the
table lookups (1.46 against 1.34 ns per value with four scalar loads).

Chosen over canonical Huffman by measurement on minilm-l6 in BF16: on the same symbols (exponent
and two mantissa bits), 12-bit-limited Huffman code lengths cost 0.052 bit per weight more than
this coder's 12-bit frequencies without row context and 0.040 with 16 row buckets; that alone
would put the format above the order-0 bound it must reach. Huffman's multi-symbol table decode
would be faster; rANS here costs one table lookup per value.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from unweight.lossless import simd

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
ENC_ROWS = 5  # rows of the encoder table (build_tables)
LANES = 16
STATE_LOW = 1 << 32
STATE_BYTES = 8 * LANES  # the flushed states that open every coded segment
STREAM_PAD = 4 * LANES  # zero bytes after the last segment, so a decoder may read ahead

OK = 0
ERR_OVERRUN = 1  # a segment ran out of words (or is too short to hold the states)
ERR_STATE = 2  # a segment did not end in the initial states with every word consumed

_L = np.uint64(STATE_LOW)
_LO32 = np.uint64(0xFFFFFFFF)
_U16 = np.uint64(0xFFFF)
_T = np.uint64(PROB_SCALE - 1)
_SH16 = np.uint64(16)
_SH32 = np.uint64(32)


# ---------------------------------------------------------------------------------------------
# frequency tables


@njit(cache=True, nogil=True)
def normalize_freqs(counts, out):
    """Scale ``counts`` to integer frequencies summing to ``PROB_SCALE``; every seen symbol keeps
    at least 1. Rounded to nearest first; the few units of rounding error left are settled one at
    a time by the move that costs fewest bits."""
    total = 0
    for c in counts:
        total += c
    out[:] = 0
    if total == 0:
        return
    assigned = 0
    for i in range(counts.size):
        if counts[i] > 0:
            out[i] = max(1, (2 * counts[i] * PROB_SCALE + total) // (2 * total))
            assigned += out[i]
    while assigned != PROB_SCALE:
        best = -1
        best_cost = np.inf
        grow = assigned < PROB_SCALE
        for i in range(counts.size):
            c = counts[i]
            f = np.float64(out[i])
            if c == 0 or (not grow and f == 1.0):
                continue
            # first-order cost of the move: c * log2(1 + 1/f) saved or c * log2(f/(f-1)) lost
            cost = -c / (f + 0.5) if grow else c / (f - 0.5)
            if cost < best_cost:
                best_cost = cost
                best = i
        out[best] += 1 if grow else -1
        assigned += 1 if grow else -1


@njit(cache=True, nogil=True)
def coded_bits(counts, freqs):
    """Bits the coder spends on symbols with these ``counts`` under these ``freqs``."""
    bits = 0.0
    for i in range(counts.size):
        if counts[i] > 0:
            bits += counts[i] * (PROB_BITS - np.log2(freqs[i]))
    return bits


@njit(cache=True, nogil=True)
def build_tables(alphabet, freq, rb, enc, dec):
    """Coding tables from the ascending ``alphabet`` (symbol values) and ``freq[ctx, symbol index]``.

    ``enc[:, ctx, sym] = (rcp, x_max, bias, shift | (PROB_SCALE - f) << 32, a | f << 32 | cum << 45)`` for
    the encoder (:func:`_enc_entry`; ``x_max = f << (64 - PROB_BITS - rb)``, the renormalisation
    threshold; the last row is the vector encoder's, ``a = (2^32 - 1) // f``, see
    ``simd.make_encode_groups``; ``ENC_ROWS`` rows);
    ``dec[ctx, t] = rank | ((sym - t) << rb mod 2^16) << 16 | f << 32`` for the decoder (one
    lookup gives the whole permuted word and the next state; measured faster than a 4-byte entry
    with a second lookup for the word). Either table may come with no contexts (``enc`` of shape
    ``(ENC_ROWS, 0, 0)``, ``dec`` of ``(0, 0)``) to build only the other. Returns the first context whose
    frequencies are not a valid table, or -1.
    """
    nctx, nsym = freq.shape
    if enc.shape[1] > 0 and enc.shape[0] != ENC_ROWS:
        raise ValueError("build_tables: the encoder table needs ENC_ROWS rows")
    for c in range(nctx):
        acc = 0
        for d in range(nsym):
            f = np.int64(freq[c, d])
            if acc + f > PROB_SCALE:
                return c
            sym = np.int64(alphabet[d])
            if f > 0 and enc.shape[1] > 0:
                rcp, shift, bias = _enc_entry(f, acc)
                enc[0, c, sym] = rcp
                enc[1, c, sym] = np.uint64(f) << np.uint64(64 - PROB_BITS - rb)
                enc[2, c, sym] = np.uint64(bias)
                enc[3, c, sym] = np.uint64(shift) | (np.uint64(PROB_SCALE - f) << _SH32)
                enc[4, c, sym] = (np.uint64(0xFFFFFFFF // f) | (np.uint64(f) << _SH32)
                                  | (np.uint64(acc) << np.uint64(45)))
            for t in range(acc, acc + f if dec.shape[0] > 0 else acc):
                delta = ((sym - t) << rb) & 0xFFFF
                dec[c, t] = np.uint64(t - acc) | (np.uint64(delta) << _SH16) | (np.uint64(f) << _SH32)
            acc += f
        if acc != PROB_SCALE:
            return c
    return -1


@njit(inline="always")
def _enc_entry(f, cum):
    """Division by ``f`` as a multiply (Alverson's reciprocal, as in F. Giesen's rans64.h):
    ``x // f == mulhi(x, rcp) >> shift`` for every ``x < 2^63``, and the step
    ``x' = x + bias + (x // f) * (PROB_SCALE - f)`` equals ``(x // f) * PROB_SCALE + x % f + cum``.
    ``f == 1`` takes ``rcp = 2^64 - 1`` (``mulhi = x - 1``) with the missing ``PROB_SCALE - 1``
    folded into the bias."""
    if f < 2:
        rcp = np.uint64(0xFFFFFFFFFFFFFFFF)
        shift = 0
        bias = cum + PROB_SCALE - 1
    else:
        shift = 0
        while f > (1 << shift):
            shift += 1
        # ceil(2^(shift + 63) / f) by long division in two 32-bit halves
        x1 = np.uint64(1) << np.uint64(shift + 31)
        uf = np.uint64(f)
        t1 = x1 // uf
        x0 = np.uint64(f - 1) + ((x1 % uf) << _SH32)
        rcp = x0 // uf + (t1 << _SH32)
        shift -= 1
        bias = cum
    return rcp, shift, bias


@intrinsic
def mulhi(typingctx, a, b):
    """The high 64 bits of the 128-bit product of two uint64 (one x86 ``mul``)."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):
        wide = ir.IntType(128)
        prod = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(prod, ir.Constant(wide, 64)), ir.IntType(64))
    return sig, codegen


# ---------------------------------------------------------------------------------------------
# the permuted word: sign moved below the top mantissa bits, so that sign and low mantissa are the
# low ``rb = shift + 1`` bits of the word


@njit(inline="always")
def permute(v, shift, hbits):
    body = v & ((1 << (hbits - 1)) - 1)
    return ((body >> shift) << (shift + 1)) | ((v >> (hbits - 1)) << shift) | (body & ((1 << shift) - 1))


@njit(inline="always")
def unpermute(u, hbits, rb):
    """Inverse of :func:`permute` on one word (``u < 2^hbits``)."""
    sign = (u >> (rb - 1)) & 1
    return (sign << (hbits - 1)) | ((u >> rb) << (rb - 1)) | (u & ((1 << (rb - 1)) - 1))


# ---------------------------------------------------------------------------------------------
# chunk kernels. They take the word width ``hbits`` and raw-bit count ``rb`` as arguments and are
# inlined into callers (``chunks.range_kernels``) that pass ``hbits`` as a constant; ``rb`` is a
# run-time value except in the decoder's scatter, which is inlined once per raw-bit count in use.
# Both directions work in two passes: the words of a chunk are first put in coding order (phase by
# phase, exponents lowered), so that the rANS loop itself is one tight, branch-free run over a flat
# array.


@njit(inline="always")
def gather_chunk(vals, hi_shift, ebits, c0, n, row_len, q, nph, words, hbits, rb):
    """``words[i]`` = the exponent-lowered permuted word of the chunk's ``i``-th value in coding
    order, with its phase above bit ``hbits`` (so ``words[i] >> rb`` indexes ``enc[:, phase, sym]``
    with the context axes flattened)."""
    emask = (1 << ebits) - 1
    eshift = hbits - ebits
    r0 = c0 // row_len
    r1 = (c0 + n - 1) // row_len
    m = 0
    for ph in range(nph):
        tag = np.uint32(ph << hbits)
        for r in range(r0, r1 + 1):
            qr = np.int64(q[r])
            if qr % nph != ph:
                continue
            sub = ((qr // nph) & emask) << eshift
            s = max(c0, r * row_len)
            e = min(c0 + n, (r + 1) * row_len)
            seg = vals[s:e]
            dst = words[m:m + (e - s)]
            for i in range(e - s):
                u = permute(np.int64(seg[i]) >> hi_shift, rb - 1, hbits) - sub
                dst[i] = tag | np.uint32(u & ((1 << hbits) - 1))
            m += e - s


@njit(inline="always")
def _estep(x, wd, e0, e1, e2, e3, rb):
    """Encode the tagged word ``wd`` into state ``x``. Returns (new state, the low word to emit,
    whether to emit it): the caller always writes the word and only moves its position when
    needed, so renormalisation costs no branch."""
    t = np.uint64(wd >> rb)
    sc = e3[t]
    need = x >= e1[t]
    w = np.uint32(x & _LO32)
    x = (x >> _SH32) if need else x
    q = mulhi(x, e0[t]) >> (sc & np.uint64(63))
    x = ((x + e2[t] + q * (sc >> _SH32)) << np.uint64(rb)) | np.uint64(wd & ((1 << rb) - 1))
    return x, w, np.uint64(need)


def _unrolled_encoder(vector: bool):
    """:func:`encode_words`, generated with one local per lane and the step over the lanes written
    out: with the states in a local array LLVM keeps them in memory and the loop runs 3x slower
    (measured on minilm-l6 in BF16: 7.0 against 2.3 ns per value). With ``vector``, the whole
    groups of ``LANES`` values go to :func:`simd.make_encode_groups` (the same words, bit for bit)."""
    lanes = range(LANES - 1, -1, -1)
    locs = ", ".join(f"x{j}" for j in range(LANES))
    elems = ", ".join(f"x[{j}]" for j in range(LANES))
    steps = "".join(f"""
        x{j}, w, need = _estep(x{j}, words[i + np.uint64({j})], e0, e1, e2, e3, rb)
        scratch[pos - one] = w
        pos -= need""" for j in lanes)
    groups = ("""
    pos = np.uint64(encode_groups(words, x, np.int64(n // LANES), enc[4].reshape(-1), scratch, np.int64(pos),
                                  np.int64(rb)))""" if vector else f"""
    {locs} = {elems}
    for _ in range(n // LANES):
        i -= np.uint64(LANES){steps}
    {elems} = {locs}""")
    src = f"""
def encode_words(words, n, enc, scratch, rb):
    # four flat arrays rather than one of 4-wide rows: each load is then base + index * 8
    e0, e1 = enc[0].reshape(-1), enc[1].reshape(-1)
    e2, e3 = enc[2].reshape(-1), enc[3].reshape(-1)
    x = np.full(LANES, _L, np.uint64)
    pos = np.uint64(scratch.size)
    one = np.uint64(1)
    i = np.uint64(n)
    while i & np.uint64(LANES - 1):  # the last n % LANES values, one at a time
        i -= one
        lane = i & np.uint64(LANES - 1)
        x[lane], w, need = _estep(x[lane], words[i], e0, e1, e2, e3, rb)
        scratch[pos - one] = w
        pos -= need{groups}
    for j in range(LANES - 1, -1, -1):  # the final states open the segment, lane 0 first
        scratch[pos - one] = np.uint32(x[j] >> _SH32)
        scratch[pos - np.uint64(2)] = np.uint32(x[j] & _LO32)
        pos -= np.uint64(2)
    return np.int64(pos)
"""
    scope = {"np": np, "LANES": LANES, "_L": _L, "_SH32": _SH32, "_LO32": _LO32, "_estep": _estep,
             "encode_groups": simd.make_encode_groups(LANES, PROB_BITS) if vector else None}
    exec(compile(src, f"<rans.encode_words, {LANES} lanes{', vector' if vector else ''}>", "exec"), scope)
    fn = scope["encode_words"]
    fn.__doc__ = """rANS-encode ``words[:n]`` (from :func:`gather_chunk`) into the tail of ``scratch``
    (uint32); value ``i`` uses lane ``i % LANES``, and the words a group of lanes needs are laid
    out in lane order. Returns the index of the segment's first word in ``scratch``."""
    return njit(inline="always")(fn)


encode_words_scalar = _unrolled_encoder(vector=False)
encode_words = _unrolled_encoder(vector=True) if simd.AVAILABLE else encode_words_scalar


@njit(inline="always")
def _dstep(x, words, p, dec, tb, rb):
    e = dec[tb + ((x >> np.uint64(rb)) & _T)]
    u = x + (e >> _SH16)
    x = (e >> _SH32) * (x >> np.uint64(PROB_BITS + rb)) + (e & _U16)
    w = np.uint64(words[p])
    need = x < _L
    x = ((x << _SH32) | w) if need else x
    return x, p + np.uint64(need), u


@njit(inline="always")
def phase_counts(c0, n, row_len, q, nph, counts):
    """``counts[ph]`` = values of the chunk in phase ``ph`` (the runs of the coding order)."""
    counts[:] = 0
    for r in range(c0 // row_len, (c0 + n - 1) // row_len + 1):
        counts[np.int64(q[r]) % nph] += min(c0 + n, (r + 1) * row_len) - max(c0, r * row_len)


@njit(inline="always")
def decode_groups_scalar(words, p, limit, dec, tb, out, i, ngroups, x, rb):
    """Decode ``ngroups`` whole groups of ``LANES`` values with the states ``x`` (uint64[LANES],
    updated in place) from ``words`` (uint32) at ``p`` into ``out[i:]``, with the flat decode
    table ``dec`` at offset ``tb``. Returns ``(p, i)``; stops before a group when ``p > limit``
    (the caller reports the overrun). ``simd.make_decode_groups`` is the vector form."""
    for _ in range(ngroups):
        if p > limit:
            break
        for j in range(LANES):
            x[j], p, u = _dstep(x[j], words, p, dec, tb, rb)
            out[i + np.uint64(j)] = np.uint16(u & _U16)
        i += np.uint64(LANES)
    return p, i


decode_groups = simd.make_decode_groups(LANES, PROB_BITS) if simd.AVAILABLE else decode_groups_scalar


@njit(inline="always")
def decode_words(code, seg0, seglen, n, counts, dec, out, rb):
    """Decode one chunk's segment ``code[seg0:seg0 + seglen]`` into ``out[:n]``: the permuted,
    exponent-lowered words in coding order (low 16 bits meaningful), ``counts[ph]`` values per
    phase. ``code`` must hold ``STREAM_PAD`` readable bytes past the segment.
    Returns OK, ERR_OVERRUN or ERR_STATE."""
    limit = seglen // 4
    if seglen % 4 != 0 or limit < 2 * LANES or seg0 + seglen + STREAM_PAD > code.size:
        return ERR_OVERRUN
    words = code[seg0:seg0 + seglen + STREAM_PAD].view(np.uint32)
    ulimit = np.uint64(limit)
    decf = dec.reshape(-1)
    x = np.empty(LANES, np.uint64)
    for j in range(LANES):
        x[j] = np.uint64(words[2 * j]) | (np.uint64(words[2 * j + 1]) << _SH32)
    p = np.uint64(2 * LANES)
    i = np.uint64(0)
    one = np.uint64(1)
    lanes_mask = np.uint64(LANES - 1)
    for ph in range(counts.size):
        tb = np.uint64(ph * PROB_SCALE)
        end = i + np.uint64(counts[ph])
        while i < end:
            if i & lanes_mask == 0 and i + np.uint64(LANES) <= end:  # whole lane groups
                p, i = decode_groups(words, p, ulimit, decf, tb, out, i, (end - i) // np.uint64(LANES), x,
                                     np.uint64(rb))
            else:  # a run's ragged ends, one value at a time
                lane = i & lanes_mask
                x[lane], p, u = _dstep(x[lane], words, p, decf, tb, rb)
                out[i] = np.uint16(u & _U16)
                i += one
            if p > ulimit:
                return ERR_OVERRUN
    if p != ulimit:
        return ERR_STATE
    for j in range(LANES):
        if x[j] != _L:
            return ERR_STATE
    return OK


@njit(inline="always")
def scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, low, hbits, rb):
    """Inverse of :func:`gather_chunk`: put the decoded coding-order ``words`` back at
    ``out[c0 + i]`` as hi words, exponents raised and unpermuted; with a non-empty ``low``
    (FP32), ``out`` holds whole 32-bit values ``hi << 16 | low[i]``."""
    emask = (1 << ebits) - 1
    eshift = hbits - ebits
    wmask = np.uint32((1 << hbits) - 1)
    r0 = c0 // row_len
    r1 = (c0 + n - 1) // row_len
    is32 = low.size > 0
    m = 0
    for ph in range(nph):
        for r in range(r0, r1 + 1):
            qr = np.int64(q[r])
            if qr % nph != ph:
                continue
            add = np.uint32(((qr // nph) & emask) << eshift)
            s = max(c0, r * row_len)
            e = min(c0 + n, (r + 1) * row_len)
            src = words[m:m + (e - s)]
            dst = out[s:e]
            if is32:
                lo = low[s - c0:e - c0]
                for i in range(e - s):
                    v = unpermute((np.uint32(src[i]) + add) & wmask, hbits, rb)
                    dst[i] = (v << np.uint32(16)) | np.uint32(lo[i])
            else:
                for i in range(e - s):
                    dst[i] = unpermute((np.uint32(src[i]) + add) & wmask, hbits, rb)
            m += e - s
