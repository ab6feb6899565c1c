"""The runtime lossless manager: config keys, layer/window scheduling, the three modes on a real
KVCache (bit-exact reads), store-mode memory and decode cache, async backpressure and fallbacks."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from h2o_test_helpers import realistic_kv, words_of

from h2o_kernels import PROFILE_VERSIONS
from h2o_kernels.codec.fp16 import FP16Codec
from h2o_kernels.codec.profiles import decode_many
from h2o_kernels.codec.rope import RopeSpec
from h2o_kernels.config_keys import ConfigError
from h2o_kernels.lossless.manager import LosslessConfig, LosslessRuntime, cold_window
from h2o_kernels.model.llama import KVCache

LAYERS, HEADS, DIM, PROMPT = 4, 2, 32, 96
METRICS = {"h2o_lossless", "h2o_lossless_raw_mb", "h2o_lossless_comp_mb", "h2o_lossless_comp_us",
           "h2o_lossless_decomp_us", "h2o_lossless_queue_peak", "h2o_lossless_fallback",
           "h2o_lossless_backpressure_skip", "h2o_lossless_async_queue_peak", "h2o_lossless_async_wait_us",
           "h2o_lossless_decode_cache_hit", "h2o_lossless_decode_cache_miss", "h2o_codec_us",
           "resident_kv_bytes", "lossless_updates"}
LOG = re.compile(
    r"\[H2O-LOSSLESS\] layer=(\d+) kv=(\d+) start=(\d+) tokens=(\d+) raw=(\d+) attempt_comp=(\d+) eff_comp=(\d+) "
    r"attempt_ratio=\d+\.\d{4} eff_ratio=\d+\.\d{4} comp_us=\d+ decomp_us=\d+ updates=\d+ fallback=\d+ "
    r"backpressure=\d+ queue=\d+ async_q_peak=\d+ async_wait_us=\d+ mode=[012] zstd=1$")


def config(**keys) -> LosslessConfig:
    """A running config: ``keys`` are ``kv_lossless_*`` keys without the prefix."""
    base = {"enable": True, "codec": "gear_delta", "runtime_enable": True, "block_tokens": 16,
            "hot_recent_tokens": 32, "hot_sink_tokens": 4, "async_threads": 0}
    return LosslessConfig.from_config({f"kv_lossless_{k}": v for k, v in {**base, **keys}.items()})


def caches(seed: int = 0) -> tuple[KVCache, KVCache]:
    """A cache filled with a prompt of realistic fp16 K/V, and a plain copy of it."""
    rng = np.random.default_rng(seed)
    cache, plain = KVCache(LAYERS, HEADS, DIM), KVCache(LAYERS, HEADS, DIM)
    for layer in range(LAYERS):
        k, v = realistic_kv(rng, PROMPT, HEADS, DIM), realistic_kv(rng, PROMPT, HEADS, DIM)
        cache.append(layer, k, v)
        plain.append(layer, k, v)
    return cache, plain


def runtime(cfg: LosslessConfig, cache: KVCache, lines: list[str] | None = None, **kw) -> LosslessRuntime:
    return LosslessRuntime(cfg, LAYERS, range(2, LAYERS), trigger_min_tokens=64, update_interval=4, cache=cache,
                           log=None if lines is None else lines.append, **kw)


def same(a: KVCache, b: KVCache, layer: int) -> bool:
    return (np.array_equal(words_of(a.k(layer)), words_of(b.k(layer)))
            and np.array_equal(words_of(a.v(layer)), words_of(b.v(layer))))


def drive(rt: LosslessRuntime, cache: KVCache, plain: KVCache, steps: int, first: int = 1, seed: int = 1,
          compact: dict[int, dict[int, np.ndarray]] | None = None) -> None:
    """Decode ``steps`` tokens through the hooks; attention must read exactly the plain cache.

    ``compact[step][layer]`` = indices an H2O compaction keeps at that step (applied to both caches
    after ``before_append``, as a runtime applies its pending plan)."""
    rng = np.random.default_rng(seed)
    for step in range(first, first + steps):
        for layer in range(LAYERS):
            rt.before_append(layer)
            if compact and layer in compact.get(step, {}):
                cache.keep(layer, compact[step][layer])
                plain.keep(layer, compact[step][layer])
            k, v = realistic_kv(rng, 1, HEADS, DIM), realistic_kv(rng, 1, HEADS, DIM)
            cache.append(layer, k, v)
            plain.append(layer, k, v)
            assert same(cache, plain, layer), f"step {step} layer {layer}: attention would read a different KV"
            kv = cache.length(layer)
            rt.after_layer(layer, kv, kv, PROMPT + step, step)


# ------------------------------------------------------------------------------------------- config

def test_config_defaults_match_the_original():
    cfg = LosslessConfig.from_config({})
    assert cfg == LosslessConfig()
    assert not cfg.runs
    assert (cfg.scope, cfg.runtime_mode, cfg.codec) == ("front_n", "probe", "none")
    assert (cfg.front_n, cfg.block_tokens) == (2, 128)
    assert (cfg.hot_recent_tokens, cfg.hot_sink_tokens, cfg.max_queue, cfg.decode_cache_blocks) == (256, 16, 256, 64)
    assert (cfg.store_bootstrap_tokens, cfg.store_grouped_step_tokens, cfg.async_threads) == (32, 256, 1)
    assert cfg.predictors_k == ("raw", "delta_seq", "xor_seq", "pair_delta")
    assert cfg.predictors_v == ("raw", "delta_seq", "xor_seq")
    assert config().runs
    assert not config(runtime_enable=False).runs and not config(codec="none").runs and not config(enable=False).runs


@pytest.mark.parametrize("key, value, field, expected", [
    ("scope", "none", "scope", "none"),
    ("scope", "h2o_kept", "scope", "h2o_kept"),
    ("scope", "front_n_and_h2o_kept", "scope", "front_n_and_h2o_kept"),
    ("scope", "front_n+h2o_kept", "scope", "front_n_and_h2o_kept"),
    ("runtime_mode", "full", "runtime_mode", "full"),
    ("runtime_mode", "store", "runtime_mode", "store"),
    ("block_tokens", 0, "block_tokens", 1),
    ("max_queue", -3, "max_queue", 1),
    ("async_threads", -1, "async_threads", 0),
    ("front_n", -1, "front_n", 0),
    ("store_grouped_step_tokens", -5, "store_grouped_step_tokens", -5),
    ("predictors_k", " pair_delta, raw ,pair_delta_delta_seq", "predictors_k",
     ("pair_delta", "raw", "pair_delta_delta_seq")),
    ("predictors_v", "", "predictors_v", ("raw",)),
    ("codec_runtime", "fp16_gear_predictive_v3", "profile", "fast"),  # the original's value names our fast profile
    ("codec_runtime", "fast", "profile", "fast"),
    ("codec_runtime", "ratio", "profile", "ratio"),
])
def test_config_aliases_and_clamps(key, value, field, expected):
    assert getattr(config(**{key: value}), field) == expected


@pytest.mark.parametrize("key, value, words", [
    ("predictors_k", "raw,gear", "kv_lossless_predictors_k"),
    ("predictors_v", "delta", "kv_lossless_predictors_v"),
    ("block_tokens", 32.0, "kv_lossless_block_tokens"),
    ("enable", 1, "kv_lossless_enable"),
    ("scope", 2, "kv_lossless_scope"),
    ("scope", "everything", "'front_n'"),  # the original used its default silently; we name the values
    ("runtime_mode", "fulll", "did you mean 'full'"),
    ("codec", "gear", "'gear_delta'"),
    ("codec_runtime", "fp16_gear_predictive_v4", "did you mean 'fp16_gear_predictive_v3'"),
    ("codec_runtime", "zstd", "kv_lossless_codec_runtime.*'ratio'"),
    ("strict_roundtrip_check", "yes", "kv_lossless_strict_roundtrip_check"),
])
def test_config_errors_name_the_key(key, value, words):
    with pytest.raises(ConfigError, match=words):
        LosslessConfig.from_config({f"kv_lossless_{key}": value}, "preset.json")


@pytest.mark.parametrize("mode, keys, sizes", [  # (bootstrap, grouped, overlap)
    ("probe", {"block_tokens": 128}, (32, 128, 0)),
    ("probe", {"block_tokens": 16}, (16, 16, 0)),
    ("full", {"block_tokens": 128}, (128, 128, 0)),
    ("store", {"block_tokens": 128}, (32, 256, 32)),
    ("store", {"block_tokens": 64, "store_bootstrap_tokens": 0, "store_grouped_step_tokens": 0}, (32, 192, 24)),
    ("store", {"block_tokens": 8, "store_bootstrap_tokens": -1, "store_grouped_step_tokens": 40}, (16, 40, 5)),
])
def test_window_sizes_per_mode(mode, keys, sizes):
    cfg = config(runtime_mode=mode, **keys)
    assert (cfg.bootstrap_tokens, cfg.grouped_tokens, cfg.overlap_tokens) == sizes


# ----------------------------------------------------------------------------------- scheduling

@pytest.mark.parametrize("scope, mode, keys, step, layers", [
    ("none", "full", {}, 1, []),
    ("front_n", "probe", {}, 1, [0]),
    ("front_n", "full", {}, 1, [0, 1]),
    ("front_n", "store", {}, 1, [0, 1]),
    ("front_n", "store", {"store_disable_front": True}, 1, []),
    ("front_n", "full", {"front_sample_token_interval": 2}, 2, []),
    ("front_n", "full", {"front_sample_token_interval": 2}, 3, [0, 1]),
    ("front_n", "probe", {"front_sample_token_interval": 2}, 2, [0]),
    ("front_n", "probe", {"front_n": 0}, 1, []),
    ("h2o_kept", "probe", {}, 1, [2]),
    ("h2o_kept", "full", {}, 1, [2]),
    ("h2o_kept", "full", {"kept_sample_layers": 0}, 1, [2, 3, 4, 5]),
    ("h2o_kept", "full", {"kept_sample_layers": 2, "kept_sample_token_interval": 2}, 2, []),
    ("h2o_kept", "full", {"kept_sample_layers": 2, "kept_sample_token_interval": 2}, 3, [2, 3]),
    ("h2o_kept", "store", {}, 1, [2, 3, 4, 5]),
    ("front_n_and_h2o_kept", "probe", {}, 1, [0, 2]),
    ("front_n_and_h2o_kept", "full", {}, 1, [0, 1, 2]),
    ("front_n_and_h2o_kept", "full", {"front_n": 3}, 1, [0, 1, 2]),
    ("front_n_and_h2o_kept", "store", {}, 1, [0, 1, 2, 3, 4, 5]),
    ("front_n_and_h2o_kept", "store", {"store_disable_front": True}, 1, [2, 3, 4, 5]),
])
def test_layer_selection(scope, mode, keys, step, layers):
    rt = LosslessRuntime(config(scope=scope, runtime_mode=mode, **keys), 6, range(2, 6), 64, 4, KVCache(6, 1, 2))
    assert [layer for layer in range(6) if rt.layer_budget(layer, 500, 200, step) is not None] == layers


def test_layer_budget_front_layers_use_kv_kept_layers_the_h2o_budget():
    rt = LosslessRuntime(config(scope="front_n_and_h2o_kept", runtime_mode="store", front_n=3), 6, range(2, 6), 64,
                         4, KVCache(6, 1, 2))
    assert [rt.layer_budget(layer, 500, 200, 1) for layer in (0, 2, 3)] == [500, 500, 200]
    assert rt.layer_budget(3, 150, 200, 1) == 150  # never beyond what the cache holds
    cfg = config(scope="front_n_and_h2o_kept", runtime_mode="store", front_n=3, store_disable_front=True)
    rt = LosslessRuntime(cfg, 6, range(2, 6), 64, 4, KVCache(6, 1, 2))
    assert [rt.layer_budget(layer, 500, 200, 1) for layer in (1, 2)] == [None, 200]


@pytest.mark.parametrize("budget, sink, recent, window", [
    (512, 16, 256, (16, 256)), (200, 16, 256, (16, 16)), (10, 16, 0, (10, 10)), (300, 0, 0, (0, 300)),
])
def test_cold_window_excludes_hot_sink_and_recent(budget, sink, recent, window):
    assert cold_window(budget, sink, recent) == window


def windows(lines: list[str]) -> list[tuple[int, int, int]]:
    """``(layer, start, tokens)`` of every logged result."""
    out = []
    for line in lines:
        m = LOG.match(line)
        assert m, line
        out.append((int(m[1]), int(m[3]), int(m[4])))
    return out


@pytest.mark.parametrize("block", [16, 24])
def test_full_mode_windows_have_exactly_block_tokens(block):
    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="full", scope="front_n", front_n=1, block_tokens=block), cache, lines)
    drive(rt, cache, plain, 60)
    got = windows(lines)
    assert {n for _, _, n in got} == {block} and 192 not in {n for _, _, n in got}
    cold_end = PROMPT + 1 - 32
    assert got[0] == (0, cold_end - block, block)  # bootstrap: the newest cold tokens
    assert all(b[1] == a[1] + block for a, b in zip(got, got[1:]))  # grouped windows follow each other
    assert len(got) == 1 + (60 - 1) // block  # one window per block of cold growth
    assert rt.metrics()["lossless_updates"] == len(got)


def test_probe_bootstrap_then_interval_gated_groups():
    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="probe", block_tokens=8), cache, lines)
    drive(rt, cache, plain, 20)
    got = windows(lines)
    # bootstrap at the cold begin, then one 8-token window per 8 tokens of growth, at most every 4 steps
    assert got[0] == (0, 4, 8)
    assert [w[1] for w in got[1:]] == [65, 73] and {w[2] for w in got} == {8}
    assert {w[0] for w in got} == {0}


def test_store_mode_grouped_windows_overlap_by_an_eighth():
    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="store", scope="front_n", front_n=1, store_bootstrap_tokens=8,
                        store_grouped_step_tokens=16), cache, lines)
    drive(rt, cache, plain, 30)
    got = windows(lines)
    assert got[0] == (0, 57, 8)
    assert [(s, n) for _, s, n in got[1:]] == [(63, 16), (77, 16)]  # start = previous end - 16 // 8


def test_nothing_before_trigger_min_tokens_nor_at_prefill():
    cache, plain = caches()
    rt = LosslessRuntime(config(runtime_mode="full"), LAYERS, range(2, LAYERS), 10_000, 1, cache)
    drive(rt, cache, plain, 5)
    rt.after_layer(0, PROMPT, PROMPT, PROMPT, 0)  # prefill: decode_step 0
    assert rt.metrics()["lossless_updates"] == 0 and rt.metrics()["h2o_lossless"] == 1.0


# -------------------------------------------------------------------------------- codec profiles

@pytest.mark.parametrize("mode", ["full", "store"])
def test_the_ratio_profile_reads_the_kv_bit_exactly_and_is_counted_as_coded(mode):
    versions: set[int] = set()

    def decoding(k_blob: bytes, v_blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        versions.update((k_blob[4], v_blob[4]))
        k, v = decode_many([k_blob, v_blob])
        return k, v

    cache, plain = caches()
    rt = runtime(config(runtime_mode=mode, scope="front_n_and_h2o_kept", kept_sample_layers=0, codec_runtime="ratio",
                        store_bootstrap_tokens=16, store_grouped_step_tokens=24), cache, rope=RopeSpec(10000.0),
                 decoder=decoding)
    try:
        drive(rt, cache, plain, 24)
    finally:
        rt.close()
    m = rt.metrics()
    assert m["lossless_updates"] > 0 and m["h2o_lossless_fallback"] == 0 and m["h2o_lossless"] > 1.0
    # ratio blobs, and the fast profile's where the safety net found them smaller
    assert PROFILE_VERSIONS["ratio"] in versions and versions <= set(PROFILE_VERSIONS.values())
    rt.restore_all()
    assert all(same(cache, plain, layer) for layer in range(LAYERS))


def test_the_ratio_profile_gets_the_window_rows_positions():
    seen: list[np.ndarray | None] = []

    def recording(k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
        seen.append(positions)
        return other_data_encoder(k, v, positions)

    cache, plain = caches()
    cache.keep(0, np.r_[0:40, 50:PROMPT])  # an H2O compaction: positions 40-49 are gone
    plain.keep(0, np.r_[0:40, 50:PROMPT])
    rt = runtime(config(runtime_mode="full", scope="front_n", front_n=1, codec_runtime="ratio"), cache,
                 rope=RopeSpec(10000.0), encoder=recording)
    drive(rt, cache, plain, 1)
    [positions] = seen
    window = cache.positions(0)[:, 0]
    assert positions is not None and positions.dtype == np.int64
    start = int(np.flatnonzero(window == positions[0])[0])
    assert np.array_equal(positions, window[start:start + len(positions)]) and 40 not in positions


def test_the_fast_profile_and_ragged_heads_pass_no_positions():
    seen: list[np.ndarray | None] = []

    def recording(k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
        seen.append(positions)
        return other_data_encoder(k, v, positions)

    for codec_runtime, keep in (("fast", None), ("ratio", [np.arange(PROMPT - 1), np.arange(1, PROMPT)])):
        cache, plain = caches()
        if keep is not None:  # per-head H2O: the heads hold different tokens in the same rows
            cache.keep(0, keep)
            plain.keep(0, keep)
        rt = runtime(config(runtime_mode="full", scope="front_n", front_n=1, codec_runtime=codec_runtime), cache,
                     rope=RopeSpec(10000.0), encoder=recording)
        drive(rt, cache, plain, 1)
    assert seen == [None, None]


# -------------------------------------------------------------------------------------- modes

@pytest.mark.parametrize("mode", ["probe", "full", "store"])
@pytest.mark.parametrize("threads", [0, 2])
def test_every_mode_reads_the_kv_bit_exactly(mode, threads):
    cache, plain = caches()
    rt = runtime(config(runtime_mode=mode, scope="front_n_and_h2o_kept", kept_sample_layers=0, async_threads=threads,
                        store_bootstrap_tokens=16, store_grouped_step_tokens=24), cache)
    try:
        for step in range(1, 41, 8):
            drive(rt, cache, plain, 8, first=step, seed=step)
            if mode != "store":  # probe and full never touch the cache
                assert all(same(cache, plain, layer) for layer in range(LAYERS))
    finally:
        rt.close()
    m = rt.metrics()
    assert m["lossless_updates"] > 0 and m["h2o_lossless_fallback"] == 0 and m["h2o_lossless_backpressure_skip"] == 0
    assert m["h2o_lossless"] > 1.0
    rt.restore_all()
    assert all(same(cache, plain, layer) for layer in range(LAYERS))


@pytest.mark.parametrize("mode", ["probe", "full", "store"])
def test_per_head_compaction_keeps_every_mode_bit_exact(mode):
    """Each KV head keeps its own tokens (H2O per head); windows are rows, so each head's kept tokens."""
    cache, plain = caches()
    rt = runtime(config(runtime_mode=mode, scope="front_n_and_h2o_kept", kept_sample_layers=0,
                        store_bootstrap_tokens=16, store_grouped_step_tokens=24), cache)
    rng = np.random.default_rng(5)
    held = {9: PROMPT + 8, 25: 64 + 16}  # the layer's length before the compaction at that step
    compact = {step: {layer: [np.sort(rng.choice(kv, 64, replace=False)) for _ in range(HEADS)] for layer in (2, 3)}
               for step, kv in held.items()}
    for step in range(1, 41, 8):
        drive(rt, cache, plain, 8, first=step, seed=step, compact=compact)
    m = rt.metrics()
    assert m["lossless_updates"] > 0 and m["h2o_lossless_fallback"] == 0
    rt.restore_all()
    assert all(same(cache, plain, layer) for layer in range(LAYERS))
    assert cache.length(2) == 64 + 16 and cache.length(0) == PROMPT + 40


