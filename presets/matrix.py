"""Expand a preset matrix (the original v4 preset JSON) into one runtime config per point.

The list keys of the original presets (``prompts``, ``gens``, ``h2o_keep_ratios``, ...) map to
``kv_h2o_*`` config keys; its scalar keys (``h2o_layer_start``, ``h2o_target_mode``, ...) and every
``kv_*`` key are copied. Any ``kv_*`` key given as a list becomes one more dimension. The points are
the cartesian product of all dimensions, in the original's order and with its run ids.

A ``kv_*`` key must be one the runtimes know (``h2o_kernels.runtimes.base.KNOWN_KV_KEYS``) or be listed in the
preset's ``extra_kv_keys`` (keys that only an external runtime reads); a misspelled key is an error naming
the closest known one. ``variants`` (named objects of ``kv_*`` keys) are laid over every point, and name it.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from h2o_kernels.config_keys import ConfigError, check_known_keys, closest_hint
from h2o_kernels.runtimes.base import KNOWN_KV_KEYS

PRESET_DIR = Path(__file__).resolve().parent
EXTRA_KEYS_HINT = '; a key that only an external runtime reads goes into the preset\'s "extra_kv_keys" list'
SCHEMA_PATH = PRESET_DIR / "preset.schema.json"

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
# preset keys that set a plugin setting (preset key -> setting), below the option, ini key and environment
PRESET_SETTINGS: dict[str, str] = {"fidelity_min_top1": "h2o_min_top1", "fidelity_max_ppl_delta": "h2o_max_ppl_delta",
                                   "fidelity_texts": "h2o_fidelity_texts"}
# run_h2o_v4_bench.py parses these dimensions as floats (``k1.0`` in a run id, ``1.0`` in a config)
FLOAT_DIMENSIONS = ("h2o_keep_ratios", "h2o_ema_alphas", "h2o_target_lossy_ratios")
# The kv_* keys run_h2o_v4_bench.py writes into every generated config, in its order, with its defaults
# (the runtime's, original-runtime.md §1, except kv_h2o_enable: the sweep always turns H2O on).
GENERATED_KV_DEFAULTS: dict[str, Any] = {
    "kv_h2o_enable": True,
    "kv_h2o_layer_start": 2,
    "kv_h2o_layer_end": -1,
    "kv_h2o_block_tokens": 64,
    "kv_h2o_sink_tokens": 32,
    "kv_h2o_recent_tokens": 256,
    "kv_h2o_target_keep_ratio": 0.5,
    "kv_h2o_target_mode": "adaptive",
    "kv_h2o_target_lossy_ratio": 3.0,
    "kv_h2o_ema_alpha": 0.9,
    "kv_h2o_update_interval": 16,
    "kv_h2o_trigger_min_tokens": 512,
    "kv_h2o_log_stats": False,
    "kv_lossless_enable": False,
    "kv_lossless_scope": "front_n",
    "kv_lossless_front_n": 2,
    "kv_lossless_codec": "none",
    "kv_lossless_runtime_enable": False,
    "kv_lossless_runtime_mode": "probe",
    "kv_lossless_block_tokens": 128,
    "kv_lossless_hot_recent_tokens": 256,
    "kv_lossless_hot_sink_tokens": 16,
    "kv_lossless_kept_sample_layers": 1,
    "kv_lossless_kept_sample_token_interval": 1,
    "kv_lossless_codec_runtime": "fp16_gear_predictive_v3",
    "kv_lossless_predictors_k": "raw,delta_seq,xor_seq,pair_delta",
    "kv_lossless_predictors_v": "raw,delta_seq,xor_seq",
    "kv_lossless_async_threads": 1,
    "kv_lossless_max_queue": 256,
    "kv_lossless_decode_cache_blocks": 64,
    "kv_lossless_strict_roundtrip_check": False,
}


class PresetError(ValueError):
    """A preset cannot be expanded; the message names the file and the key."""


@dataclass(frozen=True)
class Point:
    """One configuration of a preset: its run id, bench sizes and ``kv_*`` config; ``extra_kv_keys`` are the
    preset's keys for external runtimes (pass them to ``check_config`` / ``ReferenceRun``)."""

    run_id: str
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    config: dict[str, Any]
    label: str = ""
    extra_kv_keys: tuple[str, ...] = ()


