"""Run a model on real text and capture its KV cache as dumps (prefill and decode stages)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

from h2o_kernels.codec.rope import model_rope
from h2o_kernels.fidelity import log_softmax, suite_text
from h2o_kernels.lossless.kvdump import write_dump
from h2o_kernels.model.llama import LlamaModel


def default_text() -> str:
    """Real English text from the standard library: pydoc's topic help, in sorted key order."""
    return suite_text("pydoc")


def prompt_ids(tokenizer: Tokenizer | None, text: str | None, count: int, vocab_size: int,
               seed: int = 0) -> np.ndarray:
    """``count`` token ids: the start of ``text`` (default: :func:`default_text`), or random ids
    where there is no tokenizer (random-weight models)."""
    if tokenizer is None:
        return np.random.default_rng(seed).integers(0, vocab_size, count)
    ids = tokenizer.encode(text if text is not None else default_text()).ids[:count]
    if len(ids) < count:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than the {count} asked for")
    return np.asarray(ids, dtype=np.int64)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """Teacher-forced perplexity of ``ids[1:]`` given logits ``[n, vocab]`` for ``ids``."""
    logp = log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(-logp.mean()))


@dataclass
class Capture:
    """What a capture run did and measured."""

    run_id: str
    prompt_tokens: int
    gen_tokens: int
    prompt_perplexity: float
    prefill_tok_s: float
    decode_tok_s: float
    generated: list[int]
    entries: int


def capture_kv(model: LlamaModel, ids: np.ndarray, gen_tokens: int, out_dir: Path, run_id: str,
               progress: Callable[[str], None] | None = None) -> Capture:
    """Prefill ``ids``, generate ``gen_tokens`` greedily, and write per layer a ``prefill`` entry
    (tokens 0..P-1) and a ``decode`` entry (tokens P..P+G-1) of fp16 K (after RoPE) and V."""
    say = progress or (lambda _: None)
    model.reset(capacity=len(ids) + gen_tokens)
    t0 = time.perf_counter()
    logits = model.prefill(ids, all_logits=True)
    prefill_s = time.perf_counter() - t0
    say(f"prefill: {len(ids)} tokens in {prefill_s:.2f}s, prompt perplexity {perplexity(logits, ids):.2f}")
    token = int(np.argmax(logits[-1]))
    generated: list[int] = []
    t0 = time.perf_counter()
    for step in range(gen_tokens):  # every generated token is fed, so the cache holds P + G tokens
        generated.append(token)
        token = int(np.argmax(model.decode(token)))
        if (step + 1) % 32 == 0 or step + 1 == gen_tokens:
            say(f"decode: {step + 1}/{gen_tokens} tokens")
    decode_s = time.perf_counter() - t0
    cache = model.cache
    prompt = len(ids)
    rope = model_rope(model.config.rope_theta)  # K is stored after rotate-half RoPE (llama._rope)
    for layer in range(cache.num_layers):
        k, v = cache.k(layer), cache.v(layer)
        write_dump(out_dir, run_id=run_id, stage="prefill", layer_id=layer, seq_start=0, k=k[:prompt], v=v[:prompt],
                   rope=rope)
        if gen_tokens:
            write_dump(out_dir, run_id=run_id, stage="decode", layer_id=layer, seq_start=prompt,
                       k=k[prompt:], v=v[prompt:], rope=rope)
    return Capture(run_id, prompt, gen_tokens, perplexity(logits, ids), prompt / prefill_s,
                   gen_tokens / decode_s if gen_tokens else 0.0, generated,
                   cache.num_layers * (2 if gen_tokens else 1))
