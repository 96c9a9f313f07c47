"""How much faster is X^T X by BLAS's ``ssyrk``, and by AVX512-BF16 dot products, than by torch?

Claim (issue 7, via ``unweight/gram.py`` and ``unweight/dpbf16.py``): GPTQ's and SparseGPT's proxy
Hessian, the upper triangle of ``X^T X`` accumulated over a batch of 8 x 512 tokens, is computed faster
by OpenBLAS's symmetric rank-k update (numpy's bundled OpenBLAS) than by torch at one thread, the thread
count every comparison with llm-compressor runs at; and, for bf16 inputs on a CPU with AVX512-BF16,
faster again by ``vdpbf16ps`` (``dpbf16``), whose float32 sums are no less accurate. The inputs are
activations-like bf16 values (N(0, 1) times a per-column scale in [0, 4)), at the widths of
smollm2-135m's and gemma3-270m's Linear inputs. In one process, alternating: torch's strips
(``add_gram_upper_reference``) and ``ssyrk`` on a float32 copy made beforehand; ``ssyrk`` with the
float32 copy made in the call (what calibration did with bf16 inputs) and the bf16 kernel (its pair
copy included). Errors are against float64, relative to the largest entry.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gram_speed.py [--tokens 4096] [--widths 576,640,1024,1536,2048]

Prints the best of ``--reps`` calls' milliseconds and the speed-ups; writes JSON (``--out``, default
``bench/results/gram_speed.json``). Run it alone. At more than one torch thread ``add_gram_upper``
takes the torch path itself (see the module), so the comparison is made at one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from unweight import dpbf16, gram


def ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="rows of X per call (a batch of 8 x 512)")
    ap.add_argument("--widths", default="576,640,1024,1536,2048", help="columns of X (Linear input widths)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gram_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if gram._openblas() is None:
        print("this numpy bundles no OpenBLAS: add_gram_upper is the torch path here")
        return 1
    bf16 = dpbf16.available()
    rows = []
    print(f"{'width':>6} {'torch ms':>9} {'ssyrk ms':>9} {'x':>6} {'+copy ms':>9} {'bf16 ms':>8} {'x':>6}"
          f" {'err ssyrk':>10} {'err bf16':>9}")
    for d in (int(w) for w in args.widths.split(",")):
        g = torch.Generator().manual_seed(d)
        xb = (torch.randn(args.tokens, d, generator=g) * torch.rand(d, generator=g) * 4).bfloat16()
        x = xb.float()
        ref = torch.triu(xb.double().T @ xb.double())
        a, b, c, e = (torch.zeros(d, d) for _ in range(4))
        t = dict.fromkeys(("torch", "ssyrk", "ssyrk_copy", "bf16"), float("inf"))
        for _ in range(args.reps):  # alternating, so machine load hits all alike
            t["torch"] = min(t["torch"], ms(lambda: gram.add_gram_upper_reference(b.zero_(), x)))
            t["ssyrk"] = min(t["ssyrk"], ms(lambda: gram.add_gram_upper(a.zero_(), x)))
            t["ssyrk_copy"] = min(t["ssyrk_copy"], ms(lambda: gram.add_gram_upper(c.zero_(), xb.float())))
            if bf16 and dpbf16.rows_for(d):
                t["bf16"] = min(t["bf16"], ms(lambda: dpbf16.add_gram_upper_bf16(e.zero_(), xb)))
        ran_bf16 = t["bf16"] < float("inf")
        err = {k: ((torch.triu(m).double() - ref).abs().max() / ref.abs().max()).item() if ran else float("nan")
               for k, m, ran in (("ssyrk", a, True), ("bf16", e, ran_bf16))}
        row = {"width": d, **{f"{k}_ms": v for k, v in t.items()}, "ssyrk_speedup": t["torch"] / t["ssyrk"],
               "bf16_speedup_over_ssyrk_with_copy": t["ssyrk_copy"] / t["bf16"],
               "max_rel_err_ssyrk": err["ssyrk"], "max_rel_err_bf16": err["bf16"] if ran_bf16 else None}
        rows.append(row)
        print(f"{d:>6} {t['torch']:>9.1f} {t['ssyrk']:>9.1f} {row['ssyrk_speedup']:>5.2f}x {t['ssyrk_copy']:>9.1f}"
              f" {t['bf16']:>8.1f} {row['bf16_speedup_over_ssyrk_with_copy']:>5.2f}x {err['ssyrk']:>10.2e}"
              f" {err['bf16']:>9.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "threads": 1, "reps": args.reps, "avx512bf16": bf16,
                                          "platform": platform.platform(), "torch": torch.__version__,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
