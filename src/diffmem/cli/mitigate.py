"""``diffmem mitigate``: sample prompts with an inference-time mitigation (Wen et al. sec. 5.1 or a baseline)."""

from __future__ import annotations


def config_from_args(args):
    """(MitigationConfig, SamplingConfig) of a mitigate run."""
    from diffmem.cli.options import mitigation_from_args, sampling_from_args
    from diffmem.mitigate import MitigationConfig
    from diffmem.sampling import SamplingConfig

    sampling = sampling_from_args(args, SamplingConfig())
    return mitigation_from_args(args, MitigationConfig(method=args.method, seed=sampling.seed)), sampling


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import add_mitigation_args, add_param_arg, add_sampling_args
    from diffmem.mitigate import METHODS
    from diffmem.mitigations import canonical_name
    from diffmem.sampling import SamplingConfig

    p = sub.add_parser("mitigate", help="sample prompts with an inference-time mitigation",
                       description="embedding-opt: AdamW on the prompt embedding until the first-step d <= "
                       "--target-loss (Wen et al. 5.1), then sample every step with it. rand-word-add, "
                       "rand-numb-add, rand-word-repeat: insert --repeat-num random tokens / numbers / prompt words "
                       "(Somepalli et al. 2023). The field's other methods take --param NAME=VALUE "
                       "(docs/mitigations.md; embedding-opt: docs/mitigation.md). Writes images/, results.jsonl (final d, iterations, UNet rows, "
                       "seconds, modified prompt) and embeddings.safetensors to --out.")
    common_model_args(p)
    p.add_argument("--prompts", default=None, help="prompt file (.jsonl, .txt, .csv, .parquet) or 'random'; default "
                   "for lab models: the lab's memorized prompts")
    p.add_argument("--prompt-key", default="caption")
    p.add_argument("--method", required=True, choices=METHODS, type=canonical_name)
    add_mitigation_args(p)
    add_param_arg(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue the run already in --out")
    add_sampling_args(p, SamplingConfig(), same_noise=True)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from diffmem.cli.main import load_model_from_args
    from diffmem.mitigate import run_mitigation

    from diffmem.prompts import needs_model, read_prompts

    config, sampling = config_from_args(args)  # checked before loading anything
    file_prompts = args.prompts is not None and not needs_model(args.prompts)
    prompts = [r.prompt for r in read_prompts(args.prompts, args.prompt_key)] if file_prompts else None
    model = load_model_from_args(args)
    if args.prompts is None:
        from diffmem.eval_sets import load_eval_set

        prompts = [p.caption for p in load_eval_set(model, None).prompts]
    elif prompts is None:
        prompts = [r.prompt for r in read_prompts(args.prompts, args.prompt_key, model=model, seed=sampling.seed)]
    out = run_mitigation(model, prompts, config, sampling, args.out, progress=not args.no_progress, resume=args.resume)
    import json

    from diffmem.targets import describe_target, mitigation_shortfalls

    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    meta = json.loads((out / "meta.json").read_text())["mitigation"]  # the settings resolved for this model
    target = f" (target first-step {describe_target(meta['target_loss'], meta['target_unit'], sampling.num_generations)})" \
        if config.method == "embedding-opt" else ""
    print(f"wrote {len(rows)} prompts to {out}: first-step d {sum(r['initial_d'] for r in rows) / len(rows):.4f} -> "
          f"{sum(r['final_d'] for r in rows) / len(rows):.4f} (mean over prompts){target}, "
          f"{sum(r['iterations'] for r in rows) / len(rows):.1f} iterations on average")
    if config.method == "embedding-opt":
        for s in mitigation_shortfalls(rows, meta["target_loss"], meta["target_unit"], sampling.num_generations,
                                       meta["max_iters"], meta["lr"]):
            print("mitigation fell short: " + s.text)
    return 0