def store_runtime(cache: KVCache, **keys) -> LosslessRuntime:
    """Store mode on layer 0 only, one 16-token window (the grouped step never fills in these tests)."""
    return runtime(config(runtime_mode="store", scope="front_n", front_n=1, store_bootstrap_tokens=16,
                          store_grouped_step_tokens=512, **keys), cache)


def test_store_mode_releases_the_raw_window_and_restores_it_bit_exactly():
    cache, plain = caches()
    rt = store_runtime(cache, decode_cache_blocks=0)
    full_bytes = sum(cache.nbytes(layer) for layer in range(LAYERS))
    assert rt.metrics()["resident_kv_bytes"] == full_bytes
    drive(rt, cache, plain, 1)
    start, stop = PROMPT + 1 - 32 - 16, PROMPT + 1 - 32
    assert not cache.k(0)[start:stop].any() and not cache.v(0)[start:stop].any()  # really released
    m = rt.metrics()
    raw, comp = m["h2o_lossless_raw_mb"] * 1048576, m["h2o_lossless_comp_mb"] * 1048576
    total = sum(cache.nbytes(layer) for layer in range(LAYERS))
    assert comp < raw and m["resident_kv_bytes"] == total - raw + comp
    drive(rt, cache, plain, 5, first=2)  # each step restores before the layer's attention (checked in drive)
    m = rt.metrics()
    assert (m["h2o_lossless_decode_cache_hit"], m["h2o_lossless_decode_cache_miss"]) == (0, 5)
    assert m["h2o_lossless_decomp_us"] > 0 and m["h2o_lossless_fallback"] == 0
    rt.restore_all()
    assert all(same(cache, plain, layer) for layer in range(LAYERS))
    assert rt.metrics()["resident_kv_bytes"] == sum(cache.nbytes(layer) for layer in range(LAYERS)) + int(comp)


