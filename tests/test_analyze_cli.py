"""``h2o-gate parse-log``, ``analyze`` and ``full-eval`` in process, on hand-written llm_bench logs
(the v4 table format of the original) and tiny KV dumps; expected numbers are computed by hand."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from h2o_gates.log_parse import metric_row, read_csv
from h2o_kernels.lossless.kvdump import write_dump
from pytest_h2o.cli.analyze import (
    add_analyze_arguments,
    add_full_eval_arguments,
    add_parse_log_arguments,
    check_offline,
    config_names,
)
from pytest_h2o.cli.main import main

V4_HEADER = ("model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)", "h2o_keep",
             "h2o_lossy", "h2o_lossless", "h2o_target_keep_effective", "h2o_floor_keep", "h2o_quantized_keep",
             "h2o_evict_us", "h2o_codec_us", "h2o_lossless_raw_mb", "h2o_lossless_comp_mb", "h2o_lossless_comp_us",
             "h2o_lossless_decomp_us", "h2o_lossless_queue_peak", "h2o_lossless_fallback")


def table_line(cells: list[str] | tuple[str, ...]) -> str:
    return "| " + " | ".join(cells) + " |"


HEADER_LINES = [table_line(V4_HEADER), table_line(["---"] + ["---:"] * (len(V4_HEADER) - 1))]


def bench_row(lossy: float, lossless: float, decode: float, decomp: float = 590.0, queue: float = 1.0,
              fallback: float = 0.0, prompt: int = 512) -> str:
    """One v4 llm_bench row (the sample's layout) with the gated numbers chosen by the test."""
    return table_line([
        "llama2_mnn", "3.85 GiB", "CPU", "4", "Low", f"prompt={prompt}<br>decode=128",
        f"48.31 ± 0.42<br>{decode:.2f} ± 0.03", "0.3138 ± 0.0000", f"{lossy:.3f} ± 0.000",
        f"{lossless:.3f} ± 0.002", "0.3138 ± 0.0000", "0.1891 ± 0.0000", "0.3138 ± 0.0000", "41.00 ± 3.61",
        "2150.33 ± 80.12", "1.00 ± 0.00", "0.71 ± 0.00", "2150.33 ± 80.12", f"{decomp:.2f} ± 20.03",
        f"{queue:.2f} ± 0.00", f"{fallback:.2f} ± 0.00"])


def write_log(path: Path, *rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*HEADER_LINES, *rows]) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, ratio: float) -> Path:
    path.write_text(json.dumps({"weighted_lossless_ratio": ratio, "raw_bytes": 100}), encoding="utf-8")
    return path


def make_csv(tmp_path: Path, logs: dict[str, list[str]]) -> Path:
    """Write ``logs/<name>.log`` for each entry and parse them with ``h2o-gate parse-log``."""
    for name, rows in logs.items():
        write_log(tmp_path / "logs" / f"{name}.log", *rows)
    csv_path = tmp_path / "h2o_metrics.csv"
    assert main(["parse-log", "--log-dir", str(tmp_path / "logs"), "--recursive", "--out-csv", str(csv_path)]) == 0
    return csv_path


def analyze(tmp_path: Path, csv_path: Path, *extra: str) -> int:
    return main(["analyze", "--csv", str(csv_path), "--out", str(tmp_path / "summary.md"),
                 "--out-json", str(tmp_path / "summary.json"), *extra])


def summary(tmp_path: Path) -> tuple[str, dict]:
    report = json.loads((tmp_path / "summary.json").read_text())
    return (tmp_path / "summary.md").read_text(), report


def configs(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["configs"]}


def failing(report: dict) -> dict[str, list[str]]:
    return {c["name"]: sorted(r for r, v in c["verdicts"].items() if v["enabled"] and not v["passed"])
            for c in report["configs"]}


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# --- parse-log -------------------------------------------------------------------------------------


def test_parse_log_reads_a_file_named_twice_once(tmp_path, capsys):
    log = write_log(tmp_path / "logs" / "a.log", bench_row(3.2, 1.1, 6.3), bench_row(3.3, 1.2, 6.4, prompt=1024))
    out = tmp_path / "m.csv"
    again = tmp_path / "logs" / ".." / "logs" / "a.log"
    assert main(["parse-log", "--log-dir", str(log.parent), "--log-files", f"{again},{log}",
                 "--out-csv", str(out)]) == 0
    rows = read_csv(out)
    assert [metric_row(r)["prompt_tokens"] for r in rows] == [512.0, 1024.0]
    assert "2 rows from 1 of 1 files" in capsys.readouterr().out


