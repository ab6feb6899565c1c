"""Expanding preset matrices (the original v4 files) into runtime configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from h2o_presets.matrix import PresetError, available_presets, expand, find_preset, load_preset

PRESETS = Path(__file__).resolve().parents[1] / "presets"


def test_joint_scope_v4_expands_to_its_four_points():
    points = expand(load_preset(PRESETS / "target_joint_scope_v4.json"))
    assert [p.run_id for p in points] == [
        "run_0001_p512_g128_k0.3_b32_lr3.0", "run_0002_p512_g128_k0.3_b32_lr3.2",
        "run_0003_p512_g128_k0.33_b32_lr3.0", "run_0004_p512_g128_k0.33_b32_lr3.2"]
    first = points[0]
    assert (first.prompt_tokens, first.gen_tokens, first.repeat) == (512, 128, 3)
    c = first.config
    assert c["kv_h2o_enable"] is True and c["kv_h2o_target_keep_ratio"] == 0.3
    assert (c["kv_h2o_block_tokens"], c["kv_h2o_sink_tokens"], c["kv_h2o_recent_tokens"]) == (32, 16, 96)
    assert (c["kv_h2o_layer_start"], c["kv_h2o_layer_end"], c["kv_h2o_target_mode"]) == (2, -1, "adaptive")
    assert (c["kv_h2o_update_interval"], c["kv_h2o_trigger_min_tokens"], c["kv_h2o_ema_alpha"]) == (16, 384, 0.9)
    assert c["kv_lossless_scope"] == "front_n_and_h2o_kept" and c["kv_lossless_runtime_mode"] == "full"
    assert c["kv_lossless_block_tokens"] == 128 and c["kv_h2o_target_lossy_ratio"] == 3.0


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_expands(name):
    points = expand(load_preset(PRESETS / name), name)
    assert points and len({p.run_id for p in points}) == len(points)
    assert all(key.startswith("kv_") for p in points for key in p.config)


def test_list_valued_kv_keys_become_dimensions():
    points = expand({"h2o_keep_ratios": [0.3], "kv_lossless_runtime_mode": ["probe", "full", "store"]})
    assert [p.config["kv_lossless_runtime_mode"] for p in points] == ["probe", "full", "store"]


@pytest.mark.parametrize("preset, message", [
    ({"prompts": []}, r"Empty sweep dimension\(s\): prompts\. Check argument values — 0 runs would be produced\."),
    ({"kv_lossless_block_tokens": []}, "Empty sweep dimension"),
    ({"gens": 128}, "key 'gens': 128 is not of type 'array'"),
    ({"repeat": 0}, "key 'repeat': 0 is less than the minimum of 1"),
    ({"repeat": 3, "h2o_keep_ratio": [0.3]}, "unknown key.*'h2o_keep_ratio'"),
    ({"h2o_target_mode": "fast"}, "key 'h2o_target_mode': 'fast' is not one of"),
    ({"kv_lossless_scope": {"a": 1}}, "key 'kv_lossless_scope': expected a scalar or a non-empty list"),
])
def test_bad_presets_are_rejected_before_anything_runs(preset, message):
    with pytest.raises(PresetError, match=message):
        expand(preset, "p.json")


def test_unreadable_preset_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(PresetError, match="bad.json: not valid JSON"):
        load_preset(bad)
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(PresetError, match="expected a JSON object"):
        load_preset(bad)


def test_points_are_labelled_by_the_dimensions_that_vary():
    points = expand(load_preset(PRESETS / "target_ratio_v4.json"))
    assert points[0].label == "keep0.28-b8-lr3.0"
    assert [p.label for p in expand(load_preset(PRESETS / "target_joint_scope_v4.json"))] == [
        "keep0.30-lr3.0", "keep0.30-lr3.2", "keep0.33-lr3.0", "keep0.33-lr3.2"]
    assert expand({"h2o_keep_ratios": [0.125]})[0].label == "keep0.125-lr3.0"


def test_a_bare_name_finds_the_bundled_preset(tmp_path):
    assert find_preset("target_joint_scope_v4.json") == PRESETS.resolve() / "target_joint_scope_v4.json"
    assert find_preset("target_joint_scope_v4").name == "target_joint_scope_v4.json"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert find_preset(own) == own
    with pytest.raises(PresetError, match="nope.json: no such preset file.*target_joint_scope_v4.json"):
        find_preset("nope.json")
    assert "preset.schema.json" not in available_presets()


@pytest.mark.parametrize("preset, message", [
    ({"h2o_keep_ratios": [0.35, 0.35]},
     "bad.json: key 'h2o_keep_ratios' lists 0.35 twice: each point needs its own value"),
    ({"h2o_keep_ratios": [0.3, 0.30]}, "key 'h2o_keep_ratios' lists 0.3 twice"),
    ({"prompts": [256, 512, 256, 256]}, "key 'prompts' lists 256 3 times"),
    ({"h2o_target_lossy_ratios": [3, 3.0]}, "key 'h2o_target_lossy_ratios' lists 3 twice"),
    ({"kv_lossless_runtime_mode": ["probe", "full", "probe"]}, "key 'kv_lossless_runtime_mode' lists \"probe\" twice"),
])
def test_a_dimension_listing_a_value_twice_is_rejected(preset, message):
    with pytest.raises(PresetError, match=re.escape(message)):
        expand(preset, "bad.json")


def test_distinct_values_with_the_same_label_text_get_distinct_labels():
    points = expand({"kv_lossless_x": [True, "true", 1, "1", 2], "extra_kv_keys": ["kv_lossless_x"]}, "p.json")
    assert [p.label for p in points] == [
        "keep0.50-lr3.0-lossless_xtrue", 'keep0.50-lr3.0-lossless_x"true"', "keep0.50-lr3.0-lossless_x1",
        'keep0.50-lr3.0-lossless_x"1"', "keep0.50-lr3.0-lossless_x2"]  # only the colliding ones quoted
    assert [p.config["kv_lossless_x"] for p in points] == [True, "true", 1, "1", 2]
    across = expand({"kv_lossless_a": ["x", "x-lossless_by"], "kv_lossless_b": ["y-lossless_by", "y"],
                     "extra_kv_keys": ["kv_lossless_a", "kv_lossless_b"]})
    assert len({p.label for p in across}) == 4  # "-" inside a value no longer merges two points
    close = expand({"h2o_keep_ratios": [0.35, 0.351, 0.3500001]})
    assert [p.label for p in close] == ["keep0.35-lr3.0", "keep0.351-lr3.0", "keep0.3500001-lr3.0"]


def test_labels_that_cannot_be_told_apart_name_both_points():
    with pytest.raises(PresetError, match="key 'kv_lossless_x' lists NaN twice"):
        # JSON's NaN is one object: a repeat
        expand(json.loads('{"kv_lossless_x": [NaN, NaN], "extra_kv_keys": ["kv_lossless_x"]}'))
    two_nans = [float("nan"), float("nan")]  # distinct objects, and NaN != NaN: no repeat, but both print "nan"
    with pytest.raises(PresetError, match="p.json: points run_0001_.* and run_0002_.* both get the label "
                                          "'keep0.50-lr3.0-lossless_xnan'"):
        expand({"kv_lossless_x": two_nans, "extra_kv_keys": ["kv_lossless_x"]}, "p.json")


def test_float_dimensions_are_floats_as_the_original_parsed_them():
    """run_h2o_v4_bench.py parses keep, EMA and lossy targets with float(): ``k1.0``/``lr3.0`` in run ids."""
    point = expand({"h2o_keep_ratios": [1], "h2o_ema_alphas": [0], "h2o_target_lossy_ratios": [3]})[0]
    assert point.run_id == "run_0001_p512_g128_k1.0_b64_lr3.0"
    c = point.config
    assert [type(c[k]) for k in ("kv_h2o_target_keep_ratio", "kv_h2o_ema_alpha", "kv_h2o_target_lossy_ratio")] == [
        float, float, float]


def test_generated_config_fills_every_original_key_in_its_order():
    from h2o_kernels.eviction.h2o import H2OConfig
    from h2o_kernels.lossless.manager import LosslessConfig
    from h2o_presets.matrix import GENERATED_KV_DEFAULTS, generated_config

    runtime_defaults = {**{k: key.default for k, key in H2OConfig.keys().items()},
                        **{k: key.default for k, key in LosslessConfig.keys().items()}}
    assert {k: v for k, v in GENERATED_KV_DEFAULTS.items() if k != "kv_h2o_enable"} == {
        k: runtime_defaults[k] for k in GENERATED_KV_DEFAULTS if k != "kv_h2o_enable"}
    config = generated_config({"kv_lossless_front_n": 4, "kv_h2o_prefill_scoring": False})
    assert list(config) == [*GENERATED_KV_DEFAULTS, "kv_h2o_prefill_scoring"]
    assert config["kv_lossless_front_n"] == 4 and config["kv_lossless_codec"] == "none"


def test_variants_lay_named_configurations_over_every_point():
    preset = {"prompts": [64], "gens": [8], "h2o_keep_ratios": [0.3], "h2o_recent_tokens": [8, 16],
              "variants": {"h2o": {}, "snap": {"kv_h2o_enable": False, "kv_press": "snapkv",
                                               "kv_press_compression_ratio": 0.6}}}
    points = expand(preset)
    assert [p.label for p in points] == ["h2o-recent8", "h2o-recent16", "snap-recent8", "snap-recent16"]
    assert len({p.run_id for p in points}) == 4 and points[2].run_id.endswith("_snap")
    assert points[0].config["kv_h2o_enable"] is True and "kv_press" not in points[0].config
    assert points[3].config["kv_press"] == "snapkv" and points[3].config["kv_h2o_enable"] is False
    assert points[3].config["kv_h2o_recent_tokens"] == 16
    labels = [p.label for p in expand(load_preset(PRESETS / "compare_presses.json"))]
    assert labels == ["h2o", "h2o_per_head", "expected_attention", "observed_attention", "snapkv", "streaming_llm"]


@pytest.mark.parametrize("variants, message", [
    ({"x": {"kv_press_ratio": 0.5}}, "variant 'x': unknown config key 'kv_press_ratio'"),
    ({"x": {"prompts": [64]}}, "variants.x: unknown key(s) 'prompts': a variant holds kv_* config keys only"),
    ({"x": {"kv_press": ["snapkv"]}}, "key 'variants.x.kv_press': ['snapkv'] is not of type"),
    ({}, "key 'variants': {} should be non-empty"),
])
def test_a_bad_variant_is_named(variants, message):
    with pytest.raises(PresetError, match=re.escape(message)):
        expand({"prompts": [64], "gens": [8], "variants": variants})
