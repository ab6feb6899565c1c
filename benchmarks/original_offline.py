"""The original kit's offline size accounting, "adaptive_v22", as a yardstick (sizes only, no blobs).

A re-implementation of ``exp/h2o_v4/offline_lossless_fp16.py`` (Livia-Tassel/MNN ``6f6c21a1``; spec:
``original-runtime.md`` §4.8) with its defaults: ``--codec-mode adaptive_v22 --adaptive-block-seq 64
--zstd-level 3``, K predictors ``raw,delta_seq,xor_seq,pair_delta,pair_delta_delta_seq`` on both planes, V
``raw,delta_seq,xor_seq``. Per tensor ``[seq, kv_heads, head_dim]`` (fp16):

- the hi and lo byte planes (``word >> 8``, ``word & 0xFF``, each ``[seq, heads, dim]``) are two streams;
- a stream is cut along seq into 64-token blocks (the last may be shorter; ``min(64, seq)`` rows per block);
  each block keeps the predictor whose output is smallest under one-shot zstd-3 (ties: the earlier one in
  the list); the chosen blocks are concatenated and zstd-3 compressed once;
- ``stream_bytes = len(zstd(concat)) + n_blocks (a mode byte each) + 8 (header)``, 0 for an empty stream;
- ``tensor_bytes = stream_bytes(hi) + stream_bytes(lo)``.

Entry modes (what a coding unit is, and what each tensor of a unit is charged on top): ``per_meta`` (one unit
per dump entry, +0), ``aggregate`` (entries of one run x layer (x stage) joined along seq, +``4 + 4 *
entries``), ``chunked`` (each entry cut into ``chunk_seq``-token chunks, +``framing`` each) and
``chunked_grouped`` (joined, then cut: the original's online simulation, 192 tokens + 8 bytes in its gate).
The ratio of a selection is ``sum(raw) / sum(compressed)``. Our predictors (:data:`FORWARD`) are the same
arithmetic as the original's (mod 256, first row of a block kept, odd dims minus their even neighbour).

Entries are grouped by ``(dump dir, run_id, layer, heads, dim)``: the original ran once per dump directory,
so two directories holding the same ``run_id`` are never joined.

Command line (the original's numbers for one selection)::

    python benchmarks/original_offline.py DUMP_DIR... [--stage both] [--layers 0,1] [--entry-mode per_meta]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import zstandard

from h2o_kernels.codec.predictors import FORWARD, K_DEFAULT, V_DEFAULT
from h2o_kernels.lossless.kvdump import DumpEntry, iter_dump_files, read_meta, read_npz

BLOCK_SEQ = 64
ZSTD_LEVEL = 3
STREAM_HEADER_BYTES = 8
ONLINE_CHUNK_SEQ = 192
ONLINE_FRAMING_BYTES = 8
PREDICTORS: dict[str, tuple[str, ...]] = {"k": K_DEFAULT, "v": V_DEFAULT}
EntryMode = Literal["per_meta", "aggregate", "chunked", "chunked_grouped"]
ENTRY_MODES: tuple[str, ...] = ("per_meta", "aggregate", "chunked", "chunked_grouped")
Stage = Literal["prefill", "decode", "both"]

_CCTX: dict[int, zstandard.ZstdCompressor] = {}


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """The original's ``zstd.ZstdCompressor(level=...)`` (python-zstandard defaults: content size written)."""
    if level not in _CCTX:
        _CCTX[level] = zstandard.ZstdCompressor(level=level)
    return _CCTX[level]


