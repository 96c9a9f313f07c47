"""Compress a model into an HF folder that loads with transformers after `import unweight`.

  unweight compress smollm2-135m out/lossless --method lossless
  unweight compress out/smollm2-bf16 out/k16 --method kmeans --k 16
  unweight compress smollm2-135m out/k16e --method kmeans --k 16 --entropy   (indices rANS-coded; also rtn)
  unweight compress smollm2-135m out/rtn4 --method rtn --bits 4 --group-size 128
  unweight compress smollm2-135m out/gptq4 --method gptq --bits 4        (also: awq)
  unweight compress smollm2-135m out/wanda24 --method wanda --pattern 2:4  (also: magnitude, sparsegpt)
  unweight compress smollm2-135m out/sgpt24q4 --method sparsegpt --pattern 2:4 --quant gptq --bits 4
  unweight compress smollm2-135m out/plan --recipe recipe.yaml
  unweight compress smollm2-135m out/k16ft --method kmeans --outliers auto --finetune-steps 50 --affine moments

A bundled model name is first converted to bf16 (cached). The input is read and the output written one
tensor at a time; the output appears only when complete. `--json` prints the size accounting.

`--recipe` (written by `unweight plan`) gives each matrix its own setting and picks the method.
`--finetune-steps` and `--affine` refine the K-means codebooks (arXiv 2603.17917): every target is then
clustered in memory first, the codebooks are refined together (centroids fine-tuned on calibration
windows, then one a * c + b per matrix), and the stream writes the refined parts. The output's
quantization_config records the recipe, the fine-tuning and every (a, b).
"""

import json
from pathlib import Path

from unweight.commands import add_threads
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


def _settings(args, config: dict, flags: dict):
    """Per-matrix settings: the recipe's (``--recipe``), else ``flags`` for every matrix; recorded.
    ``outliers`` is parsed: the recipe's where it sets them, else ``--outliers``."""
    outliers = parse_outliers(args.outliers)
    if args.loaded_recipe is None:
        config.update(flags)
        return lambda name: {**flags, "outliers": outliers}
    config.update(recipe=args.loaded_recipe.to_dict(), recipe_path=str(args.recipe))

    def settings(name: str) -> dict:
        s = args.loaded_recipe.settings_for(name)
        return {**s, "outliers": parse_outliers(s["outliers"]) if "outliers" in s else outliers}

    return settings


def _calibration(args, config: dict):
    """(float32 model, calibration windows) of the source, a causal LM; the windows are recorded."""
    from unweight.calibrate import calibration_windows
    from unweight.models import load_causal_lm

    config["calibration"] = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len}
    model, tok = load_causal_lm(str(args.src))
    return model, calibration_windows(tok, args.calib_samples, args.calib_seq_len)


