"""A gate session: the ``--h2o-preset`` run inside pytest (collection, progress, reports, junit
properties, history). Imported by :mod:`.plugin` only when a gate is asked for, so a pytest run
without one loads none of it (no numpy, no model code).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from h2o_gates.gate_report import write_reports
from h2o_gates.rules import Thresholds
from h2o_kernels.config_keys import ConfigError
from h2o_kernels.model.loading import ModelSpecError, model_config
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import check_text_file
from h2o_kernels.runtimes.registry import (
    CPU_TORCH_HINT,
    HF_INSTALL,
    RuntimeUnavailableError,
    check_cuda,
    check_press_config,
)
from h2o_presets.matrix import PresetError, load_preset, preset_settings
from pytest_h2o.compare import CompareSpecError, HistorySetup
from pytest_h2o.gate import Gate, GateSetupError, load_points
from pytest_h2o.gate_run import IN_PROCESS, RunSpec
from pytest_h2o.items import PresetCollector, node_name
from pytest_h2o.options import SETTINGS, raw_setting, resolve
from pytest_h2o.summary import junit_properties, terminal_lines

DEFAULT_MAX_ROUNDS = 10


def start(config: pytest.Config) -> GatePlugin:
    """Set up the gate of this session and register its hooks (and the xdist hand-over)."""
    _refuse_spaced_outside_paths(config)
    plugin = GatePlugin(config)
    config.pluginmanager.register(plugin, "h2o-gate")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(plugin), "h2o-gate-xdist")
    return plugin


def _refuse_spaced_outside_paths(config: pytest.Config) -> None:
    """``--h2o-logs /elsewhere`` (a space, not ``=``): pytest chooses rootdir and the ini file before it
    knows plugin options, so it takes an existing path after the flag for a test path. Outside the
    invocation folder that moves rootdir away from the project and silently drops its ini settings
    (thresholds, history): refuse it and say how to write it."""
    args, here = config.invocation_params.args, config.invocation_params.dir
    flags = {s.flag for s in SETTINGS}
    for flag, value in zip(args, args[1:]):
        path = Path(value).expanduser()
        if flag in flags and path.exists() and not path.resolve().is_relative_to(here.resolve()):
            raise pytest.UsageError(f"{flag} {value}: write {flag}={value}; pytest reads a separate value that is an "
                                    "existing path as a test path when it picks rootdir and the ini file, so the "
                                    "project's settings would be ignored")


class _XdistHooks:
    """Hands the controller's run folder to every worker."""

    def __init__(self, plugin: GatePlugin) -> None:
        self.plugin = plugin

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["h2o_out"] = str(self.plugin.gate.out_dir)
        node.workerinput["h2o_gate_only"] = self.plugin.gate_only


