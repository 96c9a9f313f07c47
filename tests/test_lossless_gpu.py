"""The GPU decoder (``unweight.lossless.gpu``), run on the CPU by Triton's interpreter: it gives the CPU
decoder's tensors bit for bit, its segments follow the format's coding order, its XXH3-64 is the
reference's, and every corruption it is shown fails exactly as the CPU decoder fails (conftest sets
TRITON_INTERPRET before Triton is imported). The interpreter steps one group of 32 values in about 5 ms,
so the tensors here are small and cut into small chunks.

On a machine with a CUDA GPU the same tests run the compiled kernels there:
``UNWEIGHT_TEST_DEVICE=cuda TRITON_INTERPRET=0 python -m pytest tests/test_lossless_gpu.py``."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lossless import DTYPES, bits, encode, make, same

from unweight.errors import UnweightError
from unweight.lossless import decode_tensor, encode_tensor, model, rans
from unweight.lossless import format as fmt


DEVICE = os.environ.get("UNWEIGHT_TEST_DEVICE", "cpu")  # where the kernels run: the interpreter, or "cuda"


@pytest.fixture(scope="module")
def gpu():
    gpu = pytest.importorskip("unweight.lossless.gpu")
    if DEVICE == "cpu" and not gpu.triton.knobs.runtime.interpret:
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: its kernels would need a GPU")
    if DEVICE != "cpu" and (gpu.triton.knobs.runtime.interpret or not torch.cuda.is_available()):
        pytest.skip(f"UNWEIGHT_TEST_DEVICE={DEVICE} needs that device and TRITON_INTERPRET=0")
    return gpu


def host(out):
    """A decoded tensor, or a name -> tensor dict, back on the CPU."""
    return {k: v.cpu() for k, v in out.items()} if isinstance(out, dict) else out.cpu()


def encoded(t: torch.Tensor, chunk: int, monkeypatch) -> dict[str, torch.Tensor]:
    with monkeypatch.context() as m:
        m.setattr(fmt, "CHUNK_WEIGHTS", chunk)
        return encode(t)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(DTYPES),
       shape=st.sampled_from([(0,), (1,), (7,), (300,), (24, 64), (33, 33), (40, 130), (10, 16), (5, 1, 200)]),
       kind=st.sampled_from(["weights", "zeros", "special", "bits"]), seed=st.integers(0, 2**31),
       chunk=st.sampled_from([256, 1000, 4096]))
def test_gpu_decoder_gives_the_cpu_decoders_tensor(gpu, monkeypatch, dtype, shape, kind, seed, chunk):
    t = make(dtype, shape, kind, seed)
    parts = encoded(t, chunk, monkeypatch)
    out = host(gpu.decode_tensor(parts, "w", DEVICE))
    assert same(out, t)
    assert same(out, decode_tensor(parts, "w"))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_bf16_symbol_width_and_row_rotation(gpu, monkeypatch, k):
    """Rows an order of magnitude apart in scale (row contexts: phases and rotations), exact zeros,
    -0.0 and subnormals, each of BF16's symbol widths k (raw bits r = 6, 5, 4)."""
    rng = np.random.default_rng(k)
    x = np.sign(rng.standard_normal((48, 160))) * (0.2 + rng.random((48, 160))) * np.logspace(-1, 1, 48)[:, None]
    x[3, :10], x[4, :5], x[5, :7] = 0.0, -0.0, 1e-40
    t = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    monkeypatch.setitem(model.K_CHOICES_V3, "bf16", (k,))
    parts = encoded(t, 4096, monkeypatch)
    p = fmt.prepare(parts, "w")
    assert (p.version, p.k) == (4, k) and p.nph > 1 and len(set(p.q.tolist())) > 4
    assert same(host(gpu.decode_tensor(parts, "w", DEVICE)), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp32_and_fp8_decode_on_the_device(gpu, monkeypatch, dtype):
    """FP32 (hi halves coded, low halves joined: whole, dropped or shifted per block) and FP8 (the sign plane),
    with row contexts, raw chunks and specials."""
    rng = np.random.default_rng(3)
    fp32 = dtype == torch.float32
    rows, cols, chunk, last, span = (40, 100, 320, 160, (-12, 12)) if fp32 else (64, 256, 4096, 4096, (-9, 8.5))
    x = rng.standard_normal((rows, cols)) * np.logspace(-1, 1, rows)[:, None]
    x[:8] = x[:8].astype(np.float16)  # FP32: the first chunks' low halves shifted (13 trailing zero bits)
    t = torch.from_numpy(x.astype(np.float32)).to(dtype)
    t[16:24] = t[16:24].to(torch.bfloat16).to(dtype)  # and others' all zero
    spread = np.sign(rng.standard_normal(last)) * 2.0 ** rng.uniform(*span, last)  # (FP8: a whole chunk, as a
    t.reshape(-1)[-last:] = torch.from_numpy(spread.astype(np.float32)).to(dtype)  # chunk's 128 bytes of states
    parts = encoded(t, chunk, monkeypatch)  # weigh on small ones): stored raw
    p = fmt.prepare(parts, "w")
    assert gpu.supported(p) and p.version == 4 and set(p.modes.tolist()) == {0, 1}
    assert same(host(gpu.decode_tensor(parts, "w", DEVICE)), t)


def test_older_versions_decode_on_the_cpu_and_move(gpu):
    for version in (2, 3):
        t = make(torch.bfloat16, (20, 64), "weights", 4)
        parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t, version=version).items()}
        assert not gpu.supported(fmt.prepare(parts, "w"))
        assert same(host(gpu.decode_tensor(parts, "w", DEVICE)), t)


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_models_tensors_decode_together_as_one_by_one_on_the_cpu(gpu, monkeypatch, prefetch):
    """BF16, FP16 and FP32 tensors of different symbol widths, raw ones, an empty one and a version 2 one
    (decoded on the CPU) in one call: the CPU decoder's tensors; a corrupt tensor is named, the first in the caller's
    order when two are."""
    model_ = {"a": make(torch.bfloat16, (24, 64), "weights", 1), "b": make(torch.float16, (30, 50), "zeros", 2),
              "c": make(torch.bfloat16, (300,), "bits", 3), "d": make(torch.float32, (16, 40), "weights", 4),
              "e": make(torch.bfloat16, (0, 8), "weights", 5), "f": make(torch.bfloat16, (40, 33), "special", 6),
              "g": make(torch.float16, (40, 64), "weights", 7)}
    with monkeypatch.context() as m:
        m.setattr(fmt, "CHUNK_WEIGHTS", 700)
        parts = {k + s: v for k, t in model_.items() for s, v in encode_tensor(t).items()}
    monkeypatch.setattr(gpu, "PREFETCH", prefetch)  # the step's words read before its lookup, or after
    kinds = {k: (p.version, p.k, gpu.supported(p)) for k in model_ if (p := fmt.prepare(parts, k))}
    assert kinds["a"] == (4, 2, True) and kinds["g"] == (4, 3, True) and kinds["d"][2] and kinds["f"][0] == 2
    out = host(gpu.decode_tensors(parts, list(model_), DEVICE))
    assert list(out) == list(model_)
    assert all(same(out[k], t) for k, t in model_.items())
    bad = dict(parts)
    for name in ("f", "b"):
        code = parts[name + fmt.CODE].clone()
        code[100] ^= 0x10
        bad[name + fmt.CODE] = code
    with pytest.raises(UnweightError, match="'b'"):
        gpu.decode_tensors(bad, list(model_), DEVICE)
    with pytest.raises(UnweightError, match="'f'"):
        gpu.decode_tensors(bad, ["a", "f", "b"], DEVICE)


