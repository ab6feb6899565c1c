"""Measure a preset's configurations: the numbers the gate rules read, one metric row per configuration.

Three runtimes:
- ``reference`` (default): the embedded reference runtime. Per prompt/gen size, one discarded warm-up,
  then ``repeat`` rounds that each run the baseline (H2O and lossless off) and every configuration, in
  an order rotated every round, so drift on a shared machine hits all of them alike. The first round
  keeps logits (fidelity against the baseline's) and writes each configuration's held KV as dumps.
- ``llm_bench``: an external llm_bench binary per configuration with the original's arguments; the
  baseline runs before and after the candidates and their mean is the baseline.
- ``logs``: llm_bench logs (or a CSV of parsed rows) that already exist, matched to points by run id.

Lossless ratios come from the offline online-sim (``chunked_grouped``, 192-token chunks, 8 framing bytes,
the runtime codec) over each configuration's own dumps, or over ``kv_dumps`` when given.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from gates.bench_log import BenchRow
from gates.log_parse import find_logs, metric_row, parse_log, read_csv
from h2o_kernels.fidelity import fidelity
from h2o_kernels.h2o import H2OConfig
from h2o_kernels.lossless_runtime import LosslessConfig
from h2o_kernels.models import load_model
from h2o_kernels.offline_eval import EvalOptions, SelectionError, evaluate
from h2o_kernels.runtime import ReferenceRuntime
from presets.matrix import Point

from .bench import bench_tokens, size_text, write_log
from .sweep import llm_bench_command, read_base_config

BASELINE_CONFIG = {"kv_h2o_enable": False, "kv_lossless_enable": False}
ONLINE_SIM = dict(entry_mode="chunked_grouped", online_chunk_seq=192, online_framing_bytes=8, adaptive_block_seq=64,
                  zstd_level=3, stage="both")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunSpec:
    """Where and how to measure (plain data, so it can be handed to xdist workers)."""

    runtime: str  # "reference" | "llm_bench" | "logs"
    out_dir: Path
    model: str = "smollm2"
    threads: int = 1
    text_file: Path | None = None
    kv_dumps: Path | None = None
    llm_bench: str | None = None
    base_config: Path | None = None
    logs: Path | None = None


def measure(points: list[Point], spec: RunSpec, progress: Progress) -> dict[str, Any]:
    """Measure every point; returns ``{"runtime", "model", "configs": {label: metrics}, "baselines":
    {label: tok/s or None}, "warnings": [...]}`` (JSON-serialisable)."""
    warnings: list[str] = []
    if spec.runtime == "reference":
        configs, baselines, model = _run_reference(points, spec, progress)
    elif spec.runtime == "llm_bench":
        configs, baselines, model = _run_llm_bench(points, spec, progress, warnings)
    else:
        configs, baselines, model = _read_logs(points, spec, warnings)
    for point in points:
        row = configs[point.label]
        if "error" not in row:
            _add_lossless(row, point, spec, warnings, progress)
    return {"runtime": spec.runtime, "model": model, "configs": configs, "baselines": baselines,
            "warnings": warnings}


# reference runtime ---------------------------------------------------------------------------------
def _run_reference(points: list[Point], spec: RunSpec, progress: Progress):
    progress(f"loading model {spec.model}")
    loaded = load_model(spec.model, threads=spec.threads)
    configs: dict[str, dict[str, Any]] = {}
    baselines: dict[str, float | None] = {}
    for (prompt_len, gen_len), group in _by_size(points).items():
        prompt, continuation = bench_tokens(loaded, prompt_len, gen_len, spec.text_file, False)
        base_id = f"baseline_p{prompt_len}_g{gen_len}"
        runtimes = {base_id: ReferenceRuntime(loaded.model, BASELINE_CONFIG, source="baseline")}
        for point in group:
            runtimes[point.run_id] = ReferenceRuntime(loaded.model, point.config, source=point.label)
        rows = {name: BenchRow(loaded.name, size_text(loaded.size_bytes), spec.threads, prompt_len, gen_len)
                for name in runtimes}
        logits: dict[str, Any] = {}
        progress(f"p{prompt_len} g{gen_len}: warm-up run")
        runtimes[base_id].run(prompt, continuation)
        repeat = max(point.repeat for point in group)
        names = list(runtimes)
        for rnd in range(repeat):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                first = rnd == 0
                dump = spec.out_dir / "kv" / name if first and name != base_id else None
                result = runtimes[name].run(prompt, continuation, keep_logits=first and gen_len > 0, dump_dir=dump,
                                            run_id=name)
                if first:
                    logits[name] = result.logits
                rows[name].add_run(result.prefill_tok_s, result.decode_tok_s, result.metrics)
                progress(f"round {rnd + 1}/{repeat} {_label(name, group)}: decode {result.decode_tok_s:.2f} tok/s, "
                         f"lossy {result.metrics.get('h2o_lossy', 1.0):.3f}")
        baseline = rows[base_id].summary()
        _write_log(spec.out_dir, base_id, rows[base_id], baseline, BASELINE_CONFIG, repeat, spec)
        for point in group:
            summary = rows[point.run_id].summary()
            if logits.get(point.run_id) is not None and logits.get(base_id) is not None:
                summary.update(fidelity(logits[base_id], logits[point.run_id], continuation))
            _write_log(spec.out_dir, point.run_id, rows[point.run_id], summary, point.config, point.repeat, spec)
            configs[point.label] = {"run_id": point.run_id, "kv_dir": str(spec.out_dir / "kv" / point.run_id),
                                    **summary}
            baselines[point.label] = baseline["decode_tps"]
    return configs, baselines, loaded.name


def _label(name: str, group: list[Point]) -> str:
    return next((p.label for p in group if p.run_id == name), "baseline")


def _write_log(out_dir: Path, run_id: str, row: BenchRow, summary: dict, config: dict, repeat: int,
               spec: RunSpec) -> None:
    write_log(out_dir / "logs" / f"{run_id}.log", row, summary, config, repeat,
              str(spec.text_file or "pydoc_data.topics"))


def _by_size(points: Iterable[Point]) -> dict[tuple[int, int], list[Point]]:
    groups: dict[tuple[int, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.prompt_tokens, point.gen_tokens), []).append(point)
    return groups


# external llm_bench --------------------------------------------------------------------------------
def _run_llm_bench(points: list[Point], spec: RunSpec, progress: Progress, warnings: list[str]):
    base = read_base_config(spec.base_config) if spec.base_config else {}
    configs: dict[str, dict[str, Any]] = {}
    baselines: dict[str, float | None] = {}
    for (prompt_len, gen_len), group in _by_size(points).items():
        base_id = f"baseline_p{prompt_len}_g{gen_len}"
        base_speeds = []
        for tag in ("before", "after"):
            row = _external(f"{base_id}_{tag}", {**base, **BASELINE_CONFIG}, group[0], spec, progress)
            if "decode_tps" in row:
                base_speeds.append(row["decode_tps"])
            if tag == "before":
                for point in group:
                    configs[point.label] = {"run_id": point.run_id,
                                            **_external(point.run_id, {**base, **point.config}, point, spec, progress)}
        baseline = sum(base_speeds) / len(base_speeds) if base_speeds else None
        if baseline is None:
            warnings.append(f"baseline p{prompt_len} g{gen_len}: llm_bench gave no decode speed")
        for point in group:
            baselines[point.label] = baseline
    return configs, baselines, "llm_bench"


def _external(run_id: str, config: dict, point: Point, spec: RunSpec, progress: Progress) -> dict[str, Any]:
    """One llm_bench call: its first table row as numbers, or ``{"error": ...}`` naming what went wrong."""
    config_path = spec.out_dir / "configs" / f"{run_id}.json"
    log_path = spec.out_dir / "logs" / f"{run_id}.log"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    command = llm_bench_command(str(spec.llm_bench), spec.threads, point, config_path, log_path)
    progress(f"llm_bench {run_id}")
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    output = spec.out_dir / "logs" / f"{run_id}.stdout"
    output.write_text(done.stdout + done.stderr, encoding="utf-8")
    if done.returncode != 0:
        return {"error": f"llm_bench exited with status {done.returncode} (its output: {output})"}
    rows = parse_log(log_path) if log_path.is_file() else []
    if not rows:
        return {"error": f"llm_bench wrote no table row to {log_path} (its output: {output})"}
    return metric_row(rows[0])


# existing logs ---------------------------------------------------------------------------------------
def _read_logs(points: list[Point], spec: RunSpec, warnings: list[str]):
    """Rows by run id (the log's stem). A gate run's own folder also gives each log's JSON twin
    (fidelity) and ``kv/<run_id>`` dumps (the online-sim)."""
    source = Path(spec.logs)
    rows = read_csv(source) if source.is_file() else [row for path in find_logs(source) for row in parse_log(path)]
    by_stem: dict[str, dict[str, Any]] = {}
    for row in rows:
        log = Path(row.get("log_file", ""))
        if log.stem not in by_stem:
            by_stem[log.stem] = {**metric_row(row), **_twin_fidelity(log)}
            if (log.parent.parent / "kv" / log.stem).is_dir():
                by_stem[log.stem]["kv_dir"] = str(log.parent.parent / "kv" / log.stem)
    base = {stem: row for stem, row in by_stem.items() if stem.startswith("baseline")}
    configs: dict[str, dict[str, Any]] = {}
    baselines: dict[str, float | None] = {}
    for point in points:
        row = by_stem.get(point.run_id)
        configs[point.label] = ({"run_id": point.run_id, **row} if row else
                                {"run_id": point.run_id, "error": f"no llm_bench row for {point.run_id} in {source}"})
        match = base.get(f"baseline_p{point.prompt_tokens}_g{point.gen_tokens}") or next(iter(base.values()), None)
        baselines[point.label] = match.get("decode_tps") if match else None
    if not base:
        warnings.append(f"{source}: no baseline_* log; decode_pass needs --h2o-decode-baseline")
    return configs, baselines, "logs"


def _twin_fidelity(log: Path) -> dict[str, float]:
    """The fidelity numbers of ``h2o-gate bench``'s JSON twin beside a log, if there is one."""
    try:
        twin = json.loads(log.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in twin.items() if k.startswith("h2o_fidelity_") and isinstance(v, (int, float))}


# lossless ratios from dumps ------------------------------------------------------------------------
def _add_lossless(row: dict[str, Any], point: Point, spec: RunSpec, warnings: list[str], progress: Progress) -> None:
    """``lossless_online`` (front_n layers), ``lossless_scope`` (the configured scope), ``total_ratio``
    and ``per_layer_lossless``, from the online-sim over dumps; falls back to the runtime's ratio."""
    dump_dir = spec.kv_dumps or (Path(row["kv_dir"]) if row.get("kv_dir") else None)
    per_layer = _online_sim(dump_dir, progress) if dump_dir else None
    lossless = LosslessConfig.from_config(point.config, point.label)
    h2o = H2OConfig.from_config(point.config, point.label)
    if per_layer is None:
        runtime = row.get("h2o_lossless")
        row["lossless_online"], row["lossless_online_source"] = runtime, "runtime"
        warnings.append(f"[WARN] {point.label}: no KV dumps; lossless_online is the runtime h2o_lossless {runtime}")
        row["lossless_scope"] = runtime
    else:
        layers = sorted(per_layer)
        front = [layer for layer in layers if layer < lossless.front_n]
        deep = [layer for layer in layers if layer in h2o.layer_range(max(layers) + 1)]
        scope = {"front_n": front, "h2o_kept": deep}.get(lossless.scope, sorted(set(front) | set(deep)))
        row["lossless_online"] = _ratio(per_layer, front)
        row["lossless_online_source"] = "online_sim"
        row["lossless_scope"] = _ratio(per_layer, scope)
        row["per_layer_lossless"] = {str(layer): per_layer[layer][0] / per_layer[layer][1] for layer in layers}
    lossy, scope_ratio = row.get("h2o_lossy"), row.get("lossless_scope")
    if lossy is not None and scope_ratio is not None:
        row["total_ratio"] = lossy * scope_ratio


def _online_sim(dump_dir: Path, progress: Progress) -> dict[int, tuple[int, int]] | None:
    options = EvalOptions(scope="layer_range", layer_start=0, layer_end=-1, **ONLINE_SIM)
    try:
        result = evaluate(dump_dir, options)
    except SelectionError:
        return None
    progress(f"online-sim {dump_dir.name}: {result['weighted_lossless_ratio']:.4f} over "
             f"{result['raw_bytes'] / 1e6:.1f} MB, verified {result['roundtrip_verified']}")
    return {int(layer): (v["raw_bytes"], v["compressed_bytes"]) for layer, v in result["per_layer"].items()}


def _ratio(per_layer: dict[int, tuple[int, int]], layers: list[int]) -> float | None:
    raw = sum(per_layer[layer][0] for layer in layers)
    comp = sum(per_layer[layer][1] for layer in layers)
    return raw / comp if comp else None
