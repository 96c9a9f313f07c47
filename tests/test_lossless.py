"""Properties of the lossless codec: bit-exact round trips for every float dtype and shape, the
input left untouched, output no larger than the input plus a small header, and every corruption
or truncation reported as an UnweightError that names the tensor (and the chunk at fault)."""

import ctypes
import functools
import gc
import mmap
import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from numba import njit

from unweight.errors import UnweightError
from unweight.lossless import (decode_tensor, encode_tensor, encoded_names, is_supported,
                               merge_fields, order0_bits, split_fields)
from unweight.lossless import format as fmt
from unweight.lossless import model, rans, simd
from unweight.lossless.fields import LOW_BLOCK, as_words, layout_of
from unweight.lossless.hashing import xxh64
from unweight.lossless.register import decode, encode_parts, pack_streams, unpack_streams

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
PER_CHUNK_PARTS = (fmt.CODE, fmt.OFFSETS, fmt.MODES, fmt.CHECK, fmt.LOW, fmt.LOW_OFFSETS)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_VIEW[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def encode(t: torch.Tensor, name: str = "w", version: int | None = None, **kw) -> dict[str, torch.Tensor]:
    if version is not None:  # BF16 in the older format version 2, which every reader still reads
        return {name + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t, version=version, **kw).items()}
    return {name + k: v for k, v in encode_tensor(t, **kw).items()}


def nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in parts.values())


def specials(dtype: torch.dtype) -> torch.Tensor:
    """NaN, +-Inf, +-0, subnormals, extremes: the bit patterns a float codec must not touch."""
    fi = torch.finfo(dtype)
    vals = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, fi.max, -fi.max, fi.tiny,
            -fi.tiny, fi.tiny / 4, -fi.tiny / 2, fi.eps, 1.0, -1.0]
    t = torch.tensor(vals, dtype=torch.float32).to(dtype)
    # and a NaN with a payload, built from bits
    nan_payload = {1: 0x7F, 2: 0x7FC3, 4: 0x7FC00123}[t.element_size()]
    extra = torch.tensor([nan_payload], dtype=torch.int64).to(INT_VIEW[t.element_size()])
    return torch.cat([t, extra.view(dtype)])


