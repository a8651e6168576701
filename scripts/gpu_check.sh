#!/usr/bin/env bash
# Build, check and time prism's CUDA kernels in one go on a CUDA machine; results land in OUT_DIR
# (default results/gpu): gpu_check.json, gpu_check.md, gpu_check.log and env.txt.
#   usage: scripts/gpu_check.sh [OUT_DIR]
# Needs python with torch and transformers, nvcc and ninja; finishes in under 8 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
{
  date -u
  nvidia-smi || echo "nvidia-smi not found"
  nvcc --version || echo "nvcc not found"
  "$PYTHON" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout --signal=INT --kill-after=15 450 "$PYTHON" scripts/gpu_check.py --out "$OUT" --budget-s 360 2>&1 \
  | tee "$OUT/gpu_check.log"
