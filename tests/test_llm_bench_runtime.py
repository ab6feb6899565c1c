"""The llm-bench runtime: the external llm_bench binary behind the runtime interface (a fake binary written
by each test), and the gate measuring it in paired rounds like an in-process runtime."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

from h2o_kernels.config_keys import ConfigError
from h2o_kernels.runtimes.base import RunFailedError, run_tokens
from h2o_kernels.runtimes.llm_bench import LlmBenchRuntime, llm_bench_command
from h2o_kernels.runtimes.registry import open_runtime
from h2o_presets.matrix import Point
from pytest_h2o import gate_run
from pytest_h2o.gate_run import RunSpec

# Writes one table row for -p/-n (decode 10 tok/s, 9 with H2O on), records its argv in calls.jsonl beside
# itself; fake_crash in the config: print to stdout and stderr and exit with that status; fake_no_table: exit 0
# without a table; FAKE_BASELINE_FAILS_AFTER=n: every baseline call after the n-th crashes.
FAKE = """#!{python}
import json, os, sys
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
config = json.load(open(opts["-m"]))
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
fail_after = int(os.environ.get("FAKE_BASELINE_FAILS_AFTER", "0"))
if fail_after and os.path.basename(opts["-m"]).startswith("baseline"):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.jsonl")) as f:
        if sum(os.path.basename(json.loads(line)[1]).startswith("baseline") for line in f) > fail_after:
            config["fake_crash"] = 9
if config.get("fake_crash"):
    print("loading " + config.get("llm_model", "?"), flush=True)
    for i in range(8):
        print("step %d" % i, flush=True)
    print("Segmentation fault (core dumped)", file=sys.stderr, flush=True)
    sys.exit(config["fake_crash"])
if config.get("fake_no_table"):
    print("no -kv support in this build")
    sys.exit(0)
h2o = config.get("kv_h2o_enable", False)
keep = config.get("kv_h2o_target_keep_ratio", 1.0) if h2o else 1.0
with open(opts["-fp"], "w") as f:
    f.write("| model | modelSize | llm_demo | speed(tok/s) | h2o_keep | h2o_lossy | h2o_lossless_queue_peak |\\n")
    f.write("| --- | --: | --- | --- | --: | --: | --: |\\n")
    f.write("| fake | 1.00 MiB | prompt=%s<br>decode=%s | 100.00 ± 1.00<br>%.2f ± 0.10 | %.4f ± 0.0000 | "
            "%.3f ± 0.000 | 3.00 ± 0.00 |\\n" % (opts["-p"], opts["-n"], 9.0 if h2o else 10.0, keep, 1 / keep))
