"""h2o-gate: the gate's jobs outside pytest.

Subcommands:
- ``offline``: the offline lossless evaluator over KV dumps (the original's options and JSON keys).
- ``kv-dump``: run the reference model on real text and write its KV cache as dumps (``bench --dump-kv`` writes
  any in-process runtime's).
- ``bench``: the llm_bench equivalent on an in-process runtime, reference or hf (see :mod:`pytest_h2o.cli.bench`).
- ``sweep``: every point of a preset matrix, on an in-process runtime or an external llm_bench.
- ``parse-log``, ``analyze``, ``full-eval``: llm_bench logs to CSV, the quality gate over CSV + offline
  JSONs, and both plus the offline runs in one command (see :mod:`pytest_h2o.cli.analyze`).
- ``history``: the trend of stored gate runs across commits, as a table and a plot.
- ``fidelity``: a configuration's fidelity over the suite of texts, with sink+recent and full-cache rows
  (see :mod:`pytest_h2o.cli.fidelity`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from h2o_gates.reports import write_offline_markdown
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT
from h2o_kernels.lossless.offline_eval import CODEC_MODES, ENTRY_MODES, EvalOptions, SelectionError, evaluate
from h2o_kernels.model.kv_capture import capture_kv, prompt_ids
from h2o_kernels.model.loading import EMBEDDED_MODEL
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import check_text_file
from pytest_h2o.cli.analyze import add_analyze_arguments, add_full_eval_arguments, add_parse_log_arguments
from pytest_h2o.cli.args import (
    DefaultsFormatter,
    Parser,
    bounded_int,
    load_command_model,
    non_negative_int,
    positive_int,
)
from pytest_h2o.cli.bench import __doc__ as bench_doc
from pytest_h2o.cli.bench import add_arguments as add_bench_arguments
from pytest_h2o.cli.fidelity import __doc__ as fidelity_doc
from pytest_h2o.cli.fidelity import add_arguments as add_fidelity_arguments
from pytest_h2o.cli.history import __doc__ as history_doc
from pytest_h2o.cli.history import add_arguments as add_history_arguments
from pytest_h2o.cli.out_paths import OutPathError, check_out_dir, check_out_file
from pytest_h2o.cli.sweep import __doc__ as sweep_doc
from pytest_h2o.cli.sweep import add_arguments as add_sweep_arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``h2o-gate`` console script; returns the exit status."""
    parser = Parser(prog="h2o-gate", description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=DefaultsFormatter)
        p.set_defaults(subparser=p)
        return p

    _add_offline(add("offline", "offline lossless ratio of KV dumps (upper bound / online-sim)",
                     "Offline lossless evaluation of KV dumps with the runtime codec."))
    _add_kv_dump(add("kv-dump", "run the reference model on real text and dump its KV cache",
                     "Prefill real text, generate greedily, and write the KV cache (prefill and decode stages) "
                     "in the dump format."))
    add_bench_arguments(add("bench", "llm_bench on the reference or hf runtime (H2O or a press + runtime lossless)",
                            bench_doc.splitlines()[0]))
    add_sweep_arguments(add("sweep", "run every point of a preset matrix", sweep_doc.splitlines()[0]))
    add_parse_log_arguments(add("parse-log", "llm_bench markdown logs to one CSV",
                                "Parse llm_bench markdown logs into a CSV (the original parse_h2o_v4_log.py)."))
    add_analyze_arguments(add("analyze", "quality gate over the CSV and offline lossless JSONs",
                              "Gate parsed runs and offline lossless ratios; write summary.md (the original "
                              "analyze_h2o_v4.py). Exit 0 pass, 1 fail (0 with --exit-zero or "
                              "$H2O_ANALYZE_EXIT_ZERO=1, as the original), 2 usage error."))
    add_full_eval_arguments(add("full-eval", "parse + offline upper/online-sim + analyze in one go",
                                "RUN_DIR/logs and KV dumps to RUN_DIR/summary.md (the original run_full_eval.sh)."))
    add_history_arguments(add("history", "trend of stored gate runs across commits", history_doc.splitlines()[0]))
    add_fidelity_arguments(add("fidelity", "fidelity of a config over several texts, vs sink+recent",
                               fidelity_doc.splitlines()[0]))
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)


