"""Fast estimates that steer the fp16 codec: each block's predictor, and hi-plane channel centering.

Both look at a few sampled rows per block instead of compressing candidates. zstd codes one plane
as one frame with one set of Huffman tables, and codes rows it has seen before as matches; the
estimates model both: a predictor plan is costed by the entropy of the *mixture* of its blocks'
histograms, and a sampled row repeating an earlier row of its plane is free for ``raw`` (and is
left out when judging centering).
"""

from __future__ import annotations

import functools

import numpy as np

from h2o_kernels.codec.predictors import FORWARD


def predictor_plan(planes: np.ndarray, fingerprints: np.ndarray, candidates: tuple[str, ...], block_seq: int,
                   rows_per_block: int, margin: np.ndarray) -> np.ndarray:
    """Index into ``candidates`` per plane and block (``[planes, blocks]``).

    ``planes`` is ``uint8 [planes, seq, heads, dim]`` with its :func:`row_fingerprints`. A plan other
    than all-``raw`` must look ``margin`` (per plane) cheaper than all-``raw`` to be taken.
    """
    hist = _histograms(planes, fingerprints, candidates, block_seq, rows_per_block, per_block=True)
    not_raw = np.array([name != "raw" for name in candidates])
    factor = 1 + np.outer(margin, not_raw)  # [planes, candidates]
    # Per block: entropy with the Miller-Madow correction (few samples under-count the support).
    support = np.count_nonzero(hist, axis=3) - 1
    per_block = (entropy_bits(hist) + support / (2 * np.log(2))) * factor[..., None]
    mixed = np.argmin(per_block, axis=1)  # [planes, blocks]
    mixed_hist = np.take_along_axis(hist, mixed[:, None, :, None], axis=1)[:, 0].sum(axis=1)
    mixed_cost = entropy_bits(mixed_hist) * (1 + margin * not_raw[mixed].any(axis=1))
    uniform_cost = entropy_bits(hist.sum(axis=2)) * factor  # [planes, candidates]
    best_uniform = np.argmin(uniform_cost, axis=1)
    use_mixed = mixed_cost < uniform_cost[np.arange(len(planes)), best_uniform]
    return np.where(use_mixed[:, None], mixed, best_uniform[:, None])


def worth_planning(planes: np.ndarray, fingerprints: np.ndarray, candidates: tuple[str, ...], block_seq: int,
                   margin: np.ndarray) -> np.ndarray:
    """``bool [planes]``: a cheap screen (one row per block, whole-plane histograms) for planes where
    some predictor other than ``raw`` looks ``margin`` cheaper; only those need :func:`predictor_plan`."""
    hist = _histograms(planes, fingerprints, candidates, block_seq, 1, per_block=False)  # [p, c, 1, 256]
    cost = entropy_bits(hist[:, :, 0])
    raw = cost[:, candidates.index("raw")]
    return (cost * (1 + margin[:, None]) < raw[:, None]).any(axis=1)


