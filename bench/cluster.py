"""Per-matrix K-means (arXiv 2603.17917) against round-to-nearest, at measured bits per weight.

Claim tested (issue 4, item 7): exact per-matrix 1-D K-means with K in {8, 16, 32, 64}, plain or with
the paper's corrections, against RTN 3/4-bit. Targets: the whole 135M model clustered in <= 10 s on 2
cores; the objective never worse than the best of several Lloyd runs; K=64 perplexity within 1% of
the base.

Rows (``--ks``, ``--variants``, ``--rtn-bits``), on the Linear weights of the decoder (encoder) blocks:

- ``plain``: exact per-matrix K-means (``unweight.cluster``);
- ``weighted``: each value weighted by its input column's activation energy ||X_j||^2 on calibration
  text (SqueezeLLM's weighting without the gradient);
- ``outliers``: dense-and-sparse, the ``--outliers`` spec (default ``auto``) kept exactly
  (``unweight.outliers``);
- ``weighted+outliers``: both (the weights kept exactly get importance 0);
- ``fisher+outliers``: each weight weighted by its squared gradient (empirical Fisher, SqueezeLLM's
  weighting) on calibration text, with the outliers (decoders only);
- ``outliers+affine``: then the moment-matching affine correction per matrix
  (``unweight.cluster.affine.fit_moments`` on the non-outlier weights, applied to the codebook);
- ``outliers+finetune``: then centroid-only fine-tuning (``unweight.cluster.finetune``) for
  ``--finetune-steps`` Adam steps on calibration windows;
- RTN, asymmetric with an integer zero point (w = s * (q - z)), groups of 128 (a 576-column row of
  smollm2 is 4 groups of 128 and a remainder group of 64), 3 and 4 bits.

The corrections are stacked on ``outliers`` because smollm2 collapses at K <= 16 without them (its
super weights are clipped; issue 8).

Setup. Decoders (smollm2-135m, gemma3-270m): the bundled model's bf16 folder in float32 is both the
base and the source of the weights (clustered as bf16). Perplexity, KL(base || model) and top-1
agreement on the Austen evaluation split, windows from ``unweight.eval.token_windows`` (BOS first in
every window for gemma3, as ``unweight eval`` does), the base's log-probabilities cached in float32
(windows x (seq_len - 1) x vocab x 4 bytes: 1.07 GB for gemma3 at 2 x 512). Calibration (the
``weighted`` statistics, fine-tuning windows) comes from the calibration split, disjoint from the
evaluation text. minilm-l6 (a full-precision fp32 encoder): no next-token loss, so the quality is
the mean sentence-embedding cosine to the original model (mean-pooled, normalized: the probe of
``unweight analyze``, ``unweight.analysis.sensitivity.EmbeddingLoss``) over ``--eval-texts``
paragraphs of the evaluation split; ``weighted`` uses the activation energy of calibration-split
paragraphs; ``outliers+finetune`` does not apply (fine-tuning minimizes a language-modelling loss the
encoder has not got) and is skipped, saying so.

Every row: bits per weight measured from the stored parts (header, codebook, bit-packed indices or
RTN levels, scales, zero points, outlier indices and values) over the target matrices, and again with
the indices/levels rANS-coded (``unweight.cluster.codebook.entropy_code``: one order-0 table per
matrix, every part counted); the weight-level relative error sqrt(sum ||W - W_hat||_F^2 / sum
||W||_F^2) over all target matrices, W_hat as it loads; the encode wall time (``cluster_s``: every
matrix encoded, calibration not included) and the time of the correction (``correction_s``: the
affine fit or the fine-tuning). Plain rows also compare the summed exact objective with the best of
``--lloyd-runs`` weighted Lloyd runs (k-means++) per matrix on the same histogram. Once per model, a
fresh child process reads the target matrices and clusters them all at K=16 (plain): its wall and
CPU time, its RSS before clustering (``psutil``) and its peak RSS while clustering and in all
(VmHWM of ``/proc/self/status``, reset after reading the matrices).

**Flattered figures:** smollm2-135m and gemma3-270m come from 4/5-bit GGUF files: a matrix holds only
~10k distinct values (at most 16 per 32-weight block), so every quality figure on them (K-means at
large K above all: the K=64 target, the relative error, perplexity and KL near the base, and the
Lloyd comparison, on an easy histogram) looks better than it would on a full-precision model
(DESIGN.md). The minilm-l6 rows (fp32, ~150k distinct values per matrix) are the unflattered
reference for the weight error and the embedding cosine; its clustering time is also the hard case
for the histogram DP. Bits per weight and the decoders' clustering times are not flattered (a real
bf16 matrix has a few thousand distinct values too; ``bench/kmeans_speed.py``).

Defaults (per model, for one thread on the shared 2-core machine): smollm2-135m 4,096 evaluation
tokens (8 x 512), 20 fine-tuning steps; gemma3-270m 1,024 tokens (2 x 512; ~50 tokens/s at one
thread, and its 262k-token vocabulary makes the base cache large), 10 steps; minilm-l6 256
evaluation paragraphs of at most 128 tokens, 64 calibration paragraphs. Short slices: differences
below ~1% perplexity are within their noise; KL is the steadier figure. The full grid takes about
20-30 min per model at one thread (load 3 from other jobs; less alone).

    .venv/bin/python bench/cluster.py --model smollm2-135m|gemma3-270m|minilm-l6 --threads 1
        [--ks 8 16 32 64] [--variants plain outliers ...] [--outliers auto] [--eval-tokens N]

Prints a table and what each correction bought at K=16, and writes ``bench/results/cluster-<model>.json``
after every row (a killed run keeps its rows). Run it alone: other processes on 2 cores slow PyTorch
3-10x (the load average is recorded per row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F

from unweight.cluster import kmeans_objective
from unweight.cluster.affine import apply_affine, fit_moments
from unweight.cluster.codebook import KMeansSpec, RTNSpec, decode, encode_kmeans, encode_rtn, entropy_code
from unweight.cluster.runtime import clustered_from_parts
from unweight.models import MODELS, hf_folder
from unweight.outliers import parse_outliers
from unweight.report.table import Column, format_table
from unweight.targets import is_target

BENCH_MODELS = ("smollm2-135m", "gemma3-270m", "minilm-l6")
VARIANTS = ("plain", "weighted", "outliers", "weighted+outliers", "fisher+outliers", "outliers+affine",
            "outliers+finetune")
ENCODER_SKIPS = {"outliers+finetune": "centroid fine-tuning minimizes a language-modelling loss; "
                                      "the encoder has none",
                 "fisher+outliers": "squared gradients of a language-modelling loss; the encoder has none"}
GROUP_SIZE = 128  # RTN groups: do not align with GGUF's 32-weight blocks
WHOLE_MODEL_K = 16
TARGET_WHOLE_MODEL_S = 10.0
K64_WITHIN = 0.01
COLLAPSE_PPL = 1000.0  # above this perplexity is unstable from run to run: shown as a collapse (DESIGN.md)
# Defaults per model, sized for one thread on the 2-core machine (see the module docstring).
DEFAULTS = {
    "smollm2-135m": {"eval_tokens": 4096, "eval_seq_len": 512, "finetune_steps": 20},
    "gemma3-270m": {"eval_tokens": 1024, "eval_seq_len": 512, "finetune_steps": 10},
    "minilm-l6": {"eval_texts": 256, "eval_seq_len": 128, "calib_texts": 64},
}
RESULTS = Path(__file__).parent / "results"


# --------------------------------------------------------------------------------------------------
# Helpers shared with bench/outliers.py


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


# --------------------------------------------------------------------------------------------------
# Measurements of one set of encoded matrices


def entropy_bits(parts_by_name: dict) -> tuple[int, float]:
    """(bits with every matrix's indices or levels rANS-coded, seconds it took)."""
    t0 = time.perf_counter()
    bits = sum(parts_bits(entropy_code(pp, n)) for n, pp in parts_by_name.items())
    return bits, time.perf_counter() - t0


def relative_error(originals: dict, weights: dict) -> float:
    """sqrt(sum ||W - W_hat||_F^2 / sum ||W||_F^2) over every target matrix, in float64."""
    err = sum(float((weights[n].double() - w.double()).square().sum()) for n, w in originals.items())
    ref = sum(float(w.double().square().sum()) for w in originals.values())
    return math.sqrt(err / ref)


def lloyd_comparison(originals: dict, parts_by_name: dict, k: int, runs: int, histograms: dict,
                     seed: int = 0) -> dict:
    """Summed exact objective (float32 codebook as stored) against the summed best of ``runs`` Lloyd
    runs per matrix (k-means++ seeds, ``bench/kmeans_speed.py``), and the matrices where the exact one
    is worse (should be none). ``histograms`` caches each matrix's (values, counts) across K."""
    from kmeans_speed import histogram, lloyd_1d  # bench/ is on sys.path when this script runs

    rng = np.random.default_rng(seed)
    exact_total, lloyd_total, worse = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for name, w in originals.items():
        m = clustered_from_parts(parts_by_name[name], name)
        exact = kmeans_objective(w, m.codebook, m.assignments)
        if name not in histograms:
            histograms[name] = histogram(w)
        x, wt = histograms[name]
        best = min(lloyd_1d(x, wt, k, rng) for _ in range(runs))
        exact_total, lloyd_total = exact_total + exact, lloyd_total + best
        worse += exact > best * (1 + 1e-9)
    return {"exact_objective": exact_total, "best_lloyd_objective": lloyd_total, "lloyd_runs": runs,
            "lloyd_excess": lloyd_total / exact_total - 1 if exact_total else 0.0,
            "matrices_where_exact_is_worse": int(worse), "lloyd_s": time.perf_counter() - t0}


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


# --------------------------------------------------------------------------------------------------
# Quality probes: next-token (decoders) and sentence embeddings (the encoder)


class NextTokenProbe:
    """Perplexity, KL(base || model) and top-1 agreement on fixed windows, the base's
    log-probabilities computed once and cached (one forward per row instead of two)."""

    def __init__(self, model, windows: torch.Tensor):
        self.model, self.windows = model, windows
        t0 = time.perf_counter()
        self.base = [self._log_probs(w) for w in windows]
        self.forward_s = time.perf_counter() - t0
        self.base_top1 = [b.argmax(-1) for b in self.base]
        self.cache_mb = sum(b.numel() * b.element_size() for b in self.base) / 2**20
        self.reference = self._score(self.base)

    @torch.no_grad()
    def _log_probs(self, w: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(input_ids=w[None]).logits[0, :-1].float(), -1)

    def _score(self, log_probs) -> dict:
        nll, kl, agree, n = 0.0, 0.0, 0, 0
        for w, logp, b, b1 in zip(self.windows, log_probs, self.base, self.base_top1):
            nll -= logp.gather(1, w[1:, None]).sum().item()
            kl += F.kl_div(logp, b, log_target=True, reduction="sum").item()
            agree += (logp.argmax(-1) == b1).sum().item()
            n += w.numel() - 1
        return {"perplexity": math.exp(nll / n), "kl": kl / n, "top1": agree / n}

    def measure(self) -> dict:
        r = self._score(self._log_probs(w) for w in self.windows)
        r["ppl_vs_base"] = r["perplexity"] / self.reference["perplexity"] - 1
        return r


class EmbeddingProbe:
    """Mean sentence-embedding cosine to the original model over evaluation paragraphs
    (``EmbeddingLoss``, the probe ``unweight analyze`` uses for encoders)."""

    def __init__(self, model, batch: dict):
        from unweight.analysis.sensitivity import EmbeddingLoss

        t0 = time.perf_counter()
        self.loss = EmbeddingLoss(model, batch)
        self.forward_s = time.perf_counter() - t0
        self.texts, self.tokens = len(batch["input_ids"]), self.loss.tokens

    def measure(self, weights: dict) -> dict:
        distance, se = self.loss.measure_many(weights)
        return {"cosine": 1 - distance, "cosine_distance": distance, "cosine_se": se}


def eval_paragraphs(tok, n_texts: int, max_len: int) -> dict:
    """``n_texts`` random paragraphs (seed 0) of the evaluation split, chosen as ``unweight analyze``
    chooses calibration paragraphs (at least MIN_WORDS words), tokenized and padded."""
    from unweight.commands.analyze import MIN_WORDS
    from unweight.data import corpus

    paragraphs = [p for doc in corpus("austen", "eval") for p in doc.split("\n\n") if len(p.split()) >= MIN_WORDS]
    texts = random.Random(0).sample(paragraphs, min(n_texts, len(paragraphs)))
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# --------------------------------------------------------------------------------------------------
# Whole-model clustering time and memory, in a fresh process


def target_matrices(folder: Path) -> dict[str, torch.Tensor]:
    from unweight.checkpoint import open_checkpoint

    ckpt = open_checkpoint(folder)
    return {n: ckpt.get(n) for n in ckpt.names() if is_target(n, tuple(ckpt.info(n).shape))}


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM of /proc/self/status). Not ``ru_maxrss``: across the exec that
    starts a child, Linux keeps the forking parent's high-water mark in it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def whole_model_child(model_name: str, k: int) -> dict:
    """Read the target matrices as stored and encode them all at K (plain): wall and CPU seconds,
    RSS before clustering, the peak RSS while clustering and over the whole process."""
    import psutil

    t0 = time.perf_counter()
    w = torch.randn(64, 256)
    for dtype in (torch.bfloat16, torch.float32):  # numba compiles, or loads its disk cache, once
        encode_kmeans(w.to(dtype), KMeansSpec(k=k))
    warmup_s = time.perf_counter() - t0
    rss_imports = psutil.Process().memory_info().rss / 2**20
    mats = target_matrices(hf_folder(model_name))
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    peak_loading = vm_hwm_mb()
    reset = reset_peak_rss()
    w0, c0 = time.perf_counter(), time.process_time()
    parts = {n: encode_kmeans(m, KMeansSpec(k=k)) for n, m in mats.items()}
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = vm_hwm_mb()
    return {"k": k, "matrices": len(mats), "weights": sum(m.numel() for m in mats.values()),
            "dtype": str(next(iter(mats.values())).dtype).removeprefix("torch."),
            "wall_s": wall, "cpu_s": cpu, "numba_warmup_s": warmup_s,
            "rss_after_imports_mb": rss_imports, "rss_before_clustering_mb": rss_loaded,
            "peak_rss_loading_mb": peak_loading, "peak_rss_clustering_mb": peak if reset else None,
            "peak_rss_mb": max(peak, peak_loading),
            "encoded_bytes": sum(parts_bits(pp) for pp in parts.values()) // 8,
            "torch_threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
            "load_avg": os.getloadavg(),
            "rss_by": "psutil.Process().memory_info().rss; peaks: VmHWM of /proc/self/status, reset "
                      "(clear_refs 5) after loading for the clustering peak"}


