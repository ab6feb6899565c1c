"""The gate rules as plain functions over metric rows (``dict[str, float]``), usable without pytest.

A metric row holds one configuration's run-level numbers under the llm_bench column names
(``h2o_lossy``, ``h2o_lossless_decomp_us``, ...) plus ``decode_tps``, ``lossless_online`` (the
offline online-sim ratio over the front_n layers) and, when measured, ``h2o_fidelity_top1`` and
``h2o_fidelity_ppl_delta`` (the fidelity suite's means over ``h2o_fidelity_texts`` texts when it ran).
The rule names and default targets are the original v4 gate's; ``fidelity_pass`` is ours.

``decode_pass`` judges the drop ``1 - decode / baseline`` from the row's paired rounds when it has
them (``decode_log_ratios``: one log-ratio per round against the baseline runs adjacent in time; or
``decode_tps_rounds`` against a fixed baseline): the Hodges-Lehmann estimate and its exact interval
(:mod:`h2o_gates.speed_stats`) pass when the whole interval is within the target, fail when it is wholly
beyond, and are ``undecided`` otherwise; ``Thresholds.undecided`` says what an undecided verdict
counts as. A row without rounds (an external log) is judged on its single number.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Mapping

from .speed_stats import DEFAULT_CONFIDENCE, DropVerdict, drop_verdict

RULES: tuple[str, ...] = ("lossy_pass", "lossless_online_pass", "decode_pass", "runtime_decomp_pass",
                          "runtime_queue_peak_pass", "runtime_fallback_pass", "fidelity_pass")
GateMode = Literal["joint", "independent"]
UndecidedPolicy = Literal["pass", "fail"]


@dataclass(frozen=True)
class Thresholds:
    """Targets and limits; a negative limit (or ``None``) turns its rule off, as in the original."""

    lossy_target: float = 3.0
    lossless_target: float = 1.3
    decode_drop_target: float = 0.05
    decode_baseline: float | None = None  # fixed tok/s; None: the same-run baseline
    require_runtime_decomp: bool = True
    max_queue_peak: float = -1.0
    max_fallback: float = -1.0
    min_top1: float | None = None
    max_ppl_delta: float | None = None
    undecided: UndecidedPolicy = "pass"  # what a decode verdict still undecided after the last round counts as
    confidence: float = DEFAULT_CONFIDENCE  # of the decode-drop interval

    def as_dict(self) -> dict[str, float | bool | None]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """One rule on one configuration: ``enabled`` False means reported, not enforced.

    ``state`` is ``pass``, ``fail``, ``undecided`` (a speed interval that straddles the target; then
    ``passed`` follows ``Thresholds.undecided``) or ``off``; ``interval`` and ``coverage`` are the
    decode drop's, when measured in paired rounds."""

    rule: str
    passed: bool
    enabled: bool
    value: float | None
    target: float | None
    reason: str
    state: str = ""
    interval: tuple[float, float] | None = None
    coverage: float | None = None
    rounds: int | None = None

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", ("pass" if self.passed else "fail") if self.enabled else "off")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Overall:
    """``overall_pass`` and the configurations it rests on."""

    passed: bool
    mode: GateMode
    passing: list[str] = field(default_factory=list)
    reason: str = ""


def _num(row: Mapping[str, float], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4g}"


def format_number(fmt: str, value: float) -> str:
    """``fmt.format(value)``, except that a finite value that rounds to zero shows unsigned
    (``0.000``, never ``-0.000`` or ``+0.000``)."""
    text = fmt.format(value)
    if math.isfinite(value) and text[:1] in "+-" and not any(c in "123456789" for c in text):
        return text[1:]
    return text


def decode_drop(decode_tps: float | None, baseline_tps: float | None) -> float | None:
    """``(baseline - decode) / baseline``; None when either is unknown or the baseline is not positive."""
    if decode_tps is None or baseline_tps is None or baseline_tps <= 0:
        return None
    return (baseline_tps - decode_tps) / baseline_tps


