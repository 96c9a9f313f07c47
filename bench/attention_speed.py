"""How much faster is calibration's causal attention by ``unweight.cpu_attention`` than torch's SDPA?

Claim (issue 7, via ``unweight/cpu_attention.py``): on a CPU with AVX512-BF16, one thread, a bf16 decoder
block's causal attention over a calibration batch (8 windows of 512 tokens) runs several times faster by
the bf16 tiles, which visit only the keys each query sees, than by torch's CPU flash attention, which
computes the whole square at this length; and it is as accurate. The queries, keys and values are the
real ones: each model's forward over 8 calibration windows is recorded at every layer's attention call.
In one process, alternating per round: transformers' SDPA call (``sdpa_attention_forward``, as the model
runs it) and :func:`unweight.cpu_attention.causal_attention`, on the same layers. Errors are against
float64 attention of the same bf16 inputs, relative to the largest output.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attention_speed.py [--models smollm2-135m,gemma3-270m]

Prints the best round's milliseconds per layer call and the speed-ups; writes JSON (``--out``, default
``bench/results/attention_speed.json``). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unweight import cpu_attention
from unweight.calibrate import calibration_windows
from unweight.models import hf_folder, load_causal_lm


def record(model, ids, layers: int) -> list[tuple]:
    """(module, query, key, value, scaling) of the first ``layers`` attention calls of a forward on ``ids``."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    seen = []

    def recording(module, query, key, value, attention_mask, scaling=None, **kw):
        if len(seen) < layers and attention_mask is None:
            seen.append((module, query.clone(), key.clone(), value.clone(), scaling))
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kw)

    AttentionInterface.register("bench_record", recording)
    AttentionMaskInterface.register("bench_record", sdpa_mask)
    model.set_attn_implementation("bench_record")
    with torch.no_grad():
        model(input_ids=ids)
    model.set_attn_implementation("sdpa")
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--windows", type=int, default=8, help="calibration windows per call (the driver's batch)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4, help="attention calls recorded per model (the first ones)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not cpu_attention.available():
        print("this CPU has no AVX512-BF16: calibration attends by SDPA here")
        return 1
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()},
               "windows": args.windows, "seq_len": args.seq_len, "models": {}}
    for name in args.models.split(","):
        model, tok = load_causal_lm(str(hf_folder(name)), dtype=torch.bfloat16)
        calls = record(model, calibration_windows(tok, args.windows, args.seq_len, seed=0), args.layers)
        q0, k0 = calls[0][1], calls[0][2]
        best = {"sdpa": float("inf"), "unweight": float("inf")}
        for _ in range(args.rounds):
            for side in best:
                t0 = time.perf_counter()
                for module, q, k, v, scale in calls:
                    if side == "sdpa":
                        sdpa_attention_forward(module, q, k, v, None, scaling=scale)
                    else:
                        cpu_attention.causal_attention(q, k, v, scale)
                best[side] = min(best[side], (time.perf_counter() - t0) / len(calls) * 1e3)
        errors = {"sdpa": [], "unweight": []}
        for module, q, k, v, scale in calls:
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                 enable_gqa=True, scale=scale).transpose(1, 2)
            outs = {"sdpa": sdpa_attention_forward(module, q, k, v, None, scaling=scale)[0],
                    "unweight": cpu_attention.causal_attention(q, k, v, scale)}
            for side, out in outs.items():
                err = (out.double() - ref).abs()
                errors[side].append((err.max().item() / ref.abs().max().item(),
                                     err.mean().item() / ref.abs().mean().item()))
        row = {"query": list(q0.shape), "key": list(k0.shape), "layers": len(calls),
               "ms_per_call": best, "speedup": best["sdpa"] / best["unweight"],
               "error_max_rel": {s: max(e[0] for e in v) for s, v in errors.items()},
               "error_mean_rel": {s: max(e[1] for e in v) for s, v in errors.items()}}
        results["models"][name] = row
        err_max, err_mean = row["error_max_rel"], row["error_mean_rel"]
        print(f"{name}: q {tuple(q0.shape)} k {tuple(k0.shape)}: SDPA {best['sdpa']:.1f} ms, unweight "
              f"{best['unweight']:.1f} ms per call ({row['speedup']:.2f}x); error max {err_max['sdpa']:.2e} / "
              f"{err_max['unweight']:.2e}, mean {err_mean['sdpa']:.2e} / {err_mean['unweight']:.2e} (SDPA / unweight)",
              flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
