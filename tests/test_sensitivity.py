"""Calibrated sensitivity and super-weight detection on a tiny Llama trained in the test (no download).

The model learns a deterministic next-token rule for a few dozen steps, so that its loss is low and any
damage to a matrix shows as a loss increase. Properties: the tail-only recomputation gives the full
forward's loss; zeroing a whole matrix costs more than zeroing its 10% lowest Wanda scores; a planted
super weight is the top candidate, sits on the massive channel, and zeroing it hurts.
"""

from __future__ import annotations

import pytest
import torch

from unweight.analysis.sensitivity import (TailLoss, collect_statistics, decoder_linears,
                                           fisher_estimate, matrix_sensitivity, redundant_fraction,
                                           zero_lowest, zeroing_sweep)
from unweight.analysis.superweights import (activation_evidence, find_candidates, measure_effects,
                                            select_for_measurement)

VOCAB, SEQ = 48, 32


def _batch(n: int, seed: int) -> torch.Tensor:
    """Sequences following x[t+1] = (3 x[t] + 5) mod VOCAB from random starts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, SEQ, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, SEQ):
        x[:, t] = (3 * x[:, t - 1] + 5) % VOCAB
    return x


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small is dominated by per-op overhead, which threads only add to."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for step in range(25):
        ids = _batch(16, step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def windows():
    return _batch(4, 1000)


def test_decoder_linears_are_named_like_the_state_dict(tiny):
    linears = decoder_linears(tiny)
    state = tiny.state_dict()
    assert len(linears) == 2 * 7
    for name, (block, linear) in linears.items():
        assert state[name].data_ptr() == linear.weight.data_ptr()
        assert f".{block}." in name


def test_tail_loss_matches_full_forward(tiny, windows):
    tail = TailLoss(tiny, windows)
    with torch.no_grad():
        full = float(tiny(input_ids=windows, labels=windows).loss)
    assert tail.base == pytest.approx(full, rel=1e-5)
    for start in range(2):
        assert tail.loss(start) == pytest.approx(tail.base, rel=1e-5)
    strided = TailLoss(tiny, windows, stride=3)
    with torch.no_grad():
        logits = tiny(input_ids=windows).logits[:, 0:SEQ - 1:3]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:SEQ:3].flatten())
    assert strided.tokens == 4 * len(range(0, SEQ - 1, 3))
    assert strided.base == pytest.approx(float(nll), rel=1e-5)
    assert strided.loss(1) == pytest.approx(strided.base, rel=1e-5)
    name = next(iter(tail.linears))
    w = tail.linears[name][1].weight.data.clone()
    tail.with_weight(name, torch.zeros_like(w))
    assert torch.equal(tail.linears[name][1].weight.data, w)  # restored


def test_kl_metric_is_zero_unchanged_and_positive_when_changed(tiny, windows):
    kl = TailLoss(tiny, windows, stride=2, metric="kl")
    nll = TailLoss(tiny, windows, stride=2)
    assert kl.base == pytest.approx(nll.base)
    assert abs(kl.loss(1)) < 1e-6
    name = "model.layers.1.mlp.down_proj.weight"
    w = kl.linears[name][1].weight.data
    half = zero_lowest(w, torch.ones(w.shape[1]), 0.5)
    value, se = kl.measure(name, half)
    assert value > 0 and 0 <= se < value
    assert kl.measure(name, torch.zeros_like(w))[0] > value


def test_zeroing_all_costs_more_than_lowest_ten_percent(tiny, windows):
    """Property, for every decoder Linear: zeroing the whole matrix raises the loss more than zeroing
    its 10% lowest-scoring weights, and the sweep's relative increases grow with the fraction."""
    stats = collect_statistics(tiny, windows, fisher=True, progress=False)
    tail = TailLoss(tiny, windows)
    assert tail.base < 1.0  # the rule was learned: damage is visible
    for name, (_, linear) in tail.linears.items():
        w = linear.weight.data
        all_zero = tail.increase(name, zero_lowest(w, stats.sq_norm[name], 1.0))
        low_ten = tail.increase(name, zero_lowest(w, stats.sq_norm[name], 0.1))
        assert all_zero > low_ten, name
        assert all_zero > 0, name
        summary = matrix_sensitivity(w, stats.sq_norm[name], stats.fisher[name])
        assert summary["wanda_q10"] <= summary["wanda_q50"] <= summary["wanda_q90"] <= summary["wanda_q99"]
        assert summary["fisher_zero"] == pytest.approx(fisher_estimate(stats.fisher[name], w))
        assert summary["fisher_zero"] > 0


