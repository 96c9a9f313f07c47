"""Format versions 3 and 4's parts (4 is 3 with XXH3-64 chunk checksums): the 32-lane rANS coder (vector loops
against the scalar reference), the bit planes, the exponent rotation that keeps exponent 0 apart, the one-byte
codes, and the fallback of tensors whose symbols do not fit them to version 2.
"""

import numpy as np
import pytest
import torch
import xxhash  # the reference XXH3 (a test extra)
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from unweight.errors import UnweightError
from unweight.lossless import chunks, decode_tensor, fields, hashing, lanes16, model, planes, rans, rans32, simd
from unweight.lossless import format as fmt


@njit
def _encode_both(keys, ent):
    n = keys.size
    out_v, out_s = np.zeros(n + rans32.STATE_WORDS + 16, np.uint16), np.zeros(n + rans32.STATE_WORDS + 16, np.uint16)
    pv = rans32.encode_keys(keys, n, ent, out_v)
    ps = rans32.encode_keys_scalar(keys, n, ent, out_s)
    return out_v[pv:], out_s[ps:]


@njit
def _decode(words, limit, n, counts, dec, kz, off, vector):
    out = np.zeros(n, np.uint16)
    if vector:
        rc = rans32.decode_keys(words, limit, n, counts, dec, kz, off, out)
    else:
        rc = rans32.decode_keys_scalar(words, limit, n, counts, dec, kz, off, out)
    return rc, out


def _tables(rng, nph, k, nzero, nrest, skew):
    """A random alphabet of ``nzero`` exponent-0 symbols and ``nrest`` others within one-byte codes,
    random (possibly one-symbol) frequencies per phase, and both coding tables."""
    space = 1 << (8 + k)
    zero = rng.choice(1 << k, nzero, replace=False)
    base = int(rng.integers(1 << k, space - 256))
    rest = base + rng.choice(256 - (1 << k), nrest, replace=False)
    alphabet = np.sort(np.r_[zero, rest]).astype(np.int64)
    freq = np.zeros((nph, alphabet.size), np.uint32)
    for ph in range(nph):
        counts = rng.integers(1, 1000, alphabet.size) ** skew
        counts[rng.random(alphabet.size) < 0.3] = 0
        if not counts.any():
            counts[rng.integers(0, alphabet.size)] = 1  # one symbol of frequency 4096
        rans.normalize_freqs(counts, freq[ph])
    codes, off = model.codes(alphabet, k)
    ent, dec = np.zeros(nph * space, np.uint32), np.zeros((nph, rans32.PROB_SCALE), np.uint32)
    assert rans32.build_tables(alphabet, freq, space, codes, ent, dec) == -1
    return space, alphabet, freq, ent, dec, off


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nph=st.integers(1, 4), k=st.sampled_from([2, 3, 4]), n=st.integers(0, 3000),
       nzero=st.integers(0, 4), nrest=st.integers(0, 80), skew=st.integers(1, 4))
def test_coder_round_trips_and_the_vector_loops_match_the_scalar_ones(seed, nph, k, n, nzero, nrest, skew):
    """Any valid tables (down to frequency 1, and one symbol of frequency 4096, where the states reach
    their extremes), any run lengths per phase: the vector encoder writes the scalar one's words, and
    both decoders give back every symbol."""
    if nzero + nrest == 0:
        nrest = 1
    rng = np.random.default_rng(seed)
    space, alphabet, freq, ent, dec, off = _tables(rng, nph, k, nzero, nrest, skew)
    counts = np.diff(np.sort(np.r_[0, rng.integers(0, n + 1, nph - 1), n])).astype(np.int64)
    phase = np.repeat(np.arange(nph), counts)
    sym = np.array([rng.choice(alphabet[freq[p] > 0]) for p in phase], np.int64).reshape(-1)
    keys = (phase * space + sym).astype(np.uint16)
    seg_v, seg_s = _encode_both(keys, ent)
    if simd.AVAILABLE:
        assert np.array_equal(seg_v, seg_s)
    words = np.concatenate([seg_s, np.zeros(rans32.LANES, np.uint16)])
    for vector in (True, False):
        rc, out = _decode(words, seg_s.size, n, counts, dec, 1 << k, off, vector)
        assert rc == rans.OK and np.array_equal(out, sym)