def _histograms(planes: np.ndarray, fingerprints: np.ndarray, candidates: tuple[str, ...], block_seq: int,
                rows_per_block: int, per_block: bool) -> np.ndarray:
    """Byte histograms of each candidate's output on sampled rows: ``[planes, candidates, blocks, 256]``
    (one block when not ``per_block``). Sampled rows repeating an earlier row count as 0 for raw."""
    n_planes, seq = planes.shape[:2]
    rows, prev_rows, first = sample_rows(seq, block_seq, rows_per_block)
    sample = planes[:, np.concatenate([rows, prev_rows])]
    cur, prev = sample[:, :len(rows)], sample[:, len(rows):]
    prev[:, first] = 0  # a block's first row has no predecessor
    offsets = _bin_offsets(n_planes, len(candidates), seq, block_seq, rows_per_block, per_block)
    codes = np.empty((n_planes, len(candidates), *cur.shape[1:]), dtype=offsets.dtype)
    pair_cur = FORWARD["pair_delta"](cur) if any(c.startswith("pair") for c in candidates) else None
    for i, name in enumerate(candidates):
        if name == "raw":
            codes[:, i] = cur
            codes[:, i][repeated_rows(fingerprints, rows)] = 0
        elif name == "delta_seq":
            codes[:, i] = cur - prev
        elif name == "xor_seq":
            codes[:, i] = cur ^ prev
        elif name == "pair_delta":
            codes[:, i] = pair_cur
        else:
            codes[:, i] = pair_cur - FORWARD["pair_delta"](prev)
    codes += offsets
    blocks = -(-seq // block_seq) if per_block else 1
    hist = np.bincount(codes.ravel(), minlength=n_planes * len(candidates) * blocks * 256)
    return hist.reshape(n_planes, len(candidates), blocks, 256)


def centering_pays(hi: np.ndarray, fingerprints: np.ndarray, rotated_sample: np.ndarray, rows: np.ndarray,
                   margin: float) -> np.ndarray:
    """``bool [n]``: whether channel centering is estimated to shrink each hi plane.

    ``hi`` is ``uint8 [n, seq, heads, dim]`` with its :func:`row_fingerprints`, ``rotated_sample``
    the rotated bytes of its sampled ``rows``. The saving on rows zstd must code as literals has to
    exceed the reference row it costs (8 bits a channel) plus ``margin`` of the plane's estimated size.
    """
    n, seq = hi.shape[:2]
    channels = rotated_sample[0, 0].size
    literal = ~repeated_rows(fingerprints, rows)  # [n, rows]
    reference = np.rint(rotated_sample.mean(axis=1, dtype=np.float32)).astype(np.uint8)
    both = np.stack([hi[:, rows], rotated_sample - reference[:, None]], axis=1)  # [n, 2, rows, ...]
    dtype = np.uint16 if 2 * n < 256 else np.uint32
    codes = both.astype(dtype)
    codes += (np.arange(2 * n, dtype=dtype) << 8).reshape(n, 2, 1, 1, 1)
    codes[np.broadcast_to(~literal[:, None], (n, 2, len(rows)))] = 2 * n * 256  # repeated rows: discarded bin
    hist = np.bincount(codes.ravel(), minlength=2 * n * 256 + 1)[:-1].reshape(n, 2, 256)
    bits = entropy_bits(hist)  # [n, 2]: as is, centered
    sampled = literal.sum(axis=1) * channels
    literal_bytes = literal.mean(axis=1) * seq * channels
    per_byte = np.divide(bits, np.maximum(sampled, 1)[:, None])
    saving = (per_byte[:, 0] - per_byte[:, 1]) * literal_bytes
    return (sampled > 0) & (saving > 8 * channels + margin * per_byte[:, 0] * literal_bytes)


def row_fingerprints(planes: np.ndarray) -> np.ndarray:
    """``float32 [planes, seq]``: a fingerprint of every row of ``planes`` (``[planes, seq, ...]``):
    up to 16 spread-out bytes dotted with fixed random weights. Equal rows give equal fingerprints; a
    rare false match only skews an estimate, never the coding."""
    flat = planes.reshape(*planes.shape[:2], int(np.prod(planes.shape[2:])))
    if flat.shape[2] == 0:
        return np.zeros(planes.shape[:2], dtype=np.float32)
    cols = _fingerprint_columns(flat.shape[2])
    return flat[..., cols].astype(np.float32) @ _FINGERPRINT_WEIGHTS[:len(cols)]


def repeated_rows(fingerprints: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``bool [planes, len(rows)]``: whether each sampled row repeats an earlier row of its plane."""
    seq = fingerprints.shape[1]
    same = fingerprints[:, rows, None] == fingerprints[:, None, :]  # [planes, rows, seq]
    return (same & (np.arange(seq) < rows[:, None])).any(axis=2)


def entropy_bits(hist: np.ndarray) -> np.ndarray:
    """Order-0 coded size in bits of integer histograms along the last axis (``N log N - sum c log c``)."""
    total = hist.sum(axis=-1)
    table = _plogp(int(total.max(initial=0)))
    return table[total] - table[hist].sum(axis=-1)


@functools.lru_cache(maxsize=8)
def _plogp_table(size: int) -> np.ndarray:
    counts = np.arange(size, dtype=np.float64)
    counts[0] = 1.0
    return counts * np.log2(counts)


def _plogp(limit: int) -> np.ndarray:
    """``c log2 c`` for counts up to at least ``limit`` (tables come in powers of two, cached)."""
    return _plogp_table(1 << max(limit, 1).bit_length())


@functools.lru_cache(maxsize=64)
def sample_rows(seq: int, block_seq: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled rows (``count`` per block), their predecessors, and which sit at a block's first row."""
    rows = np.concatenate([s + _block_sample(min(block_seq, seq - s), count) for s in range(0, seq, block_seq)])
    first = (rows % block_seq) == 0
    return rows, np.where(first, rows, rows - 1), first


def _block_sample(n: int, count: int) -> np.ndarray:
    """Up to ``count`` row offsets spread over an ``n``-row block (from row 1 where there is one)."""
    return np.unique(np.linspace(min(1, n - 1), n - 1, min(n, count)).astype(np.intp))


@functools.lru_cache(maxsize=64)
def _bin_offsets(n_planes: int, n_cand: int, seq: int, block_seq: int, count: int, per_block: bool) -> np.ndarray:
    """Per sampled row, the histogram offset of its (plane, candidate[, block]): ``[p, c, rows, 1, 1]``."""
    block_of = sample_rows(seq, block_seq, count)[0] // block_seq if per_block else 0
    blocks = -(-seq // block_seq) if per_block else 1
    plane_cand = np.arange(n_planes * n_cand).reshape(n_planes, n_cand, 1) * blocks
    dtype = np.uint16 if n_planes * n_cand * blocks <= 256 else np.uint32
    return ((plane_cand + block_of) << 8).astype(dtype)[..., None, None]


@functools.lru_cache(maxsize=16)
def _fingerprint_columns(width: int) -> np.ndarray:
    return np.unique(np.linspace(0, width - 1, min(16, width)).astype(np.intp))


_FINGERPRINT_WEIGHTS = (np.random.default_rng(0x4832).random(16) + 0.5).astype(np.float32)
