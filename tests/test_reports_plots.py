"""Report text (offline markdown, number formatting) and the PNG plots of a gate report: titles, labels
and legends inside the image, and only the guides that belong to each axis."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from matplotlib.image import imread
from test_analyze_cli import write_kv_dumps

from h2o_gates.gate_report import build_report, format_cell
from h2o_gates.plots import per_layer_figure, plot_ratio_vs_speed, ratio_vs_speed_figure
from h2o_gates.reports import write_offline_markdown
from h2o_gates.rules import Thresholds, check_row, format_number
from h2o_kernels.lossless.offline_eval import EvalOptions, evaluate

MAIN_CONFIGS = ("keep0.30-lr3.0", "keep0.30-lr3.2", "keep0.33-lr3.0", "keep0.33-lr3.2")


# --- report text -----------------------------------------------------------------------------------


def test_offline_markdown_labels_each_byte_count(tmp_path):
    result = evaluate(write_kv_dumps(tmp_path / "kv"), EvalOptions(entry_mode="chunked_grouped", online_chunk_seq=16))
    write_offline_markdown(tmp_path / "o.md", result)
    text = (tmp_path / "o.md").read_text()
    assert f"- K chunk metadata bytes: {result['k_chunk_meta_bytes']}\n" in text  # the original's labels
    assert f"- V chunk metadata bytes: {result['v_chunk_meta_bytes']}\n" in text
    assert f"- Total raw bytes: {result['raw_bytes']}\n" in text and "chunK" not in text


@pytest.mark.parametrize("fmt, value, text", [("{:+.3f}", -0.0004, "0.000"), ("{:+.3f}", -0.0, "0.000"),
                                              ("{:+.3f}", 0.0004, "0.000"), ("{:+.3f}", -0.0006, "-0.001"),
                                              ("{:+.3f}", 0.045, "+0.045"), ("{:.0f}", -0.2, "0"),
                                              ("{:+.2f}", float("-inf"), "-inf")])
def test_a_number_that_rounds_to_zero_shows_unsigned(fmt, value, text):
    assert format_number(fmt, value) == text


def test_drops_never_show_negative_zero():
    metrics = {"decode_drop": -0.0001, "decode_drop_lo": -0.0004, "decode_drop_hi": 0.0002,
               "h2o_fidelity_ppl_delta": -0.0002}
    assert format_cell(metrics, "decode_drop", "{:+.3f}") == "0.000 [0.000, 0.000]"
    assert format_cell(metrics, "h2o_fidelity_ppl_delta", "{:+.3f}") == "0.000"
    row = {"decode_log_ratios": [1e-5, -2e-5, 3e-5], "decode_tps": 20.0}
    reason = check_row(row, Thresholds())["decode_pass"].reason
    assert "-0.000" not in reason and reason.startswith("decode drop 0.0000 [0.000, 0.000]")


# --- plots -----------------------------------------------------------------------------------------


def main_preset_report(preset: str = "target_joint_scope_v4.json") -> dict:
    """A report shaped like the main job's: four configurations, paired rounds, a same-run baseline."""
    rows = {}
    for i, name in enumerate(MAIN_CONFIGS):
        logs = [0.08 + 0.01 * i, 0.10 + 0.01 * i, 0.12 + 0.01 * i]
        rows[name] = {"h2o_lossy": 3.1 + 0.03 * i, "lossless_online": 1.33, "total_ratio": 3.44 + 0.01 * i,
                      "decode_tps": 25.1 * math.exp(logs[1]), "decode_log_ratios": logs,
                      "h2o_lossless_decomp_us": 600.0,
                      "per_layer_lossless": {str(n): 1.2 + 0.01 * n for n in range(30)}}
    rows[MAIN_CONFIGS[-1]]["h2o_lossy"] = 2.9  # one failing configuration
    return build_report(rows, Thresholds(), "joint", {name: 25.1 for name in rows}, {"preset": preset})


def inside_figure(fig, artist) -> bool:
    box = artist.get_window_extent(fig.canvas.get_renderer())
    return fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1


@pytest.mark.parametrize("preset", ["target_joint_scope_v4.json",
                                    "/home/ci/checkouts/project/presets/target_joint_scope_v4_balanced.json"])
def test_ratio_vs_decode_keeps_title_labels_and_legend_inside_the_image(preset):
    fig = ratio_vs_speed_figure(main_preset_report(preset))
    fig.canvas.draw()
    (ax,) = fig.axes
    title = fig._suptitle
    assert preset in title.get_text().replace("\n", " ") and "compression vs decode speed" in title.get_text()
    legend = fig.legends[0]
    for artist in (title, ax.xaxis.label, ax.yaxis.label, legend):
        assert inside_figure(fig, artist), artist
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels[:4] == [f"{name} (pass)" for name in MAIN_CONFIGS[:3]] + [f"{MAIN_CONFIGS[3]} (fail)"]
    assert labels[4:] == ["same-run decode baseline", "allowed drop (0.05)"]


def test_ratio_vs_decode_draws_no_target_on_the_whole_cache_axis():
    fig = ratio_vs_speed_figure(main_preset_report())
    (ax,) = fig.axes
    horizontal = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) > 1
                  and len(set(line.get_xdata())) > 1]
    assert horizontal == []
    assert not any("target" in text.get_text() for text in fig.legends[0].get_texts())
    assert ax.get_ylim()[0] == 1.0


def test_per_layer_plot_keeps_its_target_line_and_title_inside():
    fig = per_layer_figure(main_preset_report())
    fig.canvas.draw()
    assert inside_figure(fig, fig._suptitle) and inside_figure(fig, fig.legends[0])
    assert "lossless target 1.3" in [text.get_text() for text in fig.legends[0].get_texts()]


def test_ratio_vs_decode_png_is_written(tmp_path):
    path = plot_ratio_vs_speed(main_preset_report(), tmp_path / "sub" / "ratio_vs_decode.png")
    assert path == tmp_path / "sub" / "ratio_vs_decode.png"
    height, width, _ = imread(path).shape
    assert (width, height) == (825, 605)  # 7.5 x 5.5 in at 110 dpi
    assert plot_ratio_vs_speed({"configs": [], "thresholds": {}}, tmp_path / "none.png") is None
    assert not Path(tmp_path / "none.png").exists()
