"""The ``unweight-codebook`` on-disk format: K-means codebooks and round-to-nearest levels, packed.

One encoded matrix ``NAME`` is stored as plain tensors ``NAME.cb.{field}``:

- ``header``: U8, a small JSON object (kind, dtype, shape, and the kind's parameters);
- kind ``kmeans`` (arXiv 2603.17917): ``codebook`` F32 ``[n_codebooks, K]`` and ``indices`` U8, the
  assignments bit-packed at ``ceil(log2 K)`` bits (``unweight.pack``);
- kind ``rtn`` (group round-to-nearest, ``unweight.quant.rtn``): ``q`` U8 packed at ``bits``, ``scale``
  F16 ``[rows, n_groups]`` and ``zero`` (U8 integer zero points, or F16 minima for ``asym_float``);
- optional dense-and-sparse outliers (``unweight.outliers``): ``outlier_idx`` I32 flat indices and
  ``outlier_val`` in the matrix's dtype, written back exactly on decode;
- optionally (:func:`entropy_code`, header ``"entropy": "rans"``) the indices or levels rANS-coded
  instead of bit-packed: ``indices`` (or ``q``) is then replaced by the parts of one order-0 symbol
  stream, ``indices_rans_{head,code,offsets,modes,check,tables}`` (``unweight.lossless.symbols``), which
  is never larger than the packed field plus its header, offsets, modes, checksums and padding.
  Decoding accepts both; the header's ``bits`` is still the width the values fit in.

Every figure of bits per weight counts all of these tensors. Scales are stored in float16 and the
levels are computed from the stored (rounded) scales, so what is measured is what loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from unweight.cluster.tensor import cluster_tensor, codebook_decode, n_codebooks
from unweight.errors import UnweightError
from unweight.formats import Format, Parts, register
from unweight.outliers import restore, select_outliers, split
from unweight.pack import bits_needed, pack_bits, packed_nbytes, unpack_bits
from unweight.quant.rtn import GroupLevels, rtn_qparams, rtn_quantize_with_qparams

FORMAT_VERSION = 1
TAG = "cb"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LEVELS = {"kmeans": "indices", "rtn": "q"}  # the field holding each kind's per-weight values
ENTROPY = "rans"  # header "entropy": the values are an unweight.lossless.symbols stream


@dataclass(frozen=True)
class KMeansSpec:
    k: int = 16
    granularity: str = "matrix"  # matrix | row | group:N
    outliers: int | float | str | None = None


@dataclass(frozen=True)
class RTNSpec:
    bits: int = 4
    group_size: int = 128
    scheme: str = "asym_int"
    outliers: int | float | str | None = None


def _header(kind: str, w: torch.Tensor, **params) -> torch.Tensor:
    return _json({"kind": kind, "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape), **params})


def _json(h: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(h, separators=(",", ":")).encode()), dtype=torch.uint8)


def _outlier_parts(w: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor | None, Parts]:
    idx = select_outliers(w, spec)
    if idx.numel() == 0:
        return w, None, {}
    dense, values, keep = split(w, idx)
    return dense, keep, {"outlier_idx": idx.to(torch.int32), "outlier_val": values}


def encode_kmeans(w: torch.Tensor, spec: KMeansSpec, importance: torch.Tensor | None = None) -> Parts:
    """Cluster ``w`` (2-D) to ``spec.k`` values per codebook; outliers (if any) kept exactly."""
    dense, keep, parts = _outlier_parts(w, spec.outliers)
    if keep is not None:
        importance = keep if importance is None else importance.expand_as(keep) * keep
    codebook, assignments = cluster_tensor(dense, spec.k, importance=importance, granularity=spec.granularity)
    bits = bits_needed(spec.k)
    parts.update({
        "header": _header("kmeans", w, k=spec.k, bits=bits, granularity=spec.granularity),
        "codebook": codebook.to(torch.float32).contiguous(),
        "indices": pack_bits(assignments.reshape(-1), bits),
    })
    return parts


def encode_rtn(w: torch.Tensor, spec: RTNSpec) -> Parts:
    """Group round-to-nearest at ``spec.bits``; scales float16, levels computed from the stored scales."""
    dense, _, parts = _outlier_parts(w, spec.outliers)
    scale, zero = rtn_qparams(dense, spec.bits, spec.group_size, spec.scheme)
    scale = scale.to(torch.float16)
    if zero.is_floating_point():
        zero = zero.to(torch.float16)
    q = rtn_quantize_with_qparams(dense, scale.float(), zero.float() if zero.is_floating_point() else zero,
                                  spec.bits, spec.group_size, spec.scheme)
    parts.update({
        "header": _header("rtn", w, bits=spec.bits, group_size=spec.group_size, scheme=spec.scheme),
        "q": pack_bits(q.reshape(-1), spec.bits),
        "scale": scale.contiguous(),
        "zero": zero.contiguous(),
    })
    return parts


def parse_parts(parts: Parts, name: str):
    """``(header, dtype, shape, numel, need)``: the header's fields and a checked part getter."""
    try:
        h = json.loads(bytes(parts["header"].numpy()).decode())
        dtype, shape, kind = DTYPES[h["dtype"]], tuple(h["shape"]), h["kind"]
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise UnweightError(f"tensor {name!r}: corrupt or missing codebook header ({exc})") from None
    numel = int(np.prod(shape)) if shape else 1

    def need(field: str, nbytes: int | None = None) -> torch.Tensor:
        if field not in parts:
            raise UnweightError(f"tensor {name!r}: part {field!r} is missing")
        t = parts[field]
        if nbytes is not None and t.numel() * t.element_size() != nbytes:
            raise UnweightError(f"tensor {name!r}: part {field!r} has {t.numel() * t.element_size()} bytes, "
                                f"expected {nbytes}: truncated or corrupt")
        return t

    return h, dtype, shape, numel, need


