"""History store, run comparison, trend table/plot and ``h2o-gate history``.

Reports are built by hand here (the keys :func:`h2o_gates.history.make_record` reads), not by the gate.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from h2o_gates import history
from h2o_gates.history import (
    CompareSpec,
    HistoryError,
    HistoryWarning,
    append,
    comparable,
    compare,
    incomplete_reason,
    load,
    load_with_errors,
    make_record,
    measured_anything,
    parse_compare_spec,
    parse_compare_specs,
    regressions,
    render_comparison,
    resolve,
)
from h2o_gates.trend import plot_trend, representative_config, trend_table
from pytest_h2o.cli import history as history_cli

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
SHA_A = "a" * 8 + "1" * 32
SHA_B = "b" * 8 + "2" * 32
PRESET = "target_joint_scope_v4.json"
CONFIGS = ("keep0.30-lr3.0", "keep0.50-lr2.0")
NOISE = (0.012, -0.018, 0.004, 0.02, -0.01, -0.003, 0.015)  # per-round log noise, about +-2%


def _workload(names=CONFIGS, **changes) -> dict:
    return {"runtime": "reference", "model": "smollm2", "text": "builtin:wiki", "text_sha256": "ab" * 32,
            "threads": 4, "sizes": {name: [64, 32] for name in names}, **changes}


def _row(lossy: float = 3.2, online: float = 1.35, decode: float = 20.0, ppl: float = 0.02) -> dict:
    return {"h2o_lossy": lossy, "lossless_online": online, "lossless_scope": online * 0.98,
            "total_ratio": lossy * online * 0.9, "decode_tps": decode, "h2o_lossless_decomp_us": 150.0,
            "h2o_fidelity_top1": 0.97, "h2o_fidelity_ppl_delta": ppl, "per_layer_lossless": {"0": 1.3, "1": 1.4},
            "lossless_online_source": "online_sim", "h2o_evictions": float("nan")}


def _speed_row(logs, **kwargs) -> dict:
    """A row with per-round decode log ratios and the report's statistics over them."""
    return {**_row(**kwargs), "decode_log_ratios": list(logs),
            "decode_vs_baseline": math.exp(sorted(logs)[len(logs) // 2]),
            "decode_rounds": len(logs), "decode_state": "pass"}


def _config(name: str, row: dict, baseline: float | None) -> dict:
    metrics = dict(row)
    if baseline is not None and "error" not in row:
        metrics["baseline_decode_tps"] = baseline
    lossy = row.get("h2o_lossy")
    passed = lossy is not None and lossy >= 3.0
    verdicts = {"lossy_pass": {"passed": passed, "enabled": True, "value": lossy, "reason": "lossy >= 3"},
                "decode_pass": {"passed": True, "enabled": False, "value": None, "reason": "no limit"}}
    return {"name": name, "passed": passed, "metrics": metrics, "verdicts": verdicts}


def _report(rows: dict | None = None, baseline: float | None = 21.0, preset: str = PRESET,
            workload: dict | None = None, fatal: str | None = None) -> dict:
    """A gate report as the plugin builds it (meta keys, ``workload``, configurations, verdicts)."""
    rows = rows if rows is not None else {CONFIGS[0]: _row(), CONFIGS[1]: _row(lossy=2.0, decode=20.5)}
    configs = [_config(name, row, baseline) for name, row in rows.items()]
    passing = [c["name"] for c in configs if c["passed"]]
    overall = {"passed": bool(passing), "mode": "joint", "passing": passing,
               "reason": f"{passing[0]} passes" if passing else "no configuration passes"}
    return {"preset": preset, "runtime": "reference", "model": "smollm2", "per_layer": {"x": 1}, "fatal": fatal,
            "workload": workload if workload is not None else _workload(rows), "mode": "joint",
            "thresholds": {"lossy_target": 3.0}, "configs": configs, "overall": overall,
            "joint": dict(overall), "independent": {"passed": overall["passed"], "reason": "", "verdicts": {}}}


def _record(report: dict, commit: str = SHA_A, when: datetime = T0, monkeypatch=None) -> dict:
    """A record with a pinned clock and commit."""
    monkeypatch.setattr(history, "_now", lambda: when)
    monkeypatch.setattr(history, "git_info", lambda root=None: {"commit": commit, "dirty": False, "branch": "main"})
    return make_record(report)


def _schema1(record: dict) -> dict:
    """What an older pytest-h2o stored: schema 1, no completeness, no workload."""
    return {k: v for k, v in record.items() if k not in ("complete", "workload")} | {"schema": 1}


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "history"


# ----------------------------------------------------------------------------------------------- records


def test_record_keeps_numbers_verdicts_workload_and_derives_speed_ratio(monkeypatch):
    record = _record(_report(), monkeypatch=monkeypatch)
    assert record["schema"] == history.SCHEMA_VERSION == 2
    assert record["timestamp"] == "2024-05-01T12:00:00.123456+00:00"
    assert record["preset"] == PRESET and record["mode"] == "joint"
    assert record["meta"] == {"preset": PRESET, "runtime": "reference", "model": "smollm2", "fatal": None}
    assert record["workload"] == _workload() and record["complete"] is True
    assert record["overall"]["passed"] is True and record["overall"]["passing"] == ["keep0.30-lr3.0"]
    config = record["configs"]["keep0.30-lr3.0"]
    metrics = config["metrics"]
    assert config["error"] is None
    assert "per_layer_lossless" not in metrics and "lossless_online_source" not in metrics
    assert "h2o_evictions" not in metrics  # NaN dropped
    assert metrics["baseline_decode_tps"] == 21.0
    assert metrics["decode_vs_baseline"] == pytest.approx(20.0 / 21.0)
    assert config["verdicts"]["lossy_pass"] == {"passed": True, "enabled": True, "value": 3.2}
    assert record["configs"]["keep0.50-lr2.0"]["passed"] is False
    assert {"platform", "python", "cpu_count", "machine", "processor"} <= set(record["machine"])
    json.dumps(record, allow_nan=False)


def test_record_keeps_the_reports_speed_statistics_and_finite_log_ratios(monkeypatch):
    row = {**_speed_row(NOISE), "decode_vs_baseline": 0.93, "decode_vs_baseline_lo": 0.9, "other_list": [1.0]}
    bad = {**_speed_row(NOISE), "decode_log_ratios": [0.1, float("nan")]}
    record = _record(_report({"c": row, "bad": bad}), monkeypatch=monkeypatch)
    metrics = record["configs"]["c"]["metrics"]
    assert metrics["decode_vs_baseline"] == 0.93  # the report's, not decode_tps / baseline
    assert metrics["decode_log_ratios"] == list(NOISE) and metrics["decode_vs_baseline_lo"] == 0.9
    assert "other_list" not in metrics and "decode_state" not in metrics
    assert "decode_log_ratios" not in record["configs"]["bad"]["metrics"]  # one non-finite round voids the list
    json.dumps(record, allow_nan=False)


def test_record_without_baseline_has_no_speed_ratio(monkeypatch):
    record = _record(_report({"c": _row()}, baseline=None), monkeypatch=monkeypatch)
    assert "decode_vs_baseline" not in record["configs"]["c"]["metrics"]


def test_fatal_and_partial_runs_are_incomplete(monkeypatch):
    fatal = _record(_report({n: {"error": "RuntimeError: no model"} for n in CONFIGS}, fatal="RuntimeError: no model"),
                    monkeypatch=monkeypatch)
    assert fatal["complete"] is False and not measured_anything(fatal)
    assert incomplete_reason(fatal) == "the measurement failed as a whole (RuntimeError: no model)"
    partial = _record(_report({CONFIGS[0]: _row(), CONFIGS[1]: {"error": "timeout after 60 s"}}),
                      monkeypatch=monkeypatch)
    assert partial["complete"] is False and measured_anything(partial)
    assert partial["configs"][CONFIGS[1]] == {"passed": False, "error": "timeout after 60 s", "metrics": {},
                                              "verdicts": partial["configs"][CONFIGS[1]]["verdicts"]}
    assert incomplete_reason(partial) == f"not measured: {CONFIGS[1]}"
    all_errored = _record(_report({n: {"error": "boom"} for n in CONFIGS}), monkeypatch=monkeypatch)
    assert not measured_anything(all_errored)
    assert incomplete_reason(all_errored) == f"not measured: {', '.join(CONFIGS)}"
    nothing = _record(_report({}), monkeypatch=monkeypatch)
    assert nothing["complete"] is False and incomplete_reason(nothing) == "no configuration measured"
    assert incomplete_reason(_record(_report(), monkeypatch=monkeypatch)) is None
    assert incomplete_reason(_schema1(partial)) is None  # schema 1 does not say


def test_git_info_outside_a_repository_and_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert history.git_info(tmp_path) == {"commit": "unknown", "dirty": None, "branch": "unknown"}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert history.git_info(tmp_path) == {"commit": "unknown", "dirty": None, "branch": "unknown"}
    record = make_record(_report(), tmp_path)
    assert record["git"]["commit"] == "unknown"


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_info_in_a_repository(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "f.txt").write_text("x")
    git("add", "f.txt")
    git("commit", "-q", "-m", "one")
    info = history.git_info(tmp_path)
    assert info["commit"] == git("rev-parse", "HEAD") and len(info["commit"]) == 40
    assert info["dirty"] is False and info["branch"] == git("rev-parse", "--abbrev-ref", "HEAD")
    (tmp_path / "f.txt").write_text("y")
    assert history.git_info(tmp_path)["dirty"] is True


# ------------------------------------------------------------------------------------------------- store


def test_append_load_round_trip(store, monkeypatch):
    record = _record(_report({"c": _speed_row(NOISE)}), monkeypatch=monkeypatch)
    path = append(store, record)
    assert path.name == "20240501T120000123456-aaaaaaaa11.json"
    loaded = load(store)
    assert len(loaded) == 1 and loaded[0]["_path"] == str(path)
    assert {k: v for k, v in loaded[0].items() if k != "_path"} == record
    assert not list(store.glob(".*"))  # no temp file left behind


def test_appends_in_the_same_microsecond_do_not_collide(store, monkeypatch):
    record = _record(_report(), monkeypatch=monkeypatch)
    first, second = append(store, record), append(store, record)
    assert first != second and second.name == "20240501T120000123456-aaaaaaaa11-1.json"
    threads = [threading.Thread(target=append, args=(store, record)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    files = sorted(store.glob("*.json"))
    assert len(files) == 10 and len({f.name for f in files}) == 10
    assert all(json.loads(f.read_text())["git"]["commit"] == SHA_A for f in files)
    assert len(load(store)) == 10


def test_append_without_hard_links_still_never_overwrites(store, monkeypatch):
    def no_link(src, dst):
        raise PermissionError("no hard links on this file system")

    record = _record(_report(), monkeypatch=monkeypatch)
    monkeypatch.setattr(history.os, "link", no_link)
    paths = [append(store, record) for _ in range(3)]
    assert len(set(paths)) == 3 and len(load(store)) == 3
    assert not list(store.glob(".*"))


def test_load_sorts_by_time_and_skips_corrupt_files(store, monkeypatch):
    append(store, _record(_report(), SHA_B, T0 + timedelta(hours=1), monkeypatch=monkeypatch))
    append(store, _schema1(_record(_report(), SHA_A, T0, monkeypatch=monkeypatch)))
    (store / "20240101T000000000000-broken.json").write_text("{not json")
    (store / "other.json").write_text(json.dumps({"hello": 1}))
    (store / "future.json").write_text(json.dumps({"schema": 3, "timestamp": "x", "configs": {}}))
    result = load_with_errors(store)
    assert [r["git"]["commit"] for r in result.records] == [SHA_A, SHA_B]  # schema 1 still readable
    assert len(result.errors) == 3 and any("broken.json" in e for e in result.errors)
    assert any("other.json" in e and "schema" in e for e in result.errors)
    assert any("future.json" in e and "schema 3 is newer" in e for e in result.errors)
    with pytest.warns(HistoryWarning) as caught:
        assert len(load(store)) == 2
    assert sorted(Path(str(w.message).split(": ")[0].split()[-1]).name for w in caught) == [
        "20240101T000000000000-broken.json", "future.json", "other.json"]
    assert load_with_errors(store / "nowhere").records == []


# ----------------------------------------------------------------------------------------------- resolve


def _filled_store(store: Path, monkeypatch) -> list[Path]:
    return [append(store, _record(_report(), SHA_A, T0, monkeypatch=monkeypatch)),
            append(store, _record(_report(preset="other.json"), SHA_A, T0 + timedelta(minutes=1),
                                  monkeypatch=monkeypatch)),
            append(store, _record(_report(), SHA_B, T0 + timedelta(minutes=2), monkeypatch=monkeypatch))]


def test_resolve_latest_commit_and_path(store, monkeypatch):
    paths = _filled_store(store, monkeypatch)
    assert resolve(store, "latest")["_path"] == str(paths[2])
    assert resolve(store, "latest", preset="other")["_path"] == str(paths[1])
    assert resolve(store, "aaaaaaaa")["_path"] == str(paths[1])  # the newest run of that commit
    assert resolve(store, "AAAAAAAA11", preset=PRESET)["_path"] == str(paths[0])
    assert resolve(store, str(paths[0]))["git"]["commit"] == SHA_A
    assert resolve(None, str(paths[0]), preset=PRESET, workload=_workload())["_path"] == str(paths[0])


def test_resolve_errors_name_store_request_and_what_is_available(store, monkeypatch):
    with pytest.raises(HistoryError, match=r"no stored run in .*history to compare with \(it holds no runs\)"):
        resolve(store, "latest")
    _filled_store(store, monkeypatch)
    with pytest.raises(HistoryError, match=r"no stored run of commit 'cccc' in .*history; comparable runs in .*, "
                                           r"newest first: bbbbbbbb22 \(2024-05-01 12:02:00 UTC\), "
                                           r"aaaaaaaa11 \(2024-05-01 12:01:00 UTC\)"):
        resolve(store, "cccc")
    with pytest.raises(HistoryError, match=r"of preset 'nope'.*presets other.json, target_joint_scope_v4.json"):
        resolve(store, "latest", preset="nope")
    with pytest.raises(HistoryError, match="not 'latest', a commit sha prefix.*comparable runs in"):
        resolve(store, "yesterday")
    with pytest.raises(HistoryError, match="no history record file .*missing.json; comparable runs in"):
        resolve(store, str(store / "missing.json"))
    (store.parent / "notes.json").write_text("[1, 2]")
    with pytest.raises(HistoryError, match="notes.json: not a JSON object; comparable runs in"):
        resolve(store, str(store.parent / "notes.json"))
    append(store, _record(_report(), "aaaa" + "f" * 36, T0, monkeypatch=monkeypatch))
    with pytest.raises(HistoryError, match="ambiguous"):
        resolve(store, "aaaa")


def test_lookups_skip_incomplete_and_old_runs(store, monkeypatch):
    good = append(store, _record(_report(), SHA_A, T0, monkeypatch=monkeypatch))
    partial = _report({CONFIGS[0]: _row(), CONFIGS[1]: {"error": "timeout"}})
    append(store, _record(partial, SHA_B, T0 + timedelta(minutes=1), monkeypatch=monkeypatch))
    assert resolve(store, "latest", preset=PRESET)["_path"] == str(good)
    with pytest.raises(HistoryError, match=r"commit 'bbbb', bbbbbbbb22 \(.*\), is not comparable with this run: "
                                           r"an incomplete run: not measured: keep0.50-lr2.0; comparable runs in .*"
                                           r"aaaaaaaa11"):
        resolve(store, "bbbb")
    old = append(store, _schema1(_record(_report(), SHA_B, T0 + timedelta(minutes=2), monkeypatch=monkeypatch)))
    assert resolve(store, "latest")["_path"] == str(good)
    with pytest.raises(HistoryError, match=f"is not comparable with this run: schema 1, {history.OLD_SCHEMA}"):
        resolve(store, str(old))


def test_latest_picks_the_newest_comparable_run_or_says_why_the_newest_is_not(store, monkeypatch):
    good = append(store, _record(_report(), SHA_A, T0, monkeypatch=monkeypatch))
    append(store, _record(_report(workload=_workload(model="tinyllama")), SHA_B, T0 + timedelta(minutes=1),
                          monkeypatch=monkeypatch))
    assert resolve(store, "latest", PRESET, _workload())["_path"] == str(good)
    assert resolve(store, "latest", PRESET)["git"]["commit"] == SHA_B  # workload not known: not checked
    with pytest.raises(HistoryError, match=r"no comparable stored run of preset .* the newest, bbbbbbbb22 .*, is not "
                                           r"comparable with this run: threads differs: 8 in this run, 4 in the"):
        resolve(store, "latest", PRESET, _workload(threads=8, model="tinyllama"))
    with pytest.raises(HistoryError, match=r"model differs: 'smollm2' in this run, 'tinyllama' in the stored run"):
        resolve(store, "bbbbbbbb", PRESET, _workload())


def test_comparable_names_the_differing_field_and_both_values():
    base = _workload()
    assert comparable(base, dict(base)) is None
    assert comparable(base, _workload(runtime="llm_bench")) == \
        "runtime differs: 'reference' in this run, 'llm_bench' in the stored run"
    assert comparable(base, _workload(text_sha256="cd" * 32)).startswith("text_sha256 differs: 'abab")
    assert comparable(base, _workload(text="other name")) is None  # the same text by its hash
    assert comparable(base, _workload(text="other", text_sha256=None)) == \
        "text differs: 'builtin:wiki' in this run, 'other' in the stored run"
    assert comparable(base, _workload(threads=2)) == "threads differs: 4 in this run, 2 in the stored run"
    resized = _workload(sizes={CONFIGS[0]: [64, 32], CONFIGS[1]: [128, 32]})
    assert comparable(base, resized) == \
        f"[prompt, gen] tokens of {CONFIGS[1]} differs: [64, 32] in this run, [128, 32] in the stored run"
    assert comparable(base, _workload(sizes={CONFIGS[0]: (64, 32), "gone": [1, 1]})) is None  # common ones only
    assert comparable(base, _workload(kv_dumps="/dumps")) == \
        "kv_dumps differs: None in this run, '/dumps' in the stored run"
    assert comparable(base, _workload(decode_baseline=6.6)).startswith("decode_baseline differs: None in this run")
    assert comparable(base, _workload(cluster="local:2")) == \
        "cluster differs: None in this run, 'local:2' in the stored run"  # workers' speed against one machine's
    configs = {CONFIGS[0]: "1" * 16, CONFIGS[1]: "2" * 16}
    assert comparable(_workload(configs=configs), _workload(configs={**configs, CONFIGS[1]: "3" * 16})) == \
        f"the kv_* config of {CONFIGS[1]} differs (sha256 {'2' * 16} in this run, {'3' * 16} stored)"


# ----------------------------------------------------------------------------------------------- compare


def test_parse_compare_specs():
    assert parse_compare_spec("h2o_lossy:2%") == CompareSpec("h2o_lossy", 2.0)
    assert parse_compare_spec(" decode_tps : 5 ") == CompareSpec("decode_tps", 5.0)
    assert parse_compare_spec("all:1%") == CompareSpec("*", 1.0)
    specs = parse_compare_specs(["*:5%,decode_tps:10%", "h2o_lossless_decomp_us:50"])
    assert {s.metric: s.tolerance_pct for s in specs} == {**{m: 5.0 for m in history.ALL_METRICS},
                                                         "decode_tps": 10.0, "h2o_lossless_decomp_us": 50.0}
    assert {"h2o_lossy", "total_ratio", "decode_tps", "h2o_fidelity_top1"} <= set(history.ALL_METRICS)
    for bad, why in (("h2o_lossy", "expected METRIC:TOL"), ("h2o_lossy:abc%", "'abc' is not a number"),
                     ("h2o_lossy:-1%", ">= 0"), ("bogus:1%", "unknown metric 'bogus'.*known: .*h2o_lossy"),
                     (":3%", "expected METRIC")):
        with pytest.raises(ValueError, match=f"bad compare spec .*{why}"):
            parse_compare_spec(bad)


def _pair(monkeypatch, old_rows, new_rows, old_base=21.0, new_base=21.0):
    old = _record(_report(old_rows, old_base), SHA_A, T0, monkeypatch=monkeypatch)
    new = _record(_report(new_rows, new_base), SHA_B, T0, monkeypatch=monkeypatch)
    return new, old


def test_compare_flags_a_regression_beyond_tolerance_only(monkeypatch):
    new, old = _pair(monkeypatch, {"c": _row(lossy=3.2)}, {"c": _row(lossy=3.2 * 0.90)})
    [worse] = compare(new, old, [CompareSpec("h2o_lossy", 5.0)])
    assert worse.regression and worse.change == pytest.approx(-10.0) and worse.old == 3.2
    [fine] = compare(new, old, [CompareSpec("h2o_lossy", 12.0)])
    assert not fine.regression
    new, old = _pair(monkeypatch, {"c": _row(lossy=3.2)}, {"c": _row(lossy=3.2 * 0.97)})
    assert not compare(new, old, [CompareSpec("h2o_lossy", 5.0)])[0].regression
    new, old = _pair(monkeypatch, {"c": _row(lossy=3.2)}, {"c": _row(lossy=4.0)})
    assert not compare(new, old, [CompareSpec("h2o_lossy", 0.0)])[0].regression  # better is never a regression


def test_compare_lower_is_better_and_ppl_delta_in_points(monkeypatch):
    new, old = _pair(monkeypatch, {"c": _row(ppl=-0.001)}, {"c": _row(ppl=0.015)})
    [loose] = compare(new, old, [CompareSpec("h2o_fidelity_ppl_delta", 2.0)])
    assert loose.unit == "pp" and loose.change == pytest.approx(1.6) and not loose.regression
    [tight] = compare(new, old, [CompareSpec("h2o_fidelity_ppl_delta", 1.0)])
    assert tight.regression
    assert not compare(old, new, [CompareSpec("h2o_fidelity_ppl_delta", 0.0)])[0].regression


def test_speed_without_log_ratios_is_a_point_ratio_of_the_same_run_baseline(monkeypatch):
    # a uniformly slower machine: baseline and decode both 20% lower -> not a regression
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)}, old_base=21.0, new_base=16.8)
    [slow_machine] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert slow_machine.basis == "decode_vs_baseline" and not slow_machine.regression
    assert slow_machine.change == pytest.approx(0.0, abs=1e-9) and "same-run baseline" in slow_machine.note
    assert "no per-round decode_log_ratios in the previous and current run" in slow_machine.note
    assert slow_machine.interval is None
    # the same machine, decode 20% lower against an unchanged baseline -> a regression
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)})
    [slower_code] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert slower_code.regression and slower_code.change == pytest.approx(-20.0)
    # no same-run baseline: raw tok/s, and the note says so
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)}, old_base=None)
    [raw] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert raw.basis == "decode_tps" and raw.regression and "no same-run baseline in the previous run" in raw.note
    # log ratios on one side only: still the point comparison, saying which side lacks them
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _speed_row(NOISE, decode=20.0)})
    [one_sided] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert one_sided.interval is None and "no per-round decode_log_ratios in the previous run" in one_sided.note


