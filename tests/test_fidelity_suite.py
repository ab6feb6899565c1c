"""The fidelity suite: its texts, its numbers and ``h2o-gate fidelity`` (a tiny random-weight model keeps
every run to a second)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h2o_gates.fidelity_report import suite_rows
from h2o_gates.rules import Thresholds, check_row
from h2o_kernels.fidelity import SUITE_KINDS, SUITE_TEXTS, SuiteTextError, continuation_perplexity, spread, suite_text
from h2o_presets.matrix import PresetError, available_presets, expand, find_preset, load_preset, preset_settings
from pytest_h2o.cli.main import main
from pytest_h2o.fidelity_suite import aggregate, read_texts, row_metrics, sink_recent_config

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}
H2O = {"kv_h2o_enable": True, "kv_h2o_layer_start": 1, "kv_h2o_block_tokens": 1, "kv_h2o_sink_tokens": 4,
       "kv_h2o_recent_tokens": 8, "kv_h2o_target_lossy_ratio": 3.0, "kv_h2o_trigger_min_tokens": 16,
       "kv_h2o_update_interval": 1}
STATS = ("min", "median", "max", "mean (gated)")


def test_the_suite_texts_are_real_and_of_different_kinds():
    texts = {name: suite_text(name) for name in SUITE_TEXTS}
    assert set(SUITE_KINDS) == set(SUITE_TEXTS) and len(set(texts.values())) == len(texts)
    assert all(len(text) > 10_000 for text in texts.values())
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in texts["license"]
    assert "class ArgumentParser(" in texts["source"] and "JSONEncoder" in texts["docs"]
    with pytest.raises(SuiteTextError, match="unknown suite text 'nope'"):
        suite_text("nope")


def test_read_texts_takes_names_and_files(tmp_path):
    (tmp_path / "mine.txt").write_text("hello", encoding="utf-8")
    assert [name for name, _ in read_texts(["license", tmp_path / "mine.txt"])] == ["license", "mine.txt"]
    with pytest.raises(SuiteTextError, match="missing.txt: not a suite text"):
        read_texts([tmp_path / "missing.txt"])


def test_each_text_is_one_row_and_same_named_files_keep_their_paths(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "t.txt").write_text(f"text of {folder}")
    names = [name for name, _ in read_texts([tmp_path / "a" / "t.txt", tmp_path / "b" / "t.txt"])]
    assert names == [str(tmp_path / "a" / "t.txt"), str(tmp_path / "b" / "t.txt")]  # one reference each
    with pytest.raises(SuiteTextError, match="given twice"):
        read_texts(["pydoc", "pydoc"])


def test_spread_aggregate_and_row_metrics():
    expected = {"mean": 0.85, "min": 0.7, "median": 0.85, "max": 1.0}
    assert spread([0.9, 0.8, 0.7, 1.0]) == pytest.approx(expected)
    rows = [{"name": f"t{i}", "tokens": [8, 4], "full": {"ppl": 10.0 + i},
             "h2o": {"top1": top1, "ppl_delta": d, "kl": 0.1, "held": 3.0},
             "sink_recent": {"top1": 0.5, "ppl_delta": 0.2, "kl": 0.3, "held": 3.0}}
            for i, (top1, d) in enumerate([(0.9, 0.05), (0.8, 0.10), (0.85, 0.03)])]
    suite = {"texts": rows, "aggregate": aggregate(rows)}
    numbers = row_metrics(suite)
    assert numbers["h2o_fidelity_top1"] == pytest.approx(0.85) and numbers["h2o_fidelity_top1_min"] == 0.8
    assert numbers["h2o_fidelity_ppl_delta"] == pytest.approx(0.06) and numbers["h2o_fidelity_ppl_delta_max"] == 0.10
    assert numbers["sink_recent_fidelity_top1"] == pytest.approx(0.5) and numbers["h2o_fidelity_texts"] == 3
    verdict = check_row(numbers, Thresholds(min_top1=0.86), None, "c")["fidelity_pass"]
    assert not verdict.passed and verdict.reason == "top1 0.85 < 0.86 (mean of 3 texts) (c)"
    verdict = check_row(numbers, Thresholds(max_ppl_delta=0.075), None, "c")["fidelity_pass"]
    assert verdict.passed and "(mean of 3 texts) within ppl delta <= 0.075" in verdict.reason
    table = suite_rows(suite)
    assert [row[0] for row in table] == ["text", "t0", "t1", "t2", *STATS]
    assert table[-1][table[0].index("top1")] == "0.850" and table[-1][table[0].index("ppl delta")] == "+6.00%"


def test_sink_recent_twin_only_for_configurations_that_keep_heavy_hitters():
    assert sink_recent_config(H2O) == {**H2O, "kv_h2o_heavy_hitters": False}
    assert sink_recent_config({"kv_h2o_enable": False}) is None
    assert sink_recent_config({**H2O, "kv_h2o_heavy_hitters": False}) is None


def test_continuation_perplexity_of_uniform_logits_is_the_vocabulary_size():
    assert continuation_perplexity(np.zeros((4, 50)), np.array([1, 2, 3, 4])) == pytest.approx(50.0)


@pytest.fixture
def tiny(tmp_path) -> tuple[Path, Path]:
    model, config = tmp_path / "config.json", tmp_path / "kv.json"
    model.write_text(json.dumps(TINY))
    config.write_text(json.dumps(H2O))
    return model, config


def test_fidelity_command_prints_per_text_rows_spread_mean_and_sink_recent(tiny, tmp_path, capsys):
    model, config = tiny
    out = tmp_path / "f.json"
    assert main(["fidelity", "-m", str(model), "-c", str(config), "-p", "48", "-n", "16", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f", 48 + 16 tokens, config {config}")
    assert lines[1].split()[:3] == ["text", "tokens", "full-cache"] and "sink+recent top1" in lines[1]
    assert [line.split()[0] for line in lines[2:5]] == ["pydoc", "license", "source"]
    assert [line.split()[0] for line in lines[5:9]] == ["min", "median", "max", "mean"]  # the command gates nothing
    assert lines[9].startswith("heavy hitters vs sink+recent (means): top1 ")
    data = json.loads(out.read_text())
    top1 = [text["h2o"]["top1"] for text in data["texts"]]
    assert data["aggregate"]["h2o"]["top1"]["mean"] == pytest.approx(np.mean(top1))
    assert all(text["tokens"] == [48, 16] and text["sink_recent"]["held"] > 1.5 for text in data["texts"])
    assert len({tuple(np.round([t["full"]["ppl"]], 6)) for t in data["texts"]}) == 3  # three different texts


def test_fidelity_command_takes_texts_and_has_no_sink_recent_without_h2o(tiny, tmp_path, capsys):
    model, config = tiny
    config.write_text(json.dumps({"kv_h2o_enable": False}))
    own = tmp_path / "own.txt"
    own.write_text("any text: the tiny model has no tokenizer and reads random ids", encoding="utf-8")
    assert main(["fidelity", "-m", str(model), "-c", str(config), "-p", "16", "-n", "4", "--texts", "docs",
                 str(own)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "[WARN] nothing was evicted" in captured.err  # a run that evicts nothing must not read as perfect
    assert "sink+recent" not in "\n".join(lines)
    assert [line.split()[0] for line in lines[2:4]] == ["docs", "own.txt"]
    assert lines[2].split()[3:5] == ["1.00x", "1.000"]  # the full cache agrees with itself


def test_fidelity_command_usage_errors(tiny, tmp_path, capsys):
    model, config = tiny
    with pytest.raises(SystemExit) as info:
        main(["fidelity", "-m", str(model), "-c", str(config), "--texts", "nope"])
    assert info.value.code == 2 and "text nope: not a suite text (pydoc, license, source, docs)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["fidelity", "-m", str(model), "-c", str(config), "-p", "5000000"])
    assert info.value.code == 2 and "-p/-n: 5000000 prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["fidelity", "-m", str(model)])
    assert info.value.code == 2 and "-c/--config" in capsys.readouterr().err


def test_target_fidelity_preset_gates_fidelity_and_the_v4_presets_do_not():
    fidelity = load_preset(find_preset("target_fidelity.json"))
    assert preset_settings(fidelity) == {"h2o_min_top1": 0.86, "h2o_max_ppl_delta": 0.075, "h2o_fidelity_texts": 3}
    [point] = expand(fidelity)
    assert point.config["kv_h2o_block_tokens"] == 1 and point.config["kv_h2o_target_mode"] == "adaptive"
    assert point.config["kv_h2o_per_head"] is True
    assert point.config["kv_h2o_layer_start"] == 2 and point.config["kv_h2o_target_lossy_ratio"] >= 3.0
    compare = load_preset(find_preset("compare_presses.json"))  # the hf runtime's comparison, one text
    assert preset_settings(compare) == {"h2o_min_top1": 0.86, "h2o_max_ppl_delta": 0.075, "h2o_fidelity_texts": 1}
    for name in available_presets():
        if name not in ("target_fidelity.json", "compare_presses.json"):
            assert preset_settings(load_preset(find_preset(name))) == {}, name
    with pytest.raises(PresetError, match="fidelity_texts"):
        expand({**fidelity, "fidelity_texts": 9})
