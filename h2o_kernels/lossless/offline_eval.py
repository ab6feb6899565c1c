"""Offline lossless evaluation of KV dumps with the runtime's own codec.

Selects dump entries (stage, layer scope, sequence length), groups them into coding units by the
entry mode, encodes each unit's K and V with the chosen codec profile (``fast``:
:class:`~h2o_kernels.codec.fp16.FP16Codec`, blob version 3; ``ratio``: :mod:`h2o_kernels.codec.ratio`,
blob version 2, built by :func:`h2o_kernels.codec.profiles.make_codec`), decodes every blob back
(:func:`h2o_kernels.codec.profiles.decode_with_info`) and compares it bit for bit, and reports the
original evaluator's JSON keys plus the codec profile and version, ``roundtrip_verified`` and
encode/decode throughput.

Work is spread over ``jobs`` threads: consecutive groups are cut into waves of about 8 MB, each wave
is loaded, encoded, decoded and compared by one thread (each thread has its own encoders), and the
waves' tallies and skipped entries are merged in wave order, so the report is the same for any
``jobs`` (only the timings differ). zstd, xxhash, numpy and the C kernels release the GIL.

RoPE (ratio profile only): a group's K rows are given their positions (each entry's ``seq_start + i``,
so consecutive across the entries of a ``chunked_grouped`` stream) and the model's RoPE from the dump's
meta (``rope_theta`` / ``rope_layout``, see :mod:`h2o_kernels.lossless.kvdump`) or ``rope_theta``; a
meta without RoPE means no RoPE matching, a malformed one also adds a warning naming the file.

Entry modes: ``per_meta`` (one unit per entry), ``aggregate`` (entries of one run x layer (x stage)
concatenated along seq: the upper bound), ``chunked`` (each entry cut into ``online_chunk_seq``
chunks) and ``chunked_grouped`` (aggregate, then cut: the online simulation of the runtime's windows).

Codec modes (the original's ``--codec-mode``): ``adaptive_v22`` is our codec as it is (a predictor per
block of ``adaptive_block_seq`` tokens); ``legacy`` is the original's fixed scheme in our codec: ``delta_seq``
on the hi plane and ``raw`` on the lo plane over the whole tensor, no channel centering.

Skip reasons are the original's (``meta_parse_error``, ``meta_invalid_numeric_fields``, ``invalid_shape``,
``missing_k_or_v_file``, ``missing_k_or_v_binary``, ``binary_read_error``, ``skip_fp32_strict``,
``unsupported_bytes_per_elem_N``, ``compression_failed``), checked in its order; ``npz_read_error`` is
ours. Each ``skipped`` record adds a finer ``cause`` (e.g. ``size_mismatch`` or ``roundtrip_mismatch``
for ``compression_failed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import zstandard

from h2o_kernels.codec import profiles
from h2o_kernels.codec.fp16 import CODEC_NAME, FORMAT_VERSION, CodecError, FP16Codec
from h2o_kernels.codec.predictors import K_DEFAULT, V_DEFAULT, parse_predictors
from h2o_kernels.codec.rope import RopeSpec
from h2o_kernels.lossless.kvdump import DumpEntry, DumpError, iter_dump_files, load_many, meta_rope, read_npz

SCHEMA_VERSION = 5
EntryMode = Literal["per_meta", "aggregate", "chunked", "chunked_grouped"]
ENTRY_MODES: tuple[str, ...] = ("per_meta", "aggregate", "chunked", "chunked_grouped")
CODEC_MODES: tuple[str, ...] = ("adaptive_v22", "legacy")
LEGACY_PREDICTORS: tuple[tuple[str, ...], tuple[str, ...]] = (("delta_seq",), ("raw",))  # (hi, lo), K and V
_MAX_POSITION = 1 << 31  # RoPE positions given to the ratio encoder: strictly increasing, in [0, 2**31)
_WHOLE_TENSOR = 1 << 30  # block_seq of the legacy mode: one block per plane
MAX_DEFAULT_JOBS = 4
# The options that steer the fast profile only, with their defaults: (field, option name, default).
_FAST_ONLY: tuple[tuple[str, str, Any], ...] = (
    ("codec_mode", "--codec-mode", "adaptive_v22"), ("k_hi_predictors", "--k-hi-predictors", K_DEFAULT),
    ("k_lo_predictors", "--k-lo-predictors", K_DEFAULT), ("v_hi_predictors", "--v-hi-predictors", V_DEFAULT),
    ("v_lo_predictors", "--v-lo-predictors", V_DEFAULT), ("predictor_choice", "--predictor-choice", "estimate"),
    ("adaptive_block_seq", "--adaptive-block-seq", 64))
BITSHUFFLE_REFUSAL = ("--bitshuffle: not supported: our codec's blob format ({name} v{version}) has no bit-shuffle "
                      "stage, so a bit-shuffled size would not be the size of a blob that decodes; drop --bitshuffle")


class SelectionError(ValueError):
    """No dump entry survived the filters; the message says which filter removed them."""


def default_jobs() -> int:
    """Worker threads by default: the machine's CPUs, at most ``MAX_DEFAULT_JOBS``."""
    return min(os.cpu_count() or 1, MAX_DEFAULT_JOBS)


