"""``diffmem explain``: token significance of prompts (Wen et al. sec. 4), as a table, a PNG and JSON."""

from __future__ import annotations

import json
from pathlib import Path


def config_from_args(args):
    from diffmem.cli.options import explain_from_args
    from diffmem.explain import ExplainConfig

    return explain_from_args(args, ExplainConfig())


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import THRESHOLD_HELP, add_explain_args
    from diffmem.explain import ExplainConfig

    p = sub.add_parser("explain", help="which tokens of a prompt drive memorization",
                       description="Token significance: the norm of the gradient of the detection score "
                       "with respect to each token's conditional embedding (Wen et al. sec. 4). Prints a "
                       "ranked table, writes a PNG bar chart and, with --json, one JSON record per prompt.")
    common_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="prompt file (.jsonl, .txt, .csv, .parquet), local HF dataset folder, or "
                     "'random' (the original's random control set)")
    p.add_argument("--prompt-key", default="caption", help="field/column holding the prompt (default: caption)")
    p.add_argument("--start", type=int, default=0, help="first prompt position of --prompts to run")
    p.add_argument("--end", type=int, default=None, help="stop before this prompt position")
    add_explain_args(p, ExplainConfig())
    p.add_argument("--json", default=None, metavar="FILE", help="write one JSON record per prompt (JSON Lines; "
                   "with one prompt the file is a single JSON object)")
    p.add_argument("--png", default="explain.png", metavar="FILE", help="bar chart (several prompts: "
                   "FILE's name + _00000.png per prompt position); default explain.png")
    p.add_argument("--no-png", action="store_true", help="write no chart")
    p.add_argument("--top", type=int, default=None, help="rows of the table (default: all prompt tokens)")
    p.add_argument("--show-special", action="store_true", help="also rank start/end/padding tokens")
    p.add_argument("--threshold", default=None, help=THRESHOLD_HELP)
    p.set_defaults(run=run)


def run(args) -> int:
    from tqdm.auto import tqdm

    from diffmem.cli.main import load_model_from_args
    from diffmem.explain import token_significance
    from diffmem.prompts import PromptRecord, needs_model, read_prompts
    from diffmem.reports.explain import significance_figure, significance_table

    from diffmem.cli.options import NO_THRESHOLD_HINT, read_threshold, verdict

    # 1. Check everything before loading the model
    config = config_from_args(args)
    threshold = read_threshold(args.threshold)
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        records = [PromptRecord(0, args.prompt)]
    elif not needs_model(args.prompts):
        records = read_prompts(args.prompts, args.prompt_key, args.start, args.end)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    png = None if args.no_png else Path(args.png)
    if png is not None and png.suffix.lower() != ".png":
        raise ValueError(f"--png {png}: expected a .png file name")

    # 2. Explain each prompt; print, plot, record
    model = load_model_from_args(args)
    if args.prompt is None and needs_model(args.prompts):
        records = read_prompts(args.prompts, args.prompt_key, args.start, args.end, model=model, seed=config.seed)
    json_file = open(args.json, "w") if args.json else None
    try:
        for r in tqdm(records, desc="explain", unit="prompt", disable=len(records) == 1):
            ex = token_significance(model, r.prompt, config, position=r.position)
            print(significance_table(ex, top=args.top, include_special=args.show_special))
            if threshold:
                print(f"verdict: {verdict(ex.score, threshold[0])} (score {ex.score:.4g}, threshold {threshold[0]:.4g} "
                      f"from {threshold[1]})")
            print()
            if png is not None:
                path = png if len(records) == 1 else png.with_name(f"{png.stem}_{r.position:05d}.png")
                significance_figure(ex, path, include_special=args.show_special)
            if json_file is not None:
                rec = {"index": r.position, **ex.to_json(), "unet": args.unet,
                       **({"source": r.source} if r.source else {})}
                json_file.write(json.dumps(rec) + "\n")
                json_file.flush()
    finally:
        if json_file is not None:
            json_file.close()
    if threshold is None:
        print(NO_THRESHOLD_HINT)
    written = [str(png) if png and len(records) == 1 else (f"{png.stem}_*.png" if png else None), args.json]
    if any(written):
        print("wrote " + ", ".join(w for w in written if w))
    return 0
