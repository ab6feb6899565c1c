"""The fidelity suite's table (one row per text, then the spread and the mean), as markdown or aligned
text; shared by ``h2o-gate fidelity``, the plugin's terminal summary and ``summary.md``.

A suite is ``{"texts": [{"name", "tokens": [P, G], "full": {"ppl"}, "h2o": {"top1", "ppl_delta", "kl",
"held"}, "sink_recent": {...}}], "aggregate": {method: {metric: {"mean", "min", "median", "max"}}}}``.
"""

from __future__ import annotations

from typing import Any, Mapping

from .rules import format_number

# (method, metric, header, format)
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("full", "ppl", "full-cache ppl", "{:.3f}"),
    ("h2o", "held", "held", "{:.2f}x"),
    ("h2o", "top1", "top1", "{:.3f}"),
    ("h2o", "ppl_delta", "ppl delta", "{:+.2%}"),
    ("h2o", "kl", "KL", "{:.4f}"),
    ("sink_recent", "held", "sink+recent held", "{:.2f}x"),
    ("sink_recent", "top1", "sink+recent top1", "{:.3f}"),
    ("sink_recent", "ppl_delta", "sink+recent ppl delta", "{:+.2%}"),
    ("sink_recent", "kl", "sink+recent KL", "{:.4f}"),
)
STATS = ("min", "median", "max", "mean")


def suite_rows(suite: Mapping[str, Any], gated: bool = True) -> list[list[str]]:
    """Header, one row per text, then min, median, max and mean (labelled as the gated aggregate when
    ``gated``: a gate reads it); sink+recent columns only when the suite measured them."""
    columns = [c for c in COLUMNS if c[0] in suite["aggregate"]]
    rows = [["text", "tokens", *(header for _, _, header, _ in columns)]]
    for text in suite["texts"]:
        rows.append([text["name"], "+".join(map(str, text["tokens"])),
                     *(_cell(text.get(method, {}).get(metric), fmt) for method, metric, _, fmt in columns)])
    for stat in STATS:
        label = "mean (gated)" if stat == "mean" and gated else stat
        rows.append([label, "", *(_cell(suite["aggregate"][method][metric][stat], fmt)
                                  for method, metric, _, fmt in columns)])
    return rows


def suite_markdown(suite: Mapping[str, Any]) -> list[str]:
    """The table as markdown lines."""
    rows = suite_rows(suite)
    return ["| " + " | ".join(rows[0]) + " |", "|---|---:|" + "---:|" * (len(rows[0]) - 2),
            *("| " + " | ".join(row) + " |" for row in rows[1:])]


def suite_text_lines(suite: Mapping[str, Any], gated: bool = True) -> list[str]:
    """The table as aligned terminal lines."""
    rows = suite_rows(suite, gated)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            .rstrip() for row in rows]


def what_heavy_hitters_buy(suite: Mapping[str, Any]) -> str | None:
    """One line comparing the means of H2O and sink+recent, or None without a sink+recent run."""
    agg = suite["aggregate"]
    if "sink_recent" not in agg:
        return None
    h2o, sr = agg["h2o"], agg["sink_recent"]
    return (f"heavy hitters vs sink+recent (means): top1 {h2o['top1']['mean']:.3f} vs {sr['top1']['mean']:.3f}, "
            f"ppl delta {h2o['ppl_delta']['mean']:+.2%} vs {sr['ppl_delta']['mean']:+.2%}, held "
            f"{h2o['held']['mean']:.2f}x vs {sr['held']['mean']:.2f}x")


def _cell(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return format_number(fmt, value)
