"""The reference runtime (the embedded default): our numpy LLaMA with H2O eviction and runtime lossless
compression driven by the original's ``kv_*`` config keys, measured like llm_bench."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from h2o_kernels.codec.rope import model_rope
from h2o_kernels.lossless.kvdump import dump_cache
from h2o_kernels.model.kv_capture import prompt_ids
from h2o_kernels.model.llama import LlamaModel
from h2o_kernels.model.loading import LoadedModel, load_model
from h2o_kernels.model.run_memory import check_run_fits
from h2o_kernels.runtimes.base import ModelInfo, RunResult, check_config
from h2o_kernels.runtimes.policies import KVPolicies


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
        self.policies = KVPolicies(config, source, c.num_layers, c.num_kv_heads, c.head_dim, log,
                                   rope_theta=c.rope_theta)

    def run(self, prompt: np.ndarray, continuation: np.ndarray, keep_logits: bool = False,
            dump_dir: Path | None = None, run_id: str = "run", step_delay_s: float = 0.0) -> RunResult:
        """Prefill ``prompt``, then feed ``continuation`` one token at a time (teacher forcing, the
        same compute as generation). ``keep_logits`` keeps the logits predicting each continuation
        token; ``dump_dir`` writes the final KV cache (prefill and decode stages) as dumps.
        ``step_delay_s`` adds that many seconds (a sleep) to every decode step: an injected
        regression, to check that a gate catches one of that size.

        Raises ``RunTooLargeError`` (a ValueError), before allocating, when the run exceeds the model's context
        length or the memory available (:func:`h2o_kernels.model.run_memory.check_run_fits`)."""
        model, policies = self.model, self.policies
        check_run_fits(model.config, len(prompt), len(continuation), self.source, keep_logits)
        model.reset(capacity=len(prompt) + len(continuation))
        policies.start(model.cache)
        model.hooks = policies if policies.active else None
        try:
            t0 = time.perf_counter()
            last = model.prefill(prompt)
            prefill_s = time.perf_counter() - t0
            logits = [last] if keep_logits else []  # logits[i] predicts continuation[i]
            t0 = time.perf_counter()
            for step, token in enumerate(continuation, start=1):
                policies.decode_step(step)
                out = model.decode(int(token))
                if step_delay_s > 0:
                    time.sleep(step_delay_s)
                if keep_logits and step < len(continuation):
                    logits.append(out)
            decode_s = time.perf_counter() - t0
        except BaseException:
            policies.abort()
            raise
        finally:
            model.hooks = None
        metrics = policies.finish()
        cache = model.cache
        if dump_dir is not None:
            dump_cache(cache, dump_dir, run_id, len(prompt), rope=model_rope(model.config.rope_theta))
        return RunResult(len(prompt) / prefill_s, len(continuation) / decode_s if len(continuation) else 0.0,
                         metrics, np.stack(logits) if keep_logits and logits else None,
                         [cache.nbytes(layer) for layer in range(cache.num_layers)])


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