@pytest.mark.parametrize("vector", [True, False])
def test_decoder_reports_a_short_or_overlong_segment(vector):
    rng = np.random.default_rng(3)
    space, alphabet, freq, ent, dec, off = _tables(rng, 2, 2, 2, 60, 2)
    n = 2000
    counts = np.array([1200, 800])
    phase = np.repeat([0, 1], counts)
    keys = (phase * space + np.array([rng.choice(alphabet[freq[p] > 0]) for p in phase])).astype(np.uint16)
    seg = _encode_both(keys, ent)[1]
    words = np.concatenate([seg, np.zeros(rans32.LANES, np.uint16)])
    assert _decode(words, seg.size, n, counts, dec, 4, off, vector)[0] == rans.OK
    assert _decode(words, seg.size - 5, n, counts, dec, 4, off, vector)[0] == rans.ERR_OVERRUN
    assert _decode(words, seg.size + 1, n, counts, dec, 4, off, vector)[0] == rans.ERR_STATE
    assert _decode(words, rans32.STATE_WORDS - 1, n, counts, dec, 4, off, vector)[0] == rans.ERR_OVERRUN


@njit
def _decode_pair(wa, la, ca, wb, lb, cb, dec, kz, off):
    oa, ob = np.zeros(ca.sum(), np.uint16), np.zeros(cb.sum(), np.uint16)
    ra, rb = rans32.decode_keys_pair_plain((wa, la, ca, oa, ()), (wb, lb, cb, ob, ()), dec, kz, off)
    return ra, rb, oa, ob


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nph=st.integers(1, 4), na=st.integers(0, 2500), nb=st.integers(0, 2500),
       harm=st.tuples(*[st.sampled_from(["none", "short", "long", "flip", "states"])] * 2))
def test_two_segments_side_by_side_decode_as_each_alone(seed, nph, na, nb, harm):
    """Two segments (any lengths, any runs per phase) decoded side by side give each one's symbols and status
    as decoding it alone does, whole or harmed (cut short, one word too long, a word flipped, too short even
    for its states): the one never stops or misleads the other."""
    rng = np.random.default_rng(seed)
    k = 2
    space, alphabet, freq, ent, dec, off = _tables(rng, nph, k, 2, 60, 2)
    segs = []
    for n, how in zip((na, nb), harm):
        counts = np.diff(np.sort(np.r_[0, rng.integers(0, n + 1, nph - 1), n])).astype(np.int64)
        phase = np.repeat(np.arange(nph), counts)
        sym = np.array([rng.choice(alphabet[freq[p] > 0]) for p in phase], np.int64).reshape(-1)
        seg = _encode_both((phase * space + sym).astype(np.uint16), ent)[1]
        words, limit = np.concatenate([seg, np.zeros(rans32.LANES, np.uint16)]), seg.size
        if how == "short":
            limit -= int(rng.integers(1, 6))
        elif how == "long":
            limit += 1
        elif how == "flip":
            words[int(rng.integers(0, seg.size))] ^= np.uint16(rng.integers(1, 1 << 16))
        elif how == "states":
            limit = int(rng.integers(0, rans32.STATE_WORDS))
        segs.append((words, limit, counts))
    ra, rb, oa, ob = _decode_pair(*segs[0], *segs[1], dec, 1 << k, off)
    for (words, limit, counts), rc, out in zip(segs, (ra, rb), (oa, ob)):
        want_rc, want = _decode(words, limit, counts.sum(), counts, dec, 1 << k, off, True)
        assert rc == want_rc and np.array_equal(out, want)


def test_chunks_decoded_two_by_two_name_the_one_at_fault(monkeypatch):
    """A tensor's chunks go through the decoder two by two; a byte flipped in one chunk's rANS words names that
    chunk, so its partner decoded whole."""
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 4096)
    t = torch.from_numpy(np.random.default_rng(5).standard_normal((64, 256)) * 0.02).to(torch.bfloat16)
    parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t).items()}
    off = parts["w" + fmt.OFFSETS].numpy()
    assert parts["w" + fmt.MODES].tolist() == [chunks.MODE_CODED] * 4
    for c in range(4):
        bad = dict(parts)
        bad["w" + fmt.CODE] = parts["w" + fmt.CODE].clone()
        bad["w" + fmt.CODE].numpy()[off[c] + 300] ^= 0x5A  # past the flushed states, in the words
        with pytest.raises(UnweightError, match=f"chunk {c} of 4"):
            decode_tensor(bad, "w", threads=1)


