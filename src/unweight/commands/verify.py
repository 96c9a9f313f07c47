"""Check a compressed folder against the original, tensor by tensor, bit for bit.

  unweight verify out/smollm2-bf16 out/lossless

Prints the size ratio per tensor (with --tensors) and in total; exits 1 on any mismatch, missing or
extra tensor. For lossy formats it reports the relative error instead and exits 0.
"""

import json

from tqdm import tqdm

from unweight.checkpoint import open_checkpoint
from unweight.formats import get_format, group_parts, iter_decoded, quantization_config, same_bits
from unweight.models import hf_folder

HELP = "bit-exact check of a compressed folder against its original"
LOSSLESS = {"unweight-lossless"}


def add_arguments(p):
    p.add_argument("original", help="original model (bundled name or HF folder)")
    p.add_argument("compressed", help="compressed folder")
    p.add_argument("--tensors", action="store_true", help="print a line per tensor")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    orig = open_checkpoint(hf_folder(args.original))
    comp = open_checkpoint(args.compressed)
    qc = quantization_config(comp)
    groups = group_parts(comp.names(), get_format(qc["quant_method"]).tag)[0] if qc else {}
    exact = qc is None or qc["quant_method"] in LOSSLESS
    expected = set(orig.names())
    rows, bad = [], []
    seen = set()
    for name, t in tqdm(iter_decoded(comp), desc="verify", unit="tensor"):
        seen.add(name)
        if name not in expected:
            bad.append(f"{name}: not in the original")
            continue
        o = orig.get(name)
        ok = same_bits(o, t)
        err = 0.0 if ok else float(((o.float() - t.float()).norm() / o.float().norm().clamp_min(1e-30)).item()) \
            if o.shape == t.shape and o.is_floating_point() else float("inf")
        size = o.numel() * o.element_size()
        stored = sum(comp.info(n).nbytes for n in groups.get(name, [name]))
        rows.append({"name": name, "bit_exact": ok, "rel_error": err, "bytes": size, "stored": stored,
                     "ratio": stored / size if size else 1.0})
        if exact and not ok:
            bad.append(f"{name}: differs (relative error {err:.3g})")
    bad += [f"{n}: missing from the compressed folder" for n in sorted(expected - seen)]
    total, stored = sum(r["bytes"] for r in rows), sum(r["stored"] for r in rows)
    result = {"original": args.original, "compressed": args.compressed, "tensors": len(rows),
              "bit_exact": sum(r["bit_exact"] for r in rows), "ratio": stored / total if total else 1.0,
              "problems": bad}
    if args.json:
        print(json.dumps({**result, "per_tensor": rows}, indent=2))
    else:
        if args.tensors:
            for r in rows:
                print(f"  {r['name']:<60} {'ok' if r['bit_exact'] else 'DIFF'}  ratio {r['ratio']:.4f}"
                      + ("" if r["bit_exact"] else f"  rel.err {r['rel_error']:.3g}"))
        print(f"{result['bit_exact']}/{len(rows)} tensors bit-exact, total ratio {result['ratio']:.4f}")
        for b in bad:
            print(f"  MISMATCH {b}")
    return 1 if bad else 0
