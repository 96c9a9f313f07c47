"""Run the rank-perturbation study on a model: do only the relative ranks of clustered weights matter?

  unweight study rank smollm2-135m --k 16 --out out/rank
  unweight study rank smollm2-135m --out out/rank-quick --quick
  unweight study rank smollm2-135m --out out/rank --seeds 3 --seq-len 512 --max-tokens 1024 --blocks 0:30

The defaults (2 seeds, one window of 256 tokens, every other block scanned, every block replaced
progressively) run the full study on smollm2-135m in ~33 minutes on one core of a busy 2-core machine.

Every Linear matrix of the decoder blocks is clustered once (per-matrix K-means, assignments fixed).
Per-layer scans replace one matrix at a time by its clustered version with scrambled, moment-matched
scrambled, rank-preserving redrawn or unchanged (control) centroids; progressive replacement clusters
blocks 0..L cumulatively (and in reverse) with and without the affine correction w' = a w + b. The
model is loaded once and weights are swapped in place. DIR receives study.json (every measurement),
perplexity_by_layer.png, progressive.png, drift.png and summary.md (each claim of arXiv 2603.17917's
abstract: does it hold on this model, with the numbers). --quick: two blocks, one seed, one window of
128 tokens, two progressive steps, for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from unweight.commands import add_threads
from unweight.data import CORPORA
from unweight.errors import UnweightError

HELP = "rank-perturbation study of clustered weights (arXiv 2603.17917)"
NOTE = ("The bundled decoders are 4-bit GGUF models converted to bf16: every figure here is 4-bit-derived "
        "(a Q4 matrix holds ~10k distinct values).")


def _blocks(spec: str | None) -> list[int] | None:
    """'0,5,29', '0:30:3' (a Python range), 'none' (no scans) or None (every block)."""
    if spec is None:
        return None
    if spec.strip().lower() == "none":
        return []
    try:
        if ":" in spec:
            return list(range(*[int(p) for p in spec.split(":")]))
        return [int(p) for p in spec.split(",") if p.strip()]
    except (TypeError, ValueError):
        raise UnweightError(f"--blocks {spec!r}: expected a list like 0,5,29 or a range like 0:30:3") from None


def add_arguments(p):
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    r = sub.add_parser("rank", help="scrambled vs rank-preserving centroids, progressive replacement, drift",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("model", help="bundled model name or HF folder (a bundled name uses its cached bf16 folder)")
    r.add_argument("--out", required=True, help="output folder (created)")
    r.add_argument("--k", type=int, default=16, help="centroids per matrix (default: 16)")
    r.add_argument("--quick", action="store_true", help="a couple of blocks, 1 seed, 1 short window (for tests)")
    r.add_argument("--seeds", type=int, default=None, help="seeds per random perturbation (default: 2; quick: 1)")
    r.add_argument("--seq-len", type=int, default=None, help="window length in tokens (default: 256; quick: 128)")
    r.add_argument("--max-tokens", type=int, default=None,
                   help="evaluation slice: first windows up to this many tokens (default: 256; quick: 128)")
    r.add_argument("--blocks", default=None,
                   help="blocks to scan: 0,5,29, 0:30:3 or none (progressive only; default: every other block)")
    r.add_argument("--matrices", default=None,
                   help="matrices to scan, comma-separated names within a block, e.g. mlp.down_proj (default: all)")
    r.add_argument("--progressive-steps", type=int, default=None, help="blocks replaced each way (default: all)")
    r.add_argument("--keep-outliers", type=int, default=0,
                   help="top robust-z weights per matrix kept exact in every variant (default: 0, as the paper)")
    r.add_argument("--corpus", default="austen", choices=list(CORPORA),
                   help="evaluation corpus, split eval (default: austen)")
    add_threads(r)
    r.set_defaults(_study=run_rank)


def run(args) -> int:
    return args._study(args)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_rank(args) -> int:
    import torch

    from unweight.data import corpus
    from unweight.eval import token_windows
    from unweight.models import hf_folder, load_causal_lm
    from unweight.report.table import format_table
    from unweight.study.figures import write_figures
    from unweight.study.harness import Harness
    from unweight.study.rank import RankStudyConfig, run_rank_study
    from unweight.study.summary import claims, markdown

    if args.k < 2:
        raise UnweightError(f"--k must be at least 2, got {args.k}")
    overrides = {k: v for k, v in {
        "k": args.k, "seeds": args.seeds, "seq_len": args.seq_len, "max_tokens": args.max_tokens,
        "scan_blocks": _blocks(args.blocks), "progressive_steps": args.progressive_steps,
        "keep_outliers": args.keep_outliers,
        "matrices": [m.strip() for m in args.matrices.split(",")] if args.matrices else None,
    }.items() if v is not None}
    config = RankStudyConfig.quick(**overrides) if args.quick else RankStudyConfig(**overrides)
    if config.seeds < 1:
        raise UnweightError(f"--seeds must be at least 1, got {config.seeds}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    folder = hf_folder(args.model)
    model, tok = load_causal_lm(str(folder))
    windows = token_windows(tok, corpus(args.corpus, "eval"), config.seq_len, config.max_tokens)
    log(f"loaded {args.model} ({folder}); {len(windows)} window(s) of {config.seq_len} tokens")
    harness = Harness(model, windows)
    results = run_rank_study(harness, config, log=log)
    results.update(model=args.model, folder=str(folder), corpus=f"{args.corpus}/eval", note=NOTE,
                   threads=torch.get_num_threads(), wall_seconds=time.perf_counter() - start)
    results["claims"] = claims(results)
    _write_text(out / "study.json", json.dumps(results, indent=1))
    figures = write_figures(results, out)
    _write_text(out / "summary.md", markdown(results))
    print(format_table(results["claims"], ["claim", "holds"], title=f"rank study of {args.model}"))
    print(f"wrote {out / 'study.json'}, {', '.join(p.name for p in figures)}, summary.md "
          f"in {results['wall_seconds']:.0f} s")
    return 0
