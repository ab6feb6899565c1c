"""Gate runs across commits: a store of one JSON record per run, and comparisons between runs.

A *record* (:func:`make_record`) is a gate report reduced to what is worth keeping over time: the
git commit, the machine, the preset, the workload (what was measured: runtime, model, text, threads,
sizes), whether the run is ``complete`` (no fatal error, every configuration measured), the verdicts
and every configuration's numeric metrics plus its per-round ``decode_log_ratios``.
:func:`append` writes it into the store (default ``.h2o/history/``) as
``<UTC yyyymmddTHHMMSSffffff>-<commit[:10]>.json``, atomically and never over another run;
:func:`load` reads the store back in time order, skipping unreadable files with a warning.

:func:`resolve` finds the stored run to compare with (``latest``, a commit or a file): only a complete
record of the current schema, of the same preset and of a :func:`comparable` workload is a target.
:func:`compare` checks a run against it under ``METRIC:TOL%`` specs (:func:`parse_compare_specs`):

- a ratio or a speed regresses when it is worse by more than TOL percent of the old value, in the
  metric's own direction (:data:`HIGHER_IS_BETTER`, :data:`LOWER_IS_BETTER`, any ``*_us``: lower);
- a value missing on either side, or a configuration gone from the current run, is a regression
  (a new configuration is reported, not failed);
- ``decode_tps`` (and ``decode_vs_baseline``) is compared through each run's per-round log ratios
  to its same-run baseline: the Hodges-Lehmann shift with its exact Mann-Whitney interval
  (:func:`h2o_gates.speed_stats.two_sample`); a regression only when the whole interval is worse than
  TOL, *undecided* when it straddles TOL. Without those ratios on both sides the point
  ``decode_vs_baseline`` is compared (raw tok/s without a same-run baseline), and the note says so;
- metrics that are differences already (``h2o_fidelity_ppl_delta``, ``decode_drop``; they sit near 0
  and may be negative) are compared by absolute difference in percentage points: ``ppl:1%`` allows
  the perplexity delta to grow by 0.01;
- ``*`` or ``all`` as METRIC stands for :data:`ALL_METRICS` (compression ratios, speed, fidelity; not
  counters such as queue peaks, which go from 0 to 1 as an infinite relative change).

Schema 1 records (older pytest-h2o) stay readable for trends but are never compared with: their
``total_ratio`` (h2o_lossy x a lossless ratio) and speed statistics meant something else.
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
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .rules import format_number
from .speed_stats import one_sample, two_sample

SCHEMA_VERSION = 2
OLD_SCHEMA = ("recorded by an older pytest-h2o: total_ratio and the speed statistics were defined differently")
LOG_RATIOS = "decode_log_ratios"  # per measured round: log(candidate tok/s / adjacent baseline tok/s)
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
# (total_ratio: the whole-cache ratio, full fp16 bytes over bytes held after eviction and lossless compression)
ALL_METRICS: tuple[str, ...] = ("h2o_lossy", "lossless_online", "lossless_scope", "total_ratio", "decode_tps",
                                "h2o_fidelity_top1", "h2o_fidelity_ppl_delta")
# compared through the per-round log ratios when both runs have them
SPEED_METRICS: frozenset[str] = frozenset({"decode_tps", "decode_vs_baseline"})
_EPS = 1e-9


class HistoryError(Exception):
    """A history lookup that found no run to compare with (the message names the store, the request,
    why the run found is not a target, and the comparable runs there are)."""


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


def _finite_list(value: Any) -> list[float] | None:
    """A non-empty list of finite numbers as floats, else None (one bad element voids the list)."""
    if not isinstance(value, (list, tuple)) or not value:
        return None
    numbers = [_number(v) for v in value]
    return None if any(n is None for n in numbers) else numbers  # type: ignore[return-value]


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The finite numbers of a metric row, ``decode_log_ratios`` (a list of finite floats, else dropped)
    and ``decode_vs_baseline``: the report's, else decode_tps / baseline_decode_tps. Dicts, strings and
    NaN are dropped."""
    out: dict[str, Any] = {key: num for key, value in metrics.items() if (num := _number(value)) is not None}
    logs = _finite_list(metrics.get(LOG_RATIOS))
    if logs is not None:
        out[LOG_RATIOS] = logs
    decode, base = out.get("decode_tps"), out.get("baseline_decode_tps")
    if "decode_vs_baseline" not in out and decode is not None and base is not None and base > 0:
        out["decode_vs_baseline"] = decode / base
    return out