def reference_order(numel, chunk_w, row_len, q, nph):
    """Each value's (chunk, place in the chunk's coding order, phase, rotation), by the format's words: a chunk
    codes its rows' parts phase by phase, rows ascending."""
    out = {}
    for c0 in range(0, numel, chunk_w):
        n = min(chunk_w, numel - c0)
        i = 0
        for ph in range(nph):
            for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):
                if int(q[row]) % nph != ph:
                    continue
                for v in range(max(c0, row * row_len), min(c0 + n, (row + 1) * row_len)):
                    out[v] = (c0 // chunk_w, i, ph, (int(q[row]) // nph) % 255)
                    i += 1
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 30), row_len=st.integers(1, 40), chunk_w=st.integers(1, 300), nph=st.integers(1, 4),
       seed=st.integers(0, 2**31), spread=st.sampled_from([0, 1, 128]))
def test_segments_follow_the_coding_order(gpu, rows, row_len, chunk_w, nph, seed, spread):
    q = np.random.default_rng(seed).integers(-spread, spread + 1, rows).astype(np.int8)  # 0: no row context
    numel = rows * row_len
    lo, coding, place, phase, rot = gpu.segments(numel, chunk_w, row_len, q, nph, 255)
    ref = reference_order(numel, chunk_w, row_len, q, nph)
    got = {}
    for c in range(lo.size - 1):
        ends = np.append(coding[lo[c] + 1:lo[c + 1]], min(chunk_w, numel - c * chunk_w))
        assert coding[lo[c]] == 0 and (np.diff(coding[lo[c]:lo[c + 1]]) > 0).all()
        for s, end in zip(range(lo[c], lo[c + 1]), ends):
            for i in range(coding[s], end):
                got[c * chunk_w + place[s] + i - coding[s]] = (c, i, phase[s], rot[s])
    assert got == ref


