"""Human-readable reports of gate inputs and results (plain dictionaries in, markdown out)."""

from __future__ import annotations

from pathlib import Path


def write_offline_markdown(path: Path, result: dict) -> None:
    """Write the offline evaluator's summary in the original's layout, plus our additions."""
    lines = ["# H2O Offline Lossless Summary", ""]
    lines += [f"- Dump dir: `{result['dump_dir']}`", f"- Stage: `{result['stage']}`",
              f"- Scope: `{result['scope']}`", f"- Selected entries: {result['selected_entries']}",
              f"- Selected layers: {result['selected_layers']}", f"- Selected dumps: {result['selected_dumps']}",
              f"- Entry mode: `{result['entry_mode']}`", f"- Online chunk seq: {result['online_chunk_seq']}",
              f"- Online framing bytes: {result['online_framing_bytes']}",
              f"- Aggregate by stage: `{result['aggregate_by_stage']}`",
              f"- Aggregate groups: {result['aggregate_groups']}", f"- Online chunks: {result['online_chunks']}",
              f"- Codec mode: `{result['codec_mode']}`", f"- Zstd level: {result['zstd_level']}",
              f"- Codec: `{result['codec']}` v{result['codec_version']}",
              f"- Round trip verified: `{result['roundtrip_verified']}`", "", "## Ratios", "",
              f"- K lossless ratio: {result['k_lossless_ratio']:.4f}",
              f"- V lossless ratio: {result['v_lossless_ratio']:.4f}",
              f"- Overall lossless ratio: {result['lossless_ratio']:.4f}",
              f"- Weighted lossless ratio: {result['weighted_lossless_ratio']:.4f}"]
    if "plain_zstd_ratio" in result:
        lines.append(f"- Plain split planes + zstd ratio (same chunks): {result['plain_zstd_ratio']:.4f}")
    lines += ["", "## Bytes", ""]
    for key in ("k_raw_bytes", "k_compressed_bytes", "v_raw_bytes", "v_compressed_bytes", "k_chunk_meta_bytes",
                "v_chunk_meta_bytes", "raw_bytes", "compressed_bytes"):
        lines.append(f"- {_byte_label(key)}: {result[key]}")
    lines += ["", "## Predictor Usage", ""]
    for key in ("k_hi_mode_counts", "k_lo_mode_counts", "v_hi_mode_counts", "v_lo_mode_counts"):
        lines.append(f"- {key[0].upper()} {key[2:4]} mode counts: {result[key]}")
    lines += ["", "## Per Layer", "", "| layer | raw bytes | compressed bytes | ratio |", "|---:|---:|---:|---:|"]
    for layer, row in result["per_layer"].items():
        lines.append(f"| {layer} | {row['raw_bytes']} | {row['compressed_bytes']} | {row['lossless_ratio']:.4f} |")
    lines += ["", "## Throughput", "", f"- Encode: {result['encode_mb_s']:.1f} MB/s",
              f"- Decode: {result['decode_mb_s']:.1f} MB/s",
              f"- End to end: {result['throughput_mb_s']:.1f} MB/s over {result['elapsed_s']:.2f} s",
              "", "## Diagnostics", "", f"- Scanned entries: {result['scanned_entries']}",
              f"- Converted fp32->fp16 entries: {result['converted_fp32_entries']}",
              f"- Skipped entries: {result['skipped_entries']}"]
    if result["skip_reasons"]:
        lines.append("- Skip reasons:")
        lines += [f"  - {reason}: {count}" for reason, count in sorted(result["skip_reasons"].items())]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _byte_label(key: str) -> str:
    """``k_chunk_meta_bytes`` -> ``K chunk meta bytes``, ``raw_bytes`` -> ``Raw bytes``."""
    tensor, _, rest = key.partition("_")
    if tensor in ("k", "v"):
        return f"{tensor.upper()} {rest.replace('_', ' ')}"
    return key.replace("_", " ").capitalize()
