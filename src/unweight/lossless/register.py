"""Registers ``unweight-lossless`` with unweight's format registry (and so with transformers).

Every floating-point tensor of the checkpoint is encoded (norms and embeddings too); integer tensors are
stored as they are. A tensor's coded streams are stored as ``NAME.ul.code`` (and ``NAME.ul.low`` for
FP32), its small streams packed into one ``NAME.ul.meta`` (folder version 3). Each stored part costs an
entry of ~100 bytes in the safetensors JSON header: with every stream a part of its own (version 2
folders, still read), bf16 minilm-l6's file came to 0.6596 of the original's, packed to 0.6587 (its
tensor bytes: 0.6581). See ``docs/format.md``.
"""

from __future__ import annotations

import numpy as np
import torch

from unweight.errors import UnweightError
from unweight.formats import Format, Parts, register
from unweight.lossless.format import decode_tensor, encode_tensor, is_supported

TAG = "ul"
PREFIX = f".{TAG}."
FOLDER_VERSION = 3  # 2: every stream a part of its own; 3: the small ones packed into `meta`
STREAMS = ("code", "low")  # stored as parts of their own
SMALL = ("head", "offsets", "modes", "check", "tables", "rows", "low_offsets")  # packed into `meta`
META_MAGIC = b"UWMP"
_DTYPES = {0: torch.uint8, 1: torch.int64}  # the dtype byte
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_STORED = {torch.uint8: np.dtype(np.uint8), torch.int64: np.dtype("<i8")}  # as the bytes hold them


def pack_meta(small: Parts) -> torch.Tensor:
    """One U8 tensor holding ``small`` (1-D U8/I64 tensors keyed by names in :data:`SMALL`): magic
    ``UWMP``, a count byte, per stream its name (a length byte and ASCII), a dtype byte (0 U8, 1 I64)
    and its element count (8 bytes), then the streams' little-endian bytes in the same order."""
    directory, data = bytearray(META_MAGIC) + bytes([len(small)]), []
    for key, t in small.items():
        directory += bytes([len(key)]) + key.encode("ascii") + bytes([_CODES[t.dtype]])
        directory += t.numel().to_bytes(8, "little")
        data.append(t.contiguous().numpy().astype(_STORED[t.dtype], copy=False).tobytes())
    return torch.frombuffer(bytearray(directory + b"".join(data)), dtype=torch.uint8)


def unpack_meta(meta: torch.Tensor, name: str) -> Parts:
    """The streams :func:`pack_meta` packed; a corrupt or truncated directory raises an error naming
    the tensor (the streams' own contents are checked by the decoder, as when stored apart)."""
    raw = meta.contiguous().numpy().tobytes()

    def corrupt(what: str) -> UnweightError:
        return UnweightError(f"tensor {name!r}: part '{name}{PREFIX}meta' is corrupt ({what})")

    if raw[:4] != META_MAGIC or len(raw) < 5:
        raise corrupt("no UWMP magic")
    pos, entries = 5, []
    for _ in range(raw[4]):
        if pos >= len(raw) or pos + 1 + raw[pos] + 9 > len(raw):
            raise corrupt("truncated directory")
        key = raw[pos + 1:pos + 1 + raw[pos]].decode("ascii", "replace")
        pos += 1 + raw[pos]
        if key not in SMALL or any(key == k for k, _, _ in entries) or raw[pos] not in _DTYPES:
            raise corrupt(f"unknown or repeated stream {key[:16]!r}")
        entries.append((key, _DTYPES[raw[pos]], int.from_bytes(raw[pos + 1:pos + 9], "little")))
        pos += 9
    out = {}
    for key, dtype, count in entries:
        size = count * _STORED[dtype].itemsize
        if size > len(raw) - pos:
            raise corrupt(f"stream {key!r} runs past the end")
        held = _STORED[dtype]
        out[key] = torch.from_numpy(np.frombuffer(raw, held, count, pos).astype(held.newbyteorder("=")))
        pos += size
    if pos != len(raw):
        raise corrupt(f"{len(raw) - pos} bytes after the streams")
    return out


def encode_parts(name: str, t: torch.Tensor) -> Parts | None:
    """The stored parts of one tensor (fields without the ``.ul.`` prefix), or None to store it as is."""
    if not is_supported(t.dtype):
        return None
    return folder_parts({k.removeprefix(PREFIX): v for k, v in encode_tensor(t).items()})


def folder_parts(streams: Parts) -> Parts:
    """A tensor's streams (``encode_tensor``'s, without the prefix) as a folder stores them: the coded
    ones apart, the small ones packed into ``meta``."""
    return {k: v for k, v in streams.items() if k in STREAMS} | {
        "meta": pack_meta({k: v for k, v in streams.items() if k not in STREAMS})}


def decode(parts: Parts, name: str) -> torch.Tensor:
    if "meta" in parts:
        if any(k in SMALL for k in parts):
            raise UnweightError(f"tensor {name!r}: both a meta part and separate streams: corrupt folder")
        parts = {k: v for k, v in parts.items() if k != "meta"} | unpack_meta(parts["meta"], name)
    return decode_tensor({name + PREFIX + k: v for k, v in parts.items()}, name)


FORMAT = register(Format(quant_method="unweight-lossless", tag=TAG, version=FOLDER_VERSION, decode=decode,
                         description="bit-exact entropy coding of float tensors (exponent rANS-coded)"))
