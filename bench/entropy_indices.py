"""Bit-packed versus rANS-coded K-means indices and RTN levels (``compress --entropy``), measured.

Claim tested (issue 4, item 3): entropy-coding the per-weight values of ``unweight-codebook`` with the
lossless rANS coder (``unweight.lossless.symbols``: one order-0 table per matrix, 256K-symbol chunks
with offsets and XXH64) stores the same weights in fewer bits than ``ceil(log2 K)``-bit packing.

For each setting, ``unweight compress MODEL OUT ... --threads 1`` runs twice, without and with
``--entropy``, one process at a time. Bits per weight are the CLI's: every stored part of the encoded
matrices (header, codebook or scales and zeros, outliers, and the packed indices or every part of the
symbol stream: header, code, offsets, modes, checksums, table) over their weights. Wall time is the
whole command (model conversion is cached). Both folders are then decoded and compared bit for bit.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python bench/entropy_indices.py [--model smollm2-135m]

Prints the table and writes ``bench/results/entropy-indices-<model>.json``. Run it alone: other
processes on the machine change the wall times (the load average is recorded).
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

SETTINGS = {
    "kmeans8": ["--method", "kmeans", "--k", "8", "--outliers", "auto"],
    "kmeans16": ["--method", "kmeans", "--k", "16", "--outliers", "auto"],
    "kmeans64": ["--method", "kmeans", "--k", "64", "--outliers", "auto"],
    "rtn4g128": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
}
UNWEIGHT = Path(sys.executable).with_name("unweight")


def compress(model: str, out: Path, argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    res = subprocess.run([str(UNWEIGHT), "compress", model, str(out), *argv, "--threads", "1", "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    args = ap.parse_args()
    from unweight.formats import decode_tensors, same_bits

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings.split(","):
            row = {"setting": name, "argv": SETTINGS[name]}
            for tag, extra in (("packed", []), ("entropy", ["--entropy"])):
                summary, wall = compress(args.model, Path(tmp) / f"{name}-{tag}", SETTINGS[name] + extra)
                row[tag] = {"bits_per_weight": summary["bits_per_weight"], "stored_bytes": summary["stored_bytes"],
                            "wall_s": wall}
            a, b = (decode_tensors(Path(tmp) / f"{name}-{tag}") for tag in ("packed", "entropy"))
            row["identical_weights"] = a.keys() == b.keys() and all(same_bits(a[n], b[n]) for n in a)
            rows.append(row)
            for tag in ("packed", "entropy"):
                subprocess.run(["rm", "-rf", str(Path(tmp) / f"{name}-{tag}")], check=True)
    print(f"{'setting':<10} {'packed bpw':>10} {'entropy bpw':>11} {'saved':>7} {'packed s':>9} {'entropy s':>9}  same")
    for r in rows:
        p, e = r["packed"], r["entropy"]
        print(f"{r['setting']:<10} {p['bits_per_weight']:>10.3f} {e['bits_per_weight']:>11.3f} "
              f"{1 - e['bits_per_weight'] / p['bits_per_weight']:>7.1%} {p['wall_s']:>9.1f} {e['wall_s']:>9.1f}  "
              f"{r['identical_weights']}")
    out = Path(__file__).with_name("results") / f"entropy-indices-{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "threads": 1, "loadavg": os.getloadavg(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
