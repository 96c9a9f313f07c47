"""Is ``unweight convert`` really bounded by the largest tensor? (issue 2)

Claim: converting a GGUF model tensor by tensor (dequantize, cast, stream to a scratch file) needs about
the largest tensor in memory on top of the process's fixed cost, not the whole model.

Measured: the peak resident set size of

    unweight convert gemma3-270m OUT --dtype bf16

run as a child process (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a one-child wrapper, so no
other child counts), against

- the fixed cost: the peak RSS of a child that only imports what ``convert`` imports (torch,
  transformers, gguf, unweight);
- the largest tensor: gemma3-270m's token embedding (262,144 x 640, stored as GGUF Q8_0), in float32
  (what dequantization produces) and in bf16 (what is written);
- the whole model in bf16 (what a load-everything converter would hold at least).

The GGUF file is assembled from its four PyPI parts before the clock starts (``unweight.models``
caches it), so the measurement is the conversion alone. The output goes to a temporary folder.

    .venv/bin/python bench/convert_memory.py [--model gemma3-270m] [--dtype bf16]

Prints a table and writes JSON (``--out``, default ``bench/results/convert_memory.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unweight.checkpoint import open_checkpoint
from unweight.models import model_file
from unweight.report.table import Column, format_table

MB = 1 << 20
# Runs argv[1:] as its only child and prints that child's exit code and peak RSS (bytes; Linux reports KiB).
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, file=sys.stderr)")
IMPORTS_ONLY = ("import torch, transformers, gguf; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                "import unweight.convert, unweight.models, unweight.cli")


def peak_rss(cmd: list[str]) -> tuple[int, float, str]:
    """(peak RSS in bytes, wall seconds, stderr tail) of ``cmd`` run alone as a child."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    last = run.stderr.strip().splitlines()[-1]
    rc, rss = (int(x) for x in last.split())
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}):\n{run.stderr[-3000:]}")
    return rss, seconds, run.stderr[-500:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "convert_memory.json"))
    args = ap.parse_args(argv)

    source = model_file(args.model)  # assembles gemma's GGUF once, outside the measurement
    ckpt = open_checkpoint(source)
    infos = [ckpt.info(n) for n in ckpt.names()]
    largest = max(infos, key=lambda i: i.numel)
    parameters = sum(i.numel for i in infos)
    load_before = os.getloadavg()[0]

    baseline, baseline_s, _ = peak_rss([sys.executable, "-c", IMPORTS_ONLY])
    with tempfile.TemporaryDirectory(prefix="unweight-convert-memory-") as tmp:
        out = Path(tmp) / "out"
        peak, convert_s, _ = peak_rss([sys.executable, "-m", "unweight", "convert", args.model, str(out),
                                       "--dtype", args.dtype])
        out_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    load_after = os.getloadavg()[0]

    fp32, bf16 = largest.numel * 4, largest.numel * 2
    above = peak - baseline
    result = {
        "model": args.model, "dtype": args.dtype, "source": str(source), "source_bytes": source.stat().st_size,
        "parameters": parameters, "tensors": len(infos),
        "largest_tensor": {"name": largest.name, "gguf_type": largest.dtype, "shape": list(largest.shape),
                           "numel": largest.numel, "fp32_bytes": fp32, "bf16_bytes": bf16},
        "model_bf16_bytes": parameters * 2,
        "peak_rss_bytes": peak, "imports_only_peak_rss_bytes": baseline, "peak_above_imports_bytes": above,
        "peak_above_imports_over_largest_fp32": above / fp32,
        "peak_above_imports_over_largest_bf16": above / bf16,
        "convert_seconds": convert_s, "imports_only_seconds": baseline_s, "output_bytes": out_bytes,
        "cpus": os.cpu_count(), "load_average_before": load_before, "load_average_after": load_after,
    }
    rows = [
        {"what": "imports only (torch, transformers, gguf, unweight)", "MB": baseline / MB},
        {"what": f"unweight convert {args.model} --dtype {args.dtype}: peak RSS", "MB": peak / MB},
        {"what": "  peak above imports", "MB": above / MB},
        {"what": f"largest tensor {largest.name} {tuple(largest.shape)} ({largest.dtype}) in fp32", "MB": fp32 / MB},
        {"what": "  the same in bf16", "MB": bf16 / MB},
        {"what": f"whole model in bf16 ({parameters:,} parameters)", "MB": parameters * 2 / MB},
    ]
    print(format_table(rows, [Column("what"), Column("MB", "MB", ".0f")],
                       title=f"peak memory of unweight convert ({convert_s:.0f} s wall, "
                             f"load average {load_before:.2f} before, {load_after:.2f} after)"))
    print(f"peak above imports = {above / fp32:.2f} x the largest tensor in fp32 "
          f"({above / bf16:.2f} x in bf16); output {out_bytes / MB:.0f} MB")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
