"""The lab's science figures: copy rates, content accuracy and detection ROC against same-style controls."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffmem.lab.data import LabData, LabPair
from diffmem.lab.judge import TrainingImages, content_correct, copy_threshold, judge_copies
from diffmem.metrics import roc_metrics
from diffmem.sampling import SamplingConfig, sample_prompts


@dataclass
class GenerationFigures:
    set_name: str
    num_prompts: int
    num_generations: int
    copy_rate: float
    content_accuracy: float
    prompts_copied_at_least_once: float


def generation_figures(model, data: LabData, set_name: str, pairs: list[LabPair], train: TrainingImages,
                       threshold: float, config: SamplingConfig):
    """Sample `pairs` fully and judge copies and described content.

    Returns (figures, images (P*G, 3, H, W), per-image copy flags (P*G,), text_noise_norm (P, G, S)).
    """
    res = sample_prompts(model, [p.caption for p in pairs], config, decode=True)
    images = np.concatenate([r.images.numpy() for r in res])  # (P*G, 3, H, W)
    G = config.num_generations
    captions = [p.caption for p in pairs for _ in range(G)]
    copies = judge_copies(images, captions, train, threshold).is_copy
    ok = content_correct(images, [p.spec.colour for p in pairs for _ in range(G)],
                         [p.spec.shape for p in pairs for _ in range(G)])
    figures = GenerationFigures(set_name, len(pairs), G, float(copies.mean()), float(ok.mean()),
                                float(copies.reshape(len(pairs), -1).any(1).mean()))
    return figures, images, copies, np.stack([r.text_noise_norm.numpy() for r in res])


def first_step_scores(model, pairs: list[LabPair], generations: int = 1, num_inference_steps: int = 50,
                      seed: int = 0, track_steps: int = 1, guidance_scale: float | None = None) -> np.ndarray:
    """(P, G, S) text-noise norms of the first `track_steps` steps."""
    cfg = SamplingConfig(num_inference_steps=num_inference_steps, num_generations=generations, seed=seed,
                         track_steps=track_steps, batch_size=64, guidance_scale=guidance_scale)
    res = sample_prompts(model, [p.caption for p in pairs], cfg, decode=False)
    return np.stack([r.text_noise_norm.numpy() for r in res])


def bootstrap_ci(pos: np.ndarray, neg: np.ndarray, metric: str, n: int = 500, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of an ROC metric, resampling both sets."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        p = pos[rng.integers(len(pos), size=len(pos))]
        q = neg[rng.integers(len(neg), size=len(neg))]
        vals.append(getattr(roc_metrics(p, q), metric))
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def detection_table(scores: dict[str, np.ndarray], windows: dict[str, slice], generations=(1, 4),
                    controls=("non-memorized", "novel", "out-of-style")) -> list[dict]:
    """ROC rows: memorized vs each control, per step window and generation count, with 95% CIs."""
    rows = []
    for control in controls:
        if control not in scores:
            continue
        for wname, window in windows.items():
            for g in generations:
                if g > scores["memorized"].shape[1]:
                    continue
                pos = scores["memorized"][:, :g, window].mean((1, 2))
                neg = scores[control][:, :g, window].mean((1, 2))
                r = roc_metrics(pos, neg)
                rows.append({"control": control, "steps": wname, "generations": g, "auc": r.auc,
                             "auc_ci95": bootstrap_ci(pos, neg, "auc"), "tpr_at_1fpr": r.tpr_at_1fpr,
                             "tpr_ci95": bootstrap_ci(pos, neg, "tpr_at_1fpr"),
                             "n_memorized": len(pos), "n_control": len(neg)})
    return rows


def flow_windows(model, num_inference_steps: int) -> dict[str, slice]:
    """The step windows a flow model's report scores d over: sigma = 1 (the first step), the step
    nearest the SNR of SD's first DDIM step (``sd_first_step_sigma``), the first five steps, all steps."""
    from diffmem.adapters.flow import sd_first_step_sigma
    from diffmem.sampling import step_at_sigma

    sigma = sd_first_step_sigma(num_inference_steps)
    k = step_at_sigma(model, num_inference_steps, sigma)
    return {"first step": slice(0, 1), f"sigma {sigma:.3f} (step {k + 1})": slice(k, k + 1),
            "first 5 steps": slice(0, 5), "all steps": slice(None)}


def first_step_spread(scores: np.ndarray) -> dict:
    """How much first-step d varies with x_T: `scores` (P, G) for P prompts and G initial noises.

    Returns the mean over prompts of the coefficient of variation (std over x_T / mean), and the ratio
    of the spread between prompts (std of the prompts' means) to the mean spread within one prompt."""
    within = scores.std(1, ddof=1)
    return {"prompts": int(scores.shape[0]), "generations": int(scores.shape[1]),
            "mean_cv": float((within / scores.mean(1)).mean()),
            "between_over_within": float(scores.mean(1).std(ddof=1) / within.mean())}


