"""Quantization: round-to-nearest group quantization now; GPTQ, AWQ and the bits planner to come."""

from unweight.quant.rtn import (
    DEFAULT_SCHEME,
    SCHEMES,
    n_groups,
    rtn_dequantize,
    rtn_fake_quantize,
    rtn_qparams,
    rtn_quantize,
    rtn_quantize_with_qparams,
)

__all__ = [
    "DEFAULT_SCHEME",
    "SCHEMES",
    "n_groups",
    "rtn_dequantize",
    "rtn_fake_quantize",
    "rtn_qparams",
    "rtn_quantize",
    "rtn_quantize_with_qparams",
]
