"""Per-KV-head H2O (``kv_h2o_per_head``): a ragged per-head cache with exact attention, per-head scoring and
keep sets under the shared mode's floor, target and clock, honest per-head bytes, and token-level blocks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from h2o_kernels.eviction.h2o import H2OConfig, H2OPolicy, plan_eviction
from h2o_kernels.model.llama import KVCache, LlamaModel
from h2o_kernels.runtimes.base import check_config
from h2o_kernels.runtimes.reference import ReferenceRun

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}


def filled_cache(rows: int, heads: int = 2, layers: int = 1) -> KVCache:
    """A cache whose K and V hold each token's absolute position (every head, every dim)."""
    cache = KVCache(layers, heads, 3)
    kv = np.broadcast_to(np.arange(rows, dtype=np.float32)[:, None, None], (rows, heads, 3))
    for layer in range(layers):
        cache.append(layer, kv, kv)
    cache.n_seen = rows
    return cache


def held(cache: KVCache, layer: int, head: int) -> list[int]:
    n = int(cache.head_lengths(layer)[head])
    return [int(p) for p in cache.k(layer)[:n, head, 0]]


# --- the ragged cache -------------------------------------------------------------------------------

def test_each_head_keeps_its_own_tokens_in_time_order_and_new_tokens_follow_them():
    cache = filled_cache(10)
    cache.keep(0, [np.array([0, 3, 7]), np.array([1, 2, 5, 8, 9])])
    assert cache.length(0) == 5 and cache.head_lengths(0).tolist() == [3, 5]
    assert held(cache, 0, 0) == [0, 3, 7] and held(cache, 0, 1) == [1, 2, 5, 8, 9]
    assert cache.positions(0)[:3, 0].tolist() == [0, 3, 7]
    assert cache.nbytes(0) == 2 * 2 * 3 * (3 + 5)  # fp16 K and V of the tokens really held, padding excluded
    new = np.full((1, 2, 3), 10.0, np.float32)
    cache.append(0, new, new)
    assert held(cache, 0, 0) == [0, 3, 7, 10] and held(cache, 0, 1) == [1, 2, 5, 8, 9, 10]
    np.testing.assert_array_equal(cache.k32(0)[0, :4, 0], [0, 3, 7, 10])
    assert cache.positions(0)[3, 0] == 10 and cache.positions(0)[5, 1] == 10
    mask = cache.attention_mask(0, 1)
    assert mask.shape == (2, 1, 1, 6) and (mask[0, 0, 0] == 0).tolist() == [True] * 4 + [False] * 2
    assert not mask[1].any()
    cache.keep(0, [np.array([0, 1, 3]), np.array([0, 1, 5])])  # equal counts again: no padding, no mask
    assert cache.attention_mask(0, 1) is None and held(cache, 0, 1) == [1, 2, 10]


def test_bad_per_head_indices_are_refused():
    cache = filled_cache(6)
    with pytest.raises(ValueError, match="strictly increasing"):
        cache.keep(0, [np.array([0, 1]), np.array([2, 1])])
    with pytest.raises(ValueError, match="2 KV heads"):
        cache.keep(0, [np.array([0, 1])])


@pytest.mark.parametrize("rows", [1, 3])
def test_attention_over_a_ragged_cache_is_exact_for_each_heads_kept_tokens(rows):
    model = LlamaModel.random(TINY, seed=2, std=0.3)
    model.prefill(np.arange(20))
    cache, c = model.cache, model.config
    cache.keep(0, [np.arange(0, 20, 3), np.array([0, 1, 2, 5, 8, 9, 13, 17, 19])])  # 7 and 9 tokens
    rng = np.random.default_rng(0)
    k, v = rng.normal(size=(2, rows, 2, c.head_dim)).astype(np.float32)
    cache.append(0, k, v)
    q = rng.normal(size=(rows, c.num_heads, c.head_dim)).astype(np.float32)
    out = model._attend(0, q).reshape(rows, c.num_heads, c.head_dim)
    group = c.num_heads // c.num_kv_heads
    for h in range(c.num_heads):
        n = int(cache.head_lengths(0)[h // group])
        keys = cache.k(0)[:n, h // group].astype(np.float64)
        values = cache.v(0)[:n, h // group].astype(np.float64)
        for t in range(rows):
            visible = n - rows + t + 1  # its kept tokens and the new ones up to its own
            s = keys[:visible] @ q[t, h].astype(np.float64)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[t, h], (p / p.sum()) @ values[:visible], rtol=2e-5, atol=2e-6)


# --- the policy -------------------------------------------------------------------------------------

def per_head_probs(heavy: list[set[int]]):
    """Decode probs ``[heads, 1, kv]``: KV head ``h`` (one query head each) attends to the positions in ``heavy[h]``."""
    def probs(cache: KVCache, layer: int) -> np.ndarray:
        rows = []
        for h, tokens in enumerate(heavy):
            n = int(cache.head_lengths(layer)[h])
            pos = cache.positions(layer)[:, h]
            w = np.where(np.isin(pos, list(tokens)), 1.0, 0.01)
            w[n:] = 0.0  # padding is never attended
            rows.append(w / w.sum())
        return np.stack(rows)[:, None].astype(np.float32)
    return probs


def drive(policy: H2OPolicy, cache: KVCache, steps: int, probs, bytes_seen: list[int] | None = None) -> None:
    """Decode ``steps`` tokens on layer 0 (a prefill of the cache's tokens first, scored uniformly)."""
    kv = cache.length(0)
    policy.after_attention(0, np.full((cache.num_kv_heads, kv, kv), 1.0 / kv, np.float32), decode=False)
    for _ in range(steps):
        policy.apply_pending(0, cache)
        token = np.full((1, cache.num_kv_heads, 3), cache.n_seen, np.float32)
        cache.append(0, token, token)
        cache.n_seen += 1
        if bytes_seen is not None:
            bytes_seen.append(cache.nbytes(0))
        policy.after_attention(0, probs(cache, 0), decode=True)


def policy_for(per_head: bool, **fields) -> H2OPolicy:
    cfg = H2OConfig(**{"enable": True, "layer_start": 0, "trigger_min_tokens": 1, "update_interval": 4,
                       "block_tokens": 1, "sink_tokens": 2, "recent_tokens": 2, "target_mode": "static",
                       "target_keep_ratio": 0.35, "per_head": per_head, "prefill_scoring": False, **fields})
    return H2OPolicy(cfg, 1, kv_heads=2, head_dim=3)


def test_each_head_keeps_its_own_heavy_hitters_with_the_shared_floor_and_target():
    heavy = [{5, 6}, {11, 12}]
    per_head, cache = policy_for(True), filled_cache(16)
    drive(per_head, cache, 4, per_head_probs(heavy))  # one trigger at 17 tokens seen: keep ceil(0.35 * 17) = 6
    assert held(cache, 0, 0) == [0, 1, 5, 6, 15, 16, 17, 18, 19] and held(cache, 0, 1)[:4] == [0, 1, 11, 12]
    assert cache.attention_mask(0, 1) is None  # the same target, the same count: no padding
    shared, shared_cache = policy_for(False), filled_cache(16)
    drive(shared, shared_cache, 4, per_head_probs(heavy))
    assert shared_cache.length(0) == 9 and shared.metrics()["h2o_evictions"] == per_head.metrics()["h2o_evictions"]
    assert shared.metrics()["h2o_lossy"] == per_head.metrics()["h2o_lossy"]


def test_per_head_scores_are_each_groups_mean():
    policy = policy_for(True, update_interval=100, trigger_min_tokens=100)
    probs = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.3, 0.3, 0.2, 0.2]], [[0.4, 0.3, 0.2, 0.1]],
                      [[0.5, 0.1, 0.1, 0.3]]], np.float32)  # query heads 0-1 -> KV head 0, 2-3 -> KV head 1
    policy.after_attention(0, probs, decode=True)
    expected = 0.1 * np.stack([probs[:2, 0].astype(np.float64).mean(0), probs[2:, 0].astype(np.float64).mean(0)])
    np.testing.assert_allclose(policy.scores(0), expected)


