"""Resolve a model spec (``smollm2``, ``path/model.gguf``, ``path/config.json``) to a loaded model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFReader
from tokenizers import Tokenizer

from .llama import LlamaModel, UnsupportedModelError, load_tokenizer
from .model_fetch import smollm2_gguf_path

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


def load_model(spec: str, threads: int | None = 1) -> LoadedModel:
    """Load ``spec``: the embedded SmolLM2 (fetched once), a GGUF file, or a HF-style config.json
    (random weights, no tokenizer: for fast tests)."""
    if spec == EMBEDDED_MODEL:
        path = smollm2_gguf_path()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ModelSpecError(f"-m {spec}: no such file; expected '{EMBEDDED_MODEL}', a .gguf file "
                                 f"or a config.json")
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            model = LlamaModel.random(config, threads=threads)
            return LoadedModel(model, None, path.parent.name or path.stem, path.stat().st_size)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelSpecError(f"{path}: not valid JSON ({exc})") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelSpecError(f"{path}: not a usable HF-style LLaMA config ({exc!r}); expected keys "
                                 "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                                 "vocab_size") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors/OSError for foreign files
        raise ModelSpecError(f"{path}: not a readable GGUF file ({exc})") from None
    name = EMBEDDED_MODEL if spec == EMBEDDED_MODEL else path.stem
    try:
        model, tokenizer = LlamaModel.from_gguf(reader, threads=threads), load_tokenizer(reader)
    except (UnsupportedModelError, KeyError, TypeError) as exc:
        raise ModelSpecError(f"{path}: not a usable llama-architecture GGUF ({exc})") from None
    return LoadedModel(model, tokenizer, name, path.stat().st_size)
