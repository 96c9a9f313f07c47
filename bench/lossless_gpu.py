"""The GPU decoder (``unweight.lossless.gpu``) on a CUDA device, against what a loader does without it.

For each model and dtype (bf16, fp16, fp32, fp8_e4m3), the tensors are encoded once on the CPU; then, best
of ``--reps`` in one process, each of these puts the whole model on the device, bit-exact (checked after the
clock):

* ``copy``: the original tensors copied to the device (what an uncompressed checkpoint costs once read);
* ``cpu+copy``: unweight's CPU decoder on all threads, then the copy;
* ``gpu``: the compressed streams copied, then decoded by the Triton kernels on the device;
* ``gpu prefetch``: the same with ``gpu.PREFETCH`` (each rANS step's words read before its table lookup);
* ``gpu scan`` (CUDA only): the same without ``gpu.BALLOT`` (the needy lanes ranked by a scan over the warp,
  not a vote);
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

``--rechunk`` measures a payload's tensors encoded again in other chunk sizes, ``--profile`` adds each kernel's
device time (and, with ``--synthetic``, where a load spends its time), ``--batch-mb`` other batch sizes for the
load.

On a GPU machine that lacks the bundled models (the device tool's: nothing can be fetched there, 64 MiB
travel with the tree; torch, Triton, numba, xxhash and safetensors are there, zstandard is not, and its
transformers was 5.17, older than the pinned one), write a payload here and carry it with the wheels:

    echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
    .venv/bin/python bench/lossless_gpu.py --models minilm-l6 --max-mb 60 --chunks 1048576 \\
        --write-payload .gpu/minilm-bf16-60mb-c1048576.safetensors                  # 19.7 MB
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl zstandard==0.25.0 transformers==5.24.0

then, in one call (carry ``.gpu`` and ``.whl``), ``bash bench/lossless_gpu_check.sh``: the tests on the device
(about four minutes there, most of it Triton compiling), then this bench with ``--rechunk 262144,65536
--profile --synthetic 16x2048 --batch-mb 256``.
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
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in subset(load_model(model), max_mb).items()}
    return chunked(tensors, chunk), tensors


def chunked(tensors: dict, chunk: int) -> dict:
    """``tensors`` encoded on all threads in chunks of ``chunk`` values, as one dict of parts."""
    from unweight.lossless import format as fmt
    old, fmt.CHUNK_WEIGHTS = fmt.CHUNK_WEIGHTS, chunk
    try:
        enc = encode_tensors(tensors, THREADS)
    finally:
        fmt.CHUNK_WEIGHTS = old
    return {k + s: v for k, p in enc.items() for s, v in p.items()}


def measure(label: dict, parts: dict, reps: int, device: str, tensors: dict | None = None,
            profile: bool = False) -> dict:
    """The ways onto the device, timed, each output compared bit for bit with ``tensors`` (default: the
    CPU decoder's, every chunk's checksum checked). With ``profile``, also the device time of each kernel in
    one ``gpu`` run, from ``torch.profiler``, and the time of each of the decoder's steps (:func:`inside`)."""
    from unweight.lossless import format as fmt
    from unweight.lossless import gpu
    names = fmt.encoded_names(parts)
    tensors = tensors if tensors is not None else decode_tensors(parts, names, THREADS)
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    size = sum(v.numel() * v.element_size() for v in parts.values())
    def on_gpu(prefetch: bool = False, ballot: bool = True, one_by_one: bool = False):
        def run():
            gpu.PREFETCH, gpu.BALLOT = prefetch, ballot
            if one_by_one:
                return {n: gpu.decode_tensor(parts, n, device) for n in names}
            return gpu.decode_tensors(parts, names, device)
        return run

    runs = {
        "copy": lambda: {k: t.to(device) for k, t in tensors.items()},
        "cpu+copy": lambda: {k: t.to(device) for k, t in decode_tensors(parts, names, THREADS).items()},
        "gpu": on_gpu(),
        "gpu prefetch": on_gpu(prefetch=True),  # the rANS step's words read before its lookup
        # tensor by tensor: what from_pretrained would pay without its batches (each tensor its own launches)
        "gpu one by one": on_gpu(one_by_one=True),
    }
    if device == "cuda":  # the interpreter always scans (the vote is PTX)
        runs["gpu scan"] = on_gpu(ballot=False)  # the needy lanes ranked by a scan over the warp, not a vote
    prepared = [fmt.prepare(parts, n) for n in names]
    res = {**label, "raw_bytes": raw, "ratio": size / raw, "chunks": sum(p.nchunks for p in prepared),
           "tensors": len(names), "gpu_decoded": sum(map(gpu.supported, prepared))}
    for name, fn in runs.items():
        try:
            fn()  # compiles the kernels
            sec, out = timed(fn, reps, device)
        except Exception as exc:  # a way that fails is reported, and the others still measured
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  {' '.join(map(str, label.values()))} {name:14s} FAILED {res[name]['error'][:300]}")
            continue
        exact = all(torch.equal(out[k].cpu().view(torch.uint8), t.view(torch.uint8)) for k, t in tensors.items())
        res[name] = {"seconds": sec, "MBps": raw / 1e6 / sec, "bit_exact": exact}
        print(f"  {' '.join(map(str, label.values()))} (ratio {size / raw:.4f}, {res['chunks']} chunks) {name:14s} "
              f"{sec * 1e3:9.1f} ms {raw / 1e6 / sec:9.0f} MB/s  bit-exact {exact}")
    gpu.PREFETCH, gpu.BALLOT = False, True
    best = min(res[w]["seconds"] for w in runs if w.startswith("gpu") and "seconds" in res[w] and "one" not in w)
    res["gpu_vs_cpu+copy"] = res["cpu+copy"]["seconds"] / best
    if profile:
        res["kernels"] = {w: kernel_times(runs[w]) for w in ("gpu", "gpu scan") if "seconds" in res.get(w, {})}
        res["host"] = inside(runs["gpu"])  # where the whole call's wall time goes
    return res


