"""The ratio profile (blob version 2, h2o_kernels/codec/ratio.py + _ratiocore.c): bit-exact round trips,
RoPE matching that pays, the safety net, corrupted-blob fuzzing and golden blobs.

Golden blobs (tests/data/ratio_golden_<name>.tensor.bin: raw little-endian fp16, and .blob.bin: its
version-2 blob, encoded with ``safety_net=False`` and ``GOLDEN``'s settings) were made once with
``k, v = repeated_tokens(np.random.default_rng(2026), 24, P, vocab=6, heads=2, dim=16, rope=R)`` (``P``,
``R`` the ``GOLDEN`` positions and RoPE spec, else ``np.arange(24)`` and ``ROPE``); a platform or compiler that
codes other bits fails ``test_golden_blobs_decode_and_re_encode_identically``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h2o_kernels.codec import _ratiocore, profiles
from h2o_kernels.codec.blob import CodecError, check32
from h2o_kernels.codec.ratio import RatioCodec, decode, decode_many, decode_with_info, inspect
from h2o_kernels.codec.rope import RopeSpec

DATA = Path(__file__).parent / "data"
ROPE = RopeSpec(100000.0)
FIXED = struct.Struct("<4sBBBBIHHII")


def words_of(tensor: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tensor).view(np.uint16)


def round_trip(codec: RatioCodec, tensor: np.ndarray, positions=None) -> bytes:
    blob = codec.encode(tensor, positions)
    assert blob[4] == 2
    back = decode(blob)
    assert back.dtype == np.float16 and back.shape == tensor.shape
    assert np.array_equal(words_of(back), words_of(tensor))
    return blob


def smooth_kv(rng: np.random.Generator, seq: int, heads: int = 2, dim: int = 16) -> np.ndarray:
    """Channels with their own centre and spread (what real K/V look like to the model)."""
    mu = rng.normal(0, 2, (heads, dim))
    sd = np.exp(rng.normal(-1, 1, (heads, dim)))
    return (mu + sd * rng.standard_normal((seq, heads, dim))).astype(np.float16)


def rotate(x: np.ndarray, pos: np.ndarray, rope: RopeSpec) -> np.ndarray:
    """RoPE of ``x [seq, heads, dim]`` at ``pos [seq]`` in ``rope``'s layout (float64, test data only)."""
    dim = x.shape[2]
    ang = pos[:, None] * rope.theta ** (-np.arange(dim // 2) * 2.0 / dim)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = (x[..., 0::2], x[..., 1::2]) if rope.layout == "interleaved" else (x[..., :dim // 2], x[..., dim // 2:])
    ra, rb = a * c - b * s, a * s + b * c
    if rope.layout == "interleaved":
        return np.stack([ra, rb], axis=3).reshape(x.shape)
    return np.concatenate([ra, rb], axis=2)


def repeated_tokens(rng: np.random.Generator, seq: int, positions: np.ndarray, vocab: int = 12,
                    heads: int = 2, dim: int = 32, rope: RopeSpec = ROPE) -> tuple[np.ndarray, np.ndarray]:
    """K (rotated to each row's position) and V of a token sequence drawn from a small vocabulary."""
    ids = rng.integers(0, vocab, seq)
    k0 = rng.normal(0, 1.5, (vocab, heads, dim)) * np.exp(rng.normal(0, 0.5, (1, heads, dim)))
    v0 = rng.normal(0, 0.5, (vocab, heads, dim))
    return rotate(k0[ids], positions.astype(np.float64), rope).astype(np.float16), v0[ids].astype(np.float16)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("order", ["natural", "shuffled"])
@pytest.mark.parametrize("rope", [None, ROPE])
def test_every_fp16_bit_pattern_round_trips(order, rope):
    words = np.arange(1 << 16, dtype=np.uint16)
    if order == "shuffled":
        words = np.random.default_rng(1).permutation(words)
    tensor = words.view(np.float16).reshape(1024, 1, 64)
    round_trip(RatioCodec("k", rope=rope, safety_net=False), tensor)


@st.composite
def tensors(draw) -> np.ndarray:
    seq, heads, dim = draw(st.integers(0, 300)), draw(st.integers(1, 4)), draw(st.integers(1, 130))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["bits", "smooth", "repeats"]))
    if style == "bits":
        return rng.integers(0, 1 << 16, (seq, heads, dim), dtype=np.uint16).view(np.float16)
    tensor = smooth_kv(rng, seq, heads, dim)
    if style == "repeats" and seq > 1:
        tensor[1::3] = tensor[rng.integers(0, 1, 1)[0]]
    return tensor


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(tensor=tensors(), kind=st.sampled_from(["k", "v"]), use_rope=st.booleans(),
       layout=st.sampled_from(["half", "interleaved"]), gaps=st.booleans(), seed=st.integers(0, 1000))
