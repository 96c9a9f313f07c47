"""XXH64 and XXH3-64 (Yann Collet's xxHash, seed 0), compiled with numba.

Every chunk of an entropy-coded tensor carries a checksum of its original bytes, checked on decode:
XXH3-64 from format version 4, XXH64 before; the metadata checksum is XXH64. CRC32 from zlib runs at
~1 GB/s here, slower than the decoder it would guard; XXH64 reads eight bytes per step (0.086 ns per
byte), XXH3-64 64 bytes per vector step (0.018). Both follow the reference specification
(github.com/Cyan4973/xxHash/blob/dev/doc/xxhash_spec.md): XXH64 is tested against its known values,
XXH3-64 against the ``xxhash`` package.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from unweight.lossless import simd

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@njit(inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(inline="always")
def _round(acc, lane):
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@njit(inline="always")
def _merge(acc, val):
    acc = acc ^ _round(np.uint64(0), val)
    return acc * _P1 + _P4


@njit(inline="always")
def _r64(a, p):
    return a[p:p + 8].view(np.uint64)[0]


@njit(inline="always")
def _r32(a, p):
    return np.uint64(a[p:p + 4].view(np.uint32)[0])


@njit(inline="always")
def _avalanche64(h):
    """XXH64's final mix, which XXH3 uses too."""
    h = h ^ (h >> np.uint64(33))
    h = h * _P2
    h = h ^ (h >> np.uint64(29))
    h = h * _P3
    return h ^ (h >> np.uint64(32))


@njit(cache=True, nogil=True)
def xxh64(data, start, length):
    """XXH64 with seed 0 of ``data[start:start + length]`` (``data`` a uint8 array)."""
    end = start + length
    p = start
    if length >= 32:
        v1 = _P1 + _P2
        v2 = _P2
        v3 = np.uint64(0)
        v4 = np.uint64(0) - _P1
        nstripes = length // 32
        words = data[start:start + nstripes * 32].view(np.uint64)
        for s in range(nstripes):
            v1 = _round(v1, words[4 * s])
            v2 = _round(v2, words[4 * s + 1])
            v3 = _round(v3, words[4 * s + 2])
            v4 = _round(v4, words[4 * s + 3])
        p = start + nstripes * 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = _P5
    h = h + np.uint64(length)
    while p + 8 <= end:
        h = h ^ _round(np.uint64(0), _r64(data, p))
        h = _rotl(h, 27) * _P1 + _P4
        p += 8
    if p + 4 <= end:
        h = h ^ (_r32(data, p) * _P1)
        h = _rotl(h, 23) * _P2 + _P3
        p += 4
    while p < end:
        h = h ^ (np.uint64(data[p]) * _P5)
        h = _rotl(h, 11) * _P1
        p += 1
    return _avalanche64(h)


def meta_hash(head: np.ndarray, field: int, tables, rows=b"") -> int:
    """The metadata checksum of a stream: XXH64, as int64, of the int64 ``head`` with
    ``head[field]`` (where the checksum is stored) read as 0, then the bytes of ``tables`` and
    ``rows`` (``bytes`` or uint8 arrays). Joined by numpy: a compiled join took 4 s to compile, for
    a few hundred bytes."""
    h = np.array(head, np.int64)
    h[field] = 0
    parts = [h.view(np.uint8)] + [np.frombuffer(p, np.uint8) if isinstance(p, (bytes, bytearray)) else
                                  np.asarray(p, np.uint8).reshape(-1) for p in (tables, rows)]
    buf = np.concatenate(parts)
    v = int(xxh64(buf, 0, buf.size))
    return v - (1 << 64) if v >> 63 else v  # as int64


# ---------------------------------------------------------------------------------------------
# XXH3-64 (seed 0, the default secret): format version 4's chunk checksum


_SECRET = np.frombuffer(bytes([
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
]), np.uint8)  # the reference implementation's kSecret, a constant of the algorithm
_SCRAMBLE = _SECRET[128:].view(np.uint64).copy()  # the keys of the scramble between blocks
_MERGE = np.frombuffer(_SECRET[11:75].tobytes(), np.uint64).copy()  # and of the final merge
_Q1, _Q2, _Q3 = np.uint64(0x9E3779B1), np.uint64(0x85EBCA77), np.uint64(0xC2B2AE3D)  # its 32-bit primes
_MX1, _MX2 = np.uint64(0x165667919E3779F9), np.uint64(0x9FB21C651E98DF25)
_M32 = np.uint64(0xFFFFFFFF)
_BLOCK = 1024  # 16 stripes of 64 bytes between scrambles (a 192-byte secret)