@dataclass
class EvalOptions:
    """The original evaluator's options, same names and defaults; then ours: ``codec`` (the profile, ``fast`` or
    ``ratio``; the predictor options and ``codec_mode`` steer ``fast`` only), ``rope_theta`` (the RoPE base for the
    ratio profile's K matching, over the dumps' own; None: the dumps') and ``jobs`` (worker threads, >= 1)."""

    stage: Literal["prefill", "decode", "both"] = "both"
    scope: Literal["front_n", "layer_range", "layer_ids"] = "front_n"
    front_n: int = 2
    layer_start: int = 2
    layer_end: int = -1
    layer_ids: tuple[int, ...] = ()
    zstd_level: int = 3
    strict_fp16: bool = False
    min_seq_len: int = 0
    max_seq_len: int = 0
    entry_mode: EntryMode = "per_meta"
    online_chunk_seq: int = 0
    online_framing_bytes: int = 16
    aggregate_by_stage: bool = False
    adaptive_block_seq: int = 64
    k_hi_predictors: tuple[str, ...] = K_DEFAULT
    k_lo_predictors: tuple[str, ...] = K_DEFAULT
    v_hi_predictors: tuple[str, ...] = V_DEFAULT
    v_lo_predictors: tuple[str, ...] = V_DEFAULT
    predictor_choice: Literal["estimate", "exhaustive"] = "estimate"
    verify: bool = True
    plain_baseline: bool = False
    codec_mode: Literal["adaptive_v22", "legacy"] = "adaptive_v22"
    bitshuffle: bool = False
    codec: Literal["fast", "ratio"] = "fast"
    rope_theta: float | None = None
    jobs: int = field(default_factory=default_jobs)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent option."""
        checks = [
            (self.stage in ("prefill", "decode", "both"), f"--stage: {self.stage!r} is not prefill|decode|both"),
            (self.scope in ("front_n", "layer_range", "layer_ids"),
             f"--scope: {self.scope!r} is not front_n|layer_range|layer_ids"),
            (self.entry_mode in ENTRY_MODES, f"--entry-mode: {self.entry_mode!r} is not one of {ENTRY_MODES}"),
            (self.scope != "front_n" or self.front_n > 0, "--front-n must be > 0 when scope=front_n"),
            (self.scope != "layer_ids" or bool(self.layer_ids), "--layer-ids must be non-empty when scope=layer_ids"),
            (self.adaptive_block_seq > 0, "--adaptive-block-seq must be > 0"),
            (self.online_chunk_seq >= 0, "--online-chunk-seq must be >= 0"),
            (self.online_framing_bytes >= 0, "--online-framing-bytes must be >= 0"),
            (self.min_seq_len >= 0 and self.max_seq_len >= 0, "--min-seq-len/--max-seq-len must be >= 0"),
            (self.codec_mode in CODEC_MODES, f"--codec-mode: {self.codec_mode!r} is not one of {CODEC_MODES}"),
            (not self.bitshuffle,
             BITSHUFFLE_REFUSAL.format(name=CODEC_NAME, version=profiles.VERSIONS.get(self.codec, FORMAT_VERSION))),
            (self.codec in profiles.PROFILES, f"--codec: {self.codec!r} is not one of {profiles.PROFILES}"),
            (isinstance(self.jobs, int) and not isinstance(self.jobs, bool) and self.jobs >= 1,
             f"--jobs must be an integer >= 1, got {self.jobs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.rope_theta is not None:
            if self.codec != "ratio":
                raise ValueError("--rope-theta applies to --codec ratio only (the fast profile does not match rows "
                                 "through RoPE)")
            try:
                RopeSpec(self.rope_theta)
            except ValueError as exc:
                raise ValueError(f"--rope-theta: {exc}") from None
        for name in ("k_hi_predictors", "k_lo_predictors", "v_hi_predictors", "v_lo_predictors"):
            setattr(self, name, parse_predictors(getattr(self, name), "--" + name.replace("_", "-")))
        if self.codec == "ratio":
            given = [option + (f" {getattr(self, name)}" if name == "codec_mode" else "")
                     for name, option, default in _FAST_ONLY if getattr(self, name) != default]
            if given:
                verb, them = ("apply", "them") if len(given) > 1 else ("applies", "it")
                raise ValueError(f"--codec ratio: {', '.join(given)} {verb} to the fast profile only (the ratio "
                                 f"profile models the hi byte itself); drop {them} or use --codec fast")

    def plane_predictors(self, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (hi, lo) predictor sets that run for ``kind`` ("k" or "v"): the options', or legacy's fixed pair."""
        if self.codec_mode == "legacy":
            return LEGACY_PREDICTORS
        return (self.k_hi_predictors, self.k_lo_predictors) if kind == "k" else (self.v_hi_predictors,
                                                                                  self.v_lo_predictors)

    def encoder(self, kind: str, rope: RopeSpec | None = None) -> profiles.Encoder:
        """The encoder of ``kind`` ("k" or "v") for these options (not thread-safe: one per thread).

        ``fast``: the :class:`FP16Codec` that ``profiles.make_codec("fast", ...)`` builds, with these options'
        predictor sets, block length, zstd level and choice (``make_codec`` takes the predictor sets only);
        ``ratio``: ``profiles.make_codec("ratio", kind, rope=rope)``.
        """
        if self.codec == "ratio":
            return profiles.make_codec("ratio", kind, rope=rope)  # type: ignore[arg-type]
        hi, lo = self.plane_predictors(kind)
        if self.codec_mode == "legacy":
            return FP16Codec(hi, lo, block_seq=_WHOLE_TENSOR, level=self.zstd_level, center=False)
        return FP16Codec(hi, lo, block_seq=self.adaptive_block_seq, level=self.zstd_level,
                         choose=self.predictor_choice)

    def codec_scheme(self) -> str:
        """What the codec does under these options, in words (the JSON's ``codec_scheme``)."""
        if self.codec == "ratio":
            return ("ratio profile: per-channel context model of the hi byte with a range coder, raw lo byte, row "
                    "matching (K through RoPE where the dumps or --rope-theta give it); a fast-profile blob where that "
                    "is smaller")
        if self.codec_mode == "legacy":
            return "fixed predictors (hi delta_seq, lo raw) over the whole tensor, no channel centering"
        return f"a predictor per {self.adaptive_block_seq}-token block, chosen by {self.predictor_choice}"

    def keeps_layer(self, layer_id: int) -> bool:
        """Whether the layer scope selects ``layer_id``."""
        if self.scope == "front_n":
            return 0 <= layer_id < self.front_n
        if self.scope == "layer_range":
            return layer_id >= self.layer_start and (self.layer_end < 0 or layer_id <= self.layer_end)
        return layer_id in self.layer_ids

    def scope_text(self) -> str:
        """The layer scope in words, for messages."""
        if self.scope == "front_n":
            return f"scope front_n (layers 0..{self.front_n - 1})"
        if self.scope == "layer_range":
            end = "end" if self.layer_end < 0 else str(self.layer_end)
            return f"scope layer_range (layers {self.layer_start}..{end})"
        return f"scope layer_ids {list(self.layer_ids)}"


