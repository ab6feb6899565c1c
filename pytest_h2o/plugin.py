"""The pytest plugin (entry point ``pytest11: h2o``)."""

from __future__ import annotations

import pytest

from h2o_kernels.codec import CODEC_NAME, FORMAT_VERSION

from . import __version__


def pytest_report_header(config: pytest.Config) -> str:
    """Name the plugin and codec versions in the session header."""
    return f"pytest-h2o {__version__}, codec {CODEC_NAME} v{FORMAT_VERSION}"
