"""The fp16 predictive lossless KV codec and its self-describing blob format.

One tensor ``[seq, kv_heads, head_dim]`` of little-endian fp16 becomes one blob::

    offset size  field
    0      4     magic b"H2KV"
    4      1     format version (1)
    5      1     dtype (1 = fp16)
    6      1     plane count (2: hi byte plane, then lo byte plane)
    7      1     reserved, 0
    8      16    seq, kv_heads, head_dim, block_seq (u32 little-endian each)
    24     4     CRC-32 of the tensor: its shape (3 x u32) then its little-endian bytes
    28     5x2   per plane: flags (bit 0 zstd frame, else stored; bit 1 channel-centered), payload
                 length (u32)
    38     2xB   per plane, per block of ``block_seq`` tokens: the predictor id (see ``PREDICTORS``)
    38+2B  4     CRC-32 of the header bytes before it, then of the payloads
    ...          payloads, hi then lo

Each plane is cut along seq into blocks; each block gets its own predictor, chosen by a fast
entropy estimate on sampled rows (``choose="estimate"``) or by compressing every candidate
(``choose="exhaustive"``). Before that the hi plane may be channel-centered (see
:meth:`FP16Codec._center_hi`; its per-channel reference row then leads the plane's data). The
transformed plane goes into one zstd frame, or is stored as is when zstd does not shrink it.
:func:`decode` needs nothing but the blob, returns the exact input bits, and raises
:class:`CodecError` for anything malformed, truncated or tampered with.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from .estimate import centering_pays, predictor_plan, sample_rows
from .predictors import FORWARD, INVERSE, K_DEFAULT, PREDICTOR_IDS, PREDICTORS, Transform, parse_predictors

CODEC_NAME = "h2o-fp16-predictive"
FORMAT_VERSION = 1
MAGIC = b"H2KV"
DTYPE_FP16 = 1
ZSTD, _CENTERED = 1, 2  # flag bits of a plane's stage byte
DEFAULT_MAX_OUTPUT_BYTES = 1 << 31
# A zstd block of at most 128 KiB never codes to fewer than 4 bytes, so no valid frame expands more.
_ZSTD_MAX_EXPANSION = 1 << 15
_FIXED = struct.Struct("<4sBBBBIIIII")
_PLANE = struct.Struct("<BI")
_CRC = struct.Struct("<I")
_PLANES = ("hi", "lo")
# Estimator sampling per plane kind: rows per block, and how much better than raw a predictor must
# look to be chosen (the estimates are noisy). Hi planes carry the structure; lo planes are mantissa
# noise unless a predictor wins outright.
_SAMPLING = ((4, 0.02), (1, 0.10))
_CENTER_MARGIN = 0.02

Choose = Literal["estimate", "exhaustive"]


class CodecError(ValueError):
    """A blob is malformed, truncated, tampered with, or would decode to something else."""


@dataclass(frozen=True)
class PlaneInfo:
    """How one byte plane is stored: entropy stage, centering, payload size, per-block predictors."""

    entropy: Literal["stored", "zstd"]
    centered: bool
    payload_bytes: int
    predictors: tuple[str, ...]


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's header says, read without decoding the payloads."""

    version: int
    shape: tuple[int, int, int]
    block_seq: int
    crc32: int
    header_bytes: int
    hi: PlaneInfo
    lo: PlaneInfo

    @property
    def raw_bytes(self) -> int:
        """Size of the tensor the blob decodes to."""
        seq, heads, dim = self.shape
        return 2 * seq * heads * dim

    @property
    def blob_bytes(self) -> int:
        """Total blob size, header included."""
        return self.header_bytes + self.hi.payload_bytes + self.lo.payload_bytes


