"""h2o-gate history: the trend of stored gate runs (one row per run) and a trend plot.

Every gate run appends a record to the history store (default ``.h2o/history``, see
:mod:`h2o_gates.history`); this prints them oldest first as a markdown table and writes a PNG with one
subplot per metric and one line per configuration. Records of every schema are shown; runs that did
not measure every configuration read ``incomplete``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from h2o_gates.history import DEFAULT_STORE, load_with_errors, preset_matches
from h2o_gates.trend import DEFAULT_TREND_METRICS, plot_trend, trend_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``history`` options."""
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="history directory")
    p.add_argument("--preset", help="only runs of this preset (file name or stem)")
    p.add_argument("--metric", action="append", dest="metrics", metavar="M",
                   help=f"metric to show, repeatable; without it: {', '.join(DEFAULT_TREND_METRICS)}")
    p.add_argument("--config", help="read table rows from this configuration; without it: the first passing one")
    p.add_argument("--plot", type=Path, help="trend plot path; without it: <store>/trend.png")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--last", type=int, metavar="N", help="only the N newest runs")
    p.set_defaults(run=run)


def _stored_metrics(records: list[dict]) -> set[str]:
    """The scalar metrics of any stored run (not per-round lists such as decode_log_ratios)."""
    return {m for r in records for c in r.get("configs", {}).values()
            for m, v in c.get("metrics", {}).items() if not isinstance(v, list)}


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Execute ``h2o-gate history``."""
    if args.last is not None and args.last < 1:
        parser.error("--last needs N >= 1")
    if not args.store.is_dir():
        parser.error(f"--store {args.store}: no such folder; a gate run creates it (default .h2o/history of the "
                     "project it ran in)")
    loaded = load_with_errors(args.store)
    for message in loaded.errors:
        print(f"h2o-gate history: {message}", file=sys.stderr)
    records = [r for r in loaded.records if preset_matches(r, args.preset)]
    if not records:
        presets = sorted({str(r.get("preset")) for r in loaded.records})
        scope = f" of preset {args.preset!r}" if args.preset else ""
        held = f" (it holds runs of: {', '.join(presets)})" if presets else ""
        print(f"h2o-gate history: no stored runs{scope} in {args.store}{held}; a gate run appends one there",
              file=sys.stderr)
        return 2
    if args.last is not None:
        records = records[-args.last:]
    metrics = args.metrics or list(DEFAULT_TREND_METRICS)
    if args.metrics:
        available = _stored_metrics(records)
        unknown = [m for m in args.metrics if m not in available]
        if unknown:
            parser.error(f"--metric {', '.join(unknown)}: in no stored run; stored: {', '.join(sorted(available))}")
    print(trend_table(records, metrics, config=args.config), end="")
    if args.no_plot:
        return 0
    path = plot_trend(records, args.plot or args.store / "trend.png", metrics, preset=args.preset)
    if path is None:
        print(f"no trend plot: no run has {', '.join(metrics)}", file=sys.stderr)
    else:
        print(f"wrote trend plot {path} ({len(records)} runs)")
    return 0