@dataclass
class _Tally:
    """Raw and compressed bytes of one tensor kind (K or V), its blob versions, predictor usage (fast-profile blobs)."""

    raw: int = 0
    compressed: int = 0
    meta: int = 0
    plain: int = 0
    hi_modes: Counter = field(default_factory=Counter)
    lo_modes: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)


@dataclass
class _Unit:
    """One coding unit: the K and V to encode, the framing bytes charged per tensor, and the rows' RoPE
    positions (ratio profile with RoPE only)."""

    layer_id: int
    k: np.ndarray
    v: np.ndarray
    framing: int
    positions: np.ndarray | None = None


@dataclass
class _Group:
    """Entries evaluated together: all their units count, or none of them do. ``rope``: the RoPE their K is
    matched through (ratio profile only)."""

    entries: list[DumpEntry]
    units: Callable[[], list[_Unit]]
    rope: RopeSpec | None = None


@dataclass
class _Failed:
    """A group that failed: the original's reason, our cause, the file named and the message."""

    reason: str
    cause: str
    source: Path
    detail: str


# per unit and kind: (raw bytes, blob bytes, framing bytes, blob info, plain-baseline bytes)
_Part = tuple[int, int, int, Any, int]
_Outcome = list[tuple[int, dict[str, _Part]]] | _Failed
Progress = Callable[[int, int, dict], None]
_STAGES = ("load", "encode", "decode", "compare")


def evaluate(dump_dir: Path, options: EvalOptions, progress: Progress | None = None) -> dict:
    """Evaluate the dumps under ``dump_dir``; return the result dictionary (the JSON report).

    Raises :class:`SelectionError` when no entry is selected and ``ValueError`` for bad options. An exception
    other than a codec or dump failure (which skips its group) stops every worker and propagates.
    """
    options.validate()
    dump_dir = Path(dump_dir)
    if not dump_dir.is_dir():
        raise SelectionError(f"--dump-dir {dump_dir}: not a directory")
    started = time.perf_counter()
    selection = _select(dump_dir, options)
    groups = list(_groups(selection.entries, options))
    waves = list(_waves(groups))
    tallies = {"k": _Tally(), "v": _Tally()}
    per_layer: dict[int, list[int]] = {}
    timing = dict.fromkeys(_STAGES, 0.0)
    coded_units = 0
    done = 0
    coders = _Coders(options, threading.Event())
    with contextlib.closing(_in_order(waves, coders, options.jobs)) as results:
        for outcomes, wave_timing in results:
            for stage, seconds in wave_timing.items():
                timing[stage] += seconds
            for outcome in outcomes:
                done += 1
                if isinstance(outcome, _Failed):
                    selection.skip(outcome.reason, outcome.source, outcome.detail, outcome.cause)
                    continue
                coded_units += len(outcome)
                _add(outcome, tallies, per_layer)
            if progress is not None:
                progress(done, len(groups), _ratios(tallies))
    elapsed = time.perf_counter() - started
    return _report(dump_dir, options, selection, groups, tallies, per_layer, timing, coded_units, elapsed)


