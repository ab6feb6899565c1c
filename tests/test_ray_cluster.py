"""``--h2o-cluster``: the gate's configurations measured by Ray workers (a local instance, ``local:N``), each
against its own baseline runs, with the same machine-independent numbers as one machine and a worker's
death handled (retried once elsewhere, or failed naming the worker). A tiny random-weight model keeps
every run to seconds; the Ray runs go through a subprocess so that each starts and stops its own instance."""

from __future__ import annotations

import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from h2o_test_helpers import make_gate_dir
from test_plugin_gate import CONFIGS, EASY, PRESET, TINY

import pytest_h2o.session  # noqa: F401  - imported once here: in-process runs cannot import numpy a second time

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='ray is not installed (pip install "pytest-h2o[ray]"; the dev extra has it)')
# what a configuration's numbers are whatever machine measured them
MACHINE_INDEPENDENT = ("h2o_lossy", "h2o_lossy_model", "h2o_keep", "lossless_online", "lossless_scope",
                       "per_layer_lossless", "total_ratio", "held_kv_bytes", "full_kv_bytes", "h2o_fidelity_top1",
                       "h2o_fidelity_ppl_delta", "h2o_fidelity_kl", "codec_profile", "run_id")
MACHINE_INFO = {"node", "processor", "machine", "python_implementation", "python_version", "release", "system", "cpu"}
TIMEOUT_S = 240  # a run that hangs fails the test instead of the suite


@pytest.fixture
def gate_dir(pytester: pytest.Pytester) -> Path:
    return make_gate_dir(pytester, TINY, PRESET)


def gate(pytester: pytest.Pytester, out: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--h2o-preset=tiny.json", f"--h2o-out={out}", *EASY, *args,
                                         timeout=TIMEOUT_S)


def summary(gate_dir: Path, out: str) -> dict:
    return json.loads((gate_dir / out / "summary.json").read_text())


def test_a_bad_cluster_value_is_a_usage_error_naming_the_forms(pytester, gate_dir, monkeypatch):
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-cluster=local:0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--h2o-cluster='local:0': expected ray://HOST:PORT * or local:N *"])
    monkeypatch.setenv("H2O_CLUSTER", "10.0.0.1:6379")
    result = pytester.runpytest("--h2o-preset=tiny.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*$H2O_CLUSTER='10.0.0.1:6379': expected ray://HOST:PORT * or local:N *"])


