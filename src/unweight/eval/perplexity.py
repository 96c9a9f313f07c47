"""Perplexity, KL divergence from a base model and top-1 agreement, under one pinned protocol.

The protocol (DESIGN.md): the corpus' documents are joined with "\\n\\n" and tokenized once; the token
stream is cut into non-overlapping windows of ``seq_len`` tokens (the remainder is dropped); each
window is scored independently, so it contributes ``seq_len - 1`` predicted tokens. A tokenizer that
puts a BOS token before text (Gemma, Llama) gets it at the start of every window, followed by the next
``seq_len - 1`` text tokens: such models are trained that way, and without it Gemma 3's perplexity is
4.6x higher (104.5 vs 22.9 on four 256-token Austen windows); perplexity is
exp of the mean token NLL over all windows. Bits per byte divide the total NLL (in bits) by the UTF-8
bytes of the predicted tokens, so models with different tokenizers compare. KL(base || model) and the
top-1 agreement are computed on the same windows, one window at a time (never all logits in memory).
"""

from __future__ import annotations

import itertools
import math
import resource
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from unweight.errors import UnweightError

DEFAULT_SEQ_LEN = 1024


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean token NLL in nats
    bits_per_byte: float
    tokens: int  # predicted tokens scored
    windows: int
    seq_len: int
    kl: float | None = None  # mean KL(base || model) per token, nats
    top1_agreement: float | None = None
    tokens_per_s: float = 0.0  # the evaluated model's forward passes only
    seconds: float = 0.0
    peak_rss_mb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def leading_bos(tokenizer) -> int | None:
    """The BOS id that ``tokenizer`` puts before text by default, or None (SmolLM2 and GPT-2 add none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def text_tokens(tokenizer, documents: list[str]) -> list[int]:
    """The documents joined with "\n\n" and tokenized once, without special tokens."""
    return tokenizer("\n\n".join(documents), add_special_tokens=False, return_attention_mask=False)["input_ids"]


def window_slots(n_ids: int, seq_len: int, bos: int | None) -> int:
    """How many whole windows of ``seq_len`` tokens ``n_ids`` text tokens fill (one per window is BOS)."""
    if seq_len < 2:
        raise UnweightError(f"seq_len must be at least 2, got {seq_len}")
    return n_ids // (seq_len - (bos is not None))


def cut_window(ids: list[int], slot: int, seq_len: int, bos: int | None) -> list[int]:
    """Window number ``slot``: the next text tokens, after the BOS token when there is one."""
    if bos is None:
        return ids[slot * seq_len:(slot + 1) * seq_len]
    width = seq_len - 1
    return [bos] + ids[slot * width:(slot + 1) * width]


def token_windows(tokenizer, documents: list[str], seq_len: int = DEFAULT_SEQ_LEN,
                  max_tokens: int | None = None) -> torch.Tensor:
    """The protocol's windows: [n_windows, seq_len] token ids; ``max_tokens`` keeps the first windows."""
    bos = leading_bos(tokenizer)
    ids = text_tokens(tokenizer, documents)
    n = window_slots(len(ids), seq_len, bos)
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n == 0:
        raise UnweightError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return torch.tensor([cut_window(ids, s, seq_len, bos) for s in range(n)], dtype=torch.long)


def window_bytes(tokenizer, windows: torch.Tensor) -> int:
    """UTF-8 bytes of the predicted tokens (positions 1..seq_len-1 of every window; never a BOS)."""
    return sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows)


def _device(model) -> torch.device:
    """Where ``model``'s first parameter (or buffer) is; the CPU for a model with neither."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@torch.no_grad()
def _logits(model, window: torch.Tensor) -> torch.Tensor:
    return model(input_ids=window[None]).logits[0, :-1].float()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, tokenizer=None, base=None, progress: bool = True,
             desc: str = "eval") -> EvalResult:
    """Score ``model`` on ``windows`` (moved to its device); with ``base`` also KL(base || model) and top-1
    agreement."""
    nll_sum, kl_sum, agree, tokens = 0.0, 0.0, 0, 0
    model_seconds = 0.0
    start = time.perf_counter()
    device = _device(model)
    base_device = None if base is None else _device(base)
    for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
        window = window.to(device)
        t0 = time.perf_counter()
        logits = _logits(model, window)
        model_seconds += time.perf_counter() - t0
        logp = F.log_softmax(logits, dim=-1)
        del logits
        targets = window[1:]
        nll_sum += -logp.gather(1, targets[:, None]).sum().item()
        tokens += targets.numel()
        if base is not None:
            base_logp = F.log_softmax(_logits(base, window.to(base_device)), dim=-1).to(device)
            kl_sum += F.kl_div(logp, base_logp, log_target=True, reduction="sum").item()
            agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            del base_logp
        del logp
    nll = nll_sum / tokens
    n_bytes = window_bytes(tokenizer, windows) if tokenizer is not None else 0
    return EvalResult(
        perplexity=math.exp(nll),
        nll=nll,
        bits_per_byte=nll_sum / math.log(2) / n_bytes if n_bytes else float("nan"),
        tokens=tokens,
        windows=len(windows),
        seq_len=windows.shape[1],
        kl=kl_sum / tokens if base is not None else None,
        top1_agreement=agree / tokens if base is not None else None,
        tokens_per_s=windows.numel() / model_seconds if model_seconds else 0.0,
        seconds=time.perf_counter() - start,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