def _logs(ratio: float, noise_scale: float = 1.0, reverse: bool = False) -> list[float]:
    noise = reversed(NOISE) if reverse else NOISE
    return [math.log(ratio) + noise_scale * n for n in noise]


@pytest.mark.parametrize("metric", ["decode_tps", "decode_vs_baseline"])
def test_speed_with_log_ratios_is_judged_by_the_whole_interval(monkeypatch, metric):
    spec = [CompareSpec(metric, 5.0)]
    # the same noisy samples: no change, interval well inside the tolerance
    new, old = _pair(monkeypatch, {"c": _speed_row(_logs(0.95))}, {"c": _speed_row(_logs(0.95))})
    [same] = compare(new, old, spec)
    assert not same.regression and not same.undecided and same.change == pytest.approx(0.0, abs=1e-9)
    assert same.basis == "decode_vs_baseline" and -5.0 < same.interval[0] < 0.0 < same.interval[1] < 5.0
    assert 0.9 <= same.coverage < 1.0 and same.note.startswith("interval [")
    # 10% slower with small noise: the whole interval is beyond -5% -> a regression
    new, old = _pair(monkeypatch, {"c": _speed_row(_logs(0.95))}, {"c": _speed_row(_logs(0.95 * 0.9, 0.3, True))})
    [slower] = compare(new, old, spec)
    assert slower.regression and not slower.undecided and slower.change == pytest.approx(-10.0, abs=0.5)
    assert slower.interval[1] < -5.0 and slower.new == new["configs"]["c"]["metrics"]["decode_vs_baseline"]
    assert "interval [-11.25%, -9.18%] (coverage 90.3%)" in slower.note
    # 5% slower with large noise: the interval straddles -5% -> undecided, not a regression
    new, old = _pair(monkeypatch, {"c": _speed_row(_logs(0.95))}, {"c": _speed_row(_logs(0.95 * 0.95, 3.0, True))})
    [straddle] = compare(new, old, spec)
    assert not straddle.regression and straddle.undecided
    assert straddle.interval[0] < -5.0 < straddle.interval[1]
    assert straddle.note.startswith("undecided: interval [-7.72%, -1.02%] (coverage 90.3%)")
    # one round a side (logs from single llm_bench calls): no interval, so a 10% drop is undecided, not a regression
    new, old = _pair(monkeypatch, {"c": _speed_row([math.log(0.95)])}, {"c": _speed_row([math.log(0.95 * 0.9)])})
    [single] = compare(new, old, spec)
    assert not single.regression and single.undecided and single.change == pytest.approx(-10.0)
    assert single.note.startswith("undecided: one round on a side: no interval")


