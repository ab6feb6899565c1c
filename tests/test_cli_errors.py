"""Every ``h2o-gate`` subcommand fed bad values and bad files: never a traceback, a non-zero exit, and a
message naming the culprit (the option or the path). Each case is a subprocess on tiny inputs (a random-
weight model config, a tiny dump, a tiny preset), so none loads a real model or runs for long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from h2o_test_helpers import write_standard_dump

from h2o_gates.log_parse import parse_logs, write_csv

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}
PRESET = {"prompts": [16], "gens": [4], "repeat": 1, "h2o_keep_ratios": [0.5]}
LOG = ("| model | llm_demo | speed(tok/s) | h2o_keep |\n| --- | --- | --- | ---: |\n"
       "| tiny | prompt=16<br>decode=4 | 100.00 ± 1.00<br>10.00 ± 0.10 | 0.5000 ± 0.0000 |\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Named inputs: good ones to pair with one bad value, and the bad files themselves."""
    root = tmp_path_factory.mktemp("cli-errors")
    names = ("missing", "folder", "empty_dir", "garbage.bin", "empty.json", "bad.json", "list.json", "file",
             "tiny.json", "preset.json", "typo.json", "typed.json", "dump", "logs", "store", "run", "twin.log",
             "runs.csv")
    paths = {name: root / name for name in names}
    for name in ("folder", "empty_dir", "store"):
        paths[name].mkdir()
    (root / "twin.json").mkdir()  # where the JSON twin of -fp twin.log would go
    paths["garbage.bin"].write_bytes(bytes(range(256)) * 4)
    paths["empty.json"].write_text("")
    paths["bad.json"].write_text("{not json")
    paths["list.json"].write_text("[1, 2]")
    paths["file"].write_text("a regular file\n")
    paths["tiny.json"].write_text(json.dumps(TINY))
    paths["preset.json"].write_text(json.dumps(PRESET))
    paths["typo.json"].write_text(json.dumps({**PRESET, "kv_lossless_front_n": "2"}))
    paths["typed.json"].write_text(json.dumps({"kv_h2o_enable": 1}))
    write_standard_dump(paths["dump"])
    paths["logs"].mkdir()
    (paths["logs"] / "a.log").write_text(LOG)
    write_csv(parse_logs([paths["logs"] / "a.log"]), paths["runs.csv"])
    (paths["store"] / "broken.json").write_bytes(bytes(range(256)))
    (paths["run"] / "logs").mkdir(parents=True)
    (paths["run"] / "logs" / "a.log").write_text(LOG)
    return paths


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "H2O_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "pytest_h2o.cli.main", *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd, check=False)


def expand(argv: tuple[str, ...], files: dict[str, Path]) -> list[str]:
    """``{name}`` in an argument becomes that file's path."""
    return [arg.format(**{k.replace(".", "_"): v for k, v in files.items()}) for arg in argv]


def case(command: str, *argv: str, culprit: str, rc: int | None = None, marks=()) -> pytest.param:
    """One bad invocation; ``culprit`` (formatted like argv) must appear in the output. ``rc``: the exit
    status (default: 2 for this project's own subcommands, any non-zero for the others)."""
    rc = 2 if rc is None and command in OWN else rc
    return pytest.param(command, argv, culprit, rc, id=f"{command}:{' '.join(argv)}", marks=marks)


OWN = {"offline", "kv-dump", "bench", "sweep", "parse-log", "analyze", "full-eval", "history"}  # exit 2
OFFLINE = ("--dump-dir", "{dump}", "--out-json", "{fresh}/r.json")
KV_DUMP = ("-m", "{tiny_json}", "-p", "8", "-n", "2")
BENCH = ("-m", "{tiny_json}", "-p", "8", "-n", "2", "-rep", "1", "--no-fidelity")
SWEEP = ("--preset", "{preset_json}", "--out-dir", "{fresh}/sweep", "--dry-run")
ANALYZE_OUT = ("--out", "{fresh}/summary.md")