class GatePlugin:
    """The session's gate: collection, progress, reports, junit properties and history."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.is_worker = hasattr(config, "workerinput")
        self.report: dict[str, Any] | None = None
        self.written: list[Path] = []
        self._done = threading.Event()
        self._tailer: threading.Thread | None = None
        self._after_progress = False  # progress lines were written since pytest last wrote an outcome
        # a preset without explicit test paths gates alone (xdist workers get the controller's choice)
        self.gate_only = (config.workerinput["h2o_gate_only"] if self.is_worker
                          else config.args_source != pytest.Config.ArgsSource.ARGS)
        overrides = {s.config_key: value for s in SETTINGS if s.config_key
                     and (value := resolve(config, s.name)) is not None}
        self.runtime = _runtime_kind(lambda name: resolve(config, name))
        try:
            preset_path, self.points = load_points(resolve(config, "h2o_preset"), overrides, self.runtime)
            self.preset_settings = preset_settings(load_preset(preset_path))
        except (GateSetupError, PresetError) as exc:
            raise pytest.UsageError(f"{raw_setting(config, 'h2o_preset')[1]}: {exc}") from None
        thresholds = self._thresholds()
        self.gate_preset = preset_path
        self.gate = Gate(preset_path, self.points, thresholds, resolve(config, "h2o_gate_mode"),
                         self._spec(config, thresholds), progress=self._progress, strict=resolve(config, "h2o_strict"))
        self.gate.workload = self.workload
        self.history = self._history_setup()
        if not self.is_worker:
            try:
                self.gate.claim()
            except GateSetupError as exc:
                raise pytest.UsageError(str(exc)) from None

    # settings ------------------------------------------------------------------------------------
    def _setting(self, name: str) -> Any:
        """A setting from the option, ini key or environment, else the preset (:data:`PRESET_SETTINGS`), else
        its default."""
        if raw_setting(self.config, name)[0] is None and name in self.preset_settings:
            return self.preset_settings[name]
        return resolve(self.config, name)

    def _fidelity_texts(self, thresholds: Thresholds, text_file: Path | None) -> tuple[str, ...]:
        """The fidelity suite's texts (the first one the gate's own text), or none: the suite runs when a
        fidelity limit is set or its size is given; otherwise fidelity is measured on the gate's text alone."""
        from h2o_kernels.fidelity import DEFAULT_SUITE_SIZE, SUITE_TEXTS

        gated = thresholds.min_top1 is not None or thresholds.max_ppl_delta is not None
        size = self._setting("h2o_fidelity_texts") or (DEFAULT_SUITE_SIZE if gated else 0)
        names = list(SUITE_TEXTS[:size])
        if names and text_file is not None:
            names[0] = str(text_file)
        return tuple(names)

    def _thresholds(self) -> Thresholds:
        r = self._setting
        return Thresholds(lossy_target=r("h2o_lossy_target"), lossless_target=r("h2o_lossless_target"),
                          decode_drop_target=r("h2o_decode_drop_target"), decode_baseline=r("h2o_decode_baseline"),
                          require_runtime_decomp=r("h2o_require_runtime_decomp"),
                          max_queue_peak=r("h2o_max_queue_peak"), max_fallback=r("h2o_max_fallback"),
                          min_top1=r("h2o_min_top1"), max_ppl_delta=r("h2o_max_ppl_delta"),
                          undecided=r("h2o_undecided"))

    def _spec(self, config: pytest.Config, thresholds: Thresholds) -> RunSpec:
        r = lambda name: resolve(config, name)  # noqa: E731
        if self.is_worker:
            out = Path(config.workerinput["h2o_out"])
        else:
            out = r("h2o_out") or (config.invocation_params.dir / ".h2o" / "runs" /
                                   f"{time.strftime('%Y%m%d-%H%M%S', time.localtime())}-{os.getpid()}")
        llm_bench, base, logs = r("h2o_llm_bench"), r("h2o_base_config"), r("h2o_logs")
        if bool(llm_bench) != bool(base):
            raise pytest.UsageError("--h2o-llm-bench and --h2o-base-config go together")
        runtime, device = self.runtime, r("h2o_device")
        if device != "cpu" and runtime != "hf":
            raise pytest.UsageError(f"--h2o-device {device}: only the hf runtime (--h2o-runtime hf) runs on {device}; "
                                    f"the {runtime} runtime runs on the CPU")
        if runtime == "hf":
            _check_hf(device, str(self.gate_preset), self.points)
        for name, path in (("--h2o-base-config", base), ("--h2o-logs", logs), ("--h2o-kv-dumps", r("h2o_kv_dumps")),
                           ("--h2o-text-file", r("h2o_text_file"))):
            if path is not None and not Path(path).exists():
                raise pytest.UsageError(f"{name} {path}: no such file or directory")
        model = r("h2o_model")
        if runtime in IN_PROCESS:
            self._check_model(model, runtime)
        text = r("h2o_text_file")
        if text is not None and not Path(text).is_file():
            raise pytest.UsageError(f"--h2o-text-file {text}: not a file; expected a UTF-8 text file")
        try:
            check_text_file(text, "--h2o-text-file")  # readable UTF-8, as the command line checks it
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        if llm_bench:
            local = config.invocation_params.dir / llm_bench
            if local.is_file():
                llm_bench = str(local)
            elif shutil.which(llm_bench) is None:
                raise pytest.UsageError(f"--h2o-llm-bench {llm_bench}: no such file, and not a command on PATH")
        rounds = r("h2o_rounds") or max(p.repeat for p in self.points)
        max_rounds = r("h2o_max_rounds") or max(DEFAULT_MAX_ROUNDS, rounds)
        if rounds > max_rounds:
            raise pytest.UsageError(f"--h2o-max-rounds {max_rounds} is below the minimum rounds {rounds} "
                                    "(--h2o-rounds, or the preset's repeat): the cap must be at least the minimum")
        if runtime == "logs" and (r("h2o_rounds") or r("h2o_max_rounds")):
            raise pytest.UsageError("--h2o-rounds and --h2o-max-rounds pace the runs of a runtime; --h2o-logs gates "
                                    "logs that exist and runs nothing")
        cluster = r("h2o_cluster")
        if cluster is not None:
            _check_cluster(f"{raw_setting(config, 'h2o_cluster')[1]} {cluster}", runtime)
        if r("h2o_inject_slowdown") and runtime not in IN_PROCESS:
            raise pytest.UsageError("--h2o-inject-slowdown works inside an in-process runtime's decode loop; "
                                    f"the {runtime} runtime has none")
        return RunSpec(runtime, Path(out), model=model, threads=r("h2o_threads"), device=device,
                       text_file=r("h2o_text_file"), kv_dumps=r("h2o_kv_dumps"), llm_bench=llm_bench,
                       base_config=base, logs=logs, rounds=rounds, max_rounds=max_rounds,
                       drop_target=r("h2o_decode_drop_target"),
                       fixed_baseline=r("h2o_decode_baseline"), inject_slowdown=r("h2o_inject_slowdown"),
                       fidelity_texts=self._fidelity_texts(thresholds, r("h2o_text_file")), cluster=cluster)

    def _check_model(self, model: str, runtime: str) -> None:
        """The model file exists and is sound, and every configuration's prompt + gen fits its context
        and this machine's memory: a usage error now rather than a failure after measuring. A transformers
        model folder (hf) is checked from its config.json (transformers checks the weights when it loads them)."""
        try:
            if runtime == "hf" and Path(model).is_dir():
                from h2o_kernels.runtimes.hf import folder_model_config

                config = folder_model_config(Path(model), "--h2o-model")
            else:
                config = model_config(model, "--h2o-model")
            for p in self.points if config is not None else []:
                check_run_fits(config, p.prompt_tokens, p.gen_tokens, f"--h2o-model {model}, {p.label}")
        except (ModelSpecError, RunTooLargeError) as exc:
            raise pytest.UsageError(str(exc)) from None

    @functools.cached_property
    def workload(self) -> dict[str, Any]:
        """What is measured, for comparing only like with like: runtime, model, text (and its sha256),
        threads, the KV dumps, fixed decode baseline and cluster when given, and each configuration's prompt/gen
        sizes and ``kv_*`` config (overrides included, as a sha256 of its JSON)."""
        spec = self.gate.spec
        model = {"reference": spec.model, "hf": f"{spec.model} ({spec.device})",
                 "llm-bench": f"{spec.llm_bench} {spec.base_config}", "logs": str(spec.logs)}[spec.runtime]
        if spec.text_file is not None:
            text, data = str(spec.text_file), Path(spec.text_file).read_bytes()
        else:
            from h2o_kernels.model.kv_capture import default_text

            text, data = "pydoc_data.topics", default_text().encode()
        return {"runtime": spec.runtime, "model": str(model), "text": text,
                "text_sha256": hashlib.sha256(data).hexdigest(), "threads": spec.threads,
                "kv_dumps": str(spec.kv_dumps) if spec.kv_dumps else None, "decode_baseline": spec.fixed_baseline,
                "sizes": {p.label: [p.prompt_tokens, p.gen_tokens] for p in self.points},
                "configs": {p.label: hashlib.sha256(json.dumps(p.config, sort_keys=True).encode()).hexdigest()[:16]
                            for p in self.points},
                **({"fidelity_texts": list(spec.fidelity_texts)} if spec.fidelity_texts else {}),
                **({"cluster": spec.cluster} if spec.cluster else {})}

    def _history_setup(self) -> HistorySetup:
        r = lambda name: resolve(self.config, name)  # noqa: E731
        target = r("h2o_compare")
        if target is not None and (Path(target).is_dir() or target.endswith(".py")):
            raise pytest.UsageError(f"--h2o-compare {target}: a test path, not a stored run (the option's value is "
                                    "optional); write --h2o-compare=latest, a commit or a record path, or put test "
                                    "paths before the option")
        try:
            return HistorySetup.from_settings(r("h2o_history"), r("h2o_compare"), r("h2o_compare_fail"),
                                              self.gate.name, self.config.rootpath, workload=self.workload)
        except CompareSpecError as exc:
            raise pytest.UsageError(f"{raw_setting(self.config, 'h2o_compare_fail')[1]}: {exc}") from None
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None

    # collection ----------------------------------------------------------------------------------
    def pytest_ignore_collect(self, collection_path: Path, config: pytest.Config) -> bool | None:
        """With a preset and no explicit test paths, the run is the gate alone (not the testpaths)."""
        return True if self.gate_only else None

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, items: list[pytest.Item]) -> None:
        name = node_name(self.gate)
        collector = PresetCollector.from_parent(session, name=name, nodeid=name, gate=self.gate, history=self.history)
        items.extend(session.genitems(collector))  # with collect reports, as if found on disk

    # progress ------------------------------------------------------------------------------------
    def _progress(self, line: str) -> None:
        if self.is_worker:
            return  # the controller tails progress.log
        capman = self.config.pluginmanager.getplugin("capturemanager")
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        # the reporter's write_line starts a fresh line (not after a -v item's name) and has pytest
        # write that item's name again with its outcome
        write = reporter.write_line if reporter is not None else self.config.get_terminal_writer().line
        if capman is not None:
            with capman.global_and_fixture_disabled():
                write(f"[h2o] {line}")
        else:
            write(f"[h2o] {line}")
        self._after_progress = True

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """After progress lines, name the item's file again before pytest writes its outcome letter
        (``-v`` names the item by itself)."""
        reporter = self.config.pluginmanager.getplugin("terminalreporter")
        if self._after_progress and report.when == "call" and reporter is not None:
            if self.config.get_verbosity() <= 0:
                reporter.write_fspath_result(report.nodeid, "")
            self._after_progress = False

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if not self.is_worker and getattr(self.config.option, "numprocesses", None):
            self._tailer = threading.Thread(target=_tail, args=(self.gate.out_dir / "progress.log", self._done),
                                            daemon=True)
            self._tailer.start()

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self.gate.release()

    # reports -------------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        """Controller only, before junitxml writes its file: reports, junit properties, history."""
        self._done.set()
        if self._tailer is not None:
            self._tailer.join(timeout=5)  # its last lines before the summary
        if self.is_worker or not self.gate.measured():
            return
        self.report = self.gate.report()
        self.written = write_reports(self.report, self.gate.out_dir)
        for name, value in junit_properties(self.report):
            _add_testsuite_property(self.config, name, value)
        self.written += self.history.finish(self.report, self.gate.out_dir)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.report is None:
            return
        terminalreporter.write_sep("=", "h2o gate")
        for line in terminal_lines(self.report, self.history.comparison_text()):
            terminalreporter.write_line(line)
        out = self.gate.out_dir
        terminalreporter.write_line(f"reports in {out}: " + ", ".join(
            str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for p in self.written))


