"""transformers integration: a compressed folder loads through from_pretrained into the very model it came from.

The format here is a toy, registered by the test only: each 2-D float weight is stored as its raw bytes
split into two U8 halves plus an I64 header (dtype code, shape); decoding joins them. It is bit-exact by
construction, so any difference after loading is the integration's fault.
"""

import json
import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralConfig, \
    MixtralForCausalLM

import unweight.hf
from unweight import formats
from unweight.errors import UnweightError

METHOD, TAG = "unweight-test-tt", "tt"
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = {v: k for k, v in CODES.items()}
VOCAB = 128


def encode(name: str, t: torch.Tensor):
    if t.ndim != 2 or not t.is_floating_point():
        return None
    raw = t.contiguous().reshape(-1).view(torch.uint8)
    half = raw.numel() // 2
    return {"lo": raw[:half].clone(), "hi": raw[half:].clone(),
            "meta": torch.tensor([CODES[t.dtype], *t.shape], dtype=torch.int64)}


def decode(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    code, *shape = parts["meta"].tolist()
    raw = torch.cat([parts["lo"], parts["hi"]])
    numel = torch.Size(shape).numel()
    if raw.numel() != numel * DTYPES[code].itemsize:
        raise UnweightError(f"tensor {name!r}: {raw.numel()} bytes of parts for shape {shape}")
    return raw.view(DTYPES[code]).reshape(shape)


FORMAT = formats.register(formats.Format(METHOD, TAG, 1, decode, "test only: raw bytes in two halves"))
unweight.hf.register_quant_method(METHOD)


def _llama(dtype=torch.float32, tie=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _save_and_compress(model, tmp_path, enc=encode, qc=None):
    dense, comp = tmp_path / "dense", tmp_path / "comp"
    model.save_pretrained(dense)
    stats = formats.compress_checkpoint(dense, comp, FORMAT, enc, qc or {}, progress=False)
    assert stats.encoded > 0
    return dense, comp


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(formats.same_bits(sa[k], sb[k]) for k in sa)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(16).reshape(2, 8) * 7 % VOCAB
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype,tie", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_load_decodes_bit_exact(tmp_path, dtype, tie):
    model = _llama(dtype, tie)
    dense, comp = _save_and_compress(model, tmp_path)
    stored = formats.open_checkpoint(comp).names()
    assert "model.embed_tokens.weight" not in stored and f"model.embed_tokens.weight.{TAG}.lo" in stored

    loaded, info = AutoModelForCausalLM.from_pretrained(comp, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched: no random init
    assert _same_state(model, loaded)
    # logits against the dense folder loaded the same way (a model cast with .to(bf16) also casts its
    # rotary inv_freq buffer, which from_pretrained keeps in fp32)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(dense)), _logits(loaded))
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    # dense after loading: transformers' dequantize convention drops the quantization config
    assert not loaded.is_quantized and getattr(loaded.config, "quantization_config", None) is None


def test_requested_dtype_casts_like_a_dense_folder(tmp_path):
    dense, comp = _save_and_compress(_llama(torch.bfloat16), tmp_path)
    want = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(comp, dtype=torch.float32)
    assert got.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    assert _same_state(want, got)


def test_moe_experts_decode_through_the_models_own_converters(tmp_path):
    # Mixtral checkpoints store experts.N.w1/w2/w3; transformers merges them into experts.gate_up_proj/down_proj
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    _, comp = _save_and_compress(model, tmp_path)
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight.tt.hi" in formats.open_checkpoint(comp).names()
    loaded, info = AutoModelForCausalLM.from_pretrained(comp, output_loading_info=True)
    assert not any(info.values()), info
    assert _same_state(model, loaded)
    assert torch.equal(_logits(model), _logits(loaded))


def test_saving_a_loaded_model_writes_the_dense_folder(tmp_path):
    model = _llama()
    _, comp = _save_and_compress(model, tmp_path)
    AutoModelForCausalLM.from_pretrained(comp).save_pretrained(tmp_path / "again")
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())
    assert _same_state(model, AutoModelForCausalLM.from_pretrained(tmp_path / "again"))


BAD = "model.layers.1.self_attn.o_proj.weight"


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_corrupt_part_raises_naming_the_tensor(tmp_path, damage):
    def bad_encode(name, t):
        parts = encode(name, t)
        if name == BAD:
            if damage == "truncated":
                parts["hi"] = parts["hi"][:-3].clone()
            else:
                del parts["meta"]
        return parts

    _, comp = _save_and_compress(_llama(), tmp_path, enc=bad_encode)
    with pytest.raises(UnweightError, match=rf"model\.safetensors: .*{BAD}"):
        AutoModelForCausalLM.from_pretrained(comp)


def test_unknown_runtime_and_newer_version_are_refused(tmp_path):
    _, comp = _save_and_compress(_llama(), tmp_path)
    cfg = AutoConfig.from_pretrained(comp)
    cfg.quantization_config["runtime"] = "no-such-runtime"
    with pytest.raises(UnweightError, match="runtime 'no-such-runtime'"):
        AutoModelForCausalLM.from_pretrained(comp, config=cfg)
    cfg.quantization_config.update(runtime="dense", format_version=FORMAT.version + 1)
    with pytest.raises(UnweightError, match="newer"):
        AutoModelForCausalLM.from_pretrained(comp, config=cfg)


def test_without_unweight_transformers_warns_and_skips_decoding(tmp_path, monkeypatch):
    from transformers.quantizers import auto

    _, comp = _save_and_compress(_llama(), tmp_path)
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, METHOD)
    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, METHOD)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    import transformers

    level = transformers.logging.get_verbosity()  # other tests may have silenced transformers
    transformers.logging.set_verbosity_warning()
    try:
        _, info = AutoModelForCausalLM.from_pretrained(comp, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(level)
        logging.getLogger("transformers").removeHandler(handler)
    assert any("Unknown quantization type" in r.getMessage() and METHOD in r.getMessage() for r in records)
    assert BAD in info["missing_keys"] and f"{BAD}.{TAG}.lo" in info["unexpected_keys"]


def test_import_is_cheap_and_registers_when_transformers_loads():
    code = (
        "import sys, unweight.hf\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers.quantizers import auto\n"
        "for m in ('unweight-lossless', 'unweight-codebook'):\n"
        "    assert auto.AUTO_QUANTIZER_MAPPING[m] is unweight.hf.UnweightHfQuantizer, m\n"
        "    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[m] is unweight.hf.UnweightConfig, m\n"
        "assert 'numba' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_gpu_batch_is_as_large_as_the_gpus_free_memory_allows(monkeypatch):
    """Parts decoded together: BATCH_BYTES on the CPU; on a GPU, GPU_BATCH_BYTES, or a sixth of its free memory
    where that is less (the parts, their outputs and the outputs' copies stay there until the batch is done)."""
    hf = unweight.hf
    assert hf._batch_bytes(torch.device("cpu")) == hf.BATCH_BYTES
    free = {"bytes": 60 << 30}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 80 << 30))
    assert hf._batch_bytes(torch.device("cuda:0")) == hf.GPU_BATCH_BYTES > hf.BATCH_BYTES
    free["bytes"] = 6 << 30
    assert hf._batch_bytes(torch.device("cuda:0")) == 1 << 30
