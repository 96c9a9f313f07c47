"""Sparse + more bits, or dense + fewer bits? Quality at (nominally) equal bits per weight on smollm2-135m.

Claim tested (issue 7, seed question): at the same storage cost, which wins -- 50% or 2:4 sparsity with
8- or 4-bit values, or dense weights at 4 or 3 bits (GPTQ, RTN), or a per-matrix K-means codebook of 8
or 16 values (arXiv 2603.17917)?

Every row compresses the decoder Linears of smollm2-135m (**4-bit-derived**: the bundled Q4_1 GGUF,
bf16 folder loaded in float32; group size 128 so that groups do not align with GGUF's blocks).
Calibrated rows use ``calibration_windows(tok, 32, 512)``; sparse + quantized rows run SparseGPT, then
GPTQ on the pruned weights with the mask held (pruned weights sit on the integer zero point). Bits per
weight are **nominal** (``bench/prune_quant.py`` defines them: mask cost included -- 1 bit per weight
for unstructured masks, ceil(log2 C(M, N)) bits per group of M for N:M -- plus group scales and zero
points; K-means: ceil(log2 K) bits per weight plus a float32 codebook per matrix).

    .venv/bin/python bench/sparse_vs_bits.py [--rows ...] [--threads N]

Prints a table sorted by bits per weight, writes JSON (``--out``, default
``bench/results/sparse_vs_bits.json``) and a PNG (perplexity against bits per weight) next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from prune_quant import nominal_bits  # bench/ is on sys.path when this script runs
from unweight.calibrate import block_linears, calibration_windows, decoder_layers
from unweight.data import corpus
from unweight.eval.perplexity import evaluate, token_windows
from unweight.layerwise import LayerwiseConfig, compress_layerwise
from unweight.models import hf_folder, load_causal_lm

CODEBOOK_BITS = 32  # a float32 codebook entry
ROWS = {
    "dense gptq4": ("gptq", {"bits": 4}),
    "dense rtn4": ("rtn", {"bits": 4}),
    "dense gptq3": ("gptq", {"bits": 3}),
    "dense rtn3": ("rtn", {"bits": 3}),
    "2:4 + gptq8": ("sparsegpt", {"pattern": "2:4", "bits": 8}),
    "2:4 + gptq4": ("sparsegpt", {"pattern": "2:4", "bits": 4}),
    "50% + gptq8": ("sparsegpt", {"sparsity": 0.5, "bits": 8}),
    "50% + gptq4": ("sparsegpt", {"sparsity": 0.5, "bits": 4}),
    "kmeans K=8": ("kmeans", {"k": 8}),
    "kmeans K=16": ("kmeans", {"k": 16}),
}


def kmeans_model(model, k: int) -> float:
    """Per-matrix exact K-means (unweighted) of every decoder Linear in place; returns nominal bpw."""
    from unweight.cluster import cluster_tensor, codebook_decode

    bits = weights = 0
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            w = linear.weight.data
            codebook, assignments = cluster_tensor(w.to(torch.bfloat16), k)
            w.copy_(codebook_decode(codebook, assignments, dtype=w.dtype))
            bits += w.numel() * math.ceil(math.log2(k)) + codebook.numel() * CODEBOOK_BITS
            weights += w.numel()
    return bits / weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated: {', '.join(ROWS)}")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/sparse_vs_bits.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.rows.split(",")
    if unknown := [n for n in names if n not in ROWS]:
        sys.exit(f"unknown rows {unknown}; valid: {', '.join(ROWS)}")

    model, tok = load_causal_lm(str(hf_folder(args.model)))
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    ev = token_windows(tok, corpus("austen", "eval"), 1024, max_tokens=args.eval_tokens)
    calib = calibration_windows(tok, args.n_samples, args.seq_len, seed=0)
    dense = evaluate(model, ev, tok, progress=False)
    results = []
    for name in names:
        method, settings = ROWS[name]
        model.load_state_dict(pristine)
        start = time.perf_counter()
        if method == "kmeans":
            bpw = kmeans_model(model, settings["k"])
        else:
            config = LayerwiseConfig.from_method(method, **settings)
            compress_layerwise(model, tok, config, windows=calib, progress=False)
            bpw = nominal_bits(model, config)[0]
        seconds = time.perf_counter() - start
        ppl = evaluate(model, ev, tok, progress=False).perplexity
        results.append({"row": name, "bpw": bpw, "perplexity": ppl, "seconds": seconds})
        print(f"{name:14s} {bpw:5.2f} bpw  ppl {ppl:9.3f}  ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})",
              flush=True)

    results.sort(key=lambda r: r["bpw"])
    print(f"\nsmollm2-135m (4-bit-derived), {dense.tokens} eval tokens; bf16 folder perplexity "
          f"{dense.perplexity:.3f}. bpw: nominal, decoder Linears, mask cost included.")
    print(f"{'row':14s} {'bpw':>6s} {'ppl':>9s} {'vs dense':>9s}")
    for r in results:
        print(f"{r['row']:14s} {r['bpw']:6.2f} {r['perplexity']:9.3f} {r['perplexity'] / dense.perplexity - 1:+9.1%}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "dense_perplexity": dense.perplexity,
                               "eval_tokens": dense.tokens, "calibration": [args.n_samples, args.seq_len],
                               "rows": results, "threads": torch.get_num_threads(),
                               "load_avg_end": os.getloadavg()}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        marker = "s" if ":" in r["row"] or "%" in r["row"] else ("^" if "kmeans" in r["row"] else "o")
        ax.scatter(r["bpw"], r["perplexity"], marker=marker)
        ax.annotate(r["row"], (r["bpw"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(dense.perplexity, color="gray", linestyle="--", label="bf16")
    ax.set_xlabel("nominal bits per weight (decoder Linears)")
    ax.set_ylabel("perplexity (austen eval)")
    ax.set_title("smollm2-135m (4-bit-derived): sparse + bits vs dense")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
