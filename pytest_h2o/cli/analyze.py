"""h2o-gate parse-log / analyze / full-eval: the original kit's parse_h2o_v4_log.py, analyze_h2o_v4.py
and run_full_eval.sh, with their option names and defaults.

- ``parse-log``: llm_bench markdown logs to one CSV (one row per table row, ``log_file`` added); the top
  level of ``--log-dir`` unless ``--recursive``; a missing input is skipped with a ``[WARN]``, as the original.
- ``analyze``: CSV rows plus the offline lossless JSONs through the gate rules; writes summary.md (the
  original's ``## Quality Gate`` section, then ours; ``- overall_pass: true|false``); exit 0 pass, 1 fail
  (0 with ``--exit-zero`` or ``$H2O_ANALYZE_EXIT_ZERO=1``, as the original), 2 usage error.
- ``full-eval``: parse RUN_DIR/logs, run the offline upper bound and online simulation on the KV
  dumps, then analyze; everything lands in RUN_DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

from h2o_gates.gate_report import build_report, independent_label, render_markdown, rule_line
from h2o_gates.log_parse import (
    LogParseError,
    ParseProblem,
    find_logs,
    metric_row,
    parse_logs_report,
    read_csv,
    summarize_problems,
    write_csv,
)
from h2o_gates.reports import write_offline_markdown
from h2o_gates.rules import RULES, Thresholds
from h2o_kernels.codec.profiles import PROFILES
from h2o_kernels.lossless.offline_eval import ENTRY_MODES, EvalOptions, SelectionError, evaluate
from pytest_h2o.cli.out_paths import OutPathError, check_out_file

RATIO_KEY = "weighted_lossless_ratio"
UPPER_JSON = "offline_lossless_upper.json"
ONLINE_JSON = {"chunked_grouped": "offline_lossless_online_grouped.json",
               "chunked": "offline_lossless_online.json"}  # run_full_eval.sh's names by online entry mode


# --- parse-log -------------------------------------------------------------------------------------


def add_parse_log_arguments(p: argparse.ArgumentParser) -> None:
    """The parse_h2o_v4_log.py options, and ``--recursive``."""
    p.add_argument("--log-dir", type=Path,
                   help="read the *.log files of this directory (its top level, as the original)")
    p.add_argument("--log-files", default="", help="comma-separated log files (with or instead of --log-dir); "
                   "one that is not there is skipped with a [WARN], as the original")
    add_recursive_argument(p)
    p.add_argument("--out-csv", required=True, type=Path, help="where to write the CSV")
    p.set_defaults(run=run_parse_log)


def add_recursive_argument(p: argparse.ArgumentParser) -> None:
    """``--recursive``: also the *.log files of --log-dir's subfolders."""
    p.add_argument("--recursive", action="store_true",
                   help="also read the *.log files in the subfolders of the log directory")


