"""HistorySetup: choosing the stored run to compare with at configure time, comparing, and storing the run."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from test_history import CONFIGS, PRESET, SHA_A, SHA_B, T0, _record, _report, _row, _schema1, _workload

from h2o_gates import history
from h2o_gates.history import CompareSpec, append, load, regressions
from pytest_h2o.compare import HistorySetup

SHA_C = "c" * 8 + "3" * 32


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return tmp_path / "history"


def _pin(monkeypatch) -> None:
    """Records made by HistorySetup get commit SHA_C at T0 + 1 day."""
    monkeypatch.setattr(history, "_now", lambda: T0 + timedelta(days=1))
    monkeypatch.setattr(history, "git_info", lambda root=None: {"commit": SHA_C, "dirty": False, "branch": "main"})


def _setup(store: Path | None, ref: str | None = "latest", fail: str | None = "h2o_lossy:5%",
           workload: dict | None = None) -> HistorySetup:
    return HistorySetup.from_settings(store, ref, fail, PRESET, Path("."), workload=_workload() if workload is None
                                      else workload)


def _stored(store: Path, monkeypatch, commit: str = SHA_A, minutes: int = 0, **report_args) -> Path:
    return append(store, _record(_report(**report_args), commit, T0 + timedelta(minutes=minutes),
                                 monkeypatch=monkeypatch))


def test_no_compare_asked_resolves_nothing(store):
    setup = _setup(store, ref=None, fail=None)
    assert setup.ref is None and setup.previous is None and setup.specs == []
    assert setup.comparison_text() is None


def test_an_empty_store_skips_the_compare_saying_why(store):
    setup = _setup(store, ref=None)  # --h2o-compare-fail alone compares with latest
    assert setup.ref == "latest" and setup.previous is None and setup.specs == [CompareSpec("h2o_lossy", 5.0)]
    assert setup.missing.startswith(f"no stored run of preset {PRESET!r} in {store} to compare with")
    assert "nothing to compare with: no stored run" in setup.comparison_text()


@pytest.mark.parametrize("ref, why", [
    ("deadbeef", "no stored run of commit 'deadbeef'"),
    ("yesterday", "'yesterday' is not 'latest', a commit sha prefix"),
    ("nowhere.json", "no history record file nowhere.json"),
])
def test_an_unknown_target_is_a_usage_error_listing_what_is_available(store, monkeypatch, ref, why):
    _stored(store, monkeypatch, SHA_A)
    _stored(store, monkeypatch, SHA_B, minutes=5)
    _stored(store, monkeypatch, SHA_C, minutes=9, fatal="boom", rows={n: {"error": "boom"} for n in CONFIGS})
    with pytest.raises(ValueError) as exc:
        _setup(store, ref)
    message = str(exc.value)
    assert message.startswith(f"--h2o-compare {ref}: {why}")
    assert message.endswith(f"comparable runs in {store}, newest first: bbbbbbbb22 (2024-05-01 12:05:00 UTC), "
                            "aaaaaaaa11 (2024-05-01 12:00:00 UTC)")  # not the failed run


def test_a_file_that_is_no_record_is_a_usage_error(store, tmp_path):
    junk = tmp_path / "summary.json"
    junk.write_text('{"overall": {}}')
    with pytest.raises(ValueError, match=f"--h2o-compare {junk}: {junk}: no schema version .*; "
                                         f"{store} holds no run comparable with this one"):
        _setup(store, str(junk))
    with pytest.raises(ValueError, match="history store is off"):
        _setup(None, "deadbeef")


def test_an_explicit_target_that_is_not_comparable_is_a_usage_error_naming_the_difference(store, monkeypatch):
    path = _stored(store, monkeypatch, SHA_A, workload=_workload(sizes={CONFIGS[0]: [128, 32]}))
    old = append(store, _schema1(_record(_report(), SHA_B, T0, monkeypatch=monkeypatch)))
    with pytest.raises(ValueError, match=r"--h2o-compare aaaaaaaa: the stored run of commit 'aaaaaaaa', aaaaaaaa11 "
                                         r"\(.*\), is not comparable with this run: \[prompt, gen\] tokens of "
                                         r"keep0.30-lr3.0 differs: \[64, 32\] in this run, \[128, 32\] in the stored"):
        _setup(store, "aaaaaaaa")
    with pytest.raises(ValueError, match="not comparable with this run: \\[prompt, gen\\] tokens"):
        _setup(store, str(path))
    with pytest.raises(ValueError, match="recorded by an older pytest-h2o: total_ratio and the speed statistics"):
        _setup(None, str(old))


def test_latest_skips_incomplete_and_not_comparable_runs(store, monkeypatch):
    good = _stored(store, monkeypatch, SHA_A)
    _stored(store, monkeypatch, SHA_B, minutes=1, rows={CONFIGS[0]: _row(), CONFIGS[1]: {"error": "timeout"}})
    _stored(store, monkeypatch, SHA_B, minutes=2, workload=_workload(runtime="llm_bench"))
    append(store, _schema1(_record(_report(), SHA_B, T0 + timedelta(minutes=3), monkeypatch=monkeypatch)))
    setup = _setup(store)
    assert setup.previous is not None and setup.previous["_path"] == str(good)


def test_latest_with_no_comparable_run_skips_saying_why_the_newest_is_not(store, monkeypatch):
    _stored(store, monkeypatch, SHA_A, workload=_workload(model="tinyllama"))
    _stored(store, monkeypatch, SHA_B, minutes=1, workload=_workload(text_sha256="cd" * 32))
    setup = _setup(store)
    assert setup.previous is None
    assert setup.missing.startswith(f"no comparable stored run of preset {PRESET!r} in {store}: the newest, "
                                    "bbbbbbbb22 (2024-05-01 12:01:00 UTC), is not comparable with this run: "
                                    "text_sha256 differs: 'abab")


def test_finish_stores_measured_runs_only(store, tmp_path, monkeypatch):
    _pin(monkeypatch)
    setup = _setup(store, ref=None, fail=None)
    assert setup.finish(_report(fatal="OSError: no model", rows={n: {"error": "OSError: no model"} for n in CONFIGS}),
                        tmp_path) == []
    assert HistorySetup(store, Path(".")).finish(_report({n: {"error": "killed"} for n in CONFIGS}), tmp_path) == []
    assert not store.exists()
    [partial] = HistorySetup(store, Path(".")).finish(_report({CONFIGS[0]: _row(), CONFIGS[1]: {"error": "x"}}),
                                                      tmp_path)
    [full] = HistorySetup(store, Path(".")).finish(_report(), tmp_path)
    assert partial.parent == full.parent == store and len(load(store)) == 2
    assert json.loads(partial.read_text())["complete"] is False and json.loads(full.read_text())["complete"] is True


def test_finish_compares_and_a_missing_metric_fails(store, tmp_path, monkeypatch):
    row = _row()
    del row["h2o_fidelity_top1"]
    _stored(store, monkeypatch, SHA_A, rows={CONFIGS[0]: row, CONFIGS[1]: _row(lossy=2.0, decode=20.5)})
    _pin(monkeypatch)
    setup = _setup(store, fail="h2o_fidelity_top1:1%,h2o_lossy:5%")
    report = _report()
    bad = regressions(setup.compare(report, [CompareSpec("h2o_fidelity_top1", 1.0)]))  # what CompareItem runs
    assert [(c.config, c.note) for c in bad] == [(CONFIGS[0], "h2o_fidelity_top1 missing in the previous run")]
    assert not regressions(setup.compare(report, [CompareSpec("h2o_lossy", 5.0)]))
    written = setup.finish(report, tmp_path)
    assert written[0] == tmp_path / "comparison.md" and written[1].parent == store
    text = written[0].read_text()
    assert text.startswith("## Compared with aaaaaaaa11 (2024-05-01T12:00:00.123456+00:00, asked for latest)")
    assert "h2o_fidelity_top1 missing in the previous run" in text and "1 regression(s) beyond tolerance." in text


def test_a_workload_unknown_at_configure_time_is_checked_when_comparing(store, monkeypatch):
    _stored(store, monkeypatch, SHA_A)
    setup = HistorySetup.from_settings(store, "latest", "h2o_lossy:5%", PRESET, Path("."))
    assert setup.previous is not None
    [why] = setup.compare(_report(workload=_workload(threads=2)), setup.specs)
    assert why.regression and why.note == ("not comparable with the previous run: threads differs: 2 in this run, "
                                           "4 in the stored run")


def test_a_sensitivity_check_run_is_never_a_compare_target(store, monkeypatch):
    good = _stored(store, monkeypatch, SHA_A)
    injected = _report()
    injected["inject_slowdown"] = 0.1
    append(store, _record(injected, SHA_B, T0 + timedelta(minutes=1), monkeypatch=monkeypatch))
    setup = _setup(store)
    assert setup.previous is not None and setup.previous["_path"] == str(good)
    assert history.target_problem(load(store)[-1], PRESET, _workload()).startswith(
        "a sensitivity check (--h2o-inject-slowdown 0.1)")
