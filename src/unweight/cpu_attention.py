"""Causal attention of bf16 queries, keys and values on the CPU, by AVX512-BF16 tiles (``unweight.dpbf16``).

Calibration runs each decoder block's forward on a few windows of full length (no padding), so every
attention is plainly causal. torch's CPU flash attention (``scaled_dot_product_attention``) handles a
512-token window as one block of keys: it computes the whole square, causal or not (69.6 against 71.1
ms for smollm2-135m's eight windows, one thread), at about 70 GFLOP/s. Here, for each head and each
block of 64 queries, only the keys up to the block's last query are visited:

1. ``S^T = K Q^T`` (keys by queries) in float32 sums of exact bf16 products, ``vdpbf16ps`` tiles of
   4 keys by 64 queries, the inner dimension paired (two head dimensions per 32-bit word);
2. the softmax down each column of ``S^T`` (each query's keys), vectorised over the 64 queries: the
   causal mask on the diagonal block, the column maximum, ``exp`` by :func:`_exp`, the column sums in
   float32; the probabilities rounded to bf16 and paired along the keys;
3. ``O = P V`` by the same tiles (4 queries by 64 head dimensions, keys paired), divided by the sums.

Rounding as torch's flash attention for bf16 does: float32 scores, sums of unrounded probabilities,
bf16 probabilities in the second product, the output rounded once to bf16.

Measured (``bench/attention_speed.py``, one thread, AMD EPYC Zen 4, the models' own queries, keys and values
over 8 x 512 calibration tokens; ``docs/results/attention-speed.json``): 27.5 against SDPA's 75.7 ms per call
on smollm2-135m (2.75x), 37.8 against 112.9 on gemma3-270m (2.98x), the same error against float64 attention.
At two threads (the heads split between them; random tensors of the same shapes): 20.9 against SDPA's 39.5 ms,
26.1 against 54.0.

Used through transformers' attention interface under :data:`NAME` (:func:`attention`); anything this
kernel does not cover (a mask other than the causal pattern, e.g. padding; dropout, soft-capping, a
sliding window shorter than the sequence, one query, head sizes not a multiple of 64, another device
or dtype, no AVX512-BF16) goes to transformers' SDPA path unchanged. :func:`calibration_attention`
switches a model to it for the duration of a calibration.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from unweight import dpbf16
from unweight.jit_cache import source_stamp

NAME = "unweight_cpu_causal"
QUERIES = 64  # queries per block: the tile width of S^T
KEY_ROWS = 4  # keys per tile of S^T, queries per tile of O
PAIRS_PER_BLOCK = dpbf16.PAIRS_PER_BLOCK  # key pairs per block of sums in O's tiles

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)  # ln 2 = HI + LO


@intrinsic
def _f32_from_bits(typingctx, v):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@intrinsic
def _bits_from_f32(typingctx, v):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return sig, codegen


@njit(inline="always")
def _exp(x):
    """``e^x`` for ``x <= 0`` in float32, within 2e-7 relative down to -87 (1.02e-7 measured; ``-inf``, and
    anything below about -87.5, gives 0): ``2^n e^r`` with ``n`` the nearest integer to ``x / ln 2``, ``r = x - n ln 2``
    in two parts (Cody and Waite) so that it is exact, and ``e^r`` by its degree-7 Taylor polynomial
    (``|r| <= ln 2 / 2``). Branch-free, so the loops around it vectorise."""
    xc = max(x, np.float32(-88.0))
    n = np.float32(np.floor(xc * _LOG2E + np.float32(0.5)))
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _bf16_bits(x):
    """The bf16 nearest ``x`` (ties to even; ``x`` finite), as the low 16 bits of an int32."""
    u = _bits_from_f32(x)
    return (u + np.int32(0x7FFF) + ((u >> np.int32(16)) & np.int32(1))) >> np.int32(16) & np.int32(0xFFFF)


_tile = dpbf16.tile_kernel(KEY_ROWS)  # a global, not a closure variable: numba's disk cache key is then stable


@functools.cache
def _kernel():
    qb, kr, blk = QUERIES, KEY_ROWS, PAIRS_PER_BLOCK
    stamp = source_stamp(dpbf16, sys.modules[__name__])  # closed over: see unweight.jit_cache

    @njit(cache=True, nogil=True)  # compiling takes ~1.2 s, a disk-cached load a few ms
    def attend(qp, kp, vp, out, scale, nb, nh, nkv, n, n_pad, d, bh0, bh1, st, pp, ob, mx, sm):
        """``out[b, t, h, :]`` (bf16 bits) = causal attention of query ``t`` of head ``h`` in batch ``b``,
        for ``b * nh + h`` in ``[bh0, bh1)``. ``qp``: ``[b, h, d/2, n_pad]``, ``kp``: ``[b, kv, d/2, n_pad]``
        (pairs of head dimensions), ``vp``: ``[b, kv, n_pad/2, d]`` (pairs of keys), all flat int32; the rest
        are one thread's work buffers."""
        assert stamp != 0
        half = d // 2
        group = nh // nkv
        for bh in range(bh0, bh1):
            b, h = bh // nh, bh % nh
            g = b * nkv + h // group
            qoff, koff, voff = bh * half * n_pad, g * half * n_pad, g * (n_pad // 2) * d
            for q0 in range(0, n, qb):
                kn = q0 + qb  # keys 0 .. kn - 1: up to this block's last query (padding keys are masked)
                st[:kn * qb] = 0.0
                for j0 in range(0, kn, kr):
                    _tile(kp, qp, st, koff + j0, qoff + q0, j0, 0, 0, half, n_pad, n_pad, qb)
                for j in range(q0, kn):  # the diagonal block: key j sees queries q0 + r with r >= j - q0
                    for r in range(j - q0):
                        st[j * qb + r] = -np.inf
                mx[:] = -np.inf
                for j in range(kn):
                    for r in range(qb):
                        mx[r] = max(mx[r], st[j * qb + r])
                sm[:] = 0.0
                for j in range(kn):
                    for r in range(qb):
                        e = _exp((st[j * qb + r] - mx[r]) * scale)
                        sm[r] += e
                        st[j * qb + r] = e
                for jp in range(kn // 2):
                    for r in range(qb):
                        pp[jp * qb + r] = (_bf16_bits(st[2 * jp * qb + r])
                                           | (_bf16_bits(st[(2 * jp + 1) * qb + r]) << np.int32(16)))
                ob[:qb * d] = 0.0
                for p0 in range(0, kn // 2, blk):
                    p1 = min(p0 + blk, kn // 2)
                    for r0 in range(0, qb, kr):
                        for d0 in range(0, d, 64):
                            _tile(pp, vp, ob, r0, voff + d0, r0, d0, p0, p1, qb, d, d)
                for r in range(min(qb, n - q0)):
                    base = ((b * n + q0 + r) * nh + h) * d
                    inv = np.float32(1.0) / sm[r]
                    for c in range(d):
                        out[base + c] = np.int16(_bf16_bits(ob[r * d + c] * inv))

    return attend


def available() -> bool:
    """Whether this machine has the kernel (AVX512-BF16, numba compiling for it)."""
    return dpbf16.available()


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`causal_attention` takes these (``[batch, heads, tokens, head_dim]``) tensors."""
    nb, nh, n, d = query.shape
    return (available() and all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in (query, key, value))
            and n > 1 and d % 64 == 0 and key.shape == value.shape and key.shape[0] == nb and key.shape[2] == n
            and key.shape[3] == d and key.shape[1] > 0 and nh % key.shape[1] == 0)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * Q K^T + causal mask) V`` for bf16 ``query`` ``[batch, heads, n, d]`` and
    ``key``/``value`` ``[batch, kv_heads, n, d]`` (grouped-query: head ``h`` reads kv head
    ``h // (heads / kv_heads)``), returned as ``[batch, n, heads, d]`` bf16 (transformers' layout for
    an attention function's output), the heads split over torch's thread count. Callers check
    :func:`supports`."""
    if not supports(query, key, value):
        raise ValueError(f"no bf16 causal attention kernel for {tuple(query.shape)}, {tuple(key.shape)}")
    nb, nh, n, d = query.shape
    nkv = key.shape[1]
    n_pad = -(-n // QUERIES) * QUERIES

    def padded(t):  # [.., n, d] -> [.., n_pad, d], zeros after the last token; one copy in all below
        if n_pad > n:
            return torch.nn.functional.pad(t, (0, 0, 0, n_pad - n))
        return t if t.stride(-1) == 1 and all(s % 2 == 0 for s in t.stride()[:-1]) else t.contiguous()

    def paired_dims(t):  # [.., n, d] -> [.., d/2, n_pad]: two head dimensions per int32
        return padded(t).view(torch.int32).transpose(-1, -2).contiguous()

    qp, kp = paired_dims(query), paired_dims(key)
    # [.., n, d] -> [.., n_pad/2, d]: pairs of keys (transformers' tensors are [batch, n, heads, d] in memory)
    vp = padded(value).reshape(nb, nkv, n_pad // 2, 2, d).transpose(-1, -2).contiguous().view(torch.int32)
    out = torch.empty(nb, n, nh, d, dtype=torch.bfloat16)
    args = (qp.numpy().reshape(-1), kp.numpy().reshape(-1), vp.numpy().reshape(-1),
            out.view(torch.int16).numpy().reshape(-1), np.float32(scale), nb, nh, nkv, n, n_pad, d)
    threads = max(1, min(torch.get_num_threads(), nb * nh))
    cuts = [nb * nh * i // threads for i in range(threads + 1)]

    def heads(i: int) -> None:  # heads cuts[i] .. cuts[i+1] - 1, with work buffers of their own
        _kernel()(*args, cuts[i], cuts[i + 1], np.empty(n_pad * QUERIES, np.float32),
                  np.empty(n_pad // 2 * QUERIES, np.int32), np.empty(QUERIES * d, np.float32),
                  np.empty(QUERIES, np.float32), np.empty(QUERIES, np.float32))

    if threads == 1:
        heads(0)
    else:  # the kernel releases the GIL; each (batch, head) is computed alone, so the result is the same
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(heads, range(threads)))
    return out


def _is_causal_mask(mask: torch.Tensor, n: int) -> bool:
    """Whether ``mask`` (boolean, True = attend, broadcast over batch and heads) is exactly the causal
    pattern of ``n`` tokens: e.g. a sliding-window mask whose window covers the whole sequence."""
    return (mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[-2:] == (n, n)
            and torch.equal(mask, torch.ones(n, n, dtype=torch.bool, device=mask.device).tril().expand_as(mask)))


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs):
    """A transformers attention function (``AttentionInterface``): :func:`causal_attention` where it
    applies, else transformers' SDPA path with the same arguments."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    if (causal and not dropout and supports(query, key, value)
            and (attention_mask is None or _is_causal_mask(attention_mask, n))
            and (window is None or window >= n) and not kwargs.get("output_attentions")
            and all(kwargs.get(k) is None for k in ("softcap", "s_aux", "sinks", "position_bias"))):
        return causal_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks as for SDPA: none where causal alone will do


def _configs(config) -> list:
    """``config`` and its sub-configs (a multimodal model's text and vision parts), at any depth."""
    found, todo = [], [config]
    while todo:
        c = todo.pop()
        found.append(c)
        todo += [sub for key in getattr(c, "sub_configs", {}) if (sub := getattr(c, key, None)) is not None]
    return found


@contextlib.contextmanager
def calibration_attention(model: torch.nn.Module):
    """Within the block, ``model`` (a transformers model using SDPA in all its parts) attends through
    :func:`attention`, if this machine has the kernel; SDPA is restored afterwards. Other models are left
    as they are."""
    config = getattr(model, "config", None)
    if (not available() or config is None or not hasattr(model, "set_attn_implementation")
            or any(getattr(c, "_attn_implementation", None) != "sdpa" for c in _configs(config))
            or not model._can_set_attn_implementation()):
        yield
        return
    _register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")
