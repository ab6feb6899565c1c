"""``h2o-gate offline``: the offline lossless evaluator over KV dumps (the original's options and JSON keys, plus
``--codec``, ``--rope-theta`` and ``--jobs``); see :mod:`h2o_kernels.lossless.offline_eval`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from h2o_gates.reports import write_offline_markdown
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT
from h2o_kernels.codec.profiles import PROFILES
from h2o_kernels.lossless.offline_eval import (
    CODEC_MODES,
    ENTRY_MODES,
    EvalOptions,
    SelectionError,
    default_jobs,
    evaluate,
)
from pytest_h2o.cli.args import bounded_int, non_negative_int, positive_int
from pytest_h2o.cli.out_paths import OutPathError, check_out_file

SHOWN = 5  # skipped files and warnings printed without --verbose


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``h2o-gate offline``."""
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
    p.add_argument("--zstd-level", type=bounded_int(1, 22), default=3,
                   help="zstd level of the fast profile and of --plain-baseline (the ratio profile's safety net "
                        "codes at the fast profile's default, 3)")
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
    p.add_argument("--codec", choices=PROFILES, default="fast",
                   help="codec profile: fast (blob v3: byte planes, predictors, zstd) or ratio (blob v2: context "
                        "model + range coder, row matching; slower, smaller)")
    p.add_argument("--codec-mode", choices=CODEC_MODES, default="adaptive_v22",
                   help="the original's codec modes, both run by our codec: adaptive_v22 = a predictor per block; "
                        "legacy = hi delta_seq, lo raw over the whole tensor (fast profile only)")
    p.add_argument("--bitshuffle", action="store_true",
                   help="the original's bit-shuffle stage: refused, our codec's blob format has none")
    p.add_argument("--adaptive-block-seq", type=positive_int, default=64, help="tokens per predictor block")
    for tensor, default in (("k", K_DEFAULT), ("v", V_DEFAULT)):
        for plane in ("hi", "lo"):
            p.add_argument(f"--{tensor}-{plane}-predictors", default=",".join(default),
                           help=f"candidate predictors of the {tensor.upper()} {plane} byte plane, comma-separated")
    p.add_argument("--predictor-choice", choices=["estimate", "exhaustive"], default="estimate",
                   help="pick each block's predictor by a fast entropy estimate or by compressing every candidate")
    p.add_argument("--rope-theta", type=float,
                   help="--codec ratio: the model's RoPE base for matching K rows, over what the dumps' meta records "
                        "(rope_theta; without either, K rows are not matched through RoPE)")
    p.add_argument("--jobs", type=positive_int, default=default_jobs(),
                   help="worker threads (the report is the same for any number)")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every blob back (ratios unverified)")
    p.add_argument("--plain-baseline", action="store_true",
                   help="also report plain 'split planes + zstd' on the same chunks (plain_zstd_ratio)")
    p.add_argument("--verbose", action="store_true", help="print every skipped file and the per-layer ratios")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate offline``."""
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
        codec_mode=args.codec_mode, bitshuffle=args.bitshuffle, codec=args.codec, rope_theta=args.rope_theta,
        jobs=args.jobs)
    try:
        options.validate()
    except ValueError as exc:
        parser.error(str(exc))
    outputs = _outputs(args, parser)
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
    _print_notes(args, result)
    plain = f" plain={result['plain_zstd_ratio']:.4f}" if "plain_zstd_ratio" in result else ""
    print(f"[h2o-gate offline] {result['entry_mode']} {options.scope_text()} stage={result['stage']} "
          f"codec={result['codec']} {result['codec_profile']} v{result['codec_version']} ({result['codec_mode']}): "
          f"ratio={result['weighted_lossless_ratio']:.4f} k={result['k_lossless_ratio']:.4f} "
          f"v={result['v_lossless_ratio']:.4f}{plain} entries={result['selected_entries']} "
          f"skipped={result['skipped_entries']} verified={str(result['roundtrip_verified']).lower()} "
          f"encode={result['encode_mb_s']:.0f}MB/s decode={result['decode_mb_s']:.0f}MB/s "
          f"end-to-end={result['throughput_mb_s']:.0f}MB/s")
    print(f"wrote {' and '.join(str(p) for p in outputs)}")
    return 0


def _print_notes(args: argparse.Namespace, result: dict) -> None:
    """Warnings and skipped files on stderr (the first few unless ``--verbose``), then per-layer ratios."""
    shown = (lambda items: items) if args.verbose else (lambda items: items[:SHOWN])
    for line in shown(result["warnings"]):
        print(f"[WARN] {line}", file=sys.stderr)
    if len(result["warnings"]) > SHOWN and not args.verbose:
        print(f"[WARN] ... and {len(result['warnings']) - SHOWN} more warnings (see --verbose or {args.out_json})",
              file=sys.stderr)
    for item in shown(result["skipped"]):
        cause = f" ({item['cause']})" if item["cause"] != item["reason"] else ""
        print(f"skipped {item['reason']}{cause}: {item['detail']}", file=sys.stderr)
    if len(result["skipped"]) > SHOWN and not args.verbose:
        print(f"... and {len(result['skipped']) - SHOWN} more skipped (see --verbose or {args.out_json})",
              file=sys.stderr)
    if args.verbose:
        for layer, row in result["per_layer"].items():
            print(f"layer {layer}: {row['lossless_ratio']:.4f} ({row['raw_bytes']} -> {row['compressed_bytes']} bytes)")


def _outputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[Path]:
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
