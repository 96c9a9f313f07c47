"""Convert any supported checkpoint into a standard Hugging Face folder in one float dtype.

GGUF files are dequantized tensor by tensor (transformers' own name mapping and fix-ups) and written
with the streaming writer, so peak memory is about the largest tensor; config and tokenizer come from
transformers' GGUF readers. HF folders and safetensors files are re-cast, and their side files
(config, tokenizer, generation config) copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tqdm import tqdm

from unweight.checkpoint import CheckpointWriter, GgufCheckpoint, open_checkpoint
from unweight.errors import UnweightError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "vocab.txt", "merges.txt", "vocab.json",
              "chat_template.jinja", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UnweightError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy config/tokenizer files (everything but weights) from one HF folder to another."""
    for rel in SIDE_FILES:
        if (src_dir / rel).exists():
            (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src_dir / rel, dst_dir / rel)


def convert(src: str | Path, out: str | Path, dtype: str = "bf16", overwrite: bool = False,
            progress: bool = True) -> Path:
    """Write ``src`` (GGUF, safetensors or HF folder) as an HF folder at ``out`` with floats in ``dtype``."""
    target = parse_dtype(dtype)
    if Path(out).exists() and not overwrite:  # before parsing a possibly large source
        raise UnweightError(f"{out}: already exists (pass --force to replace it)")
    ckpt = open_checkpoint(src)
    names = ckpt.names()
    with CheckpointWriter(out, overwrite=overwrite) as w:
        if isinstance(ckpt, GgufCheckpoint):
            from transformers import AutoTokenizer

            from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

            config = ckpt.hf_config()
            config.dtype = target
            config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__]
            config.save_pretrained(w.folder)
            try:
                tok = AutoTokenizer.from_pretrained(str(ckpt.path.parent), gguf_file=ckpt.path.name)
            except (KeyError, ValueError, OSError) as exc:
                raise UnweightError(f"{ckpt.path}: transformers cannot build a tokenizer from this GGUF: "
                                    f"{exc!r}") from None
            tok.save_pretrained(w.folder)
        elif ckpt.format == "hf":
            copy_side_files(ckpt.path, w.folder)
        for name in tqdm(names, desc=f"convert to {dtype}", unit="tensor", disable=not progress):
            t = ckpt.get_as(name, target)  # GGUF: dequantized into the target dtype block by block
            w.add(name, t)
            del t
    return Path(out)
