"""``h2o-gate sweep`` over a preset: the external llm_bench path (with a fake llm_bench written for
the tests), dry runs, and bad presets rejected before anything runs."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from pytest_h2o.cli.main import main

FAKE_LLM_BENCH = """#!{python}
import json, sys
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
config = json.load(open(opts["-m"]))
with open(opts["-fp"] + ".args.json", "w") as f:
    json.dump({{"argv": args, "config": config}}, f)
with open(opts["-fp"], "w") as f:
    f.write("| model | llm_demo | speed(tok/s) | h2o_keep |\\n| --- | --- | --- | ---: |\\n")
    f.write("| fake | prompt=%s<br>decode=%s | 100.00 ± 1.00<br>10.00 ± 0.10 | %.4f ± 0.0000 |\\n"
            % (opts["-p"], opts["-n"], config["kv_h2o_target_keep_ratio"]))
sys.exit(int(config.get("fake_exit", 0)))
"""


TINY_MODEL = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}


@pytest.fixture
def fake_llm_bench(tmp_path: Path) -> Path:
    path = tmp_path / "llm_bench"
    path.write_text(FAKE_LLM_BENCH.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_external_llm_bench_runs_every_point_with_the_original_arguments(tmp_path, fake_llm_bench):
    preset = write(tmp_path / "p.json", {"prompts": [64], "gens": [8], "repeat": 2, "h2o_keep_ratios": [0.3, 0.5],
                                         "kv_lossless_runtime_mode": "full"})
    (tmp_path / "model").mkdir()
    base = write(tmp_path / "model" / "config.json", {"llm_model": "llm.mnn", "base_dir": "."})
    out = tmp_path / "out"
    rc = main(["sweep", "--preset", str(preset), "--out-dir", str(out), "--llm-bench", str(fake_llm_bench),
               "--base-config", str(base), "--threads", "4"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["run_id"] for m in manifest] == ["run_0001_p64_g8_k0.3_b64_lr3.0", "run_0002_p64_g8_k0.5_b64_lr3.0"]
    assert all(m["return_code"] == 0 for m in manifest)
    seen = json.loads(Path(manifest[1]["log"] + ".args.json").read_text())
    assert seen["argv"] == ["-m", manifest[1]["config"], "-a", "cpu", "-t", "4", "-qatten", "0", "-kv", "true",
                            "-p", "64", "-n", "8", "-rep", "2", "-fp", manifest[1]["log"]]
    assert seen["config"]["kv_h2o_target_keep_ratio"] == 0.5 and seen["config"]["llm_model"] == "llm.mnn"
    assert seen["config"]["base_dir"] == os.fspath((tmp_path / "model").resolve()) + os.sep
    assert "0.5000" in Path(manifest[1]["log"]).read_text()


def test_a_failing_point_is_recorded_and_fails_the_sweep(tmp_path, fake_llm_bench, capsys):
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3]})
    base = write(tmp_path / "base.json", {"fake_exit": 3})
    rc = main(["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "--llm-bench",
               str(fake_llm_bench), "--base-config", str(base)])
    assert rc == 2
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())[0]["return_code"] == 3


def test_dry_run_writes_configs_and_manifest_only(tmp_path):
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3, 0.33], "h2o_target_lossy_ratios": [3.0, 3.2]})
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "--dry-run"]) == 0
    configs = sorted((tmp_path / "o" / "configs").glob("*.json"))
    assert len(configs) == 4 and not list((tmp_path / "o" / "logs").iterdir())


@pytest.mark.parametrize("preset", [{"prompts": []}, {"h2o_keep_ratios": []}, {"gens": 5}])
def test_empty_or_malformed_dimensions_are_usage_errors(tmp_path, preset, capsys):
    path = write(tmp_path / "p.json", preset)
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--preset", str(path), "--out-dir", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "p.json" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bundled_preset_names_work_as_in_the_plugin(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["sweep", "--preset", "target_joint_scope_v4.json", "--out-dir", str(out), "--dry-run"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == 4 and all(m["return_code"] is None for m in manifest)  # a dry run ran nothing
    assert "none run (--dry-run)" in capsys.readouterr().err
    assert main(["sweep", "--preset", "target_ratio", "--out-dir", str(tmp_path / "o2"), "--dry-run"]) == 0
    err = usage_error(capsys, ["sweep", "--preset", "target_ratio_v9.json", "--out-dir", str(tmp_path / "o3")])
    assert "--preset target_ratio_v9.json: no such preset file" in err and "target_joint_scope_v4.json" in err


@pytest.mark.parametrize("key,value,fragment", [
    ("kv_lossless_front_n", "2", "'kv_lossless_front_n' must be a JSON integer"),
    ("kv_h2o_enable", 1, "'kv_h2o_enable' must be a JSON bool"),
    ("kv_lossless_frnt_n", 2, "did you mean 'kv_lossless_front_n'"),
])
def test_dry_run_checks_every_kv_key(tmp_path, capsys, key, value, fragment):
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3, 0.5], key: value})
    err = usage_error(capsys, ["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "--dry-run"])
    assert f"--preset {preset}" in err and fragment in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["{blocker}", "{blocker}/sweep"])
def test_out_dir_is_checked_before_anything_runs(tmp_path, capsys, fake_llm_bench, out):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    out = out.format(blocker=blocker)
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3]})
    base = write(tmp_path / "base.json", {})
    err = usage_error(capsys, ["sweep", "--preset", str(preset), "--out-dir", out, "--llm-bench", str(fake_llm_bench),
                               "--base-config", str(base)])
    assert f"--out-dir {out}" in err and "not a folder" in err
    assert not list(tmp_path.glob("**/*.args.json"))


def test_a_missing_llm_bench_is_a_usage_error(tmp_path, capsys):
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3]})
    base = write(tmp_path / "base.json", {})
    err = usage_error(capsys, ["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "--llm-bench",
                               str(tmp_path / "no_llm_bench"), "--base-config", str(base)])
    assert f"--llm-bench {tmp_path / 'no_llm_bench'}: not found or not executable" in err
    assert not (tmp_path / "o").exists()
    # a dry run never calls it, as the original's sweep_h2o_v4.py --dry-run
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "d"), "--llm-bench",
                 str(tmp_path / "no_llm_bench"), "--base-config", str(base), "--dry-run"]) == 0


def test_points_too_large_for_memory_are_refused_before_the_first_run(tmp_path, capsys):
    model = write(tmp_path / "config.json", {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                             "rope_theta": 10000.0})
    preset = write(tmp_path / "p.json", {"prompts": [16, 5000000], "gens": [4], "repeat": 1,
                                         "h2o_keep_ratios": [0.5]})
    err = usage_error(capsys, ["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "-m", str(model)])
    assert f"--preset {preset}" in err and "5000000 prompt + 4 generated tokens" in err
    assert not (tmp_path / "o").exists()


def test_generated_configs_are_the_originals_byte_for_byte(tmp_path, fake_llm_bench):
    """run_h2o_v4_bench.py's config: base keys in place, every kv_* key (defaults filled), then the model files
    it fills in, each relative to base_dir (MNN reads base_dir + field); json indent 2, no final newline."""
    model = tmp_path / "model"
    model.mkdir()
    base = write(model / "config.json", {"llm_model": "llm.mnn", "llm_weight": str(model / "llm.mnn.weight"),
                                         "base_dir": ".", "backend_type": "cpu", "tokenizer_file": "tok/t.txt"})
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3], "h2o_block_tokens": [32], "h2o_log_stats": True,
                                         "kv_lossless_enable": True, "kv_lossless_codec": "gear_delta"})
    out = tmp_path / "out"
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(out), "--llm-bench", str(fake_llm_bench),
                 "--base-config", str(base), "--dry-run"]) == 0
    expected = {
        "llm_model": "llm.mnn", "llm_weight": "llm.mnn.weight", "base_dir": os.fspath(model.resolve()) + "/",
        "backend_type": "cpu", "tokenizer_file": "tok/t.txt",
        "kv_h2o_enable": True, "kv_h2o_layer_start": 2, "kv_h2o_layer_end": -1, "kv_h2o_block_tokens": 32,
        "kv_h2o_sink_tokens": 32, "kv_h2o_recent_tokens": 256, "kv_h2o_target_keep_ratio": 0.3,
        "kv_h2o_target_mode": "adaptive", "kv_h2o_target_lossy_ratio": 3.0, "kv_h2o_ema_alpha": 0.9,
        "kv_h2o_update_interval": 16, "kv_h2o_trigger_min_tokens": 512, "kv_h2o_log_stats": True,
        "kv_lossless_enable": True, "kv_lossless_scope": "front_n", "kv_lossless_front_n": 2,
        "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_enable": False, "kv_lossless_runtime_mode": "probe",
        "kv_lossless_block_tokens": 128, "kv_lossless_hot_recent_tokens": 256, "kv_lossless_hot_sink_tokens": 16,
        "kv_lossless_kept_sample_layers": 1, "kv_lossless_kept_sample_token_interval": 1,
        "kv_lossless_codec_runtime": "fp16_gear_predictive_v3",
        "kv_lossless_predictors_k": "raw,delta_seq,xor_seq,pair_delta",
        "kv_lossless_predictors_v": "raw,delta_seq,xor_seq",
        "kv_lossless_async_threads": 1, "kv_lossless_max_queue": 256, "kv_lossless_decode_cache_blocks": 64,
        "kv_lossless_strict_roundtrip_check": False,
        "llm_config": "llm_config.json", "embedding_file": "embeddings_bf16.bin", "context_file": "context.json",
    }
    text = (out / "configs" / "run_0001_p512_g128_k0.3_b32_lr3.0.json").read_text()
    assert text == json.dumps(expected, indent=2)


def test_the_manifest_has_the_originals_keys_and_ours_after(tmp_path, fake_llm_bench):
    preset = write(tmp_path / "p.json", {"h2o_keep_ratios": [0.3], "h2o_sink_tokens": [16],
                                         "kv_lossless_store_grouped_step_tokens": 64})
    base = write(tmp_path / "base.json", {})
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "--llm-bench",
                 str(fake_llm_bench), "--base-config", str(base)]) == 0
    entry = json.loads((tmp_path / "o" / "manifest.json").read_text())[0]
    assert list(entry)[:14] == ["run_id", "prompt_len", "gen_len", "keep_ratio", "block_tokens", "sink_tokens",
                                "recent_tokens", "ema_alpha", "update_interval", "trigger_min_tokens",
                                "h2o_layer_start", "h2o_layer_end", "h2o_target_mode", "h2o_target_lossy_ratio"]
    assert list(entry)[14:35] == [*(k for k in json.loads(Path(entry["config"]).read_text())
                                    if k.startswith("kv_lossless") and k != "kv_lossless_store_grouped_step_tokens"),
                                  "config", "log", "return_code"]
    assert (entry["keep_ratio"], entry["sink_tokens"], entry["h2o_target_lossy_ratio"]) == (0.3, 16, 3.0)
    assert entry["return_code"] == 0 and entry["repeat"] == 3  # ours: the repeat, the keys the original drops
    assert entry["kv_lossless_store_grouped_step_tokens"] == 64 and entry["kv_h2o_enable"] is True


@pytest.mark.parametrize("llm_bench, threads", [(True, "4"), (False, "1")])
def test_threads_default_to_the_originals_4_for_llm_bench_and_1_for_the_reference_runtime(
        tmp_path, fake_llm_bench, llm_bench, threads):
    preset = write(tmp_path / "p.json", {"prompts": [16], "gens": [2], "repeat": 1, "h2o_keep_ratios": [0.5]})
    out = tmp_path / "o"
    if llm_bench:
        base = write(tmp_path / "base.json", {})
        argv = ["--llm-bench", str(fake_llm_bench), "--base-config", str(base)]
    else:
        argv = ["-m", str(write(tmp_path / "config.json", {**TINY_MODEL, "num_hidden_layers": 2}))]
    assert main(["sweep", "--preset", str(preset), "--out-dir", str(out), *argv]) == 0
    log = json.loads((out / "manifest.json").read_text())[0]["log"]
    if llm_bench:
        argv = json.loads(Path(log + ".args.json").read_text())["argv"]
        assert argv[argv.index("-t") + 1] == threads
    else:
        assert json.loads(Path(log).with_suffix(".json").read_text())["threads"] == int(threads)
