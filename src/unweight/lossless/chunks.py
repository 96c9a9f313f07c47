"""Chunk-range drivers: everything one thread does for a run of chunks, in one compiled call.

A tensor's values are cut into chunks of ``chunk_w`` values. For each chunk the encoder records the checksum
of its original bytes (XXH64; XXH3-64 in version 4), rANS-codes its hi words (or stores them raw when coding
does not shrink them), and for FP32 packs the low halves. The decoder does the reverse and checks the hash.
Chunks are independent, so a thread pool hands each worker a contiguous range of chunks; the output
does not depend on how the ranges are cut. A range writes its chunks one after another from the
start of its own region of the output (a chunk never takes more than its raw size), and the
caller then moves the ranges together (``format._close_gaps``).
"""

import sys

import numpy as np
from numba import njit

from unweight.jit_cache import source_stamp
from unweight.lossless import fields, hashing, lanes16, planes, rans, rans32, simd
from unweight.lossless.fields import join_low, pack_low, unpack_low
from unweight.lossless.hashing import xxh3_64, xxh64

MODE_CODED = 0
MODE_RAW = 1

ERR_RAW_SIZE = 3  # a raw segment's length is not the chunk's size
ERR_LOW = 4  # the FP32 low segment disagrees with its own block headers
ERR_CHECKSUM = 5
ERR_MODE = 6
ERR_PAD = 7  # a version 3 segment's pad byte is not zero

# what a chunk kernel's status means, for the segment errors every stream shares
SEGMENT_ERRORS = {
    rans.ERR_OVERRUN: "coded segment ends early (truncated or corrupt)",
    rans.ERR_STATE: "coded segment is corrupt (the decoder did not end in its initial state)",
    ERR_RAW_SIZE: "raw segment has the wrong length",
}


def offsets_problem(off: np.ndarray, nchunks: int, stream: int, pad: int, what: str) -> str | None:
    """What is wrong with the chunk offsets ``off`` (``nchunks + 1`` entries from 0, non-decreasing,
    leaving ``pad`` bytes of the ``stream`` of that many bytes after the last segment), naming the first
    chunk at fault, or None. Shared by tensors and symbol streams; ``what`` names the stream."""
    if off.size != nchunks + 1:
        c = max(min(off.size, nchunks + 1) - 1, 0)
        return (f"chunk {c}: {what} offsets hold {off.size} entries, expected {nchunks + 1} "
                f"(offsets table truncated or corrupt)")
    if nchunks == 0 or offsets_ok(off, stream, pad):
        return None
    if off[0] != 0:
        return f"chunk 0: {what} offsets do not start at 0"
    if (off[1:] < off[:-1]).any():
        return f"chunk {int(np.flatnonzero(off[1:] < off[:-1])[0])}: {what} offsets decrease (corrupt offsets)"
    short = int(np.flatnonzero(off[1:] + pad > stream)[0])
    return f"chunk {short}: {what} stream is truncated ({stream} bytes, chunk needs {off[short + 1] + pad})"


@njit(cache=True, nogil=True)
def offsets_ok(off, stream, pad):
    """Whether chunk offsets start at 0, never decrease, and leave ``pad`` bytes of a ``stream``
    of that many bytes after the last segment."""
    if off.size == 0 or off[0] != 0:
        return False
    for c in range(off.size - 1):
        if off[c + 1] < off[c]:
            return False
    return off[off.size - 1] + pad <= stream


@njit(cache=True, nogil=True)
def _store_raw_hi(vals, hi_shift, hbytes, c0, n, dst):
    """The hi words of ``vals[c0:c0 + n]``, little-endian, into the byte array ``dst``."""
    src = vals[c0:c0 + n]
    if hbytes == 1:
        for i in range(n):
            dst[i] = np.uint8(src[i] >> hi_shift)
    else:
        d16 = dst.view(np.uint16)
        for i in range(n):
            d16[i] = np.uint16(src[i] >> hi_shift)


@njit(cache=True, nogil=True)
def _load_raw_hi(code, s0, n, hbytes, c0, out, low, is32):
    """A raw segment's hi words into ``out[c0:c0 + n]`` (joined with ``low`` for FP32)."""
    dst = out[c0:c0 + n]
    if hbytes == 1:
        src8 = code[s0:s0 + n]
        for i in range(n):
            dst[i] = src8[i]
    else:
        src16 = code[s0:s0 + 2 * n].view(np.uint16)
        if is32:
            for i in range(n):
                dst[i] = (np.uint32(src16[i]) << np.uint32(16)) | np.uint32(low[i])
        else:
            for i in range(n):
                dst[i] = src16[i]


