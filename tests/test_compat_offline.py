"""Drop-in compatibility of ``h2o-gate offline`` with the original ``offline_lossless_fp16.py`` (issue 10, §2):
its options and values, its skip reasons on really broken dumps, its markdown summary, and its own
"offline failure accounting" check (test_v4_runtime.sh, Step 0, "Fix 2") run against our command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from h2o_gates.reports import write_offline_markdown
from h2o_kernels.codec.fp16 import CODEC_NAME, FORMAT_VERSION, FP16Codec, decode
from h2o_kernels.lossless import offline_eval
from h2o_kernels.lossless.kvdump import iter_dump_files, read_meta
from h2o_kernels.lossless.offline_eval import EvalOptions, evaluate
from pytest_h2o.cli.main import main


def offline(dump_dir: Path, out_json: Path, *extra: str) -> int:
    return main(["offline", "--dump-dir", str(dump_dir), "--out-json", str(out_json), *extra])


def meta_path(dump_dir: Path, layer_id: int, stage: str) -> Path:
    [path] = [p for p in iter_dump_files(dump_dir) if f"_{stage}_layer{layer_id:03d}_" in p.name]
    return path


def edit_meta(path: Path, **changes) -> None:
    """Set (or, with the value ``...``, delete) keys of a meta file."""
    doc = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            doc.pop(key)
        else:
            doc[key] = value
    path.write_text(json.dumps(doc))


# --- options and codec modes -------------------------------------------------------------------------


@pytest.mark.parametrize("mode,extra", [
    ("aggregate", ["--aggregate-by-stage"]),  # run_full_eval.sh's upper bound
    ("chunked_grouped", ["--online-chunk-seq", "192", "--online-framing-bytes", "8"]),  # its online-sim
])
def test_the_original_full_eval_invocations_run(std_dir, tmp_path, mode, extra):
    out, md = tmp_path / "o.json", tmp_path / "o.md"
    argv = ["--scope", "front_n", "--front-n", "2", "--stage", "both", "--entry-mode", mode, *extra,
            "--codec-mode", "adaptive_v22", "--adaptive-block-seq", "64", "--zstd-level", "3", "--out-md", str(md)]
    assert offline(std_dir, out, *argv) == 0
    result = json.loads(out.read_text())
    assert result["codec_mode"] == "adaptive_v22"
    assert (result["codec"], result["codec_version"]) == (CODEC_NAME, FORMAT_VERSION)  # what actually ran
    assert result["bitshuffle"] is False and result["roundtrip_verified"] is True
    assert result["weighted_lossless_ratio"] == pytest.approx(result["raw_bytes"] / result["compressed_bytes"])
    assert md.read_text().startswith("# H2O v4 Offline Lossless Summary\n")


def test_adaptive_v22_is_our_default_codec(std_dir):
    assert EvalOptions().codec_mode == "adaptive_v22" and EvalOptions().bitshuffle is False
    default = evaluate(std_dir, EvalOptions())
    explicit = evaluate(std_dir, EvalOptions(codec_mode="adaptive_v22"))
    assert explicit["compressed_bytes"] == default["compressed_bytes"]
    assert explicit["codec_scheme"] == "a predictor per 64-token block, chosen by estimate"


def test_legacy_runs_the_fixed_predictors_over_whole_tensors(std_dir):
    result = evaluate(std_dir, EvalOptions(codec_mode="legacy", k_hi_predictors="raw"))  # predictors: ignored
    assert result["codec_mode"] == "legacy" and result["roundtrip_verified"] is True
    assert "hi delta_seq, lo raw" in result["codec_scheme"]
    tensors = result["selected_entries"]  # per_meta: one K and one V blob per entry, one block per plane
    for kind in ("k", "v"):
        assert result[f"{kind}_hi_predictors"] == ["delta_seq"] and result[f"{kind}_lo_predictors"] == ["raw"]
        assert result[f"{kind}_hi_mode_counts"] == {"delta_seq": tensors}
        assert result[f"{kind}_lo_mode_counts"] == {"raw": tensors}


def test_legacy_blobs_decode_bit_exactly(std_dir):
    codecs = [EvalOptions(codec_mode="legacy").encoder(kind) for kind in ("k", "v")]
    assert all(isinstance(c, FP16Codec) and not c.center and c.predictors == (("delta_seq",), ("raw",))
               for c in codecs)
    for path in iter_dump_files(std_dir):
        for codec, tensor in zip(codecs, read_meta(path).load()):
            assert np.array_equal(decode(codec.encode(tensor)).view(np.uint16), tensor.view(np.uint16))


def test_bitshuffle_is_refused_with_the_reason(std_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        offline(std_dir, tmp_path / "o.json", "--bitshuffle")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--bitshuffle: not supported" in err and "no bit-shuffle stage" in err and "unrecognized" not in err
    assert len(err.strip().splitlines()) <= 2 and not (tmp_path / "o.json").exists()
    with pytest.raises(ValueError, match="--bitshuffle"):
        evaluate(std_dir, EvalOptions(bitshuffle=True))


def test_unknown_codec_mode_names_the_choices(std_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        offline(std_dir, tmp_path / "o.json", "--codec-mode", "adaptive_v3")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--codec-mode" in err and "adaptive_v22" in err and "legacy" in err
    with pytest.raises(ValueError, match="--codec-mode"):
        evaluate(std_dir, EvalOptions(codec_mode="adaptive_v3"))


# --- the original's skip reasons, on really broken dumps ----------------------------------------------


@pytest.mark.parametrize("changes,reason", [
    ({"seq_len": "abc"}, "meta_invalid_numeric_fields"),
    ({"kv_heads": 1.5}, "meta_invalid_numeric_fields"),
    ({"layer_id": None}, "meta_invalid_numeric_fields"),
    ({"seq_len": 0}, "invalid_shape"),
    ({"head_dim": -8}, "invalid_shape"),
    ({"kv_heads": ...}, "invalid_shape"),  # a missing key takes the original's default, 0
    ({"k_file": ""}, "missing_k_or_v_file"),
    ({"v_file": ...}, "missing_k_or_v_file"),
    ({"k_file": 7}, "missing_k_or_v_file"),
    ({"v_file": "absent.bin"}, "missing_k_or_v_binary"),
    ({"bytes_per_elem": ...}, "unsupported_bytes_per_elem_0"),
])
def test_broken_meta_gets_the_original_reason(std_dir, work_dir, changes, reason):
    edit_meta(meta_path(work_dir, 1, "prefill"), **changes)
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {reason: 1} and result["skipped_entries"] == 1
    assert result["skipped"][0]["reason"] == reason and "layer001" in result["skipped"][0]["file"]
    assert result["selected_entries"] == 3
    assert result["raw_bytes"] < evaluate(std_dir, EvalOptions())["raw_bytes"]


@pytest.mark.parametrize("changes", [{"seq_len": 0}, {"k_file": ""}])
def test_a_broken_entry_outside_the_scope_is_filtered_not_skipped(std_dir, work_dir, changes):
    # the original filters by stage and layer before checking the shape and the file names
    edit_meta(meta_path(work_dir, 3, "prefill"), **changes)
    result = evaluate(work_dir, EvalOptions())  # front_n 2: layer 3 is out of scope
    assert result["skip_reasons"] == {}
    assert result["raw_bytes"] == evaluate(std_dir, EvalOptions())["raw_bytes"]


def test_bad_numbers_in_an_entry_of_another_stage_are_filtered(work_dir):
    edit_meta(meta_path(work_dir, 0, "decode"), seq_len="abc")
    assert evaluate(work_dir, EvalOptions(stage="prefill"))["skip_reasons"] == {}
    assert evaluate(work_dir, EvalOptions())["skip_reasons"] == {"meta_invalid_numeric_fields": 1}


def test_unparsable_meta_is_meta_parse_error(work_dir):
    (work_dir / "meta_cut.json").write_text('{"stage": "prefill", "layer_id": 0')
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"meta_parse_error": 1}


@pytest.mark.parametrize("mode", ["per_meta", "aggregate", "chunked", "chunked_grouped"])
def test_a_binary_of_the_wrong_size_is_compression_failed(std_dir, work_dir, mode):
    meta = json.loads(meta_path(work_dir, 1, "decode").read_text())
    k_file = work_dir / meta["k_file"]
    k_file.write_bytes(k_file.read_bytes()[:-4])
    result = evaluate(work_dir, EvalOptions(entry_mode=mode, online_chunk_seq=10))
    assert result["skip_reasons"] == {"compression_failed": 1}
    assert result["skipped"][0]["cause"] == "size_mismatch" and meta["k_file"] in result["skipped"][0]["detail"]


def test_a_binary_gone_before_it_is_read_is_binary_read_error(work_dir, monkeypatch):
    select = offline_eval._select

    def select_then_lose_a_file(dump_dir, options):
        selection = select(dump_dir, options)
        selection.entries[0].v_path.unlink()
        return selection

    monkeypatch.setattr(offline_eval, "_select", select_then_lose_a_file)
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"binary_read_error": 1}
    assert result["skipped"][0]["cause"] == "read_error"


def test_skipped_causes_are_printed(work_dir, tmp_path, capsys):
    meta = json.loads(meta_path(work_dir, 0, "prefill").read_text())
    (work_dir / meta["v_file"]).write_bytes(b"\0" * 6)
    assert offline(work_dir, tmp_path / "o.json") == 0
    assert "skipped compression_failed (size_mismatch):" in capsys.readouterr().err


# --- the original's "offline failure accounting" check (test_v4_runtime.sh, Step 0, Fix 2) -----------


def write_fix2_dump(root: Path) -> None:
    """The check's synthetic dump: one good 2x1x2 fp16 entry, one whose K/V files are half the size."""
    common = {"stage": "decode", "run_id": "fix2_unit", "layer_id": 0, "seq_len": 2, "kv_heads": 1, "head_dim": 2,
              "bytes_per_elem": 2}
    (root / "k_ok.bin").write_bytes(bytes(range(8)))
    (root / "v_ok.bin").write_bytes(bytes(range(8, 16)))
    (root / "k_bad.bin").write_bytes(bytes(range(4)))
    (root / "v_bad.bin").write_bytes(bytes(range(4, 8)))
    for name, seq_start in (("ok", 0), ("bad", 2)):
        meta = {**common, "seq_start": seq_start, "k_file": f"k_{name}.bin", "v_file": f"v_{name}.bin"}
        (root / f"meta_{name}.json").write_text(json.dumps(meta, ensure_ascii=True, indent=2))


