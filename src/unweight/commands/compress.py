"""Compress a model into an HF folder that loads with transformers after `import unweight`.

  unweight compress smollm2-135m out/lossless --method lossless
  unweight compress out/smollm2-bf16 out/k16 --method kmeans --k 16
  unweight compress smollm2-135m out/rtn4 --method rtn --bits 4 --group-size 128

A bundled model name is first converted to bf16 (cached). The input is read and the output written one
tensor at a time; the output appears only when complete. `--json` prints the size accounting.
"""

import json

from unweight.errors import UnweightError
from unweight.formats import compress_checkpoint
from unweight.models import hf_folder

HELP = "compress a model (lossless, kmeans, rtn, ...)"


def _lossless(args):
    from unweight.lossless import FORMAT, encode_parts

    return FORMAT, encode_parts, {}


METHODS = {"lossless": _lossless}


def add_arguments(p):
    p.add_argument("model", help="bundled model name or HF folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", default="lossless", choices=list(METHODS), help="method (default: lossless)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the size accounting as JSON")


def run(args) -> int:
    if args.method not in METHODS:
        raise UnweightError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    fmt, encode, config = METHODS[args.method](args)
    stats = compress_checkpoint(hf_folder(args.model), args.out, fmt, encode, config, overwrite=args.force)
    summary = {"out": args.out, "method": args.method, "tensors": stats.tensors, "encoded": stats.encoded,
               "original_bytes": stats.original_bytes, "stored_bytes": stats.stored_bytes,
               "ratio": stats.ratio, "bits_per_weight": stats.bits_per_weight}
    if args.json:
        print(json.dumps({**summary, "per_tensor": stats.per_tensor}, indent=2))
    else:
        print(f"{args.out}: {stats.encoded}/{stats.tensors} tensors encoded, {stats.original_bytes:,} -> "
              f"{stats.stored_bytes:,} bytes (ratio {stats.ratio:.4f}), "
              f"{stats.bits_per_weight:.3f} bits per encoded weight")
    return 0
