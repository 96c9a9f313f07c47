"""Tell what a model file or folder holds: format, tensors, dtypes, shapes, parameter counts, and what
transformers would do with it.

  unweight inspect smollm2-135m
  unweight inspect out/smollm2-bf16 --tensors
"""

import json
from collections import Counter

from unweight.checkpoint import open_checkpoint
from unweight.models import resolve

HELP = "show a model's format, tensors and what transformers would do with it"


def add_arguments(p):
    p.add_argument("model", help="bundled model name or path")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print JSON")


def describe(path) -> dict:
    ckpt = open_checkpoint(path)
    infos = [ckpt.info(n) for n in ckpt.names()]
    qc = (ckpt.config or {}).get("quantization_config") if ckpt.format == "hf" else None
    if ckpt.format == "gguf":
        loader = "transformers loads it with gguf_file=... and GgufConfig(dequantize=True) (float32)"
    elif ckpt.format == "hf" and qc and str(qc.get("quant_method", "")).startswith("unweight"):
        loader = (f"compressed by unweight ({qc['quant_method']}): load it after `import unweight`; "
                  "plain transformers would not decode these tensors")
    elif ckpt.format == "hf" and ckpt.config:
        loader = f"plain transformers loads it: {', '.join(ckpt.config.get('architectures') or ['?'])}"
    else:
        loader = "a bare safetensors file: safetensors.torch.load_file reads it; transformers needs a config"
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "tensors": len(infos),
        "parameters": sum(i.numel for i in infos),
        "dtypes": dict(Counter(i.dtype for i in infos)),
        "quantization_config": qc,
        "metadata": ckpt.metadata,
        "transformers": loader,
        "tensor_list": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in infos],
    }


def run(args) -> int:
    d = describe(resolve(args.model))
    if not args.tensors:
        d.pop("tensor_list")
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['path']}\n  format: {d['format']}\n  tensors: {d['tensors']}\n"
          f"  parameters: {d['parameters']:,}\n  dtypes: " + ", ".join(f"{k} x{v}" for k, v in d["dtypes"].items()))
    if d["quantization_config"]:
        print(f"  quantization_config: {json.dumps(d['quantization_config'])}")
    print(f"  transformers: {d['transformers']}")
    for t in d.get("tensor_list", []):
        print(f"    {t['name']:<60} {t['dtype']:<8} {tuple(t['shape'])}")
    return 0