def xxh3_constants() -> np.ndarray:
    """XXH3-64's constants for a reader of 64-bit words (``unweight.lossless.gpu``): the 8 initial
    accumulators, then stripe ``s``'s key for lane ``i`` at ``8 + 8 s + i`` (16 stripes), the last stripe's 8
    keys (the secret from byte 121 = 192 - 64 - 7), the 8 scramble keys and the 8 merge keys (uint64)."""
    def words(at):
        return [int.from_bytes(_SECRET[at + 8 * i:at + 8 * i + 8].tobytes(), "little") for i in range(8)]
    keys = [w for s in range(16) for w in words(8 * s)]
    return np.array([_Q3, _P1, _P2, _P3, _P4, _Q2, _P5, _Q1, *keys, *words(121), *_SCRAMBLE, *_MERGE], np.uint64)


@njit(inline="always")
def _mul_fold(a, b):
    """The 128-bit product of ``a`` and ``b``, its halves XORed."""
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    lo_lo, hi_lo, lo_hi, hi_hi = a0 * b0, a1 * b0, a0 * b1, a1 * b1
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & _M32) + lo_hi
    upper = (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32)) + hi_hi
    lower = (cross << np.uint64(32)) | (lo_lo & _M32)
    return lower ^ upper


@njit(inline="always")
def _avalanche3(h):
    h = h ^ (h >> np.uint64(37))
    h = h * _MX1
    return h ^ (h >> np.uint64(32))


@njit(inline="always")
def _mix16(d, p, s):
    return _mul_fold(_r64(d, p) ^ _r64(_SECRET, s), _r64(d, p + 8) ^ _r64(_SECRET, s + 8))


_V8 = ir.VectorType(ir.IntType(64), 8)