def _record_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration's verdict, numbers and ``error`` (why it was not measured; None when it was)."""
    metrics = config.get("metrics", {})
    error = metrics.get("error")
    verdicts = {rule: {"passed": bool(v.get("passed")), "enabled": bool(v.get("enabled")),
                       "value": _number(v.get("value"))}
                for rule, v in config.get("verdicts", {}).items()}
    return {"passed": bool(config.get("passed")), "error": str(error) if error else None,
            "metrics": _numeric_metrics(metrics), "verdicts": verdicts}


def make_record(report: Mapping[str, Any], root: Path | None = None) -> dict[str, Any]:
    """A history record of a gate report; git is asked in ``root`` (default: the working directory).
    A report's own ``commit`` key is used when git cannot tell.

    ``workload`` is the report's (None when it has none); ``nodes`` (a cluster run's workers: machine,
    configurations, baselines, see :mod:`pytest_h2o.cluster`) is kept when the report has them; ``complete`` is
    False when the report has ``fatal`` or a configuration was not measured (``metrics["error"]``): such a run is
    never compared with.
    """
    git = git_info(root)
    if git["commit"] == UNKNOWN and isinstance(report.get("commit"), str) and report["commit"]:
        git["commit"] = report["commit"]
    structured = {"mode", "thresholds", "configs", "overall", "joint", "independent", "workload", "nodes"}
    meta = {key: value for key, value in report.items()
            if key not in structured and (value is None or isinstance(value, (str, int, float, bool)))}
    overall = report.get("overall", {})
    configs = {c["name"]: _record_config(c) for c in report.get("configs", [])}
    workload = report.get("workload")
    return {
        "schema": SCHEMA_VERSION,
        "timestamp": _now().isoformat(timespec="microseconds"),
        "git": git,
        "machine": machine_info(),
        "preset": report.get("preset"),
        "mode": report.get("mode"),
        "complete": not report.get("fatal") and bool(configs) and all(c["error"] is None for c in configs.values()),
        "workload": json.loads(json.dumps(workload)) if isinstance(workload, Mapping) else None,
        "thresholds": dict(report.get("thresholds", {})),
        "meta": meta,
        "overall": {"passed": bool(overall.get("passed")), "passing": list(overall.get("passing", [])),
                    "reason": overall.get("reason", "")},
        "configs": configs,
        **({"nodes": json.loads(json.dumps(report["nodes"]))} if report.get("cluster") and report.get("nodes") else {}),
    }


def measured_anything(record: Mapping[str, Any]) -> bool:
    """Whether the run measured something: no fatal error and at least one configuration measured."""
    if record.get("meta", {}).get("fatal"):
        return False
    return any(not c.get("error") for c in record.get("configs", {}).values())


def incomplete_reason(record: Mapping[str, Any]) -> str | None:
    """Why the run is not complete, or None (schema 1 records do not say and count as complete)."""
    if record.get("complete", True):
        return None
    fatal = record.get("meta", {}).get("fatal")
    if fatal:
        return f"the measurement failed as a whole ({fatal})"
    failed = [name for name, c in record.get("configs", {}).items() if c.get("error")]
    return f"not measured: {', '.join(failed)}" if failed else "no configuration measured"


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
    tmp = store / f".{stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp"  # not mkstemp: its files are private (0600)
    try:
        with open(tmp, "x", encoding="utf-8") as out:
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


def _when(record: Mapping[str, Any]) -> str:
    """The record's time, ``YYYY-MM-DD HH:MM:SS UTC``."""
    return record_time(record).strftime("%Y-%m-%d %H:%M:%S UTC")


