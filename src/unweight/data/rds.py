"""A small pure-Python reader of R's serialization format and of R lazy-load databases.

Follows "Serialization Formats" in the R Internals manual (R Core Team, https://cran.r-project.org/
doc/manuals/r-release/R-ints.html#Serialization-Formats) and R's ``src/main/serialize.c``. Reads the
XDR (big-endian, ``X\\n``) and native little-endian binary (``B\\n``) formats, versions 2 and 3, and the
subset of types that data files hold: NULL, symbols, pairlists (with attributes and tags), environments,
character vectors (``NA_character_`` and the encoding flags), logical, integer, double, complex and raw
vectors, lists, back-references (REFSXP), and the ALTREP compact sequences and wrappers that R >= 3.5
writes. Code (closures, byte code) is read as far as data files need and no further.

Two layers: :func:`unserialize` returns :class:`RObject`, faithful to R (type, value, attributes);
:func:`to_python` maps it onto plain Python (character vector -> ``list[str | None]``, data frame ->
``dict`` of columns). :func:`read_rds` and :func:`load_lazy_db` do both.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import lzma
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unweight.errors import UnweightError

# SEXPTYPEs (R's Rinternals.h) and the pseudo-types that exist only in serialized streams.
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP = 7, 8, 9, 10, 13, 14, 15
STRSXP, DOTSXP, VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP = 16, 17, 19, 20, 21, 22, 23
RAWSXP, S4SXP = 24, 25
ALTREP_SXP, ATTRLISTSXP, ATTRLANGSXP, BASEENV_SXP, EMPTYENV_SXP = 238, 239, 240, 241, 242
GENERICREFSXP, CLASSREFSXP, PERSISTSXP, PACKAGESXP, NAMESPACESXP = 245, 246, 247, 248, 249
BASENAMESPACE_SXP, MISSINGARG_SXP, UNBOUNDVALUE_SXP, GLOBALENV_SXP = 250, 251, 252, 253
NILVALUE_SXP, REFSXP = 254, 255

# Bits of the 32-bit flags word that precedes every item.
IS_OBJECT_BIT, HAS_ATTR_BIT, HAS_TAG_BIT = 1 << 8, 1 << 9, 1 << 10
# Encoding bits of a CHARSXP's "levels" (flags >> 12).
BYTES_MASK, LATIN1_MASK, UTF8_MASK, ASCII_MASK = 1 << 1, 1 << 2, 1 << 3, 1 << 6

NA_INTEGER = -(1 << 31)
NA_REAL_LOW_WORD = 1954  # R's NA_real_ is the NaN whose low 32 bits are 1954
SUPPORTED_VERSIONS = (2, 3)
PAIRLIST_TYPES = (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLISTSXP, ATTRLANGSXP)
SPECIAL_ENVS = (GLOBALENV_SXP, BASEENV_SXP, EMPTYENV_SXP, BASENAMESPACE_SXP)


@dataclass
class RObject:
    """One R value as serialized: its SEXPTYPE, a Python value, and its attributes.

    ``value`` is a list for vectors (``None`` marks NA), the name for a symbol, a list of
    ``(tag, value)`` pairs for pairlists and calls, a dict of bindings for an environment.
    """

    type: int
    value: Any
    attributes: dict[str, RObject] = field(default_factory=dict)

    def attr(self, name: str) -> Any:
        """The attribute ``name`` as plain Python (see :func:`to_python`), or None."""
        value = self.attributes.get(name)
        return None if value is None else to_python(value)


class _Stream:
    """The bytes of one serialized object, read front to back; running short raises UnweightError."""

    def __init__(self, data: bytes, source: str):
        self.data, self.pos, self.source = memoryview(data), 0, source
        self.endian = ">"
        self.native_encoding = "utf-8"

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise UnweightError(f"{self.source}: R data truncated or corrupt: wanted {n} bytes at "
                                f"offset {self.pos}, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, code: str, n: int) -> tuple:
        return struct.unpack(f"{self.endian}{n}{code}", self.take(n * struct.calcsize(code)))

    def int(self) -> int:
        return self.unpack("i", 1)[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints, upper and lower 32 bits
            upper, lower = self.unpack("I", 2)
            n = (upper << 32) | lower
        if n < 0 or n > len(self.data):  # every element takes at least one byte
            raise UnweightError(f"{self.source}: R data corrupt: vector length {n} at offset {self.pos}")
        return n


def unserialize(data: bytes, source: str = "<bytes>") -> RObject:
    """Parse one serialized R object (the uncompressed bytes, from the ``X\\n`` header on)."""
    stream = _Stream(data, source)
    fmt = bytes(stream.take(2))
    if fmt == b"B\n":
        stream.endian = "<"
    elif fmt != b"X\n":
        kind = "ASCII" if fmt == b"A\n" else f"unknown ({fmt!r})"
        raise UnweightError(f"{source}: R serialization format {kind} is not supported (XDR or binary only)")
    version, _writer, _min_reader = stream.unpack("i", 3)
    if version not in SUPPORTED_VERSIONS:
        raise UnweightError(f"{source}: R serialization version {version} is not supported "
                            f"(supported: {SUPPORTED_VERSIONS})")
    if version == 3:
        encoding = bytes(stream.take(stream.int())).decode("ascii", "replace")
        stream.native_encoding = _python_codec(encoding)
    try:
        return _Reader(stream).item()
    except RecursionError:
        raise UnweightError(f"{source}: R data nested too deeply to read") from None


def _python_codec(r_encoding: str) -> str:
    """Python's codec for the writer's native encoding (version 3 header); UTF-8 if unknown."""
    try:
        return codecs.lookup(r_encoding).name
    except (LookupError, ValueError):
        return "utf-8"


class _Reader:
    """ReadItem from serialize.c: a recursive descent over flags words, with the reference table."""

    def __init__(self, stream: _Stream):
        self.s = stream
        self.refs: list[RObject] = []

    def _remember(self, obj: RObject) -> RObject:
        self.refs.append(obj)
        return obj

    def item(self) -> RObject:
        flags = self.s.int()
        kind = flags & 0xFF
        if kind in SPECIAL_ENVS:
            return RObject(ENVSXP, {})  # global, base or empty environment: nothing to read
        if kind in (NILVALUE_SXP, NILSXP):
            return RObject(NILSXP, None)
        if kind in (MISSINGARG_SXP, UNBOUNDVALUE_SXP):
            return RObject(SYMSXP, "")
        if kind == REFSXP:
            index = (flags >> 8) or self.s.int()
            if not 1 <= index <= len(self.refs):
                raise UnweightError(f"{self.s.source}: R data corrupt: reference {index} to an unknown "
                                    f"object ({len(self.refs)} known) at offset {self.s.pos}")
            return self.refs[index - 1]
        if kind == SYMSXP:
            return self._remember(RObject(SYMSXP, self._expect(CHARSXP).value))
        if kind in (PERSISTSXP, PACKAGESXP, NAMESPACESXP):
            return self._remember(RObject(kind, self._string_vector()))
        if kind == ENVSXP:
            return self._environment()
        if kind in PAIRLIST_TYPES:
            return self._pairlist(flags)
        if kind == ALTREP_SXP:
            return self._altrep()
        obj = self._vector(kind, flags)
        if flags & HAS_ATTR_BIT:
            obj.attributes = self._attributes(self.item())
        return obj

    def _vector(self, kind: int, flags: int) -> RObject:
        s = self.s
        if kind == CHARSXP:
            return RObject(CHARSXP, self._chars(flags))
        if kind in (SPECIALSXP, BUILTINSXP):
            return RObject(kind, bytes(s.take(s.int())).decode("ascii", "replace"))
        if kind in (EXTPTRSXP, WEAKREFSXP):
            obj = self._remember(RObject(kind, None))
            if kind == EXTPTRSXP:
                obj.value = (self.item(), self.item())  # protected value, tag
            return obj
        if kind == S4SXP:
            return RObject(S4SXP, None)
        if kind in (LGLSXP, INTSXP):
            values = [None if v == NA_INTEGER else v for v in s.unpack("i", s.length())]
            if kind == LGLSXP:
                values = [None if v is None else bool(v) for v in values]
            return RObject(kind, values)
        if kind == REALSXP:
            return RObject(REALSXP, _reals(s, s.length()))
        if kind == CPLXSXP:
            parts = _reals(s, 2 * s.length())
            return RObject(CPLXSXP, [None if re is None or im is None else complex(re, im)
                                     for re, im in zip(parts[::2], parts[1::2])])
        if kind == RAWSXP:
            return RObject(RAWSXP, bytes(s.take(s.length())))
        if kind == STRSXP:
            return RObject(STRSXP, [self._expect(CHARSXP).value for _ in range(s.length())])
        if kind in (VECSXP, EXPRSXP):
            return RObject(kind, [self.item() for _ in range(s.length())])
        name = "byte code" if kind == BCODESXP else f"type {kind}"
        raise UnweightError(f"{s.source}: R {name} at offset {s.pos} is not supported (data files only)")

    def _expect(self, kind: int) -> RObject:
        obj = self.item()
        if obj.type != kind:
            raise UnweightError(f"{self.s.source}: R data corrupt: expected SEXP type {kind}, "
                                f"got {obj.type} at offset {self.s.pos}")
        return obj

    def _chars(self, flags: int) -> str | None:
        n = self.s.int()
        if n == -1:
            return None  # NA_STRING
        raw = bytes(self.s.take(n))
        levels = flags >> 12
        if levels & (LATIN1_MASK | BYTES_MASK):  # BYTES: no encoding; latin-1 keeps every byte
            return raw.decode("latin-1")
        codec = "utf-8" if levels & (UTF8_MASK | ASCII_MASK) else self.s.native_encoding
        return raw.decode(codec, errors="replace")

    def _string_vector(self) -> list[str | None]:
        """InStringVec: a 0, a length, then that many CHARSXP items."""
        if self.s.int() != 0:
            raise UnweightError(f"{self.s.source}: R data corrupt: bad string vector at offset {self.s.pos}")
        return [self._expect(CHARSXP).value for _ in range(self.s.length())]

    def _attributes(self, pairlist: RObject) -> dict[str, RObject]:
        if pairlist.type == NILSXP:
            return {}
        if pairlist.type != LISTSXP:
            raise UnweightError(f"{self.s.source}: R data corrupt: attributes are not a pairlist")
        return {tag or "": value for tag, value in pairlist.value}

    def _pairlist(self, flags: int) -> RObject:
        """A CAR/CDR chain, read in a loop (not by recursion) so long lists cannot overflow the stack."""
        head = RObject(flags & 0xFF, [])
        if head.type in (ATTRLISTSXP, ATTRLANGSXP):  # v3 forms whose attributes were stored first
            head.type = LISTSXP if head.type == ATTRLISTSXP else LANGSXP
            flags |= HAS_ATTR_BIT
        while True:
            if flags & HAS_ATTR_BIT:
                attributes = self._attributes(self.item())
                if not head.value:
                    head.attributes = attributes
            tag = _tag_name(self.item()) if flags & HAS_TAG_BIT else None
            head.value.append((tag, self.item()))
            flags = self.s.int()
            kind = flags & 0xFF
            if kind in (NILVALUE_SXP, NILSXP):
                return head
            if kind not in (LISTSXP, ATTRLISTSXP):  # a dotted pair: read the odd tail and keep it
                self.s.pos -= 4
                head.value.append((None, self.item()))
                return head
            if kind == ATTRLISTSXP:
                flags |= HAS_ATTR_BIT

    def _environment(self) -> RObject:
        env = self._remember(RObject(ENVSXP, {}))
        self.s.int()  # locked
        self.item()  # enclosing environment: not kept
        frame, hashtab = self.item(), self.item()
        env.attributes = self._attributes(self.item())
        if frame.type == LISTSXP:
            env.value.update(frame.value)
        if hashtab.type == VECSXP:
            for bucket in hashtab.value:
                if bucket.type == LISTSXP:
                    env.value.update(bucket.value)
        return env

    def _altrep(self) -> RObject:
        """ALTREP objects: the class comes as (class, package, type); we expand the known ones."""
        info, state, attributes = self.item(), self.item(), self.item()
        class_name = info.value[0][1].value if info.type == LISTSXP and info.value else "?"
        try:
            obj = _expand_altrep(class_name, state, self.s.source)
        except (TypeError, ValueError, IndexError, AttributeError, OverflowError):
            raise UnweightError(f"{self.s.source}: R data corrupt: bad state for ALTREP class "
                                f"{class_name!r}") from None
        obj.attributes = self._attributes(attributes)
        return obj


def _tag_name(tag: RObject) -> str | None:
    """A pairlist tag is a symbol; anything else (only in corrupt data) counts as no tag."""
    return tag.value if tag.type in (SYMSXP, CHARSXP) and isinstance(tag.value, str) else None


def _reals(s: _Stream, n: int) -> list[float | None]:
    """``n`` doubles; R's NA_real_ (one particular NaN) becomes None, other NaNs stay NaN."""
    raw = s.take(8 * n)
    values = list(struct.unpack(f"{s.endian}{n}d", raw))
    if any(math.isnan(v) for v in values):
        bits = struct.unpack(f"{s.endian}{n}Q", raw)
        values = [None if math.isnan(v) and (b & 0xFFFFFFFF) == NA_REAL_LOW_WORD else v
                  for v, b in zip(values, bits)]
    return values


