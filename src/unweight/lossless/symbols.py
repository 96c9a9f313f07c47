"""Entropy coding of byte-symbol streams (codebook assignments, quantization levels) with the lossless
rANS coder.

A quantized matrix stores one small integer per weight (a K-means index, an RTN level). Bit-packing
spends ``ceil(log2 K)`` bits on each; their order-0 entropy is lower whenever the values are not used
equally often. :func:`encode_symbols` codes a uint8 stream with the coder of ``docs/format.md``
(interleaved rANS, Duda arXiv:1311.2540, Giesen arXiv:1402.3392: 16 lanes, 12-bit frequencies, 64-bit
states, 32-bit renormalisation) and one order-0 table; :func:`decode_symbols` reverses it bit-exactly.

The stream is a few plain 1-D tensors, returned keyed by suffix (the caller stores each under its own
prefix):

| suffix | dtype | holds |
|---|---|---|
| ``head`` | I64 | magic ``"UWSY"``, version, numel, chunk, lanes, prob_bits, width, nsym, meta_hash |
| ``code`` | U8 | the chunks' segments back to back, then ``STREAM_PAD`` zero bytes |
| ``offsets`` | I64 | ``nchunks + 1`` byte offsets into ``code`` (first 0) |
| ``modes`` | U8 | per chunk: 0 rANS-coded, 1 raw |
| ``check`` | I64 | per chunk: XXH64 (seed 0) of its symbols, one byte each |
| ``tables`` | U8 | only when a chunk is coded: the alphabet and one frequency row, as ``.ul.tables`` |

Symbols are cut into chunks of ``CHUNK_SYMBOLS``; chunks are independent. A **coded** segment is the
float codec's (the flushed states, then the renormalisation words in decode order) with no raw bits
in the slot (``rb = 0``): the permuted word is the symbol itself. A **raw** segment is the chunk's
symbols bit-packed at ``width`` bits (the layout of ``unweight.pack``; ``width`` bits hold every
symbol), so a chunk never takes more than bit-packing would; whole-stream coding is dropped (no table,
every chunk raw) when it would not be smaller, tables included. The stream is therefore never larger
than bit-packing plus the header, offsets, modes, checksums and padding. ``meta_hash`` is the XXH64
of the header (that field zeroed) and the tables.

The decoder is :func:`unweight.lossless.rans.decode_words` itself. The encoder is a short loop of its
own: the float codec's encoder divides by a reciprocal that is exact for states below ``2^63``, which
holds when a step carries at least one raw bit; with ``rb = 0`` the state can reach ``2^64``, so the
division here is an exact integer one. A one-symbol stream gets a phantom second symbol of frequency
1 (the coder cannot hold a frequency of ``PROB_SCALE``), which costs ``log2(4096/4095)`` bit a value.
Any corrupt, truncated or inconsistent input raises :class:`~unweight.errors.UnweightError` naming the
tensor and, where one is at fault, the chunk.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import numpy as np
import torch
from numba import njit

from unweight.errors import UnweightError
from unweight.jit_cache import source_stamp
from unweight.lossless import chunks, hashing, model, rans, simd
from unweight.lossless.fields import part_array
from unweight.lossless.hashing import meta_hash, xxh64

VERSION = 2  # of this stream layout
MAGIC = 0x59535755  # "UWSY" little-endian
CHUNK_SYMBOLS = 1 << 18
MAX_SYMBOL = 255
SUFFIXES = ("head", "code", "offsets", "modes", "check", "tables")
HEAD_FIELDS = ("magic", "version", "numel", "chunk", "lanes", "prob_bits", "width", "nsym", "meta_hash")
_F = {f: i for i, f in enumerate(HEAD_FIELDS)}

_ERRORS = {
    **chunks.SEGMENT_ERRORS,
    chunks.ERR_CHECKSUM: "checksum mismatch: decoded symbols differ from the original",
    chunks.ERR_MODE: "unknown chunk mode (or coded without a code table)",
}


# ---------------------------------------------------------------------------------------------
# kernels


@njit(cache=True, nogil=True)
def _pack_chunk(src, width, dst):
    """``src`` (uint8, each < 2^width) bit-packed LSB first into ``dst`` (zeroed here)."""
    dst[:] = 0
    bit = 0
    for i in range(src.size):
        v = np.int64(src[i])
        b, o = bit >> 3, bit & 7
        dst[b] |= np.uint8((v << o) & 0xFF)
        if o + width > 8:
            dst[b + 1] |= np.uint8(v >> (8 - o))
        bit += width


@njit(cache=True, nogil=True)
def _unpack_chunk(src, width, out):
    mask = (1 << width) - 1
    bit = 0
    for i in range(out.size):
        b, o = bit >> 3, bit & 7
        v = np.int64(src[b]) >> o
        if o + width > 8:
            v |= np.int64(src[b + 1]) << (8 - o)
        out[i] = np.uint8(v & mask)
        bit += width


_KERNELS = []


def _kernels():
    """(encode_chunks, decode_chunks), compiled (or loaded from numba's cache) on first use."""
    if not _KERNELS:
        _KERNELS.extend(_make_kernels(source_stamp(rans, simd, chunks, hashing, sys.modules[__name__])))
    return _KERNELS


def _make_kernels(stamp):
    @njit(inline="always")
    def _encode_segment(sym, freq, cum, scratch):
        """rANS-encode ``sym`` (uint8) into the tail of ``scratch`` (uint32) exactly as
        :func:`rans.encode_words` lays out a segment with ``rb = 0``; value ``i`` uses lane ``i % LANES``.
        Returns the index of the segment's first word."""
        x = np.full(rans.LANES, np.uint64(rans.STATE_LOW), np.uint64)
        pos = scratch.size
        for i in range(sym.size - 1, -1, -1):
            lane = i & (rans.LANES - 1)
            s = sym[i]
            f = np.uint64(freq[s])
            xl = x[lane]
            if xl >= f << np.uint64(64 - rans.PROB_BITS):  # f < PROB_SCALE, so this does not overflow
                pos -= 1
                scratch[pos] = np.uint32(xl & np.uint64(0xFFFFFFFF))
                xl >>= np.uint64(32)
            x[lane] = ((xl // f) << np.uint64(rans.PROB_BITS)) + xl % f + np.uint64(cum[s])
        for lane in range(rans.LANES - 1, -1, -1):
            scratch[pos - 1] = np.uint32(x[lane] >> np.uint64(32))
            scratch[pos - 2] = np.uint32(x[lane] & np.uint64(0xFFFFFFFF))
            pos -= 2
        return pos

    @njit(cache=True, nogil=True)
    def _encode_chunks(sym, chunk_w, width, coded, freq, cum, code, sizes, modes, check, scratch):
        """Every chunk into ``code`` back to back (coded, or packed when that is not smaller)."""
        assert stamp != 0
        base = 0
        numel = sym.size
        for c in range(sizes.size):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            src = sym[c0:c0 + n]
            check[c] = xxh64(sym, c0, n)
            size = (n * width + 7) // 8
            mode = chunks.MODE_RAW
            if coded:
                p = _encode_segment(src, freq, cum, scratch)
                nbytes = (scratch.size - p) * 4
                if nbytes < size:
                    code[base:base + nbytes] = scratch[p:].view(np.uint8)
                    size = nbytes
                    mode = chunks.MODE_CODED
            if mode == chunks.MODE_RAW:
                _pack_chunk(src, width, code[base:base + size])
            sizes[c] = size
            modes[c] = mode
            base += size
        return base

    @njit(cache=True, nogil=True)
    def _decode_chunks(code, offsets, modes, check, chunk_w, width, dec, out, words, status):
        assert stamp != 0
        counts = np.zeros(1, np.int64)
        numel = out.size
        for c in range(modes.size):
            c0 = c * chunk_w
            n = min(chunk_w, numel - c0)
            s0 = offsets[c]
            seglen = offsets[c + 1] - s0
            mode = modes[c]
            if mode == chunks.MODE_RAW:
                if seglen != (n * width + 7) // 8:
                    status[c] = chunks.ERR_RAW_SIZE
                    continue
                _unpack_chunk(code[s0:s0 + seglen], width, out[c0:c0 + n])
            elif mode == chunks.MODE_CODED and dec.shape[0] > 0:
                counts[0] = n
                rc = rans.decode_words(code, s0, seglen, n, counts, dec, words, 0)
                if rc != rans.OK:
                    status[c] = rc
                    continue
                for i in range(n):
                    out[c0 + i] = np.uint8(words[i] & 0xFF)
            else:
                status[c] = chunks.ERR_MODE
                continue
            if xxh64(out, c0, n) != check[c]:
                status[c] = chunks.ERR_CHECKSUM

    return _encode_chunks, _decode_chunks


# ---------------------------------------------------------------------------------------------
# the stream


def _table(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ascending alphabet, frequencies summing to PROB_SCALE, none equal to it) from symbol counts."""
    alphabet = np.flatnonzero(counts)
    weights = counts[alphabet].astype(np.int64)
    if alphabet.size == 1:  # a phantom neighbour: one symbol cannot take the whole PROB_SCALE
        s = int(alphabet[0])
        pairs = sorted([(s, max(int(weights[0]), rans.PROB_SCALE)), (s + 1 if s < MAX_SYMBOL else s - 1, 1)])
        alphabet = np.array([a for a, _ in pairs], np.int64)
        weights = np.array([w for _, w in pairs], np.int64)
    freq = np.zeros(alphabet.size, np.int64)
    rans.normalize_freqs(weights, freq)
    return alphabet.astype(np.int64), freq


def _meta_hash(head: np.ndarray, tables) -> int:
    return meta_hash(head, _F["meta_hash"], tables)


def _encode(sym: np.ndarray, width: int, alphabet: np.ndarray | None, freq: np.ndarray | None):
    numel = sym.size
    nchunks = -(-numel // CHUNK_SYMBOLS)
    coded = alphabet is not None
    f_by_sym = np.zeros(MAX_SYMBOL + 1, np.int64)
    c_by_sym = np.zeros(MAX_SYMBOL + 1, np.int64)
    if coded:
        f_by_sym[alphabet] = freq
        c_by_sym[alphabet] = np.cumsum(freq) - freq
    cw = min(CHUNK_SYMBOLS, numel)
    code = np.zeros(nchunks * ((cw * width + 7) // 8) + rans.STREAM_PAD, np.uint8)
    sizes = np.zeros(nchunks, np.int64)
    modes = np.zeros(nchunks, np.uint8)
    check = np.zeros(nchunks, np.uint64)
    scratch = np.empty(cw + 2 * rans.LANES + 2, np.uint32)
    end = _kernels()[0](sym, CHUNK_SYMBOLS, width, coded, f_by_sym, c_by_sym, code, sizes, modes, check,
                         scratch)
    code = code[:end + rans.STREAM_PAD]
    code[end:] = 0
    offsets = np.zeros(nchunks + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return code, offsets, modes, check


def encode_symbols(u8: torch.Tensor, width: int = 8) -> dict[str, torch.Tensor]:
    """Entropy-code a stream of byte symbols (any shape, read flat, every value ``< 2**width``).

    Returns ``{suffix: tensor}`` (:data:`SUFFIXES`, ``tables`` only when a chunk is coded); never larger
    than ``u8`` bit-packed at ``width`` bits plus the header, offsets, modes, checksums and padding.
    """
    if u8.dtype != torch.uint8:
        raise UnweightError(f"encode_symbols: expected a uint8 tensor, got {u8.dtype}")
    if not 1 <= width <= 8:
        raise UnweightError(f"encode_symbols: width must be in 1..8, got {width}")
    sym = np.ascontiguousarray(u8.detach().cpu().reshape(-1).numpy())
    if sym.size and int(sym.max()) >= 1 << width:
        raise UnweightError(f"encode_symbols: a symbol ({int(sym.max())}) does not fit in {width} bits")
    packed_total = (sym.size * width + 7) // 8
    tables = b""
    if sym.size:
        alphabet, freq = _table(np.bincount(sym, minlength=MAX_SYMBOL + 1))
        tables = model.serialize_tables(alphabet, freq[None, :])
        code, offsets, modes, check = _encode(sym, width, alphabet, freq)
        coded = bool((modes == chunks.MODE_CODED).any())
        if coded and int(offsets[-1]) + len(tables) >= packed_total:  # the table does not pay
            coded = False
        if not coded:
            tables = b""
            code, offsets, modes, check = _encode(sym, width, None, None)
    else:
        code, offsets, modes, check = _encode(sym, width, None, None)
        alphabet = np.zeros(0, np.int64)
    head = np.zeros(len(HEAD_FIELDS), np.int64)
    head[_F["magic"]] = MAGIC
    head[_F["version"]] = VERSION
    head[_F["numel"]] = sym.size
    head[_F["chunk"]] = CHUNK_SYMBOLS
    head[_F["lanes"]] = rans.LANES
    head[_F["prob_bits"]] = rans.PROB_BITS
    head[_F["width"]] = width
    head[_F["nsym"]] = alphabet.size if tables else 0
    head[_F["meta_hash"]] = _meta_hash(head, tables)
    parts = {"head": torch.from_numpy(head), "code": torch.from_numpy(code),
             "offsets": torch.from_numpy(offsets), "modes": torch.from_numpy(modes),
             "check": torch.from_numpy(check.view(np.int64))}
    if tables:
        parts["tables"] = torch.frombuffer(bytearray(tables), dtype=torch.uint8)
    return parts


def _part(parts: Mapping[str, torch.Tensor], name: str, suffix: str, dtype: torch.dtype,
          required: bool = True) -> np.ndarray:
    return part_array(parts, suffix, dtype, lambda: f"tensor {name!r}: symbol stream part {suffix!r}", required)


def decode_symbols(parts: Mapping[str, torch.Tensor], n: int, name: str) -> torch.Tensor:
    """The ``n`` symbols (1-D uint8) of the stream ``parts`` (keyed by suffix), bit-exact, every chunk's
    checksum checked. Raises UnweightError naming ``name`` (and the chunk) on corrupt input."""
    def fail(what: str) -> UnweightError:
        return UnweightError(f"tensor {name!r}: symbol stream: {what}")

    head = _part(parts, name, "head", torch.int64)
    if head.size != len(HEAD_FIELDS) or head[_F["magic"]] != MAGIC:
        raise fail("not a symbol stream header")
    h = dict(zip(HEAD_FIELDS, head.tolist()))
    if h["version"] != VERSION:
        raise fail(f"version {h['version']} (this unweight reads {VERSION})")
    tables = _part(parts, name, "tables", torch.uint8, required=False)
    if _meta_hash(head, tables) != h["meta_hash"]:
        raise fail("header or code table corrupt (metadata checksum mismatch)")
    numel, chunk_w, width, nsym = h["numel"], h["chunk"], h["width"], h["nsym"]
    if (numel != n or chunk_w <= 0 or not 1 <= width <= 8 or h["lanes"] != rans.LANES
            or h["prob_bits"] != rans.PROB_BITS or not 0 <= nsym <= MAX_SYMBOL + 1):
        raise fail(f"header is inconsistent (numel {numel}, expected {n}; chunk, width, lanes, "
                   f"precision or alphabet out of range)")
    nchunks = -(-numel // chunk_w)
    code = _part(parts, name, "code", torch.uint8)
    offsets = _part(parts, name, "offsets", torch.int64)
    modes = _part(parts, name, "modes", torch.uint8)
    check = _part(parts, name, "check", torch.int64).view(np.uint64)
    if modes.size != nchunks or check.size != nchunks:
        raise fail(f"chunk tables hold {modes.size} modes and {check.size} checksums, expected {nchunks}")
    if problem := chunks.offsets_problem(offsets, nchunks, code.size, rans.STREAM_PAD, "code"):
        raise fail(problem)
    dec = np.zeros((0, rans.PROB_SCALE), np.uint64)
    if nsym:
        alphabet = np.zeros(nsym, np.int64)
        freq = np.zeros((1, nsym), np.uint32)
        if not model.parse_tables(tables, nsym, 1, alphabet, freq) or alphabet[-1] > MAX_SYMBOL:
            raise fail("code table is malformed")
        dec = np.empty((1, rans.PROB_SCALE), np.uint64)  # build_tables fills every slot or fails
        if rans.build_tables(alphabet, freq, 0, np.zeros((rans.ENC_ROWS, 0, 0), np.uint64), dec) != -1:
            raise fail("code table is invalid (frequencies do not sum to the precision)")
    out = np.empty(numel, np.uint8)
    status = np.zeros(nchunks, np.int32)
    words = np.empty(min(chunk_w, numel), np.uint16)
    _kernels()[1](code, offsets, modes, check, chunk_w, width, dec, out, words, status)
    failed = np.flatnonzero(status)
    if failed.size:
        c = int(failed[0])
        raise fail(f"chunk {c} of {nchunks}: {_ERRORS.get(int(status[c]), 'corrupt')}")
    return torch.from_numpy(out)


def stream_nbytes(parts: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a stream, every part included."""
    return sum(t.numel() * t.element_size() for t in parts.values())