@pytest.mark.parametrize("strict, hits, misses", [(False, 4, 1), (True, 5, 1)])
def test_store_mode_decode_cache_hits_only_after_a_real_decode(strict, hits, misses):
    cache, plain = caches()
    rt = store_runtime(cache, decode_cache_blocks=4, strict_roundtrip_check=strict)
    drive(rt, cache, plain, 6)
    m = rt.metrics()
    assert (m["h2o_lossless_decode_cache_hit"], m["h2o_lossless_decode_cache_miss"]) == (hits, misses)
    # the decoded copy held by the cache counts as resident
    total = sum(cache.nbytes(layer) for layer in range(LAYERS))
    assert m["resident_kv_bytes"] == total + m["h2o_lossless_comp_mb"] * 1048576


def other_data_encoder(k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
    """A valid codec blob of the wrong tensor: only a strict round-trip check can tell."""
    codec = FP16Codec()
    return codec.encode(np.zeros_like(k)), codec.encode(np.zeros_like(v))


@pytest.mark.parametrize("mode", ["full", "store"])
def test_strict_check_rejects_a_blob_of_other_data(mode):
    cache, plain = caches()
    rt = runtime(config(runtime_mode=mode, scope="front_n", front_n=1, strict_roundtrip_check=True), cache,
                 encoder=other_data_encoder)
    drive(rt, cache, plain, 3)
    m = rt.metrics()
    assert m["h2o_lossless_fallback"] == m["lossless_updates"] == 1 and m["h2o_lossless"] == 1.0
    assert all(same(cache, plain, layer) for layer in range(LAYERS))  # nothing released


def test_shrink_after_compaction_drops_held_windows_without_loss_or_fallback():
    cache, plain = caches()
    rt = runtime(config(runtime_mode="store", scope="h2o_kept", store_bootstrap_tokens=16,
                        store_grouped_step_tokens=512, decode_cache_blocks=0), cache)
    drive(rt, cache, plain, 2)
    assert rt.metrics()["resident_kv_bytes"] < sum(cache.nbytes(layer) for layer in range(LAYERS))
    keep = np.r_[0:8, 40:PROMPT + 2]  # an H2O plan for layers 2 and 3, applied at step 3
    drive(rt, cache, plain, 4, first=3, compact={3: {2: keep, 3: keep}})
    m = rt.metrics()
    assert m["h2o_lossless_fallback"] == 0 and m["lossless_updates"] == 2  # no window fits the compacted layers
    assert m["resident_kv_bytes"] == sum(cache.nbytes(layer) for layer in range(LAYERS))  # nothing held
    rt.restore_all()
    assert all(same(cache, plain, layer) for layer in range(LAYERS))


def test_full_mode_budget_shrink_resets_the_schedule():
    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="full", scope="h2o_kept"), cache, lines)
    drive(rt, cache, plain, 1)
    rng = np.random.default_rng(5)
    for step in (2, 3):
        for layer in range(LAYERS):
            k, v = realistic_kv(rng, 1, HEADS, DIM), realistic_kv(rng, 1, HEADS, DIM)
            cache.append(layer, k, v)
            kv = cache.length(layer)
            rt.after_layer(layer, kv, 60 if layer >= 2 else kv, PROMPT + step, step)
    assert len(lines) == 1 and rt.metrics()["h2o_lossless_fallback"] == 0


