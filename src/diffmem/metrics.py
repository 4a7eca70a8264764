"""Pure functions for the detection metric of Wen et al. (ICLR 2024, sec. 3) and its ROC evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def noise_norm(eps: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Per-sample L_p norm over all latent elements (p = 2 unless asked): (B, C, H, W) -> (B,)."""
    return eps.flatten(1).to(torch.promote_types(eps.dtype, torch.float32)).norm(p=p, dim=1)  # float64 stays float64


def text_noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """d = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_p per sample (paper eq. 3, p = 2; the original's
    ``lp`` option sets p): (B, C, H, W) x2 -> (B,)."""
    return noise_norm(eps_cond - eps_uncond, p)


TARGET_UNITS = ("batch", "mean")


def mitigation_loss(d: torch.Tensor | np.ndarray, unit: str = "batch"):
    """Embedding optimization's loss from per-generation d (..., G) -> (...).

    "batch": the seed's ``||eps_c - eps_u||_2`` over all G generations at once,
    ``sqrt(sum_g d_g^2)`` (about sqrt(G) times the mean d); "mean": the mean per-image d.
    """
    if unit == "batch":
        return (d ** 2).sum(-1) ** 0.5
    if unit == "mean":
        return d.mean(-1)
    raise ValueError(f"--target-unit {unit!r}: expected one of {', '.join(TARGET_UNITS)}")


def prompt_score(text_noise_norms, steps: slice | None = None, generations: int | None = None) -> float:
    """Mean of d over a window of steps and the first `generations` generations.

    text_noise_norms: array-like (G, S) of one prompt's per-generation, per-step d.
    """
    a = np.asarray(text_noise_norms, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"text_noise_norm must be a [generations][steps] array, got shape {a.shape}")
    a = a[:generations] if generations else a
    a = a[:, steps] if steps is not None else a
    if a.size == 0:
        raise ValueError(f"empty score window: steps={steps}, generations={generations}, stored shape {np.shape(text_noise_norms)}")
    return float(a.mean())


TPR_RULES = ("strict", "closest")  # how "TPR at x% FPR" is read off the ROC curve (``roc_point_at_fpr``)


def roc_point_at_fpr(fpr: np.ndarray, target: float, rule: str = "strict") -> int:
    """Index of the point of an ROC curve (``sklearn.metrics.roc_curve``'s (K,) fpr array, its
    intermediate points dropped, as by default) whose TPR is reported as "TPR at `target` FPR".

    "strict" (diffmem's, Wen et al.'s notebook): the last point whose FPR is below `target`, the
    largest TPR a threshold reaches with fewer false positives than that rate.
    "closest" (Ren et al.'s ``detect.py``, Jeon et al.'s and Asthana et al.'s ``detect_eval.py``):
    the point whose FPR is nearest `target`, the first of equally near ones (``np.argmin(|fpr - target|)``);
    its FPR may lie above the target.
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    if rule == "strict":
        return int(np.where(fpr < target)[0][-1])  # fpr[0] = 0: always found
    if rule == "closest":
        return int(np.argmin(np.abs(fpr - target)))
    raise ValueError(f"TPR rule {rule!r}: expected one of {', '.join(TPR_RULES)}")


@dataclass
class RocResult:
    auc: float
    acc: float  # max over thresholds of 1 - (FPR + FNR) / 2, as the official notebook defines it
    tpr_at_1fpr: float  # the largest TPR whose FPR is below 1% (the strict rule)
    threshold_at_1fpr: float  # the score threshold reaching it (score >= threshold is flagged)
    tpr_at_1fpr_closest: float  # the TPR of the ROC point whose FPR is nearest 1% (Ren's, Jeon's, Asthana's rule)
    fpr_at_1fpr_closest: float  # that point's FPR, which may exceed 1%
    n_memorized: int
    n_non_memorized: int
    fpr: np.ndarray
    tpr: np.ndarray

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in
                ("auc", "acc", "tpr_at_1fpr", "threshold_at_1fpr", "tpr_at_1fpr_closest", "fpr_at_1fpr_closest",
                 "n_memorized", "n_non_memorized")}


def roc_metrics(memorized_scores, non_memorized_scores, max_fpr: float = 0.01) -> RocResult:
    """ROC of memorized (positive) against non-memorized scores; higher score = more memorized.
    TPR at `max_fpr` by both rules of ``roc_point_at_fpr`` (the ``*_1fpr`` fields hold `max_fpr`'s)."""
    from sklearn.metrics import auc, roc_curve

    pos = np.asarray(memorized_scores, dtype=np.float64)
    neg = np.asarray(non_memorized_scores, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores on both sides: {pos.size} memorized, {neg.size} non-memorized")
    y = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    fpr, tpr, thresholds = roc_curve(y, np.concatenate([pos, neg]))
    i = roc_point_at_fpr(fpr, max_fpr, "strict")
    j = roc_point_at_fpr(fpr, max_fpr, "closest")
    return RocResult(
        auc=float(auc(fpr, tpr)),
        acc=float(np.max(1 - (fpr + (1 - tpr)) / 2)),
        tpr_at_1fpr=float(tpr[i]),
        threshold_at_1fpr=float(min(thresholds[i], np.finfo(np.float64).max)),
        tpr_at_1fpr_closest=float(tpr[j]),
        fpr_at_1fpr_closest=float(fpr[j]),
        n_memorized=int(pos.size),
        n_non_memorized=int(neg.size),
        fpr=fpr,
        tpr=tpr,
    )


def threshold_at_fpr(normal_scores, fpr: float = 0.01) -> float:
    """Decision threshold with a false-positive rate strictly below `fpr` on `normal_scores`.

    A prompt is flagged when ``score >= threshold``. At most ceil(fpr * n) - 1 of the n normal
    scores lie at or above the returned value (none when n < 1 / fpr).
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("no reference scores to calibrate a threshold on")
    allowed = max(int(np.ceil(fpr * s.size)) - 1, 0)
    return float(np.nextafter(s[s.size - 1 - allowed], np.inf))


def fpr_sample_warning(num_negatives: int, fpr: float = 0.01, what: str = "reference prompts") -> str | None:
    """A one-line warning when a false-positive rate rests on fewer than 1 / fpr negatives (None otherwise):
    with n < 1 / fpr normal prompts, "below fpr" only means "none of them", the threshold is their maximum."""
    need = int(np.ceil(1 / fpr - 1e-9))
    if num_negatives >= need:
        return None
    return (f"warning: the {100 * fpr:g}% FPR rests on {num_negatives} {what}; measuring it needs at least {need} "
            f"(1/FPR), so the threshold is only the highest of theirs: use at least {need} normal prompts")