def test_chunk_width_cuts_a_tensor_into_pairs_of_chunks_of_about_equal_size():
    for numel in (1, fmt.PAIR_MIN - 1, fmt.PAIR_MIN, 147456, 589824, 1 << 20, (1 << 20) + 1, 1310720, 11720448,
                  45088768, 151_000_001):
        w = fmt.chunk_width(numel)
        nchunks = -(-numel // w)
        assert 0 < w <= fmt.CHUNK_WEIGHTS and w % 2 == 0
        if numel < fmt.PAIR_MIN:
            assert w == fmt.CHUNK_WEIGHTS
        else:
            assert nchunks % 2 == 0 and nchunks * fmt.CHUNK_WEIGHTS < numel + 2 * fmt.CHUNK_WEIGHTS
            assert numel - (nchunks - 1) * w > w - 2 * nchunks  # the last chunk is about as long as the others


def test_build_tables_refuses_frequencies_that_do_not_sum_to_the_scale():
    freq = np.array([[100, 200]], np.uint32)
    assert rans32.build_tables(np.array([5, 9]), freq, 1024, np.array([5, 9]), np.zeros(1024, np.uint32),
                               np.zeros((1, 4096), np.uint32)) == 0


@njit
def _pack_merge(raw, m, r, n):
    packed = np.zeros(m * r // 8, np.uint8)
    planes.pack(raw, m, r, packed)
    out = np.zeros(n, np.uint16)
    planes.merge(packed, m, r, n, out, 15)
    return packed, out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r=st.integers(1, 8), n=st.integers(1, 700))
def test_bit_planes_hold_exactly_r_bits_and_unpack_to_each_value(seed, r, n):
    rng = np.random.default_rng(seed)
    m = -(-n // 8) * 8
    raw = np.zeros(m, np.uint8)
    raw[:n] = rng.integers(0, 1 << r, n)
    packed, out = _pack_merge(raw, m, r, n)
    assert packed.size == planes.plane_bytes(m, r) == m * r // 8
    v = raw[:n].astype(np.uint16)
    want = (v & ((1 << (r - 1)) - 1)) | ((v >> (r - 1)) & 1) << 15  # the top bit (the sign) to bit 15
    assert np.array_equal(out, want)


@njit
def _place(dst, src, nib, p4, p5, p6, p7, nsh, sj, r, k, rot, emax):
    lanes16.place(dst, src, nib, p4, p5, p6, p7, nsh, sj, r, k, rot, emax, r > 6)


@njit
def _keys(dst, src, r, k, rot, tag, emax):
    lanes16.keys(dst, src, r, k, rot, tag, emax)


@njit
def _pack_words(src, r, out):
    lanes16.pack_words(src, r, out)


# (exponent bits, k): BF16's three, FP16's one
LAYOUTS = [(8, 2), (8, 3), (8, 4), (5, 3)]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(LAYOUTS), n=st.integers(0, 100),
       s=st.integers(-128, 127), ph=st.integers(0, 3))
def test_keys_are_the_lowered_symbols_of_the_words_tagged_with_the_phase(seed, layout, n, s, ph):
    ebits, k = layout
    r, emax = 16 - ebits - k, (1 << ebits) - 1
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 1 << 16, n).astype(np.uint16)
    words[rng.random(n) < 0.2] &= 0x8000 | ((1 << (15 - ebits)) - 1)  # exponent 0
    space = 1 << (ebits + k)
    dst = np.zeros(n, np.uint16)
    _keys(dst, words, r, k, s % emax, ph * space, emax)
    sym = (words.astype(np.int64) & 0x7FFF) >> (r - 1)
    assert dst.tolist() == [ph * space + _lower(int(x), s, k, True, ebits) for x in sym]


@njit
def _fp8_bytes(dst, src, signs, sj, k, rot, emax):
    lanes16.fp8_bytes(dst, src, signs, sj, k, rot, emax)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.sampled_from([3, 2]), n=st.integers(0, 200), s=st.integers(-128, 127),
       ph=st.integers(0, 3), sj=st.integers(0, 7))
