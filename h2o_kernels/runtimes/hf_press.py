"""kvpress presses (or a user's own) on the hf runtime, at prefill and during decode.

:class:`PressDriver` resolves ``kv_press`` (:class:`~h2o_kernels.eviction.press_config.PressConfig`) to a press
object and, after each attention of a layer in the H2O layer range, keeps ``int(seen * (1 - ratio))`` tokens:
at prefill over the prompt (as kvpress' own ``forward_hook``), then every ``decode_interval`` decode steps. A
``ScorerPress`` is asked only for its scores (``score``), and the kept indices are sorted so the cache stays in
time order (kvpress keeps top-k order, which breaks recency-based scoring on the next compression); the
press's ``compression_ratio`` is set for each call so that ratio-dependent scorers (StreamingLLM) keep the
same count. A press must score tokens (a ``ScorerPress``, or any object with its ``score``). At prefill a press
sees the prompt's hidden states (as in kvpress); during decode the hidden states
of the last :data:`HIDDEN_BUFFER` tokens, the prompt's included (kvpress' ``DecodingPress`` keeps 256 and
SnapKV needs more than its 64-token window).

Metrics as H2O's (:meth:`h2o_kernels.eviction.h2o.H2OPolicy.metrics`): ``h2o_lossy`` is the fp16 bytes of every
token seen over the bytes held, summed over the decode steps of the layers in range.
"""

from __future__ import annotations

import importlib
import time
import warnings
from typing import Any

import torch

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.eviction.press_config import PressConfig
from h2o_kernels.runtimes.hf_cache import H2OCache

HIDDEN_BUFFER = 256


class PressError(RuntimeError):
    """A press failed while scoring; the message names the press, the layer and the cache size."""


def resolve_press(name: str, compression_ratio: float) -> Any:
    """The press ``name`` names: ``package.module:factory`` (called with ``compression_ratio=``), or a kvpress
    class by snake-case name without ``Press`` (``snapkv`` -> ``SnapKVPress``). Raises ``ConfigError`` naming
    the key when it names nothing, or kvpress is not installed."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"kv_press {name!r}: cannot import it ({exc}); expected package.module:factory") \
                from None
        press = factory(compression_ratio=compression_ratio)
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
        raise ConfigError(f"kv_press {name!r}: kvpress is not installed (pip install 'pytest-h2o[hf]')") from None
    classes = {n[:-len("Press")].lower(): n for n in dir(kvpress) if n.endswith("Press") and n != "BasePress"}
    key = name.replace("_", "").lower()
    if key not in classes:
        raise ConfigError(f"kv_press {name!r}: no such kvpress press; expected one of "
                          f"{', '.join(sorted(_snake(c) for c in classes.values()))} or package.module:factory")
    press_class = getattr(kvpress, classes[key])
    if not issubclass(press_class, kvpress.ScorerPress):
        raise ConfigError(f"kv_press {name!r}: {press_class.__name__} is not a ScorerPress; the hf runtime drives "
                          "presses that score tokens (snapkv, expected_attention, observed_attention, "
                          "streaming_llm, knorm, tova, ...)")
    return press_class(compression_ratio=compression_ratio)


def _snake(cls_name: str) -> str:
    out = []
    for i, ch in enumerate(cls_name[:-len("Press")]):
        if ch.isupper() and i and not cls_name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class PressDriver:
    """Applies one press to the layers of ``layers`` of ``model`` (see the module docstring)."""

    def __init__(self, config: PressConfig, model: Any, layers: range, num_kv_heads: int, head_dim: int) -> None:
        self.config, self.layers = config, layers
        self.press = resolve_press(config.press, config.compression_ratio)
        self.bytes_per_token = 2 * 2 * num_kv_heads * head_dim
        for layer in model.model.layers:  # kvpress' own setup (its __call__ does the same)
            layer.self_attn.rotary_emb = model.model.rotary_emb
        self.press.post_init_from_model(model)
        self.reset()

    def reset(self) -> None:
        self._hidden: dict[int, torch.Tensor] = {}
        self._since: dict[int, int] = {}
        self._full = self._held = 0
        self.compress_us = 0
        self.compressions = 0
        self.evicted_tokens = 0

    def after_attention(self, module: Any, layer: int, kwargs: dict[str, Any], output: Any, cache: H2OCache,
                        decoding: bool) -> None:
        if layer not in self.layers:
            return
        hidden = kwargs["hidden_states"]
        buffered = self._hidden.get(layer)
        self._hidden[layer] = (hidden if buffered is None else torch.cat([buffered, hidden], dim=1))[:, -HIDDEN_BUFFER:]
        seen = cache.n_seen + int(hidden.shape[1])
        if not decoding:
            self._compress(module, layer, kwargs, output, cache, seen, hidden)
        elif self.config.decode_interval:
            self._since[layer] = self._since.get(layer, 0) + 1
            if self._since[layer] >= self.config.decode_interval:
                self._compress(module, layer, kwargs, output, cache, seen, self._hidden[layer])
                self._since[layer] = 0
        if decoding:
            self._full += seen * self.bytes_per_token
            self._held += int(cache.head_lengths(layer).max()) * self.bytes_per_token

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
        lossy = self._full / self._held if self._held else 1.0
        return {"h2o_keep": 1.0 / lossy, "h2o_lossy": lossy, "h2o_evict_us": self.compress_us,
                "h2o_evictions": self.compressions, "h2o_evicted_tokens": self.evicted_tokens,
                "h2o_target_keep_effective": 1.0 - self.config.compression_ratio}

