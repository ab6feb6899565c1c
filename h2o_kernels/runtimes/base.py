"""The interface every runtime implements, and what they share.

A :class:`Runtime` holds one loaded model (reference: our numpy LLaMA; hf: a transformers causal LM;
llm-bench: an external binary) and turns a ``kv_*`` config into a :class:`ConfiguredRun`, whose
:meth:`~ConfiguredRun.run` prefills a prompt and teacher-forces a continuation one token a step (the
same compute as generation), returning a :class:`RunResult`: speeds, the policies' metrics, the
logits for fidelity and the held KV bytes; with ``dump_dir`` it writes the held KV as dumps that the
offline online-sim reads. The gate (``pytest_h2o``) and ``h2o-gate`` know runtimes only through this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from h2o_kernels.config_keys import ConfigError, check_known_keys
from h2o_kernels.eviction.h2o import H2OConfig
from h2o_kernels.eviction.press_config import PressConfig
from h2o_kernels.lossless.manager import LosslessConfig
from h2o_kernels.model.llama import LlamaConfig

RUNTIMES = ("reference", "hf", "llm-bench")
NEUTRAL_METRICS = {"h2o_keep": 1.0, "h2o_lossy": 1.0, "h2o_lossless": 1.0}
SYNTHETIC_TOKEN = 16  # what llm_bench fed: n copies of one token id
# Every kv_* key of the original runtime (original-runtime.md §1; the v4 presets use no other), including
# kv_lossless_codec_runtime, which it stored but never read (ours: the codec profile), plus our kv_h2o_prefill_scoring,
# kv_h2o_heavy_hitters, kv_h2o_per_head and the hf runtime's kv_press keys.
KNOWN_KV_KEYS: frozenset[str] = (frozenset(H2OConfig.keys()) | frozenset(LosslessConfig.keys())
                                 | frozenset(PressConfig.keys()))


def check_config(config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = (),
                 runtime: str = "reference") -> None:
    """Raise ``ConfigError`` naming ``source`` and the key for a ``kv_*`` key that is neither in
    :data:`KNOWN_KV_KEYS` nor in ``extra_kv_keys`` (with the closest known key), a known key of the wrong
    type, or a key ``runtime`` cannot act on (a press off the hf runtime). Cheap: call it before loading a model."""
    check_known_keys(config, KNOWN_KV_KEYS | frozenset(extra_kv_keys), source)
    H2OConfig.from_config(config, source)
    LosslessConfig.from_config(config, source)
    press = PressConfig.from_config(config, source)
    if press.enable and runtime != "hf":
        raise ConfigError(f"{source}: kv_press {press.press!r} runs on the hf runtime only (--h2o-runtime hf, "
                          f"h2o-gate ... --runtime hf), not on the {runtime} runtime")


class RunFailedError(RuntimeError):
    """One run did not give a result (an external binary exited with an error or wrote no result); the message
    names the run and what went wrong. The gate fails that configuration alone and measures the others."""


@dataclass(frozen=True)
class ModelInfo:
    """What a report says of the loaded model: a short name, its size on disk and its sizes."""

    name: str
    size_bytes: int
    config: LlamaConfig | None  # None: not known (an external binary's model)

    def full_kv_bytes(self, tokens: int) -> int | None:
        """fp16 K and V bytes of ``tokens`` tokens in every layer (None when the sizes are not known)."""
        c = self.config
        return None if c is None else c.num_layers * tokens * 2 * c.num_kv_heads * c.head_dim * 2


@dataclass
class RunResult:
    """One measured run: speeds (tok/s), the policies' metrics, the logits ``[gen, vocab]`` predicting each
    continuation token when kept, and the fp16 KV bytes each layer held at the end (empty when not known)."""

    prefill_tok_s: float
    decode_tok_s: float
    metrics: dict[str, float]
    logits: np.ndarray | None
    held_kv_bytes: list[int] = field(default_factory=list)


class ConfiguredRun(Protocol):
    """A runtime with one config: run it as often as needed (each run starts from an empty cache)."""

    def run(self, prompt: np.ndarray, continuation: np.ndarray, keep_logits: bool = False,
            dump_dir: Path | None = None, run_id: str = "run", step_delay_s: float = 0.0) -> RunResult:
        """Prefill ``prompt`` (token ids), teacher-force ``continuation``; ``step_delay_s`` sleeps that long
        every decode step (an injected regression). Raises ``RunTooLargeError`` before allocating when the
        run does not fit the model or the machine, :class:`RunFailedError` when a run gives no result."""
        ...


class Runtime(Protocol):
    """One loaded model behind a runtime kind (:data:`RUNTIMES`)."""

    kind: str
    model: ModelInfo
    has_logits: bool  # runs can keep logits (fidelity); llm-bench cannot
    has_dumps: bool  # runs can write KV dumps (online-sim); llm-bench cannot

    def text_ids(self, text: str | None, count: int, seed: int = 0) -> np.ndarray:
        """``count`` token ids: the start of ``text`` (None: the default English text), or seeded random ids
        when the model has no tokenizer. Raises ``ValueError`` when the text is too short."""
        ...

    def configure(self, config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = (),
                  log: Callable[[str], None] | None = None) -> ConfiguredRun:
        """Raises ``ConfigError`` naming ``source`` and the key for a bad ``kv_*`` key; ``log`` gets the policies'
        ``[H2O]`` / ``[H2O-LOSSLESS]`` lines when ``kv_h2o_log_stats`` asks for them."""
        ...

    def close(self) -> None:
        ...


def run_tokens(runtime: Runtime, prompt_tokens: int, gen_tokens: int, text_file: Path | None,
               synthetic: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and continuation ids: the start of ``text_file`` (default: the default text), or with
    ``synthetic`` token 16 repeated, as llm_bench fed it."""
    total = prompt_tokens + gen_tokens
    if synthetic:
        ids = np.full(total, SYNTHETIC_TOKEN, dtype=np.int64)
    else:
        ids = runtime.text_ids(text_file.read_text(encoding="utf-8") if text_file else None, total)
    return ids[:prompt_tokens], ids[prompt_tokens:]


def check_text_file(path: Path | None, option: str) -> None:
    """ValueError naming ``option`` and the file unless ``path`` (when given) is readable UTF-8 text."""
    if path is None:
        return
    try:
        path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot read it ({exc.strerror or exc}); expected a UTF-8 text file") \
            from None
    except UnicodeDecodeError:
        raise ValueError(f"{option} {path}: not UTF-8 text; expected a UTF-8 text file") from None
