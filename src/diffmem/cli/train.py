"""``diffmem train``: fine-tune a model's UNet with the original code's memorization recipe and its mitigations."""

from __future__ import annotations


# TrainConfig fields given on the command line: (field, type, help); defaults are TrainConfig's.
TRAIN_OPTIONS = (
    ("train_batch_size", int, "per process"),
    ("gradient_accumulation_steps", int, ""),
    ("max_train_steps", int, ""),
    ("learning_rate", float, ""),
    ("lr_scheduler", str, "any name diffusers.optimization.get_scheduler knows"),
    ("lr_warmup_steps", int, ""),
    ("max_grad_norm", float, ""),
    ("use_ema", bool, "keep an exponential moving average of the weights and save it (the raw weights go to "
                      "OUTPUT/raw)"),
    ("ema_decay", float, ""),
    ("snr_gamma", float, "min-SNR loss weighting with this gamma (5.0 is usual); the velocity form on "
                         "v-prediction models"),
    ("noise_offset", float, "offset noise of shape (B, C, 1, 1) with this scale"),
    ("input_perturbation", float, "perturb the noise that makes x_t by this scale (the target keeps the plain noise)"),
    ("validation_prompts", str, "prompts whose images are saved to OUTPUT/validation/step-N every --validation-epochs"),
    ("validation_epochs", int, ""),
    ("validation_inference_steps", int, "DDIM steps of the validation images"),
    ("mixed_precision", str, ""),
    ("gradient_checkpointing", bool, "trade compute for memory"),
    ("checkpointing_steps", int, "save a resumable checkpoint every N steps (0: only at the end)"),
    ("resume_from_checkpoint", str, "a checkpoint folder or 'latest'"),
    ("caption_dropout", float, "train on the empty caption this often"),
    ("hard_threshold", str, "leave samples with d >= this out of the loss (Wen et al. 5.2; 2 on SD); or K "
                            "comma-separated thresholds, one per band of timesteps, low noise first"),
    ("pair_filter_share", float, "with --hard-threshold: leave a pair (all its repeats) out for good once d exceeded "
                                 "the threshold in this share of its draws"),
    ("pair_filter_min_draws", int, "draws of a pair before the pair-level rule may leave it out"),
    ("agc_ratio", float, "IET-AGC's anti-gradient control (Liu et al. 2024): leave out samples whose loss times this "
                         "is under the running mean of the losses at their timestep (1.25 in its README)"),
    ("agc_ema_decay", float, "decay of that running mean (0.8, IET-AGC's)"),
    ("ensemble_shards", int, "IET's iterative ensemble: deal the pairs into this many shards, train one copy of the "
                             "denoiser per shard and average the copies after every round (4 in its README)"),
    ("ensemble_rounds", int, "rounds of that ensemble; --max-train-steps counts all copies' steps together"),
    ("prompt_aug_style", str, "caption augmentation: rand-word-add (the original code's baseline), rand-numb-add, "
                              "rand-word-repeat, rand-word-replace"),
    ("repeat_num", int, "words or numbers the augmentation inserts (rand-word-replace: the caption's length)"),
    ("prompt_aug_prob", float, "share of samples the augmentation changes (1: all, the original code's; 0.1: Somepalli et al.)"),
    ("embedding_noise", float, "std of Gaussian noise added to the caption embeddings (Somepalli et al.)"),
    ("caption_per_line", bool, "a caption file of several lines holds several captions of its image: one is drawn "
                               "at each use (Somepalli et al.'s multiple captions)"),
    ("lora_rank", int, "fine-tune a LoRA adapter of this rank on the denoiser's attention projections instead of "
                       "the whole denoiser; writes OUTPUT/pytorch_lora_weights.safetensors, read by --lora"),
    ("seed", int, ""),
    ("num_threads", int, "torch threads per process (1 when several run on one CPU)"),
)
CHOICES = {"mixed_precision": ("no", "fp16", "bf16")}


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.train import TrainConfig

    base = TrainConfig(output_dir="")

    p = sub.add_parser("train", help="fine-tune a UNet (memorization recipe, training-time mitigation)",
                       description="The original code's train_text_to_image.py: pairs [0, end) of --dataset repeated "
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
    g = p.add_argument_group("training (defaults: TrainConfig's, the original recipe on Stable Diffusion)")
    for name, kind, help in TRAIN_OPTIONS:
        default = getattr(base, name)
        flag = "--" + ("threads" if name == "num_threads" else name.replace("_", "-"))
        if kind is bool:
            g.add_argument(flag, dest=name, action="store_const", const=True, help=help)
        elif name == "validation_prompts":
            g.add_argument(flag, dest=name, nargs="+", type=str, help=help)
        else:
            g.add_argument(flag, dest=name, type=kind, choices=CHOICES.get(name),
                           help=f"{help + '; ' if help else ''}default {default}")
    p.set_defaults(run=run)


def config_from_args(args):
    """TrainConfig's defaults with the options given on the command line applied."""
    from diffmem.cli.options import given
    from diffmem.train import TrainConfig, parse_hard_threshold

    options = given(args, [name for name, _, _ in TRAIN_OPTIONS])
    if "hard_threshold" in options:
        options["hard_threshold"] = parse_hard_threshold(options["hard_threshold"])
    if "validation_prompts" in options:
        options["validation_prompts"] = tuple(options["validation_prompts"])
    return TrainConfig(output_dir=args.output_dir, **options)


def run(args) -> int:
    from diffmem.cli.main import load_model_from_args
    from diffmem.train import memorization_mix, open_pairs, train

    config = config_from_args(args)  # checked before loading anything
    model = load_model_from_args(args)
    res = args.resolution or model.image_size
    mem = open_pairs(args.dataset, res, args.center_crop, args.random_flip) if args.dataset else None
    non = open_pairs(args.non_mem_dataset, res, args.center_crop, args.random_flip) if args.non_mem_dataset else None
    dataset = memorization_mix(mem, non, args.end, args.repeats, args.non_mem_ratio)
    out = train(model, dataset, config)
    if config.lora_rank:
        from diffmem.adapters.lora import LORA_FILE

        print(f"LoRA adapter written to {out / LORA_FILE} (use it with --model {args.model} --lora {out / LORA_FILE})")
    else:
        print(f"trained model written to {out}")
    return 0
