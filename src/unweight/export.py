"""Export to compressed-tensors ``pack-quantized``, the format vLLM serves (transformers loads it too,
with the ``compressed-tensors`` package installed).

A group-quantized Linear ``M`` (RTN from ``unweight-codebook``; GPTQ, RTN and pruned-and-quantized
results from ``unweight-layerwise``) becomes four plain tensors:

- ``M.weight_packed`` I32 ``[rows, ceil(cols * bits / 32)]``: every level at ``bits`` bits, element i of
  a row at bits ``[i * bits, (i + 1) * bits)`` of the row's little-endian int32 words. compressed-tensors
  stores a signed level plus ``2**(bits - 1)``, which is exactly unweight's unsigned level;
- ``M.weight_scale`` F32 ``[rows, n_groups]``: the scales exactly as stored (llm-compressor writes them
  in the model dtype; vLLM casts either on load). Kept in float32 so that dequantization,
  ``(q - z) * s`` in float32 in both libraries, gives the very weights unweight loads;
- ``M.weight_zero_point`` (asymmetric only): the integer zero points, packed the same way along the
  output dimension, ``[ceil(rows * bits / 32), n_groups]``;
- ``M.weight_shape`` I64 ``[rows, cols]``.

One config group per (bits, strategy, group size, symmetry), targeting its modules by name. Pruned
Linears are recorded in ``sparsity_config`` (format ``dense``: the zeros are stored, as vLLM's dense
kernels expect) with their structure (``N:M`` or ``unstructured``) and the global sparsity; an N:M
pattern is verified on the exported levels before anything is written.

Not exportable, with the reason in the error: K-means codebooks (no compressed-tensors format holds a
codebook), float zero points (``asym_float``), AWQ input scales (they would have to be folded into the
preceding layer, which is not implemented), exact outliers, and groups that do not divide a matrix's
input dimension (compressed-tensors requires it: smollm2's 576 at group 128 fails; group 64 works).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from unweight.checkpoint import CheckpointWriter, open_checkpoint
from unweight.convert import copy_side_files
from unweight.errors import UnweightError
from unweight.formats import get_format, group_parts, quantization_config
from unweight.pack import pack_bits
from unweight.prune.nm import parse_pattern
from unweight.quant.rtn import GroupLevels, n_groups

CT_VERSION = "0.20.0"  # the compressed-tensors release the export is verified against (tests)
FORMATS = ("compressed-tensors",)


def pack_int32(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing along dim 1: uint8 levels ``[rows, cols]`` in ``[0, 2**bits)``
    -> int32 ``[rows, ceil(cols * bits / 32)]``. unweight's bit stream has the same bit order, so a row
    padded to 32 elements (32 * bits bits, whole words) packs to whole little-endian words."""
    rows, cols = levels.shape
    padded = -(-cols // 32) * 32
    if padded != cols:
        levels = torch.cat([levels, levels.new_zeros(rows, padded - cols)], dim=1)
    words = pack_bits(levels.contiguous(), bits).view(torch.int32).view(rows, padded * bits // 32)
    return words[:, :-(-cols * bits // 32)].contiguous()


@dataclass
class ExportStats:
    quantized: int = 0  # Linears exported as pack-quantized
    pruned: int = 0  # Linears with a recorded sparsity structure
    copied: int = 0  # tensors copied as they are
    groups: dict = field(default_factory=dict)  # config group name -> its weights scheme and #targets
    sparsity: dict | None = None


def _scheme(lv: GroupLevels, cols: int) -> tuple:
    if lv.scheme == "asym_float":
        raise UnweightError("float zero points (scheme asym_float) have no compressed-tensors form; "
                            "compress with --scheme asym_int or sym")
    channel = n_groups(cols, lv.group_size) == 1
    if not channel and cols % lv.group_size:
        raise UnweightError(f"group size {lv.group_size} does not divide the {cols} input columns, which "
                            f"compressed-tensors requires; compress with a group size that divides every "
                            f"matrix's input dimension (or 0: one group per row)")
    return lv.bits, "channel" if channel else "group", None if channel else lv.group_size, lv.scheme == "sym"


def _stored(fmt_name: str, parts: dict, name: str):
    """``(levels, mask, sparsity, dense)`` of one encoded tensor (the dense weights as unweight loads
    them), or an error saying why it cannot be exported."""
    if fmt_name == "unweight-codebook":
        from unweight.cluster.codebook import decode, rtn_levels

        if "outlier_idx" in parts:
            raise UnweightError("exact outliers have no compressed-tensors form; compress without --outliers")
        lv = rtn_levels(parts, name)
        if lv is None:
            raise UnweightError("K-means codebooks have no compressed-tensors form (it holds integer "
                                "levels only); export RTN, GPTQ or pruned results")
        return lv, None, "dense", decode(parts, name)
    from unweight.layerwise_format import unpack_linear

    s = unpack_linear(parts, name)
    if s.outlier_idx is not None:
        raise UnweightError("exact outliers have no compressed-tensors form; compress without --outliers")
    if s.input_scale is not None:
        raise UnweightError("AWQ input scales would have to be folded into the preceding layer, which "
                            "the export does not do yet")
    return s.levels, s.mask, s.sparsity, s.dense()


def _check_pattern(dense: torch.Tensor, pattern: str) -> None:
    n, m = parse_pattern(pattern)
    rows, cols = dense.shape
    nonzero = (dense != 0).reshape(rows, cols // m, m).sum(2)
    if bool((nonzero > n).any()):
        raise UnweightError(f"the exported weights break the {pattern} pattern: not written")


def export_compressed_tensors(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                              progress: bool = True) -> ExportStats:
    """Write the unweight-compressed folder ``src`` as a compressed-tensors ``pack-quantized`` folder."""
    ckpt = open_checkpoint(src)
    qc = quantization_config(ckpt)
    if qc is None or qc["quant_method"] not in ("unweight-codebook", "unweight-layerwise"):
        found = qc["quant_method"] if qc else "not compressed"
        raise UnweightError(f"{ckpt.path}: export takes a folder written by `unweight compress --method "
                            f"rtn|gptq|magnitude|wanda|sparsegpt` ({found})")
    fmt = get_format(qc["quant_method"])
    groups, _ = group_parts(ckpt.names(), fmt.tag)
    marker = f".{fmt.tag}."
    stats, schemes, structures = ExportStats(), {}, {}
    pruned_zeros = pruned_total = 0
    with CheckpointWriter(out, overwrite=overwrite) as w:
        copy_side_files(ckpt.path, w.folder)
        for name in tqdm(ckpt.names(), desc="export (compressed-tensors)", unit="tensor", disable=not progress):
            base = name.rsplit(marker, 1)[0] if marker in name else None
            if base is None:
                w.add(name, ckpt.get(name))
                stats.copied += 1
                continue
            if base not in groups:
                continue  # a later part of a tensor already exported
            parts = {p.rsplit(marker, 1)[1]: ckpt.get(p) for p in groups.pop(base)}
            module = base.removesuffix(".weight")
            try:
                levels, mask, sparsity, dense = _stored(fmt.quant_method, parts, base)
                if mask is not None:
                    if sparsity != "mask":
                        _check_pattern(dense, sparsity)
                    structures.setdefault("unstructured" if sparsity == "mask" else sparsity, []).append(module)
                    pruned_zeros += int((~mask).sum())
                    pruned_total += mask.numel()
                    stats.pruned += 1
                if levels is None:  # pruned only: dense weights
                    w.add(base, dense)
                    continue
                rows, cols = levels.q.shape
                schemes.setdefault(_scheme(levels, cols), []).append(module)
            except UnweightError as exc:
                raise UnweightError(f"{ckpt.path}: tensor {base!r}: {exc}") from None
            w.add(f"{module}.weight_packed", pack_int32(levels.q, levels.bits))
            w.add(f"{module}.weight_scale", levels.scale.to(torch.float32).contiguous())
            w.add(f"{module}.weight_shape", torch.tensor([rows, cols], dtype=torch.int64))
            if levels.scheme != "sym":
                w.add(f"{module}.weight_zero_point", pack_int32(levels.zero.T.contiguous(), levels.bits).T.contiguous())
            stats.quantized += 1
        if len(structures) > 1:
            raise UnweightError(f"{ckpt.path}: mixed sparsity structures {sorted(structures)}: "
                                f"compressed-tensors records one per model")
        ct = _config(schemes, structures, pruned_zeros / pruned_total if pruned_total else 0.0, stats)
        cfg = dict(ckpt.config or {})
        cfg["quantization_config"] = ct
        (w.folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return stats


def _config(schemes: dict, structures: dict, global_sparsity: float, stats: ExportStats) -> dict:
    config_groups = {}
    for i, ((bits, strategy, group_size, symmetric), targets) in enumerate(sorted(schemes.items(), key=str)):
        weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
                   "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax",
                   "observer_kwargs": {}, "block_structure": None}
        config_groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                       "output_activations": None, "format": "pack-quantized"}
        stats.groups[f"group_{i}"] = {**weights, "modules": len(targets)}
    ct = {"quant_method": "compressed-tensors", "format": "pack-quantized" if config_groups else "dense",
          "quantization_status": "compressed", "config_groups": config_groups, "ignore": [],
          "kv_cache_scheme": None, "global_compression_ratio": None, "version": CT_VERSION}
    if structures:
        (structure, targets), = structures.items()
        stats.sparsity = {"format": "dense", "sparsity_structure": structure, "targets": targets, "ignore": [],
                          "global_sparsity": global_sparsity}
        ct["sparsity_config"] = stats.sparsity
    return ct