def test_parse_log_drops_rows_of_the_wrong_width_and_keeps_cells_as_text(tmp_path):
    good = bench_row(3.186, 1.401, 6.15)
    short = good.rsplit("|", 2)[0] + "|"  # one cell fewer
    wide = good + " extra |"
    log = write_log(tmp_path / "w.log", short, good, wide)
    out = tmp_path / "m.csv"
    assert main(["parse-log", "--log-files", str(log), "--out-csv", str(out)]) == 0
    (row,) = read_csv(out)
    assert row["h2o_lossy"] == "3.186 ± 0.000" and row["log_file"] == str(log)
    metrics = metric_row(row)
    assert (metrics["h2o_lossy"], metrics["h2o_lossless"], metrics["decode_tps"], metrics["prefill_tps"]) == (
        3.186, 1.401, 6.15, 48.31)


def test_parse_log_drops_a_repeated_table_header(tmp_path):
    log = tmp_path / "twice.log"
    log.write_text("\n".join([*HEADER_LINES, bench_row(3.2, 1.1, 6.3), *HEADER_LINES, bench_row(3.4, 1.1, 6.1)]))
    out = tmp_path / "m.csv"
    assert main(["parse-log", "--log-files", str(log), "--out-csv", str(out)]) == 0
    assert [metric_row(r)["h2o_lossy"] for r in read_csv(out)] == [3.2, 3.4]


def test_parse_log_without_rows_fails_naming_what_was_searched(tmp_path, capsys):
    empty = tmp_path / "logs"
    empty.mkdir()
    (empty / "notes.log").write_text("no table here\n")
    out = tmp_path / "m.csv"
    assert main(["parse-log", "--log-dir", str(empty), "--out-csv", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no llm_bench table rows" in err and str(empty) in err and "1 log file read" in err
    assert not out.exists()


def test_parse_log_missing_file_is_named_and_no_rows_fail(tmp_path, capsys):
    missing = tmp_path / "gone.log"
    assert main(["parse-log", "--log-files", str(missing), "--out-csv", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert f"[WARN] h2o-gate parse-log: --log-files {missing}: no such file; skipped" in err
    assert "no llm_bench table rows" in err and not (tmp_path / "m.csv").exists()


def test_parse_log_needs_some_input(tmp_path, capsys):
    assert "--log-dir" in usage_error(capsys, ["parse-log", "--out-csv", str(tmp_path / "m.csv")])


# --- analyze ---------------------------------------------------------------------------------------


def test_analyze_passes_on_hand_computed_numbers(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"good": [bench_row(3.2, 1.1, 6.30)]})
    online = write_json(tmp_path / "online.json", 1.35)
    upper = write_json(tmp_path / "upper.json", 1.60)
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", str(online),
                   "--offline-lossless-json", str(upper), "--decode-baseline", "6.60") == 0
    captured = capsys.readouterr()
    assert "[WARN]" not in captured.err
    assert "overall_pass: true" in captured.out and "lossy_pass: true" in captured.out
    md, report = summary(tmp_path)
    assert "- overall_pass: true" in md
    metrics = configs(report)["good"]["metrics"]
    assert metrics["lossless_online"] == 1.35 and metrics["lossless_online_source"] == "online_sim"
    assert math.isclose(metrics["decode_drop"], (6.60 - 6.30) / 6.60)  # 0.04545 <= 0.05
    assert math.isclose(metrics["lossy_x_lossless"], 3.2 * 1.35) and "total_ratio" not in metrics
    assert report["thresholds"]["decode_baseline"] == 6.6


def test_analyze_fails_on_decode_drop_just_over_target(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"slow": [bench_row(3.2, 1.1, 6.25)]})  # drop 0.0530
    online = write_json(tmp_path / "online.json", 1.35)
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", str(online), "--decode-baseline", "6.60") == 1
    assert "overall_pass: false" in capsys.readouterr().out
    md, report = summary(tmp_path)
    assert "- overall_pass: false" in md
    assert failing(report) == {"slow": ["decode_pass"]}
    assert math.isclose(configs(report)["slow"]["metrics"]["decode_drop"], (6.60 - 6.25) / 6.60)
    # a baseline <= 0 turns the decode gate off
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", str(online), "--decode-baseline", "0") == 0


def test_analyze_lossy_just_under_target_fails(tmp_path):
    csv_path = make_csv(tmp_path, {"r": [bench_row(2.999, 1.1, 6.6)]})
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json",
                   str(write_json(tmp_path / "o.json", 1.35))) == 1
    assert failing(summary(tmp_path)[1]) == {"r": ["lossy_pass"]}


