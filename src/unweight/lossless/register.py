"""Registers ``unweight-lossless`` with unweight's format registry (and so with transformers).

Every floating-point tensor of the checkpoint is encoded (norms and embeddings too); integer tensors are
stored as they are. Parts are stored as ``NAME.ul.{field}``; see ``docs/format.md``.
"""

from __future__ import annotations

import torch

from unweight.formats import Format, Parts, register
from unweight.lossless.format import FORMAT_VERSION, decode_tensor, encode_tensor, is_supported

TAG = "ul"
PREFIX = f".{TAG}."


def encode_parts(name: str, t: torch.Tensor) -> Parts | None:
    """The stored parts of one tensor (fields without the ``.ul.`` prefix), or None to store it as is."""
    if not is_supported(t.dtype):
        return None
    return {k.removeprefix(PREFIX): v for k, v in encode_tensor(t).items()}


def decode(parts: Parts, name: str) -> torch.Tensor:
    return decode_tensor({name + PREFIX + k: v for k, v in parts.items()}, name)


FORMAT = register(Format(quant_method="unweight-lossless", tag=TAG, version=FORMAT_VERSION, decode=decode,
                         description="bit-exact entropy coding of float tensors (exponent rANS-coded)"))
