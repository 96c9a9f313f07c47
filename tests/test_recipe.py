"""recipe.yaml: round trips, validation errors that name the file and key, bit costs, application, and
the planner fed with per-matrix measurements never exceeding its budget."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from unweight.commands.plan import OPTIONS, make_recipe, matrix_options, uniform_setting
from unweight.errors import UnweightError
from unweight.quant.planner import plan
from unweight.recipe import (RECIPE_VERSION, Recipe, apply_in_memory, dump, kmeans_bits, load,
                             reconstruct, rtn_bits, setting_bits, validate)

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # smollm2's decoder Linears


def _recipe() -> Recipe:
    return Recipe(method="kmeans", default={"k": 16},
                  matrices={"model.layers.0.mlp.down_proj.weight": {"k": 64},
                            "model.layers.1.self_attn.q_proj.weight": {"k": 4, "granularity": "row"}},
                  budget_bits=3.0, expected_bits=2.99, model="smollm2-135m", notes={"estimate": "measured"})


def test_round_trip(tmp_path):
    path = dump(_recipe(), tmp_path / "recipe.yaml")
    text = path.read_text()
    assert text.startswith("# unweight recipe, version 1")
    back = load(path)
    assert back == _recipe()
    assert back.settings_for("model.layers.0.mlp.down_proj.weight") == {"granularity": "matrix", "k": 64}
    assert back.settings_for("anything.else") == {"granularity": "matrix", "k": 16}
    rtn = Recipe(method="rtn", default={"bits": 3}, matrices={"a.weight": {"bits": 8, "group_size": 0}})
    assert load(dump(rtn, tmp_path / "rtn.yaml")).settings_for("b") == {
        "bits": 3, "group_size": 128, "scheme": "asym_int"}


def _good() -> dict:
    return {"version": 1, "method": "kmeans", "default": {"k": 8}, "matrices": {"m.weight": {"k": 16}}}


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("version"), "missing 'version'"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.update(version=True), "not supported"),
    (lambda d: d.update(extra=1), "unknown key(s) ['extra']"),
    (lambda d: d.update(method="awq"), "method must be one of kmeans, rtn, gptq"),
    (lambda d: d.update(default={"k": 8, "outliers": "many"}), "--outliers takes"),
    (lambda d: d.update(default={"k": 8, "outliers": [1]}), "outliers must be str or int or float"),
    (lambda d: d.update(method="gptq", default={"k": 8}, matrices={}), "unknown setting(s) ['k']"),
    (lambda d: d.pop("default"), "missing 'default'"),
    (lambda d: d.update(default={"bits": 3}), "unknown setting(s) ['bits']"),
    (lambda d: d.update(default={}), "missing 'k'"),
    (lambda d: d.update(default={"k": 1}), "k must lie in 2..256"),
    (lambda d: d.update(default={"k": 8.0}), "k must be int"),
    (lambda d: d.update(default={"k": True}), "k must be int"),
    (lambda d: d.update(default={"k": 8, "granularity": "diagonal"}), "bad granularity"),
    (lambda d: d.update(matrices=["m.weight"]), "'matrices' must map"),
    (lambda d: d.update(matrices={"m.weight": 8}), "matrices['m.weight'] must be a mapping"),
    (lambda d: d.update(budget_bits=-1), "budget_bits must be a positive number"),
    (lambda d: d.update(expected_bits="3"), "expected_bits must be a positive number"),
    (lambda d: d.update(method="rtn", default={"bits": 9}, matrices={}), "bits must lie in 1..8"),
    (lambda d: d.update(method="rtn", default={"bits": 3, "scheme": "nf4"}, matrices={}), "scheme must be"),
])
def test_validation_errors_name_file_and_key(tmp_path, change, message):
    data = _good()
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UnweightError) as err:
        load(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(UnweightError, match="cannot read the recipe"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("version: [1\n")
    with pytest.raises(UnweightError, match="not valid YAML"):
        load(tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UnweightError, match="a recipe is a YAML mapping"):
        load(tmp_path / "list.yaml")
    assert validate(_good()).version == RECIPE_VERSION


def test_bit_costs_count_every_part():
    assert kmeans_bits((576, 576), 8) == 3 + 8 * 32 / (576 * 576)
    assert kmeans_bits((576, 576), 5) == 3 + 5 * 32 / (576 * 576)  # indices take ceil(log2 K) bits
    assert kmeans_bits((4, 10), 4, "row") == 2 + 4 * 4 * 32 / 40
    # 576 columns at group 128: 4 groups of 128 and a remainder group of 64 per row
    assert rtn_bits((576, 576), 3) == 3 + 576 * 5 * 40 / (576 * 576)
    assert rtn_bits((8, 256), 4, 0) == 4 + 8 * 40 / (8 * 256)
    assert setting_bits("rtn", (8, 256), {"bits": 4, "group_size": 0}) == rtn_bits((8, 256), 4, 0)
    # gptq as unweight-layerwise stores it: a float32 scale and a bits-wide zero point per group
    assert setting_bits("gptq", (576, 576), {"bits": 3}) == 3 + 576 * 5 * (32 + 3) / (576 * 576)
    assert setting_bits("gptq", (8, 256), {"bits": 4, "group_size": 0, "scheme": "sym"}) == 4 + 8 * 32 / (8 * 256)


def test_reconstruct_keeps_recipe_outliers_exactly():
    torch.manual_seed(1)
    w = torch.randn(32, 64) * 0.02
    w[5, 7], w[30, 60] = 3.0, -2.5
    for method, s in (("kmeans", {"k": 4}), ("rtn", {"bits": 2, "group_size": 32})):
        plain = reconstruct(w, method, s)
        kept = reconstruct(w, method, {**s, "outliers": 2})
        assert kept[5, 7] == 3.0 and kept[30, 60] == -2.5
        mask = torch.ones_like(w, dtype=torch.bool)
        mask[5, 7] = mask[30, 60] = False
        assert ((kept - w)[mask] ** 2).sum() < ((plain - w)[mask] ** 2).sum()  # the bulk is fitted better
    with pytest.raises(UnweightError, match="needs calibration data"):
        reconstruct(w, "gptq", {"bits": 4})


def test_reconstruct_is_exact_when_k_covers_the_values():
    torch.manual_seed(0)
    levels = torch.tensor([-0.5, -0.125, 0.0, 0.25, 1.0]).to(torch.bfloat16).float()
    w = levels[torch.randint(0, 5, (16, 24))]
    assert torch.equal(reconstruct(w, "kmeans", {"k": 8}), w)
    assert reconstruct(w, "kmeans", {"k": 2}).unique().numel() == 2
    from unweight.quant.rtn import rtn_fake_quantize

    assert torch.equal(reconstruct(w, "rtn", {"bits": 3, "group_size": 8}), rtn_fake_quantize(w, 3, 8))


def test_apply_in_memory_replaces_only_listed_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = Recipe(method="kmeans", default={"k": 4}, matrices={"1.weight": {"k": 8}})
    info = apply_in_memory(model, recipe, ["0.weight", "1.weight"])
    assert model[0].weight.unique().numel() <= 4 and model[1].weight.unique().numel() <= 8
    assert torch.equal(model[0].bias, before["0.bias"])
    expected = (512 * kmeans_bits((16, 32), 4) + 128 * kmeans_bits((8, 16), 8)) / 640
    assert info["bits_per_weight"] == pytest.approx(expected)
    with pytest.raises(UnweightError, match="does not have"):
        apply_in_memory(model, recipe, ["2.weight"])


def test_apply_in_memory_counts_exact_outliers():
    """Bits per weight include the sparse part: an int32 index and a float32 value per kept weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    with torch.no_grad():
        model[0].weight[3, 5] = 40.0
    original = model[0].weight.detach().clone()
    recipe = Recipe(method="kmeans", default={"k": 4, "outliers": 3})
    info = apply_in_memory(model, recipe, ["0.weight"])
    assert info["bits_per_weight"] == pytest.approx(kmeans_bits((16, 32), 4) + 3 * (32 + 32) / 512)
    assert model[0].weight[3, 5] == 40.0 and torch.equal(model[0].weight[3, 5], original[3, 5])


