"""Session fixtures: the real smollm2-135m (GGUF-loaded reference and its bf16 HF folder), a few windows
of the Austen evaluation split, and a builder of tiny GGUF files.

Each real model is loaded once per session. The window set is small on purpose (4 windows of 256
tokens): the protocol properties do not depend on the length, and a forward pass of the 135M model
scores only ~450 tokens/s on 2 cores.
"""

from __future__ import annotations

import os
from pathlib import Path

# The Triton sweeps' tests run the kernels on the CPU in Triton's interpreter, which is chosen when
# triton is first imported (its own jit helpers, tl.sum among them, are defined then)
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from hypothesis import settings

# Property tests run a fixed example sequence by default, so a run (CI's included) is reproducible;
# HYPOTHESIS_PROFILE=explore draws fresh examples each run to hunt for counterexamples.
settings.register_profile("fixed", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

from unweight.errors import UnweightError

MODEL = "smollm2-135m"
SEQ_LEN = 256
MAX_TOKENS = 4 * SEQ_LEN  # 4 windows, 1,020 scored tokens


def _require(what: str, load):
    """Run ``load``; skip (with the reason) when the real model or corpus is not installed here."""
    try:
        return load()
    except UnweightError as exc:
        pytest.skip(f"{what} unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled GGUF file of smollm2-135m."""
    from unweight.models import model_file

    return _require(MODEL, lambda: model_file(MODEL))


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_gguf) -> Path:
    """The cached bf16 HF folder converted from the GGUF (converted once, then reused from the cache)."""
    from unweight.models import hf_folder

    return hf_folder(MODEL, "bf16")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer): the GGUF as transformers loads it, float32: the reference of every comparison."""
    from unweight.models import load_causal_lm

    return load_causal_lm(MODEL)


@pytest.fixture(scope="session")
def smollm2_bf16_model(smollm2_bf16):
    """(model, tokenizer) loaded from the bf16 folder with plain transformers (float32 compute)."""
    from unweight.models import load_causal_lm

    return load_causal_lm(str(smollm2_bf16))


@pytest.fixture(scope="session")
def eval_docs() -> list[str]:
    """The documents of the Austen evaluation split."""
    from unweight.data import corpus, fetch

    _require("corpus austen", lambda: fetch("austen"))
    return corpus("austen", "eval")


@pytest.fixture(scope="session")
def windows(smollm2, eval_docs):
    """The protocol's first 4 windows of 256 tokens of the evaluation split, smollm2's tokenizer."""
    from unweight.eval import token_windows

    return token_windows(smollm2[1], eval_docs, SEQ_LEN, MAX_TOKENS)


@pytest.fixture(scope="session")
def base_result(smollm2, windows):
    """evaluate() of the GGUF model on ``windows`` (no base), computed once and shared."""
    from unweight.eval import evaluate

    model, tok = smollm2
    return evaluate(model, windows, tok, progress=False)


# -------------------------------------------------------------------------------- tiny GGUF files

TINY_VOCAB, TINY_HIDDEN, TINY_FFN, TINY_HEADS = 64, 256, 256, 2
TINY_BLOCK = ["attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
              "ffn_down"]


def make_tiny_gguf(path: Path, types: dict | None = None, tokenizer: bool = True) -> Path:
    """Write a one-layer llama GGUF with the keys transformers reads (config and, if ``tokenizer``, a
    byte-level BPE vocabulary). ``types`` maps GGUF tensor names to a ``GGMLQuantizationType`` to store
    them in (raw zero bytes of the right size); every other tensor is float32 noise."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES

    types = types or {}
    h, f, v = TINY_HIDDEN, TINY_FFN, TINY_VOCAB
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    for name in TINY_BLOCK:
        shape = (h,) if name.endswith("norm") else (f, h) if name in ("ffn_gate", "ffn_up") else \
            (h, f) if name == "ffn_down" else (h, h)
        shapes[f"blk.0.{name}.weight"] = shape

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(h)
    w.add_block_count(1)
    w.add_feed_forward_length(f)
    w.add_head_count(TINY_HEADS)
    w.add_head_count_kv(TINY_HEADS)
    w.add_rope_dimension_count(h // TINY_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(v)])
        w.add_token_scores([0.0] * v)
        w.add_token_types([1] * v)
        w.add_token_merges([])
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if name in types:
            block, block_bytes = GGML_QUANT_SIZES[types[name]]
            raw = np.zeros((*shape[:-1], shape[-1] // block * block_bytes), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=types[name])
        else:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def unsupported_gguf(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny GGUF holding tensors in types gguf 0.19.0 cannot dequantize: (path, {gguf name: type})."""
    from gguf import GGMLQuantizationType as Q

    types = {"token_embd.weight": Q.Q8_1, "blk.0.attn_v.weight": Q.Q8_K}
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-unsupported.gguf", types), types


def make_tiny_llama(folder: Path, dtype=None) -> Path:
    """A 2-block random Llama (hidden 32) saved at ``folder`` with smollm2's tokenizer (no download)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from unweight.models import hf_folder

    tokenizer_dir = _require("smollm2-135m", lambda: hf_folder("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    (model if dtype is None else model.to(dtype)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A 2-block random Llama in float32 (see :func:`make_tiny_llama`)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """The same tiny Llama saved in bfloat16."""
    import torch

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bf16"), torch.bfloat16)


@pytest.fixture
def one_thread():
    """Tiny models are dominated by per-op overhead, which extra threads only add to."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
