"""Cross-check two gate runs of the same preset on different runtimes (e.g. reference and hf).

    python benchmarks/compare_runtimes.py RUN_A/results.json RUN_B/results.json

Prints, per configuration, the machine-independent numbers of both runs (``h2o_lossy``, the fidelity
perplexity delta and top-1 against each run's own full cache, the online-sim lossless ratio) and their
differences, and checks the agreement asked of the hf runtime: the same ``h2o_lossy`` (within 0.1%), the
perplexity delta within 1 point (0.01) and the online-sim ratio within 0.5%. Exit status 1 when a
configuration misses one of them, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CHECKS = (  # (metric, tolerance, relative?)
    ("h2o_lossy", 0.001, True),
    ("h2o_fidelity_ppl_delta", 0.01, False),
    ("lossless_online", 0.005, True),
)
SHOWN = ("h2o_lossy", "h2o_fidelity_ppl_delta", "h2o_fidelity_top1", "lossless_online", "decode_tps")


def _load(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        return results["runtime"], results["configs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"compare_runtimes: {path}: not a gate results.json ({exc})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    (name_a, a), (name_b, b) = _load(args.a), _load(args.b)
    common = [label for label in a if label in b]
    if not common:
        print(f"compare_runtimes: no configuration in both runs ({', '.join(a)} / {', '.join(b)})", file=sys.stderr)
        return 2
    print("| config | metric | " + f"{name_a} | {name_b} | difference | agrees |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for label in common:
        for metric in SHOWN:
            x, y = a[label].get(metric), b[label].get(metric)
            if not isinstance(x, (int, float)) or not isinstance(y, (int, float)):
                print(f"| {label} | {metric} | {x} | {y} | | |")
                continue
            check = next((c for c in CHECKS if c[0] == metric), None)
            diff = (y - x) / x if check and check[2] and x else y - x
            verdict = "" if check is None else ("yes" if abs(diff) <= check[1] else "NO")
            bad += verdict == "NO"
            shown = f"{diff:+.3%}" if check and check[2] else f"{diff:+.4f}"
            print(f"| {label} | {metric} | {x:.4f} | {y:.4f} | {shown} | {verdict} |")
    print(f"\n{len(common)} configurations; {bad} disagreement(s) beyond the tolerances "
          "(h2o_lossy 0.1%, ppl delta 0.01, online-sim 0.5%)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
