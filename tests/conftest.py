"""Test-suite setup (the hypothesis profiles live in the root conftest.py) and fixtures shared by modules."""

import shutil
from pathlib import Path

import pytest
from h2o_test_helpers import write_standard_dump

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def std_dir(tmp_path_factory) -> Path:
    """The standard KV dump (written once per module)."""
    return write_standard_dump(tmp_path_factory.mktemp("std"))


@pytest.fixture
def work_dir(std_dir, tmp_path) -> Path:
    """A private copy of the standard dump, free to damage."""
    return Path(shutil.copytree(std_dir, tmp_path / "dump"))