CASES = [
    # offline
    case("offline", "--dump-dir", "{missing}", "--out-json", "{fresh}/r.json", culprit="--dump-dir"),
    case("offline", "--dump-dir", "{garbage_bin}", "--out-json", "{fresh}/r.json", culprit="{garbage_bin}"),
    case("offline", "--dump-dir", "{empty_dir}", "--out-json", "{fresh}/r.json", culprit="{empty_dir}", rc=1),
    case("offline", "--dump-dir", "{dump}", "--out-json", "{folder}", culprit="--out-json {folder}"),
    case("offline", "--dump-dir", "{dump}", "--out-json", "{file}/r.json", culprit="--out-json"),
    case("offline", *OFFLINE, "--out-md", "{file}/r.md", culprit="--out-md"),
    case("offline", *OFFLINE, "--front-n", "-1", culprit="--front-n"),
    case("offline", *OFFLINE, "--zstd-level", "99", culprit="--zstd-level"),
    case("offline", *OFFLINE, "--online-chunk-seq", "-5", culprit="--online-chunk-seq"),
    case("offline", *OFFLINE, "--entry-mode", "chunk", culprit="--entry-mode"),
    case("offline", *OFFLINE, "--layer-ids", "1,x", "--scope", "layer_ids", culprit="--layer-ids"),
    # kv-dump
    case("kv-dump", "-m", "{missing}", "--out", "{fresh}/kv", culprit="{missing}"),
    case("kv-dump", "-m", "{folder}", "--out", "{fresh}/kv", culprit="{folder}"),
    case("kv-dump", "-m", "{garbage_bin}", "--out", "{fresh}/kv", culprit="{garbage_bin}"),
    case("kv-dump", "-m", "{empty_json}", "--out", "{fresh}/kv", culprit="{empty_json}"),
    case("kv-dump", "-m", "{bad_json}", "--out", "{fresh}/kv", culprit="{bad_json}"),
    case("kv-dump", *KV_DUMP, "--out", "{file}", culprit="--out {file}"),
    case("kv-dump", *KV_DUMP, "--out", "{file}/kv", culprit="--out"),
    case("kv-dump", *KV_DUMP, "--out", "{fresh}/kv", "-p", "1", culprit="--prompt-tokens"),
    case("kv-dump", *KV_DUMP, "--out", "{fresh}/kv", "-n", "-1", culprit="--gen-tokens"),
    case("kv-dump", *KV_DUMP, "--out", "{fresh}/kv", "-t", "0", culprit="--threads"),
    case("kv-dump", *KV_DUMP, "--out", "{fresh}/kv", "--text-file", "{garbage_bin}", culprit="--text-file"),
    case("kv-dump", *KV_DUMP, "--out", "{fresh}/kv", "--text-file", "{folder}", culprit="--text-file"),
    # bench
    case("bench", *BENCH, "-c", "{missing}", culprit="-c {missing}"),
    case("bench", *BENCH, "-c", "{folder}", culprit="-c {folder}"),
    case("bench", *BENCH, "-c", "{garbage_bin}", culprit="-c {garbage_bin}"),
    case("bench", *BENCH, "-c", "{empty_json}", culprit="-c {empty_json}"),
    case("bench", *BENCH, "-c", "{bad_json}", culprit="-c {bad_json}"),
    case("bench", *BENCH, "-c", "{list_json}", culprit="-c {list_json}"),
    case("bench", *BENCH, "-c", "{typed_json}", culprit="kv_h2o_enable"),
    case("bench", *BENCH, "-t", "0", culprit="--threads"),
    case("bench", *BENCH, "-t", "-2", culprit="--threads"),
    case("bench", *BENCH, "-p", "0", culprit="--prompt-tokens"),
    case("bench", *BENCH, "-n", "-1", culprit="--gen-tokens"),
    case("bench", *BENCH, "-rep", "0", culprit="--repeat"),
    case("bench", *BENCH, "-rep", "three", culprit="--repeat"),
    case("bench", *BENCH, "-fp", "{file}/bench.log", culprit="-fp {file}/bench.log"),
    case("bench", *BENCH, "-fp", "{folder}", culprit="-fp {folder}"),
    case("bench", *BENCH, "-fp", "{fresh}/bench.json", culprit="-fp"),
    case("bench", *BENCH, "-fp", "{twin_log}", culprit="JSON twin"),
    case("bench", *BENCH, "--dump-kv", "{file}", culprit="--dump-kv {file}"),
    case("bench", *BENCH, "--text-file", "{garbage_bin}", culprit="--text-file {garbage_bin}"),
    case("bench", "-m", "{garbage_bin}", "-p", "8", "-n", "2", culprit="{garbage_bin}"),
    case("bench", "-m", "{folder}", "-p", "8", "-n", "2", culprit="{folder}"),
    # sweep
    case("sweep", "--preset", "{missing}", "--out-dir", "{fresh}/s", culprit="--preset {missing}"),
    case("sweep", "--preset", "{folder}", "--out-dir", "{fresh}/s", culprit="--preset {folder}"),
    case("sweep", "--preset", "{garbage_bin}", "--out-dir", "{fresh}/s", culprit="--preset {garbage_bin}"),
    case("sweep", "--preset", "{empty_json}", "--out-dir", "{fresh}/s", culprit="--preset {empty_json}"),
    case("sweep", "--preset", "{bad_json}", "--out-dir", "{fresh}/s", culprit="--preset {bad_json}"),
    case("sweep", "--preset", "{list_json}", "--out-dir", "{fresh}/s", culprit="{list_json}"),
    case("sweep", "--preset", "{typo_json}", "--out-dir", "{fresh}/s", "--dry-run", culprit="kv_lossless_front_n"),
    case("sweep", "--preset", "target_ratio_v9.json", "--out-dir", "{fresh}/s", culprit="target_ratio_v9.json"),
    case("sweep", *SWEEP[:2], "--out-dir", "{file}", "--dry-run", culprit="--out-dir {file}"),
    case("sweep", *SWEEP[:2], "--out-dir", "{file}/s", "--dry-run", culprit="--out-dir"),
    case("sweep", *SWEEP, "--threads", "0", culprit="--threads"),
    case("sweep", *SWEEP, "--attention-option", "-1", culprit="--attention-option"),
    # not a dry run: a dry run never calls llm_bench, so the original accepts a missing one there
    case("sweep", *SWEEP[:-1], "--llm-bench", "{missing}", "--base-config", "{tiny_json}", culprit="--llm-bench"),
    case("sweep", *SWEEP, "--llm-bench", sys.executable, "--base-config", "{garbage_bin}",
         culprit="--base-config {garbage_bin}"),
    case("sweep", *SWEEP, "--llm-bench", sys.executable, "--base-config", "{list_json}",
         culprit="--base-config {list_json}"),
    case("sweep", *SWEEP, "--llm-bench", sys.executable, culprit="--base-config"),
    case("sweep", *SWEEP, "--text-file", "{folder}", culprit="--text-file {folder}"),
    # parse-log
    case("parse-log", "--log-dir", "{missing}", "--out-csv", "{fresh}/r.csv", culprit="{missing}"),
    case("parse-log", "--log-dir", "{file}", "--out-csv", "{fresh}/r.csv", culprit="{file}"),
    case("parse-log", "--log-files", "{garbage_bin}", "--out-csv", "{fresh}/r.csv", culprit="{garbage_bin}"),
    case("parse-log", "--log-files", "{folder}", "--out-csv", "{fresh}/r.csv", culprit="{folder}"),
    case("parse-log", "--log-files", "{empty_json}", "--out-csv", "{fresh}/r.csv", culprit="{empty_json}"),
    case("parse-log", "--log-dir", "{logs}", "--out-csv", "{file}/r.csv", culprit="--out-csv"),
    case("parse-log", "--log-dir", "{logs}", "--out-csv", "{folder}", culprit="--out-csv"),
    # analyze
    case("analyze", "--csv", "{missing}", *ANALYZE_OUT, culprit="{missing}"),
    case("analyze", "--csv", "{folder}", *ANALYZE_OUT, culprit="{folder}"),
    case("analyze", "--csv", "{garbage_bin}", *ANALYZE_OUT, culprit="{garbage_bin}"),
    case("analyze", "--csv", "{empty_json}", *ANALYZE_OUT, culprit="{empty_json}"),
    case("analyze", "--csv", "{runs_csv}", "--offline-lossless-online-json", "{garbage_bin}", *ANALYZE_OUT,
         culprit="{garbage_bin}"),
    case("analyze", "--csv", "{runs_csv}", "--offline-lossless-online-json", "{list_json}", *ANALYZE_OUT,
         culprit="{list_json}"),
    # the original's fallback chain: a missing offline JSON is named in a [WARN] and the runtime ratio is gated
    case("analyze", "--csv", "{runs_csv}", "--offline-lossless-json", "{missing}", *ANALYZE_OUT,
         culprit="{missing}", rc=1),
    case("analyze", "--csv", "{runs_csv}", "--gate-mode", "jointly", *ANALYZE_OUT, culprit="--gate-mode"),
    case("analyze", "--csv", "{runs_csv}", "--lossy-target", "three", *ANALYZE_OUT, culprit="--lossy-target"),
    case("analyze", "--csv", "{runs_csv}", "--out", "{file}/summary.md", culprit="--out"),
    # full-eval
    case("full-eval", "--run-dir", "{missing}", "--kv-dumps", "{dump}", culprit="{missing}"),
    case("full-eval", "--run-dir", "{file}", "--kv-dumps", "{dump}", culprit="{file}"),
    case("full-eval", "--run-dir", "{run}", "--kv-dumps", "{missing}", culprit="{missing}"),
    case("full-eval", "--run-dir", "{run}", "--kv-dumps", "{garbage_bin}", culprit="{garbage_bin}"),
    case("full-eval", "--run-dir", "{run}", "--kv-dumps", "{dump}", "--online-chunk-seq", "-1",
         culprit="--online-chunk-seq"),
    case("full-eval", "--run-dir", "{run}", "--kv-dumps", "{dump}", "--adaptive-block-seq", "0",
         culprit="--adaptive-block-seq"),
    case("full-eval", "--run-dir", "{run}", "--kv-dumps", "{dump}", "--entry-mode", "chunky", culprit="--entry-mode"),
    # history
    case("history", "--store", "{missing}", culprit="{missing}"),
    case("history", "--store", "{garbage_bin}", culprit="{garbage_bin}"),
    case("history", "--store", "{store}", culprit="broken.json"),
    case("history", "--last", "0", "--store", "{store}", culprit="--last"),
    case("history", "--last", "-3", "--store", "{store}", culprit="--last"),
    case("history", "--last", "many", "--store", "{store}", culprit="--last"),
]


@pytest.mark.parametrize("command,argv,culprit,rc", CASES)
def test_bad_input_is_named_without_a_traceback(files, tmp_path, command, argv, culprit, rc):
    files = {**files, "fresh": tmp_path / "fresh"}  # outputs go to a folder of this case alone
    proc = run_cli(command, *expand(argv, files), cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == rc if rc is not None else proc.returncode != 0, output
    assert expand((culprit,), files)[0] in output, output
    # the message itself is one or two lines; a parse report ([WARN] and its indented lines) may precede it
    message = [line for line in proc.stderr.strip().splitlines() if not line.startswith(("[WARN]", "  "))]
    assert len(message) <= 2, proc.stderr


def test_every_subcommand_is_covered():
    assert {p.values[0] for p in CASES} == {"offline", "kv-dump", "bench", "sweep", "parse-log", "analyze",
                                            "full-eval", "history"}
