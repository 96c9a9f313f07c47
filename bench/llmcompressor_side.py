"""unweight's GPTQ, SparseGPT and Wanda against llm-compressor's, same data, same windows, same machine.

Claim (issue 7): on smollm2-135m, unweight's ``gptq4``, ``sparsegpt-50``, ``sparsegpt-2:4`` and
``wanda-50`` (``bench/prune_quant.py``) reach a perplexity within 1% of llm-compressor's
(vllm-project/llm-compressor, PyPI ``llmcompressor``) for the same method and setting, in at most
0.5x its wall time. The script measures it; it does not assume it.

Setup (pinned):

- model: ``hf_folder("smollm2-135m")`` (the bundled Q4_1 GGUF converted to bf16, ~/.cache/unweight/
  models/smollm2-135m-bf16; **4-bit-derived weights**), loaded in float32 on the CPU by both sides;
- calibration: the very token windows ``bench/prune_quant.py`` uses, ``calibration_windows(tok, 32,
  512, seed=0)`` with the GGUF's tokenizer (the folder's gives the same ids, checked; Sense and
  Sensibility, disjoint from evaluation), dumped by ``prepare`` to
  ``/tmp/lc/calib.safetensors`` (int64 ``input_ids`` ``[32, 512]``, no pickle) and handed to
  llm-compressor as a ``datasets.Dataset`` of ``input_ids`` + ``attention_mask`` (no shuffling, no
  padding, no truncation: 32 x 512 tokens exactly);
- llm-compressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu) lives in
  its own virtualenv, ``/work/lcvenv``, so the two transformers never meet; ``compress`` runs there,
  ``prepare`` and ``evaluate`` run in unweight's ``.venv`` (transformers 5.24.0, torch 2.13.0+cpu);
- llm-compressor settings (``oneshot``, sequential pipeline -- what its ``independent`` default picks
  for these modifiers --, calibration batch 8 windows as unweight's driver, every decoder Linear,
  ``lm_head`` ignored with ``re:.*lm_head``: it is tied to the embedding, and a plain ``"lm_head"``
  does not stop the sparsity modifiers, which name it ``"lm_head."`` and then prune the embedding;
  the output error of each Linear is propagated as in unweight: a block's Linears are all
  calibrated on one forward of the block as it was, then compressed, then the block's outputs are
  recomputed with the compressed weights for the next block):

  - ``gptq4``: ``GPTQModifier``, int4 asymmetric, ``actorder=None``, ``dampening_frac=0.01``,
    ``block_size=128``, ``memoryless_minmax`` observer; groups of 128 input columns per row.
    smollm2's 576-column inputs are not a multiple of 128, which llm-compressor's ``group`` strategy
    refuses (it checks at initialisation, for vLLM's kernels: ``--layout group`` records the error);
    ``bypass_divisibility_checks=True`` gets past the check and then fails in the first calibration
    forward on the CPU (``--layout group-bypass``: "unflatten: Provided sizes [-1, 128] don't
    multiply up to the size of dim 1 (576)"). Its ``block`` strategy with ``block_structure=[1,
    128]`` is the same grouping as unweight's (4 groups of 128 and a remainder group of 64 per
    576-column row, checked: at most 16 distinct values in every such group) and is what runs by
    default (``--layout block``; ``--layout group64`` runs group size 64). **Not the same algorithm
    in one respect**: llm-compressor 0.14 computes every group's scale and zero once from the
    *original* weights (its observer, before the GPTQ loop); unweight, as the GPTQ reference code,
    computes a group's parameters from the weights *as updated so far* when the group's first
    column comes up; ``evaluate --gptq gptq4-static`` compares with unweight's ``--static-groups``
    run instead (``prune_quant.py --methods gptq4-static``), which takes llm-compressor's grid;
  - ``sparsegpt50`` / ``sparsegpt24``: ``SparseGPTModifier`` (``llmcompressor.modifiers.pruning``),
    ``sparsity=0.5``, ``mask_structure="0:0"`` / ``"2:4"``, ``dampening_frac=0.01``,
    ``block_size=128``. Unstructured: llm-compressor prunes every weight at or under the 50%
    threshold of each 128-column block (all rows), one or more above half (0.50001 of the weights),
    unweight allocates per block so that each matrix ends at exactly 50%; 2:4 is the same rule in
    both (the same W and H give the same mask);
  - ``wanda50``: ``WandaPruningModifier``, ``sparsity=0.5``, per output row (both);

- output: the compressed model saved **dense** in float32 (the weights as llm-compressor leaves them
  in the model: fake-quantized values for GPTQ, zeros for pruning; the quantization parameters are
  dropped) to ``/tmp/lc/<method>/``, with ``/tmp/lc/<method>/lc_run.json`` (wall time, settings);
- time: wall seconds of the ``oneshot`` call (model already loaded: dataset wrapping, session setup,
  tracing, calibration, the method, propagation), one thread (``OMP_NUM_THREADS=1``,
  ``torch.set_num_threads(1)``); unweight's figure is prune_quant's (``compress_layerwise``, one
  thread) from a run of ``bench/prune_quant.py`` in the same session on the same machine;
- evaluation: exactly prune_quant's: ``token_windows(tok, corpus("austen", "eval"), 1024,
  max_tokens=8192)``, perplexity, KL(base || model) and top-1 agreement against
  ``load_causal_lm("smollm2-135m")`` (the GGUF), float32.

Run (each step alone on the machine; the load average is recorded)::

    .venv/bin/python bench/llmcompressor_side.py prepare
    /work/lcvenv/bin/pip freeze > /tmp/lc/lcvenv-freeze.txt   # recorded in the JSON
    for m in gptq4 sparsegpt50 sparsegpt24 wanda50; do
        OMP_NUM_THREADS=1 /work/lcvenv/bin/python bench/llmcompressor_side.py compress --method $m
    done
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_quant.py \\
        --methods gptq4,sparsegpt-50,sparsegpt-2:4,wanda-50 --threads 1 --out /tmp/lc/prune_quant.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/llmcompressor_side.py evaluate

``evaluate`` prints the table and writes ``bench/results/llmcompressor-smollm2-135m.json``.

Timing on a shared machine: ``time`` runs only unweight's ``compress_layerwise`` per method (no
evaluation), so the two sides can be timed alternately under the same background load, e.g.::

    for pair in "gptq4 gptq4" "sparsegpt-50 sparsegpt50" "sparsegpt-2:4 sparsegpt24" "wanda-50 wanda50"; do
        set -- $pair
        OMP_NUM_THREADS=1 .venv/bin/python bench/llmcompressor_side.py time --methods $1
        OMP_NUM_THREADS=1 /work/lcvenv/bin/python bench/llmcompressor_side.py compress --method $2
    done
    .venv/bin/python bench/llmcompressor_side.py evaluate --reuse-scores --unweight-times /tmp/lc/unweight-times.json

``--unweight-times`` takes unweight's seconds from those runs (the prune_quant run's are kept as
``seconds_prune_quant_run``); ``--reuse-scores`` keeps llm-compressor's perplexity and KL from the last
``evaluate`` (its output is deterministic: two runs gave the same perplexities to 5 digits) instead of
scoring the re-made folders again.

unweight's true-sequential mode (``--true-sequential``: each Linear calibrated on the outputs of its
block's already-compressed Linears, in one forward per block) is timed and scored the same way, into
its own files::

    OMP_NUM_THREADS=1 .venv/bin/python bench/llmcompressor_side.py time --methods $1 --true-sequential \
        --out /tmp/lc/unweight-times-ts.json      # alternating with llm-compressor, as above
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_quant.py --methods gptq4,sparsegpt-50,sparsegpt-2:4,wanda-50 \
        --threads 1 --true-sequential --out /tmp/lc/prune_quant_ts.json
    .venv/bin/python bench/llmcompressor_side.py evaluate --reuse-scores --unweight-json /tmp/lc/prune_quant_ts.json \
        --unweight-times /tmp/lc/unweight-times-ts.json --result bench/results/llmcompressor-ts-smollm2-135m.json

Another calibration draw (is a difference between the two sides, or between unweight's modes, more
than the draw of windows?): ``--work DIR --seed N`` before the subcommand puts the windows
(``calibration_windows(..., seed=N)``) and llm-compressor's folders in ``DIR``; unweight's side takes
``prune_quant.py --calib-seed N``::

    .venv/bin/python bench/llmcompressor_side.py --work /tmp/lc/s1 --seed 1 prepare
    OMP_NUM_THREADS=1 /work/lcvenv/bin/python bench/llmcompressor_side.py --work /tmp/lc/s1 compress --method wanda50
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_quant.py --methods wanda-50 --threads 1 --calib-seed 1 \
        --out /tmp/lc/s1/prune_quant.json
    .venv/bin/python bench/llmcompressor_side.py --work /tmp/lc/s1 --seed 1 evaluate --methods wanda50 \
        --unweight-json /tmp/lc/s1/prune_quant.json --result bench/results/llmcompressor-seed1-smollm2-135m.json

gemma3-270m (``--model-name gemma3-270m`` before the subcommand; 4,092 evaluation tokens, as
prune_quant's gemma3 runs): every Linear's input width there (640, 1,024, 2,048) is a multiple of 128,
so llm-compressor's own ``group`` strategy runs (``compress --method gptq4 --layout group``), and it is
compared with unweight's ``gptq4-static`` (both take the group grid from the original weights)::

    W="--model-name gemma3-270m --work /tmp/lc/gemma3"
    .venv/bin/python bench/llmcompressor_side.py $W prepare
    OMP_NUM_THREADS=1 /work/lcvenv/bin/python bench/llmcompressor_side.py $W compress --method gptq4 --layout group
    ...   # sparsegpt50, sparsegpt24, wanda50 as above
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_quant.py --model gemma3-270m --eval-tokens 4096 --threads 1 \
        --methods gptq4,gptq4-static,sparsegpt-50,sparsegpt-2:4,wanda-50 --out /tmp/lc/gemma3/prune_quant.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/llmcompressor_side.py $W evaluate --gptq gptq4-static \
        --methods gptq4-group,sparsegpt50,sparsegpt24,wanda50 --unweight-json /tmp/lc/gemma3/prune_quant.json

Both sides in bf16 (``--dtype bfloat16`` before the subcommand: llm-compressor loads the model with
``dtype=torch.bfloat16``, as its examples' ``torch_dtype="auto"`` does for these bf16 folders, and
unweight's ``prune_quant.py --dtype bfloat16`` holds and runs the model in bf16, its statistics and
methods still in float32); the dense outputs are saved and scored in float32 as above::

    W="--work /tmp/lc/bf16 --dtype bfloat16"     # a work folder of its own, with calib.safetensors
    OMP_NUM_THREADS=1 /work/lcvenv/bin/python bench/llmcompressor_side.py $W compress --method wanda50   # ...
    OMP_NUM_THREADS=1 .venv/bin/python bench/prune_quant.py --dtype bfloat16 --threads 1 \
        --methods gptq4-static,sparsegpt-50,sparsegpt-2:4,wanda-50 --out /tmp/lc/bf16/prune_quant.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/llmcompressor_side.py $W evaluate --gptq gptq4-static \
        --unweight-json /tmp/lc/bf16/prune_quant.json --result bench/results/llmcompressor-bf16-smollm2-135m.json

The llm-compressor venv: ``python3 -m venv /work/lcvenv``; ``pip install torch==2.13.0`` (CPU wheel);
``pip install -c constraints.txt llmcompressor==0.14.0.1`` with ``torch==2.13.0+cpu`` in the
constraints file (no CUDA packages are pulled). Nothing here imports unweight in that venv, nor
llm-compressor in unweight's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WORK = Path("/tmp/lc")
MODELS = ("smollm2-135m", "gemma3-270m")  # --model-name
RESULTS = Path(__file__).parent / "results"
N_SAMPLES, SEQ_LEN, SEED = 32, 512, 0  # prune_quant.py's defaults
EVAL_SEQ_LEN = 1024
EVAL_TOKENS = {"smollm2-135m": 8192, "gemma3-270m": 4096}  # prune_quant.py --eval-tokens in the recorded runs
CALIB_BATCH = 8  # unweight.calibrate.DEFAULT_BATCH: windows per block forward
# llm-compressor method -> unweight's prune_quant.py row
PAIRS = {"gptq4": "gptq4", "sparsegpt50": "sparsegpt-50", "sparsegpt24": "sparsegpt-2:4", "wanda50": "wanda-50"}
TIED_SKIP = ["re:.*lm_head"]  # tied to the embedding: pruning it would prune the embedding too. A plain
# "lm_head" does not do for the sparsity modifiers: with targets ["Linear"] they name the module "lm_head."


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_avg": os.getloadavg()}


# ----------------------------------------------------------------------------- prepare (unweight's venv)

def model_dir(name: str) -> Path:
    """The bf16 folder of a bundled model, = ``unweight.models.hf_folder(name)`` (checked by ``prepare``;
    llm-compressor's venv cannot import unweight)."""
    return Path.home() / ".cache/unweight/models" / f"{name}-bf16"


def _work(args) -> tuple[Path, Path]:
    """The work folder and its calibration windows file."""
    return Path(args.work), Path(args.work) / "calib.safetensors"


def prepare(args) -> int:
    from unweight.calibrate import calibration_windows
    from unweight.models import hf_folder, load_causal_lm

    folder = hf_folder(args.model_name)
    if folder.resolve() != model_dir(args.model_name).resolve():
        sys.exit(f"hf_folder({args.model_name!r}) is {folder}, not {model_dir(args.model_name)}: update model_dir")
    base_tok = load_causal_lm(args.model_name)[1]  # prune_quant.py calibrates with the base's tokenizer
    _, tok = load_causal_lm(str(folder))  # the folder's: checked to give the same ids
    calib = calibration_windows(base_tok, N_SAMPLES, SEQ_LEN, seed=args.seed)
    same = torch.equal(calib, calibration_windows(tok, N_SAMPLES, SEQ_LEN, seed=args.seed))
    work, calib_file = _work(args)
    work.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": calib.to(torch.int64).contiguous()}, str(calib_file),
              metadata={"source": f"calibration_windows(tok, {N_SAMPLES}, {SEQ_LEN}, seed={args.seed})",
                        "model": str(folder), "folder_tokenizer_gives_same_ids": str(same)})
    print(f"wrote {calib_file}: {tuple(calib.shape)} int64, folder tokenizer gives the same ids: {same}")
    return 0


