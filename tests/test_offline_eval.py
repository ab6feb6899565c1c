"""The offline evaluator on small dumps written by ``write_dump``.

Expected byte counts are recomputed independently from the public codec API, so a report that
miscounts (framing, groups, chunks, skipped entries) fails.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zstandard
from h2o_test_helpers import (
    DECODE_SEQ,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    prefill_seq,
    standard_tensors,
    write_entry,
    write_standard_dump,
)

from h2o_kernels.codec import fp16 as codec_module
from h2o_kernels.codec import profiles
from h2o_kernels.codec.fp16 import CODEC_NAME, FORMAT_VERSION, FP16Codec, inspect
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT
from h2o_kernels.codec.rope import RopeSpec
from h2o_kernels.lossless import offline_eval
from h2o_kernels.lossless.kvdump import iter_dump_files, read_meta, write_dump
from h2o_kernels.lossless.offline_eval import ENTRY_MODES, EvalOptions, SelectionError, evaluate

STAGES = ("prefill", "decode")



def meta_of(dump_dir: Path, layer_id: int, stage: str) -> Path:
    matches = [p for p in iter_dump_files(dump_dir) if p.suffix == ".json"
               and read_meta(p).layer_id == layer_id and read_meta(p).stage == stage]
    assert len(matches) == 1
    return matches[0]


def remove_entry(dump_dir: Path, layer_id: int, stage: str) -> None:
    meta = meta_of(dump_dir, layer_id, stage)
    entry = read_meta(meta)
    for path in (meta, entry.k_path, entry.v_path):
        path.unlink()


# --- independent expectations ----------------------------------------------------------------------


def units(layers, stages, mode: str, chunk: int = 0, by_stage: bool = False):
    """(k, v, framing) per coding unit, built from the standard tensors like the documented modes."""
    groups: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for layer in layers:
        members = [(st, standard_tensors(layer, st)) for st in STAGES if st in stages]  # seq_start order
        if mode in ("per_meta", "chunked") or by_stage:
            groups += [[kv] for _, kv in members]
        else:
            groups.append([kv for _, kv in members])
    out = []
    for group in groups:
        k = np.concatenate([kv[0] for kv in group])
        v = np.concatenate([kv[1] for kv in group])
        if mode == "per_meta":
            out.append((k, v, 0))
        elif mode == "aggregate":
            out.append((k, v, 4 + 4 * len(group)))
        else:
            step = chunk if 0 < chunk < len(k) else len(k)
            out += [(k[s:s + step], v[s:s + step], None) for s in range(0, len(k), step)]
    return out


def expected(layers, stages, mode="per_meta", chunk=0, framing=16, by_stage=False, options=None) -> dict:
    options = options or EvalOptions()
    k_codec = FP16Codec(options.k_hi_predictors, options.k_lo_predictors, block_seq=options.adaptive_block_seq,
                        level=options.zstd_level, choose=options.predictor_choice)
    v_codec = FP16Codec(options.v_hi_predictors, options.v_lo_predictors, block_seq=options.adaptive_block_seq,
                        level=options.zstd_level, choose=options.predictor_choice)
    zstd = zstandard.ZstdCompressor(level=options.zstd_level)
    res = {"k_raw": 0, "k_comp": 0, "v_raw": 0, "v_comp": 0, "k_meta": 0, "v_meta": 0, "plain": 0,
           "units": 0, "k_blocks": 0}
    for k, v, unit_framing in units(layers, stages, mode, chunk, by_stage):
        unit_framing = framing if unit_framing is None else unit_framing
        res["units"] += 1
        for kind, tensor, codec in (("k", k, k_codec), ("v", v, v_codec)):
            blob = codec.encode(tensor)
            res[f"{kind}_raw"] += tensor.nbytes
            res[f"{kind}_comp"] += len(blob) + unit_framing
            res[f"{kind}_meta"] += unit_framing
            words = tensor.view(np.uint16)
            res["plain"] += unit_framing + sum(len(zstd.compress(p.tobytes()))
                                               for p in ((words >> 8).astype(np.uint8), words.astype(np.uint8)))
            if kind == "k":
                res["k_blocks"] += len(inspect(blob).hi.predictors)
    return res


def assert_totals(result: dict, exp: dict) -> None:
    assert result["k_raw_bytes"] == exp["k_raw"]
    assert result["v_raw_bytes"] == exp["v_raw"]
    assert result["k_compressed_bytes"] == exp["k_comp"]
    assert result["v_compressed_bytes"] == exp["v_comp"]
    assert result["raw_bytes"] == exp["k_raw"] + exp["v_raw"]
    assert result["compressed_bytes"] == exp["k_comp"] + exp["v_comp"]
    assert result["weighted_lossless_ratio"] == pytest.approx(result["raw_bytes"] / result["compressed_bytes"])
    assert result["lossless_ratio"] == pytest.approx(result["raw_bytes"] / result["compressed_bytes"])
    assert result["k_lossless_ratio"] == pytest.approx(exp["k_raw"] / exp["k_comp"])
    assert result["v_lossless_ratio"] == pytest.approx(exp["v_raw"] / exp["v_comp"])


TOTAL_KEYS = ("k_raw_bytes", "k_compressed_bytes", "v_raw_bytes", "v_compressed_bytes", "raw_bytes",
              "compressed_bytes", "k_chunk_meta_bytes", "v_chunk_meta_bytes", "per_layer",
              "weighted_lossless_ratio", "k_hi_mode_counts", "k_lo_mode_counts", "v_hi_mode_counts",
              "v_lo_mode_counts")


def totals(result: dict) -> dict:
    return {key: result[key] for key in TOTAL_KEYS}


# --- the report ------------------------------------------------------------------------------------


def test_default_report(std_dir):
    result = evaluate(std_dir, EvalOptions())
    json.loads(json.dumps(result))  # JSON-serialisable as is
    assert result["selected_layers"] == [0, 1]  # front_n=2
    assert result["selected_entries"] == 4
    assert result["scanned_entries"] == 2 * LAYERS
    assert result["selected_dumps"] == 1
    assert result["entry_mode"] == "per_meta"
    assert result["codec"] == CODEC_NAME and result["codec_version"] == FORMAT_VERSION
    assert result["codec_mode"] == "adaptive_v22" and result["predictor_choice"] == "estimate"
    assert result["bitshuffle"] is False and "64-token block" in result["codec_scheme"]
    assert result["roundtrip_verified"] is True
    assert result["skip_reasons"] == {} and result["skipped"] == [] and result["skipped_entries"] == 0
    assert result["converted_fp32_entries"] == 0
    assert sum(result["filtered"].values()) == 2 * (LAYERS - 2)
    assert "plain_zstd_ratio" not in result
    assert result["encode_mb_s"] > 0 and result["decode_mb_s"] > 0
    assert result["k_chunk_meta_bytes"] == result["v_chunk_meta_bytes"] == 0
    exp = expected([0, 1], STAGES)
    assert_totals(result, exp)
    assert result["k_raw_bytes"] == sum(2 * KV_HEADS * HEAD_DIM * s for s in
                                        (prefill_seq(0), prefill_seq(1), DECODE_SEQ, DECODE_SEQ))
    assert result["weighted_lossless_ratio"] > 1.0
    assert sum(result["k_hi_mode_counts"].values()) == exp["k_blocks"]
    assert sum(result["k_lo_mode_counts"].values()) == exp["k_blocks"]
    assert set(result["k_hi_mode_counts"]) == set(K_DEFAULT)
    assert set(result["v_hi_mode_counts"]) == set(V_DEFAULT)


def test_per_layer_breakdown_adds_up(std_dir):
    result = evaluate(std_dir, EvalOptions(scope="layer_range", layer_start=0))
    per_layer = result["per_layer"]
    assert list(per_layer) == [str(i) for i in range(LAYERS)]
    assert sum(row["raw_bytes"] for row in per_layer.values()) == result["raw_bytes"]
    assert sum(row["compressed_bytes"] for row in per_layer.values()) == result["compressed_bytes"]
    for layer, row in per_layer.items():
        exp = expected([int(layer)], STAGES)
        assert row["raw_bytes"] == exp["k_raw"] + exp["v_raw"]
        assert row["compressed_bytes"] == exp["k_comp"] + exp["v_comp"]
        assert row["lossless_ratio"] == pytest.approx(row["raw_bytes"] / row["compressed_bytes"])


@pytest.mark.parametrize("mode", ENTRY_MODES)
def test_every_entry_mode_accounts_bytes_exactly(std_dir, mode):
    options = EvalOptions(entry_mode=mode, online_chunk_seq=10, online_framing_bytes=16)
    result = evaluate(std_dir, options)
    exp = expected([0, 1], STAGES, mode, chunk=10, framing=16)
    assert_totals(result, exp)
    assert result["roundtrip_verified"] is True
    assert result["k_chunk_meta_bytes"] == exp["k_meta"] and result["v_chunk_meta_bytes"] == exp["v_meta"]
    assert result["aggregate_groups"] == (2 if mode in ("aggregate", "chunked_grouped") else 0)
    assert result["online_chunks"] == (2 * exp["units"] if mode.startswith("chunked") else 0)
    assert sum(result["k_hi_mode_counts"].values()) == exp["k_blocks"]
    assert result["entry_mode"] == mode


def test_entry_modes_see_the_same_raw_bytes_but_different_framing(std_dir):
    results = {mode: evaluate(std_dir, EvalOptions(entry_mode=mode, online_chunk_seq=8)) for mode in ENTRY_MODES}
    assert len({r["raw_bytes"] for r in results.values()}) == 1
    # per entry: 4 entries' tensors, aggregate: 2 groups of 2 entries -> 2 x (4 + 8) bytes per kind
    assert results["aggregate"]["k_chunk_meta_bytes"] == 2 * (4 + 4 * 2)
    assert results["per_meta"]["k_chunk_meta_bytes"] == 0
    chunks = sum(-(-s // 8) for s in (prefill_seq(0), prefill_seq(1), DECODE_SEQ, DECODE_SEQ))
    assert results["chunked"]["k_chunk_meta_bytes"] == 16 * chunks


@pytest.mark.parametrize("mode", ["chunked", "chunked_grouped"])
def test_framing_bytes_are_charged_per_tensor_chunk(std_dir, mode):
    base = evaluate(std_dir, EvalOptions(entry_mode=mode, online_chunk_seq=7, online_framing_bytes=0))
    framed = evaluate(std_dir, EvalOptions(entry_mode=mode, online_chunk_seq=7, online_framing_bytes=100))
    chunks = base["online_chunks"] // 2
    assert chunks == expected([0, 1], STAGES, mode, chunk=7)["units"]
    assert framed["k_compressed_bytes"] - base["k_compressed_bytes"] == 100 * chunks
    assert framed["v_compressed_bytes"] - base["v_compressed_bytes"] == 100 * chunks
    assert framed["k_chunk_meta_bytes"] == 100 * chunks and base["k_chunk_meta_bytes"] == 0


def test_chunk_seq_zero_means_whole_entries(std_dir):
    chunked = evaluate(std_dir, EvalOptions(entry_mode="chunked", online_chunk_seq=0, online_framing_bytes=16))
    per_meta = evaluate(std_dir, EvalOptions(entry_mode="per_meta"))
    assert chunked["online_chunks"] == 2 * 4
    assert chunked["k_compressed_bytes"] == per_meta["k_compressed_bytes"] + 16 * 4


@pytest.mark.parametrize("mode", ["aggregate", "chunked_grouped"])
def test_aggregate_by_stage_keeps_stages_apart(std_dir, mode):
    options = EvalOptions(entry_mode=mode, aggregate_by_stage=True, online_chunk_seq=10)
    result = evaluate(std_dir, options)
    assert result["aggregate_groups"] == 4
    assert result["aggregate_by_stage"] is True
    assert_totals(result, expected([0, 1], STAGES, mode, chunk=10, by_stage=True))


def test_aggregate_groups_by_run_id(tmp_path):
    write_standard_dump(tmp_path, layers=[0], run_id="runA")
    write_standard_dump(tmp_path, layers=[0], run_id="runB")
    result = evaluate(tmp_path, EvalOptions(entry_mode="aggregate"))
    assert result["selected_dumps"] == 2
    assert result["aggregate_groups"] == 2
    assert result["k_chunk_meta_bytes"] == 2 * (4 + 4 * 2)


# --- selection -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options,layers", [
    (EvalOptions(front_n=1), [0]),
    (EvalOptions(front_n=3), [0, 1, 2]),
    (EvalOptions(front_n=100), [0, 1, 2, 3]),
    (EvalOptions(scope="layer_range"), [2, 3]),  # layer_start=2, layer_end=-1 by default
    (EvalOptions(scope="layer_range", layer_start=1, layer_end=2), [1, 2]),
    (EvalOptions(scope="layer_range", layer_start=3, layer_end=3), [3]),
    (EvalOptions(scope="layer_ids", layer_ids=(3, 1)), [1, 3]),
    (EvalOptions(scope="layer_ids", layer_ids=(0, 7)), [0]),
], ids=["front1", "front3", "front100", "range-default", "range1-2", "range3-3", "ids3,1", "ids0,7"])
def test_scope_filters(std_dir, options, layers):
    result = evaluate(std_dir, options)
    assert result["selected_layers"] == layers
    assert result["selected_entries"] == 2 * len(layers)
    assert list(result["per_layer"]) == [str(i) for i in layers]
    assert_totals(result, expected(layers, STAGES))
    assert sum(result["filtered"].values()) == 2 * (LAYERS - len(layers))


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_stage_filter(std_dir, stage):
    result = evaluate(std_dir, EvalOptions(stage=stage))
    assert result["stage"] == stage
    assert result["selected_entries"] == 2
    assert_totals(result, expected([0, 1], (stage,)))
    assert any("--stage" in reason for reason in result["filtered"])


@pytest.mark.parametrize("options,stages", [
    (EvalOptions(min_seq_len=DECODE_SEQ + 1), ("prefill",)),
    (EvalOptions(max_seq_len=DECODE_SEQ), ("decode",)),
    (EvalOptions(min_seq_len=DECODE_SEQ, max_seq_len=prefill_seq(1)), STAGES),
])
def test_seq_len_filters(std_dir, options, stages):
    result = evaluate(std_dir, options)
    assert_totals(result, expected([0, 1], stages))


def test_seq_len_filter_boundaries(std_dir):
    # min keeps seq >= min, max keeps seq <= max: layer 1's prefill (seq 28) is the only one in [26, 28]
    result = evaluate(std_dir, EvalOptions(min_seq_len=prefill_seq(0) + 1, max_seq_len=prefill_seq(1)))
    assert result["selected_entries"] == 1
    assert_totals(result, expected([1], ("prefill",)))


@pytest.mark.parametrize("options,fragment", [
    (EvalOptions(scope="layer_ids", layer_ids=(99,)), "layer_ids"),
    (EvalOptions(scope="layer_range", layer_start=10), "layer_range"),
    (EvalOptions(min_seq_len=10_000), "--min-seq-len"),
    (EvalOptions(max_seq_len=1), "--max-seq-len"),
])
def test_empty_selection_names_the_filter(std_dir, options, fragment):
    with pytest.raises(SelectionError) as info:
        evaluate(std_dir, options)
    assert fragment in str(info.value)


def test_empty_selection_by_stage_names_the_stage_filter(tmp_path):
    k, v = standard_tensors(0, "prefill")
    write_entry(tmp_path, layer_id=0, stage="prefill", seq_start=0, k=k, v=v)
    with pytest.raises(SelectionError, match="--stage decode"):
        evaluate(tmp_path, EvalOptions(stage="decode"))


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(SelectionError, match="no meta_"):
        evaluate(tmp_path, EvalOptions())
    with pytest.raises(SelectionError, match="not a directory"):
        evaluate(tmp_path / "absent", EvalOptions())


def test_selection_error_when_everything_is_unreadable(tmp_path):
    (tmp_path / "meta_a.json").write_text("{oops")
    with pytest.raises(SelectionError) as info:
        evaluate(tmp_path, EvalOptions())
    assert "meta_parse_error" in str(info.value)
    assert "meta_a.json" in str(info.value)


def test_selection_error_is_a_value_error():
    assert issubclass(SelectionError, ValueError)


@pytest.mark.parametrize("options,fragment", [
    (EvalOptions(entry_mode="bogus"), "--entry-mode"),
    (EvalOptions(stage="both-ish"), "--stage"),
    (EvalOptions(scope="all"), "--scope"),
    (EvalOptions(front_n=0), "--front-n"),
    (EvalOptions(scope="layer_ids"), "--layer-ids"),
    (EvalOptions(adaptive_block_seq=0), "--adaptive-block-seq"),
    (EvalOptions(online_chunk_seq=-1), "--online-chunk-seq"),
    (EvalOptions(online_framing_bytes=-1), "--online-framing-bytes"),
    (EvalOptions(min_seq_len=-1), "seq-len"),
    (EvalOptions(k_hi_predictors=("raw", "nope")), "--k-hi-predictors"),
    (EvalOptions(v_lo_predictors=""), "--v-lo-predictors"),
])
def test_bad_options_raise_value_error(std_dir, options, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        evaluate(std_dir, options)
    assert not isinstance(info.value, SelectionError)


def test_eval_options_defaults_match_the_original():
    o = EvalOptions()
    assert (o.stage, o.scope, o.front_n, o.layer_start, o.layer_end, o.layer_ids) == ("both", "front_n", 2, 2, -1, ())
    assert (o.zstd_level, o.strict_fp16, o.min_seq_len, o.max_seq_len) == (3, False, 0, 0)
    assert (o.entry_mode, o.online_chunk_seq, o.online_framing_bytes) == ("per_meta", 0, 16)
    assert o.aggregate_by_stage is False
    assert o.adaptive_block_seq == 64
    assert (o.codec_mode, o.bitshuffle) == ("adaptive_v22", False)
    assert tuple(o.k_hi_predictors) == tuple(o.k_lo_predictors) == K_DEFAULT
    assert tuple(o.v_hi_predictors) == tuple(o.v_lo_predictors) == V_DEFAULT


def test_predictor_options_reach_the_codec(std_dir):
    options = EvalOptions(k_hi_predictors="raw", k_lo_predictors=("delta_seq",), v_hi_predictors="raw,xor_seq",
                          predictor_choice="exhaustive", adaptive_block_seq=8, zstd_level=5)
    result = evaluate(std_dir, options)
    assert result["predictor_choice"] == "exhaustive" and result["zstd_level"] == 5
    assert result["adaptive_block_seq"] == 8
    blocks = sum(-(-s // 8) for s in (prefill_seq(0), prefill_seq(1), DECODE_SEQ, DECODE_SEQ))
    assert result["k_hi_mode_counts"] == {"raw": blocks}
    assert set(result["k_lo_mode_counts"]) == {"delta_seq"}
    assert set(result["v_hi_mode_counts"]) == {"raw", "xor_seq"}
    assert result["k_hi_predictors"] == ["raw"] and result["k_lo_predictors"] == ["delta_seq"]
    assert_totals(result, expected([0, 1], STAGES, options=options))


def test_mode_counts_add_up_to_the_coded_blocks_with_restricted_sets(std_dir):
    options = EvalOptions(k_hi_predictors="xor_seq", k_lo_predictors=("delta_seq",), adaptive_block_seq=8)
    result = evaluate(std_dir, options)
    blocks = sum(-(-s // 8) for s in (prefill_seq(0), prefill_seq(1), DECODE_SEQ, DECODE_SEQ))
    assert result["k_hi_mode_counts"] == {"xor_seq": blocks}
    assert result["k_lo_mode_counts"] == {"delta_seq": blocks}


# --- failure accounting ------------------------------------------------------------------------------


def test_malformed_meta_is_counted_and_adds_nothing(std_dir, work_dir):
    clean = evaluate(std_dir, EvalOptions())
    (work_dir / "meta_broken.json").write_text('{"layer_id": 0, "stage": "prefill"')
    (work_dir / "meta_list.json").write_text('[1, 2]')
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"meta_parse_error": 2}
    assert result["skipped_entries"] == 2
    assert {Path(s["file"]).name for s in result["skipped"]} == {"meta_broken.json", "meta_list.json"}
    assert all(s["reason"] == s["cause"] == "meta_parse_error" and s["detail"] for s in result["skipped"])
    assert result["scanned_entries"] == clean["scanned_entries"] + 2
    assert totals(result) == totals(clean)


@pytest.mark.parametrize("mode", ENTRY_MODES)
@pytest.mark.parametrize("damage", ["truncate", "extend"])
def test_wrong_size_binary_is_counted_and_its_group_adds_nothing(std_dir, work_dir, tmp_path, mode, damage):
    options = EvalOptions(entry_mode=mode, online_chunk_seq=10)
    bad = read_meta(meta_of(work_dir, 1, "prefill"))
    data = bad.k_path.read_bytes()
    bad.k_path.write_bytes(data[:-2] if damage == "truncate" else data + b"\0\0")
    result = evaluate(work_dir, options)
    assert result["skip_reasons"] == {"compression_failed": 1}  # the original's name for it
    assert len(result["skipped"]) == 1 and str(bad.k_path.name) in result["skipped"][0]["detail"]
    assert result["skipped"][0]["cause"] == "size_mismatch"

    reference = Path(shutil.copytree(std_dir, tmp_path / "reference"))
    remove_entry(reference, 1, "prefill")
    if mode in ("aggregate", "chunked_grouped"):  # the whole run x layer group is dropped
        remove_entry(reference, 1, "decode")
    assert totals(result) == totals(evaluate(reference, options))
    assert result["raw_bytes"] < evaluate(std_dir, options)["raw_bytes"]


def test_missing_binary_is_counted_and_adds_nothing(std_dir, work_dir, tmp_path):
    read_meta(meta_of(work_dir, 0, "decode")).v_path.unlink()
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"missing_k_or_v_binary": 1}
    reference = Path(shutil.copytree(std_dir, tmp_path / "reference"))
    remove_entry(reference, 0, "decode")
    assert totals(result) == totals(evaluate(reference, EvalOptions()))


def test_unsupported_bytes_per_elem_is_counted(work_dir):
    meta = meta_of(work_dir, 0, "decode")
    doc = json.loads(meta.read_text())
    doc["bytes_per_elem"] = 8
    meta.write_text(json.dumps(doc))
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"unsupported_bytes_per_elem_8": 1}
    assert result["selected_entries"] == 3


def test_fp32_dumps_are_converted(std_dir, tmp_path):
    write_standard_dump(tmp_path, dtype=np.float32)
    result = evaluate(tmp_path, EvalOptions())
    assert result["converted_fp32_entries"] == 4
    assert result["skip_reasons"] == {}
    # fp16 values stored as fp32 convert back exactly: the same tensors as the fp16 dump
    assert totals(result) == totals(evaluate(std_dir, EvalOptions()))
    assert result["roundtrip_verified"] is True


def test_fp32_dumps_are_skipped_with_strict_fp16(std_dir, tmp_path):
    write_standard_dump(tmp_path, layers=[0, 1, 2])  # fp16 layers 0..2
    k, v = standard_tensors(1, "prefill", np.float32)
    write_entry(tmp_path, layer_id=1, stage="prefill", seq_start=0, k=k, v=v, run_id="fp32run")
    strict = evaluate(tmp_path, EvalOptions(strict_fp16=True))
    assert strict["skip_reasons"] == {"skip_fp32_strict": 1}
    assert strict["converted_fp32_entries"] == 0
    assert totals(strict) == totals(evaluate(std_dir, EvalOptions()))
    lenient = evaluate(tmp_path, EvalOptions())
    assert lenient["converted_fp32_entries"] == 1 and lenient["skip_reasons"] == {}
    assert lenient["raw_bytes"] == strict["raw_bytes"] + k.nbytes // 2 + v.nbytes // 2  # counted as fp16


def test_all_fp32_with_strict_fp16_is_an_empty_selection(tmp_path):
    write_standard_dump(tmp_path, dtype=np.float32, layers=[0])
    with pytest.raises(SelectionError, match="skip_fp32_strict"):
        evaluate(tmp_path, EvalOptions(strict_fp16=True))


FAIL_SEQ = prefill_seq(1)  # only layer 1's prefill K/V have this many tokens


def _patch_encode_to_fail(monkeypatch, exc_type=ValueError):
    def failing(original):
        def wrapper(self, tensors, *args, **kwargs):
            batch = tensors if isinstance(tensors, list) else [tensors]
            if any(np.shape(t)[0] == FAIL_SEQ for t in batch):
                raise exc_type("injected codec failure")
            return original(self, tensors, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(FP16Codec, "encode", failing(FP16Codec.encode))
    if hasattr(FP16Codec, "encode_many"):
        monkeypatch.setattr(FP16Codec, "encode_many", failing(FP16Codec.encode_many))


_DECODERS = ("decode", "decode_many", "decode_with_info")
_ORIGINAL_DECODERS = {name: getattr(codec_module, name) for name in _DECODERS}


def _patch_decode_to_lie(monkeypatch, seq=FAIL_SEQ):
    def corrupt(t):
        if t.shape[0] != seq:
            return t
        t = t.copy()
        t.view(np.uint16)[0, 0, 0] ^= 1
        return t

    def lying(original, name):
        def wrapper(blobs, *args, **kwargs):
            out = original(blobs, *args, **kwargs)
            if name == "decode":
                return corrupt(out)
            if name == "decode_many":
                return [corrupt(t) for t in out]
            return [(corrupt(t), info) for t, info in out]
        return wrapper

    for module in (codec_module, offline_eval):
        for name, original in _ORIGINAL_DECODERS.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, lying(original, name))


@pytest.mark.parametrize("exc_type", [ValueError, TypeError])
def test_codec_failure_is_counted_and_adds_nothing(std_dir, tmp_path, monkeypatch, exc_type):
    reference = Path(shutil.copytree(std_dir, tmp_path / "reference"))
    remove_entry(reference, 1, "prefill")
    expected_totals = totals(evaluate(reference, EvalOptions()))
    _patch_encode_to_fail(monkeypatch, exc_type)
    result = evaluate(std_dir, EvalOptions())
    assert result["skip_reasons"] == {"compression_failed": 1}
    assert result["skipped"][0]["cause"] == "codec_error"
    assert "injected codec failure" in result["skipped"][0]["detail"]
    assert totals(result) == expected_totals
    assert result["selected_entries"] == 4  # selected, then failed


def test_roundtrip_mismatch_is_counted_and_adds_nothing(std_dir, tmp_path, monkeypatch):
    reference = Path(shutil.copytree(std_dir, tmp_path / "reference"))
    remove_entry(reference, 1, "prefill")
    expected_totals = totals(evaluate(reference, EvalOptions()))
    _patch_decode_to_lie(monkeypatch)
    result = evaluate(std_dir, EvalOptions())
    assert result["skip_reasons"] == {"compression_failed": 1}
    assert result["skipped"][0]["cause"] == "roundtrip_mismatch"
    assert totals(result) == expected_totals
    assert result["roundtrip_verified"] is True  # what was counted was verified


def test_roundtrip_mismatch_drops_the_whole_aggregate_group(std_dir, tmp_path, monkeypatch):
    # layer 0 is one 30-token chunk; layer 1 (28 + 6 tokens) is a 32-token chunk and a 2-token one
    options = EvalOptions(entry_mode="chunked_grouped", online_chunk_seq=32)
    reference = Path(shutil.copytree(std_dir, tmp_path / "reference"))
    remove_entry(reference, 1, "prefill")
    remove_entry(reference, 1, "decode")
    expected_totals = totals(evaluate(reference, options))
    _patch_decode_to_lie(monkeypatch, seq=32)
    result = evaluate(std_dir, options)
    assert result["skip_reasons"] == {"compression_failed": 1}
    assert result["skipped"][0]["cause"] == "roundtrip_mismatch"
    assert totals(result) == expected_totals


def test_without_verify_nothing_is_decoded(std_dir, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("decode called with verify=False")

    for module in (codec_module, offline_eval):
        for name in _DECODERS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, boom)
    result = evaluate(std_dir, EvalOptions(verify=False))
    assert result["roundtrip_verified"] is False
    assert result["skip_reasons"] == {}
    assert result["compressed_bytes"] > 0


def test_plain_baseline(std_dir):
    for mode in ("per_meta", "chunked"):
        result = evaluate(std_dir, EvalOptions(entry_mode=mode, online_chunk_seq=10, plain_baseline=True))
        exp = expected([0, 1], STAGES, mode, chunk=10)
        assert result["plain_zstd_compressed_bytes"] == exp["plain"]
        assert result["plain_zstd_ratio"] == pytest.approx(result["raw_bytes"] / exp["plain"])


# --- npz inputs ------------------------------------------------------------------------------------------


def test_npz_inputs(tmp_path):
    for layer in (0, 1, 2):
        k, v = standard_tensors(layer, "prefill")
        np.savez(tmp_path / f"kv_layer{layer}.npz", k=k, v=v)  # layer from the file name
    k, v = standard_tensors(1, "decode")
    np.savez(tmp_path / "extra.npz", k=k, v=v, layer_id=np.int64(1), stage="decode", run_id="kv_layer1",
             seq_start=np.int64(prefill_seq(1)))
    result = evaluate(tmp_path, EvalOptions())
    assert result["selected_layers"] == [0, 1]
    assert result["scanned_entries"] == 4 and result["selected_entries"] == 3
    assert_totals(result, expected([0], ("prefill",)) | {
        key: expected([0], ("prefill",))[key] + expected([1], STAGES)[key]
        for key in ("k_raw", "k_comp", "v_raw", "v_comp")})
    decode_only = evaluate(tmp_path, EvalOptions(stage="decode"))
    assert_totals(decode_only, expected([1], ("decode",)))


def test_mixed_npz_and_meta_and_broken_npz(std_dir, work_dir):
    k, v = standard_tensors(0, "prefill")
    np.savez(work_dir / "layer0_copy.npz", k=k, v=v, run_id="npzrun")
    np.savez(work_dir / "layer1_broken.npz", k=k)  # no v
    (work_dir / "layer0_garbage.npz").write_bytes(b"garbage")
    result = evaluate(work_dir, EvalOptions())
    assert result["skip_reasons"] == {"npz_read_error": 2}
    clean = evaluate(std_dir, EvalOptions())
    assert result["k_raw_bytes"] == clean["k_raw_bytes"] + k.nbytes
    assert result["selected_dumps"] == 2


def test_progress_callback(std_dir):
    calls = []
    result = evaluate(std_dir, EvalOptions(), progress=lambda done, total, t: calls.append((done, total, t)))
    done = [c[0] for c in calls]
    assert done == sorted(set(done)) and done[-1] == 4  # groups are reported as their wave finishes
    assert all(c[1] == 4 for c in calls)
    assert calls[-1][2]["raw_bytes"] == result["raw_bytes"]
    assert calls[-1][2]["lossless_ratio"] == pytest.approx(result["weighted_lossless_ratio"])


# --- worker threads -----------------------------------------------------------------------------------

TIMING_KEYS = ("encode_mb_s", "decode_mb_s", "elapsed_s", "throughput_mb_s", "timing")


def untimed(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in TIMING_KEYS}


@pytest.fixture
def small_waves(monkeypatch):
    """Waves of about one entry, so that a small dump is spread over several waves (and threads)."""
    monkeypatch.setattr(offline_eval, "_WAVE_BYTES", 1)


@pytest.mark.parametrize("mode", ["per_meta", "chunked_grouped"])
def test_any_number_of_jobs_gives_the_same_report(std_dir, small_waves, mode):
    base = dict(entry_mode=mode, online_chunk_seq=16, scope="layer_range", layer_start=0, plain_baseline=True)
    one = evaluate(std_dir, EvalOptions(jobs=1, **base))
    assert one["timing"]["jobs"] == 1 and set(one["timing"]) == {"jobs", "load_s", "encode_s", "decode_s", "compare_s"}
    for jobs in (2, 3):
        many = evaluate(std_dir, EvalOptions(jobs=jobs, **base))
        assert untimed(many) == untimed(one)
        assert many["timing"]["jobs"] == jobs


def test_failures_in_workers_are_skipped_in_order(std_dir, small_waves, monkeypatch):
    _patch_encode_to_fail(monkeypatch)
    _patch_decode_to_lie(monkeypatch, seq=prefill_seq(3))
    options = dict(scope="layer_range", layer_start=0)
    one = evaluate(std_dir, EvalOptions(jobs=1, **options))
    assert [item["cause"] for item in one["skipped"]] == ["codec_error", "roundtrip_mismatch"]
    assert untimed(evaluate(std_dir, EvalOptions(jobs=2, **options))) == untimed(one)


def test_an_unexpected_error_in_a_worker_propagates(std_dir, small_waves, monkeypatch):
    def broken(self, tensors, *args, **kwargs):
        raise RuntimeError("a bug, not a codec failure")

    monkeypatch.setattr(FP16Codec, "encode_many", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        evaluate(std_dir, EvalOptions(jobs=2, scope="layer_range", layer_start=0))


def test_an_interrupt_stops_the_workers(std_dir, small_waves, monkeypatch):
    loaded = []
    original = offline_eval._load
    monkeypatch.setattr(offline_eval, "_load", lambda entries: loaded.append(entries) or original(entries))

    def interrupt(done, total, totals):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(std_dir, EvalOptions(jobs=2, scope="layer_range", layer_start=0), progress=interrupt)
    for thread in threading.enumerate():
        if thread.name.startswith("h2o-offline"):
            thread.join(timeout=10)
    assert len(loaded) < 2 * LAYERS  # the waves after the interrupt were never loaded


def test_jobs_must_be_positive(std_dir):
    for jobs in (0, -1, True):
        with pytest.raises(ValueError, match="--jobs must be an integer >= 1"):
            evaluate(std_dir, EvalOptions(jobs=jobs))
    assert 1 <= EvalOptions().jobs <= offline_eval.MAX_DEFAULT_JOBS


# --- codec profiles and RoPE ----------------------------------------------------------------------------

THETA = 10000.0


def write_rope_dump(out_dir: Path, rope: RopeSpec | None, layers=(0, 1)) -> Path:
    """The standard tensors with a K that repeats rotated rows (so RoPE matching has something to find)."""
    for layer_id in layers:
        for stage in STAGES:
            k, v = standard_tensors(layer_id, stage)
            seq_start = 0 if stage == "prefill" else prefill_seq(layer_id)
            write_dump(out_dir, run_id="run1", stage=stage, layer_id=layer_id, seq_start=seq_start, k=k, v=v,
                       rope=rope)
    return out_dir


def ratio_expected(dump_dir: Path, rope: RopeSpec | None, chunk: int) -> dict[str, int]:
    """Blob bytes of chunked_grouped + the ratio profile, from make_codec and decode_with_info directly."""
    out = {"k": 0, "v": 0, "fast": 0}
    for layer_id in (0, 1):
        entries = [read_meta(meta_of(dump_dir, layer_id, stage)) for stage in STAGES]
        k, v = (np.concatenate(arrays) for arrays in zip(*(entry.load() for entry in entries)))
        positions = np.concatenate([e.seq_start + np.arange(e.seq_len) for e in entries])
        for kind, tensor in (("k", k), ("v", v)):
            codec = profiles.make_codec("ratio", kind, rope=rope if kind == "k" else None)
            chunks = [tensor[s:s + chunk] for s in range(0, len(tensor), chunk)]
            if kind == "k" and rope is not None:
                blobs = codec.encode_many(chunks, [positions[s:s + chunk] for s in range(0, len(tensor), chunk)])
            else:
                blobs = codec.encode_many(chunks)
            decoded = profiles.decode_with_info(blobs)
            out["fast"] += sum(info.version == profiles.VERSIONS["fast"] for _, info in decoded)
            out[kind] += sum(len(blob) + 8 for blob in blobs)
    return out


@pytest.mark.parametrize("rope", [None, RopeSpec(THETA)])
def test_ratio_profile_counts_its_own_blobs(tmp_path, rope):
    dump = write_rope_dump(tmp_path / "dump", rope)
    options = EvalOptions(codec="ratio", entry_mode="chunked_grouped", online_chunk_seq=16, online_framing_bytes=8)
    result = evaluate(dump, options)
    exp = ratio_expected(dump, rope, 16)
    assert result["codec_profile"] == "ratio" and result["codec_version"] == profiles.VERSIONS["ratio"] == 2
    assert (result["k_compressed_bytes"], result["v_compressed_bytes"]) == (exp["k"], exp["v"])
    assert result["rope_groups"] == (2 if rope else 0) and result["rope_theta"] == (rope.theta if rope else None)
    assert result["roundtrip_verified"] is True and result["skip_reasons"] == {}
    versions = [result[f"{kind}_blob_versions"] for kind in ("k", "v")]
    assert sum(sum(counts.values()) for counts in versions) == result["online_chunks"]
    assert sum(counts.get(str(profiles.VERSIONS["fast"]), 0) for counts in versions) == exp["fast"]
    fast_blocks = sum(result[f"{kind}_hi_mode_counts"][name] for kind in ("k", "v") for name in K_DEFAULT
                      if name in result[f"{kind}_hi_mode_counts"])
    assert (fast_blocks > 0) == (exp["fast"] > 0)  # predictor counts come from the fast profile's blobs only
    assert "ratio profile" in result["codec_scheme"]


def test_fast_profile_reports_its_blob_version(std_dir):
    result = evaluate(std_dir, EvalOptions(entry_mode="chunked", online_chunk_seq=10))
    fast = profiles.VERSIONS["fast"]
    assert result["codec_profile"] == "fast" and result["codec_version"] == fast == 3
    assert result["k_blob_versions"] == result["v_blob_versions"] == {str(fast): result["online_chunks"] // 2}
    assert result["rope_groups"] == 0 and result["warnings"] == []


def test_rope_theta_and_a_rope_for_v_are_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="--rope-theta applies to --codec ratio only"):
        EvalOptions(codec="fast", rope_theta=THETA).validate()
    with pytest.raises(ValueError, match="rope applies to K only"):
        profiles.make_codec("ratio", "v", rope=RopeSpec(THETA))


def test_rope_theta_overrides_the_dumps(tmp_path):
    dump = write_rope_dump(tmp_path / "dump", None)
    options = dict(codec="ratio", entry_mode="chunked_grouped", online_chunk_seq=16, online_framing_bytes=8)
    result = evaluate(dump, EvalOptions(rope_theta=THETA, **options))
    assert result["rope_groups"] == 2 and result["rope_theta"] == THETA
    assert result["k_compressed_bytes"] == ratio_expected(dump, RopeSpec(THETA), 16)["k"]
    assert evaluate(dump, EvalOptions(**options))["rope_groups"] == 0
    with pytest.raises(ValueError, match="--rope-theta: RoPE theta must be a finite number > 1"):
        evaluate(dump, EvalOptions(rope_theta=0.5, **options))


@pytest.mark.parametrize("theta", ["1e4", None, -3, float("nan"), [1]])
def test_a_malformed_rope_theta_is_a_warning_not_an_error(tmp_path, theta):
    dump = write_rope_dump(tmp_path / "dump", RopeSpec(THETA), layers=(0,))
    bad = meta_of(dump, 0, "prefill")
    meta = json.loads(bad.read_text())
    meta["rope_theta"] = theta
    bad.write_text(json.dumps(meta))
    result = evaluate(dump, EvalOptions(codec="ratio", front_n=1))
    assert result["skip_reasons"] == {} and result["selected_entries"] == 2
    if theta is None:  # JSON null: no RoPE recorded, nothing to warn about
        assert result["warnings"] == []
    else:
        assert len(result["warnings"]) == 1 and str(bad) in result["warnings"][0]
    assert result["rope_groups"] == 1  # the decode entry alone still has its RoPE (per_meta)


def test_overlapping_positions_mean_no_rope(tmp_path):
    k, v = standard_tensors(0, "prefill")
    for stage, start in (("prefill", 0), ("decode", 4)):  # the decode entry overlaps the prefill one
        write_dump(tmp_path, run_id="r", stage=stage, layer_id=0, seq_start=start, k=k, v=v, rope=RopeSpec(THETA))
    result = evaluate(tmp_path, EvalOptions(codec="ratio", entry_mode="aggregate", front_n=1))
    assert result["rope_groups"] == 0 and result["skip_reasons"] == {} and result["roundtrip_verified"]


@pytest.mark.parametrize("option, value", [
    ("codec_mode", "legacy"), ("k_hi_predictors", "raw"), ("v_lo_predictors", "raw,delta_seq"),
    ("predictor_choice", "exhaustive"), ("adaptive_block_seq", 32)])
def test_fast_only_options_are_refused_with_ratio(std_dir, option, value):
    name = "--" + option.replace("_", "-")
    with pytest.raises(ValueError, match=f"--codec ratio: {name}.* applies to the fast profile only"):
        evaluate(std_dir, EvalOptions(codec="ratio", **{option: value}))
    # the same values with their defaults pass
    EvalOptions(codec="ratio", codec_mode="adaptive_v22", k_hi_predictors=",".join(K_DEFAULT)).validate()


def test_an_unknown_profile_is_refused(std_dir):
    with pytest.raises(ValueError, match="--codec: 'best' is not one of"):
        evaluate(std_dir, EvalOptions(codec="best"))
