"""Export a compressed folder to another library's format.

  unweight compress gemma3-270m out/gptq4 --method gptq --bits 4 --group-size 128
  unweight export out/gptq4 out/gptq4-ct            # compressed-tensors pack-quantized, for vLLM

compressed-tensors ``pack-quantized`` holds RTN and GPTQ results (integer zero points or symmetric;
groups that divide every input dimension), pruned-and-quantized ones (the sparsity structure is
recorded and N:M verified) and pruned ones (dense zeros). The levels and scales are copied as stored:
the compressed-tensors library decompresses the export to exactly the weights unweight loads. See
``unweight.export`` for what cannot be exported and why.
"""

import json

HELP = "export a compressed folder (rtn, gptq, pruned) as compressed-tensors pack-quantized (vLLM)"


def add_arguments(p):
    p.add_argument("src", help="a folder written by `unweight compress --method rtn|gptq|magnitude|wanda|sparsegpt`")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"],
                   help="target format (default: compressed-tensors, pack-quantized)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from dataclasses import asdict

    from unweight.export import export_compressed_tensors

    stats = export_compressed_tensors(args.src, args.out, overwrite=args.force)
    if args.json:
        print(json.dumps({"out": args.out, **asdict(stats)}, indent=2))
        return 0
    groups = "; ".join(f"{n}: {g['num_bits']}-bit {g['strategy']}"
                       f"{'' if g['group_size'] is None else ' ' + str(g['group_size'])}"
                       f" {'sym' if g['symmetric'] else 'asym'} x{g['modules']}" for n, g in stats.groups.items())
    sparsity = "" if stats.sparsity is None else (f", sparsity {stats.sparsity['sparsity_structure']} "
                                                  f"({stats.sparsity['global_sparsity']:.1%} of the pruned Linears)")
    print(f"{args.out}: compressed-tensors pack-quantized, {stats.quantized} quantized Linears "
          f"({groups or 'none'}){sparsity}, {stats.copied} tensors copied")
    return 0
