"""The reference runtime (the embedded default): our numpy LLaMA with H2O eviction and runtime lossless
compression driven by the original's ``kv_*`` config keys, measured like llm_bench."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from h2o_kernels.eviction.h2o import H2OConfig, H2OPolicy
from h2o_kernels.lossless.kvdump import dump_cache
from h2o_kernels.lossless.manager import LosslessConfig, LosslessRuntime
from h2o_kernels.model.kv_capture import prompt_ids
from h2o_kernels.model.llama import LlamaModel
from h2o_kernels.model.loading import LoadedModel, load_model
from h2o_kernels.model.run_memory import check_run_fits
from h2o_kernels.runtimes.base import NEUTRAL_METRICS, ModelInfo, RunResult, check_config


class ReferenceRun:
    """Runs prompt + teacher-forced continuation through ``model`` with the configured KV policies
    (a :class:`~h2o_kernels.runtimes.base.ConfiguredRun`)."""

    def __init__(self, model: LlamaModel, config: dict[str, Any], source: str = "config",
                 log: Callable[[str], None] | None = None, extra_kv_keys: Iterable[str] = ()) -> None:
        """Raises ``ConfigError`` (see :func:`~h2o_kernels.runtimes.base.check_config`; ``extra_kv_keys`` are
        accepted and ignored)."""
        check_config(config, source, extra_kv_keys)
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
        length or the memory available (:func:`h2o_kernels.model.run_memory.check_run_fits`)."""
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
            dump_cache(self.model.cache, dump_dir, run_id, len(prompt))
        cache = model.cache
        return RunResult(len(prompt) / prefill_s, len(continuation) / decode_s if len(continuation) else 0.0,
                         metrics, np.stack(logits) if keep_logits and logits else None,
                         [cache.nbytes(layer) for layer in range(cache.num_layers)])

    def _open_lossless(self) -> None:
        if not self.lossless_config.runs:
            return
        c, h = self.model.config, self.h2o_config
        self.lossless = LosslessRuntime(self.lossless_config, c.num_layers, h.layer_range(c.num_layers),
                                        h.trigger_min_tokens, h.update_interval, self.model.cache,
                                        log=self.log if h.log_stats else None)

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


class ReferenceRuntime:
    """The reference runtime (a :class:`~h2o_kernels.runtimes.base.Runtime`) over a loaded numpy model."""

    kind = "reference"
    has_logits = True
    has_dumps = True

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = ModelInfo(loaded.name, loaded.size_bytes, loaded.model.config)

    @classmethod
    def load(cls, spec: str, threads: int | None = 1, progress: Callable[[str], None] | None = None,
             model_option: str = "-m") -> ReferenceRuntime:
        """``spec`` as :func:`h2o_kernels.model.loading.load_model` takes it (same errors)."""
        return cls(load_model(spec, threads=threads, progress=progress, model_option=model_option))

    def text_ids(self, text: str | None, count: int, seed: int = 0) -> np.ndarray:
        return prompt_ids(self.loaded.tokenizer, text, count, self.loaded.model.config.vocab_size, seed)

    def configure(self, config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = (),
                  log: Callable[[str], None] | None = None) -> ReferenceRun:
        return ReferenceRun(self.loaded.model, config, source=source, log=log, extra_kv_keys=extra_kv_keys)

    def close(self) -> None:
        pass
