"""The rank study: do only the relative ranks of clustered weights matter? (arXiv 2603.17917)

Every Linear matrix of the decoder blocks is clustered once (exact per-matrix K-means,
:func:`unweight.cluster.cluster_tensor`); the assignments then stay fixed and only centroid values
change (:mod:`unweight.study.perturb`). On one loaded model (:class:`~unweight.study.harness.Harness`):

1. **Per-layer scans.** One matrix at a time, everything else original: the clustered matrix with
   scrambled centroids, rank-preserving redrawn centroids (several seeds each) and the clustered
   matrix itself (control). Perplexity, KL from the base model, top-1 agreement.
2. **Progressive replacement.** Blocks are replaced cumulatively (0, 1, ... and in reverse), every
   matrix of a replaced block clustered (control and rank-preserving centroids), with and without the
   affine correction (:func:`unweight.cluster.affine.fit_moments`), tracking perplexity, the weight
   std ratio of each block to the original and the hidden-state norm ratio of each block's output to
   the base model's. A curve stops once perplexity passes ``collapse_factor`` x the base (collapse:
   such numbers are unstable and no longer compared).
3. **Survival.** For each curve, how many blocks are replaced before perplexity first doubles.

Super-weight candidates (robust z-scores, :mod:`unweight.analysis.outliers`) are recorded for every
matrix so the summary can ask whether they explain the layers that hurt most. ``keep_outliers``
(default 0, the paper's setting) keeps that many top-z weights of each matrix at their original
values in every variant (dense-and-sparse), to separate super weights from the rest of the story.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from unweight.analysis.outliers import robust_zscore, super_weight_candidates
from unweight.cluster import cluster_tensor
from unweight.cluster.affine import IDENTITY, Affine, apply_affine, fit_moments
from unweight.errors import UnweightError
from unweight.study.harness import Harness, Score
from unweight.study.perturb import rank_preserving, scramble

# "scramble" permutes the centroids: their multiset (and its mean and variance) is kept, but the
# decoded matrix's mean and std change, because clusters differ in size. "scramble+match" then maps the
# permuted centroids affinely (a > 0, order untouched) so that the decoded matrix has the clustered
# matrix's mean and std: rank order destroyed, global statistics of the matrix kept. "rank" redraws
# centroids in the original order with the clustered matrix's mean and std (cluster counts as weights).
SCAN_VARIANTS = ("control", "scramble", "scramble+match", "rank")  # control is deterministic: measured once
PROGRESSIVE_VARIANTS = ("control", "control+affine", "rank", "rank+affine")
ORDERS = ("forward", "reverse")
DOUBLING = 2.0  # "survives" while perplexity < DOUBLING x base
CANDIDATES_PER_MATRIX = 2


@dataclass
class RankStudyConfig:
    # Defaults: the full study on smollm2-135m (30 blocks) in ~33 min on one core of a busy 2-core
    # machine: 2 seeds, one 256-token window, every other block scanned, all 30 replaced progressively.
    k: int = 16
    seeds: int = 2  # seeds per random perturbation in the per-layer scans
    seq_len: int = 256
    max_tokens: int = 256  # evaluation slice: the first max_tokens // seq_len windows
    scan_blocks: list[int] | None = None  # None: every scan_every-th block from block 0
    scan_every: int = 2
    scan_variants: tuple[str, ...] = SCAN_VARIANTS
    matrices: list[str] | None = None  # matrix names within a block (e.g. "mlp.down_proj"); None: all
    progressive_steps: int | None = None  # None: every block
    keep_outliers: int = 0
    collapse_factor: float = 20.0
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> RankStudyConfig:
        """For tests and smoke runs: two blocks, one seed, one short window, two progressive steps."""
        base = dict(seeds=1, seq_len=128, max_tokens=128, scan_blocks=[0, -1], progressive_steps=2)
        return cls(**{**base, **overrides})


@dataclass
class Clustered:
    centroids: torch.Tensor  # float32 [K]
    assignments: torch.Tensor  # uint8, the matrix's shape
    counts: torch.Tensor  # float64 [K], members per centroid
    kept_index: torch.Tensor  # int64 flat positions kept at their original values
    kept_values: torch.Tensor
    info: dict = field(default_factory=dict)


def _generator(seed: int, *key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(":".join(map(str, (seed, *key))).encode()))


def _std(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).std(correction=0))


def _tail(centroids: torch.Tensor) -> float:
    """Spread of the codebook's extremes: max |c - median(c)|."""
    c = centroids.to(torch.float64)
    return float((c - c.median()).abs().max())


