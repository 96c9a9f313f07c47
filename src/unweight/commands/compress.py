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
from unweight.outliers import parse_outliers
from unweight.targets import is_target

HELP = "compress a model (lossless, kmeans, rtn, ...)"


def _lossless(args):
    from unweight.lossless.register import FORMAT, encode_parts

    return FORMAT, encode_parts, {}


def _targets(args, config: dict, encode_matrix):
    """Wrap a matrix encoder so that only the selected targets are encoded; record the choice."""
    config["targets"] = "block linears" + (" + embeddings/head" if args.include_embeddings else "")

    def encode(name, t):
        if not (t.is_floating_point() and is_target(name, tuple(t.shape), args.include_embeddings)):
            return None
        return encode_matrix(name, t)

    return encode


def activation_energy(model_dir, n_samples: int, seq_len: int) -> dict:
    """||X_j||^2 per input column of every decoder Linear, over calibration windows (importance weights)."""
    from unweight.analysis.sensitivity import collect_statistics
    from unweight.calibrate import calibration_windows
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(model_dir))
    windows = calibration_windows(tok, n_samples, seq_len)
    return {n: v.float() for n, v in collect_statistics(model, windows, fisher=False).sq_norm.items()}


def _kmeans(args):
    from unweight.cluster.codebook import FORMAT, KMeansSpec, encode_kmeans

    spec = KMeansSpec(k=args.k, granularity=args.granularity, outliers=parse_outliers(args.outliers))
    config = {"method": "kmeans", "k": spec.k, "granularity": spec.granularity,
              "outliers": args.outliers, "weighted": args.weighted}
    energy = activation_energy(args.src, args.calib_samples, args.calib_seq_len) if args.weighted else {}
    if args.weighted:
        config["calibration"] = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len}

    def encode(name, t):
        imp = energy.get(name)
        return encode_kmeans(t, spec, importance=None if imp is None else imp[None, :].expand(t.shape))

    return FORMAT, _targets(args, config, encode), config


def _rtn(args):
    from unweight.cluster.codebook import FORMAT, RTNSpec, encode_rtn

    spec = RTNSpec(bits=args.bits, group_size=args.group_size, scheme=args.scheme,
                   outliers=parse_outliers(args.outliers))
    config = {"method": "rtn", "bits": spec.bits, "group_size": spec.group_size, "scheme": spec.scheme,
              "outliers": args.outliers}
    return FORMAT, _targets(args, config, lambda name, t: encode_rtn(t, spec)), config


METHODS = {"lossless": _lossless, "kmeans": _kmeans, "rtn": _rtn}


def add_arguments(p):
    p.add_argument("model", help="bundled model name or HF folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", default="lossless", choices=list(METHODS), help="method (default: lossless)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    g = p.add_argument_group("kmeans (arXiv 2603.17917) and rtn")
    g.add_argument("--k", type=int, default=16, help="kmeans: shared values per codebook, 2..256 (default: 16)")
    g.add_argument("--granularity", default="matrix", help="kmeans: matrix | row | group:N (default: matrix)")
    g.add_argument("--weighted", action="store_true",
                   help="kmeans: weight each value by its input column's activation energy ||X_j||^2 (calibration)")
    g.add_argument("--bits", type=int, default=4, help="rtn: bits per weight, 1..8 (default: 4)")
    g.add_argument("--group-size", type=int, default=128, help="rtn: group size along the input dim (default: 128)")
    g.add_argument("--scheme", default="asym_int", choices=["asym_int", "asym_float", "sym"],
                   help="rtn: w=s*(q-z) integer zero point (default), w=min+s*q float minimum, or symmetric")
    g.add_argument("--outliers", default="none",
                   help="keep weights exactly (dense-and-sparse): none, auto, a count N, or a fraction (0.05%%)")
    g.add_argument("--include-embeddings", action="store_true", help="also compress embeddings and the output head")
    g.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default: 16)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default: 512)")
    p.add_argument("--json", action="store_true", help="print the size accounting as JSON")


def run(args) -> int:
    if args.method not in METHODS:
        raise UnweightError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.method == "kmeans" and not 2 <= args.k <= 256:
        raise UnweightError(f"--k must be in 2..256, got {args.k}")
    args.src = hf_folder(args.model)
    fmt, encode, config = METHODS[args.method](args)
    stats = compress_checkpoint(args.src, args.out, fmt, encode, config, overwrite=args.force)
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
