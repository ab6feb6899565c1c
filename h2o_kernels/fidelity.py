"""What a compressed KV cache costs the model: next-token agreement, perplexity change and KL
divergence against a full-cache run over the same teacher-forced tokens."""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def fidelity(reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Compare ``candidate`` logits with full-cache ``reference`` logits (both ``[steps, vocab]``)
    predicting ``targets`` (``[steps]``).

    Returns ``h2o_fidelity_top1`` (share of steps with the same arg-max), ``h2o_fidelity_ppl_delta``
    (candidate perplexity over reference perplexity, minus one: 0.065 means +6.5%) and
    ``h2o_fidelity_kl`` (mean KL(reference || candidate) in nats).
    """
    if reference.shape != candidate.shape or reference.shape[0] != len(targets) or len(targets) == 0:
        raise ValueError(f"logits {reference.shape} / {candidate.shape} do not match {len(targets)} targets")
    ref, cand = log_softmax(reference), log_softmax(candidate)
    steps = np.arange(len(targets))
    ppl_ref = np.exp(-ref[steps, targets].mean())
    ppl_cand = np.exp(-cand[steps, targets].mean())
    kl = (np.exp(ref) * (ref - cand)).sum(axis=-1).mean()
    return {"h2o_fidelity_top1": float((reference.argmax(-1) == candidate.argmax(-1)).mean()),
            "h2o_fidelity_ppl_delta": float(ppl_cand / ppl_ref - 1.0),
            "h2o_fidelity_kl": float(kl)}


def continuation_perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    """Perplexity of ``targets`` (``[steps]``) under ``logits`` (``[steps, vocab]``)."""
    logp = log_softmax(logits)[np.arange(len(targets)), targets]
    return float(np.exp(-logp.mean()))


# The fidelity suite: real texts of different kinds from the Python standard library, in suite order.
SUITE_TEXTS: tuple[str, ...] = ("pydoc", "license", "source", "docs")
SUITE_KINDS: dict[str, str] = {"pydoc": "pydoc's topic help (English prose with code)",
                               "license": "Python's LICENSE.txt, as `license` prints it (legal text)",
                               "source": "argparse.py (Python source)",
                               "docs": "pydoc's plain-text documentation of the json module (API docs)"}
DEFAULT_SUITE_SIZE = 3


class SuiteTextError(ValueError):
    """A suite text cannot be read; the message names it and where it was looked for."""


def suite_text(name: str) -> str:
    """The text of one suite member (see :data:`SUITE_KINDS`)."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n".join(topics[key] for key in sorted(topics))
    if name == "license":
        return _license_text()
    if name == "source":
        import argparse
        import inspect

        return inspect.getsource(argparse)
    if name == "docs":
        import json
        import pydoc

        return pydoc.render_doc(json, renderer=pydoc.plaintext)
    raise SuiteTextError(f"unknown suite text {name!r}; expected one of {', '.join(SUITE_TEXTS)} or a file path")


def _license_text() -> str:
    """Python's license, from the files the ``license`` builtin reads."""
    import os
    from pathlib import Path

    here = Path(os.__file__).parent
    candidates = [folder / name for folder in (here.parent, here) for name in ("LICENSE.txt", "LICENSE")]
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise SuiteTextError(f"suite text 'license': this Python ships no license file (looked for "
                         f"{', '.join(map(str, candidates))}); pick other texts")


def spread(values: list[float]) -> dict[str, float]:
    """``mean`` (the aggregate the gate reads), ``min``, ``median`` and ``max`` of per-text numbers."""
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "median": float(np.median(values)),
            "max": float(np.max(values))}
