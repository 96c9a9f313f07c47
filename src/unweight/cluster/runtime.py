"""``CodebookLinear``: a Linear layer held as K-means assignments + codebook, decoded in forward.

The memory-saving load path of the ``unweight-codebook`` format (arXiv 2603.17917, "Only relative
ranks matter in weight-clustered large language models"): instead of the dense matrix, a layer keeps
its assignments (uint8, one byte per weight, or bit-packed at ``ceil(log2 K)`` bits), its codebook
(float32 ``[n_codebooks, K]``) and its exact dense-and-sparse outliers, and rebuilds the weight for
each forward call. The decoded weight is the one :func:`unweight.cluster.codebook.decode` gives (the
codebook rounded to the original dtype, outliers written back), so the logits equal the dense path's.

The same module serves centroid fine-tuning (:mod:`unweight.cluster.finetune`): with the codebook made
an ``nn.Parameter``, ``W = codebook[assignments]`` is a parametrisation whose gradient for a centroid
is the sum of dL/dW over its cluster; outliers overwrite their positions after the gather, so they
receive no gradient and stay exact.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from unweight.cluster.codebook import parse_parts, stored_values
from unweight.cluster.tensor import codebook_decode, parse_granularity
from unweight.errors import UnweightError
from unweight.formats import Parts
from unweight.pack import bits_needed, pack_bits, unpack_bits


class ClusteredMatrix(NamedTuple):
    """One clustered matrix in memory: what the ``kmeans`` kind of the format stores, unpacked."""

    codebook: torch.Tensor  # float32 [n_codebooks, K]
    assignments: torch.Tensor  # uint8 (int32 for K > 256), the matrix's shape
    granularity: str = "matrix"  # matrix | row | group:N
    outlier_idx: torch.Tensor | None = None  # flat indices kept exactly
    outlier_val: torch.Tensor | None = None  # their values, in the matrix's dtype
    dtype: torch.dtype = torch.bfloat16  # the original dtype the codebook is rounded to on decode


def clustered_from_parts(parts: Parts, name: str = "<tensor>") -> ClusteredMatrix:
    """The :class:`ClusteredMatrix` of one ``kmeans``-encoded matrix's parts (``header``, ``codebook``,
    ``indices``, optional ``outlier_idx``/``outlier_val``)."""
    h, dtype, _, numel, need = parse_parts(parts, name)
    if h["kind"] != "kmeans":
        raise UnweightError(f"tensor {name!r}: a CodebookLinear needs kind 'kmeans', got {h['kind']!r}")
    need("codebook")
    k = int(h["k"])
    assignments = stored_values(parts, name)  # bit-packed or rANS-coded (--entropy)
    if numel and int(assignments.max()) >= k:
        raise UnweightError(f"tensor {name!r}: an index exceeds the codebook size: corrupt")
    idx = parts.get("outlier_idx")
    return ClusteredMatrix(parts["codebook"].float().view(-1, k), assignments, h["granularity"],
                           None if idx is None else idx.long(), parts.get("outlier_val"), dtype)


def decode_weight(codebook: torch.Tensor, assignments: torch.Tensor, granularity: str,
                  dtype: torch.dtype, outlier_idx: torch.Tensor | None = None,
                  outlier_val: torch.Tensor | None = None) -> torch.Tensor:
    """``codebook[assignments]`` in ``dtype`` with the outliers written back; differentiable in
    ``codebook`` (outlier positions get no gradient)."""
    w = codebook_decode(codebook, assignments, granularity=granularity, dtype=dtype)
    if outlier_idx is not None and outlier_idx.numel():
        w = w.reshape(-1).index_put((outlier_idx,), outlier_val.to(dtype)).view(assignments.shape)
    return w


class CodebookLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` rebuilt from assignments + codebook on every call.

    ``packed=True`` keeps the assignments bit-packed (``ceil(log2 K)`` bits per weight) and unpacks
    them per call: the smallest footprint, the slowest forward. ``packed=False`` keeps one uint8 per
    weight. The weight is decoded in the original dtype (as the dense load does) and cast to the
    input's dtype.
    """

    def __init__(self, matrix: ClusteredMatrix, bias: torch.Tensor | None = None, packed: bool = False):
        super().__init__()
        if matrix.assignments.ndim != 2:
            raise UnweightError(f"CodebookLinear needs a 2-D matrix, got shape {tuple(matrix.assignments.shape)}")
        parse_granularity(matrix.granularity)
        self.out_features, self.in_features = matrix.assignments.shape
        self.granularity, self.weight_dtype, self.packed = matrix.granularity, matrix.dtype, packed
        self.k = matrix.codebook.shape[1]
        self.bits = bits_needed(self.k)
        a = matrix.assignments
        self.register_buffer("indices", pack_bits(a.reshape(-1), self.bits) if packed else a.contiguous())
        self.register_buffer("codebook", matrix.codebook.float().contiguous())
        has_outliers = matrix.outlier_idx is not None and matrix.outlier_idx.numel() > 0
        self.register_buffer("outlier_idx", matrix.outlier_idx.long() if has_outliers else None)
        self.register_buffer("outlier_val", matrix.outlier_val.to(matrix.dtype) if has_outliers else None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def assignments(self) -> torch.Tensor:
        if not self.packed:
            return self.indices
        numel = self.out_features * self.in_features
        return unpack_bits(self.indices, self.bits, numel).view(self.out_features, self.in_features)

    def weight_from_codebook(self) -> torch.Tensor:
        return decode_weight(self.codebook, self.assignments(), self.granularity, self.weight_dtype,
                             self.outlier_idx, self.outlier_val)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads ``linear.weight`` expects
        return self.weight_from_codebook()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_from_codebook().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"granularity={self.granularity}, packed={self.packed}, "
                f"outliers={0 if self.outlier_idx is None else self.outlier_idx.numel()}")


