"""Checkpoint reader/writer: round trips, sharding, atomic writes, and clear errors on bad input."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from unweight.checkpoint import CheckpointWriter, open_checkpoint
from unweight.errors import UnweightError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(64, 32, generator=g).bfloat16(),
        "b.weight": torch.randn(100, generator=g),
        "c.idx": torch.randint(0, 255, (3, 5, 7), generator=g).to(torch.uint8),
        "d.scalar": torch.tensor(3.5, dtype=torch.float16),
        "e.empty": torch.empty(0, 4),
        "f.f8": torch.randn(33, generator=g).to(torch.float8_e4m3fn),
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 1000])
def test_writer_round_trip_is_bit_exact(tmp_path, max_shard_bytes):
    ts = _tensors()
    out = tmp_path / "model"
    with CheckpointWriter(out, metadata={"note": "x"}, max_shard_bytes=max_shard_bytes) as w:
        for k, v in ts.items():
            w.add(k, v)
    shards = sorted(out.glob("*.safetensors"))
    assert (len(shards) == 1) == (max_shard_bytes > 1e6)
    for s in shards:  # a shard exceeds the limit only when it holds a single larger tensor
        held = load_file(s)
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= max_shard_bytes
    assert (out / "model.safetensors.index.json").exists() == (len(shards) > 1)
    ck = open_checkpoint(out)
    assert ck.format == "hf" and sorted(ck.names()) == sorted(ts)
    for k, v in ts.items():
        assert _same(ck.get(k), v), k
        assert ck.info(k).shape == tuple(v.shape)
    assert ck.metadata == {"format": "pt", "note": "x"}
    # the files are standard safetensors: the reference library reads them identically
    merged = {}
    for s in shards:
        merged.update(load_file(s))
    assert all(_same(merged[k], v) for k, v in ts.items())


def test_reader_matches_safetensors_library(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    ck = open_checkpoint(tmp_path / "x.safetensors")
    assert ck.format == "safetensors"
    assert all(_same(ck.get(k), v) for k, v in ts.items())


def test_failed_write_leaves_nothing_and_keeps_existing_output(tmp_path):
    out = tmp_path / "model"
    with CheckpointWriter(out) as w:
        w.add("old", torch.ones(3))
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, overwrite=True) as w:
            w.add("new", torch.zeros(3))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert open_checkpoint(out).names() == ["old"]
    with pytest.raises(UnweightError, match="already exists"):
        CheckpointWriter(out)


def test_get_returns_a_private_copy(tmp_path):
    save_file({"w": torch.ones(4)}, tmp_path / "x.safetensors")
    ck = open_checkpoint(tmp_path / "x.safetensors")
    ck.get("w").zero_()
    assert torch.equal(ck.get("w"), torch.ones(4))


def test_mapped_tensors_equal_read_ones_and_writes_to_them_stay_private(tmp_path):
    from unweight.checkpoint import SafetensorsFile

    p = tmp_path / "x.safetensors"
    save_file(_tensors(), p)
    before = p.read_bytes()
    st = SafetensorsFile(p)
    for name, t in _tensors().items():
        assert _same(st.mapped(name), t) and _same(st.mapped(name), st.get(name)), name
    st.mapped("c.idx").zero_()  # copy-on-write: the file and the next view keep the data
    assert p.read_bytes() == before and _same(st.mapped("c.idx"), _tensors()["c.idx"])


def test_a_file_cut_short_after_opening_names_file_and_tensor(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(10), "w": torch.ones(1000)}, p)
    ck = open_checkpoint(p)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(UnweightError, match=r"x\.safetensors.*'w'.*cut short"):
        ck.get("w")
    with pytest.raises(UnweightError, match=r"x\.safetensors.*'w'.*cut short"):
        ck.files[p.name].mapped("w")


def test_missing_path_and_unknown_tensor(tmp_path):
    with pytest.raises(UnweightError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    save_file({"w": torch.ones(4)}, tmp_path / "x.safetensors")
    with pytest.raises(UnweightError, match="'v'"):
        open_checkpoint(tmp_path / "x.safetensors").get("v")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickles_are_refused(tmp_path, suffix):
    p = tmp_path / f"pytorch_model{suffix}"
    p.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnweightError, match="never unpickles"):
        open_checkpoint(p)
    with pytest.raises(UnweightError, match="never unpickles"):
        open_checkpoint(tmp_path)  # a folder holding only a pickle


def test_truncated_and_corrupt_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(1000)}, p)
    raw = p.read_bytes()
    cases = {
        "truncated-data": raw[:-10],
        "truncated-header": raw[:20],
        "empty": b"",
        "huge-header-length": struct.pack("<Q", 1 << 40) + raw[8:],
        "not-json": raw[:8] + b"{" * (len(raw) - 8),
    }
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["w"]["data_offsets"] = [0, 8000]
    bad = json.dumps(header).encode().ljust(n)
    cases["offsets-out-of-range"] = raw[:8] + bad[:n] + raw[8 + n:]
    for what, data in cases.items():
        q = tmp_path / f"{what}.safetensors"
        q.write_bytes(data)
        with pytest.raises(UnweightError, match=q.name):
            open_checkpoint(q)


def test_corrupt_index_names_the_file(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{broken")
    with pytest.raises(UnweightError, match="index.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(UnweightError, match="gone.safetensors"):
        open_checkpoint(tmp_path)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + b"\x00" * 13)
    with pytest.raises(UnweightError, match="x.gguf"):
        open_checkpoint(p)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gguf_get_as_equals_get_then_cast_for_every_tensor(tmp_path, monkeypatch, dtype):
    """Block-wise dequantization into the target dtype (small blocks here, so every matrix takes
    several) gives exactly get().to(dtype), whether the architecture's processor leaves a tensor
    alone (embeddings, MLP) or rewrites it (llama's q/k permutation takes the general path)."""
    import unweight.checkpoint as checkpoint
    from conftest import make_tiny_gguf

    monkeypatch.setattr(checkpoint, "DEQUANT_ROWS", 5)
    ckpt = open_checkpoint(make_tiny_gguf(tmp_path / "tiny.gguf"))
    for name in ckpt.names():
        got = ckpt.get_as(name, dtype)
        assert got.dtype == dtype and torch.equal(got, ckpt.get(name).to(dtype)), name
