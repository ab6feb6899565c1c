"""Gate runs across commits: a store of one JSON record per run, and comparisons between runs.

A *record* (:func:`make_record`) is a gate report reduced to what is worth keeping over time: the
git commit, the machine, the preset, the verdicts and every configuration's numeric metrics, plus
the derived ``decode_vs_baseline`` (decode tok/s over the same run's baseline tok/s). :func:`append`
writes it into the store (default ``.h2o/history/``) as ``<UTC yyyymmddTHHMMSSffffff>-<commit[:10]>.json``,
atomically and never over another run; :func:`load` reads the store back in time order, skipping
unreadable files with a warning.

:func:`compare` checks a run against an earlier one (:func:`resolve`: ``latest``, a commit or a file)
under ``METRIC:TOL%`` specs (:func:`parse_compare_specs`):

- a ratio or a speed regresses when it is worse by more than TOL percent of the old value, in the
  metric's own direction (:data:`HIGHER_IS_BETTER`, :data:`LOWER_IS_BETTER`, any ``*_us``: lower);
- ``decode_tps`` is compared as ``decode_vs_baseline``, the speed as a ratio of each run's own
  same-run baseline, so a uniformly slower machine is not a regression; a run without a same-run
  baseline falls back to raw tok/s, and the comparison's note says so;
- metrics that are differences already (``h2o_fidelity_ppl_delta``, ``decode_drop``; they sit near 0
  and may be negative) are compared by absolute difference in percentage points: ``ppl:1%`` allows
  the perplexity delta to grow by 0.01;
- ``*`` or ``all`` as METRIC stands for :data:`ALL_METRICS` (compression ratios, speed, fidelity; not
  counters such as queue peaks, which go from 0 to 1 as an infinite relative change).

Nothing here needs pytest or numpy.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

SCHEMA_VERSION = 1
DEFAULT_STORE = Path(".h2o/history")
UNKNOWN = "unknown"

HIGHER_IS_BETTER: frozenset[str] = frozenset({
    "h2o_lossy", "h2o_lossy_model", "h2o_lossless", "lossless_online", "lossless_scope", "total_ratio",
    "decode_tps", "prefill_tps", "decode_vs_baseline", "h2o_fidelity_top1", "h2o_lossless_decode_cache_hit",
})
LOWER_IS_BETTER: frozenset[str] = frozenset({
    "h2o_keep",  # kept fraction, 1 / h2o_lossy
    "h2o_fidelity_ppl_delta", "h2o_fidelity_kl", "decode_drop", "h2o_lossless_queue_peak",
    "h2o_lossless_async_queue_peak", "h2o_lossless_fallback", "h2o_lossless_backpressure_skip",
    "h2o_lossless_decode_cache_miss",
})
# differences already (near 0, may be negative): compared in percentage points, not relative change
ABSOLUTE_METRICS: frozenset[str] = frozenset({"h2o_fidelity_ppl_delta", "decode_drop"})
# what ``*`` / ``all`` expands to: compression, speed and fidelity (not counters such as queue peaks)
ALL_METRICS: tuple[str, ...] = ("h2o_lossy", "lossless_online", "lossless_scope", "total_ratio", "decode_tps",
                                "h2o_fidelity_top1", "h2o_fidelity_ppl_delta")
_EPS = 1e-9


class HistoryError(Exception):
    """A history lookup that found nothing (the message names the store, the request and what exists)."""


# --------------------------------------------------------------------------------------------- records


def _now() -> datetime:
    """The current UTC time (a function so tests can pin the clock)."""
    return datetime.now(timezone.utc)


def _git(root: Path, *args: str) -> str | None:
    """``git args`` in ``root``; None when git is missing, fails or ``root`` is not a repository."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(root: Path | None = None) -> dict[str, Any]:
    """``commit`` (full sha), ``dirty`` (uncommitted changes; None if unknown) and ``branch``, or
    ``"unknown"`` for what git cannot tell."""
    root = Path(root) if root is not None else Path.cwd()
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        return {"commit": UNKNOWN, "dirty": None, "branch": UNKNOWN}
    status = _git(root, "status", "--porcelain")
    branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    return {"commit": commit, "dirty": None if status is None else bool(status), "branch": branch or UNKNOWN}


