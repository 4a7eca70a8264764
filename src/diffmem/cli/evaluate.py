"""``diffmem evaluate``: copy similarity and alignment of memorized prompts' generations, per mitigation setting."""

from __future__ import annotations


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import DATASET_HELP, add_param_arg, add_sampling_args
    from diffmem.mitigate import METHODS
    from diffmem.mitigations import canonical_name
    from diffmem.sampling import SamplingConfig

    p = sub.add_parser("evaluate", help="evaluate mitigations: similarity to training images, alignment, trade-off plot",
                       description="For each memorized prompt and each mitigation setting, generate N images and "
                       "report their similarity to the prompt's training image(s) (SSCD when --sscd is given, "
                       "tiled L2 and pixel cosine always; mean/max/min over generations of the best match), the "
                       "copy rate, and prompt alignment (lab) or CLIP score (--clip). Writes per_prompt.jsonl/.csv, "
                       "summary.json, grids/ and tradeoff.png to --out.")
    common_model_args(p)
    p.add_argument("--dataset", default=None, help=DATASET_HELP)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--mitigation", nargs="+", choices=METHODS, type=canonical_name,
                   help="methods to compare (default: none embedding-opt rand-word-add)")
    p.add_argument("--target-loss", nargs="+", default=None, help="embedding-opt sweep; 'pN' = the N-th percentile "
                   "of the first-step loss on --calibration-set prompts (e.g. p50 p95); default: the model's target "
                   "(3 on SD; on the lab, the median first-step loss of its reference prompts)")
    p.add_argument("--target-unit", choices=("batch", "mean"), help="embedding-opt's loss: batch = the original code's "
                   "||eps_c - eps_u|| over all generations at once (default), mean = the mean per-image d")
    p.add_argument("--optim-step", type=int, help="embedding-opt at this DDIM step (default 0)")
    p.add_argument("--epsilon", type=float, help="embedding-opt, L2-constrained: mean token distance past which "
                   "alpha * loss + (1 - alpha) * distance is minimized")
    p.add_argument("--alpha", type=float, help="weight of the loss past --epsilon (default 0.5)")
    p.add_argument("--repeat-num", nargs="+", type=int, default=None, help="augmentation sweep (items inserted; default 4)")
    add_param_arg(p, sweep=True)
    p.add_argument("--lr", type=float, help="embedding-opt: AdamW learning rate (default: the model's; 0.05 on SD, 0.01 on the lab)")
    p.add_argument("--max-iters", type=int, help="embedding-opt: AdamW steps at most (default: the model's; 10 on SD, 50 on the lab)")
    p.add_argument("--calibration-set", default="lab:non-memorized", help="prompts whose first-step d calibrates "
                   "'pN' target losses (same formats as --dataset)")
    p.add_argument("--calibration-limit", type=int, default=200)
    p.add_argument("--sscd", default=None, help="SSCD TorchScript checkpoint (e.g. sscd_disc_large.torchscript.pt)")
    p.add_argument("--clip", default=None, help="local transformers CLIP model folder for the CLIP score")
    p.add_argument("--copy-threshold", type=float, default=None, help="similarity beyond this is a copy "
                   "(SSCD: 0.5 in Somepalli et al.); lab models use the lab's copy rule in any case")
    p.add_argument("--copy-metric", default=None, choices=("sscd", "tiled_l2", "pixel_cosine"))
    p.add_argument("--save-images", action="store_true", help="also write every generation as PNG")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the evaluation already in --out")
    add_sampling_args(p, SamplingConfig(), same_noise=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def config_from_args(args, target_losses=None):
    """The EvaluateConfig of the command line; `target_losses` replaces --target-loss once 'pN' values are calibrated."""
    from dataclasses import replace

    from diffmem.cli.options import given, params_from_args, sampling_from_args
    from diffmem.evaluate import EvaluateConfig

    base = EvaluateConfig()
    sampling = sampling_from_args(args, base.sampling)
    lists = given(args, ("repeat_num",))
    config = replace(base, methods=tuple(args.mitigation or base.methods), sampling=sampling,
                     mitigation=replace(base.mitigation, **given(args, ("lr", "max_iters", "target_unit", "optim_step",
                                                                         "epsilon", "alpha"))),
                     **({"repeat_nums": tuple(lists["repeat_num"])} if lists else {}),
                     params=params_from_args(args, sweep=True),
                     **given(args, ("sscd", "clip", "copy_threshold", "copy_metric")), save_images=args.save_images)
    if target_losses is not None:
        config = replace(config, target_losses=tuple(target_losses))
    return config


def run(args) -> int:
    import json

    from diffmem.cli.main import load_model_from_args
    from diffmem.eval_sets import load_eval_set
    from diffmem.evaluate import calibrate_target_loss, run_evaluation

    config = config_from_args(args)  # checked before loading anything
    from diffmem.evaluate import settings_of

    settings_of(config)  # unknown methods or parameters fail here, before the model loads
    sampling = config.sampling
    for v in args.target_loss or []:
        try:
            float(v[1:] if v.startswith("p") else v)
        except ValueError:
            raise ValueError(f"--target-loss {v!r}: expected a number (e.g. 3) or a percentile pN (e.g. p95)") from None
    model = load_model_from_args(args)
    eval_set = load_eval_set(model, args.dataset, args.limit)
    targets, calibration = [], None
    percentiles = [float(v[1:]) for v in args.target_loss or [] if v.startswith("p")]
    if percentiles and "embedding-opt" in config.methods:
        ref = load_eval_set(model, args.calibration_set, args.calibration_limit)
        calibration = calibrate_target_loss(model, [p.caption for p in ref.prompts], sampling, percentiles,
                                            config.mitigation.target_unit)
        print(f"target losses ({config.mitigation.target_unit}) from the first-step loss of " + ref.name + ": " +
              ", ".join(f"p{k:g} = {v:.4f}" for k, v in calibration.items()))
    for v in args.target_loss or []:
        targets.append(calibration[float(v[1:])] if v.startswith("p") else float(v))
    config = config_from_args(args, targets or None)
    summary = run_evaluation(model, eval_set, config, args.out, progress=not args.no_progress, resume=args.resume)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch: one process reports and writes
        return 0
    if calibration:
        summary["target_loss_calibration"] = {"set": args.calibration_set, "limit": args.calibration_limit,
                                              "percentiles": calibration}
        from pathlib import Path

        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    for method, settings in summary["results"].items():
        for key, s in settings.items():
            extra = "".join(f"  {k} {s[k]:.3f}" for k in ("alignment_mean", "clip_score_mean") if k in s)
            copy = f"copy rate {s['copy_rate']:.3f}" if s["copy_rate"] is not None else "copy rate -"
            print(f"{method:17s} {key:18s} {copy}  d {s['initial_d_mean']:.3f}->{s['final_d_mean']:.3f}" + extra)
    print(f"wrote {args.out}/summary.json, per_prompt.jsonl/.csv, grids/, tradeoff.png")
    return 0