class FP16Codec:
    """Encoder for one kind of tensor (K or V) with its hi- and lo-plane predictor sets.

    ``FP16Codec()`` uses the K defaults (all five predictors on both planes); V uses
    ``FP16Codec(hi_predictors=V_DEFAULT, lo_predictors=V_DEFAULT)``. ``center`` lets the hi plane be
    channel-centered where that pays. An instance keeps one zstd compressor (``zstd``, also usable
    on its own) and is not thread-safe; use one per thread.
    """

    def __init__(self, hi_predictors: str | tuple[str, ...] = K_DEFAULT,
                 lo_predictors: str | tuple[str, ...] = K_DEFAULT, *, block_seq: int = 64,
                 level: int = 3, choose: Choose = "estimate", center: bool = True) -> None:
        if block_seq < 1:
            raise ValueError(f"block_seq must be >= 1, got {block_seq}")
        if choose not in ("estimate", "exhaustive"):
            raise ValueError(f"choose must be 'estimate' or 'exhaustive', got {choose!r}")
        self.predictors = (parse_predictors(hi_predictors, "hi_predictors"),
                           parse_predictors(lo_predictors, "lo_predictors"))
        self.block_seq = block_seq
        self.level = level
        self.choose = choose
        self.center = center
        self.zstd = zstandard.ZstdCompressor(level=level)
        self._ids = [np.array([PREDICTOR_IDS[p] for p in names], dtype=np.uint8) for names in self.predictors]
        self._raw_allowed = ["raw" in names for names in self.predictors]

    def encode(self, tensor: np.ndarray) -> bytes:
        """Encode an fp16 ``[seq, kv_heads, head_dim]`` tensor into a self-describing blob."""
        return self.encode_many([tensor])[0]

    def encode_many(self, tensors: list[np.ndarray]) -> list[bytes]:
        """Encode several tensors, one blob each; same-shaped ones share the vectorised work."""
        words = [_as_fp16_words(t) for t in tensors]
        blobs: list[bytes] = [b""] * len(words)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(words):
            by_shape.setdefault(w.shape, []).append(i)
        for indices in by_shape.values():
            batch = np.stack([words[i] for i in indices]) if len(indices) > 1 else words[indices[0]][None]
            for i, blob in zip(indices, self._encode_batch(batch)):
                blobs[i] = blob
        return blobs

    def _encode_batch(self, words: np.ndarray) -> list[bytes]:
        """Blobs for ``words`` shaped ``[n, seq, heads, dim]`` (uint16)."""
        n, seq, heads, dim = words.shape
        planes = np.empty((2 * n, seq, heads, dim), dtype=np.uint8)
        np.right_shift(words, 8, out=planes[0::2], casting="unsafe")
        planes[1::2] = words
        references = self._center_hi(planes) if self.center else [None] * n
        ids = self._choose(planes)
        coded = _apply(planes, ids, self.block_seq, FORWARD)
        blobs = []
        for t in range(n):
            header = [_FIXED.pack(MAGIC, FORMAT_VERSION, DTYPE_FP16, len(_PLANES), 0, seq, heads, dim,
                                  self.block_seq, _tensor_crc(words[t]))]
            payloads = []
            for p in (2 * t, 2 * t + 1):
                prefix = references[t].ravel() if p == 2 * t and references[t] is not None else None
                stage, payload = self._frame(coded[p], prefix)
                if ids[p].any() and self._raw_allowed[p % 2]:  # estimates chose them: keep them if zstd agrees
                    raw_stage, raw_payload = self._frame(planes[p], prefix)
                    if len(raw_payload) <= len(payload):
                        stage, payload, ids[p] = raw_stage, raw_payload, 0
                header.append(_PLANE.pack((_CENTERED if prefix is not None else 0) | stage, len(payload)))
                payloads.append(payload)
            head = b"".join(header) + ids[2 * t:2 * t + 2].tobytes()
            crc = zlib.crc32(payloads[1], zlib.crc32(payloads[0], zlib.crc32(head)))
            blobs.append(b"".join([head, _CRC.pack(crc), *payloads]))
        return blobs

    def _frame(self, plane: np.ndarray, prefix: np.ndarray | None) -> tuple[int, bytes]:
        """``(ZSTD, frame)`` for ``prefix + plane``, or ``(0, raw bytes)`` where zstd does not shrink it."""
        data = plane.ravel() if prefix is None else np.concatenate([prefix, plane.ravel()])
        frame = self.zstd.compress(data)
        return (ZSTD, frame) if len(frame) < data.nbytes else (0, data.tobytes())

    def _center_hi(self, planes: np.ndarray) -> list[np.ndarray | None]:
        """Channel-center each hi plane in place where the estimate says it pays.

        The hi byte (sign, exponent, top mantissa bits) is rotated left by one bit so that +x and -x
        sit next to each other, then each channel's rounded mean over the tensor is subtracted:
        order-0 coding then sees one distribution instead of a mixture of per-channel ones.
        Returns each tensor's reference row (``[heads, dim]``), or None where it was not centered.
        """
        hi = planes[0::2]
        n, seq = hi.shape[:2]
        if seq < 2 or hi[0, 0].size == 0:
            return [None] * n
        rows = sample_rows(seq, self.block_seq, _SAMPLING[0][0])[0]
        pays = centering_pays(hi, _rotl(hi[:, rows]), rows, _CENTER_MARGIN)
        references: list[np.ndarray | None] = [None] * n
        for t in np.flatnonzero(pays):
            rotated = _rotl(hi[t])
            sums = np.add.reduce(rotated, axis=0, dtype=np.uint16 if seq <= 257 else np.uint32)
            references[t] = ((sums + seq // 2) // seq).astype(np.uint8)
            np.subtract(rotated, references[t], out=planes[2 * t])
        return references

    def _choose(self, planes: np.ndarray) -> np.ndarray:
        """Predictor id per plane and block: ``uint8 [planes, blocks]`` (planes alternate hi, lo)."""
        blocks = -(-planes.shape[1] // self.block_seq)
        ids = np.zeros((planes.shape[0], blocks), dtype=np.uint8)
        for kind, names in enumerate(self.predictors):
            kind_planes = planes[kind::2]
            if len(names) == 1 or kind_planes.size == 0:
                choice = np.zeros((len(kind_planes), blocks), dtype=np.intp)
            elif self.choose == "exhaustive":
                choice = np.array([[np.argmin([len(self.zstd.compress(FORWARD[c](plane[b:b + self.block_seq])))
                                               for c in names]) for b in range(0, plane.shape[0], self.block_seq)]
                                   for plane in kind_planes], dtype=np.intp).reshape(len(kind_planes), blocks)
            else:
                rows, margin = _SAMPLING[kind]
                choice = predictor_plan(kind_planes, names, self.block_seq, rows, margin)
            ids[kind::2] = self._ids[kind][choice]
        return ids


def _rotl(x: np.ndarray) -> np.ndarray:
    return (x << 1) | (x >> 7)


def _rotr(x: np.ndarray) -> np.ndarray:
    return (x >> 1) | (x << 7)


def _apply(planes: np.ndarray, ids: np.ndarray, block_seq: int, table: dict[str, Transform]) -> np.ndarray:
    """Apply ``table[predictor]`` to each block of ``planes`` (``[planes, seq, heads, dim]``)."""
    present = np.unique(ids)
    if len(present) == 1 and present[0] == 0:
        return planes
    out = np.empty_like(planes)
    seq = planes.shape[1]
    full = seq // block_seq
    spans = [(0, full * block_seq, ids[:, :full], full)] if full else []
    if seq % block_seq:
        spans.append((full * block_seq, seq, ids[:, full:], 1))
    for start, stop, span_ids, n in spans:
        src = planes[:, start:stop].reshape(planes.shape[0], n, (stop - start) // n, *planes.shape[2:])
        dst = out[:, start:stop].reshape(src.shape)
        for pid in np.unique(span_ids):
            sel = span_ids == pid
            transform = table[PREDICTORS[pid]]
            if sel.all():
                dst[...] = transform(src)
            else:
                dst[sel] = transform(src[sel])
    return out


def decode(blob: bytes | bytearray | memoryview, *,
           max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> np.ndarray:
    """Decode a blob back to the exact fp16 tensor; raise :class:`CodecError` on any defect.

    ``max_output_bytes`` bounds what a (possibly forged) header may ask to allocate.
    """
    return decode_many([blob], max_output_bytes=max_output_bytes)[0]


def decode_many(blobs: list[bytes | bytearray | memoryview], *,
                max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[np.ndarray]:
    """Decode several blobs; same-shaped ones share the vectorised work.

    Raises :class:`CodecError` naming the first defective blob; ``max_output_bytes`` bounds each.
    """
    parsed = []
    by_layout: dict[tuple, list[int]] = {}
    for i, blob in enumerate(blobs):
        view = memoryview(blob).cast("B")
        info, ids = _parse(view, f"blob {i}: " if len(blobs) > 1 else "")
        if info.raw_bytes > max_output_bytes:
            raise CodecError(f"blob {i}: declares a {info.raw_bytes}-byte tensor {list(info.shape)}, "
                             f"over max_output_bytes={max_output_bytes}")
        parsed.append((view, info, ids))
        by_layout.setdefault((info.shape, info.block_seq), []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(blobs)
    for (shape, block_seq), indices in by_layout.items():
        for i, tensor in zip(indices, _decode_batch([parsed[i] for i in indices], shape, block_seq)):
            if _tensor_crc(tensor) != parsed[i][1].crc32:
                raise CodecError(f"blob {i}: decoded tensor fails the blob's CRC-32: the payload was altered")
            out[i] = tensor.view("<f2")
    return out


def _decode_batch(items: list[tuple[memoryview, BlobInfo, np.ndarray]], shape: tuple[int, int, int],
                  block_seq: int) -> np.ndarray:
    """Decode blobs of one shape into ``uint16 [n, seq, heads, dim]`` (CRC not yet checked)."""
    n = len(items)
    planes = np.empty((2 * n, *shape), dtype=np.uint8)
    channels = shape[1] * shape[2]
    centered = []
    for t, (view, info, _) in enumerate(items):
        offset = info.header_bytes
        for p, plane_info in enumerate((info.hi, info.lo)):
            extra = channels if plane_info.centered else 0
            data = _decode_plane(view[offset:offset + plane_info.payload_bytes], plane_info.entropy,
                                 extra + planes[2 * t + p].size)
            offset += plane_info.payload_bytes
            planes[2 * t + p].reshape(-1)[:] = data[extra:]
            if extra:
                centered.append((t, data[:extra].reshape(shape[1:])))
    ids = np.concatenate([item[2] for item in items]) if n > 1 else items[0][2]
    planes = _apply(planes, ids, block_seq, INVERSE)
    for t, reference in centered:
        planes[2 * t] = _rotr(planes[2 * t] + reference)
    words = planes[0::2].astype("<u2")
    words <<= 8
    words |= planes[1::2]
    return words


def inspect(blob: bytes | bytearray | memoryview) -> BlobInfo:
    """Parse and validate a blob's header (CRC included) without decoding its payloads."""
    return _parse(memoryview(blob).cast("B"))[0]


def _parse(view: memoryview, where: str = "") -> tuple[BlobInfo, np.ndarray]:
    """Validate a blob's header, CRC and payload sizes (before anything is allocated for it);
    return the header with the predictor ids ``uint8 [2, blocks]``."""
    if len(view) < _FIXED.size:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least {_FIXED.size}")
    magic, version, dtype, n_planes, reserved, seq, heads, dim, block_seq, crc = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"{where}not an {CODEC_NAME} blob: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"{where}unsupported blob format version {version}; this build reads {FORMAT_VERSION}")
    if dtype != DTYPE_FP16 or n_planes != len(_PLANES) or reserved != 0:
        raise CodecError(f"{where}bad header: dtype={dtype} planes={n_planes} reserved={reserved}, "
                         f"expected dtype={DTYPE_FP16} planes={len(_PLANES)} reserved=0")
    if block_seq < 1:
        raise CodecError(f"{where}bad header: block_seq is 0")
    blocks = -(-seq // block_seq)
    ids_at = _FIXED.size + len(_PLANES) * _PLANE.size
    header_bytes = ids_at + len(_PLANES) * blocks + _CRC.size
    if header_bytes > len(view):
        raise CodecError(f"{where}blob truncated: header declares {header_bytes} bytes, blob has {len(view)}")
    stages = [_PLANE.unpack_from(view, _FIXED.size + i * _PLANE.size) for i in range(len(_PLANES))]
    if header_bytes + sum(length for _, length in stages) != len(view):
        raise CodecError(f"{where}blob is {len(view)} bytes, header and payloads declare "
                         f"{header_bytes + sum(length for _, length in stages)}")
    crc_at = header_bytes - _CRC.size
    if zlib.crc32(view[header_bytes:], zlib.crc32(view[:crc_at])) != _CRC.unpack_from(view, crc_at)[0]:
        raise CodecError(f"{where}blob CRC-32 mismatch: the blob was altered")
    raw_ids = bytes(view[ids_at:crc_at])
    if raw_ids and max(raw_ids) >= len(PREDICTORS):
        raise CodecError(f"{where}bad header: unknown predictor id {max(raw_ids)}")
    planes = []
    offset = header_bytes
    for i, (name, (flags, length)) in enumerate(zip(_PLANES, stages)):
        if flags & ~(ZSTD | _CENTERED) or (flags & _CENTERED and (name != "hi" or seq < 2)):
            raise CodecError(f"{where}bad header: {name} plane flags {flags:#x}")
        size = (seq + (1 if flags & _CENTERED else 0)) * heads * dim
        _check_payload(view[offset:offset + length], bool(flags & ZSTD), size, f"{where}{name} plane: ")
        offset += length
        planes.append(PlaneInfo("zstd" if flags & ZSTD else "stored", bool(flags & _CENTERED), length,
                                tuple(PREDICTORS[pid] for pid in raw_ids[i * blocks:(i + 1) * blocks])))
    info = BlobInfo(version, (seq, heads, dim), block_seq, crc, header_bytes, planes[0], planes[1])
    return info, np.frombuffer(raw_ids, dtype=np.uint8).reshape(len(_PLANES), blocks)


def _check_payload(payload: memoryview, zstd: bool, size: int, where: str) -> None:
    """Whether a payload can hold a ``size``-byte plane, without decoding it."""
    if not zstd:
        if len(payload) != size:
            raise CodecError(f"{where}stored payload is {len(payload)} bytes, expected {size}")
        return
    if size > len(payload) * _ZSTD_MAX_EXPANSION:
        raise CodecError(f"{where}a {len(payload)}-byte zstd payload cannot hold {size} bytes")
    try:
        declared = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{where}corrupt zstd frame header: {exc}") from None
    if declared != size:
        raise CodecError(f"{where}zstd frame declares {declared} bytes, expected {size}")


def _decode_plane(payload: memoryview, entropy: str, size: int) -> np.ndarray:
    """The plane bytes of a payload already checked by :func:`_check_payload`."""
    if entropy == "stored":
        return np.frombuffer(payload, dtype=np.uint8)
    try:
        dctx = _DCTX.decompressobj()
        data = dctx.decompress(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd payload: {exc}") from None
    if len(data) != size or not dctx.eof or dctx.unused_data:
        raise CodecError(f"zstd payload decoded to {len(data)} bytes (expected {size}) or left trailing bytes")
    return np.frombuffer(data, dtype=np.uint8)


def _tensor_crc(words: np.ndarray) -> int:
    """CRC-32 of a tensor's shape and little-endian bytes."""
    return zlib.crc32(words, zlib.crc32(struct.pack("<III", *words.shape)))


_DCTX = zstandard.ZstdDecompressor()


def _as_fp16_words(tensor: np.ndarray) -> np.ndarray:
    arr = np.asarray(tensor)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 2:
        raise TypeError(f"the fp16 codec takes float16 input, got {arr.dtype}; convert explicitly, "
                        f"e.g. tensor.astype(np.float16), if a lossy cast is what you want")
    if arr.ndim != 3:
        raise ValueError(f"expected a [seq, kv_heads, head_dim] tensor, got shape {arr.shape}")
    return np.ascontiguousarray(arr.astype("<f2", copy=False)).view("<u2")