def cluster_matrix(w: torch.Tensor, k: int, keep_outliers: int = 0) -> Clustered:
    """Per-matrix K-means codebook of ``w`` and its robust-z outlier record."""
    bf16 = w.to(torch.bfloat16)
    src = bf16 if torch.equal(bf16.to(w.dtype), w) else w  # bf16-exact weights take the fast path
    codebook, assignments = cluster_tensor(src, k)
    centroids = codebook[0]
    counts = torch.bincount(assignments.reshape(-1).to(torch.int64), minlength=k).to(torch.float64)
    z = robust_zscore(w)
    kept = torch.topk(z.reshape(-1), keep_outliers).indices if keep_outliers else torch.zeros(0, dtype=torch.int64)
    decoded = centroids[assignments.to(torch.int64)]
    decoded.view(-1)[kept] = w.reshape(-1)[kept].to(decoded.dtype)
    info = {
        "shape": list(w.shape),
        "std": _std(w),
        "max_z": float(z.max()),
        "candidates": [
            {**c._asdict(), "clustered": float(decoded[c.row, c.col])}
            for c in super_weight_candidates(w, CANDIDATES_PER_MATRIX)
        ],
    }
    return Clustered(centroids, assignments, counts, kept, w.reshape(-1)[kept].clone(), info)