def test_speed_interval_rows_in_the_comparison_table(monkeypatch):
    new, old = _pair(monkeypatch, {"a": _speed_row(_logs(0.95)), "b": _speed_row(_logs(0.95))},
                     {"a": _speed_row(_logs(0.95 * 0.9, 0.3, True)), "b": _speed_row(_logs(0.95 * 0.95, 3.0, True))})
    out = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert out[0].old == pytest.approx(old["configs"]["a"]["metrics"]["decode_vs_baseline"])
    text = render_comparison(out)
    assert "| a | decode_tps | decode_vs_baseline (higher better) |" in text
    assert "| -10.25% [-11.25%, -9.18%] | 5% | REGRESSION | interval [-11.25%, -9.18%]" in text
    assert "| -4.14% [-7.72%, -1.02%] | 5% | undecided | undecided: interval [-7.72%, -1.02%]" in text
    assert "1 regression(s) beyond tolerance. 1 undecided: the speed interval straddles the tolerance" in text


def test_a_missing_value_or_configuration_is_a_regression(monkeypatch):
    row = _row()
    del row["h2o_fidelity_top1"]
    new, old = _pair(monkeypatch, {"a": _row(), "b": row, "gone": _row()}, {"a": row, "b": _row(), "added": _row()})
    out = compare(new, old, [CompareSpec("h2o_fidelity_top1", 1.0)])
    by_config = {c.config: c for c in out}
    assert set(by_config) == {"a", "b", "gone", "added"}
    assert by_config["a"].missing and by_config["a"].note == "h2o_fidelity_top1 missing in the current run"
    assert by_config["b"].note == "h2o_fidelity_top1 missing in the previous run"
    assert by_config["gone"].note == "configuration missing in the current run"
    assert "new configuration" in by_config["added"].note
    assert {c.config for c in regressions(out)} == {"a", "b", "gone"}  # missing is never "no regression"
    text = render_comparison(out, title="vs aaaaaaaa11")
    assert "## vs aaaaaaaa11" in text and "| gone | * | * | - | - | - | - | REGRESSION |" in text
    assert "| added | * | * | - | - | - | - | new |" in text and "3 regression(s) beyond tolerance." in text


