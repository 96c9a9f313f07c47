"""Per-matrix K-means (arXiv 2603.17917) against round-to-nearest at measured bits per weight, smollm2-135m.

Rows: K-means at each K in ``--ks`` with the variants

- ``plain``: exact per-matrix K-means (``unweight.cluster``);
- ``weighted``: each value weighted by its input column's activation energy ||X_j||^2 (calibration);
- ``outliers``: ``--outliers auto`` dense-and-sparse (``unweight.outliers``);
- ``outliers+affine``: then the moment-matching affine correction per matrix
  (``unweight.cluster.affine.fit_moments``, fitted on the non-outlier weights, applied to the codebook);
- ``outliers+finetune``: then centroid-only fine-tuning (``unweight.cluster.finetune``) for
  ``--finetune-steps`` Adam steps on calibration windows (``calibration_windows(tok, n, seq_len)``);

and RTN (asymmetric integer zero point, group 128) at 3 and 4 bits. The corrections are stacked on the
outliers variant because without outliers smollm2 collapses at K <= 16 (issue 8).

Evaluation: perplexity and KL(base || model) on ``token_windows(tok, corpus("austen", "eval"), 512,
max_tokens=--eval-tokens)``: by default only the first 2,048 tokens (4 windows), a short slice chosen
for the time a loaded 2-core machine allows; differences below ~1% are within its noise. Bits per
weight are measured from the stored parts (codebooks, packed indices, headers, outliers) over the
decoder Linears; the clustering time is the encode wall time summed over them.

Caveat: smollm2-135m is **4-bit-derived** (bundled Q4 GGUF): a matrix holds only ~10k distinct values,
so per-matrix K=64 sees a much easier histogram than a full-precision model; these figures flatter
clustering.

    .venv/bin/python bench/cluster.py [--ks 16 64] [--variants ...] [--finetune-steps 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unweight.calibrate import calibration_windows
from unweight.cluster.affine import apply_affine, fit_moments
from unweight.cluster.codebook import KMeansSpec, RTNSpec, decode, encode_kmeans, encode_rtn
from unweight.cluster.finetune import finetune_centroids
from unweight.cluster.runtime import clustered_from_parts
from unweight.data import corpus
from unweight.eval.perplexity import token_windows
from unweight.models import hf_folder, load_causal_lm
from unweight.targets import is_target

MODEL = "smollm2-135m"
EVAL_SEQ_LEN = 512
VARIANTS = ("plain", "weighted", "outliers", "outliers+affine", "outliers+finetune")
RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def base_log_probs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    return [F.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1) for w in windows]


@torch.no_grad()
def score(model, windows: torch.Tensor, base: list[torch.Tensor]) -> dict:
    """Perplexity and mean KL(base || model) per token, on the same windows as ``base``."""
    nll, kl, n = 0.0, 0.0, 0
    for w, b in zip(windows, base):
        logp = F.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1)
        nll -= logp.gather(1, w[1:, None]).sum().item()
        kl += F.kl_div(logp, b, log_target=True, reduction="sum").item()
        n += w.numel() - 1
    return {"perplexity": math.exp(nll / n), "kl": kl / n}


def parts_bits(parts: dict) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in parts.values())


def encode_all(originals: dict, encode) -> tuple[dict, float]:
    t0 = time.perf_counter()
    parts = {name: encode(name, w) for name, w in originals.items()}
    return parts, time.perf_counter() - t0


def load(model, originals: dict, weights: dict) -> None:
    with torch.no_grad():
        for name in originals:
            model.get_parameter(name).copy_(weights[name].float())


def affine_codebooks(originals: dict, parts_by_name: dict) -> dict:
    """Each codebook moved by the moment-matching (a, b) fitted on the matrix's non-outlier weights."""
    out = {}
    for name, parts in parts_by_name.items():
        m = clustered_from_parts(parts, name)
        keep = torch.ones(m.assignments.numel(), dtype=torch.bool)
        if m.outlier_idx is not None:
            keep[m.outlier_idx] = False
        wq = decode(parts, name).reshape(-1)[keep]
        affine = fit_moments(originals[name].reshape(-1)[keep], wq)
        out[name] = {**parts, "codebook": apply_affine(parts["codebook"], affine)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--rtn-bits", type=int, nargs="*", default=[3, 4])
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--calib-samples", type=int, default=4)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--finetune-seq-len", type=int, default=128)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "cluster.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = hf_folder(MODEL)
    model, tok = load_causal_lm(str(folder))
    originals = {n: p.detach().bfloat16().clone() for n, p in model.named_parameters()
                 if is_target(n, tuple(p.shape))}
    numel = sum(w.numel() for w in originals.values())
    windows = token_windows(tok, corpus("austen", "eval"), EVAL_SEQ_LEN, max_tokens=args.eval_tokens)
    t0 = time.perf_counter()
    base = base_log_probs(model, windows)
    base_ppl = score(model, windows, base)["perplexity"]
    forward_s = (time.perf_counter() - t0) / 2
    print(f"{MODEL}: {len(originals)} matrices, {numel:,} weights; eval {windows.numel()} tokens "
          f"({windows.numel() / forward_s:.0f} tokens/s, load {os.getloadavg()[0]:.1f}); base ppl {base_ppl:.3f}",
          flush=True)

    energy = {}
    if "weighted" in args.variants:
        from unweight.analysis.sensitivity import collect_statistics

        calib = calibration_windows(tok, args.calib_samples, args.calib_seq_len)
        stats = collect_statistics(model, calib, fisher=False, progress=False)
        energy = {n: v.float() for n, v in stats.sq_norm.items()}
    ft_windows = calibration_windows(tok, max(1, min(args.finetune_steps, 16)), args.finetune_seq_len, seed=1)

    rows = []

    def record(method: str, k_or_bits: int, variant: str, parts_by_name: dict, seconds: float,
               weights: dict | None = None, extra: dict | None = None) -> None:
        weights = weights or {n: decode(pp, n) for n, pp in parts_by_name.items()}
        load(model, originals, weights)
        r = {"method": method, "k_or_bits": k_or_bits, "variant": variant,
             "bits_per_weight": sum(parts_bits(pp) for pp in parts_by_name.values()) / numel,
             "encode_s": seconds, **score(model, windows, base), **(extra or {})}
        r["ppl_vs_base"] = r["perplexity"] / base_ppl - 1
        rows.append(r)
        print(f"{method:6} {k_or_bits:>3} {variant:18} {r['bits_per_weight']:6.3f} bpw  ppl {r['perplexity']:10.3f} "
              f"({100 * r['ppl_vs_base']:+7.2f}%)  KL {r['kl']:.4f}  encode {seconds:5.1f}s", flush=True)

    for bits in args.rtn_bits:
        spec = RTNSpec(bits=bits, group_size=128)
        parts, s = encode_all(originals, lambda n, w: encode_rtn(w, spec))
        record("rtn", bits, "g128", parts, s)

    for k in args.ks:
        outlier_parts = None
        for variant in args.variants:
            if variant == "plain":
                parts, s = encode_all(originals, lambda n, w: encode_kmeans(w, KMeansSpec(k=k)))
                record("kmeans", k, variant, parts, s)
            elif variant == "weighted":
                parts, s = encode_all(originals, lambda n, w: encode_kmeans(
                    w, KMeansSpec(k=k), importance=energy[n][None, :].expand(w.shape)))
                record("kmeans", k, variant, parts, s)
            else:
                if outlier_parts is None:
                    outlier_parts, outlier_s = encode_all(
                        originals, lambda n, w: encode_kmeans(w, KMeansSpec(k=k, outliers="auto")))
                if variant == "outliers":
                    record("kmeans", k, variant, outlier_parts, outlier_s)
                elif variant == "outliers+affine":
                    t0 = time.perf_counter()
                    parts = affine_codebooks(originals, outlier_parts)
                    record("kmeans", k, variant, parts, outlier_s + time.perf_counter() - t0)
                else:
                    load(model, originals, {n: decode(pp, n) for n, pp in outlier_parts.items()})
                    matrices = {n: clustered_from_parts(pp, n) for n, pp in outlier_parts.items()}
                    losses = []
                    t0 = time.perf_counter()
                    codebooks = finetune_centroids(model, matrices, ft_windows, args.finetune_steps,
                                                   lr=args.finetune_lr, on_step=lambda i, l: losses.append(l))
                    ft_s = time.perf_counter() - t0
                    parts = {n: {**pp, "codebook": codebooks[n]} for n, pp in outlier_parts.items()}
                    record("kmeans", k, variant, parts, outlier_s + ft_s,
                           extra={"finetune_s": ft_s, "finetune_losses": losses})

    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": MODEL, "eval_tokens": int(windows.numel()), "eval_seq_len": EVAL_SEQ_LEN,
            "base_perplexity": base_ppl, "weights": numel, "load_avg": os.getloadavg()[0],
            "finetune": {"steps": args.finetune_steps, "seq_len": args.finetune_seq_len,
                         "lr": args.finetune_lr, "windows": len(ft_windows)},
            "note": "smollm2-135m is 4-bit-derived (~10k distinct values per matrix): K-means figures are flattered"}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\n{'method':6} {'K/b':>3} {'variant':18} {'bpw':>6} {'ppl':>10} {'vs base':>8} {'KL':>7} {'encode s':>8}")
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        print(f"{r['method']:6} {r['k_or_bits']:>3} {r['variant']:18} {r['bits_per_weight']:6.3f} "
              f"{r['perplexity']:10.3f} {100 * r['ppl_vs_base']:+7.2f}% {r['kl']:7.4f} {r['encode_s']:8.1f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
