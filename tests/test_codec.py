"""The fp16 predictive codec and its predictors, through their public API.

The blob layouts used by the forging tests are the ones documented in ``h2o_kernels.codec.fp16``'s
module docstring: version 1 (fixed header at 0..28, plane table at 28..38, predictor ids, header CRC;
written with ``FP16Codec(version=1)``) and version 3 (varint header, no blob check; the default).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import xxhash
import zstandard
from h2o_test_helpers import realistic_kv, smooth_kv, words_of
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from h2o_kernels.codec import _fastcore
from h2o_kernels.codec.fp16 import CODEC_NAME, FORMAT_VERSION, CodecError, FP16Codec, decode, decode_many, inspect
from h2o_kernels.codec.predictors import FORWARD, K_DEFAULT, PREDICTOR_IDS, PREDICTORS, V_DEFAULT, parse_predictors

# --- the documented blob layout ------------------------------------------------------------------

FIXED = struct.Struct("<4sBBBBIIIII")  # magic, version, dtype, planes, reserved, seq, heads, dim, block, crc
PLANE = struct.Struct("<BI")  # stage byte, payload length
IDS_AT = FIXED.size + 2 * PLANE.size  # 38
FIELDS = {  # name: (offset, struct format)
    "magic": (0, "4s"), "version": (4, "B"), "dtype": (5, "B"), "planes": (6, "B"), "reserved": (7, "B"),
    "seq": (8, "<I"), "kv_heads": (12, "<I"), "head_dim": (16, "<I"), "block_seq": (20, "<I"),
    "tensor_crc": (24, "<I"), "hi_stage": (28, "B"), "hi_len": (29, "<I"), "lo_stage": (33, "B"),
    "lo_len": (34, "<I"),
}
U32_MAX = 0xFFFFFFFF

# fp16 bit patterns worth forcing into generated data
SPECIAL_WORDS = [
    0x0000, 0x8000,  # +0.0, -0.0
    0x7C00, 0xFC00,  # +inf, -inf
    0x7E00, 0xFE00, 0x7C01, 0xFC01, 0x7FFF, 0xFFFF, 0x7D55,  # quiet/signalling NaNs with payloads
    0x0001, 0x8001, 0x03FF, 0x83FF, 0x0200,  # subnormals
    0x0400, 0x8400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00,  # smallest normal, max finite, +-1
]


def tensor_check(words: np.ndarray) -> int:
    """The documented tensor check: low 32 bits of XXH3-64 over the shape (3 x u32), then the words."""
    return xxhash.xxh3_64_intdigest(struct.pack("<III", *words.shape) + words.astype("<u2").tobytes()) & U32_MAX


def blob_check(buf: bytes | bytearray, at: int) -> int:
    """The documented blob check at offset ``at``: XXH3-64 (low 32 bits) of the bytes before it, then
    of the payloads."""
    return xxhash.xxh3_64_intdigest(bytes(buf[:at]) + bytes(buf[at + 4:])) & U32_MAX


def blocks_of(seq: int, block_seq: int) -> int:
    return -(-seq // block_seq)


def header_len(blob: bytes) -> int:
    seq, block_seq = struct.unpack_from("<I", blob, 8)[0], struct.unpack_from("<I", blob, 20)[0]
    return IDS_AT + 2 * blocks_of(seq, block_seq) + 4


def forge(blob: bytes, reseal: bool, crc_blocks: int | None = None, **fields) -> bytes:
    """Rewrite header fields at their documented offsets; optionally recompute the blob CRC.

    The blob CRC goes where the forged header says it is (``crc_blocks`` overrides the block
    count, e.g. when the forged block_seq is 0), if that still lies inside the blob.
    """
    buf = bytearray(blob)
    for name, value in fields.items():
        if name.startswith("id"):  # id<N>: the N-th predictor id byte (hi blocks, then lo blocks)
            buf[IDS_AT + int(name[2:])] = value
        else:
            offset, fmt = FIELDS[name]
            struct.pack_into(fmt, buf, offset, value)
    if reseal:
        if crc_blocks is None:
            seq, block_seq = struct.unpack_from("<I", buf, 8)[0], struct.unpack_from("<I", buf, 20)[0]
            crc_blocks = blocks_of(seq, block_seq) if block_seq else 0
        at = IDS_AT + 2 * crc_blocks
        if at + 4 <= len(buf):
            struct.pack_into("<I", buf, at, blob_check(buf, at))
    return bytes(buf)


def assert_decodes_to(blob: bytes, expected_words: np.ndarray, **kwargs) -> None:
    out = decode(blob, **kwargs)
    assert out.dtype == np.float16
    assert out.shape == expected_words.shape
    assert np.array_equal(words_of(out), expected_words)


def raises_or_exact(blob: bytes, expected_words: np.ndarray, **kwargs) -> bool:
    """Decode must raise CodecError or return exactly the original; True when it raised."""
    try:
        out = decode(blob, **kwargs)
    except CodecError:
        return True
    assert out.shape == expected_words.shape, f"tampered blob decoded to another shape {out.shape}"
    assert np.array_equal(words_of(out), expected_words), "tampered blob decoded to a different tensor"
    return False


# --- strategies ----------------------------------------------------------------------------------

predictor_sets = st.lists(st.sampled_from(PREDICTORS), min_size=1, max_size=len(PREDICTORS), unique=True)
word_elements = st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL_WORDS))


@st.composite
def word_tensors(draw, max_seq: int = 80, max_heads: int = 4, max_dim: int = 9) -> np.ndarray:
    """uint16 ``[seq, kv_heads, head_dim]``: arbitrary bits, or smooth/repetitive data with specials."""
    seq = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, max_seq)))
    shape = (seq, draw(st.integers(1, max_heads)), draw(st.integers(1, max_dim)))
    kind = draw(st.sampled_from(["bits", "walk", "repeat"]))
    if kind == "bits":
        return draw(hnp.arrays(np.uint16, shape, elements=word_elements))
    start = draw(hnp.arrays(np.uint16, (1, *shape[1:]), elements=word_elements))
    if kind == "walk":  # small random steps along seq: sequence predictors pay off
        steps = draw(hnp.arrays(np.int8, shape, elements=st.integers(-3, 3)))
        words = (start.astype(np.int64) + np.cumsum(steps, axis=0)) % 0x10000
    else:  # a few rows repeated, with the odd special value sprinkled in
        words = np.repeat(start, seq, axis=0).astype(np.int64)
        if seq:
            words[draw(st.integers(0, seq - 1))] = draw(st.sampled_from(SPECIAL_WORDS))
    return np.ascontiguousarray(words, dtype=np.uint16)


# --- round trips ---------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(words=word_tensors(), hi=predictor_sets, lo=predictor_sets, block_seq=st.integers(1, 70),
       choose=st.sampled_from(["estimate", "exhaustive"]), level=st.integers(1, 5), version=st.sampled_from([1, 3]))
def test_round_trip_is_bit_exact(words, hi, lo, block_seq, choose, level, version):
    codec = FP16Codec(tuple(hi), ",".join(lo), block_seq=block_seq, level=level, choose=choose, version=version)
    tensor = words.view(np.float16)
    before = words.copy()
    blob = codec.encode(tensor)
    assert isinstance(blob, bytes)
    assert np.array_equal(words, before), "encode modified its input"
    assert_decodes_to(blob, words)

    info = inspect(blob)
    seq, heads, dim = words.shape
    blocks = blocks_of(seq, info.block_seq)
    assert info.version == version
    assert info.shape == words.shape
    assert info.block_seq == block_seq or version == 3
    if version == 1:
        assert info.check == tensor_check(words)
        assert info.header_bytes == IDS_AT + 2 * blocks + 4
    else:  # magic, version, flags, 3 varints, block_seq varint, packed ids, check
        assert info.check == v3_check(blob[:info.header_bytes - 4], blob[info.header_bytes:], words)
        assert info.header_bytes <= 6 + 3 * 5 + 5 + (2 * blocks + 1) // 2 + 4
    assert info.blob_bytes == len(blob)
    assert info.raw_bytes == words.nbytes
    assert len(info.hi.predictors) == len(info.lo.predictors) == blocks
    # (a block falling back to raw outside the configured set: see test_planes_only_use_their_own_predictors)
    assert set(info.hi.predictors) <= {*hi, "raw"}, "hi plane used a predictor outside its set"
    assert set(info.lo.predictors) <= {*lo, "raw"}, "lo plane used a predictor outside its set"
    for plane in (info.hi, info.lo):
        assert plane.entropy in ("stored", "zstd")
    assert info.lo.payload_bytes <= words.size  # lo stored as is at worst
    # incompressible data is stored, not expanded (the hi plane may carry one reference row)
    assert info.hi.payload_bytes <= words.size + heads * dim


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(words=word_tensors(max_seq=40))
def test_decode_accepts_bytes_like_objects(words):
    blob = FP16Codec(block_seq=8).encode(words.view(np.float16))
    for form in (blob, bytearray(blob), memoryview(blob)):
        assert_decodes_to(form, words)
        assert inspect(form) == inspect(blob)


@pytest.mark.parametrize("shape", [(1024, 2, 32), (3121, 3, 7)], ids=["1024x2x32", "3121x3x7-odd"])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
@pytest.mark.parametrize("predictors", [*[(p,) for p in PREDICTORS], K_DEFAULT], ids=[*PREDICTORS, "all"])
def test_every_fp16_bit_pattern_round_trips(shape, order, predictors):
    count = int(np.prod(shape))
    patterns = np.arange(0x10000, dtype=np.uint16)
    if order == "shuffled":
        patterns = np.random.default_rng(7).permutation(patterns)
    words = np.resize(patterns, count).reshape(shape)  # every pattern at least once
    assert len(np.unique(words)) == 0x10000
    for choose in ("estimate", "exhaustive"):
        codec = FP16Codec(predictors, predictors, block_seq=61, choose=choose)
        blob = codec.encode(words.view(np.float16))
        assert_decodes_to(blob, words)
        assert set(inspect(blob).lo.predictors) <= {*predictors, "raw"}


def test_special_values_survive_semantically():
    words = np.array(SPECIAL_WORDS, dtype=np.uint16).reshape(-1, 1, 1)
    words = np.repeat(words, 3, axis=2)
    out = decode(FP16Codec(block_seq=5).encode(words.view(np.float16)))
    src = words.view(np.float16)
    assert np.array_equal(np.signbit(out), np.signbit(src))  # -0.0 keeps its sign
    assert np.array_equal(np.isnan(out), np.isnan(src))
    assert np.array_equal(np.isinf(out), np.isinf(src))
    assert np.array_equal(words_of(out), words)  # NaN payloads and subnormals bit for bit


@pytest.mark.parametrize("shape", [(0, 1, 1), (0, 3, 5), (1, 1, 1), (1, 4, 9), (2, 1, 7)])
@pytest.mark.parametrize("predictors", [("raw",), ("delta_seq",), ("pair_delta_delta_seq",), K_DEFAULT])
def test_tiny_shapes_round_trip(shape, predictors):
    words = np.random.default_rng(3).integers(0, 0x10000, size=shape, dtype=np.uint16)
    blob = FP16Codec(predictors, predictors).encode(words.view(np.float16))
    assert_decodes_to(blob, words)
    assert len(inspect(blob).hi.predictors) == blocks_of(shape[0], 64)


def test_non_contiguous_and_big_endian_inputs_round_trip():
    base = np.random.default_rng(4).integers(0, 0x10000, size=(6, 5, 4, 2), dtype=np.uint16).view(np.float16)
    view = base[..., 1].transpose(1, 0, 2)  # [5, 6, 4], not contiguous
    assert not view.flags.c_contiguous
    expected = words_of(view)
    assert_decodes_to(FP16Codec().encode(view), expected)
    big = view.astype(">f2")
    assert_decodes_to(FP16Codec().encode(big), expected)


def test_encode_is_deterministic():
    x = realistic_kv(np.random.default_rng(5), 100, 2, 16)
    assert FP16Codec().encode(x) == FP16Codec().encode(x)


def test_batch_api_matches_single_blob_api():
    rng = np.random.default_rng(6)
    tensors = [realistic_kv(rng, 40, 2, 8), smooth_kv(40, 2, 8), realistic_kv(rng, 13, 1, 3),
               realistic_kv(rng, 40, 2, 8)]
    codec = FP16Codec(block_seq=16)
    blobs = codec.encode_many(tensors)
    assert blobs == [FP16Codec(block_seq=16).encode(t) for t in tensors]
    decoded = decode_many(blobs)
    for out, t in zip(decoded, tensors):
        assert np.array_equal(words_of(out), words_of(t))
    bad = bytearray(blobs[2])
    bad[-1] ^= 0x40
    with pytest.raises(CodecError):
        decode_many([blobs[0], bytes(bad), blobs[3]])


# --- the documented format -----------------------------------------------------------------------


def test_blob_layout_matches_the_documented_header():
    words = np.random.default_rng(8).integers(0, 0x10000, size=(70, 3, 5), dtype=np.uint16)
    blob = FP16Codec(block_seq=32, version=1).encode(words.view(np.float16))
    magic, version, dtype, planes, reserved, seq, heads, dim, block_seq, crc = FIXED.unpack_from(blob)
    assert (magic, version, dtype, planes, reserved) == (b"H2KV", 1, 1, 2, 0)
    assert (seq, heads, dim, block_seq) == (70, 3, 5, 32)
    assert crc == tensor_check(words)
    blocks = 3
    crc_at = IDS_AT + 2 * blocks
    assert struct.unpack_from("<I", blob, crc_at)[0] == blob_check(blob, crc_at)
    hi_len, lo_len = PLANE.unpack_from(blob, 28)[1], PLANE.unpack_from(blob, 33)[1]
    assert crc_at + 4 + hi_len + lo_len == len(blob)
    info = inspect(blob)
    ids = blob[IDS_AT:crc_at]
    assert info.hi.predictors == tuple(PREDICTORS[i] for i in ids[:blocks])
    assert info.lo.predictors == tuple(PREDICTORS[i] for i in ids[blocks:])
    assert CODEC_NAME == "h2o-fp16-predictive"
    # forging helper sanity: resealing an untouched blob reproduces it byte for byte
    assert forge(blob, reseal=True) == blob


def _hand_built_blob(words: np.ndarray, block_seq: int, predictor: str, zstd: bool) -> bytes:
    """A blob written from the documented layout alone, with a reference implementation."""
    seq, heads, dim = words.shape
    blocks = blocks_of(seq, block_seq)
    planes = [(words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)]
    table, payloads = b"", []
    for plane in planes:
        coded = np.concatenate([ref_forward(predictor, plane[s:s + block_seq])
                                for s in range(0, seq, block_seq)]).tobytes()
        payload = zstandard.ZstdCompressor(level=3).compress(coded) if zstd else coded
        table += PLANE.pack(1 if zstd else 0, len(payload))
        payloads.append(payload)
    ids = bytes([PREDICTORS.index(predictor)] * (2 * blocks))
    head = FIXED.pack(b"H2KV", 1, 1, 2, 0, seq, heads, dim, block_seq, tensor_check(words)) + table + ids
    body = b"".join(payloads)
    return head + struct.pack("<I", xxhash.xxh3_64_intdigest(head + body) & U32_MAX) + body


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("zstd", [False, True], ids=["stored", "zstd"])
def test_decodes_a_blob_built_from_the_documented_layout(predictor, zstd):
    rng = np.random.default_rng(9)
    words = (rng.integers(15000, 15100, size=(37, 2, 5)) + np.arange(37)[:, None, None]).astype(np.uint16)
    blob = _hand_built_blob(words, block_seq=10, predictor=predictor, zstd=zstd)
    assert_decodes_to(blob, words)
    info = inspect(blob)
    assert info.hi.predictors == info.lo.predictors == (predictor,) * 4
    assert info.hi.entropy == ("zstd" if zstd else "stored")


# --- structured data compresses --------------------------------------------------------------------


def ratio(tensor: np.ndarray, codec: FP16Codec | None = None) -> float:
    blob = (codec or FP16Codec()).encode(tensor)
    assert_decodes_to(blob, words_of(tensor))
    return tensor.nbytes / len(blob)


@pytest.mark.parametrize("value", [0.0, -0.0, 1.2345, float("nan"), float("-inf")])
def test_constant_tensor_compresses_enormously(value):
    x = np.full((256, 4, 64), value, dtype=np.float16)
    assert ratio(x) > 200
    assert ratio(x, FP16Codec(V_DEFAULT, V_DEFAULT)) > 200


def test_repeated_rows_compress_enormously():
    row = realistic_kv(np.random.default_rng(10), 1, 4, 64)
    x = np.repeat(row, 256, axis=0)
    assert ratio(x) > 50
    assert ratio(x, FP16Codec("raw,delta_seq", "raw,delta_seq", block_seq=16)) > 30


def test_smooth_ramp_picks_delta_seq_and_beats_raw():
    x = smooth_kv(256, 4, 64)
    restricted = FP16Codec(("raw", "delta_seq"), ("raw", "delta_seq"))
    info = inspect(restricted.encode(x))
    assert info.lo.predictors == ("delta_seq",) * 4, info
    raw_only = ratio(x, FP16Codec("raw", "raw"))
    with_delta = ratio(x, restricted)
    assert with_delta > 10
    assert with_delta > 1.3 * raw_only
    assert ratio(x) > 10


def test_random_walk_compresses_well_with_sequence_predictors():
    rng = np.random.default_rng(11)
    start = rng.integers(14000, 16000, size=(1, 4, 64))
    words = (start + np.cumsum(rng.integers(-2, 3, size=(256, 4, 64)), axis=0)).astype(np.uint16)
    x = words.view(np.float16)
    assert ratio(x) > 3
    assert ratio(x) > 1.8 * ratio(x, FP16Codec("raw", "raw"))


def test_realistic_kv_compresses_a_little():
    x = realistic_kv(np.random.default_rng(12), 256, 4, 64)
    assert 1.05 < ratio(x) < 1.6
    assert 1.05 < ratio(x, FP16Codec(V_DEFAULT, V_DEFAULT)) < 1.6


def test_incompressible_data_is_stored_not_expanded():
    words = np.random.default_rng(13).integers(0, 0x10000, size=(256, 4, 64), dtype=np.uint16)
    blob = FP16Codec().encode(words.view(np.float16))
    info = inspect(blob)
    assert info.lo.entropy == "stored"
    assert len(blob) <= words.nbytes + info.header_bytes + 4 * 64


@pytest.mark.parametrize("maker", ["ramp", "walk", "repeat", "realistic", "mixed"])
@pytest.mark.parametrize("seq,block_seq", [(256, 64), (2048, 64), (256, 8), (100, 7)])
def test_estimate_is_never_much_worse_than_exhaustive(maker, seq, block_seq):
    rng = np.random.default_rng(14)
    heads, dim = 2, 16
    if maker == "ramp":
        x = smooth_kv(seq, heads, dim)
    elif maker == "walk":
        start = rng.integers(14000, 16000, size=(1, heads, dim))
        x = (start + np.cumsum(rng.integers(-2, 3, size=(seq, heads, dim)), axis=0)).astype(np.uint16)
        x = x.view(np.float16)
    elif maker == "repeat":
        x = np.repeat(realistic_kv(rng, 1, heads, dim), seq, axis=0)
    elif maker == "realistic":
        x = realistic_kv(rng, seq, heads, dim)
    else:  # smooth first half, realistic second half
        x = smooth_kv(seq, heads, dim)
        x[seq // 2:] = realistic_kv(rng, seq - seq // 2, heads, dim)
    estimate = len(FP16Codec(block_seq=block_seq, choose="estimate").encode(x))
    exhaustive = len(FP16Codec(block_seq=block_seq, choose="exhaustive").encode(x))
    assert estimate <= 1.15 * exhaustive + 64, (estimate, exhaustive)


def test_long_sequence_estimate_still_picks_delta_for_a_ramp():
    # many blocks (2 planes x 5 candidates x 64 blocks > 256 histogram rows)
    x = smooth_kv(512, 1, 16)
    info = inspect(FP16Codec(K_DEFAULT, ("raw", "delta_seq"), block_seq=8).encode(x))
    assert info.lo.predictors.count("delta_seq") >= 60, info.lo.predictors


def test_inspect_reports_the_predictor_of_each_block():
    rng = np.random.default_rng(15)
    words = np.empty((128, 2, 16), dtype=np.uint16)
    words[:64] = (np.arange(64)[:, None, None] * 3 + rng.integers(0, 200, size=(1, 2, 16)) + 15000)
    # second half: lo bytes iid from two values: raw codes ~1 bit each, a row delta ~1.5 bits
    words[64:] = 0x3C00 + rng.choice(np.array([0x11, 0x93]), size=(64, 2, 16))
    for choose in ("estimate", "exhaustive"):
        info = inspect(FP16Codec(("raw", "delta_seq"), ("raw", "delta_seq"), block_seq=32, choose=choose)
                       .encode(words.view(np.float16)))
        assert info.lo.predictors == ("delta_seq", "delta_seq", "raw", "raw"), (choose, info)
        assert len(info.hi.predictors) == 4
    for p in PREDICTORS:
        info = inspect(FP16Codec(p, p, block_seq=50).encode(words.view(np.float16)))
        # version 3 keeps block_seq only where decoding depends on it (else the blob says 64)
        assert info.block_seq == (50 if {*info.hi.predictors, *info.lo.predictors} - {"raw", "pair_delta"} else 64)
        assert len(info.hi.predictors) == len(info.lo.predictors) == blocks_of(128, info.block_seq)
        assert set(info.hi.predictors) | set(info.lo.predictors) <= {p, "raw"}




@pytest.mark.parametrize("choose", ["estimate", "exhaustive"])
def test_planes_only_use_their_own_predictors(choose):
    words = np.random.default_rng(18).integers(0, 0x10000, size=(24, 2, 8), dtype=np.uint16)
    info = inspect(FP16Codec(("delta_seq",), "xor_seq,pair_delta", block_seq=8, choose=choose)
                   .encode(words.view(np.float16)))
    assert set(info.hi.predictors) == {"delta_seq"}, info.hi.predictors
    assert set(info.lo.predictors) <= {"xor_seq", "pair_delta"}, info.lo.predictors


# --- corrupted blobs -------------------------------------------------------------------------------


def _small_blobs(version: int) -> dict[str, tuple[np.ndarray, bytes]]:
    rng = np.random.default_rng(16)
    cases = {
        "random-stored": (rng.integers(0, 0x10000, size=(7, 2, 3), dtype=np.uint16), {"block_seq": 3}),
        "smooth-zstd": (words_of(smooth_kv(40, 2, 5)), {"block_seq": 16}),
        "realistic": (words_of(realistic_kv(rng, 16, 2, 8)), {"block_seq": 5}),
        "zeros-zstd": (np.zeros((40, 2, 5), dtype=np.uint16), {"hi_predictors": "raw", "lo_predictors": "raw"}),
        "seq0": (np.zeros((0, 2, 3), dtype=np.uint16), {}),
        "seq1": (np.array([[[0x7E01]]], dtype=np.uint16), {}),
    }
    return {name: (w, FP16Codec(**kw, version=version).encode(w.view(np.float16))) for name, (w, kw) in cases.items()}


SMALL = _small_blobs(1)  # version 1: the forging tests below use its fixed layout


def test_small_blobs_cover_stored_and_zstd_planes():
    stages = {p.entropy for _, blob in SMALL.values() for p in (inspect(blob).hi, inspect(blob).lo)}
    assert stages == {"stored", "zstd"}
    for words, blob in SMALL.values():
        assert_decodes_to(blob, words)


@pytest.mark.parametrize("name", list(SMALL))
def test_every_truncation_raises(name):
    _, blob = SMALL[name]
    for n in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:n])
        with pytest.raises(CodecError):
            inspect(blob[:n])


_LARGE_WORDS = words_of(realistic_kv(np.random.default_rng(17), 300, 3, 16))
_LARGE_BLOB = FP16Codec(block_seq=32, version=1).encode(_LARGE_WORDS.view(np.float16))


@settings(max_examples=100)
@given(data=st.data())
def test_truncating_a_large_blob_raises(data):
    n = data.draw(st.integers(0, len(_LARGE_BLOB) - 1))
    with pytest.raises(CodecError):
        decode(_LARGE_BLOB[:n])
    assert_decodes_to(_LARGE_BLOB, _LARGE_WORDS)


@settings(max_examples=100)
@given(extra=st.binary(min_size=1, max_size=64), name=st.sampled_from(sorted(SMALL)))
def test_appended_bytes_raise(extra, name):
    _, blob = SMALL[name]
    with pytest.raises(CodecError):
        decode(blob + extra)
    with pytest.raises(CodecError):
        inspect(blob + extra)


@settings(max_examples=60)
@given(extra=st.binary(min_size=1, max_size=16))
def test_prepended_bytes_raise(extra):
    _, blob = SMALL["smooth-zstd"]
    with pytest.raises(CodecError):
        decode(extra + blob)


def _flip(blob: bytes, bit: int) -> bytes:
    buf = bytearray(blob)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


@pytest.mark.parametrize("name", list(SMALL))
def test_no_single_bit_flip_yields_a_wrong_tensor(name):
    words, blob = SMALL[name]
    for bit in range(8 * len(blob)):
        raises_or_exact(_flip(blob, bit), words)


def test_every_single_bit_flip_in_the_header_raises():
    for _, blob in SMALL.values():
        for bit in range(8 * header_len(blob)):
            with pytest.raises(CodecError):
                decode(_flip(blob, bit))


@settings(max_examples=200)
@given(data=st.data())
def test_random_bit_flips_never_yield_a_wrong_tensor(data):
    bits = data.draw(st.lists(st.integers(0, 8 * len(_LARGE_BLOB) - 1), min_size=1, max_size=3, unique=True))
    blob = _LARGE_BLOB
    for bit in bits:
        blob = _flip(blob, bit)
    raised = raises_or_exact(blob, _LARGE_WORDS)
    if any(bit < 8 * header_len(_LARGE_BLOB) for bit in bits):
        assert raised, "a flip inside the header was not detected"


# --- forged header fields ---------------------------------------------------------------------------

_FORGE_WORDS, _FORGE_BLOB = SMALL["smooth-zstd"]  # seq 40, heads 2, dim 5, block_seq 16 -> 3 blocks
_FORGE_IDS = _FORGE_BLOB[IDS_AT:IDS_AT + 6]


@pytest.mark.parametrize("reseal", [False, True], ids=["stale-crc", "recomputed-crc"])
@pytest.mark.parametrize("fields", [
    {"magic": b"H2KW"}, {"magic": b"\0\0\0\0"}, {"version": 0}, {"version": 2}, {"version": 255},
    {"dtype": 0}, {"dtype": 2}, {"planes": 1}, {"planes": 3}, {"reserved": 1},
    {"block_seq": 0}, {"seq": 41}, {"seq": 39}, {"kv_heads": 3}, {"head_dim": 4},
    {"tensor_crc": 0}, {"hi_stage": 0x80}, {"lo_stage": 0xFF}, {"hi_len": 0}, {"lo_len": U32_MAX},
    {"id0": len(PREDICTORS)}, {"id5": 255},  # unknown predictor ids
    {"id2": (_FORGE_IDS[2] + 1) % len(PREDICTORS)}, {"id3": (_FORGE_IDS[3] + 2) % len(PREDICTORS)},
], ids=lambda f: ",".join(f"{k}={v!r}" for k, v in f.items()))
def test_forged_header_fields_raise(fields, reseal):
    crc_blocks = 3 if fields.get("block_seq") == 0 else None
    blob = forge(_FORGE_BLOB, reseal=reseal, crc_blocks=crc_blocks, **fields)
    assert blob != _FORGE_BLOB
    with pytest.raises(CodecError):
        decode(blob)


_ONE_BLOCK_BLOB = FP16Codec(block_seq=64, version=1).encode(smooth_kv(40, 2, 5))  # seq 40 < block_seq: one block


@pytest.mark.parametrize("fields", [
    {"seq": U32_MAX},  # header would need 8 GiB of predictor ids
    {"seq": U32_MAX, "block_seq": U32_MAX},  # one block, 2 x 4 GiB planes
    {"kv_heads": U32_MAX}, {"head_dim": U32_MAX},
    {"seq": U32_MAX, "kv_heads": U32_MAX, "head_dim": U32_MAX, "block_seq": U32_MAX},
    {"seq": 1 << 20, "block_seq": 1 << 20, "head_dim": 1 << 9},  # 2 GiB: just at the default limit
    {"seq": 1 << 20, "block_seq": 1 << 20, "head_dim": 1 << 8},  # 1 GiB: under the default limit
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("reseal", [False, True], ids=["stale-crc", "recomputed-crc"])
def test_enormous_forged_shapes_raise_without_allocating(fields, reseal):
    blob = forge(_ONE_BLOCK_BLOB, reseal=reseal, **fields)
    if reseal and fields != {"seq": U32_MAX}:
        # a consistent forgery: the CRC validates, only the payloads' capacity (or the size limit) gives it away
        with pytest.raises(CodecError, match="cannot hold|over max_output_bytes"):
            inspect(blob)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode(blob)
        with pytest.raises(CodecError):
            decode(blob, max_output_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"decoding a forged header allocated {peak} bytes"


_RLIMIT_SCRIPT = """
import resource, sys
from h2o_kernels.codec.fp16 import CodecError, decode
blob = bytearray(bytes.fromhex(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
try:
    decode(bytes(blob))
except CodecError:
    print("CodecError")
except MemoryError:
    print("MemoryError")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS semantics are Linux's")
def test_forged_1gib_header_raises_codec_error_under_a_memory_limit():
    blob = forge(_ONE_BLOCK_BLOB, reseal=True, seq=1 << 20, block_seq=1 << 20, head_dim=256)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _RLIMIT_SCRIPT, blob.hex()], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert proc.stdout.strip() == "CodecError", (proc.stdout, proc.stderr[-2000:])


def test_forged_shape_within_limits_but_without_payload_raises():
    # a consistent, CRC-valid header for a bigger tensor than the payloads can hold
    blob = forge(_FORGE_BLOB, reseal=True, seq=48, block_seq=16)
    with pytest.raises(CodecError):
        decode(blob)


@settings(max_examples=500)
@given(data=st.data())
def test_any_forged_field_with_recomputed_crc_raises_or_decodes_exactly(data):
    name = data.draw(st.sampled_from([*FIELDS, "id"]))
    if name == "id":
        index = data.draw(st.integers(0, 5))
        value = data.draw(st.integers(0, 255))
        assume(value != _FORGE_BLOB[IDS_AT + index])
        fields = {f"id{index}": value}
    elif name == "magic":
        fields = {"magic": data.draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != b"H2KV"))}
    else:
        offset, fmt = FIELDS[name]
        old = struct.unpack_from(fmt, _FORGE_BLOB, offset)[0]
        top = 0xFF if fmt == "B" else U32_MAX
        value = data.draw(st.one_of(st.integers(0, top), st.integers(max(0, old - 3), min(top, old + 3))))
        assume(value != old)
        fields = {name: value}
    blob = forge(_FORGE_BLOB, reseal=True, **fields)
    raised = raises_or_exact(blob, _FORGE_WORDS, max_output_bytes=1 << 22)
    if name not in ("block_seq", "id"):  # those may legitimately describe the same tensor
        assert raised, f"forged {fields} decoded without an error"


