"""``diffmem lab``: the built-in memorization lab (build the model, export prompts and data)."""

from __future__ import annotations

from pathlib import Path

from diffmem.lab.build import PRESETS


def add_parser(sub) -> None:
    p = sub.add_parser("lab", help="the built-in memorization lab: build, prompts, data")
    lab = p.add_subparsers(dest="lab_verb", required=True, metavar="ACTION")

    b = lab.add_parser("build", help="generate the lab data and train the lab model from scratch")
    b.add_argument("--out", required=True, help="output lab model folder (checkpoints inside)")
    b.add_argument("--preset", default="default", choices=tuple(PRESETS),
                   help="default: the shipped model (~80 min on 2 threads); cells-unblocked: the same with "
                        "titles drawn before the word blocklist existed, shipped until 2026-12-06; cells-linear: "
                        "the same with DDPM's linear noise schedule, shipped until 2026-11-29 (docs/history.md); two-tone: the first "
                        "shipped model (~90 min on one thread); base: no duplicated pairs, the pretrained model the original code's "
                        "memorizing fine-tune starts from (~1 h on one thread); fast: the test-suite variant (a few minutes)")
    b.add_argument("--max-train-steps", type=int, default=None, help="override the preset's step count")
    b.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    b.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    b.add_argument("--lr-scheduler", default=None, help="override the preset's schedule (constant_with_warmup, cosine, ...)")
    b.add_argument("--lr-warmup-steps", type=int, default=None, help="override the preset's warm-up steps")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 when running beside other jobs)")
    b.add_argument("--init-from", default=None, help="continue training from this lab model's weights "
                   "(e.g. 'lab' for the shipped one) with a fresh optimizer: one run, without the preset's anneal stages")
    b.add_argument("--no-anneal", action="store_true", help="only the main run, without the preset's anneal stages")
    b.add_argument("--resume-from", default=None, help="branch from a checkpoint folder of another build of the "
                   "same preset: continue from its step, optimizer and schedule into --out")
    b.add_argument("--hard-threshold", default=None, help="training-time mitigation: leave samples whose d is at or "
                   "above this out of the loss; K comma-separated numbers give one per band of timesteps")
    b.add_argument("--prompt-aug-style", default=None, help="caption augmentation baseline, e.g. rand-word-add")
    b.add_argument("--repeat-num", type=int, default=None, help="items the caption augmentation inserts (default 1)")
    b.set_defaults(run=run_build)

    s = lab.add_parser("prompts", help="export a lab prompt set with ground truth as JSON Lines")
    s.add_argument("--set", required=True, choices=("memorized", "non-memorized", "novel", "out-of-style"))
    s.add_argument("--out", required=True)
    s.add_argument("--limit", type=int, default=None, help="at most this many rows")
    s.add_argument("--model", default="lab", help="lab model whose data to use (default: the built-in one)")
    s.set_defaults(run=run_prompts)

    r = lab.add_parser("report", help="measure copy rates, content accuracy and detection ROC of a lab model")
    r.add_argument("--model", default="lab")
    r.add_argument("--out", required=True, help="folder for report.json and report.md")
    r.add_argument("--num-control", type=int, default=200, help="prompts per control set for full sampling")
    r.add_argument("--num-inference-steps", type=int, default=50)
    r.set_defaults(run=run_report)

    d = lab.add_parser("data", help="export the lab's training pairs in the original code's folder layout")
    d.add_argument("--out", required=True)
    d.add_argument("--limit", type=int, default=None, help="at most this many non-memorized pairs")
    d.add_argument("--model", default="lab")
    d.add_argument("--captions-per-image", type=int, default=1, help="descriptions per image, one per line of its "
                   "caption file (1-3; for diffmem train --caption-per-line)")
    d.set_defaults(run=run_data)


def lab_data_of(model_arg: str):
    from diffmem.adapters import resolve_model_path
    from diffmem.adapters.lab import load_lab_meta
    from diffmem.lab.data import lab_data_from_config

    family, path = resolve_model_path(model_arg)
    if family != "lab":
        raise ValueError(f"--model {model_arg}: not a lab model folder (no lab_model.json)")
    return lab_data_from_config(load_lab_meta(path)["data"])


def run_build(args) -> int:
    from dataclasses import replace

    from diffmem.lab.build import build_lab

    config = PRESETS[args.preset]
    if args.max_train_steps:
        config = replace(config, max_train_steps=args.max_train_steps)
    for name in ("learning_rate", "lr_scheduler", "lr_warmup_steps", "prompt_aug_style", "repeat_num"):
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if args.hard_threshold is not None:
        from diffmem.train import parse_hard_threshold

        config = replace(config, hard_threshold=parse_hard_threshold(args.hard_threshold))
    if args.resume_from and not (Path(args.resume_from) / "diffmem_train_state.json").is_file():
        raise FileNotFoundError(f"--resume-from {args.resume_from}: not a training checkpoint folder "
                                "(no diffmem_train_state.json); pass e.g. RUN/checkpoint-2000")
    if args.init_from or args.no_anneal:
        config = replace(config, anneal=())
    init = None
    if args.init_from:
        from diffmem.adapters import resolve_model_path

        init = resolve_model_path(args.init_from)[1]
    out = build_lab(args.out, config, resume=args.resume, num_threads=args.threads, init_from=init,
                    resume_from=args.resume_from)
    print(f"lab model written to {out}; use it with --model {out}")
    return 0


def run_prompts(args) -> int:
    from diffmem.lab.prompts import write_prompt_set

    n = write_prompt_set(lab_data_of(args.model), args.set, args.out, args.limit)
    print(f"wrote {n} {args.set} prompts to {args.out}")
    return 0


def run_data(args) -> int:
    from diffmem.lab.export import export_training_data

    counts = export_training_data(lab_data_of(args.model), Path(args.out), args.limit, args.captions_per_image)
    print(f"wrote {counts['memorized']} memorized and {counts['non_memorized']} non-memorized pairs to {args.out}")
    return 0


def run_report(args) -> int:
    import json

    from diffmem.adapters import load_model
    from diffmem.lab.report import lab_report, report_markdown
    from diffmem.provenance import provenance

    model = load_model(args.model)
    report = lab_report(model, num_control=args.num_control, num_inference_steps=args.num_inference_steps)
    report["provenance"] = provenance(model, num_control=args.num_control, num_inference_steps=args.num_inference_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    print(report_markdown(report))
    return 0
