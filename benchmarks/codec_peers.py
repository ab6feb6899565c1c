"""Our codec profiles against general-purpose and float codecs on real KV dumps, in online framing.

Usage::

    python benchmarks/codec_peers.py DUMP_DIR... [--layers 0,1,15] [--max-chunks 24] [--slow-chunks 48]
        [--repeats 5] [--slow-repeats 1] [--rope-theta 100000] [--plot out.png] [--json out.json]

Online framing (the original's ``chunked_grouped``): each run x layer stream (prefill + decode entries joined
along seq) is cut into ``--chunk-seq`` (192) token chunks coded independently; every codec is charged
``--framing`` (8) bytes per tensor chunk on top of its own output (its headers included). Front = layers 0-1,
deep = layers 2+. K and V are coded separately; K+V sums both. Ratio = raw fp16 bytes / bytes.

Codecs: ``fast`` (``make_codec("fast", kind)``, one call per chunk, and batched: one ``encode_many`` /
``decode_many`` over all chunks), ``ratio`` (``make_codec("ratio", kind, rope=RopeSpec(theta, "half"))`` for K,
without ``rope`` for V, with the rows' token positions; when ``h2o_kernels.codec.ratio`` imports), the hi and lo
byte planes each compressed alone by zstd-3, zstd-19, lzma (raw LZMA2, preset 9|EXTREME: no xz container), brotli
(quality 11), then pcodec (float16, default level 8), ZipNN (float16), Blosc2 (typesize 2, byte shuffle + zstd,
clevel 5), and the original's ``adaptive_v22`` accounting (:mod:`original_offline`; sizes only, nothing to decode).

Every codec that decodes is verified bit-exact on every chunk it coded. Speeds: MB/s of raw fp16 bytes, one
thread (each library's thread count set to 1), per call on one chunk; per pass the codecs run round-robin and
the table shows the median over passes (``--repeats``; ``--slow-repeats`` for lzma and brotli, which are also
limited to ``--slow-chunks`` chunks per group and kind, evenly spaced: their row says so and gives plain
zstd-3's ratio on the same sample). ``--max-chunks`` limits every codec to that many chunks per group and kind
(evenly spaced) for a quick run. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import lzma
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec_selections import ratio_available, rope_theta  # noqa: E402
from original_offline import original_size, planes, select_entries, units  # noqa: E402

from h2o_kernels.codec.profiles import decode, decode_many, make_codec  # noqa: E402
from h2o_kernels.codec.rope import RopeSpec  # noqa: E402

Parts = list[bytes]  # a chunk's output: one or more byte strings (sizes summed)
EncodeAll = Callable[[list[np.ndarray], list[np.ndarray]], list[Parts]]
DecodeAll = Callable[[list[Parts], list[tuple[int, ...]]], list[np.ndarray]]
GROUPS = ("front", "deep")
KINDS = ("k", "v")


@dataclass
class Codec:
    """One codec of the table: per-chunk encode and decode over a list of chunks, or ``size_of`` alone (a
    yardstick that writes nothing), and whether it is slow (sampled)."""

    name: str
    encode_all: EncodeAll | None
    decode_all: DecodeAll | None
    slow: bool = False
    size_of: Callable[[np.ndarray], int] | None = None  # a size-only codec: bytes of one chunk


def _per_chunk(encode: Callable[[np.ndarray, np.ndarray], Parts],
               decode_one: Callable[[Parts, tuple[int, ...]], np.ndarray] | None) -> tuple[EncodeAll, DecodeAll | None]:
    def encode_all(tensors: list[np.ndarray], positions: list[np.ndarray]) -> list[Parts]:
        return [encode(t, p) for t, p in zip(tensors, positions)]

    def decode_all(blobs: list[Parts], shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        assert decode_one is not None
        return [decode_one(b, s) for b, s in zip(blobs, shapes)]

    return encode_all, (decode_all if decode_one is not None else None)


def _joined(hi: bytes, lo: bytes, shape: tuple[int, ...]) -> np.ndarray:
    words = (np.frombuffer(hi, np.uint8).astype(np.uint16) << 8) | np.frombuffer(lo, np.uint8)
    return words.view(np.float16).reshape(shape)


def _plane_codec(name: str, compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes],
                 slow: bool = False) -> Codec:
    """Hi and lo byte planes, each compressed alone."""
    def encode(tensor: np.ndarray, _positions: np.ndarray) -> Parts:
        return [compress(np.ascontiguousarray(plane).tobytes()) for plane in planes(tensor)]

    def decode_one(parts: Parts, shape: tuple[int, ...]) -> np.ndarray:
        return _joined(decompress(parts[0]), decompress(parts[1]), shape)

    return Codec(name, *_per_chunk(encode, decode_one), slow=slow)


def _ours(kind: str, theta: float, with_ratio: bool) -> list[Codec]:
    fast = make_codec("fast", kind)
    out = [Codec("fast (one call per chunk)",
                 *_per_chunk(lambda t, p: [fast.encode_many([t])[0]], lambda parts, s: decode(parts[0]))),
           Codec("fast (batched encode_many)", lambda ts, ps: [[b] for b in fast.encode_many(ts)],
                 lambda blobs, shapes: decode_many([b[0] for b in blobs]))]
    if with_ratio:
        ratio = make_codec("ratio", kind, rope=RopeSpec(theta, "half") if kind == "k" else None)
        out.append(Codec("ratio (one call per chunk)",
                         *_per_chunk(lambda t, p: [ratio.encode_many([t], [p])[0]], lambda parts, s: decode(parts[0]))))
    return out


def _general() -> list[Codec]:
    lzma_filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    out = [_plane_codec(f"planes + zstd-{level}", zstandard.ZstdCompressor(level=level).compress,
                        zstandard.ZstdDecompressor().decompress) for level in (3, 19)]
    out.append(_plane_codec("planes + lzma (LZMA2 9e, raw)",
                            lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=lzma_filters),
                            lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=lzma_filters), slow=True))
    return out


def _optional() -> tuple[list[Codec], list[str]]:
    """The peers from PyPI that are installed, and a line for each one that is not."""
    codecs, missing = [], []
    try:
        import brotli
    except ImportError:
        missing.append("brotli: not installed (pip install brotli)")
    else:
        codecs.append(_plane_codec("planes + brotli-11", lambda b: brotli.compress(b, quality=11), brotli.decompress,
                                   slow=True))
    try:
        from pcodec import ChunkConfig, standalone
    except ImportError:
        missing.append("pcodec: not installed (pip install pcodec)")
    else:
        config = ChunkConfig()
        codecs.append(Codec("pcodec (f16, level 8)", *_per_chunk(
            lambda t, p: [standalone.simple_compress(np.ascontiguousarray(t).reshape(-1), config)],
            lambda parts, s: standalone.simple_decompress(parts[0]).reshape(s))))
    try:
        import zipnn
    except ImportError:
        missing.append("zipnn: not installed (pip install zipnn; not in the bench extra: 0.5 builds from source, "
                       "needs torch)")
    else:
        znn = zipnn.ZipNN(input_format="byte", bytearray_dtype="float16", threads=1)
        codecs.append(Codec("ZipNN (fp16)", *_per_chunk(
            lambda t, p: [znn.compress(np.ascontiguousarray(t).tobytes())],
            lambda parts, s: np.frombuffer(znn.decompress(parts[0]), np.float16).reshape(s))))
    try:
        import blosc2
    except ImportError:
        missing.append("blosc2: not installed (pip install blosc2)")
    else:
        blosc2.set_nthreads(1)
        codecs.append(Codec("Blosc2 (shuffle + zstd, clevel 5)", *_per_chunk(
            lambda t, p: [blosc2.compress2(np.ascontiguousarray(t).tobytes(), typesize=2, clevel=5,
                                           filters=[blosc2.Filter.SHUFFLE], codec=blosc2.Codec.ZSTD, nthreads=1)],
            lambda parts, s: np.frombuffer(blosc2.decompress2(parts[0]), np.float16).reshape(s))))
    return codecs, missing


def _original(kind: str) -> Codec:
    return Codec("original adaptive_v22 (size only)", None, None, size_of=lambda t: original_size(t, kind))


@dataclass
class Result:
    """One codec on one (group, kind): bytes, raw bytes and timings over its chunks."""

    chunks: int
    base_chunks: int  # what the codecs that are not sampled code (all, or --max-chunks)
    total_chunks: int
    raw: int = 0
    coded: int = 0
    plain_same_chunks: int = 0
    encode_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    failed: str = ""  # the error that stopped this codec here (its numbers are then not reported)


def _spaced(n: int, m: int) -> list[int]:
    """``m`` evenly spaced indices of ``range(n)`` (all of them when ``m <= 0`` or ``m >= n``)."""
    if m <= 0 or m >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, m)})


def _load(roots: list[Path], layers: set[int] | None, chunk_seq: int, framing: int, default_theta: float):
    """{(group, kind): (tensors, positions)} and the theta of each chunk's dump dir (one theta required)."""
    data: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {
        (g, k): ([], []) for g in GROUPS for k in KINDS}
    thetas = set()
    for root in roots:
        thetas.add(rope_theta(root, default_theta))
        for unit in units(select_entries(root, stage="both", layers=layers), "chunked_grouped",
                          chunk_seq=chunk_seq, framing=framing):
            group = "front" if unit.layer_id < 2 else "deep"
            for kind in KINDS:
                data[(group, kind)][0].append(np.ascontiguousarray(unit.k if kind == "k" else unit.v))
                data[(group, kind)][1].append(unit.positions)
    if len(thetas) > 1:
        raise SystemExit(f"the dump dirs disagree on rope_theta ({sorted(thetas)}): run them apart")
    return data, thetas.pop()


