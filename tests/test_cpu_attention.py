"""The bf16 causal attention kernel: as accurate as torch's SDPA in bf16 (against float64), exact masking
of the future, grouped-query heads, any window length; anything it does not cover goes to SDPA; a model
is switched to it only for the duration of a calibration and gives the same block outputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from unweight import cpu_attention
from unweight.calibrate import decoder_layers, run_layerwise

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="this CPU has no AVX512-BF16")


def qkv(nb, nh, nkv, n, d, seed=0, tokens_outer=False):
    """Random bf16 queries, keys and values, ``[batch, heads, n, d]``; with ``tokens_outer``, views of
    ``[batch, n, heads, d]`` memory, as transformers' attention modules hand them over."""
    g = torch.Generator().manual_seed(seed)

    def make(h, scale=1.0):
        if tokens_outer:
            return (torch.randn(nb, n, h, d, generator=g) * scale).bfloat16().transpose(1, 2)
        return (torch.randn(nb, h, n, d, generator=g) * scale).bfloat16()
    return make(nh, 2.0), make(nkv), make(nkv)


def reference(q, k, v, scale):
    """float64 causal attention, ``[batch, n, heads, d]``."""
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, enable_gqa=True,
                                          scale=scale).transpose(1, 2)


@needs_kernel
@pytest.mark.parametrize("nb, nh, nkv, n, d, tokens_outer", [
    (1, 1, 1, 2, 64, False), (2, 4, 2, 37, 64, True), (1, 3, 1, 64, 128, False), (2, 2, 2, 130, 64, True),
    (1, 4, 1, 300, 256, False), (2, 3, 1, 128, 64, True)])
def test_as_accurate_as_sdpa_in_bf16(nb, nh, nkv, n, d, tokens_outer):
    """Window lengths below, at and across the 64-query blocks; grouped-query heads; head sizes 64-256;
    contiguous inputs and transformers' layout."""
    q, k, v = qkv(nb, nh, nkv, n, d, seed=n, tokens_outer=tokens_outer)
    scale = d ** -0.5
    ref = reference(q, k, v, scale)
    ours = cpu_attention.causal_attention(q, k, v, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale).transpose(1, 2)
    assert ours.shape == (nb, n, nh, d) and ours.dtype == torch.bfloat16
    err, err_sdpa = (ours.double() - ref).abs(), (sdpa.double() - ref).abs()
    assert err.mean() <= 1.05 * err_sdpa.mean() + 1e-9
    assert err.max() <= 1.5 * err_sdpa.max() + 1e-9


@needs_kernel
def test_threads_split_the_heads_and_give_the_same_result():
    q, k, v = qkv(2, 3, 1, 100, 64, tokens_outer=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_attention.causal_attention(q, k, v, 0.125)
        torch.set_num_threads(4)
        assert torch.equal(cpu_attention.causal_attention(q, k, v, 0.125), one)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_a_query_never_sees_later_keys():
    """Changing the last token's key and value changes only the last query's output."""
    q, k, v = qkv(1, 2, 1, 70, 64)
    a = cpu_attention.causal_attention(q, k, v, 0.125)
    k[:, :, -1], v[:, :, -1] = 5.0, -3.0
    b = cpu_attention.causal_attention(q, k, v, 0.125)
    assert torch.equal(a[:, :-1], b[:, :-1]) and not torch.equal(a[:, -1], b[:, -1])


def test_exp_is_accurate_to_float32_rounding():
    x = np.concatenate([-np.logspace(-8, np.log10(87), 50_000), [0.0]]).astype(np.float32)
    fn = cpu_attention.njit(lambda a: np.array([cpu_attention._exp(v) for v in a], np.float32))
    ours, ref = fn(x).astype(np.float64), np.exp(x.astype(np.float64))
    assert (np.abs(ours - ref) <= 2e-7 * ref).all()
    assert (fn(np.array([-88.5, -200.0, -np.inf], np.float32)) == 0).all()


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@needs_kernel
@pytest.mark.parametrize("case", ["padding mask", "sliding window", "float32", "not causal", "softcap", "one query"])
def test_what_the_kernel_does_not_cover_goes_to_sdpa(case, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv(2, 4, 2, 20, 64)
    mask, kw, module = None, {}, _Attn()
    if case == "padding mask":
        mask = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 1, 20, 20).clone()
        mask[1, :, :, :3] = False
    elif case == "sliding window":
        kw["sliding_window"] = 8
    elif case == "float32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "not causal":
        module.is_causal = False
    elif case == "softcap":
        kw["softcap"] = 30.0
    elif case == "one query":
        q = q[:, :, :1]
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: pytest.fail("the kernel ran"))
    try:
        expected = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125, **kw)[0]
    except ValueError:  # SDPA refuses soft-capping: so must the fallback
        with pytest.raises(ValueError):
            cpu_attention.attention(module, q, k, v, mask, scaling=0.125, **kw)
        return
    torch.testing.assert_close(cpu_attention.attention(module, q, k, v, mask, scaling=0.125, **kw)[0], expected,
                               rtol=0, atol=0)


@needs_kernel
def test_a_causal_mask_or_a_window_covering_everything_takes_the_kernel():
    q, k, v = qkv(2, 4, 2, 20, 64)
    causal = torch.ones(20, 20, dtype=torch.bool).tril().expand(2, 1, 20, 20)
    expected = cpu_attention.causal_attention(q, k, v, 0.125)
    for mask, kw in ((None, {}), (causal, {}), (causal, {"sliding_window": 20})):
        assert torch.equal(cpu_attention.attention(_Attn(), q, k, v, mask, scaling=0.125, **kw)[0], expected)


def tiny_models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=96, hidden_size=128, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                               head_dim=64, sliding_window=100, max_position_embeddings=256,
                                               layer_types=["sliding_attention", "full_attention"]))
    return {"llama": llama.bfloat16().eval(), "gemma3": gemma.bfloat16().eval()}


@needs_kernel
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_calibration_attends_through_the_kernel_and_matches_sdpa(name, monkeypatch):
    """The driver's block outputs with the kernel are SDPA's to bf16 rounding; gemma3's sliding layer (window
    100 < 150 tokens) still goes to SDPA with its mask; the model is back on SDPA afterwards."""
    model = tiny_models()[name]
    ids = torch.randint(0, 96, (3, 150), generator=torch.Generator().manual_seed(1))
    calls = []
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda *a, f=cpu_attention.causal_attention: calls.append(a[0].shape) or f(*a))
    outs = {}
    run_layerwise(model, ids, None, batch_size=3, progress=False,
                  after_block=lambda i, block, hidden: outs.__setitem__(i, torch.cat(hidden)))
    assert model.config._attn_implementation == "sdpa"
    assert len(calls) == (1 if name == "gemma3" else 2)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    for i in outs:
        if i < len(decoder_layers(model)) - 1:
            torch.testing.assert_close(outs[i], ref[i + 1], rtol=0.02, atol=0.02)


@needs_kernel
def test_a_model_not_on_sdpa_is_left_as_it_is(monkeypatch):
    model = tiny_models()["llama"]
    model.set_attn_implementation("eager")
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: pytest.fail("the kernel ran"))
    with cpu_attention.calibration_attention(model):
        assert model.config._attn_implementation == "eager"
        with torch.no_grad():
            model(input_ids=torch.randint(0, 96, (1, 70)))
    assert model.config._attn_implementation == "eager"
