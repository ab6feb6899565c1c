"""Parse llm_bench markdown logs (the original MNN fork's, or ours) into rows and metric rows.

Rules of the original parser: every line starting with ``|`` is a table line; the first is the
header, the second (the separator) is skipped; rows whose cell count differs from the header are
dropped; cells stay strings, and a ``log_file`` column is added. Files named twice are read once.
Ours also drops repeated header and separator lines (two tables appended to one log), which the
original read as rows (``first_number("h2o_lossy")`` is 2); a table line followed by a separator
starts a new table with its own header, and the line after a header is a row unless it is a separator
(the original skipped it blindly); a UTF-8 byte-order mark is accepted.
Nothing is dropped silently: :func:`parse_logs_report` returns every file or line that gave no
row as a :class:`ParseProblem` (file, line, reason). A table line holding bytes that are not UTF-8
is dropped (never gate a number that could not be read); such bytes elsewhere are reported and ignored.
Numbers are taken as the first number in a cell (the mean of ``mean ± sd``); decode speed is the
number after ``<br>`` in ``speed(tok/s)``.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

_NUMBER = re.compile(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")
_SEPARATOR_CELL = re.compile(r":?-+:?")
_BOM = "\ufeff"
SPEED_COLUMN = "speed(tok/s)"

# Problem kinds (ParseProblem.kind); each names what was not parsed.
UNREADABLE = "unreadable file"
NO_TABLE = "no llm_bench table"
NO_ROWS = "table header without rows"
CELL_COUNT = "row with the wrong cell count"
NO_SPEED = f"row of a table without {SPEED_COLUMN!r}"
NOT_UTF8_ROW = "row not UTF-8 (dropped)"
NOT_UTF8_OTHER = "not UTF-8 outside the rows (ignored)"


class LogParseError(ValueError):
    """A log or CSV cannot be read as llm_bench output; the message names the file."""


@dataclass(frozen=True)
class ParseProblem:
    """A file or line of a log that gave no row (or was read with a caveat): ``line`` is 1-based,
    None for the whole file; ``kind`` is one of this module's problem kinds; ``detail`` the specifics."""

    file: str
    line: int | None
    kind: str
    detail: str

    @property
    def location(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.location}: {self.kind} ({self.detail})"


@dataclass
class _Table:
    header: list[str]
    line: int
    rows: int = 0
    problems: int = 0


def _decode_lines(data: bytes) -> list[tuple[int, str, str | None]]:
    """``[(line number, text, not-UTF-8 note or None)]`` of raw bytes (a leading BOM skipped; bytes
    that are not UTF-8 replaced by U+FFFD, the note naming the first one's byte and file offset)."""
    offset = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    out = []
    for number, raw in enumerate(data[offset:].split(b"\n"), start=1):
        note = None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", errors="replace")
            note = f"byte 0x{raw[exc.start]:02x} at offset {offset + exc.start}"
        out.append((number, text.rstrip("\r").lstrip(_BOM), note))
        offset += len(raw) + 1
    return out


def parse_log_report(path: Path) -> tuple[list[dict[str, str]], list[ParseProblem]]:
    """The table rows of one llm_bench log (each with ``log_file``) and what was not parsed, with reasons."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return [], [ParseProblem(name, None, UNREADABLE, str(exc.strerror or exc))]
    lines = _decode_lines(data)
    table_lines = [(n, text.strip(), note) for n, text, note in lines if text.strip().startswith("|")]
    problems = [ParseProblem(name, n, NOT_UTF8_OTHER, f"{note}; not a table line")
                for n, text, note in lines if note and not text.strip().startswith("|")]
    if not table_lines:
        return [], problems + [ParseProblem(name, None, NO_TABLE, "no line starts with '|'")]
    rows, table_problems = _parse_table(name, table_lines)
    return rows, sorted(problems + table_problems, key=lambda p: p.line or 0)


def _parse_table(name: str, lines: Sequence[tuple[int, str, str | None]]) -> tuple[list[dict[str, str]],
                                                                                   list[ParseProblem]]:
    """Rows and problems of a log's table lines ``(line number, text, not-UTF-8 note)``."""
    rows: list[dict[str, str]] = []
    problems: list[ParseProblem] = []
    tables: list[_Table] = []
    for i, (number, text, note) in enumerate(lines):
        cells = _cells(text)
        if _is_separator(cells) or (tables and cells == tables[-1].header):
            continue
        if not tables or (i + 1 < len(lines) and _is_separator(_cells(lines[i + 1][1]))):
            tables.append(_Table(cells, number))
            if note:
                problems.append(ParseProblem(name, number, NOT_UTF8_OTHER,
                                             f"{note}; table header, names kept as read"))
            continue
        table = tables[-1]
        problem = _row_problem(table.header, cells, note)
        if problem:
            table.problems += 1
            problems.append(ParseProblem(name, number, *problem))
        else:
            table.rows += 1
            rows.append({**dict(zip(table.header, cells)), "log_file": name})
    problems += [ParseProblem(name, t.line, NO_ROWS, f"{len(t.header)} columns, no row below")
                 for t in tables if not t.rows and not t.problems]
    if not tables:
        problems.append(ParseProblem(name, None, NO_TABLE, "only separator lines start with '|'"))
    return rows, problems