def test_round_trip_is_bit_exact(tensor, kind, use_rope, layout, gaps, seed):
    rope = RopeSpec(10000.0, layout) if use_rope and kind == "k" else None
    positions = None
    if gaps:
        positions = np.cumsum(np.random.default_rng(seed).integers(1, 9, tensor.shape[0])) + seed
    round_trip(RatioCodec(kind, rope=rope, safety_net=False), tensor, positions)
    blob = RatioCodec(kind, rope=rope).encode(tensor, positions)  # with the safety net: either version
    assert np.array_equal(words_of(profiles.decode(blob)), words_of(tensor))


def test_special_values_round_trip():
    rng = np.random.default_rng(2)
    tensor = smooth_kv(rng, 64, 2, 16)
    words = words_of(tensor).copy()
    specials = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE37, 0x7FFF, 0x8000, 0x0000, 0x0001, 0x83FF, 0x03FF, 0x7BFF]
    words[5, 0, :len(specials)] = specials
    words[9, 1, :len(specials)] = specials[::-1]
    words[40] = words[5]  # a repeat carrying specials (exact match)
    for rope in (None, ROPE):
        round_trip(RatioCodec("k", rope=rope, safety_net=False), words.view(np.float16))


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 1), (1, 3, 5), (3, 1, 2), (0, 2, 4), (5, 0, 4), (4, 2, 0)])
def test_tiny_and_empty_shapes_round_trip(shape):
    tensor = np.random.default_rng(3).standard_normal(shape).astype(np.float16)
    for rope in (None, ROPE):
        round_trip(RatioCodec("k", rope=rope, safety_net=False), tensor)


def test_encode_is_deterministic_and_batch_matches_single():
    rng = np.random.default_rng(4)
    tensors_ = [smooth_kv(rng, n) for n in (5, 40, 192)]
    codec = RatioCodec("k", rope=ROPE)
    single = [codec.encode(t) for t in tensors_]
    assert codec.encode_many(tensors_) == single == RatioCodec("k", rope=ROPE).encode_many(tensors_)
    back = profiles.decode_many(single)  # the safety net may have picked the fast profile's blob
    assert all(np.array_equal(words_of(b), words_of(t)) for b, t in zip(back, tensors_))


# ---------------------------------------------------------------- the model pays where it should

def test_rope_matching_pays_on_rotated_repeated_tokens():
    rng = np.random.default_rng(5)
    k, _ = repeated_tokens(rng, 192, np.arange(192))
    with_rope = round_trip(RatioCodec("k", rope=ROPE, safety_net=False), k)
    without = round_trip(RatioCodec("k", safety_net=False), k)
    info = inspect(with_rope)
    assert info.rope == ROPE and info.matched_rows >= 150 and inspect(without).matched_rows == 0
    assert len(with_rope) < 0.5 * len(without)


