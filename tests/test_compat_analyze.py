"""Drop-in compatibility of ``parse-log``, ``analyze`` and ``full-eval`` with the original kit (issue 10,
section 1 and parse-log): its Python-side regression checks (dedup parse, gate warning, runtime decode
stats), the ``## Quality Gate`` section its multi-run script reads, the per-metric best of computed as
analyze_h2o_v4.py does, its exit status on request, and its ``--log-dir`` / ``--log-files`` handling.
Each check is written from the behaviour the original's scripts describe (seed README, spec §8)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from test_analyze_cli import bench_row, write_json, write_log

from h2o_gates.gate_report import build_report, render_markdown
from h2o_gates.rules import Thresholds
from pytest_h2o.cli.main import main

SAMPLES = Path(__file__).resolve().parent / "data"  # the original kit's sample llm_bench log
# The keys of the original's ``## Quality Gate`` in order, without decode or offline JSONs and with no limits.
GATE_KEYS = ["quality_status", "lossy_target", "lossy_best", "lossy_pass", "lossless_target",
             "lossless_selected_source", "lossless_selected_value", "lossless_selected_pass", "lossless_online_value",
             "lossless_online_pass", "runtime_decomp_required", "runtime_decomp_best_us", "runtime_queue_peak_best",
             "runtime_fallback_best", "runtime_queue_peak_gate_enabled", "runtime_queue_peak_pass",
             "runtime_fallback_gate_enabled", "runtime_fallback_pass", "runtime_decomp_pass", "overall_pass"]


def quality_gate(summary: Path) -> dict[str, str]:
    """The ``## Quality Gate`` keys as the original's multi-run script (test_v4_m3.sh) reads them: ``- k: v``
    lines from that heading to the next ``## ``, values stripped of backquotes; insertion order kept."""
    gate: dict[str, str] = {}
    in_gate = False
    for raw in summary.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line == "## Quality Gate":
            in_gate = True
            continue
        if in_gate and line.startswith("## "):
            break
        if in_gate and line.startswith("- ") and ":" in line:
            key, value = line[2:].split(":", 1)
            gate[key.strip()] = value.strip().strip("`")
    return gate


