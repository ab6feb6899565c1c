"""The machine a group of configurations was measured on, as pytest-benchmark's ``machine_info`` records it.

Speeds are only ever compared within one machine (one worker's own baseline runs); the report names the
machine of every measurement with these fields so that a reader can tell whose numbers are whose.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def machine_info() -> dict[str, Any]:
    """``node`` (host name), ``processor``, ``machine``, ``python_implementation``, ``python_version``,
    ``release``, ``system`` and ``cpu`` (``brand``, ``count``), the keys of pytest-benchmark's
    ``machine_info`` (``pytest_benchmark.utils.get_machine_info``); the CPU brand from py-cpuinfo when it is
    installed, else ``/proc/cpuinfo``'s ``model name``, else :func:`platform.processor`."""
    return {"node": platform.node(), "processor": platform.processor(), "machine": platform.machine(),
            "python_implementation": platform.python_implementation(), "python_version": platform.python_version(),
            "release": platform.release(), "system": platform.system(),
            "cpu": {"brand": _cpu_brand(), "count": os.cpu_count()}}


def _cpu_brand() -> str:
    try:
        import cpuinfo  # py-cpuinfo, optional (pytest-benchmark's own source of the brand)

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # noqa: BLE001 - an optional probe: any failure falls back to the next source
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
