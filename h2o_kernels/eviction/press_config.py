"""The ``kv_press_*`` keys: a kvpress press (or a user's own) instead of our H2O, on the hf runtime.

A press scores the held tokens of each layer in the H2O layer range (``kv_h2o_layer_start`` /
``kv_h2o_layer_end``) and keeps the best ``int(seen * (1 - compression_ratio))`` of them, in time order:
once over the prompt at prefill (kvpress' own use), then every ``decode_interval`` decode steps over
everything seen so far (0: the prompt only), scored with the hidden states of the steps since the last
compression, as kvpress' ``DecodingPress`` does. ``compression_ratio`` is kvpress' term (the fraction
removed): 2/3 holds 3x fewer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from h2o_kernels.config_keys import ConfigError, Key, read_keys


@dataclass(frozen=True)
class PressConfig:
    """``press``: a kvpress press by name (``snapkv``, ``expected_attention``: the class name without ``Press``,
    case and underscores free) or a user's own by import path (``package.module:factory``, called with
    ``compression_ratio=``); empty: no press. With a press, ``compression_ratio`` must be in (0, 1) and
    ``decode_interval`` >= 0 (not clamped: these keys are ours, so a value out of range is an error)."""

    press: str = ""
    compression_ratio: float = 0.0
    decode_interval: int = 16

    @property
    def enable(self) -> bool:
        return bool(self.press)

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """The config keys read by :meth:`from_config` (``kv_press`` and ``kv_press_<field>``)."""
        return {("kv_press" if f.name == "press" else f"kv_press_{f.name}"):
                Key(type(f.default), f.default) for f in fields(cls)}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config") -> PressConfig:
        """From a runtime config dict. Raises ``ConfigError`` naming the key on a wrongly typed value, or
        when a press and our H2O (``kv_h2o_enable``) are both asked for."""
        values = read_keys(cfg, cls.keys(), source)
        config = cls(**{("press" if k == "kv_press" else k[len("kv_press_"):]): v for k, v in values.items()})
        if config.enable and not 0.0 < config.compression_ratio < 1.0:
            raise ConfigError(f"{source}: key 'kv_press_compression_ratio' must be in (0, 1), the fraction of tokens "
                              f"removed (0.69 holds about 3.1x fewer), got {config.compression_ratio!r}")
        if config.decode_interval < 0:
            raise ConfigError(f"{source}: key 'kv_press_decode_interval' must be >= 0 (decode steps between "
                              f"compressions, 0: the prompt only), got {config.decode_interval!r}")
        if config.enable and cfg.get("kv_h2o_enable") is True:
            raise ConfigError(f"{source}: kv_press {config.press!r} and kv_h2o_enable both evict: set "
                              "kv_h2o_enable to false (a press uses only the H2O layer range keys)")
        return config
