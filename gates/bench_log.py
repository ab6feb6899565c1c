"""The llm_bench markdown log: one table, ``speed(tok/s)`` as ``prefill ± sd<br>decode ± sd`` and
every metric cell as ``mean ± sd`` (sample standard deviation), in the original's column order.

Written by ``h2o-gate bench`` and the gate (our runtimes) in the same format the original MNN llm_bench
wrote, so one parser serves both.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HEAD column order (§7.3 of the runtime spec); the v4 build ended at h2o_lossless_fallback.
METRIC_COLUMNS: tuple[str, ...] = (
    "h2o_keep", "h2o_lossy", "h2o_lossless", "h2o_target_keep_effective", "h2o_floor_keep",
    "h2o_quantized_keep", "h2o_evict_us", "h2o_codec_us", "h2o_lossless_raw_mb", "h2o_lossless_comp_mb",
    "h2o_lossless_comp_us", "h2o_lossless_decomp_us", "h2o_lossless_queue_peak", "h2o_lossless_fallback",
    "h2o_lossless_backpressure_skip", "h2o_lossless_async_queue_peak", "h2o_lossless_async_wait_us",
    "h2o_lossless_decode_cache_hit", "h2o_lossless_decode_cache_miss",
)
_RATIO4 = {"h2o_keep", "h2o_target_keep_effective", "h2o_floor_keep", "h2o_quantized_keep"}
_RATIO3 = {"h2o_lossy", "h2o_lossless"}


@dataclass
class BenchRow:
    """One llm_bench row: the runs of one (prompt, gen) instance."""

    model: str
    model_size: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    prefill_tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)

    def add_run(self, prefill_tok_s: float, decode_tok_s: float, metrics: dict[str, float]) -> None:
        """Record one measured run (the warm-up run is not recorded)."""
        self.prefill_tok_s.append(prefill_tok_s)
        self.decode_tok_s.append(decode_tok_s)
        for name, value in metrics.items():
            self.metrics.setdefault(name, []).append(float(value))

    def summary(self) -> dict[str, float]:
        """``decode_tps``, ``prefill_tps`` and every metric as mean plus ``<name>_std``."""
        out: dict[str, float] = {}
        for name, values in (("prefill_tps", self.prefill_tok_s), ("decode_tps", self.decode_tok_s),
                             *self.metrics.items()):
            out[name], out[f"{name}_std"] = mean_sd(values)
        return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 with fewer than two values), as llm_bench printed them."""
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render_table(rows: list[BenchRow]) -> str:
    """The markdown table llm_bench wrote to its ``-fp`` file."""
    header = ["model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)", *METRIC_COLUMNS]
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("-" * max(3, len(h) - 1) + (":" if i in (1, 3) or i >= 7 else "-")
                               for i, h in enumerate(header)) + " |"]
    for row in rows:
        cells = [row.model, row.model_size, "CPU", str(row.threads), "Normal",
                 f"prompt={row.prompt_tokens}<br>decode={row.gen_tokens}",
                 "{:.2f} ± {:.2f}<br>{:.2f} ± {:.2f}".format(*mean_sd(row.prefill_tok_s), *mean_sd(row.decode_tok_s))]
        for name in METRIC_COLUMNS:
            mean, sd = mean_sd(row.metrics.get(name, []))
            digits = 4 if name in _RATIO4 else 3 if name in _RATIO3 else 2
            cells.append(f"{mean:.{digits}f} ± {sd:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def size_text(size_bytes: int) -> str:
    """A model size as llm_bench printed it."""
    return f"{size_bytes / 2**30:.2f} GiB" if size_bytes >= 2**30 else f"{size_bytes / 2**20:.2f} MiB"


def write_log(log_file: Path, row: BenchRow, summary: dict[str, float], config: dict[str, Any], repeat: int,
              text: str, runtime: str | None = None) -> Path:
    """Write the markdown table to ``log_file`` and its JSON twin beside it (which also names ``runtime``, e.g.
    ``hf (cpu)``, the table having no column for it); return the twin's path."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text(render_table([row]), encoding="utf-8")
    twin = log_file.with_suffix(".json")
    report = {"model": row.model, "model_size": row.model_size, "threads": row.threads,
              "prompt_tokens": row.prompt_tokens, "gen_tokens": row.gen_tokens, "repeat": repeat, "text": text,
              **({"runtime": runtime} if runtime else {}),
              "config": config, **summary,
              "runs": {"prefill_tps": row.prefill_tok_s, "decode_tps": row.decode_tok_s, **row.metrics}}
    twin.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return twin
