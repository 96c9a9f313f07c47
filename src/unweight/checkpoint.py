"""Lazy, per-tensor access to checkpoints, and a streaming, atomic safetensors writer.

Readers (:func:`open_checkpoint`) take a Hugging Face folder (one or many safetensors shards with their
index), a single ``.safetensors`` file, or a ``.gguf`` file (tensors dequantized one at a time and
named as transformers names them). Nothing is loaded until a tensor is asked for, so every per-tensor
pass over a model (lossless coding, K-means, rounding, analysis) holds one tensor at a time.

:class:`CheckpointWriter` writes sharded safetensors plus the index. Each tensor's bytes go straight to
a scratch file as they arrive; a shard is assembled (header, then the scratch bytes copied in blocks)
when it is full. Peak memory is the largest tensor. Everything is written under a temporary name
beside the output and renamed into place only when complete: a failure leaves the previous output
(if any) as it was and nothing half-written.

Pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``, ``.pkl``) are refused: unweight never unpickles.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from unweight.errors import UnweightError

# safetensors dtype names <-> torch dtypes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 << 30  # 2 GiB, as transformers writes them
MAX_HEADER_BYTES = 100 << 20  # a larger safetensors header is corrupt
COPY_BLOCK = 16 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name, or the GGUF quantization type for GGUF tensors
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Stored bytes (safetensors dtypes only)."""
        return self.numel * ST_DTYPES[self.dtype].itemsize


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnweightError(
            f"{path}: refusing to open a pickle-based checkpoint (unweight never unpickles untrusted "
            "files); convert it to safetensors first"
        )


# --------------------------------------------------------------------------------------------------
# safetensors


