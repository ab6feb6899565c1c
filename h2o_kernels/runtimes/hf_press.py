"""kvpress presses (or a user's own) on the hf runtime, at prefill and during decode.

:class:`PressDriver` resolves ``kv_press`` (:class:`~h2o_kernels.eviction.press_config.PressConfig`) to a press
object and, after each attention of a layer in the H2O layer range, keeps ``int(seen * (1 - ratio))`` tokens:
at prefill over the prompt (as kvpress' own ``forward_hook``), then every ``decode_interval`` decode steps. The
press is asked only for its scores (``score``, as every kvpress ``ScorerPress`` has it), and the kept indices are
sorted so the cache stays in time order (kvpress keeps top-k order, which breaks recency-based scoring on the
next compression); the press's ``compression_ratio`` is set for each call so that ratio-dependent scorers
(StreamingLLM) keep the same count. At prefill a press sees the prompt's hidden states (as in kvpress); during
decode the hidden states of the last :data:`HIDDEN_BUFFER` tokens, the prompt's included (kvpress'
``DecodingPress`` keeps 256, and SnapKV needs more than its 64-token window).

Metrics as H2O's (:meth:`h2o_kernels.eviction.h2o.H2OPolicy.metrics`): on every decode step, the fp16 bytes of
every token seen and of the tokens each layer holds during its attention (before that step's compression);
``h2o_lossy`` over the layers in range, ``h2o_lossy_model`` over every layer.
"""

from __future__ import annotations

import importlib
import time
import warnings
from typing import Any

import torch

from h2o_kernels.config_keys import ConfigError, closest_hint
from h2o_kernels.eviction.held_ratio import HeldRatio
from h2o_kernels.eviction.press_config import PressConfig
from h2o_kernels.runtimes.base import RunFailedError
from h2o_kernels.runtimes.hf_cache import H2OCache

HIDDEN_BUFFER = 256


class PressError(RunFailedError):
    """A press failed while scoring; the message names the press, the layer and the cache size. The gate fails
    that configuration alone."""


def resolve_press(name: str, compression_ratio: float) -> Any:
    """The press ``name`` names: ``package.module:factory`` (called with ``compression_ratio=``), or a kvpress
    ``ScorerPress`` by snake-case class name without ``Press`` (``snapkv`` -> ``SnapKVPress``). Raises
    ``ConfigError`` naming ``kv_press`` when it names nothing usable, cannot be built, or kvpress is missing."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # ImportError, AttributeError, ValueError (an empty module name), its own errors
            raise ConfigError(f"kv_press {name!r}: cannot import it ({type(exc).__name__}: {exc}); expected "
                              "package.module:factory") from None
        press = _build(name, factory, compression_ratio)
        if not callable(getattr(press, "score", None)):
            raise ConfigError(f"kv_press {name!r}: {type(press).__name__} has no score(module, hidden_states, keys, "
                              "values, attentions, kwargs) method; the hf runtime drives presses that score tokens "
                              "(kvpress ScorerPress subclasses)")
        return press
    try:
        with warnings.catch_warnings():  # kvpress imports fire, which imports the deprecated pipes module
            warnings.simplefilter("ignore", DeprecationWarning)
            import kvpress
    except ImportError:
        raise ConfigError(f"kv_press {name!r}: kvpress is not installed: pip install 'pytest-h2o[hf]' (in a clone "
                          "of the project: pip install '.[hf]')") from None
    scorer = kvpress.ScorerPress
    classes = {n[:-len("Press")].lower(): n for n in dir(kvpress) if n.endswith("Press") and n != "BasePress"}
    key = name.replace("_", "").lower()
    if key not in classes:
        usable = sorted(n[:-len("Press")].lower() for n in classes.values() if _drivable(getattr(kvpress, n), scorer))
        raise ConfigError(f"kv_press {name!r}: no such kvpress press{closest_hint(key, usable)}; the hf runtime "
                          f"drives {', '.join(usable)}, or package.module:factory")
    press_class = getattr(kvpress, classes[key])
    if not _drivable(press_class, scorer):
        why = "is not a ScorerPress" if not issubclass(press_class, scorer) else "compresses its own way"
        raise ConfigError(f"kv_press {name!r}: {press_class.__name__} {why}; the hf runtime drives presses by their "
                          "token scores (snapkv, expected_attention, observed_attention, streaming_llm, knorm, tova, "
                          "...)")
    return _build(name, press_class, compression_ratio)


def check_press(config: dict[str, Any], source: str = "config") -> None:
    """Raise ``ConfigError`` naming ``source`` unless ``config``'s ``kv_press`` (if any) resolves to a press."""
    press = PressConfig.from_config(config, source)
    if press.enable:
        try:
            resolve_press(press.press, press.compression_ratio)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _build(name: str, factory: Any, compression_ratio: float) -> Any:
    try:
        return factory(compression_ratio=compression_ratio)
    except Exception as exc:  # a press that needs other arguments, or rejects the ratio
        raise ConfigError(f"kv_press {name!r}: cannot build it with compression_ratio={compression_ratio} "
                          f"({type(exc).__name__}: {exc})") from None


