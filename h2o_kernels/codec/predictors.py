"""Byte-plane predictors of the fp16 KV codec, vectorised over blocks (numpy reference of the C kernel
:mod:`h2o_kernels.codec._fastcore`, which applies and inverts them when coding; used by the exhaustive choice).

Every function takes a ``uint8`` array shaped ``[..., rows, kv_heads, head_dim]`` (rows run along the
token axis inside one block; leading axes index planes and blocks) and returns a new array of the
same shape; arithmetic is mod 256.

- ``raw``: identity.
- ``delta_seq`` / ``xor_seq``: each row minus (xor) the previous row of the same block; the first
  row of a block is kept.
- ``pair_delta``: odd dims minus their even neighbour inside the same head (an odd ``head_dim``
  leaves its last dim as is).
- ``pair_delta_delta_seq``: ``pair_delta`` then ``delta_seq``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

PREDICTORS: tuple[str, ...] = ("raw", "delta_seq", "xor_seq", "pair_delta", "pair_delta_delta_seq")
PREDICTOR_IDS: dict[str, int] = {name: i for i, name in enumerate(PREDICTORS)}
K_DEFAULT: tuple[str, ...] = PREDICTORS
V_DEFAULT: tuple[str, ...] = ("raw", "delta_seq", "xor_seq")

Transform = Callable[[np.ndarray], np.ndarray]


def parse_predictors(text: str | tuple[str, ...] | list[str], what: str = "predictors") -> tuple[str, ...]:
    """Parse ``"raw,delta_seq"`` (or a sequence) into a de-duplicated tuple; reject unknown names."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in parts:
        name = part.strip()
        if not name:
            continue
        if name not in PREDICTOR_IDS:
            raise ValueError(f"{what}: unknown predictor {name!r}; expected some of {', '.join(PREDICTORS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"{what}: the predictor list is empty; expected some of {', '.join(PREDICTORS)}")
    return tuple(names)


def _delta_seq(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    np.subtract(x[..., 1:, :, :], x[..., :-1, :, :], out=y[..., 1:, :, :])
    return y


def _xor_seq(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    np.bitwise_xor(x[..., 1:, :, :], x[..., :-1, :, :], out=y[..., 1:, :, :])
    return y


def _pair_delta(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    odd = x.shape[-1] // 2
    np.subtract(x[..., 1::2], x[..., 0:2 * odd:2], out=y[..., 1::2])
    return y


FORWARD: dict[str, Transform] = {
    "raw": lambda x: x,
    "delta_seq": _delta_seq,
    "xor_seq": _xor_seq,
    "pair_delta": _pair_delta,
    "pair_delta_delta_seq": lambda x: _delta_seq(_pair_delta(x)),
}
