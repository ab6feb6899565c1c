"""pytest-h2o is loaded into every pytest run of every project that has it installed: it must be
harmless there. Each test runs a user's project in a subprocess with the installed plugin (entry
point ``pytest11: h2o``), as a real project would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TINY_CONFIG = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 300}
USER_TESTS = """
from gates import check
from presets import NAME
from presets.matrix import ROWS


def test_own_gates_module():
    assert check() == "user gates"


def test_own_presets_package():
    assert (NAME, ROWS) == ("user presets", 3)
"""
# plugins that are not ours (pytest-benchmark writes .benchmarks/ wherever it is installed)
NOT_OURS = ("-p", "no:benchmark", "-p", "no:cacheprovider")


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> Path:
    """A project with its own top-level ``gates`` module and ``presets`` package, and its tests."""
    pytester.makepyfile(gates='def check():\n    return "user gates"\n')
    package = pytester.mkpydir("presets")
    (package / "__init__.py").write_text('NAME = "user presets"\n')
    (package / "matrix.py").write_text("ROWS = 3\n")
    pytester.makepyfile(test_user=USER_TESTS)
    pytester.makeini("[pytest]\npythonpath = .\n")
    return pytester.path


def _tree(root: Path) -> set[str]:
    """The project's files, but for Python's bytecode and what pytester writes itself."""
    pytester_own = ("runpytest-", "stdout", "stderr")
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts
            and not p.relative_to(root).parts[0].startswith(pytester_own)}


def test_help_works_in_any_project(pytester: pytest.Pytester, user_project: Path):
    result = pytester.runpytest_subprocess("--help", *NOT_OURS)
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*--h2o-preset*", "*--h2o-decode-drop-target*"])
    assert "Traceback (most recent call last)" not in result.stdout.str() + result.stderr.str()


def test_a_user_project_with_its_own_gates_and_presets_passes_and_keeps_its_tree(pytester: pytest.Pytester,
                                                                               user_project: Path):
    before = _tree(user_project)
    result = pytester.runpytest_subprocess("-p", "no:xdist", *NOT_OURS)
    result.assert_outcomes(passed=2)
    ours = [line for line in result.outlines + result.errlines if "h2o" in line.lower()
            and not line.startswith("plugins:")]
    assert ours == ["pytest-h2o 0.1.0, codec h2o-fp16-predictive (fast v3, ratio v2)"]
    assert _tree(user_project) == before  # no report folder, no history, no lock file
    help_run = pytester.runpytest_subprocess("--help", *NOT_OURS)
    assert help_run.ret == 0 and _tree(user_project) == before


def test_the_users_modules_win_beside_a_running_gate(pytester: pytest.Pytester, user_project: Path):
    """With a gate running in the same session (the plugin's gate and preset code imported), the
    project's own ``gates`` and ``presets`` are still the ones its tests import."""
    (user_project / "model.json").write_text(json.dumps(TINY_CONFIG))
    (user_project / "tiny.json").write_text(json.dumps({
        "prompts": [32], "gens": [8], "repeat": 1, "h2o_keep_ratios": [0.5], "h2o_block_tokens": [4],
        "h2o_sink_tokens": [4], "h2o_recent_tokens": [8], "h2o_trigger_min_tokens": [16]}))
    result = pytester.runpytest_subprocess("--h2o-preset=tiny.json", "--h2o-model=model.json", "--h2o-out=out",
                                           "--h2o-lossy-target=1.0", "--h2o-decode-drop-target=0.99",
                                           "test_user.py", "-v", "-p", "no:xdist", *NOT_OURS)
    result.stdout.fnmatch_lines(["test_user.py::test_own_gates_module PASSED*",
                                 "test_user.py::test_own_presets_package PASSED*", "tiny::overall_pass *"])


def test_version_and_help_load_nothing_heavy(tmp_path: Path):
    probe = ("import sys, pytest\n"
             "for args in (['--version'], ['--help']):\n"
             "    others = ['-p', 'no:benchmark', '-p', 'no:hypothesispytest', '-p', 'no:xdist']\n"
             "    assert pytest.main([*args, *others]) == 0\n"
             "heavy = ('numpy', 'matplotlib', 'zstandard', 'gguf', 'jsonschema', 'h2o_gates', 'h2o_presets',\n"
             "         'pytest_h2o.session')\n"
             "print('HEAVY', sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout.splitlines()