# ----------------------------------------------------------------------------- compress (llm-compressor's venv)

def _recipe(method: str, layout: str):
    """(modifier, settings dict for the record)."""
    if method == "gptq4":
        from llmcompressor.modifiers.gptq import GPTQModifier

        weights = {"num_bits": 4, "type": "int", "symmetric": False, "dynamic": False, "actorder": None}
        if layout == "block":
            weights |= {"strategy": "block", "block_structure": [1, 128]}
        elif layout in ("group", "group-bypass"):
            weights |= {"strategy": "group", "group_size": 128}
        elif layout == "group64":
            weights |= {"strategy": "group", "group_size": 64}
        else:
            raise SystemExit(f"unknown layout {layout!r}")
        settings = {"modifier": "GPTQModifier", "config_groups": {"group_0": {"targets": ["Linear"],
                                                                              "weights": weights}},
                    "ignore": TIED_SKIP, "dampening_frac": 0.01, "block_size": 128, "actorder": None,
                    "bypass_divisibility_checks": layout == "group-bypass"}
        mod = GPTQModifier(config_groups=settings["config_groups"], ignore=TIED_SKIP, dampening_frac=0.01,
                           block_size=128, actorder=None, bypass_divisibility_checks=layout == "group-bypass")
        return mod, settings
    if method in ("sparsegpt50", "sparsegpt24"):
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        structure = "2:4" if method == "sparsegpt24" else "0:0"
        settings = {"modifier": "SparseGPTModifier", "sparsity": 0.5, "mask_structure": structure,
                    "targets": ["Linear"], "ignore": TIED_SKIP, "dampening_frac": 0.01, "block_size": 128}
        mod = SparseGPTModifier(sparsity=0.5, mask_structure=structure, targets=["Linear"], ignore=TIED_SKIP,
                                dampening_frac=0.01, block_size=128)
        return mod, settings
    if method == "wanda50":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        settings = {"modifier": "WandaPruningModifier", "sparsity": 0.5, "mask_structure": "0:0",
                    "targets": ["Linear"], "ignore": TIED_SKIP}
        return WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=TIED_SKIP), settings
    raise SystemExit(f"unknown method {method!r}; valid: {', '.join(PAIRS)}")