def _verify(name: str, tensors: list[np.ndarray], back: list[np.ndarray]) -> None:
    for i, (t, b) in enumerate(zip(tensors, back)):
        if b.shape != t.shape or not np.array_equal(np.asarray(b).view(np.uint16), t.view(np.uint16)):
            raise ValueError(f"{name}: chunk {i} did not decode bit-exactly")


def _step(codec: Codec, ts: list[np.ndarray], ps: list[np.ndarray], res: Result, first: bool, framing: int) -> None:
    """One pass of ``codec`` over the chunks: sizes and the bit-exact check on the first, timings on all (the
    first pass starts with an untimed warm-up call on one chunk: lazy imports and caches)."""
    if codec.encode_all is None:
        assert codec.size_of is not None
        if first:
            res.coded = sum(codec.size_of(t) + framing for t in ts)
        return
    if first:
        warm = codec.encode_all(ts[:1], ps[:1])
        if codec.decode_all is not None:
            codec.decode_all(warm, [ts[0].shape])
    t0 = time.perf_counter()
    blobs = codec.encode_all(ts, ps)
    res.encode_s.append(time.perf_counter() - t0)
    if first:
        res.coded = sum(sum(len(b) for b in parts) + framing for parts in blobs)
    if codec.decode_all is not None:
        t0 = time.perf_counter()
        back = codec.decode_all(blobs, [t.shape for t in ts])
        res.decode_s.append(time.perf_counter() - t0)
        if first:
            _verify(codec.name, ts, back)