def _expand_altrep(class_name: str, state: RObject, source: str) -> RObject:
    if class_name in ("compact_intseq", "compact_realseq"):
        n, start, step = state.value
        if not 0 <= n < 1 << 31:
            raise ValueError(n)
        values = [start + i * step for i in range(int(n))]
        if class_name == "compact_intseq":
            return RObject(INTSXP, [int(v) for v in values])
        return RObject(REALSXP, values)
    if class_name.startswith("wrap_"):  # state is list(original vector, metadata)
        return RObject(state.value[0].type, state.value[0].value)
    if class_name == "deferred_string":  # state is pairlist(original numbers, scalar-ness)
        numbers = state.value[0][1]
        return RObject(STRSXP, [None if v is None else _r_number_string(v) for v in numbers.value])
    raise UnweightError(f"{source}: R ALTREP class {class_name!r} is not supported")


def _r_number_string(v: int | float) -> str:
    """as.character() of a number, for the common cases (integers and up to 15 significant digits)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.15g}"


def to_python(obj: RObject, _envs: dict[int, dict] | None = None) -> Any:
    """Plain Python for an R value.

    NULL -> None; atomic vector -> list (NA -> None), a factor -> its labels; data frame -> dict of
    columns; list with unique, non-empty names -> dict, else list; symbol -> its name; pairlist ->
    dict of tag -> value (list when untagged); environment -> dict of bindings (the same dict
    wherever the environment recurs). Other objects (code) are returned as :class:`RObject`.
    """
    envs = {} if _envs is None else _envs
    kind, classes = obj.type, _strings(obj.attr("class"))
    if kind == NILSXP:
        return None
    if kind == SYMSXP:
        return obj.value
    if kind == INTSXP and "factor" in classes:
        levels = _strings(obj.attr("levels"))
        if any(code is not None and not 1 <= code <= len(levels) for code in obj.value):
            raise UnweightError(f"R factor has codes outside its {len(levels)} levels")
        return [None if code is None else levels[code - 1] for code in obj.value]
    if kind in (LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP, RAWSXP, CHARSXP):
        return obj.value
    if kind in (VECSXP, EXPRSXP):
        return _maybe_dict(_strings(obj.attr("names")), [to_python(v, envs) for v in obj.value])
    if kind == LISTSXP:
        tags = [tag for tag, _ in obj.value]
        return _maybe_dict(tags, [to_python(v, envs) for _, v in obj.value])
    if kind == ENVSXP:
        if id(obj) not in envs:  # environments may contain themselves
            envs[id(obj)] = bindings = {}
            bindings.update((tag, to_python(v, envs)) for tag, v in obj.value.items())
        return envs[id(obj)]
    return obj


def _strings(value: Any) -> list[str]:
    """An attribute that should be a character vector (class, names, levels), or [] if it is not."""
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else []


def _maybe_dict(names: list, values: list) -> dict | list:
    if names and len(names) == len(values) and all(names) and len(set(names)) == len(names):
        return dict(zip(names, values))
    return values


def decompress(data: bytes, source: str = "<bytes>") -> bytes:
    """The bytes of an .rds file with its gzip, bzip2 or xz wrapper (if any) removed."""
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise UnweightError(f"{source}: compressed R data is corrupt: {exc}") from None
    return data


def read_rds(data: bytes, source: str = "<bytes>") -> Any:
    """The plain-Python value of an .rds file's bytes (``readRDS``), compressed or not."""
    return to_python(unserialize(decompress(data, source), source))