def _row_problem(header: list[str], cells: list[str], note: str | None) -> tuple[str, str] | None:
    """``(kind, detail)`` when a table row cannot be read as a row of ``header``, else None."""
    if note:
        return NOT_UTF8_ROW, note
    if len(cells) != len(header):
        return CELL_COUNT, f"{len(cells)} cells, header has {len(header)}"
    if SPEED_COLUMN not in header:
        return NO_SPEED, f"header starts {' | '.join(header[:3])}; run llm_bench with -kv true"
    return None


def parse_log(path: Path) -> list[dict[str, str]]:
    """The table rows of one llm_bench log, each with ``log_file`` added (problems dropped: see
    :func:`parse_log_report`). Raises LogParseError for a file that cannot be read."""
    rows, problems = parse_log_report(path)
    unreadable = [p for p in problems if p.kind == UNREADABLE]
    if unreadable:
        raise LogParseError(f"{path}: cannot read ({unreadable[0].detail})")
    return rows


def parse_logs_report(paths: Iterable[Path]) -> tuple[list[dict[str, str]], list[ParseProblem]]:
    """Rows of every log, each file read once however many times it is named, and every problem."""
    seen: set[Path] = set()
    rows: list[dict[str, str]] = []
    problems: list[ParseProblem] = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        file_rows, file_problems = parse_log_report(Path(path))
        rows.extend(file_rows)
        problems.extend(file_problems)
    return rows, problems


def parse_logs(paths: Iterable[Path]) -> list[dict[str, str]]:
    """Rows of every log, each file read once however many times it is named (problems dropped)."""
    return parse_logs_report(paths)[0]


def summarize_problems(problems: Sequence[ParseProblem], shown: int = 3) -> list[str]:
    """One line per problem kind: its count and the first ``shown`` locations with details."""
    by_kind: dict[str, list[ParseProblem]] = defaultdict(list)
    for problem in problems:
        by_kind[problem.kind].append(problem)
    lines = []
    for kind, items in by_kind.items():
        first = "; ".join(f"{p.location} ({p.detail})" for p in items[:shown])
        more = f"; and {len(items) - shown} more" if len(items) > shown else ""
        lines.append(f"{kind}: {len(items)} - {first}{more}")
    return lines


def find_logs(log_dir: Path, recursive: bool = True) -> list[Path]:
    """The ``*.log`` files under ``log_dir`` (only its top level unless ``recursive``, as the original's
    ``--log-dir``), sorted."""
    if not Path(log_dir).is_dir():
        raise LogParseError(f"{log_dir}: not a directory")
    return sorted(Path(log_dir).rglob("*.log") if recursive else Path(log_dir).glob("*.log"))


def first_number(cell: str | None) -> float | None:
    """The first number in a cell (the mean of ``mean ± sd``), or None."""
    match = _NUMBER.search(cell or "")
    return float(match.group()) if match else None


def speeds(cell: str | None) -> tuple[float | None, float | None]:
    """``(prefill, decode)`` tok/s from ``prefill ± sd<br>decode ± sd``."""
    if not cell:
        return None, None
    prefill, _, decode = cell.partition("<br>")
    return first_number(prefill), first_number(decode) if decode else None


def metric_row(row: dict[str, str]) -> dict[str, float]:
    """A parsed row as numbers: ``prefill_tps``, ``decode_tps`` and every numeric ``h2o_*`` mean."""
    out: dict[str, float] = {}
    prefill, decode = speeds(row.get(SPEED_COLUMN))
    if prefill is not None:
        out["prefill_tps"] = prefill
    if decode is not None:
        out["decode_tps"] = decode
    for key, cell in row.items():
        if isinstance(key, str) and key.startswith("h2o_") and isinstance(cell, str):
            value = first_number(cell)
            if value is not None:
                out[key] = value
    demo = row.get("llm_demo") or ""
    prompt = re.search(r"prompt=(\d+)", demo)
    gen = re.search(r"decode=(\d+)", demo)
    if prompt:
        out["prompt_tokens"] = float(prompt.group(1))
    if gen:
        out["gen_tokens"] = float(gen.group(1))
    return out


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    """Rows to CSV, columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`write_csv` (or the original parser)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise LogParseError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LogParseError(f"{path}: not a readable CSV ({exc})") from None
    for line, row in enumerate(rows, start=2):
        if None in row:
            raise LogParseError(f"{path}: line {line} has more cells than the header")
    if rows and SPEED_COLUMN not in rows[0]:
        raise LogParseError(f"{path}: no {SPEED_COLUMN!r} column; expected rows parsed from llm_bench logs")
    return rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_separator(cells: list[str]) -> bool:
    return all(_SEPARATOR_CELL.fullmatch(cell) for cell in cells)
