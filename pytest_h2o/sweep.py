"""h2o-gate sweep: run every point of a preset matrix.

One config per point, run on the reference runtime or on an external llm_bench binary with the
original's arguments; writes ``configs/``, ``logs/`` and ``manifest.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.model_fetch import ModelFetchError
from h2o_kernels.models import EMBEDDED_MODEL, ModelSpecError, load_model
from h2o_presets.matrix import Point, PresetError, expand, load_preset

from .bench import bench_tokens, run_bench, write_log


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep options (the original sweep script's names)."""
    p.add_argument("--preset", required=True, type=Path, help="preset matrix JSON")
    p.add_argument("--out-dir", required=True, type=Path, help="where configs/, logs/ and manifest.json go")
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL, help="reference runtime model (see h2o-gate bench)")
    p.add_argument("--llm-bench", help="run this external llm_bench binary per point instead")
    p.add_argument("--base-config", type=Path, help="with --llm-bench: the model's base config JSON")
    p.add_argument("--backend", default="cpu", help="with --llm-bench: -a")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--attention-option", type=int, default=0, help="with --llm-bench: -qatten")
    p.add_argument("--text-file", type=Path, help="reference runtime: text for prompt and continuation")
    p.add_argument("--synthetic", action="store_true", help="reference runtime: token 16 repeated, as llm_bench")
    p.add_argument("--dry-run", action="store_true", help="write configs and manifest, run nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate sweep``."""
    if bool(args.llm_bench) != bool(args.base_config):
        parser.error("--llm-bench and --base-config go together")
    try:
        points = expand(load_preset(args.preset), str(args.preset))
    except PresetError as exc:
        parser.error(str(exc))
    try:
        base = read_base_config(args.base_config) if args.base_config else {}
    except ValueError as exc:
        parser.error(f"--base-config {exc}")
    configs, logs = args.out_dir / "configs", args.out_dir / "logs"
    configs.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    loaded = None
    if not args.llm_bench and not args.dry_run:
        try:
            loaded = load_model(args.model, threads=args.threads)
        except (ModelSpecError, ModelFetchError) as exc:
            print(f"h2o-gate sweep: {exc}", file=sys.stderr)
            return 1
    manifest, failed = [], 0
    for number, point in enumerate(points, start=1):
        config_path, log_path = configs / f"{point.run_id}.json", logs / f"{point.run_id}.log"
        config = {**base, **point.config}
        config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        print(f"[h2o-gate sweep] {number}/{len(points)} {point.run_id}", file=sys.stderr, flush=True)
        rc = 0
        if args.dry_run:
            pass
        elif args.llm_bench:
            command = llm_bench_command(args.llm_bench, args.threads, point, config_path, log_path, args.backend,
                                        args.attention_option)
            rc = subprocess.run(command, check=False).returncode
        else:
            assert loaded is not None
            try:
                prompt, continuation = bench_tokens(loaded, point.prompt_tokens, point.gen_tokens, args.text_file,
                                                    args.synthetic)
                row, summary = run_bench(loaded, config, str(config_path), prompt, continuation, point.repeat,
                                         args.threads)
                write_log(log_path, row, summary, config, point.repeat,
                          "synthetic" if args.synthetic else str(args.text_file or "pydoc_data.topics"))
            except (ConfigError, ValueError) as exc:
                print(f"[WARN] {point.run_id}: {exc}", file=sys.stderr)
                rc = 2
        failed += rc != 0
        manifest.append({"run_id": point.run_id, "prompt_len": point.prompt_tokens, "gen_len": point.gen_tokens,
                         "repeat": point.repeat, **point.config, "config": str(config_path), "log": str(log_path),
                         "return_code": rc})
    (args.out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    print(f"[h2o-gate sweep] {len(points)} points, {failed} failed; wrote {args.out_dir / 'manifest.json'}",
          file=sys.stderr)
    return 2 if failed else 0


def llm_bench_command(binary: str, threads: int, point: Point, config: Path, log: Path, backend: str = "cpu",
                      attention_option: int = 0) -> list[str]:
    """The original's llm_bench call for one point."""
    return [binary, "-m", str(config), "-a", backend, "-t", str(threads), "-qatten", str(attention_option),
            "-kv", "true", "-p", str(point.prompt_tokens), "-n", str(point.gen_tokens), "-rep", str(point.repeat),
            "-fp", str(log)]


def read_base_config(path: Path) -> dict[str, Any]:
    """The llm_bench base config with ``base_dir`` made absolute (MNN joins base_dir + file names);
    ValueError names the file when it is not a JSON object."""
    try:
        base = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(base, dict):
        raise ValueError(f"{path}: expected a JSON object")
    raw = base.get("base_dir", "")
    base_dir = Path(raw) if isinstance(raw, str) and raw else Path(".")
    if not base_dir.is_absolute():
        base_dir = Path(path).resolve().parent / base_dir
    base["base_dir"] = os.fspath(base_dir.resolve()) + os.sep
    return base