def test_rope_matching_follows_the_layout():
    rng = np.random.default_rng(10)
    inter = RopeSpec(10000.0, "interleaved")
    k, _ = repeated_tokens(rng, 128, np.arange(128), rope=inter)
    right = round_trip(RatioCodec("k", rope=inter, safety_net=False), k)
    wrong = round_trip(RatioCodec("k", rope=RopeSpec(10000.0, "half"), safety_net=False), k)
    assert inspect(right).matched_rows >= 100 and len(right) < 0.6 * len(wrong)


def test_rope_matching_uses_positions_with_gaps():
    rng = np.random.default_rng(6)
    positions = np.cumsum(rng.integers(1, 6, 160)) + 1000
    k, _ = repeated_tokens(rng, 160, positions)
    right = round_trip(RatioCodec("k", rope=ROPE, safety_net=False), k, positions)
    assumed_consecutive = round_trip(RatioCodec("k", rope=ROPE, safety_net=False), k)
    assert inspect(right).positions_listed and not inspect(assumed_consecutive).positions_listed
    assert inspect(right).matched_rows >= 120
    assert len(right) < 0.6 * len(assumed_consecutive)
    shifted = RatioCodec("k", rope=ROPE, safety_net=False).encode(k, np.arange(160) + 77)
    assert not inspect(shifted).positions_listed  # consecutive positions cost nothing, whatever the start


def test_exact_repeats_and_context_model_beat_the_fast_profile():
    rng = np.random.default_rng(7)
    _, v = repeated_tokens(rng, 192, np.arange(192))
    blob = round_trip(RatioCodec("v", safety_net=False), v)
    assert inspect(blob).matched_rows >= 150
    smooth = smooth_kv(rng, 192, 3, 64)
    for kind in ("k", "v"):
        fast = len(profiles.make_codec("fast", kind).encode(smooth))
        assert len(round_trip(RatioCodec(kind, safety_net=False), smooth)) < 0.95 * fast


def test_safety_net_returns_the_fast_blob_where_v2_would_lose():
    noise = np.random.default_rng(8).integers(0, 1 << 16, (64, 2, 32), dtype=np.uint16).view(np.float16)
    v2 = RatioCodec("v", safety_net=False).encode(noise)
    blob = RatioCodec("v").encode(noise)
    fast = profiles.make_codec("fast", "v").encode(noise)
    fast_version = profiles.VERSIONS["fast"]
    assert blob[4] == fast_version and blob == fast and len(fast) <= len(v2)
    assert np.array_equal(words_of(profiles.decode(blob)), words_of(noise))
    with pytest.raises(CodecError, match=f"version {fast_version}"):
        decode(blob)


# ---------------------------------------------------------------- input validation

def test_bad_inputs_raise_specific_errors():
    codec = RatioCodec("k", rope=ROPE)
    t = np.zeros((4, 1, 8), np.float16)
    with pytest.raises(TypeError, match="float16"):
        codec.encode(t.astype(np.float32))
    with pytest.raises(ValueError, match="seq, kv_heads, head_dim"):
        codec.encode(np.zeros((4, 8), np.float16))
    for bad, match in ((np.arange(3), "length seq=4"), (np.arange(4.0), "integers"),
                       (np.array([0, 2, 2, 3]), "increasing"), (np.array([-1, 0, 1, 2]), r"\[0, "),
                       (np.arange(4) + 2**31, r"\[0, ")):
        with pytest.raises(ValueError, match=match):
            codec.encode(t, bad)
    with pytest.raises(ValueError, match="positions arrays"):
        codec.encode_many([t, t], [None])
    with pytest.raises(ValueError, match="K only"):
        RatioCodec("v", rope=ROPE)
    with pytest.raises(ValueError, match="kind"):
        RatioCodec("q")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        codec.encode(np.zeros((1, 2, 40000), np.float16))


# ---------------------------------------------------------------- corrupted blobs

def small_blob(rope: RopeSpec | None = ROPE, gaps: bool = True) -> tuple[np.ndarray, bytes]:
    rng = np.random.default_rng(9)
    positions = np.array([0, 1, 3, 4, 9, 10, 11, 20, 21, 22, 30, 31]) if gaps else None
    k, _ = repeated_tokens(rng, 12, np.arange(12) if positions is None else positions, vocab=4, heads=1, dim=8)
    blob = RatioCodec("k", rope=rope, safety_net=False).encode(k, positions)
    return k, blob


