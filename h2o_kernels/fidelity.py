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
