"""The codec's two profiles behind one door: build an encoder by profile, decode any blob.

``fast`` (blob version 3; version 1 still read; :mod:`h2o_kernels.codec.fp16`): byte planes, per-block
predictors and zstd; hundreds of MB/s, what the runtime uses by default. ``ratio`` (blob version 2,
:mod:`h2o_kernels.codec.ratio`): a per-channel context model of the hi byte with a range coder and
row matching (RoPE-aware for K); a higher ratio at tens of MB/s. Decoding never needs the profile:
the blob's version byte picks the decoder.
"""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

from h2o_kernels import PROFILE_VERSIONS
from h2o_kernels.codec.blob import DEFAULT_MAX_OUTPUT_BYTES, CodecError, blob_version
from h2o_kernels.codec.fp16 import FP16Codec
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT
from h2o_kernels.codec.rope import RopeSpec

Profile = Literal["fast", "ratio"]
PROFILES: tuple[Profile, ...] = ("fast", "ratio")
VERSIONS: dict[str, int] = PROFILE_VERSIONS  # the blob format version each profile writes


class Encoder(Protocol):
    """What both profiles' encoders do (one instance per thread: they are not thread-safe)."""

    def encode(self, tensor: np.ndarray, positions: np.ndarray | None = None) -> bytes:
        """One blob for one tensor (see :meth:`encode_many`)."""
        ...

    def encode_many(self, tensors: list[np.ndarray],
                    positions: list[np.ndarray | None] | None = None) -> list[bytes]:
        """One blob per fp16 ``[seq, kv_heads, head_dim]`` tensor; ``positions`` (int ``[seq]`` per
        tensor, or None for ``0..seq-1``) are the rows' RoPE positions, used by the ratio profile's K
        matching only."""
        ...


def make_codec(profile: str, kind: Literal["k", "v"], *, hi_predictors: str | tuple[str, ...] | None = None,
               lo_predictors: str | tuple[str, ...] | None = None, rope: RopeSpec | None = None) -> Encoder:
    """An encoder of ``profile`` for K (``kind="k"``) or V tensors.

    The predictor sets apply to the fast profile (default: the kind's defaults, as the original's
    ``kv_lossless_predictors_k/_v``); ``rope`` (K only) lets the ratio profile match K rows through RoPE (the
    fast profile has no use for it). Raises ``ValueError`` naming the choices for an unknown profile or kind,
    and for a ``rope`` given with V (V carries no RoPE).
    """
    if kind not in ("k", "v"):
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    if rope is not None and kind != "k":
        raise ValueError("rope applies to K only: V rows carry no rotary position embedding")
    default = K_DEFAULT if kind == "k" else V_DEFAULT
    if profile == "fast":
        return FP16Codec(hi_predictors or default, lo_predictors or default)
    if profile == "ratio":
        from h2o_kernels.codec.ratio import RatioCodec

        return RatioCodec(kind, rope=rope)
    raise ValueError(f"unknown codec profile {profile!r}; choose one of {', '.join(PROFILES)}")


def decode(blob: bytes | bytearray | memoryview, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> np.ndarray:
    """The exact fp16 tensor of a blob of either profile; :class:`CodecError` on any defect."""
    return _module(blob_version(blob)).decode(blob, max_output_bytes=max_output_bytes)


def decode_many(blobs: list[bytes | bytearray | memoryview], *,
                max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[np.ndarray]:
    """:func:`decode` for several blobs (profiles may be mixed); the error names the first bad blob."""
    return [tensor for tensor, _ in decode_with_info(blobs, max_output_bytes=max_output_bytes)]


def decode_with_info(blobs: list[bytes | bytearray | memoryview], *,
                     max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> list[tuple[np.ndarray, object]]:
    """Each blob's tensor with what :func:`inspect` says of it (a ``fp16.BlobInfo`` for versions 1 and 3, a
    ``ratio.RatioBlobInfo`` for version 2); the error names the first bad blob by its place in ``blobs``."""
    out = []
    for i, blob in enumerate(blobs):
        where = f"blob {i}: " if len(blobs) > 1 else ""
        try:
            [item] = _module(blob_version(blob)).decode_with_info([blob], max_output_bytes=max_output_bytes)
        except CodecError as exc:
            raise CodecError(f"{where}{exc}") from None
        out.append(item)
    return out


def inspect(blob: bytes | bytearray | memoryview, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> object:
    """Parse and validate a blob of either profile without decoding its payloads (a tensor over
    ``max_output_bytes`` is refused, as :func:`decode` refuses it)."""
    return _module(blob_version(blob)).inspect(blob, max_output_bytes=max_output_bytes)


def _module(version: int):
    if version in (1, VERSIONS["fast"]):  # version 1: the fast profile's first format, still read
        from h2o_kernels.codec import fp16

        return fp16
    if version == VERSIONS["ratio"]:
        from h2o_kernels.codec import ratio

        return ratio
    raise CodecError(f"unsupported blob format version {version}; this build reads "
                     f"{', '.join(f'{v} ({p})' for p, v in {'fast': 1, **VERSIONS}.items())}")
