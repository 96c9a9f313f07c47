"""How much does float rounding alone move a calibrated method's perplexity?

Claim checked (issue 7): "within 1% of llm-compressor's perplexity" is only meaningful if the method
itself is stable to that level. Run the same method and settings with different code paths that
compute the same thing in float32 and compare:

    .venv/bin/python bench/numerics_sensitivity.py new "('gptq', {'bits': 4, 'group_size': 128})"
    .venv/bin/python bench/numerics_sensitivity.py ref "('sparsegpt', {'pattern': '2:4'})"
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/numerics_sensitivity.py old "..."  # a worktree of older code

``ref`` forces the torch reference column sweep instead of the compiled one (``unweight.quant.sweep``);
``old``/``new`` only label the run. Setup as ``bench/prune_quant.py`` on smollm2-135m: 32 x 512
calibration tokens (``--n-samples``), the first 8,192 evaluation tokens in windows of 1,024, one thread.
Results of this session: ``docs/results/numerics-smollm2-135m.json``.
"""

import argparse
import ast

import torch

from unweight.calibrate import calibration_windows
from unweight.data import corpus
from unweight.eval.perplexity import evaluate, token_windows
from unweight.layerwise import LayerwiseConfig, compress_layerwise
from unweight.models import hf_folder, load_causal_lm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["old", "new", "ref"])
    ap.add_argument("config", help="a Python literal: (method, settings), e.g. \"('gptq', {'bits': 4})\"")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.mode == "ref":
        import unweight.quant.sweep as sweep
        sweep.COMPILED = False  # every sweep takes the torch reference loop
    method, settings = ast.literal_eval(args.config)
    model, tok = load_causal_lm(str(hf_folder(args.model)))
    calib = calibration_windows(tok, args.n_samples, 512, seed=0)
    ev = token_windows(tok, corpus("austen", "eval"), 1024, max_tokens=8192)
    config = LayerwiseConfig.from_method(method, n_samples=args.n_samples, seq_len=512, **settings)
    compress_layerwise(model, tok, config, windows=calib, progress=False)
    print(args.mode, method, settings, f"ppl {evaluate(model, ev, tok, progress=False).perplexity:.3f}", flush=True)


if __name__ == "__main__":
    main()