def generated_config(config: dict[str, Any]) -> dict[str, Any]:
    """A point's config as the original sweep wrote it: every key of :data:`GENERATED_KV_DEFAULTS` in its order
    (the point's value, else the default), then the point's other keys (ours, or an external runtime's)."""
    return {**GENERATED_KV_DEFAULTS, **config}


def available_presets() -> list[str]:
    """File names of the presets shipped in this package."""
    return sorted(p.name for p in PRESET_DIR.glob("*.json") if p != SCHEMA_PATH)


def find_preset(name: str | Path) -> Path:
    """A preset path: an existing file as given, else a bare name (with or without ``.json``) in this package."""
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for candidate in (PRESET_DIR / path.name, PRESET_DIR / f"{path.name}.json"):
            if candidate.is_file() and candidate != SCHEMA_PATH:
                return candidate
    raise PresetError(f"{name}: no such preset file, and not a bundled preset "
                      f"(bundled: {', '.join(available_presets())})")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def validate(preset: Any, source: str = "preset") -> None:
    """Check ``preset`` against ``preset.schema.json``; :class:`PresetError` names the key and what was expected."""
    errors = sorted(_validator().iter_errors(preset), key=lambda e: (list(e.absolute_path), e.message))
    if not errors:
        return
    lines = []
    for error in errors[:5]:
        key = "".join(f"[{part}]" if isinstance(part, int) else (f".{part}" if i else str(part))
                      for i, part in enumerate(error.absolute_path))
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties", {}))
            unknown = sorted(k for k in set(error.instance) - known
                             if not any(re.match(pattern, k) for pattern in error.schema.get("patternProperties", {})))
            if key:  # inside a variant: kv_* keys only
                names = ", ".join(f"{k!r}{closest_hint(k, KNOWN_KV_KEYS)}" for k in unknown)
                lines.append(f"{key}: unknown key(s) {names}: a variant holds kv_* config keys only")
                continue
            names = ", ".join(f"{k!r}{closest_hint(k, known | KNOWN_KV_KEYS)}" for k in unknown)
            lines.append(f"unknown key(s) {names}: expected the preset keys of {SCHEMA_PATH.name} or kv_* config keys")
        elif error.validator == "anyOf":
            lines.append(f"key {key!r}: expected a scalar or a non-empty list of scalars, got {error.instance!r}")
        else:
            lines.append(f"key {key!r}: {error.message}" if key else error.message)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    raise PresetError(f"{source}: invalid preset: " + "; ".join(lines) + more)


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


def preset_settings(preset: dict[str, Any]) -> dict[str, Any]:
    """The plugin settings a (validated) preset gives, by setting name (see :data:`PRESET_SETTINGS`)."""
    return {setting: preset[key] for key, setting in PRESET_SETTINGS.items() if key in preset}


