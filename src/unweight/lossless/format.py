"""The unweight-lossless tensor format: a float tensor <-> a few plain tensors, bit-exact.

``encode_tensor(t)`` returns ``{suffix: tensor}`` (U8 streams, I64 offsets and checksums, a U8 code
table, an I64 header); the caller stores each under ``name + suffix``. ``decode_tensor(parts, name)``
rebuilds the tensor and checks every chunk's checksum (XXH3-64, or XXH64 before version 4); any corrupt,
truncated or inconsistent input raises :class:`~unweight.errors.UnweightError` naming the tensor and, where
one is at fault, the chunk. The written specification is ``docs/format.md``; ``FORMAT_VERSION`` lives here
only.
"""

import ctypes
import mmap
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch

from unweight.errors import UnweightError
from unweight.lossless import chunks, model, planes, pool, rans, rans32
from unweight.lossless.fields import BY_CODE, LOW_BLOCK, FloatLayout, as_words, layout_of, part_array
from unweight.lossless.hashing import meta_hash

FORMAT_VERSION = 4  # written for every dtype (FP8 since 2026-11-28; before, as version 2)
READ_VERSIONS = (2, 3, 4)
LANES32 = (3, 4)  # the versions of 32 rANS lanes, raw bits in planes; 4 checks its chunks with XXH3-64, 3 XXH64
MAGIC = 0x4C4C5755  # "UWLL" little-endian
CHUNK_WEIGHTS = 1 << 20  # values per chunk at most (see docs/format.md: each chunk costs 128 bytes of flushed states)
# a tensor of at least this many values is cut into an even number of chunks (chunk_width); from 2^16, the chunks'
# states made smollm2-135m's file 2.9 KB larger than lmzip's (docs/format.md, "Chunks")
PAIR_MIN = 1 << 19

HEAD = ".ul.head"
CODE = ".ul.code"
OFFSETS = ".ul.offsets"
MODES = ".ul.modes"
CHECK = ".ul.check"
TABLES = ".ul.tables"
ROWS = ".ul.rows"
LOW = ".ul.low"
LOW_OFFSETS = ".ul.low_offsets"
PACK = ".ul.pack"  # in a folder: all the streams, packed (unweight.lossless.register; folder versions 4, 5)
META = ".ul.meta"  # the small streams packed, beside .ul.code (folder version 3)

# header: these int64 fields, then the shape
HEAD_FIELDS = ("magic", "version", "dtype", "numel", "chunk", "lanes", "prob_bits", "k",
               "raw_bits", "phases", "row_len", "nrows", "nsym", "rows_codec", "ndim", "meta_hash")
_F = {name: i for i, name in enumerate(HEAD_FIELDS)}

_ERRORS = {
    **chunks.SEGMENT_ERRORS,
    chunks.ERR_LOW: "low-mantissa segment is corrupt",
    chunks.ERR_CHECKSUM: "checksum mismatch: decoded bytes differ from the original",
    chunks.ERR_MODE: "unknown chunk mode",
    chunks.ERR_PAD: "coded segment's pad byte is not zero (corrupt)",
}


def is_supported(dtype: torch.dtype) -> bool:
    """True for the float dtypes this format encodes (BF16, FP16, FP32, FP8 E4M3FN/E5M2)."""
    return layout_of(dtype) is not None


def encoded_names(keys) -> list[str]:
    """Names of the encoded tensors among state-dict ``keys``: those with a ``.ul.head``, or in a
    folder, a ``.ul.pack`` or ``.ul.meta`` (their streams packed, ``unweight.lossless.register``)."""
    return sorted(k.rsplit(".ul.", 1)[0] for k in keys if k.endswith((HEAD, PACK, META)))


_LOCAL = threading.local()

_MADV_NOHUGEPAGE, _MADV_POPULATE_WRITE = 15, 23  # Linux; before 5.14 the second is refused
_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
    _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    _LIBC.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
POPULATE_BYTES = 1 << 18  # new outputs from this size get their pages mapped up front