def test_forged_tensor_crc_raises_even_with_valid_header_crc():
    for _, blob in SMALL.values():
        crc = struct.unpack_from("<I", blob, 24)[0]
        with pytest.raises(CodecError):
            decode(forge(blob, reseal=True, tensor_crc=crc ^ 1))


def test_swapping_payload_contents_is_detected():
    words, blob = SMALL["random-stored"]
    other_words = np.random.default_rng(99).integers(0, 0x10000, size=words.shape, dtype=np.uint16)
    other = FP16Codec(block_seq=3, version=1).encode(other_words.view(np.float16))
    h = inspect(blob).header_bytes
    assert len(other) == len(blob) and inspect(other).hi.entropy == "stored"
    with pytest.raises(CodecError):
        decode(blob[:h] + other[h:])  # someone else's payloads under this header


# --- max_output_bytes --------------------------------------------------------------------------------


def test_max_output_bytes_is_respected():
    words, blob = SMALL["smooth-zstd"]
    assert_decodes_to(blob, words, max_output_bytes=words.nbytes)
    with pytest.raises(CodecError):
        decode(blob, max_output_bytes=words.nbytes - 1)
    with pytest.raises(CodecError):
        decode(blob, max_output_bytes=0)
    empty_words, empty = SMALL["seq0"]
    assert_decodes_to(empty, empty_words, max_output_bytes=0)
    for version_blob in (blob, SMALL3["smooth-zstd"][1]):  # inspect refuses what decode would refuse
        assert inspect(version_blob, max_output_bytes=words.nbytes).raw_bytes == words.nbytes
        with pytest.raises(CodecError, match="over max_output_bytes"):
            inspect(version_blob, max_output_bytes=words.nbytes - 1)


