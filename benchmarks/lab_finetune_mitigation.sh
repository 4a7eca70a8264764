#!/usr/bin/env bash
# Training-time mitigation in the seed's setting on the lab: every command, in order
# (docs/mitigation.md "Fine-tuning a base model"). Two trainings run at once on a 2-core CPU, each
# on one thread. OUT (runs/ft), STEPS (2000) and LR (3e-4) may be set in the environment; the
# measured runs used STEPS=2000 LR=3e-4 ("plain") and STEPS=2500 LR=1.5e-3 ("plain-hi", continued to
# step 7,000); the fine-tune copies from about step 4,000 at LR=1.5e-3, so the filter needs STEPS >= 7000.
set -euo pipefail
OUT=${OUT:-runs/ft}
STEPS=${STEPS:-2000}
LR=${LR:-3e-4}
export OMP_NUM_THREADS=1

# 1. The base model: the default lab data (offensive title words left out), no duplicated pairs.
#    (benchmarks/results/lab/finetune/base holds the one measured here: copy it to $OUT/base to skip this)
[ -f "$OUT/base/lab_model.json" ] || diffmem lab build --preset base --out "$OUT/base" --threads 1
# 2. Its training pairs in the seed's folder layout (memorized/ and non_memorized/), once with one
#    caption per image and once with three partial descriptions per image (multiple captions).
diffmem lab data --model "$OUT/base" --out "$OUT/data"
diffmem lab data --model "$OUT/base" --out "$OUT/data3" --captions-per-image 3
# 3. The filter's thresholds: percentiles of the base model's d on ordinary training pairs.
python benchmarks/lab_finetune_mitigation.py calibrate --base "$OUT/base" --out "$OUT"
ONE=$(python benchmarks/lab_finetune_mitigation.py threshold --out "$OUT" --kind one --percentile 95)
BANDS=$(python benchmarks/lab_finetune_mitigation.py threshold --out "$OUT" --kind bands --percentile 95)

# 4. The seed's fine-tune (train_text_to_image.py --end 200 --repeats 200 --non_mem_ratio 3), with
#    the lab's training settings (EMA 0.999, 10% caption dropout for guidance, batch 32).
ft() {  # ft NAME DATA [extra diffmem train options...]
  local name=$1 data=$2; shift 2
  diffmem train --model "$OUT/base" --dataset "$data/memorized" --non-mem-dataset "$data/non_memorized" \
    --end 200 --repeats 200 --non-mem-ratio 3 --output-dir "$OUT/$name" --max-train-steps "$STEPS" \
    --train-batch-size 32 --learning-rate "$LR" --lr-scheduler constant_with_warmup --lr-warmup-steps 100 \
    --use-ema --ema-decay 0.999 --caption-dropout 0.1 --checkpointing-steps 500 --threads 1 "$@" \
    > "$OUT/$name.log" 2>&1
}
ft plain "$OUT/data" & ft filter-one "$OUT/data" --hard-threshold "$ONE" & wait
ft filter-bands "$OUT/data" --hard-threshold "$BANDS" & ft rand-word "$OUT/data" --prompt-aug-style rand_word_add --repeat-num 1 & wait
# Somepalli et al.'s strategies: p = 0.1 per sample
ft sp-replace "$OUT/data" --prompt-aug-style rand_word_replace --repeat-num 4 --prompt-aug-prob 0.1 &
ft sp-add "$OUT/data" --prompt-aug-style rand_word_add --repeat-num 2 --prompt-aug-prob 0.1 & wait
ft sp-repeat "$OUT/data" --prompt-aug-style rand_word_repeat --repeat-num 2 --prompt-aug-prob 0.1 &
ft sp-captions "$OUT/data3" --caption-per-line & wait
ft gni-0.1 "$OUT/data" --embedding-noise 0.1 & ft gni-0.3 "$OUT/data" --embedding-noise 0.3 & wait

# 5. The figures.
RUNS=()
for name in plain filter-one filter-bands rand-word sp-replace sp-add sp-repeat sp-captions gni-0.1 gni-0.3; do
  [ -f "$OUT/$name/lab_model.json" ] && RUNS+=("$name=$OUT/$name")
done
python benchmarks/lab_finetune_mitigation.py evaluate --out "$OUT" --runs base="$OUT/base" "${RUNS[@]}"
python benchmarks/lab_finetune_mitigation.py report --out "$OUT"
