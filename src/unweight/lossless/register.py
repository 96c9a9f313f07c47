"""Registers ``unweight-lossless`` with unweight's format registry (and so with transformers).

Every floating-point tensor of the checkpoint is encoded (norms and embeddings too); integer tensors are
stored as they are. All of a tensor's streams are packed into one U8 part, ``NAME.ul.pack``, compactly
(folder version 5: the header as varints, offsets as varint differences, code tables zstd-coded, a
directory of a byte and a varint or two per stream). Each stored part costs an entry of ~100 bytes in the
safetensors JSON header: bf16 minilm-l6's file came to 0.6596 of the original's with every stream a part of
its own (version 2), 0.6587 with the small streams packed into ``NAME.ul.meta`` beside ``NAME.ul.code``
(version 3), 0.6585 with one part per tensor (version 4; its tensor bytes: 0.6581), and 0.65776 with version
5's compact pack and chunks of 2^20 values. Folder version 6 keeps version 5's layout, its BF16 tensors in
tensor format version 3 (``unweight.lossless.rans32``); version 7 its BF16, FP16 and FP32 tensors in version 4
(version 3 with XXH3-64 chunk checksums). Versions 2-6 are still read. See ``docs/format.md``.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from unweight.errors import UnweightError
from unweight.formats import Format, Parts, register
from unweight.lossless import model, varint
from unweight.lossless.format import decode_tensor, decode_tensors, encode_streams, is_supported

TAG = "ul"
PREFIX = f".{TAG}."
FOLDER_VERSION = 8  # 2: every stream a part; 3: the small ones in `meta`; 4: all in `pack`; 5: `pack`, compact;
# 6: as 5, its BF16 tensors in tensor format version 3 (32-bit rANS lanes; unweight.lossless.rans32); 7: as 6,
# its BF16, FP16 and FP32 tensors in version 4 (version 3 with XXH3-64 chunk checksums); 8: as 7, its FP8
# tensors in version 4 too (an unweight that reads 7 would refuse them tensor by tensor, so it refuses the folder)
STREAMS = ("head", "offsets", "modes", "check", "tables", "rows", "low_offsets", "code", "low")
WIDE = frozenset({"head", "offsets", "check", "low_offsets"})  # I64 streams; the others are U8
PACKED = ("pack", "meta")  # the part holding a tensor's packed streams: versions 4 and 5's, version 3's
PACK_MAGIC = b"UWMP"  # folder versions 3 and 4
PACK5_MAGIC = b"UWP5"
# how version 5 stores a stream: its bytes; zigzag varints; varints of the differences; one zstd frame
RAW, VARINT, DELTA, ZSTD = range(4)
_CODEC_NAMES = ("raw", "varints", "varint differences", "zstd")
TABLES_ZSTD_LEVEL = 19  # ~0.1 ms per tensor; on smollm2-135m 736 bytes fewer than level 6
_DTYPES = {0: np.dtype(np.uint8), 1: np.dtype("<i8")}  # the dtype byte, and the bytes it says are held
_MAX_DIRECTORY = 5 + 255 * (2 + 255 + 8)  # a version 3 meta part's longest head: magic, count, 255 entries


def _stored(key: str, a: np.ndarray) -> tuple[int, np.ndarray]:
    """(codec, bytes) of one stream as version 5 stores it: the header as varints, offsets as varint
    differences (each a chunk's size), code tables zstd-coded where that is shorter, the rest as they are."""
    if key == "head":
        return VARINT, np.frombuffer(varint.encode(a), np.uint8)
    if key in ("offsets", "low_offsets"):
        return DELTA, np.frombuffer(varint.encode(np.diff(a, prepend=0)), np.uint8)
    if key == "tables" and a.size:
        z = zstandard.ZstdCompressor(level=TABLES_ZSTD_LEVEL).compress(a.tobytes())
        if len(z) < a.size:
            return ZSTD, np.frombuffer(z, np.uint8)
    return RAW, np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8)


def pack_streams(streams: dict[str, np.ndarray]) -> np.ndarray:
    """One U8 array holding ``streams`` (1-D arrays keyed by names in :data:`STREAMS`, I64 for those
    in :data:`WIDE`, else U8), folder version 5's ``pack``: each stream's stored bytes back to back
    (:func:`_stored`), then the directory (a count byte, then per stream a byte ``index | codec << 4``
    with ``index`` its place in :data:`STREAMS`, its element count as a varint and, unless stored raw,
    its stored length as a varint), the directory's length (one byte) and the magic ``UWP5``.

    When the first stream is a U8 view of the start of a longer buffer that it does not share
    (``encode_streams(..., shrink=False)``'s code), the others are written into that buffer after it,
    which is then cut to length and returned (the view is not to be used after): the code, a tensor's
    largest stream, is not copied (a copy of gemma3-270m's embedding code was 0.14 GB more peak memory
    for the whole compress)."""
    directory = bytearray([len(streams)])
    stored = []
    for key, a in streams.items():
        codec, data = _stored(key, a)
        directory += bytes([STREAMS.index(key) | codec << 4]) + varint.encode([a.size])
        if codec != RAW:
            directory += varint.encode([data.size])
        stored.append(data)
    tail = np.frombuffer(bytes(directory) + bytes([len(directory)]) + PACK5_MAGIC, np.uint8)
    total = sum(a.size for a in stored) + tail.size
    first = next(iter(streams.values()), None)
    base = first.base if first is not None else None
    if (isinstance(base, np.ndarray) and base.flags.owndata and base.dtype == np.uint8 and base.ndim == 1
            and first.dtype == np.uint8 and base.ctypes.data == first.ctypes.data and base.size >= total):
        out, pos = base, stored.pop(0).size
    else:
        out, pos = np.empty(total, np.uint8), 0
    for a in stored:
        out[pos:pos + a.size] = a
        pos += a.size
    out[pos:total] = tail
    if out.size > total:
        out.resize(total, refcheck=False)  # shrinking keeps the data in place
    return out


