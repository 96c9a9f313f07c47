"""The unweight-codebook format: K-means and RTN matrices stored as plain tensors, outliers kept exactly."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight.cluster.codebook import KMeansSpec, RTNSpec, decode, encode_kmeans, encode_rtn
from unweight.errors import UnweightError
from unweight.formats import compress_checkpoint, decode_tensors, same_bits
from unweight.outliers import parse_outliers, select_outliers
from unweight.pack import packed_nbytes
from unweight.quant.rtn import rtn_fake_quantize
from unweight.targets import is_target


def _matrix(rows=48, cols=200, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _nbytes(parts):
    return sum(t.numel() * t.element_size() for t in parts.values())


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 70), st.integers(1, 12), st.sampled_from(["matrix", "row", "group:16"]))
def test_kmeans_with_k_at_least_distinct_values_is_lossless(rows, cols, distinct, gran):
    g = torch.Generator().manual_seed(rows * 131 + cols)
    levels = torch.randn(distinct, generator=g).bfloat16()
    w = levels[torch.randint(0, distinct, (rows, cols), generator=g)]
    parts = encode_kmeans(w, KMeansSpec(k=16, granularity=gran))
    out = decode(parts, "w")
    assert out.dtype == w.dtype and torch.equal(out, w)


@pytest.mark.parametrize("spec", ["2", "0.001", "auto"])
def test_outliers_come_back_bit_exact(spec):
    w = _matrix()
    w[5, 7], w[30, 199] = 60.0, -45.0  # planted super weights
    for parts in (encode_kmeans(w, KMeansSpec(k=4, outliers=parse_outliers(spec))),
                  encode_rtn(w, RTNSpec(bits=3, outliers=parse_outliers(spec)))):
        out = decode(parts, "w")
        idx = parts["outlier_idx"].long()
        assert {5 * 200 + 7, 30 * 200 + 199} <= set(idx.tolist())
        assert same_bits(out.reshape(-1)[idx], w.reshape(-1)[idx])


def test_keeping_a_planted_outlier_lowers_kmeans_error_elsewhere():
    w = _matrix(dtype=torch.float32)
    w[3, 3] = 80.0
    plain = decode(encode_kmeans(w, KMeansSpec(k=4)), "w")
    kept = decode(encode_kmeans(w, KMeansSpec(k=4, outliers=1)), "w")
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[3, 3] = False
    # without protection one of 4 centroids is spent on the outlier, so the bulk is served by 3
    assert (kept - w)[mask].norm() < 0.8 * (plain - w)[mask].norm()


def test_bits_accounting_adds_up():
    w = _matrix(rows=64, cols=576)
    parts = encode_kmeans(w, KMeansSpec(k=16, outliers=3))
    expected = (packed_nbytes(w.numel(), 4) + 16 * 4 + 3 * (4 + 2) + parts["header"].numel())
    assert _nbytes(parts) == expected
    parts = encode_rtn(w, RTNSpec(bits=4, group_size=128))
    groups = 64 * 5  # 576 = 4 x 128 + a remainder group of 64
    assert _nbytes(parts) == packed_nbytes(w.numel(), 4) + groups * (2 + 1) + parts["header"].numel()


def test_rtn_decodes_what_it_measured():
    """Levels are computed from the stored float16 scales, so decoding matches the float32-scale
    reference up to scale rounding, except where a value sits on a rounding boundary and moves one level."""
    w = _matrix(dtype=torch.float32)
    parts = encode_rtn(w, RTNSpec(bits=4, group_size=64))
    out = decode(parts, "w")
    ref = rtn_fake_quantize(w, 4, 64)
    step = parts["scale"].float().max()
    diff = (out - ref).abs()
    assert diff.max() <= 1.01 * step
    assert (diff > 0.01 * step).float().mean() < 0.01
    assert (out - w).norm() / w.norm() < 0.15


def test_more_bits_and_more_centroids_never_hurt():
    w = _matrix(dtype=torch.float32)
    errs = [(decode(encode_rtn(w, RTNSpec(bits=b)), "w") - w).norm() for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    errs = [(decode(encode_kmeans(w, KMeansSpec(k=k)), "w") - w).norm() for k in (2, 4, 16, 64)]
    assert errs == sorted(errs, reverse=True)


def test_corrupt_parts_raise_clear_errors():
    w = _matrix()
    parts = encode_kmeans(w, KMeansSpec(k=16, outliers=2))
    for field, bad in [("indices", parts["indices"][:-1]), ("codebook", parts["codebook"][:-1]),
                       ("header", torch.tensor([123, 34], dtype=torch.uint8)),
                       ("outlier_idx", torch.tensor([10**9, 0], dtype=torch.int32))]:
        with pytest.raises(UnweightError, match="'layer.w'"):
            decode({**parts, field: bad}, "layer.w")
    missing = dict(parts)
    del missing["indices"]
    with pytest.raises(UnweightError, match="indices"):
        decode(missing, "layer.w")


def test_outlier_selection_rules():
    w = _matrix(rows=100, cols=100, dtype=torch.float32)
    w[1, 1] = 50.0
    assert select_outliers(w, None).numel() == 0
    assert select_outliers(w, 5).numel() == 5
    assert select_outliers(w, 0.01).numel() == 100
    assert select_outliers(w, "auto").tolist() == [101]  # only the planted one clears z >= 20
    with pytest.raises(UnweightError):
        parse_outliers("lots")


def test_targets_are_block_linears_only_by_default():
    assert is_target("model.layers.3.mlp.down_proj.weight", (576, 1536))
    assert is_target("encoder.layer.0.attention.self.query.weight", (384, 384))
    assert not is_target("model.layers.3.input_layernorm.weight", (576,))
    assert not is_target("model.embed_tokens.weight", (49152, 576))
    assert is_target("model.embed_tokens.weight", (49152, 576), include_embeddings=True)
    assert not is_target("lm_head.weight", (49152, 576))


def test_compressed_folder_decodes_to_what_the_encoder_measured(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = {"model.layers.0.mlp.up_proj.weight": _matrix(64, 96),
               "model.layers.0.input_layernorm.weight": torch.ones(96, dtype=torch.bfloat16),
               "model.embed_tokens.weight": _matrix(50, 96, seed=1)}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text("{}")
    from unweight.cluster.codebook import FORMAT

    spec = KMeansSpec(k=8)
    encode = lambda n, t: encode_kmeans(t, spec) if is_target(n, tuple(t.shape)) else None  # noqa: E731
    stats = compress_checkpoint(src, tmp_path / "out", FORMAT, encode, {"k": 8}, progress=False)
    assert stats.encoded == 1 and stats.tensors == 3
    dense = decode_tensors(tmp_path / "out")
    assert set(dense) == set(tensors)
    assert same_bits(dense["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], decode(encode_kmeans(w, spec), "x"))
    assert len(torch.unique(dense["model.layers.0.mlp.up_proj.weight"])) <= 8
    assert stats.bits_per_weight == pytest.approx(8 * stats.encoded_stored_bytes / w.numel())
