"""How far can a model be pruned before it collapses? Sparsity 10-90% for magnitude, Wanda and SparseGPT
(unstructured), perplexity curve and PNG.

Setup as ``bench/prune_quant.py`` (``--model smollm2-135m`` or ``gemma3-270m``, from its **4-bit-derived**
bf16 folder, calibration
``calibration_windows(tok, n, 512)`` from the calibration split, evaluation on the first
``--eval-tokens`` tokens of the evaluation split in windows of 1024). Perplexities in the thousands and
above are a collapse and are not compared (DESIGN.md).

    .venv/bin/python bench/prune_sweep.py [--model M] [--sparsities 0.1,0.2,...] [--methods magnitude,wanda,sparsegpt]
        [--out F] [--resume]

Prints a table, writes JSON (``--out``, default ``bench/results/prune_sweep.json``) and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from prune_quant import resumed  # bench/ is on sys.path when this script runs
from unweight.calibrate import calibration_windows
from unweight.data import corpus
from unweight.eval.perplexity import evaluate, token_windows
from unweight.layerwise import LayerwiseConfig, compress_layerwise
from unweight.models import hf_folder, load_causal_lm

COLLAPSE = 1000.0  # perplexity above which a result is a collapse, not a number to compare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="bench/results/prune_sweep.json")
    ap.add_argument("--resume", action="store_true",
                    help="keep the points already in --out (same settings) and run only the missing ones")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]

    model, tok = load_causal_lm(str(hf_folder(args.model)))
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    ev = token_windows(tok, corpus("austen", "eval"), 1024, max_tokens=args.eval_tokens)
    calib = calibration_windows(tok, args.n_samples, args.seq_len, seed=0)
    out = Path(args.out)
    settings = {"model": args.model, "eval_tokens": len(ev) * 1023, "calibration": [args.n_samples, args.seq_len]}
    old = resumed(out, args.resume, settings)
    dense = old["dense_perplexity"] if old else evaluate(model, ev, tok, progress=False).perplexity
    print(f"dense (bf16 folder, 4-bit-derived): perplexity {dense:.3f}", flush=True)
    results = {m: dict(old["perplexity"].get(m, {})) if old else {} for m in methods}
    seconds = {m: dict(old["seconds"].get(m, {})) if old else {} for m in methods}

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(settings | {
            "dense_perplexity": dense, "collapse_above": COLLAPSE, "perplexity": results,
            "seconds": seconds, "threads": torch.get_num_threads(), "load_avg_end": os.getloadavg()}, indent=1))

    for method in methods:
        for s in sparsities:
            if str(s) in results[method]:
                continue
            model.load_state_dict(pristine)
            start = time.perf_counter()
            compress_layerwise(model, tok, LayerwiseConfig(prune=method, sparsity=s), windows=calib,
                               progress=False)
            seconds[method][str(s)] = time.perf_counter() - start
            results[method][str(s)] = evaluate(model, ev, tok, progress=False).perplexity
            print(f"{method:10s} {s:4.0%} ppl {results[method][str(s)]:12.3f}  ({seconds[method][str(s)]:.0f} s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)
            save()
    save()

    def fmt(p):
        return f"{p:10.2f}" if p < COLLAPSE else f"{'collapse':>10s}"

    print(f"\n{args.model} (4-bit-derived), perplexity on {len(ev) * 1023} eval tokens; dense {dense:.2f}")
    print(f"{'sparsity':>8s} " + " ".join(f"{m:>10s}" for m in methods))
    for s in sparsities:
        print(f"{s:8.0%} " + " ".join(fmt(results[m][str(s)]) for m in methods))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        ax.plot([s * 100 for s in sparsities], [results[m][str(s)] for s in sparsities], marker="o", label=m)
    ax.axhline(dense, color="gray", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("unstructured sparsity of decoder Linears (%)")
    ax.set_ylabel("perplexity (austen eval)")
    ax.set_title(f"{args.model} (4-bit-derived weights)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
