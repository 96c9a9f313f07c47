"""The GPU decoder (``unweight.lossless.gpu``) on a CUDA device, against what a loader does without it.

For each model and dtype (bf16, fp16, fp32, fp8_e4m3), the tensors are encoded once on the CPU; then, best
of ``--reps`` in one process, each of these puts the whole model on the device, bit-exact (checked after the
clock):

* ``copy``: the original tensors copied to the device (what an uncompressed checkpoint costs once read);
* ``cpu+copy``: unweight's CPU decoder on all threads, then the copy;
* ``gpu``: the compressed streams copied, then decoded by the Triton kernels on the device;
* ``gpu prefetch``: the same with ``gpu.PREFETCH`` (each rANS step's words read before its table lookup);
* ``gpu one by one``: ``gpu.decode_tensor`` per tensor, each its own copies, launches and wait: what
  ``from_pretrained`` would pay without its batches (it decodes alone only a tensor whose stored name the model
  renames).

MB/s counts original bytes. The first ``gpu`` pass compiles the kernels and is not timed. ``--synthetic`` also
times the user's path on a model that fills a GPU (:func:`bench_synthetic`): ``from_pretrained(folder,
device_map=...)`` decoding on the device in batches, against decoding on the CPU and moving, and against the
dense folder.

    .venv/bin/python bench/lossless_gpu.py                                  # smollm2-135m, bf16
    .venv/bin/python bench/lossless_gpu.py --models minilm-l6,gemma3-270m --dtypes bf16,fp16 --folders
    TRITON_INTERPRET=1 .venv/bin/python bench/lossless_gpu.py --device cpu --max-mb 0.05 --reps 1  # a dry run
    .venv/bin/python bench/lossless_gpu.py --models '' --synthetic 16x2048      # from_pretrained onto the GPU only

On a GPU machine that lacks the bundled models (the device tool's: nothing can be fetched there, 64 MiB
travel with the tree; torch, Triton, numba, xxhash and safetensors are there, zstandard is not), write
payloads here (the same tensors in both chunk sizes) and carry them with the zstandard wheel:

    echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    for c in 1048576 65536; do .venv/bin/python bench/lossless_gpu.py --models minilm-l6 --max-mb 60 \\
        --chunks $c --write-payload .gpu/minilm-bf16-60mb-c$c.safetensors; done     # 19.7 MB each
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0

then, in one call (carry ``.gpu`` and ``.whl``), the tests on the device and the measurement:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    export PYTHONPATH=/tmp/site:$PWD/src && \\
    UNWEIGHT_TEST_DEVICE=cuda TRITON_INTERPRET=0 python3 -m pytest -q tests/test_lossless_gpu.py; \\
    python3 bench/lossless_gpu.py --payload .gpu/*.safetensors --synthetic 16x2048 --out $OUT/lossless_gpu.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lossless import DTYPES, THREADS, load_model, subset  # noqa: E402

from unweight.lossless import decode_tensors, encode_tensors  # noqa: E402


def timed(fn, reps: int, device: str) -> tuple[float, dict]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best, out = float("inf"), None
    for _ in range(reps):
        out = None
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def encoded(model: str, dtype: str, max_mb: float | None, chunk: int) -> tuple[dict, dict]:
    """(parts, original tensors) of a bundled model cast to ``dtype``, in chunks of ``chunk`` values."""
    from unweight.lossless import format as fmt
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in subset(load_model(model), max_mb).items()}
    old, fmt.CHUNK_WEIGHTS = fmt.CHUNK_WEIGHTS, chunk
    try:
        enc = encode_tensors(tensors, THREADS)
    finally:
        fmt.CHUNK_WEIGHTS = old
    return {k + s: v for k, p in enc.items() for s, v in p.items()}, tensors


def measure(label: dict, parts: dict, reps: int, device: str, tensors: dict | None = None) -> dict:
    """The ways onto the device, timed, each output compared bit for bit with ``tensors`` (default: the
    CPU decoder's, every chunk's checksum checked)."""
    from unweight.lossless import format as fmt
    from unweight.lossless import gpu
    names = fmt.encoded_names(parts)
    tensors = tensors if tensors is not None else decode_tensors(parts, names, THREADS)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    size = sum(v.numel() * v.element_size() for v in parts.values())
    def on_gpu(prefetch: bool):
        def run():
            gpu.PREFETCH = prefetch
            return gpu.decode_tensors(parts, names, device)
        run()  # compiles the kernels
        return run

    runs = {
        "copy": lambda: {k: t.to(device) for k, t in tensors.items()},
        "cpu+copy": lambda: {k: t.to(device) for k, t in decode_tensors(parts, names, THREADS).items()},
        "gpu": on_gpu(False),
        "gpu prefetch": on_gpu(True),  # the rANS step's words read before its lookup
        # tensor by tensor: what from_pretrained would pay without its batches (each tensor its own launches)
        "gpu one by one": lambda: {n: gpu.decode_tensor(parts, n, device) for n in names},
    }
    prepared = [fmt.prepare(parts, n) for n in names]
    res = {**label, "raw_bytes": raw, "ratio": size / raw, "chunks": sum(p.nchunks for p in prepared),
           "tensors": len(names), "gpu_decoded": sum(map(gpu.supported, prepared))}
    for name, fn in runs.items():
        sec, out = timed(fn, reps, device)
        exact = all(torch.equal(out[k].cpu().view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())
        res[name] = {"seconds": sec, "MBps": raw / 1e6 / sec, "bit_exact": exact}
        print(f"  {' '.join(map(str, label.values()))} (ratio {size / raw:.4f}, {res['chunks']} chunks) {name:14s} "
              f"{sec * 1e3:9.1f} ms {raw / 1e6 / sec:9.0f} MB/s  bit-exact {exact}")
    best = min(res["gpu"]["seconds"], res["gpu prefetch"]["seconds"])
    res["gpu_vs_cpu+copy"] = res["cpu+copy"]["seconds"] / best
    return res


def bench_folder(model: str, reps: int, device: str, tmp: Path) -> dict:
    """The user's path: ``unweight compress --method lossless`` of the bundled HF folder, then its state dict
    on the device, by :func:`unweight.lossless.gpu.load_state_dict` against decoding on the CPU and copying."""
    from unweight.formats import compress_checkpoint, decode_tensors as folder_tensors
    from unweight.lossless import gpu
    from unweight.lossless.register import FORMAT, encode_parts
    from unweight.models import hf_folder
    comp = tmp / model
    compress_checkpoint(hf_folder(model), comp, FORMAT, encode_parts, {}, progress=False)
    gpu.load_state_dict(comp, device)  # compiles the kernels
    res = {"model": model, "folder_bytes": sum(f.stat().st_size for f in comp.glob("*.safetensors"))}
    for name, fn in {"folder cpu+copy": lambda: {k: t.to(device) for k, t in folder_tensors(comp).items()},
                     "folder gpu": lambda: gpu.load_state_dict(comp, device)}.items():
        sec, _ = timed(fn, reps, device)
        res[name] = {"seconds": sec}
        print(f"  {model} {name:16s} {sec * 1e3:9.1f} ms")
    return res


def bench_synthetic(layers: int, hidden: int, reps: int, device: str, tmp: Path) -> dict:
    """``from_pretrained(..., device_map=device)`` on a model big enough to fill a GPU, as a user loads one: a
    Llama of ``layers`` blocks of width ``hidden`` whose weights are drawn from N(0, 0.02^2) (not a trained
    model: its ratio is no claim; the timings are), saved in BF16 and compressed as ``unweight compress --method
    lossless`` does. Timed, best of ``reps`` after a warm-up (Triton compiles the kernels once): the folder
    decoded on the device (in batches of ``unweight.hf.BATCH_BYTES`` of parts), decoded on the CPU and moved
    (``UNWEIGHT_GPU_DECODE=0``), and the dense folder; the first two compared bit for bit with the third."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import unweight.hf as hf
    from unweight.formats import compress_checkpoint
    from unweight.lossless.register import FORMAT, encode_parts
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                      vocab_size=32000, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
             for k, s in shapes.items()}
    dense, comp = tmp / "dense", tmp / "comp"
    dense.mkdir()
    cfg.save_pretrained(dense)
    save_file(state, dense / "model.safetensors", {"format": "pt"})
    del state
    compress_checkpoint(dense, comp, FORMAT, encode_parts, {}, progress=False)
    raw = sum(s.numel() * 2 for s in shapes.values())
    res = {"layers": layers, "hidden": hidden, "raw_bytes": raw,
           "folder_ratio": sum(f.stat().st_size for f in comp.glob("*.safetensors")) / (dense / "model.safetensors")
           .stat().st_size}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def load(folder, on_gpu: bool):
        os.environ[hf.GPU_DECODE_ENV] = "1" if on_gpu else "0"
        sync()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, device_map=device)
        sync()
        return time.perf_counter() - t0, model.state_dict()

    load(comp, True)  # compiles the kernels
    ways = {"from_pretrained gpu": (comp, True), "from_pretrained cpu+move": (comp, False),
            "from_pretrained dense": (dense, True)}
    best, out = dict.fromkeys(ways, float("inf")), {}
    for _ in range(reps):
        for way, (folder, on_gpu) in ways.items():
            sec, out[way] = load(folder, on_gpu)
            best[way] = min(best[way], sec)
    os.environ.pop(hf.GPU_DECODE_ENV)
    ref = out["from_pretrained dense"]
    for way, sec in best.items():
        exact = all(torch.equal(out[way][k].view(torch.uint8), t.view(torch.uint8)) for k, t in ref.items())
        res[way] = {"seconds": sec, "MBps": raw / 1e6 / sec, "bit_exact": exact}
        print(f"  llama {layers} x {hidden} ({raw / 1e9:.2f} GB bf16, folder {res['folder_ratio']:.4f}) "
              f"{way:26s} {sec * 1e3:9.1f} ms  bit-exact {exact}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--dtypes", default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-mb", type=float, default=None, help="fp32 MB of weights per model (a quick look)")
    ap.add_argument("--chunks", default="1048576,65536",
                    help="values per chunk to encode with (the format's default 2^20; smaller: more chunks decoded "
                         "side by side on the GPU, 145 bytes more each)")
    ap.add_argument("--folders", action="store_true", help="also time loading a compressed HF folder")
    ap.add_argument("--synthetic", metavar="LAYERSxHIDDEN", help="also time from_pretrained onto the device on a "
                    "Llama of Gaussian weights of this size, e.g. 16x2048 (1.9 GB in bf16): no bundled model needed")
    ap.add_argument("--write-payload", metavar="FILE", help="write the first model's parts (first dtype and chunk "
                    "size) to FILE and stop: what a GPU machine without the bundled models measures")
    ap.add_argument("--payload", nargs="+", metavar="FILE", help="measure these written payloads instead of models")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lossless_gpu.json"))
    args = ap.parse_args()
    if args.write_payload:
        from safetensors.torch import save_file
        model, dtype, chunk = args.models.split(",")[0], args.dtypes.split(",")[0], int(args.chunks.split(",")[0])
        parts, _ = encoded(model, dtype, args.max_mb, chunk)
        save_file(parts, args.write_payload, {"model": model, "dtype": dtype, "chunk": str(chunk)})
        print(f"wrote {args.write_payload}: {sum(v.numel() * v.element_size() for v in parts.values()) / 1e6:.1f} MB")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the GPU decoder's speed needs one (its tests run on the CPU in "
                         "Triton's interpreter)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report = {"device": name, "cpus": os.cpu_count(), "torch": torch.__version__, "results": []}
    for path in args.payload or []:
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as f:
            label = dict(f.metadata() or {}, payload=Path(path).name)
        report["results"].append(measure(label, load_file(path), args.reps, args.device))
    for model in [] if args.payload else [m for m in args.models.split(",") if m]:
        for dtype in args.dtypes.split(","):
            for chunk in map(int, args.chunks.split(",")):
                parts, tensors = encoded(model, dtype, args.max_mb, chunk)
                label = {"model": model, "dtype": dtype, "chunk": chunk}
                report["results"].append(measure(label, parts, args.reps, args.device, tensors))
        if args.folders and model != "minilm-l6":
            with tempfile.TemporaryDirectory() as tmp:
                report.setdefault("folders", []).append(bench_folder(model, args.reps, args.device, Path(tmp)))
    if args.synthetic:
        layers, hidden = map(int, args.synthetic.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            report["synthetic"] = bench_synthetic(layers, hidden, args.reps, args.device, Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