def test_lossless_online_falls_back_to_upper_bound_then_runtime(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 6.5)]})
    upper = write_json(tmp_path / "upper.json", 1.60)
    missing = tmp_path / "online_missing.json"
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", str(missing),
                   "--offline-lossless-json", str(upper)) == 0
    err = capsys.readouterr().err
    assert "[WARN]" in err and str(missing) in err and "1.6000" in err
    metrics = configs(summary(tmp_path)[1])["r"]["metrics"]
    assert (metrics["lossless_online"], metrics["lossless_online_source"]) == (1.60, "upper_bound")
    # neither JSON: the row's own runtime h2o_lossless (1.1 < 1.3: fails)
    assert analyze(tmp_path, csv_path) == 1
    assert "[WARN]" in capsys.readouterr().err
    md, report = summary(tmp_path)
    metrics = configs(report)["r"]["metrics"]
    assert (metrics["lossless_online"], metrics["lossless_online_source"]) == (1.1, "runtime")
    assert failing(report) == {"r": ["lossless_online_pass"]}
    assert "lossless_online[runtime]" in md


def test_joint_needs_one_configuration_passing_everything(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"lossy": [bench_row(3.5, 1.1, 5.0)], "fast": [bench_row(2.5, 1.1, 6.6)]})
    online = str(write_json(tmp_path / "o.json", 1.35))
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--gate-mode", "independent",
                   "--decode-baseline", "6.60") == 0
    md, report = summary(tmp_path)
    assert "- overall_pass: true" in md and report["joint"]["passed"] is False
    capsys.readouterr()
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--decode-baseline", "6.60") == 1
    out = capsys.readouterr().out
    assert "overall_pass: false (joint" in out and "original best-of: true" in out
    md, report = summary(tmp_path)
    assert "- overall_pass: false" in md
    assert failing(report) == {"lossy": ["decode_pass"], "fast": ["lossy_pass"]}


def test_optional_limits_and_runtime_decomp(tmp_path):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 6.5, decomp=0.0, queue=3.0, fallback=1.0)]})
    online = str(write_json(tmp_path / "o.json", 1.35))
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--require-runtime-decomp") == 1
    assert failing(summary(tmp_path)[1]) == {"r": ["runtime_decomp_pass"]}
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--no-require-runtime-decomp") == 0
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--no-require-runtime-decomp",
                   "--max-lossless-queue-peak", "2", "--max-lossless-fallback", "0") == 1
    assert failing(summary(tmp_path)[1]) == {"r": ["runtime_fallback_pass", "runtime_queue_peak_pass"]}
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", online, "--no-require-runtime-decomp",
                   "--max-lossless-queue-peak", "3", "--max-lossless-fallback", "1") == 0


def test_configurations_are_named_by_log_stem(tmp_path):
    csv_path = make_csv(tmp_path, {"two": [bench_row(3.2, 1.1, 6.5), bench_row(3.1, 1.1, 6.4, prompt=1024)],
                                   "x/run": [bench_row(3.0, 1.1, 6.5)], "y/run": [bench_row(3.3, 1.1, 6.5)]})
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json",
                   str(write_json(tmp_path / "o.json", 1.35))) == 0
    metrics = {name: c["metrics"] for name, c in configs(summary(tmp_path)[1]).items()}
    assert sorted(metrics) == ["two#1", "two#2", "x/run", "y/run"]
    assert (metrics["two#1"]["prompt_tokens"], metrics["two#2"]["prompt_tokens"]) == (512.0, 1024.0)
    assert (metrics["x/run"]["h2o_lossy"], metrics["y/run"]["h2o_lossy"]) == (3.0, 3.3)
    assert config_names([{"model": "m"}, {"model": "m"}]) == ["row1", "row2"]


def test_an_offline_json_with_only_lossless_ratio_is_read_as_the_original(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 6.5)]})
    (tmp_path / "old.json").write_text('{"lossless_ratio": 1.4}')
    main(["analyze", "--csv", str(csv_path), "--offline-lossless-online-json", str(tmp_path / "old.json"),
          "--out", str(tmp_path / "s.md")])
    assert "- lossless_online: `1.4`" in (tmp_path / "s.md").read_text()


