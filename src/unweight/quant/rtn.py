"""Round-to-nearest (RTN) group quantization: pure tensor functions in the gpt-fast style.

Every row of a weight matrix ``[rows, cols]`` (a Linear's ``[out_features, in_features]``) is cut
along the input dimension into groups of ``group_size`` consecutive columns; each group gets its own
scale and zero. When ``cols`` is not a multiple of ``group_size`` the **last group of each row holds
the remainder**: smollm2's hidden size 576 at group 128 gives 4 groups of 128 and one of 64, so a row
has ``ceil(cols / group_size)`` groups and the quantization parameters are ``[rows, n_groups]``.
``group_size <= 0`` (or >= cols) means one group per row (per-channel).

Three schemes; q is always unsigned in ``[0, 2**bits - 1]`` (uint8, pack it with
:func:`unweight.pack.pack_bits`):

- ``"asym_int"`` (default) -- **integer zero point**, ``w = s * (q - z)``, as GPTQ's quantizer
  (Frantar et al., 2022) and AWQ (Lin et al., 2023): the group range [min, max] is widened to contain
  0, ``s = (max - min) / (2**bits - 1)``, ``z = round(-min / s)`` an integer in ``[0, 2**bits - 1]``
  (uint8). Zero is exactly representable.
- ``"asym_float"`` -- **float minimum**, ``w = min + s * q`` (the gpt-fast / HQQ form, with a float
  zero): ``s = (max - min) / (2**bits - 1)``, ``zero = min`` (float32). The group's extremes are
  representable exactly; zero generally is not. Differs noticeably from asym_int at 3-4 bits.
- ``"sym"`` -- symmetric, GPTQ's convention: ``w = s * (q - 2**(bits-1))`` with
  ``s = 2 * max|w| / (2**bits - 1)``; ``zero`` is the constant ``2**(bits-1)`` (uint8).

A group whose range is zero gets scale 1, so a constant group is rebuilt exactly (asym_float) or to
within float rounding (asym_int, whose widened range then is [min(v, 0), max(v, 0)]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unweight.errors import UnweightError

SCHEMES = ("asym_int", "asym_float", "sym")
DEFAULT_SCHEME = "asym_int"
MAX_BITS = 8


def rtn_qparams(w: torch.Tensor, bits: int, group_size: int,
                scheme: str = DEFAULT_SCHEME) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)``, both ``[rows, ceil(cols / group_size)]``.

    ``scale`` is float32; ``zero`` is uint8 (the integer zero point) for ``asym_int`` and ``sym``,
    float32 (the group minimum) for ``asym_float``.
    """
    _check(w, bits, scheme)
    groups = _grouped(w.detach().to(torch.float32), group_size)  # [rows, n_groups, g]
    qmax = (1 << bits) - 1
    if scheme == "asym_float":
        lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        scale = (hi - lo) / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), lo
    if scheme == "asym_int":
        lo = groups.amin(dim=2).clamp(max=0.0)
        hi = groups.amax(dim=2).clamp(min=0.0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, qmax)
        return scale, zero.to(torch.uint8)
    absmax = groups.abs().amax(dim=2)
    scale = 2 * absmax / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.full_like(scale, 1 << (bits - 1), dtype=torch.uint8)
    return scale, zero


def rtn_quantize_with_qparams(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                              group_size: int, scheme: str = DEFAULT_SCHEME) -> torch.Tensor:
    """Levels q (uint8, ``w.shape``) for given per-group parameters."""
    _check(w, bits, scheme)
    rows, cols = w.shape
    groups = _grouped(w.detach().to(torch.float32), group_size)
    s = scale.to(torch.float32).unsqueeze(2)
    z = zero.to(torch.float32).unsqueeze(2)
    if scheme == "asym_float":
        q = torch.round((groups - z) / s)
    else:
        q = torch.round(groups / s) + z
    q = q.clamp(0, (1 << bits) - 1).to(torch.uint8)
    return q.reshape(rows, -1)[:, :cols].contiguous()


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int,
                 scheme: str = DEFAULT_SCHEME) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group quantization of a 2-D ``w``: ``(q, scale, zero)``.

    ``q`` is uint8 ``w.shape`` in ``[0, 2**bits - 1]``; ``scale``/``zero`` as :func:`rtn_qparams`.
    """
    scale, zero = rtn_qparams(w, bits, group_size, scheme)
    return rtn_quantize_with_qparams(w, scale, zero, bits, group_size, scheme), scale, zero


def rtn_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   scheme: str = DEFAULT_SCHEME, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild ``w`` (``q.shape``, ``dtype``) from levels and per-group parameters."""
    if scheme not in SCHEMES:
        raise UnweightError(f"unknown RTN scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    rows, cols = q.shape
    expected = (rows, n_groups(cols, group_size))
    if tuple(scale.shape) != expected or tuple(zero.shape) != expected:
        raise UnweightError(f"RTN parameters of shapes {tuple(scale.shape)} / {tuple(zero.shape)} do "
                            f"not fit levels {tuple(q.shape)} at group size {group_size}: expected "
                            f"{expected}")
    groups = _grouped(q.to(torch.float32), group_size)
    s = scale.to(torch.float32).unsqueeze(2)
    z = zero.to(torch.float32).unsqueeze(2)
    w = z + s * groups if scheme == "asym_float" else s * (groups - z)
    return w.reshape(rows, -1)[:, :cols].to(dtype)


@dataclass
class GroupLevels:
    """One group-quantized matrix as stored: every weight's level ``q`` (uint8 ``[rows, cols]``), the
    per-group ``scale`` and ``zero`` (``[rows, n_groups]``, see :func:`rtn_qparams`), and how they were
    made. What exporters to other formats read."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    scheme: str

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        zero = self.zero.float() if self.zero.is_floating_point() else self.zero
        return rtn_dequantize(self.q, self.scale.float(), zero, self.group_size, self.scheme, dtype=dtype)


def rtn_fake_quantize(w: torch.Tensor, bits: int, group_size: int,
                      scheme: str = DEFAULT_SCHEME) -> torch.Tensor:
    """Quantize and dequantize in one step, in ``w``'s dtype (for measuring error)."""
    q, scale, zero = rtn_quantize(w, bits, group_size, scheme)
    return rtn_dequantize(q, scale, zero, group_size, scheme, dtype=w.dtype)


def n_groups(cols: int, group_size: int) -> int:
    """Groups per row: ``ceil(cols / group_size)``, the last one the remainder; 1 if group_size <= 0."""
    return 1 if group_size <= 0 or group_size >= cols else -(-cols // group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, n_groups, g]``; a remainder group is padded by repeating the
    row's last column, which changes neither its min, max nor absmax (the padding is cut off later)."""
    rows, cols = w.shape
    g = cols if group_size <= 0 or group_size >= cols else group_size
    pad = n_groups(cols, group_size) * g - cols
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, g)


def _check(w: torch.Tensor, bits: int, scheme: str) -> None:
    if scheme not in SCHEMES:
        raise UnweightError(f"unknown RTN scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise UnweightError(f"RTN bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    if w.ndim != 2 or w.numel() == 0:
        raise UnweightError(f"RTN expects a non-empty 2-D weight matrix, got shape {tuple(w.shape)}")
    if not w.is_floating_point() or not torch.isfinite(w).all():
        raise UnweightError("RTN expects a finite floating-point matrix")
