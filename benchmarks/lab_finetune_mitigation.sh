#!/usr/bin/env bash
# Training-time mitigation in the seed's setting on the lab: every command, in order
# (docs/mitigation.md "Fine-tuning a base model"). Two trainings run at once on a 2-core CPU, each
# on one thread. OUT (runs/ft), STEPS (6000), LR (1.5e-3), LORA_LR (1.5e-3), LORA_STEPS (6000) and
# ONLY (a subset of run names) may be set in the environment. The unfiltered fine-tune copies from
# about step 4,000 at LR=1.5e-3 (at LR=3e-4 it copied nothing within 2,000 steps), so every run is
# 6,000 steps long.
set -euo pipefail
OUT=${OUT:-runs/ft}
STEPS=${STEPS:-6000}
LR=${LR:-1.5e-3}
LORA_STEPS=${LORA_STEPS:-6000}
LORA_LR=${LORA_LR:-1.5e-3}
export OMP_NUM_THREADS=1

# 1. The base model: the default lab data (offensive title words left out), no duplicated pairs.
#    (benchmarks/results/lab/finetune/base holds the one measured here: copy it to $OUT/base to skip this)
[ -f "$OUT/base/lab_model.json" ] || diffmem lab build --preset base --out "$OUT/base" --threads 1
# 2. Its training pairs in the seed's folder layout (memorized/ and non_memorized/), once with one
#    caption per image and once with three partial descriptions per image (multiple captions).
[ -d "$OUT/data/memorized" ] || diffmem lab data --model "$OUT/base" --out "$OUT/data"
[ -d "$OUT/data3/memorized" ] || diffmem lab data --model "$OUT/base" --out "$OUT/data3" --captions-per-image 3
# 3. The filter's thresholds: percentiles of the base model's d on ordinary training pairs.
[ -f "$OUT/calibration.json" ] || python benchmarks/lab_finetune_mitigation.py calibrate --base "$OUT/base" --out "$OUT"
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
# Two at a time: each run starts when a slot frees (`wait -n`); runs already finished are skipped.
RUNS_SPEC=(
  "plain data"
  "filter-one data --hard-threshold $ONE"
  "filter-bands data --hard-threshold $BANDS"
  "rand-word data --prompt-aug-style rand-word-add --repeat-num 1"
  # the pair-level rule: a pair left out for good once its d exceeded the threshold in 20% of its draws
  "filter-pairs data --hard-threshold $ONE --pair-filter-share 0.2 --pair-filter-min-draws 20"
  # Somepalli et al.'s strategies: p = 0.1 per sample, noise on the text embedding, several captions
  "sp-replace data --prompt-aug-style rand-word-replace --repeat-num 4 --prompt-aug-prob 0.1"
  "sp-captions data3 --caption-per-line"
  "gni-0.1 data --embedding-noise 0.1"
  "sp-add data --prompt-aug-style rand-word-add --repeat-num 2 --prompt-aug-prob 0.1"
  "sp-repeat data --prompt-aug-style rand-word-repeat --repeat-num 2 --prompt-aug-prob 0.1"
  "gni-0.3 data --embedding-noise 0.3"
  "gni-0.5 data --embedding-noise 0.5"
  "gni-1.0 data --embedding-noise 1.0"
  # the unfiltered fine-tune again with another seed (data order, noise, timesteps): how much one seed moves the figures
  "plain-seed1 data --seed 1"
  # IET-AGC's anti-gradient control (Liu et al., ECCV 2024): samples whose loss x 1.25 is under their timestep's
  # running mean are left out (its README's ratio); then the whole of IET-AGC: that rule in each of 4 copies
  # trained on 4 shards of the pairs, averaged after each of 25 rounds (its README's), 6,000 steps in all
  "iet-agc data --agc-ratio 1.25"
  "iet-agc-ensemble data --agc-ratio 1.25 --ensemble-shards 4 --ensemble-rounds 25 --checkpointing-steps 0"
  # LoRA fine-tunes (rank 16 on the UNet's attention projections; LORA_LR, LORA_STEPS), plain and
  # with the filter from the first step; each writes a LoRA file evaluated on the base model.
  # At LORA_LR=5e-3 (the original code's LoRA rate) the adapter degraded every generation and copied nothing.
  "lora-plain data --lora-rank 16 --learning-rate $LORA_LR --max-train-steps $LORA_STEPS"
  "lora-filter-one data --lora-rank 16 --learning-rate $LORA_LR --max-train-steps $LORA_STEPS --hard-threshold $ONE"
)
ONLY=${ONLY:-}  # a space-separated subset of run names, to run only those
for spec in "${RUNS_SPEC[@]}"; do
  read -r name data extra <<< "$spec"
  [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]] && continue
  [ -f "$OUT/$name/lab_model.json" ] || [ -f "$OUT/$name/pytorch_lora_weights.safetensors" ] && continue
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n; done
  # shellcheck disable=SC2086
  ft "$name" "$OUT/$data" $extra &
done
wait

# 5. The figures.
RUNS=()
for spec in "${RUNS_SPEC[@]}"; do
  name=${spec%% *}
  [ -f "$OUT/$name/lab_model.json" ] && RUNS+=("$name=$OUT/$name")
  [ -f "$OUT/$name/pytorch_lora_weights.safetensors" ] && RUNS+=("$name=$OUT/base+$OUT/$name/pytorch_lora_weights.safetensors")
done
python benchmarks/lab_finetune_mitigation.py evaluate --out "$OUT" --runs base="$OUT/base" "${RUNS[@]}"
python benchmarks/lab_finetune_mitigation.py report --out "$OUT"
