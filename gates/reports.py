"""Human-readable reports of gate inputs and results (plain dictionaries in, markdown out)."""

from __future__ import annotations

from pathlib import Path

OFFLINE_MARKDOWN_TITLE = "# H2O v4 Offline Lossless Summary"


def write_offline_markdown(path: Path, result: dict) -> None:
    """Write the offline evaluator's summary: the original's ``write_markdown`` (offline_lossless_fp16.py)
    line for line, then our sections (codec, per layer, throughput, skipped files)."""
    lines = _original_offline_lines(result) + _our_offline_lines(result)
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _original_offline_lines(r: dict) -> list[str]:
    """The original's layout and number formats (Python ``str`` of bools, lists and dicts included)."""
    lines = [OFFLINE_MARKDOWN_TITLE, "",
             f"- Dump dir: `{r['dump_dir']}`", f"- Stage: `{r['stage']}`", f"- Scope: `{r['scope']}`",
             f"- Selected entries: {r['selected_entries']}", f"- Selected layers: {r['selected_layers']}",
             f"- Selected dumps: {r['selected_dumps']}", f"- Entry mode: `{r['entry_mode']}`",
             f"- Online chunk seq: {r['online_chunk_seq']}", f"- Online framing bytes: {r['online_framing_bytes']}",
             f"- Aggregate by stage: `{r['aggregate_by_stage']}`", f"- Aggregate groups: {r['aggregate_groups']}",
             f"- Online chunks: {r['online_chunks']}", f"- Codec mode: `{r['codec_mode']}`",
             f"- Bitshuffle: `{r['bitshuffle']}`", f"- Zstd level: {r['zstd_level']}", f"- Codec: `{r['codec']}`",
             "", "## Ratios", "",
             f"- K lossless ratio: {r['k_lossless_ratio']:.4f}", f"- V lossless ratio: {r['v_lossless_ratio']:.4f}",
             f"- Overall lossless ratio: {r['lossless_ratio']:.4f}",
             f"- Weighted lossless ratio: {r['weighted_lossless_ratio']:.4f}", "", "## Bytes", ""]
    labels = (("K raw bytes", "k_raw_bytes"), ("K compressed bytes", "k_compressed_bytes"),
              ("V raw bytes", "v_raw_bytes"), ("V compressed bytes", "v_compressed_bytes"),
              ("K chunk metadata bytes", "k_chunk_meta_bytes"), ("V chunk metadata bytes", "v_chunk_meta_bytes"),
              ("Total raw bytes", "raw_bytes"), ("Total compressed bytes", "compressed_bytes"))
    lines += [f"- {label}: {r[key]}" for label, key in labels]
    lines += ["", "## Predictor Usage", ""]
    lines += [f"- {key[0].upper()} {key[2:4]} mode counts: {r[key]}"
              for key in ("k_hi_mode_counts", "k_lo_mode_counts", "v_hi_mode_counts", "v_lo_mode_counts")]
    lines += ["", "## Diagnostics", "", f"- Scanned entries: {r['scanned_entries']}",
              f"- Converted fp32->fp16 entries: {r['converted_fp32_entries']}",
              f"- Skipped entries: {r['skipped_entries']}"]
    if r["skip_reasons"]:
        lines.append("- Skip reasons:")
        lines += [f"  - {reason}: {count}" for reason, count in sorted(r["skip_reasons"].items())]
    return lines


def _our_offline_lines(r: dict) -> list[str]:
    """Our additions: what ran (codec profile, blob versions, RoPE matching of the ratio profile), whether it was
    verified, per-layer ratios, throughput, each skipped file."""
    lines = ["", "## Codec", "", f"- Codec profile: `{r['codec_profile']}`", f"- Codec version: {r['codec_version']}",
             f"- Scheme: {r['codec_scheme']}",
             f"- Blobs by format version: K {_versions(r['k_blob_versions'])}, V {_versions(r['v_blob_versions'])}"]
    if r["codec_profile"] == "ratio":
        theta = "the dumps' meta" if r["rope_theta"] is None else f"--rope-theta {r['rope_theta']:g}"
        lines.append(f"- K matched through RoPE: {r['rope_groups']} groups (RoPE from {theta})")
    lines.append(f"- Round trip verified: `{r['roundtrip_verified']}`")
    if "plain_zstd_ratio" in r:
        lines.append(f"- Plain split planes + zstd ratio (same chunks): {r['plain_zstd_ratio']:.4f}")
    lines += ["", "## Per Layer", "", "| layer | raw bytes | compressed bytes | ratio |", "|---:|---:|---:|---:|"]
    lines += [f"| {layer} | {row['raw_bytes']} | {row['compressed_bytes']} | {row['lossless_ratio']:.4f} |"
              for layer, row in r["per_layer"].items()]
    lines += ["", "## Throughput", "", f"- Encode: {r['encode_mb_s']:.1f} MB/s",
              f"- Decode: {r['decode_mb_s']:.1f} MB/s",
              f"- End to end: {r['throughput_mb_s']:.1f} MB/s over {r['elapsed_s']:.2f} s"]
    if r["skipped"]:
        lines += ["", "## Skipped", "", "| file | reason | cause | detail |", "|---|---|---|---|"]
        lines += [f"| `{item['file']}` | {item['reason']} | {item['cause']} | {_cell(item['detail'])} |"
                  for item in r["skipped"]]
    return lines


def _versions(counts: dict[str, int]) -> str:
    """Blob counts by format version, e.g. ``v2: 7, v1: 1`` (``none`` when nothing was coded)."""
    return ", ".join(f"v{version}: {count}" for version, count in sorted(counts.items(), reverse=True)) or "none"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
