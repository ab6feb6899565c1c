"""History in a gate session: the stored run to compare with (resolved before this run is stored),
the comparisons, and appending this run to the store at the end (unless it measured nothing)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from h2o_gates.history import (
    CompareSpec,
    Comparison,
    HistoryError,
    append,
    compare,
    make_record,
    measured_anything,
    parse_compare_specs,
    render_comparison,
    resolve,
)


class CompareSpecError(ValueError):
    """A malformed ``--h2o-compare-fail`` spec (the caller names where the setting came from)."""


@dataclass
class HistorySetup:
    """The store (None: off), the previous run (or why there is none) and the fail specs."""

    store: Path | None
    root: Path
    specs: list[CompareSpec] = field(default_factory=list)
    ref: str | None = None
    previous: dict[str, Any] | None = None
    missing: str = ""
    comparisons: list[Comparison] | None = None
    _record: dict[str, Any] | None = None

    @classmethod
    def from_settings(cls, store: Path | None, ref: str | None, fail: str | None, preset: str,
                      root: Path, workload: Mapping[str, Any] | None = None) -> HistorySetup:
        """Resolve ``ref`` now (before this run is appended) to a complete stored run of ``preset`` whose
        workload is comparable with ``workload`` (what this run will measure; None: not known yet, then
        checked when comparing). ``--h2o-compare-fail`` alone compares with ``latest``.

        ValueError (a usage error) for a malformed spec, a compare with the store off, and a commit,
        path or malformed ref that names no comparable run (the message lists the comparable ones and
        the store). ``latest`` finding nothing is not an error: ``missing`` says why (empty store, or
        why the newest run of the preset is not comparable) and the compare items skip."""
        try:
            specs = parse_compare_specs([fail]) if fail else []
        except ValueError as exc:
            raise CompareSpecError(str(exc)) from None
        ref = (ref or "").strip() or ("latest" if specs else None)
        setup = cls(store, root, specs, ref)
        if ref is None:
            return setup
        if store is None and not ref.endswith(".json"):
            raise ValueError(f"--h2o-compare {ref}: the history store is off (--h2o-history off); "
                             "give a record file (*.json) or turn the store on")
        try:
            setup.previous = resolve(store, ref, preset=preset, workload=workload)
        except HistoryError as exc:
            if ref != "latest":
                raise ValueError(f"--h2o-compare {ref}: {exc}") from None
            setup.missing = str(exc)
        return setup

    def record(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """This run's history record (made once per process)."""
        if self._record is None:
            self._record = make_record(report, self.root)
        return self._record

    def compare(self, report: Mapping[str, Any], specs: list[CompareSpec]) -> list[Comparison]:
        """This run against the previous one (which must exist) under ``specs``."""
        assert self.previous is not None
        return compare(self.record(report), self.previous, specs)

    def finish(self, report: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Write ``comparison.md`` (when comparing) and append this run to the store, the written paths.
        A run that measured nothing (fatal, or no configuration measured) is not stored; a partial one
        is, marked incomplete (never a compare target)."""
        written = []
        if self.previous is not None:
            self.comparisons = self.compare(report, self.specs or parse_compare_specs(["*:0"]))
            path = out_dir / "comparison.md"
            path.write_text(self.comparison_text() + "\n", encoding="utf-8")
            written.append(path)
        if self.store is not None and measured_anything(self.record(report)):
            written.append(append(self.store, self.record(report)))
        return written

    def comparison_text(self) -> str | None:
        """The comparison as markdown, why there is none, or None when not comparing."""
        if self.ref is None:
            return None
        if self.previous is None:
            return f"history compare ({self.ref}): nothing to compare with: {self.missing}"
        prev = self.previous
        title = (f"Compared with {prev.get('git', {}).get('commit', 'unknown')[:10]} "
                 f"({prev.get('timestamp', '?')}, asked for {self.ref})")
        return render_comparison(self.comparisons or [], title)
