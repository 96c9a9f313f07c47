"""The GPU decoder (``unweight.lossless.gpu``) on a CUDA device, against what a loader does without it.

For each model and dtype (bf16, fp16, fp32, fp8_e4m3), the tensors are encoded once on the CPU; then, best
of ``--reps`` in one process, each of these puts the whole model on the device, bit-exact (checked after the
clock):

* ``copy``: the original tensors copied to the device (what an uncompressed checkpoint costs once read);
* ``cpu+copy``: unweight's CPU decoder on all threads, then the copy;
* ``gpu``: the compressed streams copied, then decoded by the Triton kernels on the device.

MB/s counts original bytes. The first ``gpu`` pass compiles the kernels and is not timed.

    .venv/bin/python bench/lossless_gpu.py                                  # smollm2-135m, bf16
    .venv/bin/python bench/lossless_gpu.py --models minilm-l6,gemma3-270m --dtypes bf16,fp16 --folders
    TRITON_INTERPRET=1 .venv/bin/python bench/lossless_gpu.py --device cpu --max-mb 0.05 --reps 1  # a dry run
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


def bench(model: str, dtype: str, reps: int, device: str, max_mb: float | None, chunk: int) -> dict:
    from unweight.lossless import format as fmt
    from unweight.lossless import gpu
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in subset(load_model(model), max_mb).items()}
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    old, fmt.CHUNK_WEIGHTS = fmt.CHUNK_WEIGHTS, chunk
    try:
        enc = encode_tensors(tensors, THREADS)
    finally:
        fmt.CHUNK_WEIGHTS = old
    parts = {k + s: v for k, p in enc.items() for s, v in p.items()}
    size = sum(v.numel() * v.element_size() for v in parts.values())
    names = list(tensors)
    gpu.decode_tensors(parts, names, device)  # compiles the kernels
    runs = {
        "copy": lambda: {k: t.to(device) for k, t in tensors.items()},
        "cpu+copy": lambda: {k: t.to(device) for k, t in decode_tensors(parts, names, THREADS).items()},
        "gpu": lambda: gpu.decode_tensors(parts, names, device),
    }
    res = {"model": model, "dtype": dtype, "chunk": chunk, "raw_bytes": raw, "ratio": size / raw,
           "chunks": sum(-(-t.numel() // chunk) for t in tensors.values()), "tensors": len(names),
           "gpu_decoded": sum(gpu.supported(fmt.prepare(parts, n)) for n in names)}
    for name, fn in runs.items():
        sec, out = timed(fn, reps, device)
        exact = all(torch.equal(out[k].cpu().view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())
        res[name] = {"seconds": sec, "MBps": raw / 1e6 / sec, "bit_exact": exact}
        print(f"  {model} {dtype} chunks of {chunk:8d} (ratio {size / raw:.4f}) {name:9s} {sec * 1e3:9.1f} ms "
              f"{raw / 1e6 / sec:9.0f} MB/s  bit-exact {exact}")
    res["gpu_vs_cpu+copy"] = res["cpu+copy"]["seconds"] / res["gpu"]["seconds"]
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lossless_gpu.json"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: the GPU decoder's speed needs one (its tests run on the CPU in "
                         "Triton's interpreter)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report = {"device": name, "cpus": os.cpu_count(), "results": []}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for chunk in map(int, args.chunks.split(",")):
                report["results"].append(bench(model, dtype, args.reps, args.device, args.max_mb, chunk))
        if args.folders and model != "minilm-l6":
            with tempfile.TemporaryDirectory() as tmp:
                report.setdefault("folders", []).append(bench_folder(model, args.reps, args.device, Path(tmp)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