def check_row(row: Mapping[str, float], t: Thresholds, baseline_tps: float | None = None,
              name: str = "config") -> dict[str, Verdict]:
    """Every rule on one metric row. ``baseline_tps`` is the decode baseline (``t.decode_baseline``
    wins when set); a reason is one line naming value, target and configuration."""
    out: dict[str, Verdict] = {}

    def at_least(rule: str, key: str, target: float, label: str) -> None:
        value = _num(row, key)
        ok = value is not None and value >= target
        out[rule] = Verdict(rule, ok, True, value, target,
                            f"{label} {_fmt(value)} {'>=' if ok else '<'} {target:g} ({name})")

    at_least("lossy_pass", "h2o_lossy", t.lossy_target, "h2o_lossy")
    source = row.get("lossless_online_source", "online_sim")
    at_least("lossless_online_pass", "lossless_online", t.lossless_target, f"lossless_online[{source}]")

    out["decode_pass"] = _decode(row, t, baseline_tps, name)

    decomp = _num(row, "h2o_lossless_decomp_us")
    ok = decomp is not None and decomp > 0
    out["runtime_decomp_pass"] = Verdict("runtime_decomp_pass", ok or not t.require_runtime_decomp,
                                         t.require_runtime_decomp, decomp, 0.0,
                                         f"h2o_lossless_decomp_us {_fmt(decomp)} {'>' if ok else '<='} 0 ({name})")
    for rule, key, limit in (("runtime_queue_peak_pass", "h2o_lossless_queue_peak", t.max_queue_peak),
                             ("runtime_fallback_pass", "h2o_lossless_fallback", t.max_fallback)):
        value = _num(row, key)
        if limit < 0:
            out[rule] = Verdict(rule, True, False, value, None, f"{key} {_fmt(value)}, no limit set ({name})")
        else:
            ok = value is not None and value <= limit
            out[rule] = Verdict(rule, ok, True, value, limit,
                                f"{key} {_fmt(value)} {'<=' if ok else '>'} {limit:g} ({name})")
    out["fidelity_pass"] = _fidelity(row, t, name)
    return out


def paired_drop(row: Mapping[str, Any], t: Thresholds) -> DropVerdict | None:
    """The decode drop of a row measured in paired rounds, or None for a row without rounds.

    Against a fixed ``t.decode_baseline`` each round is ``log(decode / baseline)``; otherwise the
    row's ``decode_log_ratios`` (each round against its adjacent same-run baseline runs)."""
    if t.decode_baseline is not None:
        rounds = [v for v in row.get("decode_tps_rounds") or [] if isinstance(v, (int, float)) and v > 0]
        logs = [math.log(v / t.decode_baseline) for v in rounds]
    else:
        logs = [float(v) for v in row.get("decode_log_ratios") or [] if isinstance(v, (int, float))]
    logs = [v for v in logs if math.isfinite(v)]
    return drop_verdict(logs, t.decode_drop_target, t.confidence) if logs else None


def _decode(row: Mapping[str, Any], t: Thresholds, baseline_tps: float | None, name: str) -> Verdict:
    baseline = t.decode_baseline if t.decode_baseline is not None else baseline_tps
    decode = _num(row, "decode_tps")
    paired = paired_drop(row, t)
    target = t.decode_drop_target
    if paired is not None:
        against = f"fixed baseline {baseline:g} tok/s" if t.decode_baseline is not None else "adjacent baseline runs"
        interval = (paired.drop_lo, paired.drop_hi) if paired.rounds > 1 else None
        lo, hi = (format_number("{:+.3f}", v) for v in (paired.drop_lo, paired.drop_hi))
        spread = f"[{lo}, {hi}] at {paired.coverage:.0%}" if paired.rounds > 1 else "(1 round: no interval)"
        verdict = {"pass": f"<= {target:g}", "fail": f"> {target:g}",
                   "undecided": f"straddles {target:g}: undecided, counted as {t.undecided}"}[paired.state]
        passed = paired.state == "pass" or (paired.state == "undecided" and t.undecided == "pass")
        drop = format_number("{:+.4f}", paired.drop)
        reason = f"decode drop {drop} {spread} over {paired.rounds} paired rounds vs {against} {verdict} ({name})"
        return Verdict("decode_pass", passed, True, paired.drop, target, reason, paired.state, interval,
                       paired.coverage, paired.rounds)
    if baseline is None or baseline <= 0:
        return Verdict("decode_pass", True, False, None, target,
                       f"no decode baseline: decode {_fmt(decode)} tok/s not gated ({name})")
    drop = decode_drop(decode, baseline)
    ok = drop is not None and drop <= target
    return Verdict("decode_pass", ok, True, drop, target,
                   f"decode drop {_fmt(drop)} ({_fmt(decode)} vs baseline {baseline:.4g} tok/s, one unpaired number) "
                   f"{'<=' if ok else '>'} {target:g} ({name})")