def run(data, codecs_by_kind: dict[str, list[Codec]], args) -> dict[tuple[str, str, str], Result]:
    """Code every (group, kind) with every codec: sizes and verification on the first pass, timings on all."""
    results: dict[tuple[str, str, str], Result] = {}
    plain = zstandard.ZstdCompressor(level=3)
    started = time.perf_counter()
    for (group, kind), (tensors, positions) in data.items():
        if not tensors:
            continue
        base = _spaced(len(tensors), args.max_chunks)
        for pass_no in range(max(args.repeats, args.slow_repeats)):
            for codec in codecs_by_kind[kind]:
                if pass_no >= (args.slow_repeats if codec.slow else args.repeats):
                    continue
                picked = [base[i] for i in _spaced(len(base), args.slow_chunks)] if codec.slow else base
                ts, ps = [tensors[i] for i in picked], [positions[i] for i in picked]
                res = results.setdefault((group, kind, codec.name), Result(len(picked), len(base), len(tensors)))
                if pass_no == 0:
                    res.raw = sum(t.nbytes for t in ts)
                    res.plain_same_chunks = sum(len(plain.compress(np.ascontiguousarray(p)))
                                                for t in ts for p in planes(t)) + args.framing * len(ts)
                if res.failed:
                    continue
                try:
                    _step(codec, ts, ps, res, pass_no == 0, args.framing)
                except Exception as exc:  # a codec that breaks is reported, the others still run
                    res.failed = f"{type(exc).__name__}: {exc}"
                print(f"[{time.perf_counter() - started:7.1f}s] {group} {kind.upper()} pass {pass_no + 1}: "
                      f"{codec.name}: {len(ts)} chunks, " + (f"FAILED {res.failed}" if res.failed else
                                                               f"ratio {res.raw / res.coded:.4f}"), file=sys.stderr)
    return results


