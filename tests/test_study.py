"""The rank study: scrambling keeps the multiset of centroid values exactly and changes their order;
rank-preserving redraws keep the order and match mean and variance; the harness swaps and restores
weights exactly and its suffix forwards equal full forwards; the study, its figures and its summary
run end to end on a tiny model, and `unweight study rank --quick` on smollm2-135m writes every file."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from unweight import UnweightError
from unweight.study.perturb import rank_preserving, scramble

OUTPUTS = ["study.json", "summary.md", "perplexity_by_layer.png", "progressive.png", "drift.png"]
CLAIM_WORDS = ["scrambling", "rank-preserving", "scale drift", "affine", "super weights"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


codebooks = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=64).map(
    lambda v: torch.tensor(v, dtype=torch.float32))


# ------------------------------------------------------------------------------------------ scramble

@given(codebooks, st.integers(0, 2**31))
@settings(max_examples=200, deadline=None)
def test_scramble_keeps_the_multiset_exactly_and_changes_the_order(c, seed):
    out = scramble(c, _gen(seed))
    assert torch.equal(out.sort().values, c.sort().values)  # bit-exact multiset (hence mean, variance)
    if len(set(c.tolist())) > 1:
        assert not torch.equal(out, c)
    else:
        assert torch.equal(out, c)


def test_scramble_is_never_the_identity_even_for_two_values_or_repeats():
    two = torch.tensor([-1.0, 1.0])
    repeats = torch.tensor([-0.5, 0.1, 0.3, 0.3, 0.3])  # unused slots repeat the largest centroid
    for seed in range(200):
        assert torch.equal(scramble(two, _gen(seed)), torch.tensor([1.0, -1.0]))
        assert not torch.equal(scramble(repeats, _gen(seed)), repeats)


def test_scramble_is_deterministic_per_generator_and_varies_across_seeds():
    c = torch.linspace(-1, 1, 16)
    assert torch.equal(scramble(c, _gen(7)), scramble(c, _gen(7)))
    assert len({tuple(scramble(c, _gen(s)).tolist()) for s in range(20)}) > 15


# ---------------------------------------------------------------------------------- rank-preserving

def _moments(x, w=None):
    x = x.double()
    w = torch.ones_like(x) if w is None else w.double()
    m = (w * x).sum() / w.sum()
    return float(m), float(((w * (x - m) ** 2).sum() / w.sum()).sqrt())


@given(codebooks, st.integers(0, 2**31))
@example(torch.tensor([0.0, 0.0, 0.0, -1.4013e-45]), 5)  # a spread of one subnormal ulp
@settings(max_examples=200, deadline=None)
def test_rank_preserving_keeps_order_and_matches_mean_and_variance(c, seed):
    out = rank_preserving(c, _gen(seed))
    mean, std = _moments(c)
    if std == 0:
        assert torch.equal(out, c)
        return
    # strict order is kept: c_i < c_j implies out_i < out_j
    less = c[:, None] < c[None, :]
    assert bool((out[:, None] < out[None, :])[less].all())
    # the moments match to float32 rounding of the values, which is relative to their magnitude
    assume(std > 1e-3 * abs(mean) and std > 1e-30)
    new_mean, new_std = _moments(out)
    assert new_mean == pytest.approx(mean, abs=1e-5 * (1 + abs(mean) + std))
    assert new_std == pytest.approx(std, rel=1e-5)
    if len(set(c.tolist())) > 2:  # two values are fixed by their order, mean and variance
        assert not torch.equal(out, c)


def test_rank_preserving_with_cluster_counts_keeps_the_decoded_matrix_mean_and_std():
    g = _gen(0)
    w = torch.randn(64, 96, generator=g) ** 3  # heavy-tailed
    from unweight.cluster import cluster_tensor

    codebook, assignments = cluster_tensor(w, 16)
    c = codebook[0]
    counts = torch.bincount(assignments.reshape(-1).long(), minlength=16).double()
    out = rank_preserving(c, _gen(1), weights=counts)
    before, after = c[assignments.long()], out[assignments.long()]
    assert _moments(after)[0] == pytest.approx(_moments(before)[0], abs=1e-5)
    assert _moments(after)[1] == pytest.approx(_moments(before)[1], rel=1e-5)
    assert torch.equal(torch.argsort(out), torch.argsort(c))


def test_perturbations_reject_bad_codebooks():
    with pytest.raises(UnweightError):
        scramble(torch.zeros(2, 3), _gen(0))
    with pytest.raises(UnweightError):
        rank_preserving(torch.tensor([1.0, 2.0]), _gen(0), weights=torch.ones(3))


# ----------------------------------------------------------------------- harness and study (tiny model)

@pytest.fixture(scope="module")
def tiny():
    """A random 4-block Llama (no download) and two windows of 24 tokens. One thread: on a shared
    machine, two threads turn each of these tiny matmuls into a wait for the other thread."""
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    windows = torch.randint(0, 96, (2, 24), generator=_gen(1))
    yield model, windows
    torch.set_num_threads(threads)


def test_harness_swaps_restores_and_suffix_forwards_equal_full_forwards(tiny):
    from unweight.study.harness import Harness

    model, windows = tiny
    h = Harness(model, windows)
    assert h.suffix_ok and h.matrix_names[-1] == "mlp.down_proj"
    same = h.score(first_changed=2, norms=True)
    assert same.kl == pytest.approx(0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(h.base.perplexity, rel=1e-6)
    assert same.norm_ratio == pytest.approx([1.0] * 4)

    before = h.weight(2, "mlp.up_proj").data.clone()
    h.set_weight(2, "mlp.up_proj", before * 3)
    suffix, full = h.score(first_changed=2, norms=True), h.score(first_changed=0, norms=True)
    assert suffix.perplexity == pytest.approx(full.perplexity, rel=1e-5)
    assert suffix.kl == pytest.approx(full.kl, rel=1e-4, abs=1e-7)
    assert suffix.kl > 0 and suffix.norm_ratio[:2] == [1.0, 1.0]
    h.restore()
    assert torch.equal(h.weight(2, "mlp.up_proj").data, before)
    assert h.score().perplexity == pytest.approx(h.base.perplexity, rel=1e-6)


@pytest.fixture(scope="module")
def tiny_results(tiny):
    from unweight.study.harness import Harness
    from unweight.study.rank import RankStudyConfig, run_rank_study
    from unweight.study.summary import claims

    model, windows = tiny
    h = Harness(model, windows)
    config = RankStudyConfig(k=4, seeds=2, seq_len=24, max_tokens=48, progressive_steps=4, scan_every=1)
    results = run_rank_study(h, config)
    results["model"] = "tiny"
    results["claims"] = claims(results)
    # the model is left exactly as loaded
    assert h.score().perplexity == pytest.approx(h.base.perplexity, rel=1e-6)
    return results


def test_default_scans_every_other_block_and_replaces_every_block():
    from unweight.study.rank import RankStudyConfig, _blocks

    config = RankStudyConfig()
    assert _blocks(config.scan_blocks, 30, config.scan_every) == list(range(0, 30, 2))
    assert config.progressive_steps is None and _blocks([0, -1], 30, config.scan_every) == [0, 29]


def test_study_records_every_measurement(tiny_results):
    r = tiny_results
    n_mats = len(r["matrix_names"])
    assert n_mats == 7 and r["n_blocks"] == 4
    assert len(r["scans"]) == 4 * n_mats * (1 + 3 * 2)  # control once, three random variants x 2 seeds
    assert len(r["matrices"]) == 4 * n_mats
    assert {s["variant"] for s in r["scans"]} == {"control", "scramble", "scramble+match", "rank"}
    assert {(p["order"], p["variant"]) for p in r["progressive"]} == \
        {(o, v) for o in ("forward", "reverse") for v in ("control", "control+affine", "rank", "rank+affine")}
    assert all(len(p["norm_ratio"]) == 4 for p in r["progressive"])
    for s in r["scans"]:
        if s["variant"] in ("control", "rank", "scramble+match"):  # matrix std kept at the control's
            control = next(m for m in r["matrices"] if (m["block"], m["matrix"]) == (s["block"], s["matrix"]))
            assert s["std_ratio"] == pytest.approx(control["std_ratio_control"], rel=1e-4)
    for b in r["block_std"]:
        if b["variant"].endswith("+affine"):  # the correction restores the original std exactly
            assert b["std_ratio"] == pytest.approx(1.0, rel=1e-5)
    assert all(m["affine_a"] > 0 for m in r["matrices"])
    json.dumps(r)  # JSON-ready


def test_figures_and_summary_from_the_results(tiny_results, tmp_path):
    from unweight.study.figures import write_figures
    from unweight.study.summary import markdown

    paths = write_figures(tiny_results, tmp_path)
    assert {p.name for p in paths} == set(OUTPUTS[2:])
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    md = markdown(tiny_results)
    assert "| claim | holds? | numbers |" in md
    for word in CLAIM_WORDS[:4]:
        assert word in md


def test_progressive_only_study_still_summarises(tiny, tmp_path):
    from unweight.study.figures import write_figures
    from unweight.study.harness import Harness
    from unweight.study.rank import RankStudyConfig, run_rank_study
    from unweight.study.summary import claims, markdown

    r = run_rank_study(Harness(*tiny), RankStudyConfig(k=4, scan_blocks=[], keep_outliers=1, progressive_steps=2))
    assert r["scans"] == [] and r["progressive"]
    assert [c["claim"] for c in claims(r)] == [
        "scale drift, not rank distortion, drives the collapse under progressive replacement",
        "an affine correction w' = a w + b (a > 0) delays the collapse"]
    # kept outliers are exact in every variant: the top-z weight keeps its value after clustering
    assert all(m["candidates"][0]["clustered"] == m["candidates"][0]["value"] for m in r["matrices"])
    write_figures(r, tmp_path)
    assert "affine" in markdown(r)


def test_study_rejects_unknown_matrices_and_blocks(tiny):
    from unweight.study.harness import Harness
    from unweight.study.rank import RankStudyConfig, run_rank_study

    h = Harness(*tiny)
    with pytest.raises(UnweightError, match="unknown matrices"):
        run_rank_study(h, RankStudyConfig(matrices=["mlp.nope"]))
    with pytest.raises(UnweightError, match="decoder blocks"):
        run_rank_study(h, RankStudyConfig(scan_blocks=[7]))


# ------------------------------------------------------------------------------ the real model, CLI

@pytest.mark.slow
def test_quick_study_on_smollm2_writes_every_output(smollm2_bf16, tmp_path):
    from unweight import cli

    out = tmp_path / "rank"
    assert cli.main(["study", "rank", "smollm2-135m", "--quick", "--out", str(out)]) == 0
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "study.json").read_text())
    assert r["suffix_forwards"] and r["scan_blocks"] == [0, 29]
    assert len(r["scans"]) == 2 * 7 * 4  # 2 blocks x 7 matrices x (control + 3 variants x 1 seed)
    assert r["windows"] == {"n": 1, "seq_len": 128, "tokens": 127}
    # K-means clips the super weights of smollm2's down-projections (the outliers issue)
    down = [m for m in r["matrices"] if m["matrix"] == "mlp.down_proj" and m["max_z"] >= 25]
    assert down and all(abs(m["candidates"][0]["clustered"]) < abs(m["candidates"][0]["value"]) for m in down)
    md = (out / "summary.md").read_text()
    for word in CLAIM_WORDS:
        assert word in md