def write_rows(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    """``h2o-gate ARGV``: exit status (a usage error's SystemExit included) and stdout + stderr."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = int(exc.code)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def runtime_rows(tmp_path: Path, *lossless: float) -> Path:
    """One CSV row per runtime ``h2o_lossless``, every other rule passing."""
    return write_rows(tmp_path / "rows.csv", [
        {"model": "m", "speed(tok/s)": "48.0 ± 0.1<br>6.50 ± 0.02", "h2o_lossy": "3.200 ± 0.000",
         "h2o_lossless": f"{value:.3f} ± 0.000", "h2o_lossless_decomp_us": "590.00 ± 1.00", "log_file": f"r{i}.log"}
        for i, value in enumerate(lossless)])


# --- the original's Python-side regression checks -------------------------------------------------


def test_dedup_parse_a_log_named_by_dir_and_by_file_is_one_row(tmp_path, capsys):
    """[Fix 5]: the same file through --log-dir and --log-files: CSV of 2 lines (header + 1 row)."""
    (tmp_path / "fake.log").write_text("| model | speed(tok/s) | h2o_keep | h2o_lossy |\n"
                                       "|-------|-------------|----------|-----------|\n"
                                       "| test  | 10.0        | 0.5000   | 3.0000    |\n")
    out = tmp_path / "dedup_test.csv"
    rc, _ = run(capsys, "parse-log", "--log-dir", str(tmp_path), "--log-files", str(tmp_path / "fake.log"),
                "--out-csv", str(out))
    assert rc == 0 and out.read_bytes().count(b"\n") == 2


def test_gate_warn_fixture_warns_and_passes_with_the_originals_defaults(tmp_path, capsys):
    """[Fix 3]: no offline JSON: ``[WARN]`` in the output; the fixture passes (overall_pass: true), as the original."""
    fixture = tmp_path / "test.csv"
    fixture.write_text("model,speed(tok/s),h2o_keep,h2o_lossy,h2o_lossless,log_file\n"
                       "test,<br>10.0,0.5000,3.2000,1.5000,test.log\n")
    rc, output = run(capsys, "analyze", "--csv", str(fixture), "--lossy-target", "3.0", "--lossless-target", "1.3",
                     "--out", str(tmp_path / "summary.md"))
    assert rc == 0 and "[WARN]" in output
    assert re.search(r"^- overall_pass: true$", (tmp_path / "summary.md").read_text(), re.MULTILINE)
    gate = quality_gate(tmp_path / "summary.md")
    assert list(gate) == GATE_KEYS  # no decode keys: --decode-baseline 0 skips the rule, as the original
    assert (gate["quality_status"], gate["lossless_selected_source"], gate["lossless_selected_value"],
            gate["runtime_decomp_required"]) == ("PASS", "runtime", "1.5000", "false")


def test_runtime_decode_stats_of_the_sample_log_pass_the_original_checks(tmp_path, capsys):
    """Steps 4 and 4.2 on parse-log's CSV (first number of each cell), then analyze's runtime_decomp keys."""
    csv_path = tmp_path / "h2o_metrics.csv"
    assert run(capsys, "parse-log", "--log-files", str(SAMPLES / "llm_bench_v4_probe.log"),
               "--out-csv", str(csv_path))[0] == 0

    def mean(cell: str) -> float:
        match = re.match(r"\s*([0-9eE.+-]+)", cell.strip())
        return float(match.group(1)) if match else 0.0

    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    assert all(mean(r["h2o_lossless_raw_mb"]) > 0 and mean(r["h2o_lossless"]) > 1.0 for r in rows)
    assert all(mean(r[f"h2o_lossless_{key}"]) > 0 for r in rows for key in ("comp_mb", "comp_us", "decomp_us"))
    assert run(capsys, "analyze", "--csv", str(csv_path), "--require-runtime-decomp", "--out",
               str(tmp_path / "s.md"))[0] == 0
    gate = quality_gate(tmp_path / "s.md")
    assert (gate["runtime_decomp_required"], gate["runtime_decomp_best_us"], gate["runtime_decomp_pass"]) == (
        "true", "601.3300", "true")  # the larger of 589.67 and 601.33


def test_runtime_decode_required_and_absent_fails(tmp_path, capsys):
    csv_path = write_rows(tmp_path / "r.csv", [{"speed(tok/s)": "<br>6.5", "h2o_lossy": "3.2", "h2o_lossless": "1.4",
                                                "h2o_lossless_decomp_us": "0.00 ± 0.00"}])
    rc, _ = run(capsys, "analyze", "--csv", str(csv_path), "--require-runtime-decomp", "--out", str(tmp_path / "s.md"))
    gate = quality_gate(tmp_path / "s.md")
    assert rc == 1 and (gate["runtime_decomp_best_us"], gate["runtime_decomp_pass"]) == ("0.0000", "false")


# --- the per-metric best of, as analyze_h2o_v4.py ---------------------------------------------------


def test_runtime_fallback_gates_the_mean_over_rows_in_independent_mode(tmp_path, capsys):
    """Rows 1.10 and 1.40, no offline JSON: the original gates their mean 1.25 (fail), not the best row."""
    csv_path = runtime_rows(tmp_path, 1.10, 1.40)
    summary = tmp_path / "summary.md"
    rc, _ = run(capsys, "analyze", "--csv", str(csv_path), "--gate-mode", "independent", "--out", str(summary))
    gate = quality_gate(summary)
    assert rc == 1
    assert (gate["lossless_selected_value"], gate["lossless_online_pass"], gate["overall_pass"]) == (
        "1.2500", "false", "false")
    # joint (ours): the row at 1.40 passes every rule; the summary says what the original would say, truly
    rc, _ = run(capsys, "analyze", "--csv", str(csv_path), "--out", str(summary))
    text = summary.read_text()
    assert rc == 0 and quality_gate(summary)["overall_pass"] == "true"
    assert "The original's analyze (per-metric best of) says overall_pass: false." in text
    assert "whose overall_pass is false" in text
    assert set(re.findall(r"^- overall_pass: (\w+)$", text, re.MULTILINE)) == {"true"}  # one verdict per file


def test_best_of_takes_max_lossy_fastest_decode_and_max_runtime_counters(tmp_path, capsys):
    write_log(tmp_path / "logs" / "a.log", bench_row(3.4, 1.1, 6.00, decomp=10.0, queue=9.0, fallback=0.0),
              bench_row(2.9, 1.1, 6.40, decomp=700.0, queue=1.0, fallback=2.0, prompt=1024))
    csv_path = tmp_path / "m.csv"
    assert run(capsys, "parse-log", "--log-dir", str(tmp_path / "logs"), "--out-csv", str(csv_path))[0] == 0
    online = write_json(tmp_path / "online.json", 1.35)
    rc, _ = run(capsys, "analyze", "--csv", str(csv_path), "--offline-lossless-online-json", str(online),
                "--decode-baseline", "6.60", "--max-lossless-queue-peak", "8", "--gate-mode", "independent",
                "--out", str(tmp_path / "s.md"))
    gate = quality_gate(tmp_path / "s.md")
    assert rc == 1  # the worst queue peak (9 > 8) fails, as the original's max
    assert {k: gate[k] for k in ("lossy_best", "decode_best", "decode_drop_ratio", "runtime_decomp_best_us",
                                 "runtime_queue_peak_best", "runtime_fallback_best", "runtime_queue_peak_pass",
                                 "lossless_selected_source", "lossless_online_value", "online_selected_entries",
                                 "online_json")} == {
        "lossy_best": "3.4000", "decode_best": "6.4000", "decode_drop_ratio": "0.030303",
        "runtime_decomp_best_us": "700.0000", "runtime_queue_peak_best": "9.0000", "runtime_fallback_best": "2.0000",
        "runtime_queue_peak_pass": "false", "lossless_selected_source": "offline_online_sim",
        "lossless_online_value": "1.3500", "online_selected_entries": "0", "online_json": str(online)}
    keys = list(gate)
    assert keys[keys.index("runtime_queue_peak_gate_enabled"):keys.index("runtime_fallback_gate_enabled")] == [
        "runtime_queue_peak_gate_enabled", "runtime_queue_peak_target", "runtime_queue_peak_pass"]
    assert keys[keys.index("overall_pass"):] == ["overall_pass", "decode_baseline", "decode_best", "decode_drop_ratio",
                                                 "decode_drop_target", "decode_pass", "online_selected_entries",
                                                 "online_selected_layers", "online_json"]


def test_a_counter_no_row_has_reads_zero_as_the_original(tmp_path, capsys):
    csv_path = write_rows(tmp_path / "early.csv", [{"speed(tok/s)": "<br>6.5", "h2o_lossy": "3.2",
                                                    "h2o_lossless": "1.4"}])  # an early v4 log: no queue column
    rc, _ = run(capsys, "analyze", "--csv", str(csv_path), "--max-lossless-queue-peak", "8", "--gate-mode",
                "independent", "--out", str(tmp_path / "s.md"))
    gate = quality_gate(tmp_path / "s.md")
    assert rc == 0 and (gate["runtime_queue_peak_best"], gate["runtime_queue_peak_pass"]) == ("0.0000", "true")
    assert "no h2o_lossless_queue_peak in any row: read as 0, as the original" in (tmp_path / "s.md").read_text()


def test_best_of_on_same_run_baselines_is_not_called_the_originals():
    rows = {"a": {"h2o_lossy": 3.2, "lossless_online": 1.4, "decode_tps": 9.9},
            "b": {"h2o_lossy": 3.1, "lossless_online": 1.5, "decode_tps": 9.0}}
    report = build_report(rows, Thresholds(), baselines={"a": 10.0, "b": 10.0})
    assert any("same-run baselines" in d for d in report["independent"]["differs"])
    assert any("lossless ratio per configuration" in d for d in report["independent"]["differs"])
    text = render_markdown(report)
    assert "The original's" not in text and "the original rule, not exactly its verdict" in text


# --- exit status ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "env"])
def test_exit_zero_whatever_the_verdict_on_request(tmp_path, capsys, monkeypatch, how):
    csv_path = runtime_rows(tmp_path, 1.10)  # fails lossless_online_pass
    argv = ["analyze", "--csv", str(csv_path), "--out", str(tmp_path / "s.md")]
    assert run(capsys, *argv)[0] == 1
    if how == "env":
        monkeypatch.setenv("H2O_ANALYZE_EXIT_ZERO", "1")
    rc, output = run(capsys, *argv, *(["--exit-zero"] if how == "option" else []))
    assert rc == 0 and "exit 0 although overall_pass is false" in output
    assert quality_gate(tmp_path / "s.md")["quality_status"] == "FAIL"
    assert run(capsys, "analyze", "--csv", str(tmp_path / "none.csv"), "--exit-zero", "--out",
               str(tmp_path / "s.md"))[0] == 2  # a usage error stays 2


def test_a_bad_environment_value_is_a_usage_error(tmp_path, capsys, monkeypatch):
    csv_path = runtime_rows(tmp_path, 1.40)
    for name, value in (("H2O_ANALYZE_EXIT_ZERO", "maybe"), ("H2O_GATE_MODE", "jointly")):
        monkeypatch.setenv(name, value)
        rc, output = run(capsys, "analyze", "--csv", str(csv_path), "--out", str(tmp_path / "s.md"))
        assert rc == 2 and f"${name}='{value}'" in output
        monkeypatch.delenv(name)


def test_gate_mode_from_the_environment(tmp_path, capsys, monkeypatch):
    csv_path = runtime_rows(tmp_path, 1.10, 1.40)
    monkeypatch.setenv("H2O_GATE_MODE", "independent")
    assert run(capsys, "analyze", "--csv", str(csv_path), "--out", str(tmp_path / "s.md"))[0] == 1  # mean 1.25
    assert run(capsys, "analyze", "--csv", str(csv_path), "--gate-mode", "joint", "--out",
               str(tmp_path / "s.md"))[0] == 0  # the option wins


def test_full_eval_exit_zero(tmp_path, capsys, monkeypatch):
    from test_analyze_cli import write_kv_dumps

    write_log(tmp_path / "run" / "logs" / "r.log", bench_row(3.2, 1.1, 6.5))
    dumps = write_kv_dumps(tmp_path / "kv")
    argv = ["full-eval", "--run-dir", str(tmp_path / "run"), "--kv-dumps", str(dumps), "--online-chunk-seq", "16",
            "--lossless-target", "100"]
    assert run(capsys, *argv)[0] == 1
    monkeypatch.setenv("H2O_ANALYZE_EXIT_ZERO", "true")
    assert run(capsys, *argv)[0] == 0
    assert quality_gate(tmp_path / "run" / "summary.md")["lossless_online_pass"] == "false"


# --- parse-log inputs -----------------------------------------------------------------------------


def test_log_dir_is_read_at_its_top_level_unless_recursive(tmp_path, capsys):
    write_log(tmp_path / "logs" / "top.log", bench_row(3.2, 1.1, 6.5))
    write_log(tmp_path / "logs" / "old" / "nested.log", bench_row(3.3, 1.1, 6.5))
    out = tmp_path / "m.csv"
    rc, output = run(capsys, "parse-log", "--log-dir", str(tmp_path / "logs"), "--out-csv", str(out))
    assert rc == 0 and [r["log_file"] for r in csv.DictReader(open(out))] == [str(tmp_path / "logs" / "top.log")]
    assert "[WARN]" in output and "1 *.log file in subfolders not read (--recursive reads them)" in output
    rc, output = run(capsys, "parse-log", "--log-dir", str(tmp_path / "logs"), "--recursive", "--out-csv", str(out))
    assert rc == 0 and len(list(csv.DictReader(open(out)))) == 2 and "[WARN]" not in output


def test_a_missing_input_is_skipped_with_a_warning_and_no_rows_fail(tmp_path, capsys):
    log = write_log(tmp_path / "a.log", bench_row(3.2, 1.1, 6.5))
    gone, no_dir = tmp_path / "gone.log", tmp_path / "no_logs"
    out = tmp_path / "m.csv"
    rc, output = run(capsys, "parse-log", "--log-dir", str(no_dir), "--log-files", f"{gone},{log}",
                     "--out-csv", str(out))
    assert rc == 0 and len(list(csv.DictReader(open(out)))) == 1
    assert f"[WARN] h2o-gate parse-log: --log-files {gone}: no such file; skipped" in output
    assert f"[WARN] h2o-gate parse-log: --log-dir {no_dir}: no such folder; skipped" in output
    rc, output = run(capsys, "parse-log", "--log-files", str(gone), "--out-csv", str(tmp_path / "none.csv"))
    assert rc == 2 and "no llm_bench table rows" in output and not (tmp_path / "none.csv").exists()
    assert json.dumps(str(gone))[1:-1] in output
