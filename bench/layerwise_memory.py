"""Peak memory of a calibrated compression (GPTQ) by phase: is the model held once, in its own dtype?

Claim (issue 7): ``unweight compress MODEL OUT --method gptq`` holds a 16-bit checkpoint in its own
dtype and computes one block at a time in float32 (``run_layerwise(compute_dtype=...)``), so its peak
resident set is about the model in bf16 plus one block's working set during calibration, and the
model plus the largest tensor while the folder is written, not the float32 model.

Measured: the CLI runs in this process (``unweight.cli.main``, one thread) while a thread samples the
RSS (``psutil``) every 20 ms; the phases are marked by wrapping ``load_causal_lm``,
``compress_layerwise`` and ``compress_checkpoint``. The output goes to a temporary folder.

    .venv/bin/python bench/layerwise_memory.py [--model gemma3-270m] [-- extra compress flags]

Prints the peak RSS per phase and writes JSON (``--out``, default
``bench/results/layerwise_memory-<model>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", type=Path)
    ap.add_argument("flags", nargs="*", help="compress flags (default: --method gptq --bits 4 "
                                             "--group-size 128 --scheme sym)")
    args = ap.parse_args()
    flags = args.flags or ["--method", "gptq", "--bits", "4", "--group-size", "128", "--scheme", "sym"]
    proc, phase, peaks = psutil.Process(), ["imports"], {}

    def sample() -> None:
        while True:
            rss = proc.memory_info().rss / 2**20
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), rss)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    import torch

    import unweight.commands.compress as compress
    import unweight.layerwise as layerwise
    import unweight.models as models
    from unweight.cli import main as cli

    def mark(module, name: str, label: str) -> None:
        f = getattr(module, name)

        def wrapped(*a, **k):
            phase[0] = label
            try:
                return f(*a, **k)
            finally:
                phase[0] = f"after {label}"
        setattr(module, name, wrapped)

    mark(models, "load_causal_lm", "load model")
    mark(layerwise, "compress_layerwise", "calibrate + quantize")
    mark(compress, "compress_checkpoint", "write folder")
    phase[0] = "cli"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rc = cli(["compress", args.model, f"{tmp}/out", *flags, "--threads", "1"])
    wall = time.perf_counter() - t0
    time.sleep(0.1)
    for name, peak in peaks.items():
        print(f"{name:32} peak RSS {peak:8.0f} MiB")
    print(f"overall peak {max(peaks.values()):.0f} MiB, {wall:.0f} s, rc {rc}")
    out = args.out or RESULTS / f"layerwise_memory-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "claim": "a calibrated compression holds the model once, in its own dtype", "model": args.model,
        "flags": flags, "peak_rss_mib_by_phase": peaks, "peak_rss_mib": max(peaks.values()), "wall_s": wall,
        "rc": rc, "torch": torch.__version__, "threads": 1, "load_avg": os.getloadavg()}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
