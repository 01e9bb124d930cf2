#!/usr/bin/env bash
# The GPU path in one run, for a machine with an NVIDIA GPU: harness vs hand-written vs DataLoader images/s,
# runner start -> first step, bf16 vs fp32, GPU memory freed after a kill (see bench/gpu_bench.py).
#
#   bash bench/gpu.sh                 # CUDA, full sizes (at most 8 minutes)
#   bash bench/gpu.sh --device cpu    # small sizes on the CPU: the smoke test of this script (CI, tests/)
#
# Needs only this checkout and a Python with torch, torchvision and numpy (./.venv when there, else
# python3); no network, no dataset files (the data is synthetic), no Docker.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${LEMUR_BENCH_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
limit="${LEMUR_BENCH_LIMIT_S:-480}"  # the whole script stays within 8 minutes
cd "$here"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec timeout --signal=TERM --kill-after=10 "$limit" \
  "$python" "$here/bench/gpu_bench.py" "$@"
