"""Benchmarks that compare methods on the same prompts, seeds and model: ``bench_detect``.

``bench_detect`` runs every requested detector at the settings it is defined for (the first step
for those that can take it, the whole trajectory for those that need it; each number of
generations) through ``run_detection``, one pass per setting and prompt set with all its detectors,
and reports per detector, setting and control set: AUC, TPR at 1% and 3% FPR with bootstrap 95%
intervals, and the cost of the detector alone (UNet rows and seconds per prompt, timed on a few
memorized prompts). Scores are taken in each detector's own direction and never label-flipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffmem.detectors import DETECTORS, get_detector
from diffmem.prompts import PromptSet
from diffmem.sampling import SamplingConfig

STEP_SETTINGS = ("first", "all")


@dataclass
class BenchDetectConfig:
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(sorted(DETECTORS)))
    generations: tuple[int, ...] = (1, 4)
    steps: tuple[str, ...] = STEP_SETTINGS  # "first": the first step; "all": the whole trajectory
    num_inference_steps: int = 50
    seed: int = 0
    batch_size: int = 64
    bootstrap: int = 1000  # resamples for the 95% intervals
    timing_prompts: int = 8  # memorized prompts each detector is timed alone on (0: no cost columns)
    asthana_weights: tuple[float, float] | None = None  # where the model has neither published weights nor references

    def __post_init__(self):
        for m in self.methods:
            get_detector(m)
        bad = [s for s in self.steps if s not in STEP_SETTINGS]
        if bad:
            raise ValueError(f"--steps {','.join(bad)}: expected first and/or all")
        if self.timing_prompts < 0 or self.bootstrap < 0:
            raise ValueError(f"--timing-prompts {self.timing_prompts}, --bootstrap {self.bootstrap}: must be >= 0")
        if not self.generations or min(self.generations) < 1:
            raise ValueError(f"--generations {self.generations}: need numbers >= 1")


def applies(method: str, steps: str, generations: int) -> bool:
    """Whether a detector is defined at this setting."""
    d = get_detector(method)
    if generations < getattr(d, "min_generations", 1):
        return False
    if getattr(d, "first_step_only", False):  # its value does not depend on the steps after the first
        return steps == "first"
    return steps == "all" or not getattr(d, "all_steps", False)


def bootstrap_interval(pos: np.ndarray, neg: np.ndarray, stat, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(pos, neg) over `n` resamples of both sides."""
    rng = np.random.default_rng(seed)
    vals = [stat(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]) for _ in range(n)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def detection_metrics(pos, neg, n_bootstrap: int = 1000) -> dict:
    """AUC and TPR at 1% and 3% FPR of memorized (`pos`) against control (`neg`) scores, oriented so
    that higher means memorized, each with a bootstrap 95% interval."""
    from diffmem.metrics import roc_metrics

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    stats = {"auc": lambda p, q: roc_metrics(p, q).auc,
             "tpr_at_1fpr": lambda p, q: roc_metrics(p, q, 0.01).tpr_at_1fpr,
             "tpr_at_3fpr": lambda p, q: roc_metrics(p, q, 0.03).tpr_at_1fpr}
    out = {}
    for name, fn in stats.items():
        out[name] = float(fn(pos, neg))
        out[name + "_ci95"] = bootstrap_interval(pos, neg, fn, n_bootstrap) if n_bootstrap else None
    return out


