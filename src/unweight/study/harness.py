"""One loaded model whose decoder-block weight matrices are swapped in place, scored against itself.

Every measurement of the rank study changes a few matrices and scores the model on the same short
evaluation slice, so the model is loaded once and nothing about the base model is computed twice:

- the base model's next-token log-probabilities are kept (KL(base || model) and top-1 agreement need
  them, see :mod:`unweight.eval.perplexity`), so each measurement costs one forward pass, not two;
- the input of every decoder block is kept, so a measurement whose first changed block is i runs
  blocks i..L-1 only (the blocks before i compute exactly what they computed for the base model). The
  suffix forward is checked once against the full forward before it is trusted;
- each block's output (the residual stream) is summarised by the median over tokens of its L2 norm,
  for the hidden-state drift diagnostic (the same tensors ``output_hidden_states`` returns, taken by
  forward hooks so nothing else is kept). The median keeps the few massive-activation tokens
  (attention sinks) from dominating the statistic.

Perplexity and KL follow the pinned protocol's definitions (non-overlapping windows, mean token NLL,
KL in nats per token), on however many windows the study chooses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unweight.errors import UnweightError

SUFFIX_CHECK_ATOL = 1e-3  # max |logit| difference tolerated between suffix and full forward


@dataclass
class Score:
    perplexity: float
    nll: float
    kl: float
    top1_agreement: float
    tokens: int
    norm_ratio: list[float] | None = None  # per block: median token norm / the base model's


def decoder_layers(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, layers): the ModuleList of decoder blocks of a transformers causal LM."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and name.endswith("layers"):
            parent_name, _, attr = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise UnweightError(f"{type(model).__name__}: no ModuleList of {n} decoder blocks found")


def block_matrices(block: torch.nn.Module) -> list[str]:
    """Names (within the block) of the block's Linear layers, in module order."""
    return [name for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class Harness:
    """A model, its evaluation windows and the base model's cached outputs; swap, score, restore."""

    def __init__(self, model, windows: torch.Tensor):
        self.model = model
        self.windows = windows
        self.parent, self.attr, self.layers = decoder_layers(model)
        self.matrix_names = block_matrices(self.layers[0])
        self._originals: dict[tuple[int, str], torch.Tensor] = {}
        self.base_logp: list[torch.Tensor] = []
        self.block_inputs: list[list[torch.Tensor]] = []  # [window][block] -> [1, T, H]
        self.base_norms: list[float] = []
        self.suffix_ok = True
        self.base: Score | None = None
        self._base_pass()

    @property
    def n_blocks(self) -> int:
        return len(self.layers)

    def weight(self, block: int, name: str) -> torch.nn.Parameter:
        return self.layers[block].get_submodule(name).weight

    def original(self, block: int, name: str) -> torch.Tensor:
        """The weight as loaded (also while a replacement is installed)."""
        key = (block, name)
        return self._originals[key] if key in self._originals else self.weight(block, name).data

    # ------------------------------------------------------------------------------ swapping weights

    def set_weight(self, block: int, name: str, value: torch.Tensor) -> None:
        """Install ``value`` in place of the matrix; the original is kept for :meth:`restore`."""
        param = self.weight(block, name)
        if value.shape != param.shape:
            raise UnweightError(f"block {block} {name}: replacement {tuple(value.shape)} does not match "
                                f"{tuple(param.shape)}")
        key = (block, name)
        if key not in self._originals:
            self._originals[key] = param.data.clone()
        param.data.copy_(value)

    def restore(self, block: int | None = None, name: str | None = None) -> None:
        """Put back the original of one matrix, or of every replaced matrix (no arguments)."""
        keys = list(self._originals) if block is None else [(block, name)]
        for key in keys:
            if key in self._originals:
                self.weight(*key).data.copy_(self._originals.pop(key))

    # ------------------------------------------------------------------------------------- forwards

    @torch.no_grad()
    def _forward(self, w: int, first_block: int, norms: list[list[torch.Tensor]] | None) -> torch.Tensor:
        """Logits [T-1, V] of window w, running blocks first_block..L-1 from the cached input."""
        hooks = []
        if norms is not None:
            for i in range(first_block, self.n_blocks):
                hooks.append(self.layers[i].register_forward_hook(
                    lambda _m, _a, out, i=i: norms[i].append(torch.linalg.vector_norm(_hidden(out)[0], dim=-1))))
        try:
            if first_block == 0:
                return self.model(input_ids=self.windows[w][None], use_cache=False).logits[0, :-1].float()
            setattr(self.parent, self.attr, torch.nn.ModuleList(list(self.layers)[first_block:]))
            try:
                out = self.model(inputs_embeds=self.block_inputs[w][first_block], use_cache=False)
            finally:
                setattr(self.parent, self.attr, self.layers)
            return out.logits[0, :-1].float()
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def _base_pass(self) -> None:
        """Score the unmodified model once: cache block inputs, log-probs and block output norms."""
        inputs: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(
            lambda _m, args, kwargs: inputs.append((args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True) for layer in self.layers]
        norms: list[list[torch.Tensor]] = [[] for _ in range(self.n_blocks)]
        try:
            for w in range(len(self.windows)):
                inputs.clear()
                self.base_logp.append(F.log_softmax(self._forward(w, 0, norms), dim=-1))
                self.block_inputs.append(list(inputs))
        finally:
            for h in hooks:
                h.remove()
        self.base_norms = [float(torch.cat(n).median()) for n in norms]
        nll = sum(-float(lp.gather(1, win[1:, None]).sum()) for lp, win in zip(self.base_logp, self.windows))
        tokens = len(self.windows) * (self.windows.shape[1] - 1)
        self.base = Score(perplexity=math.exp(nll / tokens), nll=nll / tokens, kl=0.0, top1_agreement=1.0,
                          tokens=tokens, norm_ratio=[1.0] * self.n_blocks)
        # The suffix forward must reproduce the full one before any measurement relies on it.
        mid = self.n_blocks // 2
        diff = (F.log_softmax(self._forward(0, mid, None), dim=-1) - self.base_logp[0]).abs().max()
        if not float(diff) <= SUFFIX_CHECK_ATOL:
            self.suffix_ok = False

    @torch.no_grad()
    def score(self, first_changed: int = 0, norms: bool = False) -> Score:
        """Perplexity, KL(base || model), top-1 agreement on all windows; optionally the block norm ratios.

        ``first_changed`` is the first block whose weights differ from the base model's: the blocks
        before it are not run (their outputs are the cached ones)."""
        first = first_changed if self.suffix_ok else 0
        collected: list[list[torch.Tensor]] | None = [[] for _ in range(self.n_blocks)] if norms else None
        nll_sum, kl_sum, agree, tokens = 0.0, 0.0, 0, 0
        for w in range(len(self.windows)):
            logp = F.log_softmax(self._forward(w, first, collected), dim=-1)
            base = self.base_logp[w]
            targets = self.windows[w][1:]
            nll_sum += -float(logp.gather(1, targets[:, None]).sum())
            kl_sum += float(F.kl_div(logp, base, log_target=True, reduction="sum"))
            agree += int((base.argmax(-1) == logp.argmax(-1)).sum())
            tokens += targets.numel()
        ratio = None
        if collected is not None:
            ratio = [1.0 if not c else float(torch.cat(c).median()) / b
                     for c, b in zip(collected, self.base_norms)]
        nll = nll_sum / tokens
        return Score(perplexity=math.exp(min(nll, 700.0)), nll=nll, kl=kl_sum / tokens,
                     top1_agreement=agree / tokens, tokens=tokens, norm_ratio=ratio)