def make(dtype: torch.dtype, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape, dtype=np.int64))
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    if kind == "bits":  # every pattern equally likely: incompressible
        size = torch.finfo(dtype).bits // 8
        raw = rng.integers(0, 256, n * size, dtype=np.uint8)
        return torch.from_numpy(raw).view(dtype).reshape(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    scale = np.exp(rng.normal(-3.0, 0.7, size=(rows, 1)))
    x = torch.from_numpy((rng.standard_normal((rows, n // max(rows, 1))) * scale).astype(np.float32))
    t = x.reshape(shape).to(dtype)
    if kind == "zeros" and n:  # exact zeros and subnormals: exponent 0, which format version 3 codes apart
        fi = torch.finfo(dtype)
        sp = torch.tensor([0.0, -0.0, fi.tiny / 4, -fi.tiny / 2, fi.tiny / 64], dtype=torch.float32).to(dtype)
        flat = t.reshape(-1).view(INT_VIEW[t.element_size()]).numpy()
        idx = rng.integers(0, n, size=max(1, n // 7))
        flat[idx] = sp.view(INT_VIEW[t.element_size()]).numpy()[rng.integers(0, sp.numel(), size=idx.size)]
    if kind == "special" and n:
        sp = specials(dtype)
        idx = torch.from_numpy(rng.integers(0, n, size=max(1, n // 7)))
        view = INT_VIEW[t.element_size()]
        # numpy's fancy assignment: the last of repeated indices wins, always (torch leaves it open,
        # and with several threads the winner varies from run to run)
        flat = t.reshape(-1).view(view).numpy()
        flat[idx.numpy()] = sp.view(view).numpy()[rng.integers(0, sp.numel(), size=idx.numel())]
    return t


shapes = st.one_of(
    st.sampled_from([(), (0,), (1,), (2,), (3, 0), (1, 1), (7,), (17, 3), (1023,), (5, 1, 31)]),
    st.tuples(st.integers(1, 80), st.integers(1, 70)),
    st.tuples(st.integers(8, 40), st.sampled_from([16, 33, 64, 100, 128])),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from(DTYPES), shape=shapes, kind=st.sampled_from(["weights", "zeros", "special",
       "bits"]), seed=st.integers(0, 2**31), chunk=st.sampled_from([64, 300, 4096, 1 << 16]))
@example(dtype=torch.bfloat16, shape=(0,), kind="weights", seed=0, chunk=64)  # empty: every run
@example(dtype=torch.float32, shape=(3, 0), kind="weights", seed=0, chunk=64)
def test_round_trip_is_bit_exact_and_input_untouched(dtype, shape, kind, seed, chunk):
    t = make(dtype, shape, kind, seed)
    before = bits(t).clone()
    old, fmt.CHUNK_WEIGHTS = fmt.CHUNK_WEIGHTS, chunk
    try:
        parts = encode(t)
    finally:
        fmt.CHUNK_WEIGHTS = old
    assert torch.equal(bits(t), before)
    assert all(v.dtype in (torch.uint8, torch.int64) and v.dim() == 1 for v in parts.values())
    assert same(decode_tensor(parts, "w"), t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_specials_survive_in_every_dtype(dtype):
    sp = specials(dtype)
    t = sp.repeat(300).reshape(60, -1)
    assert same(decode_tensor(encode(t), "w"), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_many_default_chunks_threads_give_identical_output(dtype):
    # 2100 x 512 values: two default chunks, and planned on several threads (>= PARALLEL_VALUES)
    t = make(dtype, (2100, 512), "weights", 1)
    assert t.numel() >= model.PARALLEL_VALUES
    one = encode(t, threads=1)
    two = encode(t, threads=2)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert same(decode_tensor(one, "w", threads=2), t)
    assert same(decode_tensor(one, "w", threads=1), t)


def test_a_models_tensors_spread_over_threads_give_what_one_by_one_gives(monkeypatch):
    """encode_tensors / decode_tensors: tensors of at least as many chunks as threads on all threads, the rest
    side by side; the same parts and tensors as encode_tensor / decode_tensor, and a corrupt tensor is named
    as the one-by-one decode names it (the first in the caller's order)."""
    from unweight.lossless import decode_tensors, encode_tensors
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 4096)
    tensors = {f"m{i}": make(dtype, shape, "weights", i) for i, (dtype, shape) in enumerate(
        [(torch.bfloat16, (64, 300)), (torch.float16, (7, 33)), (torch.float32, (40, 128)), (torch.bfloat16, (0, 8)),
         (torch.float8_e4m3fn, (96, 100)), (torch.bfloat16, (3,))])}
    one = {n: encode_tensor(t, threads=1) for n, t in tensors.items()}
    for threads in (1, 3):
        many = encode_tensors(tensors, threads)
        assert list(many) == list(tensors)
        assert all(many[n].keys() == one[n].keys() and all(torch.equal(many[n][k], one[n][k]) for k in one[n])
                   for n in tensors)
        parts = {n + k: v for n, p in many.items() for k, v in p.items()}
        out = decode_tensors(parts, list(tensors), threads)
        assert list(out) == list(tensors) and all(same(out[n], t) for n, t in tensors.items())
    parts = {n + k: v for n, p in one.items() for k, v in p.items()}
    for n in ("m2", "m4"):  # m4 (9600 values) is larger than m2 (5120): decoded first when side by side
        parts[n + fmt.CODE] = parts[n + fmt.CODE].clone()
        parts[n + fmt.CODE][40] ^= 0xFF
    for threads in (1, 3):
        with pytest.raises(UnweightError, match="'m2'"):
            decode_tensors(parts, list(tensors), threads)


def test_the_pool_runs_tasks_in_order_on_at_most_the_threads_asked_for():
    from unweight.lossless import pool
    lock, running, peak = threading.Lock(), [0], [0]

    def task(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        if i in (5, 9):
            raise ValueError(i)
        return i * i

    for threads in (1, 2, 3):
        peak[0] = 0
        assert pool.run_tasks([lambda i=i: task(i) for i in range(12) if i not in (5, 9)], threads) == \
            [i * i for i in range(12) if i not in (5, 9)]
        assert 1 <= peak[0] <= threads
        with pytest.raises(ValueError, match="5"):
            pool.run_tasks([lambda i=i: task(i) for i in range(12)], threads)


def test_decoded_tensors_own_writable_memory_that_outlives_the_parts():
    t = make(torch.bfloat16, (600, 512), "weights", 3)
    assert t.numel() * 2 >= fmt.POPULATE_BYTES  # its pages may be mapped up front
    parts = encode(t)
    a, b = decode_tensor(parts, "w"), decode_tensor(parts, "w")
    del parts
    gc.collect()
    a.view(torch.int16).add_(1)  # writable, and not the memory b holds
    assert same(b, t) and not same(a, t)
    a.view(torch.int16).sub_(1)
    assert same(a, t)


def _resident_pages(buf: np.ndarray) -> int:
    start, end = fmt._whole_pages(buf)
    n = (end - start) // fmt._PAGE
    vec = ctypes.create_string_buffer(n)
    assert fmt._LIBC.mincore(start, n * fmt._PAGE, vec) == 0
    return sum(b & 1 for b in vec.raw)


@pytest.mark.skipif(fmt._LIBC is None, reason="pages are mapped up front on Linux only")
def test_fresh_output_memory_has_every_page_mapped_before_it_is_written():
    npages = 1024
    probe = mmap.mmap(-1, fmt._PAGE)
    if fmt._LIBC.madvise(ctypes.addressof(ctypes.c_char.from_buffer(probe)), fmt._PAGE,
                         fmt._MADV_POPULATE_WRITE) != 0:
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14): the kernels fault as before")
    buf = np.frombuffer(mmap.mmap(-1, npages * fmt._PAGE), np.uint8)  # a new mapping: nothing resident
    assert _resident_pages(buf) == 0
    fmt._map_if_fresh(buf)
    assert _resident_pages(buf) == npages


def test_the_codec_follows_torchs_thread_count_unless_told():
    from unweight.lossless import pool
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert pool.resolve(None) == 1 and pool.resolve(3) == 3
    finally:
        torch.set_num_threads(before)
    assert pool.resolve(None) == before


# XXH64 of every part (sorted by suffix) of ``make(dtype, (300, 257), kind, 7)`` as each format version
# wrote them (version 2, of "special" values: 16 lanes, chunks of 2^18, BF16 k in {2, 3, 4}; versions 3 and
# 4, BF16, FP16 and FP32 (and in 4 FP8), of "zeros": 32 lanes of 32-bit states; 4 with XXH3-64 chunk checksums):
# a rewrite for speed must write the same bytes
PINNED = {(torch.bfloat16, 2): 0xA5A814D5E3324B09, (torch.float16, 2): 0x26FBC32B6296384F,
          (torch.float32, 2): 0x033C7E63944C5183, (torch.float8_e4m3fn, 2): 0x319F9483FFE612E0,
          (torch.float8_e5m2, 2): 0x5842CF99D7BDE476, (torch.bfloat16, 3): 0xBC7527E7B65A3524,
          (torch.float32, 3): 0x71B112B3ED04A689, (torch.float16, 3): 0xD94A23C48D7B3EBF,
          (torch.bfloat16, 4): 0x8BCA28700BEF7D1D, (torch.float32, 4): 0x7819B1504688B06C,
          (torch.float16, 4): 0x30751637168FC11A, (torch.float8_e4m3fn, 4): 0x593E0A57CE9A76EE,
          (torch.float8_e5m2, 4): 0x1472C8E10E6D8218}


@pytest.mark.parametrize("dtype, version", sorted(PINNED, key=str))
def test_written_bytes_are_pinned_for_each_format_version(dtype, version, monkeypatch):
    assert fmt.FORMAT_VERSION == 4  # a new version writes other bytes: pin them anew
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 1 << 18)  # the head records the chunk size (2^20 since 2026-11-28)
    monkeypatch.setattr(fmt, "PAIR_MIN", 1 << 40)  # one chunk, as pinned before tensors were cut in pairs
    # ragged rows and lane groups; version 3 codes zeros and subnormals, not NaN and infinities (below)
    t = make(dtype, (300, 257), "zeros" if version >= 3 else "special", 7)
    parts = encode(t, version=version)
    assert int(parts["w" + fmt.HEAD][fmt._F["version"]]) == version
    blob = np.concatenate([parts[k].numpy().view(np.uint8).reshape(-1) for k in sorted(parts)])
    assert int(xxh64(blob, 0, blob.size)) == PINNED[dtype, version]
    assert same(decode_tensor(parts, "w"), t)  # and every version is still read


@njit
def _reciprocal_errors(xs, f):
    rcp, shift, bias = rans._enc_entry(f, 0)
    bad = 0
    for x in xs:
        q = rans.mulhi(x, rcp) >> np.uint64(shift)
        cmpl = np.uint64(rans.PROB_SCALE - f)
        # the step the encoder takes equals q * PROB_SCALE + x % f (cum = 0 here)
        step = x + np.uint64(bias) + q * cmpl
        want = (x // np.uint64(f)) * np.uint64(rans.PROB_SCALE) + x % np.uint64(f)
        bad += step != want
    return bad


def test_encoder_reciprocal_division_is_exact_for_every_frequency():
    rng = np.random.default_rng(9)
    for f in range(1, rans.PROB_SCALE + 1):
        # states it divides: [1, 2^32) right after emitting a word, else below f << (64 - 12 - rb)
        top = f << (64 - rans.PROB_BITS - 1)  # rb >= 1
        edges = np.array([1, 2, f, rans.STATE_LOW - 1, rans.STATE_LOW, top - 1, top - f,
                          top - f - 1, (top // f) * f - 1], np.uint64)
        xs = np.concatenate([edges, rng.integers(1, top, 200, dtype=np.uint64)])
        assert _reciprocal_errors(xs, f) == 0, f


@njit
def _decode_groups_both(words, p, limit, dec, tb, ngroups, x, rb):
    """(out, states, p, i) from the vector and from the scalar group decoder on the same input."""
    n = ngroups * rans.LANES
    out_v, out_s = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    x_v, x_s = x.copy(), x.copy()
    pv, iv = rans.decode_groups(words, p, limit, dec, tb, out_v, np.uint64(0), ngroups, x_v, rb)
    ps, i_s = rans.decode_groups_scalar(words, p, limit, dec, tb, out_s, np.uint64(0), ngroups, x_s, rb)
    return out_v, out_s, x_v, x_s, pv, ps, iv, i_s


@pytest.mark.skipif(not simd.AVAILABLE, reason="no AVX2 here: the decoder runs the scalar loop")
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rb=st.sampled_from([0, 1, 6, 9]), nph=st.integers(1, 4),
       ngroups=st.integers(0, 40), short=st.booleans())
def test_vector_decoder_steps_exactly_as_the_scalar_one(seed, rb, nph, ngroups, short):
    """Any words, any states, any valid table: the same outputs, states and stream position, and
    the same early stop when the stream runs past ``limit``."""
    rng = np.random.default_rng(seed)
    nsym = int(rng.integers(1, 64))
    alphabet = np.sort(rng.choice(1 << (16 - max(rb, 6)), nsym, replace=False)).astype(np.int64)
    freq = np.zeros((nph, nsym), np.uint32)
    for c in range(nph):
        rans.normalize_freqs(rng.integers(1, 1000, nsym) ** rng.integers(1, 4), freq[c])
    dec = np.zeros((nph, rans.PROB_SCALE), np.uint64)
    assert rans.build_tables(alphabet, freq, rb, np.zeros((rans.ENC_ROWS, 0, 0), np.uint64), dec) == -1
    nwords = ngroups * rans.LANES + 2 * rans.LANES
    words = rng.integers(0, 2**32, nwords + rans.LANES, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(rans.STATE_LOW, 2**63, rans.LANES, dtype=np.uint64) * np.uint64(2) | np.uint64(1)
    limit = np.uint64(nwords // 3 if short else nwords)
    tb = np.uint64(int(rng.integers(0, nph)) * rans.PROB_SCALE)
    out_v, out_s, x_v, x_s, pv, ps, iv, i_s = _decode_groups_both(
        words, np.uint64(0), limit, dec.reshape(-1), tb, np.uint64(ngroups), x, np.uint64(rb))
    assert (pv, iv) == (ps, i_s)
    assert np.array_equal(x_v, x_s)
    assert np.array_equal(out_v[:iv], out_s[:i_s])


def test_encoder_table_of_the_wrong_height_is_refused():
    """A table without the vector encoder's row would be written past its end (compiled code does not
    check bounds), so build_tables refuses it."""
    freq = np.array([[rans.PROB_SCALE]], np.uint32)
    with pytest.raises(ValueError, match="ENC_ROWS"):
        rans.build_tables(np.array([3], np.int64), freq, 6, np.zeros((4, 1, 8), np.uint64),
                          np.zeros((0, 0), np.uint64))


@njit
def _encode_words_both(words, enc, rb):
    """(segment) from the vector and from the scalar encoder on the same words and tables."""
    n = words.size
    sv, ss = np.zeros(n + 2 * rans.LANES + 2, np.uint32), np.zeros(n + 2 * rans.LANES + 2, np.uint32)
    pv = rans.encode_words(words, n, enc, sv, rb)
    ps = rans.encode_words_scalar(words, n, enc, ss, rb)
    return sv[pv:], ss[ps:]


@pytest.mark.skipif(not simd.AVAILABLE, reason="no AVX2 here: the encoder runs the scalar loop")
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rb=st.sampled_from([1, 4, 6, 9]), nph=st.integers(1, 4),
       n=st.integers(0, 700), skew=st.integers(1, 4), nsym=st.integers(1, 64))
def test_vector_encoder_writes_exactly_the_scalar_segment(seed, rb, nph, n, skew, nsym):
    """Any symbols, any valid tables (down to frequency 1 and a single symbol of frequency 4096, where
    the states and the division reach their extremes), any raw bits: the same segment, word for word."""
    rng = np.random.default_rng(seed)
    space = 1 << (16 - rb)
    alphabet = np.sort(rng.choice(space, nsym, replace=False)).astype(np.int64)
    freq = np.zeros((nph, nsym), np.uint32)
    for c in range(nph):
        rans.normalize_freqs(rng.integers(1, 1000, nsym) ** skew, freq[c])
    enc = np.zeros((rans.ENC_ROWS, nph, space), np.uint64)
    assert rans.build_tables(alphabet, freq, rb, enc, np.zeros((0, 0), np.uint64)) == -1
    phase = rng.integers(0, nph, n)
    sym = np.array([rng.choice(alphabet[freq[p] > 0]) for p in phase], np.int64).reshape(-1)
    raw = rng.integers(0, 1 << rb, n)
    words = ((phase * space + sym) << rb | raw).astype(np.uint32)
    seg_v, seg_s = _encode_words_both(words, enc, np.int64(rb))
    assert np.array_equal(seg_v, seg_s)


def test_non_contiguous_input():
    base = make(torch.bfloat16, (96, 130), "weights", 2)
    t = base.t()
    before = bits(base).clone()
    out = decode_tensor(encode(t), "w")
    assert same(out, t.contiguous())
    assert torch.equal(bits(base), before)


def test_fp32_low_mantissa_dropped_per_block():
    x = make(torch.float32, (64, 256), "weights", 3)
    from_bf16 = x.to(torch.bfloat16).to(torch.float32)  # low 16 bits all zero
    from_fp16 = x.to(torch.float16).to(torch.float32)  # low 13 bits zero where normal
    for t, per_value in ((from_bf16, 0.0), (from_fp16, 3 / 8)):
        parts = encode(t)
        assert same(decode_tensor(parts, "w"), t)
        low = parts["w" + fmt.LOW].numel()
        blocks = -(-t.numel() // LOW_BLOCK)
        assert low <= blocks + t.numel() * per_value + blocks  # the tz byte and padding
    assert encode(x)["w" + fmt.LOW].numel() > x.numel()  # a real FP32 tensor keeps its bits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(20000,), (50, 401), (3,)])
def test_incompressible_grows_by_at_most_a_small_header(dtype, shape):
    t = make(dtype, shape, "bits", 4)
    parts = encode(t)
    nchunks = -(-t.numel() // fmt.CHUNK_WEIGHTS)
    bound = t.numel() * t.element_size() + 256 + 40 * nchunks + t.numel() // LOW_BLOCK
    assert nbytes(parts) <= bound
    assert (parts["w" + fmt.MODES].numpy() == 1).all()  # every chunk stored raw
    assert same(decode_tensor(parts, "w"), t)


def test_coded_size_reaches_the_order0_bound():
    # iid bell-shaped weights: nothing to gain from row context, so the coder should sit on the
    # order-0 bound H(exponent) + H(sign, mantissa | exponent) up to table and chunk overhead
    t = torch.from_numpy(np.random.default_rng(5).standard_normal((512, 512)).astype(np.float32))
    t = (t * 0.02).to(torch.bfloat16)
    parts = encode(t)
    nchunks = parts["w" + fmt.MODES].numel()
    payload = parts["w" + fmt.CODE].numel() - rans.STREAM_PAD - rans.STATE_BYTES * nchunks
    bound = order0_bits(t)
    assert payload * 8 / t.numel() <= bound + 0.03  # k = 2 mantissa bits and 12-bit precision
    assert nbytes(parts) * 8 / t.numel() <= bound + 0.05  # with tables, checksums, offsets
    # rows at different scales: the row context goes below the order-0 bound
    rows = torch.from_numpy(np.exp(np.random.default_rng(6).normal(-4, 1, (512, 1)))).float()
    t2 = (t.float() * rows * 50).to(torch.bfloat16)
    assert nbytes(encode(t2)) * 8 / t2.numel() < order0_bits(t2) - 0.05


def test_unsupported_dtype_and_names():
    with pytest.raises(UnweightError, match="int64"):
        encode_tensor(torch.arange(5))
    assert not is_supported(torch.int32) and is_supported(torch.float8_e5m2)
    keys = list(encode(torch.ones(3, dtype=torch.float16), "a.b").keys()) + ["c.weight"]
    assert encoded_names(keys) == ["a.b"]


# ---------------------------------------------------------------------------------------------
# corruption


@pytest.fixture(scope="module", params=[(torch.bfloat16, None), (torch.bfloat16, 3), (torch.bfloat16, 2),
                                        (torch.float32, None), (torch.float32, 2), (torch.float16, None),
                                        (torch.float8_e4m3fn, None), (torch.float8_e4m3fn, 2),
                                        (torch.float8_e5m2, None)], ids=str)
def coded(request):
    dtype, version = request.param
    old, fmt.CHUNK_WEIGHTS = fmt.CHUNK_WEIGHTS, 1024
    try:
        t = make(dtype, (40, 160), "zeros" if dtype in fmt.V3_DTYPES and version != 2 else "special", 7)
        parts = encode(t, "layer.w", version=version)  # 6400 values: 7 chunks
        assert parts["layer.w" + fmt.HEAD][fmt._F["version"]] == (version or fmt.written_version(dtype))
    finally:
        fmt.CHUNK_WEIGHTS = old
    assert (parts["layer.w" + fmt.MODES].numpy() == 0).any()
    return t, parts


def flipped(parts, key, pos):
    out = dict(parts)
    arr = parts[key].clone()
    raw = arr.view(torch.uint8)
    raw[pos] ^= 0x5A
    out[key] = arr
    return out


def test_every_flipped_byte_raises_naming_tensor_and_chunk(coded):
    t, parts = coded
    rng = np.random.default_rng(8)
    for key, arr in parts.items():
        size = arr.numel() * arr.element_size()
        payload = size - (rans.STREAM_PAD if key.endswith(fmt.CODE) else 0)
        positions = {0, payload - 1, *rng.integers(0, payload, 12).tolist()}
        for pos in positions:
            with pytest.raises(UnweightError) as err:
                decode_tensor(flipped(parts, key, pos), "layer.w")
            msg = str(err.value)
            assert "'layer.w'" in msg
            if key.endswith(PER_CHUNK_PARTS):
                assert "chunk" in msg, (key, pos, msg)
        if key.endswith(fmt.CODE):  # the padding after the last segment carries nothing
            assert same(decode_tensor(flipped(parts, key, size - 1), "layer.w"), t)


def test_truncation_raises_naming_chunk(coded):
    t, parts = coded
    for key in parts:
        if not key.endswith((fmt.CODE, fmt.LOW)):
            continue
        for keep in (0, parts[key].numel() // 2, parts[key].numel() - 1):
            cut = dict(parts)
            cut[key] = parts[key][:keep].clone()
            with pytest.raises(UnweightError, match=r"'layer\.w'.*chunk \d+.*truncated"):
                decode_tensor(cut, "layer.w")
    short = dict(parts)
    short["layer.w" + fmt.OFFSETS] = parts["layer.w" + fmt.OFFSETS][:-2].clone()
    with pytest.raises(UnweightError, match="chunk"):
        decode_tensor(short, "layer.w")


def test_missing_or_mistyped_parts(coded):
    _, parts = coded
    for key in ("layer.w" + fmt.CODE, "layer.w" + fmt.HEAD):
        gone = {k: v for k, v in parts.items() if k != key}
        with pytest.raises(UnweightError, match="missing"):
            decode_tensor(gone, "layer.w")
    wrong = dict(parts)
    wrong["layer.w" + fmt.OFFSETS] = parts["layer.w" + fmt.OFFSETS].to(torch.int32)
    with pytest.raises(UnweightError, match="1-D torch.int64"):
        decode_tensor(wrong, "layer.w")


def _rehash(parts, name):
    head = parts[name + fmt.HEAD].clone()
    tables = parts.get(name + fmt.TABLES, torch.zeros(0, dtype=torch.uint8)).numpy()
    rows = parts.get(name + fmt.ROWS, torch.zeros(0, dtype=torch.uint8)).numpy()
    head.numpy()[fmt._F["meta_hash"]] = fmt._meta_hash(head.numpy(), tables, rows)
    return {**parts, name + fmt.HEAD: head}


def test_corrupt_tables_behind_a_valid_checksum_never_crash(coded):
    # a forged metadata checksum must still meet the structural checks (or the chunk checksums)
    t, parts = coded
    name = "layer.w"
    rng = np.random.default_rng(9)
    for key in (fmt.TABLES, fmt.ROWS, fmt.HEAD):
        if name + key not in parts:
            continue
        for _ in range(20):
            arr = parts[name + key]
            pos = int(rng.integers(0, arr.numel() * arr.element_size()))
            bad = _rehash(flipped(parts, name + key, pos), name)
            try:
                out = decode_tensor(bad, name)
            except UnweightError as e:
                assert repr(name) in str(e)
            else:
                assert same(out, t)


def test_future_version_is_refused(coded):
    _, parts = coded
    head = parts["layer.w" + fmt.HEAD].clone()
    head[fmt._F["version"]] = fmt.FORMAT_VERSION + 1
    with pytest.raises(UnweightError, match="format version"):
        decode_tensor({**parts, "layer.w" + fmt.HEAD: head}, "layer.w")


# ---------------------------------------------------------------------------------------------
# fields and hashing


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_merge_fields_round_trip(dtype):
    t = make(dtype, (30, 70), "special", 10)
    f = split_fields(t, chunk=512)
    assert f.exponent.dtype == np.uint8 and f.exponent.size == t.numel()
    assert same(merge_fields(f), t)


def test_split_fields_drops_zero_low_bytes_of_fp32_per_chunk():
    x = make(torch.float32, (8, 512), "weights", 11)
    t = torch.cat([x[:4].to(torch.bfloat16).float(), x[4:]])  # first half BF16-exact
    f = split_fields(t, chunk=1024)
    assert f.low_zero.tolist() == [True, True, False, False]
    assert f.sign_mantissa[0].size == 2048 and f.sign_mantissa[2].size == 4096
    assert same(merge_fields(f), t)


def test_xxh64_matches_reference_values():
    cases = {b"": 0xEF46DB3751D8E999, b"a": 0xD24EC4F1A98C6E5B, b"abc": 0x44BC2CF5AD770999,
             b"unweight-lossless": 0x79FA89DCA5B1C10D, bytes(range(256)) * 3: 0x8E03C838C596036F}
    for data, want in cases.items():
        buf = np.frombuffer(b"xyz" + data, np.uint8)
        assert int(xxh64(buf, 3, len(data))) == want


def test_order0_bits_of_uniform_bits_is_full_width():
    t = make(torch.bfloat16, (1 << 20,), "bits", 12)  # enough samples for 2^16 cells
    assert 15.9 < order0_bits(t) <= 16.0


def test_bf16_from_4bit_blocks_codes_more_mantissa_bits_and_real_weights_do_not():
    """Weights dequantized from 4-bit blocks (16 levels times a per-block scale) have far from uniform
    low mantissas: the planner tries k = 3 and 4 there, and it pays; Gaussian weights keep k = 2."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 512, 256
    scale = torch.rand(rows, cols // 32, 1, generator=g) * 0.01 + 0.001
    levels = torch.randint(-8, 8, (rows, cols // 32, 32), generator=g).float()
    blocky = (levels * scale).reshape(rows, cols).to(torch.bfloat16)
    gauss = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    lay = layout_of(torch.bfloat16)
    plans = {name: model.plan(as_words(t), lay, tuple(t.shape), 1) for name, t in
             (("blocky", blocky), ("gauss", gauss))}
    assert plans["gauss"].k == 2 and plans["blocky"].k > 2
    saved = model.K_CHOICES["bf16"]
    model.K_CHOICES["bf16"] = (2,)
    try:
        k2 = model.plan(as_words(blocky), lay, tuple(blocky.shape), 1)
    finally:
        model.K_CHOICES["bf16"] = saved
    assert plans["blocky"].est_bytes < k2.est_bytes
    assert same(decode_tensor(encode(blocky), "w"), blocky)


def test_grouped_histogram_counts_every_row_into_its_group_across_flushes():
    """Rows counted in storage order into their group's histogram; the int32 counters are added into
    the int64 ones every ``flush`` values (2^30 in use; 7 here, so that rows are cut into pieces),
    and two row ranges summed give the whole."""
    rng = np.random.default_rng(0)
    rows, row_len, shift = 40, 33, 4
    vals = rng.integers(0, 1 << 16, rows * row_len, dtype=np.uint16)
    gid = rng.integers(0, 3, rows).astype(np.int64)
    sym = (vals.astype(np.int64) & 0x7FFF) >> shift
    want = np.zeros((3, 1 << 11), np.int64)
    np.add.at(want, (np.repeat(gid, row_len), sym), 1)
    for flush in (7, model._FLUSH):
        got = np.zeros_like(want)
        model._grouped_histogram(vals, 0, 16, shift, row_len, gid, 0, 25, got, flush)
        model._grouped_histogram(vals, 0, 16, shift, row_len, gid, 25, rows, got, flush)
        assert (got == want).all(), flush


def test_row_pass_takes_the_strided_sample_and_the_row_means():
    """The k-choosing sample counted inside the row-means pass is every 16th value of the tensor, as
    a strided pass over it takes, for any cut of the rows into ranges; row groups match numpy's unique."""
    rng = np.random.default_rng(1)
    rows, row_len = 50, 21  # rows not a multiple of the step, so the sample's offset moves row to row
    t = (torch.from_numpy(rng.standard_normal((rows, row_len))) * torch.logspace(-3, 0, rows)[:, None]).bfloat16()
    vals = as_words(t)
    strided = np.zeros(1 << 12, np.int64)
    model._sample_histogram(vals, 0, 16, 3, 16, strided)
    means = np.zeros(rows)
    sample = np.zeros(1 << 12, np.int64)
    for r0, r1 in ((0, 17), (17, rows)):
        model._row_pass(vals, 0, 16, 7, row_len, r0, r1, means, 3, 16, sample)
    assert (sample == strided).all()
    exps = ((vals.astype(np.int64) >> 7) & 0xFF).reshape(rows, row_len)
    assert np.allclose(means, exps.mean(1))
    groups, gid, sizes = model._row_groups(means, float(np.median(means)), 4)
    steps = np.clip(np.floor(4 * (means - np.median(means))), -128, 127).astype(np.int64)
    ref_groups, ref_gid, ref_sizes = np.unique(steps, return_inverse=True, return_counts=True)
    assert (groups == ref_groups).all() and (gid == ref_gid).all() and (sizes == ref_sizes).all()


# ---------------------------------------------------------------------------------------------
# the folder layout (unweight.lossless.register): all of a tensor's streams packed into one part


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_a_tensor_is_stored_as_one_pack_part_and_older_folder_layouts_still_decode(dtype):
    t = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    parts = encode_parts("w", t)
    assert set(parts) == {"pack"} and parts["pack"].numpy()[-4:].tobytes() == b"UWP5"
    assert torch.equal(decode(parts, "w").view(torch.uint8), t.view(torch.uint8))
    streams = {k.removeprefix(".ul."): v for k, v in encode_tensor(t).items()}
    apart = {k: v for k, v in streams.items() if k in ("code", "low")}
    small = {k: v for k, v in streams.items() if k not in apart}
    # folder version 2: every stream a part of its own; 3: the small ones packed into `meta`; 4: all in
    # a `pack` with a plain directory
    for layout in (streams, apart | {"meta": version3_meta(small)}, {"pack": version4_pack(streams)}):
        assert torch.equal(decode(layout, "w").view(torch.uint8), t.view(torch.uint8))
    with pytest.raises(UnweightError, match=r"tensor 'w': streams \['code'\] both packed and stored apart"):
        decode(parts | {"code": streams["code"]}, "w")
    with pytest.raises(UnweightError, match="tensor 'w': both a pack and a meta part"):
        decode(parts | {"meta": version3_meta(small)}, "w")
    assert encoded_names(["w.ul.meta", "w.ul.code", "v.ul.head", "u.ul.pack", "x"]) == ["u", "v", "w"]


def version3_meta(small):
    """Folder version 3's ``meta`` part: magic, count byte, directory, then the streams."""
    directory, data = bytearray(b"UWMP") + bytes([len(small)]), b""
    for key, t in small.items():
        directory += bytes([len(key)]) + key.encode() + bytes([t.dtype == torch.int64])
        directory += t.numel().to_bytes(8, "little")
        data += t.numpy().tobytes()
    return torch.frombuffer(bytearray(directory + data), dtype=torch.uint8)


def version4_pack(streams):
    """Folder version 4's ``pack`` part: the streams, the directory (count byte; per stream its name's
    length and ASCII, a dtype byte, its element count in 8 bytes), the directory's length, ``UWMP``."""
    directory, data = bytearray([len(streams)]), b""
    for key, t in streams.items():
        directory += bytes([len(key)]) + key.encode() + bytes([t.dtype == torch.int64])
        directory += t.numel().to_bytes(8, "little")
        data += t.numpy().tobytes()
    return torch.frombuffer(bytearray(data + directory + len(directory).to_bytes(4, "little") + b"UWMP"),
                            dtype=torch.uint8)


def test_a_pack_holds_exactly_the_streams_and_packs_into_the_code_streams_buffer():
    def streams(code):
        return {"code": code, "head": np.array([1, -2, 3 << 40, -(1 << 63), (1 << 63) - 1]),
                "offsets": np.array([0, 5, 5, 1 << 33]), "modes": np.array([0, 1], np.uint8),
                "check": np.array([-7, 1 << 62]), "tables": np.zeros(500, np.uint8),
                "rows": np.arange(7, dtype=np.uint8), "low_offsets": np.zeros(1, np.int64)}
    ref = streams(np.arange(300_000, dtype=np.uint8))
    buffer = np.zeros(400_000, np.uint8)
    buffer[:300_000] = ref["code"]
    short = np.zeros(300_010, np.uint8)
    short[:300_000] = ref["code"]
    for code, into in ((buffer[:300_000], buffer), (ref["code"].copy(), None), (short[:300_000], None)):
        packed = pack_streams(streams(code))
        assert packed is into if into is not None else not np.shares_memory(packed, code)
        # head as varints, offsets as their differences, the zero tables zstd-coded: the pack is smaller
        assert packed.size < sum(a.nbytes for a in ref.values()) - 450
        out = unpack_streams(torch.from_numpy(packed), "w")
        assert list(out) == list(ref) and all(
            (out[k].numpy() == ref[k]).all() and out[k].numpy().dtype == ref[k].dtype for k in ref)
    for key, value in (("tables", np.arange(256, dtype=np.uint8)), ("tables", np.zeros(0, np.uint8)),
                       ("head", np.zeros(0, np.int64))):  # stored raw where zstd does not pay; empty ones
        out = unpack_streams(torch.from_numpy(pack_streams({key: value})), "w")
        assert list(out) == [key] and out[key].numpy().dtype == value.dtype and (out[key].numpy() == value).all()


def _directory_start(b: bytes) -> int:
    return len(b) - 5 - b[-5]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "no UWP5 or UWMP magic"),
    (lambda b: b[-6:], "truncated directory"),
    (lambda b: b[:-5] + b"\0UWP5", "truncated directory"),
    (lambda b: b[:-5] + bytes([b[-5] - 1]) + b"UWP5", "truncated directory|unknown or repeated|after the directory"),
    (lambda b: b[1:], "runs past the end"),
    (lambda b: b"\0" + b, "bytes after the streams"),
    (lambda b: (lambda d: b[:d + 1] + b"\x0f" + b[d + 2:])(_directory_start(b)), "unknown or repeated stream"),
    (lambda b: (lambda d: b[:d + 1] + bytes([b[d + 1] | 0x30]) + b[d + 2:])(_directory_start(b)),
     "an encoding it cannot have"),  # the code (first) as zstd
    (lambda b: (lambda d: b[:d] + b"\x09" + b[d + 1:])(_directory_start(b)), "truncated directory"),
])
def test_a_corrupt_pack_directory_is_refused_naming_the_tensor(damage, message):
    parts = encode_parts("w", torch.randn(32, 64).to(torch.bfloat16))
    raw = damage(parts["pack"].numpy().tobytes())
    parts["pack"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    with pytest.raises(UnweightError, match=rf"tensor 'w': part 'w\.ul\.pack' is corrupt \(.*(?:{message})"):
        decode(parts, "w")


@pytest.mark.parametrize("key, damage, message", [
    ("head", lambda s: s[:-1] + bytes([s[-1] | 0x80]), "'head' does not decode as varints"),
    ("offsets", lambda s: s + b"\x01", "runs past the end|after the streams|'offsets' does not decode"),
    ("tables", lambda s: s[:4] + bytes([s[4] ^ 0xFF]) + s[5:], "'tables' does not decode as zstd"),
])
def test_a_stream_that_does_not_decode_as_stored_is_refused(key, damage, message):
    t = torch.randn(64, 300, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    streams = {k.removeprefix(".ul."): v.numpy() for k, v in encode_tensor(t).items()}
    packed = pack_streams({key: streams[key]})  # the stream alone: its stored bytes lead the pack
    raw = packed.tobytes()
    start = _directory_start(raw)
    raw = damage(raw[:start]) + raw[start:]
    with pytest.raises(UnweightError, match=rf"tensor 'w': part 'w\.ul\.pack' is corrupt \(.*(?:{message})"):
        unpack_streams(torch.frombuffer(bytearray(raw), dtype=torch.uint8), "w")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "no UWP5 or UWMP magic"),
    (lambda b: b[-9:], "truncated directory"),
    (lambda b: b[:-8] + (10 ** 6).to_bytes(4, "little") + b"UWMP", "truncated directory"),
    (lambda b: b[1:], "runs past the end"),
    (lambda b: b"\0" + b, "bytes after the streams"),
    (lambda b: (lambda d: b[:d + 2] + b"x" + b[d + 3:])(len(b) - 8 - int.from_bytes(b[-8:-4], "little")),
     "unknown or repeated stream"),
    (lambda b: b[:-8] + (int.from_bytes(b[-8:-4], "little") - 1).to_bytes(4, "little") + b"UWMP",
     "truncated directory|unknown or repeated|after the directory"),
])
def test_a_corrupt_version4_pack_directory_is_refused_naming_the_tensor(damage, message):
    streams = {k.removeprefix(".ul."): v for k, v in encode_tensor(torch.randn(32, 64).to(torch.bfloat16)).items()}
    raw = damage(version4_pack(streams).numpy().tobytes())
    parts = {"pack": torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)}
    with pytest.raises(UnweightError, match=rf"tensor 'w': part 'w\.ul\.pack' is corrupt \(.*(?:{message})"):
        decode(parts, "w")


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:3], "no UWMP magic"),
    (lambda b: b[:7], "truncated directory"),
    (lambda b: b[:-1], "runs past the end"),
    (lambda b: b + b"\0", "bytes after the streams"),
    (lambda b: b[:6] + b"x" + b[7:], "unknown or repeated stream"),
    (lambda b: b[:5] + b"\xff" + b[6:], "unknown or repeated stream"),
    (lambda b: b[:4] + b"\x09" + b[5:], "truncated directory|unknown or repeated"),
])
def test_a_corrupt_version3_meta_part_is_refused_naming_the_tensor(damage, message):
    t = torch.randn(32, 64).to(torch.bfloat16)
    streams = {k.removeprefix(".ul."): v for k, v in encode_tensor(t).items()}
    raw = damage(version3_meta({k: v for k, v in streams.items() if k != "code"}).numpy().tobytes())
    parts = {"code": streams["code"], "meta": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}
    with pytest.raises(UnweightError, match=rf"tensor 'w': part 'w\.ul\.meta' is corrupt \(.*(?:{message})"):
        decode(parts, "w")


def test_a_flipped_byte_in_a_packed_stream_is_caught_by_the_decoders_checks():
    t = torch.randn(32, 64).to(torch.bfloat16)
    parts = encode_parts("w", t)
    pack = parts["pack"].clone()
    for pos in range(_directory_start(pack.numpy().tobytes())):  # the streams' stored bytes
        bad = pack.clone()
        bad[pos] ^= 0x5A
        try:
            out = decode({"pack": bad}, "w")
        except UnweightError as exc:
            assert "'w'" in str(exc)
        else:  # a byte that the streams do not use (e.g. a check of a raw chunk) may be harmless
            assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))


@functools.cache
def _tensor_and_pack() -> tuple[torch.Tensor, bytes]:
    t = torch.randn(40, 300, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    return t, encode_parts("w", t)["pack"].numpy().tobytes()


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_any_damage_to_a_packs_directory_or_length_raises_or_decodes_exactly(data):
    t, pack = _tensor_and_pack()
    pack = bytearray(pack)
    start = _directory_start(bytes(pack))
    if data.draw(st.booleans()):  # bytes of the directory, its length or the magic changed
        for pos in data.draw(st.lists(st.integers(start, len(pack) - 1), min_size=1, max_size=3)):
            pack[pos] = data.draw(st.integers(0, 255))
    else:
        pack = pack[:data.draw(st.integers(0, len(pack) - 1))]
    try:
        out = decode({"pack": torch.frombuffer(pack, dtype=torch.uint8) if pack else torch.empty(0, dtype=torch.uint8)},
                     "w")
    except UnweightError as exc:
        assert str(exc).startswith("tensor 'w'")
    else:
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