_RANGES = {}


# closed over: see unweight.jit_cache
_STAMP = source_stamp(rans, rans32, planes, lanes16, simd, fields, hashing, sys.modules[__name__])


def range_kernels(hbits: int):
    """(encode_range, decode_range) for ``hbits``-bit hi words: one compiled specialisation per
    word width, with the raw-bit count ``rb`` an argument. (One per ``rb`` cost 8-12 s of numba
    compilation per value on first use, three of them for BF16; only the decoder's scatter ran
    faster with ``rb`` a constant, so it alone is inlined once per value in use.)"""
    if hbits not in _RANGES:
        _RANGES[hbits] = _make_ranges(hbits, _STAMP)
    return _RANGES[hbits]


def _make_ranges(hbits, stamp):
    hbytes = hbits // 8

    @njit(cache=True, nogil=True)
    def encode_range(vals, vals_u8, itemsize, lo, hi, chunk_w, numel, row_len, q, nph, ebits,
                     hi_shift, coded, rb, enc, code, code_base, code_sizes, modes, low, low_base,
                     low_sizes, check, words, scratch):
        assert stamp != 0
        for c in range(lo, hi):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            check[c] = xxh64(vals_u8, c0 * itemsize, n * itemsize)
            dst = code_base
            size = n * hbytes
            mode = MODE_RAW
            if coded:
                rans.gather_chunk(vals, hi_shift, ebits, c0, n, row_len, q, nph, words, hbits, rb)
                p = rans.encode_words(words, n, enc, scratch, rb)
                nbytes = (scratch.size - p) * 4
                if nbytes < size:
                    code[dst:dst + nbytes] = scratch[p:].view(np.uint8)
                    size = nbytes
                    mode = MODE_CODED
            if mode == MODE_RAW:
                _store_raw_hi(vals, hi_shift, hbytes, c0, n, code[dst:dst + size])
            code_sizes[c] = size
            code_base += size
            modes[c] = mode
            if hi_shift:
                end = pack_low(vals, c0, n, low, low_base)
                low_sizes[c] = end - low_base
                low_base = end

    @njit(cache=True, nogil=True)
    def decode_range(code, code_off, low, low_off, modes, check, lo, hi, chunk_w, numel, itemsize,
                     row_len, q, nph, ebits, is32, rb, dec, out, out_u8, words, scratch_low, status):
        assert stamp != 0
        counts = np.zeros(nph, np.int64)
        no_low = scratch_low[:0]
        for c in range(lo, hi):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            s0 = code_off[c]
            seglen = code_off[c + 1] - s0
            if is32:
                seg = low[low_off[c]:low_off[c + 1]]
                if not unpack_low(seg, n, scratch_low):
                    status[c] = ERR_LOW
                    continue
            mode = modes[c]
            if mode == MODE_RAW:
                if seglen != n * hbytes:
                    status[c] = ERR_RAW_SIZE
                    continue
                _load_raw_hi(code, s0, n, hbytes, c0, out, scratch_low, is32)
            elif mode == MODE_CODED:
                rans.phase_counts(c0, n, row_len, q, nph, counts)
                rc = rans.decode_words(code, s0, seglen, n, counts, dec, words, rb)
                if rc != rans.OK:
                    status[c] = rc
                    continue
                lw = scratch_low if is32 else no_low
                # the scatter with ``rb`` a constant: as a run-time value it ran 7% slower
                # (the raw-bit counts in use: bf16 6, 5, 4; fp32 6; fp16 9; fp8 1)
                if rb == 6:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, 6)
                elif rb == 5:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, 5)
                elif rb == 4:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, 4)
                elif rb == 9:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, 9)
                elif rb == 1:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, 1)
                else:
                    rans.scatter_chunk(words, c0, n, row_len, q, nph, ebits, out, lw, hbits, rb)
            else:
                status[c] = ERR_MODE
                continue
            if xxh64(out_u8, c0 * itemsize, n * itemsize) != check[c]:
                status[c] = ERR_CHECKSUM

    return encode_range, decode_range


# ---------------------------------------------------------------------------------------------
# format versions 3 and 4 (BF16, FP16, FP32): keys coded by rans32, raw bits in planes after the words


_V3 = {}


