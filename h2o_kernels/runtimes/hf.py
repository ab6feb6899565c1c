"""The hf runtime: a HuggingFace transformers causal LM with our KV policies (``pip install 'pytest-h2o[hf]'``).

Runs like the reference runtime: prefill the prompt, then feed the continuation one token a step (teacher
forcing) with explicit ``position_ids``/``cache_position`` (derived ones would come from the compressed
cache length). The cache is an :class:`~h2o_kernels.runtimes.hf_cache.H2OCache`. Forward hooks on every
layer's ``self_attn`` drive, in the reference runtime's order:

- before the layer appends its token: the lossless manager restores windows held compressed, then our
  :class:`~h2o_kernels.eviction.h2o.H2OPolicy` applies its pending plan (shared or per KV head);
- after attention: H2O scores the eager softmax ``[heads, q, k]`` (and plans on decode steps), or a press
  (:mod:`h2o_kernels.runtimes.hf_press`) compresses; then the lossless manager schedules its windows.

The attention is transformers' eager attention registered as ``h2o_eager``: it fits the model-wide mask
(sized for layer 0's cache) to each layer's key length, so layers may hold different counts (the columns a
layer holds beyond layer 0 are older tokens, visible to every new one), and adds the padding mask of heads
that hold fewer tokens. Models compute in float32 (a model folder on cuda: float16) with
``threads`` torch threads: two threads with another busy core decode 4x slower than one (measured,
SmolLM2-135M, 2 cores), so the default is one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from transformers import (
    AttentionInterface,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers import LlamaConfig as HFLlamaConfig
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils import logging as hf_logging

from h2o_kernels.codec.rope import model_rope
from h2o_kernels.eviction.press_config import PressConfig
from h2o_kernels.lossless.kvdump import dump_cache
from h2o_kernels.model.kv_capture import prompt_ids
from h2o_kernels.model.llama import LlamaConfig, LlamaModel, ModelConfigError
from h2o_kernels.model.loading import EMBEDDED_MODEL, LoadedModel, ModelSpecError, load_model
from h2o_kernels.model.run_memory import RunTooLargeError, check_run_fits
from h2o_kernels.runtimes.base import ModelInfo, RunResult, check_config
from h2o_kernels.runtimes.hf_cache import H2OCache
from h2o_kernels.runtimes.hf_press import PressDriver
from h2o_kernels.runtimes.policies import KVPolicies

ATTN_IMPLEMENTATION = "h2o_eager"


def _h2o_eager(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # ``dropout`` may come by position: kvpress wraps registered attention functions and passes it so
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., -key.shape[-2]:]  # the new keys are the cache's last ones
    elif attention_mask is not None and attention_mask.shape[-1] < key.shape[-2]:  # older tokens: visible
        attention_mask = torch.nn.functional.pad(attention_mask, (key.shape[-2] - attention_mask.shape[-1], 0))
    cache: H2OCache | None = getattr(module, "h2o_cache", None)
    padding = cache.padding_mask(module.layer_idx, query.shape[-2], query.dtype) if cache is not None else None
    if padding is not None:
        padding = padding.repeat_interleave(query.shape[1] // key.shape[1], dim=1).to(query.device)
        attention_mask = padding if attention_mask is None else attention_mask + padding
    return eager_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def register_attention() -> str:
    """Register :data:`ATTN_IMPLEMENTATION` in transformers' attention and mask registries (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _h2o_eager)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, eager_mask)  # looked up by the same name
    return ATTN_IMPLEMENTATION