def reference_checks(code, offsets, modes, n, hi_bits, r):
    """The host's checks of each chunk's segment, as numpy (what the GPU decoder's host computed before its
    tables were compiled): statuses, and each segment's rANS words."""
    s0, seglen = offsets[:-1], np.diff(offsets)
    coded, raw = modes == 0, modes == 1
    status = np.zeros(modes.size, np.int32)
    status[~coded & ~raw] = 6
    status[raw & (seglen != n * hi_bits // 8)] = 3
    pb = -(-n // 8) * 8 * r // 8
    words_bytes = seglen - pb - (pb & 1)
    short = coded & ((words_bytes < 0) | (words_bytes % 2 != 0) | (s0 % 2 != 0))
    status[short] = rans.ERR_OVERRUN
    pad = code[np.minimum(s0 + seglen - 1, code.size - 1)]
    status[coded & ~short & (pb % 2 == 1) & (pad != 0)] = 7
    status[coded & (status == 0) & (words_bytes // 2 < 64)] = rans.ERR_OVERRUN
    return status, words_bytes // 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), nchunks=st.integers(1, 12), r=st.integers(1, 8), hi_bits=st.sampled_from([8, 16]))
def test_host_checks_give_each_chunk_the_cpu_decoders_status(gpu, seed, nchunks, r, hi_bits):
    """Segments short, long, odd, misaligned, with a pad byte zero or not, raw of the right size or not, modes
    valid or not: the compiled tables give every chunk the status that the numpy checks did (``chunks._segment``'s
    and the CPU decoder's order of failures), each passing coded chunk its words, each passing raw one its
    bytes, and every passing chunk a checksum."""
    rng = np.random.default_rng(seed)
    chunk_w = int(rng.integers(1, 600))
    n = np.full(nchunks, chunk_w)
    n[-1] = rng.integers(1, chunk_w + 1)
    pb = -(-n // 8) * 8 * r // 8
    lens = np.where(rng.random(nchunks) < 0.5, pb + (pb & 1) + 2 * rng.integers(60, 70, nchunks),
                    rng.integers(0, 400, nchunks))  # half well-formed, else anything
    lens = np.where(rng.random(nchunks) < 0.2, n * hi_bits // 8, lens)  # some of a raw chunk's size
    offsets = np.concatenate([[rng.integers(0, 2)], lens]).cumsum().astype(np.int64)
    code = (rng.random(int(offsets[-1]) + 8) < 0.5).astype(np.uint8)  # zero or one: pad bytes zero or not
    modes = rng.choice(np.array([0, 0, 0, 1, 1, 2, 7], np.uint8), nchunks)
    ref_status, ref_words = reference_checks(code, offsets, modes, n, hi_bits, r)
    lo = np.arange(nchunks + 1, dtype=np.int64)
    status, rows, which, stored, _, _, hashes = gpu._tables(
        code, offsets, modes, np.zeros(1, np.int64), lo, int(n.sum()), chunk_w, hi_bits, r, hi_bits // 8, False,
        0, 0, 0, 0, 0, 0, 0)
    assert np.array_equal(status, ref_status)
    ok = np.flatnonzero(status == 0)
    assert which[:, 1].tolist() == [c for c in ok if modes[c] == 0]
    assert np.array_equal(rows[:, 1], ref_words[which[:, 1]])
    assert np.array_equal(stored[:, 2], n[[c for c in ok if modes[c] == 1]] * hi_bits // 8)
    assert np.array_equal(hashes[:, 1], n[ok] * (hi_bits // 8))


def test_xxh3_kernel_matches_the_reference(gpu):
    xxhash = pytest.importorskip("xxhash")
    data = np.random.default_rng(0).integers(0, 256, 12000, dtype=np.uint8)
    lengths = np.array([0, 1, 16, 240, 241, 1023, 1024, 1025, 2048 + 7, 4000, 9000], np.int64)
    for starts in (np.arange(lengths.size, dtype=np.int64) * 5, np.arange(lengths.size, dtype=np.int64) * 8):
        got = gpu.xxh3_chunks(torch.from_numpy(data).to(DEVICE), starts, lengths)
        ref = [xxhash.xxh3_64_intdigest(data[a:a + n].tobytes()) for a, n in zip(starts, lengths)]
        assert got.tolist() == ref


def fails_alike(gpu, bad: dict, name: str = "w") -> str:
    """Both decoders refuse tensor ``name`` of ``bad`` with the same error, which names a chunk; returns it."""
    with pytest.raises(UnweightError) as cpu_err:
        decode_tensor(bad, name)
    with pytest.raises(UnweightError) as gpu_err:
        gpu.decode_tensor(bad, name, DEVICE)
    assert str(gpu_err.value) == str(cpu_err.value) and "chunk" in str(gpu_err.value)
    return str(gpu_err.value)


def test_corruption_fails_as_on_the_cpu(gpu, monkeypatch):
    """Flipped bits anywhere in the code stream (rANS words, planes, raw chunks) and a rewritten mode:
    the GPU decoder raises the CPU decoder's error, naming the tensor and the chunk; never wrong data."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 128)) * 0.02
    x.reshape(-1)[-256:] = np.sign(rng.standard_normal(256)) * 2.0 ** rng.uniform(-12, 12, 256)  # stored raw
    t = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    parts = encoded(t, 256, monkeypatch)
    assert set(parts["w" + fmt.MODES].tolist()) == {0, 1}
    code = parts["w" + fmt.CODE]
    cases = []
    raw_at = int(parts["w" + fmt.OFFSETS][-2]) + 100  # inside the raw chunk
    for flips in [[raw_at]] + [rng.integers(0, code.numel() - rans.STREAM_PAD, rng.integers(1, 4)) for _ in range(7)]:
        c = code.clone()
        for at in flips:
            c[int(at)] ^= 1 << int(rng.integers(0, 8))
        cases.append({**parts, "w" + fmt.CODE: c})
    modes = parts["w" + fmt.MODES].clone()
    modes[3] = 7
    cases.append({**parts, "w" + fmt.MODES: modes})
    for bad in cases:
        assert "'w'" in fails_alike(gpu, bad)
    assert torch.equal(bits(t), bits(decode_tensor(parts, "w")))


COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unweight.lossless import gpu
assert type(gpu._decode_chunks).__name__ == "JITFunction"
ptr = {"code_ptr": "*u8", "dec_ptr": "*i32", "out_ptr": "*u8", "status_ptr": "*i32", "data_ptr": "*u8",
       "low_ptr": "*u8"}
ints = {"code_words": "i64", "low_size": "i64"}
rans = dict(SCALE=4096, LOW=65536, OVERRUN=1, STATE=2)
kernels = [(gpu._decode_chunks, dict(K=k, R=r, H=h, EMAX=emax, STRIDE=stride, PREFETCH=pre, BALLOT=vote, **rans), 1)
           for k, r, h, emax, stride in ((2, 6, 16, 255, 1), (3, 8, 16, 31, 1), (2, 6, 16, 255, 2), (3, 1, 8, 15, 1))
           for pre in (False, True) for vote in (False, True)]
kernels += [(gpu._xxh3_chunks, dict(ALIGNED=True), 1), (gpu._xxh3_chunks, dict(ALIGNED=False), 1),
            (gpu._copy_raw, dict(STRIDE=1, BLOCK=1024), 1), (gpu._copy_raw, dict(STRIDE=2, BLOCK=1024), 1),
            (gpu._join_low, dict(BAD=4, BLOCK=4096), 4)]
for fn, consts, warps in kernels:
    sig = {a: "constexpr" if a in consts else ptr.get(a, ints.get(a, "*i64")) for a in fn.arg_names}
    const = {(fn.arg_names.index(a),): v for a, v in consts.items()}
    for arch in (80, 90):
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps})
        assert k.asm["cubin"], (fn, arch)
print("compiled")
"""


def test_kernels_compile_for_ampere_and_hopper_gpus(gpu):
    """What the interpreter does not check: Triton compiles the kernels to machine code (``ptxas``, shipped
    with Triton) for sm_80 and sm_90, with no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def test_fp32_low_halves_and_fp8_corruption_fails_as_on_the_cpu(gpu, monkeypatch):
    """Flips in FP32's low-half stream (block headers and bits) and in FP8's code stream."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((32, 128)) * np.logspace(-1, 1, 32)[:, None]
    x[:8] = x[:8].astype(np.float16)
    for dtype, key, chunk in ((torch.float32, fmt.LOW, 512), (torch.float8_e4m3fn, fmt.CODE, 4096)):
        t = torch.from_numpy(x.astype(np.float32)).to(dtype)
        parts = encoded(t, chunk, monkeypatch)
        stream = parts["w" + key]
        for at in [0, 1, *rng.integers(0, stream.numel() - rans.STREAM_PAD, 3)]:
            bad = stream.clone()
            bad[int(at)] ^= 0x24
            fails_alike(gpu, {**parts, "w" + key: bad})


def small_llama(tmp_path, monkeypatch, extra=None) -> dict[str, torch.Tensor]:
    """A small Llama in BF16 saved to ``tmp_path / "dense"`` (with ``extra`` tensors in a shard of their own) and
    compressed into ``tmp_path / "comp"`` as `unweight compress --method lossless` does; its state dict."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from unweight.formats import compress_checkpoint
    from unweight.lossless.register import FORMAT, encode_parts

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    model_ = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model_.save_pretrained(tmp_path / "dense")
    if extra:
        save_file(extra, tmp_path / "dense" / "extra.safetensors")
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 1024)
    compress_checkpoint(tmp_path / "dense", tmp_path / "comp", FORMAT, encode_parts, {}, progress=False)
    return dict(model_.state_dict())


def flip_a_byte(folder, where: str = "mlp") -> str:
    """One byte flipped in the pack of a tensor whose name holds ``where``; that tensor's name."""
    from safetensors.torch import load_file, save_file

    stored = {f: load_file(f) for f in sorted(folder.glob("*.safetensors"))}
    f, key = next((f, k) for f, d in stored.items() for k in d if k.endswith(".ul.pack") and where in k)
    stored[f][key][stored[f][key].numel() // 2] ^= 0x40
    save_file(stored[f], f, {"format": "pt"})
    return key.removesuffix(".ul.pack")


def test_a_compressed_folder_loads_onto_the_device(gpu, tmp_path, monkeypatch):
    """A small Llama in BF16, compressed as `unweight compress --method lossless` does, comes back from its
    folder bit-exact, with its plain (integer) tensors copied as they are; an uncompressed folder is copied;
    a corrupt one is refused naming the folder and the tensor (``unweight.formats.load_state_dict``)."""
    from unweight.formats import load_state_dict
    from unweight.lossless import register

    if DEVICE == "cpu":  # the interpreter's kernels stand in for the GPU's
        monkeypatch.setattr(register, "_on_gpu", lambda device: True)
    calls = []
    decode = gpu.decode_tensors
    monkeypatch.setattr(gpu, "decode_tensors", lambda parts, names, device: calls.append(names)
                        or decode(parts, names, device))
    steps = torch.arange(5, dtype=torch.int64)
    state = small_llama(tmp_path, monkeypatch, {"steps": steps})
    out = host(load_state_dict(tmp_path / "comp", DEVICE))
    assert len(calls) == 1 and sorted(calls[0]) == sorted(state)  # all together, by the GPU decoder
    assert set(out) == set(state) | {"steps"} and torch.equal(out["steps"], steps)
    assert all(same(out[k], t) for k, t in state.items())
    dense = host(load_state_dict(tmp_path / "dense", DEVICE))  # not compressed: copied as it is
    assert all(same(dense[k], t) for k, t in state.items())

    name = flip_a_byte(tmp_path / "comp")  # the folder and the tensor named
    with pytest.raises(UnweightError, match=name) as err:
        load_state_dict(tmp_path / "comp", DEVICE)
    assert "comp" in str(err.value)


def test_from_pretrained_decodes_on_the_gpu_that_the_device_map_names(gpu, tmp_path, monkeypatch):
    """``from_pretrained(folder, device_map=...)`` decodes the tensors that the map puts on a GPU with the GPU
    decoder, there, bit-exact: all together, a batch of parts at a time (``hf._batch_bytes``), when the whole
    model goes to one GPU, each in memory of its own (the model saves and loads back as it was); one by one
    otherwise. A model loaded onto the CPU never calls it, nor one loaded with UNWEIGHT_GPU_DECODE=0. Where the
    device fails, a warning and the CPU decodes. A corrupt tensor is refused naming the shard and the tensor.
    (In the interpreter the CPU stands in for the GPU.)"""
    import unweight.hf as hf
    from transformers import AutoModelForCausalLM

    from unweight.lossless import register

    state = small_llama(tmp_path, monkeypatch)
    calls = []
    decode = gpu.decode_tensors
    monkeypatch.setattr(gpu, "decode_tensors", lambda parts, names, device: calls.append(sorted(names))
                        or decode(parts, names, device))

    def load(**kwargs):
        calls.clear()
        model_ = AutoModelForCausalLM.from_pretrained(tmp_path / "comp", **kwargs)
        loaded = model_.state_dict()
        assert set(loaded) == set(state) and all(same(loaded[k].cpu(), t) for k, t in state.items())
        return model_, loaded

    load()
    assert calls == []
    real = hf._accelerators
    if DEVICE == "cpu":  # the interpreter's kernels run on CPU tensors: let the map's CPU stand for a GPU
        def accelerators(device_map, names):
            return {n: d and torch.device("cpu") for n, d in real(device_map and {"": "cuda"}, names).items()}
        monkeypatch.setattr(hf, "_accelerators", accelerators)
        monkeypatch.setattr(register, "_on_gpu", lambda device: os.environ.get(hf.GPU_DECODE_ENV) != "0")

    model_, loaded = load(device_map=DEVICE)
    assert calls == [sorted(state)]  # every tensor of the checkpoint is a float one: one batch
    assert all(loaded[k].device.type == DEVICE for k in state)
    params = list(model_.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == len(params)  # no storage shared
    model_.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(same(again[k], t) for k, t in state.items())

    with monkeypatch.context() as m:
        m.setattr(hf, "BATCH_BYTES", 1)  # a batch per tensor
        m.setattr(hf, "GPU_BATCH_BYTES", 1)
        load(device_map=DEVICE)
    assert sorted(calls) == [[k] for k in sorted(state)]
    set_device_map = hf._Decoder.set_device_map

    def placing(change):  # the map's devices, then changed
        monkeypatch.setattr(hf._Decoder, "set_device_map", lambda self, m: set_device_map(self, m)
                            or change(self.devices))
    placing(lambda devices: devices.update({"model.norm.weight": torch.device("meta")}))  # on another device:
    load(device_map=DEVICE)  # not in their batch
    assert sorted(calls) == sorted([sorted(set(state) - {"model.norm.weight"}), ["model.norm.weight"]])
    placing(dict.clear)  # stored names the map does not place (a model that renames them): one by one
    load(device_map=DEVICE)
    assert sorted(calls) == [[k] for k in sorted(state)]
    monkeypatch.setattr(hf._Decoder, "set_device_map", set_device_map)
    monkeypatch.setenv(hf.GPU_DECODE_ENV, "0")  # the CPU decodes
    load(device_map=DEVICE)
    assert calls == []
    monkeypatch.delenv(hf.GPU_DECODE_ENV)

    def broken(parts, names, device):  # a device that fails (driver, memory, a bug): warned, then the CPU decodes
        calls.append(sorted(names))
        raise RuntimeError("no kernel image is available")
    monkeypatch.setattr(gpu, "decode_tensors", broken)
    with pytest.warns(RuntimeWarning, match="no kernel image.*on the CPU instead") as warned:
        _, loaded = load(device_map=DEVICE)
    assert len(calls) == 1 and len([w for w in warned if "instead" in str(w.message)]) == 1  # then not tried again
    assert all(loaded[k].device.type == DEVICE for k in state)

    name = flip_a_byte(tmp_path / "comp", "self_attn")  # corrupt: the CPU decoder's error, device working or not
    for decode_on in (decode, broken):
        monkeypatch.setattr(gpu, "decode_tensors", decode_on)
        with pytest.raises(UnweightError, match=name) as err, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # (the broken device's, on the first tensor)
            AutoModelForCausalLM.from_pretrained(tmp_path / "comp", device_map=DEVICE)
        assert "model.safetensors" in str(err.value)


@pytest.fixture(autouse=True)
def bounds_checked(gpu, monkeypatch):
    """Every load and store of the interpreted kernels, in every test here, checked to lie inside one of its
    launch's tensors: on a GPU an access outside them may read another allocation or fault, where the
    interpreter (plain memory reads in this process) rarely notices. Hooks the interpreter's launch and memory
    calls (Triton 3.9)."""
    if DEVICE != "cpu":  # the compiled kernels: compute-sanitizer's memcheck does this there
        yield []
        return
    interp = pytest.importorskip("triton.runtime.interpreter")
    if not hasattr(interp, "_interpreter") or not hasattr(interp, "GridExecutor"):
        pytest.skip("this Triton's interpreter has other internals")
    real, launch, ranges, bad = interp._interpreter, interp.GridExecutor.__call__, [], []

    def check(ptrs, mask, size):
        at = np.asarray(ptrs)[np.broadcast_to(np.asarray(mask, bool), np.shape(ptrs))]
        inside = np.zeros(at.shape, bool)
        for lo, hi in ranges:
            inside |= (at >= lo) & (at + size <= hi)
        if not inside.all():
            bad.append(at[~inside][:4])

    class Checked:
        def __getattr__(self, name):
            return getattr(real, name)

        def load(self, ptrs, mask, other, dtype):
            check(ptrs, mask, np.dtype(dtype).itemsize)
            return real.load(ptrs, mask, other, dtype)

        def store(self, ptrs, value, mask):
            check(ptrs, mask, value.dtype.itemsize)
            return real.store(ptrs, value, mask)

    def launched(self, *args, **kwargs):
        ts = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]  # each its own view's bytes
        assert all(t.is_contiguous() for t in ts)  # (tables share one buffer: a table overrun is not in another)
        ranges[:] = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in ts]
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(interp, "_interpreter", Checked())
    monkeypatch.setattr(interp.GridExecutor, "__call__", launched)
    yield bad
    assert not bad, f"accesses outside the launch's tensors at {bad[:3]}"


def test_kernels_stay_inside_their_tensors(gpu, bounds_checked, monkeypatch):
    """Every dtype (raw chunks, FP32's low halves, XXH3 aligned and not), and corrupt streams (a decoder that
    reads a stream as if it were longer than it is must still stay inside it). (Every other test here is
    checked too; this one fails where an access strays, with the case it strayed in.)"""
    tensors = {"a": make(torch.bfloat16, (24, 64), "zeros", 1), "b": make(torch.float16, (40, 64), "weights", 7),
               "c": make(torch.float32, (16, 40), "weights", 4), "d": make(torch.float8_e5m2, (33, 70), "weights", 2),
               "e": make(torch.bfloat16, (300,), "bits", 3), "f": make(torch.bfloat16, (7, 33), "weights", 5)}
    with monkeypatch.context() as m:
        m.setattr(fmt, "CHUNK_WEIGHTS", 700)
        parts = {k + s: v for k, t in tensors.items() for s, v in encode_tensor(t).items()}
    out = host(gpu.decode_tensors(parts, list(tensors), DEVICE))
    assert all(same(out[k], t) for k, t in tensors.items())
    rng = np.random.default_rng(9)
    for name in ("a", "c", "d"):
        for key in (fmt.CODE, fmt.LOW) if name == "c" else (fmt.CODE,):
            stream = parts[name + key].clone()
            stream[rng.integers(0, stream.numel() - rans.STREAM_PAD, 6)] ^= 0x81
            with pytest.raises(UnweightError):
                gpu.decode_tensors({**parts, name + key: stream}, list(tensors), DEVICE)
    assert not bounds_checked
