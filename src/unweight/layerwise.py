"""Calibrated compression of a whole model, in place: prune and/or quantize every decoder Linear.

``compress_layerwise(model, tokenizer, LayerwiseConfig.from_method("gptq", bits=4))`` walks the decoder
blocks with the one driver (:func:`unweight.calibrate.run_layerwise`) and applies the pure methods of
:mod:`unweight.prune` and :mod:`unweight.quant` to each Linear: first pruning (magnitude, Wanda,
SparseGPT; unstructured or N:M), then quantization (RTN, GPTQ, AWQ) of what is left, with pruned
weights held at exactly zero (GPTQ compensates their error as SparseGPT's joint mode does). Methods
that need no calibration data (magnitude, RTN, and their combination) skip the driver and visit the
Linears directly. Embeddings and the LM head are left alone.

What a storage format needs is recorded per Linear in ``artifacts`` (a dict the caller passes):
levels, scales and zeros as RTN stores them, the keep-mask of pruned weights, AWQ's input scale, and
the weights kept exactly (``config.outliers``, dense-and-sparse as in :mod:`unweight.outliers`: left out
of every group's range, GPTQ compensating the rest around them, written back after dequantization).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import nn

from unweight.calibrate import (DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, LinearStats, block_linears,
                                calibration_windows, decoder_layers, run_layerwise)
from unweight.errors import UnweightError
from unweight.outliers import restore, select_outliers, split
from unweight.prune.magnitude import magnitude_prune
from unweight.prune.nm import parse_pattern
from unweight.prune.sparsegpt import sparsegpt_prune
from unweight.prune.wanda import wanda_prune
from unweight.quant.awq import awq_quantize
from unweight.quant.gptq import DEFAULT_BLOCK, DEFAULT_DAMP, gptq_quantize
from unweight.quant.rtn import DEFAULT_SCHEME, rtn_dequantize, rtn_quantize

PRUNERS = ("magnitude", "wanda", "sparsegpt")
QUANTIZERS = ("rtn", "gptq", "awq")
CALIBRATED = {"wanda", "sparsegpt", "gptq", "awq"}
# What the calibration forwards may compute in. bfloat16 runs a bf16 model's blocks as they are held:
# matmuls ~2.3x faster on CPUs with AVX512-BF16 or AMX (and on GPUs), statistics (X^T X, norms) still
# summed in float32 from the bf16 activations and every method still run in float32 on the weights.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LayerwiseConfig:
    """One pruning method and/or one quantizer, with their settings (serialisable with ``asdict``)."""

    prune: str | None = None  # magnitude | wanda | sparsegpt
    sparsity: float = 0.5  # unstructured fraction of zeros (ignored when pattern is set)
    pattern: str | None = None  # "N:M" (N kept of every M consecutive inputs), e.g. "2:4"
    quant: str | None = None  # rtn | gptq | awq
    bits: int = 4
    group_size: int = 128
    scheme: str = DEFAULT_SCHEME  # asym_int (integer zero point) | sym | asym_float
    act_order: bool = False  # GPTQ
    static_groups: bool = False  # GPTQ: group scales from the original weights (implied by act_order)
    damp: float = DEFAULT_DAMP  # GPTQ / SparseGPT
    block_size: int = DEFAULT_BLOCK  # GPTQ / SparseGPT lazy batch
    n_samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    batch_size: int | None = None  # windows per block forward; None: see calibrate.calibration_batch
    true_sequential: bool = False  # each Linear calibrated after the ones before it: one forward per block
    compute_dtype: str = "float32"  # the calibration forwards' dtype: float32 | bfloat16 (see COMPUTE_DTYPES)
    exclude: list[str] = field(default_factory=list)  # substrings of Linear names to leave alone
    outliers: int | float | str | None = None  # kept exactly (unweight.outliers); quantizers only

    @classmethod
    def from_method(cls, method: str, **settings) -> "LayerwiseConfig":
        """``"wanda"``, ``"sparsegpt"``, ``"gptq"``... as the CLI's ``--method``; a pruning method
        with ``bits`` set also quantizes (GPTQ by default, ``quant=`` to choose)."""
        if method in PRUNERS:
            quant = settings.pop("quant", "gptq" if "bits" in settings else None)
            return cls(prune=method, quant=quant, **settings)
        if method in QUANTIZERS:
            return cls(quant=method, **settings)
        raise UnweightError(f"unknown method {method!r}; valid: {', '.join(PRUNERS + QUANTIZERS)}")

    def __post_init__(self):
        if self.prune not in (None, *PRUNERS):
            raise UnweightError(f"unknown pruning method {self.prune!r}; valid: {', '.join(PRUNERS)}")
        if self.quant not in (None, *QUANTIZERS):
            raise UnweightError(f"unknown quantizer {self.quant!r}; valid: {', '.join(QUANTIZERS)}")
        if self.prune is None and self.quant is None:
            raise UnweightError("nothing to do: set a pruning method, a quantizer or both")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        if self.prune and self.quant == "awq":
            raise UnweightError("AWQ rescales input channels and cannot keep a sparsity pattern: "
                                "combine pruning with gptq or rtn")
        if self.prune and self.quant and self.scheme == "asym_float":
            raise UnweightError("pruning + quantization needs an integer zero point (asym_int or sym)")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise UnweightError(f"unknown compute dtype {self.compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
        if self.outliers is not None and self.quant is None:
            raise UnweightError("outliers are kept exactly by a quantizer; pruning alone keeps every "
                                "kept weight exactly already (add --quant gptq|rtn)")

    @property
    def stats(self) -> tuple[str, ...]:
        need = set()
        if self.prune == "sparsegpt" or self.quant in ("gptq", "awq"):
            need.add("hessian")
        if self.quant == "awq":
            need.add("abs_mean")
        if self.prune == "wanda":
            need.add("sq_norm")
        return tuple(sorted(need))

    @property
    def calibrated(self) -> bool:
        return bool({self.prune, self.quant} & CALIBRATED)

    def describe(self) -> str:
        parts = []
        if self.prune:
            parts.append(f"{self.prune} {self.pattern or f'{self.sparsity:.0%}'}")
        if self.quant:
            g = f"g{self.group_size}" if self.group_size > 0 else "per-channel"
            parts.append(f"{self.quant} {self.bits}-bit {g}" + (" act-order" if self.act_order else "")
                         + (" static groups" if self.static_groups and not self.act_order else ""))
        if self.outliers is not None:
            parts.append(f"outliers {self.outliers}")
        calibration = ((", true-sequential" if self.true_sequential else "")
                       + (f", {self.compute_dtype} forwards" if self.compute_dtype != "float32" else ""))
        return " + ".join(parts) + (calibration if self.calibrated else "")


@dataclass
class LinearArtifacts:
    """What storing one compressed Linear takes (tensors on the CPU)."""

    mask: torch.Tensor | None = None  # bool keep-mask, w.shape (pruned)
    q: torch.Tensor | None = None  # uint8 levels (quantized)
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None  # AWQ: dense W = dequant(q) / input_scale
    outlier_idx: torch.Tensor | None = None  # flat indices of the weights kept exactly (int64, sorted)
    outlier_val: torch.Tensor | None = None  # their original values (float32)
    seconds: float = 0.0


def compress_linear(linear: nn.Linear, config: LayerwiseConfig, stats: LinearStats | None,
                    weight_dtype: torch.dtype | None = None) -> LinearArtifacts:
    """Prune and/or quantize one Linear in place with ``config``; ``stats`` for calibrated methods.

    ``weight_dtype`` (the checkpoint's, e.g. bfloat16, for a model computing in float32): round the
    result to it, so that the model holds exactly what a storage format writes and loads back.
    """
    t0 = time.perf_counter()
    w = linear.weight.data
    out = LinearArtifacts()
    nm = parse_pattern(config.pattern) if config.pattern else None
    dense = w.to(torch.float32)
    if config.prune == "magnitude":
        dense, out.mask = magnitude_prune(dense, config.sparsity, nm)
    elif config.prune == "wanda":
        dense, out.mask = wanda_prune(dense, stats.sq_norm, config.sparsity, nm)
    elif config.prune == "sparsegpt":
        dense, out.mask = sparsegpt_prune(dense, stats.hessian, config.sparsity, nm, config.damp,
                                          config.block_size)
    exact = None
    if config.quant and config.outliers is not None:  # dense-and-sparse: out of every range, restored
        out.outlier_idx = select_outliers(dense, config.outliers)
        zeroed, out.outlier_val, _ = split(dense, out.outlier_idx)
        exact = torch.zeros(dense.numel(), dtype=torch.bool, device=dense.device)
        exact[out.outlier_idx] = True
        exact = exact.view(dense.shape)
    if config.quant == "rtn":
        # with an integer zero point, 0 rounds to the level z exactly: pruned weights stay zero
        out.q, out.scale, out.zero = rtn_quantize(dense if exact is None else zeroed, config.bits,
                                                  config.group_size, config.scheme)
    elif config.quant == "gptq":
        out.q, out.scale, out.zero = gptq_quantize(dense, stats.hessian, config.bits, config.group_size,
                                                   config.scheme, config.act_order, config.damp,
                                                   config.block_size, mask=out.mask, exact=exact,
                                                   static_groups=config.static_groups)
    elif config.quant == "awq":
        result = awq_quantize(dense if exact is None else zeroed, stats.hessian, stats.abs_mean, config.bits,
                              config.group_size, config.scheme)
        out.q, out.scale, out.zero, out.input_scale = result.q, result.scale, result.zero, result.input_scale
    if out.q is not None:
        dense = rtn_dequantize(out.q, out.scale, out.zero, config.group_size, config.scheme)
        if out.input_scale is not None:
            dense = dense / out.input_scale[None, :]
        if out.outlier_idx is not None:
            dense = restore(dense, out.outlier_idx, out.outlier_val)
    w.copy_(dense.to(weight_dtype or w.dtype))
    out.seconds = time.perf_counter() - t0
    return out


@torch.no_grad()
def compress_layerwise(model: nn.Module, tokenizer, config: LayerwiseConfig, n_samples: int | None = None,
                       seq_len: int | None = None, *, windows: torch.Tensor | None = None,
                       device: torch.device | str | None = None,
                       artifacts: dict[str, LinearArtifacts] | None = None,
                       weight_dtype: torch.dtype | None = None, progress: bool = True,
                       config_for: Callable[[str], LayerwiseConfig] | None = None,
                       compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Compress every Linear of ``model``'s decoder blocks in place; returns ``model``.

    Calibration: ``windows`` if given, else ``calibration_windows(tokenizer, n_samples, seq_len,
    config.seed)`` (defaults from ``config``). ``artifacts``, if given, is filled with a
    :class:`LinearArtifacts` per Linear, keyed by its full module name (``model.layers.3.mlp.up_proj``).
    ``weight_dtype``: see :func:`compress_linear` (later blocks are calibrated on the rounded weights).
    ``config_for(full_name)``, if given, is each Linear's own config (hybrid precision from a recipe);
    ``config`` then decides calibration and which statistics are gathered, so every per-Linear config
    must need no statistics that ``config`` does not. ``compute_dtype`` (e.g. float32 for a model held
    in bfloat16): blocks are calibrated and compressed in it one at a time (see
    :func:`unweight.calibrate.run_layerwise`); give ``weight_dtype`` = the held dtype with it.
    ``config.compute_dtype`` is checked, not applied: the blocks must run in it, as held or cast to
    ``compute_dtype`` (bfloat16 is never a cast: a float32 model's blocks cast down and back would lose
    their norms' and biases' low bits).
    """
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    if config.calibrated:
        runs_in = compute_dtype or next(layers.parameters()).dtype
        if runs_in != COMPUTE_DTYPES[config.compute_dtype]:
            raise UnweightError(f"config.compute_dtype is {config.compute_dtype} but the blocks would run in "
                                f"{runs_in}: hold the model in {config.compute_dtype}, or pass compute_dtype")

    def wanted(name: str, _linear: nn.Linear = None) -> bool:
        return not any(x in name for x in config.exclude)

    def process(index: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        full = f"{prefix}.{index}.{name}"
        result = compress_linear(linear, config if config_for is None else config_for(full), stats, weight_dtype)
        if artifacts is not None:
            artifacts[full] = _to_cpu(result)

    if not config.calibrated:
        for index, block in enumerate(layers):
            for name, linear in block_linears(block).items():
                if wanted(name):
                    process(index, name, linear, None)
        return model
    if windows is None:
        windows = calibration_windows(tokenizer, n_samples or config.n_samples, seq_len or config.seq_len,
                                      config.seed)
    run_layerwise(model, windows, process, stats=config.stats, batch_size=config.batch_size, device=device,
                  targets=wanted, progress=progress, compute_dtype=compute_dtype,
                  true_sequential=config.true_sequential)
    return model


def _to_cpu(a: LinearArtifacts) -> LinearArtifacts:
    values = {f.name: getattr(a, f.name) for f in fields(a)}
    return LinearArtifacts(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in values.items()})
