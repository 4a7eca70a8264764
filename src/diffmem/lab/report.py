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


def generation_figures(model, data: LabData, set_name: str, pairs: list[LabPair], train: TrainingImages,
                       threshold: float, config: SamplingConfig) -> tuple[GenerationFigures, np.ndarray, np.ndarray]:
    """Sample `pairs` fully and judge copies and described content; also returns the images and per-image copy flags."""
    res = sample_prompts(model, [p.caption for p in pairs], config, decode=True)
    images = np.concatenate([r.images.numpy() for r in res])  # (P*G, 3, H, W)
    G = config.num_generations
    captions = [p.caption for p in pairs for _ in range(G)]
    copies = judge_copies(images, captions, train, threshold)
    ok = content_correct(images, [p.spec.colour for p in pairs for _ in range(G)],
                         [p.spec.shape for p in pairs for _ in range(G)])
    return GenerationFigures(set_name, len(pairs), G, float(copies.is_copy.mean()), float(ok.mean())), images, copies.is_copy


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