def _add(outcome: list[tuple[int, dict[str, _Part]]], tallies: dict[str, _Tally],
         per_layer: dict[int, list[int]]) -> None:
    """Count a coded group's units into the tallies and the per-layer bytes."""
    for layer_id, parts in outcome:
        for kind, (raw, comp, framing, info, plain) in parts.items():
            tally = tallies[kind]
            tally.plain += plain + framing
            tally.raw += raw
            tally.compressed += comp + framing
            tally.meta += framing
            tally.versions[info.version] += 1
            if info.version in (1, profiles.VERSIONS["fast"]):  # the fast profile's blobs, either format
                tally.hi_modes.update(info.hi.predictors)
                tally.lo_modes.update(info.lo.predictors)
            layer = per_layer.setdefault(layer_id, [0, 0])
            layer[0] += raw
            layer[1] += comp + framing


@dataclass
class _Selection:
    entries: list[DumpEntry] = field(default_factory=list)
    scanned: int = 0
    converted_fp32: int = 0
    skip_reasons: Counter = field(default_factory=Counter)
    skipped: list[dict] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, source: Path, detail: str, cause: str | None = None) -> None:
        """Count a skipped entry under the original's ``reason``; ``cause`` is our finer name (default: reason)."""
        self.skip_reasons[reason] += 1
        self.skipped.append({"file": str(source), "reason": reason, "cause": cause or reason, "detail": detail})


# The original's meta fields read as integers, with its defaults for a missing key.
_META_INTS = {"layer_id": -1, "seq_start": 0, "seq_len": 0, "kv_heads": 0, "head_dim": 0, "bytes_per_elem": 0}


def _select(dump_dir: Path, options: EvalOptions) -> _Selection:
    sel = _Selection()
    for path in iter_dump_files(dump_dir):
        sel.scanned += 1
        entry = _npz_entry(path, options, sel) if path.suffix == ".npz" else _meta_entry(path, options, sel)
        if entry is not None and _element_size_ok(entry, options, sel):
            sel.entries.append(entry)
    if not sel.entries:
        raise SelectionError(_empty_message(dump_dir, sel))
    return sel


def _meta_entry(path: Path, options: EvalOptions, sel: _Selection) -> DumpEntry | None:
    """A ``meta_*.json`` entry that passes the filters, checked in the original's order; None if skipped or
    filtered: parse, stage, integer fields, layer scope, shape, seq-len bounds, file names, files present."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return sel.skip("meta_parse_error", path, f"{path}: not readable JSON ({exc})")
    if not isinstance(meta, dict):
        return sel.skip("meta_parse_error", path, f"{path}: expected a JSON object, got {type(meta).__name__}")
    stage = str(meta.get("stage", "unknown"))
    if not _keeps_stage(stage, options, sel):
        return None
    ints = {key: meta.get(key, default) for key, default in _META_INTS.items()}
    bad = {key: value for key, value in ints.items() if isinstance(value, bool) or not isinstance(value, int)}
    if bad:
        return sel.skip("meta_invalid_numeric_fields", path, f"{path}: not integers: {bad}")
    shape = {key: ints[key] for key in ("seq_len", "kv_heads", "head_dim")}
    if not _passes_scope(ints["layer_id"], shape, path, options, sel):
        return None
    names = {key: meta.get(key, "") for key in ("k_file", "v_file")}
    if not all(isinstance(name, str) and name for name in names.values()):
        return sel.skip("missing_k_or_v_file", path, f"{path}: k_file/v_file must name files, got {names}")
    k_path, v_path = (path.parent / names["k_file"], path.parent / names["v_file"])
    missing = [str(p) for p in (k_path, v_path) if not p.is_file()]
    if missing:
        return sel.skip("missing_k_or_v_binary", path, f"{path}: missing K/V file(s) {missing}")
    run_id = meta.get("run_id", "")
    rope, problem = meta_rope(meta, path)
    if problem is not None:
        sel.warnings.append(problem)
    return DumpEntry(source=path, run_id=run_id if isinstance(run_id, str) else "", stage=stage,
                     k_path=k_path, v_path=v_path, rope=rope, **ints)


def _npz_entry(path: Path, options: EvalOptions, sel: _Selection) -> DumpEntry | None:
    """An ``.npz`` entry that passes the filters; None if unreadable (``npz_read_error``, ours) or filtered."""
    try:
        entry = read_npz(path)
    except DumpError as exc:
        return sel.skip("npz_read_error", path, str(exc))
    shape = {"seq_len": entry.seq_len, "kv_heads": entry.kv_heads, "head_dim": entry.head_dim}
    if _keeps_stage(entry.stage, options, sel) and _passes_scope(entry.layer_id, shape, path, options, sel):
        return entry
    return None


def _keeps_stage(stage: str, options: EvalOptions, sel: _Selection) -> bool:
    if options.stage == "both" or stage == options.stage:
        return True
    sel.filtered[f"--stage {options.stage} (entry stage {stage!r})"] += 1
    return False


def _passes_scope(layer_id: int, shape: dict[str, int], path: Path, options: EvalOptions, sel: _Selection) -> bool:
    """Layer scope, then the original's ``invalid_shape`` (a length, heads or dim <= 0), then the seq-len bounds."""
    if not options.keeps_layer(layer_id):
        sel.filtered[options.scope_text()] += 1
        return False
    if min(shape.values()) <= 0:
        sel.skip("invalid_shape", path, f"{path}: seq_len, kv_heads and head_dim must be > 0, got {shape}")
        return False
    seq_len = shape["seq_len"]
    if options.min_seq_len and seq_len < options.min_seq_len:
        sel.filtered[f"--min-seq-len {options.min_seq_len}"] += 1
        return False
    if options.max_seq_len and seq_len > options.max_seq_len:
        sel.filtered[f"--max-seq-len {options.max_seq_len}"] += 1
        return False
    return True


