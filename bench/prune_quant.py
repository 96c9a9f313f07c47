"""Every pruning and quantization method at its standard setting on a model: quality and time.

Claim (issue 7): unweight's magnitude, Wanda, SparseGPT (50% and 2:4), RTN, GPTQ (4 and 3 bits, g128)
and AWQ (4 bits, g128) reach the quality the papers report relative to one another (SparseGPT <=
Wanda < magnitude; GPTQ and AWQ < RTN), with one layer-by-layer driver.

Setup (pinned):

- model: ``hf_folder(--model)`` (default smollm2-135m; gemma3-270m), the bundled GGUF converted to bf16 and
  loaded in float32
  -- **4-bit-derived weights**: a 4-bit quantizer with groups aligned to GGUF's 32-weight blocks would
  rebuild them almost exactly, hence group size 128, which does not align with the 576-column rows
  (4 groups of 128 + a remainder group of 64 per row);
- calibration: ``calibration_windows(tok, 32, 512, seed=0)`` (``--calib-seed``) from the calibration split (Sense and
  Sensibility), disjoint from evaluation;
- evaluation: ``token_windows(tok, corpus("austen", "eval"), 1024, max_tokens=8192)``; KL and top-1
  agreement against ``load_causal_lm(--model)`` (the GGUF, dequantized by transformers);
- bits per weight: **nominal**, over the decoder Linears only (embedding, norms excluded), as the
  layout would store them: levels at ``bits``, an fp16 scale and a ``bits``-wide integer zero per
  group (actual groups, remainder included), AWQ's fp16 input scale per column; unstructured sparsity
  a 1-bit mask per weight plus the kept values; N:M a ``ceil(log2(C(M, N)))``-bit pattern per group of
  M plus the kept values; unquantized values count 16 bits (bf16). Measured on-disk sizes come with
  the lead's formats.
- time: wall seconds of ``compress_layerwise`` (capture, statistics, method, propagation), in the
  same run as every other row;
- ``--dtype bfloat16``: the model is held and its calibration forwards run in bf16 (``compress
  --compute-dtype bfloat16``; statistics and methods in float32), each result copied into the float32
  model for scoring, so only the calibration differs.

    .venv/bin/python bench/prune_quant.py [--methods gptq4,awq4] [--threads N] [--quick]

Prints a table and writes JSON (``--out``, default ``bench/results/prune_quant.json``). Run it alone:
other processes on 2 cores slow PyTorch 3-10x (the load average is recorded next to the figures).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from unweight.calibrate import block_linears, calibration_windows, decoder_layers
from unweight.data import corpus
from unweight.eval.perplexity import evaluate, token_windows
from unweight.layerwise import LayerwiseConfig, compress_layerwise
from unweight.models import hf_folder, load_causal_lm
from unweight.prune.nm import parse_pattern
from unweight.quant.rtn import n_groups

FP_BITS = 16  # unquantized values, scales and AWQ input scales are stored as 16-bit floats
SETTINGS = {  # in the order they run: the cheap ones first
    "rtn4": ("rtn", {"bits": 4, "group_size": 128}),
    "rtn3": ("rtn", {"bits": 3, "group_size": 128}),
    "magnitude-50": ("magnitude", {"sparsity": 0.5}),
    "magnitude-2:4": ("magnitude", {"pattern": "2:4"}),
    "wanda-50": ("wanda", {"sparsity": 0.5}),
    "wanda-2:4": ("wanda", {"pattern": "2:4"}),
    "sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}),
    "sparsegpt-2:4": ("sparsegpt", {"pattern": "2:4"}),
    "gptq4": ("gptq", {"bits": 4, "group_size": 128}),
    "gptq4-static": ("gptq", {"bits": 4, "group_size": 128, "static_groups": True}),
    "gptq3": ("gptq", {"bits": 3, "group_size": 128}),
    "gptq3-static": ("gptq", {"bits": 3, "group_size": 128, "static_groups": True}),
    "awq4": ("awq", {"bits": 4, "group_size": 128}),
}


def resumed(out: Path, resume: bool, settings: dict) -> dict | None:
    """The JSON already in ``out`` when resuming, or None; exits if it was written with other
    ``settings`` (each key must hold the same value there)."""
    if not (resume and out.exists()):
        return None
    old = json.loads(out.read_text())
    if any(old.get(k) != v for k, v in settings.items()):
        sys.exit(f"{out} was written with other settings; run without --resume or change --out")
    return old


def nominal_bits(model, config: LayerwiseConfig) -> tuple[float, float]:
    """(bits per weight, fraction of zeros) over the decoder Linears, as described in the docstring."""
    bits = weights = zeros = 0
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            rows, cols = linear.weight.shape
            numel = rows * cols
            zeros += (linear.weight == 0).sum().item()
            value_bits = config.bits if config.quant else FP_BITS
            if config.pattern:
                n, m = parse_pattern(config.pattern)
                b = numel * n / m * value_bits + numel / m * math.ceil(math.log2(math.comb(m, n)))
            elif config.prune:
                b = numel * (1 - config.sparsity) * value_bits + numel
            else:
                b = numel * value_bits
            if config.quant:
                b += rows * n_groups(cols, config.group_size) * (FP_BITS + config.bits)
            if config.quant == "awq":
                b += cols * FP_BITS
            bits, weights = bits + b, weights + numel
    return bits / weights, zeros / weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(SETTINGS), help=f"comma-separated: {', '.join(SETTINGS)}")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration windows")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-kl", action="store_true", help="skip KL/top-1 (halves evaluation time)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 calibration, 2048 eval tokens")
    ap.add_argument("--out", default="bench/results/prune_quant.json")
    ap.add_argument("--true-sequential", action="store_true",
                    help="calibrated methods: each Linear calibrated after the ones before it, one forward per block")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="what the calibration forwards compute in (bfloat16: the model held and run in bf16, "
                         "statistics and methods still in float32; scoring always in float32)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out (same settings) and run only the missing methods")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.n_samples, args.seq_len, args.eval_tokens = 4, 128, 2048
    names = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in names if m not in SETTINGS]:
        sys.exit(f"unknown methods {unknown}; valid: {', '.join(SETTINGS)}")

    load_start = os.getloadavg()
    base, tok = load_causal_lm(args.model)
    model, _ = load_causal_lm(str(hf_folder(args.model)))  # scored in float32
    # compressed in place: the same model, or a bf16 copy whose results are copied into it for scoring
    work = model if args.dtype == "float32" else load_causal_lm(str(hf_folder(args.model)), dtype=torch.bfloat16)[0]
    pristine = {k: v.clone() for k, v in work.state_dict().items()}
    ev = token_windows(tok, corpus("austen", "eval"), args.eval_seq_len, max_tokens=args.eval_tokens)
    calib = calibration_windows(tok, args.n_samples, args.seq_len, seed=args.calib_seed)
    ref = None if args.no_kl else base

    def score(m, desc):
        return evaluate(m, ev, tok, base=ref if m is not base else None, progress=False, desc=desc)

    out = Path(args.out)
    n_windows = len(ev)
    n_tokens = n_windows * (args.eval_seq_len - 1)  # predicted tokens scored
    settings = {"model": args.model,
                "calibration": {"corpus": "austen/calib", "n_samples": args.n_samples, "seq_len": args.seq_len,
                                "seed": args.calib_seed, "true_sequential": args.true_sequential,
                                "dtype": args.dtype},
                "evaluation": {"corpus": "austen/eval", "seq_len": args.eval_seq_len, "tokens": n_tokens,
                               "windows": n_windows}}

    def save(rows):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "claim": f"issue 7: methods at standard settings on {args.model} (4-bit-derived weights)",
            **settings,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "load_avg_start": load_start,
                        "load_avg_now": os.getloadavg()},
            "rows": rows,
        }, indent=1, default=str))

    previous = resumed(out, args.resume, settings)
    if previous:
        rows = previous["rows"]
        names = [n for n in names if n not in {row["method"] for row in rows}]
        print(f"resuming {out}: {len(rows)} rows kept, running {', '.join(names) or 'nothing'}", flush=True)
    else:
        t0 = time.perf_counter()
        rows = []
        r = score(base, "base")
        rows.append({"method": "base (GGUF, fp32)", "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte,
                     "kl": 0.0, "top1": 1.0, "bpw": None, "sparsity": 0.0, "seconds": 0.0,
                     "eval_tokens_per_s": r.tokens_per_s})
        r = score(model, "bf16")
        rows.append({"method": "bf16 folder (start)", "perplexity": r.perplexity,
                     "bits_per_byte": r.bits_per_byte, "kl": r.kl, "top1": r.top1_agreement, "bpw": 16.0,
                     "sparsity": 0.0, "seconds": 0.0, "eval_tokens_per_s": r.tokens_per_s})
        print(f"base {rows[0]['perplexity']:.3f}, bf16 folder {rows[1]['perplexity']:.3f} "
              f"({r.tokens} tokens, {time.perf_counter() - t0:.0f} s)", flush=True)
        save(rows)
    for name in names:
        method, setting = SETTINGS[name]
        work.load_state_dict(pristine)
        config = LayerwiseConfig.from_method(method, n_samples=args.n_samples, seq_len=args.seq_len,
                                             true_sequential=args.true_sequential, compute_dtype=args.dtype,
                                             **setting)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        compress_layerwise(work, tok, config, windows=calib, progress=False)
        seconds = time.perf_counter() - start
        if work is not model:
            model.load_state_dict({k: v.to(torch.float32) for k, v in work.state_dict().items()})
        bpw, zeros = nominal_bits(model, config)
        r = score(model, name)
        rows.append({"method": name, "setting": config.describe(), "config": vars(config) | {"exclude": []},
                     "perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "kl": r.kl,
                     "top1": r.top1_agreement, "bpw": bpw, "sparsity": zeros, "seconds": seconds,
                     "load_avg_1min": load, "eval_tokens_per_s": r.tokens_per_s})
        print(f"{name:14s} ppl {r.perplexity:9.3f}  kl {r.kl if r.kl is not None else float('nan'):.4f}  "
              f"{bpw:5.2f} bpw  {seconds:7.1f} s  (load {load:.1f})", flush=True)
        save(rows)

    print(f"\n{args.model} (4-bit-derived: the bundled GGUF), eval: austen eval split, first "
          f"{n_windows * args.eval_seq_len} tokens in windows of {args.eval_seq_len}; calibration {args.n_samples} x "
          f"{args.seq_len} tokens of the calib split. bpw: nominal, decoder Linears.")
    print(f"{'method':22s} {'ppl':>9s} {'vs base':>8s} {'KL':>8s} {'top-1':>6s} {'bpw':>6s} {'zeros':>6s} {'time s':>8s}")
    base_ppl = rows[0]["perplexity"]
    for row in rows:
        kl = f"{row['kl']:.4f}" if row["kl"] is not None else "-"
        top1 = f"{row['top1']:.3f}" if row["top1"] is not None else "-"
        bpw = f"{row['bpw']:.2f}" if row["bpw"] is not None else "-"
        print(f"{row['method']:22s} {row['perplexity']:9.3f} {row['perplexity'] / base_ppl - 1:+8.1%} {kl:>8s} "
              f"{top1:>6s} {bpw:>6s} {row['sparsity']:6.1%} {row['seconds']:8.1f}")

    save(rows)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
