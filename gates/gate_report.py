"""A gate run's report: verdicts per configuration and overall, as a plain dict, markdown and files.

:func:`build_report` applies the rules to metric rows; :func:`write_reports` writes ``summary.md``
(the original's sections and its ``- overall_pass: true|false`` line, plus a per-configuration
table), ``summary.json``, ``h2o_metrics.csv``, ``cases.jsonl`` and the PNG plots.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Mapping

from .fidelity_report import suite_markdown, what_heavy_hitters_buy
from .rules import (
    RULES,
    GateMode,
    Thresholds,
    Verdict,
    check_row,
    config_passes,
    format_number,
    original_differences,
    overall_independent,
    overall_joint,
)

SUMMARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (metric, header, format)
    ("h2o_lossy", "lossy", "{:.3f}"),
    ("lossless_online", "lossless online", "{:.4f}"),
    ("lossless_scope", "lossless scope", "{:.4f}"),
    ("total_ratio", "whole cache", "{:.3f}"),
    ("baseline_decode_tps", "baseline tok/s", "{:.2f}"),
    ("decode_tps", "decode tok/s", "{:.2f}"),
    ("decode_drop", "drop [interval]", "{:+.3f}"),
    ("h2o_lossless_decomp_us", "decomp us", "{:.0f}"),
    ("h2o_lossless_queue_peak", "queue peak", "{:.3g}"),
    ("h2o_lossless_fallback", "fallback", "{:.0f}"),
    ("h2o_fidelity_top1", "top1", "{:.3f}"),
    ("h2o_fidelity_ppl_delta", "ppl delta", "{:+.3f}"),
)


# Why a rule that is off was not checked; a report's ``input_notes`` ({rule: text}) name the caller's options instead.
UNCHECKED_REASONS: dict[str, str] = {
    "decode_pass": "no decode baseline", "runtime_decomp_pass": "runtime decompression not required",
    "runtime_queue_peak_pass": "no limit set", "runtime_fallback_pass": "no limit set", "fidelity_pass": "no limit set"}
# The input each rule reads; a checked rule without it says so.
RULE_INPUTS: dict[str, str] = {
    "lossy_pass": "h2o_lossy", "lossless_online_pass": "lossless_online", "decode_pass": "decode_tps",
    "runtime_decomp_pass": "h2o_lossless_decomp_us", "runtime_queue_peak_pass": "h2o_lossless_queue_peak",
    "runtime_fallback_pass": "h2o_lossless_fallback"}
LOSSLESS_SOURCES: dict[str, str] = {"upper_bound": "the offline upper bound, not the online-sim",
                                    "runtime": "the runtime's h2o_lossless, not the offline online-sim"}


def build_report(rows: Mapping[str, Mapping[str, Any]], thresholds: Thresholds, mode: GateMode = "joint",
                 baselines: Mapping[str, float | None] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """Apply every rule to each configuration's metric row and decide ``overall_pass`` in ``mode``.

    ``baselines`` maps a configuration to its same-run decode baseline (tok/s); ``thresholds.decode_baseline``
    overrides it. Both verdicts are kept: ``overall`` in the chosen mode, ``joint`` and ``independent``.
    """
    baselines = dict(baselines or {})
    configs = []
    verdicts = {}
    for name, row in rows.items():
        rules = check_row(row, thresholds, baselines.get(name), name)
        verdicts[name] = rules
        metrics = {**row, **_decode_metrics(rules["decode_pass"])}
        if baselines.get(name) is not None:
            metrics["baseline_decode_tps"] = baselines[name]
        configs.append({"name": name, "passed": config_passes(rules), "metrics": metrics,
                        "verdicts": {rule: v.as_dict() for rule, v in rules.items()}})
    joint = overall_joint(verdicts)
    independent, best = overall_independent(rows, thresholds, baselines)
    chosen = joint if mode == "joint" else independent
    return {
        **dict(meta or {}),
        "mode": mode,
        "thresholds": thresholds.as_dict(),
        "configs": configs,
        "overall": {"passed": chosen.passed, "mode": chosen.mode, "passing": chosen.passing, "reason": chosen.reason},
        "joint": {"passed": joint.passed, "passing": joint.passing, "reason": joint.reason},
        "independent": {"passed": independent.passed, "reason": independent.reason,
                        "verdicts": {rule: v.as_dict() for rule, v in best.items()},
                        "differs": original_differences(rows, thresholds, baselines)},
    }


def _decode_metrics(v: Verdict) -> dict[str, Any]:
    """The decode verdict's numbers as metrics: ``decode_drop`` and, from paired rounds, its interval,
    ``decode_vs_baseline`` (``1 - drop``) with its interval, coverage, rounds and state."""
    if v.value is None:
        return {}
    out: dict[str, Any] = {"decode_drop": v.value, "decode_vs_baseline": 1.0 - v.value, "decode_state": v.state}
    if v.rounds is not None:
        out["decode_rounds"] = v.rounds
    if v.interval is not None:
        lo, hi = v.interval
        out.update(decode_drop_lo=lo, decode_drop_hi=hi, decode_vs_baseline_lo=1.0 - hi,
                   decode_vs_baseline_hi=1.0 - lo, decode_coverage=v.coverage)
    return out


def format_cell(metrics: Mapping[str, Any], key: str, fmt: str) -> str:
    """One table cell; a decode speed measured in rounds gets their range, the drop its interval and
    an ``undecided`` mark."""
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    text = format_number(fmt, value)
    rounds = metrics.get("decode_tps_rounds")
    if key == "decode_tps" and isinstance(rounds, list) and len(rounds) > 1:
        text += f" ({min(rounds):.1f}-{max(rounds):.1f})"
    if key == "decode_drop" and isinstance(metrics.get("decode_drop_lo"), (int, float)):
        lo, hi = (format_number("{:+.3f}", metrics[key]) for key in ("decode_drop_lo", "decode_drop_hi"))
        text += f" [{lo}, {hi}]"
    if key == "decode_drop" and metrics.get("decode_state") == "undecided":
        text += " undecided"
    return text


def render_markdown(report: Mapping[str, Any], original: Mapping[str, Any] | None = None) -> str:
    """``summary.md``: inputs, targets, best rows, the gate lines (``- overall_pass: ...``) and a
    per-configuration table; with ``original`` (see :func:`quality_gate_lines`) the original's
    ``## Quality Gate`` section first."""
    t = report["thresholds"]
    lines = ["# H2O v4 Quality Gate Summary", ""]
    if original is not None:
        lines += quality_gate_lines(report, original)
    meta = [f"- {key.replace('_', ' ').capitalize()}: `{report[key]}`"
            for key in ("preset", "runtime", "device", "model", "commit", "out_dir", "started")
            if report.get(key) not in (None, "")]
    profiles = list(dict.fromkeys(c["metrics"]["codec_profile"] for c in report["configs"]
                                  if c["metrics"].get("codec_profile")))
    if profiles:
        meta.append(f"- Codec profile: `{', '.join(profiles)}`")
    lines += [*meta, ""] if meta else []
    lines += ["## Targets", "",
              f"- lossy_target: {t['lossy_target']}", f"- lossless_target: {t['lossless_target']}",
              f"- decode_drop_target: {t['decode_drop_target']}", f"- decode_baseline: {_decode_baseline(report)}",
              f"- require_runtime_decomp: {str(t['require_runtime_decomp']).lower()}",
              f"- max_lossless_queue_peak: {_limit(t['max_queue_peak'])}",
              f"- max_lossless_fallback: {_limit(t['max_fallback'])}",
              f"- min_top1: {_limit(t['min_top1'])}", f"- max_ppl_delta: {_limit(t['max_ppl_delta'])}",
              f"- decode_undecided_counts_as: {t['undecided']}", ""]
    if report.get("rounds") and report.get("runtime") not in (None, "logs"):
        lines[-1:] = [f"- rounds: {report['rounds']} to {report['max_rounds']} (paired with adjacent baseline runs; "
                      f"the drop is the Hodges-Lehmann estimate with its exact interval: {t['confidence']:.0%} where "
                      "the rounds allow it, else the full range, its real coverage shown beside each drop)", ""]
    if report.get("inject_slowdown"):
        lines[-1:] = [f"- inject_slowdown: {report['inject_slowdown']:g} (a sensitivity check: every candidate decode "
                      "step was slowed on purpose)", ""]
    independent = report["independent"]["verdicts"]
    differs = report["independent"].get("differs") or []
    lines += [f"## Best Rows ({'per-metric best of, the original rule' if differs else 'original per-metric best of'})",
              ""]
    if differs:
        lines += [f"Not exactly the original's verdict: {'; '.join(differs)}.", ""]
    first = report["configs"][0]["metrics"] if report["configs"] else {}
    for rule in RULES:
        if rule in independent:
            lines.append(f"- {rule_line(report, rule, independent[rule], first)} - {independent[rule]['reason']}")
    lines += ["", "## Gate", ""]
    chosen = report["overall"]
    passing = {c["name"] for c in report["configs"] if c["passed"]}
    rules, metrics, shown = independent, first, "each rule on its own best row"
    if report["mode"] == "joint" and report["configs"]:
        best = min(report["configs"], key=lambda c: sum(v["enabled"] and not v["passed"]
                                                         for v in c["verdicts"].values()))
        rules, metrics, shown = best["verdicts"], best["metrics"], f"configuration {best['name']}"
    for rule in RULES:
        if rule in rules:
            lines.append(f"- {rule_line(report, rule, rules[rule], metrics)}")
    lines.append(f"- overall_pass: {_bool(chosen['passed'])}")
    lines += ["", f"Rule lines: {shown}. Mode `{report['mode']}`: {chosen['reason']}."]
    if report.get("strict"):
        lines.append(f"Strict mode: every configuration must pass every rule "
                     f"({len(passing)}/{len(report['configs'])} do).")
    if report["mode"] == "joint":
        lines.append(f"Passing configurations: {', '.join(chosen['passing']) or 'none'}.")
        lines.append(f"{independent_label(report)} says overall_pass: {_bool(report['independent']['passed'])}.")
    else:
        lines.append(f"Joint verdict (one configuration passing every rule): {_bool(report['joint']['passed'])}"
                     f" ({', '.join(report['joint']['passing']) or 'none'}).")
    lines += ["", "## Configurations", "", _table(report["configs"], passing), ""]
    if report.get("cluster") and report.get("nodes"):
        lines += ["## Nodes", "", f"Measured on `{report['cluster']}`: each worker ran its configurations with its "
                  "own baseline runs; every decode drop is against the baseline of the worker that measured it.", "",
                  *(f"- {line}" for line in node_lines(report["nodes"])), ""]
    lines += fidelity_section(report["configs"])
    if report.get("warnings"):
        lines += ["## Warnings", "", *(f"- {w}" for w in report["warnings"]), ""]
    failures = [f"- {c['name']}::{rule}: {v['reason']}" for c in report["configs"]
                for rule, v in c["verdicts"].items() if v["enabled"] and not v["passed"]]
    if failures:
        lines += ["## Failing Rules", "", *failures, ""]
    return "\n".join(lines)


