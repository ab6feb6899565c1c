"""``h2o-gate sweep`` over a preset: the external llm_bench path (with a fake llm_bench written for
the tests), dry runs, and bad presets rejected before anything runs."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from pytest_h2o.cli import main

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


def test_points_too_large_for_memory_are_refused_before_the_first_run(tmp_path, capsys):
    model = write(tmp_path / "config.json", {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
                                             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                             "rope_theta": 10000.0})
    preset = write(tmp_path / "p.json", {"prompts": [16, 5000000], "gens": [4], "repeat": 1,
                                         "h2o_keep_ratios": [0.5]})
    err = usage_error(capsys, ["sweep", "--preset", str(preset), "--out-dir", str(tmp_path / "o"), "-m", str(model)])
    assert f"--preset {preset}" in err and "5000000 prompt + 4 generated tokens" in err
    assert not (tmp_path / "o").exists()
