"""``h2o-gate offline``: in process via ``main([...])`` and as the installed console script."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from h2o_test_helpers import write_standard_dump

from h2o_kernels.lossless.offline_eval import EvalOptions, evaluate
from pytest_h2o.cli.main import main
from pytest_h2o.cli.out_paths import OutPathError, check_out_dir, check_out_file

ORIGINAL_OPTIONS = (
    "--dump-dir", "--out-json", "--out-md", "--overwrite", "--stage", "--scope", "--front-n", "--layer-start",
    "--layer-end", "--layer-ids", "--zstd-level", "--strict-fp16", "--min-seq-len", "--max-seq-len",
    "--entry-mode", "--online-chunk-seq", "--online-framing-bytes", "--aggregate-by-stage", "--codec-mode",
    "--bitshuffle", "--adaptive-block-seq", "--k-hi-predictors", "--k-lo-predictors", "--v-hi-predictors",
    "--v-lo-predictors", "--verbose",
)


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory) -> Path:
    return write_standard_dump(tmp_path_factory.mktemp("cli-dump"))


def offline(dump_dir: Path, out_json: Path, *extra: str) -> int:
    return main(["offline", "--dump-dir", str(dump_dir), "--out-json", str(out_json), *extra])


def usage_error(capsys, argv: list[str]) -> str:
    """Run main, expect argparse's exit status 2, return stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_writes_the_json_report(dump_dir, tmp_path, capsys):
    out = tmp_path / "nested" / "report.json"
    assert offline(dump_dir, out, "--entry-mode", "aggregate", "--front-n", "3") == 0
    result = json.loads(out.read_text())
    direct = evaluate(dump_dir, EvalOptions(entry_mode="aggregate", front_n=3))
    for key in ("raw_bytes", "compressed_bytes", "k_compressed_bytes", "v_compressed_bytes",
                "weighted_lossless_ratio", "selected_layers", "per_layer", "aggregate_groups"):
        assert result[key] == direct[key], key
    assert result["roundtrip_verified"] is True
    stdout = capsys.readouterr().out
    assert "[h2o-gate offline]" in stdout and "ratio=" in stdout
    assert str(out) in stdout
    assert not (tmp_path / "nested" / "report.md").exists()


def test_options_reach_the_evaluator(dump_dir, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--stage", "prefill", "--scope", "layer_ids", "--layer-ids", "3, 1", "--zstd-level", "5",
            "--entry-mode", "chunked", "--online-chunk-seq", "10", "--online-framing-bytes", "8",
            "--adaptive-block-seq", "16", "--k-hi-predictors", "raw,delta_seq", "--v-lo-predictors", "xor_seq",
            "--predictor-choice", "exhaustive", "--plain-baseline", "--min-seq-len", "25", "--max-seq-len", "40"]
    assert offline(dump_dir, out, *argv) == 0
    result = json.loads(out.read_text())
    direct = evaluate(dump_dir, EvalOptions(
        stage="prefill", scope="layer_ids", layer_ids=(3, 1), zstd_level=5, entry_mode="chunked",
        online_chunk_seq=10, online_framing_bytes=8, adaptive_block_seq=16, k_hi_predictors="raw,delta_seq",
        v_lo_predictors="xor_seq", predictor_choice="exhaustive", plain_baseline=True, min_seq_len=25,
        max_seq_len=40))
    assert result["layer_ids"] == [1, 3] and result["selected_layers"] == [1, 3]
    assert result["k_hi_predictors"] == ["raw", "delta_seq"] and result["v_lo_predictors"] == ["xor_seq"]
    for key in ("compressed_bytes", "raw_bytes", "plain_zstd_ratio", "online_chunks", "k_chunk_meta_bytes",
                "codec_mode", "zstd_level", "adaptive_block_seq", "selected_entries"):
        assert result[key] == direct[key], key


def test_layer_range_and_strict_fp16_flags(dump_dir, tmp_path):
    out = tmp_path / "r.json"
    assert offline(dump_dir, out, "--scope", "layer_range", "--layer-start", "1", "--layer-end", "2",
                   "--strict-fp16", "--aggregate-by-stage", "--entry-mode", "aggregate") == 0
    result = json.loads(out.read_text())
    assert result["selected_layers"] == [1, 2]
    assert result["aggregate_by_stage"] is True and result["aggregate_groups"] == 4


