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

Start-up stays small: the parser lists every subcommand by name, but only the chosen subcommand's module is
imported (for its options and its implementation), so ``h2o-gate offline`` does not load the model, runtimes or
gate modules of the others.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Sequence

from pytest_h2o.cli.args import DefaultsFormatter, Parser


@dataclass(frozen=True)
class Command:
    """A subcommand: its module under ``pytest_h2o.cli``, the function there that adds its options (and sets
    ``run``), its one-line help, and its description (None: the module docstring's first line)."""

    module: str
    add: str
    help: str
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "offline": Command("offline", "add_arguments", "offline lossless ratio of KV dumps (upper bound / online-sim)",
                       "Offline lossless evaluation of KV dumps with the runtime codec."),
    "kv-dump": Command("kv_dump", "add_arguments", "run the reference model on real text and dump its KV cache",
                       "Prefill real text, generate greedily, and write the KV cache (prefill and decode stages) in "
                       "the dump format."),
    "bench": Command("bench", "add_arguments",
                     "llm_bench on the reference or hf runtime (H2O or a press + runtime lossless)"),
    "sweep": Command("sweep", "add_arguments", "run every point of a preset matrix"),
    "parse-log": Command("analyze", "add_parse_log_arguments", "llm_bench markdown logs to one CSV",
                         "Parse llm_bench markdown logs into a CSV (the original parse_h2o_v4_log.py)."),
    "analyze": Command("analyze", "add_analyze_arguments", "quality gate over the CSV and offline lossless JSONs",
                       "Gate parsed runs and offline lossless ratios; write summary.md (the original "
                       "analyze_h2o_v4.py). Exit 0 pass, 1 fail (0 with --exit-zero or $H2O_ANALYZE_EXIT_ZERO=1, "
                       "as the original), 2 usage error."),
    "full-eval": Command("analyze", "add_full_eval_arguments", "parse + offline upper/online-sim + analyze in one go",
                         "RUN_DIR/logs and KV dumps to RUN_DIR/summary.md (the original run_full_eval.sh)."),
    "history": Command("history", "add_arguments", "trend of stored gate runs across commits"),
    "fidelity": Command("fidelity", "add_arguments", "fidelity of a config over several texts, vs sink+recent"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``h2o-gate`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = Parser(prog="h2o-gate", description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    for name, command in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(f"pytest_h2o.cli.{command.module}")
            description = command.description or (module.__doc__ or "").splitlines()[0]
            p = sub.add_parser(name, help=command.help, description=description, formatter_class=DefaultsFormatter)
            p.set_defaults(subparser=p)
            getattr(module, command.add)(p)
        else:  # never parsed: the top-level help lists it by name only
            sub.add_parser(name, help=command.help)
    args = parser.parse_args(argv)
    return args.run(args, args.subparser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
