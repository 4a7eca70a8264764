#!/usr/bin/env bash
# Every figure of the shipped lab model that the README, the docs and BENCHMARKS.md quote, measured again
# on a lab model folder, in lanes of one torch thread each run side by side, each command
# writing into its own folder under OUT_DIR, with its log beside it.
#   benchmarks/remeasure_lab.sh [LAB_MODEL] [OUT_DIR] [LANES...]
# LANES: any of detection mitigation extras comparison (default: detection mitigation, about 40 min).
# `extras` (the guidance sweep, the L2-constrained variant, the original code's lr 0.05, targets above p95;
# about 60 min)
# and `comparison` (`diffmem bench mitigate`, about 90 min) are the longer ones.
# benchmarks/results/lab/ keeps the files these commands write (MANIFEST.json names the command of each).
set -euo pipefail
MODEL=${1:-lab}
OUT=${2:-remeasure}
shift $(( $# > 2 ? 2 : $# )) || true
LANES=("$@")
[ ${#LANES[@]} -eq 0 ] && LANES=(detection mitigation)
mkdir -p "$OUT"
export OMP_NUM_THREADS=1

detection() {  # the lab report, token significance, the detector comparison
  diffmem lab report --model "$MODEL" --out "$OUT/report" --num-control 100
  python benchmarks/explain_lab.py --model "$MODEL" --windows 0:1 0:5 0:10 --num-ordinary 50 \
    --out "$OUT/explain_lab.json"
  diffmem bench detect --model "$MODEL" --out "$OUT/bench_detect" --no-progress
}

mitigation() {  # the audit, the embedding-optimization sweep against random words
  diffmem audit --model "$MODEL" --out "$OUT/audit" --no-progress
  benchmarks/lab_mitigation.sh "$MODEL" "$OUT/mitigation"
}

extras() {  # the default guidance's choice, the L2-constrained variant, the original code's lr 0.05, looser targets
  python benchmarks/lab_guidance_sweep.py --model "$MODEL" --guidance 1.0 1.25 1.5 1.75 2.0 \
    --out "$OUT/guidance_sweep.json"
  python benchmarks/lab_constrained_mitigation.py --model "$MODEL" --out "$OUT/constrained_mitigation"
  diffmem evaluate --model "$MODEL" --out "$OUT/mitigation_lr0.05" \
    --mitigation none embedding-opt rand-word-add rand-numb-add rand-word-repeat \
    --target-loss p5 p25 p50 p75 p95 --target-unit mean --repeat-num 1 2 4 6 8 --lr 0.05 --max-iters 10 \
    --calibration-set lab:non-memorized --calibration-limit 200 --num-generations 4 --num-inference-steps 50 \
    --no-progress
  local common="--target-unit mean --calibration-set lab:non-memorized --calibration-limit 200 --num-generations 4 --num-inference-steps 50 --no-progress"
  diffmem evaluate --model "$MODEL" --out "$OUT/mitigation_high" --mitigation none embedding-opt \
    --target-loss 0.4 0.5 0.6 0.8 --lr 0.05 --max-iters 10 $common  # targets above p95
  diffmem evaluate --model "$MODEL" --out "$OUT/mitigation_lr0.01_high" --mitigation embedding-opt \
    --target-loss 0.4 0.5 0.6 0.8 --lr 0.01 --max-iters 50 $common
}

comparison() {  # the field's inference-time mitigations on the same prompts and seeds
  diffmem bench mitigate --model "$MODEL" --out "$OUT/mitigations" --no-progress
}

pids=()
for lane in "${LANES[@]}"; do
  "$lane" > "$OUT/$lane.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