def test_zero_lowest_prunes_per_row():
    w = torch.arange(1.0, 21.0).reshape(2, 10)
    pruned = zero_lowest(w, torch.ones(10), 0.3)
    assert (pruned == 0).sum(1).tolist() == [3, 3]
    assert pruned[0, :3].eq(0).all() and pruned[0, 3:].ne(0).all()


def test_redundant_fraction_stops_at_first_failure():
    base = 2.0
    assert redundant_fraction({0.1: 0.001, 0.3: 0.01, 0.5: 0.03}, base) == 0.3  # 0.03 >= 1% of 2
    assert redundant_fraction({0.1: 0.05, 0.3: 0.0, 0.5: 0.0}, base) == 0.0
    assert redundant_fraction({0.1: -0.01, 0.3: 0.0, 0.5: 0.019, 0.7: 0.0}, base) == 0.7


def test_sweep_extends_only_while_under_tolerance(tiny, windows):
    stats = collect_statistics(tiny, windows, fisher=False, progress=False)
    tail = TailLoss(tiny, windows)
    name = next(iter(tail.linears))
    strict = zeroing_sweep(tail, name, stats.sq_norm[name], tolerance=0.0)  # nothing is under 0
    assert sorted(strict) == [0.1, 0.3, 0.5]
    assert all(se >= 0 for _, se in strict.values())
    loose = zeroing_sweep(tail, name, stats.sq_norm[name], tolerance=1e9)
    assert sorted(loose) == [0.1, 0.3, 0.5, 0.7, 0.9]


def test_planted_super_weight_is_found_and_matters(tiny, windows):
    """Plant one large weight in block 0's down-projection, on an input column the MLP drives: it is
    the top candidate, its residual channel turns massive, and zeroing it costs more than clipping."""
    import copy

    model = copy.deepcopy(tiny)
    down = model.model.layers[0].mlp.down_proj.weight
    stats = collect_statistics(model, windows, fisher=False, progress=False)
    col = int(stats.max_abs["model.layers.0.mlp.down_proj.weight"].argmax())
    row = 7
    with torch.no_grad():
        down[row, col] = 40 * down.abs().max()
    stats = collect_statistics(model, windows, fisher=False, progress=False)
    weights = [(n, m.weight.data) for n, (_, m) in decoder_linears(model).items()]
    candidates = find_candidates(weights, per_matrix=2)
    top = candidates[0]
    assert (top["name"], top["row"], top["col"]) == ("model.layers.0.mlp.down_proj.weight", row, col)
    assert top["down_proj"] and top["z"] > 50
    evidence = activation_evidence(top, stats, tuple(down.shape))
    assert evidence["residual_side"] == "writes" and evidence["residual_channel"] == row
    assert evidence["massive"]
    chosen = select_for_measurement(candidates, top=2)
    assert chosen[0] is top and len(chosen) >= 2
    effects = measure_effects(top, TailLoss(model, windows))
    assert abs(effects["clipped_to"]) < abs(top["value"])
    assert effects["zero_increase"] != 0.0


def test_lazy_refinement_measures_exactly_what_the_plan_chooses(tiny, windows):
    """Fisher estimates, then refinement rounds: once a round finds nothing new to measure, every
    option the final plan chooses carries a measurement, and the plan stays within its budget."""
    from unweight.commands.plan import (OPTIONS, estimate_scale, matrix_options, option_loss,
                                        refine)
    from unweight.quant.planner import plan
    from unweight.recipe import reconstruct, setting_bits

    stats = collect_statistics(tiny, windows, fisher=True, progress=False)
    linears = decoder_linears(tiny)
    measurements = {"matrices": {}}
    for name, (_, linear) in linears.items():
        w = linear.weight.data
        measurements["matrices"][name] = {"numel": w.numel(), "shape": list(w.shape), "options": [
            {"settings": s, "bits": setting_bits("kmeans", tuple(w.shape), s),
             "loss": fisher_estimate(stats.fisher[name], reconstruct(w, "kmeans", s) - w)}
            for s in OPTIONS["kmeans"]]}
    budget = 4.5
    log = refine(tiny, measurements, "kmeans", budget, rounds=10, tail=TailLoss(tiny, windows),
                 progress=False)
    assert log[0]["to_measure"] == len(linears) and log[-1]["to_measure"] == 0
    scale = estimate_scale(measurements)
    assert scale == log[-1]["scale"] > 0
    allocation = plan(matrix_options(measurements, scale), budget)
    assert allocation.bits_per_weight <= budget
    for name, j in zip(allocation.names, allocation.choice):
        option = measurements["matrices"][name]["options"][j]
        assert "measured" in option and option_loss(option, scale) == option["measured"]
