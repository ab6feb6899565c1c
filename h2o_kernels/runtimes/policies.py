"""The KV policies of one configured run, driven the same way by every in-process runtime.

:class:`KVPolicies` holds a run's H2O policy and runtime lossless manager and takes the three per-layer calls
a runtime makes in this order (the reference model's ``LayerHooks``; the hf runtime's forward hooks):

1. :meth:`~KVPolicies.before_append`, before the layer appends its new token: the lossless manager restores
   the windows it holds compressed (a compaction moves rows, so it must see real data), then H2O applies its
   pending plan (decode steps only);
2. :meth:`~KVPolicies.after_attention`, with the layer's softmax ``[heads, q, k]``: H2O scores it, and on a
   decode step may plan;
3. :meth:`~KVPolicies.after_layer`: on a decode step, the lossless manager schedules windows within H2O's
   budget.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from h2o_kernels.codec.rope import model_rope
from h2o_kernels.eviction.h2o import H2OConfig, H2OPolicy
from h2o_kernels.lossless.manager import LosslessConfig, LosslessRuntime
from h2o_kernels.runtimes.base import NEUTRAL_METRICS


class KVPolicies:
    """H2O and runtime lossless for one ``kv_*`` config of a model of ``num_layers`` x ``num_kv_heads`` x
    ``head_dim``; ``log`` gets their ``[H2O]`` / ``[H2O-LOSSLESS]`` lines when ``kv_h2o_log_stats`` is on;
    ``rope_theta`` (the model's rotate-half RoPE base) lets the ratio codec profile predict K rows through RoPE.
    Raises ``ConfigError`` naming ``source`` for a badly typed key."""

    def __init__(self, config: dict[str, Any], source: str, num_layers: int, num_kv_heads: int, head_dim: int,
                 log: Callable[[str], None] | None = None, rope_theta: float | None = None) -> None:
        self.rope = model_rope(rope_theta)
        self.h2o_config = H2OConfig.from_config(config, source)
        self.lossless_config = LosslessConfig.from_config(config, source)
        self.num_layers = num_layers
        self.log = log if self.h2o_config.log_stats else None
        self.h2o = (H2OPolicy(self.h2o_config, num_layers, num_kv_heads, head_dim, log=self.log)
                    if self.h2o_config.enable else None)
        self.lossless: LosslessRuntime | None = None
        self.cache: Any = None
        self.decoding = False
        self.step = 0  # the decode step (1-based) being run; 0 during prefill

    @property
    def active(self) -> bool:
        """Whether a run needs the per-layer calls at all."""
        return self.h2o is not None or self.lossless_config.runs

    def start(self, cache: Any) -> None:
        """A new run over the empty ``cache`` (a :class:`~h2o_kernels.lossless.manager.KVCacheLike` with ``keep``
        and ``n_seen``), prefill first."""
        self.cache, self.decoding, self.step = cache, False, 0
        if self.h2o is not None:
            self.h2o.reset()
        if self.lossless_config.runs:
            h = self.h2o_config
            self.lossless = LosslessRuntime(self.lossless_config, self.num_layers, h.layer_range(self.num_layers),
                                            h.trigger_min_tokens, h.update_interval, cache, log=self.log,
                                            rope=self.rope)

    def decode_step(self, step: int) -> None:
        """Decode step ``step`` (1-based) begins."""
        self.decoding, self.step = True, step

    def before_append(self, layer: int) -> None:
        if self.lossless is not None:
            self.lossless.before_append(layer)
        if self.decoding and self.h2o is not None:
            self.h2o.apply_pending(layer, self.cache)

    def after_attention(self, layer: int, probs: np.ndarray) -> None:
        if self.h2o is not None:
            self.h2o.after_attention(layer, probs, decode=self.decoding)

    def after_layer(self, layer: int) -> None:
        if not self.decoding or self.lossless is None:
            return
        kv = self.cache.length(layer)
        budget = self.h2o.budget(layer, kv) if self.h2o is not None else kv
        self.lossless.after_layer(layer, kv, budget, self.cache.n_seen + 1, self.step)

    def finish(self) -> dict[str, float]:
        """The run's metrics; the windows held compressed are restored (the cache is whole again, for dumps and
        held bytes) and the lossless workers stop."""
        metrics = dict(NEUTRAL_METRICS)
        if self.h2o is not None:
            metrics.update(self.h2o.metrics())
        if self.lossless is not None:
            metrics.update(self.lossless.metrics())
            self.lossless.restore_all()
            self.lossless.close()
            self.lossless = None
        return metrics

    def abort(self) -> None:
        """A run failed: stop the lossless workers (the run is lost anyway)."""
        if self.lossless is not None:
            self.lossless.close()
            self.lossless = None