def _refined(args, config: dict, encode):
    """The encoder of --finetune-steps / --affine. The codebooks are refined together, so this is two
    passes: every target is clustered in memory first (a 135M model's parts at K=16: ~55 MB),
    the centroids are fine-tuned, then each matrix gets its (a, b); the stream then writes these parts."""
    from tqdm import tqdm

    from unweight.checkpoint import open_checkpoint
    from unweight.cluster import refine
    from unweight.cluster.finetune import DEFAULT_BATCH
    from unweight.formats import quantization_config

    ckpt = open_checkpoint(args.src)
    if quantization_config(ckpt) is not None or ckpt.format != "hf":
        raise UnweightError(f"{ckpt.path}: --finetune-steps and --affine take an uncompressed HF folder")
    arch = " ".join((ckpt.config or {}).get("architectures") or [])
    if "CausalLM" not in arch and (args.finetune_steps or args.affine == "lsq"):
        raise UnweightError(f"{ckpt.path}: --finetune-steps and --affine lsq need a causal LM "
                            f"(architectures: {arch or 'none'}); --affine moments needs no calibration")
    if Path(args.out).exists() and not args.force:  # found now, not after the fine-tuning
        raise UnweightError(f"{args.out}: already exists (pass --force to replace it)")
    parts = {}
    for name in tqdm(ckpt.names(), desc="cluster", unit="tensor"):
        p = encode(name, ckpt.get(name))
        if p is not None:
            parts[name] = p
    if args.finetune_steps:
        model, windows = _calibration(args, config)
        losses = []
        bar = tqdm(total=args.finetune_steps, desc="finetune centroids", unit="step")

        def on_step(step, loss):
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update()

        parts = refine.finetune_parts(model, parts, windows, args.finetune_steps, args.finetune_lr, on_step)
        bar.close()
        n = min(len(windows), len(losses))  # step s trains on window s mod len(windows)
        config["finetune"] = {"steps": args.finetune_steps, "lr": args.finetune_lr, "batch_size": DEFAULT_BATCH,
                              "loss_first_pass": sum(losses[:n]) / n, "loss_last_pass": sum(losses[-n:]) / n}
        del model
    if args.affine:
        affines = {}
        if args.affine == "lsq":
            model, windows = _calibration(args, config)
            affines = refine.lsq_affines(model, windows, parts, ckpt.get)
            del model
        fits = {}
        for name in parts:  # moments, and the matrices outside the decoder blocks under lsq
            fit = "lsq" if name in affines else "moments"
            affine = affines.get(name) or refine.fit_affine(ckpt.get(name), parts[name], name, "moments")
            parts[name] = refine.apply_to_codebook(parts[name], affine, name)
            fits[name] = {"a": affine.a, "b": affine.b, "fit": fit}
        config["affine"] = {"fit": args.affine, "order": "after finetune" if args.finetune_steps else "after kmeans",
                            "matrices": fits}
    return lambda name, t: parts.get(name)


def _kmeans(args):
    from unweight.cluster.codebook import FORMAT, KMeansSpec, encode_kmeans

    config = {"method": "kmeans"}
    settings = _settings(args, config, {"k": args.k, "granularity": args.granularity})
    config.update(outliers=args.outliers, weighted=args.weighted)
    energy = activation_energy(args.src, args.calib_samples, args.calib_seq_len) if args.weighted else {}
    if args.weighted:
        config["calibration"] = {"corpus": "austen/calib", "samples": args.calib_samples, "seq_len": args.calib_seq_len}

    def encode(name, t):
        imp = energy.get(name)
        spec = KMeansSpec(**settings(name))
        return encode_kmeans(t, spec, importance=None if imp is None else imp[None, :].expand(t.shape))

    encode = _targets(args, config, encode)
    if args.finetune_steps or args.affine:
        encode = _refined(args, config, encode)
    return FORMAT, encode, config


def _rtn(args):
    from unweight.cluster.codebook import FORMAT, RTNSpec, encode_rtn

    config = {"method": "rtn"}
    settings = _settings(args, config, {"bits": args.bits, "group_size": args.group_size, "scheme": args.scheme})
    config["outliers"] = args.outliers

    def encode(name, t):
        return encode_rtn(t, RTNSpec(**settings(name)))

    return FORMAT, _targets(args, config, encode), config


def _entropy_coded(config: dict, encode):
    """--entropy: the encoder's parts with the indices/levels rANS-coded (after any refinement); recorded."""
    from unweight.cluster.codebook import ENTROPY, entropy_code

    config["entropy"] = ENTROPY

    def coded(name, t):
        parts = encode(name, t)
        return None if parts is None else entropy_code(parts, name)

    return coded


LAYERWISE = ("magnitude", "wanda", "sparsegpt", "gptq", "awq")


def _check_pruning_flags(args) -> None:
    """--sparsity, --pattern and --quant are refused with any method that does not prune."""
    from unweight.layerwise import PRUNERS

    if args.method not in PRUNERS and (args.sparsity is not None or args.pattern or args.quant):
        raise UnweightError(f"--sparsity, --pattern and --quant go with a pruning method ({', '.join(PRUNERS)}), "
                            f"not {args.method}")