def _mb_s(raw: list[int], seconds: list[list[float]]) -> float | None:
    """MB/s of the summed raw bytes over the summed per-pass median times (None without timings)."""
    if not all(seconds):
        return None
    return sum(raw) / 1e6 / sum(statistics.median(s) for s in seconds)


def summarise(results: dict[tuple[str, str, str], Result], names: list[str]) -> list[dict]:
    """Per codec: ratio, encode/decode MB/s for each group and part, sample sizes."""
    rows = []
    for name in names:
        row: dict = {"codec": name}
        for group in GROUPS:
            for part, kinds in (("k", ("k",)), ("v", ("v",)), ("kv", KINDS)):
                rs = [results[(group, k, name)] for k in kinds if (group, k, name) in results]
                if len(rs) != len(kinds):
                    continue
                if any(r.failed for r in rs):
                    row[f"{group}_{part}"] = {"failed": "; ".join(r.failed for r in rs if r.failed)}
                    continue
                raw, coded = sum(r.raw for r in rs), sum(r.coded for r in rs)
                row[f"{group}_{part}"] = {
                    "ratio": raw / coded, "raw_bytes": raw, "bytes": coded,
                    "plain_zstd3_same_chunks": raw / sum(r.plain_same_chunks for r in rs),
                    "chunks": sum(r.chunks for r in rs), "base_chunks": sum(r.base_chunks for r in rs),
                    "total_chunks": sum(r.total_chunks for r in rs),
                    "encode_mb_s": _mb_s([r.raw for r in rs], [r.encode_s for r in rs]),
                    "decode_mb_s": _mb_s([r.raw for r in rs], [r.decode_s for r in rs]),
                    "passes": len(rs[0].encode_s),
                }
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(row: dict, key: str) -> dict | None:
    """The row's numbers for ``key`` ("front_kv", ...), or None where the codec did not run or failed."""
    cell = row.get(key)
    return None if cell is None or "failed" in cell else cell