def range_kernels_v3(ebits: int, version: int):
    """(encode_range, decode_range) of format ``version`` 3 or 4 (which differ in the chunk checksum only:
    XXH64 or XXH3-64, a constant of the kernels, so that each holds one) for words of ``ebits`` exponent
    bits: 16-bit words (BF16, FP16) and FP32 values (whose hi words are BF16's; their low halves packed
    apart as in version 2). A word is a symbol (``ebits`` exponent bits and ``k`` mantissa bits) above ``r =
    16 - ebits - k`` raw bits, the sign and the low mantissa bits. numba compiles each for the word type it
    is given. The exponent width is a constant of the kernels: BF16's decoder, which reads at most two bit
    planes beyond the nibbles, then holds no code for FP16's four (with both in one kernel it ran 6% slower
    on minilm-l6's embedding)."""
    if (ebits, version) not in _V3:
        _V3[ebits, version] = _make_ranges_v3(_STAMP, ebits, version == 4)
    return _V3[ebits, version]


def range_kernels_fp8(ebits: int, version: int):
    """:func:`range_kernels_v3` for FP8 bytes (E4M3, E5M2): the byte less its sign is the symbol (``k`` = all
    the mantissa bits), the sign its one raw bit (:func:`_encode_hi` codes them as it codes 16-bit words;
    :func:`_decode_fp8` decodes them). Same arguments as the 16-bit kernels; ``zeros``, ``hw``, ``low_words``,
    ``plan`` and ``fix`` are not used."""
    if (ebits, version, 8) not in _V3:
        _V3[ebits, version, 8] = _make_ranges_fp8(_STAMP, version == 4)
    return _V3[ebits, version, 8]


@njit(inline="always")
def _segment(code, s0, seglen, n, r):
    """A chunk's coded segment ``code[s0:s0 + seglen]`` of ``n`` values with ``r`` raw bits each, split: (status,
    its rANS words, how many, its bit planes, the planes' value count ``m``: ``n`` padded to 8). The words must
    start at an even offset and the pad byte after odd-length planes must be zero, so that no byte goes
    unchecked."""
    mp = planes.padded(n)
    pb = planes.plane_bytes(mp, r)
    words_bytes = seglen - pb - (pb & 1)
    rc = rans.OK
    if words_bytes < 0 or words_bytes % 2 or s0 % 2:
        rc = rans.ERR_OVERRUN
    elif pb & 1 and code[s0 + seglen - 1] != 0:
        rc = ERR_PAD
    if rc != rans.OK:
        return rc, code[:0].view(np.uint16), 0, code[:0], mp
    return (rc, code[s0:s0 + words_bytes + rans.STREAM_PAD].view(np.uint16), words_bytes // 2,
            code[s0 + words_bytes:s0 + words_bytes + pb], mp)


@njit(inline="always")
def _chunk_at(c, chunk_w, numel, code_off):
    """Chunk ``c``'s first value, its length, and its segment's start and length in the code stream."""
    c0 = c * chunk_w
    return c0, min(chunk_w, numel - c0), code_off[c], code_off[c + 1] - code_off[c]


@njit(inline="always")
def _pack_signs(src, out):
    """The sign plane of FP8 bytes ``src`` (:mod:`planes` with ``r = 1``: bit ``j`` of byte ``i`` is the sign of
    value ``i + j e``, ``e = padded(n) / 8``, zeros after ``src``) into ``out[:e]``. Plane bit by plane bit,
    each a contiguous pass: alone, 0.08 ns per value against 0.36 value by value (eight strided loads each);
    minilm-l6's whole E4M3 encode the same (540-549 MB/s against 535-545)."""
    n = src.size
    e = planes.padded(n) // 8
    out[:e] = 0
    for j in range(8):
        part = src[min(j * e, n):min((j + 1) * e, n)]
        sj = np.uint8(j)
        for i in range(part.size):
            out[i] |= (part[i] >> np.uint8(7)) << sj