def fidelity_section(configs: list[dict[str, Any]]) -> list[str]:
    """``## Fidelity suite``: per configuration, the per-text table with its spread, the gated mean and the
    sink+recent twin; nothing when the suite did not run."""
    lines: list[str] = []
    for c in configs:
        suite = c["metrics"].get("fidelity_suite")
        if suite:
            buy = what_heavy_hitters_buy(suite)
            lines += [f"### {c['name']}", "", *suite_markdown(suite), "", *([buy, ""] if buy else [])]
    return ["## Fidelity suite", "", *lines] if lines else []


def independent_label(report: Mapping[str, Any]) -> str:
    """Who the per-metric best of speaks for: the original's analyze, when it computes exactly that."""
    if report["independent"].get("differs"):
        return "The per-metric best of (the original rule, not exactly its verdict)"
    return "The original's analyze (per-metric best of)"


# analyze_h2o_v4.py's names of the lossless sources (``lossless_selected_source``).
ORIGINAL_SOURCES: dict[str, str] = {"online_sim": "offline_online_sim", "upper_bound": "offline_upper_bound",
                                    "runtime": "runtime"}


def quality_gate_lines(report: Mapping[str, Any], original: Mapping[str, Any]) -> list[str]:
    """The original's ``## Quality Gate`` section (analyze_h2o_v4.py, same keys, order and number formats),
    its values the per-metric best of; ``quality_status`` and ``overall_pass`` are the report's own verdict.

    ``original``: ``lossless_source`` (ours: online_sim, upper_bound, runtime), ``decode_best`` (the fastest
    row's decode tok/s) and, per offline JSON read, ``upper`` / ``online``: ``{"path", "selected_entries",
    "selected_layers"}``."""
    t, best, passed = report["thresholds"], report["independent"]["verdicts"], report["overall"]["passed"]

    def value(rule: str) -> float:
        return best[rule]["value"] or 0.0

    lossless = best["lossless_online_pass"]
    lines = ["## Quality Gate", "", f"- quality_status: {'PASS' if passed else 'FAIL'}",
             f"- lossy_target: {t['lossy_target']:.4f}", f"- lossy_best: {value('lossy_pass'):.4f}",
             f"- lossy_pass: {_bool(best['lossy_pass']['passed'])}", f"- lossless_target: {t['lossless_target']:.4f}",
             f"- lossless_selected_source: {ORIGINAL_SOURCES[original['lossless_source']]}",
             f"- lossless_selected_value: {value('lossless_online_pass'):.4f}",
             f"- lossless_selected_pass: {_bool(lossless['passed'])}",
             f"- lossless_online_value: {value('lossless_online_pass'):.4f}",
             f"- lossless_online_pass: {_bool(lossless['passed'])}",
             f"- runtime_decomp_required: {_bool(t['require_runtime_decomp'])}",
             f"- runtime_decomp_best_us: {value('runtime_decomp_pass'):.4f}",
             f"- runtime_queue_peak_best: {value('runtime_queue_peak_pass'):.4f}",
             f"- runtime_fallback_best: {value('runtime_fallback_pass'):.4f}"]
    for name, key, limit in (("queue_peak", "runtime_queue_peak_pass", t["max_queue_peak"]),
                             ("fallback", "runtime_fallback_pass", t["max_fallback"])):
        lines.append(f"- runtime_{name}_gate_enabled: {_bool(limit >= 0)}")
        lines += [f"- runtime_{name}_target: {limit:.4f}"] if limit >= 0 else []
        lines.append(f"- runtime_{name}_pass: {_bool(best[key]['passed'])}")
    lines += [f"- runtime_decomp_pass: {_bool(best['runtime_decomp_pass']['passed'])}",
              f"- overall_pass: {_bool(passed)}"]
    if t["decode_baseline"] is not None:
        baseline, decode_best = t["decode_baseline"], original["decode_best"]
        lines += [f"- decode_baseline: {baseline:.4f}", f"- decode_best: {decode_best:.4f}",
                  f"- decode_drop_ratio: {(baseline - decode_best) / baseline:.6f}",
                  f"- decode_drop_target: {t['decode_drop_target']:.6f}",
                  f"- decode_pass: {_bool(best['decode_pass']['passed'])}"]
    for key in ("upper", "online"):
        if original.get(key):
            json_in = original[key]
            lines += [f"- {key}_selected_entries: {json_in['selected_entries']}",
                      f"- {key}_selected_layers: {json_in['selected_layers']}", f"- {key}_json: `{json_in['path']}`"]
    if report["mode"] == "joint":
        lines += ["", f"quality_status and overall_pass are the joint verdict (one configuration passing every rule); "
                      f"the other keys are the per-metric best of, whose overall_pass is "
                      f"{_bool(report['independent']['passed'])} (`--gate-mode independent` gates on it)."]
    return lines + [""]