# ----------------------------------------------------------------------------- async, failures

def test_slow_codec_with_a_full_queue_skips_new_windows():
    def slow(k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
        time.sleep(0.05)
        return other_data_encoder(k, v, positions)

    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="full", scope="front_n", front_n=LAYERS, async_threads=1, max_queue=1), cache,
                 lines, encoder=slow)
    try:
        drive(rt, cache, plain, 1)
    finally:
        rt.close()
    m = rt.metrics()
    assert m["h2o_lossless_backpressure_skip"] == LAYERS - 1 and m["h2o_lossless_fallback"] == 0
    assert m["h2o_lossless_async_queue_peak"] == 1 and m["h2o_lossless_async_wait_us"] > 0
    assert m["lossless_updates"] == LAYERS and m["h2o_lossless"] > 1.0
    assert sorted(int(LOG.match(line)[5]) == 0 for line in lines) == [False] + [True] * (LAYERS - 1)


def test_an_encoder_that_raises_counts_a_fallback_and_releases_nothing():
    def broken(k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
        raise RuntimeError("codec down")

    for mode in ("full", "store"):
        cache, plain = caches()
        rt = runtime(config(runtime_mode=mode, scope="front_n", front_n=1, async_threads=1), cache, encoder=broken)
        drive(rt, cache, plain, 1)
        rt.close()
        m = rt.metrics()
        assert m["h2o_lossless_fallback"] == 1 and m["h2o_lossless_backpressure_skip"] == 0
        assert m["h2o_lossless"] == 1.0 and m["h2o_lossless_raw_mb"] == m["h2o_lossless_comp_mb"] > 0
        assert all(same(cache, plain, layer) for layer in range(LAYERS))


def test_a_failing_validation_decode_counts_a_fallback():
    def broken(k_blob: bytes, v_blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("corrupt")

    cache, plain = caches()
    rt = runtime(config(runtime_mode="full", scope="front_n", front_n=1), cache, decoder=broken)
    drive(rt, cache, plain, 1)
    assert rt.metrics()["h2o_lossless_fallback"] == 1 and rt.metrics()["h2o_lossless_decode_cache_miss"] == 1


def test_metrics_names_ratio_log_lines_and_reset():
    cache, plain = caches()
    lines: list[str] = []
    rt = runtime(config(runtime_mode="full", scope="front_n_and_h2o_kept"), cache, lines)
    drive(rt, cache, plain, 20)
    m = rt.metrics()
    assert set(m) == METRICS
    assert m["h2o_lossless"] == pytest.approx(m["h2o_lossless_raw_mb"] / m["h2o_lossless_comp_mb"])
    raw = sum(int(LOG.match(line)[5]) for line in lines)
    comp = sum(int(LOG.match(line)[7]) for line in lines)
    assert m["h2o_lossless"] == pytest.approx(raw / comp) and m["h2o_codec_us"] > 0
    assert m["h2o_lossless_queue_peak"] >= 1 and m["h2o_lossless_decode_cache_miss"] == len(lines)
    rt.reset()
    m = rt.metrics()
    assert m["lossless_updates"] == 0 and m["h2o_lossless"] == 1.0 and m["h2o_lossless_queue_peak"] == 0


def test_a_failed_store_restore_is_a_fallback_and_the_window_is_forgotten():
    def broken(k_blob: bytes, v_blob: bytes) -> tuple[np.ndarray, np.ndarray]:
        raise ValueError("corrupt")

    cache, plain = caches()
    rt = runtime(config(runtime_mode="store", scope="front_n", front_n=1, store_bootstrap_tokens=16), cache,
                 decoder=broken)
    drive(rt, cache, plain, 1)
    rt.before_append(0)
    m = rt.metrics()
    assert m["h2o_lossless_fallback"] == 1 and m["h2o_lossless_decode_cache_miss"] == 1
    assert m["resident_kv_bytes"] == sum(cache.nbytes(layer) for layer in range(LAYERS))
    assert not cache.k(0)[49:65].any()  # the loss is visible: the rows stay released
