"""KV dumps: the original's ``meta_*.json`` + raw K/V files, and ``.npz`` files.

A dump entry is one layer's K and V for a run of tokens, each shaped
``[seq, kv_heads, head_dim]`` and stored little-endian. The meta file names::

    run_id, stage, layer_id, seq_start, seq_len, kv_heads, head_dim, bytes_per_elem, k_file, v_file

``.npz`` files hold arrays ``k`` and ``v`` (and optionally scalar ``layer_id``, ``stage``,
``run_id``, ``seq_start``); a missing ``layer_id`` is read from a ``layer<N>`` in the file name.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

META_FIELDS = ("run_id", "stage", "layer_id", "seq_start", "seq_len", "kv_heads", "head_dim",
               "bytes_per_elem", "k_file", "v_file")
_DTYPES = {2: np.dtype("<f2"), 4: np.dtype("<f4")}


class DumpError(ValueError):
    """A dump file is missing or malformed; the message names the file and what is wrong."""


@dataclass
class DumpEntry:
    """One dump entry: where it came from, its metadata, and a loader for its K/V arrays."""

    source: Path
    run_id: str
    stage: str
    layer_id: int
    seq_start: int
    seq_len: int
    kv_heads: int
    head_dim: int
    bytes_per_elem: int
    k_path: Path | None = None
    v_path: Path | None = None
    _arrays: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def raw_bytes(self) -> int:
        """Bytes of K plus V as stored."""
        return 2 * self.seq_len * self.kv_heads * self.head_dim * self.bytes_per_elem

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(k, v)`` shaped ``[seq, kv_heads, head_dim]`` in the stored dtype.

        Raises :class:`DumpError` when a file is missing or its size disagrees with the meta.
        """
        if self._arrays is not None:
            return self._arrays
        shape = (self.seq_len, self.kv_heads, self.head_dim)
        dtype = _DTYPES.get(self.bytes_per_elem)
        if dtype is None:
            raise DumpError(f"{self.source}: bytes_per_elem={self.bytes_per_elem}, expected 2 or 4")
        out = []
        for path in (self.k_path, self.v_path):
            assert path is not None
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DumpError(f"{self.source}: cannot read {path}: {exc.strerror or exc}") from None
            expected = int(np.prod(shape)) * dtype.itemsize
            if len(data) != expected:
                raise DumpError(f"{path}: {len(data)} bytes, expected {expected} for shape "
                                f"{list(shape)} at {dtype.itemsize} bytes/elem (from {self.source.name})")
            out.append(np.frombuffer(data, dtype=dtype).reshape(shape))
        return out[0], out[1]


def write_dump(out_dir: Path, *, run_id: str, stage: str, layer_id: int, seq_start: int,
               k: np.ndarray, v: np.ndarray) -> Path:
    """Write one entry as ``meta_*.json`` + ``k_*.bin`` + ``v_*.bin``; return the meta path."""
    if k.shape != v.shape or k.ndim != 3:
        raise ValueError(f"k and v must share a [seq, kv_heads, head_dim] shape, got {k.shape} and {v.shape}")
    if k.dtype.itemsize not in _DTYPES or k.dtype.kind != "f" or k.dtype != v.dtype:
        raise ValueError(f"k and v must both be float16 or float32, got {k.dtype} and {v.dtype}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{_safe(run_id)}_{_safe(stage)}_layer{layer_id:03d}_s{seq_start:06d}"
    dtype = _DTYPES[k.dtype.itemsize]
    for prefix, arr in (("k", k), ("v", v)):
        _atomic_write(out_dir / f"{prefix}_{stem}.bin", np.ascontiguousarray(arr, dtype=dtype).tobytes())
    meta = {"run_id": run_id, "stage": stage, "layer_id": int(layer_id), "seq_start": int(seq_start),
            "seq_len": int(k.shape[0]), "kv_heads": int(k.shape[1]), "head_dim": int(k.shape[2]),
            "bytes_per_elem": int(k.dtype.itemsize), "k_file": f"k_{stem}.bin", "v_file": f"v_{stem}.bin"}
    meta_path = out_dir / f"meta_{stem}.json"
    _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    return meta_path


def read_meta(meta_path: Path) -> DumpEntry:
    """Parse one ``meta_*.json``; raise :class:`DumpError` naming the file and the bad key."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DumpError(f"{meta_path}: not readable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DumpError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    ints = {}
    for key in ("layer_id", "seq_start", "seq_len", "kv_heads", "head_dim", "bytes_per_elem"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DumpError(f"{meta_path}: key {key!r} must be an integer, got {value!r}")
        ints[key] = value
    for key in ("seq_len", "kv_heads", "head_dim"):
        if ints[key] <= 0:
            raise DumpError(f"{meta_path}: key {key!r} must be > 0, got {ints[key]}")
    files = {}
    for key in ("k_file", "v_file"):
        value = meta.get(key)
        if not isinstance(value, str) or not value:
            raise DumpError(f"{meta_path}: key {key!r} must name a file, got {value!r}")
        files[key] = (meta_path.parent / value)
    run_id = meta.get("run_id", "")
    return DumpEntry(source=meta_path, run_id=run_id if isinstance(run_id, str) else "",
                     stage=str(meta.get("stage", "unknown")), k_path=files["k_file"],
                     v_path=files["v_file"], **ints)


def read_npz(path: Path) -> DumpEntry:
    """Read an ``.npz`` holding ``k`` and ``v``; raise :class:`DumpError` naming what is missing."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [key for key in ("k", "v") if key not in data.files]
            if missing:
                raise DumpError(f"{path}: missing array(s) {missing}; expected 'k' and 'v', found {data.files}")
            k, v = data["k"], data["v"]
            extra = {key: data[key].item() for key in ("layer_id", "stage", "run_id", "seq_start")
                     if key in data.files}
    except DumpError:
        raise
    except Exception as exc:  # zipfile/numpy raise many types for a corrupt archive
        raise DumpError(f"{path}: not a readable .npz ({exc})") from None
    if k.shape != v.shape or k.ndim != 3 or 0 in k.shape:
        raise DumpError(f"{path}: 'k' and 'v' must share a non-empty [seq, kv_heads, head_dim] shape, "
                        f"got {k.shape} and {v.shape}")
    if k.dtype.kind != "f" or k.dtype.itemsize not in _DTYPES or v.dtype != k.dtype:
        raise DumpError(f"{path}: 'k' and 'v' must be float16 or float32, got {k.dtype} and {v.dtype}")
    layer_id = extra.get("layer_id")
    if layer_id is None:
        match = re.search(r"layer[_-]?(\d+)", path.stem)
        layer_id = int(match.group(1)) if match else 0
    return DumpEntry(source=path, run_id=str(extra.get("run_id", path.stem)),
                     stage=str(extra.get("stage", "prefill")), layer_id=int(layer_id),
                     seq_start=int(extra.get("seq_start", 0)), seq_len=k.shape[0],
                     kv_heads=k.shape[1], head_dim=k.shape[2], bytes_per_elem=k.dtype.itemsize,
                     _arrays=(k.astype(k.dtype.newbyteorder("<")), v.astype(v.dtype.newbyteorder("<"))))


def iter_dump_files(root: Path) -> Iterator[Path]:
    """Yield every ``meta_*.json`` and ``*.npz`` under ``root`` in sorted order."""
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if (name.startswith("meta_") and name.endswith(".json")) or name.endswith(".npz"):
                yield Path(dirpath) / name


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text) or "run"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
