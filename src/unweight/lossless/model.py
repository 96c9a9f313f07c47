"""The probability model: which bits form the coded symbol, which rows share a table, the tables.

A value's coded symbol is its exponent and top ``k`` mantissa bits (the mantissa is not uniform
inside a binade: bell-shaped weights put more mass at its low end; on minilm-l6 in BF16, k = 2
takes 0.054 bit per weight off exponent-only coding); the sign and the other mantissa bits are
raw. Rows of a weight matrix (output neurons,
embedding rows) differ in scale, so a row's exponents are a shifted copy of a shared shape. The row
context gives each row an integer exponent shift and one of ``nph`` phases (the fractional part of
its scale, in steps of 1/nph binade): row ``r`` is coded with table ``q[r] % nph`` on exponents
lowered by ``q[r] // nph`` (mod 2^E). On minilm-l6 in BF16 this takes another 0.048 bit per
weight off; 2 or 4 such tables do what 16 plain quantile buckets of rows do (estimated within
0.001 bit) at a quarter of the table cost and cache footprint. Contexts measured and not kept
(entropy estimates with table cost): the previous exponent (+0.001 bit, a loss), the column's
mean exponent in 4 buckets (-0.006 bit before the cost of a per-column side table).

Everything is chosen per tensor by estimated size: each candidate (k, nph, shifted) is costed on a
sample of rows with the real quantised frequencies plus its tables and side information, and the
cheapest wins; if nothing beats storing the words raw, the tensor is stored.
"""

from dataclasses import dataclass

import numpy as np
import zstandard
from numba import njit

from unweight.lossless import rans
from unweight.lossless.fields import FloatLayout

MIN_ROW_LEN = 16  # shorter rows (conv kernels, tiny matrices) get no row context
MIN_ROWS = 8
SAMPLE_VALUES = 1 << 18  # candidates are compared on about this many values
PHASES = (2, 4)
MAX_SYMBOLS = 256
# mantissa bits in the symbol; measured on minilm-l6, BF16 takes k=2 on 99.9% of weights and FP16
# splits between 2 and 3 (each k is one compiled kernel specialisation)
K_CHOICES = {"bf16": (2,), "fp32": (2,), "fp16": (2, 3), "fp8_e4m3": (3,), "fp8_e5m2": (2,)}

ROWS_NONE = 0
ROWS_RAW = 1
ROWS_ZSTD = 2
ROWS_ZSTD_LEVEL = 6


@dataclass
class Plan:
    """How one tensor is coded. ``q`` has one int8 per row; ``freq[phase, symbol index]``."""

    k: int
    raw_bits: int  # sign and low mantissa bits carried raw: hi mantissa bits + 1 - k
    nph: int
    shifted: bool
    row_len: int
    q: np.ndarray
    alphabet: np.ndarray
    freq: np.ndarray
    est_bytes: float


@njit(cache=True, nogil=True)
def _row_mean_exponents(vals, hi_shift, man, emask, nrows, row_len, out):
    sh = hi_shift + man
    for r in range(nrows):
        row = vals[r * row_len:(r + 1) * row_len]
        s = 0
        for i in range(row_len):
            s += (np.int64(row[i]) >> sh) & emask
        out[r] = s / row_len


