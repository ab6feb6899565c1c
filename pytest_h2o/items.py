"""The collected items of a gate run: ``<preset>::<rule>[<configuration>]`` (configuration-major order),
``<preset>::overall_pass`` and ``<preset>::compare[<metric>:<tolerance>]``.

``<preset>`` is the preset file's stem with dots made underscores, so that junit's ``classname`` is
the preset alone and pytest's ``-v`` lines and CI viewers never split a label such as ``keep0.30``
into bogus packages (a rule parametrized over the configurations, as ``test_x[param]`` is).

Items only read the gate's report; the first one to need numbers triggers the (single) measurement.
The exit status is the gate's verdict: ``overall_pass``, the history comparisons and a configuration
that could not be measured fail the run; a measured configuration that misses a rule is reported
(xfailed, with its reason) but fails the run only in strict mode (``--h2o-strict``), where every
configuration must pass every rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from h2o_gates.history import CompareSpec, regressions
from h2o_gates.rules import RULES, format_number
from h2o_presets.matrix import PRESET_DIR
from pytest_h2o.compare import HistorySetup
from pytest_h2o.gate import Gate


class GateFailure(AssertionError):
    """A rule did not hold; the message is its one-line reason."""


def node_name(gate: Gate) -> str:
    """The preset's node name: its file stem, dots made underscores (``target_joint_scope_v4``)."""
    return gate.preset_path.stem.replace(".", "_")


class PresetCollector(pytest.Collector):
    """The preset: every rule of every configuration, then ``overall_pass`` and any history comparisons."""

    def __init__(self, *, gate: Gate, history: HistorySetup, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate, self.history = gate, history

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        children: list[pytest.Item | pytest.Collector] = [
            RuleItem.from_parent(self, name=f"{rule}[{point.label}]", gate=self.gate, config_name=point.label,
                                 rule=rule) for point in self.gate.points for rule in RULES]
        children.append(OverallItem.from_parent(self, name="overall_pass", gate=self.gate))
        children += [CompareItem.from_parent(self, name=f"compare[{spec}]", gate=self.gate, history=self.history,
                                             spec=spec) for spec in self.history.specs]
        return children

    def reportinfo(self):
        return _location(self.gate, self.config), None, self.name


class _GateItem(pytest.Item):
    def __init__(self, *, gate: Gate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):  # type: ignore[override]
        if isinstance(excinfo.value, GateFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return _location(self.gate, self.config), 0, self.name


def _location(gate: Gate, config: pytest.Config) -> Path:
    """Where an item's report points (skip lines of ``-ra`` too): the preset file when it is the
    project's own, else the bare preset name (a bundled preset: never a path into site-packages,
    which may lie inside the project as ``.venv/``)."""
    path = gate.preset_path
    bundled = path.parent == PRESET_DIR
    return path if path.is_relative_to(config.rootpath) and not bundled else Path(path.name)


def _skip(reason: str) -> None:
    """Skip reported at the item (the preset file), not at this module's line."""
    raise pytest.skip.Exception(reason, _use_item_location=True)


class RuleItem(_GateItem):
    """``<preset>::<configuration>::<rule>``: a rule that does not hold fails in strict mode and is
    xfailed otherwise, with its one-line reason either way; skipped when the rule is off (its value
    still reported). A configuration that was not measured fails every rule that is on."""

    def __init__(self, *, config_name: str, rule: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_name, self.rule = config_name, rule

    def runtest(self) -> None:
        report = self.gate.report()
        config = next(c for c in report["configs"] if c["name"] == self.config_name)
        error = config["metrics"].get("error") or report.get("fatal")
        verdict = config["verdicts"][self.rule]
        if not verdict["enabled"]:
            _skip(f"not enforced: {'not measured' if error else verdict['reason']}")
        if error:
            raise GateFailure(f"{self.config_name}: not measured: {error}")
        if not verdict["passed"]:
            self._miss(f"{self.rule}: {verdict['reason']}")

    def _miss(self, reason: str) -> None:
        if self.gate.strict:
            raise GateFailure(reason)
        pytest.xfail(f"{reason} [information: the exit status follows overall_pass; --h2o-strict fails it]")


class OverallItem(_GateItem):
    """``<preset>::overall_pass``: the gate's verdict in the chosen mode; the message names the
    passing configuration, or why none passes."""

    def runtest(self) -> None:
        overall = self.gate.report()["overall"]
        if not overall["passed"]:
            raise GateFailure(f"overall_pass ({overall['mode']}): {overall['reason']}")


class CompareItem(_GateItem):
    """``<preset>::compare[METRIC:TOL%]``: fails when a configuration regressed beyond tolerance
    against the stored run; skipped when the store holds nothing to compare with."""

    def __init__(self, *, history: HistorySetup, spec: CompareSpec, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history, self.spec = history, spec

    def runtest(self) -> None:
        if self.history.previous is None:
            _skip(self.history.missing)
        bad = regressions(self.history.compare(self.gate.report(), [self.spec]))
        if bad:
            raise GateFailure("; ".join(
                f"{c.config}: {c.basis} {c.old:.4g} -> {c.new:.4g} ({format_number('{:+.2f}', c.change)}"
                f"{' pp' if c.unit == 'pp' else '%'}, tolerance {c.tolerance:g}) {c.note}".rstrip()
                if not c.missing else f"{c.config}: {c.note}" for c in bad))
