"""The reference runtime end to end on a tiny random model: policies that must not change what the
model computes leave its logits bit-identical; ``h2o-gate bench`` and ``sweep`` write their reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.model.llama import LlamaModel
from h2o_kernels.runtimes.reference import ReferenceRun
from pytest_h2o.cli.main import main

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}
H2O = {"kv_h2o_enable": True, "kv_h2o_block_tokens": 4, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 8,
       "kv_h2o_update_interval": 4, "kv_h2o_trigger_min_tokens": 32, "kv_h2o_layer_start": 1}
LOSSLESS = {"kv_lossless_enable": True, "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_enable": True,
            "kv_lossless_block_tokens": 32, "kv_lossless_hot_recent_tokens": 8, "kv_lossless_hot_sink_tokens": 4,
            "kv_lossless_scope": "front_n_and_h2o_kept", "kv_lossless_front_n": 2}


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return LlamaModel.random(TINY, seed=7, std=0.2)


@pytest.fixture(scope="module")
def tokens() -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(3).integers(0, TINY["vocab_size"], 96)
    return ids[:64], ids[64:]


@pytest.fixture(scope="module")
def plain(model, tokens):
    return ReferenceRun(model, {}).run(*tokens, keep_logits=True)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("mode", ["probe", "full", "store"])
def test_keep_all_eviction_and_every_lossless_mode_leave_the_logits_bit_identical(model, tokens, plain, mode,
                                                                                   per_head):
    config = {**H2O, "kv_h2o_target_mode": "static", "kv_h2o_target_keep_ratio": 1.0, **LOSSLESS,
              "kv_lossless_runtime_mode": mode, "kv_lossless_decode_cache_blocks": 2, "kv_h2o_per_head": per_head}
    result = ReferenceRun(model, config).run(*tokens, keep_logits=True)
    assert np.array_equal(result.logits, plain.logits)
    m = result.metrics
    assert m["h2o_evictions"] == 0 and m["h2o_lossy"] == 1.0
    assert m["h2o_lossless_raw_mb"] > 0 and m["h2o_lossless_comp_mb"] > 0 and m["h2o_lossless_fallback"] == 0
    assert m["h2o_lossless_decomp_us"] > 0  # something was really decoded
    assert m["h2o_lossless"] == pytest.approx(m["h2o_lossless_raw_mb"] / m["h2o_lossless_comp_mb"])


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("scope", ["h2o_kept", "front_n_and_h2o_kept"])
@pytest.mark.parametrize("mode", ["probe", "full", "store"])
def test_every_lossless_mode_leaves_an_evicting_run_bit_identical(model, tokens, mode, scope, per_head):
    h2o = {**H2O, "kv_h2o_block_tokens": 1, "kv_h2o_target_lossy_ratio": 2.0, "kv_h2o_per_head": per_head}
    evicting = ReferenceRun(model, h2o).run(*tokens, keep_logits=True)
    config = {**h2o, **LOSSLESS, "kv_lossless_runtime_mode": mode, "kv_lossless_scope": scope,
              "kv_lossless_block_tokens": 8, "kv_lossless_store_bootstrap_tokens": 8,
              "kv_lossless_store_grouped_step_tokens": 8, "kv_lossless_kept_sample_layers": 0}
    result = ReferenceRun(model, config).run(*tokens, keep_logits=True)
    assert np.array_equal(result.logits, evicting.logits)
    m = result.metrics
    assert m["h2o_evictions"] > 0 and m["h2o_lossless_raw_mb"] > 0 and m["h2o_lossless_fallback"] == 0


def test_eviction_holds_the_target_and_changes_little(model, tokens, plain):
    result = ReferenceRun(model, {**H2O, "kv_h2o_target_lossy_ratio": 2.0}).run(*tokens, keep_logits=True)
    m = result.metrics
    assert m["h2o_evictions"] > 0 and 1.6 < m["h2o_lossy"] < 2.4 and m["h2o_lossy_model"] < m["h2o_lossy"]
    assert not np.array_equal(result.logits, plain.logits)
    assert np.isfinite(result.logits).all()


def test_trigger_ratios_are_of_the_tokens_seen_so_the_originals_ceiling_check_passes(model, tokens):
    """h2o_floor_keep / h2o_quantized_keep as the original's: 1 / max of them reaches the target a run held."""
    m = ReferenceRun(model, {**H2O, "kv_h2o_target_lossy_ratio": 2.0}).run(*tokens).metrics
    assert m["h2o_lossy"] > 1.6 and 1.0 / max(m["h2o_floor_keep"], m["h2o_quantized_keep"]) >= 2.0
    assert m["h2o_floor_keep"] == pytest.approx(12 / 96, abs=4 / 96)  # sink block + recent blocks of ~96 seen
    assert m["h2o_floor_keep_held"] > 1.5 * m["h2o_floor_keep"]  # the held cache: about half the tokens seen