def compress(args) -> int:
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from importlib.metadata import version
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    folder = Path(args.model) if args.model else model_dir(args.model_name)
    work, calib_file = _work(args)
    ids = load_file(str(calib_file))["input_ids"]
    n, seq = ids.shape
    if args.quick:
        ids = ids[:4, :128]
        n, seq = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
    model.eval()
    modifier, settings = _recipe(args.method, args.layout)
    name = args.method + ("" if args.layout == "block" or args.method != "gptq4" else f"-{args.layout}")
    out = work / (name + ("-quick" if args.quick else ""))
    record = {"method": name, "llmcompressor_settings": settings, "model": str(folder), "dtype": args.dtype,
              "calibration": {"file": str(calib_file), "n_samples": n, "seq_len": seq, "batch_size": CALIB_BATCH,
                              "shuffle": False},
              "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch",
                                                   "datasets", "accelerate", "auto-round")},
              "machine_before": machine()}
    os.chdir(work)  # llm-compressor may write logs next to the working directory
    start = time.perf_counter()
    try:
        oneshot(model=model, tokenizer=str(folder), dataset=ds, recipe=[modifier], num_calibration_samples=n,
                max_seq_length=seq, shuffle_calibration_samples=False, batch_size=CALIB_BATCH,
                pipeline=args.pipeline)
    except Exception as exc:  # recorded, not hidden
        record |= {"error": f"{type(exc).__name__}: {exc}", "seconds_until_error": time.perf_counter() - start}
        out.mkdir(parents=True, exist_ok=True)
        (out / "lc_run.json").write_text(json.dumps(record, indent=1, default=str))
        print(f"{name}: FAILED after {record['seconds_until_error']:.1f} s: {record['error']}", flush=True)
        return 1
    seconds = time.perf_counter() - start
    record |= {"seconds": seconds, "machine_after": machine(), "pipeline": args.pipeline}
    mods = getattr(modifier, "config_groups", None)
    if mods:  # what the modifier resolved (observer, zero-point dtype...)
        record["resolved_weights"] = {k: v.weights.model_dump(mode="json") if hasattr(v, "weights") else str(v)
                                      for k, v in modifier.resolve_quantization_config().config_groups.items()}

    # dense save: exactly the tensors of the original folder, from the model as llm-compressor left it
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    state = model.state_dict()
    tensors = {k: state[k].detach().to(torch.float32).contiguous().clone() for k in keys}
    extra = sorted(set(state) - set(keys))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for p in folder.iterdir():
        if p.name.startswith("tokenizer") or p.name.endswith(".jinja"):
            shutil.copy(p, out / p.name)
    record["dropped_state_keys"] = extra[:20] + (["..."] if len(extra) > 20 else [])
    (out / "lc_run.json").write_text(json.dumps(record, indent=1, default=str))
    print(f"{name}: oneshot {seconds:.1f} s (load {record['machine_after']['load_avg'][0]:.2f}); wrote {out}",
          flush=True)
    return 0


