"""unweight against llm-compressor on a GPU: the same methods, windows and model, both in one process.

Claim (issue 7): unweight's GPTQ, SparseGPT and Wanda reach llm-compressor's perplexity (within 1%) in
<= 0.5x its wall time. ``llmcompressor_side.py`` measures that on this project's CPUs, with each side in
its own virtualenv. On a machine with a CUDA GPU both import into one Python, so this script times them
alternately, method by method, in one process:

- llm-compressor 0.14: ``oneshot`` on the model held on the CPU in bf16, which its sequential pipeline
  onloads block by block to the GPU (its default ``get_main_device()``), the recipes of
  ``llmcompressor_side._recipe`` (GPTQ 4-bit, block [1, 128]; SparseGPT 50% and 2:4; Wanda 50%), batch 8;
- unweight: ``compress_layerwise(..., device="cuda")`` on the same bf16 model held on the CPU (each block
  moved to the GPU while it runs, like llm-compressor's onloading), block by block (llm-compressor's
  mode) and, with ``--true-sequential``, in one forward per block; GPTQ is ``gptq4-static``
  (llm-compressor's observer grid, see ``llmcompressor_side.STATIC_GROUPS``); the 32 windows in one
  batch (``calibrate.calibration_batch``'s default on a GPU; the H200 runs of 2026-11-27 used batches
  of 8, true-sequential in lockstep threads);
- time: wall seconds of the call, the model already loaded, after ``torch.cuda.synchronize()``; each
  side first runs every method once untimed on 4 x 128 tokens (CUDA context, Triton's compilations);
- quality: perplexity of each result's weights copied into a float32 model on the GPU, on the
  evaluation windows given (``--eval``, written by ``--write-inputs`` on a machine with the corpora).

    # here: the inputs (calibration and evaluation token ids of smollm2-135m)
    .venv/bin/python bench/llmcompressor_gpu.py --write-inputs .gpu/inputs.safetensors
    # on the GPU machine (llm-compressor's wheels installed beside torch):
    python3 bench/llmcompressor_gpu.py --model GGUF_OR_FOLDER --inputs .gpu/inputs.safetensors --out R.json

``--smoke`` replaces the model's weights by a random two-block copy of its architecture (a check of the
script, not a result). Results are written after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from llmcompressor_side import CALIB_BATCH, EVAL_SEQ_LEN, EVAL_TOKENS, N_SAMPLES, PAIRS, SEQ_LEN, _recipe  # noqa: E402
from prune_quant import SETTINGS  # noqa: E402

UNWEIGHT_NAME = PAIRS | {"gptq4": "gptq4-static"}  # llm-compressor's method -> unweight's setting


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_inputs(path: Path, model_name: str, seed: int) -> None:
    from unweight.calibrate import calibration_windows
    from unweight.data import corpus
    from unweight.eval.perplexity import token_windows
    from unweight.models import load_causal_lm

    tok = load_causal_lm(model_name)[1]
    ev = token_windows(tok, corpus("austen", "eval"), EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS[model_name])
    calib = calibration_windows(tok, N_SAMPLES, SEQ_LEN, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"calib": calib.to(torch.int64).contiguous(), "eval": ev.to(torch.int64).contiguous()}, str(path),
              metadata={"model": model_name, "calib": f"calibration_windows(tok, {N_SAMPLES}, {SEQ_LEN}, seed={seed})",
                        "eval": f"token_windows(tok, corpus('austen', 'eval'), {EVAL_SEQ_LEN}, "
                                f"max_tokens={EVAL_TOKENS[model_name]})"})
    print(f"wrote {path}: calib {tuple(calib.shape)}, eval {tuple(ev.shape)}")


def smoke_folder(folder: Path, out: Path) -> Path:
    """A random two-block model of ``folder``'s architecture, with its tokenizer, in ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unweight.convert import copy_side_files

    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(folder, out)  # tokenizer files; the config is the two-block one saved next
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    return out


def run_llmcompressor(folder: Path, method: str, calib: torch.Tensor) -> tuple[float, dict]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    keys = set(load_file(str(folder / "model.safetensors")))
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    modifier, _ = _recipe(method, "block")
    _sync()
    start = time.perf_counter()
    oneshot(model=model, tokenizer=str(folder), dataset=ds, recipe=[modifier], num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=CALIB_BATCH)
    _sync()
    seconds = time.perf_counter() - start
    state = model.state_dict()
    return seconds, {k: state[k].detach().to("cpu", torch.float32) for k in keys}


def run_unweight(folder: Path, name: str, calib: torch.Tensor, true_sequential: bool,
                 device: str) -> tuple[float, dict]:
    from unweight.layerwise import LayerwiseConfig, compress_layerwise
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(folder), dtype=torch.bfloat16)
    method, settings = SETTINGS[name]
    config = LayerwiseConfig.from_method(method, n_samples=len(calib), seq_len=calib.shape[1],
                                         true_sequential=true_sequential, compute_dtype="bfloat16", **settings)
    _sync()
    start = time.perf_counter()
    compress_layerwise(model, tok, config, windows=calib, device=device, progress=False)
    _sync()
    seconds = time.perf_counter() - start
    return seconds, {k: v.to(torch.float32) for k, v in model.state_dict().items()}


