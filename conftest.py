"""Project-wide test setup: hypothesis profiles (``ci`` when $CI is set, ``dev`` otherwise).

pytest loads this file for every run in the repository, the gate runs of ``pip install .`` (no dev
extra, no hypothesis) included, so the profiles are registered only where hypothesis is installed."""

import os

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # a gate-only install: no property tests to configure
    settings = None

if settings is not None:
    settings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=60, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
