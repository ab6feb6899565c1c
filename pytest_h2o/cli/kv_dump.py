"""``h2o-gate kv-dump``: run the reference model on real text and write its KV cache as dumps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2o_kernels.model.kv_capture import capture_kv, prompt_ids
from h2o_kernels.model.loading import EMBEDDED_MODEL
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import check_text_file
from pytest_h2o.cli.args import bounded_int, load_command_model, non_negative_int, positive_int
from pytest_h2o.cli.out_paths import check_out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``h2o-gate kv-dump``."""
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL,
                   help=f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct, fetched once), a .gguf file, "
                        "or a HF-style config.json (random weights, random token ids)")
    p.add_argument("--out", "--dump-dir", dest="out", type=Path, required=True, help="directory to write the dump to")
    p.add_argument("-p", "--prompt-tokens", type=bounded_int(2), default=512, help="tokens of text to prefill")
    p.add_argument("-n", "--gen-tokens", type=non_negative_int, default=128, help="tokens to generate greedily")
    p.add_argument("--text-file", type=Path, help="text to read (default: Python's pydoc topic help)")
    p.add_argument("--run-id", help="run id written into the dump (default: derived from model and sizes)")
    p.add_argument("-t", "--threads", type=positive_int, default=1,
                   help="BLAS threads (1 is fastest on small machines)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate kv-dump``."""
    try:
        check_out_dir(args.out, "--out")
        check_text_file(args.text_file, "--text-file")
    except ValueError as exc:
        parser.error(str(exc))
    text = args.text_file.read_text(encoding="utf-8") if args.text_file is not None else None
    loaded = load_command_model(args.model, args.threads, parser)
    model, tokenizer = loaded.model, loaded.tokenizer
    try:
        check_run_fits(model.config, args.prompt_tokens, args.gen_tokens, "-p/-n")
    except RunTooLargeError as exc:
        parser.error(str(exc))
    try:
        ids = prompt_ids(tokenizer, text, args.prompt_tokens, model.config.vocab_size)
    except ValueError as exc:
        parser.error(f"-p {args.prompt_tokens}: {exc}; give a longer --text-file or fewer tokens")
    run_id = args.run_id or f"{loaded.name}-p{args.prompt_tokens}-g{args.gen_tokens}"
    result = capture_kv(model, ids, args.gen_tokens, args.out, run_id,
                        progress=lambda line: print(f"[h2o-gate kv-dump] {line}", file=sys.stderr, flush=True))
    if tokenizer is not None:
        print(f"generated: {tokenizer.decode(result.generated)[:200]!r}", file=sys.stderr)
    print(f"[h2o-gate kv-dump] {result.entries} entries (run_id {run_id!r}) in {args.out}: "
          f"prefill {result.prefill_tok_s:.0f} tok/s, decode {result.decode_tok_s:.1f} tok/s, "
          f"prompt perplexity {result.prompt_perplexity:.2f}")
    return 0
