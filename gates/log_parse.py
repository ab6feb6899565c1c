"""Parse llm_bench markdown logs (the original MNN fork's, or ours) into rows and metric rows.

Rules of the original parser: every line starting with ``|`` is a table line; the first is the
header, the second (the separator) is skipped; rows whose cell count differs from the header are
dropped; cells stay strings, and a ``log_file`` column is added. Files named twice are read once.
Ours also drops repeated header and separator lines (two tables appended to one log), which the
original read as rows (``first_number("h2o_lossy")`` is 2).
Numbers are taken as the first number in a cell (the mean of ``mean ± sd``); decode speed is the
number after ``<br>`` in ``speed(tok/s)``.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Iterable

_NUMBER = re.compile(r"[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?")
_SEPARATOR_CELL = re.compile(r":?-+:?")
SPEED_COLUMN = "speed(tok/s)"


class LogParseError(ValueError):
    """A log or CSV cannot be read as llm_bench output; the message names the file."""


def parse_log(path: Path) -> list[dict[str, str]]:
    """The table rows of one llm_bench log, each with ``log_file`` added."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise LogParseError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise LogParseError(f"{path}: not UTF-8 text ({exc})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if not lines:
        return []
    header = _cells(lines[0])
    rows = []
    for line in lines[2:]:
        cells = _cells(line)
        if cells == header or all(_SEPARATOR_CELL.fullmatch(cell) for cell in cells):
            continue
        if len(cells) == len(header):
            rows.append({**dict(zip(header, cells)), "log_file": str(path)})
    return rows


def parse_logs(paths: Iterable[Path]) -> list[dict[str, str]]:
    """Rows of every log, each file read once however many times it is named."""
    seen: set[Path] = set()
    rows: list[dict[str, str]] = []
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        rows.extend(parse_log(Path(path)))
    return rows


def find_logs(log_dir: Path) -> list[Path]:
    """The ``*.log`` files under ``log_dir``, sorted."""
    if not Path(log_dir).is_dir():
        raise LogParseError(f"{log_dir}: not a directory")
    return sorted(Path(log_dir).rglob("*.log"))


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
        with open(path, newline="", encoding="utf-8") as handle:
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
