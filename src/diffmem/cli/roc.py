"""``diffmem roc``: AUC, accuracy and TPR@1%FPR of two detection outputs over any step window."""

from __future__ import annotations

import json
from pathlib import Path


def parse_steps(text: str | None) -> slice | None:
    """'a:b' -> slice(a, b); 'a' -> slice(a, a + 1); None -> all steps."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return slice(int(a) if a else None, int(b) if b else None)
        return slice(int(text), int(text) + 1)
    except ValueError:
        raise ValueError(f"--steps {text!r}: expected a:b (0-based, end exclusive), e.g. 0:1 for the first step") from None


def add_parser(sub) -> None:
    p = sub.add_parser("roc", help="ROC metrics of memorized vs non-memorized detection outputs",
                       description="Recompute prompt scores from stored per-step arrays and report AUC, "
                       "accuracy and TPR@1%FPR as the official notebook defines them (the strict rule: FPR below 1%), and "
                       "TPR@1%FPR by the closest-point rule of Ren's, Jeon's and Asthana's evaluation scripts.")
    p.add_argument("--memorized", required=True, help="detection output (.jsonl) of memorized prompts")
    p.add_argument("--non-memorized", required=True, help="detection output (.jsonl) of normal prompts")
    p.add_argument("--method", default="wen", help="which detector's score to evaluate (a field of the rows; "
                   "default: wen); its direction (higher or lower = memorized) comes from the detector")
    p.add_argument("--steps", default=None, help="step window a:b (default: all tracked steps)")
    p.add_argument("--generations", type=int, default=None, help="use the first g generations (default: all)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.add_argument("--plot", default=None, help="write the ROC + score distribution PNG here "
                   "(default: beside --json, or roc.png)")
    p.set_defaults(run=run)


def scores_from(path: str | Path, steps: slice | None, generations: int | None, method: str = "wen") -> list[float]:
    """Each row's score by `method`, oriented so that higher means memorized (a detector whose
    lower values mean memorized is negated, never label-flipped)."""
    from diffmem.detect import read_rows
    from diffmem.detectors import get_detector

    detector = get_detector(method)
    sign = 1.0 if detector.higher_is_memorized else -1.0
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such detection output")
    rows = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no result rows")
    out = []
    for i, r in enumerate(rows, 1):
        try:
            out.append(sign * detector.score_of(r, steps, generations))
        except KeyError as e:
            raise ValueError(f"{path}:{i}: no {method} score in this row (field {e.args[0]!r} absent; it has "
                             f"{', '.join(_scores_in(r)) or 'no detector score'}): run diffmem detect --method {method} "
                             "on these prompts, or pick --method among those") from None
        except ValueError as e:
            raise ValueError(f"{path}:{i}: method {method}: {e}") from None
    return out


def _scores_in(row: dict) -> list[str]:
    """The detectors whose score this row holds."""
    from diffmem.detectors import DETECTORS, get_detector

    out = []
    for name in sorted(DETECTORS):
        try:
            get_detector(name).score_of(row)
            out.append(name)
        except Exception:
            continue
    return out


def run(args) -> int:
    from diffmem.detectors import get_detector
    from diffmem.metrics import fpr_sample_warning, roc_metrics
    from diffmem.reports.plots import roc_figure

    steps = parse_steps(args.steps)
    pos = scores_from(args.memorized, steps, args.generations, args.method)
    neg = scores_from(args.non_memorized, steps, args.generations, args.method)
    roc = roc_metrics(pos, neg)
    summary = {**roc.summary(), "method": args.method,
               "higher_is_memorized": get_detector(args.method).higher_is_memorized, "steps": args.steps or "all", "generations": args.generations or "all"}
    print(f"AUC {roc.auc:.4f}   ACC {roc.acc:.4f}   TPR@1%FPR {roc.tpr_at_1fpr:.4f}   "
          f"threshold@1%FPR {roc.threshold_at_1fpr:.6g}   ({roc.n_memorized} memorized, {roc.n_non_memorized} non-memorized)")
    print(f"TPR@1%FPR by the closest-point rule of Ren, Jeon and Asthana: {roc.tpr_at_1fpr_closest:.4f} "
          f"(at FPR {roc.fpr_at_1fpr_closest:.4f})")
    warning = fpr_sample_warning(roc.n_non_memorized, 0.01, "non-memorized prompts")
    if warning:
        print(warning)
        summary["warning"] = warning
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else "roc.png")
    label = "score (mean text-conditional noise norm)" if args.method == "wen" else \
        f"{args.method} score" + ("" if get_detector(args.method).higher_is_memorized else ", negated")
    roc_figure(roc, pos, neg, plot, title=f"{args.method}: steps {summary['steps']}, generations {summary['generations']}",
               score_label=label)
    print(f"wrote {plot}" + (f" and {args.json}" if args.json else ""))
    return 0