def _element_size_ok(entry: DumpEntry, options: EvalOptions, sel: _Selection) -> bool:
    """fp16 passes; fp32 is converted (counted) unless ``--strict-fp16``; anything else is skipped."""
    if entry.bytes_per_elem == 2:
        return True
    if entry.bytes_per_elem == 4 and not options.strict_fp16:
        sel.converted_fp32 += 1
        return True
    if entry.bytes_per_elem == 4:
        sel.skip("skip_fp32_strict", entry.source, f"{entry.source}: fp32 dump skipped because of --strict-fp16")
    else:
        sel.skip(f"unsupported_bytes_per_elem_{entry.bytes_per_elem}", entry.source,
                 f"{entry.source}: bytes_per_elem={entry.bytes_per_elem}, expected 2 (fp16) or 4 (fp32)")
    return False


def _empty_message(dump_dir: Path, sel: _Selection) -> str:
    if sel.scanned == 0:
        return f"no meta_*.json or .npz dump files under {dump_dir}"
    parts = [f"{count} by {name}" for name, count in sel.filtered.most_common()]
    parts += [f"{count} unreadable ({reason})" for reason, count in sel.skip_reasons.most_common()]
    text = f"no entries selected from {sel.scanned} dump file(s) under {dump_dir}: removed " + ", ".join(parts)
    if sel.skipped:
        text += f"; first problem: {sel.skipped[0]['detail']}"
    return text


def _groups(entries: list[DumpEntry], options: EvalOptions) -> Iterator[_Group]:
    if options.entry_mode in ("per_meta", "chunked"):
        chunk = options.online_chunk_seq if options.entry_mode == "chunked" else 0
        framing = options.online_framing_bytes if options.entry_mode == "chunked" else 0
        for entry in entries:
            rope = _group_rope([entry], options)
            yield _Group([entry], lambda e=entry, r=rope: _chunks([e], chunk, framing, r), rope)
        return
    grouped: dict[tuple, list[DumpEntry]] = {}
    for entry in entries:
        key = (entry.run_id or "__no_run_id__", entry.layer_id, entry.kv_heads, entry.head_dim)
        if options.aggregate_by_stage:
            key += (entry.stage,)
        grouped.setdefault(key, []).append(entry)
    for members in grouped.values():
        members.sort(key=lambda e: e.seq_start)
        rope = _group_rope(members, options)
        if options.entry_mode == "aggregate":
            yield _Group(members, lambda m=members, r=rope: _aggregate(m, r), rope)
        else:
            yield _Group(members, lambda m=members, r=rope: _chunks(m, options.online_chunk_seq,
                                                                     options.online_framing_bytes, r), rope)


def _group_rope(entries: list[DumpEntry], options: EvalOptions) -> RopeSpec | None:
    """The RoPE a group's K is matched through: ratio profile only; ``rope_theta`` over the entries' own (their
    layout, else ``"half"``); None unless every entry of the group has the same one and the entries' positions
    (``seq_start + i``, sorted by ``seq_start``) are strictly increasing within ``[0, 2**31)``."""
    if options.codec != "ratio":
        return None
    if options.rope_theta is not None:
        specs = {RopeSpec(options.rope_theta, e.rope.layout if e.rope else "half") for e in entries}
    else:
        specs = {e.rope for e in entries}
    ends = [0] + [e.seq_start + e.seq_len for e in entries]
    increasing = all(e.seq_start >= end for e, end in zip(entries, ends)) and ends[-1] <= _MAX_POSITION
    return specs.pop() if len(specs) == 1 and increasing else None