def _levels(parts: Parts, h: dict, name: str, numel: int, need) -> torch.Tensor:
    """The flat uint8 indices (``kmeans``) or levels (``rtn``), bit-packed or rANS-coded."""
    field, bits = LEVELS[h["kind"]], int(h["bits"])
    coding = h.get("entropy")
    if coding is None:
        return unpack_bits(need(field, packed_nbytes(numel, bits)), bits, numel)
    if coding != ENTROPY:
        raise UnweightError(f"tensor {name!r}: unknown entropy coding {coding!r} of {field!r}")
    from unweight.lossless.symbols import decode_symbols

    prefix = f"{field}_{ENTROPY}_"
    values = decode_symbols({k.removeprefix(prefix): v for k, v in parts.items() if k.startswith(prefix)},
                            numel, name)
    if numel and int(values.max()) >= 1 << bits:
        raise UnweightError(f"tensor {name!r}: a stored value exceeds {bits} bits: corrupt")
    return values


def stored_values(parts: Parts, name: str = "<tensor>") -> torch.Tensor:
    """The per-weight values as stored, uint8 in the matrix's shape: K-means indices or RTN levels,
    whether bit-packed or rANS-coded (outliers not applied)."""
    h, _, shape, numel, need = parse_parts(parts, name)
    if h["kind"] not in LEVELS:
        raise UnweightError(f"tensor {name!r}: unknown codebook kind {h['kind']!r}")
    return _levels(parts, h, name, numel, need).view(shape)


def entropy_code(parts: Parts, name: str = "<tensor>") -> Parts:
    """The same matrix with its indices (``kmeans``) or levels (``rtn``) rANS-coded instead of
    bit-packed (one order-0 table per matrix); it decodes to the same tensor. Idempotent."""
    h, _, _, numel, need = parse_parts(parts, name)
    if h.get("entropy") == ENTROPY:
        return parts
    if h["kind"] not in LEVELS:
        raise UnweightError(f"tensor {name!r}: unknown codebook kind {h['kind']!r}")
    from unweight.lossless.symbols import encode_symbols

    field, bits = LEVELS[h["kind"]], int(h["bits"])
    values = _levels(parts, h, name, numel, need)
    out = {k: v for k, v in parts.items() if k not in (field, "header")}
    out["header"] = _json({**h, "entropy": ENTROPY})
    out.update({f"{field}_{ENTROPY}_{s}": t for s, t in encode_symbols(values, bits).items()})
    return out


def rtn_levels(parts: Parts, name: str) -> GroupLevels | None:
    """The stored levels of an ``rtn`` matrix (None for ``kmeans``); outliers are not included."""
    h, _, shape, numel, need = parse_parts(parts, name)
    return _group_levels(parts, h, name, shape, numel, need) if h["kind"] == "rtn" else None


def _group_levels(parts: Parts, h: dict, name: str, shape, numel: int, need) -> GroupLevels:
    q = _levels(parts, h, name, numel, need).view(shape)
    return GroupLevels(q, need("scale"), need("zero"), int(h["bits"]), int(h["group_size"]), h["scheme"])


def decode(parts: Parts, name: str) -> torch.Tensor:
    """The dense tensor (in its original dtype) of one encoded matrix."""
    h, dtype, shape, numel, need = parse_parts(parts, name)
    kind = h["kind"]
    if kind == "kmeans":
        gran = h["granularity"]
        codebook = need("codebook", 4 * n_codebooks(shape, gran) * int(h["k"])).view(-1, int(h["k"]))
        idx = _levels(parts, h, name, numel, need).view(shape)
        if numel and int(idx.max()) >= codebook.shape[1]:
            raise UnweightError(f"tensor {name!r}: an index exceeds the codebook size: corrupt")
        w = codebook_decode(codebook, idx, granularity=gran, dtype=dtype)
    elif kind == "rtn":
        w = _group_levels(parts, h, name, shape, numel, need).dequantize(dtype)
    else:
        raise UnweightError(f"tensor {name!r}: unknown codebook kind {kind!r}")
    if "outlier_idx" in parts:
        idx = need("outlier_idx").long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= numel):
            raise UnweightError(f"tensor {name!r}: outlier index out of range: corrupt")
        w = restore(w, idx, need("outlier_val", idx.numel() * torch.empty(0, dtype=dtype).element_size()))
    return w


FORMAT = register(Format(quant_method="unweight-codebook", tag=TAG, version=FORMAT_VERSION, decode=decode,
                         description="K-means codebooks or RTN levels, bit-packed or rANS-coded, exact outliers"))
