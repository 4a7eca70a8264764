"""Matplotlib figures written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(roc, memorized_scores, non_memorized_scores, out: str | Path, title: str = "") -> Path:
    """ROC curve (left) and the two score distributions on a log axis (right)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(roc.fpr, roc.tpr, lw=2, label=f"AUC {roc.auc:.3f}")
    a.plot([0, 1], [0, 1], "k:", lw=1)
    a.axvline(0.01, color="grey", ls="--", lw=1, label=f"TPR@1%FPR {roc.tpr_at_1fpr:.3f}")
    a.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title or "ROC")
    a.legend(loc="lower right")
    pos, neg = np.asarray(memorized_scores, float), np.asarray(non_memorized_scores, float)
    lo = max(min(pos.min(), neg.min()), 1e-12)
    bins = np.logspace(np.log10(lo), np.log10(max(pos.max(), neg.max()) * 1.01), 40)
    b.hist(neg, bins=bins, alpha=0.6, label=f"non-memorized (n={neg.size})")
    b.hist(pos, bins=bins, alpha=0.6, label=f"memorized (n={pos.size})")
    if np.isfinite(roc.threshold_at_1fpr):
        b.axvline(roc.threshold_at_1fpr, color="k", ls="--", lw=1, label="threshold at 1% FPR")
    b.set(xscale="log", xlabel="score (mean text-conditional noise norm)", ylabel="prompts", title="score distributions")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
