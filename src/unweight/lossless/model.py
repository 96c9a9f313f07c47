"""The probability model: which bits form the coded symbol, which rows share a table, the tables.

A value's coded symbol is its exponent and top ``k`` mantissa bits (the mantissa is not uniform
inside a binade: bell-shaped weights put more mass at its low end; on minilm-l6 in BF16, k = 2
takes 0.054 bit per weight off exponent-only coding); the sign and the other mantissa bits are
raw. Rows of a weight matrix (output neurons,
embedding rows) differ in scale, so a row's exponents are a shifted copy of a shared shape. The row
context gives each row an integer exponent shift and one of ``nph`` phases (the fractional part of
its scale, in steps of 1/nph binade): row ``r`` is coded with table ``q[r] % nph`` on exponents
lowered by ``q[r] // nph`` (mod 2^E; format version 3 keeps exponent 0 apart, :func:`lower`). On minilm-l6 in BF16 this takes another 0.048 bit per
weight off; 2 or 4 such tables do what 16 plain quantile buckets of rows do (estimated within
0.001 bit) at a quarter of the table cost and cache footprint. Contexts measured and not kept
(entropy estimates with table cost): the previous exponent (+0.001 bit, a loss), the column's
mean exponent in 4 buckets (-0.006 bit before the cost of a per-column side table).

Everything is chosen per tensor by size: each candidate (k, nph, shifted) is costed exactly, with
its quantised frequencies, tables and side information, from one grouped histogram pass over the
data, and the cheapest wins; if nothing beats storing the words raw, the tensor is stored.
"""

import threading
from dataclasses import dataclass

import numpy as np
import zstandard
from numba import njit

from unweight.lossless import pool, rans, rans32
from unweight.lossless.fields import FloatLayout

MIN_VALUES = 256  # smaller tensors are stored raw: a code table would cost more than it saves
MIN_ROW_LEN = 16  # shorter rows (conv kernels, tiny matrices) get no row context
MIN_ROWS = 8
PHASES = (2, 4)
MAX_SYMBOLS = 256
# mantissa bits in the symbol. Each k is one compiled kernel specialisation, so only what pays is
# offered: on minilm-l6, BF16 picks k=2 for 99.9% of weights given {1, 2}, and FP16 gains 0.0006
# bit per weight from choosing between 2 and 3 over k=2 alone. BF16 weights dequantized from 4-bit
# GGUF blocks have far from uniform low mantissas: offering k = 3 and 4 as well takes gemma3-270m
# from 0.6556 to 0.6530 and smollm2-135m from 0.6587 to 0.6585 (minilm-l6 stays at 0.6581).
# Only tensors of at least MIN_VALUES_MORE_K values try the k after the first, and only where a
# sample says they may pay: each k tried costs table passes over 2^(E+k) bins, which made planning
# minilm-l6 1.5x slower for no gain when every tensor tried them.
MIN_VALUES_MORE_K = 1 << 16
MIN_GAIN_BITS = 0.02  # and only where they look worth it at order 0 (_ks_worth_trying),
SAMPLE_STEP = 16  # judged on every 16th value
PARALLEL_VALUES = 1 << 20  # tensors this large are planned on several threads
K_CHOICES = {"bf16": (2, 3, 4), "fp32": (2,), "fp16": (2,), "fp8_e4m3": (3,), "fp8_e5m2": (2,)}
# format version 3's: its planes hold at most 8 raw bits, so FP16 (10 mantissa bits) takes k = 3 (r = 8;
# minilm-l6 in FP16 0.84480 against k = 2's 0.84475 in version 2, smollm2-135m 0.84500 against 0.84523)
# FP8 keeps its whole mantissa in the symbol, as in version 2: the sign is its one raw bit
K_CHOICES_V3 = {"bf16": (2, 3, 4), "fp32": (2,), "fp16": (3,), "fp8_e4m3": (3,), "fp8_e5m2": (2,)}

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
def _row_pass(vals, hi_shift, hbits, man, row_len, r0, r1, means, shift, step, sample):
    """``means[r]`` = the mean exponent of row ``r``, for ``r0 <= r < r1``; with ``step > 0`` also
    ``sample[sym] += 1`` for each of these rows' values whose index is a multiple of ``step`` (as
    :func:`_sample_histogram` over the whole tensor), counted while the row is in cache."""
    sh = hi_shift + man
    emask = (1 << (hbits - 1 - man)) - 1
    bodymask = (1 << (hbits - 1)) - 1
    for r in range(r0, r1):
        base = r * row_len
        row = vals[base:base + row_len]
        s = 0
        for i in range(row_len):
            s += (np.int64(row[i]) >> sh) & emask
        means[r] = s / row_len
        if step > 0:
            for i in range((step - base % step) % step, row_len, step):
                sample[((np.int64(row[i]) >> hi_shift) & bodymask) >> shift] += 1