# --- input validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint16, np.int8])
def test_encode_refuses_non_fp16_without_casting(dtype):
    with pytest.raises(TypeError):
        FP16Codec().encode(np.zeros((4, 2, 8), dtype=dtype))


def test_encode_refuses_python_floats():
    with pytest.raises(TypeError):
        FP16Codec().encode([[[1.0, 2.0]]])


@pytest.mark.parametrize("shape", [(), (8,), (4, 8), (2, 2, 2, 2)])
def test_encode_refuses_non_3d(shape):
    with pytest.raises(ValueError):
        FP16Codec().encode(np.zeros(shape, dtype=np.float16))


@pytest.mark.parametrize("kwargs,fragment", [
    ({"block_seq": 0}, "block_seq"), ({"block_seq": -3}, "block_seq"),
    ({"choose": "best"}, "choose"), ({"hi_predictors": "raw,bogus"}, "hi_predictors"),
    ({"lo_predictors": ("nope",)}, "lo_predictors"), ({"hi_predictors": ""}, "empty"),
    ({"lo_predictors": ()}, "empty"),
])
def test_codec_options_are_validated(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        FP16Codec(**kwargs)


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)
    with pytest.raises(ValueError):
        decode(b"not a blob at all, just some bytes")


# --- predictors ----------------------------------------------------------------------------------------