def _measurements(losses: list[list[float]], shapes: list[tuple[int, int]], method: str) -> dict:
    return {"matrices": {
        f"model.layers.{i}.mlp.w.weight": {
            "numel": math.prod(shape), "shape": list(shape),
            "options": [{"settings": s, "bits": setting_bits(method, shape, s), "loss": loss}
                        for s, loss in zip(OPTIONS[method], row)]}
        for i, (row, shape) in enumerate(zip(losses, shapes))}}


@settings(max_examples=60, deadline=None)
@given(data=st.data(), method=st.sampled_from(["kmeans", "rtn"]), budget=st.floats(2.4, 7.0))
def test_plan_from_measurements_never_exceeds_budget(data, method, budget):
    """Whatever the measured losses (noisy, even negative), the plan and the recipe written from it
    stay within the budget, and the recipe gives every matrix the option the plan chose."""
    n = data.draw(st.integers(1, 12))
    shapes = [data.draw(st.sampled_from(SHAPES)) for _ in range(n)]
    losses = [data.draw(st.lists(st.floats(-0.01, 5.0), min_size=len(OPTIONS[method]),
                                 max_size=len(OPTIONS[method]))) for _ in range(n)]
    measurements = _measurements(losses, shapes, method)
    allocation = plan(matrix_options(measurements), budget)
    assert allocation.bits_per_weight <= budget
    recipe = validate(make_recipe(measurements, allocation, method, budget, "m", {}).to_dict())
    total = sum(m["numel"] for m in measurements["matrices"].values())
    bits = sum(m["numel"] * setting_bits(method, tuple(m["shape"]), recipe.settings_for(name))
               for name, m in measurements["matrices"].items()) / total
    assert bits == pytest.approx(allocation.bits_per_weight, rel=1e-12)
    assert bits <= budget * (1 + 1e-12)


