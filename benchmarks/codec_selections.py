"""Our codec profiles against the original's offline accounting and plain zstd-3, selection by selection.

Usage::

    python benchmarks/codec_selections.py DUMP_DIR... [--rope-theta 100000] [--stages prefill,decode,both]
        [--modes per_meta,chunked_grouped] [--chunk-seq 192] [--framing 8]

A selection is a layer set x a stage x an entry mode. Layer sets (L = the dumps' layer count; SmolLM2-135M:
L = 30): ``{0}``, ``{1}``, ``{0,1}`` (front), ``{2..L-1}`` (deep), ``{L/2}``, ``{0,L/2}``, ``{L-1}``, all.
Stages: ``prefill``, ``decode``, ``both``. Entry modes: ``per_meta`` (one unit per dump entry, +0 bytes) and
``chunked_grouped`` (each run x layer stream cut into ``--chunk-seq``-token chunks, +``--framing`` bytes per
tensor chunk: the original's online simulation). Default: all 8 x 3 x 2 = 48 selections.

Per selection, for K, V and K+V, the ratio ``sum(raw fp16 bytes) / sum(bytes)`` of:

- ``original``: the original's ``adaptive_v22`` size accounting (:mod:`original_offline`);
- ``plain``: hi and lo byte planes, each one zstd-3 frame, + the unit's framing;
- ``fast``: ``make_codec("fast", kind)`` blobs (our header included) + the unit's framing;
- ``ratio``: ``make_codec("ratio", kind, rope=RopeSpec(theta, "half"))`` blobs with the rows' token positions,
  + the unit's framing; "ratio: not built" when ``h2o_kernels.codec.ratio`` does not import.

Every fast and ratio blob is decoded and compared bit for bit. A cell of ours below the original's is
marked ``<o``, below plain zstd-3 ``<p``. RoPE theta: each dump directory's meta key ``rope_theta`` when a
meta file has it, else ``--rope-theta``. Dump directories are evaluated apart (the original ran once per
directory) and their bytes summed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from original_offline import Unit, original_size, planes, select_entries, units  # noqa: E402

from h2o_kernels.codec.profiles import decode_many, make_codec  # noqa: E402
from h2o_kernels.codec.rope import RopeSpec  # noqa: E402

KINDS = ("k", "v")
CODECS = ("original", "plain", "fast", "ratio")


def ratio_available() -> bool:
    """Whether the ratio profile is built (``h2o_kernels.codec.ratio`` imports)."""
    try:
        import h2o_kernels.codec.ratio  # noqa: F401
    except ImportError:
        return False
    return True


def rope_theta(dump_dir: Path, default: float) -> float:
    """``rope_theta`` of the first ``meta_*.json`` under ``dump_dir`` that has the key, else ``default``."""
    for path in sorted(Path(dump_dir).rglob("meta_*.json")):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("rope_theta")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return default


_PLAIN = zstandard.ZstdCompressor(level=3)


def plain_bytes(tensor: np.ndarray) -> int:
    """Bytes of the plain baseline: the hi and lo byte planes of an fp16 tensor, each one zstd-3 frame."""
    return sum(len(_PLAIN.compress(np.ascontiguousarray(plane))) for plane in planes(tensor))


def coded_bytes(encoder, tensors: list[np.ndarray], positions: list[np.ndarray] | None = None) -> list[int]:
    """Blob sizes of ``encoder`` for the tensors; every blob decoded and compared bit for bit.

    Raises ``AssertionError`` naming the tensor for a blob that does not decode to its input.
    """
    blobs = encoder.encode_many(tensors) if positions is None else encoder.encode_many(tensors, positions)
    for i, (tensor, back) in enumerate(zip(tensors, decode_many(blobs))):
        assert np.array_equal(back.view(np.uint16), tensor.view(np.uint16)), f"blob {i} did not round-trip"
    return [len(blob) for blob in blobs]


@dataclass
class Sizes:
    """Bytes of one unit's K or V: raw and per codec (framing included)."""

    layer_id: int
    raw: int
    by_codec: dict[str, int] = field(default_factory=dict)


def unit_sizes(selected: list[Unit], kind: str, theta: float, with_ratio: bool) -> list[Sizes]:
    """Sizes of ``kind`` ("k" or "v") of every unit, for every codec."""
    tensors = [np.ascontiguousarray(unit.k if kind == "k" else unit.v) for unit in selected]
    out = [Sizes(unit.layer_id, tensor.nbytes) for unit, tensor in zip(selected, tensors)]
    columns: dict[str, list[int]] = {
        "original": [original_size(t, kind) for t in tensors],
        "plain": [plain_bytes(t) for t in tensors],
        "fast": coded_bytes(make_codec("fast", kind), tensors),
    }
    if with_ratio:
        encoder = make_codec("ratio", kind, rope=RopeSpec(theta, "half") if kind == "k" else None)
        columns["ratio"] = coded_bytes(encoder, tensors, [unit.positions for unit in selected])
    for name, sizes in columns.items():
        for record, unit, size in zip(out, selected, sizes):
            record.by_codec[name] = size + unit.overhead
    return out