def ref_forward(name: str, x: np.ndarray) -> np.ndarray:
    """Straightforward reference of the documented transforms, in int64 then mod 256."""
    xi = x.astype(np.int64)

    def delta(a):
        out = a.copy()
        for r in range(1, a.shape[-3]):
            out[..., r, :, :] = a[..., r, :, :] - a[..., r - 1, :, :]
        return out

    def pair(a):
        out = a.copy()
        for d in range(1, a.shape[-1], 2):
            out[..., d] = a[..., d] - a[..., d - 1]
        return out

    if name == "raw":
        y = xi
    elif name == "delta_seq":
        y = delta(xi)
    elif name == "xor_seq":
        y = xi.copy()
        for r in range(1, xi.shape[-3]):
            y[..., r, :, :] = xi[..., r, :, :] ^ xi[..., r - 1, :, :]
    elif name == "pair_delta":
        y = pair(xi)
    else:
        y = delta(pair(xi))
    return (y % 256).astype(np.uint8)


def c_inverse(name: str, y: np.ndarray) -> np.ndarray:
    """The C kernel's inverse of ``name`` on each block of ``y`` (``[*leading, rows, heads, dim]``), through
    ``decode_planes`` with ``y`` as the hi plane (one block per leading index)."""
    rows, heads, dim = y.shape[-3:]
    blocks = y.reshape(int(np.prod(y.shape[:-3], dtype=np.int64)), rows, heads, dim)
    out = np.empty_like(blocks)
    for b, block in enumerate(blocks):
        words = np.empty((rows, heads, dim), dtype="<u2")
        ids = bytes([PREDICTOR_IDS[name], 0]) if rows else b""
        _fastcore.decode_planes(words, block.tobytes(), bytes(block.size), rows, heads, dim, max(rows, 1), ids, False)
        out[b] = (words >> 8).astype(np.uint8)
    return out.reshape(y.shape)


