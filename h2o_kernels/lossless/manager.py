"""Runtime lossless KV manager: schedules cold windows of the KV cache through the fp16 codec.

Re-creates the original runtime's ``kv_lossless_*`` stage (original-runtime.md §1, §5-§7) on a
:class:`~h2o_kernels.model.llama.KVCache`-like cache, with three deliberate improvements:

- ``pair_delta`` (and ``pair_delta_delta_seq``) in the predictor lists work; unknown names are errors.
- Store mode stores: an applied window's blobs are kept and its raw rows are released (zeroed in the
  cache and accounted as not resident). Before the layer's next attention each released window is
  restored through a bounded LRU of decoded windows; a miss is a real decode (the cache is never
  seeded with the raw copy), and the window is released again after the attention. Resident bytes
  count the cache minus released windows, plus their blobs and the decoded windows held by the LRU.
- Fallbacks, backpressure skips and no-gain windows are counted apart; compressed bytes are real
  blob bytes, headers included.

A runtime drives it per decode step, for every layer in order::

    rt.before_append(layer)            # restore released windows (before any compaction / append)
    ... apply H2O compaction, append K/V, attention, H2O scoring ...
    rt.after_layer(layer, kv_len, budget, tokens_seen, decode_step)

and calls :meth:`LosslessRuntime.reset` before each new prompt's prefill.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from threading import local
from typing import Any, Callable, Literal, Protocol

import numpy as np
import xxhash

from h2o_kernels.codec.predictors import parse_predictors
from h2o_kernels.codec.profiles import Profile, decode_many, make_codec
from h2o_kernels.codec.rope import RopeSpec
from h2o_kernels.config_keys import ConfigError, Key, clamp, read_keys

Scope = Literal["none", "front_n", "h2o_kept", "front_n_and_h2o_kept"]
Mode = Literal["probe", "full", "store"]
Encoder = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], tuple[bytes, bytes]]
Decoder = Callable[[bytes, bytes], tuple[np.ndarray, np.ndarray]]

MODE_IDS: dict[str, int] = {"probe": 0, "full": 1, "store": 2}
# kv_lossless_codec_runtime -> codec profile. The original stored the key but never read it; its default names
# the codec it ran, which is our fast profile.
CODEC_PROFILES: dict[str, Profile] = {"fp16_gear_predictive_v3": "fast", "fast": "fast", "ratio": "ratio"}
_PREFIX = "kv_lossless_"
_KEYS: dict[str, Key] = {
    "kv_lossless_enable": Key(bool, False),
    "kv_lossless_scope": Key(str, "front_n", choices=("none", "front_n", "h2o_kept", "front_n_and_h2o_kept",
                                                      "front_n+h2o_kept")),
    "kv_lossless_front_n": Key(int, 2, clamp(0)),
    "kv_lossless_codec": Key(str, "none", choices=("none", "gear_delta")),
    "kv_lossless_runtime_enable": Key(bool, False),
    "kv_lossless_runtime_mode": Key(str, "probe", choices=tuple(MODE_IDS)),
    "kv_lossless_block_tokens": Key(int, 128, clamp(1)),
    "kv_lossless_hot_recent_tokens": Key(int, 256, clamp(0)),
    "kv_lossless_hot_sink_tokens": Key(int, 16, clamp(0)),
    "kv_lossless_kept_sample_layers": Key(int, 1, clamp(0)),
    "kv_lossless_kept_sample_token_interval": Key(int, 1, clamp(0)),
    "kv_lossless_front_sample_token_interval": Key(int, 1),
    "kv_lossless_store_disable_front": Key(bool, False),
    "kv_lossless_store_bootstrap_tokens": Key(int, 32),
    "kv_lossless_store_grouped_step_tokens": Key(int, 256),
    "kv_lossless_codec_runtime": Key(str, "fp16_gear_predictive_v3", choices=tuple(CODEC_PROFILES)),
    "kv_lossless_predictors_k": Key(str, "raw,delta_seq,xor_seq,pair_delta"),
    "kv_lossless_predictors_v": Key(str, "raw,delta_seq,xor_seq"),
    "kv_lossless_async_threads": Key(int, 1, clamp(0)),
    "kv_lossless_max_queue": Key(int, 256, clamp(1)),
    "kv_lossless_decode_cache_blocks": Key(int, 64, clamp(0)),
    "kv_lossless_strict_roundtrip_check": Key(bool, False),
}


@dataclass(frozen=True)
class LosslessConfig:
    """Every ``kv_lossless_*`` key (the key minus its prefix), with the original's defaults and clamps."""

    enable: bool = False
    scope: Scope = "front_n"
    front_n: int = 2
    codec: Literal["none", "gear_delta"] = "none"
    runtime_enable: bool = False
    runtime_mode: Mode = "probe"
    block_tokens: int = 128
    hot_recent_tokens: int = 256
    hot_sink_tokens: int = 16
    kept_sample_layers: int = 1
    kept_sample_token_interval: int = 1
    front_sample_token_interval: int = 1
    store_disable_front: bool = False
    store_bootstrap_tokens: int = 32
    store_grouped_step_tokens: int = 256
    codec_runtime: str = "fp16_gear_predictive_v3"
    predictors_k: tuple[str, ...] = ("raw", "delta_seq", "xor_seq", "pair_delta")
    predictors_v: tuple[str, ...] = ("raw", "delta_seq", "xor_seq")
    async_threads: int = 1
    max_queue: int = 256
    decode_cache_blocks: int = 64
    strict_roundtrip_check: bool = False

    @classmethod
    def keys(cls) -> dict[str, Key]:
        """The config keys read by :meth:`from_config`: every ``kv_lossless_*`` key of original-runtime.md §1."""
        return dict(_KEYS)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "config") -> LosslessConfig:
        """Read the keys from a JSON-like dict; :class:`ConfigError` names the key of a bad value.

        Scope, mode and codec take the original's values (``front_n+h2o_kept`` is ``front_n_and_h2o_kept``);
        any other string is a :class:`ConfigError` naming the closest value, where the original silently
        used its default. An empty predictor list means ``raw``.
        """
        values = read_keys(cfg, _KEYS, source)
        if values["kv_lossless_scope"] == "front_n+h2o_kept":
            values["kv_lossless_scope"] = "front_n_and_h2o_kept"
        for name in ("kv_lossless_predictors_k", "kv_lossless_predictors_v"):
            text = values[name]
            try:
                values[name] = parse_predictors(text if text.strip(" \t,") else "raw", name)
            except ValueError as exc:
                raise ConfigError(f"{source}: key {name!r}: {exc}") from None
        return cls(**{name[len(_PREFIX):]: value for name, value in values.items()})

    @property
    def profile(self) -> Profile:
        """The codec profile ``kv_lossless_codec_runtime`` names (see :data:`CODEC_PROFILES`)."""
        return CODEC_PROFILES[self.codec_runtime]

    @property
    def runs(self) -> bool:
        """Whether the runtime stage does anything: enabled, codec ``gear_delta`` and runtime enabled."""
        return self.enable and self.codec == "gear_delta" and self.runtime_enable

    @property
    def grouped_tokens(self) -> int:
        """Tokens of a periodic window: ``block_tokens`` (store: the grouped step, ≤0 ⇒ 3·block_tokens)."""
        if self.runtime_mode != "store":
            return self.block_tokens
        return self.store_grouped_step_tokens if self.store_grouped_step_tokens > 0 else 3 * self.block_tokens

    @property
    def overlap_tokens(self) -> int:
        """How far a store-mode periodic window reaches back into the previous one."""
        return self.grouped_tokens // 8 if self.runtime_mode == "store" else 0

    @property
    def bootstrap_tokens(self) -> int:
        """Tokens of a layer's first window (probe: ≤32; store: its own key, ≤0 ⇒ max(16, block/2))."""
        if self.runtime_mode == "probe":
            return min(self.block_tokens, 32)
        if self.runtime_mode == "store":
            return self.store_bootstrap_tokens if self.store_bootstrap_tokens > 0 else max(16, self.block_tokens // 2)
        return self.block_tokens


def cold_window(budget: int, hot_sink_tokens: int, hot_recent_tokens: int) -> tuple[int, int]:
    """``[begin, end)`` of the positions that may be compressed: the budget minus hot sink and recent."""
    begin = min(budget, hot_sink_tokens)
    return begin, max(begin, budget - hot_recent_tokens)


class KVCacheLike(Protocol):
    """What the runtime needs of a cache (see :class:`h2o_kernels.model.llama.KVCache`)."""

    def k(self, layer: int) -> np.ndarray: ...

    def v(self, layer: int) -> np.ndarray: ...

    def length(self, layer: int) -> int: ...

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None: ...

    def nbytes(self, layer: int) -> int: ...


class _CodecEncoder:
    """The default encoder: K and V through the configured codec profile, one codec pair per thread.
    ``rope`` lets the ratio profile predict K rows through RoPE from the rows' positions."""

    def __init__(self, config: LosslessConfig, rope: RopeSpec | None) -> None:
        self._config = config
        self._rope = rope
        self._local = local()

    def __call__(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> tuple[bytes, bytes]:
        codecs = getattr(self._local, "codecs", None)
        if codecs is None:
            c = self._config
            codecs = self._local.codecs = (
                make_codec(c.profile, "k", hi_predictors=c.predictors_k, lo_predictors=c.predictors_k, rope=self._rope),
                make_codec(c.profile, "v", hi_predictors=c.predictors_v, lo_predictors=c.predictors_v))
        return codecs[0].encode(k, positions), codecs[1].encode(v)


def _decode_pair(k_blob: bytes, v_blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    k, v = decode_many([k_blob, v_blob])
    return k, v


def _digest(k: np.ndarray, v: np.ndarray) -> int:
    """XXH3-64 of K's bytes then V's bytes."""
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(k))
    h.update(np.ascontiguousarray(v))
    return h.intdigest()


def _us_since(t0: int) -> int:
    return (time.perf_counter_ns() - t0) // 1000


@dataclass
class _Window:
    """A scheduled window, gathered on the inference thread."""

    layer: int
    start: int
    count: int
    kv: int
    raw_bytes: int
    digest: int


@dataclass
class _Encoded:
    k_blob: bytes = b""
    v_blob: bytes = b""
    comp_us: int = 0
    error: str | None = None


@dataclass
class _Block:
    """A stored window. In store mode: held compressed; ``released`` while its raw rows are zeroed."""

    start: int
    count: int
    k_blob: bytes
    v_blob: bytes
    digest: int
    released: bool = False

    @property
    def blob_bytes(self) -> int:
        return len(self.k_blob) + len(self.v_blob)


@dataclass
class _Layer:
    """Schedule and accumulators of one layer."""

    last_budget: int = 0
    last_step: int = 0
    update_count: int = 0
    last_kv: int = 0
    blocks: list[_Block] = field(default_factory=list)
    raw_bytes: int = 0
    comp_bytes: int = 0
    comp_us: int = 0
    decomp_us: int = 0
    fallback: int = 0
    backpressure: int = 0


class LosslessRuntime:
    """The runtime lossless stage for one model and one :class:`KVCacheLike` cache.

    ``h2o_range`` is the H2O layer range (``range(start, end + 1)``); ``trigger_min_tokens`` and
    ``update_interval`` are the H2O knobs that also gate this stage (tokens seen, decode tokens).
    ``log`` receives one ``[H2O-LOSSLESS]`` line per applied result. ``rope`` is the model's RoPE, for the
    ratio profile's K matching. ``encoder(k, v, positions) -> (k_blob, v_blob)`` (called from worker
    threads, so thread-safe; ``positions`` the window rows' RoPE positions ``[count]``, or None where the
    cache's heads hold different tokens) and ``decoder(k_blob, v_blob) -> (k, v)`` replace the codec,
    e.g. in tests. Nothing happens unless ``config.runs``; only decode steps
    (``decode_step >= 1``) schedule windows.
    """

    def __init__(self, config: LosslessConfig, num_layers: int, h2o_range: range, trigger_min_tokens: int,
                 update_interval: int, cache: KVCacheLike, log: Callable[[str], None] | None = None, *,
                 rope: RopeSpec | None = None, encoder: Encoder | None = None,
                 decoder: Decoder | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.h2o_range = h2o_range
        self.trigger_min_tokens = max(1, trigger_min_tokens)
        self.update_interval = max(1, update_interval)
        self.cache = cache
        self.log = log
        self._encode = encoder or _CodecEncoder(config, rope)
        self._positions = config.profile == "ratio" and rope is not None
        self._decode = decoder or _decode_pair
        self._store = config.runtime_mode == "store"
        threads = config.async_threads if config.runs and config.runtime_mode != "probe" else 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="h2o-lossless") if threads else None
        self._tasks: deque[tuple[_Window, Future[_Encoded]]] = deque()
        self._clear()

    def _clear(self) -> None:
        self._layers = [_Layer() for _ in range(self.num_layers)]
        self._decoded: OrderedDict[tuple[int, int, int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._queue_peak = self._async_queue_peak = self._async_wait_us = 0
        self._cache_hit = self._cache_miss = self._codec_us = 0

    # ----------------------------------------------------------------------------------- hooks

    def before_append(self, layer: int) -> None:
        """Restore the layer's released windows (store mode); call before the layer's cache changes."""
        st = self._layers[layer]
        lost = [block for block in st.blocks if block.released and not self._restore(layer, st, block)]
        if lost:
            st.blocks = [block for block in st.blocks if all(block is not gone for gone in lost)]

    def after_layer(self, layer: int, kv_len: int, budget: int, tokens_seen: int, decode_step: int) -> None:
        """After the layer's attention: schedule/encode its cold window, apply finished results, and at
        the last layer wait for every task. ``kv_len`` = the layer's cache length (new token
        included), ``budget`` = its H2O budget (``kv_len`` where H2O does not act), ``tokens_seen`` =
        tokens fed so far, ``decode_step`` = decode-token counter (first decode step = 1)."""
        if not self.config.runs or decode_step < 1:
            return
        self._drain(block=False)
        st = self._layers[layer]
        moved = kv_len <= st.last_kv  # compacted since the last step: stored positions are stale
        if moved:
            st.blocks.clear()  # store: restored in before_append, so the cache holds their rows
        st.last_kv = kv_len
        eligible = self.layer_budget(layer, kv_len, budget, decode_step)
        if eligible is not None:
            self._schedule(layer, st, kv_len, eligible, tokens_seen, decode_step, moved)
        if layer == self.num_layers - 1:
            self._drain(block=True)
        if self._store:
            self._release(layer, st)

    def reset(self, cache: KVCacheLike | None = None) -> None:
        """New prompt: wait for in-flight tasks (discarding them), restore every released window,
        switch to ``cache`` if given, and clear schedules, blocks and metrics."""
        while self._tasks:
            self._tasks.popleft()[1].result()
        self.restore_all()
        if cache is not None:
            self.cache = cache
        self._clear()

    def restore_all(self) -> None:
        """Restore every released window (e.g. before reading the whole cache outside a forward)."""
        for layer in range(self.num_layers):
            self.before_append(layer)

    def close(self) -> None:
        """Apply outstanding results and stop the worker threads."""
        self._drain(block=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------------------ scheduling

    def layer_budget(self, layer: int, kv_len: int, budget: int, decode_step: int) -> int | None:
        """The budget a layer's cold window derives from this step, or None if the layer is not
        eligible (scope, mode, sampling and store_disable_front rules of §5.1)."""
        cfg, scope, mode = self.config, self.config.scope, self.config.runtime_mode
        front, kept = layer < cfg.front_n, layer in self.h2o_range
        kept_budget = min(budget, kv_len)
        joint = scope == "front_n_and_h2o_kept"
        if scope == "none":
            return None
        if scope == "front_n":
            apply, out = front, kv_len
        elif scope == "h2o_kept":
            apply, out = kept, kept_budget
        else:
            apply, out = front or kept, kv_len if front else kept_budget
        if mode == "store" and cfg.store_disable_front and front:
            apply, out = (kept, kept_budget) if joint else (False, out)
        step = max(1, decode_step)
        if mode != "probe" and apply and front and cfg.front_sample_token_interval > 1:
            apply = (step - 1) % cfg.front_sample_token_interval == 0
        if mode == "full" and scope != "front_n" and apply and kept and not (joint and front):
            off = layer - self.h2o_range.start
            layer_ok = off >= 0 if cfg.kept_sample_layers <= 0 else 0 <= off < cfg.kept_sample_layers
            interval = cfg.kept_sample_token_interval
            apply = layer_ok and (interval <= 1 or (step - 1) % interval == 0)
        if mode == "probe":
            first = self.h2o_range.start
            allowed = (0,) if scope == "front_n" else (first,) if scope == "h2o_kept" else (0, first)
            apply = apply and layer in allowed
        return out if apply else None

    def _next_window(self, st: _Layer, begin: int, end: int, tokens_seen: int,
                     decode_step: int) -> tuple[int, int, bool] | None:
        """``(start, count, is_bootstrap)`` of the layer's next window in ``[begin, end)`` (§5.4)."""
        cfg = self.config
        if tokens_seen < self.trigger_min_tokens or end <= begin:
            return None
        if st.update_count == 0:
            n = cfg.bootstrap_tokens
            if min(end - st.last_budget, end - begin) < n:
                return None
            return (begin if cfg.runtime_mode == "probe" else end - n), n, True
        if decode_step - st.last_step < self.update_interval:
            return None
        start = max(max(st.last_budget, begin) - cfg.overlap_tokens, begin)
        n = cfg.grouped_tokens
        return (start, n, False) if end - start >= n else None

    def _schedule(self, layer: int, st: _Layer, kv_len: int, budget: int, tokens_seen: int, decode_step: int,
                  moved: bool) -> None:
        cfg = self.config
        begin, end = cold_window(budget, cfg.hot_sink_tokens, cfg.hot_recent_tokens)
        if moved or end < st.last_budget:  # shrink: every block was validated (or is restored): none lost
            st.blocks.clear()
            st.last_step, st.last_budget = 0, end
        self._queue_peak = max(self._queue_peak, self._pending_blocks(st) + len(self._tasks))
        self._async_queue_peak = max(self._async_queue_peak, len(self._tasks))
        window = self._next_window(st, begin, end, tokens_seen, decode_step)
        if window is None:
            return
        start, n, bootstrap = window
        st.update_count += 1
        st.last_step = decode_step
        st.last_budget = end if bootstrap and cfg.runtime_mode == "probe" else start + n
        if self._pending_blocks(st) + len(self._tasks) >= cfg.max_queue:
            st.backpressure += 1
            self._codec_us = 0
            self._log_line(layer, st, kv_len, start, n, 0, 0, 0, 0)
            return
        k = self.cache.k(layer)[start:start + n].copy()
        v = self.cache.v(layer)[start:start + n].copy()
        positions = self._row_positions(layer, start, n)
        task = _Window(layer, start, n, kv_len, k.nbytes + v.nbytes, _digest(k, v))
        if self._pool is None:
            self._apply(task, self._run_encode(k, v, positions))
        else:
            self._tasks.append((task, self._pool.submit(self._run_encode, k, v, positions)))
            self._async_queue_peak = max(self._async_queue_peak, len(self._tasks))
            self._drain(block=False)

    def _row_positions(self, layer: int, start: int, n: int) -> np.ndarray | None:
        """The RoPE positions of cache rows ``[start, start + n)`` when the ratio profile can use them: the
        cache knows them and every KV head holds the same tokens there."""
        positions = getattr(self.cache, "positions", None)
        if not self._positions or positions is None:
            return None
        rows = np.asarray(positions(layer)[start:start + n])
        rows = rows.reshape(len(rows), -1)
        return rows[:, 0].astype(np.int64) if (rows == rows[:, :1]).all() else None

    def _pending_blocks(self, st: _Layer) -> int:
        """Blocks that hold the queue: store-mode held windows (other modes validate on apply)."""
        return len(st.blocks) if self._store else 0

    # ------------------------------------------------------------------- encode, apply, decode

    def _run_encode(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray | None) -> _Encoded:
        t0 = time.perf_counter_ns()
        try:
            k_blob, v_blob = self._encode(k, v, positions)
        except Exception as exc:  # an encoder failure is a fallback, never a crash
            return _Encoded(comp_us=_us_since(t0), error=f"{type(exc).__name__}: {exc}")
        return _Encoded(bytes(k_blob), bytes(v_blob), _us_since(t0))

    def _drain(self, block: bool) -> None:
        """Apply finished results in submission order; with ``block``, wait for all of them."""
        while self._tasks:
            task, future = self._tasks[0]
            if not future.done():
                if not block:
                    return
                t0 = time.perf_counter_ns()
                wait([future])
                self._async_wait_us += _us_since(t0)
            self._tasks.popleft()
            self._apply(task, future.result())

    def _apply(self, task: _Window, enc: _Encoded) -> None:
        """Account one encode result and store its block (probe/full: validated; store: held, released)."""
        st = self._layers[task.layer]
        attempt = len(enc.k_blob) + len(enc.v_blob)
        block = _Block(task.start, task.count, enc.k_blob, enc.v_blob, task.digest)
        if enc.error is not None or attempt == 0:
            ok = False
        elif attempt >= task.raw_bytes:  # no gain: not stored, not a fallback
            ok = True
        elif self._store:
            ok = self._hold(task, st, block)
        else:
            ok = self._decode_block(task.layer, st, block) is not None
            if ok:
                st.blocks.append(block)
                if self.config.decode_cache_blocks > 0:
                    del st.blocks[:-self.config.decode_cache_blocks]
        eff = attempt if ok and attempt < task.raw_bytes else task.raw_bytes
        st.raw_bytes += task.raw_bytes
        st.comp_bytes += eff
        st.comp_us += enc.comp_us
        st.fallback += not ok
        self._codec_us = enc.comp_us
        self._queue_peak = max(self._queue_peak, len(st.blocks) + len(self._tasks))
        self._log_line(task.layer, st, task.kv, task.start, task.count, task.raw_bytes, attempt, eff, enc.comp_us)

    def _hold(self, task: _Window, st: _Layer, block: _Block) -> bool:
        """Store mode: keep the blobs and release the raw rows (after a verifying decode if strict)."""
        if task.start + task.count > self.cache.length(task.layer):
            return False
        if self.config.strict_roundtrip_check:
            decoded = self._decode_block(task.layer, st, block)
            if decoded is None:
                return False
            self._remember(task.layer, block, decoded)
        self._zero(task.layer, block)
        st.blocks.append(block)
        return True

    def _decode_block(self, layer: int, st: _Layer, block: _Block) -> tuple[np.ndarray, np.ndarray] | None:
        """A real decode (timed, counted as a cache miss); None on failure (counted by the caller)."""
        self._cache_miss += 1
        t0 = time.perf_counter_ns()
        try:
            k, v = self._decode(block.k_blob, block.v_blob)
        except Exception:  # a corrupt blob is a fallback, never a crash
            return None
        finally:
            st.decomp_us += _us_since(t0)
        expected = (block.count, *self.cache.k(layer).shape[1:])
        if k.dtype != np.float16 or v.dtype != np.float16 or k.shape != expected or v.shape != expected:
            return None
        if self.config.strict_roundtrip_check and _digest(k, v) != block.digest:
            return None
        return k, v

    def _remember(self, layer: int, block: _Block, kv: tuple[np.ndarray, np.ndarray]) -> None:
        """Insert a decoded window into the LRU (``decode_cache_blocks`` entries; 0 disables it)."""
        cap = self.config.decode_cache_blocks
        if cap <= 0:
            return
        self._decoded[(layer, block.start, block.count, block.digest)] = kv
        while len(self._decoded) > cap:
            self._decoded.popitem(last=False)

    def _restore(self, layer: int, st: _Layer, block: _Block) -> bool:
        """Write a released window back (LRU hit: copy; miss: decode). False: lost (a fallback)."""
        key = (layer, block.start, block.count, block.digest)
        kv = self._decoded.get(key)
        if kv is not None:
            self._decoded.move_to_end(key)
            self._cache_hit += 1
        else:
            kv = self._decode_block(layer, st, block)
            if kv is None:
                st.fallback += 1
                return False
            self._remember(layer, block, kv)
        try:
            self.cache.write(layer, block.start, *kv)
        except ValueError:
            st.fallback += 1
            return False
        block.released = False
        return True

    def _zero(self, layer: int, block: _Block) -> None:
        zeros = np.zeros((block.count, *self.cache.k(layer).shape[1:]), np.float16)
        self.cache.write(layer, block.start, zeros, zeros)
        block.released = True

    def _release(self, layer: int, st: _Layer) -> None:
        """Store mode, after the layer's attention: release the raw rows of its held windows again."""
        for block in st.blocks:
            if not block.released:
                self._zero(layer, block)

    # ------------------------------------------------------------------------------- reporting

    def _log_line(self, layer: int, st: _Layer, kv: int, start: int, tokens: int, raw: int, attempt: int,
                  eff: int, comp_us: int) -> None:
        if self.log is None:
            return
        self.log(
            f"[H2O-LOSSLESS] layer={layer} kv={kv} start={start} tokens={tokens} raw={raw} "
            f"attempt_comp={attempt} eff_comp={eff} attempt_ratio={raw / attempt if attempt else 1.0:.4f} "
            f"eff_ratio={raw / eff if eff else 1.0:.4f} comp_us={comp_us} decomp_us={st.decomp_us} "
            f"updates={st.update_count} fallback={st.fallback} backpressure={st.backpressure} "
            f"queue={len(st.blocks) + len(self._tasks)} async_q_peak={self._async_queue_peak} "
            f"async_wait_us={self._async_wait_us} mode={MODE_IDS[self.config.runtime_mode]} zstd=1")

    def _included(self) -> list[_Layer]:
        """Layers the totals cover (§7.1): the scope's layers with updates, else every layer with updates."""
        cfg = self.config
        front = cfg.scope in ("front_n", "front_n_and_h2o_kept")
        kept = cfg.scope in ("h2o_kept", "front_n_and_h2o_kept")
        updated = [(i, st) for i, st in enumerate(self._layers) if st.update_count > 0]
        chosen = [st for i, st in updated if (front and i < cfg.front_n) or (kept and i in self.h2o_range)]
        return chosen or [st for _, st in updated]

    def resident_kv_bytes(self) -> int:
        """Bytes the KV really occupies: cache bytes minus released windows (their token union), plus
        the held blobs and the decoded windows kept by the LRU."""
        total = sum(arr.nbytes for kv in self._decoded.values() for arr in kv)
        for layer, st in enumerate(self._layers):
            total += self.cache.nbytes(layer)
            if not self._store:
                continue
            total += sum(b.blob_bytes for b in st.blocks)
            released, reach = 0, 0
            for lo, hi in sorted((b.start, b.start + b.count) for b in st.blocks if b.released):
                released += max(0, hi - max(lo, reach))
                reach = max(reach, hi)
            total -= released * self.cache.nbytes(layer) // max(1, self.cache.length(layer))
        return total

    def metrics(self) -> dict[str, float | int]:
        """The ``h2o_lossless*`` metrics (§7.2; bytes in MiB, times in µs), plus resident bytes and updates."""
        layers = self._included()
        raw = sum(st.raw_bytes for st in layers)
        comp = sum(st.comp_bytes for st in layers)
        return {
            "h2o_lossless": raw / comp if raw > 0 and comp > 0 else 1.0,
            "h2o_lossless_raw_mb": raw / 1048576,
            "h2o_lossless_comp_mb": comp / 1048576,
            "h2o_lossless_comp_us": sum(st.comp_us for st in layers),
            "h2o_lossless_decomp_us": sum(st.decomp_us for st in layers),
            "h2o_lossless_queue_peak": self._queue_peak,
            "h2o_lossless_fallback": sum(st.fallback for st in layers),
            "h2o_lossless_backpressure_skip": sum(st.backpressure for st in layers),
            "h2o_lossless_async_queue_peak": self._async_queue_peak,
            "h2o_lossless_async_wait_us": self._async_wait_us,
            "h2o_lossless_decode_cache_hit": self._cache_hit,
            "h2o_lossless_decode_cache_miss": self._cache_miss,
            "h2o_codec_us": self._codec_us,
            "resident_kv_bytes": self.resident_kv_bytes(),
            "lossless_updates": sum(st.update_count for st in layers),
        }
