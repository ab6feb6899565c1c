"""The gate's measurement: paired rounds with bracketing baselines, adaptive rounds, the injected
slowdown, the whole-cache ratio and the decode verdict's three states in every report."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
from h2o_test_helpers import write_standard_dump

from h2o_gates.gate_report import build_report, render_markdown, write_reports
from h2o_gates.rules import Thresholds
from h2o_kernels.model.llama import LlamaModel
from h2o_kernels.runtimes.base import ModelInfo, RunResult
from h2o_kernels.runtimes.reference import ReferenceRun
from h2o_presets.matrix import Point
from pytest_h2o import gate_run
from pytest_h2o.gate_run import RunSpec, whole_cache_ratio
from pytest_h2o.summary import junit_properties, plain_text, terminal_lines, threshold_text

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}


class FakeRuntime:
    """Scripted decode speeds: each candidate's speed is ``factor x`` the baseline's; ``wobble``
    alternates it up and down by that fraction, run after run."""

    calls: list[tuple[str, float]] = []
    factors: dict[str, tuple[float, float]] = {}

    def __init__(self, model, config, source="config", log=None, extra_kv_keys=()):
        self.source = source
        self.n = 0

    def run(self, prompt, continuation, keep_logits=False, dump_dir=None, run_id="run", step_delay_s=0.0):
        factor, wobble = self.factors.get(self.source, (1.0, 0.0))
        self.n += 1
        speed = 100.0 * factor * (1 + wobble * (-1) ** self.n) / (1 + 100.0 * step_delay_s)
        FakeRuntime.calls.append((self.source, speed))
        logits = np.zeros((len(continuation), 8)) if keep_logits else None
        return RunResult(1000.0, speed, {"h2o_lossy": 3.0}, logits, [64, 64])


class FakeModelRuntime:
    """A :class:`~h2o_kernels.runtimes.base.Runtime` whose configured runs are :class:`FakeRuntime`."""

    kind, has_logits, has_dumps = "reference", True, True
    model = ModelInfo("fake", 1, SimpleNamespace(num_layers=2, num_kv_heads=1, head_dim=4))

    def text_ids(self, text, count, seed=0):
        return np.arange(count)

    def configure(self, config, source="config", extra_kv_keys=()):
        return FakeRuntime(None, config, source)


def measure(pts, spec, progress):
    return gate_run._measure_groups(FakeModelRuntime(), pts, spec, progress)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(gate_run, "check_run_fits", lambda *a: None)
    monkeypatch.setattr(gate_run, "fidelity", lambda *a: {})
    FakeRuntime.calls = []
    return FakeRuntime


def points(*labels: str) -> list[Point]:
    return [Point(f"run_{i}", 8, 4, 2, {"kv_h2o_enable": True}, label) for i, label in enumerate(labels)]


def test_every_candidate_run_has_a_baseline_run_next_to_it(fake, tmp_path):
    fake.factors = {"a": (1.0, 0.0), "b": (1.0, 0.0), "c": (1.0, 0.0)}
    measure(points("a", "b", "c"), RunSpec("reference", tmp_path, rounds=2), lambda line: None)
    names = [name for name, _ in fake.calls]
    assert names[0] == "baseline"  # the warm-up
    order = names[1:]
    assert order == ["baseline", "a", "b", "baseline", "c", "baseline", "b", "c", "baseline", "a", "baseline"]
    for i, name in enumerate(order):  # no candidate is more than one run away from a baseline run
        if name != "baseline":
            assert "baseline" in (order[i - 1], order[i + 1]) or "baseline" in order[i - 2:i]


def test_a_clear_verdict_takes_the_minimum_rounds_and_an_unclear_one_runs_to_the_cap(fake, tmp_path):
    fake.factors = {"fast": (1.2, 0.01), "slow": (0.8, 0.01), "edge": (0.95, 0.04)}
    configs, _, _ = measure(points("fast", "slow", "edge"),
                                            RunSpec("reference", tmp_path, rounds=3, max_rounds=6), lambda line: None)
    assert len(configs["fast"]["decode_log_ratios"]) == 3
    assert len(configs["slow"]["decode_log_ratios"]) == 3
    assert len(configs["edge"]["decode_log_ratios"]) == 6
    assert configs["fast"]["decode_tps_rounds"] == pytest.approx([120 * 0.99, 120 * 1.01, 120 * 0.99], rel=1e-9)
    report = build_report(configs, Thresholds(), baselines={k: v["baseline_decode_tps"] for k, v in configs.items()})
    states = {c["name"]: c["verdicts"]["decode_pass"]["state"] for c in report["configs"]}
    assert states == {"fast": "pass", "slow": "fail", "edge": "undecided"}


def test_the_injected_slowdown_is_a_fraction_of_the_warm_up_baselines_step(fake, tmp_path):
    lines: list[str] = []
    configs, _, _ = measure(points("a"), RunSpec("reference", tmp_path, rounds=3, inject_slowdown=0.5),
                                            lines.append)
    assert any("injecting 5.00 ms per candidate decode step" in line for line in lines)  # 0.5 x 1/100 s
    assert configs["a"]["decode_tps"] == pytest.approx(100 / 1.5)  # the fake adds the delay's share of a step


def test_the_reference_runtime_sleeps_the_injected_delay_in_its_decode_loop():
    model = LlamaModel.random(TINY, seed=7, std=0.2)
    ids = np.random.default_rng(3).integers(0, TINY["vocab_size"], 40)
    runtime = ReferenceRun(model, {})
    t0 = time.perf_counter()
    slow = runtime.run(ids[:32], ids[32:], step_delay_s=0.02)
    assert time.perf_counter() - t0 >= 8 * 0.02
    assert slow.decode_tok_s <= 1 / 0.02


def test_whole_cache_ratio_counts_every_layer_once():
    # 3 layers of 100 bytes in a full cache; layer 0 held whole and coded 2:1, layer 1 evicted to 50
    # and coded 5:4, layer 2 evicted to 25 and outside the lossless scope
    ratio = whole_cache_ratio(300, [100, 50, 25], {0: (100, 50), 1: (50, 40)})
    assert ratio == pytest.approx(300 / (50 + 40 + 25))


def _undecided_report(policy: str) -> dict:
    row = {"decode_tps": 95.0, "decode_log_ratios": [math.log(r) for r in (0.97, 0.93, 0.95)], "h2o_lossy": 3.5,
           "lossless_online": 1.4, "h2o_lossless_decomp_us": 10.0}
    return build_report({"edge": row}, Thresholds(undecided=policy), baselines={"edge": 100.0},
                        meta={"rounds": 3, "max_rounds": 3, "warnings": ["[WARN] edge: something"]})


@pytest.mark.parametrize("policy", ["pass", "fail"])
def test_an_undecided_verdict_is_reported_everywhere_with_its_interval(policy, tmp_path):
    report = _undecided_report(policy)
    verdict = report["configs"][0]["verdicts"]["decode_pass"]
    assert verdict["state"] == "undecided" and verdict["passed"] is (policy == "pass")
    lo, hi = verdict["interval"]
    assert lo < 0.05 < hi and verdict["coverage"] == 0.75
    assert report["overall"]["passed"] is (policy == "pass")
    props = dict(junit_properties(report))
    assert props["edge::decode_pass"].startswith(f"undecided(counted as {policy}) value=")
    assert "interval=[" in props["edge::decode_pass"] and props["h2o_warning.1"] == "[WARN] edge: something"
    terminal = "\n".join(terminal_lines(report))
    assert "undecided" in terminal and f"counted as {policy}" in terminal
    markdown = render_markdown(report)
    assert f"- decode_undecided_counts_as: {policy}" in markdown and "undecided" in markdown
    assert "## Warnings" in markdown
    write_reports(report, tmp_path)
    cases = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    decode = next(c for c in cases if c["case"] == "edge::decode_pass")
    assert decode["state"] == "undecided" and decode["interval"] == [lo, hi]


def test_a_row_without_rounds_is_judged_on_its_single_number():
    report = build_report({"x": {"decode_tps": 9.0}}, Thresholds(), baselines={"x": 10.0})
    verdict = report["configs"][0]["verdicts"]["decode_pass"]
    assert verdict["state"] == "fail" and verdict["interval"] is None and "one unpaired number" in verdict["reason"]


def test_a_fixed_baseline_judges_the_rounds_against_it():
    row = {"decode_tps": 10.0, "decode_tps_rounds": [10.0, 10.2, 9.9], "decode_log_ratios": [0.0, 0.0, 0.0]}
    report = build_report({"x": row}, Thresholds(decode_baseline=12.0))
    verdict = report["configs"][0]["verdicts"]["decode_pass"]
    assert verdict["state"] == "fail" and verdict["value"] == pytest.approx(1 - 10.0 / 12.0, abs=0.01)


def test_a_dump_the_online_sim_cannot_read_is_a_warning(tmp_path):
    write_standard_dump(tmp_path)
    broken = sorted(tmp_path.glob("k_*.bin"))[0]
    broken.write_bytes(broken.read_bytes()[:10])
    warnings: list[str] = []
    per_layer = gate_run._online_sim(tmp_path, "cfg", "fast", warnings, lambda line: None)
    assert per_layer and warnings and all(w.startswith("[WARN] cfg: online-sim skipped ") for w in warnings)
    assert broken.name in warnings[0]


def test_a_run_without_decode_steps_has_no_speed_to_pair(fake, tmp_path):
    fake.factors = {"a": (0.0, 0.0)}  # every candidate run decodes at 0 tok/s, as with gens 0
    configs, _, _ = measure(points("a"), RunSpec("reference", tmp_path, rounds=2, max_rounds=5),
                                            lambda line: None)
    assert configs["a"]["decode_log_ratios"] == [] and len(configs["a"]["decode_tps_rounds"]) == 2


def test_junit_thresholds_read_as_ci_shows_them():
    assert [threshold_text(v) for v in (None, True, False, 0.05, 3.0, 8)] == ["off", "true", "false", "0.05", "3", "8"]


def test_the_terminal_shows_a_comparison_as_plain_columns():
    markdown = ("## Compared with abc123 (asked for latest)\n\n| config | change |\n|---|---:|\n"
                "| keep0.30-lr3.0 | +1.20% |\n| k | 0.00% |\n\nNo regression beyond tolerance.\n")
    assert plain_text(markdown) == ["Compared with abc123 (asked for latest)", "", "config          change",
                                    "keep0.30-lr3.0  +1.20%", "k               0.00%", "",
                                    "No regression beyond tolerance."]
