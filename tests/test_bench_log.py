"""The llm_bench markdown table our runtime writes, and fidelity arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from h2o_gates.bench_log import METRIC_COLUMNS, BenchRow, mean_sd, render_table
from h2o_kernels.fidelity import fidelity


def test_table_has_the_original_columns_and_cell_formats():
    row = BenchRow("smollm2", "86.00 MiB", 1, 512, 128)
    row.add_run(300.0, 20.0, {"h2o_keep": 0.33, "h2o_lossy": 3.0, "h2o_lossless": 1.2, "h2o_evict_us": 10})
    row.add_run(310.0, 22.0, {"h2o_keep": 0.35, "h2o_lossy": 2.9, "h2o_lossless": 1.2, "h2o_evict_us": 12})
    header, separator, line = render_table([row]).splitlines()
    names = [cell.strip() for cell in header.strip("|").split("|")]
    assert names[:7] == ["model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)"]
    assert tuple(names[7:]) == METRIC_COLUMNS and names[-1] == "h2o_lossless_decode_cache_miss"
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == len(names) == len(separator.strip("|").split("|"))
    assert cells[5] == "prompt=512<br>decode=128"
    assert cells[6] == "305.00 ± 7.07<br>21.00 ± 1.41"
    assert cells[7] == "0.3400 ± 0.0141" and cells[8] == "2.950 ± 0.071" and cells[9] == "1.200 ± 0.000"
    assert cells[names.index("h2o_evict_us")] == "11.00 ± 1.41"


def test_summary_and_sample_sd():
    assert mean_sd([]) == (0.0, 0.0) and mean_sd([5.0]) == (5.0, 0.0)
    assert mean_sd([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    row = BenchRow("m", "1 MiB", 1, 4, 2)
    row.add_run(10.0, 5.0, {"h2o_lossy": 3.0})
    s = row.summary()
    assert s["decode_tps"] == 5.0 and s["decode_tps_std"] == 0.0 and s["h2o_lossy"] == 3.0


def test_fidelity_of_identical_logits_is_perfect_and_detects_changes():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(20, 50)).astype(np.float32)
    targets = rng.integers(0, 50, 20)
    same = fidelity(ref, ref.copy(), targets)
    assert same == {"h2o_fidelity_top1": 1.0, "h2o_fidelity_ppl_delta": 0.0, "h2o_fidelity_kl": 0.0}
    flat = fidelity(ref, np.zeros_like(ref), targets)  # uniform: perplexity = vocabulary size
    assert flat["h2o_fidelity_kl"] > 0
    ppl_ref = np.exp(-np.mean([ref[i, t] - np.log(np.exp(ref[i]).sum()) for i, t in enumerate(targets)]))
    assert flat["h2o_fidelity_ppl_delta"] == pytest.approx(50 / ppl_ref - 1, rel=1e-6)
    with pytest.raises(ValueError):
        fidelity(ref, ref[:-1], targets)
