"""The fidelity suite: what a configuration's KV cache costs the model over several real texts.

Each text (see :data:`h2o_kernels.fidelity.SUITE_KINDS`, or a file) gives a prompt and a teacher-forced
continuation; per text, a full-cache reference run, the configuration's run and, for an H2O configuration,
a sink+recent run (the same configuration with ``kv_h2o_heavy_hitters: false``, so the report shows what
heavy hitters buy). Per text: top-1 agreement, perplexity delta and KL against the reference, and the held
ratio (``h2o_lossy``); over the texts: min, median, max and the mean, which the gate reads.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from h2o_kernels.fidelity import SUITE_TEXTS, SuiteTextError, continuation_perplexity, fidelity, spread, suite_text
from h2o_kernels.runtimes.base import Runtime

Progress = Callable[[str], None]
FULL_CACHE: dict[str, Any] = {"kv_h2o_enable": False, "kv_lossless_enable": False}
METHODS = ("full", "h2o", "sink_recent")  # full: the reference; h2o: the configuration; sink_recent: no heavy hitters


@dataclass(frozen=True)
class SuiteText:
    """One text of the suite as token ids."""

    name: str
    prompt: np.ndarray
    continuation: np.ndarray


def read_texts(names: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(name, text)`` per entry: a suite text by name, or a UTF-8 file (named by its file name, or by the
    path as given where two files share a name). Each text is one row (and one cached reference): an entry
    given twice is a :class:`SuiteTextError`."""
    repeated = [entry for entry, count in Counter(map(str, names)).items() if count > 1]
    if repeated:
        raise SuiteTextError(f"text {repeated[0]}: given twice; each text is one row of the suite")
    base_names = Counter(Path(entry).name for entry in map(str, names) if entry not in SUITE_TEXTS)
    out = []
    for entry in names:
        if str(entry) in SUITE_TEXTS:
            out.append((str(entry), suite_text(str(entry))))
            continue
        path = Path(entry)
        try:
            out.append((path.name if base_names[path.name] == 1 else str(entry), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise SuiteTextError(f"text {entry}: not a suite text ({', '.join(SUITE_TEXTS)}) and not a readable "
                                 f"UTF-8 file ({exc})") from None
    return out


def suite_tokens(runtime: Runtime, texts: Sequence[tuple[str, str]], prompt_len: int, gen_len: int,
                 first_seed: int = 0) -> list[SuiteText]:
    """Each text's first ``prompt_len`` + ``gen_len`` tokens (random ids, seeded by position from
    ``first_seed``, for a model without a tokenizer); SuiteTextError names a text that is too short."""
    out = []
    for seed, (name, text) in enumerate(texts, start=first_seed):
        try:
            ids = runtime.text_ids(text, prompt_len + gen_len, seed)
        except ValueError as exc:
            raise SuiteTextError(f"fidelity text {name}: {exc}") from None
        out.append(SuiteText(name, ids[:prompt_len], ids[prompt_len:]))
    return out


def sink_recent_config(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The configuration without heavy hitters (sink + recent tokens only), or None when it evicts nothing
    or already keeps no heavy hitters."""
    if not config.get("kv_h2o_enable") or config.get("kv_h2o_heavy_hitters") is False:
        return None
    return {**config, "kv_h2o_heavy_hitters": False}


class Suite:
    """The texts of one (prompt, gen) size, with their full-cache reference logits computed once."""

    def __init__(self, runtime: Runtime, texts: list[SuiteText], progress: Progress) -> None:
        self.runtime, self.texts, self.progress = runtime, texts, progress
        self.references: dict[str, np.ndarray] = {}

    def reference(self, text: SuiteText) -> np.ndarray:
        """The full-cache logits predicting ``text``'s continuation (run once per text)."""
        if text.name not in self.references:
            self.references[text.name] = self._logits(FULL_CACHE, text, "full cache")[0]
        return self.references[text.name]

    def measure(self, config: Mapping[str, Any], source: str, extra_kv_keys: Iterable[str] = (),
                known: Mapping[str, tuple[np.ndarray, float]] | None = None) -> dict[str, Any]:
        """Every text through ``config`` (and its sink+recent twin): ``{"texts": [...], "aggregate": ...}``.
        ``known`` holds the configuration's logits and held ratio of texts already run, by name."""
        known = known or {}
        methods = {"h2o": dict(config), "sink_recent": sink_recent_config(config)}
        rows = []
        for text in self.texts:
            reference = self.reference(text)
            row: dict[str, Any] = {"name": text.name, "tokens": [len(text.prompt), len(text.continuation)],
                                   "full": {"ppl": continuation_perplexity(reference, text.continuation)}}
            for method, cfg in methods.items():
                if cfg is None:
                    continue
                logits, held = (known[text.name] if method == "h2o" and text.name in known else
                                self._logits(cfg, text, f"{source} {method}", extra_kv_keys))
                row[method] = {**_short(fidelity(reference, logits, text.continuation)), "held": held}
            self.progress(f"fidelity {text.name} {source}: " + ", ".join(
                f"{m} top1 {row[m]['top1']:.3f} ppl delta {row[m]['ppl_delta']:+.4f} held {row[m]['held']:.2f}"
                for m in ("h2o", "sink_recent") if m in row))
            rows.append(row)
        return {"texts": rows, "aggregate": aggregate(rows)}

    def _logits(self, config: Mapping[str, Any], text: SuiteText, what: str,
                extra_kv_keys: Iterable[str] = ()) -> tuple[np.ndarray, float]:
        run = self.runtime.configure(dict(config), source=what, extra_kv_keys=extra_kv_keys)
        result = run.run(text.prompt, text.continuation, keep_logits=True)
        return result.logits, float(result.metrics.get("h2o_lossy", 1.0))


def _short(numbers: Mapping[str, float]) -> dict[str, float]:
    return {key.removeprefix("h2o_fidelity_"): value for key, value in numbers.items()}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and metric: the spread (min, median, max) and the mean over the texts."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        measured = [row[method] for row in rows if method in row]
        if measured:
            out[method] = {metric: spread([m[metric] for m in measured]) for metric in measured[0]}
    return out


def row_metrics(suite: Mapping[str, Any]) -> dict[str, Any]:
    """The suite as a gate row's numbers: ``h2o_fidelity_*`` are the means over the texts (what
    ``fidelity_pass`` reads) with ``_min`` / ``_median`` / ``_max``; ``sink_recent_fidelity_*`` and
    ``sink_recent_h2o_lossy`` the sink+recent run's means; ``fidelity_suite`` the whole table."""
    agg = suite["aggregate"]
    out: dict[str, Any] = {"fidelity_suite": suite, "h2o_fidelity_texts": len(suite["texts"])}
    for metric in ("top1", "ppl_delta", "kl"):
        numbers = agg["h2o"][metric]
        out[f"h2o_fidelity_{metric}"] = numbers["mean"]
        out.update({f"h2o_fidelity_{metric}_{stat}": numbers[stat] for stat in ("min", "median", "max")})
        if "sink_recent" in agg:
            out[f"sink_recent_fidelity_{metric}"] = agg["sink_recent"][metric]["mean"]
    if "sink_recent" in agg:
        out["sink_recent_h2o_lossy"] = agg["sink_recent"]["held"]["mean"]
    return out