def _check_layerwise_flags(args, config) -> None:
    """GPTQ's flags, --true-sequential, --compute-dtype and --device are refused wherever they would be ignored:
    ``config`` is the layer-by-layer config, None for a method that is not layer by layer."""
    for flag, on in (("--act-order", args.act_order), ("--static-groups", args.static_groups)):
        if on and (config is None or config.quant != "gptq"):
            raise UnweightError(f"{flag} goes with GPTQ (--method gptq, or a pruning method with --quant gptq)")
    for flag, on in (("--true-sequential", args.true_sequential),
                     ("--compute-dtype", args.compute_dtype != "float32"), ("--device", args.device != "cpu")):
        if on and (config is None or not config.calibrated):
            what = config.describe() if config is not None else f"--method {args.method}"
            raise UnweightError(f"{flag} goes with a calibrated method (wanda, sparsegpt, gptq, awq): "
                                f"{what} uses no calibration data")


def _check_device(device: str) -> None:
    """``--device`` names a device this torch can run on."""
    import torch

    try:
        where = torch.device(device)
    except RuntimeError:
        raise UnweightError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1 ...)") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise UnweightError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device")
    if where.type not in ("cpu", "cuda"):
        raise UnweightError(f"--device {device}: only cpu and cuda are supported")


def _layerwise(args):
    """Prune and/or quantize every decoder Linear in memory, block by block on calibration windows
    (unweight.layerwise), then store exactly that (unweight-layerwise, unweight.layerwise_format)."""
    from dataclasses import replace

    from unweight.layerwise import PRUNERS, LayerwiseConfig
    from unweight.layerwise_format import FORMAT, layerwise_encoder, quantization_entries

    pruning = args.method in PRUNERS
    _check_pruning_flags(args)
    if args.sparsity is not None and args.pattern:
        raise UnweightError("give --sparsity (unstructured) or --pattern (N:M), not both")
    if args.sparsity is not None and not 0 < args.sparsity < 1:
        raise UnweightError(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    if not 1 <= args.bits <= 8:
        raise UnweightError(f"--bits must be in 1..8, got {args.bits}")
    settings = {"n_samples": args.calib_samples, "seq_len": args.calib_seq_len, "act_order": args.act_order,
                "static_groups": args.static_groups,
                "outliers": parse_outliers(args.outliers),
                "true_sequential": args.true_sequential, "compute_dtype": args.compute_dtype}
    if pruning:
        settings.update(sparsity=0.5 if args.sparsity is None else args.sparsity, pattern=args.pattern, quant=args.quant)
    if not pruning or args.quant:
        settings.update(bits=args.bits, group_size=args.group_size, scheme=args.scheme)
    config = LayerwiseConfig.from_method(args.method, **settings)
    _check_layerwise_flags(args, config)
    _check_device(args.device)
    if Path(args.out).exists() and not args.force:  # found now, not after the calibration
        raise UnweightError(f"{args.out}: already exists (pass --force to replace it)")
    config_for, entries = None, {}
    if args.loaded_recipe is not None:  # hybrid precision: each Linear at the recipe's setting
        per_name = _settings(args, entries, {})
        cache = {}

        def config_for(module: str) -> LayerwiseConfig:
            if module not in cache:
                s = per_name(f"{module}.weight")
                cache[module] = replace(config, bits=s["bits"], group_size=s["group_size"], scheme=s["scheme"],
                                        outliers=s["outliers"])
            return cache[module]
    encode, _ = layerwise_encoder(args.src, config, config_for=config_for, device=args.device)
    return FORMAT, encode, {**quantization_entries(config, args.method), **entries}


METHODS = {"lossless": _lossless, "kmeans": _kmeans, "rtn": _rtn, **dict.fromkeys(LAYERWISE, _layerwise)}


def add_arguments(p):
    p.add_argument("model", help="bundled model name or HF folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help="method (default: lossless, or the recipe's)")
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
                   help="keep weights exactly (dense-and-sparse; kmeans, rtn, gptq, awq, pruning with --quant): none, "
                        "auto, a count N, or a fraction (0.05%%)")
    g.add_argument("--include-embeddings", action="store_true", help="also compress embeddings and the output head")
    g.add_argument("--entropy", action="store_true",
                   help="kmeans, rtn: rANS-code the indices/levels (one order-0 table per matrix) instead of "
                        "bit-packing them; at most 113 bytes per matrix + 17 per 64K weights above packed")
    g.add_argument("--calib-samples", type=int, default=16, help="calibration windows (default: 16)")
    g.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default: 512)")
    g.add_argument("--recipe", metavar="YAML",
                   help="per-matrix settings and the method (kmeans|rtn|gptq, schema in unweight.recipe), "
                        "e.g. from `unweight plan`; they replace --k/--granularity/--bits/--group-size/--scheme "
                        "(and --outliers where a setting gives its own)")
    g = p.add_argument_group("codebook refinement (kmeans, arXiv 2603.17917)")
    g.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="fine-tune the centroids (assignments frozen, outliers exact) for N Adam steps on the "
                        "calibration windows, one window a step (default: 0, off)")
    g.add_argument("--finetune-lr", type=float, default=None, metavar="LR",
                   help="Adam learning rate of the centroids (default: unweight.cluster.finetune.DEFAULT_LR)")
    g.add_argument("--affine", choices=["moments", "lsq"],
                   help="correct each codebook to a*c+b, a > 0 (after fine-tuning): match the original matrix's "
                        "mean and std, or least squares of the layer outputs on the calibration windows")
    g = p.add_argument_group("prune / quant, calibrated layer by layer (magnitude, wanda, sparsegpt, gptq, awq)",
                             "--method gptq|awq quantizes (with --bits/--group-size/--scheme above);\n"
                             "--method magnitude|wanda|sparsegpt prunes; add --quant gptq|rtn to also quantize\n"
                             "the kept weights. Calibration: --calib-samples windows of --calib-seq-len tokens.\n"
                             "Stored exactly as compressed in memory (format unweight-layerwise).")
    g.add_argument("--sparsity", type=float, default=None,
                   help="pruning: unstructured fraction of weights zeroed, in (0, 1) (default: 0.5)")
    g.add_argument("--pattern", metavar="N:M", help="pruning: keep N of every M consecutive inputs, e.g. 2:4")
    g.add_argument("--quant", choices=["gptq", "rtn"], help="pruning: also quantize the kept weights")
    g.add_argument("--act-order", action="store_true", help="gptq: quantize columns in decreasing Hessian order")
    g.add_argument("--static-groups", action="store_true",
                   help="gptq: every group's scale and zero from the original weights, before the sweep "
                        "(as llm-compressor; implied by --act-order)")
    g.add_argument("--true-sequential", action="store_true",
                   help="calibrate each Linear on the outputs of the block's already-compressed Linears before it, "
                        "in the block's one forward (GPTQ's true-sequential; 0.7-0.8x the time: one forward per "
                        "block instead of two, its batches in lockstep)")
    g.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="what the calibration forwards compute in (default: float32). bfloat16 (a bf16 checkpoint "
                        "only): ~0.55x the time on CPUs with AVX512-BF16/AMX; statistics and methods stay float32")
    g.add_argument("--device", default="cpu",
                   help="where each block is calibrated and compressed, the model staying on the CPU (default: cpu; "
                        "cuda runs GPTQ's and SparseGPT's sweeps as Triton kernels and the calibration windows in "
                        "one batch: on an H200 smollm2-135m's GPTQ took 1.9 s in batches of 8)")
    add_threads(p)
    p.add_argument("--json", action="store_true", help="print the size accounting and the config as JSON")


