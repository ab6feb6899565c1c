"""Measure a preset's configurations: the numbers the gate rules read, one metric row per configuration.

Runtimes (:mod:`h2o_kernels.runtimes`), all measured in paired, adaptive rounds (:class:`_Session`): every
candidate run sits next to baseline runs (H2O and lossless off), each configuration runs until its
decode-drop interval is decided or the rounds cap is reached.
- ``reference`` (default) and ``hf`` (transformers), in process: the first run of each configuration also
  keeps its logits (fidelity against the baseline's) and writes its held KV as dumps; identical dump files
  are then stored once.
- ``llm-bench``: the external llm_bench binary, one call per run with the original's arguments (``-rep 1``:
  the rounds do the repeating); speeds and the policies' metrics only (no logits, no dumps).
- ``logs``: llm_bench logs (or a CSV of parsed rows) that already exist, matched to points by run id.

Lossless ratios come from the offline online-sim (``chunked_grouped``, 192-token chunks, 8 framing bytes,
the runtime codec) over each configuration's own dumps, or over ``kv_dumps`` when given; dumps with the
same content are coded once.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from h2o_gates.bench_log import BenchRow, size_text, write_log
from h2o_gates.log_parse import find_logs, metric_row, parse_logs_report, read_csv, summarize_problems
from h2o_gates.rules import Thresholds, paired_drop
from h2o_gates.speed_stats import bracketed_log_ratios
from h2o_kernels.eviction.h2o import H2OConfig
from h2o_kernels.fidelity import fidelity
from h2o_kernels.lossless.kvdump import link_identical
from h2o_kernels.lossless.manager import LosslessConfig
from h2o_kernels.lossless.offline_eval import EvalOptions, SelectionError, evaluate
from h2o_kernels.model.run_memory import check_run_fits
from h2o_kernels.runtimes.base import RunFailedError, Runtime, run_tokens
from h2o_kernels.runtimes.llm_bench import KIND as LLM_BENCH
from h2o_kernels.runtimes.registry import IN_PROCESS, open_runtime
from h2o_presets.matrix import Point
from pytest_h2o.fidelity_suite import Suite, SuiteText, read_texts, row_metrics, suite_tokens
from pytest_h2o.machine import machine_info

BASELINE_CONFIG = {"kv_h2o_enable": False, "kv_lossless_enable": False}
ONLINE_SIM = dict(entry_mode="chunked_grouped", online_chunk_seq=192, online_framing_bytes=8, adaptive_block_seq=64,
                  zstd_level=3, stage="both")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """Where and how to measure (plain data, so it can be handed to xdist workers)."""

    runtime: str  # a runtime kind ("reference" | "hf" | "llm-bench", :func:`open_runtime`) or "logs" (runs none)
    out_dir: Path
    model: str = "smollm2"
    threads: int = 1
    device: str = "cpu"  # hf: cpu | cuda
    text_file: Path | None = None
    kv_dumps: Path | None = None
    llm_bench: str | None = None
    base_config: Path | None = None
    logs: Path | None = None
    rounds: int = 3  # minimum measured rounds per configuration (the preset's repeat when not set)
    max_rounds: int = 10  # cap of the adaptive rounds
    drop_target: float = 0.05  # decode_pass target the adaptive rounds decide against
    fixed_baseline: float | None = None  # --h2o-decode-baseline (tok/s)
    inject_slowdown: float = 0.0  # added to every candidate decode step, as a fraction of the baseline's step
    fidelity_texts: tuple[str, ...] = ()  # the fidelity suite (the first: the gate's text); none: that text alone
    cluster: str | None = None  # --h2o-cluster: ray://HOST:PORT or local:N (pytest_h2o.cluster); None: this machine


def measure(points: list[Point], spec: RunSpec, progress: Progress) -> dict[str, Any]:
    """Measure every point; returns ``{"runtime", "model", "configs": {label: metrics}, "baselines":
    {label: tok/s or None}, "nodes": [...], "warnings": [...]}`` (JSON-serialisable).

    On one machine the points are one group (:func:`measure_part`); with ``spec.cluster`` they are split
    into groups that Ray workers measure with the same function (:mod:`pytest_h2o.cluster`). ``nodes`` says
    which worker measured which configurations, on which machine (:func:`~pytest_h2o.machine.machine_info`),
    against which baselines."""
    if spec.cluster:
        from pytest_h2o.cluster import measure_on_cluster

        parts = measure_on_cluster(points, spec, progress)
    else:
        parts = [{**measure_part(points, spec, progress), "worker": "local", "ip": None, "machine_info": machine_info(),
                  "out_dir": str(spec.out_dir)}]
    warnings = [line for part in parts for line in part["warnings"]]
    if spec.fidelity_texts and spec.runtime == LLM_BENCH:
        warnings.append(f"[WARN] the fidelity suite ({len(spec.fidelity_texts)} texts) needs logits; the llm_bench "
                        "runtime keeps none, so no configuration has fidelity numbers")
    elif spec.fidelity_texts and spec.runtime not in IN_PROCESS:
        warnings.append(f"[WARN] the fidelity suite ({len(spec.fidelity_texts)} texts) runs on an in-process runtime "
                        f"({', '.join(IN_PROCESS)}) only; the {spec.runtime} runtime's fidelity numbers, if any, are "
                        "of one text")
    if spec.kv_dumps is not None:
        warnings.append(f"[WARN] the lossless ratios of every configuration come from the same --h2o-kv-dumps "
                        f"{spec.kv_dumps}, not from the KV each configuration held")
    configs = {label: row for part in parts for label, row in part["configs"].items()}
    baselines = {label: value for part in parts for label, value in part["baselines"].items()}
    model = next((part["model"] for part in parts if part.get("model")), None)
    return {"runtime": spec.runtime, "device": spec.device if spec.runtime in IN_PROCESS else None, "model": model,
            "configs": {p.label: configs[p.label] for p in points if p.label in configs},
            "baselines": baselines, "nodes": [_node_entry(part, points) for part in parts], "warnings": warnings}


def measure_part(points: list[Point], spec: RunSpec, progress: Progress) -> dict[str, Any]:
    """What one machine measures of ``points``, in ``spec.out_dir``: the runtime runs with their own baseline
    runs (or the logs), identical dumps linked, then the online-sim per configuration. Returns ``{"model",
    "configs", "baselines", "warnings"}``. A single-machine run calls it once with every point; each Ray
    worker calls it with its group (:mod:`pytest_h2o.cluster`)."""
    warnings: list[str] = []
    if spec.runtime != "logs":
        configs, baselines, model = _run_runtime(points, spec, progress, warnings)
        if (spec.out_dir / "kv").is_dir():  # identical dumps (the layers no configuration evicts) stored once
            linked, saved = link_identical(spec.out_dir / "kv")
            progress(f"KV dumps: {linked} files identical to another configuration's stored once "
                     f"({saved / 1e6:.1f} MB saved)")
    else:
        configs, baselines, model = _read_logs(points, spec, warnings)
    coded: dict[Any, dict[int, tuple[int, int]] | None] = {}  # online-sim results by dump content
    for point in points:
        row = configs[point.label]
        if "error" not in row:
            _add_lossless(row, point, spec, warnings, progress, coded)
    return {"model": model, "configs": configs, "baselines": baselines, "warnings": warnings}


def _node_entry(part: dict[str, Any], points: list[Point]) -> dict[str, Any]:
    """A worker's line of the report: who, where (machine), what it measured and its baselines per size
    (median decode tok/s of its own baseline runs), and why it has no numbers (``error``) if so."""
    labels = [p.label for p in points if p.label in part["configs"]]
    sizes = {p.label: f"p{p.prompt_tokens}_g{p.gen_tokens}" for p in points}
    by_size = {sizes[label]: part["baselines"][label] for label in labels if part["baselines"].get(label) is not None}
    return {"worker": part["worker"], "ip": part["ip"], "machine_info": part["machine_info"], "configs": labels,
            "baselines": by_size, "out_dir": part.get("out_dir"),
            **{key: part[key] for key in ("note", "error") if part.get(key)}}


# runtimes (reference, hf, llm-bench) ---------------------------------------------------------------
def _run_runtime(points: list[Point], spec: RunSpec, progress: Progress, warnings: list[str]):
    kind = spec.runtime
    if kind == LLM_BENCH:
        progress(f"llm_bench {spec.llm_bench}" + (f" with {spec.base_config}" if spec.base_config else ""))
        if spec.text_file is not None:
            warnings.append(f"[WARN] --h2o-text-file {spec.text_file} is not used: llm_bench feeds its own prompt "
                            "(token 16 repeated)")
        runtime = open_runtime(kind, threads=spec.threads, binary=str(spec.llm_bench),
                               base_config=Path(spec.base_config) if spec.base_config else None,
                               work_dir=spec.out_dir)
    else:
        progress(f"loading model {spec.model} on the {spec.runtime} runtime"
                 + (f" ({spec.device})" if spec.device != "cpu" else ""))
        runtime = open_runtime(kind, spec.model, threads=spec.threads, device=spec.device,
                               progress=lambda line: progress(f"download: {line}"), model_option="--h2o-model")
    try:
        return _measure_groups(runtime, points, spec, progress)
    finally:
        runtime.close()


def _measure_groups(runtime: Runtime, points: list[Point], spec: RunSpec, progress: Progress):
    # every size before the first is measured (the session checked them up front when the model was
    # already here; a first-use download is checked only now); an external binary's sizes are its own
    if runtime.model.config is not None:
        for prompt_len, gen_len in _by_size(points):
            check_run_fits(runtime.model.config, prompt_len, gen_len, f"{spec.model} p{prompt_len} g{gen_len}")
    text = "synthetic" if runtime.kind == LLM_BENCH else str(spec.text_file or "pydoc_data.topics")
    configs: dict[str, dict[str, Any]] = {}
    baselines: dict[str, float | None] = {}
    for (prompt_len, gen_len), group in _by_size(points).items():
        prompt, continuation = run_tokens(runtime, prompt_len, gen_len, spec.text_file)
        base_id = f"baseline_p{prompt_len}_g{gen_len}"
        session = _Session(runtime, spec, prompt, continuation, base_id, group, progress)
        session.measure()
        base_row = session.rows[base_id]
        if base_row.decode_tok_s:
            _write_log(spec, base_id, base_row, base_row.summary(), BASELINE_CONFIG,
                       len(base_row.decode_tok_s), text)
        suite = _suite(runtime, spec, session, progress)
        for point in group:
            summary = {}
            if point.run_id not in session.errors:
                summary = {**session.rows[point.run_id].summary(), **session.paired(point.run_id)}
            if summary and session.logits.get(point.run_id) is not None and session.logits.get(base_id) is not None:
                summary.update(fidelity(session.logits[base_id], session.logits[point.run_id], continuation))
                try:
                    if suite is not None:
                        summary.update(_suite_numbers(suite, session, point, summary))
                except RunFailedError as exc:  # one configuration's run on another text
                    session.errors[point.run_id] = f"fidelity suite: {exc}"
            if point.run_id in session.errors:
                progress(f"{point.label} failed: {session.errors[point.run_id]}")
                configs[point.label] = {"run_id": point.run_id, "error": session.errors[point.run_id]}
                baselines[point.label] = statistics.median(base_row.decode_tok_s) if base_row.decode_tok_s else None
                continue
            _write_log(spec, point.run_id, session.rows[point.run_id], summary, point.config,
                       len(session.rows[point.run_id].decode_tok_s), text)
            row: dict[str, Any] = {"run_id": point.run_id, "prompt_tokens": prompt_len, "gen_tokens": gen_len}
            if runtime.has_dumps:
                row["kv_dir"] = str(spec.out_dir / "kv" / point.run_id)
            if session.full_kv_bytes is not None:
                row["full_kv_bytes"] = session.full_kv_bytes
            if session.held[point.run_id]:
                row["held_kv_bytes"] = session.held[point.run_id]
            configs[point.label] = {**row, **summary}
            baselines[point.label] = summary["baseline_decode_tps"]
            progress(f"{point.label} done ({len(summary['decode_tps_rounds'])} rounds)")
    return configs, baselines, runtime.model.name


def _suite(runtime: Runtime, spec: RunSpec, session: _Session, progress: Progress) -> Suite | None:
    """The fidelity suite for the session's size, or None when off; its first text is the session's own,
    whose full-cache logits are reused."""
    if not spec.fidelity_texts or session.logits.get(session.base_id) is None:
        return None
    name = Path(spec.fidelity_texts[0]).name
    others = suite_tokens(runtime, read_texts(spec.fidelity_texts[1:]), len(session.prompt),
                          len(session.continuation), first_seed=1)
    suite = Suite(runtime, [SuiteText(name, session.prompt, session.continuation), *others], progress)
    suite.references[name] = session.logits[session.base_id]
    names = ", ".join(t.name for t in suite.texts)
    progress(f"fidelity suite: {len(suite.texts)} text{'s' if len(suite.texts) != 1 else ''} ({names}), each "
             "configuration and its sink+recent twin")
    return suite


def _suite_numbers(suite: Suite, session: _Session, point: Point, summary: dict[str, Any]) -> dict[str, Any]:
    """``point`` over the suite (its run on the first text reused): the means replace the one-text numbers."""
    known = {suite.texts[0].name: (session.logits[point.run_id], float(summary.get("h2o_lossy", 1.0)))}
    return row_metrics(suite.measure(point.config, point.label, point.extra_kv_keys, known))


class _Session:
    """The paired, adaptive measurement of one (prompt, gen) group on a runtime.

    After one discarded warm-up run, every round runs each still-undecided candidate once, in an order
    rotated every round, with a baseline run before the first and after every second candidate, so each
    candidate run has a baseline run next to it and another at most one run further on its other side
    (:func:`bracketed_log_ratios`). From
    ``spec.rounds`` rounds on, a candidate whose drop interval no longer straddles the target is done;
    the others run again, up to ``spec.max_rounds``. The first run of each keeps its logits (fidelity)
    and writes the held KV as dumps, where the runtime has them (``has_logits``, ``has_dumps``). Baseline and
    candidate runs are the same work (prefill, then the timed decode), so nothing but the configuration
    differs between a pair.

    A run that gives no result (:class:`RunFailedError`: an external binary failed) fails its configuration
    alone (``errors``); a failed baseline run fails every configuration still being measured.
    """

    PER_BRACKET = 2  # candidate runs between two baseline runs

    def __init__(self, runtime: Runtime, spec: RunSpec, prompt: Any, continuation: Any, base_id: str,
                 group: list[Point], progress: Progress) -> None:
        self.spec, self.prompt, self.continuation = spec, prompt, continuation
        self.base_id, self.group, self.progress = base_id, group, progress
        self.runtimes = {base_id: runtime.configure(BASELINE_CONFIG, source="baseline")}
        self.runtimes.update({p.run_id: runtime.configure(p.config, source=p.label, extra_kv_keys=p.extra_kv_keys)
                              for p in group})
        info = runtime.model
        self.rows = {name: BenchRow(info.name, size_text(info.size_bytes), spec.threads, len(prompt),
                                    len(continuation)) for name in self.runtimes}
        self.full_kv_bytes = info.full_kv_bytes(len(prompt) + len(continuation))
        self.held: dict[str, list[int]] = {}
        self.logits: dict[str, Any] = {}
        self.has_logits, self.has_dumps = runtime.has_logits, runtime.has_dumps
        self.errors: dict[str, str] = {}  # run id -> why it has no result
        self.sequence: list[tuple[str, float]] = []
        self.rounds = 0
        self.step_delay = 0.0
        self.thresholds = Thresholds(decode_drop_target=spec.drop_target, decode_baseline=spec.fixed_baseline)

    def measure(self) -> None:
        size = f"p{len(self.prompt)} g{len(self.continuation)}"
        self.progress(f"{size}: warm-up run")
        try:
            warm = self.runtimes[self.base_id].run(self.prompt, self.continuation, run_id=f"{self.base_id}_warmup")
        except RunFailedError as exc:
            self.progress(f"{size}: warm-up run: no result: {exc}")
            self.errors[self.base_id] = str(exc)
            self._baseline_failed([p.run_id for p in self.group])
            return
        if self.spec.inject_slowdown > 0 and warm.decode_tok_s > 0:
            self.step_delay = self.spec.inject_slowdown / warm.decode_tok_s
            self.progress(f"{size}: injecting {self.step_delay * 1e3:.2f} ms per candidate decode step "
                          f"({self.spec.inject_slowdown:g} of the warm-up baseline's step time)")
        pending = [p.run_id for p in self.group]
        while pending and self.rounds < self.spec.max_rounds:
            self.rounds += 1
            shift = (self.rounds - 1) % len(pending)
            order = pending[shift:] + pending[:shift]
            for i, name in enumerate(order):
                if i % self.PER_BRACKET == 0 and (not self.sequence or self.sequence[-1][0] != self.base_id):
                    if not self._run(self.base_id):
                        self._baseline_failed(pending)
                        return
                self._run(name)
            if not self._run(self.base_id):
                self._baseline_failed(pending)
                return
            pending = [name for name in pending if name not in self.errors]
            if self.rounds >= self.spec.rounds:
                pending = [name for name in pending if self._state(name) == "undecided"]
                for name in pending:
                    self.progress(f"{size} {self._label(name)}: decode drop undecided after {self.rounds} rounds"
                                  + ("; one more round" if self.rounds < self.spec.max_rounds else ""))

    def _baseline_failed(self, pending: list[str]) -> None:
        """Every candidate still being measured fails with the baseline (nothing to pair it with); candidates
        already decided keep their rounds."""
        why = self.errors.pop(self.base_id)
        for name in pending:
            self.errors.setdefault(name, f"the baseline run failed: {why}")

    def _run(self, name: str) -> bool:
        """One run of ``name``; False (and ``errors[name]``) when it gave no result."""
        first = name not in self.logits
        candidate = name != self.base_id
        dump = self.spec.out_dir / "kv" / name if first and candidate and self.has_dumps else None
        try:
            result = self.runtimes[name].run(self.prompt, self.continuation,
                                             keep_logits=first and self.has_logits and len(self.continuation) > 0,
                                             dump_dir=dump, run_id=name,
                                             step_delay_s=self.step_delay if candidate else 0.0)
        except RunFailedError as exc:
            self.errors[name] = str(exc)
            self.progress(f"round {self.rounds} {self._label(name)}: no result: {exc}")
            return False
        if first:
            self.logits[name] = result.logits
            self.held[name] = result.held_kv_bytes
        self.rows[name].add_run(result.prefill_tok_s, result.decode_tok_s, result.metrics)
        before = next((v for n, v in reversed(self.sequence) if n == self.base_id), None)
        self.sequence.append((name, result.decode_tok_s))
        adjacent = f" (x{result.decode_tok_s / before:.3f} of the baseline run before)" if candidate and before else ""
        self.progress(f"round {self.rounds} {self._label(name)}: decode {result.decode_tok_s:.2f} tok/s{adjacent}, "
                      f"lossy {result.metrics.get('h2o_lossy', 1.0):.3f}")
        return True

    def _logs(self, name: str) -> list[float]:
        """The candidate's paired log-ratios; none when a run decoded nothing (``gen 0``)."""
        if any(speed <= 0 for _, speed in self.sequence):
            return []
        return bracketed_log_ratios(self.sequence, self.base_id).get(name, [])

    def _state(self, name: str) -> str:
        """``pass``, ``fail``, ``undecided``, or ``none`` when there is no decode speed to judge."""
        verdict = paired_drop(self.paired(name), self.thresholds)
        return verdict.state if verdict is not None else "none"

    def paired(self, name: str) -> dict[str, Any]:
        """The candidate's paired-round numbers: per-round tok/s and log-ratios, the baseline median."""
        base = [v for n, v in self.sequence if n == self.base_id]
        return {"decode_tps_rounds": [v for n, v in self.sequence if n == name], "decode_log_ratios": self._logs(name),
                "baseline_decode_tps": statistics.median(base), "decode_tps": statistics.median(
                    v for n, v in self.sequence if n == name)}

    def _label(self, name: str) -> str:
        return next((p.label for p in self.group if p.run_id == name), "baseline")


