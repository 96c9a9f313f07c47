"""The unweight-layerwise format: what compress_layerwise made of each Linear (pruned, quantized or both)
comes back bit for bit, costs exactly the bits the format documents, and `unweight compress --method
wanda|gptq|...` writes a folder that transformers loads as the model compressed in memory."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
import torch
from torch import nn

from unweight.calibrate import STATS, LinearStats
from unweight.cli import main
from unweight.errors import UnweightError
from unweight.formats import decode_tensors, same_bits
from unweight.layerwise import COMPUTE_DTYPES, LayerwiseConfig, compress_layerwise, compress_linear
from unweight.layerwise_format import (decode, encode_linear, nm_mask_from_positions, nm_positions)
from unweight.pack import packed_nbytes
from unweight.prune.nm import nm_mask

ROWS, COLS = 24, 200  # groups of 64 leave a partial last group of 8 columns


pytestmark = pytest.mark.usefixtures("one_thread")


def _compressed(config: LayerwiseConfig, dtype=torch.bfloat16, seed=0):
    """A Linear with ``dtype``-exact random weights compressed by ``config`` (stats from random inputs,
    with a few loud channels), rounded to ``dtype`` as the CLI does: (artifacts, weight)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(COLS, ROWS, bias=False)
    linear.weight.data = (torch.randn(ROWS, COLS, generator=g) * 0.05).to(dtype).float()
    stats = LinearStats(COLS, frozenset(STATS))
    x = torch.randn(256, COLS, generator=g)
    x[:, :5] *= 20
    stats.add_batch(x)
    return compress_linear(linear, config, stats, weight_dtype=dtype), linear.weight.data


def _stored_bits(parts) -> int:
    return sum(8 * t.numel() * t.element_size() for f, t in parts.items() if f != "header")


CASES = {  # name: (config, bits per weight without the header, exactly)
    "magnitude 30%": (LayerwiseConfig(prune="magnitude", sparsity=0.3), 1 + 0.7 * 16),
    "wanda 2:4": (LayerwiseConfig(prune="wanda", pattern="2:4"), 0.5 * (2 + 16)),
    "sparsegpt 4:8": (LayerwiseConfig(prune="sparsegpt", pattern="4:8"), 0.5 * (3 + 16)),
    "rtn 3-bit g64": (LayerwiseConfig(quant="rtn", bits=3, group_size=64), None),
    "rtn 4-bit g64 sym": (LayerwiseConfig(quant="rtn", bits=4, group_size=64, scheme="sym"), None),
    "rtn 4-bit g64 asym_float": (LayerwiseConfig(quant="rtn", bits=4, group_size=64, scheme="asym_float"), None),
    "gptq 4-bit g64 act-order": (LayerwiseConfig(quant="gptq", bits=4, group_size=64, act_order=True), None),
    "gptq 4-bit g64 static groups": (LayerwiseConfig(quant="gptq", bits=4, group_size=64, static_groups=True), None),
    "gptq 2-bit per-channel": (LayerwiseConfig(quant="gptq", bits=2, group_size=-1), None),
    "awq 4-bit g64": (LayerwiseConfig(quant="awq", bits=4, group_size=64), None),
    "sparsegpt 2:4 + gptq 4-bit": (LayerwiseConfig(prune="sparsegpt", pattern="2:4", quant="gptq", bits=4,
                                                   group_size=64), None),
    "magnitude 50% + rtn 3-bit": (LayerwiseConfig(prune="magnitude", sparsity=0.5, quant="rtn", bits=3,
                                                  group_size=64), None),
}


