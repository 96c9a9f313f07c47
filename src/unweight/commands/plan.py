"""Spend a bit budget where it matters: one K-means K (or RTN width) per decoder Linear, from measured
per-matrix sensitivity, written as a recipe.

  unweight plan smollm2-135m --bits 3.0 --out recipe.yaml
  unweight plan smollm2-135m --bits 3.0 --method rtn --estimate fisher
  unweight plan smollm2-135m --bits 3.0 --evaluate          # perplexity of the plan vs uniform

For every Linear in the decoder blocks and every option (kmeans: K in 4/8/16/32/64, per-matrix
codebooks; rtn: 2/3/4/8 bits, groups of 128, integer zero point), the loss increase when only that
matrix is replaced is estimated:

  measured (default)  measured on a short calibration slice (--windows x --seq-len tokens of the
                      calibration split), recomputing only the blocks from the matrix's own on:
                      210 x 5 tail passes on smollm2-135m. --metric kl (default) measures the mean
                      KL(base || replaced) per token, --metric nll the NLL increase (noisier);
  fisher              1/2 sum F_ij (W'_ij - W_ij)^2 with F the squared gradients (empirical Fisher)
                      of --windows calibration windows: one backward pass per window and no forward
                      pass per option, but a diagonal, second-order proxy (blind to interactions and
                      to damage beyond the quadratic regime);
  fisher --refine R   the proxy, then up to R rounds of lazy measurement: plan, measure (on
                      --measure-windows windows) every chosen option not measured yet, replace its
                      estimate by the measurement, plan again. Unmeasured estimates are put in
                      measured units by the median measured/estimate ratio so far. The final plan's
                      choices are all measured once a round finds nothing new to measure, at a
                      fraction of the cost of measuring every option.

The planner (unweight.quant.planner: Lagrangian greedy on the convex hull of each matrix's options,
with a proven lower bound) picks one option per matrix under --bits bits per weight, every index,
codebook, scale and zero point counted, and the choices are written as recipe.yaml (unweight.recipe).
Losses are assumed to add up over matrices, which they do only approximately.
--evaluate applies the plan in memory and compares perplexity on the evaluation split (8 windows of
1024 tokens by default) with the base model and with a uniform allocation at the same nominal bits
(K=8 at 3 bits). The bundled decoders are 4-bit-derived (DESIGN.md): read their figures as such.
--measurements FILE keeps every estimate and measurement, so a plan at another budget is free.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from unweight.commands import add_threads
from unweight.errors import UnweightError
from unweight.quant.planner import MatrixOptions, Option, plan, uniform_allocation
from unweight.recipe import Recipe, dump, outlier_bits, reconstruct, setting_bits
from unweight.report.table import Column, format_table

HELP = "assign a K (or bit width) per matrix under a bits-per-weight budget; write recipe.yaml"
OPTIONS = {"kmeans": [{"k": k} for k in (4, 8, 16, 32, 64)],
           "rtn": [{"bits": b} for b in (2, 3, 4, 8)]}
DEFAULT_WINDOWS = {"measured": 2, "fisher": 8}
DEFAULT_SEQ_LEN = 256
DEFAULT_EVAL_TOKENS = 8192
EVAL_SEQ_LEN = 1024


def add_arguments(p):
    p.add_argument("model", help="bundled causal LM name or HF folder")
    p.add_argument("--bits", type=float, required=True, help="budget in bits per weight (e.g. 3.0)")
    p.add_argument("--method", default="kmeans", choices=list(OPTIONS), help="kmeans (default) or rtn")
    p.add_argument("--estimate", default="measured", choices=list(DEFAULT_WINDOWS),
                   help="how each option's loss increase is estimated (default: measured)")
    p.add_argument("--outliers", default=None, metavar="SPEC",
                   help="every option keeps these weights exactly (dense-and-sparse: auto, a count, or a "
                        "fraction such as 0.05%%), their indices and values counted in the bits; recorded in "
                        "the recipe (default: none)")
    p.add_argument("--out", default="recipe.yaml", help="recipe to write (default: recipe.yaml)")
    p.add_argument("--windows", type=int, default=None,
                   help="calibration windows (default: 2 measured, 8 fisher)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="calibration window length")
    p.add_argument("--score-stride", type=int, default=1,
                   help="measured: score every s-th position (cuts the LM head's cost; default 1)")
    p.add_argument("--refine", type=int, default=0, metavar="R",
                   help="with --estimate fisher: up to R rounds of measuring the options the plan "
                        "chooses (default 0)")
    p.add_argument("--metric", default="kl", choices=["kl", "nll"],
                   help="what a measurement is: KL(base || replaced) per token (default; never "
                        "negative, far less noisy on a short slice) or the NLL increase")
    p.add_argument("--measure-windows", type=int, default=1,
                   help="calibration windows for --refine and --check measurements (default 1)")
    p.add_argument("--measurements", default=None,
                   help="JSON of per-matrix option losses: read if it exists (same model, method, "
                        "estimate), else written after measuring")
    p.add_argument("--check", type=int, default=0, metavar="M",
                   help="with --estimate fisher: also measure every option of M matrices (random, plus "
                        "the two the estimate finds most sensitive) on one calibration window, and "
                        "report how well the estimate ranks them")
    p.add_argument("--evaluate", action="store_true",
                   help="perplexity of the plan vs the base model and a uniform allocation")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS,
                   help=f"evaluation tokens (windows of {EVAL_SEQ_LEN}; default {DEFAULT_EVAL_TOKENS})")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _label(settings: dict) -> str:
    """``k=16`` or ``bits=3``: the option (outliers, the same for every option, are left out)."""
    return ",".join(f"{k}={v}" for k, v in settings.items() if k != "outliers")


def options_for(method: str, outliers: str | int | float | None = None) -> list[dict]:
    """The settings the planner chooses from; with ``outliers`` every option keeps them exactly."""
    return [s if outliers is None else {**s, "outliers": outliers} for s in OPTIONS[method]]


@torch.no_grad()
def measure_options(model, tok, method: str, estimate: str, n_windows: int, seq_len: int,
                    progress: bool = True, stride: int = 1, metric: str = "kl",
                    outliers: str | int | float | None = None) -> dict:
    """{"base_loss", "tokens", "matrices": {name: {"numel", "shape", "options": [{settings, bits,
    loss}]}}}: every option of every decoder Linear, estimated alone."""
    from unweight.analysis.sensitivity import (TailLoss, collect_statistics, decoder_linears,
                                               fisher_estimate)
    from unweight.calibrate import calibration_windows
    from unweight.outliers import select_outliers

    windows = calibration_windows(tok, n_windows, seq_len)
    if estimate == "measured":
        tail = TailLoss(model, windows, stride=stride, metric=metric)
        base, tokens, fisher = tail.base, tail.tokens, None
    else:
        with torch.enable_grad():
            stats = collect_statistics(model, windows, fisher=True, progress=progress)
        base, tokens, fisher = stats.loss, stats.tokens, stats.fisher
    result = {"base_loss": base, "tokens": tokens, "windows": n_windows, "seq_len": seq_len,
              "score_stride": stride if fisher is None else 1,
              "metric": metric if fisher is None else "fisher", "matrices": {}}
    linears = decoder_linears(model)
    for name, (_, linear) in tqdm(linears.items(), desc=f"options ({estimate})", unit="matrix",
                                  disable=not progress):
        w = linear.weight.data
        idx = None if outliers is None else select_outliers(w, outliers)  # once: every option keeps them
        exact = outlier_bits(w, idx)
        options = []
        for settings in options_for(method, outliers):
            new = reconstruct(w, method, settings, idx)
            loss = tail.increase(name, new) if fisher is None else fisher_estimate(fisher[name], new - w)
            options.append({"settings": settings, "bits": setting_bits(method, tuple(w.shape), settings) + exact,
                            "loss": loss})
        result["matrices"][name] = {"numel": w.numel(), "shape": list(w.shape), "options": options}
    return result


@torch.no_grad()
def check_estimates(model, tok, measurements: dict, method: str, n_matrices: int, seq_len: int,
                    n_windows: int = 1, metric: str = "kl", seed: int = 0, progress: bool = True) -> dict:
    """Measure every option of ``n_matrices`` matrices (random, plus the two with the largest
    estimate at the second-cheapest option) on ``n_windows`` calibration windows; compare with the
    estimates."""
    import random

    from unweight.analysis.sensitivity import TailLoss, decoder_linears
    from unweight.calibrate import calibration_windows

    names = list(measurements["matrices"])
    top = sorted(names, key=lambda n: -measurements["matrices"][n]["options"][1]["loss"])[:2]
    rest = [n for n in names if n not in top]
    chosen = top + random.Random(seed).sample(rest, max(0, min(n_matrices - 2, len(rest))))
    tail = TailLoss(model, calibration_windows(tok, n_windows, seq_len), metric=metric)
    linears = decoder_linears(model)
    pairs = []
    for name in tqdm(chosen, desc="check", unit="matrix", disable=not progress):
        w = linears[name][1].weight.data
        for o in measurements["matrices"][name]["options"]:
            measured, se = tail.measure(name, reconstruct(w, method, o["settings"]))
            pairs.append({"name": name, "settings": o["settings"], "estimate": o["loss"],
                          "measured": measured, "se": se})
    from unweight.commands.analyze import _spearman

    ratios = sorted(p["measured"] / p["estimate"] for p in pairs if p["estimate"] > 0)
    return {"matrices": chosen, "tokens": tail.tokens, "base_loss": tail.base, "pairs": pairs,
            "spearman": _spearman([p["estimate"] for p in pairs], [p["measured"] for p in pairs]),
            "median_measured_over_estimate": ratios[len(ratios) // 2] if ratios else None}


def option_loss(option: dict, scale: float = 1.0) -> float:
    """The loss the planner uses: the measurement when there is one, else the scaled estimate."""
    return option["measured"] if "measured" in option else scale * option["loss"]


def estimate_scale(measurements: dict) -> float:
    """Median of measured / estimate over the options that have both (1.0 when none has)."""
    ratios = sorted(o["measured"] / o["loss"] for m in measurements["matrices"].values()
                    for o in m["options"] if "measured" in o and o["loss"] > 0)
    return ratios[len(ratios) // 2] if ratios else 1.0


def matrix_options(measurements: dict, scale: float = 1.0) -> list[MatrixOptions]:
    return [MatrixOptions(name, m["numel"], tuple(Option(o["bits"], option_loss(o, scale),
                                                         _label(o["settings"]))
                                                  for o in m["options"]))
            for name, m in measurements["matrices"].items()]


@torch.no_grad()
def refine(model, measurements: dict, method: str, budget: float, rounds: int, tail,
           save=None, progress: bool = True) -> list[dict]:
    """Lazy measurement (see the module docstring): each round plans, then measures the chosen
    options that have no measurement yet; stops when there are none. Returns the rounds' log."""
    from unweight.analysis.sensitivity import decoder_linears

    linears = decoder_linears(model)
    log = []
    for r in range(rounds):
        scale = estimate_scale(measurements)
        allocation = plan(matrix_options(measurements, scale), budget)
        todo = [(name, j) for name, j in zip(allocation.names, allocation.choice)
                if "measured" not in measurements["matrices"][name]["options"][j]]
        log.append({"round": r, "scale": scale, "to_measure": len(todo),
                    "predicted_loss_increase": allocation.total_loss})
        if not todo:
            break
        for name, j in tqdm(todo, desc=f"refine {r + 1}/{rounds}", unit="option", disable=not progress):
            option = measurements["matrices"][name]["options"][j]
            w = linears[name][1].weight.data
            option["measured"], option["measured_se"] = tail.measure(
                name, reconstruct(w, method, option["settings"]))
        if save is not None:
            save(measurements)
    return log


