"""CodebookLinear: the memory-saving load path gives the dense path's logits, bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from unweight.cluster.codebook import KMeansSpec, decode, encode_kmeans
from unweight.cluster.runtime import (CodebookLinear, clustered_from_parts, codebook_parts, decode_weight,
                                      swap_codebook_linears)
from unweight.errors import UnweightError
from unweight.targets import is_target

VOCAB = 96


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-block random Llama whose weights are bf16 values held in float32 (as loading does)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def encode_targets(model, spec: KMeansSpec) -> dict[str, dict]:
    """Parts of every block Linear weight, encoded from its bf16 values."""
    return {n: encode_kmeans(p.detach().bfloat16(), spec) for n, p in model.named_parameters()
            if is_target(n, tuple(p.shape))}


def load_dense(model, parts_by_name: dict[str, dict]) -> None:
    with torch.no_grad():
        for name, parts in parts_by_name.items():
            model.get_parameter(name).copy_(decode(parts, name).float())


@pytest.mark.parametrize("granularity", ["matrix", "row", "group:16"])
@pytest.mark.parametrize("outliers", [None, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_codebook_linear_logits_equal_dense(granularity, outliers, packed):
    spec = KMeansSpec(k=8, granularity=granularity, outliers=outliers)
    dense = tiny_llama()
    parts = encode_targets(dense, spec)
    load_dense(dense, parts)
    runtime = swap_codebook_linears(tiny_llama(), parts, packed=packed)
    swapped = [m for m in runtime.modules() if isinstance(m, CodebookLinear)]
    assert len(swapped) == len(parts) == 14
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(runtime(x).logits, dense(x).logits)


@pytest.mark.parametrize("granularity", ["matrix", "group:8"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
def test_codebook_linear_weight_is_the_format_decode(granularity, packed, entropy):
    from unweight.cluster.codebook import entropy_code

    w = (torch.randn(48, 40) * 0.02).bfloat16()
    w[3, 5] = 2.0  # a planted outlier, kept exactly
    parts = encode_kmeans(w, KMeansSpec(k=16, granularity=granularity, outliers=1))
    if entropy:  # rANS-coded indices (--entropy) load the same
        parts = entropy_code(parts, "w")
        assert "indices" not in parts
    m = CodebookLinear(clustered_from_parts(parts), packed=packed)
    assert torch.equal(m.weight, decode(parts, "w"))
    assert m.weight[3, 5] == 2.0


@pytest.mark.parametrize("packed", [False, True])
def test_codebook_linear_holds_indices_codebook_and_outliers_only(packed):
    w = (torch.randn(64, 48) * 0.02).bfloat16()
    m = CodebookLinear(clustered_from_parts(encode_kmeans(w, KMeansSpec(k=16, outliers=2))), packed=packed)
    held = sum(b.numel() * b.element_size() for b in m.buffers())
    index_bytes = w.numel() // 2 if packed else w.numel()  # 4 bits or one byte per weight
    assert held == index_bytes + 4 * 16 + 2 * (8 + 2)  # + float32 codebook + int64/bf16 outliers
    assert held < w.numel() * w.element_size()


def test_outliers_get_no_gradient():
    w = (torch.randn(8, 8) * 0.02).bfloat16()
    parts = encode_kmeans(w, KMeansSpec(k=4, outliers=2))
    cm = clustered_from_parts(parts)
    codebook = cm.codebook.clone().requires_grad_(True)
    out = decode_weight(codebook, cm.assignments, cm.granularity, torch.float32, cm.outlier_idx, cm.outlier_val)
    grad_w = torch.randn(8, 8)
    out.backward(grad_w)
    mask = torch.ones(64, dtype=torch.bool)
    mask[cm.outlier_idx] = False
    a = cm.assignments.reshape(-1).long()
    expected = torch.zeros(4).index_add_(0, a[mask], grad_w.reshape(-1)[mask])
    assert torch.allclose(codebook.grad[0], expected, atol=1e-6)


def test_bad_input_raises_one_clear_error():
    model = tiny_llama()
    parts = encode_targets(model, KMeansSpec(k=4))
    name = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(UnweightError, match="no module"):
        swap_codebook_linears(model, {"model.layers.9.mlp.up_proj.weight": parts[name]})
    with pytest.raises(UnweightError, match="does not match"):
        swap_codebook_linears(model, {"model.layers.0.mlp.up_proj.weight": parts[name]})
    with pytest.raises(UnweightError, match="header"):
        clustered_from_parts({k: v for k, v in parts[name].items() if k != "header"}, name)


def test_codebook_parts_reads_a_compressed_folder(tmp_path):
    from unweight.cluster.codebook import FORMAT
    from unweight.formats import compress_checkpoint

    model = tiny_llama()
    model.to(torch.bfloat16).save_pretrained(tmp_path / "src")
    spec = KMeansSpec(k=8, outliers=2)
    compress_checkpoint(tmp_path / "src", tmp_path / "out", FORMAT,
                        lambda n, t: encode_kmeans(t, spec) if is_target(n, tuple(t.shape)) else None,
                        {"method": "kmeans"}, progress=False)
    found = codebook_parts(tmp_path / "out")
    expected = encode_targets(tiny_llama(), spec)
    assert found.keys() == expected.keys()
    for name in found:
        assert torch.equal(decode(found[name], name), decode(expected[name], name))