def expand(preset: dict[str, Any], source: str = "preset") -> list[Point]:
    """Every point of ``preset``, each with its own label.

    Raises :class:`PresetError` on an empty dimension, a key the schema rejects, a ``kv_*`` key neither known
    nor in ``extra_kv_keys``, a dimension listing a value twice, or two points whose labels cannot be told apart.
    """
    if isinstance(preset, dict):
        empty = [key for key, value in preset.items() if value == [] and key != "extra_kv_keys"]
        if empty:
            raise PresetError(f"{source}: Empty sweep dimension(s): {', '.join(empty)}. "
                              "Check argument values — 0 runs would be produced.")
    validate(preset, source)
    extra_kv_keys = tuple(preset.get("extra_kv_keys", ()))
    try:
        check_known_keys(preset, KNOWN_KV_KEYS | set(extra_kv_keys), source, escape=EXTRA_KEYS_HINT)
    except ConfigError as exc:
        raise PresetError(str(exc)) from None
    dims: dict[str, list[Any]] = {key: preset.get(key, default) for key, (_, default) in DIMENSIONS.items()}
    if "h2o_target_lossy_ratios" not in preset and "h2o_target_lossy_ratio" in preset:
        dims["h2o_target_lossy_ratios"] = [preset["h2o_target_lossy_ratio"]]
    extra = {key: value for key, value in preset.items() if key.startswith("kv_") and isinstance(value, list)}
    _reject_repeats({**dims, **extra}, source)
    dims.update({key: [float(value) for value in dims[key]] for key in FLOAT_DIMENSIONS})
    repeat = preset.get("repeat", 3)
    base = {"kv_h2o_enable": True}
    base.update({config_key: preset.get(key, default) for key, (config_key, default) in SCALARS.items()})
    base.update({key: value for key, value in preset.items() if key.startswith("kv_") and key not in extra})
    variants: dict[str, dict[str, Any]] = preset.get("variants") or {"": {}}
    for name, keys in variants.items():
        try:
            check_known_keys(keys, KNOWN_KV_KEYS | set(extra_kv_keys), f"{source}: variant {name!r}",
                             escape=EXTRA_KEYS_HINT)
        except ConfigError as exc:
            raise PresetError(str(exc)) from None
    points, combos = [], []
    names = list(dims) + list(extra)
    # labels name what varies; keep and target always, as the original's run ids, unless variants name the points
    always = () if "variants" in preset else ("h2o_keep_ratios", "h2o_target_lossy_ratios")
    varying = [key for key in names if key in always or len({**dims, **extra}[key]) > 1]
    combos_of_dims = list(itertools.product(*dims.values(), *extra.values()))
    for index, (variant, combo) in enumerate(itertools.product(variants, combos_of_dims), start=1):
        values = dict(zip(names, combo))
        config = dict(base)
        config.update({DIMENSIONS[key][0]: value for key, value in values.items()
                       if key in DIMENSIONS and DIMENSIONS[key][0]})
        config.update({key: values[key] for key in extra})
        config.update(variants[variant])
        run_id = (f"run_{index:04d}_p{values['prompts']}_g{values['gens']}_k{values['h2o_keep_ratios']}"
                  f"_b{values['h2o_block_tokens']}_lr{values['h2o_target_lossy_ratios']}"
                  + (f"_{variant}" if variant else ""))
        label = "-".join(part for part in (variant, _label(values, varying)) if part)
        points.append(Point(run_id, int(values["prompts"]), int(values["gens"]), repeat, config, label,
                            extra_kv_keys))
        combos.append(values)
    return _unique_labels(points, combos, varying, source)


def _reject_repeats(dims: dict[str, list[Any]], source: str) -> None:
    """Raise :class:`PresetError` naming the key and value when a dimension lists a value twice."""
    for key, values in dims.items():
        counts = Counter((isinstance(value, bool), value) for value in values)  # true and 1 differ
        for (_, value), n in counts.items():
            if n > 1:
                times = "twice" if n == 2 else f"{n} times"
                raise PresetError(f"{source}: key {key!r} lists {json.dumps(value)} {times}: "
                                  "each point needs its own value")


def _unique_labels(points: list[Point], combos: list[dict[str, Any]], varying: list[str],
                   source: str) -> list[Point]:
    """``points`` with the labels that collide rewritten with their string values quoted.

    Raises :class:`PresetError` naming both run ids when two labels are still the same.
    """
    counts = Counter(point.label for point in points)
    points = [replace(point, label=_label(values, varying, quote=True)) if counts[point.label] > 1 else point
              for point, values in zip(points, combos)]
    first: dict[str, Point] = {}
    for point in points:
        other = first.setdefault(point.label, point)
        if other is not point:
            raise PresetError(f"{source}: points {other.run_id} and {point.run_id} both get the label "
                              f"{point.label!r}: give the dimensions distinguishable values")
    return points


_SHORT = {"prompts": "p", "gens": "g", "h2o_keep_ratios": "keep", "h2o_block_tokens": "b", "h2o_sink_tokens": "sink",
          "h2o_recent_tokens": "recent", "h2o_ema_alphas": "ema", "h2o_update_intervals": "every",
          "h2o_trigger_min_tokens": "trig", "h2o_target_lossy_ratios": "lr"}


def _label(values: dict[str, Any], varying: list[str], quote: bool = False) -> str:
    """``<short key><value>`` of each varying dimension, joined by ``-`` (``quote``: strings in JSON quotes)."""
    return "-".join(f"{_SHORT.get(key, key.removeprefix('kv_'))}{_label_value(key, values[key], quote)}"
                    for key in varying)


def _label_value(key: str, value: Any, quote: bool = False) -> str:
    """Point labels print keep with two decimals and the lossy target with one, as the presets write them.

    ``quote`` writes strings in JSON quotes, so ``"1"`` and ``"true"`` differ from ``1`` and ``true``.
    """
    if quote and isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float) and not isinstance(value, bool):
        digits = 2 if key == "h2o_keep_ratios" else 1
        text = f"{value:.{digits}f}"
        return text if float(text) == value else repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)