def _fidelity(row: Mapping[str, float], t: Thresholds, name: str) -> Verdict:
    top1, ppl = _num(row, "h2o_fidelity_top1"), _num(row, "h2o_fidelity_ppl_delta")
    texts = _num(row, "h2o_fidelity_texts")
    text = f"top1 {_fmt(top1)}, ppl delta {_fmt(ppl)}" + (f" (mean of {texts:.0f} texts)" if texts else "")
    enabled = t.min_top1 is not None or t.max_ppl_delta is not None
    if not enabled:
        return Verdict("fidelity_pass", True, False, top1, None, f"{text}, no limit set ({name})")
    failures = []
    if t.min_top1 is not None and (top1 is None or top1 < t.min_top1):
        failures.append(f"top1 {_fmt(top1)} < {t.min_top1:g}")
    if t.max_ppl_delta is not None and (ppl is None or ppl > t.max_ppl_delta):
        failures.append(f"ppl delta {_fmt(ppl)} > {t.max_ppl_delta:g}")
    limits = ", ".join(part for part in (f"top1 >= {t.min_top1:g}" if t.min_top1 is not None else "",
                                         f"ppl delta <= {t.max_ppl_delta:g}" if t.max_ppl_delta is not None else "")
                       if part)
    of = f" (mean of {texts:.0f} texts)" if texts and failures else ""
    reason = f"{'; '.join(failures)}{of} ({name})" if failures else f"{text} within {limits} ({name})"
    return Verdict("fidelity_pass", not failures, True, top1, t.min_top1, reason)


def config_passes(verdicts: Mapping[str, Verdict]) -> bool:
    """Whether every enabled rule passes."""
    return all(v.passed for v in verdicts.values() if v.enabled)


def overall_joint(verdicts: Mapping[str, Mapping[str, Verdict]]) -> Overall:
    """Ours: at least one configuration passes every enabled rule at once."""
    passing = [name for name, rules in verdicts.items() if config_passes(rules)]
    if passing:
        return Overall(True, "joint", passing, f"{len(passing)}/{len(verdicts)} configurations pass every rule")
    if not verdicts:
        return Overall(False, "joint", [], "no configurations")
    failed = {name: [r for r, v in rules.items() if v.enabled and not v.passed] for name, rules in verdicts.items()}
    detail = "; ".join(f"{name}: {', '.join(rules)}" for name, rules in failed.items())
    return Overall(False, "joint", [], f"no configuration passes every rule ({detail})")


def best_of(rows: Mapping[str, Mapping[str, float]], t: Thresholds,
            baselines: Mapping[str, float | None] | None = None) -> dict[str, Verdict]:
    """The original's per-metric "best of" (analyze_h2o_v4.py; spec §8.2 step 7): each rule on one number
    aggregated over the rows: max ``h2o_lossy``, max ``h2o_lossless_decomp_us``, max queue peak and max
    fallback against their limits, the decode of the fastest row (here: the smallest drop against each row's
    baseline), and ``lossless_online``: the one offline ratio, or, when every row falls back to its runtime
    ``h2o_lossless``, the mean over all rows. A value no row has is read as 0, as the original's parse_float."""
    if not rows:
        return {}
    baselines = baselines or {}
    combined: dict[str, Any] = {}
    names: dict[str, str] = {}
    notes: dict[str, str] = {}
    for key in ("h2o_lossy", "h2o_lossless_decomp_us", "h2o_lossless_queue_peak", "h2o_lossless_fallback"):
        names[key], combined[key], notes[key] = _best(rows, key)
    names["lossless_online"], combined["lossless_online"], notes["lossless_online"] = _best_lossless(rows)
    names["h2o_fidelity_top1"], top1 = _present_best(rows, "h2o_fidelity_top1", max)
    names["h2o_fidelity_ppl_delta"], ppl = _present_best(rows, "h2o_fidelity_ppl_delta", min)
    combined.update({k: v for k, v in (("h2o_fidelity_top1", top1), ("h2o_fidelity_ppl_delta", ppl)) if v is not None})
    decode_name = _best_decode(rows, t, baselines)
    for key in ("decode_tps", "decode_log_ratios", "decode_tps_rounds"):
        if key in rows[decode_name]:
            combined[key] = rows[decode_name][key]
    combined["lossless_online_source"] = rows[next(iter(rows))].get("lossless_online_source", "online_sim")
    verdicts = check_row(combined, t, baselines.get(decode_name), "best of")
    rule_keys = {"lossy_pass": "h2o_lossy", "lossless_online_pass": "lossless_online",
                 "runtime_decomp_pass": "h2o_lossless_decomp_us", "runtime_queue_peak_pass": "h2o_lossless_queue_peak",
                 "runtime_fallback_pass": "h2o_lossless_fallback", "fidelity_pass": "h2o_fidelity_top1"}
    out = {}
    for rule, v in verdicts.items():
        key = rule_keys.get(rule)
        source = decode_name if key is None else names[key]
        reason = v.reason.replace("(best of)", f"(best: {source}{notes.get(key or '', '')})")
        out[rule] = replace(v, reason=reason)
    return out