def decode(c: Clustered, centroids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense matrix for ``centroids`` under the fixed assignments, kept outliers restored."""
    w = centroids.to(dtype)[c.assignments.to(torch.int64)]
    if c.kept_index.numel():
        w.view(-1)[c.kept_index] = c.kept_values.to(dtype)
    return w


def variant_centroids(c: Clustered, variant: str, generator: torch.Generator | None,
                      original: torch.Tensor) -> tuple[torch.Tensor, Affine]:
    """Centroids for a variant: "control", "scramble" or "rank", optionally followed by "+affine"
    (moments of the original matrix) or "+match" (moments of the clustered matrix); and the map used."""
    kind, _, correction = variant.partition("+")
    if kind == "control":
        cents = c.centroids
    elif kind == "scramble":
        cents = scramble(c.centroids, generator)
    elif kind == "rank":
        cents = rank_preserving(c.centroids, generator, weights=c.counts)
    else:
        raise UnweightError(f"unknown perturbation {variant!r}")
    affine = IDENTITY
    if correction == "affine":  # back to the original matrix's mean and std
        affine = fit_moments(original, decode(c, cents, original.dtype))
    elif correction == "match":  # to the clustered (control) matrix's mean and std
        affine = fit_moments(decode(c, c.centroids, original.dtype), decode(c, cents, original.dtype))
    elif correction:
        raise UnweightError(f"unknown correction {correction!r} in {variant!r}")
    return (apply_affine(cents, affine) if correction else cents), affine


def _row(score: Score, **fields) -> dict:
    return {**fields, "perplexity": score.perplexity, "nll": score.nll, "kl": score.kl,
            "top1_agreement": score.top1_agreement}


def _blocks(spec: list[int] | None, n: int, every: int = 1) -> list[int]:
    if spec is None:
        return list(range(0, n, max(1, every)))
    out = sorted({b % n if -n <= b < n else -1 for b in spec})
    if -1 in out:
        raise UnweightError(f"blocks {spec}: the model has {n} decoder blocks (0..{n - 1})")
    return out


def run_rank_study(harness: Harness, config: RankStudyConfig,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Every measurement of the study as one JSON-ready dict (see the module docstring)."""
    start = time.perf_counter()
    n = harness.n_blocks
    scan_blocks = _blocks(config.scan_blocks, n, config.scan_every)
    matrices = config.matrices or harness.matrix_names
    unknown = sorted(set(matrices) - set(harness.matrix_names))
    if unknown:
        raise UnweightError(f"unknown matrices {unknown}; a block holds {harness.matrix_names}")
    bad = sorted(set(config.scan_variants) - set(SCAN_VARIANTS))
    if bad:
        raise UnweightError(f"unknown scan variants {bad}; choose from {SCAN_VARIANTS}")
    steps = min(config.progressive_steps or n, n)
    forward_blocks, reverse_blocks = list(range(steps)), list(range(n - 1, n - 1 - steps, -1))
    needed = sorted(set(scan_blocks) | set(forward_blocks) | set(reverse_blocks))

    base = harness.base
    log(f"base: perplexity {base.perplexity:.3f} on {base.tokens} tokens "
        f"({len(harness.windows)} x {harness.windows.shape[1]}); suffix forwards "
        f"{'on' if harness.suffix_ok else 'off (check failed)'}")

    # Cluster once; assignments stay fixed from here on.
    t0 = time.perf_counter()
    clustered: dict[tuple[int, str], Clustered] = {}
    matrix_rows = []
    for b in needed:
        for name in harness.matrix_names:
            w = harness.original(b, name)
            c = cluster_matrix(w, config.k, config.keep_outliers)
            clustered[b, name] = c
            control = decode(c, c.centroids, w.dtype)
            affine = fit_moments(w, control)
            c.info.update(std_ratio_control=_std(control) / c.info["std"], affine_a=affine.a, affine_b=affine.b)
            matrix_rows.append({"block": b, "matrix": name, **c.info})
    cluster_seconds = time.perf_counter() - t0
    log(f"clustered {len(clustered)} matrices at K={config.k} in {cluster_seconds:.1f} s")

    def weights(b: int, name: str, variant: str, seed: int) -> torch.Tensor:
        # The draw depends on the perturbation, not on the correction: "rank" and "rank+affine"
        # share their centroids, so the affine map is the only difference between them.
        kind = variant.partition("+")[0]
        gen = None if kind == "control" else _generator(config.seed + seed, b, name, kind)
        w = harness.original(b, name)
        cents, _ = variant_centroids(clustered[b, name], variant, gen, w)
        return decode(clustered[b, name], cents, w.dtype), cents

    def install(b: int, name: str, variant: str, seed: int) -> dict:
        """Install a variant; its drift statistics: matrix std and extreme-centroid ratios to the control's."""
        new, cents = weights(b, name, variant, seed)
        harness.set_weight(b, name, new)
        c = clustered[b, name]
        return {"std_ratio": _std(new) / c.info["std"], "tail_ratio": _tail(cents) / _tail(c.centroids)}

    # Weight drift of every block under each progressive variant (weights only, no forward).
    block_std = []
    for b in needed:
        for v in PROGRESSIVE_VARIANTS:
            per = {name: _std(weights(b, name, v, 0)[0]) / clustered[b, name].info["std"]
                   for name in harness.matrix_names}
            block_std.append({"block": b, "variant": v, "std_ratio": sum(per.values()) / len(per),
                              "per_matrix": per})

    # 1. Per-layer scans.
    t0 = time.perf_counter()
    scans = []
    for b in scan_blocks:
        for name in matrices:
            for variant in config.scan_variants:
                for seed in range(1 if variant == "control" else config.seeds):
                    drift = install(b, name, variant, seed)
                    s = harness.score(first_changed=b, norms=True)
                    harness.restore(b, name)
                    scans.append(_row(s, block=b, matrix=name, variant=variant, seed=seed, **drift,
                                      last_norm_ratio=s.norm_ratio[-1]))
            worst = max(r["perplexity"] for r in scans if r["block"] == b and r["matrix"] == name)
            log(f"scan block {b:2d} {name:20s} worst perplexity {worst:.4g}")
    scan_seconds = time.perf_counter() - t0

    # 2. Progressive replacement.
    t0 = time.perf_counter()
    progressive = []
    for order, blocks in zip(ORDERS, (forward_blocks, reverse_blocks)):
        for variant in PROGRESSIVE_VARIANTS:
            harness.restore()
            for step, b in enumerate(blocks):
                for name in harness.matrix_names:
                    install(b, name, variant, 0)
                s = harness.score(first_changed=min(blocks[: step + 1]), norms=True)
                progressive.append(_row(s, order=order, variant=variant, step=step, blocks_replaced=step + 1,
                                        block=b, norm_ratio=s.norm_ratio))
                if s.perplexity > config.collapse_factor * base.perplexity:
                    log(f"progressive {order} {variant}: collapsed at {step + 1} blocks "
                        f"(perplexity {s.perplexity:.4g})")
                    break
            log(f"progressive {order:7s} {variant:15s} done")
    harness.restore()
    progressive_seconds = time.perf_counter() - t0

    survival = []
    for order, blocks in zip(ORDERS, (forward_blocks, reverse_blocks)):
        for variant in PROGRESSIVE_VARIANTS:
            curve = [r for r in progressive if r["order"] == order and r["variant"] == variant]
            doubled = next((r for r in curve if r["perplexity"] > DOUBLING * base.perplexity), None)
            survival.append({"order": order, "variant": variant,
                             "survived_blocks": doubled["step"] if doubled else len(curve),
                             "doubled": doubled is not None, "of": len(blocks)})

    return {
        "config": asdict(config),
        "n_blocks": n,
        "matrix_names": harness.matrix_names,
        "scan_blocks": scan_blocks,
        "scan_matrices": list(matrices),
        "windows": {"n": len(harness.windows), "seq_len": int(harness.windows.shape[1]), "tokens": base.tokens},
        "suffix_forwards": harness.suffix_ok,
        "base": {"perplexity": base.perplexity, "nll": base.nll, "block_norms": harness.base_norms},
        "matrices": matrix_rows,
        "scans": scans,
        "progressive": progressive,
        "block_std": block_std,
        "survival": survival,
        "seconds": {"cluster": cluster_seconds, "scans": scan_seconds, "progressive": progressive_seconds,
                    "total": time.perf_counter() - start},
    }
