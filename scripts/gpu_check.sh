#!/usr/bin/env bash
# Run on the device machine (one call): installs the carried wheels, then
# scripts/gpu_check.py: NVML on the real GPUs and a real GPU job placed by the scheduler.
# Prepare the wheels here first with scripts/gpu_wheels.sh; carry .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  site=$(mktemp -d -t andromeda-site-XXXXXX)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH=$site:${PYTHONPATH:-}
  export PATH=$site/bin:$PATH
fi
export PYTHONUNBUFFERED=1
out=${OUT:-$(mktemp -d -t andromeda-gpu-check-out-XXXXXX)}
python3 scripts/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.txt"
