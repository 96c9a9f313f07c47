"""The registry of unweight's on-disk formats, and the per-tensor stream that writes and reads them.

A compressed model is an ordinary HF folder (DESIGN.md, "On-disk format"): ``config.json`` carries a
``quantization_config`` whose ``quant_method`` names the format, and the safetensors shards hold only
plain tensors. A tensor ``name`` that a format encodes is stored as parts named
``{name}.{tag}.{field}`` (``tag`` is the format's, e.g. ``ul`` for lossless, ``cb`` for codebooks);
tensors the format leaves alone are stored as they are.

A :class:`Format` is two pure functions: ``encode(tensor) -> {field: tensor}`` and
``decode({field: tensor}, name) -> tensor``. :func:`compress_checkpoint` streams a checkpoint through
``encode`` one tensor at a time (memory bounded by the largest tensor); :func:`decode_tensors` turns a
compressed folder's tensors back into the dense state dict, for ``decompress``, ``verify`` and loading
through transformers (``unweight.hf``). A format may also decode many tensors at once on a device
(``decode_on``: the CPU on all threads, or a GPU), which ``unweight.hf`` uses where a whole model decodes on one,
and :func:`load_state_dict` to put a whole checkpoint on a device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from unweight.checkpoint import Checkpoint, CheckpointWriter, open_checkpoint
from unweight.convert import copy_side_files
from unweight.errors import UnweightError

Parts = dict[str, torch.Tensor]


@dataclass
class Format:
    quant_method: str  # the name in config.json's quantization_config, e.g. "unweight-lossless"
    tag: str  # the part infix: parts of tensor NAME are NAME.{tag}.{field}
    version: int
    decode: Callable[[Parts, str], torch.Tensor]
    description: str = ""
    # decodes tensors ({name: parts}) on a device (the CPU, or straight onto an accelerator) all at once, each in
    # memory of its own; returns None where it cannot there. None: the format decodes tensor by tensor on the CPU
    # (its tensors are then moved)
    decode_on: Callable[[dict[str, Parts], torch.device], dict[str, torch.Tensor] | None] | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    from unweight.hf import register_quant_method

    FORMATS[fmt.quant_method] = fmt
    register_quant_method(fmt.quant_method)  # so transformers loads it too
    return fmt


def get_format(quant_method: str) -> Format:
    _load_builtin_formats()
    if quant_method not in FORMATS:
        raise UnweightError(f"unknown unweight format {quant_method!r}; known: {', '.join(FORMATS) or 'none'}")
    return FORMATS[quant_method]


def _load_builtin_formats() -> None:
    """Import the modules that register the built-in formats (kept lazy: they pull in numba)."""
    import importlib

    for module in ("unweight.lossless.register", "unweight.cluster.codebook", "unweight.layerwise_format"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def part_name(name: str, tag: str, fld: str) -> str:
    return f"{name}.{tag}.{fld}"


def group_parts(names: list[str], tag: str) -> tuple[dict[str, list[str]], list[str]]:
    """Split stored tensor names into {encoded tensor name: [its part names]} and plain names."""
    marker = f".{tag}."
    groups: dict[str, list[str]] = {}
    plain = []
    for n in names:
        if marker in n:
            groups.setdefault(n.rsplit(marker, 1)[0], []).append(n)
        else:
            plain.append(n)
    return groups, plain


def quantization_config(ckpt: Checkpoint) -> dict | None:
    qc = (ckpt.config or {}).get("quantization_config")
    if qc and str(qc.get("quant_method", "")).startswith("unweight-"):
        return qc
    return None


def readable_format(ckpt: Checkpoint, qc: dict) -> Format:
    """The format of a checkpoint whose quantization_config is ``qc``, refused when its folder version is newer
    than this unweight reads."""
    fmt = get_format(qc["quant_method"])
    if int(qc.get("format_version", fmt.version)) > fmt.version:
        raise UnweightError(f"{ckpt.path}: {fmt.quant_method} format version {qc['format_version']} is newer "
                            f"than this unweight reads ({fmt.version}); upgrade unweight")
    return fmt


def iter_decoded(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, dense tensor) for every tensor of a checkpoint, decoding unweight parts on the way."""
    qc = quantization_config(ckpt)
    if qc is None:
        yield from ckpt.items()
        return
    fmt = readable_format(ckpt, qc)

    def decode(name: str, names: list[str]) -> torch.Tensor:
        parts = _read_parts(ckpt, fmt, names)  # (a read's error names the file already)
        try:
            return fmt.decode(parts, name)
        except UnweightError as exc:
            raise UnweightError(f"{ckpt.path}: {exc}") from None
    yield from _stored_order(ckpt, fmt, decode)


def _stored_order(ckpt: Checkpoint, fmt: Format, decode: Callable[[str, list[str]], torch.Tensor]):
    """(name, tensor) in the checkpoint's stored order: a plain tensor as stored, an encoded one as
    ``decode(name, its parts' names)`` at its first part."""
    groups, _ = group_parts(ckpt.names(), fmt.tag)
    marker = f".{fmt.tag}."
    for name in ckpt.names():
        base = name.rsplit(marker, 1)[0] if marker in name else None
        if base is None:
            yield name, ckpt.get(name)
        elif base in groups:
            yield base, decode(base, groups.pop(base))


def _read_parts(ckpt: Checkpoint, fmt: Format, names: list[str]) -> Parts:
    """The parts stored under ``names``, by field."""
    return {p.rsplit(f".{fmt.tag}.", 1)[1]: ckpt.get(p) for p in names}


