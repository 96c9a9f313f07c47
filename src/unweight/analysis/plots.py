"""PNG plots of the per-matrix statistics by layer: one line per matrix type (``mlp.down_proj``, ...).

Pure over the rows of ``unweight analyze`` (dicts with ``name`` and the plotted key); matplotlib runs
headless (Agg). Matrices outside numbered blocks (embeddings, heads) have no layer and are left out.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from unweight.analysis.superweights import block_index, matrix_kind

DPI = 110


def by_layer(rows: Sequence[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    """{matrix type: [(layer, value), ...] sorted by layer} for the rows that have ``key``."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        layer, value = block_index(r["name"]), r.get(key)
        if layer is None or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        series[matrix_kind(r["name"])].append((layer, float(value)))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_by_layer(rows: Sequence[dict], panels: Sequence[tuple[str, str, bool]], path: Path,
                  title: str) -> Path | None:
    """One figure, one panel per ``(key, y label, log scale)``, one line per matrix type.

    Returns ``path``, or None (nothing written) when no row has any of the keys by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [(by_layer(rows, key), label, log) for key, label, log in panels]
    data = [d for d in data if d[0]]
    if not data:
        return None
    fig, axes = plt.subplots(len(data), 1, figsize=(8, 3.2 * len(data)), squeeze=False)
    for ax, (series, label, log) in zip(axes[:, 0], data):
        for kind, points in series.items():
            xs, ys = zip(*points)
            if log:
                xs, ys = zip(*[(x, y) for x, y in points if y > 0]) if any(y > 0 for y in ys) else ((), ())
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=kind)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def analysis_plots(rows: Sequence[dict], out_dir: Path, model: str) -> dict[str, str]:
    """The standard plots of ``unweight analyze``: {plot name: file name} of those written."""
    out_dir = Path(out_dir)
    plots = {
        "rank": ([("effective_rank_ratio", "effective rank / full rank", False),
                  ("r99_ratio", "r99 / full rank", False)],
                 f"{model}: effective rank by layer"),
        "entropy": ([("value_entropy", "value entropy (bits/weight)", False),
                     ("exponent_entropy", "exponent entropy (bits/weight)", False)],
                    f"{model}: entropy by layer"),
        "sensitivity": ([("zero50_relative", "50% zeroed: rel. loss incr.", True),
                         ("fisher_zero", "Fisher est., all zeroed", True),
                         ("redundant_fraction", "redundant fraction", False)],
                        f"{model}: sensitivity by layer"),
    }
    written = {}
    for name, (panels, title) in plots.items():
        path = plot_by_layer(rows, panels, out_dir / f"{name}_by_layer.png", title)
        if path is not None:
            written[name] = path.name
    return written