def lab_report(model, data: LabData | None = None, num_control: int = 200, num_first_step: int = 500,
               num_inference_steps: int = 50, num_generations: int = 4, seed: int = 0, progress: bool = True,
               spread_generations: int = 16, spread_prompts: int = 50) -> dict:
    """Everything the README's science table reports, measured on one lab model.

    Full sampling (all steps, `num_generations` each, the model's default guidance) of the memorized
    prompts and `num_control` prompts of each control set gives copy rates, content accuracy and
    all-step detection; first-step detection also runs on `num_first_step` prompts per control set.
    On a flow model, d is also scored at SD's first-step SNR and over the first five steps
    (``flow_windows``). The spread of first-step d over `spread_generations` initial noises is
    measured on the memorized prompts and `spread_prompts` novel ones (``first_step_spread``).
    """
    from tqdm.auto import tqdm

    from diffmem.lab.build import lab_data_for

    data = data or lab_data_for(model)
    train = TrainingImages.of(data)
    threshold = copy_threshold(data, train)
    cfg = SamplingConfig(num_inference_steps=num_inference_steps, num_generations=num_generations, seed=seed,
                         batch_size=64)
    sets = {"memorized": data.memorized, "non-memorized": data.non_memorized[:num_control],
            "novel": data.novel[:num_control], "out-of-style": data.out_of_style[:num_control]}
    generation, tracked = [], {}
    for name, pairs in tqdm(sets.items(), desc="lab report: sampling", disable=not progress):
        figures, _, _, tracked[name] = generation_figures(model, data, name, pairs, train, threshold, cfg)
        generation.append({"set": name, "prompts": figures.num_prompts, "generations": figures.num_generations,
                           "copy_rate": figures.copy_rate, "content_accuracy": figures.content_accuracy,
                           "prompts_copied_at_least_once": figures.prompts_copied_at_least_once})
    flow = model.sampler_prediction == "flow"
    windows = flow_windows(model, num_inference_steps) if flow else {"first step": slice(0, 1), "all steps": slice(None)}
    rows = detection_table(tracked, windows, generations=(1, num_generations))
    early = {k: w for k, w in windows.items() if w.stop is not None and w.stop - w.start == 1}  # single early steps
    depth = max(w.stop for w in early.values())
    first = {name: first_step_scores(model, pairs, 1, num_inference_steps, seed, track_steps=depth)
             for name, pairs in [("memorized", data.memorized), ("non-memorized", data.non_memorized[:num_first_step]),
                                 ("novel", data.novel[:num_first_step]), ("out-of-style", data.out_of_style[:num_first_step])]}
    rows_large = detection_table(first, early, generations=(1,))
    spread = {name: first_step_spread(first_step_scores(model, pairs, spread_generations, num_inference_steps,
                                                        seed)[:, :, 0])
              for name, pairs in [("memorized", data.memorized), ("novel", data.novel[:spread_prompts])]}
    return {"model": model.name, "guidance_scale": model.default_guidance_scale, "num_inference_steps": num_inference_steps,
            "prediction": model.sampler_prediction, "copy_threshold_rmse": threshold, "generation": generation,
            "detection": rows, "detection_first_step_large": rows_large,
            "mean_first_step_d": {k: float(v[:, 0, 0].mean()) for k, v in first.items()},
            "first_step_spread": spread}


def report_markdown(report: dict) -> str:
    """The README's tables for a lab report."""
    sampler = "FlowMatch Euler" if report.get("prediction") == "flow" else "DDIM"
    lines = [f"Copy rule: nearest training image is the prompt's own and RMSE < {report['copy_threshold_rmse']:.3f}; "
             f"guidance {report['guidance_scale']}, {report['num_inference_steps']} {sampler} steps.", "",
             "| prompt set | prompts | generations each | copy rate | content correct |", "|---|---|---|---|---|"]
    for g in report["generation"]:
        lines.append(f"| {g['set']} | {g['prompts']} | {g['generations']} | {g['copy_rate']:.3f} | {g['content_accuracy']:.3f} |")
    lines += ["", "| memorized vs | steps | generations | n (mem / control) | AUC [95% CI] | TPR@1%FPR [95% CI] |",
              "|---|---|---|---|---|---|"]
    for r in report["detection_first_step_large"] + report["detection"]:
        lines.append(f"| {r['control']} | {r['steps']} | {r['generations']} | {r['n_memorized']} / {r['n_control']} | "
                     f"{r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] | "
                     f"{r['tpr_at_1fpr']:.3f} [{r['tpr_ci95'][0]:.3f}, {r['tpr_ci95'][1]:.3f}] |")
    if "first_step_spread" in report:
        lines += ["", "First-step d over initial noises x_T (one prompt, several x_T):", "",
                  "| prompt set | prompts | x_T each | mean CV (std / mean) | spread between prompts / within |",
                  "|---|---|---|---|---|"]
        for name, v in report["first_step_spread"].items():
            lines.append(f"| {name} | {v['prompts']} | {v['generations']} | {v['mean_cv']:.3f} | "
                         f"{v['between_over_within']:.2f} |")
    return "\n".join(lines) + "\n"
