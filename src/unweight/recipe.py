"""``recipe.yaml``: which lossy setting each matrix gets. ``unweight plan`` writes it, ``unweight compress
--recipe`` applies it.

Schema, version 1 (:data:`RECIPE_VERSION`; every key is checked, unknown keys are errors)::

    version: 1                  # required
    method: kmeans              # required: kmeans | rtn | gptq
    default: {k: 16}            # required: the setting of every matrix the recipe does not list
    matrices:                   # optional: per-matrix settings, by weight name (state-dict name)
      model.layers.3.mlp.down_proj.weight: {k: 64}
    budget_bits: 3.0            # optional: the bits-per-weight budget the plan was made under
    expected_bits: 2.9987       # optional: bits per weight of the planned matrices, all costs included
    model: smollm2-135m         # optional: what the plan was made for (informative)
    notes: {...}                # optional: free-form provenance (estimator, calibration slice, ...)

Settings per method:

- ``kmeans``: ``k`` (int, 2..256) and optionally ``granularity`` (``matrix`` | ``row`` |
  ``group:N``; default ``matrix``): exact 1-D K-means codebooks (:mod:`unweight.cluster`). Cost
  (:func:`kmeans_bits`): ceil(log2 k) index bits per weight plus k float32 entries per codebook.
- ``rtn``: ``bits`` (int, 1..8), optionally ``group_size`` (int >= 0, default 128; 0 = per row) and
  ``scheme`` (``asym_int`` | ``asym_float`` | ``sym``, default ``asym_int``: integer zero point).
  Cost (:func:`rtn_bits`): ``bits`` per weight plus, per group of a row (the last group holds the
  remainder), a float32 scale and an 8-bit zero point as :mod:`unweight.quant.rtn` stores them.
- ``gptq``: the same keys as ``rtn`` (GPTQ, :mod:`unweight.quant.gptq`, calibrated block by block, each
  Linear at its own width: "2-bit for the low-rank layers, 4-bit for the rest" in one command). Cost
  (:func:`gptq_bits`): ``bits`` plus a float32 scale and a ``bits``-wide zero point per group, as
  :mod:`unweight.layerwise_format` stores them.
- every method: optionally ``outliers`` (``none`` | ``auto`` | a count | a fraction such as ``0.05%``):
  weights kept exactly (dense-and-sparse, :mod:`unweight.outliers`), excluded from the lossy part.
  Their cost depends on the weights (an int32 index and a value each) and is not in ``expected_bits``.

Which matrices a recipe applies to at all (embeddings? the head?) is the compressing command's choice;
``default`` covers the ones it compresses that the recipe does not list. ``unweight plan`` lists
every decoder-block Linear whose setting differs from the most common one, which becomes ``default``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from unweight.errors import UnweightError

RECIPE_VERSION = 1
METHODS = ("kmeans", "rtn", "gptq")
CODEBOOK_ENTRY_BITS = 32  # cluster_tensor's codebooks are float32
RTN_SCALE_BITS, RTN_ZERO_BITS = 32, 8  # rtn_qparams: float32 scale, uint8 zero point per group
DEFAULT_GROUP_SIZE = 128
MAX_K = 256
_KEYS = {"version", "method", "default", "matrices", "budget_bits", "expected_bits", "model", "notes"}
_OUTLIERS = (str, int, float)
_SETTINGS = {"kmeans": {"k": int, "granularity": str, "outliers": _OUTLIERS},
             "rtn": {"bits": int, "group_size": int, "scheme": str, "outliers": _OUTLIERS},
             "gptq": {"bits": int, "group_size": int, "scheme": str, "outliers": _OUTLIERS}}
_REQUIRED = {"kmeans": "k", "rtn": "bits", "gptq": "bits"}


@dataclass
class Recipe:
    """A validated recipe (see the module docstring)."""

    method: str
    default: dict
    matrices: dict[str, dict] = field(default_factory=dict)
    budget_bits: float | None = None
    expected_bits: float | None = None
    model: str | None = None
    notes: dict = field(default_factory=dict)
    version: int = RECIPE_VERSION

    def settings_for(self, name: str) -> dict:
        """The full settings of matrix ``name`` (its own, else the default), defaults filled in."""
        return _complete(self.method, self.matrices.get(name, self.default))

    def to_dict(self) -> dict:
        d = {"version": self.version, "method": self.method, "default": dict(self.default),
             "matrices": {k: dict(v) for k, v in self.matrices.items()}}
        for key in ("budget_bits", "expected_bits", "model"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.notes:
            d["notes"] = self.notes
        return d


def _complete(method: str, settings: dict) -> dict:
    if method == "kmeans":
        return {"granularity": "matrix", **settings}
    return {"group_size": DEFAULT_GROUP_SIZE, "scheme": "asym_int", **settings}


def _named(parse, value, prefix: str) -> None:
    """``parse(value)``, its UnweightError prefixed with the file and key."""
    try:
        parse(value)
    except UnweightError as exc:
        raise UnweightError(f"{prefix}: {exc}") from None


def _check_settings(method: str, settings, where: str, source: str) -> dict:
    if not isinstance(settings, dict):
        raise UnweightError(f"{source}: {where} must be a mapping of settings, got {settings!r}")
    allowed = _SETTINGS[method]
    if unknown := set(settings) - set(allowed):
        raise UnweightError(f"{source}: {where}: unknown setting(s) {sorted(unknown)} for method "
                            f"{method!r}; allowed: {', '.join(allowed)}")
    if _REQUIRED[method] not in settings:
        raise UnweightError(f"{source}: {where}: missing {_REQUIRED[method]!r} (method {method!r})")
    for key, value in settings.items():
        kind = allowed[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
            raise UnweightError(f"{source}: {where}: {key} must be {names}, got {value!r}")
    if "outliers" in settings:
        from unweight.outliers import parse_outliers

        _named(parse_outliers, settings["outliers"], f"{source}: {where}")
    if method == "kmeans":
        if not 2 <= settings["k"] <= MAX_K:
            raise UnweightError(f"{source}: {where}: k must lie in 2..{MAX_K}, got {settings['k']}")
        if "granularity" in settings:
            from unweight.cluster import parse_granularity

            _named(parse_granularity, settings["granularity"], f"{source}: {where}")
    else:
        from unweight.quant.rtn import MAX_BITS, SCHEMES

        if not 1 <= settings["bits"] <= MAX_BITS:
            raise UnweightError(f"{source}: {where}: bits must lie in 1..{MAX_BITS}, got {settings['bits']}")
        if settings.get("group_size", 0) < 0:
            raise UnweightError(f"{source}: {where}: group_size must be >= 0, got {settings['group_size']}")
        if settings.get("scheme", "asym_int") not in SCHEMES:
            raise UnweightError(f"{source}: {where}: scheme must be one of {', '.join(SCHEMES)}, "
                                f"got {settings['scheme']!r}")
    return dict(settings)


def validate(data, source: str = "recipe") -> Recipe:
    """A :class:`Recipe` from parsed YAML, or UnweightError naming ``source`` and the bad key."""
    if not isinstance(data, dict):
        raise UnweightError(f"{source}: a recipe is a YAML mapping, got {type(data).__name__}")
    if unknown := set(data) - _KEYS:
        raise UnweightError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(_KEYS))}")
    if "version" not in data:
        raise UnweightError(f"{source}: missing 'version' (this unweight reads version {RECIPE_VERSION})")
    if data["version"] != RECIPE_VERSION or isinstance(data["version"], bool):
        raise UnweightError(f"{source}: recipe version {data['version']!r} is not supported "
                            f"(this unweight reads version {RECIPE_VERSION})")
    method = data.get("method")
    if method not in METHODS:
        raise UnweightError(f"{source}: method must be one of {', '.join(METHODS)}, got {method!r}")
    if "default" not in data:
        raise UnweightError(f"{source}: missing 'default' (the settings of unlisted matrices)")
    default = _check_settings(method, data["default"], "default", source)
    matrices = data.get("matrices") or {}
    if not isinstance(matrices, dict):
        raise UnweightError(f"{source}: 'matrices' must map weight names to settings")
    checked = {}
    for name, settings in matrices.items():
        if not isinstance(name, str) or not name:
            raise UnweightError(f"{source}: matrix names must be non-empty strings, got {name!r}")
        checked[name] = _check_settings(method, settings, f"matrices[{name!r}]", source)
    numbers = {}
    for key in ("budget_bits", "expected_bits"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise UnweightError(f"{source}: {key} must be a positive number, got {value!r}")
        numbers[key] = None if value is None else float(value)
    notes = data.get("notes") or {}
    if not isinstance(notes, dict):
        raise UnweightError(f"{source}: 'notes' must be a mapping")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise UnweightError(f"{source}: 'model' must be a string")
    return Recipe(method=method, default=default, matrices=checked, model=model, notes=notes, **numbers)


def load(path: str | os.PathLike) -> Recipe:
    """Read and validate ``recipe.yaml``; every problem is an UnweightError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UnweightError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UnweightError(f"{path}: not valid YAML: {exc}".splitlines()[0]) from None
    return validate(data, str(path))


