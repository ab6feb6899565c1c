"""h2o-gate sweep: run every point of a preset matrix.

One config per point, run on an in-process runtime (``--runtime reference|hf``) or on an external
llm_bench binary with the original's arguments (``--llm-bench``); writes ``configs/``, ``logs/`` and
``manifest.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from h2o_gates.bench_log import write_log
from h2o_kernels.model.loading import EMBEDDED_MODEL
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import RunFailedError, Runtime, check_text_file, run_tokens
from h2o_kernels.runtimes.llm_bench import LLM_BENCH_THREADS, llm_bench_command, read_base_config, sweep_config
from h2o_presets.matrix import GENERATED_KV_DEFAULTS, Point
from pytest_h2o.cli.args import (
    add_runtime_arguments,
    check_command_config,
    load_command_runtime,
    non_negative_int,
    positive_int,
)
from pytest_h2o.cli.bench import run_bench
from pytest_h2o.cli.out_paths import check_out_dir
from pytest_h2o.gate import GateSetupError, load_points

# run_h2o_v4_bench.py's manifest keys (after run_id, prompt_len, gen_len) -> the config key they show
MANIFEST_KEYS = {
    "keep_ratio": "kv_h2o_target_keep_ratio", "block_tokens": "kv_h2o_block_tokens",
    "sink_tokens": "kv_h2o_sink_tokens", "recent_tokens": "kv_h2o_recent_tokens", "ema_alpha": "kv_h2o_ema_alpha",
    "update_interval": "kv_h2o_update_interval", "trigger_min_tokens": "kv_h2o_trigger_min_tokens",
    "h2o_layer_start": "kv_h2o_layer_start", "h2o_layer_end": "kv_h2o_layer_end",
    "h2o_target_mode": "kv_h2o_target_mode", "h2o_target_lossy_ratio": "kv_h2o_target_lossy_ratio",
    **{key: key for key in GENERATED_KV_DEFAULTS if key.startswith("kv_lossless_")},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep options (the original sweep script's names)."""
    p.add_argument("--preset", required=True,
                   help="preset matrix JSON: a path or the name of a bundled preset (as pytest --h2o-preset)")
    p.add_argument("--out-dir", required=True, type=Path, help="where configs/, logs/ and manifest.json go")
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL, help="the in-process runtime's model (see h2o-gate bench)")
    add_runtime_arguments(p)
    p.add_argument("--llm-bench", help="run this external llm_bench binary per point instead")
    p.add_argument("--base-config", type=Path, help="with --llm-bench: the model's base config JSON")
    p.add_argument("--backend", default="cpu", help="with --llm-bench: -a")
    p.add_argument("--threads", type=positive_int,
                   help="-t: llm_bench's threads (default 4, the original's) or the in-process runtime's threads "
                        "(default 1, as the plugin)")
    p.add_argument("--attention-option", type=non_negative_int, default=0, help="with --llm-bench: -qatten")
    p.add_argument("--text-file", type=Path, help="in-process runtime: text for prompt and continuation")
    p.add_argument("--synthetic", action="store_true", help="in-process runtime: token 16 repeated, as llm_bench")
    p.add_argument("--dry-run", action="store_true", help="write configs and manifest, run nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate sweep``."""
    points, base = setup(args, parser)
    runtime = None
    if not args.llm_bench and not args.dry_run:
        runtime = load_command_runtime(args, parser)
        check_points_fit(runtime, points, args.preset, parser)
    configs, logs = args.out_dir / "configs", args.out_dir / "logs"
    configs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    manifest, failed = [], 0
    for number, point in enumerate(points, start=1):
        config_path, log_path = configs / f"{point.run_id}.json", logs / f"{point.run_id}.log"
        config = sweep_config(base, point.config)
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        print(f"[h2o-gate sweep] {number}/{len(points)} {point.run_id}", file=sys.stderr, flush=True)
        rc = None if args.dry_run else run_point(args, runtime, point, config, config_path, log_path)
        failed += rc not in (0, None)
        manifest.append(manifest_entry(point, config, config_path, log_path, rc))
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    done = "written, none run (--dry-run)" if args.dry_run else f"{failed} failed"
    print(f"[h2o-gate sweep] {len(points)} points, {done}; wrote {args.out_dir / 'manifest.json'}", file=sys.stderr)
    return 2 if failed else 0


def setup(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[Point], dict[str, Any] | None]:
    """The preset's points (the plugin's loader: bundled names, schema, ``kv_*`` keys) and the base config,
    with every option checked before anything runs; a usage error names the option otherwise."""
    if bool(args.llm_bench) != bool(args.base_config):
        parser.error("--llm-bench and --base-config go together")
    if args.threads is None:
        args.threads = LLM_BENCH_THREADS if args.llm_bench else 1
    try:
        _, points = load_points(args.preset, {}, "llm-bench" if args.llm_bench else args.runtime)
    except GateSetupError as exc:
        parser.error(f"--preset {exc}")
    if not args.llm_bench and args.runtime == "hf":
        for point in points:
            check_command_config(point.config, f"--preset {args.preset} ({point.label})", "hf", parser,
                                 point.extra_kv_keys)
    try:
        base = read_base_config(args.base_config) if args.base_config else None
    except ValueError as exc:
        parser.error(f"--base-config {exc}")
    try:
        check_setup(args)
    except ValueError as exc:
        parser.error(str(exc))
    return points, base


def manifest_entry(point: Point, config: dict[str, Any], config_path: Path, log_path: Path,
                   rc: int | None) -> dict[str, Any]:
    """One manifest record: run_h2o_v4_bench.py's keys in its order, then ours (``repeat`` and the point's
    ``kv_*`` keys the original has no manifest key for). ``return_code`` is None for a point not run."""
    entry = {"run_id": point.run_id, "prompt_len": point.prompt_tokens, "gen_len": point.gen_tokens,
             **{name: config[key] for name, key in MANIFEST_KEYS.items()},
             "config": str(config_path), "log": str(log_path), "return_code": rc, "repeat": point.repeat}
    shown = set(MANIFEST_KEYS.values())
    return {**entry, **{key: value for key, value in point.config.items() if key not in shown}}


def check_points_fit(runtime: Runtime, points: list[Point], preset: str, parser: argparse.ArgumentParser) -> None:
    """A usage error, before the first run, when a point's tokens exceed the model's context or the memory."""
    for point in points:
        try:
            check_run_fits(runtime.model.config, point.prompt_tokens, point.gen_tokens, f"--preset {preset} "
                           f"({point.label})")
        except RunTooLargeError as exc:
            parser.error(str(exc))


def run_point(args: argparse.Namespace, runtime: Runtime | None, point: Point, config: dict[str, Any],
              config_path: Path, log_path: Path) -> int:
    """Run one point on llm_bench or the in-process runtime; its return code (2: the runtime refused it)."""
    if args.llm_bench:
        command = llm_bench_command(args.llm_bench, args.threads, point.prompt_tokens, point.gen_tokens, point.repeat,
                                    config_path, log_path, args.backend, args.attention_option)
        return subprocess.run(command, check=False).returncode
    assert runtime is not None
    try:
        prompt, continuation = run_tokens(runtime, point.prompt_tokens, point.gen_tokens, args.text_file,
                                          args.synthetic)
        row, summary = run_bench(runtime, config, str(config_path), prompt, continuation, point.repeat, args.threads,
                                 extra_kv_keys=point.extra_kv_keys)
        write_log(log_path, row, summary, config, point.repeat,
                  "synthetic" if args.synthetic else str(args.text_file or "pydoc_data.topics"),
                  f"{args.runtime} ({args.device})")
    except (ValueError, RunFailedError) as exc:
        print(f"[WARN] {point.run_id}: {exc}", file=sys.stderr)
        return 2
    return 0


def check_setup(args: argparse.Namespace) -> None:
    """ValueError naming the option unless the output folder, the text file and (unless ``--dry-run``, as the
    original) the llm_bench binary are usable."""
    check_out_dir(args.out_dir, "--out-dir")
    check_out_dir(args.out_dir / "configs", "--out-dir")
    check_out_dir(args.out_dir / "logs", "--out-dir")
    check_text_file(args.text_file, "--text-file")
    if args.llm_bench and not args.dry_run and not shutil.which(args.llm_bench):  # a dry run never calls it
        raise ValueError(f"--llm-bench {args.llm_bench}: not found or not executable; expected the path "
                         "of an llm_bench binary (or its name on PATH)")