def _drivable(press_class: Any, scorer: type) -> bool:
    """A kvpress class that scores tokens and keeps kvpress' own top-k compression (which we replace)."""
    return isinstance(press_class, type) and issubclass(press_class, scorer) and press_class.compress is scorer.compress


class PressDriver:
    """Applies one press to the layers of ``layers`` of ``model`` (see the module docstring)."""

    def __init__(self, config: PressConfig, model: Any, layers: range) -> None:
        """Raises ``ConfigError`` naming ``kv_press`` when the press cannot be built or set up for ``model``."""
        self.config, self.layers = config, layers
        self.press = resolve_press(config.press, config.compression_ratio)
        for layer in model.model.layers:  # kvpress' own setup (its __call__ does the same)
            layer.self_attn.rotary_emb = model.model.rotary_emb
        setup = getattr(self.press, "post_init_from_model", None)
        if setup is not None:
            try:
                setup(model)
            except Exception as exc:
                raise ConfigError(f"kv_press {config.press!r}: its post_init_from_model failed "
                                  f"({type(exc).__name__}: {exc})") from None
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new run)."""
        self._prompt_hidden: dict[int, torch.Tensor] = {}  # the prompt's last HIDDEN_BUFFER hidden states
        self._decode_hidden: dict[int, list[torch.Tensor]] = {}
        self._since: dict[int, int] = {}
        self._held_ratio = HeldRatio(self.layers)
        self.compress_us = 0
        self.compressions = 0
        self.evicted_tokens = 0

    def after_attention(self, module: Any, layer: int, kwargs: dict[str, Any], output: Any, cache: H2OCache,
                        decoding: bool) -> None:
        """After layer ``layer``'s attention: account the step, then compress when due."""
        hidden = kwargs["hidden_states"]
        seen = cache.n_seen + int(hidden.shape[1])
        if decoding:
            self._held_ratio.sample(layer, seen, int(cache.head_lengths(layer).max()))
        if layer not in self.layers:
            return
        if not decoding:
            if self.config.decode_interval:
                self._prompt_hidden[layer] = hidden[:, -HIDDEN_BUFFER:]
            self._compress(module, layer, kwargs, output, cache, seen, hidden)
            return
        if not self.config.decode_interval:
            return
        steps = self._decode_hidden.setdefault(layer, [])
        steps.append(hidden)
        del steps[:-HIDDEN_BUFFER]
        self._since[layer] = self._since.get(layer, 0) + 1
        if self._since[layer] >= self.config.decode_interval:
            parts = [self._prompt_hidden[layer]] if layer in self._prompt_hidden else []
            buffered = torch.cat([*parts, *steps], dim=1)[:, -HIDDEN_BUFFER:]
            self._compress(module, layer, kwargs, output, cache, seen, buffered)
            self._since[layer] = 0

    def _compress(self, module: Any, layer: int, kwargs: dict[str, Any], output: Any, cache: H2OCache,
                  seen: int, hidden: torch.Tensor) -> None:
        held = cache.length(layer)
        keep = int(seen * (1 - self.config.compression_ratio))
        if keep >= held or keep < 1:
            return
        t0 = time.perf_counter_ns()
        lay = cache.layers[layer]
        attentions = output[1] if len(output) > 1 else None
        ratio = getattr(self.press, "compression_ratio", None)
        self.press.compression_ratio = 1.0 - (keep + 0.5) / held  # int(held * (1 - r)) == keep
        try:
            scores = self.press.score(module, hidden, lay.keys, lay.values, attentions, kwargs)
        except Exception as exc:  # a press's own precondition (e.g. SnapKV's window), named with where it broke
            raise PressError(f"kv_press {self.config.press!r} failed on layer {layer} holding {held} of {seen} tokens "
                             f"({'decode' if cache.n_seen else 'prefill'}, {hidden.shape[1]} hidden states): "
                             f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.press.compression_ratio = ratio
        kept = scores[0].topk(keep, dim=-1).indices.sort(dim=-1).values.cpu().numpy()  # [kv_heads, keep]
        cache.keep(layer, list(kept))
        self.evicted_tokens += held - cache.length(layer)
        self.compressions += 1
        self.compress_us += (time.perf_counter_ns() - t0) // 1000

    def metrics(self) -> dict[str, float]:
        lossy = self._held_ratio.lossy
        return {"h2o_keep": 1.0 / lossy, "h2o_lossy": lossy, "h2o_lossy_model": self._held_ratio.lossy_model,
                "h2o_evict_us": self.compress_us, "h2o_evictions": self.compressions,
                "h2o_evicted_tokens": self.evicted_tokens,
                "h2o_target_keep_effective": 1.0 - self.config.compression_ratio}