def layer_sets(n_layers: int) -> list[tuple[str, Callable[[int], bool]]]:
    """The selections' layer sets (module doc) for a model of ``n_layers`` layers."""
    mid, last = n_layers // 2, n_layers - 1
    return [("{0}", lambda i: i == 0), ("{1}", lambda i: i == 1), ("{0,1}", lambda i: i < 2),
            (f"{{2..{last}}}", lambda i: i >= 2), (f"{{{mid}}}", lambda i: i == mid),
            (f"{{0,{mid}}}", lambda i: i in (0, mid)), (f"{{{last}}}", lambda i: i == last),
            ("all", lambda i: True)]


def _cell(value: float, row: dict[str, float], name: str) -> str:
    marks = [mark for base, mark in (("original", "<o"), ("plain", "<p"))
             if name in ("fast", "ratio") and value < row[base]]
    return f"{value:.4f}" + (" " + " ".join(marks) if marks else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump_dirs", nargs="+", type=Path)
    parser.add_argument("--rope-theta", type=float, default=100000.0,
                        help="RoPE theta when the dump meta has no rope_theta (default: SmolLM2's 100000)")
    parser.add_argument("--stages", default="prefill,decode,both")
    parser.add_argument("--modes", default="per_meta,chunked_grouped")
    parser.add_argument("--chunk-seq", type=int, default=192)
    parser.add_argument("--framing", type=int, default=8)
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    if not stages or not set(stages) <= {"prefill", "decode", "both"}:
        parser.error(f"--stages: expected some of prefill,decode,both, got {args.stages!r}")
    if not modes or not set(modes) <= {"per_meta", "chunked_grouped"}:
        parser.error(f"--modes: expected some of per_meta,chunked_grouped, got {args.modes!r}")
    with_ratio = ratio_available()
    codecs = CODECS if with_ratio else CODECS[:3]
    if not with_ratio:
        print("ratio: not built (h2o_kernels.codec.ratio does not import)")
    started = time.perf_counter()
    # (stage, mode) -> kind -> the units' sizes, all layers, all dump dirs
    sizes: dict[tuple[str, str], dict[str, list[Sizes]]] = defaultdict(lambda: {"k": [], "v": []})
    n_layers = 0
    for stage in stages:
        for mode in modes:
            for root in args.dump_dirs:
                entries = select_entries(root, stage=stage)
                if not entries:
                    parser.error(f"{root}: no {stage} dump entries")
                n_layers = max(n_layers, 1 + max(e.layer_id for e in entries))
                selected = units(entries, mode, chunk_seq=args.chunk_seq, framing=args.framing)
                theta = rope_theta(root, args.rope_theta)
                for kind in KINDS:
                    sizes[(stage, mode)][kind] += unit_sizes(selected, kind, theta, with_ratio)
            print(f"[{time.perf_counter() - started:6.1f}s] {stage} {mode}: {len(selected)} units in the last dir",
                  file=sys.stderr)
    rows = []
    for mode in modes:
        for stage in stages:
            for name, keep in layer_sets(n_layers):
                row = {"layers": name, "stage": stage, "mode": mode}
                for kind in ("k", "v", "kv"):
                    records = [r for k in (KINDS if kind == "kv" else (kind,))
                               for r in sizes[(stage, mode)][k] if keep(r.layer_id)]
                    raw = sum(r.raw for r in records)
                    row[kind] = {c: raw / sum(r.by_codec[c] for r in records) for c in codecs}
                    row[kind + "_raw"] = raw
                rows.append(row)
    framing = f"chunked_grouped = {args.chunk_seq} tokens + {args.framing} bytes"
    for kind, title in (("k", "K"), ("v", "V"), ("kv", "K+V")):
        print(f"\n### {title} ({framing}; `<o` below the original, `<p` below plain zstd-3)\n")
        print("| # | layers | stage | mode | raw MB | " + " | ".join(codecs) + " |")
        print("|---|---|---|---|---|" + "---|" * len(codecs))
        for i, row in enumerate(rows, 1):
            cells = " | ".join(_cell(row[kind][c], row[kind], c) for c in codecs)
            print(f"| {i} | {row['layers']} | {row['stage']} | {row['mode']} | {row[kind + '_raw'] / 1e6:.3f} | "
                  f"{cells} |")
    print("\n### Summary: selections where a profile is below\n")
    print("| profile | part | below original | below plain zstd-3 |")
    print("|---|---|---|---|")
    for codec in codecs[2:]:
        for kind, title in (("k", "K"), ("v", "V"), ("kv", "K+V")):
            below_o = sum(row[kind][codec] < row[kind]["original"] for row in rows)
            below_p = sum(row[kind][codec] < row[kind]["plain"] for row in rows)
            print(f"| {codec} | {title} | {below_o} of {len(rows)} | {below_p} of {len(rows)} |")
    print(f"\n{len(rows)} selections; every fast{' and ratio' if with_ratio else ''} blob decoded bit-exactly; "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
