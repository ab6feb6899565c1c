"""Helpers shared by the test modules: data makers and dump writers built on public APIs only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from h2o_kernels.lossless.kvdump import write_dump


def words_of(tensor: np.ndarray) -> np.ndarray:
    """The raw little-endian bit patterns of an fp16 tensor, for bit-exact comparisons."""
    return np.ascontiguousarray(tensor, dtype="<f2").view("<u2")


def realistic_kv(rng: np.random.Generator, seq: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """fp16 Gaussian with per-channel log-normal scales, like real K/V activations."""
    scale = np.exp(rng.normal(0.0, 1.0, size=(1, kv_heads, head_dim)))
    return (rng.normal(0.0, 1.0, size=(seq, kv_heads, head_dim)) * scale).astype(np.float16)


def smooth_kv(seq: int, kv_heads: int, head_dim: int, offset: float = 0.0) -> np.ndarray:
    """A smooth ramp along seq (plus a per-channel offset): sequence predictors win on it."""
    t = np.linspace(0.0, 1.0, seq)[:, None, None]
    channel = np.arange(kv_heads * head_dim).reshape(kv_heads, head_dim) / 64.0
    return (t + channel + offset).astype(np.float16)


def write_entry(out_dir: Path, *, layer_id: int, stage: str, seq_start: int, k: np.ndarray, v: np.ndarray,
                run_id: str = "run1") -> Path:
    return write_dump(out_dir, run_id=run_id, stage=stage, layer_id=layer_id, seq_start=seq_start, k=k, v=v)


# The standard small dump of the evaluator/CLI tests: layers 0..3, a prefill entry (seq 24 + 4*layer,
# so every entry's length identifies it) and a decode entry (seq 6) per layer, K random-ish, V smooth.
LAYERS = 4
KV_HEADS = 2
HEAD_DIM = 8
DECODE_SEQ = 6


def prefill_seq(layer_id: int) -> int:
    return 24 + 4 * layer_id


def standard_tensors(layer_id: int, stage: str, dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic K/V of one entry of the standard dump."""
    rng = np.random.default_rng(1000 * layer_id + (0 if stage == "prefill" else 1))
    seq = prefill_seq(layer_id) if stage == "prefill" else DECODE_SEQ
    k = realistic_kv(rng, seq, KV_HEADS, HEAD_DIM)
    v = smooth_kv(seq, KV_HEADS, HEAD_DIM, offset=layer_id + (0.5 if stage == "decode" else 0.0))
    return k.astype(dtype), v.astype(dtype)


def write_standard_dump(out_dir: Path, dtype=np.float16, layers=range(LAYERS), run_id: str = "run1") -> Path:
    for layer_id in layers:
        for stage in ("prefill", "decode"):
            k, v = standard_tensors(layer_id, stage, dtype)
            seq_start = 0 if stage == "prefill" else prefill_seq(layer_id)
            write_entry(out_dir, layer_id=layer_id, stage=stage, seq_start=seq_start, k=k, v=v, run_id=run_id)
    return out_dir


# in-process pytester re-imports the plugin's packages, already imported by the test session
GATE_INI = "[pytest]\nh2o_model = model.json\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n"


def make_gate_dir(pytester: Any, model_config: dict[str, Any], preset: dict[str, Any]) -> Path:
    """A pytester folder with a random-weight ``model.json`` (the ini's ``h2o_model``) and ``tiny.json``."""
    (pytester.path / "model.json").write_text(json.dumps(model_config))
    (pytester.path / "tiny.json").write_text(json.dumps(preset))
    pytester.makeini(GATE_INI)
    return pytester.path

