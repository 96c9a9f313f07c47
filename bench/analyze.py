"""How long does a whole ``unweight analyze`` take? (issue 5)

Claim: ``unweight analyze smollm2-135m`` without calibration -- every tensor of the cached bf16 folder
read, ``matrix_stats`` (one float32 SVD per matrix, value and exponent entropy, kurtosis, robust
outliers), the redundancy table, the PNG plots and analysis.json -- in <= 60 s on 2 cores.

The command runs in-process (``unweight.cli.main``), ``--rounds`` times, after one untimed warm-up
that imports everything and makes sure the bf16 conversion is cached (conversion is not analysis).
Wall time and process CPU time (user + sys) are both recorded: on a shared 2-core machine wall time
depends on the neighbours, CPU time much less. With ``--breakdown`` one extra pass times the parts of
``matrix_stats`` separately (SVD, entropies, moments, robust scale) over every tensor.

    .venv/bin/python bench/analyze.py [--model smollm2-135m] [--rounds 2] [--threads N] [--breakdown]

Prints a table and writes JSON (``--out``, default ``bench/results/analyze.json``), with the 1-minute
load average before and after each round. Run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from unweight.cli import main as unweight_main
from unweight.report.table import Column, format_table

TARGET_SECONDS = 60.0


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one_round(model: str, out: Path) -> dict:
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = unweight_main(["analyze", model, "--out", str(out), "--quiet"])
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    if rc != 0:
        raise SystemExit(f"unweight analyze {model} failed with exit code {rc}")
    result = json.loads((out / "analysis.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "stats_s": result["seconds"]["stats"],
            "tensors": len(result["matrices"]), "parameters": result["redundancy"]["parameters"],
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def breakdown(model: str) -> dict:
    """Seconds spent in each part of matrix_stats, summed over every tensor."""
    from unweight.analysis.entropy import FLOAT_LAYOUTS, distribution_stats, field_entropies
    from unweight.analysis.outliers import robust_scale
    from unweight.analysis.rank import rank_stats
    from unweight.checkpoint import open_checkpoint
    from unweight.models import hf_folder

    ckpt = open_checkpoint(hf_folder(model))
    parts = {"read": 0.0, "svd_rank": 0.0, "entropy": 0.0, "moments": 0.0, "robust_scale": 0.0}
    slowest = []
    for name in ckpt.names():
        t = time.perf_counter()
        w = ckpt.get(name)
        parts["read"] += time.perf_counter() - t
        steps = [("svd_rank", (lambda: rank_stats(w)) if w.ndim == 2 else None),
                 ("entropy", (lambda: field_entropies(w)) if w.dtype in FLOAT_LAYOUTS else None),
                 ("moments", lambda: distribution_stats(w)),
                 ("robust_scale", lambda: robust_scale(w))]
        total = 0.0
        for part, fn in steps:
            if fn is None:
                continue
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            parts[part] += dt
            total += dt
        slowest.append((total, name, list(w.shape)))
    slowest.sort(reverse=True)
    return {"parts_s": parts, "slowest": [{"name": n, "shape": s, "seconds": t} for t, n, s in slowest[:5]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--breakdown", action="store_true", help="also time matrix_stats' parts")
    p.add_argument("--out", default="bench/results/analyze.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from unweight.models import hf_folder

    hf_folder(args.model)  # cached conversion, not timed
    with tempfile.TemporaryDirectory() as tmp:
        warm = one_round("minilm-l6", Path(tmp) / "warm")  # imports, numba, matplotlib: untimed
        rounds = [one_round(args.model, Path(tmp) / f"round{i}") for i in range(args.rounds)]
    wall = statistics.median(r["wall_s"] for r in rounds)
    result = {
        "claim": f"unweight analyze {args.model} (no calibration) in <= {TARGET_SECONDS:.0f} s on 2 cores",
        "model": args.model, "rounds": rounds, "median_wall_s": wall,
        "median_cpu_s": statistics.median(r["cpu_s"] for r in rounds),
        "meets_target": wall <= TARGET_SECONDS, "warm_up_wall_s": warm["wall_s"],
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
    }
    if args.breakdown:
        result["breakdown"] = breakdown(args.model)
    rows = [{"round": i, **r} for i, r in enumerate(rounds)]
    print(format_table(rows, [Column("round"), Column("wall_s", "wall s", ".1f"), Column("cpu_s", "cpu s", ".1f"),
                              Column("stats_s", "stats s", ".1f"), Column("tensors"),
                              Column("parameters", fmt=","), Column("load_before", "load before", ".2f"),
                              Column("load_after", "load after", ".2f")],
                       title=f"unweight analyze {args.model}, {torch.get_num_threads()} torch threads, "
                             f"{os.cpu_count()} cpus"))
    print(f"\nmedian wall {wall:.1f} s (target <= {TARGET_SECONDS:.0f} s): "
          f"{'met' if result['meets_target'] else 'NOT met'}")
    if args.breakdown:
        parts = result["breakdown"]["parts_s"]
        print("breakdown (s): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
