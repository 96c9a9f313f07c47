"""The pinned evaluation protocol (DESIGN.md), stated as properties, on toy models and on the real
smollm2-135m (4 windows of 256 tokens of the Austen evaluation split; see conftest.py).

- windows: the same for every model sharing a tokenizer and every call; non-overlapping, in corpus
  order, starting at the first token; ``max_tokens`` keeps a prefix of them.
- scores: perplexity equals transformers' own loss on the same windows; KL of a model from itself is
  exactly 0 and top-1 agreement 1; the same evaluation twice gives identical numbers; bits per byte is
  the total NLL in bits over the UTF-8 bytes of the predicted tokens.
- conversion: the bf16 folder holds the GGUF weights rounded to bf16, bit for bit, and its logits are
  the GGUF model's up to that rounding (and exactly those of the GGUF model with its weights rounded).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from unweight.checkpoint import open_checkpoint
from unweight.errors import UnweightError
from unweight.eval import evaluate, token_windows

from conftest import MAX_TOKENS, SEQ_LEN

SMOLLM2_PARAMETERS = 134_515_008
EVAL_SPLIT_WINDOWS_512 = 708  # DESIGN.md: 361,788 tokens scored at context 512 = 708 windows x 511


# ------------------------------------------------------------------------------ toy models


class TableModel(torch.nn.Module):
    """A bigram model: the logits at each position are a row of ``table`` picked by the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def _toy_windows(vocab: int = 11, n: int = 3, seq_len: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    windows = _toy_windows()
    r = evaluate(TableModel(torch.zeros(11, 11)), windows, progress=False)
    assert r.perplexity == pytest.approx(11, rel=1e-6) and r.nll == pytest.approx(math.log(11), rel=1e-6)
    assert (r.tokens, r.windows, r.seq_len) == (3 * 16, 3, 17)
    assert r.kl is None and r.top1_agreement is None and math.isnan(r.bits_per_byte)  # no base, no tokenizer


def test_kl_is_the_mean_kl_from_base_to_model_per_token():
    g = torch.Generator().manual_seed(1)
    base_table, model_table = torch.randn(11, 11, generator=g), torch.randn(11, 11, generator=g) * 2
    windows = _toy_windows()
    r = evaluate(TableModel(model_table), windows, base=TableModel(base_table), progress=False)
    p, q = F.log_softmax(base_table, -1), F.log_softmax(model_table, -1)  # base, model
    per_row = (p.exp() * (p - q)).sum(-1)  # KL(base || model) for each current token
    agree = p.argmax(-1) == q.argmax(-1)
    prev = windows[:, :-1].reshape(-1)
    assert r.kl == pytest.approx(per_row[prev].mean().item(), rel=1e-5)
    assert r.top1_agreement == agree[prev].sum().item() / prev.numel()
    reverse = evaluate(TableModel(base_table), windows, base=TableModel(model_table), progress=False)
    assert reverse.kl != pytest.approx(r.kl, rel=1e-3)  # the direction matters: KL(base || model)


class CharTokenizer:
    """Tokens are characters' code points; ``bos`` (if given) is put before text, as Gemma's tokenizer does."""

    def __init__(self, bos: int | None):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.bos_token_id else []) + ids}


def test_a_bos_tokenizer_gets_bos_then_the_next_text_tokens_in_every_window():
    docs = ["abcdefghij", "klmnopqrstuvwxyz"]
    text = [ord(c) for c in "\n\n".join(docs)]  # 28 tokens
    plain = token_windows(CharTokenizer(None), docs, seq_len=5)
    assert plain.tolist() == [text[i:i + 5] for i in range(0, 25, 5)]
    bos = token_windows(CharTokenizer(1), docs, seq_len=5)
    assert bos.shape == (7, 5) and bool((bos[:, 0] == 1).all())
    assert bos[:, 1:].reshape(-1).tolist() == text  # no gap, no overlap, every text token once
    assert token_windows(CharTokenizer(1), docs, seq_len=5, max_tokens=10).tolist() == bos[:2].tolist()
    # a tokenizer that has a BOS token but does not put it before text gets none
    class NoAutoBos(CharTokenizer):
        def __call__(self, text, add_special_tokens=True, return_attention_mask=False):
            return super().__call__(text, False)
    assert torch.equal(token_windows(NoAutoBos(1), docs, seq_len=5), plain)


def test_seq_len_below_two_and_too_short_text_are_refused(smollm2):
    tok = smollm2[1]
    with pytest.raises(UnweightError, match="seq_len"):
        token_windows(tok, ["some text"], seq_len=1)
    with pytest.raises(UnweightError, match="fewer than one window"):
        token_windows(tok, ["too short"], seq_len=256)


# ------------------------------------------------------------------------------ windows on real text


@pytest.mark.slow
def test_windows_are_the_same_across_models_sharing_a_tokenizer_and_across_calls(
        smollm2, smollm2_bf16, eval_docs, windows):
    assert windows.shape == (MAX_TOKENS // SEQ_LEN, SEQ_LEN) and windows.dtype == torch.long
    assert torch.equal(token_windows(smollm2[1], eval_docs, SEQ_LEN, MAX_TOKENS), windows)
    converted_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_bf16))  # tokenizer.json written by convert
    assert torch.equal(token_windows(converted_tokenizer, eval_docs, SEQ_LEN, MAX_TOKENS), windows)


