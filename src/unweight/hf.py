"""transformers integration: ``AutoModelForCausalLM.from_pretrained(dir)`` decodes an unweight folder on load.

A compressed folder (DESIGN.md, "On-disk format") says ``quantization_config.quant_method:
"unweight-..."`` and stores each encoded tensor ``NAME`` as parts ``NAME.{tag}.{field}``. This module
serves every unweight ``quant_method`` with one config class and one quantizer class, registered through
transformers' public hooks (``transformers.quantizers.auto.register_quantization_config`` and
``register_quantizer``), so loading needs nothing but ``import unweight`` beforehand.

How the tensors are decoded (transformers 5.x weight loading, ``core_model_loading.py``):

- The quantizer's ``get_weight_conversions()`` returns one ``transformers.core_model_loading.WeightConverter``
  whose source patterns are the part suffixes ``\\.{tag}\\.{field}$`` and whose target is the name without
  them: transformers gathers the parts of ``NAME`` under the target ``NAME`` (after its own renamings and
  ``base_model_prefix`` handling). The field names are read from the safetensors headers in
  ``_process_model_before_weight_loading`` (headers only, no data).
- The converter decodes in ``materialize_tensors``, i.e. while the parts are gathered: the format's
  ``decode(parts, name)`` turns them into the dense tensor, which transformers then places like any other
  weight (shape checked, cast to the model's dtype only when the caller asked for another one). Errors
  raised there are not swallowed into transformers' "conversion errors" report: a corrupt part raises
  :class:`~unweight.errors.UnweightError` naming the shard and the tensor.
- A model's own converters (e.g. the expert merges of MoE models, ``experts.*.w1.weight`` ->
  ``experts.gate_up_proj``) would otherwise claim the parts of the weights they merge:
  ``update_weight_conversions`` extends each such converter with the part patterns and decodes before its
  operations run (the same place where transformers' FP8 dequantization hooks in).
- Memory: a tensor is decoded once, straight into the parameter the model keeps; no dense copy of the
  checkpoint is ever made (transformers' loader may read parts ahead, at most the compressed folder's
  size). Parts are read onto the CPU (``force_cpu``). A tensor whose ``device_map`` device is a CUDA GPU is
  decoded there by the format's ``decode_on`` where it has one (``unweight-lossless``: the Triton decoder,
  ``unweight.lossless.gpu``), so only the compressed bytes cross to the GPU; any other is decoded on the CPU,
  then moved to its device. The decoder reads the parts of the tensors after the one asked for that go to the
  same device itself and decodes them together, :data:`BATCH_BYTES` of parts at a time on the CPU and up to
  :data:`GPU_BATCH_BYTES` on a GPU: the decoders work a tensor's chunks side by side (threads; warps), and
  most tensors are a few chunks, so one tensor at a time would leave most cores idle. Transformers' own reads
  of those parts are then only checked for presence.
- With the default ``runtime: "dense"`` the loaded model is an ordinary dense model: the quantization
  config is removed after loading (transformers' ``dequantize`` convention), so ``save_pretrained`` writes
  plain dense weights and ``.half()`` / training work as usual. :func:`swap_runtime_modules` is the hook
  where memory-saving runtimes (codebook modules) will plug in.

Importing this module is cheap: it imports neither torch nor transformers. If transformers' quantizer
registry is already loaded the methods are registered at once; otherwise an import hook registers them
the moment transformers loads it. Without unweight, transformers logs "Unknown quantization type ...
we will skip the quantization" and then loads the folder as a plain one: the encoded weights are reported
missing and randomly initialised, their parts reported unexpected (a warning, not an error).
"""

from __future__ import annotations

import functools
import importlib.abc
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from unweight.errors import UnweightError

# The quant_methods that unweight's own formats write. A new format is one more name here.
QUANT_METHODS: tuple[str, ...] = (
    "unweight-lossless",
    "unweight-codebook",
    "unweight-layerwise",
)
METHOD_PREFIX = "unweight-"

# What `quantization_config.runtime` may say. "dense": decode to ordinary tensors on load.
RUNTIMES: tuple[str, ...] = ("dense",)
DEFAULT_RUNTIME = "dense"

_AUTO_MODULE = "transformers.quantizers.auto"
_extra_methods: list[str] = []  # registered at run time (register_quant_method), kept for the import hook


# --------------------------------------------------------------------------------------------------
# registration