@njit(cache=True, nogil=True)
def _histogram(vals, hi_shift, hbits, ebits, shift, rows, row_len, q, nph, counts):
    """counts[phase, sym] over the given rows; sym = exponent (lowered by the row's shift, mod
    2^ebits) and the top mantissa bits above the low ``shift`` ones: the top bits of the permuted
    word that :mod:`rans` codes."""
    nsym = counts.shape[1]
    size = counts.size
    # four interleaved sub-histograms, so that runs of one symbol do not serialise on one counter
    sub4 = np.zeros(4 * size, np.int64)
    emask = (1 << ebits) - 1
    kbits = hbits - 1 - ebits - shift
    bodymask = (1 << (hbits - 1)) - 1
    smask = nsym - 1
    for r in rows:
        qr = np.int64(q[r])
        base = np.uint64((qr % nph) * nsym)
        sub = ((qr // nph) & emask) << kbits
        row = vals[r * row_len:(r + 1) * row_len]
        m = row_len - row_len % 4
        for i in range(0, m, 4):
            for j in range(4):
                body = (np.int64(row[i + j]) >> hi_shift) & bodymask
                sub4[np.uint64(j * size) + base + np.uint64(((body >> shift) - sub) & smask)] += 1
        for i in range(m, row_len):
            body = (np.int64(row[i]) >> hi_shift) & bodymask
            sub4[base + np.uint64(((body >> shift) - sub) & smask)] += 1
    flat = counts.reshape(-1)
    for j in range(4):
        flat += sub4[j * size:(j + 1) * size]


def _varint_len(x: np.ndarray) -> int:
    x = np.asarray(x, np.int64)
    return int((1 + (x >= 1 << 7) + (x >= 1 << 14) + (x >= 1 << 21)).sum())


def serialize_tables(alphabet: np.ndarray, freq: np.ndarray) -> bytes:
    """Alphabet as ascending deltas, then ``freq`` row by row, all as LEB128 varints."""
    vals = np.concatenate([np.diff(alphabet, prepend=0), freq.reshape(-1)]).astype(np.uint64)
    nbytes = 1 + (vals >= 1 << 7) + (vals >= 1 << 14) + (vals >= 1 << 21)
    out = np.zeros((vals.size, 4), np.uint8)
    for b in range(4):
        more = nbytes > b + 1
        out[:, b] = ((vals >> np.uint64(7 * b)) & np.uint64(0x7F)) | (more.astype(np.uint8) << 7)
    return out[np.arange(4) < nbytes[:, None]].tobytes()


@njit(cache=True, nogil=True)
def parse_tables(data, nsym, nph, alphabet, freq):
    """Inverse of :func:`serialize_tables`; returns False on malformed input."""
    pos = 0
    total = nsym + nph * nsym
    prev = -1
    for j in range(total):
        v = 0
        sh = 0
        while True:
            if pos >= data.size or sh > 28:
                return False
            b = np.int64(data[pos])
            pos += 1
            v |= (b & 0x7F) << sh
            sh += 7
            if b < 0x80:
                break
        if j < nsym:
            cur = v if j == 0 else prev + v
            if (j > 0 and v == 0) or cur > 0xFFFF:
                return False
            alphabet[j] = cur
            prev = cur
        else:
            freq.reshape(-1)[j - nsym] = v
    return pos == data.size


def serialize_rows(q: np.ndarray) -> tuple[int, bytes]:
    raw = q.astype(np.int8).tobytes()
    packed = zstandard.ZstdCompressor(level=ROWS_ZSTD_LEVEL).compress(raw)
    return (ROWS_ZSTD, packed) if len(packed) < len(raw) else (ROWS_RAW, raw)


def parse_rows(codec: int, data: bytes, nrows: int) -> np.ndarray | None:
    try:
        if codec == ROWS_ZSTD:
            data = zstandard.ZstdDecompressor().decompress(data, max_output_size=nrows)
        elif codec != ROWS_RAW:
            return None
    except zstandard.ZstdError:
        return None
    if len(data) != nrows:
        return None
    return np.frombuffer(data, np.int8).copy()


def _entropy_bytes(q: np.ndarray) -> float:
    c = np.bincount(q.astype(np.int64) + 128).astype(np.float64)
    c = c[c > 0]
    return float(-(c * np.log2(c / c.sum())).sum() / 8) + 64


def _candidates(means: np.ndarray) -> list[tuple[int, bool, np.ndarray]]:
    out = [(1, False, np.zeros(means.size, np.int8))]
    if means.size >= MIN_ROWS:
        ref = np.median(means)
        for nph in PHASES:
            q = np.clip(np.floor(nph * (means - ref)), -128, 127).astype(np.int8)
            out.append((nph, True, q))
    return out


def plan(vals: np.ndarray, lay: FloatLayout, shape: tuple[int, ...], nchunks: int) -> Plan | None:
    """The cheapest coding of these words, or None when storing them raw is as small."""
    numel = vals.size
    hi_shift = lay.low_bits
    man = lay.hi_man_bits
    ebits = lay.exp_bits
    ks = K_CHOICES[lay.name]
    kmax = max(ks)
    rows_ok = len(shape) >= 2 and shape[-1] >= MIN_ROW_LEN and numel // shape[-1] >= MIN_ROWS
    row_len = shape[-1] if rows_ok else max(numel, 1)
    nrows = numel // row_len
    means = np.zeros(nrows)
    if rows_ok:
        _row_mean_exponents(vals, hi_shift, man, (1 << ebits) - 1, nrows, row_len, means)
    step = max(1, -(-numel // SAMPLE_VALUES) if rows_ok else 1)
    sample = np.arange(0, nrows, step, dtype=np.int64)
    scale = nrows / sample.size
    hbits = lay.hi_bits
    raw_bytes = numel * hbits / 8
    best = None
    for nph, shifted, q in _candidates(means):
        counts = np.zeros((nph, 1 << (ebits + kmax)), np.int64)
        _histogram(vals, hi_shift, hbits, ebits, man - kmax, sample, row_len, q, nph, counts)
        rows_bytes = _entropy_bytes(q) if shifted else 0
        for k in ks:
            ck = counts.reshape(nph, -1, 1 << (kmax - k)).sum(axis=2)
            present = np.flatnonzero(ck.any(axis=0))
            if present.size > MAX_SYMBOLS:
                continue
            sub = ck[:, present]
            bits = 0.0
            freq = np.zeros(sub.shape, np.uint32)
            for ph in range(nph):
                rans.normalize_freqs(sub[ph], freq[ph])
                bits += rans.coded_bits(sub[ph], freq[ph])
            table_bytes = _varint_len(np.diff(present, prepend=0)) + _varint_len(freq)
            est = (bits * scale + numel * (man + 1 - k)) / 8 + table_bytes + rows_bytes
            est += nchunks * rans.STATE_BYTES
            if best is None or est < best[0]:
                best = (est, k, nph, shifted, q, ck)
    if best is None or best[0] >= raw_bytes:
        return None
    est, k, nph, shifted, q, counts = best
    if step > 1:
        # the final table comes from every row: a symbol the sample missed must still be codable
        counts = np.zeros((nph, 1 << (ebits + k)), np.int64)
        _histogram(vals, hi_shift, hbits, ebits, man - k, np.arange(nrows, dtype=np.int64),
                   row_len, q, nph, counts)
    alphabet = np.flatnonzero(counts.any(axis=0))
    if alphabet.size > MAX_SYMBOLS:
        return None
    freq = np.zeros((nph, alphabet.size), np.uint32)
    for ph in range(nph):
        rans.normalize_freqs(counts[ph, alphabet], freq[ph])
        if not counts[ph].any():
            freq[ph, 0] = rans.PROB_SCALE  # a phase no row uses still needs a valid table
    q = q if rows_ok else np.zeros(1, np.int8)
    return Plan(k, man + 1 - k, nph, shifted, row_len, q, alphabet, freq, est)