@pytest.mark.slow
def test_windows_tile_the_joined_text_in_order_from_its_start(smollm2, eval_docs, windows):
    tok = smollm2[1]
    text = "\n\n".join(eval_docs)
    pieces = [tok.decode(w.tolist()) for w in windows]
    assert text.startswith("".join(pieces))  # no overlap, no gap, corpus order, first token first
    assert text.startswith(tok.decode(windows.reshape(-1).tolist()))
    assert all(len(p) > SEQ_LEN for p in pieces)


@pytest.mark.slow
def test_max_tokens_keeps_a_prefix_of_the_windows(smollm2, eval_docs):
    tok = smollm2[1]
    every = token_windows(tok, eval_docs, 512)
    assert every.shape == (EVAL_SPLIT_WINDOWS_512, 512)  # all full windows, the remainder dropped
    for max_tokens, n in [(512, 1), (3 * 512 + 511, 3), (10 * 512, 10), (10 ** 9, EVAL_SPLIT_WINDOWS_512)]:
        kept = token_windows(tok, eval_docs, 512, max_tokens)
        assert torch.equal(kept, every[:n]) and kept.numel() <= max_tokens


# ------------------------------------------------------------------------------ scores on the real model


@pytest.mark.slow
def test_perplexity_equals_transformers_loss_on_the_same_windows(smollm2, windows, base_result):
    model = smollm2[0]
    with torch.no_grad():  # one batched call: transformers shifts the labels and averages over all tokens
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert base_result.tokens == windows.shape[0] * (SEQ_LEN - 1)
    assert base_result.nll == pytest.approx(loss, rel=1e-5)
    assert base_result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert 5 < base_result.perplexity < 100  # a trained model on English prose


@pytest.mark.slow
def test_kl_of_a_model_from_itself_is_zero_and_a_second_evaluation_is_identical(smollm2, windows):
    model, tok = smollm2
    some = windows[:2]
    first = evaluate(model, some, tok, progress=False)
    again = evaluate(model, some, tok, base=model, progress=False)
    assert again.kl == 0.0 and again.top1_agreement == 1.0
    for field in ("perplexity", "nll", "bits_per_byte", "tokens", "windows", "seq_len"):
        assert getattr(again, field) == getattr(first, field), field  # with or without a base, bit for bit


@pytest.mark.slow
def test_bits_per_byte_is_total_nll_in_bits_over_the_predicted_bytes(smollm2, windows, base_result):
    tok = smollm2[1]
    # bytes of the predicted tokens = bytes of each window minus the bytes of its first (unpredicted) token
    window_bytes = sum(len(tok.decode(w.tolist()).encode("utf-8")) for w in windows)
    first_bytes = sum(len(tok.decode(w[:1].tolist()).encode("utf-8")) for w in windows)
    predicted_bytes = window_bytes - first_bytes
    assert 3 < predicted_bytes / base_result.tokens < 6  # English prose, a 49k BPE vocabulary
    expected = base_result.nll * base_result.tokens / math.log(2) / predicted_bytes
    assert base_result.bits_per_byte == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------ the converted bf16 folder


@pytest.mark.slow
def test_bf16_folder_holds_the_gguf_weights_rounded_to_bf16(smollm2, smollm2_bf16):
    reference = smollm2[0].state_dict()  # transformers' own GGUF loader: an independent path
    ckpt = open_checkpoint(smollm2_bf16)
    names = ckpt.names()
    assert set(names) == set(reference) - {"lm_head.weight"}  # tied to the embedding, stored once
    assert sum(ckpt.info(n).numel for n in names) == SMOLLM2_PARAMETERS
    for name in names:
        stored = ckpt.get(name)
        assert stored.dtype == torch.bfloat16, name
        assert torch.equal(stored.view(torch.int16), reference[name].to(torch.bfloat16).view(torch.int16)), name


@pytest.mark.slow
def test_bf16_folder_logits_match_the_gguf_model_to_bf16_precision(smollm2, smollm2_bf16_model, windows):
    base, converted = smollm2[0], smollm2_bf16_model[0]
    window = windows[:1]
    rounded = copy.deepcopy(base)  # the GGUF model with every weight rounded to bf16, computing in fp32
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16))
        reference, ours, expected = (m(input_ids=window).logits[0] for m in (base, converted, rounded))
    del rounded
    # nothing but the bf16 rounding of the weights separates the two: same config, same computation
    assert torch.equal(ours, expected)
    # and that rounding moves the logits by about bf16's relative precision (2^-8), no more
    relative = ((ours - reference).norm() / reference.norm()).item()
    assert relative < 2 ** -6
    # seen as distributions: KL(GGUF || bf16) per token is tiny and the top-1 choice rarely changes
    p, q = F.log_softmax(reference, -1), F.log_softmax(ours, -1)
    kl = F.kl_div(q, p, log_target=True, reduction="sum").item() / len(p)
    assert 0 < kl < 1e-3 and (p.argmax(-1) == q.argmax(-1)).float().mean() > 0.98