# ----------------------------------------------------------------------------- time (unweight's venv)

def time_unweight(args) -> int:
    """Wall seconds of unweight's compress_layerwise per method (no evaluation), as prune_quant times
    it, so that the two sides can be timed alternately under the same machine load."""
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from prune_quant import SETTINGS

    from unweight.layerwise import LayerwiseConfig, compress_layerwise
    from unweight.models import hf_folder, load_causal_lm

    model, tok = load_causal_lm(str(hf_folder(args.model_name)), dtype=getattr(torch, args.dtype))
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    calib = load_file(str(_work(args)[1]))["input_ids"]
    out = Path(args.out)
    times = json.loads(out.read_text()) if out.exists() else {}
    for name in args.methods.split(","):
        method, settings = SETTINGS[name]
        model.load_state_dict(pristine)
        config = LayerwiseConfig.from_method(method, n_samples=N_SAMPLES, seq_len=SEQ_LEN,
                                             true_sequential=args.true_sequential, compute_dtype=args.dtype,
                                             **settings)
        before = machine()
        start = time.perf_counter()
        compress_layerwise(model, tok, config, windows=calib, progress=False)
        seconds = time.perf_counter() - start
        times.setdefault(name, []).append({"seconds": seconds, "true_sequential": args.true_sequential,
                                           "dtype": args.dtype,
                                           "machine_before": before, "machine_after": machine()})
        out.write_text(json.dumps(times, indent=1))
        print(f"{name}: compress_layerwise {seconds:.1f} s (load {before['load_avg'][0]:.2f})", flush=True)
    return 0


