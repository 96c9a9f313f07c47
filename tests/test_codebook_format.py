"""The unweight-codebook format: K-means and RTN matrices stored as plain tensors, outliers kept exactly;
the indices or levels optionally rANS-coded (``compress --entropy``)."""

import contextlib
import io
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight.cli import main
from unweight.cluster.codebook import (KMeansSpec, RTNSpec, decode, encode_kmeans, encode_rtn, entropy_code,
                                       rtn_levels, stored_values)
from unweight.errors import UnweightError
from unweight.formats import compress_checkpoint, decode_tensors, load_state_dict, same_bits
from unweight.lossless import rans, symbols
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
    assert select_outliers(w, "z20").tolist() == [101]  # only the planted one clears z >= 20
    auto = select_outliers(w, "auto")
    assert torch.equal(auto, select_outliers(w, "z4")) and 101 in auto.tolist()
    z = (w - w.median()).abs() / (1.4826 * (w - w.median()).abs().median())
    assert auto.numel() == int((z >= 4).sum()) < 10  # a Gaussian bulk puts ~6e-5 of its weights there
    assert select_outliers(w, "z0.5").numel() == 100  # capped at 1% of the matrix
    assert parse_outliers("z6") == "z6"
    for bad in ("lots", "z", "z-1", "zz"):
        with pytest.raises(UnweightError):
            parse_outliers(bad)


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
    loaded = load_state_dict(tmp_path / "out")  # a format without decode_on: tensor by tensor, the same
    assert list(loaded) == list(dense) and all(same_bits(loaded[k], t) for k, t in dense.items())


# --- entropy-coded indices and levels (unweight.lossless.symbols, compress --entropy) ---------------

