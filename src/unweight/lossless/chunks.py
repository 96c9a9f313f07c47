"""Chunk-range drivers: everything one thread does for a run of chunks, in one compiled call.

A tensor's values are cut into chunks of ``chunk_w`` values. For each chunk the encoder records the
XXH64 of its original bytes, rANS-codes its hi words (or stores them raw when coding does not
shrink them), and for FP32 packs the low halves. The decoder does the reverse and checks the hash.
Chunks are independent, so a thread pool hands each worker a contiguous range of chunks; the output
does not depend on how the ranges are cut. A range writes its chunks one after another from the
start of its own region of the output (a chunk never takes more than its raw size), and the
caller then moves the ranges together (``format._close_gaps``).
"""

import sys

import numpy as np
from numba import njit

from unweight.jit_cache import source_stamp
from unweight.lossless import fields, hashing, rans, simd
from unweight.lossless.fields import pack_low, unpack_low
from unweight.lossless.hashing import xxh64

MODE_CODED = 0
MODE_RAW = 1

ERR_RAW_SIZE = 3  # a raw segment's length is not the chunk's size
ERR_LOW = 4  # the FP32 low segment disagrees with its own block headers
ERR_CHECKSUM = 5
ERR_MODE = 6

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


_STAMP = source_stamp(rans, simd, fields, hashing, sys.modules[__name__])  # closed over: see unweight.jit_cache


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
