"""H2O heavy-hitter KV eviction (numpy), as the original runtime did it, with three fixes.

Scores are exact softmax probabilities averaged over query heads and rows, kept per token (a block's
score is the sum of its tokens', so scores survive compaction), with an EMA per decode step; prompt
tokens may be scored at prefill. One keep set per layer (the original), or per KV head (``per_head``:
each head scores with its own query heads and keeps its own tokens, as the H2O paper does).
Every layer has its own scores and its own trigger clock counted in decode tokens, and the keep target
is relative to the tokens seen, so eviction keeps the held cache near ``tokens_seen / R`` for the whole run.
``h2o_lossy`` is measured from the bytes really held.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from h2o_kernels.config_keys import Key, clamp, read_keys
from h2o_kernels.eviction.held_ratio import HeldRatio

if TYPE_CHECKING:
    from h2o_kernels.model.llama import KVCache

_LOG_FORMAT = (
    "[H2O] layer={layer} kv={kv} keep_ratio={keep:.4f} evict={evict} lossy_ratio={lossy:.4f} evict_us={us} "
    "reserve_pairs={pairs} target={target:.3f} effective={effective:.3f} floor={floor:.3f} "
    "quantized={quantized:.3f} recent={recent} sink={sink} block={block}"
)


_CLAMPS: dict[str, Callable[[Any], Any]] = {
    "layer_start": clamp(0),
    "block_tokens": clamp(1),
    "sink_tokens": clamp(0),
    "recent_tokens": clamp(0),
    "target_keep_ratio": clamp(0.0, 1.0),
    "target_lossy_ratio": clamp(1.0),
    "ema_alpha": clamp(0.0, 1.0),
    "update_interval": clamp(1),
    "trigger_min_tokens": clamp(1),
}


_CHOICES = {"target_mode": ("static", "adaptive")}


@dataclass(frozen=True)
class H2OConfig:
    """The ``kv_h2o_*`` keys (field name = key without the prefix), defaults and clamps of the original.

    Ours: ``prefill_scoring`` (``kv_h2o_prefill_scoring``) scores prompt tokens at prefill; false gives
    the original's behaviour (scores start at the first decode step). ``heavy_hitters`` false ranks the
    blocks beyond sink and recent by recency instead of attention (the sink+recent "streaming"
    baseline, for comparison). ``per_head`` gives every KV head its own scores (its query heads' softmax,
averaged over the group) and its own kept tokens, with the same floor, target and trigger clock as the
shared mode (false: one keep set per layer, the original). Values are clamped on construction.
    """

    enable: bool = False
    layer_start: int = 2
    layer_end: int = -1
    block_tokens: int = 64
    sink_tokens: int = 32
    recent_tokens: int = 256
    target_keep_ratio: float = 0.5
    target_mode: str = "adaptive"
    target_lossy_ratio: float = 3.0
    ema_alpha: float = 0.9
    update_interval: int = 16
    trigger_min_tokens: int = 512
    log_stats: bool = False
    prefill_scoring: bool = True
    heavy_hitters: bool = True
    per_head: bool = False

    def __post_init__(self) -> None:
        for name, fix in _CLAMPS.items():
            object.__setattr__(self, name, fix(getattr(self, name)))

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """The config keys read by :meth:`from_config` (``kv_h2o_<field>``)."""
        return {f"kv_h2o_{f.name}": Key(type(f.default), f.default, _CLAMPS.get(f.name, lambda v: v),
                                        _CHOICES.get(f.name)) for f in fields(cls)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config") -> H2OConfig:
        """From a runtime config dict; raises ``ConfigError`` naming the key on a wrongly typed value."""
        values = read_keys(cfg, cls.keys(), source)
        return cls(**{name[len("kv_h2o_"):]: value for name, value in values.items()})

    def layer_range(self, num_layers: int) -> range:
        """Layers H2O may evict in a model of ``num_layers`` (clamped to [0, L-1]; empty if end < start)."""
        last = num_layers - 1
        start = min(self.layer_start, last)
        end = last if self.layer_end < 0 else min(max(self.layer_end, 0), last)
        return range(start, end + 1)

    def keep_ratio(self) -> float:
        """The float32 keep ratio: ``target_keep_ratio`` (static) or ``1 / target_lossy_ratio`` (adaptive)."""
        if self.target_mode == "static":
            return float(np.float32(self.target_keep_ratio))
        return float(np.float32(1.0) / np.float32(self.target_lossy_ratio))


@dataclass(frozen=True)
class EvictionPlan:
    """One trigger's decision for a layer whose cache holds ``kv`` tokens (§3.4-3.5, target vs tokens seen).

    ``kept`` are the token indices into the current cache to keep, increasing; when the sink+recent floor
    dominates the target (or nothing is evicted) it is every index.
    """

    kv: int
    target0: int
    floor: int
    target: int
    quantized: int
    floor_dominates: bool
    kept: np.ndarray
    runs: int

    @property
    def final(self) -> int:
        """Tokens the layer holds after the plan (``kv`` when floor-dominated)."""
        return int(self.kept.size)

    @property
    def evicted(self) -> int:
        return self.kv - self.final


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def plan_eviction(token_scores: np.ndarray, tokens_seen: int, config: H2OConfig) -> EvictionPlan:
    """Plan which tokens of a layer's cache to keep, given one score per cached token.

    Blocks of ``block_tokens`` are formed over the current cache (last one partial); the sink blocks and
    the trailing blocks covering the recent tokens are the floor; the fewest best-scored other blocks
    (ties: earlier first) that reach the target are added, so a plan keeps at least ``target`` tokens
    and at least one. Static mode's target is ``clamp(ceil(ratio * tokens_seen), 1, kv)`` tokens,
    reached in whole blocks above the floor (rounded up), as the original. Adaptive mode's contract is
    the lossy ratio *held*: the layer grows by one token a step until its next trigger
    ``update_interval`` steps later, so it plans ``target0 = clamp(floor((tokens_seen + I/2) / R - I/2),
    1, kv)`` tokens and its target is that budget's whole blocks above the floor (rounded down, at least
    one token), so it holds ``R`` times less than a full cache on average rather than only just after
    each eviction.
    Raises ``ValueError`` on an empty ``token_scores``.
    """
    kv, B = int(token_scores.size), config.block_tokens
    if kv == 0:
        raise ValueError("plan_eviction: token_scores is empty; expected one score per cached token (kv >= 1)")
    n_blocks = _ceil_div(kv, B)
    sizes = np.full(n_blocks, B, dtype=np.int64)
    sizes[-1] = kv - (n_blocks - 1) * B
    keep = np.zeros(n_blocks, dtype=bool)
    keep[: _ceil_div(min(kv, config.sink_tokens), B)] = True
    keep[max(0, kv - config.recent_tokens) // B:] = True
    floor = int(sizes[keep].sum())
    if config.target_mode == "static":
        target0 = min(max(math.ceil(np.float32(config.keep_ratio()) * np.float32(tokens_seen)), 1), kv)
    else:
        half = config.update_interval / 2
        target0 = min(max(math.floor((tokens_seen + half) / config.target_lossy_ratio - half), 1), kv)
    if floor >= target0:
        return EvictionPlan(kv, target0, floor, floor, floor, True, np.arange(kv), 1)
    target = target0 if config.target_mode == "static" else floor + max((target0 - floor) // B * B, 1)
    block_scores = (np.add.reduceat(token_scores, np.arange(0, kv, B)) if config.heavy_hitters
                    else np.arange(n_blocks, dtype=np.float64))
    candidates = np.flatnonzero(~keep)
    order = candidates[np.argsort(-block_scores[candidates], kind="stable")]
    # 1 <= target - floor <= kv - floor (the candidates' total), so the first cumulative size that
    # reaches it exists: the fewest best blocks that meet the target.
    keep[order[:int(np.searchsorted(np.cumsum(sizes[order]), target - floor)) + 1]] = True
    quantized = int(sizes[keep].sum())
    runs = int(keep[0]) + int(np.count_nonzero(keep[1:] & ~keep[:-1]))
    kept = np.flatnonzero(np.repeat(keep, sizes))
    return EvictionPlan(kv, target0, floor, target, quantized, False, kept, runs)


class H2OPolicy:
    """Per-layer H2O scoring, triggering and compaction for one model, driven through LayerHooks calls.

    Per layer and forward the runtime calls :meth:`apply_pending` (``before_append``) then
    :meth:`after_attention`; :meth:`budget` tells the lossless stage how many tokens the layer keeps.
    ``log`` receives the ``[H2O]`` lines when ``log_stats`` is set (default: appended to ``log_lines``).
    Scores are ``[groups, kv]`` per layer: one group (shared mode) or one per KV head (``per_head``), row
    ``i`` of a group scoring its ``i``-th cached token. Per-head plans keep the same count in every head (the
    floor and target depend only on the length and the tokens seen, and the one partial block, the last, is
    always in the floor), so the cache stays rectangular and ``kv`` tokens a head is what each head holds.
    """

    def __init__(self, config: H2OConfig, num_layers: int, kv_heads: int, head_dim: int,
                 bytes_per_elem: int = 2, log: Callable[[str], None] | None = None):
        self.config = config
        self.num_layers = num_layers
        self.layers = config.layer_range(num_layers)
        self.groups = kv_heads if config.per_head else 1
        self.bytes_per_token = 2 * kv_heads * head_dim * bytes_per_elem
        self.log_lines: list[str] = []
        self._log = log if log is not None else self.log_lines.append
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new prompt)."""
        n, G = self.num_layers, self.groups
        self._scores = [np.zeros((G, 0)) for _ in range(n)]
        self._prefill_counts = [np.zeros((G, 0)) for _ in range(n)]
        self._seen = [0] * n
        self._steps = [0] * n
        self._last_trigger: list[int | None] = [None] * n
        self._pending: list[tuple[int, list[np.ndarray]] | None] = [None] * n
        self._final: list[int | None] = [None] * n
        self._held_ratio = HeldRatio(self.layers)
        self._trigger_ratios = (1.0, 1.0, 1.0, 1.0, 1.0)
        self.evict_us = 0.0
        self.evictions = 0
        self.evicted_tokens = 0
        self.dropped_plans = 0

    def active(self, layer: int) -> bool:
        """Whether H2O scores and evicts ``layer``."""
        return self.config.enable and layer in self.layers

    def scores(self, layer: int) -> np.ndarray:
        """The layer's per-token scores, aligned with its cache after its last ``after_attention`` (copy):
        ``[kv]`` (shared mode) or ``[kv_heads, kv]`` (per head; a short head's padding rows score 0)."""
        scores = self._scores[layer]
        return scores[0].copy() if self.groups == 1 else scores.copy()

    def pending(self, layer: int) -> np.ndarray | list[np.ndarray] | None:
        """Kept indices of the plan the layer will apply at its next call, if any (per head: one array a head)."""
        plan = self._pending[layer]
        return None if plan is None else plan[1][0] if self.groups == 1 else plan[1]

    def apply_pending(self, layer: int, cache: KVCache) -> int:
        """Compact ``cache`` to the layer's pending plan; returns the tokens removed (from each head).

        Call before the layer appends its new token. A plan made for another cache length is dropped
        (counted in ``dropped_plans``).
        """
        plan, self._pending[layer] = self._pending[layer], None
        if plan is None:
            return 0
        kv, kept = plan
        if cache.length(layer) != kv:
            self.dropped_plans += 1
            return 0
        cache.keep(layer, kept[0] if self.groups == 1 else kept)
        self._scores[layer] = np.take_along_axis(self._scores[layer], np.stack(kept), axis=1)
        self.evictions += 1
        self.evicted_tokens += kv - kept[0].size
        return kv - kept[0].size

    def after_attention(self, layer: int, probs: np.ndarray, decode: bool | None = None) -> None:
        """Score the layer's softmax ``[num_heads, q_len, kv_len]`` and, on a decode step, maybe plan.

        ``decode`` defaults to "one query row after earlier tokens"; any other forward is prefill.
        """
        heads, rows, kv = probs.shape
        if decode is None:
            decode = rows == 1 and self._seen[layer] > 0
        self._seen[layer] += rows
        self._final[layer] = None
        seen = self._seen[layer]
        if decode:
            self._steps[layer] += 1
            self._held_ratio.sample(layer, seen, kv)
        if not self.active(layer):
            return
        G = self.groups
        scores = _resized(self._scores[layer], kv)
        if G == 1:
            sums = probs.sum(axis=(0, 1), dtype=np.float64)[None] / heads
        else:  # each KV head: the mean over its query heads (h = kv_head * group + j) and rows
            sums = probs.reshape(G, heads // G * rows, kv).sum(axis=1, dtype=np.float64) / (heads // G)
        if not decode:
            if self.config.prefill_scoring:
                # Mean attention per query that can see the key: a causal prompt shows its early keys
                # to more queries, and a plain sum would favour them for that alone.
                seen_by = np.clip(seen - np.arange(kv), 0, rows).astype(np.float64)
                counts = _resized(self._prefill_counts[layer], kv)
                total = scores * counts + sums
                counts += seen_by
                scores = np.divide(total, counts, out=np.zeros((G, kv)), where=counts > 0)
                self._prefill_counts[layer] = counts
            self._scores[layer] = scores
            return
        alpha = self.config.ema_alpha
        self._scores[layer] = scores = alpha * scores + (1.0 - alpha) * (sums / rows)
        last = self._last_trigger[layer]
        if seen >= self.config.trigger_min_tokens and (
                last is None or self._steps[layer] - last >= self.config.update_interval):
            self._trigger(layer, scores, seen)

    def budget(self, layer: int, kv: int) -> int:
        """Tokens the lossless stage may use for the layer: the plan's ``final`` on a trigger step, else ``kv``."""
        final = self._final[layer]
        return kv if final is None else final

    def metrics(self) -> dict[str, float]:
        """Run metrics: honest held/full ratios over the H2O range and the model, and the last trigger's ratios.

        As the original (§3.4, §7.2), ``h2o_target_keep_effective`` = max(target0, floor), ``h2o_floor_keep`` =
        sink+recent blocks and ``h2o_quantized_keep`` = the block-quantized keep, each over the tokens seen (the
        original's ``kv``: its layers are compacted once, so a trigger sees every token), from the last trigger of
        any kind; ``1 / max(floor, quantized)`` is the lossy ceiling the original's step 4.5 checks. Ours:
        ``h2o_floor_keep_held`` and ``h2o_quantized_keep_held``, the same over the cache the layer held then.
        """
        lossy = self._held_ratio.lossy
        effective, floor, quantized, floor_held, quantized_held = self._trigger_ratios
        return {
            "h2o_keep": 1.0 / lossy,
            "h2o_lossy": lossy,
            "h2o_lossy_model": self._held_ratio.lossy_model,
            "h2o_target_keep_effective": effective,
            "h2o_floor_keep": floor,
            "h2o_quantized_keep": quantized,
            "h2o_floor_keep_held": floor_held,
            "h2o_quantized_keep_held": quantized_held,
            "h2o_evict_us": self.evict_us,
            "h2o_evictions": self.evictions,
            "h2o_evicted_tokens": self.evicted_tokens,
        }

    def _trigger(self, layer: int, scores: np.ndarray, seen: int) -> None:
        """Plan every group of the layer; they share kv, floor and target, so the first plan's numbers are all's."""
        start = time.perf_counter()
        plans = [plan_eviction(group, seen, self.config) for group in scores]
        us = (time.perf_counter() - start) * 1e6
        self.evict_us += us
        self._last_trigger[layer] = self._steps[layer]
        plan = plans[0]
        self._final[layer] = plan.final
        kv = plan.kv
        effective, floor, quantized = max(plan.target0, plan.floor) / seen, plan.floor / seen, plan.quantized / seen
        self._trigger_ratios = (effective, floor, quantized, plan.floor / kv, plan.quantized / kv)
        self._pending[layer] = (kv, [p.kept for p in plans]) if plan.evicted > 0 else None
        if plan.evicted > 0 and self.config.log_stats:
            c, bpt, runs = self.config, self.bytes_per_token, sum(p.runs for p in plans)  # per head: every head's
            self._log(_LOG_FORMAT.format(
                layer=layer, kv=kv, keep=plan.final / kv, evict=plan.evicted,
                lossy=kv * bpt / (plan.final * bpt + 8 * runs), us=int(us), pairs=runs,
                target=c.target_keep_ratio, effective=effective, floor=floor, quantized=quantized,
                recent=c.recent_tokens, sink=c.sink_tokens, block=c.block_tokens))


def _resized(rows: np.ndarray, kv: int) -> np.ndarray:
    """``rows`` ``[G, n]`` cut or zero-padded to ``[G, kv]`` (new tokens start at 0)."""
    out = np.zeros((rows.shape[0], kv))
    n = min(kv, rows.shape[1])
    out[:, :n] = rows[:, :n]
    return out
