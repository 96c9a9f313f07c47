"""How much faster is X^T X by BLAS's ``ssyrk`` than by torch's strips of ``addmm``?

Claim (issue 7, via ``unweight/gram.py``): GPTQ's and SparseGPT's proxy Hessian, the upper triangle of
``X^T X`` accumulated over a batch of 8 x 512 tokens, is computed faster by OpenBLAS's symmetric rank-k
update (numpy's bundled OpenBLAS) than by torch at one thread, the thread count every comparison with
llm-compressor runs at. Both paths get the same float32 copy of bf16 activations-like inputs (N(0, 1)
values cast to bf16 and back), at the widths of smollm2-135m and gemma3-270m's Linear inputs. The
baseline, ``add_gram_upper_reference``, runs in the same process, alternating with the BLAS path.

    OMP_NUM_THREADS=1 .venv/bin/python bench/gram_speed.py [--tokens 4096] [--widths 576,640,1024,1536,2048]

Prints best-of-``--reps`` milliseconds per call and the speed-up; writes JSON (``--out``, default
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

from unweight import gram


def best_ms(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


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
    rows = []
    print(f"{'width':>6} {'ssyrk ms':>9} {'torch ms':>9} {'speed-up':>9} {'max rel diff':>13}")
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(d)).bfloat16().float()
        a, b = torch.zeros(d, d), torch.zeros(d, d)
        t_blas = t_torch = float("inf")
        for _ in range(args.reps):  # alternating, so machine load hits both alike
            t_blas = min(t_blas, best_ms(lambda: gram.add_gram_upper(a.zero_(), x), 1))
            t_torch = min(t_torch, best_ms(lambda: gram.add_gram_upper_reference(b.zero_(), x), 1))
        diff = ((torch.triu(a) - torch.triu(b)).abs().max() / torch.triu(b).abs().max()).item()
        rows.append({"width": d, "ssyrk_ms": t_blas, "torch_ms": t_torch, "speedup": t_torch / t_blas,
                     "max_rel_diff": diff})
        print(f"{d:>6} {t_blas:>9.1f} {t_torch:>9.1f} {t_torch / t_blas:>8.2f}x {diff:>13.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "threads": 1, "reps": args.reps,
                                          "platform": platform.platform(), "torch": torch.__version__,
                                          "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