def _expected_bits(config: LayerwiseConfig) -> float:
    """The module docstring's accounting for the quantized cases, on ROWS x COLS."""
    n_groups = 1 if config.group_size <= 0 else -(-COLS // config.group_size)
    zero_bits = {"asym_int": config.bits, "asym_float": 32, "sym": 0}[config.scheme]
    params = ROWS * n_groups * (32 + zero_bits) + (32 * COLS if config.quant == "awq" else 0)
    if config.prune is None:
        return config.bits + params / (ROWS * COLS)
    if config.pattern:  # N:M with N/M = 1/2 here
        return 0.5 * (2 + config.bits) + params / (ROWS * COLS)
    return 1 + (1 - config.sparsity) * config.bits + params / (ROWS * COLS)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact_and_costs_the_documented_bits(case, dtype):
    config, bits = CASES[case]
    a, w = _compressed(config, dtype)
    parts = encode_linear(a, w, config, dtype)
    out = decode(parts, "w")
    assert out.dtype == dtype and same_bits(out, w.to(dtype)) and torch.equal(out.float(), w)
    if config.prune and config.quant is None and dtype == torch.float32:
        bits += (0.7 if "30%" in case else 0.5) * 16  # the kept values are 32-bit, not 16
    expected = bits if bits is not None else _expected_bits(config)
    assert _stored_bits(parts) == pytest.approx(expected * ROWS * COLS, abs=8 * len(parts))  # whole bytes
    assert set(parts) >= {"header"} and ("values" in parts) == (config.quant is None)


PLANTED = [(3, 17), (20, 150)]  # (row, col): two super weights, ~100 sigma


@pytest.mark.parametrize("quant", ["rtn", "gptq", "awq"])
@pytest.mark.parametrize("prune", [None, "sparsegpt"])
def test_outliers_come_back_exactly_cost_their_bits_and_lower_the_output_error(quant, prune):
    if prune and quant == "awq":
        pytest.skip("AWQ does not combine with pruning")
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(ROWS, COLS, generator=g) * 0.05).to(torch.bfloat16).float()
    for r, c in PLANTED:
        w[r, c] = 5.0 if r % 2 else -5.0
    x = torch.randn(512, COLS, generator=g)
    stats = LinearStats(COLS, frozenset(STATS))
    stats.add_batch(x)
    errors = {}
    for outliers in (None, 2):
        config = LayerwiseConfig(prune=prune, pattern="2:4" if prune else None, quant=quant, bits=3,
                                 group_size=64, outliers=outliers)
        linear = nn.Linear(COLS, ROWS, bias=False)
        linear.weight.data = w.clone()
        a = compress_linear(linear, config, stats, weight_dtype=torch.bfloat16)
        parts = encode_linear(a, linear.weight.data, config, torch.bfloat16)
        out = decode(parts, "w")
        assert same_bits(out, linear.weight.data.to(torch.bfloat16))
        rows = [r for r, _ in PLANTED]  # the other rows' groups hold no outlier
        errors[outliers] = float(((x @ (out.float() - w)[rows].T) ** 2).mean())
        if outliers:
            assert sorted(a.outlier_idx.tolist()) == sorted(r * COLS + c for r, c in PLANTED)
            for r, c in PLANTED:
                assert out[r, c].item() == w[r, c].item()  # the super weights are kept exactly
            assert parts["outlier_idx"].dtype == torch.int32 and parts["outlier_val"].dtype == torch.bfloat16
            assert _stored_bits(parts) == without + 2 * (32 + 16)  # two indices and two values
        else:
            without = _stored_bits(parts)
            assert "outlier_idx" not in parts
    assert errors[2] < errors[None] / 3, errors  # 2:4 pruning error remains in both


def test_outliers_without_a_quantizer_are_refused():
    with pytest.raises(UnweightError, match="outliers are kept exactly by a quantizer"):
        LayerwiseConfig(prune="wanda", outliers="auto")


def test_nm_positions_round_trip_and_refuse_other_masks():
    g = torch.Generator().manual_seed(1)
    for n, m in [(2, 4), (1, 4), (4, 8), (3, 5)]:
        mask = nm_mask(torch.rand(6, 10 * m, generator=g), n, m)
        pos = nm_positions(mask, n, m)
        assert pos.shape == (6, 10, n) and bool((pos.diff(dim=2) > 0).all())
        assert torch.equal(nm_mask_from_positions(pos, n, m), mask)
    mask[0, :m] = True
    with pytest.raises(UnweightError, match="not exactly"):
        nm_positions(mask, n, m)


