"""The hf runtime's KV cache: a transformers ``DynamicCache`` that our policies can read, compact and rewrite.

:class:`H2OCache` keeps transformers' layout (``layers[i].keys/values``: ``[batch=1, kv_heads, seq, head_dim]``
on the model's device) and adds what :class:`h2o_kernels.model.llama.KVCache` offers the H2O policy, the
runtime lossless manager and the KV dumps: per-layer ``length``, ``keep`` (shared or per KV head), fp16 host
rows ``k``/``v``, ``write``, ``nbytes`` and ``positions``. New keys and values are rounded to fp16 as they are
appended, so the cache holds exactly what an fp16 KV cache holds (the reference runtime's, and what the
lossless codec must reproduce bit for bit) whatever the compute dtype.

A per-head compaction may leave heads holding different counts: shorter heads are padded at the end and
:meth:`H2OCache.padding_mask` hides the padding from attention (the ``h2o_eager`` attention adds it).
Store mode's released windows are zeroed rows here, as in the reference cache, and restored before attention.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from transformers import DynamicCache

FP16_BYTES = 2


class _HostRows:
    """``cache.k(layer)`` / ``cache.v(layer)``: fp16 host rows ``[seq, kv_heads, head_dim]`` copied on indexing
    (the lossless manager reads windows, never the whole layer, every decode step)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._t = tensor[0]  # [kv_heads, seq, head_dim]
        self.shape = (int(self._t.shape[1]), int(self._t.shape[0]), int(self._t.shape[2]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        part = self._t[:, rows]
        return part.to(torch.float16).transpose(0, 1).contiguous().cpu().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class H2OCache(DynamicCache):
    """A ``DynamicCache`` with the :class:`~h2o_kernels.lossless.manager.KVCacheLike` calls and H2O's ``keep``.

    ``n_seen`` counts the tokens fed so far (the runner advances it after each forward); positions are
    absolute token positions per row and KV head."""

    def __init__(self, config: Any, num_layers: int, num_kv_heads: int) -> None:
        super().__init__(config=config)
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.n_seen = 0
        self._fed = [0] * num_layers  # tokens each layer has been given
        self._pos = [np.zeros((0, num_kv_heads), np.int64) for _ in range(num_layers)]
        self._head_len: list[np.ndarray | None] = [None] * num_layers  # None: every head holds length() tokens

    # transformers' side ---------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.dtype != torch.float16:  # hold what an fp16 cache holds
            key_states = key_states.to(torch.float16).to(key_states.dtype)
            value_states = value_states.to(torch.float16).to(value_states.dtype)
        new = int(key_states.shape[-2])
        fed = self._fed[layer_idx]
        self._fed[layer_idx] = fed + new
        positions = np.arange(fed, fed + new, dtype=np.int64)
        lens = self._head_len[layer_idx]
        if lens is None:
            self._pos[layer_idx] = np.concatenate([self._pos[layer_idx],
                                                   np.repeat(positions[:, None], self.num_kv_heads, axis=1)])
            return super().update(key_states, value_states, layer_idx, cache_kwargs)
        # padded heads: each head's new rows follow its own tokens, as the reference cache appends them
        lay = self._layer(layer_idx)
        rows = int(lens.max()) + new
        grow = rows - self.length(layer_idx)
        if grow > 0:
            pad = lambda t: torch.cat([t, t.new_zeros((*t.shape[:2], grow, t.shape[3]))], dim=2)  # noqa: E731
            lay.keys, lay.values = pad(lay.keys), pad(lay.values)
            self._pos[layer_idx] = np.concatenate([self._pos[layer_idx],  # padding repeats the last row
                                                   np.repeat(self._pos[layer_idx][-1:], grow, axis=0)])
        for h, n in enumerate(lens.tolist()):
            lay.keys[:, h, n:n + new] = key_states[:, h]
            lay.values[:, h, n:n + new] = value_states[:, h]
            self._pos[layer_idx][n:n + new, h] = positions
        self._head_len[layer_idx] = lens + new
        return lay.keys, lay.values

    # our side ------------------------------------------------------------------------------------
    def _layer(self, layer: int) -> Any:
        return self.layers[layer]

    def length(self, layer: int) -> int:
        """Rows of the layer: the most tokens any of its KV heads holds (0 before its first token)."""
        keys = getattr(self._layer(layer), "keys", None)
        return 0 if keys is None or keys.dim() < 3 else int(keys.shape[-2])

    def head_lengths(self, layer: int) -> np.ndarray:
        """Tokens each KV head of the layer holds, ``[kv_heads]``."""
        lens = self._head_len[layer]
        return np.full(self.num_kv_heads, self.length(layer)) if lens is None else lens.copy()

    def positions(self, layer: int) -> np.ndarray:
        """Absolute token positions of the layer's rows, ``[seq, kv_heads]`` (padding rows repeat a head's last)."""
        return self._pos[layer]

    def k(self, layer: int) -> _HostRows:
        return _HostRows(self._layer(layer).keys)

    def v(self, layer: int) -> _HostRows:
        return _HostRows(self._layer(layer).values)

    def nbytes(self, layer: int) -> int:
        """fp16 bytes of K and V the layer's heads really hold (padding excluded), as the reference counts them."""
        lay = self._layer(layer)
        if self.length(layer) == 0:
            return 0
        return 2 * FP16_BYTES * int(lay.keys.shape[-1]) * int(self.head_lengths(layer).sum())

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Overwrite rows ``[start, start + len(k))`` (fp16 ``[n, kv_heads, head_dim]``); ValueError outside."""
        stop = start + len(k)
        if start < 0 or stop > self.length(layer) or k.shape != v.shape:
            raise ValueError(f"layer {layer}: window [{start}, {stop}) outside [0, {self.length(layer)})")
        lay = self._layer(layer)
        with torch.inference_mode():  # the cache's tensors are inference tensors (the runs make them so)
            for store, rows in ((lay.keys, k), (lay.values, v)):
                store[0, :, start:stop] = torch.from_numpy(np.ascontiguousarray(rows)).transpose(0, 1).to(
                    dtype=store.dtype, device=store.device)

    def keep(self, layer: int, indices: np.ndarray | Sequence[np.ndarray]) -> None:
        """Compact the layer to the rows at ``indices`` (strictly increasing), in order: one array for every head,
        or one array per KV head (heads that keep fewer are padded, see :meth:`padding_mask`)."""
        lay = self._layer(layer)
        per_head = not isinstance(indices, np.ndarray) or indices.ndim != 1
        if not per_head:
            idx = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int64)).to(lay.keys.device)
            lay.keys = lay.keys.index_select(2, idx)
            lay.values = lay.values.index_select(2, idx)
            self._pos[layer] = self._pos[layer][np.asarray(indices)]
            self._head_len[layer] = None
            return
        if len(indices) != self.num_kv_heads:
            raise ValueError(f"layer {layer}: {len(indices)} index arrays for {self.num_kv_heads} KV heads")
        counts = np.array([len(i) for i in indices])
        width = int(counts.max())
        padded = np.stack([np.concatenate([i, np.full(width - len(i), i[-1] if len(i) else 0)]) for i in indices])
        gather = torch.from_numpy(padded.astype(np.int64)).to(lay.keys.device)  # [kv_heads, width]
        index = gather[None, :, :, None].expand(lay.keys.shape[0], -1, -1, lay.keys.shape[-1])
        lay.keys = torch.gather(lay.keys, 2, index)
        lay.values = torch.gather(lay.values, 2, index)
        self._pos[layer] = np.take_along_axis(self._pos[layer], padded.T, axis=0)
        self._head_len[layer] = None if np.all(counts == width) else counts

    def padding_mask(self, layer: int, rows: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask ``[1, kv_heads, rows, seq]`` for the layer's forward of ``rows`` new tokens (already
        appended) when its heads hold different counts: 0 where head ``h``'s row may attend, the dtype's minimum
        on its padding and on later new tokens; None when the layer has no padding."""
        lens = self._head_len[layer]
        if lens is None:
            return None
        limit = lens[:, None] - rows + np.arange(1, rows + 1)  # [kv_heads, rows]: columns below are visible
        visible = torch.from_numpy(np.arange(self.length(layer))[None, None, :] < limit[:, :, None])
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None]
