"""Calibrated sensitivity of every decoder Linear: Wanda scores, squared gradients, and the measured
loss increase when part of one matrix is zeroed.

Three views of how much a matrix's weights matter, from cheap to exact:

- **Wanda score** (Sun, Liu, Bair & Kolter, 2023, arXiv 2306.11695): S_ij = |W_ij| * ||X_j||_2, the
  weight's magnitude times the L2 norm of its input column over the calibration tokens. ||X_j|| is
  accumulated by forward hooks on the Linears' inputs; per matrix we report quantiles of S.
- **Squared-gradient (empirical Fisher) sensitivity** (Optimal Brain Damage, LeCun et al., 1990; the
  weighting of SqueezeLLM, Kim et al., 2023): F_ij = mean over calibration windows n of
  (dL_n / dW_ij)^2, L_n the mean token NLL of window n, one backward pass per window. The second-order
  estimate of the loss increase of a weight change delta is 1/2 sum_ij F_ij delta_ij^2
  (:func:`fisher_estimate`); per matrix we report sum F (the trace of its Fisher block) and
  ``fisher_zero`` = 1/2 sum F_ij W_ij^2, the estimate for zeroing the whole matrix. Windows are whole
  sequences, so F is the Fisher of the window-mean loss: it ranks matrices and options; its absolute
  scale is not a measured loss (the measured column is).
- **Measured** (:class:`TailLoss`): the mean token NLL on measurement windows with one matrix changed,
  every other weight intact, the matrix restored afterwards. The hidden states entering every decoder
  block are cached once, so a change in block i recomputes only blocks i..L-1 and the head. With
  ``stride`` s > 1 only every s-th position's next token is scored (positions 0, s, 2s, ... of each
  window; every position still runs through the blocks): the LM head, a large part of the cost when
  the vocabulary is large (Gemma 3: 262k x 640, more than all 18 blocks), shrinks s-fold.

A sentence encoder has no next-token loss: :class:`EmbeddingLoss` measures instead the mean cosine
distance 1 - cos(e', e) of each calibration text's embedding (mean-pooled last hidden state, as
all-MiniLM-L6-v2 is used) to the unchanged model's. Both probes expose ``reference``, the quantity a
tolerance is relative to: the base loss for :class:`TailLoss`, 1 for :class:`EmbeddingLoss` (a
tolerance of 0.01 then means "embeddings keep a cosine of at least 0.99 on average").

The zeroing sweep (:func:`zeroing_sweep`) zeroes the lowest-scoring fraction x of one matrix's weights,
compared per output row (Wanda's comparison group: every row loses round(x * in_features) weights),
for x in :data:`ZERO_FRACTIONS`, and further up the :data:`EXTRA_FRACTIONS` ladder while the loss
increase stays under the tolerance. :func:`redundant_fraction` turns a sweep into the largest fraction
whose loss increase relative to ``reference`` (and that of every smaller fraction) is below the
tolerance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from unweight.calibrate import BlockStandIn, decoder_layers
from unweight.errors import UnweightError
from unweight.prune.nm import lowest_mask
from unweight.prune.wanda import wanda_scores

ZERO_FRACTIONS = (0.1, 0.3, 0.5)
EXTRA_FRACTIONS = (0.7, 0.9)  # tried only while the matrix stays under the tolerance
REDUNDANCY_TOLERANCE = 0.01  # relative loss increase: "< 1% loss increase"
SCORE_QUANTILES = (0.1, 0.5, 0.9, 0.99)
METRICS = ("nll", "kl")


def decoder_linears(model: nn.Module) -> dict[str, tuple[int, nn.Linear]]:
    """Every ``nn.Linear`` inside a decoder block, by its weight's name in the model's state dict
    (``model.layers.3.mlp.down_proj.weight``), with the index of its block."""
    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    found = {}
    for i, block in enumerate(layers):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                found[f"{prefix}.{i}.{name}.weight"] = (i, module)
    return found


def token_nll(logits: torch.Tensor, ids: torch.Tensor,
              positions: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every scored token, flat: ``logits`` [b, t, V] for ``ids`` [b, t]; with
    ``positions``, ``logits`` [b, len(positions), V] holds only those positions (each < t - 1)."""
    if positions is None:
        logits, targets = logits[:, :-1], ids[:, 1:]
    else:
        targets = ids[:, positions + 1]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL, tokens scored) of ``logits`` [b, t, V] for ``ids`` [b, t]."""
    nll = token_nll(logits, ids)
    return nll.sum(), nll.numel()


# ----------------------------------------------------------------------------- statistics

@dataclass
class CalibrationStats:
    """What one pass over the calibration windows collects for every decoder Linear (by weight name)."""

    sq_norm: dict[str, torch.Tensor]  # sum over tokens of x_j^2 per input column (float64)
    max_abs: dict[str, torch.Tensor]  # max over tokens of |x_j| per input column
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # mean squared gradient per weight
    hidden_max: torch.Tensor | None = None  # [blocks + 1, hidden]: max |h| per channel of each
    # output_hidden_states entry (entry i enters block i; the last one is after the final norm)
    loss: float = float("nan")  # mean token NLL over the windows
    tokens: int = 0
    windows: int = 0


def collect_statistics(model: nn.Module, windows: torch.Tensor, fisher: bool = True,
                       progress: bool = True) -> CalibrationStats:
    """One pass over ``windows`` ([n, seq_len] token ids), one window at a time.

    Forward hooks on the decoder Linears accumulate ||X_j||^2 and max |X_j|; ``output_hidden_states``
    gives the per-channel max |h| of the residual stream; with ``fisher`` each window's mean NLL is
    back-propagated to the decoder Linear weights only (nothing else gets a gradient) and the squared
    gradients are averaged over windows."""
    linears = decoder_linears(model)
    stats = CalibrationStats(
        sq_norm={n: torch.zeros(m.in_features, dtype=torch.float64) for n, (_, m) in linears.items()},
        max_abs={n: torch.zeros(m.in_features) for n, (_, m) in linears.items()},
    )
    if fisher:
        stats.fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, (_, m) in linears.items()}

    handles = _input_hooks(linears, stats)
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, m in linears.values():
        m.weight.requires_grad_(fisher)
    nll_sum = 0.0
    try:
        for ids in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            ids = ids[None]
            with torch.set_grad_enabled(fisher):
                out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
                nll, n = window_nll(out.logits, ids)
                if fisher:
                    (nll / n).backward()
            nll_sum += float(nll.detach())
            stats.tokens += n
            stats.windows += 1
            peaks = torch.stack([h.detach()[0].abs().amax(0).float() for h in out.hidden_states])
            stats.hidden_max = peaks if stats.hidden_max is None else torch.maximum(stats.hidden_max, peaks)
            del out
            if fisher:
                for name, (_, m) in linears.items():
                    stats.fisher[name] += m.weight.grad.float().square()
                    m.weight.grad = None
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    for f in stats.fisher.values():
        f /= max(1, stats.windows)
    stats.loss = nll_sum / max(1, stats.tokens)
    return stats


def _input_hooks(linears: dict, stats: CalibrationStats) -> list:
    """Forward hooks accumulating ||X_j||^2 and max |X_j| of every Linear's input into ``stats``.

    Padding positions count too (an encoder's padded batch): their inputs are small and rare here."""

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, module.in_features).float()
            stats.sq_norm[name] += x.square().sum(0, dtype=torch.float64)
            torch.maximum(stats.max_abs[name], x.abs().amax(0), out=stats.max_abs[name])
        return fn

    return [m.register_forward_hook(hook(n)) for n, (_, m) in linears.items()]


