"""The rank study's verdicts: each claim of arXiv 2603.17917's abstract, held against the measurements.

The rules are stated next to each verdict in the summary so that a reader can disagree with them:

- *damage* of a perturbation on a matrix = median perplexity over seeds / the control's perplexity
  (the clustered matrix itself), so clustering error is not counted against the perturbation;
- "mid and late layers" are blocks from n_blocks // 3 on;
- a progressive curve *survives* while perplexity < 2x the base model's;
- super-weight matrices are MLP down-projections whose largest robust z-score is at least
  ``SUPER_WEIGHT_Z`` (a normal matrix of a million entries peaks near z = 5).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

from unweight.report.table import format_table

SUPER_WEIGHT_Z = 25.0
SHARP = 2.0  # scrambling is "sharp" when the median damage is at least this
ORDERS_OF_MAGNITUDE = 100.0  # ... and "orders of magnitude" when the worst damage reaches this
ALMOST_NOTHING = 0.02  # rank-preserving "costs almost nothing": median damage <= 1 + this
MOSTLY_NOTHING = 0.10  # ... and its 90th percentile <= 1 + this
WORST = 5  # how many of the worst scan entries the super-weight check looks at


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / den if den else float("nan")


def scan_table(results: dict) -> list[dict]:
    """One row per (block, matrix, variant): median, min and max perplexity over seeds, median KL, damage."""
    groups = defaultdict(list)
    for r in results["scans"]:
        groups[r["block"], r["matrix"], r["variant"]].append(r)
    control = {(b, m): statistics.median(x["perplexity"] for x in rs)
               for (b, m, v), rs in groups.items() if v == "control"}
    rows = []
    for (b, m, v), rs in groups.items():
        ppl = [x["perplexity"] for x in rs]
        med = statistics.median(ppl)
        rows.append({"block": b, "matrix": m, "variant": v, "seeds": len(rs), "perplexity": med,
                     "min": min(ppl), "max": max(ppl), "kl": statistics.median(x["kl"] for x in rs),
                     "damage": med / control[b, m] if (b, m) in control else float("nan"),
                     "std_ratio": statistics.median(x["std_ratio"] for x in rs),
                     "tail_ratio": statistics.median(x["tail_ratio"] for x in rs)})
    return rows


def super_weight_matrices(results: dict) -> list[dict]:
    """Down-projections whose largest robust z-score reaches SUPER_WEIGHT_Z, with their top candidate."""
    out = []
    for m in results["matrices"]:
        if "down" in m["matrix"] and m["max_z"] >= SUPER_WEIGHT_Z:
            c = m["candidates"][0]
            out.append({"block": m["block"], "matrix": m["matrix"], "row": c["row"], "col": c["col"],
                        "value": c["value"], "z": c["z"], "clustered": c["clustered"]})
    return out


def _curve(results: dict, order: str, variant: str) -> list[dict]:
    return [r for r in results["progressive"] if r["order"] == order and r["variant"] == variant]


def _survival(results: dict, order: str, variant: str) -> dict | None:
    return next((s for s in results["survival"] if s["order"] == order and s["variant"] == variant), None)


def _fmt_survival(s: dict | None) -> str:
    if s is None:
        return "-"
    return f"{s['survived_blocks']}" if s["doubled"] else f">={s['survived_blocks']}"


def claims(results: dict) -> list[dict]:
    """[{claim, holds, numbers}] for the four claims of the abstract and the super-weight question."""
    rows = scan_table(results)
    n = results["n_blocks"]
    out = []

    def damages(variant, blocks=None):
        return [r["damage"] for r in rows if r["variant"] == variant and (blocks is None or r["block"] in blocks)]

    # 1. Scrambling is catastrophic even with mean and variance preserved.
    matched = "scramble+match" if damages("scramble+match") else "scramble"
    d_plain, d_match = damages("scramble"), damages(matched)
    if d_match:
        med, worst = statistics.median(d_match), max(d_match)
        holds = "yes" if med >= SHARP and worst >= ORDERS_OF_MAGNITUDE else \
            "partly" if med >= SHARP or worst >= ORDERS_OF_MAGNITUDE else "no"
        frac10 = sum(d >= 10 for d in d_match) / len(d_match)
        by_block = defaultdict(list)
        for r in rows:
            if r["variant"] == matched:
                by_block[r["block"]].append(r["damage"])
        top = sorted(by_block, key=lambda b: -statistics.median(by_block[b]))[:3]
        blocks_txt = ", ".join(f"block {b} x{statistics.median(by_block[b]):.3g}" for b in top)
        numbers = (f"{matched} (matrix mean/std kept): median x{med:.3g} perplexity vs control, worst "
                   f"x{worst:.3g}, >=10x on {frac10:.0%} of {len(d_match)} matrices (worst blocks by median: "
                   f"{blocks_txt}); plain permutation "
                   f"(centroid mean/var kept): median x{statistics.median(d_plain):.3g}, worst x{max(d_plain):.3g}")
        out.append({"claim": "scrambling centroid ranks is catastrophic, even with mean/variance kept",
                    "holds": holds, "numbers": numbers,
                    "rule": f"yes if median damage >= {SHARP:g}x and worst >= {ORDERS_OF_MAGNITUDE:g}x"})

    # 2. Rank-preserving randomisation costs almost nothing in mid and late layers.
    late = {b for b in results["scan_blocks"] if b >= n // 3}
    early = set(results["scan_blocks"]) - late
    d_late, d_early = damages("rank", late), damages("rank", early)
    if d_late:
        med, p90 = statistics.median(d_late), _quantile(d_late, 0.9)
        holds = "yes" if med <= 1 + ALMOST_NOTHING and p90 <= 1 + MOSTLY_NOTHING else \
            "partly" if med <= 1 + 2 * ALMOST_NOTHING else "no"
        per_type = defaultdict(list)
        for r in rows:
            if r["variant"] == "rank" and r["block"] in late:
                per_type[r["matrix"].rsplit(".", 1)[-1]].append(r["damage"])
        types = ", ".join(f"{t} {statistics.median(v) - 1:+.1%}" for t, v in per_type.items())
        kl = statistics.median(r["kl"] for r in rows if r["variant"] == "rank" and r["block"] in late)
        tail = statistics.median(r["tail_ratio"] for r in rows if r["variant"] == "rank" and r["block"] in late)
        early_txt = (f"; early blocks (<{n // 3}): median {statistics.median(d_early) - 1:+.1%}"
                     if d_early else "")
        numbers = (f"blocks >= {n // 3}: median {med - 1:+.2%} perplexity vs control, 90th pct {p90 - 1:+.1%}, "
                   f"median KL {kl:.3g} nats (by type: {types}){early_txt}; the redrawn codebooks' extremes "
                   f"reach {tail:.2f}x the K-means ones (median)")
        out.append({"claim": "rank-preserving randomisation costs almost nothing in mid/late layers",
                    "holds": holds, "numbers": numbers,
                    "rule": f"yes if median <= +{ALMOST_NOTHING:.0%} and 90th pct <= +{MOSTLY_NOTHING:.0%}"})

    # 3 and 4. Progressive replacement: scale drift, and the affine correction.
    base = results["base"]["perplexity"]
    gains, drift_txt, drift_votes = [], [], []
    for order in ("forward", "reverse"):
        plain, fixed = _survival(results, order, "control"), _survival(results, order, "control+affine")
        if plain is None or fixed is None:
            continue
        gains.append((order, plain, fixed))
        if plain["doubled"]:
            step = plain["survived_blocks"]
            c, a = _curve(results, order, "control"), _curve(results, order, "control+affine")
            at_c = c[step]
            at_a = a[min(step, len(a) - 1)]
            nc, na = at_c["norm_ratio"][-1], at_a["norm_ratio"][-1]
            drift_votes.append(abs(math.log(nc)) > abs(math.log(na)) and fixed["survived_blocks"] > step)
            drift_txt.append(f"{order}: control doubles at {step + 1} blocks with last-block hidden norm "
                             f"ratio {nc:.3f} (affine at that step {na:.3f}, perplexity "
                             f"{at_c['perplexity']:.3g} vs {at_a['perplexity']:.3g})")
    supers_blocks = {s["block"] for s in super_weight_matrices(results)}
    for order in ("forward", "reverse"):
        c = _curve(results, order, "control")
        if c:
            ppl = [base] + [r["perplexity"] for r in c]
            i = max(range(len(c)), key=lambda j: ppl[j + 1] / ppl[j])
            where = "holds a super weight" if c[i]["block"] in supers_blocks else "no super weight"
            drift_txt.append(f"{order} control: largest one-step jump x{ppl[i + 1] / ppl[i]:.3g} when block "
                             f"{c[i]['block']} is replaced ({where})")
    std = defaultdict(list)
    for r in results["block_std"]:
        std[r["variant"]].append(r["std_ratio"])
    std_txt = ", ".join(f"{v} {statistics.fmean(x):.4f}" for v, x in std.items())
    rank_txt = "; ".join(
        f"{o}: rank {_fmt_survival(_survival(results, o, 'rank'))}, rank+affine "
        f"{_fmt_survival(_survival(results, o, 'rank+affine'))}" for o in ("forward", "reverse"))
    if gains:
        if not drift_votes:
            holds = "not observed"
        else:
            holds = "yes" if all(drift_votes) else "partly" if any(drift_votes) else "no"
        numbers = ("; ".join(drift_txt) or "control never doubled perplexity") + \
            f". Mean weight std ratio per block: {std_txt}. Blocks survived ({rank_txt})"
        out.append({"claim": "scale drift, not rank distortion, drives the collapse under progressive replacement",
                    "holds": holds, "numbers": numbers,
                    "rule": "yes if, where the control curve doubles, its hidden-state norm ratio is farther from 1 "
                            "than the affine curve's and the affine curve survives longer"})
        deltas = [f["survived_blocks"] - p["survived_blocks"] for _, p, f in gains]
        tested = [p["doubled"] for _, p, _ in gains]
        if not any(tested):
            holds = "not tested"
        else:
            holds = "yes" if all(d > 0 for d, t in zip(deltas, tested) if t) else \
                "partly" if any(d > 0 for d in deltas) else "no"
        numbers = "; ".join(f"{o}: control {_fmt_survival(p)} blocks, +affine {_fmt_survival(f)} "
                            f"(of {p['of']}) before perplexity > {2 * base:.3g}" for o, p, f in gains)
        out.append({"claim": "an affine correction w' = a w + b (a > 0) delays the collapse",
                    "holds": holds, "numbers": numbers,
                    "rule": "yes if the corrected curve survives more blocks in every order where the control doubles"})

    # 5. Super weights and the layers that hurt most (issue 8, item 5). Two readings: by absolute
    # perplexity (clustering's own clipping of the super weight included) and by damage beyond the control.
    supers = super_weight_matrices(results)
    super_keys = {(s["block"], s["matrix"]) for s in supers}
    z = {(m["block"], m["matrix"]): m["max_z"] for m in results["matrices"]}
    parts, votes = [], {"perplexity": [], "damage": []}
    for variant in ("control", "scramble+match", "scramble", "rank"):
        vr = [r for r in rows if r["variant"] == variant]
        for key in ("perplexity",) if variant == "control" else ("perplexity", "damage"):
            if not vr:
                continue
            worst = sorted(vr, key=lambda r: -r[key])[:WORST]
            hits = sum((r["block"], r["matrix"]) in super_keys for r in worst)
            rho = _spearman([z[r["block"], r["matrix"]] for r in vr], [r[key] for r in vr])
            names = ", ".join(f"{r['block']}.{r['matrix'].rsplit('.', 1)[-1]}" for r in worst)
            parts.append(f"{variant} by {key}: worst {names} ({hits} super-weight; Spearman(max z, {key}) "
                         f"{rho:.2f})")
            votes[key].append(hits / len(worst))
    if supers and votes["perplexity"]:
        by_ppl = max(votes["perplexity"])
        by_damage = max(votes["damage"], default=0.0)
        holds = "yes" if by_ppl >= 0.6 and by_damage >= 0.6 else \
            "partly" if by_ppl > 0 or by_damage > 0 else "no"
        sw = ", ".join(f"{s['block']}.down[{s['row']},{s['col']}] {s['value']:.3g} (z {s['z']:.0f}) -> "
                       f"{s['clustered']:.3g}" for s in supers)
        out.append({"claim": "super weights explain the layers where perturbations hurt most",
                    "holds": holds, "numbers": f"super weights (z >= {SUPER_WEIGHT_Z:g}; value -> value after "
                                               f"clustering): {sw}. " + "; ".join(parts),
                    "rule": f"yes if >= 60% of the {WORST} worst matrices are super-weight matrices both by "
                            f"perplexity and by damage beyond the control; partly if either has any"})
    return out


def markdown(results: dict, title: str = "Rank study") -> str:
    """summary.md: settings, the claims table, survival and super-weight tables, the worst scans."""
    cfg, win = results["config"], results["windows"]
    lines = [
        f"# {title}: {results.get('model', '')}",
        "",
        f"K = {cfg['k']} per matrix (exact K-means, assignments fixed); evaluation slice: {win['n']} window(s) "
        f"of {win['seq_len']} tokens of the Austen evaluation split ({win['tokens']} scored tokens); "
        f"{cfg['seeds']} seed(s) per random perturbation; scan blocks {results['scan_blocks']}; "
        f"progressive over {max((s['of'] for s in results['survival']), default=0)} blocks each way; "
        f"outliers kept exact per matrix: {cfg['keep_outliers']}. Base perplexity "
        f"{results['base']['perplexity']:.4g} on this slice. Wall time "
        f"{results.get('wall_seconds', results['seconds']['total']):.0f} s.",
    ]
    if results.get("note"):
        lines += ["", results["note"]]
    lines += ["", "## Claims of the abstract", "", "| claim | holds? | numbers |", "|---|---|---|"]
    for c in claims(results):
        lines.append(f"| {c['claim']} | {c['holds']} | {c['numbers']} |")
    lines += ["", "Rules:"] + [f"- {c['claim']}: {c['rule']}" for c in claims(results)]
    surv = [{**s, "survived": _fmt_survival(s)} for s in results["survival"]]
    lines += ["", "## Progressive replacement: blocks replaced before perplexity doubles", "", "```",
              format_table(surv, ["order", "variant", "survived", "of"]), "```"]
    supers = super_weight_matrices(results)
    if supers:
        lines += ["", "## Super-weight candidates (MLP down-projections)", "", "```",
                  format_table(supers, ["block", "matrix", "row", "col", "value", "z", "clustered"]), "```"]
    rows = sorted((r for r in scan_table(results) if r["variant"] != "control"), key=lambda r: -r["damage"])
    lines += ["", "## Worst per-layer scans (damage = perplexity / control's)", "", "```",
              format_table(rows[:15], ["block", "matrix", "variant", "seeds", "perplexity", "min", "max", "kl",
                                       "damage", "std_ratio", "tail_ratio"]), "```", ""]
    return "\n".join(lines)
