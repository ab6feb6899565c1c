"""History store, run comparison, trend table/plot and ``h2o-gate history``."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gates import history
from gates.gate_report import build_report
from gates.history import (CompareSpec, HistoryError, HistoryWarning, append, compare, load, load_with_errors,
                           make_record, parse_compare_spec, parse_compare_specs, regressions, render_comparison,
                           resolve)
from gates.rules import Thresholds
from gates.trend import plot_trend, representative_config, trend_table
from pytest_h2o import history_cli

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)
SHA_A = "a" * 8 + "1" * 32
SHA_B = "b" * 8 + "2" * 32


def _row(lossy: float = 3.2, online: float = 1.35, decode: float = 20.0, ppl: float = 0.02) -> dict:
    return {"h2o_lossy": lossy, "lossless_online": online, "lossless_scope": online * 0.98,
            "total_ratio": lossy * online, "decode_tps": decode, "h2o_lossless_decomp_us": 150.0,
            "h2o_fidelity_top1": 0.97, "h2o_fidelity_ppl_delta": ppl, "per_layer_lossless": {"0": 1.3, "1": 1.4},
            "lossless_online_source": "online_sim", "h2o_evictions": float("nan")}


def _report(rows: dict | None = None, baselines: dict | None = None, preset: str = "target_joint_scope_v4.json"):
    rows = rows if rows is not None else {"keep0.30-lr3.0": _row(), "keep0.50-lr2.0": _row(lossy=2.0, decode=20.5)}
    if baselines is None:
        baselines = {name: 21.0 for name in rows}
    return build_report(rows, Thresholds(), "joint", baselines, {"preset": preset, "runtime": "reference",
                                                                  "model": "smollm2", "per_layer": {"x": 1}})


def _record(report: dict, commit: str = SHA_A, when: datetime = T0, monkeypatch=None) -> dict:
    """A record with a pinned clock and commit."""
    monkeypatch.setattr(history, "_now", lambda: when)
    monkeypatch.setattr(history, "git_info", lambda root=None: {"commit": commit, "dirty": False, "branch": "main"})
    return make_record(report)


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "history"


# ----------------------------------------------------------------------------------------------- records


def test_record_keeps_numbers_verdicts_and_derives_speed_ratio(monkeypatch):
    record = _record(_report(), monkeypatch=monkeypatch)
    assert record["schema"] == history.SCHEMA_VERSION
    assert record["timestamp"] == "2024-05-01T12:00:00.123456+00:00"
    assert record["preset"] == "target_joint_scope_v4.json" and record["mode"] == "joint"
    assert record["meta"] == {"preset": "target_joint_scope_v4.json", "runtime": "reference", "model": "smollm2"}
    assert record["overall"]["passed"] is True and record["overall"]["passing"] == ["keep0.30-lr3.0"]
    config = record["configs"]["keep0.30-lr3.0"]
    metrics = config["metrics"]
    assert "per_layer_lossless" not in metrics and "lossless_online_source" not in metrics
    assert "h2o_evictions" not in metrics  # NaN dropped
    assert metrics["baseline_decode_tps"] == 21.0
    assert metrics["decode_vs_baseline"] == pytest.approx(20.0 / 21.0)
    assert config["verdicts"]["lossy_pass"] == {"passed": True, "enabled": True, "value": 3.2}
    assert record["configs"]["keep0.50-lr2.0"]["passed"] is False
    assert {"platform", "python", "cpu_count", "machine", "processor"} <= set(record["machine"])
    json.dumps(record, allow_nan=False)


def test_record_without_baseline_has_no_speed_ratio(monkeypatch):
    record = _record(_report({"c": _row()}, baselines={}), monkeypatch=monkeypatch)
    assert "decode_vs_baseline" not in record["configs"]["c"]["metrics"]


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
    record = _record(_report(), monkeypatch=monkeypatch)
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
    append(store, _record(_report(), SHA_A, T0, monkeypatch=monkeypatch))
    (store / "20240101T000000000000-broken.json").write_text("{not json")
    (store / "other.json").write_text(json.dumps({"hello": 1}))
    result = load_with_errors(store)
    assert [r["git"]["commit"] for r in result.records] == [SHA_A, SHA_B]
    assert len(result.errors) == 2 and any("broken.json" in e for e in result.errors)
    assert any("other.json" in e and "schema" in e for e in result.errors)
    with pytest.warns(HistoryWarning) as caught:
        assert len(load(store)) == 2
    assert sorted(Path(str(w.message).split(": ")[0].split()[-1]).name for w in caught) == [
        "20240101T000000000000-broken.json", "other.json"]
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
    assert resolve(store, "AAAAAAAA11", preset="target_joint_scope_v4.json")["_path"] == str(paths[0])
    assert resolve(store, str(paths[0]))["git"]["commit"] == SHA_A


def test_resolve_errors_name_store_request_and_contents(store, monkeypatch):
    with pytest.raises(HistoryError, match=r"no stored run .*history.*'latest'.*no runs"):
        resolve(store, "latest")
    _filled_store(store, monkeypatch)
    with pytest.raises(HistoryError, match=r"no stored run of commit 'cccc'.*stored commits, newest first: "
                                           r"bbbbbbbb22, aaaaaaaa11"):
        resolve(store, "cccc")
    with pytest.raises(HistoryError, match=r"for preset 'nope'.*presets other.json, target_joint_scope_v4.json"):
        resolve(store, "latest", preset="nope")
    with pytest.raises(HistoryError, match="not 'latest', a commit sha prefix"):
        resolve(store, "yesterday")
    with pytest.raises(HistoryError, match="no history record file"):
        resolve(store, str(store / "missing.json"))
    append(store, _record(_report(), "aaaa" + "f" * 36, T0, monkeypatch=monkeypatch))
    with pytest.raises(HistoryError, match="ambiguous"):
        resolve(store, "aaaa")


# ----------------------------------------------------------------------------------------------- compare


def test_parse_compare_specs():
    assert parse_compare_spec("h2o_lossy:2%") == CompareSpec("h2o_lossy", 2.0)
    assert parse_compare_spec(" decode_tps : 5 ") == CompareSpec("decode_tps", 5.0)
    assert parse_compare_spec("all:1%") == CompareSpec("*", 1.0)
    specs = parse_compare_specs(["*:5%,decode_tps:10%", "h2o_lossless_decomp_us:50"])
    assert {s.metric: s.tolerance_pct for s in specs} == {**{m: 5.0 for m in history.ALL_METRICS},
                                                         "decode_tps": 10.0, "h2o_lossless_decomp_us": 50.0}
    for bad, why in (("h2o_lossy", "expected METRIC:TOL"), ("h2o_lossy:abc%", "'abc' is not a number"),
                     ("h2o_lossy:-1%", ">= 0"), ("bogus:1%", "unknown metric 'bogus'.*known: .*h2o_lossy"),
                     (":3%", "expected METRIC")):
        with pytest.raises(ValueError, match=f"bad compare spec .*{why}"):
            parse_compare_spec(bad)


def _pair(monkeypatch, old_rows, new_rows, old_base=21.0, new_base=21.0):
    old = _record(_report(old_rows, {n: old_base for n in old_rows} if old_base else {}), SHA_A, T0,
                  monkeypatch=monkeypatch)
    new = _record(_report(new_rows, {n: new_base for n in new_rows} if new_base else {}), SHA_B, T0,
                  monkeypatch=monkeypatch)
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


def test_speed_is_compared_as_ratio_of_the_same_run_baseline(monkeypatch):
    # a uniformly slower machine: baseline and decode both 20% lower -> not a regression
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)}, old_base=21.0, new_base=16.8)
    [slow_machine] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert slow_machine.basis == "decode_vs_baseline" and not slow_machine.regression
    assert slow_machine.change == pytest.approx(0.0, abs=1e-9) and "same-run baseline" in slow_machine.note
    # the same machine, decode 20% lower against an unchanged baseline -> a regression
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)})
    [slower_code] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert slower_code.regression and slower_code.change == pytest.approx(-20.0)
    # no same-run baseline: raw tok/s, and the note says so
    new, old = _pair(monkeypatch, {"c": _row(decode=20.0)}, {"c": _row(decode=16.0)}, old_base=None)
    [raw] = compare(new, old, [CompareSpec("decode_tps", 5.0)])
    assert raw.basis == "decode_tps" and raw.regression and "no same-run baseline in the previous run" in raw.note


def test_compare_reports_missing_configurations_and_values(monkeypatch):
    row = _row()
    del row["h2o_fidelity_top1"]
    new, old = _pair(monkeypatch, {"a": _row(), "gone": _row()}, {"a": row, "added": _row()})
    out = compare(new, old, [CompareSpec("h2o_fidelity_top1", 1.0)])
    by_config = {c.config: c for c in out}
    assert set(by_config) == {"a", "gone", "added"}
    assert by_config["a"].missing and "missing in the current run" in by_config["a"].note
    assert "missing in the current run" in by_config["gone"].note and "new configuration" in by_config["added"].note
    assert not regressions(out)
    strict = compare(new, old, [CompareSpec("h2o_fidelity_top1", 1.0)], strict_missing=True)
    assert {c.config for c in regressions(strict)} == {"a", "gone"}
    text = render_comparison(out, title="vs aaaaaaaa11")
    assert "## vs aaaaaaaa11" in text and "| gone | * |" in text and "No regression beyond tolerance." in text


def test_render_comparison_table(monkeypatch):
    new, old = _pair(monkeypatch, {"c": _row(lossy=3.2)}, {"c": _row(lossy=2.88)})
    text = render_comparison(compare(new, old, parse_compare_specs(["h2o_lossy:5%", "decode_tps:5"])))
    assert "| c | h2o_lossy | h2o_lossy (higher better) | 3.2 | 2.88 | -10.00% | 5% | REGRESSION |" in text
    assert "| c | decode_tps | decode_vs_baseline (higher better) |" in text
    assert "1 regression(s) beyond tolerance." in text


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
    for record in _trend_records(monkeypatch):
        append(store, record)
    (store / "junk.json").write_text("[")
    assert _cli("--store", str(store)) == 0
    out, err = capsys.readouterr()
    assert "| # | time (UTC) | commit | preset | pass | config | h2o_lossy | lossless_online | total_ratio " \
           "| decode_vs_baseline |" in out
    assert "aaaaaaaa11" in out and "bbbbbbbb22" in out
    assert f"wrote trend plot {store / 'trend.png'} (2 runs)" in out
    assert (store / "trend.png").read_bytes()[:4] == b"\x89PNG"
    assert "junk.json" in err
    assert _cli("--store", str(store), "--last", "1", "--metric", "h2o_lossy", "--plot",
                str(store / "p.png")) == 0
    out, _ = capsys.readouterr()
    assert "aaaaaaaa11" not in out and "bbbbbbbb22" in out and (store / "p.png").exists()


def test_cli_empty_store_and_bad_options(store, monkeypatch, capsys):
    assert _cli("--store", str(store)) == 1
    assert str(store) in capsys.readouterr().err
    append(store, _trend_records(monkeypatch)[0])
    assert _cli("--store", str(store), "--preset", "nope") == 1
    assert "of preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        _cli("--store", str(store), "--metric", "h2o_lossyy")
    assert exc.value.code == 2 and "h2o_lossyy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli("--store", str(store), "--last", "0")
