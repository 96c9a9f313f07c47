"""Per-matrix redundancy statistics and the per-model redundancy table, streamed tensor by tensor.

  unweight analyze smollm2-135m
  unweight analyze minilm-l6 --out out/minilm --json
  unweight analyze smollm2-135m --calib --outliers

Every tensor is read, measured (effective rank, stable rank, r90/r99, value and exponent entropy,
kurtosis, outliers: see ``unweight.analysis.table.matrix_stats``) and dropped. Bundled decoders are read
from their cached bf16 conversion (4-bit-derived weights: see DESIGN.md), the encoder minilm-l6 from
its own fp32 safetensors.

--calib (causal LMs) adds, per decoder Linear, on the calibration split: Wanda score quantiles,
squared-gradient (Fisher) sensitivity, and the measured loss increase when the lowest-scoring 10/30/50%
of that one matrix's weights are zeroed; and the model's measured "estimated redundancy" (footnote of
the table). --outliers lists super-weight candidates with their activation evidence and, for causal
LMs, the measured effect of zeroing or clipping each alone.

Writes DIR/analysis.json and PNG plots by layer (default DIR: out/analyze-NAME).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from unweight.analysis import matrix_stats, redundancy_table
from unweight.analysis.plots import analysis_plots
from unweight.analysis.sensitivity import (REDUNDANCY_TOLERANCE, ZERO_FRACTIONS, TailLoss,
                                           collect_statistics, encoder_statistics, fisher_estimate,
                                           joint_increase, matrix_sensitivity, redundant_fraction,
                                           zero_lowest, zeroing_sweep)
from unweight.analysis.superweights import (CANDIDATES_PER_MATRIX, MEASURED_TOP, activation_evidence,
                                            block_index, find_candidates, measure_effects,
                                            select_for_measurement)
from unweight.checkpoint import open_checkpoint
from unweight.commands import add_threads
from unweight.errors import UnweightError
from unweight.models import MODELS, hf_folder
from unweight.report.table import Column, format_table

HELP = "per-matrix rank, entropy and sensitivity; the redundancy table; super-weight candidates"
DEFAULT_CALIB_WINDOWS = 8
DEFAULT_SEQ_LEN = 256
DEFAULT_MEASURE_WINDOWS = 1
OUTLIERS_SHOWN = 20
TEXTS_PER_WINDOW = 8  # an encoder's calibration: 8 paragraphs per --calib-windows
MIN_WORDS = 20
FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")

REDUNDANCY_FOOTNOTE = (
    "estimated redundancy (measured): the fraction of the weights of the {blocks} blocks' Linear "
    "matrices that can be zeroed, matrix by matrix (each alone, all others intact), lowest Wanda "
    "score |W_ij|*||X_j|| first within each output row, with {criterion}; per matrix the largest "
    "fraction of the ladder {ladder} whose increase, and that of every smaller one, stays under "
    "it. Matrices zeroed together cost more: this is a per-matrix measure, not a joint pruning "
    "result; 'joint' is the measured increase with every matrix at its redundant fraction at once, "
    "'wanda50' with every matrix at 50% (Wanda's unstructured setting).")
CRITERIA = {
    "causal-lm": "the next-token loss on the calibration slice rising by < {tol:.0%} relative",
    "encoder": "the sentence embeddings of the calibration paragraphs keeping a mean cosine "
               "similarity > {cos} to the original's (cosine distance < {tol})",
}


def add_arguments(p):
    p.add_argument("model", help="bundled model name or path (HF folder, .safetensors, .gguf)")
    p.add_argument("--calib", action="store_true",
                   help="calibrated sensitivity and the measured redundancy (causal LMs)")
    p.add_argument("--outliers", action="store_true", help="super-weight candidates and their effect")
    p.add_argument("--out", default=None, help="output folder (default: out/analyze-NAME)")
    p.add_argument("--json", action="store_true", help="print analysis.json instead of tables")
    p.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB_WINDOWS,
                   help=f"calibration windows for statistics and gradients (default {DEFAULT_CALIB_WINDOWS})")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"calibration window length in tokens (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--measure-windows", type=int, default=DEFAULT_MEASURE_WINDOWS,
                   help="of those, the windows on which loss increases are measured "
                        f"(default {DEFAULT_MEASURE_WINDOWS})")
    p.add_argument("--score-stride", type=int, default=1,
                   help="score every s-th position in the measurements (cuts the LM head's cost s-fold; "
                        "default 1: every position)")
    p.add_argument("--tolerance", type=float, default=REDUNDANCY_TOLERANCE,
                   help="relative loss increase under which weights count as redundant (default 0.01)")
    p.add_argument("--outlier-top", type=int, default=MEASURED_TOP,
                   help=f"candidates measured: this many overall plus down-projections (default {MEASURED_TOP})")
    add_threads(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _model_kind(model: str, path: Path) -> str:
    if model in MODELS:
        return MODELS[model].kind
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.exists():
        arch = " ".join(json.loads(config.read_text()).get("architectures") or [])
        return "causal-lm" if "CausalLM" in arch else "encoder"
    return "unknown"


def stream_stats(path: Path, progress: bool = True, want_candidates: bool = False):
    """(matrix_stats rows, super-weight candidates) of every tensor, read one at a time."""
    ckpt = open_checkpoint(path)
    rows, candidates = [], []
    for name in tqdm(ckpt.names(), desc="tensors", unit="tensor", disable=not progress):
        w = ckpt.get(name)
        rows.append(matrix_stats(name, w))
        if want_candidates and w.ndim == 2 and block_index(name) is not None:
            candidates.extend(find_candidates([(name, w)], CANDIDATES_PER_MATRIX))
        del w
    candidates.sort(key=lambda r: -r["z"])
    return rows, candidates


def calibrate(args, path: Path, kind: str, rows: list[dict], table: dict, candidates: list[dict]) -> dict:
    """The --calib and --outliers measurements on the loaded model; updates rows and table in place.

    A causal LM is probed by its next-token loss (TailLoss), an encoder by the cosine distance of its
    sentence embeddings (EmbeddingLoss) on as many calibration paragraphs as --calib-windows x 8."""
    progress = not args.quiet
    if args.measure_windows < 1 or args.measure_windows > args.calib_windows:
        raise UnweightError(f"--measure-windows must lie in 1..{args.calib_windows}")
    t0 = time.perf_counter()
    if kind == "causal-lm":
        from unweight.calibrate import calibration_windows
        from unweight.models import load_causal_lm

        model, tok = load_causal_lm(str(path))
        windows = calibration_windows(tok, args.calib_windows, args.seq_len)
        stats = collect_statistics(model, windows, fisher=args.calib, progress=progress)
        tail = TailLoss(model, windows[: args.measure_windows], stride=args.score_stride)
        info = {"probe": "next-token loss", "windows": stats.windows, "seq_len": args.seq_len,
                "tokens": stats.tokens, "loss": stats.loss, "measure_windows": args.measure_windows,
                "measure_tokens": tail.tokens, "measure_loss": tail.base, "score_stride": args.score_stride,
                "corpus": "austen/calib (random aligned windows, seed 0)"}
    else:
        model, batch = load_encoder(path, args.calib_windows * TEXTS_PER_WINDOW, args.seq_len)
        stats, tail = encoder_statistics(model, batch)
        info = {"probe": "sentence-embedding cosine distance (mean pooling)", "texts": stats.windows,
                "max_len": args.seq_len, "tokens": stats.tokens, "measure_tokens": stats.tokens,
                "measure_loss": 0.0, "corpus": "austen/calib paragraphs (random, seed 0)"}
    by_name = {r["name"]: r for r in rows}
    if args.outliers:
        shape = {n: tuple(m.weight.shape) for n, (_, m) in tail.linears.items()}
        for c in candidates:
            if c["name"] in shape:
                c.update(activation_evidence(c, stats, shape[c["name"]]))
        chosen = select_for_measurement([c for c in candidates if c["name"] in shape], args.outlier_top)
        for c in tqdm(chosen, desc="candidates", unit="weight", disable=not progress):
            c.update(measure_effects(c, tail))
            c["measured"] = True
        info["hidden_channel_max"] = _massive_channels(stats.hidden_max)
    if args.calib:
        fractions = tuple(ZERO_FRACTIONS)
        for name, (_, linear) in tqdm(tail.linears.items(), desc="sensitivity", unit="matrix",
                                      disable=not progress):
            row = by_name.setdefault(name, {"name": name, "numel": linear.weight.numel()})
            w = linear.weight.data
            row.update(matrix_sensitivity(w, stats.sq_norm[name], stats.fisher.get(name)))
            if stats.fisher:  # the proxy's estimate of the very change measured below
                row["fisher_zero50"] = fisher_estimate(
                    stats.fisher[name], zero_lowest(w, stats.sq_norm[name], 0.5) - w)
            sweep = zeroing_sweep(tail, name, stats.sq_norm[name], fractions, tolerance=args.tolerance)
            for f, (delta, se) in sweep.items():
                row[f"zero{round(f * 100)}_increase"] = delta
                row[f"zero{round(f * 100)}_se"] = se
                row[f"zero{round(f * 100)}_relative"] = delta / tail.reference
            deltas = {f: delta for f, (delta, _) in sweep.items()}
            row["redundant_fraction"] = redundant_fraction(deltas, tail.reference, args.tolerance)
        measured = [by_name[n] for n in tail.linears]
        total = sum(r["numel"] for r in measured)
        for key, fractions in (("joint_at_redundancy", {r["name"]: r["redundant_fraction"] for r in measured}),
                               ("joint_wanda50", {r["name"]: 0.5 for r in measured})):
            delta, se = joint_increase(tail, stats.sq_norm, fractions)
            table[f"{key}_relative"] = delta / tail.reference
            info[key] = {"increase": delta, "se": se, "relative": delta / tail.reference}
        table["estimated_redundancy"] = sum(r["numel"] * r["redundant_fraction"] for r in measured) / total
        table["redundancy_matrices"] = len(measured)
        table["redundancy_parameters"] = total
        table["redundancy_tolerance"] = args.tolerance
        if stats.fisher:
            info["fisher_zero50_vs_measured_spearman"] = _spearman(
                [r["fisher_zero50"] for r in measured], [r["zero50_increase"] for r in measured])
    info["tail_forwards"] = tail.forwards
    info["seconds"] = time.perf_counter() - t0
    return info


def load_encoder(path: Path, n_texts: int, max_len: int):
    """(model, batch): the encoder in float32 and ``n_texts`` random paragraphs of at least
    :data:`MIN_WORDS` words from the calibration split, tokenized and padded to at most ``max_len``."""
    import random

    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    from unweight.data import corpus

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise UnweightError(f"{path}: transformers cannot load this encoder: {exc}") from None
    paragraphs = [p for doc in corpus("austen", "calib") for p in doc.split("\n\n")
                  if len(p.split()) >= MIN_WORDS]
    texts = random.Random(0).sample(paragraphs, min(n_texts, len(paragraphs)))
    batch = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    return model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _massive_channels(hidden_max, top: int = 3) -> list[dict]:
    """Per hidden_states entry, the ``top`` channels by max |h| and their ratio to the median."""
    out = []
    for i, peaks in enumerate(hidden_max):
        median = float(peaks.median())
        values, idx = peaks.topk(top)
        out.append({"entry": i, "median": median,
                    "top": [{"channel": int(j), "max": float(v), "ratio": float(v) / median if median else None}
                            for v, j in zip(values, idx)]})
    return out


def _spearman(a: list[float], b: list[float]) -> float | None:
    import torch

    if len(a) < 3:
        return None
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else None


def _matrix_columns(calib: bool) -> list[Column]:
    cols = [Column("name"), Column("shape"), Column("effective_rank", "erank", ".1f"),
            Column("effective_rank_ratio", "erank/full", ".3f"), Column("stable_rank", "stable", ".1f"),
            Column("r90_ratio", "r90/full", ".3f"), Column("r99_ratio", "r99/full", ".3f"),
            Column("value_entropy", "H(W)", ".2f"), Column("exponent_entropy", "H(E)", ".2f"),
            Column("kurtosis", "kurt", ".1f"), Column("outlier_fraction", ">6sd", ".1e"),
            Column("max_robust_z", "max z", ".1f")]
    if calib:
        pct = lambda v: f"{100 * v:+.2f}%"  # noqa: E731
        cols += [Column("wanda_q50", "wanda q50", ".3g"), Column("fisher_zero", "fisher0", ".3g"),
                 Column("zero10_relative", "zero10", pct), Column("zero30_relative", "zero30", pct),
                 Column("zero50_relative", "zero50", pct), Column("redundant_fraction", "redund", ".1f")]
    return cols


def redundancy_row(model: str, table: dict) -> dict:
    return {"model": model, **table}


REDUNDANCY_COLUMNS = [
    Column("model"), Column("parameters", fmt=","), Column("matrices"),
    Column("mean_effective_rank", "mean erank", ".1f"),
    Column("mean_effective_rank_ratio", "erank/full", ".3f"),
    Column("weighted_mean_effective_rank_ratio", "erank/full (wtd)", ".3f"),
    Column("spectral_redundancy_99", "1-r99/full", ".3f"),
    Column("value_entropy", "H(W)", ".2f"), Column("exponent_entropy", "H(E)", ".2f"),
    Column("estimated_redundancy", "est. redundancy", lambda v: f"{v:.1%}"),
    Column("joint_at_redundancy_relative", "joint", lambda v: f"{v:+.1%}"),
    Column("joint_wanda50_relative", "wanda50", lambda v: f"{v:+.1%}"),
]


def print_report(result: dict) -> None:
    rows, table = result["matrices"], result["redundancy"]
    calib = "estimated_redundancy" in table
    print(format_table(rows, _matrix_columns(calib), title=f"{result['model']}: per-matrix statistics"))
    print()
    print(format_table([redundancy_row(result["model"], table)], REDUNDANCY_COLUMNS,
                       title="redundancy table"))
    print("  erank: Roy & Vetterli effective rank; mean over the 2-D matrices (wtd: by parameters).")
    print("  1-r99/full: fraction of rank a truncated SVD drops at 1% relative squared error (spectral proxy).")
    if calib:
        print("  " + result["definitions"]["estimated_redundancy"])
        c = result["calibration"]
        print(f"  calibration ({c['probe']}): {c['tokens']} tokens of {c['corpus']}; measured on "
              f"{c['measure_tokens']} tokens" + (f", base loss {c['loss']:.4f} nats/token"
                                                 if "loss" in c else ""))
    if "outliers" in result:
        cands = result["outliers"]["candidates"][:OUTLIERS_SHOWN]
        print()
        print(format_table(cands, [
            Column("block"), Column("matrix"), Column("row"), Column("col"), Column("value", fmt=".4g"),
            Column("z", fmt=".1f"), Column("input_ratio", "in max/med", ".1f"),
            Column("residual_channel", "resid ch"), Column("residual_side", "side"),
            Column("residual_ratio", "resid max/med", ".1f"), Column("massive"),
            Column("zero_relative", "zero", lambda v: f"{100 * v:+.2f}%"),
            Column("clip_relative", "clip 6sd", lambda v: f"{100 * v:+.2f}%")],
            title=f"super-weight candidates (top {len(cands)} by robust z)"))


def run(args) -> int:
    path = hf_folder(args.model)
    kind = _model_kind(args.model, path)
    if (args.calib or args.outliers) and kind not in ("causal-lm", "encoder"):
        raise UnweightError(f"{args.model}: --calib and --outliers need a causal LM or an encoder "
                            "with a config.json")
    name = Path(args.model).name if args.model not in MODELS else args.model
    out = Path(args.out or f"out/analyze-{name}")
    start = time.perf_counter()
    rows, candidates = stream_stats(path, progress=not args.quiet, want_candidates=args.outliers)
    seconds_stats = time.perf_counter() - start
    # Integer tensors (BERT's position_ids buffer) are indices, not weights: no rank or redundancy.
    table = redundancy_table([r for r in rows if r["dtype"] in FLOAT_DTYPES])
    result: dict = {"model": args.model, "path": str(path), "kind": kind, "matrices": rows,
                    "redundancy": table, "definitions": {}}
    if args.calib or args.outliers:
        result["calibration"] = calibrate(args, path, kind, rows, table, candidates)
    if args.calib:
        ladder = "/".join(f"{round(100 * f)}" for f in ZERO_FRACTIONS) + "% (then 70/90% while under)"
        criterion = CRITERIA[kind].format(tol=args.tolerance, cos=1 - args.tolerance)
        result["definitions"]["estimated_redundancy"] = REDUNDANCY_FOOTNOTE.format(
            blocks="decoder" if kind == "causal-lm" else "encoder", criterion=criterion, ladder=ladder)
    if args.outliers:
        result["outliers"] = {"candidates": candidates,
                              "note": "robust z = |w - median| / (1.4826 MAD) per matrix; top "
                                      f"{CANDIDATES_PER_MATRIX} per matrix in the decoder blocks"}
    if not args.no_plots:
        result["plots"] = analysis_plots(rows, out, name)
    result["seconds"] = {"stats": seconds_stats, "total": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(result), indent=1)
    (out / "analysis.json").write_text(text)
    if args.json:
        print(text)
    else:
        print_report(result)
        print(f"\nwrote {out / 'analysis.json'}" + "".join(f", {out / p}" for p in result.get("plots", {}).values()))
    return 0


def _jsonable(x):
    """NaN and infinity become None (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