@pytest.mark.parametrize("field, damage, message", [
    ("q", lambda t: t[:-1], "truncated or corrupt"),
    ("scale", lambda t: t.half(), "truncated or corrupt"),
    ("zero", None, "'zero' is missing"),
    ("positions", lambda t: torch.zeros_like(t), "repeated positions"),
    ("header", lambda t: t[:5], "header"),
])
def test_corrupt_parts_name_the_tensor(field, damage, message):
    config = CASES["sparsegpt 2:4 + gptq 4-bit"][0]
    parts = encode_linear(*_compressed(config), config, torch.bfloat16)
    if damage is None:
        del parts[field]
    else:
        parts[field] = damage(parts[field])
    with pytest.raises(UnweightError, match=rf"'model.layers.0.mlp.up_proj.weight'.*{message}"):
        decode(parts, "model.layers.0.mlp.up_proj.weight")


def test_encode_refuses_what_would_not_come_back():
    config = CASES["wanda 2:4"][0]
    a, w = _compressed(config)
    w = w.clone()
    w[~a.mask] = 1.0  # the model holds something the artifacts do not describe
    with pytest.raises(UnweightError, match="would differ"):
        encode_linear(a, w, config, torch.bfloat16)
    config = CASES["magnitude 50% + rtn 3-bit"][0]
    a, w = _compressed(config)
    a.q[~a.mask] = (a.q[~a.mask] + 1) % 8  # a pruned weight off its zero point
    with pytest.raises(UnweightError, match="zero point"):
        encode_linear(a, w, config, torch.bfloat16)


# ----------------------------------------------------------------------------- the CLI, end to end

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]


