"""``unweight analyze`` end to end on the bundled fp32 encoder minilm-l6, calibrated by the cosine
distance of its sentence embeddings: analysis.json holds a row per tensor and the redundancy table,
the PNG plots exist, the super-weight candidates are ranked and the top ones measured, and bad
requests fail with one clear line."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from unweight.cli import main
from unweight.errors import UnweightError

MODEL = "minilm-l6"


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    from unweight.models import model_file

    try:
        model_file(MODEL)
    except UnweightError as exc:
        pytest.skip(f"{MODEL} unavailable: {exc}")
    import torch

    out = tmp_path_factory.mktemp("analyze")
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    try:  # one thread: small matrices, and far faster when other processes share the cores
        with contextlib.redirect_stdout(stdout):
            rc = main(["analyze", MODEL, "--out", str(out), "--calib", "--outliers", "--json",
                       "--quiet", "--calib-windows", "1", "--outlier-top", "2", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out, json.loads((out / "analysis.json").read_text()), stdout.getvalue()


def test_json_file_and_stdout_agree(analysis):
    out, result, stdout = analysis
    assert json.loads(stdout) == result
    assert result["model"] == MODEL and result["kind"] == "encoder"
    calib = result["calibration"]
    assert calib["probe"].startswith("sentence-embedding cosine") and calib["texts"] == 8


def test_every_tensor_has_a_row_with_the_documented_keys(analysis):
    from unweight.checkpoint import open_checkpoint

    _, result, _ = analysis
    names = open_checkpoint(result["path"]).names()
    rows = result["matrices"]
    assert [r["name"] for r in rows] == names
    matrices = [r for r in rows if len(r["shape"]) == 2 and r["dtype"] == "float32"]
    assert len(matrices) == result["redundancy"]["matrices"] == 40  # position_ids (int64) is no weight
    for r in matrices:
        for key in ("effective_rank", "effective_rank_ratio", "stable_rank", "r90", "r99",
                    "value_entropy", "exponent_entropy", "kurtosis", "outlier_fraction", "max_robust_z"):
            assert r[key] is not None, (r["name"], key)
        assert 0 < r["effective_rank_ratio"] <= 1
        assert r["r90"] <= r["r99"] <= r["full_rank"]
        assert r["dtype"] == "float32"


def test_redundancy_table_in_the_seeds_shape(analysis):
    _, result, _ = analysis
    table = result["redundancy"]
    floats = [r for r in result["matrices"] if r["dtype"] == "float32"]
    assert table["parameters"] == sum(r["numel"] for r in floats) == 22_713_216  # + 512 position_ids
    for key in ("mean_effective_rank", "mean_effective_rank_ratio", "weighted_mean_effective_rank_ratio",
                "spectral_redundancy_99", "value_entropy", "exponent_entropy"):
        assert table[key] is not None and table[key] > 0
    linears = [r for r in result["matrices"] if r.get("redundant_fraction") is not None]
    assert len(linears) == table["redundancy_matrices"] == 6 * 6  # q, k, v, o, up, down per block
    assert table["estimated_redundancy"] == pytest.approx(
        sum(r["numel"] * r["redundant_fraction"] for r in linears) / table["redundancy_parameters"])
    assert 0 <= table["estimated_redundancy"] <= 0.9


def test_plots_are_pngs(analysis):
    out, result, _ = analysis
    assert set(result["plots"]) == {"rank", "entropy", "sensitivity"}
    for name in result["plots"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outlier_candidates_are_ranked(analysis):
    _, result, _ = analysis
    candidates = result["outliers"]["candidates"]
    assert candidates
    z = [c["z"] for c in candidates]
    assert z == sorted(z, reverse=True)
    rows = {r["name"]: r for r in result["matrices"]}
    top = candidates[0]
    assert top["z"] == pytest.approx(max(rows[c["name"]]["max_robust_z"] for c in candidates), rel=1e-6)
    measured = [c for c in candidates if c.get("measured")]
    assert 2 <= len(measured) <= 4  # the top 2 overall plus the top 2 down-projections (output.dense)
    assert measured[0] is candidates[0]
    for c in measured:
        assert c["zero_increase"] is not None and c["clip_increase"] is not None


def test_report_prints_both_tables(analysis):
    from unweight.commands.analyze import print_report

    _, result, _ = analysis
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_report(result)
    assert "per-matrix statistics" in text.getvalue() and "redundancy table" in text.getvalue()
    assert "super-weight candidates" in text.getvalue()


@pytest.mark.parametrize("argv, message", [
    (["analyze", "no/such/model.safetensors"], "no/such/model.safetensors"),
    (["analyze", MODEL, "--outliers", "--calib-windows", "2", "--measure-windows", "3"], "--measure-windows"),
])
def test_bad_requests_are_one_clear_line(argv, message, capsys):
    rc = main(argv + ["--quiet", "--no-plots"])
    err = capsys.readouterr().err
    if "unavailable" in err or "not installed" in err:
        pytest.skip(err)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_calib_and_outliers_on_a_tiny_causal_lm(tiny_causal_lm, tmp_path):
    """The calibrated path end to end: every decoder Linear gets Wanda quantiles, Fisher and the
    zeroing sweep; the table gets the measured redundancy; candidates get evidence and effects."""
    import torch

    from unweight.analysis.sensitivity import REDUNDANCY_TOLERANCE

    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["analyze", str(tiny_causal_lm), "--calib", "--outliers", "--calib-windows", "2",
                       "--seq-len", "32", "--outlier-top", "2", "--out", str(out), "--quiet",
                       "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["kind"] == "causal-lm"
    linears = [r for r in result["matrices"] if r.get("zero10_relative") is not None]
    assert len(linears) == 2 * 7
    for r in linears:
        assert r["wanda_q10"] <= r["wanda_q50"] <= r["wanda_q99"]
        assert r["fisher_sum"] >= 0 and r["zero50_se"] >= 0
        assert r["redundant_fraction"] in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    table = result["redundancy"]
    total = sum(r["numel"] for r in linears)
    assert table["estimated_redundancy"] == pytest.approx(
        sum(r["numel"] * r["redundant_fraction"] for r in linears) / total)
    assert table["redundancy_tolerance"] == REDUNDANCY_TOLERANCE
    assert table["joint_wanda50_relative"] > 0  # every matrix half-pruned at once costs something
    assert table["joint_at_redundancy_relative"] is not None
    assert all(r["fisher_zero50"] >= 0 for r in linears)
    assert "estimated_redundancy" in result["definitions"]
    assert set(result["plots"]) == {"rank", "entropy", "sensitivity"}
    measured = [c for c in result["outliers"]["candidates"] if c.get("measured")]
    assert 2 <= len(measured) <= 4
    for c in measured:
        assert {"zero_increase", "clip_increase", "input_ratio", "massive"} <= set(c)
    calib = result["calibration"]
    assert calib["tokens"] == 2 * 31 and calib["measure_tokens"] == 31
    assert len(calib["hidden_channel_max"]) == 2 + 1


def test_outliers_detects_a_super_weight_planted_in_a_small_model(tiny_causal_lm, tmp_path):
    """A weight planted at 60 robust sigmas in block 1's down-projection of a tiny Llama is the top
    candidate, with its position, its z-score and a measured effect of zeroing it alone."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "planted"
    shutil.copytree(tiny_causal_lm, folder)
    name, (row, col) = "model.layers.1.mlp.down_proj.weight", (7, 41)
    (path,) = folder.glob("*.safetensors")
    tensors = load_file(path)
    w = tensors[name]
    w[row, col] = 60 * 1.4826 * (w - w.median()).abs().median()
    save_file(tensors, path, metadata={"format": "pt"})
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(["analyze", str(folder), "--calib", "--outliers", "--calib-windows", "2",
                       "--seq-len", "32", "--outlier-top", "2", "--out", str(out), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    top = json.loads((out / "analysis.json").read_text())["outliers"]["candidates"][0]
    assert (top["name"], top["block"], top["row"], top["col"]) == (name, 1, row, col)
    assert top["z"] == pytest.approx(60, rel=0.05) and top["down_proj"]
    assert top["measured"] and top["zero_increase"] != 0
