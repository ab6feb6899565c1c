"""Test-suite setup (the hypothesis profiles live in the root conftest.py)."""

pytest_plugins = ["pytester"]
