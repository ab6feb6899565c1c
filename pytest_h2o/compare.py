"""History in a gate session: the stored run to compare with (resolved before this run is stored),
the comparisons, and appending this run to the store at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from gates.history import (CompareSpec, Comparison, HistoryError, append, compare, make_record, parse_compare_specs,
                           render_comparison, resolve)


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
                      root: Path) -> HistorySetup:
        """Resolve ``ref`` now (before this run is appended); ``--h2o-compare-fail`` alone compares
        with ``latest``. ValueError for a malformed spec; an empty store is not an error (the
        comparison items skip, saying so)."""
        specs = parse_compare_specs([fail]) if fail else []
        ref = ref or ("latest" if specs else None)
        setup = cls(store, root, specs, ref)
        if ref is None:
            return setup
        if store is None and not ref.endswith(".json"):
            raise ValueError(f"--h2o-compare {ref}: the history store is off (--h2o-history off)")
        try:
            setup.previous = resolve(store or Path("."), ref, preset=preset)
        except HistoryError as exc:
            setup.missing = str(exc)
        return setup

    def record(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """This run's history record (made once per process)."""
        if self._record is None:
            self._record = make_record(report, self.root)
        return self._record

    def compare(self, report: Mapping[str, Any], specs: list[CompareSpec]) -> list[Comparison]:
        assert self.previous is not None
        return compare(self.record(report), self.previous, specs)

    def finish(self, report: Mapping[str, Any], out_dir: Path) -> list[Path]:
        """Write ``comparison.md`` (when comparing) and append this run to the store."""
        written = []
        if self.previous is not None:
            self.comparisons = self.compare(report, self.specs or parse_compare_specs(["*:0"]))
            path = out_dir / "comparison.md"
            path.write_text(self.comparison_text() + "\n", encoding="utf-8")
            written.append(path)
        if self.store is not None:
            written.append(append(self.store, self.record(report)))
        return written

    def comparison_text(self) -> str | None:
        if self.ref is None:
            return None
        if self.previous is None:
            return f"history compare ({self.ref}): nothing to compare with: {self.missing}"
        prev = self.previous
        title = (f"Compared with {prev.get('git', {}).get('commit', 'unknown')[:10]} "
                 f"({prev.get('timestamp', '?')}, asked for {self.ref})")
        return render_comparison(self.comparisons or [], title)
