"""flux-guidance: the guidance-derivative estimator of Wen's d on a guidance-distilled FLUX.1-dev
(**ours**; nothing is published on memorization in FLUX). docs/model-families.md has the derivation.

FLUX.1-dev has no unconditional branch: it was distilled to reproduce its teacher's classifier-free
guidance in one pass, with the guidance scale g as an input. If the student learned
v(x, c, g) ~ v_u + g (v_c - v_u) of the teacher, its derivative in g is the teacher's v_c - v_u, Wen's
quantity, with no unconditional input at all. At the first step on x_T, per generation:

    d_g = ||v(x_T, c, g2) - v(x_T, c, g1)||_2 / (g2 - g1),   g1 = 1, g2 = 3.5 (the pipeline's default),

and the linearity residual at the midpoint g_m = (g1 + g2) / 2,

    r = ||v(x_T, c, g_m) - (v(x_T, c, g1) + v(x_T, c, g2)) / 2|| / ||v(x_T, c, g2) - v(x_T, c, g1)||,

0 where v is linear in g (the estimator's premise). The score is the mean of d_g over the generations;
rows keep d_g and r per generation. Wen's d on the same rows (``wen``) is d_null, the velocity
difference against the empty prompt (the pipeline's true-CFG branch); the two side by side show how far
the distilled model's null branch can be trusted. Three conditional calls per generation.
"""

from __future__ import annotations

import torch

from diffmem.detectors.common import FirstStepRecorder, PerGeneration
from diffmem.detectors.registry import register

G1, G2 = 1.0, 3.5


def guidance_derivative(model, x: torch.Tensor, t, cond, g1: float = G1, g2: float = G2) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,) d_g, (N,) linearity residual) at latents x (N, C, H, W) and timestep t, conditional branch only."""
    v1, v2, vm = (model.model_output(x, t, cond, guidance=g).double() for g in (g1, g2, (g1 + g2) / 2))
    diff = (v2 - v1).flatten(1).norm(dim=1)
    residual = (vm - (v1 + v2) / 2).flatten(1).norm(dim=1) / diff.clamp_min(1e-30)
    return (diff / (g2 - g1)).cpu(), residual.cpu()


@register
class FluxGuidance(PerGeneration):
    name = "flux-guidance"
    per_generation_key = "flux_guidance_per_generation"
    first_step_only = True
    flow_refusal = None  # defined on FLUX-dev's velocity

    @staticmethod
    def refuse(model) -> str | None:
        """Why a model has no distilled guidance to differentiate, or None."""
        if not getattr(model, "guidance_embeds", False):
            return ("it differentiates the velocity in the distilled guidance input, which only a guidance-distilled "
                    "model (FLUX.1-dev) has")
        return None

    def recorder(self, model, config, prompts):
        return FirstStepRecorder(lambda step: guidance_derivative(model, step.x_t.detach(), step.t, step.cond.detach()))

    def values(self, recorder) -> torch.Tensor:
        return recorder.value[0]

    def fields(self, recorder, rows: slice) -> dict:
        return {**super().fields(recorder, rows), "flux_guidance_residual": recorder.value[1][rows].tolist()}
