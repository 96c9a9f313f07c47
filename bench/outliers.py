"""Which outlier protection lets small codebooks work: dense-and-sparse, importance weights, finer codebooks.

Claim tested (issue 8, items 3 and 4): per-matrix K-means (arXiv 2603.17917) with few values collapses
smollm2-135m because it clips its super weights ("The Super Weight in Large Language Models", Yu et
al. 2024); keeping a few weights exactly (dense-and-sparse, SqueezeLLM, Kim et al. 2023) repairs it at
almost no cost in bits. Two sections:

- **sweep**: K-means K in {8, 16, 32} (one codebook per matrix) and RTN 3/4-bit (group 128, integer
  zero point: w = s * (q - z); a 576-column row is 4 groups of 128 + a remainder group of 64), each
  with outliers none / 2 / 0.05% / 0.5% / auto (``unweight.outliers``);
- **protection** at K=16: importance-weighted clustering by activation energy ||X_j||^2 (``energy``)
  and by the squared gradient (Fisher, ``fisher``), per-row codebooks (``row``) and codebooks per group
  of 128 (``g128``), alone and with ``auto`` outliers; compare with ``kmeans16/none`` and
  ``kmeans16/auto`` from the sweep.

Setup: the bundled model's bf16 folder loaded in float32 (**4-bit-derived weights**: figures flatter
clustering, DESIGN.md); the decoder-block Linears are encoded with ``unweight.cluster.codebook``,
decoded and loaded back in memory. Bits per weight are **measured**: the bytes of every stored part
(header, codebook, packed indices, scales, zero points, outlier indices and values) over the block
Linears' weights. Quality: perplexity, KL(base || model) and top-1 agreement on the Austen evaluation
split (``token_windows(tok, corpus("austen", "eval"), --seq-len, --tokens)``), base = the GGUF as
transformers loads it, in float32. Encode time: wall seconds to encode every matrix (calibration not
included; it is recorded once in the JSON). Importance weights come from
``collect_statistics`` on ``calibration_windows(tok, --calib-samples, --calib-seq-len)`` of the
calibration split (disjoint from evaluation).

    .venv/bin/python bench/outliers.py [--model gemma3-270m] [--configs 'kmeans16*,rtn4/*'] [--quick]

Prints the table, the cheapest configuration within 5% of the base perplexity and the best K=16
perplexity over the base, and writes ``bench/results/outliers-<model>.json`` (after every row). Run
it alone: other processes on 2 cores slow PyTorch 3-10x (the load average is recorded).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import torch

from cluster import encode_all, load, parts_bits  # bench/ is on sys.path when this script runs
from unweight.calibrate import calibration_windows
from unweight.cluster.codebook import KMeansSpec, RTNSpec, decode, encode_kmeans, encode_rtn
from unweight.data import corpus
from unweight.eval import evaluate, token_windows
from unweight.models import hf_folder, load_causal_lm
from unweight.outliers import parse_outliers
from unweight.report.table import Column, format_table
from unweight.targets import is_target

RESULTS = Path(__file__).parent / "results"
GROUP_SIZE = 128  # RTN groups and the g128 codebooks: does not align with GGUF's 32-weight blocks
WITHIN = 0.05  # "within 5% of the base perplexity"
COLLAPSE_PPL = 1000.0  # above this, perplexity is unstable from run to run: printed as a collapse (DESIGN.md)
OUTLIERS = ("none", "2", "0.05%", "0.5%", "auto")
KS = (8, 16, 32)
RTN_BITS = (3, 4)
PROTECTION_K = 16
PROTECTIONS = (  # (granularity, weighting) at K = PROTECTION_K
    ("matrix", "energy"), ("matrix", "fisher"), ("row", "none"), (f"group:{GROUP_SIZE}", "none"))


@dataclass(frozen=True)
class Config:
    method: str  # kmeans | rtn
    size: int  # K, or bits
    outliers: str = "none"
    granularity: str = "matrix"  # kmeans: matrix | row | group:N
    weighting: str = "none"  # kmeans: none | energy | fisher
    section: str = "sweep"

    @property
    def name(self) -> str:
        variant = "".join(f"-{s}" for s in (
            {"row": "row", f"group:{GROUP_SIZE}": f"g{GROUP_SIZE}"}.get(self.granularity),
            None if self.weighting == "none" else self.weighting) if s)
        return f"{self.method}{self.size}{variant}/{self.outliers}"

    def encoder(self, importance: dict[str, torch.Tensor]):
        out = parse_outliers(self.outliers)
        if self.method == "rtn":
            spec = RTNSpec(bits=self.size, group_size=GROUP_SIZE, outliers=out)
            return lambda name, w: encode_rtn(w, spec)
        spec = KMeansSpec(k=self.size, granularity=self.granularity, outliers=out)
        if self.weighting == "none":
            return lambda name, w: encode_kmeans(w, spec)
        return lambda name, w: encode_kmeans(w, spec, importance=importance[name].expand(w.shape))


def all_configs(outliers: tuple[str, ...] = OUTLIERS) -> list[Config]:
    sweep = [Config("kmeans", k, o) for k in KS for o in outliers]
    sweep += [Config("rtn", b, o) for b in RTN_BITS for o in outliers]
    protection = [Config("kmeans", PROTECTION_K, o, g, w, "protection")
                  for g, w in PROTECTIONS for o in ("none", "auto")]
    return sweep + protection


def select(configs: list[Config], patterns: str | None, quick: bool) -> list[Config]:
    if quick:  # the sweep at K=16 and RTN4 with none/auto; each protection once, with auto
        configs = [c for c in configs if (c.method, c.size) in (("kmeans", PROTECTION_K), ("rtn", 4))
                   and c.outliers in (("none", "auto") if c.section == "sweep" else ("auto",))]
    if patterns:
        pats = [p for p in patterns.split(",") if p]
        configs = [c for c in configs if any(fnmatch.fnmatchcase(c.name, p) for p in pats)]
    return configs


def importance_weights(model, tok, originals: dict, configs: list[Config], args) -> tuple[dict, dict]:
    """{weighting: {name: importance}} for the weightings ``configs`` use, and how they were made."""
    wanted = {c.weighting for c in configs} - {"none"}
    if not wanted:
        return {}, {}
    from unweight.analysis.sensitivity import collect_statistics

    windows = calibration_windows(tok, args.calib_samples, args.calib_seq_len)
    t0 = time.perf_counter()
    stats = collect_statistics(model, windows, fisher="fisher" in wanted, progress=False)
    seconds = time.perf_counter() - t0
    weights = {"energy": {n: v.float()[None, :] for n, v in stats.sq_norm.items()}}
    if "fisher" in wanted:
        weights["fisher"] = stats.fisher
    for kind in wanted:
        if missing := sorted(set(originals) - set(weights[kind])):
            sys.exit(f"no {kind} statistics for {len(missing)} target matrices (first: {missing[0]})")
    info = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len,
            "statistics": sorted(wanted), "seconds": seconds}
    return weights, info


def warm_up(configs: list[Config]) -> None:
    """Compile numba kernels (cached on disk after the first run) so encode times are steady state."""
    w, imp = torch.randn(64, 256).bfloat16(), {"w": torch.ones(1, 256)}
    for c in configs:
        c.encoder(imp)("w", w)


def summarize(rows: list[dict], base_ppl: float) -> dict:
    """The cheapest row within ``WITHIN`` of the base perplexity; the best K=16 row over the base."""
    ok = [r for r in rows if r["perplexity"] <= (1 + WITHIN) * base_ppl]
    k16 = [r for r in rows if r["method"] == "kmeans" and r["size"] == PROTECTION_K]
    cheapest = min(ok, key=lambda r: r["bits_per_weight"]) if ok else None
    best16 = min(k16, key=lambda r: r["perplexity"]) if k16 else None
    return {
        "within": WITHIN,
        "cheapest_within": None if cheapest is None else
        {k: cheapest[k] for k in ("config", "bits_per_weight", "perplexity")},
        "best_k16": None if best16 is None else
        {k: best16[k] for k in ("config", "bits_per_weight", "perplexity")} | {
            "ppl_over_base": best16["perplexity"] / base_ppl},
    }


def vs_base(x: float) -> str:
    return "collapse" if x == float("inf") else f"{100 * x:+.1f}%"


COLUMNS = [Column("config"), Column("bits_per_weight", "bpw", ".3f"), Column("outliers_kept", "kept"),
           Column("perplexity", "ppl"), Column("shown_vs_base", "vs base", vs_base),
           Column("kl", "KL", ".4f"), Column("top1", "top-1", ".3f"), Column("encode_s", "encode s", ".1f"),
           Column("load_avg", "load", ".1f")]


def shown(rows: list[dict]) -> list[dict]:
    """Rows for printing: a collapsed row's change against the base is not a number worth comparing (inf)."""
    return [r | {"shown_vs_base": float("inf") if r["perplexity"] > COLLAPSE_PPL else r["vs_base"]} for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or gemma3-270m")
    ap.add_argument("--configs", help="comma-separated fnmatch patterns over the config names, "
                                      "e.g. 'kmeans16*,rtn4/*' (names: see --list)")
    ap.add_argument("--outliers", default=",".join(OUTLIERS),
                    help=f"comma-separated --outliers specs of the sweep (default {','.join(OUTLIERS)}; "
                         "e.g. z4,z6 for robust z-score thresholds)")
    ap.add_argument("--list", action="store_true", help="print the config names and exit")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (default 4096: 4 windows)")
    ap.add_argument("--seq-len", type=int, default=1024, help="evaluation window (default 1024)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: their default)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: K=16 and RTN4, outliers none/auto, 1 window of 512, calibration 4 x 256")
    ap.add_argument("--out", type=Path, help="default bench/results/outliers-<model>.json")
    args = ap.parse_args()
    for spec in args.outliers.split(","):
        parse_outliers(spec)  # a bad spec fails here, before the models load
    configs = select(all_configs(tuple(args.outliers.split(","))), args.configs, args.quick)
    if args.list:
        print("\n".join(c.name for c in configs))
        return 0
    if not configs:
        sys.exit(f"--configs {args.configs!r} matches no config; see --list")
    if args.quick:
        args.tokens, args.seq_len, args.calib_samples, args.calib_seq_len = 512, 512, 4, 256
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    out = args.out or RESULTS / f"outliers-{args.model}.json"

    load_start = os.getloadavg()
    base, tok = load_causal_lm(args.model)
    model, _ = load_causal_lm(str(hf_folder(args.model)))
    originals = {n: p.detach().bfloat16().clone() for n, p in model.named_parameters() if is_target(n, tuple(p.shape))}
    numel = sum(w.numel() for w in originals.values())
    windows = token_windows(tok, corpus("austen", "eval"), args.seq_len, max_tokens=args.tokens)

    t0 = time.perf_counter()
    ref = evaluate(base, windows, tok, progress=False)
    start = evaluate(model, windows, tok, base=base, progress=False)
    print(f"{args.model}: {len(originals)} block Linears, {numel:,} weights; {ref.tokens} tokens scored "
          f"({len(windows)} x {args.seq_len}); base ppl {ref.perplexity:.3f}, bf16 folder {start.perplexity:.3f} "
          f"({time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}); {len(configs)} configs", flush=True)
    importance, calibration = importance_weights(model, tok, originals, configs, args)
    warm_up(configs)

    rows = []
    meta = {
        "claim": "issue 8 items 3-4: outlier protection for K-means codebooks and RTN",
        "model": args.model, "note": "4-bit-derived weights (bundled GGUF): clustering figures are flattered",
        "evaluation": {"corpus": "austen/eval", "seq_len": args.seq_len, "windows": len(windows),
                       "tokens_scored": ref.tokens, "base": "GGUF, float32"},
        "base": {"perplexity": ref.perplexity, "bits_per_byte": ref.bits_per_byte},
        "bf16_folder": {"perplexity": start.perplexity, "kl": start.kl, "top1": start.top1_agreement},
        "bits": "measured: bytes of every stored part over the block Linears' weights", "weights": numel,
        "rtn": {"scheme": "asym_int", "group_size": GROUP_SIZE}, "calibration": calibration,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
                    "load_avg_start": load_start},
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta["machine"]["load_avg_now"] = os.getloadavg()
        out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summarize(rows, ref.perplexity)},
                                  indent=1))

    for c in configs:
        load_avg = os.getloadavg()[0]
        parts, seconds = encode_all(originals, c.encoder(importance.get(c.weighting, {})))
        load(model, originals, {n: decode(pp, n) for n, pp in parts.items()})
        r = evaluate(model, windows, tok, base=base, progress=False)
        kept = sum(pp["outlier_idx"].numel() for pp in parts.values() if "outlier_idx" in pp)
        rows.append({"config": c.name, **asdict(c), "bits_per_weight": sum(map(parts_bits, parts.values())) / numel,
                     "outliers_kept": kept, "outlier_fraction": kept / numel, "perplexity": r.perplexity,
                     "vs_base": r.perplexity / ref.perplexity - 1, "bits_per_byte": r.bits_per_byte,
                     "kl": r.kl, "top1": r.top1_agreement, "encode_s": seconds, "eval_s": r.seconds,
                     "load_avg": load_avg})
        print(f"{c.name:22} {rows[-1]['bits_per_weight']:6.3f} bpw  {kept:7d} kept  ppl {r.perplexity:10.3f} "
              f"({vs_base(shown(rows[-1:])[0]['shown_vs_base']):>8})  KL {r.kl:.4f}  encode {seconds:5.1f} s  "
              f"(load {load_avg:.1f})", flush=True)
        save()

    head = (f"{args.model} (4-bit-derived), {ref.tokens} tokens of the Austen evaluation split in windows of "
            f"{args.seq_len}; base (GGUF fp32) ppl {ref.perplexity:.3f}; bpw measured over the block Linears")
    print()
    print(format_table(shown(rows), COLUMNS, title=head))
    protection = sorted((r for r in rows if r["method"] == "kmeans" and r["size"] == PROTECTION_K),
                        key=lambda r: r["bits_per_weight"])
    if protection:
        print()
        print(format_table(shown(protection), COLUMNS[:-1],
                           title=f"Which protection works, K={PROTECTION_K} (sorted by bpw)"))
    summary = summarize(rows, ref.perplexity)
    print()
    if cheap := summary["cheapest_within"]:
        print(f"cheapest within {WITHIN:.0%} of base: {cheap['config']} at {cheap['bits_per_weight']:.3f} bpw, "
              f"ppl {cheap['perplexity']:.3f}")
    else:
        print(f"no configuration within {WITHIN:.0%} of base")
    if b := summary["best_k16"]:
        print(f"best K={PROTECTION_K}: {b['config']} at {b['bits_per_weight']:.3f} bpw, ppl {b['perplexity']:.3f} "
              f"= {b['ppl_over_base']:.3f} x base")
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
