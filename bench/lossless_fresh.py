"""Decode once in a fresh process, as a loader does: unweight against ZipNN on the same weights, one thread.

``bench/lossless.py`` decodes again and again in one process, best of its repetitions. There unweight's
outputs (one buffer per tensor) come back from memory the allocator recycles, while ZipNN's one buffer for
the whole model is mapped afresh at every call, so the two pay differently for output memory. Here each
method's payload is written to disk once; then each round starts one new process per method (alternating)
that reads its payload, loads its compiled code on something small (unweight: a 4096-value sample of every
tensor, as ``bench/lossless.py`` warms it; ZipNN: a small buffer), and times one decode of the whole model
into fresh memory, counting its page faults.

    .venv/bin/python bench/lossless_fresh.py                                # minilm-l6 in bf16, 5 rounds
    .venv/bin/python bench/lossless_fresh.py --model smollm2-135m --rounds 3
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lossless import DTYPES, blob, cpu, load_model, warm_sample, zipnn_codec  # noqa: E402


def prepare(model: str, dtype: str, work: Path) -> dict:
    """Both payloads on disk; the raw size and each method's compressed size."""
    from safetensors.torch import save_file

    from unweight.lossless.format import encode_streams
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in load_model(model).items()}
    parts, warm = {}, {}
    for k, t in tensors.items():
        parts.update({k + s: torch.from_numpy(v.copy()) for s, v in encode_streams(t, 1).items()})
        warm.update({k + s: torch.from_numpy(v.copy()) for s, v in encode_streams(warm_sample(t), 1).items()})
    save_file(parts, work / "unweight.safetensors")
    save_file(warm, work / "warm.safetensors")
    raw = bytearray(blob(tensors))  # ZipNN rewrites its input (see bench/lossless.py): a copy of its own
    packed = bytes(zipnn_codec(dtype, 1).compress(raw))
    (work / "zipnn.bin").write_bytes(packed)
    return {"raw_bytes": len(raw), "unweight_bytes": sum(v.numel() * v.element_size() for v in parts.values()),
            "zipnn_bytes": len(packed)}


def decode_once(method: str, dtype: str, work: Path) -> dict:
    """One timed decode of the whole model in this (fresh) process."""
    torch.set_num_threads(1)
    if method == "unweight":
        from safetensors.torch import load_file

        from unweight.lossless import decode_tensor
        from unweight.lossless.format import encoded_names
        warm = load_file(work / "warm.safetensors")
        for n in encoded_names(warm.keys()):
            decode_tensor(warm, n, threads=1)
        parts = load_file(work / "unweight.safetensors")
        names = encoded_names(parts.keys())

        def run():
            return {n: decode_tensor(parts, n, threads=1) for n in names}
    else:
        z = zipnn_codec(dtype, 1)
        z.decompress(z.compress(bytearray(b"\x01\x3f" * 4096)))
        data = (work / "zipnn.bin").read_bytes()

        def run():
            return z.decompress(data)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    nbytes = sum(t.numel() * t.element_size() for t in out.values()) if isinstance(out, dict) else len(out)
    return {"method": method, "seconds": seconds, "MBps": nbytes / 1e6 / seconds, "page_faults": faults}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])  # ZipNN's
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=None, help="a JSON file for the results")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(decode_once(args.child[0], args.dtype, Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="unweight-fresh-") as tmp:
        work = Path(tmp)
        sizes = prepare(args.model, args.dtype, work)
        runs = []
        for r in range(args.rounds):
            for method in ("unweight", "zipnn-0.5.4"):
                cmd = [sys.executable, __file__, "--dtype", args.dtype, "--child", method.split("-")[0], str(work)]
                res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                res.update(method=method, round=r + 1)
                runs.append(res)
                print(f"round {r + 1} {method:12s} {res['MBps']:7.0f} MB/s  {res['seconds'] * 1e3:6.1f} ms  "
                      f"{res['page_faults']:,} page faults", flush=True)
    for method in ("unweight", "zipnn-0.5.4"):
        mbps = sorted(x["MBps"] for x in runs if x["method"] == method)
        print(f"{method:12s} median {mbps[len(mbps) // 2]:.0f} MB/s (range {mbps[0]:.0f}-{mbps[-1]:.0f})")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "machine": cpu(),
                                              **sizes, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