# ----------------------------------------------------------------------------- evaluate (unweight's venv)

def _checks(folder: Path, method: str, original: dict) -> dict:
    """What the saved weights are: zeros in the decoder Linears, untouched non-Linear tensors, and for
    GPTQ the most distinct values in any group of 128 columns of a row (<= 16 at 4 bits)."""
    saved = load_file(str(folder / "model.safetensors"))
    linear = [k for k in saved if ".layers." in k and k.endswith("proj.weight")]
    other = [k for k in saved if k not in linear]
    zeros = sum((saved[k] == 0).sum().item() for k in linear) / sum(saved[k].numel() for k in linear)
    out = {"linear_tensors": len(linear), "linear_zero_fraction": zeros,
           "non_linear_unchanged": all(torch.equal(saved[k], original[k].to(torch.float32)) for k in other),
           "linears_changed": sum(not torch.equal(saved[k], original[k].to(torch.float32)) for k in linear)}
    if method.startswith("gptq"):
        most = 0
        for k in linear:
            w = saved[k]
            for c in range(0, w.shape[1], 128):
                g = w[:, c:c + 128]
                s = torch.sort(g, dim=1).values
                distinct = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
                most = max(most, int(distinct.max()))
        out["max_distinct_values_per_row_group128"] = most
    if "24" in method:
        ok = all(((saved[k].reshape(saved[k].shape[0], -1, 4) != 0).sum(-1) <= 2).all().item() for k in linear)
        out["2:4_holds"] = ok
    return out


