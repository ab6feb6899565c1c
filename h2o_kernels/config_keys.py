"""Reading ``kv_*`` runtime config keys with the original's JSON typing and clamping rules.

The original (MNN ``llmconfig.hpp``) reads an int key only when the JSON value is an integer (``32.0``
falls back to the default), a bool key only when it is a JSON bool (``1`` falls back), a float key
from any number, and a string key only from a string. We keep those defaults and clamps, but a value
of the wrong JSON type is an error naming the key rather than a silent fall-back, and so is a ``kv_*`` key
that no runtime reads (a misspelling the original silently ignored).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping


class ConfigError(ValueError):
    """A config key is unknown or has a value of the wrong type; the message names the key and what was expected."""


@dataclass(frozen=True)
class Key:
    """One config key: its JSON type (``int``, ``float``, ``bool`` or ``str``), default and clamp, and for
    a string key the values it takes (the original mapped any other string to its default silently;
    we refuse it, naming the closest value)."""

    kind: type
    default: Any
    clamp: Callable[[Any], Any] = staticmethod(lambda value: value)  # type: ignore[assignment]
    choices: tuple[str, ...] | None = None


def read_keys(config: dict[str, Any], keys: dict[str, Key], source: str = "config") -> dict[str, Any]:
    """The clamped value of every key in ``keys`` (default where absent).

    Raises :class:`ConfigError` naming ``source`` and the key when a present value has the wrong type.
    """
    out = {}
    for name, key in keys.items():
        value = config.get(name, key.default)
        if name in config and not _fits(value, key.kind):
            raise ConfigError(f"{source}: key {name!r} must be {_WORDS[key.kind]}, got {value!r}")
        if key.choices is not None and value not in key.choices:
            raise ConfigError(f"{source}: key {name!r} must be one of {', '.join(map(repr, key.choices))}, got "
                              f"{value!r}{closest_hint(value, key.choices)}")
        out[name] = key.clamp(key.kind(value))
    return out


def check_known_keys(config: Mapping[str, Any], known: Collection[str], source: str = "config",
                     escape: str = "") -> None:
    """Raise :class:`ConfigError` naming ``source``, every ``kv_*`` key of ``config`` not in ``known`` and the
    closest known key of each, then ``escape`` (how to declare a key on purpose, where there is a way).
    Keys without the ``kv_`` prefix are not checked (an llm_bench config has many)."""
    unknown = [name for name in config if name.startswith("kv_") and name not in known]
    if unknown:
        names = ", ".join(f"{name!r}{closest_hint(name, known)}" for name in unknown)
        raise ConfigError(f"{source}: unknown config key {names}: fix the spelling{escape}")


def closest_hint(name: str, known: Collection[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``name`` (difflib), or ``""`` when none is close."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def clamp(low: float | None = None, high: float | None = None) -> Callable[[Any], Any]:
    """A clamp to ``[low, high]`` (either bound may be None)."""
    def apply(value: Any) -> Any:
        if low is not None and value < low:
            value = type(value)(low)
        if high is not None and value > high:
            value = type(value)(high)
        return value
    return apply


_WORDS = {int: "a JSON integer", float: "a JSON number", bool: "a JSON bool (true/false)", str: "a JSON string"}


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str)
