"""The hf runtime (transformers) against the reference runtime, on a tiny random-weight LLaMA (no download).

Skips when the ``hf`` extra (torch, transformers; kvpress for the press tests) is not installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the hf runtime needs torch: pip install 'pytest-h2o[hf]'")
pytest.importorskip("transformers", reason="the hf runtime needs transformers: pip install 'pytest-h2o[hf]'")

from h2o_test_helpers import make_gate_dir  # noqa: E402

import pytest_h2o.session  # noqa: E402,F401  (in-process pytester: the plugin's modules are imported once)
from h2o_kernels.config_keys import ConfigError  # noqa: E402
from h2o_kernels.lossless.offline_eval import EvalOptions, evaluate  # noqa: E402
from h2o_kernels.model.llama import LlamaConfig, LlamaModel  # noqa: E402
from h2o_kernels.runtimes.base import ModelInfo, run_tokens  # noqa: E402
from h2o_kernels.runtimes.hf import HFRuntime, hf_from_reference  # noqa: E402
from h2o_kernels.runtimes.hf_press import PressError  # noqa: E402
from h2o_kernels.runtimes.reference import ReferenceRun  # noqa: E402
from h2o_kernels.runtimes.registry import open_runtime  # noqa: E402

try:  # imported once here, when installed: an in-process pytester run that imported kvpress (and datasets) drops
    import kvpress  # noqa: E402,F401  the modules again, and a second import registers pyarrow's extension types twice
except ImportError:
    pass

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}
H2O = {"kv_h2o_enable": True, "kv_h2o_block_tokens": 1, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 16,
       "kv_h2o_trigger_min_tokens": 64, "kv_h2o_update_interval": 4, "kv_h2o_layer_start": 1}
LOSSLESS = {"kv_lossless_enable": True, "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_enable": True,
            "kv_lossless_scope": "front_n_and_h2o_kept",
            "kv_lossless_front_n": 2, "kv_lossless_block_tokens": 16, "kv_lossless_hot_recent_tokens": 16,
            "kv_lossless_hot_sink_tokens": 4, "kv_lossless_async_threads": 0}


@pytest.fixture(scope="module")
def models() -> tuple[LlamaModel, HFRuntime]:
    config = LlamaConfig.from_hf_config(TINY, "tiny")
    ref = LlamaModel.random(config, seed=7, std=0.2)
    runtime = HFRuntime(hf_from_reference(ref), ModelInfo("tiny", 1, config),
                        lambda text, count, seed=0: np.random.default_rng(seed).integers(0, 300, count))
    return ref, runtime


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, TINY["vocab_size"], 200)


def test_the_full_cache_gives_the_reference_logits_and_bytes(models, ids):
    ref, hf = models
    a = ReferenceRun(ref, {}).run(ids[:128], ids[128:], keep_logits=True)
    b = hf.configure({}).run(ids[:128], ids[128:], keep_logits=True)
    assert b.logits.shape == a.logits.shape == (72, TINY["vocab_size"])
    assert np.abs(a.logits - b.logits).max() < 1e-2
    assert b.held_kv_bytes == a.held_kv_bytes  # fp16 bytes, as the reference counts them
    assert b.prefill_tok_s > 0 and b.decode_tok_s > 0


@pytest.mark.parametrize("per_head", [False, True])
def test_our_h2o_evicts_the_same_amount_as_on_the_reference(models, ids, per_head):
    ref, hf = models
    config = {**H2O, "kv_h2o_per_head": per_head}
    a = ReferenceRun(ref, config).run(ids[:128], ids[128:], keep_logits=True)
    b = hf.configure(config).run(ids[:128], ids[128:], keep_logits=True)
    for key in ("h2o_lossy", "h2o_evictions", "h2o_evicted_tokens"):
        assert b.metrics[key] == a.metrics[key], key
    assert b.metrics["h2o_lossy"] > 2.0
    assert b.held_kv_bytes == a.held_kv_bytes
    # every layer holds its tokens in time order, each head its own (per_head) or all the same ones
    run = hf.configure(config)
    run.keep_cache = True
    run.run(ids[:128], ids[128:])
    for layer in range(TINY["num_hidden_layers"]):
        positions = run.cache.positions(layer)
        assert np.all(np.diff(positions, axis=0) > 0)
        assert per_head or np.all(positions == positions[:, :1])


def test_evicting_the_first_layers_only_matches_the_reference(models, ids):
    """Layer 0 holding fewer tokens than later layers: the model-wide mask (sized for layer 0) fits every layer."""
    ref, hf = models
    config = {**H2O, "kv_h2o_layer_start": 0, "kv_h2o_layer_end": 1}
    a = ReferenceRun(ref, config).run(ids[:128], ids[128:], keep_logits=True)
    b = hf.configure(config).run(ids[:128], ids[128:], keep_logits=True)
    assert b.metrics["h2o_lossy"] == a.metrics["h2o_lossy"] > 2.0
    assert b.held_kv_bytes == a.held_kv_bytes and b.held_kv_bytes[0] < b.held_kv_bytes[3]
    assert np.mean(np.argmax(a.logits, -1) == np.argmax(b.logits, -1)) > 0.9


def test_ragged_heads_are_padded_and_masked_like_the_reference(models, ids):
    """Heads that keep different counts: the next tokens' logits are the reference cache's, whose heads are
    ragged too (the padding is masked, each head's new tokens follow its own)."""
    import torch

    ref, hf = models
    keep = [np.arange(0, 64, 2), np.arange(0, 64, 3)]  # 32 and 22 tokens
    run = hf.configure({})
    run.keep_cache = True
    run.run(ids[:64], ids[64:64])
    ReferenceRun(ref, {}).run(ids[:64], ids[64:64])
    for layer in range(TINY["num_hidden_layers"]):
        for cache in (ref.cache, run.cache):
            cache.keep(layer, keep)
    np.testing.assert_array_equal(run.cache.head_lengths(1), [32, 22])
    np.testing.assert_array_equal(run.cache.positions(1)[:22], ref.cache.positions(1)[:22])
    for layer in hf.hf_model.model.layers:
        layer.self_attn.h2o_cache = run.cache
    try:
        for token in ids[64:68]:
            expected = ref.decode(int(token))
            p = torch.tensor([run.cache.n_seen])
            with torch.inference_mode():
                out = hf.hf_model(input_ids=torch.tensor([[int(token)]]), past_key_values=run.cache, use_cache=True,
                                  position_ids=p[None], cache_position=p)
            run.cache.n_seen += 1
            assert np.abs(out.logits[0, -1].numpy() - expected).max() < 1e-2
    finally:
        for layer in hf.hf_model.model.layers:
            layer.self_attn.h2o_cache = None
    np.testing.assert_array_equal(run.cache.head_lengths(1), [36, 26])
    np.testing.assert_array_equal(run.cache.positions(1)[22:26, 1], np.arange(64, 68))


def test_store_mode_holds_windows_compressed_and_restores_them_bit_exactly(models, ids):
    """Runtime lossless on the transformers cache: store mode releases windows (the resident bytes drop) and
    restores them for attention from the blobs, so the logits are those of the same run without lossless."""
    ref, hf = models
    plain = hf.configure(H2O).run(ids[:128], ids[128:], keep_logits=True)
    results = {}
    for mode in ("probe", "full", "store"):
        config = {**H2O, **LOSSLESS, "kv_lossless_runtime_mode": mode}
        result = results[mode] = hf.configure(config).run(ids[:128], ids[128:], keep_logits=True)
        assert result.metrics["lossless_updates"] > 0, mode
        assert result.metrics["h2o_lossless_fallback"] == 0, mode
        assert result.metrics["h2o_lossy"] == plain.metrics["h2o_lossy"]
        np.testing.assert_array_equal(result.logits, plain.logits)
        reference = ReferenceRun(ref, config).run(ids[:128], ids[128:])
        for key in ("lossless_updates", "h2o_lossless_raw_mb", "h2o_lossless_queue_peak"):
            assert result.metrics[key] == reference.metrics[key], (mode, key)
    # store mode restores released windows before each attention (decoded once, then from its LRU); full mode
    # only verifies each window once, and never restores
    assert results["store"].metrics["h2o_lossless_decode_cache_hit"] > 0
    assert results["full"].metrics["h2o_lossless_decode_cache_hit"] == 0


def test_dumps_feed_the_offline_online_sim(models, ids, tmp_path):
    ref, hf = models
    hf.configure(H2O).run(ids[:128], ids[128:], dump_dir=tmp_path / "hf", run_id="hf")
    ReferenceRun(ref, H2O).run(ids[:128], ids[128:], dump_dir=tmp_path / "ref", run_id="ref")
    names = lambda d: sorted(p.name.replace("hf", "X").replace("ref", "X") for p in d.iterdir())  # noqa: E731
    assert names(tmp_path / "hf") == names(tmp_path / "ref")
    options = EvalOptions(entry_mode="chunked_grouped", online_chunk_seq=32, stage="both")
    hf_eval, ref_eval = evaluate(tmp_path / "hf", options), evaluate(tmp_path / "ref", options)
    assert hf_eval["roundtrip_verified"] and ref_eval["roundtrip_verified"]
    assert hf_eval["raw_bytes"] == ref_eval["raw_bytes"] > 0
    assert hf_eval["lossless_ratio"] == pytest.approx(ref_eval["lossless_ratio"], rel=0.02)


PRESSES = ("expected_attention", "observed_attention", "snapkv", "streaming_llm")


@pytest.mark.parametrize("press", PRESSES)
def test_a_kvpress_press_holds_its_ratio_at_prefill_and_decode_in_time_order(models, ids, press):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress: pip install 'pytest-h2o[hf]'")
    _, hf = models
    run = hf.configure({"kv_press": press, "kv_press_compression_ratio": 0.6, "kv_h2o_layer_start": 1})
    run.keep_cache = True
    result = run.run(ids[:128], ids[128:], keep_logits=True)
    assert 2.2 < result.metrics["h2o_lossy"] < 2.5  # held 0.4 of the tokens seen, refilled for 16 steps at most
    assert result.metrics["h2o_evictions"] == 3 * (1 + 72 // 16)  # layers 1-3: prompt, then every 16 steps
    seen = 200
    assert run.cache.length(0) == seen  # outside the layer range
    for layer in (1, 2, 3):
        positions = run.cache.positions(layer)
        assert np.all(np.diff(positions, axis=0) > 0)
        assert int(0.4 * (seen - 16)) <= run.cache.length(layer) <= int(0.4 * seen) + 16
    assert 1.0 < result.metrics["h2o_lossy_model"] < result.metrics["h2o_lossy"]  # layer 0 holds everything


def test_streaming_llm_keeps_the_sinks_and_the_most_recent_tokens(models, ids):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress")
    _, hf = models
    run = hf.configure({"kv_press": "streaming_llm", "kv_press_compression_ratio": 0.5, "kv_press_decode_interval": 8,
                        "kv_h2o_layer_start": 0})
    run.keep_cache = True
    run.run(ids[:100], ids[100:116])  # the prompt to 50, then at 108 and 116 seen tokens to 54 and 58
    np.testing.assert_array_equal(run.cache.positions(2)[:, 0], list(range(4)) + list(range(62, 116)))


class KeepOldestPress:
    """A user's own press (no kvpress base class, no ``post_init_from_model``): scores tokens by age, the oldest
    kept; importable as ``test_hf_runtime:KeepOldestPress``."""

    def __init__(self, compression_ratio: float) -> None:
        self.compression_ratio = compression_ratio

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        import torch

        return -torch.arange(keys.shape[2], dtype=keys.dtype).expand(*keys.shape[:3])


def test_a_users_own_press_by_import_path(models, ids):
    _, hf = models
    run = hf.configure({"kv_press": "test_hf_runtime:KeepOldestPress", "kv_press_compression_ratio": 0.5,
                        "kv_press_decode_interval": 4, "kv_h2o_layer_start": 0, "kv_h2o_layer_end": 1})
    run.keep_cache = True
    result = run.run(ids[:100], ids[100:108], keep_logits=True)  # layers 0-1 hold fewer tokens than 2-3
    # the prompt to its first 50; then the first 52 rows of 54 (rows 50-51 hold tokens 100-101); then 54 of 56
    np.testing.assert_array_equal(run.cache.positions(0)[:, 1], [*range(50), 100, 101, 104, 105])
    assert run.cache.length(2) == 108 and result.logits.shape == (8, TINY["vocab_size"])


@pytest.mark.parametrize("config, message", [
    ({"kv_press": "snapkvv", "kv_press_compression_ratio": 0.5}, "no such kvpress press"),
    ({"kv_press": "no_such_module_x:Press", "kv_press_compression_ratio": 0.5}, "cannot import it"),
    ({"kv_press": ":Press", "kv_press_compression_ratio": 0.5}, "cannot import it"),
    ({"kv_press": "test_hf_runtime:ModelInfo", "kv_press_compression_ratio": 0.5}, "cannot build it"),
    ({"kv_press": "duo_attention", "kv_press_compression_ratio": 0.5}, "is not a ScorerPress"),
    ({"kv_press": "pyramid_kv", "kv_press_compression_ratio": 0.5}, "compresses its own way"),
    ({"kv_press": "snapkv", "kv_h2o_enable": True, "kv_press_compression_ratio": 0.5}, "kv_h2o_enable both evict"),
    ({"kv_press": "snapkv", "kv_press_compression_ratio": 1.0}, r"must be in \(0, 1\)"),
    ({"kv_press": "snapkv"}, r"kv_press_compression_ratio' must be in \(0, 1\).*got 0.0"),
    ({"kv_press": "snapkv", "kv_press_compression_ratio": 0.5, "kv_press_decode_interval": -3}, "must be >= 0"),
    ({"kv_press": 3}, "must be a JSON string"),
])
def test_a_bad_press_is_a_config_error_naming_it(models, config, message):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress")
    _, hf = models
    with pytest.raises(ConfigError, match=message):
        hf.configure(config)


def test_a_press_that_breaks_says_where(models, ids):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress")
    _, hf = models
    run = hf.configure({"kv_press": "snapkv", "kv_press_compression_ratio": 0.5, "kv_h2o_layer_start": 0})
    with pytest.raises(PressError, match=r"kv_press 'snapkv' failed on layer 0 holding 64 of 64 tokens \(prefill"):
        run.run(ids[:64], ids[64:70])  # SnapKV needs more than its 64-token window


def test_a_press_on_the_reference_runtime_is_refused(models):
    ref, _ = models
    with pytest.raises(ConfigError, match="runs on the hf runtime only"):
        ReferenceRun(ref, {"kv_press": "snapkv", "kv_press_compression_ratio": 0.5})


def test_open_runtime_loads_a_config_json_with_the_reference_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    hf = open_runtime("hf", str(tmp_path / "config.json"))
    ref = open_runtime("reference", str(tmp_path / "config.json"))
    prompt, continuation = run_tokens(ref, 40, 8, None)
    np.testing.assert_array_equal(run_tokens(hf, 40, 8, None)[0], prompt)
    a = ref.configure({}).run(prompt, continuation, keep_logits=True)
    b = hf.configure({}).run(prompt, continuation, keep_logits=True)
    assert np.abs(a.logits - b.logits).max() < 1e-2
    with pytest.raises(ValueError, match="reference runtime runs on the CPU only"):
        open_runtime("reference", str(tmp_path / "config.json"), device="cuda")


def test_a_transformers_model_folder_loads_with_its_own_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", *sorted(set("the quick brown fox jumps over a lazy dog and runs".split()))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path)
    config = HFLlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    hf = open_runtime("hf", str(tmp_path))
    assert hf.model.name == tmp_path.name and hf.model.config.num_kv_heads == 2 and hf.model.size_bytes > 0
    ids = hf.text_ids("the quick brown fox " * 40, 120)
    np.testing.assert_array_equal(ids[:4], [words.index(w) for w in ("the", "quick", "brown", "fox")])
    result = hf.configure(H2O).run(ids[:100], ids[100:], keep_logits=True)
    assert result.logits.shape == (20, len(words)) and result.metrics["h2o_lossy"] > 1.0


@pytest.mark.parametrize("config, message", [
    ({}, "its config.json is not a transformers model config"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported by the hf runtime"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window attention"),
    ({"model_type": "llama", "hidden_size": "big"}, "config.json"),
])
def test_a_folder_the_hf_runtime_cannot_run_is_a_model_spec_error(tmp_path, config, message):
    from h2o_kernels.model.loading import ModelSpecError

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSpecError, match=message):
        open_runtime("hf", str(tmp_path))


def test_the_cli_benches_on_the_hf_runtime_and_refuses_a_press_elsewhere(tmp_path, capsys):
    from pytest_h2o.cli.main import main

    (tmp_path / "config.json").write_text(json.dumps(TINY))
    press = tmp_path / "press.json"
    press.write_text(json.dumps({"kv_press": "streaming_llm", "kv_press_compression_ratio": 0.5}))
    model = str(tmp_path / "config.json")
    assert main(["bench", "--runtime", "hf", "-m", model, "-c", str(press), "-p", "64", "-n", "8", "-rep", "1"]) == 0
    out = capsys.readouterr().out
    assert "h2o_fidelity_top1" in out and "speed(tok/s)" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "-m", model, "-c", str(press), "-p", "64", "-n", "8"])
    assert exit_info.value.code == 2
    assert "runs on the hf runtime only" in capsys.readouterr().err
    for args, message in ((["--device", "cuda"], "runs on the CPU only"),
                          (["--runtime", "hf", "--device", "cuda"], "sees no CUDA device"),
                          (["--runtime", "hf", "-c", str(tmp_path / "bad.json")], "no such kvpress press")):
        (tmp_path / "bad.json").write_text(json.dumps({"kv_press": "snapkvv", "kv_press_compression_ratio": 0.5}))
        if "cuda" in args and torch_cuda():
            continue
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *args, "-m", model])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# the plugin ---------------------------------------------------------------------------------------
PRESET = {"prompts": [192], "gens": [32], "repeat": 2, "h2o_keep_ratios": [0.3], "h2o_block_tokens": [1],
          "h2o_sink_tokens": [4], "h2o_recent_tokens": [8], "h2o_ema_alphas": [0.9], "h2o_update_intervals": [4],
          "h2o_trigger_min_tokens": [32], "h2o_layer_start": 1, "h2o_layer_end": -1, "h2o_target_mode": "static",
          "h2o_target_lossy_ratios": [3.0], "kv_lossless_enable": True, "kv_lossless_codec": "gear_delta",
          "kv_lossless_runtime_enable": True,
          "kv_lossless_runtime_mode": "full", "kv_lossless_block_tokens": 16, "kv_lossless_hot_recent_tokens": 8,
          "kv_lossless_hot_sink_tokens": 4, "kv_lossless_async_threads": 0,
          "variants": {"h2o": {}, "snapkv": {"kv_h2o_enable": False, "kv_press": "snapkv",
                                             "kv_press_compression_ratio": 0.6}}}