def _stream_overhead(numel: int) -> int:
    """What a symbol stream may cost beyond bit-packing: header, padding, and per chunk an offset,
    a mode and a checksum (plus the first offset)."""
    nchunks = -(-numel // symbols.CHUNK_SYMBOLS)
    return 8 * len(symbols.HEAD_FIELDS) + rans.STREAM_PAD + 8 + 17 * nchunks


def _skewed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Indices 0..k-1 with geometric frequencies (p halves per index): entropy well below log2 k."""
    g = torch.Generator().manual_seed(seed)
    p = 0.5 ** torch.arange(k, dtype=torch.float64)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g).to(torch.uint8)


@pytest.mark.parametrize("k", [2, 3, 16, 256])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 129), (70, 1000)])
def test_entropy_coded_kmeans_decodes_bit_exact(k, shape):
    w = _matrix(*shape, seed=k)
    if k == 256 and w.numel() > 10_000:
        w = _matrix(70, 1000, seed=k)[:, :200]  # K=256 clustering is slow; still 14000 values
    packed = encode_kmeans(w, KMeansSpec(k=k, outliers=1 if w.numel() > 1 else None))
    coded = entropy_code(packed, "w")
    assert "indices" not in coded and "indices_rans_code" in coded
    assert same_bits(decode(coded, "w"), decode(packed, "w"))
    assert torch.equal(stored_values(coded, "w"), stored_values(packed, "w"))
    assert entropy_code(coded, "w") is coded  # idempotent


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (9, 300), (66, 1024)])
def test_entropy_coded_rtn_levels_decode_bit_exact(bits, shape):
    w = _matrix(*shape, seed=bits)
    packed = encode_rtn(w, RTNSpec(bits=bits, group_size=64))
    coded = entropy_code(packed, "w")
    assert "q" not in coded and "q_rans_head" in coded
    assert torch.equal(rtn_levels(coded, "w").q, rtn_levels(packed, "w").q)
    assert same_bits(decode(coded, "w"), decode(packed, "w"))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 140_000), st.integers(1, 8), st.booleans(), st.integers(0, 2**31))
def test_symbol_stream_round_trips_and_never_costs_more_than_packing_plus_overhead(n, width, skew, seed):
    k = 1 << width
    if skew:
        x = _skewed(n, k, seed) if n else torch.zeros(0, dtype=torch.uint8)
    else:
        x = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    parts = symbols.encode_symbols(x, width)
    assert torch.equal(symbols.decode_symbols(parts, n, "t"), x)
    assert symbols.stream_nbytes(parts) <= packed_nbytes(n, width) + _stream_overhead(n)


@pytest.mark.parametrize("k", [2, 4, 16, 256])
def test_entropy_coding_is_strictly_smaller_on_skewed_indices_and_near_their_entropy(k):
    n = 200_000
    x = _skewed(n, k)
    bits = max(1, (k - 1).bit_length())
    parts = symbols.encode_symbols(x, bits)
    counts = torch.bincount(x.long(), minlength=k).double()
    p = counts[counts > 0] / n
    entropy_bytes = float(-(p * p.log2()).sum()) * n / 8
    size = symbols.stream_nbytes(parts)
    assert size < packed_nbytes(n, bits)
    assert size <= 1.01 * entropy_bytes + _stream_overhead(n) + rans.STATE_BYTES + 2 * k  # + states, tables


def test_a_constant_stream_costs_almost_nothing():
    for value in (0, 7, 255):
        x = torch.full((300_000,), value, dtype=torch.uint8)
        parts = symbols.encode_symbols(x, 8)
        assert torch.equal(symbols.decode_symbols(parts, x.numel(), "t"), x)
        assert symbols.stream_nbytes(parts) < 600


def test_entropy_coded_matrix_counts_every_part_and_beats_packing_when_skewed():
    w = _matrix(100, 1000, dtype=torch.float32)
    packed = encode_kmeans(w, KMeansSpec(k=16))
    coded = entropy_code(packed, "w")
    header_growth = coded["header"].numel() - packed["header"].numel()
    assert _nbytes(coded) <= _nbytes(packed) + _stream_overhead(w.numel()) + header_growth
    # Gaussian weights: the outer clusters are rarely used, so coding the indices pays
    assert _nbytes(coded) < _nbytes(packed)


@pytest.fixture(scope="module")
def coded_matrix():
    """A K=16 matrix of two chunks of indices (both coded), entropy-coded."""
    w = _matrix(symbols.CHUNK_SYMBOLS // 1000 + 30, 1000, dtype=torch.float32)
    return entropy_code(encode_kmeans(w, KMeansSpec(k=16)), "layer.w")


def test_corrupt_or_truncated_index_streams_raise_naming_the_tensor(coded_matrix):
    parts = coded_matrix
    code, offsets = parts["indices_rans_code"], parts["indices_rans_offsets"]
    assert parts["indices_rans_modes"].tolist() == [0, 0]  # both chunks coded
    flip = lambda t, i: torch.cat([t[:i], t[i:i + 1] ^ 0x5A, t[i + 1:]])  # noqa: E731
    bad = {
        "first chunk byte": ("indices_rans_code", flip(code, 40)),
        "second chunk byte": ("indices_rans_code", flip(code, int(offsets[1]) + 100)),
        "truncated": ("indices_rans_code", code[:-40]),
        "states": ("indices_rans_code", flip(code, 3)),
        "offsets": ("indices_rans_offsets", torch.tensor([0, int(offsets[1]) - 4, int(offsets[2])])),
        "offsets short": ("indices_rans_offsets", offsets[:2]),
        "modes": ("indices_rans_modes", torch.tensor([0, 1], dtype=torch.uint8)),
        "checksum": ("indices_rans_check", parts["indices_rans_check"] ^ 1),
        "tables": ("indices_rans_tables", flip(parts["indices_rans_tables"], 2)),
        "head": ("indices_rans_head", parts["indices_rans_head"] + torch.eye(9, dtype=torch.int64)[2]),
        "dtype": ("indices_rans_offsets", offsets.to(torch.int32)),
    }
    for field, value in bad.values():
        with pytest.raises(UnweightError, match="'layer.w'"):
            decode({**parts, field: value}, "layer.w")
    for field in ("indices_rans_code", "indices_rans_head", "indices_rans_check"):
        missing = {k: v for k, v in parts.items() if k != field}
        with pytest.raises(UnweightError, match=field.removeprefix("indices_rans_")):
            decode(missing, "layer.w")
    with pytest.raises(UnweightError, match="chunk 1 of 2"):
        decode({**parts, "indices_rans_code": flip(code, int(offsets[1]) + 100)}, "layer.w")


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_any_flipped_byte_of_a_coded_segment_raises(coded_matrix, data):
    parts = coded_matrix
    code = parts["indices_rans_code"]
    i = data.draw(st.integers(0, int(parts["indices_rans_offsets"][-1]) - 1))
    x = data.draw(st.integers(1, 255))
    bad = code.clone()
    bad[i] ^= x
    with pytest.raises(UnweightError, match="'layer.w'.*chunk"):
        decode({**parts, "indices_rans_code": bad}, "layer.w")


@pytest.mark.parametrize("method", [["--method", "kmeans", "--k", "8", "--outliers", "2"],
                                    ["--method", "kmeans", "--k", "4", "--affine", "moments"],
                                    ["--method", "rtn", "--bits", "3", "--group-size", "16"]])
def test_compress_entropy_loads_to_the_same_weights(tiny_llama, tmp_path, method, one_thread):
    from transformers import AutoModelForCausalLM

    summaries = {}
    for tag, extra in {"packed": [], "coded": ["--entropy"]}.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["compress", str(tiny_llama), str(tmp_path / tag), *method, *extra,
                         "--threads", "1", "--json"]) == 0
        summaries[tag] = json.loads(out.getvalue())
    qc = json.loads((tmp_path / "coded" / "config.json").read_text())["quantization_config"]
    assert qc["entropy"] == "rans" and "entropy" not in summaries["packed"]["quantization_config"]
    dense = {tag: decode_tensors(tmp_path / tag) for tag in summaries}
    assert set(dense["packed"]) == set(dense["coded"])
    for name, t in dense["packed"].items():
        assert same_bits(dense["coded"][name], t), name
    models = {tag: AutoModelForCausalLM.from_pretrained(tmp_path / tag) for tag in summaries}
    coded_params = dict(models["coded"].named_parameters())
    for name, p in models["packed"].named_parameters():
        assert torch.equal(coded_params[name], p), name
    for name, p in coded_params.items():
        assert torch.equal(p.detach().to(dense["coded"][name].dtype), dense["coded"][name]), name
    header_growth = len(',"entropy":"rans"')
    for packed, coded in zip(*(summaries[t]["per_tensor"] for t in ("packed", "coded"))):
        numel = torch.Size(packed["shape"]).numel()
        assert coded["stored"] <= packed["stored"] + _stream_overhead(numel) + header_growth, packed["name"]


def test_entropy_needs_kmeans_or_rtn(tiny_llama, tmp_path, capsys):
    assert main(["compress", str(tiny_llama), str(tmp_path / "out"), "--method", "lossless", "--entropy"]) == 2
    err = capsys.readouterr().err
    assert "--entropy" in err and "'lossless'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
