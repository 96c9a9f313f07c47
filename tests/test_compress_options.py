"""``unweight compress`` with a recipe, centroid fine-tuning and the affine correction, end to end on
a tiny random Llama: each listed matrix gets its recipe's setting, fine-tuning lowers the stored
model's calibration loss with the assignments and outliers unchanged, the affine correction stores
a * c + b (rank order kept) with the (a, b) the fit defines, and every output loads with transformers."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import yaml

from unweight.cli import main
from unweight.cluster.affine import Affine, apply_affine, fit_least_squares
from unweight.cluster.runtime import codebook_parts
from unweight.formats import decode_tensors

CALIB = ["--calib-samples", "2", "--calib-seq-len", "32"]
LISTED = {"model.layers.0.mlp.down_proj.weight": 16, "model.layers.1.self_attn.q_proj.weight": 2}
DEFAULT_K = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def compress(*argv) -> dict:
    """Run ``unweight compress ... --json`` and return the summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["compress", *map(str, argv), "--json"]) == 0
    return json.loads(out.getvalue())


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def write_recipe(path, method="kmeans", default=None, matrices=None):
    default = default or {"k": DEFAULT_K}
    matrices = {n: {"k": k} for n, k in LISTED.items()} if matrices is None else matrices
    path.write_text(yaml.safe_dump({"version": 1, "method": method, "default": default, "matrices": matrices}))
    return path


