"""The main job on the bundled real model: convert it, compress it every way unweight knows, and measure
each result side by side (size in bits per weight, quality on held-out text, time).

  unweight demo                      # smollm2-135m, 4,096 evaluation tokens
  unweight demo --max-tokens 16384 --out out/demo

Quality is measured under the pinned protocol (Austen evaluation split, windows of --seq-len tokens)
against the GGUF model as transformers loads it, in float32. Every compressed folder is written with
`unweight compress` and loaded back through transformers.from_pretrained, as a user would. Lossless
rows are also verified bit for bit, and where there is a CUDA device the lossless folder is decoded there
too. The table is written as JSON to OUT/demo.json.

The bundled decoders are 4-bit-derived GGUF models: lossy results on them are flattered (DESIGN.md).
"""

import contextlib
import io
import json
import time
from pathlib import Path

from unweight.cli import main as cli
from unweight.data import corpus
from unweight.errors import UnweightError
from unweight.eval import evaluate, token_windows
from unweight.models import hf_folder, load_causal_lm
from unweight.report.table import format_table

HELP = "run the main job on the bundled model and print the comparison table"

CALIB = ["--calib-samples", "4", "--calib-seq-len", "512"]
# label, `unweight compress` arguments
STAGES = [
    ("lossless", ["--method", "lossless"]),
    ("rtn 4-bit g128", ["--method", "rtn", "--bits", "4", "--group-size", "128"]),
    ("rtn 3-bit g128", ["--method", "rtn", "--bits", "3", "--group-size", "128"]),
    ("kmeans K=16", ["--method", "kmeans", "--k", "16"]),
    ("kmeans K=16 + outliers auto", ["--method", "kmeans", "--k", "16", "--outliers", "auto"]),
    ("kmeans K=16 + outliers auto + entropy", ["--method", "kmeans", "--k", "16", "--outliers", "auto",
                                               "--entropy"]),
    ("kmeans K=64 + outliers auto", ["--method", "kmeans", "--k", "64", "--outliers", "auto"]),
    # calibrated methods on a short calibration slice (4 x 512 tokens) to keep the demo short
    ("gptq 4-bit g128", ["--method", "gptq", "--bits", "4", *CALIB]),
    # the same with the calibration forwards in bf16 (faster on CPUs with AVX512-BF16/AMX, slower without)
    ("gptq 4-bit g128, bf16 forwards", ["--method", "gptq", "--bits", "4", "--compute-dtype", "bfloat16", *CALIB]),
    ("wanda 2:4", ["--method", "wanda", "--pattern", "2:4", *CALIB]),
    # exported with `unweight export` and loaded back by transformers + compressed-tensors (vLLM's format)
    ("gptq 4-bit g64 sym -> compressed-tensors", ["--method", "gptq", "--bits", "4", "--group-size", "64",
                                                   "--scheme", "sym", *CALIB]),
]
EXPORTED = "-> compressed-tensors"


def add_arguments(p):
    p.add_argument("--model", default="smollm2-135m", help="bundled model or path (default: smollm2-135m)")
    p.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    p.add_argument("--seq-len", type=int, default=1024, help="window length (default: 1024)")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluation tokens (default: 4096)")


def _quiet(argv: list[str]) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli(argv)
    return rc, buf.getvalue()