def test_an_unmeasured_configuration_fails_every_metric_saying_why(monkeypatch):
    old = _record(_report(), SHA_A, T0, monkeypatch=monkeypatch)
    new = _record(_report({CONFIGS[0]: _row(), CONFIGS[1]: {"error": "timeout after 60 s"}}), SHA_B, T0,
                  monkeypatch=monkeypatch)
    out = compare(new, old, parse_compare_specs(["*:5%"]))
    bad = regressions(out)
    assert {c.config for c in bad} == {CONFIGS[1]} and len(bad) == len(history.ALL_METRICS)
    assert bad[0].note == "h2o_lossy missing in the current run; current run: not measured: timeout after 60 s"


def test_runs_that_are_not_comparable_give_one_regression(monkeypatch):
    old = _record(_report(), SHA_A, T0, monkeypatch=monkeypatch)
    other = _record(_report(workload=_workload(model="tinyllama")), SHA_B, T0, monkeypatch=monkeypatch)
    [why] = compare(other, old, parse_compare_specs(["h2o_lossy:5%"]))
    assert why.regression and why.config == "*" and why.note == (
        "not comparable with the previous run: model differs: 'tinyllama' in this run, 'smollm2' in the stored run")
    [old_schema] = compare(other, _schema1(old), parse_compare_specs(["h2o_lossy:5%"]))
    assert old_schema.regression and history.OLD_SCHEMA in old_schema.note
    unknown = {**other, "workload": None}
    [no_workload] = compare(unknown, old, parse_compare_specs(["h2o_lossy:5%"]))
    assert no_workload.regression and "this run does not say what it measured" in no_workload.note
    [other_preset] = compare(_record(_report(preset="x.json"), SHA_B, T0, monkeypatch=monkeypatch), old,
                             parse_compare_specs(["h2o_lossy:5%"]))
    assert other_preset.regression and "preset differs: 'x.json' in this run" in other_preset.note


