"""``diffmem mitigate``: sample prompts with an inference-time mitigation (Wen et al. sec. 5.1 or a baseline)."""

from __future__ import annotations


def add_sampling_args(p) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--num-generations", type=int, default=4, help="images per prompt (d is averaged over them)")
    g.add_argument("--num-inference-steps", type=int, default=50)
    g.add_argument("--guidance-scale", type=float, default=None, help="default: the model's (7.5 for SD)")
    g.add_argument("--seed", type=int, default=0, help="prompt at position i starts from seed + i")
    g.add_argument("--batch-size", type=int, default=16, help="UNet samples per call (cond + uncond rows)")
    g.add_argument("--no-progress", action="store_true")


def sampling_config(args):
    from diffmem.sampling import SamplingConfig

    if args.num_generations < 1:
        raise ValueError(f"--num-generations {args.num_generations}: must be >= 1")
    return SamplingConfig(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                          num_generations=args.num_generations, seed=args.seed, batch_size=args.batch_size)


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.mitigate import METHODS

    p = sub.add_parser("mitigate", help="sample prompts with an inference-time mitigation",
                       description="embedding-opt: AdamW on the prompt embedding until the first-step d <= "
                       "--target-loss (Wen et al. 5.1), then sample every step with it. rand_word_add, "
                       "rand_numb_add, rand_word_repeat: insert --repeat-num random tokens / numbers / prompt words "
                       "(Somepalli et al. 2023). Writes images/, results.jsonl (final d, iterations, modified "
                       "prompt) and embeddings.safetensors to --out.")
    common_model_args(p)
    p.add_argument("--prompts", default=None, help="prompt file (.jsonl, .txt, .csv, .parquet); default for lab "
                   "models: the lab's memorized prompts")
    p.add_argument("--prompt-key", default="caption")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--target-loss", type=float, default=3.0, help="embedding-opt: stop once d <= this (3 on SD)")
    p.add_argument("--lr", type=float, default=0.05, help="embedding-opt: AdamW learning rate")
    p.add_argument("--max-iters", type=int, default=10, help="embedding-opt: AdamW steps at most")
    p.add_argument("--repeat-num", type=int, default=4, help="augmentations: items inserted per prompt")
    p.add_argument("--out", required=True, help="output folder")
    add_sampling_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from diffmem.cli.main import load_model_from_args
    from diffmem.evaluate import run_mitigation
    from diffmem.mitigate import MitigationConfig

    sampling = sampling_config(args)
    config = MitigationConfig(method=args.method, target_loss=args.target_loss, lr=args.lr, max_iters=args.max_iters,
                              repeat_num=args.repeat_num, seed=args.seed)
    model = load_model_from_args(args)
    if args.prompts is None:
        from diffmem.evaluate import load_eval_set

        prompts = [p.caption for p in load_eval_set(model, None).prompts]
    else:
        from diffmem.prompts import read_prompts

        prompts = [r.prompt for r in read_prompts(args.prompts, args.prompt_key)]
    out = run_mitigation(model, prompts, config, sampling, args.out, progress=not args.no_progress)
    import json

    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    print(f"wrote {len(rows)} prompts to {out}: first-step d {sum(r['initial_d'] for r in rows) / len(rows):.4f} -> "
          f"{sum(r['final_d'] for r in rows) / len(rows):.4f} (mean), "
          f"{sum(r['iterations'] for r in rows) / len(rows):.1f} iterations on average")
    return 0
