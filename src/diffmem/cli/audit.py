"""``diffmem audit``: detect, calibrate, explain and mitigate in one command, with an HTML report."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from diffmem.audit import AuditConfig
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import add_mitigation_args, add_sampling_args

    base = AuditConfig()
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
                   "on ('random': the original's random control set); default for lab models: lab novel captions "
                   "(titles never seen in training)")
    p.add_argument("--threshold", type=float, help="a given decision threshold instead of calibrating")
    p.add_argument("--fpr", type=float, help=f"false-positive rate on the reference prompts (default {base.fpr})")
    p.add_argument("--out", default="audit", help="output folder (default: audit)")
    p.add_argument("--detect-steps", type=int, help=f"score window: the first K DDIM steps (default {base.detect_steps})")
    add_sampling_args(p, base.sampling)
    add_mitigation_args(p, with_repeat=False)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _prompt_set(path: str, key: str, model=None, seed: int = 0):
    from diffmem.prompts import PromptSet, needs_model, read_prompts

    if needs_model(path):  # a built-in set: read once the model is loaded
        return None if model is None else PromptSet(read_prompts(path, key, model=model, seed=seed), f"{path} (seed {seed})")
    return PromptSet(read_prompts(path, key), f"{Path(path).resolve()} ({key})")


def config_from_args(args):
    from dataclasses import replace

    from diffmem.audit import AuditConfig
    from diffmem.cli.options import given, mitigation_from_args, sampling_from_args

    base = AuditConfig()
    return replace(base, sampling=sampling_from_args(args, base.sampling),
                   mitigation=mitigation_from_args(args, base.mitigation),
                   **given(args, ("fpr", "threshold", "detect_steps")))


def run(args) -> int:
    from diffmem.audit import run_audit
    from diffmem.cli.main import load_model_from_args
    from diffmem.lab.prompts import lab_audit_prompts

    config = config_from_args(args)  # checked before loading anything
    prompts = _prompt_set(args.prompts, args.prompt_key) if args.prompts else None
    reference = _prompt_set(args.reference_prompts, args.prompt_key) if args.reference_prompts else None
    model = load_model_from_args(args)
    seed = config.sampling.seed
    prompts = prompts or (_prompt_set(args.prompts, args.prompt_key, model, seed) if args.prompts else None)
    reference = reference or (_prompt_set(args.reference_prompts, args.prompt_key, model, seed)
                              if args.reference_prompts else None)
    data = model.training_data()
    if data is not None and (prompts is None or (reference is None and args.threshold is None)):
        lab_prompts, lab_reference = lab_audit_prompts(data)
        prompts = prompts or lab_prompts
        if reference is None and args.threshold is None:
            reference = lab_reference
    if prompts is None:
        raise ValueError(f"--prompts is required: {args.model} is not a lab model, so it has no built-in prompt sets")
    result = run_audit(model, prompts, reference, config, args.out, progress=not args.no_progress)
    flagged = [r for r in result.rows if r.flagged]
    print(f"{len(flagged)} of {len(result.rows)} prompts flagged (threshold {result.threshold['value']:.4g}, "
          f"a mean first-step d); report: {Path(args.out) / 'index.html'} (keep its images/ folder beside it)")
    for r in sorted(flagged, key=lambda r: -r.score)[:5]:
        mitigated = float("nan") if r.mitigated_score is None else r.mitigated_score
        print(f"  score {r.score:.4f}  top word {(r.top_words or ['?'])[0]!r:<14} "
              f"mitigated {mitigated:.4f}  {r.prompt[:60]}")
    if result.threshold.get("warning"):
        print(result.threshold["warning"])
    for s in result.shortfalls:
        print("mitigation fell short: " + s.text)
    return 0