"""


@pytest.fixture
def binary(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "llm_bench"
    path.parent.mkdir()
    path.write_text(FAKE.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    model = tmp_path / "llama2_mnn"
    model.mkdir()
    (model / "llm.mnn").write_bytes(b"m" * 100)
    (model / "llm.mnn.weight").write_bytes(b"w" * 1000)
    path = model / "config.json"
    path.write_text(json.dumps({"llm_model": "llm.mnn", "base_dir": "."}))
    return path


def calls(binary: Path) -> list[list[str]]:
    return [json.loads(line) for line in (binary.parent / "calls.jsonl").read_text().splitlines()]


def runtime(binary: Path, base: Path, work: Path, **kwargs) -> LlmBenchRuntime:
    return LlmBenchRuntime(str(binary), base, work, **kwargs)


def test_a_run_calls_the_binary_once_and_returns_its_row(binary, base, tmp_path):
    rt = runtime(binary, base, tmp_path / "work", threads=4)
    assert (rt.kind, rt.has_logits, rt.has_dumps) == ("llm-bench", False, False)
    assert rt.model.name == "llama2_mnn" and rt.model.size_bytes == 1100 and rt.model.config is None
    prompt, continuation = run_tokens(rt, 64, 32, None)
    assert (prompt == 16).all() and len(prompt) == 64 and len(continuation) == 32  # what llm_bench feeds
    result = rt.configure({"kv_h2o_enable": True, "kv_h2o_target_keep_ratio": 0.5}, "half").run(
        prompt, continuation, run_id="run_0001")
    assert (result.prefill_tok_s, result.decode_tok_s) == (100.0, 9.0)
    assert result.metrics == {"h2o_keep": 0.5, "h2o_lossy": 2.0, "h2o_lossless_queue_peak": 3.0}
    assert result.logits is None and result.held_kv_bytes == []
    work = tmp_path / "work"
    config = work / "configs" / "run_0001.json"
    log = work / "llm_bench" / "run_0001.run1.log"
    # the original's arguments, one measured run per call
    assert calls(binary) == [llm_bench_command(str(binary), 4, 64, 32, 1, config, log)[1:]]
    written = json.loads(config.read_text())
    assert written["kv_h2o_target_keep_ratio"] == 0.5 and written["kv_lossless_enable"] is False  # generated keys
    assert written["base_dir"] == str(base.parent) + "/" and written["llm_model"] == "llm.mnn"
    rt.configure({}, "again").run(prompt, continuation, run_id="run_0001")
    assert (work / "llm_bench" / "run_0001.run2.log").is_file() and log.is_file()  # each call keeps its files


def test_a_crash_names_the_run_the_status_and_the_end_of_the_binarys_output(binary, base, tmp_path):
    rt = runtime(binary, base, tmp_path / "work")
    ids = np.full(8, 16)
    with pytest.raises(RunFailedError) as caught:
        rt.configure({"fake_crash": 7}, "crash").run(ids, ids, run_id="run_0002")
    message = str(caught.value)
    out = tmp_path / "work" / "llm_bench" / "run_0002.run1.stdout"
    assert message == ('llm_bench run run_0002 exited with status 7; its output ends: "step 4 | step 5 | step 6 | '
                       f'step 7 | Segmentation fault (core dumped)" (output: {out})')
    assert "Segmentation fault" in out.read_text() and "loading llm.mnn" in out.read_text()


@pytest.fixture
def crash_config(base: Path) -> Path:
    config = json.loads(base.read_text())
    base.write_text(json.dumps({**config, "fake_crash": 7}))
    return base


def test_a_crash_in_the_base_config_fails_every_run(binary, crash_config, tmp_path):
    rt = runtime(binary, crash_config, tmp_path / "work")
    with pytest.raises(RunFailedError, match=r"^llm_bench run baseline exited with status 7; its output ends: "):
        rt.configure({}).run(np.full(8, 16), np.full(4, 16), run_id="baseline")


def test_a_run_without_a_table_row_names_the_log(binary, base, tmp_path):
    rt = runtime(binary, base, tmp_path / "work")
    with pytest.raises(RunFailedError) as caught:
        rt.configure({"fake_no_table": True}).run(np.full(8, 16), np.full(4, 16), run_id="r")
    assert str(caught.value).startswith(f"llm_bench run r wrote no table row to {tmp_path / 'work' / 'llm_bench'}")
    assert 'its output ends: "no -kv support in this build"' in str(caught.value)


def test_what_an_external_binary_cannot_do_is_refused(binary, base, tmp_path):
    run = runtime(binary, base, tmp_path / "work").configure({}, "cfg")
    ids = np.full(8, 16)
    with pytest.raises(ValueError, match="cfg: step_delay_s 0.01: the llm-bench runtime cannot slow its decode steps"):
        run.run(ids, ids, step_delay_s=0.01)
    with pytest.raises(ValueError, match="keeps no logits"):
        run.run(ids, ids, keep_logits=True)
    with pytest.raises(ValueError, match="writes no KV dumps"):
        run.run(ids, ids, dump_dir=tmp_path / "kv")
    assert not (binary.parent / "calls.jsonl").exists()  # refused before calling it


def test_a_bad_config_key_is_refused_before_any_call(binary, base, tmp_path):
    with pytest.raises(ConfigError, match="cfg"):
        runtime(binary, base, tmp_path / "work").configure({"kv_h2o_keep_ratio": 0.3}, "cfg")


def test_open_runtime_opens_it_with_its_own_parameters(binary, base, tmp_path):
    rt = open_runtime("llm-bench", threads=None, binary=str(binary), base_config=base, work_dir=tmp_path / "w")
    assert isinstance(rt, LlmBenchRuntime) and rt.threads == 4  # the original's -t
    with pytest.raises(ValueError, match="not found or not executable"):
        open_runtime("llm-bench", binary=str(tmp_path / "missing"), work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="needs the llm_bench binary"):
        open_runtime("llm-bench", work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match="cuda"):
        open_runtime("llm-bench", device="cuda", binary=str(binary), work_dir=tmp_path / "w")
    with pytest.raises(ValueError, match=r"'llm_bench': expected one of reference, hf, llm-bench"):
        open_runtime("llm_bench")


def points(*labels: str) -> list[Point]:
    return [Point(f"run_{i:04d}", 8, 4, 2, {"kv_h2o_enable": True, "kv_h2o_target_keep_ratio": 0.5}, label)
            for i, label in enumerate(labels, start=1)]


def test_the_gate_measures_it_in_paired_rounds(binary, base, tmp_path):
    spec = RunSpec("llm-bench", tmp_path / "out", threads=2, llm_bench=str(binary), base_config=base, rounds=2,
                   max_rounds=2)
    results = gate_run.measure(points("a", "b", "c"), spec, lambda line: None)
    order = [Path(args[1]).stem for args in calls(binary)]
    assert order == ["baseline_p8_g4_warmup", "baseline_p8_g4", "run_0001", "run_0002", "baseline_p8_g4", "run_0003",
                     "baseline_p8_g4", "run_0002", "run_0003", "baseline_p8_g4", "run_0001", "baseline_p8_g4"]
    assert results["runtime"] == "llm-bench" and results["model"] == "llama2_mnn"
    row = results["configs"]["a"]
    assert row["decode_tps_rounds"] == [9.0, 9.0] and row["decode_log_ratios"] == pytest.approx([np.log(0.9)] * 2)
    assert row["baseline_decode_tps"] == 10.0 and row["h2o_lossy"] == 2.0
    assert "kv_dir" not in row and "held_kv_bytes" not in row and "h2o_fidelity_top1" not in row  # it has none
    assert row["lossless_online_source"] == "runtime"
    log = json.loads((tmp_path / "out" / "logs" / "run_0001.json").read_text())  # the twin --h2o-logs re-gates
    assert log["decode_log_ratios"] == row["decode_log_ratios"] and log["text"] == "synthetic"
    assert (tmp_path / "out" / "logs" / "baseline_p8_g4.log").is_file()


def test_a_failing_configuration_fails_alone_and_a_failing_baseline_fails_them_all(binary, base, tmp_path):
    pts = points("a", "b")
    pts[1] = Point(pts[1].run_id, 8, 4, 2, {"fake_crash": 5}, "b", ("fake_crash",))
    spec = RunSpec("llm-bench", tmp_path / "one", llm_bench=str(binary), base_config=base, rounds=2, max_rounds=2)
    configs = gate_run.measure(pts, spec, lambda line: None)["configs"]
    assert configs["b"]["error"].startswith("llm_bench run run_0002 exited with status 5")
    assert configs["a"]["decode_tps_rounds"] == [9.0, 9.0]
    base.write_text(json.dumps({"llm_model": "llm.mnn", "base_dir": ".", "fake_crash": 6}))
    spec = RunSpec("llm-bench", tmp_path / "all", llm_bench=str(binary), base_config=base)
    configs = gate_run.measure(points("a", "b"), spec, lambda line: None)["configs"]
    assert all(c["error"].startswith("the baseline run failed: llm_bench run baseline_p8_g4_warmup exited with "
                                     "status 6") for c in configs.values())


def test_a_baseline_failing_after_the_warm_up_fails_the_configurations_still_measured(binary, base, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setenv("FAKE_BASELINE_FAILS_AFTER", "2")  # the warm-up and round 1's first baseline run
    spec = RunSpec("llm-bench", tmp_path / "out", llm_bench=str(binary), base_config=base, rounds=2)
    configs = gate_run.measure(points("a", "b"), spec, lambda line: None)["configs"]
    assert [Path(args[1]).stem for args in calls(binary)] == ["baseline_p8_g4_warmup", "baseline_p8_g4", "run_0001",
                                                               "run_0002", "baseline_p8_g4"]
    assert all(c["error"].startswith("the baseline run failed: llm_bench run baseline_p8_g4 exited with status 9")
               for c in configs.values())