def machine_info() -> dict[str, Any]:
    """What the speed numbers depend on: OS, CPU, core count, Python (no host names or users)."""
    return {"platform": platform.platform(), "system": platform.system(), "machine": platform.machine(),
            "processor": platform.processor() or UNKNOWN, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "implementation": sys.implementation.name}


def _number(value: Any) -> float | None:
    """A finite int/float (not bool) as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metric row plus ``decode_vs_baseline``; dicts, strings and NaN dropped."""
    out = {key: num for key, value in metrics.items() if (num := _number(value)) is not None}
    decode, base = out.get("decode_tps"), out.get("baseline_decode_tps")
    if decode is not None and base is not None and base > 0:
        out["decode_vs_baseline"] = decode / base
    return out


def _record_config(config: Mapping[str, Any]) -> dict[str, Any]:
    verdicts = {rule: {"passed": bool(v.get("passed")), "enabled": bool(v.get("enabled")),
                       "value": _number(v.get("value"))}
                for rule, v in config.get("verdicts", {}).items()}
    return {"passed": bool(config.get("passed")), "metrics": _numeric_metrics(config.get("metrics", {})),
            "verdicts": verdicts}


def make_record(report: Mapping[str, Any], root: Path | None = None) -> dict[str, Any]:
    """A history record of a :func:`gates.gate_report.build_report` report; git is asked in ``root``
    (default: the working directory). A report's own ``commit`` key is used when git cannot tell."""
    git = git_info(root)
    if git["commit"] == UNKNOWN and isinstance(report.get("commit"), str) and report["commit"]:
        git["commit"] = report["commit"]
    structured = {"mode", "thresholds", "configs", "overall", "joint", "independent"}
    meta = {key: value for key, value in report.items()
            if key not in structured and (value is None or isinstance(value, (str, int, float, bool)))}
    overall = report.get("overall", {})
    return {
        "schema": SCHEMA_VERSION,
        "timestamp": _now().isoformat(timespec="microseconds"),
        "git": git,
        "machine": machine_info(),
        "preset": report.get("preset"),
        "mode": report.get("mode"),
        "thresholds": dict(report.get("thresholds", {})),
        "meta": meta,
        "overall": {"passed": bool(overall.get("passed")), "passing": list(overall.get("passing", [])),
                    "reason": overall.get("reason", "")},
        "configs": {c["name"]: _record_config(c) for c in report.get("configs", [])},
    }


# ----------------------------------------------------------------------------------------------- store


def record_time(record: Mapping[str, Any]) -> datetime:
    """The record's UTC timestamp (the epoch when missing or malformed, so it sorts first)."""
    try:
        stamp = datetime.fromisoformat(str(record["timestamp"]))
    except (KeyError, ValueError):
        return datetime.fromtimestamp(0, timezone.utc)
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=timezone.utc)


def short_commit(record: Mapping[str, Any], length: int = 10) -> str:
    """The first ``length`` characters of the record's commit (``"unknown"`` as is)."""
    commit = str(record.get("git", {}).get("commit") or UNKNOWN)
    return commit if commit == UNKNOWN else commit[:length]


def _file_stem(record: Mapping[str, Any]) -> str:
    stamp = record_time(record).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    commit = re.sub(r"[^0-9A-Za-z]", "_", short_commit(record))
    return f"{stamp}-{commit}"


