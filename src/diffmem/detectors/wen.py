"""Wen et al. (ICLR 2024, sec. 3): d = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2 per step.

On flow-matching models (SD3) d is taken on the velocity, ||v(x_t, e_prompt) - v(x_t, e_empty)||_2,
the difference that guidance amplifies there: the noise form is (1 - sigma) times it, 0 at sigma = 1.

The score of a prompt is the mean of d over the tracked steps and its generations (the first step
alone: first-step detection). Rows keep the per-generation, per-step arrays under the official
``det_outputs`` names, so ``roc`` can re-score any step window and number of generations later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffmem.detectors.registry import register
from diffmem.metrics import prompt_score
from diffmem.sampling import NoiseNormRecorder  # noqa: F401  (the pass keeps d: re-exported under its detector)

if TYPE_CHECKING:
    from diffmem.sampling import SamplingConfig


@register
class Wen:
    name = "wen"
    higher_is_memorized = True
    flow_refusal = None  # on a flow model d is the velocity difference ||v_c - v_u|| (NoiseNormRecorder)

    def __init__(self, norm_order: float = 2.0, score_window: tuple[int, int] | None = None):
        """`score_window` [start, end) of the tracked steps the score averages (default: all of them)."""
        if not norm_order >= 1:
            raise ValueError(f"--norm-order {norm_order}: must be >= 1 (2 is the paper's)")
        self.norm_order = norm_order
        self.score_window = None if score_window is None else slice(*score_window)

    def recorder(self, model, config: "SamplingConfig", prompts: list[str]) -> NoiseNormRecorder:
        return NoiseNormRecorder(self.norm_order)

    def fields(self, recorder: NoiseNormRecorder, rows: slice) -> dict:
        text = recorder.text_noise_norm()[rows].detach().float().cpu().tolist()
        return {self.name: prompt_score(text, self.score_window), "text_noise_norm": text,
                "uncond_noise_norm": recorder.uncond_noise_norm()[rows].detach().float().cpu().tolist()}

    def score_of(self, row: dict, steps: slice | None = None, generations: int | None = None) -> float:
        if "text_noise_norm" not in row:
            raise ValueError("no text_noise_norm field; is this a diffmem detect output?")
        return prompt_score(row["text_noise_norm"], steps, generations)
