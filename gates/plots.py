"""PNG plots of a gate report (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_ratio_vs_speed(report: Mapping[str, Any], path: Path) -> Path | None:
    """Whole-cache ratio against decode tok/s, one point per configuration, with the decode interval
    from paired rounds as an error bar (baseline x (1 - drop interval)); the decode baseline and the
    allowed drop as guides. None when no configuration has both numbers."""
    points = [(c["name"], c["metrics"], c["passed"]) for c in report["configs"]]
    points = [p for p in points if _is_num(p[1].get("decode_tps")) and _is_num(p[1].get("total_ratio"))]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for i, (name, m, ok) in enumerate(points):
        x, y = m["decode_tps"], m["total_ratio"]
        color = "tab:green" if ok else "tab:red"
        base = report["thresholds"].get("decode_baseline") or m.get("baseline_decode_tps")  # what the drop is against
        if _is_num(m.get("decode_drop_lo")) and _is_num(base):
            x = base * (1 - m["decode_drop"])
            xerr = [[x - base * (1 - m["decode_drop_hi"])], [base * (1 - m["decode_drop_lo"]) - x]]
            ax.errorbar([x], [y], xerr=xerr, fmt="o", color=color, capsize=4, zorder=3)
        else:
            ax.scatter([x], [y], color=color, zorder=3)
        mark = " (undecided)" if m.get("decode_state") == "undecided" else ""
        ax.annotate(name + mark, (x, y), textcoords="offset points", xytext=(5, 12 - 11 * (i % 4)), fontsize=8)
    ax.margins(x=0.05)
    ax.set_ylim(1.0, max(m["total_ratio"] for _, m, _ in points) * 1.15)  # from "no compression" up
    baselines = {c["metrics"].get("baseline_decode_tps") for c in report["configs"]} - {None}
    fixed = report["thresholds"].get("decode_baseline")
    for base in sorted(baselines | ({fixed} if fixed else set())):
        ax.axvline(base, color="grey", linestyle="--", linewidth=1)
        drop = report["thresholds"]["decode_drop_target"]
        ax.axvspan(base * (1 - drop), base, color="grey", alpha=0.1)
    return _finish(fig, ax, path, f"{report.get('preset', 'gate')}\ncompression vs decode speed "
                   "(green: passes every rule)", "decode tok/s (point: baseline x (1 - paired drop); bar: interval)\n"
                   "dashed: same-run baseline, band: allowed drop",
                   "whole-cache ratio (full fp16 / held after H2O + lossless)")


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_per_layer(report: Mapping[str, Any], path: Path) -> Path | None:
    """Online-sim lossless ratio per layer, one line per configuration; None without per-layer data."""
    series = [(c["name"], c["metrics"].get("per_layer_lossless")) for c in report["configs"]]
    series = [(name, data) for name, data in series if isinstance(data, dict) and data]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for name, data in series:
        layers = sorted(data, key=int)
        ax.plot([int(layer) for layer in layers], [data[layer] for layer in layers], marker=".", label=name)
    return _finish(fig, ax, path, f"{report.get('preset', 'gate')}: lossless ratio per layer", "layer",
                   "lossless ratio (online-sim, held KV)", ("lossless target", report["thresholds"]["lossless_target"]))


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str,
            target: tuple[str, float] | None = None) -> Path:
    """Target line (when it is on this axis), labels, legend and grid; save to ``path`` and free the figure."""
    if target is not None:
        ax.axhline(target[1], color="grey", linestyle=":", linewidth=1, label=f"{target[0]} {target[1]:g}")
        ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