def _write_log(spec: RunSpec, run_id: str, row: BenchRow, summary: dict, config: dict, repeat: int,
               text: str) -> None:
    runtime = f"{spec.runtime} ({spec.device})" if spec.runtime in IN_PROCESS else spec.runtime
    write_log(spec.out_dir / "logs" / f"{run_id}.log", row, summary, config, repeat, text, runtime)


def _by_size(points: Iterable[Point]) -> dict[tuple[int, int], list[Point]]:
    groups: dict[tuple[int, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.prompt_tokens, point.gen_tokens), []).append(point)
    return groups


# existing logs ---------------------------------------------------------------------------------------
def _read_logs(points: list[Point], spec: RunSpec, warnings: list[str]):
    """Rows by run id (the log's stem). A gate run's own folder also gives each log's JSON twin
    (fidelity) and ``kv/<run_id>`` dumps (the online-sim)."""
    source = Path(spec.logs)
    if source.is_file():
        rows = read_csv(source)
    else:
        rows, problems = parse_logs_report(find_logs(source))
        warnings += [f"[WARN] {source}: {line}" for line in summarize_problems(problems)]
    by_stem: dict[str, dict[str, Any]] = {}
    for row in rows:
        log = Path(row.get("log_file", ""))
        if log.stem in by_stem:
            warnings.append(f"[WARN] {log}: another table row for run id {log.stem}; only the first one is gated")
            continue
        by_stem[log.stem] = {**metric_row(row), **_twin(log)}
        if (log.parent.parent / "kv" / log.stem).is_dir():
            by_stem[log.stem]["kv_dir"] = str(log.parent.parent / "kv" / log.stem)
    base = {stem: row for stem, row in by_stem.items() if stem.startswith("baseline")}
    configs: dict[str, dict[str, Any]] = {}
    baselines: dict[str, float | None] = {}
    for point in points:
        row = by_stem.get(point.run_id)
        configs[point.label] = ({"run_id": point.run_id, **row} if row else
                                {"run_id": point.run_id, "error": f"no llm_bench row for {point.run_id} in {source}"})
        wanted = f"baseline_p{point.prompt_tokens}_g{point.gen_tokens}"
        name = wanted if wanted in base else next(iter(base), None)
        if name is not None and name != wanted:
            warnings.append(f"[WARN] {point.label}: no {wanted} log; its decode is compared with {name}, which may "
                            "be another workload")
        baselines[point.label] = base[name].get("decode_tps") if name is not None else None
    if not base:
        warnings.append(f"{source}: no baseline_* log; decode_pass needs --h2o-decode-baseline")
    return configs, baselines, "logs"