@st.composite
def byte_blocks(draw) -> np.ndarray:
    """uint8 ``[*leading, rows, heads, dim]`` with 0..2 leading (plane/block) axes."""
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    shape = (*lead, draw(st.integers(0, 9)), draw(st.integers(1, 3)), draw(st.integers(1, 7)))
    return draw(hnp.arrays(np.uint8, tuple(shape)))


@given(x=byte_blocks(), name=st.sampled_from(PREDICTORS))
def test_predictors_invert_and_match_the_reference(x, name):
    before = x.copy()
    y = FORWARD[name](x)
    assert np.array_equal(x, before), "forward transform modified its input"
    assert y.dtype == np.uint8 and y.shape == x.shape
    assert np.array_equal(y, ref_forward(name, x))
    z = c_inverse(name, y)
    assert z.dtype == np.uint8 and z.shape == x.shape
    assert np.array_equal(z, x)


def test_pair_delta_with_odd_head_dim_keeps_the_last_dim():
    x = np.array([[[10, 13, 200, 5, 77]]], dtype=np.uint8)  # [rows=1, heads=1, dim=5]
    y = FORWARD["pair_delta"](x)
    assert y.tolist() == [[[10, 3, 200, (5 - 200) % 256, 77]]]
    assert np.array_equal(c_inverse("pair_delta", y), x)
    for dim in (3, 5, 7, 9):
        # odd dims copy their even neighbour (+3): pair_delta pays on the lo plane, even for odd head_dim
        words = np.random.default_rng(dim).integers(15000, 15100, size=(40, 2, dim)).astype(np.uint16)
        words[..., 1::2] = words[..., 0:2 * (dim // 2):2] + 3
        for p in ("pair_delta", "pair_delta_delta_seq"):
            for choose in ("estimate", "exhaustive"):
                blob = FP16Codec(p, p, block_seq=7, choose=choose).encode(words.view(np.float16))
                assert_decodes_to(blob, words)
                assert set(inspect(blob).lo.predictors) == {p}
    for dim in (1, 3, 5):  # and arbitrary bits round-trip whatever is chosen
        words = np.random.default_rng(dim).integers(0, 0x10000, size=(20, 2, dim), dtype=np.uint16)
        assert_decodes_to(FP16Codec("pair_delta", "pair_delta", block_seq=7).encode(words.view(np.float16)), words)


def test_sequence_predictors_restart_at_each_block():
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 2, 2)  # two blocks of three rows
    for name in ("delta_seq", "xor_seq"):
        y = FORWARD[name](x)
        assert np.array_equal(y[:, 0], x[:, 0]), "a block's first row must be kept"
        assert np.array_equal(c_inverse(name, y), x)


def test_predictor_tables():
    assert PREDICTORS[0] == "raw"
    assert K_DEFAULT == PREDICTORS
    assert set(V_DEFAULT) <= set(PREDICTORS)
    assert set(FORWARD) == set(PREDICTOR_IDS) == set(PREDICTORS)


@pytest.mark.parametrize("text,expected", [
    ("raw", ("raw",)), ("raw,delta_seq", ("raw", "delta_seq")), (" xor_seq , raw ,", ("xor_seq", "raw")),
    ("raw,raw,delta_seq,raw", ("raw", "delta_seq")), (["pair_delta", "raw"], ("pair_delta", "raw")),
    (("delta_seq",), ("delta_seq",)), (",".join(PREDICTORS), PREDICTORS),
])
def test_parse_predictors(text, expected):
    assert parse_predictors(text, "what") == expected


@pytest.mark.parametrize("text,fragment", [
    ("raw,bogus", "bogus"), ("Raw", "Raw"), ("raw;delta_seq", "raw;delta_seq"), ("", "empty"),
    (" , ,", "empty"), ([], "empty"), (["raw", "nope"], "nope"),
])
def test_parse_predictors_errors_name_the_option_and_problem(text, fragment):
    with pytest.raises(ValueError) as info:
        parse_predictors(text, "--k-hi-predictors")
    assert "--k-hi-predictors" in str(info.value)
    assert fragment in str(info.value)


# --- zero-width tensors -------------------------------------------------------------------------------



@pytest.mark.parametrize("shape", [(5, 0, 3), (5, 2, 0)])
def test_zero_width_tensor_round_trips_with_raw(shape):
    words = np.zeros(shape, dtype=np.uint16)
    assert_decodes_to(FP16Codec().encode(words.view(np.float16)), words)


@pytest.mark.parametrize("shape", [(5, 0, 3), (5, 2, 0)])
def test_zero_width_tensor_round_trips_with_any_predictor(shape):
    words = np.zeros(shape, dtype=np.uint16)
    assert_decodes_to(FP16Codec("delta_seq", "delta_seq").encode(words.view(np.float16)), words)


def test_zero_width_blob_with_a_sequence_predictor_decodes_or_raises_codec_error():
    words = np.zeros((5, 0, 3), dtype=np.uint16)
    blob = forge(FP16Codec(version=1).encode(words.view(np.float16)), reseal=True, id0=1, id1=1)  # delta_seq
    assert inspect(blob).hi.predictors == ("delta_seq",)
    raises_or_exact(blob, words)


# --- the C kernel (h2o_kernels.codec._fastcore) -----------------------------------------------------


def kernel_planes(words: np.ndarray, hi: tuple[str, ...], lo: tuple[str, ...], block_seq: int, center: int) -> tuple:
    seq, heads, dim = words.shape
    return _fastcore.encode_planes(words, seq, heads, dim, block_seq, bytes(PREDICTOR_IDS[p] for p in hi),
                                   bytes(PREDICTOR_IDS[p] for p in lo), center, 0.02, 0.10, 0.02, 0.015)


def offset_channels(seq: int, heads: int, dim: int, seed: int) -> np.ndarray:
    """K-like words: each channel its own magnitude and sign (centering pays)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 2.5, size=(1, heads, dim)))
    return words_of((rng.normal(0.0, 1.0, size=(seq, heads, dim)) * scale).astype(np.float16))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(words=word_tensors(max_seq=70, max_dim=7), hi=predictor_sets, lo=predictor_sets, block_seq=st.integers(1, 40),
       center=st.sampled_from([0, 1]))
def test_kernel_planes_are_the_documented_transforms(words, hi, lo, block_seq, center):
    """Every predictor, centering on and off: the kernel's planes are FORWARD of its own decisions."""
    seq, heads, dim = words.shape
    coded_hi, plain_hi, coded_lo, plain_lo, ids, centered, _, lo_bits, repeats, hi_repeats, uncentered = kernel_planes(
        words, tuple(hi), tuple(lo), block_seq, center)
    blocks = blocks_of(seq, block_seq)
    assert len(ids) == 2 * blocks
    assert set(PREDICTORS[i] for i in ids[:blocks]) <= set(hi) and set(PREDICTORS[i] for i in ids[blocks:]) <= set(lo)
    assert not centered or (center and seq >= 2)
    ref = heads * dim if centered else 0
    hi_plane = (words >> 8).astype(np.uint8)
    if centered:
        reference = np.frombuffer(coded_hi[:ref], dtype=np.uint8).reshape(heads, dim)
        hi_plane = ((hi_plane << 1) | (hi_plane >> 7)) - reference
    for k, (plane, coded, plain) in enumerate(((hi_plane, coded_hi[ref:], plain_hi),
                                               ((words & 0xFF).astype(np.uint8), coded_lo, plain_lo))):
        expected = [ref_forward(PREDICTORS[ids[k * blocks + b]], plane[b * block_seq:(b + 1) * block_seq])
                    for b in range(blocks)]
        assert coded == b"".join(e.tobytes() for e in expected)
        if any(ids[k * blocks:(k + 1) * blocks]):
            assert plain[(ref if k == 0 else 0):] == plane.tobytes()
        else:
            assert plain is None
    assert repeats == sum(any(np.array_equal(words[r] & 0xFF, words[j] & 0xFF) for j in range(r)) for r in range(seq))
    assert hi_repeats == sum(any(np.array_equal(words[r] >> 8, words[j] >> 8) for j in range(r)) for r in range(seq))
    assert uncentered is None or (centered and uncentered == (words >> 8).astype(np.uint8).tobytes())
    assert 0 <= lo_bits <= 8.5


def test_centering_is_chosen_where_it_pays_and_never_when_off():
    words = offset_channels(192, 3, 64, 20)
    blob = FP16Codec().encode(words.view(np.float16))
    assert inspect(blob).hi.centered
    assert_decodes_to(blob, words)
    off = FP16Codec(center=False).encode(words.view(np.float16))
    assert not inspect(off).hi.centered
    assert len(blob) < len(off) - 64  # the reference row costs less than centering saves
    assert_decodes_to(off, words)
    noise = np.random.default_rng(21).integers(0, 0x10000, size=(192, 3, 64), dtype=np.uint16)
    assert not inspect(FP16Codec().encode(noise.view(np.float16))).hi.centered


@pytest.mark.parametrize("shape", [(0, 3, 5), (1, 3, 5), (2, 1, 1), (3, 2, 1), (5, 0, 4), (5, 3, 0), (65, 1, 9),
                                   (129, 3, 64)])
@pytest.mark.parametrize("center", [0, 1])
def test_kernel_handles_odd_shapes(shape, center):
    words = offset_channels(*shape, seed=22)
    out = kernel_planes(words, K_DEFAULT, K_DEFAULT, 64, center)
    assert len(out[2]) == words.size and len(out[0]) in (words.size, words.size + shape[1] * shape[2])
    for codec in (FP16Codec(center=bool(center)), FP16Codec(V_DEFAULT, V_DEFAULT, block_seq=7, choose="exhaustive")):
        assert_decodes_to(codec.encode(words.view(np.float16)), words)


def test_kernel_rejects_bad_arguments():
    words = np.zeros((4, 2, 3), dtype=np.uint16)
    good = (words, 4, 2, 3, 2, b"\0", b"\0", 1, 0.02, 0.1, 0.02, 0.015)
    for index, value, fragment in [(5, b"", "hi_cands"), (6, b"\5", "lo_cands"), (5, bytes(6), "hi_cands"),
                                   (1, 5, "words"), (4, 0, "block_seq")]:
        args = list(good)
        args[index] = value
        with pytest.raises(ValueError, match=fragment):
            _fastcore.encode_planes(*args)
    out = np.empty((4, 2, 3), dtype="<u2")
    with pytest.raises(ValueError, match="sizes"):
        _fastcore.decode_planes(out, bytes(23), bytes(24), 4, 2, 3, 2, bytes(4), False)
    with pytest.raises(ValueError, match="predictor id"):
        _fastcore.decode_planes(out, bytes(24), bytes(24), 4, 2, 3, 2, bytes([0, 9, 0, 0]), False)


def test_lo_plane_goes_to_zstd_only_where_it_may_shrink():
    rng = np.random.default_rng(23)
    noise = rng.integers(0, 0x10000, size=(128, 3, 64), dtype=np.uint16)
    assert inspect(FP16Codec(V_DEFAULT, V_DEFAULT).encode(noise.view(np.float16))).lo.entropy == "stored"
    repeated = noise.copy()
    repeated[64:] = noise[:64]  # layer-0 V: a repeated token repeats its row
    info = inspect(FP16Codec(V_DEFAULT, V_DEFAULT).encode(repeated.view(np.float16)))
    assert info.lo.entropy == "zstd" and info.lo.payload_bytes < 0.6 * repeated.size
    few = 0x3C00 + rng.choice(np.array([0x11, 0x93]), size=(128, 3, 64)).astype(np.uint16)  # 1 bit a lo byte
    assert inspect(FP16Codec("raw", "raw").encode(few.view(np.float16))).lo.payload_bytes < 0.3 * few.size


def test_positions_are_accepted_and_ignored():
    words = offset_channels(40, 2, 8, 24)
    codec = FP16Codec()
    blob = codec.encode(words.view(np.float16))
    assert codec.encode(words.view(np.float16), positions=np.arange(7, 47)) == blob
    assert codec.encode_many([words.view(np.float16)] * 2, positions=[None, np.arange(40)]) == [blob, blob]
    with pytest.raises(ValueError, match="positions"):
        codec.encode_many([words.view(np.float16)], positions=[None, None])


# --- blob version 3 (the default): layout, fuzzing and forgery twins of the version-1 tests ----------

V3_FLAGS = {"hi_zstd": 1, "hi_centered": 2, "lo_zstd": 4, "block_seq": 8, "ids": 16, "hi_mixed": 32, "lo_mixed": 64}


def leb128(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def read_leb128(blob: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (blob[at] & 0x7F) << shift
        shift += 7
        at += 1
        if not blob[at - 1] & 0x80:
            return value, at


def v3_header(blob: bytes) -> dict:
    """The documented version-3 header fields of a blob, and where its payloads start."""
    assert blob[:5] == b"H2KV\x03"
    flags, at = blob[5], 6
    shape = []
    for _ in range(3):
        value, at = read_leb128(blob, at)
        shape.append(value)
    block_seq = 64
    if flags & V3_FLAGS["block_seq"]:
        block_seq, at = read_leb128(blob, at)
    blocks = blocks_of(shape[0], block_seq)
    nibbles: list[int] = []
    if flags & V3_FLAGS["ids"]:
        count = (blocks if flags & V3_FLAGS["hi_mixed"] else 1) + (blocks if flags & V3_FLAGS["lo_mixed"] else 1)
        nibbles = [n for byte in blob[at:at + (count + 1) // 2] for n in (byte & 15, byte >> 4)][:count]
        at += (count + 1) // 2
    return {"flags": flags, "shape": tuple(shape), "block_seq": block_seq, "nibbles": nibbles,
            "check": struct.unpack_from("<I", blob, at)[0], "payload_at": at + 4}


def v3_check(head: bytes, payload: bytes, words: np.ndarray) -> int:
    """The documented version-3 check: XXH3-64 (low 32 bits) of the header before it, the payloads, the shape
    (3 x u32) and the words."""
    data = head + payload + struct.pack("<III", *words.shape) + words.astype("<u2").tobytes()
    return xxhash.xxh3_64_intdigest(data) & U32_MAX


def build_v3(flags: int, shape: tuple[int, int, int], words: np.ndarray | int, payload: bytes, block_seq: bytes = b"",
             ids: bytes = b"", head: bytes | None = None) -> bytes:
    """A version-3 blob from raw field bytes (forgeries included); its check computed over ``words``, or
    ``words`` itself where that is an int."""
    if head is None:
        head = b"H2KV\x03" + bytes([flags]) + b"".join(leb128(n) for n in shape) + block_seq + ids
    check = words if isinstance(words, int) else v3_check(head, payload, words)
    return head + struct.pack("<I", check) + payload


def strip_frame(data: bytes) -> bytes:
    """A reference version-3 zstd payload: a level-3 frame without magic, less its rebuilt header."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, source_size=len(data), window_log=max(10, (len(data) - 1).bit_length()),
        format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=1, write_checksum=0, write_dict_id=0)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(data)
    header = 2 if len(data) < 256 else 3 if len(data) < 65792 else 5
    assert frame[0] == (0x20 | (0 if header == 2 else 0x40 if header == 3 else 0x80))
    return frame[header:]


def test_v3_blob_layout_matches_the_documented_header():
    words = np.empty((100, 3, 5), dtype=np.uint16)
    words[:50] = (np.arange(50)[:, None, None] * 3 + 15000).astype(np.uint16)  # delta_seq pays
    words[50:] = np.random.default_rng(30).integers(0, 0x10000, size=(50, 3, 5), dtype=np.uint16)
    blob = FP16Codec(("raw", "delta_seq"), ("raw", "delta_seq"), block_seq=25, center=False).encode(
        words.view(np.float16))
    head = v3_header(blob)
    info = inspect(blob)
    assert info.version == FORMAT_VERSION == 3 and head["shape"] == info.shape == (100, 3, 5)
    assert head["check"] == info.check == v3_check(blob[:info.header_bytes - 4], blob[info.header_bytes:], words)
    assert head["block_seq"] == info.block_seq == 25 and head["flags"] & V3_FLAGS["block_seq"]
    assert head["payload_at"] == info.header_bytes <= 20
    assert info.header_bytes + info.hi.payload_bytes + info.lo.payload_bytes == len(blob)
    blocks, nibbles = 4, list(head["nibbles"])
    for plane, mixed in ((info.hi, V3_FLAGS["hi_mixed"]), (info.lo, V3_FLAGS["lo_mixed"])):
        ids = [nibbles.pop(0) for _ in range(blocks)] if head["flags"] & mixed else [nibbles.pop(0)] * blocks
        assert plane.predictor_ids == bytes(ids)
    assert "delta_seq" in info.hi.predictors + info.lo.predictors
    assert bool(head["flags"] & V3_FLAGS["hi_zstd"]) == (info.hi.entropy == "zstd")
    assert_decodes_to(blob, words)
    # a real 192-token KV chunk: the whole header is 14 bytes against version 1's 48
    kv = words_of(realistic_kv(np.random.default_rng(31), 192, 3, 64))
    assert inspect(FP16Codec().encode(kv.view(np.float16))).header_bytes == 14
    assert inspect(FP16Codec(version=1).encode(kv.view(np.float16))).header_bytes == 48


@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("zstd", [False, True], ids=["stored", "zstd"])
def test_v3_decodes_a_blob_built_from_the_documented_layout(predictor, zstd):
    rng = np.random.default_rng(9)
    words = (rng.integers(15000, 15100, size=(37, 2, 5)) + np.arange(37)[:, None, None]).astype(np.uint16)
    payloads = []
    for plane in ((words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)):
        coded = np.concatenate([ref_forward(predictor, plane[s:s + 10]) for s in range(0, 37, 10)]).tobytes()
        payloads.append(strip_frame(coded) if zstd else coded)
    pid = PREDICTORS.index(predictor)
    flags = (V3_FLAGS["hi_zstd"] | V3_FLAGS["lo_zstd"] if zstd else 0) | (V3_FLAGS["ids"] if pid else 0)
    sequence = predictor in ("delta_seq", "xor_seq", "pair_delta_delta_seq")
    blob = build_v3(flags | (V3_FLAGS["block_seq"] if sequence else 0), words.shape, words,
                    b"".join(payloads), leb128(10) if sequence else b"", bytes([pid | pid << 4]) if pid else b"")
    assert_decodes_to(blob, words)
    assert inspect(blob).hi.predictors == inspect(blob).lo.predictors == (predictor,) * (4 if sequence else 1)


def test_v3_reads_what_version_1_wrote_and_both_decode_alike():
    for words, blob in SMALL.values():
        assert inspect(blob).version == 1
        assert_decodes_to(blob, words)
    for (_, blob1), (_, blob3) in zip(SMALL.values(), SMALL3.values()):
        assert inspect(blob3).version == 3 and len(blob3) < len(blob1)
        assert np.array_equal(decode(blob1).view(np.uint16), decode(blob3).view(np.uint16))
    with pytest.raises(ValueError, match="version"):
        FP16Codec(version=2)


SMALL3 = _small_blobs(3)
_LARGE_BLOB3 = FP16Codec(block_seq=32).encode(_LARGE_WORDS.view(np.float16))


def test_v3_small_blobs_cover_stored_zstd_ids_and_block_seq():
    heads = [v3_header(blob) for _, blob in SMALL3.values()]
    assert {h["flags"] & V3_FLAGS["hi_zstd"] for h in heads} == {0, 1}
    assert any(h["nibbles"] for h in heads) and any(h["flags"] & V3_FLAGS["block_seq"] for h in heads)


@pytest.mark.parametrize("name", list(SMALL3))
def test_v3_every_truncation_and_extension_raises(name):
    _, blob = SMALL3[name]
    for n in range(len(blob)):
        for call in (decode, inspect):
            with pytest.raises(CodecError):
                call(blob[:n])
    for extra in (b"\0", b"\x01", b"\0\0\0\0", bytes(range(40))):
        with pytest.raises(CodecError):
            decode(blob + extra)
        with pytest.raises(CodecError):
            decode(extra + blob)


@pytest.mark.parametrize("version, name", [(1, n) for n, (_, b) in SMALL.items() if len(b) > header_len(b)]
                         + [(3, n) for n in SMALL3])
def test_every_single_bit_flip_raises(version, name):
    words, blob = (SMALL if version == 1 else SMALL3)[name]
    accepted = [bit for bit in range(8 * len(blob)) if not raises_or_exact(_flip(blob, bit), words)]
    assert not accepted, f"flipping bits {accepted[:10]} of a {len(blob)}-byte v{version} blob was not detected"


@settings(max_examples=200)
@given(data=st.data())
def test_v3_random_bit_flips_and_truncations_of_a_large_blob_raise(data):
    bits = data.draw(st.lists(st.integers(0, 8 * len(_LARGE_BLOB3) - 1), min_size=1, max_size=3, unique=True))
    blob = _LARGE_BLOB3
    for bit in bits:
        blob = _flip(blob, bit)
    assert raises_or_exact(blob, _LARGE_WORDS), f"flipping bits {bits} was not detected"
    with pytest.raises(CodecError):
        decode(_LARGE_BLOB3[:data.draw(st.integers(0, len(_LARGE_BLOB3) - 1))])


_V3_WORDS = W = words_of(smooth_kv(40, 2, 5))


def _v3_parts(**kw) -> tuple:
    blob = FP16Codec(**kw).encode(_V3_WORDS.view(np.float16))
    head = v3_header(blob)
    return head, blob[head["payload_at"]:]


@pytest.mark.parametrize("name,make", [
    ("reserved flag bit", lambda h, p: build_v3(h["flags"] | 0x80, h["shape"], W, p)),
    ("non-minimal varint", lambda h, p: build_v3(0, (), W, p, head=b"H2KV\x03" + bytes([h["flags"]])
                                                 + b"\xa8\x00\x02\x05")),
    ("6-byte varint", lambda h, p: build_v3(0, (), W, p, head=b"H2KV\x03" + bytes([h["flags"]])
                                            + b"\xa8\x80\x80\x80\x80\x00\x02\x05")),
    ("seq over 2**32", lambda h, p: build_v3(h["flags"], (1 << 32, 2, 5), W, p)),
    ("block_seq without ids", lambda h, p: build_v3(h["flags"] | 8, h["shape"], W, p, leb128(16))),
    ("mixed without ids", lambda h, p: build_v3(h["flags"] | 32, h["shape"], W, p)),
    ("all-raw ids", lambda h, p: build_v3(h["flags"] | 16, h["shape"], W, p, ids=b"\0")),
    ("unknown id", lambda h, p: build_v3(h["flags"] | 16, h["shape"], W, p, ids=b"\x05")),
    ("padding nibble", lambda h, p: build_v3(h["flags"] | 16 | 32, h["shape"], W, p, ids=b"\x21\x30")),
    ("per-block ids all one", lambda h, p: build_v3(h["flags"] | 16 | 32, h["shape"], W, p,
                                                    ids=b"\x11\x00")),
    ("stored block_seq 64", lambda h, p: build_v3(h["flags"] | 16 | 8, h["shape"], W, p, leb128(64),
                                                  b"\x01")),
    ("block_seq 0", lambda h, p: build_v3(h["flags"] | 16 | 8, h["shape"], W, p, leb128(0), b"\x01")),
    ("block_seq over seq", lambda h, p: build_v3(h["flags"] | 16 | 8, h["shape"], W, p, leb128(41),
                                                 b"\x01")),
    ("block_seq for row predictors", lambda h, p: build_v3(h["flags"] | 16 | 8, h["shape"], W, p,
                                                           leb128(16), b"\x03")),
    ("centered one row", lambda h, p: build_v3(h["flags"] | 2, (1, 2, 5), W, p)),
    ("stale check", lambda h, p: build_v3(h["flags"], h["shape"], h["check"] ^ 1, p)),
    ("shape", lambda h, p: build_v3(h["flags"], (40, 5, 2), W, p)),
    ("zstd empty plane", lambda h, p: build_v3(5, (0, 2, 5), W, bytes([1, 0, 0, 1, 0, 0]))),
    ("stored as zstd", lambda h, p: build_v3(h["flags"] ^ 1, h["shape"], W, p)),
    ("no payload", lambda h, p: build_v3(h["flags"], h["shape"], W, b"")),
], ids=lambda x: x if isinstance(x, str) else "")
def test_v3_forged_headers_raise(name, make):
    head, payload = _v3_parts(hi_predictors="raw", lo_predictors="raw", center=False)
    assert build_v3(head["flags"], head["shape"], head["check"], payload) == \
        FP16Codec("raw", "raw", center=False).encode(_V3_WORDS.view(np.float16))
    with pytest.raises(CodecError):
        decode(make(head, payload))


@pytest.mark.parametrize("shape", [(U32_MAX, 1, 1), (1, U32_MAX, 1), (U32_MAX, U32_MAX, U32_MAX), (1 << 20, 1, 512),
                                   (1 << 20, 1, 256)])
@pytest.mark.parametrize("zstd", [0, 5])
def test_v3_enormous_forged_shapes_raise_without_allocating(shape, zstd):
    head, payload = _v3_parts(hi_predictors="raw", lo_predictors="raw", center=False)
    blob = build_v3(zstd, shape, head["check"], payload)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode(blob)
        with pytest.raises(CodecError):
            decode(blob, max_output_bytes=1 << 20)
        with pytest.raises(CodecError):
            inspect(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"decoding a forged header allocated {peak} bytes"


def test_v3_swapping_payload_contents_is_detected():
    words, blob = SMALL3["random-stored"]
    other_words = np.random.default_rng(99).integers(0, 0x10000, size=words.shape, dtype=np.uint16)
    other = FP16Codec(block_seq=3).encode(other_words.view(np.float16))
    h = inspect(blob).header_bytes
    assert len(other) == len(blob) and inspect(other).header_bytes == h
    with pytest.raises(CodecError):
        decode(blob[:h] + other[h:])


def test_v3_max_output_bytes_is_respected():
    words, blob = SMALL3["smooth-zstd"]
    assert_decodes_to(blob, words, max_output_bytes=words.nbytes)
    with pytest.raises(CodecError):
        decode(blob, max_output_bytes=words.nbytes - 1)


def test_zstd_frame_size_walks_block_headers():
    frame = strip_frame(bytes(range(256)) * 700)  # 179200 bytes: two blocks
    assert _fastcore.zstd_frame_size(b"xx" + frame + b"yy", 2) == len(frame)
    assert _fastcore.zstd_frame_size(bytes([1, 0, 0]), 0) == 3  # an empty last raw block
    assert _fastcore.zstd_frame_size(bytes([3 | 8, 0, 0, 7]), 0) == 4  # an RLE block: one byte
    for buf, fragment in [(frame[:-1], "past the end"), (bytes([7, 0, 0]), "reserved"),
                          (bytes([1 | (1 << 3), 0, 0x20]), "128 KiB"), (b"", "past the end")]:
        with pytest.raises(ValueError, match=fragment):
            _fastcore.zstd_frame_size(buf, 0)
    with pytest.raises(ValueError, match="start"):
        _fastcore.zstd_frame_size(frame, len(frame) + 1)


def test_repeated_rows_also_try_the_repeat_level(monkeypatch):
    rng = np.random.default_rng(32)
    words = words_of(realistic_kv(rng, 192, 3, 64))
    words[96:] = words[rng.integers(0, 96, size=96)]  # layer-0 V: repeated tokens repeat their rows
    with_repeat = FP16Codec("raw", "raw").encode(words.view(np.float16))
    from h2o_kernels.codec import fp16

    monkeypatch.setattr(fp16, "REPEAT_LEVEL", 3)
    assert len(with_repeat) < len(FP16Codec("raw", "raw").encode(words.view(np.float16)))
    assert_decodes_to(with_repeat, words)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("seq", [64, 128, 192])
def test_v_like_blobs_are_never_larger_than_plain_zstd3_planes(seed, seq):
    words = words_of(realistic_kv(np.random.default_rng(40 + seed), seq, 3, 64))
    plain = sum(len(zstandard.ZstdCompressor(level=3).compress(p.astype(np.uint8).tobytes()))
                for p in (words >> 8, words & 0xFF))
    blob = FP16Codec(V_DEFAULT, V_DEFAULT).encode(words.view(np.float16))
    assert len(blob) <= plain, (len(blob), plain)