EASY = ["--h2o-lossy-target=1.2", "--h2o-lossless-target=0.5", "--h2o-decode-drop-target=0.9"]


@pytest.fixture
def gate_dir(pytester: pytest.Pytester) -> Path:
    return make_gate_dir(pytester, TINY, PRESET)


def test_the_gate_runs_our_h2o_and_a_press_on_the_hf_runtime(pytester, gate_dir):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress")
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out", "--h2o-runtime=hf", *EASY,
                                "--junitxml=report.xml")
    result.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    result.stdout.fnmatch_lines(["*loading model model.json on the hf runtime*", "snapkv *PASS*"])
    results = json.loads((gate_dir / "out" / "results.json").read_text())
    assert results["runtime"] == "hf"
    configs = results["configs"]
    assert configs["snapkv"]["h2o_lossy"] > 2.0 and configs["h2o"]["h2o_lossy"] > 2.0
    assert all("lossless_online" in row and "h2o_fidelity_top1" in row for row in configs.values())
    assert '<property name="h2o_runtime" value="hf"' in (gate_dir / "report.xml").read_text()


def test_a_press_that_fails_fails_its_configuration_alone(pytester, gate_dir):
    pytest.importorskip("kvpress", reason="kvpress presses need kvpress")
    preset = {**PRESET, "prompts": [48],  # SnapKV needs more than its 64-token window
              "variants": {"h2o": {}, "snapkv": {"kv_h2o_enable": False, "kv_press": "snapkv",
                                                 "kv_press_compression_ratio": 0.5}}}
    (gate_dir / "tiny.json").write_text(json.dumps({**preset, "h2o_trigger_min_tokens": [16]}))
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out", "--h2o-runtime=hf", *EASY)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    configs = json.loads((gate_dir / "out" / "results.json").read_text())["configs"]
    assert "kv_press 'snapkv' failed on layer 1 holding 48 of 48 tokens (prefill" in configs["snapkv"]["error"]
    assert configs["h2o"]["h2o_lossy"] > 1.0 and "error" not in configs["h2o"]


