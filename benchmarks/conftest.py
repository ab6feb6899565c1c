"""Benchmark data: realistic KV blocks, from real dumps when ``H2O_BENCH_KV_DIR`` names some.

``H2O_BENCH_KV_DIR`` may point at a directory of ``meta_*.json`` (+ K/V files) or ``.npz`` dumps, e.g.
one written by ``h2o-gate kv-dump``. Entries of one run x layer are joined along seq in ``seq_start``
order and the middle layer with enough tokens (a typical deep layer, not the atypical layer 0) gives
each block; without real data (or not enough of it) the blocks are synthetic: fp16 Gaussians with
per-channel log-normal scales.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from h2o_kernels.lossless.kvdump import DumpError, iter_dump_files, read_meta, read_npz

KV_HEADS, HEAD_DIM = 3, 64


def synthetic_block(kind: str, seq: int) -> np.ndarray:
    rng = np.random.default_rng({"K": 1, "V": 2}[kind] * 1000 + seq)
    sigma = 1.0 if kind == "K" else 0.5  # K has the stronger per-channel outliers
    scale = np.exp(rng.normal(0.0, sigma, size=(1, KV_HEADS, HEAD_DIM)))
    return (rng.normal(0.0, 1.0, size=(seq, KV_HEADS, HEAD_DIM)) * scale).astype(np.float16)


def _real_streams(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, K, V) per run x layer, entries joined along seq, fp16."""
    groups: dict[tuple, list] = defaultdict(list)
    for path in iter_dump_files(root):
        try:
            entry = read_npz(path) if path.suffix == ".npz" else read_meta(path)
            k, v = entry.load()
        except DumpError:
            continue
        groups[(entry.run_id, entry.layer_id, entry.kv_heads, entry.head_dim)].append((entry.seq_start, k, v))
    streams = []
    for (run_id, layer, _, _), parts in sorted(groups.items(), key=lambda item: (item[0][1], str(item[0][0]))):
        parts.sort(key=lambda p: p[0])
        k = np.concatenate([p[1] for p in parts]).astype(np.float16)
        v = np.concatenate([p[2] for p in parts]).astype(np.float16)
        streams.append((f"{root.name}:{run_id}:layer{layer}", k, v))
    return streams


@pytest.fixture(scope="session")
def kv_streams() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, K, V) per run x layer of the real dumps in ``H2O_BENCH_KV_DIR`` (empty without them)."""
    root = os.environ.get("H2O_BENCH_KV_DIR")
    return _real_streams(Path(root)) if root and Path(root).is_dir() else []


@pytest.fixture(scope="session")
def kv_windows(kv_streams):
    """``kv_windows(seq, "K"|"V") -> ([fp16 [seq, kv_heads, head_dim]] * many, source)``: every full
    ``seq``-token window of every layer (real), or 84 synthetic ones, as the offline evaluator codes them."""
    def get(seq: int, kind: str) -> tuple[list[np.ndarray], str]:
        windows = [np.ascontiguousarray(tensor[s:s + seq]) for _, k, v in kv_streams
                   for tensor in [k if kind == "K" else v] for s in range(0, tensor.shape[0] - seq + 1, seq)]
        if windows:
            return windows, f"{len(kv_streams)} real layer streams"
        return [synthetic_block(kind, seq + i)[:seq] for i in range(84)], "synthetic"

    return get


@pytest.fixture(scope="session")
def kv_block(kv_streams):
    """``kv_block(seq, "K"|"V") -> (fp16 [seq, kv_heads, head_dim], source)``, cached per session."""
    streams = kv_streams
    cache: dict[tuple[int, str], tuple[np.ndarray, str]] = {}

    def get(seq: int, kind: str) -> tuple[np.ndarray, str]:
        if (seq, kind) not in cache:
            cache[(seq, kind)] = (synthetic_block(kind, seq), "synthetic")
            usable = [(name, k if kind == "K" else v) for name, k, v in streams if k.shape[0] >= seq]
            if usable:
                name, tensor = usable[len(usable) // 2]
                cache[(seq, kind)] = (np.ascontiguousarray(tensor[:seq]), name)
        return cache[(seq, kind)]

    return get
