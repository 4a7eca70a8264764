"""``diffmem detect``: per-step, per-generation text-conditional noise norms for a prompt list."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import THRESHOLD_HELP, add_sampling_args
    from diffmem.detectors import DETECTORS
    from diffmem.sampling import SamplingConfig

    p = sub.add_parser("detect", help="track the detection metric during sampling and score each prompt",
                       description="Sample each prompt with DDIM + classifier-free guidance and record "
                       "d = ||eps(x_t, prompt) - eps(x_t, '')|| per generation and step (Wen et al. sec. 3).")
    common_model_args(p)
    p.add_argument("--prompts", default=None, help="prompt file (.jsonl, .txt, .csv, .parquet), local HF "
                   "dataset folder, or 'random' (2,000 prompts of random tokens, the original's control set); "
                   "default: the lab's memorized and novel prompts")
    p.add_argument("--prompt-key", default="caption", help="field/column holding the prompt (default: caption)")
    p.add_argument("--start", type=int, default=0, help="first prompt position to run (0-based)")
    p.add_argument("--end", type=int, default=None, help="stop before this prompt position")
    p.add_argument("--out", default="detect_results.jsonl", help="output JSON Lines (metadata beside it in .meta.json)")
    p.add_argument("--method", default=None, help="detectors to run in the same pass, comma-separated "
                   f"(known: {', '.join(sorted(DETECTORS))}; default: wen); each adds its score to the row "
                   "under its own name, the first one's is also 'score'")
    p.add_argument("--norm-order", type=float, default=2.0, help="p of the norm of eps_c - eps_u (default 2, the "
                   "paper's; the original's --lp)")
    p.add_argument("--asthana-weights", default=None, help="g1,g2 of the asthana detector where the model has no "
                   "published weights and no reference prompts (SDXL, ...)")
    p.add_argument("--asthana-space", choices=("official", "noise"), default="official",
                   help="where asthana takes its norm and cosine on v-prediction models (SD 2.x): official (default): "
                   "in the UNet's velocity space, as the official code, on which the published weights were "
                   "tuned; noise: on the noise, as on epsilon models")
    p.add_argument("--format", choices=("diffmem", "official"), default="diffmem",
                   help="official: --out holds only the original code's fields (uncond_noise_norm, text_noise_norm, "
                   "prompt) for its analysis notebooks; the full rows go to <out>.rows.jsonl beside it")
    add_sampling_args(p, SamplingConfig(), track_steps=True, same_noise=True)
    p.add_argument("--at-sigma", type=float, default=None, metavar="S", help="flow-matching models (SD3): score d "
                   "at the step whose sigma is nearest S in (0, 1], sampling the steps before it (instead of "
                   "--track-steps); rows record the sigma of every tracked step")
    p.add_argument("--reference-prompts", default=None, metavar="FILE", help="ordinary prompts (a prompt file) for the "
                   "detectors that calibrate on them (broken-memories; a lab model has its own)")
    p.add_argument("--threshold", default=None, help=THRESHOLD_HELP)
    p.add_argument("--save-images", default=None, metavar="DIR", help="also decode and save the generations")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def config_from_args(args):
    from diffmem.cli.options import sampling_from_args
    from diffmem.sampling import SamplingConfig

    return sampling_from_args(args, SamplingConfig())


def run(args) -> int:
    from diffmem.cli.main import load_model_from_args
    from diffmem.detect import full_rows_path, run_detection
    from diffmem.cli.options import parse_weights, read_threshold
    from diffmem.detectors import parse_methods
    from diffmem.prompts import needs_model, read_prompts

    config = config_from_args(args)  # checked before loading anything
    methods = parse_methods(args.method)
    threshold = read_threshold(args.threshold)
    parse_weights(args.asthana_weights)
    reference = reference_prompts(args)  # read before the model loads
    if args.prompts is None:
        from diffmem.lab import BUILT_IN

        if args.model not in BUILT_IN:
            raise ValueError("--prompts is required unless --model is a built-in lab (lab, lab-flow)")
        from diffmem.lab.prompts import default_detection_prompts

        records = default_detection_prompts(args.start, args.end, BUILT_IN[args.model])
        info = {"file": "lab:memorized+novel"}
    elif needs_model(args.prompts):
        records, info = None, {"set": args.prompts, "seed": config.seed, "start": args.start, "end": args.end}
    else:
        records = read_prompts(args.prompts, args.prompt_key, args.start, args.end)
        info = {"file": str(Path(args.prompts).resolve()), "prompt_key": args.prompt_key,
                "start": args.start, "end": args.end}
    model = load_model_from_args(args)
    if records is None:
        records = read_prompts(args.prompts, args.prompt_key, args.start, args.end, model=model, seed=config.seed)
    out = run_detection(model, records, args.out, config, resume=args.resume, images_dir=args.save_images,
                        prompts_info=info, unet=args.unet, progress=not args.no_progress, methods=methods,
                        format=args.format, norm_order=args.norm_order, asthana_weights=parse_weights(args.asthana_weights),
                        asthana_space=args.asthana_space, at_sigma=args.at_sigma,
                        reference_prompts=reference)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _print_summary(out, out if args.format == "diffmem" else full_rows_path(out), threshold)
    return 0


def _print_summary(out: Path, rows_path: Path, threshold: tuple[float, str] | None = None) -> None:
    from diffmem.cli.options import NO_THRESHOLD_HINT, verdict
    from diffmem.detect import read_rows

    rows = read_rows(rows_path)
    top = sorted(rows, key=lambda r: -r["score"])[:5]
    print(f"wrote {len(rows)} rows to {out}" + ("" if rows_path == out else f" (full rows in {rows_path})"))
    for r in top:
        print(f"  score {r['score']:.4f}  #{r['index']}  {r['prompt'][:70]}"
              + (f"  [{verdict(r['score'], threshold[0])}]" if threshold else ""))
    if threshold is None:
        print(NO_THRESHOLD_HINT)
    else:
        n = sum(r["score"] >= threshold[0] for r in rows)
        print(f"verdict: {n} of {len(rows)} prompts memorized (score >= threshold {threshold[0]:.4g}, from {threshold[1]})")


def reference_prompts(args) -> list[str] | None:
    """The prompts of --reference-prompts, or None."""
    if not getattr(args, "reference_prompts", None):
        return None
    from diffmem.prompts import read_prompts

    return [r.prompt for r in read_prompts(args.reference_prompts, args.prompt_key)]
