#!/usr/bin/env bash
# The GPU check, one command on a machine with a CUDA device (about 5 minutes on one H200):
# the tests marked gpu on tiny models, then the first-step throughput table of an SD v1.4-size UNet.
#   benchmarks/device_check.sh [OUT_DIR]
# Where diffmem's dependencies are missing (a bare GPU image without diffusers), put their wheels in
# .whl/ at the repository root: they are installed to /tmp/site first. On a CPU-only machine the
# tests are skipped and the table says why; nothing fails.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-device_check}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
python3 benchmarks/gpu_throughput.py --out "$OUT/throughput.md" 2>&1 | tee "$OUT/throughput.log"