def test_render_comparison_table(monkeypatch):
    new, old = _pair(monkeypatch, {"c": _row(lossy=3.2)}, {"c": _row(lossy=2.88)})
    text = render_comparison(compare(new, old, parse_compare_specs(["h2o_lossy:5%", "decode_tps:5"])))
    assert "| c | h2o_lossy | h2o_lossy (higher better) | 3.2 | 2.88 | -10.00% | 5% | REGRESSION |" in text
    assert "| c | decode_tps | decode_vs_baseline (higher better) |" in text
    assert "1 regression(s) beyond tolerance." in text
    assert "No comparisons" in render_comparison([])


# ------------------------------------------------------------------------------------------------- trend


def _trend_records(monkeypatch) -> list[dict]:
    failing = {"keep0.30-lr3.0": _row(lossy=2.5), "keep0.50-lr2.0": _row(lossy=2.0)}
    return [_record(_report(), SHA_A, T0, monkeypatch=monkeypatch),
            _record(_report(failing), SHA_B, T0 + timedelta(days=1), monkeypatch=monkeypatch)]


def test_trend_table_reads_one_configuration_per_run(monkeypatch):
    records = _trend_records(monkeypatch)
    assert representative_config(records[0]) == "keep0.30-lr3.0"
    text = trend_table(records, ["h2o_lossy", "decode_vs_baseline", "nothing"])
    lines = text.splitlines()
    assert lines[0] == "| # | time (UTC) | commit | preset | pass | config | h2o_lossy | decode_vs_baseline | nothing |"
    assert lines[2] == ("| 1 | 2024-05-01 12:00:00 | aaaaaaaa11 | target_joint_scope_v4.json | yes | keep0.30-lr3.0 "
                        "| 3.2 | 0.9524 | - |")
    assert lines[3].startswith("| 2 | 2024-05-02 12:00:00 | bbbbbbbb22 | target_joint_scope_v4.json | no |")
    assert len(lines) == 4
    assert "| keep0.50-lr2.0 | 2 |" in trend_table(records, ["h2o_lossy"], config="keep0.50-lr2.0")
    assert len(trend_table(records, ["h2o_lossy"], preset="other").splitlines()) == 2


