"""The King James Bible as Debian's ``bible-kjv-text`` ships it: a windowed LZW file, decoded in Python.

``/usr/lib/bible.data`` is Chip Chapin's "Bible Retrieval System" text file (format ``EC02``, see its
``tsl.h`` and ``tsl.c``): a header (magic, version, an 80-byte description, then big-endian window size,
window count and the file offset of every window), the 3-byte Unix ``compress`` header, then each
64 KiB window of text compressed on its own with ``compress``'s LZW (Welch 1984, "A Technique for
High-Performance Data Compression"; the decoder follows ``compresslib.c``, taken from ``compress``).
The text is one verse a line, ``Ge1:1 In the beginning God created the heaven and the earth.``
"""

from __future__ import annotations

import re
import struct

from unweight.errors import UnweightError

MAGIC, VERSION = b"EC", b"02"
HEADER_SIZE = 2 + 2 + 80 + 4 + 4  # magic, version, description, window size, window count
COMPRESS_MAGIC = b"\x1f\x9d"
BIT_MASK, BLOCK_MASK = 0x1F, 0x80  # third byte of the compress header: max code width, block mode
INIT_BITS, CLEAR, FIRST = 9, 256, 257
VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")


def unlzw(data: bytes, maxbits: int, block_mode: bool = True) -> bytes:
    """Decode one stream of ``compress`` codes (LSB first, widening from 9 to ``maxbits`` bits).

    Codes are read in groups of ``n_bits`` bytes; when the width changes or the table is cleared,
    the rest of the current group is skipped (the quirk every ``compress`` reader must copy).
    """
    maxmaxcode = 1 << maxbits
    prefix = [0] * maxmaxcode
    suffix = bytearray(range(256)) + bytearray(maxmaxcode - 256)
    out = bytearray()
    n_bits, free = INIT_BITS, FIRST if block_mode else 256
    maxcode = (1 << n_bits) - 1
    pos = group = offset = size = 0
    cleared = False

    def next_code() -> int:
        nonlocal n_bits, maxcode, pos, group, offset, size, cleared
        if cleared or offset >= size or free > maxcode:
            if free > maxcode:
                n_bits += 1
                maxcode = maxmaxcode if n_bits == maxbits else (1 << n_bits) - 1
            if cleared:
                n_bits, maxcode, cleared = INIT_BITS, (1 << INIT_BITS) - 1, False
            chunk = data[pos:pos + n_bits]
            if not chunk:
                return -1
            pos += len(chunk)
            group, offset, size = int.from_bytes(chunk, "little"), 0, len(chunk) * 8 - (n_bits - 1)
        code = (group >> offset) & ((1 << n_bits) - 1)
        offset += n_bits
        return code

    oldcode = finchar = next_code()
    if oldcode < 0:
        return b""
    if oldcode >= 256:
        raise ValueError(f"first LZW code {oldcode} is not a byte")
    out.append(finchar)
    while (code := next_code()) >= 0:
        if code == CLEAR and block_mode:
            cleared, free = True, FIRST - 1
            if (code := next_code()) < 0:
                break
        incode, stack = code, bytearray()
        if code > free:
            raise ValueError(f"LZW code {code} beyond the table ({free} entries)")
        if code == free:  # the KwKwK case: the code being defined right now
            stack.append(finchar)
            code = oldcode
        while code >= 256:
            stack.append(suffix[code])
            code = prefix[code]
        finchar = suffix[code]
        stack.append(finchar)
        out += stack[::-1]
        if free < maxmaxcode:
            prefix[free], suffix[free] = oldcode, finchar
            free += 1
        oldcode = incode
    return bytes(out)


def read_bible_data(raw: bytes, source: str = "bible.data") -> str:
    """The full text of an ``EC02`` bible data file."""
    if raw[:2] != MAGIC or raw[2:4] != VERSION:
        raise UnweightError(f"{source}: not a bible-kjv text file (magic {raw[:4]!r}, want b'EC02')")
    if len(raw) < HEADER_SIZE:
        raise UnweightError(f"{source}: truncated header ({len(raw)} bytes)")
    wsize, wnum = struct.unpack(">II", raw[HEADER_SIZE - 8:HEADER_SIZE])
    table_end = HEADER_SIZE + 4 * (wnum + 1)
    if table_end + 3 > len(raw):
        raise UnweightError(f"{source}: truncated header ({len(raw)} bytes, {wnum} windows)")
    starts = struct.unpack(f">{wnum + 1}I", raw[HEADER_SIZE:table_end])
    head = raw[table_end:table_end + 3]
    if head[:2] != COMPRESS_MAGIC or starts[-1] != len(raw):
        raise UnweightError(f"{source}: corrupt or truncated (window table ends at {starts[-1]}, "
                            f"file has {len(raw)} bytes)")
    text = bytearray()
    for i in range(wnum):
        try:
            window = unlzw(raw[starts[i]:starts[i + 1]], head[2] & BIT_MASK, bool(head[2] & BLOCK_MASK))
        except (ValueError, IndexError) as exc:
            raise UnweightError(f"{source}: window {i} is corrupt: {exc}") from None
        if len(window) != wsize and i != wnum - 1:
            raise UnweightError(f"{source}: window {i} decoded to {len(window)} bytes, not {wsize}")
        text += window
    return text.decode("latin-1")


def books(text: str) -> list[tuple[str, str]]:
    """``(abbreviation, text)`` for each book in order; its verses one a line, references dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        verse = VERSE.fullmatch(line)
        if verse is None:
            continue  # the title line
        book = verse.group(1)
        if not out or out[-1][0] != book:
            out.append((book, []))
        out[-1][1].append(verse.group(4))
    return [(book, "\n".join(verses)) for book, verses in out]
