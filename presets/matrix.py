"""Expand a preset matrix (the original v4 preset JSON) into one runtime config per point.

The list keys of the original presets (``prompts``, ``gens``, ``h2o_keep_ratios``, ...) map to
``kv_h2o_*`` config keys; its scalar keys (``h2o_layer_start``, ``h2o_target_mode``, ...) and every
``kv_*`` key are copied. Any ``kv_*`` key given as a list becomes one more dimension. The points are
the cartesian product of all dimensions, in the original's order and with its run ids.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# preset list key -> config key (None: a bench argument, not a config key), original default
DIMENSIONS: dict[str, tuple[str | None, list[Any]]] = {
    "prompts": (None, [512]),
    "gens": (None, [128]),
    "h2o_keep_ratios": ("kv_h2o_target_keep_ratio", [0.5]),
    "h2o_block_tokens": ("kv_h2o_block_tokens", [64]),
    "h2o_sink_tokens": ("kv_h2o_sink_tokens", [32]),
    "h2o_recent_tokens": ("kv_h2o_recent_tokens", [256]),
    "h2o_ema_alphas": ("kv_h2o_ema_alpha", [0.9]),
    "h2o_update_intervals": ("kv_h2o_update_interval", [16]),
    "h2o_trigger_min_tokens": ("kv_h2o_trigger_min_tokens", [512]),
    "h2o_target_lossy_ratios": ("kv_h2o_target_lossy_ratio", [3.0]),
}
SCALARS: dict[str, tuple[str, Any]] = {
    "h2o_layer_start": ("kv_h2o_layer_start", 2),
    "h2o_layer_end": ("kv_h2o_layer_end", -1),
    "h2o_target_mode": ("kv_h2o_target_mode", "adaptive"),
    "h2o_log_stats": ("kv_h2o_log_stats", False),
}


class PresetError(ValueError):
    """A preset cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class Point:
    """One configuration of a preset: its run id, bench sizes and ``kv_*`` config."""

    run_id: str
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    config: dict[str, Any]


def load_preset(path: Path) -> dict[str, Any]:
    """Read a preset JSON object; raise :class:`PresetError` naming the file when it is not one."""
    try:
        preset = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PresetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(preset, dict):
        raise PresetError(f"{path}: expected a JSON object, got {type(preset).__name__}")
    return preset


def expand(preset: dict[str, Any], source: str = "preset") -> list[Point]:
    """Every point of ``preset``; raise :class:`PresetError` on an empty or non-list dimension."""
    dims: dict[str, list[Any]] = {}
    for key, (_, default) in DIMENSIONS.items():
        values = preset.get(key, default)
        if key == "h2o_target_lossy_ratios" and key not in preset and "h2o_target_lossy_ratio" in preset:
            values = [preset["h2o_target_lossy_ratio"]]
        dims[key] = _as_list(values, key, source)
    extra = {key: _as_list(value, key, source) for key, value in preset.items()
             if key.startswith("kv_") and isinstance(value, list)}
    empty = [key for key, values in {**dims, **extra}.items() if not values]
    if empty:
        raise PresetError(f"{source}: empty sweep dimension(s) {', '.join(empty)}: 0 runs would be produced")
    repeat = preset.get("repeat", 3)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise PresetError(f"{source}: key 'repeat' must be an integer >= 1, got {repeat!r}")
    base = {"kv_h2o_enable": True}
    base.update({config_key: preset.get(key, default) for key, (config_key, default) in SCALARS.items()})
    base.update({key: value for key, value in preset.items() if key.startswith("kv_") and key not in extra})
    points = []
    names = list(dims) + list(extra)
    for index, combo in enumerate(itertools.product(*dims.values(), *extra.values()), start=1):
        values = dict(zip(names, combo))
        config = dict(base)
        config.update({DIMENSIONS[key][0]: value for key, value in values.items()
                       if key in DIMENSIONS and DIMENSIONS[key][0]})
        config.update({key: values[key] for key in extra})
        run_id = (f"run_{index:04d}_p{values['prompts']}_g{values['gens']}_k{values['h2o_keep_ratios']}"
                  f"_b{values['h2o_block_tokens']}_lr{values['h2o_target_lossy_ratios']}")
        points.append(Point(run_id, int(values["prompts"]), int(values["gens"]), repeat, config))
    return points


def _as_list(value: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise PresetError(f"{source}: key {key!r} must be a list, got {value!r}")
    return value