def unpack_streams(packed: torch.Tensor, name: str, part: str = "pack") -> Parts:
    """The streams packed in ``part`` (``pack``: :func:`pack_streams`'s layout, or folder version 4's,
    told apart by the magic; ``meta``: folder version 3's, the directory first, after the magic and a
    count byte), U8 ones as views of ``packed`` where stored raw. A corrupt or truncated directory or
    stream encoding raises an error naming the tensor and the part (the streams' own contents are
    checked by the decoder, as when stored apart)."""
    arr = packed.contiguous().numpy()

    def corrupt(what: str) -> UnweightError:
        return UnweightError(f"tensor {name!r}: part '{name}{PREFIX}{part}' is corrupt ({what})")

    if part == "meta":
        raw = arr[:_MAX_DIRECTORY].tobytes()
        if raw[:4] != PACK_MAGIC or len(raw) < 5:
            raise corrupt("no UWMP magic")
        entries, start = _directory(raw, 5, raw[4], corrupt)
        end = arr.size
    elif arr.size >= 6 and arr[-4:].tobytes() == PACK5_MAGIC:
        return _unpack5(arr, corrupt)
    else:
        if arr.size < 9 or arr[-4:].tobytes() != PACK_MAGIC:
            raise corrupt("no UWP5 or UWMP magic")
        length = int.from_bytes(arr[-8:-4].tobytes(), "little")
        if not 1 <= length <= arr.size - 8:
            raise corrupt("truncated directory")
        raw = arr[arr.size - 8 - length:-8].tobytes()
        entries, used = _directory(raw, 1, raw[0], corrupt)
        if used != len(raw):
            raise corrupt(f"{len(raw) - used} bytes after the directory")
        start, end = 0, arr.size - 8 - length
    out = {}
    for key, held, count in entries:
        size = count * held.itemsize
        if size > end - start:
            raise corrupt(f"stream {key!r} runs past the end")
        view = arr[start:start + size]
        out[key] = torch.from_numpy(view if held.itemsize == 1 else view.view(held).astype(held.newbyteorder("=")))
        start += size
    if start != end:
        raise corrupt(f"{end - start} bytes after the streams")
    return out


def _unpack5(arr: np.ndarray, corrupt) -> Parts:
    """Folder version 5's pack (:func:`pack_streams`), its magic already checked."""
    length = int(arr[-5])
    if not 1 <= length <= arr.size - 5:
        raise corrupt("truncated directory")
    raw = arr[arr.size - 5 - length:-5].tobytes()
    count, pos, end = raw[0], 1, arr.size - 5 - length
    entries = []
    for _ in range(count):
        if pos >= len(raw):
            raise corrupt("truncated directory")
        index, codec = raw[pos] & 15, raw[pos] >> 4
        key = STREAMS[index] if index < len(STREAMS) else None
        if key is None or any(key == k for k, _, _, _ in entries) or codec not in (
                (RAW, VARINT, DELTA) if key in WIDE else (RAW, ZSTD)):
            raise corrupt(f"unknown or repeated stream {key!r}, or an encoding it cannot have")
        try:
            n, pos = varint.read(raw, pos + 1)
            stored, pos = (n * (8 if key in WIDE else 1), pos) if codec == RAW else varint.read(raw, pos)
        except ValueError:
            raise corrupt("truncated directory") from None
        if n < 0 or stored < 0:
            raise corrupt(f"stream {key!r} has a negative length")
        entries.append((key, codec, n, stored))
    if pos != len(raw):
        raise corrupt(f"{len(raw) - pos} bytes after the directory")
    start = 0
    for key, _, _, stored in entries:  # the layout is checked before any stream is decoded
        if stored > end - start:
            raise corrupt(f"stream {key!r} runs past the end")
        start += stored
    if start != end:
        raise corrupt(f"{end - start} bytes after the streams")
    out, start = {}, 0
    for key, codec, n, stored in entries:
        try:
            out[key] = torch.from_numpy(_restored(key, codec, n, arr[start:start + stored]))
        except (ValueError, zstandard.ZstdError) as exc:
            raise corrupt(f"stream {key!r} does not decode as {_CODEC_NAMES[codec]}: {exc}") from None
        start += stored
    return out