def test_fp8_keys_are_lowered_symbols_and_fp8_bytes_raise_them_back_with_their_signs(seed, k, n, s, ph, sj):
    """FP8 (E4M3: k = 3, E5M2: k = 2): the vector loops (whole vectors) and their tails, against model.lower
    and the bytes themselves."""
    ebits = 7 - k
    emax, space = (1 << ebits) - 1, 1 << 7
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, n).astype(np.uint8)
    b[rng.random(n) < 0.2] &= 0x80 | ((1 << k) - 1)  # exponent 0
    keys = np.zeros(n, np.uint16)
    _keys(keys, b, 1, k, s % emax, ph * space, emax)
    assert keys.tolist() == [ph * space + _lower(int(x) & 0x7F, s, k, True, ebits) for x in b]
    signs = (rng.integers(0, 256, n) & ~(1 << sj) | (b.astype(np.int64) >> 7) << sj).astype(np.uint8)
    out = np.zeros(n, np.uint8)
    _fp8_bytes(out, (keys - ph * space).astype(np.uint16), signs, sj, k, s % emax, emax)
    assert np.array_equal(out, b)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), r=st.integers(4, 8), n=st.integers(1, 900))
def test_words_pack_into_the_planes_of_their_raw_bits(seed, r, n):
    """The vector packing (whole groups) and its tail against :func:`planes.pack` of the raw bits."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 1 << 16, n).astype(np.uint16)
    m = -(-n // 8) * 8
    raw = np.zeros(m, np.uint8)
    w = words.astype(np.int64)
    raw[:n] = (w & ((1 << (r - 1)) - 1)) | (w >> 15) << (r - 1)
    want, got = np.zeros(m * r // 8, np.uint8), np.full(m * r // 8, 0xAA, np.uint8)
    _pack_ref(raw, m, r, want)
    _pack_words(words, r, got)
    assert np.array_equal(got, want)


@njit
def _pack_ref(raw, m, r, out):
    planes.pack(raw, m, r, out)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layout=st.sampled_from(LAYOUTS), n=st.integers(0, 100),
       rot=st.integers(0, 254), nsh=st.sampled_from([0, 4]), sj=st.integers(0, 7))
def test_place_builds_each_word_from_its_symbol_and_raw_bits(seed, layout, n, rot, nsh, sj):
    """The vector loop (16 words at a time) and its scalar tail against numpy, word by word, for BF16
    (up to 6 raw bits, two bit planes) and FP16 (8 raw bits, four)."""
    ebits, k = layout
    r, emax = 16 - ebits - k, (1 << ebits) - 1
    rot %= emax
    rng = np.random.default_rng(seed)
    sym = rng.integers(0, 1 << (ebits + k), n).astype(np.uint16)
    sym[rng.random(n) < 0.2] &= (1 << k) - 1  # exponent 0
    nib, p4, p5, p6, p7 = (rng.integers(0, 256, n).astype(np.uint8) for _ in range(5))
    dst = np.zeros(n, np.uint16)
    _place(dst, sym, nib, p4, p5, p6, p7, nsh, sj, r, k, rot, emax)
    ex = sym.astype(np.int64) >> k
    t = ex + rot
    t = np.where(t > emax, t - emax, t)
    full = np.where(ex == 0, sym, (t << k) | (sym & ((1 << k) - 1)))
    raw = (nib.astype(np.int64) >> nsh) & 15
    for j, p in enumerate((p4, p5, p6, p7)[:2 if r <= 6 else 4]):
        raw |= ((p.astype(np.int64) >> sj) & 1) << (4 + j)
    want = (full << (r - 1)) | (raw & ((1 << (r - 1)) - 1)) | ((raw >> (r - 1)) & 1) << 15
    assert np.array_equal(dst, want.astype(np.uint16))


@njit
def _lower(sym, s, k, zero_apart, ebits=8):
    return model.lower(sym, s, k, ebits, zero_apart)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("s", [-128, -3, 0, 1, 31, 254])
def test_lowering_keeps_exponent_0_apart_and_is_a_bijection(k, s):
    syms = np.arange(1 << (8 + k))
    v3 = np.array([_lower(x, s, k, True) for x in syms])
    v2 = np.array([_lower(x, s, k, False) for x in syms])
    assert sorted(v3) == sorted(v2) == list(syms)  # both permute the symbols
    zero = syms >> k == 0
    assert np.array_equal(v3[zero], syms[zero])  # exponent 0 stays
    assert (v3[~zero] >> k != 0).all()  # and no other exponent lands on it
    assert np.array_equal(v2, (syms - (s << k)) % (1 << (8 + k)))  # version 2's shift, unchanged


def test_codes_set_exponent_0_apart_and_refuse_a_span_over_a_byte():
    alphabet = np.array([0, 3, 500, 501, 747])
    codes, off = model.codes(alphabet, 2)
    assert codes.tolist() == [0, 3, 4, 5, 251] and off == 496
    assert model.codes(np.array([0, 500, 752]), 2) is None


def test_a_tensor_whose_symbols_do_not_fit_one_byte_codes_is_written_as_version_2():
    """Two clusters of exponents 100 binades apart: version 2 codes them, version 3's codes cannot
    (its symbols span over 256 values), so the writer keeps the older version for this tensor."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    x[:, ::2] *= 2.0 ** -60
    x[:, 1::2] *= 2.0 ** 40
    t = torch.from_numpy(x).to(torch.bfloat16)
    parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t).items()}
    assert int(parts["w" + fmt.HEAD][fmt._F["version"]]) == 2
    assert int(parts["w" + fmt.HEAD][fmt._F["nsym"]]) > 0  # coded, not stored
    assert torch.equal(decode_tensor(parts, "w").view(torch.int16), t.view(torch.int16))


