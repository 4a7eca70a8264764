"""``diffmem audit``: detect, calibrate, explain and mitigate in one command, with an HTML report."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args

    p = sub.add_parser("audit", help="the one-command memorization audit, with an HTML report",
                       description="Score every prompt (first-step detection), calibrate the threshold on "
                       "reference prompts, explain and mitigate the flagged ones, and write DIR/index.html and "
                       "DIR/results.jsonl. Re-running with the same --out resumes. With no arguments it audits "
                       "the built-in lab model on the lab's own prompt sets.")
    common_model_args(p)
    p.add_argument("--prompts", default=None, help="prompts to audit (.jsonl, .txt, .csv, .parquet or a local HF "
                   "dataset folder); default for lab models: memorized, novel and non-memorized lab captions")
    p.add_argument("--prompt-key", default="caption", help="field/column holding the prompt (default: caption)")
    p.add_argument("--reference-prompts", default=None, help="prompts known to be normal, to calibrate the threshold "
                   "on; default for lab models: lab novel captions (titles never seen in training)")
    p.add_argument("--threshold", type=float, default=None, help="a given decision threshold instead of calibrating")
    p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate on the reference prompts (default 0.01)")
    p.add_argument("--out", default="audit", help="output folder (default: audit)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--detect-steps", type=int, default=1, help="score window: the first K DDIM steps (default 1)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0, help="prompt at position i starts from seed + i")
    p.add_argument("--batch-size", type=int, default=64, help="UNet samples per call")
    p.add_argument("--target-loss", type=float, default=None,
                   help="embedding optimization stops at d <= this; default: the reference prompts' median score")
    p.add_argument("--max-iters", type=int, default=10, help="AdamW steps of embedding optimization at most")
    p.add_argument("--lr", type=float, default=0.05, help="AdamW learning rate of embedding optimization")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _prompt_set(path: str, key: str):
    from diffmem.audit import PromptSet
    from diffmem.prompts import read_prompts

    return PromptSet(read_prompts(path, key), f"{Path(path).resolve()} ({key})")


def run(args) -> int:
    from diffmem.audit import AuditConfig, lab_audit_prompts, lab_data_of, run_audit
    from diffmem.cli.main import load_model_from_args

    config = AuditConfig(fpr=args.fpr, threshold=args.threshold, num_generations=args.num_generations,
                         num_inference_steps=args.num_inference_steps, detect_steps=args.detect_steps,
                         seed=args.seed, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                         target_loss=args.target_loss, lr=args.lr, max_iters=args.max_iters)
    config.check()  # before loading anything
    prompts = _prompt_set(args.prompts, args.prompt_key) if args.prompts else None
    reference = _prompt_set(args.reference_prompts, args.prompt_key) if args.reference_prompts else None
    model = load_model_from_args(args)
    data = lab_data_of(model)
    if data is not None and (prompts is None or (reference is None and args.threshold is None)):
        lab_prompts, lab_reference = lab_audit_prompts(data)
        prompts = prompts or lab_prompts
        if reference is None and args.threshold is None:
            reference = lab_reference
    if prompts is None:
        raise ValueError(f"--prompts is required: {args.model} is not a lab model, so it has no built-in prompt sets")
    result = run_audit(model, prompts, reference, config, args.out, progress=not args.no_progress)
    flagged = [r for r in result.rows if r["flagged"]]
    print(f"{len(flagged)} of {len(result.rows)} prompts flagged (threshold {result.threshold['value']:.4g}); "
          f"report: {Path(args.out) / 'index.html'}")
    for r in sorted(flagged, key=lambda r: -r["score"])[:5]:
        print(f"  score {r['score']:.4f}  top word {(r.get('top_words') or ['?'])[0]!r:<14} "
              f"mitigated {r.get('mitigated_score', float('nan')):.4f}  {r['prompt'][:60]}")
    return 0
