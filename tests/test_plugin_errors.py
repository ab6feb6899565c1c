"""Every plugin option, ini key and environment variable, given a bad value or a bad file, is a usage
error (exit 4) of one or two lines that names it, before anything is measured; never a traceback.
Runs in-process (pytester) with a tiny random-weight model, so each case takes milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pytest_h2o.session  # noqa: F401  - imported once here: in-process runs cannot import numpy a second time

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300}
PRESET = {"prompts": [32], "gens": [8], "repeat": 1, "h2o_keep_ratios": [0.5], "h2o_block_tokens": [4],
          "h2o_sink_tokens": [4], "h2o_recent_tokens": [8], "h2o_trigger_min_tokens": [16]}
FILES = {
    "model.json": json.dumps(TINY),
    "tiny.json": json.dumps(PRESET),
    "typo.json": json.dumps({**PRESET, "kv_lossless_fornt_n": 2}),
    "typed.json": json.dumps({**PRESET, "kv_h2o_enable": "yes"}),
    "listed.json": json.dumps([1, 2]),
    "broken.json": "{not json",
    "heads.json": json.dumps({**TINY, "num_key_value_heads": 3}),
    "odd.json": json.dumps({**TINY, "hidden_size": 36, "num_attention_heads": 4}),
    "garbage.bin": bytes(range(256)) * 4,
    "truncated.gguf": b"GGUF" + bytes(60),
    "file": "",
}
BASE = ("--h2o-preset=tiny.json", "--h2o-model=model.json")


def case(*args: str, culprit: str, env: dict[str, str] | None = None, ini: str = "") -> pytest.param:
    return pytest.param(args, culprit, env or {}, ini, id=" ".join(args) or f"env {env} ini {ini!r}")


CASES = [
    # the preset
    case("--h2o-preset=missing.json", "--h2o-model=model.json", culprit="missing.json"),
    case("--h2o-preset=folder", "--h2o-model=model.json", culprit="folder"),
    case("--h2o-preset=garbage.bin", "--h2o-model=model.json", culprit="garbage.bin"),
    case("--h2o-preset=broken.json", "--h2o-model=model.json", culprit="broken.json"),
    case("--h2o-preset=listed.json", "--h2o-model=model.json", culprit="listed.json"),
    case("--h2o-preset=typo.json", "--h2o-model=model.json", culprit="kv_lossless_front_n"),
    case("--h2o-preset=typed.json", "--h2o-model=model.json", culprit="kv_h2o_enable"),
    # the model
    case("--h2o-preset=tiny.json", "--h2o-model=missing.gguf", culprit="--h2o-model missing.gguf"),
    case("--h2o-preset=tiny.json", "--h2o-model=garbage.bin", culprit="garbage.bin"),
    case("--h2o-preset=tiny.json", "--h2o-model=broken.json", culprit="broken.json"),
    case("--h2o-preset=tiny.json", "--h2o-model=heads.json", culprit="num_key_value_heads"),
    case("--h2o-preset=tiny.json", "--h2o-model=odd.json", culprit="head"),
    case("--h2o-preset=tiny.json", "--h2o-model=truncated.gguf", culprit="--h2o-model truncated.gguf: a truncated"),
    case("--h2o-preset=tiny.json", "--h2o-model=folder", culprit="--h2o-model folder: a folder"),
    # where reports go, what is read
    case(*BASE, "--h2o-out=file", culprit="--h2o-out"),
    case(*BASE, "--h2o-out=file/sub", culprit="--h2o-out"),
    case(*BASE, "--h2o-text-file=missing.txt", culprit="--h2o-text-file"),
    case(*BASE, "--h2o-text-file=folder", culprit="--h2o-text-file"),
    case(*BASE, "--h2o-text-file=garbage.bin", culprit="--h2o-text-file"),
    case(*BASE, "--h2o-kv-dumps=missing", culprit="--h2o-kv-dumps"),
    case(*BASE, "--h2o-logs=missing", culprit="--h2o-logs"),
    # a separate value that is an existing path outside the project would move pytest's rootdir
    case(*BASE, "--h2o-logs", "..", culprit="write --h2o-logs=.."),
    case(*BASE, "--h2o-llm-bench=no-such-binary", "--h2o-base-config=model.json", culprit="--h2o-llm-bench"),
    case(*BASE, "--h2o-base-config=model.json", culprit="--h2o-base-config"),
    # numbers and choices
    case(*BASE, "--h2o-threads=0", culprit="--h2o-threads"),
    case(*BASE, "--h2o-threads=two", culprit="--h2o-threads"),
    case(*BASE, "--h2o-gate-mode=jointly", culprit="--h2o-gate-mode"),
    case(*BASE, "--h2o-lossy-target=three", culprit="--h2o-lossy-target"),
    case(*BASE, "--h2o-lossless-target=nan", culprit="--h2o-lossless-target"),
    case(*BASE, "--h2o-decode-drop-target=5", culprit="--h2o-decode-drop-target"),
    case(*BASE, "--h2o-decode-baseline=inf", culprit="--h2o-decode-baseline"),
    case(*BASE, "--h2o-rounds=0", culprit="--h2o-rounds"),
    case(*BASE, "--h2o-rounds=5", "--h2o-max-rounds=3", culprit="--h2o-max-rounds"),
    case(*BASE, "--h2o-undecided=maybe", culprit="--h2o-undecided"),
    case(*BASE, "--h2o-inject-slowdown=11", culprit="--h2o-inject-slowdown"),
    case(*BASE, "--h2o-require-runtime-decomp=perhaps", culprit="--h2o-require-runtime-decomp"),
    case(*BASE, "--h2o-min-top1=x", culprit="--h2o-min-top1"),
    case(*BASE, "--h2o-max-ppl-delta=x", culprit="--h2o-max-ppl-delta"),
    case(*BASE, "--h2o-max-queue-peak=x", culprit="--h2o-max-queue-peak"),
    case(*BASE, "--h2o-max-fallback=x", culprit="--h2o-max-fallback"),
    case(*BASE, "--h2o-runtime-mode=fast", culprit="kv_lossless_runtime_mode"),
    case(*BASE, "--h2o-scope=everything", culprit="kv_lossless_scope"),
    case(*BASE, "--h2o-kept-sample-layers=x", culprit="--h2o-kept-sample-layers"),
    case(*BASE, "--h2o-kept-sample-token-interval=x", culprit="--h2o-kept-sample-token-interval"),
    # history
    case(*BASE, "--h2o-compare=no-such-commit", culprit="no-such-commit"),
    case(*BASE, "--h2o-compare", "folder", culprit="--h2o-compare folder"),
    case(*BASE, "--h2o-compare-fail=h2o_lossy", culprit="h2o_lossy"),
    case(*BASE, "--h2o-compare-fail=nosuchmetric:5%", culprit="nosuchmetric"),
    # the same settings from the environment and the ini file name where they came from
    case(*BASE, env={"LOSSY_TARGET": "three"}, culprit="$LOSSY_TARGET='three': expected a number"),
    case(*BASE, env={"H2O_COMPARE_FAIL": "h2o_lossy"}, culprit="$H2O_COMPARE_FAIL"),
    case(*BASE, env={"H2O_THREADS": "-1"}, culprit="$H2O_THREADS"),
    case(*BASE, env={"KV_LOSSLESS_SCOPE": "all"}, culprit="kv_lossless_scope"),
    case(*BASE, ini="h2o_decode_drop_target = 1.5", culprit="ini h2o_decode_drop_target"),
    case(*BASE, ini="h2o_gate_mode = both", culprit="ini h2o_gate_mode"),
    case("--h2o-model=model.json", env={"H2O_PRESET": "missing.json"}, culprit="$H2O_PRESET: missing.json"),
    case("--h2o-model=model.json", ini="h2o_preset = broken.json", culprit="ini h2o_preset: "),
]


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    for name, content in FILES.items():
        path = pytester.path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    (pytester.path / "folder").mkdir()
    return pytester.path


@pytest.mark.parametrize("args,culprit,env,ini", CASES)
def test_a_bad_setting_is_a_short_usage_error_naming_it(pytester, project, monkeypatch, args, culprit, env, ini):
    pytester.makeini("[pytest]\nfilterwarnings = ignore::pytest.PytestAssertRewriteWarning\n" + ini + "\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = {p.name for p in project.iterdir()}
    result = pytester.runpytest(*args)
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, output
    assert "Traceback" not in output and "INTERNALERROR" not in output, output
    message = [line for line in result.errlines if line.strip()]
    assert 1 <= len(message) <= 2 and culprit in message[0], output
    assert {p.name for p in project.iterdir()} == before  # no run folder, no history, nothing measured