@njit(inline="always")
def _decode_fp8(code, s0, seglen, c0, n, row_len, q, nph, ebits, k, dec, off, hw, syms, counts, at):
    """Inverse of :func:`_encode_hi` for FP8 bytes: a chunk's segment back to its bytes ``hw``; returns a status.
    (Decoding them through :func:`_decode_hi` and :func:`_place` as well, one kernel for both word widths, ran
    7-11% slower on minilm-l6's FP8 tensors; with this row walk inside it, 2-3%.)"""
    emax = (1 << ebits) - 1
    rc, words, limit, signs, mp = _segment(code, s0, seglen, n, 1)
    if rc != rans.OK:
        return rc
    rans.phase_counts(c0, n, row_len, q, nph, counts)
    rc = rans32.decode_keys(words, limit, n, counts, dec, 1 << k, off, syms)
    if rc != rans.OK:
        return rc
    _phase_starts(counts, at)
    e = mp // 8
    for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):  # rows in tensor order, as _decode_hi
        qr = np.int64(q[row])
        ph = qr % nph
        rot = (qr // nph) % emax
        a, b = max(c0, row * row_len) - c0, min(c0 + n, (row + 1) * row_len) - c0
        m = at[ph]
        at[ph] += b - a
        while a < b:  # the values whose sign is bit j of the plane's bytes
            j = a // e
            end = min(b, (j + 1) * e)
            lanes16.fp8_bytes(hw[a:end], syms[m:m + end - a], signs[a - j * e:end - j * e], j, k, rot, emax)
            m += end - a
            a = end
    return rans.OK


def _make_ranges_fp8(stamp, use_xxh3):
    @njit(cache=True, nogil=True)
    def encode_range(vals, vals_u8, lo, hi, chunk_w, numel, row_len, q, nph, k, coded, ent, code, code_base,
                     code_sizes, modes, check, low, low_base, low_sizes, keys, scratch, hw):
        """Chunks ``lo .. hi`` of FP8 bytes ``vals`` (uint8) with ``ebits = 7 - k`` exponent bits."""
        assert stamp != 0
        ebits = 7 - k
        counts, at = np.zeros(nph, np.int64), np.zeros(nph, np.int64)
        for c in range(lo, hi):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            if use_xxh3:
                check[c] = xxh3_64(vals_u8, c0, n)
            else:
                check[c] = xxh64(vals_u8, c0, n)
            size = 0
            if coded:
                size = _encode_hi(vals[c0:c0 + n], c0, n, row_len, q, nph, ebits, k, ent, code, code_base, keys,
                                  scratch, counts, at)
            modes[c] = MODE_CODED if size else MODE_RAW
            if not size:
                size = n
                code[code_base:code_base + n] = vals[c0:c0 + n]
            code_sizes[c] = size
            code_base += size

    @njit(cache=True, nogil=True)
    def decode_range(code, code_off, modes, check, low, low_off, lo, hi, chunk_w, numel, row_len, q, nph, k,
                     dec, off, out, out_u8, syms, zeros, hw, low_words, plan, fix, status):
        """Chunks ``lo .. hi`` into the FP8 bytes ``out`` (uint8)."""
        assert stamp != 0
        ebits = 7 - k
        counts, at = np.zeros(nph, np.int64), np.zeros(nph, np.int64)
        for c in range(lo, hi):
            c0, n, s0, seglen = _chunk_at(c, chunk_w, numel, code_off)
            mode = modes[c]
            rc = rans.OK
            if mode == MODE_RAW:
                if seglen != n:
                    rc = ERR_RAW_SIZE
                else:
                    out[c0:c0 + n] = code[s0:s0 + n]
            elif mode == MODE_CODED:
                rc = _decode_fp8(code, s0, seglen, c0, n, row_len, q, nph, ebits, k, dec, off, out[c0:c0 + n], syms,
                                 counts, at)
            else:
                rc = ERR_MODE
            if rc == rans.OK:
                if use_xxh3:
                    h = xxh3_64(out_u8, c0, n)
                else:
                    h = xxh64(out_u8, c0, n)
                if h != check[c]:
                    rc = ERR_CHECKSUM
            status[c] = rc

    return encode_range, decode_range


@njit(inline="always")
def _place(syms, m, a, b, k, rot, emax, pls, mp, r, zeros, out, wide):
    """``out[a:b]`` (one row's part of a chunk's words) from the decoded symbols ``syms[m:]`` (raised
    by ``rot`` binades) and the raw bits of values ``a..b`` in the planes ``pls`` (:mod:`planes`, ``mp``
    values of ``r`` bits, 4 <= r <= 8), in one pass: the words are written once, while the chunk's
    planes and symbols are read where they lie (a separate merge pass cost 0.44 ns per value).
    ``zeros`` (at least ``mp / 8`` zero bytes) stands in for the planes of bits that ``r`` lacks. With
    ``wide`` (FP16, a constant of the kernel), four bit planes are read, else two."""
    h, e = mp // 2, mp // 8
    while a < b:
        j = a // e  # the bit of the planes' bytes that values a .. the next multiple of e take
        end = min(b, (j + 1) * e)
        z, cnt = a - j * e, end - a
        p4 = pls[h + z:h + z + cnt] if r > 4 else zeros[:cnt]
        p5 = pls[h + e + z:h + e + z + cnt] if r > 5 else zeros[:cnt]
        p6 = pls[h + 2 * e + z:h + 2 * e + z + cnt] if r > 6 else zeros[:cnt]
        p7 = pls[h + 3 * e + z:h + 3 * e + z + cnt] if r > 7 else zeros[:cnt]
        lanes16.place(out[a:end], syms[m:m + cnt], pls[a % h:a % h + cnt], p4, p5, p6, p7, 4 * (a // h), j, r, k,
                      rot, emax, wide)
        m += cnt
        a = end


@njit(inline="always")
def _phase_starts(counts, at):
    """``at[ph]`` = where phase ``ph``'s run starts in a chunk's coding order."""
    acc = 0
    for ph in range(counts.size):
        at[ph] = acc
        acc += counts[ph]


@njit(inline="always")
def _encode_hi(hw, c0, n, row_len, q, nph, ebits, k, ent, code, dst, keys, scratch, counts, at):
    """A chunk's hi words ``hw`` (``hw[i]`` is value ``c0 + i``; ``ebits`` exponent bits), or FP8 bytes (uint8:
    their one raw bit is the sign, in one plane, :func:`_pack_signs`), as a version 3 segment at ``code[dst:]``
    (the rANS words, then the planes, then a zero pad byte to an even length); returns its length, or 0 when it
    would not be shorter than the raw words (nothing written)."""
    r = 8 * hw.itemsize - ebits - k  # the sign and the mantissa bits below the symbol's
    space, emax = 1 << (ebits + k), (1 << ebits) - 1
    rans.phase_counts(c0, n, row_len, q, nph, counts)
    _phase_starts(counts, at)
    for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):  # as the decoder: see there
        qr = np.int64(q[row])
        ph = qr % nph
        s, e = max(c0, row * row_len), min(c0 + n, (row + 1) * row_len)
        lanes16.keys(keys[at[ph]:at[ph] + (e - s)], hw[s - c0:e - c0], r, k, (qr // nph) % emax, ph * space, emax)
        at[ph] += e - s
    p = rans32.encode_keys(keys, n, ent, scratch)
    nw = scratch.size - p
    pb = planes.plane_bytes(planes.padded(n), r)
    nbytes = 2 * nw + pb + (pb & 1)
    if nbytes >= n * hw.itemsize:
        return 0
    code[dst:dst + 2 * nw] = scratch[p:].view(np.uint8)
    if hw.itemsize == 1:
        _pack_signs(hw, code[dst + 2 * nw:dst + 2 * nw + pb])
    else:
        lanes16.pack_words(hw, r, code[dst + 2 * nw:dst + 2 * nw + pb])
    if pb & 1:
        code[dst + nbytes - 1] = 0
    return nbytes


@njit(inline="always")
def _plan_groups(plan, fix, c0, n, row_len, q, nph, counts, at, e, emax):
    """Which of a chunk's groups of ``LANES`` values (in coding order) the decoder's loop puts together
    itself (:func:`rans32.decode_keys_placed`): each group wholly inside one row, unless it spans a multiple
    of ``e`` (its values' raw bits would not share a byte of each bit plane, :mod:`planes`). ``plan[g]`` =
    where group ``g``'s first value lies in the chunk | its row's rotation << 24, or -1. Returns how many
    runs of values that leaves to :func:`_place`, each ``fix[4 j:4 j + 4]`` = (its first value in coding
    order, in the chunk, how many, its row's rotation): at most two per row, and the seven groups that may
    span a multiple of ``e`` (the caller sees to ``row_len >= LANES``, ``e >= LANES``, ``n < 2^24``)."""
    lanes = rans32.LANES
    plan[:n // lanes] = -1
    nfix = 0
    cut = e  # the next multiple of e (value a and a - 1 in different bytes of the planes) from the rows' start
    _phase_starts(counts, at)
    for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):
        qr = np.int64(q[row])
        ph = qr % nph
        s, end = max(c0, row * row_len) - c0, min(c0 + n, (row + 1) * row_len) - c0
        m = at[ph]
        at[ph] += end - s
        rot = (qr // nph) % emax
        stop = m + end - s
        g0, g1 = -(-m // lanes), stop // lanes  # the row's whole groups, in coding order
        head, tail = g0 * lanes, g1 * lanes
        if g1 <= g0:  # none: the row goes to _place whole
            g1, head, tail = g0, stop, stop
        first = s + head - m
        tag = rot << 24
        for g in range(g0, g1):
            plan[g] = first + (g - g0) * lanes | tag
        for lo, hi in ((m, head), (tail, stop)):  # the row's ends
            if hi > lo:
                fix[4 * nfix:4 * nfix + 4] = (lo, s + lo - m, hi - lo, rot)
                nfix += 1
        while cut < end:  # a multiple of e inside the row: the group that holds cut - 1 and cut, if any
            if cut > s:
                cp = m + cut - 1 - s
                g = cp // lanes
                if g0 <= g < g1 and cp % lanes != lanes - 1:
                    plan[g] = -1
                    fix[4 * nfix:4 * nfix + 4] = (g * lanes, s + g * lanes - m, lanes, rot)
                    nfix += 1
            cut += e
    return nfix


@njit(inline="always")
def _loop_places(row_len, n, mp):
    """Whether the rANS loop may put a chunk's words together itself (:func:`_plan_groups`' conditions)."""
    return simd.AVAILABLE and row_len >= rans32.LANES and mp // 8 >= rans32.LANES and n < 1 << 24


@njit(inline="always")
def _bit_planes(pls, h, e, r, zeros, wide):
    """A chunk's planes of raw bits 4, 5, ... as the loop's placer takes them (zeros where ``r`` lacks them):
    two for BF16, four for FP16 (``wide``)."""
    p4 = pls[h:] if r > 4 else zeros
    p5 = pls[h + e:] if r > 5 else zeros
    if wide:
        return p4, p5, pls[h + 2 * e:] if r > 6 else zeros, pls[h + 3 * e:] if r > 7 else zeros
    return p4, p5


@njit(inline="always")
def _place_fix(fix, nfix, syms, k, emax, pls, mp, r, zeros, hw, wide):
    """The runs :func:`_plan_groups` left to :func:`_place`."""
    for j in range(nfix):
        m, a, cnt, rot = fix[4 * j], fix[4 * j + 1], fix[4 * j + 2], fix[4 * j + 3]
        _place(syms, m, a, a + cnt, k, rot, emax, pls, mp, r, zeros, hw, wide)


@njit(inline="always")
def _place_rows(syms, c0, n, row_len, q, nph, k, emax, pls, mp, r, zeros, hw, wide, counts, at):
    """A chunk's words from its symbols, row by row in tensor order, each phase's symbols read from where its
    run has got to (phase by phase, the rows of one phase were a strided walk: 0.54 against 0.25 ns per value)."""
    _phase_starts(counts, at)
    for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):
        qr = np.int64(q[row])
        ph = qr % nph
        s, e = max(c0, row * row_len), min(c0 + n, (row + 1) * row_len)
        _place(syms, at[ph], s - c0, e - c0, k, (qr // nph) % emax, emax, pls, mp, r, zeros, hw, wide)
        at[ph] += e - s


@njit(inline="always")
def _decode_hi(code, s0, seglen, c0, n, row_len, q, nph, ebits, k, dec, off, hw, syms, zeros, counts, at, wide, plan,
               fix):
    """A chunk's coded segment ``code[s0:s0 + seglen]`` back to its hi words ``hw`` (``hw[i]`` is value
    ``c0 + i``; ``ebits`` exponent bits); returns a status (``rans.OK`` or an error code). The words are put
    together in the rANS loop where ``plan`` lets it (:func:`_plan_groups`, with ``fix``; both scratch), the
    rest after it. ``wide`` (FP16: four bit planes) is a constant of the kernel."""
    r = 16 - ebits - k
    emax = (1 << ebits) - 1
    rc, words, limit, pls, mp = _segment(code, s0, seglen, n, r)
    if rc != rans.OK:
        return rc
    rans.phase_counts(c0, n, row_len, q, nph, counts)
    h, e = mp // 2, mp // 8
    if _loop_places(row_len, n, mp):
        nfix = _plan_groups(plan, fix, c0, n, row_len, q, nph, counts, at, e, emax)
        rc = rans32.decode_keys_placed(words, limit, n, counts, dec, 1 << k, off, syms,
                                       (plan, hw, pls, _bit_planes(pls, h, e, r, zeros, wide), k, h, e, r, emax))
        if rc == rans.OK:
            _place_fix(fix, nfix, syms, k, emax, pls, mp, r, zeros, hw, wide)
        return rc
    rc = rans32.decode_keys(words, limit, n, counts, dec, 1 << k, off, syms)
    if rc == rans.OK:
        _place_rows(syms, c0, n, row_len, q, nph, k, emax, pls, mp, r, zeros, hw, wide, counts, at)
    return rc


@njit(inline="always")
def _pairs(code, s0, seglen, n, row_len, ebits, k):
    """Whether a coded chunk may be decoded beside another (:func:`_decode_hi_pair`): its segment splits and
    the loop places its words."""
    rc, _, _, _, mp = _segment(code, s0, seglen, n, 16 - ebits - k)
    return rc == rans.OK and _loop_places(row_len, n, mp)


@njit(inline="always")
def _decode_hi_pair(code, sa, la, ca, na, sb, lb, cb, nb, row_len, q, nph, ebits, k, dec, off, hwa, hwb, syms,
                    zeros, counts, at, wide, plan, fix):
    """:func:`_decode_hi` of two chunks that :func:`_pairs` (chunk ``a``: segment at ``sa`` of ``la`` bytes,
    first value ``ca``, ``na`` values), their rANS loops run side by side (``rans32.decode_keys_pair``); the
    scratch (``syms``, ``counts``, ``at``, ``plan``, ``fix``) holds two halves. Returns both statuses, the
    same as one by one. On minilm-l6's BF16 embedding (Zen 5, one thread, ``bench/lossless_parts.py``): 0.497-0.534
    ns per value against 0.578-0.608 one chunk at a time (docs/format.md, "Two chunks side by side")."""
    r = 16 - ebits - k
    emax = (1 << ebits) - 1
    _, wa, lima, pla, mpa = _segment(code, sa, la, na, r)
    _, wb, limb, plb, mpb = _segment(code, sb, lb, nb, r)
    sya, syb = syms[:syms.size // 2], syms[syms.size // 2:]
    pna, pnb = plan[:plan.size // 2], plan[plan.size // 2:]
    fxa, fxb = fix[:fix.size // 2], fix[fix.size // 2:]
    rans.phase_counts(ca, na, row_len, q, nph, counts[0])
    rans.phase_counts(cb, nb, row_len, q, nph, counts[1])
    ha, ea, hb, eb = mpa // 2, mpa // 8, mpb // 2, mpb // 8
    nfa = _plan_groups(pna, fxa, ca, na, row_len, q, nph, counts[0], at[0], ea, emax)
    nfb = _plan_groups(pnb, fxb, cb, nb, row_len, q, nph, counts[1], at[1], eb, emax)
    rca, rcb = rans32.decode_keys_pair(
        (wa, lima, counts[0], sya, (pna, hwa, pla, _bit_planes(pla, ha, ea, r, zeros, wide), k, ha, ea, r, emax)),
        (wb, limb, counts[1], syb, (pnb, hwb, plb, _bit_planes(plb, hb, eb, r, zeros, wide), k, hb, eb, r, emax)),
        dec, 1 << k, off)
    if rca == rans.OK:
        _place_fix(fxa, nfa, sya, k, emax, pla, mpa, r, zeros, hwa, wide)
    if rcb == rans.OK:
        _place_fix(fxb, nfb, syb, k, emax, plb, mpb, r, zeros, hwb, wide)
    return rca, rcb


@njit(inline="always")
def _split_hi(vals, c0, n, hw):
    """The hi halves of FP32 values ``vals[c0:c0 + n]`` into ``hw[:n]``."""
    src = vals[c0:c0 + n]
    for i in range(n):
        hw[i] = np.uint16(src[i] >> np.uint32(16))


@njit(inline="always")
def _close(c, rc, c0, n, is32, low, low_off, hw, out, out_u8, low_words, check, status, use_xxh3):
    """Chunk ``c``'s status once its hi words are decoded (``rc``): FP32's low halves joined, the checksum. At
    module level: a closure's jitted function would keep numba from caching the range kernel."""
    if rc == rans.OK and is32 and not join_low(low[low_off[c]:low_off[c + 1]], n, hw, out[c0:c0 + n],
                                                low_words):
        rc = ERR_LOW
    if rc == rans.OK:
        if use_xxh3:
            h = xxh3_64(out_u8, c0 * out.itemsize, n * out.itemsize)
        else:
            h = xxh64(out_u8, c0 * out.itemsize, n * out.itemsize)
        if h != check[c]:
            rc = ERR_CHECKSUM
    status[c] = rc


def _make_ranges_v3(stamp, ebits, use_xxh3):
    wide = ebits < 8  # FP16: r = 8 raw bits, four bit planes
    @njit(cache=True, nogil=True)
    def encode_range(vals, vals_u8, lo, hi, chunk_w, numel, row_len, q, nph, k, coded, ent, code, code_base,
                     code_sizes, modes, check, low, low_base, low_sizes, keys, scratch, hw):
        """Chunks ``lo .. hi``; ``vals`` are 16-bit words (BF16, FP16: ``ebits`` exponent bits) or FP32
        values (uint32, their low halves packed into ``low`` from ``low_base``, their hi halves split
        into ``hw`` first)."""
        assert stamp != 0
        is32 = vals.itemsize == 4
        counts, at = np.zeros(nph, np.int64), np.zeros(nph, np.int64)
        for c in range(lo, hi):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            if use_xxh3:  # a constant of the closure: numba prunes the other branch before compiling it
                check[c] = xxh3_64(vals_u8, c0 * vals.itemsize, n * vals.itemsize)
            else:
                check[c] = xxh64(vals_u8, c0 * vals.itemsize, n * vals.itemsize)
            size = 0
            if coded:
                if is32:
                    _split_hi(vals, c0, n, hw)
                    size = _encode_hi(hw[:n], c0, n, row_len, q, nph, ebits, k, ent, code, code_base, keys,
                                      scratch, counts, at)
                else:
                    size = _encode_hi(vals[c0:c0 + n], c0, n, row_len, q, nph, ebits, k, ent, code, code_base,
                                      keys, scratch, counts, at)
            modes[c] = MODE_CODED if size else MODE_RAW
            if not size:
                size = n * 2
                _store_raw_hi(vals, 16 if is32 else 0, 2, c0, n, code[code_base:code_base + size])
            code_sizes[c] = size
            code_base += size
            if is32:
                end = pack_low(vals, c0, n, low, low_base)
                low_sizes[c] = end - low_base
                low_base = end

    @njit(cache=True, nogil=True)
    def decode_range(code, code_off, modes, check, low, low_off, lo, hi, chunk_w, numel, row_len, q, nph, k,
                     dec, off, out, out_u8, syms, zeros, hw, low_words, plan, fix, status):
        """Chunks ``lo .. hi`` into ``out``: 16-bit words (uint16) or FP32 values (uint32, their hi
        halves decoded into ``hw`` first, then joined with their low halves; ``low_words`` is
        :func:`fields.join_low`'s scratch)."""
        assert stamp != 0
        is32 = out.itemsize == 4
        counts, at = np.zeros((2, nph), np.int64), np.zeros((2, nph), np.int64)
        cw = min(chunk_w, numel)
        c = lo
        while c < hi:
            c0, n, s0, seglen = _chunk_at(c, chunk_w, numel, code_off)
            if c + 1 < hi and modes[c] == MODE_CODED and modes[c + 1] == MODE_CODED:  # two side by side
                c1, n1, s1, seglen1 = _chunk_at(c + 1, chunk_w, numel, code_off)
                if _pairs(code, s0, seglen, n, row_len, ebits, k) and _pairs(code, s1, seglen1, n1, row_len, ebits,
                                                                             k):
                    if is32:  # the hi halves into hw's two halves
                        rca, rcb = _decode_hi_pair(code, s0, seglen, c0, n, s1, seglen1, c1, n1, row_len, q, nph,
                                                   ebits, k, dec, off, hw[:n], hw[cw:cw + n1], syms, zeros, counts,
                                                   at, wide, plan, fix)
                    else:
                        rca, rcb = _decode_hi_pair(code, s0, seglen, c0, n, s1, seglen1, c1, n1, row_len, q, nph,
                                                   ebits, k, dec, off, out[c0:c0 + n], out[c1:c1 + n1], syms, zeros,
                                                   counts, at, wide, plan, fix)
                    _close(c, rca, c0, n, is32, low, low_off, hw[:n], out, out_u8, low_words, check, status,
                           use_xxh3)
                    _close(c + 1, rcb, c1, n1, is32, low, low_off, hw[cw:cw + n1], out, out_u8, low_words, check,
                           status, use_xxh3)
                    c += 2
                    continue
            mode = modes[c]
            rc = rans.OK
            if mode == MODE_RAW:
                if seglen != n * 2:
                    rc = ERR_RAW_SIZE
                elif is32:
                    hw[:n] = code[s0:s0 + seglen].view(np.uint16)
                else:
                    _load_raw_hi(code, s0, n, 2, c0, out, syms, False)
            elif mode == MODE_CODED:
                if is32:
                    rc = _decode_hi(code, s0, seglen, c0, n, row_len, q, nph, ebits, k, dec, off, hw[:n], syms,
                                    zeros, counts[0], at[0], wide, plan, fix)
                else:
                    rc = _decode_hi(code, s0, seglen, c0, n, row_len, q, nph, ebits, k, dec, off, out[c0:c0 + n],
                                    syms, zeros, counts[0], at[0], wide, plan, fix)
            else:
                rc = ERR_MODE
            _close(c, rc, c0, n, is32, low, low_off, hw[:n], out, out_u8, low_words, check, status, use_xxh3)
            c += 1

    return encode_range, decode_range