def _twin(log: Path) -> dict[str, Any]:
    """From the JSON twin beside a log (``h2o-gate bench`` and the gate write one), if there is one:
    the fidelity numbers and, from a gate run, the paired rounds (``decode_log_ratios``,
    ``decode_tps_rounds``) with the median ``decode_tps``, so a re-gated run is judged as it was."""
    try:
        twin = json.loads(log.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(twin, dict):
        return {}
    out: dict[str, Any] = {k: float(v) for k, v in twin.items()
                           if k.startswith("h2o_fidelity_") and isinstance(v, (int, float))}
    rounds = {k: twin[k] for k in ("decode_log_ratios", "decode_tps_rounds")
              if isinstance(twin.get(k), list) and all(isinstance(v, (int, float)) for v in twin[k])}
    if rounds and isinstance(twin.get("decode_tps"), (int, float)):
        out.update(rounds, decode_tps=float(twin["decode_tps"]))
    return out


# lossless ratios from dumps ------------------------------------------------------------------------
def _add_lossless(row: dict[str, Any], point: Point, spec: RunSpec, warnings: list[str], progress: Progress,
                  coded: dict[Any, dict[int, tuple[int, int]] | None]) -> None:
    """``lossless_online`` (front_n layers), ``lossless_scope`` (the configured scope),
    ``per_layer_lossless`` and ``total_ratio`` from the online-sim over dumps; without dumps
    ``lossless_online`` falls back to the runtime's ratio, with a warning. Every dump entry the
    online-sim could not use is a warning. The online-sim codes with the configuration's codec profile
    (``kv_lossless_codec_runtime``). ``coded`` holds the results by dump content and profile, so dumps
    identical to ones already coded (``--h2o-kv-dumps``, or configurations that hold the same KV) are
    coded once per profile."""
    dump_dir = spec.kv_dumps or (Path(row["kv_dir"]) if row.get("kv_dir") else None)
    lossless = LosslessConfig.from_config(point.config, point.label)
    row["codec_profile"] = lossless.profile
    if lossless.profile != "fast" and spec.runtime in ("llm-bench", "logs"):
        warnings.append(f"[WARN] {point.label}: kv_lossless_codec_runtime {lossless.profile!r} picks the online-sim's "
                        f"codec only: an external runtime's own lossless stage (h2o_lossless) codes with its own codec")
    per_layer = None
    if dump_dir is not None:
        content = _dump_content(dump_dir)
        key = None if content is None else (content, lossless.profile)
        if key not in coded or key is None:
            coded[key] = _online_sim(dump_dir, point.label, lossless.profile, warnings, progress)
        else:
            progress(f"online-sim {point.label}: its dumps hold the same KV as a configuration already coded")
        per_layer = coded[key]
    h2o = H2OConfig.from_config(point.config, point.label)
    if per_layer is None:
        runtime = row.get("h2o_lossless")
        row["lossless_online"], row["lossless_online_source"] = runtime, "runtime"
        warnings.append(f"[WARN] {point.label}: no KV dumps; lossless_online is the runtime h2o_lossless {runtime}")
        row["lossless_scope"] = runtime
        return
    layers = sorted(per_layer)
    front = [layer for layer in layers if layer < lossless.front_n]
    deep = [layer for layer in layers if layer in h2o.layer_range(max(layers) + 1)]
    scope = ([] if not lossless.runs else
             {"none": [], "front_n": front, "h2o_kept": deep}.get(lossless.scope, sorted(set(front) | set(deep))))
    row["lossless_online"] = _ratio(per_layer, front)
    row["lossless_online_source"] = "online_sim"
    row["lossless_scope"] = _ratio(per_layer, scope)  # None when nothing is in the lossless scope
    row["per_layer_lossless"] = {str(layer): per_layer[layer][0] / per_layer[layer][1] for layer in layers}
    if row.get("held_kv_bytes") and row.get("full_kv_bytes"):
        row["total_ratio"] = whole_cache_ratio(row["full_kv_bytes"], row["held_kv_bytes"],
                                               {layer: per_layer[layer] for layer in scope})


def whole_cache_ratio(full_bytes: int, held_bytes: list[int], coded: dict[int, tuple[int, int]]) -> float:
    """Bytes a full fp16 cache would hold over the bytes really held after eviction and lossless
    compression, all layers, at the end of the run: each layer's held bytes, scaled by its online-sim
    ratio (``coded[layer] = (raw, compressed)``) where the lossless scope covers it."""
    held = sum(size * coded[layer][1] / coded[layer][0] if layer in coded and coded[layer][0] else size
               for layer, size in enumerate(held_bytes))
    return full_bytes / held


def _dump_content(dump_dir: Path) -> tuple | None:
    """What a dump folder holds, as a hashable key: each entry's layer, stage, start and length with the
    identity (device, inode) of its K and V files, which :func:`link_identical` shares between
    identical files. None when the folder cannot be read that way (it is then coded on its own)."""
    entries = []
    try:
        for meta_path in sorted(Path(dump_dir).glob("meta_*.json")):
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            files = tuple((st.st_dev, st.st_ino) for st in (os.stat(meta_path.parent / meta[f"{kind}_file"])
                                                             for kind in ("k", "v")))
            entries.append((meta["layer_id"], meta["stage"], meta["seq_start"], meta["seq_len"], files))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return tuple(sorted(entries)) or None


def _online_sim(dump_dir: Path, label: str, profile: str, warnings: list[str],
                progress: Progress) -> dict[int, tuple[int, int]] | None:
    options = EvalOptions(scope="layer_range", layer_start=0, layer_end=-1, codec=profile, **ONLINE_SIM)
    try:
        result = evaluate(dump_dir, options)
    except SelectionError as exc:
        warnings.append(f"[WARN] {label}: no usable KV dump in {dump_dir}: {exc}")
        return None
    for skipped in result["skipped"]:
        warnings.append(f"[WARN] {label}: online-sim skipped {skipped['file']} ({skipped['reason']}): "
                        f"{skipped['detail']}")
    progress(f"online-sim {label}: {result['weighted_lossless_ratio']:.4f} ({profile} codec) over all layers' held KV, "
             f"{result['raw_bytes'] / 1e6:.1f} MB of {dump_dir}, verified {result['roundtrip_verified']}"
             + (f", {len(result['skipped'])} entries skipped" if result["skipped"] else ""))
    return {int(layer): (v["raw_bytes"], v["compressed_bytes"]) for layer, v in result["per_layer"].items()}


def _ratio(per_layer: dict[int, tuple[int, int]], layers: list[int]) -> float | None:
    raw = sum(per_layer[layer][0] for layer in layers)
    comp = sum(per_layer[layer][1] for layer in layers)
    return raw / comp if comp else None
