"""Replicate KV dump folders into a bigger dump set, for end-to-end timings of ``h2o-gate offline``.

    python benchmarks/replicate_dumps.py OUT TOTAL_MB DUMP_DIR [DUMP_DIR ...] [--rope-theta THETA]

Copies the ``meta_*.json`` entries of each DUMP_DIR, in turn, into ``OUT/<dir name>_<copy>/`` until the K+V
bytes reach ``TOTAL_MB`` (10^6 bytes): each copy gets a distinct ``run_id`` (``<run_id>-copy<N>``, so the
evaluator groups copies apart) and hard links to the source's K/V files (no data is copied; OUT must be on
the same file system). ``--rope-theta`` also writes ``rope_theta`` / ``rope_layout: "half"`` into every copied
meta (for dumps recorded before the dump writer wrote them), so that ``--codec ratio`` can match K rows through
RoPE. Prints the bytes written. OUT must not exist yet (exit 2 otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def replicate(out: Path, total_bytes: float, sources: list[Path], rope_theta: float | None = None) -> int:
    """Fill ``out`` with copies of ``sources`` until their K+V bytes reach ``total_bytes``; return the bytes."""
    out.mkdir(parents=True)
    size = copy = 0
    while size < total_bytes:
        before = size
        for src in sources:
            if size >= total_bytes:
                break
            dst = out / f"{src.name}_{copy}"
            dst.mkdir()
            for meta_path in sorted(src.glob("meta_*.json")):
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
                meta["run_id"] = f"{meta['run_id']}-copy{copy}"
                if rope_theta is not None:
                    meta.update(rope_theta=rope_theta, rope_layout="half")
                for key in ("k_file", "v_file"):
                    os.link(src / meta[key], dst / meta[key])
                    size += (src / meta[key]).stat().st_size
                (dst / meta_path.name).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if size == before:
            raise SystemExit(f"no meta_*.json entries with K/V data in {', '.join(map(str, sources))}")
        copy += 1
    return size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to create")
    parser.add_argument("total_mb", type=float, help="K+V megabytes (10^6 bytes) to reach")
    parser.add_argument("sources", type=Path, nargs="+", help="dump folders (meta_*.json + K/V files)")
    parser.add_argument("--rope-theta", type=float, help="write rope_theta (and rope_layout 'half') into each meta")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} already exists; give a new folder")
    missing = [str(src) for src in args.sources if not src.is_dir()]
    if missing:
        parser.error(f"not folders: {', '.join(missing)}")
    size = replicate(args.out, args.total_mb * 1e6, args.sources, args.rope_theta)
    print(f"{size / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