@intrinsic
def _stripes_vec(typingctx, d, p, nstripes, secret, s0, acc):
    """The accumulation loop as one ``<8 x i64>`` vector (numba's scalar loop over eight locals ran at
    0.19 ns per byte, XXH64's at 0.09): ``acc[i ^ 1] += x[i]``, ``acc[i] += lo32(x[i] ^ k[i]) *
    hi32(x[i] ^ k[i])`` for the eight words ``x`` of each stripe and ``k`` of the secret."""
    i64 = types.int64
    sig = types.void(d, i64, i64, secret, i64, acc)

    def codegen(context, b, signature, args):
        dp, _, _, sp, _, ap = (simd.array_data(context, b, t, v) if isinstance(t, types.Array) else v
                               for t, v in zip(signature.args, args))
        p, nstripes, s0 = args[1], args[2], args[4]
        vp = ir.PointerType(_V8)
        acc_ptr = b.bitcast(ap, vp)
        entry = b.block
        head, body, done = (b.append_basic_block(x) for x in ("xxh3.head", "xxh3.body", "xxh3.done"))
        start = b.load(acc_ptr, align=8)
        b.branch(head)
        b.position_at_end(head)
        n = b.phi(ir.IntType(64))
        a = b.phi(_V8)
        n.add_incoming(ir.Constant(ir.IntType(64), 0), entry)
        a.add_incoming(start, entry)
        b.cbranch(b.icmp_signed("<", n, nstripes), body, done)
        b.position_at_end(body)
        x = b.load(b.bitcast(b.gep(dp, [b.add(p, b.mul(n, ir.Constant(ir.IntType(64), 64)))]), vp), align=1)
        k = b.load(b.bitcast(b.gep(sp, [b.add(s0, b.mul(n, ir.Constant(ir.IntType(64), 8)))]), vp), align=1)
        y = b.xor(x, k)
        lo32 = ir.Constant(_V8, [0xFFFFFFFF] * 8)
        prod = b.mul(b.and_(y, lo32), b.lshr(y, ir.Constant(_V8, [32] * 8)))
        swapped = b.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), 8), [1, 0, 3, 2, 5, 4, 7, 6]))
        a2 = b.add(a, b.add(swapped, prod))
        n.add_incoming(b.add(n, ir.Constant(ir.IntType(64), 1)), body)
        a.add_incoming(a2, body)
        b.branch(head)
        b.position_at_end(done)
        b.store(a, acc_ptr, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _stripes(d, p, nstripes, s0, acc):
    """XXH3's accumulation of ``nstripes`` stripes of 64 bytes from ``d[p:]`` into the eight uint64
    ``acc``, the secret read from byte ``s0`` on, one stripe further by 8 bytes each."""
    if nstripes > 0:
        _stripes_vec(d[p:p + 64 * nstripes], 0, nstripes, _SECRET, s0, acc)


@njit(cache=True, nogil=True)
def xxh3_64(data, start, length):
    """XXH3-64 with seed 0 and the default secret of ``data[start:start + length]`` (``data`` a uint8
    array), after the reference specification (github.com/Cyan4973/xxHash, doc/xxhash_spec.md); tested
    against the ``xxhash`` package. It reads 64 bytes in eight independent 32 x 32-bit products where
    XXH64 chains four 64-bit ones, so the compiler can vectorise it."""
    d, n = data[start:start + length], np.uint64(length)
    if length <= 16:
        if length > 8:
            lo = _r64(d, 0) ^ (_r64(_SECRET, 24) ^ _r64(_SECRET, 32))
            hi = _r64(d, length - 8) ^ (_r64(_SECRET, 40) ^ _r64(_SECRET, 48))
            swapped = np.uint64(0)
            for b in range(8):
                swapped = (swapped << np.uint64(8)) | ((lo >> np.uint64(8 * b)) & np.uint64(0xFF))
            return _avalanche3(n + swapped + hi + _mul_fold(lo, hi))
        if length >= 4:
            keyed = (_r32(d, length - 4) + (_r32(d, 0) << np.uint64(32))) ^ (_r64(_SECRET, 8) ^ _r64(_SECRET, 16))
            keyed = keyed ^ (_rotl(keyed, 49) ^ _rotl(keyed, 24))
            keyed = keyed * _MX2
            keyed = keyed ^ ((keyed >> np.uint64(35)) + n)
            keyed = keyed * _MX2
            return keyed ^ (keyed >> np.uint64(28))
        if length > 0:
            combined = ((np.uint64(d[0]) << np.uint64(16)) | (np.uint64(d[length >> 1]) << np.uint64(24))
                        | np.uint64(d[length - 1]) | (n << np.uint64(8)))
            return _avalanche64(combined ^ (_r32(_SECRET, 0) ^ _r32(_SECRET, 4)))
        return _avalanche64(_r64(_SECRET, 56) ^ _r64(_SECRET, 64))
    if length <= 128:
        acc = n * _P1
        for r in range((length - 1) // 32, -1, -1):  # rounds of 16 bytes from the front and 16 from the back
            acc += _mix16(d, 16 * r, 32 * r) + _mix16(d, length - 16 * (r + 1), 32 * r + 16)
        return _avalanche3(acc)
    if length <= 240:
        acc = n * _P1
        for r in range(8):
            acc += _mix16(d, 16 * r, 16 * r)
        acc = _avalanche3(acc)
        for r in range(8, length // 16):
            acc += _mix16(d, 16 * r, 16 * (r - 8) + 3)
        return _avalanche3(acc + _mix16(d, length - 16, 119))
    acc = np.empty(8, np.uint64)
    acc[0], acc[1], acc[2], acc[3] = _Q3, _P1, _P2, _P3
    acc[4], acc[5], acc[6], acc[7] = _P4, _Q2, _P5, _Q1
    nblocks = (length - 1) // _BLOCK
    for b in range(nblocks):
        _stripes(d, b * _BLOCK, 16, 0, acc)
        for i in range(8):  # scramble
            a = acc[i]
            acc[i] = ((a ^ (a >> np.uint64(47))) ^ _SCRAMBLE[i]) * _Q1
    _stripes(d, nblocks * _BLOCK, ((length - 1) - nblocks * _BLOCK) // 64, 0, acc)
    _stripes(d, length - 64, 1, 121, acc)  # the last 64 bytes, with the secret from 192 - 64 - 7
    h = n * _P1
    for i in range(4):
        h += _mul_fold(acc[2 * i] ^ _MERGE[2 * i], acc[2 * i + 1] ^ _MERGE[2 * i + 1])
    return _avalanche3(h)
