"""The fp16 predictive lossless KV codec and its self-describing blob format.

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
entropy estimate on sampled rows (``choose="estimate"``) or by compressing every candidate
(``choose="exhaustive"``). Before that the hi plane may be channel-centered (see
:meth:`FP16Codec._center_hi`; its per-channel reference row then leads the plane's data). The
transformed plane goes into one zstd frame, or is stored as is when zstd does not shrink it.
:func:`decode` needs nothing but the blob, returns the exact input bits, and raises
:class:`CodecError` for anything malformed, truncated or tampered with.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np
import zstandard

from h2o_kernels import CODEC_NAME, FORMAT_VERSION  # the blob format's name and version (re-exported)
from h2o_kernels.codec.blob import (  # noqa: F401 (CodecError, MAGIC re-exported)
    DEFAULT_MAX_OUTPUT_BYTES,
    DTYPE_FP16,
    MAGIC,
    CodecError,
    as_fp16_words,
    check32,
    tensor_check,
)
from h2o_kernels.codec.estimate import centering_pays, predictor_plan, row_fingerprints, sample_rows, worth_planning
from h2o_kernels.codec.predictors import (
    FORWARD,
    INVERSE,
    K_DEFAULT,
    PREDICTOR_IDS,
    PREDICTORS,
    Transform,
    parse_predictors,
)

ZSTD, _CENTERED = 1, 2  # flag bits of a plane's stage byte
# A zstd block of at most 128 KiB never codes to fewer than 4 bytes, so no valid frame expands more.
_ZSTD_MAX_EXPANSION = 1 << 15
_FIXED = struct.Struct("<4sBBBBIIIII")
_PLANE = struct.Struct("<BI")
_CHECK = struct.Struct("<I")
_PLANES = ("hi", "lo")
# Estimator sampling per plane kind: rows per block, and how much better than raw a predictor must
# look to be chosen (the estimates are noisy). Hi planes carry the structure; lo planes are mantissa
# noise unless a predictor wins outright.
_SAMPLING = ((4, 0.02), (2, 0.10))
_CENTER_MARGIN = 0.02
_BATCH_BYTES = 1 << 20

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
        words = [as_fp16_words(t) for t in tensors]
        blobs: list[bytes] = [b""] * len(words)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(words):
            by_shape.setdefault(w.shape, []).append(i)
        for shape, indices in by_shape.items():
            for part in _batches(indices, shape):
                for i, blob in zip(part, self._encode_batch([words[i] for i in part])):
                    blobs[i] = blob
        return blobs

    def _encode_batch(self, words: list[np.ndarray]) -> list[bytes]:
        """Blobs for same-shaped uint16 tensors ``[seq, heads, dim]``."""
        n, (seq, heads, dim) = len(words), words[0].shape
        planes = np.empty((2, n, seq, heads, dim), dtype=np.uint8)  # hi planes, then lo planes
        for t, tensor in enumerate(words):
            np.right_shift(tensor, 8, out=planes[0, t], casting="unsafe")
            planes[1, t] = tensor
        fingerprints = row_fingerprints(planes.reshape(2 * n, seq, heads, dim)).reshape(2, n, seq)
        references = self._center_hi(planes[0], fingerprints[0]) if self.center else [None] * n
        ids = self._choose(planes, fingerprints)
        flat_ids = ids.reshape(2 * n, -1)
        coded = _apply(planes.reshape(2 * n, seq, heads, dim), flat_ids, self.block_seq, FORWARD).reshape(planes.shape)
        blobs = []
        for t in range(n):
            header = [_FIXED.pack(MAGIC, FORMAT_VERSION, DTYPE_FP16, len(_PLANES), 0, seq, heads, dim,
                                  self.block_seq, tensor_check(words[t]))]
            payloads = []
            for kind in range(len(_PLANES)):
                prefix = references[t] if kind == 0 else None
                stage, payload = self._frame(coded[kind, t], prefix)
                if ids[kind, t].any() and self._raw_allowed[kind]:  # estimates chose them: keep them if zstd agrees
                    raw_stage, raw_payload = self._frame(planes[kind, t], prefix)
                    if len(raw_payload) <= len(payload):
                        stage, payload, ids[kind, t] = raw_stage, raw_payload, 0
                header.append(_PLANE.pack((_CENTERED if prefix is not None else 0) | stage, len(payload)))
                payloads.append(payload)
            head = b"".join(header) + ids[:, t].tobytes()
            blobs.append(b"".join([head, _CHECK.pack(check32(head, *payloads)), *payloads]))
        return blobs

    def _frame(self, plane: np.ndarray, prefix: np.ndarray | None) -> tuple[int, bytes | memoryview]:
        """``(ZSTD, frame)`` for ``prefix + plane``, or ``(0, its bytes)`` where zstd does not shrink it."""
        data = plane.ravel() if prefix is None else np.concatenate([prefix.ravel(), plane.ravel()])
        frame = self.zstd.compress(data)
        return (ZSTD, frame) if len(frame) < data.nbytes else (0, memoryview(data))

    def _center_hi(self, hi: np.ndarray, fingerprints: np.ndarray) -> list[np.ndarray | None]:
        """Channel-center the hi planes (``[n, seq, heads, dim]``, rows fingerprinted) in place where
        the estimate says it pays; return each tensor's reference row (``[heads, dim]``), or None
        where it was not centered.

        The hi byte (sign, exponent, top mantissa bits) is rotated left by one bit so that +x and -x
        sit next to each other, then each channel's rounded mean over the tensor is subtracted:
        order-0 coding then sees one distribution instead of a mixture of per-channel ones.
        """
        n, seq = hi.shape[:2]
        if seq < 2 or hi[0, 0].size == 0:
            return [None] * n
        rows = sample_rows(seq, self.block_seq, _SAMPLING[0][0])[0]
        pays = np.flatnonzero(centering_pays(hi, fingerprints, _rotl(hi[:, rows]), rows, _CENTER_MARGIN))
        if len(pays) == 0:
            return [None] * n
        chosen = hi[pays] if len(pays) < n else hi  # rotate in place, then subtract the means
        low_bit = chosen >> 7
        chosen <<= 1
        chosen |= low_bit
        sums = np.add.reduce(chosen, axis=1, dtype=np.uint16 if seq <= 257 else np.uint32)
        reference = ((sums + seq // 2) // seq).astype(np.uint8)
        chosen -= reference[:, None]
        if len(pays) < n:
            hi[pays] = chosen
        references: list[np.ndarray | None] = [None] * n
        for i, t in enumerate(pays):
            references[t] = reference[i]
        return references

    def _choose(self, planes: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
        """Predictor id per plane kind, tensor and block: ``uint8 [2, n, blocks]``."""
        kinds, n, seq = planes.shape[:3]
        blocks = -(-seq // self.block_seq)
        if planes.size == 0:  # nothing to estimate: each kind's first predictor
            return np.stack([np.full((n, blocks), ids[0], dtype=np.uint8) for ids in self._ids])
        if self.choose == "exhaustive":
            choice = np.array([[[np.argmin([len(self.zstd.compress(FORWARD[c](plane[b:b + self.block_seq])))
                                            for c in names]) for b in range(0, seq, self.block_seq)]
                                for plane in planes[kind]] for kind, names in enumerate(self.predictors)],
                              dtype=np.intp).reshape(kinds, n, blocks)
        else:
            choice = self._estimate_choice(planes, fingerprints)
        return np.stack([self._ids[kind][choice[kind]] for kind in range(kinds)])

    def _estimate_choice(self, planes: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
        """Index into each kind's predictor set per tensor and block: ``raw`` unless a cheap screen
        (both kinds at once where their sets agree) finds a plane worth the full estimate."""
        kinds, n, seq = planes.shape[:3]
        blocks = -(-seq // self.block_seq)
        choice = np.zeros((kinds, n, blocks), dtype=np.intp)
        margins = np.repeat([margin for _, margin in _SAMPLING], n).reshape(kinds, n)
        screened = [self._raw_allowed[kind] and len(self.predictors[kind]) > 1 for kind in range(kinds)]
        worth = np.ones((kinds, n), dtype=bool)
        if all(screened) and self.predictors[0] == self.predictors[1]:
            worth = worth_planning(planes.reshape(kinds * n, *planes.shape[2:]), fingerprints.reshape(kinds * n, -1),
                                   self.predictors[0], self.block_seq, margins.ravel()).reshape(kinds, n)
        else:
            for kind in np.flatnonzero(screened):
                worth[kind] = worth_planning(planes[kind], fingerprints[kind], self.predictors[kind], self.block_seq,
                                             margins[kind])
        for kind, names in enumerate(self.predictors):
            todo = worth[kind]
            if len(names) > 1 and todo.any():
                choice[kind][todo] = predictor_plan(planes[kind][todo], fingerprints[kind][todo], names,
                                                    self.block_seq, _SAMPLING[kind][0], margins[kind][todo])
            if self._raw_allowed[kind]:
                choice[kind][~todo] = names.index("raw")
        return choice


def _rotl(x: np.ndarray) -> np.ndarray:
    return (x << 1) | (x >> 7)


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
    return [tensor for tensor, _ in decode_with_info(blobs, max_output_bytes=max_output_bytes)]


def decode_with_info(blobs: list[bytes | bytearray | memoryview], *,
                     max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[tuple[np.ndarray, BlobInfo]]:
    """:func:`decode_many`, each tensor paired with its blob's :class:`BlobInfo` (what
    :func:`inspect` would say, without parsing the blob twice)."""
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
    out: list[tuple[np.ndarray, BlobInfo]] = [(np.empty(0), info) for _, info, _ in parsed]
    for (shape, block_seq), indices in by_layout.items():
        for part in _batches(indices, shape):
            for i, tensor in zip(part, _decode_batch([parsed[i] for i in part], shape, block_seq)):
                if tensor_check(tensor) != parsed[i][1].check:
                    raise CodecError(f"blob {i}: decoded tensor fails the blob's tensor check: the payload was altered")
                out[i] = (tensor.view("<f2"), parsed[i][1])
    return out


def _batches(indices: list[int], shape: tuple[int, ...]) -> list[list[int]]:
    """``indices`` cut into batches of about ``_BATCH_BYTES`` of tensor data: enough tensors to share
    the per-call costs, few enough that the several passes over a batch stay in cache."""
    per_batch = max(1, _BATCH_BYTES // max(1, 2 * int(np.prod(shape))))
    return [indices[i:i + per_batch] for i in range(0, len(indices), per_batch)]


def _decode_batch(items: list[tuple[memoryview, BlobInfo, np.ndarray]], shape: tuple[int, int, int],
                  block_seq: int) -> np.ndarray:
    """Decode blobs of one shape into ``uint16 [n, seq, heads, dim]`` (tensor check not yet verified)."""
    n = len(items)
    planes = np.empty((len(_PLANES), n, *shape), dtype=np.uint8)
    channels = shape[1] * shape[2]
    centered, references = [], []
    for t, (view, info, _) in enumerate(items):
        offset = info.header_bytes
        for kind, plane_info in enumerate((info.hi, info.lo)):
            extra = channels if plane_info.centered else 0
            data = _decode_plane(view[offset:offset + plane_info.payload_bytes], plane_info.entropy,
                                 extra + planes[kind, t].size)
            offset += plane_info.payload_bytes
            planes[kind, t].reshape(-1)[:] = data[extra:]
            if extra:
                centered.append(t)
                references.append(data[:extra].reshape(shape[1:]))
    ids = np.stack([item[2] for item in items], axis=1)  # [2, n, blocks]
    planes = _apply(planes.reshape(len(_PLANES) * n, *shape), ids.reshape(len(_PLANES) * n, -1), block_seq,
                    INVERSE).reshape(planes.shape)
    if centered:  # add the references back, then rotate right by one bit
        hi = planes[0] if len(centered) == n else planes[0, centered]
        hi += np.stack(references)[:, None]
        low_bit = hi << 7
        hi >>= 1
        hi |= low_bit
        if len(centered) < n:
            planes[0, centered] = hi
    words = planes[0].astype("<u2")
    words <<= 8
    words |= planes[1]
    return words


def inspect(blob: bytes | bytearray | memoryview) -> BlobInfo:
    """Parse and validate a blob (header, blob check, payload sizes) without decoding its payloads."""
    return _parse(memoryview(blob).cast("B"))[0]


def _parse(view: memoryview, where: str = "") -> tuple[BlobInfo, np.ndarray]:
    """Validate a blob's header, blob check and payload sizes (before anything is allocated for it);
    return the header with the predictor ids ``uint8 [2, blocks]``."""
    if len(view) < _FIXED.size:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least {_FIXED.size}")
    magic, version, dtype, n_planes, reserved, seq, heads, dim, block_seq, check = _FIXED.unpack_from(view)
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
    header_bytes = ids_at + len(_PLANES) * blocks + _CHECK.size
    if header_bytes > len(view):
        raise CodecError(f"{where}blob truncated: header declares {header_bytes} bytes, blob has {len(view)}")
    stages = [_PLANE.unpack_from(view, _FIXED.size + i * _PLANE.size) for i in range(len(_PLANES))]
    if header_bytes + sum(length for _, length in stages) != len(view):
        raise CodecError(f"{where}blob is {len(view)} bytes, header and payloads declare "
                         f"{header_bytes + sum(length for _, length in stages)}")
    check_at = header_bytes - _CHECK.size
    if check32(view[:check_at], view[header_bytes:]) != _CHECK.unpack_from(view, check_at)[0]:
        raise CodecError(f"{where}blob check mismatch: the blob was altered")
    raw_ids = bytes(view[ids_at:check_at])
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
                                raw_ids[i * blocks:(i + 1) * blocks]))
    info = BlobInfo(version, (seq, heads, dim), block_seq, check, header_bytes, planes[0], planes[1])
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
    """The plane bytes of a payload already checked by :func:`_check_payload` (and covered by the
    blob check, so trailing bytes after its frame cannot have been added unnoticed)."""
    if entropy == "stored":
        return np.frombuffer(payload, dtype=np.uint8)
    try:
        data = _DCTX.decompress(payload)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt zstd payload: {exc}") from None
    if len(data) != size:
        raise CodecError(f"zstd payload decoded to {len(data)} bytes, expected {size}")
    return np.frombuffer(data, dtype=np.uint8)


_DCTX = zstandard.ZstdDecompressor()