def test_h2o_lossy_counts_the_bytes_each_head_really_holds():
    cfg = H2OConfig(enable=True, layer_start=0, trigger_min_tokens=1, update_interval=3, block_tokens=4,
                    sink_tokens=0, recent_tokens=0, target_mode="static", target_keep_ratio=0.4, per_head=True)
    policy, cache = H2OPolicy(cfg, 1, kv_heads=2, head_dim=3), filled_cache(18)
    held_bytes: list[int] = []
    drive(policy, cache, 12, per_head_probs([{16, 17}, {1, 2}]), held_bytes)
    assert policy.metrics()["h2o_evictions"] == 3 and policy.dropped_plans == 0
    full = sum(2 * 2 * 2 * 3 * seen for seen in range(19, 31))  # K and V, 2 heads, 3 dims, fp16, per step
    assert policy.metrics()["h2o_lossy"] == pytest.approx(full / sum(held_bytes))


def test_token_level_planning_is_vectorised():
    scores = np.random.default_rng(0).random(8192)
    cfg = H2OConfig(block_tokens=1, sink_tokens=4, recent_tokens=64, target_lossy_ratio=3.0)
    plan_eviction(scores, 8192, cfg)
    t0 = time.perf_counter()
    plan = plan_eviction(scores, 8192, cfg)
    assert time.perf_counter() - t0 < 0.05  # a per-token Python loop would take far longer at 8192 tokens
    assert plan.final == plan.target and np.all(np.diff(plan.kept) > 0)


# --- end to end -------------------------------------------------------------------------------------

def test_the_key_is_known_and_typed():
    check_config({"kv_h2o_per_head": True})
    with pytest.raises(Exception, match="kv_h2o_per_head"):
        check_config({"kv_h2o_per_head": "yes"})


def test_per_head_runtime_holds_the_target_and_keeps_heads_apart():
    model = LlamaModel.random({**TINY, "num_hidden_layers": 3}, seed=7, std=0.2)
    ids = np.random.default_rng(3).integers(0, TINY["vocab_size"], 96)
    config = {"kv_h2o_enable": True, "kv_h2o_block_tokens": 1, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 8,
              "kv_h2o_update_interval": 4, "kv_h2o_trigger_min_tokens": 32, "kv_h2o_layer_start": 1,
              "kv_h2o_target_lossy_ratio": 2.0}
    shared = ReferenceRun(model, config).run(ids[:64], ids[64:], keep_logits=True)
    per_head = ReferenceRun(model, {**config, "kv_h2o_per_head": True}).run(ids[:64], ids[64:], keep_logits=True)
    m = per_head.metrics
    assert m["h2o_evictions"] == shared.metrics["h2o_evictions"] > 0
    assert m["h2o_lossy"] == pytest.approx(shared.metrics["h2o_lossy"]) and 1.8 < m["h2o_lossy"] < 2.2
    positions = model.cache.positions(2)
    assert not np.array_equal(positions[:, 0], positions[:, 1])  # the heads hold different tokens
    assert np.all(np.diff(positions, axis=0) > 0)  # each in time order
    assert np.isfinite(per_head.logits).all() and not np.array_equal(per_head.logits, shared.logits)