def _present_best(rows: Mapping[str, Mapping[str, float]], key: str, pick=max) -> tuple[str, float | None]:
    """``(row name, value)`` of the best row having ``key`` (the first row and None when none has it)."""
    present = [(name, value) for name, row in rows.items() if (value := _num(row, key)) is not None]
    return pick(present, key=lambda item: item[1]) if present else (next(iter(rows)), None)


def _best(rows: Mapping[str, Mapping[str, float]], key: str) -> tuple[str, float, str]:
    """``(row, max value, note)``; a key no row has reads 0, as the original's parse_float default."""
    name, value = _present_best(rows, key)
    return (name, value, "") if value is not None else (name, 0.0, f"; no {key} in any row: read as 0, as the original")


def _best_lossless(rows: Mapping[str, Mapping[str, float]]) -> tuple[str, float, str]:
    """``lossless_online`` of the best of: the mean over all rows (missing as 0) when every row falls back
    to its runtime ``h2o_lossless`` (analyze_h2o_v4.py's ``avg_runtime_lossless``), else the largest ratio
    (the one offline ratio when the rows share it)."""
    if any(row.get("lossless_online_source") != "runtime" for row in rows.values()):
        return _best(rows, "lossless_online")
    values = [_num(row, "lossless_online") for row in rows.values()]
    missing = sum(v is None for v in values)
    note = f"; {missing} without h2o_lossless read as 0, as the original" if missing else ""
    name = f"mean of {len(values)} row{'s' if len(values) > 1 else ''}"
    return name, sum(v or 0.0 for v in values) / len(values), note


def _best_decode(rows: Mapping[str, Mapping[str, Any]], t: Thresholds, baselines: Mapping[str, float | None]) -> str:
    """The row with the smallest decode drop against its baseline (the fastest row against one fixed
    baseline, as the original's ``best_decode``); the first row when no drop is known."""
    drops = [(name, paired.drop if (paired := paired_drop(row, t)) is not None
              else decode_drop(_num(row, "decode_tps"), t.decode_baseline or baselines.get(name)))
             for name, row in rows.items()]
    known = [(name, d) for name, d in drops if d is not None]
    return min(known, key=lambda item: item[1])[0] if known else next(iter(rows))


def original_differences(rows: Mapping[str, Mapping[str, Any]], t: Thresholds,
                         baselines: Mapping[str, float | None] | None = None) -> list[str]:
    """Why :func:`best_of` on these rows is not exactly what the original's analyze computes; empty when it is
    (a fixed or no decode baseline, single numbers, one offline ratio or the runtime fallback, no fidelity rule)."""
    out = []
    if t.decode_baseline is None and any(v is not None for v in (baselines or {}).values()):
        out.append("decode against same-run baselines (the original: a fixed --decode-baseline)")
    if any(row.get("decode_log_ratios") or row.get("decode_tps_rounds") for row in rows.values()):
        out.append("decode drop from paired rounds (the original: one number per row)")
    sources = {row.get("lossless_online_source", "online_sim") for row in rows.values()}
    ratios = {_num(row, "lossless_online") for row in rows.values()}
    if sources != {"runtime"} and len(ratios) > 1:
        out.append("a lossless ratio per configuration (the original: one offline ratio for all rows)")
    if t.min_top1 is not None or t.max_ppl_delta is not None:
        out.append("fidelity_pass is ours")
    return out


def overall_independent(rows: Mapping[str, Mapping[str, float]], t: Thresholds,
                        baselines: Mapping[str, float | None] | None = None) -> tuple[Overall, dict[str, Verdict]]:
    """The original's ``overall_pass``: every rule passes on its own best row (possibly different rows)."""
    verdicts = best_of(rows, t, baselines)
    failed = [rule for rule, v in verdicts.items() if v.enabled and not v.passed]
    passed = bool(verdicts) and not failed
    reason = "every rule passes on its best row" if passed else f"failing: {', '.join(failed) or 'no rows'}"
    return Overall(passed, "independent", [], reason), verdicts
