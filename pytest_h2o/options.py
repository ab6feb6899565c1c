"""The plugin's settings: command-line options, ini keys and environment variables, in that order.

Every setting has a ``--h2o-*`` option and an ``h2o_*`` ini key; the ones the original kit's shell
scripts read from the environment keep their names (``LOSSY_TARGET``, ``KV_LOSSLESS_SCOPE``, ...),
the others read ``H2O_*``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest


@dataclass(frozen=True)
class Setting:
    """One setting: option flag, ini key, environment variable, parser and default."""

    name: str  # dest and ini key, e.g. "h2o_lossy_target"
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    config_key: str | None = None  # a kv_* key this setting overrides in every configuration

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def _drop(text: str) -> float:
    """A relative decode drop: a fraction in [0, 1) (0.05 = 5%)."""
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"expected a fraction in [0, 1) (0.05 = 5%), got {text!r}")
    return value


def _limit(text: str) -> float | None:
    """A float where a negative value means off, as the original's limits."""
    value = _finite(text)
    return None if value < 0 else value


def _baseline(text: str) -> float | None:
    """A fixed decode baseline; <= 0 means none (the same-run baseline), as the original skipped it."""
    value = _finite(text)
    return value if value > 0 else None


def _undecided(text: str) -> str:
    if text not in ("pass", "fail"):
        raise ValueError(f"expected pass or fail, got {text!r}")
    return text


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError(f"expected an integer >= 1, got {text!r}")
    return value


def _suite_size(text: str) -> int:
    """How many suite texts: 1 to the suite's size."""
    from h2o_kernels.fidelity import SUITE_TEXTS

    value = _int(text)
    if not 1 <= value <= len(SUITE_TEXTS):
        raise ValueError(f"expected an integer from 1 to {len(SUITE_TEXTS)} (texts: {', '.join(SUITE_TEXTS)}), "
                         f"got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value <= 10.0:
        raise ValueError(f"expected a fraction of the baseline step time in [0, 10] (0.10 = 10%), got {text!r}")
    return value


def _store(text: str) -> Path | None:
    return None if text.strip().lower() in ("off", "none", "") else Path(text)


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"expected {' or '.join(values) if len(values) < 3 else 'one of ' + ', '.join(values)}, "
                             f"got {text!r}")
        return text
    return parse


_codec_profile = _choice("fast", "ratio")


def _cluster(text: str) -> str:
    """``ray://HOST:PORT`` or ``local:N`` (checked without importing Ray)."""
    from pytest_h2o.cluster import parse_cluster

    parse_cluster(text)
    return text.strip()