def test_plan_beats_uniform_when_one_matrix_is_fragile():
    """A synthetic sensitivity profile like a super weight's: one matrix collapses below K=32. The
    plan pays for it from the robust matrices; the uniform K=8 allocation cannot."""
    fragile = [50.0, 40.0, 30.0, 0.02, 0.01]
    robust = [0.3, 0.05, 0.01, 0.005, 0.001]
    measurements = _measurements([fragile] + [robust] * 7, [(576, 1536)] * 8, "kmeans")
    uniform = uniform_setting("kmeans", 3.0)
    assert uniform == {"k": 8}
    allocation = plan(matrix_options(measurements), 3.0 + 1e-3)
    uniform_loss = sum(m["options"][1]["loss"] for m in measurements["matrices"].values())
    assert allocation.total_loss < uniform_loss
    assert allocation.chosen[0].label in ("k=32", "k=64")


@pytest.mark.usefixtures("one_thread")
def test_plan_with_outliers_counts_them_and_compress_keeps_them(tiny_causal_lm, tmp_path):
    """`plan --outliers 2`: every setting of the recipe keeps 2 weights per matrix exactly; the
    expected bits add 2 x (32-bit index + 32-bit value, a float32 model) per matrix to each setting's
    cost; `compress --recipe` stores them."""
    from unweight.checkpoint import open_checkpoint
    from unweight.cli import main

    path = tmp_path / "recipe.yaml"
    assert main(["plan", str(tiny_causal_lm), "--bits", "3.5", "--method", "rtn", "--estimate", "fisher",
                 "--windows", "2", "--seq-len", "32", "--outliers", "2", "--out", str(path), "--quiet"]) == 0
    recipe = load(path)
    ckpt = open_checkpoint(tiny_causal_lm)
    names = [n for n in ckpt.names() if ".layers." in n and n.endswith("_proj.weight")]
    assert len(names) == 14 and all(recipe.settings_for(n)["outliers"] == 2 for n in names)
    shapes = {n: tuple(ckpt.info(n).shape) for n in names}
    total = sum(math.prod(s) for s in shapes.values())
    expected = sum(math.prod(s) * setting_bits("rtn", s, recipe.settings_for(n)) + 2 * 64
                   for n, s in shapes.items()) / total
    assert recipe.expected_bits == pytest.approx(expected, rel=1e-12) and recipe.expected_bits <= 3.5
    out = tmp_path / "out"
    assert main(["compress", str(tiny_causal_lm), str(out), "--recipe", str(path)]) == 0
    stored = open_checkpoint(out)
    assert all(stored.info(f"{n}.cb.outlier_idx").shape == (2,) for n in names)