@pytest.mark.parametrize("text, needle", [("{not json", "not readable JSON"),
                                          ('{"lossless_ratio": "1.4"}', "weighted_lossless_ratio"),
                                          ('{"weighted_lossless_ratio": "1.4"}', "weighted_lossless_ratio")])
def test_bad_offline_json_is_a_usage_error_naming_the_file(tmp_path, capsys, text, needle):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 6.5)]})
    bad = tmp_path / "bad_online.json"
    bad.write_text(text)
    err = usage_error(capsys, ["analyze", "--csv", str(csv_path), "--offline-lossless-online-json", str(bad),
                               "--out", str(tmp_path / "s.md")])
    assert str(bad) in err and needle in err
    assert not (tmp_path / "s.md").exists()


def test_missing_csv_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "none.csv"
    assert str(missing) in usage_error(capsys, ["analyze", "--csv", str(missing), "--out", str(tmp_path / "s.md")])


def test_analyze_defaults_are_the_originals_and_unchecked_rules_say_so(tmp_path, capsys):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 5.0, decomp=0.0)]})  # slow, no runtime decode
    online = write_json(tmp_path / "online.json", 1.35)
    assert analyze(tmp_path, csv_path, "--offline-lossless-online-json", str(online)) == 0
    out = capsys.readouterr().out
    assert "decode_pass: not checked (no --decode-baseline)" in out
    assert "runtime_decomp_pass: not checked (--require-runtime-decomp off)" in out
    md, report = summary(tmp_path)
    assert report["thresholds"]["decode_baseline"] is None and report["thresholds"]["require_runtime_decomp"] is False
    gate = md.split("## Gate", 1)[1].split("\n\n")[1].splitlines()
    assert gate == ["- lossy_pass: true", "- lossless_online_pass: true",
                    "- decode_pass: not checked (no --decode-baseline)",
                    "- runtime_decomp_pass: not checked (--require-runtime-decomp off)",
                    "- runtime_queue_peak_pass: not checked (no --max-lossless-queue-peak)",
                    "- runtime_fallback_pass: not checked (no --max-lossless-fallback)",
                    "- fidelity_pass: not checked (llm_bench logs have no fidelity numbers)", "- overall_pass: true"]
    assert "- decode_baseline: none (decode_pass not checked)" in md
    assert "decode_drop" not in configs(report)["r"]["metrics"]  # no number for a rule that did not run


def test_a_rule_checked_without_its_own_input_says_so(tmp_path, capsys):
    csv_path = tmp_path / "early_v4.csv"  # an early v4 log: no decompression counter
    csv_path.write_text("model,speed(tok/s),h2o_lossy,h2o_lossless,log_file\n"
                        "llama2,48.3 ± 0.4<br>6.5 ± 0.1,3.2 ± 0.0,1.4 ± 0.0,logs/r.log\n", encoding="utf-8")
    assert analyze(tmp_path, csv_path, "--require-runtime-decomp") == 1
    out = capsys.readouterr().out
    md, _ = summary(tmp_path)
    for line in ("lossless_online_pass: true (from each row's runtime h2o_lossless: no offline JSON)",
                 "runtime_decomp_pass: false (no h2o_lossless_decomp_us in the input)"):
        assert f"- {line}\n" in md and f"  {line} - " in out
    upper = write_json(tmp_path / "upper.json", 1.6)
    assert analyze(tmp_path, csv_path, "--offline-lossless-json", str(upper)) == 0
    line = f"- lossless_online_pass: true (from the upper-bound JSON {upper}: no online-sim JSON)"
    assert line in summary(tmp_path)[0]


def test_analyze_summary_has_no_empty_metadata_lines(tmp_path):
    csv_path = make_csv(tmp_path, {"r": [bench_row(3.2, 1.1, 6.3)]})
    analyze(tmp_path, csv_path)
    md = summary(tmp_path)[0]
    assert md.startswith("# H2O v4 Quality Gate Summary\n\n## Quality Gate\n\n- quality_status: FAIL\n")
    assert "\n\n\n" not in md