def _mode(text: str) -> str:
    if text not in ("joint", "independent"):
        raise ValueError(f"expected joint or independent, got {text!r}")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("h2o_preset", "H2O_PRESET", str, None, "preset matrix: a JSON path or a bundled name "
            "(e.g. target_joint_scope_v4.json); turns the preset into gate tests"),
    Setting("h2o_out", "H2O_OUT", Path, None, "report folder, new or empty (default: a fresh "
            ".h2o/runs/<timestamp>-<pid>)"),
    Setting("h2o_runtime", "H2O_RUNTIME", _choice("reference", "hf", "llm-bench"), None,
            "runtime to gate: reference (numpy, the default), hf (transformers: the hf extra) or "
            "llm-bench (with --h2o-llm-bench)"),
    Setting("h2o_model", "H2O_MODEL", str, "smollm2", "model of the reference/hf runtime: smollm2, a .gguf, a "
            "config.json (random weights) or, on hf, a transformers model folder"),
    Setting("h2o_device", "H2O_DEVICE", _choice("cpu", "cuda"), "cpu", "device of the hf runtime"),
    Setting("h2o_text_file", "H2O_TEXT_FILE", Path, None, "text for prompts (default: Python's pydoc help)"),
    Setting("h2o_cluster", "H2O_CLUSTER", _cluster, None,
            "measure the configurations on a Ray cluster: ray://HOST:PORT, or local:N (a local Ray instance with N "
            "workers); each worker measures its group against its own baseline runs (the ray extra: "
            'pip install "pytest-h2o[ray]")'),
    Setting("h2o_threads", "H2O_THREADS", _positive_int, 1,
            "threads of the reference runtime (BLAS), the hf runtime (torch) / llm_bench -t"),
    Setting("h2o_gate_mode", "H2O_GATE_MODE", _mode, "joint", "joint: one configuration passes every rule; "
            "independent: the original's per-metric best of"),
    Setting("h2o_kv_dumps", "H2O_KV_DUMPS", Path, None, "KV dumps for the online-sim instead of the run's own"),
    Setting("h2o_llm_bench", "H2O_LLM_BENCH", str, None, "run this external llm_bench binary per configuration"),
    Setting("h2o_base_config", "H2O_BASE_CONFIG", Path, None, "with --h2o-llm-bench: the model's base config"),
    Setting("h2o_logs", "H2O_LOGS", Path, None, "gate existing llm_bench logs (a folder of <run_id>.log) or a CSV"),
    Setting("h2o_lossy_target", "LOSSY_TARGET", _finite, 3.0, "lossy_pass: h2o_lossy >= this"),
    Setting("h2o_lossless_target", "LOSSLESS_TARGET", _finite, 1.3, "lossless_online_pass: online-sim >= this"),
    Setting("h2o_decode_drop_target", "DECODE_DROP_TARGET", _drop, 0.05, "decode_pass: drop <= this"),
    Setting("h2o_decode_baseline", "DECODE_BASELINE", _baseline, None,
            "fixed decode baseline tok/s (default: measured in the same run; <= 0 means same-run)"),
    Setting("h2o_rounds", "H2O_ROUNDS", _positive_int, None,
            "minimum paired rounds per configuration (default: the preset's repeat)"),
    Setting("h2o_max_rounds", "H2O_MAX_ROUNDS", _positive_int, None,
            "rounds cap (default 10, or the minimum if higher): configurations whose decode-drop interval "
            "straddles the target run again up to this"),
    Setting("h2o_undecided", "H2O_UNDECIDED", _undecided, "pass",
            "what a decode verdict still undecided at the rounds cap counts as: pass or fail"),
    Setting("h2o_inject_slowdown", "H2O_INJECT_SLOWDOWN", _fraction, 0.0,
            "sensitivity check: add F x the baseline's decode step time to every candidate decode step "
            "(0.10: 10% of the baseline's step time)"),
    Setting("h2o_strict", "H2O_STRICT", _bool, False,
            "every configuration must pass every rule (default: the exit status follows overall_pass)"),
    Setting("h2o_require_runtime_decomp", "REQUIRE_RUNTIME_DECOMP", _bool, True,
            "runtime_decomp_pass: require h2o_lossless_decomp_us > 0"),
    Setting("h2o_max_queue_peak", "MAX_LOSSLESS_QUEUE_PEAK", _finite, -1.0, "runtime_queue_peak_pass limit (< 0: off)"),
    Setting("h2o_max_fallback", "MAX_LOSSLESS_FALLBACK", _finite, -1.0, "runtime_fallback_pass limit (< 0: off)"),
    Setting("h2o_min_top1", "H2O_MIN_TOP1", _limit, None, "fidelity_pass: top-1 agreement >= this (< 0: off)"),
    Setting("h2o_max_ppl_delta", "H2O_MAX_PPL_DELTA", _limit, None, "fidelity_pass: perplexity delta <= this "
            "(0.07 = +7%; < 0: off)"),
    Setting("h2o_fidelity_texts", "H2O_FIDELITY_TEXTS", _suite_size, None,
            "fidelity suite: run every configuration (and its sink+recent twin) over this many texts (pydoc, "
            "license, source, docs) and gate on their mean (default: the preset's fidelity_texts, else 3 when a "
            "fidelity limit is set, else off: one text)"),
    Setting("h2o_runtime_mode", "KV_LOSSLESS_RUNTIME_MODE", str, None, "override kv_lossless_runtime_mode",
            "kv_lossless_runtime_mode"),
    Setting("h2o_scope", "KV_LOSSLESS_SCOPE", str, None, "override kv_lossless_scope", "kv_lossless_scope"),
    Setting("h2o_kept_sample_layers", "KV_LOSSLESS_KEPT_SAMPLE_LAYERS", _int, None,
            "override kv_lossless_kept_sample_layers", "kv_lossless_kept_sample_layers"),
    Setting("h2o_kept_sample_token_interval", "KV_LOSSLESS_KEPT_SAMPLE_TOKEN_INTERVAL", _int, None,
            "override kv_lossless_kept_sample_token_interval", "kv_lossless_kept_sample_token_interval"),
    Setting("h2o_lossless_codec", "H2O_LOSSLESS_CODEC", _codec_profile, None,
            "codec profile of runtime lossless and the online-sim: fast (planes + zstd, the default) or ratio "
            "(context model, higher ratio, tens of MB/s); overrides kv_lossless_codec_runtime",
            "kv_lossless_codec_runtime"),
    Setting("h2o_history", "H2O_HISTORY", _store, Path(".h2o/history"), "history store; 'off' disables it"),
    Setting("h2o_compare", "H2O_COMPARE", str, None, "compare with a stored run: latest, a commit or a record path"),
    Setting("h2o_compare_fail", "H2O_COMPARE_FAIL", str, None,
            "fail on a regression beyond tolerance, METRIC:TOL% (comma-separated or repeated)"),
)
BY_NAME = {s.name: s for s in SETTINGS}