class SafetensorsFile:
    """One safetensors file, its header parsed and checked against the file size; tensors read lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise UnweightError(f"{self.path}: truncated safetensors file (no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES or 8 + n > size:
                    raise UnweightError(f"{self.path}: corrupt safetensors header length {n} (file is {size} bytes)")
                raw = f.read(n)
        except OSError as exc:
            raise UnweightError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise UnweightError(f"{self.path}: corrupt safetensors header: {exc}") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        data_len = size - self.data_start
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise UnweightError(f"{self.path}: corrupt safetensors header entry for tensor {name!r}") from None
            if dtype not in ST_DTYPES:
                raise UnweightError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            numel = int(np.prod(shape)) if shape else 1
            if not (0 <= begin <= end <= data_len) or end - begin != numel * ST_DTYPES[dtype].itemsize:
                raise UnweightError(
                    f"{self.path}: tensor {name!r} lies outside the file or has the wrong size "
                    f"(offsets {begin}..{end}, data is {data_len} bytes): truncated or corrupt"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=ST_DTYPES[dtype])
        # read, not memory-mapped: the pages of a mapping count in the process's RSS for as long as it
        # lives, so streaming a whole file through a map held every tensor read so far (+536 MB of
        # peak RSS compressing gemma3-270m)
        raw = np.empty(end - begin, np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.data_start + begin)
                got = f.readinto(memoryview(raw))
        except OSError as exc:
            raise UnweightError(f"{self.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None
        if got != raw.size:
            raise UnweightError(f"{self.path}: tensor {name!r} is cut short (file truncated while reading)")
        return torch.from_numpy(raw).view(ST_DTYPES[dtype]).reshape(shape)

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as a copy-on-write mapping of its bytes in the file: no copy, its pages shared with the
        page cache (and with other readers of the file, transformers' loader among them) until written, each call
        a mapping of its own. The pages count in the process's RSS while the tensor lives; :meth:`get` for
        streaming through a file."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=ST_DTYPES[dtype])
        try:
            raw = np.memmap(self.path, np.uint8, mode="c", offset=self.data_start + begin, shape=(end - begin,))
        except ValueError:  # numpy's word for a mapping past the end of the file
            raise UnweightError(f"{self.path}: tensor {name!r} is cut short (file truncated while mapping)") from None
        except OSError as exc:
            raise UnweightError(f"{self.path}: cannot map tensor {name!r}: {exc.strerror or exc}") from None
        return torch.from_numpy(raw).view(ST_DTYPES[dtype]).reshape(shape)


# --------------------------------------------------------------------------------------------------
# readers


class Checkpoint:
    """Per-tensor access to a model's weights. ``format`` is ``hf``, ``safetensors`` or ``gguf``."""

    path: Path
    format: str
    config: dict | None
    metadata: dict[str, str]

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``get(name)`` with floating-point tensors cast to ``dtype`` (integer tensors as stored)."""
        t = self.get(name)
        return t.to(dtype) if t.is_floating_point() else t

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())

    def _missing(self, name: str) -> UnweightError:
        return UnweightError(f"{self.path}: no tensor named {name!r}")


class SafetensorsCheckpoint(Checkpoint):
    """A single ``.safetensors`` file, or an HF folder of one or many shards."""

    def __init__(self, path: Path, files: list[Path], weight_map: dict[str, str] | None = None):
        self.path = path
        self.format = "hf" if path.is_dir() else "safetensors"
        self.files = {f.name: SafetensorsFile(f) for f in files}
        self._where: dict[str, SafetensorsFile] = {}
        for st in self.files.values():
            for name in st.entries:
                self._where[name] = st
        if weight_map is not None:
            for name, shard in weight_map.items():
                if shard not in self.files:
                    raise UnweightError(f"{path / INDEX_NAME}: tensor {name!r} maps to missing shard {shard}")
                if name not in self.files[shard].entries:
                    raise UnweightError(f"{path / shard}: tensor {name!r} listed in the index is missing")
        self.metadata = next(iter(self.files.values())).metadata if self.files else {}
        cfg = path / "config.json" if path.is_dir() else None
        self.config = _read_json(cfg) if cfg is not None and cfg.exists() else None

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise self._missing(name)
        dtype, shape, _, _ = self._where[name].entries[name]
        return TensorInfo(name, dtype, shape)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise self._missing(name)
        return self._where[name].get(name)


class GgufCheckpoint(Checkpoint):
    """A ``.gguf`` file, tensors dequantized to float32 one at a time and named as transformers names them.

    The name mapping and the per-architecture fix-ups (llama's q/k permutation, gemma's norm offset)
    are transformers' own (``modeling_gguf_pytorch_utils``), applied tensor by tensor so that memory
    stays bounded by the largest tensor.
    """

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        self.format = "gguf"
        self.metadata = {}
        try:
            self.reader = GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on corrupt files
            raise UnweightError(f"{path}: not a readable GGUF file: {exc}") from None
        self._tensors = {t.name: t for t in self.reader.tensors}
        arch = self.reader.fields.get("general.architecture")
        self.architecture = bytes(arch.parts[arch.data[0]]).decode("utf-8") if arch else ""
        # The metadata (a 262k-token vocabulary is ~700 MB of numpy views) is parsed again by
        # transformers when needed; the tensors' memmaps are all this reader has to keep.
        self.reader.fields.clear()
        self._config = None
        self._hf_config = None
        self._map = None  # gguf name -> hf name

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = self.hf_config().to_dict()
        return self._config

    def hf_config(self):
        """transformers' config of this GGUF (parsed once; a copy, so callers may change it)."""
        import copy

        from transformers import AutoConfig

        if self._hf_config is None:
            try:
                self._hf_config = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except (ValueError, KeyError, NotImplementedError) as exc:
                raise UnweightError(f"{self.path}: transformers cannot read this GGUF architecture: {exc}") from None
        return copy.deepcopy(self._hf_config)

    def _mapping(self) -> tuple[dict[str, str], object]:
        if self._map is None:
            from transformers import AutoModelForCausalLM
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, load_gguf_checkpoint)

            import gc

            parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
            processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=parsed)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.hf_config())
            self._map = (get_gguf_hf_weights_map(model, processor), processor)
            del parsed, model
            gc.collect()  # the metadata parse is transient: release it before any tensor is read
        return self._map

    def gguf_names(self) -> list[str]:
        return list(self._tensors)

    def names(self) -> list[str]:
        mapping, _ = self._mapping()
        return [mapping[n] for n in self._tensors if n in mapping]

    def _gguf_name(self, name: str) -> str:
        mapping, _ = self._mapping()
        for g, h in mapping.items():
            if h == name and g in self._tensors:
                return g
        raise self._missing(name)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[self._gguf_name(name)]
        return TensorInfo(name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))

    def get_as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized straight into ``dtype``, row block by row block, when the architecture's tensor
        processor leaves the tensor as it is (tried on the first block): the float32 tensor never
        exists whole. Otherwise (a processor that permutes or shifts it), ``get`` then cast."""
        g = self._gguf_name(name)
        t = self._tensors[g]
        if dtype == torch.float32 or t.data.ndim < 2 or t.data.shape[0] <= DEQUANT_ROWS:
            return super().get_as(name, dtype)
        mapping, processor = self._mapping()
        blocks = _row_blocks(t.data, t.tensor_type)
        try:
            _, first = next(blocks)
            probe = processor.process(weights=first, name=g, tensor_key_mapping=mapping,
                                      parsed_parameters={}).weights
        except Exception:  # noqa: BLE001  (any trouble: take the general path, which reports it)
            return super().get_as(name, dtype)
        if probe is not first:
            return super().get_as(name, dtype)
        out = torch.empty((t.data.shape[0], *first.shape[1:]), dtype=dtype)
        for start, block in itertools.chain([(0, first)], blocks):
            out[start:start + len(block)] = torch.from_numpy(np.require(block, requirements="W")).to(dtype)
        return out

    def get(self, name: str) -> torch.Tensor:
        g = self._gguf_name(name)
        t = self._tensors[g]
        mapping, processor = self._mapping()
        try:
            w = _dequantize_rows(t.data, t.tensor_type)
        except NotImplementedError:
            raise UnweightError(
                f"{self.path}: tensor {g!r} has GGUF type {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        w = processor.process(weights=w, name=g, tensor_key_mapping=mapping, parsed_parameters={}).weights
        if not (isinstance(w, np.ndarray) and w.dtype == np.float32 and w.flags.writeable):
            w = np.array(w, dtype=np.float32)  # a private, writable copy
        return torch.from_numpy(w)


DEQUANT_ROWS = 8192  # rows dequantized at a time: gguf's temporaries stay ~ a few MB, not ~3x the tensor


def _row_blocks(data: np.ndarray, qtype) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, float32 block)``: ``gguf.dequantize`` of a tensor by blocks of
    :data:`DEQUANT_ROWS` rows (one block when it has no more rows, or fewer than two dimensions)."""
    from gguf import dequantize

    if data.ndim < 2 or data.shape[0] <= DEQUANT_ROWS:
        yield 0, np.asarray(dequantize(data, qtype), dtype=np.float32)
        return
    for start in range(0, data.shape[0], DEQUANT_ROWS):
        yield start, np.asarray(dequantize(data[start:start + DEQUANT_ROWS], qtype), dtype=np.float32)