def _cli(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(argv)
    assert rc == 0
    return json.loads(stdout.getvalue())


def _in_memory(folder, config: LayerwiseConfig):
    """The model compress_layerwise makes in memory from the same folder, windows and config."""
    from unweight.models import load_causal_lm

    # held in the dtype the forwards run in (bf16 forwards: held and run in bf16, as the CLI does)
    model, tok = load_causal_lm(str(folder), dtype=COMPUTE_DTYPES[config.compute_dtype])
    compress_layerwise(model, tok, config, weight_dtype=torch.bfloat16, progress=False)
    return model


def _param_bits(numel_rows_cols, config: LayerwiseConfig) -> int:
    rows, cols = numel_rows_cols
    if config.quant is None:  # 2:4 of bf16
        return rows * cols // 4 * 2 * (2 + 16)
    n_groups = -(-cols // config.group_size)
    return rows * cols * config.bits + 8 * (packed_nbytes(rows * n_groups, config.bits) + 4 * rows * n_groups)


@pytest.mark.parametrize("argv, config", [
    (["--method", "wanda", "--pattern", "2:4"], LayerwiseConfig(prune="wanda", pattern="2:4")),
    (["--method", "gptq", "--bits", "4", "--group-size", "16"], LayerwiseConfig(quant="gptq", bits=4, group_size=16)),
    (["--method", "gptq", "--bits", "4", "--group-size", "16", "--true-sequential"],
     LayerwiseConfig(quant="gptq", bits=4, group_size=16, true_sequential=True)),
    (["--method", "sparsegpt", "--sparsity", "0.5", "--compute-dtype", "bfloat16"],
     LayerwiseConfig(prune="sparsegpt", compute_dtype="bfloat16")),
])
def test_cli_output_loads_as_the_model_compressed_in_memory(tiny_llama, tmp_path, argv, config):
    from transformers import AutoModelForCausalLM

    import unweight  # noqa: F401  (registers the formats with transformers)
    from unweight.checkpoint import open_checkpoint

    out = tmp_path / "out"
    summary = _cli(["compress", str(tiny_llama), str(out), *argv, *CALIB, "--json"])
    config.n_samples, config.seq_len = 4, 32
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "unweight-layerwise" and qc["layerwise"]["pattern"] == config.pattern
    assert qc["layerwise"]["bits"] == config.bits and qc["calibration"]["samples"] == 4
    assert qc["layerwise"]["true_sequential"] == config.true_sequential
    assert qc["layerwise"]["compute_dtype"] == config.compute_dtype

    expected = _in_memory(tiny_llama, config)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    got = dict(loaded.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(got[name], p.float()), name
    assert decode_tensors(out)["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16

    # bits per weight: exactly the format's accounting plus the headers
    ckpt = open_checkpoint(out)
    rows = summary["per_tensor"]
    assert len(rows) == summary["encoded"] == 2 * 7
    header_bits = 0
    for r in rows:
        header_bits += 8 * ckpt.info(f"{r['name']}.lw.header").nbytes
        assert 8 * r["stored"] - 8 * ckpt.info(f"{r['name']}.lw.header").nbytes == _param_bits(r["shape"], config)
    weights = sum(r["shape"][0] * r["shape"][1] for r in rows)
    param_bits = sum(_param_bits(r["shape"], config) for r in rows)
    assert summary["bits_per_weight"] == pytest.approx((param_bits + header_bits) / weights, rel=1e-12)
    if config.quant is None:  # 2:4 of bf16: 1 bit of positions + 8 of values per weight, and the headers
        assert summary["bits_per_weight"] == pytest.approx(9 + header_bits / weights, rel=1e-12)
    # as files: the tensor bytes plus each file's 8-byte length and JSON header
    written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert summary["file_bytes"] == written > summary["stored_bytes"]
    assert summary["file_ratio"] == pytest.approx(written / summary["original_file_bytes"], rel=1e-12)


def test_cli_outliers_with_gptq_load_as_compressed_in_memory(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    import unweight  # noqa: F401

    out = tmp_path / "out"
    summary = _cli(["compress", str(tiny_llama), str(out), "--method", "gptq", "--bits", "3", "--group-size",
                    "16", "--outliers", "2", *CALIB, "--json"])
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["layerwise"]["outliers"] == 2 and "outliers 2" in qc["describe"]
    config = LayerwiseConfig(quant="gptq", bits=3, group_size=16, outliers=2, n_samples=4, seq_len=32)
    expected = _in_memory(tiny_llama, config)
    got = dict(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(got[name], p), name
    from unweight.checkpoint import open_checkpoint

    ckpt = open_checkpoint(out)
    for r in summary["per_tensor"]:  # two exact weights per matrix: an I32 index and a bf16 value each
        assert ckpt.info(f"{r['name']}.lw.outlier_idx").nbytes == 8
        assert ckpt.info(f"{r['name']}.lw.outlier_val").nbytes == 4


def test_a_gptq_recipe_gives_each_linear_its_own_width_and_outliers(tiny_llama, tmp_path):
    """Hybrid precision in one command: 2-bit down_proj in block 0, 8-bit q_proj with two exact
    weights in block 1, 4-bit g16 elsewhere; the folder loads as the same per-Linear compression
    made in memory, and every matrix costs what recipe.setting_bits says plus its header and outliers."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    import unweight  # noqa: F401
    from unweight.checkpoint import open_checkpoint
    from unweight.models import load_causal_lm
    from unweight.recipe import Recipe, dump, setting_bits

    special = {"model.layers.0.mlp.down_proj": {"bits": 2}, "model.layers.1.self_attn.q_proj": {"bits": 8, "outliers": 2}}
    recipe = Recipe(method="gptq", default={"bits": 4, "group_size": 16},
                    matrices={f"{m}.weight": {"group_size": 16, **s} for m, s in special.items()})
    path = dump(recipe, tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    summary = _cli(["compress", str(tiny_llama), str(out), "--recipe", str(path), *CALIB, "--json"])
    assert summary["method"] == "gptq" and (out / "recipe.yaml").exists()

    base = LayerwiseConfig(quant="gptq", bits=4, group_size=16, n_samples=4, seq_len=32)
    own = {m: replace(base, bits=s["bits"], outliers=s.get("outliers")) for m, s in special.items()}
    model, tok = load_causal_lm(str(tiny_llama))
    compress_layerwise(model, tok, base, weight_dtype=torch.bfloat16, progress=False,
                       config_for=lambda name: own.get(name, base))
    got = dict(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(got[name], p), name

    ckpt = open_checkpoint(out)
    for r in summary["per_tensor"]:
        settings = recipe.settings_for(r["name"])
        header = ckpt.info(f"{r['name']}.lw.header").nbytes
        extra = 2 * (4 + 2) if "outliers" in settings else 0
        expected = setting_bits("gptq", tuple(r["shape"]), settings) * r["shape"][0] * r["shape"][1] / 8
        assert r["stored"] - header - extra == pytest.approx(expected, abs=1), r["name"]


def test_a_truncated_part_in_a_folder_names_file_and_tensor(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    _cli(["compress", str(tiny_llama), str(out), "--method", "magnitude", "--sparsity", "0.4", "--json"])
    shard = out / "model.safetensors"
    tensors = load_file(shard)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[f"{name}.lw.values"] = tensors[f"{name}.lw.values"][:-3].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(UnweightError, match=rf"{out}.*{name}.*truncated"):
        decode_tensors(out)


@pytest.mark.parametrize("argv, message", [
    (["--method", "gptq", "--pattern", "2:4"], "go with a pruning method"),
    (["--method", "wanda", "--sparsity", "1.5"], "--sparsity must lie in (0, 1)"),
    (["--method", "wanda", "--pattern", "2-4"], "expected N:M"),
    (["--method", "wanda", "--pattern", "4:2"], "0 < N < M"),
    (["--method", "wanda", "--quant", "gptq", "--act-order", "--bits", "9"], "--bits must be in 1..8"),
    (["--method", "awq", "--act-order"], "--act-order goes with GPTQ"),
    (["--method", "rtn", "--static-groups"], "--static-groups goes with GPTQ"),
    (["--method", "kmeans", "--true-sequential"], "--true-sequential goes with a calibrated"),
    (["--method", "kmeans", "--pattern", "2:4"], "go with a pruning method"),
    (["--method", "magnitude", "--quant", "rtn", "--true-sequential"], "--true-sequential goes with a calibrated"),
    (["--method", "rtn", "--compute-dtype", "bfloat16"], "--compute-dtype goes with a calibrated"),
    (["--method", "kmeans", "--device", "cuda"], "--device goes with a calibrated"),
    (["--method", "wanda", "--device", "tpu9"], "--device 'tpu9': not a device name"),
    (["--method", "wanda", "--device", "mps"], "--device mps: only cpu and cuda are supported"),
    pytest.param(["--method", "gptq", "--device", "cuda"], "sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_requests_are_one_clear_line(tiny_llama, tmp_path, argv, message, capsys):
    rc = main(["compress", str(tiny_llama), str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_model_that_is_no_causal_lm_is_refused(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "encoder"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaModel"]}))
    rc = main(["compress", str(folder), str(tmp_path / "out"), "--method", "wanda"])
    err = capsys.readouterr().err
    assert rc == 2 and "LlamaModel is not a causal language model" in err


@pytest.mark.parametrize("config", [
    LayerwiseConfig(quant="gptq", bits=3, group_size=16, act_order=True),
    LayerwiseConfig(quant="awq", bits=4, group_size=16),
    LayerwiseConfig(prune="sparsegpt", pattern="2:4", quant="gptq", bits=4, group_size=16),
], ids=["gptq", "awq", "sparsegpt+gptq"])
def test_a_bf16_model_calibrated_in_float32_equals_the_float32_model(tiny_llama, config):
    """Holding the model in bfloat16 (half the memory) and computing each block in float32 gives the
    float32 model's result bit for bit, artifacts included."""
    from unweight.models import load_causal_lm

    results = []
    for hold, compute in ((None, None), (torch.bfloat16, torch.float32)):
        model, tok = load_causal_lm(str(tiny_llama), dtype=hold)
        artifacts = {}
        compress_layerwise(model, tok, config, n_samples=4, seq_len=32, artifacts=artifacts,
                           weight_dtype=torch.bfloat16, progress=False, compute_dtype=compute)
        results.append(({n: p.float() for n, p in model.named_parameters()}, artifacts))
        if hold is not None:
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    (w32, a32), (w16, a16) = results
    assert w32.keys() == w16.keys() and all(torch.equal(w32[n], w16[n]) for n in w32)
    assert a32.keys() == a16.keys() and len(a32) == 14
    for name in a32:
        for field in ("mask", "q", "scale", "zero", "input_scale"):
            x, y = getattr(a32[name], field), getattr(a16[name], field)
            assert (x is None and y is None) or torch.equal(x, y), (name, field)


def test_calibrating_in_float32_gives_each_tensor_its_own_dtype_back(tiny_llama):
    """A block that mixes dtypes (a norm kept in float32 in a bf16 model) keeps them after
    run_layerwise(compute_dtype=float32) casts it up to compute."""
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(tiny_llama), dtype=torch.bfloat16)
    norm = model.model.layers[0].input_layernorm
    norm.weight.data = norm.weight.data.float()
    compress_layerwise(model, tok, LayerwiseConfig(quant="gptq", bits=4, group_size=16), n_samples=2, seq_len=16,
                       weight_dtype=torch.bfloat16, progress=False, compute_dtype=torch.float32)
    assert norm.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_bf16_forwards_need_a_bf16_checkpoint(tiny_causal_lm, tmp_path, capsys):
    """A float32 checkpoint is refused (its blocks cast down and back would lose their norms' low
    bits), and so is a float32 model in memory; nothing is written."""
    from unweight.models import load_causal_lm

    out = tmp_path / "out"
    rc = main(["compress", str(tiny_causal_lm), str(out), "--method", "wanda", "--compute-dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a bfloat16 checkpoint; its matrices are torch.float32" in err and not out.exists()
    model, tok = load_causal_lm(str(tiny_causal_lm))
    with pytest.raises(UnweightError, match="the blocks would run in torch.float32"):
        compress_layerwise(model, tok, LayerwiseConfig(prune="wanda", compute_dtype="bfloat16"), n_samples=2,
                           seq_len=16, progress=False)
    held, _ = load_causal_lm(str(tiny_causal_lm), dtype=torch.bfloat16)  # and the config is what runs
    with pytest.raises(UnweightError, match="compute_dtype is float32 but the blocks would run in torch.bfloat16"):
        compress_layerwise(held, tok, LayerwiseConfig(prune="wanda"), n_samples=2, seq_len=16, progress=False)


def test_bf16_forwards_keep_float32_statistics_and_nearly_the_same_result(tiny_llama):
    """Forwards in bf16 change the activations by bf16's rounding only: the Hessians agree with the
    float32 forwards' to a few percent (they are summed in float32 either way), and so do the masks
    SparseGPT draws from them, while the 50% sparsity is exact."""
    from unweight.calibrate import calibration_windows, run_layerwise
    from unweight.models import load_causal_lm

    got = {}
    for compute, dtype in COMPUTE_DTYPES.items():
        model, tok = load_causal_lm(str(tiny_llama), dtype=dtype)
        windows = calibration_windows(tok, 4, 32, seed=0)
        hessians = {}

        def keep(index, name, linear, stats, hessians=hessians):
            hessians[index, name] = stats.hessian
        run_layerwise(model, windows, keep, stats=("hessian",), progress=False)
        config = LayerwiseConfig(prune="sparsegpt", n_samples=4, seq_len=32, compute_dtype=compute)
        artifacts = {}
        compress_layerwise(model, tok, config, artifacts=artifacts, progress=False)
        got[dtype] = hessians, artifacts
    (h32, a32), (h16, a16) = got[torch.float32], got[torch.bfloat16]
    assert h32.keys() == h16.keys() and len(h32) == 14
    for key in h32:
        assert h16[key].dtype == torch.float32
        assert (h16[key] - h32[key]).norm() < 0.05 * h32[key].norm(), key
    for name in a32:
        assert a16[name].mask.float().mean() == 0.5
        assert (a16[name].mask == a32[name].mask).float().mean() > 0.9, name