def _add_testsuite_property(config: pytest.Config, name: str, value: object) -> None:
    """What ``record_testsuite_property`` does, from a hook: a ``<property>`` of the junit
    ``<testsuite>`` (valid under every junit_family)."""
    for plugin in config.pluginmanager.get_plugins():
        if callable(getattr(plugin, "add_global_property", None)):
            plugin.add_global_property(name, value)


def _tail(path: Path, done: threading.Event) -> None:
    """Print a worker's progress lines on the controller's terminal while xdist runs, and the last
    ones once the session is done."""
    position = 0
    while True:
        finished = done.wait(1.0)
        if path.is_file():
            with open(path, "rb") as handle:
                handle.seek(position)
                data = handle.read()
            complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next read
            position += len(complete)
            for line in complete.decode("utf-8", "replace").splitlines():
                sys.stderr.write(f"[h2o] {line}\n")
        if finished:
            return


def _runtime_kind(r: Callable[[str], Any]) -> str:
    """The runtime the settings ask for: ``--h2o-runtime``, else llm_bench with ``--h2o-llm-bench``, ``logs`` with
    ``--h2o-logs``, else the reference runtime; a usage error for a contradiction."""
    chosen, llm_bench, logs = r("h2o_runtime"), r("h2o_llm_bench"), r("h2o_logs")
    if logs:
        if llm_bench:
            raise pytest.UsageError("--h2o-llm-bench and --h2o-logs are alternatives; give one")
        if chosen:
            raise pytest.UsageError(f"--h2o-logs gates llm_bench logs that exist and runs no runtime; drop "
                                    f"--h2o-runtime {chosen}")
        return "logs"
    if chosen == "llm-bench" or (chosen is None and llm_bench):
        if not llm_bench:
            raise pytest.UsageError("--h2o-runtime llm-bench: name the binary with --h2o-llm-bench (and the model's "
                                    "config with --h2o-base-config)")
        return "llm-bench"
    if llm_bench:
        raise pytest.UsageError(f"--h2o-llm-bench runs the llm-bench runtime, not --h2o-runtime {chosen}; give one")
    return chosen or "reference"


def _check_cluster(given: str, runtime: str) -> None:
    """The cluster setting (``given``: where it was set and its value) needs the ray extra and a runtime that runs
    something: a usage error saying which."""
    import importlib.util

    from pytest_h2o.cluster import RAY_INSTALL

    if runtime == "logs":
        raise pytest.UsageError(f"{given} spreads runtime runs over workers; --h2o-logs gates logs that exist and "
                                "runs nothing: drop one of them")
    if importlib.util.find_spec("ray") is None:
        raise pytest.UsageError(f"{given} needs Ray: {RAY_INSTALL}")


def _check_hf(device: str, preset: str, points: list[Any]) -> None:
    """The hf runtime's extra is installed, ``device`` is there and every configuration's press exists: a usage
    error saying what to install or fix."""
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"--h2o-runtime hf needs {' and '.join(missing)}: {HF_INSTALL}; {CPU_TORCH_HINT}")
    try:
        if device == "cuda":
            check_cuda()
        for point in points:
            check_press_config(point.config, f"--h2o-preset {preset} ({point.label})")
    except (RuntimeUnavailableError, ConfigError) as exc:
        raise pytest.UsageError(str(exc).replace("device cuda:", "--h2o-device cuda:")) from None