def test_recipe_gives_each_listed_matrix_its_k_and_outliers_stay_exact(tiny_causal_lm, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml")
    out = tmp_path / "out"
    summary = compress(tiny_causal_lm, out, "--recipe", recipe, "--outliers", "3")
    qc = config_of(out)
    assert summary["method"] == "kmeans" and summary["quantization_config"] == qc
    assert qc["recipe"]["matrices"] == {n: {"k": k} for n, k in LISTED.items()}
    assert qc["recipe_path"] == str(recipe) and "k" not in qc
    assert yaml.safe_load((out / "recipe.yaml").read_text().split("\n", 4)[-1])["method"] == "kmeans"
    original, decoded, parts = decode_tensors(tiny_causal_lm), decode_tensors(out), codebook_parts(out)
    assert len(parts) == 2 * 7
    for name, p in parts.items():
        idx = p["outlier_idx"].long()
        assert idx.numel() == 3
        flat, orig = decoded[name].reshape(-1), original[name].reshape(-1)
        assert torch.equal(flat[idx], orig[idx])
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[idx] = False
        assert flat[keep].unique().numel() == LISTED.get(name, DEFAULT_K), name


def test_rtn_recipe_gives_each_listed_matrix_its_bits(tiny_causal_lm, tmp_path):
    narrow = "model.layers.1.mlp.gate_proj.weight"
    recipe = write_recipe(tmp_path / "r.yaml", "rtn", {"bits": 4, "group_size": 16}, {narrow: {"bits": 2}})
    out = tmp_path / "out"
    compress(tiny_causal_lm, out, "--recipe", recipe)
    decoded = decode_tensors(out)
    assert config_of(out)["method"] == "rtn"
    for name in (narrow, "model.layers.0.mlp.gate_proj.weight"):
        groups = decoded[name].reshape(-1, 16)  # rows of 32 inputs: two groups of 16 each
        most = max(g.unique().numel() for g in groups)
        assert most <= (4 if name == narrow else 16) and (name != narrow or most > 2), (name, most)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra, recipe, message", [
    (["--method", "rtn"], {}, "the recipe's method is 'kmeans', but --method rtn"),
    ([], {"matrices": {"model.embed_tokens.weight": {"k": 8}}}, "which compress does not encode"),
    ([], {"matrices": {"model.layers.9.mlp.up_proj.weight": {"k": 8}}}, "does not have"),
    (["--finetune-steps", "2"], {"method": "rtn", "default": {"bits": 4}, "matrices": {}},
     "method 'rtn' has none"),
    (["--method", "lossless", "--affine", "moments"], None, "method 'lossless' has none"),
    (["--method", "kmeans", "--finetune-lr", "0", "--finetune-steps", "2"], None, "--finetune-lr must be > 0"),
])
def test_bad_requests_are_one_clear_line(tiny_causal_lm, tmp_path, capsys, extra, recipe, message):
    argv = ["compress", str(tiny_causal_lm), str(tmp_path / "out"), *extra]
    if recipe is not None:
        argv += ["--recipe", str(write_recipe(tmp_path / "r.yaml", **recipe))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_finetuning_needs_a_causal_lm(tiny_bert, tmp_path, capsys):
    assert main(["compress", str(tiny_bert), str(tmp_path / "out"), "--method", "kmeans",
                 "--finetune-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "need a causal LM" in err and "BertModel" in err


def _calibration_loss(folder) -> float:
    from unweight.calibrate import calibration_windows
    from unweight.cluster.finetune import calibration_loss
    from unweight.models import load_causal_lm

    model, tok = load_causal_lm(str(folder))
    return calibration_loss(model, calibration_windows(tok, 2, 32))


@pytest.fixture(scope="module")
def kmeans_outputs(tiny_causal_lm, tmp_path_factory):
    """Plain K-means, then fine-tuned, then fine-tuned + affine moments: same K, same outliers."""
    root = tmp_path_factory.mktemp("kmeans")
    base = [tiny_causal_lm, "--method", "kmeans", "--k", DEFAULT_K, "--outliers", "2", *CALIB]
    ft = ["--finetune-steps", "6", "--finetune-lr", "2e-3"]
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        for name, extra in {"plain": [], "ft": ft, "ft_affine": [*ft, "--affine", "moments"]}.items():
            compress(base[0], root / name, *base[1:], *extra)
    return {name: root / name for name in ("plain", "ft", "ft_affine")}


def test_finetuning_lowers_the_stored_models_loss_and_keeps_assignments(kmeans_outputs):
    plain, ft = kmeans_outputs["plain"], kmeans_outputs["ft"]
    qc = config_of(ft)["finetune"]
    assert qc["steps"] == 6 and qc["lr"] == 2e-3 and qc["loss_last_pass"] < qc["loss_first_pass"]
    assert _calibration_loss(ft) < _calibration_loss(plain) - 1e-3
    plain_parts, ft_parts = codebook_parts(plain), codebook_parts(ft)
    for name, p in plain_parts.items():
        for field in ("header", "indices", "outlier_idx", "outlier_val"):
            assert torch.equal(p[field], ft_parts[name][field]), (name, field)
        assert not torch.equal(p["codebook"], ft_parts[name]["codebook"])


def test_affine_after_finetuning_stores_a_c_plus_b_and_keeps_rank_order(kmeans_outputs):
    from transformers import AutoModelForCausalLM

    import unweight  # noqa: F401  (registers the format with transformers)

    ft, corrected = codebook_parts(kmeans_outputs["ft"]), codebook_parts(kmeans_outputs["ft_affine"])
    qc = config_of(kmeans_outputs["ft_affine"])["affine"]
    assert qc["fit"] == "moments" and qc["order"] == "after finetune" and set(qc["matrices"]) == set(ft)
    for name, p in ft.items():
        fit = qc["matrices"][name]
        assert fit["a"] > 0 and fit["fit"] == "moments"
        c = corrected[name]["codebook"]
        assert torch.equal(c, apply_affine(p["codebook"], Affine(fit["a"], fit["b"])))
        assert torch.equal(torch.argsort(c, dim=-1), torch.argsort(p["codebook"], dim=-1))
        assert torch.equal(corrected[name]["outlier_val"], p["outlier_val"])
    model = AutoModelForCausalLM.from_pretrained(kmeans_outputs["ft_affine"])
    dense = decode_tensors(kmeans_outputs["ft_affine"])
    for name, param in model.named_parameters():
        assert torch.equal(param.detach().to(dense[name].dtype), dense[name]), name
    logits = model(input_ids=torch.arange(16)[None]).logits
    assert torch.isfinite(logits).all()


def test_least_squares_affine_fits_the_layer_outputs_on_calibration_inputs(tiny_causal_lm, tmp_path):
    from unweight.calibrate import calibration_windows
    from unweight.cluster.codebook import decode
    from unweight.models import load_causal_lm

    plain, lsq = tmp_path / "plain", tmp_path / "lsq"
    compress(tiny_causal_lm, plain, "--method", "kmeans", "--k", DEFAULT_K, *CALIB)
    compress(tiny_causal_lm, lsq, "--method", "kmeans", "--k", DEFAULT_K, "--affine", "lsq", *CALIB)
    fits = config_of(lsq)["affine"]["matrices"]
    assert {f["fit"] for f in fits.values()} == {"lsq"} and all(f["a"] > 0 for f in fits.values())
    model, tok = load_causal_lm(str(tiny_causal_lm))
    checked = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    grams = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, module.in_features).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [model.get_submodule(n.removesuffix(".weight")).register_forward_hook(hook(n)) for n in checked]
    with torch.no_grad():
        model(input_ids=calibration_windows(tok, 2, 32), use_cache=False)
    for h in handles:
        h.remove()
    original, plain_parts, lsq_parts = decode_tensors(tiny_causal_lm), codebook_parts(plain), codebook_parts(lsq)
    for name in checked:
        a, b = fit_least_squares(original[name], decode(plain_parts[name], name), grams[name])
        assert fits[name]["a"] == pytest.approx(a, rel=1e-4) and fits[name]["b"] == pytest.approx(b, rel=1e-3, abs=1e-7)
    for name, p in plain_parts.items():
        expected = apply_affine(p["codebook"], Affine(fits[name]["a"], fits[name]["b"]))
        assert torch.equal(lsq_parts[name]["codebook"], expected)
