"""h2o-gate bench: the llm_bench equivalent on an in-process runtime (reference, or hf with ``--runtime hf``).

Runs ``-rep`` measured runs (after one discarded warm-up) of ``-p`` prompt tokens and ``-n``
teacher-forced continuation tokens of real text, with the ``kv_*`` keys of ``-c``; writes the
llm_bench markdown table to ``-fp`` and a JSON twin beside it; measures fidelity against a
full-cache run of the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from h2o_gates.bench_log import BenchRow, render_table, size_text, write_log
from h2o_kernels.fidelity import fidelity
from h2o_kernels.model.loading import EMBEDDED_MODEL
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import RunFailedError, Runtime, check_text_file, run_tokens
from pytest_h2o.cli.args import (
    add_runtime_arguments,
    check_command_config,
    load_command_runtime,
    non_negative_int,
    positive_int,
)
from pytest_h2o.cli.out_paths import OutPathError, check_out_dir, check_out_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench options (llm_bench's names where it had them)."""
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL,
                   help=f"'{EMBEDDED_MODEL}' (embedded SmolLM2-135M-Instruct), a .gguf file, a HF-style config.json "
                        "(random weights) or, with --runtime hf, a transformers model folder")
    add_runtime_arguments(p)
    p.add_argument("-c", "--config", type=Path,
                   help="JSON with the kv_h2o_* / kv_lossless_* keys, or kv_press_* with --runtime hf "
                        "(default: all off)")
    p.add_argument("-p", "--prompt-tokens", type=positive_int, default=512, help="prompt tokens (prefill)")
    p.add_argument("-n", "--gen-tokens", type=non_negative_int, default=128,
                   help="decode steps (teacher-forced text)")
    p.add_argument("-rep", "--repeat", type=positive_int, default=3, help="measured runs, after one discarded warm-up")
    p.add_argument("-t", "--threads", type=positive_int, default=1,
                   help="BLAS threads (1 is fastest on small machines)")
    p.add_argument("-fp", "--log-file", type=Path, help="write the llm_bench markdown table here (and a .json twin)")
    p.add_argument("--text-file", type=Path, help="text for prompt and continuation (default: Python's pydoc help)")
    p.add_argument("--synthetic", action="store_true", help="feed token id 16 over and over, as llm_bench did")
    p.add_argument("--dump-kv", type=Path, help="write the first measured run's KV cache as dumps here")
    p.add_argument("--no-fidelity", action="store_true", help="skip the full-cache reference run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate bench``."""
    config = read_config(args.config, parser)
    check_command_config(config, str(args.config or "defaults"), args.runtime, parser)
    try:
        check_outputs(args.log_file, args.dump_kv)
        check_text_file(args.text_file, "--text-file")
    except ValueError as exc:
        parser.error(str(exc))
    runtime = load_command_runtime(args, parser)
    prompt, continuation = command_tokens(args, runtime, parser)
    try:
        row, summary = run_bench(runtime, config, str(args.config or "defaults"), prompt, continuation,
                                 args.repeat, args.threads, fidelity_run=not args.no_fidelity, dump_kv=args.dump_kv)
    except (ValueError, OSError, RunFailedError) as exc:
        print(f"h2o-gate bench: {exc}", file=sys.stderr)
        return 1
    report(args, row, summary, config)
    return 0


def command_tokens(args: argparse.Namespace, runtime: Runtime,
                   parser: argparse.ArgumentParser) -> tuple[np.ndarray, np.ndarray]:
    """The run's prompt and continuation; a usage error when they do not fit the model, memory or text."""
    try:
        check_run_fits(runtime.model.config, args.prompt_tokens, args.gen_tokens, "-p/-n", not args.no_fidelity)
        return run_tokens(runtime, args.prompt_tokens, args.gen_tokens, args.text_file, args.synthetic)
    except RunTooLargeError as exc:
        parser.error(str(exc))
    except ValueError as exc:
        parser.error(f"-p/-n {args.prompt_tokens}+{args.gen_tokens}: {exc}; give a longer --text-file or fewer "
                     "tokens")


def report(args: argparse.Namespace, row: BenchRow, summary: dict[str, float], config: dict[str, Any]) -> None:
    """Print the table and the fidelity numbers; write the log and its twin with ``-fp``."""
    print(render_table([row]), end="")
    for name in ("h2o_fidelity_top1", "h2o_fidelity_ppl_delta", "h2o_fidelity_kl"):
        if name in summary:
            print(f"{name}: {summary[name]:.4f}")
    if args.log_file is not None:
        text = "synthetic" if args.synthetic else str(args.text_file or "pydoc_data.topics")
        twin = write_log(args.log_file, row, summary, config, args.repeat, text, f"{args.runtime} ({args.device})")
        print(f"[h2o-gate bench] wrote {args.log_file} and {twin}", file=sys.stderr)


def check_outputs(log_file: Path | None, dump_kv: Path | None) -> None:
    """OutPathError naming the option unless the log, its JSON twin and the dump folder can be written."""
    if log_file is not None:
        twin = log_file.with_suffix(".json")
        if twin == log_file:
            raise OutPathError(f"-fp {log_file}: its JSON twin would be the same file; give the log another "
                               "suffix (e.g. .log)")
        check_out_file(log_file, "-fp")
        check_out_file(twin, "-fp (its JSON twin)")
    if dump_kv is not None:
        check_out_dir(dump_kv, "--dump-kv")


def run_bench(runtime: Runtime, config: dict[str, Any], source: str, prompt: np.ndarray,
              continuation: np.ndarray, repeat: int, threads: int, fidelity_run: bool = True,
              dump_kv: Path | None = None, extra_kv_keys: Iterable[str] = ()) -> tuple[BenchRow, dict[str, float]]:
    """One warm-up and ``repeat`` measured runs of ``config``; fidelity against a full-cache run of
    the same tokens. Raises ConfigError for bad ``kv_*`` keys (``extra_kv_keys``: known to another runtime)."""
    run = runtime.configure(config, source=source, extra_kv_keys=extra_kv_keys,
                            log=lambda line: print(line, flush=True))
    info = runtime.model
    row = BenchRow(info.name, size_text(info.size_bytes), threads, len(prompt), len(continuation))
    say = lambda line: print(f"[h2o-gate bench] {line}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"{source}: warm-up run ({len(prompt)} + {len(continuation)} tokens)")
    run.run(prompt, continuation)
    keep = fidelity_run and len(continuation) > 0
    candidate_logits = None
    for rep in range(repeat):
        result = run.run(prompt, continuation, keep_logits=keep and rep == 0,
                         dump_dir=dump_kv if rep == 0 else None, run_id=f"{info.name}-bench")
        candidate_logits = result.logits if rep == 0 else candidate_logits
        row.add_run(result.prefill_tok_s, result.decode_tok_s, result.metrics)
        say(f"run {rep + 1}/{repeat}: prefill {result.prefill_tok_s:.1f} tok/s, decode {result.decode_tok_s:.2f} tok/s")
    summary = row.summary()
    if candidate_logits is not None:
        say("full-cache reference run for fidelity")
        reference = runtime.configure({}).run(prompt, continuation, keep_logits=True)
        summary.update(fidelity(reference.logits, candidate_logits, continuation))
    return row, summary


def read_config(path: Path | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ``-c`` JSON object (empty without one); a usage error names the file otherwise."""
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        parser.error(f"-c {path}: {exc.strerror or exc}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        parser.error(f"-c {path}: not valid JSON ({exc})")
    if not isinstance(config, dict):
        parser.error(f"-c {path}: expected a JSON object of kv_* keys, got {type(config).__name__}")
    return config