def register_quant_method(name: str) -> None:
    """Serve ``quant_method == name`` with unweight's config and quantizer (idempotent).

    The format itself must be registered in :mod:`unweight.formats` under the same name by the time a
    folder is loaded.
    """
    if not name.startswith(METHOD_PREFIX):
        raise UnweightError(f"unweight quant methods are named {METHOD_PREFIX}*, got {name!r}")
    if name not in QUANT_METHODS and name not in _extra_methods:
        _extra_methods.append(name)
    auto = _loaded_auto_module()
    if auto is not None:
        _register(auto, name)


def registered_quant_methods() -> list[str]:
    return [*QUANT_METHODS, *_extra_methods]


def _loaded_auto_module():
    mod = sys.modules.get(_AUTO_MODULE)
    return mod if mod is not None and hasattr(mod, "register_quantizer") else None


def _register(auto, name: str) -> None:
    config_cls, quantizer_cls = _quantizer_classes()
    try:
        if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(name) is not config_cls:
            auto.register_quantization_config(name)(config_cls)
        if auto.AUTO_QUANTIZER_MAPPING.get(name) is not quantizer_cls:
            auto.register_quantizer(name)(quantizer_cls)
    except ValueError as exc:  # another library holds the name
        raise UnweightError(f"cannot register {name!r} with transformers: {exc}") from None


