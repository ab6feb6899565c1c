"""The fp16 predictive lossless KV codec (the "fast" profile, blob version 1) and its blob format.

One tensor ``[seq, kv_heads, head_dim]`` of little-endian fp16 becomes one blob::

    offset size  field
    0      4     magic b"H2KV"
    4      1     format version (1)
    5      1     dtype (1 = fp16)
    6      1     plane count (2: hi byte plane, then lo byte plane)
    7      1     reserved, 0
    8      16    seq, kv_heads, head_dim, block_seq (u32 little-endian each)
    24     4     tensor check: low 32 bits of XXH3-64 over its shape (3 x u32) then its bytes
    28     5x2   per plane: flags (bit 0 zstd frame, else stored; bit 1 channel-centered), payload
                 length (u32)
    38     2xB   per plane, per block of ``block_seq`` tokens: the predictor id (see ``PREDICTORS``)
    38+2B  4     blob check: low 32 bits of XXH3-64 over the header bytes before it, then the payloads
    ...          payloads, hi then lo

Each plane is cut along seq into blocks; each block gets its own predictor, chosen by a fast
entropy estimate on sampled rows (``choose="estimate"``, in the C kernel
:mod:`h2o_kernels.codec._fastcore`) or by compressing every candidate (``choose="exhaustive"``).
Before that the hi plane may be channel-centered: each byte rotated left by one bit (+x and -x side
by side), minus its channel's reference byte; the reference row (``[kv_heads, head_dim]``) leads the
plane's data. The encoder picks each reference (the kernel: the median of sampled rows), the decoder
only adds it back. The transformed plane goes into one zstd frame, or is stored as is when zstd does
not shrink it. :func:`decode` needs nothing but the blob, returns the exact input bits, and raises
:class:`CodecError` for anything malformed, truncated or tampered with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from h2o_kernels import CODEC_NAME, FORMAT_VERSION  # the blob format's name and version (re-exported)
from h2o_kernels.codec import _fastcore
from h2o_kernels.codec.blob import (  # noqa: F401 (CodecError, MAGIC re-exported)
    DEFAULT_MAX_OUTPUT_BYTES,
    DTYPE_FP16,
    MAGIC,
    CodecError,
    as_fp16_words,
    check32,
    tensor_check,
)
from h2o_kernels.codec.predictors import FORWARD, K_DEFAULT, PREDICTOR_IDS, PREDICTORS, parse_predictors

ZSTD, _CENTERED = 1, 2  # flag bits of a plane's stage byte
# A zstd block of at most 128 KiB never codes to fewer than 4 bytes, so no valid frame expands more.
_ZSTD_MAX_EXPANSION = 1 << 15
_FIXED = struct.Struct("<4sBBBBIIIII")
_PLANE = struct.Struct("<BI")
_HEAD = struct.Struct("<4sBBBBIIIIIBIBI")  # the fixed header and both plane entries
_CHECK = struct.Struct("<I")
_PLANES = ("hi", "lo")
# How much better than raw a predictor must look to be chosen (the estimates are noisy), hi and lo
# planes: hi planes carry the structure; lo planes are mantissa noise unless a predictor wins outright.
_MARGINS = (0.02, 0.10)
# Centering must look this much cheaper (a fraction of the hi plane's estimated size) on top of its
# reference row: on K it saves 2-5% of the hi plane, on V it is within the estimate's noise.
_CENTER_MARGIN = 0.02
_CENTER_NEVER, _CENTER_ESTIMATE = 0, 1
# A lo plane whose sampled bytes cost at least this many bits each (order 0), with no repeated row
# and no predictor, is stored without trying zstd (real KV lo planes: about 7.99 bits/byte).
_LO_NOISE_BITS = 7.5

Choose = Literal["estimate", "exhaustive"]


@dataclass(frozen=True)
class PlaneInfo:
    """How one byte plane is stored: entropy stage, centering, payload size, per-block predictors."""

    entropy: Literal["stored", "zstd"]
    centered: bool
    payload_bytes: int
    predictor_ids: bytes

    @property
    def predictors(self) -> tuple[str, ...]:
        """The predictor of each block, by name."""
        return tuple(PREDICTORS[pid] for pid in self.predictor_ids)


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's header says, read without decoding the payloads."""

    version: int
    shape: tuple[int, int, int]
    block_seq: int
    check: int
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
    channel-centered where that pays. ``level`` is the zstd level. An instance keeps one zstd
    compressor (``zstd``, also usable on its own) and is not thread-safe; use one per thread.
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
        self._cands = tuple(bytes(PREDICTOR_IDS[p] for p in names) for names in self.predictors)
        self._raw_allowed = tuple("raw" in names for names in self.predictors)

    def encode(self, tensor: np.ndarray, positions: np.ndarray | None = None) -> bytes:
        """Encode an fp16 ``[seq, kv_heads, head_dim]`` tensor into a self-describing blob.

        ``positions`` (the rows' RoPE positions) is accepted and ignored: the fast profile does not
        use them; it exists so that both profiles share one ``Encoder`` protocol
        (:mod:`h2o_kernels.codec.profiles`). Raises ``TypeError`` for a non-fp16 tensor and
        ``ValueError`` for one that is not 3-D.
        """
        return self._encode_words(as_fp16_words(tensor))

    def encode_many(self, tensors: list[np.ndarray],
                    positions: list[np.ndarray | None] | None = None) -> list[bytes]:
        """Encode several tensors, one blob each (as :meth:`encode`; ``positions`` is ignored likewise,
        but must have one entry per tensor when given)."""
        if positions is not None and len(positions) != len(tensors):
            raise ValueError(f"positions has {len(positions)} entries for {len(tensors)} tensors")
        return [self._encode_words(as_fp16_words(t)) for t in tensors]

    def _encode_words(self, words: np.ndarray) -> bytes:
        """The blob of one contiguous little-endian uint16 tensor ``[seq, heads, dim]``."""
        seq, heads, dim = words.shape
        mode = _CENTER_ESTIMATE if self.center else _CENTER_NEVER
        hi, hi_plain, lo, lo_plain, ids, centered, _, lo_bits, lo_repeats = self._planes(words, mode)
        blocks = len(ids) // 2
        hi_stage, hi_payload, hi_ids = self._best_frame(hi, hi_plain, ids[:blocks], 0)
        if lo_plain is None and not lo_repeats and lo_bits >= _LO_NOISE_BITS:  # mantissa noise: zstd cannot shrink it
            lo_stage, lo_payload, lo_ids = 0, lo, ids[blocks:]
        else:
            lo_stage, lo_payload, lo_ids = self._best_frame(lo, lo_plain, ids[blocks:], 1)
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, DTYPE_FP16, len(_PLANES), 0, seq, heads, dim, self.block_seq,
                          tensor_check(words), (_CENTERED if centered else 0) | hi_stage, len(hi_payload),
                          lo_stage, len(lo_payload)) + hi_ids + lo_ids
        return b"".join([head, _CHECK.pack(check32(head, hi_payload, lo_payload)), hi_payload, lo_payload])

    def _planes(self, words: np.ndarray, center: int) -> tuple:
        """The kernel's coded planes and decisions (see ``_fastcore.encode_planes``); with
        ``choose="exhaustive"`` the predictors are then re-chosen by compressing every candidate."""
        seq, heads, dim = words.shape
        if self.choose == "estimate":
            return _fastcore.encode_planes(words, seq, heads, dim, self.block_seq, *self._cands, center,
                                           *_MARGINS, _CENTER_MARGIN)
        raw = bytes([PREDICTOR_IDS["raw"]])
        out = list(_fastcore.encode_planes(words, seq, heads, dim, self.block_seq, raw, raw, center, *_MARGINS,
                                            _CENTER_MARGIN))
        ids = []
        for kind, names in enumerate(self.predictors):
            data = out[2 * kind]
            prefix = len(data) - seq * heads * dim
            plane = np.frombuffer(data, dtype=np.uint8, offset=prefix).reshape(seq, heads, dim)
            coded, plane_ids = self._exhaustive(plane, names)
            out[2 * kind] = data[:prefix] + coded
            out[2 * kind + 1] = data if any(plane_ids) else None
            ids.append(plane_ids)
        out[4] = b"".join(ids)
        return tuple(out)

    def _exhaustive(self, plane: np.ndarray, names: tuple[str, ...]) -> tuple[bytes, bytes]:
        """Each block's candidate whose zstd frame is smallest: the coded plane and the predictor ids."""
        coded, ids = [], []
        for start in range(0, len(plane), self.block_seq):
            block = plane[start:start + self.block_seq]
            outs = [FORWARD[name](block) for name in names]
            best = int(np.argmin([len(self.zstd.compress(out)) for out in outs]))
            coded.append(outs[best].tobytes())
            ids.append(PREDICTOR_IDS[names[best]])
        return b"".join(coded), bytes(ids)

    def _best_frame(self, coded: bytes, plain: bytes | None, ids: bytes, kind: int) -> tuple[int, bytes, bytes]:
        """``(stage, payload, ids)`` of a plane: its coded form, or (where the kind allows ``raw``) its
        plain form with raw ids where zstd codes that smaller."""
        stage, payload = self._frame(coded)
        if plain is not None and self._raw_allowed[kind]:
            raw_stage, raw_payload = self._frame(plain)
            if len(raw_payload) <= len(payload):
                return raw_stage, raw_payload, bytes(len(ids))
        return stage, payload, ids

    def _frame(self, data: bytes) -> tuple[int, bytes]:
        """``(ZSTD, frame)`` for ``data``, or ``(0, data)`` where zstd does not shrink it."""
        frame = self.zstd.compress(data)
        return (ZSTD, frame) if len(frame) < len(data) else (0, data)


