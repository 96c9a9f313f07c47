"""Sparse + more bits, or dense + fewer bits? Quality at (nominally) equal bits per weight.

Claim tested (issue 7, seed question): at the same storage cost, which wins -- 50% or 2:4 sparsity with
8- or 4-bit values, or dense weights at 4 or 3 bits (GPTQ, RTN), or a per-matrix K-means codebook of 8
or 16 values (arXiv 2603.17917)?

Every row compresses the decoder Linears of ``--model`` (smollm2-135m or gemma3-270m, both
**4-bit-derived**: the bundled GGUF's bf16 folder loaded in float32; group size 128 so that groups do
not align with GGUF's blocks).
Calibrated rows use ``calibration_windows(tok, 32, 512)``; sparse + quantized rows run SparseGPT, then
GPTQ on the pruned weights with the mask held (pruned weights sit on the integer zero point). Bits per
weight are **nominal** (``bench/prune_quant.py`` defines them: mask cost included -- 1 bit per weight
for unstructured masks, ceil(log2 C(M, N)) bits per group of M for N:M -- plus group scales and zero
points; K-means: ceil(log2 K) bits per weight plus a float32 codebook per matrix). The ``w+auto``
K-means rows are the clustering issue's best setting (activation-weighted, ``auto`` outliers kept
exactly) and count the measured size of the stored parts, exact weights included.

    .venv/bin/python bench/sparse_vs_bits.py [--model M] [--rows ...] [--threads N] [--out F] [--resume]

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

from prune_quant import nominal_bits, resumed  # bench/ is on sys.path when this script runs
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
    "kmeans K=8 w+auto": ("kmeans", {"k": 8, "weighted": True, "outliers": "auto"}),
    "kmeans K=16 w+auto": ("kmeans", {"k": 16, "weighted": True, "outliers": "auto"}),
}


def kmeans_model(model, k: int, weighted: bool = False, outliers: str | None = None,
                 calib: torch.Tensor | None = None) -> float:
    """Per-matrix exact K-means of every decoder Linear in place; returns bits per weight.

    Plain rows: nominal bits (ceil(log2 K) per weight plus a float32 codebook per matrix).
    ``weighted`` (each column's ||X_j||^2 on ``calib`` as importance, as ``bench/cluster.py``'s
    ``weighted+outliers``) and ``outliers`` (weights kept exactly, ``unweight.outliers``) rows: the
    measured size of unweight's stored parts (packed indices, codebook, exact weights and their
    positions), the way ``bench/cluster.py`` counts them.
    """
    from unweight.cluster import cluster_tensor, codebook_decode
    from unweight.cluster.codebook import KMeansSpec, decode, encode_kmeans
    from unweight.outliers import parse_outliers

    energy = None
    if weighted:
        from unweight.analysis.sensitivity import collect_statistics
        energy = collect_statistics(model, calib, fisher=False, progress=False).sq_norm
    prefix = next(n for n, m in model.named_modules() if m is decoder_layers(model))
    bits = weights = 0
    for index, block in enumerate(decoder_layers(model)):
        for name, linear in block_linears(block).items():
            w = linear.weight.data
            if not weighted and outliers is None:
                codebook, assignments = cluster_tensor(w.to(torch.bfloat16), k)
                w.copy_(codebook_decode(codebook, assignments, dtype=w.dtype))
                bits += w.numel() * math.ceil(math.log2(k)) + codebook.numel() * CODEBOOK_BITS
            else:
                full = f"{prefix}.{index}.{name}.weight"
                imp = energy[full].float()[None, :].expand(w.shape) if energy is not None else None
                parts = encode_kmeans(w.to(torch.bfloat16), KMeansSpec(k=k, outliers=parse_outliers(outliers)),
                                      importance=imp)
                w.copy_(decode(parts, full).to(w.dtype))
                bits += sum(t.numel() * t.element_size() * 8 for t in parts.values())
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
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (same settings) and run only the missing ones")
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
    out = Path(args.out)
    settings = {"model": args.model, "calibration": [args.n_samples, args.seq_len], "eval_tokens": len(ev) * 1023}
    old = resumed(out, args.resume, settings)
    dense_ppl = old["dense_perplexity"] if old else evaluate(model, ev, tok, progress=False).perplexity
    results = [r for r in old["rows"] if r["row"] in names] if old else []

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(settings | {
            "dense_perplexity": dense_ppl, "rows": results,
            "threads": torch.get_num_threads(), "load_avg_end": os.getloadavg()}, indent=1))

    for name in names:
        if any(r["row"] == name for r in results):
            continue
        method, settings_ = ROWS[name]
        model.load_state_dict(pristine)
        start = time.perf_counter()
        if method == "kmeans":
            bpw = kmeans_model(model, calib=calib, **settings_)
        else:
            config = LayerwiseConfig.from_method(method, **settings_)
            compress_layerwise(model, tok, config, windows=calib, progress=False)
            bpw = nominal_bits(model, config)[0]
        seconds = time.perf_counter() - start
        ppl = evaluate(model, ev, tok, progress=False).perplexity
        results.append({"row": name, "bpw": bpw, "perplexity": ppl, "seconds": seconds})
        print(f"{name:20s} {bpw:5.2f} bpw  ppl {ppl:9.3f}  ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})",
              flush=True)
        save()

    results.sort(key=lambda r: r["bpw"])
    save()
    print(f"\n{args.model} (4-bit-derived), {len(ev) * 1023} eval tokens; bf16 folder perplexity "
          f"{dense_ppl:.3f}. bpw: decoder Linears; nominal, mask cost included (K-means w+auto: measured).")
    print(f"{'row':20s} {'bpw':>6s} {'ppl':>9s} {'vs dense':>9s}")
    for r in results:
        print(f"{r['row']:20s} {r['bpw']:6.2f} {r['perplexity']:9.3f} {r['perplexity'] / dense_ppl - 1:+9.1%}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        marker = "s" if ":" in r["row"] or "%" in r["row"] else ("^" if "kmeans" in r["row"] else "o")
        ax.scatter(r["bpw"], r["perplexity"], marker=marker)
        ax.annotate(r["row"], (r["bpw"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(dense_ppl, color="gray", linestyle="--", label="bf16")
    ax.set_xlabel("nominal bits per weight (decoder Linears)")
    ax.set_ylabel("perplexity (austen eval)")
    ax.set_title(f"{args.model} (4-bit-derived): sparse + bits vs dense")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