def test_version_4_is_written_for_every_dtype():
    assert all(fmt.written_version(d) == 4 for d in (torch.bfloat16, torch.float16, torch.float32,
                                                     torch.float8_e4m3fn, torch.float8_e5m2))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_in_version_4_keeps_version_2s_code_and_reads_back(dtype):
    """FP8 in version 4 codes the same symbols with the same tables as version 2 (the byte less its sign, its
    exponent lowered by the row's binades): the rANS words and the sign plane take what version 2's 64-bit
    lanes did, within the states and padding of a chunk; and older version 2 files still read."""
    t = (torch.randn(96, 700, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    t.view(torch.uint8)[5, :9] = torch.tensor([0, 0x80, 1, 0x81, 0x7F, 0xFF, 0x7E, 0x08, 0x88], dtype=torch.uint8)
    p4, p2 = ({"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t, version=v).items()} for v in (4, 2))
    assert int(p4["w" + fmt.HEAD][fmt._F["version"]]) == 4 and int(p2["w" + fmt.HEAD][fmt._F["version"]]) == 2
    assert int(p4["w" + fmt.HEAD][fmt._F["nsym"]]) > 0 and (p4["w" + fmt.MODES].numpy() == 0).all()  # coded
    for parts in (p4, p2):
        assert torch.equal(decode_tensor(parts, "w").view(torch.uint8), t.view(torch.uint8))
    nchunks = p4["w" + fmt.MODES].numel()
    assert abs(p4["w" + fmt.CODE].numel() - p2["w" + fmt.CODE].numel()) <= nchunks * (2 * rans32.STATE_WORDS + 8)


def test_a_segments_pad_byte_is_checked(monkeypatch):
    """With r = 5 raw bits and 99 groups of eight values the planes take 495 bytes, so a zero byte
    follows them; a flipped pad byte changes no value but is still refused, as every other byte is."""
    monkeypatch.setitem(model.K_CHOICES_V3, "bf16", (3,))
    t = (torch.randn(3, 264, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t).items()}
    head = parts["w" + fmt.HEAD]
    assert int(head[fmt._F["version"]]) == 4 and int(head[fmt._F["raw_bits"]]) == 5
    assert int(parts["w" + fmt.MODES][0]) == 0  # coded
    end = int(parts["w" + fmt.OFFSETS][1])
    assert int(parts["w" + fmt.CODE][end - 1]) == 0
    bad = dict(parts)
    bad["w" + fmt.CODE] = parts["w" + fmt.CODE].clone()
    bad["w" + fmt.CODE][end - 1] = 1
    with pytest.raises(UnweightError, match="'w'.*chunk 0.*pad byte"):
        decode_tensor(bad, "w")
    assert torch.equal(decode_tensor(parts, "w").view(torch.int16), t.view(torch.int16))


# ---------------------------------------------------------------------------------------------
# FP32: hi halves coded as BF16 words, low halves packed as version 2 packs them


def _fp32_with_low_blocks(rng, rows, cols):
    """FP32 values whose low halves vary by block of ``LOW_BLOCK``: some all zero (BF16 values), some
    with trailing zero bits, the rest full."""
    x = (rng.standard_normal((rows, cols)) * np.exp(rng.normal(-3, 0.7, (rows, 1)))).astype(np.float32)
    bits = x.reshape(-1).view(np.uint32)
    for b0 in range(0, bits.size, fields.LOW_BLOCK):
        tz = int(rng.choice([0, 0, 3, 9, 16]))
        bits[b0:b0 + fields.LOW_BLOCK] &= np.uint32((0xFFFFFFFF << tz) & 0xFFFFFFFF)
    return torch.from_numpy(x)


def test_fp32_version_3_codes_the_hi_halves_and_packs_the_low_halves_as_version_2(monkeypatch):
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 3 * fields.LOW_BLOCK + 100)  # blocks straddle chunks
    t = _fp32_with_low_blocks(np.random.default_rng(1), 96, 700)
    v3, v2 = fmt.encode_streams(t), fmt.encode_streams(t, version=2)
    assert int(v3[fmt.HEAD][fmt._F["version"]]) == 4 and (v3[fmt.MODES] == 0).all()
    assert np.array_equal(v3[fmt.LOW], v2[fmt.LOW]) and np.array_equal(v3[fmt.LOW_OFFSETS], v2[fmt.LOW_OFFSETS])
    assert v3[fmt.CODE].size < v2[fmt.CODE].size * 1.01  # the hi halves code as well as before
    for parts in (v3, v2):
        out = decode_tensor({"w" + k: torch.from_numpy(v) for k, v in parts.items()}, "w", threads=2)
        assert torch.equal(out.view(torch.int32), t.view(torch.int32))


def test_fp32_version_3_stores_a_chunk_that_does_not_code_raw(monkeypatch):
    """A last chunk of 30 values would take more coded (its 32 rANS states alone are 128 bytes) than
    its 60 bytes of hi halves: it is stored raw, the chunk before it coded."""
    monkeypatch.setattr(fmt, "CHUNK_WEIGHTS", 1000)
    t = _fp32_with_low_blocks(np.random.default_rng(2), 1, 1030)
    parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t).items()}
    assert int(parts["w" + fmt.HEAD][fmt._F["version"]]) == 4 and parts["w" + fmt.MODES].tolist() == [0, 1]
    assert torch.equal(decode_tensor(parts, "w").view(torch.int32), t.view(torch.int32))


@njit
def _plan(c0, n, row_len, q, nph, e, emax):
    counts, at = np.zeros(nph, np.int64), np.zeros(nph, np.int64)
    rans.phase_counts(c0, n, row_len, q, nph, counts)
    plan = np.full(n // rans32.LANES + 1, 7, np.int32)
    fix = np.full(4 * (n // 16 + 16), -7, np.int32)
    nfix = chunks._plan_groups(plan, fix, c0, n, row_len, q, nph, counts, at, e, emax)
    return counts, plan[:n // rans32.LANES], fix[:4 * nfix].reshape(-1, 4)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), row_len=st.integers(32, 700), c0=st.integers(0, 3000),
       n=st.integers(256, 5000), nph=st.integers(1, 4), emax=st.sampled_from([31, 255]))
def test_the_plan_of_a_chunk_places_every_value_once_in_coding_order(seed, row_len, c0, n, nph, emax):
    """The groups the rANS loop puts together (a whole group of 32 in one row, its raw bits in one byte of
    each bit plane) and the runs left to the pass after it cover each value of the chunk once, where the
    decoder's coding order (rows in order, each phase's run after the last) puts it, with its row's
    rotation: the plan decides nothing the words depend on."""
    rng = np.random.default_rng(seed)
    rows = (c0 + n - 1) // row_len + 1
    q = rng.integers(-128, 128, rows).astype(np.int8)
    e = planes.padded(n) // 8
    counts, plan, fix = _plan(c0, n, row_len, q, nph, e, emax)
    where, rot = np.full(n, -1), np.zeros(n, np.int64)  # value of coding position i, its rotation
    at = np.r_[0, np.cumsum(counts)[:-1]]
    for r in range(c0 // row_len, rows):
        s, t = max(c0, r * row_len) - c0, min(c0 + n, (r + 1) * row_len) - c0
        ph = int(q[r]) % nph
        where[at[ph]:at[ph] + t - s], rot[at[ph]:at[ph] + t - s] = np.arange(s, t), (int(q[r]) // nph) % emax
        at[ph] += t - s
    placed = np.zeros(n, np.int64)
    for g in np.flatnonzero(plan != -1):
        a, ro = int(plan[g]) & 0xFFFFFF, (int(plan[g]) & 0xFFFFFFFF) >> 24
        span = slice(g * rans32.LANES, (g + 1) * rans32.LANES)
        assert np.array_equal(where[span], a + np.arange(rans32.LANES)) and (rot[span] == ro).all()
        assert a // e == (a + rans32.LANES - 1) // e  # one byte of each bit plane
        placed[a:a + rans32.LANES] += 1
    for m, a, cnt, ro in fix.tolist():
        assert cnt > 0 and np.array_equal(where[m:m + cnt], a + np.arange(cnt)) and (rot[m:m + cnt] == ro).all()
        placed[a:a + cnt] += 1
    assert (placed == 1).all()
    if row_len % rans32.LANES == 0 and c0 % row_len == 0 and nph == 1:
        assert (plan != -1).sum() >= n // rans32.LANES - 7  # all but the groups across a plane's bytes


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), row_len=st.sampled_from([32, 40, 64, 100, 384, 1000]),
       rows=st.integers(1, 40), chunk=st.sampled_from([700, 2048, 5000, 1 << 20]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
def test_words_the_rans_loop_places_rebuild_the_tensor(seed, row_len, rows, chunk, dtype):
    """BF16 and FP16 (whose words the rANS loop puts together where the chunk's plan lets it) and FP32 (its hi
    halves the same way) round-trip through chunks that cut rows, rows of every scale (row contexts, several
    phases), rows that are no multiple of 32."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, row_len)) * 2.0 ** rng.integers(-12, 4, (rows, 1))
    t = torch.from_numpy(x).to(dtype)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fmt, "CHUNK_WEIGHTS", chunk)
        parts = {"w" + k: torch.from_numpy(v) for k, v in fmt.encode_streams(t).items()}
    assert int(parts["w" + fmt.HEAD][fmt._F["version"]]) == 4
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(decode_tensor(parts, "w", threads=2).view(bits), t.view(bits))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 3 * 4096 + 5))
def test_join_low_joins_what_unpack_low_unpacks(seed, n):
    rng = np.random.default_rng(seed)
    words = _fp32_with_low_blocks(rng, 1, n).numpy().reshape(-1).view(np.uint32)
    seg = np.zeros(2 * n + n // fields.LOW_BLOCK + 1, np.uint8)
    seg = seg[:fields.pack_low(words, 0, n, seg, 0)]
    low = np.zeros(n, np.uint16)
    assert fields.unpack_low(seg, n, low)
    hw = (words >> 16).astype(np.uint16)
    out = np.zeros(n, np.uint32)
    assert fields.join_low(seg, n, hw, out, np.zeros(fields.LOW_BLOCK, np.uint16))
    assert np.array_equal(out, words) and np.array_equal(low, (words & 0xFFFF).astype(np.uint16))
    if seg.size:  # a segment one byte short or long is refused
        assert not fields.join_low(seg[:-1], n, hw, out, np.zeros(fields.LOW_BLOCK, np.uint16))
        assert not fields.join_low(np.r_[seg, np.uint8(0)], n, hw, out, np.zeros(fields.LOW_BLOCK, np.uint16))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), offset=st.integers(0, 7))
def test_xxh3_matches_the_reference_library(data, offset):
    """Every length class of XXH3-64 (0, 1-3, 4-8, 9-16, 17-128, 129-240, longer; a partial last
    block and stripe), at any alignment, against the ``xxhash`` package."""
    buf = np.frombuffer(bytes(offset) + data, np.uint8)
    assert int(hashing.xxh3_64(buf, offset, len(data))) == xxhash.xxh3_64_intdigest(data)


def test_xxh3_known_values_and_long_inputs():
    """Known digests of the reference (no library needed), and inputs over many 1,024-byte blocks."""
    assert int(hashing.xxh3_64(np.zeros(0, np.uint8), 0, 0)) == 0x2D06800538D394C2
    ramp = (np.arange(16) % 251).astype(np.uint8)
    assert int(hashing.xxh3_64(ramp, 0, 9)) == 0xE9612598145BB9DC
    rng = np.random.default_rng(0)
    for n in (1024 * 5, 1024 * 5 + 1, 1 << 20, (1 << 20) + 63):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert int(hashing.xxh3_64(data, 0, n)) == xxhash.xxh3_64_intdigest(data.tobytes())