def test_writes_markdown_with_out_md(dump_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "md" / "r.md"
    assert offline(dump_dir, out, "--out-md", str(md), "--plain-baseline") == 0
    text = md.read_text()
    result = json.loads(out.read_text())
    assert text.startswith("# H2O v4 Offline Lossless Summary\n")
    assert f"{result['weighted_lossless_ratio']:.4f}" in text
    assert "Plain split planes + zstd" in text
    assert "| 0 |" in text and "| 1 |" in text  # per-layer rows


@pytest.mark.parametrize("which", ["json", "md"])
def test_refuses_to_overwrite_without_flag(dump_dir, tmp_path, capsys, which):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    existing = out if which == "json" else md
    existing.write_text("keep me")
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(out), "--out-md", str(md)])
    assert "already exists" in err and str(existing) in err and "--overwrite" in err
    assert existing.read_text() == "keep me"
    assert offline(dump_dir, out, "--out-md", str(md), "--overwrite") == 0
    assert json.loads(out.read_text())["selected_entries"] == 4
    assert md.read_text().startswith("# H2O")


@pytest.mark.parametrize("value", ["1,x", "one", "1;2", "1.5"])
def test_bad_layer_ids(dump_dir, tmp_path, capsys, value):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               "--scope", "layer_ids", "--layer-ids", value])
    assert "--layer-ids" in err
    assert not (tmp_path / "r.json").exists()


def test_empty_layer_ids_with_layer_ids_scope(dump_dir, tmp_path, capsys):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               "--scope", "layer_ids"])
    assert "--layer-ids" in err


@pytest.mark.parametrize("option", ["--k-hi-predictors", "--k-lo-predictors", "--v-hi-predictors",
                                    "--v-lo-predictors"])
def test_bad_predictor_name_names_the_option(dump_dir, tmp_path, capsys, option):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               option, "raw,delta_sequence"])
    assert option in err and "delta_sequence" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["--entry-mode", "streaming"], "--entry-mode"),
    (["--stage", "generate"], "--stage"),
    (["--scope", "everything"], "--scope"),
    (["--front-n", "two"], "--front-n"),
    (["--front-n", "0"], "--front-n"),
    (["--adaptive-block-seq", "0"], "--adaptive-block-seq"),
    (["--online-framing-bytes", "-1"], "--online-framing-bytes"),
    (["--predictor-choice", "best"], "--predictor-choice"),
])
def test_other_usage_errors(dump_dir, tmp_path, capsys, argv, fragment):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               *argv])
    assert fragment in err


@pytest.mark.parametrize("missing", ["--dump-dir", "--out-json"])
def test_required_options(dump_dir, tmp_path, capsys, missing):
    argv = {"--dump-dir": str(dump_dir), "--out-json": str(tmp_path / "r.json")}
    del argv[missing]
    err = usage_error(capsys, ["offline", *[x for kv in argv.items() for x in kv]])
    assert missing in err


def test_no_subcommand_is_a_usage_error(capsys):
    usage_error(capsys, [])
    usage_error(capsys, ["no-such-command"])


@pytest.mark.parametrize("argv,fragment", [
    (["--scope", "layer_ids", "--layer-ids", "42"], "layer_ids"),
    (["--stage", "decode", "--min-seq-len", "100"], "--min-seq-len"),
])
def test_empty_selection_exits_1_with_a_message(dump_dir, tmp_path, capsys, argv, fragment):
    out = tmp_path / "r.json"
    assert offline(dump_dir, out, *argv) == 1
    err = capsys.readouterr().err
    assert "no entries selected" in err and fragment in err
    assert not out.exists()


def test_empty_directory_exits_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert offline(tmp_path / "empty", tmp_path / "r.json") == 1
    assert "no meta_" in capsys.readouterr().err


