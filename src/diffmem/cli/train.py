"""``diffmem train``: fine-tune a model's UNet with the seed's memorization recipe and its mitigations."""

from __future__ import annotations


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args

    p = sub.add_parser("train", help="fine-tune a UNet (memorization recipe, training-time mitigation)",
                       description="The seed's train_text_to_image.py: pairs [0, end) of --dataset repeated "
                       "--repeats times, mixed with --non-mem-ratio times as many --non-mem-dataset pairs.")
    common_model_args(p)
    p.add_argument("--dataset", default=None, help="memorized pairs: folder of image + .txt, or local HF dataset")
    p.add_argument("--non-mem-dataset", default=None, help="non-memorized pairs, same formats")
    p.add_argument("--end", type=int, default=None, help="use memorized pairs [0, end)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--non-mem-ratio", type=float, default=3.0)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's image size")
    p.add_argument("--center-crop", action="store_true")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--train-batch-size", type=int, default=8)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-train-steps", type=int, default=1000)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--lr-scheduler", default="constant")
    p.add_argument("--lr-warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--use-ema", action="store_true")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpointing-steps", type=int, default=0)
    p.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--caption-dropout", type=float, default=0.0)
    p.add_argument("--hard-threshold", default=None,
                   help="leave samples with d >= this out of the loss (Wen et al. 5.2; 2 on SD); or K "
                        "comma-separated thresholds, one per band of timesteps, low noise first")
    p.add_argument("--prompt-aug-style", default=None, help="caption augmentation baseline, e.g. rand_word_add")
    p.add_argument("--repeat-num", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(run=run)


def run(args) -> int:
    from diffmem.cli.main import load_model_from_args
    from diffmem.train import TrainConfig, memorization_mix, open_pairs, parse_hard_threshold, train

    model = load_model_from_args(args)
    res = args.resolution or model.latent_shape[-1] * getattr(model, "vae_scale_factor", 1)
    mem = open_pairs(args.dataset, res, args.center_crop, args.random_flip) if args.dataset else None
    non = open_pairs(args.non_mem_dataset, res, args.center_crop, args.random_flip) if args.non_mem_dataset else None
    dataset = memorization_mix(mem, non, args.end, args.repeats, args.non_mem_ratio)
    config = TrainConfig(
        output_dir=args.output_dir, max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_grad_norm=args.max_grad_norm,
        use_ema=args.use_ema, mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=args.resume_from_checkpoint,
        caption_dropout=args.caption_dropout, seed=args.seed,
        hard_threshold=parse_hard_threshold(args.hard_threshold) if args.hard_threshold is not None else None,
        prompt_aug_style=args.prompt_aug_style, repeat_num=args.repeat_num, num_threads=args.threads)
    out = train(model, dataset, config)
    print(f"trained model written to {out}")
    return 0