def _run_label(record: Mapping[str, Any]) -> str:
    """``<commit[:10]> (<time>)``: a stored run in messages."""
    return f"{short_commit(record)} ({_when(record)})"


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _differs(field_name: str, current: Any, stored: Any) -> str:
    return f"{field_name} differs: {_show(current)} in this run, {_show(stored)} in the stored run"


def comparable(current: Mapping[str, Any], stored: Mapping[str, Any]) -> str | None:
    """Why two workloads (the report's ``workload``: runtime, model, text, text_sha256, threads,
    kv_dumps, decode_baseline, cluster, sizes, configs) measured different things, naming the field and both
    values (``current``'s first); None when they are alike. The text is compared by ``text_sha256``
    when both have one; sizes (``[prompt, gen]`` tokens) and configs (a sha256 of each configuration's
    ``kv_*`` keys) only for the configurations both have."""
    for key in ("runtime", "model"):
        if current.get(key) != stored.get(key):
            return _differs(key, current.get(key), stored.get(key))
    text_key = "text_sha256" if current.get("text_sha256") and stored.get("text_sha256") else "text"
    if current.get(text_key) != stored.get(text_key):
        return _differs(text_key, current.get(text_key), stored.get(text_key))
    for key in ("threads", "kv_dumps", "decode_baseline", "cluster"):
        if current.get(key) != stored.get(key):
            return _differs(key, current.get(key), stored.get(key))
    cur_sizes, old_sizes = current.get("sizes") or {}, stored.get("sizes") or {}
    for label, size in cur_sizes.items():
        if label in old_sizes and list(size) != list(old_sizes[label]):
            return _differs(f"[prompt, gen] tokens of {label}", list(size), list(old_sizes[label]))
    cur_configs, old_configs = current.get("configs") or {}, stored.get("configs") or {}
    for label, digest in cur_configs.items():
        if label in old_configs and digest != old_configs[label]:
            return f"the kv_* config of {label} differs (sha256 {digest} in this run, {old_configs[label]} stored)"
    return None


def target_problem(record: Mapping[str, Any], preset: str | None,
                   workload: Mapping[str, Any] | None) -> str | None:
    """Why ``record`` cannot be compared with a run of ``preset`` measuring ``workload``, or None.
    A target is a complete record of the current schema, of that preset, not slowed on purpose
    (``--h2o-inject-slowdown``), whose workload is :func:`comparable`; ``preset`` None matches any preset
    and ``workload`` None (not known) any workload."""
    schema = record.get("schema", 0)
    if schema < SCHEMA_VERSION:
        return f"schema {schema}, {OLD_SCHEMA}"
    incomplete = incomplete_reason(record)
    if incomplete:
        return f"an incomplete run: {incomplete}"
    if not preset_matches(record, preset):
        return _differs("preset", preset, record.get("preset"))
    injected = record.get("meta", {}).get("inject_slowdown")
    if injected:
        return f"a sensitivity check (--h2o-inject-slowdown {injected:g}): its speed was slowed on purpose"
    stored = record.get("workload")
    if not isinstance(stored, Mapping):
        return "it does not say what it measured (no workload)"
    return None if workload is None else comparable(workload, stored)


def _available(targets: Sequence[Mapping[str, Any]], store: Path | None) -> str:
    """The newest comparable runs (one per commit, up to 10), for a message."""
    if store is None:
        return "the history store is off"
    newest: dict[str, str] = {}
    for record in reversed(targets):
        newest.setdefault(short_commit(record), _when(record))
    if not newest:
        return f"{store} holds no run comparable with this one"
    shown = [f"{commit} ({when})" for commit, when in list(newest.items())[:10]]
    more = f" and {len(newest) - 10} more" if len(newest) > 10 else ""
    return f"comparable runs in {store}, newest first: {', '.join(shown)}{more}"