def test_without_ray_installed_the_option_says_what_to_install(pytester, gate_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # find_spec answers None, as without the package
    result = pytester.runpytest("--h2o-preset=tiny.json", "--h2o-cluster=local:2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(['*--h2o-cluster local:2 needs Ray: pip install "pytest-h2o[[]ray[]]"*'])
    assert not (gate_dir / ".h2o" / "runs").exists()


def test_a_gate_without_the_option_never_imports_ray(pytester, gate_dir):
    pytester.makeconftest("import sys\n\ndef pytest_unconfigure(config):\n"
                          "    open('modules.txt', 'w').write(' '.join(sorted(sys.modules)))\n")
    result = gate(pytester, "out")
    result.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    modules = (gate_dir / "modules.txt").read_text().split()
    assert "pytest_h2o.gate_run" in modules and "ray" not in modules and "pytest_h2o.cluster" not in modules
    assert summary(gate_dir, "out")["nodes"][0]["worker"] == "local"
    assert "## Nodes" not in (gate_dir / "out" / "summary.md").read_text()


@needs_ray
def test_two_workers_give_the_single_machine_numbers_and_say_who_measured_what(pytester, gate_dir):
    single = gate(pytester, "single", "--h2o-history=off")
    single.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    ray = gate(pytester, "ray", "--h2o-cluster=local:2", "--junitxml=report.xml")
    ray.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    ray.stdout.fnmatch_lines(["*Ray *: worker 1 on node *", "*Ray *: worker 2 on node *"])
    ray.stdout.fnmatch_lines(["*node * worker ?: keep0.30-lr3.0 done (? rounds)"])
    ray.stdout.fnmatch_lines(["*node * worker ?: keep0.50-lr3.0 done (? rounds)"])
    one, two = ({c["name"]: c["metrics"] for c in summary(gate_dir, out)["configs"]} for out in ("single", "ray"))
    assert set(one) == set(two) == set(CONFIGS)
    for label in CONFIGS:
        for key in MACHINE_INDEPENDENT:
            assert key in one[label] and two[label][key] == one[label][key], (label, key)
    report = summary(gate_dir, "ray")
    assert report["cluster"] == "local:2"
    nodes = report["nodes"]
    assert [n["worker"] for n in nodes] == [1, 2]
    assert sorted(label for n in nodes for label in n["configs"]) == sorted(CONFIGS)
    for n in nodes:  # each worker's own baseline, and every drop of its configurations against it
        assert set(n["machine_info"]) == MACHINE_INFO and set(n["machine_info"]["cpu"]) == {"brand", "count"}
        assert list(n["baselines"]) == ["p64_g32"] and n["baselines"]["p64_g32"] > 0
        for label in n["configs"]:
            assert two[label]["baseline_decode_tps"] == n["baselines"]["p64_g32"]
            assert two[label]["measured_by"].startswith(f"worker {n['worker']} on node ")
        assert Path(n["out_dir"]).parent == gate_dir / "ray" / "workers"
        assert (Path(n["out_dir"]) / "logs" / "baseline_p64_g32.log").is_file()
    assert nodes[0]["baselines"] != nodes[1]["baselines"]  # measured apart: two sets of runs
    md = (gate_dir / "ray" / "summary.md").read_text()
    assert "## Nodes" in md and "- worker 1 on node " in md and "- worker 2 on node " in md
    suite = ET.parse(gate_dir / "report.xml").getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["h2o_cluster"] == "local:2" and props["h2o_node.2"].startswith("worker 2 on node ")
    assert props["keep0.30-lr3.0.measured_by"] == two["keep0.30-lr3.0"]["measured_by"]
    (record,) = (json.loads(p.read_text()) for p in (gate_dir / ".h2o" / "history").glob("*.json"))
    assert record["nodes"] == nodes and record["meta"]["cluster"] == "local:2"


@needs_ray
def test_a_worker_that_dies_mid_run_has_its_configurations_measured_again_on_another(pytester, gate_dir, monkeypatch):
    monkeypatch.setenv("H2O_CLUSTER_FAULT_RUN", "2")  # worker 1's process exits after its second run
    result = gate(pytester, "out", "--h2o-cluster=local:2")
    result.assert_outcomes(passed=2 * 4 + 1, skipped=2 * 3)
    result.stdout.fnmatch_lines(["*worker 1 on node * died (*): its 1 configuration (keep0.30-lr3.0) run again on "
                                 "worker 2, baseline measured again there"])
    report = summary(gate_dir, "out")
    metrics = {c["name"]: c["metrics"] for c in report["configs"]}
    assert all("error" not in m and m["decode_tps"] > 0 for m in metrics.values())
    retried = [n for n in report["nodes"] if n.get("note")]
    assert [n["worker"] for n in report["nodes"]] == [2, 2] and [n["configs"] for n in retried] == [["keep0.30-lr3.0"]]
    assert retried[0]["note"].startswith("retried on worker 2 after worker 1 on node ")
    assert metrics["keep0.30-lr3.0"]["baseline_decode_tps"] == retried[0]["baselines"]["p64_g32"]
    assert metrics["keep0.30-lr3.0"]["measured_by"].startswith("worker 2 on node ")


@needs_ray
def test_a_worker_that_dies_with_no_other_left_fails_its_configurations_naming_it(pytester, gate_dir, monkeypatch):
    monkeypatch.setenv("H2O_CLUSTER_FAULT_RUN", "3")
    result = gate(pytester, "out", "--h2o-cluster=local:1", "-rf")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*2 configurations not measured: worker 1 on node * died (*); no other worker left "
                                 "to retry on"])
    report = summary(gate_dir, "out")
    for c in report["configs"]:  # no number a dead worker measured is reported
        assert c["metrics"]["error"].startswith("worker 1 on node ") and "decode_tps" not in c["metrics"]
        assert "h2o_lossy" not in c["metrics"]
    (node,) = report["nodes"]
    assert node["error"] == report["configs"][0]["metrics"]["error"] and node["baselines"] == {}