def decode_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense state dict of a (possibly compressed) checkpoint."""
    return dict(iter_decoded(open_checkpoint(path)))


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The dense state dict of the checkpoint at ``path`` on ``device``, in its stored order. A format that
    decodes many tensors at once there (``decode_on``: ``unweight-lossless``'s Triton decoder on a CUDA GPU,
    its threads on the CPU) decodes all of them together, only the compressed bytes crossing to a GPU; any other
    checkpoint decodes as :func:`iter_decoded` does, tensor by tensor on the CPU, and is moved. Errors name the
    checkpoint and the tensor."""
    ckpt, device = open_checkpoint(path), torch.device(device)
    qc = quantization_config(ckpt)
    fmt = readable_format(ckpt, qc) if qc is not None else None
    decoded = None
    if fmt is not None and fmt.decode_on is not None:
        groups, _ = group_parts(ckpt.names(), fmt.tag)
        encoded = {n: _read_parts(ckpt, fmt, parts) for n, parts in groups.items()}
        try:
            decoded = fmt.decode_on(encoded, device)
        except UnweightError as exc:
            raise UnweightError(f"{ckpt.path}: {exc}") from None
    if decoded is None:
        return {k: t.to(device) for k, t in iter_decoded(ckpt)}
    return {k: t.to(device) for k, t in _stored_order(ckpt, fmt, lambda name, parts: decoded.pop(name))}


@dataclass
class CompressStats:
    tensors: int = 0
    encoded: int = 0
    weights: int = 0  # elements of the encoded tensors
    original_bytes: int = 0  # all tensors, as stored in the source
    stored_bytes: int = 0  # all tensors, as written
    encoded_original_bytes: int = 0
    encoded_stored_bytes: int = 0
    per_tensor: list[dict] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0

    @property
    def bits_per_weight(self) -> float:
        """Bits per encoded weight, every part (codebooks, offsets, headers) included."""
        return 8 * self.encoded_stored_bytes / self.weights if self.weights else float("nan")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def compress_checkpoint(src: str | os.PathLike, out: str | os.PathLike, fmt: Format,
                        encode: Callable[[str, torch.Tensor], Parts | None], config: dict,
                        overwrite: bool = False, progress: bool = True) -> CompressStats:
    """Stream ``src`` through ``encode`` into an HF folder at ``out`` in format ``fmt``.

    ``encode(name, tensor)`` returns the parts of an encoded tensor, or None to store it as it is.
    ``config`` (JSON-able) becomes the ``quantization_config``, with ``quant_method`` and
    ``format_version`` added. Side files (config, tokenizer) are copied from an HF folder source.
    """
    ckpt = open_checkpoint(src)
    if quantization_config(ckpt) is not None:
        raise UnweightError(f"{ckpt.path}: already compressed by unweight; decompress it first")
    if ckpt.format != "hf":
        raise UnweightError(f"{ckpt.path}: compress takes an HF folder; run `unweight convert` first")
    stats = CompressStats()
    qc = {"quant_method": fmt.quant_method, "format_version": fmt.version, **config}
    with CheckpointWriter(out, overwrite=overwrite, metadata={"unweight_format": fmt.quant_method,
                                                              "unweight_format_version": str(fmt.version)}) as w:
        copy_side_files(ckpt.path, w.folder)
        cfg = dict(ckpt.config or {})
        cfg["quantization_config"] = qc
        (w.folder / "config.json").write_text(json.dumps(cfg, indent=2))
        for name in tqdm(ckpt.names(), desc=f"compress ({fmt.quant_method})", unit="tensor", disable=not progress):
            t = ckpt.get(name)
            try:
                parts = encode(name, t)
            except UnweightError as exc:
                raise UnweightError(f"{ckpt.path}: tensor {name!r}: {exc}") from None
            stats.tensors += 1
            stats.original_bytes += nbytes(t)
            if parts is None:
                w.add(name, t)
                stats.stored_bytes += nbytes(t)
                continue
            stored = 0
            for fld, p in parts.items():
                w.add(part_name(name, fmt.tag, fld), p)
                stored += nbytes(p)
            stats.encoded += 1
            stats.weights += t.numel()
            stats.stored_bytes += stored
            stats.encoded_original_bytes += nbytes(t)
            stats.encoded_stored_bytes += stored
            stats.per_tensor.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."),
                                     "shape": list(t.shape), "bytes": nbytes(t), "stored": stored,
                                     "ratio": stored / nbytes(t) if nbytes(t) else 1.0})
    return stats


def decompress_checkpoint(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                          progress: bool = True) -> int:
    """Write the dense HF folder of a compressed one; returns the number of tensors written."""
    ckpt = open_checkpoint(src)
    if quantization_config(ckpt) is None:
        raise UnweightError(f"{ckpt.path}: not an unweight-compressed folder (no unweight quantization_config)")
    n = 0
    with CheckpointWriter(out, overwrite=overwrite) as w:
        copy_side_files(ckpt.path, w.folder)
        cfg = dict(ckpt.config)
        cfg.pop("quantization_config", None)
        (w.folder / "config.json").write_text(json.dumps(cfg, indent=2))
        for name, t in tqdm(iter_decoded(ckpt), desc="decompress", unit="tensor", disable=not progress):
            w.add(name, t)
            n += 1
    return n


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))

