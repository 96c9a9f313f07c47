"""Which tensors a lossy method touches: the Linear weights of the decoder (or encoder) blocks by default;
embeddings and the output head only when asked. Tied weights are stored once, so they are handled once.
The choice is recorded in the output's quantization_config."""

from __future__ import annotations

import re

BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks|block)\.\d+\.")
EMBEDDING = re.compile(r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings"
                       r"|embed_positions)\.weight$|(^|\.)lm_head\.weight$")


def is_target(name: str, shape: tuple[int, ...], include_embeddings: bool = False) -> bool:
    """True for 2-D ``*.weight`` tensors inside numbered blocks (and embeddings/head if asked)."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    if EMBEDDING.search(name):
        return include_embeddings
    return bool(BLOCK.search(name))