def _resolve_path(path: Path, store: Path | None, preset: str | None,
                  workload: Mapping[str, Any] | None) -> dict[str, Any]:
    """The record file ``path`` if it is a comparable target; HistoryError saying why not."""
    def available() -> str:
        return _available(_targets(load(store), preset, workload) if store is not None else [], store)

    if not path.is_file():
        raise HistoryError(f"no history record file {path}; {available()}")
    try:
        record = read_record(path)
    except HistoryError as exc:
        raise HistoryError(f"{exc}; {available()}") from None
    problem = target_problem(record, preset, workload)
    if problem:
        raise HistoryError(f"{path} ({_run_label(record)}) is not comparable with this run: {problem}; {available()}")
    return record


def _targets(records: Iterable[Mapping[str, Any]], preset: str | None,
             workload: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return [dict(r) for r in records if target_problem(r, preset, workload) is None]


def resolve(store: Path | None, ref: str = "latest", preset: str | None = None,
            workload: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The stored run ``ref`` names, if it can be compared with a run of ``preset`` measuring
    ``workload`` (see :func:`target_problem`; None: not checked): ``latest`` (the newest such run), a
    commit sha prefix (its newest such run) or a record file's path. ``store`` None (off) allows a path only.

    Raises HistoryError naming the store and the request: for ``latest``, that no run of the preset is
    stored, or why the newest is not comparable; for a commit or path, why it is not a target, with the
    comparable runs there are."""
    ref = (ref or "latest").strip()
    if ref.endswith(".json") or Path(ref).is_file():
        return _resolve_path(Path(ref), store, preset, workload)
    pool = load(store) if store is not None else []
    of_preset = [r for r in pool if preset_matches(r, preset)]
    targets = _targets(of_preset, preset, workload)
    scope = f" of preset {preset!r}" if preset else ""
    if ref == "latest":
        if targets:
            return targets[-1]
        if not of_preset:
            presets = sorted({str(r.get("preset")) for r in pool})
            held = f"{len(pool)} runs of presets {', '.join(presets)}" if pool else "no runs"
            raise HistoryError(f"no stored run{scope} in {store} to compare with (it holds {held}); "
                               "this run is stored for the next one")
        newest = of_preset[-1]
        raise HistoryError(f"no comparable stored run{scope} in {store}: the newest, {_run_label(newest)}, is not "
                           f"comparable with this run: {target_problem(newest, preset, workload)}")
    if not re.fullmatch(r"[0-9a-fA-F]{4,40}", ref):
        raise HistoryError(f"{ref!r} is not 'latest', a commit sha prefix (4-40 hex digits) or a record file "
                           f"(*.json); {_available(targets, store)}")
    matches = [r for r in of_preset if str(r.get("git", {}).get("commit", "")).lower().startswith(ref.lower())]
    commits = sorted({r["git"]["commit"] for r in matches})
    if len(commits) > 1:
        raise HistoryError(f"commit prefix {ref!r} is ambiguous in {store}: {', '.join(c[:12] for c in commits)}")
    if not matches:
        raise HistoryError(f"no stored run of commit {ref!r}{scope} in {store}; {_available(targets, store)}")
    usable = _targets(matches, preset, workload)
    if not usable:
        newest = matches[-1]
        raise HistoryError(f"the stored run of commit {ref!r}, {_run_label(newest)}, is not comparable with this run: "
                           f"{target_problem(newest, preset, workload)}; {_available(targets, store)}")
    return usable[-1]


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
    (percentage points) for difference metrics. ``regression``: worse by more than ``tolerance``, or a
    value (or configuration) missing on a side. Speed compared by statistics has ``interval`` (the
    change's interval, in %), its ``coverage`` (0-1) and ``undecided`` (the interval straddles the tolerance).
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
    interval: tuple[float, float] | None = None
    coverage: float | None = None
    undecided: bool = False

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


def _lacking(previous: bool, current: bool) -> str:
    """``"previous"``, ``"current"``, ``"previous and current"`` (the sides where a thing is False) or ``""``."""
    return " and ".join(side for side, has in (("previous", previous), ("current", current)) if not has)


def _speed_point_basis(metric: str, prev: Mapping[str, Any], cur: Mapping[str, Any]) -> tuple[str, str]:
    """What a speed metric is compared as without per-round log ratios on both sides, and a note saying so."""
    no_logs = _lacking(_finite_list(prev.get(LOG_RATIOS)) is not None, _finite_list(cur.get(LOG_RATIOS)) is not None)
    point = f"no per-round {LOG_RATIOS} in the {no_logs} run: point values compared, no interval"
    no_base = _lacking("decode_vs_baseline" in prev, "decode_vs_baseline" in cur)
    if metric == "decode_vs_baseline" or not no_base:
        return "decode_vs_baseline", f"speed as a ratio of each run's own same-run baseline; {point}"
    return "decode_tps", (f"no same-run baseline in the {no_base} run: raw tok/s compared, "
                          "machine speed not factored out")


def _speed_ratio(metrics: Mapping[str, Any], logs: Sequence[float]) -> float:
    """The run's decode_vs_baseline, else exp of the Hodges-Lehmann estimate of its log ratios."""
    ratio = _number(metrics.get("decode_vs_baseline"))
    return ratio if ratio is not None else math.exp(one_sample(logs).estimate)


def _pct(value: float) -> str:
    return format_number("{:+.2f}", value) + "%"


def _compare_speed(config: str, spec: CompareSpec, prev: Mapping[str, Any], cur: Mapping[str, Any],
                   old_logs: Sequence[float], new_logs: Sequence[float]) -> Comparison:
    """Decode speed by the Hodges-Lehmann shift of the per-round log ratios (new - old) and its exact
    interval, as percent changes ``exp(x) - 1``: a regression only when the whole interval is worse
    than the tolerance, undecided when it straddles it; with one round on a side there is no interval
    (coverage 0) and a change beyond the tolerance is undecided too: one number never decides."""
    shift = two_sample(new_logs, old_logs)
    change, lo, hi = ((math.exp(x) - 1.0) * 100.0 for x in (shift.estimate, shift.lo, shift.hi))
    limit = -spec.tolerance_pct - _EPS
    regression = hi < limit and shift.coverage > 0
    undecided = lo < limit and not regression
    interval = (f"interval [{_pct(lo)}, {_pct(hi)}] (coverage {shift.coverage * 100:.3g}%)" if shift.coverage
                else "one round on a side: no interval")
    note = (f"{'undecided: ' if undecided else ''}{interval}; Hodges-Lehmann shift of {len(new_logs)} vs "
            f"{len(old_logs)} per-round log ratios to the same-run baseline")
    return Comparison(config, spec.metric, "decode_vs_baseline", _speed_ratio(prev, old_logs),
                      _speed_ratio(cur, new_logs), change, "%", spec.tolerance_pct, True, regression, note,
                      (lo, hi), shift.coverage, undecided)


def _missing_note(basis: str, sides: Sequence[tuple[str, float | None, Mapping[str, Any]]]) -> str:
    """``<basis> missing in the <side> run``, with why a side's configuration was not measured."""
    lacking = [(side, config.get("error")) for side, value, config in sides if value is None]
    errors = "".join(f"; {side} run: not measured: {error}" for side, error in lacking if error)
    return f"{basis} missing in the {' and '.join(side for side, _ in lacking)} run{errors}"


def _compare_metric(config: str, spec: CompareSpec, prev_config: Mapping[str, Any],
                    cur_config: Mapping[str, Any]) -> Comparison:
    prev, cur = prev_config.get("metrics", {}), cur_config.get("metrics", {})
    basis, note = spec.metric, ""
    if spec.metric in SPEED_METRICS:
        old_logs, new_logs = _finite_list(prev.get(LOG_RATIOS)), _finite_list(cur.get(LOG_RATIOS))
        if old_logs is not None and new_logs is not None:
            return _compare_speed(config, spec, prev, cur, old_logs, new_logs)
        basis, note = _speed_point_basis(spec.metric, prev, cur)
    higher = higher_is_better(basis)
    absolute = basis in ABSOLUTE_METRICS
    unit = "pp" if absolute else "%"
    old, new = _number(prev.get(basis)), _number(cur.get(basis))
    if old is None or new is None:
        return Comparison(config, spec.metric, basis, old, new, None, unit, spec.tolerance_pct, higher, True,
                          _missing_note(basis, [("previous", old, prev_config), ("current", new, cur_config)]))
    change = _change(old, new, absolute)
    worse = -change if higher else change
    return Comparison(config, spec.metric, basis, old, new, change, unit, spec.tolerance_pct, higher,
                      worse > spec.tolerance_pct + _EPS, note)


def _pair_problem(current: Mapping[str, Any], previous: Mapping[str, Any]) -> str | None:
    """Why the two runs cannot be compared (see :func:`target_problem`), or None."""
    workload = current.get("workload")
    if not isinstance(workload, Mapping):
        return "this run does not say what it measured (no workload)"
    return target_problem(previous, current.get("preset"), workload)


def compare(current: Mapping[str, Any], previous: Mapping[str, Any], specs: Iterable[CompareSpec]) -> list[Comparison]:
    """Each spec on each configuration present in both records, in the current run's order; then one
    entry (metric ``*``) per configuration present on one side only: gone from the current run is a
    regression, new in it is reported only. A value missing on either side is a regression.

    Runs that are not comparable (:func:`target_problem`: schema, completeness, preset, workload) give
    a single regression (configuration and metric ``*``) saying why."""
    problem = _pair_problem(current, previous)
    if problem:
        return [Comparison("*", "*", "*", None, None, None, "", 0.0, True, True,
                           f"not comparable with the previous run: {problem}")]
    cur_configs, prev_configs = current.get("configs", {}), previous.get("configs", {})
    specs = expand_specs(specs)
    out: list[Comparison] = []
    for name, config in cur_configs.items():
        if name in prev_configs:
            out += [_compare_metric(name, spec, prev_configs[name], config) for spec in specs]
    for name in prev_configs:
        if name not in cur_configs:
            out.append(Comparison(name, "*", "*", None, None, None, "", 0.0, True, True,
                                  "configuration missing in the current run"))
    for name in cur_configs:
        if name not in prev_configs:
            out.append(Comparison(name, "*", "*", None, None, None, "", 0.0, True, False,
                                  "new configuration: not in the previous run (reported, not compared)"))
    return out


def regressions(comparisons: Iterable[Comparison]) -> list[Comparison]:
    """The comparisons that regressed."""
    return [c for c in comparisons if c.regression]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _fmt_change(c: Comparison) -> str:
    if c.change is None:
        return "-"
    if c.interval is not None:
        return f"{_pct(c.change)} [{_pct(c.interval[0])}, {_pct(c.interval[1])}]"
    return format_number("{:+.2f}", c.change) + (" pp" if c.unit == "pp" else "%")


def _result(c: Comparison) -> str:
    if c.regression:
        return "REGRESSION"
    return "undecided" if c.undecided else "new" if c.missing else "ok"


def render_comparison(comparisons: Sequence[Comparison], title: str | None = None) -> str:
    """A markdown table of the comparisons (``title`` as a heading above it); a speed change compared
    by statistics shows its interval beside it."""
    lines = [f"## {title}", ""] if title else []
    if not comparisons:
        return "\n".join(lines + ["No comparisons (no configuration in both runs, or no metric asked).", ""])
    lines += ["| config | metric | compared | previous | current | change | tolerance | result | note |",
              "|---|---|---|---:|---:|---:|---:|:---:|---|"]
    for c in comparisons:
        tolerance = "-" if c.metric == "*" else f"{c.tolerance:g}{' pp' if c.unit == 'pp' else '%'}"
        direction = "" if c.metric == "*" else (" (higher better)" if c.higher_is_better else " (lower better)")
        lines.append(f"| {c.config} | {c.metric} | {c.basis}{direction} | {_fmt(c.old)} | {_fmt(c.new)} | "
                     f"{_fmt_change(c)} | {tolerance} | {_result(c)} | {c.note} |")
    bad = regressions(comparisons)
    summary = f"{len(bad)} regression(s) beyond tolerance." if bad else "No regression beyond tolerance."
    undecided = sum(c.undecided for c in comparisons)
    if undecided:
        summary += f" {undecided} undecided: the speed interval straddles the tolerance (more rounds would decide)."
    return "\n".join(lines + ["", summary, ""])