def _load_recipe(args) -> None:
    """Read ``--recipe`` into ``args.loaded_recipe``; the recipe's method becomes ``args.method``."""
    from unweight import recipe

    args.loaded_recipe = None
    if args.recipe is None:
        return
    args.loaded_recipe = recipe.load(args.recipe)
    if args.method is not None and args.method != args.loaded_recipe.method:
        raise UnweightError(f"{args.recipe}: the recipe's method is {args.loaded_recipe.method!r}, but "
                            f"--method {args.method} was given; drop --method or use another recipe")
    args.method = args.loaded_recipe.method


def _check_recipe_names(args) -> None:
    """Every matrix the recipe lists must be one that this compression encodes."""
    from unweight.checkpoint import open_checkpoint

    ckpt = open_checkpoint(args.src)
    for name in args.loaded_recipe.matrices:
        if name not in ckpt:
            raise UnweightError(f"{args.recipe}: lists {name!r}, which {ckpt.path} does not have")
        if not is_target(name, tuple(ckpt.info(name).shape), args.include_embeddings):
            raise UnweightError(f"{args.recipe}: lists {name!r}, which compress does not encode (block "
                                f"Linears only; --include-embeddings adds the embeddings and the head)")


def run(args) -> int:
    from unweight.cluster.finetune import DEFAULT_LR

    _load_recipe(args)
    args.method = args.method or "lossless"
    if args.method not in METHODS:
        raise UnweightError(f"unknown method {args.method!r}; choose from {', '.join(METHODS)}")
    if args.method == "kmeans" and args.loaded_recipe is None and not 2 <= args.k <= 256:
        raise UnweightError(f"--k must be in 2..256, got {args.k}")
    if (args.finetune_steps or args.affine) and args.method != "kmeans":
        raise UnweightError(f"--finetune-steps and --affine refine K-means codebooks; method {args.method!r} "
                            f"has none")
    if args.method not in LAYERWISE:  # the layer-by-layer methods' flags would be ignored
        _check_pruning_flags(args)
        _check_layerwise_flags(args, None)
    if args.entropy and args.method not in ("kmeans", "rtn"):
        raise UnweightError(f"--entropy codes K-means indices or RTN levels (--method kmeans or rtn); method "
                            f"{args.method!r} stores neither")
    if args.finetune_steps < 0:
        raise UnweightError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
    args.finetune_lr = DEFAULT_LR if args.finetune_lr is None else args.finetune_lr
    if not args.finetune_lr > 0:
        raise UnweightError(f"--finetune-lr must be > 0, got {args.finetune_lr}")
    args.src = hf_folder(args.model)
    if args.loaded_recipe is not None:
        _check_recipe_names(args)
    fmt, encode, config = METHODS[args.method](args)
    if args.entropy:
        encode = _entropy_coded(config, encode)
    stats = compress_checkpoint(args.src, args.out, fmt, encode, config, overwrite=args.force)
    if args.loaded_recipe is not None:  # the folder says how it was made (DESIGN.md, on-disk format)
        from unweight.recipe import dump

        dump(args.loaded_recipe, Path(args.out) / "recipe.yaml")
    files = _safetensors_bytes(args.src), _safetensors_bytes(args.out)
    summary = {"out": args.out, "method": args.method, "tensors": stats.tensors, "encoded": stats.encoded,
               "original_bytes": stats.original_bytes, "stored_bytes": stats.stored_bytes,
               "ratio": stats.ratio, "bits_per_weight": stats.bits_per_weight,
               "original_file_bytes": files[0], "file_bytes": files[1], "file_ratio": files[1] / files[0],
               "quantization_config": {"quant_method": fmt.quant_method, "format_version": fmt.version, **config}}
    if args.json:
        print(json.dumps({**summary, "per_tensor": stats.per_tensor}, indent=2))
    else:
        print(f"{args.out}: {stats.encoded}/{stats.tensors} tensors encoded, {stats.original_bytes:,} -> "
              f"{stats.stored_bytes:,} bytes (ratio {stats.ratio:.4f}), "
              f"{stats.bits_per_weight:.3f} bits per encoded weight; as safetensors files (their JSON headers "
              f"included) {files[0]:,} -> {files[1]:,} bytes (ratio {summary['file_ratio']:.4f})")
    return 0


def _safetensors_bytes(folder) -> int:
    """The bytes of a folder's safetensors files (tensor data and each file's JSON header)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
