"""Figures of the rank study (PNG, matplotlib's Agg backend): the per-layer scans, the progressive
curves with and without the affine correction, and the drift diagnostics. Every figure is drawn from the
study's JSON alone."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unweight.study.summary import scan_table, super_weight_matrices  # noqa: E402

DPI = 110
COLORS = {"control": "black", "scramble": "tab:red", "scramble+match": "tab:orange", "rank": "tab:blue",
          "control+affine": "tab:green", "rank+affine": "tab:purple"}
STYLES = {"control": "-", "control+affine": "--", "rank": "-", "rank+affine": "--"}


def perplexity_by_layer(results: dict, path: Path) -> None:
    """One panel per matrix type: perplexity (log) by block for each perturbation, seed range shaded."""
    rows = scan_table(results)
    mats = results["scan_matrices"]
    supers = {(s["block"], s["matrix"]) for s in super_weight_matrices(results)}
    cols = min(4, len(mats))
    nrows = -(-len(mats) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False, sharey=True)
    base = results["base"]["perplexity"]
    for ax, mat in zip(axes.flat, mats):
        for variant in results["config"]["scan_variants"]:
            rs = sorted((r for r in rows if r["matrix"] == mat and r["variant"] == variant), key=lambda r: r["block"])
            if not rs:
                continue
            x = [r["block"] for r in rs]
            ax.plot(x, [r["perplexity"] for r in rs], marker="o", ms=3, color=COLORS.get(variant), label=variant)
            if any(r["seeds"] > 1 for r in rs):
                ax.fill_between(x, [r["min"] for r in rs], [r["max"] for r in rs], color=COLORS.get(variant),
                                alpha=0.2, lw=0)
        ax.axhline(base, color="gray", ls=":", lw=1, label="base")
        for b, m in supers:
            if m == mat:
                ax.axvline(b, color="tab:brown", alpha=0.4, lw=2)
        ax.set_yscale("log")
        ax.set_title(mat, fontsize=9)
        ax.set_xlabel("block")
    for ax in axes.flat[len(mats):]:
        ax.axis("off")
    axes[0][0].set_ylabel("perplexity")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{results.get('model', '')}: one matrix replaced at a time, K={results['config']['k']} "
                 f"(brown: super-weight matrices; 4-bit-derived model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _curves(results: dict, order: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results["progressive"]:
        if r["order"] == order:
            out.setdefault(r["variant"], []).append(r)
    return out


def progressive(results: dict, path: Path) -> None:
    """Perplexity (log) against blocks replaced, forward and reverse, with and without the correction."""
    base = results["base"]["perplexity"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, order in zip(axes, ("forward", "reverse")):
        for variant, rs in _curves(results, order).items():
            ax.plot([r["blocks_replaced"] for r in rs], [r["perplexity"] for r in rs], marker="o", ms=3,
                    color=COLORS.get(variant), ls=STYLES.get(variant, "-"), label=variant)
        ax.axhline(base, color="gray", ls=":", lw=1, label="base")
        ax.axhline(2 * base, color="gray", ls="--", lw=1, label="2x base")
        ax.set_yscale("log")
        ax.set_xlabel("blocks replaced" + (" (0, 1, ...)" if order == "forward" else " (last, last-1, ...)"))
        ax.set_title(f"progressive replacement, {order}")
    axes[0].set_ylabel("perplexity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def drift(results: dict, path: Path) -> None:
    """Weight std ratio per block; last-block hidden-state norm ratio along each curve; the per-block
    norm ratio profile at the last measured step of each forward curve."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    by_variant: dict[str, list[dict]] = {}
    for r in results["block_std"]:
        by_variant.setdefault(r["variant"], []).append(r)
    for variant, rs in by_variant.items():
        rs = sorted(rs, key=lambda r: r["block"])
        ax.plot([r["block"] for r in rs], [r["std_ratio"] for r in rs], marker="o", ms=3,
                color=COLORS.get(variant), ls=STYLES.get(variant, "-"), label=variant)
    ax.axhline(1, color="gray", ls=":", lw=1)
    ax.set_title("weight std ratio to the original (mean over a block's matrices)", fontsize=9)
    ax.set_xlabel("block")
    ax.legend(fontsize=7)
    for ax, order in zip((axes[0][1], axes[1][0]), ("forward", "reverse")):
        for variant, rs in _curves(results, order).items():
            ax.plot([r["blocks_replaced"] for r in rs], [r["norm_ratio"][-1] for r in rs], marker="o", ms=3,
                    color=COLORS.get(variant), ls=STYLES.get(variant, "-"), label=variant)
        ax.axhline(1, color="gray", ls=":", lw=1)
        ax.set_title(f"last-block hidden-state norm ratio to base, {order}", fontsize=9)
        ax.set_xlabel("blocks replaced")
    ax = axes[1][1]
    for variant, rs in _curves(results, "forward").items():
        last = rs[-1]
        ax.plot(range(len(last["norm_ratio"])), last["norm_ratio"], color=COLORS.get(variant),
                ls=STYLES.get(variant, "-"), label=f"{variant} ({last['blocks_replaced']} blocks)")
    ax.axhline(1, color="gray", ls=":", lw=1)
    ax.set_title("hidden-state norm ratio by block, last step of each forward curve", fontsize=9)
    ax.set_xlabel("block")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


FIGURES = {"perplexity_by_layer.png": perplexity_by_layer, "progressive.png": progressive, "drift.png": drift}


def write_figures(results: dict, out: Path) -> list[Path]:
    paths = []
    for name, draw in FIGURES.items():
        draw(results, out / name)
        paths.append(out / name)
    return paths
