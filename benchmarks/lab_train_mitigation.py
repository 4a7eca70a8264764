"""Training-time mitigation on the lab (Wen et al. 5.2): retrain the lab model from scratch with the
hard-threshold filter, and with the caption-augmentation baseline, then compare with the unfiltered model.

    # 1. calibrate the hard threshold on the unfiltered model (a minute)
    OMP_NUM_THREADS=1 python benchmarks/lab_train_mitigation.py calibrate --reference /work/runs/lab_default \
        --out /work/runs/train_mitigation
    # 2. the long retrainings (~80 min each on one thread; run them side by side on two cores)
    OMP_NUM_THREADS=1 python benchmarks/lab_train_mitigation.py train --variant filtered --out /work/runs/train_mitigation
    OMP_NUM_THREADS=1 python benchmarks/lab_train_mitigation.py train --variant augmented --out /work/runs/train_mitigation
    # 3. evaluate reference and retrained models (a few minutes each)
    OMP_NUM_THREADS=1 python benchmarks/lab_train_mitigation.py evaluate --reference /work/runs/lab_default \
        --out /work/runs/train_mitigation

Calibration: the filter compares d = ||eps(x_t, caption) - eps(x_t, '')|| on each training sample's
noisy input at its random timestep with the threshold. On the unfiltered (memorizing) model we draw
one timestep and noise per non-memorized training pair, as the trainer does, and take a high
percentile (``--percentile``, default 99) of their d: at most ~1% of ordinary samples are left out,
while memorized samples, whose d is larger, are left out much more often (the fraction is printed
and stored in calibration.json). ``train`` retrains with the lab build recipe
(``diffmem.lab.build.PRESETS['default']``), adding ``hard_threshold`` (variant ``filtered``) or
``prompt_aug_style='rand_word_add', repeat_num=1`` (variant ``augmented``). ``evaluate`` reports the
memorized copy rate, the non-memorized and novel prompt alignment (lab content check) and the
non-memorized denoising loss (fixed noise and timesteps) for every model, as evaluation.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path


def calibrate(args) -> None:
    import numpy as np
    import torch

    from diffmem.adapters import load_model
    from diffmem.evaluate import training_step_stats
    from diffmem.lab.build import lab_data_for, lab_training_sets

    model = load_model(args.reference)
    mem, non = lab_training_sets(lab_data_for(model))
    n = min(args.num_pairs, len(non))
    idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:n]
    non_stats = training_step_stats(model, non.images[idx], [non.captions[i] for i in idx], seed=1)
    reps = max(1, args.num_pairs // len(mem))  # several timesteps per memorized image
    mem_stats = training_step_stats(model, mem.images.repeat(reps, 1, 1, 1), mem.captions * reps, seed=2)
    threshold = float(np.percentile(non_stats["d"], args.percentile))
    result = {"reference": args.reference, "percentile": args.percentile, "hard_threshold": threshold,
              "non_memorized_left_out": float((non_stats["d"] >= threshold).mean()),
              "memorized_left_out": float((mem_stats["d"] >= threshold).mean()),
              "d_non_memorized": {f"p{p}": float(np.percentile(non_stats["d"], p)) for p in (50, 90, 95, 99)},
              "d_memorized": {f"p{p}": float(np.percentile(mem_stats["d"], p)) for p in (10, 50, 90)},
              "num_non_memorized": n, "num_memorized_draws": len(mem_stats["d"]),
              # d grows with the noise level; a single threshold mostly acts at high t
              "median_d_by_timestep": {f"{lo}-{lo + 249}": {
                  name: float(np.median(st["d"][(st["t"] >= lo) & (st["t"] < lo + 250)]))
                  for name, st in (("non_memorized", non_stats), ("memorized", mem_stats))} for lo in (0, 250, 500, 750)},
              "memorized_left_out_by_timestep": {f"{lo}-{lo + 249}": float(
                  (mem_stats["d"][(mem_stats["t"] >= lo) & (mem_stats["t"] < lo + 250)] >= threshold).mean())
                  for lo in (0, 250, 500, 750)}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def train_variant(args) -> None:
    import torch
    from diffusers import DDIMScheduler

    from diffmem.adapters.lab import LabModel, lab_scheduler_config, new_lab_unet
    from diffmem.lab.build import PRESETS, lab_training_sets
    from diffmem.lab.data import make_lab_data
    from diffmem.train import TrainConfig, memorization_mix, train

    config = PRESETS["default"]
    torch.set_num_threads(args.threads)
    torch.manual_seed(config.seed)
    out = Path(args.out) / args.variant
    extra = {}
    if args.variant == "filtered":
        threshold = args.hard_threshold
        if threshold is None:
            threshold = json.loads((Path(args.out) / "calibration.json").read_text())["hard_threshold"]
        extra = {"hard_threshold": float(threshold)}
    else:
        extra = {"prompt_aug_style": "rand_word_add", "repeat_num": 1}
    data = make_lab_data(config.data)
    mem, non = lab_training_sets(data, config.model.image_size)
    dataset = memorization_mix(mem, non, end=None, repeats=config.repeats, non_mem_ratio=config.non_mem_ratio)
    model = LabModel(new_lab_unet(config.model), DDIMScheduler(**lab_scheduler_config()), config.model)
    model.extra_meta = {"data": asdict(config.data), "build": {k: v for k, v in asdict(config).items()
                                                               if k not in ("data", "model")}, "mitigation": extra}
    # the lab build recipe (whatever fields LabBuildConfig and TrainConfig share) plus the mitigation
    names = {f.name for f in fields(TrainConfig)}
    shared = {k: v for k, v in asdict(config).items() if k in names and k not in ("seed", "max_train_steps")}
    train_config = TrainConfig(
        output_dir=str(out), **shared, caption_dropout=config.model.caption_dropout, checkpoints_total_limit=0,
        lr_scheduler="constant_with_warmup" if shared.get("lr_warmup_steps") else "constant", seed=config.seed,
        max_train_steps=args.max_train_steps or config.max_train_steps, log_every=10, num_threads=args.threads,
        resume_from_checkpoint="latest" if any(out.glob("checkpoint-*")) else None, **extra)
    print(f"training {args.variant} ({extra}) into {out}")
    train(model, dataset, train_config)


def evaluate(args) -> None:
    import numpy as np
    import torch

    from diffmem.adapters import load_model
    from diffmem.evaluate import EvaluateConfig, lab_eval_set, run_evaluation, training_step_stats
    from diffmem.lab.build import lab_data_for, lab_training_sets
    from diffmem.sampling import SamplingConfig

    models = {"unfiltered": args.reference}
    for v in ("filtered", "augmented"):
        if (Path(args.out) / v / "lab_model.json").is_file():
            models[v] = str(Path(args.out) / v)
    sampling = SamplingConfig(num_inference_steps=args.num_inference_steps, num_generations=args.num_generations)
    config = EvaluateConfig(methods=("none",), sampling=sampling)
    report = {}
    for name, path in models.items():
        torch.manual_seed(0)
        model = load_model(path)
        data = lab_data_for(model)
        row = {"model": path}
        for set_name, limit in (("memorized", None), ("non-memorized", args.num_prompts), ("novel", args.num_prompts)):
            s = run_evaluation(model, lab_eval_set(data, set_name, limit), config,
                               Path(args.out) / "evaluation" / name / set_name, progress=False)["results"]["none"]["default"]
            row[set_name] = {k: s[k] for k in ("copy_rate", "alignment_mean", "num_prompts", "num_generations")}
        _, non = lab_training_sets(data)
        idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:args.num_loss_pairs]
        stats = training_step_stats(model, non.images[idx], [non.captions[i] for i in idx], seed=3)
        row["non_memorized_loss"] = float(np.mean(stats["loss"]))
        report[name] = row
        print(name, json.dumps(row))
    (Path(args.out) / "evaluation.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--reference", required=True, help="the unfiltered lab model folder")
    c.add_argument("--percentile", type=float, default=99.0)
    c.add_argument("--num-pairs", type=int, default=2000)
    t = sub.add_parser("train")
    t.add_argument("--variant", required=True, choices=("filtered", "augmented"))
    t.add_argument("--hard-threshold", type=float, default=None, help="default: calibration.json's")
    t.add_argument("--max-train-steps", type=int, default=None, help="default: the lab build's")
    e = sub.add_parser("evaluate")
    e.add_argument("--reference", required=True)
    e.add_argument("--num-prompts", type=int, default=200, help="non-memorized / novel prompts for alignment")
    e.add_argument("--num-loss-pairs", type=int, default=2000)
    e.add_argument("--num-generations", type=int, default=4)
    e.add_argument("--num-inference-steps", type=int, default=50)
    for q in (c, t, e):
        q.add_argument("--out", required=True)
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    {"calibrate": calibrate, "train": train_variant, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()