def _gpu_decode(dense: Path, folder: Path) -> str:
    """The lossless folder's state dict decoded on the GPU (``formats.load_state_dict``) against decoding it on
    the CPU, both timed once warm, and checked bit for bit against the dense folder; or why not."""
    import torch

    if not torch.cuda.is_available():
        return "\nlossless folder on a GPU: no CUDA device here (the decoder's tests run in Triton's interpreter)"
    from unweight.formats import decode_tensors, load_state_dict, same_bits

    load_state_dict(folder, "cuda")  # compiles the kernels
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    on_gpu = load_state_dict(folder, "cuda")
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for v in decode_tensors(folder).values():  # what a loader without the GPU decoder does
        v.to("cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    exact = all(same_bits(on_gpu[k].cpu(), v) for k, v in decode_tensors(dense).items())
    return (f"\nlossless folder on {torch.cuda.get_device_name()}: decoded there in {(t1 - t0) * 1e3:.0f} ms "
            f"(on the CPU, then copied: {(t2 - t1) * 1e3:.0f} ms), {'bit-exact' if exact else 'NOT bit-exact'}")


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_causal_lm(args.model)
    windows = token_windows(tok, corpus("austen", "eval"), args.seq_len, args.max_tokens)
    rows = []

    def measure(label: str, model, bits, seconds: float, **extra):
        r = evaluate(model, windows, tok, base=None if model is base else base, desc=label)
        rows.append({"method": label, "bits/weight": bits, "perplexity": r.perplexity,
                     "bits/byte": r.bits_per_byte, "KL": r.kl, "top-1": r.top1_agreement,
                     "seconds": round(seconds, 1), **extra})

    measure("base (GGUF -> fp32)", base, None, 0.0)
    t = time.perf_counter()
    bf16 = hf_folder(args.model, "bf16")
    measure("bf16 (convert)", load_causal_lm(str(bf16))[0], 16.0, time.perf_counter() - t)

    for label, extra_args in STAGES:
        target = out / label.replace(" ", "_").replace("=", "").replace("+", "").replace("__", "_")
        t = time.perf_counter()
        rc, text = _quiet(["compress", str(bf16), str(target), *extra_args, "--force", "--json"])
        if rc != 0:
            raise UnweightError(f"demo stage {label!r}: unweight compress failed")
        stats = json.loads(text)
        seconds = time.perf_counter() - t
        extra = {}
        if "lossless" in label:
            rc, _ = _quiet(["verify", str(bf16), str(target)])
            extra["bit-exact"] = rc == 0
            extra["ratio"] = stats["ratio"]
        if label.endswith(EXPORTED):
            try:
                import compressed_tensors  # noqa: F401  (transformers needs it to load the export)
            except ImportError:
                print(f"demo: skipping {label!r}: pip install compressed-tensors to load the export")
                continue
            exported = target.with_name(target.name + "-ct")
            rc, _ = _quiet(["export", str(target), str(exported), "--force"])
            if rc != 0:
                raise UnweightError(f"demo stage {label!r}: unweight export failed")
            target, seconds = exported, time.perf_counter() - t
        measure(label, load_causal_lm(str(target))[0], stats["bits_per_weight"], seconds, **extra)

    title = (f"unweight demo: {args.model} (4-bit-derived GGUF), {windows.numel():,} tokens of Austen "
             f"(evaluation split, windows of {args.seq_len}); bits/weight over the compressed matrices")
    print(format_table(rows, title=title))

    print(_gpu_decode(bf16, out / "lossless"))

    # where the redundancy is: the per-matrix statistics and the model's redundancy table (no calibration)
    rc, text = _quiet(["analyze", str(bf16), "--out", str(out / "analyze"), "--json", "--quiet", "--threads", "1"])
    if rc != 0:
        raise UnweightError("demo: unweight analyze failed")
    table = json.loads(text)["redundancy"]
    print(f"\nredundancy ({out / 'analyze'}): {table['matrices']} matrices, mean effective rank "
          f"{table['mean_effective_rank']:.1f} ({table['mean_effective_rank_ratio']:.3f} of full), "
          f"value entropy {table['value_entropy']:.2f} bits, exponent entropy {table['exponent_entropy']:.2f} "
          f"bits (the lossless bound: {table['split_bound']:.2f} of {table['raw_bits']:.0f} bits)")
    (out / "demo.json").write_text(json.dumps({"model": args.model, "seq_len": args.seq_len,
                                               "tokens": int(windows.numel()), "rows": rows,
                                               "redundancy": table}, indent=2))
    print(f"wrote {out / 'demo.json'}")
    return 0
