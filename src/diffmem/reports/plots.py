"""Matplotlib figures written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_figure(roc, memorized_scores, non_memorized_scores, out: str | Path, title: str = "",
               negative_label: str = "non-memorized",
               score_label: str = "score (mean text-conditional noise norm)") -> Path:
    """ROC curve (left) and the two score distributions (right; log axis when every score is > 0).

    `negative_label` names the control set in the legend (non-memorized, novel, normal prompts...).
    """
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(roc.fpr, roc.tpr, lw=2, label=f"AUC {roc.auc:.3f}")
    a.plot([0, 1], [0, 1], "k:", lw=1)
    a.axvline(0.01, color="grey", ls="--", lw=1, label=f"TPR@1%FPR {roc.tpr_at_1fpr:.3f}")
    a.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title or "ROC")
    a.legend(loc="lower right")
    pos, neg = np.asarray(memorized_scores, float), np.asarray(non_memorized_scores, float)
    lo, hi = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    log = lo > 0
    bins = np.logspace(np.log10(lo), np.log10(hi * 1.01), 40) if log else np.linspace(lo, hi + 1e-12, 40)
    b.hist(neg, bins=bins, alpha=0.6, label=f"{negative_label} (n={neg.size})")
    b.hist(pos, bins=bins, alpha=0.6, label=f"memorized (n={pos.size})")
    if np.isfinite(roc.threshold_at_1fpr):
        b.axvline(roc.threshold_at_1fpr, color="k", ls="--", lw=1, label="threshold at 1% FPR")
    b.set(xscale="log" if log else "linear", xlabel=score_label, ylabel="prompts", title="score distributions")
    b.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


def text_noise_norm_figure(curves: dict, images: dict | None, out: str | Path, title: str = "") -> Path:
    """Wen et al.'s fig. 1: d per DDIM step, one line per generation and a colour per prompt (left),
    and each prompt's generations in a row (right); PNG.

    curves: {label: (G, S) text_noise_norm}; images: {label: (G, 3, H, W) in [0, 1]} or None.
    """
    plt = _pyplot()
    labels = list(curves)
    G = max(len(np.atleast_2d(curves[k])) for k in labels)
    n_img = G if images else 0
    fig = plt.figure(figsize=(5.5 + 1.3 * n_img, max(3.6, 1.5 * len(labels))))
    grid = fig.add_gridspec(len(labels), 1 + n_img, width_ratios=[4.0] + [1.0] * n_img)
    ax = fig.add_subplot(grid[:, 0])
    for i, label in enumerate(labels):
        d = np.atleast_2d(np.asarray(curves[label], dtype=np.float64))  # (G, S)
        colour = f"C{i}"
        for g, row in enumerate(d):
            ax.plot(np.arange(len(row)), row, color=colour, lw=1.2, alpha=0.8, label=label if g == 0 else None)
        for g, img in enumerate(np.asarray(images[label]) if images else []):
            a = fig.add_subplot(grid[i, 1 + g])
            a.imshow(np.clip(np.asarray(img, dtype=np.float32).transpose(1, 2, 0), 0, 1), interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            for side in a.spines.values():  # the frame in the prompt's curve colour
                side.set_color(colour)
                side.set_linewidth(2)
            if g == 0:
                a.set_ylabel(_short(label, 28), fontsize=7, color=colour)
    ax.set(xlabel="DDIM step", ylabel="text-conditional noise norm d",
           title=title or "d per step, each line one generation")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def comparison_grid(training, generations, out: str | Path, tile: int = 64, gap: int = 4) -> Path:
    """One row per prompt: its training image, a gap, then its generations; PNG.

    training: list of (<=1, 3, H, W) tensors/arrays in [0, 1] (empty: a blank tile); generations: list of
    (G, 3, H, W). Small images are enlarged with nearest-neighbour so that pixels stay visible.
    """
    from PIL import Image

    rows = []
    G = max(len(g) for g in generations)
    for train, gens in zip(training, generations):
        gens = np.asarray(gens, dtype=np.float32)
        blank = np.ones_like(gens[0])
        cells = [np.asarray(train[0], dtype=np.float32) if len(train) else blank]
        cells += [np.full((3, gens.shape[-2], gap), 1.0, np.float32)]
        cells += [np.concatenate([g, np.ones((3, g.shape[-2], 1), np.float32)], -1) for g in gens]
        cells += [np.ones((3, gens.shape[-2], gens.shape[-1] + 1), np.float32)] * (G - len(gens))
        H = gens.shape[-2]
        cells = [c if c.shape[-2] == H else _resize_chw(c, H, c.shape[-1] * H // c.shape[-2]) for c in cells]
        rows.append(np.concatenate(cells, -1))
        rows.append(np.ones((3, 1, rows[-1].shape[-1]), np.float32))
    grid = np.concatenate(rows, -2)
    img = Image.fromarray((grid.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8))
    scale = max(1, tile // max(generations[0].shape[-2], 1))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return Path(out)


def _resize_chw(x: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray((x.transpose(1, 2, 0).clip(0, 1) * 255).round().astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0


TRADEOFF_X_LABELS = {"alignment_mean": "prompt alignment (lab content correct)", "clip_score_mean": "CLIP score",
                     "final_d_mean": "first-step d after mitigation"}


def tradeoff_figure(results: dict, out: str | Path, x_key: str | None, similarity_metric: str = "pixel_cosine") -> Path:
    """Similarity (left) and copy rate (right) against alignment / CLIP score, one curve per mitigation
    method across its hyperparameter sweep; no mitigation is a star (Wen et al.'s trade-off figure)."""
    plt = _pyplot()
    x_key = x_key or "final_d_mean"
    panels = [("similarity_mean", f"{similarity_metric} to training image (best match)")]
    if any(s.get("copy_rate") is not None for m in results.values() for s in m.values()):
        panels.append(("copy_rate", "copy rate"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for method, settings in results.items():
            pts = []
            for name, s in settings.items():
                y = s[key].get(similarity_metric) if key == "similarity_mean" else s[key]
                if y is not None and s.get(x_key) is not None:
                    pts.append((s["value"] if s["value"] is not None else 0, s[x_key], y, name))
            pts.sort()
            if not pts:
                continue
            xs, ys = [p[1] for p in pts], [p[2] for p in pts]
            if method == "none":
                ax.plot(xs, ys, "k*", ms=14, label="no mitigation")
                continue
            line, = ax.plot(xs, ys, "o-", label=method)
            for v, x, y, _ in pts:
                ax.annotate(f"{v:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        ax.set(xlabel=TRADEOFF_X_LABELS.get(x_key, x_key), ylabel=label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("mitigation trade-off (labels: target loss / words added)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
