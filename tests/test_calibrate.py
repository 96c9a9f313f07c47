"""The layer-by-layer driver: on real and tiny models its block outputs are the model's own hidden
states, the statistics are those of the inputs each Linear sees, compressed blocks feed the next, and
whole-model compression leaves exact patterns behind."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

from unweight import UnweightError
from unweight.calibrate import (DEFAULT_BATCH, LinearStats, Lockstep, block_linears, calibration_batch,
                                calibration_windows, decoder_layers, run_layerwise)
from unweight.layerwise import LayerwiseConfig, compress_layerwise
from unweight.prune import is_nm, magnitude_prune

VOCAB = 96


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed=0):
    """Sliding (window 4) and global layers alternate: each kind has its own mask and rotary."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"] * 2,
                           max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


def windows(n=5, seq_len=16, seed=0):
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def driver_outputs(model, ids, process=None, batch_size=2, **kw):
    outs = {}
    run_layerwise(model, ids, process, batch_size=batch_size, progress=False,
                  after_block=lambda i, block, hidden: outs.__setitem__(i, torch.cat(hidden)), **kw)
    return outs


def hidden_states(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True).hidden_states  # [i] enters block i


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_uncompressed_driver_reproduces_the_hidden_states(make):
    model, ids = make(), windows()
    outs = driver_outputs(model, ids, process=lambda *a: None, stats=("hessian", "abs_mean"))
    ref = hidden_states(model, ids)
    n = model.config.num_hidden_layers
    for i in range(n - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(outs[i], ref[i + 1], rtol=1e-5, atol=1e-5)


def test_gemma3_blocks_get_their_own_masks():
    """A global block called with the sliding block's kwargs computes something else: kwargs are
    captured per block, not once."""
    from unweight.calibrate import capture_block_inputs

    model = tiny_gemma3()
    inputs = capture_block_inputs(model, windows(n=2), batch_size=2)
    full_block, h = decoder_layers(model)[1], inputs.hidden[0]
    with torch.no_grad():
        right = full_block(h, **inputs.kwargs[0][1])
        wrong = full_block(h, **inputs.kwargs[0][0])
    assert not torch.allclose(right, wrong, atol=1e-4)


def _inputs_of_linears(model, ids) -> dict[tuple[int, str], torch.Tensor]:
    """Every Linear's input on ``ids``, ``[tokens, in]``, keyed by (block, name)."""
    seen, handles = {}, []
    for i, block in enumerate(decoder_layers(model)):
        handles += [m.register_forward_pre_hook(
                        lambda m, a, key=(i, n): seen.__setitem__(key, a[0].reshape(-1, a[0].shape[-1])))
                    for n, m in block_linears(block).items()]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


def test_statistics_are_those_of_each_linears_inputs():
    model, ids = tiny_llama(), windows(n=3)
    seen, stats = _inputs_of_linears(model, ids), {}

    def process(index, name, linear, st):
        if index == 1:
            stats[name] = st

    run_layerwise(model, ids, process, stats=("hessian", "sq_norm", "abs_mean"), batch_size=2, progress=False)
    assert list(stats) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert stats["self_attn.q_proj"] is stats["self_attn.v_proj"]  # one accumulator per distinct input
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"] and stats["mlp.up_proj"] is not stats["mlp.down_proj"]
    for name, st in stats.items():
        x = seen[(1, name)].double()
        assert st.n_tokens == x.shape[0] == 3 * 16
        torch.testing.assert_close(st.hessian.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.sq_norm.double(), x.square().sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.abs_mean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
    for name in ("abs_mean", "sq_norm"):  # what was not asked for is not computed
        with pytest.raises(UnweightError, match=name):
            getattr(LinearStats(4, frozenset({"hessian"})), name)


@pytest.mark.parametrize("make,true_sequential", [(tiny_llama, False), (tiny_gemma3, False),
                                                  (tiny_llama, True), (tiny_gemma3, True)])
def test_compressed_blocks_feed_the_next(make, true_sequential):
    """The outputs handed on are those of the compressed model: they equal its hidden states after."""
    model, ids = make(), windows()
    calls = []

    def process(index, name, linear, stats):
        calls.append((index, name))
        linear.weight.data = magnitude_prune(linear.weight.data, 0.5)[0]

    outs = driver_outputs(model, ids, process, stats=(), true_sequential=true_sequential)
    assert len(calls) == 7 * model.config.num_hidden_layers
    ref = hidden_states(model, ids)
    for i in range(model.config.num_hidden_layers - 1):
        torch.testing.assert_close(outs[i], ref[i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,settings", [("wanda", {"pattern": "2:4"}), ("sparsegpt", {"sparsity": 0.5}),
                                             ("sparsegpt", {"pattern": "2:4", "bits": 4}),
                                             ("sparsegpt", {"pattern": "2:4", "bits": 4, "true_sequential": True}),
                                             ("gptq", {"bits": 3, "group_size": 32, "act_order": True}),
                                             ("awq", {"bits": 4, "group_size": 32}), ("magnitude", {"sparsity": 0.3}),
                                             ("magnitude", {"pattern": "2:4", "bits": 3, "quant": "rtn"})])
def test_compress_layerwise_leaves_exact_patterns_and_artifacts(method, settings):
    from unweight.quant.rtn import rtn_dequantize

    model, ids = tiny_llama(), windows()
    config = LayerwiseConfig.from_method(method, **settings)
    artifacts = {}
    compress_layerwise(model, None, config, windows=ids, artifacts=artifacts, progress=False)
    linears = {f"model.layers.{i}.{n}": m for i, b in enumerate(decoder_layers(model))
               for n, m in block_linears(b).items()}
    assert sorted(artifacts) == sorted(linears)
    for name, a in artifacts.items():
        w = linears[name].weight.data
        if config.pattern:
            assert is_nm(w, 2, 4) and (a.mask.reshape(w.shape[0], -1, 4).sum(2) == 2).all()
        elif config.prune:
            assert (~a.mask).sum().item() == round(config.sparsity * w.numel()) and (w[~a.mask] == 0).all()
        if config.quant:
            dense = rtn_dequantize(a.q, a.scale, a.zero, config.group_size, config.scheme)
            if a.input_scale is not None:
                dense = dense / a.input_scale
            assert torch.equal(dense, w)


def test_config_errors():
    with pytest.raises(UnweightError, match="unknown method"):
        LayerwiseConfig.from_method("obc")
    with pytest.raises(UnweightError, match="AWQ"):
        LayerwiseConfig(prune="wanda", quant="awq")
    with pytest.raises(UnweightError, match="N:M"):
        LayerwiseConfig(prune="wanda", pattern="2-4")


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2():
    from unweight.models import hf_folder, load_causal_lm

    try:
        return load_causal_lm(str(hf_folder("smollm2-135m")))
    except UnweightError as exc:
        pytest.skip(f"smollm2-135m is not installed here: {exc}")


@pytest.mark.slow
def test_calibration_windows_come_from_the_calibration_split(smollm2):
    from unweight.data import corpus

    _, tok = smollm2
    a, b = calibration_windows(tok, 4, 64), calibration_windows(tok, 4, 64, seed=1)
    assert a.shape == (4, 64) and torch.equal(a, calibration_windows(tok, 4, 64)) and not torch.equal(a, b)
    text = tok.decode(a[0])
    assert text in corpus("austen", "calib")[0] and not any(text in d for d in corpus("austen", "eval"))
    with pytest.raises(UnweightError, match="at most"):
        calibration_windows(tok, 10_000, 512)


def test_calibration_windows_start_with_bos_when_the_tokenizer_adds_one():
    from test_eval import CharTokenizer

    from unweight.data import corpus

    calib = "\n\n".join(corpus("austen", "calib"))
    for bos in (None, 1):
        windows = calibration_windows(CharTokenizer(bos), 3, 32)
        text = windows[:, 1:] if bos else windows
        assert windows.shape == (3, 32) and bool((windows[:, 0] == 1).all()) == (bos is not None)
        assert all("".join(map(chr, w.tolist())) in calib for w in text)


@pytest.mark.slow
def test_real_model_driver_matches_hidden_states_and_gptq_beats_rtn(smollm2):
    """smollm2-135m (4-bit-derived weights), 4 x 64 calibration tokens: uncompressed outputs equal the
    model's hidden states; in block 0 GPTQ's output error on the calibration inputs is below RTN's at
    3 bits g128 for every Linear."""
    from unweight.quant.awq import output_error
    from unweight.quant.gptq import gptq_fake_quantize
    from unweight.quant.rtn import rtn_fake_quantize

    model, tok = smollm2
    ids = calibration_windows(tok, 4, 64)
    errors = {}

    def process(index, name, linear, stats):
        if index == 0:
            w, h = linear.weight.data, stats.hessian
            errors[(index, name)] = (output_error(gptq_fake_quantize(w, h, 3, 128) - w, h).item(),
                                     output_error(rtn_fake_quantize(w, 3, 128) - w, h).item())

    outs = driver_outputs(model, ids, process, batch_size=4)
    ref = hidden_states(model, ids)
    for i in range(model.config.num_hidden_layers - 1):
        torch.testing.assert_close(outs[i], ref[i + 1], rtol=1e-4, atol=1e-3)
    assert len(errors) == 7 and all(g < r for g, r in errors.values()), errors


def test_hessian_of_wide_inputs_is_the_full_gram_matrix():
    # 300 columns: three strips of the upper-triangle product, the last one ragged
    x = torch.randn(2, 40, 300, generator=torch.Generator().manual_seed(0))
    st = LinearStats(300, frozenset({"hessian"}))
    st.add_batch(x[0])
    st.add_batch(x[1])
    flat = x.reshape(-1, 300).double()
    torch.testing.assert_close(st.hessian.double(), flat.T @ flat / 80, rtol=1e-5, atol=1e-5)
    assert torch.equal(st.hessian, st.hessian.T)


def test_statistics_pass_stops_after_the_last_linears_input():
    model, ids = tiny_llama(), windows(n=4)
    calls = []
    down = decoder_layers(model)[0].mlp.down_proj
    down.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    seen = []
    run_layerwise(model, ids, lambda i, n, lin, st: seen.append((i, n)), batch_size=2, progress=False)
    assert (0, "mlp.down_proj") in seen  # its statistics were collected (in its pre-hook) ...
    assert len(calls) == 2  # ... but it ran only to propagate the block's two batches


@pytest.mark.parametrize("true_sequential", [False, True])
def test_true_sequential_calibrates_each_linear_on_the_compressed_inputs(true_sequential):
    """True-sequential: every Linear's statistics are those of its inputs in the *compressed* model (the
    Linears before it in its block already compressed). Block by block (the default): those of the
    model compressed up to the block before, so within a block only the first Linears' agree."""
    model, ids = tiny_llama(), windows(n=3)
    hessians = {}

    def process(index, name, linear, st):
        hessians[(index, name)] = st.hessian.double()
        linear.weight.data = magnitude_prune(linear.weight.data, 0.5)[0]

    run_layerwise(model, ids, process, stats=("hessian",), batch_size=2, progress=False,
                  true_sequential=true_sequential)
    after = _inputs_of_linears(model, ids)
    agree = {}
    for key, h in hessians.items():
        x = after[key].double()
        agree[key] = torch.allclose(h, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    assert all(agree[(i, n)] for i in range(3) for n in ("self_attn.q_proj", "self_attn.v_proj"))
    assert all(agree.values()) == true_sequential


def test_lockstep_runs_one_call_at_a_time_and_meets_at_each_label():
    events = []
    lockstep = Lockstep()

    def call(b):
        def run():
            for label in ("a", "b"):
                events.append((b, label))
                lockstep.meet(label, lambda label=label: events.append(("all", label)))
            return b * 10
        return run

    assert lockstep.run([call(b) for b in range(3)]) == [0, 10, 20]
    assert events == [(0, "a"), (1, "a"), (2, "a"), ("all", "a"), (0, "b"), (1, "b"), (2, "b"), ("all", "b")]


def test_lockstep_raises_a_calls_error_and_catches_diverging_calls():
    lockstep = Lockstep()

    def failing(b):
        def run():
            lockstep.meet("a", lambda: None)
            if b == 1:
                raise ValueError("call 1 failed")
            lockstep.meet("b", lambda: None)
        return run

    with pytest.raises(ValueError, match="call 1 failed"):  # the others end instead of waiting forever
        lockstep.run([failing(b) for b in range(3)])

    def diverging(b):
        return lambda: lockstep.meet("a" if b != 1 else "b", lambda: None)

    with pytest.raises(UnweightError, match="different paths"):
        lockstep.run([diverging(b) for b in range(3)])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_true_sequential_in_batches_equals_one_batch(make):
    """Lockstep batches compress exactly what one batch of every window would (up to float sums)."""
    ids = windows(n=5)
    results = []
    for batch_size in (2, 5):
        model = make()
        config = LayerwiseConfig.from_method("sparsegpt", pattern="2:4", bits=4, true_sequential=True,
                                             batch_size=batch_size)
        compress_layerwise(model, None, config, windows=ids, progress=False)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_default_batch_is_eight_windows_on_the_cpu_and_all_of_them_on_a_gpu():
    assert calibration_batch(None, 32, torch.device("cpu")) == DEFAULT_BATCH == 8
    assert calibration_batch(None, 32, torch.device("cuda", 0)) == 32
    assert calibration_batch(3, 32, torch.device("cuda")) == calibration_batch(3, 32, torch.device("cpu")) == 3


def test_an_error_while_compressing_in_lockstep_is_raised():
    model, ids = tiny_llama(), windows(n=5)

    def process(index, name, linear, stats):
        if name == "self_attn.o_proj":
            raise UnweightError(f"cannot compress {name}")

    with pytest.raises(UnweightError, match="cannot compress self_attn.o_proj"):
        run_layerwise(model, ids, process, batch_size=2, progress=False, true_sequential=True)
