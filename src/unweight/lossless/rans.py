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
ends at ``2^32``, which the decoder checks. The chunk kernels are inlined into per-layout drivers
(``chunks.range_kernels``) that pass ``hbits`` and ``rb`` as constants.

Chosen over canonical Huffman by measurement on minilm-l6 in BF16: on the same symbols (exponent
and two mantissa bits), 12-bit-limited Huffman code lengths cost 0.052 bit per weight more than
this coder's 12-bit frequencies without row context and 0.040 with 16 row buckets; that alone
would put the format above the order-0 bound it must reach. Huffman's multi-symbol table decode
would be faster; rANS here costs one table lookup per value.
"""

import numpy as np
from numba import njit

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
LANES = 4
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
def build_tables(alphabet, freq, rb, enc, rcp, dec):
    """Coding tables from the ascending ``alphabet`` (symbol values) and ``freq[ctx, symbol index]``.

    ``enc[ctx, sym] = f | cum << 16`` and ``rcp[ctx, sym] = 1 / f`` for the encoder;
    ``dec[ctx, t] = rank | ((sym - t) << rb mod 2^16) << 16 | f << 32`` for the decoder.
    Returns the first context whose frequencies are not a valid table, or -1.
    """
    nctx, nsym = freq.shape
    for c in range(nctx):
        acc = 0
        for d in range(nsym):
            f = np.int64(freq[c, d])
            if acc + f > PROB_SCALE:
                return c
            sym = np.int64(alphabet[d])
            if f > 0:
                enc[c, sym] = np.uint64(f) | (np.uint64(acc) << _SH16)
                rcp[c, sym] = 1.0 / f
            for t in range(acc, acc + f):
                delta = ((sym - t) << rb) & 0xFFFF
                dec[c, t] = np.uint64(t - acc) | (np.uint64(delta) << _SH16) | (np.uint64(f) << _SH32)
            acc += f
        if acc != PROB_SCALE:
            return c
    return -1


# ---------------------------------------------------------------------------------------------
# the permuted word: sign moved below the top mantissa bits, so that sign and low mantissa are the
# low ``rb = shift + 1`` bits of the word


@njit(inline="always")
def permute(v, shift, hbits):
    body = v & ((1 << (hbits - 1)) - 1)
    return ((body >> shift) << (shift + 1)) | ((v >> (hbits - 1)) << shift) | (body & ((1 << shift) - 1))


# ---------------------------------------------------------------------------------------------
# chunk kernels. They take the word width ``hbits`` and raw-bit count ``rb`` as arguments and are
# inlined into callers that pass constants (``chunks.range_kernels``), so every shift and mask
# below compiles to an immediate.


@njit(inline="always")
def _estep(x, u, ent, rcp, rb):
    """Encode permuted word ``u`` into state ``x`` given its table entry ``ent`` and ``1/f``.
    Returns (new state, the low word to emit, whether to emit it)."""
    raw = np.uint64(u & ((1 << rb) - 1))
    f = ent & _U16
    # renormalise without branches: the caller always writes the low word and only moves its
    # position when needed
    need = x >= (f << np.uint64(64 - PROB_BITS - rb))
    w = np.uint32(x & _LO32)
    x = (x >> _SH32) if need else x
    # x // f through a double reciprocal: x < 2^63 and x // f < 2^51 put the truncated estimate
    # within one of the quotient; two masked corrections settle it
    fi = np.int64(f)
    xi = np.int64(x)
    qi = np.int64(np.float64(xi) * rcp)
    r = xi - qi * fi
    lo = r >> 63  # -1 when the estimate was one too high
    qi += lo
    r += fi & lo
    hi = ~((r - fi) >> 63)  # -1 when it was one too low
    qi -= hi
    r -= fi & hi
    x = (np.uint64(qi) << np.uint64(PROB_BITS + rb)) + (
        ((np.uint64(r) + (ent >> _SH16)) << np.uint64(rb)) | raw)
    return x, w, np.uint64(need)


@njit(inline="always")
def _eword(v, sub, hbits, rb):
    """The exponent-lowered permuted word of hi word ``v``."""
    return (permute(v, rb - 1, hbits) - sub) & ((1 << hbits) - 1)


@njit(inline="always")
def encode_chunk(vals, hi_shift, ebits, c0, n, row_len, q, nph, enc, rcp, scratch, hbits, rb):
    """Encode ``vals[c0:c0 + n]`` (the hi word of each, ``>> hi_shift``) into the tail of
    ``scratch`` (uint32). Values are coded phase by phase, rows ascending within a phase; row
    ``r`` has phase ``q[r] % nph`` and its exponents lowered by ``q[r] // nph`` (mod 2^ebits).
    Returns the index of the segment's first word in ``scratch``."""
    nsym = np.uint64(enc.shape[1])
    emask = (1 << ebits) - 1
    eshift = hbits - ebits  # position of the exponent field in a word
    encf = enc.reshape(-1)
    rcpf = rcp.reshape(-1)
    x0 = x1 = x2 = x3 = _L
    pos = np.uint64(scratch.size)
    one = np.uint64(1)
    cpos = n - 1
    r0 = c0 // row_len
    r1 = (c0 + n - 1) // row_len
    for ph in range(nph - 1, -1, -1):
        tb = np.uint64(ph) * nsym
        for r in range(r1, r0 - 1, -1):
            qr = np.int64(q[r])
            if qr % nph != ph:
                continue
            sub = ((qr // nph) & emask) << eshift
            s = max(c0, r * row_len)
            e = min(c0 + n, (r + 1) * row_len)
            seg = vals[s:e]
            j = e - s - 1
            while j >= 0:
                if cpos & (LANES - 1) == LANES - 1 and j >= LANES - 1:
                    # fast path: whole lane groups (lanes 3, 2, 1, 0), states in registers
                    for _ in range((j + 1) // LANES):
                        u = _eword(np.int64(seg[j]) >> hi_shift, sub, hbits, rb)
                        t = tb + np.uint64(u >> rb)
                        x3, w, need = _estep(x3, u, encf[t], rcpf[t], rb)
                        scratch[pos - one] = w
                        pos -= need
                        u = _eword(np.int64(seg[j - 1]) >> hi_shift, sub, hbits, rb)
                        t = tb + np.uint64(u >> rb)
                        x2, w, need = _estep(x2, u, encf[t], rcpf[t], rb)
                        scratch[pos - one] = w
                        pos -= need
                        u = _eword(np.int64(seg[j - 2]) >> hi_shift, sub, hbits, rb)
                        t = tb + np.uint64(u >> rb)
                        x1, w, need = _estep(x1, u, encf[t], rcpf[t], rb)
                        scratch[pos - one] = w
                        pos -= need
                        u = _eword(np.int64(seg[j - 3]) >> hi_shift, sub, hbits, rb)
                        t = tb + np.uint64(u >> rb)
                        x0, w, need = _estep(x0, u, encf[t], rcpf[t], rb)
                        scratch[pos - one] = w
                        pos -= need
                        j -= LANES
                        cpos -= LANES
                else:
                    u = _eword(np.int64(seg[j]) >> hi_shift, sub, hbits, rb)
                    t = tb + np.uint64(u >> rb)
                    lane = cpos & (LANES - 1)
                    x = x0 if lane == 0 else (x1 if lane == 1 else (x2 if lane == 2 else x3))
                    x, w, need = _estep(x, u, encf[t], rcpf[t], rb)
                    scratch[pos - one] = w
                    pos -= need
                    if lane == 0:
                        x0 = x
                    elif lane == 1:
                        x1 = x
                    elif lane == 2:
                        x2 = x
                    else:
                        x3 = x
                    j -= 1
                    cpos -= 1
    for xl in (x3, x2, x1, x0):
        scratch[pos - one] = np.uint32(xl >> _SH32)
        scratch[pos - np.uint64(2)] = np.uint32(xl & _LO32)
        pos -= np.uint64(2)
    return np.int64(pos)


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
def decode_chunk(code, seg0, seglen, out, obase, c0, n, row_len, q, nph, ebits, dec, hbits, rb):
    """Decode one chunk's segment ``code[seg0:seg0 + seglen]`` into the permuted words
    ``out[obase + i]`` for values ``i`` in ``[c0, c0 + n)`` (``obase`` may be negative).
    ``code`` must hold ``STREAM_PAD`` readable bytes past the segment.
    Returns OK, ERR_OVERRUN or ERR_STATE."""
    limit = seglen // 4
    if seglen % 4 != 0 or limit < 2 * LANES or seg0 + seglen + STREAM_PAD > code.size:
        return ERR_OVERRUN
    words = code[seg0:seg0 + seglen + STREAM_PAD].view(np.uint32)
    ulimit = np.uint64(limit)
    decf = dec.reshape(-1)
    emask = (1 << ebits) - 1
    eshift = hbits - ebits
    x = np.empty(LANES, np.uint64)
    for lane in range(LANES):
        x[lane] = np.uint64(words[2 * lane]) | (np.uint64(words[2 * lane + 1]) << _SH32)
    p = np.uint64(2 * LANES)
    cpos = 0
    r0 = c0 // row_len
    r1 = (c0 + n - 1) // row_len
    for ph in range(nph):
        tb = np.uint64(ph * PROB_SCALE)
        for r in range(r0, r1 + 1):
            qr = np.int64(q[r])
            if qr % nph != ph:
                continue
            add = np.uint64(((qr // nph) & emask) << eshift)
            o = np.uint64(obase + max(c0, r * row_len))
            end = np.uint64(obase + min(c0 + n, (r + 1) * row_len))
            while o < end:
                if cpos & (LANES - 1) == 0 and o + np.uint64(LANES) <= end:
                    # fast path: whole lane groups, states in registers
                    x0, x1, x2, x3 = x[0], x[1], x[2], x[3]
                    groups = (end - o) >> np.uint64(2)
                    for _ in range(groups):
                        x0, p, u = _dstep(x0, words, p, decf, tb, rb)
                        out[o] = u + add
                        x1, p, u = _dstep(x1, words, p, decf, tb, rb)
                        out[o + np.uint64(1)] = u + add
                        x2, p, u = _dstep(x2, words, p, decf, tb, rb)
                        out[o + np.uint64(2)] = u + add
                        x3, p, u = _dstep(x3, words, p, decf, tb, rb)
                        out[o + np.uint64(3)] = u + add
                        o += np.uint64(4)
                        if p > ulimit:
                            return ERR_OVERRUN
                    x[0], x[1], x[2], x[3] = x0, x1, x2, x3
                    cpos += 4 * groups
                else:
                    lane = cpos & (LANES - 1)
                    x[lane], p, u = _dstep(x[lane], words, p, decf, tb, rb)
                    out[o] = u + add
                    o += np.uint64(1)
                    cpos += 1
                    if p > ulimit:
                        return ERR_OVERRUN
    if p != ulimit:
        return ERR_STATE
    for lane in range(LANES):
        if x[lane] != _L:
            return ERR_STATE
    return OK


@njit(inline="always")
def unpermute(words, start, n, hbits, rb):
    """Inverse of :func:`permute` over ``words[start:start + n]``, in place."""
    w = words[start:start + n]
    sh = np.uint32(rb - 1)
    sh1 = np.uint32(rb)
    top = np.uint32(hbits - 1)
    lo = np.uint32((1 << (rb - 1)) - 1)
    one = np.uint32(1)
    for i in range(n):
        u = np.uint32(w[i])
        w[i] = (((u >> sh) & one) << top) | ((u >> sh1) << sh) | (u & lo)
