"""h2o-gate fidelity: what a configuration's KV cache costs the model over the fidelity suite.

Per text (prompt + teacher-forced continuation): the full-cache reference's perplexity, the configuration's
held ratio, top-1 agreement, perplexity delta and KL against it, and the same for the configuration without
heavy hitters (sink + recent tokens only); then min, median, max and the mean (what the gate reads).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from h2o_gates.fidelity_report import suite_text_lines, what_heavy_hitters_buy
from h2o_kernels.fidelity import DEFAULT_SUITE_SIZE, SUITE_KINDS, SUITE_TEXTS, SuiteTextError
from h2o_kernels.model.loading import EMBEDDED_MODEL
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from pytest_h2o.cli.args import add_runtime_arguments, check_command_config, load_command_runtime, positive_int
from pytest_h2o.cli.bench import read_config
from pytest_h2o.cli.out_paths import OutPathError, check_out_file
from pytest_h2o.fidelity_suite import Suite, read_texts, suite_tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The fidelity options (bench's names where they mean the same)."""
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL,
                   help=f"'{EMBEDDED_MODEL}' (embedded SmolLM2-135M-Instruct), a .gguf file, a HF-style config.json "
                        "(random weights) or, with --runtime hf, a transformers model folder")
    add_runtime_arguments(p)
    p.add_argument("-c", "--config", type=Path, required=True,
                   help="JSON with the kv_h2o_* / kv_lossless_* keys, or kv_press_* with --runtime hf")
    p.add_argument("-p", "--prompt-tokens", type=positive_int, default=512, help="prompt tokens (prefill)")
    p.add_argument("-n", "--gen-tokens", type=positive_int, default=128,
                   help="teacher-forced continuation tokens, each one scored")
    p.add_argument("-t", "--threads", type=positive_int, default=1, help="BLAS threads")
    kinds = "; ".join(f"{name}: {kind}" for name, kind in SUITE_KINDS.items())
    p.add_argument("--texts", nargs="+", default=list(SUITE_TEXTS[:DEFAULT_SUITE_SIZE]), metavar="TEXT",
                   help=f"suite texts by name or UTF-8 files ({kinds})")
    p.add_argument("--json", type=Path, help="also write the table's numbers here as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate fidelity``."""
    config = read_config(args.config, parser)
    check_command_config(config, str(args.config), args.runtime, parser)
    try:
        if args.json is not None:
            check_out_file(args.json, "--json")
        texts = read_texts(args.texts)
    except (ValueError, OutPathError) as exc:
        parser.error(str(exc))
    runtime = load_command_runtime(args, parser)
    try:
        check_run_fits(runtime.model.config, args.prompt_tokens, args.gen_tokens, "-p/-n", True)
        tokens = suite_tokens(runtime, texts, args.prompt_tokens, args.gen_tokens)
    except (RunTooLargeError, SuiteTextError) as exc:
        parser.error(f"{exc}; give fewer tokens (-p/-n) or other --texts")
    say = lambda line: print(f"[h2o-gate fidelity] {line}", file=sys.stderr, flush=True)  # noqa: E731
    suite = Suite(runtime, tokens, say).measure(config, str(args.config))
    print(f"{runtime.model.name} ({runtime.kind}), {args.prompt_tokens} + {args.gen_tokens} tokens, "
          f"config {args.config}")
    print("\n".join(suite_text_lines(suite, gated=False)))  # this command gates nothing
    comparison = what_heavy_hitters_buy(suite)
    if comparison:
        print(comparison)
    if all(row["h2o"]["held"] <= 1.0 for row in suite["texts"]):
        print(f"[WARN] nothing was evicted (held 1.00x on every text): check kv_h2o_enable, kv_h2o_trigger_min_tokens "
              f"(default 512) and the sink+recent floor against {args.prompt_tokens} + {args.gen_tokens} tokens",
              file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"model": runtime.model.name, "runtime": runtime.kind, "config": config, **suite}
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0
