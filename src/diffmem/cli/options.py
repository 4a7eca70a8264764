"""Option groups shared by several verbs. Defaults live in the config classes only: every option
here defaults to None ("not given") and a verb's config is its config class's default with the
given options applied, so a CLI default cannot drift from the library's."""

from __future__ import annotations

from dataclasses import fields, replace

SAMPLING_OPTIONS = ("num_generations", "num_inference_steps", "guidance_scale", "seed", "batch_size")


def given(args, names) -> dict:
    """{name: value} of the options among `names` that were given on the command line."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_sampling_args(p, base, track_steps: bool = False, same_noise: bool = False) -> None:
    """--num-generations, --num-inference-steps, --guidance-scale, --seed, --batch-size (and
    --track-steps, --same-noise) over `base`, a SamplingConfig whose values the help shows as defaults."""
    g = p.add_argument_group("sampling")
    g.add_argument("--num-generations", type=int, help=f"images per prompt, d is averaged over them (default {base.num_generations})")
    g.add_argument("--num-inference-steps", type=int, help=f"DDIM steps of the schedule (default {base.num_inference_steps})")
    if track_steps:
        g.add_argument("--track-steps", type=int, help="stop after K steps (1: first-step detection; default: all)")
    g.add_argument("--guidance-scale", type=float, help="default: the model's (7.5 for SD, the lab's own)")
    g.add_argument("--seed", type=int, help=f"prompt at position i starts from seed + i (default {base.seed})")
    if same_noise:
        add_same_noise_arg(g)
    g.add_argument("--batch-size", type=int, help=f"UNet samples per call, cond + uncond rows (default {base.batch_size})")


def add_same_noise_arg(p) -> None:
    p.add_argument("--same-noise", action="store_true", default=None,
                   help="every prompt starts from the one x_T of --seed (generation g the same for all prompts), "
                   "the protocol of Jeon et al., Asthana et al., NeMo and MemBench; default: seed + position")


def sampling_from_args(args, base):
    return replace(base, **given(args, SAMPLING_OPTIONS + ("track_steps", "same_noise")))


def add_mitigation_args(p, prefix: str = "", with_repeat: bool = True) -> None:
    """--target-loss, --lr / --max-iters (embedding-opt) and --repeat-num (augmentations); `prefix`
    names the learning-rate and iteration options (``serve`` uses --mitigation-lr)."""
    p.add_argument("--target-loss", type=float, help="embedding-opt: stop once the first-step loss <= this (default: "
                   "the model's: 3 on SD, the original code's; on the lab, the median loss of its reference prompts)")
    p.add_argument("--target-unit", choices=("batch", "mean"), help="embedding-opt's loss: batch = the original code's "
                   "||eps_c - eps_u|| over all generations at once (default), mean = the mean per-image d")
    p.add_argument(f"--{prefix}lr", dest="lr", type=float,
                   help="embedding-opt: AdamW learning rate (default: the model's; 0.05 on SD, 0.01 on the lab)")
    p.add_argument(f"--{prefix}max-iters", dest="max_iters", type=int,
                   help="embedding-opt: AdamW steps at most (default: the model's; 10 on SD, 50 on the lab)")
    p.add_argument("--optim-step", type=int, help="embedding-opt at this DDIM step, 0-based (the original code's "
                   "--optim_target_steps; default 0)")
    p.add_argument("--epsilon", type=float, help="embedding-opt, L2-constrained: once the mean token distance "
                   "from the prompt's embedding exceeds this, minimize alpha * loss + (1 - alpha) * distance")
    p.add_argument("--alpha", type=float, help="weight of the loss past --epsilon (default 0.5)")
    if with_repeat:
        p.add_argument("--repeat-num", type=int, help="augmentations: items inserted per prompt (default 4)")


def add_param_arg(p, sweep: bool = False) -> None:
    """--param NAME=VALUE: a parameter of the field's methods (docs/mitigations.md lists each method's)."""
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a parameter of the method (repeatable), e.g. c1=1.25 for ren-attention or loss_threshold=8.2 "
                   "for sail; " + ("comma-separated values sweep it (c1=1.1,1.25,1.5); " if sweep else "") +
                   "see docs/mitigations.md for each method's parameters and defaults")


def params_from_args(args, sweep: bool = False) -> dict:
    """{name: value} of the --param options ({name: (values...)} with `sweep`); a repeated name raises."""
    from diffmem.mitigations import parse_param, parse_value

    out: dict = {}
    for text in getattr(args, "param", None) or []:
        name, value = parse_param(text)
        if name in out:
            raise ValueError(f"--param {name}: given twice")
        if sweep:
            value = tuple(parse_value(v.strip()) for v in text.split("=", 1)[1].split(","))
        out[name] = value
    return out


def mitigation_from_args(args, base):
    return replace(base, **given(args, ("target_loss", "target_unit", "lr", "max_iters", "optim_step", "epsilon",
                                        "alpha", "repeat_num")), params=params_from_args(args))


def add_explain_args(p, base) -> None:
    """The window and sampling of token significance (``explain``, ``serve``), over `base` (ExplainConfig)."""
    g = p.add_argument_group("explanation")
    g.add_argument("--start-step", type=int, help=f"first DDIM step of the window, 0-based (default {base.steps[0]})")
    g.add_argument("--end-step", type=int, help=f"stop before this step (default {base.steps[1]}: the first step only)")
    g.add_argument("--num-generations", dest="generations", type=int,
                   help=f"x_T draws the gradient is averaged over (default {base.generations})")
    g.add_argument("--num-inference-steps", type=int, help=f"DDIM schedule the window lives in (default {base.num_inference_steps})")
    g.add_argument("--guidance-scale", type=float, help="for the steps before the window; default: the model's")
    g.add_argument("--seed", type=int, help=f"the prompt at position i starts from seed + i (default {base.seed})")


def explain_from_args(args, base):
    names = [f.name for f in fields(base) if f.name != "steps"]
    steps = (args.start_step if args.start_step is not None else base.steps[0],
             args.end_step if args.end_step is not None else base.steps[1])
    return replace(base, steps=steps, **given(args, names))


def parse_weights(text: str | None):
    """--asthana-weights "g1,g2" -> (g1, g2); None stays None."""
    if text is None:
        return None
    try:
        g1, g2 = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--asthana-weights {text!r}: expected two numbers, e.g. 1,2") from None
    return g1, g2


DATASET_HELP = ("prompts with their training images: a folder of image + caption .txt pairs, a ground-truth .jsonl "
                "(caption, index; gt_images/<index>/*.png beside it), or lab:<set>; default for lab models: "
                "lab:memorized")


THRESHOLD_HELP = ("decision threshold for a verdict (score >= it: memorized): a number, or a JSON file holding one "
                  "(the threshold.json that diffmem audit writes, or diffmem roc --json's summary); it holds for "
                  "the same step window and number of generations it was calibrated with")
NO_THRESHOLD_HINT = ("no verdict: no threshold known. Pass --threshold T, or --threshold AUDIT_DIR/threshold.json "
                     "(diffmem audit calibrates one at 1% FPR on normal prompts; diffmem roc --json too)")


def read_threshold(text: str | None) -> tuple[float, str] | None:
    """--threshold: (value, where it came from) from a number or a JSON file; None when not given."""
    import json
    from pathlib import Path

    if text is None:
        return None
    try:
        return float(text), "--threshold"
    except ValueError:
        pass
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"--threshold {text!r}: neither a number nor a JSON file")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--threshold {path}: not JSON ({e.msg}, line {e.lineno})") from None
    for key in ("value", "threshold_at_1fpr", "threshold"):
        if isinstance(obj, dict) and isinstance(obj.get(key), (int, float)):
            return float(obj[key]), f"{path} ({key})"
    raise ValueError(f"--threshold {path}: no 'value' (audit threshold.json) or 'threshold_at_1fpr' (roc --json) in it")


def verdict(score: float, threshold: float) -> str:
    return "memorized" if score >= threshold else "not memorized"
