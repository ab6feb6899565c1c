"""Trends over stored gate runs (:mod:`h2o_gates.history` records): a markdown table and a PNG plot.

The table has one row per run and reads every metric from one *representative* configuration of
that run, so a row never mixes configurations (the flaw of a per-metric best of): the first
configuration that passes every rule, else the one that passes the most enabled rules (ties: the
preset's order), unless a configuration is named. The plot shows every configuration, one line each.
Runs that did not measure every configuration read ``incomplete`` in the pass column; a footnote says
which rows hold a ``total_ratio`` of schema 1 (h2o_lossy x a lossless ratio, not the whole-cache ratio).
"""

from __future__ import annotations

from itertools import cycle
from pathlib import Path
from typing import Any, Mapping, Sequence

from .history import SCHEMA_VERSION, preset_matches, record_time, short_commit

DEFAULT_TREND_METRICS: tuple[str, ...] = ("h2o_lossy", "lossless_online", "total_ratio", "decode_vs_baseline")


def representative_config(record: Mapping[str, Any], config: str | None = None) -> str | None:
    """The configuration a trend row reads: ``config`` if the run has it, else the first passing one,
    else the one passing the most enabled rules; None for a run without configurations (or without ``config``)."""
    configs = record.get("configs", {})
    if config is not None:
        return config if config in configs else None
    passing = [name for name, c in configs.items() if c.get("passed")]
    if passing:
        return passing[0]

    def score(name: str) -> int:
        return sum(1 for v in configs[name].get("verdicts", {}).values() if v.get("enabled") and v.get("passed"))

    return max(configs, key=score, default=None)  # max keeps the first of equal scores


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _commit_label(record: Mapping[str, Any]) -> str:
    return short_commit(record) + ("+" if record.get("git", {}).get("dirty") else "")


def _run_label(record: Mapping[str, Any]) -> str:
    """A run's x label: its short commit, or its time when it was not run in a git checkout."""
    if record.get("git", {}).get("commit"):
        return _commit_label(record)[:8]
    return record_time(record).strftime("%m-%d %H:%M")


def _verdict(record: Mapping[str, Any]) -> str:
    """``incomplete`` (a configuration or the whole run not measured), else ``yes``/``no``."""
    if record.get("complete", True) is False:
        return "incomplete"
    return "yes" if record.get("overall", {}).get("passed") else "no"


def _old_total_ratio_note(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[str]:
    """A footnote naming the rows whose ``total_ratio`` has the schema-1 meaning, if any is shown."""
    old = [str(i) for i, r in enumerate(rows, 1) if r.get("schema", SCHEMA_VERSION) < SCHEMA_VERSION]
    if "total_ratio" not in metrics or not old:
        return []
    return ["", f"total_ratio of run(s) {', '.join(old)} (schema 1, older pytest-h2o) is h2o_lossy x a lossless "
                "ratio, not the whole-cache ratio of later runs."]


def trend_table(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], preset: str | None = None,
                config: str | None = None) -> str:
    """Markdown: one row per run (oldest first) with time, commit (``+``: uncommitted changes), overall
    verdict (``incomplete``: not everything measured), the representative configuration and its value
    of each metric (``-`` when absent); then a footnote for schema-1 ``total_ratio`` values."""
    rows = [r for r in records if preset_matches(r, preset)]
    header = ["#", "time (UTC)", "commit", "preset", "pass", "config", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|---:|---|---|---|:---:|---|" + "---:|" * len(metrics)]
    for index, record in enumerate(rows, 1):
        name = representative_config(record, config)
        values = record.get("configs", {}).get(name, {}).get("metrics", {}) if name else {}
        cells = [str(index), record_time(record).strftime("%Y-%m-%d %H:%M:%S"), _commit_label(record),
                 str(record.get("preset") or "-"), _verdict(record), name or "-",
                 *(_fmt(values.get(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + _old_total_ratio_note(rows, metrics)) + "\n"


def _series(records: Sequence[Mapping[str, Any]], metric: str) -> dict[str, list[tuple[int, float]]]:
    """``{config: [(run index, value), ...]}`` for one metric."""
    out: dict[str, list[tuple[int, float]]] = {}
    for index, record in enumerate(records):
        for name, c in record.get("configs", {}).items():
            value = c.get("metrics", {}).get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(name, []).append((index, float(value)))
    return out


def trend_figure(records: Sequence[Mapping[str, Any]], metrics: Sequence[str], preset: str | None = None) -> Any:
    """One subplot per metric, x = run order labelled by short commit (red: the run failed the gate),
    one line per configuration, titled with ``preset`` (else "all presets"); None when no run has any
    of the metrics."""
    rows = [r for r in records if preset_matches(r, preset)]
    series = {m: _series(rows, m) for m in metrics}
    shown = [m for m in metrics if series[m]]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import MARKERS, wrap_title

    width = max(6.0, 0.6 * len(rows) + 3)
    fig, axes = plt.subplots(len(shown), 1, sharex=True, squeeze=False, layout="constrained",
                             figsize=(width, 2.6 * len(shown) + 1.2), dpi=110)
    for ax, metric in zip(axes[:, 0], shown):
        for (name, points), marker in zip(series[metric].items(), cycle(MARKERS)):
            ax.plot([x for x, _ in points], [y for _, y in points], marker=marker, markersize=4, label=name)
        ax.set_ylabel(metric, fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)  # a 0.0002 change must not read as a big gap
        ax.grid(alpha=0.3)
    bottom = axes[-1, 0]
    bottom.set_xticks(range(len(rows)))
    bottom.set_xticklabels([_run_label(r) for r in rows], rotation=45, ha="right", fontsize=7)
    for label, record in zip(bottom.get_xticklabels(), rows):
        if not record.get("overall", {}).get("passed"):
            label.set_color("tab:red")
    bottom.set_xlabel("run (commit, or time outside git; red: gate failed)")
    names = {name: handle for ax in axes[:, 0] for handle, name in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(names.values()), list(names), loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    fig.suptitle(wrap_title(f"{preset or 'all presets'}: trend over {len(rows)} runs", width), fontsize=10)
    return fig


def plot_trend(records: Sequence[Mapping[str, Any]], path: Path, metrics: Sequence[str],
               preset: str | None = None) -> Path | None:
    """Save :func:`trend_figure` as PNG to ``path``; None (nothing written) when no run has any of the metrics."""
    from .plots import save_figure

    fig = trend_figure(records, metrics, preset)
    return None if fig is None else save_figure(fig, path)