def whole_model(model_name: str, k: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--model", model_name, "--whole-model-child", str(k), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the whole-model child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# The table


def vs_base(x: float) -> str:
    return "collapse" if x == float("inf") else f"{100 * x:+.2f}%"


def columns(encoder: bool) -> list[Column]:
    quality = ([Column("cosine", "cosine", ".5f"), Column("cosine_distance", "1-cos", ".2e")] if encoder else
               [Column("perplexity", "ppl"), Column("shown_vs_base", "vs base", vs_base), Column("kl", "KL", ".4f"),
                Column("top1", "top-1", ".3f")])
    return ([Column("config"), Column("bits_per_weight", "bpw", ".3f"),
             Column("bits_per_weight_rans", "bpw rANS", ".3f"), Column("outliers_kept", "kept"),
             Column("relative_error", "rel err", ".4f")] + quality +
            [Column("cluster_s", "cluster s", ".1f"), Column("correction_s", "+corr s", ".1f"),
             Column("load_avg", "load", ".1f")])


def shown(rows: list[dict]) -> list[dict]:
    return [r | {"shown_vs_base": float("inf") if r.get("perplexity", 0) > COLLAPSE_PPL else r.get("ppl_vs_base")}
            for r in rows]


def what_each_bought(rows: list[dict], k: int, encoder: bool, base_ppl: float | None) -> list[dict]:
    """At K=k: each correction against the row it is stacked on; ``gap_recovered``: the share of the
    NLL gap to the base it closed (encoder: of the cosine distance)."""
    by = {r["variant"]: r for r in rows if r["method"] == "kmeans" and r["k_or_bits"] == k}
    pairs = [("weighted", "plain"), ("outliers", "plain"), ("weighted+outliers", "outliers"),
             ("outliers+affine", "outliers"), ("outliers+finetune", "outliers")]
    out = []
    for variant, over in pairs:
        if variant not in by or over not in by:
            continue
        a, b = by[variant], by[over]
        row = {"change": f"{over} -> {variant}", "bpw": a["bits_per_weight"] - b["bits_per_weight"],
               "rel_err": a["relative_error"] - b["relative_error"]}
        if encoder:
            row["quality"] = f"cosine {b['cosine']:.5f} -> {a['cosine']:.5f}"
            row["gap_recovered"] = 1 - a["cosine_distance"] / b["cosine_distance"] if b["cosine_distance"] else None
        else:
            row["quality"] = f"ppl {b['perplexity']:.3f} -> {a['perplexity']:.3f}, KL {b['kl']:.4f} -> {a['kl']:.4f}"
            gap = math.log(b["perplexity"] / base_ppl)  # the NLL gap to the base, nats per token
            if gap > 0 and b["perplexity"] < COLLAPSE_PPL:
                row["gap_recovered"] = math.log(b["perplexity"] / a["perplexity"]) / gap
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------
# Setup: the model, its evaluation probe and its calibration statistics


def setup_encoder(args) -> tuple:
    """(model, tokenizer, probe, evaluation info, calibration batch) of minilm-l6."""
    from transformers import AutoTokenizer

    from unweight.commands.analyze import load_encoder

    folder = hf_folder(args.model)
    model, calib_batch = load_encoder(folder, args.calib_texts, args.eval_seq_len)
    tok = AutoTokenizer.from_pretrained(str(folder))
    probe = EmbeddingProbe(model, eval_paragraphs(tok, args.eval_texts, args.eval_seq_len))
    evaluation = {"probe": "mean sentence-embedding cosine to the original (mean pooling, EmbeddingLoss)",
                  "corpus": "austen/eval paragraphs (random, seed 0)", "texts": probe.texts,
                  "tokens": probe.tokens, "max_len": args.eval_seq_len}
    print(f"{args.model}: eval {probe.texts} texts, {probe.tokens} tokens ({probe.forward_s:.1f} s a forward)")
    return model, tok, probe, evaluation, calib_batch


def setup_decoder(args) -> tuple:
    """(model, tokenizer, probe, evaluation info, None) of a bundled decoder, from its bf16 folder."""
    from unweight.data import corpus
    from unweight.eval import token_windows
    from unweight.eval.perplexity import leading_bos
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(hf_folder(args.model)))
    windows = token_windows(tok, corpus("austen", "eval"), args.eval_seq_len, max_tokens=args.eval_tokens)
    probe = NextTokenProbe(model, windows)
    bos = leading_bos(tok)
    bos_first = bos is not None and bool((windows[:, 0] == bos).all())
    evaluation = {"corpus": "austen/eval", "seq_len": args.eval_seq_len, "windows": len(windows),
                  "tokens_scored": len(windows) * (args.eval_seq_len - 1), "bos_first": bos_first,
                  "base": "the bf16 folder in float32 (what is clustered)", **probe.reference,
                  "base_cache_mb": probe.cache_mb}
    print(f"{args.model}: eval {windows.numel()} tokens ({len(windows)} x {args.eval_seq_len}, BOS first: "
          f"{bos_first}; {windows.numel() / probe.forward_s:.0f} tokens/s; base log-probs {probe.cache_mb:.0f} MB); "
          f"base ppl {probe.reference['perplexity']:.3f}", flush=True)
    return model, tok, probe, evaluation, None