def help_blocks(capsys, command: str) -> dict[str, str]:
    """``{first option string: its help, unwrapped}`` from ``h2o-gate COMMAND --help``."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    blocks = [" ".join(block.split()) for block in re.split(r"\n  (?=-)", text) if block.strip()]
    return {block.split()[0].rstrip(","): block for block in blocks}


def check_help_defaults(capsys, command: str, add_arguments) -> None:
    """Every option with a meaningful default shows it once, as its real value; no help text invents one."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    blocks = help_blocks(capsys, command)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        block = blocks[action.option_strings[0]]
        shown = re.findall(r"\(default: ([^)]*)\)", block)
        assert block.count("(default") <= 1, block
        if action.default is None or action.default is False or action.default == "":
            assert shown == [], block
        else:
            assert shown == [str(action.default)], block


@pytest.mark.parametrize("command, add_arguments", [("parse-log", add_parse_log_arguments),
                                                    ("analyze", add_analyze_arguments),
                                                    ("full-eval", add_full_eval_arguments)])
def test_help_shows_each_default_once(capsys, command, add_arguments):
    check_help_defaults(capsys, command, add_arguments)


def test_help_shows_the_originals_defaults(capsys):
    analyze_help, full_eval_help = help_blocks(capsys, "analyze"), help_blocks(capsys, "full-eval")
    assert "(default: 0.0)" in analyze_help["--decode-baseline"]
    assert "off unless given" in analyze_help["--require-runtime-decomp"]
    assert "(default: True)" in full_eval_help["--require-runtime-decomp"]


# --- full-eval -------------------------------------------------------------------------------------


def write_kv_dumps(out_dir: Path, layers: int = 3) -> Path:
    """Random-walk fp16 K/V on a coarse grid (compressible), a prefill and a decode entry per layer."""
    rng = np.random.default_rng(7)
    for layer in range(layers):
        for stage, start, seq in (("prefill", 0, 40), ("decode", 40, 8)):
            base = rng.integers(-16, 16, size=(1, 2, 16)) / 8
            k, v = ((base + np.cumsum(rng.integers(-2, 3, size=(seq, 2, 16)) / 64, axis=0)).astype(np.float16)
                    for _ in range(2))
            write_dump(out_dir, run_id="tiny", stage=stage, layer_id=layer, seq_start=start, k=k, v=v)
    return out_dir


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory) -> Path:
    return write_kv_dumps(tmp_path_factory.mktemp("kv"))


def full_eval(run_dir: Path, kv: Path, *extra: str) -> int:
    return main(["full-eval", "--run-dir", str(run_dir), "--kv-dumps", str(kv), "--online-chunk-seq", "16", *extra])


def test_full_eval_end_to_end(tmp_path, kv_dir, capsys):
    write_log(tmp_path / "logs" / "run_0001.log", bench_row(3.2, 1.1, 6.5), bench_row(3.1, 1.1, 6.4, prompt=1024))
    assert full_eval(tmp_path, kv_dir, "--lossless-target", "1.0") == 0
    err = capsys.readouterr().err
    assert all(f"[{i}/4]" in err for i in range(1, 5))
    upper = json.loads((tmp_path / "offline_lossless_upper.json").read_text())
    online = json.loads((tmp_path / "offline_lossless_online_grouped.json").read_text())
    assert (upper["entry_mode"], upper["aggregate_by_stage"], upper["selected_layers"]) == ("aggregate", True, [0, 1])
    assert (online["entry_mode"], online["online_chunk_seq"], online["online_framing_bytes"]) == (
        "chunked_grouped", 16, 16)  # run_full_eval.sh's framing default
    for name in ("offline_lossless_upper.md", "offline_lossless_online_grouped.md"):  # a .md beside each JSON
        assert (tmp_path / name).read_text().startswith("# H2O v4 Offline Lossless Summary")
    assert online["selected_layers"] == [0, 1] and online["online_chunks"] > 0
    for result in (upper, online):
        assert result["weighted_lossless_ratio"] == result["raw_bytes"] / result["compressed_bytes"] > 1.0
        assert result["roundtrip_verified"] is True
    assert len(read_csv(tmp_path / "h2o_metrics.csv")) == 2
    md, report = summary(tmp_path)
    assert "- overall_pass: true" in md
    metrics = configs(report)["run_0001#1"]["metrics"]
    assert metrics["lossless_online"] == online["weighted_lossless_ratio"]
    assert metrics["lossless_online_source"] == "online_sim"
    assert math.isclose(metrics["lossy_x_lossless"], 3.2 * online["weighted_lossless_ratio"])
    # the same run with an unreachable lossless target fails on that rule alone
    assert full_eval(tmp_path, kv_dir, "--lossless-target", "100") == 1
    assert failing(summary(tmp_path)[1]) == {"run_0001#1": ["lossless_online_pass"],
                                             "run_0001#2": ["lossless_online_pass"]}