def checks(state: dict, method: str) -> dict:
    """Zeros per decoder Linear weight, and for GPTQ the most distinct values in a 128-wide row group."""
    linear = [k for k in state if ".layers." in k and k.endswith("proj.weight")]
    zeros = sum((state[k] == 0).sum().item() for k in linear) / sum(state[k].numel() for k in linear)
    out = {"zeros": zeros}
    if method == "gptq4":
        w = state[linear[0]][:, :128]
        out["max_distinct_per_group_first_linear"] = max(len(torch.unique(r)) for r in w)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-inputs", default="", help="write the calibration and evaluation ids here, and stop")
    ap.add_argument("--model-name", default="smollm2-135m", help="the bundled model (--write-inputs)")
    ap.add_argument("--seed", type=int, default=0, help="calibration windows' seed (--write-inputs)")
    ap.add_argument("--model", default="", help="a GGUF file or HF folder (converted to a bf16 folder)")
    ap.add_argument("--inputs", default=".gpu/inputs.safetensors")
    ap.add_argument("--methods", default=",".join(PAIRS), help=f"llm-compressor's names: {', '.join(PAIRS)}")
    ap.add_argument("--true-sequential", action="store_true", help="also time unweight true-sequential")
    ap.add_argument("--smoke", action="store_true", help="random two-block model, 4 x 128 tokens: a check")
    ap.add_argument("--device", default="cuda", help="where unweight runs its blocks and the scores are taken "
                    "(cpu: a check of the script; llm-compressor picks its own device)")
    ap.add_argument("--out", default="bench/results/llmcompressor_gpu.json")
    args = ap.parse_args()
    if args.write_inputs:
        write_inputs(Path(args.write_inputs), args.model_name, args.seed)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark compares the two on a GPU (llmcompressor_side.py: on the CPU)")
    from importlib.metadata import version

    from unweight.eval.perplexity import evaluate
    from unweight.models import hf_folder, load_causal_lm

    folder = hf_folder(args.model)
    inputs = load_file(args.inputs)
    calib, ev = inputs["calib"], inputs["eval"]
    if args.smoke:
        folder = smoke_folder(folder, Path("/tmp/unweight-gpu-smoke"))
        calib, ev = calib[:4, :128], ev[:1]
    scorer, tok = load_causal_lm(str(folder))
    scorer.to(args.device)

    def score(state: dict) -> float:
        scorer.load_state_dict(state, strict=False)
        return evaluate(scorer, ev, tok, progress=False).perplexity

    out = Path(args.out)
    result = {"claim": "issue 7 on a GPU: unweight / llm-compressor perplexity within 1% in <= 0.5x the time",
              "model": str(folder), "smoke": args.smoke, "calibration": list(calib.shape), "eval": list(ev.shape),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
              "platform": platform.platform(), "cpus": os.cpu_count(),
              "versions": {p: version(p) for p in ("torch", "transformers", "llmcompressor", "compressed-tensors")},
              "base_perplexity": evaluate(scorer, ev, tok, progress=False).perplexity, "rows": []}
    modes = [False] + ([True] if args.true_sequential else [])  # unweight's: true-sequential or not
    methods = args.methods.split(",")
    warm = calib[:4, :128]  # CUDA context, kernels compiled (Triton's on both sides), tracing
    for method in methods:
        run_llmcompressor(folder, method, warm)
        for ts in modes:
            run_unweight(folder, UNWEIGHT_NAME[method], warm, ts, args.device)
    for method in methods:
        row = {"method": method, "unweight_method": UNWEIGHT_NAME[method]}
        seconds, state = run_llmcompressor(folder, method, calib)
        row["llmcompressor"] = {"seconds": seconds, "perplexity": score(state), **checks(state, method)}
        for ts in modes:
            seconds, state = run_unweight(folder, UNWEIGHT_NAME[method], calib, ts, args.device)
            key = "unweight_true_sequential" if ts else "unweight"
            row[key] = {"seconds": seconds, "perplexity": score(state), **checks(state, method)}
            row[key] |= {"ppl_ratio": row[key]["perplexity"] / row["llmcompressor"]["perplexity"],
                         "time_ratio": seconds / row["llmcompressor"]["seconds"]}
        result["rows"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(json.dumps(row), flush=True)
    print(f"base ppl {result['base_perplexity']:.3f}; ratios unweight / llm-compressor on {result['device']}")
    for row in result["rows"]:
        lc = row["llmcompressor"]
        for key in ("unweight", "unweight_true_sequential"):
            if key in row:
                u = row[key]
                print(f"{row['method']:12s} {key:25s} ppl {u['perplexity']:8.3f} vs {lc['perplexity']:8.3f} "
                      f"({u['ppl_ratio']:.4f})  {u['seconds']:6.1f} s vs {lc['seconds']:6.1f} s "
                      f"({u['time_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
