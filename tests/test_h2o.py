"""H2O eviction policy: config keys, keep-target arithmetic, selection, triggers, EMA/prefill scores,
honest ratios (driven directly with synthetic probabilities) and a tiny random model end to end."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.eviction.h2o import H2OConfig, H2OPolicy, plan_eviction
from h2o_kernels.model.llama import KVCache, LlamaModel

ProbsFn = Callable[[KVCache, int, int], np.ndarray]  # (cache, layer, q_len) -> probs [heads, q_len, kv]


def uniform_probs(cache: KVCache, layer: int, rows: int) -> np.ndarray:
    kv = cache.length(layer)
    return np.full((1, rows, kv), 1.0 / kv, np.float32)


def drive(policy: H2OPolicy, cache: KVCache, prompt: int, steps: int, probs: ProbsFn = uniform_probs,
          after_step: Callable[[int], None] | None = None) -> None:
    """Feed ``prompt`` tokens then ``steps`` decode tokens through every layer, as the model's hooks would.
    K of each token holds its absolute position, so the kept tokens can be read back from the cache."""
    for step, rows in enumerate([prompt] + [1] * steps):
        pos = np.arange(cache.n_seen, cache.n_seen + rows, dtype=np.float32)
        kv = np.broadcast_to(pos[:, None, None], (rows, cache._k[0].shape[1], cache._k[0].shape[2]))
        for layer in range(cache.num_layers):
            policy.apply_pending(layer, cache)
            cache.append(layer, kv, kv)
            policy.after_attention(layer, probs(cache, layer, rows))
        cache.n_seen += rows
        if after_step is not None and step > 0:
            after_step(step)


def decode_step(policy: H2OPolicy, cache: KVCache) -> None:
    """One more decode token through every layer (uniform attention)."""
    token = np.full((1, 1, 1), cache.n_seen, np.float32)
    for layer in range(cache.num_layers):
        policy.apply_pending(layer, cache)
        cache.append(layer, token, token)
        policy.after_attention(layer, uniform_probs(cache, layer, 1))
    cache.n_seen += 1


def positions(cache: KVCache, layer: int) -> list[int]:
    return [int(p) for p in cache.k(layer)[:, 0, 0]]


def make(num_layers: int = 1, **fields) -> tuple[H2OPolicy, KVCache]:
    fields = {"enable": True, "layer_start": 0, "trigger_min_tokens": 1, "update_interval": 1, **fields}
    return H2OPolicy(H2OConfig(**fields), num_layers, 1, 1), KVCache(num_layers, 1, 1)


# --- config ---------------------------------------------------------------------------------------

def test_config_defaults_are_the_originals():
    cfg = H2OConfig.from_config({})
    assert cfg == H2OConfig()
    assert (cfg.enable, cfg.layer_start, cfg.layer_end, cfg.block_tokens, cfg.sink_tokens, cfg.recent_tokens) == (
        False, 2, -1, 64, 32, 256)
    assert (cfg.target_keep_ratio, cfg.target_mode, cfg.target_lossy_ratio, cfg.ema_alpha) == (
        0.5, "adaptive", 3.0, 0.9)
    assert (cfg.update_interval, cfg.trigger_min_tokens, cfg.log_stats, cfg.prefill_scoring) == (16, 512, False, True)
    assert (cfg.heavy_hitters, cfg.per_head) == (True, False)  # ours: the original's one keep set per layer
    assert set(H2OConfig.keys()) == {f"kv_h2o_{name}" for name in (
        "enable", "layer_start", "layer_end", "block_tokens", "sink_tokens", "recent_tokens", "target_keep_ratio",
        "target_mode", "target_lossy_ratio", "ema_alpha", "update_interval", "trigger_min_tokens", "log_stats",
        "prefill_scoring", "heavy_hitters", "per_head")}


def test_config_clamps():
    cfg = H2OConfig.from_config({
        "kv_h2o_layer_start": -3, "kv_h2o_layer_end": -7, "kv_h2o_block_tokens": 0, "kv_h2o_sink_tokens": -1,
        "kv_h2o_recent_tokens": -5, "kv_h2o_target_keep_ratio": 1.5, "kv_h2o_target_mode": "adaptive",
        "kv_h2o_target_lossy_ratio": 0.5, "kv_h2o_ema_alpha": 2, "kv_h2o_update_interval": 0,
        "kv_h2o_trigger_min_tokens": -4, "kv_h2o_prefill_scoring": False, "other_key": "ignored"})
    assert (cfg.layer_start, cfg.layer_end, cfg.block_tokens, cfg.sink_tokens, cfg.recent_tokens) == (0, -7, 1, 0, 0)
    assert (cfg.target_keep_ratio, cfg.target_mode, cfg.target_lossy_ratio, cfg.ema_alpha) == (
        1.0, "adaptive", 1.0, 1.0)
    assert (cfg.update_interval, cfg.trigger_min_tokens, cfg.prefill_scoring) == (1, 1, False)
    assert isinstance(cfg.ema_alpha, float) and isinstance(cfg.target_lossy_ratio, float)
    assert H2OConfig.from_config({"kv_h2o_target_keep_ratio": -0.2, "kv_h2o_target_mode": "static"}) == H2OConfig(
        target_keep_ratio=0.0, target_mode="static")
    assert H2OConfig(block_tokens=-2, target_mode="x").block_tokens == 1  # direct construction clamps too
    with pytest.raises(ConfigError, match="'kv_h2o_target_mode' must be one of 'static', 'adaptive', got 'Static' "
                                          r"\(did you mean 'static'\?\)"):
        H2OConfig.from_config({"kv_h2o_target_mode": "Static"})


@pytest.mark.parametrize("key,value", [
    ("kv_h2o_block_tokens", 32.0), ("kv_h2o_enable", 1), ("kv_h2o_layer_start", True),
    ("kv_h2o_target_keep_ratio", "0.5"), ("kv_h2o_ema_alpha", False), ("kv_h2o_target_mode", 1),
    ("kv_h2o_prefill_scoring", "yes"), ("kv_h2o_log_stats", None)])
def test_config_type_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"preset.json.*{key}"):
        H2OConfig.from_config({key: value}, source="preset.json")


@pytest.mark.parametrize("start,end,layers,expected", [
    (2, -1, 32, range(2, 32)), (2, 5, 32, range(2, 6)), (0, 100, 4, range(0, 4)), (40, -1, 4, range(3, 4)),
    (5, 3, 32, range(0)), (2, -1, 1, range(0, 1)), (0, 0, 8, range(0, 1))])
def test_layer_range_clamping(start, end, layers, expected):
    assert H2OConfig(layer_start=start, layer_end=end).layer_range(layers) == expected


# --- keep target (§3.4) -----------------------------------------------------------------------------

def test_worked_example_of_the_spec():
    # kv=513, B=32, sink=16, recent=64, keep 1/3.2 (the original's adaptive 3.2 rule, which is our static
    # mode): floor = block 0 + blocks 14, 15 and the 1-token block 16.
    cfg = H2OConfig(block_tokens=32, sink_tokens=16, recent_tokens=64, target_mode="static", target_keep_ratio=0.3125)
    scores = np.zeros(513)
    scores[5 * 32] = scores[9 * 32 + 31] = 1.0
    plan = plan_eviction(scores, 513, cfg)
    assert (plan.floor, plan.target0, plan.target, plan.quantized, plan.final, plan.evicted) == (97, 161, 161, 161,
                                                                                                161, 352)
    assert not plan.floor_dominates and plan.runs == 4
    expected = [*range(32), *range(5 * 32, 6 * 32), *range(9 * 32, 10 * 32), *range(14 * 32, 513)]
    assert plan.kept.tolist() == expected


@pytest.mark.parametrize("kv,sink,recent,floor", [
    (20, 0, 0, 0),  # kv % B == 0 and recent 0: no trailing block
    (22, 0, 0, 2),  # recent 0 but kv % B != 0: the partial last block stays
    (22, 1, 0, 6),  # any sink token keeps its whole block
    (22, 5, 0, 10),  # sink 5 -> two leading blocks + the partial last one
    (22, 0, 3, 6),  # recent 3 starts in block 4 (tokens 16-19) and runs into the partial block
    (22, 3, 2, 6),  # sink block 0 + partial last block
    (5, 10, 0, 5),  # sink longer than the cache
    (22, 0, 30, 22),  # recent longer than the cache
])
def test_floor_is_sink_and_recent_blocks(kv, sink, recent, floor):
    plan = plan_eviction(np.zeros(kv), kv, H2OConfig(block_tokens=4, sink_tokens=sink, recent_tokens=recent,
                                                     target_mode="static", target_keep_ratio=0.0))
    assert plan.floor == floor


def test_quantized_target_rounds_up_to_whole_blocks_above_the_floor():
    cfg = H2OConfig(block_tokens=8, sink_tokens=0, recent_tokens=0, target_mode="static", target_keep_ratio=0.3)
    plan = plan_eviction(np.zeros(40), 40, cfg)  # target0 = ceil(12) = 12, floor 0 -> 2 blocks
    assert (plan.floor, plan.target0, plan.quantized, plan.final) == (0, 12, 16, 16)
    plan = plan_eviction(np.zeros(43), 43, cfg)  # floor 3 (partial block), target0 ceil(12.9) = 13 -> 3 + 16
    assert (plan.floor, plan.target0, plan.quantized, plan.final) == (3, 13, 19, 19)
    plan = plan_eviction(np.zeros(19), 60, cfg)  # target0 ceil(18) = 18 < kv; 3 + 16 = 19 capped at kv
    assert (plan.floor, plan.target0, plan.quantized, plan.evicted) == (3, 18, 19, 0)


def test_static_and_adaptive_targets_relative_to_tokens_seen():
    static = H2OConfig(block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static", target_keep_ratio=0.25,
                       target_lossy_ratio=2.0)
    adaptive = H2OConfig(block_tokens=1, sink_tokens=0, recent_tokens=0, target_keep_ratio=0.25, target_lossy_ratio=2.0,
                         update_interval=16)
    assert plan_eviction(np.zeros(150), 300, static).target0 == 75
    # adaptive plans for the 16 tokens it grows before the next trigger: (300 + 8) / 2 - 8 = 146,
    # so it holds 146..162 tokens while 300..316 are seen: 2x on average, not only right after eviction.
    assert plan_eviction(np.zeros(200), 300, adaptive).target0 == 146
    assert plan_eviction(np.zeros(100), 300, adaptive).target0 == 100  # clamped to kv: nothing to evict
    assert plan_eviction(np.zeros(10), 10, H2OConfig(target_mode="static", target_keep_ratio=0.0)).target0 == 1
    assert plan_eviction(np.zeros(3), 1000, H2OConfig(block_tokens=1, sink_tokens=0, recent_tokens=0,
                                                      target_lossy_ratio=3.0)).target0 == 3


def test_adaptive_budgets_whole_blocks_down_and_static_rounds_up():
    base = dict(block_tokens=8, sink_tokens=0, recent_tokens=0, update_interval=2)
    adaptive = plan_eviction(np.arange(64.0), 64, H2OConfig(**base, target_lossy_ratio=2.0))  # plans 31
    static = plan_eviction(np.arange(64.0), 64, H2OConfig(**base, target_mode="static", target_keep_ratio=31 / 64))
    assert (adaptive.target0, adaptive.target, adaptive.quantized, adaptive.final) == (31, 24, 24, 24)
    assert (static.target0, static.target, static.quantized, static.final) == (31, 31, 32, 32)


def test_a_budget_below_one_block_with_no_floor_keeps_a_whole_block():
    # no sink, no recent, the default 64-token blocks, adaptive plan (64 + 8) / 3 - 8 = 16 tokens:
    # rounding down to 0 blocks wiped the layer; the target is at least one token, so one block is kept
    cfg = H2OConfig(sink_tokens=0, recent_tokens=0)
    whole = plan_eviction(np.arange(64.0), 64, cfg)
    assert (whole.floor, whole.target0, whole.target, whole.final, whole.evicted) == (0, 16, 1, 64, 0)
    plan = plan_eviction(np.arange(128.0), 128, cfg)  # plans (128 + 8) / 3 - 8 = 37: the better block
    assert (plan.floor, plan.target0, plan.target, plan.quantized, plan.runs) == (0, 37, 1, 64, 1)
    assert plan.kept.tolist() == list(range(64, 128))


def test_an_empty_cache_has_no_plan():
    with pytest.raises(ValueError, match="token_scores is empty"):
        plan_eviction(np.zeros(0), 10, H2OConfig())


def test_recency_ranking_is_the_sink_plus_recent_baseline():
    cfg = H2OConfig(block_tokens=2, sink_tokens=2, recent_tokens=2, target_mode="static", target_keep_ratio=0.5,
                    heavy_hitters=False)
    tokens = np.array([0, 0, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0], dtype=float)  # attention would keep blocks 1, 2
    assert plan_eviction(tokens, 12, cfg).kept.tolist() == [0, 1, 8, 9, 10, 11]  # the newest other block
    assert plan_eviction(tokens, 12, replace(cfg, heavy_hitters=True)).kept.tolist() == [0, 1, 2, 3, 10, 11]


def test_floor_dominance_keeps_everything():
    cfg = H2OConfig(block_tokens=4, sink_tokens=4, recent_tokens=8, target_mode="static", target_keep_ratio=0.5)
    plan = plan_eviction(np.arange(20.0), 20, cfg)  # floor 12 >= target0 10
    assert plan.floor_dominates and (plan.floor, plan.target0, plan.target, plan.quantized) == (12, 10, 12, 12)
    assert plan.kept.tolist() == list(range(20)) and plan.evicted == 0 and plan.final == 20


def test_selection_by_block_score_and_ties_go_to_the_earlier_block():
    cfg = H2OConfig(block_tokens=2, sink_tokens=1, recent_tokens=2, target_mode="static", target_keep_ratio=0.6)
    # blocks 0 (sink) and 5 (recent) are the floor (4 tokens); target0 = ceil(7.2) = 8 -> two more blocks.
    tokens = np.array([9, 9, 1.5, 1.5, 1, 0, 3, 0, 2, 1, 9, 9])  # block sums 18, 3, 1, 3, 3, 18
    plan = plan_eviction(tokens, 12, cfg)
    assert plan.kept.tolist() == [0, 1, 2, 3, 6, 7, 10, 11] and plan.runs == 3
    tokens[8] = 2.5  # block 4 now beats the tie; block 1 still wins it against block 3
    assert plan_eviction(tokens, 12, cfg).kept.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


@given(kv=st.integers(1, 160), seen_extra=st.integers(0, 80), block=st.sampled_from((1, 2, 3, 4, 7, 8, 64)),
       sink=st.sampled_from((0, 0, 1, 3, 7, 1000)), recent=st.sampled_from((0, 0, 1, 4, 9, 1000)),
       static=st.booleans(), ratio=st.floats(0.0, 1.0), lossy=st.floats(1.0, 8.0),
       interval=st.sampled_from((1, 2, 5, 16, 64)), heavy=st.booleans(), ties=st.booleans(),
       seed=st.integers(0, 2**16))
def test_plan_invariants(kv, seen_extra, block, sink, recent, static, ratio, lossy, interval, heavy, ties, seed):
    cfg = H2OConfig(block_tokens=block, sink_tokens=sink, recent_tokens=recent,
                    target_mode="static" if static else "adaptive", target_keep_ratio=ratio,
                    target_lossy_ratio=lossy, update_interval=interval, heavy_hitters=heavy)
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, kv).astype(float) if ties else rng.random(kv)
    plan = plan_eviction(scores, kv + seen_extra, cfg)
    kept = plan.kept
    assert kept.size and np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < kv
    assert kept.size >= max(plan.target, 1) and 1 <= plan.target0 <= kv and 1 <= plan.target <= kv
    if static or plan.floor_dominates:
        assert plan.target == max(plan.target0, plan.floor)
    else:  # the planned tokens' whole blocks above the floor, at least one token
        assert plan.target == plan.floor + max((plan.target0 - plan.floor) // block * block, 1)
    assert plan.evicted + plan.final == kv
    assert set(range(min(sink, kv))) | set(range(max(0, kv - recent), kv)) <= set(kept.tolist())
    block_of = np.arange(kv) // block
    kept_blocks = np.unique(block_of[kept])
    assert kept.size == np.isin(block_of, kept_blocks).sum()  # whole blocks
    if plan.floor_dominates:
        assert kept.tolist() == list(range(kv)) and plan.runs == 1
        return
    assert plan.quantized == plan.final < plan.target + block  # the fewest blocks that reach the target
    assert plan.runs == 1 + np.count_nonzero(np.diff(kept) > 1)
    blocks = np.arange(-(-kv // block))
    in_floor = (blocks < -(-min(kv, sink) // block)) | (blocks >= max(0, kv - recent) // block)
    chosen, evicted = np.isin(blocks, kept_blocks) & ~in_floor, ~np.isin(blocks, kept_blocks)
    rank = np.add.reduceat(scores, blocks * block) if heavy else blocks.astype(float)
    assert not evicted.any() or rank[chosen].min() >= rank[evicted].max()  # the best blocks beyond the floor


# --- policy ------------------------------------------------------------------------------------------

def test_ema_arithmetic():
    policy, cache = make(ema_alpha=0.5, prefill_scoring=False, trigger_min_tokens=100)
    drive(policy, cache, 2, 0)
    np.testing.assert_array_equal(policy.scores(0), [0.0, 0.0])
    policy.apply_pending(0, cache)
    cache.append(0, np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    policy.after_attention(0, np.array([[[0.2, 0.3, 0.5]], [[0.0, 0.3, 0.7]]], np.float32))  # heads averaged
    np.testing.assert_allclose(policy.scores(0), [0.05, 0.15, 0.3], rtol=1e-6)
    cache.append(0, np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    policy.after_attention(0, np.array([[[0.1, 0.1, 0.2, 0.6]]], np.float32))  # new token starts at 0
    np.testing.assert_allclose(policy.scores(0), [0.075, 0.125, 0.25, 0.3], rtol=1e-6)


def causal(rows: np.ndarray) -> np.ndarray:
    return np.asarray(rows, np.float32)[None]


def test_prefill_scoring_initialises_with_the_mean_over_the_queries_that_see_each_key():
    probs = np.stack([causal([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]])[0],
                      causal([[1, 0, 0], [0.1, 0.9, 0], [0.4, 0.4, 0.2]])[0]])
    policy, _ = make(ema_alpha=0.5, trigger_min_tokens=100)
    policy.after_attention(0, probs)
    # head-mean attention summed over rows (1.6, 1.0, 0.4), over the 3, 2 and 1 queries that see each key
    np.testing.assert_allclose(policy.scores(0), [1.6 / 3, 1.0 / 2, 0.4], rtol=1e-6)
    policy.after_attention(0, np.full((1, 1, 4), 0.25, np.float32))  # first decode step: EMA from there
    np.testing.assert_allclose(policy.scores(0), [0.8 / 3 + 0.125, 0.25 + 0.125, 0.2 + 0.125, 0.125], rtol=1e-6)
    off, _ = make(prefill_scoring=False)
    off.after_attention(0, probs)
    np.testing.assert_array_equal(off.scores(0), [0.0, 0.0, 0.0])


def test_chunked_prefill_scores_average_over_every_prompt_row_that_sees_the_key():
    policy, _ = make(trigger_min_tokens=100)
    policy.after_attention(0, causal([[1, 0], [0.5, 0.5]]))
    policy.after_attention(0, causal([[0.25, 0.25, 0.5]]), decode=False)
    np.testing.assert_allclose(policy.scores(0), [1.75 / 3, 0.75 / 2, 0.5 / 1])


def trigger_steps(policy: H2OPolicy, cache: KVCache, prompt: int, steps: int) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {layer: [] for layer in range(cache.num_layers)}

    def record(step: int) -> None:
        for layer in seen:
            if policy.pending(layer) is not None:
                seen[layer].append(step)

    drive(policy, cache, prompt, steps, after_step=record)
    return seen


def test_trigger_cadence_per_layer_in_decode_tokens():
    # keep ratio 0 evicts down to one token on every trigger, so a pending plan marks a trigger step
    policy, cache = make(2, block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static",
                         target_keep_ratio=0.0, update_interval=3, trigger_min_tokens=10)
    steps = trigger_steps(policy, cache, 8, 12)
    assert steps == {0: [2, 5, 8, 11], 1: [2, 5, 8, 11]}  # seen 10 at step 2; the cache is tiny after that
    assert cache.length(0) == cache.length(1) == 2  # one kept + step 12's token


def test_first_trigger_may_be_the_first_decode_step():
    policy, cache = make(2, block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static",
                         target_keep_ratio=0.0, update_interval=4)
    assert trigger_steps(policy, cache, 8, 6) == {0: [1, 5], 1: [1, 5]}


def test_layers_outside_the_range_are_never_compacted():
    policy, cache = make(3, layer_start=1, layer_end=1, block_tokens=1, sink_tokens=0, recent_tokens=0,
                         target_mode="static", target_keep_ratio=0.25)
    drive(policy, cache, 8, 8)
    assert [cache.length(layer) for layer in range(3)] == [16, 5, 16]
    assert policy.budget(0, 16) == 16 and policy.pending(0) is None and policy.pending(2) is None
    disabled, cache = make(3, enable=False, target_mode="static", target_keep_ratio=0.0)
    drive(disabled, cache, 8, 8)
    assert [cache.length(layer) for layer in range(3)] == [16, 16, 16]


def heavy_probs(heavy: set[int]) -> ProbsFn:
    """Attention on the tokens whose absolute position is in ``heavy`` (a small floor of the rest)."""
    def probs(cache: KVCache, layer: int, rows: int) -> np.ndarray:
        pos = cache.k(layer)[:, 0, 0].astype(int)
        weights = np.where(np.isin(pos, list(heavy)), 1.0, 0.01).astype(np.float32)
        p = np.tril(np.broadcast_to(weights, (rows, pos.size)), pos.size - rows)
        return (p / p.sum(axis=-1, keepdims=True))[None]
    return probs


def test_compaction_keeps_exactly_the_chosen_tokens_in_order_and_scores_follow():
    policy, cache = make(block_tokens=2, sink_tokens=2, recent_tokens=2, target_mode="static",
                         target_keep_ratio=0.5, update_interval=2)
    drive(policy, cache, 16, 1, heavy_probs({4, 10}))  # heavy blocks: tokens 4-5 and 10-11
    kept = policy.pending(0)
    # kv 17: floor = block 0 (sink) + tokens 14-16 (recent) = 5, target0 ceil(8.5) = 9 -> two heavy blocks
    assert kept.tolist() == [0, 1, 4, 5, 10, 11, 14, 15, 16]
    scores = policy.scores(0)
    k_before = cache.k(0).copy()
    assert policy.apply_pending(0, cache) == 8
    np.testing.assert_array_equal(cache.k(0), k_before[kept])
    np.testing.assert_array_equal(policy.scores(0), scores[kept])
    assert policy.pending(0) is None and policy.metrics()["h2o_evictions"] == 1


def test_heavy_hitters_survive_a_long_run():
    policy, cache = make(block_tokens=1, sink_tokens=1, recent_tokens=3, target_mode="static",
                         target_keep_ratio=0.4, update_interval=4)
    drive(policy, cache, 20, 40, heavy_probs({5, 9, 13, 30}))
    kept = positions(cache, 0)
    assert {0, 5, 9, 13, 30} <= set(kept) and kept[-3:] == [57, 58, 59] and kept == sorted(kept)


def test_honest_lossy_ratio_over_the_range_and_the_model():
    # B=1, no floor, keep 0.5 of tokens seen, prompt 4: held after each step's compaction 5, 4, 4, 5, 5
    policy, cache = make(2, layer_end=0, block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static",
                         target_keep_ratio=0.5)
    drive(policy, cache, 4, 5)
    m = policy.metrics()
    assert m["h2o_lossy"] == pytest.approx(35 / 23) and m["h2o_keep"] == pytest.approx(23 / 35)
    assert m["h2o_lossy_model"] == pytest.approx(70 / 58)
    assert (m["h2o_evictions"], m["h2o_evicted_tokens"]) == (3, 4)  # steps 2, 3, 5 applied 2 + 1 + 1
    assert m["h2o_target_keep_effective"] == pytest.approx(5 / 9)  # step 5: target0 ceil(4.5) = 5 of 9 seen
    assert m["h2o_evict_us"] > 0
    assert cache.length(0) == 5 and cache.length(1) == 9
    policy.reset()
    assert policy.metrics()["h2o_lossy"] == 1.0 and policy.metrics()["h2o_evictions"] == 0


def test_trigger_ratios_are_fractions_of_the_tokens_seen_from_the_last_trigger_of_any_kind():
    """The original's effective/floor/quantized columns: its kv is the tokens seen (a layer is compacted once);
    ours repeatedly compacts, so they are over the tokens seen, and ``*_held`` over the cache held then."""
    policy, cache = make(block_tokens=4, sink_tokens=0, recent_tokens=1, target_mode="static",
                         target_keep_ratio=0.25)
    names = ("h2o_target_keep_effective", "h2o_floor_keep", "h2o_quantized_keep", "h2o_floor_keep_held",
             "h2o_quantized_keep_held")
    drive(policy, cache, 8, 1)  # seen 9 = kv 9: floor 1 (block 2), target0 3, quantized 5 -> evict 4
    assert [policy.metrics()[n] for n in names] == pytest.approx([3 / 9, 1 / 9, 5 / 9, 1 / 9, 5 / 9])
    assert policy.budget(0, 9) == 5
    decode_step(policy, cache)  # seen 10, kv 6: floor 2, target0 3, quantized 6
    assert [policy.metrics()[n] for n in names] == pytest.approx([3 / 10, 2 / 10, 6 / 10, 2 / 6, 1.0])
    assert policy.pending(0) is None and policy.budget(0, 6) == 6
    decode_step(policy, cache)  # seen 11, kv 7: floor 3 (block 1 = tokens 4-6) >= target0 3 -> dominated
    assert [policy.metrics()[n] for n in names] == pytest.approx([3 / 11, 3 / 11, 3 / 11, 3 / 7, 3 / 7])
    assert policy.pending(0) is None and policy.budget(0, 7) == 7


def test_budget_on_trigger_and_other_steps():
    policy, cache = make(2, layer_end=0, block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static",
                         target_keep_ratio=0.5, update_interval=2)
    drive(policy, cache, 8, 1)
    assert policy.budget(0, 9) == 5 and policy.budget(1, 9) == 9
    decode_step(policy, cache)
    assert policy.budget(0, 6) == 6  # not a trigger step (interval 2)


def test_a_plan_for_another_cache_length_is_dropped():
    policy, cache = make(block_tokens=1, sink_tokens=0, recent_tokens=0, target_mode="static",
                         target_keep_ratio=0.5)
    drive(policy, cache, 8, 1)
    assert policy.pending(0) is not None
    cache.keep(0, np.arange(8))  # someone else shrank the cache
    assert policy.apply_pending(0, cache) == 0 and cache.length(0) == 8
    assert policy.dropped_plans == 1 and policy.metrics()["h2o_evictions"] == 0 and policy.pending(0) is None


LOG_LINE = re.compile(
    r"\[H2O\] layer=(\d+) kv=(\d+) keep_ratio=(\d+\.\d{4}) evict=(\d+) lossy_ratio=(\d+\.\d{4}) evict_us=(\d+) "
    r"reserve_pairs=(\d+) target=(\d\.\d{3}) effective=(\d\.\d{3}) floor=(\d\.\d{3}) quantized=(\d\.\d{3}) "
    r"recent=(\d+) sink=(\d+) block=(\d+)$")


def test_log_lines_of_the_worked_example():
    cfg = H2OConfig(enable=True, block_tokens=32, sink_tokens=16, recent_tokens=64, target_mode="static",
                    trigger_min_tokens=384, log_stats=True, target_keep_ratio=0.3125, prefill_scoring=False)
    lines: list[str] = []
    policy = H2OPolicy(cfg, 3, kv_heads=32, head_dim=128, bytes_per_elem=4, log=lines.append)
    drive(policy, KVCache(3, 1, 1), 512, 1, heavy_probs({5 * 32, 9 * 32}))
    assert len(lines) == 1 and policy.log_lines == []
    fields = LOG_LINE.match(lines[0]).groups()
    assert fields[:5] == ("2", "513", "0.3138", "352", f"{513 * 32768 / (161 * 32768 + 8 * 4):.4f}")
    assert fields[6:] == ("4", "0.312", "0.314", "0.189", "0.314", "64", "16", "32")
    quiet = H2OPolicy(replace(cfg, log_stats=False), 3, 32, 128)
    drive(quiet, KVCache(3, 1, 1), 512, 1)
    assert quiet.log_lines == []
    collected = H2OPolicy(cfg, 3, 32, 128)
    drive(collected, KVCache(3, 1, 1), 512, 1)
    assert len(collected.log_lines) == 1 and LOG_LINE.match(collected.log_lines[0])


def test_log_line_without_sink_or_recent_tokens():
    # kv 128 in two 64-token blocks, no floor, adaptive plan (128 + 0.5) / 3 - 0.5 = 42 tokens, less than
    # a block: the target is one token and one block is kept (it kept none, and the lossy ratio divided by zero);
    # effective is max(target0 42, floor 0) / 128 seen, as the original
    policy, cache = make(block_tokens=64, sink_tokens=0, recent_tokens=0, log_stats=True)
    drive(policy, cache, 127, 1)
    assert len(policy.log_lines) == 1
    fields = LOG_LINE.match(policy.log_lines[0]).groups()
    assert fields[1:5] == ("128", "0.5000", "64", f"{128 * 4 / (64 * 4 + 8):.4f}")
    assert fields[6] == "1" and fields[8:] == ("0.328", "0.000", "0.500", "0", "0", "64")
    decode_step(policy, cache)
    assert cache.length(0) == 65 and 1.0 < policy.metrics()["h2o_lossy"] < 2.0


# --- on a tiny random model --------------------------------------------------------------------------

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}


class Hooks:
    """LayerHooks adapter forwarding to the policy (what a runtime composes)."""

    def __init__(self, policy: H2OPolicy, model: LlamaModel):
        self.policy, self.model = policy, model

    def before_append(self, layer: int) -> None:
        self.policy.apply_pending(layer, self.model.cache)

    def after_attention(self, layer: int, probs: np.ndarray) -> None:
        assert not probs.flags.writeable
        self.policy.after_attention(layer, probs)

    def after_layer(self, layer: int) -> None:
        pass


def run(config: H2OConfig | None, prompt: np.ndarray, steps: int) -> tuple[LlamaModel, np.ndarray, Hooks | None]:
    model = LlamaModel.random(TINY, seed=7)
    hooks = None
    if config is not None:
        hooks = Hooks(H2OPolicy(config, TINY["num_hidden_layers"], 2, 16), model)
        model.hooks = hooks
    logits = [model.prefill(prompt)]
    for _ in range(steps):
        logits.append(model.decode(int(np.argmax(logits[-1]))))
    return model, np.stack(logits), hooks


@pytest.mark.parametrize("per_head", [False, True])
def test_keep_all_is_bit_identical_to_a_plain_run(per_head):
    prompt = np.random.default_rng(3).integers(0, TINY["vocab_size"], 40)
    cfg = H2OConfig(enable=True, layer_start=0, block_tokens=4, sink_tokens=0, recent_tokens=0,
                    target_mode="static", target_keep_ratio=1.0, update_interval=1, trigger_min_tokens=1,
                    per_head=per_head)
    _, plain, _ = run(None, prompt, 24)
    model, kept, hooks = run(cfg, prompt, 24)
    np.testing.assert_array_equal(kept, plain)
    assert all(model.cache.length(layer) == 64 for layer in range(4))
    m = hooks.policy.metrics()
    assert m["h2o_evictions"] == 0 and m["h2o_lossy"] == 1.0 and m["h2o_keep"] == 1.0


def test_adaptive_run_holds_about_a_third_in_range_layers():
    prompt = np.random.default_rng(4).integers(0, TINY["vocab_size"], 96)
    cfg = H2OConfig(enable=True, block_tokens=4, sink_tokens=4, recent_tokens=8, target_lossy_ratio=3.0,
                    update_interval=4, trigger_min_tokens=64)
    model, logits, hooks = run(cfg, prompt, 48)
    seen = 96 + 48
    assert [model.cache.length(layer) for layer in (0, 1)] == [seen, seen]
    for layer in (2, 3):  # planned for the interval's growth, in whole blocks
        assert seen / 3 - 4 <= model.cache.length(layer) <= seen / 3 + 4
    m = hooks.policy.metrics()
    assert 2.9 < m["h2o_lossy"] < 3.4 and 1.0 < m["h2o_lossy_model"] < m["h2o_lossy"]
    assert m["h2o_keep"] == pytest.approx(1 / m["h2o_lossy"]) and m["h2o_evictions"] >= 10
    assert np.all(np.isfinite(logits))