HEADER = ("# unweight recipe, version {version}: which lossy setting each matrix gets.\n"
          "# Written by `unweight plan`; apply with `unweight compress MODEL OUT --recipe THIS`.\n"
          "# default: the setting of every compressed matrix not listed under matrices.\n"
          "# bits are per weight with every index, codebook, scale and zero point included.\n")


def dump(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write ``recipe`` as YAML (validated first, so what is written always loads)."""
    validate(recipe.to_dict(), "recipe to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=100)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(HEADER.format(version=recipe.version) + body)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- costs and application

def kmeans_bits(shape: tuple[int, ...], k: int, granularity: str = "matrix") -> float:
    """Bits per weight of K-means codebooks: ceil(log2 k) per index plus the float32 codebooks."""
    from unweight.cluster import n_codebooks

    numel = math.prod(shape)
    return math.ceil(math.log2(k)) + n_codebooks(shape, granularity) * k * CODEBOOK_ENTRY_BITS / numel


def rtn_bits(shape: tuple[int, int], bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> float:
    """Bits per weight of RTN: ``bits`` plus a float32 scale and a uint8 zero point per group."""
    from unweight.quant.rtn import n_groups

    rows, cols = shape
    return bits + rows * n_groups(cols, group_size) * (RTN_SCALE_BITS + RTN_ZERO_BITS) / (rows * cols)


def gptq_bits(shape: tuple[int, int], bits: int, group_size: int = DEFAULT_GROUP_SIZE,
              scheme: str = "asym_int") -> float:
    """Bits per weight of GPTQ as stored: ``bits`` plus a float32 scale per group and a zero point
    (``bits`` wide; float32 for asym_float; none for sym)."""
    from unweight.quant.rtn import n_groups

    rows, cols = shape
    zero = {"asym_int": bits, "asym_float": 32, "sym": 0}[scheme]
    return bits + rows * n_groups(cols, group_size) * (32 + zero) / (rows * cols)


def setting_bits(method: str, shape: tuple[int, int], settings: dict) -> float:
    """Bits per weight of one matrix under ``settings`` (completed with the defaults)."""
    s = _complete(method, settings)
    if method == "kmeans":
        return kmeans_bits(shape, s["k"], s["granularity"])
    if method == "gptq":
        return gptq_bits(shape, s["bits"], s["group_size"], s["scheme"])
    return rtn_bits(shape, s["bits"], s["group_size"])


def outlier_bits(w: torch.Tensor, outliers: str | int | float | torch.Tensor | None) -> float:
    """Bits per weight of ``w``'s exact weights (an ``--outliers`` spec, or the selected flat indices;
    the same for every option): an int32 index and a value each, the value 16-bit when ``w`` holds
    bfloat16 values (a bf16 checkpoint), else 32-bit."""
    if outliers is None:
        return 0.0
    from unweight.outliers import select_outliers

    n = (outliers if isinstance(outliers, torch.Tensor) else select_outliers(w, outliers)).numel()
    value_bits = 16 if torch.equal(w.to(torch.bfloat16).to(w.dtype), w) else 32
    return n * (32 + value_bits) / w.numel()


def reconstruct(w: torch.Tensor, method: str, settings: dict,
                outlier_idx: torch.Tensor | None = None) -> torch.Tensor:
    """What a matrix becomes under ``settings``: quantized and decoded, in ``w``'s dtype.
    ``outlier_idx``: the exact weights ``settings["outliers"]`` selects, when the caller has them.

    K-means clusters the values exactly as stored: a float32 tensor whose values are all bfloat16
    (a bf16 checkpoint loaded in float32) is clustered as bfloat16, which is exact and much faster."""
    s = _complete(method, settings)
    if method == "gptq":
        raise UnweightError("a gptq setting needs calibration data: apply the recipe with "
                            "`unweight compress MODEL OUT --recipe RECIPE`")
    from unweight.outliers import parse_outliers, restore, select_outliers, split

    idx = select_outliers(w, parse_outliers(s.get("outliers"))) if outlier_idx is None else outlier_idx
    exact = idx.numel() > 0
    if exact:  # dense-and-sparse, as the codebook format stores it
        w_rest, values, keep = split(w, idx)
    if method == "rtn":
        from unweight.quant.rtn import rtn_fake_quantize

        out = rtn_fake_quantize(w_rest if exact else w, s["bits"], s["group_size"], s["scheme"])
        return restore(out, idx, values) if exact else out
    from unweight.cluster import cluster_tensor, codebook_decode

    source = w
    if w.dtype == torch.float32:
        as_bf16 = w.to(torch.bfloat16)
        if torch.equal(as_bf16.to(torch.float32), w):
            source = as_bf16
    codebook, assignments = cluster_tensor(source, s["k"], granularity=s["granularity"],
                                           importance=keep if exact else None)
    out = codebook_decode(codebook, assignments, s["granularity"], dtype=w.dtype)
    return restore(out, idx, values) if exact else out


@torch.no_grad()
def apply_in_memory(model: torch.nn.Module, recipe: Recipe, names: list[str] | None = None) -> dict:
    """Replace the weights ``names`` (default: every matrix the recipe lists) of ``model`` in place by
    their reconstruction; returns {"matrices", "parameters", "bits_per_weight"} of what was replaced
    (exact outliers' indices and values included).

    This is for measuring a recipe before compressing (no storage format); names must be parameters."""
    from unweight.outliers import parse_outliers, select_outliers

    params = dict(model.named_parameters())
    names = list(recipe.matrices) if names is None else names
    total_bits = total = 0
    for name in names:
        if name not in params:
            raise UnweightError(f"recipe names {name!r}, which the model does not have")
        p = params[name]
        settings = recipe.settings_for(name)
        idx = select_outliers(p.data, parse_outliers(settings.get("outliers")))
        exact = outlier_bits(p.data, idx)
        p.data = reconstruct(p.data, recipe.method, settings, idx)
        total += p.numel()
        total_bits += p.numel() * (setting_bits(recipe.method, tuple(p.shape), settings) + exact)
    return {"matrices": len(names), "parameters": total,
            "bits_per_weight": total_bits / total if total else None}