def _add_offline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dump-dir", required=True, type=Path,
                   help="directory with meta_*.json (+ K/V files) or .npz dumps")
    p.add_argument("--out-json", required=True, type=Path, help="where to write the JSON report")
    p.add_argument("--out-md", type=Path, help="optional markdown summary path")
    p.add_argument("--overwrite", action="store_true", help="allow overwriting --out-json/--out-md")
    p.add_argument("--stage", choices=["prefill", "decode", "both"], default="both", help="dump stages to read")
    p.add_argument("--scope", choices=["front_n", "layer_range", "layer_ids"], default="front_n",
                   help="which layers to evaluate")
    p.add_argument("--front-n", type=positive_int, default=2, help="scope=front_n: layers [0, front_n)")
    p.add_argument("--layer-start", type=non_negative_int, default=2, help="scope=layer_range: first layer")
    p.add_argument("--layer-end", type=bounded_int(-1), default=-1, help="scope=layer_range: last layer, -1 = no bound")
    p.add_argument("--layer-ids", default="", help="scope=layer_ids: comma-separated layer ids")
    p.add_argument("--zstd-level", type=bounded_int(1, 22), default=3, help="zstd compression level")
    p.add_argument("--strict-fp16", action="store_true", help="skip fp32 dumps instead of converting them")
    p.add_argument("--min-seq-len", type=non_negative_int, default=0, help="skip shorter entries")
    p.add_argument("--max-seq-len", type=non_negative_int, default=0, help="skip longer entries (0 = no bound)")
    p.add_argument("--entry-mode", choices=ENTRY_MODES, default="per_meta",
                   help="unit of compression: each entry, aggregated per layer, in chunks, or aggregated then chunked")
    p.add_argument("--online-chunk-seq", type=non_negative_int, default=0,
                   help="chunked modes: tokens per chunk (0 = whole)")
    p.add_argument("--online-framing-bytes", type=non_negative_int, default=16,
                   help="chunked modes: bytes charged per tensor chunk")
    p.add_argument("--aggregate-by-stage", action="store_true", help="aggregate modes: keep stages apart")
    p.add_argument("--codec-mode", choices=CODEC_MODES, default="adaptive_v22",
                   help="the original's codec modes, both run by our codec: adaptive_v22 = a predictor per block; "
                        "legacy = hi delta_seq, lo raw over the whole tensor")
    p.add_argument("--bitshuffle", action="store_true",
                   help="the original's bit-shuffle stage: refused, our codec's blob format has none")
    p.add_argument("--adaptive-block-seq", type=positive_int, default=64, help="tokens per predictor block")
    for tensor, default in (("k", K_DEFAULT), ("v", V_DEFAULT)):
        for plane in ("hi", "lo"):
            p.add_argument(f"--{tensor}-{plane}-predictors", default=",".join(default),
                           help=f"candidate predictors of the {tensor.upper()} {plane} byte plane, comma-separated")
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
        predictor_choice=args.predictor_choice, verify=not args.no_verify, plain_baseline=args.plain_baseline,
        codec_mode=args.codec_mode, bitshuffle=args.bitshuffle)
    try:
        options.validate()
    except ValueError as exc:
        parser.error(str(exc))
    outputs = _offline_outputs(args, parser)
    if not args.dump_dir.is_dir():
        parser.error(f"--dump-dir {args.dump_dir}: not a folder; expected the folder of a KV dump "
                     "(meta_*.json + K/V files, or .npz)")
    try:
        result = evaluate(args.dump_dir, options, progress=_Progress())
    except SelectionError as exc:
        print(f"h2o-gate offline: {exc}", file=sys.stderr)
        return 1
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if args.out_md:
        write_offline_markdown(args.out_md, result)
    for item in result["skipped"] if args.verbose else result["skipped"][:5]:
        cause = f" ({item['cause']})" if item["cause"] != item["reason"] else ""
        print(f"skipped {item['reason']}{cause}: {item['detail']}", file=sys.stderr)
    if len(result["skipped"]) > 5 and not args.verbose:
        print(f"... and {len(result['skipped']) - 5} more skipped (see --verbose or {args.out_json})", file=sys.stderr)
    if args.verbose:
        for layer, row in result["per_layer"].items():
            print(f"layer {layer}: {row['lossless_ratio']:.4f} ({row['raw_bytes']} -> {row['compressed_bytes']} bytes)")
    plain = f" plain={result['plain_zstd_ratio']:.4f}" if "plain_zstd_ratio" in result else ""
    print(f"[h2o-gate offline] {result['entry_mode']} {options.scope_text()} stage={result['stage']} "
          f"codec={result['codec']} v{result['codec_version']} ({result['codec_mode']}): "
          f"ratio={result['weighted_lossless_ratio']:.4f} k={result['k_lossless_ratio']:.4f} "
          f"v={result['v_lossless_ratio']:.4f}{plain} entries={result['selected_entries']} "
          f"skipped={result['skipped_entries']} verified={str(result['roundtrip_verified']).lower()} "
          f"encode={result['encode_mb_s']:.0f}MB/s decode={result['decode_mb_s']:.0f}MB/s "
          f"end-to-end={result['throughput_mb_s']:.0f}MB/s")
    print(f"wrote {' and '.join(str(p) for p in outputs)}")
    return 0


def _offline_outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Path]:
    """The report paths, checked before the evaluation: writable, and new unless ``--overwrite``."""
    named = [("--out-json", args.out_json)] + ([("--out-md", args.out_md)] if args.out_md else [])
    for option, path in named:
        try:
            check_out_file(path, option)
        except OutPathError as exc:
            parser.error(str(exc))
        if path.exists() and not args.overwrite:
            parser.error(f"{option} {path} already exists; use a new output path or pass --overwrite")
    if args.out_md and args.out_md.resolve() == args.out_json.resolve():
        parser.error(f"--out-md {args.out_md}: the same file as --out-json; give the markdown its own path")
    return [path for _, path in named]


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
    p.add_argument("-p", "--prompt-tokens", type=bounded_int(2), default=512, help="tokens of text to prefill")
    p.add_argument("-n", "--gen-tokens", type=non_negative_int, default=128, help="tokens to generate greedily")
    p.add_argument("--text-file", type=Path, help="text to read (default: Python's pydoc topic help)")
    p.add_argument("--run-id", help="run id written into the dump (default: derived from model and sizes)")
    p.add_argument("-t", "--threads", type=positive_int, default=1,
                   help="BLAS threads (1 is fastest on small machines)")
    p.set_defaults(run=_run_kv_dump)


def _run_kv_dump(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