_FLUSH = 1 << 30  # values counted into int32 counters between two additions into the int64 ones


@njit(cache=True, nogil=True)
def _grouped_histogram(vals, hi_shift, hbits, shift, row_len, gid, r0, r1, hist, flush=_FLUSH):
    """hist[g, sym] += the counts of rows ``r0 <= r < r1`` whose group ``gid[r]`` is ``g``; ``sym`` =
    the top ``hbits - 1 - shift`` bits below the sign (exponent and top mantissa bits, unshifted).
    One pass over the data in storage order (a pass in group order jumps between rows, which the
    hardware prefetcher does not follow: 1.2 against 0.65 ns per value on minilm-l6's embedding);
    two int32 counters per group and symbol so that runs of one symbol do not serialise on one
    memory location, added into ``hist`` every ``flush`` values, before they could overflow."""
    ng, nsym = hist.shape
    sub = np.zeros((ng, 2, nsym), np.int32)
    bodymask = (1 << (hbits - 1)) - 1
    counted = 0
    for r in range(r0, r1):
        s = sub[gid[r]]
        for p in range(r * row_len, (r + 1) * row_len, flush):
            piece = vals[p:min(p + flush, (r + 1) * row_len)]
            m = piece.size - piece.size % 2
            for i in range(0, m, 2):
                s[0, ((np.uint32(piece[i]) >> hi_shift) & bodymask) >> shift] += 1
                s[1, ((np.uint32(piece[i + 1]) >> hi_shift) & bodymask) >> shift] += 1
            for i in range(m, piece.size):
                s[0, ((np.uint32(piece[i]) >> hi_shift) & bodymask) >> shift] += 1
            counted += piece.size
            if counted >= flush:
                _add_counts(sub, hist)
                counted = 0
    _add_counts(sub, hist)


@njit(cache=True, nogil=True)
def _add_counts(sub, hist):
    for g in range(hist.shape[0]):
        for sym in range(hist.shape[1]):
            hist[g, sym] += np.int64(sub[g, 0, sym]) + np.int64(sub[g, 1, sym])
    sub[:] = 0


@njit(inline="always")
def lower(sym, s, k, ebits, zero_apart):
    """Symbol ``sym`` (exponent above ``k`` mantissa bits) with its exponent lowered by ``s`` binades:
    mod 2^E (version 2), or with ``zero_apart`` (version 3) exponent 0 left where it is and the others
    rotated over 1 .. 2^E - 1, so that no other exponent lands on 0."""
    e = sym >> k
    if not zero_apart:
        return (sym - (s << k)) & ((1 << (ebits + k)) - 1)
    if e == 0:
        return sym
    return ((((e - 1 - s) % ((1 << ebits) - 1)) + 1) << k) | (sym & ((1 << k) - 1))


