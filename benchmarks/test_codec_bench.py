"""Codec encode/decode of realistic KV blocks against plain zstd-3 of the split hi/lo planes.

Run with ``pytest benchmarks`` (not part of the normal test run). Each seq size is one benchmark
group holding, for K and V, the codec and the plain baseline on the same bytes; ``extra_info`` records
the compression ratio and MB/s (of raw fp16 bytes). ``H2O_BENCH_KV_DIR`` switches to real KV dumps
(see ``benchmarks/conftest.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import zstandard

from h2o_kernels.codec.fp16 import FP16Codec, decode, decode_many, inspect
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT

SIZES = (192, 640)
PREDICTOR_SETS = {"K": (K_DEFAULT, K_DEFAULT), "V": (V_DEFAULT, V_DEFAULT)}


def split_planes(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    words = np.ascontiguousarray(tensor).view(np.uint16)
    return (words >> 8).astype(np.uint8), words.astype(np.uint8)


def plain_encode(cctx: zstandard.ZstdCompressor, tensor: np.ndarray) -> tuple[bytes, bytes]:
    hi, lo = split_planes(tensor)
    return cctx.compress(hi), cctx.compress(lo)


def plain_decode(dctx: zstandard.ZstdDecompressor, frames: tuple[bytes, bytes], shape) -> np.ndarray:
    hi = np.frombuffer(dctx.decompress(frames[0]), dtype=np.uint8).astype(np.uint16)
    lo = np.frombuffer(dctx.decompress(frames[1]), dtype=np.uint8)
    return ((hi << 8) | lo).view(np.float16).reshape(shape)


def record(benchmark, tensor: np.ndarray, compressed: int, source: str) -> None:
    benchmark.extra_info["source"] = source
    benchmark.extra_info["shape"] = list(tensor.shape)
    benchmark.extra_info["raw_bytes"] = tensor.nbytes
    benchmark.extra_info["compressed_bytes"] = compressed
    benchmark.extra_info["ratio"] = round(tensor.nbytes / compressed, 4)
    stats = getattr(benchmark, "stats", None)  # None when benchmarking is disabled
    mean = getattr(getattr(stats, "stats", None), "mean", None)
    if mean:
        benchmark.extra_info["mb_s"] = round(tensor.nbytes / 1e6 / mean, 1)


@pytest.mark.parametrize("kind", ["K", "V"])
@pytest.mark.parametrize("seq", SIZES)
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_codec(benchmark, kv_block, seq, kind, op):
    tensor, source = kv_block(seq, kind)
    codec = FP16Codec(*PREDICTOR_SETS[kind], block_seq=64, level=3)
    blob = codec.encode(tensor)
    benchmark.group = f"kv block seq={seq}"
    benchmark.name = f"codec-{op} {kind}"
    if op == "encode":
        result = benchmark(codec.encode, tensor)
        assert result == blob
    else:
        result = benchmark(decode, blob)
        assert np.array_equal(result.view(np.uint16), tensor.view(np.uint16))
    record(benchmark, tensor, len(blob), source)
    info = inspect(blob)
    benchmark.extra_info["hi_predictors"] = sorted(set(info.hi.predictors))
    benchmark.extra_info["lo_predictors"] = sorted(set(info.lo.predictors))


@pytest.mark.parametrize("kind", ["K", "V"])
@pytest.mark.parametrize("seq", SIZES)
@pytest.mark.parametrize("op", ["encode", "decode"])
def test_plain_zstd3(benchmark, kv_block, seq, kind, op):
    tensor, source = kv_block(seq, kind)
    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    frames = plain_encode(cctx, tensor)
    benchmark.group = f"kv block seq={seq}"
    benchmark.name = f"plain-zstd3-{op} {kind}"
    if op == "encode":
        result = benchmark(plain_encode, cctx, tensor)
        assert result == frames
    else:
        result = benchmark(plain_decode, dctx, frames, tensor.shape)
        assert np.array_equal(result.view(np.uint16), tensor.view(np.uint16))
    record(benchmark, tensor, sum(len(f) for f in frames), source)


@pytest.mark.parametrize("seq", SIZES)
def test_codec_is_not_worse_than_plain_planes(kv_block, seq):
    """Not a timing: on the same bytes the codec's blob is at most a header's worth above plain."""
    for kind in ("K", "V"):
        tensor, _ = kv_block(seq, kind)
        blob = FP16Codec(*PREDICTOR_SETS[kind]).encode(tensor)
        plain = sum(len(f) for f in plain_encode(zstandard.ZstdCompressor(level=3), tensor))
        assert len(blob) <= plain + inspect(blob).header_bytes + 64, (kind, len(blob), plain)


@pytest.mark.parametrize("kind", ["K", "V"])
@pytest.mark.parametrize("op", ["encode", "decode"])
@pytest.mark.parametrize("coder", ["codec", "plain-zstd3"])
def test_window_batch(benchmark, kv_windows, kind, op, coder):
    """Many 192-token windows per call, as ``h2o-gate offline`` codes them (``encode_many``)."""
    windows, source = kv_windows(192, kind)
    raw = sum(w.nbytes for w in windows)
    benchmark.group = "192-token windows, batched"
    benchmark.name = f"{coder}-{op} {kind}"
    if coder == "codec":
        codec = FP16Codec(*PREDICTOR_SETS[kind])
        blobs = codec.encode_many(windows)
        run = (lambda: codec.encode_many(windows)) if op == "encode" else (lambda: decode_many(blobs))
        size = sum(len(b) for b in blobs)
    else:
        cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
        frames = [plain_encode(cctx, w) for w in windows]
        run = ((lambda: [plain_encode(cctx, w) for w in windows]) if op == "encode"
               else (lambda: [plain_decode(dctx, f, w.shape) for f, w in zip(frames, windows)]))
        size = sum(len(a) + len(b) for a, b in frames)
    benchmark.pedantic(run, rounds=15, warmup_rounds=2)
    benchmark.extra_info.update(source=source, windows=len(windows), raw_bytes=raw, ratio=round(raw / size, 4))
    stats = getattr(benchmark, "stats", None)  # None when benchmarking is disabled
    if stats is not None:
        benchmark.extra_info["mb_s"] = round(raw / 1e6 / stats.stats.median, 1)
