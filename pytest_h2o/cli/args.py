"""Argument helpers shared by the ``h2o-gate`` subcommands: bounded integer types, a help formatter that
shows defaults, and input-file checks done before any model is loaded.

Light to import (``h2o-gate`` builds its parser from it): the model and runtime modules are imported by the
helpers that need them."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, Callable, NoReturn

if TYPE_CHECKING:
    from h2o_kernels.model.loading import LoadedModel
    from h2o_kernels.runtimes.base import Runtime


def bounded_int(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``; argparse prefixes the error with the option's name."""
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    parse.__name__ = "bounded_int"
    return parse


positive_int = bounded_int(1)
non_negative_int = bounded_int(0)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage error is two lines: the error, then where the options are listed."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nsee '{self.prog} --help' for the options\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help when it has a meaningful default and its help does not
    already say one (no ``None``, ``False`` of a flag or empty string)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        silent = default is None or default is False or default is argparse.SUPPRESS or default == ""
        if silent or "(default" in (action.help or "") or not action.option_strings:
            return action.help
        return super()._get_help_string(action)


def load_command_model(spec: str, threads: int, parser: argparse.ArgumentParser) -> LoadedModel:
    """:func:`load_model` for a subcommand: a bad model spec is its usage error (exit 2); a download that
    fails (no package index, say) exits 1 with the manual-fetch hint."""
    from h2o_kernels.model.fetch import ModelFetchError
    from h2o_kernels.model.loading import ModelSpecError, load_model

    try:
        return load_model(spec, threads=threads)
    except ModelSpecError as exc:
        parser.error(str(exc))
    except ModelFetchError as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """``--runtime`` and ``--device`` (defaults from ``$H2O_RUNTIME`` / ``$H2O_DEVICE``, as the plugin reads them)."""
    from h2o_kernels.runtimes.registry import DEVICES, IN_PROCESS

    p.add_argument("--runtime", choices=IN_PROCESS, default=os.environ.get("H2O_RUNTIME") or "reference",
                   help="reference (numpy) or hf (transformers: the hf extra); $H2O_RUNTIME")
    p.add_argument("--device", choices=DEVICES, default=os.environ.get("H2O_DEVICE") or "cpu",
                   help="the hf runtime's device; $H2O_DEVICE")


def check_command_config(config: dict[str, Any], source: str, runtime: str, parser: argparse.ArgumentParser,
                         extra_kv_keys: tuple[str, ...] = ()) -> None:
    """A usage error (exit 2), before any model is loaded, for a ``kv_*`` key ``runtime`` cannot take or a press
    that does not resolve."""
    from h2o_kernels.runtimes.base import check_config
    from h2o_kernels.runtimes.registry import RuntimeUnavailableError, check_press_config

    try:
        check_config(config, source, extra_kv_keys, runtime=runtime)
        if runtime == "hf":
            check_press_config(config, source)
    except (ValueError, RuntimeUnavailableError) as exc:
        parser.error(str(exc))


def load_command_runtime(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Runtime:
    """``args.model`` on ``args.runtime`` (``args.device``, ``args.threads``): a bad model spec, a missing extra or
    device is a usage error (exit 2); a download that fails exits 1 with the manual-fetch hint."""
    from h2o_kernels.model.fetch import ModelFetchError
    from h2o_kernels.model.loading import ModelSpecError
    from h2o_kernels.runtimes.registry import IN_PROCESS, RuntimeUnavailableError, open_runtime

    if args.runtime not in IN_PROCESS:
        parser.error(f"--runtime {args.runtime}: expected one of {', '.join(IN_PROCESS)} (from $H2O_RUNTIME?)")
    try:
        return open_runtime(args.runtime, args.model, threads=args.threads, device=args.device)
    except (ModelSpecError, RuntimeUnavailableError, ValueError) as exc:
        parser.error(str(exc).replace("device cuda:", "--device cuda:"))
    except ModelFetchError as exc:
        parser.exit(1, f"{parser.prog}: {exc}\n")

