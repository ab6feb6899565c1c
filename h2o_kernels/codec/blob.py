"""What every blob of the codec shares, whatever its profile: the magic, the version byte that picks
the decoder, the error type and the XXH3-based checks.

Every blob starts with ``b"H2KV"`` then one version byte: 3 is the fast profile (:mod:`h2o_kernels.codec.fp16`;
1 its first format, still read), 2 the ratio profile (:mod:`h2o_kernels.codec.ratio`).
"""

from __future__ import annotations

import struct

import numpy as np
import xxhash

MAGIC = b"H2KV"
DTYPE_FP16 = 1
DEFAULT_MAX_OUTPUT_BYTES = 1 << 31


class CodecError(ValueError):
    """A blob is malformed, truncated, tampered with, or would decode to something else."""


class TensorSize:
    """What every blob-info dataclass derives from its ``shape`` ``(seq, kv_heads, head_dim)``."""

    shape: tuple[int, int, int]

    @property
    def raw_bytes(self) -> int:
        """Size of the fp16 tensor the blob decodes to."""
        seq, heads, dim = self.shape
        return 2 * seq * heads * dim


def blob_version(blob: bytes | bytearray | memoryview, where: str = "") -> int:
    """The format version byte of a blob (which decoder reads it); :class:`CodecError` if it has none."""
    view = memoryview(blob).cast("B")
    if len(view) < 5:
        raise CodecError(f"{where}blob truncated: {len(view)} bytes, a header needs at least 5")
    if bytes(view[:4]) != MAGIC:
        raise CodecError(f"{where}not an h2o-fp16-predictive blob: magic {bytes(view[:4])!r}, expected {MAGIC!r}")
    return view[4]


def varint(value: int) -> bytes:
    """``value`` (0 <= value < 2**32) as a minimal unsigned LEB128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(view: memoryview, at: int, where: str, name: str) -> tuple[int, int]:
    """The minimal unsigned LEB128 varint (< 2**32) at ``at`` in ``view`` and the offset after it;
    :class:`CodecError` naming ``name`` for one that is truncated, longer than 5 bytes or not minimal."""
    value = shift = 0
    while True:
        if at >= len(view):
            raise CodecError(f"{where}blob truncated inside the {name} field")
        byte = view[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 28:
            raise CodecError(f"{where}bad field: the {name} varint is longer than 5 bytes")
    if (byte == 0 and shift) or value >> 32:
        raise CodecError(f"{where}bad field: {name} is not a minimal varint below 2**32")
    return value, at


def tensor_check(words: np.ndarray) -> int:
    """The tensor check: XXH3-64 of a tensor's shape (3 x u32 little-endian) and its little-endian
    bytes, low 32 bits."""
    return check32(struct.pack("<III", *words.shape), words)


def check32(*parts: bytes | memoryview | np.ndarray) -> int:
    """Low 32 bits of XXH3-64 over the concatenated parts."""
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return digest.intdigest() & 0xFFFFFFFF


def as_fp16_words(tensor: np.ndarray) -> np.ndarray:
    """``tensor`` (float16 ``[seq, kv_heads, head_dim]``) as contiguous little-endian ``uint16`` words.

    Raises ``TypeError`` for another dtype (no silent lossy cast) and ``ValueError`` for another rank.
    """
    arr = np.asarray(tensor)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 2:
        raise TypeError(f"the fp16 codec takes float16 input, got {arr.dtype}; convert explicitly, "
                        f"e.g. tensor.astype(np.float16), if a lossy cast is what you want")
    if arr.ndim != 3:
        raise ValueError(f"expected a [seq, kv_heads, head_dim] tensor, got shape {arr.shape}")
    return np.ascontiguousarray(arr.astype("<f2", copy=False)).view("<u2")