def test_skipped_entries_are_reported_on_stderr(dump_dir, tmp_path, capsys):
    work = Path(shutil.copytree(dump_dir, tmp_path / "dump"))
    for i in range(7):
        (work / f"meta_broken{i}.json").write_text("{")
    assert offline(work, tmp_path / "r.json") == 0
    err = capsys.readouterr().err
    assert err.count("skipped meta_parse_error") == 5 and "2 more skipped" in err
    assert json.loads((tmp_path / "r.json").read_text())["skip_reasons"] == {"meta_parse_error": 7}
    assert offline(work, tmp_path / "r2.json", "--verbose") == 0
    captured = capsys.readouterr()
    assert captured.err.count("skipped meta_parse_error") == 7
    assert "layer 0:" in captured.out and "layer 1:" in captured.out


def test_help_lists_the_original_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["offline", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ORIGINAL_OPTIONS:
        assert option in text, option


# --- the installed console script ----------------------------------------------------------------


def _script() -> str:
    path = Path(sys.executable).with_name("h2o-gate")
    found = str(path) if path.exists() else shutil.which("h2o-gate")
    if not found:
        pytest.fail("the h2o-gate console script is not installed next to this interpreter or on PATH")
    return found


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([_script(), *args], capture_output=True, text=True, timeout=300, env=env, check=False)


def test_console_script_runs_offline(dump_dir, tmp_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    proc = run_script("offline", "--dump-dir", str(dump_dir), "--out-json", str(out), "--out-md", str(md),
                      "--entry-mode", "chunked_grouped", "--online-chunk-seq", "16")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["entry_mode"] == "chunked_grouped" and result["roundtrip_verified"] is True
    assert md.exists()
    assert "[h2o-gate offline]" in proc.stdout
    again = run_script("offline", "--dump-dir", str(dump_dir), "--out-json", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_console_script_help_and_errors(dump_dir, tmp_path):
    help_proc = run_script("offline", "--help")
    assert help_proc.returncode == 0
    for option in ORIGINAL_OPTIONS:
        assert option in help_proc.stdout, option
    bad = run_script("offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                     "--v-hi-predictors", "bogus")
    assert bad.returncode == 2 and "--v-hi-predictors" in bad.stderr
    empty = run_script("offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                       "--scope", "layer_ids", "--layer-ids", "99")
    assert empty.returncode == 1 and "no entries selected" in empty.stderr
    assert not (tmp_path / "r.json").exists()


# --- output locations, numbers and help: checked before any work -----------------------------------

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "rope_theta": 10000.0}
MISSING_MODEL = "no-such-model.gguf"  # a run that got past the checks would stop here with exit 1
COMMANDS = ("offline", "kv-dump", "bench", "sweep", "parse-log", "analyze", "full-eval", "history", "fidelity")


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file where a folder is expected."""
    path = tmp_path / "blocker"
    path.write_text("a file\n")
    return path


def test_check_out_file_and_dir(tmp_path, blocker):
    assert check_out_file(tmp_path / "new" / "deeper" / "r.json", "--x") == tmp_path / "new" / "deeper" / "r.json"
    assert check_out_file(blocker, "--x") == blocker  # overwriting a file is the caller's decision
    assert check_out_dir(tmp_path / "new" / "dir", "--x") == tmp_path / "new" / "dir"
    assert check_out_dir(tmp_path, "--x") == tmp_path
    with pytest.raises(OutPathError, match=r"^--x .*blocker/sub/r\.json: .*blocker is a file, not a folder"):
        check_out_file(blocker / "sub" / "r.json", "--x")
    with pytest.raises(OutPathError, match="is a folder; expected a file path"):
        check_out_file(tmp_path, "--x")
    with pytest.raises(OutPathError, match="is a file, not a folder"):
        check_out_dir(blocker, "--x")
    with pytest.raises(OutPathError, match="blocker is a file, not a folder"):
        check_out_dir(blocker / "d", "--x")
    assert issubclass(OutPathError, ValueError)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_folders_are_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutPathError, match="permission denied"):
            check_out_file(locked / "r.json", "--x")
        with pytest.raises(OutPathError, match="not writable"):
            check_out_dir(locked, "--x")
        err = usage_error(capsys, ["bench", "-m", MISSING_MODEL, "-fp", str(locked / "b.log")])
        assert "-fp" in err and "permission denied" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("argv,fragment", [
    (["--out-json", "{blocker}/r.json"], "--out-json {blocker}/r.json"),
    (["--out-json", "{tmp}"], "--out-json {tmp}: is a folder"),
    (["--out-json", "{tmp}/r.json", "--out-md", "{blocker}/md/r.md"], "--out-md {blocker}/md/r.md"),
    (["--out-json", "{tmp}/r.json", "--out-md", "{tmp}/r.json"], "the same file as --out-json"),
])
def test_offline_outputs_are_checked_before_evaluating(dump_dir, tmp_path, blocker, capsys, monkeypatch, argv,
                                                       fragment):
    monkeypatch.setattr("pytest_h2o.cli.offline.evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    names = {"blocker": blocker, "tmp": tmp_path}
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), *[a.format(**names) for a in argv]])
    assert fragment.format(**names) in err
    assert len(err.strip().splitlines()) == 2


def test_offline_dump_dir_must_be_a_folder(tmp_path, blocker, capsys):
    for path in (tmp_path / "missing", blocker):
        err = usage_error(capsys, ["offline", "--dump-dir", str(path), "--out-json", str(tmp_path / "r.json")])
        assert f"--dump-dir {path}: not a folder" in err


@pytest.mark.parametrize("out", ["{blocker}", "{blocker}/dump"])
def test_kv_dump_out_is_checked_before_the_model(blocker, capsys, out):
    out = out.format(blocker=blocker)
    err = usage_error(capsys, ["kv-dump", "-m", MISSING_MODEL, "--out", out])
    assert f"--out {out}" in err and "not a folder" in err


@pytest.mark.parametrize("argv,fragment", [
    (["-fp", "{blocker}/logs/b.log"], "-fp {blocker}/logs/b.log: "),
    (["-fp", "{tmp}"], "-fp {tmp}: is a folder"),
    (["-fp", "{tmp}/b.json"], "its JSON twin would be the same file"),
    (["-fp", "{tmp}/twin.log"], "-fp (its JSON twin) {tmp}/twin.json: is a folder"),
    (["--dump-kv", "{blocker}"], "--dump-kv {blocker}: is a file"),
    (["--text-file", "{tmp}"], "--text-file {tmp}: cannot read"),
])
def test_bench_outputs_and_text_are_checked_before_the_model(tmp_path, blocker, capsys, argv, fragment):
    (tmp_path / "twin.json").mkdir()
    names = {"blocker": blocker, "tmp": tmp_path}
    err = usage_error(capsys, ["bench", "-m", MISSING_MODEL, *[a.format(**names) for a in argv]])
    assert fragment.format(**names) in err


@pytest.mark.parametrize("command,argv,option", [
    ("bench", ["-t", "0"], "-t/--threads"),
    ("bench", ["-t", "-2"], "-t/--threads"),
    ("bench", ["-p", "0"], "-p/--prompt-tokens"),
    ("bench", ["-p", "-5"], "-p/--prompt-tokens"),
    ("bench", ["-n", "-1"], "-n/--gen-tokens"),
    ("bench", ["-rep", "0"], "-rep/--repeat"),
    ("bench", ["-rep", "two"], "-rep/--repeat"),
    ("kv-dump", ["--out", "x", "-p", "1"], "-p/--prompt-tokens"),
    ("kv-dump", ["--out", "x", "-n", "-1"], "-n/--gen-tokens"),
    ("kv-dump", ["--out", "x", "-t", "0"], "-t/--threads"),
    ("sweep", ["--preset", "target_ratio.json", "--out-dir", "x", "--threads", "0"], "--threads"),
    ("sweep", ["--preset", "target_ratio.json", "--out-dir", "x", "--attention-option", "-1"], "--attention-option"),
    ("offline", ["--front-n", "0"], "--front-n"),
    ("offline", ["--layer-start", "-1"], "--layer-start"),
    ("offline", ["--layer-end", "-2"], "--layer-end"),
    ("offline", ["--zstd-level", "23"], "--zstd-level"),
    ("offline", ["--zstd-level", "0"], "--zstd-level"),
    ("offline", ["--min-seq-len", "-1"], "--min-seq-len"),
    ("offline", ["--max-seq-len", "-1"], "--max-seq-len"),
    ("offline", ["--online-chunk-seq", "-1"], "--online-chunk-seq"),
    ("offline", ["--online-framing-bytes", "-8"], "--online-framing-bytes"),
    ("offline", ["--adaptive-block-seq", "0"], "--adaptive-block-seq"),
])
def test_numeric_options_are_range_checked(dump_dir, tmp_path, capsys, command, argv, option):
    base = {"bench": ["-m", MISSING_MODEL], "kv-dump": ["-m", MISSING_MODEL], "sweep": ["-m", MISSING_MODEL],
            "offline": ["--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json")]}[command]
    err = usage_error(capsys, [command, *base, *argv])
    assert f"argument {option}: expected an integer" in err and argv[-1] in err
    assert not (tmp_path / "r.json").exists()


def test_bench_refuses_a_misspelled_or_mistyped_key_before_loading_the_model(tmp_path, capsys):
    config = tmp_path / "kv.json"
    config.write_text(json.dumps({"kv_h2o_enabel": True}))
    err = usage_error(capsys, ["bench", "-m", MISSING_MODEL, "-c", str(config)])
    assert str(config) in err and "'kv_h2o_enabel'" in err and "'kv_h2o_enable'" in err
    config.write_text(json.dumps({"kv_lossless_front_n": 2.5}))
    err = usage_error(capsys, ["bench", "-m", MISSING_MODEL, "-c", str(config)])
    assert "kv_lossless_front_n" in err and "integer" in err


@pytest.mark.parametrize("command", ["bench", "kv-dump"])
def test_a_run_too_large_for_memory_is_a_usage_error_before_running(tmp_path, capsys, command):
    model = tmp_path / "config.json"
    model.write_text(json.dumps(TINY))
    out = ["--out", str(tmp_path / "kv")] if command == "kv-dump" else []
    err = usage_error(capsys, [command, "-m", str(model), "-p", "5000000", "-n", "1", *out])
    assert "-p/-n: 5000000 prompt + 1 generated tokens" in err
    assert not (tmp_path / "kv").exists()


def test_usage_errors_are_two_lines(capsys):
    err = usage_error(capsys, ["bench", "-t", "0"])
    assert err.splitlines() == ["h2o-gate bench: error: argument -t/--threads: expected an integer >= 1, got 0",
                                "see 'h2o-gate bench --help' for the options"]


def help_text(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_each_default_once(capsys, command):
    text = help_text(capsys, command)
    assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\)\s*\(default", text), text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("command,shown", [
    ("offline", ["--entry-mode {per_meta,aggregate,chunked,chunked_grouped} unit of", "(default: per_meta)",
                 "(default: both)", "(default: 16)", "(default: 3)"]),
    ("kv-dump", ["(default: smollm2)", "(default: 512)", "(default: 128)", "(default: 1)"]),
    ("bench", ["(default: 512)", "(default: 128)", "discarded warm-up (default: 3)", "(default: 1)"]),
    ("sweep", ["(default: cpu)", "(default: smollm2)", "(default: 0)"]),
])
def test_help_shows_the_defaults_of_the_own_subcommands(capsys, command, shown):
    text = help_text(capsys, command)
    for fragment in shown:
        assert fragment in text, fragment


# --- codec profiles, RoPE, worker threads, start-up ---------------------------------------------------


def test_ratio_profile_through_the_cli(dump_dir, tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--codec", "ratio", "--rope-theta", "10000", "--entry-mode", "chunked_grouped", "--online-chunk-seq",
            "16", "--jobs", "1", "--out-md", str(md)]
    assert offline(dump_dir, out, *argv) == 0
    result = json.loads(out.read_text())
    direct = evaluate(dump_dir, EvalOptions(codec="ratio", rope_theta=10000.0, entry_mode="chunked_grouped",
                                            online_chunk_seq=16))
    for key in ("codec_profile", "codec_version", "compressed_bytes", "k_blob_versions", "rope_theta", "rope_groups"):
        assert result[key] == direct[key], key
    assert result["codec_profile"] == "ratio" and result["rope_groups"] == 2
    assert " ratio v2 " in capsys.readouterr().out
    text = md.read_text()
    assert "- Codec profile: `ratio`" in text and "RoPE from --rope-theta 10000" in text


@pytest.mark.parametrize("argv, named", [
    (["--codec-mode", "legacy"], "--codec-mode legacy applies"),
    (["--k-hi-predictors", "raw"], "--k-hi-predictors applies"),
    (["--predictor-choice", "exhaustive", "--adaptive-block-seq", "16"],
     "--predictor-choice, --adaptive-block-seq apply"),
])
def test_fast_only_options_with_ratio_are_usage_errors(dump_dir, tmp_path, capsys, argv, named):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               "--codec", "ratio", *argv])
    assert f"--codec ratio: {named} to the fast profile only" in err and "use --codec fast" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--jobs", "0"], "--jobs: expected an integer >= 1"),
    (["--codec", "best"], "--codec: invalid choice"),
    (["--codec", "ratio", "--rope-theta", "1"], "--rope-theta: RoPE theta must be a finite number > 1"),
    (["--codec", "ratio", "--rope-theta", "nan"], "--rope-theta: RoPE theta must be a finite number > 1"),
    (["--rope-theta", "100000"], "--rope-theta applies to --codec ratio only"),
    (["--rope-theta", "fast"], "--rope-theta: invalid float value"),
])
def test_codec_and_jobs_usage_errors(dump_dir, tmp_path, capsys, argv, fragment):
    err = usage_error(capsys, ["offline", "--dump-dir", str(dump_dir), "--out-json", str(tmp_path / "r.json"),
                               *argv])
    assert fragment in err


def test_jobs_do_not_change_the_json(dump_dir, tmp_path, monkeypatch):
    from h2o_kernels.lossless import offline_eval

    monkeypatch.setattr(offline_eval, "_WAVE_BYTES", 1)  # one wave per group: the threads share the work
    results = []
    for jobs in ("1", "2"):
        out = tmp_path / f"r{jobs}.json"
        assert offline(dump_dir, out, "--jobs", jobs, "--scope", "layer_range", "--layer-start", "0",
                       "--entry-mode", "chunked_grouped", "--online-chunk-seq", "8") == 0
        result = json.loads(out.read_text())
        assert result.pop("timing")["jobs"] == int(jobs)
        results.append({key: value for key, value in result.items() if not key.endswith(("_mb_s", "_s"))})
    assert results[0] == results[1]


def test_a_malformed_rope_theta_is_a_warning(dump_dir, tmp_path, capsys):
    work = Path(shutil.copytree(dump_dir, tmp_path / "dump"))
    bad = sorted(work.glob("meta_*layer000*.json"))[0]
    bad.write_text(json.dumps({**json.loads(bad.read_text()), "rope_theta": "ten thousand"}))
    assert offline(work, tmp_path / "r.json", "--codec", "ratio") == 0
    err = capsys.readouterr().err
    assert f"[WARN] {bad}: rope_theta 'ten thousand' is not a number" in err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["skipped_entries"] == 0 and len(result["warnings"]) == 1


HEAVY_MODULES = ("h2o_kernels.model", "h2o_kernels.runtimes", "h2o_presets", "h2o_kernels.fidelity",
                 "pytest_h2o.gate", "pytest_h2o.cli.bench", "pytest_h2o.cli.sweep", "pytest_h2o.cli.analyze",
                 "pytest_h2o.cli.history", "pytest_h2o.cli.fidelity", "pytest_h2o.cli.kv_dump", "jsonschema", "gguf",
                 "tokenizers", "matplotlib", "torch")


def test_offline_imports_only_its_own_modules(dump_dir, tmp_path):
    code = ("import sys; from pytest_h2o.cli.main import main; "
            f"status = main(['offline', '--dump-dir', {str(dump_dir)!r}, '--out-json', {str(tmp_path / 'r.json')!r}]); "
            "print(' '.join(sorted(sys.modules))); sys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.splitlines()[-1].split()
    assert "h2o_kernels.lossless.offline_eval" in loaded
    assert [name for name in loaded if name.startswith(HEAVY_MODULES)] == []


def test_top_level_help_lists_every_command(capsys):
    from pytest_h2o.cli.main import COMMANDS as TABLE

    assert tuple(TABLE) == COMMANDS
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, command in TABLE.items():
        assert f"{name} {command.help}" in text, name
