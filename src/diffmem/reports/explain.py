"""Token significance as a terminal table and as a PNG bar chart (like Wen et al.'s fig. 4); no computation."""

from __future__ import annotations

from pathlib import Path

BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a character cell


def bar(fraction: float, width: int = 30) -> str:
    """A horizontal bar `fraction` (0..1) of `width` characters, drawn in eighths."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (BLOCKS[rest] if rest else "")


def significance_table(explanation, top: int | None = None, include_special: bool = False, width: int = 30) -> str:
    """Ranked tokens with a bar each, then the words; for the terminal."""
    ex = explanation
    ranked = ex.ranked_tokens(include_special)[:top]
    peak = max((t.score for t in ranked), default=0.0) or 1.0
    steps = ex.config.steps
    lines = [f"prompt: {ex.prompt}",
             f"score:  {ex.score:.4f}  (mean d over steps [{steps[0]}, {steps[1]}), {ex.config.generations} generations)"
             + ("  [prompt truncated to the model's token limit]" if ex.truncated else ""),
             f"{'rank':>4}  {'token':<16} {'significance':>12}"]
    for rank, t in enumerate(ranked, 1):
        name = t.token + (" (special)" if t.special else "")
        lines.append(f"{rank:>4}  {name[:16]:<16} {t.score:>12.4g}  {bar(t.score / peak, width)}")
    words = ", ".join(f"{w.word} {w.score:.3g}" for w in ex.ranked_words())
    lines.append(f"words (sum of their tokens), ranked: {words}")
    return "\n".join(lines)


def significance_figure(explanation, out: str | Path, include_special: bool = False) -> Path:
    """Bar chart of token significance in prompt order; the most significant token in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = explanation
    shown = [t for t in ex.tokens if include_special or not t.special]
    scores = [t.score for t in shown]
    top = max(range(len(shown)), key=scores.__getitem__) if shown else -1
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(shown) + 1.5), 3.6))
    colours = ["#d62728" if i == top else "#4c72b0" for i in range(len(shown))]
    ax.bar(range(len(shown)), scores, color=colours)
    ax.set_xticks(range(len(shown)), [t.token for t in shown], rotation=60, ha="right")
    ax.set_ylabel("significance ||∂d/∂e_j||")
    title = ex.prompt if len(ex.prompt) <= 70 else ex.prompt[:67] + "..."
    ax.set_title(f"{title}\nscore {ex.score:.3f}, steps [{ex.config.steps[0]}, {ex.config.steps[1]}), "
                 f"{ex.config.generations} generations", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