def test_the_original_offline_failure_accounting_check_passes(tmp_path):
    write_fix2_dump(tmp_path)
    out = tmp_path / "fix2_result.json"
    assert offline(tmp_path, out, "--scope", "front_n", "--front-n", "2", "--stage", "both", "--entry-mode",
                   "per_meta", "--codec-mode", "adaptive_v22", "--adaptive-block-seq", "64", "--zstd-level", "3",
                   "--overwrite") == 0
    obj = json.loads(out.read_text(encoding="utf-8"))
    # the check's three conditions, as it states them
    assert int(obj.get("raw_bytes", 0)) == 16, "only the valid entry may contribute raw bytes"
    assert int(obj.get("compressed_bytes", 0)) > 0
    assert int(obj.get("skip_reasons", {}).get("compression_failed", 0)) > 0


@pytest.mark.parametrize("mode,raw", [("chunked", 16), ("aggregate", 0), ("chunked_grouped", 0)])
def test_failure_accounting_holds_in_every_entry_mode(tmp_path, mode, raw):
    # one run x layer: the aggregate modes put both entries in one group, which fails as a whole; unlike the
    # original's chunked_grouped (raw bytes added before compressing), nothing of a failed group is counted
    write_fix2_dump(tmp_path)
    result = evaluate(tmp_path, EvalOptions(entry_mode=mode))
    assert result["raw_bytes"] == raw and result["skip_reasons"] == {"compression_failed": 1}
    assert (result["compressed_bytes"] > 0) == (raw > 0)


