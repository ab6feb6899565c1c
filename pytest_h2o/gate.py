"""One gate run inside a pytest session: the preset's points, the thresholds, and the measurement,
run once per session however many items and xdist workers ask for it.

The first process that needs numbers takes a file lock in the run folder, measures every
configuration and writes ``results.json``; every other process (and every later item) reads that file.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from h2o_gates.gate_report import build_report
from h2o_gates.rules import GateMode, Thresholds
from h2o_kernels.config_keys import ConfigError
from h2o_kernels.lossless.manager import LosslessConfig
from h2o_kernels.runtimes.base import check_config
from h2o_presets.matrix import Point, PresetError, expand, find_preset, load_preset
from pytest_h2o.gate_run import RunSpec, measure

RESULTS = "results.json"


class GateSetupError(ValueError):
    """The gate cannot be set up (bad preset, bad option); the message names the file or option."""


@dataclass
class Gate:
    """A preset turned into configurations, with the thresholds and where to measure."""

    preset_path: Path
    points: list[Point]
    thresholds: Thresholds
    mode: GateMode
    spec: RunSpec
    progress: Callable[[str], None] = print
    strict: bool = False  # every configuration must pass every rule
    workload: dict[str, Any] = field(default_factory=dict)  # what is measured (history compares like with like)
    _results: dict[str, Any] | None = None
    _owner: FileLock | None = None
    _created: Path | None = None  # the outermost folder claim() made (removed again if nothing was measured)
    _t0: float = 0.0

    @property
    def name(self) -> str:
        return self.preset_path.name

    @property
    def codec_profiles(self) -> list[str]:
        """The codec profiles the configurations' ``kv_lossless_codec_runtime`` name, in first-use order."""
        return list(dict.fromkeys(LosslessConfig.from_config(p.config, p.label).profile for p in self.points))

    @property
    def out_dir(self) -> Path:
        return self.spec.out_dir

    def results(self) -> dict[str, Any]:
        """The measured numbers, measuring first if no process has yet (under the run folder's lock)."""
        if self._results is None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / RESULTS
            with FileLock(str(self.out_dir / ".measure.lock")):
                if not path.is_file():
                    self._write_atomic(path, self._measure())
            self._results = json.loads(path.read_text(encoding="utf-8"))
        return self._results

    def claim(self) -> None:
        """Hold the run folder for this session (the controller calls this once, before measuring).

        GateSetupError when the folder cannot be made, another session holds it, or it holds anything
        (an earlier run's results, or what an interrupted one left): two sessions never mix or overwrite
        each other's numbers and reports."""
        where = f"--h2o-out {self.out_dir}"
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise GateSetupError(f"{where} is a file; give a new or empty folder for the reports")
        self._created = next((p for p in (self.out_dir, *self.out_dir.parents) if p.parent.exists()), None) \
            if not self.out_dir.exists() else None
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._owner = FileLock(str(self.out_dir / ".session.lock"))
            self._owner.acquire(timeout=0)
        except Timeout:
            raise GateSetupError(f"{where}: another pytest session is writing there; give each session its own "
                                 "folder (the default is a fresh .h2o/runs/<timestamp>-<pid>)") from None
        except OSError as exc:
            raise GateSetupError(f"{where}: cannot create or lock the report folder ({exc.strerror or exc}); "
                                 "choose a writable folder") from None
        earlier = sorted(p.name for p in self.out_dir.iterdir() if p.name != ".session.lock")
        if earlier:
            self.release()
            raise GateSetupError(f"{where} is not empty ({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''}"
                                 "): it holds an earlier run; choose a new or empty folder, or remove that one "
                                 "(the default is a fresh .h2o/runs/<timestamp>-<pid>)")

    def release(self) -> None:
        """Let go of the run folder (end of session) and remove its lock files; remove the folder too if
        this session made it and measured nothing there (``--collect-only``): no empty run folders."""
        if self._owner is not None:
            self._owner.release()
            self._owner = None
            for lock in (".measure.lock", ".session.lock"):  # the session is over: the folder holds reports only
                (self.out_dir / lock).unlink(missing_ok=True)
            if self._created is not None and not any(self.out_dir.iterdir()):
                for folder in (self.out_dir, *self.out_dir.parents):
                    try:
                        folder.rmdir()
                    except OSError:  # something else put a file there meanwhile: keep it
                        break
                    if folder == self._created:
                        break

    def measured(self) -> bool:
        """Whether some process of this session has written the results."""
        return (self.out_dir / RESULTS).is_file()

    def report(self) -> dict[str, Any]:
        """The gate report (verdicts per configuration and overall) over the measured numbers."""
        results = self.results()
        missing = {"error": _first_line(results.get("fatal")) or "not measured"}
        rows = {p.label: results["configs"].get(p.label, missing) for p in self.points}
        meta = {"preset": self.name, "preset_path": str(self.preset_path), "runtime": results.get("runtime"),
                "device": results.get("device"), "model": results.get("model"), "out_dir": str(self.out_dir),
                "started": results.get("started"),
                "elapsed_s": results.get("elapsed_s"), "warnings": results.get("warnings", []),
                "fatal": results.get("fatal"), "nodes": results.get("nodes"), "cluster": self.spec.cluster,
                "workload": self.workload, "rounds": self.spec.rounds, "max_rounds": self.spec.max_rounds,
                "inject_slowdown": self.spec.inject_slowdown, "strict": self.strict}
        return build_report(rows, self.thresholds, self.mode, results.get("baselines", {}), meta)

    def _measure(self) -> dict[str, Any]:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._t0 = t0 = time.perf_counter()
        try:
            results = measure(self.points, self.spec, self._progress)
        except Exception as exc:  # noqa: BLE001 - one failure must fail every item with its reason, not crash
            (self.out_dir / "measure_error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            results = {"fatal": f"{type(exc).__name__}: {exc}", "configs": {}, "baselines": {}, "warnings": []}
        results.update(started=started, elapsed_s=time.perf_counter() - t0)
        return results

    def _progress(self, line: str) -> None:
        line = f"{time.perf_counter() - self._t0:6.1f}s {line}"
        with open(self.out_dir / "progress.log", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self.progress(line)

    @staticmethod
    def _write_atomic(path: Path, data: dict[str, Any]) -> None:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _first_line(fatal: str | None) -> str | None:
    """A whole-run failure's first line, for each configuration's items (the full text, a hint
    included, is shown once: in the terminal summary and ``summary.md``)."""
    if fatal is None or "\n" not in fatal:
        return fatal
    return fatal.split("\n", 1)[0] + " (in full under 'h2o gate')"


def load_points(preset: str | Path, overrides: dict[str, Any], runtime: str = "reference") -> tuple[Path, list[Point]]:
    """Find, validate and expand a preset, apply ``kv_*`` overrides, and check every configuration's
    keys for ``runtime``; GateSetupError names the file and the key."""
    try:
        path = find_preset(preset)
        points = expand(load_preset(path), str(path))
    except PresetError as exc:
        raise GateSetupError(str(exc)) from None
    if overrides:
        points = [replace(p, config={**p.config, **overrides}) for p in points]
    for point in points:
        try:
            check_config(point.config, f"{path} ({point.label})", point.extra_kv_keys, runtime)
        except ConfigError as exc:
            raise GateSetupError(str(exc)) from None
    return path, points
