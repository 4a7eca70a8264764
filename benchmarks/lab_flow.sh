#!/usr/bin/env bash
# The flow lab's measurements (docs/flow-lab.md, "Memorization in flow models"): every command, in order.
# MODEL (lab-flow: the shipped flow lab) and OUT (runs/lab-flow) may be set in the environment. Two
# lanes run side by side on a 2-core CPU, each on one thread; about 40 minutes in all.
set -euo pipefail
MODEL=${MODEL:-lab-flow}
OUT=${OUT:-runs/lab-flow}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"

# 0. The model (about 2 hours on one thread; the shipped one was built by exactly this):
#    diffmem lab build --preset flow --out lab-flow-model --threads 1

# Lane A: copies, content and detection by step window with bootstrap intervals, the spread of
# first-step d over x_T; then token significance (trigger rank, deletion and replacement).
(
  diffmem lab report --model "$MODEL" --out "$OUT/report" > "$OUT/report.log" 2>&1
  python benchmarks/explain_lab.py --model "$MODEL" --windows 0:1 0:5 --official-steps 0 \
    --out "$OUT/explain_lab.json" > "$OUT/explain_lab.log" 2>&1
  # the UNet lab's side of the x_T comparison (its report predates the measurement)
  python benchmarks/first_step_spread.py --model lab --out "$OUT/first_step_spread_lab.json" > /dev/null 2>&1
) &
# Lane B: every detector and every inference-time mitigation that runs on a flow model.
(
  diffmem bench detect --model "$MODEL" --out "$OUT/bench_detect" --no-progress > "$OUT/bench_detect.log" 2>&1
  diffmem bench mitigate --model "$MODEL" --out "$OUT/mitigations" --no-progress > "$OUT/mitigations.log" 2>&1
) &
wait
