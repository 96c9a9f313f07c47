"""Where a format version 4 decode of one tensor goes: the rANS loop, building the words from symbols and
planes, the chunk checksum (XXH3-64, and XXH64 on the same output for comparison), and the whole
``decode_tensor``, in ns per value, best of ``--reps``, one thread, into memory the process already holds.

    .venv/bin/python bench/lossless_parts.py                      # minilm-l6's embedding in bf16
    .venv/bin/python bench/lossless_parts.py --model smollm2-135m --tensor model.embed_tokens.weight

The parts are timed by calling the kernels' own pieces (``rans32.decode_keys``, ``chunks._place``, the
hashes) over every chunk, one piece at a time, and then the chunk decode as ``chunks.range_kernels_v3`` runs it
(``chunks._decode_hi``: with AVX2 the rANS loop puts most words together itself, ``_place`` the rest; it
rebuilds the tensor: checked), and two chunks side by side as ``decode_range`` runs them (``chunks._decode_hi_pair``;
"rANS loop, pairs": ``rans32.decode_keys_pair_plain``, the symbols only); against the whole decode they show what
the rest (tables, headers, output memory) costs. BF16 only (the parts are BF16's).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from numba import njit

from unweight.lossless import chunks, model, rans, rans32
from unweight.lossless import format as fmt
from unweight.lossless.hashing import xxh3_64, xxh64

sys.path.insert(0, str(Path(__file__).parent))
from lossless import load_model  # noqa: E402


@njit
def _parts(code, off, nch, cw, numel, row_len, q, nph, k, dec, offv, syms, out, out_u8, what, zeros, plan, fix):
    counts, at = np.zeros(nph, np.int64), np.zeros(nph, np.int64)
    r = 8 - k
    acc = np.uint64(0)
    if what >= 5:  # two chunks side by side: the rANS loops alone (6), or as the kernel decodes them (5)
        counts2, at2 = np.zeros((2, nph), np.int64), np.zeros((2, nph), np.int64)
        for c in range(0, nch - 1, 2):
            c0, c1 = c * cw, (c + 1) * cw
            n, n1 = min(cw, numel - c0), min(cw, numel - c1)
            if what == 6:
                _, wa, la, _, _ = chunks._segment(code, off[c], off[c + 1] - off[c], n, r)
                _, wb, lb, _, _ = chunks._segment(code, off[c + 1], off[c + 2] - off[c + 1], n1, r)
                rans.phase_counts(c0, n, row_len, q, nph, counts2[0])
                rans.phase_counts(c1, n1, row_len, q, nph, counts2[1])
                ra, rb = rans32.decode_keys_pair_plain((wa, la, counts2[0], syms[:cw], ()),
                                                       (wb, lb, counts2[1], syms[cw:], ()), dec, 1 << k, offv)
                acc += ra + rb
                continue
            ra, rb = chunks._decode_hi_pair(code, off[c], off[c + 1] - off[c], c0, n, off[c + 1],
                                            off[c + 2] - off[c + 1], c1, n1, row_len, q, nph, 8, k, dec, offv,
                                            out[c0:c0 + n], out[c1:c1 + n1], syms, zeros, counts2, at2, False, plan,
                                            fix)
            acc += ra + rb
        return acc
    for c in range(nch):
        c0 = c * cw
        n = min(cw, numel - c0)
        s0, seglen = off[c], off[c + 1] - off[c]
        mp = -(-n // 8) * 8
        pb = mp * r // 8
        wb = seglen - pb - (pb & 1)
        rans.phase_counts(c0, n, row_len, q, nph, counts)
        if what == 4:  # the kernel's own chunk decode: the loop placing the words it may, then the rest
            acc += chunks._decode_hi(code, s0, seglen, c0, n, row_len, q, nph, 8, k, dec, offv, out[c0:c0 + n], syms,
                                     zeros, counts, at, False, plan, fix)
        if what == 0:
            rans32.decode_keys(code[s0:s0 + wb + rans.STREAM_PAD].view(np.uint16), wb // 2, n, counts, dec, 1 << k,
                               offv, syms)
        if what == 1:
            chunks._phase_starts(counts, at)
            for row in range(c0 // row_len, (c0 + n - 1) // row_len + 1):
                qr = np.int64(q[row])
                ph = qr % nph
                s, e = max(c0, row * row_len), min(c0 + n, (row + 1) * row_len)
                chunks._place(syms, at[ph], s - c0, e - c0, k, (qr // nph) % 255, 255, code[s0 + wb:s0 + wb + pb],
                              mp, r, zeros, out[c0:c0 + n], False)
                at[ph] += e - s
        if what == 2:
            acc += xxh3_64(out_u8, c0 * 2, n * 2)
        elif what == 3:
            acc += xxh64(out_u8, c0 * 2, n * 2)
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--tensor", default=None, help="a tensor name (default: the model's largest)")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    weights = load_model(args.model)
    name = args.tensor or max(weights, key=lambda n: weights[n].numel())
    t = weights[name].to(torch.bfloat16).contiguous()
    p = fmt.encode_streams(t, threads=1)
    h = dict(zip(fmt.HEAD_FIELDS, p[fmt.HEAD][:len(fmt.HEAD_FIELDS)].tolist()))
    if h["version"] != fmt.FORMAT_VERSION or not h["nsym"]:
        raise SystemExit(f"{name}: written as version {h['version']} with {h['nsym']} symbols; pick a coded tensor")
    k, nph, numel, cw, row_len = h["k"], h["phases"], t.numel(), h["chunk"], h["row_len"]
    dec = np.empty((nph, rans32.PROB_SCALE), np.uint32)
    status, offv = model.decode_tables_v3(p[fmt.TABLES], h["nsym"], nph, k, 1 << (8 + k), dec)  # as decode_tensor
    assert status == 0, status
    q = (model.parse_rows(h["rows_codec"], p[fmt.ROWS].tobytes(), h["nrows"]) if h["nrows"]
         else np.zeros(numel // row_len, np.int8))
    code, off = p[fmt.CODE], p[fmt.OFFSETS]
    nch = off.size - 1
    syms, zeros = np.empty(cw, np.uint16), np.zeros(cw, np.uint8)
    plan, fix = np.empty(cw // rans32.LANES + 1, np.int32), np.empty(4 * (cw // 16 + 16), np.int32)
    out_u8 = np.empty(numel * 2, np.uint8)
    out = out_u8.view(np.uint16)
    parts = {"w" + s: torch.from_numpy(a) for s, a in p.items()}
    syms, plan, fix = np.empty(2 * cw, np.uint16), np.empty(2 * plan.size, np.int32), np.empty(2 * fix.size, np.int32)
    labels = ("rANS loop", "words", "XXH3-64", "XXH64 (version 3's)", "chunk decode (fused)", "chunk pairs (fused)",
              "rANS loop, pairs", "whole decode_tensor")
    best = [float("inf")] * len(labels)
    for _ in range(args.reps):
        for what in range(7):
            t0 = time.perf_counter()
            _parts(code, off, nch, cw, numel, row_len, q, nph, k, dec, offv, syms, out, out_u8, what, zeros, plan, fix)
            best[what] = min(best[what], time.perf_counter() - t0)
        t0 = time.perf_counter()
        fmt.decode_tensor(parts, "w", threads=1)
        best[7] = min(best[7], time.perf_counter() - t0)
    # the last pass decoded chunk by chunk as the kernel does: it rebuilt the tensor
    assert np.array_equal(out, t.view(torch.int16).numpy().reshape(-1).view(np.uint16)), "the parts did not rebuild it"
    print(f"{args.model} {name} in bf16: {numel:,} values, {nch} chunks, k = {k}, {nph} phase(s); ns per value:")
    for label, b in zip(labels, best):
        print(f"  {label:22s} {b / numel * 1e9:.3f}")


if __name__ == "__main__":
    main()