def _dequantize_rows(data: np.ndarray, qtype) -> np.ndarray:
    """``gguf.dequantize`` of a whole tensor, row block by row block, into one private float32 array.

    gguf dequantizes a whole tensor at once through several full-size temporaries; done by blocks of
    :data:`DEQUANT_ROWS` rows, the peak is the float32 result plus one block's temporaries."""
    blocks = _row_blocks(data, qtype)
    _, first = next(blocks)
    if data.ndim < 2 or data.shape[0] <= DEQUANT_ROWS:
        return np.array(first)  # private: the processors may change it in place
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    for start, block in itertools.chain([(0, first)], blocks):
        out[start:start + len(block)] = block
    return out


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open an HF folder, a ``.safetensors`` file or a ``.gguf`` file for per-tensor reading."""
    p = Path(path)
    if not p.exists():
        raise UnweightError(f"{p}: no such file or folder")
    _refuse_pickle(p)
    if p.is_file():
        if p.suffix == ".gguf":
            return GgufCheckpoint(p)
        if p.suffix == ".safetensors":
            return SafetensorsCheckpoint(p, [p])
        raise UnweightError(f"{p}: unsupported file type (expected .safetensors, .gguf or an HF folder)")
    index = p / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnweightError(f"{index}: corrupt index (no weight_map)")
        files = sorted({p / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise UnweightError(f"{missing[0]}: shard listed in {INDEX_NAME} is missing")
        return SafetensorsCheckpoint(p, files, weight_map)
    files = sorted(p.glob("*.safetensors"))
    if files:
        return SafetensorsCheckpoint(p, files)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return GgufCheckpoint(ggufs[0])
    pickles = [f for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        _refuse_pickle(pickles[0])
    raise UnweightError(f"{p}: no safetensors or GGUF weights in this folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UnweightError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UnweightError(f"{path}: corrupt JSON: {exc}") from None


# --------------------------------------------------------------------------------------------------
# writer


class CheckpointWriter:
    """Stream tensors into sharded safetensors (+ index) under ``out_dir``, atomically.

    Use as a context manager. ``add`` writes each tensor's bytes to a scratch file at once, so peak
    memory is bounded by the largest tensor. On a clean exit the folder is renamed into place
    (replacing an existing one only if ``overwrite``); on an exception the temporary folder is removed
    and any existing ``out_dir`` is left untouched.
    """

    def __init__(self, out_dir: str | os.PathLike, metadata: dict[str, str] | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise UnweightError(f"{self.out_dir}: already exists (pass --force to replace it)")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UnweightError(f"{self.out_dir}: exists and is not a folder")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.max_shard_bytes = max_shard_bytes
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        self._shards: list[Path] = []
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}
        self._names: set[str] = set()
        self._weight_map: dict[str, int] = {}
        self._scratch = None
        self._offset = 0
        self.total_bytes = 0

    def __enter__(self) -> "CheckpointWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        return self

    @property
    def folder(self) -> Path:
        """The temporary folder being written: put side files (config, tokenizer) here."""
        return self.tmp

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in TORCH_TO_ST:
            raise UnweightError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self._scratch is not None and self._offset + nbytes > self.max_shard_bytes and self._offset > 0:
            self._close_shard()
        if self._scratch is None:
            self._scratch = open(self.tmp / f"shard-{len(self._shards)}.data", "wb")
            self._offset = 0
        if nbytes:
            self._scratch.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = (TORCH_TO_ST[t.dtype], list(t.shape), self._offset, self._offset + nbytes)
        self._weight_map[name] = len(self._shards)
        self._names.add(name)
        self._offset += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        self._scratch.close()
        data = Path(self._scratch.name)
        header = {"__metadata__": self.metadata}
        for name, (dtype, shape, begin, end) in self._entries.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        shard = self.tmp / f"shard-{len(self._shards)}.safetensors"
        with open(shard, "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(src, out, COPY_BLOCK)
        data.unlink()
        self._shards.append(shard)
        self._entries = {}
        self._scratch = None

    def _finish(self) -> None:
        if self._scratch is not None or not self._shards:
            if self._scratch is None:  # no tensors at all: still write one (empty) shard
                self._scratch = open(self.tmp / f"shard-{len(self._shards)}.data", "wb")
            self._close_shard()
        n = len(self._shards)
        names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, final in zip(self._shards, names):
            shard.rename(self.tmp / final)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[i] for k, i in sorted(self._weight_map.items())}}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._scratch is not None:
                self._scratch.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        self._finish()
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
        self.tmp.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