def make_recipe(measurements: dict, allocation, method: str, budget: float, model: str,
                notes: dict) -> Recipe:
    """The recipe of an allocation: the most common setting becomes ``default``."""
    chosen = {name: measurements["matrices"][name]["options"][j]["settings"]
              for name, j in zip(allocation.names, allocation.choice)}
    counts = Counter(_label(s) for s in chosen.values())
    top = counts.most_common(1)[0][0]
    default = next(s for s in chosen.values() if _label(s) == top)
    return Recipe(method=method, default=dict(default),
                  matrices={n: dict(s) for n, s in chosen.items() if _label(s) != top},
                  budget_bits=budget, expected_bits=allocation.bits_per_weight, model=model,
                  notes=notes)


def uniform_setting(method: str, budget: float, outliers: str | int | float | None = None) -> dict:
    """The uniform baseline at the same nominal bits: K = 2^floor(bits), or floor(bits) RTN bits."""
    n = max(1, math.floor(budget))
    s = {"k": 2 ** n} if method == "kmeans" else {"bits": n}
    return s if outliers is None else {**s, "outliers": outliers}


def evaluate_recipes(model, tok, recipes: dict[str, Recipe | None], names: list[str], eval_tokens: int,
                     progress: bool) -> dict:
    """Perplexity on the evaluation split of each recipe applied in memory (None: the base model)."""
    from unweight.data import corpus
    from unweight.eval import evaluate, token_windows
    from unweight.recipe import apply_in_memory

    windows = token_windows(tok, corpus("austen", "eval"), EVAL_SEQ_LEN, max_tokens=eval_tokens)
    params = dict(model.named_parameters())
    saved = {n: params[n].data for n in names}
    out = {}
    try:
        for label, recipe in recipes.items():
            applied = apply_in_memory(model, recipe, names) if recipe is not None else {}
            r = evaluate(model, windows, tok, progress=progress, desc=label)
            out[label] = {"perplexity": r.perplexity, "nll": r.nll, "bits_per_byte": r.bits_per_byte,
                          "tokens": r.tokens, "windows": r.windows, "seq_len": r.seq_len,
                          "bits_per_weight": applied.get("bits_per_weight")}
            for n in names:
                params[n].data = saved[n]
    finally:
        for n in names:
            params[n].data = saved[n]
    return out


