"""Lossless, bit-exact entropy coding of float checkpoints (BF16, FP16, FP32, FP8).

``encode_tensor`` / ``decode_tensor`` turn one tensor into a few plain tensors and back; the format
is specified in ``docs/format.md``. Modules: ``fields`` (float bit fields), ``model`` (symbols, row
contexts, frequency tables), ``rans`` (the entropy coder), ``chunks`` (per-chunk drivers),
``hashing`` (XXH64), ``format`` (the container).
"""

from unweight.lossless.fields import order0_bits, split_fields, merge_fields
from unweight.lossless.format import (CHUNK_WEIGHTS, FORMAT_VERSION, decode_tensor, decode_tensors, encode_tensor,
                                      encode_tensors, encoded_names, is_supported)

__all__ = ["CHUNK_WEIGHTS", "FORMAT_VERSION", "decode_tensor", "decode_tensors", "encode_tensor", "encode_tensors",
           "encoded_names", "is_supported", "merge_fields", "order0_bits", "split_fields"]