def _parent(model: nn.Module, module_name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = module_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def swap_codebook_linears(model: nn.Module, parts_by_name: dict[str, Parts | ClusteredMatrix],
                          packed: bool = False) -> nn.Module:
    """Replace each ``nn.Linear`` whose weight is named in ``parts_by_name`` (``...q_proj.weight`` ->
    its format parts or a :class:`ClusteredMatrix`) by a :class:`CodebookLinear`, in place; biases
    are kept. Returns ``model``."""
    for name, parts in parts_by_name.items():
        module_name = name.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise UnweightError(f"tensor {name!r}: the model has no module {module_name!r}") from None
        if not isinstance(linear, (nn.Linear, CodebookLinear)):
            raise UnweightError(f"tensor {name!r}: {module_name!r} is a {type(linear).__name__}, not a Linear")
        matrix = parts if isinstance(parts, ClusteredMatrix) else clustered_from_parts(parts, name)
        if tuple(matrix.assignments.shape) != (linear.out_features, linear.in_features):
            raise UnweightError(f"tensor {name!r}: codebook shape {tuple(matrix.assignments.shape)} does not "
                                f"match the module's {(linear.out_features, linear.in_features)}")
        bias = linear.bias
        replacement = CodebookLinear(matrix, None if bias is None else bias.detach(), packed=packed)
        device = linear.weight.device if isinstance(linear, nn.Linear) else linear.codebook.device
        parent, child = _parent(model, module_name)
        setattr(parent, child, replacement.to(device))
    return model


def codebook_parts(path: str | os.PathLike) -> dict[str, Parts]:
    """The parts of every ``kmeans``-encoded matrix of a compressed folder, by tensor name."""
    from unweight.checkpoint import open_checkpoint
    from unweight.cluster.codebook import FORMAT
    from unweight.formats import group_parts, quantization_config

    ckpt = open_checkpoint(path)
    qc = quantization_config(ckpt)
    if qc is None or qc.get("quant_method") != FORMAT.quant_method:
        raise UnweightError(f"{path}: not an {FORMAT.quant_method} folder")
    groups, _ = group_parts(ckpt.names(), FORMAT.tag)
    marker = f".{FORMAT.tag}."
    out = {}
    for base, names in groups.items():
        parts = {n.rsplit(marker, 1)[1]: ckpt.get(n) for n in names}
        if json.loads(bytes(parts["header"].numpy()).decode()).get("kind") == "kmeans":
            out[base] = parts
    return out


def load_codebook_model(path: str | os.PathLike, packed: bool = False):
    """(model, tokenizer) of a compressed ``kmeans`` folder with every encoded Linear a
    :class:`CodebookLinear` (the dense weights are loaded first, then dropped)."""
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(path))
    swap_codebook_linears(model, codebook_parts(path), packed=packed)
    return model, tok