# --- the original's markdown summary -------------------------------------------------------------------


def original_markdown(r: dict) -> str:
    """The original's ``write_markdown`` (offline_lossless_fp16.py), restated from its source."""
    text = "# H2O v4 Offline Lossless Summary\n\n"
    text += (f"- Dump dir: `{r['dump_dir']}`\n- Stage: `{r['stage']}`\n- Scope: `{r['scope']}`\n"
             f"- Selected entries: {r['selected_entries']}\n- Selected layers: {r['selected_layers']}\n"
             f"- Selected dumps: {r['selected_dumps']}\n- Entry mode: `{r['entry_mode']}`\n"
             f"- Online chunk seq: {r['online_chunk_seq']}\n- Online framing bytes: {r['online_framing_bytes']}\n"
             f"- Aggregate by stage: `{r['aggregate_by_stage']}`\n- Aggregate groups: {r['aggregate_groups']}\n"
             f"- Online chunks: {r['online_chunks']}\n- Codec mode: `{r['codec_mode']}`\n"
             f"- Bitshuffle: `{r['bitshuffle']}`\n- Zstd level: {r['zstd_level']}\n- Codec: `{r['codec']}`\n\n")
    text += (f"## Ratios\n\n- K lossless ratio: {r['k_lossless_ratio']:.4f}\n"
             f"- V lossless ratio: {r['v_lossless_ratio']:.4f}\n- Overall lossless ratio: {r['lossless_ratio']:.4f}\n"
             f"- Weighted lossless ratio: {r['weighted_lossless_ratio']:.4f}\n\n")
    text += (f"## Bytes\n\n- K raw bytes: {r['k_raw_bytes']}\n- K compressed bytes: {r['k_compressed_bytes']}\n"
             f"- V raw bytes: {r['v_raw_bytes']}\n- V compressed bytes: {r['v_compressed_bytes']}\n"
             f"- K chunk metadata bytes: {r['k_chunk_meta_bytes']}\n"
             f"- V chunk metadata bytes: {r['v_chunk_meta_bytes']}\n- Total raw bytes: {r['raw_bytes']}\n"
             f"- Total compressed bytes: {r['compressed_bytes']}\n\n")
    text += (f"## Predictor Usage\n\n- K hi mode counts: {r['k_hi_mode_counts']}\n"
             f"- K lo mode counts: {r['k_lo_mode_counts']}\n- V hi mode counts: {r['v_hi_mode_counts']}\n"
             f"- V lo mode counts: {r['v_lo_mode_counts']}\n\n")
    text += (f"## Diagnostics\n\n- Scanned entries: {r['scanned_entries']}\n"
             f"- Converted fp32->fp16 entries: {r['converted_fp32_entries']}\n"
             f"- Skipped entries: {r['skipped_entries']}\n")
    if r["skip_reasons"]:
        text += "- Skip reasons:\n" + "".join(f"  - {k}: {n}\n" for k, n in sorted(r["skip_reasons"].items()))
    return text


