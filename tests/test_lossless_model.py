"""unweight-lossless on the real smollm2-135m: compress, verify, decompress and load through transformers,
all bit-exact; a corrupted shard is refused with the tensor named."""

import pytest
import torch

from unweight.checkpoint import open_checkpoint
from unweight.cli import main as cli
from unweight.errors import UnweightError
from unweight.formats import decode_tensors, same_bits
from unweight.models import hf_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    src = hf_folder("smollm2-135m", "bf16")
    out = tmp_path_factory.mktemp("lossless") / "ll"
    assert cli(["compress", str(src), str(out), "--method", "lossless"]) == 0
    return src, out


def test_compressed_folder_is_smaller_and_verifies(folders, capsys):
    src, out = folders
    orig = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    comp = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert comp < 0.70 * orig  # bf16 weights carry ~2.6 bits of exponent entropy, not 8
    assert cli(["verify", str(src), str(out)]) == 0
    assert "272/272 tensors bit-exact" in capsys.readouterr().out


@pytest.mark.parametrize("batch_mb", [256, 48])
def test_transformers_loads_it_bit_identical(folders, monkeypatch, batch_mb):
    """Loaded onto the CPU, the tensors decode in batches of BATCH_BYTES of parts (all threads at work on a
    batch, where transformers asks for one tensor at a time), each tensor once, each in memory of its own."""
    import unweight  # noqa: F401  (registers the format)
    import unweight.hf as hf
    from transformers import AutoModelForCausalLM

    from unweight.lossless import register

    src, out = folders
    batches, decode = [], register.decode_tensors
    monkeypatch.setattr(register, "decode_tensors", lambda parts, names: batches.append(names) or decode(parts, names))
    monkeypatch.setattr(hf, "BATCH_BYTES", batch_mb << 20)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    loaded = model.state_dict()
    ref = open_checkpoint(src)
    for name in ref.names():
        assert same_bits(loaded[name], ref.get(name)), name
    assert sorted(n for b in batches for n in b) == sorted(ref.names())  # each decoded once, ahead in batches
    assert len(batches) == (1 if batch_mb == 256 else 4)  # 177 MB of parts
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)


def test_its_state_dict_loads_in_stored_order_on_all_threads(folders, monkeypatch):
    """``formats.load_state_dict`` decodes every tensor in one call of the format's ``decode_on`` (on the CPU:
    all threads), bit-exact, in the order the checkpoint stores them; an uncompressed folder loads as stored."""
    from unweight.formats import iter_decoded, load_state_dict
    from unweight.lossless import register

    src, out = folders
    batches, decode = [], register.decode_tensors
    monkeypatch.setattr(register, "decode_tensors", lambda parts, names: batches.append(names) or decode(parts, names))
    loaded = load_state_dict(out)
    assert len(batches) == 1 and len(batches[0]) == 272
    assert list(loaded) == [name for name, _ in iter_decoded(open_checkpoint(out))]
    dense = load_state_dict(src)
    assert list(loaded) == list(dense) and all(same_bits(loaded[k], t) for k, t in dense.items())


def test_decompress_restores_every_tensor(folders, tmp_path):
    src, out = folders
    assert cli(["decompress", str(out), str(tmp_path / "back")]) == 0
    back, ref = open_checkpoint(tmp_path / "back"), open_checkpoint(src)
    assert sorted(back.names()) == sorted(ref.names())
    assert all(same_bits(back.get(n), ref.get(n)) for n in ref.names())
    assert "quantization_config" not in back.config


def test_a_flipped_byte_is_refused_naming_the_tensor(folders, tmp_path):
    import shutil

    _, out = folders
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shard = next(bad.glob("*.safetensors"))
    ck = open_checkpoint(shard)
    name = next(n for n in ck.names() if n.endswith(".ul.pack") and "layers.3." in n)
    st = ck.files[shard.name]
    _, _, begin, end = st.entries[name]
    raw = bytearray(shard.read_bytes())
    pos = st.data_start + (begin + end) // 2
    raw[pos] ^= 0x5A
    shard.write_bytes(bytes(raw))
    with pytest.raises(UnweightError, match=name.split(".ul.")[0].replace(".", r"\.")):
        decode_tensors(bad)
    assert cli(["verify", "smollm2-135m", str(bad)]) != 0

    import unweight  # noqa: F401  (registers the format)
    from transformers import AutoModelForCausalLM  # loading: the batch meets it, then it alone raises, named
    with pytest.raises(UnweightError, match=rf"{shard.name}: tensor '{name.split('.ul.')[0]}'"):
        AutoModelForCausalLM.from_pretrained(str(bad))


def test_compress_never_changes_the_input(folders):
    src, _ = folders
    from unweight.lossless.register import encode_parts

    w = open_checkpoint(src).get("model.layers.0.mlp.down_proj.weight")
    before = w.clone()
    encode_parts("w", w)
    assert torch.equal(w.view(torch.int16), before.view(torch.int16))
