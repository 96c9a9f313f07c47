"""Centroid-only fine-tuning: it lowers the calibration loss and changes nothing but the centroids."""

from __future__ import annotations

import pytest
import torch

from test_runtime import VOCAB, encode_targets, load_dense, tiny_llama
from unweight.cluster.codebook import KMeansSpec
from unweight.cluster.finetune import calibration_loss, finetune_centroids
from unweight.cluster.runtime import clustered_from_parts, decode_weight
from unweight.errors import UnweightError

STEPS, LR = 8, 2e-3


def clustered_tiny(spec: KMeansSpec):
    """A tiny Llama with its block Linears replaced by their decode, the matrices, and windows that
    carry a pattern (a repeated ramp) the model can get better at."""
    model = tiny_llama()
    parts = encode_targets(model, spec)
    load_dense(model, parts)
    matrices = {n: clustered_from_parts(p, n) for n, p in parts.items()}
    ramp = torch.arange(32) % 24
    windows = torch.stack([ramp, (ramp + 5) % VOCAB])
    return model, matrices, windows


@pytest.mark.parametrize("granularity", ["matrix", "group:32"])
def test_finetuning_lowers_calibration_loss_and_keeps_assignments_and_outliers(granularity):
    model, matrices, windows = clustered_tiny(KMeansSpec(k=4, granularity=granularity, outliers=3))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in matrices}
    before, first = calibration_loss(model, windows), calibration_loss(model, windows[:1])
    losses = []
    codebooks = finetune_centroids(model, matrices, windows, STEPS, lr=LR, on_step=lambda s, l: losses.append(l))
    after = calibration_loss(model, windows)
    assert len(losses) == STEPS and losses[0] == pytest.approx(first)
    assert after < before - 1e-3
    for name, m in matrices.items():
        assert codebooks[name].shape == m.codebook.shape and not torch.equal(codebooks[name], m.codebook)
        # the model's weight is the new codebook at the unchanged assignments, outliers exact
        expected = decode_weight(codebooks[name], m.assignments, m.granularity, m.dtype, m.outlier_idx, m.outlier_val)
        w = model.get_parameter(name)
        assert torch.equal(w, expected.float())
        assert torch.equal(w.reshape(-1)[m.outlier_idx], m.outlier_val.float())
    for n, p in model.named_parameters():
        assert p.requires_grad  # restored as they were
        if n in frozen:
            assert torch.equal(p, frozen[n])


def test_finetuning_is_deterministic_and_zero_steps_is_identity():
    spec = KMeansSpec(k=4)
    runs = []
    for _ in range(2):
        model, matrices, windows = clustered_tiny(spec)
        runs.append(finetune_centroids(model, matrices, windows, 3, lr=LR))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    model, matrices, windows = clustered_tiny(spec)
    same = finetune_centroids(model, matrices, windows, 0)
    assert all(torch.equal(same[n], matrices[n].codebook) for n in matrices)


def test_bad_input_raises_one_clear_error():
    model, matrices, windows = clustered_tiny(KMeansSpec(k=4))
    with pytest.raises(UnweightError, match="steps"):
        finetune_centroids(model, matrices, windows, -1)
    with pytest.raises(UnweightError, match="windows"):
        finetune_centroids(model, matrices, windows[0], 1)