def _rope_theta(options: EvalOptions, groups: list) -> float | None:
    """The RoPE base K was matched through: ``--rope-theta``, else the one the dumps record (None when no group
    was matched through RoPE, or the groups' dumps record several)."""
    if options.rope_theta is not None:
        return options.rope_theta
    thetas = {group.rope.theta for group in groups if group.rope is not None}
    return thetas.pop() if len(thetas) == 1 else None


class _SizeMismatch(ValueError):
    """A K/V file's size disagrees with its meta: the original's ``compression_failed`` (cause ``size_mismatch``)."""


class _RoundTripError(CodecError):
    """A blob did not decode back to the exact input (cause ``roundtrip_mismatch``)."""


def _check_sizes(entry: DumpEntry) -> None:
    """Raise :class:`_SizeMismatch` for a K/V file of the wrong size, :class:`DumpError` for one that is gone."""
    if entry.k_path is None or entry.v_path is None:
        return
    expected = entry.raw_bytes // 2
    for path in (entry.k_path, entry.v_path):
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DumpError(f"{entry.source}: cannot read {path}: {exc.strerror or exc}") from None
        if size != expected:
            raise _SizeMismatch(f"{path}: {size} bytes, expected {expected} for shape "
                                f"{[entry.seq_len, entry.kv_heads, entry.head_dim]} at {entry.bytes_per_elem} "
                                f"bytes/elem (from {entry.source.name})")


def _load(entries: list[DumpEntry]) -> tuple[np.ndarray, np.ndarray]:
    for entry in entries:
        _check_sizes(entry)
    k, v = load_many(entries)
    if k.dtype != np.float16:  # fp32 dumps are converted, as the original did
        k, v = k.astype(np.float16), v.astype(np.float16)
    return k, v


def _positions(entries: list[DumpEntry], rope: RopeSpec | None) -> np.ndarray | None:
    """The rows' RoPE positions (each entry's ``seq_start + i``, in order), or None without RoPE."""
    if rope is None:
        return None
    return np.concatenate([entry.seq_start + np.arange(entry.seq_len, dtype=np.int64) for entry in entries])


def _aggregate(entries: list[DumpEntry], rope: RopeSpec | None) -> list[_Unit]:
    k, v = _load(entries)
    return [_Unit(entries[0].layer_id, k, v, 4 + 4 * len(entries), _positions(entries, rope))]


def _chunks(entries: list[DumpEntry], chunk_seq: int, framing: int, rope: RopeSpec | None) -> list[_Unit]:
    k, v = _load(entries)
    positions = _positions(entries, rope)
    seq = k.shape[0]
    step = chunk_seq if 0 < chunk_seq < seq else seq
    return [_Unit(entries[0].layer_id, k[s:s + step], v[s:s + step], framing,
                  None if positions is None else positions[s:s + step]) for s in range(0, seq, step)]


def _waves(groups: list[_Group]) -> Iterator[list[_Group]]:
    """Consecutive groups of about ``_WAVE_BYTES`` raw bytes, coded together to amortise per-call costs."""
    wave: list[_Group] = []
    size = 0
    for group in groups:
        wave.append(group)
        size += sum(entry.raw_bytes for entry in group.entries)
        if size >= _WAVE_BYTES:
            yield wave
            wave, size = [], 0
    if wave:
        yield wave


class _Stopped(Exception):
    """Another wave failed or the run was interrupted: this worker stops (not a codec failure)."""


class _Coders(threading.local):
    """Each worker thread's encoders (codec objects are not thread-safe) and plain-baseline compressor; ``stop``
    is shared (``threading.local`` runs ``__init__`` once per thread with the same arguments)."""

    def __init__(self, options: EvalOptions, stop: threading.Event) -> None:
        self.options = options
        self.stop = stop
        self.encoders: dict[tuple[str, RopeSpec | None], profiles.Encoder] = {}
        self.plain = zstandard.ZstdCompressor(level=options.zstd_level)

    def encoder(self, kind: str, rope: RopeSpec | None) -> profiles.Encoder:
        """This thread's encoder of ``kind`` with ``rope`` (built on first use)."""
        key = (kind, rope)
        if key not in self.encoders:
            self.encoders[key] = self.options.encoder(kind, rope)
        return self.encoders[key]


def _in_order(waves: list[list[_Group]], coders: _Coders,
              jobs: int) -> Iterator[tuple[list[_Outcome], dict[str, float]]]:
    """Each wave's outcomes and timings, in wave order, coded by up to ``jobs`` threads (at most two waves per
    thread in flight). Closing the iterator (an exception, Ctrl-C) stops the workers at their next group."""
    if jobs == 1 or len(waves) < 2:
        for wave in waves:
            yield _code_wave(wave, coders)
        return
    pool = ThreadPoolExecutor(max_workers=min(jobs, len(waves)), thread_name_prefix="h2o-offline")
    todo = iter(waves)
    pending: deque[Future] = deque(pool.submit(_code_wave, wave, coders) for wave in islice(todo, 2 * jobs))
    try:
        while pending:
            result = pending.popleft().result()
            for wave in todo:
                pending.append(pool.submit(_code_wave, wave, coders))
                break
            yield result
    finally:
        coders.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def _code_wave(wave: list[_Group], coders: _Coders) -> tuple[list[_Outcome], dict[str, float]]:
    """Each group's coded units, or a :class:`_Failed` for a group that failed; and the seconds spent per stage.

    The whole wave is coded at once; if anything in it fails, its groups are retried one by one so
    that only the failing ones are skipped.
    """
    timing = dict.fromkeys(_STAGES, 0.0)
    return _code_or_split(wave, coders, timing), timing