class _RowCounter:
    """Counts the UNet rows (latents through the UNet) of a model while installed."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def __enter__(self):
        self._orig = self.model.predict_noise

        def counted(x, t, cond, unet=None):
            self.rows += len(x)
            return self._orig(x, t, cond, unet=unet)
        self.model.predict_noise = counted
        return self

    def __exit__(self, *exc):
        self.model.predict_noise = self._orig


def detector_cost(model, method: str, prompts: list[str], sampling: SamplingConfig, **options) -> dict:
    """UNet rows and seconds per prompt of one detector alone (its pass included)."""
    from diffmem.detect import detect_unit
    from diffmem.sampling import plan_units

    det = get_detector(method, **options)
    if hasattr(det, "prepare"):
        det.prepare(model, sampling)
    with _RowCounter(model) as counter:
        t0 = time.perf_counter()
        for unit in plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size):
            detect_unit(model, [det], [prompts[p] for p in unit], unit, sampling)
        seconds = time.perf_counter() - t0
    return {"unet_rows_per_prompt": counter.rows / len(prompts), "seconds_per_prompt": seconds / len(prompts)}


def bench_detect(model, memorized: PromptSet, controls: dict[str, PromptSet], config: BenchDetectConfig,
                 out: str | Path, progress: bool = True) -> dict:
    """Run the detection benchmark; write ``table.md``, ``table.json``, one ROC figure per row and
    the detection outputs (``runs/``, resumable) under `out`. Returns the table as a dict."""
    from diffmem.detect import run_detection
    from diffmem.files import read_rows
    from diffmem.provenance import provenance
    from diffmem.reports.plots import roc_figure

    out = Path(out)
    (out / "roc").mkdir(parents=True, exist_ok=True)
    rows = []
    for G in config.generations:
        for steps in config.steps:
            methods = [m for m in config.methods if applies(m, steps, G)]
            if not methods:
                continue
            sampling = SamplingConfig(num_inference_steps=config.num_inference_steps, num_generations=G,
                                      seed=config.seed, track_steps=1 if steps == "first" else None,
                                      batch_size=config.batch_size)
            # 1. One pass per prompt set with every detector of this setting.
            scored = {}
            for name, prompts in {"memorized": memorized, **controls}.items():
                path = out / "runs" / f"g{G}-{steps}" / f"{name}.jsonl"
                run_detection(model, prompts.records, path, sampling, resume=True, methods=methods,
                              progress=progress, prompts_info={"set": name, "source": prompts.source},
                              asthana_weights=config.asthana_weights)
                scored[name] = read_rows(path)
            # 2. Per detector and control set: the metrics, in the detector's own direction.
            for m in methods:
                det = get_detector(m)
                sign = 1.0 if det.higher_is_memorized else -1.0
                pos = [sign * r[m] for r in scored["memorized"]]
                timing = [r.prompt for r in memorized.records[:config.timing_prompts]]
                cost = detector_cost(model, m, timing, sampling, asthana_weights=config.asthana_weights) if timing \
                    else {"unet_rows_per_prompt": None, "seconds_per_prompt": None}
                for name in controls:
                    neg = [sign * r[m] for r in scored[name]]
                    metrics = detection_metrics(pos, neg, config.bootstrap)
                    rows.append({"method": m, "steps": steps, "generations": G, "control": name,
                                 "n_memorized": len(pos), "n_control": len(neg),
                                 "higher_is_memorized": det.higher_is_memorized, **metrics, **cost})
                    from diffmem.metrics import roc_metrics

                    roc_figure(roc_metrics(pos, neg), pos, neg, out / "roc" / f"{m}-{steps}-g{G}-{name}.png",
                               title=f"{m}, {steps} step{'s' if steps == 'all' else ''}, G = {G}",
                               negative_label=name, score_label=f"{m} score" + ("" if sign > 0 else ", negated"))
    table = {**provenance(model, config=asdict(config), memorized=memorized.source,
                          controls={k: v.source for k, v in controls.items()}), "rows": rows}
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "table.md").write_text(format_table(rows))
    return table


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict]) -> str:
    ci = lambda r, k: f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]" if r[k + "_ci95"] else f"{r[k]:.3f}"
    lines = ["| method | steps | G | control | AUC [95% CI] | TPR@1%FPR [95% CI] | TPR@3%FPR [95% CI] | "
             "UNet rows / prompt | s / prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['generations']} | {r['control']} | {ci(r, 'auc')} | "
                     f"{ci(r, 'tpr_at_1fpr')} | {ci(r, 'tpr_at_3fpr')} | {_num(r['unet_rows_per_prompt'], '.0f')} | "
                     f"{_num(r['seconds_per_prompt'], '.3f')} |")
    return "\n".join(lines) + "\n"