def run_parse_log(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate parse-log``: exit 0 rows written, 2 no rows at all (or a usage error)."""
    files = [Path(part.strip()) for part in args.log_files.split(",") if part.strip()]
    if args.log_dir is None and not files:
        parser.error("give --log-dir, --log-files or both")
    try:
        check_out_file(args.out_csv, "--out-csv")
        count, _ = parse_to_csv(args.log_dir, files, args.out_csv, recursive=args.recursive)
    except OutPathError as exc:
        parser.error(str(exc))
    except OSError as exc:
        print(f"h2o-gate parse-log: {exc}", file=sys.stderr)
        return 1
    return 0 if count else 2  # no usable input: a usage error, as a missing file


def collect_logs(log_dir: Path | None, files: list[Path], recursive: bool) -> tuple[list[Path], list[str]]:
    """The logs to read and, as the original does, what is skipped: a ``--log-dir`` that is not a folder,
    a ``--log-files`` entry that is not a file; also the subfolders' logs not read without ``recursive``."""
    paths: list[Path] = []
    skipped: list[str] = []
    if log_dir is not None and not log_dir.is_dir():
        skipped.append(f"--log-dir {log_dir}: {'not a folder' if log_dir.exists() else 'no such folder'}; skipped")
    elif log_dir is not None:
        paths = find_logs(log_dir, recursive)
        below = len(find_logs(log_dir, recursive=True)) - len(paths) if not recursive else 0
        if below:
            skipped.append(f"--log-dir {log_dir}: {_count(below, '*.log file')} in subfolders not read "
                           "(--recursive reads them)")
    for path in files:
        if path.is_file():
            paths.append(path)
        else:
            skipped.append(f"--log-files {path}: {'a folder' if path.is_dir() else 'no such file'}; skipped")
    return paths, skipped


def parse_to_csv(log_dir: Path | None, files: list[Path], out_csv: Path, prefix: str = "h2o-gate parse-log",
                 stream: TextIO | None = None, recursive: bool = False) -> tuple[int, list[str]]:
    """Parse the logs of ``log_dir`` and ``files`` into ``out_csv``; return the row count (0: nothing
    written, the message on stderr names what was searched) and the report lines on what was not parsed
    or skipped (also printed on stderr, each skipped input as a ``[WARN]`` line)."""
    paths, skipped = collect_logs(log_dir, files, recursive)
    for line in skipped:
        print(f"[WARN] {prefix}: {line}", file=sys.stderr)
    unique = {path.resolve() for path in paths}
    rows, problems = parse_logs_report(paths)
    report = problem_lines(paths, rows, problems)
    if report:
        with_problems = len({p.file for p in problems})
        print(f"[WARN] {prefix}: {_count(len(problems), 'problem')} in {_count(with_problems, 'file')}:",
              file=sys.stderr)
        print("\n".join(f"  {line}" for line in report), file=sys.stderr)
    if not rows:
        print(f"{prefix}: no llm_bench table rows in {_searched(log_dir, files, len(unique), recursive)}",
              file=sys.stderr)
        return 0, skipped + report
    write_csv(rows, out_csv)
    with_rows = len({row["log_file"] for row in rows})
    print(f"[{prefix}] {len(rows)} rows from {with_rows} of {len(unique)} files -> {out_csv}",
          file=stream or sys.stdout)
    return len(rows), skipped + report


def problem_lines(paths: list[Path], rows: list[dict[str, str]], problems: list[ParseProblem]) -> list[str]:
    """What was not parsed: one line per problem kind (count, first locations), then the files that
    gave no row; empty when every file and table line was read."""
    seen = {Path(row["log_file"]).resolve() for row in rows}
    empty = []
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            empty.append(str(path))
    lines = summarize_problems(problems)
    if empty:
        more = f", and {len(empty) - 10} more" if len(empty) > 10 else ""
        lines.append(f"files without rows: {len(empty)} - {', '.join(empty[:10])}{more}")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _searched(log_dir: Path | None, files: list[Path], count: int, recursive: bool) -> str:
    where = "recursively" if recursive else "top level"
    parts = [f"--log-dir {log_dir} (*.log, {where})"] if log_dir is not None else []
    if files:
        parts.append(f"--log-files {','.join(str(f) for f in files)}")
    return f"{' and '.join(parts)}: {_count(count, 'log file')} read"


# --- analyze ---------------------------------------------------------------------------------------


EXIT_ZERO_ENV = "H2O_ANALYZE_EXIT_ZERO"
GATE_MODE_ENV = "H2O_GATE_MODE"
GATE_MODES: dict[str, str] = {"joint": "joint", "independent": "independent", "": "joint"}  # "": unset
SWITCH: dict[str, bool] = {**dict.fromkeys(("1", "true", "yes", "on"), True),
                           **dict.fromkeys(("", "0", "false", "no", "off"), False)}


@dataclass(frozen=True)
class OfflineJson:
    """An offline evaluator JSON as analyze reads it: the ratio and what the original's summary quotes."""

    path: Path
    ratio: float
    selected_entries: int
    selected_layers: Any

    def quoted(self) -> dict[str, Any]:
        """The ``<key>_selected_entries``, ``_selected_layers`` and ``_json`` values of the original's summary."""
        return {"path": str(self.path), "selected_entries": self.selected_entries,
                "selected_layers": self.selected_layers}


@dataclass(frozen=True)
class LosslessChoice:
    """Where ``lossless_online`` comes from: one offline ratio for every row, or each row's runtime mean."""

    ratio: float | None  # None: each row's own h2o_lossless
    source: str  # "online_sim" | "upper_bound" | "runtime"
    path: Path | None = None
    upper: OfflineJson | None = None
    online: OfflineJson | None = None


def add_gate_arguments(p: argparse.ArgumentParser, require_decomp: bool) -> None:
    """Targets and limits shared by ``analyze`` and ``full-eval`` (analyze_h2o_v4.py's names and defaults;
    ``require_decomp``: the default of --require-runtime-decomp, on in run_full_eval.sh, off in analyze)."""
    p.add_argument("--lossy-target", type=float, default=3.0, help="h2o_lossy must reach this")
    p.add_argument("--lossless-target", type=float, default=1.3, help="lossless_online must reach this")
    p.add_argument("--decode-baseline", type=float, default=0.0,
                   help="decode tok/s without compression (the test scripts used 6.60); <= 0: decode_pass not checked")
    p.add_argument("--decode-drop-target", type=float, default=0.05, help="largest allowed relative decode drop")
    p.add_argument("--require-runtime-decomp", action=argparse.BooleanOptionalAction, default=require_decomp,
                   help="require h2o_lossless_decomp_us > 0 (runtime decode really ran)"
                        + ("" if require_decomp else "; off unless given, as in analyze_h2o_v4.py"))
    p.add_argument("--max-lossless-queue-peak", type=float, default=-1.0,
                   help="limit on h2o_lossless_queue_peak; negative = off")
    p.add_argument("--max-lossless-fallback", type=float, default=-1.0,
                   help="limit on h2o_lossless_fallback; negative = off")
    p.add_argument("--gate-mode", choices=["joint", "independent"],
                   help=f"joint: one configuration passes every rule; independent: the original's per-metric best of "
                        f"(joint unless ${GATE_MODE_ENV} says independent)")
    p.add_argument("--exit-zero", action="store_true",
                   help=f"exit 0 whatever the verdict, as the original (or ${EXIT_ZERO_ENV}=1); usage errors still 2")


def add_analyze_arguments(p: argparse.ArgumentParser) -> None:
    """The analyze_h2o_v4.py options."""
    p.add_argument("--csv", required=True, type=Path, help="CSV written by h2o-gate parse-log")
    p.add_argument("--offline-lossless-json", type=Path, help="offline upper-bound JSON (fallback ratio)")
    p.add_argument("--offline-lossless-online-json", type=Path, help="offline online-sim JSON (the gated ratio)")
    add_gate_arguments(p, require_decomp=False)
    p.add_argument("--out", required=True, type=Path, help="where to write summary.md")
    p.add_argument("--out-json", type=Path, help="also write the report as JSON")
    p.set_defaults(run=run_analyze)


def run_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate analyze``."""
    thresholds = thresholds_from(args, parser)
    for path, option in ((args.out, "--out"), (args.out_json, "--out-json")):
        try:
            if path is not None:
                check_out_file(path, option)
        except OutPathError as exc:
            parser.error(str(exc))
    try:
        rows = read_csv(args.csv)
    except LogParseError as exc:
        parser.error(str(exc))
    if not rows:  # before the lossless fallback's [WARN]: nothing to gate is the message
        print(f"h2o-gate analyze: no rows in {args.csv}; expected the CSV of parse-log", file=sys.stderr)
        return 2
    choice = choose_lossless(args.offline_lossless_online_json, args.offline_lossless_json, parser.error)
    status = analyze(rows, choice, thresholds, args.gate_mode, args.out, args.out_json,
                     {"csv": str(args.csv), "offline_lossless_json": _str(args.offline_lossless_json),
                      "offline_lossless_online_json": _str(args.offline_lossless_online_json)})
    return verdict_status(status, args.exit_zero)


def thresholds_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Thresholds:
    """The rules' Thresholds from the gate options (decode baseline <= 0: no decode gate); also resolves
    ``args.gate_mode`` and ``args.exit_zero`` from their environment variables."""
    for name in ("lossy_target", "lossless_target", "decode_baseline", "decode_drop_target",
                 "max_lossless_queue_peak", "max_lossless_fallback"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number")
    args.gate_mode = args.gate_mode or _env_choice(GATE_MODE_ENV, GATE_MODES, parser)
    args.exit_zero = args.exit_zero or _env_choice(EXIT_ZERO_ENV, SWITCH, parser)
    return Thresholds(lossy_target=args.lossy_target, lossless_target=args.lossless_target,
                      decode_drop_target=args.decode_drop_target,
                      decode_baseline=args.decode_baseline if args.decode_baseline > 0 else None,
                      require_runtime_decomp=args.require_runtime_decomp,
                      max_queue_peak=args.max_lossless_queue_peak, max_fallback=args.max_lossless_fallback)


def _env_choice(name: str, values: dict[str, Any], parser: argparse.ArgumentParser) -> Any:
    """The value an environment variable's text maps to (unset: as empty); another text is a usage error."""
    text = os.environ.get(name, "").strip().lower()
    if text not in values:
        parser.error(f"${name}={os.environ[name]!r}: expected one of {', '.join(repr(v) for v in values if v)}")
    return values[text]


def verdict_status(status: int, exit_zero: bool) -> int:
    """analyze's exit status: 1 (gate failed) becomes 0 with --exit-zero / $H2O_ANALYZE_EXIT_ZERO, as the original."""
    if status == 1 and exit_zero:
        print(f"exit 0 although overall_pass is false (--exit-zero or ${EXIT_ZERO_ENV}=1)")
        return 0
    return status


def read_offline(path: Path | None, fail: Callable[[str], Any]) -> OfflineJson | None:
    """An offline JSON's ``weighted_lossless_ratio`` (else ``lossless_ratio``, as the original) and selection;
    None when the path is not given or absent.
    A file that exists but cannot be read, or lacks a positive ratio, calls ``fail`` (parser.error)."""
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(f"{path}: not readable JSON ({exc})")
    # analyze_h2o_v4.py reads weighted_lossless_ratio, else lossless_ratio (older JSONs)
    value = data.get(RATIO_KEY, data.get("lossless_ratio")) if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(f"{path}: expected a positive number under {RATIO_KEY!r} (or 'lossless_ratio'), got {value!r}")
    entries = data.get("selected_entries", 0)
    entries = int(entries) if isinstance(entries, (int, float)) and math.isfinite(entries) else 0
    return OfflineJson(path, float(value), entries, data.get("selected_layers", []))


def choose_lossless(online: Path | None, upper: Path | None, fail: Callable[[str], Any]) -> LosslessChoice:
    """The original's fallback chain: online-sim JSON, else upper-bound JSON, else the runtime
    ``h2o_lossless`` (each row's own in the joint gate, their mean in the best of); a ``[WARN]`` line on
    stderr for either fallback. Both JSONs are read when given, as the original."""
    online_json, upper_json = read_offline(online, fail), read_offline(upper, fail)
    if online_json is not None:
        return LosslessChoice(online_json.ratio, "online_sim", online, upper_json, online_json)
    missing = f"--offline-lossless-online-json {online} not found" if online else "no --offline-lossless-online-json"
    if upper_json is not None:
        print(f"[WARN] {missing}; lossless_online uses the upper-bound ratio {upper_json.ratio:.4f} from {upper} "
              "(an upper bound, not what the runtime's windows reach)", file=sys.stderr)
        return LosslessChoice(upper_json.ratio, "upper_bound", upper, upper_json)
    missing_upper = f"--offline-lossless-json {upper} not found" if upper else "no --offline-lossless-json"
    print(f"[WARN] {missing} and {missing_upper}; lossless_online uses the runtime h2o_lossless: each row's own "
          "in the joint gate, their mean over rows in the original's best of", file=sys.stderr)
    return LosslessChoice(None, "runtime")


def config_names(rows: list[dict[str, str]]) -> list[str]:
    """One name per row: its log file's stem (the path below the logs' common folder where stems
    collide), plus ``#i`` (1-based) when one log holds several rows."""
    files = [row.get("log_file") or "" for row in rows]
    per_file = Counter(files)
    stems = Counter(Path(f).stem for f in per_file if f)
    common = os.path.commonpath([os.path.abspath(f) for f in per_file if f]) if any(per_file) else ""
    index: Counter[str] = Counter()
    names: list[str] = []
    for i, f in enumerate(files, start=1):
        if not f:
            base = f"row{i}"
        elif stems[Path(f).stem] > 1:
            base = Path(os.path.relpath(os.path.abspath(f), common)).with_suffix("").as_posix()
        else:
            base = Path(f).stem
        index[f] += 1
        name = f"{base}#{index[f]}" if f and per_file[f] > 1 else base
        names.append(name if name not in names else f"{name}@row{i}")
    return names


def metric_rows(rows: list[dict[str, str]], choice: LosslessChoice) -> dict[str, dict[str, Any]]:
    """Each CSV row as a named metric row with ``lossless_online``, its source and ``lossy_x_lossless``
    (the original's reported "total": ``h2o_lossy`` times the selected lossless ratio, not gated; not the
    whole-cache ratio, which needs the bytes each layer held)."""
    out: dict[str, dict[str, Any]] = {}
    for name, row in zip(config_names(rows), rows):
        metrics: dict[str, Any] = dict(metric_row(row))
        lossless = choice.ratio if choice.ratio is not None else metrics.get("h2o_lossless")
        if lossless is not None:
            metrics["lossless_online"] = lossless
            if "h2o_lossy" in metrics:
                metrics["lossy_x_lossless"] = metrics["h2o_lossy"] * lossless
        metrics["lossless_online_source"] = choice.source
        if row.get("log_file"):
            metrics["log_file"] = row["log_file"]
        out[name] = metrics
    return out


def analyze(rows: list[dict[str, str]], choice: LosslessChoice, thresholds: Thresholds, mode: str,
            out_md: Path, out_json: Path | None, meta: dict[str, Any]) -> int:
    """Gate the rows, write the summaries, print the verdicts; return 0 (pass) or 1 (fail or no rows)."""
    if not rows:
        print(f"h2o-gate analyze: no rows in {meta.get('csv')}; expected the CSV of parse-log", file=sys.stderr)
        return 2
    configs = metric_rows(rows, choice)
    meta = {**meta, "lossless_online_source": choice.source, "lossless_online": choice.ratio,
            "input_notes": input_notes(choice)}
    report = build_report(configs, thresholds, mode, baselines=None, meta=meta)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(render_markdown(report, original_inputs(configs, choice)) + _inputs_section(meta),
                      encoding="utf-8")
    written = [out_md]
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        written.append(out_json)
    ratio = f"{choice.ratio:.4f}" if choice.ratio is not None else "per-row runtime h2o_lossless"
    print(f"[h2o-gate analyze] {len(configs)} configurations; lossless_online {ratio} ({choice.source})")
    _print_verdicts(report)
    print(f"wrote {' and '.join(str(p) for p in written)}")
    return 0 if report["overall"]["passed"] else 1


def original_inputs(configs: dict[str, dict[str, Any]], choice: LosslessChoice) -> dict[str, Any]:
    """What the original's ``## Quality Gate`` section quotes beyond the verdicts (see
    :func:`h2o_gates.gate_report.quality_gate_lines`): the fastest row's decode tok/s (0 when none has one,
    as the original) and the offline JSONs read."""
    out: dict[str, Any] = {"lossless_source": choice.source,
                           "decode_best": max(m.get("decode_tps", 0.0) for m in configs.values())}
    for key, json_in in (("upper", choice.upper), ("online", choice.online)):
        if json_in is not None:
            out[key] = json_in.quoted()
    return out


def input_notes(choice: LosslessChoice) -> dict[str, str]:
    """Why a rule is not checked, in analyze's option names, and where lossless_online comes from when
    not from the online-sim JSON (see :func:`h2o_gates.gate_report.rule_note`)."""
    notes = {"decode_pass": "no --decode-baseline", "runtime_decomp_pass": "--require-runtime-decomp off",
             "runtime_queue_peak_pass": "no --max-lossless-queue-peak", "runtime_fallback_pass":
             "no --max-lossless-fallback", "fidelity_pass": "llm_bench logs have no fidelity numbers"}
    if choice.source == "upper_bound":
        notes["lossless_online_pass"] = f"from the upper-bound JSON {choice.path}: no online-sim JSON"
    elif choice.source == "runtime":
        notes["lossless_online_pass"] = "from each row's runtime h2o_lossless: no offline JSON"
    return notes


def _inputs_section(meta: dict[str, Any]) -> str:
    lines = ["", "## Inputs", ""]
    lines += [f"- {key}: `{value}`" for key, value in meta.items()
              if value not in (None, "") and not isinstance(value, (dict, list))]
    return "\n".join(lines) + "\n"


def _print_verdicts(report: dict[str, Any]) -> None:
    first = report["configs"][0]
    for rule in RULES:
        v = first["verdicts"].get(rule)
        if v is not None and not v["enabled"]:
            print(rule_line(report, rule, v, first["metrics"]))
    for config in report["configs"]:
        failed = [rule for rule, v in config["verdicts"].items() if v["enabled"] and not v["passed"]]
        print(f"{config['name']}: {'pass' if config['passed'] else 'fail (' + ', '.join(failed) + ')'}")
        _print_rules(report, config["verdicts"], config["metrics"], enabled_only=True)
    print(f"{independent_label(report)}:")
    _print_rules(report, report["independent"]["verdicts"], first["metrics"], enabled_only=False)
    overall = report["overall"]
    line = f"overall_pass: {_bool(overall['passed'])} ({report['mode']}: {overall['reason']})"
    if report["mode"] == "joint":
        line += f"; original best-of: {_bool(report['independent']['passed'])}"
    else:
        line += f"; joint: {_bool(report['joint']['passed'])}"
    print(line)


def _print_rules(report: dict[str, Any], verdicts: dict[str, dict[str, Any]], metrics: dict[str, Any],
                 enabled_only: bool) -> None:
    for rule in RULES:
        v = verdicts.get(rule)
        if v is not None and (v["enabled"] or not enabled_only):
            print(f"  {rule_line(report, rule, v, metrics)} - {v['reason']}")


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


# --- full-eval -------------------------------------------------------------------------------------


def add_full_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The run_full_eval.sh arguments, as options."""
    p.add_argument("--run-dir", required=True, type=Path,
                   help="sweep output: logs/ is read; CSV, offline JSONs and summaries are written here")
    p.add_argument("--kv-dumps", required=True, type=Path, help="KV dump directory for the offline evaluation")
    # run_full_eval.sh's defaults; the runtime's windows are 192 tokens with 8 framing bytes (test_v4_runtime.sh
    # passes those, as the plugin's online-sim uses them)
    p.add_argument("--online-chunk-seq", type=int, default=128, help="online-sim tokens per chunk")
    p.add_argument("--online-framing-bytes", type=int, default=16, help="online-sim bytes charged per tensor chunk")
    p.add_argument("--adaptive-block-seq", type=int, default=64, help="tokens per predictor block (both runs)")
    p.add_argument("--entry-mode", choices=ENTRY_MODES, default="chunked_grouped", help="online-sim entry mode")
    p.add_argument("--codec", choices=PROFILES, default="fast",
                   help="codec profile of both runs: fast (byte planes, predictors, zstd) or ratio (context model, "
                        "higher ratio, tens of MB/s; K rows matched through RoPE where the dumps record rope_theta)")
    add_recursive_argument(p)
    add_gate_arguments(p, require_decomp=True)
    p.set_defaults(run=run_full_eval)


def offline_options(args: argparse.Namespace) -> tuple[EvalOptions, EvalOptions]:
    """(upper bound, online simulation): both front_n 2, stage both, zstd 3, as run_full_eval.sh."""
    common = {"stage": "both", "scope": "front_n", "front_n": 2, "zstd_level": 3,
              "adaptive_block_seq": args.adaptive_block_seq, "codec": args.codec}
    upper = EvalOptions(entry_mode="aggregate", aggregate_by_stage=True, **common)
    online = EvalOptions(entry_mode=args.entry_mode, online_chunk_seq=args.online_chunk_seq,
                         online_framing_bytes=args.online_framing_bytes, **common)
    return upper, online


def run_full_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate full-eval``: parse, offline upper bound, offline online-sim, analyze."""
    thresholds = thresholds_from(args, parser)
    upper_opts, online_opts = offline_options(args)
    try:
        upper_opts.validate()
        online_opts.validate()
    except ValueError as exc:
        parser.error(str(exc))
    run_dir, logs = args.run_dir, args.run_dir / "logs"
    for path, what in ((logs, "--run-dir's logs/"), (args.kv_dumps, "--kv-dumps")):
        if not path.is_dir():
            parser.error(f"{what} {path}: not a directory")
    csv_path = run_dir / "h2o_metrics.csv"
    _step(1, f"parse {logs} -> {csv_path}")
    try:
        count, not_parsed = parse_to_csv(logs, [], csv_path, prefix="h2o-gate full-eval", stream=sys.stderr,
                                         recursive=args.recursive)
        if not count:
            return 2
        rows = read_csv(csv_path)
    except LogParseError as exc:
        parser.error(str(exc))
    paths = {"upper": run_dir / UPPER_JSON,
             "online": run_dir / ONLINE_JSON.get(args.entry_mode, f"offline_lossless_online_{args.entry_mode}.json")}
    for step, (key, options) in enumerate((("upper", upper_opts), ("online", online_opts)), start=2):
        label = "offline upper bound" if key == "upper" else f"offline online-sim ({options.entry_mode})"
        _step(step, f"{label}: {args.kv_dumps} -> {paths[key]}")
        if not run_offline(args.kv_dumps, options, paths[key], label):
            return 1
    out_md, out_json = run_dir / "summary.md", run_dir / "summary.json"
    _step(4, f"analyze -> {out_md}")
    choice = choose_lossless(paths["online"], paths["upper"], parser.error)
    status = analyze(rows, choice, thresholds, args.gate_mode, out_md, out_json,
                     {"csv": str(csv_path), "offline_lossless_json": str(paths["upper"]),
                      "offline_lossless_online_json": str(paths["online"]), "kv_dumps": str(args.kv_dumps),
                      "warnings": [f"[WARN] {logs}: {line}" for line in not_parsed]})
    return verdict_status(status, args.exit_zero)


def run_offline(dump_dir: Path, options: EvalOptions, out_json: Path, label: str) -> bool:
    """Evaluate, check the ratio is raw/comp and every blob was verified, write the JSON; False on failure."""
    try:
        result = evaluate(dump_dir, options, progress=_Progress(label))
    except (SelectionError, ValueError) as exc:
        print(f"h2o-gate full-eval: {label}: {exc}", file=sys.stderr)
        return False
    problem = check_offline(result)
    if problem:
        print(f"h2o-gate full-eval: {label}: {problem}", file=sys.stderr)
        return False
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_offline_markdown(out_json.with_suffix(".md"), result)  # as run_full_eval.sh: a .md beside each JSON
    if result["skipped_entries"]:
        print(f"[WARN] {label}: {result['skipped_entries']} entries skipped {result['skip_reasons']}", file=sys.stderr)
    print(f"[h2o-gate full-eval] {label}: ratio {result[RATIO_KEY]:.4f} = {result['raw_bytes']} / "
          f"{result['compressed_bytes']} bytes, layers {result['selected_layers']}, "
          f"entries {result['selected_entries']}", file=sys.stderr)
    return True


def check_offline(result: dict[str, Any]) -> str | None:
    """The original's accounting check: ratio == raw/comp (and, ours, every blob decoded back)."""
    raw, comp, ratio = result["raw_bytes"], result["compressed_bytes"], result[RATIO_KEY]
    if comp <= 0 or raw <= 0:
        return f"nothing compressed (raw {raw}, compressed {comp} bytes)"
    if not math.isclose(ratio, raw / comp, rel_tol=1e-9):
        return f"{RATIO_KEY} {ratio} != raw/comp {raw}/{comp} = {raw / comp}"
    if not result.get("roundtrip_verified"):
        return "blobs were not verified by decoding them back"
    return None


def _step(number: int, text: str) -> None:
    print(f"[h2o-gate full-eval] [{number}/4] {text}", file=sys.stderr, flush=True)


class _Progress:
    """Offline progress on stderr: the last group, and a line every few seconds before it."""

    def __init__(self, label: str, every_s: float = 5.0) -> None:
        self.label = label
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, done: int, total: int, totals: dict) -> None:
        now = time.monotonic()
        if done != total and now - self.last < self.every_s:
            return
        self.last = now
        print(f"[h2o-gate full-eval] {self.label}: {done}/{total} groups, {totals['raw_bytes'] / 1e6:.1f} MB, "
              f"ratio {totals['lossless_ratio']:.4f}", file=sys.stderr, flush=True)