def hf_from_reference(ref: LlamaModel) -> LlamaForCausalLM:
    """A transformers ``LlamaForCausalLM`` (float32, ``h2o_eager``) with the weights of our numpy model ``ref``
    (our GGUF loader already un-permutes Q/K into transformers' rotate-half layout)."""
    register_attention()
    c = ref.config
    hf_config = HFLlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                              intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                              num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                              head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_eps,
                              tie_word_embeddings=c.tie_embeddings, max_position_embeddings=c.max_position or 8192,
                              bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    hf_config._attn_implementation = ATTN_IMPLEMENTATION
    model = LlamaForCausalLM(hf_config).eval()
    nh, nkv, D, inter = c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    t = lambda a: torch.from_numpy(np.require(a, np.float32, ["C", "W"]))  # noqa: E731  (GGUF maps are read-only)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t(ref.embed))
        if not c.tie_embeddings:
            model.lm_head.weight.copy_(t(ref.head.T))
        model.model.norm.weight.copy_(t(ref.norm))
        for layer, w in zip(model.model.layers, ref.layers):
            wqkv = w.wqkv.T  # [out, hidden]: rows q | k | v
            layer.self_attn.q_proj.weight.copy_(t(wqkv[:nh * D]))
            layer.self_attn.k_proj.weight.copy_(t(wqkv[nh * D:(nh + nkv) * D]))
            layer.self_attn.v_proj.weight.copy_(t(wqkv[(nh + nkv) * D:]))
            layer.self_attn.o_proj.weight.copy_(t(w.wo.T))
            layer.mlp.gate_proj.weight.copy_(t(w.w_gate_up.T[:inter]))
            layer.mlp.up_proj.weight.copy_(t(w.w_gate_up.T[inter:]))
            layer.mlp.down_proj.weight.copy_(t(w.w_down.T))
            layer.input_layernorm.weight.copy_(t(w.attn_norm))
            layer.post_attention_layernorm.weight.copy_(t(w.ffn_norm))
    return model


class HFRuntime:
    """The hf runtime (a :class:`~h2o_kernels.runtimes.base.Runtime`) over a loaded transformers model."""

    kind = "hf"
    has_logits = True
    has_dumps = True

    def __init__(self, model: PreTrainedModel, info: ModelInfo, encode: Callable[[str | None, int, int], np.ndarray],
                 threads: int | None = 1, device: str = "cpu") -> None:
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise ValueError(f"the model must use attn_implementation={ATTN_IMPLEMENTATION!r} (register_attention), "
                             f"not {model.config._attn_implementation!r}")
        self.hf_model, self.model, self._encode = model.to(device).eval(), info, encode
        self.threads, self.device = threads, device

    @classmethod
    def load(cls, spec: str, threads: int | None = 1, device: str = "cpu",
             progress: Callable[[str], None] | None = None, model_option: str = "-m") -> HFRuntime:
        """``spec``: ``smollm2``, a ``.gguf`` file or a HF-style ``config.json`` (random weights), loaded by our
        loader and copied into transformers (same weights and tokenizer as the reference runtime), or a
        transformers model folder (``from_pretrained``, tokenizer from the folder, no special tokens added).
        Raises ``ModelSpecError`` / ``ModelFetchError`` as :func:`~h2o_kernels.model.loading.load_model`."""
        if threads is not None:
            torch.set_num_threads(threads)
        path = Path(spec)
        if spec != EMBEDDED_MODEL and path.is_dir():
            return cls._load_folder(path, threads, device, model_option)
        loaded = load_model(spec, threads=threads, progress=progress, model_option=model_option)
        encode = _reference_encoder(loaded)
        info = ModelInfo(loaded.name, loaded.size_bytes, loaded.model.config)
        return cls(hf_from_reference(loaded.model), info, encode, threads, device)

    @classmethod
    def _load_folder(cls, path: Path, threads: int | None, device: str, model_option: str) -> HFRuntime:
        config = folder_model_config(path, model_option)
        register_attention()
        hf_logging.disable_progress_bar()  # our progress lines say what loads
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=ATTN_IMPLEMENTATION,
                                                         dtype=torch.float32 if device == "cpu" else torch.float16)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # OSError (missing weights), ValueError, TypeError from transformers' loaders
            raise ModelSpecError(f"{model_option} {path}: not a loadable transformers model folder "
                                 f"({type(exc).__name__}: {exc})") from None

        def encode(text: str | None, count: int, seed: int = 0) -> np.ndarray:
            return prompt_ids(_HFTokenizer(tokenizer), text, count, config.vocab_size, seed)

        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return cls(model, ModelInfo(path.name, size, config), encode, threads, device)

    def text_ids(self, text: str | None, count: int, seed: int = 0) -> np.ndarray:
        return self._encode(text, count, seed)

    def configure(self, config: dict[str, Any], source: str = "config", extra_kv_keys: Iterable[str] = (),
                  log: Callable[[str], None] | None = None) -> HFRun:
        return HFRun(self, config, source, log, extra_kv_keys)

    def close(self) -> None:
        self.hf_model = None