@pytest.mark.parametrize("mode", ["aggregate", "chunked_grouped"])
def test_markdown_starts_with_the_original_summary(work_dir, tmp_path, mode):
    (work_dir / "meta_cut.json").write_text("{")
    edit_meta(meta_path(work_dir, 1, "decode"), seq_len=0)
    out, md = tmp_path / "o.json", tmp_path / "o.md"
    assert offline(work_dir, out, "--entry-mode", mode, "--aggregate-by-stage", "--online-chunk-seq", "8",
                   "--out-md", str(md)) == 0
    result = json.loads(out.read_text())
    text = md.read_text()
    assert text.startswith(original_markdown(result) + "\n## Codec\n")
    assert "- Skip reasons:\n  - invalid_shape: 1\n  - meta_parse_error: 1\n" in text
    assert "| meta_parse_error | meta_parse_error |" in text  # our table of skipped files follows


def test_markdown_of_a_result_read_back_from_json(std_dir, tmp_path):
    result = json.loads(json.dumps(evaluate(std_dir, EvalOptions(plain_baseline=True))))
    write_offline_markdown(tmp_path / "o.md", result)
    text = (tmp_path / "o.md").read_text()
    assert text.startswith(original_markdown(result))
    assert "- Aggregate by stage: `False`\n" in text and "- Bitshuffle: `False`\n" in text
    assert "- Round trip verified: `True`\n" in text and "Plain split planes + zstd ratio" in text