def print_tables(rows: list[dict], missing: list[str], args) -> None:
    print(f"\n### Ratio (online framing: {args.chunk_seq}-token chunks, +{args.framing} bytes each)\n")
    print("| codec | front K | front V | front K+V | deep K | deep V | deep K+V | chunks coded, K+V (front / deep) |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for row in rows:
        cells = [("FAILED" if f"{g}_{p}" in row else "-") if _cell(row, f"{g}_{p}") is None
                 else f"{row[f'{g}_{p}']['ratio']:.4f}" for g in GROUPS for p in ("k", "v", "kv")]
        kv = {g: _cell(row, f"{g}_kv") for g in GROUPS}
        counts = " / ".join(f"{c['chunks']} of {c['total_chunks']}" if c else "-" for c in kv.values())
        print(f"| {row['codec']} | " + " | ".join(cells) + f" | {counts} |")
        sampled = [g for g, c in kv.items() if c and c["chunks"] < c["base_chunks"]]
        if sampled:
            notes.append(f"{row['codec']}: sampled (slow); plain zstd-3 on the same chunks: " + ", ".join(
                f"{g} K+V {kv[g]['plain_zstd3_same_chunks']:.4f}" for g in sampled))
        notes += [f"{row['codec']}: FAILED on {key}: {cell['failed']}" for key, cell in row.items()
                  if isinstance(cell, dict) and "failed" in cell and key.endswith("_kv")]
    for note in notes:
        print(f"\n- {note}")
    print("\n### Speed (K+V, MB/s of raw fp16, one thread, median over passes)\n")
    print("| codec | front encode | front decode | deep encode | deep decode | passes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        kv = [_cell(row, f"{g}_kv") for g in GROUPS]
        cells = [_fmt(c[f"{d}_mb_s"] if c else None, 1) for c in kv for d in ("encode", "decode")]
        passes = max((c["passes"] for c in kv if c), default=0)
        print(f"| {row['codec']} | " + " | ".join(cells) + f" | {passes} |")
    for line in missing:
        print(f"\n- {line}")


def plot(rows: list[dict], path: Path) -> None:
    """Ratio (K+V) against encode MB/s (log x) for front and deep; the original as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5))
    markers, colors = "os^vD<>pPX*h", plt.get_cmap("tab10").colors
    handles: dict[str, object] = {}
    for ax, group in zip(axes, GROUPS):
        labelled: list[tuple[float, float]] = []  # (encode MB/s, ratio) of the points already labelled here
        chunks = max((c["base_chunks"] for row in rows if (c := _cell(row, f"{group}_kv"))), default=0)
        for i, row in enumerate(rows):
            cell = _cell(row, f"{group}_kv")
            if cell is None:
                continue
            if cell["encode_mb_s"] is None:  # a size-only yardstick: a line at its ratio
                ax.axhline(cell["ratio"], color="grey", ls="--", lw=1)
                ax.annotate(f"{row['codec']}: {cell['ratio']:.4f}", (0.01, cell["ratio"]), ha="left", va="bottom",
                            xycoords=("axes fraction", "data"), fontsize=8, color="grey")
                continue
            cells = [c for c in (_cell(row, f"{g}_kv") for g in GROUPS) if c]
            sampled = " (a sample)" if any(c["chunks"] < c["base_chunks"] for c in cells) else ""
            handles[row["codec"] + sampled] = ax.scatter(cell["encode_mb_s"], cell["ratio"], s=60,
                                                         marker=markers[i % len(markers)], color=colors[i % 10])
            near = any(abs(r - cell["ratio"]) < 0.003 and 0.5 < m / cell["encode_mb_s"] < 2 for m, r in labelled)
            if not near:  # one label for points that sit on each other (the fast profile, one call and batched)
                ax.annotate(f"{cell['ratio']:.3f}", (cell["encode_mb_s"], cell["ratio"]), textcoords="offset points",
                            xytext=(6, 4), fontsize=7)
                labelled.append((cell["encode_mb_s"], cell["ratio"]))
        ax.set_xscale("log")
        ax.set_xlabel("encode MB/s (raw fp16, one thread, log scale)")
        ax.set_ylabel("lossless ratio, K+V")
        ax.set_title(f"{group} layers ({'0-1' if group == 'front' else '2+'}): {chunks} chunks, K and V"
                     + (" (sampled codecs: fewer)" if any(c["chunks"] < c["base_chunks"] for row in rows
                                                          if (c := _cell(row, f"{group}_kv"))) else ""))
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("KV codecs on real dumps, online framing (192-token chunks, +8 bytes each)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dump_dirs", nargs="+", type=Path)
    parser.add_argument("--layers", default="", help="comma-separated layer ids (default: all)")
    parser.add_argument("--max-chunks", type=int, default=0, help="chunks per group and kind, evenly spaced (0: all)")
    parser.add_argument("--slow-chunks", type=int, default=48, help="chunks per group and kind for lzma and brotli")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slow-repeats", type=int, default=1)
    parser.add_argument("--chunk-seq", type=int, default=192)
    parser.add_argument("--framing", type=int, default=8)
    parser.add_argument("--rope-theta", type=float, default=100000.0,
                        help="RoPE theta when the dump meta has no rope_theta (default: SmolLM2's 100000)")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if min(args.repeats, args.slow_repeats) < 1 or args.chunk_seq < 1 or args.framing < 0:
        parser.error("--repeats/--slow-repeats and --chunk-seq must be >= 1, --framing >= 0")
    layers = {int(x) for x in args.layers.split(",") if x.strip()} or None
    data, theta = _load(args.dump_dirs, layers, args.chunk_seq, args.framing, args.rope_theta)
    if not any(ts for ts, _ in data.values()):
        parser.error("no dump entry selected")
    with_ratio = ratio_available()
    optional, missing = _optional()
    if not with_ratio:
        missing.insert(0, "ratio: not built (h2o_kernels.codec.ratio does not import)")
    codecs = {kind: _ours(kind, theta, with_ratio) + _general() + optional + [_original(kind)] for kind in KINDS}
    results = run(data, codecs, args)
    rows = summarise(results, [c.name for c in codecs["k"]])
    print_tables(rows, missing, args)
    failed = any("failed" in cell for row in rows for cell in row.values() if isinstance(cell, dict))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rope_theta": theta,
                                         "rows": rows, "missing": missing}, indent=2))
    if args.plot:
        plot(rows, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
