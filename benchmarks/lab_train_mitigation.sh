#!/usr/bin/env bash
# Training-time mitigation on the lab, every step (docstring of lab_train_mitigation.py):
#   benchmarks/lab_train_mitigation.sh [LAB_BUILD_DIR] [OUT_DIR] [PERCENTILE] [UNFILTERED_BANDS] [BAND_PERCENTILES]
# LAB_BUILD_DIR is a `diffmem lab build` folder (built here when absent). PERCENTILE (default 80) of
# ordinary samples' d sets each timestep band's threshold; the bands in UNFILTERED_BANDS (default 0, i.e.
# t < 100; "" for none) are not filtered, and BAND_PERCENTILES (K=P,..., default none) give some bands
# another percentile (benchmarks/MITIGATION.md says why). The two retrainings
# branch the main run at step 1,000 and train its other 7,000 steps (~70-90 min on one thread); they run side by
# side, one thread each.
set -euo pipefail
LAB=${1:-runs/lab}
OUT=${2:-runs/tm}
PCT=${3:-80}
UNFILTERED=${4-0}
BAND_PCT=${5-}
here=$(dirname "$0")
[ -f "$LAB/lab_model.json" ] || diffmem lab build --out "$LAB" --resume --threads 2
python "$here/lab_train_mitigation.py" calibrate --reference "$LAB/stages/0" --percentile "$PCT" \
  --unfiltered-bands "$UNFILTERED" --band-percentile "$BAND_PCT" --out "$OUT"
branch="--no-anneal --resume --resume-from $LAB/stages/0/checkpoint-1000 --threads 1"
diffmem lab build --out "$OUT/filtered" $branch \
  --hard-threshold "$(python "$here/lab_train_mitigation.py" thresholds --out "$OUT")" > "$OUT/filtered.log" 2>&1 &
diffmem lab build --out "$OUT/augmented" $branch --prompt-aug-style rand-word-add --repeat-num 1 \
  > "$OUT/augmented.log" 2>&1 &
wait
python "$here/lab_train_mitigation.py" evaluate --reference "$LAB/stages/0" --out "$OUT" --num-prompts 100