def planes(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (hi, lo) byte planes of an fp16 ``[seq, heads, dim]`` tensor, each ``uint8 [seq, heads, dim]``.

    Raises ``TypeError`` for a dtype other than 2-byte float and ``ValueError`` for another rank.
    """
    arr = np.asarray(tensor)
    if arr.dtype.kind != "f" or arr.dtype.itemsize != 2:
        raise TypeError(f"expected a float16 tensor, got {arr.dtype}")
    if arr.ndim != 3:
        raise ValueError(f"expected a [seq, kv_heads, head_dim] tensor, got shape {arr.shape}")
    words = np.ascontiguousarray(arr.astype("<f2", copy=False)).view("<u2")
    return (words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)


def stream_bytes(plane: np.ndarray, predictors: Iterable[str], *, block_seq: int = BLOCK_SEQ,
                 level: int = ZSTD_LEVEL) -> int:
    """Bytes of one byte-plane stream (``uint8 [seq, heads, dim]``) under adaptive_v22 (formula: module doc).

    Raises ``KeyError`` for an unknown predictor name and ``ValueError`` for ``block_seq <= 0``.
    """
    names = tuple(predictors)
    if block_seq <= 0:
        raise ValueError(f"block_seq must be > 0, got {block_seq}")
    seq = int(plane.shape[0])
    if seq <= 0:
        return 0
    cctx = _compressor(level)
    step = max(1, min(block_seq, seq))
    chosen: list[bytes] = []
    for start in range(0, seq, step):
        block = plane[start:start + step]
        best: bytes | None = None
        best_size = 0
        for name in names:
            payload = np.ascontiguousarray(FORWARD[name](block)).tobytes()
            size = len(cctx.compress(payload))
            if best is None or size < best_size:
                best, best_size = payload, size
        assert best is not None, "no predictors"
        chosen.append(best)
    return len(cctx.compress(b"".join(chosen))) + len(chosen) + STREAM_HEADER_BYTES


def original_size(tensor: np.ndarray, kind: str, *, block_seq: int = BLOCK_SEQ, level: int = ZSTD_LEVEL,
                  predictors: tuple[str, ...] | None = None) -> int:
    """Bytes the original charges one fp16 ``[seq, heads, dim]`` tensor (hi + lo streams, no unit overhead).

    ``kind`` is ``"k"`` or ``"v"`` (picks the default predictor set; ``predictors`` overrides it for both
    planes). Raises ``ValueError`` for another kind.
    """
    if kind not in PREDICTORS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}")
    names = predictors or PREDICTORS[kind]
    return sum(stream_bytes(plane, names, block_seq=block_seq, level=level) for plane in planes(tensor))


@dataclass
class Unit:
    """One coding unit: K and V (fp16 ``[seq, heads, dim]``), the rows' absolute token positions (int64
    ``[seq]``, from ``seq_start``), and the bytes each of K and V is charged on top (framing / metadata)."""

    dump: str
    run_id: str
    layer_id: int
    stage: str
    k: np.ndarray
    v: np.ndarray
    positions: np.ndarray
    overhead: int


def select_entries(dump_dir: Path, *, stage: Stage = "both", layers: Iterable[int] | None = None) -> list[DumpEntry]:
    """Entries of ``dump_dir`` (``meta_*.json`` and ``.npz``, sorted path order) in ``stage`` and ``layers``
    (None: all). Raises :class:`~h2o_kernels.lossless.kvdump.DumpError` for an unreadable entry."""
    keep = None if layers is None else set(layers)
    out = []
    for path in iter_dump_files(Path(dump_dir)):
        entry = read_npz(path) if path.suffix == ".npz" else read_meta(path)
        if (stage == "both" or entry.stage == stage) and (keep is None or entry.layer_id in keep):
            out.append(entry)
    return out


def _fp16(array: np.ndarray) -> np.ndarray:
    return array if array.dtype == np.float16 else array.astype(np.float16)  # fp32 dumps: converted, as the original


def _joined(entries: list[DumpEntry]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    loaded = [entry.load() for entry in entries]
    k = np.concatenate([_fp16(kv[0]) for kv in loaded])
    v = np.concatenate([_fp16(kv[1]) for kv in loaded])
    positions = np.concatenate([np.arange(e.seq_start, e.seq_start + e.seq_len, dtype=np.int64) for e in entries])
    return k, v, positions


def _cut(first: DumpEntry, k: np.ndarray, v: np.ndarray, positions: np.ndarray, stage: str, chunk_seq: int,
         framing: int) -> list[Unit]:
    seq = k.shape[0]
    step = chunk_seq if 0 < chunk_seq < seq else seq
    return [Unit(str(first.source.parent), first.run_id, first.layer_id, stage, k[s:s + step], v[s:s + step],
                 positions[s:s + step], framing) for s in range(0, seq, step)]


def units(entries: list[DumpEntry], mode: EntryMode, *, chunk_seq: int = ONLINE_CHUNK_SEQ,
          framing: int = ONLINE_FRAMING_BYTES, aggregate_by_stage: bool = False) -> list[Unit]:
    """The coding units of ``entries`` under the original's entry ``mode`` (module doc); joined entries are in
    ``seq_start`` order (then path order). A joined unit's ``stage`` is ``"both"`` when its entries' differ.

    Raises ``ValueError`` for an unknown mode.
    """
    if mode not in ENTRY_MODES:
        raise ValueError(f"entry mode {mode!r} is not one of {ENTRY_MODES}")
    if mode in ("per_meta", "chunked"):
        return [unit for entry in entries
                for unit in _cut(entry, *_joined([entry]), entry.stage, chunk_seq if mode == "chunked" else 0,
                                 framing if mode == "chunked" else 0)]
    groups: dict[tuple, list[DumpEntry]] = {}
    for entry in entries:
        key = (str(entry.source.parent), entry.run_id or "__no_run_id__", entry.layer_id, entry.kv_heads,
               entry.head_dim) + ((entry.stage,) if aggregate_by_stage else ())
        groups.setdefault(key, []).append(entry)
    out: list[Unit] = []
    for members in groups.values():
        members = sorted(members, key=lambda e: e.seq_start)  # stable: path order among equal starts
        stages = {e.stage for e in members}
        stage = stages.pop() if len(stages) == 1 else "both"
        if mode == "aggregate":
            out += _cut(members[0], *_joined(members), stage, 0, 4 + 4 * len(members))
        else:
            out += _cut(members[0], *_joined(members), stage, chunk_seq, framing)
    return out


def selection_bytes(selected: list[Unit], kind: str, **options) -> tuple[int, int]:
    """``(raw, compressed)`` bytes of ``kind`` ("k" or "v") over the units, overheads included; ``options``
    go to :func:`original_size`."""
    raw = comp = 0
    for unit in selected:
        tensor = unit.k if kind == "k" else unit.v
        raw += tensor.nbytes
        comp += original_size(tensor, kind, **options) + unit.overhead
    return raw, comp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump_dirs", nargs="+", type=Path)
    parser.add_argument("--stage", choices=("prefill", "decode", "both"), default="both")
    parser.add_argument("--layers", default="", help="comma-separated layer ids (default: all)")
    parser.add_argument("--entry-mode", choices=ENTRY_MODES, default="per_meta")
    parser.add_argument("--online-chunk-seq", type=int, default=ONLINE_CHUNK_SEQ)
    parser.add_argument("--online-framing-bytes", type=int, default=ONLINE_FRAMING_BYTES)
    parser.add_argument("--aggregate-by-stage", action="store_true")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",") if x.strip()] or None
    totals = {"k": [0, 0], "v": [0, 0]}
    for root in args.dump_dirs:
        selected = units(select_entries(root, stage=args.stage, layers=layers), args.entry_mode,
                         chunk_seq=args.online_chunk_seq, framing=args.online_framing_bytes,
                         aggregate_by_stage=args.aggregate_by_stage)
        for kind in totals:
            raw, comp = selection_bytes(selected, kind)
            totals[kind][0] += raw
            totals[kind][1] += comp
    if not totals["k"][0]:
        parser.error("no dump entry selected")
    (kr, kc), (vr, vc) = totals["k"], totals["v"]
    print(f"k_raw_bytes={kr} k_compressed_bytes={kc} k_ratio={kr / kc:.4f}")
    print(f"v_raw_bytes={vr} v_compressed_bytes={vc} v_ratio={vr / vc:.4f}")
    print(f"raw_bytes={kr + vr} compressed_bytes={kc + vc} lossless_ratio={(kr + vr) / (kc + vc):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