def decode(blob: bytes | bytearray | memoryview, *,
           max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> np.ndarray:
    """Decode a blob back to the exact fp16 tensor ``[seq, kv_heads, head_dim]``; raise
    :class:`CodecError` on any defect.

    ``max_output_bytes`` bounds what a (possibly forged) header may ask to allocate.
    """
    view = memoryview(blob).cast("B")
    return _decode_parsed(view, _parse_header(view, "", max_output_bytes), "")


def decode_many(blobs: list[bytes | bytearray | memoryview], *,
                max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[np.ndarray]:
    """Decode several blobs; raises :class:`CodecError` naming the first defective blob;
    ``max_output_bytes`` bounds each."""
    return [tensor for tensor, _ in decode_with_info(blobs, max_output_bytes=max_output_bytes)]


def decode_with_info(blobs: list[bytes | bytearray | memoryview], *,
                     max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[tuple[np.ndarray, BlobInfo]]:
    """:func:`decode_many`, each tensor paired with its blob's :class:`BlobInfo` (what
    :func:`inspect` would say, without parsing the blob twice)."""
    out = []
    for i, blob in enumerate(blobs):
        where = f"blob {i}: " if len(blobs) > 1 else ""
        view = memoryview(blob).cast("B")
        header = _parse_header(view, where, max_output_bytes)
        out.append((_decode_parsed(view, header, where), _info(header)))
    return out


def inspect(blob: bytes | bytearray | memoryview) -> BlobInfo:
    """Parse and validate a blob (header, blob check, payload sizes) without decoding its payloads."""
    return _info(_parse_header(memoryview(blob).cast("B"), "", None))


# a validated header: version, (seq, heads, dim), block_seq, tensor check, header bytes, per plane
# (flags, payload length), predictor ids (hi blocks then lo blocks)
_Header = tuple[int, tuple[int, int, int], int, int, int, tuple[tuple[int, int], tuple[int, int]], bytes]


def _info(header: _Header) -> BlobInfo:
    version, shape, block_seq, check, header_bytes, stages, ids = header
    blocks = len(ids) // 2
    planes = [PlaneInfo("zstd" if flags & ZSTD else "stored", bool(flags & _CENTERED), length,
                        ids[i * blocks:(i + 1) * blocks]) for i, (flags, length) in enumerate(stages)]
    return BlobInfo(version, shape, block_seq, check, header_bytes, planes[0], planes[1])


def _parse_header(view: memoryview, where: str, max_output_bytes: int | None) -> _Header:
    """Validate a blob's header, blob check and payload sizes (before anything is allocated for it)."""
    if len(view) < _HEAD.size:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least {_HEAD.size + 4}")
    (magic, version, dtype, n_planes, reserved, seq, heads, dim, block_seq, check, hi_flags, hi_len, lo_flags,
     lo_len) = _HEAD.unpack_from(view)
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
    header_bytes = _HEAD.size + len(_PLANES) * blocks + _CHECK.size
    if header_bytes > len(view):
        raise CodecError(f"{where}blob truncated: header declares {header_bytes} bytes, blob has {len(view)}")
    if header_bytes + hi_len + lo_len != len(view):
        raise CodecError(f"{where}blob is {len(view)} bytes, header and payloads declare "
                         f"{header_bytes + hi_len + lo_len}")
    check_at = header_bytes - _CHECK.size
    if check32(view[:check_at], view[header_bytes:]) != _CHECK.unpack_from(view, check_at)[0]:
        raise CodecError(f"{where}blob check mismatch: the blob was altered")
    ids = bytes(view[_HEAD.size:check_at])
    if ids and max(ids) >= len(PREDICTORS):
        raise CodecError(f"{where}bad header: unknown predictor id {max(ids)}")
    raw_bytes = 2 * seq * heads * dim
    if max_output_bytes is not None and raw_bytes > max_output_bytes:
        raise CodecError(f"{where}declares a {raw_bytes}-byte tensor {[seq, heads, dim]}, "
                         f"over max_output_bytes={max_output_bytes}")
    offset = header_bytes
    for name, flags, length in (("hi", hi_flags, hi_len), ("lo", lo_flags, lo_len)):
        if flags & ~(ZSTD | _CENTERED) or (flags & _CENTERED and (name != "hi" or seq < 2)):
            raise CodecError(f"{where}bad header: {name} plane flags {flags:#x}")
        size = (seq + (1 if flags & _CENTERED else 0)) * heads * dim
        _check_payload(view[offset:offset + length], bool(flags & ZSTD), size, f"{where}{name} plane: ")
        offset += length
    return (version, (seq, heads, dim), block_seq, check, header_bytes, ((hi_flags, hi_len), (lo_flags, lo_len)), ids)


def _decode_parsed(view: memoryview, header: _Header, where: str) -> np.ndarray:
    """The tensor of a blob whose header :func:`_parse_header` validated; checks the tensor check."""
    _, shape, block_seq, check, header_bytes, ((hi_flags, hi_len), (lo_flags, lo_len)), ids = header
    seq, heads, dim = shape
    size = seq * heads * dim
    hi_size = size + (heads * dim if hi_flags & _CENTERED else 0)
    hi = _decode_plane(view[header_bytes:header_bytes + hi_len], hi_flags & ZSTD, hi_size, where)
    lo = _decode_plane(view[header_bytes + hi_len:], lo_flags & ZSTD, size, where)
    words = np.empty(shape, dtype="<u2")
    _fastcore.decode_planes(words, hi, lo, seq, heads, dim, block_seq, ids, bool(hi_flags & _CENTERED))
    if tensor_check(words) != check:
        raise CodecError(f"{where}decoded tensor fails the blob's tensor check: the payload was altered")
    return words.view("<f2")


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


def _decode_plane(payload: memoryview, zstd: int, size: int, where: str) -> bytes | memoryview:
    """The plane bytes of a payload already checked by :func:`_check_payload` (and covered by the
    blob check, so trailing bytes after its frame cannot have been added unnoticed)."""
    if not zstd:
        return payload
    try:
        data = _DCTX.decompress(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{where}corrupt zstd payload: {exc}") from None
    if len(data) != size:
        raise CodecError(f"{where}zstd payload decoded to {len(data)} bytes, expected {size}")
    return data


_DCTX = zstandard.ZstdDecompressor()
