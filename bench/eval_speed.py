"""Does the pinned evaluation cost anything over a plain transformers loop? (issue 2)

Claim: ``unweight.eval.evaluate()`` scores at >= 0.95x the tokens/s of the plainest loop one could write
over the same windows, in the same process, on the same machine:

    for w in windows:
        logits = model(input_ids=w[None]).logits
        nll -= log_softmax(logits[0, :-1]).gather(1, w[1:, None]).sum()

Both run in float32 on the GGUF-loaded model (smollm2-135m by default) over the protocol's first
``--windows`` windows of ``--seq-len`` tokens of the Austen evaluation split. They alternate
(ours, plain), (plain, ours), ... for ``--rounds`` rounds so that drift in the machine's load hits both;
the ratio is taken per round (each pair ran back to back) and summarised by the median; the ratio of
the two best times (the runs least disturbed by other processes) is reported beside it. Both are timed
wall-clock around the whole call: ``evaluate()`` includes its bits-per-byte byte count and bookkeeping.
tokens/s counts the tokens fed to the model (windows x seq-len), as ``evaluate()`` reports it. Both must
give the same mean NLL (a check that they computed the same thing).

    .venv/bin/python bench/eval_speed.py [--model smollm2-135m] [--seq-len 1024] [--windows 8] [--rounds 3]

Prints a table and writes JSON (``--out``, default ``bench/results/eval_speed.json``). Run it alone:
other processes on 2 cores distort the times (the 1-minute load average is recorded before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from unweight.data import corpus
from unweight.eval import evaluate, token_windows
from unweight.models import load_causal_lm
from unweight.report.table import Column, format_table

TARGET_RATIO = 0.95
NLL_RTOL = 1e-6


@torch.no_grad()
def plain_loop(model, windows: torch.Tensor) -> float:
    """Mean token NLL over ``windows``, the plainest way transformers allows."""
    nll, tokens = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        nll -= logp.gather(1, w[1:, None]).sum().item()
        tokens += w.numel() - 1
    return nll / tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_speed.json"))
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    model, tok = load_causal_lm(args.model)
    windows = token_windows(tok, corpus("austen", "eval"), args.seq_len, args.windows * args.seq_len)
    fed = windows.numel()
    print(f"{args.model}: {len(windows)} windows of {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"load average {load_before:.2f}", file=sys.stderr)
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection, for both alike
        model(input_ids=windows[:1, : args.seq_len])

    rows, ours_nll, plain_nll = [], None, None
    for r in range(args.rounds):
        times, order = {}, ("unweight", "plain") if r % 2 == 0 else ("plain", "unweight")
        for which in order:
            t0 = time.perf_counter()
            if which == "unweight":
                result = evaluate(model, windows, tok, progress=False)
                ours_nll, ours_forward_tps = result.nll, result.tokens_per_s
            else:
                plain_nll = plain_loop(model, windows)
            times[which] = time.perf_counter() - t0
        row = {"round": r + 1, "order": " then ".join(order),
               "unweight_s": times["unweight"], "plain_s": times["plain"],
               "unweight_tok_s": fed / times["unweight"], "plain_tok_s": fed / times["plain"],
               "ratio": times["plain"] / times["unweight"],
               "unweight_forward_tok_s": ours_forward_tps}
        rows.append(row)
        print(f"round {r + 1}: ratio {row['ratio']:.3f}", file=sys.stderr)

    same_nll = abs(ours_nll - plain_nll) <= NLL_RTOL * abs(plain_nll)
    ratio = statistics.median(row["ratio"] for row in rows)
    best = min(row["plain_s"] for row in rows) / min(row["unweight_s"] for row in rows)
    load_after = os.getloadavg()[0]
    summary = {
        "model": args.model, "seq_len": args.seq_len, "windows": len(windows), "tokens_fed": fed,
        "rounds": args.rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average_before": load_before, "load_average_after": load_after,
        "unweight_tok_s_median": statistics.median(row["unweight_tok_s"] for row in rows),
        "plain_tok_s_median": statistics.median(row["plain_tok_s"] for row in rows),
        "ratio_median": ratio, "ratio_min": min(row["ratio"] for row in rows),
        "ratio_best_times": best,
        "target_ratio": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
        "nll_unweight": ours_nll, "nll_plain": plain_nll, "same_nll": same_nll,
        "rounds_detail": rows,
    }
    columns = [Column("round"), Column("order"), Column("unweight_s", "unweight s", ".1f"),
               Column("plain_s", "plain s", ".1f"), Column("unweight_tok_s", "unweight tok/s", ".1f"),
               Column("plain_tok_s", "plain tok/s", ".1f"), Column("ratio", "ratio", ".3f")]
    print(format_table(rows, columns, title=f"evaluate() vs a plain transformers loop: {args.model}, "
                       f"{len(windows)} x {args.seq_len} tokens, same process"))
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"median ratio {ratio:.3f}, ratio of best times {best:.3f} (target >= {TARGET_RATIO}: {verdict}); "
          f"mean NLL {ours_nll:.6f} vs {plain_nll:.6f} ({'same' if same_nll else 'DIFFERENT'}); "
          f"load average {load_before:.2f} before, {load_after:.2f} after")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 0 if same_nll else 1


if __name__ == "__main__":
    sys.exit(main())
