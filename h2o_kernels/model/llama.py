"""Compact numpy LLaMA-family decoder with a per-layer fp16 KV cache.

Weights are float32, pre-transposed for ``x @ W``. Q/K rows are kept in the Hugging Face
layout (GGUF rows are un-permuted on load) and RoPE uses the rotate-half convention.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from gguf import GGUFReader, quants
from threadpoolctl import ThreadpoolController
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

_controller: ThreadpoolController | None = None


def _blas_threads(n: int | None) -> contextlib.AbstractContextManager:
    global _controller
    if n is None:
        return contextlib.nullcontext()
    if _controller is None:  # building one costs ~0.3 ms, limiting with it ~10 us
        _controller = ThreadpoolController()
    return _controller.limit(limits=n, user_api="blas")


class UnsupportedModelError(ValueError):
    """The GGUF uses a feature this decoder does not implement (partial rotary, another tokenizer)."""


class ModelConfigError(UnsupportedModelError):
    """A model config has a missing, non-integer or non-positive size, or sizes that do not fit together;
    the message names the file, the keys (as that file spells them) and their values."""


def _open(source: str | Path | GGUFReader) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else GGUFReader(str(source))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    return reader.fields[key].contents() if key in reader.fields else default


def _size(value: Any, key: str, source: str) -> int:
    """``value`` as a positive int; :class:`ModelConfigError` naming ``key`` when it is missing (None) or not one."""
    if value is None:
        raise ModelConfigError(f"{source}: missing key {key}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ModelConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _head_dim(explicit: Any, hidden: int, heads: int, keys: tuple[str, str, str], source: str) -> int:
    """The explicit head dim (key ``keys[0]``) when given, else ``hidden / heads`` (keys ``keys[1]``, ``keys[2]``).

    Raises :class:`ModelConfigError` when it is not an integer, or odd (rotate-half RoPE splits it in two)."""
    if explicit:
        dim, text = _size(explicit, keys[0], source), f"{keys[0]}={explicit}"
    elif hidden % heads:
        raise ModelConfigError(f"{source}: {keys[1]}={hidden} is not a multiple of {keys[2]}={heads}, so the head "
                               f"dim {keys[1]} / {keys[2]} is not an integer")
    else:
        dim, text = hidden // heads, f"{keys[1]} / {keys[2]} = {hidden} / {heads} = {hidden // heads}"
    if dim % 2:
        raise ModelConfigError(f"{source}: the head dim {text} is odd; rotary embeddings need an even head dim")
    return dim


def _kv_heads(heads: int, kv_heads: int, keys: tuple[str, str], source: str) -> int:
    """``kv_heads``; :class:`ModelConfigError` naming both keys when ``heads`` is not a multiple of it."""
    if heads % kv_heads:
        raise ModelConfigError(f"{source}: {keys[0]}={heads} is not a multiple of {keys[1]}={kv_heads}; "
                               "grouped-query attention gives every KV head the same number of query heads")
    return kv_heads


_HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LlamaConfig:
    """Model sizes; ``max_position`` is the context length (None: not stated by the model)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFReader) -> LlamaConfig:
        """Read ``{arch}.*`` hyper-parameters from GGUF metadata.

        Raises :class:`ModelConfigError` naming the file and the GGUF keys when a size is missing, not a
        positive integer, or sizes do not fit together; :class:`UnsupportedModelError` for partial rotary."""
        r = _open(source)
        name = str(getattr(r.data, "filename", None) or source)
        arch = _field(r, "general.architecture", "llama")
        key = lambda k: f"{arch}.{k}"  # noqa: E731
        size = lambda k, default=None: _size(_field(r, key(k), default), key(k), name)  # noqa: E731
        hidden, heads = size("embedding_length"), size("attention.head_count")
        head_dim = _head_dim(_field(r, key("attention.key_length")), hidden, heads,
                             (key("attention.key_length"), key("embedding_length"), key("attention.head_count")), name)
        if int(_field(r, key("rope.dimension_count"), head_dim)) != head_dim:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        tokens = r.fields.get("tokenizer.ggml.tokens")
        vocab = _field(r, key("vocab_size")) or (len(tokens.data) if tokens is not None else None)
        context = _field(r, key("context_length"))
        return cls(
            vocab_size=_size(vocab, key("vocab_size"), name), hidden_size=hidden,
            intermediate_size=size("feed_forward_length"), num_layers=size("block_count"), num_heads=heads,
            num_kv_heads=_kv_heads(heads, size("attention.head_count_kv", heads),
                                   (key("attention.head_count"), key("attention.head_count_kv")), name),
            head_dim=head_dim,
            rope_theta=float(_field(r, key("rope.freq_base"), 10000.0)),
            rms_eps=float(_field(r, key("attention.layer_norm_rms_epsilon"), 1e-5)),
            tie_embeddings=not any(t.name == "output.weight" for t in r.tensors),
            max_position=None if context is None else size("context_length"),
            bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
            eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face ``config.json``-style dict read from ``source``.

        Raises :class:`ModelConfigError` naming ``source`` and the keys when a size is missing, not a positive
        integer, or sizes do not fit together."""
        missing = [key for key in _HF_REQUIRED if key not in cfg]
        if missing:
            raise ModelConfigError(f"{source}: not a usable HF-style LLaMA config: missing {', '.join(missing)} "
                                   f"(needs {', '.join(_HF_REQUIRED)})")
        size = lambda key, default=None: _size(cfg.get(key, default), key, source)  # noqa: E731
        hidden, heads = size("hidden_size"), size("num_attention_heads")
        context = cfg.get("max_position_embeddings")
        return cls(
            vocab_size=size("vocab_size"), hidden_size=hidden, intermediate_size=size("intermediate_size"),
            num_layers=size("num_hidden_layers"), num_heads=heads,
            num_kv_heads=_kv_heads(heads, size("num_key_value_heads", heads),
                                   ("num_attention_heads", "num_key_value_heads"), source),
            head_dim=_head_dim(cfg.get("head_dim"), hidden, heads, ("head_dim", "hidden_size", "num_attention_heads"),
                               source),
            rope_theta=cfg.get("rope_theta", 10000.0), rms_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            max_position=None if context is None else size("max_position_embeddings"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        )


class KVCache:
    """Per-layer fp16 K/V, each ``[seq, kv_heads, head_dim]`` (K after RoPE), with float32 head-major mirrors.

    Each layer has its own length and the absolute position of every entry it holds (eviction compacts layers
    independently). A per-head compaction (:meth:`keep` with one index array per KV head) gives each head its own
    tokens: row ``i`` of head ``h`` is that head's ``i``-th kept token, in time order. Heads that keep fewer tokens
    than others are padded up to the layer's :meth:`length` (the rows beyond :meth:`head_lengths` are not attended,
    see :meth:`attention_mask`). Storage grows geometrically.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int = 256):
        shape, mirror = (capacity, num_kv_heads, head_dim), (num_kv_heads, capacity, head_dim)
        self._k = [np.zeros(shape, np.float16) for _ in range(num_layers)]
        self._v = [np.zeros(shape, np.float16) for _ in range(num_layers)]
        # Exact float32 upcasts of _k/_v, head-major so each head's keys are contiguous for the attention
        # matmuls; maintained incrementally (upcasting the whole cache every decode step would cost ~1/4 of it).
        self._k32 = [np.zeros(mirror, np.float32) for _ in range(num_layers)]
        self._v32 = [np.zeros(mirror, np.float32) for _ in range(num_layers)]
        self._pos = [np.zeros(shape[:2], np.int64) for _ in range(num_layers)]
        self._len = [0] * num_layers
        self._head_len: list[np.ndarray | None] = [None] * num_layers  # None: every head holds _len tokens
        self.num_kv_heads = num_kv_heads
        self.n_seen = 0  # tokens fed so far = absolute position of the next token

    @property
    def num_layers(self) -> int:
        return len(self._len)

    def length(self, layer: int) -> int:
        """Rows of the layer: the most tokens any of its KV heads holds."""
        return self._len[layer]

    def head_lengths(self, layer: int) -> np.ndarray:
        """Tokens each KV head of the layer holds, ``[kv_heads]`` (a copy)."""
        lens = self._head_len[layer]
        return np.full(self.num_kv_heads, self._len[layer]) if lens is None else lens.copy()

    def k(self, layer: int) -> np.ndarray:
        return self._k[layer][: self._len[layer]]

    def v(self, layer: int) -> np.ndarray:
        return self._v[layer][: self._len[layer]]

    def k32(self, layer: int) -> np.ndarray:
        """``k(layer)`` upcast to float32, head-major ``[kv_heads, seq, head_dim]`` (kept in sync; do not modify)."""
        return self._k32[layer][:, : self._len[layer]]

    def v32(self, layer: int) -> np.ndarray:
        return self._v32[layer][:, : self._len[layer]]

    def positions(self, layer: int) -> np.ndarray:
        """Absolute token positions of the layer's entries, ``[seq, kv_heads]``."""
        return self._pos[layer][: self._len[layer]]

    def attention_mask(self, layer: int, rows: int) -> np.ndarray | None:
        """Additive float32 mask ``[kv_heads, 1, rows, seq]`` for the layer's last forward of ``rows`` new tokens
        when its heads hold different counts (0 where head ``h``'s row ``t`` may attend, -inf elsewhere: its
        padding and the later new tokens); None when every head holds the same tokens count (no padding)."""
        lens = self._head_len[layer]
        if lens is None:
            return None
        limit = lens[:, None] - rows + np.arange(1, rows + 1)  # [kv_heads, rows]: slots < limit are visible
        visible = np.arange(self._len[layer]) < limit[:, :, None]
        return np.where(visible, np.float32(0), np.float32(-np.inf))[:, None]

    def keep(self, layer: int, indices: np.ndarray | Sequence[np.ndarray]) -> None:
        """Compact ``layer`` to the entries at ``indices`` (strictly increasing), in order: one array for every
        head, or a sequence of one array per KV head (each head keeps its own tokens)."""
        per_head = not isinstance(indices, np.ndarray) or indices.ndim != 1
        idx = [np.asarray(i, dtype=np.intp) for i in indices] if per_head else [np.asarray(indices, np.intp)]
        lens = self.head_lengths(layer)
        if per_head and len(idx) != self.num_kv_heads:
            raise ValueError(f"layer {layer}: {len(idx)} index arrays for {self.num_kv_heads} KV heads")
        for h, i in enumerate(idx):
            n = int(lens[h] if per_head else lens.min())
            if i.ndim != 1 or (i.size and (i[0] < 0 or i[-1] >= n or np.any(np.diff(i) <= 0))):
                raise ValueError(f"layer {layer}: kept indices must be strictly increasing in [0, {n})")
        if not per_head:
            self._compact_all(layer, idx[0])
            return
        for h, i in enumerate(idx):
            self._compact_head(layer, h, i)
        counts = np.array([i.size for i in idx])
        self._len[layer] = int(counts.max())
        self._head_len[layer] = None if np.all(counts == counts[0]) else counts

    def _compact_all(self, layer: int, idx: np.ndarray) -> None:
        for store in (self._k, self._v, self._pos):
            store[layer][: idx.size] = store[layer][idx]
        for store in (self._k32, self._v32):
            store[layer][:, : idx.size] = store[layer][:, idx]
        self._len[layer] = idx.size
        self._head_len[layer] = None

    def _compact_head(self, layer: int, h: int, idx: np.ndarray) -> None:
        for store in (self._k, self._v, self._pos):
            store[layer][: idx.size, h] = store[layer][idx, h]
        for store in (self._k32, self._v32):
            store[layer][h, : idx.size] = store[layer][h, idx]

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Overwrite entries ``[start, start + len(k))`` of ``layer`` (e.g. a window restored from
        its compressed copy, or zeroed while only the compressed copy is held)."""
        stop = start + len(k)
        if start < 0 or stop > self._len[layer] or k.shape != v.shape:
            raise ValueError(f"layer {layer}: window [{start}, {stop}) outside [0, {self._len[layer]})")
        self._k[layer][start:stop] = k
        self._v[layer][start:stop] = v
        self._k32[layer][:, start:stop] = self._k[layer][start:stop].transpose(1, 0, 2)
        self._v32[layer][:, start:stop] = self._v[layer][start:stop].transpose(1, 0, 2)

    def nbytes(self, layer: int) -> int:
        """fp16 bytes of K and V the layer's heads really hold (padding rows excluded)."""
        row = self._k[layer][0, 0].nbytes
        return 2 * row * int(self.head_lengths(layer).sum())

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """Append ``[n, kv_heads, head_dim]`` entries (cast to fp16) after each head's tokens, growing geometrically."""
        n, T = self._len[layer], len(k)
        self._grow(layer, n + T)
        lens = self._head_len[layer]
        if lens is None:
            self._put(layer, slice(None), slice(n, n + T), k, v)
        else:
            for h in range(self.num_kv_heads):
                self._put(layer, h, slice(int(lens[h]), int(lens[h]) + T), k[:, h], v[:, h])
            self._head_len[layer] = lens + T
        self._len[layer] = n + T if lens is None else int(lens.max()) + T

    def _put(self, layer: int, heads: int | slice, rows: slice, k: np.ndarray, v: np.ndarray) -> None:
        """Write new entries at ``rows`` of ``heads`` (one head, or all) in every store."""
        pos = np.arange(self.n_seen, self.n_seen + rows.stop - rows.start)
        self._k[layer][rows, heads] = k
        self._v[layer][rows, heads] = v
        self._pos[layer][rows, heads] = pos if isinstance(heads, int) else pos[:, None]
        k16, v16 = self._k[layer][rows, heads], self._v[layer][rows, heads]
        if not isinstance(heads, int):  # [T, kv_heads, D] -> head-major
            k16, v16 = k16.transpose(1, 0, 2), v16.transpose(1, 0, 2)
        self._k32[layer][heads, rows] = k16
        self._v32[layer][heads, rows] = v16

    def _grow(self, layer: int, rows: int) -> None:
        cap = len(self._k[layer])
        if rows <= cap:
            return
        cap = max(rows, 2 * cap)
        for stores, axis in (((self._k, self._v, self._pos), 0), ((self._k32, self._v32), 1)):
            for store in stores:
                old = store[layer]
                shape = list(old.shape)
                shape[axis] = cap
                new = np.zeros(shape, old.dtype)
                new[tuple(slice(0, s) for s in old.shape)] = old
                store[layer] = new


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [hidden]
    wqkv: np.ndarray  # [hidden, (heads + 2 * kv_heads) * head_dim]
    wo: np.ndarray  # [heads * head_dim, hidden]
    ffn_norm: np.ndarray  # [hidden]
    w_gate_up: np.ndarray  # [hidden, 2 * intermediate]
    w_down: np.ndarray  # [intermediate, hidden]


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE on ``[T, heads, head_dim]``; cos/sin are ``[T, 1, head_dim / 2]``."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row interleaving (GGUF -> HF rotate-half layout)."""
    return w.reshape(n_head, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


class LayerHooks(Protocol):
    """Where a KV-cache policy (H2O eviction, runtime lossless) plugs into each layer of a forward."""

    def before_append(self, layer: int) -> None:
        """Before the layer appends this forward's K/V (apply a pending compaction, restore windows)."""

    def after_attention(self, layer: int, probs: np.ndarray) -> None:
        """The layer's softmax, read-only float32 ``[num_heads, q_len, kv_len]`` (the new keys last)."""

    def after_layer(self, layer: int) -> None:
        """After the layer's attention (schedule compression of cold windows)."""


class LlamaModel:
    """LLaMA decoder with an internal :class:`KVCache`.

    ``prefill`` / ``decode`` feed tokens at positions ``cache.n_seen...``; ``reset`` clears
    the cache. BLAS runs with ``threads`` threads during forward passes (None: untouched).
    ``hooks`` (a :class:`LayerHooks`) sees every layer of every forward.
    """

    def __init__(self, config: LlamaConfig, embed: np.ndarray, layers: list[LayerWeights],
                 norm: np.ndarray, head: np.ndarray | None = None, threads: int | None = 1):
        self.config = config
        # Tied: keep one contiguous [hidden, vocab] copy; embedding rows are a strided view.
        self.head = np.ascontiguousarray(embed.T if head is None else head, dtype=np.float32)
        self.embed = self.head.T if head is None else np.ascontiguousarray(embed, np.float32)
        self.layers = layers
        self.norm = norm
        self.threads = threads
        self.hooks: LayerHooks | None = None
        c = config
        self._inv_freq = c.rope_theta ** (-np.arange(0, c.head_dim, 2) / c.head_dim)
        self.reset()

    def reset(self, capacity: int = 256) -> None:
        """Start a new sequence with an empty cache."""
        c = self.config
        self.cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity)

    @classmethod
    def from_gguf(cls, source: str | Path | GGUFReader, threads: int | None = 1) -> LlamaModel:
        """Load and dequantize (to float32) a llama-architecture GGUF."""
        r = _open(source)
        c = LlamaConfig.from_gguf(r)
        tensors = {t.name: t for t in r.tensors}

        def w(name: str) -> np.ndarray:
            t = tensors[name]
            return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

        layers = []
        for i in range(c.num_layers):
            p = f"blk.{i}."
            qkv = [_unpermute(w(p + "attn_q.weight"), c.num_heads),
                   _unpermute(w(p + "attn_k.weight"), c.num_kv_heads), w(p + "attn_v.weight")]
            layers.append(LayerWeights(
                attn_norm=w(p + "attn_norm.weight"),
                wqkv=np.ascontiguousarray(np.concatenate(qkv).T),
                wo=np.ascontiguousarray(w(p + "attn_output.weight").T),
                ffn_norm=w(p + "ffn_norm.weight"),
                w_gate_up=np.ascontiguousarray(
                    np.concatenate([w(p + "ffn_gate.weight"), w(p + "ffn_up.weight")]).T),
                w_down=np.ascontiguousarray(w(p + "ffn_down.weight").T),
            ))
        head = None if c.tie_embeddings else w("output.weight").T
        return cls(c, w("token_embd.weight"), layers, w("output_norm.weight"), head, threads)

    @classmethod
    def random(cls, config: LlamaConfig | dict[str, Any], seed: int = 0, std: float = 0.02,
               threads: int | None = 1) -> LlamaModel:
        """Random-weight model (for fast tests) from a config or HF-style config dict."""
        c = config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf_config(config)
        rng = np.random.default_rng(seed)
        rand = lambda *shape: rng.normal(0.0, std, shape).astype(np.float32)  # noqa: E731
        ones = lambda: np.ones(c.hidden_size, np.float32)  # noqa: E731
        H, F, D = c.hidden_size, c.intermediate_size, c.head_dim
        layers = [LayerWeights(ones(), rand(H, (c.num_heads + 2 * c.num_kv_heads) * D),
                               rand(c.num_heads * D, H), ones(), rand(H, 2 * F), rand(F, H))
                  for _ in range(c.num_layers)]
        head = None if c.tie_embeddings else rand(H, c.vocab_size)
        return cls(c, rand(c.vocab_size, H), layers, ones(), head, threads)

    def prefill(self, token_ids: Sequence[int] | np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Feed a chunk of tokens (causal attention); logits ``[vocab]`` of the last token,
        or ``[n, vocab]`` for every token when ``all_logits``."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("prefill needs at least one token")
        with _blas_threads(self.threads):
            logits = self._forward(ids, all_logits)
        return logits if all_logits else logits[-1]

    def decode(self, token_id: int) -> np.ndarray:
        """Feed one token; logits ``[vocab]`` for the next one."""
        with _blas_threads(self.threads):
            return self._forward(np.array([token_id], dtype=np.int64), False)[0]

    def _forward(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        c, cache = self.config, self.cache
        T, nh, nkv, D, F = len(ids), c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        pos = np.arange(cache.n_seen, cache.n_seen + T)
        ang = pos[:, None, None] * self._inv_freq
        cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        scale = np.float32(D ** -0.5)
        x = self.embed[ids].astype(np.float32)
        hooks = self.hooks
        for li, L in enumerate(self.layers):
            if hooks is not None:
                hooks.before_append(li)
            qkv = _rms_norm(x, L.attn_norm, c.rms_eps) @ L.wqkv
            q = _rope(qkv[:, : nh * D].reshape(T, nh, D), cos, sin) * scale
            k = _rope(qkv[:, nh * D: (nh + nkv) * D].reshape(T, nkv, D), cos, sin)
            cache.append(li, k, qkv[:, (nh + nkv) * D:].reshape(T, nkv, D))
            x = x + self._attend(li, q) @ L.wo
            if hooks is not None:
                hooks.after_layer(li)
            gu = _rms_norm(x, L.ffn_norm, c.rms_eps) @ L.w_gate_up
            g = gu[:, :F]
            x = x + (g * (0.5 + 0.5 * np.tanh(0.5 * g)) * gu[:, F:]) @ L.w_down  # SiLU(g) * u
        cache.n_seen += T
        return _rms_norm(x if all_logits else x[-1:], self.norm, c.rms_eps) @ self.head

    def _attend(self, layer: int, q: np.ndarray) -> np.ndarray:
        """GQA over the fp16 cache of ``layer`` (each head's last T entries are the new tokens)."""
        c, cache = self.config, self.cache
        T, nh, D = q.shape
        nkv, g = c.num_kv_heads, nh // c.num_kv_heads
        k, v = cache.k32(layer), cache.v32(layer)  # [nkv, S, D]
        S = k.shape[1]
        qg = q.reshape(T, nkv, g, D).transpose(1, 2, 0, 3).reshape(nkv, g * T, D)
        s = qg @ k.transpose(0, 2, 1)  # [nkv, g*T, S]; query heads h = kv * g + j
        mask = cache.attention_mask(layer, T)
        if mask is not None:  # heads hold different counts: hide each one's padding (and the causal future)
            s.reshape(nkv, g, T, S)[...] += mask
        elif T > 1:
            causal = np.triu(np.full((T, T), -np.inf, np.float32), 1)
            s.reshape(nkv, g, T, S)[..., S - T:] += causal
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        if self.hooks is not None:
            probs = s.reshape(nh, T, S)
            probs.flags.writeable = False
            self.hooks.after_attention(layer, probs)
        o = (s @ v).reshape(nkv, g, T, D).transpose(2, 0, 1, 3)
        return o.reshape(T, nh * D)


_DIGITS_THEN_BYTES = {"smollm", "starcoder", "refact", "codeshell"}


def load_tokenizer(source: str | Path | GGUFReader) -> Tokenizer:
    """Byte-level BPE ``tokenizers.Tokenizer`` from GGUF metadata (``tokenizer.ggml.model``
    gpt2). No BOS is added; control tokens (e.g. ``<|im_start|>``) are special tokens."""
    r = _open(source)
    if _field(r, "tokenizer.ggml.model") != "gpt2":
        raise UnsupportedModelError("only gpt2-style (byte-level BPE) GGUF tokenizers are supported")
    tokens = _field(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    pre = _field(r, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_BYTES:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise UnsupportedModelError(f"unsupported pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    types = _field(r, "tokenizer.ggml.token_type", [])
    tok.add_special_tokens([tokens[i] for i, t in enumerate(types) if t in (3, 4)])  # control
    return tok
