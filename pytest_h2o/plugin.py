"""The pytest plugin (entry point ``pytest11: h2o``): ``--h2o-preset P`` turns a preset into gate tests.

Loaded into every pytest run of every project that has pytest-h2o installed, so it stays light: it
registers the options and a header line, and imports the gate (:mod:`.session`: the measurement,
the rules, numpy and the model code) only when a preset is asked for. Settings come from
:mod:`.options`; under pytest-xdist the controller picks the run folder and hands it to the workers;
only the controller writes reports, junit properties and history.
"""

from __future__ import annotations

from typing import Any

import pytest

from h2o_kernels import CODEC_NAME, PROFILE_VERSIONS
from pytest_h2o import __version__
from pytest_h2o.options import add_options, resolve

gate_key = pytest.StashKey[Any]()  # the session's GatePlugin, when gating


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the plugin and codec versions (and the preset, when gating) in the session header."""
    profiles = ", ".join(f"{profile} v{version}" for profile, version in PROFILE_VERSIONS.items())
    lines = [f"pytest-h2o {__version__}, codec {CODEC_NAME} ({profiles})"]
    plugin = config.stash.get(gate_key, None)
    if plugin is not None:
        g = plugin.gate
        lines.append(f"h2o gate: {g.name}, {len(g.points)} configurations, runtime {g.spec.runtime}, "
                     f"mode {g.mode}, codec {'/'.join(g.codec_profiles)}, reports in {g.out_dir}")
    return lines


def pytest_configure(config: pytest.Config) -> None:
    if resolve(config, "h2o_preset") is None:
        return
    from pytest_h2o.session import start

    config.stash[gate_key] = start(config)
