"""Decode speed of the reference runtime against a plain numpy decoder, and of H2O configs against each other.

Paired, interleaved rounds on the same prompt (real text), one BLAS thread, after one discarded warm-up each::

    python benchmarks/decode_speed.py plain                  # runtime, full cache, vs the plain decoder below
    python benchmarks/decode_speed.py pair A.json B.json     # two runtime configs (kv_* JSON files)

Each round runs the two sides in an order alternated every round and prints their decode tok/s; the summary is
the median over rounds of the per-round ratio (first side / second side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from h2o_kernels.model.llama import LlamaModel, _blas_threads, _rms_norm, _rope
from h2o_kernels.model.loading import load_model
from h2o_kernels.runtimes.base import run_tokens
from h2o_kernels.runtimes.reference import ReferenceRun, ReferenceRuntime


class PlainDecoder:
    """The same model and fp32 math as :class:`LlamaModel`, written plainly: one fp32 KV cache
    ``[kv_heads, capacity, head_dim]`` per layer, no hooks, no fp16 storage."""

    def __init__(self, model: LlamaModel) -> None:
        self.m = model
        self.c = model.config

    def run(self, prompt: np.ndarray, continuation: np.ndarray) -> float:
        """Prefill ``prompt``, teacher-force ``continuation``; decode tok/s."""
        c = self.c
        cap = len(prompt) + len(continuation)
        self.k = [np.zeros((c.num_kv_heads, cap, c.head_dim), np.float32) for _ in range(c.num_layers)]
        self.v = [np.zeros((c.num_kv_heads, cap, c.head_dim), np.float32) for _ in range(c.num_layers)]
        self.n = 0
        with _blas_threads(self.m.threads):
            self.forward(prompt)
            t0 = time.perf_counter()
            for token in continuation:
                self.forward(np.array([token]))
        return len(continuation) / (time.perf_counter() - t0)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        m, c = self.m, self.c
        T, nh, nkv, D, F = len(ids), c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        ang = np.arange(self.n, self.n + T)[:, None, None] * m._inv_freq
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        x = m.embed[ids].astype(np.float32)
        S = self.n + T
        for li, L in enumerate(m.layers):
            qkv = _rms_norm(x, L.attn_norm, c.rms_eps) @ L.wqkv
            q = _rope(qkv[:, : nh * D].reshape(T, nh, D), cos, sin) * np.float32(D ** -0.5)
            k = _rope(qkv[:, nh * D: (nh + nkv) * D].reshape(T, nkv, D), cos, sin)
            self.k[li][:, self.n:S] = k.transpose(1, 0, 2)
            self.v[li][:, self.n:S] = qkv[:, (nh + nkv) * D:].reshape(T, nkv, D).transpose(1, 0, 2)
            qg = q.reshape(T, nkv, nh // nkv, D).transpose(1, 2, 0, 3).reshape(nkv, -1, D)
            s = qg @ self.k[li][:, :S].transpose(0, 2, 1)
            if T > 1:
                s.reshape(nkv, -1, T, S)[..., S - T:] += np.triu(np.full((T, T), -np.inf, np.float32), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = (s @ self.v[li][:, :S]).reshape(nkv, nh // nkv, T, D).transpose(2, 0, 1, 3).reshape(T, nh * D)
            x = x + o @ L.wo
            gu = _rms_norm(x, L.ffn_norm, c.rms_eps) @ L.w_gate_up
            g = gu[:, :F]
            x = x + (g * (0.5 + 0.5 * np.tanh(0.5 * g)) * gu[:, F:]) @ L.w_down
        self.n = S
        return _rms_norm(x[-1:], m.norm, c.rms_eps) @ m.head


def runtime_side(model: LlamaModel, config: dict[str, Any]) -> Callable[[np.ndarray, np.ndarray], float]:
    rt = ReferenceRun(model, config)
    return lambda p, c: rt.run(p, c).decode_tok_s


def paired(sides: dict[str, Callable[[np.ndarray, np.ndarray], float]], prompt: np.ndarray, cont: np.ndarray,
           rounds: int) -> list[float]:
    """Per-round ratios first/second side, the order alternated every round (after one warm-up each)."""
    names = list(sides)
    for name in names:
        sides[name](prompt, cont)
    ratios = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        speeds = {name: sides[name](prompt, cont) for name in order}
        ratios.append(speeds[names[0]] / speeds[names[1]])
        print(f"round {r + 1}: " + "  ".join(f"{n} {speeds[n]:.1f} tok/s" for n in names) + f"  ratio {ratios[-1]:.3f}",
              flush=True)
    print(f"median ratio {names[0]}/{names[1]}: {statistics.median(ratios):.3f} over {rounds} rounds")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("plain", "pair"))
    p.add_argument("configs", nargs="*", type=Path)
    p.add_argument("-m", "--model", default="smollm2")
    p.add_argument("-p", "--prompt-tokens", type=int, default=512)
    p.add_argument("-n", "--gen-tokens", type=int, default=128)
    p.add_argument("-r", "--rounds", type=int, default=5)
    args = p.parse_args()
    loaded = load_model(args.model)
    prompt, cont = run_tokens(ReferenceRuntime(loaded), args.prompt_tokens, args.gen_tokens, None)
    model = loaded.model
    if args.what == "plain":
        sides = {"runtime": runtime_side(model, {}), "plain": PlainDecoder(model).run}
    else:
        sides = {path.stem: runtime_side(model, json.loads(path.read_text())) for path in args.configs}
    paired(sides, prompt, cont, args.rounds)


if __name__ == "__main__":
    main()
