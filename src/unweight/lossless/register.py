"""Registers ``unweight-lossless`` with unweight's format registry (and so with transformers).

Every floating-point tensor of the checkpoint is encoded (norms and embeddings too); integer tensors are
stored as they are. All of a tensor's streams are packed into one U8 part, ``NAME.ul.pack`` (folder
version 4). Each stored part costs an entry of ~100 bytes in the safetensors JSON header: bf16
minilm-l6's file came to 0.6596 of the original's with every stream a part of its own (version 2),
0.6587 with the small streams packed into ``NAME.ul.meta`` beside ``NAME.ul.code`` (version 3), and
0.6585 with one part per tensor (its tensor bytes: 0.6581). Versions 2 and 3 are still read. See
``docs/format.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from unweight.errors import UnweightError
from unweight.formats import Format, Parts, register
from unweight.lossless.format import decode_tensor, encode_streams, is_supported

TAG = "ul"
PREFIX = f".{TAG}."
FOLDER_VERSION = 4  # 2: every stream a part of its own; 3: the small ones packed into `meta`; 4: all into `pack`
STREAMS = ("head", "offsets", "modes", "check", "tables", "rows", "low_offsets", "code", "low")
PACKED = ("pack", "meta")  # the part holding a tensor's packed streams: version 4's, version 3's
PACK_MAGIC = b"UWMP"
_DTYPES = {0: np.dtype(np.uint8), 1: np.dtype("<i8")}  # the dtype byte, and the bytes it says are held
_CODES = {np.dtype(np.uint8): 0, np.dtype(np.int64): 1}
_MAX_DIRECTORY = 5 + 255 * (2 + 255 + 8)  # a version 3 meta part's longest head: magic, count, 255 entries


def pack_streams(streams: dict[str, np.ndarray]) -> np.ndarray:
    """One U8 array holding ``streams`` (1-D U8/I64 arrays keyed by names in :data:`STREAMS`): their
    little-endian bytes back to back, then the directory (a count byte, and per stream its name as a
    length byte and ASCII, a dtype byte, 0 U8 or 1 I64, and its element count in 8 bytes), the
    directory's length (4 bytes) and the magic ``UWMP``.

    When the first stream is a U8 view of the start of a longer buffer that it does not share
    (``encode_streams(..., shrink=False)``'s code), the others are written into that buffer after it,
    which is then cut to length and returned (the view is not to be used after): the code, a tensor's
    largest stream, is not copied (a copy of gemma3-270m's embedding code was 0.14 GB more peak memory
    for the whole compress)."""
    directory = bytearray([len(streams)])
    for key, a in streams.items():
        directory += bytes([len(key)]) + key.encode("ascii") + bytes([_CODES[a.dtype]]) + a.size.to_bytes(8, "little")
    tail = np.frombuffer(bytes(directory) + len(directory).to_bytes(4, "little") + PACK_MAGIC, np.uint8)
    total = sum(a.nbytes for a in streams.values()) + tail.size
    arrays = list(streams.values())
    base = arrays[0].base if arrays else None
    if (isinstance(base, np.ndarray) and base.flags.owndata and base.dtype == np.uint8 and base.ndim == 1
            and arrays[0].dtype == np.uint8 and base.ctypes.data == arrays[0].ctypes.data and base.size >= total):
        out, pos = base, arrays.pop(0).size
    else:
        out, pos = np.empty(total, np.uint8), 0
    for a in arrays:
        out[pos:pos + a.nbytes] = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8)
        pos += a.nbytes
    out[pos:total] = tail
    if out.size > total:
        out.resize(total, refcheck=False)  # shrinking keeps the data in place
    return out


def unpack_streams(packed: torch.Tensor, name: str, part: str = "pack") -> Parts:
    """The streams packed in ``part`` (``pack``: :func:`pack_streams`'s layout; ``meta``: folder version
    3's, the directory first, after the magic and a count byte), U8 ones as views of ``packed`` and I64
    ones copied. A corrupt or truncated directory raises an error naming the tensor and the part (the
    streams' own contents are checked by the decoder, as when stored apart)."""
    arr = packed.contiguous().numpy()

    def corrupt(what: str) -> UnweightError:
        return UnweightError(f"tensor {name!r}: part '{name}{PREFIX}{part}' is corrupt ({what})")

    if part == "meta":
        raw = arr[:_MAX_DIRECTORY].tobytes()
        if raw[:4] != PACK_MAGIC or len(raw) < 5:
            raise corrupt("no UWMP magic")
        entries, start = _directory(raw, 5, raw[4], corrupt)
        end = arr.size
    else:
        if arr.size < 9 or arr[-4:].tobytes() != PACK_MAGIC:
            raise corrupt("no UWMP magic")
        length = int.from_bytes(arr[-8:-4].tobytes(), "little")
        if not 1 <= length <= arr.size - 8:
            raise corrupt("truncated directory")
        raw = arr[arr.size - 8 - length:-8].tobytes()
        entries, used = _directory(raw, 1, raw[0], corrupt)
        if used != len(raw):
            raise corrupt(f"{len(raw) - used} bytes after the directory")
        start, end = 0, arr.size - 8 - length
    out = {}
    for key, held, count in entries:
        size = count * held.itemsize
        if size > end - start:
            raise corrupt(f"stream {key!r} runs past the end")
        view = arr[start:start + size]
        out[key] = torch.from_numpy(view if held.itemsize == 1 else view.view(held).astype(held.newbyteorder("=")))
        start += size
    if start != end:
        raise corrupt(f"{end - start} bytes after the streams")
    return out


def _directory(raw: bytes, pos: int, count: int, corrupt) -> tuple[list, int]:
    """``count`` directory entries ``(name, dtype, element count)`` read from ``raw[pos:]``, and where
    they end."""
    entries = []
    for _ in range(count):
        if pos >= len(raw) or pos + 1 + raw[pos] + 9 > len(raw):
            raise corrupt("truncated directory")
        key = raw[pos + 1:pos + 1 + raw[pos]].decode("ascii", "replace")
        pos += 1 + raw[pos]
        if key not in STREAMS or any(key == k for k, _, _ in entries) or raw[pos] not in _DTYPES:
            raise corrupt(f"unknown or repeated stream {key[:16]!r}")
        entries.append((key, _DTYPES[raw[pos]], int.from_bytes(raw[pos + 1:pos + 9], "little")))
        pos += 9
    return entries, pos


def encode_parts(name: str, t: torch.Tensor) -> Parts | None:
    """The stored parts of one tensor (fields without the ``.ul.`` prefix), or None to store it as it is."""
    if not is_supported(t.dtype):
        return None
    return folder_parts({k.removeprefix(PREFIX): v for k, v in encode_streams(t, shrink=False).items()})


def folder_parts(streams: dict[str, np.ndarray]) -> Parts:
    """A tensor's streams (``encode_streams``', without the prefix) as a folder stores them: all in
    one ``pack`` part, the coded ones first (see :func:`pack_streams`)."""
    ordered = sorted(streams, key=lambda k: k not in ("code", "low"))
    return {"pack": torch.from_numpy(pack_streams({k: streams[k] for k in ordered}))}


def decode(parts: Parts, name: str) -> torch.Tensor:
    packed = [k for k in PACKED if k in parts]
    if len(packed) > 1:
        raise UnweightError(f"tensor {name!r}: both a pack and a meta part: corrupt folder")
    if packed:
        inside = unpack_streams(parts[packed[0]], name, packed[0])
        apart = {k: v for k, v in parts.items() if k != packed[0]}
        if set(inside) & set(apart):
            raise UnweightError(f"tensor {name!r}: streams {sorted(set(inside) & set(apart))} both packed and "
                                "stored apart: corrupt folder")
        parts = apart | inside
    return decode_tensor({name + PREFIX + k: v for k, v in parts.items()}, name)


FORMAT = register(Format(quant_method="unweight-lossless", tag=TAG, version=FOLDER_VERSION, decode=decode,
                         description="bit-exact entropy coding of float tensors (exponent rANS-coded)"))
