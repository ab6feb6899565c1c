"""The original kit's Python-side checks (seed README "Validation coverage", test_v4_runtime.sh steps 0, 4, 4.2,
4.5 and 5), written from their described behaviour and run against ``h2o-gate sweep`` and ``parse-log`` on a
tiny random-weight model: empty sweep, runtime lossless stats, the v4 strict runtime decode check, the lossy
reachability diagnosis and the grouped-step check."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_h2o.cli.main import main

TINY_MODEL = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": 300, "rope_theta": 10000.0}
LOSSY_TARGET = 3.2
# The original's runtime test settings (original-runtime.md §8.1) at 512 + 128 tokens, probe and full modes,
# lossless block 64 and 96 so that periodic windows happen in this short run.
PRESET = {"prompts": [512], "gens": [128], "repeat": 1, "h2o_keep_ratios": [0.3], "h2o_block_tokens": [32],
          "h2o_sink_tokens": [16], "h2o_recent_tokens": [64], "h2o_trigger_min_tokens": [384],
          "h2o_target_lossy_ratios": [LOSSY_TARGET], "h2o_log_stats": True, "kv_lossless_enable": True,
          "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_enable": True,
          "kv_lossless_runtime_mode": ["probe", "full"], "kv_lossless_block_tokens": [64, 96],
          "kv_lossless_hot_recent_tokens": 64}


def h2o_gate(*argv: str) -> subprocess.CompletedProcess:
    """``h2o-gate ARGV 2>&1``, as the original's scripts capture their tools."""
    return subprocess.run([sys.executable, "-m", "pytest_h2o.cli.main", *argv], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, check=False)


def parse_mean(cell: str | None) -> float:
    """The leading number of a ``mean ± sd`` cell, 0 when there is none (the original's checks)."""
    match = re.match(r"\s*([0-9eE.+-]+)", cell or "")
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """One sweep on the reference runtime with its stdout transcript (``bench_stdout.log``) and the parsed CSV."""
    out = tmp_path_factory.mktemp("compat")
    model = out / "config.json"
    model.write_text(json.dumps(TINY_MODEL))
    preset = out / "preset.json"
    preset.write_text(json.dumps(PRESET))
    done = h2o_gate("sweep", "--preset", str(preset), "--out-dir", str(out / "run"), "-m", str(model))
    (out / "run" / "bench_stdout.log").write_text(done.stdout)
    assert done.returncode == 0, done.stdout[-2000:]
    assert main(["parse-log", "--log-dir", str(out / "run" / "logs"), "--out-csv", str(out / "run" / "m.csv")]) == 0
    return out / "run"


def rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "m.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_step0_an_empty_sweep_is_rejected_with_the_originals_message(tmp_path):
    """Step 0 "[Fix 4]": a non-zero exit whose output contains "Empty sweep dimension"."""
    base = tmp_path / "base_config.json"
    base.write_text("{}\n")
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"h2o_keep_ratios": []}))
    done = h2o_gate("sweep", "--llm-bench", "./build/llm_bench", "--base-config", str(base), "--out-dir",
                    str(tmp_path), "--preset", str(preset), "--dry-run")
    assert done.returncode != 0 and "Empty sweep dimension" in done.stdout
    assert "Traceback" not in done.stdout and len(done.stdout.strip().splitlines()) <= 2


def test_step4_runtime_lossless_stats(sweep):
    """Step 4: at least one row with ``h2o_lossless_raw_mb > 0`` and ``h2o_lossless > 1.0``."""
    table = rows(sweep)
    assert table and any(parse_mean(r.get("h2o_lossless_raw_mb")) > 0 and parse_mean(r.get("h2o_lossless")) > 1.0
                         for r in table)


def test_step4_2_v4_strict_runtime_decode_check(sweep):
    """Step 4.2: a row with raw, compressed, encode and decode all above 0; the queue peak column is there."""
    table = rows(sweep)
    names = ("h2o_lossless_raw_mb", "h2o_lossless_comp_mb", "h2o_lossless_comp_us", "h2o_lossless_decomp_us")
    assert any(all(parse_mean(r.get(name)) > 0 for name in names) for r in table)
    assert all(parse_mean(r["h2o_lossless_queue_peak"]) >= 1 for r in table)


def test_step4_5_rows_reaching_the_lossy_target_are_not_flagged_unreachable(sweep):
    """Step 4.5: ceiling = 1 / max(h2o_floor_keep, h2o_quantized_keep) must reach the lossy target; the columns
    are fractions of the tokens seen at the last trigger, as the original's (its sample: 0.1891 and 0.3138)."""
    for r in rows(sweep):
        lossy, floor, quantized = (parse_mean(r[n]) for n in ("h2o_lossy", "h2o_floor_keep", "h2o_quantized_keep"))
        assert lossy >= LOSSY_TARGET
        assert 0.1 < floor < 0.25 and floor < quantized <= 1 / LOSSY_TARGET
        assert 1.0 / max(floor, quantized, 1e-9) + 1e-6 >= LOSSY_TARGET  # "OK", not "UNREACHABLE"


def grouped_step_verdict(lines: list[str], block_tokens: int) -> str:
    """Step 5 as described: FAIL on any 192-token window; PASS on one of ``block_tokens``; else FAIL when
    periodic lines (``updates >= 2``) exist, PASS when only bootstrap lines do."""
    tokens = [int(m.group(1)) for m in (re.search(r"\btokens=(\d+)\b", ln) for ln in lines) if m]
    updates = [int(m.group(1)) for m in (re.search(r"\bupdates=(\d+)\b", ln) for ln in lines) if m]
    if not lines or 192 in tokens:
        return "FAIL"
    if block_tokens in tokens:
        return "PASS"
    return "FAIL" if any(u >= 2 for u in updates) else "PASS"


def lossless_lines_by_run(transcript: str) -> dict[str, list[str]]:
    """The ``[H2O-LOSSLESS]`` lines of a sweep transcript, by the run id announced before them."""
    by_run: dict[str, list[str]] = {}
    current = ""
    for line in transcript.splitlines():
        announced = re.match(r"\[h2o-gate sweep\] \d+/\d+ (\S+)$", line)
        if announced:
            current = announced.group(1)
        elif "[H2O-LOSSLESS]" in line:
            by_run.setdefault(current, []).append(line)
    return by_run


def test_step5_grouped_step_windows_are_the_block_step_never_192(sweep):
    """Step 5 per run (the original sweeps one block size): ``[H2O-LOSSLESS]`` lines from the logs and the
    stdout transcript pass, and every periodic window (``updates >= 2``) is ``kv_lossless_block_tokens`` long."""
    by_run = lossless_lines_by_run((sweep / "bench_stdout.log").read_text())
    manifest = json.loads((sweep / "manifest.json").read_text())
    assert {m["kv_lossless_block_tokens"] for m in manifest} == {64, 96}
    for entry in manifest:
        block = entry["kv_lossless_block_tokens"]
        lines = by_run.get(entry["run_id"], []) + [ln for ln in Path(entry["log"]).read_text().splitlines()
                                                   if "[H2O-LOSSLESS]" in ln]
        assert grouped_step_verdict(lines, block) == "PASS", entry["run_id"]
        periodic = [ln for ln in lines if int(re.search(r"\bupdates=(\d+)", ln).group(1)) >= 2]
        assert periodic and all(f" tokens={block} " in ln for ln in periodic), entry["run_id"]