def test_dump_kv_writes_the_final_cache(model, tokens, tmp_path):
    runtime = ReferenceRun(model, {**H2O, **LOSSLESS, "kv_lossless_runtime_mode": "store"})
    runtime.run(*tokens, dump_dir=tmp_path, run_id="r")
    metas = sorted(tmp_path.glob("meta_*.json"))
    assert len(metas) == 2 * TINY["num_hidden_layers"]
    k = np.fromfile(tmp_path / json.loads(metas[0].read_text())["k_file"], dtype="<f2")
    assert np.isfinite(k).all() and np.count_nonzero(k) > 0.9 * k.size  # no window left zeroed


def test_bad_config_types_name_the_key(model):
    with pytest.raises(ConfigError, match="kv_h2o_block_tokens"):
        ReferenceRun(model, {"kv_h2o_block_tokens": 32.0}, source="c.json")
    with pytest.raises(ConfigError, match="kv_lossless_predictors_k"):
        ReferenceRun(model, {"kv_lossless_predictors_k": "raw,nope"})


def test_bench_cli_writes_the_table_and_its_json_twin(tmp_path, capsys):
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY))
    kv = tmp_path / "kv.json"
    kv.write_text(json.dumps({**H2O, **LOSSLESS, "kv_lossless_runtime_mode": "full"}))
    log = tmp_path / "logs" / "bench.log"
    rc = main(["bench", "-m", str(config), "-c", str(kv), "-p", "40", "-n", "16", "-rep", "2", "-fp", str(log)])
    assert rc == 0
    header, _, row = log.read_text().splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(names, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["model"] == "tiny" and cells["llm_demo"] == "prompt=40<br>decode=16"
    assert "<br>" in cells["speed(tok/s)"] and " ± " in cells["h2o_lossless"]
    report = json.loads(log.with_suffix(".json").read_text())
    assert len(report["runs"]["decode_tps"]) == 2 and report["decode_tps"] > 0
    assert 0.0 <= report["h2o_fidelity_top1"] <= 1.0 and "h2o_fidelity_ppl_delta" in report
    assert report["h2o_lossless_raw_mb"] > 0 and report["config"]["kv_lossless_runtime_mode"] == "full"


def test_bench_cli_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kv_h2o_enable": 1}))
    with pytest.raises(SystemExit) as exc:
        main(["bench", "-m", "nope.gguf", "-c", str(bad)])
    assert exc.value.code == 2 and "kv_h2o_enable" in capsys.readouterr().err


def test_sweep_on_the_reference_runtime(tmp_path):
    config = tmp_path / "tiny" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY))
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"prompts": [64], "gens": [16], "repeat": 1, "h2o_keep_ratios": [0.5],
                                  "h2o_target_lossy_ratios": [1.5, 2.0], "h2o_block_tokens": [4],
                                  "h2o_trigger_min_tokens": [16], "h2o_recent_tokens": [8], "h2o_sink_tokens": [4]}))
    out = tmp_path / "out"
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(out), "-m", str(config)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["return_code"] for m in manifest] == [0, 0]
    lossy = [json.loads(Path(m["log"]).with_suffix(".json").read_text())["h2o_lossy"] for m in manifest]
    assert 1.0 < lossy[0] < lossy[1]
