"""Decompress an unweight folder back into a plain HF folder (bit-exact for lossless formats).

  unweight decompress out/lossless out/restored
"""

from unweight.formats import decompress_checkpoint

HELP = "write the dense HF folder of a compressed one"


def add_arguments(p):
    p.add_argument("src", help="compressed folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    n = decompress_checkpoint(args.src, args.out, overwrite=args.force)
    print(f"{args.out}: {n} tensors")
    return 0
