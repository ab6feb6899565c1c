"""The pytest11 plugin: loads through its entry point and names itself in the report header."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

import pytest_h2o
from h2o_kernels import PROFILE_VERSIONS
from h2o_kernels.codec.fp16 import CODEC_NAME

HEADER = (f"pytest-h2o {pytest_h2o.__version__}, codec {CODEC_NAME} "
          f"({', '.join(f'{p} v{v}' for p, v in PROFILE_VERSIONS.items())})")


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="pytest11") if ep.name == "h2o"]
    assert len(eps) == 1
    assert eps[0].value == "pytest_h2o.plugin"
    assert eps[0].load().pytest_report_header is not None


def test_plugin_is_active_in_this_session(request):
    assert request.config.pluginmanager.has_plugin("h2o")


def test_header_line_appears(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([HEADER])


def test_plugin_is_loaded_from_the_entry_point(pytester: pytest.Pytester):
    pytester.makepyfile(
        "def test_loaded(request):\n"
        "    plugin = request.config.pluginmanager.get_plugin('h2o')\n"
        "    assert plugin is not None and plugin.__name__ == 'pytest_h2o.plugin'\n"
    )
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([HEADER])


def test_disabling_the_plugin_removes_the_header(pytester: pytest.Pytester):
    pytester.makepyfile("def test_ok(request):\n    assert not request.config.pluginmanager.has_plugin('h2o')\n")
    result = pytester.runpytest("-p", "no:h2o")
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("pytest-h2o *")


def test_no_autoload_without_explicit_plugin(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("pytest-h2o *")
    explicit = pytester.runpytest_subprocess("-p", "pytest_h2o.plugin")
    explicit.assert_outcomes(passed=1)
    explicit.stdout.fnmatch_lines([HEADER])


def test_the_plugin_loads_nothing_heavy_without_a_gate(pytester: pytest.Pytester):
    """Loaded into every pytest run: without --h2o-preset it imports no numpy, codec or model code."""
    pytester.makepyfile(
        "import sys\n"
        "def test_light():\n"
        "    heavy = [m for m in ('numpy', 'zstandard', 'gguf', 'tokenizers', 'matplotlib', 'pytest_h2o.session')\n"
        "             if m in sys.modules]\n"
        "    assert heavy == []\n"
    )
    result = pytester.runpytest_subprocess("-p", "no:benchmark", "-p", "no:hypothesispytest", "-p", "no:xdist")
    result.assert_outcomes(passed=1)