def append(store: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as a new file in ``store`` (created if needed) and return its path.

    The file appears complete or not at all (temp file, then a hard link, which fails rather than
    replace an existing run); a name already taken gets ``-1``, ``-2``, ... so concurrent runs never
    overwrite each other.
    """
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(record)
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    handle, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=store)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        for attempt in range(10_000):
            target = store / (f"{stem}.json" if attempt == 0 else f"{stem}-{attempt}.json")
            if _claim(tmp, target):
                return target
        raise HistoryError(f"could not find a free file name for {stem} in {store}")
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path, target: Path) -> bool:
    """Publish ``tmp`` as ``target`` unless ``target`` exists; False when the name is taken."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here: reserve the name exclusively, then replace it atomically
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        os.replace(tmp, target)
        return True


@dataclass
class LoadResult:
    """The readable records in time order, and one message per file that was skipped."""

    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _check_record(data: Any) -> str | None:
    """Why ``data`` is not a usable record, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    schema = data.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        return "no schema version (not a history record)"
    if schema > SCHEMA_VERSION:
        return f"schema {schema} is newer than this pytest-h2o reads ({SCHEMA_VERSION})"
    if not isinstance(data.get("timestamp"), str) or not isinstance(data.get("configs"), dict):
        return "missing timestamp or configs"
    return None


def read_record(path: Path) -> dict[str, Any]:
    """One record file; ``_path`` is set to where it came from. Raises HistoryError when unusable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HistoryError(f"{path}: unreadable history record ({exc})") from exc
    problem = _check_record(data)
    if problem:
        raise HistoryError(f"{path}: {problem}")
    data["_path"] = str(path)
    return data


def load_with_errors(store: Path) -> LoadResult:
    """Every record in ``store`` sorted by timestamp (then file name); unusable files are listed in
    ``errors`` instead. A missing store is empty."""
    store = Path(store)
    result = LoadResult()
    if not store.is_dir():
        return result
    for path in sorted(p for p in store.glob("*.json") if not p.name.startswith(".")):
        try:
            result.records.append(read_record(path))
        except HistoryError as exc:
            result.errors.append(f"skipped {exc}")
    result.records.sort(key=lambda r: (record_time(r), r["_path"]))
    return result


class HistoryWarning(UserWarning):
    """A history file that could not be read and was skipped."""


def load(store: Path) -> list[dict[str, Any]]:
    """:func:`load_with_errors` records; each skipped file becomes a :class:`HistoryWarning`."""
    result = load_with_errors(store)
    for message in result.errors:
        warnings.warn(message, HistoryWarning, stacklevel=2)
    return result.records


def preset_matches(record: Mapping[str, Any], preset: str | None) -> bool:
    """Whether the record's preset is ``preset`` (by full text, file name or stem); None matches all."""
    if preset is None:
        return True
    stored = record.get("preset")
    if not isinstance(stored, str):
        return False
    wanted = {preset, Path(preset).name, Path(preset).stem}
    return bool({stored, Path(stored).name, Path(stored).stem} & wanted)


def resolve(store: Path, ref: str = "latest", preset: str | None = None,
            records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The stored run ``ref`` names: ``latest`` (the newest), a commit sha prefix (its newest run) or
    a record file's path; ``preset`` filters the first two. ``records`` skips re-reading the store.
    Raises HistoryError naming the store, the request and what the store holds."""
    ref = (ref or "latest").strip()
    path = Path(ref)
    if ref.endswith(".json") or path.is_file():
        if not path.is_file():
            raise HistoryError(f"no history record file {path} (asked for {ref!r})")
        return read_record(path)
    pool = [dict(r) for r in (load(store) if records is None else records)]
    candidates = [r for r in pool if preset_matches(r, preset)]
    scope = f" for preset {preset!r}" if preset else ""
    if not candidates:
        presets = sorted({str(r.get("preset")) for r in pool})
        held = f"{len(pool)} runs of presets {', '.join(presets)}" if pool else "no runs"
        raise HistoryError(f"no stored run{scope} in {store} to compare with (asked for {ref!r}; it holds {held})")
    if ref == "latest":
        return candidates[-1]
    if not re.fullmatch(r"[0-9a-fA-F]{4,40}", ref):
        raise HistoryError(f"{ref!r} is not 'latest', a commit sha prefix (4-40 hex digits) or a record file")
    matches = [r for r in candidates if str(r.get("git", {}).get("commit", "")).lower().startswith(ref.lower())]
    commits = sorted({r["git"]["commit"] for r in matches})
    if len(commits) > 1:
        raise HistoryError(f"commit prefix {ref!r} is ambiguous in {store}: {', '.join(c[:12] for c in commits)}")
    if not matches:
        known = list(dict.fromkeys(short_commit(r) for r in reversed(candidates)))
        more = f" (and {len(known) - 10} more)" if len(known) > 10 else ""
        raise HistoryError(f"no stored run of commit {ref!r}{scope} in {store}; "
                           f"stored commits, newest first: {', '.join(known[:10])}{more}")
    return matches[-1]


def describe_record(record: Mapping[str, Any]) -> str:
    """One line: commit (``+dirty``), branch, time, preset, verdict and machine."""
    git = record.get("git", {})
    machine = record.get("machine", {})
    dirty = "+dirty" if git.get("dirty") else ""
    verdict = "pass" if record.get("overall", {}).get("passed") else "fail"
    return (f"{short_commit(record)}{dirty} ({git.get('branch', UNKNOWN)}) at {record.get('timestamp')}, "
            f"preset {record.get('preset')}, {verdict}, on {machine.get('machine', UNKNOWN)} "
            f"x{machine.get('cpu_count', '?')} {machine.get('system', '')}".rstrip())


# ----------------------------------------------------------------------------------------- comparison


def known_metrics() -> list[str]:
    """Every metric with a known direction (plus any ``*_us`` timing, lower is better)."""
    return sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)


def higher_is_better(metric: str) -> bool:
    """The metric's direction; ValueError listing the known metrics for an unknown one."""
    if metric in HIGHER_IS_BETTER:
        return True
    if metric in LOWER_IS_BETTER or metric.endswith("_us"):
        return False
    raise ValueError(f"unknown metric {metric!r} (no known direction); known: {', '.join(known_metrics())}, "
                     "or any *_us timing")


@dataclass(frozen=True)
class CompareSpec:
    """Fail when ``metric`` gets worse by more than ``tolerance_pct`` (percent of the old value, or
    percentage points for :data:`ABSOLUTE_METRICS`)."""

    metric: str
    tolerance_pct: float

    def __str__(self) -> str:
        return f"{self.metric}:{self.tolerance_pct:g}%"


def parse_compare_spec(text: str) -> CompareSpec:
    """``METRIC:TOL`` or ``METRIC:TOL%`` (TOL >= 0, in percent); METRIC ``*`` or ``all`` gives metric
    ``"*"`` (see :func:`expand_specs`). ValueError naming the bad text."""
    metric, sep, tol = text.strip().partition(":")
    metric, tol = metric.strip(), tol.strip().removesuffix("%").strip()
    if not sep or not metric or not tol:
        raise ValueError(f"bad compare spec {text!r}: expected METRIC:TOL% such as 'h2o_lossy:2%'")
    try:
        tolerance = float(tol)
    except ValueError:
        raise ValueError(f"bad compare spec {text!r}: tolerance {tol!r} is not a number") from None
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"bad compare spec {text!r}: tolerance must be a finite number >= 0")
    if metric.lower() in ("*", "all"):
        return CompareSpec("*", tolerance)
    try:
        higher_is_better(metric)
    except ValueError as exc:
        raise ValueError(f"bad compare spec {text!r}: {exc}") from None
    return CompareSpec(metric, tolerance)


def expand_specs(specs: Iterable[CompareSpec]) -> list[CompareSpec]:
    """``*`` replaced by :data:`ALL_METRICS`; one spec per metric, a later one winning (so
    ``*:5%,decode_tps:10%`` loosens speed only)."""
    out: dict[str, CompareSpec] = {}
    for spec in specs:
        metrics = ALL_METRICS if spec.metric == "*" else (spec.metric,)
        out.update((m, CompareSpec(m, spec.tolerance_pct)) for m in metrics)
    return list(out.values())


def parse_compare_specs(texts: Iterable[str]) -> list[CompareSpec]:
    """Several specs (each text may hold comma-separated ones), expanded by :func:`expand_specs`."""
    return expand_specs(parse_compare_spec(part) for text in texts for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class Comparison:
    """One metric of one configuration, previous run against current.

    ``basis`` is the metric actually compared (``decode_vs_baseline`` for ``decode_tps`` when both runs
    have a same-run baseline); ``change`` is in ``unit``: ``"%"`` of the old value, or ``"pp"``
    (percentage points) for difference metrics. ``regression``: worse by more than ``tolerance``.
    """

    config: str
    metric: str
    basis: str
    old: float | None
    new: float | None
    change: float | None
    unit: str
    tolerance: float
    higher_is_better: bool
    regression: bool
    note: str = ""

    @property
    def missing(self) -> bool:
        """A side without the value (or without the configuration)."""
        return self.old is None or self.new is None


def _change(old: float, new: float, absolute: bool) -> float:
    """``new - old`` in percentage points, or relative to ``|old|`` in percent (±inf from 0)."""
    if absolute:
        return (new - old) * 100.0
    if old == 0:
        return 0.0 if new == old else math.copysign(math.inf, new - old)
    return (new - old) / abs(old) * 100.0


def _speed_basis(prev: Mapping[str, float], cur: Mapping[str, float]) -> tuple[str, str]:
    """Which metric ``decode_tps`` is compared as, and a note when it cannot be the baseline ratio."""
    lacking = [side for side, m in (("previous", prev), ("current", cur)) if "decode_vs_baseline" not in m]
    if not lacking:
        return "decode_vs_baseline", "speed as a ratio of each run's own same-run baseline"
    return "decode_tps", (f"no same-run baseline in the {' and '.join(lacking)} run: raw tok/s compared, "
                          "machine speed not factored out")


def _compare_metric(config: str, spec: CompareSpec, prev: Mapping[str, float], cur: Mapping[str, float],
                    strict_missing: bool) -> Comparison:
    basis, note = (_speed_basis(prev, cur) if spec.metric == "decode_tps" else (spec.metric, ""))
    higher = higher_is_better(basis)
    absolute = basis in ABSOLUTE_METRICS
    unit = "pp" if absolute else "%"
    old, new = prev.get(basis), cur.get(basis)
    if old is None or new is None:
        side = " and ".join(s for s, v in (("previous", old), ("current", new)) if v is None)
        return Comparison(config, spec.metric, basis, old, new, None, unit, spec.tolerance_pct, higher,
                          strict_missing and new is None, f"{basis} missing in the {side} run")
    change = _change(old, new, absolute)
    worse = -change if higher else change
    return Comparison(config, spec.metric, basis, old, new, change, unit, spec.tolerance_pct, higher,
                      worse > spec.tolerance_pct + _EPS, note)


def compare(current: Mapping[str, Any], previous: Mapping[str, Any], specs: Iterable[CompareSpec],
            strict_missing: bool = False) -> list[Comparison]:
    """Each spec on each configuration present in both runs, in the current run's order; then one
    entry (metric ``*``) per configuration present on one side only. Missing values are never a
    regression unless ``strict_missing`` (then a value or configuration gone from ``current`` is)."""
    cur_configs, prev_configs = current.get("configs", {}), previous.get("configs", {})
    specs = expand_specs(specs)
    out: list[Comparison] = []
    for name, config in cur_configs.items():
        if name in prev_configs:
            out += [_compare_metric(name, spec, prev_configs[name]["metrics"], config["metrics"], strict_missing)
                    for spec in specs]
    for name in prev_configs:
        if name not in cur_configs:
            out.append(Comparison(name, "*", "*", None, None, None, "", 0.0, True, strict_missing,
                                  "configuration missing in the current run"))
    for name in cur_configs:
        if name not in prev_configs:
            out.append(Comparison(name, "*", "*", None, None, None, "", 0.0, True, False,
                                  "new configuration: not in the previous run"))
    return out


def regressions(comparisons: Iterable[Comparison]) -> list[Comparison]:
    """The comparisons that regressed."""
    return [c for c in comparisons if c.regression]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_change(c: Comparison) -> str:
    if c.change is None:
        return "-"
    return f"{c.change:+.2f}{' pp' if c.unit == 'pp' else '%'}"


def render_comparison(comparisons: Sequence[Comparison], title: str | None = None) -> str:
    """A markdown table of the comparisons (``title`` as a heading above it)."""
    lines = [f"## {title}", ""] if title else []
    if not comparisons:
        return "\n".join(lines + ["No comparisons (no configuration in both runs, or no metric asked).", ""])
    lines += ["| config | metric | compared | previous | current | change | tolerance | result | note |",
              "|---|---|---|---:|---:|---:|---:|:---:|---|"]
    for c in comparisons:
        result = "REGRESSION" if c.regression else "missing" if c.missing else "ok"
        tolerance = "-" if c.metric == "*" else f"{c.tolerance:g}{' pp' if c.unit == 'pp' else '%'}"
        direction = "" if c.metric == "*" else (" (higher better)" if c.higher_is_better else " (lower better)")
        lines.append(f"| {c.config} | {c.metric} | {c.basis}{direction} | {_fmt(c.old)} | {_fmt(c.new)} | "
                     f"{_fmt_change(c)} | {tolerance} | {result} | {c.note} |")
    bad = regressions(comparisons)
    lines += ["", f"{len(bad)} regression(s) beyond tolerance." if bad else "No regression beyond tolerance.", ""]
    return "\n".join(lines)