def _output_buffer(nbytes: int, populate: bool = True) -> np.ndarray:
    """``nbytes`` of memory for a decoded tensor, its pages mapped before the kernels write them.

    A decoded tensor is usually new memory (a loader keeps every output). On first write each 4 KiB
    page costs a fault (0.57-0.64 ns per byte on this VM), and the 2 MiB pages numpy asks for from
    4 MiB cost 0.25-2.2 ns per byte from one process to the next. Mapped in one call, in 4 KiB pages,
    new memory costs 0.37-0.41 ns per byte, steadily. Memory the allocator recycles (its first and
    last pages resident) needs no faults and is left alone. docs/format.md, "Fresh memory": a whole
    smollm2-135m decoded once in a fresh process 1.17-1.45x faster; decoded again and again in one
    process (its 56 MB embedding mapped anew each time, where recycled huge pages come cheap)
    0.86-0.93x.
    Where ``madvise`` refuses (or off Linux), the kernels fault as before. With ``populate=False`` the caller
    maps the pages itself (``decode_tensor`` on several threads: each thread its chunks' part)."""
    buf = np.empty(nbytes, np.uint8)
    if populate and nbytes >= POPULATE_BYTES:
        _map_if_fresh(buf)
    return buf


def _whole_pages(buf: np.ndarray) -> tuple[int, int]:
    """The addresses ``[start, end)`` of the pages that lie wholly inside ``buf``."""
    at = buf.__array_interface__["data"][0]  # buf.ctypes.data builds a ctypes object: 2 us
    return -(-at // _PAGE) * _PAGE, (at + buf.nbytes) // _PAGE * _PAGE


def _map_if_fresh(buf: np.ndarray) -> None:
    """Map the whole pages of ``buf`` in 4 KiB pages now, unless its first and last are resident."""
    if _LIBC is None:
        return
    start, end = _whole_pages(buf)
    if end <= start:
        return
    if (resident := getattr(_LOCAL, "resident", None)) is None:  # mincore's answer, one per thread
        resident = _LOCAL.resident = ctypes.create_string_buffer(1)
    if any(_LIBC.mincore(page, _PAGE, resident) != 0 or not resident.raw[0] & 1 for page in (start, end - _PAGE)):
        _LIBC.madvise(start, end - start, _MADV_NOHUGEPAGE)
        _LIBC.madvise(start, end - start, _MADV_POPULATE_WRITE)


def _scratch(key: str, n: int, dtype) -> np.ndarray:
    """A work buffer of ``n`` items, kept per thread and reused across calls: a chunk's buffers
    (1 MB each) would otherwise come fresh from mmap and fault in page by page (filling two of
    them: 224 us fresh against 48 us reused on this machine, per chunk)."""
    nbytes = max(n, 1) * np.dtype(dtype).itemsize
    buf = getattr(_LOCAL, key, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, np.uint8)
        setattr(_LOCAL, key, buf)
    return buf[:nbytes].view(dtype)[:n]


def _v3_buffers(cw: int) -> tuple[np.ndarray, ...]:
    """The version 3/4 decoder's work buffers for chunks of up to ``cw`` values, kept per thread, passed whole
    (the kernels use what a chunk needs): the symbols, FP32's hi halves, :func:`fields.join_low`'s block,
    ``chunks._plan_groups``' plan and runs (its bound); each but the block twice over, for two chunks decoded side
    by side (``chunks._decode_hi_pair``)."""
    bufs = getattr(_LOCAL, "dec_v3", None)
    if bufs is None or bufs[0].size < 2 * cw:
        bufs = _LOCAL.dec_v3 = (np.empty(2 * cw, np.uint16), np.empty(2 * cw, np.uint16),
                                np.empty(LOW_BLOCK, np.uint16), np.empty(2 * (cw // rans32.LANES + 1), np.int32),
                                np.empty(8 * (cw // 16 + 16), np.int32))
    return bufs


_ZEROS = np.zeros(0, np.uint8)


def _zeros(n: int) -> np.ndarray:
    """At least ``n`` zero bytes that no kernel writes, shared (a new one per tensor cost a fresh mapping)."""
    global _ZEROS
    if _ZEROS.size < n:
        _ZEROS = np.zeros(max(n, 2 * _ZEROS.size), np.uint8)
    return _ZEROS


def _close_code(code: np.ndarray, ranges, region: int, sizes: np.ndarray, shrink: bool):
    """(code stream, offsets): the ranges' segments moved together (:func:`_close_gaps`), then the
    padding; with ``shrink`` the buffer is cut to that length, else the stream is a view of its start."""
    offsets = _close_gaps(code, ranges, region, sizes)
    end = offsets[-1] + rans.STREAM_PAD
    code[offsets[-1]:end] = 0
    if shrink:
        code.resize(end, refcheck=False)
        return code, offsets
    return code[:end], offsets


def _close_gaps(buf: np.ndarray, ranges, region: int, sizes: np.ndarray) -> np.ndarray:
    """Offsets of the chunks once each range's output (written from ``lo * region``) is moved
    down behind the previous one, which this does with ``memmove`` (a compiled byte loop took 0.5 s
    for gemma3-270m's embedding at two threads, as long as the two threads' whole encode)."""
    offsets = np.zeros(sizes.size + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    if len(ranges) == 1:  # one range, written from 0: nothing moves
        return offsets
    base = buf.ctypes.data
    for lo, hi in ranges:
        s, d, n = lo * region, int(offsets[lo]), int(offsets[hi] - offsets[lo])
        if not (d <= s and s + n <= buf.nbytes):  # a chunk never outgrows its region
            raise AssertionError(f"chunk range {lo}..{hi} overflows its region of {region} bytes")
        if s != d and n:
            ctypes.memmove(base + d, base + s, n)
    return offsets


def _default_raw_bits(lay: FloatLayout) -> int:
    """The kernel layout of a tensor stored raw (any would do): the first k, which most tensors use."""
    return lay.hi_man_bits + 1 - model.K_CHOICES[lay.name][0]


# ---------------------------------------------------------------------------------------------
# encode


V3_DTYPES = (torch.bfloat16, torch.float16, torch.float32,  # the dtypes versions 3 and 4 are defined for
             torch.float8_e4m3fn, torch.float8_e5m2)


def written_version(dtype: torch.dtype) -> int:
    """The tensor format version this unweight writes for ``dtype``: 4 (32-bit rANS lanes, raw bits in
    planes, XXH3-64 chunk checksums) for every dtype it encodes: BF16, FP16, FP32 (whose hi words are BF16's)
    and FP8 (whose one raw bit is the sign)."""
    return FORMAT_VERSION if dtype in V3_DTYPES else 2


def encode_tensor(t: torch.Tensor, threads: int | None = None) -> dict[str, torch.Tensor]:
    """Encode a float tensor (BF16, FP16, FP32, FP8) into plain 1-D U8/I64 tensors.

    Returns ``{suffix: tensor}``; store them as ``{name + suffix: tensor}`` and read back with
    ``decode_tensor(that_mapping, name)``. ``threads`` (default: ``torch.get_num_threads()``) only changes speed,
    never the output. The input is never modified. Raises UnweightError for other dtypes.
    """
    return {k: torch.from_numpy(v) for k, v in encode_streams(t, threads).items()}


def encode_tensors(tensors: dict[str, torch.Tensor], threads: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`encode_tensor` of each of ``tensors`` (name to its parts), the work spread over up to ``threads``
    threads (default: torch's) as :func:`_spread` says (most matrices are one chunk, which one thread codes).
    The output does not depend on ``threads``."""
    sizes = {n: (t.numel(), -(-t.numel() // chunk_width(t.numel()))) for n, t in tensors.items()}
    return _spread(sizes, pool.resolve(threads), lambda n, th: encode_tensor(tensors[n], th))


SMALL = 1 << 16  # values: a tensor under this is mostly Python (header, tables, the call), which holds the GIL


def _spread(sizes: dict[str, tuple[int, int]], threads: int, one) -> dict:
    """``one(name, threads)`` for each name of ``sizes`` (its values and chunks), in that order: a tensor of at
    least two chunks per thread on all the threads, then the others side by side, ``one(name, 1)`` each: first the
    small ones (under :data:`SMALL` values) together as one task, then the others largest first. The small
    ones' Python then runs on one thread while the others' kernels run on the rest, instead of all threads
    taking turns at the GIL at the end. minilm-l6 on two threads (``bench/lossless.py``, two rounds against
    largest first): decode bf16 3195-3227 against 2991-3109 MB/s, fp16 3130-3260 against 3038-3188, fp32
    5222-5479 against 4745-4832; encode bf16 1308-1312 against 1102-1260, fp32 1932-2050 against 1606-1827."""
    wide = [n for n in sizes if sizes[n][1] >= 2 * threads > 2]  # a pair of chunks (chunk_width) for each thread
    out = {n: one(n, threads) for n in wide}
    rest = sorted((n for n in sizes if n not in out), key=lambda n: -sizes[n][0])
    small = [n for n in rest if sizes[n][0] < SMALL]
    big = [n for n in rest if sizes[n][0] >= SMALL]
    tasks = [lambda: [one(n, 1) for n in small]] + [lambda n=n: one(n, 1) for n in big]
    first, *others = pool.run_tasks(tasks, threads)
    out.update(zip(small, first))
    out.update(zip(big, others))
    return {n: out[n] for n in sizes}


def chunk_width(numel: int) -> int:
    """Values per chunk for a tensor of ``numel`` values: :data:`CHUNK_WEIGHTS`, except that a tensor of at
    least :data:`PAIR_MIN` values is cut into an even number of chunks of (about) equal size, no longer than
    that: the decoder runs a tensor's chunks two by two (``chunks._decode_hi_pair``, twice the steps in flight).
    The width is even (FP8's segments), and the header records it."""
    if numel < PAIR_MIN:
        return CHUNK_WEIGHTS
    pairs = -(-numel // (2 * CHUNK_WEIGHTS))
    w = -(-numel // (2 * pairs))
    return min(w + (w & 1), CHUNK_WEIGHTS)


def encode_streams(t: torch.Tensor, threads: int | None = None, shrink: bool = True,
                   version: int | None = None) -> dict[str, np.ndarray]:
    """:func:`encode_tensor`'s streams as numpy arrays. With ``shrink=False`` the code stream is a
    view of the start of its work buffer (one raw tensor's size, its untouched pages never resident),
    into which a folder's writer packs the other streams after it without copying the code
    (``unweight.lossless.register.pack_streams``). ``version`` (default :func:`written_version`) may
    ask for version 2 or 3 for BF16, FP16 or FP32 (what older unweights read)."""
    lay = layout_of(t.dtype)
    if lay is None:
        raise UnweightError(f"dtype {t.dtype} is not encoded by unweight-lossless; copy it as it is")
    version = written_version(t.dtype) if version is None else version
    if version not in READ_VERSIONS or (version in LANES32 and lay.dtype not in V3_DTYPES):
        raise ValueError(f"format version {version} is not written for {t.dtype}")
    threads = pool.resolve(threads)
    vals = as_words(t)
    numel = vals.size
    chunk_w = chunk_width(numel)
    nchunks = -(-numel // chunk_w)
    shape = tuple(t.shape)
    plan = model.plan(vals, lay, shape, nchunks, threads, zero_apart=version in LANES32) if numel else None
    if version in LANES32 and plan is None and numel:
        # no plan whose symbols have version 3's one-byte codes (model.codes): version 2, if it codes them
        plan = model.plan(vals, lay, shape, nchunks, threads)
        version = version if plan is None else 2
    hbits, hbytes = lay.hi_bits, lay.hi_bits // 8
    rb = plan.raw_bits if plan else _default_raw_bits(lay)
    if version in LANES32:
        return _encode_v3(vals, lay, shape, plan, nchunks, chunk_w, rb, threads, shrink, version)
    encode_range = chunks.range_kernels(hbits)[0]

    if plan is not None:
        space = 1 << (lay.exp_bits + plan.k)
        enc = np.zeros((rans.ENC_ROWS, plan.nph, space), np.uint64)
        if rans.build_tables(plan.alphabet, plan.freq, rb, enc, np.zeros((0, 0), np.uint64)) != -1:
            raise AssertionError("model produced an invalid frequency table")
        q, row_len, nph = plan.q, plan.row_len, plan.nph
    else:
        enc = np.zeros((rans.ENC_ROWS, 1, 1), np.uint64)
        q, row_len, nph = np.zeros(1, np.int8), max(numel, 1), 1

    cw = min(chunk_w, numel)  # the longest chunk
    region = cw * hbytes  # a chunk never takes more than its raw hi words
    code, code_sizes, modes, check, low, low_region, low_sizes = bufs = _chunk_buffers(nchunks, cw, region, lay)
    vals_u8 = vals.view(np.uint8)

    def task(lo: int, hi: int) -> None:
        words = _scratch("enc_words", cw, np.uint32)
        scratch = _scratch("enc_code", cw + 2 * rans.LANES + 2, np.uint32)
        encode_range(vals, vals_u8, lay.itemsize, lo, hi, chunk_w, numel, row_len, q, nph,
                     lay.exp_bits, lay.low_bits, plan is not None, rb, enc, code, lo * region,
                     code_sizes, modes, low, lo * low_region, low_sizes, check, words, scratch)

    ranges = pool.run_ranges(task, nchunks, threads)
    return _assembled(shape, lay, plan, 2, chunk_w, rb, ranges, region, bufs, shrink)


def _chunk_buffers(nchunks: int, cw: int, region: int, lay: FloatLayout):
    """The chunk ranges' output: (code, code sizes, modes, checksums, low, low region, low sizes), each
    range writing from ``lo * region`` of the code (``lo * low region`` of the low halves). FP32's low
    halves (:func:`fields.pack_low`) never take more than ``2 cw`` bytes and a byte per block; other
    dtypes have none."""
    low_region = cw * 2 + -(-cw // LOW_BLOCK) if lay.low_bits else 0
    return (np.empty(nchunks * region + rans.STREAM_PAD, np.uint8), np.zeros(nchunks, np.int64),
            np.zeros(nchunks, np.uint8), np.zeros(nchunks, np.uint64), np.empty(nchunks * low_region, np.uint8),
            low_region, np.zeros(nchunks, np.int64))


def _assembled(shape, lay, plan, version, chunk_w, rb, ranges, region, bufs, shrink) -> dict[str, np.ndarray]:
    """The parts of an encoded tensor from its chunk ranges' :func:`_chunk_buffers`, each stream's
    segments moved together (:func:`_close_gaps`)."""
    code, code_sizes, modes, check, low, low_region, low_sizes = bufs
    code, offsets = _close_code(code, ranges, region, code_sizes, shrink)
    parts = _finish(shape, lay, plan, version, chunk_w, rb, code, offsets, modes, check)
    if lay.low_bits:
        low_offsets = _close_gaps(low, ranges, low_region, low_sizes)
        low.resize(low_offsets[-1], refcheck=False)
        parts[LOW] = low
        parts[LOW_OFFSETS] = low_offsets
    return parts


def _encode_v3(vals, lay, shape, plan, nchunks, chunk_w, rb, threads, shrink, version) -> dict[str, np.ndarray]:
    """Version 3 or 4's parts (BF16 and FP16 words, or FP32 values whose hi halves are coded as BF16 words
    and whose low halves are packed as version 2 packs them)."""
    numel = vals.size
    if plan is not None:
        space = 1 << (lay.exp_bits + plan.k)
        ent = np.zeros(plan.nph * space, np.uint32)
        codes = model.codes(plan.alphabet, plan.k)[0]
        if rans32.build_tables(plan.alphabet, plan.freq, space, codes, ent, np.zeros((0, 0), np.uint32)) != -1:
            raise AssertionError("model produced an invalid frequency table")
        q, row_len, nph, k = plan.q, plan.row_len, plan.nph, plan.k
    else:
        ent = np.zeros(1, np.uint32)
        q, row_len, nph, k = np.zeros(1, np.int8), max(numel, 1), 1, model.K_CHOICES_V3[lay.name][0]
    cw = min(chunk_w, numel)
    region = cw * lay.hi_bits // 8
    code, code_sizes, modes, check, low, low_region, low_sizes = bufs = _chunk_buffers(nchunks, cw, region, lay)
    is32 = lay.low_bits > 0
    encode_range = _range_kernels(lay, version)[0]
    # FP8's raw segments are a chunk's bytes: an even chunk keeps every coded segment's 16-bit words aligned
    assert lay.hi_bits == 16 or chunk_w % 2 == 0

    def task(lo: int, hi: int) -> None:
        keys = _scratch("enc_keys", cw, np.uint16)
        scratch = _scratch("enc_words16", cw + rans32.STATE_WORDS + 16, np.uint16)
        hw = _scratch("enc_hi", cw if is32 else 0, np.uint16)
        encode_range(vals, vals.view(np.uint8), lo, hi, chunk_w, numel, row_len, q, nph, k, plan is not None,
                     ent, code, lo * region, code_sizes, modes, check, low, lo * low_region, low_sizes, keys,
                     scratch, hw)

    ranges = pool.run_ranges(task, nchunks, threads)
    return _assembled(shape, lay, plan, version, chunk_w, rb, ranges, region, bufs, shrink)


def _range_kernels(lay: FloatLayout, version: int):
    """Version 3 or 4's (encode_range, decode_range) for ``lay``: FP8's bytes, or 16-bit words."""
    if lay.hi_bits == 8:
        return chunks.range_kernels_fp8(lay.exp_bits, version)
    return chunks.range_kernels_v3(lay.exp_bits, version)


def _finish(shape, lay, plan, version, chunk_w, rb, code, offsets, modes, check) -> dict[str, np.ndarray]:
    """The parts of an encoded tensor, its header and tables, from its chunks."""
    numel = int(np.prod(shape, dtype=np.int64))
    coded = plan is not None and np.count_nonzero(modes == chunks.MODE_CODED) > 0
    tables = model.serialize_tables(plan.alphabet, plan.freq) if coded else b""
    rows_codec, rows = (model.serialize_rows(plan.q) if coded and plan.shifted
                        else (model.ROWS_NONE, b""))
    head = np.zeros(len(HEAD_FIELDS) + len(shape), np.int64)
    head[_F["magic"]] = MAGIC
    head[_F["version"]] = version
    head[_F["dtype"]] = lay.code
    head[_F["numel"]] = numel
    head[_F["chunk"]] = chunk_w
    head[_F["lanes"]] = rans32.LANES if version in LANES32 else rans.LANES
    head[_F["prob_bits"]] = rans.PROB_BITS
    head[_F["k"]] = plan.k if coded else 0
    head[_F["raw_bits"]] = rb if coded else 0
    head[_F["phases"]] = plan.nph if coded else 0
    head[_F["row_len"]] = plan.row_len if coded else 0
    head[_F["nrows"]] = (numel // plan.row_len if plan.shifted else 0) if coded else 0
    head[_F["nsym"]] = plan.alphabet.size if coded else 0
    head[_F["rows_codec"]] = rows_codec
    head[_F["ndim"]] = len(shape)
    head[len(HEAD_FIELDS):] = shape
    head[_F["meta_hash"]] = _meta_hash(head, tables, rows)

    parts = {HEAD: head, CODE: code, OFFSETS: offsets, MODES: modes, CHECK: check.view(np.int64)}
    if coded:
        parts[TABLES] = np.frombuffer(bytearray(tables), np.uint8)
        if rows:
            parts[ROWS] = np.frombuffer(bytearray(rows), np.uint8)
    return parts


def _meta_hash(head: np.ndarray, tables, rows) -> int:
    return meta_hash(head, _F["meta_hash"], tables, rows)


# ---------------------------------------------------------------------------------------------
# decode


def _part(parts, name: str, suffix: str, dtype: torch.dtype, required: bool = True) -> np.ndarray:
    return part_array(parts, name + suffix, dtype, lambda: f"tensor {name!r}: part {name + suffix!r}", required)


def _fail(name: str, what: str) -> UnweightError:
    return UnweightError(f"tensor {name!r}: {what}")


def decode_tensors(parts, names, threads: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`decode_tensor` of each of ``names`` (from the same ``parts``), spread over up to ``threads``
    threads as :func:`encode_tensors` spreads its work; the first tensor (in ``names``' order) that fails
    raises. The same tensors as one by one."""
    threads, names = pool.resolve(threads), list(names)
    if threads == 1:  # nothing to spread
        return {n: decode_tensor(parts, n, 1) for n in names}

    def size(name: str) -> tuple[int, int]:  # (values, chunks); a header decode_tensor refuses counts as small
        head = parts.get(name + HEAD)
        if not isinstance(head, torch.Tensor) or head.dtype != torch.int64 or head.numel() < len(HEAD_FIELDS):
            return 0, 1
        numel, chunk = int(head[_F["numel"]]), int(head[_F["chunk"]])
        return numel, -(-numel // chunk) if chunk > 0 else 1

    try:
        return _spread({n: size(n) for n in names}, threads, lambda n, th: decode_tensor(parts, n, th))
    except UnweightError:  # name the first tensor that fails in the caller's order, as one by one would
        for n in names:
            decode_tensor(parts, n, 1)
        raise


class Prepared(NamedTuple):
    """A stored tensor's header, checked, with its streams as arrays and its decode tables built: what
    :func:`decode_tensor`'s kernels (and :mod:`unweight.lossless.gpu`'s) need. ``dec``, ``off``, ``q``,
    ``row_len``, ``nph``, ``k`` and ``rb`` stand in for a tensor without a code table as the kernels expect."""
    name: str
    version: int
    lay: FloatLayout
    shape: tuple
    numel: int
    chunk_w: int
    nchunks: int
    k: int
    rb: int
    nph: int
    row_len: int
    q: np.ndarray
    dec: np.ndarray
    off: int
    code: np.ndarray
    offsets: np.ndarray
    modes: np.ndarray
    check: np.ndarray
    low: np.ndarray
    low_offsets: np.ndarray


def decode_tensor(parts, name: str, threads: int | None = None) -> torch.Tensor:
    """Rebuild tensor ``name`` from ``parts`` (any mapping holding its ``name + suffix`` keys),
    bit-exact, checking every chunk's checksum. Raises UnweightError on corrupt input."""
    p = prepare(parts, name)
    return decode_prepared(p, pool.resolve(threads))


def prepare(parts, name: str) -> Prepared:
    """Tensor ``name``'s header and tables from ``parts``, checked (UnweightError naming the tensor, and the
    chunk where one is at fault, on anything corrupt, truncated or inconsistent), and its decode tables."""
    head = _part(parts, name, HEAD, torch.int64)
    nf = len(HEAD_FIELDS)
    h = dict(zip(HEAD_FIELDS, head[:nf].tolist()))
    if head.size < nf or h["magic"] != MAGIC:
        raise _fail(name, "not an unweight-lossless header")
    version = h["version"]
    if version not in READ_VERSIONS:
        reads = ", ".join(map(str, READ_VERSIONS))
        raise _fail(name, f"format version {version} (this unweight reads {reads})")
    tables = _part(parts, name, TABLES, torch.uint8, required=False)
    rows = _part(parts, name, ROWS, torch.uint8, required=False)
    if _meta_hash(head, tables, rows) != h["meta_hash"]:
        raise _fail(name, "header or code tables corrupt (metadata checksum mismatch)")
    lay = BY_CODE.get(h["dtype"])
    ndim = h["ndim"]
    if lay is None or head.size != nf + ndim or ndim < 0:
        raise _fail(name, "header describes an unknown dtype or shape")
    shape = tuple(head[nf:].tolist())
    numel, chunk_w = h["numel"], h["chunk"]
    size = 1
    for s in shape:
        size *= s
    lanes = rans32.LANES if version in LANES32 else rans.LANES
    if (min(shape, default=0) < 0 or size != numel or chunk_w <= 0 or h["lanes"] != lanes
            or h["prob_bits"] != rans.PROB_BITS or (version in LANES32 and lay.dtype not in V3_DTYPES)):
        raise _fail(name, "header is inconsistent (shape, chunk size, lanes, precision or version)")
    nchunks = -(-numel // chunk_w)
    nph, nsym, k, rb = h["phases"], h["nsym"], h["k"], h["raw_bits"]
    coded, off = nsym > 0, 0

    code = _part(parts, name, CODE, torch.uint8)
    offsets = _part(parts, name, OFFSETS, torch.int64)
    modes = _part(parts, name, MODES, torch.uint8)
    check = _part(parts, name, CHECK, torch.int64).view(np.uint64)
    if modes.size != nchunks or check.size != nchunks:
        raise _fail(name, f"chunk tables hold {modes.size} modes and {check.size} checksums, "
                          f"expected {nchunks}")
    if problem := chunks.offsets_problem(offsets, nchunks, code.size, rans.STREAM_PAD, "code"):
        raise _fail(name, problem)
    is32 = lay.low_bits > 0
    if is32:
        low = _part(parts, name, LOW, torch.uint8)
        low_offsets = _part(parts, name, LOW_OFFSETS, torch.int64)
        if problem := chunks.offsets_problem(low_offsets, nchunks, low.size, 0, "low-mantissa"):
            raise _fail(name, problem)
    else:
        low, low_offsets = np.zeros(0, np.uint8), np.zeros(nchunks + 1, np.int64)

    if coded:
        row_len, nrows = h["row_len"], h["nrows"]
        if (not 1 <= nph <= max(model.PHASES) or rb != lay.hi_man_bits + 1 - k
                or k not in (model.K_CHOICES_V3 if version in LANES32 else model.K_CHOICES)[lay.name]
                or nsym > model.MAX_SYMBOLS or row_len < 1
                or numel % row_len or nrows not in (0, numel // row_len)):
            raise _fail(name, "header describes an invalid code table")
        space = 1 << (lay.exp_bits + k)
        if version in LANES32:  # tables, codes and the decode table (every slot filled, or refused) in one call
            dec = np.empty((nph, rans32.PROB_SCALE), np.uint32)
            status, off = model.decode_tables_v3(tables, nsym, nph, k, space, dec)
            if status == 1:
                raise _fail(name, "code tables are malformed")
            if status == 2:
                raise _fail(name, "code tables are malformed (symbols too spread for version 3's codes)")
            bad = status - 3 if status else -1
        else:
            alphabet = np.zeros(nsym, np.int64)
            freq = np.zeros((nph, nsym), np.uint32)
            if not model.parse_tables(tables, nsym, nph, alphabet, freq) or alphabet[-1] >= space:
                raise _fail(name, "code tables are malformed")
            dec = np.empty((nph, rans.PROB_SCALE), np.uint64)
            bad = rans.build_tables(alphabet, freq, rb, np.zeros((rans.ENC_ROWS, 0, 0), np.uint64), dec)
        if bad != -1:
            raise _fail(name, f"code table of phase {bad} is invalid")
        if nrows:
            q = model.parse_rows(h["rows_codec"], rows.tobytes(), nrows)
            if q is None:
                raise _fail(name, "row contexts are corrupt")
        else:
            q = np.zeros(numel // row_len, np.int8)
    else:
        rb = _default_raw_bits(lay)
        k, off = lay.hi_man_bits + 1 - rb, 0
        dec = np.zeros((1, rans.PROB_SCALE), np.uint32 if version in LANES32 else np.uint64)
        q, row_len, nph = np.zeros(1, np.int8), max(numel, 1), 1
        coded_chunks = np.flatnonzero(modes != chunks.MODE_RAW)
        if coded_chunks.size:
            raise _fail(name, f"chunk {coded_chunks[0]}: marked coded but the tensor has no code "
                              "table (corrupt modes)")

    return Prepared(name, version, lay, shape, numel, chunk_w, nchunks, k, rb, nph, row_len, q, dec, off, code,
                    offsets, modes, check, low, low_offsets)


def decode_prepared(p: Prepared, threads: int) -> torch.Tensor:
    """A :func:`prepare`'d tensor decoded on the CPU on ``threads`` threads, every chunk's checksum checked."""
    name, version, lay, shape, numel, chunk_w, nchunks, k, rb, nph, row_len, q, dec, off = p[:14]
    code, offsets, modes, check, low, low_offsets = p[14:]
    hbits, is32 = lay.hi_bits, lay.low_bits > 0
    nbytes = numel * lay.itemsize
    by_range = threads > 1 and nchunks > 1  # each thread maps its own chunks' pages (the kernel's page work split)
    out_u8 = _output_buffer(-(-nbytes // 8) * 8, populate=not by_range)

    def map_range(lo: int, hi: int) -> None:
        if by_range and (part := lay.itemsize * (min(hi * chunk_w, numel) - lo * chunk_w)) >= POPULATE_BYTES:
            _map_if_fresh(out_u8[lay.itemsize * lo * chunk_w:][:part])

    out = out_u8[:nbytes].view(lay.word_dtype)
    status = np.zeros(nchunks, np.int32)
    if version in LANES32:
        decode_v3 = _range_kernels(lay, version)[1]
        cw = min(chunk_w, numel)
        zeros = _zeros(planes.padded.py_func(cw) // 8 + 1)  # from Python: the plain function, nothing to compile

        def task3(lo: int, hi: int) -> None:
            map_range(lo, hi)
            syms, hw, low_words, plan, fix = _v3_buffers(cw)
            decode_v3(code, offsets, modes, check, low, low_offsets, lo, hi, chunk_w, numel, row_len, q, nph, k,
                      dec, off, out, out_u8, syms, zeros, hw, low_words, plan, fix, status)

        pool.run_ranges(task3, nchunks, threads, unit=2)  # chunks two by two (chunks._decode_hi_pair)
        return _decoded(name, status, nchunks, nbytes, out_u8, shape, lay)
    decode_range = chunks.range_kernels(hbits)[1]

    def task(lo: int, hi: int) -> None:
        map_range(lo, hi)
        words = _scratch("dec_words", min(chunk_w, numel), np.uint16)
        scratch_low = _scratch("dec_low", min(chunk_w, numel) if is32 else 0, np.uint16)
        decode_range(code, offsets, low, low_offsets, modes, check, lo, hi, chunk_w, numel,
                     lay.itemsize, row_len, q, nph, lay.exp_bits, is32, rb, dec, out,
                     out_u8, words, scratch_low, status)

    pool.run_ranges(task, nchunks, threads)
    return _decoded(name, status, nchunks, nbytes, out_u8, shape, lay)


def chunk_error(name: str, c: int, nchunks: int, status: int) -> UnweightError:
    """The error of chunk ``c`` (of ``nchunks``) of tensor ``name`` whose decode ended with ``status``."""
    return _fail(name, f"chunk {c} of {nchunks}: {_ERRORS.get(int(status), 'corrupt')}")


def _decoded(name, status, nchunks, nbytes, out_u8, shape, lay) -> torch.Tensor:
    if np.count_nonzero(status):
        c = int(np.flatnonzero(status)[0])
        raise chunk_error(name, c, nchunks, status[c])
    if not nbytes:  # an empty array's stride is 0, which a dtype view refuses
        return torch.empty(shape, dtype=lay.dtype)
    return torch.from_numpy(out_u8[:nbytes]).view(lay.dtype).reshape(shape)