def _code_or_split(wave: list[_Group], coders: _Coders, timing: dict[str, float]) -> list[_Outcome]:
    try:
        return list(_code_groups(wave, coders, timing))
    except _FAILURES as exc:
        if len(wave) == 1:
            reason, cause = _reason(exc)
            return [_Failed(reason, cause, wave[0].entries[0].source, str(exc))]
    return [outcome for group in wave for outcome in _code_or_split([group], coders, timing)]


_FAILURES = (CodecError, DumpError, ValueError, TypeError, MemoryError)
_WAVE_BYTES = 8 << 20


def _code_groups(groups: list[_Group], coders: _Coders, timing: dict[str, float]) -> list[_Outcome]:
    """Encode (and verify) every unit of the groups together; raise on the first failure."""
    options = coders.options
    per_group = []
    for group in groups:
        if coders.stop.is_set():
            raise _Stopped
        t0 = time.perf_counter()
        per_group.append([(unit, group.rope) for unit in group.units()])
        timing["load"] += time.perf_counter() - t0
    units = [item for group_units in per_group for item in group_units]
    results: list[tuple[int, dict[str, _Part]]] = [(unit.layer_id, {}) for unit, _ in units]
    for kind in ("k", "v"):
        if coders.stop.is_set():
            raise _Stopped
        tensors = [unit.k if kind == "k" else unit.v for unit, _ in units]
        t0 = time.perf_counter()
        blobs = _encode(kind, units, tensors, coders)
        t1 = time.perf_counter()
        timing["encode"] += t1 - t0
        if options.verify:
            restored = profiles.decode_with_info(blobs)
            t2 = time.perf_counter()
            timing["decode"] += t2 - t1
            for (unit, _), tensor, (back, _) in zip(units, tensors, restored):
                if not np.array_equal(back.view(np.uint16), tensor.view(np.uint16)):
                    raise _RoundTripError(f"{kind.upper()} of layer {unit.layer_id} did not round-trip bit-exactly")
            timing["compare"] += time.perf_counter() - t2
            infos = [info for _, info in restored]
        else:
            infos = [profiles.inspect(blob) for blob in blobs]
        for (_, parts), (unit, _), tensor, blob, info in zip(results, units, tensors, blobs, infos):
            plain = _plain_zstd_bytes(tensor, coders.plain) if options.plain_baseline else 0
            parts[kind] = (tensor.nbytes, len(blob), unit.framing, info, plain)
    out: list[_Outcome] = []
    start = 0
    for group_units in per_group:
        out.append(results[start:start + len(group_units)])
        start += len(group_units)
    return out


def _encode(kind: str, units: list[tuple[_Unit, RopeSpec | None]], tensors: list[np.ndarray],
            coders: _Coders) -> list[bytes]:
    """One blob per tensor; units that share a RoPE (K of the ratio profile; else all) share an encoder call,
    with the rows' positions where the encoder has a RoPE."""
    by_rope: dict[RopeSpec | None, list[int]] = {}
    for i, (_, rope) in enumerate(units):
        by_rope.setdefault(rope if kind == "k" else None, []).append(i)
    blobs: list[bytes] = [b""] * len(tensors)
    for rope, indices in by_rope.items():
        encoder = coders.encoder(kind, rope)
        part = [tensors[i] for i in indices]
        coded = (encoder.encode_many(part) if rope is None
                 else encoder.encode_many(part, [units[i][0].positions for i in indices]))
        for i, blob in zip(indices, coded):
            blobs[i] = blob
    return blobs


def _plain_zstd_bytes(tensor: np.ndarray, zstd: zstandard.ZstdCompressor) -> int:
    """Bytes of the plain baseline: hi and lo byte planes, each in its own zstd frame."""
    words = np.ascontiguousarray(tensor).view(np.uint16)
    planes = ((words >> 8).astype(np.uint8), words.astype(np.uint8))
    return sum(len(zstd.compress(plane)) for plane in planes)


def _reason(exc: Exception) -> tuple[str, str]:
    """(the original's reason, our cause) of a group that failed: an unreadable file is ``binary_read_error``;
    everything else failed while compressing, as in the original (``compression_failed``)."""
    if isinstance(exc, DumpError):
        return "binary_read_error", "read_error"
    if isinstance(exc, _SizeMismatch):
        return "compression_failed", "size_mismatch"
    if isinstance(exc, _RoundTripError):
        return "compression_failed", "roundtrip_mismatch"
    return "compression_failed", "codec_error"