def inside(fn) -> dict:
    """Seconds that one call of ``fn`` spends inside the GPU decoder's steps (a step's time includes the steps it
    calls; ``_record`` waits for the kernels), from any thread, printed."""
    import threading

    import unweight.hf as hf
    from unweight.lossless import format as fmt
    from unweight.lossless import gpu, register
    steps = [(hf._Decoder, "decode"), (hf._Decoder, "_decode_ahead"), (register, "decode_on"), (gpu, "decode_tensors"),
             (gpu, "_decode_batch"), (fmt, "prepare"), (gpu, "_tables"), (gpu, "segments"), (gpu, "_upload"),
             (gpu, "_streams"), (gpu, "_record"), (gpu, "_hashes"), (gpu, "_checked")]
    spent, lock, saved = {}, threading.Lock(), [getattr(m, a) for m, a in steps]

    def timed_step(name, f):
        def call(*args, **kw):
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                with lock:
                    n, sec = spent.get(name, (0, 0.0))
                    spent[name] = (n + 1, sec + time.perf_counter() - t0)
        return call
    for (m, a), f in zip(steps, saved):
        setattr(m, a, timed_step(a, f))
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        for (m, a), f in zip(steps, saved):
            setattr(m, a, f)
    spent["(the whole call)"] = (1, time.perf_counter() - t0)
    print("    inside the GPU decoder, one call:")
    for name, (n, sec) in spent.items():
        print(f"    {sec * 1e3:9.1f} ms {n:5d} calls  {name}")
    return {name: {"calls": n, "seconds": sec} for name, (n, sec) in spent.items()}


def kernel_times(fn, cpu: bool = True) -> dict:
    """Device microseconds per kernel (and copy) in one call of ``fn``, the largest first, printed."""
    print("    device time, one run:")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] * cpu + [ProfilerActivity.CUDA]) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0) or 0
        if us > 0:
            times[ev.key] = {"us": us, "calls": ev.count}
    times = dict(sorted(times.items(), key=lambda kv: -kv[1]["us"]))
    for key, t in list(times.items())[:8]:
        print(f"    {t['us']:9.0f} us {t['calls']:4d} calls  {key[:90]}")
    return times


def bench_folder(model: str, reps: int, device: str, tmp: Path) -> dict:
    """The user's path: ``unweight compress --method lossless`` of the bundled HF folder, then its state dict
    on the device, by :func:`unweight.formats.load_state_dict` against decoding on the CPU and copying."""
    from unweight.formats import compress_checkpoint, decode_tensors as folder_tensors, load_state_dict
    from unweight.lossless.register import FORMAT, encode_parts
    from unweight.models import hf_folder
    comp = tmp / model
    compress_checkpoint(hf_folder(model), comp, FORMAT, encode_parts, {}, progress=False)
    load_state_dict(comp, device)  # compiles the kernels
    res = {"model": model, "folder_bytes": sum(f.stat().st_size for f in comp.glob("*.safetensors"))}
    for name, fn in {"folder cpu+copy": lambda: {k: t.to(device) for k, t in folder_tensors(comp).items()},
                     "folder gpu": lambda: load_state_dict(comp, device)}.items():
        sec, _ = timed(fn, reps, device)
        res[name] = {"seconds": sec}
        print(f"  {model} {name:16s} {sec * 1e3:9.1f} ms")
    return res