def add_options(parser: pytest.Parser) -> None:
    """Register every setting as an option in the ``h2o`` group and as an ini key."""
    group = parser.getgroup("h2o", "pytest-h2o KV-cache compression gate")
    for s in SETTINGS:
        text = f"{s.help} [env {s.env}]".replace("%", "%%")  # argparse formats help with %
        if s.name == "h2o_compare":
            group.addoption(s.flag, dest=s.name, nargs="?", const="latest", default=None, help=text)
        elif s.parse is _bool and s.default is False:  # a flag (ini/env can still say false)
            group.addoption(s.flag, dest=s.name, action="store_const", const="true", default=None, help=text)
        elif s.name == "h2o_compare_fail":
            group.addoption(s.flag, dest=s.name, action="append", default=None, help=text)
        else:
            group.addoption(s.flag, dest=s.name, default=None, help=text)
        parser.addini(s.name, f"{s.help} (option {s.flag})", default=None)


def raw_setting(config: pytest.Config, name: str) -> tuple[str | None, str]:
    """The setting's text as given and where: the option, else the ini key, else the environment
    variable (``(None, flag)`` when none is set)."""
    s = BY_NAME[name]
    raw = config.getoption(s.name)
    if s.name == "h2o_compare_fail" and raw:
        raw = ",".join(raw)
    if raw is not None:
        return str(raw), s.flag
    ini = config.getini(s.name)
    if ini not in (None, "", []):
        return (",".join(ini) if isinstance(ini, list) else str(ini)), f"ini {s.name}"
    env = os.environ.get(s.env) or None
    return (env, f"${s.env}") if env is not None else (None, s.flag)


def resolve(config: pytest.Config, name: str) -> Any:
    """The setting's value: option, else ini, else environment, else default. A value that does not
    parse is a usage error naming where it came from."""
    s = BY_NAME[name]
    raw, source = raw_setting(config, name)
    if raw is None:
        return s.default
    try:
        value = s.parse(str(raw))
    except ValueError as exc:
        raise pytest.UsageError(f"{source}={raw!r}: {exc}") from None
    if isinstance(value, Path) and not value.is_absolute():
        base = config.rootpath if source.startswith("ini") else config.invocation_params.dir
        value = base / value
    return value
