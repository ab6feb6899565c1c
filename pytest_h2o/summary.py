"""What the plugin shows of a gate report: the terminal table and the junit properties."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from h2o_gates.fidelity_report import suite_text_lines, what_heavy_hitters_buy
from h2o_gates.gate_report import SUMMARY_COLUMNS, format_cell, independent_label, node_lines

# per-configuration metrics written as junit properties (besides every rule's verdict and value)
JUNIT_METRICS = ("h2o_lossy", "h2o_lossy_model", "lossless_online", "lossless_scope", "total_ratio", "decode_tps",
                 "baseline_decode_tps", "decode_drop", "decode_drop_lo", "decode_drop_hi", "decode_coverage",
                 "decode_rounds", "h2o_lossless", "h2o_lossless_decomp_us", "h2o_lossless_queue_peak",
                 "h2o_lossless_fallback", "h2o_fidelity_top1", "h2o_fidelity_ppl_delta", "h2o_fidelity_kl",
                 "h2o_fidelity_texts", "sink_recent_fidelity_top1", "sink_recent_fidelity_ppl_delta",
                 "sink_recent_fidelity_kl", "sink_recent_h2o_lossy")


# limits that are off when negative (the original's convention)
NEGATIVE_IS_OFF = ("max_queue_peak", "max_fallback")


def junit_properties(report: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Run-level numbers, then ``<config>.<metric>`` and ``<config>::<rule>`` entries, as
    ``<testsuite>`` properties (valid under the default xunit2 family, where ``<testcase>``
    properties are not)."""
    yield "h2o_preset", str(report.get("preset"))
    yield "h2o_runtime", str(report.get("runtime"))
    if report.get("device"):
        yield "h2o_device", str(report["device"])
    yield "h2o_model", str(report.get("model"))
    yield "h2o_gate_mode", str(report["mode"])
    yield "h2o_overall_pass", _b(report["overall"]["passed"])
    yield "h2o_passing_configs", ",".join(report["overall"]["passing"])
    for key, value in report["thresholds"].items():
        off = key in NEGATIVE_IS_OFF and isinstance(value, (int, float)) and value < 0
        yield f"h2o_threshold.{key}", "off" if off else threshold_text(value)
    for i, warning in enumerate(report.get("warnings", []), start=1):
        yield f"h2o_warning.{i}", warning
    if report.get("cluster"):
        yield "h2o_cluster", str(report["cluster"])
        for i, line in enumerate(node_lines(report.get("nodes") or []), start=1):
            yield f"h2o_node.{i}", line
    for c in report["configs"]:
        m = c["metrics"]
        for key in JUNIT_METRICS:
            if isinstance(m.get(key), (int, float)):
                yield f"{c['name']}.{key}", f"{m[key]:.6g}"
        if m.get("measured_by"):
            yield f"{c['name']}.measured_by", str(m["measured_by"])
        yield from _suite_properties(c["name"], m.get("fidelity_suite"))
        for rule, v in c["verdicts"].items():
            yield f"{c['name']}::{rule}", verdict_text(v)


def _suite_properties(config: str, suite: Mapping[str, Any] | None) -> Iterator[tuple[str, str]]:
    """``<config>.fidelity.<text>.<method>.<metric>`` per text and ``<config>.fidelity.<stat>.<method>.<metric>``
    for the spread (min, median, max) and the mean."""
    if not suite:
        return
    for text in suite["texts"]:
        for method in ("h2o", "sink_recent"):
            for metric, value in text.get(method, {}).items():
                yield f"{config}.fidelity.{text['name']}.{method}.{metric}", f"{value:.6g}"
    for method, metrics in suite["aggregate"].items():
        for metric, stats in metrics.items():
            for stat, value in stats.items():
                yield f"{config}.fidelity.{stat}.{method}.{metric}", f"{value:.6g}"


def threshold_text(value: Any) -> str:
    """A threshold as CI shows it: ``off`` for an unset limit, ``true``/``false``, numbers with ``:g``."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return _b(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def verdict_text(v: Mapping[str, Any]) -> str:
    """``pass|fail|off|undecided(counted as pass|fail)``, then ``value=`` and, from paired rounds,
    ``interval=[lo,hi]`` with its coverage."""
    state = v["state"]
    if state == "undecided":
        state = f"undecided(counted as {'pass' if v['passed'] else 'fail'})"
    value = "" if v["value"] is None else f" value={v['value']:.6g}"
    interval = ("" if not v.get("interval") else
                f" interval=[{v['interval'][0]:.6g},{v['interval'][1]:.6g}] coverage={v['coverage']:.4g}")
    return f"{state}{value}{interval}"


def terminal_lines(report: Mapping[str, Any], comparison: str | None = None) -> list[str]:
    """The end-of-run table: one row per configuration, then the verdict."""
    header = ["config", *(h for _, h, _ in SUMMARY_COLUMNS), "verdict"]
    rows = [header]
    for c in report["configs"]:
        m = c["metrics"]
        failed = [rule.removesuffix("_pass") for rule, v in c["verdicts"].items() if v["enabled"] and not v["passed"]]
        verdict = "PASS" if c["passed"] else "fail: " + ",".join(failed)
        if c["verdicts"]["decode_pass"]["state"] == "undecided":
            verdict += f" (decode undecided, counted as {'pass' if c['verdicts']['decode_pass']['passed'] else 'fail'})"
        rows.append([c["name"], *(format_cell(m, key, fmt) for key, _, fmt in SUMMARY_COLUMNS), verdict])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i in (0, len(header) - 1) else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    overall = report["overall"]
    lines.append(f"overall_pass: {_b(overall['passed'])} ({overall['mode']}: {overall['reason']})")
    if report["mode"] == "joint":
        lines.append(f"{independent_label(report).lower()}: overall_pass {_b(report['independent']['passed'])}")
    if report.get("inject_slowdown"):
        lines.append(f"inject_slowdown {report['inject_slowdown']:g}: a sensitivity check, every candidate decode step "
                     "was slowed on purpose")
    if report.get("strict"):
        passing = sum(c["passed"] for c in report["configs"])
        lines.append(f"strict mode: {passing}/{len(report['configs'])} configurations pass every rule; every one must")
    lines += _suite_lines(report["configs"])
    if report.get("cluster") and report.get("nodes"):
        lines += ["", f"measured on {report['cluster']} (each drop against its own worker's baseline):",
                  *node_lines(report["nodes"])]
    if report.get("fatal"):
        lines.append(f"not measured: {report['fatal']}")
    for warning in report.get("warnings", []):
        lines.append(warning)
    if comparison:
        lines += ["", *plain_text(comparison)]
    return lines


def _suite_lines(configs: list[Mapping[str, Any]]) -> list[str]:
    """Per configuration that ran the fidelity suite: its per-text table, spread and gated mean, and what
    heavy hitters buy over sink+recent."""
    lines: list[str] = []
    for c in configs:
        suite = c["metrics"].get("fidelity_suite")
        if suite:
            buy = what_heavy_hitters_buy(suite)
            lines += ["", f"fidelity suite {c['name']} (fidelity_pass reads the mean):", *suite_text_lines(suite),
                      *([buy] if buy else [])]
    return lines


def plain_text(markdown: str) -> list[str]:
    """A markdown comparison as terminal lines: headings without ``#``, tables as aligned columns."""
    out: list[str] = []
    table: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= set("-:") for cell in cells):  # not the |---| separator
                table.append(cells)
            continue
        if table:
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
            table = []
        out.append(line.lstrip("#").strip())
    while out and not out[-1]:
        out.pop()
    return out


def _b(value: bool) -> str:
    return "true" if value else "false"