# The value of a lazy-load DB's "compressed" entry -> how each blob after its 4-byte length is packed.
_BLOB_CODECS = {b"0": lambda b: b, b"1": zlib.decompress, b"2": bz2.decompress, b"Z": lzma.decompress}


def _unpack_blob(blob: bytes, compressed: int, source: str) -> bytes:
    """One .rdb entry: a 4-byte big-endian uncompressed length, then (type byte and) the packed bytes."""
    if len(blob) < 4:
        raise UnweightError(f"{source}: lazy-load entry truncated ({len(blob)} bytes)")
    (expected,) = struct.unpack(">I", blob[:4])
    body, codec = blob[4:], zlib.decompress
    if compressed in (2, 3):  # R_decompress2/3: a type byte says which compressor was used
        codec = _BLOB_CODECS.get(body[:1])
        body = body[1:]
        if codec is None:
            raise UnweightError(f"{source}: unknown lazy-load compression type {blob[4:5]!r}")
    try:
        out = codec(body)
    except (zlib.error, OSError, ValueError, lzma.LZMAError) as exc:
        raise UnweightError(f"{source}: lazy-load entry is corrupt: {exc}") from None
    if len(out) != expected:
        raise UnweightError(f"{source}: lazy-load entry decompressed to {len(out)} bytes, "
                            f"expected {expected}")
    return out