def folder_model_config(path: Path, model_option: str = "-m") -> LlamaConfig:
    """The sizes of the transformers model folder ``path`` from its config.json alone (no weights loaded).

    Raises ``ModelSpecError`` naming ``model_option`` and the folder when config.json is missing or unreadable,
    the model is not of :data:`SUPPORTED_MODEL_TYPES` with full attention, or its sizes do not fit together."""
    where = f"{model_option} {path}"
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"{where}: a folder without config.json; expected a transformers model folder, "
                             f"'{EMBEDDED_MODEL}', a .gguf file or a config.json")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # ValueError (no or unknown model_type), OSError, JSON errors
        raise ModelSpecError(f"{where}: its config.json is not a transformers model config ({exc})") from None
    _check_architecture(config, where)
    try:
        return LlamaConfig.from_hf_config(config.to_dict(), str(path / "config.json"))
    except ModelConfigError as exc:
        raise ModelSpecError(str(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. "hidden_size": "big"
        raise ModelSpecError(f"{where}: config.json has a size that is not a number ({exc})") from None


# Decoder-only families whose attention is LLaMA's (eager softmax out, one KV cache per layer, rotary positions)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _check_architecture(config: Any, where: str) -> None:
    """ModelSpecError naming ``where`` unless the model is of :data:`SUPPORTED_MODEL_TYPES` with full attention in
    every layer (a sliding-window layer crops its own cache, which our keep and positions would not follow)."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelSpecError(f"{where}: model_type {kind!r} is not supported by the hf runtime; expected one of "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)} (LLaMA-style attention)")
    sliding = [t for t in getattr(config, "layer_types", None) or [] if t != "full_attention"]
    if sliding or (getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        raise ModelSpecError(f"{where}: sliding-window attention ({sliding[0] if sliding else 'sliding_window'}) is "
                             "not supported: its layers crop their own cache; use a model with full attention")


class _HFTokenizer:
    """A transformers tokenizer behind the ``encode(text).ids`` call of the ``tokenizers`` library."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode(self, text: str) -> Any:
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return type("Encoding", (), {"ids": ids})()


def _reference_encoder(loaded: LoadedModel) -> Callable[[str | None, int, int], np.ndarray]:
    """The reference runtime's token ids (its tokenizer, or its seeded random ids), without keeping its weights."""
    tokenizer, vocab_size = loaded.tokenizer, loaded.model.config.vocab_size

    def encode(text: str | None, count: int, seed: int = 0) -> np.ndarray:
        return prompt_ids(tokenizer, text, count, vocab_size, seed)
    return encode


class HFRun:
    """One ``kv_*`` config on the hf runtime (a :class:`~h2o_kernels.runtimes.base.ConfiguredRun`).

    ``keep_cache``: keep the last run's :class:`H2OCache` in ``cache`` (for inspection; off, each run's cache is
    freed when it ends, so a gate session does not hold one cache per configuration)."""

    def __init__(self, runtime: HFRuntime, config: dict[str, Any], source: str = "config",
                 log: Callable[[str], None] | None = None, extra_kv_keys: Iterable[str] = ()) -> None:
        """Raises ``ConfigError`` (see :func:`~h2o_kernels.runtimes.base.check_config`; a press that cannot be
        built, named)."""
        check_config(config, source, extra_kv_keys, runtime="hf")
        self.runtime, self.source = runtime, source
        c = runtime.model.config
        self.policies = KVPolicies(config, source, c.num_layers, c.num_kv_heads, c.head_dim, log,
                                   rope_theta=c.rope_theta)
        press = PressConfig.from_config(config, source)
        self.press = (PressDriver(press, runtime.hf_model, self.policies.h2o_config.layer_range(c.num_layers))
                      if press.enable else None)
        self.cache: H2OCache | None = None
        self.keep_cache = False

    def run(self, prompt: np.ndarray, continuation: np.ndarray, keep_logits: bool = False,
            dump_dir: Path | None = None, run_id: str = "run", step_delay_s: float = 0.0) -> RunResult:
        """As :meth:`h2o_kernels.runtimes.reference.ReferenceRun.run` (same arguments, results and errors; on cuda the
        memory checked is the GPU's free memory, and running out of it is a ``RunTooLargeError`` too)."""
        c = self.runtime.model.config
        model, device, policies = self.runtime.hf_model, self.runtime.device, self.policies
        free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
        check_run_fits(c, len(prompt), len(continuation), self.source, keep_logits, available=free)
        cache = self.cache = H2OCache(model.config, c.num_layers, c.num_kv_heads)
        policies.start(cache)
        if self.press is not None:
            self.press.reset()
        handles = self._hook(model, cache)
        logits: list[np.ndarray] = []
        n = len(prompt)
        try:
            with torch.inference_mode():
                ids = torch.as_tensor(np.asarray(prompt, dtype=np.int64), device=device)[None]
                pos = torch.arange(n, device=device)
                t0 = time.perf_counter()
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, position_ids=pos[None],
                            cache_position=pos, logits_to_keep=1)
                if keep_logits:
                    logits.append(out.logits[0, -1].float().cpu().numpy())
                _sync(device)
                prefill_s = time.perf_counter() - t0
                cache.n_seen = n
                t0 = time.perf_counter()
                for step, token in enumerate(continuation, start=1):
                    policies.decode_step(step)
                    p = torch.tensor([cache.n_seen], device=device)
                    out = model(input_ids=torch.tensor([[int(token)]], device=device), past_key_values=cache,
                                use_cache=True, position_ids=p[None], cache_position=p)
                    cache.n_seen += 1
                    if step_delay_s > 0:
                        _sync(device)  # the delay adds to the step's own time, not to queued GPU work
                        time.sleep(step_delay_s)
                    if keep_logits and step < len(continuation):
                        logits.append(out.logits[0, -1].float().cpu().numpy())
                _sync(device)
                decode_s = time.perf_counter() - t0
        except BaseException as exc:
            policies.abort()
            self.cache = None
            if isinstance(exc, torch.OutOfMemoryError):
                raise RunTooLargeError(f"{self.source}: {n} prompt + {len(continuation)} generated tokens ran out of "
                                       f"{device} memory ({str(exc).splitlines()[0]}): use fewer tokens") from None
            raise
        finally:
            for handle in handles:
                handle.remove()
            for layer in model.model.layers:
                layer.self_attn.h2o_cache = None
        metrics = policies.finish()
        if self.press is not None:
            metrics.update(self.press.metrics())
            self.press.reset()  # its hidden-state buffers
        if dump_dir is not None:
            dump_cache(cache, dump_dir, run_id, n, rope=model_rope(c.rope_theta))
        held = [cache.nbytes(layer) for layer in range(c.num_layers)]
        if not self.keep_cache:
            self.cache = None
        return RunResult(n / prefill_s, len(continuation) / decode_s if len(continuation) else 0.0, metrics,
                         np.stack(logits) if keep_logits and logits else None, held)

    def _hook(self, model: PreTrainedModel, cache: H2OCache) -> list[Any]:
        """The forward hooks of every layer's ``self_attn`` (removed when the run ends)."""
        handles = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.h2o_cache = cache
            if self.policies.active:
                handles.append(attn.register_forward_pre_hook(self._before(i), with_kwargs=True))
            if self.policies.active or self.press is not None:
                handles.append(attn.register_forward_hook(self._after(i, cache), with_kwargs=True))
        return handles

    def _before(self, layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any) -> None:
            self.policies.before_append(layer)
        return hook

    def _after(self, layer: int, cache: H2OCache) -> Callable[..., None]:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            policies = self.policies
            if policies.h2o is not None:
                probs = output[1]
                if probs is None:
                    raise RuntimeError("attention weights are None: the model must run h2o_eager attention")
                policies.after_attention(layer, probs[0].float().cpu().numpy())
            if self.press is not None:
                self.press.after_attention(module, layer, kwargs, output, cache, policies.decoding)
            policies.after_layer(layer)
        return hook


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
