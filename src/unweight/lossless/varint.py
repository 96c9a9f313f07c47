"""Signed 64-bit integers as zigzag LEB128 varints, vectorised with numpy.

A varint holds 7 bits per byte, low bits first, the top bit set on every byte but the last (LEB128,
as protobuf and DWARF write it); zigzag maps ``0, -1, 1, -2, ...`` to ``0, 1, 2, 3, ...`` so small
values of either sign take one byte. Folder version 5 stores a tensor's header and its chunk offsets
(as differences) this way (``unweight.lossless.register``): 136 bytes of header become ~25.
"""

from __future__ import annotations

import numpy as np

MAX_BYTES = 10  # ceil(64 / 7)
SHORT = 64  # bytes up to which decode loops in Python


def encode(values) -> bytes:
    """``values`` (int64) as zigzag LEB128 varints, back to back."""
    x = np.asarray(values, np.int64).reshape(-1)
    z = (x.view(np.uint64) << np.uint64(1)) ^ (x >> 63).view(np.uint64)
    n = np.ones(z.size, np.int64)
    for k in range(1, MAX_BYTES):
        n += z >= np.uint64(1 << (7 * k))
    start = np.cumsum(n) - n
    out = np.empty(int(n.sum()), np.uint8)
    for j in range(MAX_BYTES):
        has = n > j
        if not has.any():
            break
        byte = (z[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        out[start[has] + j] = byte | np.where(n[has] > j + 1, np.uint64(0x80), np.uint64(0))
    return out.tobytes()


def decode(data, count: int) -> np.ndarray:
    """The ``count`` int64 values that :func:`encode` wrote into ``data`` (bytes or a U8 array),
    which must hold exactly them. Raises ``ValueError`` otherwise (a value running past the end, more
    or fewer values, one longer than 64 bits)."""
    b = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if b.size <= SHORT:  # a tensor's header and most offset lists: a plain loop beats numpy's call overheads
        raw, pos, out = b.tobytes(), 0, []
        for _ in range(count):
            v, pos = read(raw, pos)
            out.append(v)
        if pos != len(raw):
            raise ValueError(f"{len(raw) - pos} bytes after the {count} values expected")
        return np.array(out, np.int64)
    if count == 0:
        if b.size:
            raise ValueError(f"{b.size} bytes where no values were expected")
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or ends[-1] != b.size - 1:
        raise ValueError(f"{ends.size} complete values where {count} were expected"
                         if ends.size != count else "a value runs past the end")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > MAX_BYTES or (b[ends[lengths == MAX_BYTES]] > 1).any():
        raise ValueError("a value longer than 64 bits")
    pos = np.arange(b.size) - np.repeat(starts, lengths)
    z = np.add.reduceat((b & 0x7F).astype(np.uint64) << (7 * pos).astype(np.uint64), starts)
    return ((z >> np.uint64(1)) ^ (np.uint64(0) - (z & np.uint64(1)))).view(np.int64)


def read(buf, pos: int) -> tuple[int, int]:
    """The one varint at ``buf[pos:]`` and the position after it. Raises ``ValueError`` if it runs past
    the end or beyond 64 bits."""
    z = shift = 0
    while True:
        if pos >= len(buf) or shift >= 7 * MAX_BYTES:
            raise ValueError("a value runs past the end" if pos >= len(buf) else "a value longer than 64 bits")
        b = int(buf[pos])
        z |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if b < 0x80:
            break
    if z >> 64:
        raise ValueError("a value longer than 64 bits")
    return (z >> 1) ^ -(z & 1), pos
