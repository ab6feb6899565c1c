"""PNG plots of a gate report (matplotlib, headless Agg backend).

Each plot has a ``*_figure`` builder (a matplotlib Figure, or None without data) and a ``plot_*``
function that saves it; layouts are constrained, so titles, labels and the legend below the axes
always fit inside the image.
"""

from __future__ import annotations

import textwrap
from itertools import cycle
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
TITLE_CHARS_PER_INCH = 11  # at fontsize 10: what one title line may hold per inch of figure width


def wrap_title(text: str, width_in: float) -> str:
    """``text`` wrapped (each of its lines) to fit a figure ``width_in`` inches wide."""
    width = max(20, int(width_in * TITLE_CHARS_PER_INCH))
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in text.splitlines())


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _point(m: Mapping[str, Any], base: Any) -> tuple[float, list[list[float]] | None]:
    """Decode tok/s of a configuration and its interval as error-bar lengths ``[[left], [right]]``:
    ``base x (1 - drop)`` when the drop has an interval against a known baseline, else ``decode_tps``."""
    if not (_is_num(m.get("decode_drop_lo")) and _is_num(base)):
        return m["decode_tps"], None
    x = base * (1 - m["decode_drop"])
    return x, [[x - base * (1 - m["decode_drop_hi"])], [base * (1 - m["decode_drop_lo"]) - x]]


def ratio_vs_speed_figure(report: Mapping[str, Any]) -> Figure | None:
    """Whole-cache ratio (y, from 1.0 = no compression) against decode tok/s, one marker per configuration
    (green: passes every rule, red: not), its decode interval from paired rounds as an error bar, the
    decode baseline (dashed) and the allowed drop (band); configurations named in the legend below the axes.
    No target line: the y axis is the whole-cache ratio, which no rule gates. None without both numbers."""
    points = [(c["name"], c["metrics"], c["passed"]) for c in report["configs"]]
    points = [p for p in points if _is_num(p[1].get("decode_tps")) and _is_num(p[1].get("total_ratio"))]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5), dpi=110, layout="constrained")
    fixed = report["thresholds"].get("decode_baseline")
    for (name, m, ok), marker in zip(points, cycle(MARKERS)):
        x, xerr = _point(m, fixed or m.get("baseline_decode_tps"))
        state = ("pass" if ok else "fail") + (", speed undecided" if m.get("decode_state") == "undecided" else "")
        ax.errorbar([x], [m["total_ratio"]], xerr=xerr, fmt=marker, markersize=7, capsize=4, alpha=0.85, zorder=3,
                    color="tab:green" if ok else "tab:red", label=f"{name} ({state})")
    ax.margins(x=0.08)
    ax.set_ylim(1.0, max(m["total_ratio"] for _, m, _ in points) * 1.15)
    baselines = {c["metrics"].get("baseline_decode_tps") for c in report["configs"]} - {None}
    drop = report["thresholds"]["decode_drop_target"]
    for i, base in enumerate(sorted(baselines | ({fixed} if fixed else set()))):
        kind = "fixed" if base == fixed else "same-run"
        ax.axvline(base, color="grey", linestyle="--", linewidth=1, label=None if i else f"{kind} decode baseline")
        ax.axvspan(base * (1 - drop), base, color="grey", alpha=0.12, label=None if i else f"allowed drop ({drop:g})")
    ax.set_xlabel("decode tok/s (marker: baseline x (1 - paired drop); bar: its interval)")
    ax.set_ylabel("whole-cache ratio\n(full fp16 / held after H2O + lossless)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    guides = sum(1 for label in labels if "baseline" in label or "allowed drop" in label)
    order = list(range(guides, len(labels))) + list(range(guides))  # configurations first, then the guides
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center", ncols=2,
               fontsize=8, frameon=False)
    fig.suptitle(wrap_title(f"{report.get('preset', 'gate')}: compression vs decode speed", 7.5), fontsize=10)
    return fig


def plot_ratio_vs_speed(report: Mapping[str, Any], path: Path) -> Path | None:
    """Save :func:`ratio_vs_speed_figure` to ``path``; None (nothing written) without data."""
    fig = ratio_vs_speed_figure(report)
    return None if fig is None else save_figure(fig, path)


def per_layer_figure(report: Mapping[str, Any]) -> Figure | None:
    """Online-sim lossless ratio per layer, one line per configuration, and the lossless target (this
    axis is the gated ratio); None without per-layer data."""
    series = [(c["name"], c["metrics"].get("per_layer_lossless")) for c in report["configs"]]
    series = [(name, data) for name, data in series if isinstance(data, dict) and data]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110, layout="constrained")
    for (name, data), marker in zip(series, cycle(MARKERS)):
        layers = sorted(data, key=int)
        ax.plot([int(layer) for layer in layers], [data[layer] for layer in layers], marker=marker, markersize=4,
                label=name)
    target = report["thresholds"]["lossless_target"]
    ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"lossless target {target:g}")
    ax.set(xlabel="layer", ylabel="lossless ratio (online-sim, held KV)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(wrap_title(f"{report.get('preset', 'gate')}: lossless ratio per layer", 8), fontsize=10)
    return fig


def plot_per_layer(report: Mapping[str, Any], path: Path) -> Path | None:
    """Save :func:`per_layer_figure` to ``path``; None (nothing written) without data."""
    fig = per_layer_figure(report)
    return None if fig is None else save_figure(fig, path)


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (folders created) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