GPTQ_GRID = ("gptq4: llm-compressor 0.14 takes every group's scale/zero from the original weights (observer "
             "memoryless_minmax, before the GPTQ loop); unweight from the weights as updated so far when the group "
             "starts (the GPTQ reference code's behaviour)")
STATIC_GROUPS = ("gptq4 is compared with unweight's gptq4-static (--static-groups): every group's scale/zero from "
                 "the original weights, as llm-compressor's observer takes them")
GROUPING = {
    "smollm2-135m": "gptq4: llm-compressor's group strategy refuses 576 % 128 != 0; its block strategy [1, 128] is "
                    "run instead, the same grouping as unweight's g128 (4 x 128 + a remainder group of 64 per "
                    "576-column row)",
    "gemma3-270m": "gptq4: llm-compressor's group strategy, group size 128 (every input width of gemma3-270m, 640, "
                   "1024 and 2048, is a multiple of 128), the same grouping as unweight's g128",
}
DEVIATIONS = [
    "sparsegpt50: llm-compressor prunes everything at or under each 128-column block's 50% threshold "
    "(0.50001 of the weights); unweight exactly 50% per matrix",
    "same rules otherwise: dampening 0.01 x mean(diag H) in both, lazy block 128, 2:4 by the same saliency, "
    "Wanda per output row; sequential pipeline with error propagation in both; calibration batch 8 in both",
    "time: llm-compressor's is the oneshot call on the loaded model (setup, tracing, calibration, method, "
    "propagation); unweight's is prune_quant's compress_layerwise (capture, statistics, method, propagation)",
]
TRUE_SEQUENTIAL = ("unweight ran true-sequential (prune_quant --true-sequential): each Linear calibrated on the "
                   "outputs of its block's already-compressed Linears, in one forward per block (its batches of 8 "
                   "in lockstep, each waiting at every Linear until all have reached it); llm-compressor "
                   "calibrates a whole block on one forward of the block as it was, then recomputes its outputs")


