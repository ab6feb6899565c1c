"""llm_bench logs that are not clean: a byte-order mark, bytes that are not UTF-8, malformed or stray
table lines. Every file and table row is either parsed or reported with its reason, never dropped
silently, and one bad file never stops the others from being read."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_analyze_cli import HEADER_LINES, bench_row, table_line, write_log

from h2o_gates.log_parse import (
    CELL_COUNT,
    NO_ROWS,
    NO_SPEED,
    NO_TABLE,
    NOT_UTF8_OTHER,
    NOT_UTF8_ROW,
    UNREADABLE,
    LogParseError,
    metric_row,
    parse_log,
    parse_log_report,
    parse_logs,
    parse_logs_report,
    read_csv,
    summarize_problems,
)
from pytest_h2o.cli.main import main


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def log_bytes(*rows: str) -> bytes:
    return ("\n".join([*HEADER_LINES, *rows]) + "\n").encode("utf-8")


def parse_log_cli(tmp_path: Path, *argv: str) -> int:
    return main(["parse-log", *argv, "--out-csv", str(tmp_path / "m.csv")])


def test_a_log_with_a_byte_order_mark_parses_and_counts_in_a_folder(tmp_path, capsys):
    bom = write_bytes(tmp_path / "logs" / "bom.log", b"\xef\xbb\xbf" + log_bytes(bench_row(3.2, 1.1, 6.3)))
    write_log(tmp_path / "logs" / "plain.log", bench_row(3.1, 1.1, 6.4))
    (row,) = parse_log(bom)
    assert metric_row(row)["h2o_lossy"] == 3.2 and "model" in row
    assert parse_log_cli(tmp_path, "--log-dir", str(tmp_path / "logs")) == 0
    captured = capsys.readouterr()
    assert "2 rows from 2 of 2 files" in captured.out and "[WARN]" not in captured.err


def test_a_csv_with_a_byte_order_mark_reads(tmp_path):
    log = write_log(tmp_path / "a.log", bench_row(3.2, 1.1, 6.3))
    assert parse_log_cli(tmp_path, "--log-files", str(log)) == 0
    csv_path = tmp_path / "m.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    (row,) = read_csv(csv_path)
    assert row["model"] == "llama2_mnn"


def test_a_non_utf8_byte_in_a_row_drops_that_row_only_and_names_file_line_and_offset(tmp_path, capsys):
    data = log_bytes(bench_row(3.3, 1.1, 6.3)) + bench_row(3.2, 1.1, 6.3).encode("latin-1") + b"\n"  # 0xb1 for ±
    bad = write_bytes(tmp_path / "logs" / "latin1.log", data)
    write_log(tmp_path / "logs" / "other.log", bench_row(3.1, 1.1, 6.4))
    offset = data.index(b" \xb1 ") + 1
    rows, problems = parse_logs_report(sorted((tmp_path / "logs").glob("*.log")))
    assert [metric_row(r)["h2o_lossy"] for r in rows] == [3.3, 3.1]
    (problem,) = problems
    assert (problem.file, problem.line, problem.kind) == (str(bad), 4, NOT_UTF8_ROW)
    assert f"byte 0xb1 at offset {offset}" in problem.detail
    assert parse_log_cli(tmp_path, "--log-dir", str(tmp_path / "logs")) == 0
    err = capsys.readouterr().err
    assert f"{bad}:4" in err and f"offset {offset}" in err and "1 problem in 1 file" in err


def test_a_non_utf8_byte_outside_the_table_is_reported_and_the_rows_kept(tmp_path):
    log = write_bytes(tmp_path / "noise.log", b"loading model \xff\xfe\n" + log_bytes(bench_row(3.2, 1.1, 6.3)))
    rows, problems = parse_log_report(log)
    assert len(rows) == 1
    assert [(p.line, p.kind) for p in problems] == [(1, NOT_UTF8_OTHER)]
    assert "byte 0xff at offset 14" in problems[0].detail


def test_malformed_rows_and_files_are_each_reported_with_a_reason_and_a_count(tmp_path, capsys):
    good = bench_row(3.2, 1.1, 6.3)
    short, wide = good.rsplit("|", 2)[0] + "|", good + " extra |"
    logs = tmp_path / "logs"
    mixed = write_log(logs / "mixed.log", short, good, wide, short)
    write_log(logs / "header_only.log")
    (logs / "notes.log").write_text("llm_bench crashed before the table\n")
    no_speed = logs / "kv_false.log"
    no_speed.write_text("\n".join([table_line(["model", "test", "t/s"]), table_line(["---", "---", "---:"]),
                                   table_line(["llama2", "pp512", "48.3 ± 0.4"])]) + "\n")
    missing = tmp_path / "gone.log"
    rows, problems = parse_logs_report([*sorted(logs.glob("*.log")), missing])
    assert len(rows) == 1 and rows[0]["log_file"] == str(mixed)
    kinds = [(Path(p.file).name, p.line, p.kind) for p in problems]
    assert kinds == [("header_only.log", 1, NO_ROWS), ("kv_false.log", 3, NO_SPEED), ("mixed.log", 3, CELL_COUNT),
                     ("mixed.log", 5, CELL_COUNT), ("mixed.log", 6, CELL_COUNT), ("notes.log", None, NO_TABLE),
                     ("gone.log", None, UNREADABLE)]
    assert problems[2].detail == "20 cells, header has 21" and problems[3].detail == "22 cells, header has 21"
    summary = summarize_problems(problems, shown=2)
    assert summary[2].startswith(f"{CELL_COUNT}: 3 - {mixed}:3 (20 cells, header has 21); {mixed}:5 ")
    assert summary[2].endswith("; and 1 more")

    assert parse_log_cli(tmp_path, "--log-dir", str(logs)) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("[WARN] h2o-gate parse-log: 6 problems in 4 files")
    assert sum(line.startswith(f"  {CELL_COUNT}: 3 - ") for line in err) == 1  # one line per kind, with its count
    assert err[-1] == f"  files without rows: 3 - {logs / 'header_only.log'}, {no_speed}, {logs / 'notes.log'}"
    # a file named on the command line that is not there is skipped with a [WARN], as the original
    assert parse_log_cli(tmp_path, "--log-dir", str(logs), "--log-files", str(missing)) == 0
    assert f"[WARN] h2o-gate parse-log: --log-files {missing}: no such file; skipped" in capsys.readouterr().err


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_every_table_row_is_parsed_or_reported(tmp_path, rows):
    good = bench_row(3.2, 1.1, 6.3)
    lines = [good if i % 2 else good + " x |" for i in range(rows)]
    parsed, problems = parse_log_report(write_log(tmp_path / "a.log", *lines))
    row_problems = [p for p in problems if p.kind == CELL_COUNT]
    assert len(parsed) + len(row_problems) == rows
    assert bool(parsed) or problems  # a file without rows is always reported


def test_the_line_after_a_header_is_a_row_unless_it_is_a_separator(tmp_path):
    log = tmp_path / "no_sep.log"
    log.write_text("\n".join([HEADER_LINES[0], bench_row(3.2, 1.1, 6.3), bench_row(3.3, 1.1, 6.3)]) + "\n")
    assert [metric_row(r)["h2o_lossy"] for r in parse_log(log)] == [3.2, 3.3]


def test_a_second_table_with_another_header_reads_by_its_own_header(tmp_path):
    v4 = [*HEADER_LINES, bench_row(3.2, 1.1, 6.3)]
    head_header = HEADER_LINES[0][:-1] + "| h2o_lossless_backpressure_skip |"
    head_row = bench_row(3.4, 1.2, 6.1)[:-1] + "| 7.00 ± 0.00 |"
    log = tmp_path / "two.log"
    log.write_text("\n".join([*v4, head_header, HEADER_LINES[1] + " --- |", head_row]) + "\n")
    rows, problems = parse_log_report(log)
    assert problems == []
    assert [metric_row(r)["h2o_lossy"] for r in rows] == [3.2, 3.4]
    assert "h2o_lossless_backpressure_skip" not in rows[0]
    assert metric_row(rows[1])["h2o_lossless_backpressure_skip"] == 7


def test_the_old_calls_keep_working(tmp_path):
    log = write_log(tmp_path / "a.log", bench_row(3.2, 1.1, 6.3), bench_row(3.2, 1.1, 6.3) + " x |")
    assert len(parse_log(log)) == 1 and len(parse_logs([log, log])) == 1
    with pytest.raises(LogParseError, match="gone.log: cannot read"):
        parse_log(tmp_path / "gone.log")
