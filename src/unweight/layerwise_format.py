"""The ``unweight-layerwise`` on-disk format: what :func:`unweight.layerwise.compress_layerwise` made of
each decoder Linear (pruned: magnitude, Wanda, SparseGPT; quantized: RTN, GPTQ, AWQ; or both), stored
exactly, so that the folder loads bit for bit as the model that was compressed in memory.

One compressed weight ``NAME`` is stored as plain tensors ``NAME.lw.{field}``:

- ``header``: U8, a small JSON object: ``dtype`` (the checkpoint's), ``shape``, ``sparsity``
  (``"dense"``, ``"mask"`` or ``"N:M"``) and, when quantized, ``bits``, ``group_size``, ``scheme``;
- where the kept weights are (pruned only): ``mask`` U8, the keep-mask at 1 bit per weight
  (unstructured), or ``positions`` U8, for every group of M consecutive inputs of a row the in-group
  positions of its N kept weights, ascending, at ``ceil(log2 M)`` bits each (N:M; Mishra et al., 2021,
  arXiv 2104.08378). All streams are packed by :mod:`unweight.pack`;
- the kept weights, row-major (all of them when dense). Pruned only: ``values`` in the checkpoint dtype.
  Quantized (:mod:`unweight.quant.rtn`; GPTQ, Frantar et al., 2022, arXiv 2210.17323; AWQ, Lin et al.,
  2023, arXiv 2306.00978): ``q`` U8, their levels packed at ``bits``; ``scale`` F32 ``[rows, n_groups]``
  exactly as the quantizer computed it (never recomputed or rounded); ``zero`` the integer zero points
  packed at ``bits`` (``asym_int``), the F32 group minima (``asym_float``), or nothing (``sym``: the
  constant ``2**(bits-1)``); ``input_scale`` F32 ``[cols]`` for AWQ (dense ``W = dequant(q) / s``).
  Pruned and quantized: only the kept weights' levels are stored; a pruned weight sits on its group's
  zero point (exactly 0), which decode puts back. Quantized with ``--outliers`` (dense-and-sparse):
  ``outlier_idx`` I32 flat indices and ``outlier_val`` their values in the checkpoint dtype, written over
  the dequantized matrix (the header counts them).

Decode is :func:`unweight.layerwise.compress_linear`'s own arithmetic (``rtn_dequantize`` in float32,
divided by the input scale, cast to the checkpoint dtype), and :func:`encode_linear` decodes what it
wrote and refuses to write anything that would not come back bit for bit.

Bits per weight, every part counted (b bits, groups of g, kept fraction k, checkpoint dtype of d bits;
plus the header, ~100 bytes a matrix): pruned unstructured ``1 + k*d`` (50% of bf16: 9); N:M
``(N/M) * (ceil(log2 M) + d)`` (2:4 of bf16: 9); quantized ``b + (32 + b)/g`` (4-bit g128: 4.28, +32/rows
for AWQ); pruned and quantized ``1 + k*b + (32 + b)/g`` or ``(N/M) * (ceil(log2 M) + b) + (32 + b)/g``
(2:4 at 4 bits, g128: 3.28).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from unweight.errors import UnweightError
from unweight.formats import Format, Parts, quantization_config, register, same_bits
from unweight.layerwise import COMPUTE_DTYPES, LayerwiseConfig, LinearArtifacts
from unweight.outliers import restore
from unweight.pack import bits_needed, pack_bits, packed_nbytes, unpack_bits
from unweight.prune.nm import parse_pattern
from unweight.quant.rtn import GroupLevels, n_groups

FORMAT_VERSION = 1
TAG = "lw"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----------------------------------------------------------------------------- N:M positions

def nm_positions(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``[rows, cols // m, n]`` uint8: the ascending in-group positions of the kept weights of an
    exact N:M keep-mask (every group of ``m`` keeps exactly ``n``)."""
    rows, cols = mask.shape
    if cols % m:
        raise UnweightError(f"an {n}:{m} mask needs in_features divisible by {m}, got {cols}")
    grouped = mask.reshape(rows, cols // m, m)
    if not bool((grouped.sum(2) == n).all()):
        raise UnweightError(f"the keep-mask is not exactly {n}:{m} (some group keeps another count)")
    # a stable sort of "pruned" puts the kept positions first, in ascending order
    return torch.argsort((~grouped).to(torch.uint8), dim=2, stable=True)[..., :n].to(torch.uint8)


def nm_mask_from_positions(positions: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`nm_positions`: the ``[rows, cols]`` keep-mask."""
    rows, n_grp, _ = positions.shape
    mask = torch.zeros(rows, n_grp, m, dtype=torch.bool)
    mask.scatter_(2, positions.long(), True)
    if not bool((mask.sum(2) == n).all()):
        raise UnweightError(f"repeated positions in an {n}:{m} group")
    return mask.reshape(rows, n_grp * m)


# ----------------------------------------------------------------------------- encode / decode

def encode_linear(a: LinearArtifacts, weight: torch.Tensor, config: LayerwiseConfig, dtype: torch.dtype,
                  name: str = "weight") -> Parts:
    """The parts of one compressed Linear: ``a`` as :func:`compress_layerwise` recorded it, ``weight``
    the compressed weight the model holds, ``dtype`` the checkpoint's. Raises :class:`UnweightError`
    when the parts would not decode to ``weight.to(dtype)`` bit for bit."""
    weight = weight.detach().cpu()
    if weight.ndim != 2 or str(dtype).removeprefix("torch.") not in DTYPES:
        raise UnweightError(f"expected a 2-D {'/'.join(DTYPES)} weight, got {tuple(weight.shape)} {dtype}")
    rows, cols = weight.shape
    mask = None if a.mask is None else a.mask.to(torch.bool)
    h = {"dtype": str(dtype).removeprefix("torch."), "shape": [rows, cols], "sparsity": "dense"}
    parts: Parts = {"header": None}
    if mask is not None:
        if tuple(mask.shape) != (rows, cols):
            raise UnweightError(f"keep-mask {tuple(mask.shape)} does not fit weight {(rows, cols)}")
        if config.pattern:
            n, m = parse_pattern(config.pattern)
            h["sparsity"] = f"{n}:{m}"
            parts["positions"] = pack_bits(nm_positions(mask, n, m), bits_needed(m))
        else:
            h["sparsity"] = "mask"
            parts["mask"] = pack_bits(mask, 1)
    if a.q is None:
        if mask is None:
            raise UnweightError("nothing to store: the weight is neither pruned nor quantized")
        parts["values"] = weight[mask].to(dtype)
    else:
        bits, group_size, scheme = config.bits, config.group_size, config.scheme
        h.update(bits=bits, group_size=group_size, scheme=scheme, input_scale=a.input_scale is not None)
        levels = a.q
        if mask is not None:
            if not torch.equal(a.q[~mask], _per_weight(a.zero, cols, group_size)[~mask]):
                raise UnweightError("a pruned weight is not on its group's zero point: cannot store kept levels only")
            levels = a.q[mask]
        parts["q"] = pack_bits(levels, bits)
        parts["scale"] = a.scale.to(torch.float32).contiguous()
        if scheme == "asym_int":
            parts["zero"] = pack_bits(a.zero, bits)
        elif scheme == "asym_float":
            parts["zero"] = a.zero.to(torch.float32).contiguous()
        elif not bool((a.zero == 1 << (bits - 1)).all()):
            raise UnweightError(f"sym zero points must all be {1 << (bits - 1)}")
        if a.input_scale is not None:
            parts["input_scale"] = a.input_scale.to(torch.float32).contiguous()
        if a.outlier_idx is not None and a.outlier_idx.numel():
            h["outliers"] = int(a.outlier_idx.numel())
            parts["outlier_idx"] = a.outlier_idx.to(torch.int32).contiguous()
            parts["outlier_val"] = weight.reshape(-1)[a.outlier_idx].to(dtype).contiguous()
    parts["header"] = torch.frombuffer(bytearray(json.dumps(h, separators=(",", ":")).encode()), dtype=torch.uint8)
    if not same_bits(decode(parts, name), weight.to(dtype)):
        raise UnweightError("the stored weights would differ from the compressed model's: not written")
    return parts


@dataclass
class StoredLinear:
    """One encoded Linear, unpacked: its checkpoint dtype, sparsity (``"dense"``, ``"mask"`` or
    ``"N:M"``) and keep-mask, and either its kept ``values`` (pruned only) or its ``levels`` (quantized;
    every weight's level, a pruned weight on its group's zero point) and AWQ ``input_scale``."""

    dtype: torch.dtype
    shape: tuple[int, int]
    sparsity: str
    mask: torch.Tensor | None
    values: torch.Tensor | None
    levels: GroupLevels | None
    input_scale: torch.Tensor | None
    outlier_idx: torch.Tensor | None = None  # flat indices of the weights stored exactly
    outlier_val: torch.Tensor | None = None  # their values, in the checkpoint dtype

    def dense(self) -> torch.Tensor:
        if self.levels is None:
            w = torch.zeros(self.shape, dtype=self.dtype)
            w[self.mask] = self.values
            return w
        w = self.levels.dequantize()
        if self.input_scale is not None:
            w = w / self.input_scale[None, :]
        w = w.to(self.dtype)
        return w if self.outlier_idx is None else restore(w, self.outlier_idx, self.outlier_val)


def unpack_linear(parts: Parts, name: str) -> StoredLinear:
    """The parts of one encoded Linear, checked and unpacked (errors name ``name``)."""

    def bad(msg: str) -> UnweightError:
        return UnweightError(f"tensor {name!r}: {msg}")

    def need(field: str, nbytes: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        if field not in parts:
            raise bad(f"part {field!r} is missing")
        t = parts[field]
        if t.dtype != dtype or t.numel() * t.element_size() != nbytes:
            raise bad(f"part {field!r} holds {t.numel() * t.element_size()} bytes of {t.dtype}, expected "
                      f"{nbytes} of {dtype}: truncated or corrupt")
        return t.reshape(-1)

    try:
        h = json.loads(bytes(parts["header"].numpy()).decode())
        dtype, (rows, cols), sparsity = DTYPES[h["dtype"]], h["shape"], h["sparsity"]
        bits = h.get("bits")
        nm = None if sparsity in ("dense", "mask") else parse_pattern(sparsity)
    except (KeyError, ValueError, TypeError, UnicodeDecodeError, UnweightError) as exc:
        raise bad(f"corrupt or missing {TAG} header ({exc})") from None
    numel = rows * cols

    mask = None
    if sparsity == "mask":
        mask = unpack_bits(need("mask", packed_nbytes(numel, 1)), 1, numel).view(rows, cols).bool()
    elif nm is not None:
        n, m = nm
        if cols % m:
            raise bad(f"{n}:{m} sparsity on {cols} columns: corrupt header")
        count, width = numel // m * n, bits_needed(m)
        positions = unpack_bits(need("positions", packed_nbytes(count, width)), width, count)
        if count and int(positions.max()) >= m:
            raise bad(f"an {n}:{m} position is out of range: corrupt")
        try:
            mask = nm_mask_from_positions(positions.view(rows, cols // m, n), n, m)
        except UnweightError as exc:
            raise bad(f"{exc}: corrupt") from None
    kept = numel if mask is None else int(mask.sum())
    stored = StoredLinear(dtype, (rows, cols), sparsity, mask, None, None, None)

    if bits is None:
        if mask is None:
            raise bad("neither pruned nor quantized: corrupt header")
        stored.values = need("values", kept * dtype.itemsize, dtype)
        return stored
    bits, group_size, scheme = int(bits), int(h["group_size"]), h["scheme"]
    n_grp = n_groups(cols, group_size)
    scale = need("scale", 4 * rows * n_grp, torch.float32).view(rows, n_grp)
    if scheme == "asym_int":
        zero = unpack_bits(need("zero", packed_nbytes(rows * n_grp, bits)), bits, rows * n_grp).view(rows, n_grp)
    elif scheme == "asym_float":
        zero = need("zero", 4 * rows * n_grp, torch.float32).view(rows, n_grp)
    elif scheme == "sym":
        zero = torch.full((rows, n_grp), 1 << (bits - 1), dtype=torch.uint8)
    else:
        raise bad(f"unknown scheme {scheme!r}: corrupt header")
    levels = unpack_bits(need("q", packed_nbytes(kept, bits)), bits, kept)
    if mask is None:
        q = levels.view(rows, cols)
    else:
        if zero.is_floating_point():
            raise bad("pruned weights need an integer zero point: corrupt header")
        q = _per_weight(zero, cols, group_size).clone()
        q[mask] = levels
    stored.levels = GroupLevels(q, scale, zero, bits, group_size, scheme)
    if h.get("input_scale"):
        stored.input_scale = need("input_scale", 4 * cols, torch.float32)
    if h.get("outliers"):
        n_out = int(h["outliers"])
        idx = need("outlier_idx", 4 * n_out, torch.int32).long()
        if n_out and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise bad("an outlier index is out of range: corrupt")
        stored.outlier_idx, stored.outlier_val = idx, need("outlier_val", n_out * dtype.itemsize, dtype)
    return stored


def decode(parts: Parts, name: str) -> torch.Tensor:
    """The dense weight (checkpoint dtype) of one encoded Linear."""
    return unpack_linear(parts, name).dense()


def _per_weight(per_group: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """``[rows, n_groups]`` -> ``[rows, cols]``: each group's value over its columns."""
    g = cols if group_size <= 0 or group_size >= cols else group_size
    return per_group.repeat_interleave(g, dim=1)[:, :cols]


FORMAT = register(Format(quant_method="unweight-layerwise", tag=TAG, version=FORMAT_VERSION, decode=decode,
                         description="pruned (keep-mask or N:M positions) and/or quantized (packed levels, "
                                     "scales, zeros, AWQ input scales) Linears, exactly as compressed"))


# ----------------------------------------------------------------------------- a whole model

def layerwise_encoder(src: str | os.PathLike, config: LayerwiseConfig, progress: bool = True,
                      config_for: Callable[[str], LayerwiseConfig] | None = None, device: str | None = None):
    """Compress the causal LM in the HF folder ``src`` with ``config`` (calibrated on ``config.n_samples``
    windows of ``config.seq_len``); returns ``(encode, model)``: ``encode(name, tensor)`` for
    :func:`unweight.formats.compress_checkpoint` (parts for every compressed Linear weight, None for the
    rest), and the compressed model, whose weights are exactly what the written folder loads as.
    ``config_for``: each Linear's own config; ``device``: where each block is calibrated and compressed,
    the model staying on the CPU (both as :func:`unweight.layerwise.compress_layerwise` takes them)."""
    from unweight.checkpoint import ST_DTYPES, open_checkpoint
    from unweight.layerwise import compress_layerwise
    from unweight.models import load_causal_lm

    ckpt = open_checkpoint(src)
    if quantization_config(ckpt) is not None:
        raise UnweightError(f"{ckpt.path}: already compressed by unweight; decompress it first")
    arch = (ckpt.config or {}).get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in arch):
        raise UnweightError(f"{ckpt.path}: {', '.join(arch) or 'no architecture'} is not a causal language "
                            f"model; {config.describe()} needs one (it calibrates on next-token text)")
    infos = [ckpt.info(n) for n in ckpt.names()]
    matrix_dtypes = {ST_DTYPES[i.dtype] for i in infos if len(i.shape) == 2 and i.dtype in ("F32", "F16", "BF16")}
    weight_dtype = matrix_dtypes.pop() if len(matrix_dtypes) == 1 else None  # else: stored as .to(dtype)
    compute = COMPUTE_DTYPES[config.compute_dtype]
    if config.calibrated and compute != torch.float32 and weight_dtype != compute:
        raise UnweightError(f"{ckpt.path}: --compute-dtype {config.compute_dtype} needs a {config.compute_dtype} "
                            f"checkpoint; its matrices are {weight_dtype or 'of several dtypes'}")
    # a 16-bit checkpoint is held in its own dtype (half the memory of float32) and each block is
    # computed in float32 while it is compressed (the same figures as a float32 model, bit for bit),
    # or in its own dtype with --compute-dtype bfloat16
    hold = weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else None
    model, tok = load_causal_lm(str(ckpt.path), dtype=hold)
    artifacts: dict[str, LinearArtifacts] = {}
    compress_layerwise(model, tok, config, artifacts=artifacts, weight_dtype=weight_dtype, progress=progress,
                       config_for=config_for, compute_dtype=None if hold in (None, compute) else torch.float32,
                       device=device)
    names, params = set(ckpt.names()), dict(model.named_parameters())
    missing = [f"{m}.weight" for m in artifacts if f"{m}.weight" not in names or f"{m}.weight" not in params]
    if missing:
        raise UnweightError(f"{ckpt.path}: compressed Linears have no checkpoint tensor of the same name "
                            f"({', '.join(missing[:3])}...)")

    def encode(name: str, t: torch.Tensor) -> Parts | None:
        module = name.removesuffix(".weight")
        if module == name or module not in artifacts:
            return None
        own = config if config_for is None else config_for(module)
        return encode_linear(artifacts[module], params[name], own, t.dtype, name)

    return encode, model


def quantization_entries(config: LayerwiseConfig, method: str) -> dict:
    """What the output's ``quantization_config`` records besides the format name and version."""
    calibration = {"corpus": "austen/calib", "samples": config.n_samples, "seq_len": config.seq_len}
    return {"method": method, "describe": config.describe(), "layerwise": asdict(config),
            "calibration": calibration if config.calibrated else None}