@njit(cache=True, nogil=True)
def _merge_groups(hist, qg, nph, kmax, ebits, zero_apart, counts):
    """counts[phase] = sum over groups g of phase qg[g] % nph of hist[g] with its exponents
    lowered by qg[g] // nph (:func:`lower`)."""
    nsym = hist.shape[1]
    for g in range(hist.shape[0]):
        ph = qg[g] % nph
        for sym in range(nsym):
            counts[ph, lower(sym, qg[g] // nph, kmax, ebits, zero_apart)] += hist[g, sym]


def codes(alphabet: np.ndarray, k: int) -> tuple[np.ndarray, int] | None:
    """Version 3's one-byte code of each symbol, and ``off``: the symbols of exponent 0 (zeros,
    subnormals) are their own codes ``0 .. 2^k - 1``, any other symbol ``s`` has code ``s - off``
    (``off = base - 2^k``, ``base`` the first of them). None when that does not fit a byte (the others
    span more than ``256 - 2^k`` values)."""
    off = code_offset(alphabet, k)
    return None if off < 0 else (_codes(alphabet, k, off), off)


@njit(cache=True, nogil=True)
def code_offset(alphabet, k):
    """:func:`codes`' ``off`` for the ascending ``alphabet``, or -1 when the codes do not fit a byte."""
    nz = np.searchsorted(alphabet, 1 << k)  # exponent 0's symbols first
    if nz == alphabet.size:
        return 0
    off = alphabet[nz] - (1 << k)
    return off if alphabet[alphabet.size - 1] - off < 256 else -1


@njit(cache=True, nogil=True)
def _codes(alphabet, k, off):
    """:func:`codes`' codes, given its ``off`` (:func:`code_offset`)."""
    code = alphabet.copy()
    for j in range(code.size):
        if code[j] >= 1 << k:
            code[j] -= off
    return code


@njit(cache=True, nogil=True)
def decode_tables_v3(data, nsym, nph, k, space, dec):
    """Version 3's decode tables ``dec`` (``nph`` x 4096, :func:`rans32.build_tables`) from a tensor's stored
    tables ``data`` (:func:`serialize_tables`), in one call. Returns (status, off): 0 and :func:`codes`'
    ``off``; 1 when the tables are malformed or hold a symbol from ``space`` up; 2 when the symbols do not fit
    one-byte codes; 3 + ph when phase ph's frequencies do not make a table."""
    alphabet = np.zeros(nsym, np.int64)
    freq = np.zeros((nph, nsym), np.uint32)
    if not parse_tables(data, nsym, nph, alphabet, freq) or alphabet[nsym - 1] >= space:
        return 1, 0
    off = code_offset(alphabet, k)
    if off < 0:
        return 2, 0
    bad = rans32.build_tables(alphabet, freq, space, _codes(alphabet, k, off), np.zeros(0, np.uint32), dec)
    return (0, off) if bad == -1 else (3 + bad, 0)


@njit(inline="always")
def _varint_bytes(v):
    return 1 + (v >= 1 << 7) + (v >= 1 << 14) + (v >= 1 << 21)


@njit(cache=True, nogil=True)
def _table(counts, kmax, k, alphabet, freq):
    """Reduce ``counts[phase, sym at kmax]`` to k mantissa bits; fill ``alphabet`` (the symbols
    seen) and ``freq[phase, :nsym]``. Returns (nsym, coded bits, table bytes); nsym is -1 when
    more than MAX_SYMBOLS symbols are seen."""
    nph, nsym_max = counts.shape
    group = 1 << (kmax - k)
    nk = nsym_max // group
    ck = np.zeros((nph, nk), np.int64)
    for ph in range(nph):
        for sym in range(nsym_max):
            ck[ph, sym // group] += counts[ph, sym]
    nsym = 0
    prev = 0
    table_bytes = 0
    for sym in range(nk):
        if ck[:, sym].any():
            if nsym == MAX_SYMBOLS:
                return -1, 0.0, 0
            alphabet[nsym] = sym
            table_bytes += _varint_bytes(sym - prev)
            prev = sym
            nsym += 1
    bits = 0.0
    sub = np.zeros(nsym, np.int64)
    for ph in range(nph):
        for d in range(nsym):
            sub[d] = ck[ph, alphabet[d]]
        f = freq[ph, :nsym]
        rans.normalize_freqs(sub, f)
        bits += rans.coded_bits(sub, f)
        if f.sum() == 0:
            f[0] = rans.PROB_SCALE  # a phase no row uses still needs a valid table
        for d in range(nsym):
            table_bytes += _varint_bytes(f[d])
    return nsym, bits, table_bytes


def serialize_tables(alphabet: np.ndarray, freq: np.ndarray) -> bytes:
    """Alphabet as ascending deltas, then ``freq`` row by row, all as LEB128 varints."""
    out = np.zeros(4 * (alphabet.size + freq.size), np.uint8)
    n = _write_varints(np.asarray(alphabet, np.int64), np.asarray(freq, np.int64).reshape(-1), out)
    return out[:n].tobytes()


@njit(cache=True, nogil=True)
def _write_varints(alphabet, freq, out):
    o = 0
    prev = 0
    for j in range(alphabet.size + freq.size):
        if j < alphabet.size:
            v = alphabet[j] - prev
            prev = alphabet[j]
        else:
            v = freq[j - alphabet.size]
        while v >= 0x80:
            out[o] = (v & 0x7F) | 0x80
            o += 1
            v >>= 7
        out[o] = v
        o += 1
    return o


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


_LOCAL = threading.local()


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor (they are not thread-safe): making one took 11 of a tensor's 13 us in
    :func:`parse_rows`."""
    if (dctx := getattr(_LOCAL, "dctx", None)) is None:
        dctx = _LOCAL.dctx = zstandard.ZstdDecompressor()
    return dctx


def parse_rows(codec: int, data: bytes, nrows: int) -> np.ndarray | None:
    try:
        if codec == ROWS_ZSTD:
            data = decompressor().decompress(data, max_output_size=nrows)
        elif codec != ROWS_RAW:
            return None
    except zstandard.ZstdError:
        return None
    if len(data) != nrows:
        return None
    return np.frombuffer(data, np.int8).copy()


@njit(cache=True, nogil=True)
def _row_groups(means, med, finest):
    """Rows grouped by their scale step ``floor(finest * (mean - med))`` (clipped to int8; ``med``: the
    median of ``means``, taken by numpy: numba's ``np.median`` adds 4 s to the first compile):
    (the steps present, ascending; each row's group; each group's number of rows)."""
    count = np.zeros(256, np.int64)
    step = np.empty(means.size, np.int64)
    for r in range(means.size):
        step[r] = min(max(np.floor(finest * (means[r] - med)), -128), 127) + 128
        count[step[r]] += 1
    index = np.zeros(256, np.int64)
    ng = 0
    for v in range(256):
        index[v] = ng
        ng += count[v] > 0
    groups = np.empty(ng, np.int64)
    sizes = np.empty(ng, np.int64)
    for v in range(256):
        if count[v]:
            groups[index[v]] = v - 128
            sizes[index[v]] = count[v]
    gid = np.empty(means.size, np.int64)
    for r in range(means.size):
        gid[r] = index[step[r]]
    return groups, gid, sizes


@njit(cache=True, nogil=True)
def _entropy_bytes(qg, sizes):
    """Bytes the row contexts ``q`` would take zstd-coded, estimated by their order-0 entropy plus a
    frame: the ``sizes[g]`` rows of group ``g`` have ``q = qg[g]``."""
    c = np.zeros(256, np.float64)
    for g in range(qg.size):
        c[qg[g] + 128] += sizes[g]
    n = c.sum()
    bits = 0.0
    for v in range(256):
        if c[v] > 0:
            bits -= c[v] * np.log2(c[v] / n)
    return bits / 8 + 64


@njit(cache=True, nogil=True)
def _sample_histogram(vals, hi_shift, hbits, shift, step, out):
    """``out[sym]`` over every ``step``-th value (``sym`` as in :func:`_grouped_histogram`)."""
    bodymask = (1 << (hbits - 1)) - 1
    for i in range(0, vals.size, step):
        out[((np.int64(vals[i]) >> hi_shift) & bodymask) >> shift] += 1


@njit(cache=True, nogil=True)
def _entropy_at(total, drop):
    """Order-0 entropy in bits of the histogram ``total`` with its last ``drop`` bits merged, with
    the Miller-Madow correction (a sample's plug-in entropy is low by about (bins - 1) / 2n nats,
    which on finer bins would pass for a gain)."""
    group = 1 << drop
    n = 0.0
    acc = 0.0
    bins = 0
    for j in range(0, total.size, group):
        c = 0.0
        for i in range(j, j + group):
            c += total[i]
        if c > 0:
            acc += c * np.log2(c)
            n += c
            bins += 1
    return np.log2(n) - acc / n + (bins - 1) / (2 * n * np.log(2)) if n > 0 else 0.0


def _ks_worth_trying(total: np.ndarray, ks: tuple[int, ...], kmax: int) -> tuple[int, ...]:
    """``ks[0]`` and every further k whose extra symbol bits would save at least MIN_GAIN_BITS per
    value at order 0 (``total``: a sample's symbol histogram at ``kmax`` bits). Each k tried costs
    a table pass over 2^(E+k) bins; on real weights (minilm-l6) no tensor gains 0.007 bit from k = 3
    or 4 (exactly, on all values), on weights dequantized from 4-bit blocks most gain far more
    (gemma3-270m: median 0.13 at k = 4). The threshold sits above the sample's noise: at 0.02 no
    minilm-l6 tensor passes, at 0.01 five did."""
    h0 = _entropy_at(total, kmax - ks[0])
    return (ks[0],) + tuple(k for k in ks[1:]
                            if (k - ks[0]) - (_entropy_at(total, kmax - k) - h0) >= MIN_GAIN_BITS)


def _summed(threads: int, shape, fill, n: int) -> np.ndarray:
    """The sum of ``fill(lo, hi, out)`` over contiguous ranges of ``range(n)``, one ``out`` (int64
    zeros of ``shape``) per range, on up to ``threads`` threads."""
    if threads <= 1 or n <= 1:
        out = np.zeros(shape, np.int64)
        fill(0, n, out)
        return out
    parts = {}

    def task(lo, hi):
        parts[lo] = np.zeros(shape, np.int64)
        fill(lo, hi, parts[lo])
    pool.run_ranges(task, n, threads, per_thread=1)
    return sum(parts.values())  # n >= 2 here, so every range ran


def plan(vals: np.ndarray, lay: FloatLayout, shape: tuple[int, ...], nchunks: int, threads: int = 1,
         zero_apart: bool = False) -> Plan | None:
    """The cheapest coding of these words, or None when storing them raw is as small. The passes
    over the data run on up to ``threads`` threads for tensors of at least ``PARALLEL_VALUES``
    values (partial histograms, summed: the plan does not depend on the number of threads).
    ``zero_apart`` plans for format version 3: row shifts as :func:`lower` says, and only candidates
    whose symbols have one-byte :func:`codes` (None when there are none)."""
    numel = vals.size
    if numel < MIN_VALUES:
        return None
    hi_shift, man, ebits, hbits = lay.low_bits, lay.hi_man_bits, lay.exp_bits, lay.hi_bits
    choices = (K_CHOICES_V3 if zero_apart else K_CHOICES)[lay.name]
    ks = choices if numel >= MIN_VALUES_MORE_K else choices[:1]
    kmax = max(ks)
    nsym = 1 << (ebits + kmax)
    rows_ok = len(shape) >= 2 and shape[-1] >= MIN_ROW_LEN and numel // shape[-1] >= MIN_ROWS
    row_len = shape[-1] if rows_ok else max(numel, 1)
    nrows = numel // row_len
    # rows are grouped by their scale in steps of 1/FINEST binade; every candidate context is a
    # merge of these groups, so one pass over the data costs them all
    finest = max(PHASES)
    threads = threads if numel >= PARALLEL_VALUES else 1
    step = SAMPLE_STEP if len(ks) > 1 else 0  # a sample of values decides which k to try
    if rows_ok:
        means = np.zeros(nrows)
        sample = _summed(threads, nsym, lambda lo, hi, out: _row_pass(
            vals, hi_shift, hbits, man, row_len, lo, hi, means, man - kmax, step, out), nrows)
        groups, gid, sizes = _row_groups(means, float(np.median(means)), finest)
    else:  # one group of one row
        groups, gid, sizes = np.zeros(1, np.int64), np.zeros(nrows, np.int64), np.ones(1, np.int64)
        if step:
            sample = _summed(threads, nsym, lambda lo, hi, out: _sample_histogram(
                vals[lo * step:hi * step], hi_shift, hbits, man - kmax, step, out), -(-numel // step))
    if step:  # drop the k whose extra mantissa bits look near uniform on the sample
        ks = _ks_worth_trying(sample, ks, kmax)
        kmax = max(ks)
        nsym = 1 << (ebits + kmax)
    hist = _summed(threads, (groups.size, nsym), lambda lo, hi, out: _grouped_histogram(
        vals, hi_shift, hbits, man - kmax, row_len, gid, lo, hi, out), nrows)

    candidates = [(1, False)] + ([(nph, True) for nph in PHASES] if rows_ok else [])
    raw_bytes = numel * hbits / 8
    best = None
    for nph, shifted in candidates:
        qg = groups // (finest // nph) if shifted else np.zeros_like(groups)
        counts = np.zeros((nph, nsym), np.int64)
        _merge_groups(hist, qg, nph, kmax, ebits, zero_apart, counts)
        rows_bytes = _entropy_bytes(qg, sizes) if shifted else 0
        for k in ks:
            alphabet = np.zeros(MAX_SYMBOLS, np.int64)
            freq = np.zeros((nph, MAX_SYMBOLS), np.uint32)
            nsym_k, bits, table_bytes = _table(counts, kmax, k, alphabet, freq)
            if nsym_k < 0 or (zero_apart and codes(alphabet[:nsym_k], k) is None):
                continue
            est = (bits + numel * (man + 1 - k)) / 8 + table_bytes + rows_bytes
            est += nchunks * rans.STATE_BYTES
            if best is None or est < best.est_bytes:
                q = qg[gid].astype(np.int8) if shifted else np.zeros(max(nrows, 1), np.int8)
                best = Plan(k, man + 1 - k, nph, shifted, row_len, q, alphabet[:nsym_k].copy(),
                            freq[:, :nsym_k].copy(), est)
    if best is None or best.est_bytes >= raw_bytes:
        return None
    return best