def run(args) -> int:
    from unweight.models import MODELS, hf_folder, load_causal_lm

    if not args.bits > 0:
        raise UnweightError(f"--bits must be positive, got {args.bits}")
    from unweight.outliers import parse_outliers

    args.outliers = parse_outliers(args.outliers)  # None, "auto", a count or a fraction
    if args.model in MODELS and MODELS[args.model].kind != "causal-lm":
        raise UnweightError(f"{args.model}: the planner measures a causal LM's loss; this is an encoder")
    if (args.refine or args.check) and args.estimate != "fisher":
        raise UnweightError("--refine and --check refine or check the fisher estimate: add --estimate fisher")
    n_windows = args.windows or DEFAULT_WINDOWS[args.estimate]
    progress = not args.quiet
    start = time.perf_counter()
    model, tok = load_causal_lm(str(hf_folder(args.model)))

    saved = Path(args.measurements) if args.measurements else None
    key = {"model": args.model, "method": args.method, "estimate": args.estimate, "outliers": args.outliers}

    def save(m: dict) -> None:
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name(saved.name + ".tmp")
            tmp.write_text(json.dumps(m, indent=1))
            tmp.replace(saved)

    if saved is not None and saved.exists():
        measurements = json.loads(saved.read_text())
        if {k: measurements.get(k) for k in key} != key:
            raise UnweightError(f"{saved}: measurements of {({k: measurements.get(k) for k in key})}, "
                                f"not of {key}")
    else:
        measurements = {**key, **measure_options(model, tok, args.method, args.estimate, n_windows,
                                                 args.seq_len, progress, args.score_stride, args.metric,
                                                 args.outliers)}
        save(measurements)
    rounds = []
    if args.refine and measurements.get("refine_slice", {}).get("metric", args.metric) != args.metric:
        raise UnweightError(f"{saved}: its measurements use metric "
                            f"{measurements['refine_slice']['metric']!r}, not {args.metric!r}")
    if args.refine:
        from unweight.analysis.sensitivity import TailLoss
        from unweight.calibrate import calibration_windows

        tail = TailLoss(model, calibration_windows(tok, args.measure_windows, args.seq_len),
                        stride=args.score_stride, metric=args.metric)
        rounds = refine(model, measurements, args.method, args.bits, args.refine, tail, save, progress)
        measurements["refine_slice"] = {"windows": args.measure_windows, "seq_len": args.seq_len,
                                        "tokens": tail.tokens, "base_loss": tail.base,
                                        "metric": args.metric}
        save(measurements)
    scale = estimate_scale(measurements)
    mats = matrix_options(measurements, scale)
    allocation = plan(mats, args.bits)
    uniform = uniform_setting(args.method, args.bits, args.outliers)
    u_index = [next(j for j, o in enumerate(measurements["matrices"][m.name]["options"])
                    if o["settings"] == uniform) for m in mats]
    from unweight.quant.planner import evaluate as allocation_of

    u_alloc = allocation_of(mats, u_index)
    chosen_measured = sum("measured" in measurements["matrices"][n]["options"][j]
                          for n, j in zip(allocation.names, allocation.choice))
    notes = {"estimate": args.estimate + (f" + {len(rounds)} refine rounds" if rounds else ""),
             "calibration": f"austen/calib, {measurements['windows']} x {measurements['seq_len']} tokens",
             "base_loss": measurements["base_loss"], "estimate_scale": scale,
             "chosen_measured": f"{chosen_measured}/{len(mats)}",
             "predicted_loss_increase": allocation.total_loss, "lower_bound": allocation.lower_bound,
             "uniform": {"settings": uniform, "bits": u_alloc.bits_per_weight,
                         "predicted_loss_increase": u_alloc.total_loss},
             "scope": "every Linear in the decoder blocks; embeddings and head not planned"}
    recipe = make_recipe(measurements, allocation, args.method, args.bits, args.model, notes)
    dump(recipe, args.out)

    result = {"model": args.model, "method": args.method, "outliers": args.outliers, "estimate": notes["estimate"],
              "budget_bits": args.bits, "expected_bits": allocation.bits_per_weight,
              "predicted_loss_increase": allocation.total_loss, "lower_bound": allocation.lower_bound,
              "proven_optimal": allocation.proven_optimal, "estimate_scale": scale,
              "chosen_measured": chosen_measured, "refine_rounds": rounds, "uniform": notes["uniform"],
              "choices": dict(Counter(o.label for o in allocation.chosen)), "recipe": str(args.out)}
    if args.check:
        result["check"] = check_estimates(model, tok, measurements, args.method, args.check,
                                          args.seq_len, args.measure_windows, args.metric,
                                          progress=progress)
    if args.evaluate:
        names = list(measurements["matrices"])
        uni = Recipe(method=args.method, default=uniform, budget_bits=args.bits)
        result["evaluation"] = evaluate_recipes(
            model, tok, {"base": None, "plan": recipe, f"uniform {_label(uniform)}": uni}, names,
            args.eval_tokens, progress)
    result["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    _print(result, recipe, measurements)
    return 0


def _print(result: dict, recipe: Recipe, measurements: dict) -> None:
    from unweight.analysis.superweights import matrix_kind

    by_kind: dict[str, Counter] = {}
    for name in measurements["matrices"]:
        chosen = recipe.matrices.get(name, recipe.default)
        by_kind.setdefault(matrix_kind(name), Counter())[_label(chosen)] += 1
    rows = [{"matrix": k, **{lbl: n for lbl, n in c.items()}} for k, c in by_kind.items()]
    labels = [_label(s) for s in options_for(result["method"], result.get("outliers"))]
    print(format_table(rows, [Column("matrix")] + [Column(lbl) for lbl in labels],
                       title=f"{result['model']}: plan at {result['budget_bits']} bits per weight "
                             f"({result['estimate']} sensitivity)"))
    for r in result["refine_rounds"]:
        print(f"  refine round {r['round'] + 1}: {r['to_measure']} options measured, scale {r['scale']:.3g}")
    print(f"\n  expected {result['expected_bits']:.4f} bits per weight; predicted loss increase "
          f"{result['predicted_loss_increase']:.4g} (lower bound {result['lower_bound']:.4g}); uniform "
          f"{_label(result['uniform']['settings'])}: {result['uniform']['bits']:.4f} bits, predicted "
          f"{result['uniform']['predicted_loss_increase']:.4g}")
    if "check" in result:
        c = result["check"]
        print(f"\n  estimate vs measured ({len(c['pairs'])} options of {len(c['matrices'])} matrices, "
              f"{c['tokens']} tokens): Spearman {c['spearman']:.3f}, median measured/estimate "
              f"{c['median_measured_over_estimate']:.3g}")
    if "evaluation" in result:
        rows = [{"model": k, **v} for k, v in result["evaluation"].items()]
        print()
        print(format_table(rows, [Column("model"), Column("bits_per_weight", "bits/weight", ".4f"),
                                  Column("perplexity", fmt=".3f"), Column("bits_per_byte", "bits/byte", ".4f"),
                                  Column("tokens")],
                           title="evaluation split (austen/eval), 4-bit-derived model"))
    print(f"\nwrote {result['recipe']}")