def rule_note(report: Mapping[str, Any], rule: str, verdict: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """Why a rule's verdict is not a plain one on its own measured input: ``not checked (why)`` for a
    rule that is off, the substitute input a checked rule read, its missing input, an undecided
    speed; ``""`` otherwise. ``report["input_notes"]`` overrides the generic texts."""
    notes = report.get("input_notes") or {}
    if not verdict["enabled"]:
        return f"not checked ({notes.get(rule) or UNCHECKED_REASONS.get(rule, 'off')})"
    source = metrics.get("lossless_online_source", "online_sim")
    if rule == "lossless_online_pass" and source != "online_sim":
        return notes.get(rule) or f"lossless_online from {LOSSLESS_SOURCES.get(source, source)}"
    if verdict["value"] is None and rule in RULE_INPUTS:
        return f"no {RULE_INPUTS[rule]} in the input"
    if verdict.get("state") == "undecided":
        return f"undecided, counted as {'pass' if verdict['passed'] else 'fail'}"
    return ""


def rule_line(report: Mapping[str, Any], rule: str, verdict: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """``rule: true|false`` with :func:`rule_note` in brackets, or ``rule: not checked (why)``."""
    note = rule_note(report, rule, verdict, metrics)
    if not verdict["enabled"]:
        return f"{rule}: {note}"
    return f"{rule}: {_bool(verdict['passed'])}" + (f" ({note})" if note else "")


def node_lines(nodes: list[Mapping[str, Any]]) -> list[str]:
    """One line per worker of a cluster run: where (node, ip, CPU, system, Python), which configurations, its
    baselines (median decode tok/s of its own baseline runs, per prompt/gen size), and a retry or failure."""
    lines = []
    for n in nodes:
        m = n["machine_info"]
        base = ", ".join(f"{size} {tps:.2f} tok/s" for size, tps in n.get("baselines", {}).items()) or "none"
        line = (f"worker {n['worker']} on node {m['node']} ({n['ip']}; {m['cpu']['brand']}, {m['cpu']['count']} CPUs, "
                f"{m['system']} {m['release']}, {m['python_implementation']} {m['python_version']}): "
                f"{', '.join(n['configs'])}; baseline {base}")
        lines.append(line + "".join(f"; {n[key]}" for key in ("note", "error") if n.get(key)))
    return lines


def _decode_baseline(report: Mapping[str, Any]) -> str:
    """The fixed baseline, ``same-run`` when the decode rule ran against one, else ``none``."""
    fixed = report["thresholds"]["decode_baseline"]
    if fixed is not None:
        return f"{fixed}"
    checked = any(c["verdicts"].get("decode_pass", {}).get("enabled") for c in report["configs"])
    return "same-run" if checked else "none (decode_pass not checked)"


def _table(configs: list[dict[str, Any]], passing: set[str]) -> str:
    header = ["config", *(h for _, h, _ in SUMMARY_COLUMNS), "pass"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * len(SUMMARY_COLUMNS) + ":---:|"]
    for c in configs:
        m = c["metrics"]
        cells = [c["name"]] + [format_cell(m, key, fmt) for key, _, fmt in SUMMARY_COLUMNS]
        failed = [rule for rule, v in c["verdicts"].items() if v["enabled"] and not v["passed"]]
        cells.append("yes" if c["name"] in passing else "no: " + ", ".join(failed))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _limit(value: float | None) -> str:
    return "off" if value is None or value < 0 else f"{value:g}"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def write_reports(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write ``summary.md``, ``summary.json``, ``h2o_metrics.csv``, ``cases.jsonl`` and the plots
    into ``out_dir``; return the paths written."""
    from .plots import plot_per_layer, plot_ratio_vs_speed

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "summary.md", out_dir / "summary.json", out_dir / "h2o_metrics.csv", out_dir / "cases.jsonl"]
    written[0].write_text(render_markdown(report), encoding="utf-8")
    written[1].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    _write_metrics_csv(report, written[2])
    with open(written[3], "w", encoding="utf-8") as handle:
        for c in report["configs"]:
            for rule, v in c["verdicts"].items():
                handle.write(json.dumps({"config": c["name"], "case": f"{c['name']}::{rule}", **v}) + "\n")
        handle.write(json.dumps({"config": None, "case": "overall_pass", "rule": "overall_pass",
                                 **report["overall"]}) + "\n")
    for plot in (plot_ratio_vs_speed(report, out_dir / "ratio_vs_decode.png"),
                 plot_per_layer(report, out_dir / "per_layer_lossless.png")):
        if plot is not None:
            written.append(plot)
    return written


def _write_metrics_csv(report: Mapping[str, Any], path: Path) -> None:
    columns: list[str] = ["config", "passed"]
    for c in report["configs"]:
        columns.extend(k for k, v in c["metrics"].items() if k not in columns and not isinstance(v, (dict, list)))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for c in report["configs"]:
            writer.writerow({"config": c["name"], "passed": c["passed"], **c["metrics"]})
