"""The fp16 predictive lossless KV codec (the "fast" profile) and its blob formats: version 3 (written by
default) and version 1 (still read, and written by ``FP16Codec(version=1)``).

One tensor ``[seq, kv_heads, head_dim]`` of little-endian fp16 is split into a hi and a lo byte plane
(``C = kv_heads * head_dim`` channels a row). Each plane is cut along seq into blocks of ``block_seq`` tokens;
each block gets its own predictor (``PREDICTORS``), chosen by a fast entropy estimate on sampled rows
(``choose="estimate"``, in the C kernel :mod:`h2o_kernels.codec._fastcore`) or by compressing every candidate
(``choose="exhaustive"``). Before that the hi plane may be channel-centered: each byte rotated left by one bit
(+x and -x side by side), minus its channel's reference byte; the reference row (``C`` bytes) leads the plane's
data. The encoder picks each reference (the kernel: the median of sampled rows), the decoder only adds it back.
The transformed plane goes into one zstd frame, or is stored as is when zstd does not shrink it; a plane with
repeated rows (layer-0 V: a repeated token repeats its row) also tries zstd level ``REPEAT_LEVEL`` and keeps
the smaller frame. :func:`decode` needs nothing but the blob, returns the exact input bits, and raises
:class:`CodecError` for anything malformed, truncated or tampered with.

Version 3 (compact: one check covers the header, the payloads and the decoded tensor; every field is
validated and has one valid encoding)::

    offset size  field
    0      4     magic b"H2KV"
    4      1     format version (3)
    5      1     flags: bit 0 hi plane zstd (else stored), 1 hi plane centered (needs seq >= 2, C >= 1), 2 lo
                 plane zstd, 3 block_seq follows, 4 predictor ids follow (else every block is raw), 5 one hi id
                 per block (else one for all blocks), 6 one lo id per block; bit 7 is 0
    6      3-15  seq, kv_heads, head_dim: unsigned LEB128 varints (minimal encoding, each < 2**32)
    ..     1-5   block_seq (flag bit 3; else 64), only where decoding depends on it (ids follow and one is per
                 block or a sequence predictor) and it is not 64; below seq, or equal to seq when seq > 64
    ..     k/2   k predictor ids (flag bit 4), 4 bits each, low nibble first: the hi plane's (per block, or one),
                 then the lo plane's; an odd k ends with a zero nibble; not all raw; a per-block list of one
                 plane is not all one id
    ..     4     check: low 32 bits of XXH3-64 over the header bytes before it, the payloads, then the shape
                 (3 x u32 little-endian) and the words (zstd frames have bits whose flip changes no output,
                 so a check of the tensor alone would miss them; the tensor in it catches coder faults)
    ..           the hi payload, then the lo payload up to the blob's end

A stored payload is the plane's bytes, exactly (the hi plane's ``(seq + 1) * C`` when centered, else
``seq * C``). A zstd payload is one zstd frame (RFC 8878) less its magic number and frame header: its blocks,
the last one flagged last; the decoder rebuilds the header (single segment, content size = the plane's size,
no checksum, no dictionary), so the frame's end and size are implied (:func:`_fastcore.zstd_frame_size`).

Version 1::

    offset size  field
    0      4     magic b"H2KV"
    4      1     format version (1)
    5      1     dtype (1 = fp16)
    6      1     plane count (2: hi byte plane, then lo byte plane)
    7      1     reserved, 0
    8      16    seq, kv_heads, head_dim, block_seq (u32 little-endian each)
    24     4     tensor check: low 32 bits of XXH3-64 over the shape (3 x u32 little-endian) then the words
    28     5x2   per plane: flags (bit 0 zstd frame, else stored; bit 1 channel-centered), payload
                 length (u32)
    38     2xB   per plane, per block of ``block_seq`` tokens: the predictor id (see ``PREDICTORS``)
    38+2B  4     blob check: low 32 bits of XXH3-64 over the header bytes before it, then the payloads
    ...          payloads, hi then lo (whole zstd frames, or the stored plane)
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from h2o_kernels import CODEC_NAME, FORMAT_VERSION  # the blob format's name and version (re-exported)
from h2o_kernels.codec import _fastcore
from h2o_kernels.codec.blob import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DTYPE_FP16,
    MAGIC,
    CodecError,
    TensorSize,  # noqa: F401 (CodecError, MAGIC re-exported)
    as_fp16_words,
    check32,
    read_varint,
    tensor_check,
    varint,
)
from h2o_kernels.codec.predictors import FORWARD, K_DEFAULT, PREDICTOR_IDS, PREDICTORS, parse_predictors

VERSIONS = (1, FORMAT_VERSION)  # the blob versions this module reads and writes
ZSTD, _CENTERED = 1, 2  # flag bits of a plane's stage byte (version 1; :class:`PlaneInfo` in both versions)
# A zstd block of at most 128 KiB never codes to fewer than 4 bytes, so no valid frame expands more.
_ZSTD_MAX_EXPANSION = 1 << 15
_HEAD = struct.Struct("<4sBBBBIIIIIBIBI")  # version 1: the fixed header and both plane entries
_CHECK = struct.Struct("<I")
_PLANES = ("hi", "lo")
# version 3 flag bits
_HI_ZSTD, _HI_CENTERED, _LO_ZSTD, _HAS_BLOCK_SEQ, _HAS_IDS, _HI_MIXED, _LO_MIXED = 1, 2, 4, 8, 16, 32, 64
DEFAULT_BLOCK_SEQ = 64
# predictors whose output depends on where blocks start (the others work row by row)
_SEQUENCE_IDS = frozenset(PREDICTOR_IDS[name] for name in ("delta_seq", "xor_seq", "pair_delta_delta_seq"))
# How much better than raw a predictor must look to be chosen (the estimates are noisy), hi and lo
# planes: hi planes carry the structure; lo planes are mantissa noise unless a predictor wins outright.
_MARGINS = (0.02, 0.10)
# Centering must look this much cheaper (a fraction of the hi plane's estimated size) on top of its
# reference row: on K it saves 2-5% of the hi plane, on V it is within the estimate's noise.
_CENTER_MARGIN = 0.02
# A centering estimated to save under this fraction of the hi plane's raw bits is a close call: zstd then
# codes the uncentered plane too and the smaller wins (real KV: every V centering, 6% of K's; V's lost up
# to 208 bytes of a 64-token chunk to the uncentered plane).
_CENTER_CHECK = 0.015
_CENTER_NEVER, _CENTER_ESTIMATE = 0, 1
# A lo plane whose sampled bytes cost at least this many bits each (order 0), with no repeated row
# and no predictor, is stored without trying zstd (real KV lo planes: about 7.99 bits/byte).
_LO_NOISE_BITS = 7.5
# A plane with at least 1/16 of its rows repeating an earlier row also tries this zstd level (real layer-0
# V, 192-token chunks: level 3 then 7, the smaller kept, saves 0.6% of both planes' frames; no other layer
# has repeated rows).
REPEAT_LEVEL = 7
_REPEAT_FRACTION = 16
# A version-3 tensor without channels decodes from no payload bytes: this bounds its row count's block list.
_MAX_EMPTY_BLOCKS = 1 << 20

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
class BlobInfo(TensorSize):
    """What a blob's header says, read without decoding the payloads (``block_seq``: the block length its
    predictor ids refer to; a version-3 blob whose decoding does not depend on it says 64)."""

    version: int
    shape: tuple[int, int, int]
    block_seq: int
    check: int
    header_bytes: int
    hi: PlaneInfo
    lo: PlaneInfo

    @property
    def blob_bytes(self) -> int:
        """Total blob size, header included."""
        return self.header_bytes + self.hi.payload_bytes + self.lo.payload_bytes


class FP16Codec:
    """Encoder for one kind of tensor (K or V) with its hi- and lo-plane predictor sets.

    ``FP16Codec()`` uses the K defaults (all five predictors on both planes); V uses
    ``FP16Codec(hi_predictors=V_DEFAULT, lo_predictors=V_DEFAULT)``. ``center`` lets the hi plane be
    channel-centered where that pays. ``level`` is the zstd level. ``version`` is the blob format written
    (3; 1 for readers that predate it). An instance keeps its zstd compressors (``zstd``, the plain level-
    ``level`` one, is also usable on its own) and is not thread-safe; use one per thread.
    """

    def __init__(self, hi_predictors: str | tuple[str, ...] = K_DEFAULT,
                 lo_predictors: str | tuple[str, ...] = K_DEFAULT, *, block_seq: int = DEFAULT_BLOCK_SEQ,
                 level: int = 3, choose: Choose = "estimate", center: bool = True,
                 version: int = FORMAT_VERSION) -> None:
        if block_seq < 1:
            raise ValueError(f"block_seq must be >= 1, got {block_seq}")
        if choose not in ("estimate", "exhaustive"):
            raise ValueError(f"choose must be 'estimate' or 'exhaustive', got {choose!r}")
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        self.predictors = (parse_predictors(hi_predictors, "hi_predictors"),
                           parse_predictors(lo_predictors, "lo_predictors"))
        self.block_seq = block_seq
        self.level = level
        self.choose = choose
        self.center = center
        self.version = version
        self.zstd = zstandard.ZstdCompressor(level=level)
        self._compressors: dict[tuple[int, int], zstandard.ZstdCompressor] = {}
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
        (hi, hi_plain, lo, lo_plain, ids, centered, _, lo_bits, lo_repeats, hi_repeats,
         hi_uncentered) = self._planes(words, mode)
        blocks = len(ids) // 2
        many = max(1, -(-seq // _REPEAT_FRACTION))  # repeated rows that make a plane worth the repeat level
        hi_stage, hi_payload, hi_ids = self._best_frame(hi, hi_plain, ids[:blocks], 0, hi_repeats >= many)
        if hi_uncentered is not None and self._raw_allowed[0]:
            stage, payload = self._frame(hi_uncentered, hi_repeats >= many)
            if len(payload) <= len(hi_payload):
                hi_stage, hi_payload, hi_ids, centered = stage, payload, bytes(blocks), False
        if lo_plain is None and not lo_repeats and lo_bits >= _LO_NOISE_BITS:  # mantissa noise: zstd cannot shrink it
            lo_stage, lo_payload, lo_ids = 0, lo, ids[blocks:]
        else:
            lo_stage, lo_payload, lo_ids = self._best_frame(lo, lo_plain, ids[blocks:], 1, lo_repeats >= many)
        if self.version == 1:
            head = _HEAD.pack(MAGIC, 1, DTYPE_FP16, len(_PLANES), 0, seq, heads, dim, self.block_seq,
                              tensor_check(words), (_CENTERED if centered else 0) | hi_stage, len(hi_payload), lo_stage,
                              len(lo_payload)) + hi_ids + lo_ids
            return b"".join([head, _CHECK.pack(check32(head, hi_payload, lo_payload)), hi_payload, lo_payload])
        flags = (_HI_ZSTD if hi_stage else 0) | (_HI_CENTERED if centered else 0) | (_LO_ZSTD if lo_stage else 0)
        head = _v3_header(flags, (seq, heads, dim), self.block_seq, hi_ids, lo_ids)
        check = check32(head, hi_payload, lo_payload, struct.pack("<III", seq, heads, dim), words)
        return b"".join([head, _CHECK.pack(check), hi_payload, lo_payload])

    def _planes(self, words: np.ndarray, center: int) -> tuple:
        """The kernel's coded planes and decisions (see ``_fastcore.encode_planes``); with
        ``choose="exhaustive"`` the predictors are then re-chosen by compressing every candidate."""
        seq, heads, dim = words.shape
        if self.choose == "estimate":
            return _fastcore.encode_planes(words, seq, heads, dim, self.block_seq, *self._cands, center,
                                           *_MARGINS, _CENTER_MARGIN, _CENTER_CHECK)
        raw = bytes([PREDICTOR_IDS["raw"]])
        out = list(_fastcore.encode_planes(words, seq, heads, dim, self.block_seq, raw, raw, center, *_MARGINS,
                                            _CENTER_MARGIN, _CENTER_CHECK))
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

    def _best_frame(self, coded: bytes, plain: bytes | None, ids: bytes, kind: int,
                    repeats: bool) -> tuple[int, bytes | memoryview, bytes]:
        """``(stage, payload, ids)`` of a plane: its coded form, or (where the kind allows ``raw``) its
        plain form with raw ids where zstd codes that smaller."""
        stage, payload = self._frame(coded, repeats)
        if plain is not None and self._raw_allowed[kind]:
            raw_stage, raw_payload = self._frame(plain, repeats)
            if len(raw_payload) <= len(payload):
                return raw_stage, raw_payload, bytes(len(ids))
        return stage, payload, ids

    def _frame(self, data: bytes, repeats: bool) -> tuple[int, bytes | memoryview]:
        """``(ZSTD, payload)`` for ``data`` (the smallest of its levels' zstd payloads), or ``(0, data)``
        where zstd does not shrink it."""
        best = data
        for level in (self.level, REPEAT_LEVEL) if repeats and self.level < REPEAT_LEVEL else (self.level,):
            frame = self._zstd_payload(level, data)
            if len(frame) < len(best):
                best = frame
        return (ZSTD, best) if best is not data else (0, data)

    def _zstd_payload(self, level: int, data: bytes) -> bytes | memoryview:
        """The zstd payload of ``data`` at ``level``: a whole frame (version 1), or a frame less its magic and
        frame header (version 3; ``data`` itself, i.e. no gain, should zstd not write the header the decoder
        rebuilds)."""
        if self.version == 1:
            return (self.zstd if level == self.level else zstandard.ZstdCompressor(level=level)).compress(data)
        # zstd sizes its tables by the source's log2 (below the minimum window too): one compressor per log2
        size_log = (len(data) - 1).bit_length()
        key = (level, size_log)
        if key not in self._compressors:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=len(data), window_log=min(31, max(10, size_log)),  # single segment: the window
                format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=1, write_checksum=0, write_dict_id=0)
            self._compressors[key] = zstandard.ZstdCompressor(compression_params=params)
        frame = self._compressors[key].compress(data)
        header = _frame_header(len(data))
        return memoryview(frame)[len(header):] if frame.startswith(header) else data



def _v3_header(flags: int, shape: tuple[int, int, int], block_seq: int, hi_ids: bytes, lo_ids: bytes) -> bytes:
    """A version-3 header up to its check (module doc), for the planes' stage bits ``flags`` and per-block
    predictor ids."""
    seq = shape[0]
    parts = [MAGIC, bytes([3]), b"", *(varint(n) for n in shape)]
    nibbles: list[int] = []
    if any(hi_ids) or any(lo_ids):
        flags |= _HAS_IDS
        for ids, mixed in ((hi_ids, _HI_MIXED), (lo_ids, _LO_MIXED)):
            if len(set(ids)) > 1:
                flags |= mixed
                nibbles += ids
            else:
                nibbles.append(ids[0])
        depends = flags & (_HI_MIXED | _LO_MIXED) or _SEQUENCE_IDS.intersection(nibbles)
        if block_seq >= seq:  # one block: the smallest equivalent length, 64 where that is one
            block_seq = DEFAULT_BLOCK_SEQ if seq <= DEFAULT_BLOCK_SEQ else seq
        if depends and block_seq != DEFAULT_BLOCK_SEQ:
            flags |= _HAS_BLOCK_SEQ
            parts.append(varint(block_seq))
        if len(nibbles) % 2:
            nibbles.append(0)
        parts.append(bytes(nibbles[i] | nibbles[i + 1] << 4 for i in range(0, len(nibbles), 2)))
    parts[2] = bytes([flags])
    return b"".join(parts)


def _frame_header(size: int) -> bytes:
    """The zstd frame header (RFC 8878, 3.1.1.1) version 3 leaves out: single segment, content size ``size``,
    no checksum, no dictionary; the content size field as small as ``size`` allows."""
    if size < 256:
        return bytes([0x20, size])
    if size < 65536 + 256:
        return bytes([0x60]) + (size - 256).to_bytes(2, "little")
    if size < 1 << 32:
        return bytes([0xA0]) + size.to_bytes(4, "little")
    return bytes([0xE0]) + size.to_bytes(8, "little")


def decode(blob: bytes | bytearray | memoryview, *,
           max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> np.ndarray:
    """Decode a blob (version 1 or 3) back to the exact fp16 tensor ``[seq, kv_heads, head_dim]``; raise
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


def inspect(blob: bytes | bytearray | memoryview, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> BlobInfo:
    """Parse and validate a blob's header and payload sizes (version 1: also its blob check) without
    decoding its payloads; a tensor over ``max_output_bytes`` is refused as :func:`decode` refuses it."""
    return _info(_parse_header(memoryview(blob).cast("B"), "", max_output_bytes))


# a validated header: version, (seq, heads, dim), block_seq, tensor check, header bytes, per plane
# (flags: ZSTD | _CENTERED, payload length), predictor ids (hi blocks then lo blocks)
_Header = tuple[int, tuple[int, int, int], int, int, int, tuple[tuple[int, int], tuple[int, int]], bytes]


def _info(header: _Header) -> BlobInfo:
    version, shape, block_seq, check, header_bytes, stages, ids = header
    blocks = len(ids) // 2
    planes = [PlaneInfo("zstd" if flags & ZSTD else "stored", bool(flags & _CENTERED), length,
                        ids[i * blocks:(i + 1) * blocks]) for i, (flags, length) in enumerate(stages)]
    return BlobInfo(version, shape, block_seq, check, header_bytes, planes[0], planes[1])


def _parse_header(view: memoryview, where: str, max_output_bytes: int | None) -> _Header:
    """Validate a blob's header and payload sizes (before anything is allocated for it)."""
    if len(view) < 5:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least 5")
    if bytes(view[:4]) != MAGIC:
        raise CodecError(f"{where}not an {CODEC_NAME} blob: magic {bytes(view[:4])!r}, expected {MAGIC!r}")
    if view[4] == FORMAT_VERSION:
        return _parse_v3(view, where, max_output_bytes)
    if view[4] == 1:
        return _parse_v1(view, where, max_output_bytes)
    raise CodecError(f"{where}unsupported blob format version {view[4]}; this module reads {VERSIONS}")


def _check_output(shape: tuple[int, int, int], where: str, max_output_bytes: int | None) -> None:
    seq, heads, dim = shape
    if max_output_bytes is not None and 2 * seq * heads * dim > max_output_bytes:
        raise CodecError(f"{where}declares a {2 * seq * heads * dim}-byte tensor {list(shape)}, "
                         f"over max_output_bytes={max_output_bytes}")





def _parse_v3(view: memoryview, where: str, max_output_bytes: int | None) -> _Header:
    if len(view) < 6:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a version-3 header needs at least 13")
    flags = view[5]
    if flags & 0x80 or (not flags & _HAS_IDS and flags & (_HAS_BLOCK_SEQ | _HI_MIXED | _LO_MIXED)):
        raise CodecError(f"{where}bad header: flags {flags:#04x}")
    at = 6
    shape = []
    for name in ("seq", "kv_heads", "head_dim"):
        value, at = read_varint(view, at, where, name)
        shape.append(value)
    seq, heads, dim = shape
    block_seq = DEFAULT_BLOCK_SEQ
    if flags & _HAS_BLOCK_SEQ:
        block_seq, at = read_varint(view, at, where, "block_seq")
        if block_seq in (0, DEFAULT_BLOCK_SEQ) or block_seq > seq or (block_seq == seq <= DEFAULT_BLOCK_SEQ):
            raise CodecError(f"{where}bad header: block_seq {block_seq} is not a valid stored length for seq {seq}")
    blocks = -(-seq // block_seq)
    if heads * dim == 0 and blocks > _MAX_EMPTY_BLOCKS:
        raise CodecError(f"{where}bad header: a tensor without channels and {seq} rows")
    planes: list[list[int]] = [[0], [0]]
    if flags & _HAS_IDS:
        planes, at = _read_ids(view, at, flags, blocks, where)
    if at + _CHECK.size > len(view):
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, its header declares {at + _CHECK.size}")
    check = _CHECK.unpack_from(view, at)[0]
    header_bytes = at + _CHECK.size
    _check_output((seq, heads, dim), where, max_output_bytes)
    channels = heads * dim
    centered = bool(flags & _HI_CENTERED)
    if centered and (seq < 2 or channels == 0):
        raise CodecError(f"{where}bad header: a centered hi plane needs seq >= 2 and a channel, shape {shape}")
    stages = []
    start = header_bytes
    for name, zstd, size in (("hi", flags & _HI_ZSTD, (seq + centered) * channels),
                             ("lo", flags & _LO_ZSTD, seq * channels)):
        if zstd:
            try:
                length = _fastcore.zstd_frame_size(view, start)
            except ValueError as exc:
                raise CodecError(f"{where}{name} plane: {exc}") from None
            if size == 0 or size > length * _ZSTD_MAX_EXPANSION:
                raise CodecError(f"{where}{name} plane: a {length}-byte zstd payload cannot hold {size} bytes")
        else:
            length = size
        if name == "lo" and start + length != len(view):
            raise CodecError(f"{where}blob is {len(view)} bytes, its header and payloads make {start + length}")
        if start + length > len(view):
            raise CodecError(f"{where}blob truncated: {len(view)} bytes, its {name} payload ends at {start + length}")
        stages.append(((ZSTD if zstd else 0) | (_CENTERED if centered and name == "hi" else 0), length))
        start += length
    ids = bytes(planes[0]) * (blocks // len(planes[0])) + bytes(planes[1]) * (blocks // len(planes[1]))  # checked
    return 3, (seq, heads, dim), block_seq, check, header_bytes, (stages[0], stages[1]), ids


def _read_ids(view: memoryview, at: int, flags: int, blocks: int, where: str) -> tuple[list[list[int]], int]:
    """The hi and lo planes' predictor ids packed at ``at`` (per block, or one for all blocks), and the offset
    after them."""
    if blocks == 0:
        raise CodecError(f"{where}bad header: predictor ids for a tensor without rows")
    counts = [blocks if flags & mixed else 1 for mixed in (_HI_MIXED, _LO_MIXED)]
    size = (counts[0] + counts[1] + 1) // 2
    if at + size > len(view):
        raise CodecError(f"{where}blob truncated inside the header's predictor ids")
    nibbles = [n for byte in view[at:at + size] for n in (byte & 15, byte >> 4)]
    if len(nibbles) > counts[0] + counts[1] and nibbles[-1]:
        raise CodecError(f"{where}bad header: the predictor ids' padding nibble is {nibbles[-1]}, not 0")
    planes = [nibbles[:counts[0]], nibbles[counts[0]:counts[0] + counts[1]]]
    if max(planes[0] + planes[1]) >= len(PREDICTORS) or not any(planes[0] + planes[1]):
        raise CodecError(f"{where}bad header: predictor ids {planes} (unknown, or all raw)")
    if any(len(ids) > 1 and len(set(ids)) == 1 for ids in planes):
        raise CodecError(f"{where}bad header: a per-block predictor list of one id {planes}")
    if flags & _HAS_BLOCK_SEQ and not (flags & (_HI_MIXED | _LO_MIXED) or _SEQUENCE_IDS.intersection(nibbles)):
        raise CodecError(f"{where}bad header: block_seq given for predictors that do not depend on it")
    return planes, at + size


def _parse_v1(view: memoryview, where: str, max_output_bytes: int | None) -> _Header:
    """Validate a version-1 blob's header, blob check and payload sizes."""
    if len(view) < _HEAD.size:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least {_HEAD.size + 4}")
    (_, version, dtype, n_planes, reserved, seq, heads, dim, block_seq, check, hi_flags, hi_len, lo_flags,
     lo_len) = _HEAD.unpack_from(view)
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
    _check_output((seq, heads, dim), where, max_output_bytes)
    offset = header_bytes
    for name, flags, length in (("hi", hi_flags, hi_len), ("lo", lo_flags, lo_len)):
        if flags & ~(ZSTD | _CENTERED) or (flags & _CENTERED and (name != "hi" or seq < 2)):
            raise CodecError(f"{where}bad header: {name} plane flags {flags:#x}")
        size = (seq + (1 if flags & _CENTERED else 0)) * heads * dim
        _check_v1_payload(view[offset:offset + length], bool(flags & ZSTD), size, f"{where}{name} plane: ")
        offset += length
    return (version, (seq, heads, dim), block_seq, check, header_bytes, ((hi_flags, hi_len), (lo_flags, lo_len)), ids)


def _decode_parsed(view: memoryview, header: _Header, where: str) -> np.ndarray:
    """The tensor of a blob whose header :func:`_parse_header` validated; checks the tensor check."""
    version, shape, block_seq, check, header_bytes, ((hi_flags, hi_len), (lo_flags, lo_len)), ids = header
    seq, heads, dim = shape
    size = seq * heads * dim
    hi_size = size + (heads * dim if hi_flags & _CENTERED else 0)
    hi = _decode_plane(view[header_bytes:header_bytes + hi_len], hi_flags & ZSTD, hi_size, version, where)
    lo = _decode_plane(view[header_bytes + hi_len:], lo_flags & ZSTD, size, version, where)
    words = np.empty(shape, dtype="<u2")
    _fastcore.decode_planes(words, hi, lo, seq, heads, dim, block_seq, ids, bool(hi_flags & _CENTERED))
    if version == 1 and tensor_check(words) != check:
        raise CodecError(f"{where}decoded tensor fails the blob's tensor check: the payload was altered")
    if version != 1 and check32(view[:header_bytes - _CHECK.size], view[header_bytes:],
                                struct.pack("<III", *shape), words) != check:
        raise CodecError(f"{where}blob check mismatch (header, payloads and decoded tensor): the blob was altered")
    return words.view("<f2")


def _check_v1_payload(payload: memoryview, zstd: bool, size: int, where: str) -> None:
    """Whether a version-1 payload can hold a ``size``-byte plane, without decoding it."""
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


def _decode_plane(payload: memoryview, zstd: int, size: int, version: int, where: str) -> bytes | memoryview:
    """The plane bytes of a payload whose size the header parse checked (version 1: a whole frame, its
    trailing bytes covered by the blob check; version 3: a frame less its header, which is rebuilt here,
    decoded to exactly ``size`` bytes with nothing left over)."""
    if not zstd:
        return payload
    try:
        if version == 1:
            data = _decompressors().v1.decompress(payload)
        else:
            data = _decompressors().v3.decompress(_frame_header(size) + payload, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{where}corrupt zstd payload: {exc}") from None
    if len(data) != size:
        raise CodecError(f"{where}zstd payload decoded to {len(data)} bytes, expected {size}")
    return data


_THREAD = threading.local()


def _decompressors() -> threading.local:
    """This thread's zstd decompressors (python-zstandard's are not thread-safe): ``v1`` for whole frames,
    ``v3`` for magicless single-segment frames, whose window is the plane itself, already bounded by
    ``max_output_bytes``."""
    if not hasattr(_THREAD, "v1"):
        _THREAD.v1 = zstandard.ZstdDecompressor()
        _THREAD.v3 = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS, max_window_size=1 << 31)
    return _THREAD
