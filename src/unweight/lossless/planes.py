"""Bit planes: ``r``-bit values (``r <= 8``, one per byte) packed into exactly ``r`` bits each, laid
out so that packing and unpacking are loops over contiguous slices that the compiler vectorises.

For ``m`` values (``m`` a multiple of 8; the caller pads with zeros):

* when ``r >= 4``, a nibble plane of ``m / 2`` bytes: byte ``i`` holds the low four bits of value
  ``i`` and, above them, those of value ``i + m / 2``;
* then one plane of ``m / 8`` bytes per remaining bit (``r - 4`` of them, or ``r`` when ``r < 4``):
  bit ``j`` of byte ``i`` is that bit of value ``i + j * m / 8``.

Format version 3 stores a coded chunk's raw bits (sign and low mantissa bits) this way, after its
rANS words (``docs/format.md``). Each value's bits are read at a fixed stride, so packing and
unpacking run as vector loops over contiguous slices (``lanes16.pack_words`` and ``lanes16.place``,
which build the planes straight from BF16 words and the words straight from them); :func:`pack` and
:func:`merge` here are the plain reference that the tests hold those to; :func:`padded` and
:func:`plane_bytes` are the sizes the format reads and writes.
"""

import numpy as np
from numba import njit


@njit(inline="always")
def padded(n):
    """Values the planes of ``n`` values hold: ``n`` rounded up to a multiple of 8."""
    return -(-n // 8) * 8


@njit(inline="always")
def plane_bytes(m, r):
    """Bytes of the planes of ``m`` values (``m`` a multiple of 8) of ``r`` bits."""
    return m * r // 8


@njit(inline="always")
def pack(raw, m, r, out):
    """Pack ``raw[:m]`` (uint8, values below ``2^r``) into ``out[:m * r // 8]``."""
    h, e = m // 2, m // 8
    b0 = 0
    o = 0
    if r >= 4:
        lo, hi, nib = raw[:h], raw[h:m], out[:h]
        for i in range(h):
            nib[i] = (lo[i] & np.uint8(15)) | (hi[i] << np.uint8(4))
        b0, o = 4, h
    for b in range(b0, r):
        plane = out[o:o + e]
        plane[:] = 0
        s = np.uint8(b)
        for j in range(8):
            part = raw[j * e:(j + 1) * e]
            sj = np.uint8(j)
            for i in range(e):
                plane[i] |= ((part[i] >> s) & np.uint8(1)) << sj
        o += e


@njit(inline="always")
def merge(src, m, r, n, out, top):
    """Inverse of :func:`pack` into 16-bit words: ORs value ``i < n`` of the planes ``src[:m * r // 8]``
    into ``out[i]``, its bits below ``r - 1`` in place and bit ``r - 1`` (the sign, in a permuted word)
    at bit ``top``."""
    h, e = m // 2, m // 8
    keep = np.uint16((1 << (r - 1)) - 1)
    sb = np.uint16(r - 1)
    tb = np.uint16(top)
    one = np.uint16(1)
    b0 = 0
    o = 0
    if r >= 4:
        nib = src[:h]
        lo = out[:min(h, n)]
        for i in range(lo.size):
            v = np.uint16(nib[i] & np.uint8(15))
            lo[i] |= (v & keep) | (((v >> sb) & one) << tb)
        hi = out[h:max(h, n)]
        for i in range(hi.size):
            v = np.uint16(nib[i] >> np.uint8(4))
            hi[i] |= (v & keep) | (((v >> sb) & one) << tb)
        b0, o = 4, h
    for b in range(b0, r):
        plane = src[o:o + e]
        ob = np.uint16(b if b < r - 1 else top)
        for j in range(8):
            part = out[min(j * e, n):min((j + 1) * e, n)]
            sj = np.uint8(j)
            for i in range(part.size):
                part[i] |= np.uint16((plane[i] >> sj) & np.uint8(1)) << ob
        o += e

