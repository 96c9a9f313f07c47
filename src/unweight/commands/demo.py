"""The main job on the bundled real model: convert it, then compress it every way unweight knows and
measure each result side by side (size in bits per weight, quality on held-out text, time).

  unweight demo                      # smollm2-135m, 4,096 evaluation tokens
  unweight demo --max-tokens 16384 --out out/demo

Quality is measured under the pinned protocol (Austen evaluation split, windows of --seq-len tokens)
against the GGUF model as transformers loads it. The table is also written as JSON to OUT/demo.json.
"""

import json
import time
from pathlib import Path

from unweight.data import corpus
from unweight.eval import evaluate, token_windows
from unweight.models import hf_folder, load_causal_lm
from unweight.report.table import format_table

HELP = "run the main job on the bundled model and print the comparison table"


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m", help="bundled model or path (default: smollm2-135m)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--seq-len", type=int, default=1024, help="window length (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (default: 4096)")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_causal_lm(args.model)
    windows = token_windows(tok, corpus("austen", "eval"), args.seq_len, args.max_tokens)
    rows = []

    def measure(label: str, path, bits: float, seconds: float, model=None):
        model = model if model is not None else load_causal_lm(str(path))[0]
        r = evaluate(model, windows, tok, base=None if model is base else base, desc=label)
        rows.append({"method": label, "bits/weight": round(bits, 3), "perplexity": round(r.perplexity, 4),
                     "bits/byte": round(r.bits_per_byte, 4),
                     "KL": None if r.kl is None else round(r.kl, 6),
                     "top-1": None if r.top1_agreement is None else round(r.top1_agreement, 4),
                     "tokens": r.tokens, "seconds": round(seconds, 1)})

    measure("base (GGUF, fp32 compute)", None, float("nan"), 0.0, model=base)
    t = time.perf_counter()
    bf16 = hf_folder(args.model, "bf16")
    measure("convert -> bf16", bf16, 16.0, time.perf_counter() - t)

    print(format_table(rows, title=f"unweight demo: {args.model}, {windows.numel():,} tokens of Austen (evaluation split)"))
    (out / "demo.json").write_text(json.dumps({"model": args.model, "seq_len": args.seq_len,
                                               "rows": rows}, indent=2))
    print(f"wrote {out / 'demo.json'}")
    return 0