def evaluate_all(args) -> int:
    torch.set_num_threads(args.threads)
    from unweight.data import corpus
    from unweight.eval.perplexity import evaluate, token_windows
    from unweight.models import hf_folder, load_causal_lm

    load_start = os.getloadavg()
    name = args.model_name
    base, tok = load_causal_lm(name)
    ev = token_windows(tok, corpus("austen", "eval"), EVAL_SEQ_LEN, max_tokens=EVAL_TOKENS[name])
    original = load_file(str(hf_folder(name) / "model.safetensors"))
    calib_meta = {}
    work, calib_file = _work(args)
    with safe_open(str(calib_file), "pt") as f:
        calib_meta = f.metadata()
    uw = json.loads(Path(args.unweight_json).read_text()) if Path(args.unweight_json).exists() else None
    uw_rows = {r["method"]: r for r in uw["rows"]} if uw else {}
    uw_times = json.loads(Path(args.unweight_times).read_text()) if args.unweight_times else {}
    result_path = Path(args.result) if args.result else RESULTS / f"llmcompressor-{name}.json"
    previous = ({r["method"]: r for r in json.loads(result_path.read_text())["rows"]}
                if args.reuse_scores and result_path.exists() else {})
    rows = []
    freeze = Path(args.freeze)
    for lc_name in args.methods.split(","):
        folder = work / lc_name
        run = json.loads((folder / "lc_run.json").read_text())
        row = {"method": lc_name, "unweight_method": PAIRS.get(lc_name.split("-")[0])}
        if row["unweight_method"] == "gptq4":
            row["unweight_method"] = args.gptq
        if "error" in run:
            row |= {"llmcompressor": {"error": run["error"]}, "lc_run": run}
            rows.append(row)
            print(f"{lc_name}: llm-compressor failed: {run['error']}", flush=True)
            continue
        old = previous.get(lc_name, {}).get("llmcompressor")
        if old and "perplexity" in old:  # --reuse-scores: llm-compressor's output is deterministic (checked)
            r = SimpleNamespace(perplexity=old["perplexity"], bits_per_byte=old["bits_per_byte"], kl=old["kl"],
                                top1_agreement=old["top1"])
            t0 = time.perf_counter() - old["eval_seconds"]
        else:
            model, _ = load_causal_lm(str(folder))
            t0 = time.perf_counter()
            r = evaluate(model, ev, tok, base=base, progress=False, desc=lc_name)
            del model
        row["llmcompressor"] = {"perplexity": r.perplexity, "bits_per_byte": r.bits_per_byte, "kl": r.kl,
                                "top1": r.top1_agreement, "seconds": run["seconds"],
                                "load_avg_before": run["machine_before"]["load_avg"],
                                "load_avg_after": run["machine_after"]["load_avg"], "checks": _checks(folder, lc_name, original),
                                "eval_seconds": time.perf_counter() - t0, "score_reused": bool(old)}
        row["lc_run"] = run
        u = uw_rows.get(row["unweight_method"])
        if u:
            row["unweight"] = {k: u.get(k) for k in ("setting", "perplexity", "bits_per_byte", "kl", "top1", "bpw",
                                                      "sparsity", "seconds", "load_avg_1min")}
            if timed := uw_times.get(row["unweight_method"]):  # the alternate timing run: its last run counts
                row["unweight"] |= {"seconds_prune_quant_run": u["seconds"], "seconds": timed[-1]["seconds"],
                                    "timing_runs": timed}
                u = row["unweight"]
            row["ppl_ratio"] = u["perplexity"] / r.perplexity  # unweight / llm-compressor
            row["time_ratio"] = u["seconds"] / run["seconds"]
            row["target_met"] = {"ppl_within_1pct": row["ppl_ratio"] <= 1.01, "time_le_0.5x": row["time_ratio"] <= 0.5}
        rows.append(row)
        print(f"{lc_name}: ppl {r.perplexity:.3f} kl {r.kl:.4f} top1 {r.top1_agreement:.3f}", flush=True)

    base_row = uw_rows.get("base (GGUF, fp32)")
    true_sequential = bool(uw and uw["calibration"].get("true_sequential"))
    result = {
        "claim": "issue 7: unweight's GPTQ/SparseGPT/Wanda within 1% of llm-compressor's perplexity in <= 0.5x its "
                 f"wall time, {name}, same calibration windows and evaluation windows",
        "model": f"{name} (hf_folder: bf16 folder of the bundled GGUF, loaded in {args.dtype} for calibration, "
                 "scored in float32; 4-bit-derived)",
        "calibration_dtype": {"llmcompressor": sorted({r["lc_run"].get("dtype", "float32") for r in rows
                                                       if "lc_run" in r}),
                              "unweight": uw["calibration"].get("dtype", "float32") if uw else None},
        "calibration": {"windows": f"calibration_windows(tok, {N_SAMPLES}, {SEQ_LEN}, seed={args.seed})",
                        "file": str(calib_file),
                        "file_metadata": calib_meta, "batch": CALIB_BATCH},
        "evaluation": {"corpus": "austen/eval", "seq_len": EVAL_SEQ_LEN, "windows": len(ev),
                       "tokens_scored": len(ev) * (EVAL_SEQ_LEN - 1), "kl_base": f"load_causal_lm({name!r}) (GGUF)"},
        "base_perplexity": base_row["perplexity"] if base_row else None,
        "unweight_run": {"file": args.unweight_json, "machine": uw["machine"] if uw else None},
        "versions": {"unweight_venv": _versions(("torch", "transformers", "safetensors")),
                     "lcvenv_freeze": freeze.read_text().split() if freeze.exists() else None},
        "deviations": ([STATIC_GROUPS] if args.gptq == "gptq4-static" else [GPTQ_GRID]) + [GROUPING[name]] + DEVIATIONS
                      + ([TRUE_SEQUENTIAL] if true_sequential else []),
        "evaluate_machine": machine() | {"load_avg_start": load_start},
        "rows": rows,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1, default=str))

    print(f"\n{name}, eval austen/eval {len(ev)} x {EVAL_SEQ_LEN}; calib {N_SAMPLES} x {SEQ_LEN}; one thread; "
          f"ratios = unweight / llm-compressor")
    print(f"{'method':16s} {'uw ppl':>8s} {'lc ppl':>8s} {'ppl ratio':>9s} {'uw KL':>7s} {'lc KL':>7s} "
          f"{'uw s':>7s} {'lc s':>7s} {'time ratio':>10s}")
    for row in rows:
        lc, u = row["llmcompressor"], row.get("unweight")
        if "error" in lc:
            print(f"{row['method']:16s} llm-compressor failed: {lc['error'][:90]}")
            continue
        if not u:
            print(f"{row['method']:16s} {'-':>8s} {lc['perplexity']:8.3f}")
            continue
        kl = f"{u['kl']:7.4f}" if u.get("kl") is not None else f"{'-':>7s}"  # prune_quant --no-kl
        print(f"{row['method']:16s} {u['perplexity']:8.3f} {lc['perplexity']:8.3f} {row['ppl_ratio']:9.4f} "
              f"{kl} {lc['kl']:7.4f} {u['seconds']:7.1f} {lc['seconds']:7.1f} {row['time_ratio']:10.3f}")
    print(f"wrote {result_path}")
    return 0