def activation_energy(args, model, tok, calib_batch, encoder: bool) -> tuple[dict, dict]:
    """({name: ||X_j||^2 per input column}, how it was measured) on calibration text."""
    t0 = time.perf_counter()
    if encoder:
        from unweight.analysis.sensitivity import encoder_statistics

        stats, _ = encoder_statistics(model, calib_batch)
        info = {"corpus": "austen/calib paragraphs (random, seed 0)", "texts": len(calib_batch["input_ids"])}
    else:
        from unweight.analysis.sensitivity import collect_statistics
        from unweight.calibrate import calibration_windows

        windows = calibration_windows(tok, args.calib_samples, args.calib_seq_len)
        stats = collect_statistics(model, windows, fisher=False, progress=False)
        info = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    return {n: v.float() for n, v in stats.sq_norm.items()}, info | {"seconds": time.perf_counter() - t0}


def fisher_weights(args, model, tok) -> tuple[dict, dict]:
    """({name: squared gradients of the next-token loss, the matrix's shape}, how) on calibration text."""
    from unweight.analysis.sensitivity import collect_statistics
    from unweight.calibrate import calibration_windows

    t0 = time.perf_counter()
    windows = calibration_windows(tok, args.calib_samples, args.calib_seq_len)
    stats = collect_statistics(model, windows, fisher=True, progress=False)
    info = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    return stats.fisher, info | {"seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------------
# The run: rows measured and saved one by one


class Run:
    def __init__(self, args, model, probe, originals: dict, encoder: bool, meta: dict):
        self.args, self.model, self.probe, self.originals, self.encoder = args, model, probe, originals, encoder
        self.numel = sum(w.numel() for w in originals.values())
        self.meta, self.rows = meta, []
        self.out = args.out or RESULTS / f"cluster-{args.model}.json"

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.meta["machine"]["load_avg_now"] = os.getloadavg()
        self.out.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))

    def record(self, method: str, k_or_bits: int, variant: str, parts_by_name: dict, cluster_s: float,
               correction_s: float = 0.0, coded: tuple[int, float] | None = None, extra: dict | None = None) -> None:
        """Measure one set of encoded matrices (``coded``: its rANS-coded bits and seconds, if known)."""
        r0, load_avg = time.perf_counter(), os.getloadavg()[0]
        originals = self.originals
        weights = {n: decode(pp, n) for n, pp in parts_by_name.items()}
        coded_bits, entropy_s = coded or entropy_bits(parts_by_name)
        r = {"config": f"{method}{k_or_bits}/{variant}", "method": method, "k_or_bits": k_or_bits, "variant": variant,
             "bits_per_weight": sum(parts_bits(pp) for pp in parts_by_name.values()) / self.numel,
             "bits_per_weight_rans": coded_bits / self.numel, "entropy_s": entropy_s,
             "outliers_kept": sum(pp["outlier_idx"].numel() for pp in parts_by_name.values() if "outlier_idx" in pp),
             "relative_error": relative_error(originals, weights),
             "cluster_s": cluster_s, "correction_s": correction_s, "load_avg": load_avg, **(extra or {})}
        if self.encoder:
            r.update(self.probe.measure(weights))
        else:
            load(self.model, originals, weights)
            r.update(self.probe.measure())
            load(self.model, originals, originals)
        r["measure_s"] = time.perf_counter() - r0
        self.rows.append(r)
        quality = (f"cos {r['cosine']:.5f}" if self.encoder else
                   f"ppl {r['perplexity']:10.3f} ({vs_base(shown([r])[0]['shown_vs_base']):>9})  KL {r['kl']:.4f}")
        row_s = r["measure_s"] + cluster_s + correction_s + r.get("lloyd_s", 0)
        print(f"{r['config']:26} {r['bits_per_weight']:6.3f} bpw ({r['bits_per_weight_rans']:6.3f} rANS)  "
              f"rel err {r['relative_error']:.4f}  {quality}  cluster {cluster_s:5.1f} s  +{correction_s:5.1f} s  "
              f"(row {row_s:4.0f} s, load {load_avg:.1f})", flush=True)
        self.save()

    def kmeans_rows(self, k: int, variants: list[str], outliers, energy: dict, ft_windows, histograms: dict) -> None:
        """Every variant at one K; the outlier-based ones share one encoding."""
        args, originals, model = self.args, self.originals, self.model
        outlier_parts = None
        for variant in variants:
            if variant == "plain":
                parts, s = encode_all(originals, lambda n, w: encode_kmeans(w, KMeansSpec(k=k)))
                extra = lloyd_comparison(originals, parts, k, args.lloyd_runs, histograms) if args.lloyd_runs else None
                self.record("kmeans", k, variant, parts, s, extra=extra)
                continue
            if variant == "weighted":
                parts, s = encode_all(originals, lambda n, w: encode_kmeans(
                    w, KMeansSpec(k=k), importance=energy[n][None, :].expand(w.shape)))
                self.record("kmeans", k, variant, parts, s)
                continue
            if variant in ("weighted+outliers", "fisher+outliers"):
                imp = (lambda n, w: energy[n][None, :].expand(w.shape)) if variant == "weighted+outliers" else (
                    lambda n, w: self.fisher[n])
                parts, s = encode_all(originals, lambda n, w: encode_kmeans(
                    w, KMeansSpec(k=k, outliers=outliers), importance=imp(n, w)))
                self.record("kmeans", k, variant, parts, s)
                continue
            if outlier_parts is None:
                outlier_parts, outlier_s = encode_all(
                    originals, lambda n, w: encode_kmeans(w, KMeansSpec(k=k, outliers=outliers)))
                # the corrections change codebook values only: the coded indices are the same bytes
                coded = entropy_bits(outlier_parts)
            if variant == "outliers":
                self.record("kmeans", k, variant, outlier_parts, outlier_s, coded=coded)
            elif variant == "outliers+affine":
                t0 = time.perf_counter()
                parts = affine_codebooks(originals, outlier_parts)
                self.record("kmeans", k, variant, parts, outlier_s, time.perf_counter() - t0, coded=coded)
            else:  # outliers+finetune
                from unweight.cluster.finetune import finetune_centroids

                load(model, originals, {n: decode(pp, n) for n, pp in outlier_parts.items()})
                matrices = {n: clustered_from_parts(pp, n) for n, pp in outlier_parts.items()}
                losses = []
                t0 = time.perf_counter()
                codebooks = finetune_centroids(model, matrices, ft_windows, args.finetune_steps,
                                               lr=args.finetune_lr, on_step=lambda i, loss: losses.append(loss))
                ft_s = time.perf_counter() - t0
                load(model, originals, originals)
                parts = {n: {**pp, "codebook": codebooks[n]} for n, pp in outlier_parts.items()}
                self.record("kmeans", k, variant, parts, outlier_s, ft_s, coded=coded,
                            extra={"finetune_losses": losses})

    def summarize(self) -> dict:
        """Print the table, what each correction bought at K=16 and the targets; return the summary."""
        args, rows, meta, encoder = self.args, self.rows, self.meta, self.encoder
        base_ppl = None if encoder else self.probe.reference["perplexity"]
        evaluation = meta["evaluation"]
        title = (f"{args.model} ({'fp32 encoder' if encoder else '4-bit-derived: figures flattered'}); "
                 + (f"cosine over {evaluation['texts']} Austen evaluation paragraphs" if encoder else
                    f"{evaluation['tokens_scored']} tokens of the Austen evaluation split in windows of "
                    f"{args.eval_seq_len}; base ppl {base_ppl:.3f}")
                 + f"; bpw measured over {meta['matrices']} block Linears; {meta['machine']['threads']} thread(s)")
        print()
        print(format_table(shown(sorted(rows, key=lambda r: r["bits_per_weight"])), columns(encoder), title=title))
        summary = {}
        if bought := what_each_bought(rows, 16, encoder, base_ppl):
            summary["k16"] = bought
            print()
            print(format_table(bought, [Column("change"), Column("bpw", "d bpw", "+.4f"),
                                        Column("rel_err", "d rel err", "+.4f"), Column("quality"),
                                        Column("gap_recovered", "gap closed", ".0%")],
                               title="What each correction bought at K=16 (against the row it is stacked on; "
                                     "gap closed: of the NLL gap to the base, minilm: of 1 - cosine)"))
        if skipped := meta["skipped"]:
            print("".join(f"\nskipped {v}: {why}" for v, why in skipped.items()))
        print()
        if wm := meta.get("whole_model"):
            judged = wm["numba_threads"] <= 2  # the target is for 2 cores: fewer threads is stricter
            summary["whole_model_target_met"] = wm["wall_s"] <= TARGET_WHOLE_MODEL_S if judged else None
            print(f"whole model clustered at K={WHOLE_MODEL_K}: {wm['wall_s']:.1f} s wall, {wm['cpu_s']:.1f} s CPU "
                  f"({wm['numba_threads']} thread(s), load {wm['load_avg'][0]:.1f}; target <= "
                  f"{TARGET_WHOLE_MODEL_S:.0f} s on 2 cores{'' if judged else ': not judged at this thread count'}), "
                  f"peak RSS {wm['peak_rss_clustering_mb'] or float('nan'):.0f} MB while clustering "
                  f"({wm['rss_before_clustering_mb']:.0f} MB before), {wm['peak_rss_mb']:.0f} MB with reading")
        if lloyd := [r for r in rows if "matrices_where_exact_is_worse" in r]:
            worse = sum(r["matrices_where_exact_is_worse"] for r in lloyd)
            summary["lloyd_worse_matrices"] = worse
            print(f"exact objective vs best of {args.lloyd_runs} Lloyd runs per matrix: worse on {worse} matrices; "
                  "Lloyd's excess " + ", ".join(f"K={r['k_or_bits']} {100 * r['lloyd_excess']:+.3f}%" for r in lloyd))
        if not encoder and (k64 := [r for r in rows if r["method"] == "kmeans" and r["k_or_bits"] == 64]):
            best = min(k64, key=lambda r: r["perplexity"])
            summary["k64_best"] = {"config": best["config"], "ppl_vs_base": best["ppl_vs_base"],
                                   "within_1pct": best["ppl_vs_base"] <= K64_WITHIN}
            print(f"K=64 best: {best['config']} {vs_base(best['ppl_vs_base'])} over the base "
                  f"(target within {K64_WITHIN:.0%}; 4-bit-derived: flattered)")
        return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", choices=BENCH_MODELS)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rtn-bits", type=int, nargs="*", default=[3, 4])
    ap.add_argument("--outliers", default="auto", help="--outliers spec of the outliers* variants (default auto)")
    ap.add_argument("--eval-tokens", type=int, help="decoders: evaluation tokens (smollm2 4096, gemma3 1024)")
    ap.add_argument("--eval-seq-len", type=int, help="decoders: window (512); minilm: max tokens per text (128)")
    ap.add_argument("--eval-texts", type=int, help="minilm: evaluation paragraphs (256)")
    ap.add_argument("--calib-samples", type=int, default=4, help="decoders: windows for the weighted statistics")
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--calib-texts", type=int, help="minilm: calibration paragraphs for the weighted statistics (64)")
    ap.add_argument("--finetune-steps", type=int, help="(smollm2 20, gemma3 10)")
    ap.add_argument("--finetune-seq-len", type=int, default=128)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--lloyd-runs", type=int, default=3, help="Lloyd runs per matrix for the plain rows (0: skip)")
    ap.add_argument("--no-whole-model", action="store_true", help="skip the whole-model time/memory measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch and numba threads (0: their default)")
    ap.add_argument("--out", type=Path, help="default bench/results/cluster-<model>.json")
    ap.add_argument("--whole-model-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.whole_model_child:
        print(json.dumps(whole_model_child(args.model, args.whole_model_child)))
        return 0
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    outliers = parse_outliers(args.outliers)  # a bad spec fails here, before the model loads
    encoder = MODELS[args.model].kind == "encoder"
    skipped = {v: ENCODER_SKIPS[v] for v in args.variants if encoder and v in ENCODER_SKIPS}
    variants = [v for v in args.variants if v not in skipped]
    load_start = os.getloadavg()

    t0 = time.perf_counter()
    model, tok, probe, evaluation, calib_batch = (setup_encoder if encoder else setup_decoder)(args)
    dtype = torch.float32 if encoder else torch.bfloat16  # as stored: the fp32 encoder, the bf16 folders
    originals = {n: p.detach().to(dtype).clone() for n, p in model.named_parameters() if is_target(n, tuple(p.shape))}
    numel = sum(w.numel() for w in originals.values())
    print(f"{len(originals)} target matrices, {numel:,} weights ({dtype}); variants {', '.join(variants)}"
          + "".join(f"; skipped {v}: {why}" for v, why in skipped.items()), flush=True)
    calibration, energy, ft_windows = {}, {}, None
    if {"weighted", "weighted+outliers"} & set(variants):
        energy, calibration["weighted"] = activation_energy(args, model, tok, calib_batch, encoder)
        if missing := sorted(set(originals) - set(energy)):
            sys.exit(f"no activation statistics for {len(missing)} target matrices (first: {missing[0]})")
    fisher = {}
    if "fisher+outliers" in variants:
        fisher, calibration["fisher"] = fisher_weights(args, model, tok)
        if missing := sorted(set(originals) - set(fisher)):
            sys.exit(f"no Fisher statistics for {len(missing)} target matrices (first: {missing[0]})")
    if "outliers+finetune" in variants:
        from unweight.calibrate import calibration_windows

        ft_windows = calibration_windows(tok, max(1, min(args.finetune_steps, 16)), args.finetune_seq_len, seed=1)
        calibration["finetune"] = {"corpus": "austen/calib", "steps": args.finetune_steps,
                                   "seq_len": args.finetune_seq_len, "lr": args.finetune_lr,
                                   "windows": len(ft_windows)}
    warm = torch.randn(64, 256).to(dtype)  # numba: compile, or load its disk cache, before any timing
    encode_kmeans(warm, KMeansSpec(k=4), importance=torch.ones(64, 256))
    entropy_code(encode_kmeans(warm, KMeansSpec(k=4)), "warm-up")
    entropy_code(encode_rtn(warm, RTNSpec(bits=4, group_size=GROUP_SIZE)), "warm-up")

    meta = {
        "claim": "issue 4 item 7: per-matrix K-means x {plain, weighted, outliers, +affine, +finetune} against RTN",
        "model": args.model, "weights": numel, "matrices": len(originals), "weight_dtype": str(dtype),
        "flattered": None if encoder else (
            "4-bit-derived weights (bundled GGUF; ~10k distinct values per matrix): K-means at large K, the "
            "relative error and perplexity near the base are flattered; minilm-l6 (fp32) is the reference"),
        "evaluation": evaluation, "outliers": args.outliers, "calibration": calibration, "skipped": skipped,
        "rtn": {"scheme": "asym_int", "group_size": GROUP_SIZE},
        "bits": "measured: bytes of every stored part over the target matrices; 'rans': indices/levels rANS-coded",
        "setup_s": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "numba_threads": numba.get_num_threads(),
                    "load_avg_start": load_start},
    }
    run = Run(args, model, probe, originals, encoder, meta)
    run.fisher = fisher
    if not args.no_whole_model:
        meta["whole_model"] = wm = whole_model(args.model, WHOLE_MODEL_K, args.threads)
        print(f"whole model at K={WHOLE_MODEL_K} (fresh process, {wm['numba_threads']} thread(s)): "
              f"{wm['wall_s']:.1f} s wall, {wm['cpu_s']:.1f} s CPU; RSS {wm['rss_before_clustering_mb']:.0f} MB "
              f"before clustering, peak {wm['peak_rss_clustering_mb'] or float('nan'):.0f} MB while clustering, "
              f"{wm['peak_rss_mb']:.0f} MB in all (reading the checkpoint included)", flush=True)
        run.save()
    for bits in args.rtn_bits:
        spec = RTNSpec(bits=bits, group_size=GROUP_SIZE)
        parts, s = encode_all(originals, lambda n, w: encode_rtn(w, spec))
        run.record("rtn", bits, f"g{GROUP_SIZE}", parts, s)
    histograms = {}
    for k in args.ks:
        run.kmeans_rows(k, variants, outliers, energy, ft_windows, histograms)
    meta["summary"] = run.summarize()
    run.save()
    print(f"wrote {run.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