def _restored(key: str, codec: int, n: int, data: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_stored`: stream ``key``'s ``n`` elements from its stored bytes."""
    if codec == VARINT:
        return varint.decode(data, n)
    if codec == DELTA:
        return np.cumsum(varint.decode(data, n))
    if codec == ZSTD:  # the frame must say its size: a corrupt one is not to allocate what it claims
        frame = data.tobytes()
        if zstandard.frame_content_size(frame) != n:
            raise ValueError(f"the frame does not say it holds the {n} bytes expected")
        out = model.decompressor().decompress(frame)
        if len(out) != n:
            raise ValueError(f"{len(out)} bytes where {n} were expected")
        return np.frombuffer(bytearray(out), np.uint8)
    return data.view("<i8").astype(np.int64) if key in WIDE else data


def _directory(raw: bytes, pos: int, count: int, corrupt) -> tuple[list, int]:
    """``count`` directory entries ``(name, dtype, element count)`` of a version 3 or 4 pack, read from
    ``raw[pos:]``, and where they end."""
    entries = []
    for _ in range(count):
        if pos >= len(raw) or pos + 1 + raw[pos] + 9 > len(raw):
            raise corrupt("truncated directory")
        key = raw[pos + 1:pos + 1 + raw[pos]].decode("ascii", "replace")
        pos += 1 + raw[pos]
        if key not in STREAMS or any(key == k for k, _, _ in entries) or raw[pos] not in _DTYPES:
            raise corrupt(f"unknown or repeated stream {key[:16]!r}")
        entries.append((key, _DTYPES[raw[pos]], int.from_bytes(raw[pos + 1:pos + 9], "little")))
        pos += 9
    return entries, pos


def encode_parts(name: str, t: torch.Tensor) -> Parts | None:
    """The stored parts of one tensor (fields without the ``.ul.`` prefix), or None to store it as it is."""
    if not is_supported(t.dtype):
        return None
    return folder_parts({k.removeprefix(PREFIX): v for k, v in encode_streams(t, shrink=False).items()})


def folder_parts(streams: dict[str, np.ndarray]) -> Parts:
    """A tensor's streams (``encode_streams``', without the prefix) as a folder stores them: all in
    one ``pack`` part, the coded ones first (see :func:`pack_streams`)."""
    ordered = sorted(streams, key=lambda k: k not in ("code", "low"))
    return {"pack": torch.from_numpy(pack_streams({k: streams[k] for k in ordered}))}


def decode(parts: Parts, name: str) -> torch.Tensor:
    return decode_tensor(stream_parts(parts, name), name)


def decode_on(tensors: dict[str, Parts], device: torch.device) -> dict[str, torch.Tensor] | None:
    """``tensors`` ({name: parts}) decoded on ``device`` all at once: on the CPU by :func:`decode_tensors` (on all
    threads, a tensor of few chunks beside the others), on a GPU by the Triton decoder (``unweight.lossless.gpu``),
    whose outputs, views of one buffer (which ``save_pretrained`` would take for tied weights), are then copied
    into memory of their own; None where that needs Triton and it is missing (the caller then decodes on the
    CPU and moves the tensors)."""
    streams = {}
    for name, parts in tensors.items():
        streams.update(stream_parts(parts, name))
    if not _on_gpu(device):
        return decode_tensors(streams, list(tensors))
    try:
        from unweight.lossless import gpu
    except ImportError:
        return None
    out = gpu.decode_tensors(streams, list(tensors), device)
    return {n: t.clone() for n, t in out.items()} if len(out) > 1 else out


def _on_gpu(device: torch.device) -> bool:
    """Whether :func:`decode_on` decodes on ``device`` with the GPU decoder (the tests let the CPU stand in)."""
    return device.type != "cpu"


def stream_parts(parts: Parts, name: str) -> dict[str, torch.Tensor]:
    """A stored tensor's streams under the tensor format's names (``name.ul.code``, ...), its pack unpacked."""
    packed = [k for k in PACKED if k in parts]
    if len(packed) > 1:
        raise UnweightError(f"tensor {name!r}: both a pack and a meta part: corrupt folder")
    if packed:
        inside = unpack_streams(parts[packed[0]], name, packed[0])
        apart = {k: v for k, v in parts.items() if k != packed[0]}
        if set(inside) & set(apart):
            raise UnweightError(f"tensor {name!r}: streams {sorted(set(inside) & set(apart))} both packed and "
                                "stored apart: corrupt folder")
        parts = apart | inside
    return {name + PREFIX + k: v for k, v in parts.items()}


FORMAT = register(Format(quant_method="unweight-lossless", tag=TAG, version=FOLDER_VERSION, decode=decode,
                         description="bit-exact entropy coding of float tensors (exponent rANS-coded)",
                         decode_on=decode_on))