def _versions(names) -> dict:
    from importlib.metadata import version

    return {n: version(n) for n in names}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(WORK),
                    help="folder of the calibration windows (calib.safetensors) and llm-compressor's outputs")
    ap.add_argument("--model-name", default=MODELS[0], choices=MODELS, help="the bundled model both sides run")
    ap.add_argument("--seed", type=int, default=SEED, help="calibration windows' seed (prepare; recorded by evaluate)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="what both sides load the model in and calibrate in (compress, time; recorded by evaluate)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="dump the calibration windows (unweight's venv)")
    c = sub.add_parser("compress", help="run llm-compressor's oneshot (llm-compressor's venv)")
    c.add_argument("--method", required=True, choices=list(PAIRS))
    c.add_argument("--layout", default="block", choices=["block", "group", "group-bypass", "group64"],
                   help="gptq4 groups: block [1,128] (= unweight's g128 with remainder), group 128 (refused), "
                        "group 128 with bypass_divisibility_checks, group 64")
    c.add_argument("--model", default="", help="the model folder (default: --model-name's bf16 folder)")
    c.add_argument("--pipeline", default="sequential")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 calibration tokens, -quick folder")
    e = sub.add_parser("evaluate", help="score the saved folders as prune_quant does (unweight's venv)")
    e.add_argument("--methods", default=",".join(PAIRS))
    e.add_argument("--unweight-json", default=str(WORK / "prune_quant.json"))
    e.add_argument("--freeze", default=str(WORK / "lcvenv-freeze.txt"), help="pip freeze of /work/lcvenv")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--unweight-times", default="", help="time's JSON: unweight's seconds from the alternate timing run")
    e.add_argument("--result", default="", help="where the comparison's JSON goes (default: "
                   "bench/results/llmcompressor-MODEL.json)")
    e.add_argument("--gptq", default="gptq4", choices=["gptq4", "gptq4-static"],
                   help="the unweight row llm-compressor's gptq4 is compared with (gptq4-static: its group grid)")
    e.add_argument("--reuse-scores", action="store_true",
                   help="take llm-compressor's perplexity/KL from the last result instead of evaluating again")
    t = sub.add_parser("time", help="time unweight's compress_layerwise per method, no evaluation (unweight's venv)")
    t.add_argument("--methods", default=",".join(PAIRS.values()))
    t.add_argument("--out", default=str(WORK / "unweight-times.json"))
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--true-sequential", action="store_true", help="unweight's true-sequential calibration")
    args = ap.parse_args()
    return {"prepare": prepare, "compress": compress, "evaluate": evaluate_all, "time": time_unweight}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