def load_lazy_db(rdx_path: str | Path, rdb_path: str | Path) -> dict[str, Any]:
    """Every variable of an R lazy-load database (``name.rdx`` index + ``name.rdb`` blobs), as Python.

    The .rdx is an .rds file holding ``list(variables = list(name = c(offset, length)), references,
    compressed)``; each variable is a blob of the .rdb (see :func:`_unpack_blob`) holding one
    serialized object. Environments shared between variables (``references``) are not resolved.
    """
    rdx_path, rdb_path = Path(rdx_path), Path(rdb_path)
    try:
        index = read_rds(rdx_path.read_bytes(), str(rdx_path))
        rdb = rdb_path.read_bytes()
    except OSError as exc:
        raise UnweightError(f"cannot read R lazy-load database: {exc}") from None
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise UnweightError(f"{rdx_path}: not an R lazy-load index (no 'variables' list)")
    compressed = index.get("compressed") or [True]
    compressed = int(compressed[0]) if isinstance(compressed, list) else 1
    out = {}
    for name, position in index["variables"].items():
        offset, length = (int(v) for v in position)
        if offset < 0 or length < 0 or offset + length > len(rdb):
            raise UnweightError(f"{rdb_path}: entry {name!r} at {offset}+{length} lies past the end "
                                f"({len(rdb)} bytes)")
        source = f"{rdb_path}[{name}]"
        raw = _unpack_blob(rdb[offset:offset + length], compressed, source)
        out[name] = to_python(unserialize(raw, source))
    return out
