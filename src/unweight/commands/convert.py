"""Convert a bundled model, GGUF, safetensors file or HF folder into a standard HF folder.

  unweight convert smollm2-135m out/smollm2-bf16 --dtype bf16

The output loads with transformers.AutoModelForCausalLM.from_pretrained(OUT). GGUF tensors are
dequantized one at a time (peak memory is about the largest tensor).
"""

from unweight.convert import DTYPES, convert
from unweight.models import resolve

HELP = "convert a model to a standard HF folder (bf16, fp16 or fp32)"


def add_arguments(p):
    p.add_argument("model", help="bundled model name or path (HF folder, .safetensors, .gguf)")
    p.add_argument("out", help="output folder")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="float dtype (default: bf16)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    out = convert(resolve(args.model), args.out, dtype=args.dtype, overwrite=args.force)
    print(out)
    return 0