def bench_synthetic(layers: int, hidden: int, reps: int, device: str, tmp: Path, batches: list[int] = (),
                    profile: bool = False) -> dict:
    """``from_pretrained(..., device_map=device)`` on a model big enough to fill a GPU, as a user loads one: a
    Llama of ``layers`` blocks of width ``hidden`` whose weights are drawn from N(0, 0.02^2) (not a trained
    model: its ratio is no claim; the timings are), saved in BF16 and compressed as ``unweight compress --method
    lossless`` does. Timed, best of ``reps`` after a warm-up (Triton compiles the kernels once): the folder
    decoded on the device (in batches of ``unweight.hf``'s size for that device: ``GPU_BATCH_BYTES`` on CUDA,
    ``BATCH_BYTES`` on the CPU), decoded on the CPU and moved (``UNWEIGHT_GPU_DECODE=0``), and the dense folder;
    the first two compared bit for bit with the third. ``batches``: also the first way with that batch size set to
    each of these MB. With ``profile``, where one
    decoding load spends its time: in which of the GPU decoder's steps (:func:`inside`), and in which kernels
    and copies on the device."""
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
    ways = {"from_pretrained gpu": (comp, True, None), "from_pretrained cpu+move": (comp, False, None),
            "from_pretrained dense": (dense, True, None)}
    ways.update({f"from_pretrained gpu, batches of {mb} MB": (comp, True, mb << 20) for mb in batches})
    knob = "GPU_BATCH_BYTES" if device == "cuda" else "BATCH_BYTES"  # (hf._batch_bytes: the size on that device)
    best, out, default = dict.fromkeys(ways, float("inf")), {}, getattr(hf, knob)
    for _ in range(reps):
        for way, (folder, on_gpu, batch) in ways.items():
            setattr(hf, knob, batch or default)
            sec, out[way] = load(folder, on_gpu)
            best[way] = min(best[way], sec)
    setattr(hf, knob, default)
    if profile:
        res["host"] = inside(lambda: load(comp, True))
        if device == "cuda":
            res["kernels"] = kernel_times(lambda: load(comp, True), cpu=False)
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
    ap.add_argument("--batch-mb", default="", help="with --synthetic: also from_pretrained gpu with its batches "
                    "(unweight.hf.GPU_BATCH_BYTES on CUDA) set to each of these MB, e.g. 256,1024")
    ap.add_argument("--write-payload", metavar="FILE", help="write the first model's parts (first dtype and chunk "
                    "size) to FILE and stop: what a GPU machine without the bundled models measures")
    ap.add_argument("--payload", nargs="+", metavar="FILE", help="measure these written payloads instead of models")
    ap.add_argument("--rechunk", default="", help="also measure the first payload's tensors encoded here again in "
                    "chunks of these many values (comma-separated), e.g. 262144,16384,4096")
    ap.add_argument("--profile", action="store_true", help="also each kernel's device time in one gpu run")
    ap.add_argument("--profiled-once", action="store_true", help="decode the first payload once, after a warm-up, "
                    "between cudaProfilerStart and Stop, and stop: for `ncu --profile-from-start off`")
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
    if args.profiled_once:
        if args.device != "cuda" or not args.payload:
            raise SystemExit("--profiled-once is for ncu: it needs --payload and a CUDA device")
        return profiled_once(args.payload[0], args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report = {"device": name, "cpus": os.cpu_count(), "torch": torch.__version__, "results": []}
    for i, path in enumerate(args.payload or []):
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(path, "pt") as f:
            label = dict(f.metadata() or {}, payload=Path(path).name)
        parts = load_file(path)
        report["results"].append(measure(label, parts, args.reps, args.device, profile=args.profile))
        rechunk = [int(c) for c in args.rechunk.split(",") if c] if i == 0 else []
        if rechunk:
            from unweight.lossless import format as fmt
            tensors = decode_tensors(parts, fmt.encoded_names(parts), THREADS)
        for chunk in rechunk:
            label = dict(label, chunk=str(chunk), rechunked="here")
            report["results"].append(measure(label, chunked(tensors, chunk), args.reps, args.device, tensors,
                                             args.profile))
        save(report, args.out)
    for model in [] if args.payload else [m for m in args.models.split(",") if m]:
        for dtype in args.dtypes.split(","):
            for chunk in map(int, args.chunks.split(",")):
                parts, tensors = encoded(model, dtype, args.max_mb, chunk)
                label = {"model": model, "dtype": dtype, "chunk": chunk}
                report["results"].append(measure(label, parts, args.reps, args.device, tensors, args.profile))
                save(report, args.out)
        if args.folders and model != "minilm-l6":
            with tempfile.TemporaryDirectory() as tmp:
                report.setdefault("folders", []).append(bench_folder(model, args.reps, args.device, Path(tmp)))
    if args.synthetic:
        layers, hidden = map(int, args.synthetic.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            report["synthetic"] = bench_synthetic(layers, hidden, args.reps, args.device, Path(tmp),
                                                  [int(mb) for mb in args.batch_mb.split(",") if mb], args.profile)
    save(report, args.out)
    print(f"wrote {args.out}")


def profiled_once(path: str, device: str) -> None:
    """One ``gpu.decode_tensors`` of the payload at ``path``, its kernels compiled by a first call outside the
    profiler's range (``ncu --profile-from-start off`` profiles what lies inside)."""
    from safetensors.torch import load_file

    from unweight.lossless import format as fmt
    from unweight.lossless import gpu
    parts = load_file(path)
    names = fmt.encoded_names(parts)
    gpu.decode_tensors(parts, names, device)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    gpu.decode_tensors(parts, names, device)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"decoded {len(names)} tensors of {path} once inside the profiler's range")


def save(report: dict, out: str) -> None:
    """The report so far (a run cut short keeps what it measured)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
