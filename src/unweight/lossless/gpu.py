"""Decoding format version 4 on a GPU, chunk by chunk in Triton kernels: BF16, FP16, FP32 and FP8.

The design is the one ``docs/format.md`` lays out ("Decoding on a GPU"): a chunk's 32 rANS lanes are
the 32 threads of one program (a warp), each step decodes the 32 values of one group in coding order, and
the lanes that need a word take consecutive words in lane order (an exclusive prefix sum of the needy
lanes, then one coalesced read). Where the CPU decoder walks a chunk's rows to put the words together,
here each value finds its place through the chunk's *segments*: the runs of values that one table and one
row rotation decode, in coding order (:func:`segments`, built once per tensor on the host). The step
then raises the symbol's exponent by its row's rotation, reads the value's raw bits from the planes and
writes the finished hi word (a BF16 or FP16 value, an FP32 value's hi half, an FP8 byte) where it belongs,
so the symbols never go through memory. FP32's low halves are joined by a kernel of their own (a program
per chunk walking its blocks of ``fields.LOW_BLOCK`` values, as ``fields.join_low``); raw chunks are copied
by another. A last kernel checks every chunk's XXH3-64 (one program per chunk: 16 stripes of 8 lanes per
1 KB block, the accumulators scrambled between blocks, as ``hashing.xxh3_64``).

A model's tensors decode together (:func:`decode_tensors`): one copy of their streams to the device, one
launch per kernel and kind of tensor for all their chunks, their outputs views of one buffer. Tensors in
format versions 2 and 3 decode on the CPU and are copied. Every check the CPU decoder makes is made here
too: the segments' bounds and pad bytes (host), the lanes' final states and the words consumed, the low
halves' block headers (kernels), the checksums (kernel; chunks of at most 240 bytes on the host); a failure
raises the CPU decoder's :class:`~unweight.errors.UnweightError`, naming the tensor and the chunk.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (the tests: read when Triton is first
imported); the kernels compile for sm_80 and sm_90 without a GPU (tested). Measured on an H200 with
``bench/lossless_gpu.py`` (``docs/format.md``, "Decoding on a GPU", has the figures).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from numba import njit

from unweight.errors import UnweightError
from unweight.lossless import chunks, format, hashing, pool, rans, rans32
from unweight.lossless.fields import LOW_BLOCK

_SHORT = 240  # chunks of at most this many bytes take XXH3's short paths, hashed on the host
PREFETCH = False  # _decode_chunks reads a step's words before its lookup (True: no gain on an H200) or after
BALLOT = True  # _decode_chunks ranks the needy lanes by a warp vote (True: 18% faster on an H200) or a scan


def supported(p: format.Prepared) -> bool:
    """Whether a prepared tensor decodes on the GPU (format version 4: every dtype, chunks of up to 2^30 values,
    whose places the kernels count in 32 bits), else on the CPU."""
    return p.version == 4 and p.chunk_w <= 1 << 30


def segments(numel: int, chunk_w: int, row_len: int, q: np.ndarray, nph: int, emax: int):
    """Every chunk's runs of values that one phase's table and one row rotation decode, in coding order
    (``docs/format.md``, "Row context": a chunk codes the parts of its rows phase by phase, rows ascending).
    Returns ``(lo, coding, place, phase, rot)``: chunk ``c``'s runs are ``lo[c] .. lo[c + 1] - 1``, run ``s``
    starts at value ``coding[s]`` of the chunk's coding order and at value ``place[s]`` of the chunk, and
    uses table ``phase[s]`` and rotation ``rot[s]``. Runs that continue one another are merged (a tensor
    without a row context has one per chunk)."""
    nchunks = -(-numel // chunk_w)
    lo = np.zeros(nchunks + 1, np.int64)
    coding, place, phase, rot = (np.empty(q.size + nchunks, np.int64) for _ in range(4))  # a run per row part
    n = _runs(numel, chunk_w, row_len, q, nph, emax, lo, coding, place, phase, rot)
    return lo, coding[:n], place[:n], phase[:n], rot[:n]


@njit(cache=True, nogil=True)
def _runs(numel, chunk_w, row_len, q, nph, emax, lo, coding, place, phase, rot):
    """:func:`segments`' runs written into its arrays, chunk by chunk; returns how many."""
    s = 0
    for c in range(lo.size - 1):
        c0 = c * chunk_w
        c1 = min(c0 + chunk_w, numel)
        lo[c] = s
        i = 0  # the chunk's values coded so far
        for ph in range(nph):
            for r in range(c0 // row_len, (c1 - 1) // row_len + 1):
                qr = np.int64(q[r])
                if qr % nph != ph:
                    continue
                rt = (qr // nph) % emax
                a = max(c0, r * row_len) - c0
                continues = s > lo[c] and phase[s - 1] == ph and rot[s - 1] == rt
                if not (continues and place[s - 1] + i - coding[s - 1] == a):  # (else the last run grows)
                    coding[s], place[s], phase[s], rot[s] = i, a, ph, rt
                    s += 1
                i += min(c1, (r + 1) * row_len) - c0 - a
    lo[lo.size - 1] = s
    return s


@triton.jit
def _decode_chunks(code_ptr, code_words, table_ptr, coding_ptr, place_ptr, phase_ptr, rot_ptr, dec_ptr, out_ptr,
                   status_ptr, K: tl.constexpr, R: tl.constexpr, H: tl.constexpr, EMAX: tl.constexpr,
                   STRIDE: tl.constexpr, SCALE: tl.constexpr, LOW: tl.constexpr, OVERRUN: tl.constexpr,
                   STATE: tl.constexpr, PREFETCH: tl.constexpr, BALLOT: tl.constexpr = False):
    """Chunk ``j`` of the table (a row of :data:`_COLUMNS`, int64) in program ``j``, its 32 lanes as the
    program's 32 threads (``rans32``'s decoder, one group per step), each value's hi word (``H`` bits: ``K``
    symbol mantissa bits, ``R`` raw bits) written where its segment says, ``STRIDE`` hi words apart (2: FP32's
    hi halves, above the low ones). With ``PREFETCH`` a step reads the 32 words after the last one taken
    before its table lookup and hands them out from registers (``tl.gather``), off the chain of dependent
    steps; without, it reads them after (on an H200 the first gained nothing: ``docs/format.md``). With
    ``BALLOT`` the needy lanes are ranked by one warp vote and two population counts (PTX: CUDA only, not the
    interpreter) instead of a scan and a sum over the warp."""
    row = table_ptr + tl.program_id(0) * 9
    w0 = tl.load(row)  # the segment's first word
    limit = tl.load(row + 1)  # its rANS words
    pb = tl.load(row + 2)  # where its planes start (byte)
    seg_lo = tl.load(row + 3)  # its runs (:func:`segments`)
    seg_hi = tl.load(row + 4)
    first = tl.load(row + 5)  # where its first value goes (byte)
    n = tl.load(row + 6)  # its values
    dec_ptr += tl.load(row + 7)  # its tensor's decode tables
    off = tl.load(row + 8)  # and code offset
    words = code_ptr.to(tl.pointer_type(tl.uint16))
    lane = tl.arange(0, 32)
    x = (tl.load(words + w0 + 2 * lane).to(tl.uint32)
         | (tl.load(words + w0 + 2 * lane + 1).to(tl.uint32) << 16))
    p = tl.zeros([32], tl.int64) + 64  # the 64 state words read (the same in every lane)
    mp = ((n + 7) // 8 * 8).to(tl.int32)  # (places in a chunk in 32 bits: integer division is cheaper)
    h = mp // 2
    e = mp // 8
    # each lane's segment, kept in registers: its table, rotation, place less coding index, where the next starts
    sp = tl.zeros([32], tl.int64) + seg_lo
    ph = tl.load(phase_ptr + sp)
    rot = tl.load(rot_ptr + sp)
    shift = tl.load(place_ptr + sp) - tl.load(coding_ptr + sp)
    nxt = tl.load(coding_ptr + sp + 1, mask=sp + 1 < seg_hi, other=1 << 40)
    soonest = tl.min(nxt, 0)  # where the first lane to change segment changes: a step before it need not look
    for s in range(0, tl.cdiv(n, 32)):
        i = s * 32 + lane
        active = i < n
        if s * 32 + 31 >= soonest:  # a lane whose value may lie in a later segment (rare)
            adv = nxt <= i
            while tl.max(adv.to(tl.int32), 0) > 0:
                sp += adv.to(tl.int64)
                ph = tl.where(adv, tl.load(phase_ptr + sp), ph)
                rot = tl.where(adv, tl.load(rot_ptr + sp), rot)
                shift = tl.where(adv, tl.load(place_ptr + sp) - tl.load(coding_ptr + sp), shift)
                nxt = tl.load(coding_ptr + sp + 1, mask=sp + 1 < seg_hi, other=1 << 40)
                adv = nxt <= i
            soonest = tl.min(nxt, 0)
        a = (i + shift).to(tl.int32)  # the value's place in the chunk
        if PREFETCH:  # the next 32 words, read before this step's lookup needs to say which lanes take them
            ahead = w0 + p + lane
            window = tl.load(words + ahead, mask=ahead < code_words, other=0).to(tl.uint32)
        ent = tl.load(dec_ptr + ph * SCALE + (x & (SCALE - 1)).to(tl.int64), mask=active, other=0)
        ent = ent.to(tl.uint32, bitcast=True)
        code8 = (ent >> 24).to(tl.int64)
        sym = tl.where(code8 < (1 << K), code8, code8 + off)
        xn = ((ent & (SCALE - 1)) + 1) * (x >> 12) + ((ent >> 12) & (SCALE - 1))
        need = active & (xn < LOW)
        ni = need.to(tl.int32)
        if BALLOT:  # the needy lanes as the bits of one word; a lane's rank counts the bits below its own
            votes = _ballot(ni)
            rank = _popc(votes & ((tl.full([32], 1, tl.uint32) << lane.to(tl.uint32)) - 1))
            took = _popc(votes)
        else:
            rank = tl.cumsum(ni, 0) - ni  # the needy lanes' words, in lane order
            took = tl.sum(ni, 0)
        if PREFETCH:
            w = tl.gather(window, rank.to(tl.int32), 0)
        else:
            at = w0 + p + rank
            w = tl.load(words + at, mask=need & (at < code_words), other=0).to(tl.uint32)
        x = tl.where(need, (xn << 16) | w, tl.where(active, xn, x))
        p += took
        ex = sym >> K  # the exponent raised back by the row's rotation (0 stays)
        t = ex + rot
        t = tl.where(t > EMAX, t - EMAX, t)
        raised = tl.where(ex == 0, sym, (t << K) | (sym & ((1 << K) - 1)))
        ae = a % e
        bit = a // e
        if R >= 4:  # a nibble plane (value a's low four raw bits in byte a % h), then a plane per bit
            upper = a >= h
            nib = tl.load(code_ptr + pb + tl.where(upper, a - h, a), mask=active, other=0).to(tl.int64)
            raw = (nib >> tl.where(upper, 4, 0)) & 15
            for b in tl.static_range(4, R):  # raw bit b: bit a // e of byte a % e of its plane
                byte = tl.load(code_ptr + pb + h + (b - 4) * e + ae, mask=active, other=0).to(tl.int64)
                raw |= ((byte >> bit) & 1) << b
        else:  # a plane per bit (FP8: the sign's)
            raw = tl.zeros([32], tl.int64)
            for b in tl.static_range(0, R):
                byte = tl.load(code_ptr + pb + b * e + ae, mask=active, other=0).to(tl.int64)
                raw |= ((byte >> bit) & 1) << b
        word = (raised << (R - 1)) | (raw & ((1 << (R - 1)) - 1)) | (((raw >> (R - 1)) & 1) << (H - 1))
        if H == 8:
            tl.store(out_ptr + first + a, word.to(tl.uint8), mask=active)
        else:
            out = (out_ptr + first).to(tl.pointer_type(tl.uint16))
            tl.store(out + STRIDE * a + (STRIDE - 1), word.to(tl.uint16), mask=active)
    bad_state = tl.sum((x != LOW).to(tl.int32), 0) > 0
    used = tl.max(p, 0)
    status = tl.where(used > limit, OVERRUN, tl.where((used != limit) | bad_state, STATE, 0))
    tl.store(status_ptr + tl.program_id(0), status)


@triton.jit
def _ballot(flag):
    """The warp's vote: bit ``l`` of the word every lane gets is set where lane ``l``'s ``flag`` is not 0."""
    return tl.inline_asm_elementwise("{ .reg .pred q; setp.ne.s32 q, $1, 0; vote.sync.ballot.b32 $0, q, -1; }",
                                     "=r,r", [flag], dtype=tl.uint32, is_pure=False, pack=1)


@triton.jit
def _popc(x):
    """The set bits of each 32-bit ``x``."""
    return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1)


_COLUMNS = ("word0", "limit", "planes", "seg_lo", "seg_hi", "first", "n", "dec", "off")  # _decode_chunks' table


@triton.jit
def _copy_raw(code_ptr, table_ptr, out_ptr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Raw chunk ``j``'s hi words (table rows: source byte, target byte, bytes; int64) from the code stream to
    the output: as they are, or (``STRIDE`` 2: FP32) each 16-bit word into the hi half of a 32-bit value."""
    row = table_ptr + tl.program_id(0) * 3
    src = tl.load(row)
    dst = tl.load(row + 1)
    n = tl.load(row + 2) // STRIDE  # bytes, or 16-bit words
    at = tl.arange(0, BLOCK)
    for b in range(0, tl.cdiv(n, BLOCK)):
        m = b * BLOCK + at < n
        if STRIDE == 1:
            tl.store(out_ptr + dst + b * BLOCK + at, tl.load(code_ptr + src + b * BLOCK + at, mask=m), mask=m)
        else:
            w = tl.load((code_ptr + src).to(tl.pointer_type(tl.uint16)) + b * BLOCK + at, mask=m)
            tl.store((out_ptr + dst).to(tl.pointer_type(tl.uint16)) + 2 * (b * BLOCK + at) + 1, w, mask=m)


@triton.jit
def _join_low(low_ptr, low_size, table_ptr, out_ptr, status_ptr, BAD: tl.constexpr, BLOCK: tl.constexpr):
    """FP32 chunk ``j``'s low halves (table rows: its low segment's start and length in bytes, where its first
    value goes, its values; int64) into the low halves of its 32-bit values: per block of ``BLOCK`` values a
    trailing-zero count ``tz`` byte, then the values shifted right by ``tz`` in ``16 - tz`` bits each, least
    significant bit first (``fields.pack_low``). A header out of range or bits that overrun the segment, or a
    segment longer than its blocks, sets the chunk's status to ``BAD``."""
    row = table_ptr + tl.program_id(0) * 4
    o = tl.load(row)
    end = o + tl.load(row + 1)
    first = tl.load(row + 2)
    n = tl.load(row + 3)
    out = (out_ptr + first).to(tl.pointer_type(tl.uint16))
    i = tl.arange(0, BLOCK).to(tl.int64)
    bad = n * 0
    for b in range(0, tl.cdiv(n, BLOCK)):
        m = tl.minimum(BLOCK, n - b * BLOCK)
        tz = tl.where(o < end, tl.load(low_ptr + tl.minimum(o, low_size - 1)).to(tl.int64), 255)
        stop = o + 1 + (m * (16 - tz) + 7) // 8
        bad = tl.where((tz > 16) | (stop > end), 1, bad)
        fine = bad == 0
        width = tl.where(fine, 16 - tz, 0)
        at = (o + 1) * 8 + i * width  # the value's first bit
        live = i < tl.where(fine, m, 0)  # (a scalar mask and'ed into a vector one: the interpreter refuses)
        v = tl.zeros([BLOCK], tl.int64)
        for k in tl.static_range(3):  # its bits lie in three bytes at most
            byte = at // 8 + k
            v |= tl.load(low_ptr + byte, mask=live & (byte < low_size), other=0).to(tl.int64) << (8 * k)
        low = ((v >> (at % 8)) & ((1 << width) - 1)) << tl.where(fine, tz, 0)
        tl.store(out + 2 * (b * BLOCK + i), low.to(tl.uint16), mask=live)
        o = tl.where(fine, stop, o)
    bad = tl.where(o != end, 1, bad)
    old = tl.load(status_ptr + tl.program_id(0))
    tl.store(status_ptr + tl.program_id(0), tl.where(bad != 0, BAD, old))


@triton.jit
def _mul_fold(a, b):
    """The 128-bit product of uint64 ``a`` and ``b``, its halves XORed (as ``hashing``'s)."""
    m32 = 0xFFFFFFFF
    a0, a1, b0, b1 = a & m32, a >> 32, b & m32, b >> 32
    lo_lo, hi_lo, lo_hi, hi_hi = a0 * b0, a1 * b0, a0 * b1, a1 * b1
    cross = (lo_lo >> 32) + (hi_lo & m32) + lo_hi
    upper = (hi_lo >> 32) + (cross >> 32) + hi_hi
    return ((cross << 32) | (lo_lo & m32)) ^ upper


@triton.jit
def _words64(data_ptr, at, ALIGNED: tl.constexpr):
    """The little-endian uint64 at each byte offset of ``at``: one 8-byte load each where ``ALIGNED`` (every
    offset a multiple of 8), else put together from bytes."""
    if ALIGNED:
        return tl.load(data_ptr.to(tl.pointer_type(tl.uint64)) + at // 8)
    else:
        b = tl.load(data_ptr + at[:, :, None] + tl.arange(0, 8)[None, None, :]).to(tl.uint64)
        return tl.sum(b << (tl.arange(0, 8) * 8).to(tl.uint64)[None, None, :], 2)


@triton.jit
def _xxh3_chunks(data_ptr, start_ptr, len_ptr, consts_ptr, out_ptr, ALIGNED: tl.constexpr):
    """XXH3-64 (seed 0, the default secret) of each chunk's ``len > 240`` bytes from ``data + start``, one
    chunk per program. ``consts``: ``hashing.xxh3_constants()`` (int64, read as uint64). ``ALIGNED``: every
    start a multiple of 8 bytes, so that the stripes are read as words (the last 64 bytes, at ``len - 64``,
    always from bytes)."""
    c = tl.program_id(0)
    start = tl.load(start_ptr + c)
    length = tl.load(len_ptr + c)
    lane = tl.arange(0, 8)
    stripe = tl.arange(0, 16)
    cp = consts_ptr.to(tl.pointer_type(tl.uint64))
    acc = tl.load(cp + lane)
    keys = tl.load(cp + 8 + stripe[:, None] * 8 + lane[None, :])
    last_keys = tl.load(cp + 136 + lane)
    scramble = tl.load(cp + 144 + lane)
    merge = tl.load(cp + 152 + lane)
    q1 = tl.load(cp + 7)  # the 32-bit prime 0x9E3779B1 (the last initial accumulator)
    m32 = 0xFFFFFFFF
    nblocks = (length - 1) // 1024
    for blk in range(0, nblocks):
        at = start + blk * 1024 + stripe[:, None] * 64 + lane[None, :] * 8
        x = _words64(data_ptr, at, ALIGNED)
        swapped = _words64(data_ptr, at + tl.where(lane % 2 == 0, 8, -8)[None, :], ALIGNED)
        y = x ^ keys
        acc += tl.sum(swapped + (y & m32) * (y >> 32), 0)
        acc = ((acc ^ (acc >> 47)) ^ scramble) * q1
    nstripes = ((length - 1) - nblocks * 1024) // 64  # the last block's whole stripes
    at = start + nblocks * 1024 + stripe[:, None] * 64 + lane[None, :] * 8
    valid = (stripe < nstripes)[:, None]
    at = tl.where(valid, at, start + lane[None, :] * 8)  # (a stripe past the data reads the first one, unused)
    x = _words64(data_ptr, at, ALIGNED)
    swapped = _words64(data_ptr, at + tl.where(lane % 2 == 0, 8, -8)[None, :], ALIGNED)
    y = x ^ keys
    acc += tl.sum(tl.where(valid, swapped + (y & m32) * (y >> 32), 0), 0)
    at = start + length - 64 + lane[None, :] * 8
    x = tl.sum(_words64(data_ptr, at, False), 0)  # (one row: the sum is the row)
    swapped = tl.sum(_words64(data_ptr, at + tl.where(lane % 2 == 0, 8, -8)[None, :], False), 0)
    y = x ^ last_keys
    acc += swapped + (y & m32) * (y >> 32)
    acc = acc ^ merge
    hsh = length.to(tl.uint64) * tl.load(cp + 1)
    for i in tl.static_range(4):
        lo = tl.sum(tl.where(lane == 2 * i, acc, 0), 0)
        hi = tl.sum(tl.where(lane == 2 * i + 1, acc, 0), 0)
        hsh += _mul_fold(lo, hi)
    hsh = hsh ^ (hsh >> 37)
    hsh = hsh * 0x165667919E3779F9
    hsh = hsh ^ (hsh >> 32)
    tl.store(out_ptr + c, hsh.to(tl.int64, bitcast=True))


_CONSTS = hashing.xxh3_constants()


def xxh3_chunks(data: torch.Tensor, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """XXH3-64 of ``data[starts[c]:starts[c] + lengths[c]]`` (``data`` uint8 on the device) for every
    ``c``, as uint64 on the host: chunks longer than 240 bytes in :func:`_xxh3_chunks`, the others on the
    host."""
    long = lengths > _SHORT
    return _hashes(data, starts, lengths, _launch_xxh3(data, starts[long], *_upload(
        [starts[long], lengths[long], _CONSTS.view(np.int64)], data.device)))


def _launch_xxh3(data: torch.Tensor, host_starts: np.ndarray, starts: torch.Tensor, lengths: torch.Tensor,
                 consts: torch.Tensor) -> torch.Tensor:
    """The XXH3-64 kernel launched over the chunks longer than 240 bytes (``starts`` and ``lengths`` on the
    device, ``host_starts`` the same starts on the host); their hashes as int64, on the device once it has run."""
    res = torch.empty(starts.numel(), dtype=torch.int64, device=data.device)
    if res.numel():
        aligned = data.data_ptr() % 8 == 0 and not (host_starts % 8).any()
        _xxh3_chunks[(res.numel(),)](data, starts, lengths, consts, res, ALIGNED=aligned, num_warps=1)
    return res


def _hashes(data: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, res: torch.Tensor) -> np.ndarray:
    """Every chunk's XXH3-64 on the host: the long ones' from :func:`_launch_xxh3`'s ``res``, the others
    hashed here."""
    out = np.zeros(starts.size, np.uint64)
    long = lengths > _SHORT
    out[long] = res.cpu().numpy().view(np.uint64)
    for c in np.flatnonzero(~long):
        b = data[int(starts[c]):int(starts[c] + lengths[c])].cpu().numpy()
        out[c] = hashing.xxh3_64(b, 0, b.size)
    return out


def decode_tensor(parts, name: str, device: str | torch.device = "cuda") -> torch.Tensor:
    """Tensor ``name`` from ``parts`` (as :func:`unweight.lossless.decode_tensor`), decoded on ``device``
    (format version 4; older versions on the CPU, then copied); bit-exact, every chunk's checksum checked.
    Raises UnweightError naming the tensor and chunk on corrupt input."""
    return decode_tensors(parts, [name], device)[name]


def decode_tensors(parts, names, device: str | torch.device = "cuda") -> dict[str, torch.Tensor]:
    """:func:`decode_tensor` of each of ``names``, all of them at once: one copy of their streams to the
    device, one launch of each kernel for all their chunks (per kind of tensor), their outputs views of one
    buffer (which stays allocated while any of them lives). The first tensor (in ``names``' order) that
    fails raises, as one by one."""
    device, names = torch.device(device), list(names)
    out, errors, batch = {}, {}, []
    for name in names:
        try:
            p = format.prepare(parts, name)
            if supported(p) and p.numel:
                batch.append(p)
            else:
                out[name] = format.decode_prepared(p, pool.resolve(None)).to(device)
        except UnweightError as e:
            errors[name] = e
    if batch:
        decoded, failed = _decode_batch(batch, device)
        out.update(decoded)
        errors.update(failed)
    for name in names:
        if name in errors:
            raise errors[name]
    return {n: out[n] for n in names}


class _Chunks:
    """A tensor's chunks as the batch sees them: its status so far (0, or the error that stops it), the chunks
    the host's checks pass (the kernels take them), and where its output starts (byte)."""

    def __init__(self, p: format.Prepared, base: int, status: np.ndarray):
        self.p, self.base, self.status = p, base, status
        self.ok = np.flatnonzero(status == 0)


def _decode_batch(batch: list[format.Prepared], device: torch.device) -> tuple[dict, dict]:
    """The tensors of ``batch`` decoded on ``device``, and the errors of those that fail. Every launch is
    queued before the host reads anything back (the host's checks say which chunks each kernel takes; the low
    halves are joined and the checksums computed whatever the rANS kernel finds, and the statuses are read in
    the CPU decoder's order afterwards), and the host's tables travel in one copy."""
    code, low, dec, segs, kinds, raw, joins, hashed, tensors = [], [], [], [], {}, {}, [], [], []
    code_at = low_at = dec_at = seg_at = out_at = 0
    for t, p in enumerate(batch):
        stride, r, emax = 2 if p.lay.low_bits else 1, p.lay.hi_bits - p.lay.exp_bits - p.k, (1 << p.lay.exp_bits) - 1
        coded = bool((p.modes == chunks.MODE_CODED).any())
        runs = segments(p.numel, p.chunk_w, p.row_len, p.q, p.nph, emax) if coded else (_NO_RUNS,) * 5
        status, rows, which, stored, join, joined, hashes = _tables(
            p.code, p.offsets, p.modes, p.low_offsets, runs[0], p.numel, p.chunk_w, p.lay.hi_bits, r,
            p.lay.itemsize, p.lay.low_bits > 0, t, code_at, seg_at, dec_at, p.off, low_at, out_at)
        tensors.append(_Chunks(p, out_at, status))
        if rows.size:
            segs.append(runs[1:])
            kind = kinds.setdefault((p.k, r, p.lay.hi_bits, emax, stride), ([], []))
            kind[0].append(rows)
            kind[1].append(which)
            dec.append(p.dec.reshape(-1))
            dec_at += p.dec.size
            seg_at += runs[1].size
        raw.setdefault(stride, []).append(stored)
        if p.lay.low_bits:
            joins.append((join, joined))
            low.append(p.low)
            low_at += p.low.size
        hashed.append(hashes)
        code.append((code_at, p.code))
        code_at += -(-p.code.size // 8) * 8  # each tensor's stream from a multiple of 8 bytes
        out_at += -(-p.numel * p.lay.itemsize // 128) * 128  # each tensor's output from a multiple of 128 bytes

    kinds = [(key, np.concatenate(rows), np.concatenate(which)) for key, (rows, which) in kinds.items()]
    raw = [(stride, np.concatenate(rows)) for stride, rows in raw.items()]
    joins = [tuple(np.concatenate(a) for a in zip(*joins))] if joins else []
    starts, lengths = np.concatenate(hashed).T
    long = lengths > _SHORT
    tables = iter(_upload([*(np.concatenate(a) for a in zip(*segs)), *(rows for _, rows, _ in kinds),
                           *(rows for _, rows in raw), *(rows for rows, _ in joins),
                           starts[long], lengths[long], _CONSTS.view(np.int64)], device))
    coding, place, phase, rot = (next(tables) for _ in range(4)) if segs else (None,) * 4

    code = _streams(code, code_at, device)
    flat = torch.empty(out_at, dtype=torch.uint8, device=device)
    dec = torch.from_numpy(np.concatenate(dec).view(np.int32)).to(device) if dec else None
    launched = []  # (which, statuses on the device), in the order the CPU decoder meets the failures
    for (k, r, hbits, emax, stride), rows, which in kinds:
        res = torch.empty(rows.shape[0], dtype=torch.int32, device=device)
        _decode_chunks[(rows.shape[0],)](code, code.numel() // 2, next(tables), coding, place, phase, rot, dec,
                                         flat, res, K=k, R=r, H=hbits, EMAX=emax, STRIDE=stride,
                                         SCALE=rans32.PROB_SCALE, LOW=rans32.STATE_LOW, OVERRUN=rans.ERR_OVERRUN,
                                         STATE=rans.ERR_STATE, PREFETCH=PREFETCH, BALLOT=_vote(),
                                         num_warps=1)  # a warp: 32 lanes
        launched.append((which, res))
    for stride, rows in raw:
        table = next(tables)
        if rows.size:
            _copy_raw[(rows.shape[0],)](code, table, flat, STRIDE=stride, BLOCK=1024)
    for rows, which in joins:
        launched.append((which, _join(rows, next(tables), low, flat)))
    hashes = _launch_xxh3(flat, starts[long], next(tables), next(tables), next(tables))
    for which, res in launched:
        _record(tensors, which, res)
    return _checked(tensors, flat, _hashes(flat, starts, lengths, hashes))


def _vote() -> bool:
    """Whether the rANS kernel ranks its lanes by a warp vote: :data:`BALLOT`, where the kernels compile to PTX
    (not in Triton's interpreter, nor on ROCm)."""
    return BALLOT and not triton.knobs.runtime.interpret and torch.version.hip is None


def _upload(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    """``arrays`` (integers) on ``device`` as int64, in one copy: views of one buffer, each in its array's shape."""
    flat = [np.ascontiguousarray(a, np.int64).reshape(-1) for a in arrays]
    buf = torch.from_numpy(np.concatenate(flat) if flat else np.zeros(0, np.int64)).to(device)
    out, at = [], 0
    for a, f in zip(arrays, flat):
        out.append(buf[at:at + f.size].view(a.shape))
        at += f.size
    return out


def _streams(pieces: list[tuple[int, np.ndarray]], size: int, device) -> torch.Tensor:
    """The tensors' code streams side by side on the device, each copied there straight from its part (no
    concatenated copy on the host)."""
    out = torch.zeros(size, dtype=torch.uint8, device=device)
    for at, a in pieces:
        out[at:at + a.size].copy_(torch.from_numpy(a))
    return out


def _join(rows: np.ndarray, table: torch.Tensor, low: list[np.ndarray], flat: torch.Tensor) -> torch.Tensor:
    """FP32's low halves (``rows`` on the host, ``table`` the same on the device) launched into the low halves of
    their chunks' values; their statuses, on the device."""
    res = torch.zeros(rows.shape[0], dtype=torch.int32, device=flat.device)
    if rows.size:
        low = np.concatenate([*low, np.zeros(1, np.uint8)])  # (at least one byte to read)
        _join_low[(rows.shape[0],)](torch.from_numpy(low).to(flat.device), low.size, table, flat, res,
                                    BAD=chunks.ERR_LOW, BLOCK=LOW_BLOCK, num_warps=4)
    return res


def _record(tensors: list[_Chunks], which: np.ndarray, res: torch.Tensor) -> None:
    """A launch's statuses (``res``, one per program) into those of its chunks (``which``: rows of tensor,
    chunk) that have not failed before."""
    for (t, c), st in zip(which.tolist(), res.cpu().numpy().tolist()):
        if tensors[t].status[c] == 0:
            tensors[t].status[c] = st


def _checked(tensors: list[_Chunks], flat: torch.Tensor, hashes: np.ndarray) -> tuple[dict, dict]:
    """Every chunk that passed the host's checks held to its XXH3-64 (``hashes``, in that order) unless it
    failed since; the tensors that pass, and the errors of those that fail (the CPU decoder's message, naming the
    first bad chunk)."""
    out, errors, at = {}, {}, 0
    for ch in tensors:
        p, status, ok = ch.p, ch.status, ch.ok
        bad = ok[(hashes[at:at + ok.size] != p.check[ok]) & (status[ok] == 0)]
        status[bad] = chunks.ERR_CHECKSUM
        at += ok.size
        if np.count_nonzero(status):
            first = int(np.flatnonzero(status)[0])
            errors[p.name] = format.chunk_error(p.name, first, p.nchunks, status[first])
        else:
            out[p.name] = flat[ch.base:ch.base + p.numel * p.lay.itemsize].view(p.lay.dtype).reshape(p.shape)
    return out, errors


_NO_RUNS = np.zeros(1, np.int64)  # (the segments of a tensor with no coded chunk: none)


@njit(inline="always")
def _check(code, s0, seglen, mode, n, hi_bits, r):
    """What the CPU decoder checks of a chunk's segment before decoding it: (0, or the error that stops it; a
    coded segment's rANS words). A coded one is split by the CPU decoder's own ``chunks._segment``, then must
    hold the flushed states that ``rans32``'s decoder reads first."""
    if mode == chunks.MODE_RAW:
        return (chunks.ERR_RAW_SIZE if seglen != n * hi_bits // 8 else 0), 0
    if mode != chunks.MODE_CODED:
        return chunks.ERR_MODE, 0
    status, _, words, _, _ = chunks._segment(code, s0, seglen, n, r)
    if status == rans.OK and words < rans32.STATE_WORDS:
        status = rans.ERR_OVERRUN
    return status, words


@njit(cache=True, nogil=True)
def _tables(code, offsets, modes, low_offsets, lo, numel, chunk_w, hi_bits, r, itemsize, has_low, t, code_at,
            seg_at, dec_at, off, low_at, out_at):
    """A tensor's part of the batch's tables, its chunks :func:`_check`'ed: (each chunk's status; the rows of
    its coded chunks that pass, as :data:`_COLUMNS`, and which (tensor ``t``, chunk) they are; its raw chunks'
    rows (segment, output, bytes); FP32's low halves' rows (segment, bytes, output, values) and which; every
    passing chunk's output and bytes, for its checksum). ``lo``: its chunks' first segments
    (:func:`segments`); the others, where its streams, segments, decode tables, low halves and output start in
    the batch's."""
    nchunks = modes.size
    status = np.zeros(nchunks, np.int32)
    rows, which = np.empty((nchunks, 9), np.int64), np.empty((nchunks, 2), np.int64)
    stored, hashes = np.empty((nchunks, 3), np.int64), np.empty((nchunks, 2), np.int64)
    join, joined = np.empty((nchunks if has_low else 0, 4), np.int64), np.empty((nchunks if has_low else 0, 2),
                                                                                np.int64)
    nc = nr = nj = nh = 0
    for c in range(nchunks):
        n = min(chunk_w, numel - c * chunk_w)
        s0, seglen = offsets[c], offsets[c + 1] - offsets[c]
        status[c], w = _check(code, s0, seglen, modes[c], n, hi_bits, r)
        if status[c] != 0:
            continue
        s0 += code_at
        at = out_at + itemsize * c * chunk_w
        if modes[c] == chunks.MODE_CODED:
            rows[nc, 0], rows[nc, 1], rows[nc, 2] = s0 // 2, w, s0 + 2 * w
            rows[nc, 3], rows[nc, 4], rows[nc, 5] = seg_at + lo[c], seg_at + lo[c + 1], at
            rows[nc, 6], rows[nc, 7], rows[nc, 8] = n, dec_at, off
            which[nc, 0], which[nc, 1] = t, c
            nc += 1
        else:
            stored[nr, 0], stored[nr, 1], stored[nr, 2] = s0, at, n * hi_bits // 8
            nr += 1
        if has_low:
            join[nj, 0], join[nj, 1] = low_at + low_offsets[c], low_offsets[c + 1] - low_offsets[c]
            join[nj, 2], join[nj, 3] = at, n
            joined[nj, 0], joined[nj, 1] = t, c
            nj += 1
        hashes[nh, 0], hashes[nh, 1] = at, n * itemsize
        nh += 1
    return status, rows[:nc], which[:nc], stored[:nr], join[:nj], joined[:nj], hashes[:nh]