def reseal(blob: bytes | bytearray) -> bytes:
    """Recompute the blob check of a (tampered) blob so only the deeper checks can catch it."""
    info_at = header_end(bytes(blob))
    buf = bytearray(blob)
    buf[info_at - 4:info_at] = struct.pack("<I", check32(bytes(buf[:info_at - 4]), bytes(buf[info_at:])))
    return bytes(buf)


def header_end(blob: bytes) -> int:
    at = FIXED.size
    flags = blob[7]
    if flags & 1:
        at += 9
    if flags & 2:
        at += 4 + struct.unpack_from("<I", blob, at)[0]
    return at + 4


@pytest.mark.parametrize("gaps", [False, True])
def test_every_single_bit_flip_raises(gaps):
    _, blob = small_blob(gaps=gaps)
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CodecError):
            decode(bytes(bad))


def test_every_truncation_raises():
    _, blob = small_blob()
    for n in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:n])
    with pytest.raises(CodecError):
        decode(blob + b"\0")


def test_resealed_payload_tampering_raises_or_decodes_exactly():
    """Every bit flip of the stream and lo bytes with the blob check recomputed: the range decoder's
    own checks or the tensor check catch it, never a crash or a wrong tensor. Only flips in the two range
    coders' flush bytes (the last 4 of each: slack below the final interval; coder 0's end and coder 1's
    reversed end meet inside the stream) may decode to the very same tensor: 8 adjacent stream bytes at most."""
    tensor, blob = small_blob()
    info = inspect(blob)
    start = header_end(blob)
    slack = set()
    for i in range(start * 8, len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        try:
            back = decode(reseal(bad))
        except CodecError:
            continue
        assert np.array_equal(words_of(back), words_of(tensor))
        slack.add(i // 8 - start)
    assert all(0 <= b < info.stream_bytes for b in slack)
    assert not slack or max(slack) - min(slack) < 8


def forged(blob: bytes, **fields) -> bytes:
    names = ("magic", "version", "dtype", "model", "flags", "seq", "heads", "dim", "stream", "check")
    values = dict(zip(names, FIXED.unpack_from(blob)))
    values.update(fields)
    return reseal(FIXED.pack(*(values[n] for n in names)) + blob[FIXED.size:])


@pytest.mark.parametrize("fields, match", [
    ({"seq": 2**32 - 1}, "max_output_bytes|cannot hold|bad positions block"),  # its positions: a gap a row
    ({"seq": 5000}, "cannot hold|bad positions block"),
    ({"seq": 11}, "fewer literal rows|tensor check|out of range|trailing|truncated|more literal"),
    ({"heads": 40000, "dim": 2}, "channels|cannot hold"),
    ({"heads": 3}, "cannot hold|tensor check|trailing|truncated|literal"),
    ({"stream": 10**6}, "truncated"),
    ({"stream": 3}, "cannot hold"),
    ({"version": 3}, "version 3"),
    ({"dtype": 2}, "dtype"),
    ({"model": 9}, "model id"),
    ({"flags": 0x83}, "flags"),
    ({"flags": 2}, "flags"),
    ({"dim": 7}, "RoPE block"),
])
def test_forged_headers_raise(fields, match):
    _, blob = small_blob()
    with pytest.raises(CodecError, match=match):
        decode(forged(blob, **fields))


@pytest.mark.parametrize("theta, layout", [(0.5, 0), (float("nan"), 0), (float("inf"), 0), (1e5, 2)])
def test_forged_rope_block_raises(theta, layout):
    _, blob = small_blob(gaps=False)
    bad = blob[:FIXED.size] + struct.pack("<dB", theta, layout) + blob[FIXED.size + 9:]
    with pytest.raises(CodecError, match="RoPE block"):
        decode(reseal(bad))


def test_forged_positions_block_raises():
    _, blob = small_blob()
    at = FIXED.size + 9
    glen = struct.unpack_from("<I", blob, at)[0]
    gaps = blob[at + 4:at + 4 + glen]
    rest = blob[at + 4 + glen:]
    for bad_gaps, match in ((gaps[:-1], "truncated|bad positions block"), (gaps + b"\0", "trailing"),
                            (b"\xff\xff\xff\xff\xff\x01" + gaps[1:], "longer than 5|span")):
        bad = blob[:at] + struct.pack("<I", len(bad_gaps)) + bad_gaps + rest
        with pytest.raises(CodecError, match=match):
            decode(reseal(bad))
    bad = blob[:at] + struct.pack("<I", 10**6) + blob[at + 4:]
    with pytest.raises(CodecError, match="positions block"):
        decode(reseal(bad))


def test_a_positions_block_too_short_for_its_rows_is_refused_before_anything_is_allocated():
    seq, heads, dim = 0xFFFFFFFF, 0, 2  # a 0-byte tensor: max_output_bytes cannot stop it, the gaps' length must
    check = check32(struct.pack("<III", seq, heads, dim), b"")
    rope_and_empty_positions = struct.pack("<dB", 1e4, 0) + struct.pack("<I", 0)
    head = FIXED.pack(b"H2KV", 2, 1, 1, 3, seq, heads, dim, 0, check) + rope_and_empty_positions
    blob = head + struct.pack("<I", check32(head))
    for read in (decode, inspect):
        with pytest.raises(CodecError, match="bad positions block: 0 bytes for seq 4294967295"):
            read(blob)


def test_a_bad_blob_in_a_mixed_list_is_named_by_its_place():
    rng = np.random.default_rng(3)
    tensors = [rng.standard_normal((16, 2, 8)).astype(np.float16) for _ in range(4)]
    blobs = [profiles.make_codec("fast", "v").encode(tensors[0]), profiles.make_codec("fast", "v").encode(tensors[1]),
             RatioCodec("v", safety_net=False).encode(tensors[2]), RatioCodec("v", safety_net=False).encode(tensors[3])]
    assert [b[4] for b in blobs] == [3, 3, 2, 2]
    bad = blobs[:3] + [blobs[3][:-1] + bytes([blobs[3][-1] ^ 1])]
    with pytest.raises(CodecError, match="^blob 3: "):
        profiles.decode_many(bad)
    assert all(np.array_equal(t.view(np.uint16), d.view(np.uint16))
               for t, d in zip(tensors, profiles.decode_many(blobs)))


def test_max_output_bytes_is_enforced_before_decoding():
    tensor, blob = small_blob()
    with pytest.raises(CodecError, match="max_output_bytes"):
        decode(blob, max_output_bytes=tensor.nbytes - 1)
    assert np.array_equal(words_of(decode(blob, max_output_bytes=tensor.nbytes)), words_of(tensor))


def test_inspect_and_decode_with_info_agree():
    tensor, blob = small_blob()
    info = inspect(blob)
    assert info.shape == tensor.shape and info.blob_bytes == len(blob) and info.raw_bytes == tensor.nbytes
    assert info.header_bytes == header_end(blob) and info.positions_listed and info.rope == ROPE
    [(back, info2)] = decode_with_info([blob])
    assert info2 == info and np.array_equal(words_of(back), words_of(tensor))
    with pytest.raises(CodecError, match="blob 1: "):
        decode_many([blob, blob[:-1]])


# ---------------------------------------------------------------- golden blobs

GOLDEN = {  # name: (kind, rope, positions)
    "k_rope": ("k", ROPE, None),
    "k_gaps": ("k", RopeSpec(10000.0, "interleaved"), np.arange(24) * 3 + 5),
    "v": ("v", None, None),
}


@pytest.fixture(params=["avx2", "plain"])
def coder_copy(request):
    """Run the test with the AVX2 copies of the literal coder and the encoder's row searches (skipped where the
    CPU has none) and the plain ones."""
    if _ratiocore._use_avx2(request.param == "avx2") != (request.param == "avx2"):
        _ratiocore._use_avx2(True)
        pytest.skip("this CPU has no AVX2")
    yield request.param
    _ratiocore._use_avx2(True)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_blobs_decode_and_re_encode_identically(name, coder_copy):
    kind, rope, positions = GOLDEN[name]
    words = np.fromfile(DATA / f"ratio_golden_{name}.tensor.bin", dtype="<u2")
    blob = (DATA / f"ratio_golden_{name}.blob.bin").read_bytes()
    info = inspect(blob)
    assert words.size == int(np.prod(info.shape)) and info.matched_rows > 0
    tensor = words.view("<f2").reshape(info.shape)
    assert np.array_equal(words_of(decode(blob)), words_of(tensor))
    assert RatioCodec(kind, rope=rope, safety_net=False).encode(tensor, positions) == blob


def test_avx2_and_plain_coders_give_identical_bits():
    """The two compiled copies of the literal coder and the encoder's searches agree bit for bit (channel counts
    around the vector width, the 32-channel gradient blocks and the 255-channel blocks of the reference search,
    K with RoPE, repeated rows), and each decodes the other's blobs."""
    if not _ratiocore._use_avx2(True):
        pytest.skip("this CPU has no AVX2")
    rng = np.random.default_rng(13)
    cases = [(RatioCodec("v", safety_net=False), smooth_kv(rng, 40, heads, dim))
             for heads, dim in ((1, 1), (1, 7), (3, 10), (5, 14), (3, 64), (4, 80))]
    k, v = repeated_tokens(rng, 48, np.arange(48), heads=3, dim=22)
    cases += [(RatioCodec("k", rope=ROPE, safety_net=False), k), (RatioCodec("v", safety_net=False), v)]
    try:
        for codec, tensor in cases:
            fast_blob = codec.encode(tensor)
            _ratiocore._use_avx2(False)
            plain_blob = codec.encode(tensor)
            assert plain_blob == fast_blob
            assert np.array_equal(words_of(decode(fast_blob)), words_of(tensor))
            _ratiocore._use_avx2(True)
            assert np.array_equal(words_of(decode(plain_blob)), words_of(tensor))
    finally:
        _ratiocore._use_avx2(True)


@pytest.mark.parametrize("heads, dim", [(2, 16), (4, 80), (3, 171)])
def test_reference_rows_follow_the_documented_rule(heads, dim, coder_copy):
    """The encoder names a reference row j < t-1 for a literal row t (V: no RoPE) exactly when j shares, among
    the earliest rows sharing the most hi bytes with row t, at least 8 more than row t-1 (_ratiocore.c
    ref_search): numpy counts the same rule, across the 255-channel blocks of the byte counts."""
    rng = np.random.default_rng(heads * dim)
    seq, chans = 40, heads * dim
    base = smooth_kv(rng, 6, heads, dim).reshape(6, chans)
    rows = base[rng.integers(0, 6, seq)].view(np.uint16).copy()
    rows ^= (rng.random(rows.shape) < 0.2) * rng.integers(1, 1 << 16, rows.shape, dtype=np.uint16)  # noisy copies
    assert len({r.tobytes() for r in rows}) == seq  # no exact repeats: every row is literal
    hi = (rows >> 8).astype(np.uint8)
    expected = 0
    for t in range(2, seq):
        same = (hi[:t - 1] == hi[t]).sum(axis=1)
        expected += int(same.max() >= (hi[t - 1] == hi[t]).sum() + 8)
    assert expected > 3
    _, _, n_match, n_rope, n_ref = _ratiocore.encode(rows.tobytes(), seq, heads, dim, False, 0.0, False, None)
    assert (n_match, n_rope, n_ref) == (0, 0, expected)
