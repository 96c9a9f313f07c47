"""Bundled models by name, offline: names resolve to files, bad names and missing packages say what to do,
and a GGUF tensor that gguf cannot dequantize is one clear error naming the file and the tensor."""

from __future__ import annotations

import importlib.metadata

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES

from unweight.checkpoint import open_checkpoint
from unweight.errors import UnweightError
from unweight.models import MODELS, hf_folder, load_causal_lm, model_file, resolve

NAMES = ", ".join(MODELS)


@pytest.mark.parametrize("call", [model_file, resolve, hf_folder, load_causal_lm])
def test_unknown_model_name_lists_the_bundled_names(call):
    with pytest.raises(UnweightError, match=f"unknown model 'smollm3-1b'; bundled models: {NAMES}"):
        call("smollm3-1b")


def test_a_missing_path_is_named():
    with pytest.raises(UnweightError, match="no/such/model.gguf: no such file"):
        resolve("no/such/model.gguf")


@pytest.mark.parametrize("name", list(MODELS))
def test_missing_package_names_the_pip_command(name, monkeypatch):
    def not_installed(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    install = MODELS[name].install
    with pytest.raises(UnweightError) as info:
        resolve(name)
    message = str(info.value)
    assert f"`pip install {install}`" in message and f"unweight fetch {name}" in message
    assert "\n" not in message


def test_a_folder_without_config_is_not_a_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(UnweightError, match="no config.json"):
        load_causal_lm(str(tmp_path))


def test_bundled_names_resolve_to_their_files(smollm2_gguf, smollm2_bf16):
    assert resolve("smollm2-135m") == smollm2_gguf and smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert resolve(str(smollm2_gguf)) == smollm2_gguf
    assert hf_folder(str(smollm2_bf16)) == smollm2_bf16  # an HF folder is used as it is
    assert hf_folder("smollm2-135m", "bf16") == smollm2_bf16  # the conversion is cached


# ----------------------------------------------------------------------- GGUF tensor types gguf lacks


def test_gguf_tensor_of_an_unsupported_type_is_named(unsupported_gguf):
    path, types = unsupported_gguf
    for t in types.values():  # precondition: gguf 0.19.0 really cannot dequantize these types
        block, block_bytes = GGML_QUANT_SIZES[t]
        with pytest.raises(NotImplementedError):
            gguf.quants.dequantize(np.zeros((1, block_bytes), np.uint8), t)

    ckpt = open_checkpoint(path)
    hf_names = {"token_embd.weight": "model.embed_tokens.weight",
                "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight"}
    for gguf_name, t in types.items():
        name = hf_names[gguf_name]
        assert ckpt.info(name).dtype == t.name  # listed, with its GGUF type, without being read
        with pytest.raises(UnweightError) as info:
            ckpt.get(name)
        message = str(info.value)
        assert str(path) in message and repr(gguf_name) in message and t.name in message
        assert "\n" not in message
    # the supported tensors of the same file still read, with transformers' names and shapes
    q = ckpt.get("model.layers.0.self_attn.q_proj.weight")
    assert q.dtype == torch.float32 and q.shape == (256, 256) and torch.isfinite(q).all()


def test_hf_folder_keeps_different_files_apart(tmp_path, monkeypatch):
    from conftest import make_tiny_gguf

    monkeypatch.setenv("UNWEIGHT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_tiny_gguf(tmp_path / "a" / "model.gguf")
    b = make_tiny_gguf(tmp_path / "b" / "model.gguf", types={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.F16})
    up = "model.layers.0.mlp.up_proj.weight"
    assert open_checkpoint(hf_folder(str(a), "fp32")).get(up).abs().sum() > 0  # float32 noise
    assert open_checkpoint(hf_folder(str(b), "fp32")).get(up).abs().sum() == 0  # b's zeros, not a's noise
