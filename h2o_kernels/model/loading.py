"""Resolve a model spec (``smollm2``, ``path/model.gguf``, ``path/config.json``) to a loaded model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import GGUFReader
from tokenizers import Tokenizer

from h2o_kernels.model.fetch import local_smollm2_gguf, smollm2_gguf_path
from h2o_kernels.model.llama import LlamaConfig, LlamaModel, ModelConfigError, UnsupportedModelError, load_tokenizer

EMBEDDED_MODEL = "smollm2"


class ModelSpecError(ValueError):
    """A model spec names no usable model; the message says what was expected."""


@dataclass
class LoadedModel:
    """A model with its tokenizer (None for random-weight models), a short name and its size on disk."""

    model: LlamaModel
    tokenizer: Tokenizer | None
    name: str
    size_bytes: int


def load_model(spec: str, threads: int | None = 1, progress: Callable[[str], None] | None = None,
               model_option: str = "-m") -> LoadedModel:
    """Load ``spec``: the embedded SmolLM2 (fetched once), a GGUF file, or a HF-style config.json
    (random weights, no tokenizer: for fast tests).

    ``progress`` gets each line of a first-use download (default: stderr); ``model_option`` is the option that
    names a model file in error messages (``-m`` for ``h2o-gate``, ``--h2o-model`` for pytest). Raises
    :class:`ModelSpecError` (a bad spec or model config, naming the file and keys) or ``ModelFetchError``."""
    if spec == EMBEDDED_MODEL:
        path = smollm2_gguf_path(progress=progress, model_option=model_option)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ModelSpecError(f"{model_option} {spec}: {_missing(path)}; expected '{EMBEDDED_MODEL}', a .gguf file "
                                 f"or a config.json")
    if path.suffix == ".json":
        return _load_random(path, threads)
    try:
        reader = GGUFReader(str(path))
    except Exception:  # gguf raises ValueError/struct errors/OSError for foreign files
        raise ModelSpecError(f"{model_option} {spec}: {_not_gguf(path)}") from None
    name = EMBEDDED_MODEL if spec == EMBEDDED_MODEL else path.stem
    try:
        model, tokenizer = LlamaModel.from_gguf(reader, threads=threads), load_tokenizer(reader)
    except ModelConfigError as exc:
        raise ModelSpecError(str(exc)) from None
    except (UnsupportedModelError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"{path}: not a usable llama-architecture GGUF ({exc})") from None
    return LoadedModel(model, tokenizer, name, path.stat().st_size)


def model_config(spec: str, model_option: str = "-m") -> LlamaConfig | None:
    """The hyper-parameters of ``spec`` (as :func:`load_model` takes it) without loading weights or
    downloading: ``None`` when the embedded model is not fetched yet. Cheap (GGUF metadata only), so
    a run's sizes can be checked before anything is measured. Raises :class:`ModelSpecError`."""
    path = local_smollm2_gguf() if spec == EMBEDDED_MODEL else Path(spec)
    if path is None:
        return None
    if not path.is_file():
        raise ModelSpecError(f"{model_option} {spec}: {_missing(path)}; expected '{EMBEDDED_MODEL}', a .gguf file "
                             "or a config.json")
    try:
        if path.suffix == ".json":
            config = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ModelSpecError(f"{path}: expected a JSON object (a HF-style LLaMA config)")
            return LlamaConfig.from_hf_config(config, str(path))
        return LlamaConfig.from_gguf(GGUFReader(str(path)))
    except ModelConfigError as exc:
        raise ModelSpecError(str(exc)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{path}: not valid JSON ({exc})") from None
    except ModelSpecError:
        raise
    except Exception:  # gguf raises ValueError/struct errors/OSError for foreign files
        raise ModelSpecError(f"{model_option} {spec}: {_not_gguf(path)}") from None


def _missing(path: Path) -> str:
    return ("a folder, not a model file (a transformers model folder runs on the hf runtime)" if path.is_dir()
            else "no such file")


def _not_gguf(path: Path) -> str:
    """Why a file is no model, without the parser's internals (numpy dtype errors, struct errors)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    if magic == b"GGUF":
        return "a truncated or damaged GGUF file; fetch it again"
    return f"not a GGUF file; expected '{EMBEDDED_MODEL}', a .gguf file or a HF-style config.json"


def _load_random(path: Path, threads: int | None) -> LoadedModel:
    """A random-weight model from the HF-style ``config.json`` at ``path``; :class:`ModelSpecError` names the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelSpecError(f"{path}: expected a JSON object (a HF-style LLaMA config), got {type(config).__name__}")
    try:
        model = LlamaModel.random(LlamaConfig.from_hf_config(config, str(path)), threads=threads)
    except ModelConfigError as exc:
        raise ModelSpecError(str(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. a string rope_theta
        raise ModelSpecError(f"{path}: not a usable HF-style LLaMA config ({exc})") from None
    return LoadedModel(model, None, path.parent.name or path.stem, path.stat().st_size)