@pytest.mark.parametrize("args, message", [
    (("--h2o-runtime=hf", "--h2o-device=cuda"), "--h2o-device cuda: torch"),
    (("--h2o-device=cuda",), "--h2o-device cuda: only the hf runtime (--h2o-runtime hf) runs on cuda"),
    (("--h2o-runtime=gpu",), "expected one of reference, hf, llm-bench"),
    (("--h2o-runtime=llm-bench",), "--h2o-runtime llm-bench: name the binary with --h2o-llm-bench"),
    (("--h2o-runtime=hf", "--h2o-model=."), "--h2o-model .: a folder without config.json"),
    (("--h2o-runtime=hf", "--h2o-model=gpt"), "--h2o-model gpt: model_type 'gpt2' is not supported by the hf runtime"),
    (("--h2o-runtime=hf", "--h2o-scope=front_n"), None),  # a valid run's settings: checked below with a bad press
])
def test_runtime_and_device_mistakes_are_usage_errors(pytester, gate_dir, args, message):
    import torch

    if "--h2o-device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    (gate_dir / "gpt").mkdir()
    (gate_dir / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    preset = {k: v for k, v in PRESET.items() if k != "variants"}
    if message is None:  # a misspelled press is refused before the model loads
        preset["variants"] = {"bad": {"kv_h2o_enable": False, "kv_press": "snapkvv", "kv_press_compression_ratio": 0.5}}
        message = "tiny.json (bad): kv_press 'snapkvv': no such kvpress press (did you mean 'snapkv'?)"
    (gate_dir / "tiny.json").write_text(json.dumps(preset))
    result = pytester.runpytest("--h2o-preset=tiny.json", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_a_missing_extra_is_a_usage_error_saying_what_to_install(pytester, gate_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-runtime=hf")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--h2o-runtime hf needs torch: pip install 'pytest-h2o[hf]'" in result.stderr.str()