def _register_all(auto) -> None:
    names = registered_quant_methods()
    formats = sys.modules.get("unweight.formats")  # formats registered before transformers loaded
    if formats is not None:
        names += [n for n in getattr(formats, "FORMATS", {}) if n.startswith(METHOD_PREFIX) and n not in names]
    for name in names:
        _register(auto, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers unweight's methods right after transformers executes its quantizer registry module."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and tools
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _uninstall_hook()
        try:
            _register_all(module)
        except Exception as exc:  # never break `import transformers` for unweight's sake
            warnings.warn(f"unweight: could not register its formats with transformers: {exc}", stacklevel=2)


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def _install() -> None:
    auto = _loaded_auto_module()
    if auto is not None:
        _register_all(auto)
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


# --------------------------------------------------------------------------------------------------
# runtime hook


def swap_runtime_modules(model, qc) -> None:
    """Replace modules of ``model`` (still on the meta device, before any weight is loaded) by the
    runtime modules that ``qc.runtime`` names.

    ``"dense"`` swaps nothing: every encoded tensor is decoded into the model's ordinary parameters.
    A memory-saving runtime (e.g. codebook linears that keep indices and codebooks and decode on the fly)
    plugs in here: replace the modules, give them parameters for the parts (torch names cannot contain
    dots, so add a ``WeightRenaming`` from ``NAME.{tag}.{field}`` to the module's parameter names in the
    quantizer's ``get_weight_conversions``), and add the runtime's name to :data:`RUNTIMES`. The quantizer
    keeps the quantization config on such models (they are not dense) and reports them not serializable
    until the runtime can write its parts back.
    """
    runtime = getattr(qc, "runtime", DEFAULT_RUNTIME)
    if runtime == "dense":
        return
    raise UnweightError(f"unweight runtime {runtime!r} is not available (known: {', '.join(RUNTIMES)})")


# --------------------------------------------------------------------------------------------------
# decoding


GPU_DECODE_ENV = "UNWEIGHT_GPU_DECODE"  # "0": decode on the CPU even for tensors bound for a GPU
BATCH_BYTES = 1 << 28  # stored bytes of parts decoded together on the CPU
# on a GPU, up to this, and a sixth of its free memory (the parts, the outputs, their copies): a batch's rANS
# kernel takes about as long as its longest chunk, so the fewer batches the better (an H200 loading a 1.7 GB
# model: 322 ms in one batch, 398 ms in five of 256 MB)
GPU_BATCH_BYTES = 1 << 32


def _accelerators(device_map: dict | None, names) -> dict:
    """{name: the CUDA device that ``device_map`` puts parameter ``name`` on, or None} (None: no map, the CPU,
    disk, or ``UNWEIGHT_GPU_DECODE=0``). One match of the map for all ``names``."""
    if not device_map or os.environ.get(GPU_DECODE_ENV, "1") == "0":
        return dict.fromkeys(names)
    import torch
    from transformers.integrations.accelerate import expand_device_map

    out = {}
    for name, where in expand_device_map(device_map, list(names)).items():
        try:  # an index names the current accelerator, which torch refuses to name where there is none
            device = torch.device("cpu" if where == "disk" else where)
        except RuntimeError:
            device = None
        out[name] = device if device is not None and device.type == "cuda" else None
    return out


def _batch_bytes(device) -> int:
    """Stored bytes of parts to decode together on ``device``: :data:`BATCH_BYTES` on the CPU; on a CUDA GPU
    :data:`GPU_BATCH_BYTES`, or a sixth of the memory free there if less."""
    if device.type != "cuda":
        return BATCH_BYTES
    import torch

    return min(GPU_BATCH_BYTES, torch.cuda.mem_get_info(device)[0] // 6)


def _cpu():
    import torch

    return torch.device("cpu")


class _Decoder:
    """A format's decode, with errors naming the shard and the tensor. Shared, never copied: transformers
    deep-copies a converter per target tensor."""

    def __init__(self, fmt, folder: str, where: dict[str, str], parts: dict[str, list[str]] | None = None,
                 shards: dict | None = None):
        self.fmt = fmt
        self.folder = folder
        self.where = where  # encoded tensor name -> shard file
        self.part_names = parts or {}  # encoded tensor name -> its parts' names (for reading ahead)
        self.shards = shards or {}  # shard file -> its SafetensorsFile (headers parsed once, for reading ahead)
        self.device_map = None  # the final one (transformers settles "auto" after building the model)
        self.devices = dict.fromkeys(self.part_names, _cpu())  # where each stored tensor decodes, by its name
        self.device_failed = False  # decoding on a device has failed once (warned)
        self.pending = dict.fromkeys(self.part_names)  # not yet decoded ahead, in the checkpoint's order
        self.ready: dict = {}  # decoded ahead, not yet asked for
        self.batching = True  # off once a batch meets a corrupt tensor: each then decodes alone, its error its own

    def __deepcopy__(self, memo):
        return self

    def set_device_map(self, device_map: dict | None) -> None:
        self.device_map = device_map
        self.devices = {n: d or _cpu() for n, d in _accelerators(device_map, self.part_names).items()}

    def device_for(self, target: str):
        """Where the tensors for parameter ``target`` are decoded: a GPU the format decodes on, or None (the
        CPU; also for the rest of a load once decoding on a device has failed)."""
        if self.fmt.decode_on is None or self.device_failed:
            return None
        return _accelerators(self.device_map, [target])[target]

    def decode(self, parts: dict, name: str, device=None):
        """Tensor ``name`` from its ``parts``: on ``device`` (a GPU), or on the CPU (None)."""
        try:
            out = self.ready.pop(name, None)
            if out is None and device is not None and not self.device_failed:
                out = self._decode_on(parts, name, device)
            elif out is None and self._batched(name, _cpu()):
                out = self._decode_ahead(name, _cpu())
            self.pending.pop(name, None)  # (decoded alone: not to be decoded ahead again)
            return (self.fmt.decode(parts, name) if out is None else out).contiguous()
        except UnweightError as exc:
            msg = str(exc)
        except (KeyError, ValueError, RuntimeError, IndexError, TypeError) as exc:
            msg = f"corrupt or incomplete parts {sorted(parts)} ({type(exc).__name__}: {exc})"
        if name not in msg:
            msg = f"tensor {name!r}: {msg}"
        raise UnweightError(f"{self.where.get(name, self.folder)}: {msg}") from None

    def _decode_on(self, parts: dict, name: str, device):
        """The tensor decoded on ``device`` (with the tensors after it bound there), or None where the format
        cannot decode there. Where decoding there fails, the CPU decoder judges: corrupt parts raise its error;
        parts it decodes mean the device failed (memory, driver, compiler, a bug): a warning, the CPU's tensor,
        and the CPU for the rest of the load."""
        try:
            out = self._decode_ahead(name, device) if self._batched(name, device) else None
            if out is None:
                got = self.fmt.decode_on({name: parts}, device)
                out = None if got is None else got[name]
            return out
        except Exception as exc:
            out = self.fmt.decode(parts, name)  # raises where the parts are at fault
            warnings.warn(f"{self.where.get(name, self.folder)}: tensor {name!r}: decoding on {device} failed "
                          f"({type(exc).__name__}: {exc}); decoding this load's tensors on the CPU instead "
                          f"(set {GPU_DECODE_ENV}=0 to skip the GPU)", RuntimeWarning, stacklevel=2)
            self.device_failed = True
            return out

    def _batched(self, name: str, device) -> bool:
        """Whether tensor ``name`` is to be decoded on ``device`` with the tensors after it that go there too. (A
        checkpoint name that the model renames may be placed wrongly by ``devices``, which goes by the stored
        names: it then decodes alone, on the device its parameter asks for.)"""
        return (self.batching and not self.device_failed and self.fmt.decode_on is not None
                and name in self.pending and self.devices.get(name) == device)

    def _decode_ahead(self, name: str, device):
        """Tensor ``name`` decoded on ``device`` together with the next undecoded ones bound there (in the
        checkpoint's order, up to :func:`_batch_bytes` of parts, mapped from their shards here: no copy), which
        wait in ``ready``; None where the format cannot, or where one of them is corrupt (batching then stops, so
        that each tensor's error names its own shard)."""
        group, size, marker, limit = {}, 0, f".{self.fmt.tag}.", _batch_bytes(device)
        for n in [name, *(k for k in self.pending if k != name and self.devices.get(k) == device)]:
            st = self.shards[self.where[n]]
            nbytes = sum(st.entries[p][3] - st.entries[p][2] for p in self.part_names[n])
            if group and size + nbytes > limit:
                break
            group[n] = {p.rsplit(marker, 1)[1]: st.mapped(p) for p in self.part_names[n]}
            size += nbytes
        try:
            decoded = self.fmt.decode_on(group, device)
        except UnweightError:
            decoded = None
        if decoded is None:
            self.batching = False
            return None
        for n in group:
            del self.pending[n]
        self.ready.update(decoded)
        return self.ready.pop(name)


def _part_pattern(tag: str, fld: str) -> str:
    return re.escape(f".{tag}.{fld}")


def _read_part_names(files: list[str], tag: str) -> tuple[dict[str, list[str]], dict[str, str], dict]:
    """{encoded tensor name: its part names}, {encoded tensor name: shard} and {shard: its
    :class:`~unweight.checkpoint.SafetensorsFile`}, from the headers only."""
    from unweight.checkpoint import SafetensorsFile
    from unweight.formats import group_parts

    names, shard_of, shards = [], {}, {}
    for f in files:
        if not str(f).endswith(".safetensors"):
            raise UnweightError(f"{f}: unweight folders hold safetensors only")
        st = shards[str(f)] = SafetensorsFile(Path(f))
        names += list(st.entries)
        shard_of.update(dict.fromkeys(st.entries, str(f)))
    groups, plain = group_parts(names, tag)
    both = sorted(set(groups) & set(plain))
    if both:
        raise UnweightError(f"{shard_of[both[0]]}: tensor {both[0]!r} is stored both dense and as "
                            f"{tag} parts: corrupt folder")
    return groups, {base: shard_of[parts[0]] for base, parts in groups.items()}, shards


@functools.cache
def _quantizer_classes() -> tuple[type, type]:
    """UnweightConfig and UnweightHfQuantizer, built on first use (they subclass transformers' classes)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class UnweightConfig(QuantizationConfigMixin):
        """``quantization_config`` of an unweight folder: ``quant_method``, ``format_version``, ``runtime``
        (``"dense"`` unless a memory-saving runtime is asked for) and the format's own keys, kept as is."""

        def __init__(self, quant_method: str, format_version: int | None = None,
                     runtime: str = DEFAULT_RUNTIME, **kwargs: Any):
            self.quant_method = quant_method
            self.format_version = format_version
            self.runtime = runtime
            for key, value in kwargs.items():
                setattr(self, key, value)

        @property
        def dequantize(self) -> bool:
            """transformers' convention: a dequantized model drops its quantization config after loading."""
            return self.runtime == "dense"

    class UnweightHfQuantizer(HfQuantizer):
        """Decodes unweight parts while transformers loads the weights (see the module docstring)."""

        requires_calibration = True  # loads compressed folders; compressing is `unweight compress`

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.format = None
            self.parts: dict[str, list[str]] = {}
            self.fields: list[str] = []
            self.decoder: _Decoder | None = None
            self.device_map: dict | None = None

        def _note_device_map(self, device_map) -> None:
            """Keep the latest device map given as a dict (transformers hands the final one to
            ``validate_environment`` once it has placed an "auto" model)."""
            if isinstance(device_map, dict):
                self.device_map = device_map
                if self.decoder is not None:
                    self.decoder.set_device_map(device_map)

        def validate_environment(self, *args, **kwargs) -> None:
            from unweight.formats import get_format

            self._note_device_map(kwargs.get("device_map"))

            qc = self.quantization_config
            self.format = get_format(qc.quant_method)
            version = qc.format_version if qc.format_version is not None else self.format.version
            if int(version) > self.format.version:
                raise UnweightError(f"{qc.quant_method} format version {version} is newer than this unweight "
                                    f"reads ({self.format.version}); upgrade unweight")
            if qc.runtime not in RUNTIMES:
                raise UnweightError(f"unweight runtime {qc.runtime!r} is not available "
                                    f"(known: {', '.join(RUNTIMES)})")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            if not checkpoint_files:
                raise UnweightError(f"{model.config.name_or_path}: unweight decodes from the folder's "
                                    "safetensors files; loading from a state_dict is not supported")
            self.parts, where, shards = _read_part_names(checkpoint_files, self.format.tag)
            marker = f".{self.format.tag}."
            self.fields = sorted({p.rsplit(marker, 1)[1] for ps in self.parts.values() for p in ps})
            self.decoder = _Decoder(self.format, str(model.config.name_or_path), where, self.parts, shards)
            self._note_device_map(kwargs.get("device_map") or self.device_map)
            swap_runtime_modules(model, self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            if self.decoder is not None:
                self.decoder.ready.clear()  # tensors decoded ahead that the model did not take
            return model

        def get_weight_conversions(self):
            if not self.fields:
                return []
            classes = _loading_classes()
            return [classes.DecodingConverter.for_parts(self.format.tag, self.fields, self.decoder)]

        def update_weight_conversions(self, weight_conversions, model):
            """Let the model's own converters (expert merges, fused projections) take decoded tensors."""
            from copy import deepcopy

            from transformers.core_model_loading import WeightRenaming, apply_renamings

            classes = _loading_classes()
            # the converters see keys after the renamings: rename with copies (renaming marks them used)
            renamings = deepcopy([c for c in weight_conversions if isinstance(c, WeightRenaming)])
            part_keys = [apply_renamings(p, renamings) for ps in self.parts.values() for p in ps]
            updated = []
            for conv in weight_conversions:
                claimed = isinstance(conv, classes.WeightConverter) and next(
                    (k for k in part_keys if conv.compiled_sources.search(k)), None)
                if not claimed:
                    updated.append(conv)
                    continue
                if not all(re.search(r"\w$", s) for s in conv._original_source_patterns):
                    base = claimed.rsplit(f".{self.format.tag}.", 1)[0]
                    raise UnweightError(f"{self.decoder.where.get(base, self.decoder.folder)}: tensor {base!r} "
                                        f"falls under the model's checkpoint conversion {conv!r}, which "
                                        "unweight cannot decode through")
                updated.append(classes.DecodingConverter.extending(conv, self.format.tag, self.fields,
                                                                   self.decoder))
            return updated + self.get_weight_conversions()

        def get_new_dtype(self, converter, param, dtype):
            if isinstance(converter, _loading_classes().DecodingConverter):
                return None  # parts keep their stored dtype; the decoded tensor is cast in `convert`
            return super().get_new_dtype(converter, param, dtype)

        def is_serializable(self) -> bool:
            return False  # dense models drop the quantizer after loading; other runtimes cannot save yet

        @property
        def is_trainable(self) -> bool:
            return False

    for cls in (UnweightConfig, UnweightHfQuantizer):  # picklable as unweight.hf.<name> (module __getattr__)
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return UnweightConfig, UnweightHfQuantizer


@functools.cache
def _loading_classes():
    """The converter and op classes (they subclass transformers.core_model_loading's)."""
    import types

    from transformers.core_model_loading import ConversionOps, WeightConverter

    class Decoded(ConversionOps):
        """Marks a chain whose sources were decoded in ``materialize_tensors``; passes them on unchanged."""

        supports_many_to_many = True  # the parts add sources; the model's ops still see one per base name

        def convert(self, input_dict, **kwargs):
            return input_dict

    class Place(ConversionOps):
        """The decoded tensor of one encoded name goes to the target parameter."""

        def convert(self, input_dict, full_layer_name=None, **kwargs):
            (tensors,) = input_dict.values()
            return {full_layer_name: tensors[0]}

    class DecodingConverter(WeightConverter):
        """A WeightConverter some of whose sources are unweight parts: each encoded tensor is decoded as
        its parts are materialized, so that the operations see the dense tensors the sources would hold."""

        __slots__ = ("decoder", "tag", "layout", "slot_keys", "origins", "device")

        def __init__(self, source_patterns, target_patterns, operations, force_cpu: bool = True, *,
                     decoder=None, tag: str = "", layout=(), n_slots: int = 1):
            super().__init__(source_patterns, target_patterns, operations, force_cpu=force_cpu)
            self.decoder = decoder
            self.tag = tag
            self.layout = list(layout)  # per source pattern: (slot, field), field None for a dense source
            # slot -> the key the operations expect: its (processed) dense source pattern, or "" if none
            dense_index = {slot: i for i, (slot, fld) in enumerate(self.layout) if fld is None}
            self.slot_keys = [self.source_patterns[dense_index[s]] if s in dense_index else ""
                              for s in range(n_slots)]
            self.origins: dict[str, list[str]] = {}
            self.device = None  # where `convert` has the tensors decoded (None: the CPU)

        @classmethod
        def for_parts(cls, tag: str, fields: list[str], decoder):
            """Gather ``NAME.{tag}.{field}`` for every field into ``NAME`` and decode it."""
            return cls([_part_pattern(tag, f) + "$" for f in fields], "", [Place()],
                       decoder=decoder, tag=tag, layout=[(0, f) for f in fields], n_slots=1)

        @classmethod
        def extending(cls, conv, tag: str, fields: list[str], decoder):
            """``conv`` with the parts of each of its sources as extra sources, decoded before its ops."""
            sources = list(conv._original_source_patterns)
            layout = [(i, None) for i in range(len(sources))]
            for i, s in enumerate(conv._original_source_patterns):
                for f in fields:
                    sources.append(s + _part_pattern(tag, f))
                    layout.append((i, f))
            new = cls(sources, list(conv._original_target_patterns), [Decoded(), *conv.operations],
                      force_cpu=True, decoder=decoder, tag=tag, layout=layout,
                      n_slots=len(conv._original_source_patterns))
            new.scope_prefix, new.base_model_prefix = conv.scope_prefix, conv.base_model_prefix
            return new

        def add_tensor(self, target_key, source_key, source_pattern, future):
            super().add_tensor(target_key, source_key, source_pattern, future)
            self.origins.setdefault(source_pattern, []).append(source_key)

        def materialize_tensors(self):
            collected = super().materialize_tensors()
            slots: dict[int, dict] = {}
            for i, pattern in enumerate(self.source_patterns):
                if pattern in collected:
                    slot, fld = self.layout[i]
                    slots.setdefault(slot, {})[fld] = (collected.pop(pattern), self.origins.get(pattern, []))
            out = {}
            marker = f".{self.tag}."
            for slot, by_field in slots.items():
                dense, _ = by_field.pop(None, ([], []))
                if not by_field:
                    out[self.slot_keys[slot]] = dense
                    continue
                names = next(iter(by_field.values()))[1]
                names = [n.rsplit(marker, 1)[0] for n in names]
                counts = {len(t) for t, _ in by_field.values()}
                if dense or len(counts) != 1:
                    what = "dense and encoded tensors mixed" if dense else "parts missing for some tensors"
                    raise UnweightError(f"{self.decoder.where.get(names[0], self.decoder.folder)}: {what} in "
                                        f"the group of {names[0]!r} ({sorted(set(names))[:4]}...)")
                out[self.slot_keys[slot]] = [
                    self.decoder.decode({f: t[k] for f, (t, _) in by_field.items()}, names[k], self.device)
                    for k in range(counts.pop())]
            return out

        def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
            self.device = self.decoder.device_for(layer_name)
            out = super().convert(layer_name, model=model, config=config, hf_quantizer=hf_quantizer,
                                  loading_info=loading_info)
            return {k: _as_param_dtype(model, k, v) for k, v in out.items()}

    def _as_param_dtype(model, name: str, value):
        """Cast like transformers casts a dense checkpoint tensor: to the parameter's dtype, floats only."""
        if isinstance(value, list):
            return [_as_param_dtype(model, name, v) for v in value]
        if model is None:
            return value
        try:
            ref = model.get_parameter_or_buffer(name)
        except AttributeError:
            return value
        if value.dtype != ref.dtype and value.is_floating_point() and ref.is_floating_point():
            return value.to(ref.dtype)
        return value

    for cls in (Decoded, Place, DecodingConverter):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return types.SimpleNamespace(Decoded=Decoded, Place=Place, DecodingConverter=DecodingConverter,
                                 WeightConverter=WeightConverter)


def __getattr__(name: str):
    """``unweight.hf.UnweightConfig`` and ``unweight.hf.UnweightHfQuantizer``, built on first access."""
    if name in ("UnweightConfig", "UnweightHfQuantizer"):
        config_cls, quantizer_cls = _quantizer_classes()
        return config_cls if name == "UnweightConfig" else quantizer_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install()
