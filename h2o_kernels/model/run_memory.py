"""How much memory one reference run needs, known before anything is allocated.

The estimate follows the allocations of :mod:`h2o_kernels.model.llama` for one run of ``P`` prompt and ``G``
continuation tokens (the prompt is one prefill chunk, the cache is sized ``P + G`` up front):

- KV cache, held the whole run: per layer, token and KV head, fp16 K and V, their float32 copies and an int64 position.
- Prefill, the peak of a layer: the attention scores ``[heads, P, P]`` float32 and the causal mask built for
  them (two ``[P, P]`` float32 arrays and a bool one), or the MLP's ``[P, 2 * intermediate]`` activations
  and two ``[P, intermediate]`` temporaries, on top of the activations every layer keeps (residual, QKV, RoPE).
- Logits: a few float32 rows of the vocabulary per step, and the kept ``G`` rows twice while they are stacked.

Model weights are not counted: they are loaded (and so already used) before a run is checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from h2o_kernels.model.llama import LlamaConfig

GIB = 2**30


class RunTooLargeError(ValueError):
    """A run exceeds the model's context length or the memory available; the message gives the numbers."""


@dataclass(frozen=True)
class RunMemory:
    """Peak bytes of one run, by part: ``kv_cache`` + the larger of ``prefill`` and ``logits``."""

    kv_cache: int
    attention_scores: int
    prefill: int
    logits: int

    @property
    def total(self) -> int:
        return self.kv_cache + max(self.prefill, self.logits)


def run_memory(config: LlamaConfig, prompt_tokens: int, gen_tokens: int, keep_logits: bool = True) -> RunMemory:
    """The peak memory of one run of ``prompt_tokens`` + ``gen_tokens`` (bytes, by part; see the module doc)."""
    P, H, F = prompt_tokens, config.hidden_size, config.intermediate_size
    nh, nkv, D = config.num_heads, config.num_kv_heads, config.head_dim
    kv_cache = config.num_layers * (P + gen_tokens) * nkv * (12 * D + 8)
    scores = 4 * nh * P * P
    per_layer = 4 * P * (2 * H + (2 * nh + 3 * nkv) * D) + 8 * P * D  # residual twice, QKV, q, k, RoPE tables
    attention = scores + 9 * P * P + 12 * P * nh * D  # scores, causal mask, grouped q, output and its copy
    mlp = 16 * P * F + 4 * P * H
    logits = 4 * config.vocab_size * (4 + (2 * gen_tokens if keep_logits else 0))  # a step's few rows + kept
    return RunMemory(kv_cache, scores, per_layer + max(attention, mlp), logits)


def run_memory_bytes(config: LlamaConfig, prompt_tokens: int, gen_tokens: int, keep_logits: bool = True) -> int:
    """Estimated peak bytes of one reference run (within 2x of tracemalloc's peak; tests/test_input_validation.py)."""
    return run_memory(config, prompt_tokens, gen_tokens, keep_logits).total


def available_memory_bytes() -> int | None:
    """Memory the system can still give: psutil when installed, else ``MemAvailable`` of ``/proc/meminfo``,
    else ``os.sysconf`` free pages; None when none of them is there."""
    try:
        import psutil  # type: ignore[import-not-found]  # optional, not a dependency
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_run_fits(config: LlamaConfig, prompt_tokens: int, gen_tokens: int, source: str = "run",
                   keep_logits: bool = True, available: int | None = None) -> None:
    """Raise :class:`RunTooLargeError` when ``prompt_tokens + gen_tokens`` exceed the model's context length
    (when known) or the run's estimated peak exceeds ``available`` bytes (default: :func:`available_memory_bytes`;
    unknown skips the check). Cheap: call it before loading text or running a warm-up."""
    total = prompt_tokens + gen_tokens
    if config.max_position is not None and total > config.max_position:
        raise RunTooLargeError(f"{source}: {prompt_tokens} prompt + {gen_tokens} generated tokens exceed the "
                               f"model's context length of {config.max_position} tokens: use at most that many in all")
    available = available_memory_bytes() if available is None else available
    need = run_memory(config, prompt_tokens, gen_tokens, keep_logits)
    if available is not None and need.total > available:
        raise RunTooLargeError(
            f"{source}: {prompt_tokens} prompt + {gen_tokens} generated tokens need about {need.total / GIB:.1f} GiB "
            f"(prefill attention scores {config.num_heads} heads x {prompt_tokens}^2 float32: "
            f"{need.attention_scores / GIB:.1f} GiB; KV cache {need.kv_cache / GIB:.1f} GiB), but only "
            f"{available / GIB:.1f} GiB is available: use fewer tokens")
