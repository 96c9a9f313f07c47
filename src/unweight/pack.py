"""Bit packing of small unsigned integers (codebook assignments, RTN levels) into a uint8 stream.

Layout, for ``bits`` in 1..8 (little-endian bit order): element i occupies stream bits
``[i * bits, (i + 1) * bits)``, least significant bit first, and stream bit b is bit ``b % 8`` (value
``1 << (b % 8)``) of byte ``b // 8``. So at 4 bits element 0 is the low nibble of byte 0, element 1
the high nibble; at 3 bits element 2 straddles bytes 0 and 1. The stream is ``ceil(numel * bits / 8)``
bytes; the unused high bits of the last byte are zero. Shared by the codebook and RTN formats, which
store the element count next to the stream.

Both directions are vectorised with numpy's C ``unpackbits``/``packbits`` over chunks of
``CHUNK_ELEMENTS`` elements (a multiple of 8, so every chunk ends on a byte boundary and temporary
memory stays at ``CHUNK_ELEMENTS * 8`` bytes).
"""

from __future__ import annotations

import numpy as np
import torch

from unweight.errors import UnweightError

MAX_BITS = 8
CHUNK_ELEMENTS = 1 << 20  # multiple of 8: chunks start on byte boundaries at every width


def bits_needed(n_values: int) -> int:
    """Smallest width that holds indices 0..n_values-1: ceil(log2 n_values), at least 1."""
    if n_values < 1 or n_values > 1 << MAX_BITS:
        raise UnweightError(f"cannot pack {n_values} distinct indices in 1..{MAX_BITS} bits")
    return max(1, (n_values - 1).bit_length())


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of the packed stream of ``numel`` elements at ``bits`` each."""
    return (numel * bits + 7) // 8


def pack_bits(indices: torch.Tensor | np.ndarray, bits: int) -> torch.Tensor:
    """Pack integer ``indices`` (any shape, values in ``[0, 2**bits)``) into a 1-D uint8 tensor."""
    _check_bits(bits)
    a = indices.detach().cpu().numpy() if isinstance(indices, torch.Tensor) else np.asarray(indices)
    if a.dtype.kind not in "ui" and a.dtype != np.bool_:
        raise UnweightError(f"pack_bits: expected integer indices, got {a.dtype}")
    a = a.reshape(-1)
    if a.size and (int(a.min()) < 0 or int(a.max()) >= 1 << bits):
        raise UnweightError(f"pack_bits: indices must lie in [0, {1 << bits}) for {bits} bits, "
                            f"got [{int(a.min())}, {int(a.max())}]")
    a = a.astype(np.uint8, copy=False)
    out = np.empty(packed_nbytes(a.size, bits), dtype=np.uint8)
    step_bytes = CHUNK_ELEMENTS * bits // 8
    for c, start in enumerate(range(0, a.size, CHUNK_ELEMENTS)):
        chunk = a[start:start + CHUNK_ELEMENTS]
        stream = np.unpackbits(chunk[:, None], axis=1, count=bits, bitorder="little")
        packed = np.packbits(stream.reshape(-1), bitorder="little")
        out[c * step_bytes:c * step_bytes + packed.size] = packed
    return torch.from_numpy(out)


def unpack_bits(packed: torch.Tensor | np.ndarray, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` elements as a 1-D uint8 tensor."""
    _check_bits(bits)
    p = packed.detach().cpu().numpy() if isinstance(packed, torch.Tensor) else np.asarray(packed)
    if p.dtype != np.uint8:
        raise UnweightError(f"unpack_bits: expected a uint8 stream, got {p.dtype}")
    p = p.reshape(-1)
    need = packed_nbytes(numel, bits)
    if numel < 0 or p.size < need:
        raise UnweightError(f"unpack_bits: {numel} elements at {bits} bits need {need} bytes, "
                            f"the stream has {p.size}")
    out = np.empty(numel, dtype=np.uint8)
    step_bytes = CHUNK_ELEMENTS * bits // 8
    for c, start in enumerate(range(0, numel, CHUNK_ELEMENTS)):
        n = min(CHUNK_ELEMENTS, numel - start)
        stream = np.unpackbits(p[c * step_bytes:c * step_bytes + packed_nbytes(n, bits)],
                               count=n * bits, bitorder="little")
        out[start:start + n] = np.packbits(stream.reshape(n, bits), axis=1,
                                           bitorder="little").reshape(n)
    return torch.from_numpy(out)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise UnweightError(f"bit width must be an integer in 1..{MAX_BITS}, got {bits!r}")