def fisher_estimate(fisher: torch.Tensor, delta: torch.Tensor) -> float:
    """1/2 sum F_ij delta_ij^2: the diagonal second-order estimate of the loss change of ``delta``."""
    return 0.5 * float((fisher.double() * delta.double().square()).sum())


def matrix_sensitivity(w: torch.Tensor, sq_norm: torch.Tensor, fisher: torch.Tensor | None) -> dict:
    """Per-matrix summary: Wanda score quantiles and, with ``fisher``, its trace and ``fisher_zero``."""
    scores = wanda_scores(w, sq_norm).reshape(-1)
    q = torch.quantile(scores, torch.tensor(SCORE_QUANTILES, dtype=scores.dtype)) \
        if scores.numel() <= 1 << 24 else torch.sort(scores).values[
            (torch.tensor(SCORE_QUANTILES) * (scores.numel() - 1)).long()]
    row = {f"wanda_q{round(p * 100)}": float(v) for p, v in zip(SCORE_QUANTILES, q)}
    if fisher is not None:
        row["fisher_sum"] = float(fisher.double().sum())
        row["fisher_zero"] = fisher_estimate(fisher, w)
    return row


# ----------------------------------------------------------------------------- measured losses

class _Replay(BlockStandIn):
    """Stands in for a decoder block that need not run: returns the cached input of the first block
    that does (the model's loop passes it on to the next stand-in, then to that block)."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__(block)
        self.as_tuple, self.hidden = as_tuple, None

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextlib.contextmanager
def _swapped(linears: dict, changes: dict[str, torch.Tensor]):
    """The Linears' weights replaced by ``changes`` for the duration, then restored."""
    saved = {}
    try:
        for name, weight in changes.items():
            linear = linears[name][1]
            saved[name] = linear.weight.data
            linear.weight.data = weight.to(saved[name].dtype).reshape(saved[name].shape)
        yield
    finally:
        for name, data in saved.items():
            linears[name][1].weight.data = data


