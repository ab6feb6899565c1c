#!/usr/bin/env bash
# Run the hf gate on a CUDA GPU: the main preset and compare_presses.json, on SmolLM2 (or $H2O_MODEL,
# e.g. a transformers model folder), with the same rules, reports and history as on the CPU.
#
#   pip install '.[hf]'              # a CUDA build of torch (pip's default on Linux x86_64)
#   bash benchmarks/hf_gpu_gate.sh [OUT_DIR]      # new or empty; default .h2o/gpu/<timestamp>
#
# Prints the GPU, then each gate's table and verdict; the reports land in OUT_DIR/main and
# OUT_DIR/presses. Exit status: the first failing gate's (0 when both pass), 2 without a CUDA device.
set -uo pipefail
out="${1:-.h2o/gpu/$(date +%Y%m%d-%H%M%S)}"
python - <<'PY' || exit 2
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"hf_gpu_gate: torch {torch.__version__} sees no CUDA device; install a CUDA build of torch "
             "on a machine with a GPU")
props = torch.cuda.get_device_properties(0)
print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
status=0
for preset in target_joint_scope_v4.json compare_presses.json; do
    name="${preset%.json}"
    [ "$preset" = compare_presses.json ] && name=presses
    [ "$preset" = target_joint_scope_v4.json ] && name=main
    echo "== $preset on cuda"
    start=$(date +%s)
    pytest -p no:cacheprovider --h2o-preset "$preset" --h2o-runtime hf --h2o-device cuda \
        --h2o-out="$out/$name" --junitxml="$out/$name.xml"
    rc=$?
    echo "== $preset: exit $rc, $(( $(date +%s) - start )) s"
    [ $status -eq 0 ] && status=$rc
done
exit $status
