"""KV dumps: the original's ``meta_*.json`` + raw K/V files, and ``.npz`` files.

A dump entry is one layer's K and V for a run of tokens, each shaped
``[seq, kv_heads, head_dim]`` and stored little-endian. The meta file names::

    run_id, stage, layer_id, seq_start, seq_len, kv_heads, head_dim, bytes_per_elem, k_file, v_file

and, where the writer knows the model's RoPE and the rows sit at consecutive positions ``seq_start + i``,
``rope_theta`` (the model config's frequency base) and ``rope_layout`` (``"half"``: rotate-half, or
``"interleaved"``); the ratio codec profile uses them to match K rows through RoPE (see
:class:`~h2o_kernels.codec.rope.RopeSpec`). Readers treat an absent or malformed RoPE as "no RoPE".

``.npz`` files hold arrays ``k`` and ``v`` (and optionally scalar ``layer_id``, ``stage``,
``run_id``, ``seq_start``); a missing ``layer_id`` is read from a ``layer<N>`` in the file name.

Files are written to a new temporary file and moved into place, never rewritten in place, so
:func:`link_identical` may hard-link identical K/V files across dumps.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import xxhash

from h2o_kernels.codec.rope import RopeSpec

META_FIELDS = ("run_id", "stage", "layer_id", "seq_start", "seq_len", "kv_heads", "head_dim",
               "bytes_per_elem", "k_file", "v_file")
_DTYPES = {2: np.dtype("<f2"), 4: np.dtype("<f4")}
_CHUNK = 1 << 20


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
    rope: RopeSpec | None = None
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


def load_many(entries: list[DumpEntry]) -> tuple[np.ndarray, np.ndarray]:
    """``(k, v)`` of ``entries`` (one ``kv_heads`` x ``head_dim`` shape) concatenated along seq, in the stored
    dtype (fp32 where the entries mix fp16 and fp32). Meta entries of one dtype are read straight into one array
    each (no per-entry copies). Raises :class:`DumpError` as :meth:`DumpEntry.load`."""
    dtypes = {_DTYPES.get(entry.bytes_per_elem) for entry in entries}
    if len(dtypes) != 1 or None in dtypes or any(e._arrays is not None or e.k_path is None for e in entries):
        ks, vs = zip(*(entry.load() for entry in entries))
        return (np.concatenate(ks), np.concatenate(vs)) if len(ks) > 1 else (ks[0], vs[0])
    dtype = dtypes.pop()
    shape = (sum(entry.seq_len for entry in entries), entries[0].kv_heads, entries[0].head_dim)
    k, v = np.empty(shape, dtype), np.empty(shape, dtype)
    row = 0
    for entry in entries:
        for path, out in ((entry.k_path, k), (entry.v_path, v)):
            assert path is not None
            _read_into(path, out[row:row + entry.seq_len], entry)
        row += entry.seq_len
    return k, v


def _read_into(path: Path, out: np.ndarray, entry: DumpEntry) -> None:
    """Fill the contiguous array ``out`` with the bytes of ``path``, which must be exactly as long."""
    buffer = memoryview(out).cast("B")
    try:
        with path.open("rb", buffering=0) as data:
            size = os.fstat(data.fileno()).st_size
            got = 0
            while size == len(buffer) and got < size and (n := data.readinto(buffer[got:])):
                got += n
    except OSError as exc:
        raise DumpError(f"{entry.source}: cannot read {path}: {exc.strerror or exc}") from None
    if size != len(buffer) or got != size:
        raise DumpError(f"{path}: {size if size != len(buffer) else got} bytes, expected {len(buffer)} for shape "
                        f"{list(out.shape)} at {out.dtype.itemsize} bytes/elem (from {entry.source.name})")


def dump_cache(cache: Any, out_dir: Path, run_id: str, prompt_len: int, rope: RopeSpec | None = None) -> None:
    """Write a runtime's held KV: each layer's held prompt tokens as its ``prefill`` entry, its held later
    tokens as ``decode``. ``cache`` has ``num_layers`` and per layer ``k``/``v`` (fp16 ``[seq, kv_heads,
    head_dim]`` rows) and ``positions`` (``[seq, kv_heads]``). Per-head eviction: ``prefill`` is the rows
    where every KV head holds a prompt token. ``rope`` (the model's) is recorded in an entry's meta only when
    its rows hold consecutive positions ``seq_start + i`` in every head (nothing evicted from that stage):
    the meta has no per-row positions to give otherwise."""
    for layer in range(cache.num_layers):
        k, v = cache.k(layer), cache.v(layer)
        positions = np.asarray(cache.positions(layer))
        split = int(np.count_nonzero(positions < prompt_len, axis=0).min(initial=len(k)))
        for stage, rows, start in (("prefill", slice(0, split), 0), ("decode", slice(split, None), prompt_len)):
            if len(k[rows]):
                held = positions[rows].reshape(len(k[rows]), -1)
                consecutive = bool(np.all(held == start + np.arange(len(held))[:, None]))
                write_dump(out_dir, run_id=run_id, stage=stage, layer_id=layer, seq_start=start,
                           k=np.asarray(k[rows]), v=np.asarray(v[rows]), rope=rope if consecutive else None)


def write_dump(out_dir: Path, *, run_id: str, stage: str, layer_id: int, seq_start: int,
               k: np.ndarray, v: np.ndarray, rope: RopeSpec | None = None) -> Path:
    """Write one entry as ``meta_*.json`` + ``k_*.bin`` + ``v_*.bin``; return the meta path.

    ``rope``: the model's RoPE, recorded as ``rope_theta`` / ``rope_layout``; give it only when K's rows are at
    positions ``seq_start, seq_start + 1, ...`` (K after RoPE of the model that made it)."""
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
    if rope is not None:
        meta.update(rope_theta=float(rope.theta), rope_layout=rope.layout)
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
                     v_path=files["v_file"], rope=meta_rope(meta, meta_path)[0], **ints)


def meta_rope(meta: dict[str, Any], meta_path: Path) -> tuple[RopeSpec | None, str | None]:
    """``(RoPE, problem)`` of a parsed meta: ``(None, None)`` when it records no ``rope_theta``; ``(None, text
    naming the file)`` when ``rope_theta`` is not a finite number > 1 or ``rope_layout`` is neither ``"half"`` nor
    ``"interleaved"``; else the spec (layout ``"half"`` when absent, the transformers/LLaMA convention)."""
    theta = meta.get("rope_theta")
    if theta is None:
        return None, None
    layout = meta.get("rope_layout", "half")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        return None, f"{meta_path}: rope_theta {theta!r} is not a number; K rows are not matched through RoPE"
    try:
        return RopeSpec(float(theta), layout), None
    except ValueError as exc:
        return None, f"{meta_path}: {exc}; K rows are not matched through RoPE"


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


def link_identical(root: Path) -> tuple[int, int]:
    """Hard-link every raw K/V file (``*.bin``) under ``root`` whose bytes equal an earlier one's.

    Candidates are grouped by size, then by the xxh3-128 of their bytes, and confirmed byte for byte;
    "earlier" is sorted path order. A file is replaced atomically (a link under a temporary name in
    its folder, then ``os.replace``), so a reader sees the old file or the link, never neither. A file
    that cannot be linked (``OSError``: no hard links there, another device) is left as it is.
    Returns ``(files linked, bytes saved)``, where bytes count only files whose data had no other link.
    Run it once the dumps under ``root`` are written: a file replaced between its comparison and its
    link would be linked over.
    """
    linked = saved = 0
    for size, paths in _data_files(Path(root)).items():
        if size == 0 or len(paths) < 2:
            continue
        by_digest: dict[bytes, list[Path]] = defaultdict(list)
        for path in paths:
            by_digest[_digest(path)].append(path)
        for group in by_digest.values():
            originals: list[Path] = []
            for path in group:
                source = next((original for original in originals if _same_bytes(original, path)), None)
                if source is None:
                    originals.append(path)
                elif not os.path.samefile(source, path) and (freed := _link_over(source, path)) is not None:
                    linked += 1
                    saved += freed
    return linked, saved


def _data_files(root: Path) -> dict[int, list[Path]]:
    """The regular ``*.bin`` files under ``root`` (not following links), by size, in sorted path order."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for dirpath, _, names in sorted(os.walk(root)):
        for path in (Path(dirpath) / name for name in sorted(names) if name.endswith(".bin")):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                by_size[info.st_size].append(path)
    return by_size


def _digest(path: Path) -> bytes:
    """The xxh3-128 digest of the file's bytes, read in 1 MiB chunks."""
    digest = xxhash.xxh3_128()
    with path.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _same_bytes(a: Path, b: Path) -> bool:
    """Whether two files (of one size) hold the same bytes; the same file trivially does."""
    if os.path.samefile(a, b):
        return True
    with a.open("rb") as left, b.open("rb") as right:
        while chunk := left.read(_CHUNK):
            if chunk != right.read(len(chunk)):
                return False
        return right.read(1) == b""


def _link_over(source: Path, path: Path) -> int | None:
    """Replace ``path`` by a hard link to ``source``; the bytes this frees, or None when it cannot link."""
    old = path.lstat()
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.link.tmp")
    try:
        os.link(source, tmp)
    except OSError:
        return None
    try:
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    return old.st_size if old.st_nlink == 1 else 0


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text) or "run"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file beside ``path`` and move it over ``path``.

    The bytes never go into an existing file, so a path hard-linked by :func:`link_identical` is
    replaced, never written through to the files it shares data with.
    """
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    out = tmp.open("xb")  # exclusive: a new inode, never one shared through a link
    try:
        with out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