def _ratio(raw: int, comp: int) -> float:
    return raw / comp if comp > 0 else 0.0


def _ratios(tallies: dict[str, _Tally]) -> dict:
    raw = tallies["k"].raw + tallies["v"].raw
    comp = tallies["k"].compressed + tallies["v"].compressed
    return {"raw_bytes": raw, "compressed_bytes": comp, "lossless_ratio": _ratio(raw, comp)}


def _report(dump_dir: Path, options: EvalOptions, sel: _Selection, groups: list[_Group],
            tallies: dict[str, _Tally], per_layer: dict[int, list[int]], timing: dict[str, float],
            coded_units: int, elapsed: float) -> dict:
    k, v = tallies["k"], tallies["v"]
    totals = _ratios(tallies)
    aggregated = options.entry_mode in ("aggregate", "chunked_grouped")
    opts = asdict(options)

    def modes(counter: Counter, names: tuple[str, ...]) -> dict[str, int]:
        return {name: int(counter.get(name, 0)) for name in names}

    mb = totals["raw_bytes"] / 1e6
    return {
        "schema_version": SCHEMA_VERSION,
        "dump_dir": str(dump_dir.resolve()),
        **{key: opts[key] for key in ("stage", "scope", "front_n", "layer_start", "layer_end")},
        "layer_ids": sorted(options.layer_ids),
        "selected_layers": sorted({e.layer_id for e in sel.entries}),
        "selected_entries": len(sel.entries),
        "selected_dumps": len({e.run_id or str(e.source.parent) for e in sel.entries}),
        **{key: opts[key] for key in ("entry_mode", "online_chunk_seq", "online_framing_bytes",
                                      "aggregate_by_stage")},
        "aggregate_groups": len(groups) if aggregated else 0,
        "online_chunks": 2 * coded_units if options.entry_mode in ("chunked", "chunked_grouped") else 0,
        "codec": CODEC_NAME,
        "codec_profile": options.codec,
        "codec_version": profiles.VERSIONS[options.codec],
        **{f"{kind}_blob_versions": {str(version): count for version, count in sorted(tally.versions.items())}
           for kind, tally in (("k", k), ("v", v))},
        "rope_theta": _rope_theta(options, groups),
        "rope_groups": sum(group.rope is not None for group in groups),
        "codec_mode": options.codec_mode,
        "codec_scheme": options.codec_scheme(),
        "predictor_choice": options.predictor_choice,
        "bitshuffle": False,
        "adaptive_block_seq": options.adaptive_block_seq,
        **{f"{kind}_{plane}_predictors": list(names) for kind in ("k", "v")
           for plane, names in zip(("hi", "lo"), options.plane_predictors(kind))},
        "zstd_level": options.zstd_level,
        "k_raw_bytes": k.raw, "k_compressed_bytes": k.compressed,
        "v_raw_bytes": v.raw, "v_compressed_bytes": v.compressed,
        "k_chunk_meta_bytes": k.meta, "v_chunk_meta_bytes": v.meta,
        "raw_bytes": totals["raw_bytes"], "compressed_bytes": totals["compressed_bytes"],
        "k_lossless_ratio": _ratio(k.raw, k.compressed),
        "v_lossless_ratio": _ratio(v.raw, v.compressed),
        "lossless_ratio": totals["lossless_ratio"],
        "weighted_lossless_ratio": totals["lossless_ratio"],
        **{f"{kind}_{plane}_mode_counts": modes(counter, names) for kind, tally in (("k", k), ("v", v))
           for plane, counter, names in zip(("hi", "lo"), (tally.hi_modes, tally.lo_modes),
                                            options.plane_predictors(kind))},
        "per_layer": {str(layer): {"raw_bytes": raw, "compressed_bytes": comp, "lossless_ratio": _ratio(raw, comp)}
                      for layer, (raw, comp) in sorted(per_layer.items())},
        "scanned_entries": sel.scanned,
        "converted_fp32_entries": sel.converted_fp32,
        "skipped_entries": sum(sel.skip_reasons.values()),
        "skip_reasons": dict(sel.skip_reasons),
        "skipped": sel.skipped,
        "filtered": dict(sel.filtered),
        "warnings": sel.warnings,
        **({"plain_zstd_compressed_bytes": k.plain + v.plain,
            "plain_zstd_ratio": _ratio(k.raw + v.raw, k.plain + v.plain)} if options.plain_baseline else {}),
        "roundtrip_verified": options.verify and coded_units > 0,
        "encode_mb_s": mb / timing["encode"] if timing["encode"] > 0 else 0.0,
        "decode_mb_s": mb / timing["decode"] if timing["decode"] > 0 else 0.0,
        "elapsed_s": elapsed,
        "throughput_mb_s": mb / elapsed if elapsed > 0 else 0.0,
        "timing": {"jobs": options.jobs, **{f"{stage}_s": seconds for stage, seconds in timing.items()}},
    }
