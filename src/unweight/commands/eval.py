"""Evaluate a model under the pinned protocol: perplexity, bits per byte, and (with --base) KL divergence
from a base model and top-1 agreement, on the same non-overlapping windows.

  unweight eval smollm2-135m --max-tokens 4096
  unweight eval out/compressed --base smollm2-135m --corpus austen --split eval --json

Deterministic: the same command prints the same numbers.
"""

import json

from unweight.commands import add_threads
from unweight.data import CORPORA, corpus
from unweight.eval import DEFAULT_SEQ_LEN, evaluate, token_windows
from unweight.models import load_causal_lm

HELP = "perplexity, bits/byte, KL and top-1 agreement vs a base model"


def add_arguments(p):
    p.add_argument("model", help="bundled model name or path (HF folder, compressed folder, .gguf)")
    p.add_argument("--corpus", default="austen", choices=list(CORPORA), help="text (default: austen)")
    p.add_argument("--split", default="eval", help="corpus split (default: eval)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help="window length in tokens (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first windows up to this many tokens")
    p.add_argument("--base", default=None, help="base model for KL divergence and top-1 agreement")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    model, tok = load_causal_lm(args.model)
    base = load_causal_lm(args.base)[0] if args.base else None
    windows = token_windows(tok, corpus(args.corpus, args.split), args.seq_len, args.max_tokens)
    r = evaluate(model, windows, tok, base=base)
    d = {"model": args.model, "corpus": args.corpus, "split": args.split, **r.to_dict()}
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{args.model} on {args.corpus}/{args.split}: perplexity {r.perplexity:.4f}, "
          f"{r.bits_per_byte:.4f} bits/byte over {r.tokens:,} tokens ({r.windows} windows of {r.seq_len})")
    if base is not None:
        print(f"  vs {args.base}: KL {r.kl:.6f} nats/token, top-1 agreement {r.top1_agreement:.4%}")
    print(f"  {r.tokens_per_s:.0f} tokens/s, {r.seconds:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB")
    return 0
