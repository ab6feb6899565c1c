"""The codec's "ratio" profile: a context-model coder of fp16 KV tensors, blob format version 2.

One tensor ``[seq, kv_heads, head_dim]`` of little-endian fp16 (``C = kv_heads * head_dim`` channels a
row, one row a token) becomes one blob::

    offset size  field
    0      4     magic b"H2KV"
    4      1     format version (2)
    5      1     dtype (1 = fp16)
    6      1     model id (1: the model of _ratiocore.c, every constant included)
    7      1     flags: bit 0 RoPE matching (the RoPE block follows), bit 1 positions listed (the
                 positions block follows; only with bit 0); other bits 0
    8      4     seq (u32 little-endian)
    12     2     kv_heads (u16)
    14     2     head_dim (u16)
    16     4     S: length of the range-coded stream (u32)
    20     4     tensor check: low 32 bits of XXH3-64 over its shape (3 x u32) then its bytes
    [24    9]    RoPE block: theta (f64), layout (u8: 0 rotate-half, 1 interleaved)
    [..  4+G]    positions block: G (u32), then seq-1 minimal LEB128 varints ``pos[t] - pos[t-1] - 1``
    ..     4     blob check: low 32 bits of XXH3-64 over the header bytes before it, then the payload
    ..     S     range-coded stream: two coders' bytes, the second's reversed (see _ratiocore.c)
    ..     L     lo bytes of the literal rows (C a row, in row order); L is what remains

Rows are coded in order (``_ratiocore.c`` has the model): a row equal to an earlier one is its index;
with RoPE matching (K only) a row may be an earlier row re-rotated by the difference of their positions
plus per-channel residuals in fp16 ordinal units; any other row is literal: its lo bytes go raw into
the lo section and its hi bytes (sign, exponent, 2 mantissa bits) are centred on the channel's running
mean and coded bit by bit, each bit a logistic mix of adaptive counters (the channel's own bit tree,
everyone's given the reference row, everyone's bit tree) with two interleaved binary range coders
(LZMA's; even and odd channels). The reference row is row ``t-1`` or an earlier row the encoder names.
Only position *differences* enter the rotation, so consecutive positions (from any start) are not stored.

The model is integer arithmetic; the RoPE prediction uses IEEE double +,-,*,/ only (no libm) and an
integer rounding to fp16, so every platform codes the same bits (golden blobs in tests/data pin it). The
coder's per-channel passes and the encoder's row searches are compiled twice, plain and for AVX2 (x86-64),
and the AVX2 copies run where the CPU has them: the same integer operations, so the same bits (the tests
compare the two copies).
Safety net: :meth:`RatioCodec.encode` returns the fast profile's blob (its current format, version 3:
:mod:`~h2o_kernels.codec.fp16`, the kind's default predictors) whenever that is not larger than the
version-2 blob, so the ratio profile is never worse than the fast one on any selection; decode such blobs
with :func:`h2o_kernels.codec.profiles.decode`. This module's :func:`decode` reads version 2 only and
raises :class:`CodecError` for anything malformed, truncated or tampered with.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from h2o_kernels.codec import _ratiocore
from h2o_kernels.codec.blob import (
    DEFAULT_MAX_OUTPUT_BYTES,
    DTYPE_FP16,
    MAGIC,
    CodecError,
    TensorSize,
    as_fp16_words,
    check32,
    read_varint,
    tensor_check,
    varint,
)
from h2o_kernels.codec.rope import RopeSpec

VERSION = 2
MODEL_ID = 1
MAX_CHANNELS = 1 << 16  # kv_heads * head_dim: the model keeps 1 KiB of counters a channel
MAX_POSITION = (1 << 31) - 1
_ROPE, _POSITIONS = 1, 2  # flag bits
_LAYOUTS = ("half", "interleaved")
_FIXED = struct.Struct("<4sBBBBIHHII")
_ROPE_BLOCK = struct.Struct("<dB")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class RatioBlobInfo(TensorSize):
    """What a version-2 blob's header says, read without decoding the stream.

    ``literal_rows`` rows are coded in full; the other ``matched_rows`` are exact or RoPE matches of
    earlier rows. ``rope`` is the RoPE spec the blob matches K rows with (None: no RoPE matching);
    ``positions_listed`` says whether the rows' positions were not consecutive (then they are stored).
    """

    version: int
    shape: tuple[int, int, int]
    check: int
    header_bytes: int
    payload_bytes: int
    stream_bytes: int
    literal_rows: int
    rope: RopeSpec | None
    positions_listed: bool

    @property
    def blob_bytes(self) -> int:
        """Total blob size, header included."""
        return self.header_bytes + self.payload_bytes

    @property
    def matched_rows(self) -> int:
        """Rows coded as an exact or RoPE match of an earlier row."""
        return self.shape[0] - self.literal_rows


class RatioCodec:
    """Encoder of the ratio profile for K (``kind="k"``) or V tensors.

    ``rope`` (K only: a model's :class:`RopeSpec`) lets K rows be predicted from earlier rows rotated
    through their position difference. ``safety_net`` (default on) returns the fast profile's blob
    wherever the version-2 blob would not be smaller; off, every blob is version 2 (tests, benchmarks).
    Raises ``ValueError`` for another kind, or a rope spec with V. Not thread-safe (its fast-profile
    encoder is not): use one instance per thread.
    """

    def __init__(self, kind: Literal["k", "v"], *, rope: RopeSpec | None = None, safety_net: bool = True):
        from h2o_kernels.codec.profiles import make_codec

        if kind not in ("k", "v"):
            raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
        if rope is not None and kind != "k":
            raise ValueError("RoPE matching applies to K only (V is not rotated)")
        if rope is not None and not isinstance(rope, RopeSpec):
            raise TypeError(f"rope must be a RopeSpec or None, got {type(rope).__name__}")
        self.kind = kind
        self.rope = rope
        self._fast = make_codec("fast", kind) if safety_net else None

    def encode(self, tensor: np.ndarray, positions: np.ndarray | None = None) -> bytes:
        """One blob for an fp16 ``[seq, kv_heads, head_dim]`` tensor.

        ``positions``: int ``[seq]``, the rows' RoPE positions, strictly increasing in
        ``[0, 2**31)`` (None: ``0..seq-1``); used by RoPE matching only. Raises ``TypeError`` for a
        dtype other than float16, ``ValueError`` for another rank, bad positions or more than
        ``MAX_CHANNELS`` channels.
        """
        return self.encode_many([tensor], None if positions is None else [positions])[0]

    def encode_many(self, tensors: list[np.ndarray],
                    positions: list[np.ndarray | None] | None = None) -> list[bytes]:
        """:meth:`encode` for each tensor (``positions``: one entry per tensor, or None)."""
        if positions is not None and len(positions) != len(tensors):
            raise ValueError(f"got {len(positions)} positions arrays for {len(tensors)} tensors")
        words = [as_fp16_words(t) for t in tensors]
        for w in words:
            if w.shape[1] * w.shape[2] > MAX_CHANNELS or w.shape[1] > 0xFFFF or w.shape[2] > 0xFFFF:
                raise ValueError(f"the ratio profile takes kv_heads, head_dim < 65536 and at most {MAX_CHANNELS} "
                                 f"channels a row, got shape {w.shape}")
            if w.shape[0] > 0xFFFFFFFF:
                raise ValueError(f"seq {w.shape[0]} does not fit the blob's u32 field")
        rel = [_relative_positions(p, w.shape[0]) for w, p in zip(words, positions or [None] * len(words))]
        blobs = [self._encode_v2(w, r) for w, r in zip(words, rel)]
        if self._fast is None:
            return blobs
        fallback = self._fast.encode_many([w.view("<f2") for w in words])
        return [b if len(b) < len(f) else f for b, f in zip(blobs, fallback)]

    def _encode_v2(self, words: np.ndarray, rel: np.ndarray | None) -> bytes:
        seq, heads, dim = words.shape
        rope = self.rope if self.rope is not None and dim % 2 == 0 and dim > 0 else None
        flags = 0
        extra = b""
        if rope is not None:
            flags |= _ROPE
            extra += _ROPE_BLOCK.pack(float(rope.theta), _LAYOUTS.index(rope.layout))
            if rel is not None:
                flags |= _POSITIONS
                listed = b"".join(varint(gap) for gap in (np.diff(rel) - 1).tolist())
                extra += _U32.pack(len(listed)) + listed
        if seq * heads * dim:
            stream, lo, *_ = _ratiocore.encode(words, seq, heads, dim, rope is not None,
                                               float(rope.theta) if rope else 0.0,
                                               rope is not None and rope.layout == "interleaved",
                                               rel if rope is not None else None)
        else:
            stream, lo = b"", b""
        head = _FIXED.pack(MAGIC, VERSION, DTYPE_FP16, MODEL_ID, flags, seq, heads, dim, len(stream),
                           tensor_check(words)) + extra
        return b"".join((head, _U32.pack(check32(head, stream, lo)), stream, lo))


def _relative_positions(positions: np.ndarray | None, seq: int) -> np.ndarray | None:
    """``positions - positions[0]`` as int64, or None when they are consecutive (or absent)."""
    if positions is None:
        return None
    arr = np.asarray(positions)
    if arr.ndim != 1 or arr.shape[0] != seq:
        raise ValueError(f"positions must be a 1-D array of length seq={seq}, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"positions must be integers, got dtype {arr.dtype}")
    if seq == 0:
        return None
    if int(arr.min()) < 0 or int(arr.max()) > MAX_POSITION:
        raise ValueError(f"positions must lie in [0, {MAX_POSITION}], got {int(arr.min())}..{int(arr.max())}")
    rel = arr.astype(np.int64) - int(arr[0])
    steps = np.diff(rel)
    if steps.size and int(steps.min()) < 1:
        raise ValueError("positions must be strictly increasing")
    return None if not steps.size or int(steps.max()) == 1 else rel


def _parse_varints(data: memoryview, count: int, where: str) -> np.ndarray:
    """``count`` LEB128 values filling ``data`` exactly, each below 2**31, as cumulative positions."""
    rel = np.zeros(count + 1, dtype=np.int64)
    at, total = 0, 0
    for i in range(count):
        value, at = read_varint(data, at, f"{where}positions block: gap {i} of {count}: ", "gap")
        total += value + 1
        if total > MAX_POSITION:
            raise CodecError(f"{where}positions block: positions span over {MAX_POSITION}")
        rel[i + 1] = total
    if at != len(data):
        raise CodecError(f"{where}positions block has {len(data) - at} trailing bytes")
    return rel


def decode(blob: bytes | bytearray | memoryview, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> np.ndarray:
    """The exact fp16 ``[seq, kv_heads, head_dim]`` tensor of a version-2 blob.

    Raises :class:`CodecError` for anything malformed, truncated or tampered with, or a tensor over
    ``max_output_bytes`` (checked before anything is allocated).
    """
    return decode_with_info([blob], max_output_bytes=max_output_bytes)[0][0]


def decode_many(blobs: list[bytes | bytearray | memoryview], *,
                max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[np.ndarray]:
    """:func:`decode` for several blobs; the error names the first bad blob."""
    return [tensor for tensor, _ in decode_with_info(blobs, max_output_bytes=max_output_bytes)]


def decode_with_info(blobs: list[bytes | bytearray | memoryview], *,
                     max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[tuple[np.ndarray, RatioBlobInfo]]:
    """Each blob's tensor with its :class:`RatioBlobInfo`."""
    out = []
    for i, blob in enumerate(blobs):
        where = f"blob {i}: " if len(blobs) > 1 else ""
        view = memoryview(blob).cast("B")
        info, rel = _parse(view, where, max_output_bytes)
        out.append((_decode_parsed(view, info, rel, where), info))
    return out


def inspect(blob: bytes | bytearray | memoryview, *,
            max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> RatioBlobInfo:
    """Parse and validate a version-2 blob (checks included) without decoding its stream; a tensor over
    ``max_output_bytes`` is refused as :func:`decode` refuses it."""
    return _parse(memoryview(blob).cast("B"), "", max_output_bytes)[0]


def _parse(view: memoryview, where: str, max_output_bytes: int | None) -> tuple[RatioBlobInfo, np.ndarray | None]:
    if len(view) < _FIXED.size + 4:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a version-2 header needs at least "
                         f"{_FIXED.size + 4}")
    magic, version, dtype, model, flags, seq, heads, dim, stream_len, check = _FIXED.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"{where}not an h2o-fp16-predictive blob: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"{where}blob format version {version}, this decoder reads version {VERSION}")
    if dtype != DTYPE_FP16:
        raise CodecError(f"{where}bad header: dtype {dtype}, expected {DTYPE_FP16} (fp16)")
    if model != MODEL_ID:
        raise CodecError(f"{where}bad header: model id {model}, this build knows {MODEL_ID}")
    if flags & ~(_ROPE | _POSITIONS) or (flags & _POSITIONS and not flags & _ROPE):
        raise CodecError(f"{where}bad header: flags {flags:#04x}")
    at = _FIXED.size
    rope = None
    if flags & _ROPE:
        if len(view) < at + _ROPE_BLOCK.size + 4:
            raise CodecError(f"{where}blob truncated inside the RoPE block")
        theta, layout = _ROPE_BLOCK.unpack_from(view, at)
        at += _ROPE_BLOCK.size
        if not (1.0 < theta < math.inf) or layout >= len(_LAYOUTS) or dim % 2 or dim == 0:
            raise CodecError(f"{where}bad RoPE block: theta {theta!r}, layout {layout}, head_dim {dim}")
        rope = RopeSpec(theta, _LAYOUTS[layout])
    gaps = None
    if flags & _POSITIONS:
        if len(view) < at + 4:
            raise CodecError(f"{where}blob truncated inside the positions block")
        (glen,) = _U32.unpack_from(view, at)
        at += 4
        if seq < 2 or glen > len(view) - at - 4 or glen < seq - 1:  # seq - 1 varints, a byte at least each
            raise CodecError(f"{where}bad positions block: {glen} bytes for seq {seq} in a {len(view)}-byte blob")
        gaps = view[at:at + glen]
        at += glen
    header_bytes = at + 4
    if len(view) < header_bytes:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, its header declares {header_bytes}")
    payload = len(view) - header_bytes
    if stream_len > payload:
        raise CodecError(f"{where}blob truncated: the stream declares {stream_len} bytes, {payload} follow the header")
    if check32(view[:at], view[header_bytes:]) != _U32.unpack_from(view, at)[0]:
        raise CodecError(f"{where}blob check mismatch: the blob was altered")
    chans, lo_len = heads * dim, payload - stream_len
    raw_bytes = 2 * seq * chans
    if max_output_bytes is not None and raw_bytes > max_output_bytes:
        raise CodecError(f"{where}declares a {raw_bytes}-byte tensor {[seq, heads, dim]}, "
                         f"over max_output_bytes={max_output_bytes}")
    if chans > MAX_CHANNELS:
        raise CodecError(f"{where}bad header: {chans} channels a row, the ratio profile takes at most {MAX_CHANNELS}")
    if seq * chans == 0:
        if payload:
            raise CodecError(f"{where}empty tensor {[seq, heads, dim]} with {payload} payload bytes")
        literal = 0
    else:
        literal = lo_len // chans
        # row 0 is literal; a matched row t >= 2 costs at least one equiprobable bit of the stream; each of the
        # two coders flushes at least 4 bytes
        if lo_len % chans or not 1 <= literal <= seq or seq > literal + 8 * (stream_len + 8) + 2 or stream_len < 8:
            raise CodecError(f"{where}payload sizes (stream {stream_len}, lo {lo_len} bytes) cannot hold a "
                             f"{[seq, heads, dim]} tensor")
    rel = _parse_varints(gaps, seq - 1, where) if gaps is not None else None
    info = RatioBlobInfo(VERSION, (seq, heads, dim), check, header_bytes, payload, stream_len, literal, rope,
                         gaps is not None)
    return info, rel


def _decode_parsed(view: memoryview, info: RatioBlobInfo, rel: np.ndarray | None, where: str) -> np.ndarray:
    seq, heads, dim = info.shape
    words = np.empty(info.shape, dtype="<u2")
    if words.size:
        start = info.header_bytes
        stream = view[start:start + info.stream_bytes]
        lo = view[start + info.stream_bytes:]
        rope = info.rope
        try:
            _ratiocore.decode(stream, lo, seq, heads, dim, rope is not None, rope.theta if rope else 0.0,
                              rope is not None and rope.layout == "interleaved", rel, words)
        except ValueError as exc:
            raise CodecError(f"{where}corrupt ratio-profile payload: {exc}") from None
    if tensor_check(words) != info.check:
        raise CodecError(f"{where}decoded tensor fails the blob's tensor check: the payload was altered")
    return words.view("<f2")