def test_trend_table_marks_incomplete_runs_and_old_total_ratios(monkeypatch):
    partial = _record(_report({CONFIGS[0]: _row(), CONFIGS[1]: {"error": "timeout"}}), SHA_B, T0 + timedelta(days=2),
                      monkeypatch=monkeypatch)
    old, new = _trend_records(monkeypatch)
    lines = trend_table([_schema1(old), new, partial], ["h2o_lossy", "total_ratio"]).splitlines()
    assert "| 1 | 2024-05-01 12:00:00 | aaaaaaaa11 | target_joint_scope_v4.json | yes |" in lines[2]
    assert lines[4].startswith("| 3 | 2024-05-03 12:00:00 | bbbbbbbb22 | target_joint_scope_v4.json | incomplete |")
    assert lines[-1] == ("total_ratio of run(s) 1 (schema 1, older pytest-h2o) is h2o_lossy x a lossless ratio, "
                         "not the whole-cache ratio of later runs.")
    assert len(trend_table([_schema1(old)], ["h2o_lossy"]).splitlines()) == 3  # no footnote without total_ratio


def test_plot_trend_writes_a_png(tmp_path, monkeypatch):
    records = _trend_records(monkeypatch)
    path = plot_trend(records, tmp_path / "sub" / "trend.png", ["h2o_lossy", "total_ratio"])
    assert path == tmp_path / "sub" / "trend.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_trend(records, tmp_path / "none.png", ["nothing"]) is None and not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------------------------------- cli


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="h2o-gate history")
    history_cli.add_arguments(parser)
    args = parser.parse_args(list(argv))
    return args.run(args, parser)


