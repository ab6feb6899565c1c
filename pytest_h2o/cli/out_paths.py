"""Output locations checked before any work is done: a bad one is a one-line error naming the option and
the path, not a traceback at the end of a long run. Nothing is created; the checks only look."""

from __future__ import annotations

import os
from pathlib import Path


class OutPathError(ValueError):
    """An output file or folder cannot be written there; the message names the option and the path."""


def check_out_file(path: str | Path, option: str) -> Path:
    """``path`` as a Path if a file can be written there (created or overwritten), else OutPathError."""
    path = Path(path)
    if os.path.isdir(path):
        raise OutPathError(f"{option} {path}: is a folder; expected a file path")
    if os.path.lexists(path):
        if not os.access(path, os.W_OK):
            raise OutPathError(f"{option} {path}: the file is not writable; choose another path")
        return path
    _check_creatable(path, option)
    return path


def check_out_dir(path: str | Path, option: str) -> Path:
    """``path`` as a Path if it is (or can be created as) a writable folder, else OutPathError."""
    path = Path(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutPathError(f"{option} {path}: is a file, not a folder; choose a folder path")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutPathError(f"{option} {path}: the folder is not writable (permission denied); "
                               "choose a writable folder")
        return path
    _check_creatable(path, option)
    return path


def _check_creatable(path: Path, option: str) -> None:
    """The nearest existing ancestor of a missing ``path`` must be a writable folder."""
    ancestor = path.absolute().parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        raise OutPathError(f"{option} {path}: {ancestor} is a file, not a folder; choose a path in a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutPathError(f"{option} {path}: cannot create it in {ancestor} (permission denied); "
                           "choose a writable folder")