class TailLoss:
    """Token NLLs on fixed ``windows`` with one matrix changed, recomputing only the blocks from that
    matrix's block on (see the module docstring). Windows run one at a time.

    ``metric`` says what :meth:`measure` returns per scored token: ``"nll"``, the increase of the
    next-token NLL; or ``"kl"``, KL(base || changed) of the next-token distributions. For a model
    close to the data distribution the expected NLL increase is about the KL, and the KL is never
    negative and far less noisy on a short slice (it compares whole distributions, not one sampled
    token): the planner's choice. The base log-probabilities are then kept (tokens x vocabulary).
    Increases come with the standard error of the per-token mean (tokens treated as independent,
    which neighbouring tokens are not quite: read it as a lower bound on the noise)."""

    @torch.no_grad()
    def __init__(self, model: nn.Module, windows: torch.Tensor, stride: int = 1, metric: str = "nll",
                 progress: bool = False):
        if stride < 1 or stride >= windows.shape[1]:
            raise UnweightError(f"score stride must lie in 1..{windows.shape[1] - 1}, got {stride}")
        if metric not in METRICS:
            raise UnweightError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")
        self.model, self.windows, self.metric = model, windows, metric
        self.base_logp: list[torch.Tensor] = []  # per window, with metric "kl"
        self.positions = torch.arange(0, windows.shape[1] - 1, stride) if stride > 1 else None
        self.keep = self.positions if self.positions is not None else 0  # logits_to_keep: 0 = all
        self.layers = decoder_layers(model)
        self.linears = decoder_linears(model)
        self.inputs: list[list[torch.Tensor]] = []  # [window][block]: hidden states entering it
        self.as_tuple = False
        self.forwards = 0
        current: list[torch.Tensor] = []

        def pre_hook(module, args, kwargs):
            current.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        def post_hook(module, args, output):
            self.as_tuple = isinstance(output, (tuple, list))

        handles = [b.register_forward_pre_hook(pre_hook, with_kwargs=True) for b in self.layers]
        handles.append(self.layers[0].register_forward_hook(post_hook))
        nll = []
        try:
            for ids in tqdm(windows, desc="cache", unit="window", disable=not progress):
                current = []
                logits = model(input_ids=ids[None], use_cache=False, logits_to_keep=self.keep).logits
                nll.append(token_nll(logits, ids[None], self.positions))
                if metric == "kl":
                    self.base_logp.append(self._logp(logits))
                self.inputs.append(current)
        finally:
            for h in handles:
                h.remove()
        self.base_tokens = torch.cat(nll)
        self.tokens = self.base_tokens.numel()
        self.base = float(self.base_tokens.double().mean())

    def _logp(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the scored positions, [tokens, vocabulary]."""
        scored = logits[0, :-1] if self.positions is None else logits[0]
        return F.log_softmax(scored.float(), dim=-1)

    @torch.no_grad()
    def token_losses(self, start: int = 0) -> torch.Tensor:
        """Per-token values of the metric recomputed from block ``start`` on (cached inputs stand in
        for the blocks before): NLLs, or KL(base || now) with metric "kl"."""
        originals = list(self.layers)
        stubs = [_Replay(b, self.as_tuple) for b in originals[:start]]
        nll = []
        try:
            for i, stub in enumerate(stubs):
                self.layers[i] = stub
            for w, ids in enumerate(self.windows):
                for stub in stubs:
                    stub.hidden = self.inputs[w][start]
                logits = self.model(input_ids=ids[None], use_cache=False, logits_to_keep=self.keep).logits
                if self.metric == "kl":
                    base = self.base_logp[w]
                    nll.append((base.exp() * (base - self._logp(logits))).sum(-1))
                else:
                    nll.append(token_nll(logits, ids[None], self.positions))
        finally:
            for i, block in enumerate(originals):
                self.layers[i] = block
        self.forwards += 1
        return torch.cat(nll)

    @property
    def reference(self) -> float:
        """What tolerances are relative to: the base loss."""
        return self.base

    def loss(self, start: int = 0) -> float:
        """Mean of the metric recomputed from block ``start`` on (KL: 0 for the unchanged model)."""
        return float(self.token_losses(start).double().mean())

    @torch.no_grad()
    @torch.no_grad()
    def _tokens_with(self, changes: dict[str, torch.Tensor]) -> torch.Tensor:
        blocks = []
        for name in changes:
            if name not in self.linears:
                raise UnweightError(f"{name}: not a decoder Linear weight of this model")
            blocks.append(self.linears[name][0])
        with _swapped(self.linears, changes):
            return self.token_losses(min(blocks))

    def with_weight(self, name: str, weight: torch.Tensor) -> float:
        """Mean metric with decoder Linear ``name``'s weight replaced by ``weight``, then restored."""
        return float(self._tokens_with({name: weight}).double().mean())

    def measure_many(self, changes: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(loss increase over the unchanged model in nats per token, its standard error) with every
        weight in ``changes`` replaced at once: the NLL increase, or with metric "kl" the KL from the
        unchanged model's distributions."""
        delta = self._tokens_with(changes).double()
        if self.metric == "nll":
            delta = delta - self.base_tokens.double()
        se = float(delta.std() / delta.numel() ** 0.5) if delta.numel() > 1 else float("nan")
        return float(delta.mean()), se

    def measure(self, name: str, weight: torch.Tensor) -> tuple[float, float]:
        """:meth:`measure_many` of one matrix."""
        return self.measure_many({name: weight})

    def increase(self, name: str, weight: torch.Tensor) -> float:
        """Loss increase (nats per token) over the unchanged model of :meth:`with_weight`."""
        return self.measure(name, weight)[0]


class EmbeddingLoss:
    """Mean cosine distance of each text's embedding to the unchanged model's (see the module
    docstring), with one matrix changed; the :class:`TailLoss` interface. ``batch`` holds the
    tokenized texts (``input_ids``, ``attention_mask``), run at once."""

    reference = 1.0
    base = 0.0

    @torch.no_grad()
    def __init__(self, model: nn.Module, batch: dict, stats: CalibrationStats | None = None):
        self.model, self.batch = model, batch
        self.linears = decoder_linears(model)
        self.forwards = 0
        handles = _input_hooks(self.linears, stats) if stats is not None else []
        try:
            out = model(**batch, output_hidden_states=stats is not None)
        finally:
            for h in handles:
                h.remove()
        self.embeddings = self._pool(out.last_hidden_state)
        self.tokens = int(batch["attention_mask"].sum())
        if stats is not None:
            mask = batch["attention_mask"].bool()
            stats.hidden_max = torch.stack([h[mask].abs().amax(0).float() for h in out.hidden_states])
            stats.tokens, stats.windows, stats.loss = self.tokens, len(mask), 0.0

    def _pool(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    @torch.no_grad()
    def measure_many(self, changes: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(mean cosine distance to the original embeddings, its standard error over texts) with
        every weight in ``changes`` replaced at once."""
        for name in changes:
            if name not in self.linears:
                raise UnweightError(f"{name}: not a Linear weight of this model's blocks")
        with _swapped(self.linears, changes):
            pooled = self._pool(self.model(**self.batch).last_hidden_state)
        self.forwards += 1
        distance = (1 - (pooled * self.embeddings).sum(-1)).double()
        return float(distance.mean()), float(distance.std() / len(distance) ** 0.5)

    def measure(self, name: str, weight: torch.Tensor) -> tuple[float, float]:
        return self.measure_many({name: weight})

    def increase(self, name: str, weight: torch.Tensor) -> float:
        return self.measure(name, weight)[0]


def encoder_statistics(model: nn.Module, batch: dict) -> tuple[CalibrationStats, EmbeddingLoss]:
    """||X_j||^2 and max |X_j| of every block Linear, and the residual stream's channel maxima, from
    one forward pass of ``batch``; and the :class:`EmbeddingLoss` probe on the same texts."""
    linears = decoder_linears(model)
    stats = CalibrationStats(
        sq_norm={n: torch.zeros(m.in_features, dtype=torch.float64) for n, (_, m) in linears.items()},
        max_abs={n: torch.zeros(m.in_features) for n, (_, m) in linears.items()},
    )
    return stats, EmbeddingLoss(model, batch, stats)


def zero_lowest(w: torch.Tensor, sq_norm: torch.Tensor, fraction: float) -> torch.Tensor:
    """``w`` with the ``fraction`` lowest Wanda scores of every output row set to zero (1.0: all)."""
    if fraction >= 1.0:
        return torch.zeros_like(w)
    k = int(round(fraction * w.shape[1]))
    return w * lowest_mask(wanda_scores(w, sq_norm), k, dim=1)


def zeroing_sweep(tail: TailLoss, name: str, sq_norm: torch.Tensor,
                  fractions: Iterable[float] = ZERO_FRACTIONS,
                  extra: Iterable[float] = EXTRA_FRACTIONS,
                  tolerance: float = REDUNDANCY_TOLERANCE) -> dict[float, tuple[float, float]]:
    """{fraction: (measured loss increase, its standard error)} for zeroing the lowest-scoring
    ``fraction`` of matrix ``name``; the ``extra`` fractions follow only while every increase so far
    is under ``tolerance`` (relative to ``tail.reference``)."""
    w = tail.linears[name][1].weight.data
    result = {}
    for f in fractions:
        result[f] = tail.measure(name, zero_lowest(w, sq_norm, f))
    for f in extra:
        if max(delta for delta, _ in result.values()) >= tolerance * tail.reference:
            break
        result[f] = tail.measure(name, zero_lowest(w, sq_norm, f))
    return result


def redundant_fraction(increases: dict[float, float], reference: float,
                       tolerance: float = REDUNDANCY_TOLERANCE) -> float:
    """The largest fraction whose increase relative to ``reference``, and that of every smaller one,
    is below ``tolerance`` (0.0 when even the smallest is not)."""
    best = 0.0
    for f in sorted(increases):
        if increases[f] >= tolerance * reference:
            break
        best = f
    return best


def joint_increase(probe, sq_norm: dict[str, torch.Tensor],
                   fractions: dict[str, float]) -> tuple[float, float]:
    """Measured increase (and its standard error) when every matrix in ``fractions`` loses its own
    fraction of lowest-Wanda weights at the same time: what the per-matrix redundancy would cost if
    it were all taken at once."""
    changes = {name: zero_lowest(probe.linears[name][1].weight.data, sq_norm[name], f)
               for name, f in fractions.items() if f > 0}
    return probe.measure_many(changes) if changes else (0.0, 0.0)