def test_full_eval_names_the_online_json_by_entry_mode_as_run_full_eval(tmp_path, kv_dir, capsys):
    write_log(tmp_path / "logs" / "run_0001.log", bench_row(3.2, 1.1, 6.5))
    full_eval(tmp_path, kv_dir, "--entry-mode", "chunked", "--lossless-target", "1.0")
    assert json.loads((tmp_path / "offline_lossless_online.json").read_text())["entry_mode"] == "chunked"
    assert (tmp_path / "offline_lossless_online.md").is_file()


def test_full_eval_runs_both_offline_evaluations_with_the_chosen_codec_profile(tmp_path, kv_dir, capsys):
    write_log(tmp_path / "logs" / "run_0001.log", bench_row(3.2, 1.1, 6.5))
    ratios = {}
    for codec in ("fast", "ratio"):
        assert full_eval(tmp_path, kv_dir, "--codec", codec, "--lossless-target", "1.0") == 0
        for name in ("offline_lossless_upper.json", "offline_lossless_online_grouped.json"):
            result = json.loads((tmp_path / name).read_text())
            assert result["codec_profile"] == codec and result["roundtrip_verified"] is True
            ratios[codec, name] = result["weighted_lossless_ratio"]
    # the ratio profile's safety net: never a blob larger than the fast profile's
    assert all(ratios["ratio", name] >= ratios["fast", name]
               for name in ("offline_lossless_upper.json", "offline_lossless_online_grouped.json"))


def test_full_eval_without_logs_or_dumps_is_a_usage_error(tmp_path, kv_dir, capsys):
    with pytest.raises(SystemExit, match="2"):
        full_eval(tmp_path, kv_dir)
    assert str(tmp_path / "logs") in capsys.readouterr().err
    write_log(tmp_path / "logs" / "r.log", bench_row(3.2, 1.1, 6.5))
    with pytest.raises(SystemExit, match="2"):
        full_eval(tmp_path, tmp_path / "no_dumps")
    assert "no_dumps" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()


def test_offline_accounting_check():
    good = {"raw_bytes": 300, "compressed_bytes": 200, "weighted_lossless_ratio": 1.5, "roundtrip_verified": True}
    assert check_offline(good) is None
    assert "raw/comp" in check_offline({**good, "weighted_lossless_ratio": 1.6})
    assert "nothing compressed" in check_offline({**good, "compressed_bytes": 0})
    assert "verified" in check_offline({**good, "roundtrip_verified": False})


def test_full_eval_uses_run_full_eval_defaults(tmp_path, kv_dir, capsys):
    write_log(tmp_path / "logs" / "r.log", bench_row(3.2, 1.1, 5.0, decomp=0.0))
    assert full_eval(tmp_path, kv_dir, "--lossless-target", "1.0") == 1
    md, report = summary(tmp_path)
    assert failing(report) == {"r": ["runtime_decomp_pass"]}  # required, as run_full_eval.sh; decode not checked
    assert "- decode_pass: not checked (no --decode-baseline)" in md
    assert "decode_pass: not checked (no --decode-baseline)" in capsys.readouterr().out


def test_full_eval_names_the_logs_it_could_not_parse(tmp_path, kv_dir, capsys):
    write_log(tmp_path / "logs" / "r.log", bench_row(3.2, 1.1, 6.5), bench_row(3.2, 1.1, 6.5) + " extra |")
    (tmp_path / "logs" / "crash.log").write_text("segmentation fault\n")
    assert full_eval(tmp_path, kv_dir, "--lossless-target", "1.0") == 0
    err = capsys.readouterr().err
    assert "[WARN] h2o-gate full-eval: 2 problems in 2 files" in err and "crash.log" in err
    md, report = summary(tmp_path)
    warnings = md.split("## Warnings", 1)[1]
    assert "no llm_bench table: 1" in warnings and "crash.log" in warnings
    assert f"row with the wrong cell count: 1 - {tmp_path / 'logs' / 'r.log'}:4" in warnings
    assert len(report["warnings"]) == 3  # two kinds and the file without rows


def test_a_csv_without_rows_is_named_before_any_fallback_warning(tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("model,speed(tok/s),h2o_lossy\n")
    assert main(["analyze", "--csv", str(empty), "--out", str(tmp_path / "s.md")]) == 2
    err = capsys.readouterr().err
    assert f"no rows in {empty}" in err and "[WARN]" not in err