def test_cli_prints_the_trend_and_writes_the_plot(store, monkeypatch, capsys):
    old, new = _trend_records(monkeypatch)
    append(store, _schema1(old))
    append(store, new)
    (store / "junk.json").write_text("[")
    assert _cli("--store", str(store)) == 0
    out, err = capsys.readouterr()
    assert "| # | time (UTC) | commit | preset | pass | config | h2o_lossy | lossless_online | total_ratio " \
           "| decode_vs_baseline |" in out
    assert "aaaaaaaa11" in out and "bbbbbbbb22" in out and "total_ratio of run(s) 1 (schema 1" in out
    assert f"wrote trend plot {store / 'trend.png'} (2 runs)" in out
    assert (store / "trend.png").read_bytes()[:4] == b"\x89PNG"
    assert "junk.json" in err
    assert _cli("--store", str(store), "--last", "1", "--metric", "h2o_lossy", "--plot",
                str(store / "p.png")) == 0
    out, _ = capsys.readouterr()
    assert "aaaaaaaa11" not in out and "bbbbbbbb22" in out and (store / "p.png").exists()


def test_cli_empty_store_and_bad_options(store, monkeypatch, capsys):
    with pytest.raises(SystemExit, match="2"):  # no store folder at all
        _cli("--store", str(store))
    assert f"--store {store}: no such folder" in capsys.readouterr().err
    store.mkdir()
    assert _cli("--store", str(store)) == 2  # an empty store
    assert str(store) in capsys.readouterr().err
    append(store, _record(_report({"c": _speed_row(NOISE)}), monkeypatch=monkeypatch))
    assert _cli("--store", str(store), "--preset", "nope") == 2
    assert "of preset 'nope'" in capsys.readouterr().err
    for bad in ("h2o_lossyy", "decode_log_ratios"):  # a per-round list is no trend metric
        with pytest.raises(SystemExit) as exc:
            _cli("--store", str(store), "--metric", bad)
        assert exc.value.code == 2 and f"--metric {bad}: in no stored run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("--store", str(store), "--last", "0")


def test_trend_plot_is_titled_with_the_preset_asked_for(store, monkeypatch, tmp_path):
    old, new = _trend_records(monkeypatch)
    append(store, old)
    append(store, new)
    append(store, _record(_report(preset="other.json"), monkeypatch=monkeypatch))
    titles = []

    def capture(fig, path):
        fig.canvas.draw()
        box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
        titles.append(fig._suptitle.get_text())
        return Path(path)

    monkeypatch.setattr("h2o_gates.plots.save_figure", capture)
    assert _cli("--store", str(store), "--preset", PRESET) == 0
    assert _cli("--store", str(store)) == 0
    assert titles == [f"{PRESET}: trend over 2 runs", "all presets: trend over 3 runs"]


def test_history_help_shows_each_default_once(capsys):
    from test_analyze_cli import check_help_defaults

    check_help_defaults(capsys, "history", history_cli.add_arguments)
