"""The reference decode runtime: a real model with H2O eviction and runtime lossless compression
driven by the original's ``kv_*`` config keys, measured like llm_bench."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .config_keys import check_known_keys
from .h2o import H2OConfig, H2OPolicy
from .kvdump import write_dump
from .llama import LlamaModel
from .lossless_runtime import LosslessConfig, LosslessRuntime
from .run_memory import check_run_fits

NEUTRAL_METRICS = {"h2o_keep": 1.0, "h2o_lossy": 1.0, "h2o_lossless": 1.0}
# Every kv_* key of the original runtime (original-runtime.md §1; the v4 presets use no other), including
# the ones it stores but never acts on (kv_lossless_codec_runtime), plus our kv_h2o_prefill_scoring,
# kv_h2o_heavy_hitters and kv_h2o_per_head.
KNOWN_KV_KEYS: frozenset[str] = frozenset(H2OConfig.keys()) | frozenset(LosslessConfig.keys())


def check_config(config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = ()) -> None:
    """Raise ``ConfigError`` naming ``source`` and the key for a ``kv_*`` key that is neither in
    :data:`KNOWN_KV_KEYS` nor in ``extra_kv_keys`` (with the closest known key), or a known key of the wrong
    type. Keys without the ``kv_`` prefix are not checked. Cheap: call it before loading a model."""
    check_known_keys(config, KNOWN_KV_KEYS | frozenset(extra_kv_keys), source)
    H2OConfig.from_config(config, source)
    LosslessConfig.from_config(config, source)


@dataclass
class RunResult:
    """One measured run: speeds, the policies' metrics and (when kept) the decode-step logits."""

    prefill_tok_s: float
    decode_tok_s: float
    metrics: dict[str, float]
    logits: np.ndarray | None


class ReferenceRuntime:
    """Runs prompt + teacher-forced continuation through ``model`` with the configured KV policies."""

    def __init__(self, model: LlamaModel, config: dict[str, Any], source: str = "config",
                 log: Callable[[str], None] | None = None, extra_kv_keys: Iterable[str] = ()) -> None:
        """Raises ``ConfigError`` (see :func:`check_config`; ``extra_kv_keys`` are accepted and ignored)."""
        check_known_keys(config, KNOWN_KV_KEYS | frozenset(extra_kv_keys), source)
        c = model.config
        self.model = model
        self.source = source
        self.h2o_config = H2OConfig.from_config(config, source)
        self.lossless_config = LosslessConfig.from_config(config, source)
        self.log = log
        self.h2o = H2OPolicy(self.h2o_config, c.num_layers, c.num_kv_heads, c.head_dim,
                             log=log if self.h2o_config.log_stats else None) if self.h2o_config.enable else None
        self.lossless: LosslessRuntime | None = None
        self._decoding = False
        self._step = 0

    def run(self, prompt: np.ndarray, continuation: np.ndarray, keep_logits: bool = False,
            dump_dir: Path | None = None, run_id: str = "run", step_delay_s: float = 0.0) -> RunResult:
        """Prefill ``prompt``, then feed ``continuation`` one token at a time (teacher forcing, the
        same compute as generation). ``keep_logits`` keeps the logits predicting each continuation
        token; ``dump_dir`` writes the final KV cache (prefill and decode stages) as dumps.
        ``step_delay_s`` adds that many seconds (a sleep) to every decode step: an injected
        regression, to check that a gate catches one of that size.

        Raises ``RunTooLargeError`` (a ValueError), before allocating, when the run exceeds the model's context
        length or the memory available (:func:`h2o_kernels.run_memory.check_run_fits`)."""
        model = self.model
        check_run_fits(model.config, len(prompt), len(continuation), self.source, keep_logits)
        model.reset(capacity=len(prompt) + len(continuation))
        self._open_lossless()
        if self.h2o is not None:
            self.h2o.reset()
        model.hooks = self if (self.h2o is not None or self.lossless is not None) else None
        self._decoding, self._step = False, 0
        try:
            t0 = time.perf_counter()
            last = model.prefill(prompt)
            prefill_s = time.perf_counter() - t0
            logits = [last] if keep_logits else []  # logits[i] predicts continuation[i]
            self._decoding = True
            t0 = time.perf_counter()
            for step, token in enumerate(continuation, start=1):
                self._step = step
                out = model.decode(int(token))
                if step_delay_s > 0:
                    time.sleep(step_delay_s)
                if keep_logits and step < len(continuation):
                    logits.append(out)
            decode_s = time.perf_counter() - t0
        except BaseException:
            if self.lossless is not None:  # stop its workers; the run is lost anyway
                self.lossless.close()
                self.lossless = None
            raise
        finally:
            model.hooks = None
        metrics = dict(NEUTRAL_METRICS)
        if self.h2o is not None:
            metrics.update(self.h2o.metrics())
        if self.lossless is not None:
            metrics.update(self.lossless.metrics())
            self.lossless.restore_all()  # windows held compressed go back before anyone reads the cache
            self.lossless.close()
            self.lossless = None
        if dump_dir is not None:
            self._dump(dump_dir, run_id, len(prompt))
        return RunResult(len(prompt) / prefill_s, len(continuation) / decode_s if len(continuation) else 0.0,
                         metrics, np.stack(logits) if keep_logits and logits else None)

    def _open_lossless(self) -> None:
        if not self.lossless_config.runs:
            return
        c, h = self.model.config, self.h2o_config
        self.lossless = LosslessRuntime(self.lossless_config, c.num_layers, h.layer_range(c.num_layers),
                                        h.trigger_min_tokens, h.update_interval, self.model.cache,
                                        log=self.log if h.log_stats else None)

    def _dump(self, out_dir: Path, run_id: str, prompt_len: int) -> None:
        """Each layer's held prompt tokens as its ``prefill`` entry, its held later tokens as ``decode``.

        Per-head eviction: ``prefill`` is the rows where every KV head holds a prompt token."""
        cache = self.model.cache
        for layer in range(cache.num_layers):
            k, v = cache.k(layer), cache.v(layer)
            split = int(np.count_nonzero(cache.positions(layer) < prompt_len, axis=0).min(initial=len(k)))
            for stage, rows, start in (("prefill", slice(0, split), 0), ("decode", slice(split, None), prompt_len)):
                if len(k[rows]):
                    write_dump(out_dir, run_id=run_id, stage=stage, layer_id=layer, seq_start=start,
                               k=k[rows], v=v[rows])

    # LayerHooks --------------------------------------------------------------------------------
    def before_append(self, layer: int) -> None:
        # Restore windows held compressed first: a compaction moves rows, so it must see real data.
        if self.lossless is not None:
            self.lossless.before_append(layer)
        if self._decoding and self.h2o is not None:
            self.h2o.apply_pending(layer, self.model.cache)

    def after_attention(self, layer: int, probs: np.ndarray) -> None:
        if self.h2o is not None:  # scores, and on a decode step the trigger and the plan
            self.h2o.after_attention(layer, probs, decode=self._decoding)

    def after_layer(self, layer: int) -> None:
        if not self._decoding or self.lossless is None:
            return
        cache = self.model.cache
        kv = cache.length(layer)
        budget = self.h2o.budget(layer, kv) if self.h2o is not None else kv
        self.lossless.after_layer(layer, kv, budget, cache.n_seen + 1, self._step)
